"""
The DNSSEC lookup layer (L{twisted_mta.tls.dnssec}) against a real
validating resolver: Debian's unbound on loopback, with a trust anchor for
C{dane.test.} only, resolving through the private nsd, which serves zones
signed at test time with ldns-signzone (L{tests.interop.dnssec}).  Where
C{tests.tls.test_dnssec} checks our reading of scripted answers, this
checks that a real validator's answers (secure, insecure delegation,
corrupted and expired signatures, authenticated denial, CNAME chains,
Extended DNS Errors, checking disabled) read the same way.
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from tests.interop import dns as nsd_fixture
from tests.interop import dnssec as fixture
from tests.interop.dnssec import TLSA_EE, TLSA_TA, DNSSECWorld, shared_dnssec
from twisted_mta.tls.dnssec import (
    BOGUS, DANE_DEFER, DANE_NONE, DANE_RECORDS, ERROR, INSECURE, NODATA, NXDOMAIN, SECURE,
    DNSSECResolver, addresses_secure, make_resolver, mx_secure, tlsa, tlsa_base_domains,
    validates)


class UnboundBase(SynchronousTestCase):
    ede = True

    def setUp(self) -> None:
        self.world: DNSSECWorld = shared_dnssec(self, "dnssec")
        server = self.world.unbound if self.ede else self.world.resolver("no-ede", ede=False)
        self.server = server
        self.resolver: DNSSECResolver = make_resolver((server.address,), timeout=5.0)

    def lookup(self, name: str, rdtype: str):
        return self.resolver.lookup(name, rdtype)


class SetUpTests(UnboundBase):
    """The fixture: private, validating, anchored at the test zone only."""

    def test_resolver_is_private(self) -> None:
        """Our resolver asks unbound on loopback; unbound asks only the private nsd."""
        self.assertEqual(self.resolver.servers, (self.server.address,))
        self.assertTrue(self.resolver.trusted)
        with open(self.server.conf_path, encoding="utf-8") as f:
            conf = f.read()
        self.assertIn('    name: "."\n', conf)
        self.assertIn(f"    forward-addr: 127.0.0.1@{self.world.nsd.port}\n", conf)
        self.assertIn("    forward-first: no\n", conf)
        self.assertIn("    do-not-query-localhost: no\n", conf)
        self.assertNotIn("root-hints", conf)
        self.assertNotIn("auto-trust-anchor-file", conf)
        self.assertEqual([line for line in conf.splitlines() if "trust-anchor:" in line],
                         [f'    trust-anchor: "{self.world.trust_anchors[0]}"'])
        self.assertTrue(self.world.trust_anchors[0].startswith("dane.test. IN DS "))

    def test_name_outside_the_test_zones(self) -> None:
        """
        A name nsd does not serve fails at once (unbound has nowhere else to
        ask), as an error and not as bogus.
        """
        started = time.monotonic()
        result = self.lookup("example.com", "A")
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual((result.status, result.rcode), (ERROR, "SERVFAIL"))
        self.assertIn("not a validation failure", result.reason)


class SecureTests(UnboundBase):
    def test_mx(self) -> None:
        result = mx_secure(self.resolver, "dane.test")
        self.assertEqual((result.status, result.secure), (SECURE, True))
        self.assertEqual(result.record_texts(), ("10 mx.dane.test.",))

    def test_addresses(self) -> None:
        result = addresses_secure(self.resolver, "mx.dane.test")
        self.assertEqual((result.status, result.secure), (SECURE, True))
        self.assertEqual(result.addresses, ("127.0.0.2", "::1"))
        self.assertFalse(result.aliased)

    def test_tlsa(self) -> None:
        result = tlsa(self.resolver, "mx.dane.test", 25)
        self.assertEqual((result.name, result.status, result.dane),
                         ("_25._tcp.mx.dane.test", SECURE, DANE_RECORDS))
        self.assertEqual(sorted(result.record_texts()), sorted([TLSA_TA, TLSA_EE]))
        self.assertEqual(sorted((r.usage, r.selector, r.mtype) for r in result.records),
                         [(2, 0, 1), (3, 1, 1)])

    def test_no_tlsa_is_a_secure_nxdomain(self) -> None:
        """A host with no TLSA records: authenticated denial, DANE not in use."""
        result = tlsa(self.resolver, "notlsa.dane.test")
        self.assertEqual((result.status, result.secure, result.dane), (NXDOMAIN, True, DANE_NONE))

    def test_tlsa_on_another_port(self) -> None:
        """_465._tcp does not exist under mx.dane.test: a secure NXDOMAIN too."""
        result = tlsa(self.resolver, "mx.dane.test", 465)
        self.assertEqual((result.status, result.secure), (NXDOMAIN, True))

    def test_secure_nodata(self) -> None:
        result = self.lookup("notlsa.dane.test", "AAAA")
        self.assertEqual((result.status, result.secure, result.records), (NODATA, True, ()))
        addresses = addresses_secure(self.resolver, "notlsa.dane.test")
        self.assertEqual((addresses.status, addresses.addresses), (SECURE, ("127.0.0.3",)))

    def test_secure_nxdomain(self) -> None:
        result = self.lookup("nope.dane.test", "MX")
        self.assertEqual((result.status, result.secure), (NXDOMAIN, True))

    def test_secure_cname_chain(self) -> None:
        """RFC 7672 2.2.2: a secure CNAME'd MX host; TLSA under the expanded name first."""
        mx = mx_secure(self.resolver, "cnamemx.dane.test")
        self.assertEqual((mx.status, mx.record_texts()), (SECURE, ("10 alias.dane.test.",)))
        addresses = addresses_secure(self.resolver, "alias.dane.test")
        self.assertEqual((addresses.status, addresses.secure), (SECURE, True))
        self.assertEqual(addresses.canonical_name, "mx.dane.test")
        self.assertEqual(addresses.addresses, ("127.0.0.2", "::1"))
        self.assertEqual(tlsa_base_domains(addresses), ("mx.dane.test", "alias.dane.test"))
        self.assertEqual(tlsa(self.resolver, "mx.dane.test").dane, DANE_RECORDS)
        self.assertEqual(tlsa(self.resolver, "alias.dane.test").dane, DANE_NONE)


