"""
Tests for twisted_mta.transport.write_now: a reply goes out at once when
nothing waits before it, and never overtakes what does.

A real C{tcp.Server} over a socket pair, with a MemoryReactor (no event
loop): what the peer can read shows what was sent, the reactor's writers
show what was left to Twisted.
"""

import socket

from twisted.internet import protocol, tcp
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.transport import write_now


class WriteNowTests(SynchronousTestCase):
    def setUp(self):
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactor()
        self.transport = tcp.Server(ours, protocol.Protocol(), ("127.0.0.1", 2525), None, 1,
                                    self.reactor)
        self.addCleanup(ours.close)

    def received(self) -> bytes:
        out = b""
        while True:
            try:
                more = self.peer.recv(1 << 20)
            except BlockingIOError:
                return out
            if not more:
                return out
            out += more

    def test_sent_at_once_when_nothing_waits(self):
        """With nothing buffered the reply is on the socket when write_now returns, and Twisted is not asked to watch for writability (no epoll_ctl, no extra turn)."""
        write_now(self.transport, b"250 ok\r\n")
        self.assertEqual(self.received(), b"250 ok\r\n")
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_never_overtakes_buffered_data(self):
        """Data Twisted still buffers goes first: the reply joins the buffer."""
        self.transport.write(b"first\r\n")
        write_now(self.transport, b"second\r\n")
        self.assertEqual(self.received(), b"")
        self.assertIn(self.transport, self.reactor.getWriters())
        self.transport.doWrite()
        self.assertEqual(self.received(), b"first\r\nsecond\r\n")

    def test_what_the_socket_does_not_take_is_buffered_in_order(self):
        """A reply larger than the socket takes: the rest is left to Twisted, and the peer gets every octet once, in order."""
        data = bytes(range(256)) * 40000  # 10 MB: more than a socket pair buffers
        write_now(self.transport, data)
        got = self.received()
        self.assertGreater(len(got), 0)
        self.assertLess(len(got), len(data))
        self.assertIn(self.transport, self.reactor.getWriters())
        while len(got) < len(data):
            self.transport.doWrite()
            got += self.received()
        self.assertEqual(got, data)

    def test_a_full_socket_leaves_it_to_twisted(self):
        """When the socket takes nothing, the reply is buffered, not lost."""
        filler = b"x" * 65536
        while True:
            try:
                self.transport.socket.send(filler)
            except BlockingIOError:
                break
        write_now(self.transport, b"250 ok\r\n")
        self.assertIn(self.transport, self.reactor.getWriters())
        self.assertEqual(b"".join(self.transport._tempDataBuffer), b"250 ok\r\n")

    def test_other_transports_use_their_own_write(self):
        """A transport that is not a plain TCP connection (a test double, TLS, a wrapper) gets a normal write."""
        fake = StringTransport()
        write_now(fake, b"250 ok\r\n")
        self.assertEqual(fake.value(), b"250 ok\r\n")

    def test_a_tls_connection_writes_through_tls(self):
        """Once TLS is started, bytes must go through the TLS layer, never raw on the socket."""
        writes = []
        self.transport.TLS = True
        self.patch(self.transport, "write", writes.append)
        write_now(self.transport, b"250 ok\r\n")
        self.assertEqual((writes, self.received()), ([b"250 ok\r\n"], b""))

    def test_nothing_after_the_connection_is_closing(self):
        """After loseConnection nothing is sent early: it goes behind what Twisted still has to do."""
        self.transport.loseConnection()
        write_now(self.transport, b"250 late\r\n")
        self.assertEqual(self.received(), b"")


class InboundRepliesTests(SynchronousTestCase):
    """
    The inbound server sends a reply at once when the client waits for it,
    and keeps the replies to pipelined commands together for one segment
    (sent one by one, Nagle would hold back the later ones).
    """

    def setUp(self):
        from twisted.internet.address import IPv4Address
        from tests.support import ServerHarness
        self.reactor = MemoryReactor()
        self.peers = []

        def transport(hostAddress, peerAddress):
            ours, peer = socket.socketpair()
            ours.setblocking(False)
            peer.setblocking(False)
            self.addCleanup(ours.close)
            self.addCleanup(peer.close)
            self.peers.append(peer)
            t = tcp.Server(ours, protocol.Protocol(), (peerAddress.host, peerAddress.port),
                           None, 1, self.reactor)
            t.getHost = lambda: hostAddress
            t.value, t.clear = (lambda: b""), (lambda: None)  # the harness's reads: see received()
            return t

        self.h = ServerHarness(self, transport_factory=transport)
        self.transport = self.h.transport
        self.peer = self.peers[0]

    def received(self) -> bytes:
        try:
            return self.peer.recv(1 << 16)
        except BlockingIOError:
            return b""

    def test_a_reply_the_client_waits_for_goes_at_once(self):
        self.assertTrue(self.received().startswith(b"220 "))  # the greeting
        self.h.protocol.dataReceived(b"EHLO client.example\r\n")
        self.assertTrue(self.received().startswith(b"250-"))
        self.assertNotIn(self.transport, self.reactor.getWriters())

    def test_replies_to_pipelined_commands_go_together(self):
        self.received()
        self.h.protocol.dataReceived(b"EHLO client.example\r\n")
        self.received()
        self.h.protocol.dataReceived(b"MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                                     b"DATA\r\n")
        self.assertEqual(self.received(), b"")
        self.assertIn(self.transport, self.reactor.getWriters())
        self.transport.doWrite()
        replies = self.received().split(b"\r\n")
        self.assertEqual([r[:3] for r in replies if r], [b"250", b"250", b"354"])
