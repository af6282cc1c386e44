"""
The one failure classifier: everything that can go wrong with a delivery
(an SMTP reply, a DNS answer, a connection, a TLS failure, a local disk
error, our own limits) becomes an L{Outcome} here, with its class
(C{kind}), whether it is temporary (4xx) or permanent (5xx), its enhanced
status code (RFC 3463), plain words, and, for TLS, the TLS-RPT result type
(RFC 8460).

Each class is one row of L{CAUSES}; the words are a template filled with
the facts.  The TLS classes are L{twisted_mta.tls.failure}'s, which knows
their words; their codes are the same table's.
"""

from __future__ import annotations

import errno
import re

import attrs

from twisted_mta.model import Outcome
from twisted_mta.tls.failure import TLSRPT_RESULT, TLSFailure


@attrs.frozen
class Cause:
    code: int
    enhanced: str
    words: str  # a str.format template over the facts


CAUSES: dict[str, Cause] = {
    # -- DNS ---------------------------------------------------------------------
    "dns-temp": Cause(451, "4.4.3", "DNS lookup for {domain} failed temporarily ({why})"),
    "dns-nxdomain": Cause(550, "5.1.2", "The domain {domain} does not exist (NXDOMAIN)"),
    "null-mx": Cause(556, "5.1.10", "The domain {domain} accepts no mail (null MX, RFC 7505)"),
    "no-address": Cause(451, "4.4.4", "the mail server {host} has no address "
                                      "(no A or AAAA record)"),
    "no-mail-server": Cause(451, "4.4.4", "no mail server found for {destination}"),
    "relay-no-address": Cause(451, "4.4.4", "the relay {host} has no address"),
    "loop": Cause(554, "5.4.6", "{why}"),
    # -- the connection and the session -------------------------------------------
    "connect-failed": Cause(451, "4.4.1", "connect to {peer} failed: {why}"),
    "timeout": Cause(451, "4.4.2", "{peer} did not answer in time ({stage})"),
    "connection-lost": Cause(451, "4.4.2", "lost connection with {peer} during {stage}"),
    "closed": Cause(451, "4.4.2", "{peer} closed the connection"),
    "esmtp-required": Cause(451, "4.7.0", "{peer} does not speak ESMTP, which is needed for "
                                          "encryption or authentication"),
    "auth-unavailable": Cause(451, "4.7.0", "{peer} offers no authentication method we can "
                                            "use (we have credentials for it and send mail "
                                            "there only logged in)"),
    "secret-unreadable": Cause(451, "4.3.5", "cannot read the password for {destination}: "
                                             "{why}"),
    "protocol-error": Cause(451, "4.5.0", "{peer}{why}"),
    "data-refused": Cause(451, "4.5.0", "{peer} answered DATA with {code} instead of 354; "
                                        "the message was not sent"),
    "no-result": Cause(451, "4.5.0", "{peer}: transaction ended without a result"),
    # -- the message against the server ----------------------------------------------
    "too-big": Cause(552, "5.3.4", "the message ({size} bytes) is larger than {peer} accepts "
                                   "({limit} bytes)"),
    # 8-bit mail to a server without 8BITMIME is converted to 7 bits
    # (downgrade.py, RFC 6152 3) unless that would break it:
    "8bit-signed": Cause(554, "5.6.2", "{peer} does not accept 8-bit mail (no 8BITMIME), and "
                                      "the message could not be converted to 7 bits for it: "
                                      "{why}"),
    "8bit-unconvertible": Cause(554, "5.6.3", "{peer} does not accept 8-bit mail (no "
                                              "8BITMIME), and the message could not be "
                                              "converted to 7 bits for it: {why}"),
    # SMTPUTF8 (RFC 6531 3.2, 3.5): what needs it cannot go to a server
    # without it (no downgrade of addresses or UTF-8 header fields).
    "smtputf8-address": Cause(553, "5.6.7", "{peer} does not accept international (UTF-8) "
                                            "email addresses (no SMTPUTF8), and {address} is "
                                            "one; the message was not sent"),
    "smtputf8-header": Cause(554, "5.6.9", "{peer} does not accept international (UTF-8) "
                                           "mail (no SMTPUTF8), and the message has UTF-8 "
                                           "in its header fields; the message was not sent"),
    # -- REQUIRETLS (RFC 8689 4.2.1): the message is not sent, and the sender
    # learns why at once (the RFC asks for a non-delivery notification) ------------------
    "requiretls-unsupported": Cause(
        554, "5.7.30", "the sender asked that this message travel only over verified TLS "
                       "(REQUIRETLS), and {host} does not support that (it did not offer "
                       "REQUIRETLS after STARTTLS); the message was not sent"),
    "requiretls-mx-unvalidated": Cause(
        554, "5.7.30", "the sender asked that this message travel only over verified TLS "
                       "(REQUIRETLS), which needs the mail servers of {domain} to be "
                       "authenticated by DNSSEC or an MTA-STS policy; {why}; the message was "
                       "not sent"),
    "requiretls-no-tls": Cause(
        554, "5.7.10", "the sender asked that this message travel only over verified TLS "
                       "(REQUIRETLS), and no such connection was possible: {why}; the message "
                       "was not sent"),
    # -- local delivery ----------------------------------------------------------------
    "no-such-mailbox": Cause(550, "5.1.1", "No such local mailbox: {address}"),
    "mailbox-full": Cause(452, "4.2.2", "Mailbox full or disk full ({why})"),
    "mailbox-unwritable": Cause(451, "4.3.0", "Cannot write to the mailbox ({why})"),
    "local-error": Cause(451, "4.3.0", "Local delivery error ({why})"),
    # An LMTP server that will not start a session is our own mail store
    # misbehaving (down for maintenance, misconfigured): local mail waits
    # rather than bouncing, whatever code it gave (Postfix does the same
    # with lmtp_skip_5xx_greeting).
    "lmtp-refused": Cause(451, "4.3.0", "{peer} refused the LMTP session: {said}"),
    # -- ourselves -------------------------------------------------------------------------
    "message-unreadable": Cause(451, "4.3.0", "could not read the queued message: {why}"),
    "internal": Cause(451, "4.3.0", "{why}"),
    "not-configured": Cause(451, "4.3.5", "remote delivery is not configured"),
    "shutting-down": Cause(451, "4.3.2", "shutting down"),
    # A worker process sending the message ended before it said how it
    # went (docs/architecture.md, "Processes"): tried again, perhaps twice.
    "sender-ended": Cause(451, "4.3.0", "the sending was interrupted ({why}); the message "
                                        "will be tried again"),
    "expired": Cause(554, "5.4.7", "Delivery time expired{last}"),
}

