"""
Decide where each recipient goes: a local Maildir, a smarthost (per domain
or the default), or the recipient domain's MX hosts.
"""

from __future__ import annotations

import attrs

from twisted_mta.config import OutboundSettings, Smarthost
from twisted_mta.delivery.maildir import LocalTarget
from twisted_mta.local import LocalDirectory, UnknownRecipient
from twisted_mta.model import Envelope, Outcome

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


@attrs.frozen
class Routes:
    local: tuple[LocalTarget, ...]
    decided: dict[str, Outcome]  # recipients with an outcome already (no route)
    remote: dict[NextHop, tuple[str, ...]] = attrs.field(factory=dict)


def route(envelope: Envelope, directory: LocalDirectory,
          outbound: OutboundSettings = OutboundSettings()) -> Routes:
    local = []
    decided: dict[str, Outcome] = {}
    remote: dict[NextHop, list[str]] = {}
    for index, rcpt in enumerate(envelope.recipients):
        if not rcpt.pending:
            continue
        domain = rcpt.address.rpartition("@")[2]
        if directory.is_local_domain(domain):
            try:
                maildir = directory.maildir_for(rcpt.address)
            except UnknownRecipient:
                decided[rcpt.address] = Outcome(550, "5.1.1",
                                                f"No such local mailbox: {rcpt.address}")
                continue
            local.append(LocalTarget(index=index, address=rcpt.address, maildir=maildir))
        else:
            smarthost = outbound.smarthost_for(domain)
            hop = NextHop(domain=domain.lower(), smarthost=smarthost)
            remote.setdefault(hop, []).append(rcpt.address)
    return Routes(local=tuple(local), decided=decided,
                  remote={hop: tuple(addrs) for hop, addrs in remote.items()})
