"""
The queue manager: picks up due entries (at start and as they arrive),
hands their recipients to the delivery targets (local or remote, through
L{IDeliveryTarget}; it imports none of them), records per-recipient results
and schedules retries.

State lives on disk (the spool); the timers here are derived from it, so a
restart rebuilds them from each envelope's C{next_attempt}.  While the
process runs, the envelope in memory may be ahead of the disk: when an
attempt's results cannot be written (a full disk), the retry starts from
them, so nothing is delivered or reported twice; only a crash falls back to
the older state on disk, which repeats work and never loses it.

The DSNs an attempt owes are queued before its results are recorded.  One
that cannot be queued leaves its recipients flagged C{dsn_pending} (recorded
with the rest), and the entry stays, retried on the schedule, until a later
attempt queues it without delivering again.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import math
import random
from typing import Callable, Iterator

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from twisted_mta.config import Config
from twisted_mta.deferreds import gather
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory
from twisted_mta.metrics import notify
from twisted_mta.model import (
    DELIVERED, DeliveryRequest, Envelope, MessageGone, Outcome, Recipient,
)
from twisted_mta.queue import control, delegated
from twisted_mta.queue.idle import IdleEntries
from twisted_mta.queue.notices import Notices
from twisted_mta.queue.operator import OperatorRequests
from twisted_mta.queue.results import (  # noqa: F401 (expired_outcome: theirs)
    apply_results, deliver_to, dsns_owed, expired_outcome, log_removed, newly_done,
    retry_delay,
)
from twisted_mta.queue.spool import (  # noqa: F401 (REMOVE_GATHER: tap's)
    REMOVE_GATHER, Batched, RunBlocking, Spool, attempted_state,
)

log = Logger()

CONTROL_INTERVAL = 1.0  # seconds between looks into spool/control/
# (directory, on_request) -> a function that stops watching, or None
WatchControl = Callable[[str, Callable[[], None]], "Callable[[], object] | None"]
# Bounds on the work of one reactor turn, so that a queue of 100,000 never
# stalls the other clients: attempts started, entries made due by a flush,
# entries read per trip to the I/O threads at start-up.
ATTEMPTS_PER_TURN = 20
FLUSH_BATCH = 2000
LOAD_BATCH = 500
# An entry not due for this long is idle: a line of bytes in
# QueueManager.idle (twisted_mta.queue.idle), read from the spool when it is
# attempted.  Idle entries come back into the tables below this many at a
# time, as the attempts make room (after a flush) or their minute nears.
IDLE_AFTER = 300.0
PULL_BATCH = 200
SHRINK_FROM = 4096  # below this many entries at the peak, tables are left alone


@attrs.frozen
class Targets:
    """
    The delivery targets: C{local} for our own domains, C{remote} for the
    rest; each provides L{IDeliveryTarget}.
    """

    local: object
    remote: object

    def __attrs_post_init__(self) -> None:
        for target in (self.local, self.remote):
            if not IDeliveryTarget.providedBy(target):
                raise TypeError(f"{target!r} does not provide IDeliveryTarget")

    def __iter__(self):
        return iter((self.local, self.remote))


class QueueManager(service.Service):
    name = "queue-manager"

    def __init__(self, config: Config, spool: Spool, clock, run_blocking: RunBlocking,
                 targets: Targets, rand: Callable[[], float] = random.random,
                 observers: list | None = None, tls_history=None, sts_cache=None,
                 after_load: Callable[[], object] | None = None, signer=None,
                 run_reading: RunBlocking | None = None,
                 watch_control: WatchControl | None = None,
                 remove_gather: float = 0.0, delegate=None) -> None:
        self.config = config
        # Runs a whole attempt of an idle entry in a worker with room
        # (workers.WorkerSending.attempt; twisted_mta.queue.delegated).
        self.delegate = delegate
        # Calls back when a request lands in spool/control/ (tap: inotify),
        # so that an operator's command does not wait for the next poll.
        self.watch_control = watch_control
        self._unwatch: Callable[[], object] | None = None
        self.after_load = after_load  # called once start-up has read the spool
        self.spool = spool
        self.clock = clock
        self.run_blocking = run_blocking
        # Reading entries: short work, on the reactor thread, or while the
        # disk is slow in a small pool of its own (tap.make_service).
        self.run_reading = run_reading or run_blocking
        self.rand = rand
        self.targets = targets
        self.tls_history = tls_history  # a TLSHistory: the operator's "tls history --forget"
        self.sts_cache = sts_cache  # a PolicyCache: "tls sts refresh" asks it to re-read a file
        self.tlsrpt = None  # the TLS report schedule: "tls report send --now" (set by tap)
        self.observers = observers if observers is not None else []  # (name, event): metrics
        self.directory = LocalDirectory(config.local)
        # Every entry that is not idle: its envelope while it is due soon,
        # being attempted or ahead of the disk, else None (on disk only, read
        # when attempted); its spool state.  The idle ones (not due for
        # IDLE_AFTER, or held) are in self.idle, with no object each.
        self.entries: dict[str, Envelope | None] = {}
        self.states: dict[str, str] = {}
        self.idle = IdleEntries()
        # When each scheduled entry is due, and a heap of (due, queue id)
        # over it with one timer at its head: a float and a tuple per
        # entry, where a DelayedCall each cost ten times that.  A heap
        # item whose time is not the entry's in _due_at is stale (the
        # entry was rescheduled or unscheduled) and skipped.
        self._due_at: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = None  # the DelayedCall at the head's due time
        self._pumping = False
        self._flushing: Iterator[str] | None = None
        self._recovering: set[str] = set()
        # Entries queued while start-up reads the spool: not read over
        # (idle ones are no longer in entries to tell).
        self._queued_in_load: set[str] | None = None
        self._unsaved: set[str] = set()  # results in memory the disk refused
        self._peak = 0  # the most entries (idle too) since memory was last released
        self.active: dict[str, defer.Deferred] = {}  # attempts in flight
        self._concurrency = config.queue.delivery_concurrency
        self._stopping = False
        self._control: task.LoopingCall | None = None
        self.loaded: defer.Deferred | None = None  # fires when start-up has read the spool
        self.operator = OperatorRequests(self)
        # Finished entries are removed in the I/O threads, gathered for up
        # to remove_gather seconds (tap: REMOVE_GATHER) into one hop.
        self._remove = Batched(run_blocking, lambda qid: self.spool.remove(qid), clock=clock,
                               gather=remove_gather)
        self.notices = Notices(config, spool, clock, run_blocking, self.directory,
                               self.enqueue, self._notify, signer=signer)

    def startService(self) -> None:
        """
        Read the spool's directories now (quick), and the entries in
        batches in the I/O threads (L{loaded} fires when all are in): the
        listeners open while a large queue is still being read.
        """
        service.Service.startService(self)
        self._stopping = False
        self.idle = IdleEntries()  # read again from the spool below
        self._queued_in_load = set()
        plan = self.spool.recover_start()
        self.loaded = self._load(plan)

    @defer.inlineCallbacks
    def _load(self, plan):
        count = 0
        quarantined = len(plan.quarantined)
        pending = plan.pending
        for start in range(0, len(pending), LOAD_BATCH):
            if self._stopping:
                return
            batch = pending[start:start + LOAD_BATCH]
            try:
                report = yield self.run_blocking(self.spool.recover_entries, batch)
            except Exception:
                # (a spool directory that cannot be changed): the others load
                log.failure("queue: could not read {count} entries from {first}; they wait "
                            "for the next start", count=len(batch), first=batch[0][0],
                            event="queue.error")
                continue
            quarantined += len(report.quarantined)
            for envelope, state in report.entries:
                qid = envelope.queue_id
                if self._stopping or qid in self.entries or qid in self._queued_in_load:
                    continue  # queued meanwhile (a worker's orphan)
                count += 1
                if state == "hold" or self._idle_at(envelope.next_attempt):
                    self.idle.add(qid, state, envelope.next_attempt,
                                  recovering=state != "hold")
                    continue
                self.entries[qid] = envelope
                self.states[qid] = state
                self._recovering.add(qid)
                self.schedule(qid, envelope.next_attempt)
            self._arm_idle()
        self._peak = max(self._peak, self.size())
        self._queued_in_load = None
        log.info("queue: {count} entries in {spool} ({debris} debris and {orphans} orphan "
                 "state files removed, {quarantined} quarantined)", event="queue.recovered",
                 count=count, spool=self.spool.path, debris=plan.removed_debris,
                 orphans=plan.removed_orphans, quarantined=quarantined)
        if self._stopping:
            return
        if self.after_load is not None:
            self.after_load()
        self._control = task.LoopingCall(self.operator.poll)
        self._control.clock = self.clock
        self._control.start(CONTROL_INTERVAL, now=False)
        if self.watch_control is not None:
            self._unwatch = self.watch_control(control.control_dir(self.spool),
                                               self.operator.poll)

    def stopService(self) -> defer.Deferred:
        """
        Start nothing more and wait only for the attempts in flight (at
        most C{delivery_concurrency}): whatever else was due stays in the
        spool, due at the next start, so stopping takes the same time at
        any queue size.
        """
        service.Service.stopService(self)
        self._stopping = True
        self._queued_in_load = None
        if self._control is not None and self._control.running:
            self._control.stop()
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        self._due_at.clear()
        self._heap = []
        self._flushing = None
        for target in self.targets:
            target.stop()
        self._remove.flush()  # the attempts ending now wait for their removals
        return defer.DeferredList(list(self.active.values()))

    def _idle_at(self, due: float) -> bool:
        """Whether an entry due at C{due} is idle until then (L{IDLE_AFTER})."""
        return due - self.clock.seconds() >= IDLE_AFTER

    def _reschedule(self, qid: str, state: str, due: float) -> None:
        """After an attempt: idle until C{due}, or scheduled when it is soon."""
        if self._idle_at(due):
            self.park(qid, state, due)
        else:
            self.states[qid] = state
            self.schedule(qid, due)

    def size(self) -> int:
        """How many entries are queued, idle or not."""
        return len(self.entries) + len(self.idle)

    def knows(self, qid: str) -> bool:
        """Whether C{qid} is queued here (idle or not: a scan of the idle)."""
        return qid in self.entries or self.idle.find(qid) is not None

    def state_counts(self) -> dict[str, int]:
        """How many entries are in each spool state (the metrics)."""
        counts = dict(self.idle.counts)
        for state in self.states.values():
            counts[state] = counts.get(state, 0) + 1
        return counts

    def wake(self, qid: str) -> str | None:
        """
        Bring an idle entry back into the tables (scheduled at its due
        time, unless held) for an operator's request; the state of a known
        entry, or None.
        """
        state = self.states.get(qid)
        if state is not None:
            return state
        entry = self.idle.remove(qid)
        if entry is None:
            return None
        self._unpark(entry)
        return entry.state

    def _unpark(self, entry) -> None:
        qid = entry.queue_id
        self.entries[qid] = None
        self.states[qid] = entry.state
        if entry.recovering:
            self._recovering.add(qid)
        if entry.state != "hold":
            self._due_at[qid] = entry.due
            heapq.heappush(self._heap, (entry.due, qid))

    def park(self, qid: str, state: str, due: float) -> None:
        """
        C{qid} is idle from now on (not due for a while, or held): out of
        the tables, a line in L{idle}.
        """
        self.entries.pop(qid, None)
        self.states.pop(qid, None)
        self._due_at.pop(qid, None)  # its heap item is stale now
        recovering = qid in self._recovering
        self._recovering.discard(qid)
        self.idle.add(qid, state, due, recovering)
        if state != "hold" and not self._stopping:
            self._arm_idle()

    def settle(self, qid: str) -> None:
        """
        An entry an operator's request woke (L{wake}) and left held, or
        not due for a while, with nothing in memory: idle again.
        """
        state = self.states.get(qid)
        if state is None or qid in self.active or qid in self._unsaved \
                or self.entries.get(qid) is not None:
            return
        if state == "hold":
            self.park(qid, state, math.inf)
            return
        due = self._due_at.get(qid)
        if due is not None and self._idle_at(due):
            self.park(qid, state, due)

    def _arm_idle(self) -> None:
        ripe = self.idle.ripe_at()
        if ripe is not None and not self._stopping:
            self._arm(ripe)

    def envelope(self, qid: str) -> defer.Deferred:
        """
        The current envelope of a known entry: the one in memory, or for
        an idle entry the one on disk (read by C{run_reading}: inline, or in
        the read threads while the disk is slow).
        """
        envelope = self.entries.get(qid)
        if envelope is not None:
            return defer.succeed(envelope)
        state = self.states.get(qid)
        if state is None:
            found = self.idle.find(qid)
            state = found.state if found is not None else None
        return self.run_reading(self.spool.load, qid, state)

    def unschedule(self, qid: str) -> None:
        self._due_at.pop(qid, None)  # its heap item is stale now

    # -- scheduling -----------------------------------------------------------

    def _notify(self, name: str, event: dict) -> None:
        notify(self.observers, name, event, log, "queue.error")

    def delivered_on_receipt(self, listener: str, count: int, latency: float) -> None:
        """
        A message the receiving process copied into Maildirs itself
        (C{[local] deliver_on_receipt}): counted as one received and
        C{count} recipients delivered locally, as if it had been queued.
        """
        self._notify("inbound.queued", {"listener": listener})
        for _ in range(count):
            self._delivered_locally(latency)

    def _delivered_locally(self, latency: float) -> None:
        self._notify("delivery.result", {"route": "local", "result": "delivered",
                                         "latency": latency})

    def enqueue(self, envelope: Envelope) -> None:
        """
        A new entry was committed to new/; attempt it at once.
        """
        if envelope.client.get("protocol") != "local":
            self._notify("inbound.queued", {"listener": envelope.client.get("listener", "")})
        for rcpt in envelope.recipients:
            if rcpt.state == DELIVERED:  # copied on receipt before a copy failed
                self._delivered_locally((rcpt.done_at or envelope.arrival) - envelope.arrival)
        self.entries[envelope.queue_id] = envelope
        self.states[envelope.queue_id] = "new"
        if self._queued_in_load is not None:
            self._queued_in_load.add(envelope.queue_id)
        self._peak = max(self._peak, self.size())
        self.schedule(envelope.queue_id, self.clock.seconds())

    def flush(self) -> None:
        """
        Make every entry not held due now, L{FLUSH_BATCH} per reactor turn;
        the attempts then start as capacity allows (L{_pump}).
        """
        now = self.clock.seconds()
        self.idle.flush(now)
        self._flushing = iter(list(self.states))
        self._flush_batch(now)
        self._arm_idle()

    def _flush_batch(self, now: float) -> None:
        batch = self._flushing
        if batch is None or self._stopping:
            return
        done = 0
        for qid in itertools.islice(batch, FLUSH_BATCH):
            done += 1
            if self.states.get(qid, "hold") != "hold":
                self.schedule(qid, now)
        if done == FLUSH_BATCH:
            self.clock.callLater(0, self._flush_batch, now)
        elif self._flushing is batch:
            self._flushing = None

    def schedule(self, qid: str, when: float) -> None:
        if self._stopping:
            return
        self._due_at[qid] = when
        heapq.heappush(self._heap, (when, qid))
        self._compact()
        self._arm(when)

    def _compact(self) -> None:
        """
        Rebuild the heap when most of it is stale (after flushes, a drain).
        """
        if len(self._heap) > 2 * len(self._due_at) + 1024:
            self._heap = [(when, qid) for qid, when in self._due_at.items()]
            heapq.heapify(self._heap)

    def _arm(self, when: float) -> None:
        """
        Have the one timer fire by C{when}.
        """
        now = self.clock.seconds()
        wake = self._wake
        if wake is not None and wake.active():
            if wake.getTime() <= max(when, now):  # (a flush's "now" is already past)
                return
            wake.cancel()
        self._wake = self.clock.callLater(max(0.0, when - now), self._run_due)

    def _run_due(self) -> None:
        self._wake = None
        self._pump()

    def _head(self) -> float | None:
        """
        The due time of the first scheduled entry, dropping stale items.
        """
        heap, due_at = self._heap, self._due_at
        while heap:
            when, qid = heap[0]
            if due_at.get(qid) == when:
                return when
            heapq.heappop(heap)
        return None

    def _pump(self) -> None:
        """
        Start the due attempts there is room for: at most
        L{ATTEMPTS_PER_TURN} in one turn, the rest in the next ones.  An
        attempt that ends arms a pump for the next turn, so a due entry
        waits in the heap, not as a Deferred of its own.
        """
        if self._pumping or self._stopping:
            return
        self._pumping = True
        try:
            now = self.clock.seconds()
            started = pulled = 0
            while started < ATTEMPTS_PER_TURN and len(self.active) < self._concurrency:
                when = self._head()
                if when is None or when > now:
                    if pulled < FLUSH_BATCH:
                        taken = self.idle.take(now, PULL_BATCH)
                        for entry in taken:
                            self._unpark(entry)
                        if taken:
                            pulled += len(taken)
                            continue
                    break
                _, qid = heapq.heappop(self._heap)
                del self._due_at[qid]
                if qid in self.active or qid not in self.entries:
                    continue  # being attempted: it is scheduled again when it ends
                started += 1
                self._start(qid)
        finally:
            self._pumping = False
        if self._stopping:
            return
        self._compact()
        when = self._head()
        ripe = self.idle.ripe_at()
        if ripe is not None and (when is None or ripe < when):
            when = ripe
        if when is not None and (when > now or len(self.active) < self._concurrency):
            self._arm(when)  # else the next attempt to end pumps

    def _start(self, qid: str) -> None:
        d = defer.maybeDeferred(self._attempt, qid)
        self.active[qid] = d
        d.addErrback(self._crashed, qid)
        d.addBoth(self._finished, qid)

    def _crashed(self, failure, qid: str) -> None:
        """
        An attempt raised: the disk refused a write (one line), or a bug
        (the traceback, once).  Try again on the retry schedule, so the
        entry is never left without a timer; the retry also looks for
        Maildir copies a user already read, as after a restart.
        """
        envelope = self.entries.get(qid)
        q = self.config.queue
        # Results the disk refused are written again after the schedule's
        # first interval; else the attempt is repeated at the next step.
        step = 1 if qid in self._unsaved or envelope is None else envelope.attempts + 1
        delay = retry_delay(q.retry_schedule, step, q.jitter, self.rand)
        error = failure.value
        if isinstance(error, OSError) and error.errno is not None:
            log.warn("queue: could not finish the attempt for {queue_id}: {error}; retrying "
                     "in {delay:.0f} s", queue_id=qid, error=_os_error(error), delay=delay,
                     event="queue.error")
        else:
            log.failure("queue: attempt for {queue_id} crashed; retrying later", failure,
                        queue_id=qid, event="queue.error")
        if qid not in self.entries or self.states.get(qid) == "hold":
            return
        self._recovering.add(qid)
        self.schedule(qid, self.clock.seconds() + delay)

    def _finished(self, _: object, qid: str) -> None:
        self.active.pop(qid, None)
        if not self._stopping:
            # The next turn starts the next ones (coalesced: one pump for all
            # the attempts that end in this turn), so one turn's work is
            # bounded, not one new attempt per ended one.
            self._arm(self.clock.seconds())

    # -- one attempt ------------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, qid: str):
        envelope = self.entries[qid]
        handed = None
        if envelope is None and self.delegate is not None:
            state = self.states.get(qid)
            handed = self.delegate.attempt(qid, state) if state is not None else None
        if handed is not None:  # a worker reads, sends, records, removes
            answer = yield handed
            if (yield self._delegated(qid, answer)):
                return
            envelope = self.entries.get(qid, False)
            if envelope is False:
                return  # deleted meanwhile
        if envelope is None:  # idle until now: read it
            try:
                envelope = yield self.run_reading(self.spool.load, qid, self.states.get(qid))
            except FileNotFoundError:
                self._vanished(qid)
                return
            if qid not in self.entries:
                return  # deleted meanwhile
            self.entries[qid] = envelope
        if qid in self._unsaved:
            # The last results are in memory only: write them, and the next
            # attempt comes at the time they set.
            yield self._store(envelope)
            return
        now = self.clock.seconds()
        updated = envelope
        if envelope.pending():
            updated = yield self._deliver_pending(envelope, now)
            if updated is None:
                return
            now = self.clock.seconds()
        # Without pending recipients, only DSNs are owed (or the last results
        # could not be written): nothing is delivered again.
        try:
            updated = yield self._send_notices(envelope, updated, now)
        except MessageGone:
            self._vanished(qid)
            return
        yield self._store(updated)

    @defer.inlineCallbacks
    def _delegated(self, qid: str, answer: delegated.Answer):
        """
        Take in what a worker did with an attempt (L{delegated.Answer});
        fires with False when the worker declined it and this process
        attempts it itself, else True.
        """
        for result, latency in answer.results:
            self._notify("delivery.result", {"route": "remote", "result": result,
                                             "latency": latency})
        kind = answer.kind
        if kind == delegated.DECLINED:
            return False
        if qid not in self.entries:
            return True
        if kind == delegated.GONE:
            self._vanished(qid)
        elif kind == delegated.REMOVED:
            self.forget(qid)
        elif kind == delegated.STORED:
            self._recovering.discard(qid)
            self._reschedule(qid, answer.state, answer.next_attempt)
        elif kind == delegated.BACK:  # DSNs owed, or the worker could not write
            self._recovering.discard(qid)
            self.states[qid] = answer.state
            self.entries[qid] = answer.envelope
            try:
                updated = yield self._notices_after(answer.envelope, answer.new,
                                                    self.clock.seconds())
            except MessageGone:
                self._vanished(qid)
                return True
            yield self._store(updated)
        elif not self._stopping:  # LOST: the worker ended; where did it get to?
            state = yield self.run_blocking(self.spool.state_of, qid)
            if qid not in self.entries:
                return True
            if state is None:
                log.info("{queue_id}: removed by a worker that ended before it said so",
                         queue_id=qid, event="queue.removed")
                self.forget(qid)
                return True
            self.states[qid] = state
            q = self.config.queue
            self.schedule(qid, self.clock.seconds() + retry_delay(
                q.retry_schedule, 1, q.jitter, self.rand))
        return True

    def _vanished(self, qid: str) -> None:
        log.error("queue: message file of {queue_id} vanished", queue_id=qid,
                  event="queue.error")
        self.forget(qid)

    @defer.inlineCallbacks
    def _deliver_pending(self, envelope: Envelope, now: float):
        """
        Hand the pending recipients to the targets; fires with the envelope
        updated with their results (not yet stored), or None when the queue
        file vanished.
        """
        qid = envelope.queue_id
        request = DeliveryRequest(
            envelope=envelope, path=self.spool.path_in(self.states[qid], qid),  # no stat()
            indexes=(), now=now, recovering=qid in self._recovering)
        groups: dict[int, list[int]] = {}
        for index, rcpt in enumerate(envelope.recipients):
            if rcpt.pending:
                local = self.directory.is_local_domain(rcpt.address.rpartition("@")[2])
                groups.setdefault(0 if local else 1, []).append(index)
        calls = []
        for which, indexes in sorted(groups.items()):
            target = self.targets.local if which == 0 else self.targets.remote
            calls.append(self._deliver(target, attrs.evolve(request, indexes=tuple(indexes))))
        results: dict[str, Outcome] = {}
        routes: dict[str, str] = {}
        gone = False
        for name, part in (yield gather(calls)):
            if part is None:
                gone = True
                continue
            results.update(part)
            routes.update({address: name for address in part})
        if gone:
            self._vanished(qid)
            return None
        self._recovering.discard(qid)
        return self._apply(envelope, results, routes, self.clock.seconds())

    def _send_notices(self, before: Envelope, updated: Envelope, now: float):
        """
        Queue the DSNs owed after an attempt, before its results are
        recorded (a crash in between repeats a DSN rather than losing it):
        a failure report for the recipients that failed for good, a success
        report where asked, one delay warning.  Recipients whose DSN could
        not be queued are flagged C{dsn_pending}, and those flagged by an
        earlier attempt are reported now.  Gives the envelope to store, or
        a Deferred of it while a DSN is being queued (most attempts owe
        none: no generator and no Deferred for them).
        """
        return self._notices_after(updated, newly_done(before, updated), now)

    def _notices_after(self, updated: Envelope, new: frozenset[int], now: float):
        """L{_send_notices}, given the recipients the attempt took out of pending."""
        owed = dsns_owed(self.config, updated, new, now)
        if owed:
            return self._queue_notices(updated, owed.failed, owed.delivered, now)
        return self._owed(updated, now)

    @defer.inlineCallbacks
    def _queue_notices(self, updated: Envelope, failed: list[Recipient],
                       delivered: list[Recipient], now: float):
        if failed:
            done = yield self.notices.send(updated, failed)
            updated = _owing(updated, failed, not done)
        if delivered:
            done = yield self.notices.send(updated, delivered, success=True)
            updated = _owing(updated, delivered, not done)
        if self.notices.due_for_warning(updated, now):
            delayed = [r for r in updated.pending() if r.wants("DELAY")]
            done = True
            if delayed:
                done = yield self.notices.send(updated, delayed,
                                               until=updated.arrival + self.config.queue.lifetime)
            if done:  # else the next attempt tries again
                updated = attrs.evolve(updated, warned=True)
        return self._owed(updated, now)

    def _owed(self, updated: Envelope, now: float) -> Envelope:
        """
        An entry whose DSNs are not all queued stays, and is tried again
        soon even when nothing else is left to do.
        """
        owed = [r.address for r in updated.recipients if r.dsn_pending]
        if owed and updated.finished:
            q = self.config.queue
            updated = attrs.evolve(updated, next_attempt=now + retry_delay(
                q.retry_schedule, 1, q.jitter, self.rand))
        if owed:
            log.warn("{queue_id}: a DSN for {count} recipient(s) is not queued yet; the entry "
                     "stays until it is (next try at {next_attempt:.0f})",
                     event="dsn.pending", queue_id=updated.queue_id, count=len(owed),
                     recipients=owed, next_attempt=updated.next_attempt)
        return updated

    def _deliver(self, target, request: DeliveryRequest) -> defer.Deferred:
        """L{deliver_to}, with the target's name: (name, outcomes or None)."""
        return deliver_to(target, request).addCallback(lambda part: (target.name, part))

    def _apply(self, envelope: Envelope, results: dict[str, Outcome], routes: dict[str, str],
               now: float) -> Envelope:
        return apply_results(self.config, envelope, results, routes, now, self.rand,
                             self._notify)

    @defer.inlineCallbacks
    def _store(self, envelope: Envelope):
        qid = envelope.queue_id
        # Ahead of the disk until written: if the write fails, the retry
        # (_crashed) starts from these results.
        self.entries[qid] = envelope
        if envelope.finished and not any(r.dsn_pending for r in envelope.recipients):
            try:
                yield self._remove(qid)
            except Exception:
                self._unsaved.add(qid)
                raise
            self.forget(qid)
            log_removed(envelope)
            return
        state = self.states.get(qid, "cur")
        target = attempted_state(state)
        try:
            yield self.run_blocking(self.spool.update_and_move, envelope, state, target)
        except Exception:
            self._unsaved.add(qid)
            if state != target:  # the move may be done, the update not
                self.states[qid] = (yield self.run_blocking(self.spool.state_of, qid)) or state
            raise
        self._unsaved.discard(qid)
        self._reschedule(qid, target, envelope.next_attempt)  # idle: on disk as it is

    def forget(self, qid: str) -> None:
        self._unsaved.discard(qid)
        self.entries.pop(qid, None)
        self.states.pop(qid, None)
        self._recovering.discard(qid)
        if self._peak > SHRINK_FROM and self.size() * 4 < self._peak:
            self._shrink()

    def _shrink(self) -> None:
        """
        The queue has drained to a quarter of its peak: copy the tables (a
        dict never shrinks by itself) and give freed memory back to the
        system, so a drained queue does not keep the memory of a full one.
        """
        self.entries = dict(self.entries)
        self.states = dict(self.states)
        self._due_at = dict(self._due_at)
        self._recovering = set(self._recovering)
        self._heap = [(when, qid) for qid, when in self._due_at.items()]
        heapq.heapify(self._heap)
        self._peak = self.size()
        release_memory()


def release_memory() -> None:
    """
    Ask the C library to return free heap pages to the system (glibc's
    malloc_trim; nothing elsewhere).
    """
    try:
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _owing(envelope: Envelope, recipients: list[Recipient], pending: bool) -> Envelope:
    """
    Flag (or clear) C{recipients} as still owed their DSN.
    """
    return envelope.with_results({r.address: attrs.evolve(r, dsn_pending=pending)
                                  for r in recipients})


def _os_error(e: OSError) -> str:
    name = errno.errorcode.get(e.errno, str(e.errno))
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or name} [{name}]{where}"
