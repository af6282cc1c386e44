"""
Operator requests (C{twisted-mta queue flush|hold|release|delete},
C{tls history --forget}, C{tls report send --now}, one-shot TLS
overrides): read from the spool's control/ directory when a request lands
there (inotify, where the caller watches it) and every second, and carried
out between attempts.
"""

from __future__ import annotations

import math

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta.model import is_queue_id
from twisted_mta.queue import control

log = Logger()


class OperatorRequests:
    def __init__(self, manager) -> None:
        self.manager = manager  # the QueueManager whose entries the requests are about
        self._polling = False
        self._again = False  # a request landed while a poll ran

    def poll(self) -> defer.Deferred | None:
        if self.manager._stopping:
            return None  # a late notification, or a look owed to one
        if self._polling:
            self._again = True
            return None
        self._polling = True
        d = self.manager.run_blocking(control.read_requests, self.manager.spool)
        d.addCallback(self._handle_requests)
        d.addErrback(lambda f: log.failure("queue: reading control requests failed", f,
                                           event="queue.error"))

        def finished(_):
            self._polling = False
            if self._again:
                self._again = False
                self.poll()
        d.addBoth(finished)
        return None

    @defer.inlineCallbacks
    def _handle_requests(self, requests):
        for name, action, qid in requests:
            if qid != control.ALL and qid in self.manager.active:
                continue  # busy with an attempt: try again at the next poll
            try:
                outcome = yield self.carry_out(action, qid)
            except Exception:
                log.failure("queue: {action} {queue_id} failed", action=action, queue_id=qid,
                            event="queue.error")
                outcome = "failed"
            if qid != control.ALL:
                self.manager.settle(qid)
            log.info("queue: operator {action} {queue_id}: {outcome}", event="queue.operator",
                     action=action, queue_id=qid, outcome=outcome)
            yield self.manager.run_blocking(control.done, self.manager.spool, name)

    @defer.inlineCallbacks
    def carry_out(self, action: str, qid: str):
        action, override = control.split_action(action)
        if override is not None and self.manager.wake(qid) is not None:
            envelope = attrs.evolve((yield self.manager.envelope(qid)), tls_override=override)
            yield self.manager.run_blocking(self.manager.spool.update, envelope, self.manager.states[qid])
            self.manager.entries[qid] = envelope
            log.warn("{queue_id}: operator allows {override} TLS for its next attempt only",
                     event="queue.tls_override", queue_id=qid, override=override)
        if action == "flush":
            for target in self.manager.targets:
                target.flush()
        if action == "flush" and qid == control.ALL:
            self.manager.flush()
            return "all entries due now"
        if action == "stsreload":
            cache = self.manager.sts_cache
            if cache is None:
                return "MTA-STS is off"
            found = yield cache.reload(qid)
            return "MTA-STS policy reloaded" if found else "no MTA-STS policy cached for it"
        if action == "tlsrptsend":
            if self.manager.tlsrpt is None:
                return "TLS reporting is off ([tlsrpt] enabled = false)"
            return self.manager.tlsrpt.send_now(None if qid == control.ALL else qid)
        if action == "tlsforget":
            if self.manager.tls_history is None:
                return "no TLS history"
            found = self.manager.tls_history.forget(None if qid == control.ALL else qid)
            return "TLS history forgotten" if found else "no TLS history for it"
        state = self.manager.wake(qid) if is_queue_id(qid) else None
        if state is None and is_queue_id(qid):
            # A message a milter quarantined was committed straight to hold/
            # by the inbound server (maybe in a worker): adopt it now.
            found = yield self.manager.run_blocking(self.manager.spool.state_of, qid)
            if found != "hold":
                return "no such entry"
            self.manager.entries[qid] = None  # as a held entry loaded at start-up
            self.manager.states[qid] = state = "hold"
            # (not idle until the request is carried out: held again, it is)
        if state is None:
            return "no such entry"
        if action == "flush":
            if state == "hold":
                return "held; release it first"
            self.manager.schedule(qid, self.manager.clock.seconds())
            return "due now"
        if action == "hold":
            if state == "hold":
                return "already held"
            self.manager.unschedule(qid)
            yield self.manager.run_blocking(self.manager.spool.move, qid, state, "hold")
            self.manager.park(qid, "hold", math.inf)
            return "held"
        if action == "release":
            if state != "hold":
                return "not held"
            yield self.manager.run_blocking(self.manager.spool.move, qid, "hold", "cur")
            self.manager.states[qid] = "cur"
            self.manager.schedule(qid, self.manager.clock.seconds())
            return "released, due now"
        if action == "delete":
            self.manager.unschedule(qid)
            yield self.manager.run_blocking(self.manager.spool.remove, qid)
            self.manager.forget(qid)
            return "deleted"
        return "unknown action"

