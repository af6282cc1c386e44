"""
Milters on the inbound leg: the MTA side of the Sendmail milter protocol,
version 6 (the codec is L{twisted_mta.milter_protocol}).

Each SMTP session of a listener with C{milters = [...]} gets a
L{MilterChain}: one connection per milter, opened when the client
connects, in the order the listener names them.  The SMTP commands are
passed on as they come (connect, HELO, MAIL, each RCPT); the content is
passed at the end of DATA, before the commit and the 250, from the queue
file already written to C{tmp/}: each milter in turn gets the headers and
the body (read from disk in chunks, so memory stays bounded) and answers
at end of message with its edits, which are applied before the next milter
reads the message (so it sees them), and the edited file replaces the
original before it is fsync'd.  What is queued is what the milters saw and
approved.

A milter that cannot be reached, times out or breaks the protocol is
treated by its C{default_action} for the rest of the session (Postfix's
milter_default_action): C{accept} goes on without it, C{tempfail} and
C{reject} answer every later command of the session 451 or 550.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
from twisted.internet import defer, endpoints
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta import milter_protocol as mp
from twisted_mta import reply
from twisted_mta.config import MilterSettings
from twisted_mta.model import Envelope, Recipient, header_end
from twisted_mta.reply import Reply

log = Logger()

HEAD_LIMIT = 1024 * 1024  # header octets read into memory; beyond, the rest is body
READ_CHUNK = mp.BODY_CHUNK

MILTER_REJECT = reply.R(550, "5.7.1", "Refused by a mail filter")
MILTER_TEMPFAIL = reply.R(451, "4.7.1", "A mail filter is unavailable or defers this; "
                                        "try again later")


class MilterFailed(Exception):
    """The milter could not be used (unreachable, timed out, broke the protocol)."""


class MilterConnection(Protocol):
    """
    One connection to a milter: write packets, and wait (one request at a
    time, within a timeout) for its answer.
    """

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._parser = mp.PacketParser()
        self._waiting: defer.Deferred | None = None
        self._kind = ""
        self._mods: list = []
        self._on_mod: Callable[[Any], None] | None = None
        self._timer: Any = None
        self.actions = mp.OUR_ACTIONS
        self.lost: str | None = None

    def send(self, data: bytes) -> None:
        if self.lost is None:
            self.transport.write(data)

    def request(self, data: bytes, kind: str, timeout: float,
                on_mod: Callable[[Any], None] | None = None) -> defer.Deferred:
        """
        Send C{data} and wait for: C{optneg} (the OPTNEG answer, a
        L{mp.Negotiated}), C{verdict} (one L{mp.Verdict}) or C{eom} (the
        modifications, each handed to C{on_mod}, then the verdict).
        """
        if self.lost is not None:
            return defer.fail(MilterFailed(self.lost))
        assert self._waiting is None, "one request at a time"
        self._waiting = defer.Deferred()
        self._kind = kind
        self._on_mod = on_mod
        self._timeout = timeout
        self._timer = self.clock.callLater(timeout, self._timed_out, timeout)
        self.send(data)
        return self._waiting

    def dataReceived(self, data: bytes) -> None:
        try:
            for command, payload in self._parser.feed(data):
                self._packet(command, payload)
        except mp.MilterProtocolError as e:
            self._fail(f"protocol error: {e}")
        except Exception as e:  # an edit that could not be stored: the same outcome
            log.failure("milter answer could not be handled", event="milter.error")
            self._fail(f"internal error: {e}")

    def _packet(self, command: bytes, payload: bytes) -> None:
        if self._waiting is None:
            raise mp.MilterProtocolError(f"unexpected packet {command!r}")
        if self._kind == "optneg":
            if command != mp.OPTNEG:
                raise mp.MilterProtocolError(f"expected OPTNEG, got {command!r}")
            negotiated = mp.negotiate(payload)
            self.actions = negotiated.actions
            self._done(negotiated)
            return
        answer = mp.decode_response(command, payload, self.actions)
        if answer is None:  # progress: the milter is alive, give it the time again
            self._timer.reset(self._timeout)
            return
        if isinstance(answer, mp.Verdict):
            self._done(answer)
        elif self._kind == "eom":
            assert self._on_mod is not None
            self._on_mod(answer)
        else:
            raise mp.MilterProtocolError(f"modification {command!r} before end of message")

    def _done(self, result: object) -> None:
        d, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d.callback(result)

    def _timed_out(self, timeout: float) -> None:
        self._timer = None
        self._fail(f"no answer within {timeout:g} s")

    def _fail(self, why: str) -> None:
        if self.lost is None:
            self.lost = why
        d, self._waiting = self._waiting, None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.transport is not None:
            self.transport.abortConnection() if hasattr(self.transport, "abortConnection") \
                else self.transport.loseConnection()
        if d is not None:
            d.errback(MilterFailed(why))

    def connectionLost(self, reason: Failure = None) -> None:
        self._fail("the milter closed the connection")

    def close(self, quit: bool = True) -> None:
        if self.lost is not None:
            return
        if self._waiting is not None:
            self._fail("closed")  # the request still waiting fails: the chain goes on
            return
        if quit:
            self.send(mp.encode(mp.QUIT))
        self.lost = "closed"
        self.transport.loseConnection()


def connect_endpoint(reactor: Any) -> Callable[[mp.MilterAddress, float, Any], defer.Deferred]:
    """
    How a chain reaches a milter: a Twisted client endpoint from its
    address (TCP to a literal address or a name, or a Unix socket).
    """
    def connect(address: mp.MilterAddress, timeout: float, clock: Any) -> defer.Deferred:
        if address.path is not None:
            ep = endpoints.UNIXClientEndpoint(reactor, address.path, timeout=timeout)
        else:
            ep = endpoints.HostnameEndpoint(reactor, address.host, address.port,
                                            timeout=timeout)
        return ep.connect(Factory.forProtocol(lambda: MilterConnection(clock)))
    return connect


@attrs.frozen
class MessageOutcome:
    """
    What the milters made of a message: C{reply} to refuse it (4xx/5xx),
    else queued (C{discard}: dropped after a 250) with C{envelope}, held
    when C{quarantine} gives a reason.
    """

    envelope: Envelope
    reply: Reply | None = None
    discard: bool = False
    quarantine: str | None = None
    rewritten: bool = False
    size: int = 0  # of a rewritten message, after its envelope header


class _Milter:
    """One milter of one SMTP session: its connection and where it stands."""

    def __init__(self, name: str, settings: MilterSettings) -> None:
        self.name = name
        self.settings = settings
        self.address = mp.parse_milter_address(settings.address)
        self.conn: MilterConnection | None = None
        self.negotiated: mp.Negotiated | None = None
        self.failed = False  # its default action applies from now on
        self.session_done = False  # accepted the connection, or refused it
        self.message_done = False  # accepted or refused the message
        self.in_message = False  # sent MAIL, no end of message or abort yet


class MilterChain:
    """
    The milters of one SMTP session, in order.  Each SMTP event goes to
    each milter in turn; the first reject, tempfail or discard ends it
    (Postfix's order and combination).  Events run one after another.
    """

    def __init__(self, milters: list[tuple[str, MilterSettings]], clock: Any,
                 connect: Callable[[mp.MilterAddress, float, Any], defer.Deferred],
                 run_blocking: Callable[..., defer.Deferred],
                 observe: Callable[[str, str], None] | None = None) -> None:
        self.milters = [_Milter(name, s) for name, s in milters]
        self._observe = observe  # (milter, result): the metric (MilterStage)
        self.clock = clock
        self._connect = connect
        self.run_blocking = run_blocking
        self.macros: dict[str, str] = {}
        self.peer = ""
        self._lock = defer.DeferredLock()
        self._sticky: Reply | None = None  # a refusal of the whole session
        self._closed = False

    # -- SMTP events; each fires with None (go on) or the reply to send ---------

    def connect(self, hostname: str, family: str, port: int, address: str,
                macros: dict[str, str]) -> defer.Deferred:
        self.peer = address
        self.macros.update(macros)
        return self._lock.run(self._connect_all, hostname, family, port, address)

    def helo(self, name: str, macros: dict[str, str] | None = None) -> defer.Deferred:
        self.macros.update(macros or {})
        return self._lock.run(self._event, mp.HELO, mp.helo_packet(name), "helo")

    def mail(self, sender: str, params: list[str], macros: dict[str, str]) -> defer.Deferred:
        self.macros.update(macros)
        self.macros["mail_addr"] = sender
        return self._lock.run(self._event, mp.MAIL, mp.args_packet(mp.MAIL, sender, params),
                              "mail")

    def rcpt(self, address: str, params: list[str]) -> defer.Deferred:
        self.macros["rcpt_addr"] = address
        return self._lock.run(self._event, mp.RCPT, mp.args_packet(mp.RCPT, address, params),
                              "rcpt")

    def message(self, path: str, queue_id: str, envelope: Envelope, max_size: int
                ) -> defer.Deferred:
        """
        Run the content past the milters: C{path} is the queue file in
        tmp/ (envelope header first).  Fires with a L{MessageOutcome}; a
        rewritten file is left at C{path + ".milter"} for the writer to
        adopt.
        """
        self.macros["i"] = queue_id
        return self._lock.run(self._message, path, envelope, max_size)

    def abort(self) -> None:
        """The transaction ended without an end of message (RSET, a refusal)."""
        self._lock.run(self._abort)

    def close(self) -> None:
        """The SMTP session ended: QUIT to every milter still connected."""
        self._closed = True
        for m in self.milters:
            if m.conn is not None:
                m.conn.close()

    # -- the work -------------------------------------------------------------

    def _count(self, m: _Milter, result: str) -> None:
        if self._observe is not None:
            try:
                self._observe(m.name, result)
            except Exception:
                log.failure("milter metric failed", event="milter.error")

    def _log_failure(self, m: _Milter, why: str) -> Reply | None:
        m.failed = True
        action = m.settings.default_action
        if self._closed:  # the SMTP session ended under a request: nothing failed
            return None
        self._count(m, "failed")
        log.warn("milter {milter} failed ({why}); default action {action}",
                 event="milter.failed", milter=m.name, why=why, action=action, peer=self.peer)
        if m.conn is not None:
            m.conn.close(quit=False)
        if action == "accept":
            return None
        return MILTER_TEMPFAIL if action == "tempfail" else MILTER_REJECT

    def _failed_reply(self, m: _Milter) -> Reply | None:
        action = m.settings.default_action
        if action == "accept":
            return None
        return MILTER_TEMPFAIL if action == "tempfail" else MILTER_REJECT

    def _live(self, m: _Milter, message: bool = False) -> bool:
        return (not m.failed and not m.session_done and m.conn is not None
                and not (message and m.message_done))

    def _macro_packet(self, m: _Milter, command: bytes) -> bytes:
        wanted = m.negotiated.macros.get(command) if m.negotiated else None
        macros = ({k: self.macros[k] for k in wanted if k in self.macros}
                  if wanted is not None else dict(self.macros))
        return mp.macro_packet(command, macros) if macros else b""

    @defer.inlineCallbacks
    def _connect_all(self, hostname: str, family: str, port: int, address: str):
        for m in self.milters:
            s = m.settings
            try:
                m.conn = yield self._connect(m.address, s.connect_timeout, self.clock)
                m.negotiated = yield m.conn.request(mp.optneg_packet(), "optneg",
                                                    s.connect_timeout)
            except Exception as e:  # refused, timed out, no such name or socket, ...
                refusal = self._log_failure(m, str(e) or type(e).__name__)
                self._sticky = self._sticky or refusal
                continue
            if self._sticky is not None:
                continue
            verdict = yield self._send(m, mp.CONNECT,
                                       mp.connect_packet(hostname, family, port, address),
                                       s.command_timeout)
            refusal = self._judge(m, verdict, "connect", session=True)
            if refusal is not None and refusal is not _DISCARD:  # discard: messages only
                self._sticky = refusal
        return self._sticky

    @defer.inlineCallbacks
    def _send(self, m: _Milter, command: bytes, packet: bytes, timeout: float):
        """
        The macros and C{packet} to C{m}; its verdict (a continue when it
        asked us to leave the step out or not to wait), or a Reply/None
        when it failed (its default action).
        """
        assert m.negotiated is not None and m.conn is not None
        if not m.negotiated.sends(command):
            return mp.Verdict("continue")
        data = self._macro_packet(m, command) + packet
        if not m.negotiated.replies(command):
            m.conn.send(data)
            return mp.Verdict("continue")
        try:
            return (yield m.conn.request(data, "verdict", timeout))
        except MilterFailed as e:
            return _Failed(self._log_failure(m, str(e)))

    def _judge(self, m: _Milter, verdict, stage: str, session: bool = False) -> Reply | None:
        """
        The SMTP consequence of one milter's answer; C{accept} excuses the
        milter from the rest of the session (connect, HELO) or message.
        """
        if isinstance(verdict, _Failed):
            return verdict.reply
        kind = verdict.kind
        if kind == "accept":
            if session:
                m.session_done = True
            else:
                m.message_done = True
            return None
        if kind in ("continue", "skip"):
            return None
        if kind == "discard":
            self._count(m, "discard")
            return _DISCARD
        self._count(m, kind)
        r = verdict.reply or (MILTER_TEMPFAIL if kind == "tempfail" else MILTER_REJECT)
        log.info("milter {milter} {kind}s {stage} from {peer}: {reply}",
                 event=f"milter.{kind}", milter=m.name, kind=kind, stage=stage,
                 peer=self.peer, reply=f"{r.code} {r.text}")
        return r

    @defer.inlineCallbacks
    def _event(self, command: bytes, packet: bytes, stage: str):
        if self._sticky is not None:
            return self._sticky
        for m in self.milters:
            if m.failed:
                refusal = self._failed_reply(m)
                if refusal is not None:
                    return refusal
                continue
            if not self._live(m, message=command == mp.RCPT):
                continue
            if command == mp.MAIL:
                m.in_message, m.message_done = True, False
            verdict = yield self._send(m, command, packet, m.settings.command_timeout)
            refusal = self._judge(m, verdict, stage, session=command == mp.HELO)
            if refusal is _DISCARD and command == mp.HELO:
                continue  # discard is for messages only
            if refusal is _DISCARD:
                # Discard at MAIL/RCPT: the message will be dropped; we keep
                # it simple and refuse nothing now, the end of data drops it.
                self._discard = True
                continue
            if refusal is not None:
                if command == mp.HELO:
                    self._sticky = refusal
                return refusal
        return None

    _discard = False

    def _abort(self) -> None:
        self._discard = False
        for m in self.milters:
            if m.in_message and self._live(m):
                m.conn.send(mp.encode(mp.ABORT))
            m.in_message = False
            m.message_done = False

    @defer.inlineCallbacks
    def _message(self, path: str, envelope: Envelope, max_size: int):
        if self._sticky is not None:
            return MessageOutcome(envelope, reply=self._sticky)
        head = yield self.run_blocking(read_head, path)
        headers: list[mp.Header] = head.headers
        body = (path, head.body_offset)
        separator = head.separator
        changed_head = changed_body = False
        quarantine = None
        for m in self.milters:
            if m.failed:
                refusal = self._failed_reply(m)
                if refusal is not None:
                    return MessageOutcome(envelope, reply=refusal)
                continue
            if not self._live(m, message=True):
                m.in_message = False
                continue
            result = yield self._content(m, headers, body, path, max_size)
            m.in_message = False
            if isinstance(result, Reply) and result is not _DISCARD:
                self._abort_others(m)
                return MessageOutcome(envelope, reply=result)
            if result is _DISCARD:
                self._abort_others(m)
                log.info("milter {milter} discards {queue_id} from {peer}",
                         event="milter.discard", milter=m.name, queue_id=self.macros.get("i"),
                         peer=self.peer)
                return MessageOutcome(envelope, discard=True)
            if result is None:
                continue
            edits, replaced = result
            header_edits = [e for e in edits if isinstance(
                e, (mp.AddHeader, mp.InsertHeader, mp.ChangeHeader))]
            if header_edits:
                headers = mp.apply_header_edits(headers, header_edits)
                changed_head = True
            if replaced is not None:
                body, separator, changed_body = (replaced, 0), True, True
            self._count(m, "accept")
            for e in edits:
                if isinstance(e, mp.Quarantine):
                    self._count(m, "quarantine")
                    quarantine = e.reason or "quarantined"
                    log.info("milter {milter} quarantines {queue_id}: {reason}",
                             event="milter.quarantine", milter=m.name, reason=quarantine,
                             queue_id=self.macros.get("i"), peer=self.peer)
            new_envelope = apply_envelope_edits(envelope, edits)
            if new_envelope != envelope:
                envelope = new_envelope
                changed_head = True
            if edits or replaced is not None:
                self._count(m, "modified")
                kinds = {type(e).__name__ for e in edits}
                if replaced is not None:
                    kinds.add("ReplaceBody")
                log.info("milter {milter} changed {queue_id}: {edits}",
                         event="milter.modified", milter=m.name, queue_id=self.macros.get("i"),
                         edits=", ".join(sorted(kinds)))
        if self._discard:
            return MessageOutcome(envelope, discard=True)
        if not envelope.recipients:
            log.info("milters removed every recipient of {queue_id}; discarded",
                     event="milter.discard", queue_id=self.macros.get("i"), peer=self.peer)
            return MessageOutcome(envelope, discard=True)
        size = 0
        if changed_head or changed_body:
            # The header as at DATA (size 0: the commit's state has the size).
            size = yield self.run_blocking(
                write_rewrite, path + ".milter", attrs.evolve(envelope, size=0).to_header(),
                headers, separator, body[0], body[1])
        return MessageOutcome(envelope, quarantine=quarantine,
                              rewritten=changed_head or changed_body, size=size)

    def _abort_others(self, done: _Milter) -> None:
        for m in self.milters:
            if m is not done and m.in_message and self._live(m):
                m.conn.send(mp.encode(mp.ABORT))
            m.in_message = False

    @defer.inlineCallbacks
    def _content(self, m: _Milter, headers: list[mp.Header], body: tuple[str, int],
                 path: str, max_size: int):
        """
        The message to one milter: DATA, the headers, EOH, the body, the
        end of message.  Fires with a Reply (refused), L{_DISCARD}, None
        (accepted early: no edits) or (edits, path of a new body or None).
        """
        s = m.settings
        verdict = yield self._send(m, mp.DATA, mp.encode(mp.DATA), s.command_timeout)
        for name, value in headers:
            if not self._step_ok(verdict):
                break
            verdict = yield self._send(m, mp.HEADER, mp.header_packet(name, mp.milter_value(value)),
                                       s.command_timeout)
        if self._step_ok(verdict):
            verdict = yield self._send(m, mp.EOH, mp.encode(mp.EOH), s.command_timeout)
        offset = body[1]
        while self._step_ok(verdict) and m.negotiated.sends(mp.BODY):
            chunk = yield self.run_blocking(read_chunk, body[0], offset, READ_CHUNK)
            if not chunk:
                break
            offset += len(chunk)
            verdict = yield self._send(m, mp.BODY, mp.encode(mp.BODY, chunk), s.content_timeout)
            if not isinstance(verdict, _Failed) and verdict.kind == "skip":
                break
        if isinstance(verdict, _Failed) or verdict.kind not in ("continue", "skip"):
            refusal = self._judge(m, verdict, "data")
            return refusal  # None when it accepted the message
        edits: list = []
        sink = _BodySink(path + ".body", max_size, self.run_blocking)

        def on_mod(mod) -> None:
            if isinstance(mod, mp.ReplaceBody):
                sink.write(mod.chunk)
            else:
                edits.append(mod)

        data = self._macro_packet(m, mp.BODYEOB) + mp.encode(mp.BODYEOB)
        try:
            verdict = yield m.conn.request(data, "eom", s.content_timeout, on_mod)
        except MilterFailed as e:
            yield sink.discard()
            return self._log_failure(m, str(e))
        replaced = (yield sink.finish()) if sink.used else None
        refusal = self._judge(m, verdict, "end of message")
        if refusal is not None:
            if replaced:
                yield self.run_blocking(_unlink, replaced)
            return refusal
        return edits, replaced

    @staticmethod
    def _step_ok(verdict) -> bool:
        return not isinstance(verdict, _Failed) and verdict.kind == "continue"


@attrs.frozen
class _Failed:
    reply: Reply | None


_DISCARD = reply.R(250, "2.0.0", "Ok: discarded")


class _BodySink:
    """
    A milter's replacement body, appended to a file as its packets come
    (in order, off the reactor thread), line ends made CRLF, at most
    C{max_size} octets (more breaks the protocol: the milter's default
    action).
    """

    def __init__(self, path: str, max_size: int, run_blocking) -> None:
        self.path = path
        self.max_size = max_size
        self.run = run_blocking
        self.used = False
        self.size = 0
        self._normalizer = mp.CRLFNormalizer()
        self._tail: defer.Deferred = defer.succeed(None)

    def write(self, chunk: bytes) -> None:
        first = not self.used
        self.used = True
        self.size += len(chunk)
        if self.size > self.max_size:
            raise mp.MilterProtocolError("replacement body larger than the message size limit")
        data = self._normalizer.feed(chunk)
        self._tail.addCallback(lambda _: self.run(_append_file, self.path, data, first))

    def finish(self) -> defer.Deferred:
        data = self._normalizer.finish()
        self._tail.addCallback(lambda _: self.run(_append_file, self.path, data, False))
        self._tail.addCallback(lambda _: self.path)
        return self._tail

    def discard(self) -> defer.Deferred:
        self._tail.addBoth(lambda _: self.run(_unlink, self.path))
        return self._tail


# -- blocking helpers (run_blocking) ---------------------------------------------

@attrs.frozen
class Head:
    headers: list[mp.Header]
    body_offset: int
    separator: bool


def read_head(path: str) -> Head:
    """
    The header fields of the queue file at C{path} (after its envelope
    header), and where its body starts.
    """
    with open(path, "rb") as f:
        data = b""
        while True:
            more = f.read(READ_CHUNK)
            data += more
            end = header_end(data)
            if end >= 0 or not more:
                break
        if end < 0:
            raise OSError("queue file without its envelope header")
        while True:
            found = mp.split_head(data[end:], complete=not more or len(data) - end > HEAD_LIMIT)
            if found is not None:
                headers, offset, separator = found
                return Head(headers, end + offset, separator)
            more = f.read(READ_CHUNK)
            data += more


def read_chunk(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def _append_file(path: str, data: bytes, first: bool) -> None:
    with open(path, "wb" if first else "ab") as f:
        f.write(data)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_rewrite(path: str, envelope_header: bytes, headers: list[mp.Header],
                  separator: bool, body_path: str, body_offset: int) -> int:
    """
    The edited message, whole, at C{path} (the writer adopts and fsyncs
    it): the envelope header, the edited header fields, the body copied
    in chunks from C{body_path} (the original file, or the milter's
    replacement, which is then removed).
    """
    with open(path, "wb") as out:
        out.write(envelope_header)
        out.write(mp.join_headers(headers))
        if separator:
            out.write(b"\r\n")
        with open(body_path, "rb") as f:
            f.seek(body_offset)
            while chunk := f.read(READ_CHUNK):
                out.write(chunk)
        size = out.tell() - len(envelope_header)
    if body_path.endswith(".body"):
        _unlink(body_path)
    return size


def apply_envelope_edits(envelope: Envelope, edits: list) -> Envelope:
    """
    The envelope after a milter's CHGFROM, ADDRCPT and DELRCPT, in order.
    Added recipients are taken as they are (as Postfix does, the milter
    is trusted); a deleted one matches case-insensitively, also by the
    address the client gave.
    """
    sender = envelope.sender
    recipients = list(envelope.recipients)
    for e in edits:
        if isinstance(e, mp.ChangeFrom):
            sender = e.address
        elif isinstance(e, mp.AddRecipient):
            if all(r.address.lower() != e.address.lower() for r in recipients):
                recipients.append(Recipient(address=e.address))
        elif isinstance(e, mp.DeleteRecipient):
            gone = e.address.lower()
            recipients = [r for r in recipients if r.address.lower() != gone
                          and (r.original or "").lower() != gone]
    if sender == envelope.sender and tuple(recipients) == envelope.recipients:
        return envelope
    return attrs.evolve(envelope, sender=sender, recipients=tuple(recipients))


class MilterStage:
    """
    The milters of one listener: makes a L{MilterChain} per SMTP session.
    Also the hook for mail that does not arrive over SMTP (the sendmail
    pickup): a chain with a made-up connect (family C{U}) would do.
    """

    def __init__(self, milters: list[tuple[str, MilterSettings]], clock: Any,
                 connect: Callable[[mp.MilterAddress, float, Any], defer.Deferred],
                 run_blocking: Callable[..., defer.Deferred],
                 observe: Callable[[str, str], None] | None = None) -> None:
        self.milters = milters
        self.clock = clock
        self.connect = connect
        self.run_blocking = run_blocking
        self.observe = observe  # (milter, result), for twisted_mta_milter_results

    def session(self) -> MilterChain:
        return MilterChain(self.milters, self.clock, self.connect, self.run_blocking,
                           self.observe)


def stage_for(config: Any, listener: Any, reactor: Any,
              run_blocking: Callable[..., defer.Deferred],
              observe: Callable[[str, str], None] | None = None) -> MilterStage | None:
    """
    The milter stage of one configured listener, or None without milters;
    C{observe(milter, result)} counts each result (the metrics, directly or
    through a worker's pipe).
    """
    if not listener.milters:
        return None
    return MilterStage([(name.lower(), config.milter(name)) for name in listener.milters],
                       reactor, connect_endpoint(reactor), run_blocking, observe)
