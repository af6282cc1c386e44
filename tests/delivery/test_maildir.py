"""
Tests for local Maildir delivery.
"""

import errno
import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.delivery import maildir
from twisted_mta.delivery.maildir import LocalTarget, deliver, maildir_name
from twisted_mta.model import Envelope, Recipient


class MaildirTests(SynchronousTestCase):
    def setUp(self):
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.msg = os.path.join(self.base, "queued")
        self.env = Envelope(queue_id="Q1", sender="s@remote.test",
                            recipients=(Recipient("alice@example.test"), Recipient("bob@example.test")),
                            arrival=1_800_000_000.25)
        with open(self.msg, "wb") as f:
            f.write(self.env.to_header())
            f.write(b"Received: from x\r\n\tby y; date\r\nSubject: hi\r\n\r\nbody\r\n")

    def target(self, index, user):
        return LocalTarget(index=index, address=f"{user}@example.test",
                           maildir=os.path.join(self.base, user, "Maildir"))

    def files(self, user, sub="new"):
        return os.listdir(os.path.join(self.base, user, "Maildir", sub))

    def test_delivers_with_return_path_and_delivered_to(self):
        """The copy starts with Return-Path and Delivered-To, has no envelope header, uses LF line ends, and sits in new/."""
        result = deliver(self.msg, self.env, [self.target(0, "alice")], "mx.example.test")
        self.assertEqual(result["alice@example.test"].code, 250)
        [name] = self.files("alice")
        with open(os.path.join(self.base, "alice", "Maildir", "new", name), "rb") as f:
            self.assertEqual(f.read(),
                             b"Return-Path: <s@remote.test>\nDelivered-To: alice@example.test\n"
                             b"Received: from x\n\tby y; date\nSubject: hi\n\nbody\n")
        self.assertEqual(self.files("alice", "tmp"), [])
        self.assertEqual(self.files("alice", "cur"), [])

    def test_null_sender_return_path(self):
        """A bounce (null sender) gets Return-Path: <>."""
        import attrs
        env = attrs.evolve(self.env, sender="")
        deliver(self.msg, env, [self.target(0, "alice")], "mx.example.test")
        [name] = self.files("alice")
        with open(os.path.join(self.base, "alice", "Maildir", "new", name), "rb") as f:
            self.assertTrue(f.read().startswith(b"Return-Path: <>\n"))

    def test_name_follows_maildir_rules(self):
        """Names are time.unique.host, without ':' or '/', and escape them in the host."""
        name = maildir_name(self.env, 3, "mx/odd:host")
        self.assertEqual(name, "1800000000.M250000Q Q1R3.mx\\057odd\\072host".replace(" ", ""))
        self.assertEqual(name.count("/"), 0)
        self.assertEqual(name.count(":"), 0)

    def test_each_recipient_gets_a_copy(self):
        """Two recipients get one copy each, with distinct names."""
        deliver(self.msg, self.env, [self.target(0, "alice"), self.target(1, "bob")], "h")
        self.assertEqual(len(self.files("alice")), 1)
        self.assertEqual(len(self.files("bob")), 1)
        self.assertNotEqual(self.files("alice"), self.files("bob"))

    def test_redelivery_is_idempotent(self):
        """Delivering the same recipient of the same entry twice leaves one copy."""
        deliver(self.msg, self.env, [self.target(0, "alice")], "h")
        result = deliver(self.msg, self.env, [self.target(0, "alice")], "h")
        self.assertEqual(result["alice@example.test"].code, 250)
        self.assertEqual(len(self.files("alice")), 1)

    def test_recovery_sees_copy_already_read(self):
        """On recovery, a copy the user already moved to cur/ counts as delivered."""
        deliver(self.msg, self.env, [self.target(0, "alice")], "h")
        [name] = self.files("alice")
        md = os.path.join(self.base, "alice", "Maildir")
        os.rename(os.path.join(md, "new", name), os.path.join(md, "cur", name + ":2,S"))
        deliver(self.msg, self.env, [self.target(0, "alice")], "h", recovering=True)
        self.assertEqual(self.files("alice"), [])
        self.assertEqual(len(self.files("alice", "cur")), 1)

    def test_unwritable_maildir_is_temporary(self):
        """A Maildir that cannot be written gives a 4xx outcome and leaves no partial file."""
        md = os.path.join(self.base, "alice", "Maildir")
        maildir.ensure_maildir(md)

        def fail(*args):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(maildir, "_copy", fail)
        result = deliver(self.msg, self.env, [self.target(0, "alice")], "h")
        self.assertEqual((result["alice@example.test"].code, result["alice@example.test"].enhanced),
                         (452, "4.2.2"))
        self.assertEqual(self.files("alice"), [])

    def test_large_message_copied_in_chunks(self):
        """A message copied in small chunks, with CRLFs split across chunk edges, comes out byte-exact with LF ends."""
        body = b"".join(b"line %d %s\r\n" % (i, b"y" * (i % 13)) for i in range(500))
        with open(self.msg, "wb") as f:
            f.write(self.env.to_header() + b"Subject: big\r\n\r\n" + body)
        self.patch(maildir, "CHUNK", 7)
        deliver(self.msg, self.env, [self.target(0, "alice")], "h")
        [name] = self.files("alice")
        with open(os.path.join(self.base, "alice", "Maildir", "new", name), "rb") as f:
            data = f.read()
        self.assertEqual(data, b"Return-Path: <s@remote.test>\nDelivered-To: alice@example.test\n"
                               b"Subject: big\n\n" + body.replace(b"\r\n", b"\n"))

    def test_copy_from_memory_is_the_copy_from_the_file(self):
        """Delivery on receipt of a message held in memory writes, byte for byte and name for name, what the file gives."""
        with open(self.msg, "rb") as f:
            content = f.read()
        offset = content.index(b"Received:")
        deliver(self.msg, self.env, [self.target(0, "alice")], "h")
        deliver(content, self.env, [self.target(1, "bob")], "h", offset=offset)
        copies = {}
        for index, user in enumerate(("alice", "bob")):
            [name] = self.files(user)
            self.assertEqual(name, maildir_name(self.env, index, "h"))
            with open(os.path.join(self.base, user, "Maildir", "new", name), "rb") as f:
                copies[user] = f.read().replace(b"Delivered-To: " + user.encode(), b"")
        self.assertEqual(copies["alice"], copies["bob"])
        self.assertIn(b"\nbody\n", copies["bob"])

    def test_permission_error_is_temporary(self):
        """EACCES is a temporary 451 4.3.0, not a bounce."""
        outcome = maildir.classify_os_error(OSError(errno.EACCES, "Permission denied"))
        self.assertEqual((outcome.code, outcome.enhanced), (451, "4.3.0"))


