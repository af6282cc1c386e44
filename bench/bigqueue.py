#!/usr/bin/env python3
"""
A large queue (issue 13): what 100,000 deferred entries cost the operator.

    python3 bench/bigqueue.py build --count 100000 DIR   # fill DIR/spool (~1 min)
    python3 bench/bigqueue.py list DIR                  # queue list and --json: time, peak RSS
    python3 bench/bigqueue.py run DIR [--workers 0] [--sigterm-after 5] [--drain]

C{run} starts C{twistd -n mta} on the spool and reports: start-up to the
220 banner, when the queue was fully loaded, RSS (main process and
workers), then a C{queue flush} with a client probing the banner every
20 ms (the longest wait is the stall other clients see: with C{--workers
0} the main reactor greets them), RSS after the flush's attempts; with
C{--sigterm-after S} a SIGTERM S seconds into the flush, the time to exit
and the entries left (nothing may be lost); with C{--drain} deliveries go
to C{smtp-sink}, and RSS is read again once the spool is empty.  Without
C{--drain} the smarthost is a closed loopback port, so every attempt is
deferred.  DNS points at a loopback port: nothing leaves the machine.
Entries are written without fsync (a benchmark spool, not mail).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from inbound import children_of, kb, proc_status  # noqa: E402
from outbound import Sink, free_port, poll_banner, write_entries  # noqa: E402

CONFIG = """\
[server]
hostname = "mx.bench.test"
spool = "{spool}"
workers = {workers}

