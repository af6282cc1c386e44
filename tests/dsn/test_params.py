"""
Tests for the DSN extension's parameters and xtext (RFC 3461).
"""

from twisted.trial.unittest import SynchronousTestCase

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
