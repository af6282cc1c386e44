"""
An example twisted-mta TLS plugin (docs/plugins.md walks through it):
strict TLS for banks, opportunistic TLS everywhere else, and never
cleartext to any domain listed in a file.

Install it by putting this file in a twisted/plugins/ directory on
Python's path (e.g. PYTHONPATH=/path/to/examples/plugins), then in the
configuration:

    [outbound.tls]
    policy = "banks"
    fallback = "no-cleartext-list"

Note there is no twisted/plugins/__init__.py next to it: twisted/plugins is
a namespace that Twisted extends with every such directory on the path.
"""

import os

from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import IFallbackDecider, ITLSPolicy
from twisted_mta.tls.fallback import DEFER, TLS_ONLY, Decision, Now
from twisted_mta.tls.policy import OPPORTUNISTIC, STRICT

BANKS = ("bank.example", "examplebank.test", "bank.test")


def _listed(domain, names):
    """Whether domain is one of names, or a subdomain of one."""
    domain = domain.lower().rstrip(".")
    return any(domain == n or domain.endswith("." + n) for n in names)


@implementer(ITLSPolicy, IPlugin)
class BankPolicy:
    name = "banks"

    def requirements(self, destination):
        if _listed(destination.domain, BANKS):
            return STRICT.requirements(destination)
        return OPPORTUNISTIC.requirements(destination)


def _read_list(path):
    try:
        with open(path, encoding="utf-8") as f:
            return tuple(line.strip().lower() for line in f
                         if line.strip() and not line.startswith("#"))
    except OSError:
        return ()


@implementer(IFallbackDecider, IPlugin)
class NoCleartextList:
    """
    Cleartext at once after a TLS failure (like the built-in "now"), except
    for the domains in a file, which never get mail without TLS.  The file
    (one domain per line) is read once, when the plugin loads: deciders do
    no I/O while deciding.
    """

    name = "no-cleartext-list"

    def __init__(self, path=None):
        self.path = path or os.environ.get("MTA_NO_CLEARTEXT_FILE",
                                           "/etc/twisted-mta/no-cleartext-domains")
        self.domains = _read_list(self.path)

    def decide(self, failure, situation):
        if _listed(situation.destination.domain, self.domains):
            return Decision(DEFER, f"{situation.destination.domain} is listed in "
                            f"{self.path}: never without encryption", self.name,
                            later=TLS_ONLY)
        return Now().decide(failure, situation)


banks = BankPolicy()
no_cleartext_list = NoCleartextList()
