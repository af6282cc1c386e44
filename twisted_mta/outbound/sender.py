"""
The outbound leg in a worker process (docs/architecture.md, "Processes").

The main process keeps the queue and every decision about it; for each
next hop a worker is chosen, and the hop's transactions go down that
worker's pipe (L{twisted_mta.outbound.wire}).  Here they are sent with
the same L{OutboundPool} the main process would use, and each
transaction's outcomes go back up.  What has one writer stays with the
main process: what this process learns of a domain's TLS (the history)
and every observer's event (TLS reporting, shadow records, metrics) go
back up too; the operator's flush, C{tls history --forget} and C{tls
sts refresh} come down.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta import failures
from twisted_mta.outbound import message as outgoing
from twisted_mta.outbound import wire
from twisted_mta.tls.history import HistoryEntry, TLSHistory

log = Logger()

STOP_WAIT = 6.0  # at SIGTERM, how long transactions under way may take to finish


class ForwardedHistory(TLSHistory):
    """
    A worker's copy of the TLS history: read as the main process's, and
    what is recorded here is told to the main process, which saves it.
    """

    def __init__(self, clock, tell: Callable[[str, HistoryEntry | None], None], **kw) -> None:
        super().__init__("", clock, None, **kw)
        self.tell = tell

    def record_success(self, domain: str, level: str) -> None:
        self._told(domain, super().record_success, level)

    def record_failure(self, domain: str, kind: str) -> None:
        self._told(domain, super().record_failure, kind)

    def _told(self, domain: str, record, *args) -> None:
        key = (domain or "").lower()
        before = self.entries.get(key)
        record(domain, *args)
        after = self.entries.get(key)
        if key and after != before:
            self.tell(key, after)

    def _changed(self) -> None:
        pass  # the main process saves

    def save_now(self) -> None:
        pass


class Sender:
    """
    A worker's sending: reads the main process's lines (L{line}), writes
    its answers with C{write} (a whole line, newline included).  The pool
    is built at the first transaction, so a worker that only receives
    costs no more memory than before.

    @param make_pool: called with (observers, history) for the pool.
    """

    def __init__(self, clock, write: Callable[[bytes], None], make_pool: Callable,
                 settings, attempts=None) -> None:
        self.clock = clock
        # Runs whole attempts (twisted_mta.queue.delegated.WorkerAttempts):
        # the main process's "attempt" lines.
        self.attempts = attempts
        self.write = write
        self.make_pool = make_pool
        self.settings = settings  # OutboundSettings: where a next hop goes
        self.history = ForwardedHistory(clock, self._tell_history,
                                        expiry=settings.tls.history_expiry,
                                        broken_after=settings.tls.broken_tls_after,
                                        broken_time=settings.tls.broken_tls_time)
        self.pool = None
        self.broken: str | None = None  # why the pool cannot be built
        self.pending: dict[int, defer.Deferred] = {}
        self.stopping = False

    # -- lines from the main process ------------------------------------------------

    def line(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        try:
            if verb == b"send":
                n, _, data = rest.partition(b" ")
                self.send(int(n), data)
            elif verb == b"attempt":
                n, qid, state = rest.split(b" ")
                self.attempt(int(n), qid.decode("ascii"), state.decode("ascii"))
            elif verb == b"revive":
                if self.pool is not None:
                    self.pool.revive()
            elif verb == b"history":
                self.history.replace(wire.decode_json(rest))
            elif verb == b"history-forget":
                domain = rest.decode("ascii")
                self.history.forget(None if domain == "*" else domain)
            elif verb == b"sts-reload":
                cache = self._sts_cache()
                if cache is not None:
                    cache.reload(rest.decode("ascii"))
            else:
                raise wire.WireError(f"unknown request {verb[:20]!r}")
        except (wire.WireError, ValueError, UnicodeError) as e:
            log.warn("worker: a request from the main process not understood: {why}",
                     why=str(e), event="workers.error")

    def send(self, n: int, data: bytes) -> None:
        request = wire.decode_send(data, self.settings)
        if self.stopping:
            return self._answer(n, _all(request, failures.outcome("shutting-down")))
        pool = self._pool()
        if pool is None:
            return self._answer(n, _all(request, failures.outcome(
                "internal", why=f"remote delivery cannot start: {self.broken}")))
        try:
            message = outgoing.load(request.path, request.expect)
        except FileNotFoundError:
            return self.write(b"gone %d\n" % n)
        except Exception as e:
            return self._answer(n, _all(request, failures.outcome("message-unreadable",
                                                                  why=e)))
        d = pool.deliver(request.hop, request.transaction(message))
        self.pending[n] = d
        d.addCallback(lambda outcomes: self._answer(n, outcomes))
        d.addErrback(self._failed, n, request)
        d.addBoth(lambda _: self.pending.pop(n, None) and None)

    def attempt(self, n: int, qid: str, state: str) -> None:
        """
        A whole attempt of entry C{qid} (L{twisted_mta.queue.delegated}),
        through this process's pool; answered C{done N ANSWER}.
        """
        if self.attempts is None:  # a worker started without them: the main process does it
            return self._done(n, b'{"k":"declined","r":[]}')
        pool = None if self.stopping else self._pool()
        if pool is None:
            return self._done(n, self.attempts.declined())
        d = self.attempts.run(qid, state, pool)  # never fails: a crash is an answer too
        self.pending[n] = d
        d.addCallback(lambda answer: self._done(n, answer.encode()))
        d.addBoth(lambda _: self.pending.pop(n, None) and None)

    def _done(self, n: int, answer: bytes) -> None:
        self.write(b"done %d " % n + answer + b"\n")

    def _failed(self, f, n: int, request: wire.SendRequest) -> None:
        log.failure("worker: sending {queue_id} failed", f, queue_id=request.fields["queue_id"],
                    event="outbound.error")
        self._answer(n, _all(request, failures.outcome("internal", why=f.getErrorMessage())))

    def _answer(self, n: int, outcomes: dict) -> None:
        self.write(b"sent %d " % n + wire.encode_outcomes(outcomes) + b"\n")

    # -- what goes up besides ------------------------------------------------------

    def event(self, name: str, event: dict) -> None:
        self.write(b"event " + wire.encode_event(name, event) + b"\n")

    def _tell_history(self, domain: str, entry: HistoryEntry | None) -> None:
        self.write(b"history " + wire.encode_history(domain, entry) + b"\n")

    # -- the pool ---------------------------------------------------------------------

    def _pool(self):
        if self.pool is None and self.broken is None:
            try:
                self.pool = self.make_pool([self.event], self.history)
            except Exception as e:  # the main process built the same: unlikely
                self.broken = str(e)
                log.error("worker: remote delivery cannot start: {why}", why=self.broken,
                          event="workers.error")
                self.write(b"cannot-send\n")  # hand this worker nothing more
        return self.pool

    def _sts_cache(self):
        published = self.pool.ctx.published if self.pool is not None else None
        return published.sts_cache if published is not None else None

    def stop(self) -> defer.Deferred:
        """
        Take no more; let what is under way finish (up to L{STOP_WAIT}
        seconds) so that its outcomes reach the main process.
        """
        self.stopping = True
        if self.pool is not None:
            self.pool.stop()
        if not self.pending:
            return defer.succeed(None)
        done = defer.Deferred()
        timer = self.clock.callLater(STOP_WAIT, lambda: done.called or done.callback(None))

        def finished(_) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)
        # Not a timeout that cancels: a transaction cut short here would
        # report a failure for mail that may have gone.
        defer.DeferredList(list(self.pending.values()), consumeErrors=True).addBoth(finished)
        return done


def _all(request: wire.SendRequest, outcome) -> dict:
    return {r: outcome for r in request.fields["recipients"]}
