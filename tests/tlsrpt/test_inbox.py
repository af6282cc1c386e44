"""
Tests for L{twisted_mta.tlsrpt.inbox}, the reader of the TLS reports other
senders send us, and for C{twisted-mta tls inbox}.

The reports are written here by hand in the shape of RFC 8460 §4.5's
example and of what the big senders send (a Google-like one: no mx-host,
the day ending 23:59:59Z; a Microsoft-like one: mx-host given, the day
ending at the next midnight); none is a copy of a real report.
"""

from __future__ import annotations

import copy
import datetime
import gzip
import json
import os
from email.message import EmailMessage

from twisted.trial.unittest import SynchronousTestCase

from tests.support import make_config
from tests.test_cli import run_cli
from twisted_mta.tlsrpt import inbox

UTC = datetime.timezone.utc
NOW = datetime.datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def google_like(day: str = "2026-12-01", failures: int = 1204, successes: int = 9000,
                result_type: str = "certificate-expired", host: str = "mx2.example.org",
                org: str = "Google LLC") -> dict:
    details = [{"result-type": result_type, "sending-mta-ip": "192.0.2.17",
                "receiving-mx-hostname": host, "receiving-ip": "198.51.100.2",
                "failed-session-count": failures}] if failures else []
    return {
        "organization-name": org,
        "date-range": {"start-datetime": f"{day}T00:00:00Z",
                       "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": "tls-reports@sender-g.example",
        "report-id": f"{day}T00:00:00Z_example.org",
        "policies": [{
            "policy": {"policy-type": "sts",
                       "policy-string": ["version: STSv1", "mode: testing",
                                         "mx: mx1.example.org", "mx: mx2.example.org",
                                         "max_age: 604800"],
                       "policy-domain": "example.org"},
            "summary": {"total-successful-session-count": successes,
                        "total-failure-session-count": failures},
            "failure-details": details,
        }],
    }


def microsoft_like(day: str = "2026-12-01", next_day: str = "2026-12-02") -> dict:
    return {
        "organization-name": "Microsoft Corporation",
        "date-range": {"start-datetime": f"{day}T00:00:00Z",
                       "end-datetime": f"{next_day}T00:00:00Z"},
        "contact-info": "tlsrpt-noreply@sender-m.example",
        "report-id": "133476224000000000+example.org",
        "policies": [{
            "policy": {"policy-type": "tlsa",
                       "policy-string": ["3 1 1 0C72AC70B745AC19998811B131D662C9AC69DBDBE7CB23E5B514B56664C5D3D6"],
                       "policy-domain": "example.org",
                       "mx-host": "mx1.example.org"},
            "summary": {"total-successful-session-count": 5326,
                        "total-failure-session-count": 0},
        }],
    }


def rfc_like() -> dict:
    """The RFC 8460 §4.5 example's shape, with our names and numbers."""
    return {
        "organization-name": "Company-X",
        "date-range": {"start-datetime": "2026-12-02T00:00:00Z",
                       "end-datetime": "2026-12-02T23:59:59Z"},
        "contact-info": "sts-reporting@company-x.example",
        "report-id": "5065427c-23d3-47ca-b6e0-000000000001",
        "policies": [{
            "policy": {"policy-type": "sts",
                       "policy-string": ["version: STSv1", "mode: testing",
                                         "mx: *.mail.example.org", "max_age: 86400"],
                       "policy-domain": "example.org",
                       "mx-host": ["*.mail.example.org"]},
            "summary": {"total-successful-session-count": 40,
                        "total-failure-session-count": 12},
            "failure-details": [
                {"result-type": "starttls-not-supported", "sending-mta-ip": "2001:db8::1",
                 "receiving-mx-hostname": "mx2.mail.example.org", "receiving-ip": "203.0.113.56",
                 "failed-session-count": 7,
                 "additional-information": "https://reports.company-x.example/info#1"},
                {"result-type": "validation-failure", "sending-mta-ip": "198.51.100.62",
                 "receiving-ip": "203.0.113.58",
                 "receiving-mx-hostname": "mx-backup.mail.example.org",
                 "failed-session-count": 3,
                 "failure-reason-code": "X509_V_ERR_PROXY_CERTIFICATES_NOT_ALLOWED"},
            ],
        }],
    }


def as_json(report: dict) -> bytes:
    return json.dumps(report, indent=2).encode()


def as_gzip(report: dict) -> bytes:
    return gzip.compress(as_json(report))


def report_mail(payload: bytes, ctype: str = "application/tlsrpt+gzip",
                filename: str | None = "sender!example.org!1764547200!1764633599.json.gz",
                report_type: str = "tlsrpt") -> bytes:
    """
    A report mail as RFC 8460 §5.3 has it: multipart/report, a text part,
    the report part.
    """
    msg = EmailMessage()
    msg["From"] = "reports@sender.example"
    msg["To"] = "tlsrpt@example.org"
    msg["Subject"] = "Report Domain: example.org Submitter: sender.example Report-ID: <1@x>"
    msg["TLS-Report-Domain"] = "example.org"
    msg["TLS-Report-Submitter"] = "sender.example"
    msg.set_content("This is an aggregate TLS report from sender.example\n")
    maintype, subtype = ctype.split("/")
    msg.add_attachment(payload, maintype=maintype, subtype=subtype, filename=filename)
    msg.replace_header("Content-Type", f'multipart/report; report-type="{report_type}"; '
                       f'boundary="{msg.get_boundary()}"')
    return msg.as_bytes()


def plain_mail(body: bytes, ctype: str = "text/plain") -> bytes:
    head = (f"From: a@b.example\r\nTo: tlsrpt@example.org\r\nSubject: hello\r\n"
            f"Content-Type: {ctype}\r\n\r\n").encode()
    return head + body


class ParseTests(SynchronousTestCase):
    """
    What reads as a report: every way of carrying one.
    """

    CASES = [
        # (name, file bytes, organization, report-id)
        ("tlsrpt+gzip part (Google-like)", report_mail(as_gzip(google_like())),
         "Google LLC", "2026-12-01T00:00:00Z_example.org"),
        ("tlsrpt+json part", report_mail(as_json(rfc_like()), "application/tlsrpt+json",
                                         "x!example.org!1!2.json"),
         "Company-X", "5065427c-23d3-47ca-b6e0-000000000001"),
        ("application/gzip named .json.gz (Microsoft-like)",
         report_mail(as_gzip(microsoft_like()), "application/gzip"),
         "Microsoft Corporation", "133476224000000000+example.org"),
        ("application/octet-stream named .json",
         report_mail(as_json(rfc_like()), "application/octet-stream", "report.json"),
         "Company-X", "5065427c-23d3-47ca-b6e0-000000000001"),
        ("application/json named .json",
         report_mail(as_json(rfc_like()), "application/json", "report.json"),
         "Company-X", "5065427c-23d3-47ca-b6e0-000000000001"),
        ("gzip part under a JSON label",
         report_mail(as_gzip(rfc_like()), "application/tlsrpt+json", "r.json"),
         "Company-X", "5065427c-23d3-47ca-b6e0-000000000001"),
        ("multipart/mixed instead of report",
         report_mail(as_gzip(google_like()), report_type="other"),
         "Google LLC", "2026-12-01T00:00:00Z_example.org"),
        ("HTTPS-style body: gzip", as_gzip(google_like()),
         "Google LLC", "2026-12-01T00:00:00Z_example.org"),
        ("HTTPS-style body: JSON", as_json(microsoft_like()),
         "Microsoft Corporation", "133476224000000000+example.org"),
        ("a mail whose body is the JSON", plain_mail(as_json(rfc_like())),
         "Company-X", "5065427c-23d3-47ca-b6e0-000000000001"),
    ]

    def test_carriers(self):
        """Each way of carrying a report gives that report."""
        for name, raw, org, report_id in self.CASES:
            reports = inbox.reports_in(raw)
            self.assertEqual([(r.organization, r.report_id) for r in reports], [(org, report_id)],
                             name)

    def test_single_part_gzip_mail(self):
        """A mail that is only the application/tlsrpt+gzip part (base64) is read."""
        msg = EmailMessage()
        msg["Subject"] = "r"
        msg.set_content(as_gzip(google_like()), maintype="application", subtype="tlsrpt+gzip")
        reports = inbox.reports_in(msg.as_bytes())
        self.assertEqual(reports[0].organization, "Google LLC")

    def test_fields(self):
        """The RFC-shaped report gives its policies, counts, details and days."""
        (report,) = inbox.reports_in(report_mail(as_gzip(rfc_like())))
        self.assertEqual(report.contact, "sts-reporting@company-x.example")
        self.assertEqual(report.first_day, datetime.date(2026, 12, 2))
        self.assertEqual(report.last_day, datetime.date(2026, 12, 2))
        (policy,) = report.policies
        self.assertEqual((policy.policy_type, policy.domain, policy.mx_hosts,
                          policy.successes, policy.failures),
                         ("sts", "example.org", ("*.mail.example.org",), 40, 12))
        self.assertEqual(policy.details[0], inbox.FailureDetail(
            "starttls-not-supported", 7, "mx2.mail.example.org", "2001:db8::1",
            "203.0.113.56", None))
        self.assertEqual(policy.details[1].reason_code,
                         "X509_V_ERR_PROXY_CERTIFICATES_NOT_ALLOWED")

    def test_midnight_end(self):
        """A day that ends at the next midnight (Microsoft-like) is that one day."""
        (report,) = inbox.reports_in(as_json(microsoft_like()))
        self.assertEqual((report.first_day, report.last_day),
                         (datetime.date(2026, 12, 1), datetime.date(2026, 12, 1)))
        self.assertEqual(report.policies[0].mx_hosts, ("mx1.example.org",))

    def test_several_policies(self):
        """Three policies of three kinds in one report; hosts lower-cased, the root dot gone."""
        (report,) = inbox.reports_in(report_mail(as_gzip(several_policies())))
        self.assertEqual([(p.policy_type, p.domain, p.mx_hosts, p.successes, p.failures)
                          for p in report.policies],
                         [("tlsa", "example.org", ("mx1.example.org",), 12, 2),
                          ("sts", "example.net", ("mx1.example.net", "mx2.example.net"), 3, 0),
                          ("no-policy-found", "example.com", (), 1, 0)])
        self.assertEqual(report.policies[0].details[0].mx_host, "mx1.example.org")
        self.assertEqual((report.first_day, report.last_day),
                         (datetime.date(2026, 12, 1), datetime.date(2026, 12, 1)))
        s = summarize(several_policies())
        rows = {r.where: (r.successes, r.failed) for r in s.rows}
        self.assertEqual(rows, {"mx1.example.org": (12, 2),
                                "mx1.example.net, mx2.example.net": (3, 0),
                                "the MX hosts of example.com": (1, 0)})
        (problem,) = s.problems
        self.assertIn("no TLSA record matched", inbox.hint(problem))

    def test_two_report_parts(self):
        """A mail with two report parts gives both reports."""
        msg = EmailMessage()
        msg["Subject"] = "two"
        msg.set_content("two reports\n")
        msg.add_attachment(as_gzip(google_like()), maintype="application",
                           subtype="tlsrpt+gzip", filename="a.json.gz")
        msg.add_attachment(as_json(rfc_like()), maintype="application",
                           subtype="tlsrpt+json", filename="b.json")
        self.assertEqual([r.organization for r in inbox.reports_in(msg.as_bytes())],
                         ["Google LLC", "Company-X"])


def several_policies() -> dict:
    """
    One sender, three policy domains: a DANE one (two TLSA records, its MX
    host named), an MTA-STS one with two MX hosts, and one that published
    nothing; offsets and fractions in the dates, the optional detail
    fields given.
    """
    return {
        "organization-name": "Mail Provider Y",
        "date-range": {"start-datetime": "2026-12-01T00:00:00.000+00:00",
                       "end-datetime": "2026-12-01T23:59:59.999+00:00"},
        "contact-info": "mailto:tlsrpt@provider-y.example",
        "report-id": "<y-2026-12-01-0001@provider-y.example>",
        "policies": [
            {"policy": {"policy-type": "tlsa",
                        "policy-string": ["3 1 1 AAAA", "2 1 1 BBBB"],
                        "policy-domain": "example.org", "mx-host": ["mx1.example.org"]},
             "summary": {"total-successful-session-count": 12,
                         "total-failure-session-count": 2},
             "failure-details": [{"result-type": "tlsa-invalid",
                                  "sending-mta-ip": "192.0.2.9",
                                  "receiving-mx-hostname": "mx1.example.org.",
                                  "receiving-mx-helo": "mx1.example.org",
                                  "receiving-ip": "198.51.100.1",
                                  "failed-session-count": 2,
                                  "additional-information": "https://y.example/why",
                                  "failure-reason-code": "no TLSA record matched"}]},
            {"policy": {"policy-type": "sts",
                        "policy-string": ["version: STSv1", "mode: enforce",
                                          "mx: mx1.example.net", "mx: mx2.example.net",
                                          "max_age: 86400"],
                        "policy-domain": "example.net",
                        "mx-host": ["mx1.example.net", "mx2.example.net"]},
             "summary": {"total-successful-session-count": 3,
                         "total-failure-session-count": 0},
             "failure-details": []},
            {"policy": {"policy-type": "no-policy-found", "policy-domain": "Example.COM"},
             "summary": {"total-successful-session-count": 1,
                         "total-failure-session-count": 0}},
        ],
    }


class OurOwnReportTests(SynchronousTestCase):
    """
    A report our sending side writes (L{twisted_mta.tlsrpt.report} and
    L{twisted_mta.tlsrpt.send}) reads here as what it says: the two sides
    agree on the format.
    """

    def test_round_trip(self):
        """The report mail our sending side builds gives its organization, counts and failures."""
        from twisted_mta.tlsrpt import counts, report, send
        policy = counts.Policy("sts", ("version: STSv1", "mode: enforce", "mx: mx2.example.org",
                                       "max_age: 86400"), ("mx2.example.org",))
        detail = counts.Detail("certificate-expired", "192.0.2.1", "mx2.example.org",
                               None, "198.51.100.2", "X509_V_ERR_CERT_HAS_EXPIRED")
        pc = counts.PolicyCounts(policy, successes=20, failures=4, details={detail: 4})
        day = "2026-12-01"
        data = report.build(day, "example.org", [pc], "Our Org", "mailto:tlsrpt@our.example",
                            report.report_id(day, "example.org", "our.example"))
        begin, end = report.day_bounds(day)
        r = send.Report("example.org", "our.example", data, report.to_gzip(data),
                        report.filename("our.example", "example.org", begin, end))
        raw = send.report_message(r, from_address="tlsrpt-noreply@our.example",
                                  to="tlsrpt@example.org", now=0.0, hostname="mx.our.example")
        (got,) = inbox.reports_in(raw)
        self.assertEqual((got.organization, got.contact, got.report_id),
                         ("Our Org", "tlsrpt@our.example",
                          "2026-12-01.example.org@our.example"))
        (p,) = got.policies
        self.assertEqual((p.successes, p.failures, p.mx_hosts), (20, 4, ("mx2.example.org",)))
        self.assertEqual(p.details, (inbox.FailureDetail(
            "certificate-expired", 4, "mx2.example.org", "192.0.2.1", "198.51.100.2",
            "X509_V_ERR_CERT_HAS_EXPIRED"),))


def _without(path: tuple, report: dict | None = None) -> dict:
    r = copy.deepcopy(report or rfc_like())
    node = r
    for key in path[:-1]:
        node = node[key]
    del node[path[-1]]
    return r


def _with(path: tuple, value, report: dict | None = None) -> dict:
    r = copy.deepcopy(report or rfc_like())
    node = r
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return r


P0 = ("policies", 0)
D0 = P0 + ("failure-details", 0)


class MalformedTests(SynchronousTestCase):
    """
    Whatever is wrong with a file is one reason in words, never an
    exception that stops the reader.
    """

    CASES = [
        # (name, file bytes, words the reason holds)
        ("not gzip behind the magic", report_mail(b"\x1f\x8bnot really gzip at all"),
         "bad gzip"),
        ("gzip cut short", report_mail(as_gzip(rfc_like())[:40]), "bad gzip: cut short"),
        ("gzip with a bad checksum",
         report_mail(as_gzip(rfc_like())[:-8] + b"\0\0\0\0" + as_gzip(rfc_like())[-4:]),
         "bad gzip"),
        ("not JSON", report_mail(b"{this is not json", "application/tlsrpt+json", "r.json"),
         "bad JSON"),
        ("not UTF-8", as_json(rfc_like()).replace(b"Company-X", b"Company-\xff"), "not UTF-8"),
        ("NaN", as_json(rfc_like()).replace(b'-count": 40', b'-count": NaN'), "NaN is not JSON"),
        ("a key twice", b'{"report-id": "a", "report-id": "b"}', "appears twice"),
        ("an array", report_mail(b"[]", "application/tlsrpt+json", "r.json"),
         "must be an object, not an array"),
        ("no organization-name", as_json(_without(("organization-name",))),
         "organization-name: missing"),
        ("empty organization-name", as_json(_with(("organization-name",), "  ")),
         "organization-name: is empty"),
        ("no contact-info", as_json(_without(("contact-info",))), "contact-info: missing"),
        ("no report-id", as_json(_without(("report-id",))), "report-id: missing"),
        ("report-id a number", as_json(_with(("report-id",), 7)),
         "report-id: must be a string, not a number"),
        ("no date-range", as_json(_without(("date-range",))), "date-range: missing"),
        ("no end", as_json(_without(("date-range", "end-datetime"))),
         "date-range.end-datetime: missing"),
        ("a date that is none", as_json(_with(("date-range", "start-datetime"), "yesterday")),
         "date-range.start-datetime: not an RFC 3339 date-time"),
        ("a date without zone",
         as_json(_with(("date-range", "start-datetime"), "2026-12-02T00:00:00")),
         "has no time zone"),
        ("ends before it starts",
         as_json(_with(("date-range", "end-datetime"), "2026-11-30T00:00:00Z")),
         "ends before it starts"),
        ("policies an object", as_json(_with(("policies",), {})),
         "policies: must be an array, not an object"),
        ("no policy", as_json(_without(P0 + ("policy",))), "policies[0].policy: missing"),
        ("unknown policy-type", as_json(_with(P0 + ("policy", "policy-type"), "dmarc")),
         "policies[0].policy.policy-type: must be one of tlsa, sts, no-policy-found"),
        ("no policy-domain", as_json(_without(P0 + ("policy", "policy-domain"))),
         "policy-domain: missing"),
        ("mx-host of numbers", as_json(_with(P0 + ("policy", "mx-host"), [1])),
         "mx-host: must be an array of strings"),
        ("no summary", as_json(_without(P0 + ("summary",))), "policies[0].summary: missing"),
        ("a count as text",
         as_json(_with(P0 + ("summary", "total-successful-session-count"), "40")),
         "total-successful-session-count: must be a count"),
        ("a negative count",
         as_json(_with(P0 + ("summary", "total-failure-session-count"), -1)),
         "total-failure-session-count: must be a count"),
        ("a count as a boolean",
         as_json(_with(P0 + ("summary", "total-failure-session-count"), True)),
         "must be a count"),
        ("a fractional count",
         as_json(_with(P0 + ("summary", "total-failure-session-count"), 1.5)),
         "must be a count"),
        ("failure-details an object", as_json(_with(P0 + ("failure-details",), {})),
         "failure-details: must be an array"),
        ("a detail without result-type", as_json(_without(D0 + ("result-type",))),
         "policies[0].failure-details[0].result-type: missing"),
        ("a detail without count", as_json(_without(D0 + ("failed-session-count",))),
         "failed-session-count: missing"),
        ("receiving-ip a number", as_json(_with(D0 + ("receiving-ip",), 203)),
         "failure-details[0].receiving-ip: must be a string"),
        ("no report in the mail", plain_mail(b"Hello, how are you?\n"),
         "no TLS report in it (text/plain, Subject: hello)"),
        ("an attachment that is no report",
         report_mail(b"%PDF-1.4", "application/pdf", "invoice.pdf"), "no TLS report in it"),
        ("octet-stream not named as a report",
         report_mail(as_json(rfc_like()), "application/octet-stream", "data.bin"),
         "no TLS report in it"),
        ("an empty report part", report_mail(b"", "application/tlsrpt+json", "r.json"),
         "bad JSON"),
    ]

    def test_cases(self):
        """Each malformed file gives one line of reason naming what is wrong."""
        for name, raw, words in self.CASES:
            with self.assertRaises(inbox.Malformed, msg=name) as caught:
                inbox.reports_in(raw)
            reason = str(caught.exception)
            self.assertIn(words, reason, name)
            self.assertEqual(isinstance(caught.exception, inbox.NotAReport),
                             words == "no TLS report in it" or "(text/plain" in words, name)
            self.assertNotIn("\n", reason, name)

    def test_mutations(self):
        """Bytes flipped, cut and inserted in report files give a report or Malformed, nothing else."""
        import random
        rnd = random.Random(8460)
        seeds = [report_mail(as_gzip(google_like())), as_json(several_policies()),
                 report_mail(as_json(rfc_like()), "application/tlsrpt+json", "r.json"),
                 as_gzip(microsoft_like())]
        outcomes = set()
        for _ in range(1500):
            b = bytearray(rnd.choice(seeds))
            for _ in range(rnd.randint(1, 6)):
                pos, op = rnd.randrange(len(b)), rnd.random()
                if op < 0.4:
                    b[pos] = rnd.randrange(256)
                elif op < 0.7:
                    del b[pos:pos + rnd.randint(1, 40)]
                else:
                    b[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 8)))
            try:
                inbox.reports_in(bytes(b))
                outcomes.add("read")
            except inbox.Malformed as e:
                self.assertNotIn("\n", str(e))
                outcomes.add("malformed")
        self.assertEqual(outcomes, {"read", "malformed"})

    def test_gzip_bomb(self):
        """A gzip that decompresses past 20 MB is refused, without decompressing it all."""
        bomb = gzip.compress(b"\0" * (21 * 1024 * 1024))
        with self.assertRaises(inbox.Malformed) as caught:
            inbox.reports_in(report_mail(bomb))
        self.assertEqual(str(caught.exception), "bad gzip: decompresses to more than 20 MB")

    def test_gunzip_limit(self):
        """gunzip takes every member up to its limit, and not a byte more."""
        two = gzip.compress(b"a" * 10) + gzip.compress(b"b" * 10)
        self.assertEqual(inbox.gunzip(two, limit=20), b"a" * 10 + b"b" * 10)
        self.assertRaises(inbox.Malformed, inbox.gunzip, two, limit=19)

    def test_bad_part_named(self):
        """In a mail with two report parts, the bad one is named by its file name."""
        msg = EmailMessage()
        msg.set_content("two\n")
        msg.add_attachment(as_gzip(google_like()), maintype="application",
                           subtype="tlsrpt+gzip", filename="good.json.gz")
        msg.add_attachment(b"{", maintype="application", subtype="tlsrpt+json",
                           filename="bad.json")
        with self.assertRaises(inbox.Malformed) as caught:
            inbox.reports_in(msg.as_bytes())
        self.assertTrue(str(caught.exception).startswith("bad.json: bad JSON"))

    def test_sender_text_made_safe(self):
        """What a sender wrote is printed without control characters (no terminal escapes), cut short when long."""
        report = _with(("organization-name",), "Evil\x1b[2J\x1b]0;pwned\x07 Corp\n")
        report = _with(D0 + ("result-type",), "Certificate-Expired\r\n" + "x" * 500, report)
        (r,) = inbox.reports_in(as_json(report))
        self.assertEqual(r.organization, "Evil [2J ]0;pwned Corp")
        result_type = r.policies[0].details[0].result_type
        self.assertTrue(result_type.startswith("certificate-expired xxx"), result_type)
        self.assertEqual(len(result_type), inbox.MAX_TEXT)
        with self.assertRaises(inbox.Malformed) as caught:
            inbox.reports_in(plain_mail(b"hi\n").replace(b"Subject: hello",
                                                          b"Subject: a\x1b[31mred"))
        self.assertNotIn("\x1b", str(caught.exception))
        with self.assertRaises(inbox.Malformed) as caught:
            inbox.reports_in(as_json(_with(("organization-name",), "\x1b\x07")))
        self.assertEqual(str(caught.exception), "organization-name: is empty")

    def test_unknown_fields_ignored(self):
        """Fields the RFC does not name are ignored (the format is extensible)."""
        report = _with(("x-extension",), {"anything": [1, 2]})
        report = _with(P0 + ("policy", "x-more"), 3, report)
        self.assertEqual(inbox.reports_in(as_json(report))[0].organization, "Company-X")

    def test_optional_detail_fields_left_out(self):
        """A detail without sending-mta-ip or receiving-ip (as the RFC's own example) reads."""
        report = _without(D0 + ("sending-mta-ip",))
        report = _without(D0 + ("receiving-ip",), report)
        detail = inbox.reports_in(as_json(report))[0].policies[0].details[0]
        self.assertEqual((detail.sending_mta_ip, detail.receiving_ip), (None, None))


