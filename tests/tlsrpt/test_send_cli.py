"""
twisted-mta tls report send --now: the request it leaves for the running
MTA (a control file, like queue flush), what it says when no MTA runs or
reporting is off, and the queue manager's operator carrying it out.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from tests.test_cli import run_cli
from twisted_mta.queue import control
from twisted_mta.queue.operator import OperatorRequests
from twisted_mta.queue.spool import Spool

CONFIG = """\
[server]
hostname = "mx.sender.test"
spool = "spool"
[[listeners]]
role = "mx"
endpoint = "tcp:0:interface=127.0.0.1"
[dns]
nameservers = ["127.0.0.1:5399"]
[tlsrpt]
enabled = {enabled}
organization_name = "Sender Org"
contact_info = "tlsrpt@sender.test"
"""


class SendCommandTests(SynchronousTestCase):
    def write(self, enabled: bool = True) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "mta.toml")
        with open(path, "w") as f:
            f.write(CONFIG.format(enabled="true" if enabled else "false"))
        self.spool = Spool(os.path.join(base, "spool"))
        return path

    def running(self) -> None:
        self.spool.create()
        self.spool.lock()  # as the running MTA holds it
        self.addCleanup(self.spool.unlock)

    def test_requests_all(self) -> None:
        path = self.write()
        self.running()
        code, out, err = run_cli("tls", "report", "send", "--now", "--config", path)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("the running MTA sends today's TLS reports within a second", out)
        self.assertEqual([r[1:] for r in control.read_requests(self.spool)],
                         [("tlsrptsend", "ALL")])

    def test_requests_one_domain(self) -> None:
        path = self.write()
        self.running()
        code, out, _ = run_cli("tls", "report", "send", "--now", "Example.ORG.", "-c", path)
        self.assertEqual(code, 0)
        self.assertIn("for example.org", out)
        self.assertEqual([r[1:] for r in control.read_requests(self.spool)],
                         [("tlsrptsend", "example.org")])

    def test_bad_domain(self) -> None:
        path = self.write()
        self.running()
        code, _, err = run_cli("tls", "report", "send", "--now", "../x", "-c", path)
        self.assertEqual(code, 1)
        self.assertIn("is not a domain name", err)
        self.assertEqual(control.read_requests(self.spool), [])

    def test_not_running(self) -> None:
        path = self.write()
        code, out, err = run_cli("tls", "report", "send", "--now", "-c", path)
        self.assertEqual(code, 1)
        self.assertIn("the MTA is not running (the spool", err)
        self.assertEqual(err.count("\n"), 1)
        self.spool.create()
        code, out, err = run_cli("tls", "report", "send", "--now", "-c", path)
        self.assertEqual(code, 1)
        self.assertIn("the MTA is not running (nothing holds the spool", err)
        self.assertEqual(control.read_requests(self.spool), [])

    def test_off(self) -> None:
        path = self.write(enabled=False)
        self.running()
        code, _, err = run_cli("tls", "report", "send", "--now", "-c", path)
        self.assertEqual(code, 1)
        self.assertIn("TLS reporting is off", err)

    def test_now_required(self) -> None:
        path = self.write()
        with self.assertRaises(SystemExit) as e:
            run_cli("tls", "report", "send", "-c", path)
        self.assertEqual(e.exception.code, 2)


class _Manager:
    def __init__(self, tlsrpt) -> None:
        self.tlsrpt = tlsrpt
        self.targets = ()


class OperatorTests(SynchronousTestCase):
    def test_carried_out(self) -> None:
        asked = []

        class Schedule:
            def send_now(self, domain=None):
                asked.append(domain)
                return "sending"
        operator = OperatorRequests(_Manager(Schedule()))
        self.assertEqual(self.successResultOf(defer.ensureDeferred(
            operator.carry_out("tlsrptsend", control.ALL))), "sending")
        self.assertEqual(self.successResultOf(defer.ensureDeferred(
            operator.carry_out("tlsrptsend", "example.org"))), "sending")
        self.assertEqual(asked, [None, "example.org"])

    def test_off(self) -> None:
        operator = OperatorRequests(_Manager(None))
        self.assertIn("TLS reporting is off", self.successResultOf(defer.ensureDeferred(
            operator.carry_out("tlsrptsend", control.ALL))))


class ServiceTests(SynchronousTestCase):
    """
    tap builds the schedule when [tlsrpt] is on, and hands it to the queue
    manager for the operator's request.
    """

    def services(self, **tlsrpt):
        from twisted.internet.testing import MemoryReactorClock

        from tests.support import make_config
        from twisted_mta import tap
        config = make_config(self.mktemp(), tlsrpt=tlsrpt)
        svc = tap.make_service(config, MemoryReactorClock())
        lock = [s for s in svc if isinstance(s, tap.SpoolLockService)][0]
        self.addCleanup(lock.spool.unlock)
        return svc

    def test_on(self) -> None:
        from twisted_mta.tlsrpt.schedule import ReportSchedule
        svc = self.services(enabled=True, organization_name="Org",
                            contact_info="tlsrpt@sender.test")
        schedule = svc.getServiceNamed("tlsrpt-reports")
        self.assertIsInstance(schedule, ReportSchedule)
        self.assertIs(svc.getServiceNamed("queue-manager").tlsrpt, schedule)

    def test_policy_fetch_failures_counted(self) -> None:
        """With MTA-STS on, the policy cache tells the aggregate of failed fetches."""
        from twisted.internet.testing import MemoryReactorClock

        from tests.support import make_config
        from twisted_mta import tap
        from twisted_mta.tlsrpt.store import Aggregate
        config = make_config(self.mktemp(), tlsrpt={
            "enabled": True, "organization_name": "Org", "contact_info": "tlsrpt@sender.test"},
            outbound={"tls": {"mta_sts": True, "dane": False}})
        svc = tap.make_service(config, MemoryReactorClock())
        lock = [s for s in svc if isinstance(s, tap.SpoolLockService)][0]
        self.addCleanup(lock.spool.unlock)
        published = [s for s in svc if isinstance(s, tap.PublishedService)][0].published
        self.assertEqual([type(o) for o in published.sts_cache.observers], [Aggregate])

    def test_off(self) -> None:
        svc = self.services()
        self.assertNotIn("tlsrpt-reports", [s.name for s in svc])
        self.assertIsNone(svc.getServiceNamed("queue-manager").tlsrpt)


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        from tests.support import make_config
        t = make_config(self.mktemp()).tlsrpt
        self.assertEqual((t.send_delay, t.https_timeout, t.https_retry_for, t.ca_file,
                          t.from_address), (3600, 60, 86400, None, None))

    def test_errors(self) -> None:
        from tests.support import make_config
        from twisted_mta.config import ConfigError
        rows = [
            ({"from_address": "not an address"}, "tlsrpt.from_address"),
            ({"from_address": "mailto:a@b.example"}, "tlsrpt.from_address"),
            ({"https_timeout": 0}, "tlsrpt.https_timeout"),
            ({"send_delay": "soon"}, "tlsrpt.send_delay"),
            ({"ca_file": "missing.pem"}, "tlsrpt.ca_file"),
        ]
        for table, key in rows:
            with self.subTest(table=table):
                with self.assertRaises(ConfigError) as e:
                    make_config(self.mktemp(), tlsrpt=table)
                self.assertIn(f": {key}:", str(e.exception))
