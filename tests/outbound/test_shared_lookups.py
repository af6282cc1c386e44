"""
The look-ups a destination's connections share (L{attempt._Shared}):
one call for every caller while in flight, the result reused for
L{attempt.SHARE_LOOKUPS} seconds, a failure handed to those waiting and
then forgotten, and an operator's flush forgetting everything.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.outbound import attempt


class SharedLookupTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.shared = attempt._Shared()
        self.calls: list[defer.Deferred] = []

    def make(self) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append(d)
        return d

    def test_callers_in_flight_share_one_call(self) -> None:
        waiting = [self.shared.get(("hosts",), self.clock, self.make) for _ in range(5)]
        self.assertEqual(len(self.calls), 1)
        self.calls[0].callback("answer")
        self.assertEqual([self.successResultOf(d) for d in waiting], ["answer"] * 5)

    def test_reused_for_a_while_then_asked_again(self) -> None:
        self.shared.get(("hosts",), self.clock, self.make)
        self.calls[0].callback("first")
        self.clock.advance(attempt.SHARE_LOOKUPS - 0.5)
        self.assertEqual(self.successResultOf(
            self.shared.get(("hosts",), self.clock, self.make)), "first")
        self.assertEqual(len(self.calls), 1)
        self.clock.advance(1)
        later = self.shared.get(("hosts",), self.clock, self.make)
        self.assertEqual(len(self.calls), 2)
        self.calls[1].callback("second")
        self.assertEqual(self.successResultOf(later), "second")

    def test_keys_are_separate(self) -> None:
        self.shared.get(("host", "a", 25), self.clock, self.make)
        self.shared.get(("host", "b", 25), self.clock, self.make)
        self.assertEqual(len(self.calls), 2)

    def test_failure_reaches_the_waiters_and_is_forgotten(self) -> None:
        waiting = [self.shared.get(("hosts",), self.clock, self.make) for _ in range(3)]
        self.calls[0].errback(RuntimeError("SERVFAIL"))
        for d in waiting:
            self.assertEqual(self.failureResultOf(d, RuntimeError).getErrorMessage(),
                             "SERVFAIL")
        self.shared.get(("hosts",), self.clock, self.make)
        self.assertEqual(len(self.calls), 2)  # asked again at once

    def test_clear(self) -> None:
        self.shared.get(("hosts",), self.clock, self.make)
        self.calls[0].callback("old")
        self.shared.clear()
        self.shared.get(("hosts",), self.clock, self.make)
        self.assertEqual(len(self.calls), 2)
