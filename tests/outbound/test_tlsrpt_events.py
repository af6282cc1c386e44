"""
The tls.result events the delivery attempt sends for TLS reporting (RFC
8460): what each kind of session counts as, under which policy, with which
details; and what is never counted (dry runs, fallback sessions, our own
policy "none", smarthosts, "TLS-Required: No" mail).
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tests.outbound.test_pool import PoolTestBase, ScriptedServer
from twisted_mta.outbound.attempt import Attempt
from twisted_mta.outbound.router import NextHop
from twisted_mta.tls import published as pub
from twisted_mta.tls.dane import TLSARecord
from twisted_mta.tls.failure import TLSFailure
from twisted_mta.tls.policy import Choice, TLSRequirements, dane_requirements
from twisted_mta.tls.sts import Policy
from twisted_mta.tls.sts_cache import Lookup
from twisted_mta.tlsrpt import events

STS_LINES = ["version: STSv1", "mode: testing", "mx: mx1.peer.test", "max_age: 86400"]


class StartTLSRefused(ScriptedServer):
    """Offers STARTTLS and then refuses it."""

    def lineReceived(self, line):
        verb = line.split(b" ")[0].upper()
        if verb == b"EHLO":
            self.log.append((self.name, line))
            self.sendLine(b"250-%s\r\n250-STARTTLS\r\n250 PIPELINING" % self.name.encode())
        elif verb == b"STARTTLS":
            self.log.append((self.name, line))
            self.sendLine(b"454 4.7.0 TLS not available")
        else:
            ScriptedServer.lineReceived(self, line)


class FakePublished:
    """An MTA-STS answer for peer.test; DANE off."""

    def __init__(self, mode: str, mx=("mx1.peer.test",)):
        self.lookup = Lookup("peer.test", Policy(mode=mode, max_age=86400, mx=tuple(mx)),
                             "cache")
        self.dane_state = attrs.make_class("State", ["reason"])("no validating resolver")

    def dane_enabled(self):
        return defer.succeed(False)

    def sts(self, domain):
        return defer.succeed(self.lookup)


class PoolEventTests(PoolTestBase):
    def collect(self, hop=None, published=None, server=None, **outbound):
        pool = self.pool(**outbound)
        if published is not None:
            pool.ctx.published = published
        if server is not None:
            self.servers_class = server
        events = []
        pool.observers.append(lambda name, e: events.append(e) if name == "tls.result"
                              else None)
        hop = hop or NextHop("peer.test", smarthost=pool.settings.smarthost_for("peer.test"))
        r = self.deliver(pool, hop, self.txn("x@peer.test"))
        self.flush()
        self.outcome = r[0]["x@peer.test"] if r else None
        for e in events:
            e.pop("time")
        return events

    def connect(self, address, port, protocol, creator):
        cls = getattr(self, "servers_class", ScriptedServer)
        self.connects.append((address, port))
        server = cls(self.servers[address], self.log)
        pump = iosim.connect(
            server, iosim.FakeTransport(server, True, IPv4Address("TCP", address, port),
                                        IPv4Address("TCP", "192.0.2.100", 40000)),
            protocol, iosim.FakeTransport(protocol, False, IPv4Address("TCP", "192.0.2.100",
                                                                       40000),
                                          IPv4Address("TCP", address, port)),
            greet=False)
        self.pumps.append(pump)
        return defer.succeed(protocol)

    def test_cleartext_without_starttls_is_a_failure(self):
        """No STARTTLS offered, no policy: delivered in cleartext, counted as starttls-not-supported with every detail known."""
        self.assertEqual(self.collect(), [{
            "domain": "peer.test", "policy-type": "no-policy-found",
            "result": "starttls-not-supported", "failure-reason-code": "starttls-not-offered",
            "sending-mta-ip": "192.0.2.100", "receiving-mx-hostname": "mx1.peer.test",
            "receiving-mx-helo": "mx1.peer.test", "receiving-ip": "192.0.2.1"}])
        self.assertEqual(self.outcome.code, 250)

    def test_policy_none_counts_nothing(self):
        """Our own policy none tries no TLS: nothing to report."""
        self.assertEqual(self.collect(tls={"policy": "none"}), [])

    def test_refused_starttls_then_fallback_counts_once(self):
        """STARTTLS refused by both MX hosts, then the fallback's cleartext session: a failure per host, the fallback not counted."""
        events = self.collect(server=StartTLSRefused, tls={"policy": "opportunistic",
                                                       "fallback": "now"})
        self.assertEqual(self.outcome.code, 250)
        self.assertEqual([(e["result"], e["failure-reason-code"], e["receiving-ip"])
                          for e in events],
                         [("starttls-not-supported", "starttls-refused", "192.0.2.1"),
                          ("starttls-not-supported", "starttls-refused", "192.0.2.2")])
        self.assertEqual(self.commands().count(b"MAIL FROM:<a@example.test>"), 1)

    def test_sts_enforce_refusal(self):
        """An MX host the enforced MTA-STS policy does not list: refused before connecting, counted under the sts policy."""
        events = self.collect(published=FakePublished("enforce", mx=("other.peer.test",)))
        self.assertEqual(self.connects, [])
        self.assertEqual(len(events), 2)  # both MX hosts
        e = events[0]
        self.assertEqual((e["policy-type"], e["mx-host"], e["result"],
                          e["failure-reason-code"], e["receiving-mx-hostname"]),
                         ("sts", ["other.peer.test"], "validation-failure", "sts-mx-mismatch",
                          "mx1.peer.test"))
        self.assertNotIn("sending-mta-ip", e)

    def test_sts_testing_verdict_counted_while_mail_flows(self):
        """A testing policy: delivered as the default says; its verdict (no STARTTLS) is the failure counted under sts."""
        events = self.collect(published=FakePublished("testing"))
        self.assertEqual(self.outcome.code, 250)
        [e] = events
        self.assertEqual((e["policy-type"], e["policy-string"], e["result"],
                          e["failure-reason-code"]),
                         ("sts", STS_LINES, "starttls-not-supported", "starttls-not-offered"))

    def test_sts_testing_mx_mismatch(self):
        events = self.collect(published=FakePublished("testing", mx=("other.peer.test",)))
        self.assertEqual(self.outcome.code, 250)
        self.assertEqual([(e["result"], e["failure-reason-code"]) for e in events],
                         [("validation-failure", "sts-mx-mismatch")])

    def test_not_counted(self):
        """Smarthost deliveries and "TLS-Required: No" mail are not reported."""
        pool_hop = NextHop("peer.test", tls_required_no=True)
        self.assertEqual(self.collect(hop=pool_hop, published=FakePublished("testing")), [])
        self.assertEqual(self.outcome.code, 250)
        events = self.collect(smarthost={"host": "[192.0.2.1]:25"})
        self.assertEqual(events, [])

    def test_dry_run_emits_nothing(self):
        """tls explain's dry run: a failing session tells no observer."""
        pool = self.pool(tls={"policy": "strict"})
        seen = []
        pool.observers.append(lambda name, e: seen.append(name))
        attempt = Attempt(pool.ctx, NextHop("peer.test"))
        choice = pool.ctx.tls.choose("peer.test", "mx1.peer.test", None)
        failed = []
        attempt.session("mx1.peer.test", "192.0.2.1", 25, choice, dry_run=True).addErrback(
            failed.append)
        self.flush()
        self.assertEqual(failed[0].value.tls_failure.kind, "starttls-not-offered")
        self.assertEqual(seen, [])
        # the same session for real is counted
        attempt.session("mx1.peer.test", "192.0.2.1", 25, choice).addErrback(lambda f: None)
        self.flush()
        self.assertEqual(seen, ["tls.result"])


