"""
A worker's sending side (L{twisted_mta.outbound.sender.Sender}), with a
clock and a recording pool: each transaction from the main process is
sent with the message read from its queue file and answered with its
outcomes (or "gone"); what the pool's attempts learn of a domain's TLS
and what they tell observers goes up; the operator's requests come down;
at SIGTERM what is under way may finish, and is never cut short.
"""

from __future__ import annotations

import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import OutboundSettings
from twisted_mta.outbound import sender as sender_module, wire
from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound import message as outgoing
from twisted_mta.outbound.message import OutgoingMessage, QueuedMessage
from twisted_mta.outbound.router import next_hops
from twisted_mta.model import Envelope, Outcome, Recipient
from twisted_mta.tls.history import HistoryEntry

OK = Outcome(250, "2.0.0", "ok", "mx.dest.test", kind="reply")
LOAD = outgoing.load  # before SenderTests patches it


class RecordingPool:
    def __init__(self, observers, history) -> None:
        self.observers = observers
        self.history = history
        self.calls: list = []
        self.revived = 0
        self.stopped = False

    def deliver(self, hop, txn) -> defer.Deferred:
        d = defer.Deferred()
        self.calls.append((hop, txn, d))
        return d

    def revive(self) -> None:
        self.revived += 1

    def stop(self) -> None:
        self.stopped = True


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.lines: list[bytes] = []
        self.pools: list[RecordingPool] = []
        self.loaded: list[str] = []

        def load(path, expect=None):
            self.loaded.append(path)
            if path.endswith("missing"):
                raise FileNotFoundError(path)
            return OutgoingMessage(path=path, offset=0, size=3, eight_bit=False, data=None,
                                   body=b"hi\n")
        self.patch(sender_module.outgoing, "load", load)

        def make_pool(observers, history):
            self.pools.append(RecordingPool(observers, history))
            return self.pools[-1]
        self.sender = sender_module.Sender(self.clock, self.lines.append, make_pool,
                                           OutboundSettings())

    def request(self, n: int, addresses=("a@dest.test", "b@dest.test"),
                path: str = "/spool/cur/Q1") -> bytes:
        (hop, addrs), = next_hops(list(addresses)).items()
        message = OutgoingMessage(path=path, offset=0, size=3, eight_bit=False, data=None)
        return b"send %d " % n + wire.encode_send(hop, Transaction("s@src.test", addrs, message,
                                                                   queue_id="Q1"))

    def answers(self) -> list[tuple[bytes, int, dict | None]]:
        out = []
        for line in self.lines:
            words = line.rstrip(b"\n").split(b" ", 2)
            if words[0] in (b"sent", b"gone"):
                out.append((words[0], int(words[1]),
                            wire.decode_outcomes(words[2]) if len(words) == 3 else None))
        return out

    def test_sends_and_answers(self) -> None:
        self.sender.line(self.request(7))
        self.assertEqual(len(self.pools), 1)  # built at the first transaction
        (hop, txn, d), = self.pools[0].calls
        self.assertEqual((hop.domain, txn.recipients, txn.queue_id),
                         ("dest.test", ("a@dest.test", "b@dest.test"), "Q1"))
        self.assertEqual(txn.message.body, b"hi\n")  # read here, from the path
        self.assertEqual(self.loaded, ["/spool/cur/Q1"])
        self.assertEqual(self.answers(), [])
        d.callback({"a@dest.test": OK, "b@dest.test": OK})
        self.assertEqual(self.answers(), [(b"sent", 7, {"a@dest.test": OK, "b@dest.test": OK})])
        self.assertEqual(self.sender.pending, {})
        self.sender.line(self.request(8))
        self.assertEqual(len(self.pools), 1)  # and kept

    def test_gone(self) -> None:
        self.sender.line(self.request(3, path="/spool/cur/missing"))
        self.assertEqual(self.answers(), [(b"gone", 3, None)])
        self.assertEqual(self.pools[0].calls, [])

    def test_an_unread_message_is_checked_as_it_is_read(self) -> None:
        """
        A message the main process handed over unread comes with the
        lengths its envelope records: the worker reads it and sends it
        when they agree, and answers "message-unreadable" for every
        recipient when the file was truncated since it was accepted.
        """
        self.patch(sender_module.outgoing, "load", LOAD)
        path = self.mktemp()
        body = b"Subject: x\r\n\r\nhello\r\n"
        header = Envelope(queue_id="Q1", sender="s@src.test", arrival=1.0, size=len(body),
                          recipients=(Recipient("a@dest.test"),)).to_header()
        with open(path, "wb") as f:
            f.write(header + body)
        (hop, addrs), = next_hops(["a@dest.test"]).items()

        def send(n: int, queued: QueuedMessage) -> None:
            self.sender.line(b"send %d " % n + wire.encode_send(
                hop, Transaction("s@src.test", addrs, queued, queue_id="Q1")))

        send(1, QueuedMessage(path, len(header) + len(body), len(body)))
        (_, txn, d), = self.pools[0].calls
        self.assertEqual(txn.message.body, body)
        d.callback({"a@dest.test": OK})
        send(2, QueuedMessage(path, len(header) + len(body) + 10, len(body) + 10))
        self.assertEqual(len(self.pools[0].calls), 1)  # not sent
        (_, _, first), (verb, n, outcomes) = self.answers()
        self.assertEqual(first, {"a@dest.test": OK})
        self.assertEqual((verb, n, outcomes["a@dest.test"].kind),
                         (b"sent", 2, "message-unreadable"))
        self.assertIn("octets long", outcomes["a@dest.test"].text)

    def test_a_pool_that_fails_answers_for_every_recipient(self) -> None:
        self.sender.line(self.request(4))
        self.pools[0].calls[0][2].errback(RuntimeError("bug"))
        (verb, n, outcomes), = self.answers()
        self.assertEqual((verb, n, sorted(outcomes)), (b"sent", 4, ["a@dest.test",
                                                                    "b@dest.test"]))
        self.assertEqual({o.code for o in outcomes.values()}, {451})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_a_pool_that_cannot_be_built(self) -> None:
        def broken(observers, history):
            raise ValueError("no plugin x")
        sender = sender_module.Sender(self.clock, self.lines.append, broken, OutboundSettings())
        sender.line(self.request(5))
        sender.line(self.request(6))
        answers = self.answers()
        self.assertEqual([(v, n) for v, n, _ in answers], [(b"sent", 5), (b"sent", 6)])
        self.assertIn("no plugin x", answers[0][2]["a@dest.test"].text)
        # the main process is told once to hand this worker nothing more
        self.assertEqual(self.lines.count(b"cannot-send\n"), 1)

    def test_events_and_history_go_up(self) -> None:
        self.sender.line(self.request(1))
        pool = self.pools[0]
        pool.observers[0]("tls.session", {"verified": True, "peer": "mx"})
        pool.history.record_success("Dest.Test", "verified")
        pool.history.record_success("dest.test", "encrypted")  # the best stays: not told
        pool.history.record_failure("dest.test", "handshake-failed")
        ups = [line for line in self.lines if not line.startswith(b"sent")]
        self.assertEqual(wire.decode_event(ups[0][len(b"event "):-1]),
                         ("tls.session", {"verified": True, "peer": "mx"}))
        domains = [wire.decode_history(line[len(b"history "):-1]) for line in ups[1:]]
        self.assertEqual([(d, e.best, e.failures) for d, e in domains],
                         [("dest.test", "verified", 0), ("dest.test", "verified", 1)])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # the main process saves

    def test_history_from_the_main_process(self) -> None:
        entry = HistoryEntry(best="verified", best_at=self.clock.seconds())
        self.sender.line(b"history " + wire.encode_json({"dest.test": {"best": "verified"},
                                                         "other.test": {"best": "encrypted"}}))
        self.assertEqual(self.sender.history.get("dest.test"), entry)
        self.sender.line(b"history-forget dest.test")
        self.assertIsNone(self.sender.history.get("dest.test"))
        self.assertIsNotNone(self.sender.history.get("other.test"))
        self.sender.line(b"history-forget *")
        self.assertEqual(self.sender.history.entries, {})

    def test_revive_and_nonsense(self) -> None:
        self.sender.line(b"revive")  # no pool yet: nothing to do
        self.sender.line(self.request(1))
        self.sender.line(b"revive")
        self.assertEqual(self.pools[0].revived, 1)
        self.sender.line(b"what now")
        self.sender.line(b"send x {}")
        self.sender.line(b"send 9 {")
        self.assertEqual([line[:4] for line in self.lines], [])  # nothing answered

    def test_stop_lets_what_is_under_way_finish(self) -> None:
        self.sender.line(self.request(1))
        self.sender.line(self.request(2))
        stopped = self.sender.stop()
        self.assertTrue(self.pools[0].stopped)
        self.assertNoResult(stopped)
        self.sender.line(self.request(3))  # after SIGTERM: not sent
        self.assertEqual(len(self.pools[0].calls), 2)
        self.assertEqual(self.answers()[0][2]["a@dest.test"].kind, "shutting-down")
        self.pools[0].calls[0][2].callback({"a@dest.test": OK})
        self.assertNoResult(stopped)
        self.clock.advance(sender_module.STOP_WAIT)
        self.successResultOf(stopped)
        # the one still under way was not cut short (no answer made up for it)
        self.assertEqual(sorted(n for _, n, _ in self.answers()), [1, 3])
        self.assertFalse(self.pools[0].calls[1][2].called)


