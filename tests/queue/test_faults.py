"""
Disk faults in the queue path (issue 11): ENOSPC and EIO injected into
every write of the spool and the Maildir delivery (L{tests.queue.faults}),
at unit level with the real spool in a temporary directory and a fake
clock.  Whatever write fails, the client gets 451 or the delivery is
deferred, and once the disk is back every entry is attempted again without
a restart and no DSN is lost.
"""

from __future__ import annotations

import email
import email.policy
import errno
import os
import re

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.delivery import maildir as maildir_module
from twisted_mta.delivery.local import MaildirDelivery
from twisted_mta.delivery.remote import RemoteDelivery
from twisted_mta.inbound.server import InboundFactory
from twisted_mta.local import LocalDirectory
from twisted_mta.model import Envelope, Outcome, Recipient
from twisted_mta.queue import commit_helper as helper_module
from twisted_mta.queue.committer import Committer
from twisted_mta.queue import spool as spool_module
from twisted_mta.queue.manager import QueueManager, Targets
from twisted_mta.queue.spool import QueueIdGenerator, Spool, run_inline
from tests.queue.faults import FREEING, FaultyFS
from tests.queue.test_manager import T0, UNREACHABLE, FakeOutbound, ManagerTestBase
from tests.support import make_config, queued


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
        self.fs.install(self, spool_module, maildir_module, helper_module)

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


class InProcessHelper:
    """
    The commit helper's transport, running its batch here at once (through
    the faulty file system) and answering the committer.
    """

    def __init__(self, helper, spool: str) -> None:
        self.helper = helper
        self.spool = spool

    batches = 0

    def write(self, data: bytes) -> None:
        InProcessHelper.batches += 1
        batch, rest = helper_module.parse_requests(data)
        assert rest == b""
        self.helper.outReceived(b"".join(helper_module.run_batch(self.spool, batch)))

    def closeStdin(self) -> None:
        pass


class HelperCommitFaultTests(MessageWriterFaultTests):
    """
    The same, with the commit helper doing the commit (its batch run in
    this process, through the faulty file system): the same writes, and
    any of them failing leaves the spool as clean.
    """

    def setUp(self):
        MessageWriterFaultTests.setUp(self)
        path = self.spool.path
        self.spool.committer = Committer(
            path, lambda helper, args: InProcessHelper(helper, path), run_inline, self.clock)
        InProcessHelper.batches = 0

    def test_every_commit_write_point(self):
        MessageWriterFaultTests.test_every_commit_write_point(self)
        self.assertEqual(InProcessHelper.batches, 1 + 2 * 5)  # each commit went to the helper


class FaultTestBase(ManagerTestBase):
    """
    The manager over the real spool and targets, with L{FaultyFS} in front
    of the spool's and the Maildir delivery's file system calls, and the
    log events kept.
    """

    BAD = Outcome(550, "5.1.1", "mx.elsewhere.test said: 550 5.1.1 no such user",
                  "mx.elsewhere.test")
    OK = Outcome(250, "2.0.0", "mx.elsewhere.test said: 250 2.0.0 Ok", "mx.elsewhere.test")

    def setUp(self):
        ManagerTestBase.setUp(self)
        self.fs = FaultyFS(self.base, self.clock)
        self.fs.install(self, spool_module, maildir_module, helper_module)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, event):
        return [e for e in self.events if e.get("event") == event]

    def dsns(self, user="alice"):
        """
        The DSNs in a user's Maildir: (Action, Final-Recipient) pairs per DSN.
        """
        out = []
        for path in sorted(self.maildir_files(user)):
            with open(path, "rb") as f:
                msg = email.message_from_bytes(f.read(), policy=email.policy.compat32)
            if msg.get_content_type() != "multipart/report":
                continue
            blocks = msg.get_payload()[1].get_payload()[1:]
            out.append(sorted((b["Action"], b["Final-Recipient"].partition("; ")[2])
                              for b in blocks))
        return out

    def restart(self, m):
        m._stopping = True  # like a crash: nothing written at stop
        self.successResultOf(m.stopService())
        m2 = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                          self.targets())
        m2.startService()
        self.addCleanup(m2.stopService)
        return m2


