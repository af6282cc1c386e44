"""
Our MTA-STS verdicts side by side with those of the reference
implementation, postfix-mta-sts-resolver (PyPI), on the same policy hosts.

For each case a Twisted web server with a trustme certificate serves
C{https://mta-sts.<case>.sts-ref.test/.well-known/mta-sts.txt} on
C{127.0.0.N:443} (the reference builds its URL without a port), and a
private nsd on loopback serves the C{_mta-sts} TXT record and the policy
host's A record.  Both implementations ask: ours in this process
(L{lookup_sts_txt}, L{examine_sts_records}, L{PolicyFetcher}, through
dnspython pointed at nsd), the reference in a child process
(L{tests.interop.sts_reference}) whose every way out is pointed at, or
fenced to, loopback.  The verdicts must agree, except in the cases marked
with one of L{DIFFERENCES}, each of which docs/tls.md explains.

Nothing leaves the machine: every answer checks which names each side
looked up and where the reference connected, and L{test_guards} shows
that the child's guards refuse what they must.
"""

from __future__ import annotations

import atexit
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import threading
from typing import Any

import attrs
import dns.resolver
import trustme
from twisted.internet import defer, reactor, ssl, task, threads
from twisted.internet.error import CannotListenError
from twisted.trial import unittest
from twisted.web import resource, server

from tests.interop.dns import LOOPBACK, shared_nsd, zone
from tests.interop.requires import missing
from tests.interop.test_sts_fetch import TrackingSite
from twisted_mta.tls.sts import (
    FETCH_ERROR, POLICY_INVALID, WEBPKI_INVALID, StsError, examine_sts_records,
    lookup_sts_txt, policy_host,
)
from twisted_mta.tls.sts_fetch import USER_AGENT, PolicyFetcher

ZONE = "sts-ref.test"
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sts_reference.py")
REFERENCE_AGENT = "postfix-mta-sts-resolver"
OUR_TIMEOUT = 1.0  # seconds, the whole fetch
REFERENCE_TIMEOUT = 1.5  # seconds, the reference's TXT lookup and its fetch each
TXT_ID = "20240601"

# The documented differences: key -> words that docs/tls.md's section
# "MTA-STS compared with postfix-mta-sts-resolver" must contain.
DIFFERENCES = {
    "mx-syntax": "mx patterns",
    "not-a-field": "lines that are not fields",
    "empty-line": "empty lines",
    "max-age-digits": "max_age written with a sign",
    "repeated-field": "repeated fields",
    "charset": "charset parameters",
    "utf-8": "UTF-8 without a charset",
    "txt-id": "ids that are not 1 to 32 letters and digits",
    "txt-end": "space after the last field",
    "txt-repeated-id": "repeated id",
    "txt-prefix": "v=STSv10",
}


def lines(*fields: str, end: str = "\r\n") -> bytes:
    return "".join(field + end for field in fields).encode("utf-8")


ENFORCE = ("version: STSv1", "mode: enforce", "mx: mail.example.net", "mx: *.mx.example.net",
           "max_age: 604800")
GOOD = lines(*ENFORCE)
GOOD_POLICY = (TXT_ID, "enforce", 604800, ("*.mx.example.net", "mail.example.net"))


def replace(field: str, by: str | None) -> bytes:
    """
    L{GOOD} with the field named C{field} replaced by the line C{by}
    (removed when None).
    """
    out = [by if f.split(":", 1)[0] == field else f for f in ENFORCE]
    return lines(*(f for f in out if f is not None))


def padded(total: int) -> bytes:
    """
    L{GOOD} with an extension field that makes it C{total} octets long.
    """
    head = GOOD + b"x-pad: "
    return head + b"p" * (total - len(head) - 2) + b"\r\n"


@attrs.frozen
class Verdict:
    """
    What one implementation concluded: C{none} (no usable TXT record, so
    no policy is looked for), C{error} (a TXT record, but no valid policy),
    or C{valid} with the policy as (id, mode, max_age, mx patterns).
    """

    outcome: str
    policy: tuple | None = None


