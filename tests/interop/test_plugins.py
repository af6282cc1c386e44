"""
TLS plugins: the shipped example (examples/plugins/twisted/plugins/
mta_bank_policy.py), installed only as a dropin directory on PYTHONPATH, is
found by the configuration check and by `twistd mta`, with no change to
the project's code; and what it decides.
"""

from __future__ import annotations

import os
import subprocess
import sys

import twisted.plugins
from twisted.plugin import getPlugins
from twisted.trial import unittest

from tests.interop.support import TWISTD, free_port, read_banner, subprocess_env, wait_for
from twisted_mta.interfaces import IFallbackDecider, ITLSPolicy
from twisted_mta.outbound import fallback as fb
from twisted_mta.outbound.tlsfailure import TLSFailure
from twisted_mta.outbound.tlspolicy import Destination

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DROPINS = os.path.join(ROOT, "examples", "plugins")

CONFIG = """\
[server]
hostname = "mx.plugin.test"
spool = "spool"
[[listeners]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"
[outbound.tls]
policy = "banks"
fallback = "no-cleartext-list"
[outbound.tls.domains."other.test"]
policy = "strict"
fallback = "no-cleartext-list"
"""


class PluginTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.port = free_port()
        self.config = os.path.join(self.dir, "mta.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(port=self.port))
        self.listfile = os.path.join(self.dir, "no-cleartext")
        with open(self.listfile, "w") as f:
            f.write("# never in cleartext\nsecret.test\n")

    def env(self, with_dropins: bool) -> dict:
        env = subprocess_env()
        if with_dropins:
            env["PYTHONPATH"] = DROPINS + os.pathsep + env.get("PYTHONPATH", "")
        env["MTA_NO_CLEARTEXT_FILE"] = self.listfile
        return env

    def check(self, with_dropins: bool) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "twisted_mta.cli", "config", "check",
                               self.config], env=self.env(with_dropins), capture_output=True,
                              text=True, timeout=60, cwd=self.dir)

    def test_config_check_finds_the_dropin(self):
        """Without the dropin the names are unknown; with it on PYTHONPATH the configuration is valid."""
        without = self.check(False)
        self.assertNotEqual(without.returncode, 0)
        self.assertIn("unknown TLS policy 'banks'", without.stderr + without.stdout)
        ok = self.check(True)
        self.assertEqual(ok.returncode, 0, ok.stderr + ok.stdout)

    def test_twistd_mta_runs_with_the_dropin(self):
        """twistd mta starts with the plugin policy as its default and answers on its port."""
        log = open(os.path.join(self.dir, "twistd.log"), "wb")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "mta", "--config", self.config],
            env=self.env(True), cwd=self.dir, stdout=log,
            stderr=subprocess.STDOUT)

        def stop():
            proc.terminate()
            proc.wait(10)
        self.addCleanup(stop)

        def up():
            if proc.poll() is not None:
                raise AssertionError(open(os.path.join(self.dir, "twistd.log")).read())
            banner = read_banner(self.port, timeout=1.0)
            return bool(banner and banner.startswith(b"220 mx.plugin.test"))
        wait_for(up, 20, lambda: open(os.path.join(self.dir, "twistd.log")).read())

    def test_decisions(self):
        """The example: strict for banks, opportunistic elsewhere, never cleartext to listed domains."""
        saved = list(twisted.plugins.__path__)
        self.addCleanup(setattr, twisted.plugins, "__path__", saved)
        twisted.plugins.__path__.append(os.path.join(DROPINS, "twisted", "plugins"))
        os.environ["MTA_NO_CLEARTEXT_FILE"] = self.listfile
        self.addCleanup(os.environ.pop, "MTA_NO_CLEARTEXT_FILE")
        sys.modules.pop("twisted.plugins.mta_bank_policy", None)
        [policy] = [p for p in getPlugins(ITLSPolicy, twisted.plugins) if p.name == "banks"]
        [decider] = [d for d in getPlugins(IFallbackDecider, twisted.plugins)
                     if d.name == "no-cleartext-list"]
        self.assertEqual(policy.requirements(Destination("mail.bank.test", "mx")).policy,
                         "strict")
        self.assertEqual(policy.requirements(Destination("example.org", "mx")).policy,
                         "opportunistic")
        failure = TLSFailure("handshake-failed", host="mx", address="192.0.2.1", port=25)
        req = policy.requirements(Destination("secret.test", "mx"))
        listed = fb.decide(decider, failure, fb.Situation(Destination("secret.test", "mx"),
                                                          req))
        other = fb.decide(decider, failure, fb.Situation(Destination("other.test", "mx"),
                                                         req))
        self.assertEqual((listed.action, other.action), (fb.DEFER, fb.CLEARTEXT))
        self.assertIn("listed in", listed.reason)
