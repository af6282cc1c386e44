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

L{Committer} is the process's side; the helper's program is
L{twisted_mta.queue.commit_helper}, with the standard library only.  If
the helper ends while messages wait for their answer, each is committed
again in the I/O threads (L{commit_in_thread}, which finds one already
renamed and only fsyncs C{new/}), so a commit is never lost nor made
twice; the helper is started again after L{Committer.RESTART_AFTER}
seconds, the threads doing the work meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
from typing import Any, Callable

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.queue.commit_helper import CommitError, commit_in_thread

log = Logger(namespace="twisted_mta.queue.committer")

# The pipe to the helper (the default is 64 KiB; an unprivileged process
# may ask up to /proc/sys/fs/pipe-max-size, 1 MiB by default).
PIPE_SIZE = 1 << 20

Spawn = Callable[[protocol.ProcessProtocol, list[str]], Any]


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
        if self._stopped or (self._helper is None and not self._start()):
            return self._run_blocking(commit_in_thread, self.spool, queue_id, data)
        d: defer.Deferred = defer.Deferred()
        self._waiting[queue_id] = (data, d)
        self._transport.write(b"%s %d\n" % (queue_id.encode("ascii"), len(data)) + data)
        return d

    def _start(self) -> bool:
        if self._clock.seconds() < self._down_until:
            return False
        helper = _HelperProtocol(self)
        try:
            self._transport = self._spawn(helper, [sys.executable, "-m",
                                                   "twisted_mta.queue.commit_helper", self.spool])
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
        except ValueError:  # an answer not understood: take the entry out, if it is in
            d.errback(CommitError(errno.EIO, True))

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
        transport = reactor.spawnProcess(helper, args[0], args, env=dict(os.environ),
                                         childFDs={0: "w", 1: "r", 2: 2})
        try:  # Linux: a 100 KiB message in one write, not two turns of 64 KiB
            fcntl.fcntl(transport.pipes[0].fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except (AttributeError, KeyError, OSError):
            pass
        return transport

    committer = Committer(spool, spawn, run_blocking, reactor)
    reactor.addSystemEventTrigger("after", "shutdown", committer.stop)
    return committer

