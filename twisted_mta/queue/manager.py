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

from twisted_mta.config import Config
from twisted_mta.dsn.report import (
    FailedRecipient, delay_report, failure_report, success_report,
)
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory
from twisted_mta.metrics import notify
from twisted_mta.model import (
    DELIVERED, FAILED, DeliveryRequest, Envelope, MessageGone, Outcome, Recipient,
)
from twisted_mta.queue import control
from twisted_mta.queue.spool import RunBlocking, Spool
from twisted_mta.tls.failure import TLS_KINDS

log = Logger()

CONTROL_INTERVAL = 1.0  # seconds between looks into spool/control/
FULL_RETURN_LIMIT = 1024 * 1024  # RET=FULL returns messages up to this size, else headers


def _success_action(r: Recipient) -> str:
    # Delivered here, or handed to a server that was not asked to confirm.
    if r.outcome is not None and r.outcome.remote_mta:
        return "relayed"
    return "delivered"


def retry_delay(schedule: tuple[int, ...], attempts: int, jitter: float,
                rand: Callable[[], float] = random.random) -> float:
    """
    Seconds until the next attempt after C{attempts} attempts (>= 1).
    """
    base = schedule[min(attempts, len(schedule)) - 1]
    return base * (1 + jitter * (2 * rand() - 1))


def expired_outcome(last: Outcome | None) -> Outcome:
    if last is not None and last.kind in TLS_KINDS:
        # Still explained in plain words, now as the permanent x.7.x, and
        # without the retry or fallback the deferral's words promised.
        return attrs.evolve(last, code=554, enhanced="5" + last.enhanced[1:],
                            text=last.final_text or last.text, final_text=None)
    why = f"; last error: {last}" if last else ""
    return Outcome(554, "5.4.7", "Delivery time expired" + why)


