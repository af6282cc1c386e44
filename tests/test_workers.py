"""
The main process's side of the receiving workers (L{WorkerPool}), with a
clock and a recording C{spawnProcess}: each message reported is queued
once; a worker that ends is started again, later while it keeps dying
young, and what it left in new/ unreported is queued; a stop sends
SIGTERM, then SIGKILL to one that lingers.
"""

from __future__ import annotations

import os

import attrs

from twisted.internet import defer, error, task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import workers
from twisted_mta.config import OutboundSettings


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []
        self.written: list[bytes] = []

    def writeToChild(self, fd: int, data: bytes) -> None:
        assert fd == 0
        self.written.append(data)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)


class FakeReactor(task.Clock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple] = []

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        transport = FakeTransport(1000 + len(self.spawned))
        self.spawned.append((proto, args, childFDs, transport))
        return transport


class FakeListener:
    fileno = 7
    family = "inet"


class FakeManager:
    def __init__(self) -> None:
        self.entries: dict[str, object] = {}
        self.queued: list[str] = []

    def knows(self, queue_id: str) -> bool:
        return queue_id in self.entries

    def enqueue(self, envelope) -> None:
        self.entries[getattr(envelope, "queue_id", envelope)] = envelope
        self.queued.append(envelope)


    def delivered_on_receipt(self, listener: str, count: int, latency: float) -> None:
        self.queued.append(("delivered", listener, count, latency))


class FakeSpool:
    def __init__(self, path: str) -> None:
        self.path = path
        self.loaded: list[str] = []

    def load(self, queue_id: str) -> str:
        self.loaded.append(queue_id)
        return queue_id  # the "envelope" is its id here


class Config:
    path = "/etc/mta.toml"


def inline(f, *args):
    return defer.maybeDeferred(f, *args)


