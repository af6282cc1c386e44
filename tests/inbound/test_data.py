"""
Tests for the DATA reader: end-of-data recognition, unstuffing, limits, and
that the fast path and the line path agree on any input and any split.
"""

import random

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.inbound.data import DataReader, has_long_line


def read(stream: bytes, chunks, **kw):
    """
    Feed C{stream} split at C{chunks} boundaries; return (stored, rest, reader).
    """
    out = []
    options = dict(max_size=10_000_000, max_line=1000, max_received=100, bare_newline="normalize")
    options.update(kw)
    reader = DataReader(out.append, **options)
    buf = b""
    done = False
    pieces = [stream[a:b] for a, b in zip([0] + chunks, chunks + [len(stream)])]
    for piece in pieces:
        buf += piece
        if done:
            continue
        consumed, done = reader.feed(buf)
        buf = buf[consumed:]
    return b"".join(out), buf, reader, done


def reference(stream: bytes, normalize=True):
    """
    The obvious, slow decoder: split on CRLF, stop at '.', unstuff, normalise.
    """
    lines = []
    pos = 0
    size = 0
    while True:
        idx = stream.find(b"\r\n", pos)
        if idx < 0:
            return None, None, None
        line = stream[pos:idx]
        pos = idx + 2
        if line == b".":
            return b"".join(lines), stream[pos:], size
        if line.startswith(b"."):
            line = line[1:]
        size += len(line) + 2
        if normalize:
            line = line.replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        lines.append(line + b"\r\n")


class DataReaderTests(SynchronousTestCase):
    def test_end_of_data_only_on_crlf_dot_crlf(self):
        """Only CRLF.CRLF ends data; what follows is left for the command parser."""
        stored, rest, reader, done = read(b"a\r\nb\n.\nc\r\n.\r\nQUIT\r\n", [])
        self.assertTrue(done)
        self.assertEqual(stored, b"\r\na\r\nb\r\n.\r\nc\r\n")  # headerless: separator added
        self.assertEqual(rest, b"QUIT\r\n")

    def test_dot_at_very_start(self):
        """A dot line right after 354 ends an empty message."""
        stored, rest, reader, done = read(b".\r\n", [])
        self.assertEqual((stored, done), (b"", True))

    def test_stuffed_first_line(self):
        """A stuffed dot on the very first line is removed."""
        stored, rest, reader, done = read(b"..x\r\n.\r\n", [])
        self.assertEqual(stored, b"\r\n.x\r\n")  # headerless: separator added

    def test_headerless_message_gets_separator(self):
        """A message that starts with body text gets an empty line first, so it cannot read as a header."""
        stored, rest, reader, done = read(b"hello world\r\nsecond\r\n.\r\n", [])
        self.assertEqual(stored, b"\r\nhello world\r\nsecond\r\n")

    def test_body_line_inside_headers_ends_them(self):
        """A non-header line in the header section ends it with an inserted empty line."""
        stored, rest, reader, done = read(b"Subject: a\r\n folded\r\nnot a header\r\nx: y\r\n.\r\n", [])
        self.assertEqual(stored, b"Subject: a\r\n folded\r\n\r\nnot a header\r\nx: y\r\n")

    def test_not_done_without_terminator(self):
        """Data without the terminator is not finished and keeps the partial line."""
        stored, rest, reader, done = read(b"Subject: a\r\n\r\nbody\r\npartial", [])
        self.assertFalse(done)
        self.assertEqual(rest, b"partial")

    def test_size_counted(self):
        """The size counts the unstuffed octets with CRLF."""
        stored, rest, reader, done = read(b"Subject: a\r\n\r\n" + b"x" * 100 + b"\r\n.\r\n", [])
        self.assertEqual(reader.size, len(stored))

    def test_fast_and_slow_paths_agree(self):
        """For random messages split at random points the output equals the reference decoder's."""
        rnd = random.Random(1234)
        atoms = [b"a", b"bc", b" ", b"\r\n", b".", b"..", b"\r", b"\n", b"\r\n.", b"x" * 50,
                 b"\r\n\r\n", b"Received: x\r\n"]
        for trial in range(400):
            body = b"".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 60)))
            stream = b"Subject: s\r\n\r\n" + body + b"\r\n.\r\nNOOP\r\n"
            expected, expected_rest, expected_size = reference(stream)
            cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 6))))
            stored, rest, reader, done = read(stream, cuts)
            self.assertTrue(done, stream)
            self.assertIsNone(reader.error, stream)
            self.assertEqual(stored, expected, (stream, cuts))
            self.assertEqual(rest, expected_rest)
            self.assertEqual(reader.size, expected_size, stream)

    def test_long_line_detected_by_fast_path_input(self):
        """A long body line among ordinary lines is caught (the fast path defers to the line path)."""
        body = b"ok\r\n" * 10 + b"y" * 1500 + b"\r\n" + b"ok\r\n" * 10
        stored, rest, reader, done = read(b"Subject: a\r\n\r\n" + body + b".\r\n", [])
        self.assertTrue(done)
        self.assertEqual(reader.error.code, 554)

    def test_line_at_limit_accepted(self):
        """A line of exactly max_line octets with CRLF is accepted; one more octet is not."""
        ok = b"Subject: a\r\n\r\n" + b"y" * 998 + b"\r\n.\r\n"
        self.assertIsNone(read(ok, [])[2].error)
        bad = b"Subject: a\r\n\r\n" + b"y" * 999 + b"\r\n.\r\n"
        self.assertEqual(read(bad, [])[2].error.code, 554)

    def test_line_at_limit_among_short_lines(self):
        """Inside a run of body lines the fast path takes, a line of max_line octets with CRLF passes and one more octet does not."""
        for length, refused in ((998, False), (999, True), (2000, True)):
            body = b"ok\r\n" * 20 + b"y" * length + b"\r\n" + b"ok\r\n" * 20
            stored, rest, reader, done = read(b"Subject: a\r\n\r\n" + body + b".\r\n", [])
            self.assertTrue(done, length)
            if refused:
                self.assertEqual(reader.error.code, 554, length)
            else:
                self.assertIsNone(reader.error, length)
                self.assertTrue(stored.endswith(body), length)

    def test_has_long_line_against_split(self):
        """The fast path's jumping check agrees with splitting the run into lines, for runs of random line lengths around the limit (first, middle and last line too long among them)."""
        rnd = random.Random(99)
        limit = 1000
        lengths = [0, 1, 2, 400, 997, 998, 999, 1000, 1500, 2500]  # octets before CRLF
        cases = [[998], [999], [998] * 3, [0, 999], [999, 0], [5] * 300 + [999] + [5] * 300]
        cases += [[rnd.choice(lengths) for _ in range(rnd.randint(1, 12))] for _ in range(500)]
        for case in cases:
            seg = b"".join(b"y" * n + b"\r\n" for n in case)
            expected = max(map(len, seg.split(b"\r\n"))) + 2 > limit
            self.assertEqual(has_long_line(seg, limit), expected, case)
            self.assertEqual(expected, any(n + 2 > limit for n in case), case)

    def test_size_limit_in_fast_path(self):
        """The size limit holds for bodies taken by the fast path."""
        stream = b"Subject: a\r\n\r\n" + b"x" * 60 + b"\r\n" * 1 + (b"y" * 60 + b"\r\n") * 100 + b".\r\n"
        reader = read(stream, [], max_size=2000)[2]
        self.assertEqual(reader.error.code, 552)

    def test_hostile_input_linear(self):
        """A body of bare LFs is processed in linear time (the fast path is not retried per line)."""
        import time
        stream = b"Subject: a\r\n\r\n" + (b"a\nb\r\n" * 50000) + b".\r\n"
        start = time.process_time()
        stored, rest, reader, done = read(stream, [])
        self.assertTrue(done)
        self.assertLess(time.process_time() - start, 5.0)


