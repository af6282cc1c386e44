"""
Inbound TCP connections that send a reply at once.

Twisted's TCP transport queues every write: it registers the socket for
writability (one C{epoll_ctl}), sends on the reactor's next turn and
unregisters (another). An SMTP session is a conversation of short replies,
each answered before the client says more, so that is two system calls and
one extra turn of the loop per reply, about 16 C{epoll_ctl}s a message
(C{strace -c}). L{WriteThroughServer} sends a write at once when nothing
is queued before it and queues only what the socket does not take.

It reads the transport's write buffer (C{dataBuffer}, C{offset},
C{_tempDataLen}, C{_writeDisconnected}: private to Twisted's
C{FileDescriptor}) and swaps the class a listening port builds its
connections from (C{tcp.Port.transport}); tests/test_twisted_internals.py
fails by name when any of them changes.
"""

from __future__ import annotations

from twisted.internet import tcp


class WriteThroughServer(tcp.Server):
    """
    A server-side TCP connection whose writes go out at once when its
    buffer is empty. Inside TLS the write goes to Twisted's TLS layer, as
    before: only ciphertext is ever sent, by that layer.
    """

    def write(self, data: bytes) -> None:
        if (type(data) is bytes and data and not self.TLS and self.connected
                and not self.disconnecting and not self._writeDisconnected
                and self.producer is None and not self._tempDataLen
                and self.offset == len(self.dataBuffer)):
            sent = self.writeSomeData(data)
            # An error (a ConnectionLost instance) is left to the usual
            # path, which finds it when it writes.
            if type(sent) is int and sent > 0:
                if sent == len(data):
                    return
                data = data[sent:]
        super().write(data)


def write_through(port: object) -> None:
    """
    Make a listening TCP C{port} build its connections as
    L{WriteThroughServer}; any other kind of port is left as it is.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = WriteThroughServer
