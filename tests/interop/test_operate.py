"""
"Operate it with confidence": the operator's TLS tools against real peers.

The peers are six of the TLS matrix's (L{tests.interop.tls_peers}): one
private Postfix with an smtpd per peer on its own 127.0.0.x address and
certificates made at test time (valid, expired, self-signed, wrong name,
no STARTTLS, TLS 1.0 only), names from a private nsd (wildcard MX per
peer, plus one MX record the history test switches between two peers by
rewriting the zone and reloading nsd).  They are started once per test
process (L{lab}) and shared by every test here; each scenario runs its own
twisted-mta (L{MTAProcess}) once (cached) and stops it, and the test
methods check aspects of what it recorded.

 1. C{twisted-mta tls explain DOMAIN} (a subprocess) for each peer under
    C{strict}/C{never}: golden files C{golden/explain-<peer>.txt} (variable
    parts normalised: port, certificate dates), the verdict and reason
    checked from the peers' properties, and the failure class in
    C{--json}.
 2. Shadow mode: default C{opportunistic}/C{now} with C{shadow = "strict"};
    one message per peer, all delivered; C{tls shadow-report --json} lists
    exactly the five peers strict would have refused, with their classes.
 3. History: C{ratchet = true} for one domain; verified TLS is recorded; the
    domain's MX then loses STARTTLS (DNS switch): deferred, not sent in
    cleartext, and the outcome (and the early warning) says why; the
    history survives a restart; it expires (timestamps aged past a short
    C{history_expiry}); C{tls history --forget} works on the running MTA;
    a change just before a clean stop is kept.
 4. Per-message overrides: C{queue release ID --tls relaxed} (after
    C{queue hold}) delivers a message deferred under strict to the
    self-signed peer over unverified TLS; C{queue flush ID
    --allow-cleartext} delivers one to the no-STARTTLS peer in cleartext;
    the trace header and the log name the operator's override.

Set C{TWISTED_MTA_GOLDEN_UPDATE=1} to rewrite the golden files from the
current output (then read them: they must say the right thing).
Everything is on loopback; the system resolver is never used.
"""

from __future__ import annotations

import atexit
import email
import email.policy
import json
import os
import re
import signal
import smtplib
import subprocess
import sys
import textwrap
import time
import uuid

import dns.exception
import dns.resolver
import trustme
from twisted.trial import unittest

from tests.interop.dns import NSDServer, require_nsd
from tests.interop.support import (
    EVENTS_FILE, LOCAL_DOMAIN, LOOPBACK, MTAProcess, WorkDirs, free_port, json_lines,
    make_message, message_files, postfix_unavailable, stop_each, subprocess_env,
)
from tests.interop.tls_peers import (
    PEERS, RELAY_ADDRESS, CertFiles, MatrixPostfix, Peer, free_port_on_all,
    make_certificates, matrix_zone,
)

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
UPDATE_ENV = "TWISTED_MTA_GOLDEN_UPDATE"
KEEP_ENV = "TWISTED_MTA_OPERATE_KEEP"
ALICE = f"alice@{LOCAL_DOMAIN}"
CA_NAME = "tls-operate trusted CA"  # fixed O and OU: the issuer in golden output
CA_UNIT = "tls-operate testing"

NAMES = ("valid", "expired", "selfsigned", "wrongname", "nostarttls", "tls10")
OP_PEERS = tuple(p for p in PEERS if p.name in NAMES)
BY_NAME = {p.name: p for p in OP_PEERS}
SWITCHED = "ratchet.switch.test"  # its MX is moved from the valid peer to nostarttls
SETTLE = 20.0

# What strict makes of each peer: (class, detail), None when it is satisfied.
STRICT_FAILURE = {
    "valid": None,
    "expired": ("certificate-expired", "expired"),
    "selfsigned": ("certificate-untrusted", "self-signed"),
    "wrongname": ("certificate-host-mismatch", "name"),
    "nostarttls": ("starttls-not-offered", ""),
    "tls10": ("handshake-no-common-version", "versions-refused"),
}


def explain_domain(p: Peer) -> str:
    return f"explain.{p.domain}"


def shadow_rcpt(p: Peer) -> str:
    return f"user@shadow.{p.domain}"


OVERRIDE_RELAXED = f"user@override.{BY_NAME['selfsigned'].domain}"
OVERRIDE_CLEARTEXT = f"user@override.{BY_NAME['nostarttls'].domain}"
HISTORY_RCPTS = [f"user{i}@{SWITCHED}" for i in range(1, 6)]
RECIPIENTS = ([shadow_rcpt(p) for p in OP_PEERS] + [OVERRIDE_RELAXED, OVERRIDE_CLEARTEXT]
              + HISTORY_RCPTS)


# -- the peers, once per process -----------------------------------------------------


class Lab:
    """
    nsd, the certificates and the Postfix playing the six peers, on one
    port of their own; stopped when the test process ends.
    """

    def __init__(self) -> None:
        self.work = WorkDirs("operate", KEEP_ENV)
        self.nsd = self.postfix = None
        self.serial = 1
        self.switched_to = "valid"

    def zones(self) -> dict[str, str]:
        target = BY_NAME[self.switched_to]
        return matrix_zone(OP_PEERS, extra=[(f"{SWITCHED}.", "MX", f"10 {target.mx_host}.")],
                           serial=self.serial)

    def start(self) -> "Lab":
        self.port = free_port_on_all((RELAY_ADDRESS,) + tuple(p.address for p in OP_PEERS))
        self.nsd = NSDServer(self.work.make("nsd"), self.zones()).start()
        self.ca = trustme.CA(organization_name=CA_NAME, organization_unit_name=CA_UNIT)
        self.certs = make_certificates(self.work.make("certs", 0o755), self.ca, OP_PEERS)
        self.postfix = MatrixPostfix(self.work.make("postfix", 0o755), self.port, self.certs,
                                     RECIPIENTS, OP_PEERS)
        self.postfix.start()
        return self

    def stop(self) -> None:
        for problem in stop_each(self.postfix and self.postfix.stop, self.nsd and self.nsd.stop):
            sys.stderr.write(f"test_operate: {problem}\n")
        self.work.finish()

    # -- DNS --------------------------------------------------------------------------

    def resolver(self) -> dns.resolver.Resolver:
        r = dns.resolver.Resolver(configure=False)
        r.nameservers = [LOOPBACK]
        r.port = self.nsd.port
        r.timeout = r.lifetime = 2.0
        return r

    def mx_of(self, domain: str) -> list[str]:
        try:
            answer = self.resolver().resolve(domain, "MX")
        except dns.exception.DNSException:
            return []
        return sorted(str(r.exchange).rstrip(".") for r in answer)

    def switch(self, peer: str) -> None:
        """
        Point L{SWITCHED}'s MX at C{peer}: rewrite the zone with a new
        serial, SIGHUP nsd (it reloads zone files whose mtime changed) and
        wait until it answers with the new MX.
        """
        self.switched_to, self.serial = peer, self.serial + 1
        origin, text = next(iter(self.zones().items()))
        path = self.nsd._zone_file(origin + ".")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        stamp = time.time() + self.serial  # a later mtime than any before
        os.utime(path, (stamp, stamp))
        self.nsd.zones[origin + "."] = text
        os.kill(self.nsd.process.pid, signal.SIGHUP)
        want = [BY_NAME[peer].mx_host]
        deadline = time.monotonic() + 10
        while self.mx_of(SWITCHED) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"nsd still answers {self.mx_of(SWITCHED)} for "
                                     f"{SWITCHED} MX after the reload; {self.nsd.describe()}")
            time.sleep(0.05)

    # -- what the peers stored ----------------------------------------------------------

    def stored(self, rcpt: str, token: str | None = None) -> list[email.message.Message]:
        out = []
        for path in message_files(self.postfix.maildir(rcpt)):
            with open(path, "rb") as f:
                data = f.read()
            if token is None or token.encode() in data:
                out.append(email.message_from_bytes(data, policy=email.policy.compat32))
        return out