# The outcome of recipients whose delivery attempt crashed (a bug: logged once).
CRASHED = Outcome(451, "4.3.0", "an internal error interrupted delivery; it will be retried")


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
        self._active: dict[str, defer.Deferred] = {}
        self._semaphore = defer.DeferredSemaphore(config.queue.delivery_concurrency)
        self._stopping = False
        self._control: task.LoopingCall | None = None
        self._polling = False

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
            self._schedule(envelope.queue_id, envelope.next_attempt)
        self._control = task.LoopingCall(self._poll_control)
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
        return defer.DeferredList(list(self._active.values()))

    # -- operator requests ---------------------------------------------------------

    def _poll_control(self) -> defer.Deferred | None:
        if self._polling:
            return None
        self._polling = True
        d = self.run_blocking(control.read_requests, self.spool)
        d.addCallback(self._handle_requests)
        d.addErrback(lambda f: log.failure("queue: reading control requests failed", f,
                                           event="queue.error"))

        def finished(_):
            self._polling = False
        d.addBoth(finished)
        return None

    @defer.inlineCallbacks
    def _handle_requests(self, requests):
        for name, action, qid in requests:
            if qid != control.ALL and qid in self._active:
                continue  # busy with an attempt: try again at the next poll
            try:
                outcome = yield self._carry_out(action, qid)
            except Exception:
                log.failure("queue: {action} {queue_id} failed", action=action, queue_id=qid,
                            event="queue.error")
                outcome = "failed"
            log.info("queue: operator {action} {queue_id}: {outcome}", event="queue.operator",
                     action=action, queue_id=qid, outcome=outcome)
            yield self.run_blocking(control.done, self.spool, name)

    @defer.inlineCallbacks
    def _carry_out(self, action: str, qid: str):
        action, override = control.split_action(action)
        if override is not None and qid in self.entries:
            envelope = attrs.evolve(self.entries[qid], tls_override=override)
            yield self.run_blocking(self.spool.update, envelope, self.states[qid])
            self.entries[qid] = envelope
            log.warn("{queue_id}: operator allows {override} TLS for its next attempt only",
                     event="queue.tls_override", queue_id=qid, override=override)
        if action == "flush":
            for target in self.targets:
                target.flush()
        if action == "flush" and qid == control.ALL:
            self.flush()
            return "all entries due now"
        if action == "tlsforget":
            if self.tls_history is None:
                return "no TLS history"
            found = self.tls_history.forget(None if qid == control.ALL else qid)
            return "TLS history forgotten" if found else "no TLS history for it"
        state = self.states.get(qid)
        if state is None:
            return "no such entry"
        if action == "flush":
            if state == "hold":
                return "held; release it first"
            self._schedule(qid, self.clock.seconds())
            return "due now"
        if action == "hold":
            if state == "hold":
                return "already held"
            self._unschedule(qid)
            yield self.run_blocking(self.spool.move, qid, state, "hold")
            self.states[qid] = "hold"
            return "held"
        if action == "release":
            if state != "hold":
                return "not held"
            yield self.run_blocking(self.spool.move, qid, "hold", "cur")
            self.states[qid] = "cur"
            self._schedule(qid, self.clock.seconds())
            return "released, due now"
        if action == "delete":
            self._unschedule(qid)
            yield self.run_blocking(self.spool.remove, qid)
            self._forget(qid)
            return "deleted"
        return "unknown action"

    def _unschedule(self, qid: str) -> None:
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
        self._schedule(envelope.queue_id, self.clock.seconds())

    def flush(self) -> None:
        now = self.clock.seconds()
        for qid, state in self.states.items():
            if state != "hold":
                self._schedule(qid, now)

    def _schedule(self, qid: str, when: float) -> None:
        if self._stopping:
            return
        old = self._timers.pop(qid, None)
        if old is not None and old.active():
            old.cancel()
        delay = max(0.0, when - self.clock.seconds())
        self._timers[qid] = self.clock.callLater(delay, self._due, qid)

    def _due(self, qid: str) -> None:
        self._timers.pop(qid, None)
        if qid in self._active or qid not in self.entries:
            return
        d = self._semaphore.run(self._attempt, qid)
        self._active[qid] = d
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
        self._schedule(qid, self.clock.seconds() + delay)

    def _finished(self, _: object, qid: str) -> None:
        self._active.pop(qid, None)

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
            self._forget(qid)
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
            yield self._bounce(updated, failed)
        delivered = [r for _, r in changed if r.state == DELIVERED and r.wants("SUCCESS")
                     and not (r.outcome and r.outcome.dsn_passed)]
        if delivered and updated.sender:
            yield self._bounce(updated, delivered, success=True)
        if self._due_for_warning(updated, now):
            delayed = [r for r in updated.pending() if r.wants("DELAY")]
            sent = True
            if delayed:
                sent = yield self._bounce(updated, delayed,
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

    def _postmaster(self) -> str | None:
        """
        The final address of the postmaster, or None without local domains.
        """
        if not self.config.local.domains:
            return None
        try:
            return self.directory.expand(f"postmaster@{self.directory.primary_domain}")[0]
        except Exception:
            return None

    def _due_for_warning(self, envelope: Envelope, now: float) -> bool:
        if envelope.warned or envelope.finished or not envelope.sender:
            return False
        after = self.config.queue.delay_warning
        if after is not None and now - envelope.arrival >= after:
            return True
        # A TLS failure under a policy the admin listed warns at once, so the
        # sender can act (ask the recipient to fix their server) early.
        early = self.config.outbound.tls.early_warning
        return any(r.outcome is not None and r.outcome.kind in TLS_KINDS
                   and r.outcome.policy in early for r in envelope.pending())

    @defer.inlineCallbacks
    def _bounce(self, envelope: Envelope, failed: list[Recipient], until: float | None = None,
                success: bool = False):
        """
        Tell the sender, in a DSN queued as a new entry from <>, which
        recipients failed (or, with C{until}, are delayed and retried until
        then).  A bounce is never answered with a bounce: when one fails,
        the postmaster gets the report instead, and when that fails,
        nobody.  Fires with whether a DSN was queued.
        """
        qid = envelope.queue_id
        to = envelope.sender
        client = {"protocol": "local", "dsn_for": qid}
        if not success and until is None:
            # NOTIFY=NEVER (or without FAILURE): the sender asked for silence.
            quiet = [r for r in failed if not r.wants("FAILURE")]
            if quiet:
                log.info("{queue_id}: no DSN for {count} failed recipient(s) (NOTIFY)",
                         event="dsn.suppressed", queue_id=qid, count=len(quiet))
                failed = [r for r in failed if r.wants("FAILURE")]
                if not failed:
                    return False
        if not to:
            # A bounce that cannot be delivered goes to the postmaster, once:
            # a failing report to the postmaster is only logged.
            postmaster = self._postmaster()
            if until is not None or envelope.client.get("double_bounce") or not postmaster:
                log.warn("{queue_id}: {count} recipient(s) of a bounce failed; no DSN for a DSN",
                         event="dsn.suppressed", queue_id=qid, count=len(failed))
                return False
            to, client["double_bounce"] = postmaster, "yes"
        try:
            if envelope.ret == "FULL" and not success and envelope.size <= FULL_RETURN_LIMIT:
                headers = yield self.run_blocking(self.spool.read_message, qid)
            else:
                headers = yield self.run_blocking(self.spool.read_headers, qid)
            now = self.clock.seconds()
            listed = [FailedRecipient(r, r.outcome.remote_mta if r.outcome else None,
                                      _success_action(r) if success else None)
                      for r in failed]
            if success:
                report = success_report(
                    hostname=self.config.hostname, envelope=envelope, delivered=listed,
                    original_headers=headers, now=now)
            elif until is None:
                report = failure_report(
                    hostname=self.config.hostname, envelope=envelope, failed=listed,
                    original_headers=headers, now=now, to=to)
            else:
                report = delay_report(
                    hostname=self.config.hostname, envelope=envelope, delayed=listed,
                    original_headers=headers, now=now, until=until)
            writer = self.spool.new_message()
            dsn = Envelope(queue_id=writer.queue_id, sender="",
                           recipients=(Recipient(address=to),),
                           arrival=now, next_attempt=now, size=len(report), client=client)
            writer.write(dsn.to_header())
            writer.write(report)
            yield writer.commit(dsn)
        except Exception:
            log.failure("{queue_id}: could not queue a DSN for <{sender}>", queue_id=qid,
                        sender=to, event="dsn.error")
            return False
        kind = "delivered" if success else ("failed" if until is None else "delayed")
        self._notify("dsn.queued", {"kind": kind})
        log.info("{queue_id}: DSN {dsn_id} queued for <{sender}> ({count} {kind} recipient(s))",
                 event="dsn.queued", queue_id=qid, dsn_id=dsn.queue_id, kind=kind,
                 sender=to, count=len(failed),
                 recipients=[r.address for r in failed])
        self.enqueue(dsn)
        return True

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
            self._forget(qid)
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
        self._schedule(qid, envelope.next_attempt)

    def _forget(self, qid: str) -> None:
        self.entries.pop(qid, None)
        self.states.pop(qid, None)
        self._recovering.discard(qid)
