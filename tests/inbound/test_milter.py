"""
Milters on the inbound leg (twisted_mta.inbound.milter): an SMTP session
with the scripted test milter of tests/milter_peer.py at the other end of
an in-memory connection (iosim), a real spool on disk, a fake clock.
"""

from __future__ import annotations

import os

from twisted.internet import defer, error
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tests.milter_peer import ScriptedMilterFactory, mod
from tests.support import ServerHarness
from twisted_mta.inbound.milter import MilterConnection

MSG = b"Subject: hello\r\nFrom: <s@remote.test>\r\n\r\nbody line\r\n.\r\n"


class Milters:
    """
    The test milters by port (inet:127.0.0.1:PORT), connected through
    iosim pumps; L{flush} moves every byte waiting in either direction.
    """

    def __init__(self) -> None:
        self.factories: dict[int, ScriptedMilterFactory] = {}
        self.pumps: list[iosim.IOPump] = []
        self.servers: list = []

    def add(self, port: int, script: dict) -> ScriptedMilterFactory:
        self.factories[port] = ScriptedMilterFactory(script)
        return self.factories[port]

    def connect(self, address, timeout, clock):
        factory = self.factories.get(address.port)
        if factory is None:
            return defer.fail(error.ConnectionRefusedError("nothing listens"))
        server = factory.buildProtocol(None)
        client = MilterConnection(clock)
        pump = iosim.connect(server, iosim.FakeTransport(server, True),
                             client, iosim.FakeTransport(client, False), greet=False)
        self.pumps.append(pump)
        self.servers.append(server)
        return defer.succeed(client)

    def flush(self) -> None:
        for _ in range(10_000):
            if not any([p.pump() for p in self.pumps]):
                return


def config(*names, **overrides):
    """The [milters] table and the listener naming C{names}, ports 1, 2, ..."""
    milters = {}
    for i, name in enumerate(names, 1):
        milters[name] = {"address": f"inet:127.0.0.1:{i}", "command_timeout": "10s",
                         "content_timeout": "60s", **overrides.get(name, {})}
    return {"milters": milters,
            "listeners": [{"role": "mx", "endpoint": "tcp:0:interface=127.0.0.1",
                           "milters": list(names)}],
            "dns": {"nameservers": ["127.0.0.1:9"]}}  # (ServerHarness's default too)