def read_raw(stream: bytes, cuts, **kw):
    """
    Feed C{stream} in raw (BDAT) mode split at C{cuts}, carrying the
    unconsumed partial line as the server does; return (stored, reader).
    """
    out = []
    options = dict(max_size=10_000_000, max_line=1000, max_received=100, bare_newline="normalize")
    options.update(kw)
    reader = DataReader(out.append, raw=True, **options)
    carry = b""
    for a, b in zip([0] + cuts, cuts + [len(stream)]):
        data = carry + stream[a:b]
        consumed, done = reader.feed(data)
        assert not done
        carry = data[consumed:]
    reader.finish(carry)
    return b"".join(out), reader


class RawModeTests(SynchronousTestCase):
    def test_no_end_of_data_no_unstuffing(self):
        """In raw mode a dot line is text and a leading dot stays; the result is the DATA reader's for the stuffed stream."""
        stream = b"Subject: a\r\n\r\n.\r\n..x\r\n.y\r\nQUIT\r\n"
        stored, reader = read_raw(stream, [])
        self.assertEqual(stored, stream)
        self.assertEqual(reader.size, len(stream))

    def test_agrees_with_data_reader(self):
        """For random messages split at random points, raw mode stores what DATA stores for the same message dot-stuffed, with the same size and errors."""
        def stuff(message):  # RFC 5321 4.5.2 on CRLF lines, as the DATA reader reads them
            lines = message.split(b"\r\n")
            return b"\r\n".join(b"." + l if l[:1] == b"." else l for l in lines) + b".\r\n"
        rnd = random.Random(4321)
        atoms = [b"a", b"bc", b" ", b"\r\n", b".", b"..", b"\r", b"\n", b"\r\n.", b"x" * 50,
                 b"\r\n\r\n", b"Received: x\r\n", b"\x00", b"z" * 400]
        for trial in range(400):
            body = b"Subject: s\r\n\r\n" + b"".join(
                rnd.choice(atoms) for _ in range(rnd.randint(0, 60))) + b"\r\n"
            cuts = sorted(rnd.sample(range(1, len(body)), min(len(body) - 1, rnd.randint(0, 6))))
            stored, reader = read_raw(body, cuts, max_size=2000)
            expected, rest, data_reader, done = read(stuff(body), [], max_size=2000)
            self.assertTrue(done)
            if data_reader.error is None:  # else the message is dropped: no matter
                self.assertEqual(stored, expected, (body, cuts))
            self.assertEqual(reader.size, data_reader.size, body)
            self.assertEqual(reader.error, data_reader.error, body)

    def test_last_line_without_crlf(self):
        """finish() stores the last partial line with CRLF; a trailing CR is its line end."""
        self.assertEqual(read_raw(b"Subject: a\r\n\r\nend", [15])[0], b"Subject: a\r\n\r\nend\r\n")
        self.assertEqual(read_raw(b"Subject: a\r\n\r\nend\r", [17])[0], b"Subject: a\r\n\r\nend\r\n")

    def test_long_last_line(self):
        """A long line at the very end is refused, not kept."""
        stored, reader = read_raw(b"Subject: a\r\n\r\n" + b"y" * 3000, [100, 2000])
        self.assertEqual(reader.error.code, 554)
        self.assertEqual(reader.size, 14 + 3000)