def summarize(*reports: dict, since_days: int | None = 7, unreadable=()) -> inbox.Summary:
    results = [inbox.FileResult(f"/m/new/{i}", inbox.reports_in(as_json(r)))
               for i, r in enumerate(reports)]
    results += list(unreadable)
    since = NOW - datetime.timedelta(days=since_days) if since_days is not None else None
    return inbox.summarize(results, NOW, since)


class SummaryTests(SynchronousTestCase):
    def test_rows_per_organization_and_host(self):
        """Failures count against receiving-mx-hostname; successes against the policy's MX host, else its domain."""
        s = summarize(google_like(), microsoft_like(), rfc_like())
        rows = {(r.organization, r.host): (r.successes, dict(r.failures)) for r in s.rows}
        self.assertEqual(rows, {
            ("Google LLC", "mx2.example.org"): (0, {"certificate-expired": 1204}),
            ("Google LLC", None): (9000, {}),
            ("Microsoft Corporation", "mx1.example.org"): (5326, {}),
            ("Company-X", "mx2.mail.example.org"): (0, {"starttls-not-supported": 7}),
            ("Company-X", "mx-backup.mail.example.org"): (0, {"validation-failure": 3}),
            ("Company-X", "*.mail.example.org"): (40, {"not-detailed": 2}),
        })
        self.assertEqual(s.rows[0].host, "mx2.example.org")  # most failures first
        self.assertEqual((s.reports, s.duplicates, s.older, s.files), (3, 0, 0, 3))

    def test_days_and_sessions(self):
        """A row spans the days of its reports; sessions are successes and failures."""
        s = summarize(google_like("2026-11-29", failures=0, successes=10),
                      google_like("2026-12-01", failures=0, successes=5))
        (row,) = s.rows
        self.assertEqual((row.first_day, row.last_day, row.sessions, row.reports),
                         (datetime.date(2026, 11, 29), datetime.date(2026, 12, 1), 15, 2))

    def test_duplicates_counted_once(self):
        """The same report-id from the same organization counts once; another organization's same id counts."""
        same_id = google_like(org="Other Sender")
        s = summarize(google_like(), google_like(), same_id)
        self.assertEqual((s.reports, s.duplicates), (2, 1))
        counts = {p.organization: p.sessions for p in s.problems}
        self.assertEqual(counts, {"Google LLC": 1204, "Other Sender": 1204})

    def test_since(self):
        """Reports that ended before the window are left out and counted as older."""
        s = summarize(google_like("2026-11-20"), google_like("2026-12-01", failures=0),
                      since_days=7)
        self.assertEqual((s.reports, s.older, s.problems), (1, 1, ()))
        self.assertEqual(summarize(google_like("2026-11-20"), since_days=None).reports, 1)

    def test_unreadable_in_window(self):
        """An unreadable file is listed when it arrived in the window, by its mtime."""
        recent = inbox.FileResult("/m/new/a", problem="bad JSON", mtime=NOW.timestamp() - 60)
        old = inbox.FileResult("/m/new/b", problem="bad JSON",
                               mtime=NOW.timestamp() - 30 * 86400)
        spam = inbox.FileResult("/m/new/c", problem="no TLS report in it (text/plain)",
                                mtime=NOW.timestamp() - 60, not_report=True)
        s = summarize(unreadable=[recent, old, spam])
        self.assertEqual(s.unreadable, (inbox.Unreadable("/m/new/a", "bad JSON"),))
        self.assertEqual(s.other_mail, (inbox.Unreadable("/m/new/c",
                                                         "no TLS report in it (text/plain)"),))
        self.assertEqual(s.exit_code, 0)  # named, but nothing to fix on our side

    def test_problems_worst_first(self):
        """One problem per (organization, host, result type), most sessions first."""
        s = summarize(google_like(), rfc_like(),
                      google_like("2026-12-02", failures=6, result_type="tlsa-invalid",
                                  host="mx1.example.org"))
        self.assertEqual([(p.organization, p.host, p.result_type, p.sessions) for p in s.problems],
                         [("Google LLC", "mx2.example.org", "certificate-expired", 1204),
                          ("Company-X", "mx2.mail.example.org", "starttls-not-supported", 7),
                          ("Google LLC", "mx1.example.org", "tlsa-invalid", 6),
                          ("Company-X", "mx-backup.mail.example.org", "validation-failure", 3),
                          ("Company-X", "*.mail.example.org", "not-detailed", 2)])
        self.assertEqual(s.problems[3].reason_codes, ("X509_V_ERR_PROXY_CERTIFICATES_NOT_ALLOWED",))

    def test_healthy(self):
        """Organizations with no failure anywhere are the healthy ones."""
        s = summarize(google_like(), microsoft_like(), google_like(org="Quiet Sender", failures=0,
                                                                  successes=3))
        self.assertEqual(s.healthy, (("Microsoft Corporation", 5326), ("Quiet Sender", 3)))

    def test_exit_code(self):
        """0 when no sender reported a failure, 1 when one did."""
        self.assertEqual(summarize(microsoft_like()).exit_code, 0)
        self.assertEqual(summarize().exit_code, 0)
        self.assertEqual(summarize(microsoft_like(), google_like()).exit_code, 1)

    def test_json_shape(self):
        """to_dict is the documented shape."""
        d = summarize(google_like(), microsoft_like()).to_dict()
        self.assertEqual(set(d), {"since", "now", "files", "reports", "duplicates", "older",
                                  "problems", "healthy", "rows", "malformed", "not_reports",
                                  "exit_code"})
        self.assertEqual(d["since"], "2026-11-26T12:00:00Z")
        self.assertEqual(d["problems"][0], {
            "organization": "Google LLC", "mx_host": "mx2.example.org",
            "result_type": "certificate-expired", "sessions": 1204,
            "first_day": "2026-12-01", "last_day": "2026-12-01", "ongoing": True,
            "policy_domains": ["example.org"], "failure_reason_codes": [],
            "text": "Google LLC saw 1,204 sessions to mx2.example.org fail with "
                    "certificate-expired on 1 December",
            "hint": "renew the certificate on mx2.example.org (and check that the renewal "
                    "reloads the server)"})
        self.assertEqual(d["healthy"], [{"organization": "Microsoft Corporation",
                                         "sessions": 5326}])
        self.assertEqual(d["rows"][0]["failures"], {"certificate-expired": 1204})
        json.dumps(d)  # all of it serialises


