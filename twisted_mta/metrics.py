"""
Numbers for a monitoring system: a Prometheus endpoint served by
prometheus_client's Twisted resource ([metrics] endpoint), fed by events
from the queue manager and the outbound pool.

Each MTA has its own registry (not prometheus_client's global one), so
tests can run several side by side.

Label values come from a small fixed set, except destination domains, which
come from whoever we send mail to: those are capped (L{DomainLabels}) so the
number of series, and our memory and Prometheus's, stays bounded.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 86400, 5 * 86400)
MAX_DOMAIN_LABELS = 100
OTHER_DOMAIN = "other"


class DomainLabels:
    """
    The C{domain} label value for a destination domain: the first C{limit}
    distinct domains keep their own, every later one is counted as
    C{"other"}.  Each labelled series costs memory here and in Prometheus
    for as long as the process lives, and the set of domains is unbounded.

    First come rather than top-N by count: a series, once created, keeps
    its meaning, so counters only go up and C{rate()}/C{increase()} stay
    right; a top-N that reshuffled would move counts between series.  A
    domain under C{"other"} is still named in the log events
    (outbound.tls_decision, outbound.tls_fallback, tls.shadow).
    """

    def __init__(self, limit: int = MAX_DOMAIN_LABELS) -> None:
        self.limit = limit
        self.kept: set[str] = set()

    def __call__(self, domain: str) -> str:
        if domain not in self.kept:
            if len(self.kept) >= self.limit:
                return OTHER_DOMAIN
            self.kept.add(domain)
        return domain


class _QueueCollector:
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self.counts = counts

    def collect(self):
        g = GaugeMetricFamily("twisted_mta_queue_entries",
                              "Queue entries by spool state (new, cur, hold).",
                              labels=["state"])
        counts = {"new": 0, "cur": 0, "hold": 0}
        counts.update(self.counts())
        for state, n in sorted(counts.items()):
            g.add_metric([state], n)
        yield g


def notify(observers: list, name: str, event: dict[str, Any], logger, error_event: str
           ) -> None:
    """
    Hand C{event} to every observer (the metrics, the shadow report); one
    that fails is logged and never stops mail.
    """
    for observer in observers:
        try:
            observer(name, event)
        except Exception:
            logger.failure("an observer of {name} failed", name=name, event=error_event)


class Metrics:
    def __init__(self, max_domains: int = MAX_DOMAIN_LABELS) -> None:
        # One cap shared by every counter with a domain label, so a domain
        # has its own series in all of them or in none.
        self.domain = DomainLabels(max_domains)
        self._children: dict[tuple, Any] = {}  # see _child
        r = self.registry = CollectorRegistry()
        self.received = Counter("twisted_mta_messages_received", "Messages accepted (250 after "
                                "DATA), not counting our own DSNs.", ["listener"], registry=r)
        self.recipients = Counter("twisted_mta_recipient_deliveries", "Recipient outcomes of "
                                  "delivery attempts.", ["route", "result"], registry=r)
        self.dsns = Counter("twisted_mta_dsns", "DSNs queued.", ["kind"], registry=r)
        self.latency = Histogram("twisted_mta_delivery_latency_seconds", "From arrival to "
                                 "delivery, per recipient.", ["route"], registry=r,
                                 buckets=LATENCY_BUCKETS)
        self.sessions = Counter("twisted_mta_outbound_sessions", "Outbound sessions by TLS "
                                "outcome.", ["tls_version", "verified", "policy"], registry=r)
        self.tls_failures = Counter("twisted_mta_tls_failures", "TLS failures by class and "
                                    "destination domain.", ["kind", "domain", "policy"],
                                    registry=r)
        self.fallbacks = Counter("twisted_mta_tls_fallback_decisions", "Fallback decisions by "
                                 "failure class and decision.", ["reason", "decision",
                                                                 "decider"], registry=r)
        self.cleartext_fallbacks = Counter(
            "twisted_mta_tls_required_cleartext_fallbacks", "Messages sent in cleartext after "
            "a TLS failure although their policy requires TLS (strict, relaxed): a fallback "
            "decider allowed it.", ["policy", "domain", "decider"], registry=r)
        self.shadow = Counter("twisted_mta_tls_shadow_failures", "Sessions a shadow policy "
                              "would have refused.", ["kind", "shadow", "domain"], registry=r)
        self.tls_required_no = Counter(
            "twisted_mta_tls_required_no_deliveries", "Delivery attempts of messages tagged "
            "\"TLS-Required: No\" (RFC 8689): the recipient's published TLS policy (DANE, "
            "MTA-STS) was not enforced for them.", ["domain"], registry=r)
        self.requiretls_refused = Counter(
            "twisted_mta_requiretls_refused_hosts", "Mail servers not used for a REQUIRETLS "
            "message (RFC 8689), by why: requiretls-unsupported, requiretls-mx-unvalidated, "
            "requiretls-no-tls.", ["kind", "domain"], registry=r)
        self.tlsrpt_reports = Counter(
            "twisted_mta_tlsrpt_reports", "TLS reports (RFC 8460) by delivery method (mailto, "
            "https) and result: sent (queued as mail, or POSTed with 2xx), failed (not "
            "mailed, or the POST given up).", ["method", "result"], registry=r)
        self.milter_results = Counter(
            "twisted_mta_milter_results", "What each milter ([milters.NAME]) made of the "
            "messages and commands it saw: accept (the message passed, maybe edited), "
            "modified (it edited the message), reject, tempfail, discard, quarantine, "
            "failed (unreachable, timed out, broke the protocol: its default action "
            "applied).", ["milter", "result"], registry=r)
        self.tlsrpt_domains = Counter(
            "twisted_mta_tlsrpt_domains", "Policy domains a TLS report was made for (one per "
            "domain and day, and one per early report of tls report send --now).",
            registry=r)

    def watch_queue(self, counts: Callable[[], dict[str, int]]) -> None:
        """Report C{counts()}, the number of entries in each spool state."""
        self.registry.register(_QueueCollector(counts))

    def _child(self, metric, *labels: str):
        """
        C{metric.labels(*labels)}, kept: for the per-message series, whose
        labels come from small fixed sets (listeners, routes, results), a
        third of the cost of counting a delivery.
        """
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def __call__(self, name: str, e: dict[str, Any]) -> None:
        if name == "inbound.queued":
            self._child(self.received, e["listener"]).inc()
        elif name == "delivery.result":
            self._child(self.recipients, e["route"], e["result"]).inc()
            if e["result"] == "delivered" and e.get("latency") is not None:
                self._child(self.latency, e["route"]).observe(e["latency"])
        elif name == "dsn.queued":
            self.dsns.labels(e["kind"]).inc()
        elif name == "tls.session":
            self.sessions.labels(e["version"] or "none", "yes" if e["verified"] else "no",
                                 e["policy"]).inc()
        elif name == "tls.decision":
            self.tls_failures.labels(e["kind"], self.domain(e["domain"]), e["policy"]).inc()
            self.fallbacks.labels(e["kind"], e["action"], e["decider"]).inc()
        elif name == "tls.cleartext_fallback":
            if e["requires_tls"]:
                self.cleartext_fallbacks.labels(e["policy"], self.domain(e["domain"]),
                                                e["decider"]).inc()
        elif name == "tls.shadow":
            self.shadow.labels(e["kind"], e["shadow"], self.domain(e["domain"])).inc()
        elif name == "tls.required_no":
            self.tls_required_no.labels(self.domain(e["domain"])).inc()
        elif name == "tls.requiretls_refused":
            self.requiretls_refused.labels(e["kind"], self.domain(e["domain"])).inc()
        elif name in ("tlsrpt.sent", "tlsrpt.failed"):
            self.tlsrpt_reports.labels(e["method"], name.removeprefix("tlsrpt.")).inc()
        elif name == "milter.result":
            self.milter_results.labels(e["milter"], e["result"]).inc()
        elif name == "tlsrpt.report":
            self.tlsrpt_domains.inc()

    def resource(self):
        from prometheus_client.twisted import MetricsResource
        return MetricsResource(registry=self.registry)
