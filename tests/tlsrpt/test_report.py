"""
The TLS-RPT report (twisted_mta.tlsrpt.report), from tables: the JSON of
RFC 8460 4.4, the gzip bytes, the file name of 5.1, the plain words.
"""

import gzip
import json

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tlsrpt import report
from twisted_mta.tlsrpt.counts import Detail, Policy, PolicyCounts
from tests.tlsrpt.schema import problems, validate

STS = Policy("sts", ("version: STSv1", "mode: testing", "mx: mx1.example.org",
                     "mx: *.mx.example.org", "max_age: 86400"),
             ("mx1.example.org", "*.mx.example.org"))
TLSA = Policy("tlsa", ("3 1 1 " + "ab" * 32,), ("mx2.example.org",))
NONE = Policy("no-policy-found")
EXPIRED = Detail("certificate-expired", "192.0.2.10", "mx2.example.org", "mx2.example.org",
                 "198.51.100.2", "certificate-expired")
NO_TLS = Detail("starttls-not-supported", None, "mx1.example.org", None, "198.51.100.1",
                "starttls-not-offered")


def counts(policy, successes=0, details=()):
    d = dict(details)
    return PolicyCounts(policy, successes, sum(d.values()), d)


class BuildTests(SynchronousTestCase):
    def build(self, *c, domain="example.org"):
        return report.build("2026-12-03", domain, c, "Example Org",
                            "mailto:tlsrpt@example.net", "2026-12-03.example.org@example.net")

    def test_top_level(self):
        """The report's metadata: organization, the full UTC day, the contact's address."""
        r = self.build(counts(NONE, 5))
        self.assertEqual(list(r), ["organization-name", "date-range", "contact-info",
                                   "report-id", "policies"])
        self.assertEqual(r["organization-name"], "Example Org")
        self.assertEqual(r["date-range"], {"start-datetime": "2026-12-03T00:00:00Z",
                                           "end-datetime": "2026-12-03T23:59:59Z"})
        self.assertEqual(r["contact-info"], "tlsrpt@example.net")
        self.assertEqual(r["report-id"], "2026-12-03.example.org@example.net")
        validate(self, r)

    TABLE = [
        # (counts, the policies entries expected)
        ([counts(NONE, 5)],
         [{"policy": {"policy-type": "no-policy-found", "policy-domain": "example.org"},
           "summary": {"total-successful-session-count": 5,
                       "total-failure-session-count": 0}}]),
        ([counts(TLSA, 2, [(EXPIRED, 3)])],
         [{"policy": {"policy-type": "tlsa", "policy-string": ["3 1 1 " + "ab" * 32],
                      "policy-domain": "example.org", "mx-host": ["mx2.example.org"]},
           "summary": {"total-successful-session-count": 2,
                       "total-failure-session-count": 3},
           "failure-details": [{"result-type": "certificate-expired",
                                "sending-mta-ip": "192.0.2.10",
                                "receiving-mx-hostname": "mx2.example.org",
                                "receiving-mx-helo": "mx2.example.org",
                                "receiving-ip": "198.51.100.2",
                                "failed-session-count": 3,
                                "failure-reason-code": "certificate-expired"}]}]),
        # Several policies: always a list, in a fixed order (no-policy-found,
        # sts, tlsa); failure details most frequent first; unknown fields
        # (sending address, helo) left out.
        ([counts(TLSA, 1), counts(STS, 7, [(EXPIRED, 1), (NO_TLS, 4)]), counts(NONE, 1)],
         [{"policy": {"policy-type": "no-policy-found", "policy-domain": "example.org"},
           "summary": {"total-successful-session-count": 1,
                       "total-failure-session-count": 0}},
          {"policy": {"policy-type": "sts", "policy-string": list(STS.strings),
                      "policy-domain": "example.org",
                      "mx-host": ["mx1.example.org", "*.mx.example.org"]},
           "summary": {"total-successful-session-count": 7,
                       "total-failure-session-count": 5},
           "failure-details": [
               {"result-type": "starttls-not-supported",
                "receiving-mx-hostname": "mx1.example.org", "receiving-ip": "198.51.100.1",
                "failed-session-count": 4, "failure-reason-code": "starttls-not-offered"},
               EXPIRED.to_json(1)]},
          {"policy": {"policy-type": "tlsa", "policy-string": ["3 1 1 " + "ab" * 32],
                      "policy-domain": "example.org", "mx-host": ["mx2.example.org"]},
           "summary": {"total-successful-session-count": 1,
                       "total-failure-session-count": 0}}]),
    ]

    def test_policies(self):
        for c, expected in self.TABLE:
            r = self.build(*c)
            self.assertEqual(r["policies"], expected)
            validate(self, r)
            # the key order of the RFC's schema
            for entry in r["policies"]:
                keys = list(entry["policy"])
                order = ["policy-type", "policy-string", "policy-domain", "mx-host"]
                self.assertEqual(keys, [k for k in order if k in keys])

    def test_a_labels(self):
        """An internationalized policy domain and mx pattern are written in A-labels."""
        policy = Policy("sts", ("version: STSv1",), ("*.mx.bücher.example",))
        r = self.build(counts(policy, 1), domain="Bücher.example.")
        self.assertEqual(r["policies"][0]["policy"]["policy-domain"], "xn--bcher-kva.example")
        self.assertEqual(r["policies"][0]["policy"]["mx-host"], ["*.mx.xn--bcher-kva.example"])
        validate(self, r)

    def test_checks_catch_mistakes(self):
        """The checks the tests rely on do fail on broken reports."""
        import jsonschema
        good = self.build(counts(TLSA, 2, [(EXPIRED, 3)]))
        broken = [
            ("policies", {"policy": {}}),  # not a list
            ("policies", []),
            ("contact-info", "nobody"),
            ("date-range", {"start-datetime": "2026-12-03"}),
        ]
        for key, value in broken:
            bad = json.loads(json.dumps(good))
            bad[key] = value
            with self.assertRaises(jsonschema.ValidationError, msg=key):
                validate(self, bad)
        bad = json.loads(json.dumps(good))
        bad["policies"][0]["summary"]["total-failure-session-count"] = 2
        self.assertEqual(len(problems(bad)), 1)
        bad = json.loads(json.dumps(good))
        bad["policies"][0]["failure-details"][0]["receiving-ip"] = "mx2"
        self.assertEqual(len(problems(bad)), 1)


