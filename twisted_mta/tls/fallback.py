"""
What to do when TLS fails: the built-in fallback deciders and the hard
rules no decider can break.

A decision is one of:

 - C{defer}: not now; retry with TLS on the queue's schedule (and, at the
   end of the queue lifetime, bounce);
 - C{cleartext}: reconnect at once without TLS;
 - C{relaxed}: reconnect at once with TLS but without checking the
   certificate (only meaningful after a certificate failure);
 - C{via-relay}: hand the message to the configured secure relay instead.
"""

from __future__ import annotations

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import IFallbackDecider
from twisted_mta.tls.failure import TLSFailure
from twisted_mta.tls.policy import Destination, TLSRequirements

DEFER = "defer"
CLEARTEXT = "cleartext"
RELAXED = "relaxed"
VIA_RELAY = "via-relay"
ACTIONS = (DEFER, CLEARTEXT, RELAXED, VIA_RELAY)


# What a deferral leads to (Decision.later), so the words a sender reads
# come from the final decision, never from a decider's wish.
TLS_ONLY = "tls-only"  # later attempts keep the TLS requirement: never cleartext
CLEARTEXT_NEXT = "cleartext-next"  # the next attempt may go without encryption
CLEARTEXT_LATER = "cleartext-later"  # some later attempt may
LATER = (TLS_ONLY, CLEARTEXT_NEXT, CLEARTEXT_LATER)

# What decided (Decision.rule): the decider, or a rule that overrode it.
RULES = ("decider", "implicit-tls", "login", "requiretls", "ratchet", "dane", "mta-sts",
         "decider-error", "no-relay", "relaxed-useless")


@attrs.frozen
class Decision:
    action: str
    reason: str  # why, in a few words, for logs and bounces
    decider: str = ""
    later: str | None = None  # for a deferral: one of LATER, or None (not said)
    rule: str = "decider"

    def __attrs_post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fallback action {self.action!r}")
        if self.later is not None and self.later not in LATER:
            raise ValueError(f"unknown prospect {self.later!r}")
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}")

    @property
    def may_send_cleartext(self) -> bool:
        """
        Whether this decision sends, or promises to send, without TLS.
        """
        return self.action == CLEARTEXT or self.later in (CLEARTEXT_NEXT, CLEARTEXT_LATER)


@attrs.frozen
class Situation:
    destination: Destination
    requirements: TLSRequirements
    age: float = 0.0  # seconds since the message arrived
    attempts: int = 0  # earlier attempts of this message
    tls_failures: int = 0  # earlier attempts of this message that failed on TLS
    implicit_tls: bool = False
    credentials: bool = False  # the connection would log in
    requiretls: bool = False  # the message demands TLS (RFC 8689)
    relay: str | None = None  # the configured secure relay, if any
    history: object | None = None  # the destination's HistoryEntry, if any
    ratchet: str | None = None  # the history raised the requirements: why
    dane: bool = False  # the server publishes TLSA records (RFC 7672)
    sts: bool = False  # the domain's MTA-STS policy in mode enforce applies (RFC 8461)


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class Never:
    name: str = "never"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        return Decision(DEFER, "this destination never gets mail without its TLS policy",
                        self.name, later=TLS_ONLY)


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class Now:
    name: str = "now"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        return Decision(CLEARTEXT, f"{failure.kind}: sending without encryption at once",
                        self.name)


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class NextAttempt:
    """
    The first TLS failure of a message defers it; its next attempt may go
    in cleartext.
    """

    name: str = "next-attempt"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        if situation.tls_failures >= 1:
            return Decision(CLEARTEXT, f"{failure.kind} again: sending without encryption "
                            "on this later attempt", self.name)
        return Decision(DEFER, f"{failure.kind}: first failure, the next attempt may send "
                        "without encryption", self.name, later=CLEARTEXT_NEXT)


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class After:
    """
    Cleartext once the message is older than C{minutes}, or has failed on
    TLS C{failures} times before; until then, defer.
    """

    minutes: float | None = None
    failures: int | None = None
    name: str = "after"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        if self.minutes is not None and situation.age >= self.minutes * 60:
            return Decision(CLEARTEXT, f"{failure.kind}: message older than "
                            f"{self.minutes:g} minutes, sending without encryption", self.name)
        if self.failures is not None and situation.tls_failures >= self.failures:
            return Decision(CLEARTEXT, f"{failure.kind}: {situation.tls_failures} earlier TLS "
                            "failures, sending without encryption", self.name)
        return Decision(DEFER, f"{failure.kind}: waiting before any cleartext", self.name,
                        later=CLEARTEXT_LATER)


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class RelaxedNow:
    """
    After a certificate failure, retry at once encrypted but unverified;
    never cleartext.
    """

    name: str = "relaxed-now"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        if failure.is_certificate:
            return Decision(RELAXED, f"{failure.kind}: sending encrypted without "
                            "certificate checks", self.name)
        return Decision(DEFER, f"{failure.kind}: no encryption possible, waiting", self.name,
                        later=TLS_ONLY)


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class ViaRelay:
    name: str = "via-relay"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        if situation.relay:
            return Decision(VIA_RELAY, f"{failure.kind}: sending through the secure relay "
                            f"{situation.relay}", self.name)
        return Decision(DEFER, f"{failure.kind}: no secure relay is configured", self.name,
                        rule="no-relay")