class InsecureTests(UnboundBase):
    def test_insecure_delegation(self) -> None:
        """Under a signed parent, a delegation without DS is provably insecure."""
        mx = mx_secure(self.resolver, "insecure.dane.test")
        self.assertEqual((mx.status, mx.secure), (INSECURE, False))
        self.assertEqual(mx.record_texts(), ("10 mx.insecure.dane.test.",))
        addresses = addresses_secure(self.resolver, "mx.insecure.dane.test")
        self.assertEqual((addresses.status, addresses.addresses), (INSECURE, ("127.0.0.6",)))

    def test_insecure_tlsa_is_not_used(self) -> None:
        result = tlsa(self.resolver, "mx.insecure.dane.test")
        self.assertEqual((result.status, result.dane), (INSECURE, DANE_NONE))
        self.assertEqual(result.record_texts(), (TLSA_EE,))

    def test_insecure_nxdomain(self) -> None:
        result = self.lookup("nope.insecure.dane.test", "A")
        self.assertEqual((result.status, result.secure), (NXDOMAIN, False))

    def test_zone_without_anchor(self) -> None:
        result = mx_secure(self.resolver, "unsigned.test")
        self.assertEqual((result.status, result.secure), (INSECURE, False))

    def test_cname_into_insecure_zone(self) -> None:
        """A secure CNAME to an insecure name: the answer as a whole is insecure."""
        addresses = addresses_secure(self.resolver, "to-insecure.dane.test")
        self.assertEqual((addresses.status, addresses.canonical_name),
                         (INSECURE, "mx.insecure.dane.test"))
        self.assertEqual(tlsa_base_domains(addresses), ("to-insecure.dane.test",))

    def test_insecure_cname_to_secure_name(self) -> None:
        """An insecure CNAME to a signed name: insecure too (the alias could be forged)."""
        result = self.lookup("back.insecure.dane.test", "A")
        self.assertEqual((result.status, result.canonical_name), (INSECURE, "mx.dane.test"))


class BogusTests(UnboundBase):
    """unbound with Extended DNS Errors (ede: yes): bogus known from the EDE."""

    def assertBogus(self, result, code: int) -> None:
        self.assertEqual((result.status, result.secure, result.rcode, result.records),
                         (BOGUS, False, "SERVFAIL", ()), result.describe())
        self.assertIn(code, [c for c, _ in result.ede], result.describe())

    def test_corrupted_signature(self) -> None:
        self.assertBogus(self.lookup("badsig.dane.test", "A"), 6)
        self.assertBogus(mx_secure(self.resolver, "badmx.dane.test"), 6)
        self.assertEqual(addresses_secure(self.resolver, "badsig.dane.test").status, BOGUS)

    def test_bogus_tlsa_defers(self) -> None:
        """The host's address is fine, its TLSA RRset is bogus: the delivery must wait."""
        self.assertEqual(addresses_secure(self.resolver, "badtlsa.dane.test").status, SECURE)
        result = tlsa(self.resolver, "badtlsa.dane.test")
        self.assertBogus(result, 6)
        self.assertEqual(result.dane, DANE_DEFER)

    def test_expired_signatures(self) -> None:
        result = mx_secure(self.resolver, "expired.dane.test")
        self.assertBogus(result, 7)
        self.assertIn("Signature Expired", result.reason)
        self.assertEqual(self.lookup("mx.expired.dane.test", "A").status, BOGUS)


