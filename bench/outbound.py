#!/usr/bin/env python3
"""
Outbound delivery benchmark: twisted-mta against a private Postfix, both
relaying to the same kind of Postfix C{smtp-sink} on loopback.

Two measurements, each run several times per server in the same go,
alternating which server goes first, every run with fresh processes and a
fresh queue:

 1. outbound: N messages already in the queue (never attempted), then
    released; time until the sink has received N messages.  twisted-mta:
    the entries are written into a fresh spool with the spool API, then
    C{twistd -n mta} starts, timed from its launch (start-up time to its
    220 banner and peak RSS are reported too).  Postfix (running): the
    messages are injected with C{smtp-source} into the hold queue, then
    timed from C{postsuper -H ALL} + C{postqueue -f}.
 2. end-to-end: C{smtp-source} sends N messages into each server's port-25
    listener, which relays them to the sink; time from smtp-source's start
    until the sink has received N.

    python3 bench/outbound.py                  # 10,000 x 1 KiB, 3 repeats, ~5 minutes
    python3 bench/outbound.py --quick          # 2,000 messages, one repeat
    python3 bench/outbound.py --json out.json --profile prof/   # + a py-spy run
    PYTHONPATH=/var/tmp/clone python3 bench/outbound.py   # measure another checkout

Needs what bench/inbound.py needs (Linux, root, the C{postfix} package for
C{postfix}, C{postsuper}, C{smtp-source} and C{smtp-sink}; twisted-mta
importable) and C{py-spy} for C{--profile}.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import inbound  # noqa: E402  (bench/inbound.py: servers, /proc helpers, reporting)
from inbound import (  # noqa: E402
    CLK_TCK,
    BenchError,
    Sampler,
    count_files,
    free_port,
    log,
    proc_cpu_ticks,
    size_label,
)

KIB = 1024
DEFAULT_MESSAGES = 10_000
QUICK_MESSAGES = 2_000
DEFAULT_SIZE = 1 * KIB
DEFAULT_SESSIONS = 20  # smtp-source sessions, for the end-to-end test and to fill Postfix
DEFAULT_RECIPIENTS = 4  # rcpt0..3@remote.bench.test
SENDER = "sender@bench.test"
DOMAIN = "remote.bench.test"  # not local to either server: relayed to the sink
HELO = "client.bench.test"
TESTS = ("outbound", "e2e")
SERVERS = ("twisted-mta", "postfix")

TARGETS = {"outbound": 0.6, "e2e": 0.7}
RSS_TARGET_MB = 200
STARTUP_TARGET_S = 5.0


def recipient(i: int) -> str:
    return f"rcpt{i}@{DOMAIN}"


def poll_banner(port: int, timeout: float, is_alive, step: float = 0.02) -> float:
    """
    Wait (polling every C{step}) until 127.0.0.1:C{port} answers with a 220;
    return the perf_counter time at which it did.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not is_alive():
            raise BenchError(f"server on port {port} died during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                banner = s.recv(512)
                at = time.perf_counter()
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            if banner.startswith(b"220"):
                return at
            last = BenchError(f"unexpected banner {banner!r}")
        except OSError as e:
            last = e
        time.sleep(step)
    raise BenchError(f"no SMTP banner on port {port} after {timeout}s: {last}")


# -- the sink -----------------------------------------------------------------


class Sink:
    """
    One C{smtp-sink} per run, counting with C{-c}: it prints
    C{sess=S quit=Q mesg=M} (CR-terminated) whenever a session ends, a QUIT
    arrives or a message's final dot is received; a thread reads the
    counter and notes when the first message and the C{target}-th arrived.
    """

    BACKLOG = 4096

    def __init__(self, base: str) -> None:
        self.base = base
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.count = 0
        self.sessions = 0  # sessions ended (its own banner probe included)
        self.first_at: float | None = None
        self.target = 0
        self.reached_at: float | None = None
        self.last_change = time.monotonic()
        self._reached = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, target: int) -> None:
        self.port = free_port()
        self.target = target
        self.errlog = open(os.path.join(self.base, "smtp-sink.err"), "wb")
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "postfix", "-m", "1000", f"127.0.0.1:{self.port}",
             str(self.BACKLOG)],
            stdout=subprocess.PIPE, stderr=self.errlog, stdin=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        # Its own banner probe ends a session, which the counter shows as
        # sess=1 quit=1 mesg=0: harmless.
        poll_banner(self.port, 10, lambda: self.proc.poll() is None)

    _RECORD = re.compile(rb"sess=(\d+) quit=\d+ mesg=(\d+)")

    def _read(self) -> None:
        fd = self.proc.stdout.fileno()
        buf = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            now = time.perf_counter()
            buf += chunk
            records = buf.split(b"\r")
            buf = records.pop()
            n = 0
            for rec in reversed(records):
                m = self._RECORD.search(rec)
                if m:
                    self.sessions = int(m.group(1))
                    n = int(m.group(2))
                    break
            with self._lock:
                if n > self.count:
                    if self.count == 0:
                        self.first_at = now
                    self.count = n
                    self.last_change = time.monotonic()
                    if n >= self.target and self.reached_at is None:
                        self.reached_at = now
                        self._reached.set()

    def wait(self, timeout: float, stall: float = 60.0, check=None) -> float:
        """
        Until the sink has C{target} messages; returns the perf_counter time
        it got there.  Raise when nothing arrives for C{stall} seconds, on
        the overall C{timeout}, or when C{check()} raises.
        """
        deadline = time.monotonic() + timeout
        while not self._reached.wait(0.05):
            if check is not None:
                check()
            now = time.monotonic()
            if self.proc.poll() is not None:
                raise BenchError(f"smtp-sink exited ({self.proc.returncode})")
            if now > deadline or now - self.last_change > stall:
                raise BenchError(f"the sink has {self.count} of {self.target} messages "
                                 f"after {timeout if now > deadline else stall:.0f}s"
                                 + (" without progress" if now <= deadline else ""))
        assert self.reached_at is not None
        return self.reached_at

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._thread is not None:
            self._thread.join(5)
        self.errlog.close()


