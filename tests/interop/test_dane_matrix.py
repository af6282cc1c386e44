"""
DANE side by side with Postfix (issue 12): every case of
L{tests.interop.dane_cases} delivered once by Postfix's own DANE client and
once by our MTA, through the same private validating resolver, to the
same servers (L{tests.interop.dane_matrix}).  Each side must reach the
verdict the case expects (RFC 7672, issue 12); where Postfix's documented
rule differs from ours the case says so and why, and nothing else may
differ.

The run happens once per test process (L{matrix}); each method checks one
aspect of it.  With C{TWISTED_MTA_DANE_MATRIX=PATH} in the environment the
run also writes the matrix as Markdown to PATH (C{scripts/dane-matrix}
does this for docs/dane-matrix.md); with C{TWISTED_MTA_DANE_MATRIX_KEEP=1}
its work directories are kept and named on stderr.

Needs root, Postfix, nsd, unbound, ldnsutils and C{unshare --mount};
under CI (C{CI=true}) a missing one fails the tests instead of skipping
them.
"""

from __future__ import annotations

import functools
import os
import re
import traceback

from twisted.trial import unittest

from tests.interop.dane_cases import (
    CASES, CLEARTEXT, ENCRYPTED, INSECURE_MX, UNSIGNED_ZONE, VERIFIED,
)
from tests.interop.dane_matrix import (
    MatrixRun, TRACE_HEADER, render_doc, unshare_unavailable,
)
from tests.interop.dnssec import require_unbound
from tests.interop.requires import missing
from tests.interop.support import PROJECT_ROOT, postfix_unavailable

DOC_ENV = "TWISTED_MTA_DANE_MATRIX"

def matrix() -> MatrixRun:
    """
    The matrix, run on first use; a run that failed fails every test that
    asks for it, with the same words.
    """
    why = postfix_unavailable() or unshare_unavailable()
    if why:
        missing(why)
    require_unbound()
    run = _run_once()
    if isinstance(run, str):
        raise AssertionError(f"the matrix run failed:\n{run}")
    return run


@functools.cache
def _run_once() -> MatrixRun | str:
    """The run (its document written when the environment asks), or its traceback."""
    try:
        run = MatrixRun().run()
    except Exception:
        return traceback.format_exc()
    doc = os.environ.get(DOC_ENV)
    if doc:
        from tests.interop.test_tls_matrix import git_describe
        path = doc if os.path.isabs(doc) else os.path.join(PROJECT_ROOT, doc)
        with open(path, "w", encoding="utf-8") as f:
            f.write(render_doc(run, git_describe()))
    return run