class Session:
    """A harness whose every input is followed by a flush of the milter pumps."""

    def __init__(self, testcase, scripts: list[dict], overrides=None, **kw) -> None:
        self.milters = Milters()
        self.factories = [self.milters.add(i, s) for i, s in enumerate(scripts, 1)]
        names = [f"m{i}" for i in range(1, len(scripts) + 1)]
        self.h = ServerHarness(testcase, milter_connect=self.milters.connect,
                               **config(*names, **(overrides or {})), **kw)
        self.milters.flush()
        self.greeting = self.h.greeting + self.h.read()

    def say(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode()
        self.h.protocol.dataReceived(data)
        self.milters.flush()
        return self.h.read()

    def transaction(self, rcpts=("alice@example.test",), message=MSG) -> list[str]:
        self.say("EHLO client.example\r\n")
        out = self.say("MAIL FROM:<s@remote.test>\r\n")
        for r in rcpts:
            out += self.say(f"RCPT TO:<{r}>\r\n")
        out += self.say("DATA\r\n")
        return out + self.say(message)

    def queued(self) -> list[bytes]:
        return self.h.queued_messages()

    def message_of(self, raw: bytes) -> bytes:
        """The message (read_message leaves out the envelope header)."""
        self_check = raw.startswith(b"X-Twisted-MTA-Envelope")
        assert not self_check
        return raw

    def tmp_files(self) -> list[str]:
        return os.listdir(os.path.join(self.h.spool.path, "tmp"))


class PassTests(SynchronousTestCase):
    def test_every_stage_in_order_with_macros(self):
        """A milter that continues sees connect, HELO, MAIL, RCPT, DATA, the headers, EOH, body, EOM, with our macros; the message is queued unchanged."""
        s = Session(self, [{}])
        out = s.transaction()
        self.assertEqual(out[-1][:24], "250 2.0.0 Ok: queued as ")
        f = s.factories[0]
        stages = f.stages()
        self.assertEqual(stages[:6], ["optneg", "connect", "helo", "mail", "rcpt", "data"])
        self.assertEqual(stages[-3:], ["eoh", "body", "eom"])
        headers = [args for stage, args, _ in f.log if stage == "header"]
        self.assertEqual([h[0] for h in headers], [b"Received", b"Subject", b"From"])
        self.assertEqual(headers[1], (b"Subject", b"hello"))
        connect = f.log[1]
        self.assertEqual(connect[1], (b"[192.0.2.10]", b"4", 40000, b"192.0.2.10"))
        self.assertEqual(connect[2]["j"], "mx.example.test")
        self.assertEqual(connect[2]["{daemon_name}"], "mx")
        mail = f.log[3]
        self.assertEqual(mail[1], [b"<s@remote.test>"])
        body = [args for stage, args, _ in f.log if stage == "body"]
        self.assertEqual(body, [b"body line\r\n"])
        eom_macros = f.log[-1][2]
        qid = out[-1].rsplit(" ", 1)[1]
        self.assertEqual(eom_macros["i"], qid)
        self.assertEqual(f.log[0][1][0], 6)  # protocol version 6 offered
        [raw] = s.queued()
        self.assertTrue(s.message_of(raw).endswith(b"Subject: hello\r\nFrom: <s@remote.test>"
                                                   b"\r\n\r\nbody line\r\n"))
        self.assertEqual(s.tmp_files(), [])

    def test_quit_ends_the_milter_session(self):
        """QUIT from the client sends SMFIC_QUIT to the milter."""
        s = Session(self, [{}])
        s.transaction()
        self.assertEqual(s.say("QUIT\r\n"), ["221 2.0.0 Bye"])
        s.h.protocol.connectionLost(None)
        s.milters.flush()
        self.assertEqual(s.factories[0].stages()[-1], "quit")

    def test_rset_aborts_the_message(self):
        """RSET after MAIL sends SMFIC_ABORT; the next transaction goes on normally."""
        s = Session(self, [{}])
        s.say("EHLO c\r\nMAIL FROM:<s@remote.test>\r\n")
        self.assertEqual(s.say("RSET\r\n"), ["250 2.0.0 Reset state"])
        self.assertEqual(s.factories[0].stages()[-1], "abort")

    def test_large_body_in_chunks(self):
        """A body over 64 KiB goes in packets of at most 65535 octets, all of it."""
        s = Session(self, [{}])
        body = (b"x" * 998 + b"\r\n") * 200
        s.transaction(message=b"Subject: big\r\n\r\n" + body + b".\r\n")
        chunks = [args for stage, args, _ in s.factories[0].log if stage == "body"]
        self.assertTrue(all(len(c) <= 65535 for c in chunks))
        self.assertGreater(len(chunks), 1)
        self.assertEqual(b"".join(chunks), body)

    def test_no_reply_flags_honoured(self):
        """A milter that asks for no replies to headers and body (NR_HDR, NR_BODY) and no HELO still works."""
        s = Session(self, [{"optneg": (0x1FF, 0x80 | 0x80000 | 0x02)}])
        out = s.transaction()
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued"))
        self.assertNotIn("helo", s.factories[0].stages())


class RefusalTests(SynchronousTestCase):
    def test_reject_at_mail(self):
        """A reject at MAIL is a 550 5.7.1 for MAIL; nothing is queued."""
        s = Session(self, [{"mail": "reject"}])
        s.say("EHLO c\r\n")
        self.assertEqual(s.say("MAIL FROM:<s@remote.test>\r\n"),
                         ["550 5.7.1 Refused by a mail filter"])
        self.assertEqual(s.say("RCPT TO:<alice@example.test>\r\n"),
                         ["503 5.5.1 Need MAIL command first"])

    def test_tempfail_at_rcpt_refuses_that_recipient_only(self):
        """A tempfail for one RCPT refuses that RCPT with 451 4.7.1; the others get the message."""
        def per_rcpt(args):
            return "tempfail" if args[0] == b"<bob@example.test>" else "continue"
        s = Session(self, [{"rcpt": per_rcpt}])
        out = s.transaction(rcpts=("alice@example.test", "bob@example.test"))
        self.assertEqual(out[1], "250 2.1.5 Recipient ok")
        self.assertTrue(out[2].startswith("451 4.7.1 "))
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued"))
        self.assertEqual([r.address for r in s.h.queued[0].recipients], ["alice@example.test"])

    def test_replycode_at_eom(self):
        """SMFIR_REPLYCODE at end of message: its code and text go to the client; nothing is queued and tmp/ is empty."""
        s = Session(self, [{"eom": ["554 5.7.1 Looks like spam to me"]}])
        out = s.transaction()
        self.assertEqual(out[-1], "554 5.7.1 Looks like spam to me")
        self.assertEqual(s.h.queued, [])
        self.assertEqual(s.tmp_files(), [])

    def test_multiline_replycode(self):
        """A multi-line REPLYCODE is passed on line by line."""
        s = Session(self, [{"mail": "450-4.7.1 first\r\n450 4.7.1 second"}])
        s.say("EHLO c\r\n")
        self.assertEqual(s.say("MAIL FROM:<s@remote.test>\r\n"),
                         ["450-4.7.1 first", "450 4.7.1 second"])

    def test_replycode_that_is_not_a_refusal_breaks_the_protocol(self):
        """A REPLYCODE of 250 is a protocol error: the default action (tempfail) answers."""
        s = Session(self, [{"mail": "250 2.0.0 fine"}])
        s.say("EHLO c\r\n")
        out = s.say("MAIL FROM:<s@remote.test>\r\n")
        self.assertTrue(out[0].startswith("451 4.7.1 "), out)

    def test_discard(self):
        """DISCARD at end of message: 250 to the client, nothing queued."""
        s = Session(self, [{"eom": ["discard"]}])
        out = s.transaction()
        self.assertEqual(out[-1], "250 2.0.0 Ok: discarded by a mail filter")
        self.assertEqual(s.h.queued, [])
        self.assertEqual(s.tmp_files(), [])

    def test_reject_at_connect_refuses_the_session(self):
        """A reject at connect: every MAIL of the session is refused."""
        s = Session(self, [{"connect": "reject"}])
        s.say("EHLO c\r\n")
        for _ in range(2):
            out = s.say("MAIL FROM:<s@remote.test>\r\n")
            self.assertEqual(out, ["550 5.7.1 Refused by a mail filter"])


class FailureTests(SynchronousTestCase):
    def run_with(self, script, action):
        s = Session(self, [script], overrides={"m1": {"default_action": action}})
        return s, s.transaction()

    def test_timeout_at_eom_tempfails(self):
        """A milter that does not answer EOM within content_timeout: default tempfail, 451, nothing queued."""
        s = Session(self, [{"hang": "eom"}])
        out = s.transaction()
        self.assertEqual(out[-1], "354 End data with <CR><LF>.<CR><LF>")  # no answer yet
        self.assertEqual(s.h.queued, [])
        s.h.clock.advance(59)
        self.assertEqual(s.h.read(), [])
        s.h.clock.advance(2)
        s.milters.flush()
        self.assertEqual(s.h.read(), ["451 4.7.1 A mail filter is unavailable or defers this; "
                                      "try again later"])
        self.assertEqual(s.h.queued, [])
        self.assertEqual(s.tmp_files(), [])

    def test_timeout_with_accept_queues(self):
        """The same timeout with default_action accept: the message is queued unchanged."""
        s = Session(self, [{"hang": "eom"}], overrides={"m1": {"default_action": "accept"}})
        s.transaction()
        s.h.clock.advance(61)
        s.milters.flush()
        self.assertTrue(s.h.read()[0].startswith("250 2.0.0 Ok: queued as"))
        self.assertEqual(len(s.h.queued), 1)

    def test_crash_mid_message(self):
        """A milter that closes the connection in the middle of the body: each default action."""
        for action, expect in (("accept", "250 2.0.0 Ok: queued as"),
                               ("tempfail", "451 4.7.1 "), ("reject", "550 5.7.1 ")):
            s, out = self.run_with({"crash": "body"}, action)
            self.assertTrue(out[-1].startswith(expect), (action, out))
            self.assertEqual(len(s.h.queued), 1 if action == "accept" else 0)
            self.assertEqual(s.tmp_files(), [])

    def test_unreachable_default_actions(self):
        """A milter nobody listens for: accept goes on, tempfail and reject refuse MAIL."""
        for action, expect in (("accept", "250 2.1.0"), ("tempfail", "451 4.7.1"),
                               ("reject", "550 5.7.1")):
            s = Session(self, [{}], overrides={"m1": {"default_action": action,
                                                     "address": "inet:127.0.0.1:99"}})
            s.say("EHLO c\r\n")
            out = s.say("MAIL FROM:<s@remote.test>\r\n")
            self.assertTrue(out[0].startswith(expect), (action, out))

    def test_protocol_error_at_eom(self):
        """An unnegotiated modification (ADDHEADER without SMFIF_ADDHDRS) is a protocol error: default action."""
        s = Session(self, [{"optneg": (0, 0), "eom": [mod("addheader", b"X-A", b"1"),
                                                       "continue"]}],
                    overrides={"m1": {"default_action": "reject"}})
        out = s.transaction()
        self.assertTrue(out[-1].startswith("550 5.7.1 "), out)


class ModificationTests(SynchronousTestCase):
    def queued_message(self, scripts, **kw):
        s = Session(self, scripts, **kw)
        out = s.transaction(**{k: v for k, v in kw.items() if k == "message"})
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued"), out)
        [raw] = s.queued()
        self.assertEqual(s.tmp_files(), [])
        return s, s.message_of(raw)

    def test_header_add_insert_change_delete(self):
        """ADDHEADER appends, INSHEADER 0 goes first, CHGHEADER replaces, an empty CHGHEADER deletes."""
        s, msg = self.queued_message([{"eom": [
            mod("addheader", b"X-Added", b"yes"),
            mod("insheader", 0, b"X-First", b"top"),
            mod("chgheader", 1, b"Subject", b"changed"),
            mod("chgheader", 1, b"From", b""),
            "accept"]}])
        head = msg.split(b"\r\n\r\n")[0].split(b"\r\n")
        self.assertEqual(head[0], b"X-First: top")
        self.assertTrue(head[1].startswith(b"Received: "))
        self.assertIn(b"Subject: changed", head)
        self.assertFalse(any(h.startswith(b"From:") for h in head))
        self.assertEqual(head[-1], b"X-Added: yes")
        self.assertTrue(msg.endswith(b"\r\n\r\nbody line\r\n"))
        # The committed state records the rewritten file's length.
        env = s.h.queued[0]
        path = os.path.join(s.h.spool.path, "new", env.queue_id)
        self.assertEqual(env.file_size, os.path.getsize(path))

    def test_folded_header_value(self):
        """A milter's folded value (LF line breaks) is stored with CRLF."""
        s, msg = self.queued_message([{"eom": [
            mod("addheader", b"X-Long", b"part one\n\tpart two"), "continue"]}])
        self.assertIn(b"X-Long: part one\r\n\tpart two\r\n", msg)

    def test_body_replacement(self):
        """REPLBODY chunks make the new body; bare LF becomes CRLF."""
        s, msg = self.queued_message([{"eom": [
            mod("replbody", b"new line one\nnew "), mod("replbody", b"line two\r\n"),
            "continue"]}])
        self.assertTrue(msg.endswith(b"\r\n\r\nnew line one\r\nnew line two\r\n"), msg)
        self.assertNotIn(b"body line", msg)

    def test_envelope_changes(self):
        """CHGFROM, ADDRCPT and DELRCPT change the queued envelope, also in the queue file's header."""
        s, msg = self.queued_message([{"eom": [
            mod("chgfrom", b"<new@remote.test>"), mod("addrcpt", b"<carol@elsewhere.test>"),
            mod("delrcpt", b"<alice@example.test>"), "continue"]}])
        env = s.h.queued[0]
        self.assertEqual(env.sender, "new@remote.test")
        self.assertEqual([r.address for r in env.recipients], ["carol@elsewhere.test"])
        from twisted_mta.queue.spool import read_head
        on_disk, _ = read_head(os.path.join(s.h.spool.path, "new", env.queue_id))
        self.assertEqual(on_disk.sender, "new@remote.test")
        self.assertEqual([r.address for r in on_disk.recipients], ["carol@elsewhere.test"])

    def test_quarantine_holds_the_entry(self):
        """QUARANTINE: the entry is committed to hold/, not handed to the queue manager, and the client gets 250."""
        s = Session(self, [{"eom": [mod("quarantine", b"suspicious"), "continue"]}])
        out = s.transaction()
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued as"))
        qid = out[-1].rsplit(" ", 1)[1]
        self.assertEqual(s.h.queued, [])
        self.assertEqual(os.listdir(os.path.join(s.h.spool.path, "hold")), [qid])
        self.assertEqual(os.listdir(os.path.join(s.h.spool.path, "new")), [])

    def test_milters_in_order_see_earlier_edits(self):
        """Two milters: the second sees the header the first added; both edits are queued."""
        s, msg = self.queued_message([
            {"eom": [mod("addheader", b"X-One", b"1"), "continue"]},
            {"eom": [mod("addheader", b"X-Two", b"2"), "continue"]}])
        second = [args for stage, args, _ in s.factories[1].log if stage == "header"]
        self.assertIn((b"X-One", b"1"), second)
        self.assertLess(msg.index(b"X-One: 1"), msg.index(b"X-Two: 2"))
        self.assertLess(s.factories[0].stages().index("eom"), len(s.factories[0].stages()))

    def test_first_refusal_ends_the_chain(self):
        """The first milter's reject at MAIL: the second never sees MAIL."""
        s = Session(self, [{"mail": "reject"}, {}])
        s.say("EHLO c\r\n")
        self.assertEqual(s.say("MAIL FROM:<s@remote.test>\r\n"),
                         ["550 5.7.1 Refused by a mail filter"])
        self.assertNotIn("mail", s.factories[1].stages())
        self.assertIn("helo", s.factories[1].stages())

    def test_accept_skips_that_milter_for_the_message(self):
        """A milter that accepts at MAIL gets no more of the message; the other milter still does."""
        s = Session(self, [{"mail": "accept"}, {}])
        out = s.transaction()
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued"))
        self.assertNotIn("eom", s.factories[0].stages())
        self.assertIn("eom", s.factories[1].stages())


class DeferredIOTests(SynchronousTestCase):
    """
    The spool's and the milter stage's blocking calls finishing later (as
    in the I/O threads), not inline: the commit after the milters' edits
    runs from inside the writer's own chain of disk operations.
    """

    def later(self, clock):
        def run(f, *args):
            d = defer.Deferred()

            def go():
                try:
                    d.callback(f(*args))
                except Exception:
                    d.errback()
            clock.callLater(0, go)
            return d
        return run

    def test_edited_message_committed(self):
        """With deferred I/O, an edited message is committed with its edits and 250 follows."""
        from twisted_mta.queue.spool import _GroupSync
        s = Session(self, [{"eom": [mod("addheader", b"X-Later", b"yes"),
                                    mod("replbody", b"replaced\r\n"), "continue"]}])
        run = self.later(s.h.clock)
        s.h.spool.run_blocking = run
        s.h.spool.group_sync = _GroupSync(run, (os.path.join(s.h.spool.path, "new"),))
        s.h.protocol.milters.run_blocking = run
        out = s.transaction()
        for _ in range(200):
            s.h.clock.advance(0)
            s.milters.flush()
            out += s.h.read()
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued as"), out)
        [raw] = s.queued()
        self.assertIn(b"X-Later: yes\r\n", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\nreplaced\r\n"), raw)
        self.assertEqual(s.tmp_files(), [])


class EndpointTests(SynchronousTestCase):
    def test_unix_and_inet(self):
        """unix: connects to the socket path, inet: to host and port, with the connect timeout."""
        from twisted.internet.testing import MemoryReactorClock
        from twisted_mta import milter_protocol as mp
        from twisted_mta.inbound.milter import connect_endpoint
        reactor = MemoryReactorClock()
        connect = connect_endpoint(reactor)
        connect(mp.parse_milter_address("unix:/run/m.sock"), 7, reactor)
        self.assertEqual(reactor.unixClients[0][0], "/run/m.sock")
        self.assertEqual(reactor.unixClients[0][2], 7)
        connect(mp.parse_milter_address("inet:127.0.0.1:8891"), 5, reactor)
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 8891))


