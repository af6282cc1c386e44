"""
Tests for the inbound ESMTP session: protocol, limits, bad input and the
regression tests for Twisted's server pitfalls.
"""

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase

from tests.support import FakeTLSTransport, ServerHarness

MSG = b"Subject: test\r\n\r\nbody\r\n.\r\n"


class SessionTests(SynchronousTestCase):
    def test_greeting_names_host(self):
        """The greeting is 220 with our hostname first."""
        h = ServerHarness(self)
        self.assertEqual(h.greeting, ["220 mx.example.test ESMTP"])

    def test_ehlo_advertises_exactly_our_extensions(self):
        """EHLO lists PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, DSN, CHUNKING, SMTPUTF8; no STARTTLS or AUTH without TLS."""
        h = ServerHarness(self)
        self.assertEqual(h.ehlo(), [
            "250-mx.example.test Hello [192.0.2.10]",
            "250-PIPELINING",
            "250-SIZE 26214400",
            "250-8BITMIME",
            "250-ENHANCEDSTATUSCODES",
            "250-DSN",
            "250-SMTPUTF8",
            "250 CHUNKING",
        ])

    def test_ehlo_advertises_starttls_with_certificate(self):
        """With a TLS context and a TLS-capable transport, STARTTLS is advertised (AUTH is not)."""
        h = ServerHarness(self, tls_context=object(), transport_factory=FakeTLSTransport)
        lines = h.ehlo()
        self.assertIn("250-ENHANCEDSTATUSCODES", lines)
        self.assertEqual(lines[-1], "250 STARTTLS")
        self.assertFalse(any("AUTH" in line for line in lines))

    def test_helo_plain_reply(self):
        """HELO gets a single-line 250 without extension keywords."""
        h = ServerHarness(self)
        self.assertEqual(h.send("HELO client.example\r\n"), ["250 mx.example.test Hello [192.0.2.10]"])

    def test_ehlo_without_argument(self):
        """EHLO without a domain is a syntax error."""
        h = ServerHarness(self)
        self.assertEqual(h.send("EHLO\r\n"), ["501 5.5.4 Syntax: EHLO hostname"])

    def test_full_transaction_queues_message(self):
        """A transaction ends with 250 naming the queue id, and the envelope is on disk."""
        h = ServerHarness(self)
        h.start_transaction()
        lines = h.send(MSG)
        self.assertEqual(len(h.queued), 1)
        qid = h.queued[0].queue_id
        self.assertEqual(lines, [f"250 2.0.0 Ok: queued as {qid}"])
        self.assertEqual(h.spool.load(qid).sender, "s@remote.test")
        self.assertEqual([r.address for r in h.spool.load(qid).recipients], ["alice@example.test"])

    def test_received_header(self):
        """The stored message starts with our Received header: from, by, with ESMTP, id, for, date."""
        h = ServerHarness(self)
        h.start_transaction()
        h.send(MSG)
        stored = h.queued_messages()[0]
        qid = h.queued[0].queue_id
        self.assertTrue(stored.startswith(
            b"Received: from client.example ([192.0.2.10])\r\n"
            b"\tby mx.example.test (twisted-mta) with ESMTP id " + qid.encode() + b"\r\n"
            b"\tfor <alice@example.test>;\r\n\t"), stored)
        self.assertTrue(stored.endswith(b"Subject: test\r\n\r\nbody\r\n"), stored)

    def test_long_helo_name_cut_and_received_folded(self):
        """A 2,000-character EHLO name is accepted but kept to its first 255 octets (RFC 5321 4.5.3.1.2) and '...', in the Received header (folded) and the envelope; every line of the stored message is at most 998 octets."""
        h = ServerHarness(self)
        name = "a" * 2000
        self.assertEqual(h.send(f"EHLO {name}\r\n")[0], "250-mx.example.test Hello [192.0.2.10]")
        h.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        self.assertEqual(h.send(MSG)[0][:3], "250")
        cut = "a" * 255 + "..."
        self.assertEqual(h.queued[0].client["helo"], cut)
        stored = h.queued_messages()[0]
        self.assertTrue(stored.startswith(f"Received: from {cut}\r\n\t([192.0.2.10])\r\n"
                                          "\tby mx.example.test ".encode()), stored[:400])
        with open(h.spool.message_path(h.queued[0].queue_id), "rb") as f:
            whole = f.read()
        for data in (stored, whole):
            lines = data.split(b"\r\n")
            self.assertLessEqual(max(map(len, lines)) + 2, 998)
        self.assertEqual(h.spool.load(h.queued[0].queue_id).client["helo"], cut)

    def test_helo_name_of_255_octets_kept(self):
        """A name of exactly 255 octets (HELO too) is kept whole."""
        h = ServerHarness(self)
        name = "b" * 255
        h.send(f"HELO {name}\r\nMAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        h.send(MSG)
        self.assertEqual(h.queued[0].client["helo"], name)
        self.assertIn(f"from {name}\r\n".encode(), h.queued_messages()[0])

    def test_received_header_no_for_with_two_recipients(self):
        """With two recipients the Received header has no 'for' clause (privacy, RFC 5321 7.2)."""
        h = ServerHarness(self)
        h.start_transaction(rcpts=("alice@example.test", "bob@example.test"))
        h.send(MSG)
        self.assertNotIn(b"\tfor <", h.queued_messages()[0])

    def test_received_says_smtp_after_helo(self):
        """A HELO session is recorded 'with SMTP'."""
        h = ServerHarness(self)
        h.send("HELO c.example\r\n")
        h.send("MAIL FROM:<>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n")
        h.send(MSG)
        self.assertIn(b" with SMTP id ", h.queued_messages()[0])

    def test_null_sender(self):
        """MAIL FROM:<> is accepted and stored as the empty sender."""
        h = ServerHarness(self)
        h.start_transaction(sender="")
        h.send(MSG)
        self.assertEqual(h.queued[0].sender, "")

    def test_dot_unstuffing(self):
        """A line starting with '..' is stored with one dot."""
        h = ServerHarness(self)
        h.start_transaction()
        h.send(b"Subject: x\r\n\r\n..hidden\r\n.\r\n")
        self.assertTrue(h.queued_messages()[0].endswith(b"\r\n.hidden\r\n"))

    def test_empty_message(self):
        """An empty message (a dot right after 354) is accepted."""
        h = ServerHarness(self)
        h.start_transaction()
        self.assertEqual(h.send(b".\r\n")[0][:3], "250")

    def test_pipelined_transaction_replies_in_order(self):
        """A whole pipelined transaction gets its replies in order, one per command."""
        h = ServerHarness(self)
        h.ehlo()
        lines = h.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<nobody@example.test>\r\n"
                       b"RCPT TO:<bob@example.test>\r\nDATA\r\n" + MSG + b"QUIT\r\n")
        self.assertEqual([line[:3] for line in lines], ["250", "550", "250", "354", "250", "221"])
        self.assertTrue(h.transport.disconnecting)

    def test_transaction_split_across_packets(self):
        """Commands and data split at arbitrary byte boundaries give the same result."""
        h = ServerHarness(self)
        data = (b"EHLO c\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\nDATA\r\n"
                b"Subject: s\r\n\r\n..x\r\n" + b"y" * 500 + b"\r\n.\r\nQUIT\r\n")
        lines = []
        for i in range(len(data)):
            lines += h.send(data[i:i + 1])
        self.assertEqual([line[:3] for line in lines],
                         ["250"] * 8 + ["250", "250", "354", "250", "221"])
        self.assertTrue(h.queued_messages()[0].endswith(b"\r\n.x\r\n" + b"y" * 500 + b"\r\n"))

    def test_rset_clears_transaction(self):
        """RSET discards sender and recipients: DATA afterwards is 503."""
        h = ServerHarness(self)
        h.ehlo()
        h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
        self.assertEqual(h.send("RSET\r\n"), ["250 2.0.0 Reset state"])
        self.assertEqual(h.send("DATA\r\n"), ["503 5.5.1 Need MAIL command first"])

    def test_ehlo_resets_transaction(self):
        """A second EHLO resets the transaction like RSET."""
        h = ServerHarness(self)
        h.ehlo()
        h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@example.test>\r\n")
        h.ehlo()
        self.assertEqual(h.send("DATA\r\n"), ["503 5.5.1 Need MAIL command first"])

    def test_noop_vrfy_help_expn(self):
        """NOOP 250, VRFY 252, HELP 214, EXPN 502, all with enhanced codes."""
        h = ServerHarness(self)
        self.assertEqual(h.send("NOOP\r\n"), ["250 2.0.0 Ok"])
        self.assertEqual(h.send("VRFY alice\r\n")[0][:10], "252 2.5.0 ")
        self.assertEqual(h.send("HELP\r\n")[0][:10], "214 2.0.0 ")
        self.assertEqual(h.send("EXPN info\r\n"), ["502 5.5.1 Command not implemented"])

    def test_quit(self):
        """QUIT answers 221 and closes."""
        h = ServerHarness(self)
        self.assertEqual(h.send("QUIT\r\n"), ["221 2.0.0 Bye"])
        self.assertTrue(h.transport.disconnecting)

    def test_lower_case_verbs(self):
        """Verbs and FROM:/TO: are case-insensitive; the local part keeps its case."""
        h = ServerHarness(self)
        h.ehlo()
        self.assertEqual(h.send("mail from:<Some.One@Remote.Test>\r\n"), ["250 2.1.0 Sender ok"])
        h.send("rcpt to:<ALICE@EXAMPLE.TEST>\r\ndata\r\n")
        h.send(MSG)
        self.assertEqual(h.queued[0].sender, "Some.One@remote.test")
        self.assertEqual(h.queued[0].recipients[0].address, "alice@example.test")