class BounceNotQueuedTests(FaultTestBase):
    """
    F5: a DSN that could not be queued is not counted as sent.  The entry
    stays, the recipients flagged C{dsn_pending}, until a later attempt
    queues the DSN, without attempting delivery again.
    """

    def test_permanent_failure_with_the_disk_full(self):
        """A 550 while the disk refuses the bounce: the entry stays (failed, DSN pending, recorded), nothing says removed; once the disk is back the bounce is queued at the first retry interval without a second delivery, then the entry goes."""
        self.outbound.outcomes = {"bad@elsewhere.test": self.BAD}
        m = self.manager()
        env = self.queue(["bad@elsewhere.test"], sender="alice@example.test")
        self.fs.refuse("create spool/tmp/*")  # no new file in the spool: the DSN
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.logged("dsn.error")), 1)
        self.assertEqual(self.logged("queue.removed"), [])
        stored = self.spool.load(env.queue_id)
        [rcpt] = stored.recipients
        self.assertEqual((rcpt.state, rcpt.dsn_pending), ("failed", True))
        self.assertEqual(stored.next_attempt, T0 + 60)
        self.assertEqual(self.dsns(), [])
        self.clock.advance(60)  # still full: tried again, still owed
        self.assertEqual(len(self.logged("dsn.error")), 2)
        self.assertTrue(self.spool.load(env.queue_id).recipients[0].dsn_pending)
        self.fs.refuse()
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual(self.dsns(), [[("failed", "bad@elsewhere.test")]])
        self.assertEqual(len(self.outbound.sent), 1)  # never delivered again
        self.assertIsNone(self.spool.message_path(env.queue_id))
        self.assertEqual(queued(m), [])
        self.assertEqual([e["queue_id"] for e in self.logged("queue.removed")
                          if e["queue_id"] == env.queue_id], [env.queue_id])

    def test_owed_bounce_survives_a_restart(self):
        """The flag is on disk: after a crash the restarted manager queues the bounce without delivering again."""
        m = self.manager()
        env = self.queue(["carol@example.test", "bob@example.test"], sender="alice@example.test")
        self.fs.refuse("create spool/tmp/*")
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("bob")), 1)
        self.fs.refuse()
        m2 = self.restart(m)
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual(self.dsns(), [[("failed", "carol@example.test")]])
        self.assertEqual(len(self.maildir_files("bob")), 1)
        self.assertEqual(len(self.logged("delivery.failed")), 1)  # carol tried once
        self.assertEqual(queued(m2), [])

    def test_success_report_not_queued(self):
        """NOTIFY=SUCCESS: a success DSN the disk refused is owed like a bounce and queued later, once."""
        self.outbound.outcomes = {"ok@elsewhere.test": self.OK}
        m = self.manager()
        env = self.queue(["ok@elsewhere.test"], sender="alice@example.test",
                         notify=("SUCCESS",))
        self.fs.refuse("create spool/tmp/*")
        m.enqueue(env)
        self.clock.advance(0)
        [rcpt] = self.spool.load(env.queue_id).recipients
        self.assertEqual((rcpt.state, rcpt.dsn_pending), ("delivered", True))
        self.fs.refuse()
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual(self.dsns(), [[("relayed", "ok@elsewhere.test")]])
        self.assertEqual(len(self.outbound.sent), 1)
        self.assertEqual(queued(m), [])

    def test_bounce_of_a_bounce_refused_goes_to_the_postmaster_later(self):
        """A failed bounce whose report to the postmaster cannot be queued: owed too."""
        m = self.manager()
        env = self.queue(["carol@example.test"], sender="")
        self.fs.refuse("create spool/tmp/*")
        m.enqueue(env)
        self.clock.advance(0)
        self.assertTrue(self.spool.load(env.queue_id).recipients[0].dsn_pending)
        self.fs.refuse()
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual(self.dsns("postmaster"), [[("failed", "carol@example.test")]])
        self.assertEqual(queued(m), [])

    def test_delay_warning_counts_only_once_queued(self):
        """A delay warning the disk refused leaves warned false; the next attempt sends it, and only one is ever sent."""
        self.config = make_config(self.base, queue={"retry_schedule": [60, 600], "jitter": 0,
                                                    "lifetime": 36000, "delay_warning": 300})
        m = self.manager()
        env = self.queue(["x@elsewhere.test"], sender="alice@example.test")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(60)
        self.fs.refuse("create spool/tmp/*")
        self.clock.advance(600)  # 660 s old: the warning is due, and refused
        self.assertFalse(self.spool.load(env.queue_id).warned)
        self.assertEqual(self.dsns(), [])
        self.fs.refuse()
        self.clock.advance(600)
        self.clock.advance(0)
        self.assertTrue(self.spool.load(env.queue_id).warned)
        self.assertEqual(self.dsns(), [[("delayed", "x@elsewhere.test")]])
        for _ in range(5):
            self.clock.advance(600)
        self.assertEqual(len(self.dsns()), 1)

    def test_vanished_entry_with_a_dsn_owed(self):
        """An entry owing a DSN whose queue file was removed by hand is forgotten at its next try, logged, not retried for ever."""
        self.outbound.outcomes = {"bad@elsewhere.test": self.BAD}
        m = self.manager()
        env = self.queue(["bad@elsewhere.test"], sender="alice@example.test")
        self.fs.refuse("create spool/tmp/*")
        m.enqueue(env)
        self.clock.advance(0)
        self.fs.refuse()
        os.unlink(self.spool.message_path(env.queue_id))
        self.clock.advance(60)
        self.assertEqual(queued(m), [])
        self.assertEqual([e["queue_id"] for e in self.logged("queue.error")], [env.queue_id])
        self.assertEqual(self.dsns(), [])

    def test_crash_between_queuing_and_recording_repeats_the_bounce(self):
        """The bounce is queued, the disk refuses the record (the queue file cannot be removed) and the process dies: the restart bounces again (at least once, never lost).  Without the crash, the retry only removes the entry: one bounce."""
        self.outbound.outcomes = {"bad@elsewhere.test": self.BAD}
        m = self.manager()
        env = self.queue(["bad@elsewhere.test"], sender="alice@example.test")
        self.fs.refuse(f"unlink spool/new/{env.queue_id}", err=errno.EIO)
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.logged("dsn.queued")), 1)
        self.assertIsNotNone(self.spool.message_path(env.queue_id))
        self.fs.refuse()
        m2 = self.restart(m)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(self.outbound.sent), 2)
        self.assertEqual(self.dsns(), [[("failed", "bad@elsewhere.test")]] * 2)
        self.assertEqual(queued(m2), [])

    def test_record_refused_without_a_crash_is_written_later(self):
        """The same refusal without a crash: the results stay in memory and are written at the first retry interval; one delivery, one bounce."""
        self.outbound.outcomes = {"bad@elsewhere.test": self.BAD}
        m = self.manager()
        env = self.queue(["bad@elsewhere.test"], sender="alice@example.test")
        self.fs.refuse(f"unlink spool/new/{env.queue_id}", err=errno.EIO)
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.logged("queue.error")), 1)
        self.fs.refuse()
        self.clock.advance(60)
        self.clock.advance(0)
        self.assertEqual(len(self.outbound.sent), 1)
        self.assertEqual(self.dsns(), [[("failed", "bad@elsewhere.test")]])
        self.assertIsNone(self.spool.message_path(env.queue_id))
        self.assertEqual(queued(m), [])


