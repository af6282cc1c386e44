"""
Tests for the twisted-mta command line, the twistd plugin and start-up.
"""

import io
import json
import os
import sys
from contextlib import redirect_stderr, redirect_stdout

import twisted.plugins
from twisted.application.service import IServiceMaker
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import cli, tap
from tests.support import LOOPBACK_DNS, make_config

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
EXAMPLE = os.path.join(CONF, "example.toml")

NAMELESS = """\
from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.interfaces import ITLSPolicy


@implementer(ITLSPolicy, IPlugin)
class Policy:
    def requirements(self, destination):
        raise NotImplementedError


policy = Policy()
"""

MINIMAL = """\
[server]
hostname = "mx.example.test"
spool = "spool"
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"
[[listeners]]
role = "mx"
endpoint = "tcp:2525"
"""

# One entry of each kind: written deciders, policy defaults, routes with
# implicit TLS and a login (no cleartext by the hard rules), the relay.
TLS_ENTRIES = """\
[outbound.tls]
fallback = "now"
[outbound.tls.domains."bank.example"]
policy = "strict"
fallback = "now"
[outbound.tls.domains."safe.example"]
policy = "strict"
[outbound.tls.domains."shop.example"]
policy = "relaxed"
fallback = "next-attempt"
[outbound.tls.domains."cert.example"]
policy = "strict"
fallback = "relaxed-now"
[outbound.tls.mx_hosts."*.legacy.example"]
policy = "opportunistic"
[outbound.tls.relay]
host = "relay.example.net"
tls_policy = "strict"
tls_fallback = "now"
[outbound.routes."partner.example"]
host = "mx.partner.example"
tls_policy = "strict"
tls_fallback = "after:4h"
[outbound.routes."secure.example"]
host = "smtp.secure.example:465"
tls = "implicit"
tls_policy = "strict"
tls_fallback = "now"
[outbound.routes."login.example"]
host = "smtp.login.example:587"
username = "me"
password_file = "password"
tls_policy = "relaxed"
tls_fallback = "now"
"""


