"""
SMTPUTF8 on the way in (RFC 6531): the EHLO keyword, the MAIL parameter,
UTF-8 paths only with it (553/550 5.6.7 without), UTF-8 in no other
command, local users with UTF-8 names, and the flag carried into the
envelope, the spool header and the Received field.
"""

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ServerHarness

UTF8_LOCAL = {"domains": ["example.test", "xn--fsqu00a.test"],
              "users": ["alice", "postmaster", "jörg", "用户"]}


def harness(testcase) -> ServerHarness:
    h = ServerHarness(testcase, local=UTF8_LOCAL)
    h.ehlo()
    return h


class AdvertiseTests(SynchronousTestCase):
    def test_ehlo(self):
        """EHLO lists SMTPUTF8 (beside 8BITMIME, RFC 6531 3.1 item 8)."""
        lines = ServerHarness(self).ehlo()
        self.assertIn("SMTPUTF8", [line[4:] for line in lines])
        self.assertIn("8BITMIME", [line[4:] for line in lines])


class CommandTests(SynchronousTestCase):
    # (commands before the last, the last command, the start of its reply)
    TABLE = [
        ([], "MAIL FROM:<jösé@remote.test> SMTPUTF8", "250 2.1.0"),
        ([], "MAIL FROM:<用户@例子.test> smtputf8", "250 2.1.0"),
        ([], "MAIL FROM:<jösé@remote.test>", "550 5.6.7"),
        ([], "MAIL FROM:<s@bücher.test>", "550 5.6.7"),
        ([], "MAIL FROM:<s@remote.test> SMTPUTF8=yes", "501 5.5.4"),
        ([], "MAIL FROM:<s@remote.test> SMTPUTF8 BODY=8BITMIME", "250 2.1.0"),
        ([], "MAIL FROM:<\"jö sé\"@remote.test> SMTPUTF8", "250 2.1.0"),
        ([], "MAIL FROM:<a@xn--zz-.test> SMTPUTF8", "501 5.1.7"),
        ([], "MAIL FROM:<a@ä..test> SMTPUTF8", "501 5.1.7"),
        ([], "MAIL FROM:<a\u0085b@remote.test> SMTPUTF8", "500 5.5.2"),  # a C1 control
        ([], "MAIL FROM:<" + "ä" * 33 + "@remote.test> SMTPUTF8", "501 5.1.7"),  # 66 octets
        (["MAIL FROM:<s@remote.test>"], "RCPT TO:<jörg@example.test>", "553 5.6.7"),
        (["MAIL FROM:<s@remote.test> SMTPUTF8"], "RCPT TO:<jörg@example.test>", "250 2.1.5"),
        (["MAIL FROM:<s@remote.test> SMTPUTF8"], "RCPT TO:<JÖRG@example.test>", "250 2.1.5"),
        (["MAIL FROM:<s@remote.test> SMTPUTF8"], "RCPT TO:<用户@例子.test>", "250 2.1.5"),
        (["MAIL FROM:<s@remote.test> SMTPUTF8"], "RCPT TO:<nobody@例子.test>", "550 5.1.1"),
        (["MAIL FROM:<s@remote.test> SMTPUTF8"], "RCPT TO:<jürgen@example.test>", "550 5.1.1"),
        ([], "EHLO bücher.test", "500 5.5.2"),
        ([], "NOOP ä", "500 5.5.2"),
    ]

    def test_table(self):
        """Each row's reply, from a fresh session."""
        for before, command, expected in self.TABLE:
            h = harness(self)
            for line in before:
                self.assertEqual(h.send(line + "\r\n")[0][:3], "250", line)
            lines = h.send(command + "\r\n")
            self.assertEqual(lines[0][:len(expected)], expected, (command, lines))

    def test_not_utf8(self):
        """Octets that are not UTF-8 are refused as invalid characters."""
        h = harness(self)
        self.assertEqual(h.send(b"MAIL FROM:<j\xf6rg@remote.test> SMTPUTF8\r\n"),
                         ["500 5.5.2 Invalid character in command"])

    def test_decomposed_name(self):
        """A name typed decomposed (NFD) finds the user configured composed (NFC)."""
        h = harness(self)
        h.send("MAIL FROM:<s@remote.test> SMTPUTF8\r\n")
        self.assertEqual(h.send("RCPT TO:<jo\u0308rg@example.test>\r\n"),
                         ["250 2.1.5 Recipient ok"])


class EnvelopeTests(SynchronousTestCase):
    def transaction(self, mail: str, rcpt: str):
        h = harness(self)
        self.assertEqual(h.send(f"MAIL FROM:<{mail}\r\n")[0][:3], "250")
        self.assertEqual(h.send(f"RCPT TO:<{rcpt}>\r\n")[0][:3], "250")
        self.assertEqual(h.send("DATA\r\n")[0][:3], "354")
        lines = h.send("Subject: Grüße\r\n\r\nbody\r\n.\r\n".encode())
        self.assertEqual(lines[0][:3], "250", lines)
        return h, h.queued[-1]

    def test_flag_carried(self):
        """
        The envelope has the flag and the UTF-8 addresses; the spool's
        header restores both; the Received field says UTF8SMTP.
        """
        h, env = self.transaction("jösé@remote.test> SMTPUTF8", "用户@例子.test")
        self.assertTrue(env.smtputf8)
        self.assertEqual(env.sender, "jösé@remote.test")
        self.assertEqual([r.address for r in env.recipients], ["用户@例子.test"])
        stored = h.spool.load(env.queue_id)
        self.assertTrue(stored.smtputf8)
        self.assertEqual(stored.sender, "jösé@remote.test")
        message = h.spool.read_message(env.queue_id)
        self.assertIn(b" with UTF8SMTP id ", message)
        self.assertIn("for <用户@例子.test>".encode(), message)
        self.assertIn("Subject: Grüße".encode(), message)

    def test_without(self):
        """Without the parameter the envelope is not flagged; ESMTP in Received."""
        h, env = self.transaction("s@remote.test>", "alice@example.test")
        self.assertFalse(env.smtputf8)
        self.assertFalse(h.spool.load(env.queue_id).smtputf8)
        self.assertIn(b" with ESMTP id ", h.spool.read_message(env.queue_id))

    def test_json_round_trip(self):
        """The workers' envelope JSON carries the flag both ways."""
        from twisted_mta.model import Envelope
        _, env = self.transaction("jösé@remote.test> SMTPUTF8", "jörg@example.test")
        again = Envelope.from_json(env.to_json(compact=True))
        self.assertEqual(again, env)
        self.assertTrue(again.smtputf8)
        self.assertTrue(env.to_json(compact=True).isascii())