class CrashedAttemptTests(FaultTestBase):
    """
    F4: an attempt that raises is rescheduled, whatever raised.
    """

    def test_enospc_on_a_large_state_then_space_comes_back(self):
        """ENOSPC while a 60-recipient state is written to envelopes/ID.json: one line logged (no traceback), and once space is back the entry is attempted again without a restart, its state recorded."""
        m = self.manager()
        rcpts = [f"user{i:02d}@elsewhere.test" for i in range(60)]
        env = self.queue(rcpts)
        self.fs.refuse("open spool/tmp/*.json", "write spool/tmp/*.json",
                       "close spool/tmp/*.json")
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(self.fs.failed, [f"open spool/tmp/{env.queue_id}.json"])
        [error] = self.logged("queue.error")
        self.assertIn("No space left on device [ENOSPC]", error["error"])
        self.assertNotIn("log_failure", error)
        self.assertEqual(len(self.outbound.sent), 1)
        self.assertFalse(os.path.exists(self.spool.envelope_path(env.queue_id)))
        self.clock.advance(60)  # still full: tried again, refused again
        self.assertEqual(len(self.logged("queue.error")), 2)
        self.fs.refuse()
        # The results of the first attempt are written, and the entry,
        # overdue, is attempted again at once.
        self.clock.advance(60)
        self.assertEqual(len(self.outbound.sent), 2)
        stored = self.spool.load(env.queue_id)
        self.assertEqual((stored.attempts, stored.next_attempt), (2, T0 + 120 + 600))
        self.assertEqual(len(self.outbound.sent[-1][1].recipients), 60)
        self.assertEqual(self.spool.state_of(env.queue_id), "cur")


