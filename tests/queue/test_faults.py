"""
Disk faults in the queue path (issue 11): ENOSPC and EIO injected into
every write of the spool and the Maildir delivery (L{tests.queue.faults}),
at unit level with the real spool in a temporary directory and a fake
clock.  Whatever write fails, the client gets 451 or the delivery is
deferred, and once the disk is back every entry is attempted again without
a restart and no DSN is lost.
"""

from __future__ import annotations

import errno
import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.delivery import maildir as maildir_module
from twisted_mta.model import Envelope, Recipient
from twisted_mta.queue import spool as spool_module
from twisted_mta.queue.spool import Spool
from tests.queue.faults import FaultyFS
from tests.support import make_config

from twisted.internet.task import Clock

T0 = 1_800_000_000.0


class MessageWriterFaultTests(SynchronousTestCase):
    """
    A commit that fails at any of its writes leaves nothing behind: neither
    debris in tmp/ nor an entry in new/ that nobody was told about.
    """

    def setUp(self):
        base = self.mktemp()
        self.config = make_config(base)
        self.clock = Clock()
        self.clock.advance(T0)
        self.spool = Spool(self.config.spool)
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        self.fs = FaultyFS(base, self.clock)
        self.fs.install(self, spool_module, maildir_module)

    def commit(self):
        w = self.spool.new_message()
        env = Envelope(queue_id=w.queue_id, sender="s@remote.test",
                       recipients=(Recipient(address="alice@example.test"),), arrival=T0)
        w.write(env.to_header())
        w.write(b"Subject: t\r\n\r\nhello\r\n")
        return w.commit(env)

    def test_every_commit_write_point(self):
        """Each write of a commit (create, write, fsync, rename into new/, fsync of new/) failing makes the commit fail and leaves the spool empty."""
        self.successResultOf(self.commit())
        points = list(self.fs.points)
        self.assertEqual([p.split()[0] for p in points],
                         ["create", "write", "fsync", "rename", "fsync"])
        self.spool.remove(os.listdir(os.path.join(self.spool.path, "new"))[0])
        for index, label in enumerate(points):
            for err in (errno.ENOSPC, errno.EIO):
                self.fs.points.clear()
                self.fs.arm(index, err, "once")
                failure = self.failureResultOf(self.commit(), OSError)
                self.assertEqual(failure.value.errno, err, label)
                for d in ("tmp", "new", "cur"):
                    self.assertEqual(os.listdir(os.path.join(self.spool.path, d)), [],
                                     f"{label} ({errno.errorcode[err]}): {d}/")
