"""
Tests for the outbound ESMTP client, one session on a fake transport: the
commands it writes and what it makes of each reply.
"""

from __future__ import annotations

import random

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.internet import error
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.outbound.client import (
    OutboundClient, Timeouts, Transaction, reply_outcome,
)
from twisted_mta.outbound.message import OutgoingMessage, Stuffer, stuff
from twisted_mta.tls.policy import TLSRequirements
from tests.support import FakeTLSTransport

EHLO = (b"250-mx.peer.test Hello\r\n250-PIPELINING\r\n250-SIZE 10000\r\n250-8BITMIME\r\n"
        b"250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n")


def message(body: bytes = b"Subject: x\r\n\r\nhi\r\n") -> OutgoingMessage:
    return OutgoingMessage(path="/nonexistent", offset=0, size=len(body),
                           eight_bit=not body.isascii(), data=stuff(body))


class Session:
    """
    A client connected to a fake transport; L{feed} plays the server.
    """

    def __init__(self, testcase, **kw):
        self.clock = Clock()
        kw.setdefault("helo", "out.example.test")
        kw.update(host="mx.peer.test", address="192.0.2.5", port=25)
        if "tls_creator" in kw:  # STARTTLS when offered (the fake transport only pretends)
            kw["tls"] = kw.pop("tls_creator")
            kw.setdefault("requirements", TLSRequirements("opportunistic"))
        kw.setdefault("own_names", frozenset({"out.example.test"}))
        self.client = OutboundClient(**kw)
        self.client.callLater = self.clock.callLater
        self.transport = FakeTLSTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 40000),
            peerAddress=IPv4Address("TCP", "192.0.2.5", 25))
        self.client.makeConnection(self.transport)
        self.ready = []
        self.failed = []
        self.client.established.addCallbacks(self.ready.append, self.failed.append)

    def feed(self, data: bytes) -> list[bytes]:
        self.client.dataReceived(data)
        return self.sent()

    def sent(self) -> list[bytes]:
        out = self.transport.value()
        self.transport.clear()
        return out.split(b"\r\n")[:-1] if out else []

    def establish(self, ehlo: bytes = EHLO) -> None:
        self.feed(b"220 mx.peer.test ESMTP\r\n")
        self.feed(ehlo)
        assert self.ready, self.failed

    def lose(self, reason=error.ConnectionLost()):
        self.client.connectionLost(Failure(reason))


