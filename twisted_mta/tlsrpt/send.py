"""
Sending one domain's TLS report to the places its record names (RFC 8460
§5): by mail, a DKIM-signed C{multipart/report} queued through our own
queue; by HTTPS, a POST retried with back-off for a bounded time.

A report by mail goes from the null reverse-path C{<>} with NOTIFY=NEVER
on its recipient: if it cannot be delivered, nobody is told (no bounce,
not even to our postmaster), so a failing report never makes more mail
nor a report about a report.  It carries C{TLS-Required: No}: the
rua domain's own TLS problems must not stop it (RFC 8460 §3).
"""

from __future__ import annotations

import datetime
import email.utils
import errno
import ipaddress
import uuid
from email.message import EmailMessage
from email.policy import SMTP
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta.model import Envelope, Recipient
from twisted_mta.tlsrpt.record import Rua

log = Logger()

GZIP_TYPE = "application/tlsrpt+gzip"
FIRST_RETRY = 60.0  # seconds before the first HTTPS retry; doubled each time
MAX_RETRY_INTERVAL = 3600.0


@attrs.frozen
class Report:
    """
    One report ready to go: the policy domain, the report's JSON as a dict
    (for the subject and the words), its gzip'd body and file name.
    """

    policy_domain: str
    submitter: str
    report: dict
    body: bytes  # the gzip'd JSON
    filename: str

    @property
    def report_id(self) -> str:
        return str(self.report.get("report-id", ""))


@attrs.frozen
class Outcome:
    rua: Rua
    sent: bool
    detail: str  # the queue id, the HTTP status, or why it failed
    # Done with for good (sent, given up, no key); False when the next run
    # should try again: the disk refused the mail, or the MTA stopped.
    final: bool = True


def _day(report: dict, key: str) -> str:
    value = report.get("date-range", {}).get(key, "")
    return str(value)


def report_message(report: Report, *, from_address: str, to: str, now: float,
                   hostname: str, message_id: str | None = None) -> bytes:
    """
    The report message (RFC 8460 §5.3), CRLF line ends, unsigned: a text
    part in plain words, then the gzip'd report as an attachment.
    """
    r = report.report
    msg = EmailMessage(policy=SMTP.clone(max_line_length=998))
    msg["From"] = from_address
    msg["To"] = to
    msg["Date"] = email.utils.formatdate(now, usegmt=True)
    msg["Message-ID"] = message_id or f"<{uuid.uuid4().hex}@{hostname}>"
    msg["Subject"] = (f"Report Domain: {report.policy_domain} Submitter: {report.submitter} "
                      f"Report-ID: <{report.report_id}>")
    msg["TLS-Report-Domain"] = report.policy_domain
    msg["TLS-Report-Submitter"] = report.submitter
    # Deliver it past the recipient's TLS policy failures (RFC 8460 3).
    msg["TLS-Required"] = "No"
    msg["MIME-Version"] = "1.0"
    start, end = _day(r, "start-datetime"), _day(r, "end-datetime")
    summary = [p.get("summary", {}) for p in r.get("policies", [])]
    ok = sum(s.get("total-successful-session-count", 0) for s in summary)
    failed = sum(s.get("total-failure-session-count", 0) for s in summary)
    text = (f"This is an aggregate TLS report (RFC 8460) from {r.get('organization-name', '')}"
            f" for the mail we sent to {report.policy_domain}\n"
            f"from {start} to {end}: {ok} successful and {failed} failed TLS sessions.\n"
            f"The report is attached as {report.filename}.\n"
            f"Contact: {r.get('contact-info', '')}\n")
    # organization_name may be any text: 7bit only while it is ASCII.
    msg.set_content(text, cte="7bit" if text.isascii() else "quoted-printable")
    msg.add_attachment(report.body, maintype="application", subtype="tlsrpt+gzip",
                       filename=report.filename)
    # multipart/mixed from add_attachment; RFC 8460 5.3 wants multipart/report.
    # Its boundary is made here: add_attachment leaves it to the generator,
    # so get_boundary() would still be None.
    msg.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; '
                       f'boundary="=_tlsrpt_{uuid.uuid4().hex}"')
    return msg.as_bytes(policy=SMTP.clone(max_line_length=998))


