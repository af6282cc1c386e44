"""
A whole attempt run by a worker for the main process (docs/architecture.md,
"Processes"): in a backlog of idle entries, the main process names an
entry and a worker reads it from the spool, sends it, records the results
in it and removes it when it is done, and says in one line what became of
it (L{Answer}).  The main process keeps the schedule and never reads the
entry: reading an entry back, applying outcomes and removing it were
most of its work per message in a drain (docs/benchmarks.md).

A worker takes only what needs nothing from the main process: pending
recipients all remote, no DSN owed before or after.  Anything else comes
back (L{DECLINED} before it is tried, L{BACK} after, with the results
not yet recorded) and the main process finishes it as its own.  A worker
that ends during an attempt leaves the entry where it got to (L{LOST}):
the main process looks where the file is and tries it again, so a
message may be sent twice, never lost.
"""

from __future__ import annotations

import json
import random
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta.config import Config
from twisted_mta.local import LocalDirectory
from twisted_mta.model import DeliveryRequest, Envelope, EnvelopeError
from twisted_mta.queue.results import (
    apply_results, deliver_to, dsns_owed, log_removed, newly_done,
)
from twisted_mta.queue.spool import (
    STATE_DIRS, Batched, RunBlocking, Spool, attempted_state, run_inline,
)

log = Logger()

# What became of a delegated attempt.
REMOVED = "removed"  # delivered (or failed for good) and removed, no DSN owed
STORED = "stored"  # results recorded in the entry (in state, due at next_attempt)
BACK = "back"  # results not recorded: the main process finishes (DSNs, a refused write)
DECLINED = "declined"  # not tried: the main process attempts it itself
GONE = "gone"  # the queue file was not there
LOST = "lost"  # the worker ended before it answered
KINDS = frozenset({REMOVED, STORED, BACK, DECLINED, GONE, LOST})


class AnswerError(ValueError):
    """An answer that does not decode."""


@attrs.frozen
class Answer:
    """
    What a worker did with an attempt.  C{results}: (result, latency)
    for each recipient's C{delivery.result} event, which the main
    process's metrics count.
    """

    kind: str
    state: str | None = None  # where the queue file is now (STORED, BACK)
    next_attempt: float | None = None  # STORED
    envelope: Envelope | None = None  # BACK: the results, not yet recorded
    new: frozenset[int] = frozenset()  # BACK: the recipients taken out of pending
    results: tuple[tuple[str, float], ...] = ()

    def encode(self) -> bytes:
        data: dict = {"k": self.kind, "r": [list(r) for r in self.results]}
        if self.state is not None:
            data["s"] = self.state
        if self.next_attempt is not None:
            data["t"] = self.next_attempt
        if self.envelope is not None:
            data["e"] = self.envelope.to_json(compact=True).decode("utf-8")
            data["n"] = sorted(self.new)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    @classmethod
    def decode(cls, line: bytes) -> "Answer":
        try:
            data = json.loads(line)
            kind = data["k"]
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            envelope = Envelope.from_json(data["e"]) if "e" in data else None
            next_attempt = data.get("t")
            answer = cls(kind=kind, state=data.get("s"),
                         next_attempt=None if next_attempt is None else float(next_attempt),
                         envelope=envelope, new=frozenset(int(i) for i in data.get("n", ())),
                         results=tuple((str(r), float(t)) for r, t in data["r"]))
        except (ValueError, KeyError, TypeError, EnvelopeError) as e:
            raise AnswerError(f"an attempt's answer that does not decode: {e}")
        needs_state = kind in (STORED, BACK)
        if (answer.state is not None or needs_state) and answer.state not in STATE_DIRS or \
                (kind == STORED) != (answer.next_attempt is not None) or \
                (kind == BACK) != (answer.envelope is not None):
            raise AnswerError(f"an attempt's answer that does not hold together: {kind}")
        return answer


