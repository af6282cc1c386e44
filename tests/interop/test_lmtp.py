"""
Interop: local delivery over LMTP to a real Dovecot (dovecot-core and
dovecot-lmtpd, started privately by L{tests.interop.dovecot}).

Our MTA runs under twistd with two local domains: C{example.test} goes to
Dovecot (C{[local.routes]}), C{sender.test} stays in our own Maildirs, so
the DSNs the senders get land where the test reads them.  Dovecot knows
alice and tiny (a quota of one kilobyte); ghost is a user of ours that
Dovecot does not know.
"""

from __future__ import annotations

import os
import re
import uuid

from twisted.trial.unittest import TestCase

from tests.interop.dovecot import dovecot_unavailable, start_dovecot, DovecotInstance
from tests.interop.support import (
    EVENTS_FILE, RawSMTP, files_containing, json_lines, make_message, make_tempdir,
    start_mta, wait_for,
)

SENDER = "bob@sender.test"
USERS = ("alice", "tiny", "ghost", "bob", "postmaster")
DOVECOT_USERS = {"alice": None, "tiny": "1K"}


def mta_config(address: str, recipient: str = "{user}@{domain}", lifetime: str = "1h") -> str:
    return (
        '[local.lmtp]\n'
        f'address = "{address}"\n'
        f'recipient = "{recipient}"\n'
        'command_timeout = "10s"\n'
        'data_timeout = "10s"\n'
        '\n[local.routes."example.test"]\n'
        'delivery = "lmtp"\n'
        '\n[queue]\n'
        'retry_schedule = ["1s"]\n'
        'jitter = 0\n'
        f'lifetime = "{lifetime}"\n'
        'delay_warning = false\n'
        '\n[logging]\n'
        'format = "json"\n'
        f'file = "{EVENTS_FILE}"\n'
        '\n[dns]\n'
        'nameservers = ["127.0.0.1:9"]\n'
        'timeout = "1s"\n')


def send(mta, recipients, token: str, body_lines=()) -> None:
    client = RawSMTP(mta.port)
    try:
        client.start_transaction(SENDER, recipients)
        client.send(make_message(token, sender=SENDER, recipient=recipients[0],
                                 body_lines=body_lines) + b".\r\n")
        client.expect(250)
        client.command("QUIT", 221)
    finally:
        client.close()