# -- the servers -------------------------------------------------------------


TWISTED_CONFIG = """\
# Written by bench/outbound.py for one benchmark run.
[server]
hostname = "mta.bench.test"
spool = "spool"

[[listeners]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"

[relay]
trusted_networks = ["127.0.0.0/8"]

[limits]
connections_per_ip = 200

[queue]
delivery_concurrency = 100

[outbound]
connections = 100
connections_per_destination = 20
idle_time = "5s"
messages_per_connection = 100

[outbound.smarthost]
host = "[127.0.0.1]:{sink}"
"""


class TwistedOut(inbound.TwistedMTA):
    """
    twisted-mta with every remote domain going to the sink as smarthost;
    C{start} returns as soon as the process is launched (the caller times
    the banner with L{wait_started}).
    """

    def __init__(self, base: str, sink_port: int) -> None:
        super().__init__(base)
        self.sink_port = sink_port
        self.started_at = 0.0

    def start(self) -> None:
        self.port = free_port()
        config = os.path.join(self.base, "mta.toml")
        with open(config, "w") as f:
            f.write(TWISTED_CONFIG.format(port=self.port, sink=self.sink_port))
        cmd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
               "-n", "--pidfile=", "mta", "--config", config]
        self.logfile = open(os.path.join(self.base, "twistd.log"), "wb")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.base, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_started(self) -> float:
        try:
            return poll_banner(self.port, 60, lambda: self.proc.poll() is None)
        except BenchError:
            self.stop()
            raise BenchError("twisted-mta did not start; its log:\n" + self.log_tail())

    def fill(self, count: int, size: int, recipients: int) -> None:
        """
        Write C{count} entries into the (fresh) spool with the spool API:
        envelope header first, then the message with CRLF line ends; each
        commit fsyncs the file and new/ (the spool runs inline here).
        """
        from twisted_mta.queue.envelope import Envelope, Recipient
        from twisted_mta.queue.spool import Spool

        spool = Spool(self.spool)
        spool.lock()
        try:
            now = time.time()
            for i in range(count):
                writer = spool.new_message()
                rcpt = recipient(i % recipients)
                message = make_message(writer.queue_id, rcpt, size, now)
                env = Envelope(queue_id=writer.queue_id, sender=SENDER,
                               recipients=(Recipient(address=rcpt),), arrival=now,
                               next_attempt=0.0, size=len(message))
                writer.write(env.to_header())
                writer.write(message)
                outcome: list[Any] = []
                writer.commit(env).addBoth(outcome.append)
                if not outcome or not isinstance(outcome[0], Envelope):
                    raise BenchError(f"spool commit of entry {i} did not succeed: {outcome!r}")
        finally:
            spool.unlock()

    def backlog_left(self) -> int:
        return count_files(self.spool, ("new", "cur"))

    def cpu_ticks(self) -> int:
        return proc_cpu_ticks(self.pid)


