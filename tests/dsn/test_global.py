"""
Reports on international mail (RFC 6533): a message received with
SMTPUTF8 gets a global DSN (UTF-8 addresses of type "utf-8",
message/global-delivery-status, message/global-headers); an ordinary one
keeps the RFC 3464 form, and 8-bit header fields or a server's UTF-8
words no longer stop the report from being written.
"""

import email
from email import policy

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import failures
from twisted_mta.dsn.report import FailedRecipient, failure_report
from twisted_mta.model import Envelope, Outcome, Recipient

HEADERS = "Subject: Grüße\r\nFrom: jösé@example.test\r\n\r\n".encode()


def report(sender: str, rcpt: str, smtputf8: bool, outcome: Outcome,
           ret: str | None = None, original: bytes = HEADERS) -> bytes:
    r = Recipient(rcpt, state="failed", done_at=1_800_000_060, outcome=outcome)
    env = Envelope(queue_id="ABC", sender=sender, recipients=(r,), arrival=1_800_000_000,
                   smtputf8=smtputf8, ret=ret)
    return failure_report(hostname="mx.example.test", envelope=env, failed=[FailedRecipient(r)],
                          original_headers=original, now=1_800_000_100, boundary="=b=")


class GlobalReportTests(SynchronousTestCase):
    def test_global(self):
        """An SMTPUTF8 message's report: UTF-8 header, utf-8 address type, global parts."""
        outcome = failures.outcome("smtputf8-address", peer="mx.peer.test[192.0.2.5]:25",
                                   address="the recipient <用户@例子.test>")
        out = report("jösé@example.test", "用户@例子.test", True, outcome)
        self.assertIn("To: <jösé@example.test>\r\n".encode(), out)
        self.assertIn("Final-Recipient: utf-8; 用户@例子.test\r\n".encode(), out)
        self.assertIn(b"Status: 5.6.7\r\n", out)
        self.assertIn("Subject: Grüße\r\n".encode(), out)
        msg = email.message_from_bytes(out, policy=policy.default)
        self.assertEqual([p.get_content_type() for p in msg.iter_parts()],
                         ["text/plain", "message/global-delivery-status",
                          "message/global-headers"])
        text = msg.get_payload()[0].get_content()
        self.assertIn("<用户@例子.test>", text)
        self.assertIn("no SMTPUTF8", text)

    def test_ordinary_with_8bit_headers(self):
        """
        A report on an ordinary message whose header has raw 8-bit octets
        (no SMTPUTF8) and whose server answered in UTF-8 is written: the
        original octets attached as they were, the status fields ASCII.
        """
        said = failures.reply("mx.peer.test[192.0.2.5]:25", "RCPT TO:<b@peer.test>", 550,
                              "5.1.1 unbekannter Empfänger".encode())
        out = report("a@example.test", "b@peer.test", False, said)
        self.assertIn("Subject: Grüße\r\n".encode(), out)
        self.assertIn(b"Final-Recipient: rfc822; b@peer.test\r\n", out)
        status = out.split(b"message/delivery-status", 1)[1].split(b"--=b=")[0]
        self.assertTrue(status.isascii())
        self.assertIn(b"unbekannter Empf?nger", status)
        msg = email.message_from_bytes(out, policy=policy.default)
        self.assertEqual([p.get_content_type() for p in msg.iter_parts()],
                         ["text/plain", "message/delivery-status", "text/rfc822-headers"])

    def test_full_global(self):
        """RET=FULL on an SMTPUTF8 message attaches it as message/global, octets intact."""
        outcome = failures.outcome("smtputf8-header", peer="mx.peer.test[192.0.2.5]:25")
        whole = HEADERS + "bödy\r\n".encode()
        out = report("a@example.test", "b@peer.test", True, outcome, ret="FULL", original=whole)
        self.assertIn(b"Content-Type: message/global\r\n", out)
        self.assertIn(whole, out)
