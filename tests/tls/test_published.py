"""
The DANE switch of L{Published} with scripted check results: on only when
the resolver validates, off with exactly one warning line otherwise.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tls import published as pub
from twisted_mta.tls.dnssec import Validation


def checks(answer):
    """run_blocking that answers the start-up check with C{answer}."""
    def run(f, *args):
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(answer)
    return run


class DaneSwitchTests(SynchronousTestCase):
    def start(self, **kw) -> tuple[pub.Published, list[dict]]:
        with capturedLogs() as events:
            p = pub.Published(**kw)
            self.successResultOf(p.start())
            self.assertIs(p.start(), p.start())  # one check, however many ask
        return p, [e for e in events if e.get("event", "").startswith("tls.dane")]

    def test_table(self) -> None:
        """(resolver, check result) -> on/off, the log event and its level."""
        for kw, enabled, event, level in (
                (dict(dane_resolver=object(), run_blocking=checks(Validation(True, "ok"))),
                 True, "tls.dane-on", "info"),
                (dict(dane_resolver=object(), run_blocking=checks(Validation(False, "no AD"))),
                 False, "tls.dane-off", "warn"),
                (dict(dane_resolver=object(), run_blocking=checks(RuntimeError("boom"))),
                 False, "tls.dane-off", "warn"),
                (dict(run_blocking=checks(None), no_resolver="no name server"),
                 False, "tls.dane-off", "warn"),
                (dict(run_blocking=checks(None)), False, None, None)):
            p, events = self.start(**kw)
            self.assertEqual(p.dane_state.enabled, enabled, kw)
            self.assertEqual(self.successResultOf(p.dane_enabled()), enabled)
            if event is None:
                self.assertEqual(events, [], kw)
                self.assertIn("dane = false", p.dane_state.reason)
                continue
            (e,) = events
            self.assertEqual((e["event"], e["log_level"].name), (event, level), kw)
            self.assertFalse(p.dane_state.reason.startswith("DANE is"), p.dane_state.reason)
