"""
Tests for the Maildir-backed spool: durable commit, recovery, lock.
"""

import gc
import json
import os

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from twisted_mta.model import Envelope, EnvelopeError, Recipient
from twisted_mta.queue.spool import Spool, SpoolError, message_offset, read_head


def envelope(qid, rcpts=("alice@example.test",)):
    return Envelope(queue_id=qid, sender="s@remote.test",
                    recipients=tuple(Recipient(address=r) for r in rcpts),
                    arrival=1_800_000_000.5, next_attempt=1_800_000_000.5)


class SpoolTests(SynchronousTestCase):
    def setUp(self):
        self.spool = Spool(self.mktemp())
        self.spool.lock()
        self.addCleanup(self.spool.unlock)

    def listing(self):
        return {d: sorted(os.listdir(os.path.join(self.spool.path, d)))
                for d in ("tmp", "new", "cur", "hold", "corrupt", "envelopes")}

    def commit(self, body=b"Subject: x\r\n\r\nbody\r\n"):
        w = self.spool.new_message()
        env = envelope(w.queue_id)
        w.write(env.to_header())
        w.write(body)
        self.assertEqual(self.successResultOf(w.commit(env)), env)
        return w.queue_id

    def test_layout_is_a_maildir(self):
        """The spool has Maildir's tmp/new/cur plus hold/, corrupt/ and envelopes/."""
        for d in ("tmp", "new", "cur", "hold", "corrupt", "envelopes"):
            self.assertTrue(os.path.isdir(os.path.join(self.spool.path, d)), d)

    def test_commit_moves_message_and_envelope_into_place(self):
        """After commit the entry is one file in new/: envelope header, then the message; tmp/ is empty."""
        qid = self.commit()
        self.assertEqual(self.listing()["new"], [qid])
        self.assertEqual(self.listing()["envelopes"], [])
        self.assertEqual(self.listing()["tmp"], [])
        with open(os.path.join(self.spool.path, "new", qid), "rb") as f:
            self.assertTrue(f.read().startswith(b"X-Twisted-MTA-Envelope: "))
        self.assertEqual(self.spool.read_message(qid), b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(self.spool.load(qid), envelope(qid))

    def test_message_offset_is_read_heads(self):
        """message_offset finds where the message starts without parsing the header: read_head's offset; a file cut inside its header is an error."""
        qid = self.commit()
        path = os.path.join(self.spool.path, "new", qid)
        self.assertEqual(message_offset(path), read_head(path)[1])
        with open(path, "rb") as f:
            head = f.read(40)
        cut = os.path.join(self.spool.path, "tmp", "cut")
        with open(cut, "wb") as f:
            f.write(head)
        self.assertRaises(EnvelopeError, message_offset, cut)

    def test_load_looks_where_it_is_told_first(self):
        """load with the state the caller knows reads that directory and stats no other; a stale one (the entry moved) still finds it; no entry is FileNotFoundError; a name that is not a state is refused."""
        qid = self.commit()
        looked = []
        real_exists = os.path.exists
        self.patch(os.path, "exists", lambda p: (looked.append(p), real_exists(p))[1])
        self.assertEqual(self.spool.load(qid, "new"), envelope(qid))
        self.assertEqual([os.path.basename(os.path.dirname(p)) for p in looked], ["envelopes"])
        self.spool.move(qid, "new", "cur")
        self.assertEqual(self.spool.load(qid, "new"), envelope(qid))
        self.assertEqual(self.spool.load(qid, "hold"), envelope(qid))
        self.spool.remove(qid)
        self.assertRaises(FileNotFoundError, self.spool.load, qid, "cur")
        self.assertRaises(ValueError, self.spool.load, qid, "../cur")

    def test_reading_back_leaves_no_cycle(self):
        """Reading entries back (load, with and without a recorded state; recover_entries) leaves nothing for the cyclic collector: a cycle there would keep the reading frames, and the batch of entries a start-up load returned, until the collector came by."""
        fresh = self.commit()
        stated = self.commit()
        self.spool.update_and_move(attrs.evolve(envelope(stated), attempts=1), "new", "cur")
        gc.collect()
        if gc.isenabled():
            gc.disable()
            self.addCleanup(gc.enable)
        self.assertEqual(self.spool.load(fresh), envelope(fresh))
        self.assertEqual(self.spool.load(stated, "cur").attempts, 1)
        report = self.spool.recover_entries(self.spool.recover_start().pending)
        self.assertEqual(sorted(e.queue_id for e, _ in report.entries), sorted([fresh, stated]))
        del report
        self.assertEqual(gc.collect(), 0)

    def test_tls_required_no_past_the_first_read(self):
        """An entry read from its header alone finds "TLS-Required: No" in its header section wherever the first read of the file ended: in a small message, after 64 KiB of other fields, and in a 200 KiB message; one in the body does not count."""
        # Past the first read of the file (64 KiB, the envelope header
        # first) and inside the 64 KiB of message scanned.
        filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 60) for i in range(839))
        filler += b"X-Pad: " + b"p" * 49 + b"\r\n"
        self.assertEqual(len(filler), 65500)
        cases = [
            (b"TLS-Required: No\r\n\r\nbody\r\n", True),
            (filler + b"TLS-Required: No\r\n\r\nbody\r\n", True),
            (b"Subject: x\r\nTLS-Required: No\r\n\r\n" + b"b" * 200_000 + b"\r\n", True),
            (filler + b"\r\nTLS-Required: No\r\n", False),
        ]
        for body, no in cases:
            qid = self.commit(body)
            if body.startswith(filler) and no:
                path = os.path.join(self.spool.path, "new", qid)
                self.assertGreater(message_offset(path) + len(filler), 65536)
            self.assertIs(self.spool.load(qid).tls_required_no, no, body[-40:])
            self.assertIs(self.spool.load(qid, "new").tls_required_no, no, body[-40:])

    def test_iter_scan_reads_one_entry_at_a_time(self):
        """iter_scan reads an entry only when asked for it (a queue of any size lists in constant memory), in scan's order; find reads one entry without listing."""
        qids = sorted(self.commit() for _ in range(3))
        reads = []
        real = self.spool.read
        self.patch(self.spool, "read", lambda qid, *a: (reads.append(qid), real(qid, *a))[1])
        it = self.spool.iter_scan()
        first = next(it)
        self.assertEqual((first[0], first[1], reads), (qids[0], "new", [qids[0]]))
        self.assertEqual([e[0] for e in it], qids[1:])
        self.assertEqual(self.spool.scan(), [(q, "new", envelope(q), None) for q in qids])
        self.patch(self.spool, "_names", lambda name: self.fail("find listed " + name))
        self.assertEqual(self.spool.find(qids[1]), (qids[1], "new", envelope(qids[1]), None))
        self.assertIsNone(self.spool.find("NOSUCHENTRY"))

    def test_commit_fsyncs_before_firing(self):
        """The commit's Deferred fires only after the file and new/ were fsync'd."""
        calls = []
        real_fsync = os.fsync
        self.patch(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
        w = self.spool.new_message()
        w.write(envelope(w.queue_id).to_header())
        d = w.commit(envelope(w.queue_id))
        self.successResultOf(d)
        self.assertEqual(len(calls), 2)

    def test_read_headers_only(self):
        """read_headers returns the message's header section, without the envelope or the body."""
        qid = self.commit(b"Subject: x\r\nX-A: 1\r\n\r\n" + b"body\r\n" * 100000)
        self.assertEqual(self.spool.read_headers(qid), b"Subject: x\r\nX-A: 1\r\n")

    def test_state_overrides_header(self):
        """After update() the entry's envelope is the recorded state, kept in an xattr: no file is created."""
        qid = self.commit()
        import attrs
        self.spool.update(attrs.evolve(self.spool.load(qid), attempts=2), "new")
        self.assertEqual(self.spool.load(qid).attempts, 2)
        self.assertEqual(self.listing()["envelopes"], [])
        self.assertEqual(self.listing()["tmp"], [])

    def test_large_state_goes_to_a_file(self):
        """A state too large for an xattr goes to envelopes/<id>.json, and the xattr is dropped."""
        qid = self.commit()
        import attrs
        from twisted_mta.model import Outcome
        from twisted_mta.queue.spool import XATTR
        self.spool.update(attrs.evolve(self.spool.load(qid), attempts=1), "new")
        big = attrs.evolve(self.spool.load(qid), attempts=2,
                           last_outcome=Outcome(451, "4.4.0", "x" * 5000))
        self.spool.update(big, "new")
        self.assertEqual(self.listing()["envelopes"], [qid + ".json"])
        self.assertEqual(self.spool.load(qid), big)
        with self.assertRaises(OSError):
            os.getxattr(os.path.join(self.spool.path, "new", qid), XATTR)
        small = attrs.evolve(big, attempts=3, last_outcome=None)
        self.spool.update(small, "new")
        self.assertEqual(self.listing()["envelopes"], [])
        self.assertEqual(self.spool.load(qid), small)

    def test_without_xattr_support_uses_a_file(self):
        """On a file system without user xattrs the state goes to a file."""
        import errno
        qid = self.commit()

        def unsupported(*a):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        self.patch(os, "setxattr", unsupported)
        import attrs
        self.spool.update(attrs.evolve(self.spool.load(qid), attempts=5), "new")
        self.assertEqual(self.listing()["envelopes"], [qid + ".json"])
        self.assertEqual(self.spool.load(qid).attempts, 5)

    def test_abort_leaves_nothing(self):
        """An aborted message leaves no file behind."""
        w = self.spool.new_message()
        w.write(b"partial")
        w.abort()
        self.assertEqual(self.listing()["tmp"], [])

    def test_small_message_touches_no_disk_before_commit(self):
        """Receiving a message below the spill size creates no file (nothing blocks the reactor)."""
        w = self.spool.new_message()
        w.write(b"Subject: x\r\n\r\n" + b"y" * 1000)
        self.assertEqual(self.listing()["tmp"], [])

    def test_large_message_spills_in_order(self):
        """A message larger than the spill size is written to tmp/ as it arrives and stored intact."""
        w = self.spool.new_message()
        pieces = [bytes([65 + i % 26]) * 50000 for i in range(10)]
        for i, piece in enumerate(pieces):
            w.write(piece)
            if i == 3:
                self.assertEqual(self.listing()["tmp"], [w.queue_id])
        self.successResultOf(w.commit(envelope(w.queue_id)))  # raw body: no header parsing here
        with open(os.path.join(self.spool.path, "new", w.queue_id), "rb") as f:
            self.assertEqual(f.read(), b"".join(pieces))

    def test_abort_after_spill_removes_file(self):
        """Aborting a message that already spilled to tmp/ removes the file."""
        w = self.spool.new_message()
        w.write(b"z" * (w.SPILL * 2))
        self.assertEqual(len(self.listing()["tmp"]), 1)
        self.successResultOf(w.abort())
        self.assertEqual(self.listing()["tmp"], [])

    def test_chown_hands_spool_to_service_user(self):
        """chown() gives the spool's directories, lock and entries to the user twistd switches to."""
        if os.getuid() != 0:
            raise SkipTest("needs root to change ownership")
        qid = self.commit()
        self.spool.chown(65534, 65534)
        for path in (self.spool.path, os.path.join(self.spool.path, "tmp"),
                     os.path.join(self.spool.path, "lock"),
                     os.path.join(self.spool.path, "new", qid)):
            st = os.stat(path)
            self.assertEqual((st.st_uid, st.st_gid), (65534, 65534), path)

    def test_queue_ids_unique(self):
        """Queue ids do not repeat and contain no '/', ':' or leading dot."""
        ids = {self.spool.new_queue_id() for _ in range(1000)}
        self.assertEqual(len(ids), 1000)
        for qid in ids:
            self.assertNotIn("/", qid)
            self.assertNotIn(":", qid)
            self.assertFalse(qid.startswith("."))

    def test_second_owner_refused(self):
        """A second Spool on the same directory cannot take the lock, and says who holds it."""
        other = Spool(self.spool.path)
        with self.assertRaises(SpoolError) as cm:
            other.lock()
        self.assertIn("is in use by another process (pid %d)" % os.getpid(), str(cm.exception))

    def test_lock_released(self):
        """After unlock another owner may take the spool."""
        self.spool.unlock()
        other = Spool(self.spool.path)
        other.lock()
        other.unlock()

    def test_recover_removes_debris(self):
        """Files in tmp/ at start are debris of unacknowledged messages and are removed."""
        w = self.spool.new_message()
        w.write(b"x" * (w.SPILL + 1))
        self.assertEqual(len(self.listing()["tmp"]), 1)
        report = self.spool.recover()
        self.assertEqual(report.removed_debris, 1)
        self.assertEqual(self.listing()["tmp"], [])

    def test_recover_removes_orphan_state_file(self):
        """A state file without its queue file (crash during removal) is removed."""
        qid = self.commit()
        with open(self.spool.envelope_path(qid), "wb") as f:
            f.write(self.spool.load(qid).to_json())
        os.unlink(os.path.join(self.spool.path, "new", qid))
        report = self.spool.recover()
        self.assertEqual(report.removed_orphans, 1)
        self.assertEqual(self.listing()["envelopes"], [])

    def test_recover_quarantines_file_without_envelope(self):
        """A queue file without a readable envelope header is moved to corrupt/, never deleted."""
        path = os.path.join(self.spool.path, "new", "STRAY")
        with open(path, "wb") as f:
            f.write(b"Subject: no envelope\r\n\r\n")
        report = self.spool.recover()
        self.assertEqual(report.quarantined, ("STRAY",))
        self.assertEqual(self.listing()["corrupt"], ["STRAY"])
        self.assertEqual(self.listing()["new"], [])

    def test_recover_quarantines_damaged_header(self):
        """A queue file whose envelope header does not decode is quarantined with its state file."""
        qid = self.commit()
        with open(self.spool.envelope_path(qid), "wb") as f:
            f.write(self.spool.load(qid).to_json())
        path = os.path.join(self.spool.path, "new", qid)
        with open(path, "r+b") as f:
            f.seek(30)
            f.write(b"!!!!")
        report = self.spool.recover()
        self.assertEqual(report.quarantined, (qid,))
        self.assertEqual(self.listing()["corrupt"], sorted([qid, qid + ".json"]))

    def test_recover_unreadable_state_falls_back_to_header(self):
        """A torn state file (not fsync'd before a crash) falls back to the envelope in the queue file."""
        qid = self.commit()
        with open(self.spool.envelope_path(qid), "wb") as f:
            f.write(b"")
        report = self.spool.recover()
        self.assertEqual(report.quarantined, ())
        self.assertEqual([e for e, _ in report.entries], [envelope(qid)])
        self.assertEqual(self.listing()["envelopes"], [])

    def test_recover_returns_live_entries_with_state(self):
        """Complete entries in new/, cur/ and hold/ are returned with their state."""
        a, b, c = self.commit(), self.commit(), self.commit()
        self.spool.move(b, "new", "cur")
        self.spool.move(c, "new", "hold")
        report = self.spool.recover()
        self.assertEqual(sorted((e.queue_id, s) for e, s in report.entries),
                         sorted([(a, "new"), (b, "cur"), (c, "hold")]))

    def test_update_replaces_envelope(self):
        """update() replaces the state and leaves nothing in tmp/."""
        qid = self.commit()
        env = self.spool.load(qid)
        import attrs
        self.spool.update(attrs.evolve(env, attempts=3), "new")
        self.spool.update(attrs.evolve(env, attempts=4), "new")
        self.assertEqual(self.spool.load(qid).attempts, 4)
        self.assertEqual(self.listing()["tmp"], [])

    def test_remove(self):
        """remove() deletes message and envelope."""
        qid = self.commit()
        self.spool.remove(qid)
        listing = self.listing()
        self.assertEqual(listing["new"] + listing["envelopes"], [])


class EnvelopeTests(SynchronousTestCase):
    def test_round_trip(self):
        """An envelope survives JSON and back unchanged."""
        from twisted_mta.model import Outcome
        env = envelope("Q1", ("a@x.test", "b@y.test"))
        env = env.with_results({"a@x.test": Recipient(address="a@x.test", state="delivered",
                                                      outcome=Outcome(250, "2.0.0", "ok"),
                                                      done_at=5.0)})
        self.assertEqual(Envelope.from_json(env.to_json()), env)

    def test_to_dict_is_what_to_json_decodes_to(self):
        """to_dict gives what json.loads(to_json()) gives, every optional field set or not."""
        from twisted_mta.model import Outcome
        plain = envelope("Q3", ("a@x.test",))
        failed = Outcome(550, "5.7.1", "no", remote_mta="mx.x.test", dsn_passed=True,
                         kind="tls", policy="dane", final_text="550 5.7.1 no")
        rich = attrs.evolve(
            plain, client={"ip": "192.0.2.1", "helo": "c\u00e9.test"}, attempts=2,
            last_outcome=failed, warned=True, ret="HDRS", envid="e\u00e9", tls_failures=1,
            tls_override="relaxed", requiretls=True, tls_required_no=True, smtputf8=True,
            file_size=99,
            recipients=(Recipient(address="a@x.test", original="al@x.test", state="failed",
                                  outcome=failed, done_at=5.5, notify=("SUCCESS",),
                                  orcpt="rfc822;al@x.test", dsn_pending=True),
                        Recipient(address="b@y.test", notify=())))
        for env in (plain, rich):
            self.assertEqual(env.to_dict(), json.loads(env.to_json()))
            self.assertEqual(json.dumps(env.to_dict(), sort_keys=True, separators=(",", ":")),
                             env.to_json(compact=True).decode("utf-8"))

    def test_header_round_trip(self):
        """The envelope header decodes to the same envelope and gives the message offset."""
        from twisted_mta.model import from_header, header_end
        env = envelope("Q2", tuple(f"user{i}@example.test" for i in range(100)))
        data = env.to_header() + b"Subject: x\r\n\r\nbody\r\n"
        self.assertTrue(all(len(line) <= 998 for line in data.split(b"\r\n")))
        decoded, offset = from_header(data)
        self.assertEqual(decoded, env)
        self.assertEqual(data[offset:], b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(header_end(data[:100]), -1)

    def test_version_checked(self):
        """An envelope of an unknown version is refused."""
        with self.assertRaises(EnvelopeError):
            Envelope.from_json(b'{"version": 99}')

    def test_malformed(self):
        """A structurally wrong envelope is an EnvelopeError, not a KeyError."""
        with self.assertRaises(EnvelopeError):
            Envelope.from_json(b'{"version": 1, "queue_id": "x"}')
        with self.assertRaises(EnvelopeError):
            Envelope.from_json(b'[]')


class RecoveryRegressionTests(SynchronousTestCase):
    """
    Issue 11: F1 (a torn or garbage state xattr), F2 (wrong types), F3
    (a state naming another entry, a next attempt never due), F9 (a queue
    file cut short).  The full table is tests/queue/test_corruption.py.
    """

    def setUp(self):
        from twisted.logger import globalLogPublisher
        self.spool = Spool(self.mktemp(), clock=lambda: 1_800_000_000.5)
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def commit(self, body=b"Subject: x\r\n\r\nbody\r\n" * 10):
        import attrs
        w = self.spool.new_message()
        env = envelope(w.queue_id)
        w.write(env.to_header())
        w.write(body)
        env = self.successResultOf(w.commit(attrs.evolve(env, size=len(body))))
        self.spool.update_and_move(attrs.evolve(env, attempts=1), "new", "cur")
        return w.queue_id

    def path(self, qid, state="cur"):
        return os.path.join(self.spool.path, state, qid)

    def logged(self, event, qid):
        return [e for e in self.events if e.get("event") == event and e.get("queue_id") == qid]

    def test_garbage_xattr_restarts_from_header(self):
        """F1: a garbage state xattr and no state file: recovery completes, the entry restarts from its header envelope, queue.state-lost is logged, the xattr is removed and no state file is touched."""
        from twisted_mta.queue.spool import XATTR
        qid = self.commit()
        os.setxattr(self.path(qid), XATTR, b"garbage")
        report = self.spool.recover()
        [(env, state)] = report.entries
        self.assertEqual((env, state), (envelope(qid), "cur"))
        self.assertEqual(env.attempts, 0)
        self.assertEqual(report.restarted, (qid,))
        [event] = self.logged("queue.state-lost", qid)
        self.assertIn("state attribute", event["error"])
        self.assertIn("starting again", event["then"])
        self.assertNotIn(XATTR, os.listxattr(self.path(qid)))
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "envelopes")), [])

    def test_torn_xattr(self):
        """F1: the first half of the real JSON in the xattr: the same."""
        from twisted_mta.queue.spool import XATTR
        qid = self.commit()
        data = os.getxattr(self.path(qid), XATTR)
        os.setxattr(self.path(qid), XATTR, data[:len(data) // 2])
        [(env, _)] = self.spool.recover().entries
        self.assertEqual(env.attempts, 0)
        self.assertTrue(self.logged("queue.state-lost", qid))

    def test_wrong_types_never_escape(self):
        """F2: a recipient outcome "junk" in the xattr restarts the entry from its header; "client": [...] in the header quarantines it; both logged, nothing raised."""
        import base64
        from twisted_mta.model import HEADER_NAME
        from twisted_mta.queue.spool import XATTR
        a = self.commit()
        raw = json.loads(os.getxattr(self.path(a), XATTR))
        raw["recipients"][0]["outcome"] = "junk"
        os.setxattr(self.path(a), XATTR, json.dumps(raw).encode())
        b = self.spool.new_queue_id()
        raw = json.loads(envelope(b).to_json())
        raw["client"] = ["helo", "x"]
        with open(self.path(b, "new"), "wb") as f:
            f.write(HEADER_NAME + b": " + base64.b64encode(json.dumps(raw).encode()) + b"\r\n\r\n")
        scan = {qid: (env, problem) for qid, _, env, problem in self.spool.scan()}
        self.assertEqual(scan[a][0], envelope(a))
        self.assertIn("recipients[0].outcome: expected an object", scan[a][1])
        self.assertEqual(scan[b], (None, "envelope.client: expected an object, got an array"))
        report = self.spool.recover()
        self.assertEqual([e for e, _ in report.entries], [envelope(a)])
        self.assertEqual(report.quarantined, (b,))
        self.assertTrue(self.logged("queue.state-lost", a))
        self.assertTrue(self.logged("queue.quarantined", b))

    def test_state_naming_another_entry(self):
        """F3: a state whose queue_id names another entry is not used: the entry restarts from its header, logged."""
        import attrs
        from twisted_mta.queue.spool import XATTR
        a, b = self.commit(), self.commit()
        other = attrs.evolve(self.spool.load(b), attempts=5)
        os.setxattr(self.path(a), XATTR, other.to_json())
        entries = {e.queue_id: e for e, _ in self.spool.recover().entries}
        self.assertEqual(entries[a], envelope(a))
        self.assertEqual(entries[b].attempts, 1)
        [event] = self.logged("queue.state-lost", a)
        self.assertIn(f"it names queue entry {b}", event["error"])

    def test_next_attempt_never_due(self):
        """F3: a state whose next attempt is Infinity, NaN or centuries ahead is not used: the entry restarts from its header, logged; a header's own next attempt far ahead becomes now, logged."""
        import attrs
        from twisted_mta.queue.spool import XATTR
        ids = []
        for token in (b"Infinity", b"NaN", b"1e300", b"4102444800000"):
            qid = self.commit()
            state = attrs.evolve(self.spool.load(qid), next_attempt=1.25)
            os.setxattr(self.path(qid), XATTR,
                        state.to_json().replace(b"1.25", token))
            ids.append(qid)
        entries = {e.queue_id: e for e, _ in self.spool.recover().entries}
        for qid in ids:
            self.assertEqual(entries[qid], envelope(qid), qid)
            self.assertTrue(self.logged("queue.state-lost", qid), qid)

    def test_truncated_body_is_quarantined(self):
        """F9: a queue file cut short in its body (one octet, or more) is moved to corrupt/, logged; a state without the length falls back to the envelope's size."""
        import attrs
        from twisted_mta.queue.spool import XATTR
        a, b = self.commit(), self.commit()
        os.truncate(self.path(a), os.path.getsize(self.path(a)) - 1)
        state = attrs.evolve(self.spool.load(b), file_size=0)
        os.setxattr(self.path(b), XATTR, state.to_json())
        os.truncate(self.path(b), os.path.getsize(self.path(b)) - 30)
        report = self.spool.recover()
        self.assertEqual(report.entries, ())
        self.assertEqual(sorted(report.quarantined), sorted([a, b]))
        [event] = self.logged("queue.quarantined", a)
        self.assertIn("octets long, but was", event["error"])
        [event] = self.logged("queue.quarantined", b)
        self.assertIn("its envelope says", event["error"])

    def test_commit_records_the_file_size(self):
        """The committed envelope carries the queue file's length, which the state keeps (not part of equality)."""
        qid = self.commit()
        self.assertEqual(self.spool.load(qid).file_size, os.path.getsize(self.path(qid)))

    def test_read_head_checks_length_before_delivery(self):
        """read_head(expect=envelope) refuses a queue file whose length is not the envelope's."""
        from twisted_mta.queue.spool import read_head
        qid = self.commit()
        env = self.spool.load(qid)
        self.assertEqual(read_head(self.path(qid), expect=env)[0], envelope(qid))
        with open(self.path(qid), "ab") as f:
            f.write(b"x")
        with self.assertRaises(EnvelopeError):
            read_head(self.path(qid), expect=env)

    def test_bad_ids_never_become_paths(self):
        """F10: every spool method that takes a queue id refuses one that is not (QueueIdError), before touching anything."""
        from twisted_mta.queue.spool import QueueIdError
        outside = os.path.join(os.path.dirname(self.spool.path), "victim")
        with open(outside, "wb") as f:
            f.write(b"x")
        for bad in ("../victim", "../../etc/passwd", "", ".", "..", "a/b", "ID:2,S", "X" * 65):
            for call in (lambda: self.spool.remove(bad), lambda: self.spool.state_of(bad),
                         lambda: self.spool.load(bad), lambda: self.spool.read_message(bad),
                         lambda: self.spool.path_in("new", bad),
                         lambda: self.spool.move(bad, "new", "hold"),
                         lambda: self.spool.envelope_path(bad)):
                self.assertRaises(QueueIdError, call)
        self.assertTrue(os.path.exists(outside))


class BatchedTests(SynchronousTestCase):
    """
    Items handed to L{Batched} while a batch runs go together in the next
    hop, and each caller gets its own item's result or failure.
    """

    def test_items_batched_while_one_runs(self):
        from twisted.internet import defer
        from twisted_mta.queue.spool import Batched
        hops = []

        def run(fn):
            d = defer.Deferred()
            hops.append((fn, d))
            return d

        def fn(item):
            if item == "bad":
                raise ValueError(item)
            return item.upper()

        batched = Batched(run, fn)
        first = batched("a")
        rest = [batched("b"), batched("bad"), batched("c")]
        self.assertEqual(len(hops), 1)  # b, bad, c wait for the running hop
        hops[0][1].callback(hops[0][0]())
        self.assertEqual(self.successResultOf(first), "A")
        self.assertEqual(len(hops), 2)  # one hop for the three that waited
        hops[1][1].callback(hops[1][0]())
        self.assertEqual(self.successResultOf(rest[0]), "B")
        self.failureResultOf(rest[1], ValueError)
        self.assertEqual(self.successResultOf(rest[2]), "C")

    def test_a_failed_hop_fails_its_batch(self):
        from twisted.internet import defer
        from twisted_mta.queue.spool import Batched
        batched = Batched(lambda fn: defer.fail(RuntimeError("pool stopped")), str)
        self.failureResultOf(batched("x"), RuntimeError)
        self.failureResultOf(batched("y"), RuntimeError)  # the next call starts a new hop


class GatheredBatchTests(SynchronousTestCase):
    """
    With a clock, L{Batched} gathers items for C{gather} seconds, or until
    C{most} wait, before one hop; L{Batched.flush} starts them at once.
    """

    def setUp(self):
        from twisted.internet import defer, task
        from twisted_mta.queue.spool import Batched
        self.clock = task.Clock()
        self.hops = []

        def run(fn):
            self.hops.append(fn)
            return defer.succeed(fn())

        self.batched = Batched(run, str.upper, clock=self.clock, gather=0.02, most=3)

    def test_gathers_for_the_time(self):
        a, b = self.batched("a"), self.batched("b")
        self.clock.advance(0.019)
        self.assertEqual(self.hops, [])
        self.assertNoResult(a)
        self.clock.advance(0.001)
        self.assertEqual(len(self.hops), 1)
        self.assertEqual([self.successResultOf(d) for d in (a, b)], ["A", "B"])
        c = self.batched("c")  # a new gathering
        self.assertNoResult(c)
        self.clock.advance(0.02)
        self.assertEqual(self.successResultOf(c), "C")
        self.assertEqual(len(self.hops), 2)

    def test_starts_when_most_wait(self):
        ds = [self.batched(x) for x in "abc"]
        self.assertEqual(len(self.hops), 1)
        self.assertEqual([self.successResultOf(d) for d in ds], ["A", "B", "C"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_flush(self):
        d = self.batched("a")
        self.batched.flush()
        self.assertEqual(self.successResultOf(d), "A")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.batched.flush()  # nothing waits: no hop
        self.assertEqual(len(self.hops), 1)


class GroupCommitTests(SynchronousTestCase):
    """
    New entries are made durable together: the jobs handed to the group
    commit while every lane is busy go in one next hop, followed by one
    fsync of new/ that the batch shares; each caller gets its own job's
    result or failure, and none is answered before the fsync after its
    job.  Most tests use one lane, where the batching shows plainly.
    """

    def setUp(self):
        from twisted.internet import defer
        from twisted_mta.queue import spool as spool_module
        from twisted_mta.queue.spool import _GroupSync
        self.hops = []
        self.events = []
        self.fsync_fails = False

        def run(fn):
            d = defer.Deferred()
            self.hops.append((fn, d))
            return d

        def fsync_dir(path):
            self.events.append(("fsync", path))
            if self.fsync_fails:
                raise OSError(5, "Input/output error")

        self.patch(spool_module, "fsync_dir", fsync_dir)
        self.group = _GroupSync(run, ("/spool/new",), lanes=1)
        self.make = lambda lanes: _GroupSync(run, ("/spool/new",), lanes=lanes)

    def job(self, name, fails=False):
        def job():
            self.events.append(("job", name))
            if fails:
                raise OSError(28, "No space left on device")
            return name
        return job

    def hop(self):
        """The I/O pool runs the oldest hop."""
        fn, d = self.hops.pop(0)
        try:
            result = fn()
        except Exception as e:
            d.errback(e)
        else:
            d.callback(result)

    def test_jobs_that_wait_share_one_hop_and_one_fsync(self):
        first = self.group.commit(self.job("a"))
        rest = [self.group.commit(self.job("b")), self.group.commit(self.job("c")),
                self.group.sync()]
        self.assertEqual(len(self.hops), 1)
        self.assertNoResult(first)
        self.hop()
        self.assertEqual(self.successResultOf(first), "a")
        self.assertEqual(len(self.hops), 1)  # the three that waited: one hop
        for d in rest:
            self.assertNoResult(d)
        self.hop()
        self.assertEqual([self.successResultOf(d) for d in rest], ["b", "c", None])
        self.assertEqual(self.events, [("job", "a"), ("fsync", "/spool/new"),
                                       ("job", "b"), ("job", "c"), ("fsync", "/spool/new")])
        self.assertEqual(self.hops, [])

    def test_batches_run_in_parallel_lanes(self):
        """Up to `lanes` batches run at once, so a commit waits for a free lane, not for every fsync before it; what arrives while all lanes are busy goes in one batch."""
        group = self.make(2)
        first = group.commit(self.job("a"))
        second = group.commit(self.job("b"))
        self.assertEqual(len(self.hops), 2)  # a lane each
        rest = [group.commit(self.job("c")), group.commit(self.job("d"))]
        self.assertEqual(len(self.hops), 2)  # both lanes busy: c and d wait
        self.hop()  # a's lane frees: c and d go together in it
        self.assertEqual(self.successResultOf(first), "a")
        self.assertNoResult(second)
        self.assertEqual(len(self.hops), 2)
        self.hop()
        self.hop()
        self.assertEqual(self.successResultOf(second), "b")
        self.assertEqual([self.successResultOf(d) for d in rest], ["c", "d"])
        self.assertEqual([e for e in self.events if e[0] == "fsync"], [("fsync", "/spool/new")] * 3)

    def test_a_failed_job_fails_only_its_caller(self):
        self.group.commit(self.job("first"))
        bad = self.group.commit(self.job("bad", fails=True))
        good = self.group.commit(self.job("good"))
        self.hop()
        self.hop()
        self.assertEqual(self.failureResultOf(bad, OSError).value.errno, 28)
        self.assertEqual(self.successResultOf(good), "good")
        self.assertEqual(self.events[-1], ("fsync", "/spool/new"))  # the others still synced

    def test_a_failed_fsync_fails_the_whole_batch(self):
        first = self.group.commit(self.job("first"))
        batch = [self.group.commit(self.job("a")), self.group.sync()]
        self.hop()
        self.assertEqual(self.successResultOf(first), "first")
        self.fsync_fails = True
        self.hop()
        for d in batch:
            self.assertEqual(self.failureResultOf(d, OSError).value.errno, 5)
        self.fsync_fails = False
        later = self.group.commit(self.job("b"))  # a new hop, not stuck
        self.hop()
        self.assertEqual(self.successResultOf(later), "b")


class WriterCommitTests(SynchronousTestCase):
    """
    A message's commit: a small one is written, fsync'd and renamed in the
    shared group commit (one hop with the others, then new/'s fsync); a
    large one fsyncs on its own first, so the small ones committed meanwhile
    do not wait for it, and only then waits for new/'s fsync.
    """

    def setUp(self):
        from twisted.internet import defer
        self.hops = []

        def run(fn, *args):
            self.hops.append(fn)
            return defer.succeed(fn(*args))

        self.spool = Spool(self.mktemp(), run_blocking=run)
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        self.synced = []
        real = self.spool.group_sync.commit
        self.patch(self.spool.group_sync, "commit",
                   lambda job: (self.synced.append(job), real(job))[1])

    def commit(self, body):
        w = self.spool.new_message()
        env = envelope(w.queue_id)
        w.begin(env)
        w.write(body)
        self.hops.clear()
        self.successResultOf(w.commit(env))
        self.assertTrue(os.path.exists(os.path.join(self.spool.path, "new", w.queue_id)))
        return w

    def test_a_small_message_is_one_job_of_the_group_commit(self):
        self.commit(b"Subject: x\r\n\r\nbody\r\n")
        self.assertEqual(len(self.hops), 1)  # the group's batch: job and fsync of new/
        self.assertEqual(len(self.synced), 1)
        self.assertIsNotNone(self.synced[0])

    def test_a_large_message_fsyncs_on_its_own_then_waits_for_the_directory(self):
        from twisted_mta.queue.spool import MessageWriter
        self.commit(b"Subject: x\r\n\r\n" + b"y" * (MessageWriter.SPILL + 10))
        self.assertEqual(len(self.hops), 2)  # its own write and fsync, then the group's
        self.assertEqual(self.synced, [None])  # the group only syncs new/ for it


class InlineReadsTests(SynchronousTestCase):
    """
    L{InlineReads} runs a read on the calling thread while reads are fast;
    after a slow one it sends reads to the thread pool for the cool-off,
    with one log line.
    """

    def setUp(self):
        from twisted.internet import defer
        from twisted.logger import globalLogPublisher
        from twisted_mta.queue.spool import InlineReads
        self.now = [100.0]
        self.in_thread = []

        def in_thread(f, *args):
            self.in_thread.append((f, args))
            return defer.succeed(("thread", f(*args)))

        self.reads = InlineReads(in_thread, slow=0.01, cool_off=60.0,
                                 monotonic=lambda: self.now[0])
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def read(self, value, takes=0.0):
        def f(v):
            self.now[0] += takes
            if isinstance(v, Exception):
                raise v
            return v
        return self.reads(f, value)

    def slow_reads(self):
        return [e for e in self.events if e.get("event") == "queue.slow_read"]

    def test_fast_reads_run_inline(self):
        self.assertEqual(self.successResultOf(self.read("a", takes=0.002)), "a")
        self.assertEqual(self.successResultOf(self.read("b", takes=0.009)), "b")
        self.assertEqual(self.in_thread, [])
        self.assertTrue(self.reads.inline)
        self.assertEqual(self.slow_reads(), [])

    def test_a_failing_read_fails_its_deferred(self):
        f = self.failureResultOf(self.read(OSError(5, "EIO")), OSError)
        self.assertEqual(f.value.errno, 5)
        self.assertTrue(self.reads.inline)

    def test_a_slow_read_sends_reads_to_threads_for_the_cool_off(self):
        self.assertEqual(self.successResultOf(self.read("slow", takes=0.25)), "slow")
        self.assertFalse(self.reads.inline)
        [event] = self.slow_reads()
        self.assertEqual(round(event["ms"]), 250)
        self.now[0] += 59.0
        self.assertEqual(self.successResultOf(self.read("x")), ("thread", "x"))
        self.assertEqual(len(self.in_thread), 1)
        self.now[0] += 1.5  # the cool-off runs from the end of the slow read
        self.assertEqual(self.successResultOf(self.read("y")), "y")
        self.assertEqual(len(self.in_thread), 1)
        self.assertEqual(len(self.slow_reads()), 1)

    def test_one_slow_read_alone_stays_inline(self):
        self.assertEqual(self.successResultOf(self.read("a", takes=0.05)), "a")
        self.assertTrue(self.reads.inline)
        self.assertEqual(self.slow_reads(), [])

    def test_slow_reads_within_a_window_send_reads_to_threads(self):
        self.read("a", takes=0.02)
        self.now[0] += 0.3
        self.read("b", takes=0.02)
        self.assertTrue(self.reads.inline)
        self.now[0] += 0.3
        self.read("c", takes=0.03)
        self.assertFalse(self.reads.inline)
        [event] = self.slow_reads()
        self.assertEqual((event["count"], round(event["ms"])), (3, 30))

    def test_slow_reads_spread_out_stay_inline(self):
        for value in "abcde":
            self.read(value, takes=0.02)
            self.now[0] += 0.6  # two at most within any one second
        self.assertTrue(self.reads.inline)
        self.assertEqual(self.in_thread, [])

    def test_slow_again_after_the_cool_off(self):
        self.read("slow", takes=0.5)
        self.now[0] += 61.0
        for value in "abc":
            self.read(value, takes=0.02)
        self.assertFalse(self.reads.inline)
        self.assertEqual(len(self.slow_reads()), 2)