[[listeners]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"

[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"

[outbound.smarthost]
host = "[127.0.0.1]:{sink}"
"""


def cli(config: str, *args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from twisted_mta.cli import main; "
            "sys.exit(main())", *args, "--config", config]


def tree_rss_mb(pid: int) -> tuple[float, float]:
    """RSS of C{pid} and of all its children, in MB."""
    return (kb(proc_status(pid).get("VmRSS")) / 1024,
            sum(kb(proc_status(k).get("VmRSS")) for k in children_of(pid)) / 1024)


def count_entries(spool: str) -> int:
    return sum(len(os.listdir(os.path.join(spool, d))) for d in ("new", "cur", "hold"))


def build(args: argparse.Namespace) -> None:
    spool = os.path.join(args.dir, "spool")
    real = os.fsync
    os.fsync = lambda fd: None  # a benchmark spool: durability is not measured
    try:
        later = time.time() + 3600
        write_entries(spool, ((f"u{i}@remote.bench.test", later)
                              for i in range(args.count)), args.size)
    finally:
        os.fsync = real
    print(json.dumps({"entries": count_entries(spool)}))


def write_config(args: argparse.Namespace, sink: int) -> tuple[str, int]:
    port = free_port()
    path = os.path.join(args.dir, "mta.toml")
    with open(path, "w") as f:
        f.write(CONFIG.format(spool=os.path.join(args.dir, "spool"), workers=args.workers,
                              port=port, sink=sink))
    return path, port


def measure(cmd: list[str], cwd: str) -> tuple[float, float]:
    """
    Wall seconds and peak RSS (MB) of C{cmd} (by GNU time), its output
    discarded; run in C{cwd}, so PYTHONPATH (another checkout) is obeyed.
    """
    proc = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = [x for x in proc.stderr.splitlines() if x.startswith("TIME ")]
    if proc.returncode or not line:
        raise SystemExit(f"{cmd} failed: {proc.stderr[-500:]}")
    _, wall, peak = line[-1].split()
    return float(wall), int(peak) / 1024


def list_(args: argparse.Namespace) -> None:
    config, _ = write_config(args, 9)
    out = {}
    for name, extra in (("list", ()), ("list_json", ("--json",))):
        wall, peak = measure(cli(config, "queue", "list", *extra), args.dir)
        out[name] = {"seconds": round(wall, 2), "peak_rss_mb": round(peak, 1)}
    print(json.dumps(out))


class Prober(threading.Thread):
    """Connects every 20 ms and notes each wait for a banner."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.waits: list[tuple[float, float]] = []  # (when, seconds)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=60) as s:
                    s.recv(512)
                    self.waits.append((start, time.perf_counter() - start))
                    s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            time.sleep(0.02)

    def summary(self, since: float, until: float = float("inf")) -> dict:
        waits = sorted(w for t, w in self.waits if since <= t < until)
        if not waits:
            return {}
        return {"probes": len(waits), "p50_ms": round(1000 * waits[len(waits) // 2], 1),
                "p99_ms": round(1000 * waits[int(len(waits) * 0.99)], 1),
                "max_ms": round(1000 * waits[-1], 1),
                "over_100ms": sum(w > 0.1 for w in waits)}


def wait_log(path: str, needle: str, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as f:
            if needle.encode() in f.read():
                return time.perf_counter()
        time.sleep(0.05)
    return None


def run(args: argparse.Namespace) -> None:
    spool = os.path.join(args.dir, "spool")
    before = count_entries(spool)
    sink = None
    if args.drain:
        sink = Sink(args.dir)
        sink.start(before)
    config, port = write_config(args, sink.port if sink else free_port())
    logpath = os.path.join(args.dir, "twistd.log")
    out: dict = {"entries": before, "workers": args.workers}
    with open(logpath, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", "from twisted.scripts.twistd import "
                                 "run; run()", "-n", "--pidfile=", "mta", "--config", config],
                                stdout=log, stderr=subprocess.STDOUT, cwd=args.dir)
    try:
        out["banner_s"] = round(poll_banner(port, 120, lambda: proc.poll() is None)
                                - start, 2)
        loaded = wait_log(logpath, "queue.loaded" if args.loaded_event else "entries in",
                          300)
        out["loaded_s"] = round(loaded - start, 2) if loaded else None
        time.sleep(2)
        out["rss_idle_mb"] = [round(x) for x in tree_rss_mb(proc.pid)]
        prober = Prober(port)
        prober.start()
        idle = time.perf_counter()
        time.sleep(5)
        flushed = time.perf_counter()
        out["banner_idle"] = prober.summary(idle, flushed)
        subprocess.run(cli(config, "queue", "flush"), check=True, stdout=subprocess.DEVNULL,
                       cwd=args.dir)
        peak = 0.0
        while time.perf_counter() - flushed < (args.sigterm_after or args.flush_time):
            peak = max(peak, tree_rss_mb(proc.pid)[0])
            time.sleep(0.5)
        out["banner_during_flush"] = prober.summary(flushed)
        out["rss_main_peak_during_flush_mb"] = round(peak)
        if args.sigterm_after:
            term = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(args.term_timeout)
                out["sigterm_exit_s"] = round(time.perf_counter() - term, 2)
            except subprocess.TimeoutExpired:
                out["sigterm_exit_s"] = f">{args.term_timeout}"
            prober.stop.set()
            left = count_entries(spool)
            out["entries_after"] = left
            out["delivered"] = sink.count if sink else 0
            return
        if args.drain:
            sink.wait(args.flush_time + 600, stall=120)
            while count_entries(spool):
                time.sleep(0.5)
            out["drained_s"] = round(time.perf_counter() - flushed, 1)
            time.sleep(10)
        prober.stop.set()
        out["rss_after_mb"] = [round(x) for x in tree_rss_mb(proc.pid)]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        if sink is not None and sink.proc is not None:
            sink.proc.terminate()
        print(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("dir")
    b.add_argument("--count", type=int, default=100_000)
    b.add_argument("--size", type=int, default=1024)
    b.set_defaults(func=build)
    lst = sub.add_parser("list")
    lst.add_argument("dir")
    lst.add_argument("--workers", type=int, default=0)
    lst.set_defaults(func=list_)
    r = sub.add_parser("run")
    r.add_argument("dir")
    r.add_argument("--workers", type=int, default=0)
    r.add_argument("--flush-time", type=float, default=20.0,
                   help="seconds to watch after the flush")
    r.add_argument("--sigterm-after", type=float, default=0.0)
    r.add_argument("--term-timeout", type=float, default=60.0)
    r.add_argument("--drain", action="store_true", help="deliver to smtp-sink")
    r.add_argument("--loaded-event", action="store_true",
                   help="wait for queue.loaded (incremental start-up) instead of the "
                        "recovery line")
    r.set_defaults(func=run)
    args = parser.parse_args()
    args.dir = os.path.abspath(args.dir)
    os.makedirs(args.dir, exist_ok=True)
    args.func(args)


if __name__ == "__main__":
    main()
