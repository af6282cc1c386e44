"""
Milters against a real one: Debian's OpenDKIM, started privately as a
milter on a loopback port (its own opendkim.conf in the test's temp dir,
never the system service), attached to our MTA's submission listener and
to a second mx listener.

  - Mail our users submit (the client is 127.0.0.1, in OpenDKIM's
    InternalHosts) is signed by OpenDKIM with a key made by
    opendkim-genkey at test time; the delivered copy carries the
    DKIM-Signature OpenDKIM added before our 250, and dkimpy verifies it
    with the public key served by the private nsd.
  - Mail from the Internet (a client bound to 127.0.0.2, not internal)
    signed by dkimpy is verified by OpenDKIM, which resolves the key
    through the private nsd (via libunbound's stub zones, as in
    tests/interop/test_dkim.py) and adds Authentication-Results with
    dkim=pass; a changed body gets dkim=fail.

The opendkim.conf here is the one docs/operations.md shows.
"""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import socket
import subprocess

import dkim
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, zone
from tests.interop.requires import missing
from tests.interop.support import (
    LOOPBACK, files_containing, free_port, make_tempdir, start_mta, wait_for,
)
from tests.interop.test_tlsrpt_send import txt
from tests.test_dkim import write_key

OPENDKIM = shutil.which("opendkim") or (
    "/usr/sbin/opendkim" if os.access("/usr/sbin/opendkim", os.X_OK) else None)
GENKEY = shutil.which("opendkim-genkey") or (
    "/usr/sbin/opendkim-genkey" if os.access("/usr/sbin/opendkim-genkey", os.X_OK) else None)
DELIVERY_TIMEOUT = 30.0
OUTSIDE = "127.0.0.2"  # an Internet client: loopback, but not in InternalHosts


def require_opendkim() -> tuple[str, str]:
    if OPENDKIM is None or GENKEY is None:
        missing("opendkim and opendkim-tools are not installed (run scripts/install-test-deps)")
    return OPENDKIM, GENKEY


def genkey_record(directory: str, domain: str, selector: str) -> str:
    """
    A key made by opendkim-genkey (C{SELECTOR.private}) and the TXT
    record text it wrote for it (C{SELECTOR.txt}), its strings joined.
    """
    subprocess.run([GENKEY, "-D", directory, "-d", domain, "-s", selector, "-b", "2048"],
                   check=True, capture_output=True, timeout=60)
    with open(os.path.join(directory, f"{selector}.txt"), encoding="ascii") as f:
        return "".join(re.findall(r'"([^"]*)"', f.read()))


