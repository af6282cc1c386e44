"""
F11: no connection holds a slot for ever.  The time limits of a message's
data ([limits] data_time, min_data_rate after data_rate_grace) and the
stress-adaptive timeouts ([limits] stress_threshold, stress_timeout), on a
fake clock and a StringTransport; and the new [limits] keys.
"""

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support import ServerHarness, make_config
from twisted_mta.config import ConfigError

SLOW = ["421 4.4.2 Message data arriving too slowly, closing connection"]
TOO_LONG = ["421 4.4.2 Time limit for message data exceeded, closing connection"]
IDLE = ["421 4.4.2 Timeout exceeded, closing connection"]


class LogTestCase(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, name, *fields):
        return [tuple(e.get(f) for f in fields) for e in self.events if e.get("event") == name]


class DataTimeLimitTests(LogTestCase):
    def trickle(self, h, seconds, every=5.0, chunk=b"x"):
        """
        Send C{chunk} every C{every} seconds for C{seconds}; the replies.
        """
        lines = []
        t = 0.0
        while t + every <= seconds + 1e-9:
            h.clock.advance(every)
            t += every
            lines += h.send(chunk)
        return lines

    def test_trickle_cut_after_grace(self):
        """One byte every 5 s after 354 (which data_timeout alone never cut): with the defaults, cut once the 60 s grace and the credit its octets bought (1 s per 500) are used up: 421 4.4.2, nothing queued."""
        h = ServerHarness(self)
        h.start_transaction()
        self.assertEqual(self.trickle(h, 55), [])
        self.assertFalse(h.transport.disconnecting)
        lines = self.trickle(h, 10)
        self.assertEqual(lines, SLOW)
        self.assertTrue(h.transport.disconnecting)
        h.protocol.connectionLost(None)
        self.assertEqual((h.queued, h.spool_entries()), ([], []))
        [(limit, phase, octets, seconds)] = self.logged("inbound.timeout", "limit", "phase",
                                                        "octets", "seconds")
        self.assertEqual((limit, phase, octets), ("data-rate", "data", 12))
        self.assertTrue(60 + 12 / 500 <= seconds <= 65, seconds)  # the fake clock jumps 5 s

    def test_idle_after_354_cut_at_grace(self):
        """Nothing at all after 354: cut at the grace (60 s), before data_timeout (600 s)."""
        h = ServerHarness(self)
        h.start_transaction()
        h.clock.advance(59.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.2)
        self.assertEqual(h.read(), SLOW)

    def test_steady_sender_above_the_rate_not_cut(self):
        """A large message at 600 octets/s for 5 minutes (past grace and data_timeout's length of silence, never silent) is stored."""
        h = ServerHarness(self)
        h.start_transaction()
        h.send(b"Subject: big\r\n\r\n")
        line = b"y" * 598 + b"\r\n"
        for _ in range(300):
            h.clock.advance(1)
            self.assertEqual(h.send(line), [])
        self.assertEqual(h.send(b".\r\n")[0][:3], "250")
        self.assertEqual(self.logged("inbound.timeout", "limit"), [])

    def test_data_time_caps_a_fast_enough_sender(self):
        """A sender above the rate is still cut at data_time after the 354."""
        h = ServerHarness(self, limits={"data_time": "2m"})
        h.start_transaction()
        line = b"z" * 998 + b"\r\n"  # 1000 octets/s
        self.assertEqual(self.trickle(h, 119, every=1, chunk=line), [])
        self.assertFalse(h.transport.disconnecting)
        lines = self.trickle(h, 2, every=1, chunk=line)
        self.assertEqual(lines, TOO_LONG)
        self.assertEqual(self.logged("inbound.timeout", "limit", "phase"),
                         [("data-time", "data")])

    def test_rate_off(self):
        """min_data_rate = 0: the trickle lives until data_time."""
        h = ServerHarness(self, limits={"min_data_rate": 0, "data_time": "10m"})
        h.start_transaction()
        self.assertEqual(self.trickle(h, 595), [])
        self.assertEqual(self.trickle(h, 10), TOO_LONG)

    def test_grace_and_rate_configurable(self):
        """data_rate_grace and min_data_rate: 10 s free, then 1 s per 10 octets."""
        h = ServerHarness(self, limits={"data_rate_grace": 10, "min_data_rate": 10})
        h.start_transaction()
        # 10 octets/s for 20 s: 200 octets, 20 s of credit beyond the grace
        self.assertEqual(self.trickle(h, 20, every=1, chunk=b"a" * 10), [])
        h.clock.advance(9.9)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(0.2)
        self.assertEqual(h.read(), SLOW)

    def test_no_timer_per_octet(self):
        """Octets move no deadline timer: the session keeps at most its idle timer and one DATA deadline however fast octets come."""
        h = ServerHarness(self)
        h.start_transaction()
        for _ in range(1000):
            h.send(b"x")
            h.clock.advance(0.01)
        self.assertLessEqual(len(h.clock.getDelayedCalls()), 2)

    def test_clock_stops_after_the_dot(self):
        """After the final dot the DATA deadline is gone; the next message has its own."""
        h = ServerHarness(self)
        h.start_transaction()
        self.assertEqual(h.send(b"Subject: x\r\n\r\nx\r\n.\r\n")[0][:3], "250")
        self.assertEqual(len(h.clock.getDelayedCalls()), 1)  # the command timeout
        h.clock.advance(200)
        self.assertFalse(h.transport.disconnecting)
        h.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        h.clock.advance(59)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(2)
        self.assertEqual(h.read(), SLOW)

    def test_commit_wait_is_not_timed(self):
        """While the spool commits (our wait, not the client's) no timeout runs, even a stress one; the countdown starts again after the reply."""
        h = ServerHarness(self, limits={"command_timeout": 30})
        pending = defer.Deferred()
        new_message = h.spool.new_message

        def slow():
            writer = new_message()
            real_commit = writer.commit

            def commit(envelope):
                d = real_commit(envelope)
                d.addCallback(lambda result: pending.addCallback(lambda _: result))
                return d
            writer.commit = commit
            return writer
        h.spool.new_message = slow
        h.start_transaction()
        self.assertEqual(h.send(b"Subject: x\r\n\r\nx\r\n.\r\n"), [])
        h.clock.advance(600)
        self.assertFalse(h.transport.disconnecting)
        pending.callback(None)
        self.assertEqual(h.read()[0][:3], "250")
        h.clock.advance(29)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(2)
        self.assertEqual(h.read(), IDLE)


