"""
The truth table of the TLS policy engine: policy x failure x decider ->
decision, for every row of the failure taxonomy and every built-in
decider, with the hard rules on top.
"""

from __future__ import annotations

import attrs
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_mta.interfaces import IFallbackDecider, ITLSPolicy
from twisted_mta.outbound import fallback as fb
from twisted_mta.outbound.tlsfailure import TLS_KINDS, TLSFailure
from twisted_mta.outbound.tlspolicy import BUILTIN, Destination, fails_under

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
    ("handshake-failed", "no-common-version"),
    ("handshake-failed", "no-common-cipher"),
    ("handshake-failed", "reset"),
    ("handshake-failed", "timeout"),
]
CERT = {"certificate-expired", "certificate-not-yet-valid", "certificate-untrusted",
        "certificate-host-mismatch"}

# Which failures a policy can have at all (a policy that does not check
# certificates has no certificate failures; one that does not require
# STARTTLS has no "not offered" failure).
CAN_FAIL = {
    "none": set(),
    "opportunistic": {"starttls-refused", "handshake-failed"},
    "relaxed": {"starttls-not-offered", "starttls-refused", "handshake-failed"},
    "strict": {"starttls-not-offered", "starttls-refused", "handshake-failed"} | CERT,
}

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
    if action == C and (s.implicit_tls or s.credentials or s.requiretls):
        return D
    return action


SITUATIONS = [
    dict(),
    dict(tls_failures=1, age=600),
    dict(tls_failures=2, age=3600),
    dict(relay="[relay.example]:465"),
    dict(implicit_tls=True, tls_failures=5, age=7200, relay="[relay.example]:465"),
    dict(credentials=True, tls_failures=5, age=7200),
    dict(requiretls=True, tls_failures=5, age=7200),
]


class TruthTableTests(SynchronousTestCase):
    def test_policy_x_failure_x_decider(self):
        """Every policy, every taxonomy row, every built-in decider, in situations that exercise timing, history, relay and the hard rules."""
        cells = 0
        for policy_name, policy in BUILTIN.items():
            req = policy.requirements(Destination("example.com", "mx.example.com"))
            for kind, detail in FAILURES:
                self.assertEqual(fails_under(req, kind), kind in CAN_FAIL[policy_name],
                                 (policy_name, kind))
                if not fails_under(req, kind):
                    continue
                failure = TLSFailure(kind, host="mx.example.com", address="192.0.2.1",
                                     port=25, detail=detail)
                for decider_name in ["never", "now", "next-attempt", "after:30m",
                                     "after:2-failures", "relaxed-now", "via-relay"]:
                    decider = fb.parse_decider(decider_name)
                    for extra in SITUATIONS:
                        s = fb.Situation(destination=Destination("example.com",
                                                                 "mx.example.com"),
                                         requirements=req, **extra)
                        d = fb.decide(decider, failure, s)
                        want = hard_rules(expected(decider_name, kind, s), s)
                        self.assertEqual(d.action, want,
                                         (policy_name, kind, detail, decider_name, extra,
                                          d.reason))
                        self.assertTrue(d.reason)
                        cells += 1
        # rows that are failures: opportunistic 5, relaxed 6, strict all 12
        self.assertEqual(cells, (5 + 6 + 12) * 7 * len(SITUATIONS))
        self.assertEqual({k for k, _ in FAILURES}, set(TLS_KINDS))

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
        self.assertEqual(d.action, fb.DEFER)
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
