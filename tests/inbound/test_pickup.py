"""
The pickup (twisted_mta/inbound/pickup.py): drops become queue entries;
whatever a user put into the maildrop is checked, and a bad drop is set
aside with one log line without stopping the pickup.
"""

from __future__ import annotations

import os
import stat

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from tests.support import make_config
from twisted_mta import maildrop
from twisted_mta.inbound.pickup import (
    DEBRIS_AGE, MODE, DropRefused, PickedUp, PickupService, prepare_maildrop, read_drop,
    user_name,
)
from twisted_mta.maildrop import Drop, DropError
from twisted_mta.model import from_header
from twisted_mta.queue.spool import Spool, run_inline

MESSAGE = b"From: a@x.test\r\nSubject: s\r\n\r\nhi\r\n"


class PrepareTests(unittest.TestCase):

    def test_modes(self) -> None:
        spool = Spool(self.mktemp())
        spool.create()
        path = prepare_maildrop(spool.path)
        self.assertEqual(path, os.path.join(spool.path, "maildrop"))
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), MODE)
        self.assertEqual(stat.S_IMODE(os.stat(spool.path).st_mode), 0o711)
        # again: nothing changes, nothing fails
        os.chmod(path, 0o700)
        prepare_maildrop(spool.path)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), MODE)

    def test_chown_leaves_the_drops_to_their_owners(self) -> None:
        spool = Spool(self.mktemp())
        spool.create()
        path = prepare_maildrop(spool.path)
        drop = os.path.join(path, "X1")
        entry = os.path.join(spool.path, "new", "Q1")
        for name in (drop, entry):
            with open(name, "wb"):
                pass
        calls = []
        self.patch(os, "chown", lambda p, uid, gid: calls.append(p))
        spool.chown(12345, 12345)
        self.assertIn(path, calls)
        self.assertNotIn(drop, calls)
        self.assertIn(entry, calls)


class ReadDropTests(unittest.TestCase):

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)

    def path(self, name: str = "D1") -> str:
        return os.path.join(self.dir, name)

    def write(self, data: bytes, name: str = "D1") -> str:
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)

    def test_good(self) -> None:
        drop = Drop("a@x.test", ("b@y.test",), MESSAGE)
        self.assertEqual(read_drop(self.write(maildrop.encode(drop)), 1000, 100),
                         (drop, os.getuid()))

    def refused(self, path: str, words: str, size: int = 1000) -> None:
        with self.assertRaises(DropError) as caught:
            read_drop(path, size, 100)
        self.assertIn(words, str(caught.exception))

    def test_symlink(self) -> None:
        target = self.write(maildrop.encode(Drop("a@x.test", ("b@y.test",), MESSAGE)), "T")
        os.symlink(target, self.path())
        self.refused(self.path(), "symbolic link")

    def test_hard_link(self) -> None:
        target = self.write(maildrop.encode(Drop("a@x.test", ("b@y.test",), MESSAGE)), "T")
        os.link(target, self.path())
        self.refused(self.path(), "2 names (a hard link)")

    def test_fifo(self) -> None:
        os.mkfifo(self.path())
        self.refused(self.path(), "not a regular file")

    def test_directory(self) -> None:
        os.mkdir(self.path())
        self.refused(self.path(), "not a regular file")

    def test_too_big_is_not_read(self) -> None:
        path = self.write(b"")
        os.truncate(path, 10 ** 9)  # sparse: reading it would take a while
        self.refused(path, "more than a message of 1000 octets needs")

    def test_garbage(self) -> None:
        self.refused(self.write(b"\x00" * 100), "not a maildrop file")


