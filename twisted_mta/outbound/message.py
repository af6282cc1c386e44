"""
A queued message made ready for the SMTP DATA phase: dot-stuffed, CRLF
terminated, read from the spool in the I/O pool.

The spool holds the message with CRLF line ends and without stuffing (as
the inbound DATA reader left it).  Stuffing is done here, statefully across
chunks, so that a line starting with "." is stuffed wherever a chunk
boundary falls; Twisted's own C{transformChunk} misses both the first line
and chunk boundaries (ARCHITECTURE.md, "Twisted pitfalls").

BDAT (RFC 3030) sends the same octets unstuffed, counted: L{OutgoingMessage}
keeps a small message as stored and stuffs it only when DATA is used.
"""

from __future__ import annotations

import os
from typing import Callable

import attrs
from twisted.internet import defer

from twisted_mta.downgrade import downgrade
from twisted_mta.model import Envelope, EnvelopeError, header_end
from twisted_mta.queue.spool import Lengths, length_problem

WHOLE_LIMIT = 1024 * 1024  # messages up to this size are sent from memory
CHUNK = 1024 * 1024


class Stuffer:
    """
    Dot-stuff a stream of chunks (RFC 5321 4.5.2) and end it with CRLF.CRLF.
    """

    def __init__(self) -> None:
        self._line_start = True
        self._last = b"\n"

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self._line_start and out[:1] == b".":
            out = b"." + out
        self._line_start = out[-1:] == b"\n"
        self._last = out[-2:] if len(out) >= 2 else self._last[-1:] + out
        return out

    def end(self) -> bytes:
        if self._last.endswith(b"\r\n"):
            return b".\r\n"
        if self._last.endswith(b"\r"):
            return b"\n.\r\n"
        return b"\r\n.\r\n"


def stuff(data: bytes) -> bytes:
    s = Stuffer()
    return s.feed(data) + s.end()


@attrs.frozen
class OutgoingMessage:
    """
    The part of a queue file that goes on the wire, and what the MAIL
    command must say about it.
    """

    path: str
    offset: int  # where the message starts in the queue file
    size: int  # octets of the message, before stuffing (the SIZE= value)
    eight_bit: bool  # contains octets above 127 (needs 8BITMIME)
    data: bytes | None  # the stuffed message with its final ".", if made already
    body: bytes | None = None  # the message as stored, when small enough (BDAT sends it)
    # The header section has octets above 127 (UTF-8 header fields, RFC
    # 6532: a message flagged SMTPUTF8 then needs a server that has it).
    header_eight_bit: bool = False

    def stuffed(self) -> bytes | None:
        """
        The message for DATA, dot-stuffed and ended, when it is in memory
        (else use L{chunks}).
        """
        if self.data is not None:
            return self.data
        return stuff(self.body) if self.body is not None else None

    def read_raw(self, start: int, length: int) -> bytes:
        """
        C{length} octets of the message as stored from C{start}, blocking
        (run from the I/O pool); fewer only when the file is shorter.
        """
        with open(self.path, "rb") as f:
            f.seek(self.offset + start)
            return f.read(length)

    def chunks(self):
        """
        Yield the stuffed message in chunks, blocking: run from the I/O pool
        one chunk at a time (used for messages too big for L{data}).
        """
        stuffer = Stuffer()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                yield stuffer.feed(chunk)
        yield stuffer.end()


@attrs.frozen
class QueuedMessage:
    """
    A queue file's message not read yet: where it is, and the lengths its
    envelope records (L{length_problem} checks them when it is read).  A
    transaction handed to a worker carries only this: the worker reads
    the message, so the main process does not read it too.
    """

    path: str
    file_size: int
    size: int

    @classmethod
    def of(cls, path: str, envelope: Envelope) -> "QueuedMessage":
        return cls(path, envelope.file_size, envelope.size)


