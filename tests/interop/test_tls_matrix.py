"""
The outbound TLS interop matrix: every TLS peer in L{tests.interop.tls_peers}
(real Postfix smtpd services, and scripted servers that drop the connection,
answer the TLS hello in plain text, or never answer it) under the
C{strict}, C{relaxed} and C{opportunistic} policies with each built-in
fallback decider, and with none written (the policy's default decider:
C{never} for strict and relaxed, C{now} for opportunistic), one message
per cell, all sent at once through one twisted-mta.

After the first attempt each message is either stored by a peer (over TLS,
or in cleartext after a fallback), stored by the secure relay, deferred in
our queue with a TLS failure class, or bounced; strict failures also send
alice (the local sender) an early delay warning.  Then an operator flush
makes every deferred message try again (C{next-attempt} goes to cleartext
then).  The expected result of every cell is computed by L{expected} from
the peers' properties and the documented rules of the policies and
deciders (docs/tls.md), never from observed output, and compared.

The whole matrix runs once per test process (L{matrix}); each test method
checks one aspect of it, so one root cause fails one method.  With
C{TWISTED_MTA_TLS_MATRIX=PATH} in the environment the run also writes the
observed matrix as Markdown to PATH (C{scripts/tls-matrix} does this for
C{docs/tls-matrix.md}); with C{TWISTED_MTA_TLS_MATRIX_KEEP=1} its work
directories are kept and named on stderr.

Addresses: nsd on 127.0.0.1:<its port>; the relay on 127.0.0.9:P and each
peer on 127.0.0.10+:P (C{[outbound] port = P}), the scripted ones included;
our MTA's mx listener on 127.0.0.1:<another port>.  The system resolver is
never used.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import json
import os
import re
import smtplib
import subprocess
import sys
import time
import uuid

import attrs
import trustme
from twisted.trial import unittest

from tests.interop.dns import NSDServer, require_nsd
from tests.interop.support import (
    EVENTS_FILE, LOCAL_DOMAIN, LOOPBACK, ONE_ATTEMPT_JSON_LOG, MTAProcess, PROJECT_ROOT,
    WorkDirs, free_port, json_lines, make_message, message_files, postfix_unavailable,
    stop_each, subprocess_env,
)
from tests.interop.tls_peers import (
    PEERS, RELAY_ADDRESS, RELAY_HOST, CertFiles, MatrixPostfix, Peer,
    ScriptedPeer, free_port_on_all, make_certificates, matrix_zone,
)

ALICE = f"alice@{LOCAL_DOMAIN}"
POLICIES = ("strict", "relaxed", "opportunistic")
# "default": the cell's entry names no decider (no fallback / tls_fallback
# key), so the policy's own default applies (docs/tls.md).
DEFAULT = "default"
DECIDERS = ("never", "now", "next-attempt", "after:30m", "relaxed-now", "via-relay", DEFAULT)
# [outbound.tls] fallback, as configured below: it names the default entry's
# decider only, and must not reach the DEFAULT cells' domain entries.
TABLE_FALLBACK = "now"
HANDSHAKE_TIMEOUT = 3  # [outbound] handshake_timeout, seconds
EARLY_WARNING = ("strict",)  # [outbound.tls] early_warning, as configured below
RELAY_POLICY = "strict"  # [outbound.tls.relay] tls_policy
DOC_ENV = "TWISTED_MTA_TLS_MATRIX"
CATEGORIES = {  # what is compared, by test method
    "placement": "Where each message ended up after the first attempt, and its class",
    "trace": "The X-Twisted-MTA-TLS header of delivered messages",
    "relay-policy": "The policy of the relay leg of via-relay",
    "detail": "Failure class and detail in the decision log",
    "dsn": "Early delay warnings",
    "explanation": "Plain-words outcome in the queue",
    "second-attempt": "Second attempt",
    "routed-domain-entry": "A domain entry for a routed domain",
    "shared-smarthost": "Two routes with different policies to one smarthost",
}
KEEP_ENV = "TWISTED_MTA_TLS_MATRIX_KEEP"
SETTLE_TIMEOUT = 60.0

# -- the cells ------------------------------------------------------------------------


@attrs.frozen
class Cell:
    """
    One message: to C{user@<domain>}, under C{policy} with C{decider}.
    MX cells get their policy from a C{[outbound.tls.domains]} entry;
    implicit-TLS cells go through an C{[outbound.routes]} smarthost
    (C{smarthost}) whose C{tls_policy}/C{tls_fallback} carry it, unless
    C{route_policy} is false (then a domain entry carries it).
    """

    peer: Peer
    policy: str
    decider: str
    domain: str
    smarthost: str | None = None
    route_policy: bool = True
    label: str = ""
    message: str = ""  # cells with the same non-empty key share one message

    @property
    def rcpt(self) -> str:
        return f"user@{self.domain}"

    @property
    def server(self) -> str:
        """
        The host name we connect to (and that strict checks).
        """
        return self.smarthost or self.peer.mx_host

    @property
    def why(self) -> str:
        """
        The policy map entry that should choose the policy (docs/tls.md,
        "Choosing the policy").
        """
        if self.smarthost and self.route_policy:
            return f"smarthost {self.smarthost}"
        return f"domain {self.domain}"

    @property
    def name(self) -> str:
        return self.label or f"{self.peer.name} / {self.policy} / {self.decider}"


def effective_decider(policy: str, decider: str) -> str:
    """
    The decider a cell runs under: its own, or for a C{DEFAULT} cell the
    policy's default (docs/tls.md): C{never} where the policy requires TLS
    (strict, relaxed), C{now} otherwise.
    """
    if decider != DEFAULT:
        return decider
    return "never" if policy in ("strict", "relaxed") else "now"


def decider_heading(decider: str) -> str:
    return "no `fallback`" if decider == DEFAULT else f"`{decider}`"


def cell_domain(peer: Peer, policy: str, decider: str) -> str:
    return f"{policy}-{decider.replace(':', '-')}.{peer.domain}"


def matrix_cells() -> list[Cell]:
    cells = []
    for peer in PEERS:
        for policy in POLICIES:
            for decider in DECIDERS:
                domain = cell_domain(peer, policy, decider)
                cells.append(Cell(peer, policy, decider, domain,
                                  smarthost=peer.smarthost_for(domain) if peer.implicit
                                  else None))
    return cells


def routing_cells() -> list[Cell]:
    """
    Routed mail beyond the matrix: a domain entry for a domain routed
    through a smarthost without a tls_policy (docs/tls.md: the recipient
    domain's entry comes first), and two routes with different policies to
    one smarthost (each route's own tls_policy should apply); those two
    are recipients of one message, so they reach the outbound pool in the
    same instant.
    """
    bad = next(p for p in PEERS if p.name == "implicit-bad")
    return [
        Cell(bad, "strict", "never", f"routed-strict-never.{bad.domain}",
             smarthost=f"routed.{bad.domain}", route_policy=False,
             label="domain entry (strict/never) for a routed domain"),
        Cell(bad, "strict", "never", f"shared-strict-never.{bad.domain}",
             smarthost=f"shared.{bad.domain}",
             label="route with tls_policy strict/never to a shared smarthost",
             message="shared"),
        Cell(bad, "opportunistic", "now", f"shared-opportunistic-now.{bad.domain}",
             smarthost=f"shared.{bad.domain}",
             label="route with tls_policy opportunistic/now to the same smarthost",
             message="shared"),
    ]


# -- what should happen, from the rules ---------------------------------------------------

VERSION_ORDER = ("TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
FLOOR = {"opportunistic": "TLSv1.0", "relaxed": "TLSv1.2", "strict": "TLSv1.2"}
# The names twisted-mta records (OpenSSL's, except that its "TLSv1" is
# written TLSv1.0).
OPENSSL_NAME = {"TLSv1.0": "TLSv1.0", "TLSv1.1": "TLSv1.1", "TLSv1.2": "TLSv1.2",
                "TLSv1.3": "TLSv1.3"}
CERTIFICATE_KINDS = ("certificate-expired", "certificate-not-yet-valid",
                     "certificate-untrusted", "certificate-host-mismatch", "certificate-weak")
# What strict finds wrong with each kind of certificate: (class, detail);
# a detail of None is not specified by the taxonomy, so not checked.
CERT_FAILURE = {
    "expired": ("certificate-expired", "expired"),
    "not-yet-valid": ("certificate-not-yet-valid", "not-yet-valid"),
    "self-signed": ("certificate-untrusted", "self-signed"),
    "unknown-ca": ("certificate-untrusted", "unknown-ca"),
    # A leaf alone, from an issuer we do not know: OpenSSL cannot tell an
    # unknown CA from missing intermediates (tls.failure.classify_chain).
    "unknown-issuer": ("certificate-untrusted", "unknown-issuer"),
    "wrong-name": ("certificate-host-mismatch", None),
    # RSA-1024 key and SHA-1 signature: key-too-small or weak-signature.
    "weak": ("certificate-weak", None),
}
# What a connection meets after the 220 to STARTTLS, by Peer.starttls.
HANDSHAKE_FAILURE = {
    "dropped": ("handshake-closed", None),
    "plaintext": ("handshake-plaintext", None),
    "hang": ("handshake-timeout", None),
}


@attrs.frozen
class Expect:
    """
    C{status}: C{delivered-tls} (by the peer, over TLS),
    C{delivered-cleartext} (by the peer, no TLS), C{via-relay} (by the
    secure relay, over TLS) or C{deferred} (queued with TLS failure
    C{kind}).  C{kind}/C{detail} also name the failure behind a fallback;
    C{fallback} is the decider the trace header should name.
    """

    status: str
    kind: str | None = None
    detail: str | None = None
    verified: bool | None = None
    version: str | None = None
    fallback: str | None = None

    def words(self) -> str:
        if self.status == "deferred":
            return f"deferred ({self.kind}{'/' + self.detail if self.detail else ''})"
        extra = []
        if self.version:
            extra.append(self.version)
        if self.verified is not None:
            extra.append("verified" if self.verified else "unverified")
        if self.fallback:
            extra.append(f"fallback={self.fallback} reason={self.kind}")
        return self.status + (f" [{', '.join(extra)}]" if extra else "")


def tls_failure(peer: Peer, policy: str) -> tuple[str, str | None] | None:
    """
    The failure (class, detail) a connection to C{peer} under C{policy}
    meets, or None when the policy is satisfied.
    """
    if peer.starttls == "absent":
        # Opportunistic sends in cleartext when STARTTLS is not offered;
        # the others require it.
        return None if policy == "opportunistic" else ("starttls-not-offered", None)
    if peer.starttls == "refused":
        return ("starttls-refused", None)
    if peer.starttls in HANDSHAKE_FAILURE:
        # Under every policy that tries STARTTLS, opportunistic included.
        return HANDSHAKE_FAILURE[peer.starttls]
    if VERSION_ORDER.index(peer.max_version) < VERSION_ORDER.index(FLOOR[policy]):
        return ("handshake-no-common-version", None)
    if peer.legacy_cipher_only and policy != "opportunistic":
        return ("handshake-no-common-cipher", None)
    if policy == "strict" and peer.cert != "valid":
        return CERT_FAILURE[peer.cert]
    return None


def decide(decider: str, kind: str, attempt: int, implicit: bool) -> str:
    """
    What the decider does on the message's C{attempt}-th attempt (every
    earlier one failed on TLS, the message is minutes old), after the hard
    rule that implicit TLS never falls back to cleartext.  C{decider} is
    the effective one (L{effective_decider}).
    """
    action = {
        "never": "defer",
        "now": "cleartext",
        "next-attempt": "defer" if attempt == 1 else "cleartext",
        "after:30m": "defer",
        "relaxed-now": "relaxed" if kind in CERTIFICATE_KINDS else "defer",
        "via-relay": "relay",  # a relay is configured
    }[decider]
    if action == "cleartext" and implicit:
        return "defer"
    return action


def verifies(peer: Peer, version: str) -> bool:
    """
    Whether a session with C{peer} over C{version} counts as verified.
    The trust roots apply to every policy, so the header says whether the
    certificate verified even where nothing required it; and that is
    judged at OpenSSL's normal security level whatever level the session
    ran at: a valid certificate, over TLS 1.2 or later, with no weak key or
    signature (the TLS 1.0 peer under opportunistic is not verified).
    """
    return (peer.cert == "valid"
            and VERSION_ORDER.index(version) >= VERSION_ORDER.index("TLSv1.2"))


def expected(cell: Cell, attempt: int = 1) -> Expect:
    peer = cell.peer
    version = OPENSSL_NAME[peer.max_version]
    failure = tls_failure(peer, cell.policy)
    if failure is None:
        if peer.starttls == "absent":
            return Expect("delivered-cleartext")
        return Expect("delivered-tls", verified=verifies(peer, version), version=version)
    kind, detail = failure
    decider = effective_decider(cell.policy, cell.decider)
    action = decide(decider, kind, attempt, peer.implicit)
    if action == "defer":
        return Expect("deferred", kind, detail)
    if action == "cleartext":
        return Expect("delivered-cleartext", kind, detail, fallback=decider)
    if action == "relaxed":
        return Expect("delivered-tls", kind, detail, verified=False, version=version,
                      fallback=decider)
    return Expect("via-relay", kind, detail, verified=True, version="TLSv1.3",
                  fallback=decider)


def enhanced_code(kind: str) -> str:
    return "4.7.4" if kind.startswith("starttls-") else "4.7.5"


def day(t: datetime.datetime) -> str:
    return f"{t.day} {t.strftime('%B %Y')}"


def fact_patterns(cell: Cell, exp: Expect, certs: dict[str, CertFiles],
                  port: int) -> list[tuple[str, str]]:
    """
    What a plain-words account of the failure must mention: the server as
    C{host[IP]:port} and the fact that made it fail (regexes,
    case-insensitive).
    """
    pats = [("the server as host[IP]:port",
             re.escape(f"{cell.server}[{cell.peer.address}]:{port}"))]
    cert = certs.get(cell.peer.name)
    if exp.kind == "certificate-expired":
        pats.append(("the expiry date", re.escape(day(cert.not_after))))
    elif exp.kind == "certificate-not-yet-valid":
        pats.append(("the start date", re.escape(day(cert.not_before))))
    elif exp.detail == "self-signed":
        pats.append(("self-signed", r"self-signed"))
    elif exp.kind == "certificate-untrusted":
        pats.append(("an untrusted issuer", r"\b(authority|issuer|CA)\b"))
    elif exp.kind == "certificate-host-mismatch":
        pats.append(("the certificate's name", re.escape(cert.names[0])))
    elif exp.kind == "starttls-not-offered":
        pats.append(("no STARTTLS", r"STARTTLS|does not offer encryption"))
    elif exp.kind == "starttls-refused":
        pats.append(("the server's refusal", r"TLS not available due to local problem"))
    elif exp.kind == "certificate-weak":
        pats += [("the key type", r"\bRSA\b"), ("the key size", r"\b1024\b"),
                 ("the signature algorithm", r"\bSHA-?1(?!\d)")]
    elif exp.kind == "handshake-no-common-version":
        pats += [("the version we require", r"\bTLS ?v?1\.2\b"),
                 ("the server's version", r"\bTLS ?v?1(\.[01]\b|(?![.\d]))|\bolder\b")]
    elif exp.kind == "handshake-no-common-cipher":
        pats.append(("no common cipher", r"\bcipher"))
    elif exp.kind == "handshake-closed":
        pats.append(("the closed connection", r"\bclosed\b"))
    elif exp.kind == "handshake-plaintext":
        pats.append(("the plain-text answer", r"\bplain[ -]?text\b"))
    elif exp.kind == "handshake-timeout":
        pats += [("the handshake timeout", rf"\b{HANDSHAKE_TIMEOUT}(\.0+)? ?(s|secs?|seconds?)\b"),
                 ("no answer", r"\banswer")]
    return pats


def missing_facts(text: str, pats: list[tuple[str, str]]) -> list[str]:
    flat = " ".join(text.split())
    return [what for what, pat in pats if not re.search(pat, flat, re.I)]


# -- what happened ------------------------------------------------------------------------

TRACE = re.compile(
    r"^(?P<host>[^\s\[]+)\[(?P<ip>[^\]]+)\]:(?P<port>\d+) (?P<tls>.+?); "
    r"policy (?P<policy>\S+) \((?P<why>[^)]*)\)"
    r"(?:; fallback=(?P<fallback>\S+) reason=(?P<reason>\S+)(?P<rest>.*))?$")
TLS_TEXT = re.compile(r"^(?P<version>TLSv[\d.]+) (?P<cipher>\S+), (?P<check>.*)$")
POSTFIX_BY = re.compile(r"\bby (\S+) \(Postfix\)")
POSTFIX_TLS = re.compile(r"\(using (TLSv[\d.]+) with cipher (\S+)")


@attrs.frozen
class Copy:
    """
    One stored copy of a message.
    """

    key: str  # file path, or "scripted:<n>"
    stored_by: str  # Postfix's host name in its Received header, or "scripted"
    trace: str | None  # our X-Twisted-MTA-TLS value (unfolded)
    traces: int  # how many such headers
    peer_tls: str | None  # the TLS version the storing server's Received names

    @property
    def parsed(self) -> dict | None:
        m = TRACE.match(self.trace or "")
        if not m:
            return None
        d = m.groupdict()
        t = TLS_TEXT.match(d["tls"])
        d["version"] = t.group("version") if t else None
        d["cipher"] = t.group("cipher") if t else None
        d["verified"] = (t.group("check") == "certificate verified") if t else None
        return d


@attrs.frozen
class DSN:
    action: str
    status: str
    text: str  # the text/plain part
    path: str


@attrs.define
class Seen:
    status: str = "missing"  # + delivered-tls, delivered-cleartext, via-relay, deferred,
    #                           bounced, duplicated
    copies: list = attrs.field(factory=list)  # Copy
    outcome: dict | None = None  # the recipient's outcome in the queue JSON
    attempts: int | None = None
    decisions: list = attrs.field(factory=list)  # outbound.tls_decision events

    @property
    def kind(self) -> str | None:
        return (self.outcome or {}).get("kind")

    def words(self) -> str:
        if self.status == "deferred":
            return f"deferred ({self.kind}{'/' + self.detail if self.detail else ''})"
        if self.status in ("delivered-tls", "delivered-cleartext", "via-relay") and self.copies:
            p = self.copies[-1].parsed or {}
            extra = [x for x in (p.get("version"),) if x]
            if p.get("verified") is not None:
                extra.append("verified" if p["verified"] else "unverified")
            if p.get("fallback"):
                extra.append(f"fallback={p['fallback']} reason={p['reason']}")
            return self.status + (f" [{', '.join(extra)}]" if extra else "")
        return self.status

    @property
    def detail(self) -> str | None:
        return self.decisions[0].get("detail") if self.decisions else None


def pending_recipients(queue: list[dict]) -> dict[str, tuple[dict, dict]]:
    """
    C{{address: (queue entry, recipient)}} for every recipient still
    pending in C{queue list --json} output.
    """
    out = {}
    for entry in queue:
        for r in entry.get("recipients", []):
            if r.get("state") == "pending":
                out[r["address"].lower()] = (entry, r)
    return out


def parse(path: str):
    with open(path, "rb") as f:
        return email.message_from_bytes(f.read(), policy=email.policy.compat32)


def unfold(value) -> str:
    return " ".join(str(value or "").split())


def copy_of(key: str, msg, scripted: bool = False) -> Copy:
    traces = msg.get_all("X-Twisted-MTA-TLS") or []
    received = msg.get_all("Received") or []
    theirs = unfold(received[0]) if received and not scripted else ""
    by = POSTFIX_BY.search(theirs)
    tls = POSTFIX_TLS.search(theirs)
    return Copy(key=key, stored_by="scripted" if scripted else (by.group(1) if by else "?"),
                trace=unfold(traces[0]) if traces else None, traces=len(traces),
                peer_tls=tls.group(1) if tls else None)


def dsn_of(path: str) -> list[tuple[str, DSN]]:
    """
    (recipient, DSN) for each recipient block of the report in C{path}.
    """
    msg = parse(path)
    if msg.get_content_type() != "multipart/report":
        return []
    text = "".join(str(p.get_payload(decode=True), "utf-8", "replace")
                   for p in msg.walk() if p.get_content_type() == "text/plain")
    out = []
    for part in msg.walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        for block in part.get_payload()[1:]:
            rcpt = unfold(block["Final-Recipient"]).partition(";")[2].strip().lower()
            out.append((rcpt, DSN(unfold(block["Action"]), unfold(block["Status"]), text, path)))
    return out


# -- one run of the matrix -------------------------------------------------------------


class MatrixRun:
    """
    Start nsd, the Postfix peers, the scripted peers and our MTA; send one
    message per cell; wait for the first attempts to settle; flush;
    wait again; record everything; stop every process.  L{compare} fills
    L{mismatches} (category -> lines).
    """

    def __init__(self) -> None:
        self.cells = matrix_cells()
        self.routing = routing_cells()
        self.all = self.cells + self.routing
        self.messages: dict[str, list[Cell]] = {}
        for c in self.all:
            self.messages.setdefault(c.message or c.rcpt, []).append(c)
        self.tokens = {}
        for group in self.messages.values():
            token = uuid.uuid4().hex
            self.tokens.update({c.rcpt: token for c in group})
        self.seen1: dict[str, Seen] = {}
        self.seen2: dict[str, Seen] = {}
        self.dsns1: dict[str, list[DSN]] = {}
        self.dsns2: dict[str, list[DSN]] = {}
        self.mismatches: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {}
        self.notes: list[str] = []
        self.work = WorkDirs("tlsmatrix", KEEP_ENV)
        self.settled: dict[str, bool] = {}
        self._token_of_file: dict[str, str | None] = {}

    # -- set-up -------------------------------------------------------------------------

    def run(self) -> "MatrixRun":
        t0 = time.monotonic()
        self.port = free_port_on_all()
        self.nsd = self.postfix = self.mta = None
        self.scripted: dict[str, ScriptedPeer] = {}  # by peer name
        try:
            self.nsd = NSDServer(self.work.make("nsd"), matrix_zone()).start()
            certdir = self.work.make("certs", 0o755)
            self.ca = trustme.CA(organization_name="tls-matrix trusted CA")
            self.certs = make_certificates(certdir, self.ca)
            self.postfix = MatrixPostfix(self.work.make("postfix", 0o755), self.port, self.certs,
                                         [c.rcpt for c in self.all])
            self.postfix.start()
            for p in PEERS:
                if p.scripted:
                    self.scripted[p.name] = ScriptedPeer(p.address, self.port, p.mx_host,
                                                         mode=p.scripted_mode)
            self.mta = self._start_mta()
            self.timings["set-up"] = time.monotonic() - t0

            t1 = time.monotonic()
            self._submit()
            self.timings["submission"] = time.monotonic() - t1
            t2 = time.monotonic()
            self.settled["first"] = self._settle_first()
            self.timings["first attempts"] = time.monotonic() - t2
            self.queue1 = self._queue_list()
            self._collect(self.seen1, self.dsns1, self.queue1, before=None)

            t3 = time.monotonic()
            self._flush()
            self.settled["second"] = self._settle_second()
            self.timings["second attempts"] = time.monotonic() - t3
            self.queue2 = self._queue_list()
            self._collect(self.seen2, self.dsns2, self.queue2, before=self.seen1)
            self.compare()
        finally:
            self.timings["total"] = time.monotonic() - t0
            self._stop()
        return self

    def _start_mta(self) -> MTAProcess:
        tmp = self.work.make("mta")
        with open(os.path.join(tmp, "ca.pem"), "wb") as f:
            f.write(self.ca.cert_pem.bytes())
        P = self.port
        lines = [
            f'[dns]\nnameservers = ["{self.nsd.address}"]\ntimeout = "5s"\n',
            "[outbound]",
            f"port = {P}",
            'connect_timeout = "5s"',
            'greeting_timeout = "10s"',
            'command_timeout = "10s"',
            'data_timeout = "10s"',
            f'handshake_timeout = "{HANDSHAKE_TIMEOUT}s"',
            'idle_time = "1s"',
            "",
            "[outbound.tls]",
            'policy = "opportunistic"',
            f'fallback = "{TABLE_FALLBACK}"',  # the default entry's only
            'ca_file = "ca.pem"',
            f"early_warning = {json.dumps(list(EARLY_WARNING))}",
            "",
            "[outbound.tls.relay]",
            f'host = "[{RELAY_HOST}]:{P}"',
            'tls = "starttls"',
            f'tls_policy = "{RELAY_POLICY}"',
            "",
        ]
        for c in self.all:
            if c.smarthost is None or not c.route_policy:
                lines += [f'[outbound.tls.domains."{c.domain}"]', f'policy = "{c.policy}"']
                if c.decider != DEFAULT:
                    lines.append(f'fallback = "{c.decider}"')
                lines.append("")
        for c in self.all:
            if c.smarthost is not None:
                lines += [f'[outbound.routes."{c.domain}"]', f'host = "[{c.smarthost}]:{P}"',
                          'tls = "implicit"']
                if c.route_policy:
                    lines.append(f'tls_policy = "{c.policy}"')
                    if c.decider != DEFAULT:
                        lines.append(f'tls_fallback = "{c.decider}"')
                lines.append("")
        # Nothing retries by itself: the second attempt is the flush's.
        lines.append(ONE_ATTEMPT_JSON_LOG)
        self.events_path = os.path.join(tmp, EVENTS_FILE)
        mta = MTAProcess(tmp, "\n".join(lines), port=free_port())
        return mta.start()

    def _submit(self) -> None:
        with smtplib.SMTP(LOOPBACK, self.mta.port, local_hostname="client.example.test",
                          timeout=30) as client:
            client.ehlo()
            for group in self.messages.values():
                rcpts = [c.rcpt for c in group]
                refused = client.sendmail(ALICE, rcpts, make_message(
                    self.tokens[rcpts[0]], subject=f"tls matrix {group[0].domain}",
                    sender=ALICE, recipient=rcpts[0]))
                if refused:
                    raise AssertionError(f"refused at submission: {refused}")

    def _stop(self) -> None:
        self.notes += stop_each(self.mta and self.mta.cleanup,
                                *(peer.stop for peer in self.scripted.values()),
                                self.postfix and self.postfix.stop, self.nsd and self.nsd.stop)
        self.work.finish()

    # -- watching -------------------------------------------------------------------------

    def _stored(self, c: Cell) -> list[str]:
        """
        Keys of the stored copies of C{c}'s message (Postfix Maildir files
        and scripted deliveries).
        """
        keys = message_files(self.postfix.maildir(c.rcpt))
        if c.peer.name in self.scripted:
            keys += [f"scripted:{i}" for i, _ in
                     enumerate(self.scripted[c.peer.name].received_for(c.rcpt))]
        return keys

    def _spool(self, sub: str) -> list[str]:
        try:
            return [n for n in os.listdir(os.path.join(self.mta.spool, sub))
                    if not n.startswith(".")]
        except FileNotFoundError:
            return []

    def _queued_tokens(self) -> set[str]:
        """
        The tokens of the messages waiting in our spool's cur/ (deferred).
        """
        out = set()
        for name in self._spool("cur"):
            path = os.path.join(self.mta.spool, "cur", name)
            if path not in self._token_of_file:
                try:
                    with open(path, "rb") as f:
                        m = re.search(rb"token: ([0-9a-f]{32})", f.read())
                except FileNotFoundError:
                    continue
                self._token_of_file[path] = m.group(1).decode() if m else None
            out.add(self._token_of_file[path])
        return out

    def _bounced(self) -> set[str]:
        return {rcpt for path in message_files(self.mta.maildir("alice"))
                for rcpt, dsn in dsn_of(path) if dsn.action == "failed"}

    def _settle_first(self) -> bool:
        """
        Wait until every message was attempted once: stored somewhere,
        deferred (in cur/), or bounced, with nothing new or in flight.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            if not self._spool("new") and not self._spool("tmp"):
                queued = self._queued_tokens()
                bounced = self._bounced()
                if all(self._stored(c) or self.tokens[c.rcpt] in queued or c.rcpt in bounced
                       for c in self.all):
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)

    def _flush(self) -> None:
        result = self._cli("queue", "flush")
        if result.returncode != 0:
            raise AssertionError(f"queue flush failed: {result.stdout}{result.stderr}")

    def _settle_second(self) -> bool:
        """
        Wait until every recipient deferred by the first attempt was
        attempted again: still queued with two attempts, or stored anew.
        """
        waiting = [c for c in self.all if self.seen1[c.rcpt].status == "deferred"]
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            if not self._spool("new") and not self._spool("tmp"):
                pending = {rcpt: entry.get("attempts", 0)
                           for rcpt, (entry, _) in pending_recipients(self._queue_list()).items()}
                if all(pending[c.rcpt] >= 2 if c.rcpt in pending else
                       len(self._stored(c)) > len(self.seen1[c.rcpt].copies) for c in waiting):
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.3)

    def _cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "twisted_mta.cli", *args, "-c", self.mta.config_path],
            env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=30)

    def _queue_list(self) -> list[dict]:
        result = self._cli("queue", "list", "--json")
        if result.returncode != 0:
            raise AssertionError(f"queue list failed: {result.stderr}")
        return json.loads(result.stdout)

    # -- recording -----------------------------------------------------------------------

    def _events(self) -> list[dict]:
        return json_lines(self.events_path)

    def _collect(self, seen: dict, dsns: dict, queue: list[dict], before: dict | None) -> None:
        by_rcpt = pending_recipients(queue)
        decisions: dict[str, list] = {}
        for ev in self._events():
            if ev.get("event") == "outbound.tls_decision":
                key = str(ev.get("destination", "")).lower()
                key = key[1:].partition("]")[0] if key.startswith("[") else key
                decisions.setdefault(key, []).append(ev)
        for path in message_files(self.mta.maildir("alice")):
            for rcpt, dsn in dsn_of(path):
                dsns.setdefault(rcpt, []).append(dsn)
        for c in self.all:
            s = Seen()
            old = {cp.key for cp in before[c.rcpt].copies} if before else set()
            for path in message_files(self.postfix.maildir(c.rcpt)):
                s.copies.append(copy_of(path, parse(path)))
            scripted = self.scripted.get(c.peer.name)
            for i, m in enumerate(scripted.received_for(c.rcpt) if scripted else ()):
                s.copies.append(copy_of(f"scripted:{i}", email.message_from_bytes(
                    m.data, policy=email.policy.compat32), scripted=True))
            new = [cp for cp in s.copies if cp.key not in old]
            dest = c.smarthost if c.smarthost else c.domain
            s.decisions = decisions.get(dest, []) if before is None else \
                decisions.get(dest, [])[len(self.seen1[c.rcpt].decisions):]
            if c.rcpt in by_rcpt:
                entry, r = by_rcpt[c.rcpt]
                s.outcome, s.attempts = r.get("outcome"), entry.get("attempts")
            if len(new) > 1:
                s.status = "duplicated"
            elif new and c.rcpt in by_rcpt:
                s.status = "duplicated"  # stored and still queued
            elif new:
                cp = new[0]
                p = cp.parsed or {}
                if cp.stored_by == RELAY_HOST:
                    s.status = "via-relay"
                elif p.get("version") or (cp.trace is None and cp.peer_tls):
                    s.status = "delivered-tls"
                else:
                    s.status = "delivered-cleartext"
            elif c.rcpt in by_rcpt:
                s.status = "deferred"
            elif any(d.action == "failed" for d in dsns.get(c.rcpt, [])):
                s.status = "bounced"
            elif before is not None and before[c.rcpt].status != "deferred":
                s.status = "-"  # settled in the first attempt
            seen[c.rcpt] = s

    # -- comparing -----------------------------------------------------------------------

    def _add(self, category: str, line: str) -> None:
        self.mismatches.setdefault(category, []).append(line)

    def compare(self) -> None:
        for cat in CATEGORIES:
            self.mismatches.setdefault(cat, [])
        for name, ok in self.settled.items():
            if not ok:
                self._add("placement", f"the {name} attempts did not settle within "
                          f"{SETTLE_TIMEOUT:g}s; unsettled cells show as 'missing'")
        for c in self.cells:
            self._compare_first(c)
            self._compare_second(c)
        for c in self.routing:
            exp, s = expected(c), self.seen1[c.rcpt]
            problems = self._placement_problems(c, exp, s)
            if s.status in ("delivered-tls", "delivered-cleartext") and s.copies:
                p = s.copies[-1].parsed or {}
                if (p.get("policy"), p.get("why")) != (c.policy, c.why):
                    problems.append(f"sent under policy {p.get('policy')} ({p.get('why')}), "
                                    f"expected {c.policy} ({c.why})")
            for problem in problems:
                self._add("routed-domain-entry" if not c.route_policy else "shared-smarthost",
                          f"{c.name} ({c.rcpt}): {problem}")

    def _placement_problems(self, c: Cell, exp: Expect, s: Seen) -> list[str]:
        out = []
        if s.status != exp.status:
            out.append(f"expected {exp.words()}, got {s.words()}"
                       + (f"; outcome: {s.outcome.get('text')}" if s.outcome else "")
                       + (f"; header: {s.copies[-1].trace}" if s.copies else ""))
        elif exp.status == "deferred" and s.kind != exp.kind:
            out.append(f"deferred as {s.kind}, expected {exp.kind}; outcome: "
                       f"{(s.outcome or {}).get('text')}")
        elif exp.status != "deferred":
            want = RELAY_HOST if exp.status == "via-relay" else (
                "scripted" if c.peer.scripted else c.peer.mx_host)
            if s.copies[-1].stored_by != want:
                out.append(f"stored by {s.copies[-1].stored_by}, expected {want}")
        return out

    def _compare_first(self, c: Cell) -> None:
        exp, s = expected(c), self.seen1[c.rcpt]
        for problem in self._placement_problems(c, exp, s):
            self._add("placement", f"{c.name}: {problem}")
        if s.status == exp.status and exp.status != "deferred":
            self._compare_trace(c, exp, s.copies[-1], "trace")
        # The failure's class and detail, as logged with each decision.
        failure = tls_failure(c.peer, c.policy)
        if failure is None and s.decisions:
            self._add("detail", f"{c.name}: no TLS failure expected, but a fallback decision "
                      f"was logged: {s.decisions[0].get('kind')}/{s.decisions[0].get('detail')}")
        elif failure is not None:
            if not s.decisions:
                self._add("detail", f"{c.name}: no outbound.tls_decision logged for "
                          f"{failure[0]}")
            else:
                ev = s.decisions[0]
                if ev.get("kind") != failure[0] or (failure[1] is not None
                                                    and ev.get("detail") != failure[1]):
                    self._add("detail", f"{c.name}: logged {ev.get('kind')}/"
                              f"{ev.get('detail')}, expected {failure[0]}/"
                              f"{failure[1] or '(any detail)'}")
        # Plain words in the queue.
        if exp.status == "deferred" and s.status == "deferred" and s.kind == exp.kind:
            o = s.outcome or {}
            if o.get("enhanced") != enhanced_code(exp.kind) or o.get("code") != 451:
                self._add("explanation", f"{c.name}: outcome {o.get('code')} "
                          f"{o.get('enhanced')}, expected 451 {enhanced_code(exp.kind)}")
            text = o.get("text", "")
            lacking = missing_facts(text, fact_patterns(c, exp, self.certs, self.port) + [
                ("the policy's name", re.escape(c.policy))])
            if lacking:
                self._add("explanation", f"{c.name}: the queued outcome does not mention "
                          f"{', '.join(lacking)}: {text!r}")
        # The early delay warning.
        dsns = self.dsns1.get(c.rcpt, [])
        if exp.status == "deferred" and c.policy in EARLY_WARNING:
            if len(dsns) != 1:
                self._add("dsn", f"{c.name}: expected one early delay warning to {ALICE}, "
                          f"got {len(dsns)}")
            else:
                d = dsns[0]
                if d.action != "delayed" or d.status != enhanced_code(exp.kind):
                    self._add("dsn", f"{c.name}: warning says Action {d.action}, Status "
                              f"{d.status}; expected delayed, {enhanced_code(exp.kind)}")
                lacking = missing_facts(d.text, fact_patterns(c, exp, self.certs, self.port))
                if lacking:
                    self._add("dsn", f"{c.name}: the warning's text does not mention "
                              f"{', '.join(lacking)}:\n{d.text}")
        elif dsns:
            self._add("dsn", f"{c.name}: expected no DSN, got "
                      + ", ".join(f"{d.action} {d.status}" for d in dsns))

    def _compare_trace(self, c: Cell, exp: Expect, cp: Copy, category: str) -> None:
        problems = []
        p = cp.parsed
        if cp.traces != 1 or p is None:
            self._add(category, f"{c.name}: expected one parsable X-Twisted-MTA-TLS header, "
                      f"got {cp.traces}: {cp.trace!r}")
            return
        relay = exp.status == "via-relay"
        host, ip = (RELAY_HOST, RELAY_ADDRESS) if relay else (c.server, c.peer.address)
        if (p["host"], p["ip"], p["port"]) != (host, ip, str(self.port)):
            problems.append(f"names {p['host']}[{p['ip']}]:{p['port']}, expected "
                            f"{host}[{ip}]:{self.port}")
        if exp.status == "delivered-cleartext":
            if p["tls"] != "no TLS":
                problems.append(f"says {p['tls']!r}, expected no TLS")
        else:
            if p["version"] != exp.version:
                problems.append(f"TLS version {p['version']}, expected {exp.version}")
            if p["verified"] != exp.verified:
                problems.append(f"says {p['tls']!r}, expected the certificate "
                                f"{'verified' if exp.verified else 'not verified'}")
            if c.peer.legacy_cipher_only and not relay and p["cipher"] != self.postfix.cipher:
                problems.append(f"cipher {p['cipher']}, expected {self.postfix.cipher}")
        if not relay and (p["policy"], p["why"]) != (c.policy, c.why):
            problems.append(f"policy {p['policy']} ({p['why']}), expected {c.policy} ({c.why})")
        if relay and (p["policy"], p["why"]) != (RELAY_POLICY, f"smarthost {RELAY_HOST}"):
            self._add("relay-policy", f"{c.name}: the relay leg ran under policy "
                      f"{p['policy']} ({p['why']}); docs/tls.md: the relay is \"a smarthost "
                      f"under its own policy\" ({RELAY_POLICY}, smarthost {RELAY_HOST})")
        if (p["fallback"], p["reason"]) != (exp.fallback, exp.kind if exp.fallback else None):
            problems.append(f"fallback={p['fallback']} reason={p['reason']}, expected "
                            f"fallback={exp.fallback} reason="
                            f"{exp.kind if exp.fallback else None}")
        # The peer's own account must agree with ours.
        peer_tls = "TLSv1.0" if cp.peer_tls == "TLSv1" else cp.peer_tls  # Postfix's name
        if cp.stored_by != "scripted" and peer_tls != p["version"]:
            problems.append(f"the receiving Postfix says TLS {cp.peer_tls}, our header "
                            f"{p['version']}")
        for problem in problems:
            self._add(category, f"{c.name}: {problem} (header: {cp.trace})")

    def _compare_second(self, c: Cell) -> None:
        exp1, s1 = expected(c), self.seen1[c.rcpt]
        if exp1.status != "deferred" or s1.status != "deferred":
            return  # only messages rightly deferred by the first attempt
        exp, s = expected(c, attempt=2), self.seen2[c.rcpt]
        for problem in self._placement_problems(c, exp, s):
            self._add("second-attempt", f"{c.name}: {problem}")
        if s.status == "deferred" and s.attempts != 2:
            self._add("second-attempt", f"{c.name}: {s.attempts} attempts after the flush, "
                      "expected 2")
        if s.status == exp.status and exp.status != "deferred":
            self._compare_trace(c, exp, [cp for cp in s.copies
                                         if cp.key not in {o.key for o in s1.copies}][0],
                                "second-attempt")
        if len(self.dsns2.get(c.rcpt, [])) != len(self.dsns1.get(c.rcpt, [])):
            self._add("second-attempt", f"{c.name}: another DSN after the second attempt "
                      f"({len(self.dsns1.get(c.rcpt, []))} -> "
                      f"{len(self.dsns2.get(c.rcpt, []))}); the early warning is sent once")

    # -- the document -------------------------------------------------------------------

    def write_doc(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_doc(self))


