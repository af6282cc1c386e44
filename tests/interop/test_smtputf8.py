"""
Interop for international mail and 8-bit (issue 15): SMTPUTF8 (RFC 6531)
with a real Postfix (smtputf8_enable = yes) as sender and as receiver; a
peer without SMTPUTF8 (Postfix's smtp-sink, which never announces it)
makes a UTF-8-addressed message bounce with 5.6.7; a peer without 8BITMIME
(smtp-sink -8) receives 8-bit mail converted to 7 bits, and a DKIM-signed
8-bit message bounces with the reason instead.
"""

from __future__ import annotations

import email
import email.policy
import os
import pwd
import grp
import shutil
import smtplib
import subprocess
import uuid

from twisted.trial import unittest

from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, MTAProcess, files_containing, free_port, make_tempdir,
    postfix_unavailable, read_banner, start_postfix, wait_for,
)

TIMEOUT = 20
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
USERS = ("alice", "postmaster", "jörg", "jösé")
JORG = f"jörg@{LOCAL_DOMAIN}"
JOSE = f"jösé@{LOCAL_DOMAIN}"
ALICE = f"alice@{LOCAL_DOMAIN}"


def utf8_message(token: str, sender: str, recipient: str, subject: str = "Grüße") -> bytes:
    return (f"From: {sender}\r\nTo: {recipient}\r\nSubject: {subject} {token}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n"
            f"token: {token}\r\nDas Öl läuft über die Straße.\r\n").encode("utf-8")


