"""
Where remote recipients go: a smarthost (per domain or the default), or the
recipient domain's MX hosts.  (Local recipients never get here: the queue
manager hands them to the local delivery target.)
"""

from __future__ import annotations

import attrs

from twisted_mta.address import AddressError, a_label
from twisted_mta.config import OutboundSettings, Smarthost

@attrs.frozen
class NextHop:
    """
    Where a group of remote recipients goes: the MX hosts of C{domain}, or
    a smarthost.  Messages to one next hop share connections.
    """

    domain: str  # the recipient domain (its TLS policy applies, smarthost or not)
    smarthost: Smarthost | None = None
    # RFC 8689: the message's own TLS demand, part of the hop so that such
    # messages get sessions of their own instead of sharing (and checking
    # after the fact) those of ordinary mail.  REQUIRETLS raises the
    # requirements (verified TLS, a validated MX, REQUIRETLS advertised);
    # "TLS-Required: No" drops what the recipient publishes (DANE, MTA-STS).
    requiretls: bool = False
    tls_required_no: bool = False

    @property
    def tag(self) -> str | None:
        """"requiretls", "tls-required-no" or None, for keys and logs."""
        return "requiretls" if self.requiretls else (
            "tls-required-no" if self.tls_required_no else None)

    @property
    def key(self) -> str:
        return self.smarthost.destination if self.smarthost else self.domain


def next_hops(addresses, outbound: OutboundSettings = OutboundSettings(),
              requiretls: bool = False, tls_required_no: bool = False
              ) -> dict[NextHop, tuple[str, ...]]:
    """
    Remote recipients grouped by where they go: a smarthost (per domain or
    the default), or the recipient domain's MX hosts; each hop carries the
    message's REQUIRETLS or "TLS-Required: No" tag (the latter only while
    C{[outbound.tls] honor_tls_required_no} is on).
    """
    hops: dict[NextHop, list[str]] = {}
    no = tls_required_no and not requiretls and outbound.tls.honor_tls_required_no
    for address in addresses:
        domain = ascii_domain(address.rpartition("@")[2])
        hop = NextHop(domain=domain, smarthost=outbound.smarthost_for(domain),
                      requiretls=requiretls, tls_required_no=no)
        hops.setdefault(hop, []).append(address)
    return {hop: tuple(addrs) for hop, addrs in hops.items()}


def ascii_domain(domain: str) -> str:
    """
    The domain as DNS, smarthost and TLS policy entries know it: a UTF-8
    domain (SMTPUTF8, RFC 6531 3.2) as its A-label.  One that is not
    valid IDNA (the server refuses those) stays as it is and fails its
    MX lookup.
    """
    try:
        return a_label(domain)
    except AddressError:
        return domain.lower()