class PickupTests(unittest.TestCase):

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        self.config = make_config(base)
        self.clock = Clock()
        self.clock.advance(1796334547)
        self.spool = Spool(self.config.spool, run_inline)
        self.spool.create()
        self.maildrop = prepare_maildrop(self.spool.path)
        self.queued = []
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.service = None

    def start(self, check=None) -> PickupService:
        self.service = PickupService(self.config, self.spool, self.clock, run_inline,
                                     self.queued.append, check=check,
                                     wall=lambda: self.clock.seconds())
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service

    def drop(self, drop: Drop | bytes, name: str | None = None) -> str:
        name = name or maildrop.drop_name(self.clock.seconds())
        with open(os.path.join(self.maildrop, name), "wb") as f:
            f.write(maildrop.encode(drop) if isinstance(drop, Drop) else drop)
        return name

    def named(self, event: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == event]

    def test_picked_up_at_start_and_each_second(self) -> None:
        self.drop(Drop("cron@mx.example.test", ("info@example.test", "x@remote.test"), MESSAGE))
        self.start()
        [envelope] = self.queued
        self.assertEqual([(r.address, r.original) for r in envelope.recipients], [
            ("alice@example.test", "info@example.test"), ("bob@example.test", "info@example.test"),
            ("x@remote.test", None)])
        self.assertEqual(envelope.sender, "cron@mx.example.test")
        self.assertEqual(envelope.client["protocol"], "sendmail")
        self.assertEqual(envelope.client["uid"], str(os.getuid()))
        self.assertEqual(os.listdir(self.maildrop), [])
        with open(os.path.join(self.spool.path, "new", envelope.queue_id), "rb") as f:
            data = f.read()
        header, offset = from_header(data)
        self.assertEqual(header.queue_id, envelope.queue_id)
        self.assertEqual(envelope.file_size, len(data))
        self.assertTrue(data[offset:].startswith(
            f"Received: by mx.example.test (twisted-mta pickup, from userid {os.getuid()} "
            f"({user_name(os.getuid())}))\r\n\tid {envelope.queue_id}; ".encode()), data)
        self.assertTrue(data.endswith(MESSAGE))
        [accepted] = self.named("pickup.accepted")
        self.assertEqual(accepted["queue_id"], envelope.queue_id)
        self.assertEqual(accepted["uid"], os.getuid())

        self.drop(Drop("", ("bob@example.test",), MESSAGE))
        self.clock.advance(0.5)
        self.assertEqual(len(self.queued), 1)
        self.clock.advance(0.5)
        self.assertEqual(len(self.queued), 2)
        self.assertEqual(self.queued[1].sender, "")

    def test_queue_show_names_the_user(self) -> None:
        import io
        import sys
        from twisted_mta import cli
        self.drop(Drop("a@x.test", ("x@remote.test",), MESSAGE))
        self.start()
        config = os.path.join(os.path.dirname(self.config.spool), "test.toml")
        with open(config, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\n')
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertEqual(cli.main(["queue", "show", self.queued[0].queue_id, "-c", config]), 0)
        self.assertIn(f"From:          uid {os.getuid()} ({user_name(os.getuid())}) via the "
                      "sendmail command\n", out.getvalue())

    def test_unknown_local_user_is_kept_for_a_dsn(self) -> None:
        self.drop(Drop("a@x.test", ("nobody@example.test",), MESSAGE))
        self.start()
        self.assertEqual([r.address for r in self.queued[0].recipients], ["nobody@example.test"])

    def test_smtputf8(self) -> None:
        self.drop(Drop("jöran@x.test", ("zoë@remote.test",), MESSAGE, smtputf8=True))
        self.start()
        [envelope] = self.queued
        self.assertTrue(envelope.smtputf8)
        self.assertEqual((envelope.sender, envelope.recipients[0].address),
                         ("jöran@x.test", "zoë@remote.test"))

    def test_dsn_requests(self) -> None:
        self.drop(Drop("a@x.test", ("info@example.test",), MESSAGE, notify=("SUCCESS",),
                       ret="HDRS", envid="job 7"))
        self.start()
        [envelope] = self.queued
        self.assertEqual((envelope.ret, envelope.envid), ("HDRS", "job 7"))
        self.assertEqual([r.notify for r in envelope.recipients], [("SUCCESS",)] * 2)

    def test_tls_required_no(self) -> None:
        self.drop(Drop("a@x.test", ("x@remote.test",), b"TLS-Required: No\r\n\r\nhi\r\n"))
        self.start()
        self.assertTrue(self.queued[0].tls_required_no)

    def test_bad_drops_are_set_aside(self) -> None:
        good = self.drop(Drop("a@x.test", ("bob@example.test",), MESSAGE), "B")
        [self.drop(b"garbage", "A1"), self.drop(b"x", "bad-name"),
               self.drop(maildrop.encode(Drop("a@x.test", ("b@y.test",), MESSAGE))[:-3], "A2")]
        os.symlink("/etc/passwd", os.path.join(self.maildrop, "A3"))
        os.mkdir(os.path.join(self.maildrop, "A4"))
        self.start()
        self.assertEqual(len(self.queued), 1)
        self.assertNotIn(good, os.listdir(self.maildrop))
        self.assertEqual(os.listdir(self.maildrop), [])
        corrupt = sorted(os.listdir(os.path.join(self.spool.path, "corrupt")))
        self.assertEqual(corrupt, ["maildrop-A1", "maildrop-A2", "maildrop-A3", "maildrop-A4",
                                   "maildrop-bad_name"])
        rejected = {e["drop"]: e["why"] for e in self.named("pickup.rejected")}
        self.assertEqual(set(rejected), {"A1", "A2", "A3", "A4", "bad-name"})
        self.assertIn("not a maildrop file", rejected["A1"])
        self.assertIn("says", rejected["A2"])
        self.assertIn("symbolic link", rejected["A3"])
        self.assertIn("not a regular file", rejected["A4"])
        self.assertIn("not letters and digits", rejected["bad-name"])
        # the passwd file was not read into the queue, nor moved
        self.assertTrue(os.path.exists("/etc/passwd"))

    def test_a_name_seen_again_in_corrupt(self) -> None:
        self.drop(b"garbage", "A1")
        self.start()
        self.drop(b"garbage", "A1")
        self.clock.advance(1)
        self.assertEqual(sorted(os.listdir(os.path.join(self.spool.path, "corrupt"))),
                         ["maildrop-A1", "maildrop-A1.1"])

    def test_debris(self) -> None:
        old = self.drop(b"half", ".OLD")
        young = self.drop(b"half", ".YOUNG")
        now = self.clock.seconds()
        os.utime(os.path.join(self.maildrop, old), (now - DEBRIS_AGE - 1,) * 2)
        os.utime(os.path.join(self.maildrop, young), (now - 60,) * 2)
        self.start()
        self.assertEqual(os.listdir(self.maildrop), [".YOUNG"])
        self.assertEqual(self.queued, [])
        self.assertEqual([e["name"] for e in self.named("pickup.debris")], [".OLD"])

    def test_check_hook_may_change_or_refuse(self) -> None:
        seen = []

        def check(picked: PickedUp):
            seen.append(picked)
            if picked.drop.sender == "spam@x.test":
                return defer.fail(DropRefused("no spam"))
            drop = Drop(picked.drop.sender, picked.drop.recipients,
                        b"X-Checked: yes\r\n" + picked.drop.message)
            return defer.succeed(PickedUp(picked.name, drop, picked.uid, picked.user))

        self.drop(Drop("a@x.test", ("bob@example.test",), MESSAGE), "A")
        self.drop(Drop("spam@x.test", ("bob@example.test",), MESSAGE), "B")
        self.start(check)
        self.assertEqual([p.name for p in seen], ["A", "B"])
        self.assertEqual(len(self.queued), 1)
        with open(os.path.join(self.spool.path, "new", self.queued[0].queue_id), "rb") as f:
            self.assertIn(b"X-Checked: yes\r\n", f.read())
        [rejected] = self.named("pickup.rejected")
        self.assertEqual(rejected["why"], "refused: no spam")

    def test_a_failed_commit_leaves_the_drop(self) -> None:
        self.drop(Drop("a@x.test", ("bob@example.test",), MESSAGE))
        self.start()
        self.assertEqual(len(self.queued), 1)
        name = self.drop(Drop("a@x.test", ("bob@example.test",), MESSAGE))
        real = os.rename

        def failing(src, dst):
            if "/tmp/" in src:
                raise OSError(28, "No space left on device")
            return real(src, dst)
        self.patch(os, "rename", failing)
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(os.listdir(self.maildrop), [name])
        self.assertEqual(len(self.queued), 1)
        [error] = self.named("pickup.error")  # once, not once a second
        self.assertEqual(error["error"], "No space left on device")
        self.patch(os, "rename", real)
        self.clock.advance(1)
        self.assertEqual(os.listdir(self.maildrop), [])
        self.assertEqual(len(self.queued), 2)

    def test_maildrop_removed_is_made_again(self) -> None:
        self.start()
        os.rmdir(self.maildrop)
        self.clock.advance(1)
        self.assertEqual(stat.S_IMODE(os.stat(self.maildrop).st_mode), MODE)
        self.assertEqual(len(self.named("pickup.error")), 1)
        self.drop(Drop("a@x.test", ("bob@example.test",), MESSAGE))
        self.clock.advance(1)
        self.assertEqual(len(self.queued), 1)

    def test_unreadable_maildrop_logged_once(self) -> None:
        self.start()
        real = os.scandir

        def refused(path):
            raise PermissionError(13, "Permission denied", path)
        self.patch(os, "scandir", refused)
        for _ in range(5):
            self.clock.advance(1)
        [error] = self.named("pickup.error")
        self.assertEqual(error["error"], "Permission denied")
        self.patch(os, "scandir", real)
        self.drop(Drop("a@x.test", ("bob@example.test",), MESSAGE))
        self.clock.advance(1)
        self.assertEqual(len(self.queued), 1)
        self.assertEqual(len(self.named("pickup.recovered")), 1)

    def test_stop(self) -> None:
        service = self.start()
        self.assertIsNone(service.stopService())
        self.drop(Drop("a@x.test", ("bob@example.test",), MESSAGE))
        self.clock.advance(5)
        self.assertEqual(self.queued, [])
