"""
Queue ids from the command line and in control requests (issue 11, F10):
only the queue id syntax is accepted, so every path made from one is inside
the spool; and the queue commands show a damaged entry as unreadable (F2)
instead of a traceback.
"""

from __future__ import annotations

import base64
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.test_cli import run_cli
from twisted_mta.model import HEADER_NAME, Envelope, Recipient, is_queue_id
from twisted_mta.queue import control
from twisted_mta.queue.spool import XATTR, Spool

BAD_IDS = ("../../victim", "../victim", "..", ".", "a/b", "/etc/passwd", "ID:2,S", "a b",
           "X" * 65, "")


class QueueIdTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        self.conf = os.path.join(self.base, "mta.toml")
        with open(self.conf, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool/q"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\n')  # never the system resolver
        self.spool = Spool(os.path.join(self.base, "spool", "q"))
        self.spool.create()
        # What "../../victim" would name from spool/q/new/.
        self.victim = os.path.join(self.base, "spool", "victim")
        with open(self.victim, "wb") as f:
            f.write(b"not mail")
        with open(os.path.join(self.base, "victim"), "wb") as f:
            f.write(b"not mail")

    def assertUntouched(self) -> None:
        self.assertTrue(os.path.exists(self.victim))
        self.assertTrue(os.path.exists(os.path.join(self.base, "victim")))
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "control")), [])

    def test_generated_ids_have_the_syntax(self) -> None:
        """The ids the spool makes are queue ids (upper-case hex)."""
        for _ in range(100):
            qid = self.spool.new_queue_id()
            self.assertTrue(is_queue_id(qid), qid)
            self.assertEqual(qid.strip("0123456789ABCDEF"), "")

    def test_cli_refuses_ids_offline(self) -> None:
        """queue show|hold|release|delete|flush with a path for an id: one line, exit 2, nothing deleted or moved."""
        for action in ("show", "hold", "release", "delete", "flush"):
            for bad in BAD_IDS:
                code, out, err = run_cli("queue", action, bad, "-c", self.conf)
                self.assertEqual((code, out), (2, ""), (action, bad))
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn("is not a queue id", err)
        self.assertUntouched()

    def test_cli_refuses_ids_with_a_running_mta(self) -> None:
        """With the spool owned by a running MTA, a bad id leaves no request."""
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        for action in ("hold", "release", "delete", "flush"):
            code, _, err = run_cli("queue", action, "../../victim", "-c", self.conf)
            self.assertEqual(code, 2, err)
        self.assertUntouched()

    def test_request_refuses_bad_ids(self) -> None:
        """control.request refuses what is not a queue id (or, for tlsforget, a domain name)."""
        for bad in BAD_IDS:
            for action in ("delete", "hold", "flush:cleartext"):
                self.assertRaises(control.ControlError, control.request, self.spool, action, bad)
        for bad in ("../x", ".hidden", "a b", ""):
            self.assertRaises(control.ControlError, control.request, self.spool, "tlsforget", bad)
        control.request(self.spool, "tlsforget", "mx.example.org")
        control.request(self.spool, "delete", "6B0A87D251AE92AA51")
        control.request(self.spool, "flush", control.ALL)
        self.assertEqual(len(os.listdir(os.path.join(self.spool.path, "control"))), 3)

    def test_bad_requests_are_dropped(self) -> None:
        """A request file naming no queue id (left by hand, or by an older version) is removed unread."""
        directory = os.path.join(self.spool.path, "control")
        names = ["1.0-1-delete-..", "2.0-1-hold-ID:2,S", "3.0-1-delete-a b",
                 "4.0-1-delete-" + "X" * 65, "5.0-1-tlsforget-.hidden",
                 "6.0-1-delete-6B0A87D251AE92AA51", "7.0-1-tlsforget-example.org",
                 "8.0-1-flush-ALL"]
        for name in names:
            with open(os.path.join(directory, name), "w"):
                pass
        self.assertEqual([(a, q) for _, a, q in control.read_requests(self.spool)],
                         [("delete", "6B0A87D251AE92AA51"), ("tlsforget", "example.org"),
                          ("flush", "ALL")])
        self.assertEqual(sorted(os.listdir(directory)), names[5:])

    def test_apply_offline_refuses_bad_ids(self) -> None:
        """apply_offline refuses a bad id before looking for it."""
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        for bad in BAD_IDS:
            self.assertRaises(control.ControlError, control.apply_offline, self.spool,
                              "delete", bad)
        self.assertUntouched()