_lab: Lab | BaseException | None = None


def lab() -> Lab:
    global _lab
    why = postfix_unavailable()
    if why:
        raise unittest.SkipTest(why)
    require_nsd()
    if _lab is None:
        _lab = Lab()
        atexit.register(_lab.stop)
        try:
            _lab.start()
        except BaseException as e:
            _lab.stop()
            _lab = e
            raise
    if isinstance(_lab, BaseException):
        raise AssertionError(f"the peers failed to start: {_lab!r}")
    return _lab


# -- our MTA ----------------------------------------------------------------------------


def mta_config(lab: Lab, tls: list[str], *, outbound: list[str] = (),
               queue: list[str] = ()) -> str:
    lines = [
        # no DNS cache: switch() repoints an MX under a running MTA
        f'[dns]\nnameservers = ["{lab.nsd.address}"]\ntimeout = "5s"\ncache_ttl = 0\n',
        "[outbound]",
        f"port = {lab.port}",
        'connect_timeout = "5s"',
        'greeting_timeout = "10s"',
        'command_timeout = "10s"',
        'data_timeout = "10s"',
        *outbound,
        "",
        "[outbound.tls]",
        'ca_file = "ca.pem"',
        *tls,
        "",
        "[queue]",
        # Nothing retries by itself: every later attempt is an operator's.
        'retry_schedule = ["1h"]',
        "jitter = 0",
        "delay_warning = false",
        *queue,
        "",
        "[logging]",
        'format = "json"',
        'file = "events.jsonl"',
        "",
    ]
    return "\n".join(lines)


def make_mta(lab: Lab, prefix: str, config: str) -> MTAProcess:
    tmp = lab.work.make(prefix)
    with open(os.path.join(tmp, "ca.pem"), "wb") as f:
        f.write(lab.ca.cert_pem.bytes())
    return MTAProcess(tmp, config, port=free_port())


def cli(mta: MTAProcess, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "twisted_mta.cli", *args, "-c", mta.config_path],
        env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout)


def cli_ok(mta: MTAProcess, *args: str) -> str:
    result = cli(mta, *args)
    if result.returncode != 0:
        raise AssertionError(f"twisted-mta {' '.join(args)} exited {result.returncode}: "
                             f"{result.stdout}{result.stderr}")
    return result.stdout


def send(mta: MTAProcess, rcpt: str, subject: str) -> str:
    token = uuid.uuid4().hex
    with smtplib.SMTP(LOOPBACK, mta.port, local_hostname="client.example.test",
                      timeout=30) as client:
        refused = client.sendmail(ALICE, [rcpt], make_message(
            token, subject=subject, sender=ALICE, recipient=rcpt))
    if refused:
        raise AssertionError(f"refused at submission: {refused}")
    return token


def queue_entry(mta: MTAProcess, token: str) -> dict | None:
    """
    The queue entry (C{queue list --json}) of the message carrying
    C{token}, found through its file in the spool.
    """
    for entry in json.loads(cli_ok(mta, "queue", "list", "--json")):
        qid = entry.get("queue_id")
        for state in ("cur", "hold", "new"):
            path = os.path.join(mta.spool, state, qid or "")
            try:
                with open(path, "rb") as f:
                    if token.encode() in f.read():
                        return entry
            except (FileNotFoundError, IsADirectoryError):
                continue
    return None


