"""
Tests for the queue manager: pick-up, local delivery, deferral, retries,
expiry and restart.
"""

import os

import attrs

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted.internet import defer

from twisted_mta.model import Envelope, EnvelopeError, MessageGone, Outcome, Recipient
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_mta.delivery.local import MaildirDelivery
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.delivery.remote import RemoteDelivery
from twisted_mta.local import LocalDirectory
from twisted_mta.queue.idle import IdleEntry
from twisted_mta.queue.manager import QueueManager, Targets, retry_delay
from twisted_mta.queue.spool import Spool
from tests.support import make_config, queued

T0 = 1_800_000_000.0

UNREACHABLE = Outcome(451, "4.4.1", "connect to mx.elsewhere.test[192.0.2.1]:25 failed: "
                      "connection refused", remote_mta="mx.elsewhere.test")


class FakeOutbound:
    """
    The outbound pool's interface, answering from a table: recipient ->
    outcome (default: unreachable).  Records every transaction.
    """

    def __init__(self):
        self.outcomes: dict[str, Outcome] = {}
        self.sent: list = []

    def deliver(self, hop, txn):
        self.sent.append((hop, txn))
        return defer.succeed({r: self.outcomes.get(r, UNREACHABLE) for r in txn.recipients})

    def revive(self):
        pass

    def stop(self):
        pass


class ManagerTestBase(SynchronousTestCase):
    def setUp(self):
        self.base = self.mktemp()
        self.config = make_config(self.base, queue={"retry_schedule": [60, 600], "jitter": 0,
                                                    "lifetime": 3600})
        self.clock = Clock()
        self.clock.advance(T0)
        self.spool = Spool(self.config.spool)
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        self.outbound = FakeOutbound()

    def targets(self) -> Targets:
        """
        The real targets: Maildirs, and the remote target in front of the
        fake outbound pool.
        """
        return Targets(
            local=MaildirDelivery(LocalDirectory(self.config.local), self.config.hostname,
                                  self.run_blocking),
            remote=RemoteDelivery(self.outbound, self.config.outbound, self.run_blocking))

    def manager(self):
        m = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                         self.targets())
        m.startService()
        self.addCleanup(m.stopService)
        return m

    def run_blocking(self, f, *args):
        from twisted.internet import defer
        return defer.maybeDeferred(f, *args)

    def queue(self, rcpts, body=b"Subject: t\r\n\r\nhello\r\n", sender="s@remote.test",
              notify=None, **fields):
        w = self.spool.new_message()
        env = Envelope(queue_id=w.queue_id, sender=sender,
                       recipients=tuple(Recipient(address=r, notify=notify) for r in rcpts),
                       arrival=self.clock.seconds(), next_attempt=self.clock.seconds(),
                       size=len(body), **fields)
        w.write(env.to_header())
        w.write(body)
        return self.successResultOf(w.commit(env))

    def maildir_files(self, user):
        d = os.path.join(self.base, "mail", user, "Maildir", "new")
        return [os.path.join(d, n) for n in os.listdir(d)] if os.path.isdir(d) else []


