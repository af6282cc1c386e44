"""
Tests for MX resolution against a real DNS server on loopback.
"""

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.outbound.mx import MXError, MXHost, lookup_addresses, lookup_mx, make_resolver
from tests.outbound.dns_server import ZoneServer

ZONE = """
$TTL 300
@           SOA ns.test. hostmaster.test. 1 3600 600 86400 300
@           NS  ns.test.
ns          A   127.0.0.1
multi       MX  20 c.multi.test.
multi       MX  10 a.multi.test.
multi       MX  10 b.multi.test.
a.multi     A   127.0.0.11
b.multi     A   127.0.0.12
b.multi     AAAA ::1
c.multi     A   127.0.0.13
implicit    A   127.0.0.20
nullmx      MX  0 .
"""


class MXTests(SynchronousTestCase):
    def setUp(self):
        self.server = ZoneServer("test.", ZONE, servfail=("broken.test.",))
        self.addCleanup(self.server.stop)
        self.resolver = make_resolver((f"127.0.0.1:{self.server.port}",), timeout=2.0)

    def test_resolver_never_reads_system_config(self):
        """With nameservers configured the resolver asks only them."""
        self.assertEqual(self.resolver.nameservers, ["127.0.0.1"])
        self.assertEqual(self.resolver.port, self.server.port)

    def test_sorted_by_preference_equal_ones_shuffled(self):
        """MX hosts come most preferred first; equal preferences are shuffled."""
        def by_name_descending(group):
            group.sort(key=lambda h: h.name, reverse=True)

        hosts = lookup_mx(self.resolver, "multi.test", shuffle=by_name_descending)
        self.assertEqual(hosts, [MXHost(10, "b.multi.test"), MXHost(10, "a.multi.test"),
                                 MXHost(20, "c.multi.test")])
        seen = {tuple(h.name for h in lookup_mx(self.resolver, "multi.test")[:2])
                for _ in range(30)}
        self.assertEqual(seen, {("a.multi.test", "b.multi.test"), ("b.multi.test", "a.multi.test")})

    def test_implicit_mx(self):
        """A domain without MX but with an address is its own mail exchanger."""
        self.assertEqual(lookup_mx(self.resolver, "implicit.test"), [MXHost(0, "implicit.test")])

    def test_null_mx(self):
        """A null MX is a permanent 556 5.1.10."""
        with self.assertRaises(MXError) as cm:
            lookup_mx(self.resolver, "nullmx.test")
        self.assertEqual((cm.exception.outcome.code, cm.exception.outcome.enhanced), (556, "5.1.10"))

    def test_nxdomain(self):
        """A domain that does not exist is a permanent 550 5.1.2."""
        with self.assertRaises(MXError) as cm:
            lookup_mx(self.resolver, "nowhere.test")
        self.assertEqual((cm.exception.outcome.code, cm.exception.outcome.enhanced), (550, "5.1.2"))

    def test_servfail_is_temporary(self):
        """SERVFAIL is a temporary 451 4.4.3."""
        with self.assertRaises(MXError) as cm:
            lookup_mx(self.resolver, "broken.test")
        self.assertEqual((cm.exception.outcome.code, cm.exception.outcome.enhanced), (451, "4.4.3"))

    def test_timeout_is_temporary(self):
        """A server that does not answer gives a temporary failure, not a hang."""
        import socket
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        resolver = make_resolver((f"127.0.0.1:{silent.getsockname()[1]}",), timeout=0.5)
        with self.assertRaises(MXError) as cm:
            lookup_mx(resolver, "multi.test")
        self.assertEqual(cm.exception.outcome.enhanced, "4.4.3")

    def test_addresses_v4_and_v6(self):
        """Both IPv4 and IPv6 addresses of a host are returned, IPv4 first."""
        self.assertEqual(lookup_addresses(self.resolver, "b.multi.test"), ["127.0.0.12", "::1"])
        self.assertEqual(lookup_addresses(self.resolver, "nothing.multi.test"), [])
