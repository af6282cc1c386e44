"""
Interop with a real Postfix: a private instance relays to our MTA.
"""

from __future__ import annotations

import os
import smtplib
import uuid

from twisted.trial import unittest

from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, MTA_HOSTNAME, MTAProcess, files_containing, make_message,
    make_tempdir, parse_message, postfix_unavailable, start_postfix, wait_for,
    write_server_cert,
)

SENDER = "sender@client.example.test"
ALICE = f"alice@{LOCAL_DOMAIN}"


class PostfixToUsTests(unittest.TestCase):
    """
    Mail submitted to Postfix by SMTP is relayed by Postfix's smtp client to
    our mx listener and delivered to a local Maildir.
    """

    def setUp(self) -> None:
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)

    def _relay(self, mta: MTAProcess, postfix_main: dict[str, str] | None = None,
               users: tuple[str, ...] = ("alice",), body_lines: tuple[str, ...] = ()):
        """
        Start Postfix relaying to C{mta}, submit one message for C{users} to
        Postfix, wait until each has exactly one copy and our spool is empty;
        return (token, postfix, {user: path}).
        """
        postfix = start_postfix(self, mta.port, postfix_main)
        token = uuid.uuid4().hex
        rcpts = [f"{u}@{LOCAL_DOMAIN}" for u in users]
        with smtplib.SMTP(LOOPBACK, postfix.smtpd_port, local_hostname="client.example.test",
                          timeout=10) as client:
            refused = client.sendmail(SENDER, rcpts,
                                      make_message(token, recipient=rcpts[0], body_lines=body_lines))
        self.assertEqual(refused, {})

        def describe() -> str:
            return f"message {token} not delivered\n{postfix.describe()}\n{mta.describe()}"

        for user in users:
            maildir = mta.maildir(user)
            wait_for(lambda: files_containing(maildir, token.encode()), 15, describe)
        wait_for(lambda: "status=sent" in postfix.maillog(), 10,
                 lambda: f"Postfix did not log status=sent\n{postfix.describe()}")
        wait_for(lambda: not mta.spool_contents(), 10,
                 lambda: f"spool not empty: {mta.spool_contents()}\n{mta.describe()}")
        found = {}
        for user in users:  # the entry is gone: no further copy can come
            maildir = mta.maildir(user)
            paths = files_containing(maildir, token.encode())
            self.assertEqual(len(paths), 1, describe())
            self.assertTrue(paths[0].startswith(os.path.join(maildir, "new") + os.sep), paths)
            found[user] = paths[0]
        return token, postfix, found

    def test_postfix_relays_to_us(self) -> None:
        """Postfix relays a message to us and it lands in alice's Maildir new/ with both Received headers, Return-Path and Delivered-To."""
        mta = MTAProcess(make_tempdir(self, "mta"))
        self.addCleanup(mta.cleanup)
        mta.start()
        _, postfix, found = self._relay(mta)
        path = found["alice"]
        msg = parse_message(path)

        self.assertEqual(msg["Return-Path"], f"<{SENDER}>")
        self.assertEqual(msg["Delivered-To"], ALICE)
        received = msg.get_all("Received") or []
        self.assertEqual(len(received), 2, received)
        ours, theirs = received
        self.assertIn(f"by {MTA_HOSTNAME} (twisted-mta) with ESMTP id", ours)
        self.assertIn(f"from {postfix.hostname} ([{LOOPBACK}])", ours)
        self.assertIn(f"for <{ALICE}>", ours)
        self.assertNotIn("ESMTPS", ours)
        self.assertIn(f"by {postfix.hostname} (Postfix)", theirs)
        self.assertIn("from client.example.test", theirs)
        # The trace headers come first, in order: ours above Postfix's.
        with open(path, "rb") as f:
            head = f.read().split(b"\n\n", 1)[0].split(b"\n")
        self.assertTrue(head[0].startswith(b"Return-Path: "), head[:3])
        self.assertTrue(head[1].startswith(b"Delivered-To: "), head[:3])
        self.assertTrue(head[2].startswith(b"Received: from " + postfix.hostname.encode()),
                        head[:3])

    def test_postfix_relays_to_us_over_starttls(self) -> None:
        """Postfix's smtp client (TLS level encrypt) negotiates STARTTLS with us and the delivered copy says ESMTPS."""
        tmp = make_tempdir(self, "mta")
        ca = write_server_cert(tmp)
        ca_path = os.path.join(tmp, "ca.pem")
        ca.cert_pem.write_to_path(ca_path)
        os.chmod(tmp, 0o755)  # Postfix's smtp client (user postfix) reads ca.pem
        os.chmod(ca_path, 0o644)
        mta = MTAProcess(tmp, '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n')
        self.addCleanup(mta.cleanup)
        mta.start()
        _, postfix, found = self._relay(mta, {
            "smtp_tls_security_level": "encrypt",
            "smtp_tls_CAfile": ca_path,
            "smtp_tls_loglevel": "1",
        })
        ours = (parse_message(found["alice"]).get_all("Received") or [""])[0]
        self.assertIn(f"by {MTA_HOSTNAME} (twisted-mta) with ESMTPS id", ours)
        self.assertRegex(ours, r"\(using TLSv1\.[23] with cipher ")
        self.assertIn(f"TLS connection established to {LOOPBACK}", postfix.maillog())

    def test_postfix_multiple_recipients_and_transparency(self) -> None:
        """A Postfix-relayed message for two local users (pipelined RCPTs) reaches each Maildir once, with dot-leading lines and a ~200 KB body intact."""
        mta = MTAProcess(make_tempdir(self, "mta"))
        self.addCleanup(mta.cleanup)
        mta.start()
        body = (".", ".hidden", "..two dots", " . ", "") + tuple(
            f"{i:06d} " + "abcdefghij" * 7 for i in range(2600))
        token, postfix, found = self._relay(mta, users=("alice", "bob"), body_lines=body)
        for user, path in found.items():
            msg = parse_message(path)
            self.assertEqual(msg["Delivered-To"], f"{user}@{LOCAL_DOMAIN}")
            received = msg.get_all("Received") or []
            self.assertEqual(len(received), 2, received)
            self.assertNotIn("for <", received[0])  # two recipients: no "for" clause
            with open(path, "rb") as f:
                stored_body = f.read().split(b"\n\n", 1)[1]
            expected = ("\n".join((f"token: {token}",) + body) + "\n").encode()
            self.assertEqual(stored_body, expected)
