"""
Reports on REQUIRETLS messages (RFC 8689 5): headers only whatever RET
said, from <>, tagged REQUIRETLS themselves; and a REQUIRETLS report that
its way back refuses for want of REQUIRETLS is sent again redacted (no
original headers, no REQUIRETLS) instead of being lost.
"""

import email
from email import policy

from twisted_mta import failures
from twisted_mta.dsn.report import REDACTED_NOTE, REDACTED_WORDS, REQUIRETLS_WORDS, redact
from tests.queue.test_manager import FakeOutbound, ManagerTestBase, UNREACHABLE
from twisted.internet import defer


class RequireTLSOutbound(FakeOutbound):
    """Every REQUIRETLS transaction meets a server without REQUIRETLS; others wait."""

    def deliver(self, hop, txn):
        self.sent.append((hop, txn))
        refused = failures.outcome("requiretls-unsupported", remote_mta="mx.remote.test",
                                   host="mx.remote.test[192.0.2.7]:25")
        return defer.succeed({r: refused if txn.requiretls else UNREACHABLE
                              for r in txn.recipients})

BODY = b"Subject: secret plans\r\nX-Private: yes\r\n\r\nthe body nobody may read\r\n"


class RequireTLSReportTests(ManagerTestBase):
    def bounce_of(self, m, **fields):
        """Queue a message for a remote recipient that fails permanently; the report's entry."""
        self.outbound.outcomes["x@elsewhere.test"] = failures.outcome(
            "requiretls-unsupported", remote_mta="mx.elsewhere.test",
            host="mx.elsewhere.test[192.0.2.1]:25")
        env = self.queue(["x@elsewhere.test"], sender="s@remote.test", body=BODY, **fields)
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        [(qid, _)] = [(q, e) for q, e in m.entries.items() if q != env.queue_id]
        return qid, self.successResultOf(m.envelope(qid))

    def test_headers_only_from_null_tagged(self):
        """RET=FULL is disregarded: the report holds only the headers, comes from <>, is tagged REQUIRETLS, names 5.7.30 and says why in words."""
        m = self.manager()
        qid, report_env = self.bounce_of(m, ret="FULL", requiretls=True)
        self.assertEqual(report_env.sender, "")
        self.assertTrue(report_env.requiretls)
        data = self.spool.read_message(qid)
        self.assertNotIn(b"the body nobody may read", data)
        msg = email.message_from_bytes(data, policy=policy.compat32)
        human, status, headers = msg.get_payload()
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn("Subject: secret plans", headers.get_payload())
        self.assertEqual(status.get_payload()[1]["Status"], "5.7.30")
        words = " ".join(human.get_payload().split())
        self.assertIn("only over verified TLS (REQUIRETLS), and "
                      "mx.elsewhere.test[192.0.2.1]:25 does not support that", words)
        self.assertIn("only its headers are attached", words)
        # It goes out with REQUIRETLS (on its own hop).
        sent = [(h, t) for h, t in self.outbound.sent if t.sender == ""]
        self.assertTrue(sent and all(h.requiretls and t.requiretls for h, t in sent))

    def test_untagged_full_is_full(self):
        """Without REQUIRETLS, RET=FULL still returns the message (the rule is REQUIRETLS's alone)."""
        m = self.manager()
        qid, report_env = self.bounce_of(m, ret="FULL")
        self.assertFalse(report_env.requiretls)
        self.assertIn(b"the body nobody may read", self.spool.read_message(qid))

    def test_refused_report_is_redacted_not_lost(self):
        """A REQUIRETLS report whose way back lacks REQUIRETLS is queued again to the same address, without the original headers and without REQUIRETLS."""
        self.outbound = RequireTLSOutbound()
        m = self.manager()
        env = self.queue(["x@elsewhere.test"], sender="s@remote.test", body=BODY,
                         requiretls=True)
        m.enqueue(env)
        for _ in range(6):
            self.clock.advance(0)
        copies = {q: self.successResultOf(m.envelope(q)) for q in m.entries}
        [(cid, copy)] = [(q, e) for q, e in copies.items() if "redacted_from" in e.client]
        self.assertNotEqual(copy.client["redacted_from"], env.queue_id)  # the report's id
        self.assertEqual(([r.address for r in copy.recipients], copy.sender, copy.requiretls),
                         (["s@remote.test"], "", False))
        data = self.spool.read_message(cid)
        self.assertNotIn(b"secret plans", data)
        self.assertIn(b"5.7.30", data)
        self.assertIn(b"(RFC 8689 section 5)", data)
        # the REQUIRETLS report itself was tried with REQUIRETLS first
        self.assertTrue(any(t.sender == "" and t.requiretls for _, t in self.outbound.sent))

    def test_redact(self):
        """redact drops the headers part, keeps the human and status parts, adds the note; anything else is not redacted."""
        m = self.manager()
        qid, _ = self.bounce_of(m, requiretls=True)
        data = redact(self.spool.read_message(qid))
        msg = email.message_from_bytes(data, policy=policy.compat32)
        types = [p.get_content_type() for p in msg.get_payload()]
        self.assertEqual(types, ["text/plain", "message/delivery-status", "text/plain"])
        self.assertEqual(msg.get_payload()[2].get_payload().replace("\r\n", "\n"),
                         REDACTED_NOTE)
        self.assertIsNone(redact(b"Subject: x\r\n\r\nplain\r\n"))

    def test_redacted_words(self):
        """The redacted copy's text no longer says the headers are attached or that it comes with REQUIRETLS: it says why neither holds, and keeps the failure and the help sentence (refilled); text that is not ours is left alone."""
        m = self.manager()
        qid, _ = self.bounce_of(m, requiretls=True)
        original = email.message_from_bytes(self.spool.read_message(qid), policy=policy.compat32)
        self.assertIn(REQUIRETLS_WORDS,
                      original.get_payload()[0].get_payload().replace("\r\n", "\n"))
        msg = email.message_from_bytes(redact(self.spool.read_message(qid)),
                                       policy=policy.compat32)
        text = msg.get_payload()[0].get_payload().replace("\r\n", "\n")
        self.assertNotIn(REQUIRETLS_WORDS, text)
        self.assertNotIn("attached", text)
        self.assertIn("\n\n" + REDACTED_WORDS + "\n", text)
        words = " ".join(text.split())
        self.assertIn("mx.elsewhere.test[192.0.2.1]:25 does not support that", words)
        self.assertTrue(words.endswith(
            "headers of your message. If you need help, forward this notification to the "
            f"postmaster of {self.config.hostname}."), words[-200:])
        help_lines = text.split(REDACTED_WORDS)[1].strip().splitlines()
        self.assertEqual(len(help_lines), 2, help_lines)
        self.assertLessEqual(max(len(line) for line in help_lines), 72)
        # a report whose text is not the one we write keeps it as it was
        data = self.spool.read_message(qid).replace(b"REQUIRETLS too.", b"REQUIRETLS also.")
        plain = email.message_from_bytes(data, policy=policy.compat32)
        redone = email.message_from_bytes(redact(data), policy=policy.compat32)
        self.assertEqual(redone.get_payload()[0].get_payload(),
                         plain.get_payload()[0].get_payload())
