"""
The metrics observer on its own: which events count where.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.metrics import MAX_DOMAIN_LABELS, Metrics


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


class DomainLabelCardinalityTests(SynchronousTestCase):
    """
    The domain label is capped: the first N distinct domains keep their own
    value, later ones count under domain="other".
    """

    def values(self, m: Metrics, metric: str) -> dict[str, float]:
        """Total of C{metric} per domain label value."""
        out: dict[str, float] = {}
        for family in m.registry.collect():
            for s in family.samples:
                if s.name == metric:
                    out[s.labels["domain"]] = out.get(s.labels["domain"], 0) + s.value
        return out

    def test_thousand_domains_make_at_most_n_plus_one_labels(self):
        """1,000 distinct domains (each twice) in every per-domain counter: at most N+1 label values each, the first N seen keep theirs, and the totals still add up."""
        m = Metrics(max_domains=100)
        domains = [f"d{i}.example" for i in range(1000)]
        for domain in domains * 2:
            m("tls.decision", {"kind": "certificate-expired", "domain": domain,
                               "policy": "strict", "action": "defer", "decider": "never"})
            m("tls.cleartext_fallback", {"domain": domain, "policy": "strict",
                                         "requires_tls": True, "decider": "now"})
            m("tls.shadow", {"kind": "certificate-expired", "shadow": "strict",
                             "domain": domain})
        for metric in ("twisted_mta_tls_failures_total",
                       "twisted_mta_tls_required_cleartext_fallbacks_total",
                       "twisted_mta_tls_shadow_failures_total"):
            values = self.values(m, metric)
            self.assertEqual(len(values), 101, metric)
            self.assertEqual(set(values) - {"other"}, set(domains[:100]), metric)
            self.assertEqual(values["d0.example"], 2.0, metric)
            self.assertEqual(values["other"], 2.0 * 900, metric)
            self.assertEqual(sum(values.values()), 2.0 * 1000, metric)

    def test_default_cap(self):
        """Without an argument the cap is MAX_DOMAIN_LABELS (100)."""
        m = Metrics()
        for i in range(150):
            m("tls.shadow", {"kind": "k", "shadow": "strict", "domain": f"d{i}.example"})
        self.assertEqual(len(self.values(m, "twisted_mta_tls_shadow_failures_total")),
                         MAX_DOMAIN_LABELS + 1)


class MilterMetricTests(SynchronousTestCase):
    def test_results_by_milter(self):
        """milter.result events count in twisted_mta_milter_results_total by milter and result."""
        m = Metrics()
        for result in ("accept", "accept", "reject"):
            m("milter.result", {"milter": "opendkim", "result": result})
        get = m.registry.get_sample_value
        self.assertEqual(get("twisted_mta_milter_results_total",
                             {"milter": "opendkim", "result": "accept"}), 2.0)
        self.assertEqual(get("twisted_mta_milter_results_total",
                             {"milter": "opendkim", "result": "reject"}), 1.0)