RECORD = TLSARecord(3, 1, 1, bytes(range(32)))


def dane_choice(dane=pub.RECORDS, records=(RECORD,), kind=None):
    host = pub.Host("mx1.peer.test", 25, dane, "why", records=records, failure_kind=kind)
    facts = pub.Facts("peer.test", None, host, None)
    return Choice(dane_requirements(records, ()), "never", "DANE", source="dane",
                  published=facts)


def sts_choice(mode):
    lookup = Lookup("peer.test", Policy(mode=mode, max_age=86400, mx=("mx1.peer.test",)),
                    "cache")
    facts = pub.Facts("peer.test", None, pub.Host("mx1.peer.test", 25, pub.OFF, ""), lookup)
    if mode == "enforce":
        return Choice(TLSRequirements("mta-sts", starttls="required", verify=True), "never",
                      "MTA-STS", source="mta-sts", published=facts)
    return Choice(TLSRequirements("opportunistic"), "now", "default", source="default",
                  published=facts)


PLAIN = Choice(TLSRequirements("opportunistic"), "now", "default", source="default")
CONFIG = attrs.evolve(sts_choice("testing"), source="config")
EXPIRED = TLSFailure("certificate-expired", host="mx1.peer.test", address="192.0.2.1",
                     port=25)
UNTRUSTED = TLSFailure("certificate-untrusted", host="mx1.peer.test", address="192.0.2.1",
                       port=25, detail="self-signed")
