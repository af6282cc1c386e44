"""
Build delivery status notifications (RFC 3464, RFC 6522), failures and
delay warnings: a C{multipart/report} with a text part written for the
sender, the C{message/delivery-status} part for programs, and the original
headers.

Pure: no I/O, the time is passed in, so the output is testable byte for
byte.
"""

from __future__ import annotations

import email.utils
import re
import textwrap
import uuid
from datetime import datetime, timezone
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import SMTP
from typing import Iterable

import attrs

from twisted_mta.tls.failure import TLS_KINDS
from twisted_mta.model import Envelope, Outcome, Recipient


@attrs.frozen
class FailedRecipient:
    recipient: Recipient
    remote_mta: str | None = None  # the host that gave the diagnostic, if remote
    action: str | None = None  # for success reports: "delivered" or "relayed"


_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")


def _field(value: str) -> str:
    """
    C{value} fit for one header field: every control character (CR and LF
    above all) as C{?}, as Postfix prints them.  The server refuses ENVID
    and ORCPT values with controls (L{twisted_mta.dsn.params}); this keeps
    a value from an older queue entry, or from anywhere else, from forging
    fields or recipient blocks in the report.
    """
    return _CONTROLS.sub("?", value)


def _date(t: float) -> str:
    return email.utils.format_datetime(datetime.fromtimestamp(t, timezone.utc))


def _human(hostname: str, envelope: Envelope, failed: Iterable[FailedRecipient],
           until: float | None, success: bool = False, full: bool = False) -> str:
    if success:
        opening = [
            f"Your message of {_date(envelope.arrival)} was delivered to the recipients",
            "below, as you asked to be told. \"Relayed\" means it was passed on to a",
            "server that will not confirm delivery itself.",
        ]
    elif until is None:
        opening = [
            f"Your message of {_date(envelope.arrival)} could not be delivered to the",
            "recipients below. This is a permanent failure: we will not try again.",
        ]
    elif any(f.recipient.outcome is not None and f.recipient.outcome.kind in TLS_KINDS
             for f in failed):
        opening = [
            f"Your message of {_date(envelope.arrival)} has not been delivered yet to the",
            "recipients below, because of a problem with the security of the",
            "recipient's mail server, described below. If you know its",
            "administrators, you may want to tell them. We keep trying",
            f"until {_date(until)}, and you will hear from us again only if",
            "we give up.",
        ]
    else:
        opening = [
            f"Your message of {_date(envelope.arrival)} has not been delivered yet to the",
            "recipients below. There is nothing you need to do: we keep trying",
            f"until {_date(until)}, and you will hear from us again only if",
            "we give up.",
        ]
    lines = [f"This is the mail server {hostname}.", ""] + opening + [""]
    for f in failed:
        r = f.recipient
        outcome = r.outcome
        lines.append(f"  <{r.original or r.address}>")
        if r.original and r.original != r.address:
            label = "the address that failed was" if until is None else "we are trying"
            lines.append(f"    (an alias; {label} <{r.address}>)")
        if success:
            lines.append("    delivered" if f.action == "delivered" else
                         f"    relayed to {f.remote_mta or 'another server'}")
        elif outcome is not None and (outcome.kind in TLS_KINDS or
                                      (outcome.kind or "").startswith("requiretls-")):
            # Written for a person already (server, facts, policy, advice).
            lines.extend(textwrap.wrap(outcome.text, 72, initial_indent="    ",
                                       subsequent_indent="    ", break_on_hyphens=False))
        elif outcome is not None and outcome.kind == "reply":
            lines.append(f"    {outcome.text}")  # "<host> said: <its words>"
        elif outcome is not None:
            lines.append(f"    the reason: {outcome.code} {outcome.enhanced} {outcome.text}")
        lines.append("")
    attached = "Your message is" if full else "The headers of your message are"
    if envelope.requiretls:
        # RFC 8689 5: the content never comes back, and this report travels
        # under the same demand for verified TLS as the message did.
        lines += REQUIRETLS_WORDS.splitlines() + [""]
    lines += [
        f"{attached} attached. If you need help, forward this",
        f"notification to the postmaster of {hostname}.",
    ]
    return "\n".join(lines) + "\n"


# The closing words of a report on a REQUIRETLS message, and what redact
# puts in their place (so the copy does not claim what it no longer does).
REQUIRETLS_WORDS = (
    "Your message required TLS all the way (REQUIRETLS), so only its\n"
    "headers are attached, and this notification is sent with\n"
    "REQUIRETLS too.\n")
REDACTED_WORDS = (
    "Your message required TLS all the way (REQUIRETLS), and the way\n"
    "back to you does not offer that, so this notification is sent\n"
    "without REQUIRETLS and without the headers of your message.\n")
_HEADERS_ATTACHED = "The headers of your message are attached. "


