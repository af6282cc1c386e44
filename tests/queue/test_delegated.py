"""
Whole attempts run by a worker (L{twisted_mta.queue.delegated}): the
queue manager hands an idle entry over and takes in the answer, the
worker's side reads, sends, records and removes with the manager's own
decisions.  Here both sides share one spool and one clock, and every
answer goes through its wire encoding.
"""

from __future__ import annotations

import os

import attrs
from twisted.internet import defer

from twisted_mta.delivery.remote import RemoteDelivery
from twisted_mta.model import Outcome
from twisted_mta.queue import delegated
from twisted_mta.queue.delegated import Answer, AnswerError, WorkerAttempts
from tests.queue.test_manager import T0, UNREACHABLE, ManagerTestBase
from tests.support import queued

OK = Outcome(250, "2.0.0", "mx said: 250 2.0.0 Ok", "mx.elsewhere.test")
NO_USER = Outcome(550, "5.1.1", "mx said: 550 5.1.1 no such user", "mx.elsewhere.test")
LATER = 1000.0  # due this long after T0: idle (IDLE_AFTER) when the manager starts


class LoopbackDelegate:
    """
    L{twisted_mta.workers.WorkerSending.attempt} in this process: the
    worker's side runs on the same spool, and its answer is encoded and
    decoded as on the pipe.  C{answer}: give this instead, doing nothing.
    """

    def __init__(self, attempts: WorkerAttempts, pool) -> None:
        self.attempts = attempts
        self.pool = pool
        self.calls: list[tuple[str, str]] = []
        self.refuse = False
        self.answer: Answer | None = None

    def attempt(self, qid: str, state: str):
        self.calls.append((qid, state))
        if self.refuse:
            return None
        if self.answer is not None:
            return defer.succeed(Answer.decode(self.answer.encode()))
        d = self.attempts.run(qid, state, self.pool)
        return d.addCallback(lambda answer: Answer.decode(answer.encode()))


class DelegatedTestBase(ManagerTestBase):
    def setUp(self):
        super().setUp()
        self.events: list = []
        self.attempts = WorkerAttempts(
            self.config, self.spool, self.clock, self.run_blocking,
            target_for=lambda pool: RemoteDelivery(pool, self.config.outbound,
                                                   self.run_blocking),
            rand=lambda: 0.5)
        self.delegate = LoopbackDelegate(self.attempts, self.outbound)

    def manager(self):
        from twisted_mta.queue.manager import QueueManager
        m = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                         self.targets(), delegate=self.delegate,
                         observers=[lambda name, event: self.events.append((name, event))])
        m.startService()
        self.addCleanup(m.stopService)
        return m

    def idle(self, rcpts, **fields):
        """An entry due at T0 + LATER, and a manager started over it: idle."""
        env = attrs.evolve(self.queue(rcpts, **fields), next_attempt=T0 + LATER)
        self.spool.update(env, "new")
        m = self.manager()
        self.assertNotIn(env.queue_id, m.entries)
        self.assertEqual(m.idle.find(env.queue_id)[1:], ("new", T0 + LATER, True))
        return m, env

    def results(self) -> list[str]:
        return [e["result"] for name, e in self.events if name == "delivery.result"]