class RecipientTests(SynchronousTestCase):
    def rcpt(self, h, address):
        return h.send(f"RCPT TO:<{address}>\r\n")

    def setUp(self):
        self.h = ServerHarness(self)
        self.h.ehlo()
        self.h.send("MAIL FROM:<s@remote.test>\r\n")

    def test_unknown_local_user(self):
        """An unknown user in a local domain is 550 5.1.1."""
        self.assertEqual(self.rcpt(self.h, "nobody@example.test"),
                         ["550 5.1.1 <nobody@example.test>: no such user here"])

    def test_postmaster_always_accepted(self):
        """Bare <Postmaster> and postmaster@ any local domain, any case, are accepted."""
        for address in ("Postmaster", "POSTMASTER@example.test", "postmaster@example.org"):
            self.assertEqual(self.rcpt(self.h, address), ["250 2.1.5 Recipient ok"], address)

    def test_alias_expanded(self):
        """An alias is accepted and expanded into its members, keeping the original address."""
        self.rcpt(self.h, "info@example.test")
        self.h.send("DATA\r\n")
        self.h.send(MSG)
        rcpts = self.h.queued[0].recipients
        self.assertEqual([(r.address, r.original) for r in rcpts],
                         [("alice@example.test", "info@example.test"),
                          ("bob@example.test", "info@example.test")])

    def test_domain_specific_alias(self):
        """An alias written as a full address applies to that domain only."""
        self.assertEqual(self.rcpt(self.h, "sales@example.org"), ["250 2.1.5 Recipient ok"])
        self.assertEqual(self.rcpt(self.h, "sales@example.test")[0][:9], "550 5.1.1")

    def test_alias_loop(self):
        """An alias loop in the configuration is a temporary local error, not an acceptance."""
        self.assertEqual(self.rcpt(self.h, "loop1@example.test"),
                         ["451 4.3.0 Alias loop in local configuration"])

    def test_relay_denied_for_untrusted_client(self):
        """An unauthenticated client outside the trusted networks cannot relay: 550 5.7.1."""
        self.assertEqual(self.rcpt(self.h, "someone@elsewhere.test"),
                         ["550 5.7.1 <someone@elsewhere.test>: relay access denied"])

    def test_relay_denied_for_address_literal(self):
        """An address-literal recipient is not a local domain: relaying refused."""
        self.assertEqual(self.rcpt(self.h, "root@[192.0.2.1]")[0][:9], "550 5.7.1")

    def test_relay_allowed_from_trusted_network(self):
        """A client in a trusted network may relay."""
        h = ServerHarness(self, peer="127.0.0.1")
        h.ehlo()
        h.send("MAIL FROM:<s@remote.test>\r\n")
        self.assertEqual(self.rcpt(h, "someone@elsewhere.test"), ["250 2.1.5 Recipient ok"])

    def test_rcpt_before_mail(self):
        """RCPT before MAIL is 503 and MAIL still works afterwards."""
        h = ServerHarness(self)
        h.ehlo()
        self.assertEqual(self.rcpt(h, "alice@example.test"), ["503 5.5.1 Need MAIL command first"])
        self.assertEqual(h.send("MAIL FROM:<a@remote.test>\r\n"), ["250 2.1.0 Sender ok"])

    def test_data_without_rcpt(self):
        """DATA with no accepted recipient is 554 and no 354 is sent."""
        self.assertEqual(self.h.send("DATA\r\n"), ["554 5.5.1 No valid recipients"])

    def test_too_many_recipients(self):
        """Recipients past the limit get 452 4.5.3; the accepted ones still get the message."""
        h = ServerHarness(self, limits={"recipients": 2}, local={
            "users": ["u1", "u2", "u3", "postmaster"]})
        h.ehlo()
        h.send("MAIL FROM:<s@remote.test>\r\n")
        self.assertEqual(self.rcpt(h, "u1@example.test"), ["250 2.1.5 Recipient ok"])
        self.assertEqual(self.rcpt(h, "u2@example.test"), ["250 2.1.5 Recipient ok"])
        self.assertEqual(self.rcpt(h, "u3@example.test"), ["452 4.5.3 Too many recipients"])
        h.send("DATA\r\n")
        h.send(MSG)
        self.assertEqual([r.address for r in h.queued[0].recipients],
                         ["u1@example.test", "u2@example.test"])

    def test_hundred_recipients_accepted_by_default(self):
        """The default limit accepts the 100 recipients RFC 5321 requires."""
        users = [f"u{i}" for i in range(100)]
        h = ServerHarness(self, local={"users": users + ["postmaster"]})
        h.ehlo()
        h.send("MAIL FROM:<s@remote.test>\r\n")
        lines = h.send("".join(f"RCPT TO:<{u}@example.test>\r\n" for u in users))
        self.assertEqual(lines, ["250 2.1.5 Recipient ok"] * 100)

    def test_recipients_past_the_limit_are_not_errors(self):
        """F6: with the defaults (100 recipients, 20 errors), 150 RCPTs get 100 x 250 and 50 x 452 4.5.3, no 421; the message is queued for the 100, as Postfix does."""
        h = ServerHarness(self, peer="127.0.0.1")  # trusted: remote recipients relay
        h.ehlo()
        rcpts = [f"r{i}@remote{i}.test" for i in range(150)]
        lines = h.send("MAIL FROM:<s@remote.test>\r\n"
                       + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n")
        self.assertEqual(lines, ["250 2.1.0 Sender ok"] + ["250 2.1.5 Recipient ok"] * 100
                         + ["452 4.5.3 Too many recipients"] * 50
                         + ["354 End data with <CR><LF>.<CR><LF>"])
        [line] = h.send(MSG)
        self.assertTrue(line.startswith("250 2.0.0 Ok: queued as "), line)
        self.assertEqual([r.address for r in h.queued[0].recipients], rcpts[:100])
        self.assertFalse(h.transport.disconnecting)
        # The next transaction starts afresh: 100 more, then 452 again.
        lines = h.send("MAIL FROM:<s@remote.test>\r\n"
                       + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts))
        self.assertEqual(lines[1:], ["250 2.1.5 Recipient ok"] * 100
                         + ["452 4.5.3 Too many recipients"] * 50)

    def test_recipient_overshoot_counts_in_the_end(self):
        """Past RECIPIENT_OVERSHOOT such 452s in one transaction, each counts as an error again (Postfix's smtpd_recipient_overshoot_limit)."""
        from twisted_mta.inbound import server
        self.patch(server, "RECIPIENT_OVERSHOOT", 5)
        h = ServerHarness(self, peer="127.0.0.1", limits={"recipients": 2, "errors": 3})
        h.ehlo()
        lines = h.send("MAIL FROM:<s@remote.test>\r\n"
                       + "".join(f"RCPT TO:<r{i}@remote.test>\r\n" for i in range(20)))
        self.assertEqual(lines[1:], ["250 2.1.5 Recipient ok"] * 2
                         + ["452 4.5.3 Too many recipients"] * 8
                         + ["421 4.7.0 Too many errors, closing connection"])
        self.assertTrue(h.transport.disconnecting)

    def test_duplicate_recipient_stored_once(self):
        """The same recipient twice (directly and via an alias) is stored once."""
        self.rcpt(self.h, "alice@example.test")
        self.rcpt(self.h, "info@example.test")
        self.h.send("DATA\r\n")
        self.h.send(MSG)
        self.assertEqual([r.address for r in self.h.queued[0].recipients],
                         ["alice@example.test", "bob@example.test"])


