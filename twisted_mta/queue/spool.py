"""
The Maildir-backed spool: where a message lives between the 250 and its
last delivery.

Layout under the spool directory::

    tmp/        being written; anything here at start-up is debris
    new/        accepted, not yet attempted       (a real Maildir: tmp/new/cur)
    cur/        attempted at least once, deferred
    hold/       held by the operator
    corrupt/    quarantined: a queue file whose envelope cannot be read
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
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import time
from typing import Callable, Iterator

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.model import Envelope, EnvelopeError, from_header, header_end

log = Logger()

STATE_DIRS = ("new", "cur", "hold")
XATTR = "user.twisted_mta.state"
XATTR_MAX = 3500  # fits the inode's or one block's xattr space on ext4
ALL_DIRS = ("tmp", "new", "cur", "hold", "corrupt", "envelopes", "control")

RunBlocking = Callable[..., defer.Deferred]


class SpoolError(Exception):
    """
    The spool cannot be used (permissions, already owned by another process).
    """


def run_inline(f: Callable, *args: object) -> defer.Deferred:
    """
    Run blocking work in the calling thread; for tests and the CLI.
    """
    return defer.maybeDeferred(f, *args)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: str, data: bytes) -> None:
    """
    Create C{path} (which must not exist), write C{data} and fsync it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_head(path: str) -> tuple[Envelope, int]:
    """
    The envelope a queue file was accepted with, and the offset where the
    message starts, reading only the file's head.
    """
    with open(path, "rb") as f:
        data = b""
        while True:
            more = f.read(65536)
            data += more
            if header_end(data) >= 0:
                return from_header(data)
            if not more:
                raise EnvelopeError("the envelope header is incomplete")


def read_envelope_header(path: str) -> Envelope:
    return read_head(path)[0]


class _GroupSync:
    """
    Coalesce directory fsyncs: every caller waits for one fsync that started
    after its own rename, and concurrent callers share it.
    """

    def __init__(self, run_blocking: RunBlocking, dirs: tuple[str, ...]) -> None:
        self._run = run_blocking
        self._dirs = dirs
        self._running = False
        self._waiting: list[defer.Deferred] = []

    def sync(self) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        if not self._running:
            self._start()
        return d

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._running = True

        def sync_all() -> None:
            for path in self._dirs:
                fsync_dir(path)

        def finished(result: object) -> None:
            self._running = False
            for d in batch:
                d.callback(None) if not isinstance(result, Failure) else d.errback(result)
            if self._waiting:
                self._start()

        self._run(sync_all).addBoth(finished)


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

    def __init__(self, spool: "Spool", queue_id: str) -> None:
        self.spool = spool
        self.queue_id = queue_id
        self.path = os.path.join(spool.path, "tmp", queue_id)
        self.size = 0
        self.closed = False
        self._chunks: list[bytes] = []
        self._waiting = 0
        self._fd: int | None = None
        self._renamed = False  # in new/: a failure after this must take it out again
        # Every disk operation of this message runs after the previous one.
        self._tail: defer.Deferred = defer.succeed(None)

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._waiting += len(data)
        self.size += len(data)
        if self._waiting > self.SPILL:
            self._then(self._append, self._take())

    def _take(self) -> bytes:
        data = b"".join(self._chunks)
        self._chunks = []
        self._waiting = 0
        return data

    def _then(self, f, *args) -> defer.Deferred:
        run = self.spool.run_blocking
        self._tail = self._tail.addCallback(lambda _: run(f, *args))
        return self._tail

    def _append(self, data: bytes) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def commit(self, envelope: Envelope) -> defer.Deferred:
        """
        Make the entry durable; fires with C{envelope}, the in-memory state.

        The envelope the entry will be recovered with is the header written
        first (L{Envelope.to_header}), not this argument.
        """
        self.closed = True
        spool = self.spool
        qid = self.queue_id
        rest = self._take()

        def durable() -> None:
            try:
                self._append(rest)
                os.fsync(self._fd)
            finally:
                self._close_fd()
            os.rename(self.path, os.path.join(spool.path, "new", qid))
            self._renamed = True

        d = self._then(durable)
        d.addCallback(lambda _: spool.group_sync.sync())
        d.addCallback(lambda _: envelope)
        d.addErrback(self._failed)
        return d

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
            try:
                os.unlink(os.path.join(self.spool.path, "new", self.queue_id))
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


