"""
Which source decides a destination's policy (issue 12): an explicit entry
of the configuration (domain, parent domain, MX host, smarthost), then
DANE (a DNSSEC-secure TLSA RRset, or one whose look-up must be waited
for), then an MTA-STS policy in mode enforce, then the default, which an
MTA-STS policy in mode testing shadows.  A table over every combination.
"""

from __future__ import annotations

import itertools

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import OutboundTLSSettings, Smarthost, TLSPolicyEntry
from twisted_mta.tls import published as pub
from twisted_mta.tls.dane import TLSARecord
from twisted_mta.tls.engine import Registry, TLSEngine
from twisted_mta.tls.sts import StsRecord, parse_policy
from twisted_mta.tls.sts_cache import Lookup

TLSA = TLSARecord(3, 1, 1, bytes(32))
HOST = "mx.dest.example"


def sts(mode: str | None) -> Lookup | None:
    if mode is None:
        return None
    if mode == "absent":
        return Lookup("dest.example", None, "none")
    policy = parse_policy(f"version: STSv1\r\nmode: {mode}\r\nmx: {HOST}\r\nmax_age: 86400\r\n")
    return Lookup("dest.example", policy if mode != "none" else None, "cache",
                  StsRecord("20261203"))


def facts(domain: str, dane: str, mode: str | None) -> pub.Facts:
    records = (TLSA,) if dane == pub.RECORDS else ()
    host = pub.Host(HOST, 25, dane, f"dane {dane}", records=records, names=(HOST,),
                    failure_kind="dane-lookup-failed" if dane == pub.DEFER else None)
    return pub.Facts(domain, None, host, sts(mode))


def engine() -> TLSEngine:
    settings = OutboundTLSSettings(
        policy="opportunistic",
        domains=(("explicit.example", TLSPolicyEntry("relaxed")),
                 (".parent.example", TLSPolicyEntry("none"))),
        mx_hosts=(("*.pinned.example", TLSPolicyEntry("strict")),))
    return TLSEngine(settings, registry=Registry())


def expected(domain: str, host: str, smarthost: bool, dane: str, mode: str | None) -> str:
    """The deciding source, written from the issue's order (not from the code)."""
    if domain in ("explicit.example", "a.parent.example") or host.endswith(".pinned.example"):
        return "config"
    if smarthost:  # a route: what MX hosts publish does not apply
        return "default"
    if dane in (pub.RECORDS, pub.DEFER):
        return "dane"
    if mode == "enforce":
        return "mta-sts"
    return "default"


class PrecedenceTests(SynchronousTestCase):
    def test_table(self) -> None:
        """Every destination x DANE state x MTA-STS state: the source that decides, its policy, and the shadow that testing adds."""
        e = engine()
        relay = Smarthost(host="relay.example", port=25)
        cells = 0
        for (domain, host), smart, dane, mode in itertools.product(
                [("dest.example", HOST), ("explicit.example", HOST),
                 ("a.parent.example", HOST), ("dest.example", "mx1.pinned.example")],
                (False, True),
                (pub.RECORDS, pub.DEFER, pub.NO_DANE, pub.OFF),
                (None, "absent", "none", "testing", "enforce")):
            choice = e.choose(domain, host, relay if smart else None,
                              facts(domain, dane, mode))
            want = expected(domain, host, smart, dane, mode)
            cell = (domain, host, smart, dane, mode, choice.reason)
            self.assertEqual(choice.source, want, cell)
            req = choice.requirements
            if want == "dane":
                self.assertEqual((req.policy, req.starttls), ("dane", "required"), cell)
                self.assertEqual(req.tlsa, (TLSA,) if dane == pub.RECORDS else (), cell)
                self.assertIn("DANE", choice.reason)
            elif want == "mta-sts":
                self.assertEqual((req.policy, req.verify, req.server_name),
                                 ("mta-sts", True, host), cell)
                self.assertIn("MTA-STS policy of dest.example (mode enforce", choice.reason)
            else:
                self.assertIsNone(req.tlsa, cell)
            if want == "default" and mode == "testing" and not smart:
                self.assertEqual(choice.shadow.policy, "mta-sts", cell)
                self.assertIn("report only", choice.reason)
            elif want == "default":
                self.assertIsNone(choice.shadow, cell)
            if want in ("dane", "mta-sts"):
                self.assertEqual(choice.fallback, "never", cell)
            cells += 1
        self.assertEqual(cells, 4 * 2 * 4 * 5)

    def test_no_facts_is_the_configuration_alone(self) -> None:
        """DANE and MTA-STS off: the policy map as before, the default named as such."""
        e = engine()
        self.assertEqual(e.choose("dest.example", HOST, None).source, "default")
        self.assertEqual(e.choose("explicit.example", HOST, None).source, "config")