def _short(version: str | None) -> str:
    return {"TLSv1.0": "TLS 1.0", "TLSv1.1": "TLS 1.1", "TLSv1.2": "TLS 1.2",
            "TLSv1.3": "TLS 1.3"}.get(version or "", version or "TLS ?")


def cell_text(seen: Seen, dsns: list[DSN], c: Cell) -> str:
    if seen.status == "deferred":
        detail = f" ({seen.detail})" if seen.detail else ""
        text = f"deferred: {seen.kind}{detail}"
        if any(d.action == "delayed" for d in dsns):
            text += " +warning"
        return text
    if seen.status in ("delivered-tls", "via-relay", "delivered-cleartext") and seen.copies:
        p = seen.copies[-1].parsed or {}
        if seen.status == "delivered-cleartext":
            text = "cleartext"
        else:
            text = f"{_short(p.get('version'))} {'✓' if p.get('verified') else 'unverified'}"
            if seen.status == "via-relay":
                text = f"relay, {text}"
        if p.get("fallback"):
            text += " (fallback)"
        return text
    return seen.status


def git_describe() -> str:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True,
                                  text=True, timeout=10).stdout.rstrip("\n")
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short=12", "HEAD").strip() or "unknown"
    subject = git("log", "-1", "--format=%s")
    changed = [line[3:] for line in git("status", "--porcelain", "--", "twisted_mta").splitlines()]
    text = f"commit `{head}`"
    if subject:
        text += f" (\"{subject[:80]}{'...' if len(subject) > 80 else ''}\")"
    if changed:
        text += (" with uncommitted changes to " + ", ".join(f"`{p}`" for p in changed[:8])
                 + (" ..." if len(changed) > 8 else ""))
    return text


