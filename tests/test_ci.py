"""
Tests for scripts/trial-summary, which turns trial's report into the closing
line CI reads and decides .ci/run's exit status, and for the rule that under
CI (CI=true) a missing interop dependency fails the run instead of skipping.
"""

import os
import subprocess
import sys

from twisted.trial.unittest import FailTest, SkipTest, SynchronousTestCase

from tests.interop import dns, requires, support

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "trial-summary")


class TrialSummaryTests(SynchronousTestCase):
    def summarize(self, report: str, status: int, ci: bool = False):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(report)
        env = {k: v for k, v in os.environ.items() if k != "CI"}
        if ci:
            env["CI"] = "true"
        r = subprocess.run([sys.executable, SCRIPT, path, str(status)],
                           capture_output=True, text=True, env=env)
        return r.returncode, r.stdout.strip()

    def test_passed(self):
        """A passing run prints 'N passed, 0 failed' and exits 0."""
        self.assertEqual(self.summarize("Ran 7 tests in 1s\n\nPASSED (skips=1, successes=6)\n", 0),
                         (0, "6 passed, 0 failed, 1 skipped"))

    def test_failed(self):
        """Failures and errors are counted as failed and the exit status is 1."""
        report = "Ran 9 tests\n\nFAILED (failures=2, errors=1, successes=6)\n"
        self.assertEqual(self.summarize(report, 1), (1, "6 passed, 3 failed"))

    def test_no_tests(self):
        """A run that executed no test fails."""
        code, line = self.summarize("-----\n\nPASSED\n", 0)
        self.assertEqual(code, 1)
        self.assertEqual(line, "0 passed, 1 failed")

    def test_crash_without_report(self):
        """trial dying without its closing line fails."""
        self.assertEqual(self.summarize("Traceback ...\n", 1)[0], 1)

    SKIPS = (
        "tests.interop.test_dns\n  DNSTests\n    test_mx ...   [SKIPPED]\n"
        + "=" * 79 + "\n[SKIPPED]\nnsd is not installed (run scripts/install-test-deps)\n\n"
        "tests.interop.test_dns.DNSTests.test_mx\n"
        "tests.interop.test_dns.DNSTests.test_null_mx\n"
        + "=" * 79 + "\n[SKIPPED]\nneeds root to change ownership\n\n"
        "tests.queue.test_spool.SpoolTests.test_owner\n"
        + "-" * 79 + "\nRan 10 tests in 1s\n\nPASSED (skips=3, successes=7)\n")

    def test_interop_skips_fail_under_ci(self):
        """Under CI a skipped interop test counts as failed (exit 1); other skips stay skips."""
        self.assertEqual(self.summarize(self.SKIPS, 0, ci=True), (1, "7 passed, 2 failed, 1 skipped"))

    def test_interop_skips_outside_ci(self):
        """Outside CI skips are skips, never passes, and the run passes."""
        self.assertEqual(self.summarize(self.SKIPS, 0), (0, "7 passed, 0 failed, 3 skipped"))


class MissingDependencyTests(SynchronousTestCase):
    """
    tests.interop.requires: a missing Postfix or nsd skips an interop test,
    except under CI (CI=true), where it fails it.
    """

    def set_ci(self, value):
        old = os.environ.get("CI")

        def restore():
            if old is None:
                os.environ.pop("CI", None)
            else:
                os.environ["CI"] = old
        self.addCleanup(restore)
        if value is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = value

    def test_under_ci(self):
        """CI=true (or 1, yes) means CI; unset, empty or false does not."""
        for value, expected in (("true", True), ("TRUE", True), ("1", True), ("yes", True),
                                (None, False), ("", False), ("false", False), ("0", False)):
            self.set_ci(value)
            self.assertEqual(requires.under_ci(), expected, value)

    def test_missing(self):
        """missing() skips outside CI and fails under CI, with the reason."""
        self.set_ci(None)
        self.assertRaises(SkipTest, requires.missing, "nsd is not installed")
        self.set_ci("true")
        e = self.assertRaises(FailTest, requires.missing, "nsd is not installed")
        self.assertIn("nsd is not installed", str(e))
        self.assertIn("CI=true", str(e))

    def test_postfix_unavailable(self):
        """No Postfix: a reason to skip outside CI, a failure under CI."""
        self.patch(support, "POSTFIX", None)
        self.set_ci(None)
        self.assertEqual(support.postfix_unavailable(),
                         "postfix is not installed (run scripts/install-test-deps)")
        self.set_ci("true")
        self.assertRaises(FailTest, support.postfix_unavailable)

    def test_postfix_needs_root(self):
        """Postfix present but not root: the same rule."""
        self.patch(support, "POSTFIX", "/usr/sbin/postfix")
        self.patch(os, "geteuid", lambda: 1000)
        self.set_ci(None)
        self.assertEqual(support.postfix_unavailable(), "a private Postfix instance needs root")
        self.set_ci("true")
        self.assertRaises(FailTest, support.postfix_unavailable)

    def test_postfix_available(self):
        """Postfix present and root: no reason, under CI or not."""
        self.patch(support, "POSTFIX", "/usr/sbin/postfix")
        self.patch(os, "geteuid", lambda: 0)
        for value in (None, "true"):
            self.set_ci(value)
            self.assertIsNone(support.postfix_unavailable())

    def test_require_nsd(self):
        """No nsd: SkipTest outside CI, FailTest under CI; present: its path."""
        self.patch(dns, "NSD", None)
        self.set_ci(None)
        self.assertRaises(SkipTest, dns.require_nsd)
        self.set_ci("true")
        self.assertRaises(FailTest, dns.require_nsd)
        self.patch(dns, "NSD", "/usr/sbin/nsd")
        self.assertEqual(dns.require_nsd(), "/usr/sbin/nsd")