@attrs.frozen
class Case:
    """
    One policy host and what each side is expected to say about it.
    C{ours} and C{reference} are the outcomes; C{policy} is our valid
    policy and C{reference_policy} the reference's (the same unless given).
    C{result_type} and C{detail} check our error; C{reference_log} the
    reference's warning.  C{difference} names the entry of L{DIFFERENCES}
    that explains a disagreement (None: the verdicts must agree).
    """

    label: str
    why: str
    ours: str
    reference: str
    body: bytes = GOOD
    txt: tuple[tuple[str, ...], ...] = ((f"v=STSv1; id={TXT_ID}",),)
    content_type: bytes | None = b"text/plain"
    code: int = 200
    headers: tuple[tuple[bytes, bytes], ...] = ()
    hang: bool = False
    stream: bool = False
    certificate: str = "good"  # good, untrusted, wrong-name, expired
    policy: tuple | None = None
    reference_policy: tuple | None = None
    result_type: str | None = None
    detail: str = ""
    reference_log: str = ""
    difference: str | None = None

    @property
    def domain(self) -> str:
        return f"{self.label}.{ZONE}"

    def expected(self, outcome: str, policy: tuple | None) -> Verdict:
        if outcome != "valid":
            return Verdict(outcome)
        return Verdict(outcome, policy or GOOD_POLICY)

    @property
    def ours_expected(self) -> Verdict:
        return self.expected(self.ours, self.policy)

    @property
    def reference_expected(self) -> Verdict:
        return self.expected(self.reference, self.reference_policy or self.policy)


def agree(label: str, why: str, outcome: str, **kw: Any) -> Case:
    return Case(label, why, outcome, outcome, **kw)


def differ(label: str, why: str, ours: str, reference: str, difference: str,
           **kw: Any) -> Case:
    return Case(label, why, ours, reference, difference=difference, **kw)