class SessionSetUpTests(SynchronousTestCase):
    def test_ehlo_then_ready_without_starttls_context(self):
        """Without a TLS context the client says EHLO, keeps the capabilities and is ready."""
        s = Session(self)
        self.assertEqual(s.feed(b"220 mx.peer.test ESMTP\r\n"), [b"EHLO out.example.test"])
        s.feed(EHLO)
        self.assertEqual(s.ready, [s.client])
        self.assertEqual(s.client.capabilities["SIZE"], "10000")
        self.assertIn("PIPELINING", s.client.capabilities)

    def test_starttls_discards_injected_cleartext(self):
        """Lines behind STARTTLS's 220 in the same packet are never read as the encrypted reply (CVE-2011-0411 class)."""
        s = Session(self, tls_creator=object())
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        self.assertEqual(s.feed(EHLO), [b"STARTTLS"])
        sent = s.feed(b"220 2.0.0 go ahead\r\n250-forged\r\n250 AUTH PLAIN\r\n")
        self.assertEqual(sent, [b"EHLO out.example.test"])
        self.assertTrue(s.client.tls_started)
        self.assertEqual(s.ready, [])  # still waiting for the real EHLO reply
        s.feed(b"250-mx.peer.test\r\n250 PIPELINING\r\n")
        self.assertEqual(s.ready, [s.client])
        self.assertEqual(set(s.client.capabilities), {"PIPELINING"})

    def test_starttls_refused_is_a_tls_failure(self):
        """A 454 to STARTTLS is a typed TLS failure quoting the server (the fallback decider weighs it); we say QUIT."""
        s = Session(self, tls_creator=object())
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        s.feed(EHLO)
        self.assertEqual(s.feed(b"454 4.7.0 TLS not available due to local problem\r\n"),
                         [b"QUIT"])
        [f] = s.failed
        failure = f.value.tls_failure
        self.assertEqual((failure.kind, failure.host, failure.address),
                         ("starttls-refused", "mx.peer.test", "192.0.2.5"))
        self.assertEqual(failure.reply, "454 4.7.0 TLS not available due to local problem")
        self.assertEqual(f.value.outcome.enhanced, "4.7.4")

    def test_starttls_not_offered_under_required_policy(self):
        """A policy that requires TLS fails with starttls-not-offered when the server does not offer it."""
        s = Session(self, tls_creator=object(),
                    requirements=TLSRequirements("strict", starttls="required", verify=True))
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        self.assertEqual(s.feed(b"250-mx.peer.test\r\n250 PIPELINING\r\n"), [b"QUIT"])
        [f] = s.failed
        self.assertEqual(f.value.tls_failure.kind, "starttls-not-offered")
        self.assertEqual(f.value.outcome.text,
                         "mx.peer.test[192.0.2.5]:25 does not offer encryption (no STARTTLS)")

    def test_handshake_that_never_answers_times_out_as_a_tls_failure(self):
        """After STARTTLS's 220 the handshake gets handshake_timeout, not the command timeout; silence is handshake-timeout naming the seconds, a TLS failure the decider weighs."""
        s = Session(self, tls_creator=object(),
                    timeouts=Timeouts(greeting=100, command=100, handshake=7))
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        s.feed(EHLO)
        s.feed(b"220 2.0.0 Ready to start TLS\r\n")
        s.clock.advance(6.9)
        self.assertEqual(s.failed, [])
        s.clock.advance(0.2)
        [f] = s.failed
        failure = f.value.tls_failure
        self.assertEqual((failure.kind, failure.waited), ("handshake-timeout", 7))
        self.assertIn("mx.peer.test[192.0.2.5]:25 did not answer the encryption handshake "
                      "within 7 seconds", f.value.outcome.text)

    def test_command_timeout_applies_after_the_handshake(self):
        """Once the handshake completed, the reply to the second EHLO gets the command timeout again."""
        s = Session(self, tls_creator=object(),
                    timeouts=Timeouts(greeting=100, command=50, handshake=7))
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        s.feed(EHLO)
        s.feed(b"220 2.0.0 Ready to start TLS\r\n")
        s.client.tls = None  # the fake transport pretends; nothing to judge
        s.client.handshakeCompleted()
        s.clock.advance(49)
        self.assertEqual(s.failed, [])
        s.clock.advance(2)
        [f] = s.failed
        self.assertIsNone(f.value.tls_failure)
        self.assertEqual(f.value.outcome.kind, "timeout")

    def test_credentials_never_sent_without_tls(self):
        """With credentials and no STARTTLS offered, the session fails 4.7.4 and AUTH is never sent."""
        s = Session(self, tls_creator=object(), credentials=("user", "secret"))
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        sent = s.feed(b"250-mx.peer.test\r\n250 AUTH PLAIN LOGIN\r\n")
        self.assertEqual(sent, [b"QUIT"])
        [f] = s.failed
        self.assertEqual((f.value.outcome.code, f.value.outcome.enhanced), (451, "4.7.4"))
        self.assertNotIn(b"secret", s.transport.value())

    def test_auth_after_starttls(self):
        """With credentials, AUTH PLAIN goes out only after STARTTLS and the second EHLO."""
        s = Session(self, tls_creator=object(), credentials=("user", "secret"))
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        self.assertEqual(s.feed(b"250-mx.peer.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"),
                         [b"STARTTLS"])
        s.feed(b"220 go ahead\r\n")
        [auth] = s.feed(b"250-mx.peer.test\r\n250 AUTH PLAIN LOGIN\r\n")
        self.assertTrue(auth.startswith(b"AUTH PLAIN "))
        s.feed(b"235 2.7.0 ok\r\n")
        self.assertEqual(s.ready, [s.client])

    def test_auth_refused(self):
        """A refused login fails the session with the server's words."""
        s = Session(self, tls_creator=object(), credentials=("user", "secret"))
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        s.feed(b"250-mx.peer.test\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n")
        s.feed(b"220 go ahead\r\n")
        s.feed(b"250-mx.peer.test\r\n250 AUTH PLAIN\r\n")
        s.feed(b"535 5.7.8 bad credentials\r\n")
        s.feed(b"535 5.7.8 bad credentials\r\n")
        [f] = s.failed
        self.assertEqual(f.value.outcome.enhanced, "5.7.8")
        self.assertIn("our login was refused", f.value.outcome.text)

    def test_greeting_refused(self):
        """A 554 greeting fails the session with the server's words, and we say QUIT."""
        s = Session(self)
        self.assertEqual(s.feed(b"554 5.7.1 go away\r\n"), [b"QUIT"])
        [f] = s.failed
        self.assertEqual(str(f.value.outcome), "554 5.7.1 mx.peer.test[192.0.2.5]:25 said: "
                         "554 5.7.1 go away (in reply to the initial greeting)")

    def test_peer_greeting_with_our_name_is_a_loop(self):
        """A server that greets us with our own name is us: 554 5.4.6, no other host."""
        s = Session(self)
        s.feed(b"220 out.example.test ESMTP\r\n")
        s.feed(b"250-out.example.test Hello\r\n250 PIPELINING\r\n")
        [f] = s.failed
        self.assertEqual(f.value.outcome.enhanced, "5.4.6")
        self.assertFalse(f.value.next_host)

    def test_helo_fallback(self):
        """A server that refuses EHLO gets HELO, and the session has no extensions."""
        s = Session(self)
        s.feed(b"220 old.peer.test SMTP\r\n")
        self.assertEqual(s.feed(b"502 what?\r\n"), [b"HELO out.example.test"])
        s.feed(b"250 old.peer.test\r\n")
        self.assertEqual(s.ready, [s.client])
        self.assertEqual(s.client.capabilities, {})

    def test_greeting_timeout(self):
        """No greeting within the greeting timeout: a temporary failure, connection closed."""
        s = Session(self, timeouts=Timeouts(greeting=300, command=60, data=600))
        s.clock.advance(299)
        self.assertEqual(s.failed, [])
        s.clock.advance(1)
        [f] = s.failed
        self.assertEqual(f.value.outcome.enhanced, "4.4.2")
        self.assertIn("did not answer in time", f.value.outcome.text)
        self.assertTrue(s.transport.disconnecting)

    def test_lost_during_tls_handshake_is_a_tls_failure(self):
        """A connection that dies between STARTTLS and the end of the handshake is marked as a TLS failure (a cleartext retry may follow)."""
        s = Session(self, tls_creator=object())
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        s.feed(EHLO)
        s.feed(b"220 go ahead\r\n")
        s.lose()
        [f] = s.failed
        self.assertTrue(f.value.tls_failed)
        self.assertEqual(f.value.outcome.enhanced, "4.7.5")