def run_cli(*argv):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class ConfigCommandTests(SynchronousTestCase):
    def test_check_ok(self):
        """config check on the example exits 0 and says ok."""
        code, out, err = run_cli("config", "check", EXAMPLE)
        self.assertEqual(code, 0)
        self.assertIn(": ok (1 listener(s), 1 local domain(s))", out)

    def test_check_bad(self):
        """config check on a bad file exits 1 with the file and key on stderr."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write('[server]\nhostname = "h.test"\nspool = "s"\nbogus = 1\n')
        code, out, err = run_cli("config", "check", path)
        self.assertEqual(code, 1)
        self.assertEqual(err, f"twisted-mta: {path}: server.bogus: unknown key\n")

    def test_check_sts_ca_file(self):
        """A missing or non-PEM [outbound.tls] sts_ca_file fails config check in one line, as it would fail start-up; sts_port must be a TCP port."""
        folder = self.mktemp()
        os.makedirs(folder)
        base = ('[server]\nhostname = "h.test"\nspool = "s"\n[[listeners]]\nrole = "mx"\n'
                'endpoint = "tcp:2525"\n[dns]\nnameservers = ["127.0.0.1:9"]\n'
                '[outbound.tls]\n')
        with open(os.path.join(folder, "junk.pem"), "w") as f:
            f.write("not a certificate\n")
        for extra, words in (('sts_ca_file = "missing.pem"\n', "missing.pem: No such file"),
                             ('sts_ca_file = "junk.pem"\n', "junk.pem: no PEM certificate"),
                             ("sts_port = 70000\n", "must be a TCP port")):
            path = os.path.join(folder, "mta.toml")
            with open(path, "w") as f:
                f.write(base + extra)
            code, out, err = run_cli("config", "check", path)
            self.assertEqual(code, 1, err)
            self.assertIn(words, err)
            self.assertEqual(len(err.splitlines()), 1, err)

    def test_show_fills_defaults(self):
        """config show prints every effective key, defaults included."""
        code, out, err = run_cli("config", "show", EXAMPLE)
        self.assertEqual(code, 0)
        self.assertIn('server.hostname = "mx.example.test"', out)
        self.assertIn("limits.command_timeout = 300", out)
        self.assertIn('listeners[0].role = "mx"', out)

    def test_show_json(self):
        """config show --json prints JSON with the same keys."""
        code, out, err = run_cli("config", "show", "--json", EXAMPLE)
        data = json.loads(out)
        self.assertEqual(data["server"]["hostname"], "mx.example.test")
        self.assertEqual(data["queue"]["lifetime"], 432000)

    def test_show_non_default(self):
        """config show -n prints only the keys that differ from the defaults (like postconf -n): the required keys always, a key written with its default value not, and no TLS entry list."""
        path = self.write('[limits]\nrecipients = 100\nmessage_size = 1048576\n'
                          '[outbound.tls]\npolicy = "strict"\n'
                          '[[listeners]]\nrole = "submission"\nendpoint = "tcp:2587"\n')
        base = os.path.dirname(path)
        code, out, err = run_cli("config", "show", "-n", path)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), [
            'server.hostname = "mx.example.test"',
            f'server.spool = "{os.path.join(base, "spool")}"',
            'listeners[0].role = "mx"',
            'listeners[0].endpoint = "tcp:2525"',
            'listeners[1].role = "submission"',
            'listeners[1].endpoint = "tcp:2587"',
            "limits.message_size = 1048576",
            'dns.nameservers = ["127.0.0.1:9"]',
            "dns.timeout = 1",
            'outbound.tls.policy = "strict"',
        ])
        self.assertIn("limits.recipients = 100\n", run_cli("config", "show", path)[1])

    def test_show_non_default_minimal(self):
        """A file with only the required keys (and loopback DNS): -n prints just those."""
        path = self.write("")
        out = run_cli("config", "show", "-n", path)[1]
        self.assertEqual([line.split(" = ")[0] for line in out.splitlines()], [
            "server.hostname", "server.spool", "listeners[0].role", "listeners[0].endpoint",
            "dns.nameservers", "dns.timeout"])

    def test_show_non_default_example(self):
        """On the shipped example, -n leaves out what it writes with the default value."""
        out = run_cli("config", "show", "-n", EXAMPLE)[1]
        keys = [line.split(" = ")[0] for line in out.splitlines()]
        self.assertEqual(keys, ["server.hostname", "server.spool", "listeners[0].role",
                                "listeners[0].endpoint", "local.domains", "local.users",
                                "local.mailbox", "local.aliases", "sendmail.domain"])

    def test_show_non_default_json(self):
        """config show -n --json: one flat object, key to value."""
        path = self.write("[queue]\nlifetime = 3600\n")
        data = json.loads(run_cli("config", "show", "-n", "--json", path)[1])
        self.assertEqual(data["queue.lifetime"], 3600)
        self.assertEqual(data["listeners[0].role"], "mx")
        self.assertNotIn("queue.retry_schedule", data)

    def test_queue_help_not_read_only(self):
        """The queue command's help names what it changes (it is not read-only)."""
        text = cli.build_parser().format_help()
        line = [l for l in text.splitlines() if l.strip().startswith("queue")][0]
        self.assertNotIn("read-only", line)
        self.assertIn("flush, hold, release or delete", line)

    def test_show_non_default_bad_file(self):
        """-n on a bad file: exit 1, the reason on stderr, as without -n."""
        code, out, err = run_cli("config", "show", "-n", self.mktemp())
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no such file", err)

    def write(self, text: str) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "mta.toml")
        with open(path, "w") as f:
            f.write(MINIMAL + text)
        with open(os.path.join(base, "password"), "w") as f:
            f.write("secret\n")
        return path

    def test_check_warns_on_cleartext_from_tls_required(self):
        """config check exits 0 but warns, one line each, about every strict or relaxed entry whose decider can reach cleartext; not about never, relaxed-now, opportunistic, implicit TLS or a login."""
        path = self.write(TLS_ENTRIES)
        code, out, err = run_cli("config", "check", path)
        self.assertEqual(code, 0, err)
        self.assertIn(": ok (", out)
        self.assertEqual(err.splitlines(), [
            'warning: outbound.tls.domains."bank.example": policy strict with fallback '
            '"now" can send mail in cleartext after a TLS failure',
            'warning: outbound.tls.domains."shop.example": policy relaxed with fallback '
            '"next-attempt" can send mail in cleartext after a TLS failure',
            'warning: outbound.routes."partner.example": policy strict with fallback '
            '"after:4h" can send mail in cleartext after a TLS failure',
        ])

    def test_check_quiet_by_default(self):
        """Strict without a fallback written uses never: no warning."""
        path = self.write('[outbound.tls]\npolicy = "strict"\n')
        self.assertEqual(run_cli("config", "check", path)[2], "")

    def test_show_effective_deciders(self):
        """config show ends with every policy entry, its effective decider and where that came from."""
        path = self.write(TLS_ENTRIES)
        code, out, err = run_cli("config", "show", path)
        self.assertEqual(code, 0, err)
        tail = out.split("# the fallback decider each TLS policy entry uses\n")[1]
        self.assertEqual(tail.splitlines(), [
            "outbound.tls: policy opportunistic, fallback now ([outbound.tls] fallback)",
            'outbound.tls.domains."bank.example": policy strict, fallback now (written)',
            'outbound.tls.domains."safe.example": policy strict, fallback never '
            "(policy default)",
            'outbound.tls.domains."shop.example": policy relaxed, fallback next-attempt '
            "(written)",
            'outbound.tls.domains."cert.example": policy strict, fallback relaxed-now '
            "(written)",
            'outbound.tls.mx_hosts."*.legacy.example": policy opportunistic, fallback now '
            "(policy default)",
            'outbound.routes."partner.example": policy strict, fallback after:4h (written)',
            'outbound.routes."secure.example": policy strict, fallback now (written)',
            'outbound.routes."login.example": policy relaxed, fallback now (written)',
            "outbound.tls.relay: policy strict, fallback now (written); not consulted: a "
            "failed relay session waits for the next attempt",
        ])

    def test_show_json_effective_tls(self):
        """config show --json has the same under effective_tls."""
        path = self.write(TLS_ENTRIES)
        data = json.loads(run_cli("config", "show", "--json", path)[1])
        bank = [e for e in data["effective_tls"]
                if e["where"] == 'outbound.tls.domains."bank.example"']
        self.assertEqual(bank, [{
            "where": 'outbound.tls.domains."bank.example"', "policy": "strict",
            "decider": "now", "source": "entry", "requires_tls": True, "can_cleartext": True,
            "consulted": True}])
        self.assertEqual(data["effective_tls"][2]["decider"], "never")