LOOKUP = TLSFailure("dane-lookup-failed", host="mx1.peer.test", address="192.0.2.1", port=25)


class ResultTableTests(SynchronousTestCase):
    # (choice, keyword arguments, (policy-type, policy-string, mx-host), result, reason)
    TABLE = [
        (PLAIN, {}, ("no-policy-found", None, None), "success", None),
        (PLAIN, {"tls": False}, ("no-policy-found", None, None), "starttls-not-supported",
         "starttls-not-offered"),
        (PLAIN, {"tls": False, "starttls": "never"}, None, None, None),
        (PLAIN, {"failure": EXPIRED}, ("no-policy-found", None, None), "certificate-expired",
         "certificate-expired"),
        (PLAIN, {"failure": UNTRUSTED}, ("no-policy-found", None, None),
         "certificate-not-trusted", "certificate-untrusted: self-signed"),
        (dane_choice(), {}, ("tlsa", ["3 1 1 " + bytes(range(32)).hex()], ["mx1.peer.test"]),
         "success", None),
        (dane_choice(pub.DEFER, (), "dane-lookup-failed"), {"failure": LOOKUP},
         ("tlsa", [], ["mx1.peer.test"]), "dnssec-invalid", "dane-lookup-failed"),
        (sts_choice("enforce"), {"failure": EXPIRED},
         ("sts", ["version: STSv1", "mode: enforce", "mx: mx1.peer.test", "max_age: 86400"],
          ["mx1.peer.test"]), "certificate-expired", "certificate-expired"),
        (sts_choice("testing"), {}, ("sts", STS_LINES, ["mx1.peer.test"]), "success", None),
        # our own explicit entry chose the policy: not the destination's
        (CONFIG, {}, ("no-policy-found", None, None), "success", None),
    ]

    def test_table(self):
        for choice, kw, policy, result, reason in self.TABLE:
            e = events.result("peer.test", choice, 5.0, host="mx1.peer.test",
                              address="192.0.2.1", local="192.0.2.100", helo="mx1", **kw)
            if policy is None:
                self.assertIsNone(e, (choice, kw))
                continue
            self.assertEqual((e["policy-type"], e.get("policy-string"), e.get("mx-host")),
                             policy, (choice, kw))
            self.assertEqual((e["result"], e.get("failure-reason-code")), (result, reason))
            if result == "success":
                self.assertNotIn("receiving-ip", e)
            else:
                self.assertEqual((e["sending-mta-ip"], e["receiving-mx-helo"],
                                  e["receiving-ip"]), ("192.0.2.100", "mx1", "192.0.2.1"))