class TransactionTests(SynchronousTestCase):
    def send(self, s: Session, txn: Transaction):
        results = []
        s.client.send(txn).addCallback(results.append)
        return results

    def test_pipelined_transaction_with_mixed_recipient_results(self):
        """MAIL, RCPTs and DATA go in one write; each recipient gets its own result."""
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@example.test", ("ok@peer.test", "bad@peer.test",
                                                              "later@peer.test"), message()))
        self.assertEqual(s.sent(), [b"MAIL FROM:<a@example.test> SIZE=18",
                                    b"RCPT TO:<ok@peer.test>", b"RCPT TO:<bad@peer.test>",
                                    b"RCPT TO:<later@peer.test>", b"DATA"])
        s.feed(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 <bad@peer.test>: no such user\r\n"
               b"450 4.2.0 try later\r\n")
        self.assertEqual(s.feed(b"354 go\r\n"), [b"Subject: x", b"", b"hi", b"."])
        s.feed(b"250 2.0.0 Ok: queued as ABC\r\n")
        [r] = results
        self.assertEqual(r["ok@peer.test"].code, 250)
        self.assertIn("queued as ABC", r["ok@peer.test"].text)
        self.assertEqual(str(r["bad@peer.test"]),
                         "550 5.1.1 mx.peer.test[192.0.2.5]:25 said: 550 5.1.1 <bad@peer.test>: "
                         "no such user (in reply to RCPT TO:<bad@peer.test>)")
        self.assertEqual((r["later@peer.test"].code, r["later@peer.test"].enhanced),
                         (450, "4.2.0"))
        self.assertEqual(r["bad@peer.test"].remote_mta, "mx.peer.test")

    def test_without_pipelining_one_command_at_a_time(self):
        """Without PIPELINING each command waits for the previous reply."""
        s = Session(self)
        s.establish(b"250-mx.peer.test\r\n250 8BITMIME\r\n")
        results = self.send(s, Transaction("", ("x@peer.test", "y@peer.test"), message()))
        self.assertEqual(s.sent(), [b"MAIL FROM:<>"])
        self.assertEqual(s.feed(b"250 ok\r\n"), [b"RCPT TO:<x@peer.test>"])
        self.assertEqual(s.feed(b"550 no\r\n"), [b"RCPT TO:<y@peer.test>"])
        self.assertEqual(s.feed(b"250 ok\r\n"), [b"DATA"])
        s.feed(b"354 go\r\n")
        s.feed(b"250 done\r\n")
        [r] = results
        self.assertEqual((r["x@peer.test"].code, r["x@peer.test"].enhanced), (550, "5.0.0"))
        self.assertEqual(r["y@peer.test"].code, 250)

    def test_all_recipients_refused_no_data_then_rset_before_next(self):
        """When every RCPT is refused no DATA is sent, and the next transaction starts with RSET."""
        s = Session(self)
        s.establish(b"250-mx.peer.test\r\n250 8BITMIME\r\n")
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), message()))
        s.sent()
        s.feed(b"250 ok\r\n")
        self.assertEqual(s.feed(b"550 5.1.1 no\r\n"), [])
        self.assertEqual(results[0]["x@peer.test"].code, 550)
        self.send(s, Transaction("a@x.test", ("y@peer.test",), message()))
        self.assertEqual(s.sent(), [b"RSET"])

    def test_mail_refused_in_pipeline(self):
        """A refused MAIL gives every recipient its reply; the RCPT and DATA replies are consumed."""
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test", "y@peer.test"), message()))
        s.sent()
        s.feed(b"553 5.1.8 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
               b"554 5.5.1 no valid recipients\r\n")
        [r] = results
        self.assertEqual({a: o.enhanced for a, o in r.items()},
                         {"x@peer.test": "5.1.8", "y@peer.test": "5.1.8"})
        self.assertIn("in reply to MAIL FROM", r["x@peer.test"].text)
        self.assertTrue(s.client.ready)

    def test_all_refused_in_pipeline_and_354(self):
        """A server that answers 354 although no recipient was accepted gets an empty body, nothing else."""
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), message()))
        s.sent()
        sent = s.feed(b"250 ok\r\n550 no\r\n354 go\r\n")
        self.assertEqual(sent, [b"."])
        s.feed(b"554 no valid recipients\r\n")
        self.assertEqual(results[0]["x@peer.test"].code, 550)

    def test_data_answered_250_is_not_success(self):
        """A 250 to DATA (instead of 354) means nothing was sent: a temporary failure."""
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), message()))
        s.sent()
        s.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n")
        self.assertEqual(results[0]["x@peer.test"].code, 451)
        self.assertIn("instead of 354", results[0]["x@peer.test"].text)

    def test_final_reply_failure_applies_to_accepted_recipients(self):
        """A 5xx after the final dot fails the accepted recipients; refused ones keep their own reply."""
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test", "y@peer.test"), message()))
        s.sent()
        s.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n")
        s.feed(b"554 5.7.1 spam detected\r\n")
        [r] = results
        self.assertEqual((r["x@peer.test"].enhanced, r["y@peer.test"].enhanced), ("5.7.1", "5.1.1"))

    def test_connection_lost_mid_transaction(self):
        """A broken connection gives recipients still open a temporary outcome; settled ones keep theirs."""
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test", "y@peer.test"), message()))
        s.feed(b"250 ok\r\n550 5.1.1 unknown\r\n")
        s.lose()
        [r] = results
        self.assertEqual(r["x@peer.test"].enhanced, "5.1.1")
        self.assertEqual(r["y@peer.test"].enhanced, "4.4.2")
        self.assertIn("lost connection with mx.peer.test[192.0.2.5]:25", r["y@peer.test"].text)

    def test_final_dot_timeout(self):
        """No reply to the final dot within the data timeout: temporary failure."""
        s = Session(self, timeouts=Timeouts(greeting=300, command=300, data=600))
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), message()))
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.clock.advance(599)
        self.assertEqual(results, [])
        s.clock.advance(1)
        self.assertEqual(results[0]["x@peer.test"].enhanced, "4.4.2")

    def test_connection_reused(self):
        """A second transaction on the same session: no RSET after a delivered message."""
        s = Session(self)
        s.establish()
        first = self.send(s, Transaction("a@x.test", ("x@peer.test",), message()))
        s.sent()
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.feed(b"250 queued\r\n")
        self.assertEqual(first[0]["x@peer.test"].code, 250)
        self.send(s, Transaction("b@x.test", ("y@peer.test",), message()))
        self.assertEqual(s.sent()[0], b"MAIL FROM:<b@x.test> SIZE=18")
        self.assertEqual(s.client.messages, 2)

    def test_eight_bit_declared(self):
        """8-bit content goes with BODY=8BITMIME when the server takes it."""
        s = Session(self)
        s.establish()
        self.send(s, Transaction("a@x.test", ("x@peer.test",), message("\u00e9\r\n".encode())))
        self.assertEqual(s.sent()[0], b"MAIL FROM:<a@x.test> SIZE=4 BODY=8BITMIME")

    def test_dsn_requests_passed_on(self):
        """With DSN advertised, RET/ENVID and NOTIFY/ORCPT go on (xtext) and success is marked as passed on."""
        s = Session(self)
        s.establish(b"250-mx.peer.test\r\n250-PIPELINING\r\n250 DSN\r\n")
        results = self.send(s, Transaction(
            "a@x.test", ("x@peer.test", "y@peer.test"), message(),
            dsn=((("SUCCESS", "FAILURE"), "rfc822;X+1@peer.test"), ((), None)),
            ret="HDRS", envid="id 1"))
        self.assertEqual(s.sent()[:3], [
            b"MAIL FROM:<a@x.test> RET=HDRS ENVID=id+201",
            b"RCPT TO:<x@peer.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;X+2B1@peer.test",
            b"RCPT TO:<y@peer.test> NOTIFY=NEVER"])
        s.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.assertTrue(results[0]["x@peer.test"].dsn_passed)

    def test_dsn_requests_not_sent_without_dsn(self):
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), message(),
                                           dsn=((("SUCCESS",), None),), ret="FULL"))
        self.assertEqual(s.sent()[:2], [b"MAIL FROM:<a@x.test> SIZE=18",
                                         b"RCPT TO:<x@peer.test>"])
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n250 ok\r\n")
        self.assertFalse(results[0]["x@peer.test"].dsn_passed)

    def test_too_big_for_server(self):
        """A message over the server's SIZE limit fails 5.3.4 without being sent."""
        s = Session(self)
        s.establish()
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",),
                                           message(b"x" * 10001 + b"\r\n")))
        self.assertEqual(s.sent(), [])
        self.assertEqual(results[0]["x@peer.test"].enhanced, "5.3.4")


