"""
A golden report: one realistic day of tls.result events for one domain
(an MTA-STS policy in testing mode with certificate and STARTTLS failures,
DANE records on one host, a host with no policy), counted by the real
Aggregate, written to and read back from its day file, and built into the
report.  The JSON must equal tests/tlsrpt/golden/example.org-2026-12-03.json
key for key and in order, and that file must follow the JSON Schema
written from RFC 8460 4.4 (tests/tlsrpt/schema.py).  A change to what we
send shows up here as a diff of the file.

To accept a deliberate change: TLSRPT_GOLDEN_WRITE=1 python3 -m
twisted.trial tests.tlsrpt.test_golden, then read the diff.
"""

from __future__ import annotations

import gzip
import json
import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tlsrpt import report, store
from tests.tlsrpt.schema import validate

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "example.org-2026-12-03.json")
NOON = 1_796_299_200.0  # 2026-12-03T12:00:00Z

STS = {"policy-type": "sts",
       "policy-string": ["version: STSv1", "mode: testing", "mx: mx1.example.org",
                         "mx: *.backup.example.org", "max_age: 604800"],
       "mx-host": ["mx1.example.org", "*.backup.example.org"]}
TLSA = {"policy-type": "tlsa", "policy-string": ["3 1 1 " + "5c" * 32, "2 1 1 " + "a7" * 32],
        "mx-host": ["mx2.example.org"]}
NONE = {"policy-type": "no-policy-found"}


def fail(policy, result, reason, host, ip, local="192.0.2.25", helo=None):
    e = {**policy, "result": result, "failure-reason-code": reason,
         "receiving-mx-hostname": host, "receiving-ip": ip, "sending-mta-ip": local}
    if helo:
        e["receiving-mx-helo"] = helo
    return e


EVENTS = (
    [{**STS, "result": "success"}] * 1204
    + [fail(STS, "certificate-expired", "certificate-expired", "mx1.example.org",
            "198.51.100.1", helo="mx1.example.org")] * 17
    + [fail(STS, "starttls-not-supported", "starttls-not-offered", "a.backup.example.org",
            "198.51.100.7", helo="a.backup.example.org")] * 3
    + [fail(STS, "validation-failure", "sts-mx-mismatch", "mx9.elsewhere.example",
            "203.0.113.9", local=None)] * 2
    + [{**TLSA, "result": "success"}] * 311
    + [fail(TLSA, "tlsa-invalid", "dane-mismatch", "mx2.example.org", "2001:db8::25",
            local="2001:db8::1", helo="mx2.example.org")] * 4
    + [{**NONE, "result": "success"}] * 9
)


class GoldenReportTests(SynchronousTestCase):
    def make(self) -> dict:
        clock = task.Clock()
        clock.advance(NOON)
        directory = self.mktemp()
        aggregate = store.Aggregate(directory, clock, lambda f, *a: defer.maybeDeferred(f, *a))
        self.successResultOf(aggregate.start())
        for i, event in enumerate(EVENTS):
            aggregate("tls.result", {**event, "time": NOON + i, "domain": "example.org"})
        self.successResultOf(aggregate.flush())
        day = store.load_day(directory, "2026-12-03")  # read back from the day file
        return report.build("2026-12-03", "example.org", day.counts("example.org"),
                            "Example Sender Ltd", "mailto:tlsrpt-noreply@sender.example",
                            report.report_id("2026-12-03", "example.org", "sender.example"))

    def test_report_equals_golden(self) -> None:
        built = self.make()
        text = json.dumps(built, indent=2) + "\n"
        if os.environ.get("TLSRPT_GOLDEN_WRITE"):
            with open(GOLDEN, "w", encoding="utf-8") as f:
                f.write(text)
        with open(GOLDEN, encoding="utf-8") as f:
            golden = f.read()
        self.assertEqual(text, golden)
        # what goes on the wire is the same object, compact and gzip'd
        self.assertEqual(json.loads(gzip.decompress(report.to_gzip(built))), json.loads(golden))

    def test_golden_follows_the_schema(self) -> None:
        with open(GOLDEN, encoding="utf-8") as f:
            golden = json.load(f)
        validate(self, golden)
        totals = {p["policy"]["policy-type"]: (p["summary"]["total-successful-session-count"],
                                               p["summary"]["total-failure-session-count"])
                  for p in golden["policies"]}
        self.assertEqual(totals, {"sts": (1204, 22), "tlsa": (311, 4), "no-policy-found": (9, 0)})


class FetchFailureReportTests(SynchronousTestCase):
    def test_failed_policy_fetch_in_the_report(self) -> None:
        """
        A failed MTA-STS policy fetch (the policy cache's event, no cached
        policy) is counted and reported as one failure under sts without a
        policy string, and the report still follows the schema.
        """
        from twisted_mta.tls.sts import StsFetchError
        from twisted_mta.tls.sts_cache import fetch_failure_event

        clock = task.Clock()
        clock.advance(NOON)
        directory = self.mktemp()
        aggregate = store.Aggregate(directory, clock, lambda f, *a: defer.maybeDeferred(f, *a))
        self.successResultOf(aggregate.start())
        aggregate("tls.result", fetch_failure_event(
            "example.org", StsFetchError("example.org", "connection refused"), NOON, None))
        self.successResultOf(aggregate.flush())
        day = store.load_day(directory, "2026-12-03")
        built = report.build("2026-12-03", "example.org", day.counts("example.org"),
                             "Example Sender Ltd", "mailto:tlsrpt-noreply@sender.example",
                             report.report_id("2026-12-03", "example.org", "sender.example"))
        validate(self, built)
        [policy] = built["policies"]
        self.assertEqual(policy["policy"], {"policy-type": "sts", "policy-domain": "example.org"})
        self.assertEqual(policy["summary"], {"total-successful-session-count": 0,
                                             "total-failure-session-count": 1})
        self.assertEqual(policy["failure-details"], [{
            "result-type": "sts-policy-fetch-error", "failed-session-count": 1,
            "failure-reason-code": "connection refused "
                                   "(https://mta-sts.example.org/.well-known/mta-sts.txt)"}])
