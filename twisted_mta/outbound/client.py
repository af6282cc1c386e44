"""
The outbound ESMTP client: one connection to one server, carrying one or
more mail transactions.

A subclass of Twisted's C{ESMTPClient}: Twisted reads the replies, says
EHLO (falling back to HELO), starts TLS and authenticates.  We take over
where Twisted's single-message model stops fitting an MTA:

 - the EHLO capabilities are kept (Twisted throws them away), so MAIL can
   carry SIZE= and BODY=, and RCPTs can be pipelined (RFC 2920);
 - after STARTTLS's 220 the line buffer is emptied, so cleartext injected
   behind the 220 is never read as the encrypted server's reply;
 - the body is dot-stuffed statefully (L{twisted_mta.outbound.message}),
   or sent unstuffed in counted BDAT chunks (RFC 3030) when the server
   offers CHUNKING, pipelined behind MAIL and RCPT when it offers
   PIPELINING (Twisted has no BDAT);
 - each recipient gets its own outcome, and a connection stays open for
   the next message instead of RSET + QUIT;
 - every failure, before or during a transaction, becomes an L{Outcome}
   that names the server and quotes its words; credentials are never
   logged (C{debug} is off, so Twisted keeps no transcript).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import attrs
from twisted.internet import defer, error, interfaces
from twisted.mail import smtp
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta import failures
from twisted_mta.address import ascii_address
from twisted_mta.downgrade import DowngradeRefused
from twisted_mta.dsn.params import utf8_addr_xtext, xtext_encode
from twisted_mta.outbound import message as outgoing
from twisted_mta.outbound.message import OutgoingMessage
from twisted_mta.tls.dane import DaneVerdict
from twisted_mta.tls.handshake import PolicyCreator, evaluate
from twisted_mta.tls.failure import TLSFailure, classify_handshake_error
from twisted_mta.tls.policy import TLSRequirements
from twisted_mta.model import EnvelopeError, Outcome
from twisted_mta.transport import write_now

log = Logger()



@attrs.frozen
class Timeouts:
    greeting: float = 300
    command: float = 300
    data: float = 600
    handshake: float = 300  # the TLS handshake, after STARTTLS's 220 or on connect


@attrs.frozen
class Transaction:
    sender: str
    recipients: tuple[str, ...]
    message: OutgoingMessage
    # DSN requests (RFC 3461), passed on when the server supports DSN:
    dsn: tuple[tuple[tuple[str, ...] | None, str | None], ...] = ()  # (NOTIFY, ORCPT) each
    ret: str | None = None
    envid: str | None = None
    # What the fallback decider may weigh:
    queue_id: str = ""
    age: float = 0.0
    attempts: int = 0
    tls_failures: int = 0
    tls_override: str | None = None  # the operator's one-shot "relaxed" or "cleartext"
    requiretls: bool = False  # RFC 8689: MAIL FROM carries REQUIRETLS
    smtputf8: bool = False  # RFC 6531: received with SMTPUTF8 (UTF-8 addresses or header)


class SessionFailed(Exception):
    """
    The session could not be set up (or broke before a transaction);
    C{outcome} says why, for every recipient that was waiting for it.
    C{tls_failure} is set when TLS was the problem (the fallback decider
    then says what may happen next); C{next_host} says whether another
    address or MX host may do better.
    """

    def __init__(self, outcome: Outcome, *, tls_failure: TLSFailure | None = None,
                 next_host: bool = True) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome
        self.tls_failure = tls_failure
        self.next_host = next_host
        self.tls_record = None  # what a completed handshake showed, if one did

    @property
    def tls_failed(self) -> bool:
        return self.tls_failure is not None


reply_outcome = failures.reply  # the server's words, classified once (twisted_mta.failures)


@implementer(interfaces.IHandshakeListener)
class OutboundClient(smtp.ESMTPClient):
    debug = False  # no transcript: it would hold the AUTH secret
    heloFallback = True

    def __init__(self, *, helo: str, host: str, address: str, port: int,
                 tls: PolicyCreator | None = None,
                 requirements: TLSRequirements = TLSRequirements("none", starttls="never"),
                 credentials: tuple[str, str] | None = None,
                 own_names: frozenset[str] = frozenset(), timeouts: Timeouts = Timeouts(),
                 run_blocking: Callable | None = None, requiretls: bool = False,
                 chunk_size: int | None = None) -> None:
        secret = credentials[1].encode("utf-8") if credentials else None
        starttls = tls if requirements.starttls != "never" else None
        smtp.ESMTPClient.__init__(self, secret, starttls, helo)
        if credentials:
            user = credentials[0].encode("utf-8")
            self.registerAuthenticator(smtp.PLAINAuthenticator(user))
            self.registerAuthenticator(smtp.LOGINAuthenticator(user))
            self.requireAuthentication = True
        self.host, self.address, self.port = host, address, port
        self.peer = f"{host}[{address}]:{port}"  # for messages
        self.tls = tls
        self.requirements = requirements
        self.requireTransportSecurity = requirements.requires_tls or credentials is not None
        self.trace: str | None = None  # a header line to prepend to each message
        self.own_names = own_names
        self.timeouts = timeouts
        self.run_blocking = run_blocking
        # RFC 8689 4.2.1: the EHLO inside TLS must list REQUIRETLS, or this
        # session is not for REQUIRETLS mail.
        self.requiretls = requiretls
        self.chunk_size = chunk_size  # None: never BDAT
        self.capabilities: dict[str, str] = {}
        self.local_address: str | None = None
        self.server_name: str | None = None
        self.established: defer.Deferred = defer.Deferred()
        self.closed: defer.Deferred = defer.Deferred()
        self.ready = False
        self.tls_started = False  # STARTTLS accepted or implicit TLS
        self.implicit = False  # TLS from the first byte
        self.tls_done = False  # handshake completed
        self.messages = 0
        self._failure: SessionFailed | None = None
        self._txn: _TransactionState | None = None
        self._needs_rset = False
        self._quitting = False
        self._lost = False

    # -- session set-up (Twisted drives; we watch) --------------------------------

    def connectionMade(self) -> None:
        smtp.ESMTPClient.connectionMade(self)
        # For TLS reporting (RFC 8460 sending-mta-ip): gone once closed.
        self.local_address = getattr(self.transport.getHost(), "host", None)
        self.tls_started = self.implicit = self._tlsMode
        self._failresponse = self._greeting_failed
        # Implicit TLS: the handshake comes before the greeting.
        self.setTimeout(self.timeouts.handshake if self.implicit else self.timeouts.greeting)

    def _greeting_failed(self, code: int, resp: bytes) -> None:
        self._fail(SessionFailed(reply_outcome(self.peer, "the initial greeting", code, resp)))

    def esmtpState_ehlo(self, code, resp):
        self.setTimeout(self.timeouts.command)
        return smtp.ESMTPClient.esmtpState_ehlo(self, code, resp)

    def esmtpEHLORequired(self, code=-1, resp=None):
        self._fail(SessionFailed(failures.outcome("esmtp-required", remote_mta=self._remote(),
                                                  peer=self.peer)))

    def esmtpState_serverConfig(self, code, resp):
        lines = resp.splitlines()
        caps: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.decode("ascii", "replace").partition(" ")
            caps[name.upper()] = value.strip()
        self.capabilities = caps
        if lines and not self.server_name:  # the name in the EHLO reply (RFC 8460 -helo)
            self.server_name = lines[0].split(b" ", 1)[0].decode("ascii", "replace") or None
        if self._loops_back(lines[0] if lines else b""):
            return
        if self.requiretls and self._tlsMode and "REQUIRETLS" not in caps:
            self._fail(SessionFailed(failures.outcome(
                "requiretls-unsupported", remote_mta=self._remote(), host=self.peer)))
            return
        items = {k.encode(): (v.encode() or None) for k, v in caps.items()}
        return self.tryTLS(code, resp, items)

    def smtpState_helo(self, code, resp):
        # HELO fallback: the server has no extensions.
        self.capabilities = {}
        smtp.SMTPClient.smtpState_helo(self, code, resp)
        self._failresponse = self._helo_failed

    def _helo_failed(self, code: int, resp: bytes) -> None:
        self._fail(SessionFailed(reply_outcome(self.peer, "HELO", code, resp)))

    def _loops_back(self, greeting: bytes) -> bool:
        name = greeting.split(b" ", 1)[0].decode("ascii", "replace").lower().rstrip(".")
        if name and name in self.own_names:
            self._fail(SessionFailed(failures.outcome(
                "loop", why=f"mail loops back to myself: {self.peer} greeted us with our own "
                f"name {name}"), next_host=False))
            return True
        return False

    def tryTLS(self, code, resp, items):
        if self._tlsMode or b"STARTTLS" in items and self.context:
            return smtp.ESMTPClient.tryTLS(self, code, resp, items)
        if self.requireTransportSecurity:
            if self.requirements.tlsa is not None:  # RFC 7672 2.2: never cleartext
                verdict = DaneVerdict.starttls_missing(self.requirements.tlsa)
                self._tls_failed(verdict.failure(self.host, self.address, self.port))
            else:
                self._tls_failed(self._tls_failure("starttls-not-offered"))
            return
        return self.authenticate(code, resp, items)

    def _tls_failure(self, kind: str, **facts) -> TLSFailure:
        if kind.startswith("handshake-"):
            facts.setdefault("versions",
                             f"{self.requirements.min_version or 'TLSv1.2'}-TLSv1.3")
        return TLSFailure(kind, host=self.host, address=self.address, port=self.port,
                          implicit=self.implicit, **facts)

    def _tls_failed(self, failure: TLSFailure, close: bool = False) -> None:
        e = SessionFailed(failures.tls(failure), tls_failure=failure)
        if self.tls is not None and self.tls_done:
            e.tls_record = self.tls.record
        self._fail(e, close=close)

    def esmtpTLSFailed(self, code=-1, resp=None):
        # A refusal is a TLS failure like any other: the fallback decider
        # says whether cleartext may follow (on a fresh connection).
        words = reply_outcome(self.peer, "STARTTLS", code, resp or b"").text
        said = words.partition(" said: ")[2].rpartition(" (in reply to")[0]
        self._tls_failed(self._tls_failure("starttls-refused", reply=said))

    def esmtpState_starttls(self, code, resp):
        # Anything behind the 220 was sent before encryption: never read it.
        self.clearLineBuffer()
        try:
            self.transport.startTLS(self.context)
        except Exception as e:
            self._tls_failed(self._tls_failure("handshake-failed", detail=str(e)), close=True)
            return
        self._tlsMode = True
        self.tls_started = True
        self.esmtpState_ehlo(code, resp)
        self.setTimeout(self.timeouts.handshake)  # EHLO waits behind the handshake

    def handshakeCompleted(self) -> None:
        self.tls_done = True
        self.setTimeout(self.timeouts.greeting if self.implicit and not self.capabilities
                        else self.timeouts.command)
        if self.tls is None:
            return
        self.tls.handshake_done(self.transport.getHandle())
        failure = evaluate(self.requirements, self.tls, self.host, self.address, self.port)
        if failure is not None:
            # Nothing but EHLO went out under this handshake: end it here.
            self._tls_failed(failure, close=True)

    def esmtpAUTHRequired(self, code=-1, resp=None):
        self._fail(SessionFailed(failures.outcome("auth-unavailable", remote_mta=self._remote(),
                                                  peer=self.peer)))

    def esmtpAUTHDeclined(self, code=-1, resp=None):
        outcome = reply_outcome(self.peer, "AUTH", code, resp or b"")
        self._fail(SessionFailed(attrs.evolve(
            outcome, text="our login was refused: " + outcome.text)))

    esmtpAUTHServerError = esmtpAUTHDeclined

    def smtpState_from(self, code, resp):
        """
        Twisted calls this when the session is set up; we are ready for
        transactions.
        """
        self._expected = range(0, 1000)
        self._okresponse = self._failresponse = self._reply
        if self._failure is not None:
            return
        self.ready = True
        self.setTimeout(None)
        self.established.callback(self)

    def sendError(self, exc):
        # Twisted's own errors (timeouts, unparsable replies, AUTH trouble).
        if isinstance(exc, smtp.SMTPTimeoutError) and self.tls_started and not self.tls_done:
            self._tls_failed(self._tls_failure("handshake-timeout", detail="timeout",
                                               waited=self.timeouts.handshake), close=True)
            return
        if isinstance(exc, smtp.SMTPTimeoutError):
            outcome = failures.outcome("timeout", remote_mta=self._remote(), peer=self.peer,
                                       stage=self._stage())
        elif isinstance(exc, smtp.SMTPClientError) and exc.code > 0:
            outcome = reply_outcome(self.peer, self._stage(), exc.code,
                                    exc.resp if isinstance(exc.resp, bytes)
                                    else str(exc.resp).encode())
        else:
            outcome = failures.outcome("protocol-error", remote_mta=self._remote(),
                                       peer=self.peer, why=f": {exc}")
        self._fail(SessionFailed(outcome), close=True)

    # -- failure handling ---------------------------------------------------------

    def _remote(self) -> str:
        return self.peer.split("[")[0]

    def _stage(self) -> str:
        if self._txn is not None:
            return self._txn.stage
        return "the session set-up" if not self.ready else "an idle connection"

    def _fail(self, failure: SessionFailed, close: bool = False) -> None:
        if self._failure is None:
            self._failure = failure
        if self._txn is not None:
            self._txn.abort(failure.outcome)
            self._txn = None
        if not self.established.called:
            self.established.errback(failure)
        if close or self._lost:
            self.transport.abortConnection() if hasattr(self.transport, "abortConnection") \
                else self.transport.loseConnection()
        else:
            self.quit()

    def quit(self) -> None:
        if self._quitting or self._lost:
            return
        self._quitting = True
        self.ready = False
        self._expected = range(0, 1000)
        self._okresponse = self._failresponse = self.smtpState_disconnect
        self.setTimeout(self.timeouts.command)
        self.sendLine(b"QUIT")

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:
        smtp.ESMTPClient.connectionLost(self, reason)
        self.ready = False
        self._lost = True
        if self.tls_started and not self.tls_done and self._failure is None:
            kind, detail = classify_handshake_error(reason)
            failure = self._tls_failure(kind, detail=detail)
            self._failure = SessionFailed(failures.tls(failure), tls_failure=failure)
        if self._failure is None and not self._quitting:
            stage = self._stage()
            self._failure = SessionFailed(failures.outcome(
                "connection-lost", remote_mta=self._remote(), peer=self.peer, stage=stage))
        if self._txn is not None:
            self._txn.abort(self._failure.outcome)
            self._txn = None
        if not self.established.called:
            self.established.errback(self._failure or SessionFailed(failures.outcome(
                "closed", remote_mta=self._remote(), peer=self.peer)))
        if not self.closed.called:
            self.closed.callback(None)

    # -- transactions -------------------------------------------------------------

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.capabilities

    @property
    def chunking(self) -> bool:
        """
        Whether messages go with BDAT on this session: we may and the
        server offers CHUNKING.
        """
        return bool(self.chunk_size) and "CHUNKING" in self.capabilities

    def send(self, txn: Transaction) -> defer.Deferred:
        """
        Run one mail transaction; fires with C{{recipient: Outcome}}, one
        entry per recipient, whatever happens (a broken connection gives
        the recipients still open a temporary outcome).
        """
        assert self.ready and self._txn is None
        self.messages += 1
        state = _TransactionState(self, txn)
        self._txn = state
        refusal = self._refuse(txn)
        if refusal is not None:
            state.abort(refusal)
            self._txn = None
            return state.done
        utf8 = txn.smtputf8 and "SMTPUTF8" in self.capabilities
        if txn.smtputf8 and not utf8:
            refusal = self._utf8_refusal(txn, state)
            if refusal is not None:
                state.abort(refusal)
                self._txn = None
                return state.done
        if txn.message.eight_bit and "8BITMIME" not in self.capabilities:
            # RFC 6152 3: convert to 7 bits (in the I/O pool) instead of bouncing.
            state.stage = "the 7-bit conversion"
            run = self.run_blocking or (lambda f, *a: defer.maybeDeferred(f, *a))
            d = run(outgoing.seven_bit, txn.message)
            d.addCallback(lambda m: self._begin(state, attrs.evolve(txn, message=m), utf8))
            d.addErrback(lambda f: self._conversion_failed(state, f))
            return state.done
        self._begin(state, txn, utf8)
        return state.done

    def _utf8_refusal(self, txn: Transaction, state: "_TransactionState") -> Outcome | None:
        """
        A message received with SMTPUTF8, for a server without it (RFC 6531
        3.2): an address whose local part is UTF-8 cannot go (5.6.7; a
        UTF-8 domain goes as its A-label), nor UTF-8 header fields (5.6.9).
        A recipient that cannot go gets its outcome in C{state}; the
        returned outcome (for all) when nothing can.
        """
        if ascii_address(txn.sender) is None:
            return failures.outcome("smtputf8-address", remote_mta=self._remote(),
                                    peer=self.peer, address=f"the sender <{txn.sender}>")
        if txn.message.header_eight_bit:
            return failures.outcome("smtputf8-header", remote_mta=self._remote(),
                                    peer=self.peer)
        for rcpt in txn.recipients:
            if ascii_address(rcpt) is None:
                state.results[rcpt] = failures.outcome(
                    "smtputf8-address", remote_mta=self._remote(), peer=self.peer,
                    address=f"the recipient <{rcpt}>")
        if len(state.results) == len(txn.recipients):
            return state.results[txn.recipients[0]]
        return None

    def _conversion_failed(self, state: "_TransactionState", failure: Failure) -> None:
        if state.finished:
            return
        if failure.check(DowngradeRefused):
            e = failure.value
            kind = "8bit-signed" if e.signed else "8bit-unconvertible"
            log.info("{queue_id}: not converted to 7 bits for {peer}: {why}",
                     event="outbound.downgrade-refused", queue_id=state.txn.queue_id,
                     peer=self.peer, reason=e.reason, why=e.words)
            outcome = failures.outcome(kind, remote_mta=self._remote(), peer=self.peer,
                                       why=e.words)
        elif failure.check(OSError, EnvelopeError):
            outcome = failures.outcome("message-unreadable", why=failure.getErrorMessage())
        else:  # a bug: its traceback, and the message waits for a fix
            log.failure("{queue_id}: converting to 7 bits for {peer} failed", failure,
                        event="outbound.error", queue_id=state.txn.queue_id, peer=self.peer,
                        destination=self.peer)
            outcome = failures.outcome("internal", why="could not convert the message to 7 "
                                                       f"bits: {failure.getErrorMessage()}")
        state.abort(outcome)

    def _begin(self, state: "_TransactionState", txn: Transaction, utf8: bool) -> None:
        """
        Send the transaction's commands (C{utf8}: with SMTPUTF8).
        """
        if state.finished:  # the connection broke while the message was converted
            return
        if state.txn.message is not txn.message:
            log.info("{queue_id}: converted to 7 bits for {peer} (no 8BITMIME), "
                     "{before} -> {after} octets", event="outbound.downgraded",
                     queue_id=txn.queue_id, peer=self.peer, before=state.txn.message.size,
                     after=txn.message.size)
        state.txn = txn
        state.stage = "MAIL FROM"
        params = []
        if "SIZE" in self.capabilities:
            extra = len(self.trace.encode("utf-8", "replace")) + 2 if self.trace else 0
            params.append(f"SIZE={txn.message.size + extra}")
        if txn.message.eight_bit:
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        dsn = "DSN" in self.capabilities
        if dsn and txn.ret:
            params.append(f"RET={txn.ret}")
        if dsn and txn.envid is not None:
            params.append(f"ENVID={xtext_encode(txn.envid)}")
        if txn.requiretls:
            params.append("REQUIRETLS")
        state.dsn_passed = dsn
        sender = txn.sender if utf8 else ascii_address(txn.sender)
        mail = ("MAIL FROM:<%s>" % sender + "".join(" " + p for p in params)).encode()
        commands: list[tuple[str, bytes, str | None]] = []
        if self._needs_rset:
            commands.append(("RSET", b"RSET", None))
            self._needs_rset = False
        commands.append(("MAIL", mail, None))
        requests = dict(zip(txn.recipients, txn.dsn))
        for rcpt in txn.recipients:
            if rcpt in state.results:  # refused already (a UTF-8 address, no SMTPUTF8)
                continue
            line = f"RCPT TO:<{rcpt if utf8 else ascii_address(rcpt)}>"
            notify, orcpt = requests.get(rcpt, (None, None))
            if dsn and notify is not None:
                line += " NOTIFY=" + (",".join(notify) or "NEVER")
            if dsn and orcpt:
                kind, _, address = orcpt.partition(";")
                # RFC 6533 3: a UTF-8 original address travels escaped, in ASCII.
                encoded = utf8_addr_xtext(address) if kind == "utf-8" else xtext_encode(address)
                line += f" ORCPT={kind};{encoded}"
            commands.append(("RCPT", line.encode(), rcpt))
        if self.chunking:
            commands.append(("BODY", b"", None))  # the BDAT chunks go here
        else:
            commands.append(("DATA", b"DATA", None))
        state.start(commands, self.pipelining)

    def _refuse(self, txn: Transaction) -> Outcome | None:
        """
        What we know before MAIL that makes sending pointless.
        """
        limit = self.capabilities.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and txn.message.size > int(limit):
            return failures.outcome("too-big", remote_mta=self._remote(),
                                    size=txn.message.size, peer=self.peer, limit=limit)
        if txn.requiretls and not (self.requiretls and self.tls_done
                                   and "REQUIRETLS" in self.capabilities):
            # Never on a session that was not set up (and checked) for it.
            return failures.outcome("requiretls-unsupported", remote_mta=self._remote(),
                                    host=self.peer)
        return None

    def _reply(self, code: int, resp: bytes) -> None:
        if self._txn is None or not self._txn.awaiting:
            # A reply nobody asked for (none is due while the message is
            # converted to 7 bits, before MAIL): the server is confused.
            self._fail(SessionFailed(failures.outcome(
                "protocol-error", remote_mta=self._remote(), peer=self.peer,
                why=f" sent an unexpected reply: {code} "
                    f"{resp[:100].decode('ascii', 'replace')}")))
            return
        self._txn.reply(code, resp)

    def _transaction_done(self, needs_rset: bool) -> None:
        self._txn = None
        self._needs_rset = needs_rset
        self.setTimeout(None)


class _TransactionState:
    """
    Replies of one transaction, matched to the commands in order (with or
    without pipelining).
    """

    def __init__(self, client: OutboundClient, txn: Transaction) -> None:
        self.client = client
        self.txn = txn
        self.done: defer.Deferred = defer.Deferred()
        self.results: dict[str, Outcome] = {}
        self.accepted: list[str] = []
        self.mail_failed: Outcome | None = None
        self.awaiting: deque = deque()
        self.unsent: deque = deque()
        self.stage = "MAIL FROM"
        self.pipelined = False
        self.finished = False
        self.dsn_passed = False
        self.bdat_chunks = 0  # BDAT commands sent
        self._acked: defer.Deferred | None = None  # the reply to a lock-step chunk

    def start(self, commands, pipelined: bool) -> None:
        self.pipelined = pipelined
        c = self.client
        c.setTimeout(c.timeouts.command)
        if pipelined:
            body = commands[-1][0] == "BODY"
            if body:
                commands = commands[:-1]
            self.awaiting.extend(commands)
            lines = b"".join(line + b"\r\n" for _, line, _ in commands)
            if body:  # RFC 3030 4.2: the chunks may follow at once, in one segment
                c.transport.write(lines)
                self._send_chunks()
            else:  # nothing more until the replies: at once (twisted_mta/transport.py)
                write_now(c.transport, lines)
        else:
            self.unsent.extend(commands)
            self._send_next()

    def _send_next(self) -> None:
        command = self.unsent.popleft()
        if command[0] == "BODY":
            if self.accepted and self.mail_failed is None:
                self._send_chunks()
            else:
                self._finish(self.mail_failed, needs_rset=True)
            return
        self.awaiting.append(command)
        self.client.sendLine(command[1])

    def reply(self, code: int, resp: bytes) -> None:
        kind, line, rcpt = self.awaiting.popleft()
        c = self.client
        peer = c.peer
        if kind == "RSET":
            if code >= 400:
                self.abort(reply_outcome(peer, "RSET", code, resp))
                c.quit()
            return
        if kind == "MAIL":
            self.stage = "RCPT TO"
            if code >= 300:
                self.mail_failed = reply_outcome(peer, "MAIL FROM", code, resp)
                if not self.pipelined:
                    self._finish(self.mail_failed, needs_rset=True)
                return
        elif kind == "RCPT":
            if self.mail_failed is None:
                if 200 <= code < 300:
                    self.accepted.append(rcpt)
                else:
                    self.results[rcpt] = reply_outcome(peer, f"RCPT TO:<{rcpt}>", code, resp)
            if not self.pipelined and not self.unsent[0][0] == "RCPT" and not self.accepted:
                self._finish(None, needs_rset=True)
                return
        elif kind in ("BDAT", "LAST"):
            self._chunk_reply(kind == "LAST", code, resp)
            return
        if self.awaiting and self.awaiting[0][0] in ("BDAT", "LAST"):
            self.stage = "BDAT"  # the pipelined chunks' replies are next
        elif kind == "DATA":
            self.stage = "DATA"
            if code == 354:
                self.stage = "the message body"
                self.awaiting.append(("END", b".", None))
                if self.accepted and self.mail_failed is None:
                    self._send_body()
                else:
                    c.transport.write(b".\r\n")  # nobody to send it to: end it empty
                return
            if self.mail_failed is not None or not self.accepted:
                self._finish(self.mail_failed, needs_rset=True)
                return
            outcome = reply_outcome(peer, "DATA", code, resp)
            if code < 400:
                outcome = failures.outcome("data-refused", remote_mta=c._remote(), peer=peer,
                                           code=code)
            self._finish(outcome, needs_rset=True)
            return
        elif kind == "END":
            if self.mail_failed is not None or not self.accepted:
                self._finish(self.mail_failed, needs_rset=False)
                return
            outcome = reply_outcome(peer, "end of data", code, resp)
            if self.dsn_passed and code < 300:
                outcome = attrs.evolve(outcome, dsn_passed=True)
            self._finish(outcome, needs_rset=False)
            return
        if not self.pipelined and self.unsent:
            self._send_next()

    def _chunk_reply(self, last: bool, code: int, resp: bytes) -> None:
        """
        The reply to one BDAT: every chunk gets one (RFC 3030 2); the one
        after LAST ends the message like the reply after DATA's dot.
        """
        peer = self.client.peer
        if self.mail_failed is not None or not self.accepted:
            # Pipelined chunks nobody was to receive, refused (or taken
            # empty) by the server: the envelope replies already decided.
            self._finish(self.mail_failed, needs_rset=True)
            return
        if code >= 300 or (last and code < 200):
            # RFC 3030 2: no more chunks after a failed one; RSET before the next.
            self._finish(reply_outcome(peer, "BDAT", code, resp), needs_rset=True)
            return
        if last:
            outcome = reply_outcome(peer, "BDAT LAST", code, resp)
            if self.dsn_passed:
                outcome = attrs.evolve(outcome, dsn_passed=True)
            self._finish(outcome, needs_rset=False)
            return
        if self._acked is not None:
            d, self._acked = self._acked, None
            d.callback(None)

    @defer.inlineCallbacks
    def _send_chunks(self):
        """
        Send the message in BDAT chunks of at most the client's chunk size,
        the last with LAST: each chunk after its reply (or, pipelining, as
        fast as the transport takes them).  A message too big for memory
        is read a chunk at a time in the I/O pool.
        """
        c = self.client
        message = self.txn.message
        self.stage = "BDAT"
        trace = c.trace.encode("utf-8", "replace") + b"\r\n" if c.trace else b""
        total = len(trace) + message.size
        body = message.body  # else read from the queue file
        step = c.chunk_size
        pacer = outgoing.Pacer(c.transport) if self.pipelined else None
        sent = 0
        try:
            while not self.finished:
                want = min(step, total - sent)
                head = trace[sent:sent + want]
                start, n = sent + len(head) - len(trace), want - len(head)  # in the body
                if body is not None:
                    rest = body[start:start + n]
                elif n:
                    rest = yield c.run_blocking(message.read_raw, start, n)
                else:
                    rest = b""
                piece = head + rest if head else rest
                if self.finished:
                    break
                if len(piece) != want:
                    raise OSError(f"the queue file ended {total - sent - len(piece)} octets "
                                  "early")
                sent += want
                last = sent == total
                command = b"BDAT %d%s" % (want, b" LAST" if last else b"")
                self.bdat_chunks += 1
                self.awaiting.append(("LAST" if last else "BDAT", command, None))
                c.resetTimeout()
                c.setTimeout(c.timeouts.data)
                c.transport.writeSequence([command, b"\r\n", piece])
                if last:
                    break
                if pacer is not None:
                    yield pacer.wait()
                else:
                    self._acked = defer.Deferred()
                    yield self._acked
        except Exception as e:
            self.abort(failures.outcome("message-unreadable", why=e))
            c._fail(SessionFailed(failures.outcome("internal", why=e)), close=True)
        finally:
            if pacer is not None:
                pacer.stop()

    @defer.inlineCallbacks
    def _send_body(self):
        c = self.client
        message = self.txn.message
        try:
            if c.trace:
                c.transport.write(c.trace.encode("utf-8", "replace") + b"\r\n")
            yield outgoing.send_stuffed(message, c.transport, c.run_blocking,
                                        stopped=lambda: self.finished, progress=c.resetTimeout)
        except Exception as e:
            self.abort(failures.outcome("message-unreadable", why=e))
            c._fail(SessionFailed(failures.outcome("internal", why=e)), close=True)
            return
        if not self.finished:
            self.stage = "the end of data"
            c.setTimeout(c.timeouts.data)

    def _finish(self, outcome: Outcome | None, needs_rset: bool) -> None:
        """
        The transaction is over: C{outcome} applies to every recipient that
        has none yet.
        """
        if self.finished:
            return
        self.finished = True
        if self._acked is not None:  # wake the chunk sender: it stops
            d, self._acked = self._acked, None
            d.callback(None)
        for rcpt in self.txn.recipients:
            if rcpt not in self.results:
                self.results[rcpt] = outcome or failures.outcome("no-result",
                                                                 peer=self.client.peer)
        self.client._transaction_done(needs_rset)
        if self.awaiting and self.client.ready:
            # Replies still due for commands of an aborted transaction would
            # be taken for the next one's: this connection is done.
            self.client.quit()
        self.done.callback(self.results)

    def abort(self, outcome: Outcome) -> None:
        self._finish(outcome, needs_rset=True)
