"""
Delivery on receipt ([local] deliver_on_receipt): which messages the
receiving process copies into Maildirs itself, and what the client, the
spool and the queue see when it does, when it may not, and when a copy
fails.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.delivery.local import MaildirDelivery, OnReceipt
from twisted_mta.delivery.maildir import maildir_name
from twisted_mta.local import LocalDirectory
from twisted_mta.model import DELIVERED, HEADER_NAME, PENDING, Envelope, Recipient
from twisted_mta.queue.manager import QueueManager, Targets
from tests.support import ServerHarness, make_config, queued

MESSAGE = b"Subject: hello\r\n\r\nbody line\r\n.\r\n"


def envelope(*recipients: Recipient) -> Envelope:
    return Envelope(queue_id="6B0000000000000001", sender="s@remote.test",
                    recipients=recipients, arrival=1_800_000_000.0)


class TargetsTests(SynchronousTestCase):
    """OnReceipt.targets, from a table: a copy per recipient, or None to queue."""

    def setUp(self) -> None:
        self.config = make_config(self.mktemp(), local={
            "routes": {"example.org": {"delivery": "lmtp", "address": "tcp:127.0.0.1:24"}}})
        self.receipt = OnReceipt.from_settings(self.config.local, self.config.hostname)

    def test_table(self) -> None:
        alice = Recipient("alice@example.test")
        cases = [
            ("one local user", (alice,), ["alice@example.test"]),
            ("two local users", (alice, Recipient("bob@example.test")),
             ["alice@example.test", "bob@example.test"]),
            ("success DSN asked for", (Recipient("alice@example.test", notify=("SUCCESS",)),),
             None),
            ("failure DSN only", (Recipient("alice@example.test", notify=("FAILURE",)),),
             ["alice@example.test"]),
            ("a remote recipient beside", (alice, Recipient("carol@remote.test")), None),
            ("a domain stored over LMTP", (Recipient("bob@example.org"),), None),
            ("already delivered", (Recipient("alice@example.test", state=DELIVERED),), None),
        ]
        for name, recipients, expected in cases:
            targets = self.receipt.targets(envelope(*recipients))
            got = None if targets is None else [t.address for t in targets]
            self.assertEqual(got, expected, name)
        [target] = self.receipt.targets(envelope(alice))
        self.assertEqual((target.index, target.maildir),
                         (0, self.config.local.mailbox.format(user="alice", domain="example.test")))

    def test_off(self) -> None:
        config = make_config(self.mktemp(), local={"deliver_on_receipt": False})
        self.assertIsNone(OnReceipt.from_settings(config.local, config.hostname))


class SessionTests(SynchronousTestCase):
    """An SMTP session whose factory delivers on receipt (spool and Maildirs on disk)."""

    def setUp(self) -> None:
        self.h = ServerHarness(self, on_receipt=True)

    def maildir(self, user: str) -> str:
        return self.h.config.local.mailbox.format(user=user, domain="example.test")

    def files(self, user: str, sub: str = "new") -> list[str]:
        path = os.path.join(self.maildir(user), sub)
        return sorted(os.listdir(path)) if os.path.isdir(path) else []

    def test_delivered_before_the_250_and_never_queued(self) -> None:
        self.h.start_transaction(rcpts=("alice@example.test", "info@example.test"))
        [line] = self.h.send(MESSAGE)
        self.assertRegex(line, r"^250 2\.0\.0 Ok: queued as 6B[0-9A-F]+$")
        self.assertEqual(self.h.queued, [])
        self.assertEqual(self.h.spool_entries(), [])  # tmp/ too: the file is gone
        # info is alice and bob; alice once: a copy each, named as the queue names it
        self.assertEqual(self.h.delivered, [("mx", 2, 0.0)])
        # the name's parts: the queue id and the arrival
        env = Envelope(queue_id=line.rsplit(" ", 1)[1], sender="s@remote.test",
                       recipients=(), arrival=self.h.clock.seconds())
        for user, index in (("alice", 0), ("bob", 1)):
            self.assertEqual(self.files(user), [maildir_name(env, index, self.h.config.hostname)])
        [name] = self.files("bob")
        with open(os.path.join(self.maildir("bob"), "new", name), "rb") as f:
            stored = f.read()
        self.assertTrue(stored.startswith(b"Return-Path: <s@remote.test>\n"
                                          b"Delivered-To: bob@example.test\n"), stored[:200])
        self.assertTrue(stored.endswith(b"Subject: hello\n\nbody line\n"), stored[-200:])
        self.assertEqual(self.files("alice", "tmp"), [])

    def test_remote_recipient_queues_the_message(self) -> None:
        h = self.h = ServerHarness(self, on_receipt=True,
                                   relay={"trusted_networks": ["192.0.2.0/24"]})
        h.start_transaction(rcpts=("alice@example.test", "carol@remote.test"))
        [line] = h.send(MESSAGE)
        self.assertTrue(line.startswith("250 2.0.0 Ok: queued as"), line)
        self.assertEqual(h.delivered, [])
        [env] = h.queued
        self.assertEqual([r.state for r in env.recipients], [PENDING, PENDING])
        self.assertEqual(self.files("alice"), [])
        self.assertIn(env.queue_id, os.listdir(os.path.join(h.spool.path, "new")))

    def test_a_failed_copy_queues_what_is_left(self) -> None:
        """
        bob's Maildir cannot be made (a file is in its way): alice's copy
        stays, the entry is queued durably with alice marked delivered, and
        the client gets its 250 once.
        """
        os.makedirs(os.path.dirname(self.maildir("bob")))
        with open(self.maildir("bob"), "w"):
            pass
        self.h.start_transaction(rcpts=("alice@example.test", "bob@example.test"))
        [line] = self.h.send(MESSAGE)
        self.assertTrue(line.startswith("250 2.0.0 Ok: queued as"), line)
        self.assertEqual(self.h.delivered, [])
        [env] = self.h.queued
        self.assertEqual([(r.address, r.state) for r in env.recipients],
                         [("alice@example.test", DELIVERED), ("bob@example.test", PENDING)])
        self.assertEqual(len(self.files("alice")), 1)
        self.assertEqual(os.listdir(os.path.join(self.h.spool.path, "new")), [env.queue_id])
        # the length recovery compares with the file's
        self.assertEqual(env.file_size,
                         os.path.getsize(os.path.join(self.h.spool.path, "new", env.queue_id)))
        self.assertEqual(os.listdir(os.path.join(self.h.spool.path, "tmp")), [])
        # the entry on disk is the message as received, header first
        self.assertIn(b"body line", self.h.spool.read_message(env.queue_id))

    def test_failed_copy_and_full_spool(self) -> None:
        """
        bob's copy fails and the spool cannot take the entry either: 451,
        nothing queued or left in the spool; alice's copy stays, so the
        client's retry gives her a second one (two failures at once: the
        documented limit of delivery on receipt).
        """
        from twisted_mta.queue.spool import MessageWriter

        def full(writer, data):
            raise OSError(28, "No space left on device")

        os.makedirs(os.path.dirname(self.maildir("bob")))
        with open(self.maildir("bob"), "w"):
            pass
        self.patch(MessageWriter, "_append", full)
        self.h.start_transaction(rcpts=("alice@example.test", "bob@example.test"))
        [line] = self.h.send(MESSAGE)
        self.assertTrue(line.startswith("451 "), line)
        self.assertEqual((self.h.delivered, self.h.queued), ([], []))
        self.assertEqual(len(self.files("alice")), 1)
        self.assertEqual(self.h.spool_entries(), [])

    def test_small_message_never_touches_the_spool(self) -> None:
        """A message held in memory is copied from there: a full spool does not stop it, and no spool file is made."""
        from twisted_mta.queue.spool import MessageWriter

        def full(writer, data):
            raise OSError(28, "No space left on device")

        self.patch(MessageWriter, "_append", full)
        self.h.start_transaction()
        [line] = self.h.send(MESSAGE)
        self.assertTrue(line.startswith("250 2.0.0 Ok: queued as"), line)
        self.assertEqual(len(self.h.delivered), 1)
        self.assertEqual(self.h.queued, [])
        [name] = self.files("alice")
        with open(os.path.join(self.maildir("alice"), "new", name), "rb") as f:
            copy = f.read()
        self.assertIn(b"\nbody line\n", copy)
        self.assertNotIn(b"\r\n", copy)
        # our fields on top, the envelope header (never made) nowhere
        self.assertTrue(copy.startswith(b"Return-Path: <"), copy[:40])
        self.assertIn(b"\nReceived: from ", copy)
        self.assertNotIn(HEADER_NAME, copy)
        self.assertEqual(self.h.spool_entries(), [])

    def test_disk_full_before_the_copy(self) -> None:
        """A message spilled to the spool, which cannot take its last octets: 451, no copy, nothing left in tmp/."""
        from twisted_mta.queue.spool import MessageWriter

        writes = []
        append = MessageWriter._append

        def full(writer, data):  # the first spill is written, the rest is not
            writes.append(len(data))
            if len(writes) > 1:
                raise OSError(28, "No space left on device")
            append(writer, data)

        self.patch(MessageWriter, "SPILL", 10)
        self.patch(MessageWriter, "_append", full)
        self.h.start_transaction()
        [line] = self.h.send(MESSAGE)
        self.assertTrue(line.startswith("451 "), line)
        self.assertEqual((self.h.delivered, self.h.queued), ([], []))
        self.assertEqual(self.files("alice"), [])
        self.assertEqual(self.h.spool_entries(), [])

    def test_off_queues_local_mail(self) -> None:
        h = ServerHarness(self, on_receipt=True, local={"deliver_on_receipt": False})
        h.start_transaction()
        [line] = h.send(MESSAGE)
        self.assertTrue(line.startswith("250 2.0.0 Ok: queued as"), line)
        self.assertEqual(h.delivered, [])
        self.assertEqual(len(h.queued), 1)


class QueueAfterwardsTests(SynchronousTestCase):
    """
    What a failed copy leaves is delivered by the queue manager, and no
    recipient gets a second copy: not when the manager takes the entry
    from the receiving process, nor when it recovers it from the spool
    after a crash (the entry's header still lists everyone as pending).
    """

    def setUp(self) -> None:
        self.h = ServerHarness(self, on_receipt=True)
        self.bob = self.h.config.local.mailbox.format(user="bob", domain="example.test")
        os.makedirs(os.path.dirname(self.bob))
        with open(self.bob, "w"):  # in the way of bob's Maildir
            pass
        self.h.start_transaction(rcpts=("alice@example.test", "bob@example.test"))
        self.h.send(MESSAGE)
        [self.env] = self.h.queued
        os.unlink(self.bob)  # bob's Maildir can be made now

    def manager(self) -> QueueManager:
        config = self.h.config
        run = lambda f, *args: defer.maybeDeferred(f, *args)  # noqa: E731
        local = MaildirDelivery(LocalDirectory(config.local), config.hostname, run)
        m = QueueManager(config, self.h.spool, self.h.clock, run,
                         Targets(local=local, remote=local))  # no remote recipient here
        m.startService()
        self.addCleanup(m.stopService)
        return m

    def copies(self, user: str) -> int:
        path = self.h.config.local.mailbox.format(user=user, domain="example.test")
        return len(os.listdir(os.path.join(path, "new")))

    def test_handed_over(self) -> None:
        """The queue delivers bob's copy only; the metrics count one message received and both recipients delivered, alice's copy when the entry is handed over."""
        m = self.manager()
        seen: list = []
        m.observers.append(lambda name, event: seen.append((name, event)))
        m.enqueue(self.env)
        self.h.clock.advance(0)
        self.assertEqual((self.copies("alice"), self.copies("bob")), (1, 1))
        self.assertEqual(queued(m), [])
        self.assertIsNone(self.h.spool.message_path(self.env.queue_id))
        self.assertEqual([name for name, _ in seen],
                         ["inbound.queued", "delivery.result", "delivery.result"])
        self.assertEqual({(e["route"], e["result"]) for name, e in seen[1:]},
                         {("local", "delivered")})

    def test_recovered_after_a_crash(self) -> None:
        m = self.manager()  # loads the entry from new/, as after a restart
        self.h.clock.advance(0)
        self.assertEqual((self.copies("alice"), self.copies("bob")), (1, 1))
        self.assertEqual(queued(m), [])

    def test_counted_as_received_and_delivered(self) -> None:
        """The manager's observers (the metrics) count a message delivered on receipt as one received and each recipient delivered locally."""
        m = self.manager()
        seen: list = []
        m.observers.append(lambda name, event: seen.append((name, event)))
        m.delivered_on_receipt("mx", 2, 0.25)
        result = ("delivery.result", {"route": "local", "result": "delivered", "latency": 0.25})
        self.assertEqual(seen, [("inbound.queued", {"listener": "mx"}), result, result])
