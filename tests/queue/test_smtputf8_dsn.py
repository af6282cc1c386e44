"""
Reports on international mail through the queue manager (RFC 6533): the
report on an SMTPUTF8 message is a global DSN, queued and sent with
SMTPUTF8; a report on an ordinary message whose header has raw 8-bit
octets is queued (it used to fail to be written, and was retried forever).
"""

import email
from email import policy

from twisted_mta import failures
from tests.queue.test_manager import ManagerTestBase

UTF8_BODY = "Subject: Grüße\r\nFrom: jösé@remote.test\r\n\r\nHällo\r\n".encode()


class InternationalReportTests(ManagerTestBase):
    def bounce_of(self, m, rcpt: str, outcome, **fields):
        self.outbound.outcomes[rcpt] = outcome
        env = self.queue([rcpt], body=UTF8_BODY, **fields)
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        [qid] = [q for q in m.entries if q != env.queue_id]
        return qid, self.successResultOf(m.envelope(qid))

    def test_global_report(self):
        """The report on an SMTPUTF8 message is flagged, global, and goes out with the flag."""
        m = self.manager()
        outcome = failures.outcome("smtputf8-address", remote_mta="mx.elsewhere.test",
                                   peer="mx.elsewhere.test[192.0.2.1]:25",
                                   address="the recipient <用户@elsewhere.test>")
        qid, report_env = self.bounce_of(m, "用户@elsewhere.test", outcome,
                                         sender="jösé@remote.test", smtputf8=True)
        self.assertTrue(report_env.smtputf8)
        self.assertEqual([r.address for r in report_env.recipients], ["jösé@remote.test"])
        data = self.spool.read_message(qid)
        self.assertIn("Final-Recipient: utf-8; 用户@elsewhere.test".encode(), data)
        self.assertIn("Subject: Grüße".encode(), data)
        msg = email.message_from_bytes(data, policy=policy.default)
        self.assertEqual([p.get_content_type() for p in msg.iter_parts()],
                         ["text/plain", "message/global-delivery-status",
                          "message/global-headers"])
        sent = [t for _, t in self.outbound.sent if t.sender == ""]
        self.assertTrue(sent and all(t.smtputf8 for t in sent))

    def test_ordinary_report_with_8bit_header(self):
        """An unflagged message with an 8-bit header still gets its (RFC 3464) report."""
        m = self.manager()
        outcome = failures.reply("mx.elsewhere.test[192.0.2.1]:25", "RCPT TO:<x@elsewhere.test>",
                                 550, "5.1.1 unbekannter Empfänger".encode())
        qid, report_env = self.bounce_of(m, "x@elsewhere.test", outcome)
        self.assertFalse(report_env.smtputf8)
        data = self.spool.read_message(qid)
        self.assertIn("Subject: Grüße".encode(), data)
        self.assertIn(b"Content-Type: message/delivery-status", data)
