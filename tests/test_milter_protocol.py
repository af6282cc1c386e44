"""
The milter codec (twisted_mta.milter_protocol), from tables.  Expected
bytes are written out by hand from the protocol description, not made
with the codec.
"""

from __future__ import annotations

import struct

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import milter_protocol as mp
from twisted_mta.reply import Reply


class EncodeTests(SynchronousTestCase):
    def test_packets(self):
        """Each command packet: length (of command and data), command octet, NUL-terminated strings."""
        table = [
            (mp.optneg_packet(0x3F, 0x7F),
             b"\x00\x00\x00\x0dO\x00\x00\x00\x06\x00\x00\x00\x3f\x00\x00\x00\x7f"),
            (mp.connect_packet("[192.0.2.1]", "4", 25, "192.0.2.1"),
             b"\x00\x00\x00\x1aC[192.0.2.1]\x004\x00\x19192.0.2.1\x00"),
            (mp.connect_packet("localhost", "U", 0, ""), b"\x00\x00\x00\x0cClocalhost\x00U"),
            (mp.helo_packet("client.example"), b"\x00\x00\x00\x10Hclient.example\x00"),
            (mp.args_packet(mp.MAIL, "a@b.example", ["SIZE=10"]),
             b"\x00\x00\x00\x17M<a@b.example>\x00SIZE=10\x00"),
            (mp.args_packet(mp.MAIL, "", []), b"\x00\x00\x00\x04M<>\x00"),
            (mp.macro_packet(mp.CONNECT, {"j": "mx", "daemon_name": "mx"}),
             b"\x00\x00\x00\x18DCj\x00mx\x00{daemon_name}\x00mx\x00"),
            (mp.header_packet(b"Subject", b"hi"), b"\x00\x00\x00\x0cLSubject\x00hi\x00"),
            (mp.encode(mp.BODYEOB), b"\x00\x00\x00\x01E"),
            # A NUL inside a value cannot be sent: it is dropped.
            (mp.helo_packet("a\x00b"), b"\x00\x00\x00\x04Hab\x00"),
        ]
        for got, want in table:
            self.assertEqual(got, want)

    def test_body_packets_at_most_65535(self):
        """A body chunk over 65535 octets is split; nothing is lost."""
        packets = mp.body_packets(b"x" * 140000)
        sizes = [struct.unpack("!I", p[:4])[0] - 1 for p in packets]
        self.assertEqual(sizes, [65535, 65535, 140000 - 2 * 65535])


class ParserTests(SynchronousTestCase):
    def test_split_across_reads(self):
        """Packets are found whatever the read boundaries."""
        stream = b"\x00\x00\x00\x01c" + b"\x00\x00\x00\x07hX-A\x001\x00"
        p = mp.PacketParser()
        out = []
        for i in range(len(stream)):
            out += p.feed(stream[i:i + 1])
        self.assertEqual(out, [(b"c", b""), (b"h", b"X-A\x001\x00")])

    def test_bad_lengths(self):
        """A zero length or one over the limit is a protocol error, before buffering it."""
        for header in (b"\x00\x00\x00\x00", struct.pack("!I", mp.MAX_PACKET + 1)):
            self.assertRaises(mp.MilterProtocolError, mp.PacketParser().feed, header + b"c")


class NegotiateTests(SynchronousTestCase):
    def test_table(self):
        """The milter's OPTNEG answer: accepted, narrowed or refused."""
        def answer(version, actions, protocol, extra=b""):
            return struct.pack("!III", version, actions, protocol) + extra
        n = mp.negotiate(answer(6, 0x03, 0x80))
        self.assertEqual((n.version, n.actions, n.protocol), (6, 0x03, 0x80))
        self.assertFalse(n.replies(mp.HEADER))
        self.assertTrue(n.replies(mp.BODY))
        self.assertTrue(n.sends(mp.HELO))
        n = mp.negotiate(answer(6, 0, 0x02 | 0x800))  # RCPT_REJ is not offered: dropped
        self.assertEqual(n.protocol, 0x02)
        self.assertFalse(n.sends(mp.HELO))
        n = mp.negotiate(answer(6, 0, 0, b"\x00\x00\x00\x05i {auth_authen}\x00"))
        self.assertEqual(n.macros, {mp.BODYEOB: ("i", "auth_authen")})
        for bad in (answer(7, 0, 0), answer(1, 0, 0), answer(6, 0x200, 0), b"\x00" * 11,
                    answer(6, 0, 0, b"\x00\x00\x00\x01ab")):
            self.assertRaises(mp.MilterProtocolError, mp.negotiate, bad)