class NoEDETests(BogusTests):
    """
    unbound without Extended DNS Errors (ede: no): bogus known because the
    answer comes with checking disabled.
    """

    ede = False

    def assertBogus(self, result, code: int) -> None:
        self.assertEqual((result.status, result.secure, result.rcode, result.ede),
                         (BOGUS, False, "SERVFAIL", ()), result.describe())
        self.assertIn("with checking disabled", result.reason)

    def test_expired_signatures(self) -> None:
        result = mx_secure(self.resolver, "expired.dane.test")
        self.assertBogus(result, 7)
        self.assertEqual(self.lookup("mx.expired.dane.test", "A").status, BOGUS)

    def test_validates(self) -> None:
        self.assertTrue(validates(self.resolver, "dane.test", "badsig.dane.test"))


class ValidatesTests(UnboundBase):
    def test_unbound_validates(self) -> None:
        result = validates(self.resolver, "dane.test", "badsig.dane.test")
        self.assertTrue(result, result.reason)
        self.assertIn("validates", result.reason)

    def test_expired_name_as_the_bogus_one(self) -> None:
        self.assertTrue(validates(self.resolver, "mx.dane.test", "expired.dane.test", "MX"))

    def test_plain_nsd_does_not(self) -> None:
        """nsd answers with the signatures but sets no AD: no validation."""
        nsd = make_resolver((self.world.nsd.address,), timeout=5.0)
        self.assertTrue(nsd.trusted)  # on loopback: AD would be believed, had it been set
        result = validates(nsd, "dane.test", "badsig.dane.test")
        self.assertFalse(result)
        self.assertIn("without the AD bit", result.reason)
        bogus = nsd.lookup("badsig.dane.test", "A")
        self.assertEqual((bogus.status, bogus.secure), (INSECURE, False))

    def test_wrong_names(self) -> None:
        """A 'bogus' name that is fine, or a 'secure' one that is not, fails the check."""
        fine = validates(self.resolver, "dane.test", "mx.dane.test")
        self.assertFalse(fine)
        self.assertIn("came back secure, not SERVFAIL", fine.reason)
        unsigned = validates(self.resolver, "unsigned.test", "badsig.dane.test", "MX")
        self.assertFalse(unsigned)
        self.assertIn("without the AD bit", unsigned.reason)

    def test_untrusted_unbound(self) -> None:
        """The same validating unbound, not trusted: its AD bit is not believed."""
        resolver = DNSSECResolver((self.server.address,), timeout=5.0, trust_loopback=False)
        self.assertEqual(mx_secure(resolver, "dane.test").status, INSECURE)
        self.assertEqual(resolver.lookup("badsig.dane.test", "A").status, ERROR)
        self.assertFalse(validates(resolver, "dane.test", "badsig.dane.test"))


class RequireTests(SynchronousTestCase):
    """
    require_unbound: a missing unbound, ldns-keygen, ldns-signzone or nsd
    skips the DNSSEC tests outside CI and fails them under CI=true.
    """

    def set_ci(self, value: str | None) -> None:
        old = os.environ.get("CI")
        self.addCleanup(lambda: os.environ.__setitem__("CI", old) if old is not None
                        else os.environ.pop("CI", None))
        if value is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = value

    def test_missing_program(self) -> None:
        for name in ("UNBOUND", "LDNS_KEYGEN", "LDNS_SIGNZONE"):
            self.patch(fixture, "UNBOUND", "/usr/sbin/unbound")
            self.patch(fixture, "LDNS_KEYGEN", "/usr/bin/ldns-keygen")
            self.patch(fixture, "LDNS_SIGNZONE", "/usr/bin/ldns-signzone")
            self.patch(nsd_fixture, "NSD", "/usr/sbin/nsd")
            self.patch(fixture, name, None)
            self.set_ci(None)
            e = self.assertRaises(SkipTest, fixture.require_unbound)
            self.assertIn("run scripts/install-test-deps", str(e))
            self.set_ci("true")
            self.assertRaises(FailTest, fixture.require_unbound)

    def test_missing_nsd(self) -> None:
        self.patch(nsd_fixture, "NSD", None)
        self.set_ci("true")
        self.assertRaises(FailTest, fixture.require_unbound)

    def test_present(self) -> None:
        for name, path in (("UNBOUND", "/usr/sbin/unbound"),
                           ("LDNS_KEYGEN", "/usr/bin/ldns-keygen"),
                           ("LDNS_SIGNZONE", "/usr/bin/ldns-signzone")):
            self.patch(fixture, name, path)
        self.patch(nsd_fixture, "NSD", "/usr/sbin/nsd")
        self.set_ci("true")
        self.assertIsNone(fixture.require_unbound())