class RecordingAttempts:
    """L{twisted_mta.queue.delegated.WorkerAttempts} as the Sender sees it."""

    def __init__(self) -> None:
        self.runs: list = []

    def declined(self) -> bytes:
        return b'{"k":"declined","r":[]}'

    def run(self, qid, state, pool) -> defer.Deferred:
        d = defer.Deferred()
        self.runs.append((qid, state, pool, d))
        return d


class Done:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def encode(self) -> bytes:
        return self.data


class SenderAttemptTests(SynchronousTestCase):
    """
    The main process's C{attempt N QID STATE} lines: run through the
    worker's pool and answered C{done N ANSWER}; after SIGTERM, declined
    at once, and what is under way may finish.
    """

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.lines: list[bytes] = []
        self.pools: list[RecordingPool] = []
        self.attempts = RecordingAttempts()

        def make_pool(observers, history):
            self.pools.append(RecordingPool(observers, history))
            return self.pools[-1]
        self.sender = sender_module.Sender(self.clock, self.lines.append, make_pool,
                                           OutboundSettings(), attempts=self.attempts)

    def test_run_and_answered(self) -> None:
        self.sender.line(b"attempt 4 Q1 cur")
        (qid, state, pool, d), = self.attempts.runs
        self.assertEqual((qid, state, pool), ("Q1", "cur", self.pools[0]))
        self.assertEqual(self.lines, [])
        d.callback(Done(b'{"k":"removed","r":[]}'))
        self.assertEqual(self.lines, [b'done 4 {"k":"removed","r":[]}\n'])
        self.assertEqual(self.sender.pending, {})

    def test_declined_while_stopping(self) -> None:
        self.sender.line(b"attempt 1 Q1 cur")
        stopped = self.sender.stop()
        self.sender.line(b"attempt 2 Q2 cur")
        self.assertEqual(self.lines, [b'done 2 {"k":"declined","r":[]}\n'])
        self.assertNoResult(stopped)
        self.attempts.runs[0][3].callback(Done(b'{"k":"gone","r":[]}'))
        self.successResultOf(stopped)
        self.assertEqual(self.lines[-1], b'done 1 {"k":"gone","r":[]}\n')

    def test_a_line_not_understood(self) -> None:
        self.sender.line(b"attempt 1 Q1")
        self.assertEqual((self.attempts.runs, self.lines), ([], []))
