"""
Processes (docs/architecture.md, "Processes"): the main process owns the
spool, runs the queue and delivers, and receives mail like every other
receiving process; C{[server] workers} child processes receive beside it
and, with C{[outbound] send_in_workers}, send remote mail for it
(L{WorkerSending}).
One Python process uses one core (one GIL), so receiving in two processes
puts a 2-core machine's second core to work on the mail users compare:
received and delivered.

 - The main process opens every listener's socket (as root, before twistd
   drops privileges) and accepts on it; each worker adopts the same
   sockets (C{adoptStreamPort}) and the kernel hands each new connection
   to whichever process accepts first, so a process busy delivering takes
   fewer.  The default is one worker fewer than cores: on 2 cores, the
   main process and one worker, two processes' memory instead of three.
 - A worker writes each message into the shared spool exactly as the main
   process does (C{new/}, fsync'd before the 250), then tells the main
   process its queue id on a pipe; the main process reads the entry and
   queues it.  The main process owns every entry after that: it
   schedules it, and the control directory (queue and tls commands), TLS
   history and shadow records stay with one process as before.
 - Sending: the main process keeps the queue and its decisions and
   sends what flows through itself; a backlog beyond its share of the
   connections goes to the least busy sending process (a worker, which
   answers with the outcomes, or itself).  An idle entry (on disk only)
   that comes due goes whole to a worker when the main process has at
   least as many under way (L{WorkerSending.attempt}): the worker reads
   it, sends, records the results and removes it, with the main
   process's own decisions (L{twisted_mta.queue.delegated}), while the
   main process holds it as under way.  TLS history changes and
   observers' events come back to the main process, their one writer.
 - A worker that dies is started again; entries it queued whose notice
   never arrived are found in C{new/} then, so nothing acknowledged is
   lost; what it was sending is deferred and tried again, and an entry
   it was attempting is looked for where it got to and tried again.  A worker whose parent dies stops at once (its end of the pipe
   to the parent closes, and Linux sends it SIGKILL).
 - Limits (connections per address, in total, stress) and the AUTH
   failure limiter count per receiving process.

L{twisted_mta.worker} is the child's side.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, protocol
from twisted.logger import Logger

from twisted_mta import failures
from twisted_mta.delivery.remote import read_queued
from twisted_mta.metrics import notify
from twisted_mta.model import Envelope, EnvelopeError, MessageGone
from twisted_mta.outbound import wire
from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound.message import QueuedMessage
from twisted_mta.queue import delegated
from twisted_mta.queue.spool import RunBlocking, run_inline

log = Logger()

# What a worker may report of a milter (inbound.milter); anything else is dropped.
MILTER_RESULTS = frozenset({"accept", "modified", "reject", "tempfail", "discard",
                            "quarantine", "failed"})

RESTART_DELAY = 0.5  # seconds before a dead worker is started again
RESTART_MAX_DELAY = 30.0  # ... doubling while it keeps dying young
YOUNG = 10.0  # a worker that dies younger than this counts as crashing
STOP_TIMEOUT = 8.0  # SIGTERM, then SIGKILL after this long
LISTENER_FD_BASE = 10  # the child's fd of the first listener
FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6", socket.AF_UNIX: "unix"}
SHAREABLE = ("tcp", "tcp6", "unix")  # endpoint kinds whose socket a worker can adopt
SENDING_VERBS = frozenset({b"sent", b"gone", b"done", b"event", b"history", b"cannot-send"})


def worker_count(config) -> int:
    """
    C{[server] workers}, or when not set one fewer than the CPU cores this
    process may use: the main process receives too, so that is one
    receiving process per core.
    """
    if config.workers is not None:
        return config.workers
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return max(cores - 1, 0)


class SharedListener(service.Service):
    """
    One listener's socket, opened by the main process (in
    C{privilegedStartService}, like any listener) and handed to the
    workers; the main process accepts on it too, with C{factory}.
    """

    def __init__(self, reactor, description: str, factory: protocol.Factory) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.port = None

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        self._open()

    def startService(self) -> None:
        service.Service.startService(self)
        if self.port is None:  # started without the privileged step (tests)
            self._open()

    def _open(self) -> None:
        ports: list = []
        failures: list = []
        endpoint = endpoints.serverFromString(self.reactor, self.description)
        endpoint.listen(self.factory).addCallbacks(ports.append, failures.append)
        if failures:
            failures[0].raiseException()
        self.port = ports[0]

    @property
    def fileno(self) -> int:
        return self.port.fileno()

    @property
    def family(self) -> str:
        return FAMILIES[self.port.addressFamily]

    def stopService(self):
        service.Service.stopService(self)
        if self.port is not None:
            return self.port.stopListening()


class _Worker(protocol.ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int, started: float) -> None:
        self.pool = pool
        self.index = index
        self.started = started
        self.buffer = b""
        self.ended = defer.Deferred()

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd != 3:
            return
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        sending = self.pool.sending
        for line in lines:
            words = line.split(b" ", 2)
            if sending is not None and words[0] in SENDING_VERBS:
                sending.line(self.index, line)
            elif len(words) >= 2 and words[0] == b"queued":
                self.pool.queued(words[1].decode("ascii", "replace"),
                                 words[2] if len(words) == 3 else None)
            elif words[0] == b"delivered":
                self.pool.delivered(line)
            elif len(words) == 3 and words[0] == b"milter":
                self.pool.milter_result(words[2].decode("ascii", "replace"),
                                        words[1].decode("ascii", "replace"))

    def processEnded(self, reason) -> None:
        self.pool.ended(self, reason.value)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    Starts C{count} workers on C{listeners} (L{SharedListener}s, in the
    order of C{config.listeners}), queues what they receive with
    C{manager}, restarts the ones that die, and stops them all (SIGTERM,
    then SIGKILL) when the service stops.
    """

    name = "workers"

    def __init__(self, config, reactor, count: int, listeners: list[SharedListener],
                 spool, manager, run_blocking, observers: list | None = None,
                 sending: "WorkerSending | None" = None) -> None:
        self.observers = observers or []  # the metrics, for what the workers report
        self.sending = sending  # when the workers send too
        if sending is not None:
            sending.workers = self
        self.config = config
        self.reactor = reactor
        self.count = count
        self.listeners = listeners
        self.spool = spool
        self.manager = manager
        self.run_blocking = run_blocking
        self.workers: dict[int, Any] = {}  # index -> (process transport, _Worker)
        self.delays: dict[int, float] = {}
        self.stopping = False

    def startService(self) -> None:
        service.Service.startService(self)
        for index in range(self.count):
            self.spawn(index)

    def spawn(self, index: int) -> None:
        if self.stopping:
            return
        import twisted_mta
        root = os.path.dirname(os.path.dirname(os.path.abspath(twisted_mta.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get(
            "PYTHONPATH", "").split(os.pathsep) if p])
        args = [sys.executable, "-m", "twisted_mta.worker", "--config", self.config.path,
                "--index", str(index)]
        fds: dict[int, Any] = {0: "w", 1: 1, 2: 2, 3: "r"}
        for n, listener in enumerate(self.listeners):
            fds[LISTENER_FD_BASE + n] = listener.fileno
            args += ["--listener", f"{n}:{LISTENER_FD_BASE + n}:{listener.family}"]
        if self.sending is not None:
            args += ["--senders", str(self.count)]
        worker = _Worker(self, index, self.reactor.seconds())
        transport = self.reactor.spawnProcess(worker, sys.executable, args, env=env,
                                              childFDs=fds)
        self.workers[index] = (transport, worker)
        if self.sending is not None:
            self.sending.started(index)
        log.info("workers: worker {index} started (pid {pid})", index=index,
                 pid=transport.pid, event="workers.started")

    def milter_result(self, name: str, result: str) -> None:
        """A worker's milter result, for the metrics (one of a known few)."""
        if result in MILTER_RESULTS:
            for observer in self.observers:
                observer("milter.result", {"milter": name, "result": result})

    def delivered(self, line: bytes) -> None:
        """
        A worker delivered a message on receipt (C{delivered COUNT LATENCY
        LISTENER}): counted by the queue manager's observers.
        """
        try:
            _, count, latency, listener = line.decode("ascii").split(" ", 3)
            self.manager.delivered_on_receipt(listener, int(count), float(latency))
        except ValueError:
            log.warn("workers: a worker sent a notice not understood: {line!r}", line=line,
                     event="workers.error")

    def queued(self, queue_id: str, data: bytes | None = None) -> None:
        """
        A worker queued C{queue_id}: queue it here, with the envelope it
        sent (C{data}, as written into the entry), else as read from the
        spool.
        """
        if queue_id in self.manager.entries:  # (a new entry is never idle)
            return
        if data is not None:
            try:
                envelope = Envelope.from_json(data)
            except EnvelopeError:
                envelope = None
            if envelope is not None and envelope.queue_id == queue_id:
                self._enqueue(envelope, queue_id)
                return
        d = self.run_blocking(self.spool.load, queue_id)
        d.addCallback(self._enqueue, queue_id)
        d.addErrback(lambda f: log.failure("workers: cannot queue {queue_id} that a worker "
                                           "received", f, queue_id=queue_id,
                                           event="workers.error"))

    def _enqueue(self, envelope, queue_id: str) -> None:
        if queue_id not in self.manager.entries and not self.stopping:
            self.manager.enqueue(envelope)

    def write(self, index: int, line: bytes) -> bool:
        """Write C{line} to worker C{index}'s pipe; False when it is not running."""
        found = self.workers.get(index)
        if found is None:
            return False
        found[0].writeToChild(0, line)
        return True

    def is_up(self, index: int) -> bool:
        return index in self.workers and not self.stopping

    def ended(self, worker: _Worker, reason: Exception) -> None:
        if self.workers.get(worker.index, (None, None))[1] is worker:
            del self.workers[worker.index]
        if self.sending is not None:
            self.sending.ended(worker.index, _why(reason))
        if self.stopping:
            return
        young = self.reactor.seconds() - worker.started < YOUNG
        delay = min(self.delays.get(worker.index, RESTART_DELAY / 2) * 2, RESTART_MAX_DELAY) \
            if young else RESTART_DELAY
        self.delays[worker.index] = delay
        log.warn("workers: worker {index} ended ({why}); starting it again in {delay:g} s",
                 index=worker.index, why=_why(reason), delay=delay, event="workers.ended")
        self.adopt_orphans()
        self.reactor.callLater(delay, self.spawn, worker.index)

    def adopt_orphans(self) -> None:
        """
        Queue what a dead worker committed to C{new/} but could not report.
        """
        d = self.run_blocking(_listing, os.path.join(self.spool.path, "new"))

        def found(names: list[str]) -> None:
            for name in names:
                if not self.manager.knows(name):  # (idle ones too: a scan)
                    self.queued(name)
        d.addCallback(found)
        d.addErrback(lambda f: log.failure("workers: cannot read new/", f,
                                           event="workers.error"))

    def stopService(self):
        service.Service.stopService(self)
        self.stopping = True
        waiting = []
        for transport, worker in list(self.workers.values()):
            waiting.append(worker.ended)
            _signal(transport, "TERM")
            kill = self.reactor.callLater(STOP_TIMEOUT, _signal, transport, "KILL")
            worker.ended.addBoth(lambda result, call=kill: call.active() and call.cancel())
        return defer.DeferredList(waiting)


class WorkerSending:
    """
    The outbound pool as the remote delivery target sees it (C{deliver},
    C{revive}, C{stop}), sending in the main process's own pool (C{local})
    and in the workers: the main process keeps what it has room for, a
    backlog goes to the least busy (L{sender_for}).  The connection limits
    are divided among them (L{sending_shares}), so that together they
    keep them.  What a worker learns and reports comes back through
    L{line}: outcomes, observers' events, TLS history.  It takes a
    message unread (C{reads_queued}): a worker reads it from its path, and
    the main process reads only what it sends itself.
    """

    reads_queued = True

    def __init__(self, local, history=None, observers: list | None = None,
                 main_sends: bool = True, keep: int = 0, sts_cache=None,
                 read: RunBlocking = run_inline, delegates: bool = False) -> None:
        self.local = local  # an OutboundPool (or a double with deliver, revive, stop)
        # False: the main process's pool only while no worker is up (the
        # limits are too small to share with it, see sending_shares).
        self.main_sends = main_sends
        # Transactions the main process keeps before it hands any over:
        # its share of [outbound] connections (sending_shares).
        self.keep = keep
        # Reads a message this process sends itself (RemoteDelivery hands
        # it over unread, since a worker reads it where it is sent).
        self.read = read
        # Whole attempts of idle entries go to the workers too (attempt).
        self.delegates = delegates
        self.history = history  # the main process's TLSHistory: the one that saves
        # The operator's tls history --forget and tls sts refresh act on
        # this process's history and cache; the workers' copies follow.
        if history is not None:
            history.forgotten.append(self.history_forgotten)
        if sts_cache is not None:
            sts_cache.reloaded.append(self.sts_reloaded)
        self.observers = observers if observers is not None else []
        self.workers: WorkerPool | None = None
        self.pending: dict[int, tuple[int, defer.Deferred, Any]] = {}
        self.busy: dict[int, int] = {}  # worker index -> transactions under way
        self.unable: set[int] = set()  # workers that cannot send (until started again)
        self.local_busy = 0  # the same, in the main process's own pool
        self._next = 0
        self._stopping = False

    @property
    def tls(self):
        return self.local.tls  # the same engine the workers build from the same file

    def sender_for(self, keep: int | None = None) -> int | None:
        """
        The worker to send with, or None for the main process's own pool.
        The main process keeps a transaction while it has fewer than
        C{keep} under way: handing one over costs about as much CPU as
        sending it (docs/benchmarks.md), so mail that flows through is
        sent where it is queued.  Beyond that (a backlog: a flush, a
        queue draining), whichever has the fewest under way, a worker on
        a tie; a process short of CPU finishes its transactions later and
        so gets fewer new ones.
        """
        if self.workers is None or self._stopping:
            return None
        if self.main_sends and self.local_busy < (self.keep if keep is None else keep):
            return None
        best, fewest = None, self.local_busy if self.main_sends else float("inf")
        for index in range(self.workers.count):
            busy = self.busy.get(index, 0)
            if busy <= fewest and (best is None or busy < fewest) and \
                    index not in self.unable and self.workers.is_up(index):
                best, fewest = index, busy
        return best

    def deliver(self, hop, txn) -> defer.Deferred:
        index = self.sender_for()
        if index is None:
            self.local_busy += 1
            if isinstance(txn.message, QueuedMessage):
                d = self.read(read_queued, txn)
                d.addCallback(lambda read: self.local.deliver(hop, read)
                              if isinstance(read, Transaction) else read)
            else:
                d = self.local.deliver(hop, txn)
            d.addBoth(self._local_done)
            return d
        self._next += 1
        n = self._next
        d = defer.Deferred()
        self.pending[n] = (index, d, txn)
        self.busy[index] = self.busy.get(index, 0) + 1
        self.workers.write(index, b"send %d " % n + wire.encode_send(hop, txn) + b"\n")
        return d

    def attempt(self, qid: str, state: str) -> defer.Deferred | None:
        """
        Hand a whole attempt of an idle entry to a worker (it reads the
        entry, sends, records the results, removes it:
        L{twisted_mta.queue.delegated}) when one has no more under way
        than the main process (L{sender_for} without the room kept for the
        main process: a whole attempt handed over costs it a line each
        way, not the read); fires with the worker's L{delegated.Answer}.
        None: the main process attempts it itself.
        """
        if not self.delegates:
            return None
        index = self.sender_for(keep=0)
        if index is None:
            return None
        self._next += 1
        n = self._next
        d = defer.Deferred()
        self.pending[n] = (index, d, None)  # None: an attempt, not a transaction
        self.busy[index] = self.busy.get(index, 0) + 1
        self.workers.write(index, b"attempt %d %s %s\n" % (n, qid.encode("ascii"),
                                                           state.encode("ascii")))
        return d

    def _local_done(self, result):
        self.local_busy -= 1
        return result

    def _answered(self, n: int):
        index, d, txn = self.pending.pop(n)
        self.busy[index] -= 1
        return d, txn

    def line(self, index: int, line: bytes) -> None:
        """A line from worker C{index} about sending."""
        verb, _, rest = line.partition(b" ")
        try:
            if verb in (b"sent", b"gone", b"done"):
                n_text, _, data = rest.partition(b" ")
                n = int(n_text)
                found = self.pending.get(n)
                if found is None or found[0] != index or (found[2] is None) != (verb == b"done"):
                    raise wire.WireError(f"an answer to no request ({n})")
                if verb == b"done":
                    d, _ = self._answered(n)
                    try:
                        answer = delegated.Answer.decode(data)
                    except delegated.AnswerError:
                        # Not to be taken in: look where the entry got to.
                        d.callback(delegated.Answer(delegated.LOST))
                        raise
                    d.callback(answer)
                elif verb == b"gone":
                    d, txn = self._answered(n)
                    d.errback(MessageGone(txn.message.path))
                else:
                    outcomes = wire.decode_outcomes(data)
                    d, txn = self._answered(n)
                    d.callback(outcomes)
            elif verb == b"event":
                name, event = wire.decode_event(rest)
                notify(self.observers, name, event, log, "workers.error")
            elif verb == b"cannot-send":
                self.unable.add(index)
            elif verb == b"history" and self.history is not None:
                self.history.put(*wire.decode_history(rest))
        except (wire.WireError, ValueError) as e:  # delegated.AnswerError too
            log.warn("workers: worker {index} sent a line not understood: {why}",
                     index=index, why=str(e), event="workers.error")

    def started(self, index: int) -> None:
        """Worker C{index} was started: it begins with our TLS history."""
        self.unable.discard(index)
        if self.history is not None:
            self.workers.write(index, b"history " + wire.encode_json(self.history.to_json())
                               + b"\n")

    def ended(self, index: int, why: str) -> None:
        """
        Worker C{index} ended: what it had not answered is tried again
        later (it may have gone; at least once, as after a crash).
        """
        lost = [n for n, (i, _, _) in self.pending.items() if i == index]
        if lost:
            log.warn("workers: worker {index} ended with {count} transaction(s) under way; "
                     "their messages will be tried again", index=index, count=len(lost),
                     event="workers.sending_lost")
        outcome = failures.outcome("sender-ended", why=why)
        for n in lost:
            d, txn = self._answered(n)
            d.callback(delegated.Answer(delegated.LOST) if txn is None else
                       {r: outcome for r in txn.recipients})

    def tell(self, line: bytes) -> None:
        """Every running worker gets C{line} (an operator's request)."""
        if self.workers is not None:
            for index in list(self.workers.workers):
                self.workers.write(index, line)

    def revive(self) -> None:
        self.local.revive()
        self.tell(b"revive\n")

    def history_forgotten(self, domain: str | None) -> None:
        self.tell(b"history-forget " + (domain or "*").encode("ascii", "replace") + b"\n")

    def sts_reloaded(self, domain: str) -> None:
        self.tell(b"sts-reload " + domain.encode("ascii", "replace") + b"\n")

    def stop(self) -> None:
        self._stopping = True
        self.local.stop()


def sending_shares(settings, workers: int):
    """
    The outbound settings of each sending process, and whether the main
    process sends beside the C{workers}: the limits on connections (per
    destination and in total) are divided among the processes that send,
    so that together they keep them.  Limits too small to give each
    process one leave the sending to the workers.
    """
    import attrs
    processes = workers + 1
    if min(settings.connections_per_destination, settings.connections) < processes:
        processes, main_sends = workers, False
    else:
        main_sends = True
    return attrs.evolve(
        settings, connections=max(1, settings.connections // processes),
        connections_per_destination=max(1, settings.connections_per_destination // processes)
    ), main_sends


def _signal(transport, name: str) -> None:
    try:
        transport.signalProcess(name)
    except Exception:  # already gone
        pass


def _listing(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _why(reason: Exception) -> str:
    code = getattr(reason, "exitCode", None)
    sig = getattr(reason, "signal", None)
    if sig:
        try:
            return f"signal {signal.Signals(sig).name}"
        except ValueError:
            return f"signal {sig}"
    return f"exit code {code}"
