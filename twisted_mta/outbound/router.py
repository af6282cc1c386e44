"""
Where remote recipients go: a smarthost (per domain or the default), or the
recipient domain's MX hosts.  (Local recipients never get here: the queue
manager hands them to the local delivery target.)
"""

from __future__ import annotations

import attrs

from twisted_mta.config import OutboundSettings, Smarthost

@attrs.frozen
class NextHop:
    """
    Where a group of remote recipients goes: the MX hosts of C{domain}, or
    a smarthost.  Messages to one next hop share connections.
    """

    domain: str  # the recipient domain (its TLS policy applies, smarthost or not)
    smarthost: Smarthost | None = None

    @property
    def key(self) -> str:
        return self.smarthost.destination if self.smarthost else self.domain


def next_hops(addresses, outbound: OutboundSettings = OutboundSettings()
              ) -> dict[NextHop, tuple[str, ...]]:
    """
    Remote recipients grouped by where they go: a smarthost (per domain or
    the default), or the recipient domain's MX hosts.
    """
    hops: dict[NextHop, list[str]] = {}
    for address in addresses:
        domain = address.rpartition("@")[2]
        hop = NextHop(domain=domain.lower(), smarthost=outbound.smarthost_for(domain))
        hops.setdefault(hop, []).append(address)
    return {hop: tuple(addrs) for hop, addrs in hops.items()}
