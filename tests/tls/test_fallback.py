"""
The truth table of the TLS policy engine: policy x failure x decider ->
decision, for every row of the failure taxonomy and every built-in
decider, with the hard rules on top.
"""

from __future__ import annotations

import re

import attrs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_mta.interfaces import IFallbackDecider, ITLSPolicy
from twisted_mta.tls import fallback as fb
from twisted_mta.config import OutboundTLSSettings
from twisted_mta.tls.engine import Registry, TLSEngine
from twisted_mta.tls.failure import TLS_KINDS, TLSFailure
from twisted_mta.tls.dane import TLSARecord
from twisted_mta.tls.policy import (
    BUILTIN, Choice, Destination, dane_requirements, default_fallback, fails_under,
    sts_requirements,
)

RULE_WORDS = {
    "dane": "DANE",
    "mta-sts": "MTA-STS",
    "implicit-tls": "implicit TLS",
    "login": "login",
    "requiretls": "required TLS",
    "ratchet": "drop silently",
}


def _strip_never(text: str) -> str:
    """
    The text without the phrases that say encryption is never given up
    ("never sent there without it", "never sent without encryption").
    """
    return re.sub(r"never (sent|goes)( there)? without (it|encryption)", "", text)

# Every row of the taxonomy, with the details a class can have.
FAILURES = [
    ("starttls-not-offered", ""),
    ("starttls-refused", ""),
    ("certificate-expired", "expired"),
    ("certificate-not-yet-valid", "not-yet-valid"),
    ("certificate-untrusted", "self-signed"),
    ("certificate-untrusted", "unknown-ca"),
    ("certificate-untrusted", "incomplete-chain"),
    ("certificate-host-mismatch", "name"),
    ("certificate-weak", "key-too-small"),
    ("certificate-weak", "weak-signature"),
    ("handshake-plaintext", "plaintext"),
    ("handshake-closed", "closed"),
    ("handshake-timeout", "timeout"),
    ("handshake-no-common-version", "versions-refused"),
    ("handshake-no-common-version", "server-too-old"),
    ("handshake-no-common-cipher", "no-common-cipher"),
    ("handshake-failed", "some openssl words"),
    ("dane-mismatch", "no-match"),
    ("dane-name-mismatch", "name"),
    ("dane-chain-invalid", "not-linked"),
    ("dane-starttls-missing", ""),
    ("dane-lookup-failed", "SERVFAIL"),
    ("dnssec-bogus", "bogus"),
    ("sts-mx-mismatch", ""),
]
CERT = {"certificate-expired", "certificate-not-yet-valid", "certificate-untrusted",
        "certificate-host-mismatch", "certificate-weak"}
HANDSHAKE = {"handshake-plaintext", "handshake-closed", "handshake-timeout",
             "handshake-no-common-version", "handshake-no-common-cipher", "handshake-failed"}
# The DANE classes (tls/dane.py) arise only where the server's TLSA
# records apply: they are failures of the published "dane" policy alone.
DANE = {"dane-mismatch", "dane-name-mismatch", "dane-chain-invalid", "dane-starttls-missing",
        "dane-lookup-failed", "dnssec-bogus"}

# Which failures a policy can have at all (a policy that does not check
# certificates has no certificate failures; one that does not require
# STARTTLS has no "not offered" failure).
CAN_FAIL = {
    "none": set(),
    "opportunistic": {"starttls-refused"} | HANDSHAKE,
    "relaxed": {"starttls-not-offered", "starttls-refused"} | HANDSHAKE,
    "strict": {"starttls-not-offered", "starttls-refused"} | HANDSHAKE | CERT,
    # What destinations publish (issue 12): DANE judges the certificate by
    # the TLSA records (no certificate classes; STARTTLS missing is a DANE
    # class); MTA-STS enforce is strict for the listed MX hosts, and an MX
    # host it does not list is refused.
    "dane": {"starttls-refused"} | HANDSHAKE | DANE,
    "mta-sts": {"starttls-not-offered", "starttls-refused", "sts-mx-mismatch"} | HANDSHAKE
    | CERT,
}
TLSA = TLSARecord(3, 1, 1, bytes(32))
PUBLISHED = {
    "dane": (dane_requirements((TLSA,), ("mx.example.com",)), dict(dane=True)),
    "mta-sts": (sts_requirements("mx.example.com"), dict(sts=True)),
}
# The decider of an entry that names none (docs/tls.md): never where the
# policy requires TLS, now elsewhere.
POLICY_DEFAULT = {"opportunistic": "now", "relaxed": "never", "strict": "never",
                  "dane": "never", "mta-sts": "never"}