class DaneMatrixTests(unittest.TestCase):
    """One aspect of the one run per method; a failure lists every case."""

    def test_postfix_verdicts(self) -> None:
        """
        Postfix's client reaches, for every case, the verdict RFC 7672 asks
        for, or its own documented rule's where the case names one.
        """
        run = matrix()
        self.assertEqual(run.settled.get("Postfix"), True, "Postfix did not settle")
        lines = run.mismatches("postfix")
        self.assertEqual(lines, [], "\n".join(lines))

    def test_our_verdicts(self) -> None:
        """
        Our MTA reaches, for every case, the verdict RFC 7672 and issue 12
        ask for, and defers with the expected failure class.
        """
        run = matrix()
        self.assertEqual(run.settled.get("twisted-mta"), True, "our MTA did not settle")
        lines = run.mismatches("ours")
        self.assertEqual(lines, [], "\n".join(lines))

    def test_differences_are_explained(self) -> None:
        """
        Where the two clients' verdicts differ, the case expects it and says
        why (docs/dane-matrix.md prints it).
        """
        run = matrix()
        unexplained = [c.name for c in run.cases
                       if run.postfix[c.name].status != run.ours[c.name].status
                       and not (c.postfix_expect and c.difference)]
        self.assertEqual(unexplained, [])
        for case in CASES:
            if case.postfix_expect:
                self.assertNotEqual(case.postfix_expect, case.expect, case.name)
                self.assertTrue(case.difference, case.name)

    def test_nothing_in_cleartext(self) -> None:
        """
        No server stored a message in cleartext from either client (every
        case's server offers STARTTLS or publishes TLSA records), each
        delivery claimed by a client was stored once, and nothing else was.
        """
        run = matrix()
        problems = []
        for side, stored, rcpts, verdicts in (
                ("Postfix", run.stored_postfix, run.postfix_rcpt, run.postfix),
                ("twisted-mta", run.stored_ours, run.our_rcpt, run.ours)):
            for rcpt, case in rcpts.items():
                copies = stored.get(rcpt, [])
                delivered = verdicts[case.name].status in (VERIFIED, ENCRYPTED, CLEARTEXT)
                if len(copies) != (1 if delivered else 0):
                    problems.append(f"{side} {case.name}: {len(copies)} stored copies, "
                                    f"verdict {verdicts[case.name].words()}")
                for copy in copies:
                    received = " ".join(str(copy.get_all("Received")[0]).split())
                    if not re.search(r"\(using TLSv1\.[23] with cipher", received):
                        problems.append(f"{side} {case.name}: stored without TLS: {received}")
        self.assertEqual(problems, [], "\n".join(problems))

    def test_our_sessions_name_dane(self) -> None:
        """
        The start-up check turned DANE on, and our sessions say which
        source decided: DANE (C{outbound.connected} with source dane, dane
        matched, or unusable for an RRset with no usable record; the trace
        header names policy dane) or, for insecure destinations, the
        default without DANE.
        """
        run = matrix()
        self.assertTrue([e for e in run.events if e.get("event") == "tls.dane-on"],
                        "no tls.dane-on event: the start-up check did not turn DANE on")
        problems = []
        for rcpt, case in run.our_rcpt.items():
            v = run.ours[case.name]
            if v.status not in (VERIFIED, ENCRYPTED):
                continue
            session = (v.facts.get("connected") or [{}])[-1]
            traces = v.facts.get("traces") or [""]
            insecure = case.layout in (UNSIGNED_ZONE, INSECURE_MX)
            want = None if insecure else "matched" if case.dane_usable else "unusable"
            got = (session.get("source"), session.get("dane"))
            if got != ("default" if insecure else "dane", want):
                problems.append(f"{case.name}: outbound.connected source/dane {got}")
            if ("; policy dane " in traces[0]) == insecure:
                problems.append(f"{case.name}: {TRACE_HEADER}: {traces[0]}")
        self.assertEqual(problems, [], "\n".join(problems))

    def test_tls_explain_names_the_source(self) -> None:
        """
        C{twisted-mta tls explain DOMAIN --json} says DANE decided for a
        destination with TLSA records (usable or not), and the default for
        an unsigned one, as the deliveries did.
        """
        run = matrix()
        self.assertTrue(run.tls_explain)
        problems = []
        for name, report in run.tls_explain.items():
            case = next(c for c in CASES if c.name == name)
            hosts = report.get("hosts") if isinstance(report, dict) else None
            if not hosts:
                problems.append(f"{name}: no hosts in {str(report)[:300]}")
                continue
            want = "default" if case.layout == UNSIGNED_ZONE else "dane"
            if hosts[0].get("source") != want:
                problems.append(f"{name}: source {hosts[0].get('source')!r}, expected {want!r}")
        self.assertEqual(problems, [], "\n".join(problems))

    def test_private_resolver_only(self) -> None:
        """
        Postfix's master saw the private resolv.conf (the bind mount), the
        machine's was the same before and after, Postfix's DNSSEC probe
        validated, the SERVFAIL case reached the failing server, and unbound
        forwards only to loopback servers, without root hints.
        """
        run = matrix()
        self.assertEqual(run.resolv_conf_seen, run.client.resolv_conf_text)
        before, after = run.host_resolv_conf
        self.assertEqual(before, after)
        self.assertNotEqual(before, run.client.resolv_conf_text)
        self.assertNotIn("DNSSEC validation may be unavailable", run.postfix_maillog)
        self.assertGreater(run.servfail.queries, 0)
        forwards = re.findall(r"forward-addr: (\S+)", run.unbound_conf)
        self.assertTrue(forwards)
        self.assertEqual([f for f in forwards if not f.startswith("127.")], [])
        self.assertNotIn("root-hints", run.unbound_conf)