class LMTPDovecotTests(TestCase):
    timeout = 120

    def setUp(self):
        why = dovecot_unavailable()
        if why:
            self.skipTest(why)
        self.tmp = make_tempdir(self, "lmtp-mta")

    def start(self, dovecot: DovecotInstance | None, address: str | None = None, **kw):
        address = address or f"unix:{dovecot.lmtp_socket}"
        self.mta = start_mta(self, self.tmp, mta_config(address, **kw), users=USERS,
                             domains=("example.test", "sender.test"), workers=0)
        return self.mta

    def events(self, name: str, rcpt: str | None = None) -> list[dict]:
        return [e for e in json_lines(os.path.join(self.tmp, EVENTS_FILE))
                if e.get("event") == name and (rcpt is None or e.get("rcpt") == rcpt)]

    def dsns(self, token: str) -> list[str]:
        return files_containing(self.mta.maildir("bob"), token.encode())

    def test_delivered_into_the_dovecot_mailbox(self):
        """Over the Unix socket, with RCPT naming the bare user: the message is in alice's INBOX as Dovecot wrote it (Return-Path and Delivered-To from our envelope, a dot-first line intact), exactly once, and the spool is empty."""
        dovecot = start_dovecot(self, DOVECOT_USERS)
        mta = self.start(dovecot, recipient="{user}")
        token = uuid.uuid4().hex
        # "..dot first" is ".dot first" stuffed for our SMTP listener; we stuff it again.
        send(mta, ["Alice@example.test"], token, body_lines=["..dot first", "end"])
        wait_for(lambda: dovecot.messages("alice"), 20,
                 lambda: f"nothing in alice's INBOX; {dovecot.describe()}\n{mta.describe()}")
        [stored] = dovecot.messages("alice")
        self.assertIn(token.encode(), stored)
        self.assertIn(b"Return-Path: <bob@sender.test>", stored)
        self.assertIn(b"Delivered-To: alice", stored)
        self.assertIn(b"\n.dot first\n", stored.replace(b"\r\n", b"\n"))
        self.assertNotIn(b"X-Twisted-MTA-Envelope", stored)
        [event] = wait_for(lambda: self.events("delivery.delivered", "alice@example.test"), 10,
                           mta.describe)
        self.assertIn("Saved", event["reply"])
        wait_for(lambda: not mta.spool_contents(("new", "cur")), 10, mta.describe)
        self.assertEqual(len(dovecot.messages("alice")), 1)
        self.assertFalse(os.path.exists(mta.maildir("alice")), "stored in our Maildir too")

    def test_unknown_user_bounces(self):
        """Over TCP with full addresses: ghost (ours, unknown to Dovecot) gets 550 5.1.1 and the sender a DSN quoting it; alice in the same message is delivered."""
        dovecot = start_dovecot(self, DOVECOT_USERS)
        mta = self.start(dovecot, address=f"tcp:127.0.0.1:{dovecot.lmtp_port}")
        token = uuid.uuid4().hex
        send(mta, ["alice@example.test", "ghost@example.test"], token)
        [dsn] = wait_for(lambda: self.dsns(token), 20,
                         lambda: f"no DSN; {mta.describe()}\n{dovecot.describe()}")
        with open(dsn, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        self.assertIn("ghost@example.test", text)
        self.assertIn("5.1.1", text)
        self.assertIn("Remote-MTA: dns; 127.0.0.1", text)
        self.assertEqual(len(dovecot.messages("alice")), 1)
        [failed] = self.events("delivery.failed", "ghost@example.test")
        self.assertIn("550 5.1.1", failed["reply"])
        self.assertEqual(dovecot.messages("ghost"), [])

    def test_over_quota_retries_then_bounces(self):
        """tiny over quota: 452 4.2.2 (quota_full_tempfail), retried on the schedule, and once the queue lifetime is over a DSN quoting Dovecot's last words."""
        dovecot = start_dovecot(self, DOVECOT_USERS)
        mta = self.start(dovecot, lifetime="6s")
        token = uuid.uuid4().hex
        send(mta, ["tiny@example.test"], token, body_lines=["x" * 70] * 40)  # > 1K
        [dsn] = wait_for(lambda: self.dsns(token), 30,
                         lambda: f"no DSN; {mta.describe()}\n{dovecot.describe()}")
        deferred = self.events("delivery.deferred", "tiny@example.test")
        self.assertGreaterEqual(len(deferred), 2, "no retry before the DSN")
        self.assertTrue(all("452 4.2.2" in e["reply"] for e in deferred), deferred)
        with open(dsn, "rb") as f:
            text = f.read().decode("utf-8", "replace")
        self.assertIn("tiny@example.test", text)
        self.assertIn("Quota exceeded", text)
        self.assertEqual(dovecot.messages("tiny"), [])
        wait_for(lambda: not mta.spool_contents(("new", "cur")), 10, mta.describe)

    def test_dovecot_down_then_back(self):
        """Dovecot not running: the message waits (4.4.1, logged once per attempt as lmtp.failed); once Dovecot starts it is delivered, exactly once."""
        dovecot = DovecotInstance(make_tempdir(self, "dovecot", 0o755), DOVECOT_USERS)
        self.addCleanup(dovecot.cleanup)
        mta = self.start(dovecot)
        token = uuid.uuid4().hex
        send(mta, ["alice@example.test"], token)
        wait_for(lambda: len(self.events("lmtp.failed")) >= 2, 20, mta.describe)
        deferred = self.events("delivery.deferred", "alice@example.test")
        self.assertIn("4.4.1", deferred[0]["reply"])
        self.assertIn("No such file or directory", deferred[0]["reply"])
        dovecot.start()
        wait_for(lambda: self.events("delivery.delivered", "alice@example.test"), 20,
                 lambda: f"{mta.describe()}\n{dovecot.describe()}")
        wait_for(lambda: not mta.spool_contents(("new", "cur")), 10, mta.describe)
        self.assertEqual([token.encode() in m for m in dovecot.messages("alice")], [True])
        self.assertEqual(self.dsns(token), [])

    def test_dovecot_killed_during_a_burst(self):
        """Dovecot killed (SIGKILL to all its processes) while 30 messages are being delivered, then started again: every message is in the mailbox, each delivered (250) once; a second copy only of a message whose session was cut after its final dot, before Dovecot answered."""
        dovecot = start_dovecot(self, DOVECOT_USERS)
        mta = self.start(dovecot)
        tokens = [uuid.uuid4().hex for _ in range(30)]
        for i, token in enumerate(tokens):
            send(mta, ["alice@example.test"], token)
            if i == 10:
                wait_for(lambda: self.events("delivery.delivered"), 20, mta.describe)
                dovecot.kill()
        wait_for(lambda: self.events("lmtp.failed"), 20, mta.describe)
        dovecot.start()
        wait_for(lambda: len(self.events("delivery.delivered")) >= len(tokens), 60,
                 lambda: f"{mta.describe()}\n{dovecot.describe()}")
        wait_for(lambda: not mta.spool_contents(("new", "cur")), 10, mta.describe)
        stored = dovecot.messages("alice")
        counts = {t: sum(t.encode() in m for m in stored) for t in tokens}
        self.assertEqual([t for t, n in counts.items() if n == 0], [], f"lost: {counts}")
        # A second copy is allowed only where Dovecot had the whole message
        # and was killed before it answered (it may have stored it first):
        # LMTP has no idempotency key, that copy is at-least-once.  Never
        # for a recipient it answered 250.
        unanswered = {e["queue_id"] for e in self.events("delivery.deferred")
                      if "during the end of data" in e["reply"]}
        for token, n in counts.items():
            if n > 1:
                [copy, *_] = [m for m in stored if token.encode() in m]
                queue_id = re.search(rb"with ESMTP id (\w+)", copy).group(1).decode()
                self.assertEqual(n, 2, counts)
                self.assertIn(queue_id, unanswered,
                              f"{token} ({queue_id}) stored {n} times although Dovecot "
                              f"answered it; {mta.describe()}")
        self.assertEqual(len(self.events("delivery.delivered")), len(tokens))