class ManagerTests(ManagerTestBase):
    def test_new_entry_delivered_once_to_each_local_recipient(self):
        """A queued message for two local users is delivered to each and removed from the spool."""
        m = self.manager()
        env = self.queue(["alice@example.test", "bob@example.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("alice")), 1)
        self.assertEqual(len(self.maildir_files("bob")), 1)
        self.assertIsNone(self.spool.message_path(env.queue_id))
        self.assertFalse(os.path.exists(self.spool.envelope_path(env.queue_id)))
        self.assertEqual(queued(m), [])

    def test_remote_recipient_deferred_local_delivered(self):
        """Local recipients are delivered while a remote one stays pending with the reason and a next attempt."""
        m = self.manager()
        env = self.queue(["alice@example.test", "x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("alice")), 1)
        stored = self.spool.load(env.queue_id)
        states = {r.address: r.state for r in stored.recipients}
        self.assertEqual(states, {"alice@example.test": "delivered", "x@elsewhere.test": "pending"})
        self.assertEqual(stored.attempts, 1)
        self.assertEqual(stored.next_attempt, T0 + 60)
        self.assertEqual(stored.recipients[1].outcome, UNREACHABLE)
        [(hop, txn)] = self.outbound.sent
        self.assertEqual((hop.key, txn.sender, txn.recipients),
                         ("elsewhere.test", "s@remote.test", ("x@elsewhere.test",)))
        self.assertEqual(self.spool.state_of(env.queue_id), "cur")

    def test_mixed_remote_results_in_one_transaction(self):
        """250, 4xx and 5xx for recipients of one message: delivered, retried later, bounced with the server's words (only the pending one is retried)."""
        m = self.manager()
        self.outbound.outcomes = {
            "ok@elsewhere.test": Outcome(250, "2.0.0", "mx said: 250 2.0.0 Ok", "mx"),
            "bad@elsewhere.test": Outcome(550, "5.1.1", "mx said: 550 5.1.1 no such user", "mx"),
        }
        env = self.queue(["ok@elsewhere.test", "bad@elsewhere.test", "later@elsewhere.test"],
                         sender="alice@example.test")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        [(hop, txn)] = self.outbound.sent
        self.assertEqual(len(txn.recipients), 3)
        stored = self.spool.load(env.queue_id)
        self.assertEqual([r.state for r in stored.recipients], ["delivered", "failed", "pending"])
        [path] = self.maildir_files("alice")
        with open(path, "rb") as f:
            dsn = f.read()
        self.assertIn(b"Final-Recipient: rfc822; bad@elsewhere.test", dsn)
        self.assertIn(b"Remote-MTA: dns; mx", dsn)
        self.assertIn(b"550 5.1.1 mx said: 550 5.1.1 no such user", dsn)
        self.assertNotIn(b"later@elsewhere.test\n", dsn)
        self.clock.advance(60)
        self.assertEqual(self.outbound.sent[-1][1].recipients, ("later@elsewhere.test",))

    def test_recipients_grouped_by_next_hop(self):
        """One transaction per destination domain; a smarthost route takes its domain's recipients."""
        self.config = make_config(self.base, outbound={"routes": {
            ".partner.test": {"host": "[relay.partner.test]:2525"}}})
        m = self.manager()
        env = self.queue(["a@one.test", "b@one.test", "c@two.test", "d@mail.partner.test"])
        m.enqueue(env)
        self.clock.advance(0)
        groups = sorted((hop.key, txn.recipients) for hop, txn in self.outbound.sent)
        self.assertEqual(groups, [("[relay.partner.test]:2525", ("d@mail.partner.test",)),
                                  ("one.test", ("a@one.test", "b@one.test")),
                                  ("two.test", ("c@two.test",))])
        txn = self.outbound.sent[0][1]
        self.assertEqual(txn.message.stuffed(), b"Subject: t\r\n\r\nhello\r\n.\r\n")

    def test_retry_only_pending_and_on_schedule(self):
        """Retries follow the schedule and never redeliver a delivered recipient."""
        m = self.manager()
        env = self.queue(["alice@example.test", "x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(59)
        self.assertEqual(self.spool.load(env.queue_id).attempts, 1)
        self.clock.advance(1)
        stored = self.spool.load(env.queue_id)
        self.assertEqual(stored.attempts, 2)
        self.assertEqual(stored.next_attempt, T0 + 60 + 600)
        self.assertEqual(len(self.maildir_files("alice")), 1)

    def test_expiry_fails_pending_recipients(self):
        """After the queue lifetime the pending recipient fails with 5.4.7, the entry is removed and a DSN is queued for the sender."""
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        for _ in range(10):
            self.clock.advance(600)
        self.assertIsNone(self.spool.message_path(env.queue_id))
        [qid] = queued(m)
        dsn = self.successResultOf(m.envelope(qid))  # idle: read from the spool
        self.assertEqual((dsn.sender, [r.address for r in dsn.recipients]), ("", ["s@remote.test"]))
        report = self.parse(self.spool.read_message(dsn.queue_id))
        status = report.get_payload()[1].get_payload()[1]
        self.assertEqual(status["Status"], "5.4.7")
        self.assertEqual(status["Final-Recipient"], "rfc822; x@elsewhere.test")

    def parse(self, data: bytes):
        import email
        from email import policy
        msg = email.message_from_bytes(data, policy=policy.compat32)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "delivery-status")
        return msg

    def test_failed_local_recipient_bounces_to_local_sender(self):
        """A recipient that fails permanently gets a DSN delivered to the (local) sender, from <>."""
        m = self.manager()
        env = self.queue(["carol@example.test", "bob@example.test"], sender="alice@example.test",
                         body=b"Subject: lunch?\r\n\r\nhello\r\n")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("bob")), 1)
        [path] = self.maildir_files("alice")
        with open(path, "rb") as f:
            data = f.read()
        self.assertTrue(data.startswith(b"Return-Path: <>\n"))
        report = self.parse(data.split(b"\n", 2)[2].replace(b"\n", b"\r\n"))
        human, status, headers = report.get_payload()
        self.assertIn("<carol@example.test>", human.get_payload())
        self.assertIn("550 5.1.1 No such local mailbox", human.get_payload())
        blocks = status.get_payload()
        self.assertEqual(blocks[0]["Reporting-MTA"], "dns; mx.example.test")
        self.assertEqual((blocks[1]["Final-Recipient"], blocks[1]["Action"], blocks[1]["Status"]),
                         ("rfc822; carol@example.test", "failed", "5.1.1"))
        self.assertEqual(len(blocks), 2)  # bob was delivered: not in the report
        self.assertIn("Subject: lunch?", headers.get_payload())
        self.assertEqual(queued(m), [])

    def test_failed_bounce_goes_to_postmaster_once(self):
        """A bounce (from <>) that fails is reported to the postmaster, and a failing report to the postmaster is only logged."""
        m = self.manager()
        env = self.queue(["carol@example.test"], sender="")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(queued(m), [])
        [path] = self.maildir_files("postmaster")
        with open(path, "rb") as f:
            data = f.read()
        self.assertIn(b"To: <postmaster@example.test>", data)
        self.assertIn(b"Final-Recipient: rfc822; carol@example.test", data)

    def test_double_bounce_failure_is_dropped(self):
        """A report to the postmaster that fails itself (here: expires) causes nothing further."""
        self.config = make_config(self.base, queue={"retry_schedule": [600], "jitter": 0,
                                                    "lifetime": 3600},
                                  local={"users": ["alice", "bob"], "postmaster": "pm@remote.test"})
        m = self.manager()
        env = self.queue(["carol@example.test"], sender="")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        [qid] = queued(m)
        report = self.successResultOf(m.envelope(qid))
        self.assertEqual([r.address for r in report.recipients], ["pm@remote.test"])
        self.assertEqual(report.client.get("double_bounce"), "yes")
        for _ in range(8):
            self.clock.advance(600)
        self.assertEqual(queued(m), [])
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "new")), [])

    def restart(self, m):
        self.successResultOf(m.stopService())
        m2 = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                          self.targets())
        m2.startService()
        self.addCleanup(m2.stopService)
        return m2

    def test_restart_keeps_attempts_and_next_attempt(self):
        """A restart keeps each entry's attempts, next attempt and last error."""
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(60)
        m._stopping = True  # like a crash: no chance to write anything at stop
        m2 = self.restart(m)
        self.assertNotIn(env.queue_id, m2.entries)  # not due for 600 s: idle
        self.assertEqual(m2.idle.find(env.queue_id)[1:], ("cur", T0 + 660, True))
        entry = self.successResultOf(m2.envelope(env.queue_id))
        self.assertEqual((entry.attempts, entry.next_attempt), (2, T0 + 660))
        self.assertEqual(entry.last_outcome, UNREACHABLE)
        self.clock.advance(599)
        self.assertEqual(self.successResultOf(m2.envelope(env.queue_id)).attempts, 2)
        self.clock.advance(1)
        self.assertEqual(self.successResultOf(m2.envelope(env.queue_id)).attempts, 3)

    def test_recipient_outcome_written_at_once(self):
        """When a recipient is delivered while another is deferred, the recorded state says so immediately."""
        m = self.manager()
        env = self.queue(["alice@example.test", "x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        states = [r.state for r in self.spool.load(env.queue_id).recipients]
        self.assertEqual(states, ["delivered", "pending"])

    def test_entries_on_disk_picked_up_at_start(self):
        """Entries already in the spool at start are delivered without any new arrival."""
        env = self.queue(["bob@example.test"])
        self.manager()
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("bob")), 1)
        self.assertIsNone(self.spool.message_path(env.queue_id))

    def test_restart_after_delivery_before_envelope_update_delivers_once(self):
        """If delivery happened but the envelope still says pending (crash), the restart does not deliver again."""
        from twisted_mta.delivery import maildir
        env = self.queue(["alice@example.test"])
        target = maildir.LocalTarget(0, "alice@example.test",
                                     os.path.join(self.base, "mail", "alice", "Maildir"))
        maildir.deliver(self.spool.message_path(env.queue_id), env, [target], self.config.hostname)
        self.manager()
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("alice")), 1)
        self.assertIsNone(self.spool.message_path(env.queue_id))

    def test_held_entries_not_attempted(self):
        """An entry in hold/ is not attempted at start."""
        env = self.queue(["alice@example.test"])
        self.spool.move(env.queue_id, "new", "hold")
        self.manager()
        self.clock.advance(3600)
        self.assertEqual(self.maildir_files("alice"), [])
        self.assertEqual(self.spool.state_of(env.queue_id), "hold")

    def test_unknown_local_user_fails_permanently(self):
        """A local recipient whose mailbox no longer exists fails with 5.1.1 and is not retried."""
        m = self.manager()
        env = self.queue(["carol@example.test", "alice@example.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertIsNone(self.spool.message_path(env.queue_id))
        self.assertEqual(len(self.maildir_files("alice")), 1)

    def test_delivery_events_logged(self):
        """Each delivery is logged with its queue id and recipient."""
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        m = self.manager()
        env = self.queue(["alice@example.test"])
        m.enqueue(env)
        self.clock.advance(0)
        delivered = [e for e in events if e.get("event") == "delivery.delivered"]
        self.assertEqual([(e["queue_id"], e["rcpt"]) for e in delivered],
                         [(env.queue_id, "alice@example.test")])


class DSNRequestTests(ManagerTestBase):
    """
    The sender's DSN requests (RFC 3461): NOTIFY, RET, ENVID.
    """

    def read_dsn(self, user="alice"):
        [path] = self.maildir_files(user)
        with open(path, "rb") as f:
            data = f.read()
        import email
        return data, email.message_from_bytes(data.split(b"\n", 1)[1])

    def test_notify_never_no_bounce(self):
        m = self.manager()
        env = self.queue(["carol@example.test"], sender="alice@example.test", notify=())
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        self.assertEqual(self.maildir_files("alice"), [])
        self.assertEqual(queued(m), [])

    def test_notify_success_local_delivery(self):
        """NOTIFY=SUCCESS gets a positive DSN with Action: delivered for a local mailbox."""
        m = self.manager()
        env = self.queue(["bob@example.test"], sender="alice@example.test",
                         notify=("SUCCESS",), envid="ENV-42")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        data, msg = self.read_dsn()
        self.assertIn(b"Subject: Successful Mail Delivery Report", data)
        status = msg.get_payload()[1].get_payload()
        self.assertEqual(status[0]["Original-Envelope-Id"], "ENV-42")
        self.assertEqual((status[1]["Action"], status[1]["Status"]), ("delivered", "2.0.0"))

    def test_notify_success_relayed_unless_passed_on(self):
        """Remote success: "relayed" when the server was not asked to confirm, nothing when the request went on."""
        m = self.manager()
        self.outbound.outcomes = {
            "x@elsewhere.test": Outcome(250, "2.0.0", "ok", "mx.elsewhere.test"),
            "y@elsewhere.test": Outcome(250, "2.0.0", "ok", "mx.elsewhere.test",
                                        dsn_passed=True)}
        env = self.queue(["x@elsewhere.test", "y@elsewhere.test"], sender="alice@example.test",
                         notify=("SUCCESS", "FAILURE"))
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        data, msg = self.read_dsn()
        blocks = msg.get_payload()[1].get_payload()
        self.assertEqual([(b["Final-Recipient"], b["Action"]) for b in blocks[1:]],
                         [("rfc822; x@elsewhere.test", "relayed")])
        [(hop, txn)] = self.outbound.sent
        self.assertEqual(txn.dsn, ((("SUCCESS", "FAILURE"), None),) * 2)

    def test_ret_full_returns_the_message(self):
        m = self.manager()
        env = self.queue(["carol@example.test"], sender="alice@example.test", ret="FULL",
                         body=b"Subject: t\r\n\r\nthe body text\r\n")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        data, msg = self.read_dsn()
        returned = msg.get_payload()[2]
        self.assertEqual(returned.get_content_type(), "message/rfc822")
        self.assertIn(b"the body text", data)

    def test_default_returns_headers_only(self):
        m = self.manager()
        env = self.queue(["carol@example.test"], sender="alice@example.test",
                         body=b"Subject: t\r\n\r\nthe body text\r\n")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(0)
        data, msg = self.read_dsn()
        self.assertEqual(msg.get_payload()[2].get_content_type(), "text/rfc822-headers")
        self.assertNotIn(b"the body text", data)


class TLSOverrideTests(ManagerTestBase):
    def test_release_with_override_is_one_shot(self):
        """release:relaxed makes the next attempt carry the override (logged), and the attempt after it does not."""
        from twisted_mta.queue import control
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertIsNone(self.outbound.sent[-1][1].tls_override)
        control.request(self.spool, "hold", env.queue_id)
        self.clock.advance(1)
        control.request(self.spool, "release:relaxed", env.queue_id)
        self.clock.advance(1)
        self.clock.advance(0)
        self.assertEqual(self.outbound.sent[-1][1].tls_override, "relaxed")
        self.assertIsNone(self.spool.load(env.queue_id).tls_override)
        self.clock.advance(600)
        self.assertIsNone(self.outbound.sent[-1][1].tls_override)
        self.assertEqual(len(self.outbound.sent), 3)


class RetryDelayTests(SynchronousTestCase):
    def test_schedule_is_data(self):
        """The n-th retry uses the n-th interval, then the last one forever."""
        schedule = (60, 600, 3600)
        self.assertEqual([retry_delay(schedule, n, 0) for n in (1, 2, 3, 4, 10)],
                         [60, 600, 3600, 3600, 3600])

    def test_jitter_bounds(self):
        """Jitter stays within +/- the configured fraction."""
        self.assertEqual(retry_delay((100,), 1, 0.1, rand=lambda: 0.0), 90)
        self.assertAlmostEqual(retry_delay((100,), 1, 0.1, rand=lambda: 1.0), 110)


class ControlTests(ManagerTestBase):
    """
    Operator requests through spool/control/, picked up by the running manager.
    """

    def deferred_entry(self):
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        return m, env.queue_id

    def ask(self, action, qid=None):
        from twisted_mta.queue import control
        control.request(self.spool, action, qid or control.ALL)
        self.clock.advance(1)

    def test_hold_and_release(self):
        """hold moves the entry to hold/ and stops its attempts; release makes it due at once."""
        m, qid = self.deferred_entry()
        self.ask("hold", qid)
        self.assertEqual(self.spool.state_of(qid), "hold")
        self.clock.advance(1000)  # past the next attempt (60 s), within the lifetime
        self.assertEqual(self.spool.load(qid).attempts, 1)
        self.ask("release", qid)  # due at once: attempted within this same second
        self.assertEqual(self.spool.state_of(qid), "cur")
        self.assertEqual(self.spool.load(qid).attempts, 2)
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "control")), [])

    def test_operator_requests_on_an_idle_entry(self):
        """An idle entry is found by the operator's requests: held it stays idle, in hold/; released it is due at once; flushed alone it is attempted; deleted it is gone."""
        a, b = (self.queue([f"{u}@elsewhere.test"]) for u in "ab")
        for env in (a, b):
            self.spool.update_and_move(attrs.evolve(env, next_attempt=T0 + 3600), "new", "cur")
        m = self.manager()
        self.assertEqual((m.entries, len(m.idle)), ({}, 2))
        self.ask("hold", a.queue_id)
        self.assertEqual(self.spool.state_of(a.queue_id), "hold")
        self.assertEqual(m.idle.find(a.queue_id).state, "hold")
        self.assertEqual(m.state_counts()["hold"], 1)
        self.assertNotIn(a.queue_id, m.entries)
        self.ask("flush", b.queue_id)
        self.assertEqual(self.spool.load(b.queue_id).attempts, 1)
        self.ask("release", a.queue_id)
        self.assertEqual(self.spool.load(a.queue_id).attempts, 1)
        self.ask("hold", a.queue_id)
        self.ask("delete", a.queue_id)
        self.assertIsNone(self.spool.state_of(a.queue_id))
        self.assertNotIn(a.queue_id, queued(m))
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "control")), [])

    def test_a_watched_request_is_carried_out_at_once(self):
        """
        With C{watch_control} (tap: inotify on spool/control/), a request is
        carried out when it lands, not at the next look a second later; the
        watch ends with the manager.
        """
        from twisted_mta.queue import control
        watched, stopped = [], []

        def watch(path, on_request):
            watched.append((path, on_request))
            return lambda: stopped.append(path)

        m = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                         self.targets(), watch_control=watch)
        m.startService()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        [(path, on_request)] = watched
        self.assertEqual(path, control.control_dir(self.spool))
        control.request(self.spool, "hold", env.queue_id)
        on_request()  # no clock advance: the watch, not the look every second
        self.assertEqual(self.spool.state_of(env.queue_id), "hold")
        self.assertEqual(os.listdir(path), [])
        self.successResultOf(m.stopService())
        self.assertEqual(stopped, [path])
        on_request()  # a late notification after the stop starts nothing

    def test_a_request_landing_during_a_poll_is_read_after_it(self):
        """A notification while a look is running is not lost: one more look follows it."""
        from twisted.internet import defer
        from twisted_mta.queue import control
        held = []
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        real = m.run_blocking

        def slow_first_look(f, *args):
            if f is control.read_requests and not held:
                held.append(defer.Deferred())
                return held[0].addCallback(lambda _: f(*args))
            return real(f, *args)

        m.run_blocking = slow_first_look
        m.operator.poll()  # finds nothing: no request yet
        control.request(self.spool, "hold", env.queue_id)
        m.operator.poll()  # lands while the first look runs
        held[0].callback(None)
        self.assertEqual(self.spool.state_of(env.queue_id), "hold")

    def test_release_of_entry_committed_to_hold(self):
        """An entry committed straight to hold/ (a milter's quarantine, never enqueued) is released and delivered."""
        m = self.manager()
        w = self.spool.new_message()
        body = b"Subject: t\r\n\r\nhello\r\n"
        env = Envelope(queue_id=w.queue_id, sender="s@remote.test",
                       recipients=(Recipient(address="alice@example.test"),),
                       arrival=self.clock.seconds(), next_attempt=self.clock.seconds(),
                       size=len(body))
        w.write(env.to_header())
        w.write(body)
        self.successResultOf(w.commit(env, hold=True))
        self.clock.advance(5)
        self.assertEqual(self.spool.state_of(env.queue_id), "hold")
        self.assertEqual(self.maildir_files("alice"), [])
        self.ask("release", env.queue_id)
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("alice")), 1)
        self.assertIsNone(self.spool.state_of(env.queue_id))

    def test_flush(self):
        """flush makes an entry (or all) due now instead of at its next attempt."""
        m, qid = self.deferred_entry()
        self.ask("flush", qid)
        self.clock.advance(0)
        self.assertEqual(self.spool.load(qid).attempts, 2)
        self.ask("flush")
        self.clock.advance(0)
        self.assertEqual(self.spool.load(qid).attempts, 3)

    def test_delete(self):
        """delete removes the entry and its timer."""
        m, qid = self.deferred_entry()
        self.ask("delete", qid)
        self.assertIsNone(self.spool.state_of(qid))
        self.assertEqual(queued(m), [])
        self.clock.advance(3600)

    def test_unknown_entry_request_dropped(self):
        """A request for an unknown entry is logged and removed."""
        self.manager()
        self.ask("hold", "NOPE")
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "control")), [])