class ResponseTests(SynchronousTestCase):
    def test_table(self):
        """Each reply and modification packet, decoded; the malformed ones are errors."""
        table = [
            (b"c", b"", mp.Verdict("continue")),
            (b"a", b"", mp.Verdict("accept")),
            (b"r", b"", mp.Verdict("reject")),
            (b"t", b"", mp.Verdict("tempfail")),
            (b"d", b"", mp.Verdict("discard")),
            (b"s", b"", mp.Verdict("skip")),
            (b"p", b"", None),
            (b"y", b"550 5.7.1 No thanks\x00",
             mp.Verdict("reject", Reply(550, "5.7.1", "No thanks"))),
            (b"y", b"421 busy\x00", mp.Verdict("tempfail", Reply(421, "4.7.1", "busy"))),
            (b"h", b"X-A\x00one\x00", mp.AddHeader(b"X-A", b"one")),
            (b"h", b"X-A\x00one\n\ttwo\x00", mp.AddHeader(b"X-A", b"one\r\n\ttwo")),
            (b"i", b"\x00\x00\x00\x02X-B\x00v\x00", mp.InsertHeader(2, b"X-B", b"v")),
            (b"m", b"\x00\x00\x00\x01Subject\x00\x00", mp.ChangeHeader(1, b"Subject", b"")),
            (b"b", b"new body", mp.ReplaceBody(b"new body")),
            (b"q", b"looks bad\x00", mp.Quarantine("looks bad")),
            (b"e", b"<x@y.example>\x00", mp.ChangeFrom("x@y.example")),
            (b"e", b"<>\x00", mp.ChangeFrom("")),
            (b"+", b"<r@y.example>\x00", mp.AddRecipient("r@y.example")),
            (b"2", b"<r@y.example>\x00NOTIFY=NEVER\x00", mp.AddRecipient("r@y.example")),
            (b"-", b"<r@y.example>\x00", mp.DeleteRecipient("r@y.example")),
        ]
        for command, data, want in table:
            self.assertEqual(mp.decode_response(command, data), want, command)
        bad = [
            (b"y", b"250 2.0.0 ok\x00"),  # not a refusal
            (b"y", b"550 4.7.1 mismatch\x00"),  # enhanced class differs
            (b"y", b"550-5.7.1 a\r\n451 4.7.1 b\x00"),  # codes differ
            (b"y", b"55 short\x00"),
            (b"y", b"550 text\x07bell\x00"),
            (b"h", b"Bad Name\x00v\x00"),
            (b"h", b"X-A\x00one\ntwo\x00"),  # a line break that starts a new header
            (b"h", b"X-A\x00one\rtwo\x00"),
            (b"h", b"X-A\x00"),  # one string only
            (b"m", b"\x00\x00"),
            (b"e", b"<a b@c>\x00"),
            (b"+", b"<>\x00"),  # no recipient to add
            (b"-", b"\x00"),
            (b"Z", b""),
        ]
        for command, data in bad:
            self.assertRaises(mp.MilterProtocolError, mp.decode_response, command, data)

    def test_multiline_replycode(self):
        r = mp.parse_reply_code(b"451-4.7.1 first\r\n451 4.7.1 second")
        self.assertEqual(r, Reply(451, "4.7.1", "first\nsecond"))
        self.assertEqual(r.lines(), [b"451-4.7.1 first", b"451 4.7.1 second"])

    def test_modification_needs_negotiated_action(self):
        """An edit the milter did not ask for in OPTNEG is a protocol error."""
        table = [(b"h", b"X\x00v\x00", mp.F_ADDHDRS), (b"m", b"\x00\x00\x00\x01X\x00\x00",
                                                     mp.F_CHGHDRS),
                 (b"b", b"x", mp.F_CHGBODY), (b"q", b"r\x00", mp.F_QUARANTINE),
                 (b"e", b"<a@b>\x00", mp.F_CHGFROM), (b"+", b"<a@b>\x00", mp.F_ADDRCPT),
                 (b"-", b"<a@b>\x00", mp.F_DELRCPT)]
        for command, data, flag in table:
            self.assertRaises(mp.MilterProtocolError, mp.decode_response, command, data,
                              mp.OUR_ACTIONS & ~flag)
            self.assertIsNotNone(mp.decode_response(command, data, flag))