class StressTests(LogTestCase):
    """
    A listener with 10 connections allowed and stress_threshold 0.8 comes
    under stress at 8 in use.
    """

    limits = {"connections": 10, "connections_per_ip": 10}

    def harness(self, **limits):
        h = ServerHarness(self, limits={**self.limits, **limits})
        self.sessions = [(h.protocol, h.transport)]
        return h

    def open(self, h, n):
        for _ in range(n):
            p, t = h.connect()
            self.assertEqual(h.read(t)[0][:3], "220")
            self.sessions.append((p, t))

    def closed(self):
        return [t.disconnecting for _, t in self.sessions]

    def test_running_sessions_cut_when_stress_begins(self):
        """Seven idle sessions keep their 300 s; the eighth puts the listener under stress and every session, the old ones too, is cut 10 s later (logged once)."""
        h = self.harness()
        self.open(h, 6)
        h.clock.advance(100)
        self.assertFalse(h.factory.stressed)
        self.open(h, 1)
        self.assertTrue(h.factory.stressed)
        self.assertEqual(self.logged("inbound.stress", "role", "count", "limit", "timeout"),
                         [("mx", 8, 10, 10)])
        h.clock.advance(9.9)
        self.assertEqual(self.closed(), [False] * 8)
        h.clock.advance(0.2)
        self.assertEqual(self.closed(), [True] * 8)
        self.assertEqual(h.read(self.sessions[0][1]), IDLE)
        self.assertEqual(set(self.logged("inbound.timeout", "limit", "phase", "stress")),
                         {("idle", "command", True)})

    def test_new_session_under_stress_gets_the_short_timeout(self):
        """A session that starts under stress has 10 s between commands; its commands still reset the countdown."""
        h = self.harness()
        self.open(h, 7)
        p, t = self.sessions[-1]
        for _ in range(5):
            h.clock.advance(8)
            p.dataReceived(b"EHLO client.example\r\n")
        self.assertFalse(t.disconnecting)
        h.clock.advance(10.1)
        self.assertTrue(t.disconnecting)

    def test_shorter_countdown_not_lengthened(self):
        """A session with less than stress_timeout left keeps what it had."""
        h = self.harness(command_timeout=30)
        self.open(h, 6)
        h.clock.advance(27)
        self.open(h, 1)  # stress: the first seven have 3 s left, the eighth 10 s
        h.clock.advance(3.1)
        self.assertEqual(self.closed(), [True] * 7 + [False])

    def test_data_under_stress(self):
        """Under stress a session in DATA gets the short idle timeout and the short grace: a trickle 30 s into its data is cut at once."""
        h = self.harness()
        h.start_transaction()
        for _ in range(6):
            h.clock.advance(5)
            h.send(b"x")
        self.open(h, 7)  # stress: the grace is 10 s, 30 s have passed
        h.clock.advance(0)
        self.assertEqual(h.read(), SLOW)
        self.assertEqual(self.logged("inbound.timeout", "limit", "stress"),
                         [("data-rate", True)])

    def test_noop_every_few_seconds_cut_under_stress(self):
        """A client that holds its slot with a NOOP every 5 s (which resets any idle countdown) is cut under stress at its second junk command, as Postfix's ${stress?1} junk-command and error limits do; without stress it gets [limits] junk_commands of them, then each counts as an error."""
        h = self.harness()
        self.open(h, 7)
        p, t = self.sessions[-1]
        h.read(t)
        p.dataReceived(b"NOOP\r\n")
        self.assertFalse(t.disconnecting)
        h.clock.advance(5)
        p.dataReceived(b"NOOP\r\n")
        self.assertTrue(t.disconnecting)
        self.assertEqual(h.read(t)[-1][:3], "421")
        self.assertEqual(self.logged("inbound.error-limit", "stress"), [(True,)])

    def test_junk_commands_count_as_errors_past_the_limit(self):
        """Without stress: 100 NOOP/VRFY/RSET/HELP are free, then each one counts towards [limits] errors (20): the 120th ends the session with 421."""
        h = self.harness()
        p, t = self.sessions[0]
        for i in range(119):
            h.clock.advance(5)
            p.dataReceived(b"NOOP\r\n" if i % 2 else b"RSET\r\n")
        self.assertFalse(t.disconnecting)
        p.dataReceived(b"HELP\r\n")
        self.assertTrue(t.disconnecting)

    def test_stress_ends_below_ninety_percent(self):
        """Stress ends when fewer than 90% of the threshold are in use (here: below 7); sessions then get the normal timeouts again at their next command."""
        h = self.harness()
        self.open(h, 7)
        self.assertTrue(h.factory.stressed)
        self.sessions.pop()[0].connectionLost(None)
        self.assertEqual(h.factory.total, 7)
        self.assertTrue(h.factory.stressed)
        self.sessions.pop()[0].connectionLost(None)
        self.assertFalse(h.factory.stressed)
        self.assertEqual(self.logged("inbound.stress-end", "count"), [(6,)])
        p, t = self.sessions[0]
        p.dataReceived(b"NOOP\r\n")
        h.clock.advance(299)
        self.assertFalse(t.disconnecting)
        h.clock.advance(2)
        self.assertTrue(t.disconnecting)

    def test_stress_off(self):
        """stress_timeout = false: no stress, whatever the load."""
        h = self.harness(stress_timeout=False)
        self.open(h, 9)
        self.assertFalse(h.factory.stressed)
        h.clock.advance(299)
        self.assertEqual(self.closed(), [False] * 10)
        self.assertEqual(self.logged("inbound.stress", "count"), [])

    def test_threshold(self):
        """stress_threshold 0.5: stress from 5 in use."""
        h = self.harness(stress_threshold=0.5)
        self.open(h, 3)
        self.assertFalse(h.factory.stressed)
        self.open(h, 1)
        self.assertTrue(h.factory.stressed)

    def test_refused_connections_do_not_count(self):
        """Connections refused at the limit (421) are not in use and change nothing."""
        h = self.harness()
        self.open(h, 9)
        p, t = h.connect()
        self.assertEqual(h.read(t), ["421 4.3.2 Too many connections, try again later"])
        p.connectionLost(None)
        self.assertEqual(h.factory.total, 10)