class SyntaxTests(SynchronousTestCase):
    def setUp(self):
        self.h = ServerHarness(self)
        self.h.ehlo()

    def test_invalid_sender_address(self):
        """A malformed sender address is 501 5.1.7."""
        self.assertEqual(self.h.send("MAIL FROM:<not an address>\r\n"),
                         ["501 5.1.7 Bad sender address: bad address syntax"])

    def test_mail_without_brackets(self):
        """MAIL FROM without angle brackets is refused."""
        self.assertEqual(self.h.send("MAIL FROM:a@b.test\r\n"),
                         ["501 5.1.7 Bad sender address: address must be enclosed in <>"])

    def test_mail_syntax(self):
        """MAIL without FROM: gets the syntax hint."""
        self.assertEqual(self.h.send("MAIL <a@b.test>\r\n"), ["501 5.5.4 Syntax: MAIL FROM:<address>"])

    def test_invalid_recipient_address(self):
        """A malformed recipient address is 501 5.1.3."""
        self.h.send("MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(self.h.send("RCPT TO:<alice@@example.test>\r\n"),
                         ["501 5.1.3 Bad recipient address: bad address syntax"])

    def test_source_route_stripped(self):
        """A source route is accepted and delivery goes to the final mailbox."""
        self.h.send("MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(self.h.send("RCPT TO:<@relay.test:alice@example.test>\r\n"),
                         ["250 2.1.5 Recipient ok"])

    def test_mail_twice(self):
        """A second MAIL inside a transaction is 503."""
        self.h.send("MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(self.h.send("MAIL FROM:<a@remote.test>\r\n"),
                         ["503 5.5.1 Sender already specified"])

    def test_mail_before_ehlo(self):
        """MAIL before EHLO/HELO is 503."""
        h = ServerHarness(self)
        self.assertEqual(h.send("MAIL FROM:<a@remote.test>\r\n"), ["503 5.5.1 Send EHLO or HELO first"])

    def test_unknown_command(self):
        """An unknown command is 500 and the session goes on."""
        self.assertEqual(self.h.send("FOO bar\r\n"), ["500 5.5.1 Command unrecognized"])
        self.assertEqual(self.h.send("NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_empty_line(self):
        """An empty command line is a syntax error."""
        self.assertEqual(self.h.send("\r\n"), ["500 5.5.2 Syntax error"])

    def test_parameters_on_rset_and_data(self):
        """RSET and DATA take no parameters: 501."""
        self.assertEqual(self.h.send("RSET now\r\n"), ["501 5.5.4 Syntax error: no parameters allowed"])
        self.assertEqual(self.h.send("DATA now\r\n"), ["501 5.5.4 Syntax error: no parameters allowed"])

    def test_unknown_mail_parameter(self):
        """An unsupported MAIL parameter is 555."""
        self.assertEqual(self.h.send("MAIL FROM:<a@remote.test> XFOO\r\n"),
                         ["555 5.5.4 Unsupported MAIL parameter XFOO"])

    def test_unknown_rcpt_parameter(self):
        """An unsupported RCPT parameter is 555."""
        self.h.send("MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(self.h.send("RCPT TO:<alice@example.test> XFOO=1\r\n"),
                         ["555 5.5.4 Unsupported RCPT parameter XFOO"])

    def test_dsn_parameters_recorded(self):
        """RET, ENVID, NOTIFY and ORCPT (xtext) are kept in the envelope, per recipient, through alias expansion."""
        self.h.send("MAIL FROM:<a@remote.test> RET=HDRS ENVID=QQ+2B1\r\n")
        self.assertEqual(self.h.send("RCPT TO:<info@example.test> NOTIFY=SUCCESS,FAILURE "
                                     "ORCPT=rfc822;info+2Bx@example.test\r\n"),
                         ["250 2.1.5 Recipient ok"])
        self.h.send("RCPT TO:<alice@example.org> NOTIFY=NEVER\r\n")
        self.h.send("DATA\r\n")
        self.h.send("Subject: x\r\n\r\nx\r\n.\r\n")
        [env] = self.h.queued
        self.assertEqual((env.ret, env.envid), ("HDRS", "QQ+1"))
        notify = {r.address: (r.notify, r.orcpt) for r in env.recipients}
        self.assertEqual(notify["alice@example.test"],
                         (("SUCCESS", "FAILURE"), "rfc822;info+x@example.test"))
        self.assertEqual(notify["bob@example.test"],
                         (("SUCCESS", "FAILURE"), "rfc822;info+x@example.test"))

    def test_bad_dsn_parameters(self):
        """Malformed DSN parameters get 501 with the reason."""
        self.assertEqual(self.h.send("MAIL FROM:<a@remote.test> RET=SOME\r\n"),
                         ["501 5.5.4 RET must be FULL or HDRS"])
        self.assertEqual(self.h.send("MAIL FROM:<a@remote.test> ENVID=" + "x" * 101 + "\r\n"),
                         ["501 5.5.4 ENVID is longer than 100 characters"])
        self.h.send("MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(self.h.send("RCPT TO:<alice@example.test> NOTIFY=NEVER,DELAY\r\n"),
                         ["501 5.5.4 NOTIFY=NEVER cannot be combined with other values"])
        self.assertEqual(self.h.send("RCPT TO:<alice@example.test> ORCPT=foo\r\n"),
                         ["501 5.5.4 ORCPT must be addr-type;address, e.g. rfc822;user@example.com"])
        self.assertEqual(self.h.send("RCPT TO:<alice@example.test> ORCPT=rfc822;a+zz\r\n"),
                         ["501 5.5.4 bad xtext: '+' must be followed by two upper-case hex digits"])

    def test_dsn_header_injection_refused(self):
        """F7: an ENVID or ORCPT whose decoded value holds CR/LF (or any control) is refused with 501 5.5.4, as Postfix does; nothing is queued."""
        h = ServerHarness(self, peer="127.0.0.1")
        h.ehlo()
        self.assertEqual(h.send("MAIL FROM:<victim@x.test> ENVID=abc+0D+0AX-Injected:+20yes\r\n"),
                         ["501 5.5.4 ENVID must be printable US-ASCII once decoded (RFC 3461 4.4)"])
        self.assertEqual(h.send("MAIL FROM:<victim@x.test> ENVID=ok+20id\r\n"),
                         ["250 2.1.0 Sender ok"])
        self.assertEqual(h.send("RCPT TO:<alice@example.test> NOTIFY=SUCCESS "
                                "ORCPT=rfc822;x@y+0D+0AAction:+20failed+0D+0A\r\n"),
                         ["501 5.5.4 ORCPT address must be printable US-ASCII once decoded "
                          "(RFC 3461 4.2)"])
        self.assertEqual(h.send("DATA\r\n"), ["554 5.5.1 No valid recipients"])
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])

    def test_body_and_auth_parameters(self):
        """BODY=8BITMIME and AUTH=<> are accepted on MAIL."""
        self.assertEqual(self.h.send("MAIL FROM:<a@remote.test> BODY=8BITMIME AUTH=<>\r\n"),
                         ["250 2.1.0 Sender ok"])

    def test_non_ascii_command(self):
        """
        UTF-8 in a path without SMTPUTF8 is 550 5.6.7 (RFC 6531 3.5); 8-bit
        octets in any other command, or that are not UTF-8, are invalid
        characters (tests.inbound.test_smtputf8 has the whole table).
        """
        self.assertEqual(self.h.send("MAIL FROM:<jösé@remote.test>\r\n".encode("utf-8")),
                         ["550 5.6.7 Non-ASCII address needs SMTPUTF8: "
                          "MAIL FROM:<address> SMTPUTF8"])
        self.assertEqual(self.h.send("HELP ö\r\n".encode("utf-8")),
                         ["500 5.5.2 Invalid character in command"])
        self.assertEqual(self.h.send(b"MAIL FROM:<j\xf6s\xe9@remote.test>\r\n"),
                         ["500 5.5.2 Invalid character in command"])

    def test_nul_in_command(self):
        """A NUL byte in a command is refused."""
        self.assertEqual(self.h.send(b"MAIL FROM:<a\x00b@remote.test>\r\n"),
                         ["500 5.5.2 Invalid character in command"])

    def test_long_mail_with_parameters_accepted(self):
        """A MAIL line longer than 512 octets (extensions) is accepted under the default limit."""
        line = "MAIL FROM:<a@remote.test> SIZE=1000 BODY=8BITMIME AUTH=" + "x" * 500 + "\r\n"
        self.assertGreater(len(line), 512)
        self.assertEqual(self.h.send(line), ["250 2.1.0 Sender ok"])

    def test_command_line_512_accepted(self):
        """A 512-octet command line is not 'too long'."""
        line = "NOOP " + "x" * (512 - 7) + "\r\n"
        self.assertEqual(len(line), 512)
        self.assertEqual(self.h.send(line), ["250 2.0.0 Ok"])