class WorkerCountTests(SynchronousTestCase):
    """
    C{[server] workers} when set; otherwise one receiving process per core,
    and since the main process receives too, one worker fewer than cores.
    """

    def test_table(self) -> None:
        for setting, cores, expected in [(None, 1, 0), (None, 2, 1), (None, 8, 7),
                                         (0, 8, 0), (3, 2, 3)]:
            self.patch(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
            config = attrs.make_class("Settings", {"workers": attrs.field()})(setting)
            self.assertEqual(workers.worker_count(config), expected, (setting, cores))


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeReactor()
        self.manager = FakeManager()
        self.spool_dir = self.mktemp()
        os.makedirs(os.path.join(self.spool_dir, "new"))
        self.pool = workers.WorkerPool(Config(), self.reactor, 2, [FakeListener()],
                                       FakeSpool(self.spool_dir), self.manager, inline)
        self.pool.startService()

    def end(self, n: int, reason=error.ProcessTerminated(signal=9)) -> None:
        proto = self.reactor.spawned[n][0]
        proto.processEnded(Failure(reason))

    def test_spawn(self) -> None:
        """Two workers, each given the listener's socket at fd 10 and a pipe on fd 3."""
        self.assertEqual(len(self.reactor.spawned), 2)
        proto, args, fds, _ = self.reactor.spawned[0]
        self.assertEqual(args[1:3], ["-m", "twisted_mta.worker"])
        self.assertIn("--listener", args)
        self.assertEqual(args[args.index("--listener") + 1], "0:10:inet")
        self.assertEqual(fds, {0: "w", 1: 1, 2: 2, 3: "r", 10: 7})

    def test_reports_are_queued_once(self) -> None:
        proto = self.reactor.spawned[0][0]
        proto.childDataReceived(3, b"queued A1\nqueued B")
        proto.childDataReceived(3, b"2\nqueued A1\nnonsense line\n")
        proto.childDataReceived(1, b"queued C3\n")  # not the report pipe
        self.assertEqual(self.manager.queued, ["A1", "B2"])

    def test_milter_results_reach_the_observers(self) -> None:
        """A worker's "milter RESULT NAME" line goes to the pool's observers (the metrics); an unknown result is dropped."""
        seen = []
        self.pool.observers.append(lambda name, event: seen.append((name, event)))
        proto = self.reactor.spawned[0][0]
        proto.childDataReceived(3, b"milter reject opendkim\nmilter bogus opendkim\n"
                                   b"milter failed rspamd\n")
        self.assertEqual(seen, [("milter.result", {"milter": "opendkim", "result": "reject"}),
                                ("milter.result", {"milter": "rspamd", "result": "failed"})])
        self.assertEqual(self.manager.queued, [])

    def test_delivered_on_receipt_reaches_the_manager(self) -> None:
        """
        The worker's "delivered COUNT LATENCY LISTENER" line (written by
        worker.notify_delivered) reaches the manager's count; a line it
        cannot read is logged and dropped.
        """
        from twisted_mta import worker
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.patch(worker, "NOTIFY_FD", w)
        worker.notify_delivered("mx", 2, 0.25)
        proto = self.reactor.spawned[0][0]
        proto.childDataReceived(3, os.read(r, 4096) + b"delivered two 0.1 mx\n")
        self.assertEqual(self.manager.queued, [("delivered", "mx", 2, 0.25)])
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_report_with_envelope_needs_no_spool_read(self) -> None:
        """
        A report carrying the envelope's JSON is queued as sent; one whose
        JSON is damaged or names another entry is read from the spool.
        """
        from twisted_mta.model import Envelope, Recipient
        env = Envelope(queue_id="E1", sender="a@b.test", recipients=(Recipient("c@d.test"),),
                       arrival=1_800_000_000.0)
        other = attrs.evolve(env, queue_id="E9")
        proto = self.reactor.spawned[0][0]
        proto.childDataReceived(3, b"queued E1 " + env.to_json(compact=True) + b"\n")
        proto.childDataReceived(3, b"queued E2 {not json\n")
        proto.childDataReceived(3, b"queued E3 " + other.to_json(compact=True) + b"\n")
        self.assertEqual(self.manager.queued, [env, "E2", "E3"])
        self.assertEqual(self.pool.spool.loaded, ["E2", "E3"])

    def test_worker_notice_carries_the_envelope_when_short(self) -> None:
        """The worker's line: the envelope's JSON up to PIPE_BUF, else the id alone."""
        from twisted_mta import worker
        from twisted_mta.model import Envelope, Recipient
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.patch(worker, "NOTIFY_FD", w)
        small = Envelope(queue_id="S1", sender="a@b.test", recipients=(Recipient("c@d.test"),),
                         arrival=1_800_000_000.0)
        big = attrs.evolve(small, queue_id="B1", recipients=tuple(
            Recipient(f"user{i}@d.test") for i in range(200)))
        worker.notify(small)
        worker.notify(big)
        lines = os.read(r, 65536).split(b"\n")
        self.assertEqual(lines[0], b"queued S1 " + small.to_json(compact=True))
        self.assertEqual(lines[1], b"queued B1")

    def test_restart_backs_off_while_dying_young(self) -> None:
        delays = []
        for _ in range(4):
            before = len(self.reactor.spawned)
            self.end(len(self.reactor.spawned) - 1 if before > 2 else 0)
            calls = [c for c in self.reactor.getDelayedCalls()]
            delays.append(min(c.getTime() for c in calls) - self.reactor.seconds())
            self.reactor.advance(delays[-1])
            self.assertEqual(len(self.reactor.spawned), before + 1)
        self.assertEqual(delays, [0.5, 1.0, 2.0, 4.0])
        # an old worker that dies is restarted after the short delay again
        self.reactor.advance(workers.YOUNG + 1)
        self.end(len(self.reactor.spawned) - 1)
        (call,) = self.reactor.getDelayedCalls()
        self.assertEqual(call.getTime() - self.reactor.seconds(), workers.RESTART_DELAY)

    def test_orphans_in_new_are_queued_when_a_worker_ends(self) -> None:
        self.manager.entries["KNOWN"] = "KNOWN"
        for name in ("KNOWN", "ORPHAN"):
            open(os.path.join(self.spool_dir, "new", name), "w").close()
        self.end(0)
        self.assertEqual(self.manager.queued, ["ORPHAN"])

    def test_stop_sends_term_then_kill(self) -> None:
        d = self.pool.stopService()
        transports = [t for _, _, _, t in self.reactor.spawned]
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM"]])
        self.end(0, error.ProcessDone(0))
        self.reactor.advance(workers.STOP_TIMEOUT)
        self.assertEqual([t.signals for t in transports], [["TERM"], ["TERM", "KILL"]])
        self.assertNoResult(d)
        self.end(1)
        self.successResultOf(d)
        self.assertEqual(len(self.reactor.spawned), 2)  # no restart while stopping
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class RecordingPool:
    """The main process's own pool, as WorkerSending falls back to it."""

    def __init__(self) -> None:
        self.calls: list = []
        self.revived = 0
        self.stopped = False
        self.hold = False  # True: its deliveries stay under way (in waiting)
        self.waiting: list[defer.Deferred] = []

    def deliver(self, hop, txn):
        self.calls.append((hop, txn))
        if self.hold:
            self.waiting.append(defer.Deferred())
            return self.waiting[-1]
        return defer.succeed({r: "sent by the main process" for r in txn.recipients})

    def revive(self) -> None:
        self.revived += 1

    def stop(self) -> None:
        self.stopped = True


class WorkerSendingTests(SynchronousTestCase):
    """
    With the workers sending (L{workers.WorkerSending}): each transaction
    goes to the process with the fewest under way (a worker's pipe, or
    the main process's own pool), a worker on a tie, and a worker's
    answer fires it; while the workers are not running the main process
    sends; a worker that ends leaves what it had not answered to be tried
    again; events and TLS history come back to one writer.
    """

    def setUp(self) -> None:
        from twisted_mta.tls.history import TLSHistory
        self.reactor = FakeReactor()
        self.local = RecordingPool()
        self.history = TLSHistory(os.path.join(self.mktemp(), "history.json"), self.reactor,
                                  inline)
        self.events: list = []
        from twisted_mta.tls.sts_cache import PolicyCache
        self.cache = PolicyCache(self.mktemp(), lambda d: defer.Deferred(), self.reactor, inline)
        self.sending = workers.WorkerSending(self.local, self.history,
                                             [lambda n, e: self.events.append((n, e))],
                                             sts_cache=self.cache)
        spool = self.mktemp()
        os.makedirs(os.path.join(spool, "new"))
        self.pool = workers.WorkerPool(Config(), self.reactor, 2, [FakeListener()],
                                       FakeSpool(spool), FakeManager(), inline,
                                       sending=self.sending)
        self.pool.startService()

    def txn(self, domain: str):
        from twisted_mta.outbound.client import Transaction
        from twisted_mta.outbound.message import OutgoingMessage
        from twisted_mta.outbound.router import next_hops
        (hop, addrs), = next_hops([f"a@{domain}", f"b@{domain}"]).items()
        message = OutgoingMessage(path="/spool/cur/Q", offset=0, size=1, eight_bit=False,
                                  data=None)
        return hop, Transaction("s@src.test", addrs, message, queue_id="Q")

    def sends(self, index: int) -> list[bytes]:
        return [w for w in self.reactor.spawned[index][3].written if w.startswith(b"send ")]

    def sent_to(self, index: int) -> list[str]:
        from twisted_mta.outbound import wire
        return [wire.decode_send(line.split(b" ", 2)[2].rstrip(), OutboundSettings()).hop.domain
                for line in self.sends(index)]

    def number(self, index: int, k: int = 0) -> int:
        return int(self.sends(index)[k].split(b" ")[1])

    def answer(self, index: int, line: bytes) -> None:
        self.reactor.spawned[index][0].childDataReceived(3, line)

    def test_the_workers_are_told_to_send(self) -> None:
        args = self.reactor.spawned[0][1]
        self.assertEqual(args[args.index("--senders") + 1], "2")
        # and each starts with the TLS history the main process has
        self.assertEqual(self.reactor.spawned[1][3].written, [b"history {}\n"])

    def test_the_least_busy_process_sends(self) -> None:
        """
        Fewest transactions under way wins, a worker on a tie; an answer
        makes its worker less busy.
        """
        from twisted_mta.outbound import wire
        from twisted_mta.model import Outcome
        self.local.hold = True
        results = {}
        for i in range(6):
            hop, txn = self.txn(f"d{i}.test")
            self.sending.deliver(hop, txn).addCallback(
                lambda outcomes, i=i: results.setdefault(i, outcomes))
        self.assertEqual(self.sent_to(0), ["d0.test", "d3.test"])
        self.assertEqual(self.sent_to(1), ["d1.test", "d4.test"])
        self.assertEqual([hop.domain for hop, _ in self.local.calls], ["d2.test", "d5.test"])
        ok = Outcome(250, "2.0.0", "ok")
        line = b"sent %d " % self.number(1) + wire.encode_outcomes(
            {"a@d1.test": ok, "b@d1.test": ok}) + b"\n"
        self.answer(0, line)  # not the worker it went to: ignored
        self.assertEqual(results, {})
        self.answer(1, line)
        self.assertEqual(results, {1: {"a@d1.test": ok, "b@d1.test": ok}})
        self.sending.deliver(*self.txn("d6.test"))
        self.assertEqual(self.sent_to(1)[-1], "d6.test")  # the one with one under way

    def test_the_main_process_keeps_what_it_has_room_for(self) -> None:
        """
        Below C{keep} transactions under way the main process sends them
        itself (mail flowing through); beyond, the least busy process; as
        its own finish, it keeps new ones again.
        """
        from twisted_mta.model import Outcome
        self.sending.keep = 3
        self.local.hold = True
        for i in range(7):
            self.sending.deliver(*self.txn(f"d{i}.test"))
        self.assertEqual([hop.domain for hop, _ in self.local.calls],
                         ["d0.test", "d1.test", "d2.test"])
        self.assertEqual(self.sent_to(0), ["d3.test", "d5.test"])
        self.assertEqual(self.sent_to(1), ["d4.test", "d6.test"])
        ok = Outcome(250, "2.0.0", "ok")
        for d in self.local.waiting[:2]:
            d.callback({"a@x": ok})
        self.sending.deliver(*self.txn("d7.test"))
        self.assertEqual(self.local.calls[-1][0].domain, "d7.test")

    def test_limits_too_small_to_share_leave_the_main_process_out(self) -> None:
        self.sending.main_sends = False
        for i in range(5):
            self.sending.deliver(*self.txn(f"d{i}.test"))
        self.assertEqual(len(self.sent_to(0)) + len(self.sent_to(1)), 5)
        self.assertEqual(self.local.calls, [])

    def test_sending_shares(self) -> None:
        for per_dest, total, count, expected in [
                (20, 100, 1, (10, 50, True)),
                (20, 100, 3, (5, 25, True)),
                (3, 100, 2, (1, 33, True)),
                (1, 100, 1, (1, 100, False)),
                (2, 100, 2, (1, 50, False)),
                (20, 1, 1, (20, 1, False))]:
            settings, main_sends = workers.sending_shares(OutboundSettings(
                connections=total, connections_per_destination=per_dest), count)
            self.assertEqual((settings.connections_per_destination, settings.connections,
                              main_sends), expected, (per_dest, total, count))

    def test_a_worker_that_cannot_send_gets_nothing_more(self) -> None:
        self.answer(0, b"cannot-send\n")
        for i in range(3):
            self.sending.deliver(*self.txn(f"d{i}.test"))
        self.assertEqual((self.sent_to(0), self.sent_to(1)), ([], ["d0.test"]))
        self.reactor.spawned[0][0].processEnded(Failure(error.ProcessTerminated(exitCode=1)))
        self.reactor.advance(workers.RESTART_DELAY)  # started again: it may send again
        self.sending.deliver(*self.txn("d3.test"))
        self.assertEqual(self.sent_to(2), ["d3.test"])

    def test_gone(self) -> None:
        from twisted_mta.model import MessageGone
        d = self.sending.deliver(*self.txn("d0.test"))
        self.answer(0, b"gone %d\n" % self.number(0))
        self.failureResultOf(d, MessageGone)

    def test_the_main_process_sends_while_the_workers_are_down(self) -> None:
        for index in (0, 1):
            self.reactor.spawned[index][0].processEnded(
                Failure(error.ProcessTerminated(signal=9)))
        hop, txn = self.txn("d0.test")
        self.assertEqual(self.successResultOf(self.sending.deliver(hop, txn)),
                         {"a@d0.test": "sent by the main process",
                          "b@d0.test": "sent by the main process"})
        self.reactor.advance(workers.RESTART_DELAY)  # started again: they send again
        self.assertNoResult(self.sending.deliver(hop, txn))
        self.assertEqual(len(self.local.calls), 1)

    def test_an_unread_message_is_read_only_where_it_is_sent(self) -> None:
        """
        A message handed over unread (L{QueuedMessage}): a worker gets its
        path and lengths and reads it itself; the main process reads it
        (through C{read}) only for what it sends itself, and a queue file
        gone, or one whose length is not what its envelope says, ends that
        transaction as reading it in RemoteDelivery did: L{MessageGone},
        or "message-unreadable" for each recipient.
        """
        from twisted_mta.model import Envelope, MessageGone, Recipient
        from twisted_mta.outbound.client import Transaction
        from twisted_mta.outbound.message import QueuedMessage
        from twisted_mta.outbound.router import next_hops
        self.assertTrue(self.sending.reads_queued)
        reads = []

        def read(f, *args):
            reads.append(args[0].message.path)
            return defer.maybeDeferred(f, *args)
        self.sending.read = read
        body = b"Subject: x\r\n\r\nhi\r\n"
        header = Envelope(queue_id="Q", sender="s@src.test", arrival=1.0, size=len(body),
                          recipients=(Recipient("a@d0.test"),)).to_header()
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(header + body)

        def txn(domain: str, queued: QueuedMessage):
            (hop, addrs), = next_hops([f"a@{domain}", f"b@{domain}"]).items()
            return hop, Transaction("s@src.test", addrs, queued, queue_id="Q")

        good = QueuedMessage(path, len(header) + len(body), len(body))
        self.sending.deliver(*txn("d0.test", good))  # to a worker: not read here
        self.assertEqual(reads, [])
        request = self.sends(0)[0].split(b" ", 2)[2].rstrip()
        from twisted_mta.outbound import wire
        self.assertEqual(wire.decode_send(request, OutboundSettings()).expect, good)
        self.sending.keep = 10  # room in the main process: it sends, and reads
        self.assertEqual(self.successResultOf(self.sending.deliver(*txn("d1.test", good))),
                         {"a@d1.test": "sent by the main process",
                          "b@d1.test": "sent by the main process"})
        (_, sent), = self.local.calls
        self.assertEqual((reads, sent.message.body), ([path], body))
        truncated = QueuedMessage(path, len(header) + len(body) + 5, len(body) + 5)
        outcomes = self.successResultOf(self.sending.deliver(*txn("d2.test", truncated)))
        self.assertEqual({o.kind for o in outcomes.values()}, {"message-unreadable"})
        self.assertEqual(sorted(outcomes), ["a@d2.test", "b@d2.test"])
        self.failureResultOf(self.sending.deliver(
            *txn("d3.test", QueuedMessage(path + ".gone", 1, 1))), MessageGone)
        self.assertEqual(len(self.local.calls), 1)  # neither was sent
        self.assertEqual(self.sending.local_busy, 0)

    def test_a_worker_that_ends_leaves_its_transactions_to_be_tried_again(self) -> None:
        hop, txn = self.txn("d0.test")
        pending = self.sending.deliver(hop, txn)
        elsewhere = self.sending.deliver(*self.txn("d1.test"))
        self.assertEqual((self.sent_to(0), self.sent_to(1)), (["d0.test"], ["d1.test"]))
        self.reactor.spawned[0][0].processEnded(Failure(error.ProcessTerminated(signal=9)))
        outcomes = self.successResultOf(pending)
        self.assertEqual(sorted(outcomes), ["a@d0.test", "b@d0.test"])
        self.assertEqual({(o.code, o.kind) for o in outcomes.values()}, {(451, "sender-ended")})
        self.assertIn("signal SIGKILL", outcomes["a@d0.test"].text)
        self.assertNoResult(elsewhere)
        self.assertEqual(self.sending.busy, {0: 0, 1: 1})

    def test_events_and_history_reach_one_writer(self) -> None:
        from twisted_mta.outbound import wire
        from twisted_mta.tls.history import HistoryEntry
        entry = HistoryEntry(best="verified", best_at=5.0)
        self.answer(0, b"event " + wire.encode_event("tls.shadow", {"domain": "d.test"})
                    + b"\nhistory " + wire.encode_history("d.test", entry) + b"\n"
                    + b"event nonsense\n")
        self.assertEqual(self.events, [("tls.shadow", {"domain": "d.test"})])
        self.assertEqual(self.history.entries, {"d.test": entry})
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)  # saved as any change is

    def test_operator_requests_reach_every_worker(self) -> None:
        self.sending.revive()
        self.history.forget(None)  # the operator's tls history --forget, in this process
        self.history.forget("d.test")
        self.cache.reload("D.test")  # the operator's tls sts refresh
        for index in (0, 1):
            self.assertEqual(self.reactor.spawned[index][3].written[1:],
                             [b"revive\n", b"history-forget *\n",
                              b"history-forget d.test\n", b"sts-reload d.test\n"])
        self.assertEqual(self.local.revived, 1)

    def test_stopping(self) -> None:
        """While the workers stop (first), and after, the main process's pool is used."""
        self.pool.stopService()
        hop, txn = self.txn("d0.test")
        self.successResultOf(self.sending.deliver(hop, txn))
        self.sending.stop()
        self.assertTrue(self.local.stopped)
        self.assertEqual(len(self.local.calls), 1)