def make_message(qid: str, rcpt: str, size: int, now: float) -> bytes:
    """
    A message with a few header fields and a body of C{size} octets in lines
    of 78 characters plus CRLF, like smtp-source's C{-l}.
    """
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime(now))
    head = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: outbound benchmark\r\n"
            f"Date: {date}\r\nMessage-ID: <{qid}@bench.test>\r\n\r\n").encode()
    line = b"x" * 78 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest >= 3:
        body += b"y" * (rest - 2) + b"\r\n"
    return head + body


POSTFIX_MAIN_CF = """\
# Written by bench/outbound.py: a private instance relaying everything that
# is not local to the sink.  Everything not set here is Postfix's default
# (destination concurrency 20, connection cache on demand, fsync'd queue).
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {log}/maillog
maillog_file_prefixes = {log}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
mydestination = localhost
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
alias_maps =
alias_database =
biff = no
relayhost = [127.0.0.1]:{sink}
"""

# While the outbound test fills the queue: every message goes to hold/.
POSTFIX_HOLD = "smtpd_end_of_data_restrictions = check_client_access static:HOLD\n"


class PostfixOut(inbound.Postfix):
    """
    bench/inbound.py's private Postfix (same master.cf, start, stop and
    /proc sampling) with its own main.cf: relayhost = the sink, and with
    C{hold} every accepted message put on hold.
    """

    # The processes doing the outbound work, for the ΣHWM figure.
    INBOUND = ("qmgr", "smtp")

    def __init__(self, base: str, sink_port: int, hold: bool = False) -> None:
        super().__init__(base)
        self.sink_port = sink_port
        self.hold = hold

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        if args[:1] == ("start",):
            try:  # a stale pid file from this instance's previous start
                os.unlink(os.path.join(self.queue, "pid", "master.pid"))
            except FileNotFoundError:
                pass
            # Postfix.start wrote inbound's main.cf (which defers all remote
            # mail); replace it just before the start.
            with open(os.path.join(self.conf, "main.cf"), "w") as f:
                f.write(POSTFIX_MAIN_CF.format(queue=self.queue, data=self.data,
                                               log=self.logdir, sink=self.sink_port))
                if self.hold:
                    f.write(POSTFIX_HOLD)
        return super().postfix(*args, check=check)

    def release(self) -> None:
        """
        Release everything on hold (C{postsuper -H ALL}: hold/ -> deferred/)
        and have the queue manager take the deferred queue now
        (C{postqueue -f}); Postfix keeps running.
        """
        for cmd in (["postsuper", "-c", self.conf, "-H", "ALL"],
                    ["postqueue", "-c", self.conf, "-f"]):
            p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if p.returncode != 0:
                raise BenchError(f"{' '.join(cmd)} failed ({p.returncode}): "
                                 f"{p.stdout}{p.stderr}")

    def held(self) -> int:
        return count_files(self.queue, ("hold",))

    def backlog_left(self) -> int:
        return count_files(self.queue, ("incoming", "active", "deferred", "hold"))


# -- runs ---------------------------------------------------------------------


def smtp_source(port: int, sessions: int, count: int, size: int, rcpt: str) -> list[str]:
    return ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-M", HELO, "-f", SENDER, "-t", rcpt, f"127.0.0.1:{port}"]


