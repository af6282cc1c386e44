"""
The DANE interop matrix (issue 12): the cases of L{tests.interop.dane_cases}
delivered side by side by Postfix's own DANE client and by our MTA, through
the same validating resolver, to the same servers, and the two verdicts
per case set against what RFC 7672 asks.

What runs, all on loopback:

  - nsd serving the cases' zones, signed at test time (L{DNSSECWorld});
  - unbound validating them, on C{127.0.53.N:53} (port 53: the libc
    resolver Postfix uses has no port setting), forwarding every query to
    that nsd (the SERVFAIL case's TLSA name to L{ServfailServer}), never
    to the root servers;
  - the servers: one private Postfix with an smtpd per case on
    C{127.0.3.10+:P}, each presenting the case's certificate
    (L{DanePeers});
  - Postfix's client (L{PostfixDaneClient}): a private Postfix with
    C{smtp_tls_security_level = dane}, C{smtp_dns_support_level =
    dnssec}, C{smtp_tcp_port = P}, started in a private mount namespace
    (C{unshare --mount}) where C{/etc/resolv.conf} is a bind mount naming
    that unbound with C{options trust-ad} (glibc 2.31 and later pass the
    AD bit on only with it, or when the program sets C{RES_TRUSTAD}, as
    Postfix 3.7 does: belt and braces).  The machine's own resolv.conf is
    not touched;
  - our MTA with C{[dns] nameservers} the same unbound, C{[outbound] port
    = P} and C{[outbound.tls] dane = true}.

Each client gets one message for every case (C{postfix@} and C{ours@} the
case domain), sent once; nothing is retried.  C{MatrixRun().run()} returns
both verdicts per case, and L{render_doc} makes docs/dane-matrix.md from
the run.

Blocking and reactor-free like the rest of C{tests.interop}.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import email
import email.policy
import json
import os
import re
import shutil
import smtplib
import socket
import socketserver
import subprocess
import sys
import threading
import time
import uuid

import attrs
import dns.message
import dns.rcode

from tests.interop import dane_cases as dc
from tests.interop.dane_cases import (
    BOUNCED, CASES, CLEARTEXT, DEFERRED, ENCRYPTED, MISSING, ORIGIN, VERIFIED, Case,
)
from tests.interop.dns import free_udp_tcp_port
from tests.interop.dnssec import DNSSECWorld
from tests.interop.support import (
    EVENTS_FILE, LOOPBACK, ONE_ATTEMPT_JSON_LOG, POSTFIX, MTAProcess, PostfixInstance,
    WorkDirs, free_port, json_lines, make_message, message_files, stop_each, subprocess_env,
    wait_for,
)
from tests.interop.tls_peers import free_port_on_all, virtual_delivery

UNSHARE = shutil.which("unshare")
SENDER = "alice@example.test"
SETTLE_TIMEOUT = 60.0
KEEP_ENV = "TWISTED_MTA_DANE_MATRIX_KEEP"
# The cases `tls explain` is asked about (each run costs seconds: a Python
# start-up, the look-ups and a probe session): a DANE match, an RRset with
# no usable record, and an unsigned zone.
EXPLAINED = ("ee-311", "unusable", "unsigned")
DETAIL_WIDTH = 110  # characters of a verdict's words in the document


def postfix_version() -> str:
    try:
        out = subprocess.run([shutil.which("postconf") or "/usr/sbin/postconf", "-d", "-h",
                              "mail_version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


# -- DNS: the resolver's address, and a server that fails every query -------------------


def port_53_address() -> str:
    """
    A loopback address, C{127.0.53.N}, whose port 53 was free on UDP and
    TCP a moment ago: where Postfix's libc resolver can reach unbound.
    """
    for n in range(1, 100):
        host = f"127.0.53.{n}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, \
                    socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                udp.bind((host, 53))
                tcp.bind((host, 53))
            return host
        except OSError:
            continue
    raise AssertionError("port 53 is taken on 127.0.53.1-99")


class ServfailServer:
    """
    A DNS server on C{127.0.0.1:port} (UDP and TCP) that answers every
    query with SERVFAIL: a broken authoritative server, for the TLSA
    lookup that fails without being bogus.
    """

    def __init__(self) -> None:
        self.port = free_udp_tcp_port()
        self.queries = 0
        outer = self

        def answer(wire: bytes) -> bytes:
            outer.queries += 1
            response = dns.message.make_response(dns.message.from_wire(wire))
            response.set_rcode(dns.rcode.SERVFAIL)
            return response.to_wire()

        class UDP(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                sock.sendto(answer(data), self.client_address)

        class TCP(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                size = self.rfile.read(2)
                if len(size) == 2:
                    reply = answer(self.rfile.read(int.from_bytes(size, "big")))
                    self.wfile.write(len(reply).to_bytes(2, "big") + reply)

        self.servers = [socketserver.ThreadingUDPServer((LOOPBACK, self.port), UDP),
                        socketserver.ThreadingTCPServer((LOOPBACK, self.port), TCP)]
        for server in self.servers:
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True,
                             name="dns servfail").start()

    @property
    def upstream(self) -> str:
        return f"{LOOPBACK}@{self.port}"

    def stop(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()


# -- the servers ---------------------------------------------------------------------------


class DanePeers(PostfixInstance):
    """
    One private Postfix with an smtpd per case on the case's address and
    C{port}, presenting the case's certificate (STARTTLS off where the
    case says so).  Mail for C{recipients} is stored by virtual(8) in
    C{<vmail>/<domain>/<local part>/}; the Received header says whether
    the session used TLS.
    """

    hostname = f"peers.{ORIGIN}"

    def __init__(self, base: str, port: int, creds: dc.Credentials, recipients: list[str],
                 cases=CASES) -> None:
        self.vmail, delivery = virtual_delivery(base, recipients)
        domains = sorted({r.partition("@")[2].lower() for r in recipients})
        first = creds.servers[cases[0].name]
        main = {
            "virtual_mailbox_domains": " ".join(domains),
            **delivery,
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": first.cert,
            "smtpd_tls_key_file": first.key,
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "in_flow_delay": "0",
            "notify_classes": "",
        }
        super().__init__(base, None, main, smtpd_port=free_port())
        lines = []
        for case in cases:
            c = creds.servers[case.name]
            opts = [f"myhostname={case.expanded_host}", f"smtpd_tls_cert_file={c.cert}",
                    f"smtpd_tls_key_file={c.key}"]
            if not case.starttls:
                opts.append("smtpd_tls_security_level=none")
            lines.append(f"{dc.address_for(case)}:{port} inet n - n - - smtpd "
                         + " ".join(f"-o {o}" for o in opts))
        with open(os.path.join(self.conf, "master.cf"), "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def maildir(self, address: str) -> str:
        local, _, domain = address.lower().partition("@")
        return os.path.join(self.vmail, domain, local)


# -- Postfix's DANE client --------------------------------------------------------------------


def unshare_unavailable() -> str | None:
    """Why Postfix cannot get a private resolv.conf here, or None."""
    if UNSHARE is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run([UNSHARE, "--mount", "--", "true"], capture_output=True, text=True,
                           timeout=10)
    if probe.returncode != 0:
        return f"unshare --mount fails here: {probe.stderr.strip()}"
    return None


class PostfixDaneClient(PostfixInstance):
    """
    A private Postfix that delivers by MX under DANE: C{smtp_tls_security_level
    = dane}, C{smtp_dns_support_level = dnssec}, every connection to
    C{port} (C{smtp_tcp_port}: the TLSA records are then under
    C{_<port>._tcp}), its TLS sessions logged (C{smtp_tls_loglevel = 1}).
    Its master runs in a mount namespace of its own where
    C{/etc/resolv.conf} names C{resolver_host} (port 53) and trusts its AD
    bit; a message submitted to its smtpd on 127.0.0.1 is relayed (the
    client's network is C{mynetworks}).
    """

    hostname = f"postfix-client.{ORIGIN}"

    def __init__(self, base: str, port: int, resolver_host: str) -> None:
        main = {
            "smtp_dns_support_level": "dnssec",
            "smtp_host_lookup": "dns",
            "smtp_tls_security_level": "dane",
            "smtp_tcp_port": str(port),
            "smtp_tls_loglevel": "1",
            "smtp_address_preference": "ipv4",
            # The default probe asks for the root's NS, which this world has
            # not got: ask for the test zone's, which validates.
            "dnssec_probe": f"ns:{ORIGIN}",
            "smtp_connect_timeout": "5s",
            "smtp_helo_timeout": "15s",
            "smtp_starttls_timeout": "15s",
            "notify_classes": "",
        }
        super().__init__(base, None, main)
        self.resolver_host = resolver_host
        self.resolv_conf = os.path.join(self.base, "resolv.conf")
        with open(self.resolv_conf, "w", encoding="ascii") as f:
            f.write(self.resolv_conf_text)

    @property
    def resolv_conf_text(self) -> str:
        return f"nameserver {self.resolver_host}\noptions trust-ad timeout:5 attempts:1\n"

    def _postfix(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        if command != "start":  # stop, reload: signals to the master, from anywhere
            return super()._postfix(command, timeout)
        # The bind mount exists only in the new namespace (unshare makes its
        # mounts private), which the master and every child it starts share.
        script = 'mount --bind "$1" /etc/resolv.conf && exec "$2" -c "$3" start'
        return subprocess.run([UNSHARE, "--mount", "--propagation", "private", "--",
                               "sh", "-c", script, "sh", self.resolv_conf, POSTFIX, self.conf],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors="replace",
                              timeout=timeout)

    def resolv_conf_seen(self) -> str | None:
        """The resolv.conf the running master sees (through /proc), or None."""
        pid = self.master_pid or self._read_master_pid()
        try:
            with open(f"/proc/{pid}/root/etc/resolv.conf", encoding="ascii",
                      errors="replace") as f:
                return f.read()
        except (OSError, TypeError):
            return None


# -- verdicts ------------------------------------------------------------------------------


@attrs.frozen
class Verdict:
    """
    What one client did with one case's message: its class (L{VERIFIED},
    L{ENCRYPTED}, L{CLEARTEXT}, L{DEFERRED}, L{BOUNCED}, L{MISSING}) and
    the client's own words for it (TLS trust and version, or why it
    deferred).  C{kind}: our failure class for a deferral.
    """

    status: str
    detail: str = ""
    kind: str | None = None
    facts: dict = attrs.field(factory=dict, eq=False)

    def words(self) -> str:
        return f"{self.status} ({self.detail})" if self.detail else self.status


POSTFIX_LINE = re.compile(r"postfix/(?P<service>[\w/-]+)\[(?P<pid>\d+)\]: (?P<text>.*)$")
POSTFIX_STATUS = re.compile(
    r"^\w+: to=<(?P<rcpt>[^>]+)>, relay=(?P<relay>\S+), .*?status=(?P<status>\w+) "
    r"\((?P<why>.*)\)$")
POSTFIX_TLS = re.compile(
    r"^(?P<trust>Verified|Trusted|Untrusted|Anonymous) TLS connection established to "
    r"(?P<peer>\S+?): (?P<version>\S+) with cipher (?P<cipher>\S+)")


def postfix_verdicts(maillog: str, recipients: dict[str, Case]) -> dict[str, Verdict]:
    """
    Each case's verdict (by case name) from the client's log: the last
    delivery status of the case's recipient, and for a message sent, the
    TLS session the same smtp process opened to the same server before
    it (none: cleartext).  A deferral's words are Postfix's.
    """
    sessions: dict[tuple[str, str], re.Match] = {}  # (pid, server) -> its TLS line
    out: dict[str, Verdict] = {}
    for line in maillog.splitlines():
        m = POSTFIX_LINE.search(line)
        if not m:
            continue
        pid, text = m.group("pid"), m.group("text")
        tls = POSTFIX_TLS.match(text)
        if tls:
            sessions[(pid, tls.group("peer"))] = tls
            continue
        st = POSTFIX_STATUS.match(text)
        if not st or st.group("rcpt").lower() not in recipients:
            continue
        case = recipients[st.group("rcpt").lower()]
        status, why, relay = st.group("status"), st.group("why"), st.group("relay")
        facts = {"relay": relay, "status": status, "why": why}
        if status == "sent":
            session = sessions.pop((pid, relay), None)
            if session is None:
                out[case.name] = Verdict(CLEARTEXT, "no TLS", facts=facts)
                continue
            trust, version = session.group("trust"), session.group("version")
            facts.update(trust=trust, version=version, cipher=session.group("cipher"))
            out[case.name] = Verdict(VERIFIED if trust == "Verified" else ENCRYPTED,
                                     f"{trust} TLS, {version}", facts=facts)
        elif status == "deferred":
            out[case.name] = Verdict(DEFERRED, why, facts=facts)
        else:
            out[case.name] = Verdict(BOUNCED if status == "bounced" else status, why,
                                     facts=facts)
    return out


# -- our side --------------------------------------------------------------------------------

TRACE_HEADER = "X-Twisted-MTA-TLS"


def _destination(event: dict) -> str:
    key = str(event.get("destination") or "").lower()
    return key[1:].partition("]")[0] if key.startswith("[") else key


def our_verdicts(events: list[dict], stored: dict[str, list[email.message.Message]],
                 recipients: dict[str, Case],
                 outcomes: dict[str, dict] | None = None) -> dict[str, Verdict]:
    """
    Each case's verdict from our MTA's JSON log: the recipient's
    C{delivery.*} event; for a delivery, the C{outbound.connected} event
    of the session (authenticated when it says DANE matched, or that the
    certificate verified); for a deferral, the C{outbound.tls_decision}
    event's class, or when no TLS decision was taken (a failed MX lookup)
    the class of the recipient's outcome in the queue (C{outcomes}, by
    address).  The copies the servers stored are kept in the facts.
    """
    outcomes = outcomes or {}
    results: dict[str, dict] = {}
    connected: dict[str, list[dict]] = {}
    decisions: dict[str, list[dict]] = {}
    for ev in events:
        name = ev.get("event")
        if name in ("delivery.delivered", "delivery.deferred", "delivery.failed"):
            rcpt = str(ev.get("rcpt", "")).lower()
            if rcpt in recipients:
                results.setdefault(rcpt, ev)
        elif name == "outbound.connected":
            connected.setdefault(_destination(ev), []).append(ev)
        elif name == "outbound.tls_decision":
            decisions.setdefault(_destination(ev), []).append(ev)
    out: dict[str, Verdict] = {}
    for rcpt, case in recipients.items():
        ev = results.get(rcpt)
        sessions = connected.get(case.domain, [])
        decided = decisions.get(case.domain, [])
        copies = stored.get(rcpt, [])
        facts = {"result": ev, "connected": sessions, "decisions": decided,
                 "traces": [" ".join(str(c.get(TRACE_HEADER) or "").split()) for c in copies]}
        if ev is None:
            out[case.name] = Verdict(MISSING, "no delivery event", facts=facts)
        elif ev["event"] == "delivery.delivered":
            session = sessions[-1] if sessions else {}
            version = session.get("version") if session.get("tls") != "no TLS" else None
            dane = session.get("dane")
            words = [f"source {session.get('source')}", f"dane {dane}"] if "source" in session \
                else []
            if not version:
                out[case.name] = Verdict(CLEARTEXT, ", ".join(["no TLS"] + words), facts=facts)
            elif dane == "matched" or session.get("verified"):
                out[case.name] = Verdict(VERIFIED, ", ".join([f"verified, {version}"] + words),
                                         facts=facts)
            else:
                out[case.name] = Verdict(ENCRYPTED,
                                         ", ".join([f"not verified, {version}"] + words),
                                         facts=facts)
        elif ev["event"] == "delivery.deferred":
            outcome = outcomes.get(rcpt) or {}
            kind = decided[-1].get("kind") if decided else outcome.get("kind")
            detail = decided[-1].get("detail") if decided else None
            words = str(kind or ev.get("reply", ""))
            if detail and kind:
                words += f": {detail}"
            elif not decided:
                words += f": {ev.get('reply', '')}"
            out[case.name] = Verdict(DEFERRED, words, kind=kind, facts=facts)
        else:
            out[case.name] = Verdict(BOUNCED, str(ev.get("reply", "")), facts=facts)
    return out


# -- one run ----------------------------------------------------------------------------------


class MatrixRun:
    """
    Start the DNS, the servers and both clients, send each client one
    message for every case, wait until each recipient has a verdict, and
    record both columns (L{postfix}, L{ours}).  Every process is stopped
    at the end.
    """

    def __init__(self, cases=CASES) -> None:
        self.cases = tuple(cases)
        self.postfix_rcpt = {f"postfix@{c.domain}": c for c in self.cases}
        self.our_rcpt = {f"ours@{c.domain}": c for c in self.cases}
        self.postfix: dict[str, Verdict] = {}
        self.ours: dict[str, Verdict] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.work = WorkDirs("danematrix", KEEP_ENV)
        self.settled: dict[str, bool] = {}
        self.world = self.peers = self.client = self.mta = self.servfail = None
        self.resolv_conf_seen: str | None = None
        self.host_resolv_conf: tuple[str, str] | None = None
        self.tls_explain: dict[str, dict] = {}
        self.postfix_maillog = ""
        self.events: list[dict] = []

    def run(self) -> "MatrixRun":
        t0 = time.monotonic()
        self.host_resolv_conf = (_read("/etc/resolv.conf"), "")
        try:
            self._set_up()
            self.timings["set-up"] = time.monotonic() - t0
            t1 = time.monotonic()
            self._submit()
            self.settled["Postfix"] = self._settle(self._postfix_done)
            self.settled["twisted-mta"] = self._settle(self._ours_done)
            # The servers store what they accepted a moment after their 250.
            self.settled["the servers"] = self._settle(self._stored_all)
            self.timings["deliveries"] = time.monotonic() - t1
            self._collect()
        finally:
            self.host_resolv_conf = (self.host_resolv_conf[0], _read("/etc/resolv.conf"))
            self.timings["total"] = time.monotonic() - t0
            self._stop()
        return self

    def _set_up(self) -> None:
        self.port = free_port_on_all(dc.ADDRESSES)
        certdir = self.work.make("certs", 0o755)
        self.creds = dc.make_credentials(certdir, self.cases)
        self.servfail = ServfailServer()
        self.world = DNSSECWorld(self.work.make("dns"), dc.zones(self.port, self.creds,
                                                                 self.cases))
        self.world.start()
        self.resolver_host = port_53_address()
        self.resolver = self.world.resolver(
            "port53", host=self.resolver_host, port=53,
            forwards={name: self.servfail.upstream
                      for name in dc.servfail_names(self.port, self.cases)})
        self.unbound_conf = _read(self.resolver.conf_path)
        self.peers = DanePeers(self.work.make("peers", 0o755), self.port, self.creds,
                               [*self.postfix_rcpt, *self.our_rcpt], self.cases)
        self.client = PostfixDaneClient(self.work.make("postfix", 0o755), self.port,
                                        self.resolver_host)
        self.mta = self._make_mta()
        # Three slow start-ups (two Postfix masters, one twistd) at once.
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            for started in [pool.submit(p.start) for p in (self.peers, self.client, self.mta)]:
                started.result()
        self.resolv_conf_seen = self.client.resolv_conf_seen()

    def _make_mta(self) -> MTAProcess:
        tmp = self.work.make("mta")
        config = "\n".join([
            "[dns]",
            f'nameservers = ["{self.resolver.address}"]',
            'timeout = "5s"',
            f'dnssec_secure_name = "{dc.CHECK_SECURE}"',
            f'dnssec_bogus_name = "{dc.CHECK_BOGUS}"',
            "",
            "[outbound]",
            f"port = {self.port}",
            'connect_timeout = "5s"',
            'greeting_timeout = "15s"',
            'command_timeout = "15s"',
            'handshake_timeout = "15s"',
            'idle_time = "1s"',
            "",
            "[outbound.tls]",
            "dane = true",
            "mta_sts = false",
            "",
            ONE_ATTEMPT_JSON_LOG,
        ])
        self.events_path = os.path.join(tmp, EVENTS_FILE)
        return MTAProcess(tmp, config, port=free_port())

    def _submit(self) -> None:
        for port, rcpts in ((self.client.smtpd_port, self.postfix_rcpt),
                            (self.mta.port, self.our_rcpt)):
            with smtplib.SMTP(LOOPBACK, port, local_hostname="submit.example.test",
                              timeout=30) as smtp:
                refused = smtp.sendmail(SENDER, list(rcpts), make_message(
                    uuid.uuid4().hex, subject="dane matrix", sender=SENDER,
                    recipient=next(iter(rcpts))))
            if refused:
                raise AssertionError(f"refused at submission: {refused}")

    def _settle(self, done) -> bool:
        try:
            wait_for(done, SETTLE_TIMEOUT, "", interval=0.3)
            return True
        except AssertionError:
            return False

    def _postfix_done(self) -> bool:
        seen = postfix_verdicts(self.client.maillog(), self.postfix_rcpt)
        return len(seen) == len(self.cases)

    def _ours_done(self) -> bool:
        got = {str(ev.get("rcpt", "")).lower() for ev in json_lines(self.events_path)
               if str(ev.get("event", "")).startswith("delivery.")}
        return set(self.our_rcpt) <= got

    def _stored_all(self) -> bool:
        """
        Whether the servers stored a copy for every recipient a client
        says it delivered (none stays queued in the servers' Postfix).
        """
        delivered = (VERIFIED, ENCRYPTED, CLEARTEXT)
        theirs = postfix_verdicts(self.client.maillog(), self.postfix_rcpt)
        sent = {r for r, c in self.postfix_rcpt.items()
                if c.name in theirs and theirs[c.name].status in delivered}
        sent |= {str(ev.get("rcpt", "")).lower() for ev in json_lines(self.events_path)
                 if ev.get("event") == "delivery.delivered"}
        return all(message_files(self.peers.maildir(r)) for r in sent)

    def _stored(self, rcpts) -> dict[str, list[email.message.Message]]:
        out = {}
        for rcpt in rcpts:
            out[rcpt] = []
            for path in message_files(self.peers.maildir(rcpt)):
                with open(path, "rb") as f:
                    out[rcpt].append(email.message_from_bytes(f.read(),
                                                              policy=email.policy.compat32))
        return out

    def _collect(self) -> None:
        self.postfix_maillog = self.client.maillog()
        self.postfix = postfix_verdicts(self.postfix_maillog, self.postfix_rcpt)
        self.events = json_lines(self.events_path)
        self.stored_postfix = self._stored(self.postfix_rcpt)
        self.stored_ours = self._stored(self.our_rcpt)
        self.queue = self._cli("queue", "list", "--json")
        outcomes = {r["address"].lower(): r.get("outcome") or {}
                    for entry in self.queue if isinstance(entry, dict)
                    for r in entry.get("recipients", []) if r.get("state") == "pending"}
        self.ours = our_verdicts(self.events, self.stored_ours, self.our_rcpt, outcomes)
        for case in self.cases:
            self.postfix.setdefault(case.name, Verdict(MISSING, "no delivery status logged"))
        t = time.monotonic()
        explained = [c for c in self.cases if c.name in EXPLAINED]
        with concurrent.futures.ThreadPoolExecutor(len(explained) or 1) as pool:
            answers = pool.map(lambda c: self._cli("tls", "explain", c.domain, "--json"),
                               explained)
            self.tls_explain = dict(zip((c.name for c in explained), answers))
        self.timings["tls explain"] = time.monotonic() - t

    def _cli(self, *args: str):
        """C{twisted-mta ARGS -c <config>}'s JSON output, or C{{"error": ...}}."""
        result = subprocess.run(
            [sys.executable, "-m", "twisted_mta.cli", *args, "-c", self.mta.config_path],
            env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60)
        try:
            return json.loads(result.stdout)
        except ValueError:
            return {"error": f"exit {result.returncode}: {result.stderr.strip()[-400:]}"}

    def _stop(self) -> None:
        self.notes += stop_each(self.mta and self.mta.cleanup, self.client and self.client.stop,
                                self.peers and self.peers.stop, self.world and self.world.stop,
                                self.servfail and self.servfail.stop)
        self.work.finish()

    # -- judging -------------------------------------------------------------------------

    def mismatches(self, side: str) -> list[str]:
        """
        Lines for every case whose verdict on C{side} (C{"postfix"} or
        C{"ours"}) is not the expected one (for our deferrals: the class
        too).
        """
        lines = []
        for case in self.cases:
            if side == "postfix":
                v, want, kind = self.postfix[case.name], case.expected_by_postfix, None
            else:
                v, want, kind = self.ours[case.name], case.expect, case.our_kind
            if v.status != want or (want == DEFERRED and kind and v.kind != kind):
                expected = want + (f" ({kind})" if want == DEFERRED and kind else "")
                lines.append(f"{case.name}: {v.words()}; expected {expected}")
        return lines


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError as e:
        return f"({e})"


# -- the document -----------------------------------------------------------------------------


def _cell(v: Verdict, want: str, kind: str | None = None) -> str:
    text = v.words()
    if len(text) > DETAIL_WIDTH:
        text = text[:DETAIL_WIDTH - 1].rstrip() + "…"
    text = text.replace("|", "\\|")
    if v.status != want or (want == DEFERRED and kind and v.kind != kind):
        text = f"**≠** {text}"
    return text


def render_doc(run: MatrixRun, describe: str) -> str:
    """docs/dane-matrix.md from C{run}; C{describe} names the code that ran."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    version = postfix_version()
    out = [
        "# DANE interop matrix",
        "",
        f"Generated by `scripts/dane-matrix` (`tests/interop/test_dane_matrix.py`) from "
        f"{describe}, {now}. Do not edit by hand: run the script again.",
        "",
        f"Each case is a recipient domain under `{ORIGIN}`, signed at test time (ECDSA "
        "P-256, `ldns-signzone`) and served by a private nsd. One private unbound validates "
        f"it, with `{ORIGIN}` as its only trust anchor, on `{run.resolver_host}:53`, and "
        "forwards every query to that nsd (no root hints, nothing leaves the machine). Both "
        "clients ask that same unbound and deliver one message per case, once, to the same "
        "servers: a private Postfix with one smtpd per case on its own loopback address "
        f"and port {run.port}, presenting the case's certificate. TLSA records are "
        f"published under `_{run.port}._tcp.<host>`.",
        "",
        f"- **Postfix {version}** (Debian): a private instance with "
        "`smtp_tls_security_level = dane`, `smtp_dns_support_level = dnssec`, "
        f"`smtp_tcp_port = {run.port}`, `smtp_tls_loglevel = 1`, the other DANE settings "
        "at their defaults. Its master runs under `unshare --mount` with `/etc/resolv.conf` "
        "bind-mounted to a file naming the unbound with `options trust-ad` (glibc 2.31 and "
        "later pass the AD bit on only with it, or when the program sets `RES_TRUSTAD`, "
        "as this Postfix turned out to do: it validated without the option too); the "
        "machine's own resolv.conf is untouched. Its verdict "
        "is read from its log: the delivery status, and the TLS trust level "
        "(`Verified`, `Trusted`, `Untrusted`, `Anonymous`) of the session before it.",
        "- **twisted-mta**: `[dns] nameservers` that unbound, `[outbound] port = "
        f"{run.port}`, `[outbound.tls] dane = true`, `mta_sts = false`, the default policy "
        "otherwise (opportunistic). Its verdict is read from its JSON log: the "
        "recipient's `delivery.*` event, the `outbound.connected` event of the session "
        "(`source`, `dane`, `verified`), and for a deferral the `outbound.tls_decision` "
        "event's failure class.",
        "",
        "Verdicts: `verified` delivered over TLS with the certificate authenticated by "
        "DANE; `encrypted` delivered over TLS, not authenticated (Postfix's `Trusted`, "
        "a certificate that matched while the server's name was not authenticated, counts "
        "here); `cleartext` delivered "
        "without TLS; `deferred` kept for a later attempt; `missing` nothing within "
        f"{SETTLE_TIMEOUT:g} s. The expected verdict is RFC 7672's (and issue 12's); **≠** "
        "marks a verdict that differs from it.",
        "",
        "| case | published and served | expected | Postfix | twisted-mta |",
        "|---|---|---|---|---|",
    ]
    for case in run.cases:
        served = f"{case.what}; TLSA: {case.tlsa_text}"
        expected = case.expect
        if case.expect == DEFERRED and case.our_kind:
            expected += f" (ours: {case.our_kind})"
        if case.postfix_expect:
            expected += f"; Postfix: {case.postfix_expect} (see below)"
        out.append(f"| `{case.name}` | {served} | {expected} | "
                   f"{_cell(run.postfix[case.name], case.expected_by_postfix)} | "
                   f"{_cell(run.ours[case.name], case.expect, case.our_kind)} |")
    out += ["", "## Differences between the two clients", ""]
    differ = [c for c in run.cases if run.postfix[c.name].status != run.ours[c.name].status]
    if not differ:
        out.append("None: both clients reached the same verdict in every case.")
    for case in differ:
        p, o = run.postfix[case.name], run.ours[case.name]
        why = case.difference or ("**Not explained**: at least one client is not doing "
                                  "what the case expects (see the mismatches below).")
        out.append(f"- `{case.name}`: Postfix {p.status}, twisted-mta {o.status}. {why}")
    out += ["", "## Mismatches with the expectation", ""]
    for side, title in (("postfix", "Postfix"), ("ours", "twisted-mta")):
        lines = run.mismatches(side)
        out.append(f"- {title}: " + ("none" if not lines else f"{len(lines)}"))
        out += [f"  - {line}" for line in lines]
    out += ["", "## Cases", ""]
    for case in run.cases:
        out.append(f"- `{case.name}` (RFC {case.rfc}): {case.what}.")
    out += ["", "## tls explain", "",
            "What `twisted-mta tls explain DOMAIN --json` says decided, for a few cases:", ""]
    for name, report in run.tls_explain.items():
        hosts = report.get("hosts") if isinstance(report, dict) else None
        said = (f"source `{hosts[0].get('source')}`, policy `{hosts[0].get('policy')}`"
                if hosts else f"no answer ({str(report)[:200]})")
        out.append(f"- `{name}`: {said}")
    total = run.timings.get("total", 0)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in run.timings.items() if k != "total")
    out += ["", "## Run", "", f"{len(run.cases)} cases, {total:.1f} s in all ({parts})."]
    for name, ok in run.settled.items():
        if not ok:
            out.append(f"- {name} did not settle within {SETTLE_TIMEOUT:g} s.")
    out += [f"- {n}" for n in run.notes]
    return "\n".join(out) + "\n"
