"""
Tests that an installed twisted-mta is found by twistd, both from a regular
and from an editable install (the twisted/plugins/ dropin must be on a
sys.path entry, not behind a meta-path finder).
"""

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PackagingTests(SynchronousTestCase):
    def install(self, editable: bool) -> str:
        """
        Install a copy of the checkout into a fresh venv (reusing this
        Python's packages, no build isolation: no network); return the venv.
        """
        base = tempfile.mkdtemp(prefix="twisted-mta-pkg-")
        self.addCleanup(shutil.rmtree, base, True)
        src = os.path.join(base, "src")
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".git", "_trial_temp*", "var", "*.egg-info", "build", "__pycache__", "dropin.cache"))
        venv = os.path.join(base, "venv")
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv], check=True)
        cmd = [os.path.join(venv, "bin", "python"), "-m", "pip", "install", "-q",
               "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check"]
        cmd += ["-e", src] if editable else [src]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=base)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return venv

    def twistd_lists_mta(self, venv: str) -> str:
        # Run from an unrelated directory so the checkout is not on sys.path by accident.
        r = subprocess.run([os.path.join(venv, "bin", "python"), "-c",
                            "from twisted.scripts.twistd import run; run()", "--help"],
                           capture_output=True, text=True, cwd=tempfile.gettempdir())
        return r.stdout

    def test_regular_install(self):
        """After 'pip install .' twistd lists the mta plugin."""
        venv = self.install(editable=False)
        self.assertIn(" mta ", self.twistd_lists_mta(venv))

    def test_editable_install(self):
        """After a plain 'pip install -e .' twistd lists the mta plugin."""
        venv = self.install(editable=True)
        self.assertIn(" mta ", self.twistd_lists_mta(venv))