class SMTPSink:
    """
    Postfix's smtp-sink on a loopback port, dumping each transaction to a
    file of its own in C{directory} (LF line ends, the envelope as X-
    fields, then our message unstuffed).  It never announces SMTPUTF8;
    C{no_8bitmime} (-8) drops 8BITMIME too.
    """

    def __init__(self, testcase, no_8bitmime: bool = False) -> None:
        self.port = free_port()
        self.directory = make_tempdir(testcase, "sink")
        os.chmod(self.directory, 0o777)  # smtp-sink writes as nobody
        args = [SMTP_SINK, "-u", "nobody", "-d", os.path.join(self.directory, "%M.")]
        if no_8bitmime:
            args.append("-8")
        args += [f"{LOOPBACK}:{self.port}", "20"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        testcase.addCleanup(self.stop)
        wait_for(lambda: read_banner(self.port, timeout=1.0), 10,
                 f"smtp-sink not answering on {self.port}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def dumps(self) -> list[bytes]:
        out = []
        for name in sorted(os.listdir(self.directory)):
            with open(os.path.join(self.directory, name), "rb") as f:
                out.append(f.read())
        return out


class InternationalMailTests(unittest.TestCase):
    def setUp(self) -> None:
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        if not os.path.exists(SMTP_SINK):
            raise unittest.SkipTest("smtp-sink is not installed (package postfix)")

    def start_mta(self, routes: dict[str, int]) -> MTAProcess:
        """Our MTA with UTF-8 local users; each domain of C{routes} goes to a loopback port."""
        extra = "".join(f'[outbound.routes."{domain}"]\nhost = "[{LOOPBACK}]:{port}"\n\n'
                        for domain, port in routes.items())
        extra += ('[queue]\nretry_schedule = ["2s"]\njitter = 0\ndelay_warning = false\n'
                  '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n')
        mta = MTAProcess(make_tempdir(self, "mta"), extra, users=USERS)
        self.addCleanup(mta.cleanup)
        return mta.start()

    def submit(self, mta: MTAProcess, sender: str, rcpts: list[str], data: bytes,
               utf8: bool = True) -> None:
        with smtplib.SMTP(LOOPBACK, mta.port, local_hostname="client.example.test",
                          timeout=10) as client:
            refused = client.sendmail(sender, rcpts, data,
                                      mail_options=["SMTPUTF8"] if utf8 else [])
        self.assertEqual(refused, {})

    def wait_local(self, mta: MTAProcess, user: str, token: str) -> list[str]:
        maildir = mta.maildir(user)
        found = wait_for(lambda: files_containing(maildir, token.encode()), TIMEOUT,
                         lambda: f"{token} not in {maildir}\n{mta.describe()}")
        wait_for(lambda: not mta.spool_contents(), TIMEOUT,
                 lambda: f"spool not empty: {mta.spool_contents()}\n{mta.describe()}")
        return files_containing(maildir, token.encode())

    # -- Postfix as sender ----------------------------------------------------------

    def test_postfix_relays_utf8_to_local_user(self) -> None:
        """
        Postfix (smtputf8_enable = yes) relays a message from a UTF-8
        sender to jörg@ with SMTPUTF8; it lands once in jörg's Maildir
        (a UTF-8 directory name), header octets intact, with our Received
        saying UTF8SMTP.
        """
        mta = self.start_mta({})
        postfix = start_postfix(self, mta.port, {"smtputf8_enable": "yes"})
        token = uuid.uuid4().hex
        with smtplib.SMTP(LOOPBACK, postfix.smtpd_port, local_hostname="client.example.test",
                          timeout=10) as client:
            refused = client.sendmail("jösé@client.example.test", [JORG],
                                      utf8_message(token, "jösé@client.example.test", JORG),
                                      mail_options=["SMTPUTF8"])
        self.assertEqual(refused, {})
        try:
            [path] = self.wait_local(mta, "jörg", token)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{postfix.describe()}")
        self.assertIn(os.sep + "jörg" + os.sep + "Maildir" + os.sep + "new" + os.sep, path)
        with open(path, "rb") as f:
            data = f.read()
        msg = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(msg["Return-Path"], "<jösé@client.example.test>")
        self.assertEqual(msg["Delivered-To"], JORG)
        self.assertIn(f"Subject: Grüße {token}".encode(), data)
        ours = (msg.get_all("Received") or [""])[0]
        self.assertIn("(twisted-mta) with UTF8SMTP id", ours)
        self.assertIn(f"for <{JORG}>", ours)
        self.assertIn("Das Öl läuft über die Straße.", msg.get_content())
        wait_for(lambda: "status=sent" in postfix.maillog(), 10, postfix.describe)

    # -- Postfix as receiver ------------------------------------------------------------

    def test_we_deliver_utf8_to_postfix(self) -> None:
        """
        We deliver a message from jösé@ to a UTF-8 address at Postfix
        (smtputf8_enable = yes), which accepts it with SMTPUTF8 and stores
        it in the virtual mailbox of that address.
        """
        base = make_tempdir(self, "postfix", 0o755)
        vmail = os.path.join(base, "vmail")
        os.makedirs(vmail)
        shutil.chown(vmail, "postfix", "postfix")
        uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
        port = free_port()
        mta = self.start_mta({"good.test": port})
        start_postfix(self, None, {
            "smtputf8_enable": "yes",
            "myhostname": "mx.good.test",
            "virtual_mailbox_domains": "good.test",
            "virtual_mailbox_base": vmail,
            "virtual_mailbox_maps": "inline:{ 用户@good.test=good/yonghu/ }",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_transport": "virtual",
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
        }, base=base, smtpd_port=port)
        token = uuid.uuid4().hex
        rcpt = "用户@good.test"
        self.submit(mta, JOSE, [rcpt], utf8_message(token, JOSE, rcpt))
        maildir = os.path.join(vmail, "good", "yonghu")
        [path] = wait_for(lambda: files_containing(maildir, token.encode()), TIMEOUT,
                          lambda: f"not delivered at Postfix\n{mta.describe()}\n"
                                  f"{open(os.path.join(base, 'maillog')).read()[-4000:]}")
        with open(path, "rb") as f:
            data = f.read()
        self.assertIn(f"Subject: Grüße {token}".encode(), data)
        self.assertIn(f"Return-Path: <{JOSE}>".encode(), data)
        self.assertIn(b"(twisted-mta) with UTF8SMTP id", data)
        self.assertIn(b"by mx.good.test (Postfix) with UTF8SMTP id", data)  # we used SMTPUTF8
        self.assertIn("Das Öl läuft über die Straße.".encode(), data)
        wait_for(lambda: not mta.spool_contents(), TIMEOUT, mta.describe)

    # -- a peer without SMTPUTF8 -------------------------------------------------------

    def test_peer_without_smtputf8_bounces_5_6_7(self) -> None:
        """
        To smtp-sink (8BITMIME, no SMTPUTF8): of a message sent with
        SMTPUTF8 by alice@, the UTF-8 recipient bounces with 5.6.7 in a
        global DSN (RFC 6533) while the ASCII one is delivered, without
        SMTPUTF8; a message from jösé@ bounces whole (its sender cannot be
        written without SMTPUTF8), back in jösé's Maildir.
        """
        sink = SMTPSink(self)
        mta = self.start_mta({"sink.test": sink.port})
        token = uuid.uuid4().hex
        self.submit(mta, ALICE, ["用户@sink.test", "plain@sink.test"],
                    utf8_message(token, ALICE, "plain@sink.test", subject="Hello"))
        [path] = self.wait_local(mta, "alice", token)
        with open(path, "rb") as f:
            raw = f.read()
        dsn = email.message_from_bytes(raw, policy=email.policy.compat32)
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        parts = [p.get_content_type() for p in dsn.get_payload()]
        self.assertEqual(parts, ["text/plain", "message/global-delivery-status",
                                 "message/global-headers"])
        # The status part's fields, as written (UTF-8, RFC 6533).
        status = raw.split(b"Content-Type: message/global-delivery-status")[1] \
            .split(b"Content-Type: message/global-headers")[0].decode("utf-8")
        self.assertIn("Final-Recipient: utf-8; 用户@sink.test", status)
        self.assertIn("Status: 5.6.7", status)
        self.assertNotIn("plain@sink.test", status)
        text = dsn.get_payload()[0].get_payload(decode=True).decode("utf-8")
        self.assertIn("does not accept international (UTF-8) email addresses", text)
        dumps = sink.dumps()
        self.assertEqual(len(dumps), 1, dumps)
        envelope = dumps[0].split(b"Received:")[0]
        self.assertIn(b"X-Mail-Args: <alice@example.test> BODY=8BITMIME\n", envelope)
        self.assertIn(b"X-Rcpt-Args: <plain@sink.test>\n", envelope)
        self.assertTrue(envelope.isascii(), envelope)

        token = uuid.uuid4().hex
        self.submit(mta, JOSE, ["plain@sink.test"],
                    utf8_message(token, JOSE, "plain@sink.test", subject="Hello"))
        [path] = self.wait_local(mta, "jösé", token)
        with open(path, "rb") as f:
            raw = f.read()
        self.assertIn(b"Status: 5.6.7", raw)
        self.assertIn("To: <jösé@example.test>".encode(), raw)
        self.assertEqual(len(sink.dumps()), 1)

    # -- a peer without 8BITMIME -------------------------------------------------------

    def test_peer_without_8bitmime_gets_7bit(self) -> None:
        """
        smtp-sink -8 (no 8BITMIME) receives the 8-bit message as 7-bit
        MIME (quoted-printable), which decodes back to the original text.
        """
        sink = SMTPSink(self, no_8bitmime=True)
        mta = self.start_mta({"sink7.test": sink.port})
        token = uuid.uuid4().hex
        self.submit(mta, ALICE, ["bob@sink7.test"],
                    utf8_message(token, ALICE, "bob@sink7.test", subject="Plain"), utf8=False)
        dumps = wait_for(sink.dumps, TIMEOUT, lambda: f"nothing at smtp-sink\n{mta.describe()}")
        wait_for(lambda: not mta.spool_contents(), TIMEOUT, mta.describe)
        [dump] = dumps
        self.assertTrue(dump.isascii(), dump)
        self.assertNotIn(b"BODY=8BITMIME", dump)
        # (smtp-sink ends its dump with one more newline than it was sent)
        message = dump.split(b"X-Rcpt-Args: <bob@sink7.test>\n", 1)[1][:-1]
        msg = email.message_from_bytes(message, policy=email.policy.default)
        self.assertEqual(msg["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(msg.get_content(), f"token: {token}\nDas Öl läuft über die Straße.\n")
        self.assertEqual(msg["Subject"], f"Plain {token}")
        self.assertIn("converted to 7 bits for", mta.output())

    def test_dkim_signed_8bit_bounced_with_reason(self) -> None:
        """
        A DKIM-signed 8-bit message for smtp-sink -8 is not converted: the
        sender gets a bounce (5.6.2) that says it is DKIM-signed, and
        smtp-sink receives nothing.
        """
        import dkim
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        sink = SMTPSink(self, no_8bitmime=True)
        mta = self.start_mta({"sink7.test": sink.port})
        token = uuid.uuid4().hex
        unsigned = utf8_message(token, ALICE, "bob@sink7.test", subject="Signed")
        signature = dkim.sign(unsigned, b"sel", LOCAL_DOMAIN.encode(), pem,
                              include_headers=[b"From", b"To", b"Subject"])
        self.submit(mta, ALICE, ["bob@sink7.test"], signature + unsigned, utf8=False)
        [path] = self.wait_local(mta, "alice", token)
        with open(path, "rb") as f:
            dsn = email.message_from_bytes(f.read(), policy=email.policy.compat32)
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        blocks = dsn.get_payload()[1].get_payload()
        self.assertEqual(blocks[1]["Status"], "5.6.2")
        self.assertEqual(blocks[1]["Final-Recipient"], "rfc822; bob@sink7.test")
        text = dsn.get_payload()[0].get_payload(decode=True).decode("utf-8")
        self.assertIn("DKIM-signed", text)
        self.assertIn("no 8BITMIME", text)
        self.assertEqual(sink.dumps(), [])
