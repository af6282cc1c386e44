"""
scripts/bench (issue 13): no configuration it writes can send a DNS query
off the machine; its pure parts (the plan of rounds, the summary with
paired ratios, the table, percentiles, the arguments) from tables; and
its cheapest modes run to the end with every message counted where it
must land.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from types import ModuleType

from twisted.trial import unittest

from tests.interop.support import postfix_unavailable
from twisted_mta.config import load_config

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts")
SCRIPT = os.path.join(SCRIPTS, "bench")
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

from benchlib import core, modes  # noqa: E402


def load_bench() -> ModuleType:
    """scripts/bench as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("bench_script", SCRIPT)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def tempdir(testcase: unittest.TestCase) -> str:
    path = tempfile.mkdtemp(prefix="twisted-mta-bench-script-")
    os.chmod(path, 0o755)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def run(server: str, cell: tuple[int, int], rate: float, **kw: float) -> dict:
    """A run's raw figures as run_once returns them, the rest made up."""
    return {"server": server, "sessions": cell[0], "size": cell[1], "messages": 100,
            "seconds": 100 / rate, "msg_per_s": rate, "peak_rss": 2**20 * 10,
            "peak_pss": 2**20 * 5, "server_cpu": 0.5, "other_cpu": 0.1} | kw


class ConfigTests(unittest.SynchronousTestCase):
    def assertLoopbackDNS(self, path: str) -> dict:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        servers = raw["dns"]["nameservers"]
        self.assertTrue(servers)
        for server in servers:
            self.assertTrue(ipaddress.ip_address(server.rpartition(":")[0]).is_loopback, server)
        return raw

    def test_mta_dns_on_loopback(self) -> None:
        """Every twisted-mta variant asks only a loopback nameserver, and the config loads."""
        for name, workers in core.SERVERS.items():
            if name == "postfix":
                continue
            mta = core.make_mta(os.path.join(tempdir(self), name), workers)
            raw = self.assertLoopbackDNS(mta.config_path)
            self.assertEqual(raw["server"].get("workers"), workers)
            self.assertGreaterEqual(raw["limits"]["connections_per_ip"], 100)
            self.assertEqual(load_config(mta.config_path).workers, workers)

    def test_remote_mail_to_loopback_smarthost(self) -> None:
        """The relaying modes' config sends remote mail to 127.0.0.1 and DNS to loopback."""
        mta = core.make_mta(tempdir(self), None, core.smarthost(2525) + modes.JSON_LOG)
        raw = self.assertLoopbackDNS(mta.config_path)
        self.assertEqual(raw["outbound"]["smarthost"]["host"], "[127.0.0.1]:2525")
        config = load_config(mta.config_path)
        self.assertEqual(config.dns.nameservers, ("127.0.0.1:9",))

    def test_postfix_looks_nothing_up(self) -> None:
        """Postfix has DNS off, no relay host, and only an error transport off the box."""
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        main = core.make_postfix(tempdir(self)).params
        self.assertEqual(main["smtp_dns_support_level"], "disabled")
        self.assertEqual(main["disable_dns_lookups"], "yes")
        self.assertEqual(main["smtpd_peername_lookup"], "no")
        self.assertEqual(main["relayhost"], "")
        self.assertTrue(main["default_transport"].startswith("error:"))
        self.assertTrue(main["relay_transport"].startswith("error:"))
        self.assertEqual(main["virtual_mailbox_domains"], "example.test")
        relaying = core.make_postfix(tempdir(self), 2525).params
        self.assertEqual(relaying["relayhost"], "[127.0.0.1]:2525")
        self.assertEqual(relaying["smtp_dns_support_level"], "disabled")
        self.assertNotIn("default_transport", relaying)