class DelegatedAttemptTests(DelegatedTestBase):
    def test_delivered_and_removed_by_the_worker(self):
        """The worker sends, removes the entry and says so; the main process forgets it without reading it, and counts the result."""
        m, env = self.idle(["x@elsewhere.test"])
        self.outbound.outcomes = {"x@elsewhere.test": OK}
        loads = []  # the main process's reads (the worker shares the spool object)
        self.patch(m, "run_reading", lambda f, *a: loads.append(a) or self.run_blocking(f, *a))
        self.clock.advance(LATER)
        self.assertEqual(self.delegate.calls, [(env.queue_id, "new")])
        self.assertEqual(queued(m), [])
        self.assertEqual(m.states, {})
        self.assertIsNone(self.spool.state_of(env.queue_id))
        self.assertFalse(os.path.exists(self.spool.envelope_path(env.queue_id)))
        self.assertEqual(self.results(), ["delivered"])
        self.assertEqual(loads, [])

    def test_deferred_results_recorded_by_the_worker(self):
        """A deferral is written into the entry (moved to cur/) by the worker; the main process reschedules it when the worker says, still without reading it."""
        m, env = self.idle(["x@elsewhere.test"])
        self.clock.advance(LATER)
        stored = self.spool.load(env.queue_id)
        self.assertEqual((stored.attempts, stored.next_attempt), (1, T0 + LATER + 60))
        self.assertEqual(stored.recipients[0].outcome, UNREACHABLE)
        self.assertEqual(self.spool.state_of(env.queue_id), "cur")
        self.assertEqual(m.states[env.queue_id], "cur")
        self.assertIsNone(m.entries[env.queue_id])
        self.assertEqual(self.results(), ["deferred"])
        self.clock.advance(60)  # the next attempt is the worker's again, from cur/
        self.assertEqual(self.delegate.calls[-1], (env.queue_id, "cur"))
        self.assertEqual(self.spool.load(env.queue_id).attempts, 2)

    def test_an_entry_in_memory_is_not_handed_over(self):
        """Mail that flows through (its envelope in memory) is attempted here."""
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(self.delegate.calls, [])
        self.assertEqual(self.spool.load(env.queue_id).attempts, 1)

    def test_no_worker_with_room_the_main_process_attempts(self):
        m, env = self.idle(["x@elsewhere.test"])
        self.delegate.refuse = True
        self.outbound.outcomes = {"x@elsewhere.test": OK}
        self.clock.advance(LATER)
        self.assertEqual(len(self.delegate.calls), 1)
        self.assertEqual(queued(m), [])
        self.assertEqual(len(self.outbound.sent), 1)

    def test_a_local_recipient_is_declined_and_delivered_here(self):
        """The worker takes only remote recipients: the main process does the rest itself."""
        m, env = self.idle(["alice@example.test", "x@elsewhere.test"])
        self.outbound.outcomes = {"x@elsewhere.test": OK}
        self.clock.advance(LATER)
        self.assertEqual(len(self.delegate.calls), 1)
        self.assertEqual(len(self.maildir_files("alice")), 1)
        self.assertEqual(len(self.outbound.sent), 1)  # once, by the main process
        self.assertEqual(queued(m), [])
        self.assertEqual(sorted(self.results()), ["delivered", "delivered"])

    def test_a_bounce_owed_comes_back_and_the_main_process_queues_it(self):
        """The worker records nothing when a DSN is owed; the main process queues the bounce, then removes the entry."""
        m, env = self.idle(["x@elsewhere.test"], sender="alice@example.test")
        self.outbound.outcomes = {"x@elsewhere.test": NO_USER}
        self.clock.advance(LATER)
        self.assertNotIn(env.queue_id, m.entries)
        self.assertIsNone(self.spool.state_of(env.queue_id))
        self.assertEqual(len(self.maildir_files("alice")), 1)  # the bounce, delivered here
        with open(self.maildir_files("alice")[0], "rb") as f:
            self.assertIn(b"5.1.1", f.read())
        self.assertEqual(self.results(), ["failed", "delivered"])

    def test_a_write_the_worker_could_not_do_is_done_here(self):
        m, env = self.idle(["x@elsewhere.test"])

        def refused(f, *args):
            if f == self.spool.update_and_move:
                return defer.fail(OSError(28, "No space left on device"))
            return self.run_blocking(f, *args)
        self.attempts.run_blocking = refused
        self.clock.advance(LATER)
        stored = self.spool.load(env.queue_id)
        self.assertEqual((stored.attempts, stored.next_attempt), (1, T0 + LATER + 60))
        self.assertEqual(m.states[env.queue_id], "cur")
        self.assertEqual(len(self.outbound.sent), 1)  # not sent again

    def test_a_removal_the_worker_could_not_do_is_done_here(self):
        m, env = self.idle(["x@elsewhere.test"])
        self.outbound.outcomes = {"x@elsewhere.test": OK}

        def refused(qid):
            raise OSError(13, "Permission denied")
        self.patch(self.attempts, "_remove", lambda qid: defer.maybeDeferred(refused, qid))
        self.clock.advance(LATER)
        self.assertEqual(queued(m), [])
        self.assertIsNone(self.spool.state_of(env.queue_id))
        self.assertEqual(len(self.outbound.sent), 1)

    def test_a_worker_that_ended_leaves_the_entry_to_be_tried_again(self):
        """LOST: the main process looks where the file is and tries it again on the schedule."""
        m, env = self.idle(["x@elsewhere.test"])
        self.delegate.answer = Answer(delegated.LOST)
        self.clock.advance(LATER)
        self.assertEqual(m.states[env.queue_id], "new")
        self.assertEqual(m._due_at[env.queue_id], T0 + LATER + 60)
        self.delegate.answer = None
        self.outbound.outcomes = {"x@elsewhere.test": OK}
        self.clock.advance(60)
        self.assertEqual(queued(m), [])

    def test_a_worker_that_ended_after_removing_leaves_nothing_behind(self):
        m, env = self.idle(["x@elsewhere.test"])
        self.spool.remove(env.queue_id)  # what the worker did before it died
        self.delegate.answer = Answer(delegated.LOST)
        self.clock.advance(LATER)
        self.assertEqual((m.entries, m.states), ({}, {}))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_vanished_file(self):
        m, env = self.idle(["x@elsewhere.test"])
        self.spool.remove(env.queue_id)
        self.clock.advance(LATER)
        self.assertEqual(self.delegate.calls, [(env.queue_id, "new")])
        self.assertEqual(queued(m), [])
        self.assertEqual(self.outbound.sent, [])

    def test_a_crash_in_delivery_defers(self):
        """A delivery target that raises (a bug) defers the recipients, as in the main process."""
        m, env = self.idle(["x@elsewhere.test"])

        def broken(hop, txn):
            raise RuntimeError("bug")
        self.patch(self.outbound, "deliver", broken)
        self.clock.advance(LATER)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        stored = self.spool.load(env.queue_id)
        self.assertEqual((stored.attempts, stored.recipients[0].outcome.kind),
                         (1, "internal"))
        self.assertEqual(self.results(), ["deferred"])


class AnswerTests(DelegatedTestBase):
    def test_round_trip(self):
        env = self.queue(["x@elsewhere.test"])
        for answer in [Answer(delegated.REMOVED, results=(("delivered", 1.5),)),
                       Answer(delegated.STORED, state="cur", next_attempt=T0 + 60,
                              results=(("deferred", 0.25),)),
                       Answer(delegated.BACK, state="new", envelope=env, new=frozenset({0})),
                       Answer(delegated.DECLINED), Answer(delegated.GONE)]:
            line = answer.encode()
            self.assertNotIn(b"\n", line)
            self.assertEqual(Answer.decode(line), answer)

    def test_garbage(self):
        for line in [b"", b"[]", b'{"k":"eaten","r":[]}', b'{"k":"stored"}',
                     b'{"k":"back","r":[],"e":"{}"}', b'{"k":"stored","r":[["x"]]}',
                     b'{"k":"stored","r":[],"t":1.0}', b'{"k":"stored","r":[],"s":"cur"}',
                     b'{"k":"stored","r":[],"s":"../etc","t":1.0}',
                     b'{"k":"removed","r":[],"s":"cur","t":1.0}']:
            self.assertRaises(AnswerError, Answer.decode, line)
