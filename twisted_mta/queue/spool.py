"""
The Maildir-backed spool: where a message lives between the 250 and its
last delivery.

Layout under the spool directory::

    tmp/        being written; anything here at start-up is debris
    new/        accepted, not yet attempted       (a real Maildir: tmp/new/cur)
    cur/        attempted at least once, deferred
    hold/       held by the operator
    corrupt/    quarantined: a queue file that cannot be used (never deleted)
    envelopes/  <queue id>.json: the current state of an entry too large for an xattr
    control/    operator requests (flush, hold, release, delete) for the manager
    lock        held (flock) by the one process that owns the spool

A queue file is the message as received, preceded by one header field,
C{X-Twisted-MTA-Envelope}, holding the envelope as accepted (sender,
recipients, arrival, client).  So an entry is one file, and store before
250 costs one file fsync: L{MessageWriter.commit} fires only after the file
was fsync'd, renamed into new/ and new/ fsync'd (shared by every commit
waiting at that moment).  A crash leaves a complete entry or debris in tmp/.

Later states (delivered and failed recipients, attempts, next attempt,
last error) go to an extended attribute of the queue file, or, when large,
to C{envelopes/<id>.json} (see L{Spool.update}), without fsync: losing or
tearing one after a crash falls back to the envelope in the queue file,
which only repeats attempts, and local delivery is idempotent (see
L{twisted_mta.delivery.maildir}).

Nothing found at start-up stops the spool (L{Spool.recover}): a damaged
queue file goes to corrupt/, an unusable state is dropped and the entry
goes on from the envelope it was accepted with, each logged.  Queue ids
are checked (L{check_queue_id}) before any becomes a path.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import shutil
import stat
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.model import (
    Envelope, EnvelopeError, Outcome, from_header, header_end, is_queue_id, tls_required_no,
    tls_required_values,
)
from twisted_mta.queue.commit_helper import (
    CommitError, fsync_dir, write_all, write_file_durably,
)

if TYPE_CHECKING:
    from twisted_mta.queue.committer import Committer

log = Logger()

STATE_DIRS = ("new", "cur", "hold")
XATTR = "user.twisted_mta.state"
XATTR_MAX = 3500  # fits the inode's or one block's xattr space on ext4
_NO_XATTRS = (errno.ENOTSUP, errno.EOPNOTSUPP)  # the file system has no user xattrs
# A queue file is opened for reading without following a link, and without
# blocking on a FIFO (Spool.read then finds either is not a regular file).
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# No retry interval is this long: a recorded next attempt further ahead
# (of now and of arrival) was not written by us.
MAX_DELAY = 60 * 86400
ALL_DIRS = ("tmp", "new", "cur", "hold", "corrupt", "envelopes", "control")

RunBlocking = Callable[..., defer.Deferred]


class SpoolError(Exception):
    """
    The spool cannot be used (permissions, already owned by another process).
    """


class QueueIdError(ValueError):
    """
    Not a queue id (L{twisted_mta.model.QUEUE_ID}): refused before it is
    made into a path.
    """


def check_queue_id(queue_id: object) -> str:
    """
    Return C{queue_id} if it has the syntax of a queue id, which makes it
    one plain file name inside a spool directory; else raise
    L{QueueIdError} saying so in one line.
    """
    if not is_queue_id(queue_id):
        shown = repr(queue_id)[:80]
        raise QueueIdError(f"{shown} is not a queue id (1 to 64 letters and digits)")
    return queue_id  # type: ignore[return-value]


def run_inline(f: Callable, *args: object) -> defer.Deferred:
    """
    Run blocking work in the calling thread; for tests and the CLI.
    """
    return defer.maybeDeferred(f, *args)


def replace_file_durably(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} so that a crash at any instant leaves
    the old file or the new one, whole: a temporary file beside it,
    fsync, rename over it, fsync of the directory.
    """
    directory = os.path.dirname(path)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(directory)


HEADER_SCAN = 65536  # octets of a message read for its TLS-Required field


def _read_header(read: Callable[[int], bytes]) -> tuple[bytes, int]:
    """
    The start of a queue file, read with C{read} (a file's C{read}, or
    C{os.read} on a descriptor) until it holds the whole envelope header,
    and where that header ends.
    """
    data = b""
    while True:
        more = read(65536)
        data += more
        end = header_end(data)
        if end >= 0:
            return data, end
        if not more:
            raise EnvelopeError("the envelope header is incomplete")


def _head(f) -> tuple[Envelope, int]:
    """
    Read the envelope header from the start of the open queue file C{f}.
    """
    return from_header(*_read_header(f.read))


def read_head(path: str, expect: Envelope | None = None) -> tuple[Envelope, int]:
    """
    The envelope a queue file was accepted with, and the offset where the
    message starts, reading only the file's head.

    @param expect: the entry's current envelope: raise L{EnvelopeError}
        if the file's length does not agree with it (L{length_problem}),
        for one more system call.
    """
    with open(path, "rb") as f:
        env, offset = _head(f)
        if expect is not None:
            problem = length_problem(os.fstat(f.fileno()).st_size, offset, expect)
            if problem:
                raise EnvelopeError(problem)
        return env, offset


def message_offset(path: str) -> int:
    """
    Where the message starts in the queue file at C{path}: past its
    envelope header, which is found and not parsed (the caller holds the
    envelope it was written from).
    """
    with open(path, "rb", buffering=0) as f:
        return _read_header(f.read)[1]


class Lengths(Protocol):
    """What L{length_problem} needs of an envelope: the lengths it records."""

    @property
    def file_size(self) -> int: ...

    @property
    def size(self) -> int: ...


def length_problem(size: int, offset: int, envelope: Lengths) -> str | None:
    """
    Why a queue file of C{size} octets whose message starts at C{offset}
    does not hold what C{envelope} says (truncated or grown since it was
    accepted), or C{None}: its length is the one recorded at commit
    (L{Envelope.file_size}), or, when that is unknown, the message is at
    least L{Envelope.size} octets long.
    """
    if envelope.file_size:
        if size != envelope.file_size:
            return (f"the queue file is {size} octets long, but was {envelope.file_size} "
                    f"when accepted")
        return None
    if size - offset < envelope.size:
        return (f"the queue file holds {size - offset} octets of message, "
                f"but its envelope says {envelope.size}")
    return None