def render_doc(run: MatrixRun) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Outbound TLS interop matrix",
        "",
        f"Generated by `scripts/tls-matrix` (`tests/interop/test_tls_matrix.py`) from "
        f"{git_describe()}, {now}. Do not edit by hand: run the script again.",
        "",
        "One twisted-mta delivers one message per cell, all at once, to real peers on "
        "loopback: one private Postfix with an smtpd per peer on its own address, and "
        "scripted servers for the peers that drop the connection, answer the TLS hello in "
        "plain text, or never answer it. Certificates are made at test time; names come "
        "from a private nsd (wildcard MX per peer). Each cell's policy and fallback decider "
        "come from a policy map entry for its domain (`[outbound.tls.domains]`), or for the "
        "implicit-TLS peers from the cell's own `[outbound.routes]` entry "
        "(`tls = \"implicit\"`, `tls_policy`, `tls_fallback`). The column "
        "\"no `fallback`\" has entries that name no decider (no `fallback` or "
        "`tls_fallback` key): the policy's default applies, `never` for `strict` and "
        "`relaxed`, `now` for `opportunistic`; "
        f"`[outbound.tls] fallback = \"{TABLE_FALLBACK}\"` names only the default "
        "entry's decider and does not reach them. `[outbound.tls] ca_file` holds the test "
        "CA, `early_warning = [\"strict\"]`, `[outbound] handshake_timeout = "
        f"\"{HANDSHAKE_TIMEOUT}s\"`, and `[outbound.tls.relay]` is one more Postfix with a "
        "valid certificate.",
        "",
        "## Peers",
        "",
        "| peer | address | what it does |",
        "|---|---|---|",
        f"| relay | {RELAY_ADDRESS} | the secure relay for `via-relay` ({RELAY_HOST}, valid "
        f"certificate, relay `tls_policy = \"{RELAY_POLICY}\"`) |",
    ]
    for p in PEERS:
        what = p.what
        if p.legacy_cipher_only:
            what += f" (`{run.postfix.cipher}`)" if run.postfix else ""
        out.append(f"| {p.name} | {p.address} | {what} |")
    out += [
        "",
        "## Legend",
        "",
        "- `TLS 1.3 ✓`: delivered over TLS 1.3, the certificate verified; "
        "`TLS 1.3 unverified`: delivered over TLS, the certificate not verified (not "
        "required, or skipped by `relaxed-now`). Verification is judged at OpenSSL's "
        "normal security level whatever level the session ran at: a session over TLS 1.0, "
        "or with a weak key or signature, is never verified.",
        "- `cleartext`: delivered without TLS; `relay, ...`: delivered through the secure "
        "relay; `(fallback)`: after a TLS failure, as the fallback decider chose (the trace "
        "header names the decider, in the \"no `fallback`\" column the policy's default, "
        "and the failure).",
        "- `deferred: class (detail)`: still queued after the attempt, with that TLS failure "
        "class (detail from the `outbound.tls_decision` log event); `+warning`: the sender "
        "got an early delay warning. The handshake classes: `handshake-closed` (the server "
        "closed the connection during the handshake), `handshake-plaintext` (it answered "
        "the TLS hello in plain text), `handshake-timeout` (no answer within "
        "`handshake_timeout`), `handshake-no-common-version`, "
        "`handshake-no-common-cipher`; `certificate-weak`: a key or signature below "
        "OpenSSL's default security level (`strict` only).",
        "- **≠** marks a cell that differs from the expectation computed from the rules; "
        "the expectation follows it.",
        "",
    ]

    def table(policy: str, title: str, seen: dict, dsns: dict, attempt: int,
              only_deferred: bool) -> None:
        out.extend([f"### {title}", "",
                    "| peer | " + " | ".join(decider_heading(d) for d in DECIDERS) + " |",
                    "|---|" + "---|" * len(DECIDERS)])
        for peer in PEERS:
            row = []
            for decider in DECIDERS:
                c = next(x for x in run.cells if x.peer is peer and x.policy == policy
                         and x.decider == decider)
                if only_deferred and not (expected(c).status == "deferred"
                                          and run.seen1[c.rcpt].status == "deferred"):
                    row.append("")
                    continue
                s = seen.get(c.rcpt)
                text = cell_text(s, dsns.get(c.rcpt, []), c) if s else "?"
                exp = expected(c, attempt)
                if s is None or s.status != exp.status or (
                        exp.status == "deferred" and s.kind != exp.kind):
                    text = f"**≠** {text}; expected {exp.words()}"
                row.append(text)
            if any(row) or not only_deferred:
                out.append(f"| {peer.name} | " + " | ".join(row) + " |")
        out.append("")

    out += ["## First attempt", ""]
    for policy in POLICIES:
        table(policy, f"policy `{policy}`", run.seen1, run.dsns1, 1, False)
    out += ["## Second attempt", "",
            "After `twisted-mta queue flush`, for the cells the first attempt rightly "
            "deferred (blank: not deferred).", ""]
    for policy in POLICIES:
        table(policy, f"policy `{policy}`, second attempt", run.seen2, run.dsns2, 2, True)
    out += ["## Routed mail", "",
            "| case | domain | expected | observed |", "|---|---|---|---|"]
    for c in run.routing:
        s = run.seen1.get(c.rcpt)
        p = (s.copies[-1].parsed or {}) if s and s.copies else {}
        seen_words = s.words() if s else "?"
        if p:
            seen_words += f", policy {p.get('policy')} ({p.get('why')})"
        out.append(f"| {c.label} | `{c.domain}` via `{c.smarthost}` | "
                   f"{expected(c).words()}, policy {c.policy} ({c.why}) | {seen_words} |")
    out += ["", "## Mismatches", ""]
    any_mismatch = False
    methods = {
        "placement": "test_first_attempt_placement", "trace": "test_trace_header",
        "relay-policy": "test_relay_leg_runs_under_the_relay_policy",
        "detail": "test_failure_class_and_detail", "dsn": "test_early_delay_warnings",
        "explanation": "test_deferred_explanations",
        "second-attempt": "test_second_attempt_after_flush",
        "routed-domain-entry": "test_domain_entry_applies_to_routed_domain",
        "shared-smarthost": "test_routes_to_one_smarthost_keep_their_own_policies",
    }
    for cat, title in CATEGORIES.items():
        lines = run.mismatches.get(cat, [])
        method = methods.get(cat)
        todo = getattr(getattr(TLSMatrixTests, method, None), "todo", None) if method else None
        where = f" (`{method}`" + (", marked todo" if todo else "") + ")" if method else ""
        out.append(f"- {title}{where}: " + ("none" if not lines else f"{len(lines)}"))
        for line in lines[:60]:
            any_mismatch = True
            first = line.splitlines()[0]
            out.append(f"  - {first}")
        if len(lines) > 60:
            out.append(f"  - ... and {len(lines) - 60} more")
    if not any_mismatch:
        out.append("")
        out.append("Every cell matched its expectation.")
    total = run.timings.get("total", 0)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in run.timings.items() if k != "total")
    out += ["", "## Run", "",
            f"{len(run.all)} recipients in {len(run.messages)} messages; {total:.1f} s in all "
            f"({parts})."]
    if run.notes:
        out += [""] + [f"- {n}" for n in run.notes]
    return "\n".join(out) + "\n"


