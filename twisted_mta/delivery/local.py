"""
The local delivery target: recipients of our own domains, copied into
their Maildirs (L{twisted_mta.delivery.maildir}) in the I/O pool.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from zope.interface import implementer

from twisted_mta import failures
from twisted_mta.delivery import maildir
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory, UnknownRecipient
from twisted_mta.model import DeliveryRequest, MessageGone, Outcome
from twisted_mta.queue.spool import RunBlocking


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
