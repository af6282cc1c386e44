"""
What an attempt's outcomes do to an entry, without doing any of it: the
recipients' new states, the retry time or the expiry, and which DSNs
are owed.  Pure functions of the envelope, the outcomes, the clock and
the settings, so that the queue manager and a worker that runs an
attempt for it (L{twisted_mta.queue.delegated}) decide the same; and
the one guarded call of a delivery target that gives the outcomes
(L{deliver_to}).
"""

from __future__ import annotations

import random
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta import failures
from twisted_mta.config import Config
from twisted_mta.model import (
    DELIVERED, FAILED, DeliveryRequest, Envelope, MessageGone, Outcome, Recipient,
)
from twisted_mta.tls.failure import TLS_KINDS

log = Logger(namespace="twisted_mta.queue.manager")

expired_outcome = failures.expired  # the end of the queue lifetime

# The outcome of recipients whose delivery attempt crashed (a bug: logged once).
CRASHED = failures.outcome("internal", why="an internal error interrupted delivery; it will "
                                           "be retried")


def deliver_to(target, request: DeliveryRequest) -> defer.Deferred:
    """
    One target's part of an attempt: fires with an outcome for each of
    the request's recipients, or None when the queue file vanished.  A
    target that raises (a bug) defers its recipients, logged once; it
    never stops the attempt or the other targets' results.
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
    d.addCallback(lambda part: part if part is None else
                  {a: part.get(a, CRASHED) for a in addresses})
    return d


def retry_delay(schedule: tuple[int, ...], attempts: int, jitter: float,
                rand: Callable[[], float] = random.random) -> float:
    """
    Seconds until the next attempt after C{attempts} attempts (>= 1).
    """
    base = schedule[min(attempts, len(schedule)) - 1]
    return base * (1 + jitter * (2 * rand() - 1))


def result_word(outcome: Outcome) -> str:
    """The result as the C{delivery.result} event names it."""
    return ("delivered" if outcome.code < 400 else
            "failed" if outcome.is_permanent else "deferred")


def apply_results(config: Config, envelope: Envelope, results: dict[str, Outcome],
                  routes: dict[str, str], now: float, rand: Callable[[], float],
                  notify: Callable[[str, dict], None]) -> Envelope:
    """
    The envelope after an attempt whose outcomes are C{results} (by
    address; C{routes}: the target that gave each), each logged and told
    to C{notify} as a C{delivery.result}; with the next attempt's time,
    or expired when the queue lifetime is over.  Not yet stored.
    """
    changed: dict[str, Recipient] = {}
    last = None
    for rcpt in envelope.pending():
        outcome = results.get(rcpt.address)
        if outcome is None:
            continue
        fields = dict(queue_id=envelope.queue_id, rcpt=rcpt.address,
                      reply=str(outcome), sender=envelope.sender)
        notify("delivery.result", {"route": routes.get(rcpt.address, "remote"),
                                   "result": result_word(outcome),
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
    q = config.queue
    if now - envelope.arrival >= q.lifetime:
        expired = {}
        for rcpt in updated.pending():
            expired[rcpt.address] = attrs.evolve(
                rcpt, state=FAILED, outcome=expired_outcome(rcpt.outcome), done_at=now)
            log.warn("{queue_id}: delivery to <{rcpt}> expired", event="delivery.expired",
                     queue_id=envelope.queue_id, rcpt=rcpt.address)
        return updated.with_results(expired)
    delay = retry_delay(q.retry_schedule, attempts, q.jitter, rand)
    return attrs.evolve(updated, next_attempt=now + delay)


def newly_done(before: Envelope, updated: Envelope) -> frozenset[int]:
    """The indexes of the recipients an attempt took out of pending."""
    return frozenset(i for i, (b, r) in enumerate(zip(before.recipients, updated.recipients))
                     if b.pending and not r.pending)


def warning_due(config: Config, envelope: Envelope, now: float) -> bool:
    """Whether the entry owes its sender a delay warning now."""
    if envelope.warned or envelope.finished or not envelope.sender:
        return False
    after = config.queue.delay_warning
    if after is not None and now - envelope.arrival >= after:
        return True
    # A TLS failure under a policy the admin listed warns at once, so the
    # sender can act (ask the recipient to fix their server) early.
    early = config.outbound.tls.early_warning
    return any(r.outcome is not None and r.outcome.kind in TLS_KINDS
               and r.outcome.policy in early for r in envelope.pending())


@attrs.frozen
class Owed:
    """The DSNs an attempt owes: failure reports, success reports, a delay warning."""

    failed: list[Recipient]
    delivered: list[Recipient]
    warning: bool

    def __bool__(self) -> bool:
        return bool(self.failed or self.delivered or self.warning)


def dsns_owed(config: Config, updated: Envelope, new: frozenset[int], now: float) -> Owed:
    """
    The DSNs owed after an attempt that took the recipients C{new} out of
    pending (L{newly_done}), and those an earlier attempt could not queue
    (flagged C{dsn_pending}).
    """
    failed = [r for i, r in enumerate(updated.recipients)
              if r.state == FAILED and (r.dsn_pending or i in new)]
    delivered = [r for i, r in enumerate(updated.recipients)
                 if r.state == DELIVERED and (r.dsn_pending or (
                     i in new and updated.sender and r.wants("SUCCESS")
                     and not (r.outcome and r.outcome.dsn_passed)))]
    return Owed(failed, delivered, warning_due(config, updated, now))


def log_removed(envelope: Envelope, worker: int | None = None) -> None:
    """
    The line for an entry removed once every recipient is done (by
    C{worker}, when a worker ran the attempt).
    """
    log.info("{queue_id}: removed from queue ({delivered} delivered, {failed} failed)"
             + ("" if worker is None else " by worker {worker}"),
             event="queue.removed", queue_id=envelope.queue_id, worker=worker,
             delivered=sum(r.state == DELIVERED for r in envelope.recipients),
             failed=sum(r.state == FAILED for r in envelope.recipients))
