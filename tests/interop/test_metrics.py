"""
The Prometheus endpoint: scraped over HTTP from a running service tree
(loopback, the real reactor) and parsed with prometheus_client's parser;
the counters move as messages flow.
"""

from __future__ import annotations

import os
import smtplib
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, threads
from twisted.trial import unittest

from twisted_mta.config import parse_config
from tests.support import LOOPBACK_DNS_TABLE
from twisted_mta.tap import make_service
from tests.interop.support import free_port


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class MetricsTests(unittest.TestCase):
    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.smtp_port, self.metrics_port = free_port(), free_port()
        config = parse_config({
            # one process: this test reads the service in-process (the
            # workers' counts are checked in test_workers)
            "server": {"hostname": "mx.metrics.test", "spool": "spool", "workers": 0},
            "listeners": [{"role": "mx",
                           "endpoint": f"tcp:{self.smtp_port}:interface=127.0.0.1"}],
            "local": {"domains": ["example.test"], "users": ["alice", "postmaster"],
                      "mailbox": "mail/{user}/Maildir"},
            "metrics": {"endpoint": f"tcp:{self.metrics_port}:interface=127.0.0.1"},
            "dns": LOOPBACK_DNS_TABLE,
        }, os.path.join(self.base, "mta.toml"))
        self.service = make_service(config, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def scrape(self):
        def get():
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/",
                                        timeout=10) as r:
                return r.read().decode()
        return threads.deferToThread(get).addCallback(samples)

    def send(self, rcpts):
        def go():
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as s:
                s.sendmail("bob@remote.test", rcpts, b"Subject: m\r\n\r\nhi\r\n")
        return threads.deferToThread(go)

    async def test_counters_move(self):
        before = await self.scrape()
        received = ("twisted_mta_messages_received_total", (("listener", "mx"),))
        delivered = ("twisted_mta_recipient_deliveries_total",
                     (("result", "delivered"), ("route", "local")))
        self.assertEqual(before.get(received, 0), 0)
        await self.send(["alice@example.test"])
        for _ in range(100):
            after = await self.scrape()
            if after.get(delivered, 0) >= 1:
                break
            await threads.deferToThread(lambda: __import__("time").sleep(0.05))
        self.assertEqual(after[received], 1)
        self.assertEqual(after[delivered], 1)
        latency = ("twisted_mta_delivery_latency_seconds_count", (("route", "local"),))
        self.assertEqual(after[latency], 1)
        self.assertIn(("twisted_mta_queue_entries", (("state", "cur"),)), after)