def wait(predicate, timeout: float = SETTLE, interval: float = 0.1):
    """
    Poll C{predicate} until it returns something true; return that, or
    None after C{timeout} (the caller records what it saw).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return None
        time.sleep(interval)


def spool_attempts(mta: MTAProcess, token: str) -> int | None:
    """
    How many attempts the queued message carrying C{token} has had, read
    from the spool in this process (cheaper than the CLI for polling).
    """
    from twisted_mta.queue.spool import Spool
    for qid, state, env, _ in Spool(mta.spool).scan():
        try:
            with open(os.path.join(mta.spool, state, qid), "rb") as f:
                if token.encode() in f.read() and env is not None:
                    return env.attempts
        except FileNotFoundError:
            continue
    return None


def wait_attempted(mta: MTAProcess, token: str, attempts: int) -> dict | None:
    """
    The queue entry (C{queue list --json}) once it has had C{attempts}
    attempts (None if it never got there, or left the queue).
    """
    wait(lambda: (spool_attempts(mta, token) or 0) >= attempts)
    entry = queue_entry(mta, token)
    return entry if entry and entry.get("attempts", 0) >= attempts else None


def history_file(mta: MTAProcess) -> dict:
    """
    C{<spool>/tls/history.json} as it is (for polling; the facts come
    from the CLI).
    """
    try:
        with open(os.path.join(mta.spool, "tls", "history.json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def best_in_file(mta: MTAProcess, domain: str) -> str:
    return (history_file(mta).get(domain) or {}).get("best", "")


def events(mta: MTAProcess) -> list[dict]:
    return json_lines(os.path.join(mta.tmpdir, EVENTS_FILE))


def trace(msg) -> str | None:
    values = msg.get_all("X-Twisted-MTA-TLS") or []
    return " ".join(str(values[0]).split()) if len(values) == 1 else None


def dsns(mta: MTAProcess, token: str) -> list[tuple[str, str, str]]:
    """
    (Action, Status, text) of each DSN to alice about the message with
    C{token} (its Message-ID is in the returned headers).
    """
    out = []
    for path in message_files(mta.maildir("alice")):
        with open(path, "rb") as f:
            data = f.read()
        if token.encode() not in data:
            continue
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
        text = "".join(str(p.get_payload(decode=True), "utf-8", "replace")
                       for p in msg.walk() if p.get_content_type() == "text/plain")
        for part in msg.walk():
            if part.get_content_type() == "message/delivery-status":
                for block in part.get_payload()[1:]:
                    out.append((" ".join(str(block["Action"]).split()),
                                " ".join(str(block["Status"]).split()), text))
    return out


def flat(text: str) -> str:
    return " ".join((text or "").split())


def day(t) -> str:
    return f"{t.day} {t.strftime('%B %Y')}"


# -- 1. tls explain ----------------------------------------------------------------------

_explained: dict | BaseException | None = None


def explained() -> dict:
    """
    {peer name: (text result, json result)} of C{twisted-mta tls explain}
    for each peer's C{explain.<peer>.test} (strict, fallback never), all
    run at once as subprocesses; the configuration is an MTA's that is
    not running (explain needs only the file).
    """
    global _explained
    the_lab = lab()
    if _explained is None:
        try:
            tls = ['policy = "opportunistic"', 'fallback = "now"']
            for p in OP_PEERS:
                tls += ["", f'[outbound.tls.domains."{explain_domain(p)}"]',
                        'policy = "strict"', 'fallback = "never"']
            mta = make_mta(the_lab, "explain", mta_config(the_lab, tls))
            procs = {}
            for p in OP_PEERS:
                for js in (False, True):
                    procs[p.name, js] = subprocess.Popen(
                        [sys.executable, "-m", "twisted_mta.cli", "tls", "explain",
                         explain_domain(p), "-c", mta.config_path] + (["--json"] if js else []),
                        env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
            results = {}
            for key, proc in procs.items():
                out, err = proc.communicate(timeout=60)
                results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            _explained = {p.name: (results[p.name, False], results[p.name, True])
                          for p in OP_PEERS}
        except BaseException as e:
            _explained = e
            raise
    if isinstance(_explained, BaseException):
        raise AssertionError(f"running tls explain failed: {_explained!r}")
    return _explained


SENDER_HEADING = "    a sender would read:"
SENDER_INDENT = " " * 6


def normalise_explain(text: str, port: int, cert: CertFiles | None) -> str:
    """
    The explain output with its variable parts replaced: the port, and the
    certificate's dates (as printed, C{2026-03-01}, and in words, C{1 March
    2026}).  The sender's paragraph is unwrapped before and wrapped again
    (as the command does) after the replacement, so a date's length does
    not move its line breaks.
    """
    # the private name server's port, where the DANE line names it
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<dns-port>", text)
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        out.append(lines[i])
        if lines[i] == SENDER_HEADING:
            para = []
            i += 1
            while i < len(lines) and lines[i].startswith(SENDER_INDENT):
                para.append(lines[i].strip())
                i += 1
            out.append("\x00" + " ".join(para))
            continue
        i += 1
    text = "\n".join(out)
    text = text.replace(f" port {port}:", " port <port>:").replace(f"]:{port}", "]:<port>")
    if cert is not None:
        for t, tag in ((cert.not_before, "<not-before>"), (cert.not_after, "<not-after>")):
            text = text.replace(t.strftime("%Y-%m-%d"), tag).replace(day(t), tag)
    out = []
    for line in text.split("\n"):
        if line.startswith("\x00"):
            out.extend(textwrap.wrap(line[1:], 76, initial_indent=SENDER_INDENT,
                                     subsequent_indent=SENDER_INDENT))
        else:
            out.append(line)
    return "\n".join(out) + "\n"


def handshake_completes(p: Peer) -> bool:
    """
    Whether a strict client gets as far as the peer's certificate.
    """
    return p.starttls == "offered" and p.max_version in ("TLSv1.2", "TLSv1.3")


def explain_facts(p: Peer, cert: CertFiles | None) -> list[tuple[str, str]]:
    """
    (what, regex) the text output for peer C{p} must contain, from the
    peer's properties and docs/tls.md: the policy and its map entry, the
    server, the TLS and certificate facts, the verdict, the fallback
    decision and the words a sender would read.  With C{cert} None, for
    the normalised form (golden files): dates as placeholders.
    """
    d = explain_domain(p)
    facts = [
        ("the policy and the map entry that chose it",
         rf"^MX 10 {re.escape(p.mx_host)}: policy strict \(chosen by domain {re.escape(d)}\), "
         r"fallback never \(written\)$"),
        ("the server's address", rf"^  {re.escape(p.address)} port (\d+|<port>):$"),
    ]
    if handshake_completes(p):
        names = (f"mx.other-name.{p.domain.rpartition('.')[2]}",) if p.cert == "wrong-name" \
            else (p.mx_host,)
        issuer = p.mx_host if p.cert == "self-signed" else f"OU={CA_UNIT},O={CA_NAME}"
        dates = (f"{cert.not_before:%Y-%m-%d} to {cert.not_after:%Y-%m-%d}" if cert
                 else "<not-before> to <not-after>")
        facts.append(("the certificate: subject, names, issuer, dates",
                      rf"^    certificate: {re.escape(names[0])}; names "
                      rf"{re.escape(', '.join(names))}; issuer {re.escape(issuer)}; valid "
                      rf"{re.escape(dates)}$"))
    failure = STRICT_FAILURE[p.name]
    if failure is None:
        facts += [
            ("TLS version, cipher and the verification result",
             r"^    TLSv1\.3 TLS_\w+; certificate verified \(required\)$"),
            ("the verdict", r"^    delivery would go ahead$"),
        ]
        return facts
    kind, detail = failure
    facts += [
        ("the failure class (and detail) with its TLS-RPT result",
         rf"^    TLS FAILED: {re.escape(kind)}"
         + (rf" \({re.escape(detail)}\)" if detail else "") + r"; TLS-RPT [\w-]+$"),
        ("the fallback decision", r"^    fallback never: defer - "),
        ("the text a sender would read", rf"^{SENDER_HEADING}$"),
    ]
    return facts


def sender_facts(p: Peer, cert: CertFiles | None) -> list[tuple[str, str]]:
    """
    What the sender's paragraph must say (on the unwrapped text): the
    server, the fact that failed, the policy, that nothing was sent, and
    the advice.
    """
    if STRICT_FAILURE[p.name] is None:
        return []  # nothing fails: no paragraph
    pats = [("the server", re.escape(f"{p.mx_host}[{p.address}]:")),
            ("the policy", r'"strict" policy'),
            ("that the message was not sent", r"not sent"),
            ("that fallback never sends it otherwise", r"never sent there without")]
    if p.name == "expired":
        pats.append(("the expiry date", re.escape(f"expired on {day(cert.not_after)}")))
    elif p.name == "selfsigned":
        pats.append(("self-signed", r"self-signed"))
    elif p.name == "wrongname":
        pats.append(("the certificate's name and the expected one",
                     re.escape(f"certificate for {cert.names[0]}, not for {p.mx_host}")))
    elif p.name == "nostarttls":
        pats.append(("no STARTTLS", r"no STARTTLS"))
    elif p.name == "tls10":
        pats.append(("no common TLS version", r"no TLS version in common"))
    return pats


def sender_paragraph(text: str) -> str:
    lines = text.splitlines()
    if SENDER_HEADING not in lines:
        return ""
    i = lines.index(SENDER_HEADING) + 1
    para = []
    while i < len(lines) and lines[i].startswith(SENDER_INDENT):
        para.append(lines[i].strip())
        i += 1
    return " ".join(para)


class ExplainTests(unittest.TestCase):
    """
    C{twisted-mta tls explain explain.<peer>.test}, strict with fallback
    never from a domain entry, against each real peer.
    """

    def check_golden(self, name: str) -> None:
        the_lab = lab()
        p = BY_NAME[name]
        text, _ = explained()[name]
        self.assertEqual(text.returncode, 0, f"exit {text.returncode}: {text.stderr}")
        cert = the_lab.certs.get(name)
        got = normalise_explain(text.stdout, the_lab.port, cert)
        path = os.path.join(GOLDEN, f"explain-{name}.txt")
        if os.environ.get(UPDATE_ENV):
            os.makedirs(GOLDEN, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(got)
        with open(path, encoding="utf-8") as f:
            golden = f.read()
        # The golden file itself must say the right thing (it is compared
        # to the normalised output, so check it in the same form).
        lacking = [what for what, pat in explain_facts(p, None)
                   if not re.search(pat, golden, re.M)]
        self.assertEqual(lacking, [], f"{path} does not show {', '.join(lacking)}:\n{golden}")
        self.assertEqual(got, golden, f"tls explain {explain_domain(p)} differs from {path}; "
                         f"raw output:\n{text.stdout}")
        # And the raw output with its real dates.
        lacking = [what for what, pat in explain_facts(p, cert)
                   if not re.search(pat, text.stdout, re.M)]
        lacking += [what for what, pat in sender_facts(p, cert)
                    if not re.search(pat, sender_paragraph(text.stdout))]
        self.assertEqual(lacking, [], f"tls explain {explain_domain(p)} does not show "
                         f"{', '.join(lacking)}:\n{text.stdout}")

    def test_explain_valid(self) -> None:
        """Valid certificate: TLS 1.3 with its cipher, the certificate (subject, names, issuer, dates) verified as required, delivery would go ahead."""
        self.check_golden("valid")

    def test_explain_expired(self) -> None:
        """Expired certificate: certificate-expired, fallback never defers, the sender would read the expiry date."""
        self.check_golden("expired")

    def test_explain_selfsigned(self) -> None:
        """Self-signed certificate: certificate-untrusted (self-signed), the issuer is the server itself."""
        self.check_golden("selfsigned")

    def test_explain_wrongname(self) -> None:
        """Certificate for another name: certificate-host-mismatch naming both names."""
        self.check_golden("wrongname")

    def test_explain_nostarttls(self) -> None:
        """No STARTTLS: starttls-not-offered, fallback never defers."""
        self.check_golden("nostarttls")

    def test_explain_says_when_strict_can_go_in_cleartext(self) -> None:
        """A strict entry whose decider can reach cleartext (now): tls explain says so plainly, names the fallback as written, and the expired peer's decision is cleartext with the words of the final decision; with no fallback written the policy's default (never) applies and no warning is printed."""
        the_lab = lab()
        expired = BY_NAME["expired"]
        risky, safe = f"risky.{expired.domain}", f"safe.{expired.domain}"
        mta = make_mta(the_lab, "explain-risky", mta_config(the_lab, [
            'policy = "opportunistic"', "",
            f'[outbound.tls.domains."{risky}"]', 'policy = "strict"', 'fallback = "now"', "",
            f'[outbound.tls.domains."{safe}"]', 'policy = "strict"']))
        text = cli(mta, "tls", "explain", risky, timeout=60).stdout
        self.assertIn(f"policy strict (chosen by domain {risky}), fallback now (written)", text)
        self.assertIn(f'WARNING: the fallback decider "now" lets mail for {risky} go out in '
                      f'cleartext after a TLS failure, although its policy "strict" requires '
                      "TLS", text)
        self.assertIn("fallback now: cleartext", text)
        self.assertIn('the fallback decider "now" sends it without encryption instead',
                      " ".join(text.split()))
        text = cli(mta, "tls", "explain", safe, timeout=60).stdout
        self.assertIn("fallback never (the policy's default)", text)
        self.assertNotIn("WARNING", text)
        self.assertIn("fallback never: defer", text)

    def test_explain_tls10(self) -> None:
        """TLS 1.0 only: handshake-no-common-version (versions-refused), naming what we offered."""
        self.check_golden("tls10")

    def test_explain_json_failure_class(self) -> None:
        """--json: for each peer the host's policy, its map entry and the fallback; the failure class, detail and TLS-RPT result (none for the valid peer, whose TLS is verified); the decision (defer by never) and the sender's text."""
        the_lab = lab()
        problems = []
        for p in OP_PEERS:
            _, js = explained()[p.name]
            try:
                report = json.loads(js.stdout)
                host = report["hosts"][0]
                address = host["addresses"][0]
            except (ValueError, KeyError, IndexError) as e:
                problems.append(f"{p.name}: no usable JSON ({e!r}): {js.stdout}{js.stderr}")
                continue
            want = {"host": p.mx_host, "policy": "strict",
                    "policy_from": f"domain {explain_domain(p)}", "fallback": "never"}
            got = {k: host.get(k) for k in want}
            if got != want:
                problems.append(f"{p.name}: host {got}, expected {want}")
            if (address.get("address"), address.get("port")) != (p.address, the_lab.port):
                problems.append(f"{p.name}: probed {address.get('address')}:"
                                f"{address.get('port')}")
            failure = STRICT_FAILURE[p.name]
            if failure is None:
                tls = address.get("tls") or {}
                if address.get("ok") is not True or "tls_failure" in address or not (
                        tls.get("verified") and tls.get("verification_required")
                        and tls.get("version") == "TLSv1.3" and tls.get("cipher")):
                    problems.append(f"{p.name}: expected verified TLS 1.3, got {address}")
                continue
            f = address.get("tls_failure") or {}
            if (f.get("kind"), f.get("detail")) != failure:
                problems.append(f"{p.name}: failure class {f.get('kind')}/{f.get('detail')}, "
                                f"expected {failure[0]}/{failure[1]}")
            decision = address.get("decision") or {}
            if (address.get("ok"), decision.get("action"), decision.get("decider")) != (
                    False, "defer", "never"):
                problems.append(f"{p.name}: ok={address.get('ok')}, decision {decision}, "
                                "expected a failure deferred by never")
            if p.name in ("expired", "selfsigned", "wrongname"):
                cert = address.get("certificate") or {}
                if cert.get("names") != list(the_lab.certs[p.name].names) or \
                        cert.get("self_signed") != (p.cert == "self-signed"):
                    problems.append(f"{p.name}: certificate {cert}")
            if p.mx_host not in (address.get("sender_would_read") or ""):
                problems.append(f"{p.name}: sender_would_read does not name {p.mx_host}: "
                                f"{address.get('sender_would_read')!r}")
        self.assertEqual(problems, [], "\n".join(problems))

    def test_explain_shows_tls_of_failed_certificate_handshakes(self) -> None:
        """For the expired, self-signed and wrong-name peers the handshake completes (TLS 1.3) and fails only on the certificate check afterwards: explain should still show the TLS version and cipher it got (text and --json), as it does for the valid peer."""
        problems = []
        for name in ("expired", "selfsigned", "wrongname"):
            text, js = explained()[name]
            if not re.search(r"^    TLSv1\.3 TLS_\w+", text.stdout, re.M):
                problems.append(f"{name}: no TLS version/cipher line in the text:\n"
                                f"{text.stdout}")
            try:
                address = json.loads(js.stdout)["hosts"][0]["addresses"][0]
            except (ValueError, KeyError, IndexError):
                address = {}
            if not (address.get("tls") or {}).get("version"):
                problems.append(f"{name}: no 'tls' version/cipher in --json (keys: "
                                f"{sorted(address)})")
        self.assertEqual(problems, [], "\n".join(problems))



# -- 2. shadow mode --------------------------------------------------------------------------

_shadow: dict | BaseException | None = None


def shadow_run() -> dict:
    """
    One MTA, default opportunistic/now with shadow strict; one message per
    peer; wait until each is stored by its peer (or after a while give
    up); then the shadow report (JSON and text).
    """
    global _shadow
    the_lab = lab()
    if _shadow is None:
        mta = None
        try:
            mta = make_mta(the_lab, "shadow", mta_config(the_lab, [
                'policy = "opportunistic"', 'fallback = "now"', 'shadow = "strict"']))
            mta.start()
            tokens = {p.name: send(mta, shadow_rcpt(p), f"shadow {p.name}") for p in OP_PEERS}
            wait(lambda: all(the_lab.stored(shadow_rcpt(p), tokens[p.name]) for p in OP_PEERS))
            # The report is appended through the I/O pool: give it a moment
            # after the last session.
            shadow_file = os.path.join(mta.spool, "tls", "shadow.jsonl")

            def lines() -> int:
                try:
                    with open(shadow_file, encoding="utf-8") as f:
                        return len(f.readlines())
                except FileNotFoundError:
                    return 0
            wait(lambda: lines() >= 5, timeout=1.5)
            _shadow = {
                "stored": {p.name: the_lab.stored(shadow_rcpt(p), tokens[p.name])
                           for p in OP_PEERS},
                "queue": json.loads(cli_ok(mta, "queue", "list", "--json")),
                "report": cli(mta, "tls", "shadow-report", "--json"),
                "text": cli(mta, "tls", "shadow-report"),
                "events": [e for e in events(mta) if e.get("event") == "tls.shadow"],
                "connected": [e for e in events(mta) if e.get("event") == "outbound.connected"],
                "history": history_json(mta),
            }
        except BaseException as e:
            _shadow = e
            raise
        finally:
            if mta is not None:
                mta.cleanup()
    if isinstance(_shadow, BaseException):
        raise AssertionError(f"the shadow run failed: {_shadow!r}")
    return _shadow


class ShadowTests(unittest.TestCase):
    """
    Default policy opportunistic (fallback now) with C{shadow = "strict"}:
    one message to each peer.
    """

    def test_verification_judged_at_the_normal_level(self) -> None:
        """Opportunistic takes TLS 1.0 at security level 0, but the session is judged as strict would judge it: the log says "certificate not verified (TLS 1.0 is below TLS 1.2)" and the TLS history learns "encrypted", not "verified" (the ratchet never learns verified from it); the valid peer is verified."""
        run = shadow_run()
        by_host = {e.get("peer", "").partition("[")[0]: e for e in run["connected"]}
        tls10, valid = BY_NAME["tls10"], BY_NAME["valid"]
        e = by_host[tls10.mx_host]
        self.assertEqual((e.get("version"), e.get("verified")), ("TLSv1.0", False), e)
        self.assertIn("certificate not verified (TLS 1.0 is below TLS 1.2)", e.get("tls"))
        history = {h["domain"]: h for h in run["history"]} if isinstance(
            run["history"], list) else run["history"]
        self.assertEqual(history[shadow_rcpt(tls10).rpartition("@")[2]]["best"], "encrypted")
        self.assertEqual(history[shadow_rcpt(valid).rpartition("@")[2]]["best"], "verified")
        self.assertTrue(by_host[valid.mx_host].get("verified"))

    def test_every_message_delivered(self) -> None:
        """The shadow policy only reports: every message is stored by its peer (once) under the active opportunistic policy, over TLS where the peer has it (TLS 1.0 included) and in cleartext from the no-STARTTLS peer; nothing stays queued."""
        run = shadow_run()
        problems = []
        for p in OP_PEERS:
            copies = run["stored"][p.name]
            if len(copies) != 1:
                problems.append(f"{p.name}: {len(copies)} stored copies, expected 1")
                continue
            t = trace(copies[0]) or ""
            tls = "no TLS" if p.starttls == "absent" else (
                "TLSv1.0 " if p.max_version == "TLSv1.0" else "TLSv1.3 ")
            if f" {tls}" not in t or "policy opportunistic (default)" not in t \
                    or "fallback=" in t:
                problems.append(f"{p.name}: header {t!r}, expected {tls.strip()} under policy "
                                "opportunistic (default), no fallback")
        if run["queue"]:
            problems.append(f"still queued: {run['queue']}")
        self.assertEqual(problems, [], "\n".join(problems))

    def rows(self) -> list[dict]:
        report = shadow_run()["report"]
        self.assertEqual(report.returncode, 0, report.stderr)
        return json.loads(report.stdout)

    def expected_row(self, p: Peer) -> tuple:
        kind, detail = STRICT_FAILURE[p.name]
        if p.name == "tls10":
            # The shadow judges a session that ran at TLS 1.0: the server
            # chose a version below strict's floor.
            detail = "server-too-old"
        return (f"shadow.{p.domain}", p.mx_host, "opportunistic", "strict", kind, detail, 1)

    @staticmethod
    def row_key(r: dict) -> tuple:
        return (r["domain"], r["host"], r["policy"], r["shadow"], r["kind"], r["detail"] or "",
                r["count"])

    def test_shadow_report_lists_what_strict_would_refuse(self) -> None:
        """tls shadow-report --json lists exactly the peers strict would have refused (expired, self-signed, wrong name, no STARTTLS, TLS 1.0 only; not the valid one), one row each, with the failure class (and detail), the host, the active and the shadow policy, and a reason naming the host; the text report names the same domains."""
        rows = self.rows()
        got = sorted(self.row_key(r) for r in rows)
        want = sorted(self.expected_row(p) for p in OP_PEERS
                      if STRICT_FAILURE[p.name] is not None)
        self.assertEqual(got, want, f"shadow report:\n{shadow_run()['report'].stdout}")
        for r in rows:
            self.assertIn(r["host"], r["reason"], r)
        text = shadow_run()["text"].stdout
        for p in OP_PEERS:
            if STRICT_FAILURE[p.name] is None:
                self.assertNotIn(p.domain, text)
            else:
                self.assertIn(f"shadow.{p.domain}", text)


    def test_shadow_report_certificate_and_starttls_rows(self) -> None:
        """The rows for the expired, self-signed, wrong-name and no-STARTTLS peers are there with their classes (certificate-expired, certificate-untrusted/self-signed, certificate-host-mismatch, starttls-not-offered), and there is no row for the valid peer nor any row not expected."""
        rows = self.rows()
        got = sorted(self.row_key(r) for r in rows)
        failing = [p for p in OP_PEERS if STRICT_FAILURE[p.name] is not None]
        want = [self.expected_row(p) for p in failing if p.name != "tls10"]
        for row in want:
            self.assertIn(row, got)
        allowed = {self.expected_row(p) for p in failing}
        self.assertEqual([r for r in got if r not in allowed], [], "unexpected rows")
        self.assertFalse([r for r in rows if BY_NAME["valid"].domain in r["domain"]])


# -- 3. history and the ratchet ---------------------------------------------------------------

_history: dict | BaseException | None = None
HISTORY_EXPIRY_DAYS = 10


def queue_entry_gone(mta: MTAProcess, token: str) -> bool:
    """
    Whether no queue file (received, deferred or held) carries C{token}.
    """
    for d in ("tmp", "new", "cur", "hold"):
        directory = os.path.join(mta.spool, d)
        for name in os.listdir(directory) if os.path.isdir(directory) else ():
            try:
                with open(os.path.join(directory, name), "rb") as f:
                    if token.encode() in f.read():
                        return False
            except (FileNotFoundError, IsADirectoryError):
                continue
    return True


def delivered_event(mta: MTAProcess, rcpt: str) -> bool:
    return any(e.get("event") == "delivery.delivered" and e.get("rcpt") == rcpt
               for e in events(mta))


def history_json(mta: MTAProcess) -> dict:
    return json.loads(cli_ok(mta, "tls", "history", "--json"))


def history_run() -> dict:
    """
    The history scenario, step by step, recording what each step showed
    (the tests check it):

     1. user1: MX is the valid peer; delivered over verified TLS; the
        history says "verified".
     2. The MX moves to the no-STARTTLS peer; user2: deferred by the
        ratchet (nothing stored there), with its outcome and early warning.
     3. Restart; the history file still says verified; a flush of user2's
        message: deferred again by the ratchet (the history was loaded).
     4. Stop; age the history by more than C{history_expiry}; start; the
        history as the CLI shows it; a flush of user2's message: sent in
        cleartext (the ratchet no longer applies).
     5. The MX back to the valid peer; user3: verified again; then
        C{tls history --forget} against the running MTA; the MX to the
        no-STARTTLS peer; user4: sent in cleartext.
     6. The MX back to the valid peer; user5: delivered over verified TLS;
        the MTA is stopped cleanly (SIGTERM) as soon as it logged the
        delivery; what the history file says then.
    """
    global _history
    the_lab = lab()
    if _history is None:
        mta = None
        facts: dict = {}
        try:
            tls = ['policy = "opportunistic"', 'fallback = "now"',
                   # The ratchet keeps the opportunistic policy's name: list it
                   # so its deferral warns the sender at once.
                   'early_warning = ["strict", "opportunistic"]',
                   f'history_expiry = "{HISTORY_EXPIRY_DAYS}d"',
                   "", f'[outbound.tls.domains."{SWITCHED}"]', 'policy = "opportunistic"',
                   'fallback = "now"', "ratchet = true"]
            # One message per connection: no idle connection to the old MX
            # carries a message after the DNS switch.
            mta = make_mta(the_lab, "history", mta_config(
                the_lab, tls, outbound=["messages_per_connection = 1"]))
            mta.start()
            u1, u2, u3, u4, u5 = HISTORY_RCPTS
            the_lab.switch("valid")

            # 1.
            t1 = send(mta, u1, "history 1")
            facts["1.stored"] = wait(lambda: the_lab.stored(u1, t1)) or []
            wait(lambda: best_in_file(mta, SWITCHED) == "verified", timeout=5)
            facts["1.history"] = history_json(mta)

            # 2.
            the_lab.switch("nostarttls")
            t2 = send(mta, u2, "history 2")
            facts["2.entry"] = wait_attempted(mta, t2, 1)
            facts["2.dsns"] = wait(lambda: dsns(mta, t2), timeout=5) or []
            facts["2.stored"] = the_lab.stored(u2, t2)
            facts["2.decisions"] = [e for e in events(mta)
                                    if e.get("event") == "outbound.tls_decision"]
            facts["2.history"] = history_json(mta)

            # 3.  (The history is saved at most once a second: wait for the
            # failure to be on disk before stopping.)
            wait(lambda: (history_file(mta).get(SWITCHED) or {}).get("failures", 0) >= 1,
                 timeout=5)
            mta.stop()
            facts["3.history_file"] = history_json(mta)
            mta.start()
            facts["3.history"] = history_json(mta)
            qid = (facts["2.entry"] or {}).get("queue_id")
            facts["qid"] = qid
            if qid:
                cli_ok(mta, "queue", "flush", qid)
                facts["3.entry"] = wait_attempted(mta, t2, 2)
                facts["3.stored"] = the_lab.stored(u2, t2)

            # 4.
            wait(lambda: (history_file(mta).get(SWITCHED) or {}).get("failures", 0) >= 2,
                 timeout=5)
            mta.stop()
            path = os.path.join(mta.spool, "tls", "history.json")
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            facts["4.before_aging"] = json.loads(json.dumps(data))
            shift = (HISTORY_EXPIRY_DAYS + 1) * 86400
            for entry in data.values():
                for key in ("best_at", "last_failure", "broken_until"):
                    if entry.get(key):
                        entry[key] -= shift
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f)
            mta.start()
            facts["4.history"] = history_json(mta)
            if qid:
                cli_ok(mta, "queue", "flush", qid)
                facts["4.stored"] = wait(lambda: the_lab.stored(u2, t2)) or []
                facts["4.entry"] = queue_entry(mta, t2)

            # 5.
            the_lab.switch("valid")
            t3 = send(mta, u3, "history 3")
            facts["5.stored3"] = wait(lambda: the_lab.stored(u3, t3)) or []
            # The aged entry still says "verified" on disk until the MTA saves:
            # wait for a current one (as the CLI counts it).
            wait(lambda: (history_json(mta).get(SWITCHED) or {}).get("best") == "verified",
                 timeout=5)
            facts["5.history"] = history_json(mta)
            facts["5.forget"] = cli(mta, "tls", "history", "--forget", SWITCHED)
            wait(lambda: SWITCHED not in history_file(mta), timeout=5)
            facts["5.history_after_forget"] = history_json(mta)
            the_lab.switch("nostarttls")
            t4 = send(mta, u4, "history 4")
            facts["5.stored4"] = wait(lambda: the_lab.stored(u4, t4)) or []
            facts["5.entry4"] = queue_entry(mta, t4)

            # 6.
            the_lab.switch("valid")
            t5 = send(mta, u5, "history 5")
            facts["6.sent"] = wait(lambda: queue_entry_gone(mta, t5) and delivered_event(
                mta, u5))
            mta.stop()
            facts["6.history_file"] = history_file(mta)
            facts["6.stored"] = wait(lambda: the_lab.stored(u5, t5)) or []
            facts["events"] = events(mta)
            facts["t2"] = t2
            _history = facts
        except BaseException as e:
            _history = e
            raise
        finally:
            if mta is not None:
                mta.cleanup()
            try:
                the_lab.switch("valid")
            except Exception:
                pass
    if isinstance(_history, BaseException):
        raise AssertionError(f"the history run failed: {_history!r}")
    return _history


def pending_outcome(entry: dict | None) -> dict:
    for r in (entry or {}).get("recipients", []):
        if r.get("state") == "pending":
            return r.get("outcome") or {}
    return {}


RATCHET_WORDS = [
    ("the domain", re.escape(SWITCHED)),
    ("that it used verified TLS before", rf"{re.escape(SWITCHED)} used verified TLS on "),
    ("the server", re.escape(BY_NAME["nostarttls"].mx_host)),
    ("no STARTTLS", r"no STARTTLS|does not offer encryption"),
    ("no silent downgrade", r"drop silently to cleartext|downgrade"),
]


class HistoryTests(unittest.TestCase):
    """
    C{ratchet = true} for ratchet.switch.test, whose MX moves from the
    valid peer to the no-STARTTLS one (see L{history_run}).
    """

    def test_verified_tls_recorded(self) -> None:
        """A delivery over verified TLS to the valid peer is recorded as "verified" in tls history --json."""
        h = history_run()
        self.assertEqual(len(h["1.stored"]), 1, "the first message was not delivered")
        self.assertRegex(trace(h["1.stored"][0]) or "",
                         r"^mx\.valid\.test\[127\.0\.0\.10\]:\d+ TLSv1\.3 \S+, certificate "
                         r"verified; policy opportunistic \(domain ratchet\.switch\.test\)$")
        self.assertEqual((h["1.history"].get(SWITCHED) or {}).get("best"), "verified",
                         h["1.history"])

    def test_downgrade_deferred_and_explained(self) -> None:
        """When the domain's MX loses STARTTLS the next message is deferred (451 4.7.4, starttls-not-offered), not sent in cleartext (the peer stores nothing), although opportunistic/now would send in cleartext; the queued outcome, the logged decision and the early delay warning say that the domain used verified TLS before."""
        h = history_run()
        self.assertEqual(h["2.stored"], [], "sent in cleartext despite the ratchet")
        self.assertIsNotNone(h["2.entry"], "the message is neither queued nor attempted")
        o = pending_outcome(h["2.entry"])
        self.assertEqual((o.get("code"), o.get("enhanced"), o.get("kind")),
                         (451, "4.7.4", "starttls-not-offered"), o)
        text = flat(o.get("text"))
        lacking = [w for w, pat in RATCHET_WORDS if not re.search(pat, text)]
        self.assertEqual(lacking, [], f"the queued outcome does not say {lacking}: {text!r}")
        self.assertIn(SWITCHED, flat(h["2.entry"].get("last_outcome", {}).get("text", "")),
                      "queue list's last outcome")
        # The decider (fallback now) would send in cleartext; the ratchet rule decided.
        decisions = [(e.get("kind"), e.get("decider"), e.get("rule"), e.get("action"))
                     for e in h["2.decisions"] if e.get("destination") == SWITCHED]
        self.assertEqual(decisions, [("starttls-not-offered", "now", "ratchet", "defer")])
        warnings = [(a, s) for a, s, _ in h["2.dsns"]]
        self.assertEqual(warnings, [("delayed", "4.7.4")], "one early delay warning")
        warning = flat(h["2.dsns"][0][2])
        lacking = [w for w, pat in RATCHET_WORDS if not re.search(pat, warning)]
        self.assertEqual(lacking, [], f"the delay warning does not say {lacking}:\n{warning}")

    def test_history_survives_restart(self) -> None:
        """After a restart tls history --json still says verified, and the ratchet still applies: a flush of the deferred message defers it again the same way, nothing is sent in cleartext."""
        h = history_run()
        for key in ("3.history_file", "3.history"):
            self.assertEqual((h[key].get(SWITCHED) or {}).get("best"), "verified",
                             f"{key}: {h[key]}")
        entry = h.get("3.entry")
        self.assertIsNotNone(entry, "the flushed message was not attempted again")
        self.assertEqual(entry.get("attempts"), 2)
        self.assertEqual(h["3.stored"], [])
        o = pending_outcome(entry)
        self.assertEqual(o.get("kind"), "starttls-not-offered", o)
        self.assertRegex(flat(o.get("text")), rf"{re.escape(SWITCHED)} used verified TLS on ")

    def test_expired_history_no_longer_ratchets(self) -> None:
        """With the history aged past history_expiry (10d; timestamps moved back 11 days while the MTA was stopped) the ratchet no longer applies: the flushed message goes to the no-STARTTLS peer in cleartext under plain opportunistic, and leaves the queue."""
        h = history_run()
        self.assertEqual((h["4.before_aging"].get(SWITCHED) or {}).get("best"), "verified")
        stored = h.get("4.stored") or []
        self.assertEqual(len(stored), 1, "not delivered after the history expired; queue: "
                         f"{h.get('4.entry')}")
        self.assertRegex(trace(stored[0]) or "",
                         r"^mx\.nostarttls\.test\[127\.0\.0\.17\]:\d+ no TLS; policy "
                         r"opportunistic \(domain ratchet\.switch\.test\)$")
        self.assertIsNone(h.get("4.entry"))

    def test_expired_history_not_shown_as_current(self) -> None:
        """tls history --json on the restarted MTA does not present the expired entry as the domain's current verified TLS (history_expiry applies to what the operator is shown, as it does to the ratchet)."""
        h = history_run()
        shown = (h["4.history"].get(SWITCHED) or {}).get("best", "none")
        self.assertEqual(shown, "none", f"tls history --json after expiry: {h['4.history']}")


    def test_history_kept_over_prompt_clean_stop(self) -> None:
        """A verified delivery just before a clean stop (SIGTERM as soon as the delivery is logged) is in the history file afterwards: a restart right after a delivery does not forget that the domain did verified TLS."""
        h = history_run()
        self.assertTrue(h["6.sent"], "the last message was not delivered")
        self.assertEqual(len(h["6.stored"]), 1)
        self.assertEqual((h["6.history_file"].get(SWITCHED) or {}).get("best"), "verified",
                         f"history file after the stop: {h['6.history_file']}")


    def test_forget_on_running_mta(self) -> None:
        """tls history --forget DOMAIN against the running MTA is passed to it (exit 0, "requested"); the domain disappears from tls history --json, and the ratchet is gone: after the MX loses STARTTLS again the next message is delivered in cleartext."""
        h = history_run()
        self.assertEqual(len(h["5.stored3"]), 1)
        self.assertEqual((h["5.history"].get(SWITCHED) or {}).get("best"), "verified",
                         h["5.history"])
        forget = h["5.forget"]
        self.assertEqual(forget.returncode, 0, forget.stderr)
        self.assertIn("requested", forget.stdout)
        self.assertNotIn(SWITCHED, h["5.history_after_forget"])
        stored = h["5.stored4"]
        self.assertEqual(len(stored), 1, f"not delivered after forget; queue: {h['5.entry4']}")
        self.assertRegex(trace(stored[0]) or "",
                         r"^mx\.nostarttls\.test\[127\.0\.0\.17\]:\d+ no TLS; policy "
                         r"opportunistic \(domain ratchet\.switch\.test\)$")


