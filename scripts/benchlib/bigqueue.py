"""
C{scripts/bench bigqueue}: what a large queue of deferred entries costs
twisted-mta and its operator, at 10,000 and 100,000 entries, and the same
operations on a private Postfix with as many deferred messages.

twisted-mta, per size: a fresh spool of 1 KiB entries, one remote recipient each, due
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

Postfix, per size: started idle (its RSS), filled by C{smtp-source} (its
relayhost a closed loopback port: every message deferred), C{postqueue
-p} and C{postqueue -j} (wall time; their peak RSS is the client's, the
work is showq's), stopped and started again (launch to banner; it has
no load phase), the prober idle and during C{postqueue -f}, C{postfix
stop} during it (every message must still be queued), then the drain to
C{smtp-sink} as relayhost.  The comparison is each operation's, not one
ratio: the two queues differ in what they keep in memory.
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
    CLOSED_PORT, LOOPBACK, SERVERS, BenchError, Peer, count_files, describe_machine, fill_spool,
    finish_source, log, machine, make_mta, make_postfix, memory, percentile, remote_rcpt, report,
    smarthost, smtp_source, tree, wait_until, write_json)
from .modes import JSON_LOG, ints


def cli(config: str, *args: str) -> list[str]:
    """
    The command line tool of the checkout that holds this script, as the
    MTA under test is (not whatever twisted_mta is installed).
    """
    from tests.interop.support import PROJECT_ROOT
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {PROJECT_ROOT!r}); "
            "from twisted_mta.cli import main; sys.exit(main())", *args, "--config", config]


def timed_command(cmd: list[str], cwd: str) -> dict[str, float]:
    """
    Wall seconds and peak RSS of C{cmd}, output discarded.  The peak is
    its VmHWM read every 10 ms (wait4's ru_maxrss would count this
    script's own memory, which the child had before its exec).
    """
    t = time.monotonic()
    errors = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=errors, stdin=subprocess.DEVNULL)
    peak = 0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f
                                     if line.startswith("VmHWM:")])
        except OSError:
            pass
        time.sleep(0.01)
    if proc.returncode:
        errors.seek(0)
        said = errors.read().decode(errors="replace").strip().splitlines()
        raise BenchError(f"{' '.join(cmd[-4:])} exited {proc.returncode}"
                         + (f": {said[-1]}" if said else ""))
    errors.close()
    return {"seconds": round(time.monotonic() - t, 2), "peak_rss_mb": round(peak / 1024, 1)}


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


def flush_window(pid: int, prober: Prober, flush: list[str], cwd: str, seconds: float,
                 out: dict[str, Any]) -> None:
    """Run the operator's flush command, then watch RSS and the banner for C{seconds}."""
    flushed = time.monotonic()
    subprocess.run(flush, check=True, cwd=cwd, stdout=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)
    peak = 0.0
    while time.monotonic() - flushed < seconds:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.5)
    out["banner_during_flush"] = prober.summary(flushed)
    out["rss_peak_during_flush_mb"] = peak


def probe_idle(port: int, quick: bool, out: dict[str, Any]) -> Prober:
    prober = Prober(port)
    prober.start()
    idle = time.monotonic()
    time.sleep(2 if quick else 5)
    out["banner_idle"] = prober.summary(idle, time.monotonic())
    return prober


def measure_postfix(entries: int, a: Any) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix="bench-bigqueue-postfix-", dir=a.workdir)
    os.chmod(base, 0o755)
    postfix = make_postfix(base, CLOSED_PORT)
    queue = postfix.queue
    out: dict[str, Any] = {"entries": entries, "server": "postfix"}
    peer = None

    def queued() -> int:
        return count_files(queue, ("incoming", "active", "deferred", "hold"))

    def postqueue(*args: str) -> list[str]:
        return ["postqueue", "-c", postfix.conf, *args]

    try:
        postfix.start()
        time.sleep(2)
        out["rss_empty_mb"] = rss_mb(postfix.master_pid)
        t = time.monotonic()
        finish_source(smtp_source(postfix.smtpd_port, 20, entries, 1024, remote_rcpt(0)),
                      timeout=3600)
        wait_until(lambda: count_files(queue, ("deferred",)) >= entries, 600,
                   lambda: f"{count_files(queue, ('deferred',))} of {entries} deferred",
                   step=0.5)
        out["fill_s"] = round(time.monotonic() - t, 1)
        out["queue_list"] = timed_command(postqueue("-p"), base)
        out["queue_list_json"] = timed_command(postqueue("-j"), base)
        postfix.stop()
        launch = time.time()
        postfix.start(timeout=600)
        out["banner_s"] = round(time.time() - launch, 2)
        time.sleep(2)
        out["rss_idle_mb"] = rss_mb(postfix.master_pid)
        prober = probe_idle(postfix.smtpd_port, a.quick, out)
        flush_window(postfix.master_pid, prober, postqueue("-f"), base,
                     3 if a.quick else a.flush_time, out)
        term = time.monotonic()
        postfix.stop(timeout=60)
        out["sigterm_exit_s"] = round(time.monotonic() - term, 2)
        prober.done.set()
        out["entries_after"] = queued()
        if out["entries_after"] != entries:
            raise BenchError(f"{out['entries_after']} messages queued of {entries} after stop")
        peer = Peer(base)
        postfix.params["relayhost"] = f"[{LOOPBACK}]:{peer.port}"
        postfix._write_main()
        postfix.start(timeout=600)
        start = time.monotonic()
        subprocess.run(postqueue("-f"), check=True, stdout=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL)
        wait_until(lambda: peer.messages >= entries and not queued(), 7200,
                   lambda: f"the sink has {peer.messages} of {entries}", peer.check, 0.2)
        out["drain_s"] = round(time.monotonic() - start, 1)
        time.sleep(2 if a.quick else 10)
        out["rss_after_drain_mb"] = rss_mb(postfix.master_pid)
        if peer.messages != entries:
            raise BenchError(f"the sink has {peer.messages} messages for {entries}")
        return out
    except BenchError:
        raise
    except Exception as e:
        raise BenchError(f"bigqueue postfix {entries}: {e}\n{postfix.describe()[-3000:]}") from e
    finally:
        postfix.stop()
        if peer is not None:
            peer.stop()
        shutil.rmtree(base, True)


