"""
Tests for local delivery over LMTP (twisted_mta/delivery/lmtp.py) and the
router that picks each local domain's target (delivery/routing.py): the
client against scripted servers on StringTransport, on the fake clock.
"""

from __future__ import annotations

import os

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import LineOnlyReceiver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_mta.delivery.lmtp import LMTPClient, LMTPDelivery, LMTPJob, LMTPTimeouts
from twisted_mta.delivery.local import MaildirDelivery
from twisted_mta.delivery.routing import CRASHED, LocalRouter, make_local_target
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory
from twisted_mta.model import DeliveryRequest, Envelope, MessageGone, Recipient
from twisted_mta.outbound.message import OutgoingMessage, stuff
from tests.support import make_config

A, B, C = "alice@example.test", "bob@example.test", "carol@example.test"
BODY = b"Subject: hi\r\n\r\n.leading dot\r\nbody\r\n"
PEER = "LMTP server unix:/run/lmtp"
CAPS = b"250-lmtp.example.test\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"


def sync(f, *args, **kw):
    return defer.maybeDeferred(f, *args, **kw)


class Session:
    """
    One LMTPClient on a StringTransport with a clock: C{server} feeds it
    replies, C{sent} is what it wrote since the last look.
    """

    def __init__(self, recipients=((A, A), (B, B), (C, C)), sender="s@remote.test",
                 data=BODY, eight_bit=False, timeouts=LMTPTimeouts(command=30, data=60),
                 smtputf8=False):
        message = OutgoingMessage(path="/nonexistent", offset=0, size=len(data),
                                  eight_bit=eight_bit, data=stuff(data))
        self.clock = Clock()
        self.client = LMTPClient(LMTPJob(sender, tuple(recipients), message, smtputf8), PEER,
                                 self.clock, timeouts, "mx.example.test", sync)
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)
        self.results = None
        self.client.done.addCallback(self._done)

    def _done(self, results):
        self.results = results

    def server(self, data: bytes) -> None:
        self.client.dataReceived(data)

    def sent(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def codes(self) -> dict[str, tuple[int, str]]:
        return {a: (o.code, o.enhanced) for a, o in self.results.items()}


class ClientTests(SynchronousTestCase):
    def test_pipelined_mixed_replies(self):
        """RCPT replies 250/452/250 and after the dot 250 and 550: each recipient keeps its own reply (RFC 2033 4.2), in RCPT order; the commands are pipelined and QUIT ends the session."""
        s = Session()
        s.server(b"220 lmtp ready\r\n")
        self.assertEqual(s.sent(), b"LHLO mx.example.test\r\n")
        s.server(CAPS + b"250 PIPELINING\r\n")
        self.assertEqual(s.sent(), b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<" + A.encode()
                         + b">\r\nRCPT TO:<" + B.encode() + b">\r\nRCPT TO:<" + C.encode()
                         + b">\r\nDATA\r\n")
        s.server(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n452 4.2.2 <bob> over quota\r\n"
                 b"250 2.1.5 OK\r\n354 go\r\n")
        self.assertEqual(s.sent(), b"Subject: hi\r\n\r\n..leading dot\r\nbody\r\n.\r\n")
        self.assertIsNone(s.results)
        s.server(b"250 2.0.0 <alice> Saved\r\n")
        self.assertIsNone(s.results, "fired before every accepted recipient had its reply")
        s.server(b"550 5.1.1 <carol> gone\r\n")
        self.assertEqual(s.codes(), {A: (250, "2.0.0"), B: (452, "4.2.2"), C: (550, "5.1.1")})
        self.assertEqual(s.sent(), b"QUIT\r\n")
        self.assertIn("in reply to end of data", s.results[C].text)
        self.assertIn("in reply to RCPT TO:<bob@example.test>", s.results[B].text)
        self.assertEqual(s.results[A].kind, "reply")
        s.server(b"221 bye\r\n")
        self.assertTrue(s.transport.disconnecting)

    def test_lock_step_without_pipelining(self):
        """Without PIPELINING each command waits for the reply before it; a 5xx to RCPT leaves that recipient out of DATA's replies."""
        s = Session(recipients=((A, "alice"), (B, "bob")), eight_bit=True)
        s.server(b"220 ready\r\n")
        s.sent()
        s.server(b"250-lmtp\r\n250 8BITMIME\r\n")
        self.assertEqual(s.sent(), b"MAIL FROM:<s@remote.test> BODY=8BITMIME\r\n")
        s.server(b"250 ok\r\n")
        self.assertEqual(s.sent(), b"RCPT TO:<alice>\r\n")
        s.server(b"550 5.1.1 no such user\r\n")
        self.assertEqual(s.sent(), b"RCPT TO:<bob>\r\n")
        s.server(b"250 ok\r\n")
        self.assertEqual(s.sent(), b"DATA\r\n")
        s.server(b"354 go\r\n")
        s.sent()
        s.server(b"250-2.0.0 <bob> saved\r\n250 2.0.0 in INBOX\r\n")  # multi-line
        self.assertEqual(s.codes(), {A: (550, "5.1.1"), B: (250, "2.0.0")})
        self.assertIn("saved in INBOX", s.results[B].text)

    def test_no_recipient_accepted_sends_no_data(self):
        """Lock-step: every RCPT refused means no DATA; the session quits."""
        s = Session(recipients=((A, A),))
        s.server(b"220 ready\r\n250 lmtp\r\n250 ok\r\n")
        s.sent()
        s.server(b"550 5.1.1 unknown\r\n")
        self.assertEqual(s.sent(), b"QUIT\r\n")
        self.assertEqual(s.codes(), {A: (550, "5.1.1")})

    def test_server_closes_after_some_replies(self):
        """The server closing after the dot: a recipient answered 250 stays delivered (never sent again), the unanswered ones are deferred with 4.4.2."""
        s = Session()
        s.server(b"220 ready\r\n" + CAPS + b"250 PIPELINING\r\n")
        s.server(b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.server(b"250 2.0.0 <alice> saved\r\n")
        s.client.connectionLost(error.ConnectionDone())
        self.assertEqual(s.codes(), {A: (250, "2.0.0"), B: (451, "4.4.2"), C: (451, "4.4.2")})
        self.assertEqual(s.results[B].kind, "connection-lost")
        self.assertIn("the end of data", s.results[B].text)

    def test_server_closes_before_greeting(self):
        """Closed at once: everyone deferred, nothing delivered."""
        s = Session()
        s.client.connectionLost(error.ConnectionDone())
        self.assertEqual({a: o.code for a, o in s.results.items()}, {A: 451, B: 451, C: 451})

    def test_greeting_timeout(self):
        """No greeting within command_timeout: all deferred (4.4.2 timeout), connection aborted; not a moment before."""
        s = Session()
        s.clock.advance(29.9)
        self.assertIsNone(s.results)
        s.clock.advance(0.2)
        self.assertEqual(s.codes(), {A: (451, "4.4.2"), B: (451, "4.4.2"), C: (451, "4.4.2")})
        self.assertEqual(s.results[A].kind, "timeout")
        self.assertTrue(s.transport.disconnected)

    def test_end_of_data_waits_data_timeout(self):
        """After the dot the replies get data_timeout (60), renewed by each reply; then the unanswered are deferred."""
        s = Session()
        s.server(b"220 ready\r\n" + CAPS + b"250 PIPELINING\r\n")
        s.server(b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        s.clock.advance(59)
        s.server(b"250 2.0.0 saved\r\n")
        s.clock.advance(59)
        self.assertIsNone(s.results)
        s.clock.advance(2)
        self.assertEqual(s.codes(), {A: (250, "2.0.0"), B: (451, "4.4.2"), C: (451, "4.4.2")})
        self.assertEqual(s.clock.getDelayedCalls(), [])

    def test_refused_greeting_defers(self):
        """A 554 greeting (our own mail store misbehaving) defers everyone rather than bouncing."""
        s = Session()
        s.server(b"554 5.3.2 not now\r\n")
        self.assertEqual(s.codes(), {A: (451, "4.3.0"), B: (451, "4.3.0"), C: (451, "4.3.0")})
        self.assertIn("554 5.3.2 not now (in reply to the greeting)", s.results[A].text)
        self.assertEqual(s.results[A].kind, "lmtp-refused")

    def test_mail_refused_pipelined(self):
        """MAIL 550: every recipient fails with that reply, whatever RCPT and DATA got."""
        s = Session()
        s.server(b"220 ready\r\n" + CAPS + b"250 PIPELINING\r\n")
        s.sent()
        s.server(b"550 5.7.1 sender refused\r\n503 5.5.1 MAIL first\r\n503 5.5.1 MAIL first"
                 b"\r\n503 5.5.1 MAIL first\r\n503 5.5.1 No valid recipients\r\n")
        self.assertEqual(s.codes(), {A: (550, "5.7.1"), B: (550, "5.7.1"), C: (550, "5.7.1")})
        self.assertEqual(s.sent(), b"QUIT\r\n")

    def test_data_refused(self):
        """DATA 451: the accepted recipients get it; the refused keep their RCPT reply."""
        s = Session()
        s.server(b"220 ready\r\n" + CAPS + b"250 PIPELINING\r\n")
        s.server(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 ok\r\n451 4.3.0 try later\r\n")
        self.assertEqual(s.codes(), {A: (451, "4.3.0"), B: (550, "5.1.1"), C: (451, "4.3.0")})

    def test_garbage_reply(self):
        """A line that is no reply ends the session: everyone without an answer deferred (4.5.0)."""
        s = Session()
        s.server(b"hello there\r\n")
        self.assertEqual(s.codes(), {A: (451, "4.5.0"), B: (451, "4.5.0"), C: (451, "4.5.0")})
        self.assertTrue(s.transport.disconnected)

    def test_null_sender_and_dot_stuffing(self):
        """A bounce goes as MAIL FROM:<>; a lone dot line and a dot-first message are stuffed, the message ends with CRLF.CRLF even without a final CRLF."""
        s = Session(recipients=((A, A),), sender="", data=b".\r\nx\r\n..y")
        s.server(b"220 ready\r\n" + CAPS + b"250 PIPELINING\r\n")
        self.assertTrue(s.sent().startswith(b"LHLO mx.example.test\r\nMAIL FROM:<>\r\n"))
        s.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(s.sent(), b"..\r\nx\r\n...y\r\n.\r\n")


    def test_slow_message_read_gets_data_timeout(self):
        """A large message whose chunks come slowly from the I/O pool: the data_timeout (60) holds while it is sent, not the command_timeout (30); then everyone is deferred."""
        from twisted_mta.outbound import message as outgoing
        base = self.mktemp()
        os.makedirs(base)
        path = os.path.join(base, "queued")
        env = Envelope(queue_id="Q1", sender="s@remote.test", arrival=1.0,
                       recipients=(Recipient(A),))
        with open(path, "wb") as f:
            f.write(env.to_header() + b"Subject: big\r\n\r\n" + (b"x" * 78 + b"\r\n") * 20000)
        message = outgoing.load(path, None)
        self.assertIsNone(message.stuffed())
        pending = []
        clock = Clock()
        client = LMTPClient(LMTPJob("s@remote.test", ((A, A),), message), PEER, clock,
                            LMTPTimeouts(command=30, data=60), "mx.example.test",
                            lambda f, *a: pending.append(f) or defer.Deferred())
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(CAPS.replace(b"250-lmtp", b"220 ready\r\n250-lmtp")
                            + b"250 PIPELINING\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertEqual(len(pending), 1, "the first chunk was not asked for")
        results = []
        client.done.addCallback(results.append)
        clock.advance(59)
        self.assertEqual(results, [])
        clock.advance(2)
        [outcome] = results[0].values()
        self.assertEqual((outcome.kind, outcome.code), ("timeout", 451))
        self.assertIn("the message", outcome.text)

    def test_smtputf8_when_offered(self):
        """A message received with SMTPUTF8 goes with it to a server that offers it, UTF-8 addresses as they are."""
        u = "jürgen@example.test"
        s = Session(recipients=((u, u),), sender="pelé@remote.test", smtputf8=True)
        s.server(b"220 ready\r\n250-lmtp\r\n250-SMTPUTF8\r\n250 PIPELINING\r\n")
        self.assertIn("MAIL FROM:<pelé@remote.test> SMTPUTF8\r\nRCPT TO:<jürgen@example.test>"
                      "\r\n".encode(), s.sent())

    def test_utf8_addresses_without_smtputf8(self):
        """Dovecot 2.3 offers no SMTPUTF8: a UTF-8 local part of a recipient fails with 5.6.7 without being sent (the others go), a UTF-8 sender domain goes as its A-label, a UTF-8 sender local part fails everyone (RFC 6531 3.2)."""
        u = "jürgen@example.test"
        s = Session(recipients=((u, u), (A, A)), sender="s@bücher.example", smtputf8=True)
        s.server(b"220 ready\r\n250-lmtp\r\n250 PIPELINING\r\n")
        self.assertIn(b"MAIL FROM:<s@xn--bcher-kva.example>\r\nRCPT TO:<" + A.encode()
                      + b">\r\nDATA\r\n", s.sent())
        s.server(b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 saved\r\n")
        self.assertEqual(s.codes(), {u: (553, "5.6.7"), A: (250, "2.0.0")})
        self.assertIn("no SMTPUTF8", s.results[u].text)
        s = Session(recipients=((A, A),), sender="pelé@remote.test", smtputf8=True)
        s.server(b"220 ready\r\n250-lmtp\r\n250 PIPELINING\r\n")
        self.assertEqual(s.codes(), {A: (553, "5.6.7")})
        self.assertIn("the sender <pelé@remote.test>", s.results[A].text)
        self.assertNotIn(b"MAIL", s.sent())


# -- the target ------------------------------------------------------------------


class FakeServer:
    """
    A scripted LMTP server: every client the target connects gets a
    StringTransport and the replies the test gives.
    """

    def __init__(self, refuse: Exception | None = None) -> None:
        self.refuse = refuse
        self.clients: list[tuple[LMTPClient, StringTransport]] = []

    def connect(self, client: LMTPClient) -> defer.Deferred:
        if self.refuse is not None:
            return defer.fail(self.refuse)
        transport = StringTransport()
        client.makeConnection(transport)
        self.clients.append((client, transport))
        return defer.succeed(client)


class TargetTests(SynchronousTestCase):
    def setUp(self):
        self.base = self.mktemp()
        self.config = make_config(self.base, local={
            "lmtp": {"address": "unix:/run/lmtp", "recipient": "{user}"}})
        self.path = os.path.join(self.base, "queued")
        self.env = Envelope(queue_id="Q1", sender="s@remote.test", arrival=1.0,
                            recipients=(Recipient("alice@example.test"),
                                        Recipient("bob@example.org"),
                                        Recipient("zed@example.test")))
        with open(self.path, "wb") as f:
            f.write(self.env.to_header() + BODY)
        self.clock = Clock()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def target(self, server: FakeServer, recipient: str = "{user}") -> LMTPDelivery:
        return LMTPDelivery(LocalDirectory(self.config.local), "unix:/run/lmtp", recipient,
                            self.config.local.lmtp, "mx.example.test", self.clock, sync,
                            connect=server.connect)

    def request(self, indexes=(0, 1, 2)) -> DeliveryRequest:
        return DeliveryRequest(envelope=self.env, path=self.path, indexes=indexes, now=2.0)

    def test_delivers_with_the_user_name(self):
        """recipient = "{user}" names the user alone at RCPT; an address unknown to our configuration fails with 5.1.1 without asking the server; the outcome of each comes back by its queue address."""
        server = FakeServer()
        d = self.target(server).deliver(self.request())
        [(client, transport)] = server.clients
        client.dataReceived(b"220 ready\r\n250-lmtp\r\n250 PIPELINING\r\n")
        self.assertIn(b"RCPT TO:<alice>\r\nRCPT TO:<bob>\r\nDATA\r\n", transport.value())
        self.assertNotIn(b"zed", transport.value())
        client.dataReceived(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 ok\r\n"
                            b"452 4.2.2 quota\r\n")
        self.assertIn(b"Subject: hi\r\n", transport.value())
        self.assertNotIn(b"X-Twisted-MTA-Envelope", transport.value())
        results = self.successResultOf(d)
        self.assertEqual({a: o.code for a, o in results.items()},
                         {"alice@example.test": 250, "bob@example.org": 452,
                          "zed@example.test": 550})
        self.assertEqual(results["zed@example.test"].kind, "no-such-mailbox")
        self.assertIsNone(results["alice@example.test"].remote_mta)  # a Unix socket

    def test_full_address_by_default(self):
        """The default recipient template gives user@domain (the user as configured)."""
        server = FakeServer()
        self.target(server, "{user}@{domain}").deliver(self.request((0,)))
        [(client, transport)] = server.clients
        client.dataReceived(b"220 ready\r\n250 lmtp\r\n250 ok\r\n")
        self.assertIn(b"RCPT TO:<alice@example.test>\r\n", transport.value())

    def test_connection_refused_defers_everyone(self):
        """No server (socket missing, refused): every recipient deferred 4.4.1 with the reason in words, logged once as lmtp.failed."""
        err = error.ConnectError(osError=2, string="")
        d = self.target(FakeServer(refuse=err)).deliver(self.request((0, 1)))
        results = self.successResultOf(d)
        self.assertEqual({o.enhanced for o in results.values()}, {"4.4.1"})
        self.assertIn("connect to LMTP server unix:/run/lmtp failed: No such file or directory",
                      results["alice@example.test"].text)
        [event] = [e for e in self.events if e.get("event") == "lmtp.failed"]
        self.assertEqual(event["count"], 2)
        self.assertEqual(event["server"], "unix:/run/lmtp")

    def test_connector(self):
        """unix: connects to the socket path, tcp: to the address and port, with connect_timeout."""
        from twisted.internet.testing import MemoryReactorClock

        from twisted_mta.delivery.lmtp import lmtp_connector
        reactor = MemoryReactorClock()
        client = Session().client
        lmtp_connector(reactor, "unix:/run/dovecot/lmtp", 7)(client)
        lmtp_connector(reactor, "tcp:127.0.0.1:24", 8)(client)
        lmtp_connector(reactor, "tcp:[::1]:2424", 9)(client)
        self.assertEqual([(c[0], c[2]) for c in reactor.unixClients], [("/run/dovecot/lmtp", 7)])
        self.assertEqual([(c[0], c[1], c[3]) for c in reactor.tcpClients],
                         [("127.0.0.1", 24, 8), ("::1", 2424, 9)])

    def test_message_gone(self):
        """A vanished queue file is MessageGone, as for the Maildir target."""
        os.remove(self.path)
        self.failureResultOf(self.target(FakeServer()).deliver(self.request()), MessageGone)


# -- the router --------------------------------------------------------------------


@implementer(IDeliveryTarget)
class Recording:
    def __init__(self, name, outcome=None, raises=None):
        self.name = name
        self.outcome = outcome
        self.raises = raises
        self.requests = []
        self.flushed = self.stopped = 0

    def deliver(self, request):
        self.requests.append(request)
        if self.raises is not None:
            raise self.raises
        return defer.succeed({r.address: self.outcome for r in request.recipients})

    def flush(self):
        self.flushed += 1

    def stop(self):
        self.stopped += 1


class RouterTests(SynchronousTestCase):
    env = Envelope(queue_id="Q1", sender="s@remote.test", arrival=1.0,
                   recipients=(Recipient("a@maildir.test"), Recipient("b@lmtp.test"),
                               Recipient("c@Maildir.test"), Recipient("d@LMTP.test")))

    def request(self):
        return DeliveryRequest(envelope=self.env, path="/q", indexes=(0, 1, 2, 3), now=2.0)

    def test_splits_by_domain(self):
        """Each domain's recipients go to its target (domains matched case-insensitively), with their envelope positions; the results are merged."""
        from twisted_mta.delivery.maildir import DELIVERED
        maildir, lmtp = Recording("local", DELIVERED), Recording("lmtp", CRASHED)
        router = LocalRouter(maildir, {"lmtp.test": lmtp})
        results = self.successResultOf(router.deliver(self.request()))
        self.assertEqual([r.indexes for r in maildir.requests], [(0, 2)])
        self.assertEqual([r.indexes for r in lmtp.requests], [(1, 3)])
        self.assertEqual(results, {"a@maildir.test": DELIVERED, "c@Maildir.test": DELIVERED,
                                   "b@lmtp.test": CRASHED, "d@LMTP.test": CRASHED})
        router.flush()
        router.stop()
        self.assertEqual((maildir.flushed, lmtp.flushed, maildir.stopped, lmtp.stopped),
                         (1, 1, 1, 1))

    def test_a_crashing_part_defers_only_its_own(self):
        """A target that raises defers its own recipients (logged once); the other part's results stand."""
        from twisted_mta.delivery.maildir import DELIVERED
        maildir, lmtp = Recording("local", DELIVERED), Recording("lmtp", raises=KeyError("x"))
        results = self.successResultOf(LocalRouter(maildir, {"lmtp.test": lmtp})
                                       .deliver(self.request()))
        self.assertEqual(results["a@maildir.test"], DELIVERED)
        self.assertEqual(results["b@lmtp.test"], CRASHED)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_message_gone_wins(self):
        from twisted_mta.delivery.maildir import DELIVERED
        maildir, lmtp = Recording("local", DELIVERED), Recording("lmtp", raises=MessageGone("x"))
        self.failureResultOf(LocalRouter(maildir, {"lmtp.test": lmtp}).deliver(self.request()),
                             MessageGone)

    def test_targets_provide_the_interface(self):
        """Both new targets satisfy IDeliveryTarget (the manager's Targets checks providedBy)."""
        from zope.interface.verify import verifyObject
        config = make_config(self.mktemp(), local={"lmtp": {"address": "unix:/run/l"}})
        lmtp = LMTPDelivery(LocalDirectory(config.local), "unix:/run/l", "{user}",
                            config.local.lmtp, "mx", Clock(), sync, connect=FakeServer().connect)
        self.assertTrue(verifyObject(IDeliveryTarget, lmtp))
        self.assertTrue(verifyObject(IDeliveryTarget, LocalRouter(lmtp, {})))

    def test_make_local_target(self):
        """Maildir everywhere (the default) is the Maildir target alone; a route makes a router whose LMTP domains share one target per server and recipient form."""
        base = self.mktemp()
        plain = make_config(base)
        self.assertIsInstance(make_local_target(plain.local, "mx", Clock(), sync),
                              MaildirDelivery)
        config = make_config(base, local={"lmtp": {"address": "tcp:127.0.0.1:24"},
                                          "routes": {"example.org": {"delivery": "lmtp"}}})
        router = make_local_target(config.local, "mx", Clock(), sync)
        self.assertIsInstance(router, LocalRouter)
        self.assertIsInstance(router.target_for("a@example.test"), MaildirDelivery)
        idn = make_local_target(make_config(base, local={
            "domains": ["example.test", "xn--fsqu00a.test"],
            "lmtp": {"address": "tcp:127.0.0.1:24"},
            "routes": {"xn--fsqu00a.test": {"delivery": "lmtp"}}}).local, "mx", Clock(), sync)
        # SMTPUTF8: a recipient in the U-label form takes its A-label's route.
        self.assertIsInstance(idn.target_for("用户@例子.test"), LMTPDelivery)
        self.assertIsInstance(idn.target_for("a@example.test"), MaildirDelivery)
        lmtp = router.target_for("a@EXAMPLE.org")
        self.assertIsInstance(lmtp, LMTPDelivery)
        self.assertEqual((lmtp.address, lmtp.recipient, lmtp.remote_mta),
                         ("tcp:127.0.0.1:24", "{user}@{domain}", "127.0.0.1"))
        everything = make_config(base, local={"delivery": "lmtp",
                                              "lmtp": {"address": "unix:/run/l"}})
        router = make_local_target(everything.local, "mx", Clock(), sync)
        self.assertIs(router.target_for("a@example.test"), router.target_for("b@example.org"))
        self.assertIsInstance(router.target_for("a@example.org"), LMTPDelivery)


# -- over an in-memory connection (iosim) ----------------------------------------


class TinyLMTPServer(LineOnlyReceiver):
    """
    Just enough of an LMTP server (RFC 2033) to talk to: replies from
    C{answers} (address -> code after the dot), the message kept unstuffed.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, answers: dict[bytes, int]) -> None:
        self.answers = answers
        self.rcpts: list[bytes] = []
        self.lines: list[bytes] | None = None
        self.message: bytes | None = None

    def connectionMade(self):
        self.sendLine(b"220 tiny LMTP")

    def lineReceived(self, line):
        if self.lines is not None:
            if line == b".":
                self.message = b"".join(x + b"\r\n" for x in self.lines)
                self.lines = None
                for rcpt in self.rcpts:
                    code = self.answers.get(rcpt, 250)
                    self.sendLine(b"%d %s <%s>" % (code, b"2.0.0 saved" if code == 250
                                                   else b"4.2.2 full", rcpt))
                return
            self.lines.append(line[1:] if line.startswith(b".") else line)
            return
        verb = line[:4].upper()
        if verb == b"LHLO":
            # Split across two writes: the client must join a reply's lines.
            self.transport.write(b"250-tiny\r\n250-PIPE")
            self.transport.write(b"LINING\r\n250 8BITMIME\r\n")
        elif verb == b"MAIL":
            self.sendLine(b"250 2.1.0 ok")
        elif verb == b"RCPT":
            self.rcpts.append(line[9:-1])
            self.sendLine(b"250 2.1.5 ok")
        elif verb == b"DATA":
            self.lines = []
            self.sendLine(b"354 go ahead")
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()


class InMemoryConnectionTests(SynchronousTestCase):
    def test_large_message_streamed_and_answered_per_recipient(self):
        """A 2.5 MiB message (sent from the file in chunks, not from memory) with dot lines at chunk boundaries arrives byte for byte; each recipient gets its own reply, over a connection pumped by iosim."""
        from twisted.test import iosim

        from twisted_mta.outbound import message as outgoing
        base = self.mktemp()
        os.makedirs(base)
        path = os.path.join(base, "queued")
        env = Envelope(queue_id="Q1", sender="s@remote.test", arrival=1.0,
                       recipients=(Recipient(A), Recipient(B)))
        line = b"." + b"x" * 1021 + b"\r\n"  # 1 KiB lines, each starting with a dot
        head = b"Subject: " + b"b" * (1024 - 13) + b"\r\n\r\n"  # 1 KiB: a line starts
        body = head + line * 2560  # at each 1 MiB chunk boundary of outbound.message
        with open(path, "wb") as f:
            f.write(env.to_header() + body)
        message = outgoing.load(path, None)
        self.assertIsNone(message.stuffed(), "the message was not too big for memory")
        clock = Clock()
        client = LMTPClient(LMTPJob("s@remote.test", ((A, A), (B, B)), message), PEER, clock,
                            LMTPTimeouts(), "mx.example.test", sync)
        server = TinyLMTPServer({B.encode(): 452})
        pump = iosim.connect(server, iosim.makeFakeServer(server),
                             client, iosim.makeFakeClient(client))
        pump.flush()
        results = self.successResultOf(client.done)
        self.assertEqual({a: o.code for a, o in results.items()}, {A: 250, B: 452})
        self.assertEqual(server.message, body)
        self.assertEqual(clock.getDelayedCalls(), [])
