"""
Tests for inbound BDAT (RFC 3030 CHUNKING): dialogues over a fake
transport, the message stored, and the protections DATA has (the same
reader: bare CR/LF, line length, size, smuggling), with memory bounded.
"""

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support import ServerHarness
from twisted_mta.outbound.message import stuff

ENVELOPE = b"EHLO c.example\r\nMAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
BODY = b"Subject: chunked\r\n\r\nhello\r\n"
QUEUED = "250 2.0.0 Ok: queued as "


def bdat(data: bytes, last: bool = False) -> bytes:
    return b"BDAT %d%s\r\n" % (len(data), b" LAST" if last else b"") + data


def codes(lines: list[str]) -> list[str]:
    """The reply codes, EHLO's multi-line reply as one."""
    return [line[:3] for line in lines if line[3:4] != "-"]


class DialogueTests(SynchronousTestCase):
    """
    One table: each row is the input after EHLO (in one piece, i.e.
    pipelined), the reply codes expected after EHLO's, and the bodies
    queued (the stored message after our Received header).
    """

    ROWS = [
        ("one chunk with LAST",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n" + bdat(BODY, True),
         ["250", "250", "250"], [BODY]),
        ("two chunks, then BDAT 0 LAST",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(BODY[:10]) + bdat(BODY[10:]) + bdat(b"", True),
         ["250", "250", "250", "250", "250"], [BODY]),
        ("a line split across chunks, its CRLF too",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(b"Subject: a\r\n\r\nab\r") + bdat(b"\ncd\r\n", True),
         ["250", "250", "250", "250"], [b"Subject: a\r\n\r\nab\r\ncd\r\n"]),
        ("BDAT before MAIL: octets consumed, 503, in step after",
         bdat(b"NOOP\r\nNOOP\r\n") + b"NOOP\r\n",
         ["503", "250"], []),
        ("BDAT LAST before MAIL, then a whole transaction",
         bdat(b"RSET\r\n", True) + b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(BODY, True),
         ["503", "250", "250", "250"], [BODY]),
        ("BDAT without a valid recipient: 554, octets consumed",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<nobody@example.test>\r\n"
         + bdat(b"QUIT\r\n", True) + b"NOOP\r\n",
         ["250", "550", "554", "250"], []),
        ("BDAT after BDAT LAST: 503",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(BODY, True) + bdat(b"x", True),
         ["250", "250", "250", "503"], [BODY]),
        ("DATA after BDAT: 503, and the message goes on",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(BODY) + b"DATA\r\n" + bdat(b"more\r\n", True),
         ["250", "250", "250", "503", "250"], [BODY + b"more\r\n"]),
        ("RCPT after BDAT: 503",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(BODY) + b"RCPT TO:<bob@example.test>\r\n" + bdat(b"", True),
         ["250", "250", "250", "503", "250"], [BODY]),
        ("RSET between chunks discards them",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(BODY) + b"RSET\r\n" + bdat(b"tail\r\n", True),
         ["250", "250", "250", "250", "503"], []),
        ("BDAT 0 LAST alone: an empty message",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n" + bdat(b"", True),
         ["250", "250", "250"], [b""]),
        ("two messages pipelined on one connection",
         (b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n" + bdat(BODY, True)) * 2,
         ["250"] * 6, [BODY, BODY]),
        ("DATA, then BDAT in the next transaction",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n"
         + BODY + b".\r\n"
         + b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n" + bdat(BODY, True),
         ["250", "250", "354", "250", "250", "250", "250"], [BODY, BODY]),
        ("the last line without CRLF gets one",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(b"Subject: x\r\n\r\nno end", True),
         ["250", "250", "250"], [b"Subject: x\r\n\r\nno end\r\n"]),
        ("no dot-unstuffing and no end of data inside a chunk",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(b"Subject: x\r\n\r\n..two\r\n.\r\n", True),
         ["250", "250", "250"], [b"Subject: x\r\n\r\n..two\r\n.\r\n"]),
        ("bare LF normalised as in DATA",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(b"Subject: x\r\n\r\na\nb\rc\r\n", True),
         ["250", "250", "250"], [b"Subject: x\r\n\r\na\r\nb\r\nc\r\n"]),
        ("NUL refused at LAST, as in DATA",
         b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
         + bdat(b"Subject: x\r\n\r\na\x00b\r\n", True) + b"NOOP\r\n",
         ["250", "250", "554", "250"], []),
    ]

    def test_table(self):
        """Every dialogue of the table gives its replies in order and queues its messages."""
        for name, data, expected, bodies in self.ROWS:
            for split in (False, True):
                with self.subTest(name=name, split=split):
                    h = ServerHarness(self)
                    h.ehlo()
                    if split:  # byte by byte: the same result
                        lines = []
                        for i in range(len(data)):
                            lines += h.send(data[i:i + 1])
                    else:
                        lines = h.send(data)
                    self.assertEqual(codes(lines), expected, lines)
                    stored = [m.split(b";\r\n\t", 1)[1].split(b"\r\n", 1)[1]
                              for m in h.queued_messages()]
                    self.assertEqual(stored, bodies)
                    self.assertFalse(h.transport.disconnecting)
                    if not bodies:
                        self.assertEqual(h.spool_entries(), [])


class BdatTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def start(self, **sections) -> ServerHarness:
        h = ServerHarness(self, **sections)
        lines = h.send(ENVELOPE)
        self.assertEqual(codes(lines), ["250", "250", "250"])
        return h

    def test_replies_and_stored_message(self):
        """Each chunk gets 250 with its size, LAST the queue id; the stored message has our Received header and the octets as sent; the log says BDAT and how many chunks."""
        h = self.start()
        self.assertEqual(h.send(bdat(b"Subject: s\r\n")), ["250 2.0.0 Ok: 12 octets received"])
        self.assertEqual(h.queued, [])
        lines = h.send(bdat(b"\r\nbody\r\n", True))
        self.assertEqual(lines, [QUEUED + h.queued[0].queue_id])
        stored = h.queued_messages()[0]
        self.assertTrue(stored.startswith(b"Received: from c.example ([192.0.2.10])\r\n"), stored)
        self.assertTrue(stored.endswith(b"\r\nSubject: s\r\n\r\nbody\r\n"), stored)
        self.assertEqual(h.queued[0].size, len(b"Subject: s\r\n\r\nbody\r\n"))
        queued = [e for e in self.events if e.get("event") == "inbound.queued"]
        self.assertEqual([(e["command"], e["chunks"]) for e in queued], [("BDAT", 2)])

    def test_data_logged_as_data(self):
        """A message that came with DATA is logged with command DATA and no chunks."""
        h = ServerHarness(self)
        h.start_transaction()
        h.send(BODY + b".\r\n")
        queued = [e for e in self.events if e.get("event") == "inbound.queued"]
        self.assertEqual([(e["command"], e["chunks"]) for e in queued], [("DATA", 0)])

    def test_smuggled_transaction_stays_inside_the_message(self):
        """A chunk holding CRLF.CRLF and a second transaction (and LF.LF, CR.CR forms) yields one message with that text inside, stored as CRLF lines; sent onward with DATA it is dot-stuffed, so the only end of data is the real one."""
        smuggled = (b"Subject: one\r\n\r\nfirst\r\n.\r\nMAIL FROM:<evil@remote.test>\r\n"
                    b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: two\r\n\r\nx\n.\n"
                    b"y\r.\rz\r\n.\r\n")
        h = self.start()
        lines = h.send(bdat(smuggled, True) + b"QUIT\r\n")
        self.assertEqual(codes(lines), ["250", "221"])
        self.assertEqual(len(h.queued), 1)
        self.assertEqual([r.address for r in h.queued[0].recipients], ["alice@example.test"])
        body = h.queued_messages()[0].split(b"Subject: one\r\n", 1)[1]
        self.assertEqual(body, b"\r\nfirst\r\n.\r\nMAIL FROM:<evil@remote.test>\r\n"
                               b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: two\r\n\r\n"
                               b"x\r\n.\r\ny\r\n.\r\nz\r\n.\r\n")
        onward = stuff(h.queued_messages()[0])
        self.assertEqual(onward.count(b"\r\n.\r\n"), 1)
        self.assertTrue(onward.endswith(b"\r\n.\r\n"))
        self.assertNotIn(b"\n", onward.replace(b"\r\n", b""))

    def test_bare_newline_rejected_under_reject(self):
        """With bare_newline = "reject", a bare LF in a chunk refuses the message at that chunk (554 5.6.0); the rest of the pipelined chunks are read and answered 503, not counted as errors."""
        h = self.start(inbound={"bare_newline": "reject"})
        lines = h.send(bdat(b"Subject: x\r\n\r\na\nb\r\n") + bdat(b"more\r\n") * 30
                       + bdat(b"end\r\n", True) + b"NOOP\r\n")
        self.assertEqual(lines[0], "554 5.6.0 Message contains a bare CR or LF; lines must end "
                                   "with CRLF")
        self.assertEqual(lines[1:32], ["503 5.5.1 An earlier BDAT of this message failed; "
                                       "send RSET"] * 31)
        self.assertEqual(lines[32:], ["250 2.0.0 Ok"])
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])
        # A new transaction takes chunks again.
        lines = h.send(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                       + bdat(BODY, True))
        self.assertEqual(codes(lines), ["250", "250", "250"])
        self.assertEqual(len(h.queued), 1)

    def test_bare_cr_at_last_chunk_end(self):
        """A CR ending the last chunk ends that line under normalize; under reject it is a bare CR."""
        h = self.start()
        h.send(bdat(b"Subject: x\r\n\r\nend\r", True))
        self.assertTrue(h.queued_messages()[0].endswith(b"\r\n\r\nend\r\n"))
        h = self.start(inbound={"bare_newline": "reject"})
        self.assertEqual(codes(h.send(bdat(b"Subject: x\r\n\r\nend\r", True))), ["554"])
        self.assertEqual(h.queued, [])

    def test_declared_size_over_limit(self):
        """A chunk whose declared size takes the message over [limits] message_size is read whole, then refused 552 5.3.4; nothing is stored and the session stays in step."""
        h = self.start(limits={"message_size": 2048})
        lines = h.send(bdat(b"a" * 1000 + b"\r\n"))
        self.assertEqual(lines, ["250 2.0.0 Ok: 1002 octets received"])
        over = b"b" * 1100
        lines = h.send(bdat(over) + bdat(b"c\r\n", True) + b"NOOP\r\n")
        self.assertEqual(lines, [
            "552 5.3.4 Message exceeds the size limit of 2048 octets",
            "503 5.5.1 An earlier BDAT of this message failed; send RSET",
            "250 2.0.0 Ok"])
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])

    def test_single_chunk_over_limit_consumed_in_pieces(self):
        """A refused chunk far over the limit is read in pieces and dropped: nothing of it is kept (the input buffer stays empty), then 552."""
        h = self.start(limits={"message_size": 1 << 20})
        size = 8 << 20
        h.send(b"BDAT %d LAST\r\n" % size)
        piece = b"MAIL FROM:<x@y>\r\n" * 4096
        sent = 0
        while sent < size:
            data = piece[:size - sent]
            lines = h.send(data)
            sent += len(data)
            self.assertEqual(h.protocol._inbuf, b"")
            if sent < size:
                self.assertEqual(lines, [])
        self.assertEqual(lines, ["552 5.3.4 Message exceeds the size limit of 1048576 octets"])
        self.assertEqual(h.send(b"NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(h.queued, [])

    def test_accepted_chunk_memory_bounded(self):
        """A 4 MiB chunk fed in 64 KiB reads keeps no more than one partial line between reads, and is stored whole."""
        h = self.start()
        line = b"x" * 997 + b"\r\n"
        body = b"Subject: big\r\n\r\n" + line * 4200
        data = bdat(body, True)
        for i in range(0, len(data), 65536):
            h.send(data[i:i + 65536])
            self.assertEqual(h.protocol._inbuf, b"")
            self.assertLess(len(h.protocol._bdat_carry), len(line))
        self.assertEqual(len(h.queued), 1)
        self.assertTrue(h.queued_messages()[0].endswith(body))

    def test_long_line(self):
        """A line over [limits] data_line_length in a chunk refuses the message (554 5.6.0) at that chunk."""
        h = self.start()
        lines = h.send(bdat(b"Subject: x\r\n\r\n" + b"y" * 9000 + b"\r\n"))
        self.assertEqual(lines, ["554 5.6.0 Message contains a line longer than 8192 octets"])
        self.assertEqual(h.spool_entries(), [])

    def test_long_line_across_chunks(self):
        """A long line spread over small chunks is caught too (the partial line is carried, then counted, not kept)."""
        h = self.start()
        lines = h.send(bdat(b"Subject: x\r\n\r\n") + bdat(b"y" * 5000) + bdat(b"y" * 5000)
                       + bdat(b"\r\n", True))
        self.assertEqual(codes(lines), ["250", "250", "554", "503"])
        self.assertEqual(h.queued, [])

    def test_connection_lost_mid_chunk(self):
        """A connection that closes in the middle of a chunk (or between chunks) leaves nothing queued and no debris."""
        for data in (bdat(BODY)[:-5], bdat(BODY)):
            h = self.start()
            h.send(data)
            h.protocol.connectionLost(None)
            self.assertEqual(h.queued, [])
            self.assertEqual(h.spool_entries(), [])
        aborted = [e for e in self.events if e.get("event") == "inbound.data-aborted"]
        self.assertEqual([e["command"] for e in aborted], ["BDAT", "BDAT"])

    def test_ehlo_between_chunks_discards(self):
        """EHLO between chunks resets the transaction: the chunks so far are dropped."""
        h = self.start()
        h.send(bdat(BODY))
        h.ehlo()
        self.assertEqual(h.spool_entries(), [])
        self.assertEqual(codes(h.send(bdat(b"x", True))), ["503"])

    def test_malformed_bdat_closes(self):
        """BDAT without a valid count (or with a word other than LAST) is 501 5.5.4 and closes the connection: the chunk's end is unknown."""
        for arg in (b"", b" x", b" -1", b" 5 LATER", b" 5 LAST MORE", b" 1e3"):
            h = self.start()
            lines = h.send(b"BDAT" + arg + b"\r\nNOOP\r\n")
            self.assertEqual(lines, ["501 5.5.4 Syntax: BDAT chunk-size [LAST]; closing the "
                                     "connection"], arg)
            self.assertTrue(h.transport.disconnecting)
            self.assertEqual(h.spool_entries(), [])

    def test_last_case_insensitive(self):
        """'last' in any case ends the message."""
        h = self.start()
        h.send(b"BDAT 5 last\r\nabc\r\n")
        self.assertEqual(len(h.queued), 1)

    def test_chunking_off(self):
        """With [inbound] chunking = false, EHLO does not list CHUNKING and BDAT is an unknown command."""
        h = ServerHarness(self, inbound={"chunking": False})
        self.assertNotIn("250-CHUNKING", h.ehlo())
        self.assertNotIn("250 CHUNKING", h.ehlo())
        self.assertEqual(h.send(b"BDAT 0 LAST\r\n"), ["500 5.5.1 Command unrecognized"])

    def test_idle_inside_chunk_times_out(self):
        """A client that stops inside a chunk is cut off by the data timeout; nothing is queued."""
        h = self.start(limits={"min_data_rate": 0})
        h.send(b"BDAT 1000 LAST\r\nSubject: x\r\n")
        h.clock.advance(599)
        self.assertEqual(h.read(), [])
        h.clock.advance(2)
        self.assertEqual(h.read(), ["421 4.4.2 Timeout exceeded, closing connection"])
        h.protocol.connectionLost(None)
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])

    def test_slow_chunks_hit_data_rate(self):
        """min_data_rate counts the octets of the chunks: a client dripping a chunk is cut off with 421 like a slow DATA, discarded chunks included."""
        for envelope in (True, False):
            h = ServerHarness(self, limits={"min_data_rate": 100, "data_rate_grace": 10})
            if envelope:
                h.send(ENVELOPE)
            else:
                h.ehlo()  # the chunk is refused (no MAIL) but must still come in time
            h.read()
            h.send(b"BDAT 100000 LAST\r\n")
            lines = []
            for _ in range(30):
                h.clock.advance(1)
                lines += h.send(b"x")
            self.assertEqual(lines, ["421 4.4.2 Message data arriving too slowly, closing "
                                     "connection"])
            self.assertTrue(h.transport.disconnecting)
            self.assertEqual(h.queued, [])

    def test_final_reply_waits_for_commit(self):
        """The 250 after BDAT LAST comes only when the commit is durable; input pipelined behind it waits."""
        from twisted.internet import defer
        h = self.start()
        commits = []
        writer_class = type(h.spool.new_message())
        real = writer_class.commit

        def slow_commit(writer, envelope):
            d = defer.Deferred()
            commits.append((d, writer, envelope))
            return d
        self.patch(writer_class, "commit", slow_commit)
        self.assertEqual(h.send(bdat(BODY, True) + b"NOOP\r\n"), [])
        d, writer, envelope = commits[0]
        real(writer, envelope).chainDeferred(d)
        lines = h.read()
        self.assertEqual(codes(lines), ["250", "250"])
        self.assertTrue(lines[0].startswith(QUEUED))
