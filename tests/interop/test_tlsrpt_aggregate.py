"""
TLS reporting's counting (RFC 8460), end to end: our MTA (C{twistd -n
mta}) with C{[tlsrpt] enabled} delivers by MX (a private nsd) to real
servers on loopback, and C{twisted-mta tls report show --json} reads
back what it counted:

- a real Postfix with STARTTLS: every session a success, no policy
  published (L{PostfixReportTests});
- scripted peers doing real STARTTLS, behind MTA-STS policies fetched
  over real HTTPS: a success and an expired certificate under an
  enforced policy, a testing policy's verdict while mail flows, a server
  without STARTTLS under no policy (L{PolicyReportTests});
- the crash test: SIGKILL at random instants while sessions are counted;
  after each restart every day file parses, the counts never go down and
  lag the sessions the peer saw by at most about a second
  (L{CrashTests}).

Nothing leaves the machine: DNS is the private nsd, every server listens
on 127.0.0.0/8.
"""

from __future__ import annotations

import datetime
import http.server
import json
import os
import random
import smtplib
import ssl
import threading
import time

import trustme
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, shared_nsd, zone
from tests.interop.support import (
    LOOPBACK, MTAProcess, free_port, make_message, make_tempdir, postfix_unavailable,
    wait_for,
)
from tests.interop.test_operate import cli_ok, send
from tests.interop.tls_peers import ScriptedPeer, free_port_on_all
from tests.tlsrpt.schema import validate
from twisted_mta.tlsrpt import store

TIMEOUT = 30.0
TLSRPT = ('[tlsrpt]\nenabled = true\norganization_name = "Interop Test"\n'
          'contact_info = "mailto:tlsrpt@mta.example.test"\n')


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def report_of(mta: MTAProcess, domain: str) -> dict | None:
    """
    The report tls report show --json gives for C{domain} today (None
    when nothing is counted yet).
    """
    out = json.loads(cli_ok(mta, "tls", "report", "show", domain, "--json"))
    return out or None


def summary(report: dict) -> dict[str, tuple[int, int]]:
    """
    policy-type -> (successes, failures) of a report.
    """
    out = {}
    for p in report["policies"]:
        s = p["summary"]
        out[p["policy"]["policy-type"]] = (s["total-successful-session-count"],
                                           s["total-failure-session-count"])
    return out


def wait_report(mta: MTAProcess, domain: str, done) -> dict:
    """
    Wait until C{domain}'s report satisfies C{done}; the report.
    """
    last = {}

    def ready():
        last["report"] = report_of(mta, domain)
        return last["report"] if last["report"] and done(last["report"]) else None
    return wait_for(ready, TIMEOUT, lambda: f"report of {domain}: {last.get('report')}; "
                    f"{mta.describe()}", interval=0.2)


# -- a real Postfix ----------------------------------------------------------------------

class PostfixReportTests(SynchronousTestCase):
    """
    Three messages to a real Postfix that offers STARTTLS, each in a
    session of its own: three successful sessions, no policy published.
    """

    def setUp(self) -> None:
        why = postfix_unavailable()
        if why:
            from twisted.trial.unittest import SkipTest
            raise SkipTest(why)
        from tests.interop.test_outbound import (
            PEER_HOSTNAME, ZONES, OutboundToPostfixTests, free_port_on_both,
        )
        self.nsd = shared_nsd(self, "outbound", ZONES)
        self.port = free_port_on_both()
        self.postfix = OutboundToPostfixTests._start_postfix(self)
        self.peer_hostname = PEER_HOSTNAME
        tmp = make_tempdir(self, "mta")
        extra = (
            f'[dns]\nnameservers = ["{self.nsd.address}"]\ntimeout = "5s"\n'
            f'\n[outbound]\nport = {self.port}\nmessages_per_connection = 1\n'
            '\n[relay]\ntrusted_networks = ["127.0.0.0/8"]\n'
            '\n[queue]\nretry_schedule = ["1h"]\njitter = 0\ndelay_warning = false\n\n'
            + TLSRPT)
        self.mta = MTAProcess(tmp, extra, port=self.port, workers=0)
        self.addCleanup(self.mta.cleanup)
        self.mta.start()

    def test_sessions_counted(self) -> None:
        for i in range(3):
            send(self.mta, "bob@good.test", f"report {i}")
        report = wait_report(self.mta, "good.test",
                             lambda r: sum(map(sum, summary(r).values())) >= 3)
        validate(self, report)
        self.assertEqual(summary(report), {"no-policy-found": (3, 0)})
        self.assertEqual(report["policies"][0]["policy"], {
            "policy-type": "no-policy-found", "policy-domain": "good.test"})
        self.assertEqual((report["organization-name"], report["contact-info"]),
                         ("Interop Test", "tlsrpt@mta.example.test"))
        words = cli_ok(self.mta, "tls", "report", "show")
        self.assertIn(f"good.test, {today()}: 3 sessions, none failed", words)
        # a clean stop writes what it counted; a restart goes on from there
        self.mta.stop()
        counts = store.load_day(os.path.join(self.mta.spool, "tlsrpt"), today())
        [c] = counts.counts("good.test")
        self.assertEqual((c.successes, c.failures), (3, 0))