class OpenDKIMMilter:
    """
    opendkim -f with a private configuration, signing for C{domain} with
    C{key}, verifying with keys looked up through the private nsd.
    """

    def __init__(self, workdir: str, nsd_address: str, zones: list[str], domain: str,
                 selector: str, key: str) -> None:
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        host, port = nsd_address.split(":")
        unbound = os.path.join(workdir, "unbound.conf")
        with open(unbound, "w") as f:
            f.write('server:\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
                    '  local-zone: "test." nodefault\n')
            for name in zones:
                f.write(f'stub-zone:\n  name: "{name}"\n  stub-addr: {host}@{port}\n')
        files = {
            "keytable": f"{selector}._domainkey.{domain} {domain}:{selector}:{key}\n",
            "signingtable": f"*@{domain} {selector}._domainkey.{domain}\n",
            "internalhosts": "127.0.0.1\n",
        }
        for name, text in files.items():
            with open(os.path.join(workdir, name), "w") as f:
                f.write(text)
        self.conf = os.path.join(workdir, "opendkim.conf")
        with open(self.conf, "w") as f:
            f.write(
                "Mode sv\n"
                "Syslog no\n"
                f"PidFile {workdir}/opendkim.pid\n"
                f"Socket inet:{self.port}@127.0.0.1\n"
                f"KeyTable file:{workdir}/keytable\n"
                f"SigningTable refile:{workdir}/signingtable\n"
                f"InternalHosts file:{workdir}/internalhosts\n"
                "AuthservID mx.example.test\n"
                "RequireSafeKeys false\n"
                f"ResolverConfiguration {unbound}\n")
        self.output_path = os.path.join(workdir, "opendkim.out")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        out = open(self.output_path, "ab")
        self.process = subprocess.Popen([OPENDKIM, "-f", "-x", self.conf], stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        out.close()

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"opendkim exited: {self.describe()}")
            try:
                socket.create_connection((LOOPBACK, self.port), timeout=1).close()
            except OSError:
                return False
            return True
        wait_for(listening, 20, self.describe)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def describe(self) -> str:
        try:
            with open(self.output_path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except FileNotFoundError:
            text = ""
        return f"opendkim ({self.conf}) on port {self.port}: {text[-3000:] or '(no output)'}"


class OpenDKIMMilterTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_nsd()
        require_opendkim()
        tmp = make_tempdir(self, "milter")
        keys = os.path.join(tmp, "keys")
        os.makedirs(keys)
        record = genkey_record(keys, "sign.test", "sel")
        # The Internet sender's key, used by dkimpy.
        self.remote_key = os.path.join(keys, "remote.pem")
        write_key(self.remote_key, "rsa-sha256")
        from twisted_mta.dkim import Signer
        from tests.support import make_config
        signer = Signer.from_config(make_config(tmp, dkim={"domains": {"remote.test": {
            "selector": "ext", "key_file": self.remote_key}}}))
        [remote] = signer.keys.values()
        self.signer = signer
        zones = {"sign.test": zone("sign.test", [("sel._domainkey", "TXT", txt(record))]),
                 "remote.test": zone("remote.test", [(f"{remote.dns_name}.", "TXT",
                                                      txt(remote.dns_record()))])}
        self.nsd = NSDServer(os.path.join(tmp, "nsd"), zones)
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        self.opendkim = OpenDKIMMilter(os.path.join(tmp, "opendkim"), self.nsd.address,
                                       sorted(zones), "sign.test", "sel",
                                       os.path.join(keys, "sel.private"))
        self.opendkim.start()
        self.addCleanup(self.opendkim.stop)
        self.submission_port = free_port()
        self.mx_port = free_port()
        self.metrics_port = free_port()
        extra = (
            "[metrics]\n"
            f'endpoint = "tcp:{self.metrics_port}:interface={LOOPBACK}"\n\n'

            "[[listeners]]\n"
            'role = "submission"\n'
            f'endpoint = "tcp:{self.submission_port}:interface={LOOPBACK}"\n'
            'milters = ["opendkim"]\n'
            "\n[[listeners]]\n"
            'role = "mx"\n'
            f'endpoint = "tcp:{self.mx_port}:interface={LOOPBACK}"\n'
            'milters = ["opendkim"]\n'
            "\n[milters.opendkim]\n"
            f'address = "inet:127.0.0.1:{self.opendkim.port}"\n'
            'default_action = "tempfail"\n'
            '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n')
        self.mta = start_mta(self, tmp, extra)

    def message(self, token: str, from_domain: str) -> bytes:
        return (f"From: Alice <alice@{from_domain}>\r\nTo: bob@example.test\r\n"
                f"Subject: milter {token}\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
                f"Message-ID: <{token}@{from_domain}>\r\n\r\ntoken: {token}\r\n"
                "a second line\r\n").encode()

    def send(self, port: int, message: bytes, source: str = LOOPBACK,
             sender: str = "alice@sign.test") -> None:
        try:
            with smtplib.SMTP(LOOPBACK, port, local_hostname="client.test", timeout=30,
                              source_address=(source, 0)) as client:
                refused = client.sendmail(sender, ["bob@example.test"], message)
        except smtplib.SMTPException as e:
            raise AssertionError(f"sending failed: {e!r}; {self.mta.describe()}; "
                                 f"{self.opendkim.describe()}")
        self.assertEqual(refused, {})

    def delivered(self, token: str) -> bytes:
        maildir = self.mta.maildir("bob")
        [path] = wait_for(lambda: files_containing(maildir, token.encode()), DELIVERY_TIMEOUT,
                          lambda: f"{token} not delivered; {self.mta.describe()}")
        with open(path, "rb") as f:
            return f.read()

    @staticmethod
    def results(message: bytes) -> list[bytes]:
        """The Authentication-Results fields of a delivered message, unfolded."""
        head = message.replace(b"\r\n", b"\n").split(b"\n\n")[0]
        head = head.replace(b"\n\t", b" ").replace(b"\n ", b" ")
        return [line for line in head.split(b"\n")
                if line.lower().startswith(b"authentication-results:")]

    def test_signs_submitted_mail(self) -> None:
        """OpenDKIM signs mail from an internal client; the delivered copy verifies with dkimpy."""
        self.send(self.submission_port, self.message("outbound", "sign.test"))
        message = self.delivered("outbound")
        self.assertIn(b"DKIM-Signature:", message)
        signature = message[message.index(b"DKIM-Signature:"):][:600]
        self.assertIn(b"d=sign.test", signature)
        self.assertIn(b"s=sel", signature)
        self.assertTrue(dkim.verify(message, dnsfunc=self.nsd.txt), message[:1500])
        self.assertIn("milter opendkim changed", self.mta.output())
        # Counted in the worker that took the message, by the main process.
        self.assertGreaterEqual(self.milter_metric("modified"), 1, self.mta.describe())
        self.assertGreaterEqual(self.milter_metric("accept"), 1)

    def milter_metric(self, result: str) -> float:
        import urllib.request
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.metrics_port}/",
                                    timeout=10) as r:
            text = r.read().decode()
        line = f'twisted_mta_milter_results_total{{milter="opendkim",result="{result}"}} '
        values = [float(l[len(line):]) for l in text.splitlines() if l.startswith(line)]
        return values[0] if values else 0.0

    def test_verifies_internet_mail(self) -> None:
        """OpenDKIM verifies dkimpy-signed Internet mail and adds Authentication-Results: dkim=pass; a changed body fails."""
        signed = self.signer.sign(self.message("inbound", "remote.test"), "remote.test")
        self.assertTrue(dkim.verify(signed, dnsfunc=self.nsd.txt))
        self.send(self.mx_port, signed, source=OUTSIDE, sender="alice@remote.test")
        message = self.delivered("inbound")
        results = self.results(message)
        self.assertEqual(len(results), 1, message[:1500])
        self.assertIn(b"mx.example.test", results[0])
        self.assertIn(b"dkim=pass", results[0])
        self.assertIn(b"header.d=remote.test", results[0])
        self.assertNotIn(b"d=sign.test", message)  # not signed: not internal
        tampered = self.signer.sign(self.message("tampered", "remote.test"), "remote.test")
        tampered = tampered.replace(b"a second line", b"a changed line")
        self.send(self.mx_port, tampered, source=OUTSIDE, sender="alice@remote.test")
        message = self.delivered("tampered")
        [result] = self.results(message)
        self.assertIn(b"dkim=fail", result)

    def test_milter_down_tempfails(self) -> None:
        """With OpenDKIM stopped, default_action tempfail: MAIL gets 451 4.7.1 and nothing is queued."""
        self.opendkim.stop()
        with smtplib.SMTP(LOOPBACK, self.submission_port, local_hostname="client.test",
                          timeout=30) as client:
            client.ehlo()
            code, text = client.mail("alice@sign.test")
        self.assertEqual(code, 451, text)
        self.assertTrue(text.startswith(b"4.7.1"), text)
        # The log line is written at the end of the worker's reactor turn
        # that sent the 451 (logsetup.TurnBufferedStream): a moment after.
        wait_for(lambda: "milter opendkim failed" in self.mta.output(), 10,
                 lambda: f"no 'milter opendkim failed' logged; {self.mta.describe()}")
        wait_for(lambda: self.milter_metric("failed") >= 1, 10, "no failed milter counted")


