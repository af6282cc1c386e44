"""
DKIM through real DNS: keys made here (RSA and Ed25519), their records
served by the private nsd, a message signed by L{twisted_mta.dkim.Signer}
and verified by dkimpy asking nsd through dnspython (loopback only); and
our running MTA signing the mail that is ours, verified by dkimpy and by
OpenDKIM (Debian's, in its test mode, resolving through nsd).
"""

from __future__ import annotations

import os
import shutil
import smtplib
import ssl
import subprocess

import dkim
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, zone
from tests.interop.requires import missing
from tests.interop.support import (
    LOOPBACK, files_containing, free_port, make_tempdir, start_mta, wait_for, write_server_cert,
)
from tests.interop.test_tlsrpt_send import txt
from tests.support import make_config
from tests.test_dkim import MESSAGE, h_tag, write_key
from twisted_mta.dkim import Signer
from twisted_mta.users import write_user

ZONE = "dkim.test"


class DKIMThroughDNSTests(SynchronousTestCase):
    def test_rsa_and_ed25519(self) -> None:
        require_nsd()
        tmp = make_tempdir(self, "dkim")
        domains = {}
        for name, algorithm in (("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")):
            write_key(os.path.join(tmp, f"{name}.pem"), algorithm)
            domains[f"{name}.{ZONE}"] = {"selector": "sel", "key_file": f"{name}.pem",
                                         "algorithm": algorithm}
        signer = Signer.from_config(make_config(tmp, dkim={"domains": domains}))
        records = [(f"sel._domainkey.{k.domain}.", "TXT", txt(k.dns_record()))
                   for k in signer.keys.values()]
        nsd = NSDServer(os.path.join(tmp, "nsd"), {ZONE: zone(ZONE, records)})
        os.makedirs(nsd.workdir, exist_ok=True)
        nsd.start()
        self.addCleanup(nsd.stop)
        asked = []

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            asked.append(name)
            return nsd.txt(name, timeout)

        for domain in domains:
            signed = signer.sign(MESSAGE, domain)
            self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc), domain)
            self.assertFalse(dkim.verify(signed.replace(b"body line", b"other"),
                                         dnsfunc=dnsfunc), domain)
        self.assertEqual(sorted(set(asked)), [b"sel._domainkey.ed.dkim.test.",
                                              b"sel._domainkey.rsa.dkim.test."])


# -- our MTA signs what it sends; OpenDKIM and dkimpy verify ----------------------

OPENDKIM = shutil.which("opendkim") or (
    "/usr/sbin/opendkim" if os.access("/usr/sbin/opendkim", os.X_OK) else None)
PASSWORD = "dkim-interop-pw"
DELIVERY_TIMEOUT = 20.0


def require_opendkim() -> str:
    if OPENDKIM is None:
        missing("opendkim is not installed (run scripts/install-test-deps)")
    return OPENDKIM


class OpenDKIMVerifier:
    """
    Debian's OpenDKIM in its test mode (C{opendkim -t FILE}: the message is
    evaluated as the milter would, without a milter client), in verify
    mode, with a private configuration.  OpenDKIM resolves through
    libunbound: its C{ResolverConfiguration} is an unbound configuration
    whose stub zones send every key query to the private nsd (an address
    with a port, which C{Nameservers} does not take), with unbound's
    built-in empty C{test.} zone (RFC 6761) switched off.
    """

    def __init__(self, workdir: str, nsd_address: str, zones: list[str]) -> None:
        os.makedirs(workdir, exist_ok=True)
        host, port = nsd_address.split(":")
        unbound = os.path.join(workdir, "unbound.conf")
        with open(unbound, "w") as f:
            f.write('server:\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
                    '  local-zone: "test." nodefault\n')
            for zone_name in zones:
                f.write(f'stub-zone:\n  name: "{zone_name}"\n  stub-addr: {host}@{port}\n')
        self.conf = os.path.join(workdir, "opendkim.conf")
        with open(self.conf, "w") as f:
            f.write(f"Mode v\nSyslog no\nPidFile {workdir}/opendkim.pid\n"
                    f"Socket local:{workdir}/opendkim.sock\nResolverConfiguration {unbound}\n")

    def verify(self, path: str) -> str:
        """
        OpenDKIM's verdict on the message in C{path}: the line it logs
        for its first signature, e.g. C{verification (s=sel, d=example.test,
        2048-bit key) succeeded}, or what it said when there is none.
        """
        done = subprocess.run([require_opendkim(), "-x", self.conf, "-vv", "-t", path],
                              capture_output=True, text=True, timeout=60)
        lines = [line for line in (done.stdout + done.stderr).splitlines()
                 if "verification" in line or "no signature" in line]
        return lines[0] if lines else f"(exit {done.returncode}) {done.stdout}{done.stderr}"


