"""
Writing to a TCP connection without waiting for the next reactor turn.

Twisted's C{FileDescriptor.write} only buffers: it asks epoll to say when
the socket is writable (one C{epoll_ctl}), sends in the next turn, and
then stops asking (another C{epoll_ctl}).  An SMTP session writes a short
reply to each command, so that is two system calls and a reactor turn per
reply, about sixteen per message received.  When nothing is buffered the
socket can almost always take a reply at once, so L{write_now} sends it
straight away and leaves only what the socket did not take to Twisted.

It relies on C{tcp.Connection}'s buffer attributes (C{dataBuffer},
C{offset}, C{_tempDataBuffer}) and on C{writeSomeData};
tests/test_twisted_internals.py fails by name when a Twisted release
changes them.
"""

from __future__ import annotations

from twisted.internet import tcp


def write_now(transport, data: bytes) -> None:
    """
    Write C{data} to C{transport}: sent at once when C{transport} is a plain
    (not TLS) TCP connection with nothing buffered and no producer, else
    (and for whatever the socket does not take) through
    C{transport.write}, so the order of the bytes is always kept.
    """
    if (data and type(transport) in _EAGER and transport.connected
            and not transport.disconnecting and not transport._writeDisconnected
            and not transport.TLS and transport.producer is None
            and not transport._tempDataBuffer
            and len(transport.dataBuffer) == transport.offset):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int) and sent > 0:
            if sent == len(data):
                return
            data = data[sent:]
        # 0 (the socket is full) or a lost connection: Twisted's own write
        # buffers it and its next turn sends it or reports the loss.
    transport.write(data)


# The transports made by our listeners and connectors (exact types: a
# subclass may buffer differently).
_EAGER = frozenset({tcp.Server, tcp.Client})