class BytesTests(SynchronousTestCase):
    def test_gzip_round_trip_and_deterministic(self):
        r = report.build("2026-12-03", "example.org", [counts(NONE, 1)], "O", "a@b.example",
                         "id-1")
        data = report.to_gzip(r)
        self.assertEqual(data, report.to_gzip(r))
        self.assertEqual(data[4:8], b"\0\0\0\0")  # mtime 0
        self.assertEqual(json.loads(gzip.decompress(data)), r)

    FILENAMES = [
        (("mail.sndr.example.com", "example.net", 1470013207, 1470186007, "001"),
         "mail.sndr.example.com!example.net!1470013207!1470186007!001.json.gz"),
        (("Example.COM", "bücher.example", 0, 86399, None),
         "example.com!xn--bcher-kva.example!0!86399.json.gz"),
    ]

    def test_filename(self):
        for args, expected in self.FILENAMES:
            self.assertEqual(report.filename(*args), expected)
        for bad in (("a", "b", 0, 1, "x-y"), ("a", "b", -1, 1, None), ("a", "b", 0, 1.5, None)):
            self.assertRaises(ValueError, report.filename, *bad)

    def test_day_bounds(self):
        self.assertEqual(report.day_bounds("1970-01-02"), (86400, 172799))
        self.assertEqual(report.day_bounds("2026-12-03"), (1796256000, 1796342399))


class DescribeTests(SynchronousTestCase):
    TABLE = [
        ([counts(NONE, 1201), counts(STS, 0, [(EXPIRED, 3)])],
         "example.org, 2026-12-03: 1,204 sessions, 3 failed: certificate-expired at "
         "mx2.example.org [198.51.100.2] (3) (policy: MTA-STS testing, none published)"),
        ([counts(TLSA, 1)],
         "example.org, 2026-12-03: 1 session, none failed (policy: DANE for mx2.example.org)"),
    ]

    def test_words(self):
        for c, expected in self.TABLE:
            self.assertEqual(report.describe("2026-12-03", "example.org", c), expected)
