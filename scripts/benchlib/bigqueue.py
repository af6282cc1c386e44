"""
C{scripts/bench bigqueue}: what a large queue of deferred entries costs
twisted-mta and its operator, at 10,000 and 100,000 entries (issue 13's
targets are absolute, so no Postfix runs here).

Per size: a fresh spool of 1 KiB entries, one remote recipient each, due
in an hour (written with the spool API, fsync off); C{queue list} and
C{queue list --json} on it (wall time, peak RSS); C{twistd -n mta}
started on it: launch to the 220 banner, to the log's C{queue.recovered}
(fully loaded), the RSS of its processes idle; a client connecting every
20 ms times the banner for 5 s idle and during a C{queue flush} (every
attempt goes to a closed loopback port and is deferred again); then
SIGTERM: seconds to exit, and every entry must still be in the spool;
then restarted with C{smtp-sink} as its smarthost, a flush delivers every
entry (the sink must have exactly N), and RSS is read 10 s after the
spool is empty, beside that of the same MTA idle on an empty spool.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from .core import (
    CLOSED_PORT, LOOPBACK, BenchError, Peer, count_files, describe_machine, fill_spool, log,
    machine, make_mta, memory, percentile, remote_rcpt, report, smarthost, tree, wait_until, write_json)
from .modes import JSON_LOG, ints


def cli(config: str, *args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from twisted_mta.cli import main; "
            "sys.exit(main())", *args, "--config", config]


def timed_command(cmd: list[str], cwd: str) -> dict[str, float]:
    """Wall seconds and peak RSS of C{cmd} (its own, from wait4), output discarded."""
    t = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise BenchError(f"{cmd[3:]} exited {proc.returncode}: {err[-500:]!r}")
    return {"seconds": round(time.monotonic() - t, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


class Prober(threading.Thread):
    """Connects every 20 ms and notes how long each banner took."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.waits: list[tuple[float, float]] = []  # (when, seconds)
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            start = time.monotonic()
            try:
                with socket.create_connection((LOOPBACK, self.port), timeout=60) as s:
                    s.recv(512)
                    self.waits.append((start, time.monotonic() - start))
                    s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            time.sleep(0.02)

    def summary(self, since: float, until: float = float("inf")) -> dict[str, Any]:
        ms = [1000 * w for t, w in self.waits if since <= t < until]
        if not ms:
            return {}
        return {"probes": len(ms), "p50_ms": round(percentile(ms, 50), 1),
                "p99_ms": round(percentile(ms, 99), 1), "max_ms": round(max(ms), 1),
                "over_100ms": sum(w > 100 for w in ms)}


def rss_mb(pid: int) -> float:
    return round(memory(tree(pid))[0] / 2**20, 1)


