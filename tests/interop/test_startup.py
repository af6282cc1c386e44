"""
Start-up as an operator sees it: C{twistd -n mta --config FILE} refuses a
bad configuration, a bad certificate or a spool owned by another process
with a clear message and a non-zero exit, never a Python traceback.
"""

from __future__ import annotations

import os

from twisted.trial import unittest

from tests.interop.support import (
    MTAProcess, RawSMTP, make_tempdir, read_banner, run_twistd, start_mta,
)


class StartupErrorTests(unittest.TestCase):

    def assertCleanFailure(self, result, *expected: str) -> None:
        """
        twistd exited non-zero, printing exactly one line (no traceback, no
        usage text) that holds every C{expected} string.
        """
        out = result.stdout
        self.assertNotEqual(result.returncode, 0, out)
        self.assertNotIn("Traceback", out, f"a traceback instead of a one-line error:\n{out}")
        lines = out.strip().splitlines()
        self.assertEqual(len(lines), 1, f"not a one-line error:\n{out}")
        for text in expected:
            self.assertIn(text, lines[0])

    def test_unknown_key(self) -> None:
        """A configuration with an unknown key stops start-up with a non-zero exit naming the file and the dotted key, without a traceback."""
        tmp = make_tempdir(self, "startup")
        mta = MTAProcess(tmp, '[limits]\nrecipients = 10\nfrobnicate = true\n')
        result = run_twistd(mta.config_path, tmp)
        self.assertCleanFailure(result, mta.config_path, "limits.frobnicate", "unknown key")
        self.assertFalse(os.path.exists(mta.spool), "the spool was created anyway")

    def test_missing_config_file(self) -> None:
        """A missing configuration file stops start-up with a non-zero exit naming the file, without a traceback."""
        tmp = make_tempdir(self, "startup")
        path = os.path.join(tmp, "no-such-dir", "mta.toml")
        result = run_twistd(path, tmp)
        self.assertCleanFailure(result, path, "no such file")

    def test_unreadable_certificate(self) -> None:
        """A [tls] certificate file that holds no certificate stops start-up with a non-zero exit naming the file, without a traceback."""
        tmp = make_tempdir(self, "startup")
        for name in ("cert.pem", "key.pem"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("this is not PEM\n")
        mta = MTAProcess(tmp, '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n')
        result = run_twistd(mta.config_path, tmp)
        self.assertCleanFailure(result, os.path.join(tmp, "cert.pem"))


class SpoolLockTests(unittest.TestCase):

    def test_second_process_on_same_spool_refused(self) -> None:
        """A second MTA on a spool already in use exits non-zero with one line naming the spool and 'in use' (no traceback), and the first keeps serving."""
        first = start_mta(self)
        # A separate config file and port, the same spool directory.
        second = MTAProcess(first.tmpdir, spool=first.spool, config_name="second.toml")
        self.addCleanup(second.cleanup)
        result = run_twistd(second.config_path, first.tmpdir)
        out = result.stdout
        self.assertNotEqual(result.returncode, 0, out)
        self.assertNotIn("Traceback", out, f"a traceback instead of a one-line error:\n{out}")
        lines = [line for line in out.splitlines() if "in use" in line]
        self.assertEqual(len(lines), 1, out)
        self.assertIn(first.spool, lines[0])
        self.assertIn(str(first.pid), lines[0])
        self.assertIsNone(read_banner(second.port), "the second MTA opened its listener")

        self.assertTrue(first.running, first.describe())
        client = RawSMTP(first.port)
        try:
            client.expect(220)
            client.command("EHLO client.example.test", 250)
            client.command("QUIT", 221)
        finally:
            client.close()

    def test_lock_released_by_clean_stop(self) -> None:
        """After the first MTA stops cleanly, a second process can take the same spool."""
        first = start_mta(self)
        first.stop()
        second = MTAProcess(first.tmpdir, spool=first.spool, config_name="second.toml")
        self.addCleanup(second.cleanup)
        second.start()
        self.assertTrue(second.running, second.describe())