class HeaderTests(SynchronousTestCase):
    HEADERS = [(b"Received", b" from a"), (b"Subject", b" one"), (b"X-T", b" 1"),
               (b"x-t", b" 2")]

    def test_edits(self):
        """Add, insert, change and delete, as Sendmail applies them."""
        table = [
            ([mp.AddHeader(b"X-New", b"v")], self.HEADERS + [(b"X-New", b" v")]),
            ([mp.InsertHeader(0, b"X-New", b"v")], [(b"X-New", b" v")] + self.HEADERS),
            ([mp.InsertHeader(2, b"X-New", b"v")],
             self.HEADERS[:2] + [(b"X-New", b" v")] + self.HEADERS[2:]),
            ([mp.InsertHeader(99, b"X-New", b"v")], self.HEADERS + [(b"X-New", b" v")]),
            ([mp.ChangeHeader(2, b"X-T", b"b")],
             self.HEADERS[:3] + [(b"x-t", b" b")]),
            ([mp.ChangeHeader(1, b"x-t", b"")], self.HEADERS[:2] + self.HEADERS[3:]),
            ([mp.ChangeHeader(3, b"X-T", b"c")], self.HEADERS + [(b"X-T", b" c")]),
            ([mp.ChangeHeader(3, b"X-T", b"")], self.HEADERS),
            ([mp.ChangeHeader(1, b"Subject", b"\tkept")],
             [self.HEADERS[0], (b"Subject", b"\tkept")] + self.HEADERS[2:]),
        ]
        for edits, want in table:
            self.assertEqual(mp.apply_header_edits(self.HEADERS, edits), want, edits)

    def test_split_head(self):
        table = [
            (b"A: 1\r\n\tmore\r\nB:2\r\n\r\nbody\r\n", True,
             ([(b"A", b" 1\r\n\tmore"), (b"B", b"2")], 20, True)),
            (b"A: 1\r\n", False, None),  # a continuation may follow
            (b"A: 1\r\n", True, ([(b"A", b" 1")], 6, False)),
            (b"A: 1\r\nnot a header\r\nB: 2\r\n", True, ([(b"A", b" 1")], 6, False)),
            (b"\r\nbody\r\n", True, ([], 2, True)),
            (b"just body\r\n", True, ([], 0, False)),
        ]
        for data, complete, want in table:
            self.assertEqual(mp.split_head(data, complete), want, data)

    def test_milter_value(self):
        self.assertEqual(mp.milter_value(b"  a\r\n\tb"), b"a\n\tb")


class AddressTests(SynchronousTestCase):
    def test_table(self):
        table = [
            ("inet:127.0.0.1:8891", mp.MilterAddress(host="127.0.0.1", port=8891)),
            ("inet:8891@localhost", mp.MilterAddress(host="localhost", port=8891)),
            ("inet6:[::1]:8891", mp.MilterAddress(host="::1", port=8891)),
            ("unix:/run/opendkim/opendkim.sock",
             mp.MilterAddress(path="/run/opendkim/opendkim.sock")),
            ("local:/x.sock", mp.MilterAddress(path="/x.sock")),
        ]
        for text, want in table:
            self.assertEqual(mp.parse_milter_address(text), want)
        for bad in ("127.0.0.1:8891", "inet:host", "inet:host:0", "inet::25",
                    "unix:relative", "tcp:1.2.3.4:5", "inet:h:99999"):
            self.assertRaises(ValueError, mp.parse_milter_address, bad)


class NormalizerTests(SynchronousTestCase):
    def test_chunks(self):
        table = [
            ([b"a\nb\n"], b"a\r\nb\r\n"),
            ([b"a\r", b"\nb"], b"a\r\nb\r\n"),
            ([b"a\r", b"b\r"], b"a\r\nb\r\n"),
            ([b"x\r\n"], b"x\r\n"),
            ([], b""),
        ]
        for chunks, want in table:
            n = mp.CRLFNormalizer()
            self.assertEqual(b"".join(n.feed(c) for c in chunks) + n.finish(), want, chunks)
