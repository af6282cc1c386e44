"""
What an interop test does when a program it needs (Postfix, nsd, ...) is
missing or cannot run: skip on a developer's machine, fail under CI.

CI (C{.ci/run}, with C{CI=true} in the environment) installs every such
program first (C{scripts/install-test-deps}); if one is still missing
there, the run must not pass with the interop tests quietly skipped.
"""

from __future__ import annotations

import os
from typing import NoReturn

from twisted.trial.unittest import FailTest, SkipTest


def under_ci() -> bool:
    """
    Whether the environment says this is a CI run (C{CI=true}, as CI
    services and C{.ci/run}'s caller set it; C{1} and C{yes} count too).
    """
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def missing(why: str) -> NoReturn:
    """
    Stop the test because of C{why} (a missing program, say): L{SkipTest},
    or L{FailTest} under CI.
    """
    if under_ci():
        raise FailTest(f"{why}; under CI (CI=true) a missing interop dependency "
                       "is a failure, not a skip")
    raise SkipTest(why)
