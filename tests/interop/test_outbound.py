"""
The outbound leg against real peers on loopback: mail submitted to our MTA
(smtplib, STARTTLS, AUTH) for remote domains is routed by MX records served
by a private nsd, and delivered by SMTP to a private Postfix that stores
it in Maildirs itself (virtual(8)); refused recipients, temporary failures,
null MX, NXDOMAIN and an MX that loops back to us are checked end to end,
down to the DSN in the sender's Maildir.

Addresses: nsd on 127.0.0.1:<its port>; Postfix (mx.good.test) on
127.0.0.2:P; our MTA's mx listener on 127.0.0.1:P (the same P, because
C{[outbound] port} applies to every MX host, so an MX pointing at
127.0.0.1 reaches us) and its submission listener on another port.  The
system resolver is never used.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import uuid

import trustme
from twisted.trial import unittest

from tests.interop.dns import NSDServer, shared_nsd, zone
from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, MTA_HOSTNAME, MTAProcess, PostfixInstance, files_containing,
    free_port, make_message, make_tempdir, message_files, parse_message, postfix_unavailable,
    start_postfix, subprocess_env, wait_for, write_server_cert,
)

PEER = "127.0.0.2"  # where Postfix listens: mx.good.test
PEER_HOSTNAME = "mx.good.test"
ALICE = f"alice@{LOCAL_DOMAIN}"
PASSWORD = "s3cret"
TIMEOUT = 20

ZONES = {
    "good.test": zone("good.test", [
        ("@", "MX", f"10 {PEER_HOSTNAME}."),
        ("mx", "A", PEER),
    ]),
    "flaky.test": zone("flaky.test", [("@", "MX", f"10 {PEER_HOSTNAME}.")]),
    "nullmx.test": zone("nullmx.test", [("@", "MX", "0 .")]),
    "self.test": zone("self.test", [
        ("@", "MX", "10 mta.self.test."),
        ("mta", "A", LOOPBACK),  # our own mx listener
    ]),
}

# Postfix's mailboxes (relative to virtual_mailbox_base; trailing slash: Maildir).
MAILBOXES = {
    "bob@good.test": "good/bob/",
    "carol@good.test": "good/carol/",
    "dave@flaky.test": "flaky/dave/",
}
FLAKY_RESTRICTION = ("check_recipient_access inline:{ {flaky.test=451 4.3.0 try later} }, "
                     "permit_mynetworks, reject_unauth_destination")
ACCEPTING_RESTRICTION = "permit_mynetworks, reject_unauth_destination"


def free_port_on_both() -> int:
    """
    A TCP port free a moment ago on both 127.0.0.1 (our MTA) and
    127.0.0.2 (Postfix).
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as peer:
            peer.bind((PEER, 0))
            port = peer.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as ours:
                try:
                    ours.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise AssertionError(f"no port free on both {LOOPBACK} and {PEER}")


def dsn_blocks(msg) -> tuple[list, list]:
    """
    The per-message and per-recipient field blocks of a DSN's
    message/delivery-status part (compat32 parses it as a list of
    messages).
    """
    parts = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    assert len(parts) == 1, f"expected one message/delivery-status part, got {len(parts)}"
    blocks = parts[0].get_payload()
    return blocks[:1], blocks[1:]


def unfold(value: str | None) -> str:
    """
    A header value with any folding undone (legal RFC 5322; parsers must
    cope, so the test does too).
    """
    return " ".join((value or "").split())


def part_text(msg, content_type: str) -> str:
    return "".join(str(p.get_payload(decode=True), "ascii", "replace")
                   for p in msg.walk() if p.get_content_type() == content_type)