class PluginTests(SynchronousTestCase):
    def test_twistd_finds_mta(self):
        """twistd's plugin scan finds the 'mta' service maker."""
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("mta", makers)
        self.assertIs(makers["mta"].options, tap.Options)

    def test_options_require_config(self):
        """twistd mta without --config is a usage error."""
        with self.assertRaises(usage.UsageError) as cm:
            tap.Options().parseOptions([])
        self.assertEqual(str(cm.exception), "--config FILE is required")

    def test_options_report_config_error(self):
        """A bad configuration exits 1 with one line naming the file, without the usage text."""
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            tap.Options().parseOptions(["--config", "/nonexistent.toml"])
        self.assertEqual(cm.exception.code, 1)
        self.assertEqual(err.getvalue(), "twistd: /nonexistent.toml: no such file\n")

    def test_service_tree(self):
        """make_service builds the thread pool, spool lock, queue manager, the maildrop's pickup and one service per listener, each accepting with an inbound factory; with workers the listeners' sockets are shared with them and the worker pool comes last (it stops first); the pickup stays in the main process, so one process takes each drop."""
        from twisted_mta.inbound.server import InboundFactory
        from twisted_mta.workers import SharedListener, WorkerPool
        for workers in (0, 2):
            config = make_config(self.mktemp(), server={"workers": workers}, listeners=[
                {"role": "mx", "endpoint": "tcp:2525"},
                {"role": "submission", "endpoint": "tcp:2587"}])
            reactor = MemoryReactorClock()
            svc = tap.make_service(config, reactor)
            svc.privilegedStartService()
            self.addCleanup(svc.stopService)
            accepting = {port: factory for port, factory, _, _ in reactor.tcpServers}
            self.assertEqual(sorted(accepting), [2525, 2587])
            self.assertEqual({f.role for f in accepting.values()
                              if isinstance(f, InboundFactory)}, {"mx", "submission"})
            lock = [s for s in svc if isinstance(s, tap.SpoolLockService)][0]
            lock.spool.unlock()
            names = sorted(s.name for s in svc if s.name)
            self.assertEqual(names, ["listener-mx-tcp:2525", "listener-submission-tcp:2587",
                                     "pickup", "queue-manager"]
                             + (["workers"] if workers else []))
            shared = [s for s in svc if isinstance(s, SharedListener)]
            self.assertEqual(len(shared), 2 if workers else 0)
            if workers:
                pool = svc.getServiceNamed("workers")
                self.assertIsInstance(pool, WorkerPool)
                self.assertEqual((pool.count, pool.listeners), (2, shared))
                self.assertIs(list(svc)[-1], pool)  # stops first

    def test_second_instance_on_same_spool(self):
        """A second instance on the same spool exits 1 with one line saying the spool is in use."""
        config = make_config(self.mktemp())
        svc = tap.make_service(config, MemoryReactorClock())
        lock = [s for s in svc if isinstance(s, tap.SpoolLockService)][0]
        self.addCleanup(lock.spool.unlock)
        options = tap.Options()
        options["parsed"] = config
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            tap.makeService(options)
        self.assertEqual(cm.exception.code, 1)
        self.assertIn("is in use by another process", err.getvalue())
        self.assertEqual(err.getvalue().count("\n"), 1)