class PureTests(unittest.SynchronousTestCase):
    def test_plan_rotates(self) -> None:
        """Each round runs every server once; each server goes first once in three rounds."""
        cell = {"sessions": 1}
        todo = core.plan([cell], 3, ["a", "b", "c"])
        self.assertEqual([name for name, _ in todo],
                         ["a", "b", "c", "b", "c", "a", "c", "a", "b"])
        self.assertTrue(all(c is cell for _, c in todo))

    def test_plan_pairs_cells(self) -> None:
        """With a paired key, the cells that differ only in it share each round, alternating which goes first; other cells keep their own rounds."""
        cells = [{"size": z, "bdat": b} for z in (1, 2) for b in (False, True)]
        todo = core.plan(cells, 2, ["s"], "bdat")
        self.assertEqual([(c["size"], c["bdat"]) for _, c in todo],
                         [(1, False), (1, True), (1, True), (1, False),
                          (2, False), (2, True), (2, True), (2, False)])
        self.assertEqual([(c["size"], c["bdat"]) for _, c in core.plan(cells[:2], 2, ["s"])],
                         [(1, False), (1, False), (1, True), (1, True)])

    def test_run_directories_removed_after_the_last_run(self) -> None:
        """Every run's directory stays until the last run has ended (no run follows a removal), then all are removed, also when a run fails."""
        for fail_at in (None, 3):
            workdir = tempdir(self)
            seen: list[list[bool]] = []

            def fake_run_once(mode, name, cell, wd, leftovers=None):
                seen.append([os.path.isdir(p) for p in leftovers])
                path = tempfile.mkdtemp(dir=wd)
                with open(os.path.join(path, "message"), "w") as f:
                    f.write("x")
                leftovers.append(path)
                if len(seen) == fail_at:
                    raise core.BenchError("this run failed")
                return run(name, (cell["sessions"], cell["size"]), 100.0)
            self.patch(core, "run_once", fake_run_once)
            self.patch(core, "machine", lambda workdir=None: {"commit": "0" * 40, "dirty": False,
                                                                 "load_before": (0.0, 0.0, 0.0)})
            self.patch(core, "describe_machine", lambda info, others=None: "")
            self.patch(core, "report", lambda *a: None)
            cells = [{"sessions": 20, "size": 1024, "messages": 100}]
            if fail_at:
                self.assertRaises(core.BenchError, core.run_rounds, modes.Local(), cells, 2,
                                  ["postfix", "workers=auto"], workdir, 0, None)
            else:
                core.run_rounds(modes.Local(), cells, 2, ["postfix", "workers=auto"], workdir,
                                0, None)
            self.assertEqual(seen, [[True] * n for n in range(fail_at or 4)])
            self.assertEqual(os.listdir(workdir), [])

    def test_file_system_of_a_path(self) -> None:
        """The mount a path is on (the longest mount point that contains it), its type, device and options, and whether it has a journal: ext4 when /proc/fs/jbd2 names its device, XFS always, tmpfs unknown."""
        mountinfo = "\n".join([
            "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard",
            "30 22 7:0 / /mnt/j rw,relatime shared:5 - ext4 /dev/loop0 rw,data=ordered",
            "33 30 7:1 / /mnt/j/inner rw - ext4 /dev/loop1 rw",
            "31 22 0:40 / /tmp/ram rw,nosuid - tmpfs tmpfs rw,size=10m",
            "32 22 8:16 / /srv/x\\040y rw - xfs /dev/sdb rw,attr2",
            "garbage without the separator",
        ])
        names = {"254:0": "vda", "7:0": "loop0", "7:1": "loop1"}.get
        table = [
            ("/", ("ext4", "/dev/vda", "/", "rw,relatime,discard", "no")),
            ("/mnt/jj/x", ("ext4", "/dev/vda", "/", "rw,relatime,discard", "no")),
            ("/mnt/j/a/b", ("ext4", "/dev/loop0", "/mnt/j", "rw,relatime,data=ordered", "yes")),
            ("/mnt/j", ("ext4", "/dev/loop0", "/mnt/j", "rw,relatime,data=ordered", "yes")),
            ("/mnt/j/inner/x", ("ext4", "/dev/loop1", "/mnt/j/inner", "rw", "no")),
            ("/tmp/ram/f", ("tmpfs", "tmpfs", "/tmp/ram", "rw,nosuid,size=10m", "")),
            ("/srv/x y/z", ("xfs", "/dev/sdb", "/srv/x y", "rw,attr2", "yes")),
        ]
        for path, want in table:
            fs = core.file_system(path, mountinfo, journals=["loop0-8", "dm-0-8"],
                                  block_name=lambda dev: names(dev, dev))
            got = tuple(fs[k] for k in ("type", "device", "mount", "options", "journal"))
            self.assertEqual(got, want, path)
        described = core.describe_machine(
            {"commit": "a" * 40, "dirty": False, "date": "d", "cpu": "c", "cores": 2,
             "memory_gib": 1, "kernel": "k", "python": "p", "twisted": "t", "postfix": "x",
             "load_before": (0.0, 0.0, 0.0),
             "file_system": core.file_system("/", mountinfo, journals=[],
                                             block_name=lambda dev: "vda")})
        self.assertIn("spools on ext4, without a journal (/dev/vda on /, rw,relatime,discard)",
                      described)

    def test_an_entry_moving_is_counted_once(self) -> None:
        """
        An entry that moves from new/ to cur/ while the queue is counted
        (walked in that order) counts once: the queue mode once saw 2001
        messages of 2000 on the EPYC.
        """
        spool = tempdir(self)
        for d in ("new", "cur"):
            os.makedirs(os.path.join(spool, d))
        for name in ("A1", "B2"):
            open(os.path.join(spool, "new", name), "w").close()
        open(os.path.join(spool, "cur", ".hidden"), "w").close()
        walk = os.walk

        def moving(top, *args, **kw):
            for item in walk(top, *args, **kw):
                yield item
                if top.endswith("new"):  # A1 moves once new/ was read
                    os.rename(os.path.join(spool, "new", "A1"), os.path.join(spool, "cur", "A1"))
        self.patch(core.os, "walk", moving)
        self.assertEqual(core.count_files(spool, ("new", "cur")), 2)

    def test_percentile(self) -> None:
        """Nearest rank: p50 and p99 of 1..100 are 50 and 99; one value is every percentile."""
        values = list(range(100, 0, -1))
        self.assertEqual((core.percentile(values, 50), core.percentile(values, 99)), (50, 99))
        self.assertEqual(core.percentile([7.0], 99), 7.0)
        self.assertEqual(core.percentile([1, 2, 3], 100), 3)

    def test_summary_pairs_rounds(self) -> None:
        """Medians, min-max, the ratio of the medians, and the spread of per-round ratios."""
        cell = (20, 1024)
        runs = [run("postfix", cell, 100), run("workers=auto", cell, 50),
                run("workers=auto", cell, 90), run("postfix", cell, 200),
                run("postfix", cell, 300), run("workers=auto", cell, 330)]
        rows = core.summary(modes.MODES["local"], runs)
        self.assertEqual([r["server"] for r in rows], ["postfix", "workers=auto"])
        ours = rows[1]
        self.assertEqual((ours["msg_per_s"], ours["min"], ours["max"]), (90, 50, 330))
        self.assertAlmostEqual(ours["ratio"], 90 / 200)
        self.assertAlmostEqual(ours["paired_min"], 0.45)  # 90 / 200
        self.assertAlmostEqual(ours["paired_max"], 1.1)  # 330 / 300
        self.assertNotIn("ratio", rows[0])
        self.assertEqual(ours["peak_rss_mb"], 10)
        self.assertEqual(ours["cpu_ms_per_msg"], 5)

    def test_table(self) -> None:
        """One line per cell and server, with the ratio and its paired spread."""
        cell = (1, 1024)
        rows = core.summary(modes.MODES["local"], [run("postfix", cell, 200),
                                                   run("workers=0", cell, 100)])
        text = core.table(modes.MODES["local"], rows)
        self.assertIn("| 1 x 1 KiB | workers=0 | 100.0 (100.0-100.0) | 0.50x (0.50-0.50) |",
                      text)
        self.assertIn("| 1 x 1 KiB | postfix | 200.0 (200.0-200.0) |  |", text)

    def test_latency_compares_p99(self) -> None:
        """The latency mode compares p99 (lower is better) and names it in the table."""
        mode = modes.MODES["latency"]
        cell = (20, 1024)
        rows = core.summary(mode, [run("postfix", cell, 100, p99_ms=40.0, p50_ms=10.0),
                                   run("workers=auto", cell, 100, p99_ms=30.0, p50_ms=12.0)])
        self.assertEqual(rows[1]["ratio"], 0.75)
        text = core.table(mode, rows)
        self.assertIn("p99 ms (min-max)", text)
        self.assertIn("20 x 1 KiB postfix 10.0 ms; 20 x 1 KiB workers=auto 12.0 ms", text)

    def test_tls_notes(self) -> None:
        """The tls mode adds each server's verified/cleartext ratio."""
        mode = modes.MODES["tls"]
        rows = [{"cell": mode.label({"messages": 10, "size": 1024, "tls": tls}),
                 "server": "postfix", "msg_per_s": rate} for tls, rate in ((False, 400),
                                                                           (True, 300))]
        self.assertEqual(mode.notes(rows), "\npostfix: verified TLS / cleartext 0.75.\n")

    def test_chunking_notes_and_config(self) -> None:
        """The chunking mode labels its cells BDAT/DATA, adds the BDAT/DATA ratio per size, and turns [outbound] chunking on and off in a config that loads."""
        mode = modes.MODES["chunking"]
        rows = [{"cell": mode.label({"messages": 10, "size": size, "bdat": bdat}),
                 "server": "workers=auto", "msg_per_s": rate}
                for size, bdat, rate in ((1024, False, 400), (1024, True, 500),
                                         (102400, False, 100), (102400, True, 110))]
        self.assertEqual(mode.notes(rows), "\nworkers=auto, 10 messages of 1 KiB: BDAT / DATA "
                                           "1.25; workers=auto, 10 messages of 100 KiB: BDAT / "
                                           "DATA 1.10.\n")
        runs = [{"server": "workers=auto", "size": 1024, "messages": 10, "bdat": b,
                 "msg_per_s": rate, "server_cpu": cpu}
                for b, rate, cpu in ((False, 400, 2.0), (True, 500, 1.5),
                                     (True, 300, 1.0), (False, 300, 2.0))]
        self.assertEqual(mode.run_notes(runs), "\nworkers=auto, 10 messages of 1 KiB, BDAT / "
                         "DATA per round: msg/s 1.25, 1.00; CPU per message 0.75, 0.50.\n")
        self.assertEqual(modes.MODES["outbound"].run_notes(runs), "")
        for flag in (True, False):
            mta = core.make_mta(tempdir(self), None, core.smarthost(
                2525, f"chunking = {'true' if flag else 'false'}\n") + 'tls_policy = "none"\n')
            config = load_config(mta.config_path)
            self.assertIs(config.outbound.chunking, flag)
            self.assertEqual(config.outbound.smarthost.tls_policy, "none")

    def test_cells(self) -> None:
        """Arguments to cells: the defaults, --quick, and explicit lists."""
        bench = load_bench()
        a = bench.parser().parse_args(["local"])
        self.assertEqual(len(modes.MODES["local"].cells(False, a)), 6)
        self.assertEqual([(c["sessions"], c["messages"])
                          for c in modes.MODES["local"].cells(True, a)], [(1, 200), (20, 200)])
        a = bench.parser().parse_args(["e2e", "--sessions", "5,50", "--messages", "7"])
        self.assertEqual([(c["sessions"], c["size"], c["messages"])
                          for c in modes.MODES["e2e"].cells(False, a)],
                         [(5, 1024, 7), (50, 1024, 7)])
        self.assertEqual([c["tls"] for c in modes.MODES["tls"].cells(True, a)], [False, True])
        self.assertEqual([(c["size"], c["bdat"]) for c in modes.MODES["chunking"].cells(True, a)],
                         [(1024, False), (1024, True)])

    def test_bad_arguments(self) -> None:
        """An unknown mode or server: one clear error line and status 2, no traceback."""
        bench = load_bench()
        for argv in (["nosuchmode"], ["local", "--servers", "postfix,exim"],
                     ["e2e", "--sessions", "1,x"], ["bigqueue", "--entries", "0"]):
            with self.assertRaises(SystemExit) as caught:
                bench.main(argv)
            self.assertEqual(caught.exception.code, 2)

    def test_docs_block(self) -> None:
        """--docs replaces only its mode's block, and adds the block when missing."""
        doc = ("# B\n<!-- scripts/bench e2e -->\nold\n<!-- end scripts/bench e2e -->\n"
               "kept\n")
        self.assertEqual(core.replace_block(doc, "e2e", "new\n"),
                         "# B\n<!-- scripts/bench e2e -->\nnew\n<!-- end scripts/bench e2e -->\n"
                         "kept\n")
        added = core.replace_block(doc, "tls", "t")
        self.assertTrue(added.startswith(doc.rstrip("\n")))
        self.assertTrue(added.endswith("<!-- scripts/bench tls -->\nt\n"
                                       "<!-- end scripts/bench tls -->\n"))

    def test_message_size(self) -> None:
        """A made-up message's body has the size asked for, in CRLF lines."""
        message = core.make_message("q1", core.LOCAL_RCPT, 1024)
        head, _, body = message.partition(b"\r\n\r\n")
        self.assertEqual(len(body), 1024)
        self.assertTrue(body.endswith(b"\r\n"))
        self.assertIn(b"To: <alice@example.test>", head)