def _status_fields(hostname: str, envelope: Envelope, failed: Iterable[FailedRecipient],
                   now: float, until: float | None) -> list[Message]:
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    if envelope.envid is not None:
        per_message["Original-Envelope-Id"] = _field(envelope.envid)
    per_message["X-Twisted-MTA-Queue-ID"] = _field(envelope.queue_id)
    per_message["Arrival-Date"] = _date(envelope.arrival)
    blocks = [per_message]
    for f in failed:
        r = f.recipient
        block = Message()
        if r.orcpt:
            kind, _, address = r.orcpt.partition(";")
            block["Original-Recipient"] = _field(f"{kind}; {address}")
        elif r.original:
            block["Original-Recipient"] = _field(f"{_address_type(r.original)}; {r.original}")
        block["Final-Recipient"] = _field(f"{_address_type(r.address)}; {r.address}")
        block["Action"] = f.action or ("failed" if until is None else "delayed")
        outcome = r.outcome
        if f.action:
            block["Status"] = outcome.enhanced if outcome and outcome.code < 300 else "2.0.0"
        else:
            block["Status"] = outcome.enhanced if outcome else (
                "5.0.0" if until is None else "4.0.0")
        if f.remote_mta:
            block["Remote-MTA"] = _field(f"dns; {f.remote_mta}")
        if outcome is not None:
            # "smtp" is for a server's reply (RFC 3464 2.3.6); what we found
            # ourselves gets our own diagnostic type.
            block["Diagnostic-Code"] = _field(_diagnostic(outcome))
        block["Last-Attempt-Date"] = _date(r.done_at if r.done_at is not None else now)
        if until is not None:
            block["Will-Retry-Until"] = _date(until)
        blocks.append(block)
    return blocks


def _address_type(address: str) -> str:
    """RFC 6533 3: a UTF-8 address is of type "utf-8", in a global report."""
    return "rfc822" if address.isascii() else "utf-8"


_SAID = re.compile(r" said: (.*) \(in reply to [^)]*\)$", re.S)


def _diagnostic(outcome: Outcome) -> str:
    if outcome.kind == "reply":
        m = _SAID.search(outcome.text)
        if m:  # the server's reply as it gave it
            return f"smtp; {m.group(1)}"
        return f"smtp; {outcome.code} {outcome.enhanced} {outcome.text}"
    return f"X-Twisted-MTA; {outcome.code} {outcome.enhanced} {outcome.text}"


def failure_report(*, hostname: str, envelope: Envelope, failed: list[FailedRecipient],
                   original_headers: bytes, now: float, boundary: str | None = None,
                   to: str | None = None) -> bytes:
    """
    The complete DSN message (headers and body, CRLF line ends) telling
    C{envelope.sender} (or C{to}: the postmaster, for a bounce that could
    not be delivered) that the C{failed} recipients will not get the message.
    """
    return _report(hostname, envelope, failed, original_headers, now, boundary, None,
                   "Undelivered Mail Returned to Sender", to or envelope.sender)


def success_report(*, hostname: str, envelope: Envelope, delivered: list[FailedRecipient],
                   original_headers: bytes, now: float, boundary: str | None = None) -> bytes:
    """
    A positive DSN (NOTIFY=SUCCESS): the C{delivered} recipients, each with
    C{action} "delivered" (to a local mailbox) or "relayed" (to a server
    that does not do DSNs).
    """
    return _report(hostname, envelope, delivered, original_headers, now, boundary, None,
                   "Successful Mail Delivery Report", envelope.sender, success=True)


def delay_report(*, hostname: str, envelope: Envelope, delayed: list[FailedRecipient],
                 original_headers: bytes, now: float, until: float,
                 boundary: str | None = None) -> bytes:
    """
    A delay warning: the C{delayed} recipients have not had the message
    yet, and we keep trying until C{until}.
    """
    return _report(hostname, envelope, delayed, original_headers, now, boundary, until,
                   "Delayed Mail (still being retried)", envelope.sender)