class DelayWarningTests(ManagerTestBase):
    def setUp(self):
        ManagerTestBase.setUp(self)
        self.config = make_config(self.base, queue={"retry_schedule": [60, 600], "jitter": 0,
                                                    "lifetime": 3600, "delay_warning": 300})

    def test_one_delay_warning_after_the_configured_time(self):
        """Once a message has waited past delay_warning, the sender gets one 'delayed' DSN, not one per attempt."""
        m = self.manager()
        env = self.queue(["x@elsewhere.test"], sender="alice@example.test")
        m.enqueue(env)
        self.clock.advance(0)
        self.clock.advance(60)  # second attempt, 60 s old: no warning yet
        self.assertEqual(self.maildir_files("alice"), [])
        self.clock.advance(600)  # third attempt, 660 s old: warning
        self.clock.advance(0)
        [path] = self.maildir_files("alice")
        with open(path, "rb") as f:
            data = f.read()
        self.assertIn(b"Action: delayed", data)
        self.assertIn(b"Will-Retry-Until: ", data)
        self.assertTrue(self.spool.load(env.queue_id).warned)
        self.clock.advance(600)
        self.clock.advance(0)
        self.assertEqual(len(self.maildir_files("alice")), 1)

    def test_no_warning_when_turned_off(self):
        """delay_warning = false sends none."""
        self.config = make_config(self.base, queue={"retry_schedule": [60], "jitter": 0,
                                                    "lifetime": 3600, "delay_warning": False})
        m = self.manager()
        env = self.queue(["x@elsewhere.test"], sender="alice@example.test")
        m.enqueue(env)
        for _ in range(20):
            self.clock.advance(60)
        self.assertEqual(self.maildir_files("alice"), [])


