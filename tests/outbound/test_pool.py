"""
Tests for the outbound pool: MX order and fallback, the loop check,
connection reuse and limits, idle connections, dead destinations.  Servers
are small scripted SMTP servers joined to the client in memory (iosim).
"""

from __future__ import annotations

import attrs
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet import task
from twisted.internet.task import Clock
from twisted.protocols import basic
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound.message import OutgoingMessage, stuff
from twisted_mta.outbound.mx import MXError, MXHost
from twisted_mta.outbound.pool import OutboundPool
from twisted_mta.outbound.router import NextHop
from twisted_mta.model import Outcome
from tests.support import make_config


from zope.interface import implementer

from twisted_mta.interfaces import ITLSPolicy
from twisted_mta.tls.policy import TLSRequirements

class ScriptedServer(basic.LineReceiver):
    """
    An SMTP server that accepts everything except recipients starting
    with "bad" (550) or "later" (450).
    """

    def __init__(self, name: str, log: list):
        self.name = name
        self.log = log
        self.in_data = False
        self.body: list[bytes] = []

    def connectionMade(self):
        self.sendLine(b"220 %s ESMTP" % self.name.encode())

    def lineReceived(self, line):
        if self.in_data:
            if line == b".":
                self.in_data = False
                self.log.append((self.name, b"BODY", b"\n".join(self.body)))
                self.body = []
                self.sendLine(b"250 2.0.0 queued")
            else:
                self.body.append(line)
            return
        self.log.append((self.name, line))
        verb = line.split(b" ")[0].split(b":")[0].upper()
        if verb == b"EHLO":
            self.sendLine(b"250-%s\r\n250-PIPELINING\r\n250 8BITMIME" % self.name.encode())
        elif verb == b"RCPT" and b"<bad" in line:
            self.sendLine(b"550 5.1.1 no such user")
        elif verb == b"RCPT" and b"<later" in line:
            self.sendLine(b"450 4.2.1 try later")
        elif verb == b"DATA":
            self.in_data = True
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"250 ok")


class FakeResolver:
    def __init__(self, mx: dict, addresses: dict):
        self._mx = mx
        self._addresses = addresses

    def mx(self, domain):
        value = self._mx[domain]
        if isinstance(value, Outcome):
            raise MXError(value)
        return value

    def addresses(self, host):
        return self._addresses.get(host, [])


class PoolTestBase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.log: list = []
        self.pumps: list = []
        self.refused: set[str] = set()
        self.servers: dict[str, str] = {"192.0.2.1": "mx1.peer.test",
                                        "192.0.2.2": "mx2.peer.test",
                                        "192.0.2.9": "out.example.test"}
        self.connects: list[tuple[str, int]] = []
        self.resolver = FakeResolver(
            mx={"peer.test": [MXHost(10, "mx1.peer.test"), MXHost(20, "mx2.peer.test")],
                "null.test": Outcome(556, "5.1.10", "null MX"),
                "self.test": [MXHost(10, "out.example.test")],
                "backup.test": [MXHost(5, "mx2.peer.test"), MXHost(10, "out.example.test"),
                                MXHost(20, "mx1.peer.test")]},
            addresses={"mx1.peer.test": ["192.0.2.1"], "mx2.peer.test": ["192.0.2.2"]})

    def pool(self, **outbound):
        config = make_config(self.mktemp(), server={"hostname": "out.example.test",
                                                    "spool": "spool"}, outbound=outbound)
        return OutboundPool(settings=config.outbound, hostname=config.hostname,
                            clock=self.clock, run_blocking=self.run_blocking,
                            resolver=self.resolver, connect=self.connect)

    def run_blocking(self, f, *args):
        # Like the thread pool: the result comes later, not within the call.
        return task.deferLater(self.clock, 0, f, *args)

    def connect(self, address, port, protocol, creator):
        self.connects.append((address, port))
        if address in self.refused:
            return defer.fail(error.ConnectionRefusedError())
        server = ScriptedServer(self.servers[address], self.log)
        pump = iosim.connect(
            server, iosim.FakeTransport(server, True, IPv4Address("TCP", address, port),
                                        IPv4Address("TCP", "192.0.2.100", 40000)),
            protocol, iosim.FakeTransport(protocol, False, IPv4Address("TCP", "192.0.2.100",
                                                                       40000),
                                          IPv4Address("TCP", address, port)),
            greet=False)
        self.pumps.append(pump)
        return defer.succeed(protocol)

    def flush(self):
        for _ in range(50):
            self.clock.advance(0)
            progress = bool(self.clock.getDelayedCalls() and
                            min(c.getTime() for c in self.clock.getDelayedCalls())
                            <= self.clock.seconds())
            for pump in list(self.pumps):
                progress = pump.pump() or progress
            if not progress:
                return

    def txn(self, *rcpts, body=b"Subject: x\r\n\r\nhello\r\n"):
        msg = OutgoingMessage(path="-", offset=0, size=len(body), eight_bit=False,
                              data=stuff(body))
        return Transaction("a@example.test", rcpts, msg)

    def deliver(self, pool, hop, txn):
        results = []
        pool.deliver(hop, txn).addCallback(results.append)
        return results

    def commands(self, name=None):
        return [e[1] for e in self.log if len(e) == 2 and (name is None or e[0] == name)]