DECIDERS = ["never", "now", "next-attempt", "after:30m", "after:2-failures", "relaxed-now",
            "via-relay", None]  # None: no fallback written

D, C, R, V = fb.DEFER, fb.CLEARTEXT, fb.RELAXED, fb.VIA_RELAY


def expected(decider: str, kind: str, s: fb.Situation) -> str:
    """
    The decision, written out from the decider's documentation (not from
    its code), before the hard rules.
    """
    return {
        "never": D,
        "now": C,
        "next-attempt": C if s.tls_failures >= 1 else D,
        "after:30m": C if s.age >= 1800 else D,
        "after:2-failures": C if s.tls_failures >= 2 else D,
        "relaxed-now": R if kind in CERT else D,
        "via-relay": V if s.relay else D,
    }[decider]


def hard_rules(action: str, s: fb.Situation) -> str:
    if action in (C, R) and (s.dane or s.sts):
        return D  # what the destination publishes: never cleartext, never relaxed
    if s.requiretls and action != D:
        return D  # RFC 8689 4.2.1: verified TLS to this server, or not sent at all
    if action == C and (s.implicit_tls or s.credentials or s.requiretls or s.ratchet):
        return D
    return action


def policies():
    """
    (name, requirements, situation flags): the built-ins, then the
    policies destinations publish, with the flags their attempts set.
    """
    for name, policy in BUILTIN.items():
        yield name, policy.requirements(Destination("example.com", "mx.example.com")), {}
    for name, (req, flags) in PUBLISHED.items():
        yield name, req, flags


SITUATIONS = [
    dict(),
    dict(tls_failures=1, age=600),
    dict(tls_failures=2, age=3600),
    dict(relay="[relay.example]:465"),
    dict(implicit_tls=True, tls_failures=5, age=7200, relay="[relay.example]:465"),
    dict(implicit_tls=True),
    dict(credentials=True, tls_failures=5, age=7200),
    dict(credentials=True),
    dict(requiretls=True, tls_failures=5, age=7200),
    dict(requiretls=True, tls_failures=5, age=7200, relay="[relay.example]:465"),
    dict(ratchet="example.com used verified TLS on 1 March 2026", tls_failures=5, age=7200),
]


def table():
    """
    Every cell: (policy, requirements, failure, decider spec, decider
    name, situation, decision).
    """
    for policy_name, req, flags in policies():
        for kind, detail in FAILURES:
            if not fails_under(req, kind):
                continue
            failure = TLSFailure(kind, host="mx.example.com", address="192.0.2.1", port=25,
                                 detail=detail, versions="TLSv1.2-TLSv1.3", waited=30)
            for spec in DECIDERS:
                name = spec or default_fallback(req)
                for extra in SITUATIONS:
                    s = fb.Situation(destination=Destination("example.com", "mx.example.com"),
                                     requirements=req, **extra, **flags)
                    yield (policy_name, req, failure, spec, name, s,
                           fb.decide(fb.parse_decider(name), failure, s))