class WordsTests(SynchronousTestCase):
    def problem(self, **kw) -> inbox.Problem:
        fields = dict(organization="Google", host="mx2.example.org",
                      result_type="certificate-expired", sessions=1204,
                      first_day=datetime.date(2026, 12, 1), last_day=datetime.date(2026, 12, 3),
                      ongoing=True, domains=("example.org",))
        fields.update(kw)
        return inbox.Problem(**fields)

    def test_sentences(self):
        """The issue's sentence, and its forms for one day, a past stretch, another year, one session."""
        today = NOW.date()
        cases = [
            ({}, "Google saw 1,204 sessions to mx2.example.org fail with certificate-expired "
                 "since 1 December"),
            ({"last_day": datetime.date(2026, 12, 1)},
             "Google saw 1,204 sessions to mx2.example.org fail with certificate-expired "
             "on 1 December"),
            ({"ongoing": False, "last_day": datetime.date(2026, 12, 2)},
             "Google saw 1,204 sessions to mx2.example.org fail with certificate-expired "
             "from 1 to 2 December"),
            ({"first_day": datetime.date(2025, 12, 30), "sessions": 1},
             "Google saw 1 session to mx2.example.org fail with certificate-expired "
             "since 30 December 2025"),
            ({"ongoing": False, "first_day": datetime.date(2025, 12, 30),
              "last_day": datetime.date(2026, 1, 2)},
             "Google saw 1,204 sessions to mx2.example.org fail with certificate-expired "
             "from 30 December 2025 to 2 January"),
        ]
        for change, expected in cases:
            self.assertEqual(inbox.sentence(self.problem(**change), today), expected)

    def test_hints(self):
        """Every registered result type has its own hint naming where to look."""
        cases = {
            "certificate-expired": "renew the certificate on mx2.example.org",
            "starttls-not-supported": "mx2.example.org did not offer STARTTLS",
            "certificate-host-mismatch": "does not name mx2.example.org",
            "certificate-not-trusted": "full chain",
            "tlsa-invalid": "TLSA records of _25._tcp.mx2.example.org no longer match",
            "dnssec-invalid": "DNSSEC validation of example.org",
            "dane-required": "no DNSSEC-signed TLSA records for mx2.example.org",
            "sts-policy-fetch-error": "https://mta-sts.example.org/.well-known/mta-sts.txt",
            "sts-policy-invalid": "does not parse",
            "sts-webpki-invalid": "mta-sts.example.org is not valid",
            "not-detailed": "without saying which",
            "something-new": "an unregistered result type",
        }
        seen = set()
        for result_type, words in cases.items():
            text = inbox.hint(self.problem(result_type=result_type))
            self.assertIn(words, text, result_type)
            seen.add(text)
        self.assertEqual(len(seen), len(cases))
        self.assertIn("X509_V_ERR_CERT_REVOKED", inbox.hint(self.problem(
            result_type="validation-failure", reason_codes=("X509_V_ERR_CERT_REVOKED",))))

    def test_no_host_named(self):
        """A failure that names no MX host, under a policy that names none, is the domain's MX hosts."""
        p = self.problem(host=None, result_type="tlsa-invalid")
        self.assertEqual(inbox.sentence(p, NOW.date()),
                         "Google saw 1,204 sessions to the MX hosts of example.org fail with "
                         "tlsa-invalid since 1 December")
        self.assertIn("the TLSA records of the MX hosts of example.org no longer match",
                      inbox.hint(p))
        report = google_like()
        del report["policies"][0]["failure-details"][0]["receiving-mx-hostname"]
        (problem,) = summarize(report).problems
        self.assertEqual((problem.host, problem.where), (None, "the MX hosts of example.org"))
        self.assertIsNone(problem.to_dict(NOW.date())["mx_host"])

    def test_plain_words(self):
        """A line per problem with its hint under it, then the healthy senders in one line."""
        lines = inbox.plain_words(summarize(google_like(), microsoft_like(),
                                            google_like(org="Quiet", failures=0, successes=1)))
        self.assertEqual(lines, [
            "Google LLC saw 1,204 sessions to mx2.example.org fail with certificate-expired "
            "on 1 December.",
            "    -> renew the certificate on mx2.example.org (and check that the renewal "
            "reloads the server).",
            "No failures reported by Microsoft Corporation (5,326 sessions), Quiet (1 session).",
        ])

    def test_text(self):
        """The text output: a head line, the words, the table, the unreadable files."""
        bad = inbox.FileResult("/m/new/x", problem="bad gzip: cut short",
                               mtime=NOW.timestamp())
        spam = inbox.FileResult("/m/new/y", problem="no TLS report in it (text/plain)",
                                mtime=NOW.timestamp(), not_report=True)
        s = summarize(google_like(), google_like(), microsoft_like(), unreadable=[bad, spam])
        text = inbox.format_text(s, ["/m"], "7d")
        lines = text.splitlines()
        self.assertEqual(lines[0], "TLS reports in /m since 26 November (7d): 2 reports from 2 "
                                   "organizations (1 duplicate counted once; 1 unreadable file; "
                                   "1 other mail).")
        self.assertIn("Google LLC saw 1,204 sessions", text)
        header = [line for line in lines if line.startswith("ORGANIZATION")]
        self.assertEqual(len(header), 1)
        self.assertIn("certificate-expired 1,204", text)
        row = [line.split() for line in lines if line.startswith("Google LLC  ")]
        self.assertEqual([r[:8] for r in row],
                         [["Google", "LLC", "mx2.example.org", "1,204", "0", "1,204",
                           "2026-12-01", "certificate-expired"],
                          ["Google", "LLC", "the", "MX", "hosts", "of", "example.org", "9,000"]])
        self.assertEqual(lines[-5:], ["Not readable as TLS reports:",
                                      "  /m/new/x: bad gzip: cut short",
                                      "",
                                      "Other mail in the report mailbox (no TLS report in it):",
                                      "  /m/new/y: no TLS report in it (text/plain)"])