class PoolTests(PoolTestBase):
    def test_delivered_to_best_mx(self):
        pool = self.pool()
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test", "bad@peer.test"))
        self.flush()
        [results] = r
        self.assertEqual(results["x@peer.test"].code, 250)
        self.assertEqual(results["bad@peer.test"].enhanced, "5.1.1")
        self.assertEqual(self.connects, [("192.0.2.1", 25)])
        bodies = [e[2] for e in self.log if len(e) == 3]
        self.assertEqual(bodies, [b"X-Twisted-MTA-TLS: mx1.peer.test[192.0.2.1]:25 no TLS; "
                                  b"policy opportunistic (default)\nSubject: x\n\nhello"])

    def test_next_mx_when_first_refuses_connection(self):
        """A refused connection moves on to the next MX host."""
        self.refused.add("192.0.2.1")
        pool = self.pool(port=2525)
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].code, 250)
        self.assertEqual(self.connects, [("192.0.2.1", 2525), ("192.0.2.2", 2525)])
        self.assertEqual(r[0]["x@peer.test"].remote_mta, "mx2.peer.test")

    def test_dead_destination_fails_all_waiting(self):
        """When no MX answers, every message waiting for that destination gets the failure, after one round of attempts."""
        self.refused.update({"192.0.2.1", "192.0.2.2"})
        pool = self.pool(connections_per_destination=1)
        r1 = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        r2 = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        self.flush()
        self.assertEqual(r1[0]["x@peer.test"].enhanced, "4.4.1")
        self.assertEqual(r2[0]["y@peer.test"].enhanced, "4.4.1")
        self.assertIn("connect to mx2.peer.test[192.0.2.2]:25 failed: connection refused",
                      r2[0]["y@peer.test"].text)
        self.assertEqual(len(self.connects), 2)
        self.assertEqual(pool.total, 0)

    def test_dead_destination_fails_fast_for_a_while(self):
        """After every host failed, new mail for the destination fails at once (no connection storm) until dead_destination_time passes."""
        self.refused.update({"192.0.2.1", "192.0.2.2"})
        pool = self.pool(dead_destination_time=60)
        self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(len(self.connects), 2)
        r = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        self.assertEqual(r[0]["y@peer.test"].enhanced, "4.4.1")
        self.assertEqual(len(self.connects), 2)
        self.clock.advance(60)
        self.refused.clear()
        r = self.deliver(pool, NextHop("peer.test"), self.txn("z@peer.test"))
        self.flush()
        self.assertEqual(r[0]["z@peer.test"].code, 250)

    def test_revive_forgets_dead_destinations(self):
        """An operator's flush (revive) makes the next message really try again."""
        self.refused.update({"192.0.2.1", "192.0.2.2"})
        pool = self.pool(dead_destination_time=60)
        self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.refused.clear()
        pool.revive()
        r = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        self.flush()
        self.assertEqual(r[0]["y@peer.test"].code, 250)

    def test_refused_beside_live_connection_lowers_concurrency(self):
        """A new connection that fails while another is live does not fail the waiting mail: the live one carries it."""
        pool = self.pool(connections_per_destination=3)
        first = self.deliver(pool, NextHop("peer.test"), self.txn("a@peer.test"))
        self.flush()
        self.assertEqual(first[0]["a@peer.test"].code, 250)  # one live, idle connection
        self.refused.update({"192.0.2.1", "192.0.2.2"})
        # Busy the idle connection, then queue more than it can take at once.
        results = [self.deliver(pool, NextHop("peer.test"), self.txn(f"u{i}@peer.test"))
                   for i in range(3)]
        self.flush()
        self.assertEqual([r[0][f"u{i}@peer.test"].code for i, r in enumerate(results)],
                         [250, 250, 250])

    def test_shadow_strict_reports_while_mail_flows(self):
        """With opportunistic in force and strict in shadow, a server without STARTTLS gets the mail, and the shadow verdict is reported."""
        events = []
        pool = self.pool(tls={"policy": "opportunistic", "shadow": "strict"})
        pool.observers.append(lambda name, e: events.append((name, e)))
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].code, 250)
        [(name, event)] = [(n, e) for n, e in events if n == "tls.shadow"]
        self.assertEqual((name, event["kind"], event["shadow"], event["policy"],
                          event["domain"], event["host"]),
                         ("tls.shadow", "starttls-not-offered", "strict", "opportunistic",
                          "peer.test", "mx1.peer.test"))

    def test_strict_without_starttls_defers_with_explanation(self):
        """Under strict with fallback never, a server without STARTTLS gets nothing; the outcome explains why in words."""
        pool = self.pool(tls={"domains": {"peer.test": {"policy": "strict",
                                                        "fallback": "never"}}})
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        o = r[0]["x@peer.test"]
        self.assertEqual((o.code, o.enhanced, o.kind, o.policy),
                         (451, "4.7.4", "starttls-not-offered", "strict"))
        self.assertIn("mx2.peer.test[192.0.2.2]:25 does not offer encryption", o.text)
        self.assertNotIn(b"MAIL FROM:<a@example.test>", self.commands())

    def test_fallback_now_sends_in_cleartext_and_says_so(self):
        """Under relaxed with fallback now, a server without STARTTLS gets the mail over a fresh cleartext connection, marked in the trace header."""
        pool = self.pool(tls={"policy": "relaxed", "fallback": "now"})
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].code, 250)
        [body] = [e[2] for e in self.log if len(e) == 3]
        self.assertIn(b"fallback=now reason=starttls-not-offered", body.split(b"\n")[0])

    def test_operator_cleartext_override(self):
        """A message with the operator's cleartext override goes in cleartext under strict/never; the trace says who allowed it."""
        pool = self.pool(tls={"domains": {"peer.test": {"policy": "strict",
                                                        "fallback": "never"}}})
        txn = attrs.evolve(self.txn("x@peer.test"), tls_override="cleartext")
        plain = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        r = self.deliver(pool, NextHop("peer.test"), txn)
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].code, 250)
        self.assertEqual(plain[0]["y@peer.test"].enhanced, "4.7.4")
        [body] = [e[2] for e in self.log if len(e) == 3]
        self.assertIn(b"fallback=operator-override", body.split(b"\n")[0])

    def test_cleartext_fallbacks_share_limited_connections(self):
        """Many messages falling back to cleartext after the same TLS failure share pooled connections within the per-destination limit."""
        pool = self.pool(tls={"policy": "relaxed", "fallback": "now"},
                         connections_per_destination=2)
        results = [self.deliver(pool, NextHop("peer.test"), self.txn(f"u{i}@peer.test"))
                   for i in range(8)]
        self.flush()
        self.assertEqual([r[0][f"u{i}@peer.test"].code for i, r in enumerate(results)],
                         [250] * 8)
        fallback = [e for e in self.log if len(e) == 2 and e[1].startswith(b"EHLO")]
        bodies = [e[2] for e in self.log if len(e) == 3]
        self.assertEqual(len(bodies), 8)
        self.assertTrue(all(b"fallback=now reason=starttls-not-offered" in b for b in bodies))
        # 2 TLS attempts per MX host at most, then at most 2 cleartext connections
        self.assertLessEqual(len(self.connects), 2 * 2 + 2)
        self.assertLess(len(fallback), 8)

    def test_null_mx(self):
        pool = self.pool()
        r = self.deliver(pool, NextHop("null.test"), self.txn("x@null.test"))
        self.flush()
        self.assertEqual(r[0]["x@null.test"].code, 556)
        self.assertEqual(self.connects, [])

    def test_mx_is_ourselves(self):
        """Our own name as best MX is a loop (5.4.6), found without connecting."""
        pool = self.pool()
        r = self.deliver(pool, NextHop("self.test"), self.txn("x@self.test"))
        self.flush()
        self.assertEqual((r[0]["x@self.test"].code, r[0]["x@self.test"].enhanced), (554, "5.4.6"))
        self.assertEqual(self.connects, [])

    def test_backup_mx_tries_only_better_hosts(self):
        """When we are a lesser MX, only more preferred hosts are tried."""
        self.refused.add("192.0.2.2")
        pool = self.pool()
        r = self.deliver(pool, NextHop("backup.test"), self.txn("x@backup.test"))
        self.flush()
        self.assertEqual(self.connects, [("192.0.2.2", 25)])
        self.assertEqual(r[0]["x@backup.test"].code, 451)

    def test_connection_reused_for_next_message(self):
        """Messages to one destination share a connection; no RSET between delivered ones."""
        pool = self.pool(connections_per_destination=1)
        r1 = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        r2 = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        self.flush()
        self.assertEqual((r1[0]["x@peer.test"].code, r2[0]["y@peer.test"].code), (250, 250))
        self.assertEqual(len(self.connects), 1)
        self.assertEqual([c for c in self.commands() if c.startswith((b"MAIL", b"RSET"))],
                         [b"MAIL FROM:<a@example.test>", b"MAIL FROM:<a@example.test>"])

    def test_idle_connection_used_then_closed(self):
        """A finished connection waits idle_time for more mail, is reused within it, and QUITs after."""
        pool = self.pool(idle_time=5)
        self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.clock.advance(4)
        r = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        self.flush()
        self.assertEqual(r[0]["y@peer.test"].code, 250)
        self.assertEqual(len(self.connects), 1)
        self.clock.advance(5)
        self.flush()
        self.assertEqual(self.commands()[-1], b"QUIT")
        self.assertEqual(pool.total, 0)

    def test_per_destination_limit(self):
        """No more connections to one destination than connections_per_destination."""
        pool = self.pool(connections_per_destination=2)
        results = [self.deliver(pool, NextHop("peer.test"), self.txn(f"u{i}@peer.test"))
                   for i in range(5)]
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(self.connects), 2)
        self.flush()
        self.assertEqual([len(r) for r in results], [1] * 5)
        self.assertEqual(len(self.connects), 2)

    def test_global_limit_frees_idle_connection(self):
        """At the global limit, an idle connection to one destination is closed for mail waiting elsewhere."""
        self.resolver._mx["other.test"] = [MXHost(10, "mx2.peer.test")]
        pool = self.pool(connections=1)
        self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        r = self.deliver(pool, NextHop("other.test"), self.txn("y@other.test"))
        self.flush()
        self.assertEqual(r[0]["y@other.test"].code, 250)
        self.assertEqual(self.connects, [("192.0.2.1", 25), ("192.0.2.2", 25)])

    def test_messages_per_connection(self):
        pool = self.pool(connections_per_destination=1, messages_per_connection=2)
        for i in range(3):
            self.deliver(pool, NextHop("peer.test"), self.txn(f"u{i}@peer.test"))
        self.flush()
        self.assertEqual(len(self.connects), 2)


