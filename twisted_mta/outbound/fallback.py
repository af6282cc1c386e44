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
from twisted_mta.outbound.tlsfailure import TLSFailure
from twisted_mta.outbound.tlspolicy import Destination, TLSRequirements

DEFER = "defer"
CLEARTEXT = "cleartext"
RELAXED = "relaxed"
VIA_RELAY = "via-relay"
ACTIONS = (DEFER, CLEARTEXT, RELAXED, VIA_RELAY)


@attrs.frozen
class Decision:
    action: str
    reason: str  # why, in a few words, for logs and bounces
    decider: str = ""

    def __attrs_post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fallback action {self.action!r}")


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


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class Never:
    name: str = "never"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        return Decision(DEFER, "this destination never gets mail without its TLS policy",
                        self.name)


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
                        "without encryption", self.name)


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
        return Decision(DEFER, f"{failure.kind}: waiting before any cleartext", self.name)


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
        return Decision(DEFER, f"{failure.kind}: no encryption possible, waiting", self.name)


@implementer(IFallbackDecider, IPlugin)
@attrs.frozen
class ViaRelay:
    name: str = "via-relay"

    def decide(self, failure: TLSFailure, situation: Situation) -> Decision:
        if situation.relay:
            return Decision(VIA_RELAY, f"{failure.kind}: sending through the secure relay "
                            f"{situation.relay}", self.name)
        return Decision(DEFER, f"{failure.kind}: no secure relay is configured", self.name)


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


def decide(decider, failure: TLSFailure, situation: Situation) -> Decision:
    """
    Ask C{decider}, then apply the hard rules: implicit TLS, a connection
    with our login, and a REQUIRETLS message never go to cleartext; a
    relaxed retry only follows a certificate failure; without a relay there
    is no via-relay.
    """
    try:
        d = decider.decide(failure, situation)
    except Exception as e:  # a broken plugin must not lose mail
        return Decision(DEFER, f"the fallback decider failed ({e})", getattr(decider, "name",
                                                                                "?"))
    if d.action == CLEARTEXT:
        for rule, why in ((situation.implicit_tls, "implicit TLS never falls back to cleartext"),
                          (situation.credentials, "our login is never sent without encryption"),
                          (situation.requiretls, "the message requires TLS (REQUIRETLS)")):
            if rule:
                return Decision(DEFER, why, d.decider)
        if situation.ratchet:
            return Decision(DEFER, f"no downgrade to cleartext: {situation.ratchet}", "ratchet")
    if d.action == RELAXED and not failure.is_certificate:
        return Decision(DEFER, f"{failure.kind}: a relaxed retry cannot help", d.decider)
    if d.action == VIA_RELAY and not situation.relay:
        return Decision(DEFER, "no secure relay is configured", d.decider)
    return d