# -- 4. per-message overrides ----------------------------------------------------------------

_override: dict | BaseException | None = None


def override_run() -> dict:
    """
    One MTA with strict/never for override.selfsigned.test and
    override.nostarttls.test; one message to each, deferred; then the
    first is held and released with C{--tls relaxed}, the second flushed
    with C{--allow-cleartext}.
    """
    global _override
    the_lab = lab()
    if _override is None:
        mta = None
        facts: dict = {}
        try:
            tls = ['policy = "opportunistic"', 'fallback = "now"']
            for rcpt in (OVERRIDE_RELAXED, OVERRIDE_CLEARTEXT):
                tls += ["", f'[outbound.tls.domains."{rcpt.partition("@")[2]}"]',
                        'policy = "strict"', 'fallback = "never"']
            mta = make_mta(the_lab, "override", mta_config(the_lab, tls))
            mta.start()
            ta = send(mta, OVERRIDE_RELAXED, "override relaxed")
            tb = send(mta, OVERRIDE_CLEARTEXT, "override cleartext")
            facts["a.deferred"] = wait_attempted(mta, ta, 1)
            facts["b.deferred"] = wait_attempted(mta, tb, 1)
            qa = (facts["a.deferred"] or {}).get("queue_id")
            qb = (facts["b.deferred"] or {}).get("queue_id")
            facts["a.stored_before"] = the_lab.stored(OVERRIDE_RELAXED, ta)
            facts["b.stored_before"] = the_lab.stored(OVERRIDE_CLEARTEXT, tb)
            if qa:
                facts["a.hold"] = cli(mta, "queue", "hold", qa)
                facts["a.held"] = wait(lambda: (queue_entry(mta, ta) or {}).get("state")
                                       == "hold", timeout=5)
                facts["a.release"] = cli(mta, "queue", "release", qa, "--tls", "relaxed")
                facts["a.stored"] = wait(lambda: the_lab.stored(OVERRIDE_RELAXED, ta)) or []
                facts["a.entry"] = queue_entry(mta, ta)
            if qb:
                facts["b.flush"] = cli(mta, "queue", "flush", qb, "--allow-cleartext")
                facts["b.stored"] = wait(lambda: the_lab.stored(OVERRIDE_CLEARTEXT, tb)) or []
                facts["b.entry"] = queue_entry(mta, tb)
            facts.update(qa=qa, qb=qb, events=events(mta))
            _override = facts
        except BaseException as e:
            _override = e
            raise
        finally:
            if mta is not None:
                mta.cleanup()
    if isinstance(_override, BaseException):
        raise AssertionError(f"the override run failed: {_override!r}")
    return _override


