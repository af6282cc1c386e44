"""
Per-destination TLS history: recorded, saved and loaded (a restart keeps
it), expired, the ratchet that refuses a silent downgrade, and the memory
of broken TLS.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tls.history import TLSHistory, history_path
from twisted_mta.outbound.router import NextHop
from tests.outbound.test_pool import PoolTestBase

DAY = 86400


class HistoryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.path = history_path(self.mktemp())

    def history(self, **kw):
        h = TLSHistory(self.path, self.clock, defer.maybeDeferred, **kw)
        h.load()
        return h

    def test_best_level_kept_and_survives_a_restart(self):
        h = self.history()
        h.record_success("Example.COM", "verified")
        h.record_success("example.com", "encrypted")  # a worse level does not lower the best
        self.clock.advance(1)  # the debounced save
        again = self.history()
        entry = again.get("example.com")
        self.assertEqual((entry.best, entry.best_at), ("verified", 1_800_000_000))
        self.assertTrue(os.path.exists(self.path))

    def test_expiry(self):
        h = self.history(expiry=30 * DAY)
        h.record_success("example.com", "verified")
        self.clock.advance(29 * DAY)
        self.assertEqual(h.get("example.com").best, "verified")
        self.clock.advance(2 * DAY)
        self.assertEqual(h.get("example.com").best, "none")
        h.record_success("other.test", "encrypted")
        self.clock.advance(1)
        self.assertEqual(set(self.history().entries), {"other.test"})

    def test_broken_tls_after_repeated_handshake_failures(self):
        h = self.history(broken_after=3, broken_time=DAY)
        for _ in range(2):
            h.record_failure("broken.test", "handshake-failed")
        self.assertIsNone(h.broken("broken.test"))
        h.record_failure("broken.test", "handshake-failed")
        self.assertEqual(h.broken("broken.test").failures, 3)
        self.clock.advance(DAY + 1)
        self.assertIsNone(h.broken("broken.test"))

    def test_forget(self):
        h = self.history()
        h.record_success("a.test", "verified")
        self.assertTrue(h.forget("a.test"))
        self.assertIsNone(h.get("a.test"))


class RatchetPoolTests(PoolTestBase):
    """
    The pool with a history: the scripted servers offer no STARTTLS, which
    is what a stripping attacker makes a server look like.
    """

    def history_pool(self, **tls):
        history = TLSHistory(history_path(self.mktemp()), self.clock, self.run_blocking)
        pool = self.pool(tls=tls)
        pool.history = history
        return pool, history

    def test_ratchet_refuses_downgrade_after_verified_tls(self):
        """A ratcheted domain that did verified TLS is deferred, not sent in cleartext, when STARTTLS disappears; the text says why."""
        pool, history = self.history_pool(policy="opportunistic", fallback="now", ratchet=True)
        history.record_success("peer.test", "verified")
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        o = r[0]["x@peer.test"]
        self.assertEqual((o.code, o.kind), (451, "starttls-not-offered"))
        self.assertIn("because peer.test used verified TLS on", o.text)
        self.assertIn("does not let a domain drop silently to cleartext", o.text)
        self.assertNotIn(b"DATA", self.commands())

    def test_without_ratchet_the_same_goes_in_cleartext(self):
        pool, history = self.history_pool(policy="opportunistic", fallback="now")
        history.record_success("peer.test", "verified")
        r = self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].code, 250)

    def test_cleartext_delivery_recorded(self):
        pool, history = self.history_pool()
        self.deliver(pool, NextHop("peer.test"), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(history.get("peer.test").best, "none")