@implementer(ITLSPolicy)
class Moody:
    """
    A plugin policy that raises while C{broken} (for any destination).
    """

    name = "moody"

    def __init__(self):
        self.broken = True

    def requirements(self, destination):
        if self.broken:
            raise RuntimeError("moody plugin")
        return TLSRequirements("moody", starttls="if-offered")


MOODY = Moody()  # named by its dotted path, as a configuration would


class PolicySelectionTests(PoolTestBase):
    """
    Which policy the pool uses for a destination, as the trace header
    records it; and a plugin policy that raises.
    """

    def trace_of_delivery(self, **tls) -> bytes:
        pool = self.pool(tls=tls)
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].code, 250)
        return [e[2] for e in self.log if len(e) == 3][-1].split(b"\n")[0]

    def test_mx_host_pattern_chooses_the_policy(self):
        """An [outbound.tls.mx_hosts] glob on the MX host name chooses the policy when no domain entry matches; a domain entry beats it."""
        trace = self.trace_of_delivery(policy="opportunistic", mx_hosts={
            "*.peer.test": {"policy": "none"}})
        self.assertIn(b"policy none (mx host *.peer.test)", trace)
        trace = self.trace_of_delivery(policy="opportunistic", mx_hosts={
            "*.peer.test": {"policy": "none"}}, domains={".test": {"policy": "none"}})
        self.assertIn(b"policy none (domain .test)", trace)
        trace = self.trace_of_delivery(policy="none", mx_hosts={
            "mx9.*": {"policy": "strict"}})
        self.assertIn(b"policy none (default)", trace)

    def test_plugin_policy_that_raises_defers_only_its_message(self):
        """A plugin policy whose requirements() raises for a smarthost route defers that message (4.3.0, logged once); when the plugin recovers, the next message goes out: nothing stays frozen."""
        moody = MOODY
        moody.broken = True
        self.addCleanup(setattr, moody, "broken", True)
        pool = self.pool(smarthost={"host": "[192.0.2.1]:25",
                                    "tls_policy": "tests.outbound.test_pool.MOODY"})
        hop = NextHop("peer.test", smarthost=pool.settings.smarthost)
        r = self.deliver(pool, hop, self.txn("x@peer.test"))
        self.flush()
        self.assertEqual((r[0]["x@peer.test"].code, r[0]["x@peer.test"].enhanced),
                         (451, "4.3.0"))
        self.assertIn("moody plugin", r[0]["x@peer.test"].text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        moody.broken = False
        r = self.deliver(pool, hop, self.txn("y@peer.test"))
        self.flush()
        self.assertEqual(r[0]["y@peer.test"].code, 250)