def read_envelope_header(path: str) -> Envelope:
    return read_head(path)[0]


class _GroupSync:
    """
    Group commit for new/: the jobs that make entries durable (write,
    fsync, rename into new/) run together in one trip to the I/O threads,
    followed by one fsync of the directory that all of them share.  Up to
    C{lanes} such batches run at once; jobs that arrive while every lane
    is busy go together in the next batch.  A busy server thus makes one
    trip per batch, not two per message (a trip costs the reactor thread
    tens of microseconds: the hand-over, the GIL going back and forth, the
    answer), and a message waits for a free lane, not for every fsync
    before it: with one lane, a commit waited three times as long
    (docs/benchmarks.md, "Fewer system calls per message").  With no job
    (L{sync}) a caller that renamed already waits for a directory fsync
    that starts after its call.
    """

    LANES = 4

    def __init__(self, run_blocking: RunBlocking, dirs: tuple[str, ...],
                 lanes: int = LANES) -> None:
        self._run = run_blocking
        self._dirs = dirs
        self._lanes = lanes
        self._running = 0
        self._waiting: list[tuple[Callable[[], Any] | None, defer.Deferred]] = []

    def sync(self) -> defer.Deferred:
        return self.commit(None)

    def commit(self, job: Callable[[], Any] | None) -> defer.Deferred:
        """
        Run C{job} (blocking) in the next batch; fires with its result once
        the directory fsync after it is done, or with its failure (then
        no fsync is awaited for it), or with the fsync's failure.
        """
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((job, d))
        if self._running < self._lanes:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running += 1

        def run_all() -> list:
            out: list = []
            for job, _ in batch:
                try:
                    out.append(None if job is None else job())
                except Exception:
                    out.append(Failure())
            for path in self._dirs:
                fsync_dir(path)
            return out

        def finished(results: object) -> None:
            self._running -= 1
            for i, (_, d) in enumerate(batch):
                r = results if isinstance(results, Failure) else results[i]
                d.errback(r) if isinstance(r, Failure) else d.callback(r)
            if self._waiting:  # a lane is free: this one
                self._start()

        self._run(run_all).addBoth(finished)