class PrepareTests(SynchronousTestCase):
    def test_service_uses_what_prepare_built(self):
        """make_service hands the prepared TLS engine to the outbound pool: the one config check built."""
        config = make_config(self.mktemp())
        prepared = tap.prepare(config)
        svc = tap.make_service(config, MemoryReactorClock(), prepared=prepared)
        lock = [s for s in svc if isinstance(s, tap.SpoolLockService)][0]
        self.addCleanup(lock.spool.unlock)
        self.assertIs(svc.getServiceNamed("queue-manager").targets.remote.pool.tls, prepared.tls)

    def test_options_prepare(self):
        """twistd's option parsing prepares the service (so it can fail there), without touching the spool."""
        config = make_config(self.mktemp())
        path = config.path
        with open(path, "w") as f:
            f.write(MINIMAL)
        options = tap.Options()
        options.parseOptions(["--config", path])
        self.assertIsInstance(options["prepared"], tap.Prepared)
        self.assertFalse(os.path.exists(options["parsed"].spool))


class BrokenDropinTests(SynchronousTestCase):
    """
    A twisted/plugins dropin that would crash start-up: config check and
    twistd's option parsing refuse it alike, in one line naming its file,
    also when the configuration has no [outbound.tls] table.
    """

    def dropin(self, source: str) -> str:
        base = os.path.abspath(self.mktemp())
        plugins = os.path.join(base, "twisted", "plugins")
        os.makedirs(plugins)
        name = f"mta_broken_{self._testMethodName}"
        path = os.path.join(plugins, name + ".py")
        with open(path, "w") as f:
            f.write(source)
        saved = list(twisted.plugins.__path__)
        self.addCleanup(setattr, twisted.plugins, "__path__", saved)
        twisted.plugins.__path__.append(plugins)
        self.addCleanup(sys.modules.pop, f"twisted.plugins.{name}", None)
        return path

    def config(self, text: str = "") -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "mta.toml")
        with open(path, "w") as f:
            f.write(MINIMAL + text)
        return path

    def assertRefused(self, config: str, line: str) -> None:
        code, out, err = run_cli("config", "check", config)
        self.assertEqual((code, out, err), (1, "", f"twisted-mta: {line}\n"))
        err = io.StringIO()
        with redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            tap.Options().parseOptions(["--config", config])
        self.assertEqual((cm.exception.code, err.getvalue()), (1, f"twistd: {line}\n"))

    def test_nameless_plugin(self):
        """A plugin object without a name."""
        path = self.dropin(NAMELESS)
        self.assertRefused(self.config(), f"TLS plugin 'policy' in {path} has no name")

    def test_name_not_a_string(self):
        """A plugin whose name is not a string."""
        path = self.dropin(NAMELESS + "policy.name = 7\n")
        self.assertRefused(self.config(), f"TLS plugin 'policy' in {path} has a name that "
                                          "is not a string: 7")

    def test_dropin_raises_on_import(self):
        """A dropin that raises while Python imports it: the file and line, not a traceback (nor a logged one: trial would fail the test)."""
        path = self.dropin("import os\nraise RuntimeError('broken\\non purpose')\n")
        self.assertRefused(self.config(), f"plugin dropin {path} (line 2) failed to load: "
                                          "RuntimeError: broken on purpose")

    def test_dropin_not_python(self):
        """A dropin Python cannot parse."""
        path = self.dropin("def (:\n")
        self.assertRefused(self.config(), f"plugin dropin {path} (line 1) failed to load: "
                                          f"SyntaxError: invalid syntax ({os.path.basename(path)}"
                                          ", line 1)")

    def test_with_a_tls_table(self):
        """With an [outbound.tls] table the configuration's own check finds it first, still in one line."""
        path = self.dropin(NAMELESS)
        config = self.config('[outbound.tls]\npolicy = "strict"\n')
        self.assertRefused(config, f"{config}: outbound.tls.plugins: TLS plugin 'policy' in "
                                   f"{path} has no name")


