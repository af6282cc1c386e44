"""
Deferred helpers shared by the queue and the delivery targets.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure


def gather(ds: Sequence[defer.Deferred]) -> defer.Deferred:
    """
    The results of C{ds} as a list, in order, like C{gatherResults} with
    C{consumeErrors}, but failing with the first failure itself rather
    than a C{FirstError} around it, so that a caller can tell what it
    was (a L{twisted_mta.model.MessageGone}).  A single Deferred, the
    usual case of an attempt (one target, one next hop), is not wrapped
    in a C{DeferredList}, whose own work was about 3% of the main
    process in a queue drain (py-spy; docs/benchmarks.md).
    """
    if len(ds) == 1:
        return ds[0].addCallback(lambda result: [result])

    def unwrap(failure: Failure) -> Any:
        failure.trap(defer.FirstError)
        return failure.value.subFailure

    return defer.gatherResults(list(ds), consumeErrors=True).addErrback(unwrap)
