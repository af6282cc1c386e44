"""
The metrics observer on its own: which events count where.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.metrics import Metrics


class CleartextFallbackMetricTests(SynchronousTestCase):
    def test_only_fallbacks_from_policies_that_require_tls_count(self):
        """A cleartext fallback counts in twisted_mta_tls_required_cleartext_fallbacks_total only when the destination's policy requires TLS (strict, relaxed): opportunistic going to cleartext is its normal way."""
        m = Metrics()
        event = {"domain": "bank.example", "decider": "now", "kind": "certificate-expired"}
        m("tls.cleartext_fallback", dict(event, policy="strict", requires_tls=True))
        m("tls.cleartext_fallback", dict(event, policy="strict", requires_tls=True))
        m("tls.cleartext_fallback", dict(event, policy="opportunistic", requires_tls=False))
        labels = {"policy": "strict", "domain": "bank.example", "decider": "now"}
        self.assertEqual(m.registry.get_sample_value(
            "twisted_mta_tls_required_cleartext_fallbacks_total", labels), 2.0)
        self.assertIsNone(m.registry.get_sample_value(
            "twisted_mta_tls_required_cleartext_fallbacks_total",
            dict(labels, policy="opportunistic")))