class SignOutboundBase(SynchronousTestCase):
    """
    Our MTA under twistd (C{workers}: L{start_mta}'s; None, one receiving
    worker per core), a submission listener with STARTTLS and AUTH, keys
    for example.test (RSA-2048) and ed.test (Ed25519) whose records the
    private nsd serves, and OpenDKIM to verify.
    """

    workers: int | None = None
    HEADERS = ["from", "to", "subject", "date", "message-id", "mime-version", "x-absent"]

    def setUp(self) -> None:
        require_nsd()
        require_opendkim()
        tmp = make_tempdir(self, "dkimsign")
        domains = {"example.test": "rsa-sha256", "ed.test": "ed25519-sha256"}
        table = ""
        for domain, algorithm in domains.items():
            write_key(os.path.join(tmp, f"{domain}.pem"), algorithm)
            table += (f'\n[dkim.domains."{domain}"]\nselector = "sel"\n'
                      f'key_file = "{domain}.pem"\nalgorithm = "{algorithm}"\n')
        settings = {"domains": {d: {"selector": "sel", "key_file": f"{d}.pem", "algorithm": a}
                                for d, a in domains.items()}}
        signer = Signer.from_config(make_config(tmp, dkim=settings))
        zones = {}
        for key in signer.keys.values():
            zones[key.domain] = zone(key.domain, [(f"{key.dns_name}.", "TXT",
                                                   txt(key.dns_record()))])
        zones["nokey.test"] = zone("nokey.test")
        self.nsd = NSDServer(os.path.join(tmp, "nsd"), zones)
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        self.opendkim = OpenDKIMVerifier(os.path.join(tmp, "opendkim"), self.nsd.address,
                                         sorted(zones))
        self.ca = write_server_cert(tmp)
        write_user(os.path.join(tmp, "users"), "alice", PASSWORD)
        self.submission_port = free_port()
        headers = ", ".join(f'"{h}"' for h in self.HEADERS)
        extra = (
            "[[listeners]]\n"
            'role = "submission"\n'
            f'endpoint = "tcp:{self.submission_port}:interface={LOOPBACK}"\n'
            '\n[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
            '\n[auth]\nusers_file = "users"\n'
            # loopback is the Internet here: only AUTH makes mail ours
            '\n[relay]\ntrusted_networks = ["192.0.2.0/24"]\n'
            '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
            f"\n[dkim]\nheaders = [{headers}]\n" + table)
        self.mta = start_mta(self, tmp, extra, users=("alice", "bob", "postmaster"),
                             workers=self.workers)

    def message(self, token: str, from_domain: str, body: str = "") -> bytes:
        return (f"From: Alice <alice@{from_domain}>\r\nTo: bob@example.test\r\n"
                f"Subject: dkim {token}\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
                f"Message-ID: <{token}@example.test>\r\n{body and 'MIME-Version: 1.0' + chr(13) + chr(10)}"
                + ("Content-Type: text/plain; charset=utf-8\r\n"
                   "Content-Transfer-Encoding: 8bit\r\n" if body else "")
                + f"\r\ntoken: {token}\r\n{body}").encode("utf-8")

    def submit(self, message: bytes, eight_bit: bool = False) -> None:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        try:
            with smtplib.SMTP(LOOPBACK, self.submission_port, local_hostname="client.test",
                              timeout=10) as client:
                client.starttls(context=ctx)
                client.login("alice", PASSWORD)
                refused = client.sendmail("alice@example.test", ["bob@example.test"], message,
                                          mail_options=["BODY=8BITMIME"] if eight_bit else [])
        except smtplib.SMTPException as e:
            raise AssertionError(f"submission failed: {e!r}; {self.mta.describe()}")
        self.assertEqual(refused, {})

    def from_internet(self, message: bytes) -> None:
        with smtplib.SMTP(LOOPBACK, self.mta.port, local_hostname="mail.remote.test",
                          timeout=10) as client:
            self.assertEqual(client.sendmail("alice@example.test", ["bob@example.test"],
                                             message), {})

    def delivered(self, token: str) -> bytes:
        maildir = self.mta.maildir("bob")
        [path] = wait_for(lambda: files_containing(maildir, token.encode()), DELIVERY_TIMEOUT,
                          lambda: f"{token} not delivered; {self.mta.describe()}")
        with open(path, "rb") as f:
            self.path = path
            return f.read()

    def assert_verified(self, message: bytes, domain: str, algorithm: str) -> None:
        self.assertTrue(dkim.verify(message, dnsfunc=self.nsd.txt), message[:600])
        signature = message[message.index(b"DKIM-Signature:"):]
        self.assertIn(f"a={algorithm};".encode(), signature[:400])
        self.assertIn(f"d={domain};".encode(), signature[:400])
        verdict = self.opendkim.verify(self.path)
        self.assertIn(f"d={domain}", verdict)
        self.assertTrue(verdict.endswith("succeeded"), verdict)

    def check_rsa_and_ed25519(self) -> None:
        for domain, algorithm in (("example.test", "rsa-sha256"),
                                  ("ed.test", "ed25519-sha256")):
            token = f"signed-{domain}"
            self.submit(self.message(token, domain))
            message = self.delivered(token)
            self.assert_verified(message, domain, algorithm)
            self.assertEqual(h_tag(message[message.index(b"DKIM-Signature:"):]),
                             [b"from", b"to", b"subject", b"date", b"message-id"])
            with open(self.path, "wb") as f:
                f.write(message.replace(f"token: {token}".encode(), b"token: changed"))
            self.assertIn("failed", self.opendkim.verify(self.path))