# -- Rspamd's proxy worker in milter mode -----------------------------------------

RSPAMD = shutil.which("rspamd") or (
    "/usr/bin/rspamd" if os.access("/usr/bin/rspamd", os.X_OK) else None)
RSPAMD_CONFDIR = "/etc/rspamd"  # Debian's rules; the workers and options are ours
RSPAMD_START = 90.0  # it loads its rules for about 20 s on a busy 2-core machine
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


class Rspamd:
    """
    Debian's rspamd with only the proxy worker, in milter mode and
    scanning itself (self_scan: no normal worker, no controller, no
    redis), on a Unix socket (the unix: milter address; OpenDKIM's test
    uses inet:); DNS to a closed loopback port; its rules
    from /etc/rspamd, its run, data and log files and local.d in C{workdir}.
    """

    def __init__(self, workdir: str) -> None:
        os.makedirs(os.path.join(workdir, "local.d"), exist_ok=True)
        self.workdir = workdir
        self.socket = os.path.join(workdir, "milter.sock")  # our unix: address
        self.conf = os.path.join(workdir, "rspamd.conf")
        with open(self.conf, "w") as f:
            f.write(
                '.include "$CONFDIR/common.conf"\n'
                "options {\n"
                '    .include "$CONFDIR/options.inc"\n'
                '    pidfile = "$RUNDIR/rspamd.pid";\n'
                '    dns { nameserver = ["127.0.0.1:9"]; timeout = 1s; retransmits = 1; }\n'
                "}\n"
                'logging { type = "file"; filename = "$LOGDIR/rspamd.log"; level = "info"; }\n'
                'worker "rspamd_proxy" {\n'
                f'    bind_socket = "{self.socket} mode=0600";\n'
                "    milter = yes;\n"
                "    timeout = 60s;\n"
                "    count = 1;\n"
                '    upstream "local" { default = yes; self_scan = yes; }\n'
                "}\n")
        with open(os.path.join(workdir, "local.d", "milter_headers.conf"), "w") as f:
            f.write('use = ["x-spamd-result"];\nskip_local = false;\n'
                    "skip_authenticated = false;\n")
        self.output_path = os.path.join(workdir, "rspamd.out")
        self.process: subprocess.Popen | None = None

    def start(self) -> float:
        """Start it; the seconds until it listened."""
        import time
        started = time.monotonic()
        out = open(self.output_path, "ab")
        self.process = subprocess.Popen(
            [RSPAMD, "-f", "-i", "-c", self.conf, f"--var=CONFDIR={RSPAMD_CONFDIR}",
             f"--var=LOCAL_CONFDIR={self.workdir}", f"--var=RUNDIR={self.workdir}",
             f"--var=DBDIR={self.workdir}", f"--var=LOGDIR={self.workdir}"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
        out.close()

        def listening() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"rspamd exited: {self.describe()}")
            probe = socket.socket(socket.AF_UNIX)
            try:
                probe.connect(self.socket)
            except OSError:
                return False
            finally:
                probe.close()
            return True
        wait_for(listening, RSPAMD_START, self.describe, interval=0.2)
        return time.monotonic() - started

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)  # the main process and its worker
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(10)

    def describe(self) -> str:
        parts = []
        for name in ("rspamd.out", "rspamd.log"):
            try:
                with open(os.path.join(self.workdir, name), errors="replace") as f:
                    parts.append(f.read()[-3000:])
            except FileNotFoundError:
                pass
        return f"rspamd ({self.conf}) on {self.socket}: {' '.join(parts) or '(no output)'}"