def fill_postfix(server: PostfixOut, count: int, size: int, sessions: int,
                 recipients: int) -> None:
    """
    Inject C{count} messages into Postfix's hold queue: one smtp-source per
    recipient address, the sessions shared among them.
    """
    procs = []
    parts = min(recipients, sessions)
    for k in range(parts):
        n = count // parts + (1 if k < count % parts else 0)
        s = max(1, sessions // parts)
        procs.append(subprocess.Popen(smtp_source(server.port, s, n, size, recipient(k)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True))
    errors = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        if p.returncode != 0:
            errors.append(err.strip()[-500:])
    if errors:
        raise BenchError("smtp-source into Postfix failed: " + "; ".join(errors))
    deadline = time.monotonic() + 60
    while server.held() < count and time.monotonic() < deadline:
        time.sleep(0.1)
    if server.held() != count:
        raise BenchError(f"{server.held()} messages on hold in Postfix, {count} sent\n"
                         + server.log_tail())


def settle(server, sink: Sink, count: int, result: dict[str, Any]) -> None:
    """
    After the sink has C{count}: wait for the server's queue to empty, then
    check that the sink did not get more (a message sent twice).
    """
    t = time.perf_counter()
    deadline = time.monotonic() + 60
    left = server.backlog_left()
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = server.backlog_left()
    result["queue_empty_after_s"] = round(time.perf_counter() - t, 3)
    time.sleep(0.3)
    result["sink_count"] = sink.count
    errors = []
    if left:
        errors.append(f"{left} messages still queued 60 s after the sink had {count}")
    if sink.count != count:
        errors.append(f"the sink received {sink.count} messages for {count} sent")
    if errors:
        result["error"] = "; ".join(errors)


def run_once(test: str, name: str, rundir: str, args: argparse.Namespace,
             profile_to: str | None = None) -> dict[str, Any]:
    count, size = args.messages, args.size
    base = tempfile.mkdtemp(prefix=f"{test}-{name}-", dir=rundir)
    os.chmod(base, 0o755)
    result: dict[str, Any] = {"test": test, "server": name, "messages": count, "size": size}
    sink = Sink(base)
    server: Any = None
    sampler: Sampler | None = None
    source: subprocess.Popen | None = None
    pyspy: subprocess.Popen | None = None
    try:
        sink.start(count)
        if name == "twisted-mta":
            server = TwistedOut(base, sink.port)
        else:
            server = PostfixOut(base, sink.port, hold=(test == "outbound"))
        # -- fill the queue (outbound) or start the server (e2e) --
        if test == "outbound":
            t = time.perf_counter()
            if name == "twisted-mta":
                server.fill(count, size, args.recipients)
            else:
                server.start()  # with everything accepted put on hold
                result["startup_empty_seconds"] = round(time.perf_counter() - t, 3)
                t = time.perf_counter()
                fill_postfix(server, count, size, args.sessions, args.recipients)
            result["fill_seconds"] = round(time.perf_counter() - t, 2)
        else:
            server.start()
            if name == "twisted-mta":
                server.wait_started()
        sampler = Sampler(server, 0.25)
        busy0 = inbound.machine_busy_ticks()
        cpu0 = 0 if (test, name) == ("outbound", "twisted-mta") else server.cpu_ticks()
        # -- the timed part --
        t0 = time.perf_counter()
        if test == "outbound":
            if name == "twisted-mta":
                server.start()
                t0 = server.started_at
                sampler.start()
                t_banner = server.wait_started()
                result["startup_seconds"] = round(t_banner - t0, 3)
            else:
                sampler.start()
                server.release()
                result["release_seconds"] = round(time.perf_counter() - t0, 3)
        else:
            sampler.start()
            source = subprocess.Popen(smtp_source(server.port, args.sessions, count, size,
                                                  recipient(0)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      stdin=subprocess.DEVNULL, text=True)
        if profile_to and name == "twisted-mta":
            pyspy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--rate", str(args.pyspy_rate),
                 "--idle", "--threads", "--nonblocking", "--format", "raw", "-o", profile_to],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        source_done: list[float] = []

        def check() -> None:
            if source is not None and not source_done and source.poll() is not None:
                source_done.append(time.perf_counter())
                if source.returncode != 0:
                    raise BenchError(f"smtp-source into {name} failed: "
                                     f"{source.stderr.read().strip()[-1000:]}")
            if name == "twisted-mta" and server.proc.poll() is not None:
                raise BenchError("twistd exited during the run:\n" + server.log_tail())

        t_end = sink.wait(timeout=900, check=check)
        seconds = t_end - t0
        cpu1 = server.cpu_ticks()
        busy = (inbound.machine_busy_ticks() - busy0) / CLK_TCK
        if pyspy is not None:
            pyspy.send_signal(signal.SIGINT)
            try:
                _, err = pyspy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                pyspy.kill()
                pyspy.wait()
                err = b""
            result["pyspy"] = err.decode(errors="replace").strip().splitlines()[-2:]
        if source is not None:
            source.wait(120)
            if not source_done:
                source_done.append(time.perf_counter())
            if source.returncode != 0:
                raise BenchError(f"smtp-source into {name} failed: "
                                 f"{source.stderr.read().strip()[-1000:]}")
            result["smtp_source_seconds"] = round(source_done[0] - t0, 3)
            result["accept_msgs_per_s"] = round(count / (source_done[0] - t0), 1)
        assert sink.first_at is not None
        result.update(
            seconds=round(seconds, 3),
            msgs_per_s=round(count / seconds, 1),
            first_at_sink_seconds=round(sink.first_at - t0, 3),
            # first to last message at the sink: delivery alone, start-up excluded
            sink_window_msgs_per_s=round((count - 1) / max(1e-6, t_end - sink.first_at), 1),
            cpu_ms_per_msg=round((cpu1 - cpu0) * 1000 / CLK_TCK / count, 3),
            machine_cpu_ms_per_msg=round(busy * 1000 / count, 3),
        )
        sampler.stop()
        settle(server, sink, count, result)
        mem = server.memory()
        result["peak_rss_mb"] = mem["peak_rss_mb"]
        if name == "postfix":
            result["peak_pss_sum_all_mb"] = mem["peak_pss_sum_all_mb"]
            result["peak_rss_sum_all_mb"] = mem["peak_rss_sum_all_mb"]
            result["peak_processes"] = mem["peak_processes"]
    except BenchError as e:
        result["error"] = str(e)[:2000]
        log(f"  ERROR: {e}")
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for p in (pyspy, source):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
        try:
            if server is not None:
                server.stop()
                if "msgs_per_s" in result:
                    # Sessions the server opened to the sink: all have ended
                    # once it stopped (minus the sink's own banner probe).
                    time.sleep(0.3)
                    result["sink_sessions"] = sink.sessions - 1
        finally:
            sink.stop()
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
    return result


# -- reporting ---------------------------------------------------------------


def median(values: list[float]) -> float:
    return round(statistics.median(values), 3) if values else float("nan")


def summarize(runs: list[dict[str, Any]], tests: list[str], servers: list[str]
              ) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for test in tests:
        row: dict[str, Any] = {}
        for name in servers:
            rs = [r for r in runs if r["test"] == test and r["server"] == name
                  and "msgs_per_s" in r]
            allr = [r for r in runs if r["test"] == test and r["server"] == name]
            if not rs:
                if allr:
                    row[name] = {"runs": 0, "errors": [r["error"] for r in allr if "error" in r]}
                continue
            mps = [r["msgs_per_s"] for r in rs]
            s: dict[str, Any] = {
                "runs": len(rs),
                "median_msgs_per_s": round(statistics.median(mps), 1),
                "min_msgs_per_s": min(mps),
                "max_msgs_per_s": max(mps),
                "median_seconds": median([r["seconds"] for r in rs]),
                "median_sink_window_msgs_per_s": round(statistics.median(
                    r["sink_window_msgs_per_s"] for r in rs), 1),
                "median_first_at_sink_seconds": median([r["first_at_sink_seconds"] for r in rs]),
                "median_cpu_ms_per_msg": median([r["cpu_ms_per_msg"] for r in rs]),
                "median_machine_cpu_ms_per_msg": median([r["machine_cpu_ms_per_msg"] for r in rs]),
                "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "median_sink_sessions": median([r["sink_sessions"] for r in rs
                                                if "sink_sessions" in r]),
                "errors": [r["error"] for r in allr if "error" in r],
            }
            if test == "outbound":
                key = "startup_seconds" if name == "twisted-mta" else "startup_empty_seconds"
                s["median_startup_seconds"] = median([r[key] for r in rs])
                s["max_startup_seconds"] = max(r[key] for r in rs)
                s["median_fill_seconds"] = median([r["fill_seconds"] for r in rs])
                if name == "postfix":
                    s["median_release_seconds"] = median([r["release_seconds"] for r in rs])
            if test == "e2e":
                s["median_accept_msgs_per_s"] = round(statistics.median(
                    r["accept_msgs_per_s"] for r in rs), 1)
            if name == "postfix":
                s["max_peak_pss_sum_all_mb"] = max(r["peak_pss_sum_all_mb"] for r in rs)
            row[name] = s
        ours, pf = row.get("twisted-mta"), row.get("postfix")
        if ours and pf and ours.get("runs") and pf.get("runs"):
            row["ratio"] = round(ours["median_msgs_per_s"] / pf["median_msgs_per_s"], 2)
            pairs = []
            for rep in sorted({r["repeat"] for r in runs if r["test"] == test}):
                a = [r for r in runs if r["test"] == test and r["repeat"] == rep
                     and r["server"] == "twisted-mta" and "msgs_per_s" in r]
                b = [r for r in runs if r["test"] == test and r["repeat"] == rep
                     and r["server"] == "postfix" and "msgs_per_s" in r]
                if a and b:
                    pairs.append(a[0]["msgs_per_s"] / b[0]["msgs_per_s"])
            if pairs:
                row["paired_ratios"] = [round(x, 2) for x in pairs]
                row["paired_ratio_median"] = round(statistics.median(pairs), 2)
            row["window_ratio"] = round(ours["median_sink_window_msgs_per_s"]
                                        / pf["median_sink_window_msgs_per_s"], 2)
        out[test] = row
    return out