def write_maildir(base: str, files: dict[str, bytes], sub: str = "new") -> str:
    maildir = os.path.join(base, "Maildir")
    for s in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, s), exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(maildir, sub, name), "wb") as f:
            f.write(data)
    return maildir


class MaildirTests(SynchronousTestCase):
    def test_read_only(self):
        """Reading leaves every message where it was, with its name, size and times."""
        maildir = write_maildir(self.mktemp(), {"1.a.host": report_mail(as_gzip(google_like())),
                                                "2.b.host": b"garbage"})
        write_maildir(os.path.dirname(maildir), {"3.c.host:2,S": as_json(microsoft_like())},
                      sub="cur")
        os.utime(os.path.join(maildir, "new", "1.a.host"), (1000, 2000))

        def state():
            out = {}
            for sub in ("tmp", "new", "cur"):
                for name in os.listdir(os.path.join(maildir, sub)):
                    st = os.stat(os.path.join(maildir, sub, name))
                    out[sub, name] = (st.st_size, st.st_mtime, st.st_mode)
            return out
        before = state()
        results = list(inbox.read_maildirs([maildir]))
        self.assertEqual(state(), before)
        self.assertEqual(os.stat(os.path.join(maildir, "new", "1.a.host")).st_atime, 1000)
        self.assertEqual([(os.path.basename(r.path), len(r.reports), bool(r.problem))
                          for r in results],
                         [("1.a.host", 1, False), ("2.b.host", 0, True), ("3.c.host:2,S", 1, False)])

    def test_moved_to_cur(self):
        """A message a mail client moves from new/ to cur/ meanwhile is read there."""
        maildir = write_maildir(self.mktemp(), {"1.a.host": as_json(microsoft_like())})
        listed = inbox.maildir_files(maildir)
        os.rename(os.path.join(maildir, "new", "1.a.host"),
                  os.path.join(maildir, "cur", "1.a.host:2,S"))
        result = inbox.read_file(listed[0])
        self.assertEqual(os.path.basename(result.path), "1.a.host:2,S")
        self.assertEqual(result.reports[0].organization, "Microsoft Corporation")

    def test_gone(self):
        """A message deleted meanwhile is passed over."""
        maildir = write_maildir(self.mktemp(), {})
        self.assertIsNone(inbox.read_file(os.path.join(maildir, "new", "nothing")))

    def test_dot_files_and_too_large(self):
        """Dot files are no messages; a file over the size cap is named, not read."""
        maildir = write_maildir(self.mktemp(), {".hidden": b"x", "big": b"x" * 100})
        self.patch(inbox, "MAX_FILE", 50)
        (result,) = inbox.read_maildirs([maildir])
        self.assertEqual(os.path.basename(result.path), "big")
        self.assertIn("too large", result.problem)

    def test_parser_surprise(self):
        """An exception the email package might raise on one file names that file; the rest are read."""
        maildir = write_maildir(self.mktemp(), {"1.a": b"From: x\r\n\r\nhi",
                                                "2.b": as_json(microsoft_like())})

        def surprise(raw):
            if raw.startswith(b"From"):
                raise IndexError("list index out of range")
            return real(raw)
        real = inbox.reports_in
        self.patch(inbox, "reports_in", surprise)
        results = list(inbox.read_maildirs([maildir]))
        self.assertEqual([r.problem for r in results],
                         ["could not be parsed: IndexError: list index out of range", None])

    def test_unreadable_file(self):
        """A name in new/ that cannot be read as a file is named with the reason."""
        maildir = write_maildir(self.mktemp(), {})
        os.mkdir(os.path.join(maildir, "new", "1.a"))
        (result,) = inbox.read_maildirs([maildir])
        self.assertEqual(result.problem, "cannot be read: Is a directory")


