"""
The kill loop, small enough for CI (issue 11): 20 SIGKILLs at random
instants while SMTP sessions on loopback send to local users and to a remote
smarthost; at the end every message acknowledged with 250 is delivered,
each local copy exactly once, each remote one at least once.
C{scripts/soak} runs the long version (L{tests.interop.killloop}).
"""

from __future__ import annotations

import os
import random
import time

from twisted.trial import unittest

from tests.interop.killloop import Load, Sink, closed_port, config, kill_loop
from tests.interop.support import start_mta


class KillLoopTests(unittest.TestCase):

    KILLS = 20
    CLIENTS = 4

    def test_twenty_kills_under_load(self) -> None:
        """20 SIGKILLs at random instants under a 4-session load: every acknowledged message delivered, local copies exactly once, remote ones at least once, the spool empty; the whole test takes well under a minute."""
        seed = int(os.environ.get("TWISTED_MTA_KILL_SEED", time.time_ns() % 1_000_000))
        rng = random.Random(seed)
        sink = Sink()
        self.addCleanup(sink.stop)
        mta = start_mta(self, extra_config=config(sink.port, closed_port()))
        load = Load(mta.port, self.CLIENTS, seed).start()
        self.addCleanup(load.stop)
        report = kill_loop(mta, load, sink, self.KILLS, rng, run_for=(0.05, 0.8),
                           drain_timeout=30)
        text = f"seed {seed} (TWISTED_MTA_KILL_SEED)\n{report.text()}"
        self.assertTrue(report.ok, f"{text}\n{mta.describe()}")
        self.assertEqual(report.kills, self.KILLS)
        self.assertGreater(report.acked, 100, text)
        self.assertGreater(report.remote_expected, 0, text)
