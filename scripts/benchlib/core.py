"""
The core every mode of C{scripts/bench} shares: the servers (twisted-mta
as C{twistd}, a private Postfix), the peers they deliver to (C{smtp-sink},
C{tlssink}), CPU and memory read from /proc, the rounds, the summary and
its table, the machine's description, the JSON.

Nothing leaves the machine: every twisted-mta configuration carries
C{tests.support.LOOPBACK_DNS} (a closed loopback port) and sends remote
mail only to a loopback smarthost; every Postfix has DNS off and no
transport but local Maildirs, the error transport or a loopback relayhost.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's twisted_mta, whatever is installed

from tests.interop.support import (  # noqa: E402
    LOCAL_DOMAIN, LOOPBACK, MTAProcess, PostfixInstance, free_port, pid_alive)
from tests.support import LOOPBACK_DNS  # noqa: E402
from twisted_mta.workers import worker_count  # noqa: E402

KIB = 1024
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
SENDER = "bench@client.example.net"
LOCAL_RCPT = f"alice@{LOCAL_DOMAIN}"
REMOTE_DOMAIN = "remote.example.net"  # local to neither server: relayed
HELO = "client.example.net"
# Owner of Postfix's Maildirs: virtual(8) will not deliver as root, and a
# uid with no account keeps the files away from any real user.
MAILDIR_UID = 2525
# The servers a mode may compare: Postfix, and twisted-mta by its
# [server] workers setting (None: not set, one fewer than the cores).
SERVERS: dict[str, int | None] = {"postfix": -1, "workers=0": 0, "workers=1": 1,
                                   "workers=auto": None}
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CLOSED_PORT = 9  # discard: nothing listens on loopback


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A run that cannot be counted: the whole benchmark fails."""


def remote_rcpt(i: int = 0) -> str:
    return f"rcpt{i}@{REMOTE_DOMAIN}"


# -- the servers ----------------------------------------------------------------


def make_mta(base: str, workers: int | None, extra: str = "") -> MTAProcess:
    """
    twisted-mta as L{MTAProcess} configures it (one C{mx} listener, alice
    and postmaster local), plus C{extra}; 100 sessions come from one
    address, and DNS goes to a closed loopback port.
    """
    return MTAProcess(base, "[limits]\nconnections_per_ip = 200\n\n" + extra + "\n"
                      + LOOPBACK_DNS, users=("alice", "postmaster"), workers=workers)


def smarthost(port: int, outbound: str = "") -> str:
    """
    twisted-mta's tables sending every remote domain to 127.0.0.1:C{port};
    C{outbound}: more lines of its [outbound] table.
    """
    return ('[relay]\ntrusted_networks = ["127.0.0.0/8"]\n\n'
            "[outbound]\nconnections = 100\nconnections_per_destination = 20\n" + outbound + "\n"
            f'[outbound.smarthost]\nhost = "[{LOOPBACK}]:{port}"\n')


def make_postfix(base: str, relay_port: int | None = None,
                 main: dict[str, str] | None = None) -> PostfixInstance:
    """
    A private Postfix delivering C{alice@example.test} with virtual(8) to
    a Maildir under C{base/vmail}.  Without C{relay_port} anything else
    (a bounce) goes to the error transport; with it, remote mail goes to
    C{[127.0.0.1]:relay_port}.  DNS is off either way.
    """
    vmail = os.path.join(base, "vmail")
    os.makedirs(vmail)
    os.chown(vmail, MAILDIR_UID, MAILDIR_UID)
    params = {
        "virtual_mailbox_domains": LOCAL_DOMAIN,
        "virtual_mailbox_maps": f"inline:{{ {LOCAL_RCPT}=alice/Maildir/ }}",
        "virtual_mailbox_base": vmail,
        "virtual_uid_maps": f"static:{MAILDIR_UID}",
        "virtual_gid_maps": f"static:{MAILDIR_UID}",
        "disable_dns_lookups": "yes",
    }
    if relay_port is None:
        nowhere = "error:5.3.0 no remote delivery in this benchmark"
        params |= {"default_transport": nowhere, "relay_transport": nowhere}
    return PostfixInstance(base, relay_port, params | (main or {}))