def measure(entries: int, a: Any, name: str) -> dict[str, Any]:
    if name == "postfix":
        return measure_postfix(entries, a)
    base = tempfile.mkdtemp(prefix="bench-bigqueue-", dir=a.workdir)
    mta = make_mta(base, SERVERS[name], smarthost(CLOSED_PORT) + "\n" + JSON_LOG)
    out: dict[str, Any] = {"entries": entries, "server": name}
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
        prober = probe_idle(mta.port, a.quick, out)
        flush_window(mta.pid, prober, cli(mta.config_path, "queue", "flush"), base,
                     3 if a.quick else a.flush_time, out)
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


ROWS = (("fill (twisted-mta: the spool written without fsync; Postfix: smtp-source), s",
         "fill_s"),
        ("`queue list` / `postqueue -p`: s, peak RSS MB", "queue_list"),
        ("`queue list --json` / `postqueue -j`: s, peak RSS MB", "queue_list_json"),
        ("launch to banner, s", "banner_s"), ("launch to fully loaded, s", "loaded_s"),
        ("RSS of all processes, loaded and idle, MB", "rss_idle_mb"),
        ("banner wait idle: p50 / p99 / max ms (over 100 ms)", "banner_idle"),
        ("banner wait during the flush: p50 / p99 / max ms (over 100 ms)",
         "banner_during_flush"),
        ("RSS peak during the flush, MB", "rss_peak_during_flush_mb"),
        ("SIGTERM (Postfix: `postfix stop`) during the flush to exit, s", "sigterm_exit_s"),
        ("entries in the spool after", "entries_after"),
        ("then all delivered to smtp-sink after a flush, s", "drain_s"),
        ("RSS after the drain, MB", "rss_after_drain_mb"),
        ("RSS of the same server idle on an empty queue, MB", "rss_empty_mb"))


def cell(v: Any) -> str:
    if v is ...:
        return "-"
    if isinstance(v, dict) and "seconds" in v:
        return f"{v['seconds']} s, {v['peak_rss_mb']} MB"
    if isinstance(v, dict):
        return (f"{v['p50_ms']} / {v['p99_ms']} / {v['max_ms']} ({v['over_100ms']} of "
                f"{v['probes']})" if v else "-")
    return "did not exit in 60 s" if v is None else str(v)


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| deferred entries | " + " | ".join(f"{r['entries']:,} {r['server']}"
                                                  for r in runs) + " |",
             "|---|" + "---|" * len(runs)]
    lines += [f"| {label} | " + " | ".join(cell(r.get(key, ...)) for r in runs) + " |"
              for label, key in ROWS]
    return "\n".join(lines) + "\n"


def main(a: Any) -> int:
    info = machine(a.workdir)
    servers = (a.servers or "postfix,workers=auto").split(",")
    runs = []
    for n in ints(a.entries, "2000" if a.quick else "10000,100000"):
        for name in servers:
            runs.append(measure(n, a, name))
            log(f"bigqueue {name} {n}: {json.dumps(runs[-1])}")
    info["load_after"] = os.getloadavg()
    report("bigqueue", "`scripts/bench bigqueue`: " + describe_machine(info)
           + " One run per size and server.\n\n" + table(runs), a.docs)
    write_json(a.json, {"mode": "bigqueue", "machine": info, "runs": runs})
    return 0