class JSONLogTests(SynchronousTestCase):
    def test_events_written_as_json_lines(self):
        """With JSON logging each event is one JSON object per line, with its fields."""
        from twisted.logger import Logger, globalLogPublisher
        from twisted_mta.logsetup import install_json_log
        path = self.mktemp()
        observer = install_json_log(path)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        Logger().info("queued {queue_id}", event="inbound.queued", queue_id="Q123")
        globalLogPublisher.removeObserver(observer)
        with open(path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        mine = [e for e in lines if e.get("queue_id") == "Q123"]
        self.assertEqual(len(mine), 1)
        self.assertEqual(mine[0]["event"], "inbound.queued")


class BacklogTests(SynchronousTestCase):
    def test_default_backlog_added(self):
        """TCP listeners get a listen backlog of 1024 unless the endpoint sets one."""
        self.assertEqual(tap.with_backlog("tcp:25"), "tcp:25:backlog=1024")
        self.assertEqual(tap.with_backlog("tcp6:25:interface=\\:\\:"),
                         "tcp6:25:interface=\\:\\::backlog=1024")
        self.assertEqual(tap.with_backlog("tcp:25:backlog=10"), "tcp:25:backlog=10")
        self.assertEqual(tap.with_backlog("unix:/run/mta.sock"), "unix:/run/mta.sock")

    def test_backlog_reaches_listen(self):
        """The listener is opened with that backlog."""
        reactor = MemoryReactorClock()
        config = make_config(self.mktemp(), listeners=[{"role": "mx", "endpoint": "tcp:2525"}],
                             server={"workers": 0})
        svc = tap.make_service(config, reactor)
        lock = [s for s in svc if isinstance(s, tap.SpoolLockService)][0]
        self.addCleanup(lock.spool.unlock)
        svc.getServiceNamed("listener-mx-tcp:2525").privilegedStartService()
        self.assertEqual(reactor.tcpServers[0][2], 1024)


class StopOrderTests(SynchronousTestCase):
    def test_children_stop_in_reverse_one_after_another(self):
        """The next child stops only after the previous one's stop has finished."""
        from twisted.application import service
        from twisted.internet import defer
        events = []
        gates = {}

        class Child(service.Service):
            def __init__(self, name):
                self.setName(name)

            def stopService(self):
                service.Service.stopService(self)
                events.append(self.name)
                gates[self.name] = defer.Deferred()
                return gates[self.name]

        top = tap.OrderedMultiService()
        for name in ("pool", "manager", "listener"):
            Child(name).setServiceParent(top)
        top.startService()
        d = top.stopService()
        self.assertEqual(events, ["listener"])
        gates["listener"].callback(None)
        self.assertEqual(events, ["listener", "manager"])
        gates["manager"].callback(None)
        gates["pool"].callback(None)
        self.assertEqual(events, ["listener", "manager", "pool"])
        self.successResultOf(d)


class QueueCommandTests(SynchronousTestCase):
    def setUp(self):
        from twisted_mta.model import Envelope, Outcome, Recipient
        from twisted_mta.queue.spool import Spool
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.conf = os.path.join(base, "mta.toml")
        with open(self.conf, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n' + LOOPBACK_DNS)
        spool = Spool(os.path.join(base, "spool"))
        spool.create()
        w = spool.new_message()
        now = __import__("time").time()
        env = Envelope(queue_id=w.queue_id, sender="a@remote.test",
                       recipients=(Recipient("bob@example.test"), Recipient("x@elsewhere.test")),
                       arrival=now - 7200, next_attempt=now + 300, client={"ip": "192.0.2.1"})
        w.write(env.to_header() + b"Subject: hi\r\n\r\nbody\r\n")
        self.successResultOf(w.commit(env))
        import attrs
        spool.update_and_move(attrs.evolve(
            env, attempts=3, last_outcome=Outcome(451, "4.4.0", "try later"),
            recipients=(Recipient("bob@example.test", state="delivered", dsn_pending=True),
                        Recipient("x@elsewhere.test", outcome=Outcome(451, "4.4.0", "try later")))),
            "new", "cur")
        self.qid = env.queue_id

    def test_list(self):
        """queue list shows id, state, age, sender, recipients, next attempt and last error."""
        code, out, err = run_cli("queue", "list", "-c", self.conf)
        self.assertEqual(code, 0, err)
        header, row = out.splitlines()[:2]
        self.assertTrue(header.startswith("QUEUE ID"))
        self.assertIn(self.qid, row)
        for text in ("cur", "2h", "<a@remote.test>", "2 (1 pending)", "in 4m", "451 4.4.0 try later"):
            self.assertIn(text, row)
        self.assertIn("1 entry", out)

    def test_list_json(self):
        """queue list --json gives the envelopes with state and age."""
        code, out, err = run_cli("queue", "list", "-c", self.conf, "--json")
        [entry] = json.loads(out)
        self.assertEqual((entry["queue_id"], entry["state"], entry["attempts"]), (self.qid, "cur", 3))
        self.assertGreater(entry["age_seconds"], 7000)

    def test_list_json_streams_one_item_a_line(self):
        """--json is written item by item, one item a line between the brackets, keys sorted, and reads back as the list, for none, one and several entries."""
        items = [{"queue_id": "A", "n": [1, {"y": "", "x": "\u00e9\n"}]}, {"queue_id": "B"}, {}]
        for count in range(4):
            out = io.StringIO()
            with redirect_stdout(out):
                cli._print_json_array(iter(items[:count]))
            text = out.getvalue()
            self.assertEqual(json.loads(text), items[:count])
            lines = text.splitlines()
            if count == 0:
                self.assertEqual(text, "[]\n")
                continue
            self.assertEqual((lines[0], lines[-1], len(lines)), ("[", "]", count + 2))
            for line, item in zip(lines[1:-1], items):
                self.assertEqual(line.rstrip(","), json.dumps(item, sort_keys=True))

    def test_list_many_keeps_columns_of_the_first_rows(self):
        """Past WIDTH_ROWS entries, rows are printed as read with the first rows' column widths, and all are counted."""
        from twisted_mta.queue.spool import Spool
        self.patch(cli, "WIDTH_ROWS", 1)
        real = Spool.iter_scan

        def three(spool):
            [entry] = real(spool)
            for n in range(3):
                yield (f"{entry[0][:-1]}{n}", *entry[1:])
        self.patch(Spool, "iter_scan", three)
        code, out, err = run_cli("queue", "list", "-c", self.conf)
        lines = out.splitlines()
        self.assertEqual((code, len(lines), lines[-1]), (0, 6, "3 entries"), out)
        self.assertEqual({line.index("<a@remote.test>") for line in lines[1:4]}, {
            lines[0].index("SENDER")})

    def test_show_reads_one_entry(self):
        """queue show finds its entry without reading the others."""
        from twisted_mta.queue.spool import Spool
        self.patch(Spool, "iter_scan", lambda spool: self.fail("queue show scanned the spool"))
        code, out, err = run_cli("queue", "show", self.qid, "-c", self.conf)
        self.assertEqual(code, 0, err)
        self.assertIn(f"Queue ID:      {self.qid} (cur/)", out)

    def test_show(self):
        """queue show lists each recipient with its state and outcome."""
        code, out, err = run_cli("queue", "show", self.qid, "-c", self.conf)
        self.assertEqual(code, 0)
        self.assertIn("delivered <bob@example.test> (its DSN is not queued yet: retried)", out)
        self.assertIn("pending   <x@elsewhere.test>: 451 4.4.0 try later", out)
        self.assertIn("Attempts:      3", out)

    def test_show_unknown(self):
        """queue show of an unknown id exits 1 with a one-line reason."""
        code, out, err = run_cli("queue", "show", "NOPE", "-c", self.conf)
        self.assertEqual((code, err), (1, "twisted-mta: no queue entry NOPE\n"))

    def test_empty(self):
        """An empty queue says so."""
        import shutil
        shutil.rmtree(os.path.join(os.path.dirname(self.conf), "spool", "cur"))
        os.makedirs(os.path.join(os.path.dirname(self.conf), "spool", "cur"))
        self.assertEqual(run_cli("queue", "list", "-c", self.conf)[1], "The queue is empty.\n")


class QueueActionTests(QueueCommandTests):
    def test_offline_hold_release_delete(self):
        """With no MTA running, hold/release/delete act on the spool directly."""
        code, out, err = run_cli("queue", "hold", self.qid, "-c", self.conf)
        self.assertEqual((code, out), (0, f"{self.qid} held\n"))
        self.assertIn("hold", run_cli("queue", "list", "-c", self.conf)[1])
        self.assertEqual(run_cli("queue", "release", self.qid, "-c", self.conf)[1],
                         f"{self.qid} released; it will be attempted when the MTA starts\n")
        self.assertEqual(run_cli("queue", "delete", self.qid, "-c", self.conf)[1],
                         f"{self.qid} deleted\n")
        self.assertEqual(run_cli("queue", "list", "-c", self.conf)[1], "The queue is empty.\n")

    def test_running_mta_gets_a_request(self):
        """With the spool locked by a running MTA, the command leaves a request in control/."""
        from twisted_mta.queue.spool import Spool
        spool = Spool(os.path.join(os.path.dirname(self.conf), "spool"))
        spool.lock()
        self.addCleanup(spool.unlock)
        code, out, err = run_cli("queue", "hold", self.qid, "-c", self.conf)
        self.assertEqual(code, 0)
        self.assertIn("requested", out)
        [name] = os.listdir(os.path.join(spool.path, "control"))
        self.assertTrue(name.endswith(f"-hold-{self.qid}"))

    def test_tls_override_request(self):
        """release --tls relaxed / --allow-cleartext leave a one-shot override request for the running MTA; not for ALL, not offline."""
        from twisted_mta.queue.spool import Spool
        self.assertEqual(run_cli("queue", "release", self.qid, "--tls", "relaxed",
                                 "-c", self.conf)[0], 1)  # no MTA running
        spool = Spool(os.path.join(os.path.dirname(self.conf), "spool"))
        spool.lock()
        self.addCleanup(spool.unlock)
        code, out, _ = run_cli("queue", "release", self.qid, "--tls", "relaxed", "-c", self.conf)
        self.assertEqual(code, 0)
        self.assertIn("one-shot relaxed TLS override", out)
        code, _, _ = run_cli("queue", "flush", self.qid, "--allow-cleartext", "-c", self.conf)
        names = sorted(os.listdir(os.path.join(spool.path, "control")))
        self.assertEqual([n.split("-", 3)[2] for n in names],
                         ["release:relaxed", "flush:cleartext"])
        self.assertEqual(run_cli("queue", "flush", "--allow-cleartext", "-c", self.conf)[0], 2)

    def test_unknown_entry(self):
        """An unknown id is refused before anything is requested."""
        self.assertEqual(run_cli("queue", "hold", "NOPE", "-c", self.conf)[:3:2],
                         (1, "twisted-mta: no queue entry NOPE\n"))


class MissingSpoolTests(SynchronousTestCase):
    """
    On a fresh installation the spool does not exist until the MTA first
    starts: an empty queue, said in one line, and no command creates it.
    """

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        self.conf = os.path.join(base, "mta.toml")
        with open(self.conf, "w") as f:
            f.write(MINIMAL)
        self.spool = os.path.join(base, "spool")

    def assertNoSpool(self):
        self.assertFalse(os.path.exists(self.spool), "a command created the spool")

    def test_list(self):
        """queue list: the queue is empty, naming the spool; exit 0; --json prints []."""
        self.assertEqual(run_cli("queue", "list", "-c", self.conf),
                         (0, f"The queue is empty (the spool {self.spool} does not exist "
                             "yet).\n", ""))
        self.assertEqual(run_cli("queue", "list", "--json", "-c", self.conf), (0, "[]\n", ""))
        self.assertNoSpool()

    def test_show_and_actions(self):
        """queue show/hold/release/delete/flush ID and tls explain --message: not found, exit 1, one line; flush of everything has nothing to do."""
        line = (f"twisted-mta: no queue entry NOPE: the spool {self.spool} does not exist yet, "
                "so the queue is empty\n")
        for argv in (("queue", "show", "NOPE"), ("queue", "hold", "NOPE"),
                     ("queue", "release", "NOPE"), ("queue", "delete", "NOPE"),
                     ("queue", "flush", "NOPE"), ("tls", "explain", "--message", "NOPE")):
            self.assertEqual(run_cli(*argv, "-c", self.conf), (1, "", line), argv)
        self.assertEqual(run_cli("queue", "flush", "-c", self.conf),
                         (0, f"The queue is empty (the spool {self.spool} does not exist "
                             "yet): nothing to flush.\n", ""))
        self.assertNoSpool()

    def test_tls_history_and_shadow_report(self):
        """tls history (--forget too) and tls shadow-report: nothing recorded yet, exit 0."""
        missing = f"(the spool {self.spool} does not exist yet)"
        self.assertEqual(run_cli("tls", "history", "-c", self.conf),
                         (0, f"no TLS history {missing}\n", ""))
        self.assertEqual(run_cli("tls", "history", "--json", "-c", self.conf), (0, "{}\n", ""))
        for flag in (("--forget", "example.org"), ("--forget-all",)):
            self.assertEqual(run_cli("tls", "history", *flag, "-c", self.conf),
                             (0, f"no TLS history {missing}: nothing to forget\n", ""))
        self.assertEqual(run_cli("tls", "shadow-report", "-c", self.conf),
                         (0, f"no shadow policy would have refused anything {missing}\n", ""))
        self.assertNoSpool()

    def test_unreadable_spool(self):
        """A spool that exists but lacks its directories is one line, exit 1."""
        os.makedirs(self.spool)
        code, out, err = run_cli("queue", "list", "-c", self.conf)
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(f"twisted-mta: cannot read the spool {self.spool}: "),
                        err)
        self.assertEqual(err.count("\n"), 1)


class ShadowReportTests(SynchronousTestCase):
    def test_report_groups_and_counts(self):
        """tls shadow-report groups would-be failures by destination and class, most frequent first; --since filters."""
        import time
        from twisted_mta.tls import shadow
        base = self.mktemp()
        config = make_config(base)
        path = os.path.join(base, "test.toml")
        with open(path, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n' + LOOPBACK_DNS)
        now = time.time()
        event = {"domain": "expired.test", "host": "mx.expired.test", "address": "192.0.2.1",
                 "port": 25, "policy": "opportunistic", "shadow": "strict", "why": "default",
                 "kind": "certificate-expired", "detail": "expired",
                 "reason": "mx.expired.test presented a certificate that expired on 3 March 2026"}
        for t in (now - 7200, now - 60, now - 30):
            shadow._append(shadow.report_path(config.spool), json.dumps({**event, "time": t}) + "\n")
        other = {**event, "domain": "plain.test", "host": "mx.plain.test",
                 "kind": "starttls-not-offered", "detail": "", "time": now - 10,
                 "reason": "mx.plain.test does not offer encryption (no STARTTLS)"}
        shadow._append(shadow.report_path(config.spool), json.dumps(other) + "\n")
        code, out, err = run_cli("tls", "shadow-report", "-c", path, "--json")
        self.assertEqual(code, 0, err)
        rows = json.loads(out)
        self.assertEqual([(r["domain"], r["kind"], r["count"]) for r in rows],
                         [("expired.test", "certificate-expired", 3),
                          ("plain.test", "starttls-not-offered", 1)])
        code, out, _ = run_cli("tls", "shadow-report", "-c", path, "--since", "1h")
        self.assertIn("    2  expired.test", out)
        self.assertIn("expired on 3 March 2026", out)


class PublishLookupsTests(SynchronousTestCase):
    def test_no_system_resolver(self) -> None:
        """
        Without [dns] nameservers and with no system resolver to read, each
        look-up fails with one line naming why (it raised NameError before:
        the except clause's name is gone once the clause ends).
        """
        import dns.resolver

        from twisted_mta.tls import publish

        def no_resolver(*args, **kwargs):
            raise dns.resolver.NoResolverConfiguration("no nameservers")

        self.patch(dns.resolver, "Resolver", no_resolver)
        config = make_config(self.mktemp(), dns={"nameservers": []})
        lookups = cli._publish_lookups(config, policy=None)
        for lookup in (lookups.tlsa, lookups.txt):
            e = self.assertRaises(publish.LookupFailed, lookup, "_25._tcp.mx.example.test")
            self.assertIn("no resolver to ask: no nameservers", str(e))
