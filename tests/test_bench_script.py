"""
scripts/bench (issue 13): no configuration it writes can send a DNS query
off the machine, and its smallest cell runs to the end with every message
counted in the Maildirs.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from types import ModuleType

from twisted.trial import unittest

from tests.interop.support import postfix_unavailable
from twisted_mta.config import load_config

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "bench")


def load_bench() -> ModuleType:
    """scripts/bench as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("bench_script", SCRIPT)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def tempdir(testcase: unittest.TestCase) -> str:
    path = tempfile.mkdtemp(prefix="twisted-mta-bench-script-")
    os.chmod(path, 0o755)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


class ConfigTests(unittest.SynchronousTestCase):
    def test_mta_dns_on_loopback(self) -> None:
        """Every twisted-mta variant asks only a loopback nameserver, and the config loads."""
        bench = load_bench()
        for name, workers in bench.SERVERS.items():
            if name == "postfix":
                continue
            mta = bench.make_mta(os.path.join(tempdir(self), name), workers)
            with open(mta.config_path, "rb") as f:
                raw = tomllib.load(f)
            servers = raw["dns"]["nameservers"]
            self.assertTrue(servers)
            for server in servers:
                host = server.rpartition(":")[0]
                self.assertTrue(ipaddress.ip_address(host).is_loopback, server)
            self.assertEqual(raw["server"].get("workers"), workers)
            self.assertGreaterEqual(raw["limits"]["connections_per_ip"], 100)
            self.assertEqual(load_config(mta.config_path).workers, workers)

    def test_postfix_looks_nothing_up(self) -> None:
        """Postfix has DNS off, no relay host, and only an error transport off the box."""
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        bench = load_bench()
        postfix = bench.make_postfix(tempdir(self))
        main = postfix.params
        self.assertEqual(main["smtp_dns_support_level"], "disabled")
        self.assertEqual(main["disable_dns_lookups"], "yes")
        self.assertEqual(main["smtpd_peername_lookup"], "no")
        self.assertEqual(main["relayhost"], "")
        self.assertTrue(main["default_transport"].startswith("error:"))
        self.assertTrue(main["relay_transport"].startswith("error:"))
        self.assertEqual(main["virtual_mailbox_domains"], "example.test")


class SmallestCellTests(unittest.TestCase):
    timeout = 120

    def test_one_session(self) -> None:
        """One round of 20 one-KiB messages, one session: every server delivers all."""
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        out = tempdir(self)
        result = subprocess.run(
            [sys.executable, SCRIPT, "local", "--sessions", "1", "--sizes", "1024",
             "--messages", "20", "--repeats", "1", "--quiet-wait", "0", "--workdir", out,
             "--json", os.path.join(out, "result.json")],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=110)
        self.assertEqual(result.returncode, 0, result.stderr[-4000:])
        with open(os.path.join(out, "result.json")) as f:
            report = json.load(f)
        bench = load_bench()
        self.assertEqual(sorted(r["server"] for r in report["runs"]), sorted(bench.SERVERS))
        for run in report["runs"]:
            self.assertEqual(run["messages"], 20)
            self.assertGreater(run["msg_per_s"], 0)
            self.assertGreater(run["peak_rss"], 0)
        self.assertIn("| 1 x 1 KiB | workers=auto |", result.stdout)
        self.assertEqual(sorted(os.listdir(out)), ["result.json"])  # nothing left behind