def measure(entries: int, a: Any) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="bench-bigqueue-", dir=a.workdir)
    mta = make_mta(base, a.workers, smarthost(CLOSED_PORT) + "\n" + JSON_LOG)
    out: dict[str, Any] = {"entries": entries, "workers": a.workers}
    peer = None
    try:
        mta.start(timeout=60)  # the yardstick: the same MTA idle on an empty spool
        time.sleep(2)
        out["rss_empty_mb"] = rss_mb(mta.pid)
        mta.stop()
        t = time.monotonic()
        fill_spool(mta.spool, (remote_rcpt(i) for i in range(entries)), 1024,
                   time.time() + 3600)
        out["fill_s"] = round(time.monotonic() - t, 1)
        out["queue_list"] = timed_command(cli(mta.config_path, "queue", "list"), base)
        out["queue_list_json"] = timed_command(cli(mta.config_path, "queue", "list", "--json"),
                                               base)
        events = os.path.join(base, "events.jsonl")

        def loaded() -> list[dict]:
            from tests.interop.support import json_lines
            return [e for e in json_lines(events) if e.get("event") == "queue.recovered"]

        starts = len(loaded())  # the empty start's
        launch = time.time()
        mta.start(timeout=600)
        out["banner_s"] = round(time.time() - launch, 2)

        def alive() -> None:
            if not mta.running:
                raise BenchError(f"the MTA died; {mta.describe()[-3000:]}")

        wait_until(lambda: len(loaded()) > starts, 900, lambda: "no queue.recovered in the log",
                   alive, 0.1)
        recovered = loaded()[starts]
        out["loaded_s"] = round(recovered["log_time"] - launch, 2)
        if recovered.get("count") != entries:
            raise BenchError(f"loaded {recovered.get('count')} entries of {entries}")
        time.sleep(2)
        out["rss_idle_mb"] = rss_mb(mta.pid)
        prober = Prober(mta.port)
        prober.start()
        idle = time.monotonic()
        time.sleep(2 if a.quick else 5)
        flushed = time.monotonic()
        out["banner_idle"] = prober.summary(idle, flushed)
        subprocess.run(cli(mta.config_path, "queue", "flush"), check=True, cwd=base,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        peak = 0.0
        while time.monotonic() - flushed < (3 if a.quick else a.flush_time):
            peak = max(peak, rss_mb(mta.pid))
            time.sleep(0.5)
        out["banner_during_flush"] = prober.summary(flushed)
        out["rss_peak_during_flush_mb"] = peak
        term = time.monotonic()
        mta.process.send_signal(signal.SIGTERM)
        try:
            mta.process.wait(60)
            out["sigterm_exit_s"] = round(time.monotonic() - term, 2)
        except subprocess.TimeoutExpired:
            out["sigterm_exit_s"] = None
        prober.done.set()
        left = count_files(mta.spool, ("new", "cur", "hold"))
        out["entries_after"] = left
        if left != entries:
            raise BenchError(f"{left} entries left of {entries} after SIGTERM")
        # The drain: the smarthost is now smtp-sink, then a flush delivers all.
        peer = Peer(base)
        with open(mta.config_path, encoding="utf-8") as f:
            text = f.read().replace(f"]:{CLOSED_PORT}\"", f"]:{peer.port}\"")
        with open(mta.config_path, "w", encoding="utf-8") as f:
            f.write(text)
        mta.start(timeout=600)
        wait_until(lambda: len(loaded()) > starts + 1, 900, lambda: "not loaded again", alive,
                   0.1)
        start = time.monotonic()
        subprocess.run(cli(mta.config_path, "queue", "flush"), check=True, cwd=base,
                       stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_until(lambda: peer.messages >= entries and not count_files(mta.spool, (
            "new", "cur", "hold")), 7200, lambda: f"the sink has {peer.messages} of {entries}",
            alive, 0.2)
        out["drain_s"] = round(time.monotonic() - start, 1)
        time.sleep(2 if a.quick else 10)
        out["rss_after_drain_mb"] = rss_mb(mta.pid)
        if peer.messages != entries:
            raise BenchError(f"the sink has {peer.messages} messages for {entries} entries")
        return out
    except BenchError:
        raise
    except Exception as e:
        raise BenchError(f"bigqueue {entries}: {e}\n{mta.describe()[-3000:]}") from e
    finally:
        mta.cleanup()
        if peer is not None:
            peer.stop()
        shutil.rmtree(base, True)


ROWS = (("fill, written without fsync, s", "fill_s"),
        ("`queue list`: s, peak RSS MB", "queue_list"),
        ("`queue list --json`: s, peak RSS MB", "queue_list_json"),
        ("launch to banner, s", "banner_s"), ("launch to fully loaded, s", "loaded_s"),
        ("RSS of all processes, loaded and idle, MB", "rss_idle_mb"),
        ("banner wait idle: p50 / p99 / max ms (over 100 ms)", "banner_idle"),
        ("banner wait during the flush: p50 / p99 / max ms (over 100 ms)",
         "banner_during_flush"),
        ("RSS peak during the flush, MB", "rss_peak_during_flush_mb"),
        ("SIGTERM during the flush to exit, s", "sigterm_exit_s"),
        ("entries in the spool after", "entries_after"),
        ("then all delivered to smtp-sink after a flush, s", "drain_s"),
        ("RSS after the drain, MB", "rss_after_drain_mb"),
        ("RSS of the same MTA idle on an empty spool, MB", "rss_empty_mb"))


def cell(v: Any) -> str:
    if isinstance(v, dict) and "seconds" in v:
        return f"{v['seconds']} s, {v['peak_rss_mb']} MB"
    if isinstance(v, dict):
        return (f"{v['p50_ms']} / {v['p99_ms']} / {v['max_ms']} ({v['over_100ms']} of "
                f"{v['probes']})" if v else "-")
    return "did not exit in 60 s" if v is None else str(v)


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| deferred entries | " + " | ".join(f"{r['entries']:,}" for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(cell(r[key]) for r in runs) + " |"
              for label, key in ROWS]
    return "\n".join(lines) + "\n"


def main(a: Any) -> int:
    info = machine()
    runs = []
    for n in ints(a.entries, "2000" if a.quick else "10000,100000"):
        runs.append(measure(n, a))
        log(f"bigqueue {n}: {json.dumps(runs[-1])}")
    info["load_after"] = os.getloadavg()
    workers = "unset" if a.workers is None else a.workers
    report("bigqueue", "`scripts/bench bigqueue`: " + describe_machine(info)
           + f" twisted-mta alone, [server] workers {workers}; one run per size.\n\n"
           + table(runs), a.docs)
    write_json(a.json, {"mode": "bigqueue", "machine": info, "runs": runs})
    return 0
