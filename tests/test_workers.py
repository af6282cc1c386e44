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


class FakeTransport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[str] = []

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