class SignOutboundTests(SignOutboundBase):
    """
    Mail submitted to our MTA by an authenticated client arrives signed
    (here in a local Maildir, the queue file as signed on receipt), and
    dkimpy and OpenDKIM verify it with the key served by the private nsd:
    RSA-2048 for example.test, Ed25519 for ed.test.  Internet mail, and
    mail whose From domain has no key, arrive unsigned.
    """

    def test_rsa_and_ed25519(self) -> None:
        """
        Both verify with dkimpy and OpenDKIM; h= is exactly the configured
        headers the message has; OpenDKIM fails a changed body.
        """
        self.check_rsa_and_ed25519()

    def test_eight_bit(self) -> None:
        """
        An 8-bit message is converted to 7 bit, then signed; it verifies.
        """
        token = "signed-8bit"
        self.submit(self.message(token, "ed.test", "Grüße aus Köln\r\n"), eight_bit=True)
        message = self.delivered(token)
        self.assertTrue(message.isascii())
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", message)
        self.assert_verified(message, "ed.test", "ed25519-sha256")

    def test_not_signed(self) -> None:
        """
        Internet mail (loopback is not trusted here) with our own From
        domain, and our users' mail From a domain without a key, arrive
        unsigned; OpenDKIM finds no signature.
        """
        self.from_internet(self.message("internet", "example.test"))
        self.submit(self.message("nokey", "nokey.test"))
        for token in ("internet", "nokey"):
            message = self.delivered(token)
            self.assertNotIn(b"DKIM-Signature", message)
            self.assertNotIn("succeeded", self.opendkim.verify(self.path))
        log = self.mta.output()
        self.assertIn("not DKIM-signed: no key for nokey.test", log)


class SignOutboundOneProcessTests(SignOutboundBase):
    """
    The same with [server] workers = 0: the main process receives (its
    signer is the one tap.prepare built, not a worker's).
    """

    workers = 0

    def test_rsa_and_ed25519(self) -> None:
        self.check_rsa_and_ed25519()
