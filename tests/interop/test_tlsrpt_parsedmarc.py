"""
Our TLS reports read by an independent parser (issue 14, acceptance
"Interop"): parsedmarc, a maintained DMARC and SMTP TLS (RFC 8460)
report parser from PyPI, is given

- the JSON that L{report.build} makes for a realistic day (the golden
  day's events: an MTA-STS policy with certificate, STARTTLS and MX
  failures, DANE records with a mismatch, a host with no policy), counted
  by the real Aggregate and read back from its day file;
- the same report gzip'd, as it is POSTed and attached (C{.json.gz});
- the whole report mail L{send.MailReports} queues (DKIM-signed,
  C{multipart/report} with the C{application/tlsrpt+gzip} attachment),
  read from a real spool.

Each must be accepted, and what parsedmarc reads back (organization,
contact, report id, dates, per-policy domain, type, policy strings,
success and failure counts, each failure's result type, count and
details) must equal what we put in.  The mail really delivered by
tests/interop/test_tlsrpt_send.py is read by the same parser there, with
L{read_mail} and L{expected} from this module.

No network: parsedmarc is told to stay offline, and an SMTP TLS report
needs no look-up.  Without parsedmarc the tests skip, and fail under CI
(tests/interop/requires.py).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.requires import missing
from tests.support import make_config
from tests.test_dkim import write_key
from tests.tlsrpt.test_golden import EVENTS, NOON
from twisted_mta.dkim import Signer
from twisted_mta.queue.spool import Spool
from twisted_mta.tlsrpt import report, store
from twisted_mta.tlsrpt.send import MailReports, Report, default_from

DAY = "2026-12-03"
DOMAIN = "example.org"
SUBMITTER = "sender.example"
# Not ASCII, so the parser must read our I-JSON as UTF-8 (RFC 7493).
ORGANIZATION = "Exämple Sender Ltd"
CONTACT = "mailto:tlsrpt-noreply@sender.example"


def parsedmarc() -> Any:
    """
    The parsedmarc module, or the test stops: skip, or fail under CI.
    """
    try:
        import parsedmarc as module
    except ImportError as e:
        missing(f"parsedmarc cannot be imported ({e}); it is in setup.cfg's test extra")
    return module


def read_json(data: bytes | str) -> dict:
    """
    What parsedmarc reads from a report's JSON (its SMTP TLS JSON parser).
    """
    return parsedmarc().parse_smtp_tls_report_json(data)


def read_file(data: bytes) -> dict:
    """
    What parsedmarc reads from a report file's bytes (say the C{.json.gz}
    attachment or POST body): its file parser, which sniffs the format.
    """
    parsed = parsedmarc().parse_report_file(data, offline=True)
    assert parsed["report_type"] == "smtp_tls", parsed["report_type"]
    return parsed["report"]


def read_mail(message: bytes) -> dict:
    """
    What parsedmarc reads from a whole report mail (RFC 5322 bytes), as a
    receiver's mailbox watcher would: offline, no DNS.
    """
    parsed = parsedmarc().parse_report_email(message, offline=True)
    assert parsed["report_type"] == "smtp_tls", parsed["report_type"]
    return parsed["report"]


def expected(ours: dict) -> dict:
    """
    What an RFC 8460 report reader must find in C{ours} (our report's
    JSON), in parsedmarc's own field names.  C{mx-host} is not here:
    parsedmarc 11 reads a key C{mx-host-pattern} and ignores RFC 8460's
    C{mx-host}; L{assert_reads} compares it only if a release reads it.
    """
    policies = []
    for entry in ours["policies"]:
        policy, summary = entry["policy"], entry["summary"]
        p: dict[str, Any] = {
            "policy_domain": policy["policy-domain"],
            "policy_type": policy["policy-type"],
            "successful_session_count": summary["total-successful-session-count"],
            "failed_session_count": summary["total-failure-session-count"],
        }
        if policy.get("policy-string"):
            p["policy_strings"] = policy["policy-string"]
        if "failure-details" in entry:
            p["failure_details"] = [
                {key.replace("-", "_").replace("failure_session", "failed_session"): value
                 for key, value in detail.items()}
                for detail in entry["failure-details"]]
        policies.append(p)
    return {
        "organization_name": ours["organization-name"],
        "begin_date": ours["date-range"]["start-datetime"],
        "end_date": ours["date-range"]["end-datetime"],
        "contact_info": ours["contact-info"],
        "report_id": ours["report-id"],
        "policies": policies,
    }


def assert_reads(case: SynchronousTestCase, read: dict, ours: dict) -> None:
    """
    C{read} (parsedmarc's reading) is what C{ours} says, field for field.
    """
    for got, entry in zip(read["policies"], ours["policies"]):
        patterns = got.pop("mx_host_patterns", None)
        if patterns is not None:  # a parsedmarc that reads mx-host
            case.assertEqual(patterns, entry["policy"].get("mx-host"))
    case.assertEqual(read, expected(ours))


def golden_day(test: SynchronousTestCase) -> dict:
    """
    The golden day's events counted by the real Aggregate, read back from
    the day file and built into the report, as the daily sender does.
    """
    clock = task.Clock()
    clock.advance(NOON)
    directory = test.mktemp()
    aggregate = store.Aggregate(directory, clock, lambda f, *a: defer.maybeDeferred(f, *a))
    test.successResultOf(aggregate.start())
    for i, event in enumerate(EVENTS):
        aggregate("tls.result", {**event, "time": NOON + i, "domain": DOMAIN})
    test.successResultOf(aggregate.flush())
    day = store.load_day(directory, DAY)
    return report.build(DAY, DOMAIN, day.counts(DOMAIN), ORGANIZATION, CONTACT,
                        report.report_id(DAY, DOMAIN, SUBMITTER))


class ParsedmarcReadsOurReportsTests(SynchronousTestCase):
    def setUp(self) -> None:
        parsedmarc()  # skip (or fail under CI) before building anything
        self.ours = golden_day(self)

    def assert_golden_day(self, read: dict) -> None:
        """
        The reading holds the golden day's facts, written out here rather
        than taken from our own JSON.
        """
        self.assertEqual(read["organization_name"], ORGANIZATION)
        self.assertEqual(read["contact_info"], "tlsrpt-noreply@sender.example")
        self.assertEqual(read["report_id"], "2026-12-03.example.org@sender.example")
        self.assertEqual((read["begin_date"], read["end_date"]),
                         ("2026-12-03T00:00:00Z", "2026-12-03T23:59:59Z"))
        by_type = {p["policy_type"]: p for p in read["policies"]}
        self.assertEqual(sorted(by_type), ["no-policy-found", "sts", "tlsa"])
        self.assertEqual({t: (p["policy_domain"], p["successful_session_count"],
                              p["failed_session_count"]) for t, p in by_type.items()},
                         {"sts": (DOMAIN, 1204, 22), "tlsa": (DOMAIN, 311, 4),
                          "no-policy-found": (DOMAIN, 9, 0)})
        self.assertEqual(
            [(d["result_type"], d["failed_session_count"])
             for d in by_type["sts"]["failure_details"]],
            [("certificate-expired", 17), ("starttls-not-supported", 3),
             ("validation-failure", 2)])
        self.assertEqual(by_type["sts"]["failure_details"][0], {
            "result_type": "certificate-expired", "failed_session_count": 17,
            "sending_mta_ip": "192.0.2.25", "receiving_ip": "198.51.100.1",
            "receiving_mx_hostname": "mx1.example.org", "receiving_mx_helo": "mx1.example.org",
            "failure_reason_code": "certificate-expired"})
        self.assertIn("mode: testing", by_type["sts"]["policy_strings"])
        self.assertEqual(by_type["tlsa"]["failure_details"], [{
            "result_type": "tlsa-invalid", "failed_session_count": 4,
            "sending_mta_ip": "2001:db8::1", "receiving_ip": "2001:db8::25",
            "receiving_mx_hostname": "mx2.example.org", "receiving_mx_helo": "mx2.example.org",
            "failure_reason_code": "dane-mismatch"}])
        self.assertNotIn("failure_details", by_type["no-policy-found"])
        self.assertNotIn("policy_strings", by_type["no-policy-found"])

    def test_json(self) -> None:
        read = read_json(report.to_json(self.ours))
        self.assert_golden_day(read)
        assert_reads(self, read, self.ours)

    def test_gzip_file(self) -> None:
        read = read_file(report.to_gzip(self.ours))
        self.assert_golden_day(read)
        assert_reads(self, read, self.ours)

    def test_report_mail(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        write_key(os.path.join(base, "k.pem"), "ed25519-sha256")
        config = make_config(base, dkim={"domains": {SUBMITTER: {
            "selector": "rpt", "key_file": "k.pem", "algorithm": "ed25519-sha256"}}})
        spool = Spool(config.spool)
        spool.lock()
        self.addCleanup(spool.unlock)
        clock = task.Clock()
        clock.advance(NOON + 86400)
        mail = MailReports(spool, lambda entry: None, Signer.from_config(config), clock,
                           default_from, "mx.sender.example")
        begin, end = report.day_bounds(DAY)
        ready = Report(policy_domain=DOMAIN, submitter=SUBMITTER, report=self.ours,
                       body=report.to_gzip(self.ours),
                       filename=report.filename(SUBMITTER, DOMAIN, begin, end))
        qid = self.successResultOf(mail.queue(ready, "tlsrpt@example.org"))
        message = spool.read_message(qid)
        self.assertTrue(message.startswith(b"DKIM-Signature: "))  # the mail as it goes
        read = read_mail(message)
        self.assert_golden_day(read)
        assert_reads(self, read, self.ours)

    def test_refuses_a_broken_report(self) -> None:
        """
        The parser is not one that accepts anything: without the summary's
        counts it refuses the report, so its acceptance above means something.
        """
        errors = parsedmarc().InvalidSMTPTLSReport
        broken = {**self.ours, "policies": [{"policy": self.ours["policies"][0]["policy"]}]}
        self.assertRaises(errors, read_json, report.to_json(broken))
        self.assertRaises(errors, read_json, report.to_json(
            {k: v for k, v in self.ours.items() if k != "report-id"}))
