"""
WriteThroughServer sends a write at once when nothing is queued, keeps
the order when something is, and leaves TLS and producers to Twisted.
Real sockets (a socketpair), a MemoryReactor for the reactor.
"""

from __future__ import annotations

import socket

from twisted.internet import error, protocol, tcp
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.inbound.transport import WriteThroughServer, write_through


class Recorder(protocol.Protocol):
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:  # stands in for the TLS layer
        self.written.append(data)


class WriteThroughTests(SynchronousTestCase):
    def setUp(self) -> None:
        ours, self.peer = socket.socketpair()
        ours.setblocking(False)
        self.peer.setblocking(False)
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactor()
        self.protocol = Recorder()
        self.conn = WriteThroughServer(ours, self.protocol, ("127.0.0.1", 2525), None, 1,
                                       self.reactor)
        self.addCleanup(ours.close)

    def received(self) -> bytes:
        out = b""
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk

    def drain(self) -> bytes:
        """Run the transport's queued writes as the reactor would; what the peer got."""
        out = b""
        for _ in range(10_000):
            out += self.received()
            if self.conn not in self.reactor.getWriters():
                return out + self.received()
            self.conn.doWrite()
        self.fail("the transport never emptied its buffer")

    def test_sent_at_once(self) -> None:
        """An empty buffer: the reply is on the wire before the reactor turns."""
        self.conn.write(b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.received(), b"250 2.0.0 Ok\r\n")
        self.assertNotIn(self.conn, self.reactor.getWriters())

    def test_rest_queued_in_order(self) -> None:
        """
        What the socket does not take is queued, and later writes queue
        behind it: the peer reads everything, in order.
        """
        big = bytes(range(256)) * 40_000  # far more than a socket buffer
        self.conn.write(big)
        self.assertIn(self.conn, self.reactor.getWriters())
        self.conn.write(b"queued")  # behind what is waiting in the new writes
        got = self.received()
        self.conn.doWrite()  # the waiting data moves to the send buffer
        self.assertIn(self.conn, self.reactor.getWriters())
        self.conn.write(b"after")  # behind what is left in the send buffer
        self.assertEqual(got + self.drain(), big + b"queued" + b"after")

    def test_tls_goes_to_the_tls_layer(self) -> None:
        """Inside TLS nothing is sent by us: the write goes to Twisted's TLS layer."""
        self.conn.TLS = True
        self.conn.write(b"secret")
        self.assertEqual(self.protocol.written, [b"secret"])
        self.assertEqual(self.received(), b"")

    def test_producer_left_to_twisted(self) -> None:
        """With a producer registered, Twisted's buffering (and its flow control) as before."""
        class Producer:
            def pauseProducing(self) -> None: pass
            def resumeProducing(self) -> None: pass
            def stopProducing(self) -> None: pass
        self.conn.registerProducer(Producer(), True)
        self.conn.write(b"queued")
        self.assertEqual(self.received(), b"")
        self.assertEqual(self.drain(), b"queued")

    def test_not_bytes_refused(self) -> None:
        """Text is refused as Twisted refuses it, not sent."""
        self.assertRaises(TypeError, self.conn.write, "text")
        self.assertEqual(self.received(), b"")

    def test_closed_peer(self) -> None:
        """
        A write the peer can no longer take raises nothing here: it is
        queued, and Twisted's own write finds the lost connection.
        """
        self.peer.close()
        self.conn.write(b"250 Ok\r\n")
        self.assertIn(self.conn, self.reactor.getWriters())
        self.assertIsInstance(self.conn.doWrite(), error.ConnectionLost)


class PortTests(SynchronousTestCase):
    def test_tcp_port(self) -> None:
        port = tcp.Port(0, protocol.Factory(), reactor=MemoryReactor())
        write_through(port)
        self.assertIs(port.transport, WriteThroughServer)
        self.assertIs(tcp.Port.transport, tcp.Server)  # the class is not changed

    def test_other_ports_left_alone(self) -> None:
        class Other:
            transport = tcp.Server
        other = Other()
        write_through(other)
        self.assertIs(other.transport, tcp.Server)


class EndpointTests(SynchronousTestCase):
    def test_listen_makes_port_write_through(self) -> None:
        """With workers = 0 the main process's listeners (tap.py) send at once too."""
        from twisted.internet import defer

        from twisted_mta.tap import WriteThroughEndpoint
        port = tcp.Port(0, protocol.Factory(), reactor=MemoryReactor())

        class Endpoint:
            def listen(self, factory):
                self.factory = factory
                return defer.succeed(port)

        inner, factory = Endpoint(), protocol.Factory()
        self.assertIs(self.successResultOf(WriteThroughEndpoint(inner).listen(factory)), port)
        self.assertIs(inner.factory, factory)
        self.assertIs(port.transport, WriteThroughServer)