class BdatTests(SynchronousTestCase):
    def test_bdat_message_goes_past_the_milters(self):
        """A message sent in BDAT chunks gets the same milter stage: the edit is queued, a refusal answers the LAST chunk."""
        body = b"Subject: chunks\r\n\r\nin two\r\nchunks\r\n"
        s = Session(self, [{"eom": [mod("addheader", b"X-Chunked", b"seen"), "continue"]}])
        s.say("EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
        s.say(b"BDAT %d\r\n" % 20 + body[:20])
        out = s.say(b"BDAT %d LAST\r\n" % (len(body) - 20) + body[20:])
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued as"), out)
        [raw] = s.queued()
        self.assertIn(b"X-Chunked: seen\r\n", raw)
        self.assertTrue(raw.endswith(b"\r\n\r\nin two\r\nchunks\r\n"))
        bodies = [args for stage, args, _ in s.factories[0].log if stage == "body"]
        self.assertEqual(b"".join(bodies), b"in two\r\nchunks\r\n")

        s2 = Session(self, [{"eom": ["550 5.7.1 no chunks today"]}])
        s2.say("EHLO c\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
        out = s2.say(b"BDAT %d LAST\r\n" % len(body) + body)
        self.assertEqual(out[-1], "550 5.7.1 no chunks today")
        self.assertEqual(s2.h.queued, [])


class SigningAfterMiltersTests(SynchronousTestCase):
    def test_native_signature_covers_the_milters_edits(self):
        """[dkim] signs after the milters: a Subject a milter changed is what the signature covers (dkimpy verifies)."""
        import dkim

        from tests.test_dkim import dnsfunc_for, signer_for
        signer = signer_for(self, {"example.test": "ed25519-sha256"})
        s = Session(self, [{"eom": [mod("chgheader", 1, b"Subject", b"changed by milter"),
                                    "continue"]}],
                    relay={"trusted_networks": ["192.0.2.0/24"]})
        s.h.factory.signer = signer
        message = (b"From: <alice@example.test>\r\nTo: <bob@example.test>\r\n"
                   b"Subject: original\r\n\r\nbody\r\n.\r\n")
        out = s.transaction(message=message)
        self.assertTrue(out[-1].startswith("250 2.0.0 Ok: queued as"), out)
        [raw] = s.queued()
        self.assertIn(b"Subject: changed by milter\r\n", raw)
        self.assertTrue(raw.startswith(b"DKIM-Signature:"), raw[:200])
        self.assertTrue(dkim.verify(raw, dnsfunc=dnsfunc_for(signer)))


class SessionEndTests(SynchronousTestCase):
    def test_client_gone_while_a_milter_thinks(self):
        """The client disconnects while the milter has not answered MAIL: the milter connection is closed, nothing is logged as a milter failure, nothing is queued."""
        from twisted.logger import globalLogPublisher
        events: list = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        s = Session(self, [{"hang": "mail"}])
        s.say("EHLO c\r\n")
        self.assertEqual(s.say("MAIL FROM:<s@remote.test>\r\n"), [])
        s.h.protocol.connectionLost(None)
        s.milters.flush()
        self.assertTrue(s.milters.pumps[0].clientIO.disconnected)
        self.assertEqual([e for e in events if e.get("event") == "milter.failed"], [])
        self.assertEqual(s.h.queued, [])
        s.h.clock.advance(100)  # no timer left to fire
        self.assertEqual(s.h.clock.getDelayedCalls(), [])


class ObserveTests(SynchronousTestCase):
    def test_results_counted_per_milter(self):
        """Each milter's results go to the stage's observer: accept and modified at end of message, reject, failed."""
        seen = []
        s = Session(self, [{"eom": [mod("addheader", b"X-A", b"1"), "continue"]},
                           {"rcpt": "reject"}, {}],
                    overrides={"m3": {"address": "inet:127.0.0.1:99",
                                      "default_action": "accept"}})
        s.h.protocol.milters._observe = lambda name, result: seen.append((name, result))
        s.say("EHLO c\r\n")  # m3 failed at connect, before the observer was set
        s.say("MAIL FROM:<s@remote.test>\r\n")
        self.assertEqual(s.say("RCPT TO:<alice@example.test>\r\n"),
                         ["550 5.7.1 Refused by a mail filter"])
        self.assertEqual(seen, [("m2", "reject")])
        s2 = Session(self, [{"eom": [mod("addheader", b"X-A", b"1"), "continue"]}, {}])
        s2.h.protocol.milters._observe = lambda name, result: seen.append((name, result))
        s2.transaction()
        self.assertEqual(seen[1:], [("m1", "accept"), ("m1", "modified"), ("m2", "accept")])


class NegotiationTimeoutTests(SynchronousTestCase):
    def test_silent_milter_times_out_at_connect(self):
        """A milter that accepts the connection but never answers OPTNEG: after connect_timeout its default action (tempfail) answers MAIL; the greeting was not held up."""
        s = Session(self, [{"hang": "optneg"}], overrides={"m1": {"connect_timeout": "5s"}})
        self.assertEqual(s.greeting, ["220 mx.example.test ESMTP"])
        s.say("EHLO c\r\n")
        self.assertEqual(s.say("MAIL FROM:<s@remote.test>\r\n"), [])  # waits for the chain
        s.h.clock.advance(5)
        s.milters.flush()
        self.assertEqual(s.h.read(), ["451 4.7.1 A mail filter is unavailable or defers this; "
                                      "try again later"])
        self.assertEqual(s.factories[0].stages(), ["optneg"])


class MacroTests(SynchronousTestCase):
    def test_auth_and_tls_macros_at_mail(self):
        """After STARTTLS and AUTH LOGIN, MAIL carries {auth_authen}, {auth_type} LOGIN, {tls_version}, {cipher}, {daemon_name} submission."""
        import base64

        from tests.support import FakeTLSTransport
        from twisted_mta.users import UserDatabase, hash_password
        users = UserDatabase(path="test", users={"alice": hash_password("s3cret", log_n=4)})
        s = Session(self, [{}], role="submission", tls_context=object(),
                    transport_factory=FakeTLSTransport, users=users)
        s.say("EHLO c\r\n")
        s.say("STARTTLS\r\n")
        s.h.protocol.handshakeCompleted()
        s.say("EHLO c\r\n")
        s.say("AUTH LOGIN\r\n")
        s.say(base64.b64encode(b"alice") + b"\r\n")
        self.assertEqual(s.say(base64.b64encode(b"s3cret") + b"\r\n"),
                         ["235 2.7.0 Authentication successful"])
        self.assertEqual(s.say("MAIL FROM:<alice@example.test>\r\n"), ["250 2.1.0 Sender ok"])
        [macros] = [m for stage, _, m in s.factories[0].log if stage == "mail"]
        self.assertEqual(macros["{auth_authen}"], "alice")
        self.assertEqual(macros["{auth_type}"], "LOGIN")
        self.assertEqual(macros["{daemon_name}"], "submission")
        self.assertIn("{tls_version}", macros)
        self.assertIn("{cipher}", macros)
        self.assertEqual(macros["{mail_addr}"], "alice@example.test")