class ReplyOutcomeTests(SynchronousTestCase):
    def test_enhanced_code_taken_from_reply(self):
        o = reply_outcome("mx[1.2.3.4]:25", "RCPT TO:<x>", 452, b"4.2.2 mailbox full")
        self.assertEqual((o.code, o.enhanced), (452, "4.2.2"))

    def test_enhanced_code_of_wrong_class_ignored(self):
        """An enhanced code whose class contradicts the reply code is not believed."""
        o = reply_outcome("mx[1.2.3.4]:25", "RCPT", 550, b"4.2.2 confused")
        self.assertEqual(o.enhanced, "5.0.0")

    def test_multiline_reply_joined(self):
        o = reply_outcome("mx[1.2.3.4]:25", "DATA", 554,
                          b"5.7.1 first line\n5.7.1 second line")
        self.assertIn("5.7.1 first line second line", o.text)


class StufferTests(SynchronousTestCase):
    def test_first_line_dot(self):
        self.assertEqual(stuff(b".\r\nafter\r\n"), b"..\r\nafter\r\n.\r\n")

    def test_dot_at_chunk_boundary(self):
        s = Stuffer()
        out = s.feed(b"line\r\n") + s.feed(b".secret\r\n") + s.end()
        self.assertEqual(out, b"line\r\n..secret\r\n.\r\n")

    def test_missing_final_newline(self):
        self.assertEqual(stuff(b"no newline"), b"no newline\r\n.\r\n")
        s = Stuffer()
        self.assertEqual(s.feed(b"x\r") + s.feed(b"") + s.end(), b"x\r\n.\r\n")

    def test_random_split_matches_whole(self):
        """Stuffing in random chunks gives the same bytes as stuffing the whole, which unstuffs back."""
        rng = random.Random(7)
        for _ in range(300):
            data = bytes(rng.choice(b".\r\nab") for _ in range(rng.randrange(0, 40)))
            cuts = sorted(rng.sample(range(len(data) + 1), min(3, len(data) + 1)))
            s = Stuffer()
            pieces = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]
            out = b"".join(s.feed(p) for p in pieces) + s.end()
            self.assertEqual(out, stuff(data))
            body = out[:-3]
            lines = body.split(b"\n")
            self.assertFalse(any(line == b".\r" for line in lines), out)
            unstuffed = b"\n".join(line[1:] if line.startswith(b".") else line for line in lines)
            self.assertTrue(unstuffed.startswith(data), (data, out))


