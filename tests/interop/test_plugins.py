"""
TLS plugins: the shipped example (examples/plugins/twisted/plugins/
mta_bank_policy.py), installed only as a dropin directory on PYTHONPATH, is
found by the configuration check and by `twistd mta`, with no change to
the project's code; and what it decides.  A broken dropin is refused by
both in one line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import twisted.plugins
from twisted.plugin import getPlugins
from twisted.trial import unittest

from tests.interop.support import TWISTD, free_port, read_banner, subprocess_env, wait_for
from twisted_mta.interfaces import IFallbackDecider, ITLSPolicy
from twisted_mta.tls import fallback as fb
from twisted_mta.tls.failure import TLSFailure
from twisted_mta.tls.policy import Destination

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DROPINS = os.path.join(ROOT, "examples", "plugins")

CONFIG = """\
[server]
hostname = "mx.plugin.test"
spool = "spool"
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"
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


MINIMAL = """\
[server]
hostname = "mx.plugin.test"
spool = "spool"
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"
[[listeners]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"
"""

NAMELESS = """\
from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import IFallbackDecider


@implementer(IFallbackDecider, IPlugin)
class Decider:
    def decide(self, failure, situation):
        raise NotImplementedError


decider = Decider()
"""

# What Twisted's plugin scan prints for a dropin that fails to import, before
# logging has begun: twistd's own scan for service makers does this before
# any of our code runs.
TWISTED_SCAN_REPORT = re.compile(
    r"Unhandled Error\nTraceback \(most recent call last\):\n(?:  .*\n)+\S.*\n\n?")


class BrokenDropinTests(unittest.TestCase):
    """
    A dropin in a twisted/plugins directory on PYTHONPATH (a namespace
    directory, no __init__.py, like examples/plugins) that has no name or
    raises while loading: `twisted-mta config check` and `twistd mta`
    exit 1 with one line naming its file, also without [outbound.tls].
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.plugins = os.path.join(self.dir, "dropins", "twisted", "plugins")
        os.makedirs(self.plugins)
        self.config = os.path.join(self.dir, "mta.toml")
        with open(self.config, "w") as f:
            f.write(MINIMAL.format(port=free_port()))

    def dropin(self, source: str) -> str:
        path = os.path.join(self.plugins, "mta_broken.py")
        with open(path, "w") as f:
            f.write(source)
        return path

    def run_tool(self, argv: list[str]) -> subprocess.CompletedProcess:
        env = subprocess_env()
        env["PYTHONPATH"] = os.path.join(self.dir, "dropins") + os.pathsep + env["PYTHONPATH"]
        return subprocess.run(argv, env=env, cwd=self.dir, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=60)

    def check(self) -> subprocess.CompletedProcess:
        return self.run_tool([sys.executable, "-m", "twisted_mta.cli", "config", "check",
                              self.config])

    def twistd(self) -> subprocess.CompletedProcess:
        return self.run_tool(TWISTD + ["-n", "--pidfile=", "mta", "--config", self.config])

    def assertOneLine(self, result: subprocess.CompletedProcess, line: str) -> None:
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertNotIn("Traceback", result.stdout)
        self.assertEqual(result.stdout, line + "\n")
        self.assertFalse(os.path.exists(os.path.join(self.dir, "spool")))

    def test_nameless_plugin(self):
        """A decider without a name: one line from config check and from twistd mta, though the configuration names no TLS policy at all."""
        path = self.dropin(NAMELESS)
        problem = f"TLS plugin 'decider' in {path} has no name"
        self.assertOneLine(self.check(), f"twisted-mta: {problem}")
        self.assertOneLine(self.twistd(), f"twistd: {problem}")

    def test_nameless_plugin_with_tls_table(self):
        """With an [outbound.tls] table, the configuration's own name check reports it, still in one line."""
        path = self.dropin(NAMELESS)
        with open(self.config, "a") as f:
            f.write('[outbound.tls]\npolicy = "strict"\n')
        self.assertOneLine(self.check(), f"twisted-mta: {self.config}: outbound.tls.plugins: "
                                         f"TLS plugin 'decider' in {path} has no name")

    def test_dropin_raises_while_importing(self):
        """A dropin that raises at import: config check prints one line; twistd mta prints that line after the report of Twisted's own plugin scan (twistd's, before our code runs), and no traceback of ours."""
        path = self.dropin("import os\n\nraise RuntimeError('not today')\n")
        problem = f"plugin dropin {path} (line 3) failed to load: RuntimeError: not today"
        self.assertOneLine(self.check(), f"twisted-mta: {problem}")
        result = self.twistd()
        reports = TWISTED_SCAN_REPORT.findall(result.stdout)
        self.assertEqual(len(reports), 1, result.stdout)
        self.assertIn("in getCache", reports[0])
        self.assertIn(path, reports[0])
        rest = subprocess.CompletedProcess(result.args, result.returncode,
                                           TWISTED_SCAN_REPORT.sub("", result.stdout))
        self.assertOneLine(rest, f"twistd: {problem}")