CASES = [
    # -- valid policies ------------------------------------------------------------------
    agree("enforce",
          "A valid enforce policy over trusted HTTPS: both valid, same id, mode, max_age and mx.",
          "valid"),
    agree("testing", "Mode testing, LF line ends: both valid.", "valid",
          body=lines("version: STSv1", "mode: testing", "mx: mail.example.net",
                     "max_age: 86400", end="\n"),
          policy=(TXT_ID, "testing", 86400, ("mail.example.net",))),
    agree("mode-none",
          "Mode none without mx: both valid (a policy that says to forget the domain's policy).",
          "valid",
          body=lines("version: STSv1", "mode: none", "max_age: 86400"),
          policy=(TXT_ID, "none", 86400, ())),
    agree("trailing-space",
          "Spaces and tabs after values (the grammar's *WSP): both valid; not a difference.",
          "valid",
          body=lines("version: STSv1 ", "mode: enforce\t", "mx: mail.example.net  ",
                     "mx: *.mx.example.net", "max_age: 604800 \t")),
    agree("extension", "An unknown field: both ignore it.", "valid",
          body=GOOD + b"x-comment: rotated in June\r\n"),
    agree("exactly-64k",
          "A policy of exactly 64 KiB (padded by an extension): at both limits, valid.",
          "valid",
          body=padded(65536)),
    agree("text-plain-params",
          "Content-Type TEXT/Plain with charset=utf-8 and another parameter: both accept.",
          "valid",
          content_type=b"TEXT/Plain; charset=utf-8; format=flowed"),
    # -- the certificate -------------------------------------------------------------------
    agree("untrusted-ca",
          "A certificate for the right name from a CA neither trusts: both fail.",
          "error",
          certificate="untrusted", result_type=WEBPKI_INVALID, detail="could not be verified",
          reference_log="certificate verify failed"),
    agree("wrong-name", "A trusted certificate for www.<domain> only: both fail.", "error",
          certificate="wrong-name", result_type=WEBPKI_INVALID, detail="name mismatch",
          reference_log="certificate verify failed"),
    agree("expired", "An expired certificate from the trusted CA: both fail.", "error",
          certificate="expired", result_type=WEBPKI_INVALID, detail="could not be verified",
          reference_log="certificate verify failed"),
    # -- HTTP ---------------------------------------------------------------------------------
    agree("http-404", "HTTP 404: both fail.", "error", code=404, body=b"not here",
          result_type=FETCH_ERROR, detail="HTTP 404", reference_log="[BadSTSPolicy]"),
    agree("redirect", "HTTP 301 to another https URL: neither follows it; both fail.", "error",
          code=301, body=b"", result_type=FETCH_ERROR, detail="a redirect",
          reference_log="[BadSTSPolicy]",
          headers=((b"location",
                    b"https://mta-sts.enforce.sts-ref.test/.well-known/mta-sts.txt"),)),
    agree("hang", "A server that never answers: both give up at their timeout and fail.", "error",
          hang=True, result_type=FETCH_ERROR, detail="no complete answer within",
          reference_log="[TimeoutError]"),
    agree("oversized", "A body over 64 KiB announced by Content-Length: both fail.", "error",
          body=padded(65537), result_type=FETCH_ERROR, detail="65537 octets long",
          reference_log="[BadSTSPolicy]"),
    agree("oversized-stream",
          "A chunked body that goes on past 64 KiB: both stop reading and fail.",
          "error",
          stream=True, result_type=FETCH_ERROR, detail="larger than the limit",
          reference_log="[BadSTSPolicy]"),
    agree("no-content-type",
          "No Content-Type at all: both fail (text/plain is required); not a difference.",
          "error",
          content_type=None, result_type=FETCH_ERROR, detail="no Content-Type",
          reference_log="[BadSTSPolicy]"),
    agree("text-html", "Content-Type text/html: both fail.", "error",
          content_type=b"text/html", result_type=FETCH_ERROR, detail="not text/plain",
          reference_log="[BadSTSPolicy]"),
    # -- policy syntax on which both agree ---------------------------------------------------
    agree("no-version", "No version field: both fail.", "error",
          body=replace("version", None), result_type=POLICY_INVALID, detail="no version field"),
    agree("bad-mode", "mode: strict: both fail.", "error",
          body=replace("mode", "mode: strict"), result_type=POLICY_INVALID,
          detail="mode must be enforce, testing or none"),
    agree("max-age-too-large", "max_age 31557601, one more than a year: both fail.", "error",
          body=replace("max_age", "max_age: 31557601"), result_type=POLICY_INVALID,
          detail="more than 31557600"),
    agree("enforce-without-mx", "Mode enforce without an mx field: both fail.", "error",
          body=lines("version: STSv1", "mode: enforce", "max_age: 604800"),
          result_type=POLICY_INVALID, detail="no mx field"),
    # -- policy syntax on which we differ ----------------------------------------------------
    differ("wildcard-inside",
           "mx: mail.*.example.net: a wildcard that is not the left-most label; we refuse the "
           "policy, the reference does not look at mx values.",
           "error", "valid", "mx-syntax",
           body=replace("mx", "mx: mail.*.example.net"), result_type=POLICY_INVALID,
           detail="a wildcard is allowed only as the whole left-most label",
           reference_policy=(TXT_ID, "enforce", 604800, ("mail.*.example.net",))),
    differ("mx-not-a-name",
           "mx: mail_1.example.net is not a host name; we refuse the policy, the reference keeps "
           "it.",
           "error", "valid", "mx-syntax",
           body=replace("mx", "mx: mail_1.example.net"), result_type=POLICY_INVALID,
           detail="is not a host name",
           reference_policy=(TXT_ID, "enforce", 604800, ("mail_1.example.net",))),
    differ("not-a-field",
           "A line without a colon: we refuse the policy, the reference skips the line.",
           "error", "valid", "not-a-field",
           body=GOOD + b"this line is not a field\r\n", result_type=POLICY_INVALID,
           detail="is not a field"),
    differ("empty-line",
           "An empty line between fields: we refuse the policy, the reference skips it.",
           "error", "valid", "empty-line",
           body=lines(*ENFORCE[:2]) + b"\r\n" + lines(*ENFORCE[2:]), result_type=POLICY_INVALID,
           detail="line 3 is empty"),
    differ("blank-line-at-end",
           "An empty line after the last field (two line ends): we refuse the policy, the "
           "reference accepts it.",
           "error", "valid", "empty-line",
           body=GOOD + b"\r\n", result_type=POLICY_INVALID, detail="line 6 is empty"),
    differ("max-age-plus",
           "max_age: +86400 is not 1 to 10 digits; we refuse it, the reference reads it with "
           "int().",
           "error", "valid", "max-age-digits",
           body=replace("max_age", "max_age: +86400"), result_type=POLICY_INVALID,
           detail="max_age must be a number",
           reference_policy=(TXT_ID, "enforce", 86400, GOOD_POLICY[3])),
    differ("repeated-mode",
           "mode: testing, then mode: enforce: the first counts for us (RFC 8461 3.2), the last "
           "for the reference.",
           "valid", "valid", "repeated-field",
           body=lines("version: STSv1", "mode: testing", "mx: mail.example.net",
                      "mode: enforce", "max_age: 86400"),
           policy=(TXT_ID, "testing", 86400, ("mail.example.net",)),
           reference_policy=(TXT_ID, "enforce", 86400, ("mail.example.net",))),
    differ("unknown-charset",
           "Content-Type text/plain; charset=x-unknown on an ASCII policy: we ignore the "
           "parameter (RFC 8461 3.2), the reference cannot decode and fails.",
           "valid", "error", "charset",
           content_type=b"text/plain; charset=x-unknown",
           reference_log="unknown encoding"),
    differ("utf-8-no-charset",
           "A UTF-8 extension value, Content-Type text/plain without charset: we accept (the "
           "grammar allows UTF-8), the reference decodes as ASCII and fails.",
           "valid", "error", "utf-8",
           body=GOOD + "x-contact: postmaster at m\u00fcnchen\r\n".encode("utf-8"),
           reference_log="codec can't decode"),
    # -- the TXT record --------------------------------------------------------------------------
    agree("no-txt", "No TXT record at _mta-sts: neither looks for a policy.", "none", txt=()),
    agree("two-txt", "Two v=STSv1 records: neither uses either.", "none",
          txt=((f"v=STSv1; id={TXT_ID}",), ("v=STSv1; id=20240602",))),
    agree("other-txt", "A v=STSv1 record next to an unrelated TXT record: both use it.", "valid",
          txt=(("v=spf1 -all",), (f"v=STSv1; id={TXT_ID}",))),
    agree("no-id", "v=STSv1 without an id: neither looks for a policy.", "none",
          txt=(("v=STSv1; x=1",),)),
    agree("split-txt", "A record in two character-strings: both join them (RFC 8461 3.1).", "valid",
          txt=(("v=STSv1; ", f"id={TXT_ID}"),)),
    agree("txt-end-delimiter",
          "A record ending in '; ' (the grammar's optional delimiter): both valid.",
          "valid",
          txt=((f"v=STSv1; id={TXT_ID}; ",),)),
    differ("bad-id",
           "id=2024-06-01 (a hyphen): not a valid record for us, so no policy; the reference "
           "fetches.",
           "none", "valid", "txt-id",
           txt=(("v=STSv1; id=2024-06-01",),),
           reference_policy=("2024-06-01",) + GOOD_POLICY[1:]),
    differ("long-id", "An id of 33 characters: not a valid record for us; the reference fetches.",
           "none", "valid", "txt-id",
           txt=(("v=STSv1; id=" + "a" * 33,),),
           reference_policy=("a" * 33,) + GOOD_POLICY[1:]),
    differ("txt-trailing-space",
           "A space after the last field, no ';': not a valid record for us; the reference "
           "strips it.",
           "none", "valid", "txt-end",
           txt=((f"v=STSv1; id={TXT_ID} ",),)),
    differ("txt-repeated-id",
           "Two ids in one record: the first counts for us (RFC 8461 3.2), the last for the "
           "reference.",
           "valid", "valid", "txt-repeated-id",
           txt=((f"v=STSv1; id={TXT_ID}; id=20240602",),),
           reference_policy=("20240602",) + GOOD_POLICY[1:]),
    differ("txt-v10",
           "A v=STSv10 record next to a valid v=STSv1 one: we discard the first (it does not "
           "begin with 'v=STSv1;'), the reference counts two records and uses none.",
           "valid", "none", "txt-prefix",
           txt=(("v=STSv10; id=1",), (f"v=STSv1; id={TXT_ID}",))),
]