class ScriptedOutbound(FakeOutbound):
    """
    The remote side, by the fake clock: C{bad@} refuses for good, C{ok@}
    takes the message, every other remote address is unreachable until
    C{opens} and takes it after.  Keeps each (address, outcome) given.
    """

    def __init__(self, clock, opens):
        FakeOutbound.__init__(self)
        self.clock = clock
        self.opens = opens
        self.given: list[tuple[str, int]] = []

    def deliver(self, hop, txn):
        out = {}
        for r in txn.recipients:
            if r.startswith("bad@"):
                out[r] = FaultTestBase.BAD
            elif r.startswith("ok@") or self.clock.seconds() >= self.opens:
                out[r] = FaultTestBase.OK
            else:
                out[r] = UNREACHABLE
            self.given.append((r, out[r].code))
        self.sent.append((hop, txn))
        return defer.succeed(out)


QUEUE_ID = re.compile(r"[0-9A-F]{16,}")
MAILDIR_NAME = re.compile(r"\d+\.M\d+QIDR(\d+)\.")


def site(phase: str, label: str) -> str:
    """
    A write point without what changes from one occurrence to the next
    (queue ids, arrival times): the same code writing the same kind of file.
    """
    return f"{phase}: " + MAILDIR_NAME.sub(r"*R\1.", QUEUE_ID.sub("ID", label))