@implementer(IDeliveryTarget)
class RecordingTarget:
    """
    A delivery target that records each request and answers from a list
    of behaviours: an outcome for every recipient, or an exception.
    """

    def __init__(self, name, *behaviours):
        self.name = name
        self.requests = []
        self.behaviours = list(behaviours)
        self.flushed = self.stopped = 0

    def deliver(self, request):
        self.requests.append(request)
        how = self.behaviours.pop(0) if len(self.behaviours) > 1 else self.behaviours[0]
        if isinstance(how, Exception):
            raise how
        return defer.succeed({r.address: how for r in request.recipients})

    def flush(self):
        self.flushed += 1

    def stop(self):
        self.stopped += 1


class SeamTests(ManagerTestBase):
    """
    The manager against verified fake targets: it calls them the same way,
    and a target or an attempt that raises never leaves an entry stuck.
    """

    OK = Outcome(250, "2.0.0", "ok")
    LATER = Outcome(451, "4.4.1", "later")

    def seam_manager(self, local, remote):
        for t in (local, remote):
            verifyObject(IDeliveryTarget, t)
        m = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                         Targets(local=local, remote=remote))
        m.startService()
        self.addCleanup(m.stopService)
        return m

    def test_targets_get_their_recipients_by_position(self):
        """Local recipients go to the local target, the others to the remote one, each request naming its recipients by position; operator flush and stop reach both."""
        local, remote = RecordingTarget("local", self.OK), RecordingTarget("remote", self.OK)
        m = self.seam_manager(local, remote)
        env = self.queue(["alice@example.test", "x@elsewhere.test", "bob@example.test"])
        m.enqueue(env)
        self.clock.advance(0)
        [lr], [rr] = local.requests, remote.requests
        self.assertEqual((lr.indexes, rr.indexes), ((0, 2), (1,)))
        self.assertEqual(lr.path, rr.path)
        self.assertIsNone(self.spool.message_path(env.queue_id))  # all delivered
        self.successResultOf(defer.maybeDeferred(m.operator.carry_out, "flush", "*"))
        self.assertEqual((local.flushed, remote.flushed), (1, 1))

    def test_a_target_that_raises_defers_its_recipients_once_logged(self):
        """A target raising (a bug) defers its own recipients with 4.3.0, logs the traceback once, and the local part is still delivered; the retry goes to the target again."""
        local = RecordingTarget("local", self.OK)
        remote = RecordingTarget("remote", RuntimeError("boom"), self.OK)
        m = self.seam_manager(local, remote)
        env = self.queue(["alice@example.test", "x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        stored = self.spool.load(env.queue_id)
        self.assertEqual([r.state for r in stored.recipients], ["delivered", "pending"])
        self.assertEqual(stored.recipients[1].outcome.enhanced, "4.3.0")
        self.clock.advance(60)
        self.assertEqual(len(remote.requests), 2)
        self.assertIsNone(self.spool.message_path(env.queue_id))

    def test_a_crashed_attempt_is_rescheduled(self):
        """An attempt that raises outside the targets (here: storing its result) is logged once and tried again on the retry schedule, not left without a timer (it used to stay idle forever)."""
        remote = RecordingTarget("remote", self.LATER)
        m = self.seam_manager(RecordingTarget("local", self.OK), remote)
        env = self.queue(["x@elsewhere.test"])
        real_store, calls = m._store, []

        def broken_store(envelope):
            calls.append(envelope)
            if len(calls) == 1:
                raise OSError("disk trouble")
            return real_store(envelope)
        m._store = broken_store
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(len(remote.requests), 1)
        self.clock.advance(59)
        self.assertEqual(len(remote.requests), 1)
        self.clock.advance(1)  # retry_schedule[0] = 60 s
        self.assertEqual(len(remote.requests), 2)
        self.clock.advance(10 * 3600)
        self.assertGreater(len(remote.requests), 2)

    def test_targets_must_provide_the_interface(self):
        class NotATarget:
            pass
        self.assertRaises(TypeError, Targets, local=NotATarget(),
                          remote=RecordingTarget("remote", self.OK))


class DamagedFileTests(ManagerTestBase):
    def test_truncated_queue_file_is_not_sent_out(self):
        """A queue file cut short after its 250 (its length no longer the one recorded at commit) is not handed to the remote server damaged: the recipient is deferred with 4.3.0 naming the problem (a restart quarantines the entry)."""
        m = self.manager()
        env = self.queue(["x@elsewhere.test"], body=b"Subject: t\r\n\r\n" + b"a" * 4000 + b"\r\n")
        self.assertIsNotNone(env.file_size)
        path = self.spool.message_path(env.queue_id)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1000)
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(self.outbound.sent, [])
        self.assertRaises(EnvelopeError, self.spool.load, env.queue_id)  # damaged: refused
        stored = m.entries[env.queue_id]
        outcome = stored.recipients[0].outcome
        self.assertEqual((stored.recipients[0].state, outcome.enhanced), ("pending", "4.3.0"))
        self.assertIn("could not read the queued message", outcome.text)


class HangingTarget(RecordingTarget):
    """
    A target whose deliveries end when the test says: C{finish(outcome)}
    fires the oldest one still open.
    """

    def __init__(self, name):
        super().__init__(name, Outcome(451, "4.4.1", "later"))
        self.open = []

    def deliver(self, request):
        self.requests.append(request)
        d = defer.Deferred()
        self.open.append((request, d))
        return d

    def finish(self, outcome):
        request, d = self.open.pop(0)
        d.callback({r.address: outcome for r in request.recipients})


class LargeQueueTests(ManagerTestBase):
    """
    A large queue stays smooth: one timer for all entries, bounded work
    per reactor turn, a stop that waits only for what is in flight, and a
    start-up that reads the spool in batches.
    """

    LATER = Outcome(451, "4.4.1", "later")

    def setUp(self):
        super().setUp()
        self.config = make_config(self.base, queue={"retry_schedule": [60, 600], "jitter": 0,
                                                    "lifetime": 3600,
                                                    "delivery_concurrency": 3})
        self.remote = HangingTarget("remote")

    def large_manager(self, count, run_blocking=None):
        qids = [self.queue([f"u{i}@elsewhere.test"]).queue_id for i in range(count)]
        m = QueueManager(self.config, self.spool, self.clock,
                         run_blocking or self.run_blocking,
                         Targets(local=RecordingTarget("local", self.LATER), remote=self.remote))
        m.startService()
        self.addCleanup(m.stopService)
        return m, qids

    def test_one_timer_for_all_entries(self):
        """Thirty entries due at thirty times hold one timer between them (plus the control poll), not one each; each is attempted at its time."""
        m, qids = self.large_manager(30)
        for i, qid in enumerate(qids):
            m.schedule(qid, T0 + 100 + i)
        self.assertLessEqual(len(self.clock.getDelayedCalls()), 2)
        self.clock.advance(100)
        self.assertEqual([r.envelope.queue_id for r in self.remote.requests], [qids[0]])
        self.clock.advance(1)
        self.assertEqual(len(self.remote.requests), 2)

    def test_attempts_bounded_by_concurrency_and_per_turn(self):
        """Of twelve due entries, a pump starts at most ATTEMPTS_PER_TURN and never more than delivery_concurrency at once; the next starts in the turn after one ends."""
        from twisted_mta.queue import manager
        self.patch(manager, "ATTEMPTS_PER_TURN", 2)
        m, qids = self.large_manager(12)
        m._pump()
        self.assertEqual(len(self.remote.requests), 2)
        self.clock.advance(0)
        self.assertEqual(len(self.remote.requests), 3)
        self.remote.finish(self.LATER)
        self.assertEqual(len(self.remote.requests), 3)
        self.clock.advance(0)
        self.assertEqual(len(self.remote.requests), 4)
        self.assertEqual(len(m.active), 3)

    def test_flush_in_batches(self):
        """A flush makes FLUSH_BATCH entries due per reactor turn, skipping held ones, until all are."""
        from twisted_mta.queue import manager
        self.patch(manager, "FLUSH_BATCH", 3)
        m, qids = self.large_manager(7)
        for qid in qids:
            m.schedule(qid, T0 + 3600)
        m.states[qids[6]] = "hold"
        m.unschedule(qids[6])
        m.flush()
        due = [q for q, t in m._due_at.items() if t <= T0]
        self.assertEqual(len(due), 3)
        self.clock.advance(0)
        started = [r.envelope.queue_id for r in self.remote.requests]
        self.assertEqual(len(started), 3)  # delivery_concurrency
        self.assertEqual(sorted([q for q, t in m._due_at.items() if t <= T0] + started),
                         sorted(qids[:6]))

    def idle_manager(self, count, due, target=None):
        """A manager started over C{count} entries due at C{due}: idle."""
        qids = []
        for i in range(count):
            env = self.queue([f"u{i}@elsewhere.test"])
            self.spool.update(attrs.evolve(env, next_attempt=due), "new")
            qids.append(env.queue_id)
        m = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                         Targets(local=RecordingTarget("local", self.LATER),
                                 remote=target or self.remote))
        m.startService()
        self.addCleanup(m.stopService)
        return m, qids

    def test_idle_entries_are_lines_until_their_minute_nears(self):
        """Entries loaded not due for an hour are in the tables as nothing but lines of bytes; they come back a minute before their minute and are attempted at their time, not before."""
        from twisted_mta.queue import idle
        m, qids = self.idle_manager(6, T0 + 3600)
        self.assertEqual((m.entries, m.states, m._due_at, m._heap), ({}, {}, {}, []))
        self.assertEqual(sorted(e.queue_id for e in m.idle), sorted(qids))
        self.assertEqual(m.state_counts(), {"new": 6, "cur": 0, "hold": 0})
        self.clock.advance(3600 - idle.RIPEN - 1)
        self.assertEqual((m.entries, len(m.idle)), ({}, 6))
        self.clock.advance(1)
        self.assertEqual((sorted(m.entries), len(m.idle)), (sorted(qids), 0))
        self.assertEqual(m.state_counts(), {"new": 6, "cur": 0, "hold": 0})
        self.clock.advance(idle.RIPEN - 1)
        self.assertEqual(self.remote.requests, [])
        self.clock.advance(1)
        self.assertEqual(len(self.remote.requests), 3)  # delivery_concurrency
        for request in self.remote.requests:
            self.assertTrue(request.recovering)  # loaded at start: as after a crash

    def test_a_flush_of_idle_entries_keeps_few_in_the_tables(self):
        """A flush of idle entries brings them into the tables PULL_BATCH at a time as attempts make room, never all of them; each is attempted once; as the queue drains, freed memory is given back."""
        from twisted_mta.queue import manager
        self.patch(manager, "PULL_BATCH", 4)
        self.patch(manager, "SHRINK_FROM", 8)
        released = []
        self.patch(manager, "release_memory", lambda: released.append(m.size()))
        ok = RecordingTarget("remote", Outcome(250, "2.0.0", "ok"))
        m, qids = self.idle_manager(40, T0 + 3600, target=ok)
        sizes = []  # the tables at each attempt
        deliver = ok.deliver
        ok.deliver = lambda request: sizes.append(len(m.entries)) or deliver(request)
        m.flush()
        for _ in range(40):
            self.clock.advance(0)
        self.assertEqual(sorted(r.envelope.queue_id for r in ok.requests), sorted(qids))
        self.assertEqual(queued(m), [])
        self.assertEqual(len(sizes), 40)
        self.assertLessEqual(max(sizes), 4 + 3)  # a batch, and the attempts under way
        self.assertEqual(released, [9, 2])  # below a quarter of 40, then of 9

    def test_an_attempt_that_defers_for_long_leaves_a_line(self):
        """After an attempt whose next one is more than IDLE_AFTER away the entry is idle again: out of the tables, in cur/, due at its next attempt."""
        m, qids = self.idle_manager(1, T0 + 3600)
        m.flush()
        self.clock.advance(0)
        self.remote.finish(self.LATER)  # retried in 60 s: kept in the tables
        self.assertEqual(list(m.states.items()), [(qids[0], "cur")])
        self.clock.advance(60)
        self.remote.finish(self.LATER)  # retried in 600 s: idle
        self.assertEqual((m.entries, m.states), ({}, {}))
        self.assertEqual(m.idle.find(qids[0])[1:], ("cur", T0 + 660, False))

    def test_stop_waits_only_for_attempts_in_flight(self):
        """SIGTERM with twelve entries due: stopping waits for the three in flight, starts none of the others, and leaves them in the spool."""
        m, qids = self.large_manager(12)
        self.clock.advance(0)
        self.assertEqual(len(self.remote.requests), 3)
        d = m.stopService()
        self.assertNoResult(d)
        for _ in range(3):
            self.remote.finish(self.LATER)
        self.successResultOf(d)
        self.assertEqual(len(self.remote.requests), 3)
        self.assertEqual(sorted(entry[0] for entry in self.spool.scan()), sorted(qids))

    def test_start_up_reads_the_spool_in_batches(self):
        """At start the entries are read LOAD_BATCH at a time in the I/O threads, each batch scheduled as it comes; operator requests are read once all are in, and an entry queued meanwhile keeps its state, idle or not."""
        from twisted_mta.queue import manager
        self.patch(manager, "LOAD_BATCH", 2)
        calls = []

        def later(f, *args):
            d = defer.Deferred()
            calls.append((f, args, d))
            return d

        def run_next():
            f, args, d = calls.pop(0)
            d.callback(f(*args))

        m, qids = self.large_manager(5, later)
        self.assertEqual(queued(m), [])
        self.assertNoResult(m.loaded)
        run_next()
        self.assertEqual(sorted(m.entries), qids[:2])
        m.enqueue(self.spool.load(qids[3]))
        m.states[qids[3]] = "cur"  # as if attempted meanwhile
        m.enqueue(self.spool.load(qids[4]))
        m.park(qids[4], "cur", T0 + 3600)  # attempted meanwhile, deferred for an hour: idle
        self.assertIsNone(m._control)
        run_next()
        run_next()
        self.successResultOf(m.loaded)
        self.assertEqual((sorted(m.entries), m.states[qids[3]]), (qids[:4], "cur"))
        self.assertEqual(list(m.idle), [IdleEntry(qids[4], "cur", T0 + 3600, False)])
        self.assertTrue(m._control.running)

    def test_many_entries_due_in_the_past_arm_the_timer_once(self):
        """Entries made due at a time already past (a flush's "now") re-use the armed timer instead of replacing it for each."""
        m, qids = self.large_manager(5)
        self.clock.advance(0)  # the loaded entries start
        self.clock.advance(10)
        calls = []
        real = self.clock.callLater
        self.patch(self.clock, "callLater", lambda *a, **kw: (calls.append(a), real(*a, **kw))[1])
        for qid in qids:
            m.schedule(qid, T0)
        self.assertEqual(len(calls), 1)