def _report(hostname: str, envelope: Envelope, recipients: list[FailedRecipient],
            original_headers: bytes, now: float, boundary: str | None, until: float | None,
            subject: str, to: str, success: bool = False) -> bytes:
    """
    C{original_headers} is the header section, or the whole message when
    the sender asked for it (RET=FULL): then it is attached as such.
    """
    # RFC 8689 5: a REQUIRETLS message's report behaves as RET=HDRS.
    full = (envelope.ret == "FULL" and not envelope.requiretls and not success
            and _has_body(original_headers))
    report = MIMEMultipart("report", report_type="delivery-status", boundary=boundary)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = _field(f"<{to}>")
    report["Subject"] = subject
    report["Date"] = _date(now)
    kind = "success" if success else ("dsn" if until is None else "delay")
    report["Message-ID"] = _field(f"<{envelope.queue_id}.{kind}.{int(now)}@{hostname}>")
    report["Auto-Submitted"] = "auto-replied"
    text = _human(hostname, envelope, recipients, until, success, full)
    report.attach(MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8"))
    # RFC 6533: the report on an international message (SMTPUTF8) is a
    # global one: UTF-8 addresses in its header and its status fields (type
    # "utf-8"), message/global-delivery-status and message/global-headers
    # (message/global for RET=FULL); it goes back with SMTPUTF8.
    utf8 = envelope.smtputf8 or not to.isascii()
    policy = SMTP.clone(max_line_length=998, utf8=utf8)
    status = Message()
    blocks = _status_fields(hostname, envelope, recipients, now, until)
    # The email package writes a message/* payload only as ASCII text: the
    # 8-bit parts go in as placeholders, replaced by their octets after.
    raw: dict[bytes, bytes] = {}

    def octets(data: bytes) -> str:
        token = f"@@{uuid.uuid4().hex}@@"
        raw[token.encode("ascii")] = data
        return token

    if utf8:
        status["Content-Type"] = "message/global-delivery-status"
        status["Content-Transfer-Encoding"] = "8bit"
        status.set_payload(octets(b"".join(b.as_bytes(policy=policy) for b in blocks)))
    else:
        status["Content-Type"] = "message/delivery-status"
        for block in blocks:  # a server's reply may have had UTF-8 in its words
            for name, value in block.items():
                if not value.isascii():
                    block.replace_header(name, value.encode("ascii", "replace").decode())
        status.set_payload(blocks)
    report.attach(status)
    headers = Message()
    if full:
        headers["Content-Type"] = "message/global" if utf8 else "message/rfc822"
    else:
        headers["Content-Type"] = "message/global-headers" if utf8 else "text/rfc822-headers"
        original_headers = _header_section(original_headers)
    headers["Content-Transfer-Encoding"] = "8bit"
    # The original octets as they came (8-bit header fields included).
    headers.set_payload(octets(original_headers))
    report.attach(headers)
    # Long fields stay on one line (up to RFC 5322's 998): folding right
    # after "Diagnostic-Code:" trips simple parsers.
    out = report.as_bytes(policy=policy)
    for token, data in raw.items():
        out = out.replace(token, data, 1)
    return out


REDACTED_NOTE = (
    "The headers of the original message were removed from this notification:\n"
    "it was to be sent only over verified TLS (REQUIRETLS), and the way back\n"
    "to you does not offer that (RFC 8689 section 5).\n")


def redact(report: bytes) -> bytes | None:
    """
    A DSN without the original message's headers or content (the
    C{text/rfc822-headers} or C{message/rfc822} part), and a note that
    says why, for a REQUIRETLS report whose own way back lacks REQUIRETLS
    (RFC 8689 5: such a report is redacted rather than lost).  The text
    for the sender no longer says that the headers are attached or that
    it comes with REQUIRETLS.  None when C{report} is not a
    C{multipart/report} we can take apart.
    """
    import email
    msg = email.message_from_bytes(report, policy=SMTP)
    if msg.get_content_type() != "multipart/report" or not msg.is_multipart():
        return None
    parts = msg.get_payload()
    kept = [p for p in parts if p.get_content_type() not in (
        "text/rfc822-headers", "message/rfc822", "message/rfc822-headers")]
    if len(kept) == len(parts):
        return None
    if kept[0].get_content_type() == "text/plain":
        kept[0] = _redacted_words(kept[0])
    kept.append(MIMEText(REDACTED_NOTE, "plain", "us-ascii"))
    msg.set_payload(kept)
    return msg.as_bytes(policy=SMTP.clone(max_line_length=998))


def _redacted_words(part: Message) -> Message:
    """
    The text part of a REQUIRETLS report with its closing words made true
    of the redacted copy (the help sentence refilled); unchanged when it is
    not the text L{_human} wrote.
    """
    charset = part.get_content_charset() or "us-ascii"
    try:
        text = part.get_payload(decode=True).decode(charset).replace("\r\n", "\n")
    except (LookupError, UnicodeDecodeError, AttributeError):
        return part
    if REQUIRETLS_WORDS not in text or _HEADERS_ATTACHED not in text:
        return part
    head, _, tail = text.replace(REQUIRETLS_WORDS, REDACTED_WORDS).rpartition("\n\n")
    tail = textwrap.fill(tail.replace(_HEADERS_ATTACHED, "", 1), 72,
                         break_on_hyphens=False, break_long_words=False)
    text = f"{head}\n\n{tail}\n"
    return MIMEText(text, "plain", "us-ascii" if text.isascii() else "utf-8")


def _header_section(message: bytes) -> bytes:
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def _has_body(message: bytes) -> bool:
    return b"\r\n\r\n" in message
