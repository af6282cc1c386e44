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


class UTF8AddressTests(SynchronousTestCase):
    """RFC 6531 3.3: UTF-8 in local parts and domains, only with SMTPUTF8."""

    # (path, local part, domain) accepted with SMTPUTF8
    ACCEPTED = [
        ("用户@例子.test", "用户", "例子.test"),
        ("jörg@Bücher.Example", "jörg", "bücher.example"),
        ('"jö sé"@remote.test', '"jö sé"', "remote.test"),
        ("ascii@remote.test", "ascii", "remote.test"),
        ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή", "παράδειγμα.δοκιμή"),
    ]
    # paths refused even with SMTPUTF8
    REFUSED = [
        "a\u0085b@remote.test",  # C1 control
        "a@ä..test",
        "ä" * 33 + "@remote.test",  # 66 octets
        "a@" + "ä" * 130 + ".test",  # longer than 255 octets
        "a b@remote.test",
        "a@\u2024.test",  # ONE DOT LEADER: not valid IDNA
    ]

    def test_accepted(self):
        """Each UTF-8 path parses with SMTPUTF8, local part kept, domain lower-cased."""
        for path, local, domain in self.ACCEPTED:
            a = parse_mail_from(f"FROM:<{path}> SMTPUTF8").address
            self.assertEqual((a.local, a.domain), (local, domain), path)
            r = parse_rcpt_to(f"TO:<{path}>", utf8=True).address
            self.assertEqual((r.local, r.domain), (local, domain), path)

    def test_refused(self):
        """Each bad path is refused even with SMTPUTF8."""
        for path in self.REFUSED:
            with self.assertRaises(AddressError, msg=path):
                parse_rcpt_to(f"TO:<{path}>", utf8=True)

    def test_needs_smtputf8(self):
        """Without SMTPUTF8 a UTF-8 path is NonASCIIAddress (5.6.7), not a syntax error."""
        from twisted_mta.address import NonASCIIAddress
        for path, _, _ in self.ACCEPTED[:3]:
            with self.assertRaises(NonASCIIAddress, msg=path):
                parse_mail_from(f"FROM:<{path}>")
            with self.assertRaises(NonASCIIAddress, msg=path):
                parse_rcpt_to(f"TO:<{path}>")

    def test_a_label(self):
        """U-labels become A-labels by IDNA2008 (ß stays ß, unlike IDNA 2003's 'ss')."""
        from twisted_mta.address import a_label
        for u, a in (("例子.test", "xn--fsqu00a.test"), ("Straße.de", "xn--strae-oqa.de"),
                     ("BÜCHER.example", "xn--bcher-kva.example"),
                     ("Example.TEST", "example.test")):
            self.assertEqual(a_label(u), a, u)


class ASCIIAddressTests(SynchronousTestCase):
    def test_table(self) -> None:
        """
        What may go to a server without SMTPUTF8: ASCII unchanged, a UTF-8
        domain as its A-label (IDNA2008), never a UTF-8 local part.
        """
        from twisted_mta.address import ascii_address
        rows = [("bob@example.test", "bob@example.test"),
                ("Bob@Example.Test", "Bob@Example.Test"),  # unchanged, case too
                ("bob@bücher.test", "bob@xn--bcher-kva.test"),
                ("bob@straße.test", "bob@xn--strae-oqa.test"),
                ("jörg@example.test", None), ("jörg@bücher.test", None),
                ("postmaster", "postmaster"), ("bob@exa mple.tëst", None)]
        for address, expected in rows:
            self.assertEqual(ascii_address(address), expected, address)
