"""
STARTTLS interop with Python's smtplib and ssl, certificates from trustme.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import uuid

from twisted.trial import unittest

from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, MTA_HOSTNAME, files_containing, make_message, make_tempdir,
    parse_message, start_mta, wait_for, write_server_cert,
)

SENDER = "sender@client.example.test"
ALICE = f"alice@{LOCAL_DOMAIN}"


TLS_CONFIG = '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'


class StartTLSTests(unittest.TestCase):

    def test_starttls_with_smtplib(self) -> None:
        """smtplib upgrades with STARTTLS (certificate verified against the trustme CA), STARTTLS is offered only before TLS, and the delivered Received header says ESMTPS and the negotiated TLS version."""
        tmp = make_tempdir(self, "mta")
        ca = write_server_cert(tmp)
        mta = start_mta(self, tmp, TLS_CONFIG)

        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        token = uuid.uuid4().hex
        with smtplib.SMTP(LOOPBACK, mta.port, local_hostname="client.example.test",
                          timeout=10) as client:
            code, _ = client.ehlo()
            self.assertEqual(code, 250)
            self.assertTrue(client.has_extn("starttls"), client.esmtp_features)
            code, _ = client.starttls(context=ctx)
            self.assertEqual(code, 220)
            version = client.sock.version()
            self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
            code, _ = client.ehlo()
            self.assertEqual(code, 250)
            self.assertFalse(client.has_extn("starttls"), client.esmtp_features)
            self.assertTrue(client.has_extn("pipelining"), client.esmtp_features)
            refused = client.sendmail(SENDER, [ALICE], make_message(token))
        self.assertEqual(refused, {})

        maildir = mta.maildir("alice")
        paths = wait_for(lambda: files_containing(maildir, token.encode()), 10,
                         lambda: f"message not delivered to {maildir}; {mta.describe()}")
        self.assertEqual(len(paths), 1, paths)
        received = parse_message(paths[0]).get_all("Received") or []
        self.assertEqual(len(received), 1, received)
        self.assertIn(f"by {MTA_HOSTNAME} (twisted-mta) with ESMTPS id", received[0])
        self.assertIn(f"(using {version} with cipher ", received[0])
        self.assertIn("from client.example.test ([127.0.0.1])", received[0])

    def test_starttls_refused_by_untrusting_client(self) -> None:
        """A client that does not trust our CA fails the handshake, and the MTA keeps serving a trusting client afterwards."""
        tmp = make_tempdir(self, "mta")
        ca = write_server_cert(tmp)
        mta = start_mta(self, tmp, TLS_CONFIG)

        client = smtplib.SMTP(LOOPBACK, mta.port, timeout=10)
        try:
            client.ehlo()
            with self.assertRaises(ssl.SSLCertVerificationError):
                client.starttls(context=ssl.create_default_context())
        finally:
            client.close()

        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with smtplib.SMTP(LOOPBACK, mta.port, timeout=10) as client:
            client.ehlo()
            code, _ = client.starttls(context=ctx)
            self.assertEqual(code, 220)
            code, _ = client.noop()
            self.assertEqual(code, 250)
        self.assertTrue(mta.running, mta.describe())


class StartTLSInjectionTests(unittest.TestCase):

    def test_starttls_command_injection_over_real_tls(self) -> None:
        """'STARTTLS\\r\\nMAIL FROM:...' in one write: after a real TLS handshake no reply to the injected command arrives, and MAIL still needs a new EHLO (CVE-2011-0411 class)."""
        import socket
        tmp = make_tempdir(self, "mta")
        ca = write_server_cert(tmp)
        mta = start_mta(self, tmp, TLS_CONFIG)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        raw = socket.create_connection((LOOPBACK, mta.port), timeout=10)
        self.addCleanup(raw.close)
        f = raw.makefile("rb")

        def reply(stream):
            lines = []
            while True:
                line = stream.readline()
                self.assertTrue(line, f"connection closed; {mta.describe()}")
                lines.append(line.decode().rstrip("\r\n"))
                if line[3:4] == b" ":
                    return lines

        self.assertTrue(reply(f)[0].startswith("220 "))
        raw.sendall(b"EHLO client.example.test\r\n")
        reply(f)
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        self.assertEqual(reply(f), ["220 2.0.0 Ready to start TLS"])
        tls = ctx.wrap_socket(raw, server_hostname=MTA_HOSTNAME)
        self.addCleanup(tls.close)
        tf = tls.makefile("rb")
        tls.sendall(b"NOOP\r\n")
        # The first reply inside TLS answers our NOOP, not the injected MAIL.
        self.assertEqual(reply(tf), ["250 2.0.0 Ok"])
        tls.sendall(b"MAIL FROM:<a@client.example.test>\r\n")
        self.assertEqual(reply(tf), ["503 5.5.1 Send EHLO or HELO first"])
        tls.sendall(b"QUIT\r\n")
        self.assertEqual(reply(tf), ["221 2.0.0 Bye"])


class SubmissionAuthTests(unittest.TestCase):

    def test_smtplib_login_over_starttls(self) -> None:
        """smtplib: STARTTLS, then AUTH (PLAIN/LOGIN) with a password from the users file, then a message: delivered, Received says ESMTPSA; a wrong password gets 535."""
        from twisted_mta.users import write_user
        tmp = make_tempdir(self, "mta")
        ca = write_server_cert(tmp)
        write_user(os.path.join(tmp, "users"), "alice", "s3cret")
        mta = start_mta(self, tmp, TLS_CONFIG + '[auth]\nusers_file = "users"\n')
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        token = uuid.uuid4().hex
        with smtplib.SMTP(LOOPBACK, mta.port, local_hostname="client.example.test",
                          timeout=10) as client:
            client.ehlo()
            self.assertFalse(client.has_extn("auth"))
            client.starttls(context=ctx)
            client.ehlo()
            self.assertEqual(client.esmtp_features["auth"].split(), ["PLAIN", "LOGIN"])
            with self.assertRaises(smtplib.SMTPAuthenticationError) as cm:
                client.login("alice", "wrong")
            self.assertEqual(cm.exception.smtp_code, 535)
            code, _ = client.login("alice", "s3cret")
            self.assertEqual(code, 235)
            client.sendmail(SENDER, [ALICE], make_message(token))
        maildir = mta.maildir("alice")
        [path] = wait_for(lambda: files_containing(maildir, token.encode()), 10, mta.describe)
        with open(path, "rb") as f:
            self.assertIn(b"with ESMTPSA id", f.read())
