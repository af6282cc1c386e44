"""
Local delivery over LMTP (RFC 2033): local mail handed to a mail store
such as Dovecot's lmtp service, over a Unix socket or TCP.

LMTP is SMTP with one difference that matters here: after the message,
the server answers once for every recipient it accepted at RCPT, in RCPT
order (RFC 2033 4.2), so each recipient gets its own result: 2xx
delivered, 4xx retried on the queue's schedule, 5xx failed (and the queue
manager sends the DSN).  Every reply becomes an L{Outcome} through the one
classifier (L{twisted_mta.failures}).  When the session ends before a
recipient has its answer (no connection, a timeout, the server closing),
that recipient is deferred; one already answered keeps its answer, so it
is never delivered twice by this attempt.

One connection per delivery request (one queued message's recipients
for one LMTP server): LMTP servers are local and cheap to connect to, and
Dovecot starts a fresh process state per session anyway.

Twisted's C{twisted.mail.smtp} has an LMTP server but only an ESMTP
client, whose single reply after the final dot cannot carry LMTP's
per-recipient answers; L{LMTPClient} is a small line protocol of its own,
using no private part of Twisted.  The message is dot-stuffed by
L{twisted_mta.outbound.message}, as for SMTP.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Callable

import attrs
from twisted.internet import defer, endpoints
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta import failures
from twisted_mta.address import ascii_address
from twisted_mta.config import LMTPSettings, is_ip, parse_lmtp_address
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory, UnknownRecipient
from twisted_mta.model import DeliveryRequest, MessageGone, Outcome
from twisted_mta.outbound import message as outgoing
from twisted_mta.queue.spool import RunBlocking

log = Logger()


@attrs.frozen
class LMTPTimeouts:
    command: float = 300  # the greeting and each reply before the message
    data: float = 600  # sending the message, and each reply after its final dot


@attrs.frozen
class LMTPJob:
    """
    One LMTP transaction: the sender, each recipient as the queue knows it
    with the address RCPT TO gives the server, and the message.
    """

    sender: str
    recipients: tuple[tuple[str, str], ...]  # (queue address, RCPT address)
    message: outgoing.OutgoingMessage
    smtputf8: bool = False  # received with SMTPUTF8 (RFC 6531)


class LMTPClient(LineOnlyReceiver):
    """
    One LMTP session for one L{LMTPJob}: LHLO, MAIL, RCPT per recipient
    (pipelined when the server offers PIPELINING, as RFC 2033 5 requires
    it to), DATA, the message, one reply per accepted recipient, QUIT.

    C{done} fires with an outcome for every queue address of the job, once
    each has one (before QUIT is answered); it never fails.
    """

    delimiter = b"\n"  # CRLF expected; a bare LF ends a reply line too
    MAX_LENGTH = 4096

    def __init__(self, job: LMTPJob, peer: str, clock, timeouts: LMTPTimeouts,
                 lhlo_name: str, run_blocking: RunBlocking,
                 remote_mta: str | None = None) -> None:
        self.job = job
        self.peer = peer
        self.remote_mta = remote_mta
        self.clock = clock
        self.timeouts = timeouts
        self.lhlo_name = lhlo_name
        self.run_blocking = run_blocking
        self.done: defer.Deferred = defer.Deferred()
        self.results: dict[str, Outcome] = {}
        self.finished = False
        self.stage = "the greeting"
        self.capabilities: set[str] = set()
        self.pipelined = False
        self._expect: deque[tuple[str, str | None]] = deque()
        self._lines: list[bytes] = []
        self._accepted: list[str] = []  # queue addresses whose RCPT got 2xx, in order
        self._unsent: deque[tuple[str, str]] = deque()  # RCPTs to send, lock-step
        self._sender = job.sender  # as it goes on the wire
        self._mail_failed: Outcome | None = None
        self._timer = None
        self._quitting = False

    # -- the connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self._expect.append(("GREETING", None))
        self._arm(self.timeouts.command)

    def connectionLost(self, reason=None) -> None:
        self._disarm()
        if not self.finished:
            self._finish(failures.outcome("connection-lost", peer=self.peer, stage=self.stage))

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._timer = self.clock.callLater(seconds, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if not self.finished:
            self._finish(failures.outcome("timeout", peer=self.peer, stage=self.stage))
        self.transport.abortConnection()

    def _send(self, *lines: str) -> None:
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def lineLengthExceeded(self, line: bytes) -> None:
        self._protocol_error(": reply line too long")

    def _protocol_error(self, why: str) -> None:
        if not self.finished:
            self._finish(failures.outcome("protocol-error", peer=self.peer, why=why))
        self._disarm()
        self.transport.abortConnection()

    # -- replies -------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        code = line[:3]
        if len(code) != 3 or not code.isdigit() or line[3:4] not in (b"", b" ", b"-"):
            self._protocol_error(f" sent something that is not a reply: {line[:80]!r}")
            return
        self._lines.append(line[4:])
        if self.finished and not self._quitting:
            return
        if line[3:4] == b"-":
            self._arm(self._current_timeout())
            return
        resp, self._lines = b"\n".join(self._lines), []
        if not self._expect:
            self._protocol_error(f" sent a reply nobody asked for: {line[:80]!r}")
            return
        kind, arg = self._expect.popleft()
        getattr(self, "_reply_" + kind)(int(code), resp, arg)
        if not self.finished or self._quitting:
            self._arm(self._current_timeout())

    def _current_timeout(self) -> float:
        if self.stage in ("the message", "the end of data"):
            return self.timeouts.data
        return self.timeouts.command

    def _said(self, command: str, code: int, resp: bytes) -> Outcome:
        outcome = failures.reply(self.peer, command, code, resp)
        return attrs.evolve(outcome, remote_mta=self.remote_mta)

    def _reply_GREETING(self, code: int, resp: bytes, _) -> None:
        if code // 100 != 2:
            self._refused(code, resp, "the greeting")
            return
        self.stage = "LHLO"
        self._expect.append(("LHLO", None))
        self._send(f"LHLO {self.lhlo_name}")

    def _reply_LHLO(self, code: int, resp: bytes, _) -> None:
        if code // 100 != 2:
            self._refused(code, resp, "LHLO")
            return
        for cap in resp.split(b"\n")[1:]:
            self.capabilities.add(cap.decode("ascii", "replace").strip().upper())
        self.pipelined = "PIPELINING" in self.capabilities
        utf8 = self.job.smtputf8 and "SMTPUTF8" in self.capabilities
        recipients = self.job.recipients
        if not utf8:
            recipients = self._ascii_only()
            if not recipients:
                return
        mail = f"MAIL FROM:<{self._sender}>"
        if utf8:
            mail += " SMTPUTF8"
        if self.job.message.eight_bit and "8BITMIME" in self.capabilities:
            mail += " BODY=8BITMIME"
        if any(c.split()[0] == "SIZE" for c in self.capabilities if c):
            mail += f" SIZE={self.job.message.size}"
        self.stage = "MAIL FROM"
        self._expect.append(("MAIL", None))
        if self.pipelined:
            rcpts = [f"RCPT TO:<{to}>" for _, to in recipients]
            self._expect.extend(("RCPT", address) for address, _ in recipients)
            self._expect.append(("DATA", None))
            self._send(mail, *rcpts, "DATA")
        else:
            self._unsent.extend(recipients)
            self._send(mail)

    def _ascii_only(self) -> tuple[tuple[str, str], ...]:
        """
        A server without SMTPUTF8 takes no UTF-8 address (RFC 6531 3.2):
        a UTF-8 domain goes as its A-label; a recipient whose local part is
        UTF-8 fails (5.6.7), and so does everyone when the sender's does.
        The recipients that can go; when none, the session is over.
        (UTF-8 header fields go as they are: the server stores the message,
        it sends it nowhere.)
        """
        sender = ascii_address(self.job.sender)
        if sender is None:
            self._finish(self._utf8_refused(f"the sender <{self.job.sender}>"))
            self._quit()
            return ()
        self._sender = sender
        keep = []
        for address, to in self.job.recipients:
            wire = ascii_address(to)
            if wire is None:
                self.results[address] = self._utf8_refused(f"the recipient <{to}>")
            else:
                keep.append((address, wire))
        if not keep:
            self._finish(None)
            self._quit()
        return tuple(keep)

    def _utf8_refused(self, address: str) -> Outcome:
        return failures.outcome("smtputf8-address", remote_mta=self.remote_mta, peer=self.peer,
                                address=address)

    def _refused(self, code: int, resp: bytes, command: str) -> None:
        said = f"{code} " + " ".join(
            part.decode("utf-8", "replace").strip() for part in resp.split(b"\n")).strip()
        outcome = failures.outcome("lmtp-refused", peer=self.peer,
                                   said=f"{said} (in reply to {command})")
        self._finish(attrs.evolve(outcome, remote_mta=self.remote_mta))
        self._quit()

    def _reply_MAIL(self, code: int, resp: bytes, _) -> None:
        if code // 100 != 2:
            self._mail_failed = self._said(f"MAIL FROM:<{self._sender}>", code, resp)
            if not self.pipelined:
                self._finish(self._mail_failed)
                self._quit()
            return
        self.stage = "RCPT TO"
        if not self.pipelined:
            self._next_rcpt()

    def _next_rcpt(self) -> None:
        if self._unsent:
            address, to = self._unsent.popleft()
            self._expect.append(("RCPT", address))
            self._send(f"RCPT TO:<{to}>")
        elif self._accepted:
            self._expect.append(("DATA", None))
            self._send("DATA")
        else:
            self._finish(None)
            self._quit()

    def _reply_RCPT(self, code: int, resp: bytes, address: str) -> None:
        if self._mail_failed is None:
            if code // 100 == 2:
                self._accepted.append(address)
            else:
                to = dict(self.job.recipients)[address]
                self.results[address] = self._said(f"RCPT TO:<{to}>", code, resp)
        if not self.pipelined:
            self._next_rcpt()

    def _reply_DATA(self, code: int, resp: bytes, _) -> None:
        if self._mail_failed is not None:
            self._finish(self._mail_failed)
            self._quit(abort=code == 354)
            return
        if code != 354:
            self._finish(self._said("DATA", code, resp))
            self._quit()
            return
        if not self._accepted:  # RFC 2033 4.2: DATA MUST fail then; do not guess
            self._finish(failures.outcome("protocol-error", peer=self.peer,
                                          why=" answered DATA with 354 although it accepted "
                                              "no recipient"))
            self._quit(abort=True)
            return
        self.stage = "the message"
        self._expect.extend(("END", address) for address in self._accepted)
        self._send_message()

    @defer.inlineCallbacks
    def _send_message(self):
        message = self.job.message
        self._arm(self.timeouts.data)
        try:
            yield outgoing.send_stuffed(message, self.transport, self.run_blocking,
                                        stopped=lambda: self.finished,
                                        progress=lambda: self._arm(self.timeouts.data))
        except Exception as e:
            if not self.finished:
                self._finish(failures.outcome("message-unreadable", why=e))
            self._disarm()
            self.transport.abortConnection()
            return
        if not self.finished:
            self.stage = "the end of data"
            self._arm(self.timeouts.data)

    def _reply_END(self, code: int, resp: bytes, address: str) -> None:
        self.results[address] = self._said("end of data", code, resp)
        if not any(kind == "END" for kind, _ in self._expect):
            self._finish(None)
            self._quit()

    def _reply_QUIT(self, code: int, resp: bytes, _) -> None:
        self._disarm()
        self.transport.loseConnection()

    def _quit(self, abort: bool = False) -> None:
        """
        The session is over: say QUIT (or, when the server's state is not
        known, drop the connection).
        """
        if abort or self._quitting:
            self._disarm()
            self.transport.abortConnection()
            return
        self._quitting = True
        self.stage = "QUIT"
        self._expect.clear()
        self._expect.append(("QUIT", None))
        self._send("QUIT")
        self._arm(self.timeouts.command)

    def _finish(self, outcome: Outcome | None) -> None:
        """
        Every recipient without an answer gets C{outcome} (or, when None,
        the transaction ended without one); C{done} fires.
        """
        if self.finished:
            return
        self.finished = True
        missing = outcome or failures.outcome("no-result", peer=self.peer)
        for address, _ in self.job.recipients:
            self.results.setdefault(address, missing)
        self.done.callback(dict(self.results))


class _OneProtocol(ClientFactory):
    """
    Hands out one prepared protocol, quietly.
    """

    noisy = False

    def __init__(self, protocol) -> None:
        self.protocol_instance = protocol

    def buildProtocol(self, addr):
        return self.protocol_instance


Connect = Callable[[LMTPClient], defer.Deferred]


def lmtp_connector(reactor, address: str, timeout: float) -> Connect:
    """
    Connect a protocol to the LMTP server at C{address}
    (L{twisted_mta.config.parse_lmtp_address}'s forms).
    """
    kind, where, port = parse_lmtp_address(address)
    if kind == "unix":
        endpoint = endpoints.UNIXClientEndpoint(reactor, where, timeout=timeout)
    elif ":" in where:
        endpoint = endpoints.TCP6ClientEndpoint(reactor, where, port, timeout=timeout)
    elif is_ip(where):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, where, port, timeout=timeout)
    else:
        endpoint = endpoints.HostnameEndpoint(reactor, where, port, timeout=timeout)

    def connect(protocol: LMTPClient) -> defer.Deferred:
        return endpoint.connect(_OneProtocol(protocol))
    return connect


def _why(failure: Failure) -> str:
    """
    A connection failure in a few words (Twisted's own text says "An
    error occurred while connecting: 2: No such file or directory.").
    """
    e = failure.value
    os_error = getattr(e, "osError", None)
    if isinstance(os_error, int):
        return os.strerror(os_error)
    text = str(getattr(e, "osError", None) or e).strip().rstrip(".")
    return text or type(e).__name__


@implementer(IDeliveryTarget)
class LMTPDelivery:
    """
    The local target for domains whose delivery is "lmtp": each request's
    recipients go to one LMTP server in one session.
    """

    name = "lmtp"

    def __init__(self, directory: LocalDirectory, address: str, recipient: str,
                 settings: LMTPSettings, hostname: str, clock, run_blocking: RunBlocking,
                 connect: Connect | None = None) -> None:
        """
        @param address: the server, as the configuration writes it.
        @param recipient: the template of the address RCPT TO names
            (C{{user}}, C{{domain}}).
        @param connect: connects an L{LMTPClient} to the server (default:
            L{lmtp_connector} on C{clock}, which must then be the reactor).
        """
        self.directory = directory
        self.address = address
        self.recipient = recipient
        self.settings = settings
        self.hostname = hostname
        self.clock = clock
        self.run_blocking = run_blocking
        self.connect = connect or lmtp_connector(clock, address, settings.connect_timeout)
        kind, where, _ = parse_lmtp_address(address)
        self.peer = f"LMTP server {address}"
        self.remote_mta = where if kind == "tcp" else None
        self.timeouts = LMTPTimeouts(command=settings.command_timeout,
                                     data=settings.data_timeout)

    @defer.inlineCallbacks
    def deliver(self, request: DeliveryRequest):
        decided: dict[str, Outcome] = {}
        recipients = []
        for rcpt in request.recipients:
            try:
                user, domain = self.directory.mailbox_of(rcpt.address)
            except UnknownRecipient:
                decided[rcpt.address] = failures.outcome("no-such-mailbox",
                                                         address=rcpt.address)
                continue
            recipients.append((rcpt.address, self.recipient.format(user=user, domain=domain)))
        if not recipients:
            return decided
        addresses = [a for a, _ in recipients]
        try:
            message = yield self.run_blocking(outgoing.load, request.path, request.envelope)
        except FileNotFoundError as e:
            raise MessageGone(str(e))
        except Exception as e:
            outcome = failures.outcome("message-unreadable", why=e)
            return {**decided, **{a: outcome for a in addresses}}
        job = LMTPJob(request.envelope.sender, tuple(recipients), message,
                      smtputf8=request.envelope.smtputf8)
        client = LMTPClient(job, self.peer, self.clock, self.timeouts,
                            self.settings.lhlo_name or self.hostname, self.run_blocking,
                            remote_mta=self.remote_mta)
        try:
            yield self.connect(client)
        except Exception:
            why = _why(Failure())
            outcome = failures.outcome("connect-failed", peer=self.peer, why=why)
            results = {a: outcome for a in addresses}
        else:
            results = yield client.done
        answered = [o for o in results.values() if o.kind == "reply"]
        if not answered:  # the session itself failed: once per attempt, not per recipient
            some = next(iter(results.values()))
            log.info("{queue_id}: {count} recipient(s) deferred: {reply}",
                     event="lmtp.failed", queue_id=request.envelope.queue_id,
                     server=self.address, reply=str(some), count=len(results))
        return {**decided, **results}

    def flush(self) -> None:
        pass  # nothing fails fast here

    def stop(self) -> None:
        pass  # no idle connections are kept
