"""
REQUIRETLS's first step against a real validating resolver (the private
unbound over nsd with zones signed at test time, L{tests.interop.dnssec}):
an MX answer that is DNSSEC-secure validates the MX host; one from an
unsigned zone does not, and without an MTA-STS policy the host is refused
before any connection (5.7.30), while ordinary mail to it is planned as
usual.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dnssec import shared_dnssec
from tests.support import make_config
from twisted_mta.outbound.attempt import Attempt, AttemptContext
from twisted_mta.outbound.router import NextHop
from twisted_mta.tls import published as pub
from twisted_mta.tls.dnssec import make_resolver
from twisted_mta.tls.engine import Registry, TLSEngine


def blocking(f, *args):
    """run_blocking for a synchronous test: the call, at once."""
    return defer.maybeDeferred(f, *args)


class MXValidationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = shared_dnssec(self, "dnssec")
        config = make_config(self.mktemp())
        published = pub.Published(
            run_blocking=blocking,
            dane_resolver=make_resolver((self.world.unbound.address,), timeout=5.0),
            check_names=("mx.dane.test", "badsig.dane.test"))
        self.successResultOf(published.start())
        self.ctx = AttemptContext(
            settings=config.outbound, hostname="out.example.test", clock=Clock(),
            run_blocking=blocking, resolver=None, connect=None,
            tls=TLSEngine(config.outbound.tls, registry=Registry()), published=published)

    def plans(self, domain: str, requiretls: bool):
        attempt = Attempt(self.ctx, NextHop(domain, requiretls=requiretls))
        records, port, mx_facts, sts = self.successResultOf(attempt.hosts())
        return [self.successResultOf(attempt.plan_host(r, port, mx_facts, sts))
                for r in records]

    def test_signed_mx_validates(self) -> None:
        """dane.test's signed MX: mx.dane.test is usable for REQUIRETLS, its policy raised to verified TLS (DANE keeps authenticating by its TLSA records)."""
        (plan,) = self.plans("dane.test", requiretls=True)
        self.assertIsNone(plan.error)
        self.assertIsNone(plan.failure)
        self.assertEqual(plan.choice.requirements.starttls, "required")
        self.assertIsNotNone(plan.choice.requirements.tlsa)
        self.assertIn("raised by REQUIRETLS", plan.choice.reason)

    def test_unsigned_mx_is_refused(self) -> None:
        """unsigned.test: its MX answer is not DNSSEC-signed and MTA-STS is off: 5.7.30, in words; ordinary mail is planned as usual."""
        (plan,) = self.plans("unsigned.test", requiretls=True)
        self.assertEqual((plan.error.code, plan.error.enhanced, plan.error.kind),
                         (554, "5.7.30", "requiretls-mx-unvalidated"))
        self.assertIn("the MX answer of unsigned.test is not DNSSEC-signed, and MTA-STS is off",
                      plan.error.text)
        (plain,) = self.plans("unsigned.test", requiretls=False)
        self.assertIsNone(plain.error)
        self.assertEqual(plain.addresses, ("127.0.0.8",))