class MailboxTests(SynchronousTestCase):
    def config(self, **local):
        base = os.path.abspath(self.mktemp())
        return make_config(base, local={"domains": ["example.org"],
                                        "users": ["alice", "tlsrpt"], "aliases": {},
                                        "postmaster": "alice", "mailbox": "mail/{user}/Maildir", **local}), base

    def test_default_address(self):
        """With nothing named, tlsrpt@ the local domain (what tls publish suggests) is read."""
        config, base = self.config()
        (box,) = inbox.find_mailboxes(config, None)
        self.assertEqual(box, inbox.Mailbox(os.path.join(base, "mail", "tlsrpt", "Maildir"),
                                            "tlsrpt@example.org"))
        self.assertFalse(box.exists)

    def test_publish_rua(self):
        """[publish] tlsrpt_rua's local mailto: addresses are read when set."""
        config, base = self.config()
        import attrs
        config = attrs.evolve(config, publish=attrs.evolve(
            config.publish, tlsrpt_rua=("mailto:alice@example.org", "https://r.example/x")))
        (box,) = inbox.find_mailboxes(config, None)
        self.assertEqual(box.path, os.path.join(base, "mail", "alice", "Maildir"))

    def test_configured_inbox(self):
        """[tlsrpt] inbox names the mailbox when --mailbox does not."""
        config, base = self.config(aliases={"reports": ["alice"]})
        import attrs
        config = attrs.evolve(config, tlsrpt=attrs.evolve(config.tlsrpt, inbox="reports"))
        (box,) = inbox.find_mailboxes(config, None)
        self.assertEqual(box, inbox.Mailbox(os.path.join(base, "mail", "alice", "Maildir"),
                                            "reports"))
        (box,) = inbox.find_mailboxes(config, "tlsrpt")
        self.assertEqual(box.path, os.path.join(base, "mail", "tlsrpt", "Maildir"))

    def test_named_user_and_alias(self):
        """--mailbox names a user or an alias, with or without the domain."""
        config, base = self.config(aliases={"reports": ["alice"]})
        for name in ("alice", "alice@example.org", "reports", "REPORTS@example.org"):
            (box,) = inbox.find_mailboxes(config, name)
            self.assertEqual(box.path, os.path.join(base, "mail", "alice", "Maildir"), name)

    def test_named_path(self):
        """--mailbox with a / is a Maildir path, which must exist and be one."""
        config, base = self.config()
        maildir = write_maildir(os.path.join(base, "x"), {})
        self.assertEqual(inbox.find_mailboxes(config, maildir), (inbox.Mailbox(maildir, maildir),))
        with self.assertRaises(inbox.MailboxError) as caught:
            inbox.find_mailboxes(config, os.path.join(base, "nowhere"))
        self.assertIn("no such Maildir", str(caught.exception))
        with self.assertRaises(inbox.MailboxError) as caught:
            inbox.find_mailboxes(config, base + "/")
        self.assertIn("not a Maildir", str(caught.exception))

    def test_not_found(self):
        """An address that is no local mailbox is refused, saying why."""
        config, _ = self.config(users=["alice"])
        cases = {None: "tlsrpt@example.org is no local user or alias",
                 "bob": "bob is no local user or alias",
                 "x@elsewhere.example": "x@elsewhere.example is not in a local domain"}
        for name, words in cases.items():
            with self.assertRaises(inbox.MailboxError) as caught:
                inbox.find_mailboxes(config, name)
            self.assertIn(words, str(caught.exception))
        config, _ = self.config(aliases={"fwd": ["someone@remote.example"]})
        with self.assertRaises(inbox.MailboxError) as caught:
            inbox.find_mailboxes(config, "fwd")
        self.assertIn("forwards to someone@remote.example", str(caught.exception))


