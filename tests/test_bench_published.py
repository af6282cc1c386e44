"""
scripts/bench published (the DANE and MTA-STS look-up cost benchmark): every
configuration it writes points DNS at its private resolver on loopback,
and its smoke run (C{--quick}, ~15 s) completes with every message at the
sink under the expected policy source.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import unittest as pyunit

from twisted.trial import unittest

from tests.interop.dnssec import LDNS_SIGNZONE, UNBOUND
from tests.interop.dns import NSD

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")


def load_bench():
    """scripts/benchlib/published.py (scripts/ is not on the path)."""
    if SCRIPTS not in sys.path:
        sys.path.insert(0, SCRIPTS)
    from benchlib import published
    return published


class ConfigTests(unittest.SynchronousTestCase):
    def test_dns_stays_on_loopback(self) -> None:
        """Both variants ask only the given loopback resolver: nothing can leave the machine."""
        published = load_bench()
        for variant in published.VARIANTS:
            config = tomllib.loads(published.mta_config(variant, "127.0.0.1:5353", 2525, 8443))
            (server,) = config["dns"]["nameservers"]
            host, _, port = server.rpartition(":")
            self.assertTrue(ipaddress.ip_address(host).is_loopback, server)
            self.assertEqual(port, "5353")
            self.assertTrue(config["dns"]["dnssec_secure_name"].endswith(".pub.test"))
            self.assertEqual(config["outbound"]["port"], 2525)
            on = variant == "with"
            tls = config["outbound"]["tls"]
            self.assertEqual((tls["dane"], tls["mta_sts"]), (on, on))

    def test_records(self) -> None:
        """Every domain publishes TLSA 3 1 1 under the delivery port and an _mta-sts TXT record."""
        published = load_bench()
        recs = published.records(3, 2525, "ab" * 32)
        self.assertIn(("_2525._tcp.mx001", "TLSA", "3 1 1 " + "ab" * 32), recs)
        self.assertIn(("d002", "MX", "10 mx002.pub.test."), recs)
        self.assertEqual(sum(r[1] == "TXT" for r in recs), 3)
        self.assertTrue(all(ipaddress.ip_address(r[2]).is_loopback
                            for r in recs if r[1] == "A"))


class QuickRunTests(unittest.TestCase):
    timeout = 180

    def test_quick(self) -> None:
        """The smoke run: both variants deliver everything (the script checks the log)."""
        missing = [name for name, path in (("nsd", NSD), ("unbound", UNBOUND),
                                           ("ldns-signzone", LDNS_SIGNZONE),
                                           ("cc", shutil.which("cc")))
                   if not path]
        if missing or not os.path.exists("/usr/include/openssl/ssl.h"):
            raise pyunit.SkipTest(f"scripts/bench published needs {missing or 'libssl-dev'}")
        out = tempfile.mkdtemp(prefix="twisted-mta-bench-published-")
        self.addCleanup(shutil.rmtree, out, True)
        result = subprocess.run(
            [sys.executable, os.path.join(SCRIPTS, "bench"), "published", "--quick", "--workdir", out,
             "--json", os.path.join(out, "result.json")],
            capture_output=True, text=True, timeout=150, stdin=subprocess.DEVNULL)
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        with open(os.path.join(out, "result.json")) as f:
            runs = json.load(f)["runs"]
        self.assertEqual(sorted(r["variant"] for r in runs), ["with", "without"])
        for r in runs:
            self.assertEqual(r["messages"], 50)
            self.assertEqual(r["verified_sessions"], r["sessions"])
            self.assertEqual(r["dane_sessions"], r["sessions"] if r["variant"] == "with" else 0)
        self.assertIn("ratio with/without", result.stdout)
