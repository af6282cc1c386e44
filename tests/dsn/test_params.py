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