class MailReports:
    """
    Queues a signed report message as a new entry, like the DSNs: written
    and fsync'd by the spool before L{queue} fires.
    """

    def __init__(self, spool, enqueue: Callable[[Envelope], None], signer, clock,
                 from_address: Callable[[str], str], hostname: str) -> None:
        self.spool = spool
        self.enqueue = enqueue
        self.signer = signer  # a dkim.Signer, or None without [dkim] keys
        self.clock = clock
        self.from_address = from_address  # the submitter domain -> the From address
        self.hostname = hostname

    def can_sign(self, report: Report) -> bool:
        return self.signer is not None and self.signer.can_sign(report.submitter)

    @defer.inlineCallbacks
    def queue(self, report: Report, to: str):
        """
        Fires with the new entry's queue id once it is on disk.
        """
        now = self.clock.seconds()
        message = report_message(report, from_address=self.from_address(report.submitter),
                                 to=to, now=now, hostname=self.hostname)
        message = self.signer.sign(message, report.submitter, tlsrpt=True)
        entry = yield self.spool.queue_local(
            message, sender="", recipients=(Recipient(address=to, notify=()),), arrival=now,
            next_attempt=now, client={"protocol": "local", "tlsrpt_for": report.policy_domain},
            tls_required_no=True)
        self.enqueue(entry)
        return entry.queue_id


class HTTPSReports:
    """
    POSTs a report (RFC 8460 §5.4): 2xx is sent; anything else is tried
    again after 1, 2, 4, ... minutes (at most an hour apart) until
    C{retry_for} seconds have passed since the first try, then given up.
    A redirect is not followed (it counts as a failure).
    """

    def __init__(self, clock, request: Callable[..., defer.Deferred], timeout: float,
                 retry_for: float) -> None:
        self.clock = clock
        self.request = request  # treq's HTTPClient.request (tests: a fake)
        self.timeout = timeout
        self.retry_for = retry_for
        self.pending: set[defer.Deferred] = set()  # requests and waits (stop cancels them)

    @defer.inlineCallbacks
    def post(self, report: Report, url: str):
        """
        Fires with (sent, detail): True and the status, or False and the
        last failure once the time is up.
        """
        first = self.clock.seconds()
        wait = FIRST_RETRY
        tries = 0
        while True:
            tries += 1
            try:
                d = self.request("POST", url, data=report.body,
                                 headers={b"Content-Type": [GZIP_TYPE.encode()]},
                                 unbuffered=True, allow_redirects=False)
                d.addTimeout(self.timeout, self.clock)
                self.pending.add(d)
                try:
                    response = yield d
                finally:
                    self.pending.discard(d)
                code = response.code
                try:
                    response.deliverBody(_Discard())  # closes, unread
                except Exception:
                    pass
                if 200 <= code < 300:
                    return True, f"HTTP {code}"
                why = f"HTTP {code}"
            except defer.CancelledError:
                raise
            except defer.TimeoutError:
                why = f"no answer within {self.timeout:g} s"
            except Exception as e:
                why = _why(e)
            if self.clock.seconds() + wait - first > self.retry_for:
                return False, f"{why} (gave up after {tries} tries)"
            log.info("TLS report for {domain} to {rua}: {why}; trying again in {wait:g} s",
                     event="tlsrpt.retry", domain=report.policy_domain, rua=url, why=why,
                     wait=wait, report_id=report.report_id)
            sleep = defer.Deferred()
            call = self.clock.callLater(wait, sleep.callback, None)
            sleep.addErrback(_cancel_call, call)
            self.pending.add(sleep)
            try:
                yield sleep
            finally:
                self.pending.discard(sleep)
            wait = min(wait * 2, MAX_RETRY_INTERVAL)

    def stop(self) -> None:
        for d in list(self.pending):
            d.cancel()


def _cancel_call(failure, call):
    if call.active():
        call.cancel()
    return failure


def _why(e: BaseException) -> str:
    # ResponseNeverReceived and friends wrap the reasons in a list of Failures
    reasons = getattr(e, "reasons", None)
    if reasons:
        return "; ".join(_why(r.value) for r in reasons)
    text = str(e) or type(e).__name__
    return text.splitlines()[0][:200]


class _Discard:
    """
    A response body nobody reads: dropped as it comes, the connection closed.
    """

    def makeConnection(self, transport) -> None:
        transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason) -> None:
        pass


@implementer(IStreamClientEndpoint)
class _CollectorEndpoint:
    """
    TCP to the first address of C{host} (our resolver: the same name
    servers as delivery) that answers, then TLS checked for C{host}.
    """

    def __init__(self, owner: CollectorEndpoints, host: str, port: int) -> None:
        self.owner, self.host, self.port = owner, host, port

    @defer.inlineCallbacks
    def connect(self, factory):
        from twisted.internet import endpoints, ssl
        from twisted.internet.error import ConnectError, DNSLookupError

        owner = self.owner
        factory.noisy = False  # no "Starting factory" line per report
        if _is_ip(self.host):
            addresses = [self.host]
        else:
            addresses = yield owner.resolve(self.host)
            if not addresses:
                raise DNSLookupError(f"{self.host} has no address")
        creator = ssl.optionsForClientTLS(self.host, trustRoot=owner.trust_root)
        last: Exception | None = None
        for address in addresses:
            kind = endpoints.TCP6ClientEndpoint if ":" in address else \
                endpoints.TCP4ClientEndpoint
            tcp = kind(owner.reactor, address, self.port, timeout=owner.timeout)
            try:
                protocol = yield endpoints.wrapClientTLS(creator, tcp).connect(factory)
                return protocol
            except ConnectError as e:
                last = e
        raise last if last is not None else ConnectError(f"{self.host}: no address answered")


