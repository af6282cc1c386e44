"""
The DNSSEC lookup layer against a scripted DNS server on loopback (real
packets, dnspython on both ends): how the AD bit, SERVFAIL, Extended DNS
Errors and the checking-disabled retry become a status, which resolvers'
AD bits are believed, CNAME chains, and the start-up check.  The real
validating resolver (unbound) is in C{tests.interop.test_dnssec}.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tls import dnssec
from twisted_mta.tls.dnssec import (
    BOGUS, DANE_DEFER, DANE_NONE, DANE_RECORDS, ERROR, INSECURE, NODATA, NXDOMAIN, SECURE,
    DNSSECResolver, addresses_secure, is_trusted, mx_secure, tlsa, tlsa_base_domains,
    validates)


@dataclass
class Reply:
    """
    What the scripted server says: C{rcode}, the AD bit, answer records as
    C{(owner, type, rdata)}, Extended DNS Errors, and (C{cd}) another
    reply for the same question asked with checking disabled.
    """

    rcode: int = dns.rcode.NOERROR
    ad: bool = False
    answer: list = field(default_factory=list)
    ede: list = field(default_factory=list)
    cd: "Reply | None" = None


class ScriptedServer:
    """
    A UDP DNS server on 127.0.0.1 answering each C{(name, type)} from
    C{script}; anything else gets REFUSED; C{silent} names get no answer.
    C{queries} keeps every query message it received.
    """

    def __init__(self, script: dict, silent: tuple[str, ...] = ()) -> None:
        self.script = {(dns.name.from_text(n), dns.rdatatype.from_text(t)): r
                       for (n, t), r in script.items()}
        self.silent = {dns.name.from_text(n) for n in silent}
        self.queries: list[dns.message.Message] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(1.0)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as wake:  # end the recvfrom now
            wake.sendto(b"", self.sock.getsockname())
        self._thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                continue
            if self._stop.is_set():
                break
            query = dns.message.from_wire(data)
            self.queries.append(query)
            response = self._answer(query)
            if response is not None:
                self.sock.sendto(response.to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        if question.name in self.silent:
            return None
        response = dns.message.make_response(query)
        reply = self.script.get((question.name, question.rdtype))
        if reply is not None and query.flags & dns.flags.CD and reply.cd is not None:
            reply = reply.cd
        if reply is None:
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.set_rcode(reply.rcode)
        if reply.ad:
            response.flags |= dns.flags.AD
        for owner, rdtype, rdata in reply.answer:
            response.answer.append(dns.rrset.from_text(owner, 300, "IN", rdtype, rdata))
        if reply.ede:
            response.use_edns(0, query.ednsflags, 1232,
                              options=[dns.edns.EDEOption(code, text) for code, text in reply.ede])
        return response


MX = ("example.org.", "MX", "10 mx.example.org.")
A = ("mx.example.org.", "A", "192.0.2.25")
TLSA = ("_25._tcp.mx.example.org.", "TLSA", "3 1 1 " + "ab" * 32)


class Base(SynchronousTestCase):
    def serve(self, script: dict, silent: tuple[str, ...] = ()) -> ScriptedServer:
        server = ScriptedServer(script, silent)
        self.addCleanup(server.stop)
        return server

    def resolver(self, server: ScriptedServer, **kw) -> DNSSECResolver:
        return DNSSECResolver([server.address], timeout=kw.pop("timeout", 2.0), **kw)


class QueryTests(Base):
    def test_query_asks_for_dnssec(self):
        """Every query has EDNS0 with the DO bit, a 1232-octet payload, RD and AD."""
        server = self.serve({("example.org", "MX"): Reply(ad=True, answer=[MX])})
        mx_secure(self.resolver(server), "example.org")
        [query] = server.queries
        self.assertEqual(query.edns, 0)
        self.assertTrue(query.ednsflags & dns.flags.DO)
        self.assertEqual(query.payload, 1232)
        self.assertTrue(query.flags & dns.flags.RD)
        self.assertTrue(query.flags & dns.flags.AD)
        self.assertFalse(query.flags & dns.flags.CD)

    def test_needs_a_nameserver(self):
        self.assertRaises(ValueError, DNSSECResolver, [])

    def test_nameservers_with_ports(self):
        r = DNSSECResolver(["127.0.0.1:5353", "::1", "[::1]:5300"])
        self.assertEqual(r.servers, ("127.0.0.1:5353", "[::1]:53", "[::1]:5300"))
        self.assertEqual([(ns.address, ns.port) for ns in r.resolver.nameservers],
                         [("127.0.0.1", 5353), ("::1", 53), ("::1", 5300)])
        self.assertTrue(r.trusted)


class TrustTests(Base):
    def test_is_trusted(self):
        """Loopback is trusted, other addresses only when listed; ports do not matter."""
        self.assertTrue(is_trusted("127.0.0.1"))
        self.assertTrue(is_trusted("127.0.0.53:53"))
        self.assertTrue(is_trusted("::1"))
        self.assertTrue(is_trusted("[::1]:5353"))
        self.assertTrue(is_trusted("::ffff:127.0.0.1"))
        self.assertFalse(is_trusted("192.0.2.53"))
        self.assertFalse(is_trusted("192.0.2.53:53", ["192.0.2.54"]))
        self.assertTrue(is_trusted("192.0.2.53:53", ["192.0.2.54", "192.0.2.53"]))
        self.assertTrue(is_trusted("2001:db8::53", ["2001:DB8:0::53"]))
        self.assertFalse(is_trusted("127.0.0.1", trust_loopback=False))
        self.assertTrue(is_trusted("127.0.0.1", ["127.0.0.1"], trust_loopback=False))
        self.assertFalse(is_trusted("not-an-address"))

    def test_one_untrusted_server_untrusts_all(self):
        """
        The stub asks whichever server answers, so the AD bit is believed
        only when every configured server is trusted.  (No query is sent.)
        """
        r = DNSSECResolver(["127.0.0.1", "192.0.2.53", "198.51.100.53:5353"],
                           trusted=["198.51.100.53"])
        self.assertFalse(r.trusted)
        self.assertEqual(r.untrusted, ("192.0.2.53:53",))

    def test_ad_from_trusted_server_is_secure(self):
        server = self.serve({("example.org", "MX"): Reply(ad=True, answer=[MX])})
        result = mx_secure(self.resolver(server), "Example.ORG.")
        self.assertEqual((result.status, result.secure), (SECURE, True))
        self.assertEqual(result.name, "example.org")
        self.assertEqual([t.lower() for t in result.record_texts()], ["10 mx.example.org."])
        self.assertEqual(result.rcode, "NOERROR")
        self.assertEqual(result.reason, "")

    def test_no_ad_is_insecure(self):
        server = self.serve({("example.org", "MX"): Reply(answer=[MX])})
        result = mx_secure(self.resolver(server), "example.org")
        self.assertEqual((result.status, result.secure), (INSECURE, False))
        self.assertEqual(result.record_texts(), ("10 mx.example.org.",))

    def test_ad_from_untrusted_server_ignored(self):
        """
        AD from a resolver that is neither on loopback nor listed is not
        believed (here: loopback not trusted, standing for a remote
        resolver).
        """
        server = self.serve({("example.org", "MX"): Reply(ad=True, answer=[MX])})
        result = mx_secure(self.resolver(server, trust_loopback=False), "example.org")
        self.assertEqual((result.status, result.secure), (INSECURE, False))
        self.assertIn("AD bit ignored", result.reason)
        self.assertIn(server.address, result.reason)

    def test_ad_from_listed_server_believed(self):
        server = self.serve({("example.org", "MX"): Reply(ad=True, answer=[MX])})
        r = self.resolver(server, trust_loopback=False, trusted=["127.0.0.1"])
        self.assertEqual(mx_secure(r, "example.org").status, SECURE)

    def test_secure_denial_from_untrusted_server_is_not_secure(self):
        server = self.serve({("example.org", "TLSA"): Reply(rcode=dns.rcode.NXDOMAIN, ad=True)})
        result = self.resolver(server, trust_loopback=False).lookup("example.org", "TLSA")
        self.assertEqual((result.status, result.secure), (NXDOMAIN, False))
        self.assertEqual(result.dane, DANE_NONE)


class NegativeTests(Base):
    def test_nxdomain(self):
        server = self.serve({("nope.example.org", "A"): Reply(rcode=dns.rcode.NXDOMAIN, ad=True),
                             ("gone.example.org", "A"): Reply(rcode=dns.rcode.NXDOMAIN)})
        r = self.resolver(server)
        secure = r.lookup("nope.example.org", "A")
        self.assertEqual((secure.status, secure.secure, secure.records), (NXDOMAIN, True, ()))
        self.assertTrue(secure.secure_denial)
        self.assertEqual(secure.rcode, "NXDOMAIN")
        insecure = r.lookup("gone.example.org", "A")
        self.assertEqual((insecure.status, insecure.secure), (NXDOMAIN, False))
        self.assertFalse(insecure.secure_denial)

    def test_nodata(self):
        server = self.serve({("mx.example.org", "AAAA"): Reply(ad=True),
                             ("other.example.org", "AAAA"): Reply()})
        r = self.resolver(server)
        self.assertEqual((r.lookup("mx.example.org", "AAAA").status,
                          r.lookup("mx.example.org", "AAAA").secure), (NODATA, True))
        self.assertEqual((r.lookup("other.example.org", "AAAA").status,
                          r.lookup("other.example.org", "AAAA").secure), (NODATA, False))

    def test_refused_is_error(self):
        server = self.serve({})
        result = self.resolver(server).lookup("example.org", "MX")
        self.assertEqual((result.status, result.secure), (ERROR, False))
        self.assertIn(f"{server.address} answered REFUSED", result.reason)

    def test_timeout_is_error(self):
        server = self.serve({}, silent=("slow.example.org",))
        result = self.resolver(server, timeout=0.3).lookup("slow.example.org", "MX")
        self.assertEqual(result.status, ERROR)
        self.assertIn("no answer from", result.reason)
        self.assertIsNone(result.rcode)

    def test_bad_name_is_error(self):
        server = self.serve({})
        result = self.resolver(server).lookup("a..b", "A")
        self.assertEqual(result.status, ERROR)
        self.assertIn("not a valid name", result.reason)
        self.assertEqual(server.queries, [])


class ServfailTests(Base):
    """
    SERVFAIL: bogus when an EDE says validation failed, or when the answer
    comes with checking disabled; an error otherwise.
    """

    def lookup(self, reply: Reply, **kw):
        server = self.serve({("host.example.org", "A"): reply})
        result = self.resolver(server, **kw).lookup("host.example.org", "A")
        return server, result

    def cd_queries(self, server: ScriptedServer) -> list:
        return [q for q in server.queries if q.flags & dns.flags.CD]

    def test_ede_dnssec_bogus(self):
        server, result = self.lookup(Reply(rcode=dns.rcode.SERVFAIL,
                                           ede=[(6, "signature crypto failed")]))
        self.assertEqual((result.status, result.secure, result.rcode), (BOGUS, False, "SERVFAIL"))
        self.assertEqual(result.ede, ((6, "signature crypto failed"),))
        self.assertIn("EDE 6 (DNSSEC Bogus): signature crypto failed", result.reason)
        self.assertEqual(self.cd_queries(server), [])  # the EDE was enough

    def test_ede_signature_expired(self):
        _, result = self.lookup(Reply(rcode=dns.rcode.SERVFAIL, ede=[(7, "")]))
        self.assertEqual(result.status, BOGUS)
        self.assertIn("EDE 7 (Signature Expired)", result.reason)

    def test_ede_other_cause_is_error(self):
        server, result = self.lookup(Reply(rcode=dns.rcode.SERVFAIL,
                                           ede=[(22, "no server reachable")]))
        self.assertEqual(result.status, ERROR)
        self.assertIn("EDE 22 (No Reachable Authority): no server reachable", result.reason)
        self.assertEqual(self.cd_queries(server), [])

    def test_no_ede_answer_with_cd_is_bogus(self):
        server, result = self.lookup(Reply(rcode=dns.rcode.SERVFAIL,
                                           cd=Reply(answer=[("host.example.org.", "A",
                                                             "192.0.2.1")])))
        self.assertEqual(result.status, BOGUS)
        self.assertIn("SERVFAIL, but NOERROR with checking disabled", result.reason)
        [cd] = self.cd_queries(server)
        self.assertTrue(cd.ednsflags & dns.flags.DO)
        self.assertEqual(result.records, ())  # the unvalidated data is not passed on

    def test_no_ede_nxdomain_with_cd_is_bogus(self):
        _, result = self.lookup(Reply(rcode=dns.rcode.SERVFAIL,
                                      cd=Reply(rcode=dns.rcode.NXDOMAIN)))
        self.assertEqual(result.status, BOGUS)
        self.assertIn("NXDOMAIN with checking disabled", result.reason)

    def test_no_ede_servfail_with_cd_is_error(self):
        _, result = self.lookup(Reply(rcode=dns.rcode.SERVFAIL))
        self.assertEqual(result.status, ERROR)
        self.assertIn("SERVFAIL with checking disabled (not a validation failure)", result.reason)

    def test_ambiguous_ede_asks_with_cd(self):
        server, result = self.lookup(Reply(
            rcode=dns.rcode.SERVFAIL, ede=[(13, "")],
            cd=Reply(answer=[("host.example.org.", "A", "192.0.2.1")])))
        self.assertEqual(result.status, BOGUS)
        self.assertEqual(len(self.cd_queries(server)), 1)

    def test_servfail_from_untrusted_server_is_error(self):
        """Without a trusted validating resolver, SERVFAIL proves nothing about DNSSEC."""
        server, result = self.lookup(Reply(rcode=dns.rcode.SERVFAIL, ede=[(6, "")]),
                                     trust_loopback=False)
        self.assertEqual(result.status, ERROR)
        self.assertIn("not a trusted validating resolver", result.reason)
        self.assertEqual(self.cd_queries(server), [])

    def test_two_servers_one_bogus(self):
        """When every server fails, a bogus verdict from one of them wins."""
        plain = self.serve({})
        validating = self.serve({("host.example.org", "A"): Reply(
            rcode=dns.rcode.SERVFAIL, ede=[(6, "")])})
        r = DNSSECResolver([plain.address, validating.address], timeout=2.0)
        result = r.lookup("host.example.org", "A")
        self.assertEqual(result.status, BOGUS)
        self.assertIn(f"validation failed at {validating.address}", result.reason)


class CNAMETests(Base):
    CHAIN = [("alias.example.org.", "CNAME", "step.example.net."),
             ("step.example.net.", "CNAME", "mx.example.org."), A]

    def test_secure_chain(self):
        server = self.serve({("alias.example.org", "A"): Reply(ad=True, answer=self.CHAIN)})
        result = self.resolver(server).lookup("alias.example.org", "A")
        self.assertEqual((result.status, result.secure), (SECURE, True))
        self.assertEqual(result.canonical_name, "mx.example.org")
        self.assertTrue(result.aliased)
        self.assertEqual(result.record_texts(), ("192.0.2.25",))
        self.assertEqual(result.describe(),
                         "alias.example.org A: secure (via CNAME mx.example.org): 192.0.2.25")

    def test_insecure_chain(self):
        """One AD bit covers the chain: any insecure step makes the answer insecure."""
        server = self.serve({("alias.example.org", "A"): Reply(answer=self.CHAIN)})
        result = self.resolver(server).lookup("alias.example.org", "A")
        self.assertEqual((result.status, result.secure), (INSECURE, False))
        self.assertEqual(result.canonical_name, "mx.example.org")

    def test_chain_to_nodata(self):
        server = self.serve({("alias.example.org", "AAAA"): Reply(ad=True, answer=self.CHAIN[:2])})
        result = self.resolver(server).lookup("alias.example.org", "AAAA")
        self.assertEqual((result.status, result.secure), (NODATA, True))
        self.assertEqual(result.canonical_name, "mx.example.org")

    def test_no_alias(self):
        server = self.serve({("mx.example.org", "A"): Reply(ad=True, answer=[A])})
        result = self.resolver(server).lookup("mx.example.org", "A")
        self.assertEqual(result.canonical_name, "mx.example.org")
        self.assertFalse(result.aliased)


class AddressTests(Base):
    def addresses(self, a: Reply, aaaa: Reply, host="mx.example.org"):
        server = self.serve({(host, "A"): a, (host, "AAAA"): aaaa})
        return addresses_secure(self.resolver(server), host)

    def test_both_secure(self):
        aaaa = ("mx.example.org.", "AAAA", "2001:db8::25")
        result = self.addresses(Reply(ad=True, answer=[A]), Reply(ad=True, answer=[aaaa]))
        self.assertEqual((result.status, result.secure), (SECURE, True))
        self.assertEqual(result.addresses, ("192.0.2.25", "2001:db8::25"))

    def test_secure_nodata_counts(self):
        result = self.addresses(Reply(ad=True, answer=[A]), Reply(ad=True))
        self.assertEqual((result.status, result.secure, result.addresses),
                         (SECURE, True, ("192.0.2.25",)))

    def test_one_insecure_answer_makes_it_insecure(self):
        result = self.addresses(Reply(ad=True, answer=[A]), Reply())
        self.assertEqual((result.status, result.secure), (INSECURE, False))

    def test_bogus_wins(self):
        result = self.addresses(Reply(ad=True, answer=[A]),
                                Reply(rcode=dns.rcode.SERVFAIL, ede=[(6, "bad")]))
        self.assertEqual((result.status, result.secure, result.addresses),
                         (BOGUS, False, ("192.0.2.25",)))
        self.assertIn("AAAA: validation failed", result.reason)

    def test_no_such_host(self):
        result = self.addresses(Reply(rcode=dns.rcode.NXDOMAIN, ad=True),
                                Reply(rcode=dns.rcode.NXDOMAIN, ad=True))
        self.assertEqual((result.status, result.secure, result.addresses), (NXDOMAIN, True, ()))

    def test_no_addresses(self):
        result = self.addresses(Reply(ad=True), Reply(ad=True))
        self.assertEqual((result.status, result.secure), (NODATA, True))

    def test_cname_and_tlsa_base_domains(self):
        """
        RFC 7672 2.2.2: after a secure CNAME chain, TLSA records are looked
        up under the expanded name first, then the original; otherwise
        only under the original.
        """
        chain = [("alias.example.org.", "CNAME", "mx.example.org."), A]
        secure = self.addresses(Reply(ad=True, answer=chain), Reply(ad=True, answer=chain[:1]),
                                host="alias.example.org")
        self.assertEqual((secure.status, secure.canonical_name), (SECURE, "mx.example.org"))
        self.assertEqual(tlsa_base_domains(secure), ("mx.example.org", "alias.example.org"))
        insecure = self.addresses(Reply(answer=chain), Reply(answer=chain[:1]),
                                  host="alias.example.org")
        self.assertEqual(tlsa_base_domains(insecure), ("alias.example.org",))
        plain = self.addresses(Reply(ad=True, answer=[A]), Reply(ad=True))
        self.assertEqual(tlsa_base_domains(plain), ("mx.example.org",))


class TLSATests(Base):
    NAME = "_25._tcp.mx.example.org"

    def tlsa(self, reply: Reply, port: int = 25):
        server = self.serve({(dnssec.tlsa_name("mx.example.org", port), "TLSA"): reply})
        return tlsa(self.resolver(server), "mx.example.org", port)

    def test_name(self):
        self.assertEqual(dnssec.tlsa_name("mx.example.org."), self.NAME)
        self.assertEqual(dnssec.tlsa_name("mx.example.org", 465), "_465._tcp.mx.example.org")

    def test_secure_records(self):
        result = self.tlsa(Reply(ad=True, answer=[TLSA]))
        self.assertEqual((result.status, result.dane), (SECURE, DANE_RECORDS))
        [record] = result.records
        self.assertEqual((record.usage, record.selector, record.mtype, record.cert),
                         (3, 1, 1, b"\xab" * 32))

    def test_other_port(self):
        result = self.tlsa(Reply(ad=True, answer=[("_587._tcp.mx.example.org.", "TLSA",
                                                   TLSA[2])]), port=587)
        self.assertEqual(result.name, "_587._tcp.mx.example.org")
        self.assertEqual(result.dane, DANE_RECORDS)

    def test_secure_denial_means_no_dane(self):
        self.assertEqual(self.tlsa(Reply(rcode=dns.rcode.NXDOMAIN, ad=True)).dane, DANE_NONE)
        self.assertEqual(self.tlsa(Reply(ad=True)).dane, DANE_NONE)

    def test_insecure_records_are_not_used(self):
        self.assertEqual(self.tlsa(Reply(answer=[TLSA])).dane, DANE_NONE)

    def test_failures_defer(self):
        self.assertEqual(self.tlsa(Reply(rcode=dns.rcode.SERVFAIL, ede=[(6, "")])).dane,
                         DANE_DEFER)
        self.assertEqual(self.tlsa(Reply(rcode=dns.rcode.SERVFAIL)).dane, DANE_DEFER)
        self.assertEqual(self.tlsa(Reply(rcode=dns.rcode.REFUSED)).dane, DANE_DEFER)


class ValidatesTests(Base):
    GOOD = ("secure.example", "A")
    BAD = ("bogus.example", "A")
    GOOD_ANSWER = Reply(ad=True, answer=[("secure.example.", "A", "192.0.2.1")])

    def check(self, good: Reply, bad: Reply, **kw):
        server = self.serve({self.GOOD: good, self.BAD: bad})
        return validates(self.resolver(server, **kw), "secure.example", "bogus.example")

    def test_validating_resolver(self):
        result = self.check(self.GOOD_ANSWER, Reply(rcode=dns.rcode.SERVFAIL, ede=[(6, "")]))
        self.assertTrue(result)
        self.assertTrue(result.ok)
        self.assertIn("validates", result.reason)

    def test_validating_resolver_without_ede(self):
        result = self.check(self.GOOD_ANSWER, Reply(rcode=dns.rcode.SERVFAIL, cd=Reply(
            answer=[("bogus.example.", "A", "192.0.2.2")])))
        self.assertTrue(result)

    def test_secure_denial_counts_for_the_secure_name(self):
        self.assertTrue(self.check(Reply(ad=True), Reply(rcode=dns.rcode.SERVFAIL, ede=[(6, "")])))

    def test_no_ad(self):
        """A resolver that does not validate (no AD) fails the check, whatever else."""
        result = self.check(Reply(answer=[("secure.example.", "A", "192.0.2.1")]),
                            Reply(rcode=dns.rcode.SERVFAIL, ede=[(6, "")]))
        self.assertFalse(result)
        self.assertIn("without the AD bit", result.reason)

    def test_bogus_name_answered(self):
        result = self.check(self.GOOD_ANSWER,
                            Reply(answer=[("bogus.example.", "A", "192.0.2.2")]))
        self.assertFalse(result)
        self.assertIn("came back insecure, not SERVFAIL", result.reason)

    def test_bogus_name_fails_otherwise(self):
        result = self.check(self.GOOD_ANSWER, Reply(rcode=dns.rcode.SERVFAIL, ede=[(22, "")]))
        self.assertFalse(result)
        self.assertIn("not as bogus", result.reason)

    def test_secure_name_fails(self):
        result = self.check(Reply(rcode=dns.rcode.REFUSED), Reply())
        self.assertFalse(result)
        self.assertIn("known-secure name secure.example failed", result.reason)

    def test_untrusted_resolver(self):
        """AD from a resolver that is not trusted is never believed: the check fails at once."""
        server = self.serve({})
        result = validates(self.resolver(server, trust_loopback=False),
                           "secure.example", "bogus.example")
        self.assertFalse(result)
        self.assertIn("not believed", result.reason)
        self.assertEqual(server.queries, [])


class CappedCacheTests(SynchronousTestCase):
    """[dns] cache_ttl: answers reused for their TTL, never longer than the cap; 0 is no cache."""

    def test_cap(self) -> None:
        import time

        from twisted_mta.tls.dnssec import CappedCache, cache_for

        class Answer:
            def __init__(self, ttl: float) -> None:
                self.expiration = time.time() + ttl

        cache = cache_for(60)
        self.assertIsInstance(cache, CappedCache)
        long, short = Answer(3600), Answer(5)
        cache.put(("long", 1, 1), long)
        cache.put(("short", 1, 1), short)
        self.assertLessEqual(long.expiration, time.time() + 60)
        self.assertGreater(long.expiration, time.time() + 55)
        self.assertLessEqual(short.expiration, time.time() + 5)
        self.assertIs(cache.get(("long", 1, 1)), long)
        self.assertIsNone(cache_for(0))
