"""
Tests for DSN generation: a golden file, and that Python's email package
reads the result as RFC 3464 says.
"""

import email
import os
from email import policy

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.dsn.report import FailedRecipient, failure_report
from twisted_mta.model import Envelope, Outcome, Recipient

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")


def sample() -> bytes:
    env = Envelope(queue_id="6B0A87D251AE92AA51", sender="alice@example.test",
                   recipients=(Recipient("carol@example.test"), Recipient("dave@example.org")),
                   arrival=1_800_000_000)
    failed = [
        FailedRecipient(Recipient("carol@example.test", original="team@example.test",
                                  state="failed", done_at=1_800_000_060,
                                  outcome=Outcome(550, "5.1.1",
                                                  "No such local mailbox: carol@example.test"))),
        FailedRecipient(Recipient("dave@example.org", state="failed", done_at=1_800_000_090,
                                  outcome=Outcome(
                                      550, "5.7.1", "mx.example.org[192.0.2.25]:25 said: 550 "
                                      "5.7.1 relay denied (in reply to RCPT TO:<dave@example.org>)",
                                      remote_mta="mx.example.org", kind="reply")),
                        remote_mta="mx.example.org"),
    ]
    headers = b"Received: from c ([192.0.2.1])\r\n\tby mx.example.test; date\r\nSubject: lunch?\r\n"
    return failure_report(hostname="mx.example.test", envelope=env, failed=failed,
                          original_headers=headers, now=1_800_000_100, boundary="=====DSN=====")


class FailureReportTests(SynchronousTestCase):
    def test_golden(self):
        """The failure DSN matches the reviewed golden file byte for byte."""
        with open(os.path.join(GOLDEN, "failure.eml"), "rb") as f:
            self.assertEqual(sample(), f.read())

    def test_parses_as_multipart_report(self):
        """Python's email package reads it as multipart/report; report-type=delivery-status with the three parts."""
        msg = email.message_from_bytes(sample(), policy=policy.default)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        self.assertEqual([p.get_content_type() for p in msg.iter_parts()],
                         ["text/plain", "message/delivery-status", "text/rfc822-headers"])

    def test_machine_fields(self):
        """The delivery-status part carries the per-message and per-recipient fields."""
        msg = email.message_from_bytes(sample(), policy=policy.compat32)
        blocks = msg.get_payload()[1].get_payload()
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; mx.example.test")
        self.assertEqual(blocks[0]["Arrival-Date"], "Fri, 15 Jan 2027 08:00:00 +0000")
        carol, dave = blocks[1], blocks[2]
        self.assertEqual(carol["Original-Recipient"], "rfc822; team@example.test")
        self.assertEqual(carol["Final-Recipient"], "rfc822; carol@example.test")
        self.assertEqual((carol["Action"], carol["Status"]), ("failed", "5.1.1"))
        self.assertIsNone(carol["Remote-MTA"])
        self.assertEqual(dave["Remote-MTA"], "dns; mx.example.org")
        self.assertEqual(dave["Diagnostic-Code"], "smtp; 550 5.7.1 relay denied")
        self.assertEqual(dave["Last-Attempt-Date"], "Fri, 15 Jan 2027 08:01:30 +0000")
        self.assertIsNone(dave["Will-Retry-Until"])

    def test_headers_from_null_sender_to_sender(self):
        """The DSN is addressed to the original sender and marked auto-replied."""
        msg = email.message_from_bytes(sample(), policy=policy.default)
        self.assertEqual(msg["To"].addresses[0].addr_spec, "alice@example.test")
        self.assertEqual(msg["Auto-Submitted"], "auto-replied")
        self.assertIn("Subject: lunch?", msg.get_payload()[2].get_payload())
        self.assertNotIn("body", msg.get_payload()[2].get_payload())


def delay_sample() -> bytes:
    from twisted_mta.dsn.report import delay_report
    env = Envelope(queue_id="6B0A87D251AE92AA51", sender="alice@example.test",
                   recipients=(Recipient("dave@example.org"),), arrival=1_800_000_000)
    delayed = [FailedRecipient(Recipient("dave@example.org", done_at=None,
                                         outcome=Outcome(
                                             451, "4.4.1", "connect to mx.example.org"
                                             "[192.0.2.25]:25 failed: connection refused",
                                             remote_mta="mx.example.org",
                                             kind="connect-failed")),
                               remote_mta="mx.example.org")]
    return delay_report(hostname="mx.example.test", envelope=env, delayed=delayed,
                        original_headers=b"Subject: lunch?\r\n", now=1_800_014_400,
                        until=1_800_432_000, boundary="=====DSN=====")


class DelayReportTests(SynchronousTestCase):
    def test_golden(self):
        """The delay warning matches the reviewed golden file byte for byte."""
        with open(os.path.join(GOLDEN, "delay.eml"), "rb") as f:
            self.assertEqual(delay_sample(), f.read())

    def test_fields(self):
        """A delay warning says Action: delayed with Will-Retry-Until, and tells when we give up."""
        msg = email.message_from_bytes(delay_sample(), policy=policy.compat32)
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        human, status, _ = msg.get_payload()
        block = status.get_payload()[1]
        self.assertEqual((block["Action"], block["Status"]), ("delayed", "4.4.1"))
        self.assertEqual(block["Will-Retry-Until"], "Wed, 20 Jan 2027 08:00:00 +0000")
        self.assertIn("we keep trying until Wed, 20 Jan 2027 08:00:00 +0000",
                      " ".join(human.get_payload().split()))
