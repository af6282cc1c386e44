"""
Outbound connections: find a server for a next hop, set up a session, and
run transactions on it, reusing each connection for further messages to
the same next hop, within global and per-destination limits.

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
from twisted.internet import defer, endpoints, error
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger

from twisted_mta.config import DNSSettings, OutboundSettings
from twisted_mta.metrics import notify
from twisted_mta.outbound import mx
from twisted_mta.outbound.client import OutboundClient, SessionFailed, Timeouts, Transaction
from twisted_mta.outbound.router import NextHop
from twisted_mta.tls import fallback as fb
from twisted_mta.tls.handshake import PolicyCreator, _is_ip, shadow_verdict
from twisted_mta.tls.history import TLSHistory, _day
from twisted_mta.tls.engine import TLSEngine
from twisted_mta.model import Outcome

log = Logger()


class DNSResolver:
    """
    Blocking MX and address look-ups (call through the I/O pool).
    """

    def __init__(self, settings: DNSSettings) -> None:
        self._resolver = mx.make_resolver(settings.nameservers or None, settings.timeout)

    def mx(self, domain: str) -> list[mx.MXHost]:
        return mx.lookup_mx(self._resolver, domain)

    def addresses(self, host: str) -> list[str]:
        return mx.lookup_addresses(self._resolver, host)


def tcp_connector(reactor, timeout: float) -> Callable:
    """
    Connect C{protocol} to C{address}:C{port}, through TLS from the first
    byte when C{creator} is given (implicit TLS).
    """
    def connect(address: str, port: int, protocol, creator) -> defer.Deferred:
        if ":" in address:
            ep = endpoints.TCP6ClientEndpoint(reactor, address, port, timeout=timeout)
        else:
            ep = endpoints.TCP4ClientEndpoint(reactor, address, port, timeout=timeout)
        if creator is not None:
            ep = endpoints.wrapClientTLS(creator, ep)
        return ep.connect(_OneProtocol(protocol))
    return connect


class _OneProtocol(ClientFactory):
    """
    Hands out one prepared protocol, quietly (Twisted's own one-shot
    factory logs two lines per connection).
    """

    noisy = False

    def __init__(self, protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


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


class OutboundPool:
    def __init__(self, *, settings: OutboundSettings, hostname: str, clock, run_blocking,
                 resolver, connect: Callable, tls: TLSEngine | None = None,
                 observers: list | None = None, history: TLSHistory | None = None) -> None:
        self.settings = settings
        self.history = history
        # Called with (event name, dict) for shadow verdicts and TLS
        # outcomes: the shadow report file, metrics.
        self.observers = observers if observers is not None else []
        self.tls = tls if tls is not None else TLSEngine(settings.tls)
        self.hostname = hostname
        self.helo = settings.helo_name or hostname
        self.own_names = frozenset({hostname, self.helo})
        self.clock = clock
        self.run_blocking = run_blocking
        self.resolver = resolver
        self.connect = connect
        self.timeouts = Timeouts(handshake=settings.handshake_timeout,
                                 greeting=settings.greeting_timeout,
                                 command=settings.command_timeout, data=settings.data_timeout)
        self._destinations: dict[str, _Destination] = {}
        self.total = 0
        self._stopping = False

    # -- the interface the queue manager uses ---------------------------------------

    def deliver(self, hop: NextHop, txn: Transaction) -> defer.Deferred:
        """
        Send C{txn} to C{hop}; fires with an outcome for every recipient.
        """
        if self._stopping:
            return defer.succeed(_all(txn, Outcome(451, "4.3.2", "shutting down")))
        if txn.tls_override == "relaxed":
            return self._one_off(hop, txn)
        key = self._key(hop)
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(hop, key)
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
            return hop.domain
        c = self.tls.choose(hop.domain, hop.smarthost.host, hop.smarthost)
        return (hop.key, c.requirements, c.fallback, c.shadow, c.ratchet)

    def revive(self) -> None:
        """
        Forget which destinations are dead (an operator's flush means: try
        now, really).
        """
        for dest in self._destinations.values():
            dest.dead_outcome = dest.dead_failure = None
            dest.limit = None

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
                client = yield self._establish(dest.hop)
            else:
                client = yield self._establish_fallback(dest)
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
                if self.history is not None and dest.hop.smarthost is None:
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
            outcome = Outcome(451, "4.3.0", f"internal error: {e}")
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
            d.callback(_all(txn, Outcome(451, "4.3.0", "internal error while sending")))
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
            client = yield self._establish(hop, relax=True)
        except SessionFailed as e:
            return _all(txn, e.outcome)
        log.warn("outbound: {queue_id} sent under the operator's relaxed override to {peer}",
                 event="outbound.tls_override", queue_id=txn.queue_id, peer=client.peer)
        results = yield client.send(txn)
        client.quit()
        return results

    @defer.inlineCallbacks
    def _establish(self, hop: NextHop, relax: bool = False):
        """
        A ready session for C{hop}: each host in order, each address in
        turn.  Fails with the most telling failure: a TLS failure (which
        the fallback decider then weighs per message) over the rest.
        """
        if hop.smarthost is not None:
            hosts = [hop.smarthost.host]
            port = hop.smarthost.port
        else:
            port = self.settings.port
            try:
                records = yield self.run_blocking(self.resolver.mx, hop.domain)
            except mx.MXError as e:
                raise SessionFailed(e.outcome, next_host=False)
            hosts = self._without_self(hop.domain, records)
        last: Outcome | None = None
        tls_failed: SessionFailed | None = None
        for host in hosts:
            if _is_ip(host):
                addresses = [host]
            else:
                try:
                    addresses = yield self.run_blocking(self.resolver.addresses, host)
                except mx.MXError as e:
                    last = e.outcome
                    continue
            if not addresses:
                last = Outcome(451, "4.4.4", f"the mail server {host} has no address "
                               "(no A or AAAA record)")
                continue
            choice = self.tls.choose(hop.domain, host, hop.smarthost)
            note = None
            choice, note = self._with_history(hop, choice)
            if relax:
                req = attrs.evolve(choice.requirements, starttls="required", verify=False)
                choice, note = attrs.evolve(choice, requirements=req), "override=relaxed"
            for address in addresses:
                try:
                    client = yield self._session(hop, host, address, port, choice, note=note)
                except SessionFailed as e:
                    last = e.outcome
                    if e.tls_failure is not None:
                        e.choice = choice
                        tls_failed = e
                    if not e.next_host:
                        raise
                    continue
                return client
        if tls_failed is not None:
            raise tls_failed
        raise SessionFailed(last or Outcome(451, "4.4.4", f"no mail server found for {hop.key}"))

    def _with_history(self, hop: NextHop, choice):
        """
        What the destination's history changes: the ratchet raises the
        requirements to the best TLS it has shown; remembered broken TLS
        skips STARTTLS where the policy would send in cleartext anyway.
        """
        if self.history is None or hop.smarthost is not None:
            return choice, None
        entry = self.history.get(hop.domain)
        if entry is None:
            return choice, None
        req = choice.requirements
        if choice.ratchet and entry.best != "none":
            raised = req
            if req.starttls != "required":
                raised = attrs.evolve(raised, starttls="required")
            if entry.best == "verified" and not req.verify:
                raised = attrs.evolve(raised, verify=True)
            if (raised.min_version or "TLSv1.2") < "TLSv1.2":
                raised = attrs.evolve(raised, min_version="TLSv1.2", ciphers=None)
            if raised != req:
                why = f"{hop.domain} used {entry.best} TLS on {_day(entry.best_at)}"
                return attrs.evolve(choice, requirements=raised, ratcheted=why), \
                    f"ratchet={entry.best}"
        broken = self.history.broken(hop.domain)
        if broken is not None and req.starttls == "if-offered" and choice.fallback == "now":
            return (attrs.evolve(choice, requirements=attrs.evolve(req, starttls="never")),
                    f"tls-skipped=broken ({broken.failures} failures, last {broken.last_kind})")
        return choice, None

    # -- after a TLS failure ----------------------------------------------------------

    def _situation(self, hop: NextHop, failure, choice, txn: Transaction) -> fb.Situation:
        sh = hop.smarthost
        relay = self.settings.tls.relay
        return fb.Situation(
            destination=fb.Destination(_domain_of(txn, hop), failure.host, sh is not None),
            requirements=choice.requirements, age=txn.age, attempts=txn.attempts,
            tls_failures=txn.tls_failures,
            implicit_tls=sh is not None and sh.tls == "implicit",
            credentials=sh is not None and sh.username is not None,
            requiretls=False, relay=relay.destination if relay else None,
            history=self.history.get(hop.domain) if self.history and hop.domain else None,
            ratchet=choice.ratcheted)

    def _after_tls_failure(self, dest: _Destination, e: SessionFailed, waiting: list) -> None:
        """
        Ask the fallback decider, message by message, what follows a TLS
        failure: deferral (the mail gets the failure, explained), or a
        fallback destination (cleartext, relaxed, or the relay) whose
        connections carry only the messages allowed to use them.
        """
        hop, failure, choice = dest.hop, e.tls_failure, e.choice
        decider = self.tls.decider(choice.fallback)
        for txn, d in waiting:
            situation = self._situation(hop, failure, choice, txn)
            if txn.tls_override == "cleartext":
                decision = fb.decide(_OperatorOverride(), failure, situation)
            else:
                decision = fb.decide(decider, failure, situation)
            log.info("outbound: TLS to {peer} failed ({kind}); policy {policy} "
                     "({why}), fallback {decider}: {action} ({reason})",
                     event="outbound.tls_decision", destination=hop.key, host=failure.host,
                     address=failure.address, peer=failure.peer, kind=failure.kind,
                     detail=failure.detail, policy=choice.requirements.policy,
                     why=choice.reason, decider=decision.decider, action=decision.action,
                     rule=decision.rule, later=decision.later, reason=decision.reason,
                     queue_ids=txn.queue_id)
            self._notify("tls.decision", {
                "kind": failure.kind, "domain": hop.domain or hop.key,
                "policy": choice.requirements.policy, "action": decision.action,
                "decider": decision.decider})
            if decision.action == fb.DEFER:
                d.callback(_all(txn, self.tls.outcome(failure, choice, _domain_of(txn, hop),
                                                      decision, situation)))
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
        fallback = self._destinations.get(key)
        if fallback is None:
            fallback = self._destinations[key] = _Destination(
                hop, key, mode=(decision.action, failure, choice, note))
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
                self._notify("tls.cleartext_fallback", {
                    "domain": _domain_of(txn, dest.hop) or dest.hop.key, "policy": req.policy,
                    "requires_tls": req.requires_tls, "decider": decision.decider,
                    "kind": failure.kind})
        fallback.waiting.append((txn, d))
        self._pump(fallback)

    @defer.inlineCallbacks
    def _establish_fallback(self, dest: _Destination):
        """
        A session for a fallback destination: the same server without TLS
        or without certificate checks, or the secure relay under its own
        policy.
        """
        action, failure, choice, note = dest.mode
        if action == fb.VIA_RELAY:
            relay = dest.hop.smarthost
            relay_choice = self.tls.choose("", relay.host, relay)  # the relay's own policy
            host = relay.host
            try:
                addresses = [host] if _is_ip(host) else (
                    yield self.run_blocking(self.resolver.addresses, host))
            except mx.MXError as e:
                raise SessionFailed(e.outcome)
            if not addresses:
                raise SessionFailed(Outcome(451, "4.4.4", f"the relay {host} has no address"))
            client = yield self._session(dest.hop, host, addresses[0], relay.port,
                                         relay_choice, note=note)
        else:
            req = choice.requirements
            changed = (attrs.evolve(req, starttls="never", verify=False)
                       if action == fb.CLEARTEXT else attrs.evolve(req, verify=False))
            client = yield self._session(dest.hop, failure.host, failure.address, failure.port,
                                         attrs.evolve(choice, requirements=changed), note=note)
        return client

    def _without_self(self, domain: str, records: list[mx.MXHost]) -> list[str]:
        """
        The MX hosts to try: those more preferred than ourselves, when we
        are one of them (RFC 5321 5.1); a loop when we are the best.
        """
        ours = [r.preference for r in records if r.name in self.own_names]
        if ours:
            records = [r for r in records if r.preference < min(ours)]
            if not records:
                raise SessionFailed(Outcome(
                    554, "5.4.6", f"mail for {domain} loops back to myself: its best MX "
                    f"host is this server ({self.hostname})", kind="loop"), next_host=False)
        return [r.name for r in records]


    @defer.inlineCallbacks
    def _session(self, hop: NextHop, host: str, address: str, port: int, choice,
                 note: str | None = None):
        sh = hop.smarthost
        implicit = sh is not None and sh.tls == "implicit"
        req = choice.requirements
        credentials = None
        if sh is not None and sh.username is not None:
            try:
                password = yield self.run_blocking(_read_secret, sh.password_file)
            except OSError as e:
                raise SessionFailed(Outcome(451, "4.3.5", f"cannot read the password for "
                                            f"{sh.destination}: {e.strerror}"), next_host=False)
            credentials = (sh.username, password)
        if implicit and req.starttls == "never":
            req = attrs.evolve(req, starttls="required")  # TLS from the first byte, always
        creator = PolicyCreator(req, host) if req.starttls != "never" else None
        client = OutboundClient(
            helo=self.helo, host=host, address=address, port=port,
            tls=creator, requirements=req, credentials=credentials,
            own_names=self.own_names, timeouts=self.timeouts, run_blocking=self.run_blocking)
        client.callLater = self.clock.callLater
        try:
            yield self.connect(address, port, client, creator if implicit else None)
        except (error.ConnectError, error.TimeoutError, OSError) as e:
            raise SessionFailed(Outcome(451, "4.4.1", f"connect to {client.peer} failed: "
                                        f"{_connect_reason(e)}", remote_mta=host,
                                        kind="connect-failed"))
        client = yield client.established
        tls_text = creator.record.describe() if creator and client.tls_done else "no TLS"
        if choice.shadow is not None and note is None:
            self._shadow(hop, choice, creator, client)
        if self.history is not None and hop.smarthost is None and not (
                note or "").startswith(("fallback", "override")):
            level = ("none" if not (creator and client.tls_done) else
                     "verified" if creator.record.verified else "encrypted")
            self.history.record_success(hop.domain, level)
        self._notify("tls.session", {
            "version": creator.record.version if creator and client.tls_done else None,
            "verified": bool(creator and client.tls_done and creator.record.verified),
            "policy": req.policy, "peer": client.peer})
        client.trace = (f"X-Twisted-MTA-TLS: {client.peer} {tls_text}; policy {req.policy} "
                        f"({choice.reason})" + (f"; {note}" if note else ""))
        log.info("outbound: session with {peer} ({tls}; policy {policy} from {why}{note})",
                 event="outbound.connected", peer=client.peer, tls=tls_text,
                 policy=req.policy, why=choice.reason, note=f"; {note}" if note else "",
                 destination=hop.key, verified=bool(creator and creator.record.verified),
                 version=creator.record.version if creator else None,
                 cipher=creator.record.cipher if creator else None)
        return client


    def _shadow(self, hop: NextHop, choice, creator, client) -> None:
        verdict = shadow_verdict(choice.shadow, creator, client.tls_done, client.capabilities,
                                 client.host, client.address, client.port)
        if verdict is None:
            return
        event = {"time": self.clock.seconds(), "domain": hop.domain or hop.key,
                 "host": client.host, "address": client.address, "port": client.port,
                 "policy": choice.requirements.policy, "shadow": choice.shadow.policy,
                 "why": choice.reason, "kind": verdict.kind, "detail": verdict.detail,
                 "reason": verdict.describe()}
        log.info("outbound: {shadow} (shadow) would refuse {host}[{address}] for {domain}: "
                 "{reason}", event="tls.shadow", **event)
        self._notify("tls.shadow", event)

    def _notify(self, name: str, event: dict) -> None:
        notify(self.observers, name, event, log, "outbound.error")


@attrs.frozen
class _OperatorOverride:
    name: str = "operator-override"

    def decide(self, failure, situation) -> fb.Decision:
        return fb.Decision(fb.CLEARTEXT, "the operator allowed cleartext for this message "
                           "(twisted-mta queue release/flush --allow-cleartext)", self.name)


def _domain_of(txn: Transaction, hop: NextHop) -> str:
    """
    The recipient domain of a transaction: a smarthost destination carries
    the mail of every domain whose TLS policy there is the same.
    """
    if txn.recipients:
        return txn.recipients[0].rpartition("@")[2].lower()
    return hop.domain


def _all(txn: Transaction, outcome: Outcome) -> dict[str, Outcome]:
    return {r: outcome for r in txn.recipients}


def _read_secret(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip("\r\n")


def _connect_reason(e: Exception) -> str:
    if isinstance(e, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, error.TimeoutError):
        return "timed out"
    if isinstance(e, error.NoRouteError):
        return "no route to host"
    return str(e) or type(e).__name__