class QueuePathFaultTests(SynchronousTestCase):
    """
    The whole queue path, from the client's DATA to the Maildir, the remote
    server and the DSNs, with ENOSPC or EIO at each of its writes in turn
    (table-driven: one run to list the write points, then one run per
    point and kind of fault).

    The scenario (a client on a trusted network, sending from a local
    sender so every DSN lands in a Maildir we can read):

      - A to bob (local), ok@elsewhere (NOTIFY=SUCCESS: a success DSN),
        bad@elsewhere (550: a bounce) and later@elsewhere (unreachable for
        40 minutes: a delay warning after 300 s, then delivered);
      - B to 60 remote recipients, unreachable for 40 minutes (its state
        goes to envelopes/ID.json; a delay warning, then delivered);
      - C to alice and bob.

    A client told 451 sends again 50 s later.  Whatever write fails: every
    reply to the final dot is 250 or 451 4.3.0; every message is accepted
    once in the end and delivered, each local copy exactly once; the remote
    server gets each recipient once; alice gets each DSN exactly once (the
    bounce for bad@, the success report for ok@, the two delay warnings)
    and no other; and the spool ends empty, all without a restart.
    """

    OPENS = 2400.0  # when the unreachable recipients become reachable
    END = 3200.0
    STEP = 50.0  # the client sends again after a 451

    def setUp(self):
        self.top = os.path.abspath(self.mktemp())
        os.makedirs(self.top)
        self.clock = Clock()
        self.fs = FaultyFS(self.top, self.clock)
        self.fs.install(self, spool_module, maildir_module, helper_module)
        self.fs.sync = False  # hundreds of runs; what matters is that each fsync may fail
        self.runs = 0

    # -- one run of the scenario ---------------------------------------------

    def run_scenario(self, fault=None):
        """
        Run the scenario in a fresh directory, with C{fault} (point, errno,
        mode) armed once the spool is set up; return a list of what went
        wrong (empty when all is well).
        """
        self.runs += 1
        base = os.path.join(self.top, f"run{self.runs}")
        clock = self.clock = Clock()
        self.fs._clock = clock
        clock.advance(T0)
        config = make_config(base, queue={
            "retry_schedule": [60, 600], "jitter": 0, "lifetime": 10 * 86400,
            "delay_warning": 300}, relay={"trusted_networks": ["192.0.2.0/24"]})
        spool = Spool(config.spool, new_queue_id=QueueIdGenerator(clock.seconds))
        spool.lock()
        self.fs.reset(base)
        self.fs.tag = "queue"
        if fault is not None:
            self.fs.arm(*fault)
        outbound = ScriptedOutbound(clock, T0 + self.OPENS)
        targets = Targets(
            local=MaildirDelivery(LocalDirectory(config.local), config.hostname, run_inline),
            remote=RemoteDelivery(outbound, config.outbound, run_inline))
        manager = QueueManager(config, spool, clock, run_inline, targets)
        factory = InboundFactory(config, "mx", spool, clock, on_queued=manager.enqueue)
        problems: list[str] = []
        try:
            manager.startService()
            self._drive(factory, clock, problems)
            self._check(config, spool, manager, outbound, problems)
        finally:
            self.successResultOf(manager.stopService())
            spool.unlock()
        return problems

    MESSAGES = {
        "A": ["bob@example.test", "ok@elsewhere.test NOTIFY=SUCCESS",
              "bad@elsewhere.test", "later@elsewhere.test"],
        "B": [f"r{i:02d}@elsewhere.test" for i in range(60)],
        "C": ["alice@example.test", "bob@example.test"],
    }

    def _send(self, factory, name) -> str:
        proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.10", 40000))
        transport = StringTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
                                    peerAddress=IPv4Address("TCP", "192.0.2.10", 40000))
        proto.makeConnection(transport)
        lines = [b"EHLO client.example.test", b"MAIL FROM:<alice@example.test>"]
        lines += [b"RCPT TO:<%s>%s" % tuple(r.encode().partition(b" ")[::2])
                  if " " not in r else
                  b"RCPT TO:<%s> %s" % tuple(r.encode().split(b" ", 1))
                  for r in self.MESSAGES[name]]
        lines += [b"DATA"]
        for line in lines:
            proto.dataReceived(line + b"\r\n")
        transport.clear()
        proto.dataReceived(b"Subject: " + name.encode() + b"\r\n\r\ntoken: msg-"
                           + name.encode() + b"\r\n.\r\n")
        reply = transport.value().decode().strip()
        proto.dataReceived(b"QUIT\r\n")
        proto.connectionLost(None)
        return reply

    def _drive(self, factory, clock, problems):
        unsent = list(self.MESSAGES)
        while clock.seconds() < T0 + self.END:
            for name in list(unsent):
                self.fs.tag = "smtp"
                reply = self._send(factory, name)
                self.fs.tag = "queue"
                if reply.startswith("250 "):
                    unsent.remove(name)
                elif not reply.startswith("451 4.3.0 "):
                    problems.append(f"{name}: the final dot got {reply!r}")
                    unsent.remove(name)
            clock.advance(self.STEP)
        if unsent:
            problems.append(f"never accepted: {unsent}")
        if self.fs.active:
            problems.append("the fault never ended (the test is wrong)")

    def _maildir(self, base, user):
        out = []
        for sub in ("new", "cur"):
            d = os.path.join(base, "mail", user, "Maildir", sub)
            for n in sorted(os.listdir(d)) if os.path.isdir(d) else ():
                with open(os.path.join(d, n), "rb") as f:
                    out.append(f.read())
        return out

    def _check(self, config, spool, manager, outbound, problems):
        base = os.path.dirname(config.spool)
        for user, expected in (("bob", ["A", "C"]), ("alice", ["C"])):
            got = sorted(m.split(b"token: msg-")[1][:1].decode()
                         for m in self._maildir(base, user) if b"token: msg-" in m)
            if got != expected:
                problems.append(f"{user} got {got}, expected {expected}")
        dsns = []
        for data in self._maildir(base, "alice"):
            msg = email.message_from_bytes(data, policy=email.policy.compat32)
            if msg.get_content_type() == "multipart/report":
                blocks = msg.get_payload()[1].get_payload()[1:]
                actions = {b["Action"] for b in blocks}
                dsns.append((actions.pop() if len(actions) == 1 else str(sorted(actions)),
                             len(blocks), blocks[0]["Final-Recipient"].partition("; ")[2]))
        expected = sorted([("failed", 1, "bad@elsewhere.test"),
                           ("relayed", 1, "ok@elsewhere.test"),
                           ("delayed", 1, "later@elsewhere.test"),
                           ("delayed", 60, "r00@elsewhere.test")])
        if sorted(dsns) != expected:
            problems.append(f"alice's DSNs: {sorted(dsns)}, expected {expected}")
        for address in ["ok@elsewhere.test", "later@elsewhere.test"] + self.MESSAGES["B"]:
            taken = [code for a, code in outbound.given if a == address and code == 250]
            if len(taken) != 1:
                problems.append(f"{address} taken {len(taken)} times by the remote server")
                break
        if [c for a, c in outbound.given if a == "bad@elsewhere.test"] != [550]:
            problems.append("bad@elsewhere.test was not tried exactly once")
        left = {d: os.listdir(os.path.join(spool.path, d))
                for d in ("tmp", "new", "cur", "hold", "envelopes", "corrupt")}
        left = {d: names for d, names in left.items() if names}
        if left or manager.entries:
            problems.append(f"left in the spool: {left}, in memory: {list(manager.entries)}")

    # -- the table ---------------------------------------------------------------

    def points(self) -> list[tuple[int, str]]:
        """
        The write points of the scenario, as (index, site): the first
        occurrence of each site, or every point with
        C{TWISTED_MTA_EVERY_FAULT_POINT=1} in the environment (slower).
        """
        problems = self.run_scenario()
        self.assertEqual(problems, [], "the scenario fails without any fault")
        sites = [site(tag, label) for tag, label in zip(self.fs.tags, self.fs.points)]
        self.assertGreater(len(sites), 100)
        every = os.environ.get("TWISTED_MTA_EVERY_FAULT_POINT") == "1"
        seen: set[str] = set()
        points = []
        for index, name in enumerate(sites):
            if every or name not in seen:
                points.append((index, name))
                seen.add(name)
        return points

    def run_table(self, err: int, mode: str):
        points = self.points()
        kinds = sorted({name.split()[1] for _, name in points})
        self.assertEqual(kinds, ["close", "create", "fsync", "link", "mkdir", "open",
                                 "removexattr", "rename", "setxattr", "unlink", "write"])
        failures = []
        for index, label in points:
            if mode == "until" and label.split()[1] in FREEING:
                continue  # a full disk still removes files: no fault starts here
            try:
                problems = self.run_scenario((index, err, mode))
            except Exception as e:
                problems = [f"raised {e!r}"]
            if not self.fs.failed:
                problems.append("the fault never happened (the scenario is not repeatable)")
            for p in problems:
                failures.append(f"#{index} {label} ({errno.errorcode[err]} {mode}): {p}")
        self.flushLoggedErrors(OSError)
        self.assertEqual(failures, [], "\n" + "\n".join(failures))

    def test_enospc_at_each_write_until_space_returns(self):
        """A full disk from each write point on, for 100 s; removing files still works."""
        self.run_table(errno.ENOSPC, "until")

    def test_eio_at_each_write(self):
        """One I/O error at each write point."""
        self.run_table(errno.EIO, "once")
