"""
The inbound ESMTP server: Twisted's C{ESMTP} with our own input loop.

SECURITY: everything here reads from untrusted peers.  The stock server's
defects (see docs/architecture.md) are fixed by owning the input loop:

  - one command at a time: while a command waits (the queue's fsync after
    DATA), later pipelined input stays buffered, so replies keep their order;
  - STARTTLS discards whatever was pipelined after it in cleartext
    (CVE-2011-0411 class) and resets the session (RFC 3207 4.2);
  - only CRLF ends a line; a bare CR or LF in a command is refused, and the
    DATA reader (L{twisted_mta.inbound.data}) ends data only on CRLF.CRLF;
  - over-long lines are refused and skipped, with memory bounded;
  - every reply carries an enhanced status code, and an internal error is a
    451 to the peer and a traceback in our log, never on the wire;
  - no slot is held for ever: besides the idle timeouts, a message's data
    must come within [limits] data_time and at min_data_rate after a grace,
    and when a listener has stress_threshold of its connections in use,
    every timeout of its sessions is cut to stress_timeout (Postfix's
    ${stress?...}), the running ones at once.

The 250 after DATA is sent only when the queue says the entry is durable.

BDAT (RFC 3030 CHUNKING) goes through the same DataReader, in raw mode: the
chunk's octets are counted here and handed to the reader as they arrive
(at most one partial line is carried between reads), so the bare CR/LF,
NUL, line length, size and header rules of DATA apply to them unchanged,
memory stays bounded, and the 250 after BDAT LAST waits for the same
durable commit.  A refused chunk is still read to its end (RFC 3030 2) so
that no octet of it is ever taken for a command.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import errno
import ipaddress
import weakref
from collections import Counter, OrderedDict, deque
from typing import TYPE_CHECKING, Any, Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import (
    IHandshakeListener, IReactorTime, ISSLTransport, ITLSTransport)
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mta import reply
from twisted_mta.address import (
    Address, AddressError, NonASCIIAddress, parse_mail_from, parse_rcpt_to,
)
from twisted_mta.config import Config, Listener
from twisted_mta.dkim import Signer, sign_queued, sign_source
from twisted_mta.dsn import params as dsn_params
from twisted_mta.inbound.data import DataReader
from twisted_mta.inbound.milter import MilterChain, MilterStage, stage_for
from twisted_mta.local import AliasLoop, LocalDirectory, UnknownRecipient
from twisted_mta.model import DELIVERED, Envelope, Recipient, tls_required_no
from twisted_mta.queue.spool import RunBlocking, Spool, run_inline
from twisted_mta.users import UserDatabase, canonical_name
from twisted_mta.transport import write_now
from twisted_mta.reply import Reply

if TYPE_CHECKING:
    from twisted_mta.delivery.local import OnReceipt

log = Logger()

_NOT_SET = object()
# RCPTs past [limits] recipients answered 452 4.5.3 without counting as
# errors, per transaction (Postfix: smtpd_recipient_overshoot_limit); past
# them, each one counts again.
RECIPIENT_OVERSHOOT = 1000
# RFC 5321 4.5.3.1.2: a domain is at most 255 octets.  A longer EHLO/HELO
# name is accepted (as Postfix does) but kept cut to this, so the Received
# header stays within RFC 5322's 998 octets per line.
HELO_NAME_MAX = 255
# Control characters (but TAB) and 8-bit octets: commands are ASCII (RFC 5321 2.4).
_FORBIDDEN_COMMAND_BYTES = bytes(b for b in range(256) if b < 32 and b != 9 or b == 127)
# UTF-8 is allowed in the paths of MAIL and RCPT (RFC 6531 3.3), nowhere else.
_UTF8_VERBS = frozenset({"MAIL", "RCPT"})


_last_date: tuple[int, str] = (-1, "")


def received_date(now: float) -> str:
    """
    The date of a Received field (RFC 5322 3.6.7, local time), made once
    a second: C{formatdate} costs as much as the rest of the field.
    """
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, email.utils.formatdate(second, localtime=True))
    return _last_date[1]


def _params(params: dict[str, str | None]) -> list[str]:
    """ESMTP parameters as the milter protocol passes them (KEY=VALUE)."""
    return [k if v is None else f"{k}={v}" for k, v in params.items()]


class AuthFailureLimiter:
    """
    Failed AUTH attempts per client address in a sliding window, in bounded
    memory: the addresses are chosen by whoever connects, so a map that only
    grows is a way to exhaust ours.

      - By age: an address whose last failure is older than the window is
        dropped, also when it never comes back.  The map is ordered by last
        failure, so the expired entries are at its front and each insert
        drops them there (amortised O(1), no timer to own or cancel).
      - By size: at most C{max_addresses} addresses; when full, the one
        whose last failure is oldest is dropped.  An attacker who rotates
        addresses therefore cannot grow our memory; the price is that the
        oldest entries lose their count and may start afresh before their
        window ends.  That helps only someone who already fails from more
        than C{max_addresses} addresses per window, each of which gets
        C{max_failures - 1} tries per window anyway.  A blocked address
        keeps its count until C{max_addresses} other addresses have failed
        after it.
      - Per address only the last C{max_failures} times are kept: they are
        all it takes to say whether that many fell inside the window.
    """

    def __init__(self, clock: IReactorTime, max_failures: int, window: float,
                 max_addresses: int = 10_000) -> None:
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def _expire(self, now: float) -> None:
        while self._failures:
            times = next(iter(self._failures.values()))
            if now - times[-1] < self.window:
                break
            self._failures.popitem(last=False)

    def note_failure(self, ip: str) -> None:
        """
        Count one failed AUTH from C{ip} now.
        """
        now = self.clock.seconds()
        self._expire(now)
        self._failures.setdefault(ip, deque(maxlen=self.max_failures)).append(now)
        self._failures.move_to_end(ip)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def blocked(self, ip: str) -> bool:
        """
        Whether C{ip} failed C{max_failures} times within the window.
        """
        now = self.clock.seconds()
        self._expire(now)
        times = self._failures.get(ip, ())
        return len(times) >= self.max_failures and now - times[0] < self.window


def errno_words(e: OSError) -> str:
    """
    C{ENOSPC: No space left on device}: the error's symbol and words, for a
    one-line log (the traceback of a full disk says nothing more).
    """
    name = errno.errorcode.get(e.errno) if e.errno is not None else None
    words = e.strerror or str(e) or type(e).__name__
    return f"{name}: {words}" if name else words


class StorageEpisodes:
    """
    Whether the spool refused messages since one was last stored, shared by
    every listener on the spool: a full disk is logged as one warning when
    it starts (the first refusal after a success), one info line per refused
    message, and one line when a message is stored again.
    """

    def __init__(self) -> None:
        self.refused = 0  # messages refused since the last one stored
        self.since: float | None = None

    def failed(self, e: OSError, peer: str, now: float) -> None:
        words = errno_words(e)
        if not self.refused:
            self.since = now
            log.warn("the spool cannot store messages ({error}); refusing them with 451 "
                     "until it can", event="inbound.queue-failing", error=words)
        self.refused += 1
        log.info("could not store a message from {peer}: {error}; 451 sent",
                 event="inbound.queue-error", peer=peer, error=words)

    def stored(self, now: float) -> None:
        if self.refused:
            log.info("the spool stores messages again, after {count} refused in {seconds:.0f} s",
                     event="inbound.queue-recovered", count=self.refused,
                     seconds=now - (self.since or now))
            self.refused = 0
            self.since = None


_episodes: "weakref.WeakKeyDictionary[Spool, StorageEpisodes]" = weakref.WeakKeyDictionary()


class InboundFactory(smtp.SMTPFactory):
    """
    Builds one L{InboundESMTP} per connection for one listener, and counts
    connections for the per-address and total limits.
    """

    def __init__(self, config: Config, role: str, spool: Spool, clock: Any,
                 on_queued: Callable[[Envelope], None], tls_context: Any = None,
                 users: UserDatabase | None = None, run_blocking: RunBlocking = run_inline,
                 signer: Signer | None = None,
                 milters: MilterStage | None = None,
                 on_receipt: OnReceipt | None = None,
                 on_delivered: Callable[[str, int, float], None] = lambda *a: None
                 ) -> None:
        smtp.SMTPFactory.__init__(self)
        self.on_receipt = on_receipt  # [local] deliver_on_receipt, when on
        # (listener, recipients, latency): a message delivered on receipt
        self.on_delivered = on_delivered
        self.milters = milters  # the listener's milters (inbound.milter), if any
        self.users = users
        self.signer = signer  # [dkim]: signs the mail that is ours before its commit
        self.run_blocking = run_blocking
        self.config = config
        self.role = role
        self.spool = spool
        self.storage = _episodes.setdefault(spool, StorageEpisodes())
        self.clock = clock
        self.auth_failures = AuthFailureLimiter(clock, config.auth.max_failures,
                                                config.auth.failure_window)
        self.on_queued = on_queued
        self.tls_context = tls_context
        self.directory = LocalDirectory(config.local)
        self.trusted = tuple(ipaddress.ip_network(n, strict=False)
                             for n in config.relay.trusted_networks)
        self.per_ip: Counter[str] = Counter()
        self.total = 0
        self.sessions: set[InboundESMTP] = set()  # the counted ones
        self.stressed = False

    def stress_timeout(self) -> float | None:
        """
        The cap on every session timeout of this listener now: [limits]
        stress_timeout while under stress, else None.
        """
        return self.config.limits.stress_timeout if self.stressed else None

    def session_started(self, session: "InboundESMTP") -> None:
        self.total += 1
        self.per_ip[session.peer_ip] += 1
        self.sessions.add(session)
        self._check_stress()

    def session_ended(self, session: "InboundESMTP") -> None:
        self.total -= 1
        self.per_ip[session.peer_ip] -= 1
        if self.per_ip[session.peer_ip] <= 0:
            del self.per_ip[session.peer_ip]
        self.sessions.discard(session)
        self._check_stress()

    def _check_stress(self) -> None:
        """
        Under stress from C{stress_connections} in use until fewer than 90%
        of that are (so that one connection more or less does not flap);
        entering it cuts the timeouts of the running sessions at once.
        """
        limits = self.config.limits
        if limits.stress_timeout is None:
            return
        on = limits.stress_connections
        if not self.stressed and self.total >= on:
            self.stressed = True
            log.warn("{role} listener under stress: {count} of {limit} connections in use; "
                     "timeouts cut to {timeout} s", event="inbound.stress", role=self.role,
                     count=self.total, limit=limits.connections, timeout=limits.stress_timeout)
            for session in list(self.sessions):
                session.stress_began()
        elif self.stressed and self.total < max(1, on - max(1, on // 10)):
            self.stressed = False
            log.info("{role} listener no longer under stress: {count} of {limit} connections "
                     "in use", event="inbound.stress-end", role=self.role, count=self.total,
                     limit=limits.connections)

    def buildProtocol(self, addr):
        p = InboundESMTP(self)
        p.factory = self
        p.callLater = self.clock.callLater
        return p

    def auth_blocked(self, ip: str) -> bool:
        """
        Whether C{ip} used up its failed AUTH attempts for the window.
        """
        return self.auth_failures.blocked(ip)

    def note_auth_failure(self, ip: str) -> None:
        self.auth_failures.note_failure(ip)

    def is_trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in net for net in self.trusted)


def listener_factory(config: Config, listener: Listener, spool: Spool, reactor: Any, *,
                     on_queued: Callable[[Envelope], None],
                     on_delivered: Callable[[str, int, float], None],
                     milter_result: Callable[[str, str], None],
                     on_receipt: OnReceipt | None, tls_context: Any,
                     users: UserDatabase | None, run_blocking: RunBlocking,
                     signer: Signer | None) -> Any:
    """
    What one listener accepts with, in the main process and in a worker
    alike: an L{InboundFactory} with the listener's milters, wrapped in TLS
    from the first octet on a C{submissions} listener.  Only the callbacks
    differ: a worker reports to the main process through its pipe.
    """
    factory = InboundFactory(config, listener.role, spool, reactor, on_queued=on_queued,
                             tls_context=tls_context, users=users, run_blocking=run_blocking,
                             signer=signer,
                             milters=stage_for(config, listener, reactor, run_blocking,
                                               milter_result),
                             on_receipt=on_receipt, on_delivered=on_delivered)
    if listener.role == "submissions":
        from twisted.protocols.tls import TLSMemoryBIOFactory
        return TLSMemoryBIOFactory(tls_context, False, factory)
    return factory


@implementer(IHandshakeListener)
class InboundESMTP(smtp.ESMTP):
    """
    One inbound SMTP session.
    """

    def __init__(self, factory: InboundFactory) -> None:
        smtp.ESMTP.__init__(self, chal={}, contextFactory=factory.tls_context)
        config = factory.config
        self.config = config
        self.limits = config.limits
        self.host = config.hostname
        self.timeout = self.limits.command_timeout
        self._inbuf = b""
        self._busy = False
        self._skipping_line = False
        self._closing = False
        self._counted = False
        self._errors = 0
        self._junk = 0  # NOOP, VRFY, RSET, HELP so far
        self._idle_until: float | None = None  # when the idle timeout fires
        self._data_call: Any = None  # the DATA deadline (data_time, min_data_rate)
        self._data_started = 0.0
        self._data_octets = 0
        self._reader: DataReader | None = None
        self._writer = None
        self._envelope: Envelope | None = None
        self.peer_ip = "unknown"
        self.helo_name: str | None = None
        self.esmtp = False
        self.tls_active = False
        self.tls_info: dict[str, str] | None = None
        self.user: str | None = None  # the authenticated user
        self._continuation: Callable[[bytes], None] | None = None  # AUTH's next line
        # BDAT: a message in progress (reader and writer set), the octets of
        # the chunk still to read (None: not inside a chunk), and what to do
        # at the chunk's end.
        self._bdat = False
        self._bdat_declared = 0  # the chunk sizes of this message so far
        self._bdat_chunks = 0  # BDAT commands of this message so far (0: DATA)
        self._bdat_carry = b""  # a partial line the reader left, at most one line
        self._bdat_failed = False  # a chunk of this transaction was refused
        self._chunk_left: int | None = None
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_refusal: Reply | None = None  # the chunk is read and discarded
        self._chunk_counts = True  # whether the refusal counts as an error
        self.milters: MilterChain | None = None
        self._reset_transaction()

    # -- connection -------------------------------------------------------

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", None) or str(peer)
        self.tls_active = ISSLTransport.providedBy(self.transport)  # implicit TLS
        self.canStartTLS = (ITLSTransport.providedBy(self.transport)
                            and self.ctx is not None and not self.tls_active)
        f = self.factory
        if f.total >= self.limits.connections:
            self._refuse(reply.TOO_MANY_CONNECTIONS, "total")
            return
        if f.per_ip[self.peer_ip] >= self.limits.connections_per_ip:
            self._refuse(reply.TOO_MANY_CONNECTIONS_IP, "per-ip")
            return
        self._counted = True
        f.session_started(self)
        log.info("connect from {peer} to {role} listener", event="inbound.connect",
                 peer=self.peer_ip, role=f.role)
        if f.milters is not None:
            self._milters_connect(peer)
        self.send(Reply(220, None, f"{self.host.decode()} {self.config.inbound.banner}"))
        self._arm()

    def _refuse(self, r: Reply, which: str) -> None:
        log.info("refused connection from {peer}: {limit} connection limit",
                 event="inbound.refused", peer=self.peer_ip, limit=which)
        self.send(r)
        self._closing = True
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._closing = True  # nothing more to read or time out
        self._disarm()
        self._stop_data_clock()
        if self._writer is not None and not self._busy:  # busy: being committed
            self._writer.abort()
            self._writer = None
            log.info("connection from {peer} lost during {command}; message discarded",
                     event="inbound.data-aborted", peer=self.peer_ip,
                     command="BDAT" if self._bdat else "DATA")
        if self.milters is not None:
            self.milters.close()
        if self._counted:
            self._counted = False
            self.factory.session_ended(self)
            log.info("disconnect from {peer}", event="inbound.disconnect", peer=self.peer_ip)

    # -- time limits ----------------------------------------------------------

    def _idle_limit(self) -> float:
        normal = (self.limits.data_timeout if self._in_data()
                  else self.limits.command_timeout)
        cap = self.factory.stress_timeout()
        return normal if cap is None else min(normal, cap)

    def _arm(self) -> None:
        """
        (Re)start the idle countdown for the phase the session is in.
        """
        period = self._idle_limit()
        self._idle_until = self.factory.clock.seconds() + period
        self.setTimeout(period)

    def _disarm(self) -> None:
        """
        No idle countdown: we are the ones working (a commit, a password check).
        """
        self._idle_until = None
        self.setTimeout(None)

    def stress_began(self) -> None:
        """
        The listener came under stress: no countdown of this session may
        run longer than [limits] stress_timeout from now.
        """
        if self._closing:
            return
        cap = self.limits.stress_timeout
        if self._idle_until is not None and self._idle_until - self.factory.clock.seconds() > cap:
            self._arm()
        if self._data_call is not None:
            self._schedule_data_deadline()

    def timeoutConnection(self) -> None:
        self._idle_until = None
        log.info("timeout for {peer}: idle in {phase}", event="inbound.timeout",
                 peer=self.peer_ip, phase="data" if self._in_data() else "command",
                 limit="idle", stress=self.factory.stressed)
        self.send(reply.TIMEOUT)
        self._close()

    def _start_data_clock(self) -> None:
        self._data_started = self.factory.clock.seconds()
        self._data_octets = 0
        self._schedule_data_deadline()

    def _stop_data_clock(self) -> None:
        if self._data_call is not None and self._data_call.active():
            self._data_call.cancel()
        self._data_call = None

    def _data_deadline(self) -> tuple[float, str]:
        """
        When the message data must be complete, and which limit says so:
        C{data-time} ([limits] data_time after the 354), or C{data-rate}:
        the grace, then one second for every C{min_data_rate} octets
        received (Postfix's smtpd_min_data_rate works the same way).
        """
        limits = self.limits
        deadline, which = self._data_started + limits.data_time, "data-time"
        if limits.min_data_rate:
            grace = limits.data_rate_grace
            cap = self.factory.stress_timeout()
            if cap is not None:
                grace = min(grace, cap)
            by_rate = self._data_started + grace + self._data_octets / limits.min_data_rate
            if by_rate < deadline:
                deadline, which = by_rate, "data-rate"
        return deadline, which

    def _schedule_data_deadline(self) -> None:
        clock = self.factory.clock
        delay = max(0.0, self._data_deadline()[0] - clock.seconds())
        if self._data_call is not None and self._data_call.active():
            self._data_call.reset(delay)
        else:
            self._data_call = clock.callLater(delay, self._data_deadline_reached)

    def _data_deadline_reached(self) -> None:
        """
        The deadline computed earlier came: octets received since may have
        moved it on (a new timer then; no timer is touched per octet).
        """
        self._data_call = None
        if not self._in_data() or self._closing:
            return
        now = self.factory.clock.seconds()
        deadline, which = self._data_deadline()
        if deadline > now + 1e-6:
            self._data_call = self.factory.clock.callLater(deadline - now,
                                                           self._data_deadline_reached)
            return
        log.info("timeout for {peer}: {limit} in data ({octets} octets in {seconds:.0f} s)",
                 event="inbound.timeout", peer=self.peer_ip, phase="data", limit=which,
                 stress=self.factory.stressed, octets=self._data_octets,
                 seconds=now - self._data_started)
        self.send(reply.DATA_TOO_SLOW if which == "data-rate" else reply.DATA_TOO_LONG)
        self._close()

    def handshakeCompleted(self) -> None:
        conn = self.transport.getHandle()
        self.tls_active = True
        self.tls_info = {
            "version": conn.get_protocol_version_name(),
            "cipher": conn.get_cipher_name(),
            "bits": str(conn.get_cipher_bits()),
        }
        log.info("TLS with {peer}: {version} {cipher}", event="inbound.tls",
                 peer=self.peer_ip, **self.tls_info)

    def send(self, r: Reply, error: bool = True) -> None:
        """
        Write C{r}; a 4xx/5xx reply counts towards [limits] errors unless
        C{error} is false (or it is a 421: the session ends anyway).
        """
        if self._inbuf:
            # Pipelined commands are waiting: their replies go out together
            # in one segment at the end of the turn, as Twisted buffers them
            # (sent one by one, Nagle would hold back all but the first
            # until the client's delayed ACK).
            self.transport.write(r.wire())
        else:
            write_now(self.transport, r.wire())
        if error and r.code >= 400 and r.code != 421 and not self._closing:
            self._count_error()

    def _count_error(self) -> None:
        """
        One more error; at [limits] errors (under stress: the first) the
        session ends with 421.
        """
        self._errors += 1
        limit = 1 if self.factory.stressed else self.limits.errors
        if self._errors >= limit:
            log.info("too many errors from {peer}; disconnecting", event="inbound.error-limit",
                     peer=self.peer_ip, stress=self.factory.stressed)
            self.transport.write(reply.TOO_MANY_ERRORS.wire())
            self._close()

    def _junk_command(self, r: Reply) -> None:
        """
        Answer a command that moves no mail (NOOP, VRFY, RSET, HELP).  Past
        [limits] junk_commands (under stress: past the first) each one counts
        as an error, so a client cannot hold a connection by sending one
        every few seconds (the idle timeout alone would never fire).
        """
        self._junk += 1
        self.send(r)
        limit = 1 if self.factory.stressed else self.limits.junk_commands
        if self._junk > limit and r.code < 400 and not self._closing:
            self._count_error()

    def _close(self) -> None:
        self._closing = True
        self._inbuf = b""
        self.transport.loseConnection()

    # -- input loop ---------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._inbuf += data
        if self._reader is not None and not self._bdat:  # DATA; BDAT counts its chunks
            self._data_octets += len(data)
            self._arm()
        self._process()

    def _process(self) -> None:
        try:
            self._consume()
        except Exception:
            log.failure("internal error in the session with {peer}",
                        event="inbound.error", peer=self.peer_ip)
            if self._writer is not None:
                self._writer.abort()
                self._writer = None
            self._reader = None
            self._bdat = False
            self._chunk_left = None
            self._stop_data_clock()
            self._busy = False
            self._reset_transaction()
            self.send(reply.LOCAL_ERROR)
            self._close()

    def _consume(self) -> None:
        while self._inbuf and not self._busy and not self._closing:
            if self._chunk_left is not None:
                self._read_chunk()
                continue
            if self._reader is not None and not self._bdat:
                consumed, done = self._reader.feed(self._inbuf)
                self._inbuf = self._inbuf[consumed:]
                if not done:
                    return
                self._end_of_data()
                continue
            idx = self._inbuf.find(b"\r\n")
            limit = self.limits.command_line_length
            if idx < 0:
                if len(self._inbuf) >= limit:
                    keep = 1 if self._inbuf.endswith(b"\r") else 0
                    if not self._skipping_line:
                        self.send(reply.LINE_TOO_LONG)
                    self._skipping_line = True
                    self._inbuf = self._inbuf[len(self._inbuf) - keep:]
                return
            line, self._inbuf = self._inbuf[:idx], self._inbuf[idx + 2:]
            if self._skipping_line:
                self._skipping_line = False
                continue
            if idx + 2 > limit:
                self.send(reply.LINE_TOO_LONG)
                continue
            self._arm()
            if self._continuation is not None:
                handler, self._continuation = self._continuation, None
                handler(line)
            else:
                self._command(line)

    def _command(self, line: bytes) -> None:
        if b"\r" in line or b"\n" in line:
            self.send(reply.BARE_NEWLINE_COMMAND)
            return
        if len(line.translate(None, _FORBIDDEN_COMMAND_BYTES)) != len(line):
            self.send(reply.INVALID_CHARS)
            return
        try:
            text = line.decode("utf-8").strip(" \t")
        except UnicodeDecodeError:
            self.send(reply.INVALID_CHARS)
            return
        if not text:
            self.send(reply.BAD_SYNTAX)
            return
        verb, _, arg = text.partition(" ")
        if not text.isascii() and (verb.upper() not in _UTF8_VERBS
                                   or any("\x80" <= c <= "\x9f" for c in text)):
            self.send(reply.INVALID_CHARS)
            return
        handler = getattr(self, "smtp_" + verb.upper(), None)
        if handler is None:
            self.send(reply.UNKNOWN_COMMAND)
            return
        handler(arg.strip(" \t"))

    # -- session state --------------------------------------------------------

    def _in_data(self) -> bool:
        """
        Whether message data is being read: after DATA's 354, inside a BDAT
        chunk, or between the chunks of a BDAT message.
        """
        return self._reader is not None or self._chunk_left is not None

    def _reset_transaction(self) -> None:
        if getattr(self, "milters", None) is not None and self.sender is not _NOT_SET:
            self.milters.abort()
        if self._bdat:  # RSET, EHLO, STARTTLS between chunks: RFC 3030 2, discard them
            self._discard_bdat_message()
        self._bdat_failed = False
        self.sender: Any = _NOT_SET
        self.mail_params: dict[str, str | None] = {}
        self.recipients: list[Recipient] = []
        self._overshoot = 0  # RCPTs refused for the recipient limit

    @property
    def smtputf8(self) -> bool:
        """The transaction's MAIL had SMTPUTF8 (RFC 6531)."""
        return "SMTPUTF8" in self.mail_params

    @property
    def protocol_name(self) -> str:
        # RFC 6531 4 (and 3.7.3): UTF8SMTP, UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA.
        name = "UTF8SMTP" if self.smtputf8 else ("ESMTP" if self.esmtp else "SMTP")
        if self.tls_active:
            name += "S"
        if self.user is not None:
            name += "A"
        return name

    # -- commands -----------------------------------------------------------

    def smtp_EHLO(self, arg: str) -> None:
        if not arg:
            self.send(reply.HELO_REQUIRED)
            return
        self.helo_name = self._helo_name(arg)
        self.esmtp = True
        self._reset_transaction()
        self._milters_helo()
        lines = [f"{self.host.decode()} Hello [{self.peer_ip}]"]
        lines += [k.decode() + (" " + b" ".join(v).decode() if v else "")
                  for k, v in self.extensions().items()]
        self.send(Reply(250, None, "\n".join(lines)))

    def smtp_HELO(self, arg: str) -> None:
        if not arg:
            self.send(reply.HELO_REQUIRED.with_text("Syntax: HELO hostname"))
            return
        self.helo_name = self._helo_name(arg)
        self.esmtp = False
        self._reset_transaction()
        self._milters_helo()
        self.send(Reply(250, None, f"{self.host.decode()} Hello [{self.peer_ip}]"))

    def _helo_name(self, arg: str) -> str:
        """
        The name the client gave, cut to L{HELO_NAME_MAX} octets (with
        C{...} to show it was cut).  Commands are ASCII, so octets are
        characters.
        """
        name = arg.split()[0]
        if len(name) > HELO_NAME_MAX:
            log.info("EHLO/HELO name from {peer} of {length} octets cut to {max}",
                     event="inbound.helo-truncated", peer=self.peer_ip, length=len(name),
                     max=HELO_NAME_MAX)
            name = name[:HELO_NAME_MAX] + "..."
        return name

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self.limits.message_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
            b"DSN": None,
            b"SMTPUTF8": None,  # RFC 6531 (with 8BITMIME, as 3.1 item 8 requires)
        }
        if self.config.inbound.chunking:
            ext[b"CHUNKING"] = None
        if self.canStartTLS and not self.tls_active:
            ext[b"STARTTLS"] = None
        if self.tls_active:  # RFC 8689 2: only a TLS session may carry REQUIRETLS
            ext[b"REQUIRETLS"] = None
        if self._auth_offered():
            ext[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        return ext

    def _auth_offered(self) -> bool:
        # Credentials never cross cleartext: AUTH exists only inside TLS.
        return self.factory.users is not None and self.tls_active and self.user is None

    def smtp_STARTTLS(self, arg: str) -> None:
        if arg:
            self.send(reply.NO_PARAMETERS)
            return
        if self.tls_active:
            self.send(reply.TLS_ALREADY)
            return
        if not self.canStartTLS:
            self.send(reply.TLS_NOT_AVAILABLE)
            return
        # Anything pipelined after STARTTLS arrived in cleartext: discard it.
        self._inbuf = b""
        self.send(reply.READY_TLS)
        self.helo_name = None
        self.esmtp = False
        self.user = None
        self._reset_transaction()
        self.transport.startTLS(self.ctx)
        self.startedTLS = True
        self.tls_active = True

    def _tls_required(self) -> bool:
        return (self.factory.role == "submission" and self.ctx is not None
                and not self.tls_active)

    def smtp_MAIL(self, arg: str) -> None:
        if self.helo_name is None:
            self.send(reply.NEED_EHLO)
            return
        if self._tls_required():
            self.send(reply.TLS_REQUIRED)
            return
        if (self.factory.role != "mx" and self.factory.users is not None
                and self.user is None and not self.factory.is_trusted(self.peer_ip)):
            self.send(reply.AUTH_REQUIRED)
            return
        if self.sender is not _NOT_SET:
            self.send(reply.NESTED_MAIL)
            return
        try:
            parsed = parse_mail_from(arg)
        except NonASCIIAddress:
            self.send(reply.NON_ASCII_SENDER)
            return
        except AddressError as e:
            if not arg.upper().startswith("FROM:"):
                self.send(reply.BAD_MAIL_SYNTAX)
            else:
                self.send(reply.BAD_SENDER_ADDRESS.with_text(f"Bad sender address: {e}"))
            return
        problem = self._check_mail_params(parsed.params)
        if problem is None and not self._may_send_as(parsed.address):
            problem = reply.SENDER_NOT_OWNED.with_text(
                f"<{parsed.address or ''}>: sender address not owned by user {self.user}")
        if problem is not None:
            self.send(problem)
            return
        if self.milters is not None:
            self._milter_gate(self.milters.mail(
                str(parsed.address or ""), _params(parsed.params), self._milter_macros()),
                lambda: self._mail_ok(parsed))
            return
        self._mail_ok(parsed)

    def _mail_ok(self, parsed) -> None:
        self.sender = parsed.address
        self.mail_params = parsed.params
        self._bdat_failed = False  # a new message: its chunks are welcome
        self.send(reply.SENDER_OK)

    def _may_send_as(self, address: Address | None) -> bool:
        if self.user is None or not self.config.auth.sender_login_match:
            return True
        if address is None:
            return False
        if "@" in self.user:
            return canonical_name(str(address)) == self.user
        return (canonical_name(address.local) == self.user
                and self.factory.directory.is_local_domain(address.domain))

    def _check_mail_params(self, params: dict[str, str | None]) -> Reply | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return reply.BAD_MAIL_SYNTAX.with_text("Syntax: SIZE=<octets>")
                if int(value) > self.limits.message_size:
                    return reply.MESSAGE_TOO_BIG.with_text(
                        f"Message size exceeds the limit of {self.limits.message_size} octets")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return reply.PARAM_UNKNOWN.with_text("BODY must be 7BIT or 8BITMIME")
            elif key == "SMTPUTF8":  # RFC 6531 3.4: a keyword without a value
                if value is not None:
                    return reply.BAD_MAIL_SYNTAX.with_text("Syntax: SMTPUTF8 takes no value")
            elif key == "AUTH":
                continue  # RFC 4954 5: ignored from unauthenticated clients
            elif key == "REQUIRETLS":  # RFC 8689 2: a keyword without a value
                if value is not None:
                    return reply.BAD_MAIL_SYNTAX.with_text(
                        "Syntax: REQUIRETLS takes no value")
                if not self.tls_active:
                    return reply.REQUIRETLS_NEEDS_TLS
            elif key in ("RET", "ENVID"):
                try:
                    (dsn_params.parse_ret if key == "RET" else dsn_params.parse_envid)(value)
                except dsn_params.DSNParamError as e:
                    return reply.BAD_MAIL_SYNTAX.with_text(str(e))
            else:
                return reply.PARAM_UNKNOWN.with_text(f"Unsupported MAIL parameter {key}")
        return None

    def smtp_RCPT(self, arg: str) -> None:
        if self.sender is _NOT_SET:
            self.send(reply.NEED_MAIL)
            return
        if self._bdat:  # the envelope was written with the first chunk
            self.send(reply.RCPT_AFTER_BDAT)
            return
        try:
            parsed = parse_rcpt_to(arg, utf8=self.smtputf8)
        except NonASCIIAddress:
            self.send(reply.NON_ASCII_RECIPIENT)
            return
        except AddressError as e:
            if not arg.upper().startswith("TO:"):
                self.send(reply.BAD_RCPT_SYNTAX)
            else:
                self.send(reply.BAD_ADDRESS.with_text(f"Bad recipient address: {e}"))
            return
        notify, orcpt = None, None
        for key, value in parsed.params.items():
            try:
                if key == "NOTIFY":
                    notify = dsn_params.parse_notify(value)
                elif key == "ORCPT":
                    orcpt = dsn_params.parse_orcpt(value, utf8=self.smtputf8)
                else:
                    self.send(reply.PARAM_UNKNOWN.with_text(f"Unsupported RCPT parameter {key}"))
                    return
            except dsn_params.DSNParamError as e:
                self.send(reply.BAD_RCPT_SYNTAX.with_text(str(e)))
                return
        if len(self.recipients) >= self.limits.recipients:
            # Not the client's error (RFC 5321 4.5.3.1.10: it sends the
            # rest in another transaction): like Postfix, the first
            # RECIPIENT_OVERSHOOT of these do not count towards [limits]
            # errors, so the accepted recipients still get the message.
            self._overshoot += 1
            self.send(reply.TOO_MANY_RECIPIENTS, error=self._overshoot > RECIPIENT_OVERSHOOT)
            return
        verdict, finals = self._route_recipient(parsed.address)
        if verdict is not reply.RECIPIENT_OK:
            log.info("recipient {rcpt} from {peer} refused: {reply}", event="inbound.rcpt-refused",
                     rcpt=str(parsed.address), peer=self.peer_ip, reply=verdict.text)
            self.send(verdict)
            return
        given = str(parsed.address)
        if self.milters is not None:
            self._milter_gate(self.milters.rcpt(given, _params(parsed.params)),
                              lambda: self._rcpt_ok(given, finals, notify, orcpt))
            return
        self._rcpt_ok(given, finals, notify, orcpt)

    def _rcpt_ok(self, given: str, finals: tuple[str, ...], notify, orcpt) -> None:
        known = {r.address for r in self.recipients}
        for final in finals:
            if final not in known:
                original = given if final != given else None
                self.recipients.append(Recipient(address=final, original=original,
                                                 notify=notify, orcpt=orcpt))
        self.send(reply.RECIPIENT_OK)

    def _route_recipient(self, address: Address) -> tuple[Reply, tuple[str, ...]]:
        directory = self.factory.directory
        if not address.domain or directory.is_local_domain(address.domain):
            try:
                return reply.RECIPIENT_OK, directory.expand(str(address))
            except UnknownRecipient:
                return reply.NO_SUCH_USER.with_text(f"<{address}>: no such user here"), ()
            except AliasLoop:
                log.error("alias loop expanding {rcpt}", event="inbound.alias-loop",
                          rcpt=str(address))
                return reply.LOCAL_ERROR.with_text("Alias loop in local configuration"), ()
        if self.user is not None or self.factory.is_trusted(self.peer_ip):
            return reply.RECIPIENT_OK, (str(address),)
        return reply.RELAY_DENIED.with_text(f"<{address}>: relay access denied"), ()

    def smtp_DATA(self, arg: str) -> None:
        if arg:
            self.send(reply.NO_PARAMETERS)
            return
        if self.sender is _NOT_SET:
            self.send(reply.NEED_MAIL)
            return
        if self._bdat:
            self.send(reply.DATA_AFTER_BDAT)
            return
        if not self.recipients:
            self.send(reply.NO_VALID_RECIPIENTS)
            return
        self._start_message(raw=False)
        self._start_data_clock()
        self.send(reply.START_INPUT)

    def _start_message(self, raw: bool) -> None:
        """
        Open the spool file for the transaction's message and the reader
        that fills it: one for DATA and BDAT alike.
        """
        self._writer = self.factory.spool.new_message()
        self._bdat_chunks = 0
        self._envelope = self._make_envelope(self._writer.queue_id)
        self._writer.begin(self._envelope)
        self._writer.write(self._received_header(self._writer.queue_id))
        self._reader = DataReader(
            self._writer.write,
            max_size=self.limits.message_size,
            max_line=self.limits.data_line_length,
            max_received=self.limits.received_headers,
            bare_newline=self.config.inbound.bare_newline,
            raw=raw,
        )
        self._arm()

    # -- BDAT (RFC 3030) ------------------------------------------------------

    def smtp_BDAT(self, arg: str) -> None:
        if not self.config.inbound.chunking:  # not offered: an unknown command
            self.send(reply.UNKNOWN_COMMAND)
            return
        parts = arg.split()
        if (not 1 <= len(parts) <= 2 or not parts[0].isdigit()
                or (len(parts) == 2 and parts[1].upper() != "LAST")):
            # Without a count the chunk's end is unknown, so its octets and
            # the next commands cannot be told apart: stop here.
            log.info("malformed BDAT from {peer}; closing", event="inbound.bdat-syntax",
                     peer=self.peer_ip)
            self.send(reply.BDAT_SYNTAX)
            self._close()
            return
        size, last = int(parts[0]), len(parts) == 2
        # The rest of a refused message is not counted again as errors.
        counts = not self._bdat_failed
        refusal = self._bdat_refusal(size)
        if refusal is None:
            if not self._bdat:
                self._start_message(raw=True)
                self._bdat = True
                self._bdat_declared = self._bdat_chunks = 0
                self._start_data_clock()
            self._bdat_declared += size
            self._bdat_chunks += 1
        if refusal is not None and self._data_call is None:
            self._start_data_clock()  # a discarded chunk is read under the same limits
        self._chunk_left, self._chunk_size, self._chunk_last = size, size, last
        self._chunk_refusal, self._chunk_counts = refusal, counts
        self._arm()
        if size == 0:
            self._chunk_done()

    def _bdat_refusal(self, size: int) -> Reply | None:
        """
        Why the chunk that follows cannot be taken (it is then read and
        discarded), or None.
        """
        if self._bdat_failed:
            return reply.BDAT_AFTER_FAILURE
        if self.sender is _NOT_SET:
            return reply.NEED_MAIL
        if not self.recipients:
            return reply.NO_VALID_RECIPIENTS
        total = (self._bdat_declared if self._bdat else 0) + size
        if total > self.limits.message_size:
            # Refused on its declared size before reading (RFC 1870 and
            # 3030): nothing of it or of the rest of the message is stored.
            log.info("message from {peer} refused: BDAT chunks of {size} octets exceed the "
                     "limit", event="inbound.data-refused", peer=self.peer_ip,
                     size=total, reply="message too big")
            self._reset_transaction()
            self._bdat_failed = True
            return reply.MESSAGE_TOO_BIG.with_text(
                f"Message exceeds the size limit of {self.limits.message_size} octets")
        return None

    def _read_chunk(self) -> None:
        """
        Take what has arrived of the current chunk (never more), and feed it
        to the reader unless the chunk is discarded.
        """
        n = min(self._chunk_left, len(self._inbuf))
        if n == len(self._inbuf):
            data, self._inbuf = self._inbuf, b""
        else:
            data, self._inbuf = self._inbuf[:n], self._inbuf[n:]
        self._chunk_left -= n
        self._data_octets += n
        self._arm()
        if self._chunk_refusal is None:
            data = self._bdat_carry + data if self._bdat_carry else data
            consumed, _ = self._reader.feed(data)
            self._bdat_carry = data[consumed:]
        if self._chunk_left == 0:
            self._chunk_done()

    def _chunk_done(self) -> None:
        """
        The chunk's octets are all read: answer it.
        """
        self._chunk_left = None
        refusal, self._chunk_refusal = self._chunk_refusal, None
        self._arm()
        if refusal is not None:
            if self._chunk_last:
                self._bdat_failed = False  # that was the refused message's end
            if not self._bdat:
                self._stop_data_clock()
            self.send(refusal, error=self._chunk_counts)
            return
        reader = self._reader
        if self._chunk_last:
            reader.finish(self._bdat_carry)
            self._bdat_carry = b""
            self._bdat = False
            self._end_of_data()
            return
        if reader.error is not None:
            # Refused now rather than at LAST: the client must not send more
            # chunks (RFC 3030 2), and those it pipelined are discarded.
            log.info("message from {peer} refused: {reply}", event="inbound.data-refused",
                     peer=self.peer_ip, reply=str(reader.error.text))
            self._reset_transaction()
            self._bdat_failed = True
            self.send(reader.error)
            return
        self.send(reply.OK.with_text(f"Ok: {self._chunk_size} octets received"))

    def _discard_bdat_message(self) -> None:
        self._bdat = False
        self._bdat_carry = b""
        self._reader = None
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._stop_data_clock()

    def _make_envelope(self, queue_id: str) -> Envelope:
        now = self.factory.clock.seconds()
        client = {"helo": self.helo_name or "", "ip": self.peer_ip,
                  "protocol": self.protocol_name, "listener": self.factory.role}
        if self.tls_info:
            client["tls"] = f"{self.tls_info['version']} {self.tls_info['cipher']}"
        return Envelope(
            queue_id=queue_id,
            sender=str(self.sender) if self.sender is not None else "",
            recipients=tuple(self.recipients),
            arrival=now,
            client=client,
            next_attempt=now,
            ret=(self.mail_params.get("RET") or "").upper() or None,
            envid=(dsn_params.parse_envid(self.mail_params["ENVID"])
                   if self.mail_params.get("ENVID") else None),
            requiretls="REQUIRETLS" in self.mail_params,
            smtputf8=self.smtputf8,
        )

    def _received_header(self, queue_id: str) -> bytes:
        helo = self.helo_name or "unknown"  # at most HELO_NAME_MAX + 3 octets
        parts = [f"Received: from {helo} ([{self.peer_ip}])"]
        if len(parts[0]) > 78:  # RFC 5322 2.1.1: fold where a line would grow long
            parts = [f"Received: from {helo}", f"\t([{self.peer_ip}])"]
        parts += [f"\tby {self.host.decode()} (twisted-mta) with {self.protocol_name} id {queue_id}"]
        if self.tls_info:
            t = self.tls_info
            parts.append(f"\t(using {t['version']} with cipher {t['cipher']} ({t['bits']} bits))")
        if len(self.recipients) == 1:
            parts.append(f"\tfor <{self.recipients[0].address}>")
        parts[-1] += ";"
        parts.append("\t" + received_date(self.factory.clock.seconds()))
        return ("\r\n".join(parts) + "\r\n").encode("utf-8", "replace")

    def _end_of_data(self) -> None:
        reader, writer = self._reader, self._writer
        self._reader = None
        self._stop_data_clock()
        if reader.error is not None:
            self._arm()
            self._writer = None
            writer.abort()
            log.info("message from {peer} refused: {reply}", event="inbound.data-refused",
                     peer=self.peer_ip, reply=str(reader.error.text))
            self._reset_transaction()
            self.send(reader.error)
            return
        envelope = attrs.evolve(self._envelope, size=reader.size)
        if not envelope.requiretls and tls_required_no(reader.tls_required):
            # RFC 8689 4.1: without REQUIRETLS the header tags the message
            # (with it the header is ignored, and relayed as it came).
            envelope = attrs.evolve(envelope, tls_required_no=True)
        self._busy = True
        self._disarm()  # the client waits for us, not we for it
        if self.milters is not None:
            d = self._run_milters(writer, envelope)
            d.addErrback(self._milter_stage_broken)
        else:
            d = self._sign_and_commit(writer, envelope)
        d.addBoth(self._resume)

    def _sign_and_commit(self, writer, envelope: Envelope, held: str | None = None):
        """
        DKIM signing, the last change to the message (docs/configuration.md
        [dkim]; after the milters), then the commit: to hold/ when C{held}
        (a milter's quarantine reason).
        """
        signer = self.factory.signer
        source = (None if signer is None
                  else sign_source(self.user is not None, self.factory.is_trusted(self.peer_ip)))
        d = sign_queued(signer, writer, envelope, source)
        receipt = self.factory.on_receipt
        if held is None and receipt is not None:
            d.addCallback(self._deliver_or_commit, writer, receipt)
            return d
        d.addCallback(lambda env: writer.commit(env, hold=True) if held is not None
                      else writer.commit(env))
        d.addCallbacks(lambda env: self._queued(env, held=held), self._queue_failed)
        return d

    def _deliver_or_commit(self, envelope: Envelope, writer, receipt) -> defer.Deferred:
        """
        Delivery on receipt (delivery.local.OnReceipt): copied into the
        Maildirs before the 250 when every recipient is ours, else (and
        for what a failed copy leaves) queued.
        """
        targets = receipt.targets(envelope)
        if targets is None:
            return writer.commit(envelope).addCallbacks(self._queued, self._queue_failed)
        d = writer.deliver_or_commit(
            envelope, lambda path, env: receipt.deliver(path, env, targets))
        d.addCallbacks(self._delivered, self._queue_failed, callbackArgs=(targets,))
        return d

    def _delivered(self, result, targets) -> None:
        results, envelope = result
        now = self.factory.clock.seconds()
        changed = {}
        for target in targets:
            outcome = results[target.address]
            if outcome.code >= 400:
                continue
            changed[target.address] = attrs.evolve(
                envelope.recipients[target.index], state=DELIVERED, outcome=outcome,
                done_at=now)
            log.info("{queue_id}: delivered to <{rcpt}> in {maildir} on receipt",
                     event="delivery.delivered", queue_id=envelope.queue_id,
                     rcpt=target.address, maildir=target.maildir, reply=str(outcome),
                     sender=envelope.sender, on_receipt=True)
        envelope = envelope.with_results(changed)
        if not envelope.finished:  # the queue delivers the rest
            self._queued(envelope)
            return
        self._writer = None
        log.info("received {queue_id} from <{sender}> for {count} recipient(s), {size} octets, "
                 "delivered on receipt", event="inbound.delivered",
                 **self._accepted_fields(envelope))
        self.factory.storage.stored(now)
        self._reset_transaction()
        # "queued as": the words clients look for to learn the id.
        self.send(reply.OK.with_text(f"Ok: queued as {envelope.queue_id}"))
        try:
            self.factory.on_delivered(self.factory.role, len(envelope.recipients),
                                      now - envelope.arrival)
        except Exception:
            log.failure("could not count {queue_id}, delivered on receipt",
                        queue_id=envelope.queue_id, event="inbound.error")

    def _queued(self, envelope: Envelope, held: str | None = None) -> None:
        self._writer = None
        log.info("queued {queue_id} from <{sender}> for {count} recipient(s), {size} octets",
                 event="inbound.queued", held=held, **self._accepted_fields(envelope))
        self.factory.storage.stored(self.factory.clock.seconds())
        self._reset_transaction()
        self.send(reply.OK.with_text(f"Ok: queued as {envelope.queue_id}"))
        if held is not None:  # in hold/ until an operator releases it
            return
        try:
            self.factory.on_queued(envelope)
        except Exception:
            log.failure("queue manager did not take {queue_id}", queue_id=envelope.queue_id,
                        event="queue.error")

    def _accepted_fields(self, envelope: Envelope) -> dict:
        """The fields of the log line of a message accepted (queued or delivered)."""
        return dict(queue_id=envelope.queue_id, sender=envelope.sender,
                    count=len(envelope.recipients),
                    recipients=[r.address for r in envelope.recipients],
                    size=envelope.size, peer=self.peer_ip, requiretls=envelope.requiretls,
                    command="BDAT" if self._bdat_chunks else "DATA",
                    chunks=self._bdat_chunks, smtputf8=envelope.smtputf8,
                    tls_required_no=envelope.tls_required_no)

    def _queue_failed(self, failure: Failure) -> None:
        self._writer = None
        if failure.check(OSError):
            # A full disk, an I/O error: one line each, one warning per episode.
            self.factory.storage.failed(failure.value, self.peer_ip,
                                        self.factory.clock.seconds())
        else:  # a bug: its traceback
            log.failure("could not store a message from {peer}", failure,
                        event="inbound.queue-error", peer=self.peer_ip)
        self._reset_transaction()
        self.send(reply.QUEUE_WRITE_ERROR)

    def _resume(self, _: object) -> None:
        self._busy = False
        if self.transport is not None and not self._closing:
            self._arm()
            self._process()

    # -- milters (inbound.milter) -----------------------------------------------

    def _milter_macros(self) -> dict[str, str]:
        macros = {"j": self.host.decode(), "daemon_name": self.factory.role,
                  "client_addr": self.peer_ip}
        if self.user is not None:
            macros["auth_authen"] = self.user
            macros["auth_type"] = getattr(self, "_auth_mechanism", "PLAIN")
        if self.tls_info:
            macros.update(tls_version=self.tls_info["version"], cipher=self.tls_info["cipher"],
                          cipher_bits=self.tls_info["bits"])
        return macros

    def _milters_connect(self, peer) -> None:
        self.milters = self.factory.milters.session()
        family = {"IPv4Address": "4", "IPv6Address": "6",
                  "UNIXAddress": "L"}.get(type(peer).__name__, "U")
        d = self.milters.connect(f"[{self.peer_ip}]", family, getattr(peer, "port", 0) or 0,
                                 self.peer_ip, self._milter_macros())
        d.addErrback(lambda f: log.failure("milters: connect stage failed", f,
                                           event="milter.error"))

    def _milters_helo(self) -> None:
        # A refusal is answered at MAIL (the chain keeps it for the session).
        if self.milters is not None:
            self.milters.helo(self.helo_name or "", self._milter_macros()).addErrback(
                lambda f: log.failure("milters: HELO stage failed", f, event="milter.error"))

    def _milter_gate(self, d, then: Callable[[], None]) -> None:
        """
        Wait for the milters' verdict on a command: C{then} when they let
        it pass, else their reply.
        """
        self._busy = True
        self._disarm()

        def decided(refusal: Reply | None) -> None:
            if self.transport is None or self._closing:
                return
            if refusal is None:
                then()
            else:
                self.send(refusal)

        def broken(failure: Failure) -> None:
            log.failure("milter stage failed", failure, event="milter.error")
            self.send(reply.LOCAL_ERROR)

        d.addCallbacks(decided, broken)
        d.addBoth(self._resume)

    def _milter_stage_broken(self, failure: Failure) -> None:
        """A bug in the milter stage: the message is not taken, the client told 451."""
        log.failure("milter stage failed", failure, event="milter.error")
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._reset_transaction()
        if self.transport is not None and not self._closing:
            self.send(reply.LOCAL_ERROR)

    def _run_milters(self, writer, envelope: Envelope):
        """
        The content past the milters, then the commit of what they
        approved (with their edits), to hold/ when one quarantined it.
        """
        chain = self.milters
        assert chain is not None
        d = writer.flush()
        d.addCallback(lambda _: chain.message(writer.path, writer.queue_id, envelope,
                                              self.limits.message_size))

        def decided(outcome):
            if self.transport is None or self._closing or writer.closed:
                writer.abort()
                return None
            if outcome.reply is not None or outcome.discard:
                self._writer = None
                writer.abort()
                self._reset_transaction()
                if outcome.discard:
                    self.send(reply.OK.with_text("Ok: discarded by a mail filter"))
                else:
                    self.send(outcome.reply)
                return None
            final = outcome.envelope
            d2 = writer.adopt(writer.path + ".milter") if outcome.rewritten else defer.succeed(None)
            if outcome.rewritten:
                final = attrs.evolve(final, size=outcome.size)
            d2.addCallback(lambda _: self._sign_and_commit(writer, final, outcome.quarantine))
            return d2

        def failed(failure: Failure):
            writer.abort()
            return self._queue_failed(failure)

        d.addCallbacks(decided, failed)
        return d

    # -- AUTH (RFC 4954; PLAIN, RFC 4616; LOGIN) --------------------------------

    def smtp_AUTH(self, arg: str) -> None:
        if self.factory.users is None:
            self.send(reply.UNKNOWN_COMMAND)
            return
        if not self.tls_active:
            self.send(reply.AUTH_NEEDS_TLS)
            return
        if self.user is not None:
            self.send(reply.AUTH_ALREADY)
            return
        if self.sender is not _NOT_SET:
            self.send(reply.AUTH_IN_TRANSACTION)
            return
        if self.factory.auth_blocked(self.peer_ip):
            self._auth_locked_out()
            return
        mechanism, _, initial = arg.partition(" ")
        mechanism = mechanism.upper()
        self._auth_mechanism = mechanism  # the {auth_type} milters get
        initial = initial.strip()
        if mechanism == "PLAIN":
            if initial:
                self._auth_plain(initial.encode())
            else:
                self.send(Reply(334, None, ""))
                self._continuation = self._auth_plain
        elif mechanism == "LOGIN":
            if initial:
                self._auth_login_user(initial.encode())
            else:
                self.send(Reply(334, None, "VXNlcm5hbWU6"))
                self._continuation = self._auth_login_user
        elif not mechanism:
            self.send(reply.AUTH_SYNTAX)
        else:
            self.send(reply.AUTH_MECHANISM)

    def _decode(self, line: bytes) -> bytes | None:
        if line.strip() == b"*":
            self.send(reply.AUTH_CANCELLED)
            return None
        if line.strip() == b"=":
            return b""  # RFC 4954 4: "=" is an empty initial response
        try:
            return base64.b64decode(line.strip(), validate=True)
        except (binascii.Error, ValueError):
            self.send(reply.AUTH_BAD_BASE64)
            return None

    def _auth_plain(self, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is None:
            return
        parts = decoded.split(b"\x00")
        if len(parts) != 3 or not parts[1]:
            self._auth_failed("malformed PLAIN response")
            return
        authzid, authcid, password = parts
        if authzid and authzid.lower() != authcid.lower():
            self._auth_failed("authorization identity differs from the user")
            return
        self._auth_check(authcid, password)

    def _auth_login_user(self, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is None:
            return
        self.send(Reply(334, None, "UGFzc3dvcmQ6"))
        self._continuation = lambda l: self._auth_login_password(decoded, l)

    def _auth_login_password(self, user: bytes, line: bytes) -> None:
        decoded = self._decode(line)
        if decoded is not None:
            self._auth_check(user, decoded)

    def _auth_check(self, user: bytes, password: bytes) -> None:
        try:
            name, secret = user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            self._auth_failed("not UTF-8")
            return
        self._busy = True
        self._disarm()
        d = self.factory.run_blocking(self.factory.users.check, name, secret)

        def checked(canonical):
            if self.transport is None or self._closing:
                return
            if canonical is None:
                self._auth_failed(f"wrong password or unknown user {name!r}")
            else:
                self.user = canonical
                log.info("{peer} authenticated as {user}", event="inbound.auth",
                         peer=self.peer_ip, user=canonical)
                self.send(reply.AUTH_OK)

        def broken(failure):
            log.failure("password check failed", failure, event="inbound.error")
            self.send(reply.LOCAL_ERROR)

        d.addCallbacks(checked, broken)
        d.addBoth(self._resume)

    def _auth_failed(self, why: str) -> None:
        self.factory.note_auth_failure(self.peer_ip)
        log.info("AUTH failed for {peer}: {why}", event="inbound.auth-failed",
                 peer=self.peer_ip, why=why)
        self.send(reply.AUTH_FAILED)
        if self.factory.auth_blocked(self.peer_ip):
            self._auth_locked_out()

    def _auth_locked_out(self) -> None:
        log.info("{peer}: too many failed AUTH attempts", event="inbound.auth-blocked",
                 peer=self.peer_ip)
        self.send(reply.AUTH_TOO_MANY)
        self._close()

    def smtp_RSET(self, arg: str) -> None:
        if arg:
            self.send(reply.NO_PARAMETERS)
            return
        self._reset_transaction()
        self._junk_command(reply.RESET_OK)

    def smtp_NOOP(self, arg: str) -> None:
        self._junk_command(reply.NOOP_OK)

    def smtp_VRFY(self, arg: str) -> None:
        self._junk_command(reply.VRFY_CANNOT)

    def smtp_EXPN(self, arg: str) -> None:
        self.send(reply.NOT_IMPLEMENTED)

    def smtp_HELP(self, arg: str) -> None:
        self._junk_command(reply.HELP)

    def smtp_QUIT(self, arg: str) -> None:
        self.send(reply.BYE)
        self._close()