class OutboundToPostfixTests(unittest.TestCase):
    """
    Each test runs its own Postfix (mx.good.test on 127.0.0.2:P) and MTA
    (127.0.0.1:P for mx, another port for submission); the nsd serving
    L{ZONES} is shared by the class.
    """

    def setUp(self) -> None:
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        self.nsd: NSDServer = shared_nsd(self, "outbound", ZONES)
        self.port = free_port_on_both()
        self.postfix = self._start_postfix()
        self.mta = self._start_mta()

    # -- fixtures ---------------------------------------------------------------

    def _start_postfix(self) -> PostfixInstance:
        base = make_tempdir(self, "postfix", 0o755)
        tls_dir = os.path.join(base, "tls")
        os.makedirs(tls_dir)
        cert = trustme.CA().issue_cert(PEER_HOSTNAME)
        cert_path, key_path = os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem")
        with open(cert_path, "wb") as f:
            for blob in cert.cert_chain_pems:
                f.write(blob.bytes())
        cert.private_key_pem.write_to_path(key_path)
        os.chmod(key_path, 0o600)  # smtpd reads it as root before dropping privileges
        self.vmail = os.path.join(base, "vmail")
        os.makedirs(self.vmail)
        shutil.chown(self.vmail, "postfix", "postfix")
        uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
        maps = ", ".join(f"{a}={p}" for a, p in MAILBOXES.items())
        main = {
            "myhostname": PEER_HOSTNAME,
            "virtual_mailbox_domains": "good.test flaky.test",
            "virtual_mailbox_base": self.vmail,
            "virtual_mailbox_maps": f"inline:{{ {maps} }}",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_transport": "virtual",
            "smtpd_recipient_restrictions": FLAKY_RESTRICTION,
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": cert_path,
            "smtpd_tls_key_file": key_path,
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
        }
        return start_postfix(self, None, main, base=base, smtpd_port=self.port, listen=PEER)

    def _start_mta(self) -> MTAProcess:
        from twisted_mta.users import write_user
        tmp = make_tempdir(self, "mta")
        self.ca = write_server_cert(tmp)
        write_user(os.path.join(tmp, "users"), "alice", PASSWORD)
        self.submission_port = free_port()
        extra = (
            "[[listeners]]\n"
            'role = "submission"\n'
            f'endpoint = "tcp:{self.submission_port}:interface={LOOPBACK}"\n'
            '\n[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
            '\n[auth]\nusers_file = "users"\n'
            f'\n[dns]\nnameservers = ["{self.nsd.address}"]\ntimeout = "5s"\n'
            "\n[outbound]\n"
            f"port = {self.port}\n"
            'connect_timeout = "5s"\n'
            'greeting_timeout = "10s"\n'
            'command_timeout = "10s"\n'
            'data_timeout = "10s"\n'
            # Shorter than the retry interval, so each retry opens a new
            # connection: a Postfix smtpd keeps the settings it started
            # with for as long as its connection lasts, even across a reload.
            'idle_time = "1s"\n'
            '\n[queue]\nretry_schedule = ["2s"]\njitter = 0\ndelay_warning = false\n'
        )
        mta = MTAProcess(tmp, extra, port=self.port)
        self.addCleanup(mta.cleanup)
        return mta.start()

    # -- helpers ------------------------------------------------------------------

    def describe(self) -> str:
        return (f"\n--- spool: {self.mta.spool_contents()}\n--- {self.mta.describe()}\n"
                f"--- {self.postfix.describe()}\n--- {self.nsd.describe()}")

    def submit(self, recipients: list[str], token: str) -> None:
        """
        Submit one message from alice to C{recipients}: STARTTLS (our
        certificate verified against the trustme CA), AUTH, then mail.
        """
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        with smtplib.SMTP(LOOPBACK, self.submission_port, local_hostname="client.example.test",
                          timeout=10) as client:
            client.ehlo()
            code, _ = client.starttls(context=ctx)
            self.assertEqual(code, 220)
            client.ehlo()
            code, _ = client.login("alice", PASSWORD)
            self.assertEqual(code, 235)
            refused = client.sendmail(ALICE, recipients,
                                      make_message(token, sender=ALICE, recipient=recipients[0]))
        self.assertEqual(refused, {})

    def peer_maildir(self, address: str) -> str:
        return os.path.join(self.vmail, MAILBOXES[address])

    def wait_delivered(self, address: str, token: str) -> str:
        """
        Wait for Postfix to store the message with C{token} for C{address};
        return the path.
        """
        maildir = self.peer_maildir(address)
        paths = wait_for(lambda: files_containing(maildir, token.encode()), TIMEOUT,
                         lambda: f"{token} not delivered to {address} at Postfix{self.describe()}")
        return paths[0]

    def wait_spool_empty(self) -> None:
        wait_for(lambda: not self.mta.spool_contents(), TIMEOUT,
                 lambda: f"spool not empty{self.describe()}")

    def wait_dsns(self, token: str) -> list:
        """
        Wait until the spool is empty (the bounce is delivered and nothing
        is pending), then return every message in alice's Maildir carrying
        C{token} (a DSN quotes the original Subject), parsed.
        """
        maildir = self.mta.maildir("alice")
        wait_for(lambda: files_containing(maildir, token.encode()), TIMEOUT,
                 lambda: f"no DSN for {token} in {maildir}{self.describe()}")
        self.wait_spool_empty()
        return [parse_message(p) for p in files_containing(maildir, token.encode())]

    def queue_list(self) -> list[dict]:
        """
        C{twisted-mta queue list --json -c CONFIG}, run as the operator would.
        """
        result = subprocess.run(
            [sys.executable, "-m", "twisted_mta.cli", "queue", "list", "--json",
             "-c", self.mta.config_path],
            env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=30)
        self.assertEqual(result.returncode, 0, f"queue list failed: {result.stderr}")
        return json.loads(result.stdout)

    def assertFailedBlock(self, block, address: str, status: str, code: int,
                          remote_mta: str | None | type(...), kind: str = "smtp") -> None:
        """
        C{block} reports C{address} as failed with C{status} and a
        diagnostic of type C{kind} ("smtp" for a server's reply,
        "X-Twisted-MTA" for what we found ourselves) quoting C{code};
        C{remote_mta} is the host it names (C{None}: no Remote-MTA field;
        C{...}: not checked).
        """
        where = f"DSN block for {address}: {block.items()}"
        self.assertEqual(block["Final-Recipient"], f"rfc822; {address}", where)
        self.assertEqual(block["Action"], "failed", where)
        self.assertEqual(block["Status"], status, where)
        self.assertTrue(unfold(block["Diagnostic-Code"]).startswith(f"{kind}; {code} {status} "),
                        where)
        if remote_mta is None:
            self.assertIsNone(block["Remote-MTA"], where)
        elif remote_mta is not ...:
            self.assertEqual(block["Remote-MTA"], f"dns; {remote_mta}", where)

    def assertIsDSN(self, msg, token: str) -> None:
        where = f"not a DSN for {token}: {msg.items()}"
        self.assertEqual(msg.get_content_type(), "multipart/report", where)
        self.assertEqual(msg.get_param("report-type"), "delivery-status", where)
        self.assertEqual(msg["Return-Path"], "<>", where)
        self.assertEqual(msg["Delivered-To"], ALICE, where)
        self.assertEqual(msg["From"], f"Mail Delivery System <MAILER-DAEMON@{MTA_HOSTNAME}>")
        self.assertIn(f"Subject: interop test {token}", part_text(msg, "text/rfc822-headers"))
        per_message, _ = dsn_blocks(msg)
        self.assertEqual(per_message[0]["Reporting-MTA"], f"dns; {MTA_HOSTNAME}")

    # -- tests ----------------------------------------------------------------------

    def test_submitted_message_reaches_postfix_by_mx(self) -> None:
        """A message submitted by smtplib (STARTTLS, AUTH as alice) for two good.test users is routed by the MX record nsd serves (mx.good.test -> 127.0.0.2), sent to Postfix over STARTTLS, and stored once in each Maildir with Postfix's and our Received headers; no DSN, and the spool ends empty."""
        token = uuid.uuid4().hex
        rcpts = ["bob@good.test", "carol@good.test"]
        self.submit(rcpts, token)
        paths = {r: self.wait_delivered(r, token) for r in rcpts}
        self.wait_spool_empty()
        wait_for(lambda: self.postfix.maillog().count("status=sent") >= 2, TIMEOUT,
                 lambda: f"Postfix did not log two deliveries{self.describe()}")

        for rcpt, path in paths.items():
            self.assertEqual(files_containing(self.peer_maildir(rcpt), token.encode()), [path])
            self.assertTrue(path.startswith(os.path.join(self.peer_maildir(rcpt), "new") + os.sep))
            msg = parse_message(path)
            self.assertEqual(msg["Subject"], f"interop test {token}")
            self.assertEqual(msg["Return-Path"], f"<{ALICE}>")
            self.assertEqual(msg["Delivered-To"], rcpt)
            received = msg.get_all("Received") or []
            self.assertEqual(len(received), 2, received)
            theirs, ours = received
            # Postfix received it from us over TLS (our opportunistic STARTTLS).
            self.assertIn(f"from {MTA_HOSTNAME} (", theirs)
            self.assertIn(f"by {PEER_HOSTNAME} (Postfix) with ESMTPS id", theirs)
            self.assertRegex(theirs, r"\(using TLSv1\.[23] with cipher ")
            # Our header: the authenticated submission over TLS.
            self.assertIn(f"by {MTA_HOSTNAME} (twisted-mta) with ESMTPSA id", ours)
            self.assertIn(f"from client.example.test ([{LOOPBACK}])", ours)
        self.assertIn("TLS connection established from", self.postfix.maillog())
        self.assertIn(f"outbound: session with {PEER_HOSTNAME}[{PEER}]:{self.port} (TLSv1.",
                      self.mta.output())
        self.assertEqual(message_files(self.mta.maildir("alice")), [], self.describe())

    def test_refused_recipient_bounces_to_local_sender(self) -> None:
        """Postfix refuses nobody@good.test at RCPT (550 5.1.1) and accepts bob@good.test in the same transaction: bob gets the message, and alice gets one DSN (multipart/report, delivery-status) for nobody only, with Status 5.1.1, Action failed and Remote-MTA mx.good.test."""
        token = uuid.uuid4().hex
        self.submit(["bob@good.test", "nobody@good.test"], token)
        self.wait_delivered("bob@good.test", token)
        dsns = self.wait_dsns(token)
        self.assertEqual(len(dsns), 1, self.describe())
        dsn = dsns[0]
        self.assertIsDSN(dsn, token)
        self.assertEqual(dsn["Subject"], "Undelivered Mail Returned to Sender")
        _, blocks = dsn_blocks(dsn)
        self.assertEqual(len(blocks), 1, [b.items() for b in blocks])
        self.assertFailedBlock(blocks[0], "nobody@good.test", "5.1.1", 550, PEER_HOSTNAME)
        self.assertIn("User unknown", unfold(blocks[0]["Diagnostic-Code"]))
        # bob got the message, so neither the report nor its text names him.
        status_text = str(dsn.get_payload()[1])
        self.assertNotIn("bob@good.test", status_text)
        human = part_text(dsn, "text/plain")
        self.assertIn("<nobody@good.test>", human)
        self.assertNotIn("bob@good.test", human)
        self.assertEqual(len(files_containing(self.peer_maildir("bob@good.test"),
                                              token.encode())), 1)
        self.assertIn("550 5.1.1 <nobody@good.test>", self.postfix.maillog())

    def test_temporary_failure_is_retried_until_delivered(self) -> None:
        """Postfix answers 451 4.3.0 for flaky.test: the message stays queued (queue list --json shows the 451 as last error after two attempts, recipient pending); once the restriction is removed (postfix reload) a following attempt delivers it and the spool ends empty, with no DSN."""
        token = uuid.uuid4().hex
        rcpt = "dave@flaky.test"
        self.submit([rcpt], token)

        def retried() -> dict | None:
            for entry in self.queue_list():
                last = entry.get("last_outcome") or {}
                if entry.get("attempts", 0) >= 2 and last.get("code") == 451:
                    return entry
            return None

        entry = wait_for(retried, TIMEOUT, lambda: f"no second 451 attempt in "
                         f"{self.queue_list()}{self.describe()}", interval=0.2)
        self.assertEqual(entry["sender"], ALICE)
        self.assertEqual(entry["state"], "cur")
        last = entry["last_outcome"]
        self.assertEqual(last["enhanced"], "4.3.0")
        self.assertIn("try later", last["text"])
        self.assertEqual(last.get("remote_mta"), PEER_HOSTNAME)
        [recipient] = entry["recipients"]
        self.assertEqual(recipient["address"], rcpt)
        self.assertEqual(recipient["state"], "pending")
        self.assertEqual(recipient["outcome"]["code"], 451)
        self.assertEqual(files_containing(self.peer_maildir(rcpt), token.encode()), [])
        self.assertGreaterEqual(self.postfix.maillog().count("451 4.3.0 <dave@flaky.test>"), 2)

        self.postfix.reconfigure({"smtpd_recipient_restrictions": ACCEPTING_RESTRICTION})
        path = self.wait_delivered(rcpt, token)
        self.wait_spool_empty()
        self.assertEqual(files_containing(self.peer_maildir(rcpt), token.encode()), [path])
        self.assertEqual(parse_message(path)["Subject"], f"interop test {token}")
        self.assertEqual(self.queue_list(), [])
        self.assertEqual(message_files(self.mta.maildir("alice")), [], self.describe())

    def test_null_mx_nxdomain_and_mx_to_self_bounce(self) -> None:
        """One message to a null MX domain (MX 0 .), a name that does not exist under good.test, and a domain whose MX is our own mx listener (it greets with our host name): each recipient fails permanently and alice's DSN lists them with Status 5.1.10, 5.1.2 and 5.4.6; nothing reaches Postfix and our listener queues nothing."""
        token = uuid.uuid4().hex
        rcpts = ["x@nullmx.test", "y@missing.good.test", "z@self.test"]
        self.submit(rcpts, token)
        dsns = self.wait_dsns(token)
        blocks = {}
        for dsn in dsns:
            self.assertIsDSN(dsn, token)
            for block in dsn_blocks(dsn)[1]:
                address = block["Final-Recipient"].partition("; ")[2]
                self.assertNotIn(address, blocks, f"{address} reported twice")
                blocks[address] = block
        self.assertEqual(sorted(blocks), sorted(rcpts), self.describe())
        ours = "X-Twisted-MTA"
        self.assertFailedBlock(blocks["x@nullmx.test"], "x@nullmx.test", "5.1.10", 556, None,
                               ours)
        self.assertFailedBlock(blocks["y@missing.good.test"], "y@missing.good.test", "5.1.2",
                               550, None, ours)
        # The loop is our finding, not a reply of the looping host's.
        self.assertFailedBlock(blocks["z@self.test"], "z@self.test", "5.4.6", 554, None, ours)
        self.assertIn("loops back to myself", unfold(blocks["z@self.test"]["Diagnostic-Code"]))
        # Only the DSN(s) reached alice, and no copy went anywhere else.
        self.assertEqual(len(message_files(self.mta.maildir("alice"))), len(dsns))
        self.assertNotIn("status=sent", self.postfix.maillog())
        self.assertNotIn("x@nullmx.test", self.postfix.maillog())