class GoneInSendingTests(ManagerTestBase):
    """
    The outbound pool finds the queue file gone (a worker's "gone" answer):
    the entry is forgotten as vanished and no crash is logged.  The
    gathering of results used to wrap MessageGone in FirstError, which
    the manager took for a crash.
    """

    def attempt(self, rcpts):
        from twisted.logger import globalLogPublisher
        sent = []

        def deliver(hop, txn):
            sent.append(hop)
            return defer.fail(MessageGone("gone"))

        self.outbound.deliver = deliver
        m = self.manager()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        env = self.queue(rcpts)
        m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(len(sent), len(rcpts))
        self.assertNotIn(env.queue_id, m.entries)
        said = [e.get("log_format", "") for e in events if e.get("queue_id") == env.queue_id]
        self.assertTrue(any("vanished" in f for f in said), said)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_one_next_hop(self):
        """One next hop: vanished, not crashed."""
        self.attempt(["x@elsewhere.test"])

    def test_two_next_hops(self):
        """Two next hops, both gone: vanished, not crashed."""
        self.attempt(["x@elsewhere.test", "y@other.test"])


class IdleEntryTests(ManagerTestBase):
    def test_idle_entry_holds_no_envelope_and_is_read_when_due(self):
        """An entry deferred for longer than IDLE_AFTER keeps no envelope in memory; when due it is read from the spool and attempted with its recorded state; one due sooner keeps its envelope."""
        from twisted_mta.queue import manager
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertIsNotNone(m.entries[env.queue_id])  # retried in 60 s
        self.patch(manager, "IDLE_AFTER", 30)
        self.clock.advance(60)
        self.assertNotIn(env.queue_id, m.entries)  # retried in 600 s: idle
        self.assertEqual(m.idle.find(env.queue_id)[1:], ("cur", T0 + 660, False))
        self.assertEqual(len(self.outbound.sent), 2)
        self.clock.advance(600)
        self.assertEqual(len(self.outbound.sent), 3)
        self.assertEqual(self.spool.load(env.queue_id).attempts, 3)

    def test_reads_go_to_the_reading_pool_removals_to_the_io_pool(self):
        """Reading an idle entry goes through C{run_reading} (inline, or a small pool while the disk is slow), told the directory the entry is in; the attempt's results are written, and a finished entry removed, through C{run_blocking}."""
        from twisted_mta.queue import manager
        self.patch(manager, "IDLE_AFTER", 30)
        reading, blocking = [], []

        def run_reading(f, *args):
            reading.append((f.__name__, *args))
            return self.run_blocking(f, *args)

        def run_blocking(f, *args):
            blocking.append(f.__name__)
            return self.run_blocking(f, *args)

        m = QueueManager(self.config, self.spool, self.clock, run_blocking, self.targets(),
                         run_reading=run_reading)
        m.startService()
        self.addCleanup(m.stopService)
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        # no envelope held (idle, or back in the tables: its minute is near)
        self.assertIsNone(m.entries.get(env.queue_id))
        self.assertEqual(queued(m), [env.queue_id])
        self.assertIn("update_and_move", blocking)
        self.outbound.outcomes["x@elsewhere.test"] = Outcome(250, "2.0.0", "ok")
        self.clock.advance(60)
        self.assertIsNone(self.spool.message_path(env.queue_id))
        # With the directory it was moved to: the read looks there first.
        self.assertEqual(reading, [("load", env.queue_id, "cur")])
        self.assertNotIn("load", blocking)
        self.assertIn("run_all", blocking)  # the batch of removals

    def test_removals_gathered_into_one_hop(self):
        """
        With C{remove_gather}, the entries that finish within that time are
        removed in one trip to the I/O threads, which starts when the time
        is up; until then each entry is still on disk and its attempt still
        under way.
        """
        ok = Outcome(250, "2.0.0", "ok")
        hops = []

        def run_blocking(f, *args):
            if f.__name__ == "run_all":
                hops.append(f)
            return self.run_blocking(f, *args)

        m = QueueManager(self.config, self.spool, self.clock, run_blocking,
                         Targets(local=RecordingTarget("local", ok),
                                 remote=RecordingTarget("remote", ok)), remove_gather=0.02)
        m.startService()
        self.addCleanup(m.stopService)
        envs = [self.queue([f"u{i}@elsewhere.test"]) for i in range(3)]
        for env in envs:
            m.enqueue(env)
        self.clock.advance(0)
        self.assertEqual(hops, [])
        self.assertEqual(len(m.active), 3)
        for env in envs:
            self.assertIsNotNone(self.spool.message_path(env.queue_id))
        self.clock.advance(0.02)
        self.assertEqual(len(hops), 1)
        for env in envs:
            self.assertIsNone(self.spool.message_path(env.queue_id))
        self.assertEqual(queued(m), [])
        self.assertEqual(len(m.active), 0)

    def test_stopping_removes_what_waits(self):
        """A stop does not wait out the gathering time: the waiting removals start at once, and the stop ends when they are done."""
        ok = Outcome(250, "2.0.0", "ok")
        m = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                         Targets(local=RecordingTarget("local", ok),
                                 remote=RecordingTarget("remote", ok)), remove_gather=60)
        m.startService()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertIsNotNone(self.spool.message_path(env.queue_id))
        stopped = m.stopService()
        self.successResultOf(stopped)
        self.assertIsNone(self.spool.message_path(env.queue_id))

    def test_idle_entry_gone_from_disk_is_forgotten(self):
        """An idle entry whose queue file vanished is forgotten, logged, when it comes due."""
        from twisted_mta.queue import manager
        self.patch(manager, "IDLE_AFTER", 30)
        m = self.manager()
        env = self.queue(["x@elsewhere.test"])
        m.enqueue(env)
        self.clock.advance(0)
        self.assertIsNone(m.entries.get(env.queue_id))
        self.assertEqual(queued(m), [env.queue_id])
        self.spool.remove(env.queue_id)
        self.clock.advance(60)
        self.assertEqual(queued(m), [])
        self.assertEqual(len(self.outbound.sent), 1)

    def test_tables_rebuilt_when_the_queue_drains(self):
        """Once the queue has drained below a quarter of its peak, its tables are copied (a dict keeps its size otherwise) and freed memory is released; what is left stays."""
        from twisted_mta.queue import manager
        self.patch(manager, "SHRINK_FROM", 4)
        released = []
        self.patch(manager, "release_memory", lambda: released.append(1))
        ok = Outcome(250, "2.0.0", "ok")
        m = QueueManager(self.config, self.spool, self.clock, self.run_blocking,
                         Targets(local=RecordingTarget("local", ok),
                                 remote=RecordingTarget("remote", ok)))
        m.startService()
        self.addCleanup(m.stopService)
        table = m.entries
        held = self.queue(["x@elsewhere.test"])
        m.enqueue(held)
        m.states[held.queue_id] = "hold"
        m.unschedule(held.queue_id)
        for i in range(9):
            m.enqueue(self.queue([f"u{i}@elsewhere.test"]))
        self.clock.advance(0)
        self.assertEqual(list(m.entries), [held.queue_id])
        self.assertIsNot(m.entries, table)
        self.assertTrue(released)