def zone_text() -> str:
    """
    The private zone: each case's TXT records and its policy host's address
    (127.0.0.10, 127.0.0.11, ... in the order of L{CASES}).
    """
    records = []
    for case, address in zip(CASES, addresses()):
        for strings in case.txt:
            rdata = " ".join('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
                             for s in strings)
            records.append((f"_mta-sts.{case.label}", "TXT", rdata))
        records.append((f"mta-sts.{case.label}", "A", address))
    return zone(ZONE, records)


def addresses() -> list[str]:
    return [f"127.0.0.{10 + i}" for i in range(len(CASES))]


# -- the reference, in its child process ------------------------------------------------------

class ReferenceChild:
    """
    The child process of L{tests.interop.sts_reference}: one JSON request
    a line, one JSON answer a line.  Its environment has only what it needs:
    C{SSL_CERT_FILE} (the test CA), an empty C{SSL_CERT_DIR} (no system
    CAs), and no proxy variable.
    """

    def __init__(self, workdir: str, dns_server: str, ca: trustme.CA) -> None:
        self.workdir = workdir
        ca_file = os.path.join(workdir, "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        no_cas = os.path.join(workdir, "no-cas")
        os.makedirs(no_cas, exist_ok=True)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "HOME": workdir, "SSL_CERT_FILE": ca_file, "SSL_CERT_DIR": no_cas,
               "PYTHONDONTWRITEBYTECODE": "1"}
        if "PYTHONPATH" in os.environ:  # where the reference may have been installed
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        self.stderr_path = os.path.join(workdir, "reference.err")
        self.lock = threading.Lock()
        with open(self.stderr_path, "wb") as stderr:
            # -P: the script's directory (tests/interop, with its dns.py) is
            # not put first on sys.path.
            self.process = subprocess.Popen(
                [sys.executable, "-P", DRIVER, dns_server, str(REFERENCE_TIMEOUT)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, env=env,
                cwd=workdir, text=True, encoding="utf-8")
        self.versions = self._read()["ready"]

    def ask(self, request: dict) -> dict:
        """
        Send C{request}, wait for the answer (blocking: call it in a thread).
        """
        with self.lock:
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            return self._read()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(5)
            raise AssertionError(f"the reference's child process exited with "
                                 f"{self.process.returncode}:\n{self.stderr()}")
        return json.loads(line)

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


_shared: dict[str, Any] = {}


def shared_ca() -> trustme.CA:
    """
    The CA that both sides trust, made once per test run.
    """
    if "ca" not in _shared:
        _shared["ca"] = trustme.CA()
    return _shared["ca"]


def shared_reference(testcase: unittest.TestCase, dns_server: str) -> ReferenceChild:
    """
    The child, started by the first test that needs it and stopped when
    the test process exits.
    """
    if importlib.util.find_spec("postfix_mta_sts_resolver") is None:
        missing("postfix-mta-sts-resolver is not installed (pip install -e '.[test]')")
    child = _shared.get("child")
    if child is not None and child.process.poll() is None:
        return child
    workdir = os.path.abspath(testcase.mktemp())
    os.makedirs(workdir)
    child = ReferenceChild(workdir, dns_server, shared_ca())
    _shared["child"] = child
    atexit.register(child.stop)
    return child


# -- the policy hosts ------------------------------------------------------------------------

class PolicyHost(resource.Resource):
    """
    Answers every GET as the case says; records each request (the client's
    User-Agent tells whose it was).  A stream is per request, so both
    clients get the whole of it whatever the other one does.
    """

    isLeaf = True

    def __init__(self, case: Case) -> None:
        super().__init__()
        self.case = case
        self.agents: list[str] = []
        self.pending: list = []  # the next write of each stream

    def render_GET(self, request):
        agent = request.getHeader(b"user-agent")
        self.agents.append(agent.decode("latin-1") if agent else "")
        request.setResponseCode(self.case.code)
        if self.case.content_type is None:
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", self.case.content_type)
        for name, value in self.case.headers:
            request.setHeader(name, value)
        if self.case.hang:
            return server.NOT_DONE_YET
        if self.case.stream:
            gone: list[bool] = []
            request.notifyFinish().addBoth(gone.append)
            self._more(request, gone, 64)
            return server.NOT_DONE_YET
        return self.case.body

    def _more(self, request, gone: list, left: int) -> None:
        # 8 KiB a tick, 512 KiB in all, until the client goes away.
        if gone:
            return
        if left == 0:
            request.finish()
            return
        request.write(b"x" * 8192)
        self.pending.append(reactor.callLater(0.005, self._more, request, gone, left - 1))

    def stop(self) -> None:
        for call in self.pending:
            if call.active():
                call.cancel()


# -- the tests -------------------------------------------------------------------------------

class ReferenceComparison(unittest.TestCase):
    """
    One test per case of L{CASES} (added below the class), and checks of
    the comparison itself.
    """

    timeout = 30

    def setUp(self) -> None:
        self.nsd = shared_nsd(self, "sts-reference", {ZONE: zone_text()})
        self.reference = shared_reference(self, self.nsd.address)
        self.dns = dns.resolver.Resolver(configure=False)
        self.dns.nameservers = [LOOPBACK]
        self.dns.port = self.nsd.port
        self.dns.timeout = self.dns.lifetime = 2.0
        self.asked: list[str] = []  # names our side looked up

    def serve(self, case: Case, address: str) -> PolicyHost:
        """
        Listen on C{address}:443 with the case's certificate for
        C{mta-sts.<domain>}.
        """
        host = policy_host(case.domain)
        ca = shared_ca()
        if case.certificate == "untrusted":
            cert = trustme.CA().issue_cert(host)
        elif case.certificate == "wrong-name":
            cert = ca.issue_cert(f"www.{case.domain}")
        elif case.certificate == "expired":
            now = datetime.datetime.now(datetime.timezone.utc)
            cert = ca.issue_cert(host, not_before=now - datetime.timedelta(days=30),
                                 not_after=now - datetime.timedelta(days=1))
        else:
            cert = ca.issue_cert(host)
        options = ssl.PrivateCertificate.loadPEM(
            cert.private_key_and_cert_chain_pem.bytes()).options()
        policy_host_resource = PolicyHost(case)
        site = TrackingSite(policy_host_resource)
        site.displayTracebacks = False
        try:
            port = reactor.listenSSL(443, site, options, interface=address)
        except CannotListenError as e:
            if isinstance(e.socketError, PermissionError):
                missing(f"cannot listen on {address}:443 (the reference fetches from "
                        f"port 443 only; run the tests as root): {e}")
            raise

        async def close() -> None:
            policy_host_resource.stop()
            for _ in range(300):  # until the server has seen every connection close
                if site.open == 0:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            await port.stopListening()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close()))
        return policy_host_resource

    def _addresses_of(self, host: str) -> list[str]:
        self.asked.append(f"A {host}")
        return [rdata.address for rdata in self.dns.resolve(host, "A")]

    def _txt(self, domain: str) -> list[bytes]:
        self.asked.append(f"TXT _mta-sts.{domain}")
        return lookup_sts_txt(self.dns, domain)

    async def ours(self, domain: str) -> tuple[Verdict, StsError | None]:
        """
        Our verdict: the TXT record from nsd, then the fetch.
        """
        records = await threads.deferToThread(self._txt, domain)
        record, words = examine_sts_records(records)
        if record is None:
            return Verdict("none"), None
        fetcher = PolicyFetcher(
            reactor, resolve=lambda host: threads.deferToThread(self._addresses_of, host),
            trust_root=ssl.Certificate.loadPEM(shared_ca().cert_pem.bytes()), port=443,
            timeout=OUR_TIMEOUT)
        try:
            policy = await fetcher.fetch(domain)
        except StsError as e:
            return Verdict("error"), e
        return Verdict("valid", (record.id, policy.mode, policy.max_age,
                                 tuple(sorted(policy.mx)))), None

    @staticmethod
    def reference_verdict(answer: dict) -> Verdict:
        status = answer["status"]
        if status == "NONE":
            return Verdict("none")
        if status == "FETCH_ERROR":
            return Verdict("error")
        if status == "VALID":
            p = answer["policy"]
            mx = tuple(sorted({m.lower() for m in p["mx"]}))
            return Verdict("valid", (answer["id"], p["mode"], p["max_age"], mx))
        raise AssertionError(f"unexpected answer from the reference: {answer}")

    async def compare(self, case: Case) -> None:
        address = addresses()[CASES.index(case)]
        host = self.serve(case, address)
        policy_host_name = policy_host(case.domain)
        ours, reference_answer = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.ours(case.domain)),
            threads.deferToThread(self.reference.ask, {"domain": case.domain}),
        ], consumeErrors=True)
        (our_verdict, error) = ours
        reference = self.reference_verdict(reference_answer)
        context = (f"\nours: {our_verdict} {error or ''}\nreference: {reference} "
                   f"{reference_answer}\nserver saw: {host.agents}")

        # Each side's verdict, and why.
        self.assertEqual(our_verdict, case.ours_expected, context)
        self.assertEqual(reference, case.reference_expected, context)
        if case.result_type is not None:
            self.assertEqual(error.result_type, case.result_type, context)
        self.assertIn(case.detail, str(error or ""), context)
        self.assertIn(case.reference_log, " ".join(reference_answer["log"]), context)
        # A difference is there exactly when the case documents one.
        if case.difference is None:
            self.assertEqual(our_verdict, reference, context)
        else:
            self.assertNotEqual(our_verdict, reference, context)
            self.assertIn(case.difference, DIFFERENCES)

        # Where each side went: only nsd for names, only this host to fetch.
        ours_fetched = our_verdict.outcome != "none"
        reference_fetched = reference.outcome != "none"
        self.assertEqual(self.asked, [f"TXT _mta-sts.{case.domain}"]
                         + [f"A {policy_host_name}"] * ours_fetched, context)
        self.assertEqual(reference_answer["txt_queries"], [f"TXT _mta-sts.{case.domain}"],
                         context)
        self.assertEqual(reference_answer["dns_servers"], [self.nsd.address], context)
        self.assertEqual(reference_answer["host_lookups"],
                         [policy_host_name] * reference_fetched, context)
        self.assertEqual(reference_answer["connects"],
                         [f"{address}:443"] * reference_fetched, context)
        self.assertEqual(reference_answer["refused"], [], context)
        self.assertIsNone(reference_answer["proxy"], context)
        # The requests the server answered (none when TLS failed).
        reached = case.certificate == "good"
        self.assertEqual(sorted(host.agents),
                         sorted([USER_AGENT] * (ours_fetched and reached)
                                + [REFERENCE_AGENT] * (reference_fetched and reached)),
                         context)

    def test_guards(self):
        """The child's guards refuse a lookup by name and a connection to a non-loopback address (probed with localhost and 0.0.0.0, which cannot leave the machine either way)."""
        async def run() -> None:
            answer = await threads.deferToThread(self.reference.ask, {"probe": True})
            self.assertEqual((answer["lookup"], answer["connect"]), ("refused", "refused"))
            self.assertEqual(answer["refused"], ["lookup localhost", "connect 0.0.0.0:9"])
            self.assertEqual(answer["connects"], [])
        return defer.Deferred.fromCoroutine(run())

    def test_reference_version(self):
        """The child runs the reference version the test extra asks for (at least 1.5.1), with pycares 5 (TXT strings joined)."""
        versions = self.reference.versions
        self.assertGreaterEqual(_version(versions["postfix-mta-sts-resolver"]), (1, 5, 1))
        self.assertGreaterEqual(_version(versions["pycares"]), (5,))

    def test_differences_are_documented(self):
        """Every documented difference has a case, and docs/tls.md's comparison section names it."""
        used = {case.difference for case in CASES if case.difference}
        self.assertEqual(used, set(DIFFERENCES))
        section = _docs_section()
        for key, words in DIFFERENCES.items():
            self.assertIn(words, section, f"docs/tls.md does not explain {key!r}")
        for case in CASES:
            self.assertIn(f"`{case.label}`", section, f"docs/tls.md does not list {case.label}")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def _docs_section() -> str:
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "tls.md")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.find("## MTA-STS compared with postfix-mta-sts-resolver")
    if start < 0:
        raise AssertionError("docs/tls.md has no section 'MTA-STS compared with "
                             "postfix-mta-sts-resolver'")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else len(text)]


def _case_test(case: Case):
    def test(self):
        return defer.Deferred.fromCoroutine(self.compare(case))
    test.__doc__ = case.why
    return test


for _case in CASES:
    setattr(ReferenceComparison, "test_" + _case.label.replace("-", "_"), _case_test(_case))
