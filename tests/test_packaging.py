"""
Tests that an installed twisted-mta is found by twistd, both from a regular
and from an editable install (the twisted/plugins/ dropin must be on a
sys.path entry, not behind a meta-path finder), that the metadata states
the license and the runtime dependencies, and that the C{trial} script run
in the checkout finds the tests after the editable install that
scripts/install-test-deps makes.
"""

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the console script pip writes for trial does: sys.path[0] is the
# script's directory, not the current one (unlike python -m).
TRIAL_SCRIPT = """\
import sys
from twisted.scripts.trial import run
sys.exit(run())
"""


class PackagingTests(SynchronousTestCase):
    def install(self, editable: bool) -> tuple[str, str]:
        """
        Install a copy of the checkout into a fresh venv, without network
        (no build isolation); return (venv, the copy).

        The venv sees this Python's packages (Twisted, setuptools, pip)
        through a plain path entry, so the .pth files there are not read:
        an editable install of this checkout in this Python stays out of
        the venv, and only the copy can be found.
        """
        base = tempfile.mkdtemp(prefix="twisted-mta-pkg-")
        self.addCleanup(shutil.rmtree, base, True)
        src = os.path.join(base, "src")
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
            ".git", "_trial_temp*", "var", "*.egg-info", "build", "__pycache__", "dropin.cache"))
        venv = os.path.join(base, "venv")
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        purelib = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True).stdout.strip()
        with open(os.path.join(purelib, "zz_base_site_packages.pth"), "w") as f:
            f.write("\n".join(site.getsitepackages()) + "\n")
        cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
               "--no-index", "--disable-pip-version-check"]
        cmd += ["-e", src] if editable else [src]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=base)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        return venv, src

    def run_in(self, venv: str, args: list, cwd: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run([os.path.join(venv, "bin", "python")] + args,
                              capture_output=True, text=True, cwd=cwd, env=env)

    def twistd_lists_mta(self, venv: str) -> str:
        # Run from an unrelated directory so the checkout is not on sys.path by accident.
        return self.run_in(venv, ["-c", "from twisted.scripts.twistd import run; run()",
                                  "--help"], tempfile.gettempdir()).stdout

    def test_regular_install(self):
        """After 'pip install .' twistd lists the mta plugin, and the metadata carries the license file and the runtime dependencies, cryptography among them."""
        venv, _ = self.install(editable=False)
        self.assertIn(" mta ", self.twistd_lists_mta(venv))
        r = self.run_in(venv, ["-c", (
            "import importlib.metadata as m, json; d = m.distribution('twisted-mta');"
            "print(json.dumps({'license_files': d.metadata.get_all('License-File'),"
            "'files': [str(f) for f in d.files], 'requires': d.requires,"
            "'location': str(d.locate_file(''))}))")], tempfile.gettempdir())
        meta = json.loads(r.stdout)
        self.assertTrue(meta["location"].startswith(venv), meta["location"])
        self.assertEqual(meta["license_files"], ["LICENSE"])
        self.assertTrue([f for f in meta["files"] if f.endswith("LICENSE")], meta["files"])
        runtime = {re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-"): req
                   for req in meta["requires"] if "extra ==" not in req}
        self.assertEqual(set(runtime), {
            "twisted", "pyopenssl", "cryptography", "service-identity", "dnspython",
            "zope.interface", "attrs", "prometheus-client", "cattrs", "dkimpy", "pynacl",
            "treq", "idna"})
        self.assertIn("<", runtime["twisted"], "Twisted needs an upper bound (private internals)")
        self.assertIn("trustme>=1.2; extra == \"test\"", meta["requires"])

    def test_editable_install(self):
        """After a plain 'pip install -e .' twistd lists the mta plugin."""
        venv, _ = self.install(editable=True)
        self.assertIn(" mta ", self.twistd_lists_mta(venv))

    def test_trial_script_in_checkout(self):
        """After the editable install, the trial script (not python -m twisted.trial) run in the checkout finds the package and the tests: the install's path entry is the checkout's root."""
        venv, src = self.install(editable=True)
        script = os.path.join(os.path.dirname(src), "bin", "trial")
        os.makedirs(os.path.dirname(script))
        with open(script, "w") as f:
            f.write(TRIAL_SCRIPT)
        r = self.run_in(venv, [script, "--temp-directory",
                               os.path.join(os.path.dirname(src), "_trial_temp"),
                               "tests.test_address"], src)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertIn("PASSED", r.stdout)
