"""
twisted-mta tls report show: the day files read back as plain words or
as the exact report JSON, whether the MTA runs or not.
"""

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tlsrpt import store
from twisted_mta.tlsrpt.counts import Detail, Policy
from tests.test_cli import run_cli
from tests.tlsrpt.schema import validate

DAY = "2026-12-03"
STS = Policy("sts", ("version: STSv1", "mode: testing", "mx: mx2.example.org",
                     "max_age: 86400"), ("mx2.example.org",))
EXPIRED = Detail("certificate-expired", "192.0.2.5", "mx2.example.org", "mx2.example.org",
                 "192.0.2.1", "certificate-expired")


class ShowTests(SynchronousTestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.config = os.path.join(self.base, "mta.toml")
        with open(self.config, "w") as f:
            f.write('[server]\nhostname = "mx.example.net"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525:interface=127.0.0.1"\n'
                    '[dns]\nnameservers = ["127.0.0.1"]\n'
                    '[tlsrpt]\nenabled = true\norganization_name = "Example Net"\n'
                    'contact_info = "mailto:tlsrpt@example.net"\n')
        counts = store.DayCounts(DAY)
        for _ in range(1201):
            counts.add("example.org", Policy("no-policy-found"), None)
        for _ in range(3):
            counts.add("example.org", STS, EXPIRED)
        counts.add("other.example", Policy("no-policy-found"), None)
        store.write_day(os.path.join(self.base, "spool", "tlsrpt"), DAY,
                        json.dumps(counts.to_json()).encode())

    def test_words(self):
        code, out, err = run_cli("tls", "report", "show", "--day", DAY, "-c", self.config)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            "example.org, 2026-12-03: 1,204 sessions, 3 failed: certificate-expired at "
            "mx2.example.org [192.0.2.1] (3) (policy: MTA-STS testing, none published)",
            "other.example, 2026-12-03: 1 session, none failed (policy: none published)"])

    def test_json_one_domain(self):
        code, out, err = run_cli("tls", "report", "show", "Example.ORG", "--day", DAY,
                                 "--json", "-c", self.config)
        self.assertEqual(code, 0, err)
        r = json.loads(out)
        validate(self, r)
        self.assertEqual((r["organization-name"], r["contact-info"], r["report-id"]),
                         ("Example Net", "tlsrpt@example.net",
                          "2026-12-03.example.org@example.net"))
        self.assertEqual([(p["policy"]["policy-type"],
                           p["summary"]["total-successful-session-count"],
                           p["summary"]["total-failure-session-count"])
                          for p in r["policies"]],
                         [("no-policy-found", 1201, 0), ("sts", 0, 3)])

    def test_json_all_and_nothing(self):
        code, out, _ = run_cli("tls", "report", "show", "--day", DAY, "--json", "-c",
                               self.config)
        self.assertEqual([r["policies"][0]["policy"]["policy-domain"] for r in json.loads(out)],
                         ["example.org", "other.example"])
        code, out, _ = run_cli("tls", "report", "show", "--day", "2026-12-01", "-c",
                               self.config)
        self.assertEqual((code, out), (0, "No TLS sessions counted on 2026-12-01.\n"))

    def test_errors_in_one_line(self):
        code, out, err = run_cli("tls", "report", "show", "--day", "yesterday", "-c",
                                 self.config)
        self.assertEqual((code, err), (2, "twisted-mta: --day must be a date like "
                                          "2026-12-03, not 'yesterday'\n"))
        with open(os.path.join(self.base, "spool", "tlsrpt", f"{DAY}.json"), "w") as f:
            f.write("{")
        code, out, err = run_cli("tls", "report", "show", "--day", DAY, "-c", self.config)
        self.assertEqual(code, 1)
        self.assertEqual(len(err.splitlines()), 1)
        self.assertIn("cannot be read: not JSON", err)
