"""
What delivery learns about a destination's DANE, against a real validating
resolver (the private unbound over nsd with zones signed at test time,
L{tests.interop.dnssec}): the start-up check that turns DANE on or off,
and per MX host the facts the policy engine weighs (L{Published.host}),
with the DNSSEC-aware MX answer read by the MX rules
(L{twisted_mta.outbound.mx.from_dnssec}).
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dnssec import TLSA_EE, TLSA_TA, shared_dnssec
from twisted_mta.outbound import mx
from twisted_mta.tls import published as pub
from twisted_mta.tls.dnssec import make_resolver


def blocking(f, *args):
    """run_blocking for a synchronous test: the call, at once."""
    return defer.maybeDeferred(f, *args)


class PublishedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.world = shared_dnssec(self, "dnssec")
        self.published = pub.Published(
            run_blocking=blocking,
            dane_resolver=make_resolver((self.world.unbound.address,), timeout=5.0),
            check_names=("mx.dane.test", "badsig.dane.test"))

    def facts(self, domain: str, port: int = 25) -> list[pub.Host]:
        self.assertTrue(self.successResultOf(self.published.dane_enabled()))
        answer = self.successResultOf(self.published.mx(domain))
        hosts = mx.from_dnssec(answer.result, domain)
        return [self.successResultOf(self.published.host(h.name, port, answer)) for h in hosts]

    def test_start_up_check_turns_dane_on(self) -> None:
        state = self.successResultOf(self.published.start())
        self.assertTrue(state.enabled)
        self.assertIn("validates", state.reason)

    def test_a_resolver_that_does_not_validate_leaves_dane_off(self) -> None:
        """nsd itself answers without validating: DANE stays off, with the reason."""
        plain = pub.Published(run_blocking=blocking,
                              dane_resolver=make_resolver((self.world.nsd.address,), 5.0),
                              check_names=("mx.dane.test", "badsig.dane.test"))
        self.assertFalse(self.successResultOf(plain.dane_enabled()))
        self.assertIn("does not validate", plain.dane_state.reason)

    def test_secure_tlsa_records(self) -> None:
        (host,) = self.facts("dane.test")
        self.assertEqual((host.host, host.dane), ("mx.dane.test", pub.RECORDS))
        self.assertEqual(sorted(r.to_text() for r in host.records), sorted([TLSA_EE, TLSA_TA]))
        self.assertEqual(host.names, ("mx.dane.test",))
        self.assertEqual(host.addresses.addresses, ("127.0.0.2", "::1"))

    def test_cname_mx_checks_both_names(self) -> None:
        """RFC 7672 2.2.2: the TLSA records of the CNAME-expanded name, and both names for DANE-TA."""
        (host,) = self.facts("cnamemx.dane.test")
        self.assertEqual((host.host, host.dane), ("alias.dane.test", pub.RECORDS))
        self.assertEqual(host.tlsa_name, "_25._tcp.mx.dane.test")
        self.assertEqual(host.names, ("mx.dane.test", "alias.dane.test"))

    def test_unsigned_zone_has_no_dane(self) -> None:
        (host,) = self.facts("unsigned.test")
        self.assertEqual(host.dane, pub.NO_DANE)
        self.assertIn("not DNSSEC-signed", host.why)
        self.assertEqual(host.addresses.addresses, ("127.0.0.8",))

    def test_insecure_tlsa_is_not_used(self) -> None:
        (host,) = self.facts("insecure.dane.test")
        self.assertEqual(host.dane, pub.NO_DANE)
        self.assertEqual(host.records, ())

    def test_bogus_mx_is_a_temporary_failure(self) -> None:
        answer = self.successResultOf(self.published.mx("badmx.dane.test"))
        error = self.assertRaises(mx.MXError, mx.from_dnssec, answer.result, "badmx.dane.test")
        self.assertEqual(error.outcome.kind, "dns-temp")
        self.assertIn("DNSSEC", error.outcome.text)
        self.assertFalse(error.outcome.is_permanent)

    def test_expired_signatures_defer(self) -> None:
        answer = self.successResultOf(self.published.mx("expired.dane.test"))
        self.assertRaises(mx.MXError, mx.from_dnssec, answer.result, "expired.dane.test")

    def test_bogus_tlsa_defers(self) -> None:
        """A TLSA RRset that fails validation: wait (RFC 7672 2.2), as dnssec-bogus."""
        secure_mx = self.successResultOf(self.published.mx("dane.test"))
        host = self.successResultOf(self.published.host("badtlsa.dane.test", 25, secure_mx))
        self.assertEqual((host.dane, host.failure_kind), (pub.DEFER, "dnssec-bogus"))

    def test_bogus_address_defers(self) -> None:
        secure_mx = self.successResultOf(self.published.mx("dane.test"))
        host = self.successResultOf(self.published.host("badsig.dane.test", 25, secure_mx))
        self.assertEqual((host.dane, host.failure_kind), (pub.DEFER, "dnssec-bogus"))
        self.assertEqual(host.addresses.addresses, ())

    def test_no_tlsa_under_a_secure_mx(self) -> None:
        secure_mx = self.successResultOf(self.published.mx("dane.test"))
        host = self.successResultOf(self.published.host("notlsa.dane.test", 25, secure_mx))
        self.assertEqual(host.dane, pub.NO_DANE)
        self.assertIn("securely denied", host.why)
