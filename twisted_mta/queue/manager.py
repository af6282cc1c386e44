"""
The queue manager: picks up due entries (at start and as they arrive),
hands their recipients to the delivery targets (local or remote, through
L{IDeliveryTarget}; it imports none of them), records per-recipient results
and schedules retries.

State lives on disk (the spool); the timers here are derived from it, so a
restart rebuilds them from each envelope's C{next_attempt}.
"""

from __future__ import annotations

import random
from typing import Callable

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from twisted_mta import failures
from twisted_mta.config import Config
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory
from twisted_mta.metrics import notify
from twisted_mta.model import (
    DELIVERED, FAILED, DeliveryRequest, Envelope, MessageGone, Outcome, Recipient,
)
from twisted_mta.queue.notices import Notices
from twisted_mta.queue.operator import OperatorRequests
from twisted_mta.queue.spool import RunBlocking, Spool
from twisted_mta.tls.failure import TLS_KINDS

log = Logger()

CONTROL_INTERVAL = 1.0  # seconds between looks into spool/control/
def retry_delay(schedule: tuple[int, ...], attempts: int, jitter: float,
                rand: Callable[[], float] = random.random) -> float:
    """
    Seconds until the next attempt after C{attempts} attempts (>= 1).
    """
    base = schedule[min(attempts, len(schedule)) - 1]
    return base * (1 + jitter * (2 * rand() - 1))


expired_outcome = failures.expired  # the end of the queue lifetime


