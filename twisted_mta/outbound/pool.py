"""
Outbound connections: per next hop, the messages waiting, the idle
connections and the count of open ones; a session comes from the hop's
L{Attempt} (L{twisted_mta.outbound.attempt}), and is reused for further
messages to the same next hop, within global and per-destination limits.

For an MX next hop the hosts are tried in preference order and each
host's addresses in turn; the first session that is set up carries the
waiting messages.  When every host fails, the messages waiting for that
next hop share the last failure (a dead destination costs one round of
connection attempts, not one per message).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta import failures
from twisted_mta.config import OutboundSettings
from twisted_mta.model import Outcome
from twisted_mta.outbound.attempt import Attempt, AttemptContext, domain_of
from twisted_mta.outbound.client import OutboundClient, SessionFailed, Transaction
from twisted_mta.outbound.router import NextHop
from twisted_mta.tls import fallback as fb
from twisted_mta.tls.engine import TLSEngine
from twisted_mta.tls.history import TLSHistory

log = Logger()


@attrs.define(eq=False)
class _Destination:
    hop: NextHop
    key: object
    waiting: deque = attrs.field(factory=deque)  # (Transaction, Deferred)
    idle: list = attrs.field(factory=list)  # (client, timer)
    connections: int = 0  # open or being opened
    opening: int = 0
    dead_until: float = 0.0  # every host failed: until then, fail at once
    dead_outcome: Outcome | None = None
    dead_failure: SessionFailed | None = None  # when TLS was why: decide per message
    limit: int | None = None  # lowered while new connections fail beside live ones
    # For a fallback destination: (action, the failure, its choice, the note for
    # the trace).  Its connections go where the fallback says, pooled and
    # limited like any other.
    mode: tuple | None = None
    attempt: Attempt | None = None  # how a session is opened (set by the pool)


class OutboundPool:
    def __init__(self, *, settings: OutboundSettings, hostname: str, clock, run_blocking,
                 resolver, connect: Callable, tls: TLSEngine | None = None,
                 observers: list | None = None, history: TLSHistory | None = None,
                 published=None) -> None:
        self.settings = settings
        self.clock = clock
        self.ctx = AttemptContext(
            settings=settings, hostname=hostname, clock=clock, run_blocking=run_blocking,
            resolver=resolver, connect=connect,
            tls=tls if tls is not None else TLSEngine(settings.tls), history=history,
            observers=observers if observers is not None else [], published=published)
        self._destinations: dict[str, _Destination] = {}
        self.total = 0
        self._stopping = False

    @property
    def tls(self) -> TLSEngine:
        return self.ctx.tls

    @property
    def history(self) -> TLSHistory | None:
        return self.ctx.history

    @property
    def observers(self) -> list:
        return self.ctx.observers

    @history.setter
    def history(self, history: TLSHistory | None) -> None:
        self.ctx.history = history

    def attempt(self, hop: NextHop) -> Attempt:
        return Attempt(self.ctx, hop)

    def _destination(self, key, hop: NextHop, mode: tuple | None = None) -> _Destination:
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(hop, key, mode=mode,
                                                          attempt=self.attempt(hop))
        return dest

    # -- the interface the remote delivery target uses ------------------------------

    def deliver(self, hop: NextHop, txn: Transaction) -> defer.Deferred:
        """
        Send C{txn} to C{hop}; fires with an outcome for every recipient.
        """
        if self._stopping:
            return defer.succeed(_all(txn, failures.outcome("shutting-down")))
        if hop.tls_required_no:
            log.info("outbound: {queue_id} for {destination} carries \"TLS-Required: No\": "
                     "the recipient's published TLS policy (DANE, MTA-STS) is not enforced "
                     "for it (RFC 8689)", event="outbound.tls_required_no",
                     queue_id=txn.queue_id, destination=hop.key, domain=domain_of(txn, hop))
            self.ctx.notify("tls.required_no", {"domain": domain_of(txn, hop)})
        if txn.tls_override == "relaxed" and hop.requiretls:
            # No operator override relaxes what the sender required.
            log.warn("outbound: {queue_id} requires TLS (REQUIRETLS): the operator's relaxed "
                     "override does not apply", event="outbound.tls_override",
                     queue_id=txn.queue_id)
        elif txn.tls_override == "relaxed":
            return self._one_off(hop, txn)
        try:
            key = self._key(hop)
        except Exception as e:
            # A TLS policy plugin that raises for this destination: the
            # message waits for the next attempt; nothing else is held up.
            log.failure("outbound: choosing the TLS policy for {destination} failed",
                        destination=hop.key, event="outbound.error")
            return defer.succeed(_all(txn, failures.outcome(
                "internal", why=f"choosing the TLS policy for {hop.key} failed ({e}); the "
                "message will be tried again")))
        dest = self._destination(key, hop)
        if dest.dead_outcome is not None:
            if self.clock.seconds() < dest.dead_until:
                if dest.dead_failure is not None:
                    d = defer.Deferred()
                    self._after_tls_failure(dest, dest.dead_failure, [(txn, d)])
                    return d
                return defer.succeed(_all(txn, dest.dead_outcome))
            dest.dead_outcome = dest.dead_failure = None
        d: defer.Deferred = defer.Deferred()
        dest.waiting.append((txn, d))
        self._pump(dest)
        return d

    def _key(self, hop: NextHop):
        """
        Which connections a message may share: one MX domain's; or a
        smarthost's, among domains whose TLS policy there is the same.
        """
        if hop.smarthost is None:
            return hop.domain if hop.tag is None else (hop.domain, hop.tag)
        c = self.tls.choose(hop.domain, hop.smarthost.host, hop.smarthost)
        return (hop.key, c.requirements, c.fallback, c.shadow, c.ratchet, hop.tag)

    def revive(self) -> None:
        """
        Forget which destinations are dead, and the look-ups their recent
        connections shared (an operator's flush means: try now, really).
        """
        for dest in self._destinations.values():
            dest.dead_outcome = dest.dead_failure = None
            dest.limit = None
            dest.attempt.shared.clear()

    def stop(self) -> None:
        """
        Close idle connections; busy ones finish their transaction first.
        """
        self._stopping = True
        if self.history is not None:
            try:
                self.history.save_now()
            except OSError:
                log.failure("outbound: could not save the TLS history", event="outbound.error")
        for dest in self._destinations.values():
            for client, timer in dest.idle:
                if timer.active():
                    timer.cancel()
                client.quit()
            dest.idle.clear()

    # -- scheduling ---------------------------------------------------------------

    def _pump(self, dest: _Destination) -> None:
        while dest.waiting and dest.idle:
            client, timer = dest.idle.pop()
            if timer.active():
                timer.cancel()
            self._run(dest, client, *dest.waiting.popleft())
        s = self.settings
        limit = dest.limit or s.connections_per_destination
        while len(dest.waiting) > dest.opening and dest.connections < limit:
            if self.total >= s.connections:
                self._close_idle_elsewhere(dest)
                break
            dest.connections += 1
            dest.opening += 1
            self.total += 1
            self._open(dest)

    def _pump_all(self) -> None:
        for dest in list(self._destinations.values()):
            if dest.waiting:
                self._pump(dest)
                if self.total >= self.settings.connections:
                    return
            elif not dest.connections and (dest.dead_outcome is None
                                           or self.clock.seconds() >= dest.dead_until):
                del self._destinations[dest.key]

    def _close_idle_elsewhere(self, needy: _Destination) -> None:
        """
        At the global limit, an idle connection to another destination
        gives its place to one that has mail waiting.
        """
        for dest in self._destinations.values():
            if dest is not needy and dest.idle:
                client, timer = dest.idle.pop(0)
                if timer.active():
                    timer.cancel()
                client.quit()
                return

    @defer.inlineCallbacks
    def _open(self, dest: _Destination):
        try:
            if dest.mode is None:
                client = yield dest.attempt.open()
            else:
                client = yield dest.attempt.open_fallback(dest.mode)
        except SessionFailed as e:
            dest.opening -= 1
            self._released(dest)
            log.info("outbound: no session with {destination}: {reply}",
                     event="outbound.failed", destination=dest.hop.key, reply=str(e.outcome))
            live = dest.connections - dest.opening
            if live > 0:
                # The server takes no more connections from us (421, limits):
                # the live ones carry what waits, and no more are opened.
                dest.limit = live
                self._pump_all()
                return
            # Every host was tried: the destination is dead for a while, and
            # whatever waits for it (or comes soon) shares the failure.
            dest.dead_until = self.clock.seconds() + self.settings.dead_destination_time
            dest.dead_outcome = e.outcome
            tls = e.tls_failure is not None and dest.mode is None
            dest.dead_failure = e if tls else None
            waiting, dest.waiting = list(dest.waiting), deque()
            if tls:
                # A REQUIRETLS session demands more than the domain's own
                # policy (a verified certificate): its failures are not the
                # domain's TLS history.
                if self.history is not None and dest.hop.smarthost is None and \
                        not dest.hop.requiretls:
                    self.history.record_failure(dest.hop.domain, e.tls_failure.kind)
                self._after_tls_failure(dest, e, waiting)
            else:
                for txn, d in waiting:
                    d.callback(_all(txn, e.outcome))
            self._pump_all()
            return
        except Exception as e:  # a bug; do not leave messages hanging
            log.failure("outbound: setting up a session with {destination} crashed",
                        destination=dest.hop.key, event="outbound.error")
            dest.opening -= 1
            self._released(dest)
            outcome = failures.outcome("internal", why=f"internal error: {e}")
            if dest.connections == 0:
                waiting, dest.waiting = list(dest.waiting), deque()
                for txn, d in waiting:
                    d.callback(_all(txn, outcome))
            self._pump_all()
            return
        dest.opening -= 1
        dest.dead_outcome = dest.dead_failure = None
        if dest.limit is not None:
            dest.limit = min(dest.limit + 1, self.settings.connections_per_destination)
        client.closed.addCallback(lambda _: self._closed(dest, client))
        self._next(dest, client)

    def _released(self, dest: _Destination) -> None:
        dest.connections -= 1
        self.total -= 1

    def _closed(self, dest: _Destination, client: OutboundClient) -> None:
        for i, (c, timer) in enumerate(dest.idle):
            if c is client:
                if timer.active():
                    timer.cancel()
                del dest.idle[i]
                break
        self._released(dest)
        self._pump_all()

    def _next(self, dest: _Destination, client: OutboundClient) -> None:
        if not client.ready:
            return
        if client.messages >= self.settings.messages_per_connection or self._stopping:
            client.quit()
            return
        if dest.waiting:
            self._run(dest, client, *dest.waiting.popleft())
            return
        if self.total >= self.settings.connections and any(
                d.waiting for d in self._destinations.values()):
            client.quit()  # someone else needs the slot
            return
        timer = self.clock.callLater(self.settings.idle_time, self._idle_expired, dest, client)
        dest.idle.append((client, timer))

    def _idle_expired(self, dest: _Destination, client: OutboundClient) -> None:
        dest.idle = [(c, t) for c, t in dest.idle if c is not client]
        client.quit()

    def _run(self, dest: _Destination, client: OutboundClient, txn: Transaction,
             d: defer.Deferred) -> None:
        def done(results):
            d.callback(results)
            self._next(dest, client)

        def crashed(f):
            log.failure("outbound: transaction crashed", f, event="outbound.error")
            d.callback(_all(txn, failures.outcome("internal", why="internal error while "
                                                                  "sending")))
            client.quit()
        client.send(txn).addCallbacks(done, crashed)

    # -- finding a server -----------------------------------------------------------

    @defer.inlineCallbacks
    def _one_off(self, hop: NextHop, txn: Transaction):
        """
        The operator's "relaxed" override: one connection of its own, TLS
        required but the certificate not checked, for this message only.
        """
        try:
            client = yield self.attempt(hop).open(relax=True)
        except SessionFailed as e:
            return _all(txn, e.outcome)
        log.warn("outbound: {queue_id} sent under the operator's relaxed override to {peer}",
                 event="outbound.tls_override", queue_id=txn.queue_id, peer=client.peer)
        results = yield client.send(txn)
        client.quit()
        return results

    # -- after a TLS failure ----------------------------------------------------------

    def _after_tls_failure(self, dest: _Destination, e: SessionFailed, waiting: list) -> None:
        """
        Ask the fallback decider, message by message, what follows a TLS
        failure: deferral (the mail gets the failure, explained), or a
        fallback destination (cleartext, relaxed, or the relay) whose
        connections carry only the messages allowed to use them.
        """
        for txn, d in waiting:
            decision, outcome = dest.attempt.decide(e, txn)
            if decision.action == fb.DEFER:
                d.callback(_all(txn, outcome))
            else:
                self._enqueue_fallback(dest, e, decision, txn, d)

    def _enqueue_fallback(self, dest: _Destination, e: SessionFailed, decision, txn, d) -> None:
        failure, choice = e.tls_failure, e.choice
        note = f"fallback={decision.decider} reason={failure.kind}"
        if decision.action == fb.VIA_RELAY:
            relay = self.settings.tls.relay
            hop = NextHop(domain=dest.hop.domain, smarthost=relay)
            key = ("relay", relay.destination, note)
        else:
            hop = dest.hop
            key = ("fallback", dest.key, decision.action, failure.host, failure.address, note)
        fallback = self._destination(key, hop, mode=(decision.action, failure, choice, note))
        if decision.action != fb.VIA_RELAY:
            req = choice.requirements
            required = " although its policy requires TLS" if (
                decision.action == fb.CLEARTEXT and req.requires_tls) else ""
            log.warn("outbound: {action} fallback for {destination} after {kind} "
                     "({reason}){required}", event="outbound.tls_fallback",
                     action=decision.action, destination=dest.hop.key, kind=failure.kind,
                     reason=decision.reason, peer=failure.peer, policy=req.policy,
                     decider=decision.decider, required=required,
                     policy_requires_tls=req.requires_tls)
            if decision.action == fb.CLEARTEXT:
                self.ctx.notify("tls.cleartext_fallback", {
                    "domain": domain_of(txn, dest.hop) or dest.hop.key, "policy": req.policy,
                    "requires_tls": req.requires_tls, "decider": decision.decider,
                    "kind": failure.kind})
        fallback.waiting.append((txn, d))
        self._pump(fallback)

def _all(txn: Transaction, outcome: Outcome) -> dict[str, Outcome]:
    return {r: outcome for r in txn.recipients}