BUILTIN = {d.name: d for d in (Never(), Now(), NextAttempt(), RelaxedNow(), ViaRelay())}


def parse_decider(spec: str, plugins: dict[str, object] | None = None):
    """
    A decider from its configured name: a built-in, C{after:30m},
    C{after:3-failures}, or a plugin's name.
    """
    if spec in BUILTIN:
        return BUILTIN[spec]
    if spec.startswith("after:"):
        arg = spec[len("after:"):]
        if arg.endswith("-failures") and arg[:-len("-failures")].isdigit():
            return After(failures=int(arg[:-len("-failures")]))
        units = {"m": 1, "h": 60, "d": 1440}
        if arg[:-1].isdigit() and arg[-1:] in units:
            return After(minutes=int(arg[:-1]) * units[arg[-1]])
        raise ValueError(f"{spec!r}: use after:<N>m, after:<N>h, after:<N>d or "
                         "after:<N>-failures")
    if plugins and spec in plugins:
        return plugins[spec]
    raise ValueError(f"unknown fallback decider {spec!r}")


def cleartext_forbidden(situation: Situation, failure: TLSFailure | None = None
                         ) -> tuple[str, str] | None:
    """
    The hard rule that forbids cleartext in C{situation} (after C{failure}),
    if any: C{(rule, why in words)}.
    """
    dane = situation.dane or (failure is not None and failure.is_dane)
    for rule, applies, why in (
            ("dane", dane, "the server publishes DANE (TLSA) records: never without "
                           "encryption (RFC 7672)"),
            ("mta-sts", situation.sts, "the domain's MTA-STS policy (mode enforce) requires "
                                       "encryption with a valid certificate (RFC 8461)"),
            ("implicit-tls", situation.implicit_tls, "implicit TLS never falls back to "
                                                     "cleartext"),
            ("login", situation.credentials, "our login is never sent without encryption"),
            ("requiretls", situation.requiretls, "the message requires TLS (REQUIRETLS)"),
            ("ratchet", bool(situation.ratchet),
             f"no downgrade to cleartext: {situation.ratchet}")):
        if applies:
            return rule, why
    return None


def published_rule(situation: Situation, failure: TLSFailure | None = None
                   ) -> tuple[str, str] | None:
    """
    The rule of what the destination publishes, if one applies: DANE (or a
    DANE failure), or an MTA-STS policy in mode enforce.
    """
    found = cleartext_forbidden(situation, failure)
    return found if found is not None and found[0] in ("dane", "mta-sts") else None