# The outcome of recipients whose delivery attempt crashed (a bug: logged once).
CRASHED = failures.outcome("internal", why="an internal error interrupted delivery; it will "
                                           "be retried")


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
                 observers: list | None = None, tls_history=None) -> None:
        self.config = config
        self.spool = spool
        self.clock = clock
        self.run_blocking = run_blocking
        self.rand = rand
        self.targets = targets
        self.tls_history = tls_history  # a TLSHistory: the operator's "tls history --forget"
        self.observers = observers if observers is not None else []  # (name, event): metrics
        self.directory = LocalDirectory(config.local)
        self.entries: dict[str, Envelope] = {}
        self.states: dict[str, str] = {}
        self._timers: dict[str, object] = {}
        self._recovering: set[str] = set()
        self.active: dict[str, defer.Deferred] = {}
        self._semaphore = defer.DeferredSemaphore(config.queue.delivery_concurrency)
        self._stopping = False
        self._control: task.LoopingCall | None = None
        self.operator = OperatorRequests(self)
        self.notices = Notices(config, spool, clock, run_blocking, self.directory,
                               self.enqueue, self._notify)

    def startService(self) -> None:
        service.Service.startService(self)
        self._stopping = False
        report = self.spool.recover()
        log.info("queue: {count} entries in {spool} ({debris} debris and {orphans} orphan "
                 "state files removed, {quarantined} quarantined)", event="queue.recovered",
                 count=len(report.entries), spool=self.spool.path,
                 debris=report.removed_debris, orphans=report.removed_orphans,
                 quarantined=len(report.quarantined))
        for envelope, state in report.entries:
            self.entries[envelope.queue_id] = envelope
            self.states[envelope.queue_id] = state
            if state == "hold":
                continue
            self._recovering.add(envelope.queue_id)
            self.schedule(envelope.queue_id, envelope.next_attempt)
        self._control = task.LoopingCall(self.operator.poll)
        self._control.clock = self.clock
        self._control.start(CONTROL_INTERVAL, now=False)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        self._stopping = True
        if self._control is not None and self._control.running:
            self._control.stop()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        for target in self.targets:
            target.stop()
        return defer.DeferredList(list(self.active.values()))

    def unschedule(self, qid: str) -> None:
        timer = self._timers.pop(qid, None)
        if timer is not None and timer.active():
            timer.cancel()

    # -- scheduling -----------------------------------------------------------

    def _notify(self, name: str, event: dict) -> None:
        notify(self.observers, name, event, log, "queue.error")

    def enqueue(self, envelope: Envelope) -> None:
        """
        A new entry was committed to new/; attempt it at once.
        """
        if envelope.client.get("protocol") != "local":
            self._notify("inbound.queued", {"listener": envelope.client.get("listener", "")})
        self.entries[envelope.queue_id] = envelope
        self.states[envelope.queue_id] = "new"
        self.schedule(envelope.queue_id, self.clock.seconds())

    def flush(self) -> None:
        now = self.clock.seconds()
        for qid, state in self.states.items():
            if state != "hold":
                self.schedule(qid, now)

    def schedule(self, qid: str, when: float) -> None:
        if self._stopping:
            return
        old = self._timers.pop(qid, None)
        if old is not None and old.active():
            old.cancel()
        delay = max(0.0, when - self.clock.seconds())
        self._timers[qid] = self.clock.callLater(delay, self._due, qid)

    def _due(self, qid: str) -> None:
        self._timers.pop(qid, None)
        if qid in self.active or qid not in self.entries:
            return
        d = self._semaphore.run(self._attempt, qid)
        self.active[qid] = d
        d.addErrback(self._crashed, qid)
        d.addBoth(self._finished, qid)

    def _crashed(self, failure, qid: str) -> None:
        """
        An attempt raised (a bug): log it once and try again on the retry
        schedule, so the entry is never left without a timer.
        """
        log.failure("queue: attempt for {queue_id} crashed; retrying later", failure,
                    queue_id=qid, event="queue.error")
        envelope = self.entries.get(qid)
        if envelope is None or self.states.get(qid) == "hold":
            return
        q = self.config.queue
        delay = retry_delay(q.retry_schedule, envelope.attempts + 1, q.jitter, self.rand)
        self.schedule(qid, self.clock.seconds() + delay)

    def _finished(self, _: object, qid: str) -> None:
        self.active.pop(qid, None)

    # -- one attempt ------------------------------------------------------------

    @defer.inlineCallbacks
    def _attempt(self, qid: str):
        envelope = self.entries[qid]
        now = self.clock.seconds()
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
        for name, part in (yield defer.gatherResults(calls, consumeErrors=True)):
            if part is None:
                gone = True
                continue
            results.update(part)
            routes.update({address: name for address in part})
        if gone:
            log.error("queue: message file of {queue_id} vanished", queue_id=qid,
                      event="queue.error")
            self.forget(qid)
            return
        self._recovering.discard(qid)
        now = self.clock.seconds()
        updated = self._apply(envelope, results, routes, now)
        changed = [(before, r) for before, r in zip(envelope.recipients, updated.recipients)
                   if before.pending and not r.pending]
        failed = [r for _, r in changed if r.state == FAILED]
        if failed:
            # Queue the bounce before recording the failure: a crash in
            # between repeats the bounce rather than losing it.
            yield self.notices.send(updated, failed)
        delivered = [r for _, r in changed if r.state == DELIVERED and r.wants("SUCCESS")
                     and not (r.outcome and r.outcome.dsn_passed)]
        if delivered and updated.sender:
            yield self.notices.send(updated, delivered, success=True)
        if self.notices.due_for_warning(updated, now):
            delayed = [r for r in updated.pending() if r.wants("DELAY")]
            sent = True
            if delayed:
                sent = yield self.notices.send(updated, delayed,
                                          until=updated.arrival + self.config.queue.lifetime)
            if sent:
                updated = attrs.evolve(updated, warned=True)
        yield self._store(updated)

    def _deliver(self, target, request: DeliveryRequest) -> defer.Deferred:
        """
        One target's part of an attempt: fires with (target name, outcomes),
        or (name, None) when the queue file vanished.  A target that raises
        (a bug) defers its recipients, logged once; it never stops the
        attempt or the others' results.
        """
        addresses = [r.address for r in request.recipients]

        def gone(failure):
            failure.trap(MessageGone)
            return None

        def crashed(failure):
            log.failure("queue: {target} delivery of {queue_id} crashed", failure,
                        target=target.name, queue_id=request.envelope.queue_id,
                        event="queue.error")
            return {a: CRASHED for a in addresses}

        d = defer.maybeDeferred(target.deliver, request)
        d.addErrback(gone)
        d.addErrback(crashed)
        d.addCallback(lambda part: (target.name, part if part is None else
                                    {a: part.get(a, CRASHED) for a in addresses}))
        return d

    def _apply(self, envelope: Envelope, results: dict[str, Outcome], routes: dict[str, str],
               now: float) -> Envelope:
        changed: dict[str, Recipient] = {}
        last = None
        for rcpt in envelope.pending():
            outcome = results.get(rcpt.address)
            if outcome is None:
                continue
            fields = dict(queue_id=envelope.queue_id, rcpt=rcpt.address,
                          reply=str(outcome), sender=envelope.sender)
            self._notify("delivery.result", {
                "route": routes.get(rcpt.address, "remote"),
                "result": ("delivered" if outcome.code < 400 else
                           "failed" if outcome.is_permanent else "deferred"),
                "latency": now - envelope.arrival})
            if outcome.code < 400:
                changed[rcpt.address] = attrs.evolve(
                    rcpt, state=DELIVERED, outcome=attrs.evolve(outcome, where=None),
                    done_at=now)
                if outcome.where is not None:
                    log.info("{queue_id}: delivered to <{rcpt}> in {maildir}",
                             event="delivery.delivered", maildir=outcome.where, **fields)
                else:
                    log.info("{queue_id}: delivered to <{rcpt}>: {reply}",
                             event="delivery.delivered", relay=outcome.remote_mta, **fields)
            elif outcome.is_permanent:
                changed[rcpt.address] = attrs.evolve(rcpt, state=FAILED, outcome=outcome,
                                                     done_at=now)
                log.warn("{queue_id}: delivery to <{rcpt}> failed: {reply}",
                         event="delivery.failed", **fields)
            else:
                changed[rcpt.address] = attrs.evolve(rcpt, outcome=outcome)
                last = outcome
                log.info("{queue_id}: delivery to <{rcpt}> deferred: {reply}",
                         event="delivery.deferred", **fields)
        attempts = envelope.attempts + 1
        tls_failed = any(o.kind in TLS_KINDS for o in results.values())
        updated = attrs.evolve(envelope.with_results(changed), attempts=attempts,
                               last_outcome=last or envelope.last_outcome,
                               tls_failures=envelope.tls_failures + tls_failed,
                               tls_override=None)  # one attempt only
        if updated.finished:
            return updated
        q = self.config.queue
        if now - envelope.arrival >= q.lifetime:
            expired = {}
            for rcpt in updated.pending():
                expired[rcpt.address] = attrs.evolve(
                    rcpt, state=FAILED, outcome=expired_outcome(rcpt.outcome), done_at=now)
                log.warn("{queue_id}: delivery to <{rcpt}> expired", event="delivery.expired",
                         queue_id=envelope.queue_id, rcpt=rcpt.address)
            return updated.with_results(expired)
        delay = retry_delay(q.retry_schedule, attempts, q.jitter, self.rand)
        return attrs.evolve(updated, next_attempt=now + delay)

    @defer.inlineCallbacks
    def _store(self, envelope: Envelope):
        qid = envelope.queue_id
        if envelope.finished:
            yield self.run_blocking(self.spool.remove, qid)
            self.forget(qid)
            log.info("{queue_id}: removed from queue ({delivered} delivered, {failed} failed)",
                     event="queue.removed", queue_id=qid,
                     delivered=sum(r.state == DELIVERED for r in envelope.recipients),
                     failed=sum(r.state == FAILED for r in envelope.recipients))
            return
        state = self.states.get(qid, "cur")
        target = "cur" if state == "new" else state
        yield self.run_blocking(self.spool.update_and_move, envelope, state, target)
        self.states[qid] = target
        self.entries[qid] = envelope
        self.schedule(qid, envelope.next_attempt)

    def forget(self, qid: str) -> None:
        self.entries.pop(qid, None)
        self.states.pop(qid, None)
        self._recovering.discard(qid)
