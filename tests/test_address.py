"""
Tests for MAIL FROM / RCPT TO path parsing.
"""

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.address import AddressError, parse_mail_from, parse_rcpt_to


class AddressTests(SynchronousTestCase):
    def test_plain(self):
        """A plain path parses; the domain is lower-cased, the local part kept."""
        p = parse_mail_from("FROM:<Joe.Bloggs@Example.COM>")
        self.assertEqual((p.address.local, p.address.domain), ("Joe.Bloggs", "example.com"))

    def test_null(self):
        """<> is the null reverse-path."""
        self.assertIsNone(parse_mail_from("FROM:<>").address)

    def test_space_after_colon_tolerated(self):
        """A space after FROM: is tolerated (common practice)."""
        self.assertEqual(str(parse_mail_from("FROM: <a@b.test>").address), "a@b.test")

    def test_params(self):
        """Parameters are split into an upper-cased dict."""
        p = parse_mail_from("FROM:<a@b.test> size=100 BODY=8BITMIME")
        self.assertEqual(p.params, {"SIZE": "100", "BODY": "8BITMIME"})

    def test_quoted_local_part(self):
        """A quoted local part with a space and an escaped quote is accepted."""
        p = parse_rcpt_to('TO:<"john \\"q\\" doe"@example.test>')
        self.assertEqual(p.address.local, '"john \\"q\\" doe"')

    def test_source_route_dropped(self):
        """A source route is accepted and removed."""
        self.assertEqual(str(parse_rcpt_to("TO:<@a.test,@b.test:u@c.test>").address), "u@c.test")

    def test_address_literals(self):
        """IPv4 and IPv6 literals are accepted; malformed ones are not."""
        self.assertEqual(parse_rcpt_to("TO:<u@[192.0.2.1]>").address.domain, "[192.0.2.1]")
        self.assertEqual(parse_rcpt_to("TO:<u@[IPv6:2001:db8::1]>").address.domain, "[ipv6:2001:db8::1]")
        with self.assertRaises(AddressError):
            parse_rcpt_to("TO:<u@[300.1.1.1]>")

    def test_bare_postmaster(self):
        """RCPT TO:<Postmaster> without a domain is accepted."""
        p = parse_rcpt_to("TO:<Postmaster>")
        self.assertTrue(p.address.is_postmaster)
        self.assertEqual(p.address.domain, "")

    def test_rejects(self):
        """Malformed paths are refused with a reason."""
        for bad in ("FROM:a@b.test", "FROM:<a@b.test", "FROM:<a b@c.test>", "FROM:<@b.test>",
                    "FROM:<a@>", "FROM:<a@b_c.test>", "FROM:<a..b@c.test>", "FROM:<a@b.test>x",
                    "FROM:<a@b.test> =x", "FROM:<" + "a" * 65 + "@b.test>",
                    "FROM:<a@" + "b" * 250 + ".test>"):
            with self.assertRaises(AddressError, msg=bad):
                parse_mail_from(bad)
