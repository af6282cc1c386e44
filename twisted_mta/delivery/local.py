"""
The local delivery target: recipients of our own domains, copied into
their Maildirs (L{twisted_mta.delivery.maildir}) in the I/O pool; and
L{OnReceipt}, the same copy made by the receiving process before its 250.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from zope.interface import implementer

from twisted_mta import failures
from twisted_mta.config import LocalSettings
from twisted_mta.delivery import maildir
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory, UnknownRecipient
from twisted_mta.model import DeliveryRequest, Envelope, MessageGone, Outcome
from twisted_mta.queue.spool import RunBlocking, message_offset


@implementer(IDeliveryTarget)
class MaildirDelivery:
    name = "local"

    def __init__(self, directory: LocalDirectory, hostname: str,
                 run_blocking: RunBlocking) -> None:
        self.directory = directory
        self.hostname = hostname
        self.run_blocking = run_blocking

    @defer.inlineCallbacks
    def deliver(self, request: DeliveryRequest):
        decided: dict[str, Outcome] = {}
        targets = []
        for index, rcpt in zip(request.indexes, request.recipients):
            try:
                path = self.directory.maildir_for(rcpt.address)
            except UnknownRecipient:
                decided[rcpt.address] = failures.outcome("no-such-mailbox",
                                                         address=rcpt.address)
                continue
            targets.append(maildir.LocalTarget(index=index, address=rcpt.address,
                                               maildir=path))
        if not targets:
            return decided
        try:
            results = yield self.run_blocking(maildir.deliver, request.path, request.envelope,
                                              targets, self.hostname, request.recovering)
        except FileNotFoundError as e:
            raise MessageGone(str(e))
        except Exception as e:
            outcome = failures.outcome("local-error", why=e)
            results = {t.address: outcome for t in targets}
        where = {t.address: t.maildir for t in targets}
        decided.update({a: attrs.evolve(o, where=where[a]) if o.code < 400 else o
                        for a, o in results.items()})
        return decided

    def flush(self) -> None:
        pass  # nothing fails fast here

    def stop(self) -> None:
        pass


@attrs.frozen
class OnReceipt:
    """
    Delivery on receipt (C{[local] deliver_on_receipt}): a message whose
    every recipient is stored in a Maildir by us is copied there by the
    process that received it, before its 250, instead of being queued
    first.  The copy is the one L{MaildirDelivery} makes, file name
    included, so a message queued after all (one copy failed) and
    delivered again from the queue finds its copies already there.
    """

    directory: LocalDirectory
    settings: LocalSettings
    hostname: str

    @classmethod
    def from_settings(cls, settings: LocalSettings, hostname: str) -> "OnReceipt | None":
        if not settings.deliver_on_receipt:
            return None
        return cls(LocalDirectory(settings), settings, hostname)

    def targets(self, envelope: Envelope) -> list[maildir.LocalTarget] | None:
        """
        Where each recipient's copy goes, or None when the message must
        be queued: a recipient not in a local domain, one stored over
        LMTP, one who asked for a success DSN (RFC 3461: the queue
        writes it), or one already done.
        """
        targets = []
        for index, rcpt in enumerate(envelope.recipients):
            domain = rcpt.address.rpartition("@")[2]
            if (not rcpt.pending or rcpt.wants("SUCCESS")
                    or not self.directory.is_local_domain(domain)
                    or self.settings.delivery_for(domain).kind != "maildir"):
                return None
            try:
                path = self.directory.maildir_for(rcpt.address)
            except UnknownRecipient:
                return None
            targets.append(maildir.LocalTarget(index=index, address=rcpt.address,
                                               maildir=path))
        return targets or None

    def deliver(self, message: str | bytes, envelope: Envelope,
                targets: list[maildir.LocalTarget]) -> dict[str, Outcome]:
        """
        Copy the message (the queue file at path C{message}, envelope
        header first, or the message itself) to every target; blocking.
        Where a copy fails for a reason other than the file system's (a
        bug), every target counts as not delivered, so the message is
        queued.
        """
        try:
            offset = 0 if isinstance(message, bytes) else message_offset(message)
            return maildir.deliver(message, envelope, targets, self.hostname, offset=offset)
        except Exception as e:
            outcome = failures.outcome("local-error", why=e)
            return {t.address: outcome for t in targets}
