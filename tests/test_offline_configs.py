"""
No test and no benchmark may ask the system's resolver: its queries would
leave the machine.  Every configuration they write must point C{[dns]
nameservers} at loopback (or send all remote mail to a smarthost).  The
shared writers are checked by building what they write; every other file
under tests/ and scripts/ (the benchmark harness, scripts/bench and
scripts/benchlib/) that writes a configuration (it names listeners) must
say how it keeps DNS on loopback.
"""

from __future__ import annotations

import ipaddress
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from tests.support import LOOPBACK_DNS, make_config
from twisted_mta.config import load_config
from twisted_mta.tls.dnssec import split_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WRITES_CONFIG = re.compile(r'\[\[listeners\]\]|"listeners"')
# How a file keeps DNS on loopback: the shared table or text, its own
# nameservers, MTAProcess (which adds LOOPBACK_DNS), or make_config.
KEEPS_DNS_LOCAL = re.compile(r"LOOPBACK_DNS|nameservers|MTAProcess\(|make_config\(")


def on_loopback(servers) -> bool:
    return bool(servers) and all(
        ipaddress.ip_address(split_server(s)[0]).is_loopback for s in servers)


def config_writers() -> list[str]:
    found = []
    for top in ("tests", "scripts"):
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                path = os.path.join(folder, name)
                if not (name.endswith(".py") or top == "scripts"):
                    continue
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    continue
                if WRITES_CONFIG.search(text):
                    found.append(path)
    return found


class OfflineConfigTests(SynchronousTestCase):
    def test_shared_writers_point_dns_at_loopback(self) -> None:
        """make_config and MTAProcess's default write loopback name servers."""
        from tests.interop.support import MTAProcess
        config = make_config(self.mktemp())
        self.assertTrue(on_loopback(config.dns.nameservers), config.dns.nameservers)
        mta = MTAProcess(self.mktemp())
        self.assertTrue(on_loopback(load_config(mta.config_path).dns.nameservers))
        self.assertIn(LOOPBACK_DNS, open(mta.config_path, encoding="utf-8").read())

    def test_every_config_writer_keeps_dns_on_loopback(self) -> None:
        """Each file under tests/ and scripts/ that writes a configuration names how its DNS stays on loopback."""
        writers = config_writers()
        self.assertGreater(len(writers), 5)  # the scan finds them at all
        lacking = []
        for path in writers:
            with open(path, encoding="utf-8") as f:
                if not KEEPS_DNS_LOCAL.search(f.read()):
                    lacking.append(os.path.relpath(path, ROOT))
        self.assertEqual(lacking, [], "these write an MTA configuration without loopback "
                         "DNS; use tests.support.LOOPBACK_DNS or set [dns] nameservers")

    def test_the_scan_would_catch_one(self) -> None:
        """A writer without any DNS setting is caught (the check can fail)."""
        text = 'CONFIG = """[[listeners]]\\nrole = "mx"\\n"""\n'
        self.assertTrue(WRITES_CONFIG.search(text))
        self.assertIsNone(KEEPS_DNS_LOCAL.search(text))