class UnreadableEntryTests(SynchronousTestCase):
    """
    F2: queue list and queue show read through Spool.scan; an entry whose
    envelope or state has the wrong types is shown, never a traceback.
    """

    def setUp(self) -> None:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.conf = os.path.join(base, "mta.toml")
        with open(self.conf, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\n')  # never the system resolver
        spool = Spool(os.path.join(base, "spool"))
        spool.create()
        # A header whose client is an array.
        self.bad_header = spool.new_queue_id()
        raw = json.loads(Envelope(queue_id=self.bad_header, sender="a@remote.test",
                                  recipients=(Recipient("bob@example.test"),),
                                  arrival=1.0).to_json())
        raw["client"] = ["helo", "x"]
        with open(os.path.join(spool.path, "new", self.bad_header), "wb") as f:
            f.write(HEADER_NAME + b": " + base64.b64encode(json.dumps(raw).encode()) +
                    b"\r\nSubject: x\r\n\r\n")
        # A good entry whose state xattr gives a recipient the outcome "junk".
        w = spool.new_message()
        env = Envelope(queue_id=w.queue_id, sender="a@remote.test",
                       recipients=(Recipient("bob@example.test"),), arrival=1.0)
        w.write(env.to_header() + b"Subject: y\r\n\r\n")
        self.successResultOf(w.commit(env))
        self.bad_state = w.queue_id
        raw = json.loads(env.to_json())
        raw["recipients"][0]["outcome"] = "junk"
        os.setxattr(os.path.join(spool.path, "new", w.queue_id), XATTR,
                    json.dumps(raw).encode())

    def test_list(self) -> None:
        """queue list shows the damaged entry as unreadable and the other from its header, with the problem; exit 0."""
        code, out, err = run_cli("queue", "list", "-c", self.conf)
        self.assertEqual((code, err), (0, ""))
        [row] = [line for line in out.splitlines() if self.bad_header in line]
        self.assertIn("unreadable: envelope.client: expected an object, got an array", row)
        [row] = [line for line in out.splitlines() if self.bad_state in line]
        self.assertIn("<a@remote.test>", row)
        code, out, err = run_cli("queue", "list", "--json", "-c", self.conf)
        entries = {e["queue_id"]: e for e in json.loads(out)}
        self.assertIn("expected an object", entries[self.bad_header]["problem"])
        self.assertIn("recipients[0].outcome", entries[self.bad_state]["problem"])

    def test_show(self) -> None:
        """queue show of either: what is known and the problem, exit 0."""
        code, out, err = run_cli("queue", "show", self.bad_header, "-c", self.conf)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("envelope unreadable: envelope.client", out)
        code, out, err = run_cli("queue", "show", self.bad_state, "-c", self.conf)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("Note: state attribute: recipients[0].outcome: expected an object", out)


class WatchTests(SynchronousTestCase):
    """
    L{control.watch}: inotify on spool/control/ calls back when a request
    is renamed in; where it cannot watch, it says so and returns None.
    """

    def test_a_request_renamed_in_calls_back(self) -> None:
        import shutil
        import tempfile
        from twisted.internet.testing import MemoryReactor
        from twisted_mta.queue import control
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        calls = []
        stop = control.watch(MemoryReactor(), directory, lambda: calls.append(1))
        self.assertIsNotNone(stop)
        notifier = stop.__self__
        with open(os.path.join(directory, "x.tmp"), "w"):
            pass  # a file being written is not yet a request
        notifier.doRead()
        self.assertEqual(calls, [])
        os.rename(os.path.join(directory, "x.tmp"), os.path.join(directory, "x"))
        notifier.doRead()
        self.assertEqual(calls, [1])
        stop()
        self.assertRaises(OSError, os.fstat, notifier._fd)

    def test_no_directory_no_watch(self) -> None:
        from twisted.internet.testing import MemoryReactor
        from twisted.logger import globalLogPublisher
        from twisted_mta.queue import control
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor = MemoryReactor()
        self.assertIsNone(control.watch(reactor, "/nonexistent/control", lambda: None))
        self.assertEqual(reactor.getReaders(), [])  # the inotify descriptor let go
        self.assertEqual([e["event"] for e in events if e.get("event")],
                         ["queue.control_unwatched"])