class InlineReads:
    """
    Run the queue's short reads (an entry's envelope, a message before it
    is sent) on the calling thread, the reactor's: from the page cache
    they take microseconds, less than a hop to a thread pool, and every
    pool thread's Python competes with the reactor for the GIL
    (docs/benchmarks.md: at full outbound load the hops cost about as much
    CPU as the sending).

    A disk that does not keep up must not stall the reactor read after
    read: after C{slow_reads} reads slower than C{slow} seconds within one
    C{window}, or one slower than C{very_slow}, every call goes to
    C{in_thread} for C{cool_off} seconds, then inline again.  One slow read
    alone (a journal commit, writeback after a burst) stalls the reactor
    only as long as it takes.
    """

    SLOW = 0.01
    SLOW_READS = 3
    WINDOW = 1.0
    VERY_SLOW = 0.1
    COOL_OFF = 60.0

    def __init__(self, in_thread: RunBlocking, *, slow: float = SLOW,
                 slow_reads: int = SLOW_READS, window: float = WINDOW,
                 very_slow: float = VERY_SLOW, cool_off: float = COOL_OFF,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._in_thread = in_thread
        self._slow = slow
        self._slow_reads = slow_reads
        self._window = window
        self._very_slow = very_slow
        self._cool_off = cool_off
        self._monotonic = monotonic
        self._threads_until: float | None = None
        self._recent: list[float] = []  # when the recent slow reads ended

    @property
    def inline(self) -> bool:
        """Whether the next call runs on the calling thread."""
        until = self._threads_until
        return until is None or self._monotonic() >= until

    def __call__(self, f: Callable[..., Any], *args: Any) -> defer.Deferred:
        if not self.inline:
            return self._in_thread(f, *args)
        start = self._monotonic()
        try:
            result = defer.succeed(f(*args))
        except Exception:
            result = defer.fail()
        end = self._monotonic()
        took = end - start
        if took > self._slow:
            self._slow_read(end, took)
        return result

    def _slow_read(self, end: float, took: float) -> None:
        recent = [t for t in self._recent if t > end - self._window] + [end]
        if took <= self._very_slow and len(recent) < self._slow_reads:
            self._recent = recent
            return
        self._recent = []
        self._threads_until = end + self._cool_off
        log.info("{count} queue read(s) took over {slow_ms:.0f} ms, the last {ms:.0f} ms: the "
                 "queue is read in threads for the next {cool_off:.0f} s", count=len(recent),
                 slow_ms=self._slow * 1000, ms=took * 1000, cool_off=self._cool_off,
                 event="queue.slow_read")


# Finished entries wait this long for others before one trip to the I/O
# threads removes them all: a wake-up of a pool thread per removal cost
# more CPU than the unlink, and an unlink on the reactor thread waited for
# the disk (0.17-0.34 ms on an ext4 mounted with discard, under 0.06 of it
# CPU; docs/architecture.md, "Processes").  A crash in this window
# delivers those messages again (remote mail is at least once; local
# copies are found at start-up).
REMOVE_GATHER = 0.02


def attempted_state(state: str) -> str:
    """Where an entry's results are recorded after an attempt: out of new/."""
    return "cur" if state == "new" else state


class Batched:
    """
    Run C{fn} for many items in one hop to the I/O pool: items that arrive
    while a batch runs go together in the next.  Each caller gets its own
    item's result or failure.

    With a C{clock}, a batch also gathers for up to C{gather} seconds (or
    until C{most} items wait) before it starts, so that work too cheap
    for a hop of its own still leaves the reactor thread: the queue's
    removals (why: L{twisted_mta.queue.manager.REMOVE_GATHER}).  L{flush}
    starts what waits at once.
    """

    def __init__(self, run_blocking: RunBlocking, fn: Callable[[Any], Any], *,
                 clock: Any = None, gather: float = 0.0, most: int = 256) -> None:
        self._run = run_blocking
        self._fn = fn
        self._clock = clock
        self._gather = gather
        self._most = most
        self._timer: Any = None
        self._running = False
        self._waiting: list[tuple[Any, defer.Deferred]] = []

    def __call__(self, item: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiting.append((item, d))
        if self._running:
            return d
        if self._clock is None or self._gather <= 0 or len(self._waiting) >= self._most:
            self.flush()
        elif self._timer is None:
            self._timer = self._clock.callLater(self._gather, self.flush)
        return d

    def flush(self) -> None:
        """Start the items waiting now, unless a batch runs (they go next)."""
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None
        if not self._running and self._waiting:
            self._start()

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True
        fn = self._fn

        def run_all() -> list:
            out = []
            for item, _ in batch:
                try:
                    out.append(fn(item))
                except Exception:
                    out.append(Failure())
            return out

        def finished(results: object) -> None:
            self._running = False
            for i, (_, d) in enumerate(batch):
                r = results if isinstance(results, Failure) else results[i]
                d.errback(r) if isinstance(r, Failure) else d.callback(r)
            if self._waiting:
                self._start()

        self._run(run_all).addBoth(finished)


class QueueIdGenerator:
    """
    Queue ids that are unique within one spool and valid Maildir names:
    time, microseconds, pid and a counter (the spool lock makes the pid
    unique among writers).
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._counter = itertools.count(1)
        self._pid = os.getpid()

    def __call__(self) -> str:
        now = self._clock()
        return f"{int(now):x}{int((now % 1) * 1e6):05x}{self._pid:x}{next(self._counter):x}".upper()


def all_delivered(results: dict[str, Outcome]) -> bool:
    """Every copy made (delivery on receipt): nothing left for the queue."""
    return bool(results) and all(o.code < 400 for o in results.values())


class MessageWriter:
    """
    A message being received; L{commit} makes it a queue entry.

    No file-system call happens on the reactor thread: data is collected in
    memory and written to C{tmp/} by the I/O threads, in order, whenever
    more than L{SPILL} octets are waiting, and at commit.  Creating a file
    under load can block for milliseconds on the directory lock, which would
    stall every other session.
    """

    SPILL = 128 * 1024
    # The largest message the commit helper takes (committer.py): beyond
    # it, copying the message through the pipe costs more than the trip to
    # a thread it saves (by hand on the EPYC, 20 sessions: 32 KiB 4.92-5.62
    # against 5.61-6.08 ms of CPU per message with the threads, 100 KiB
    # 6.11-6.78 against 5.80-6.70; docs/benchmarks.md).
    HELPER_LIMIT = 64 * 1024

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.path = os.path.join(spool.path, "tmp", queue_id)
        self.size = 0
        self.closed = False
        self._chunks: list[bytes] = []
        self._waiting = 0
        self._header: Envelope | None = None  # begin()'s, until it is written
        self._fd: int | None = None
        self._renamed = False  # in new/: a failure after this must take it out again
        # Every disk operation of this message runs after the previous one.
        self._tail: defer.Deferred = defer.succeed(None)

    def begin(self, envelope: Envelope) -> None:
        """
        Start the file with C{envelope}'s header (L{Envelope.to_header}),
        made when the file is first written: never, for a message
        delivered on receipt from memory (L{deliver_or_commit}).
        """
        self._header = envelope

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._waiting += len(data)
        self.size += len(data)
        if self._waiting > self.SPILL:
            self._then(self._append, self._take())

    def _take(self) -> bytes:
        head = self._take_header()
        if head:
            self._chunks.insert(0, head)
        return self._take_message()

    def _take_header(self) -> bytes:
        """L{begin}'s envelope header, made now and counted in L{size}; empty once made."""
        header, self._header = self._header, None
        if header is None:
            return b""
        head = header.to_header()
        self.size += len(head)
        return head

    def _take_message(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks = []
        self._waiting = 0
        return data

    def _then(self, f, *args, run: Callable[..., defer.Deferred] | None = None
              ) -> defer.Deferred:
        """
        Run C{f(*args)} after this message's earlier disk operations, by
        C{run} (the I/O threads: C{spool.run_blocking}).
        """
        run = run or self.spool.run_blocking
        self._tail = self._tail.addCallback(lambda _: run(f, *args))
        return self._tail

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)  # read: rewrite
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def rewrite(self, change: Callable[[bytes], bytes | None]) -> defer.Deferred:
        """
        Replace the message by C{change(message)} (unless it returns None),
        for a step between the end of data and L{commit} that needs the
        whole message (DKIM signing: a header field on top, 8-bit parts
        converted).  C{message} is what was written after the envelope
        header, read back from C{tmp/} (bounded: [limits] message_size);
        C{change} runs in the I/O threads.  Fires with the change in size
        (octets); after a failure, L{abort}.
        """
        pending = self._take()
        size = self.size

        def run() -> int:
            self._append(pending)
            data = bytearray()
            while len(data) < size:
                more = os.pread(self._fd, size - len(data), len(data))
                if not more:
                    raise OSError(errno.EIO, f"{self.path} is shorter than written")
                data += more
            start = header_end(data)
            if start < 0:
                raise EnvelopeError("the envelope header is incomplete")
            new = change(bytes(data[start:]))
            if new is None:
                return 0
            view, offset = memoryview(new), start
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
            os.ftruncate(self._fd, offset)
            os.lseek(self._fd, 0, os.SEEK_END)
            return offset - size

        # A Deferred of its own, fired once the disk operations so far are
        # done and self._tail starts afresh: a callback of the caller's
        # chains the commit onto self._tail, which must not be the
        # Deferred running that callback.
        result = defer.Deferred()

        def changed(delta: int) -> None:
            self.size += delta
            self._tail = defer.succeed(None)
            result.callback(delta)

        def broken(failure: Failure) -> None:
            self._tail = defer.fail(failure)  # commit fails too; abort() drops the file
            result.errback(failure)

        self._then(run).addCallbacks(changed, broken)
        return result

    def flush(self) -> defer.Deferred:
        """
        Write what is collected so far to C{tmp/} (no fsync): a milter
        stage reads the message back from L{path} before the commit.
        """
        self._then(self._append, self._take())
        return self._fork()

    def _fork(self) -> defer.Deferred:
        """
        A Deferred that fires when the disk operations so far are done,
        without the caller's callbacks joining the writer's own chain.
        """
        d: defer.Deferred = defer.Deferred()

        def done(result):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)
            return result

        self._tail.addBoth(done)
        return d

    def adopt(self, path: str) -> defer.Deferred:
        """
        Make the complete message at C{path} (in C{tmp/}, written by the
        milter stage: new envelope header, edited headers and body) this
        message, replacing what was written; L{commit} then fsyncs it.
        """
        def swap() -> None:
            self._close_fd()
            os.rename(path, self.path)
            self._fd = os.open(self.path, os.O_RDWR)  # as _append: rewrite reads it
            os.lseek(self._fd, 0, os.SEEK_END)
            self.size = os.fstat(self._fd).st_size

        self._then(swap)
        return self._fork()

    def commit(self, envelope: Envelope, hold: bool = False) -> defer.Deferred:
        """
        Make the entry durable; fires with C{envelope}, the in-memory state,
        with the queue file's length as L{Envelope.file_size}.

        The envelope the entry will be recovered with is the header written
        first (L{Envelope.to_header}), not this argument.  With C{hold} the
        entry goes to hold/ (a milter quarantined it), not new/.
        """
        self.closed = True
        rest = self._take()
        state = "hold" if hold else "new"

        def durable() -> None:
            self._append(rest)
            self._make_durable(state)

        if hold:
            d = self._then(durable)
        elif self._fd is None and self.spool.committer is not None and \
                len(rest) <= self.HELPER_LIMIT:
            # Nothing written yet (not rewritten, not spilled): the commit
            # helper writes, fsyncs and renames it.
            d = self._then(self._commit_by_helper, rest, run=run_inline)
        elif self.size > self.SPILL:
            # A large file's fsync takes long: not in the shared batch,
            # where the small messages committed with it would wait for it.
            d = self._then(durable)
            d.addCallback(lambda _: self.spool.group_sync.sync())
        else:  # with the others committed meanwhile, and new/'s fsync
            d = self._then(durable, run=self.spool.group_sync.commit)
        # Its length goes with the state (recorded after the first attempt):
        # recovery compares it with the file's.
        d.addCallback(lambda _: attrs.evolve(envelope, file_size=self.size))
        return self._own(d.addErrback(self._failed))

    def _commit_by_helper(self, data: bytes) -> defer.Deferred:
        def renamed(_: object) -> None:
            self._renamed = True

        def failed(failure: Failure) -> Failure:
            if isinstance(failure.value, CommitError) and failure.value.renamed:
                self._renamed = True  # _discard takes it out of new/ again
            return failure

        return self.spool.committer.commit(self.queue_id, data).addCallbacks(renamed, failed)

    def _make_durable(self, state: str) -> None:
        """
        fsync the file and rename it into C{state}/ (blocking); the shared
        fsync of new/ is the caller's, hold/ gets its own.
        """
        try:
            os.fsync(self._fd)
        finally:
            self._close_fd()
        os.rename(self.path, os.path.join(self.spool.path, state, self.queue_id))
        self._renamed = True
        if state != "new":  # rare: its own directory fsync, not the shared one of new/
            fsync_dir(os.path.join(self.spool.path, state))

    @staticmethod
    def _own(d: defer.Deferred) -> defer.Deferred:
        """
        A Deferred of its own with C{d}'s result, not the writer's chain: the
        caller may be running inside that chain (a milter stage's callback
        after flush/adopt), and a chain that returns itself stalls.
        """
        out: defer.Deferred = defer.Deferred()
        d.addBoth(lambda result: out.errback(result) if isinstance(result, Failure)
                  else out.callback(result))
        return out

    def deliver_or_commit(self, envelope: Envelope,
                          deliver: Callable[[str | bytes, Envelope], dict[str, Outcome]]
                          ) -> defer.Deferred:
        """
        Delivery on receipt: C{deliver(message, envelope)} copies the
        message (in the I/O threads) and says how each recipient fared.
        C{message} is the message itself when nothing was written yet (a
        message under L{SPILL} octets, not rewritten, started with
        L{begin}), else the path of the file in C{tmp/}, envelope header
        first.  When every copy is made, no file is left and nothing is
        queued; else the entry is written and made durable as L{commit}
        makes it, for the queue to deliver what is left.  Fires with
        C{(outcomes, envelope)}, the envelope with its
        L{Envelope.file_size}.

        No fsync of the message is needed to copy it: the copies are made
        durable by C{deliver}, and a crash before that leaves no 250.
        """
        self.closed = True
        in_memory = self._header is not None  # nothing written: the header is not made yet
        message = self._take_message()

        def run() -> tuple[dict[str, Outcome], bool]:
            """The outcomes, and whether the entry was queued (a copy failed)."""
            if in_memory:  # the queue file is written only if needed
                results = deliver(message, envelope)
                done = all_delivered(results)
                if not done:
                    self._append(self._take_header() + message)
            else:
                self._append(message)  # a failure: _failed closes and removes the file
                results = deliver(self.path, envelope)
                done = all_delivered(results)
                if done:
                    self._close_fd()
                    try:
                        os.unlink(self.path)
                    except OSError:  # delivered all the same: debris for the next start
                        pass
            if not done:
                self._make_durable("new")
            return results, not done

        def synced(result):
            results, queued = result
            if not queued:
                return results, envelope
            done = (results, attrs.evolve(envelope, file_size=self.size))
            return self.spool.group_sync.sync().addCallback(lambda _: done)

        d = self._then(run)
        d.addCallback(synced)
        return self._own(d.addErrback(self._failed))

    def _failed(self, failure):
        d = self.spool.run_blocking(self._discard)
        d.addBoth(lambda _: failure)
        return d

    def _discard(self) -> None:
        self._close_fd()
        self.spool.discard_debris(self.queue_id)
        if self._renamed:
            # The fsync of new/ failed after the rename: the sender is told
            # 451 (or the DSN is retried), so no entry may stay behind.
            for state in ("new", "hold"):
                try:
                    os.unlink(os.path.join(self.spool.path, state, self.queue_id))
                except FileNotFoundError:
                    pass

    def abort(self) -> defer.Deferred:
        """
        Drop the message; its partial file (if any) is removed off-thread.
        """
        if self.closed:
            return defer.succeed(None)
        self.closed = True
        self._chunks = []
        # Run even if an earlier write failed.
        self._tail.addErrback(lambda f: None)
        d = self._then(self._discard)
        d.addErrback(lambda f: log.failure("spool: could not remove the partial message {queue_id}",
                                           f, queue_id=self.queue_id, event="queue.error"))
        return d


@attrs.frozen
class RecoveryReport:
    entries: tuple[tuple[Envelope, str], ...]  # (envelope, state dir)
    removed_debris: int
    removed_orphans: int
    quarantined: tuple[str, ...]
    restarted: tuple[str, ...] = ()  # entries one of whose recorded states was unusable


@attrs.frozen
class RecoveryPlan:
    """
    What the quick first part of recovery (L{Spool.recover_start}) found:
    the entries still to read, as (queue id, state dir, has a state file),
    in queue id order.
    """

    pending: tuple[tuple[str, str, bool], ...]
    removed_debris: int
    removed_orphans: int
    quarantined: tuple[str, ...]


@attrs.frozen
class EntryRead:
    """
    One queue entry as found on disk, read without changing anything
    (L{Spool.read}).
    """

    queue_id: str  # the file's name
    state: str  # its directory
    envelope: Envelope | None  # the current envelope; None when damaged
    damage: str | None = None  # why the queue file itself cannot be used
    dropped: tuple[str, ...] = ()  # why recorded states were not used
    bad_xattr: bool = False  # the state attribute is unusable
    bad_file: bool = False  # the state file is unusable
    from_header: bool = True  # the envelope is the one the entry was accepted with
    note: str | None = None  # something else corrected (a next attempt far ahead)

    @property
    def problem(self) -> str | None:
        """
        Everything wrong with the entry, in one line, or C{None}.
        """
        if self.damage is not None:
            return self.damage
        words = [*self.dropped, *([self.note] if self.note else [])]
        return "; ".join(words) or None


def _judge_state(raw: bytes, header: Envelope,
                 now: float) -> tuple[Envelope | None, str | None]:
    """
    A stored state (xattr or file) decoded and judged against the header
    envelope: C{(envelope, None)} when usable, else C{(None, why)}.
    """
    try:
        env = Envelope.from_json(raw)
        why = state_problem(env, header, now)
    except Exception as e:
        return None, _why(e)
    return (None, why) if why else (env, None)


def state_problem(state: Envelope, header: Envelope, now: float) -> str | None:
    """
    Why a recorded state cannot be the current state of the entry whose
    queue file holds C{header}, or C{None}: a state is the same message
    later on, so it names the same entry, sender, arrival and recipients,
    and its next attempt is not further ahead than any retry interval.
    """
    if state.queue_id != header.queue_id:
        return f"it names queue entry {state.queue_id}"
    if (state.sender, state.arrival) != (header.sender, header.arrival) or \
            [r.address for r in state.recipients] != [r.address for r in header.recipients]:
        return "its sender, arrival or recipients differ from the queue file's envelope"
    ahead = state.next_attempt - max(now, state.arrival)
    if ahead > MAX_DELAY:
        return f"its next attempt is {ahead / 86400:.0f} days ahead"
    return None


def _why(e: BaseException) -> str:
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if isinstance(e, EnvelopeError):
        return str(e)
    return f"{type(e).__name__}: {e}"  # a bug; said, not raised


class Spool:
    """
    One spool directory, owned by this process while L{lock} is held.
    """

    def __init__(self, path: str, run_blocking: RunBlocking = run_inline,
                 new_queue_id: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = os.path.abspath(path)
        self.run_blocking = run_blocking
        # Commits of small messages by a helper process (committer.py,
        # set by the running process: start_committer); None: by the I/O
        # threads, in the shared batch of _GroupSync.
        self.committer: Committer | None = None
        self.new_queue_id = new_queue_id or QueueIdGenerator()
        self.clock = clock  # wall time, to judge recorded next attempts
        self.group_sync = _GroupSync(run_blocking, (self._dir("new"),))
        self._lock_fd: int | None = None
        self._xattrs = True  # until the file system says otherwise

    def _dir(self, name: str) -> str:
        return os.path.join(self.path, name)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.path, "envelopes", check_queue_id(queue_id) + ".json")

    def create(self) -> None:
        try:
            os.makedirs(self.path, 0o700, exist_ok=True)
            for name in ALL_DIRS:
                os.makedirs(self._dir(name), 0o700, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create spool {self.path}: {e.strerror}")

    def lock(self) -> None:
        """
        Take the spool's lock or raise L{SpoolError} naming the holder.
        """
        self.create()
        lock_path = self._dir("lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolError(f"cannot lock spool {self.path}: {e.strerror}")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise SpoolError(f"spool {self.path} is in use by another process (pid {holder})")
            raise SpoolError(f"cannot lock spool {self.path}: {e.strerror}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def chown(self, uid: int, gid: int) -> None:
        """
        Give the spool to the user the process will run as (twistd --uid),
        entries included when the spool belonged to someone else.
        """
        top = os.stat(self.path)
        if top.st_uid == uid and (gid == -1 or top.st_gid == gid):
            return
        maildrop = os.path.join(self.path, "maildrop")
        for root, dirs, files in os.walk(self.path):
            os.chown(root, uid, gid)
            if root == maildrop:
                # Drops belong to the users who wrote them: the pickup
                # reads who that was from the owner.
                dirs[:] = []
                continue
            for name in files:
                os.chown(os.path.join(root, name), uid, gid)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing ----------------------------------------------------------

    def new_message(self) -> MessageWriter:
        return MessageWriter(self, self.new_queue_id())

    def queue_local(self, message: bytes, **fields) -> defer.Deferred:
        """
        Queue a message this MTA wrote itself (a DSN, a TLS report): its
        envelope is C{Envelope(**fields)} with a new queue id and the
        message's size.  Fires with the envelope once the entry is on disk
        (L{MessageWriter.commit}), fails as the commit does.
        """
        writer = self.new_message()
        envelope = Envelope(queue_id=writer.queue_id, size=len(message), **fields)
        writer.write(envelope.to_header())
        writer.write(message)
        return writer.commit(envelope)

    def discard_debris(self, queue_id: str) -> None:
        # .milter, .body: a milter stage's rewrite in progress (inbound.milter)
        for name in (queue_id, queue_id + ".json", queue_id + ".milter", queue_id + ".body"):
            try:
                os.unlink(os.path.join(self.path, "tmp", name))
            except FileNotFoundError:
                pass

    def update(self, envelope: Envelope, state: str) -> None:
        """
        Record the new state of an entry in C{state}/ (blocking; call via
        run_blocking).

        A small state goes into an extended attribute of the queue file
        (C{user.twisted_mta.state}): no file is created, which matters on
        file systems where creating one is slow.  A large one, or one on a
        file system without user xattrs, goes to envelopes/<id>.json,
        written to tmp/ and renamed into place.  Neither is fsync'd (see
        the module docstring for why that is safe).
        """
        qid = envelope.queue_id
        data = envelope.to_json(compact=True)
        path = self.path_in(state, qid)
        if self._xattrs and len(data) <= XATTR_MAX:
            try:
                os.setxattr(path, XATTR, data)
            except OSError as e:
                if e.errno not in (*_NO_XATTRS, errno.ENOSPC, errno.E2BIG):
                    raise
                if e.errno in _NO_XATTRS:
                    self._xattrs = False
            else:
                try:
                    os.unlink(self.envelope_path(qid))
                except FileNotFoundError:
                    pass
                return
        tmp = os.path.join(self.path, "tmp", qid + ".json")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, self.envelope_path(qid))
        try:
            os.removexattr(path, XATTR)
        except OSError:
            pass

    def remove(self, queue_id: str) -> None:
        """
        Delete a finished entry: the queue file first, so a crash leaves at
        most an orphan state file (removed at start).
        """
        check_queue_id(queue_id)
        for state in STATE_DIRS:
            try:
                os.unlink(os.path.join(self.path, state, queue_id))
            except FileNotFoundError:
                continue
            break
        try:
            os.unlink(self.envelope_path(queue_id))
        except FileNotFoundError:
            pass

    def move(self, queue_id: str, src: str, dst: str) -> None:
        os.rename(self.path_in(src, queue_id), self.path_in(dst, queue_id))

    def path_in(self, state: str, queue_id: str) -> str:
        """
        The queue file of C{queue_id} in C{state}/; raises L{QueueIdError}
        for anything but a queue id, so the path is always inside the spool.
        """
        if state not in STATE_DIRS:
            raise ValueError(f"{state!r} is not a queue state")
        return os.path.join(self.path, state, check_queue_id(queue_id))

    def update_and_move(self, envelope: Envelope, src: str, dst: str) -> None:
        """
        Move the entry between state directories, then L{update} it, in one
        blocking job (one trip through the thread pool).
        """
        if src != dst:
            self.move(envelope.queue_id, src, dst)
        self.update(envelope, dst)

    # -- reading ----------------------------------------------------------

    def state_of(self, queue_id: str) -> str | None:
        check_queue_id(queue_id)
        for state in STATE_DIRS:
            if os.path.exists(os.path.join(self.path, state, queue_id)):
                return state
        return None

    def message_path(self, queue_id: str) -> str | None:
        state = self.state_of(queue_id)
        return None if state is None else os.path.join(self.path, state, queue_id)

    def load(self, queue_id: str, state: str | None = None) -> Envelope:
        """
        The entry's current envelope (see L{read}); raises
        L{EnvelopeError} for a damaged entry.

        @param state: the directory the caller last knew the entry in,
            looked in first (a look in each directory saved); when it is
            not there, it is looked for in all.
        """
        has_state_file = os.path.exists(self.envelope_path(queue_id))
        entry = None
        if state is not None:
            if state not in STATE_DIRS:
                raise ValueError(f"{state!r} is not a queue state")
            try:
                entry = self.read(queue_id, state, has_state_file)
            except FileNotFoundError:
                pass  # moved meanwhile, or gone
        if entry is None:
            state = self.state_of(queue_id)
            if state is None:
                raise FileNotFoundError(f"no queue entry {queue_id}")
            entry = self.read(queue_id, state, has_state_file)
        if entry.envelope is None:
            raise EnvelopeError(entry.damage)
        return entry.envelope

    def read_headers(self, queue_id: str, limit: int = 1024 * 1024) -> bytes:
        """
        The header section of an entry's message (without the envelope
        header), reading no more than needed (at most C{limit} octets).
        """
        path = self.message_path(queue_id)
        if path is None:
            raise FileNotFoundError(f"no queue entry {queue_id}")
        data = b""
        with open(path, "rb") as f:
            while len(data) < limit:
                more = f.read(65536)
                data += more
                start = header_end(data)
                if start >= 0 and (data.find(b"\r\n\r\n", start) >= 0 or not more):
                    break
                if not more:
                    break
        start = header_end(data)
        if start < 0:
            raise EnvelopeError("the envelope header is incomplete")
        body = data[start:]
        end = body.find(b"\r\n\r\n")
        return body if end < 0 else body[:end + 2]

    def read_message(self, queue_id: str) -> bytes:
        """
        The message of an entry, without the envelope header.
        """
        path = self.message_path(queue_id)
        if path is None:
            raise FileNotFoundError(f"no queue entry {queue_id}")
        with open(path, "rb") as f:
            data = f.read()
        return data[from_header(data)[1]:]

    def _listing(self, name: str) -> list[os.DirEntry]:
        with os.scandir(self._dir(name)) as it:
            return [entry for entry in it if not entry.name.startswith(".")]

    def _names(self, name: str) -> list[str]:
        """
        The names in one spool directory: strings only, no L{os.DirEntry}
        (a tenth of the memory for a large queue).
        """
        with os.scandir(self._dir(name)) as it:
            return [entry.name for entry in it if not entry.name.startswith(".")]

    def read(self, queue_id: str, state: str, has_state_file: bool) -> EntryRead:
        """
        An entry as found, read-only.  Its queue file is damaged (C{damage}
        says why) when its name is not a queue id, it is not a regular
        file, its envelope header does not decode or names another entry,
        or its length does not agree with its envelope (L{length_problem}).
        Otherwise its envelope is the newest usable recorded state (the
        xattr or the state file; if a crash left both, the one with more
        attempts), else the header's; a state is unusable when it does not
        decode or L{state_problem} finds it is not this entry's.  A next
        attempt further ahead than L{MAX_DELAY} becomes now.  Raises
        L{FileNotFoundError} when the entry is gone.
        """
        path = os.path.join(self.path, state, queue_id)

        def damaged(why: str) -> EntryRead:
            return EntryRead(queue_id, state, None, damage=why)

        if not is_queue_id(queue_id):
            os.lstat(path)  # still there?
            return damaged("its file name is not a queue id")
        # One descriptor for what is read from the queue file: its type and
        # length (fstat), its head (the envelope header, and the start of
        # the message for the scan below), its state attribute.  Opened
        # without following a symbolic link; anything else that is not a
        # regular file is found by the fstat (a FIFO opens at once,
        # non-blocking).
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            raise
        except OSError as e:
            if e.errno == errno.ELOOP or not stat.S_ISREG(os.lstat(path).st_mode):
                return damaged("it is not a regular file")
            return damaged(_why(e))
        try:
            return self._read_open(queue_id, state, has_state_file, fd, damaged)
        finally:
            os.close(fd)

    def _read_open(self, queue_id: str, state: str, has_state_file: bool, fd: int,
                   damaged: Callable[[str], EntryRead]) -> EntryRead:
        """L{read} of the queue file opened as C{fd}."""
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return damaged("it is not a regular file")
            size = st.st_size
            data, offset = _read_header(lambda n: os.read(fd, n))
            try:
                raw: bytes | None = os.getxattr(fd, XATTR)
                xattr_problem = None
            except OSError as e:
                # Its words, not the exception: kept in this frame, the
                # exception's traceback would hold the frame, and with it
                # every caller's (the batch of a start-up load), until
                # the cyclic collector came by.
                raw = None
                xattr_problem = None if e.errno in (errno.ENODATA, *_NO_XATTRS) else _why(e)
            header = from_header(data, offset)[0]
        except (EnvelopeError, OSError) as e:  # on the descriptor: the file is there
            return damaged(_why(e))
        if header.queue_id != queue_id:
            return damaged(f"its envelope names queue entry {header.queue_id}")

        now = self.clock()
        states: list[Envelope] = []
        dropped: list[str] = []
        bad_xattr = bad_file = False
        if xattr_problem is not None:
            dropped.append(f"state attribute: {xattr_problem}")
        if raw is not None:
            env, why = _judge_state(raw, header, now)
            if why:
                dropped.append(f"state attribute: {why}")
                bad_xattr = True
            else:
                states.append(env)
        if has_state_file:
            try:
                with open(self.envelope_path(queue_id), "rb") as f:
                    state_data: bytes | None = f.read()
            except FileNotFoundError:
                state_data = None  # replaced by an xattr meanwhile
            except OSError as e:
                dropped.append(f"state file: {_why(e)}")
                state_data = None
            if state_data is not None:
                env, why = _judge_state(state_data, header, now)
                if why:
                    dropped.append(f"state file: {why}")
                    bad_file = True
                else:
                    states.append(env)
        current = max(states, key=lambda c: c.attempts) if states else header
        if not states and not header.requiretls:
            # "TLS-Required: No" is read at the end of DATA, after the
            # envelope header was written, and kept in the recorded state:
            # an entry recovered from its header alone reads it again (RFC
            # 8689 4.1), in what was read already unless the message is
            # longer than that and its start was not all in it.
            head = data[offset:offset + HEADER_SCAN]
            if len(head) < HEADER_SCAN and len(data) < size:
                try:
                    head = os.pread(fd, HEADER_SCAN, offset)
                except OSError as e:
                    return damaged(_why(e))
            if tls_required_no(tls_required_values(head)):
                current = header = attrs.evolve(header, tls_required_no=True)

        problem = length_problem(size, offset, current)
        if problem:
            return damaged(problem)
        note = None
        if current.next_attempt > now + MAX_DELAY:
            note = (f"its next attempt was {(current.next_attempt - now) / 86400:.0f} days "
                    f"ahead; due now")
            current = attrs.evolve(current, next_attempt=now)
        return EntryRead(queue_id, state, current, dropped=tuple(dropped),
                         bad_xattr=bad_xattr, bad_file=bad_file, from_header=not states,
                         note=note)

    def read_entry(self, queue_id: str, state: str, has_state_file: bool
                   ) -> tuple[Envelope, str | None]:
        """
        An entry's current envelope and what was wrong with its recorded
        states (or C{None}); raises L{EnvelopeError} for a damaged entry
        (see L{read}).
        """
        entry = self.read(queue_id, state, has_state_file)
        if entry.envelope is None:
            raise EnvelopeError(entry.damage)
        return entry.envelope, entry.problem

    def scan(self) -> list[tuple[str, str, Envelope | None, str | None]]:
        """
        Every entry as (queue id, state, envelope or None, problem or None),
        without changing anything: for operator tools, lock not needed.  A
        damaged entry has no envelope and says why; nothing raises but a
        spool directory that cannot be listed (L{OSError}).
        """
        return list(self.iter_scan())

    def iter_scan(self) -> Iterator[tuple[str, str, Envelope | None, str | None]]:
        """
        L{scan} one entry at a time, in the same order: what is held at
        once is one entry and the names of one directory, so listing a
        queue of any size takes constant memory per entry.
        """
        state_ids = {n[:-5] for n in self._names("envelopes") if n.endswith(".json")}
        for state in STATE_DIRS:
            for qid in sorted(self._names(state)):
                found = self._scan_one(qid, state, qid in state_ids)
                if found is not None:
                    yield found

    def find(self, queue_id: str) -> tuple[str, str, Envelope | None, str | None] | None:
        """
        One entry as L{scan} shows it, or C{None} when there is none,
        without listing the spool.
        """
        state = self.state_of(queue_id)
        if state is None:
            return None
        return self._scan_one(queue_id, state, os.path.exists(self.envelope_path(queue_id)))

    def _scan_one(self, qid: str, state: str, has_state_file: bool
                  ) -> tuple[str, str, Envelope | None, str | None] | None:
        try:
            entry = self.read(qid, state, has_state_file)
        except FileNotFoundError:
            return None  # finished while we looked
        except Exception as e:
            return (qid, state, None, _why(e))
        return (qid, state, entry.envelope, entry.problem)

    # -- start-up ---------------------------------------------------------

    def _free_name(self, name: str) -> str:
        """
        A name for C{name} in corrupt/ that replaces nothing there.
        """
        corrupt = self._dir("corrupt")
        candidate, n = name, 0
        while os.path.lexists(os.path.join(corrupt, candidate)) or \
                os.path.lexists(os.path.join(corrupt, candidate + ".json")):
            n += 1
            candidate = f"{name}.{n}"
        return candidate

    def _quarantine(self, name: str, src: str, why: str, state_file: bool = False,
                    queue_id: str | None = None) -> None:
        """
        Move C{src}/C{name} (and the entry's state file) to corrupt/, never
        deleting anything, and say so.
        """
        dest = self._free_name(name)
        os.rename(os.path.join(self.path, src, name), os.path.join(self._dir("corrupt"), dest))
        if state_file:
            try:
                os.rename(os.path.join(self._dir("envelopes"), name + ".json"),
                          os.path.join(self._dir("corrupt"), dest + ".json"))
            except FileNotFoundError:
                pass
        log.warn("spool: {name} in {state}/ cannot be used ({error}); moved to corrupt/{dest}",
                 name=name, queue_id=queue_id or name, state=src, error=why, dest=dest,
                 event="queue.quarantined")

    def recover(self) -> RecoveryReport:
        """
        Bring the spool to a consistent state after any kind of stop and
        return every live entry.  Needs the lock.  The same as
        L{recover_start} and then L{recover_entries} of all it found,
        which the queue manager does in batches so that start-up does not
        wait for a large queue.

        Nothing found in an entry stops it: a damaged queue file (see
        L{read}) is moved to corrupt/ (C{queue.quarantined}), an unusable
        recorded state is removed and the entry goes on from its other
        state or the envelope it was accepted with (C{queue.state-lost}),
        each logged.  Only a spool directory that cannot be read or
        changed raises (L{OSError}).
        """
        plan = self.recover_start()
        report = self.recover_entries(plan.pending)
        return attrs.evolve(report, removed_debris=plan.removed_debris,
                            removed_orphans=plan.removed_orphans,
                            quarantined=plan.quarantined + report.quarantined)

    def recover_start(self) -> RecoveryPlan:
        """
        The part of L{recover} that reads directories only: debris in
        tmp/, copies of one entry, envelopes/; the entries themselves are
        left for L{recover_entries}.  Needs the lock.
        """
        debris = 0
        for entry in self._listing("tmp"):
            try:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                pass
            debris += 1

        quarantined: list[str] = []
        messages: dict[str, str] = {}
        # The same name in two state directories (a copy): the later state
        # wins (an operator's hold above all), the other is set aside.
        for state in STATE_DIRS:
            for name in self._names(state):
                earlier = messages.get(name)
                if earlier is not None:
                    self._quarantine(name, earlier, f"another copy is in {state}/")
                    quarantined.append(name)
                messages[name] = state

        orphans = 0
        state_ids = set()
        for entry in self._listing("envelopes"):
            name = entry.name
            qid = name[:-5] if name.endswith(".json") else None
            if not entry.is_file(follow_symlinks=False):
                self._quarantine(name, "envelopes", "not a regular file", queue_id=qid)
                quarantined.append(name)
            elif qid is not None and qid in messages and is_queue_id(qid):
                state_ids.add(qid)
            else:
                os.unlink(entry.path)
                orphans += 1
                log.info("spool: removed {name} from envelopes/: no queue entry of that name",
                         name=name, event="queue.orphan-removed")

        if quarantined:
            fsync_dir(self._dir("corrupt"))
        return RecoveryPlan(
            pending=tuple((qid, state, qid in state_ids)
                          for qid, state in sorted(messages.items())),
            removed_debris=debris, removed_orphans=orphans, quarantined=tuple(quarantined))

    def recover_entries(self, pending) -> RecoveryReport:
        """
        Read the entries of a L{RecoveryPlan} (all or a batch): damaged ones
        go to corrupt/, unusable states are removed, as L{recover} says;
        returns the live ones (the report's counts of debris and orphans
        are 0: they belong to the plan).  Needs the lock.
        """
        entries = []
        restarted = []
        quarantined: list[str] = []
        for qid, state, has_file in pending:
            try:
                entry = self.read(qid, state, has_file)
            except FileNotFoundError:
                continue
            except Exception as e:  # (an unreadable directory entry, or a bug)
                entry = EntryRead(qid, state, None, damage=_why(e))
            if entry.envelope is None:
                self._quarantine(qid, state, entry.damage or "damaged", state_file=has_file)
                quarantined.append(qid)
                continue
            if entry.bad_xattr:
                try:
                    os.removexattr(self.path_in(state, qid), XATTR)
                except OSError as e:
                    if e.errno != errno.ENODATA:
                        raise
            if entry.bad_file:
                try:
                    os.unlink(self.envelope_path(qid))
                except FileNotFoundError:
                    pass
            if entry.dropped:
                restarted.append(qid)
                then = ("starting again from the envelope it was accepted with"
                        if entry.from_header else "going on from its other recorded state")
                log.warn("spool: recorded state of {queue_id} is unusable ({error}); {then}",
                         queue_id=qid, error="; ".join(entry.dropped), then=then,
                         event="queue.state-lost")
            if entry.note:
                log.warn("spool: {queue_id}: {note}", queue_id=qid, note=entry.note,
                         event="queue.state-lost")
            entries.append((entry.envelope, state))
        if quarantined:
            fsync_dir(self._dir("corrupt"))
        return RecoveryReport(entries=tuple(entries), removed_debris=0, removed_orphans=0,
                              quarantined=tuple(quarantined), restarted=tuple(restarted))
