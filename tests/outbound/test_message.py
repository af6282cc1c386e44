"""
Tests for reading a queue file to send it (twisted_mta.outbound.message.load).
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.model import Envelope, EnvelopeError, Recipient
from twisted_mta.outbound.message import WHOLE_LIMIT, load


def write_entry(path: str, body: bytes) -> Envelope:
    env = Envelope(queue_id="Q", sender="a@x.test", recipients=(Recipient("x@peer.test"),),
                   arrival=0)
    head = env.to_header()
    with open(path, "wb") as f:
        f.write(head + body)
    return env


class LoadTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()
        self.reads = []
        real = os.read
        self.patch(os, "read", lambda fd, n: (self.reads.append(n), real(fd, n))[1])

    def test_a_small_message_is_read_in_one_read_sized_by_the_file(self):
        """A message under the limit is read whole with one read of the file's size (plus one octet, which would show a file that grew): no buffered file, whose read of the limit maps and unmaps a megabyte each time."""
        body = b"Subject: x\r\n\r\nhello\r\n"
        write_entry(self.path, body)
        msg = load(self.path)
        self.assertEqual((msg.body, msg.size, msg.eight_bit), (body, len(body), False))
        self.assertEqual(self.reads, [os.path.getsize(self.path) + 1])

    def test_eight_bit_found_past_what_is_read_first(self):
        """A message over the limit is sent from the file; an 8-bit octet after the first read still flags it 8-bit (8BITMIME needed)."""
        body = b"Subject: big\r\n\r\n" + b"a" * (WHOLE_LIMIT + 70000) + b"\xe9\r\n"
        write_entry(self.path, body)
        msg = load(self.path)
        self.assertIsNone(msg.body)
        self.assertEqual(msg.size, len(body))
        self.assertTrue(msg.eight_bit)
        self.assertGreater(len(self.reads), 1)

    def test_a_file_shorter_than_its_envelope_says_is_refused(self):
        """A queue file whose length disagrees with the entry's envelope (truncated since it was accepted) is refused, not sent damaged."""
        import attrs
        body = b"Subject: x\r\n\r\n" + b"line\r\n" * 10
        env = write_entry(self.path, body)
        expect = attrs.evolve(env, file_size=os.path.getsize(self.path) + 5)
        self.assertRaises(EnvelopeError, load, self.path, expect)