class WorkerAttempts:
    """
    A worker's side: runs the attempts the main process hands it, as
    L{twisted_mta.queue.manager.QueueManager} would, with the same
    decisions (L{twisted_mta.queue.results}).

    @param read: runs the short reads (the entry, the message): inline,
        or in threads while the disk is slow (L{InlineReads}).
    """

    def __init__(self, config: Config, spool: Spool, clock, run_blocking: RunBlocking,
                 target_for: Callable, read: RunBlocking = run_inline,
                 rand: Callable[[], float] = random.random, remove_gather: float = 0.0,
                 index: int = 0) -> None:
        self.config = config
        self.index = index  # the worker's, for the log
        # The remote delivery target on the worker's outbound pool (called
        # with the pool): this module imports no delivery target.
        self.target_for = target_for
        self.spool = spool
        self.clock = clock
        self.run_blocking = run_blocking
        self.read = read
        self.rand = rand
        self.directory = LocalDirectory(config.local)
        self._remove = Batched(run_blocking, lambda qid: spool.remove(qid), clock=clock,
                               gather=remove_gather)

    def takes(self, envelope: Envelope) -> bool:
        """Whether this entry needs nothing of the main process: see the module."""
        pending = envelope.pending()
        return bool(pending) and not any(r.dsn_pending for r in envelope.recipients) and \
            not any(self.directory.is_local_domain(r.address.rpartition("@")[2])
                    for r in pending)

    def declined(self) -> bytes:
        return Answer(DECLINED).encode()

    def run(self, qid: str, state: str, pool) -> defer.Deferred:
        """
        Attempt entry C{qid} (its queue file in C{state}/) through the
        outbound C{pool}; fires with an L{Answer}, never fails: after a
        crash (a bug, logged) the main process looks where it got to.
        """
        d = self._run(qid, state, self.target_for(pool))

        def crashed(f):
            log.failure("queue: the attempt of {queue_id} crashed", f, queue_id=qid,
                        event="queue.error")
            return Answer(LOST)
        return d.addErrback(crashed)

    @defer.inlineCallbacks
    def _run(self, qid: str, state: str, target):
        try:
            envelope = yield self.read(self.spool.load, qid, state)
        except FileNotFoundError:
            return Answer(GONE)
        except EnvelopeError:
            return Answer(DECLINED)  # the main process deals with it as its own
        if not self.takes(envelope):
            return Answer(DECLINED)
        now = self.clock.seconds()
        request = DeliveryRequest(
            envelope=envelope, path=self.spool.path_in(state, qid),
            indexes=tuple(i for i, r in enumerate(envelope.recipients) if r.pending),
            now=now, recovering=False)
        results = yield deliver_to(target, request)
        if results is None:
            return Answer(GONE)
        told: list[tuple[str, float]] = []
        now = self.clock.seconds()
        updated = apply_results(self.config, envelope, results, {}, now, self.rand,
                                lambda name, event: told.append(
                                    (event["result"], event["latency"])))
        new = newly_done(envelope, updated)
        back = Answer(BACK, state=state, envelope=updated, new=new, results=tuple(told))
        if dsns_owed(self.config, updated, new, now):
            return back
        if updated.finished:
            try:
                yield self._remove(qid)
            except Exception as e:
                log.warn("queue: could not remove {queue_id}: {error}; the main process "
                         "tries again", queue_id=qid, error=str(e), event="queue.error")
                return back
            log_removed(updated, self.index)
            return Answer(REMOVED, results=tuple(told))
        dst = attempted_state(state)
        try:
            yield self.run_blocking(self.spool.update_and_move, updated, state, dst)
        except Exception as e:
            log.warn("queue: could not record the results of {queue_id}: {error}; the main "
                     "process tries again", queue_id=qid, error=str(e), event="queue.error")
            where = state
            if dst != state:  # the move may be done, the update not
                where = (yield self.run_blocking(self.spool.state_of, qid)) or state
            return attrs.evolve(back, state=where)
        return Answer(STORED, state=dst, next_attempt=updated.next_attempt,
                      results=tuple(told))