class SmokeTests(unittest.TestCase):
    timeout = 120

    def smoke(self, mode: str, *args: str) -> tuple[dict, str]:
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        out = tempdir(self)
        result = subprocess.run(
            [sys.executable, SCRIPT, mode, "--quick", "--quiet-wait", "0", "--workdir", out,
             "--json", os.path.join(out, "result.json"), *args],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=110)
        self.assertEqual(result.returncode, 0, result.stderr[-4000:])
        with open(os.path.join(out, "result.json")) as f:
            report = json.load(f)
        self.assertEqual(sorted(os.listdir(out)), ["result.json"])  # nothing left behind
        return report, result.stdout

    def test_local_one_session(self) -> None:
        """One round of 20 one-KiB messages, one session: every server delivers all."""
        report, stdout = self.smoke("local", "--sessions", "1", "--messages", "20")
        self.assertEqual(sorted(r["server"] for r in report["runs"]), sorted(core.SERVERS))
        for r in report["runs"]:
            self.assertEqual(r["messages"], 20)
            self.assertGreater(r["msg_per_s"], 0)
            self.assertGreater(r["peak_rss"], 0)
        self.assertIn("| 1 x 1 KiB | workers=auto |", stdout)
        self.assertIn("load average", stdout)

    def test_e2e(self) -> None:
        """End to end: the sink got exactly what smtp-source sent, through both servers."""
        report, stdout = self.smoke("e2e", "--messages", "50", "--sessions", "5")
        self.assertEqual(sorted(r["server"] for r in report["runs"]),
                         ["postfix", "workers=auto"])
        for r in report["runs"]:
            self.assertEqual(r["messages"], 50)
            self.assertGreater(r["seconds"], 0)
        self.assertIn("| 5 x 1 KiB | workers=auto |", stdout)

    def test_clock_starts_with_the_workers_ready(self) -> None:
        """
        A server with a worker is started once the worker adopted the
        listener, not at the main process's banner (a second or more
        earlier, during which the main process received alone).
        """
        server = core.Server("workers=1", tempdir(self), mta_extra=core.smarthost(core.CLOSED_PORT))
        self.addCleanup(server.stop)
        server.start()
        with open(server.mta.log_path) as f:
            self.assertRegex(f.read(), r"worker 0: receiving on 1 listener")
        self.assertEqual(len(core.tree(server.pid)), 2)

    def test_chunking(self) -> None:
        """BDAT against DATA to tlssink offering CHUNKING: every message arrives, all of them with BDAT in the BDAT cell and none in the DATA cell."""
        if shutil.which("cc") is None:
            raise unittest.SkipTest("no C compiler to build tlssink")
        report, stdout = self.smoke("chunking", "--messages", "30", "--sizes", "1024")
        by = {r["bdat"]: r for r in report["runs"]}
        self.assertEqual(by[True]["peer_bdat_messages"], 30)
        self.assertEqual(by[False]["peer_bdat_messages"], 0)
        self.assertEqual([by[b]["messages"] for b in (False, True)], [30, 30])
        self.assertIn("BDAT / DATA", stdout)