def load(path: str, expect: Lengths | None = None) -> OutgoingMessage:
    """
    Read (blocking) what is needed to send the queue file at C{path}.

    @param expect: the entry's envelope: a file whose length disagrees with
        it (truncated or grown since it was accepted) raises
        L{EnvelopeError} rather than going out damaged.
    """
    # os-level reads sized by fstat: a buffered file's read(limit) maps a
    # buffer of the limit and unmaps it again, five system calls more per
    # message (and each unmap interrupts the other CPU) for a 2 KiB file.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        total = os.fstat(fd).st_size
        head = _read_upto(fd, min(total + 1, WHOLE_LIMIT + 65536), total)
        start = header_end(head)
        if start < 0:
            raise ValueError(f"{path}: the queue file has no complete envelope header")
        if expect is not None:
            problem = length_problem(total, start, expect)
            if problem:
                raise EnvelopeError(problem)
        size = total - start
        header_8 = not _header_section(head[start:]).isascii()
        if size <= WHOLE_LIMIT and len(head) == total:
            body = head[start:]
            return OutgoingMessage(path=path, offset=start, size=size,
                                   eight_bit=not body.isascii(), data=None, body=body,
                                   header_eight_bit=header_8)
        eight_bit = not head[start:].isascii()
        while not eight_bit:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            eight_bit = not chunk.isascii()
    finally:
        os.close(fd)
    return OutgoingMessage(path=path, offset=start, size=size, eight_bit=eight_bit, data=None,
                           header_eight_bit=header_8)


def _read_upto(fd: int, limit: int, expected: int) -> bytes:
    """
    Up to C{limit} octets from the start of C{fd}, whose size was
    C{expected}: one read, more only if a read came back short of it.
    """
    data = os.read(fd, limit)
    while len(data) < min(limit, expected):
        more = os.read(fd, limit - len(data))
        if not more:
            break
        data += more
    return data


def _header_section(message: bytes) -> bytes:
    """
    The header section (all of C{message} when its end is not in it: a
    header longer than what was read counts as the header).
    """
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def seven_bit(message: OutgoingMessage) -> OutgoingMessage:
    """
    The message converted to 7 bits for a server without 8BITMIME
    (L{twisted_mta.downgrade}), blocking: run it in the I/O pool.  Read
    and converted in memory (the message is at most [limits]
    message_size); raises L{twisted_mta.downgrade.DowngradeRefused} when
    it must not be converted.
    """
    with open(message.path, "rb") as f:
        f.seek(message.offset)
        raw = f.read(message.size + 1)
    if len(raw) != message.size:
        raise EnvelopeError(f"{message.path}: the queue file changed size since it was read")
    converted = downgrade(raw)
    return attrs.evolve(message, size=len(converted), eight_bit=False, data=None,
                        body=converted,
                        header_eight_bit=not _header_section(converted).isascii())


@defer.inlineCallbacks
def send_stuffed(message: OutgoingMessage, transport, run_blocking,
                 stopped: Callable[[], bool], progress: Callable[[], None]):
    """
    Write C{message}, dot-stuffed, to C{transport}: at once when it is in
    memory, else a chunk at a time read through C{run_blocking}, the next
    once the last has drained; C{progress} before each chunk (a timeout
    reset), and an early end when C{stopped} says the session is over.
    Errors reading the queue file fail the Deferred.
    """
    data = message.stuffed()
    if data is not None:
        transport.write(data)
        return
    pacer = Pacer(transport)
    chunks = message.chunks()
    try:
        while not stopped():
            chunk = yield run_blocking(next, chunks, None)
            if chunk is None or stopped():
                break
            progress()
            transport.write(chunk)
            yield pacer.wait()
    finally:
        pacer.stop()
        chunks.close()


class Pacer:
    """
    Wait while the transport's buffer is full (a streaming producer that
    only records pause and resume): the SMTP and LMTP clients write a
    large message a chunk at a time, the next once the last has drained.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        self.paused = False
        self._waiting: defer.Deferred | None = None
        transport.registerProducer(self, True)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            d.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    def wait(self) -> defer.Deferred:
        if not self.paused:
            return defer.succeed(None)
        self._waiting = defer.Deferred()
        return self._waiting

    def stop(self) -> None:
        try:
            self.transport.unregisterProducer()
        except Exception:
            pass