class TruthTableTests(SynchronousTestCase):
    def test_policy_x_failure_x_decider(self):
        """Every policy, every taxonomy row, every built-in decider and the policy's default (no fallback written), in situations that exercise timing, history, relay and the hard rules."""
        for policy_name, req, _ in policies():
            for kind, _ in FAILURES:
                self.assertEqual(fails_under(req, kind), kind in CAN_FAIL[policy_name],
                                 (policy_name, kind))
        cells = 0
        for policy_name, req, failure, spec, name, s, d in table():
            if spec is None:
                self.assertEqual(name, POLICY_DEFAULT[policy_name])
            want = hard_rules(expected(name, failure.kind, s), s)
            self.assertEqual(d.action, want, (policy_name, failure.kind, failure.detail, spec,
                                              s, d.reason))
            self.assertTrue(d.reason)
            cells += 1
        # rows that are failures: opportunistic 8, relaxed 9, strict 17 (all but the
        # DANE and MTA-STS rows), dane 14, mta-sts 18
        self.assertEqual(cells, (8 + 9 + 17 + 14 + 18) * len(DECIDERS) * len(SITUATIONS))
        self.assertEqual({k for k, _ in FAILURES}, set(TLS_KINDS))

    def test_dane_failures_never_reach_cleartext_or_relaxed(self):
        """Issue 12: after a DANE failure no decider reaches cleartext or a relaxed retry (a hard rule, like implicit TLS)."""
        req = BUILTIN["strict"].requirements(Destination("example.com", "mx.example.com"))
        for kind in sorted(DANE):
            failure = TLSFailure(kind, host="mx.example.com", address="192.0.2.1", port=25)
            for spec in DECIDERS[:-1]:
                for extra in SITUATIONS:
                    s = fb.Situation(destination=Destination("example.com", "mx.example.com"),
                                     requirements=req, **extra)
                    d = fb.decide(fb.parse_decider(spec), failure, s)
                    self.assertNotIn(d.action, (C, R), (kind, spec, extra))

    def test_dane_destination_never_reaches_cleartext(self):
        """A destination with usable TLSA records (Situation.dane) never gets cleartext after any TLS failure, whatever the decider; the rule that decided is dane and no deferral promises cleartext."""
        req = BUILTIN["opportunistic"].requirements(Destination("example.com", "mx.example.com"))
        for kind in ("handshake-closed", "starttls-refused", "handshake-plaintext"):
            failure = TLSFailure(kind, host="mx.example.com", address="192.0.2.1", port=25)
            for spec in ("now", "next-attempt", "after:30m"):
                s = fb.Situation(Destination("example.com", "mx.example.com"), req, dane=True,
                                 tls_failures=5, age=7200)
                d = fb.decide(fb.parse_decider(spec), failure, s)
                self.assertEqual((d.action, d.rule, d.later), (D, "dane", fb.TLS_ONLY),
                                 (kind, spec))

    def test_strict_and_relaxed_default_never_reaches_cleartext(self):
        """With no fallback written, strict and relaxed never send in cleartext nor promise it, whatever the failure, age or history; opportunistic's default sends at once."""
        for policy_name, req, failure, spec, name, s, d in table():
            if spec is not None:
                continue
            if policy_name in ("strict", "relaxed"):
                self.assertFalse(d.may_send_cleartext, (policy_name, failure.kind, s))
            elif not hard_rules(C, s) == D:
                self.assertEqual(d.action, C)

    def test_no_words_promise_what_the_final_decision_forbids(self):
        """Property over the whole table: no explanation, delay warning or final bounce promises or describes a cleartext attempt unless the final decision (after the hard rules) allows one; when it does, the explanation says so; the rule named is the one that decided."""
        engine = TLSEngine(OutboundTLSSettings(), registry=Registry())
        checked = 0
        for policy_name, req, failure, spec, name, s, d in table():
            source = policy_name if policy_name in PUBLISHED else "config"
            choice = Choice(req, name, "domain example.com", ratcheted=s.ratchet, source=source)
            words = engine.explain(failure, choice, "example.com", d, s)
            if source != "config":
                # the sender reads what the destination published, and that it stays so
                self.assertIn({"dane": "DANE", "mta-sts": "MTA-STS"}[source], words)
                # never cleartext nor relaxed; the secure relay remains a way
                self.assertIn((d.action, d.later), ((D, fb.TLS_ONLY), (V, None)),
                              (policy_name, failure.kind, name, s))
            final = engine.explain(failure, choice, "example.com", d, s, final=True)
            cell = (policy_name, failure.kind, name, s, d)
            for text in (final,):
                self.assertNotIn("without encryption", _strip_never(text), cell)
                self.assertNotIn("tried again", text, cell)
            if d.action == D:
                if d.later in (fb.CLEARTEXT_NEXT, fb.CLEARTEXT_LATER):
                    self.assertRegex(words, r"will be sent without encryption", cell)
                else:
                    self.assertNotRegex(_strip_never(words), r"without encryption", cell)
                    self.assertNotIn("instead", words, cell)
                if d.rule in ("implicit-tls", "login", "requiretls", "ratchet", "dane",
                              "mta-sts"):
                    self.assertEqual(d.later, fb.TLS_ONLY, cell)
                    self.assertIn(RULE_WORDS[d.rule], words, cell)
            elif d.action == C:
                self.assertIn("sends it without encryption instead", words, cell)
                self.assertFalse(hard_rules(C, s) == D, cell)
            checked += 1
        self.assertGreater(checked, 1000)

    def test_rule_that_stopped_the_message_is_named(self):
        """A login route without STARTTLS under opportunistic names the login rule, not the policy; an implicit route with policy none names implicit TLS, not 'none requires nothing'."""
        engine = TLSEngine(OutboundTLSSettings(), registry=Registry())
        opp = BUILTIN["opportunistic"].requirements(Destination("example.com", "smtp.example"))
        failure = TLSFailure("starttls-not-offered", host="smtp.example", address="192.0.2.9",
                             port=587)
        s = fb.Situation(Destination("example.com", "smtp.example", True), opp,
                         credentials=True)
        d = fb.decide(fb.parse_decider("now"), failure, s)
        text = engine.explain(failure, Choice(opp, "now", "smarthost smtp.example"),
                              "example.com", d, s)
        self.assertIn("our login is never sent without encryption", text)
        self.assertNotIn("whenever the server offers it", text)
        self.assertIn("smtp.example[192.0.2.9]:587", text)
        # The route's policy as chosen (the session itself still starts TLS
        # from the first byte: implicit TLS).
        none = BUILTIN["none"].requirements(Destination("d", "h"))
        failure = TLSFailure("handshake-closed", host="smtp.example", address="192.0.2.9",
                             port=465, implicit=True)
        s = fb.Situation(Destination("example.com", "smtp.example", True), none,
                         implicit_tls=True)
        d = fb.decide(fb.parse_decider("next-attempt"), failure, s)
        text = engine.explain(failure, Choice(none, "next-attempt", "smarthost smtp.example"),
                              "example.com", d, s)
        self.assertIn("uses implicit TLS", text)
        self.assertNotIn("requires nothing", text)
        self.assertNotIn("will be sent without encryption", text)

    def test_hard_rules_beat_a_decider_that_insists(self):
        """A plugin that always says cleartext cannot break the hard rules."""
        @attrs.frozen
        class Reckless:
            name: str = "reckless"

            def decide(self, failure, situation):
                return fb.Decision(fb.CLEARTEXT, "always", self.name)
        failure = TLSFailure("certificate-expired", host="h", address="a", port=25)
        req = BUILTIN["strict"].requirements(Destination("d", "h"))
        for rule in ("implicit_tls", "credentials", "requiretls"):
            s = fb.Situation(Destination("d", "h"), req, **{rule: True})
            d = fb.decide(Reckless(), failure, s)
            self.assertEqual(d.action, fb.DEFER, rule)
        ok = fb.decide(Reckless(), failure, fb.Situation(Destination("d", "h"), req))
        self.assertEqual(ok.action, fb.CLEARTEXT)

    def test_a_broken_decider_defers(self):
        """A decider that raises does not lose mail: the message is deferred."""
        class Broken:
            name = "broken"

            def decide(self, failure, situation):
                raise RuntimeError("oops")
        failure = TLSFailure("handshake-failed", host="h", address="a", port=25)
        req = BUILTIN["strict"].requirements(Destination("d", "h"))
        d = fb.decide(Broken(), failure, fb.Situation(Destination("d", "h"), req))
        self.assertEqual((d.action, d.rule), (fb.DEFER, "decider-error"))
        self.assertIn("oops", d.reason)

    def test_relaxed_retry_only_after_certificate_failure(self):
        """relaxed from any decider after a non-certificate failure is turned into defer."""
        @attrs.frozen
        class AlwaysRelaxed:
            name: str = "always-relaxed"

            def decide(self, failure, situation):
                return fb.Decision(fb.RELAXED, "try", self.name)
        req = BUILTIN["strict"].requirements(Destination("d", "h"))
        s = fb.Situation(Destination("d", "h"), req)
        for kind in TLS_KINDS:
            d = fb.decide(AlwaysRelaxed(), TLSFailure(kind, host="h", address="a", port=25), s)
            self.assertEqual(d.action, fb.RELAXED if kind in CERT else fb.DEFER, kind)

    def test_builtins_provide_the_interfaces(self):
        for policy in BUILTIN.values():
            verifyObject(ITLSPolicy, policy)
        for decider in fb.BUILTIN.values():
            verifyObject(IFallbackDecider, decider)
        verifyObject(IFallbackDecider, fb.parse_decider("after:30m"))

    def test_parse_decider(self):
        self.assertEqual(fb.parse_decider("after:2h").minutes, 120)
        self.assertEqual(fb.parse_decider("after:3-failures").failures, 3)
        for bad in ["after:", "after:soon", "sometimes"]:
            self.assertRaises(ValueError, fb.parse_decider, bad)


class BuiltinPolicyTests(SynchronousTestCase):
    def test_what_each_policy_accepts(self):
        """opportunistic takes TLS 1.0 and security level 0; relaxed and strict keep a TLS 1.2 floor; only strict verifies."""
        req = {n: p.requirements(Destination("d", "h")) for n, p in BUILTIN.items()}
        self.assertEqual(req["none"].starttls, "never")
        self.assertEqual((req["opportunistic"].starttls, req["opportunistic"].min_version,
                          req["opportunistic"].ciphers, req["opportunistic"].verify),
                         ("if-offered", "TLSv1.0", "ALL:@SECLEVEL=0", False))
        self.assertEqual((req["relaxed"].starttls, req["relaxed"].min_version,
                          req["relaxed"].verify), ("required", "TLSv1.2", False))
        self.assertEqual((req["strict"].starttls, req["strict"].min_version,
                          req["strict"].verify), ("required", "TLSv1.2", True))
