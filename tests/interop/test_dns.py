"""
MX resolution against a real authoritative server: Debian's nsd on
loopback, queried through the resolver the outbound queue uses.  Where
C{tests.outbound.test_mx} checks our reading of answers from a scripted
server, this checks that real-world answers (authority sections, glue,
NXDOMAIN vs NODATA, REFUSED, truncation) are read the same way.
"""

from __future__ import annotations

import dns.flags
import dns.message
import dns.query
from twisted.trial import unittest

from tests.interop.dns import NSDServer, shared_nsd, zone
from twisted_mta.outbound.mx import MXError, MXHost, lookup_addresses, lookup_mx, make_resolver

BIG_MX_COUNT = 40  # too many for one UDP answer: the resolver must retry over TCP

ZONES = {
    "good.test": zone("good.test", [
        ("@", "MX", "20 mx2.good.test."),
        ("@", "MX", "10 mx1.good.test."),
        ("@", "MX", "10 mx1b.good.test."),
        ("@", "MX", "30 mail.other.test."),
        ("mx1", "A", "127.0.0.2"),
        ("mx1", "AAAA", "::1"),
        ("mx1b", "A", "127.0.0.4"),
        ("mx2", "A", "127.0.0.3"),
        ("noaddr", "TXT", '"a name with no address"'),
    ]),
    "implicit.test": zone("implicit.test", [("@", "A", "127.0.0.5")]),
    "nullmx.test": zone("nullmx.test", [
        ("@", "MX", "0 ."),
        ("@", "A", "127.0.0.6"),  # the null MX wins over the implicit one
    ]),
    "big.test": zone("big.test", [
        ("@", "MX", f"{n} mx-{n:02d}-with-a-fairly-long-label-to-fill-the-packet.big.test.")
        for n in range(BIG_MX_COUNT)
    ]),
}


class NSDMXTests(unittest.SynchronousTestCase):
    """
    L{lookup_mx} and L{lookup_addresses} against one nsd shared by the
    class (started by the first test, stopped when trial exits).
    """

    def setUp(self) -> None:
        self.server: NSDServer = shared_nsd(self, "mx", ZONES)
        self.resolver = make_resolver((self.server.address,), timeout=5.0)

    def assertOutcome(self, domain: str, code: int, enhanced: str) -> None:
        with self.assertRaises(MXError) as cm:
            lookup_mx(self.resolver, domain)
        outcome = cm.exception.outcome
        self.assertEqual((outcome.code, outcome.enhanced), (code, enhanced), str(outcome))

    def test_resolver_asks_only_the_private_server(self) -> None:
        """The resolver is pinned to nsd's loopback port, never the system's."""
        self.assertEqual(self.resolver.nameservers, ["127.0.0.1"])
        self.assertEqual(self.resolver.port, self.server.port)

    def test_mx_sorted_by_preference(self) -> None:
        """MX hosts come most preferred first whatever order the server sends them in."""
        def by_name(group: list) -> None:
            group.sort(key=lambda h: h.name)

        self.assertEqual(lookup_mx(self.resolver, "good.test", shuffle=by_name), [
            MXHost(10, "mx1.good.test"), MXHost(10, "mx1b.good.test"),
            MXHost(20, "mx2.good.test"), MXHost(30, "mail.other.test"),
        ])

    def test_mx_name_is_case_insensitive(self) -> None:
        """A mixed-case domain finds the same exchangers, reported in lower case."""
        hosts = lookup_mx(self.resolver, "GOOD.Test.", shuffle=lambda group: None)
        self.assertEqual([h.preference for h in hosts], [10, 10, 20, 30])
        self.assertEqual({h.name for h in hosts},
                         {"mx1.good.test", "mx1b.good.test", "mx2.good.test", "mail.other.test"})

    def test_implicit_mx(self) -> None:
        """A domain with an address but no MX (NODATA) is its own mail exchanger."""
        self.assertEqual(lookup_mx(self.resolver, "implicit.test"), [MXHost(0, "implicit.test")])

    def test_null_mx(self) -> None:
        """A null MX is a permanent 556 5.1.10, even when the domain has an address."""
        self.assertOutcome("nullmx.test", 556, "5.1.10")

    def test_nxdomain(self) -> None:
        """A name that does not exist in the zone is a permanent 550 5.1.2."""
        self.assertOutcome("missing.good.test", 550, "5.1.2")

    def test_refused_is_temporary(self) -> None:
        """A name outside every zone nsd serves is REFUSED: temporary 451 4.4.3, not a bounce."""
        self.assertOutcome("elsewhere.example", 451, "4.4.3")

    def test_truncated_answer_retried_over_tcp(self) -> None:
        """An MX set too big for UDP is fetched whole over TCP."""
        query = dns.message.make_query("big.test", "MX")
        udp = dns.query.udp(query, "127.0.0.1", port=self.server.port, timeout=5.0)
        self.assertTrue(udp.flags & dns.flags.TC, "the UDP answer should be truncated")
        hosts = lookup_mx(self.resolver, "big.test")
        self.assertEqual([h.preference for h in hosts], list(range(BIG_MX_COUNT)))

    def test_addresses_v4_and_v6(self) -> None:
        """Both the A and AAAA records of a host are returned, IPv4 first."""
        self.assertEqual(lookup_addresses(self.resolver, "mx1.good.test"), ["127.0.0.2", "::1"])
        self.assertEqual(lookup_addresses(self.resolver, "mx2.good.test"), ["127.0.0.3"])

    def test_no_addresses(self) -> None:
        """A host with no address records, or that does not exist, has no addresses."""
        self.assertEqual(lookup_addresses(self.resolver, "noaddr.good.test"), [])
        self.assertEqual(lookup_addresses(self.resolver, "missing.good.test"), [])