# -- MTA-STS policies and scripted peers ---------------------------------------------------

ZONE = "rpt.test"
GOOD, EXPIRED, PLAIN = "127.0.79.2", "127.0.79.3", "127.0.79.4"
POLICY_ADDRESS = "127.0.79.10"
# domain -> (MX host, MTA-STS policy (mode, mx) or None)
DOMAINS = {
    "sts-ok": ("mx-good", ("enforce", ["mx-good.rpt.test"])),
    "sts-expired": ("mx-expired", ("enforce", ["*.rpt.test"])),
    "sts-testing": ("mx-plain", ("testing", ["mx-plain.rpt.test"])),
    "nopolicy": ("mx-plain", None),
}


def sts_lines(mode: str, mx: list[str]) -> list[str]:
    return ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]


class PolicyHost:
    """The policies of L{DOMAINS} over HTTPS at mta-sts.<domain>."""

    def __init__(self, port: int, certificate: trustme.LeafCert) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = (self.headers.get("Host") or "").split(":")[0]
                domain = name.removeprefix("mta-sts.").removesuffix("." + ZONE)
                policy = DOMAINS.get(domain, (None, None))[1]
                body = ("\r\n".join(sts_lines(*policy)) + "\r\n").encode() if policy else b""
                self.send_response(200 if policy else 404)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        certificate.configure_cert(context)
        self.server = http.server.ThreadingHTTPServer((POLICY_ADDRESS, port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def records() -> list[tuple[str, str, str]]:
    out = [("mx-good", "A", GOOD), ("mx-expired", "A", EXPIRED), ("mx-plain", "A", PLAIN)]
    for domain, (mx, policy) in DOMAINS.items():
        out.append((domain, "MX", f"10 {mx}.{ZONE}."))
        if policy is not None:
            out += [(f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=20261203"'),
                    (f"mta-sts.{domain}", "A", POLICY_ADDRESS)]
    return out


def context_for(certificate: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificate.configure_cert(context)
    return context


class PolicyReportTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_nsd()
        self.tmp = make_tempdir(self, "tlsrpt-policies")
        self.nsd = NSDServer(os.path.join(self.tmp, "nsd"), {ZONE: zone(ZONE, records())})
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        ca = trustme.CA()
        port = free_port_on_all((GOOD, EXPIRED, PLAIN))
        past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=3)
        self.peers = {
            "mx-good": ScriptedPeer(GOOD, port, f"mx-good.{ZONE}", mode="tls",
                                    tls_context=context_for(ca.issue_cert(f"mx-good.{ZONE}"))),
            "mx-expired": ScriptedPeer(EXPIRED, port, f"mx-expired.{ZONE}", mode="tls",
                                       tls_context=context_for(ca.issue_cert(
                                           f"mx-expired.{ZONE}",
                                           not_before=past - datetime.timedelta(days=30),
                                           not_after=past))),
            "mx-plain": ScriptedPeer(PLAIN, port, f"mx-plain.{ZONE}", mode="no-starttls"),
        }
        for peer in self.peers.values():
            self.addCleanup(peer.stop)
        https_port = free_port_on_all((POLICY_ADDRESS,))
        self.policy_host = PolicyHost(https_port, ca.issue_cert(
            *(f"mta-sts.{d}.{ZONE}" for d, (_, p) in DOMAINS.items() if p)))
        self.addCleanup(self.policy_host.stop)
        config = "\n".join([
            "[dns]", f'nameservers = ["{self.nsd.address}"]', "",
            "[outbound]", f"port = {port}", 'connect_timeout = "5s"', "",
            "[outbound.tls]", 'policy = "opportunistic"', 'ca_file = "ca.pem"',
            "dane = false", 'sts_ca_file = "ca.pem"', f"sts_port = {https_port}",
            'sts_fetch_timeout = "5s"', "",
            "[relay]", 'trusted_networks = ["127.0.0.0/8"]', "",
            '[queue]\nretry_schedule = ["1h"]\njitter = 0\ndelay_warning = false\n',
            TLSRPT,
        ])
        self.mta = MTAProcess(os.path.join(self.tmp, "mta"), config, port=free_port(),
                              workers=0)
        with open(os.path.join(self.mta.tmpdir, "ca.pem"), "wb") as f:
            f.write(ca.cert_pem.bytes())
        self.addCleanup(self.mta.cleanup)
        self.mta.start()

    def test_policies_counted(self) -> None:
        for domain in DOMAINS:
            send(self.mta, f"user@{domain}.{ZONE}", domain)
        total = lambda r: sum(map(sum, summary(r).values())) >= 1  # noqa: E731
        reports = {d: wait_report(self.mta, f"{d}.{ZONE}", total) for d in DOMAINS}
        for r in reports.values():
            validate(self, r)

        # enforce, the listed host with a good certificate: one success
        ok = reports["sts-ok"]["policies"]
        self.assertEqual([(p["policy"]["policy-type"], p["policy"]["policy-string"],
                           p["policy"]["mx-host"], p["summary"]["total-successful-session-count"],
                           p["summary"]["total-failure-session-count"]) for p in ok],
                         [("sts", sts_lines("enforce", ["mx-good.rpt.test"]),
                           ["mx-good.rpt.test"], 1, 0)])

        # enforce, an expired certificate: a failure with the details
        [p] = reports["sts-expired"]["policies"]
        self.assertEqual(p["policy"]["policy-type"], "sts")
        [detail] = p["failure-details"]
        self.assertEqual(detail, {
            "result-type": "certificate-expired", "sending-mta-ip": LOOPBACK,
            "receiving-mx-hostname": f"mx-expired.{ZONE}",
            "receiving-mx-helo": f"mx-expired.{ZONE}", "receiving-ip": EXPIRED,
            "failed-session-count": 1, "failure-reason-code": "certificate-expired"})
        self.assertEqual(self.peers["mx-expired"].messages, [])

        # testing: delivered in cleartext; the verdict is the failure counted
        wait_for(lambda: self.peers["mx-plain"].received_for(f"user@sts-testing.{ZONE}"),
                 TIMEOUT, "sts-testing not delivered")
        [p] = reports["sts-testing"]["policies"]
        self.assertEqual((p["policy"]["policy-string"][1], p["summary"]),
                         ("mode: testing", {"total-successful-session-count": 0,
                                            "total-failure-session-count": 1}))
        self.assertEqual(p["failure-details"][0]["result-type"], "starttls-not-supported")

        # no policy, no STARTTLS: a failure under no-policy-found
        self.assertEqual(summary(reports["nopolicy"]), {"no-policy-found": (0, 1)})
        self.assertEqual(reports["nopolicy"]["policies"][0]["failure-details"][0][
            "failure-reason-code"], "starttls-not-offered")


# -- the crash test ------------------------------------------------------------------------

CRASH_ZONE = "crash.test"
CRASH_PEER = "127.0.79.20"
KILLS = 20


class Sender(threading.Thread):
    """
    Submits messages to the MTA for as long as it runs, reconnecting
    while the MTA is down.
    """

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                with smtplib.SMTP(LOOPBACK, self.port, timeout=5,
                                  local_hostname="client.example.test") as client:
                    while not self.stopping.is_set():
                        client.sendmail("a@client.example.test", [f"u@{CRASH_ZONE}"],
                                        make_message(str(self.sent), sender="a@client.test",
                                                     recipient=f"u@{CRASH_ZONE}"))
                        self.sent += 1
                        time.sleep(0.01)
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)


class CrashTests(SynchronousTestCase):
    """
    SIGKILL at random instants while sessions are counted: after each
    kill every day file parses (the writes are atomic), and the counts
    never go down and hold every session whose message the peer had more
    than a second and a half before the kill (at most a second of counts
    is lost; the half second is the write's own time on a loaded machine),
    less what earlier kills may have lost the same way.
    """

    def setUp(self) -> None:
        require_nsd()
        self.tmp = make_tempdir(self, "tlsrpt-crash")
        self.nsd = NSDServer(os.path.join(self.tmp, "nsd"), {CRASH_ZONE: zone(CRASH_ZONE, [
            ("@", "MX", f"10 mx.{CRASH_ZONE}."), ("mx", "A", CRASH_PEER)])})
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        port = free_port_on_all((CRASH_PEER,))
        ca = trustme.CA()
        self.peer = ScriptedPeer(CRASH_PEER, port, f"mx.{CRASH_ZONE}", mode="tls",
                                 tls_context=context_for(ca.issue_cert(f"mx.{CRASH_ZONE}")))
        self.addCleanup(self.peer.stop)
        config = (f'[dns]\nnameservers = ["{self.nsd.address}"]\ntimeout = "5s"\n'
                  f'\n[outbound]\nport = {port}\nmessages_per_connection = 1\n'
                  '\n[relay]\ntrusted_networks = ["127.0.0.0/8"]\n'
                  '\n[queue]\nretry_schedule = ["1s"]\njitter = 0\ndelay_warning = false\n\n'
                  + TLSRPT)
        self.mta = MTAProcess(os.path.join(self.tmp, "mta"), config, port=free_port(),
                              workers=0)
        self.addCleanup(self.mta.cleanup)
        self.directory = os.path.join(self.mta.spool, "tlsrpt")

    def counted(self) -> int:
        total = 0
        for day in store.list_days(self.directory):  # every file must parse
            counts = store.load_day(self.directory, day)
            for c in counts.counts(CRASH_ZONE):
                total += c.successes + c.failures
        return total

    def test_sigkill_while_counting(self) -> None:
        rng = random.Random()
        sender = Sender(self.mta.port)
        sender.start()
        self.addCleanup(sender.stopping.set)
        samples: list[tuple[float, int]] = []
        previous = 0
        allowance = 0  # what earlier kills may have lost: their last 1.5 s of messages
        self.mta.start()
        for kill in range(KILLS):
            deadline = time.monotonic() + rng.uniform(1.0, 3.0)
            while time.monotonic() < deadline:
                samples.append((time.monotonic(), len(self.peer.messages)))
                time.sleep(0.05)
            killed_at = time.monotonic()
            self.mta.kill()
            at_kill = len(self.peer.messages)
            seen_before = max((n for t, n in samples if t <= killed_at - 1.5), default=0)
            now = self.counted()
            self.assertGreaterEqual(now, previous, f"kill {kill}: the counts went down")
            # each delivered message had a session of its own, counted when it began
            self.assertGreaterEqual(now + allowance, seen_before,
                                    f"kill {kill}: {now} counted on disk (+{allowance} that "
                                    f"earlier kills may have lost), but the peer had "
                                    f"{seen_before} messages 1.5 s before the kill")
            allowance += at_kill - seen_before
            previous = now
            self.mta.start()
        sender.stopping.set()
        self.assertGreater(previous, KILLS, "too few sessions to mean anything")
        self.assertEqual([n for n in os.listdir(self.directory) if "damaged" in n], [])
