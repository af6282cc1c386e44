"""
Tests for twisted_mta.deferreds.
"""

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.deferreds import gather
from twisted_mta.model import MessageGone


class GatherTests(SynchronousTestCase):
    def test_results_in_order(self) -> None:
        """One, two or three Deferreds, fired in any order: their results as a list, in the order given."""
        for count in (1, 2, 3):
            ds = [defer.Deferred() for _ in range(count)]
            out = gather(ds)
            for i in reversed(range(count)):
                self.assertNoResult(out)
                ds[i].callback(i * 10)
            self.assertEqual(self.successResultOf(out), [i * 10 for i in range(count)])

    def test_empty(self) -> None:
        """No Deferreds: an empty list at once."""
        self.assertEqual(self.successResultOf(gather([])), [])

    def test_failure_is_the_failure_itself(self) -> None:
        """A failure comes out as it went in (not wrapped in FirstError), whether alone or beside others; the others' failures are consumed."""
        alone = gather([defer.fail(MessageGone("/spool/new/X"))])
        self.failureResultOf(alone, MessageGone)
        ok, gone, other = defer.Deferred(), defer.Deferred(), defer.Deferred()
        out = gather([ok, gone, other])
        ok.callback(1)
        gone.errback(MessageGone("/spool/new/X"))
        other.errback(ValueError("also"))  # consumed: not logged as unhandled
        self.failureResultOf(out, MessageGone)
