"""
The one failure classifier (twisted_mta/failures.py), from a table: each
cause, its class, code, enhanced code, temporary or permanent, its words,
and the TLS-RPT result type where TLS.
"""

from __future__ import annotations

import errno

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import failures
from twisted_mta.model import Outcome
from twisted_mta.tls.failure import TLS_KINDS, TLSFailure

PEER = "mx.example.org[192.0.2.25]:25"

# (how it is made, kind, code, enhanced, temporary, words it must contain)
TABLE = [
    (lambda: failures.reply(PEER, "RCPT TO:<x@example.org>", 550,
                            b"5.1.1 <x@example.org>: no such user"),
     "reply", 550, "5.1.1", False,
     f"{PEER} said: 550 5.1.1 <x@example.org>: no such user (in reply to RCPT TO:<x@example.org>)"),
    (lambda: failures.reply(PEER, "MAIL FROM", 452, b"Too many connections"),
     "reply", 452, "4.0.0", True, "said: 452 Too many connections"),
    (lambda: failures.reply(PEER, "DATA", 354, b"go ahead"),
     "reply", 451, "4.5.0", True, "(in reply to DATA)"),
    (lambda: failures.reply(PEER, "RCPT TO:<y@x>", 550, b"4.2.2 mixed classes"),
     "reply", 550, "5.0.0", False, "550 4.2.2 mixed classes"),
    (lambda: failures.outcome("dns-temp", domain="example.org", why="SERVFAIL"),
     "dns-temp", 451, "4.4.3", True, "DNS lookup for example.org failed temporarily"),
    (lambda: failures.outcome("dns-nxdomain", domain="nowhere.example"),
     "dns-nxdomain", 550, "5.1.2", False, "does not exist (NXDOMAIN)"),
    (lambda: failures.outcome("null-mx", domain="example.org"),
     "null-mx", 556, "5.1.10", False, "accepts no mail (null MX"),
    (lambda: failures.outcome("connect-failed", peer=PEER, why="connection refused"),
     "connect-failed", 451, "4.4.1", True, f"connect to {PEER} failed: connection refused"),
    (lambda: failures.outcome("timeout", peer=PEER, stage="the session set-up"),
     "timeout", 451, "4.4.2", True, "did not answer in time"),
    (lambda: failures.outcome("loop", why="mail loops back to myself"),
     "loop", 554, "5.4.6", False, "loops back"),
    (lambda: failures.outcome("too-big", peer=PEER, size=20, limit=10),
     "too-big", 552, "5.3.4", False, "(20 bytes) is larger than"),
    (lambda: failures.outcome("8bit-signed", peer=PEER, why="it is DKIM-signed"),
     "8bit-signed", 554, "5.6.2", False, "no 8BITMIME"),
    (lambda: failures.outcome("8bit-unconvertible", peer=PEER, why="bad MIME"),
     "8bit-unconvertible", 554, "5.6.3", False, "converted to 7 bits"),
    (lambda: failures.outcome("smtputf8-address", peer=PEER, address="<jörg@example.test>"),
     "smtputf8-address", 553, "5.6.7", False, "no SMTPUTF8"),
    (lambda: failures.outcome("smtputf8-header", peer=PEER),
     "smtputf8-header", 554, "5.6.9", False, "UTF-8 in its header"),
    (lambda: failures.os_error(OSError(errno.ENOSPC, "No space left on device")),
     "mailbox-full", 452, "4.2.2", True, "Mailbox full or disk full (No space left"),
    (lambda: failures.os_error(OSError(errno.EACCES, "Permission denied")),
     "mailbox-unwritable", 451, "4.3.0", True, "Cannot write to the mailbox"),
    (lambda: failures.os_error(OSError(errno.EIO, "Input/output error")),
     "local-error", 451, "4.3.0", True, "Local delivery error (Input/output error)"),
    (lambda: failures.outcome("no-such-mailbox", address="nobody@example.test"),
     "no-such-mailbox", 550, "5.1.1", False, "No such local mailbox: nobody@example.test"),
    (lambda: failures.outcome("requiretls-unsupported", remote_mta="mx.example.org",
                              host="mx.example.org"),
     "requiretls-unsupported", 554, "5.7.30", False,
     "the sender asked that this message travel only over verified TLS (REQUIRETLS), and "
     "mx.example.org does not support that"),
    (lambda: failures.outcome("requiretls-mx-unvalidated", domain="example.org",
                              why="its MX answer is not DNSSEC-signed and it has no MTA-STS "
                                  "policy"),
     "requiretls-mx-unvalidated", 554, "5.7.30", False,
     "the mail servers of example.org to be authenticated by DNSSEC or an MTA-STS policy; its "
     "MX answer is not DNSSEC-signed"),
    (lambda: failures.outcome("requiretls-no-tls", why=f"{PEER} does not offer STARTTLS"),
     "requiretls-no-tls", 554, "5.7.10", False,
     f"and no such connection was possible: {PEER} does not offer STARTTLS; the message was "
     "not sent"),
    (lambda: failures.expired(failures.outcome("connect-failed", peer=PEER, why="timed out")),
     "expired", 554, "5.4.7", False, "Delivery time expired; last error: 451 4.4.1"),
    (lambda: failures.tls(TLSFailure("certificate-expired", host="mx.example.org",
                                     address="192.0.2.25", port=25)),
     "certificate-expired", 451, "4.7.5", True, f"{PEER} presented an expired certificate"),
    (lambda: failures.tls(TLSFailure("starttls-not-offered", host="mx.example.org",
                                     address="192.0.2.25", port=25)),
     "starttls-not-offered", 451, "4.7.4", True, "does not offer encryption"),
    (lambda: failures.expired(failures.tls(
        TLSFailure("handshake-closed", host="mx.example.org", address="192.0.2.25", port=25),
        text="now; it will be tried again", final_text="given up")),
     "handshake-closed", 554, "5.7.5", False, "given up"),
]


class ClassifierTests(SynchronousTestCase):
    def test_table(self):
        """Every row: class, code, enhanced code, temporary or permanent, and the words."""
        for make, kind, code, enhanced, temporary, words in TABLE:
            o = make()
            self.assertIsInstance(o, Outcome)
            self.assertEqual((o.kind, o.code, o.enhanced), (kind, code, enhanced), words)
            self.assertEqual(failures.is_temporary(o), temporary, words)
            self.assertIn(words, o.text)

    def test_every_cause_is_consistent(self):
        """Each row of the taxonomy: a 4xx code with a 4.x.x status or a 5xx with 5.x.x."""
        for kind, cause in failures.CAUSES.items():
            self.assertEqual(str(cause.code)[0], cause.enhanced[0], kind)
            self.assertIn(cause.code // 100, (4, 5), kind)

    def test_tlsrpt_result_only_for_tls(self):
        """Every TLS class has its TLS-RPT result type; nothing else has one."""
        for kind in TLS_KINDS:
            o = failures.tls(TLSFailure(kind, host="h", address="192.0.2.1", port=25))
            self.assertIn(failures.tlsrpt_result(o), (  # RFC 8460 4.3
                "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                "certificate-not-trusted", "validation-failure", "tlsa-invalid",
                "dnssec-invalid", "dane-required", "sts-policy-fetch-error",
                "sts-policy-invalid", "sts-webpki-invalid"))
        for kind in failures.CAUSES:
            self.assertNotIn(kind, TLS_KINDS)
        self.assertIsNone(failures.tlsrpt_result(failures.outcome("dns-temp", domain="d",
                                                                  why="x")))