class BadInputTests(SynchronousTestCase):
    """
    Each abuse the acceptance list names, with the exact reply.
    """

    def test_overlong_command_line(self):
        """A command line over the limit gets one 500 5.5.2, is skipped, and the session goes on."""
        h = ServerHarness(self)
        lines = h.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
        self.assertEqual(lines, ["500 5.5.2 Line too long", "250 2.0.0 Ok"])

    def test_overlong_command_line_in_pieces(self):
        """An endless line sent in pieces gets one 500, memory stays bounded, and the session recovers."""
        h = ServerHarness(self)
        lines = []
        for _ in range(50):
            lines += h.send(b"y" * 1000)
            self.assertLess(len(h.protocol._inbuf), 2048)
        lines += h.send(b"\r\nNOOP\r\n")
        self.assertEqual(lines, ["500 5.5.2 Line too long", "250 2.0.0 Ok"])

    def test_overlong_data_line(self):
        """A data line over the limit fails the message with 554 5.6.0 after the dot; the session goes on."""
        h = ServerHarness(self, limits={"data_line_length": 1000})
        h.start_transaction()
        lines = h.send(b"Subject: x\r\n\r\n" + b"z" * 1200 + b"\r\n.\r\nNOOP\r\n")
        self.assertEqual(lines, ["554 5.6.0 Message contains a line longer than 1000 octets",
                                 "250 2.0.0 Ok"])
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])

    def test_overlong_data_line_in_pieces(self):
        """An over-long data line sent in pieces does not buffer without bound."""
        h = ServerHarness(self, limits={"data_line_length": 1000})
        h.start_transaction()
        for _ in range(100):
            h.send(b"z" * 999)
            self.assertLess(len(h.protocol._inbuf), 1001)
        self.assertEqual(h.send(b"\r\n.\r\n"),
                         ["554 5.6.0 Message contains a line longer than 1000 octets"])

    def test_oversize_declared(self):
        """MAIL with SIZE= over the limit is 552 5.3.4."""
        h = ServerHarness(self, limits={"message_size": 10000})
        h.ehlo()
        self.assertEqual(h.send("MAIL FROM:<a@remote.test> SIZE=20000\r\n"),
                         ["552 5.3.4 Message size exceeds the limit of 10000 octets"])
        self.assertEqual(h.send("MAIL FROM:<a@remote.test> SIZE=9000\r\n"), ["250 2.1.0 Sender ok"])

    def test_bad_size_parameter(self):
        """A non-numeric SIZE= is a syntax error."""
        h = ServerHarness(self)
        h.ehlo()
        self.assertEqual(h.send("MAIL FROM:<a@remote.test> SIZE=big\r\n"),
                         ["501 5.5.4 Syntax: SIZE=<octets>"])

    def test_oversize_actual(self):
        """A message over the limit without SIZE= is 552 5.3.4 after the dot and is not queued."""
        h = ServerHarness(self, limits={"message_size": 10000})
        h.start_transaction()
        body = (b"x" * 98 + b"\r\n") * 200
        self.assertEqual(h.send(b"Subject: big\r\n\r\n" + body + b".\r\n"),
                         ["552 5.3.4 Message exceeds the size limit of 10000 octets"])
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])

    def test_nul_in_data(self):
        """NUL bytes in the message fail it with 554 5.6.0."""
        h = ServerHarness(self)
        h.start_transaction()
        self.assertEqual(h.send(b"Subject: x\r\n\r\na\x00b\r\n.\r\n"),
                         ["554 5.6.0 Message contains NUL characters"])
        self.assertEqual(h.queued, [])

    def test_bare_lf_in_command(self):
        """A bare LF does not end a command: the line is refused as a whole (500 5.5.2)."""
        h = ServerHarness(self)
        self.assertEqual(h.send(b"HELO x\nMAIL FROM:<a@remote.test>\r\n"),
                         ["500 5.5.2 Bare CR or LF in command line is not allowed"])

    def test_bare_cr_in_command(self):
        """A bare CR inside a command is refused, not taken as two commands."""
        h = ServerHarness(self)
        h.ehlo()
        self.assertEqual(h.send(b"MAIL FROM:<a@remote.test>\rRCPT TO:<b@example.test>\r\n"),
                         ["500 5.5.2 Bare CR or LF in command line is not allowed"])

    def test_bare_lf_in_data_normalized(self):
        """With bare_newline = normalize, a bare LF or CR in data is stored as CRLF."""
        h = ServerHarness(self)
        h.start_transaction()
        self.assertEqual(h.send(b"Subject: x\r\n\r\na\nb\rc\r\n.\r\n")[0][:3], "250")
        self.assertTrue(h.queued_messages()[0].endswith(b"\r\n\r\na\r\nb\r\nc\r\n"))

    def test_bare_lf_in_data_rejected(self):
        """With bare_newline = reject, a bare LF fails the message with 554 5.6.0 after the dot."""
        h = ServerHarness(self, inbound={"bare_newline": "reject"})
        h.start_transaction()
        self.assertEqual(h.send(b"Subject: x\r\n\r\na\nb\r\n.\r\n"),
                         ["554 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"])
        self.assertEqual(h.queued, [])

    def smuggle(self, terminator: bytes, policy: str = "normalize"):
        h = ServerHarness(self, inbound={"bare_newline": policy})
        h.start_transaction()
        lines = h.send(b"Subject: first\r\n\r\nline" + terminator +
                       b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@example.test>\r\n"
                       b"DATA\r\nSubject: smuggled\r\n\r\nevil\r\n.\r\n")
        return h, lines

    def assert_one_message(self, terminator: bytes):
        h, lines = self.smuggle(terminator)
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(lines[0][:3], "250")
        self.assertEqual(len(h.queued), 1)
        self.assertEqual([r.address for r in h.queued[0].recipients], ["alice@example.test"])
        stored = h.queued_messages()[0]
        self.assertIn(b"Subject: smuggled", stored)
        bare = stored.replace(b"\r\n", b"")
        self.assertNotIn(b"\n", bare)
        self.assertNotIn(b"\r", bare)

    def test_smuggling_lf_dot_lf(self):
        """'\\n.\\n' does not end the data: exactly one message, for the first transaction's recipient."""
        self.assert_one_message(b"\n.\n")

    def test_smuggling_lf_dot_crlf(self):
        """'\\n.\\r\\n' does not end the data: exactly one message."""
        self.assert_one_message(b"\n.\r\n")

    def test_smuggling_crlf_dot_lf(self):
        """'\\r\\n.\\n' does not end the data: exactly one message."""
        self.assert_one_message(b"\r\n.\n")

    def test_smuggling_cr_dot_cr(self):
        """'\\r.\\r' does not end the data: exactly one message."""
        self.assert_one_message(b"\r.\r")

    def test_smuggling_crcrlf(self):
        """'\\r\\r\\n.\\r\\r\\n' does not end the data: exactly one message."""
        self.assert_one_message(b"\r\r\n.\r\r\n")

    def test_smuggling_rejected_under_reject_policy(self):
        """Under bare_newline = reject a smuggling attempt yields no message at all, and no second transaction."""
        h, lines = self.smuggle(b"\n.\n", policy="reject")
        self.assertEqual(lines, ["554 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"])
        self.assertEqual(h.queued, [])

    def test_loop_detection(self):
        """A message with more Received headers than the limit is refused 554 5.4.6."""
        h = ServerHarness(self, limits={"received_headers": 30})
        h.start_transaction()
        hops = b"".join(b"Received: from hop%d by x; date\r\n" % i for i in range(31))
        self.assertEqual(h.send(hops + b"Subject: x\r\n\r\nbody\r\n.\r\n"),
                         ["554 5.4.6 Too many hops (Received headers), possible mail loop"])
        h.start_transaction()
        self.assertEqual(h.send(hops[:-35] + b"Subject: x\r\n\r\nbody\r\n.\r\n")[0][:3], "250")

    def test_received_in_body_not_counted(self):
        """Received: lines in the body do not count as hops."""
        h = ServerHarness(self, limits={"received_headers": 10})
        h.start_transaction()
        body = b"Subject: x\r\n\r\n" + b"Received: quoted\r\n" * 20 + b".\r\n"
        self.assertEqual(h.send(body)[0][:3], "250")

    def test_many_connections_from_one_address(self):
        """Connections past the per-address limit get 421 4.7.0 and are closed; others are unaffected."""
        h = ServerHarness(self, limits={"connections_per_ip": 2})
        p2, t2 = h.connect()
        p3, t3 = h.connect()
        self.assertEqual(h.read(t2), ["220 mx.example.test ESMTP"])
        self.assertEqual(h.read(t3), ["421 4.7.0 Too many connections from your address, try again later"])
        self.assertTrue(t3.disconnecting)
        p3.connectionLost(None)
        p2.connectionLost(None)
        p4, t4 = h.connect()
        self.assertEqual(h.read(t4), ["220 mx.example.test ESMTP"])

    def test_total_connection_limit(self):
        """Past the total connection limit new clients get 421 4.3.2."""
        h = ServerHarness(self, limits={"connections": 1})
        p2, t2 = h.connect()
        self.assertEqual(h.read(t2), ["421 4.3.2 Too many connections, try again later"])

    def test_stalled_client_times_out(self):
        """A client that sends nothing for the command timeout gets 421 4.4.2 and is disconnected."""
        h = ServerHarness(self, limits={"command_timeout": 60})
        h.clock.advance(59)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(2)
        self.assertEqual(h.read(), ["421 4.4.2 Timeout exceeded, closing connection"])
        self.assertTrue(h.transport.disconnecting)

    def test_stall_in_data_times_out_and_discards(self):
        """A client that stalls in DATA times out after the data timeout, and nothing is queued."""
        h = ServerHarness(self, limits={"command_timeout": 60, "data_timeout": 120,
                                        "min_data_rate": 0})  # the idle limit alone
        h.start_transaction()
        h.send(b"Subject: partial\r\n")
        h.clock.advance(100)
        self.assertFalse(h.transport.disconnecting)
        h.clock.advance(30)
        self.assertEqual(h.read(), ["421 4.4.2 Timeout exceeded, closing connection"])
        h.protocol.connectionLost(None)
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])

    def test_connection_lost_mid_data(self):
        """A dropped connection during DATA leaves no queue entry and no debris."""
        h = ServerHarness(self)
        h.start_transaction()
        h.send(b"Subject: partial\r\n\r\nsome")
        h.protocol.connectionLost(None)
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])

    def test_error_limit_disconnects(self):
        """After the configured number of error replies the client gets 421 4.7.0 and is disconnected."""
        h = ServerHarness(self, limits={"errors": 3})
        self.assertEqual(h.send("FOO\r\nFOO\r\n"), ["500 5.5.1 Command unrecognized"] * 2)
        self.assertFalse(h.transport.disconnecting)
        self.assertEqual(h.send("FOO\r\nNOOP\r\n"), [
            "500 5.5.1 Command unrecognized", "421 4.7.0 Too many errors, closing connection"])
        self.assertTrue(h.transport.disconnecting)

    def test_internal_error_is_451_not_traceback(self):
        """An unexpected exception in a handler gives the peer 451 4.3.0 (no traceback) and is logged."""
        h = ServerHarness(self)
        h.ehlo()

        def broken(arg):
            raise RuntimeError("boom")

        h.protocol.smtp_NOOP = broken
        lines = h.send("NOOP\r\n")
        self.assertEqual(lines, ["451 4.3.0 Local error in processing, try again later"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_queue_write_failure_is_451(self):
        """If the spool cannot store the message, the reply after the dot is 451 4.3.0 and nothing is queued."""
        h = ServerHarness(self)
        h.start_transaction()
        import os
        os.rename(os.path.join(h.spool.path, "new"), os.path.join(h.spool.path, "gone"))
        lines = h.send(MSG)
        self.assertEqual(lines, ["451 4.3.0 Could not store the message, try again later"])
        self.assertEqual(h.queued, [])
        self.assertEqual(self.flushLoggedErrors(), [])  # an OSError: one line, no traceback


class FailingWriter:
    """
    A spool writer whose commit fails with C{error} (the message data is
    taken and dropped, as a full disk would).
    """

    def __init__(self, real, error: BaseException) -> None:
        self.real = real
        self.error = error
        self.queue_id = real.queue_id

    def begin(self, envelope) -> None:
        self.real.begin(envelope)

    def write(self, data: bytes) -> None:
        self.real.write(data)

    def commit(self, envelope):
        from twisted.internet import defer
        self.real.abort()
        return defer.fail(self.error)

    def abort(self):
        return self.real.abort()


class StorageFailureTests(SynchronousTestCase):
    """
    F8: a spool that cannot store messages is logged as one line per
    refused message and one warning per episode; a bug keeps its traceback.
    """

    def setUp(self):
        from twisted.logger import globalLogPublisher
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.h = ServerHarness(self)
        self.faults = []  # per message: an exception for its commit, or None
        new_message = self.h.spool.new_message

        def failing():
            writer = new_message()
            fault = self.faults.pop(0) if self.faults else None
            return writer if fault is None else FailingWriter(writer, fault)
        self.h.spool.new_message = failing
        self.h.ehlo()

    def message(self) -> str:
        self.h.send("MAIL FROM:<s@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        [line] = self.h.send(MSG)
        return line

    def logged(self, *names):
        return [(e["event"], e["log_level"].name, e.get("error"), e.get("count"),
                 "log_failure" in e) for e in self.events if e.get("event") in names]

    def test_full_disk_episode(self):
        """Three refusals on ENOSPC: one warning, three info lines with the errno words, no traceback; the next success ends the episode in one line; a new error starts another."""
        import errno
        import os
        enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.faults = [enospc, enospc, enospc, None, OSError(errno.EIO, os.strerror(errno.EIO))]
        replies = [self.message()[:3] for _ in range(5)]
        self.assertEqual(replies, ["451", "451", "451", "250", "451"])
        words = "ENOSPC: No space left on device"
        self.assertEqual(self.logged("inbound.queue-failing", "inbound.queue-error",
                                     "inbound.queue-recovered"), [
            ("inbound.queue-failing", "warn", words, None, False),
            ("inbound.queue-error", "info", words, None, False),
            ("inbound.queue-error", "info", words, None, False),
            ("inbound.queue-error", "info", words, None, False),
            ("inbound.queue-recovered", "info", None, 3, False),
            ("inbound.queue-failing", "warn", "EIO: Input/output error", None, False),
            ("inbound.queue-error", "info", "EIO: Input/output error", None, False),
        ])
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(len(self.h.queued), 1)
        self.assertEqual([n for n in self.h.spool_entries() if n != self.h.queued[0].queue_id],
                         [])

    def test_episode_shared_by_listeners(self):
        """A second listener on the same spool is in the same episode: no second warning."""
        import errno
        from twisted_mta.inbound.server import InboundFactory
        other = InboundFactory(self.h.config, "submission", self.h.spool, self.h.clock,
                               on_queued=self.h.queued.append)
        self.assertIs(other.storage, self.h.factory.storage)
        self.faults = [OSError(errno.ENOSPC, "No space left on device")] * 2
        self.message()
        self.h.factory = other
        self.h.protocol, self.h.transport = self.h.connect()
        self.h.read()
        self.h.ehlo()
        self.message()
        self.assertEqual([e[0] for e in self.logged("inbound.queue-failing",
                                                    "inbound.queue-error")],
                         ["inbound.queue-failing", "inbound.queue-error",
                          "inbound.queue-error"])

    def test_bug_keeps_its_traceback(self):
        """A non-OSError from the spool is a bug: 451, and its traceback at critical level; no episode."""
        self.faults = [RuntimeError("bug")]
        self.assertEqual(self.message(),
                         "451 4.3.0 Could not store the message, try again later")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(self.logged("inbound.queue-failing", "inbound.queue-error"),
                         [("inbound.queue-error", "critical", None, None, True)])


class StartTLSTests(SynchronousTestCase):
    """
    Regression tests for the STARTTLS defects of Twisted's stock ESMTP.
    """

    def harness(self, **kw):
        return ServerHarness(self, tls_context=object(), transport_factory=FakeTLSTransport, **kw)

    def test_starttls_command_injection_discarded(self):
        """Commands pipelined after STARTTLS in cleartext are discarded, never executed or answered."""
        h = self.harness()
        h.ehlo()
        lines = h.send(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\nRSET\r\n")
        self.assertEqual(lines, ["220 2.0.0 Ready to start TLS"])
        self.assertIsNotNone(h.transport.tls_context)
        h.protocol.handshakeCompleted()
        self.assertEqual(h.read(), [])
        self.assertEqual(h.send("MAIL FROM:<a@remote.test>\r\n"), ["503 5.5.1 Send EHLO or HELO first"])

    def test_session_reset_after_starttls(self):
        """STARTTLS resets the session: a transaction begun before it is gone, EHLO is required again."""
        h = self.harness()
        h.ehlo()
        h.send("MAIL FROM:<a@remote.test>\r\n")
        h.send("STARTTLS\r\n")
        h.protocol.handshakeCompleted()
        self.assertEqual(h.send("RCPT TO:<alice@example.test>\r\n"), ["503 5.5.1 Need MAIL command first"])
        lines = h.ehlo()
        self.assertNotIn("250 STARTTLS", lines)
        self.assertNotIn("250-STARTTLS", lines)

    def test_starttls_with_arguments(self):
        """STARTTLS with an argument is 501 and TLS does not start."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send("STARTTLS now\r\n"), ["501 5.5.4 Syntax error: no parameters allowed"])
        self.assertIsNone(h.transport.tls_context)

    def test_second_starttls(self):
        """STARTTLS inside TLS is 503."""
        h = self.harness()
        h.ehlo()
        h.send("STARTTLS\r\n")
        h.protocol.handshakeCompleted()
        h.ehlo()
        self.assertEqual(h.send("STARTTLS\r\n"), ["503 5.5.1 TLS already active"])

    def test_starttls_without_certificate(self):
        """STARTTLS without a configured certificate is 454."""
        h = ServerHarness(self, transport_factory=FakeTLSTransport)
        h.ehlo()
        self.assertEqual(h.send("STARTTLS\r\n"), ["454 4.7.0 TLS not available"])

    def test_received_header_records_tls(self):
        """After STARTTLS the Received header says ESMTPS with the TLS version and cipher."""
        h = self.harness()
        h.ehlo()
        h.send("STARTTLS\r\n")
        h.protocol.handshakeCompleted()
        h.start_transaction()
        h.send(MSG)
        stored = h.queued_messages()[0]
        self.assertIn(b" with ESMTPS id ", stored)
        self.assertIn(b"(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))", stored)
        self.assertEqual(h.queued[0].client["tls"], "TLSv1.3 TLS_AES_256_GCM_SHA384")

    def test_submission_requires_tls_before_mail(self):
        """On a submission listener with a certificate, MAIL before STARTTLS is 530 5.7.0."""
        h = self.harness(role="submission")
        h.ehlo()
        self.assertEqual(h.send("MAIL FROM:<a@remote.test>\r\n"),
                         ["530 5.7.0 Must issue a STARTTLS command first"])
        h.send("STARTTLS\r\n")
        h.protocol.handshakeCompleted()
        h.ehlo()
        self.assertEqual(h.send("MAIL FROM:<a@remote.test>\r\n"), ["250 2.1.0 Sender ok"])

    def test_mx_does_not_require_tls(self):
        """Port 25 (mx role) accepts a whole cleartext transaction even when TLS is offered."""
        h = self.harness()
        h.start_transaction()
        self.assertEqual(h.send(MSG)[0][:3], "250")

    def test_implicit_tls_listener(self):
        """On an implicit-TLS transport STARTTLS is not advertised and is refused with 503."""
        h = self.harness(role="submissions")

        class Implicit(FakeTLSTransport):
            pass

        from zope.interface import directlyProvides
        from twisted.internet.interfaces import ISSLTransport, ITLSTransport
        proto = h.factory.buildProtocol(IPv4Address("TCP", "192.0.2.9", 1))
        t = Implicit(peerAddress=IPv4Address("TCP", "192.0.2.9", 1))
        directlyProvides(t, ITLSTransport, ISSLTransport)
        proto.makeConnection(t)
        t.clear()
        proto.dataReceived(b"EHLO c\r\n")
        self.assertNotIn(b"STARTTLS", t.value())
        t.clear()
        proto.dataReceived(b"STARTTLS\r\n")
        self.assertEqual(t.value(), b"503 5.5.1 TLS already active\r\n")


class ReceivedDateTests(SynchronousTestCase):
    """The Received field's date is made once a second and is formatdate's."""

    def test_table(self) -> None:
        import email.utils

        from twisted_mta.inbound.server import received_date
        for now in (1_800_000_000.0, 1_800_000_000.9, 1_800_000_001.2, 1_800_000_000.5):
            self.assertEqual(received_date(now),
                             email.utils.formatdate(int(now), localtime=True), now)
