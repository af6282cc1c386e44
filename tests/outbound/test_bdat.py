"""
Tests for outbound BDAT (RFC 3030): the client sends a message in counted
chunks when the server offers CHUNKING, and makes of each reply what it
makes of DATA's.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from tests.outbound.test_client import Session
from twisted_mta.model import Envelope, Recipient
from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound.message import WHOLE_LIMIT, OutgoingMessage, load

PIPE_CHUNKING = (b"250-mx.peer.test Hello\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                 b"250-8BITMIME\r\n250-DSN\r\n250 CHUNKING\r\n")
CHUNKING_ONLY = b"250-mx.peer.test Hello\r\n250-SIZE 104857600\r\n250 CHUNKING\r\n"
BODY = b"Subject: x\r\n\r\n.a dot, not stuffed\r\n.\r\nend\r\n"


def memory(body: bytes = BODY) -> OutgoingMessage:
    """A message as load() gives a small one: in memory, not stuffed."""
    return OutgoingMessage(path="/nonexistent", offset=0, size=len(body),
                           eight_bit=not body.isascii(), data=None, body=body)


def parse(stream: bytes) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """
    Split what the client wrote into command lines and (BDAT line, its
    octets) pairs, in order; the octets are taken by count, as a server does.
    """
    commands, chunks = [], []
    pos = 0
    while pos < len(stream):
        end = stream.index(b"\r\n", pos)
        line = stream[pos:end]
        pos = end + 2
        if line.startswith(b"BDAT "):
            n = int(line.split()[1])
            chunks.append((line, stream[pos:pos + n]))
            assert len(stream) >= pos + n, "a chunk shorter than its count"
            pos += n
        else:
            commands.append(line)
    return commands, chunks


class BdatClientTests(SynchronousTestCase):
    def send(self, s: Session, txn: Transaction) -> list:
        results = []
        s.client.send(txn).addCallback(results.append)
        return results

    def written(self, s: Session) -> bytes:
        out = s.transport.value()
        s.transport.clear()
        return out

    def test_pipelined_one_chunk(self):
        """With PIPELINING and CHUNKING, MAIL, RCPT and BDAT n LAST with the octets, unstuffed, go in one write; the reply to LAST is each recipient's outcome."""
        s = Session(self, chunk_size=1 << 20)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
        commands, chunks = parse(self.written(s))
        self.assertEqual(commands, [b"MAIL FROM:<a@x.test> SIZE=%d" % len(BODY),
                                    b"RCPT TO:<x@peer.test>"])
        self.assertEqual(chunks, [(b"BDAT %d LAST" % len(BODY), BODY)])
        self.assertEqual(results, [])
        s.feed(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 queued as ABC\r\n")
        r = results[0]["x@peer.test"]
        self.assertEqual((r.code, r.enhanced), (250, "2.0.0"))
        self.assertIn("queued as ABC (in reply to BDAT LAST)", r.text)
        self.assertTrue(s.client.ready)
        # The next message needs no RSET.
        self.send(s, Transaction("b@x.test", ("y@peer.test",), memory()))
        self.assertTrue(self.written(s).startswith(b"MAIL FROM:<b@x.test>"))

    def test_chunks_of_the_configured_size(self):
        """A message over chunk_size goes in chunks of that size, the last one with LAST; together they are the message octet for octet."""
        body = b"Subject: big\r\n\r\n" + b"".join(b"%05d .line\r\n" % i for i in range(900))
        s = Session(self, chunk_size=4096)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory(body)))
        commands, chunks = parse(self.written(s))
        sizes = [len(c) for _, c in chunks]
        self.assertEqual(len(body), 11716)
        self.assertEqual(sizes, [4096, 4096, 3524])
        self.assertEqual([line for line, _ in chunks],
                         [b"BDAT 4096"] * 2 + [b"BDAT 3524 LAST"])
        self.assertEqual(b"".join(c for _, c in chunks), body)
        s.feed(b"250 ok\r\n250 ok\r\n" + b"250 2.0.0 chunk ok\r\n" * 2 + b"250 2.0.0 done\r\n")
        self.assertEqual(results[0]["x@peer.test"].code, 250)
        self.assertIn("done", results[0]["x@peer.test"].text)

    def test_lock_step_without_pipelining(self):
        """Without PIPELINING each command, and each chunk, waits for the previous reply."""
        body = b"x" * 5000 + b"\r\n"
        s = Session(self, chunk_size=4096)
        s.establish(CHUNKING_ONLY)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory(body)))
        self.assertEqual(self.written(s), b"MAIL FROM:<a@x.test> SIZE=5002\r\n")
        s.client.dataReceived(b"250 ok\r\n")
        self.assertEqual(self.written(s), b"RCPT TO:<x@peer.test>\r\n")
        s.client.dataReceived(b"250 ok\r\n")
        self.assertEqual(parse(self.written(s)), ([], [(b"BDAT 4096", body[:4096])]))
        s.client.dataReceived(b"250 2.0.0 4096 octets\r\n")
        self.assertEqual(parse(self.written(s)), ([], [(b"BDAT 906 LAST", body[4096:])]))
        self.assertEqual(results, [])
        s.client.dataReceived(b"250 2.0.0 queued\r\n")
        self.assertEqual(self.written(s), b"")
        self.assertEqual(results[0]["x@peer.test"].code, 250)

    def test_failed_chunk_stops_the_message(self):
        """A 552 to a chunk fails the accepted recipients with the server's words; no further chunk is sent (RFC 3030 2) and the next transaction starts with RSET."""
        body = b"y" * 9000 + b"\r\n"
        s = Session(self, chunk_size=4096)
        s.establish(CHUNKING_ONLY)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory(body)))
        s.feed(b"250 ok\r\n")
        s.feed(b"250 ok\r\n")
        self.written(s)
        sent = s.feed(b"552 5.3.4 message too big\r\n")
        self.assertEqual(sent, [])
        r = results[0]["x@peer.test"]
        self.assertEqual((r.code, r.enhanced), (552, "5.3.4"))
        self.assertIn("(in reply to BDAT)", r.text)
        self.assertTrue(s.client.ready)
        self.send(s, Transaction("b@x.test", ("y@peer.test",), memory()))
        self.assertEqual(self.written(s), b"RSET\r\n")

    def test_failed_chunk_in_a_pipeline_ends_the_connection(self):
        """When a pipelined chunk fails while replies to later chunks are still due, the transaction fails and the client quits (those replies would be taken for the next message's)."""
        body = b"y" * 9000 + b"\r\n"
        s = Session(self, chunk_size=4096)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory(body)))
        self.assertEqual(len(parse(self.written(s))[1]), 3)
        sent = s.feed(b"250 ok\r\n250 ok\r\n451 4.3.0 disk trouble\r\n")
        self.assertEqual(sent, [b"QUIT"])
        r = results[0]["x@peer.test"]
        self.assertEqual((r.code, r.enhanced), (451, "4.3.0"))
        self.assertFalse(s.client.ready)

    def test_recipient_results_kept(self):
        """A refused RCPT keeps its own reply, the accepted one gets the reply to LAST."""
        s = Session(self, chunk_size=1 << 20)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test", "y@peer.test"), memory()))
        self.written(s)
        s.feed(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 2.0.0 queued\r\n")
        [r] = results
        self.assertEqual((r["x@peer.test"].code, r["y@peer.test"].code), (250, 550))
        self.assertIn("in reply to RCPT TO:<y@peer.test>", r["y@peer.test"].text)

    def test_all_recipients_refused_pipelined(self):
        """Every RCPT refused: the chunk (already sent) is refused too, and each recipient keeps its RCPT reply."""
        s = Session(self, chunk_size=1 << 20)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
        self.written(s)
        s.feed(b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
        r = results[0]["x@peer.test"]
        self.assertEqual((r.code, r.enhanced), (550, "5.1.1"))
        self.assertTrue(s.client.ready)
        self.send(s, Transaction("b@x.test", ("y@peer.test",), memory()))
        self.assertEqual(self.written(s)[:6], b"RSET\r\n")

    def test_all_recipients_refused_lock_step(self):
        """Without pipelining no chunk is sent when no recipient was accepted."""
        s = Session(self, chunk_size=1 << 20)
        s.establish(CHUNKING_ONLY)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
        s.feed(b"250 ok\r\n")
        self.written(s)
        self.assertEqual(s.feed(b"550 5.1.1 unknown\r\n"), [])
        self.assertEqual(results[0]["x@peer.test"].enhanced, "5.1.1")

    def test_mail_refused_pipelined(self):
        """MAIL refused: every recipient gets MAIL's reply, whatever the chunk got."""
        s = Session(self, chunk_size=1 << 20)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
        self.written(s)
        s.feed(b"553 5.1.8 bad sender\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
        r = results[0]["x@peer.test"]
        self.assertEqual(r.enhanced, "5.1.8")
        self.assertIn("in reply to MAIL FROM", r.text)

    def test_temporary_failure_at_last(self):
        """A 4xx to LAST is a temporary failure for the recipients, like one after DATA's dot; RSET before the next message."""
        s = Session(self, chunk_size=1 << 20)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
        self.written(s)
        s.feed(b"250 ok\r\n250 ok\r\n451 4.3.0 try later\r\n")
        r = results[0]["x@peer.test"]
        self.assertEqual((r.code, r.enhanced), (451, "4.3.0"))
        self.send(s, Transaction("b@x.test", ("y@peer.test",), memory()))
        self.assertEqual(self.written(s)[:6], b"RSET\r\n")

    def test_dsn_passed_on(self):
        """Success after BDAT LAST marks DSN requests as passed on, as after DATA."""
        s = Session(self, chunk_size=1 << 20)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory(),
                                           dsn=((("SUCCESS",), None),)))
        self.written(s)
        s.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n")
        self.assertTrue(results[0]["x@peer.test"].dsn_passed)

    def test_connection_lost_between_chunks(self):
        """A connection lost while chunks are unanswered: a temporary outcome."""
        s = Session(self, chunk_size=4096)
        s.establish(CHUNKING_ONLY)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",),
                                           memory(b"z" * 9000 + b"\r\n")))
        s.feed(b"250 ok\r\n250 ok\r\n")
        s.lose()
        r = results[0]["x@peer.test"]
        self.assertEqual(r.enhanced, "4.4.2")
        self.assertIn("lost connection", r.text)

    def test_chunk_reply_timeout(self):
        """No reply to a chunk within the data timeout: a temporary failure naming BDAT."""
        from twisted_mta.outbound.client import Timeouts
        s = Session(self, chunk_size=1 << 20, timeouts=Timeouts(command=300, data=600))
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
        s.feed(b"250 ok\r\n250 ok\r\n")
        s.clock.advance(599)
        self.assertEqual(results, [])
        s.clock.advance(2)
        r = results[0]["x@peer.test"]
        self.assertEqual(r.enhanced, "4.4.2")
        self.assertIn("BDAT", r.text)

    def test_trace_header_counted(self):
        """The trace line we prepend is inside the first chunk and in SIZE= and the counts."""
        s = Session(self, chunk_size=4096)
        s.client.trace = "X-Trace: hop"
        s.establish(PIPE_CHUNKING)
        self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
        commands, chunks = parse(self.written(s))
        whole = b"X-Trace: hop\r\n" + BODY
        self.assertEqual(commands[0], b"MAIL FROM:<a@x.test> SIZE=%d" % len(whole))
        self.assertEqual(chunks, [(b"BDAT %d LAST" % len(whole), whole)])

    def test_empty_message(self):
        """An empty message is BDAT 0 LAST."""
        s = Session(self, chunk_size=4096)
        s.establish(PIPE_CHUNKING)
        self.send(s, Transaction("a@x.test", ("x@peer.test",), memory(b"")))
        self.assertEqual(parse(self.written(s))[1], [(b"BDAT 0 LAST", b"")])

    def test_data_without_chunking_or_when_off(self):
        """DATA (dot-stuffed) when the server does not offer CHUNKING, or when we do not use it ([outbound] chunking = false)."""
        for ehlo, chunk_size in ((b"250-mx.peer.test\r\n250 PIPELINING\r\n", 4096),
                                 (PIPE_CHUNKING, None)):
            s = Session(self, chunk_size=chunk_size)
            s.establish(ehlo)
            results = self.send(s, Transaction("a@x.test", ("x@peer.test",), memory()))
            self.assertEqual(s.sent()[-1], b"DATA")
            s.client.dataReceived(b"250 ok\r\n250 ok\r\n354 go\r\n")
            self.assertEqual(self.written(s), b"Subject: x\r\n\r\n..a dot, not stuffed\r\n"
                                              b"..\r\nend\r\n.\r\n")
            s.feed(b"250 ok\r\n")
            self.assertEqual(results[0]["x@peer.test"].code, 250)

    def test_big_message_read_from_the_queue_file(self):
        """A message too big for memory is read from its queue file a chunk at a time and sent unstuffed; a file shorter than its envelope says is never sent short."""
        env = Envelope(queue_id="Q", sender="a@x.test", recipients=(Recipient("x@peer.test"),),
                       arrival=0)
        line = b"." + b"x" * 997 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * (WHOLE_LIMIT // len(line) + 50)
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(env.to_header() + body)
        msg = load(path)
        self.assertIsNone(msg.body)
        s = Session(self, run_blocking=defer.maybeDeferred, chunk_size=300_000)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), msg))
        commands, chunks = parse(self.written(s))
        self.assertEqual([len(c) for _, c in chunks][:-1], [300_000] * 3)
        self.assertEqual(b"".join(c for _, c in chunks), body)
        self.assertTrue(chunks[-1][0].endswith(b" LAST"))
        s.feed(b"250 ok\r\n250 ok\r\n" + b"250 ok\r\n" * len(chunks))
        self.assertEqual(results[0]["x@peer.test"].code, 250)
        # The file loses its tail after load(): the client stops, nothing short goes out.
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 10)
        s = Session(self, run_blocking=defer.maybeDeferred, chunk_size=300_000)
        s.establish(PIPE_CHUNKING)
        results = self.send(s, Transaction("a@x.test", ("x@peer.test",), msg))
        commands, chunks = parse(self.written(s))
        self.assertEqual(len(chunks), 3)
        self.assertFalse(any(line.endswith(b"LAST") for line, _ in chunks))
        self.assertTrue(s.transport.disconnecting)
        self.assertIn("queue file ended 10 octets early", results[0]["x@peer.test"].text)
