"""
Local delivery and what crashed writers leave behind (issue 11): files in
a Maildir's tmp/ untouched for 36 hours are removed, once per process per
Maildir, at its first delivery; and a queue file whose length is not the
one recorded is not delivered cut short (F9).
"""

from __future__ import annotations

import os
import time

import attrs
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.delivery import maildir
from twisted_mta.delivery.maildir import LocalTarget, clean_tmp, deliver
from twisted_mta.model import Envelope, EnvelopeError, Recipient

HOUR = 3600


class CleanTmpTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.maildir = os.path.abspath(self.mktemp())
        maildir.ensure_maildir(self.maildir)
        self.tmp = os.path.join(self.maildir, "tmp")

    def make(self, name: str, age_hours: float | None = None) -> str:
        """
        A file in tmp/; with C{age_hours}, read and written that long
        before the real now (its ctime stays the real now).
        """
        path = os.path.join(self.tmp, name)
        with open(path, "wb") as f:
            f.write(b"partial")
        if age_hours is not None:
            then = time.time() - age_hours * HOUR
            os.utime(path, (then, then))
        return path

    def test_old_files_removed_recent_kept(self) -> None:
        """Files nobody touched for more than 36 hours go; younger ones, directories and links stay."""
        self.make("old")
        self.make("recent")
        os.mkdir(os.path.join(self.tmp, "adir"))
        os.symlink("/nonexistent", os.path.join(self.tmp, "alink"))
        # 37 hours from now, "old" and "recent" were last touched 37 hours
        # ago, unless touched meanwhile:
        later = time.time() + 37 * HOUR
        os.utime(os.path.join(self.tmp, "recent"), (later - HOUR, later - HOUR))
        self.assertEqual(clean_tmp(self.maildir, now=later), 1)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["adir", "alink", "recent"])

    def test_nothing_young_is_touched(self) -> None:
        """Right now, nothing in tmp/ is 36 hours old (atime and mtime set back do not count: the ctime says it was touched)."""
        self.make("a", age_hours=48)
        self.make("b")
        self.assertEqual(clean_tmp(self.maildir), 0)
        self.assertEqual(sorted(os.listdir(self.tmp)), ["a", "b"])

    def test_missing_tmp(self) -> None:
        """A Maildir without tmp/ (not made yet) is no error."""
        self.assertEqual(clean_tmp(os.path.join(self.maildir, "nothing")), 0)


class DeliveryCleansOnceTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.msg = os.path.join(self.base, "queued")
        self.env = Envelope(queue_id="Q1", sender="s@remote.test",
                            recipients=(Recipient("alice@example.test"),
                                        Recipient("bob@example.test")),
                            arrival=1_800_000_000.25)
        with open(self.msg, "wb") as f:
            f.write(self.env.to_header() + b"Subject: hi\r\n\r\nbody\r\n")
        self.patch(maildir, "_cleaned", set())
        self.cleaned: list[str] = []
        self.patch(maildir, "clean_tmp", lambda path, now=None: self.cleaned.append(path) or 0)

    def target(self, index: int, user: str) -> LocalTarget:
        return LocalTarget(index=index, address=f"{user}@example.test",
                           maildir=os.path.join(self.base, user, "Maildir"))

    def test_first_delivery_per_maildir(self) -> None:
        """Each Maildir's tmp/ is cleaned at its first delivery in the process, and not again."""
        targets = [self.target(0, "alice"), self.target(1, "bob")]
        deliver(self.msg, self.env, targets, "mx.example.test")
        deliver(self.msg, self.env, targets, "mx.example.test", recovering=True)
        self.assertEqual(sorted(self.cleaned), sorted(t.maildir for t in targets))

    def test_cut_short_queue_file_not_delivered(self) -> None:
        """F9: a queue file whose length is not the envelope's recorded one is refused before any copy is made."""
        env = attrs.evolve(self.env, file_size=os.path.getsize(self.msg))
        os.truncate(self.msg, os.path.getsize(self.msg) - 3)
        with self.assertRaises(EnvelopeError):
            deliver(self.msg, env, [self.target(0, "alice")], "mx.example.test")
        self.assertFalse(os.path.exists(os.path.join(self.base, "alice")))
