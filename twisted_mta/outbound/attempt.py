"""
One delivery attempt to a next hop, step by step: route (MX or smarthost)
-> the MX hosts in order, without ourselves -> the TLS policy of each host
(and what the destination's history changes) -> connect -> greeting, EHLO,
STARTTLS judged at once, AUTH -> after a TLS failure, the fallback
decision for each message (after the hard rules) and the session a
fallback uses.  The pool (L{twisted_mta.outbound.pool}) only owns
connections: it asks an L{Attempt} for a session and for decisions, and
C{tls explain} (L{twisted_mta.tls.probe}) runs the same steps with
C{dry_run}.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet import defer, endpoints, error
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta import failures
from twisted_mta.config import DNSSettings, OutboundSettings
from twisted_mta.metrics import notify
from twisted_mta.model import Outcome
from twisted_mta.outbound import mx
from twisted_mta.outbound.client import OutboundClient, SessionFailed, Timeouts, Transaction
from twisted_mta.outbound.router import NextHop, ascii_domain
from twisted_mta.tls import fallback as fb
from twisted_mta.config import is_ip
from twisted_mta.tls import dnssec as dnssec_status, published as pub
from twisted_mta.tls.engine import TLSEngine
from twisted_mta.tls.failure import TLSFailure
from twisted_mta.tls.policy import Choice
from twisted_mta.tls.published import Published
from twisted_mta.tls.sts import lookup_sts_txt
from twisted_mta.tls.handshake import PolicyCreator, shadow_verdict
from twisted_mta.tls.history import TLSHistory, _day
from twisted_mta.tlsrpt import events as tlsrpt

log = Logger()


class DNSResolver:
    """
    Blocking MX and address look-ups (call through the I/O pool).
    """

    def __init__(self, settings: DNSSettings) -> None:
        self._resolver = mx.make_resolver(settings.nameservers or None, settings.timeout,
                                          settings.cache_ttl)

    def mx(self, domain: str) -> list[mx.MXHost]:
        return mx.lookup_mx(self._resolver, domain)

    def addresses(self, host: str) -> list[str]:
        return mx.lookup_addresses(self._resolver, host)

    def sts_txt(self, domain: str) -> list[bytes]:
        """The C{_mta-sts.<domain>} TXT records (MTA-STS discovery)."""
        return lookup_sts_txt(self._resolver, domain)


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


@attrs.define
class AttemptContext:
    """
    What every attempt needs: the settings, the TLS engine and history,
    DNS, the way to connect, the clock, and who we are.
    """

    settings: OutboundSettings
    hostname: str
    clock: object
    run_blocking: Callable
    resolver: object
    connect: Callable
    tls: TLSEngine
    history: TLSHistory | None = None
    published: Published | None = None  # DANE and MTA-STS look-ups (None: both off)
    # Called with (event name, dict) for shadow verdicts and TLS outcomes:
    # the shadow report file, metrics.
    observers: list = attrs.field(factory=list)

    @property
    def helo(self) -> str:
        return self.settings.helo_name or self.hostname

    @property
    def own_names(self) -> frozenset[str]:
        return frozenset({self.hostname, self.helo})

    @property
    def timeouts(self) -> Timeouts:
        s = self.settings
        return Timeouts(handshake=s.handshake_timeout, greeting=s.greeting_timeout,
                        command=s.command_timeout, data=s.data_timeout)

    def notify(self, name: str, event: dict) -> None:
        notify(self.observers, name, event, log, "outbound.error")


@attrs.frozen
class HostPlan:
    """
    One host of a next hop, ready to try: its addresses and the policy
    chosen for it, with what it publishes (C{facts}); or why it cannot be
    used (C{error}), or the TLS failure that rules it out before any
    connection (C{failure}).
    """

    host: str
    preference: int | None
    port: int
    addresses: tuple[str, ...]
    choice: Choice
    facts: pub.Facts | None = None
    error: Outcome | None = None
    failure: TLSFailure | None = None


def sts_words(facts: pub.Facts) -> str:
    """
    "of example.org (mx: mail.example.org, *.mx.example.org)".
    """
    policy = facts.sts.policy
    return f"of {facts.domain} (mx: {', '.join(policy.mx) or 'none'})"


# The connections a destination opens close together (a burst of queued
# messages) share one set of look-ups: MX, addresses, TLSA, the MTA-STS
# TXT record.  Without it each connection repeats them all, and with DANE
# and MTA-STS on that costs a third of the delivery rate
# (docs/benchmarks.md, "DANE and MTA-STS: look-up cost").
SHARE_LOOKUPS = 10.0  # seconds a result is reused after it arrived


class _Shared:
    """
    Results of look-ups, by key, shared by every caller while in flight
    and for L{SHARE_LOOKUPS} seconds after; a failure is handed to those
    waiting and then forgotten (the next caller asks again).
    """

    def __init__(self) -> None:
        self._entries: dict[tuple, _SharedEntry] = {}

    def get(self, key: tuple, clock, make: Callable[[], defer.Deferred]) -> defer.Deferred:
        entry = self._entries.get(key)
        if entry is None or not (entry.pending or clock.seconds() < entry.until):
            entry = self._entries[key] = _SharedEntry()
            d = defer.maybeDeferred(make)
            d.addBoth(self._done, key, entry, clock)
        return entry.wait()

    def clear(self) -> None:
        """Forget every result (those in flight still reach their waiters)."""
        self._entries.clear()

    def _done(self, result, key: tuple, entry: _SharedEntry, clock) -> None:
        entry.pending = False
        if isinstance(result, Failure):
            if self._entries.get(key) is entry:
                del self._entries[key]
        else:
            entry.result, entry.until = result, clock.seconds() + SHARE_LOOKUPS
        waiters, entry.waiters = entry.waiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)


class _SharedEntry:
    def __init__(self) -> None:
        self.pending = True
        self.result = None
        self.until = 0.0
        self.waiters: list[defer.Deferred] = []

    def wait(self) -> defer.Deferred:
        if not self.pending:
            return defer.succeed(self.result)
        d = defer.Deferred()
        self.waiters.append(d)
        return d


@attrs.frozen
class Attempt:
    """
    The steps of reaching C{hop}, with C{ctx}; one per destination of the
    pool (and one per C{tls explain}).
    """

    ctx: AttemptContext
    hop: NextHop
    shared: _Shared = attrs.field(factory=_Shared, eq=False, repr=False)

    @property
    def history(self) -> TLSHistory | None:
        return self.ctx.history

    def hosts(self) -> defer.Deferred:
        """
        L{look_up_hosts}, shared by the connections opened close together.
        """
        return self.shared.get(("hosts",), self.ctx.clock, self.look_up_hosts)

    def host_plan(self, record: mx.MXHost, port: int, mx_facts, sts) -> defer.Deferred:
        """
        L{plan_host}, shared by the connections opened close together.
        """
        return self.shared.get(("host", record.name, port), self.ctx.clock,
                               lambda: self.plan_host(record, port, mx_facts, sts))

    @defer.inlineCallbacks
    def look_up_hosts(self):
        """
        Where C{hop} goes: C{(records, port, mx, sts)}, the MX hosts to
        try (or the smarthost) as L{mx.MXHost}, the port, the DNSSEC-aware
        MX answer when DANE is on, and the domain's MTA-STS answer.  One
        MX look-up feeds both the MX rules and DANE.  Fails with
        L{SessionFailed} when there is nowhere to go.
        """
        hop, ctx = self.hop, self.ctx
        if hop.smarthost is not None:
            return [mx.MXHost(0, hop.smarthost.host)], hop.smarthost.port, None, None
        # "TLS-Required: No" (RFC 8689 4.2.2): what the recipient publishes
        # (DANE, MTA-STS) is not asked for, so it cannot hold the message.
        published = ctx.published if not hop.tls_required_no else None
        dane = published is not None and (yield published.dane_enabled())
        sts = published.sts(hop.domain) if published is not None else defer.succeed(None)
        sts.addErrback(self._sts_failed)
        facts = None
        try:
            if dane:
                facts = yield ctx.published.mx(hop.domain)
                records = mx.from_dnssec(facts.result, hop.domain)
            else:
                records = yield ctx.run_blocking(ctx.resolver.mx, hop.domain)
        except mx.MXError as e:
            raise SessionFailed(e.outcome, next_host=False)
        records = self.without_self(records)
        return records, ctx.settings.port, facts, (yield sts)

    def _sts_failed(self, failure) -> None:
        log.failure("outbound: MTA-STS look-up for {domain} failed", failure,
                    domain=self.hop.domain, event="outbound.error")
        return None

    @defer.inlineCallbacks
    def plan_host(self, record: mx.MXHost, port: int, mx_facts, sts):
        """
        One host's L{HostPlan}: its addresses and the policy for it (an
        explicit entry, else what it publishes: DANE, then MTA-STS, else
        the default), or why it cannot be used: no address, or a refusal
        before any connection (DANE records that could not be looked up,
        an MX host that an enforced MTA-STS policy does not list).
        """
        hop, ctx = self.hop, self.ctx
        host = record.name
        facts_host = pub.Host(host, port, pub.OFF, "")
        error = None
        addresses: tuple[str, ...] = ()
        if is_ip(host):
            addresses = (host,)
        elif mx_facts is not None:
            facts_host = yield ctx.published.host(host, port, mx_facts)
            found = facts_host.addresses
            addresses = found.addresses
            if found.status == dnssec_status.ERROR:
                error = failures.outcome("dns-temp", domain=host, why=found.reason or "failed")
            elif found.status == dnssec_status.BOGUS:
                error = failures.outcome("dns-temp", domain=host, why="its addresses failed "
                                         f"DNSSEC validation ({found.reason})")
        else:
            try:
                addresses = tuple((yield ctx.run_blocking(ctx.resolver.addresses, host)))
            except mx.MXError as e:
                error = e.outcome
        facts = None
        if hop.smarthost is None and ctx.published is not None and not hop.tls_required_no:
            if mx_facts is None:
                facts_host = attrs.evolve(facts_host, why="DANE is off: " +
                                          ctx.published.dane_state.reason)
            facts = pub.Facts(hop.domain, mx_facts, facts_host, sts)
        choice = ctx.tls.choose(hop.domain, host, hop.smarthost, facts)
        if hop.requiretls:
            choice = requiretls_choice(choice)
        plan = HostPlan(host, record.preference, port, addresses, choice, facts, error)
        refused = self.refusal(plan)
        if refused is not None:
            return attrs.evolve(plan, failure=refused, error=None)
        if hop.requiretls and hop.smarthost is None and error is None:
            unvalidated = mx_unvalidated(hop.domain, host, mx_facts, sts)
            if unvalidated is not None:
                return attrs.evolve(plan, error=failures.outcome(
                    "requiretls-mx-unvalidated", remote_mta=host, domain=hop.domain,
                    why=unvalidated))
        if error is None and not addresses:
            plan = attrs.evolve(plan, error=failures.outcome("no-address", host=host))
        return plan

    def refusal(self, plan: HostPlan) -> TLSFailure | None:
        """
        The TLS failure that rules a host out before any connection, when
        what it publishes decided its policy: DANE records that could not
        be looked up (bogus or failed: RFC 7672 2.2 says wait), an MX host
        that the domain's enforced MTA-STS policy does not list (RFC 8461
        4.1 says never deliver to it).
        """
        choice, host = plan.choice, plan.host
        address = plan.addresses[0] if plan.addresses else ""
        if choice.source == "dane" and plan.facts.host.dane == pub.DEFER:
            h = plan.facts.host
            return TLSFailure(h.failure_kind, host=host, address=address, port=plan.port,
                              detail=h.why, names=h.names)
        if choice.source == "mta-sts":
            policy = plan.facts.sts.policy
            if not policy.matches(host):
                return TLSFailure("sts-mx-mismatch", host=host, address=address,
                                  port=plan.port, sts=sts_words(plan.facts))
        return None

    @defer.inlineCallbacks
    def open(self, relax: bool = False):
        """
        A ready session for C{hop}: each host in order, each address in
        turn.  Fails with the most telling failure: a TLS failure (which
        the fallback decider then weighs per message) over the rest.
        """
        records, port, mx_facts, sts = yield self.hosts()
        last: Outcome | None = None
        tls_failed: SessionFailed | None = None
        # For REQUIRETLS: a host not reached (it may be later) and a host
        # that fails the REQUIRETLS checks (it will not be, by itself).
        unreached: Outcome | None = None
        refused: Outcome | None = None
        for record in records:
            plan = yield self.host_plan(record, port, mx_facts, sts)
            if plan.failure is not None:
                e = SessionFailed(failures.tls(plan.failure), tls_failure=plan.failure)
                e.choice = plan.choice
                self.log_refusal(plan)
                last, tls_failed = e.outcome, e
                continue
            if plan.error is not None:
                last = plan.error
                if plan.error.kind in failures.REQUIRETLS_KINDS:
                    refused = refused or plan.error
                    self.log_requiretls(plan.host, plan.error)
                elif failures.is_temporary(plan.error):
                    unreached = unreached or plan.error
                continue
            choice, note = self.with_history(plan.choice)
            if hop_tag := self.hop.tag:
                note = f"{hop_tag}; {note}" if note else hop_tag
            if relax and choice.source not in ("dane", "mta-sts") and not self.hop.requiretls:
                # An operator's relaxed retry never undoes what the
                # destination publishes (DANE keeps its records; MTA-STS
                # keeps the check).
                req = attrs.evolve(choice.requirements, starttls="required", verify=False)
                choice, note = attrs.evolve(choice, requirements=req), "override=relaxed"
            for address in plan.addresses:
                try:
                    client = yield self.session(plan.host, address, port, choice, note=note)
                except SessionFailed as e:
                    last = e.outcome
                    if e.tls_failure is not None:
                        e.choice = choice
                        tls_failed = e
                    elif e.outcome.kind in failures.REQUIRETLS_KINDS:
                        refused = refused or e.outcome
                        self.log_requiretls(plan.host, e.outcome)
                    elif failures.is_temporary(e.outcome):
                        unreached = unreached or e.outcome
                    if not e.next_host:
                        raise
                    continue
                return client
        if self.hop.requiretls:
            raise requiretls_failure(unreached, refused, tls_failed, last, self.hop.key)
        if tls_failed is not None:
            raise tls_failed
        raise SessionFailed(last or failures.outcome("no-mail-server",
                                                     destination=self.hop.key))

    def log_requiretls(self, host: str, outcome: Outcome) -> None:
        log.info("outbound: {host} not used for {domain}: {why}", host=host,
                 domain=self.hop.domain or self.hop.key, why=outcome.text, kind=outcome.kind,
                 event="outbound.requiretls_refused")
        self.ctx.notify("tls.requiretls_refused", {"kind": outcome.kind,
                                                   "domain": self.hop.domain or self.hop.key})

    def log_refusal(self, plan: HostPlan) -> None:
        f = plan.failure
        log.info("outbound: {host} not used for {domain}: {why}", host=plan.host,
                 domain=self.hop.domain, why=f.describe(), kind=f.kind,
                 source=plan.choice.source, event="outbound.host_refused")
        self.report_tls(plan.choice, None, plan.host, plan.failure.address or None,
                        failure=plan.failure)

    def with_history(self, choice):
        """
        What the destination's history changes: the ratchet raises the
        requirements to the best TLS it has shown; remembered broken TLS
        skips STARTTLS where the policy would send in cleartext anyway.
        """
        hop = self.hop
        if self.history is None or hop.smarthost is not None or \
                choice.source in ("dane", "mta-sts") or hop.tls_required_no:
            # DANE and MTA-STS require more already; the ratchet stands in for
            # a policy the recipient never published, which "TLS-Required: No"
            # sets aside like a published one.
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

    def situation(self, failure, choice, txn: Transaction) -> fb.Situation:
        hop = self.hop
        sh = hop.smarthost
        relay = self.ctx.settings.tls.relay
        return fb.Situation(
            destination=fb.Destination(domain_of(txn, hop), failure.host, sh is not None),
            requirements=choice.requirements, age=txn.age, attempts=txn.attempts,
            tls_failures=txn.tls_failures,
            implicit_tls=sh is not None and sh.tls == "implicit",
            credentials=sh is not None and sh.username is not None,
            requiretls=hop.requiretls, relay=relay.destination if relay else None,
            history=self.history.get(hop.domain) if self.history and hop.domain else None,
            ratchet=choice.ratcheted, dane=choice.dane, sts=choice.sts_enforced)

    def decide(self, e: SessionFailed, txn: Transaction, dry_run: bool = False):
        """
        What follows a TLS failure for one message: the fallback decider's
        answer after the hard rules (logged and counted, unless
        C{dry_run}), and for a deferral the recipients' outcome (the
        failure explained).
        """
        hop, failure, choice = self.hop, e.tls_failure, e.choice
        situation = self.situation(failure, choice, txn)
        if txn.tls_override == "cleartext":
            decision = fb.decide(_OperatorOverride(), failure, situation)
        else:
            decision = fb.decide(self.ctx.tls.decider(choice.fallback), failure, situation)
        if not dry_run:
            self.log_decision(e, txn, decision)
        outcome = None
        if decision.action == fb.DEFER and hop.requiretls:
            # RFC 8689 4.2.1: no MX left that meets the requirements: not
            # sent, and the sender is told (a permanent failure, 5.7.10).
            outcome = failures.outcome("requiretls-no-tls", remote_mta=failure.host,
                                       why=failure.describe())
            if not dry_run:
                self.log_requiretls(failure.host, outcome)
        elif decision.action == fb.DEFER:
            outcome = self.ctx.tls.outcome(failure, choice, domain_of(txn, hop), decision,
                                           situation)
        return decision, outcome

    def log_decision(self, e: SessionFailed, txn: Transaction, decision) -> None:
        hop, failure, choice = self.hop, e.tls_failure, e.choice
        log.info("outbound: TLS to {peer} failed ({kind}); policy {policy} "
                 "({why}), fallback {decider}: {action} ({reason})",
                 event="outbound.tls_decision", destination=hop.key, host=failure.host,
                 address=failure.address, peer=failure.peer, kind=failure.kind,
                 detail=failure.detail, policy=choice.requirements.policy,
                 why=choice.reason, decider=decision.decider, action=decision.action,
                 rule=decision.rule, later=decision.later, reason=decision.reason,
                 source=choice.source, queue_ids=txn.queue_id)
        self.ctx.notify("tls.decision", {
            "kind": failure.kind, "domain": hop.domain or hop.key,
            "policy": choice.requirements.policy, "action": decision.action,
            "decider": decision.decider, "source": choice.source})

    @defer.inlineCallbacks
    def open_fallback(self, mode: tuple):
        """
        A session for a fallback destination: the same server without TLS
        or without certificate checks, or the secure relay under its own
        policy.
        """
        action, failure, choice, note = mode
        if action == fb.VIA_RELAY:
            relay = self.hop.smarthost
            relay_choice = self.ctx.tls.choose("", relay.host, relay)  # the relay's own policy
            host = relay.host
            try:
                addresses = [host] if is_ip(host) else (
                    yield self.ctx.run_blocking(self.ctx.resolver.addresses, host))
            except mx.MXError as e:
                raise SessionFailed(e.outcome)
            if not addresses:
                raise SessionFailed(failures.outcome("relay-no-address", host=host))
            client = yield self.session(host, addresses[0], relay.port,
                                         relay_choice, note=note)
        else:
            req = choice.requirements
            changed = (attrs.evolve(req, starttls="never", verify=False)
                       if action == fb.CLEARTEXT else attrs.evolve(req, verify=False))
            client = yield self.session(failure.host, failure.address, failure.port,
                                         attrs.evolve(choice, requirements=changed), note=note)
        return client

    def without_self(self, records: list[mx.MXHost]) -> list[mx.MXHost]:
        """
        The MX hosts to try: those more preferred than ourselves, when we
        are one of them (RFC 5321 5.1); a loop when we are the best.
        """
        domain = self.hop.domain
        ours = [r.preference for r in records if r.name in self.ctx.own_names]
        if ours:
            records = [r for r in records if r.preference < min(ours)]
            if not records:
                raise SessionFailed(failures.outcome(
                    "loop", why=f"mail for {domain} loops back to myself: its best MX host "
                    f"is this server ({self.ctx.hostname})"), next_host=False)
        return records



    @defer.inlineCallbacks
    def session(self, host: str, address: str, port: int, choice, note: str | None = None,
                dry_run: bool = False):
        """
        A ready session with one server under C{choice}: connect, greeting,
        EHLO, STARTTLS (judged at once), AUTH.  C{dry_run} (tls explain):
        nothing is recorded (history, shadow, metrics).
        """
        hop = self.hop
        sh = hop.smarthost
        implicit = sh is not None and sh.tls == "implicit"
        req = choice.requirements
        credentials = None
        if sh is not None and sh.username is not None:
            try:
                password = yield self.ctx.run_blocking(_read_secret, sh.password_file)
            except OSError as e:
                raise SessionFailed(failures.outcome(
                    "secret-unreadable", destination=sh.destination, why=e.strerror),
                    next_host=False)
            credentials = (sh.username, password)
        if implicit and req.starttls == "never":
            req = attrs.evolve(req, starttls="required")  # TLS from the first byte, always
        creator = PolicyCreator(req, host) if req.starttls != "never" else None
        client = OutboundClient(
            helo=self.ctx.helo, host=host, address=address, port=port,
            tls=creator, requirements=req, credentials=credentials,
            own_names=self.ctx.own_names, timeouts=self.ctx.timeouts, run_blocking=self.ctx.run_blocking,
            requiretls=hop.requiretls,
            chunk_size=self.ctx.settings.chunk_size if self.ctx.settings.chunking else None)
        client.callLater = self.ctx.clock.callLater
        try:
            yield self.ctx.connect(address, port, client, creator if implicit else None)
        except (error.ConnectError, error.TimeoutError, OSError) as e:
            raise SessionFailed(failures.outcome("connect-failed", remote_mta=host,
                                                 peer=client.peer, why=_connect_reason(e)))
        try:
            client = yield client.established
        except SessionFailed as e:
            if e.tls_failure is not None and not dry_run:
                self.report_tls(choice, note, host, address, failure=e.tls_failure,
                                client=client)
            raise
        if hop.requiretls and not (creator and client.tls_done and creator.record.verified):
            # The policy checks failed to demand it (a DANE RRset with no
            # usable record authenticates nothing): REQUIRETLS still does.
            client.quit()
            why = (creator.record.unverified_reason if creator and client.tls_done
                   else "no TLS") or "not verified"
            raise SessionFailed(failures.outcome(
                "requiretls-no-tls", remote_mta=host,
                why=f"the certificate of {client.peer} was not authenticated ({why})"))
        tls_text = creator.record.describe() if creator and client.tls_done else "no TLS"
        if dry_run:
            return client
        verdict = None
        if choice.shadow is not None and note is None:
            verdict = self.shadow(choice, creator, client)
        self.report_tls(choice, note, host, address, client=client, tls=bool(
            creator and client.tls_done), starttls=req.starttls,
            failure=verdict if tlsrpt.testing_sts(choice) else None)
        if self.history is not None and hop.smarthost is None and not (
                note or "").startswith(("fallback", "override")):
            level = ("none" if not (creator and client.tls_done) else
                     "verified" if creator.record.verified else "encrypted")
            self.history.record_success(hop.domain, level)
        self.ctx.notify("tls.session", {
            "version": creator.record.version if creator and client.tls_done else None,
            "verified": bool(creator and client.tls_done and creator.record.verified),
            "policy": req.policy, "peer": client.peer, "source": choice.source})
        client.trace = (f"X-Twisted-MTA-TLS: {client.peer} {tls_text}; policy {req.policy} "
                        f"({choice.reason})" + (f"; {note}" if note else ""))
        dane = creator.record.dane if creator is not None and client.tls_done else None
        log.info("outbound: session with {peer} ({tls}; policy {policy} from {why}{note})",
                 event="outbound.connected", peer=client.peer, tls=tls_text,
                 policy=req.policy, why=choice.reason, note=f"; {note}" if note else "",
                 source=choice.source, dane=dane.status if dane is not None else None,
                 destination=hop.key, verified=bool(creator and creator.record.verified),
                 version=creator.record.version if creator else None,
                 cipher=creator.record.cipher if creator else None,
                 chunking=client.chunking)
        return client


    def report_tls(self, choice, note: str | None, host: str, address: str | None, *,
                   failure: TLSFailure | None = None, client=None, tls: bool = False,
                   starttls: str = "required") -> None:
        """
        Tell the observers (TLS reporting) how a TLS session with a
        recipient domain's host went (L{tlsrpt.result}); not for smarthosts
        and routes, "TLS-Required: No" mail, nor sessions of a fallback,
        an operator's override or skipped TLS (their first failure counted).
        """
        hop = self.hop
        if hop.smarthost is not None or not hop.domain or hop.tls_required_no or \
                any(w in (note or "") for w in ("fallback", "override", "tls-skipped")):
            return
        event = tlsrpt.result(
            hop.domain, choice, self.ctx.clock.seconds(), failure=failure, host=host,
            address=address, local=getattr(client, "local_address", None),
            helo=getattr(client, "server_name", None), tls=tls, starttls=starttls)
        if event is not None:
            self.ctx.notify(tlsrpt.EVENT, event)

    def shadow(self, choice, creator, client) -> TLSFailure | None:
        hop = self.hop
        verdict = None
        facts = choice.published
        lookup = facts.sts if facts is not None else None
        if lookup is not None and lookup.policy is not None and lookup.mode == "testing" and \
                not lookup.policy.matches(client.host):
            verdict = TLSFailure("sts-mx-mismatch", host=client.host, address=client.address,
                                 port=client.port, sts=sts_words(facts))
        if verdict is None:
            verdict = shadow_verdict(choice.shadow, creator, client.tls_done,
                                     client.capabilities, client.host, client.address,
                                     client.port)
        if verdict is None:
            return None
        event = {"time": self.ctx.clock.seconds(), "domain": hop.domain or hop.key,
                 "host": client.host, "address": client.address, "port": client.port,
                 "policy": choice.requirements.policy, "shadow": choice.shadow.policy,
                 "why": choice.reason, "kind": verdict.kind, "detail": verdict.detail,
                 "reason": verdict.describe()}
        log.info("outbound: {shadow} (shadow) would refuse {host}[{address}] for {domain}: "
                 "{reason}", event="tls.shadow", **event)
        self.ctx.notify("tls.shadow", event)
        return verdict


def requiretls_choice(choice: Choice) -> Choice:
    """
    The policy raised for a REQUIRETLS message (RFC 8689 4.2.1): STARTTLS
    required and the certificate authenticated, by DANE where the server
    publishes TLSA records, else by the WebPKI for the MX host's name.
    """
    req = choice.requirements
    raised = attrs.evolve(req, starttls="required", verify=req.verify or req.tlsa is None)
    return attrs.evolve(choice, requirements=raised,
                        reason=f"{choice.reason}; raised by REQUIRETLS (verified TLS)")


def mx_unvalidated(domain: str, host: str, mx_facts, sts) -> str | None:
    """
    Why C{host} is not a validated MX host of C{domain} for REQUIRETLS
    (RFC 8689 4.2.1), or None when it is: the MX answer was DNSSEC-secure,
    or the domain's MTA-STS policy lists the host.  Any mode with a policy
    (enforce or testing) counts: the MX check of RFC 8461 4.1 is the same
    in both, only what a failure does differs, and here REQUIRETLS says
    what a failure does.  Mode none has no policy (RFC 8461 5).
    """
    if mx_facts is not None and mx_facts.secure:
        return None
    policy = sts.policy if sts is not None else None
    if policy is not None and policy.mode in ("enforce", "testing") and policy.matches(host):
        return None
    dns = ("DNSSEC validation is off here (DANE is off)" if mx_facts is None
           else f"the MX answer of {domain} is not DNSSEC-signed")
    if sts is None:
        words = "MTA-STS is off here"
    elif policy is None:
        words = f"{domain} has no MTA-STS policy in force"
    elif policy.mode not in ("enforce", "testing"):
        words = f"the MTA-STS policy of {domain} is in mode {policy.mode}"
    else:
        words = f"the MTA-STS policy of {domain} does not list {host}"
    return f"{dns}, and {words}"


def requiretls_failure(unreached: Outcome | None, refused: Outcome | None,
                       tls_failed: SessionFailed | None, last: Outcome | None,
                       destination: str = "") -> SessionFailed:
    """
    The end of a REQUIRETLS attempt in which no host served: a host that
    could not be reached may be later (the message waits, as any other);
    otherwise the REQUIRETLS failure, which no later attempt changes: a
    server without REQUIRETLS or an MX that nothing validates (5.7.30), or
    no verified TLS (the TLS failure goes through the fallback decider,
    whose hard rule makes it 5.7.10).
    """
    if unreached is not None:
        return SessionFailed(unreached)
    if refused is not None:
        return SessionFailed(refused)
    if tls_failed is not None:
        return tls_failed
    return SessionFailed(last or failures.outcome("no-mail-server", destination=destination))


@attrs.frozen
class _OperatorOverride:
    name: str = "operator-override"

    def decide(self, failure, situation) -> fb.Decision:
        return fb.Decision(fb.CLEARTEXT, "the operator allowed cleartext for this message "
                           "(twisted-mta queue release/flush --allow-cleartext)", self.name)


def domain_of(txn: Transaction, hop: NextHop) -> str:
    """
    The recipient domain of a transaction: a smarthost destination carries
    the mail of every domain whose TLS policy there is the same.
    """
    if txn.recipients:  # a UTF-8 domain (SMTPUTF8) as its A-label, as policies name it
        return ascii_domain(txn.recipients[0].rpartition("@")[2])
    return hop.domain


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
