"""
Making received messages durable in a helper process, not in threads.

A small message is held in memory until the end of data; then it must be
written to C{tmp/}, fsync'd, renamed into C{new/} and C{new/} fsync'd
before the C{250}.  Done in the I/O threads, every commit cost a trip to a
thread and back, and each system call of that thread's Python took the GIL
back from the reactor: on a loaded 2-core machine the threads of the two
processes spent about half a millisecond of CPU per message, and the
reactor thread paid for waking them (docs/benchmarks.md, "A process that
commits").  A helper process has no GIL to share: it takes the messages
of a batch on its standard input, writes them all, fsyncs them, renames
them, fsyncs C{new/} once, and answers each on its standard output.

L{Committer} is the process's side.  The helper (L{main}, run as C{python
-m twisted_mta.queue.committer SPOOL}) imports nothing but the standard
library, dies with its parent (SIGKILL, Linux), and ends when its
standard input closes.  If it ends while messages wait for their answer,
each is committed again in the I/O threads (L{commit_in_thread}, which
finds one already renamed and only fsyncs C{new/}), so a commit is never
lost nor made twice; the helper is started again after
L{Committer.RESTART_AFTER} seconds, the threads doing the work meanwhile.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="twisted_mta.queue.committer")

Spawn = Callable[[protocol.ProcessProtocol, list[str]], Any]


class CommitError(OSError):
    """
    A commit that failed; C{renamed} says whether the file had reached
    C{new/} (then only C{new/}'s fsync failed, and the caller must take
    the entry out again).
    """

    def __init__(self, code: int, renamed: bool) -> None:
        super().__init__(code, os.strerror(code) if code else "the commit failed")
        self.renamed = renamed


def _paths(spool: str, queue_id: str) -> tuple[str, str]:
    return os.path.join(spool, "tmp", queue_id), os.path.join(spool, "new", queue_id)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file_durably(path: str, data: bytes) -> None:
    """
    Create C{path} (which must not exist), write C{data} and fsync it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_in_thread(spool: str, queue_id: str, data: bytes) -> None:
    """
    The helper's work for one message, blocking (the I/O threads run it
    when the helper cannot): an entry the helper renamed already is only
    made durable in its directory; a partial file in C{tmp/} is written
    again.
    """
    tmp, new = _paths(spool, queue_id)
    if not os.path.exists(new):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        write_file_durably(tmp, data)
        os.rename(tmp, new)
    try:
        fsync_dir(os.path.dirname(new))
    except OSError as e:
        raise CommitError(e.errno or errno.EIO, True)


def run_batch(spool: str, batch: list[tuple[str, bytes]]) -> list[bytes]:
    """
    Commit C{batch}, (queue id, file content) in order, and give each its
    answer line: all files written first, then each fsync'd (on ext4 the
    first fsync's journal commit takes the others' data with it), renamed,
    and C{new/} fsync'd once for all.
    """
    opened: list[tuple[str, int | None, int, bool]] = []  # id, fd, errno, renamed
    for queue_id, data in batch:
        tmp, _ = _paths(spool, queue_id)
        fd = None
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            write_all(fd, data)
            opened.append((queue_id, fd, 0, False))
        except OSError as e:
            if fd is not None:
                os.close(fd)
            opened.append((queue_id, None, e.errno or errno.EIO, False))
    done: list[tuple[str, int | None, int, bool]] = []
    for queue_id, fd, code, _ in opened:
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as e:
                code = e.errno or errno.EIO
            finally:
                os.close(fd)
        done.append((queue_id, None, code, False))
    finished = []
    for queue_id, _, code, _ in done:
        renamed = False
        if not code:
            tmp, new = _paths(spool, queue_id)
            try:
                os.rename(tmp, new)
                renamed = True
            except OSError as e:
                code = e.errno or errno.EIO
        finished.append((queue_id, code, renamed))
    if any(renamed for _, _, renamed in finished):
        try:
            fsync_dir(os.path.join(spool, "new"))
        except OSError as e:
            finished = [(q, c or e.errno or errno.EIO, r) if r else (q, c, r)
                        for q, c, r in finished]
    return [b"%s ok\n" % q.encode() if not c else b"%s err %d %d\n" % (q.encode(), c, r)
            for q, c, r in finished]


