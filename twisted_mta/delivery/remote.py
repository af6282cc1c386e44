"""
The remote delivery target: recipients of other domains, grouped by next
hop (the domain's MX hosts, or a smarthost) and handed to the outbound
pool, one transaction per next hop.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from zope.interface import implementer

from twisted_mta import failures
from twisted_mta.config import OutboundSettings
from twisted_mta.deferreds import gather
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.model import DeliveryRequest, MessageGone, Outcome
from twisted_mta.outbound import message as outgoing
from twisted_mta.outbound.message import OutgoingMessage, QueuedMessage
from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound.router import next_hops
from twisted_mta.queue.spool import RunBlocking


@implementer(IDeliveryTarget)
class RemoteDelivery:
    name = "remote"

    def __init__(self, pool, settings: OutboundSettings, run_blocking: RunBlocking) -> None:
        """
        @param pool: an L{twisted_mta.outbound.pool.OutboundPool} (or a test
            double with its C{deliver(hop, txn)}, C{revive()}, C{stop()}).
            A pool whose C{reads_queued} is true (L{WorkerSending}) takes
            the message unread (a L{QueuedMessage}) and reads it where it
            is sent (L{read_queued}): a worker reads it anyway.
        """
        self.pool = pool
        self.settings = settings
        self.run_blocking = run_blocking

    @defer.inlineCallbacks
    def deliver(self, request: DeliveryRequest):
        envelope = request.envelope
        addresses = [r.address for r in request.recipients]
        if self.pool is None:
            outcome = failures.outcome("not-configured")
            return {a: outcome for a in addresses}
        message: OutgoingMessage | QueuedMessage = QueuedMessage.of(request.path, envelope)
        if not getattr(self.pool, "reads_queued", False):
            read = yield self.run_blocking(read_message, message)
            if isinstance(read, Outcome):
                return {a: read for a in addresses}
            message = read
        by_address = {r.address: r for r in request.recipients}
        sent = []
        for hop, addrs in next_hops(addresses, self.settings, envelope.requiretls,
                                    envelope.tls_required_no).items():
            dsn = tuple((by_address[a].notify, by_address[a].orcpt) for a in addrs)
            txn = Transaction(envelope.sender, addrs, message, dsn=dsn, ret=envelope.ret,
                              envid=envelope.envid, queue_id=envelope.queue_id,
                              age=request.now - envelope.arrival,
                              attempts=envelope.attempts, tls_failures=envelope.tls_failures,
                              tls_override=envelope.tls_override,
                              requiretls=envelope.requiretls, smtputf8=envelope.smtputf8)
            sent.append(self.pool.deliver(hop, txn))
        results: dict[str, Outcome] = {}
        for part in (yield gather(sent)):
            results.update(part)
        return results

    def flush(self) -> None:
        if self.pool is not None:
            self.pool.revive()

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.stop()


def read_message(queued: QueuedMessage) -> OutgoingMessage | Outcome:
    """
    The queued message read (blocking), checked against the lengths its
    envelope records; when it cannot be read, the outcome for each of its
    recipients.  Raises L{MessageGone} when the queue file is gone.
    """
    try:
        return outgoing.load(queued.path, queued)
    except FileNotFoundError as e:
        raise MessageGone(str(e))
    except Exception as e:
        return failures.outcome("message-unreadable", why=e)


def read_queued(txn: Transaction) -> Transaction | dict[str, Outcome]:
    """
    L{read_message} for a pool that sends a transaction whose message was
    left unread (L{QueuedMessage}) itself: the transaction with its
    message, or an outcome for each recipient.
    """
    read = read_message(txn.message)
    if isinstance(read, Outcome):
        return {a: read for a in txn.recipients}
    return attrs.evolve(txn, message=read)
