"""
dnspython without DNS over HTTPS.  Import this module before any C{dns}
module.

The MTA asks its resolvers over UDP and TCP only.  When httpx and h2 are
installed (dnspython's C{doh} extra, or another program's dependency),
C{dns.query} imports them at its own import, with httpcore, trio and anyio:
about 240 modules, 6.5 MB and a tenth of a second of start-up in the main
process, for a transport we never use.  C{dns._features.force} is the
switch dnspython provides for this (its docstring: "a workaround for any
cases where importlib.metadata is ineffective"); the module is private,
so tests/test_nodoh.py fails if it changes.
"""

from __future__ import annotations

import dns._features

dns._features.force("doh", False)