class Spool:
    """
    One spool directory, owned by this process while L{lock} is held.
    """

    def __init__(self, path: str, run_blocking: RunBlocking = run_inline,
                 new_queue_id: Callable[[], str] | None = None) -> None:
        self.path = os.path.abspath(path)
        self.run_blocking = run_blocking
        self.new_queue_id = new_queue_id or QueueIdGenerator()
        self.group_sync = _GroupSync(run_blocking, (self._dir("new"),))
        self._lock_fd: int | None = None
        self._xattrs = True  # until the file system says otherwise

    def _dir(self, name: str) -> str:
        return os.path.join(self.path, name)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.path, "envelopes", queue_id + ".json")

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
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
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
        for root, dirs, files in os.walk(self.path):
            os.chown(root, uid, gid)
            for name in files:
                os.chown(os.path.join(root, name), uid, gid)

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing ----------------------------------------------------------

    def new_message(self) -> MessageWriter:
        return MessageWriter(self, self.new_queue_id())

    def discard_debris(self, queue_id: str) -> None:
        for name in (queue_id, queue_id + ".json"):
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
        path = os.path.join(self.path, state, qid)
        if self._xattrs and len(data) <= XATTR_MAX:
            try:
                os.setxattr(path, XATTR, data)
            except OSError as e:
                if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSPC, errno.E2BIG):
                    raise
                if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
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
        for state in STATE_DIRS:
            try:
                os.unlink(os.path.join(self.path, state, queue_id))
            except FileNotFoundError:
                continue
        try:
            os.unlink(self.envelope_path(queue_id))
        except FileNotFoundError:
            pass

    def move(self, queue_id: str, src: str, dst: str) -> None:
        os.rename(os.path.join(self.path, src, queue_id), os.path.join(self.path, dst, queue_id))

    def path_in(self, state: str, queue_id: str) -> str:
        return os.path.join(self.path, state, queue_id)

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
        for state in STATE_DIRS:
            if os.path.exists(os.path.join(self.path, state, queue_id)):
                return state
        return None

    def message_path(self, queue_id: str) -> str | None:
        state = self.state_of(queue_id)
        return None if state is None else os.path.join(self.path, state, queue_id)

    def load(self, queue_id: str) -> Envelope:
        """
        The entry's current envelope (see L{read_entry}).
        """
        state = self.state_of(queue_id)
        if state is None:
            raise FileNotFoundError(f"no queue entry {queue_id}")
        return self.read_entry(queue_id, state, os.path.exists(self.envelope_path(queue_id)))[0]

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

    def _names(self, name: str) -> Iterator[str]:
        with os.scandir(self._dir(name)) as it:
            for entry in it:
                if not entry.name.startswith("."):
                    yield entry.name

    def read_entry(self, queue_id: str, state: str, has_state_file: bool
                   ) -> tuple[Envelope, str | None]:
        """
        An entry's current envelope, read-only: its recorded state (the
        xattr or the state file; if a crash left both, the one with more
        attempts), else the envelope in the queue file's header.  Returns
        the envelope and why a recorded state was unreadable (or C{None});
        raises L{EnvelopeError} or L{OSError} when the queue file has no
        envelope.
        """
        path = os.path.join(self.path, state, queue_id)
        env = read_envelope_header(path)
        candidates = []
        problem = None
        try:
            candidates.append(Envelope.from_json(os.getxattr(path, XATTR)))
        except OSError:
            pass  # no xattr (or none supported)
        except EnvelopeError as e:
            problem = f"state attribute: {e}"
        if has_state_file:
            try:
                with open(self.envelope_path(queue_id), "rb") as f:
                    candidates.append(Envelope.from_json(f.read()))
            except (EnvelopeError, OSError) as e:
                problem = str(e)
        if candidates:
            env = max(candidates, key=lambda c: c.attempts)
        return env, problem

    def scan(self) -> list[tuple[str, str, Envelope | None, str | None]]:
        """
        Every entry as (queue id, state, envelope or None, problem or None),
        without changing anything: for operator tools, lock not needed.
        """
        state_ids = {n[:-5] for n in self._names("envelopes") if n.endswith(".json")}
        out = []
        for state in STATE_DIRS:
            for qid in sorted(self._names(state)):
                try:
                    env, problem = self.read_entry(qid, state, qid in state_ids)
                except FileNotFoundError:
                    continue  # finished while we looked
                except (EnvelopeError, OSError) as e:
                    env, problem = None, str(e)
                out.append((qid, state, env, problem))
        return out

    def recover(self) -> RecoveryReport:
        """
        Bring the spool to a consistent state after any kind of stop and
        return every live entry.  Needs the lock.
        """
        debris = 0
        for name in list(self._names("tmp")):
            os.unlink(os.path.join(self.path, "tmp", name))
            debris += 1

        messages = {}
        for state in STATE_DIRS:
            for name in self._names(state):
                messages[name] = state
        envelope_ids = {n[:-5] for n in self._names("envelopes") if n.endswith(".json")}

        orphans = 0
        for qid in envelope_ids - set(messages):
            os.unlink(self.envelope_path(qid))
            orphans += 1

        quarantined = []
        entries = []
        for qid, state in sorted(messages.items()):
            try:
                env, state_error = self.read_entry(qid, state, qid in envelope_ids)
            except (EnvelopeError, OSError) as e:
                self.move(qid, state, "corrupt")
                if qid in envelope_ids:
                    os.rename(self.envelope_path(qid),
                              os.path.join(self.path, "corrupt", qid + ".json"))
                quarantined.append(qid)
                log.warn("spool: queue file {queue_id} has no readable envelope ({error}); "
                         "moved to corrupt/", queue_id=qid, error=str(e),
                         event="queue.quarantined")
                continue
            if state_error is not None:
                os.unlink(self.envelope_path(qid))
                log.warn("spool: state of {queue_id} is unreadable ({error}); starting "
                         "again from the envelope it was accepted with",
                         queue_id=qid, error=state_error, event="queue.state-lost")
            entries.append((env, state))
        if quarantined:
            fsync_dir(self._dir("corrupt"))
        return RecoveryReport(entries=tuple(entries), removed_debris=debris,
                              removed_orphans=orphans, quarantined=tuple(quarantined))
