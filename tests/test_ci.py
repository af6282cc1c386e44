"""
Tests for scripts/trial-summary, which turns trial's report into the closing
line CI reads and decides .ci/run's exit status.
"""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "trial-summary")


class TrialSummaryTests(SynchronousTestCase):
    def summarize(self, report: str, status: int):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(report)
        r = subprocess.run([sys.executable, SCRIPT, path, str(status)],
                           capture_output=True, text=True)
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