class CommandTests(SynchronousTestCase):
    """
    C{twisted-mta tls inbox} on a Maildir built here.
    """

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.conf = os.path.join(base, "mta.toml")
        with open(self.conf, "w") as f:
            f.write('[server]\nhostname = "mx.example.org"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[local]\ndomains = ["example.org"]\nusers = ["alice", "tlsrpt"]\n'
                    'postmaster = "alice"\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n')
        self.maildir = os.path.join(base, "mail", "tlsrpt", "Maildir")
        today = datetime.datetime.now(UTC).date()
        self.day = (today - datetime.timedelta(days=1)).isoformat()
        self.old = (today - datetime.timedelta(days=20)).isoformat()

    def fill(self, files: dict[str, bytes]) -> None:
        write_maildir(os.path.dirname(self.maildir), files)

    def test_no_mail_yet(self):
        """Before any report arrives (no Maildir yet): exit 0, and it says so."""
        code, out, err = run_cli("tls", "inbox", "-c", self.conf)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("0 reports", out)
        self.assertIn("does not exist yet", out)

    def test_failures(self):
        """Reports with a failure: the sentence, the hint, exit 1; healthy senders in a line."""
        self.fill({"1.a.h": report_mail(as_gzip(google_like(self.day))),
                   "2.b.h": report_mail(as_gzip(microsoft_like(self.day, self.day)),
                                        "application/gzip")})
        code, out, err = run_cli("tls", "inbox", "--config", self.conf)
        self.assertEqual((code, err), (1, ""))
        self.assertIn("Google LLC saw 1,204 sessions to mx2.example.org fail with "
                      "certificate-expired on ", out)
        self.assertIn("-> renew the certificate on mx2.example.org", out)
        self.assertIn("No failures reported by Microsoft Corporation (5,326 sessions).", out)

    def test_json(self):
        """--json: the documented shape, the malformed file and the other mail named with their reasons."""
        self.fill({"1.a.h": report_mail(as_gzip(google_like(self.day))),
                   "2.b.h": report_mail(b"\x1f\x8b\x08garbage"),
                   "3.c.h": report_mail(as_gzip(google_like(self.old))),
                   "4.d.h": plain_mail(b"Buy now!\n")})
        code, out, err = run_cli("tls", "inbox", "-c", self.conf, "--json")
        self.assertEqual((code, err), (1, ""))
        data = json.loads(out)
        self.assertEqual(data["mailboxes"], [{"name": "tlsrpt@example.org",
                                              "path": self.maildir, "exists": True}])
        self.assertEqual((data["files"], data["reports"], data["older"]), (4, 1, 1))
        self.assertEqual(data["malformed"][0]["file"], os.path.join(self.maildir, "new", "2.b.h"))
        self.assertIn("bad gzip", data["malformed"][0]["reason"])
        self.assertEqual(data["not_reports"], [
            {"file": os.path.join(self.maildir, "new", "4.d.h"),
             "reason": "no TLS report in it (text/plain, Subject: hello)"}])
        self.assertEqual(data["problems"][0]["sessions"], 1204)
        self.assertEqual(data["exit_code"], 1)

    def test_since_all_and_healthy(self):
        """--since all reaches back to the old report; all healthy, a broken report and spam beside: exit 0."""
        self.fill({"1.a.h": as_json(google_like(self.old, failures=0)),
                   "2.a.h": as_json(microsoft_like(self.old, self.old)),
                   "3.a.h": report_mail(b"{", "application/tlsrpt+json", "x.json"),
                   "4.a.h": plain_mail(b"Buy now!\n")})
        code, out, _ = run_cli("tls", "inbox", "-c", self.conf, "--since", "all")
        self.assertEqual(code, 0, out)
        self.assertIn("2 reports from 2 organizations (1 unreadable file; 1 other mail)", out)
        code, out, _ = run_cli("tls", "inbox", "-c", self.conf, "--since", "24h")
        self.assertEqual(code, 0, out)
        self.assertIn("0 reports from 0 organizations (2 older reports left out; "
                      "1 unreadable file; 1 other mail)", out)

    def test_mailbox_path(self):
        """--mailbox PATH reads that Maildir."""
        other = write_maildir(os.path.join(os.path.dirname(self.conf), "other"),
                              {"1": as_json(microsoft_like(self.day, self.day))})
        code, out, _ = run_cli("tls", "inbox", "-c", self.conf, "--mailbox", other, "--json")
        self.assertEqual(code, 0, out)
        self.assertEqual(json.loads(out)["reports"], 1)

    def test_errors(self):
        """A bad --since, configuration or mailbox: one line on stderr, exit 2."""
        cases = [
            (("--since", "soon"), "twisted-mta: --since must be a duration"),
            (("--mailbox", "nobody"), "twisted-mta: no report mailbox: nobody is no local "
                                      "user or alias"),
            (("--mailbox", "/nonexistent/Maildir"),
             "twisted-mta: /nonexistent/Maildir: no such Maildir"),
        ]
        for extra, words in cases:
            code, out, err = run_cli("tls", "inbox", "-c", self.conf, *extra)
            self.assertEqual((code, out), (2, ""), extra)
            self.assertIn(words, err)
            self.assertEqual(len(err.splitlines()), 1, err)
        code, _, err = run_cli("tls", "inbox", "-c", self.conf + ".missing")
        self.assertEqual(code, 2)
        self.assertIn("no such file", err)
