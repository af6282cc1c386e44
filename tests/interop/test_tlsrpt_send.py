"""
Sending TLS reports end to end: our MTA (twistd, a real process) delivers
a few messages to a domain whose MX is a STARTTLS peer on loopback, the
private nsd publishing the domain's C{_smtp._tls} record with a mailto:
and an https: rua and the submitter's DKIM key; C{tls report send --now}
asks the running MTA to report.  Checked: the mailed report reaches the
rua domain's MX, a real Postfix that delivers it into a Maildir (through
our queue and outbound leg, from <>), its DKIM signature verifies with
dkimpy against the key nsd serves, its JSON counts the sessions; the
HTTPS collector (a Twisted web server with a trustme certificate, its own
process) got a POST of application/tlsrpt+gzip whose
body is the same report.  parsedmarc (an independent RFC 8460 parser)
accepts the delivered mail and the POSTed body, and reads back the report
we sent.

The rua domain publishes MTA-STS (mode enforce, served by the same HTTPS
server) while its MX shows a certificate nobody vouches for: an ordinary
message to it is held back, the report (TLS-Required: No) is delivered
anyway, as RFC 8460 3 requires, and that session is not counted.

Nothing leaves the machine: DNS is the private nsd, the peers listen on
127.0.78.x, the collector's name resolves through nsd too.
"""

from __future__ import annotations

import base64
import email
import grp
import email.policy
import gzip
import json
import os
import pwd
import shutil
import ssl
import subprocess
import sys

import dkim
import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, zone
from tests.interop.support import (
    ONE_ATTEMPT_JSON_LOG, MTAProcess, free_port, make_tempdir, message_files,
    postfix_unavailable, start_postfix, subprocess_env, wait_for,
)
from tests.interop.test_operate import cli_ok, events, send
from tests.interop.test_tlsrpt_parsedmarc import assert_reads, read_file, read_mail
from tests.interop.tls_peers import ScriptedPeer, free_port_on_all
from twisted_mta.tlsrpt import store

ZONE = "rpt.test"
DEST, REPORTS, COLLECTOR = "127.0.78.2", "127.0.78.3", "127.0.78.10"
TIMEOUT = 30.0