class OverrideTests(unittest.TestCase):
    """
    One-shot per-message TLS overrides by the operator, on messages
    deferred under strict/never.
    """

    def test_deferred_under_strict(self) -> None:
        """Both messages are first deferred under strict/never (certificate-untrusted, starttls-not-offered), nothing stored."""
        o = override_run()
        for key, kind in (("a", "certificate-untrusted"), ("b", "starttls-not-offered")):
            self.assertIsNotNone(o[f"{key}.deferred"], f"message {key} not deferred")
            self.assertEqual(pending_outcome(o[f"{key}.deferred"]).get("kind"), kind)
            self.assertEqual(o[f"{key}.stored_before"], [])

    def test_release_tls_relaxed(self) -> None:
        """queue hold, then queue release ID --tls relaxed: the next attempt delivers over TLS without verification; the X-Twisted-MTA-TLS header says override=relaxed (certificate not verified, self-signed); the receiving Postfix saw TLS; the log records queue.tls_override and an outbound session with override=relaxed."""
        o = override_run()
        self.assertEqual(o["a.hold"].returncode, 0, o["a.hold"].stderr)
        self.assertTrue(o["a.held"], "not held")
        self.assertEqual(o["a.release"].returncode, 0, o["a.release"].stderr)
        self.assertIn("relaxed", o["a.release"].stdout)
        stored = o["a.stored"]
        self.assertEqual(len(stored), 1, f"not delivered; queue: {o['a.entry']}")
        t = trace(stored[0]) or ""
        self.assertRegex(t, r"^mx\.selfsigned\.test\[127\.0\.0\.13\]:\d+ TLSv1\.3 \S+, "
                            r"certificate not verified \(self-signed\); policy strict "
                            r"\(domain override\.selfsigned\.test\); override=relaxed$")
        received = " ".join(str(stored[0].get_all("Received")[0]).split())
        self.assertRegex(received, r"\(using TLSv1\.3 with cipher ")
        self.assertIsNone(o["a.entry"])
        evs = o["events"]
        self.assertTrue([e for e in evs if e.get("event") == "queue.tls_override"
                         and e.get("queue_id") == o["qa"] and e.get("override") == "relaxed"],
                        "no queue.tls_override event for relaxed")
        self.assertTrue([e for e in evs if e.get("event") == "outbound.connected"
                         and "override=relaxed" in str(e.get("note"))
                         and "selfsigned" in str(e.get("peer"))],
                        "no outbound.connected event with override=relaxed")

    def test_flush_allow_cleartext(self) -> None:
        """queue flush ID --allow-cleartext: the next attempt delivers in cleartext to the no-STARTTLS peer; the header names the operator's override (fallback=operator-override reason=starttls-not-offered); the log records queue.tls_override and the decision."""
        o = override_run()
        self.assertEqual(o["b.flush"].returncode, 0, o["b.flush"].stderr)
        self.assertIn("cleartext", o["b.flush"].stdout)
        stored = o["b.stored"]
        self.assertEqual(len(stored), 1, f"not delivered; queue: {o['b.entry']}")
        t = trace(stored[0]) or ""
        self.assertRegex(t, r"^mx\.nostarttls\.test\[127\.0\.0\.17\]:\d+ no TLS; policy strict "
                            r"\(domain override\.nostarttls\.test\); "
                            r"fallback=operator-override reason=starttls-not-offered$")
        self.assertIsNone(o["b.entry"])
        evs = o["events"]
        self.assertTrue([e for e in evs if e.get("event") == "queue.tls_override"
                         and e.get("queue_id") == o["qb"] and e.get("override") == "cleartext"])
        self.assertTrue([e for e in evs if e.get("event") == "outbound.tls_decision"
                         and e.get("decider") == "operator-override"
                         and e.get("action") == "cleartext"])