def count_files(root: str, subdirs: Iterable[str]) -> int:
    """
    Distinct file names (not dot files) under C{root}'s C{subdirs},
    recursively.  A queue entry keeps its name when it moves (twisted-mta
    new/ -> cur/, Postfix incoming -> active -> deferred), and the
    subdirectories are walked in that order: one moved between two walks
    is seen twice, and counted once.
    """
    seen: set[str] = set()
    for d in subdirs:
        for _, _, names in os.walk(os.path.join(root, d)):
            seen.update(name for name in names if not name.startswith("."))
    return len(seen)


class Server:
    """
    One server for one run, on a fresh directory: C{mta} or C{postfix} is
    set, with the paths a mode counts in (C{maildir_new}, C{queued()}).
    """

    def __init__(self, name: str, base: str, mta_extra: str = "",
                 relay_port: int | None = None, postfix_main: dict[str, str] | None = None):
        self.name = name
        self.base = base
        self.mta: MTAProcess | None = None
        self.postfix: PostfixInstance | None = None
        if name == "postfix":
            self.postfix = make_postfix(base, relay_port, postfix_main)
            self.port = self.postfix.smtpd_port
            self.maildir_new = os.path.join(base, "vmail", "alice", "Maildir", "new")
        else:
            self.mta = make_mta(base, SERVERS[name], mta_extra)
            self.port = self.mta.port
            self.maildir_new = os.path.join(self.mta.maildir("alice"), "new")

    @property
    def pid(self) -> int | None:
        """The root of the server's processes."""
        return self.postfix.master_pid if self.postfix else self.mta.pid

    def start(self) -> int:
        if self.postfix:
            self.postfix.start()
        else:
            self.mta.start(timeout=120)
            self.wait_for_workers()
        return self.pid

    def wait_for_workers(self) -> None:
        """
        The banner comes from the main process; the workers import and
        adopt the listeners a second or two later (longer on a slow
        machine).  Until each has said so in the log, the main process
        receives alone: the clock starts after that, at the steady state
        a running MTA is in.
        """
        expected = worker_count(SimpleNamespace(workers=SERVERS[self.name]))
        logs = [self.mta.log_path, os.path.join(self.base, "events.jsonl")]

        def ready() -> int:
            n = 0  # the most either log says (JSON logs go to events.jsonl)
            for path in logs:
                try:
                    with open(path, "rb") as f:
                        text = f.read()
                except FileNotFoundError:
                    continue
                n = max(n, text.count(b'"workers.ready"') if path.endswith(".jsonl") else
                        len(re.findall(rb"worker \d+: receiving on", text)))
            return n

        wait_until(lambda: ready() >= expected, 60,
                   lambda: f"{ready()} of {expected} workers ready", self._check_alive)

    def _check_alive(self) -> None:
        if not self.alive():
            raise BenchError(f"{self.name} died while its workers started")

    def stop(self) -> None:
        if self.postfix:
            self.postfix.stop()
        elif self.mta.process is not None:
            self.mta.stop(timeout=60)

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def queued(self) -> int:
        """Messages in the queue (Postfix: every queue but hold)."""
        if self.postfix:
            return count_files(self.postfix.queue, ("incoming", "active", "deferred"))
        return count_files(self.mta.spool, ("new", "cur"))

    def held(self) -> int:
        return count_files(self.postfix.queue, ("hold",))

    def describe(self) -> str:
        return (self.postfix or self.mta).describe()


def delivered(new: str) -> int:
    try:
        return sum(1 for n in os.listdir(new) if not n.startswith("."))
    except FileNotFoundError:
        return 0


