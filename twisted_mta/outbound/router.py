"""
Decide where each recipient goes: a local Maildir, or a remote next hop.

Remote delivery (MX, smarthost) is not built yet; remote recipients get a
temporary outcome that says so, and stay queued until it is or they expire.
"""

from __future__ import annotations

import attrs

from twisted_mta.delivery.maildir import LocalTarget
from twisted_mta.local import LocalDirectory, UnknownRecipient
from twisted_mta.queue.envelope import Envelope, Outcome

NO_REMOTE_TRANSPORT = Outcome(
    451, "4.4.0", "Remote delivery is not available in this version of twisted-mta; "
    "the message stays queued")


@attrs.frozen
class Routes:
    local: tuple[LocalTarget, ...]
    decided: dict[str, Outcome]  # recipients with an outcome already (no route)


def route(envelope: Envelope, directory: LocalDirectory) -> Routes:
    local = []
    decided: dict[str, Outcome] = {}
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
            decided[rcpt.address] = NO_REMOTE_TRANSPORT
    return Routes(local=tuple(local), decided=decided)
