"""
A child process's life bound to its parent's: the workers and the commit
helper must not outlive the main process (a worker would keep the port,
a helper would write into a spool the next start is recovering).
"""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """On Linux, SIGKILL when the parent dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # it died before we asked
        os._exit(1)