def parse_requests(buffer: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """
    The complete requests at the start of C{buffer} (C{QUEUE-ID LENGTH\\n}
    and as many octets), and what is left of it.
    """
    batch = []
    while True:
        end = buffer.find(b"\n")
        if end < 0:
            break
        queue_id, _, length = buffer[:end].partition(b" ")
        size = int(length)
        if len(buffer) < end + 1 + size:
            break
        batch.append((queue_id.decode("ascii"), buffer[end + 1:end + 1 + size]))
        buffer = buffer[end + 1 + size:]
    return batch, buffer


def main(argv: list[str] | None = None) -> int:
    """The helper: commit what comes on standard input until it closes."""
    from twisted_mta.lifetime import die_with_parent
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m twisted_mta.queue.committer SPOOL", file=sys.stderr)
        return 2
    die_with_parent()
    spool = args[0]
    buffer = b""
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return 0
        buffer += chunk
        batch, buffer = parse_requests(buffer)
        if batch:
            answer = b"".join(run_batch(spool, batch))
            view = memoryview(answer)
            while view:
                view = view[os.write(1, view):]


class _HelperProtocol(protocol.ProcessProtocol):
    def __init__(self, committer: "Committer") -> None:
        self.committer = committer
        self.buffer = b""

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            self.committer._answered(self, line)

    def processEnded(self, reason: Failure) -> None:
        self.committer._ended(self, reason)


class Committer:
    """
    The process's side of the helper: L{commit} sends a message to it and
    fires when the message is durable in C{new/}, or fails with
    L{CommitError}.  C{spawn(protocol, args)} starts the helper (the
    reactor's C{spawnProcess} with this interpreter); C{run_blocking} runs
    the thread fallback; C{clock} is the reactor.
    """

    RESTART_AFTER = 10.0  # seconds of the threads' work after the helper ends

    def __init__(self, spool: str, spawn: Spawn, run_blocking: Callable[..., defer.Deferred],
                 clock) -> None:
        self.spool = spool
        self._spawn = spawn
        self._run_blocking = run_blocking
        self._clock = clock
        self._helper: _HelperProtocol | None = None
        self._transport: Any = None
        self._waiting: dict[str, tuple[bytes, defer.Deferred]] = {}
        self._down_until = 0.0
        self._stopped = False

    def commit(self, queue_id: str, data: bytes) -> defer.Deferred:
        if self._helper is None and not self._start():
            return self._run_blocking(commit_in_thread, self.spool, queue_id, data)
        d: defer.Deferred = defer.Deferred()
        self._waiting[queue_id] = (data, d)
        self._transport.write(b"%s %d\n" % (queue_id.encode("ascii"), len(data)) + data)
        return d

    def _start(self) -> bool:
        if self._stopped or self._clock.seconds() < self._down_until:
            return False
        helper = _HelperProtocol(self)
        try:
            self._transport = self._spawn(helper, [sys.executable, "-m",
                                                   "twisted_mta.queue.committer", self.spool])
        except Exception as e:  # could not start: the threads commit
            self._down(f"{type(e).__name__}: {e}")
            return False
        self._helper = helper
        return True

    def _down(self, why: str) -> None:
        self._down_until = self._clock.seconds() + self.RESTART_AFTER
        log.warn("queue: the commit helper {why}; the I/O threads commit for {seconds:g} s",
                 why=why, seconds=self.RESTART_AFTER, event="queue.committer_down")

    def _answered(self, helper: _HelperProtocol, line: bytes) -> None:
        if helper is not self._helper:
            return
        queue_id, _, rest = line.decode("ascii", "replace").partition(" ")
        found = self._waiting.pop(queue_id, None)
        if found is None:
            return  # not ours (cannot happen): the helper's ending resolves the rest
        _, d = found
        if rest == "ok":
            d.callback(None)
            return
        try:
            _, code, renamed = rest.split(" ")
            d.errback(CommitError(int(code), renamed == "1"))
        except ValueError:
            d.errback(CommitError(errno.EIO, False))

    def _ended(self, helper: _HelperProtocol, reason: Failure) -> None:
        if helper is not self._helper:
            return
        self._helper = self._transport = None
        waiting, self._waiting = self._waiting, {}
        if not self._stopped:
            self._down(f"ended ({reason.value})")
        for queue_id, (data, d) in waiting.items():
            self._run_blocking(commit_in_thread, self.spool, queue_id, data).chainDeferred(d)

    def stop(self) -> None:
        """
        Close the helper's input: it answers what it has and ends; from
        now on the threads commit.
        """
        self._stopped = True
        if self._transport is not None:
            self._transport.closeStdin()


def start_committer(spool: str, reactor, run_blocking: Callable[..., defer.Deferred]
                    ) -> Committer | None:
    """
    The committer of a running process (the main process, a worker), its
    helper started with the first commit by C{reactor} and told to end at
    shutdown; None where C{reactor} cannot start processes.
    """
    from twisted.internet.interfaces import IReactorProcess
    if not IReactorProcess.providedBy(reactor):
        return None

    def spawn(helper: protocol.ProcessProtocol, args: list[str]) -> Any:
        return reactor.spawnProcess(helper, args[0], args, env=dict(os.environ),
                                    childFDs={0: "w", 1: "r", 2: 2})

    committer = Committer(spool, spawn, run_blocking, reactor)
    reactor.addSystemEventTrigger("after", "shutdown", committer.stop)
    return committer


if __name__ == "__main__":
    sys.exit(main())
