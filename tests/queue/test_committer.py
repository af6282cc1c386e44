"""
The commit helper (twisted_mta/queue/commit_helper.py, committer.py): its batch on real
files, the program itself as a real process, and the process's side
(L{Committer}) driven by hand: answers, failures, the helper ending with
messages waiting, a helper that cannot start.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys

from twisted.internet import defer, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.queue import commit_helper as helper_module
from twisted_mta.queue.commit_helper import (
    CommitError, commit_in_thread, parse_requests, run_batch,
)
from twisted_mta.queue.committer import Committer, start_committer
from twisted_mta.queue.spool import Spool


def make_spool(case: SynchronousTestCase) -> str:
    path = case.mktemp()
    for name in ("tmp", "new"):
        os.makedirs(os.path.join(path, name))
    return path


def failing_fsync_dir(path: str) -> None:
    raise OSError(errno.EIO, "Input/output error")


def occupy_tmp(spool: str, queue_id: str, data: bytes = b"someone else's") -> None:
    """A file of that name in tmp/ already (the helper's O_EXCL refuses it)."""
    with open(os.path.join(spool, "tmp", queue_id), "wb") as f:
        f.write(data)


def request(queue_id: str, data: bytes) -> bytes:
    return b"%s %d\n" % (queue_id.encode(), len(data)) + data


class BatchTests(SynchronousTestCase):
    """The helper's work on one batch, on real files."""

    def setUp(self):
        self.spool = make_spool(self)
        self.synced = []
        real = helper_module.fsync_dir
        self.patch(helper_module, "fsync_dir",
                   lambda path: (self.synced.append(path), real(path))[1])

    def content(self, state, queue_id):
        with open(os.path.join(self.spool, state, queue_id), "rb") as f:
            return f.read()

    def test_every_message_reaches_new_and_new_is_fsynced_once(self):
        answers = run_batch(self.spool, [("A1", b"one"), ("B2", b"two" * 1000)])
        self.assertEqual(answers, [b"A1 ok\n", b"B2 ok\n"])
        self.assertEqual(self.content("new", "A1"), b"one")
        self.assertEqual(self.content("new", "B2"), b"two" * 1000)
        self.assertEqual(os.listdir(os.path.join(self.spool, "tmp")), [])
        self.assertEqual(self.synced, [os.path.join(self.spool, "new")])
        self.assertEqual(os.stat(os.path.join(self.spool, "new", "A1")).st_mode & 0o777, 0o600)

    def test_one_failure_is_that_message_s_alone(self):
        occupy_tmp(self.spool, "A1")
        answers = run_batch(self.spool, [("A1", b"one"), ("B2", b"two")])
        self.assertEqual(answers, [b"A1 err %d 0\n" % errno.EEXIST, b"B2 ok\n"])
        self.assertFalse(os.path.exists(os.path.join(self.spool, "new", "A1")))
        self.assertEqual(self.content("new", "B2"), b"two")

    def test_a_failed_directory_fsync_fails_every_renamed_message(self):
        self.patch(helper_module, "fsync_dir", failing_fsync_dir)
        answers = run_batch(self.spool, [("A1", b"one"), ("B2", b"two")])
        self.assertEqual(answers, [b"A1 err %d 1\n" % errno.EIO, b"B2 err %d 1\n" % errno.EIO])

    def test_a_failed_directory_fsync_leaves_an_earlier_failure_as_it_was(self):
        occupy_tmp(self.spool, "A1")
        self.patch(helper_module, "fsync_dir", failing_fsync_dir)
        answers = run_batch(self.spool, [("A1", b"one"), ("B2", b"two")])
        self.assertEqual(answers, [b"A1 err %d 0\n" % errno.EEXIST, b"B2 err %d 1\n" % errno.EIO])

    def test_nothing_renamed_no_directory_fsync(self):
        os.rmdir(os.path.join(self.spool, "tmp"))
        answers = run_batch(self.spool, [("A1", b"one")])
        self.assertEqual(answers, [b"A1 err %d 0\n" % errno.ENOENT])
        self.assertEqual(self.synced, [])

    def test_requests_are_parsed_whole_or_left_for_later(self):
        whole = request("A1", b"one\ntwo") + request("B2", b"")
        batch, rest = parse_requests(whole + b"C3 10\nabc")
        self.assertEqual(batch, [("A1", b"one\ntwo"), ("B2", b"")])
        self.assertEqual(rest, b"C3 10\nabc")
        self.assertEqual(parse_requests(b"C3 1"), ([], b"C3 1"))


class ThreadFallbackTests(SynchronousTestCase):
    """L{commit_in_thread}: the helper's work again, after it ended."""

    def setUp(self):
        self.spool = make_spool(self)

    def test_a_partial_file_is_written_again(self):
        occupy_tmp(self.spool, "A1", b"on")
        commit_in_thread(self.spool, "A1", b"one")
        with open(os.path.join(self.spool, "new", "A1"), "rb") as f:
            self.assertEqual(f.read(), b"one")
        self.assertEqual(os.listdir(os.path.join(self.spool, "tmp")), [])

    def test_an_entry_renamed_already_is_left_as_it_is(self):
        with open(os.path.join(self.spool, "new", "A1"), "wb") as f:
            f.write(b"one")
        synced = []
        self.patch(helper_module, "fsync_dir", synced.append)
        commit_in_thread(self.spool, "A1", b"not written again")
        with open(os.path.join(self.spool, "new", "A1"), "rb") as f:
            self.assertEqual(f.read(), b"one")
        self.assertEqual(synced, [os.path.join(self.spool, "new")])

    def test_a_failed_directory_fsync_says_the_file_was_renamed(self):
        self.patch(helper_module, "fsync_dir", failing_fsync_dir)
        e = self.assertRaises(CommitError, commit_in_thread, self.spool, "A1", b"one")
        self.assertTrue(e.renamed)
        self.assertEqual(e.errno, errno.EIO)


class HelperProgramTests(SynchronousTestCase):
    """The helper as the MTA starts it: a process of its own."""

    def test_commits_what_it_is_sent_and_ends_when_its_input_closes(self):
        spool = make_spool(self)
        helper = subprocess.Popen([sys.executable, "-m", "twisted_mta.queue.commit_helper", spool],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = helper.communicate(request("A1", b"one") + request("B2", b"two"), timeout=30)
        self.assertEqual(helper.returncode, 0)
        self.assertEqual(out, b"A1 ok\nB2 ok\n")
        self.assertEqual(sorted(os.listdir(os.path.join(spool, "new"))), ["A1", "B2"])

    def test_it_loads_no_twisted(self):
        # Each MTA process has one: it must stay small (about 14 MB
        # resident; 30 with Twisted imported).
        run = subprocess.run([sys.executable, "-c",
                              "import sys, twisted_mta.queue.commit_helper;"
                              "print(sorted(m for m in sys.modules if m.startswith(('twisted.', 'attr'))))"],
                             capture_output=True, timeout=30, text=True)
        self.assertEqual(run.stdout.strip(), "[]", run.stderr)

    def test_without_a_spool_it_says_how_to_run_it(self):
        run = subprocess.run([sys.executable, "-m", "twisted_mta.queue.commit_helper"],
                             capture_output=True, timeout=30)
        self.assertEqual(run.returncode, 2)
        self.assertIn(b"usage", run.stderr)


class FakeTransport:
    def __init__(self):
        self.written = b""
        self.stdin_closed = False

    def write(self, data):
        self.written += data

    def closeStdin(self):
        self.stdin_closed = True


class CommitterTests(SynchronousTestCase):
    """L{Committer} with a helper driven by hand and the threads run inline."""

    def setUp(self):
        self.spool = make_spool(self)
        self.clock = task.Clock()
        self.started = []
        self.spawn_fails = False
        self.in_thread = []
        self.events = []
        from twisted.logger import globalLogPublisher
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

        def spawn(helper, args):
            if self.spawn_fails:
                raise OSError(errno.ENOENT, "No such file or directory")
            transport = FakeTransport()
            self.started.append((helper, args, transport))
            return transport

        def run_blocking(f, *args):
            self.in_thread.append(args[1])
            return defer.maybeDeferred(f, *args)

        self.committer = Committer(self.spool, spawn, run_blocking, self.clock)

    def answer(self, line):
        self.started[-1][0].outReceived(line)

    def test_the_first_commit_starts_the_helper_with_this_interpreter(self):
        d = self.committer.commit("A1", b"one")
        helper, args, transport = self.started[0]
        self.assertEqual(args, [sys.executable, "-m", "twisted_mta.queue.commit_helper", self.spool])
        self.assertEqual(transport.written, request("A1", b"one"))
        self.assertNoResult(d)
        self.committer.commit("B2", b"two")
        self.assertEqual(len(self.started), 1)
        self.answer(b"A1 ok\nB")
        self.assertIsNone(self.successResultOf(d))
        self.answer(b"2 ok\n")
        self.assertEqual(self.in_thread, [])

    def test_a_failure_says_whether_the_file_was_renamed(self):
        d1 = self.committer.commit("A1", b"one")
        d2 = self.committer.commit("B2", b"two")
        self.answer(b"B2 err 5 1\nA1 err 28 0\n")
        e1 = self.failureResultOf(d1, CommitError).value
        e2 = self.failureResultOf(d2, CommitError).value
        self.assertEqual((e1.errno, e1.renamed), (errno.ENOSPC, False))
        self.assertEqual((e2.errno, e2.renamed), (errno.EIO, True))

    def test_a_helper_that_ends_leaves_its_messages_to_the_threads(self):
        d1 = self.committer.commit("A1", b"one")
        d2 = self.committer.commit("B2", b"two")
        # The helper had renamed B2 before it was killed.
        with open(os.path.join(self.spool, "new", "B2"), "wb") as f:
            f.write(b"two")
        self.answer(b"A1")  # half an answer, then it ends
        self.started[0][0].processEnded(Failure(Exception("killed by signal 9")))
        self.assertIsNone(self.successResultOf(d1))
        self.assertIsNone(self.successResultOf(d2))
        self.assertEqual(sorted(self.in_thread), ["A1", "B2"])
        self.assertEqual(sorted(os.listdir(os.path.join(self.spool, "new"))), ["A1", "B2"])
        down = [e for e in self.events if e.get("event") == "queue.committer_down"]
        self.assertEqual(len(down), 1)
        # The threads commit until the helper is due again, then a new one.
        self.successResultOf(self.committer.commit("C3", b"three"))
        self.assertEqual(len(self.started), 1)
        self.clock.advance(Committer.RESTART_AFTER)
        d4 = self.committer.commit("D4", b"four")
        self.assertEqual(len(self.started), 2)
        self.answer(b"D4 ok\n")
        self.successResultOf(d4)

    def test_an_old_helper_s_last_words_are_ignored(self):
        self.committer.commit("A1", b"one")
        old = self.started[0][0]
        old.processEnded(Failure(Exception("ended")))
        old.outReceived(b"A1 err 5 0\n")  # too late: the threads did it
        self.assertEqual(os.listdir(os.path.join(self.spool, "new")), ["A1"])

    def test_a_helper_that_cannot_start_leaves_the_work_to_the_threads(self):
        self.spawn_fails = True
        self.successResultOf(self.committer.commit("A1", b"one"))
        self.assertEqual(self.in_thread, ["A1"])
        self.assertEqual([e.get("event") for e in self.events
                          if e.get("event", "").startswith("queue.committer")],
                         ["queue.committer_down"])

    def test_stop_closes_the_helper_s_input_and_the_threads_commit_after(self):
        self.committer.commit("A1", b"one")
        transport = self.started[0][2]
        self.committer.stop()
        self.assertTrue(transport.stdin_closed)
        # It ends without answering: the threads commit, and nothing is
        # said (the MTA is stopping).
        self.started[0][0].processEnded(Failure(Exception("ended")))
        self.assertEqual(self.in_thread, ["A1"])
        self.assertEqual([e for e in self.events if e.get("event") == "queue.committer_down"], [])
        self.successResultOf(self.committer.commit("B2", b"two"))
        self.assertEqual(len(self.started), 1)

    def test_after_stop_the_threads_commit_even_before_the_helper_ends(self):
        self.committer.commit("A1", b"one")
        self.committer.stop()
        self.successResultOf(self.committer.commit("B2", b"two"))
        self.assertEqual(self.in_thread, ["B2"])
        self.assertEqual(self.started[0][2].written, request("A1", b"one"))


class StartTests(SynchronousTestCase):
    def test_no_committer_without_processes(self):
        from twisted.internet.testing import MemoryReactorClock
        self.assertIsNone(start_committer("/spool", MemoryReactorClock(), None))

    def test_the_helper_ends_when_the_reactor_shuts_down(self):
        from twisted.internet.interfaces import IReactorProcess
        from twisted.internet.testing import MemoryReactorClock
        from zope.interface import implementer

        @implementer(IReactorProcess)
        class Reactor(MemoryReactorClock):
            def __init__(self):
                super().__init__()
                self.triggers = []
                self.spawned = []

            def addSystemEventTrigger(self, phase, event, f, *a):
                self.triggers.append((phase, event, f))

            def spawnProcess(self, protocol, executable, args, env=None, path=None,
                             uid=None, gid=None, usePTY=0, childFDs=None):
                self.spawned.append((executable, args, childFDs))
                return FakeTransport()

        reactor = Reactor()
        committer = start_committer("/spool", reactor, None)
        self.assertEqual([(p, e) for p, e, _ in reactor.triggers], [("after", "shutdown")])
        committer.commit("A1", b"one")
        self.assertEqual(reactor.spawned[0][0], sys.executable)
        self.assertEqual(reactor.spawned[0][2], {0: "w", 1: "r", 2: 2})
        reactor.triggers[0][2]()
        self.assertTrue(committer._transport.stdin_closed)


class WriterTests(SynchronousTestCase):
    """A message's commit goes to the committer when nothing was written yet."""

    def setUp(self):
        self.spool = Spool(self.mktemp(), run_blocking=lambda f, *a: defer.maybeDeferred(f, *a))
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        self.sent = []
        self.fail_with = None
        spool = self.spool
        case = self

        class Fake:
            def commit(self, queue_id, data):
                case.sent.append((queue_id, data))
                if case.fail_with is not None:
                    if case.fail_with.renamed:  # as the helper leaves it
                        with open(os.path.join(spool.path, "new", queue_id), "wb") as f:
                            f.write(data)
                    return defer.fail(case.fail_with)
                commit_in_thread(spool.path, queue_id, data)
                return defer.succeed(None)

        self.spool.committer = Fake()

    def writer(self, body):
        from tests.queue.test_spool import envelope
        w = self.spool.new_message()
        env = envelope(w.queue_id)
        w.begin(env)
        w.write(body)
        return w, env

    def test_a_small_message_is_sent_whole_with_its_envelope_header(self):
        w, env = self.writer(b"Subject: x\r\n\r\nbody\r\n")
        result = self.successResultOf(w.commit(env))
        ((queue_id, data),) = self.sent
        self.assertEqual(queue_id, w.queue_id)
        self.assertTrue(data.startswith(env.to_header()))
        self.assertTrue(data.endswith(b"body\r\n"))
        self.assertEqual(result.file_size, len(data))
        self.assertEqual(self.spool.load(w.queue_id).sender, env.sender)

    def test_a_message_over_the_helper_s_limit_is_committed_by_the_threads(self):
        from twisted_mta.queue.spool import MessageWriter
        w, env = self.writer(b"Subject: x\r\n\r\n" + b"y" * MessageWriter.HELPER_LIMIT)
        self.successResultOf(w.commit(env))
        self.assertEqual(self.sent, [])
        self.assertTrue(os.path.exists(os.path.join(self.spool.path, "new", w.queue_id)))

    def test_a_spilled_message_is_committed_by_the_threads(self):
        from twisted_mta.queue.spool import MessageWriter
        w, env = self.writer(b"Subject: x\r\n\r\n" + b"y" * (MessageWriter.SPILL + 10))
        self.successResultOf(w.commit(env))
        self.assertEqual(self.sent, [])
        self.assertTrue(os.path.exists(os.path.join(self.spool.path, "new", w.queue_id)))

    def test_a_failure_after_the_rename_takes_the_entry_out_again(self):
        self.fail_with = CommitError(errno.EIO, True)
        w, env = self.writer(b"Subject: x\r\n\r\nbody\r\n")
        self.failureResultOf(w.commit(env), CommitError)
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "new")), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "tmp")), [])