class LimitsConfigTests(SynchronousTestCase):
    def config(self, **limits):
        return make_config(self.mktemp(), limits=limits).limits

    def test_defaults(self):
        """The defaults: 30 min for a message's data, 500 octets/s after 60 s, stress at 80% of the connections with 10 s timeouts."""
        limits = self.config()
        self.assertEqual((limits.data_time, limits.min_data_rate, limits.data_rate_grace,
                          limits.stress_threshold, limits.stress_timeout,
                          limits.stress_connections),
                         (1800, 500, 60, 0.8, 10, 400))

    def test_values(self):
        limits = self.config(data_time="1h", min_data_rate=0, data_rate_grace="2m",
                             stress_threshold=1, stress_timeout="30s", connections=7)
        self.assertEqual((limits.data_time, limits.min_data_rate, limits.data_rate_grace,
                          limits.stress_threshold, limits.stress_timeout,
                          limits.stress_connections),
                         (3600, 0, 120, 1.0, 30, 7))
        self.assertIsNone(self.config(stress_timeout=False).stress_timeout)
        self.assertIsNone(self.config(stress_timeout=0).stress_timeout)
        self.assertEqual(self.config(stress_threshold=0.8, connections=7).stress_connections, 6)

    def test_shown(self):
        """config show prints stress_timeout = false when it is turned off (not left out as unset)."""
        raw = make_config(self.mktemp(), limits={"stress_timeout": False}).to_dict()
        self.assertIs(raw["limits"]["stress_timeout"], False)
        self.assertEqual(make_config(self.mktemp()).to_dict()["limits"]["stress_timeout"], 10)

    def test_errors(self):
        """Bad values name the key and say why, in one line."""
        for limits, key, words in [
            ({"stress_threshold": 0}, "limits.stress_threshold",
             "must be more than 0 and at most 1, not 0.0"),
            ({"stress_threshold": 1.5}, "limits.stress_threshold",
             "must be more than 0 and at most 1, not 1.5"),
            ({"stress_threshold": "80%"}, "limits.stress_threshold", "must be a number, not '80%'"),
            ({"min_data_rate": -1}, "limits.min_data_rate", "must be at least 0, not -1"),
            ({"min_data_rate": "500"}, "limits.min_data_rate", "must be an integer, not '500'"),
            ({"data_time": 0}, "limits.data_time", "must be a positive duration, not 0"),
            ({"data_rate_grace": "1w"}, "limits.data_rate_grace",
             "must be a duration like 30s, 5m, 4h or 5d, not '1w'"),
            ({"stress_timeout": True}, "limits.stress_timeout",
             "must be a duration, or false (or 0) to turn it off"),
        ]:
            with self.assertRaises(ConfigError) as cm:
                self.config(**limits)
            self.assertEqual((cm.exception.key, cm.exception.message), (key, words), limits)