class LargeMessageTests(SynchronousTestCase):
    def test_streamed_from_the_spool_file_with_stuffing(self):
        """A message over 1 MiB is read from its queue file in chunks, stuffed across chunk boundaries, and ends with CRLF.CRLF."""
        import os
        from twisted.internet import defer
        from twisted_mta.outbound.message import CHUNK, load
        from twisted_mta.model import Envelope, Recipient
        env = Envelope(queue_id="Q", sender="a@x.test", recipients=(Recipient("x@peer.test"),),
                       arrival=0)
        line = b"x" * (CHUNK - 2) + b"\r\n"  # the next line starts exactly at a chunk edge
        body = b"Subject: big\r\n\r\n" + line + b".starts with a dot\r\n" + line * 2
        path = os.path.join(self.mktemp())
        with open(path, "wb") as f:
            f.write(env.to_header() + body)
        msg = load(path)
        self.assertIsNone(msg.data)
        s = Session(self, run_blocking=defer.maybeDeferred)
        s.establish(b"250-mx.peer.test\r\n250-PIPELINING\r\n250 SIZE 52428800\r\n")
        results = []
        s.client.send(Transaction("a@x.test", ("x@peer.test",), msg)).addCallback(results.append)
        s.sent()
        s.client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
        sent = s.transport.value()
        self.assertEqual(sent, stuff(body))
        self.assertIn(b"\r\n..starts with a dot\r\n", sent)
        self.assertTrue(sent.endswith(b"\r\n.\r\n"))
        s.feed(b"250 queued\r\n")
        self.assertEqual(results[0]["x@peer.test"].code, 250)
