"""
Tests for the reply table: every reply is well-formed.
"""

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import reply
from twisted_mta.reply import Reply

NO_ENHANCED = {354}  # RFC 2034: 354 (and 334, greeting, EHLO) carry no enhanced code


class ReplyTableTests(SynchronousTestCase):
    def replies(self):
        return {name: r for name, r in vars(reply).items() if isinstance(r, Reply)}

    def test_enhanced_code_class_matches(self):
        """Every named reply has an enhanced code whose class matches the basic code's first digit."""
        table = self.replies()
        self.assertGreater(len(table), 30)
        for name, r in table.items():
            self.assertTrue(200 <= r.code < 600, name)
            if r.code in NO_ENHANCED:
                self.assertIsNone(r.enhanced, name)
                continue
            self.assertIsNotNone(r.enhanced, name)
            cls, subject, detail = r.enhanced.split(".")
            self.assertEqual(int(cls), r.code // 100, name)
            self.assertTrue(subject.isdigit() and detail.isdigit(), name)

    def test_multiline_format(self):
        """Multi-line replies use code-text on every line but the last, code SP text on the last."""
        self.assertEqual(Reply(250, None, "a\nb\nc").lines(), [b"250-a", b"250-b", b"250 c"])
        self.assertEqual(Reply(550, "5.1.1", "x").lines(), [b"550 5.1.1 x"])

    def test_wire_is_the_lines_with_crlf(self):
        """wire() sends what lines() says, each line ending in CRLF, for one line and several, with and without an enhanced code."""
        import twisted_mta.reply as module
        replies = [r for r in vars(module).values() if isinstance(r, Reply)]
        replies += [Reply(250, None, "a\nb\nc"), Reply(451, "4.3.0", "x\ny"), Reply(220, None, ""),
                    Reply(250, "2.0.0", "caf\u00e9")]
        for r in replies:
            self.assertEqual(r.wire(), b"".join(line + b"\r\n" for line in r.lines()), r)