class CollectorEndpoints:
    """
    The endpoints the HTTPS agent reaches report collectors by: host names
    resolved through our resolver (not the system's), the certificate
    checked against C{trust_root} (None: the system's roots) for the name
    in the rua URL.  Only https: URLs.
    """

    def __init__(self, reactor, resolve: Callable[[str], defer.Deferred], trust_root,
                 timeout: float) -> None:
        self.reactor = reactor
        self.resolve = resolve  # host -> Deferred[list of addresses]
        self.trust_root = trust_root
        self.timeout = timeout

    def endpointForURI(self, uri):
        from twisted.web.error import SchemeNotSupported
        if uri.scheme != b"https":
            raise SchemeNotSupported(f"only https: reports, not {uri.scheme!r}")
        host = uri.host.decode("ascii").strip("[]")
        return _CollectorEndpoint(self, host, uri.port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class ReportSender:
    """
    Sends one report to every rua of a record; logs and counts each.
    """

    def __init__(self, mail: MailReports | None, https: HTTPSReports,
                 notify: Callable[[str, dict], None] = lambda name, event: None) -> None:
        self.mail = mail
        self.https = https
        self.notify = notify

    def send(self, report: Report, ruas: tuple[Rua, ...]) -> defer.Deferred:
        """
        Fires with the L{Outcome} of each rua once every one is finished:
        the mail on disk in the queue, the POST answered with 2xx or given
        up.  Never fails.
        """
        return self.start(report, ruas)[1]

    def start(self, report: Report, ruas: tuple[Rua, ...]
              ) -> tuple[defer.Deferred, defer.Deferred]:
        """
        L{send}, with a first Deferred that fires as soon as the mail
        parts are done (on disk), while the POSTs may still be retrying.
        """
        unsigned = [r for r in ruas if r.scheme == "mailto"] and (
            self.mail is None or not self.mail.can_sign(report))
        if unsigned:
            log.warn("TLS report for {domain}: no [dkim] key for the submitter domain "
                     "{submitter}, so it is not sent by mail (RFC 8460 requires a DKIM "
                     "signature); https: addresses still get it", event="tlsrpt.unsigned",
                     domain=report.policy_domain, submitter=report.submitter,
                     report_id=report.report_id)
        self.notify("tlsrpt.report", {"domain": report.policy_domain})
        each = [self._one(report, rua, bool(unsigned)) for rua in ruas]
        mail = defer.gatherResults([d for d, rua in zip(each, ruas) if rua.scheme == "mailto"])
        return mail, defer.gatherResults(each)

    @defer.inlineCallbacks
    def _one(self, report: Report, rua: Rua, unsigned: bool):
        uri = f"mailto:{rua.target}" if rua.scheme == "mailto" else rua.target
        if rua.scheme == "mailto":
            if unsigned:
                outcome = Outcome(rua, False, "no DKIM key for the submitter domain")
            else:
                try:
                    qid = yield self.mail.queue(report, rua.target)
                    outcome = Outcome(rua, True, f"queued as {qid}")
                except Exception as e:
                    name = errno.errorcode.get(getattr(e, "errno", None) or 0, "")
                    outcome = Outcome(rua, False, f"could not be queued: {_why(e)}"
                                      + (f" [{name}]" if name else ""), final=False)
        else:
            final = True
            try:
                sent, detail = yield self.https.post(report, rua.target)
            except defer.CancelledError:
                sent, detail, final = False, "stopped (the MTA stopped); sent again later", False
            except Exception as e:
                sent, detail = False, _why(e)
            outcome = Outcome(rua, sent, detail, final)
        if outcome.sent:
            log.info("TLS report for {domain} sent to {rua}: {detail}", event="tlsrpt.sent",
                     domain=report.policy_domain, rua=uri, detail=outcome.detail,
                     report_id=report.report_id)
        else:
            log.warn("TLS report for {domain} not sent to {rua}: {detail}",
                     event="tlsrpt.failed", domain=report.policy_domain, rua=uri,
                     detail=outcome.detail, report_id=report.report_id)
        self.notify("tlsrpt.sent" if outcome.sent else "tlsrpt.failed",
                    {"method": rua.scheme, "domain": report.policy_domain})
        return outcome


def default_from(submitter: str) -> str:
    return f"tlsrpt-noreply@{submitter}"


def utc_day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")