class RspamdMilterTests(SynchronousTestCase):
    """
    Rspamd 3.4 as the milter of an mx listener: a plain message is queued
    with the X-Spamd-Result header Rspamd added; GTUBE is refused at the
    end of data with Rspamd's own reply.  One test (Rspamd takes about
    20 s to start here).
    """

    def test_scan_and_reject(self) -> None:
        if RSPAMD is None:
            missing("rspamd is not installed (run scripts/install-test-deps)")
        tmp = make_tempdir(self, "rspamd")
        rspamd = Rspamd(os.path.join(tmp, "rspamd"))
        self.addCleanup(rspamd.stop)
        rspamd.start()
        mx_port = free_port()
        extra = ("[[listeners]]\n"
                 'role = "mx"\n'
                 f'endpoint = "tcp:{mx_port}:interface={LOOPBACK}"\n'
                 'milters = ["rspamd"]\n'
                 "\n[milters.rspamd]\n"
                 f'address = "unix:{rspamd.socket}"\n'
                 'content_timeout = "60s"\n'
                 '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n')
        mta = start_mta(self, tmp, extra)

        def message(token: str, body: str) -> bytes:
            return (f"From: <carol@remote.test>\r\nTo: bob@example.test\r\n"
                    f"Subject: rspamd {token}\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
                    f"Message-ID: <{token}@remote.test>\r\n\r\ntoken: {token}\r\n{body}\r\n"
                    ).encode()

        with smtplib.SMTP(LOOPBACK, mx_port, local_hostname="client.test", timeout=90,
                          source_address=(OUTSIDE, 0)) as client:
            refused = client.sendmail("carol@remote.test", ["bob@example.test"],
                                      message("clean", "hello there"))
            self.assertEqual(refused, {})
            with self.assertRaises(smtplib.SMTPDataError) as caught:
                client.sendmail("carol@remote.test", ["bob@example.test"],
                                message("gtube", GTUBE))
        code, text = caught.exception.smtp_code, caught.exception.smtp_error
        self.assertTrue(500 <= code < 600, (code, text))
        self.assertIn(b"5.7.1", text)
        [path] = wait_for(lambda: files_containing(mta.maildir("bob"), b"token: clean"),
                          DELIVERY_TIMEOUT, lambda: f"not delivered; {mta.describe()}")
        with open(path, "rb") as f:
            delivered = f.read()
        self.assertIn(b"X-Spamd-Result:", delivered)
        self.assertEqual(files_containing(mta.maildir("bob"), b"token: gtube"), [])
        self.assertIn("milter rspamd", mta.output())
