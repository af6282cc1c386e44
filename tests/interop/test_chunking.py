"""
CHUNKING / BDAT (RFC 3030) against real programs, both ways:

  - inbound: Dovecot's submission server relays to our mx listener with
    BDAT when we offer CHUNKING (its lib-smtp client does; Postfix's smtp
    client never sends BDAT, CHUNKING is a server-side feature of Postfix:
    its changelog, 20180805-20180825, and no BDAT in its smtp(8)), and with
    DATA when we do not; our inbound.queued event says which command
    brought the message.  Postfix still relays to us with DATA while we
    offer CHUNKING;
  - outbound: our MTA relays to Postfix's smtpd through a smarthost: BDAT
    in chunks of [outbound] chunk_size (Postfix counts the BDAT commands
    in its disconnect line), DATA when [outbound] chunking is off; Postfix
    stores the mail with virtual(8), so the test reads what arrived;
  - smuggling: a BDAT chunk holding CRLF.CRLF and a second transaction
    (and the LF.LF form) is one message, which goes onward to Postfix with
    DATA as one message with that text inside, and no second one.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import subprocess
import uuid

from twisted.trial import unittest

from tests.interop.requires import missing
from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, MTAProcess, PostfixInstance, RawSMTP, files_containing,
    free_port, json_lines, make_message, make_tempdir, postfix_unavailable, read_banner,
    start_postfix, wait_for,
)

DOVECOT = "/usr/sbin/dovecot"
DOVECOT_SUBMISSION = "/usr/lib/dovecot/submission"
SENDER = "sender@client.example.test"
JSON_LOG = '[logging]\nformat = "json"\nfile = "events.jsonl"\n'
# Lines a DATA transfer must stuff, and a body long enough for several chunks.
BODY = (".", ".hidden", "..two dots", " . ", "") + tuple(
    f"{i:05d} " + "abcdefghij" * 7 for i in range(700))


def events(mta: MTAProcess, name: str) -> list[dict]:
    return [e for e in json_lines(os.path.join(mta.tmpdir, "events.jsonl"))
            if e.get("event") == name]


class DovecotSubmission:
    """
    A private Dovecot running only its submission service on loopback,
    relaying what it is given to C{relay_port} (our MTA); any user logs in
    with the password "secret".  Config, state, log and home under C{base}.
    """

    def __init__(self, base: str, relay_port: int) -> None:
        self.base = base
        self.port = free_port()
        self.log_path = os.path.join(base, "dovecot.log")
        home = os.path.join(base, "home")
        os.makedirs(home)
        shutil.chown(home, "dovecot", "dovecot")
        self.conf = os.path.join(base, "dovecot.conf")
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(f"""\
base_dir = {base}/run
state_dir = {base}/state
log_path = {self.log_path}
instance_name = twisted-mta-chunking-{self.port}
listen = {LOOPBACK}
protocols = submission
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = 1
mail_location = maildir:{home}/%n/Maildir
hostname = submit.example.test
submission_relay_host = {LOOPBACK}
submission_relay_port = {relay_port}
submission_relay_ssl = no
service submission-login {{
  inet_listener submission {{
    address = {LOOPBACK}
    port = {self.port}
  }}
}}
service anvil {{
  chroot =
}}
passdb {{
  driver = static
  args = password=secret
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={home}/%n
}}
""")
        self.process: subprocess.Popen | None = None

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return "(no log)"

    def start(self) -> "DovecotSubmission":
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", self.conf],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT)
        wait_for(lambda: self.process.poll() is None and read_banner(self.port, 1.0), 15,
                 lambda: f"Dovecot did not start: {self.log()}")
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


class InboundTests(unittest.TestCase):
    """
    A real sender of BDAT (Dovecot's submission relay) to our mx listener,
    and Postfix, which only sends DATA.
    """

    def setUp(self) -> None:
        self.mta = None

    def start_mta(self, extra: str = "") -> MTAProcess:
        mta = MTAProcess(make_tempdir(self, "mta"), JSON_LOG + extra)
        self.addCleanup(mta.cleanup)
        self.mta = mta.start()
        return mta

    def check_delivered(self, mta: MTAProcess, token: str, describe) -> dict:
        maildir = mta.maildir("alice")
        wait_for(lambda: files_containing(maildir, token.encode()), 20, describe)
        # alice is ours: delivered on receipt ([local] deliver_on_receipt)
        wait_for(lambda: events(mta, "inbound.delivered"), 10, describe)
        [path] = files_containing(maildir, token.encode())
        with open(path, "rb") as f:
            stored = f.read()
        expected = ("\n".join((f"token: {token}",) + BODY) + "\n").encode()
        self.assertEqual(stored.split(b"\n\n", 1)[1], expected)
        [queued] = events(mta, "inbound.delivered")
        return queued

    def via_dovecot(self, extra: str = "") -> dict:
        if not (os.path.exists(DOVECOT) and os.path.exists(DOVECOT_SUBMISSION)):
            missing("Dovecot's submission server is not installed (dovecot-core, "
                    "dovecot-submissiond; scripts/install-test-deps)")
        mta = self.start_mta(extra)
        dovecot = DovecotSubmission(make_tempdir(self, "dovecot", 0o755), mta.port)
        self.addCleanup(dovecot.stop)
        dovecot.start()
        token = uuid.uuid4().hex
        rcpt = f"alice@{LOCAL_DOMAIN}"
        with smtplib.SMTP(LOOPBACK, dovecot.port, local_hostname="client.example.test",
                          timeout=10) as client:
            client.login("user@client.example.test", "secret")
            self.assertEqual(client.sendmail(SENDER, [rcpt], make_message(
                token, recipient=rcpt, body_lines=BODY)), {})
        return self.check_delivered(mta, token, lambda: f"not delivered\n{dovecot.log()}\n"
                                                        f"{mta.describe()}")

    def test_dovecot_sends_bdat_to_us(self) -> None:
        """We offer CHUNKING; Dovecot's submission relay sends a 55 KB message with dot-leading lines to us with BDAT (our inbound.queued event says so) and it arrives octet for octet."""
        queued = self.via_dovecot()
        self.assertEqual(queued["command"], "BDAT", queued)
        self.assertGreaterEqual(queued["chunks"], 1)

    def test_dovecot_sends_data_when_not_offered(self) -> None:
        """With [inbound] chunking = false the same relay uses DATA (the same check sees DATA)."""
        queued = self.via_dovecot("[inbound]\nchunking = false\n")
        self.assertEqual((queued["command"], queued["chunks"]), ("DATA", 0))

    def test_postfix_relays_with_data_while_we_offer_chunking(self) -> None:
        """Postfix's smtp client has no BDAT: it relays to us with DATA although we offer CHUNKING, and the message arrives intact."""
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        mta = self.start_mta()
        postfix = start_postfix(self, mta.port)
        token = uuid.uuid4().hex
        rcpt = f"alice@{LOCAL_DOMAIN}"
        with smtplib.SMTP(LOOPBACK, postfix.smtpd_port, local_hostname="client.example.test",
                          timeout=10) as client:
            self.assertEqual(client.sendmail(SENDER, [rcpt], make_message(
                token, recipient=rcpt, body_lines=BODY)), {})
        queued = self.check_delivered(mta, token, lambda: f"not delivered\n"
                                                          f"{postfix.describe()}\n{mta.describe()}")
        self.assertEqual(queued["command"], "DATA", queued)


class UsToPostfixTests(unittest.TestCase):
    """
    Our MTA relays to a private Postfix (smarthost) that stores the mail
    for bob@good.test and carol@good.test in Maildirs.
    """

    MAILBOXES = {"bob@good.test": "bob/", "carol@good.test": "carol/"}

    def setUp(self) -> None:
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        base = make_tempdir(self, "postfix", 0o755)
        self.vmail = os.path.join(base, "vmail")
        os.makedirs(self.vmail)
        shutil.chown(self.vmail, "postfix", "postfix")
        uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
        maps = ", ".join(f"{a}={p}" for a, p in self.MAILBOXES.items())
        self.postfix: PostfixInstance = start_postfix(self, None, {
            "virtual_mailbox_domains": "good.test",
            "virtual_mailbox_base": self.vmail,
            "virtual_mailbox_maps": f"inline:{{ {maps} }}",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_transport": "virtual",
        }, base=base, smtpd_port=free_port())

    def start_mta(self, outbound: str) -> MTAProcess:
        mta = MTAProcess(make_tempdir(self, "mta"), JSON_LOG + (
            "[outbound]\n" + outbound +
            "\n[outbound.smarthost]\n"
            f'host = "{LOOPBACK}"\nport = {self.postfix.smtpd_port}\n'
            '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'))
        self.addCleanup(mta.cleanup)
        return mta.start()

    def arrived(self, user: str, token: bytes) -> list[str]:
        return files_containing(os.path.join(self.vmail, user), token)

    def describe(self, mta: MTAProcess) -> str:
        return f"{self.postfix.describe()}\n{mta.describe()}"

    def deliver(self, mta: MTAProcess) -> tuple[bytes, str]:
        token = uuid.uuid4().hex
        with smtplib.SMTP(LOOPBACK, mta.port, local_hostname="client.example.test",
                          timeout=10) as client:
            self.assertEqual(client.sendmail(SENDER, ["bob@good.test"], make_message(
                token, recipient="bob@good.test", body_lines=BODY)), {})
        wait_for(lambda: self.arrived("bob", token.encode()), 20, lambda: self.describe(mta))
        wait_for(lambda: self.session_line(), 10, lambda: self.describe(mta))
        [path] = self.arrived("bob", token.encode())
        with open(path, "rb") as f:
            stored = f.read()
        expected = ("\n".join((f"token: {token}",) + BODY) + "\n").encode()
        self.assertEqual(stored.split(b"\n\n", 1)[1], expected)
        return stored, self.session_line()

    def session_line(self) -> str | None:
        """Postfix's disconnect line for our session (the start-up probe sent no MAIL)."""
        lines = [l for l in self.postfix.maillog().splitlines()
                 if " disconnect from " in l and " mail=" in l]
        assert len(lines) <= 1, lines
        return lines[0] if lines else None

    def test_we_send_bdat_to_postfix(self) -> None:
        """Postfix offers CHUNKING: we send the 55 KB message in BDAT chunks of chunk_size (Postfix's disconnect line counts 14 BDAT commands and no DATA), and it arrives octet for octet, dot lines unstuffed."""
        mta = self.start_mta("chunk_size = 4096\n")
        stored, line = self.deliver(mta)
        size = int(events(mta, "inbound.queued")[0]["size"])
        chunks = -(-(size + 0) // 4096)
        self.assertIn(" bdat=", line, line)
        self.assertNotIn(" data=", line, line)
        count = int(line.split(" bdat=", 1)[1].split()[0].split("/")[0])
        self.assertGreaterEqual(count, chunks, (line, size))
        self.assertLessEqual(count, chunks + 1, (line, size))  # our trace line may add one
        [connected] = events(mta, "outbound.connected")
        self.assertIs(connected["chunking"], True)

    def test_we_send_data_when_off(self) -> None:
        """[outbound] chunking = false: DATA to the same Postfix, the same message arrives."""
        mta = self.start_mta("chunking = false\n")
        _, line = self.deliver(mta)
        self.assertIn(" data=1", line, line)
        self.assertNotIn(" bdat=", line, line)
        [connected] = events(mta, "outbound.connected")
        self.assertIs(connected["chunking"], False)

    def test_smuggling_inside_a_bdat_chunk(self) -> None:
        """A BDAT chunk holding CRLF.CRLF then MAIL/RCPT/DATA of a second message (and LF.LF) is one message in our queue and, sent onward with DATA, one message at Postfix with that text inside; carol gets nothing."""
        mta = self.start_mta("chunking = false\n")
        token = uuid.uuid4().hex
        payload = (f"Subject: one {token}\r\n\r\nfirst\r\n.\r\n"
                   "MAIL FROM:<evil@remote.test>\r\nRCPT TO:<carol@good.test>\r\nDATA\r\n"
                   f"Subject: smuggled {token}\r\n\r\nsecond\n.\nMAIL FROM:<evil2@remote.test>\n"
                   "RCPT TO:<carol@good.test>\nDATA\nthird\r\n.\r\n").encode()
        smtp = RawSMTP(mta.port)
        try:
            smtp.expect(220)
            lines = smtp.command("EHLO client.example.test", 250)
            self.assertIn(b"250 CHUNKING", lines[-1:] + [l.replace(b"-", b" ", 1) for l in lines])
            smtp.command(f"MAIL FROM:<{SENDER}>", 250)
            smtp.command("RCPT TO:<bob@good.test>", 250)
            smtp.send(b"BDAT %d LAST\r\n" % len(payload) + payload)
            smtp.expect(250)
            smtp.command("QUIT", 221)
        finally:
            smtp.close()
        wait_for(lambda: self.arrived("bob", token.encode()), 20, lambda: self.describe(mta))
        wait_for(lambda: not mta.spool_contents(), 10, lambda: self.describe(mta))
        [path] = self.arrived("bob", token.encode())
        with open(path, "rb") as f:
            stored = f.read()
        self.assertIn(b"\nfirst\n.\nMAIL FROM:<evil@remote.test>\nRCPT TO:<carol@good.test>\n"
                      b"DATA\nSubject: smuggled " + token.encode() + b"\n\nsecond\n.\n"
                      b"MAIL FROM:<evil2@remote.test>\nRCPT TO:<carol@good.test>\nDATA\n"
                      b"third\n.\n", stored)
        self.assertEqual(len(events(mta, "inbound.queued")), 1)
        self.assertEqual(self.arrived("carol", b""), [])
        log = self.postfix.maillog()
        self.assertNotIn("evil", log)
        self.assertEqual(log.count(" nrcpt=1 "), 1, log)