def server_context(certificate: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificate.configure_cert(context)
    return context


def txt(text: str) -> str:
    """
    TXT rdata: the text in strings of at most 255 octets.
    """
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


class SendReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_nsd()
        why = postfix_unavailable()
        if why:
            raise SkipTest(why)
        self.tmp = make_tempdir(self, "tlsrpt-send")
        ca, stranger = trustme.CA(), trustme.CA()
        port = free_port_on_all((DEST, REPORTS))
        self.https_port = free_port_on_all((COLLECTOR,))
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = base64.b64encode(key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).decode()
        records = [
            ("dest", "MX", f"10 mx-dest.{ZONE}."),
            ("mx-dest", "A", DEST),
            ("reports", "MX", f"10 mx-reports.{ZONE}."),
            ("mx-reports", "A", REPORTS),
            ("collector", "A", COLLECTOR),
            ("_mta-sts.reports", "TXT", '"v=STSv1; id=20261203"'),
            ("mta-sts.reports", "A", COLLECTOR),
            ("_smtp._tls.dest", "TXT", txt(
                f"v=TLSRPTv1; rua=mailto:tlsrpt@reports.{ZONE},"
                f"https://collector.{ZONE}:{self.https_port}/v1/tlsrpt")),
            ("rpt._domainkey.sender", "TXT", txt(f"v=DKIM1; k=rsa; s=tlsrpt; p={public}")),
        ]
        self.nsd = NSDServer(os.path.join(self.tmp, "nsd"), {ZONE: zone(ZONE, records)})
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        self.peers = {"dest": ScriptedPeer(DEST, port, f"mx-dest.{ZONE}", mode="tls",
                                           tls_context=server_context(
                                               ca.issue_cert(f"mx-dest.{ZONE}")))}
        self.addCleanup(self.peers["dest"].stop)
        self.start_postfix(port, stranger.issue_cert(f"mx-reports.{ZONE}"))
        self.collected = os.path.join(self.tmp, "collected")
        os.makedirs(self.collected)
        self.start_collector(ca.issue_cert(f"collector.{ZONE}", f"mta-sts.reports.{ZONE}"))

        config = "\n".join([
            "[dns]",
            f'nameservers = ["{self.nsd.address}"]',
            'timeout = "5s"',
            "",
            "[outbound]",
            f"port = {port}",
            'connect_timeout = "5s"',
            "",
            "[outbound.tls]",
            'policy = "opportunistic"',
            'ca_file = "ca.pem"',
            "dane = false",
            'sts_ca_file = "ca.pem"',
            f"sts_port = {self.https_port}",
            'sts_fetch_timeout = "5s"',
            "",
            "[relay]",
            'trusted_networks = ["127.0.0.0/8"]',
            "",
            "[tlsrpt]",
            "enabled = true",
            'organization_name = "Interop Sender"',
            f'contact_info = "tlsrpt@sender.{ZONE}"',
            'ca_file = "ca.pem"',
            'https_timeout = "10s"',
            "",
            f'[dkim.domains."sender.{ZONE}"]',
            'selector = "rpt"',
            'key_file = "dkim.pem"',
            "",
            ONE_ATTEMPT_JSON_LOG,
        ])
        self.mta = MTAProcess(os.path.join(self.tmp, "mta"), config, port=free_port())
        ca.cert_pem.write_to_path(os.path.join(self.mta.tmpdir, "ca.pem"))
        with open(os.path.join(self.mta.tmpdir, "dkim.pem"), "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        self.addCleanup(self.mta.cleanup)
        self.mta.start()

    def start_postfix(self, port: int, certificate: trustme.LeafCert) -> None:
        """
        The rua domain's MX: a real Postfix on REPORTS:port with STARTTLS
        (a certificate our MTA does not trust) that delivers
        tlsrpt@reports.rpt.test into a Maildir.
        """
        base = make_tempdir(self, "postfix", 0o755)
        cert_path, key_path = os.path.join(base, "cert.pem"), os.path.join(base, "key.pem")
        with open(cert_path, "wb") as f:
            for blob in certificate.cert_chain_pems:
                f.write(blob.bytes())
        certificate.private_key_pem.write_to_path(key_path)
        os.chmod(key_path, 0o600)
        vmail = os.path.join(base, "vmail")
        os.makedirs(vmail)
        shutil.chown(vmail, "postfix", "postfix")
        self.report_maildir = os.path.join(vmail, "tlsrpt")
        uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
        self.postfix = start_postfix(self, None, {
            "myhostname": f"mx-reports.{ZONE}",
            "virtual_mailbox_domains": f"reports.{ZONE}",
            "virtual_mailbox_base": vmail,
            "virtual_mailbox_maps": f"inline:{{ tlsrpt@reports.{ZONE}=tlsrpt/ }}",
            "virtual_uid_maps": f"static:{uid}",
            "virtual_gid_maps": f"static:{gid}",
            "virtual_transport": "virtual",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": cert_path,
            "smtpd_tls_key_file": key_path,
            "smtpd_tls_received_header": "yes",
        }, base=base, smtpd_port=port, listen=REPORTS)

    def start_collector(self, certificate: trustme.LeafCert) -> None:
        pem = os.path.join(self.tmp, "collector.pem")
        certificate.private_key_and_cert_chain_pem.write_to_path(pem)
        policy = os.path.join(self.tmp, "mta-sts.txt")
        with open(policy, "wb") as f:
            f.write(f"version: STSv1\r\nmode: enforce\r\nmx: mx-reports.{ZONE}\r\n"
                    "max_age: 86400\r\n".encode())
        self.collector = subprocess.Popen(
            [sys.executable, "-m", "tests.interop.tlsrpt_collector", COLLECTOR,
             str(self.https_port), pem, self.collected, policy],
            env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)

        def stop() -> None:
            self.collector.kill()
            self.collector.wait(10)
        self.addCleanup(stop)
        line = self.collector.stdout.readline()
        if line.strip() != "ready":
            raise AssertionError(f"the collector did not start: {line}"
                                 f"{self.collector.stdout.read()}")

    def test_report_sent_by_mail_and_https(self) -> None:
        tokens = [send(self.mta, f"user{i}@dest.{ZONE}", f"message {i}") for i in range(3)]
        wait_for(lambda: len(self.peers["dest"].messages) == 3, TIMEOUT,
                 lambda: f"3 messages at mx-dest; {self.mta.describe()}")
        self.assertTrue(all(m.tls for m in self.peers["dest"].messages))
        self.assertTrue(all(any(t.encode() in m.data for m in self.peers["dest"].messages)
                            for t in tokens))
        directory = store.directory_of(self.mta.spool)

        def counted():
            day = store.list_days(directory)
            counts = store.load_day(directory, day[-1]) if day else None
            return counts is not None and f"dest.{ZONE}" in counts.domains and \
                sum(c.successes for c in counts.counts(f"dest.{ZONE}")) == 3
        wait_for(counted, TIMEOUT, lambda: f"3 sessions counted; {self.mta.describe()}")

        # an ordinary message to the rua domain: its MTA-STS policy holds it back
        held = send(self.mta, f"someone@reports.{ZONE}", "held back")
        decision = wait_for(lambda: [e for e in events(self.mta)
                                     if e.get("event") == "outbound.tls_decision"
                                     and e.get("kind") == "certificate-untrusted"], TIMEOUT,
                            lambda: f"a TLS decision for reports.{ZONE}; {self.mta.describe()}")
        self.assertEqual((decision[0]["action"], decision[0]["policy"]), ("defer", "mta-sts"))

        out = cli_ok(self.mta, "tls", "report", "send", "--now", f"dest.{ZONE}")
        self.assertIn("the running MTA sends today's TLS reports for dest.rpt.test", out)

        # by mail: through our queue and outbound leg to the rua domain's MX
        def mailed():
            return [f for f in message_files(self.report_maildir)
                    if b"TLS-Report-Domain: dest.rpt.test" in open(f, "rb").read()]
        (path,) = wait_for(mailed, TIMEOUT, lambda: f"a report in {self.report_maildir}; "
                           f"{self.mta.describe()}\n{self.postfix.describe()}")
        with open(path, "rb") as f:
            data = f.read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.assertFalse([f for f in message_files(self.report_maildir)
                          if held.encode() in open(f, "rb").read()])
        self.assertTrue(dkim.verify(data, dnsfunc=self.nsd.txt, tlsrpt="strict"),
                        data[:2000].decode(errors="replace"))
        msg = email.message_from_bytes(data, policy=email.policy.default)
        self.assertEqual(msg["Delivered-To"], f"tlsrpt@reports.{ZONE}")
        self.assertEqual(msg["Return-Path"], "<>")  # from the null reverse-path
        self.assertIn("(using TLS", msg["Received"])  # STARTTLS still used
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "tlsrpt")
        self.assertEqual(msg["TLS-Report-Submitter"], f"sender.{ZONE}")
        self.assertEqual(msg["TLS-Required"], "No")
        self.assertEqual(msg["From"], f"tlsrpt-noreply@sender.{ZONE}")
        _, attachment = msg.get_payload()
        self.assertEqual(attachment.get_content_type(), "application/tlsrpt+gzip")
        name = attachment.get_filename()
        self.assertRegex(name, r"^sender\.rpt\.test!dest\.rpt\.test!\d+!\d+!T\d{6}Z\.json\.gz$")
        mailed_report = json.loads(gzip.decompress(attachment.get_content()))
        self.assertEqual(mailed_report["organization-name"], "Interop Sender")
        self.assertEqual(mailed_report["contact-info"], f"tlsrpt@sender.{ZONE}")
        (policy,) = mailed_report["policies"]
        self.assertEqual(policy["policy"]["policy-domain"], f"dest.{ZONE}")
        self.assertEqual(policy["summary"], {"total-successful-session-count": 3,
                                             "total-failure-session-count": 0})
        self.assertIn(f"Report-ID: <{mailed_report['report-id']}>", msg["Subject"])
        # an independent parser (parsedmarc) accepts the delivered mail as it lies
        # in the Maildir and reads back what we sent
        with open(path, "rb") as f:
            read = read_mail(f.read())
        assert_reads(self, read, mailed_report)
        self.assertEqual((read["organization_name"], read["policies"][0]["policy_domain"],
                          read["policies"][0]["successful_session_count"]),
                         ("Interop Sender", f"dest.{ZONE}", 3))

        # by HTTPS: the same report, POSTed to the collector
        def posted():
            return sorted(n for n in os.listdir(self.collected) if n.endswith(".json"))
        (first,) = wait_for(posted, TIMEOUT, lambda: f"a POST at the collector; "
                            f"{self.mta.describe()}")
        with open(os.path.join(self.collected, first)) as f:
            post = json.load(f)
        self.assertEqual(post["path"], "/v1/tlsrpt")
        self.assertEqual(post["content_type"], "application/tlsrpt+gzip")
        self.assertEqual(json.loads(gzip.decompress(base64.b64decode(post["body"]))),
                         mailed_report)
        assert_reads(self, read_file(base64.b64decode(post["body"])), mailed_report)

        # each logged, with the report id; the day is not marked (--now)
        sent = wait_for(lambda: len([e for e in events(self.mta)
                                     if e.get("event") == "tlsrpt.sent"]) == 2 and
                        [e for e in events(self.mta) if e.get("event") == "tlsrpt.sent"],
                        TIMEOUT, lambda: f"two tlsrpt.sent events; {self.mta.describe()}")
        self.assertEqual(sorted(e["rua"] for e in sent), [
            f"https://collector.{ZONE}:{self.https_port}/v1/tlsrpt",
            f"mailto:tlsrpt@reports.{ZONE}"])
        self.assertEqual({e["report_id"] for e in sent}, {mailed_report["report-id"]})
        today = store.list_days(directory)[-1]
        self.assertEqual(store.sent_domains(directory, today), set())
        # the report's own session is not counted; the held message's failure is
        def reports_counts():
            counts = store.load_day(directory, today).counts(f"reports.{ZONE}")
            return (sum(c.successes for c in counts), sum(c.failures for c in counts))
        wait_for(lambda: reports_counts() == (0, 1), 5,
                 lambda: f"(successes, failures) for reports.{ZONE}: {reports_counts()}")
        required_no = [e for e in events(self.mta) if e.get("event") == "outbound.tls_required_no"]
        self.assertEqual([e["domain"] for e in required_no], [f"reports.{ZONE}"])