# -- once per process -----------------------------------------------------------------------

_run: MatrixRun | BaseException | None = None


def matrix() -> MatrixRun:
    """
    The matrix, run on first use (and its document written when asked).
    """
    global _run
    why = postfix_unavailable()
    if why:
        raise unittest.SkipTest(why)
    require_nsd()
    if _run is None:
        try:
            _run = MatrixRun().run()
        except BaseException as e:
            _run = e
            raise
        doc = os.environ.get(DOC_ENV)
        if doc:
            _run.write_doc(os.path.join(PROJECT_ROOT, doc) if not os.path.isabs(doc) else doc)
    if isinstance(_run, BaseException):
        raise AssertionError(f"the matrix run failed: {_run!r}")
    return _run


class TLSMatrixTests(unittest.TestCase):
    """
    Each method checks one aspect of the one matrix run (see the module
    docstring); a failure lists every cell that differs.
    """

    def check(self, category: str) -> None:
        run = matrix()
        lines = run.mismatches.get(category, [])
        if lines:
            self.fail(f"{len(lines)} mismatch(es) in {category}:\n" + "\n".join(lines))

    def test_first_attempt_placement(self) -> None:
        """After the first attempt every cell's message is where the rules put it: stored by its peer over TLS or in cleartext, stored by the secure relay, or deferred with the expected failure class; exactly one copy, no bounce."""
        self.check("placement")

    def test_trace_header(self) -> None:
        """Each delivered message carries one X-Twisted-MTA-TLS header naming the server it was sent to, the TLS version (and the odd cipher), whether the certificate verified (judged at the normal security level: not over TLS 1.0, not with a weak key or signature), the cell's policy and the map entry that chose it, and the decider and failure behind a fallback (with no fallback key, the policy's default decider); the receiving Postfix's Received header agrees about TLS."""
        self.check("trace")

    def test_relay_leg_runs_under_the_relay_policy(self) -> None:
        """A via-relay fallback sends through [outbound.tls.relay] under the relay's own tls_policy (docs/tls.md: "a smarthost under its own policy"), whatever the recipient domain's entry says."""
        self.check("relay-policy")


    def test_failure_class_and_detail(self) -> None:
        """The outbound.tls_decision event of each failing cell names the expected class and detail (unknown CA with its root: unknown-ca; leaf alone: unknown-issuer; RSA-1024/SHA-1 certificate under strict: certificate-weak; TLS 1.0 peer: handshake-no-common-version; cipher outside the defaults: handshake-no-common-cipher; closed after 220: handshake-closed; plain-text answer to the hello: handshake-plaintext; no answer: handshake-timeout); cells without a failure log no decision."""
        self.check("detail")

    def test_early_delay_warnings(self) -> None:
        """Every strict cell deferred by a TLS failure sends alice one delay warning at once (Action delayed, Status 4.7.4/4.7.5) whose text names the server as host[IP]:port and the fact (expiry date, start date, self-signed, untrusted issuer, the certificate's name, key type, size and signature algorithm, no STARTTLS, the 454 words, the versions on each side, cipher, closed connection, plain text, the timeout's seconds); no other cell sends any DSN."""
        self.check("dsn")

    def test_deferred_explanations(self) -> None:
        """The queued outcome of each deferred cell is 451 with 4.7.4 (STARTTLS classes) or 4.7.5, and its text names the server as host[IP]:port, the policy and the fact in plain words."""
        self.check("explanation")

    def test_second_attempt_after_flush(self) -> None:
        """After an operator flush, next-attempt sends the deferred messages in cleartext (never for implicit TLS) with fallback=next-attempt in the header; never, after:30m, relaxed-now (for non-certificate failures) and no fallback under strict or relaxed (never) defer again with the same class; no second delay warning."""
        self.check("second-attempt")

    def test_domain_entry_applies_to_routed_domain(self) -> None:
        """A [outbound.tls.domains] entry (strict/never) applies to its domain when [outbound.routes] sends that domain through a smarthost without its own tls_policy (docs/tls.md, "Choosing the policy": the recipient domain's entry comes first): the self-signed implicit peer gets nothing, the message is deferred."""
        self.check("routed-domain-entry")


    def test_routes_to_one_smarthost_keep_their_own_policies(self) -> None:
        """Two [outbound.routes] entries to the same smarthost with different tls_policy/tls_fallback (strict/never and opportunistic/now), recipients of one message: each is sent under its own route's policy (strict defers on the self-signed implicit peer, opportunistic delivers over TLS)."""
        self.check("shared-smarthost")