TEST_LABELS = {
    "outbound": "outbound: N queued, released* -> sink has N",
    "e2e": "end-to-end: smtp-source start -> sink has N",
}


def markdown_tables(rows: dict[str, dict[str, Any]], count: int, size: int) -> str:
    def mps(s):
        if not s or not s.get("runs"):
            return "-"
        return f"{s['median_msgs_per_s']:.0f} ({s['min_msgs_per_s']:.0f}-{s['max_msgs_per_s']:.0f})"

    def f(s, key, fmt):
        return format(s[key], fmt) if s and key in s else "-"

    lines = [
        f"N = {count} messages of {size_label(size)} per run.", "",
        "| test | twisted-mta msg/s | Postfix msg/s | ratio | paired ratio | "
        "seconds (ours / Postfix) | sink-window msg/s (ours / Postfix) | window ratio | "
        "first message at the sink, s (ours / Postfix) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for test, row in rows.items():
        ours, pf = row.get("twisted-mta"), row.get("postfix")
        lines.append("| " + " | ".join([
            TEST_LABELS[test], mps(ours), mps(pf),
            f"{row['ratio']:.2f}" if "ratio" in row else "-",
            f"{row['paired_ratio_median']:.2f}" if "paired_ratio_median" in row else "-",
            f"{f(ours, 'median_seconds', '.2f')} / {f(pf, 'median_seconds', '.2f')}",
            f"{f(ours, 'median_sink_window_msgs_per_s', '.0f')} / "
            f"{f(pf, 'median_sink_window_msgs_per_s', '.0f')}",
            f"{row['window_ratio']:.2f}" if "window_ratio" in row else "-",
            f"{f(ours, 'median_first_at_sink_seconds', '.2f')} / "
            f"{f(pf, 'median_first_at_sink_seconds', '.2f')}",
        ]) + " |")
    lines += ["",
              "| test | server | start-up to 220, s (median / max)* | peak memory MB | "
              "server CPU ms/msg | machine CPU ms/msg | queue fill, s | smtp-source msg/s | "
              "sessions to the sink |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for test, row in rows.items():
        for name in SERVERS:
            s = row.get(name)
            if not s or not s.get("runs"):
                continue
            if name == "twisted-mta":
                mem = f"{s['max_peak_rss_mb']:.0f} (VmHWM)"
            else:
                mem = f"{s['max_peak_pss_sum_all_mb']:.0f} (ΣPSS, all processes)"
            lines.append("| " + " | ".join([
                test, name,
                f"{s['median_startup_seconds']:.2f} / {s['max_startup_seconds']:.2f}"
                if "median_startup_seconds" in s else "-",
                mem, f(s, "median_cpu_ms_per_msg", ".2f"),
                f(s, "median_machine_cpu_ms_per_msg", ".2f"),
                f(s, "median_fill_seconds", ".1f"),
                f(s, "median_accept_msgs_per_s", ".0f"),
                f(s, "median_sink_sessions", ".0f"),
            ]) + " |")
    lines += ["", "\\* Released: twisted-mta from the launch of `twistd` with N entries in "
              "its spool (its start-up is inside the timed part); Postfix, already running, from "
              "`postsuper -H ALL` + `postqueue -f`. Start-up: twisted-mta until its port-25 "
              "listener answers 220, inside the timed part; Postfix: `postfix start` with an "
              "empty queue, before the fill, not timed."]
    return "\n".join(lines)


def target_lines(rows: dict[str, dict[str, Any]], count: int) -> list[str]:
    out = []
    for test, goal in TARGETS.items():
        row = rows.get(test, {})
        if "ratio" not in row:
            continue
        ok = "PASS" if row["ratio"] >= goal else "FAIL"
        out.append(f"{ok}: {test} {row['ratio']:.2f}x Postfix (paired "
                   f"{row.get('paired_ratio_median')}x; target >= {goal}x)")
    ours = rows.get("outbound", {}).get("twisted-mta")
    if ours and ours.get("runs"):
        rss = ours["max_peak_rss_mb"]
        out.append(f"{'PASS' if rss < RSS_TARGET_MB else 'FAIL'}: peak RSS with {count} "
                   f"messages queued {rss:.0f} MB, max over runs (target < {RSS_TARGET_MB} MB)")
        st = ours["max_startup_seconds"]
        out.append(f"{'PASS' if st < STARTUP_TARGET_S else 'FAIL'}: start-up with {count} "
                   f"messages queued {st:.2f} s, max over runs (median "
                   f"{ours['median_startup_seconds']:.2f} s; target < {STARTUP_TARGET_S:.0f} s)")
    return out


# Where the reactor's busy time goes in an outbound run (first match wins);
# replaces bench/inbound.py's inbound-oriented categories for the summary.
OUTBOUND_CATEGORIES = (
    ("logging (twisted.logger events, formatting, log file writes)",
     ("twisted/logger/", "msg (twisted/python/log.py)", "LogPublisher.")),
    # Handing a job to the I/O pool: Condition.notify wakes a pool thread,
    # and the reactor then often waits for the GIL inside it.
    ("thread-pool hand-offs (callInThread, Condition.notify, wake-up pipe)",
     ("threadpool.py", "twisted/_threads/", "Condition.notify", "callFromThread",
      "readFromFD", "_UnixWaker.")),
    ("start-up: spool recovery (Spool.recover, reading every envelope)",
     ("Spool.recover", "read_entry ", "read_head ")),
    ("SMTP client protocol (twisted_mta/outbound/client.py, twisted/mail)",
     ("twisted_mta/outbound/client.py", "twisted/mail/")),
    ("outbound pool (connections, queues per destination)",
     ("twisted_mta/outbound/",)),
    ("queue manager (attempts, scheduling, results, removal)",
     ("QueueManager.", "twisted_mta/queue/")),
    ("Deferred plumbing", ("Deferred.", "inlineCallbacks", "DeferredSemaphore")),
)


def profile_summary(raw: str) -> dict[str, Any]:
    saved = inbound._CATEGORIES
    inbound._CATEGORIES = OUTBOUND_CATEGORIES
    try:
        return inbound.summarize_pyspy(raw)
    finally:
        inbound._CATEGORIES = saved


# -- main --------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_MESSAGES} messages and one repeat (a smoke run)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per server per test (default 3; 1 with --quick)")
    p.add_argument("--messages", type=int, default=None,
                   help=f"messages per run (default {DEFAULT_MESSAGES}; {QUICK_MESSAGES} "
                        f"with --quick)")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE,
                   help="message body size in octets (default 1024)")
    p.add_argument("--sessions", type=int, default=DEFAULT_SESSIONS,
                   help="smtp-source sessions for the end-to-end test and for filling "
                        "Postfix's queue (default 20)")
    p.add_argument("--recipients", type=int, default=DEFAULT_RECIPIENTS,
                   help=f"the queued messages go to rcpt0..rcptN-1@{DOMAIN}, one each, "
                        f"in turn (default 4)")
    p.add_argument("--tests", default=",".join(TESTS),
                   help="which tests (default outbound,e2e)")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help="which servers (default twisted-mta,postfix)")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    p.add_argument("--workdir", default=None,
                   help="where to create the spools/queues (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep each run's directory")
    p.add_argument("--profile", metavar="DIR",
                   help="afterwards, one more twisted-mta run per --profile-tests under "
                        "py-spy (attached once the 220 banner answers; not in the table); "
                        "raw stacks and a summary go to DIR")
    p.add_argument("--profile-only", action="store_true",
                   help="with --profile: skip the benchmark, only profile")
    p.add_argument("--profile-tests", default="outbound",
                   help="tests to profile (default outbound)")
    p.add_argument("--pyspy-rate", type=int, default=200,
                   help="py-spy samples per second (default 200)")
    args = p.parse_args(argv)
    args.tests = [t for t in args.tests.split(",") if t]
    args.servers = [s for s in args.servers.split(",") if s]
    args.profile_tests = [t for t in args.profile_tests.split(",") if t]
    for t in args.tests + args.profile_tests:
        if t not in TESTS:
            p.error(f"unknown test {t!r}; choose from {', '.join(TESTS)}")
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.messages is None:
        args.messages = QUICK_MESSAGES if args.quick else DEFAULT_MESSAGES
    if args.profile_only and not args.profile:
        p.error("--profile-only needs --profile DIR")
    if args.recipients < 1 or args.messages < 1:
        p.error("--recipients and --messages must be positive")
    return args