def decide(decider, failure: TLSFailure, situation: Situation) -> Decision:
    """
    Ask C{decider}, then apply the hard rules: a DANE destination (or a
    DANE failure) and an MTA-STS destination in mode enforce never go to
    cleartext nor to a relaxed retry; implicit TLS, a connection with our
    login, a REQUIRETLS message and a ratcheted destination never go to
    cleartext, and no deferral promises it; a REQUIRETLS message never
    goes to a relaxed retry nor through the relay either (RFC 8689 4.2.1); a relaxed retry only follows
    a certificate failure; without a relay there is no via-relay.
    The result names the rule that decided (C{rule}) and what a deferral
    leads to (C{later}): the words a sender reads are made from it.
    """
    name = getattr(decider, "name", "?")
    try:
        d = decider.decide(failure, situation)
        if not isinstance(d, Decision):
            raise TypeError(f"returned {d!r}, not a Decision")
    except Exception as e:  # a broken plugin must not lose mail
        d = Decision(DEFER, f"the fallback decider failed ({e})", name, rule="decider-error")
    if d.action == RELAXED and not failure.is_certificate:
        d = Decision(DEFER, f"{failure.kind}: a relaxed retry cannot help", d.decider,
                     later=TLS_ONLY if d.decider == RelaxedNow.name else None,
                     rule="relaxed-useless")
    published = published_rule(situation, failure)
    if d.action == RELAXED and published is not None:
        # DANE and MTA-STS say which certificate to expect: one that is not
        # checked proves nothing they promise.
        rule, why = published
        d = Decision(DEFER, why, d.decider, later=TLS_ONLY, rule=rule)
    if situation.requiretls and d.action in (RELAXED, VIA_RELAY):
        # RFC 8689 4.2.1: a certificate that is not checked proves nothing,
        # and the relay's session would not be held to REQUIRETLS either.
        d = Decision(DEFER, "the message requires TLS (REQUIRETLS): no retry without "
                     "certificate checks, no other route", d.decider, later=TLS_ONLY,
                     rule="requiretls")
    if d.action == VIA_RELAY and not situation.relay:
        d = Decision(DEFER, "no secure relay is configured", d.decider, rule="no-relay")
    forbidden = cleartext_forbidden(situation, failure)
    if forbidden is not None:
        rule, why = forbidden
        if d.action == CLEARTEXT:
            return Decision(DEFER, why, d.decider, later=TLS_ONLY, rule=rule)
        if d.action == DEFER and d.later != TLS_ONLY:
            return attrs.evolve(d, reason=f"{d.reason}; {why}", later=TLS_ONLY, rule=rule)
    return d


def can_send_cleartext(decider, requirements: TLSRequirements | None = None,
                       destination: Destination | None = None) -> bool:
    """
    Whether C{decider} ever answers C{cleartext}: it is asked about every
    failure kind, for a new and an old message, with no and many earlier
    failures.  A probe that raises counts as no (the pool defers then).
    Pure: for C{config check} and C{config show}, which cannot wait for a
    real failure to learn that "strict" may still mean cleartext.
    """
    import itertools

    from twisted_mta.tls.failure import TLS_KINDS
    if requirements is None:
        requirements = TLSRequirements("strict", starttls="required", verify=True)
    if destination is None:
        destination = Destination("example.com", "mx.example")
    for kind in TLS_KINDS:
        failure = TLSFailure(kind, host=destination.host, address="192.0.2.1", port=25)
        for age, attempts, failures in itertools.product((0.0, 30 * 86400.0), (0, 100),
                                                         (0, 100)):
            situation = Situation(destination=destination, requirements=requirements,
                                  age=age, attempts=attempts, tls_failures=failures)
            try:
                if decider.decide(failure, situation).action == CLEARTEXT:
                    return True
            except Exception:
                continue
    return False
