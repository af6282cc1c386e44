"""
The top service (tap.MTAService): a child whose start raises stops twistd
with one line and exit status 1, after stopping what had started (the
thread pool above all, whose threads would keep the process alive), telling
a daemonizing parent through twistd's status pipe and removing its pid
file.  End to end under twistd: tests/interop/test_startup_recovery.py.
"""

from __future__ import annotations

import errno
import os

from twisted.application import service
from twisted.internet import error
from twisted.logger import globalLogPublisher
from twisted.python import threadpool
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import tap
from twisted_mta.queue.spool import SpoolError


class Child(service.Service):
    def __init__(self, name, events, fail_start=None, fail_bind=None):
        self.setName(name)
        self.events = events
        self.fail_start = fail_start
        self.fail_bind = fail_bind

    def privilegedStartService(self):
        self.events.append(("bind", self.name))
        if self.fail_bind:
            raise self.fail_bind

    def startService(self):
        self.events.append(("start", self.name))
        if self.fail_start:
            raise self.fail_start
        service.Service.startService(self)

    def stopService(self):
        self.events.append(("stop", self.name))
        service.Service.stopService(self)


class MTAServiceTests(SynchronousTestCase):

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def build(self, *children):
        top = tap.MTAService()
        for child in children:
            child.setServiceParent(top)
        return top

    def failures(self):
        return [e["line"] for e in self.logged if e.get("event") == "startup.failed"]

    def test_a_child_that_raises_stops_everything(self):
        """The manager's start raising: exit 1, one critical line naming it and the error, every started child stopped (last started first), later children never started."""
        events = []
        boom = OSError(errno.EIO, "Input/output error", "/spool/new")
        top = self.build(Child("pool", events), Child("queue-manager", events, fail_start=boom),
                         Child("listener", events))
        top.privilegedStartService()
        with self.assertRaises(SystemExit) as cm:
            top.startService()
        self.assertEqual(cm.exception.code, 1)
        self.assertEqual(events, [("bind", "pool"), ("bind", "queue-manager"),
                                  ("bind", "listener"), ("start", "pool"),
                                  ("start", "queue-manager"), ("stop", "pool")])
        self.assertEqual(self.failures(), ["twistd: start-up failed: queue-manager cannot start: "
                                           "/spool/new: Input/output error"])
        self.assertFalse(top.running)

    def test_a_listener_that_cannot_listen(self):
        """A listener failing to bind (privilegedStartService): exit 1, one line, nothing started."""
        events = []
        taken = error.CannotListenError("127.0.0.1", 25, OSError(errno.EADDRINUSE, "in use"))
        top = self.build(Child("pool", events), Child("listener-mx", events, fail_bind=taken))
        with self.assertRaises(SystemExit):
            top.privilegedStartService()
        self.assertEqual(events, [("bind", "pool"), ("bind", "listener-mx")])
        [line] = self.failures()
        self.assertTrue(line.startswith("twistd: start-up failed: listener-mx cannot start: "
                                        "Couldn't listen on 127.0.0.1:25"), line)

    def test_thread_pool_stopped(self):
        """The real thread pool service is stopped, its threads gone, so the process can exit."""
        pool = threadpool.ThreadPool(minthreads=2, maxthreads=2, name="test-io")
        top = self.build(tap.ThreadPoolService(pool),
                         Child("queue-manager", [], fail_start=RuntimeError("a bug")))
        with self.assertRaises(SystemExit):
            top.startService()
        self.assertFalse(pool.started)
        self.assertFalse([t for t in pool.threads if t.is_alive()])
        self.assertEqual(self.failures(), ["twistd: start-up failed: queue-manager cannot start: "
                                           "RuntimeError: a bug"])

    def test_daemonized_parent_told_and_pidfile_removed(self):
        """Daemonized, twistd's waiting parent reads '1 <the line>' from the status pipe (it prints it and exits 1); our pid file is removed, someone else's is not."""
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        pidfile = self.mktemp()
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
        top = self.build(Child("queue-manager", [], fail_start=SpoolError("spool is broken")))
        top.twistd_config = {"statusPipe": write, "pidfile": pidfile}
        with self.assertRaises(SystemExit):
            top.startService()
        self.assertEqual(os.read(read, 200),
                         b"1 twistd: start-up failed: queue-manager cannot start: spool is broken")
        self.assertFalse(os.path.exists(pidfile))
        with open(pidfile, "w") as f:
            f.write("1\n")
        top = self.build(Child("queue-manager", [], fail_start=RuntimeError("x")))
        top.twistd_config = {"pidfile": pidfile}
        with self.assertRaises(SystemExit):
            top.startService()
        self.assertTrue(os.path.exists(pidfile))

    def test_a_good_start(self):
        """Nothing raises: every child started, nothing logged."""
        events = []
        top = self.build(Child("a", events), Child("b", events))
        top.privilegedStartService()
        top.startService()
        self.assertTrue(top.running)
        self.assertEqual(self.failures(), [])