def preflight(args: argparse.Namespace, workdir: str) -> None:
    for tool in ("smtp-sink", "smtp-source", "postfix", "postsuper"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: apt-get install postfix (see docs/benchmarks.md)")
    if os.geteuid() != 0:
        raise BenchError("run as root: Postfix's master, and smtp-sink -u postfix")
    ns = argparse.Namespace(servers=list(SERVERS), profile=args.profile)
    inbound.preflight(ns, workdir)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = os.path.realpath(args.workdir or inbound.default_workdir())
    preflight(args, workdir)
    info = inbound.machine_info(workdir)
    log(f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"Twisted {info['twisted']}, Postfix {info['postfix']}; queues on {info['filesystem']}; "
        f"twisted-mta {info['source']}")
    rundir = tempfile.mkdtemp(prefix="outbound-bench-", dir=workdir)
    os.chmod(rundir, 0o755)
    info["fs_probe"] = inbound.probe_filesystem(rundir)
    log(f"in {rundir}: file create {info['fs_probe']['create_us']} us, "
        f"1 KiB fsync {info['fs_probe']['fsync_us']} us (median)")
    runs: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    started = time.monotonic()
    interrupted = False
    try:
        if not args.profile_only:
            total = args.repeats * len(args.tests) * len(args.servers)
            i = 0
            for rep in range(args.repeats):
                for ti, test in enumerate(args.tests):
                    order = list(args.servers)
                    if (rep + ti) % 2:
                        order.reverse()
                    for name in order:
                        i += 1
                        r = run_once(test, name, rundir, args)
                        r["repeat"] = rep
                        runs.append(r)
                        if "msgs_per_s" in r:
                            log(f"[{i}/{total} {time.monotonic() - started:4.0f}s] {test:8s} "
                                f"{name:11s} x{args.messages}: {r['msgs_per_s']:7.1f} msg/s "
                                f"({r['seconds']:.2f}s; sink window "
                                f"{r['sink_window_msgs_per_s']:.0f} msg/s, first at "
                                f"{r['first_at_sink_seconds']:.2f}s)"
                                + (f", start-up {r['startup_seconds']:.2f}s, fill "
                                   f"{r['fill_seconds']:.1f}s"
                                   if (test, name) == ("outbound", "twisted-mta") else
                                   f", start-up (empty queue) {r['startup_empty_seconds']:.2f}s, "
                                   f"fill {r['fill_seconds']:.1f}s, release "
                                   f"{r['release_seconds']:.2f}s"
                                   if test == "outbound" else
                                   f", smtp-source {r['accept_msgs_per_s']:.0f} msg/s")
                                + f", peak {r['peak_rss_mb']} MB, {r['cpu_ms_per_msg']:.2f} "
                                  f"CPU ms/msg"
                                + (f"  ERROR: {r['error']}" if "error" in r else ""))
                        else:
                            log(f"[{i}/{total}] {test} {name}: ERROR {r.get('error')}")
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            for test in args.profile_tests:
                raw = os.path.join(os.path.abspath(args.profile),
                                   f"twisted-mta-{test}-{args.messages}.collapsed.txt")
                r = run_once(test, "twisted-mta", rundir, args, profile_to=raw)
                if "msgs_per_s" not in r:
                    log(f"profile run failed: {r.get('error')}")
                    continue
                summary = profile_summary(raw)
                summary["run"] = r
                title = (f"{test}, {args.messages} x {size_label(args.size)} "
                         f"(under py-spy: {r['msgs_per_s']} msg/s, sink window "
                         f"{r['sink_window_msgs_per_s']} msg/s)")
                with open(raw.replace(".collapsed.txt", ".summary.md"), "w") as f:
                    f.write(inbound.format_profile(title, summary) + "\n")
                profiles[test] = {"title": title, **summary}
                log(f"profile written: {raw}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: reporting what was measured")
    finally:
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)

    rows = summarize(runs, args.tests, args.servers)
    elapsed = time.monotonic() - started
    changed = inbound.source_fingerprint() != info["source_fingerprint"]
    info["source_changed_during_run"] = changed
    print(f"## Outbound delivery: twisted-mta vs Postfix, both to smtp-sink ({info['date']})\n")
    print(f"{info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
          f"Python {info['python']}, Twisted {info['twisted']}, Postfix {info['postfix']}; "
          f"queues on {info['filesystem']} (file create {info['fs_probe']['create_us']} us, "
          f"fsync {info['fs_probe']['fsync_us']} us); twisted-mta {info['source']}. "
          f"{args.repeats} run(s) per server per test, alternating; msg/s is the median "
          f"(min-max); wall time {elapsed:.0f}s.\n")
    if changed:
        print("**WARNING: twisted-mta's sources changed during this run; the results mix "
              "versions. Run again.**\n")
    if runs:
        print(markdown_tables(rows, args.messages, args.size))
        print()
        for line in target_lines(rows, args.messages):
            print(line)
        for test, row in rows.items():
            for name in args.servers:
                for e in row.get(name, {}).get("errors", []):
                    print(f"ERROR in {test} / {name}: {e}")
    for test, summary in profiles.items():
        print()
        print(inbound.format_profile(summary["title"], summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "elapsed_seconds": round(elapsed, 1),
                       "summary": rows, "runs": runs, "profiles": profiles}, f, indent=1)
    return 130 if interrupted else 0


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
