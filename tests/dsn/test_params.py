"""
Tests for the DSN extension's parameters and xtext (RFC 3461).
"""

import email
from email import policy

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.dsn.report import FailedRecipient, delay_report, failure_report, success_report
from twisted_mta.model import Envelope, Outcome, Recipient

from twisted_mta.dsn.params import (
    DSNParamError, parse_envid, parse_notify, parse_orcpt, parse_ret, xtext_decode, xtext_encode,
)


class ParamTests(SynchronousTestCase):
    def test_xtext_round_trip(self):
        for text in ["plain@example.com", "a+b=c d", "caf\u00e9", "+", ""]:
            self.assertEqual(xtext_decode(xtext_encode(text)), text)
        self.assertEqual(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d")

    def test_xtext_rejects_raw_specials(self):
        for bad in ["a=b", "a b", "a+2b", "a+"]:
            self.assertRaises(DSNParamError, xtext_decode, bad)

    def test_xtext_octets_are_utf8(self):
        """Encoding works on UTF-8 octets, not code points; decoding reads the octets as UTF-8."""
        self.assertEqual(xtext_encode("\u20ac"), "+E2+82+AC")
        self.assertEqual(xtext_encode("caf\u00e9"), "caf+C3+A9")
        self.assertEqual(xtext_decode("caf+C3+A9"), "caf\u00e9")
        self.assertEqual(xtext_decode("+FF"), "\ufffd")  # not UTF-8: replaced, not refused
        self.assertEqual(xtext_encode("a\tb\x7f"), "a+09b+7F")

    def test_xtext_errors_say_how(self):
        """Where Twisted's codec is lax (raw '=', spaces, lower-case hex) or crashes ('+' without two hex digits, non-ASCII), the error is a DSNParamError that says what is wrong."""
        plus = "bad xtext: '+' must be followed by two upper-case hex digits"
        for bad, message in [("a+", plus), ("a+zz", plus), ("a+2b", plus), ("+4", plus),
                             ("a=b", "bad xtext: character '=' must be encoded as +XX"),
                             ("a b", "bad xtext: character ' ' must be encoded as +XX"),
                             ("a\x00", "bad xtext: character '\\x00' must be encoded as +XX"),
                             ("caf\u00e9", "bad xtext: character '\u00e9' must be encoded as +XX")]:
            with self.assertRaises(DSNParamError) as cm:
                xtext_decode(bad)
            self.assertEqual(str(cm.exception), message, bad)

    def test_notify(self):
        self.assertEqual(parse_notify("never"), ())
        self.assertEqual(parse_notify("DELAY,SUCCESS"), ("SUCCESS", "DELAY"))
        for bad in [None, "", "NEVER,FAILURE", "SOMETIMES"]:
            self.assertRaises(DSNParamError, parse_notify, bad)

    def test_orcpt_ret_envid(self):
        self.assertEqual(parse_orcpt("RFC822;a+2Bb@example.com"), "rfc822;a+b@example.com")
        self.assertRaises(DSNParamError, parse_orcpt, "a@example.com")
        self.assertEqual(parse_ret("hdrs"), "HDRS")
        self.assertRaises(DSNParamError, parse_ret, "BODY")
        self.assertEqual(parse_envid("x+2By"), "x+y")
        self.assertRaises(DSNParamError, parse_envid, "x" * 101)

    def test_envid_and_orcpt_must_be_printable(self):
        """RFC 3461 4.2/4.4: the decoded ENVID and ORCPT address are printable US-ASCII (space included); a CR, LF, other control or 8-bit octet is refused, so nothing can forge fields in a DSN."""
        self.assertEqual(parse_envid("a+20b~"), "a b~")
        self.assertEqual(parse_orcpt("rfc822;x+20y@z"), "rfc822;x y@z")
        envid = "ENVID must be printable US-ASCII once decoded (RFC 3461 4.4)"
        for bad in ["abc+0D+0AX-Injected:+20yes", "a+0Ab", "a+0Db", "a+09b", "a+00", "a+7F",
                    "caf+C3+A9", "+FF"]:
            with self.assertRaises(DSNParamError) as cm:
                parse_envid(bad)
            self.assertEqual(str(cm.exception), envid, bad)
        orcpt = "ORCPT address must be printable US-ASCII once decoded (RFC 3461 4.2)"
        for bad in ["rfc822;x@y+0D+0AAction:+20failed+0D+0A", "rfc822;a+0A", "rfc822;a+1Bb",
                    "rfc822;caf+C3+A9@x"]:
            with self.assertRaises(DSNParamError) as cm:
                parse_orcpt(bad)
            self.assertEqual(str(cm.exception), orcpt, bad)


class ReportFieldTests(SynchronousTestCase):
    """
    The DSN writer's own defence: whatever an envelope holds (an entry
    queued before the check above, a bug elsewhere), no CR or LF from it
    reaches a header field of the report.
    """

    def reports(self):
        orcpt = "rfc822;x@y\r\nAction: failed\r\n\r\nFinal-Recipient: rfc822; forged@z"
        rcpt = Recipient("a@example.test", original="o\n@example.test", orcpt=orcpt,
                         notify=("SUCCESS",),
                         outcome=Outcome(550, "5.1.1", "no\r\nAction: delivered", kind="reply"))
        env = Envelope(queue_id="Q1", sender="victim@x", recipients=(rcpt,),
                       arrival=1_800_000_000, envid="abc\r\nX-Injected: yes")
        common = dict(hostname="mx.example.test", envelope=env, original_headers=b"Subject: x\r\n",
                      now=1_800_000_100, boundary="=====DSN=====")
        failed = [FailedRecipient(rcpt, remote_mta="mx\r\nX-Evil: 1")]
        return [failure_report(failed=failed, **common),
                delay_report(delayed=failed, until=1_800_400_000, **common),
                success_report(delivered=[FailedRecipient(rcpt, action="delivered")], **common)]

    def test_no_line_break_from_an_envelope_value(self):
        """Original-Envelope-Id, Original-Recipient, Diagnostic-Code and Remote-MTA keep their values on one line, controls shown as '?': no forged field, no forged recipient block."""
        for report in self.reports():
            self.assertNotIn(b"\nX-Injected", report)
            self.assertNotIn(b"\nX-Evil", report)
            self.assertNotIn(b"forged@z\r\n", report.replace(b"; forged@z\r\n", b""))
            self.assertIn(b"Original-Envelope-Id: abc??X-Injected: yes\r\n", report)
            msg = email.message_from_bytes(report, policy=policy.compat32)
            blocks = msg.get_payload()[1].get_payload()
            self.assertEqual(len(blocks), 2)  # the per-message block and one recipient
            self.assertEqual(blocks[1].get_all("Action"), [blocks[1]["Action"]])
            self.assertEqual(blocks[1].get_all("Final-Recipient"), ["rfc822; a@example.test"])
            self.assertEqual(blocks[1]["Original-Recipient"],
                             "rfc822; x@y??Action: failed????Final-Recipient: rfc822; forged@z")
            self.assertIsNone(blocks[0]["X-Injected"])


class UTF8OrcptTests(SynchronousTestCase):
    """RFC 6533 3: UTF-8 original recipients under SMTPUTF8."""

    def test_table(self):
        """Each ORCPT value with and without SMTPUTF8: the stored form, or refused (None)."""
        from twisted_mta.dsn.params import utf8_addr_xtext
        table = [
            # (value, with SMTPUTF8, without)
            ("rfc822;j+C3+B6rg@example.test", "utf-8;jörg@example.test", None),
            ("utf-8;j\\x{F6}rg@example.test", "utf-8;jörg@example.test", None),
            ("utf-8;" + utf8_addr_xtext("a+b@例子.test"), "utf-8;a+b@例子.test", None),
            ("utf-8;plain@example.test", "utf-8;plain@example.test", "utf-8;plain@example.test"),
            ("rfc822;j+0D+0AX-Evil:+20yes@example.test", None, None),
            ("rfc822;j+C2+85x@example.test", None, None),  # a C1 control (NEL)
            ("utf-8;a\\x{D800}b@example.test", None, None),  # a surrogate
            ("rfc822;j+C3x@example.test", None, None),  # not UTF-8
        ]
        for value, utf8, plain in table:
            for flag, expected in ((True, utf8), (False, plain)):
                if expected is None:
                    with self.assertRaises(DSNParamError, msg=(value, flag)):
                        parse_orcpt(value, utf8=flag)
                else:
                    self.assertEqual(parse_orcpt(value, utf8=flag), expected, (value, flag))

    def test_escape_is_ascii(self):
        """utf8_addr_xtext gives ASCII without '+', '=' or a bare backslash."""
        from twisted_mta.dsn.params import utf8_addr_xtext
        out = utf8_addr_xtext("jö+r=g\\@例子.test")
        self.assertTrue(out.isascii())
        self.assertEqual(out, "j\\x{F6}\\x{2B}r\\x{3D}g\\x{5C}@\\x{4F8B}\\x{5B50}.test")