def smtp_source(port: int, sessions: int, messages: int, size: int,
                rcpt: str) -> subprocess.Popen:
    return subprocess.Popen(
        [SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
         "-M", HELO, "-f", SENDER, "-t", rcpt, f"{LOOPBACK}:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish_source(source: subprocess.Popen, timeout: float = 600) -> None:
    out = source.communicate(timeout=timeout)[0].decode(errors="replace")
    if source.returncode:
        raise BenchError(f"smtp-source exited {source.returncode}: {out[-2000:]}")


def wait_until(done: Callable[[], bool], timeout: float, what: Callable[[], str],
               check: Callable[[], None] = lambda: None, step: float = 0.02) -> float:
    """Poll until C{done()}; the monotonic time it was."""
    deadline = time.monotonic() + timeout
    while not done():
        check()
        if time.monotonic() > deadline:
            raise BenchError(f"after {timeout:.0f} s: {what()}")
        time.sleep(step)
    return time.monotonic()


# -- the peers: smtp-sink, tlssink ----------------------------------------------


def build_tlssink(directory: str) -> str:
    """Compile tlssink.c (beside this file) into C{directory}: gcc and libssl-dev."""
    binary = os.path.join(directory, "tlssink")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tlssink.c")
    p = subprocess.run(["cc", "-O2", "-o", binary, src, "-lssl", "-lcrypto"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode:
        raise BenchError(f"cannot build tlssink (a C compiler and libssl-dev):\n{p.stderr[-2000:]}")
    return binary


class Peer:
    """
    A counting sink on loopback: C{smtp-sink -c} (records C{sess=S quit=Q
    mesg=M}, CR-terminated) or C{tlssink} (lines C{S n}, C{T n version
    cipher}, C{M n}, C{B n}; C{tlssink} is its binary, its key and chain,
    and any further arguments).  A thread follows the counters.
    """

    _SINK = re.compile(r"sess=(\d+) quit=\d+ mesg=(\d+)")

    def __init__(self, base: str, tlssink: tuple[str, ...] | None = None) -> None:
        self.port = free_port()
        self.messages = self.sessions = self.tls = self.bdat = 0
        self.tls_example = ""
        if tlssink:
            cmd = [tlssink[0], str(self.port), *tlssink[1:]]
        else:
            cmd = [SMTP_SINK, "-c", "-u", "postfix", "-m", "1000",
                   f"{LOOPBACK}:{self.port}", "4096"]
        self.errlog = open(os.path.join(base, "peer.err"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.errlog,
                                     stdin=subprocess.DEVNULL)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        wait_until(lambda: read_banner(self.port), 10, lambda: "the sink does not answer",
                   self.check)

    def _record(self, rec: str) -> None:
        if m := self._SINK.search(rec):
            self.sessions, self.messages = int(m.group(1)), int(m.group(2))
        elif rec[:2] == "M ":
            self.messages = int(rec[2:])
        elif rec[:2] == "B ":
            self.bdat = int(rec[2:])
        elif rec[:2] == "S ":
            self.sessions = int(rec[2:])
        elif rec[:2] == "T ":
            self.tls = int(rec.split()[1])
            self.tls_example = rec.partition(" ")[2].partition(" ")[2]

    def _read(self) -> None:
        buf = b""
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            records = re.split(rb"[\r\n]", buf + chunk)
            buf = records.pop()
            for rec in records:
                self._record(rec.decode(errors="replace"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"the sink exited ({self.proc.returncode})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(5)
        self.errlog.close()


def read_banner(port: int, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as s:
            ok = s.recv(512).startswith(b"220")
            s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


# -- the spool, written directly ------------------------------------------------


def make_message(qid: str, rcpt: str, size: int) -> bytes:
    """A few header fields and C{size} octets of body in 80-octet lines, like smtp-source's."""
    head = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: benchmark\r\n"
            f"Message-ID: <{qid}@client.example.net>\r\n\r\n").encode()
    line = b"x" * 78 + b"\r\n"
    body = line * (size // len(line))
    if (rest := size - len(body)) >= 3:
        body += b"y" * (rest - 2) + b"\r\n"
    return head + body


def fill_spool(spool_path: str, recipients: Iterable[str], size: int, due: float) -> None:
    """
    One queue entry per recipient, due at C{due}, written with the spool
    API into a spool no MTA holds; fsync off (the fill is not timed, and
    a crash would only spoil this run).
    """
    from twisted_mta.model import Envelope, Recipient
    from twisted_mta.queue.spool import Spool

    spool = Spool(spool_path)
    spool.lock()
    real, os.fsync = os.fsync, lambda fd: None
    try:
        for rcpt in recipients:
            writer = spool.new_message()
            message = make_message(writer.queue_id, rcpt, size)
            env = Envelope(queue_id=writer.queue_id, sender=SENDER,
                           recipients=(Recipient(address=rcpt),), arrival=time.time(),
                           next_attempt=due, size=len(message))
            writer.write(env.to_header())
            writer.write(message)
            outcome: list[Any] = []
            writer.commit(env).addBoth(outcome.append)
            if not outcome or not isinstance(outcome[0], Envelope):
                raise BenchError(f"spool commit did not succeed: {outcome!r}")
    finally:
        os.fsync = real
        spool.unlock()


# -- /proc ----------------------------------------------------------------------


def tree(pid: int) -> list[int]:
    """C{pid} and its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return out


def memory(pids: list[int]) -> tuple[int, int]:
    """
    Resident and proportional (PSS: a shared page split among its users)
    bytes of C{pids} together; RSS counts shared pages once per process.
    """
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE
            with open(f"/proc/{p}/smaps_rollup") as f:
                pss += next(int(line.split()[1]) * 1024 for line in f
                            if line.startswith("Pss:"))
        except (OSError, IndexError, StopIteration):
            pass
    return rss, pss


def tree_cpu(pid: int | None) -> tuple[float, float]:
    """
    CPU seconds of C{pid}'s tree (the live processes and those reaped),
    and of C{pid} alone: the main process, beside the workers.
    """
    ticks = own = 0
    for p in tree(pid) if pid else ():
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
        if p == pid:
            own = int(fields[11]) + int(fields[12])
            ticks += int(fields[13]) + int(fields[14])  # reaped children
    return ticks / TICK, own / TICK


def machine_cpu() -> float:
    """Busy CPU seconds of the whole machine since boot (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / TICK  # less idle and iowait


def self_cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def wait_quiet(limit: float, busy: float = 0.3) -> float:
    """
    On a shared machine, wait (at most C{limit} seconds) until the others'
    work uses under C{busy} cores over a second; the seconds waited.
    """
    start = time.monotonic()
    while time.monotonic() - start < limit:
        before = machine_cpu()
        time.sleep(1)
        if machine_cpu() - before < busy:
            break
    return time.monotonic() - start


class MemorySampler(threading.Thread):
    """The peaks of a process tree's summed RSS and PSS, every 0.25 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = (0, 0)
        self.done = threading.Event()

    def sample(self) -> None:
        now = memory(tree(self.pid))
        self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def run(self) -> None:
        while not self.done.wait(0.25):
            self.sample()

    def stop(self) -> tuple[int, int]:
        self.done.set()
        self.join()
        self.sample()
        return self.peak


# -- one run --------------------------------------------------------------------


class Run:
    """
    One server's run of one cell, in its own directory: what the mode
    sets up (C{server}, C{peer}) is stopped afterwards, in reverse order.
    """

    def __init__(self, name: str, cell: dict[str, Any], base: str) -> None:
        self.name, self.cell, self.base = name, cell, base
        self.server: Server | None = None
        self.peer: Peer | None = None
        self.stops: list[Callable[[], object]] = []

    def start_server(self, fill: Callable[[Server], object] | None = None,
                     **kw: Any) -> Server:
        """Make the server (C{kw}: L{Server}'s), C{fill} it while it is down, start it."""
        self.server = Server(self.name, self.base, **kw)
        if fill is not None and self.server.mta:
            fill(self.server)
        self.stops.append(self.server.stop)
        self.server.start()
        return self.server

    def start_peer(self, tlssink: tuple[str, ...] | None = None) -> Peer:
        self.peer = Peer(self.base, tlssink)
        self.stops.append(self.peer.stop)
        return self.peer

    def check(self) -> None:
        """For polling loops: fail at once when a process died."""
        if self.server is not None and not self.server.alive():
            raise BenchError(f"{self.name} died")
        if self.peer is not None:
            self.peer.check()

    def describe(self) -> str:
        return self.server.describe() if self.server else ""

    def stop(self) -> None:
        errors = []
        for stop in reversed(self.stops):
            try:
                stop()
            except Exception as e:  # stop the rest all the same
                errors.append(str(e))
        if self.server is not None and self.server.alive():
            errors.append(f"{self.name} left processes behind")
        if errors:
            log("warning: " + "; ".join(errors))


class Mode:
    """
    What a mode says about itself; the core runs it.  C{setup} starts
    what the run needs (the clock is not running), C{timed} is the
    measured part and returns at least C{seconds} and C{messages},
    C{check} fails the run when a message is missing or doubled.
    """

    name = ""
    servers = "postfix,workers=auto"  # the default --servers
    metric = "msg_per_s"  # the figure compared, higher is better
    lower_is_better = False
    also = ("msg_per_s",)  # more figures whose medians the summary keeps
    paired: str | None = None  # a cell key whose values run in the same round (plan)

    def cells(self, quick: bool, args: Any) -> list[dict[str, Any]]:
        raise NotImplementedError

    def label(self, cell: dict[str, Any]) -> str:
        return f"{cell['sessions']} x {cell['size'] // KIB} KiB"

    def setup(self, run: Run) -> None:
        raise NotImplementedError

    def timed(self, run: Run) -> dict[str, Any]:
        raise NotImplementedError

    def check(self, run: Run, result: dict[str, Any]) -> None:
        pass

    def notes(self, rows: list[dict[str, Any]]) -> str:
        return ""

    def run_notes(self, runs: list[dict[str, Any]]) -> str:
        """More lines under the table, from every run (the per-round figures)."""
        return ""


def run_once(mode: Mode, name: str, cell: dict[str, Any], workdir: str,
             leftovers: list[str]) -> dict[str, Any]:
    """
    One server, one cell: the mode's timed part, and what the server, its
    peer, the client (this script and what it ran) and the machine spent
    meanwhile; the server's memory peaks.  The run's directory goes into
    C{leftovers}, for the caller to remove after the last run
    (L{remove_later}).
    """
    base = tempfile.mkdtemp(prefix=f"bench-{mode.name}-{name}-", dir=workdir)
    os.chmod(base, 0o755)
    run = Run(name, cell, base)

    def cpu() -> tuple[float, ...]:
        return (*tree_cpu(run.server.pid), tree_cpu(run.peer.pid if run.peer else None)[0],
                machine_cpu(), self_cpu(resource.RUSAGE_SELF),
                self_cpu(resource.RUSAGE_CHILDREN))

    try:
        mode.setup(run)
        sampler = MemorySampler(run.server.pid)
        sampler.start()
        cpu0 = cpu()
        result = mode.timed(run)
        cpu1 = cpu()
        peak_rss, peak_pss = sampler.stop()
        mode.check(run, result)
        server, main, peer, machine, harness, client = (b - a for a, b in zip(cpu0, cpu1))
        return {"server": name, **cell, **result,
                "msg_per_s": result["messages"] / result["seconds"],
                "peak_rss": peak_rss, "peak_pss": peak_pss,
                "server_cpu": server, "main_cpu": main, "peer_cpu": peer,
                "client_cpu": client + harness, "machine_cpu": machine,
                "other_cpu": machine - server - peer - client - harness}
    except Exception as e:
        raise BenchError(f"{name} {mode.label(cell)}: {e}\n{run.describe()[-4000:]}") from e
    finally:
        run.stop()
        leftovers.append(base)


# -- rounds, summary, table ----------------------------------------------------


def plan(cells: list[dict[str, Any]], repeats: int, servers: list[str],
         paired: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """
    Every run in order: cell by cell, round by round, the servers' order
    rotating so that each goes first as often as the others.  With
    C{paired} (a cell key), the cells that differ only in that key are
    compared like servers: they run in the same round, their order
    rotating too, so drift in the machine's load hits them alike.
    """
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        key = tuple((k, v) for k, v in cell.items() if k != paired) if paired else (id(cell),)
        groups.setdefault(key, []).append(cell)
    out, turn = [], 0
    for group in groups.values():
        for r in range(repeats):
            for cell in group[r % len(group):] + group[:r % len(group)]:
                k = turn % len(servers)
                out.extend((name, cell) for name in servers[k:] + servers[:k])
                turn += 1
    return out


def percentile(values: list[float], p: float) -> float:
    """The C{p}-th percentile, nearest rank (p99 of 100 values: the 99th)."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, -(-len(ordered) * p // 100) - 1))]


def summary(mode: Mode, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """
    Per cell and server: the median of the mode's figure with its min-max,
    the ratio to Postfix's median, and the spread of the per-round ratios
    (runs of one round are paired: L{plan} puts them there).
    """
    by: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        by.setdefault(mode.label(r), {}).setdefault(r["server"], []).append(r)
    rows, key = [], mode.metric
    for label, servers in by.items():
        pf = servers.get("postfix", [])
        for name in sorted(servers, key=list(SERVERS).index):
            rs = servers[name]
            values = [r[key] for r in rs]
            row = {"cell": label, "server": name, key: statistics.median(values),
                   "min": min(values), "max": max(values), "runs": len(rs),
                   "peak_rss_mb": max(r["peak_rss"] for r in rs) / 2**20,
                   "peak_pss_mb": max(r["peak_pss"] for r in rs) / 2**20,
                   "cpu_ms_per_msg": statistics.median(
                       1000 * r["server_cpu"] / r["messages"] for r in rs),
                   "other_cores": max(r["other_cpu"] / r["seconds"] for r in rs)}
            row |= {k: statistics.median(r[k] for r in rs) for k in mode.also if k != key}
            if pf and name != "postfix":
                paired = [r[key] / p[key] for r, p in zip(rs, pf)]
                row |= {"ratio": row[key] / statistics.median(p[key] for p in pf),
                        "paired_min": min(paired), "paired_max": max(paired)}
            rows.append(row)
    return rows


def table(mode: Mode, rows: list[dict[str, Any]]) -> str:
    unit = {"msg_per_s": "msg/s", "p99_ms": "p99 ms"}.get(mode.metric, mode.metric)
    lines = [f"| cell | server | {unit} (min-max) | / Postfix (paired min-max) "
             "| peak RSS MB | peak PSS MB | CPU ms/msg | others' cores |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = (f"{r['ratio']:.2f}x ({r['paired_min']:.2f}-{r['paired_max']:.2f})"
                 if "ratio" in r else "")
        v = f"{r[mode.metric]:.1f} ({r['min']:.1f}-{r['max']:.1f})"
        lines.append(f"| {r['cell']} | {r['server']} | {v} | {ratio} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} "
                     f"| {r['cpu_ms_per_msg']:.2f} | {r['other_cores']:.2f} |")
    legend = ("\nRSS and PSS: the peaks of the sums over all the server's processes. "
              "CPU: the server's processes (reaped ones included) in the timed part. "
              "Others' cores: the machine's busy CPU time (steal included) that the server, "
              "its peer, the client and this script did not use, per second of the run, the "
              "most of the cell's runs: other work on the machine and kernel threads.\n")
    if mode.lower_is_better:
        legend += f"Lower is better: a ratio under 1 means a smaller {unit} than Postfix's.\n"
    return "\n".join(lines) + "\n" + legend + mode.notes(rows)


# -- the machine ----------------------------------------------------------------


def command_output(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# File systems that always write a journal (a log) before their metadata.
LOGGING_FILE_SYSTEMS = frozenset({"xfs", "btrfs", "jfs", "reiserfs", "f2fs", "zfs"})


def _block_name(dev: str) -> str:
    """The kernel's name of block device MAJOR:MINOR (vda, dm-0, loop0)."""
    return os.path.basename(os.path.realpath(f"/sys/dev/block/{dev}"))


def file_system(path: str, mountinfo: str | None = None, journals: Iterable[str] | None = None,
                block_name: Callable[[str], str] = _block_name) -> dict[str, Any]:
    """
    The file system C{path} is on, from /proc/self/mountinfo (or
    C{mountinfo}): its type, device, mount point and options, and whether
    it has a journal ("yes", "no", or "" when unknown): ext3 and ext4 have
    one when /proc/fs/jbd2 (or C{journals}) names their device.  The
    figures depend on it (docs/benchmarks.md, "Removing files slowed the
    next run").
    """
    if mountinfo is None:
        with open("/proc/self/mountinfo") as f:
            mountinfo = f.read()
    target = os.path.realpath(path)
    best: dict[str, Any] = {"type": "", "device": "", "mount": "", "options": "", "journal": ""}
    dev = ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best["mount"]):
            best = {"type": tail[0], "device": tail[1], "mount": mount,
                    "options": ",".join(dict.fromkeys(
                        o for o in f"{fields[5]},{tail[2]}".split(",") if o)),
                    "journal": ""}
            dev = fields[2]
    kind = best["type"]
    if kind in LOGGING_FILE_SYSTEMS:
        best["journal"] = "yes"
    elif kind in ("ext3", "ext4"):
        if journals is None:
            try:
                journals = os.listdir("/proc/fs/jbd2")
            except OSError:
                journals = []
        name = block_name(dev)
        best["journal"] = "yes" if any(j.rsplit("-", 1)[0] == name for j in journals) else "no"
    return best


def machine(workdir: str | None = None) -> dict[str, Any]:
    """What the figures were measured on, and what the load was."""
    import twisted
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), platform.machine())
    status = command_output(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": command_output(["git", "-C", ROOT, "rev-parse", "HEAD"]),
        "checkout": ROOT, "dirty": bool(status),
        "cpu": model, "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
        "kernel": platform.release(), "python": platform.python_version(),
        "twisted": twisted.__version__,
        "postfix": command_output(["postconf", "-d", "-h", "mail_version"]),
        "file_system": file_system(workdir or tempfile.gettempdir()),
        "load_before": os.getloadavg(),
    }


def describe_machine(info: dict[str, Any], others: float | None = None) -> str:
    text = (f"Commit {info['commit'][:12]}{' (dirty)' if info['dirty'] else ''}, {info['date']}; "
            f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB, "
            f"Linux {info['kernel']}, Python {info['python']}, Twisted {info['twisted']}, "
            f"Postfix {info['postfix']}; {_describe_fs(info.get('file_system'))}"
            f"load average {info['load_before'][0]:.2f} before, "
            f"{info.get('load_after', info['load_before'])[0]:.2f} after")
    if others is not None:
        text += f"; others' work used {others:.2f} cores in the median run"
    return text + "."


def _describe_fs(fs: dict[str, Any] | None) -> str:
    if not fs or not fs.get("type"):
        return ""
    journal = {"yes": ", with a journal", "no": ", without a journal"}.get(fs["journal"], "")
    return f"spools on {fs['type']}{journal} ({fs['device']} on {fs['mount']}, {fs['options']}); "


def write_json(path: str | None, report: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


DOCS = os.path.join(ROOT, "docs", "benchmarks.md")


def replace_block(doc: str, mode: str, text: str) -> str:
    """
    C{doc} with the figures between C{<!-- scripts/bench MODE -->} and
    C{<!-- end scripts/bench MODE -->} replaced by C{text}; the markers
    are added at the end when missing.
    """
    start, end = f"<!-- scripts/bench {mode} -->", f"<!-- end scripts/bench {mode} -->"
    block = f"{start}\n{text.strip()}\n{end}"
    head, found, rest = doc.partition(start)
    if not found or end not in rest:
        return doc.rstrip("\n") + "\n\n" + block + "\n"
    return head + block + rest.partition(end)[2]


def report(mode: str, text: str, docs: str | None) -> None:
    """Print the figures; with C{docs}, put them in that file's block for the mode too."""
    print(text)
    if docs:
        with open(docs, encoding="utf-8") as f:
            doc = f.read()
        with open(docs, "w", encoding="utf-8") as f:
            f.write(replace_block(doc, mode, text))
        log(f"{mode}: figures written into {docs}")


def run_rounds(mode: Mode, cells: list[dict[str, Any]], repeats: int, servers: list[str],
               workdir: str, quiet_wait: float, json_path: str | None,
               docs: str | None = None) -> int:
    """The whole comparison: every run of the plan, then the table and the JSON."""
    todo = plan(cells, repeats, servers, mode.paired)
    info = machine(workdir)
    log(f"{mode.name}: {len(todo)} runs at {info['commit'][:12]}"
        f"{' (dirty)' if info['dirty'] else ''}, load {info['load_before']}")
    runs = []
    leftovers: list[str] = []
    try:
        for i, (name, cell) in enumerate(todo, 1):
            waited = wait_quiet(quiet_wait) if quiet_wait else 0.0
            r = run_once(mode, name, cell, workdir, leftovers) | {"waited_for_quiet": waited}
            runs.append(r)
            extra = f", p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms" if "p99_ms" in r else ""
            log(f"[{i}/{len(todo)}] {name:12} {mode.label(cell)}: {r['messages']} in "
                f"{r['seconds']:.2f} s ({r['msg_per_s']:.0f}/s{extra}), "
                f"peak RSS {r['peak_rss'] / 2**20:.0f} MB PSS {r['peak_pss'] / 2**20:.0f} MB, "
                f"CPU {r['server_cpu']:.1f} s, others {r['other_cpu'] / r['seconds']:.2f} cores")
    finally:
        remove_later(leftovers)
    info["load_after"] = os.getloadavg()
    rows = summary(mode, runs)
    others = statistics.median(r["other_cpu"] / r["seconds"] for r in runs)
    report(mode.name, f"`scripts/bench {mode.name}`: " + describe_machine(info, others)
           + f" Medians of {repeats}; ratios to Postfix with the min-max of the per-round "
           "ratios.\n\n" + table(mode, rows) + mode.run_notes(runs), docs)
    write_json(json_path, {"mode": mode.name, "machine": info, "summary": rows, "runs": runs})
    return 0


def remove_later(paths: list[str]) -> None:
    """
    Remove the runs' directories, all at once after the last run, not each
    after its run: on ext4 without a journal the inode allocator skips
    every inode freed in the last seconds (minutes while its inode table
    block is dirty) at the cost of a buffer look-up each, so a run that
    followed the removal of the previous run's Maildir paid that for every
    file it created (docs/benchmarks.md, "Removing files slowed the next
    run").
    """
    for path in paths:
        shutil.rmtree(path, True)