class WorkerAttemptHandOverTests(SynchronousTestCase):
    """
    Whole attempts of idle entries (L{workers.WorkerSending.attempt}):
    handed to the least busy worker when the main process has at least
    as many under way (no room kept for it: a handed-over attempt costs
    it a line each way), answered with C{done}; a worker that ends
    leaves them LOST, for the main process to look where they got to.
    """

    txn = WorkerSendingTests.txn
    answer = WorkerSendingTests.answer

    def setUp(self) -> None:
        WorkerSendingTests.setUp(self)
        self.sending.delegates = True
        self.sending.keep = 10

    def attempts(self, index: int) -> list[bytes]:
        return [w for w in self.reactor.spawned[index][3].written if w.startswith(b"attempt ")]

    def test_handed_to_the_least_busy_and_answered(self) -> None:
        from twisted_mta.queue import delegated
        first = self.sending.attempt("Q1", "cur")
        second = self.sending.attempt("Q2", "new")
        self.assertEqual((self.attempts(0), self.attempts(1)),
                         ([b"attempt 1 Q1 cur\n"], [b"attempt 2 Q2 new\n"]))
        self.assertEqual(self.sending.busy, {0: 1, 1: 1})
        answer = delegated.Answer(delegated.STORED, state="cur", next_attempt=5.0,
                                  results=(("deferred", 2.0),))
        self.answer(1, b"done 1 " + answer.encode() + b"\n")  # not its worker: ignored
        self.assertNoResult(first)
        self.answer(0, b"done 1 " + answer.encode() + b"\n")
        self.assertEqual(self.successResultOf(first), answer)
        self.assertEqual(self.sending.busy, {0: 0, 1: 1})
        # an answer of the wrong kind for its request is not taken
        self.answer(1, b"sent 2 {}\n")
        self.assertNoResult(second)

    def test_kept_when_the_main_process_has_fewer_under_way(self) -> None:
        self.local.hold = True
        self.sending.attempt("Q1", "cur")
        self.sending.attempt("Q2", "cur")
        self.assertIsNone(self.sending.attempt("Q3", "cur"))  # 0 here, 1 in each worker
        self.sending.deliver(*self.txn("d0.test"))  # kept: below keep
        self.assertIsNotNone(self.sending.attempt("Q4", "cur"))

    def test_off(self) -> None:
        self.sending.delegates = False
        self.assertIsNone(self.sending.attempt("Q1", "cur"))
        self.assertEqual(self.attempts(0) + self.attempts(1), [])

    def test_an_answer_that_does_not_decode(self) -> None:
        from twisted_mta.queue import delegated
        d = self.sending.attempt("Q1", "cur")
        self.answer(0, b"done 1 {\"k\":\"eaten\"}\n")
        self.assertEqual(self.successResultOf(d), delegated.Answer(delegated.LOST))

    def test_a_worker_that_ends_leaves_them_lost(self) -> None:
        from twisted_mta.queue import delegated
        d = self.sending.attempt("Q1", "cur")
        hop, txn = self.txn("d0.test")
        self.sending.deliver(hop, txn)
        self.reactor.spawned[0][0].processEnded(Failure(error.ProcessTerminated(signal=9)))
        self.assertEqual(self.successResultOf(d), delegated.Answer(delegated.LOST))