_ENHANCED = re.compile(rb"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")


def outcome(kind: str, remote_mta: str | None = None, **facts) -> Outcome:
    """
    The outcome of class C{kind} (a row of L{CAUSES}) with C{facts} in
    its words.
    """
    cause = CAUSES[kind]
    return Outcome(cause.code, cause.enhanced, cause.words.format(**facts),
                   remote_mta=remote_mta, kind=kind)


def reply(peer: str, command: str, code: int, resp: bytes) -> Outcome:
    """
    A server's reply to C{command}: its own code, enhanced code and words,
    quoted (C{peer said: 550 5.1.1 ... (in reply to RCPT TO:<...>)}).  A
    reply without an enhanced code gets the generic one of its class; a
    code outside 2xx/4xx/5xx is a temporary protocol error.
    """
    lines = resp.splitlines() or [b""]
    m = _ENHANCED.match(lines[0])
    if m and m.group(1) == str(code)[0].encode():
        enhanced = m.group(0).strip().decode()
        lines = [line[m.end():] if _ENHANCED.match(line) else line for line in lines]
        prefix = f"{code} {enhanced} "
    else:
        # No enhanced code, or one of another class (quoted as it came).
        enhanced = {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")
        if not 200 <= code < 600 or code // 100 == 3:
            code, enhanced = 451, "4.5.0"
        prefix = f"{code} "
    words = " ".join(line.decode("utf-8", "replace").strip() for line in lines).strip()
    said = f"{prefix}{words}".strip()
    return Outcome(code, enhanced, f"{peer} said: {said} (in reply to {command})",
                   remote_mta=peer.split("[")[0], kind="reply")


def os_error(e: OSError) -> Outcome:
    """
    A local delivery's disk error: a full disk or quota waits (4.2.2), as
    does a permission problem the admin can fix (4.3.0).
    """
    why = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return outcome("mailbox-full", why=why)
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return outcome("mailbox-unwritable", why=why)
    return outcome("local-error", why=why)


def tls(failure: TLSFailure, text: str | None = None, policy: str | None = None,
        final_text: str | None = None) -> Outcome:
    """
    A TLS failure with one server: C{text} is the explanation (by default
    the failure's own description), C{final_text} the words once the
    message is given up.
    """
    return Outcome(451, failure.enhanced(), text or failure.describe(),
                   remote_mta=failure.host, kind=failure.kind, policy=policy,
                   final_text=final_text if final_text != text else None)


def expired(last: Outcome | None) -> Outcome:
    """
    The end of the queue lifetime: a TLS failure keeps its explanation,
    now permanent (5.7.x) and without the retry its words promised; any
    other failure becomes 5.4.7 quoting the last error.
    """
    if last is not None and last.kind in TLSRPT_RESULT:
        return attrs.evolve(last, code=554, enhanced="5" + last.enhanced[1:],
                            text=last.final_text or last.text, final_text=None)
    return outcome("expired", last=f"; last error: {last}" if last else "")


REQUIRETLS_KINDS = frozenset({"requiretls-unsupported", "requiretls-mx-unvalidated",
                              "requiretls-no-tls"})


def is_temporary(o: Outcome) -> bool:
    return 400 <= o.code < 500


def tlsrpt_result(o: Outcome) -> str | None:
    """
    The TLS-RPT result type (RFC 8460 4.3) of a TLS failure, else None.
    """
    return TLSRPT_RESULT.get(o.kind or "")
