"""
The remote delivery target (L{twisted_mta.delivery.remote}): where the
message of a transaction is read.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import OutboundSettings
from twisted_mta.delivery.remote import RemoteDelivery
from twisted_mta.model import DeliveryRequest, Envelope, MessageGone, Recipient
from twisted_mta.outbound.message import OutgoingMessage, QueuedMessage

BODY = b"Subject: x\r\n\r\nhi\r\n"


class Pool:
    def __init__(self, reads_queued: bool) -> None:
        self.reads_queued = reads_queued
        self.sent: list = []

    def deliver(self, hop, txn) -> defer.Deferred:
        self.sent.append(txn)
        return defer.succeed({r: "sent" for r in txn.recipients})


class WhereReadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reads: list = []
        self.envelope = Envelope(queue_id="Q", sender="s@src.test", arrival=1.0,
                                 size=len(BODY), recipients=(Recipient("a@dest.test"),
                                                             Recipient("b@other.test")))
        self.path = self.mktemp()
        header = self.envelope.to_header()
        with open(self.path, "wb") as f:
            f.write(header + BODY)
        self.file_size = len(header) + len(BODY)

    def read(self, f, queued) -> defer.Deferred:
        self.reads.append(queued.path)
        return defer.maybeDeferred(f, queued)

    def deliver(self, pool: Pool, path: str | None = None) -> defer.Deferred:
        target = RemoteDelivery(pool, OutboundSettings(), self.read)
        return target.deliver(DeliveryRequest(envelope=self.envelope, path=path or self.path,
                                              indexes=(0, 1), now=2.0))

    def test_a_pool_that_reads_queued_messages_gets_them_unread(self) -> None:
        """
        WorkerSending (C{reads_queued}): one transaction per next hop, each
        with the message unread (path and the envelope's lengths); the
        target reads nothing.
        """
        pool = Pool(reads_queued=True)
        self.assertEqual(self.successResultOf(self.deliver(pool)),
                         {"a@dest.test": "sent", "b@other.test": "sent"})
        self.assertEqual(self.reads, [])
        self.assertEqual([txn.message for txn in pool.sent],
                         [QueuedMessage(self.path, 0, len(BODY))] * 2)

    def test_any_other_pool_gets_the_message_read_once(self) -> None:
        pool = Pool(reads_queued=False)
        self.successResultOf(self.deliver(pool))
        self.assertEqual(self.reads, [self.path])
        self.assertEqual(len(pool.sent), 2)
        for txn in pool.sent:
            self.assertIsInstance(txn.message, OutgoingMessage)
            self.assertEqual(txn.message.body, BODY)
        self.failureResultOf(self.deliver(Pool(reads_queued=False), self.path + ".gone"),
                             MessageGone)
        with open(self.path, "r+b") as f:  # shorter than its envelope says
            f.truncate(self.file_size - 3)
        outcomes = self.successResultOf(self.deliver(Pool(reads_queued=False)))
        self.assertEqual({o.kind for o in outcomes.values()}, {"message-unreadable"})
        self.assertEqual(sorted(outcomes), ["a@dest.test", "b@other.test"])