class MaildirRecreatedTests(SynchronousTestCase):
    """
    A Maildir is made once per process; one removed later (a user's
    clean-up) is made again, and a tmp/ copy a crash left is replaced.
    """

    def setUp(self):
        self.base = self.mktemp()
        os.makedirs(self.base)
        self.msg = os.path.join(self.base, "queued")
        self.env = Envelope(queue_id="Q7", sender="s@remote.test",
                            recipients=(Recipient("alice@example.test"),), arrival=1_800_000_000.0)
        with open(self.msg, "wb") as f:
            f.write(self.env.to_header())
            f.write(b"Subject: hi\r\n\r\nbody\r\n")
        self.md = os.path.join(self.base, "alice", "Maildir")
        self.target = LocalTarget(index=0, address="alice@example.test", maildir=self.md)

    def test_removed_maildir_is_made_again(self):
        """After the first delivery the Maildir is deleted; the next delivery makes it again."""
        import shutil
        self.assertEqual(deliver(self.msg, self.env, [self.target], "h")["alice@example.test"].code, 250)
        shutil.rmtree(self.md)
        self.assertEqual(deliver(self.msg, self.env, [self.target], "h")["alice@example.test"].code, 250)
        self.assertEqual(len(os.listdir(os.path.join(self.md, "new"))), 1)
        self.assertEqual(os.listdir(os.path.join(self.md, "tmp")), [])

    def test_stale_tmp_copy_replaced(self):
        """A half-written copy of the same name in tmp/ is replaced, not delivered."""
        maildir.ensure_maildir(self.md)
        name = maildir_name(self.env, 0, "h")
        with open(os.path.join(self.md, "tmp", name), "wb") as f:
            f.write(b"half")
        deliver(self.msg, self.env, [self.target], "h")
        with open(os.path.join(self.md, "new", name), "rb") as f:
            self.assertTrue(f.read().endswith(b"body\n"))
        self.assertEqual(os.listdir(os.path.join(self.md, "tmp")), [])


class DirectorySyncTests(SynchronousTestCase):
    """
    Concurrent deliveries into one Maildir share the fsync of new/, and
    nobody returns before an fsync that started after its own call.
    """

    def test_concurrent_callers_share_fsyncs(self):
        import threading
        import time
        calls = []  # (start, end) of each fsync
        returned = {}
        gate = threading.Event()

        def slow_fsync(path):
            start = time.monotonic()
            gate.wait(5)
            time.sleep(0.02)
            calls.append((start, time.monotonic()))

        self.patch(maildir, "fsync_dir", slow_fsync)
        syncer = maildir.DirectorySync()

        def caller(i):
            called = time.monotonic()
            syncer.sync("/nowhere")
            returned[i] = (called, time.monotonic())

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        time.sleep(0.1)
        gate.set()
        for t in threads:
            t.join(10)
        self.assertEqual(len(returned), 12)
        self.assertLessEqual(len(calls), 3)  # one running, then one for everyone who waited
        for called, back in returned.values():
            self.assertTrue(any(start >= called and end <= back for start, end in calls),
                            (called, back, calls))

    def test_failed_fsync_is_not_shared_as_success(self):
        """An fsync that raised covers nobody: the next caller runs its own."""
        n = []

        def failing_once(path):
            n.append(path)
            if len(n) == 1:
                raise OSError(errno.EIO, "I/O error")

        self.patch(maildir, "fsync_dir", failing_once)
        syncer = maildir.DirectorySync()
        self.assertRaises(OSError, syncer.sync, "/d")
        syncer.sync("/d")
        self.assertEqual(len(n), 2)
