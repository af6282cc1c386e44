#!/usr/bin/env python3
"""
Inbound acceptance benchmark: twisted-mta against a private Postfix.

What is measured: how fast each server takes messages from SMTP clients into
its durable queue (the 250 after DATA is sent only once the message is on
disk), with Postfix's C{smtp-source} as the load generator for both servers,
on loopback, in the same run.  For each cell of the matrix (concurrent
sessions x message size) both servers are run several times, alternating
which goes first; each run uses a fresh server process and an empty queue.

    python3 bench/inbound.py                 # full matrix, ~5 minutes on 2 cores
    python3 bench/inbound.py --quick         # a fifth of the messages, one repeat
    python3 bench/inbound.py --json out.json --profile prof/   # + py-spy runs

Needs: Linux (/proc), root (Postfix's master runs as root), the C{postfix}
package for C{postfix} and C{smtp-source}, twisted-mta installed in this
interpreter, and C{py-spy} on PATH for C{--profile}.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

KIB = 1024
DEFAULT_SESSIONS = (1, 20, 100)
DEFAULT_SIZES = (1 * KIB, 100 * KIB)
# Messages per run for each (sessions, size): each run should last a few
# seconds on a 2-core machine, the whole default matrix under ~10 minutes.
DEFAULT_COUNTS = {
    (1, 1 * KIB): 1000,
    (20, 1 * KIB): 2000,
    (100, 1 * KIB): 2000,
    (1, 100 * KIB): 400,
    (20, 100 * KIB): 800,
    (100, 100 * KIB): 800,
}
SENDER = "sender@bench.test"
RECIPIENT = "rcpt@remote.bench.test"  # not local to either server: relayed, then deferred
HELO = "client.bench.test"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# -- /proc helpers ------------------------------------------------------------


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    return out


def kb(value: str | None) -> int:
    return int(value.split()[0]) if value else 0


def proc_cpu_ticks(pid: int, children: bool = False, task: int | None = None) -> int:
    """
    utime+stime of C{pid} (all its threads, or only thread C{task}), plus
    cutime+cstime (its reaped children) when C{children}; in clock ticks.
    """
    path = f"/proc/{pid}/task/{task}/stat" if task else f"/proc/{pid}/stat"
    try:
        with open(path) as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks


def thread_cpu_split(pid: int) -> tuple[int, int, int, int]:
    """
    (user, system) ticks of the main thread and (user, system) of all the
    others, from /proc/PID/task/*/stat (exited threads are lost: Twisted's
    pool keeps its workers).
    """
    mu = ms = ou = os_ = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return 0, 0, 0, 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = data[data.rindex(")") + 2:].split()
        u, sy = int(fields[11]), int(fields[12])
        if int(tid) == pid:
            mu, ms = u, sy
        else:
            ou, os_ = ou + u, os_ + sy
    return mu, ms, ou, os_


def proc_pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def machine_busy_ticks() -> int:
    """
    CPU ticks spent by anything on the machine (all CPUs), from /proc/stat.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle


def children_of(ppid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = data[data.rindex(")") + 2:].split()
        if int(fields[1]) == ppid:
            out.append(int(name))
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    st = proc_status(pid).get("State", "")
    return bool(st) and not st.startswith("Z")


def count_files(root: str, subdirs: tuple[str, ...]) -> int:
    n = 0
    for sub in subdirs:
        for _dirpath, _dirnames, files in os.walk(os.path.join(root, sub)):
            n += sum(1 for f in files if not f.startswith("."))
    return n


def probe_filesystem(workdir: str, n: int = 200) -> dict[str, float]:
    # (Also run with n=40 after each run's load, beside its queue.)
    """
    What a file create and an fsync cost where the queues will live: both
    servers create files per message, and on some filesystems (this one:
    ext4 on a VM) a create costs from ~15 us to ~1 ms depending on the
    block group the directory landed in.
    """
    d = tempfile.mkdtemp(prefix="fsprobe-", dir=workdir)
    try:
        t = time.perf_counter()
        for i in range(n):
            os.close(os.open(os.path.join(d, f"c{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        create = (time.perf_counter() - t) / n
        lat = []
        for i in range(n // 4):
            fd = os.open(os.path.join(d, f"c{i}"), os.O_WRONLY)
            os.write(fd, b"x" * 1024)
            t = time.perf_counter()
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
            os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"create_us": round(create * 1e6, 1), "fsync_us": round(statistics.median(lat) * 1e6, 1)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_banner(port: int, timeout: float, is_alive) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not is_alive():
            raise BenchError(f"server on port {port} died during start-up")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                banner = s.recv(512)
                s.sendall(b"QUIT\r\n")
                s.recv(512)
            if banner.startswith(b"220"):
                return
            last = BenchError(f"unexpected banner {banner!r}")
        except OSError as e:
            last = e
        time.sleep(0.1)
    raise BenchError(f"no SMTP banner on port {port} after {timeout}s: {last}")


def fs_of(path: str) -> str:
    """
    Device and filesystem type of C{path}, from /proc/mounts (longest prefix).
    """
    path = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, dev, fstype)
    except OSError:
        pass
    return f"{best[1]} ({best[2]}) mounted on {best[0]}"


# -- servers -----------------------------------------------------------------


class Server:
    """
    One server process tree, started fresh for one run.
    """

    name = "?"

    def __init__(self, base: str) -> None:
        self.base = base
        self.port = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def sample(self) -> None:
        """
        Called every few hundred ms during a run: record memory peaks.
        """

    def cpu_ticks(self) -> int:
        raise NotImplementedError

    def pending(self) -> int:
        """
        Messages accepted but not yet through the queue manager's first attempt.
        """
        raise NotImplementedError

    def queued(self) -> int:
        raise NotImplementedError

    def memory(self) -> dict[str, Any]:
        raise NotImplementedError


class TwistedMTA(Server):
    name = "twisted-mta"
    switch_interval: float | None = None
    prelude = ""  # --twistd-prelude
    backlog: int | None = None  # None: twisted-mta's default listen(2) backlog

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.proc: subprocess.Popen | None = None
        self.spool = os.path.join(base, "spool")
        self.peak_rss_kb = 0
        self.hwm_kb = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.port = free_port()
        backlog = f":backlog={self.backlog}" if self.backlog else ""
        config = os.path.join(self.base, "mta.toml")
        with open(config, "w") as f:
            f.write(f"""\
# Written by bench/inbound.py for one benchmark run.
[server]
hostname = "mta.bench.test"
spool = "spool"

[[listeners]]
role = "mx"
endpoint = "tcp:{self.port}:interface=127.0.0.1{backlog}"

[relay]
trusted_networks = ["127.0.0.0/8"]

# Never the system resolver: a closed port on loopback, so the remote
# recipients' lookups fail at once and nothing leaves the machine.
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"

[limits]
connections_per_ip = 200
""")
        boot = "from twisted.scripts.twistd import run; run()"
        if self.prelude:
            boot = self.prelude + "\n" + boot
        if self.switch_interval is not None:
            # Diagnostic (--switch-interval): the GIL hand-off interval.
            boot = f"import sys; sys.setswitchinterval({self.switch_interval!r}); " + boot
        cmd = [sys.executable, "-c", boot,
               "-n", "--pidfile=", "mta", "--config", config]
        self.logfile = open(os.path.join(self.base, "twistd.log"), "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.base, stdout=self.logfile,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_banner(self.port, 30, lambda: self.proc.poll() is None)
        except BenchError:
            self.stop()
            raise BenchError("twisted-mta did not start; its log:\n" + self.log_tail())

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(os.path.join(self.base, "twistd.log"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logfile.close()

    def sample(self) -> None:
        st = proc_status(self.pid)
        self.peak_rss_kb = max(self.peak_rss_kb, kb(st.get("VmRSS")))
        self.hwm_kb = max(self.hwm_kb, kb(st.get("VmHWM")))

    def cpu_ticks(self) -> int:
        return proc_cpu_ticks(self.pid)

    def reactor_cpu_ticks(self) -> int:
        """
        CPU time of the main (reactor) thread alone; the rest is the I/O pool.
        """
        return proc_cpu_ticks(self.pid, task=self.pid)

    def pending(self) -> int:
        return count_files(self.spool, ("new",))

    def queued(self) -> int:
        return count_files(self.spool, ("new", "cur", "hold"))

    def memory(self) -> dict[str, Any]:
        self.sample()
        return {"peak_rss_mb": round(self.hwm_kb / 1024, 1),
                "what": "VmHWM of the twistd process"}


POSTFIX_MASTER_CF = """\
# Written by bench/inbound.py: no chroot, smtpd on a private loopback port.
127.0.0.1:{port} inet n - n - 200 smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

def private_main_cf(hostname: str) -> str:
    """
    The main.cf lines every private benchmark Postfix shares: its own
    queue, data and log directories, loopback only, no DNS, no aliases.
    C{{queue}}, C{{data}} and C{{log}} are left for C{str.format}.
    """
    return PRIVATE_MAIN_CF.replace("@HOSTNAME@", hostname)


PRIVATE_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {log}/maillog
maillog_file_prefixes = {log}
myhostname = @HOSTNAME@
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
"""

POSTFIX_MAIN_CF = """\
# Written by bench/inbound.py: a private instance that accepts into its
# queue and never delivers.  Everything not set here is Postfix's default
# (queue files are fsync'd before the 250, as always).
""" + private_main_cf("postfix.bench.test") + """\
# Remote mail goes to the smtp transport, which is deferred: the queue
# manager moves each message to deferred/ without any connection attempt.
relayhost = [127.0.0.1]:1
defer_transports = smtp
"""


class Postfix(Server):
    name = "postfix"
    INBOUND = ("smtpd", "cleanup")
    extra_main_cf: tuple[str, ...] = ()  # --postfix-option

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.conf = os.path.join(base, "conf")
        self.queue = os.path.join(base, "queue")
        self.data = os.path.join(base, "data")
        self.logdir = os.path.join(base, "log")
        self.master_pid = 0
        self.peak_hwm_sum_kb = 0  # max over samples of the sum of VmHWM of live smtpd+cleanup
        self.peak_rss_sum_kb = 0  # max over samples of the sum of VmRSS of the whole tree
        self.peak_pss_sum_kb = 0  # max over samples of the sum of Pss of the whole tree
        self.peak_procs: Counter[str] = Counter()
        self._last_pss = 0.0

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # Postfix writes its own errors to stderr only when it is a tty; the
        # maillog file has them otherwise.
        p = subprocess.run(["postfix", "-c", self.conf, *args], capture_output=True,
                           text=True, stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise BenchError(f"postfix {' '.join(args)} failed ({p.returncode}): "
                             f"{p.stdout}{p.stderr}\n{self.log_tail()}")
        return p

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(os.path.join(self.logdir, "maillog"), errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return "(no maillog)"

    def start(self) -> None:
        import pwd

        self.port = free_port()
        for d in (self.conf, self.queue, self.data, self.logdir):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.base, 0o755)
        os.chmod(self.queue, 0o755)
        pw = pwd.getpwnam("postfix")
        os.chown(self.data, pw.pw_uid, pw.pw_gid)
        os.chmod(self.data, 0o700)
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(queue=self.queue, data=self.data, log=self.logdir))
            for setting in self.extra_main_cf:
                f.write(setting + "\n")
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(POSTFIX_MASTER_CF.format(port=self.port))
        self.postfix("start")
        pidfile = os.path.join(self.queue, "pid", "master.pid")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    self.master_pid = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.1)
        if not self.master_pid:
            raise BenchError("postfix master did not write its pid\n" + self.log_tail())
        wait_for_banner(self.port, 30, lambda: alive(self.master_pid))

    def stop(self) -> None:
        if not self.master_pid:
            return
        if alive(self.master_pid):
            self.postfix("stop", check=False)
            deadline = time.monotonic() + 20
            while alive(self.master_pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(self.master_pid):
                self.postfix("abort", check=False)
                time.sleep(1)
        self.master_pid = 0

    def _tree(self) -> list[int]:
        return [self.master_pid] + children_of(self.master_pid)

    def sample(self, force_pss: bool = False) -> None:
        if not self.master_pid:
            return
        hwm = rss = pss = 0
        procs: Counter[str] = Counter()
        # smaps_rollup costs ~0.2 ms a process (30 ms at 100 sessions): every
        # 2 s only (and once at the end), to keep the sampler's CPU out of
        # the measurement.
        now = time.monotonic()
        with_pss = force_pss or now - self._last_pss >= 2.0
        if with_pss:
            self._last_pss = now
        for pid in self._tree():
            st = proc_status(pid)
            if not st:
                continue
            name = st.get("Name", "?")
            procs[name] += 1
            rss += kb(st.get("VmRSS"))
            if name in self.INBOUND:
                hwm += kb(st.get("VmHWM"))
            if with_pss:
                pss += proc_pss_kb(pid)
        self.peak_hwm_sum_kb = max(self.peak_hwm_sum_kb, hwm)
        self.peak_rss_sum_kb = max(self.peak_rss_sum_kb, rss)
        self.peak_pss_sum_kb = max(self.peak_pss_sum_kb, pss)
        for name, n in procs.items():
            self.peak_procs[name] = max(self.peak_procs[name], n)

    def cpu_ticks(self) -> int:
        # The master's own time, its reaped children's (smtpd and cleanup
        # exit after max_use), and the live children's.
        return proc_cpu_ticks(self.master_pid, children=True) + sum(
            proc_cpu_ticks(pid) for pid in children_of(self.master_pid))

    def pending(self) -> int:
        return count_files(self.queue, ("incoming", "active"))

    def queued(self) -> int:
        return count_files(self.queue, ("incoming", "active", "deferred", "hold"))

    def memory(self) -> dict[str, Any]:
        self.sample(force_pss=True)
        return {
            "peak_rss_mb": round(self.peak_hwm_sum_kb / 1024, 1),
            "what": "max over samples of the sum of VmHWM of the live smtpd and cleanup processes",
            "peak_rss_sum_all_mb": round(self.peak_rss_sum_kb / 1024, 1),
            "peak_pss_sum_all_mb": round(self.peak_pss_sum_kb / 1024, 1),
            "peak_processes": dict(self.peak_procs),
        }


SERVERS = {"twisted-mta": TwistedMTA, "postfix": Postfix}


# -- one run -----------------------------------------------------------------


class Sampler(threading.Thread):
    def __init__(self, server: Server, interval: float) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        try:  # this thread only: lower priority than the servers and smtp-source
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        while not self.stopping.is_set():
            try:
                self.server.sample()
            except Exception as e:  # a process vanishing mid-read, etc.
                log(f"  (sampler: {e!r})")
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


def smtp_source_cmd(port: int, sessions: int, count: int, size: int) -> list[str]:
    return ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-M", HELO, "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]


def run_once(server_cls, workdir: str, sessions: int, size: int, count: int,
             keep: bool, profile_to: str | None = None, pyspy_rate: int = 100
             ) -> dict[str, Any]:
    base = tempfile.mkdtemp(prefix=f"{server_cls.name}-", dir=workdir)
    server = server_cls(base)
    result: dict[str, Any] = {"server": server_cls.name, "sessions": sessions, "size": size,
                              "messages": count}
    pyspy: subprocess.Popen | None = None
    sampler: Sampler | None = None
    try:
        server.start()
        if profile_to:
            pyspy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--rate", str(pyspy_rate),
                 "--idle", "--threads", "--nonblocking", "--format", "raw", "-o", profile_to],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            time.sleep(1.0)  # let it attach
        sampler = Sampler(server, 0.5)
        sampler.start()
        if isinstance(server, TwistedMTA):
            result["rss_before_load_mb"] = round(kb(proc_status(server.pid).get("VmRSS")) / 1024, 1)
        cpu0 = server.cpu_ticks()
        reactor0 = server.reactor_cpu_ticks() if isinstance(server, TwistedMTA) else 0
        split0 = thread_cpu_split(server.pid) if isinstance(server, TwistedMTA) else None
        cmd = smtp_source_cmd(server.port, sessions, count, size)
        busy0 = machine_busy_ticks()
        self0 = os.times()
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=900)
        seconds = time.perf_counter() - t0
        # CPU used during the load by anything else than the server, the
        # load generator and this script: the machine's noise.
        self1 = os.times()
        busy = (machine_busy_ticks() - busy0) / CLK_TCK
        ours_cpu = (server.cpu_ticks() - cpu0) / CLK_TCK
        gen_cpu = (self1.children_user + self1.children_system
                   - self0.children_user - self0.children_system)
        me_cpu = self1.user + self1.system - self0.user - self0.system
        result["smtp_source_cpu_pct"] = round(100.0 * gen_cpu / seconds, 1)
        # Everything the machine did during the load (server, kernel threads
        # doing its writeback, smtp-source, noise), per message.
        result["machine_cpu_ms_per_msg"] = round(busy * 1000 / count, 3)
        result["unattributed_cpu_pct"] = round(max(0.0, 100.0 * (busy - ours_cpu - gen_cpu - me_cpu)
                                            / seconds), 1)
        if isinstance(server, TwistedMTA):
            reactor_load = server.reactor_cpu_ticks() - reactor0
            result["reactor_cpu_pct"] = round(100.0 * reactor_load / CLK_TCK / seconds, 1)
        if pyspy is not None:
            pyspy.send_signal(signal.SIGINT)
            try:
                _, err = pyspy.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                pyspy.kill()
                pyspy.wait()
                err = b""
            result["pyspy"] = err.decode(errors="replace").strip().splitlines()[-2:]
        if p.returncode != 0:
            raise BenchError(f"smtp-source against {server.name} failed ({p.returncode}): "
                             f"{p.stderr.strip()[-2000:]}")
        # Let the queue manager finish its first attempt on everything, so
        # CPU per message covers the same work on both sides.
        t1 = time.perf_counter()
        deadline = time.monotonic() + 120
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            pending = server.pending()
            if not pending:
                break
            if pending != last:
                last, since = pending, time.monotonic()
            elif time.monotonic() - since > 3:
                result["drain_stalled"] = pending  # e.g. a --twistd-prelude without attempts
                break
            time.sleep(0.05)
        drain = time.perf_counter() - t1
        cpu1 = server.cpu_ticks()
        if isinstance(server, TwistedMTA):
            result["reactor_cpu_ms_per_msg"] = round(
                (server.reactor_cpu_ticks() - reactor0) * 1000 / CLK_TCK / count, 3)
            split1 = thread_cpu_split(server.pid)
            for name, a, b in zip(("reactor_user", "reactor_sys", "pool_user", "pool_sys"),
                                  split0, split1):
                result[f"{name}_ms_per_msg"] = round((b - a) * 1000 / CLK_TCK / count, 3)
        sampler.stop()
        queued = server.queued()
        # File creation cost right after the load, next to the queue: it
        # drifts with what the filesystem went through (see the doc).
        result["fs_create_us_after"] = probe_filesystem(base, 40)["create_us"]
        result.update(
            seconds=round(seconds, 3),
            msgs_per_s=round(count / seconds, 1),
            drain_seconds=round(drain, 3),
            cpu_ms_per_msg=round((cpu1 - cpu0) * 1000 / CLK_TCK / count, 3),
            queued=queued,
            **server.memory(),
        )
        if queued != count:
            result["error"] = f"{queued} messages in the queue, {count} sent"
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if pyspy is not None and pyspy.poll() is None:
            pyspy.kill()
            pyspy.wait()
        try:
            server.stop()
        finally:
            if not keep:
                shutil.rmtree(base, ignore_errors=True)
    return result


# -- profile summary ---------------------------------------------------------


def _func(frame: str) -> str:
    """
    'name (path:line)' -> 'name (path)'
    """
    name, sep, where = frame.rpartition(" (")
    if not sep:
        return frame
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{name} ({path})"


def summarize_pyspy(raw_path: str, top: int = 15) -> dict[str, Any]:
    """
    Read py-spy's raw (collapsed) output recorded with --idle --threads.

    Reactor thread: share of wall time idle in epoll, and the functions that
    take its busy time (self and inclusive, as % of its busy samples).  Pool
    threads: where their non-idle samples are.
    """
    main_total = main_idle = 0
    main_self: Counter[str] = Counter()
    main_incl: Counter[str] = Counter()
    main_cat: Counter[str] = Counter()
    pool_total = pool_idle = 0
    pool_self: Counter[str] = Counter()
    pool_job: Counter[str] = Counter()
    with open(raw_path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            count = int(n)
            frames = stack.split(";")
            thread = frames[0].split(": ", 1)[-1]
            frames = frames[1:]
            leaf = _func(frames[-1]) if frames else "?"
            if thread == "MainThread":
                main_total += count
                if leaf.startswith("EPollReactor.doPoll (") and (
                        _POLL_LINE == 0 or frames[-1].endswith(f":{_POLL_LINE})")):
                    main_idle += count
                    continue
                main_self[leaf] += count
                funcs = [_func(fr) for fr in frames]
                for fn in set(funcs):
                    main_incl[fn] += count
                main_cat[_category(funcs)] += count
            else:
                pool_total += count
                if leaf.startswith(("Condition.wait", "Queue.get", "Thread.wait")):
                    pool_idle += count
                    continue
                pool_self[leaf] += count
                job = "?"
                for i, fr in enumerate(frames):
                    if "callWithContext" in fr and i + 1 < len(frames) and \
                            "callWithContext" not in frames[i + 1]:
                        job = _func(frames[i + 1])
                pool_job[job] += count
    busy = main_total - main_idle
    pct = (lambda c, d: round(100.0 * c / d, 1) if d else 0.0)
    return {
        "main_samples": main_total,
        "main_busy_pct_of_wall": pct(busy, main_total),
        "main_self_pct_of_busy": [(fn, pct(c, busy)) for fn, c in main_self.most_common(top)],
        "main_inclusive_pct_of_busy": [(fn, pct(c, busy)) for fn, c in main_incl.most_common(
            top * 3) if not fn.startswith(("<module>", "run ", "runApp", "ReactorBase.",
                                           "ApplicationRunner", "UnixApplicationRunner",
                                           "runReactorWithLogging", "EPollReactor.doPoll",
                                           "callWithLogger", "callWithContext",
                                           "ThreadedContextTracker", "ContextTracker",
                                           "_ContextTracker"))][:top],
        "main_categories_pct_of_busy": [(c, pct(n, busy)) for c, n in main_cat.most_common()],
        "pool_busy_samples": pool_total - pool_idle,
        "pool_busy_by_job_pct": [(fn, pct(c, pool_total - pool_idle))
                                 for fn, c in pool_job.most_common(8)],
        "pool_busy_by_leaf_pct": [(fn, pct(c, pool_total - pool_idle))
                                  for fn, c in pool_self.most_common(8)],
    }


# Where the reactor thread's busy time goes, by what a sample's stack contains;
# the first matching rule wins (logging done from a command counts as logging).
_CATEGORIES = (
    ("logging (twisted.logger events, formatting, log file writes)",
     ("twisted/logger/", "msg (twisted/python/log.py)", "LogPublisher.")),
    ("spool: new entry (Spool.new_message; created the tmp/ file before commit f4bc54b)",
     ("Spool.new_message ",)),
    ("spool: collect message data (MessageWriter.write)", ("MessageWriter.write ",)),
    ("DATA parsing (DataReader)", ("DataReader.",)),
    ("queue manager's first attempt (QueueManager, routing, stat calls)",
     ("QueueManager.", "twisted_mta/outbound/")),
    ("SMTP commands and replies (InboundESMTP, address parsing, Received header)",
     ("InboundESMTP.", "twisted_mta/address.py", "twisted_mta/reply.py")),
    ("thread-pool hand-offs and Deferred plumbing",
     ("threadpool.py", "twisted/_threads/", "callFromThread", "Deferred.", "_GroupSync.",
      "MessageWriter.commit")),
)


def _category(funcs: list[str]) -> str:
    for name, needles in _CATEGORIES:
        for fn in funcs:
            if any(n in fn for n in needles):
                return name
    return "Twisted reactor and TCP transport (accept, read, write, close, timers)"


def _poll_line() -> int:
    """
    The line of epollreactor.doPoll that blocks in epoll_wait (idle time).
    """
    try:
        import inspect

        from twisted.internet import epollreactor

        lines, start = inspect.getsourcelines(epollreactor.EPollReactor.doPoll)
        for i, text in enumerate(lines):
            if "self._poller.poll(" in text:
                return start + i
    except Exception:
        pass
    return 0


_POLL_LINE = _poll_line()


def format_profile(name: str, s: dict[str, Any]) -> str:
    out = [f"#### {name}", "",
           f"Reactor thread busy {s['main_busy_pct_of_wall']}% of wall time "
           f"({s['main_samples']} samples).", "",
           "| reactor thread: self time | % of busy | | inclusive | % of busy |",
           "|---|---:|---|---|---:|"]
    rows = max(len(s["main_self_pct_of_busy"]), len(s["main_inclusive_pct_of_busy"]))
    for i in range(rows):
        a = s["main_self_pct_of_busy"][i] if i < len(s["main_self_pct_of_busy"]) else ("", "")
        b = s["main_inclusive_pct_of_busy"][i] if i < len(s["main_inclusive_pct_of_busy"]) else ("", "")
        out.append(f"| `{a[0]}` | {a[1]} | | `{b[0]}` | {b[1]} |")
    out += ["", "| reactor thread busy time by activity | % of busy |", "|---|---:|"]
    for c, p in s["main_categories_pct_of_busy"]:
        out.append(f"| {c} | {p} |")
    out += ["", "| I/O pool threads: job (wall time, fsync included) | % of busy pool samples |",
            "|---|---:|"]
    for fn, p in s["pool_busy_by_job_pct"]:
        out.append(f"| `{fn}` | {p} |")
    return "\n".join(out)


# -- reporting ---------------------------------------------------------------


def source_fingerprint() -> str:
    """
    A hash of twisted-mta's Python sources, to notice edits during a run.
    """
    import hashlib

    try:
        import importlib.util

        spec = importlib.util.find_spec("twisted_mta")
        pkg = os.path.dirname(spec.origin)
    except Exception:
        return "?"
    h = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(pkg)):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                h.update(path.encode())
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]


def source_identity() -> str:
    """
    Which twisted-mta was measured: the git commit of its checkout, and
    whether its package had uncommitted changes.
    """
    try:
        import twisted_mta

        pkg = os.path.dirname(os.path.abspath(twisted_mta.__file__))
        head = subprocess.run(["git", "-C", pkg, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", pkg, "status", "--porcelain", "--", "."],
                               capture_output=True, text=True).stdout.strip()
    except Exception:
        return "?"
    if not head:
        return "(not a git checkout)"
    return f"commit {head}" + (" + uncommitted changes" if dirty else "")


def machine_info(workdir: str) -> dict[str, Any]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import twisted

        tw = twisted.__version__
    except Exception:
        tw = "?"
    try:
        pf = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                            text=True).stdout.strip()
    except OSError:
        pf = "?"
    try:
        with open("/proc/meminfo") as f:
            mem = f.readline().split(":")[1].strip()
    except OSError:
        mem = "?"
    return {
        "source": source_identity(),
        "source_fingerprint": source_fingerprint(),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "twisted": tw,
        "postfix": pf,
        "filesystem": fs_of(workdir),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def size_label(size: int) -> str:
    return f"{size // KIB} KiB" if size % KIB == 0 else f"{size} B"


def summarize(runs: list[dict[str, Any]], servers: list[str]) -> list[dict[str, Any]]:
    cells: dict[tuple[int, int], dict[str, Any]] = {}
    for r in runs:
        cell = cells.setdefault((r["sessions"], r["size"]),
                                {"sessions": r["sessions"], "size": r["size"],
                                 "messages": r["messages"]})
        cell.setdefault(r["server"], []).append(r)
    out = []
    for key in sorted(cells):
        cell = cells[key]
        row = {k: cell[k] for k in ("sessions", "size", "messages")}
        for name in servers:
            rs = [r for r in cell.get(name, []) if "msgs_per_s" in r]
            if not rs:
                continue
            mps = [r["msgs_per_s"] for r in rs]
            s = {
                "runs": len(rs),
                "median_msgs_per_s": round(statistics.median(mps), 1),
                "min_msgs_per_s": min(mps),
                "max_msgs_per_s": max(mps),
                "median_cpu_ms_per_msg": round(statistics.median(
                    r["cpu_ms_per_msg"] for r in rs), 3),
                "median_machine_cpu_ms_per_msg": round(statistics.median(
                    r["machine_cpu_ms_per_msg"] for r in rs), 3),
                "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                "errors": [r["error"] for r in rs if "error" in r],
            }
            if name == "twisted-mta":
                s["median_reactor_cpu_ms_per_msg"] = round(statistics.median(
                    r["reactor_cpu_ms_per_msg"] for r in rs), 3)
                s["median_reactor_cpu_pct"] = round(statistics.median(
                    r["reactor_cpu_pct"] for r in rs), 1)
                for k in ("reactor_user", "reactor_sys", "pool_user", "pool_sys"):
                    s[f"median_{k}_ms_per_msg"] = round(statistics.median(
                        r[f"{k}_ms_per_msg"] for r in rs), 3)
            if name == "postfix":
                s["max_peak_pss_sum_all_mb"] = max(r["peak_pss_sum_all_mb"] for r in rs)
                s["max_peak_rss_sum_all_mb"] = max(r["peak_rss_sum_all_mb"] for r in rs)
                peak: Counter[str] = Counter()
                for r in rs:
                    for k, v in r.get("peak_processes", {}).items():
                        peak[k] = max(peak[k], v)
                s["peak_processes"] = dict(peak)
            row[name] = s
        if "twisted-mta" in row and "postfix" in row:
            row["ratio"] = round(row["twisted-mta"]["median_msgs_per_s"]
                                 / row["postfix"]["median_msgs_per_s"], 2)
            # The two runs of one repeat ran back to back: their ratio is
            # less exposed to the machine's drift than the ratio of medians.
            by_rep = {}
            for r in cell.get("twisted-mta", []):
                by_rep.setdefault(r.get("repeat"), {})["ours"] = r
            for r in cell.get("postfix", []):
                by_rep.setdefault(r.get("repeat"), {})["pf"] = r
            pairs = [v["ours"]["msgs_per_s"] / v["pf"]["msgs_per_s"] for v in by_rep.values()
                     if "ours" in v and "pf" in v and "msgs_per_s" in v["ours"]
                     and "msgs_per_s" in v["pf"]]
            if pairs:
                row["paired_ratios"] = [round(x, 2) for x in pairs]
                row["paired_ratio_median"] = round(statistics.median(pairs), 2)
        out.append(row)
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def mps(s):
        return f"{s['median_msgs_per_s']:.0f} ({s['min_msgs_per_s']:.0f}-{s['max_msgs_per_s']:.0f})"

    lines = [
        "| sessions | size | msgs/run | twisted-mta msg/s | Postfix msg/s | ratio | paired ratio | "
        "twisted-mta CPU ms/msg (server / machine) | Postfix CPU ms/msg (server / machine) | "
        "twisted-mta peak RSS MB | Postfix smtpd+cleanup ΣHWM MB | Postfix all ΣPSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cpu(s):
        return f"{s['median_cpu_ms_per_msg']:.2f} / {s['median_machine_cpu_ms_per_msg']:.2f}"

    for row in rows:
        ours, pf = row.get("twisted-mta"), row.get("postfix")
        cells = [str(row["sessions"]), size_label(row["size"]), str(row["messages"]),
                 mps(ours) if ours else "-", mps(pf) if pf else "-",
                 f"{row['ratio']:.2f}" if "ratio" in row else "-",
                 f"{row['paired_ratio_median']:.2f}" if "paired_ratio_median" in row else "-",
                 cpu(ours) if ours else "-",
                 cpu(pf) if pf else "-",
                 f"{ours['max_peak_rss_mb']:.0f}" if ours else "-",
                 f"{pf['max_peak_rss_mb']:.0f}" if pf else "-",
                 f"{pf['max_peak_pss_sum_all_mb']:.0f}" if pf else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| sessions | size | twisted-mta reactor thread CPU, % of wall | "
             "reactor CPU ms/msg (user + sys) | I/O pool CPU ms/msg (user + sys) | "
             "Postfix peak processes |",
             "|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        ours, pf = row.get("twisted-mta"), row.get("postfix")
        procs = ""
        if pf:
            procs = ", ".join(f"{k} {v}" for k, v in sorted(pf.get("peak_processes", {}).items())
                              if v > 1)
        lines.append("| " + " | ".join([
            str(row["sessions"]), size_label(row["size"]),
            f"{ours['median_reactor_cpu_pct']:.0f}" if ours else "-",
            f"{ours['median_reactor_user_ms_per_msg']:.2f} + "
            f"{ours['median_reactor_sys_ms_per_msg']:.2f}" if ours else "-",
            f"{ours['median_pool_user_ms_per_msg']:.2f} + "
            f"{ours['median_pool_sys_ms_per_msg']:.2f}" if ours else "-",
            procs or "-"]) + " |")
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for row in rows:
        if row["sessions"] == 20 and "ratio" in row:
            goal = 0.9 if row["size"] <= KIB else 0.6 if row["size"] == 100 * KIB else None
            if goal is not None:
                ok = "met" if row["ratio"] >= goal else "NOT met"
                paired = row.get("paired_ratio_median")
                out.append(f"- {size_label(row['size'])}, 20 sessions: {row['ratio']:.2f}x Postfix "
                           f"(ratio of medians; median of paired runs {paired}x) "
                           f"(target >= {goal}x): {ok}")
        if row["sessions"] == 100 and "twisted-mta" in row:
            rss = row["twisted-mta"]["max_peak_rss_mb"]
            ok = "met" if rss < 100 else "NOT met"
            out.append(f"- {size_label(row['size'])}, 100 sessions: twisted-mta peak RSS "
                       f"{rss:.0f} MB (target < 100 MB): {ok}")
    return out


# -- main --------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a fifth of the messages and one repeat (a smoke run, ~1-2 minutes)")
    p.add_argument("--repeats", type=int, default=None,
                   help="runs per server per cell (default 3; 1 with --quick)")
    p.add_argument("--messages", type=int, default=None,
                   help="messages per run for every cell of the smallest size "
                        "(default: 1000 at 1 session, 2000 otherwise)")
    p.add_argument("--messages-large", type=int, default=None,
                   help="messages per run for every cell of the larger sizes "
                        "(default: 400 at 1 session, 800 otherwise)")
    p.add_argument("--sessions", default=",".join(map(str, DEFAULT_SESSIONS)),
                   help="comma-separated concurrent session counts (default 1,20,100)")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)),
                   help="comma-separated message sizes in bytes (default 1024,102400)")
    p.add_argument("--servers", default="twisted-mta,postfix",
                   help="which servers to run (default twisted-mta,postfix)")
    p.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    p.add_argument("--workdir", default=None,
                   help="where to create the spools/queues (default /var/tmp; must be "
                        "a real disk for fsync to mean anything)")
    p.add_argument("--keep", action="store_true", help="keep each run's directory")
    p.add_argument("--profile", metavar="DIR",
                   help="afterwards, run twisted-mta under py-spy for the --profile-cells "
                        "(extra runs, not in the table) and write raw stacks and a summary "
                        "to DIR")
    p.add_argument("--profile-only", action="store_true",
                   help="with --profile: skip the benchmark matrix, only profile")
    p.add_argument("--profile-cells", default="20x1024,20x102400",
                   help="SESSIONSxSIZE,... to profile (default 20x1024,20x102400)")
    p.add_argument("--backlog", type=int, default=None, metavar="N",
                   help="give twisted-mta's listener backlog=N (default: not set, so "
                        "twisted-mta's own default: 1024 since commit 52ae1f7, Twisted's 50 "
                        "before; the Postfix instance listens with 200)")
    p.add_argument("--postfix-option", action="append", default=[], metavar="NAME=VALUE",
                   help="diagnostic: append a main.cf setting to the Postfix instance "
                        "(repeatable), e.g. in_flow_delay=0")
    p.add_argument("--twistd-prelude", default="", metavar="PYTHON",
                   help="diagnostic: Python statements run in the twistd process before "
                        "twistd starts (e.g. to try a change without editing the source)")
    p.add_argument("--switch-interval", type=float, default=None, metavar="SECONDS",
                   help="diagnostic: run twistd with sys.setswitchinterval(SECONDS) "
                        "(Python's default is 0.005) to show the GIL hand-off cost")
    p.add_argument("--pyspy-rate", type=int, default=200,
                   help="py-spy samples per second (default 200)")
    args = p.parse_args(argv)
    args.sessions = [int(x) for x in args.sessions.split(",") if x]
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.servers = [x for x in args.servers.split(",") if x]
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.profile_only and not args.profile:
        p.error("--profile-only needs --profile DIR")
    return args


def count_for(args: argparse.Namespace, sessions: int, size: int) -> int:
    small = size <= min(args.sizes)
    given = args.messages if small else args.messages_large
    if given is not None:
        n = given
    else:
        n = DEFAULT_COUNTS.get((sessions, size))
        if n is None:
            n = (1000 if small else 400) if sessions == 1 else (2000 if small else 800)
    if args.quick:
        n = max(50, n // 5)
    return n


def default_workdir() -> str:
    """
    /var/tmp: on disk by definition (FHS), where /tmp is often a tmpfs on
    which fsync costs nothing.  A real spool lives under /var as well.
    """
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK):
        return "/var/tmp"
    return tempfile.gettempdir()


def preflight(args: argparse.Namespace, workdir: str) -> None:
    if not sys.platform.startswith("linux"):
        raise BenchError("Linux only (/proc)")
    if shutil.which("smtp-source") is None:
        raise BenchError("smtp-source not found: apt-get install postfix (see docs/benchmarks.md)")
    if "postfix" in args.servers:
        if os.geteuid() != 0:
            raise BenchError("a private Postfix needs root (or run with --servers twisted-mta)")
        if shutil.which("postfix") is None:
            raise BenchError("postfix not found: apt-get install postfix")
    if "twisted-mta" in args.servers:
        import importlib.util

        if importlib.util.find_spec("twisted_mta") is None:
            raise BenchError("twisted_mta is not importable: pip install -e .")
    if args.profile and shutil.which("py-spy") is None:
        raise BenchError("--profile needs py-spy: pip install py-spy")
    if "postfix" in args.servers:
        # Postfix's daemons run as the postfix user and must reach its queue.
        path = workdir
        while True:
            if not os.stat(path).st_mode & 0o001:
                raise BenchError(f"{path} is not searchable by other users, so Postfix's "
                                 f"daemons cannot reach a queue under {workdir}; choose "
                                 f"another --workdir (default /var/tmp)")
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
    fs = fs_of(workdir)
    if "tmpfs" in fs:
        log(f"WARNING: {workdir} is on {fs}: fsync is free there; use --workdir on a real disk")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = os.path.realpath(args.workdir or default_workdir())
    preflight(args, workdir)
    TwistedMTA.switch_interval = args.switch_interval
    TwistedMTA.backlog = args.backlog
    TwistedMTA.prelude = args.twistd_prelude
    Postfix.extra_main_cf = tuple(args.postfix_option)
    info = machine_info(workdir)
    log(f"machine: {info['nproc']} CPUs ({info['cpu']}), Python {info['python']}, "
        f"Twisted {info['twisted']}, Postfix {info['postfix']}; queues on {info['filesystem']}")
    rundir = tempfile.mkdtemp(prefix="inbound-bench-", dir=workdir)
    os.chmod(rundir, 0o755)
    info["fs_probe"] = probe_filesystem(rundir)
    log(f"in {rundir}: file create {info['fs_probe']['create_us']} us, "
        f"1 KiB fsync {info['fs_probe']['fsync_us']} us (median)")
    if info["fs_probe"]["create_us"] > 100:
        log("NOTE: creating a file is slow here; both servers create files for every "
            "message, so this weighs on the results (see docs/benchmarks.md)")
    runs: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    started = time.monotonic()
    interrupted = False
    try:
        if not args.profile_only:
            cells = [(s, z) for z in args.sizes for s in args.sessions]
            total = len(cells) * args.repeats * len(args.servers)
            i = 0
            for rep in range(args.repeats):
                for ci, (sessions, size) in enumerate(cells):
                    order = list(args.servers)
                    if (rep + ci) % 2:
                        order.reverse()
                    count = count_for(args, sessions, size)
                    for name in order:
                        i += 1
                        r = run_once(SERVERS[name], rundir, sessions, size, count, args.keep)
                        r["repeat"] = rep
                        runs.append(r)
                        log(f"[{i}/{total} {time.monotonic() - started:5.0f}s] {name:11s} "
                            f"{sessions:3d} sessions {size_label(size):>7s} x{count}: "
                            f"{r['msgs_per_s']:7.1f} msg/s, {r['cpu_ms_per_msg']:.2f} CPU ms/msg, "
                            f"peak {r['peak_rss_mb']} MB, drain {r['drain_seconds']}s"
                            + (f", reactor {r['reactor_cpu_pct']}% busy"
                               if "reactor_cpu_pct" in r else "")
                            + f", unattributed CPU {r['unattributed_cpu_pct']}%"
                            + f", create {r['fs_create_us_after']:.0f} us"
                            + (f"  ERROR: {r['error']}" if "error" in r else ""))
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            for spec in args.profile_cells.split(","):
                sessions, size = (int(x) for x in spec.lower().split("x"))
                count = count_for(args, sessions, size)
                raw = os.path.join(os.path.abspath(args.profile),
                                   f"twisted-mta-{sessions}s-{size}b.collapsed.txt")
                r = run_once(TwistedMTA, rundir, sessions, size, count, args.keep,
                             profile_to=raw, pyspy_rate=args.pyspy_rate)
                summary = summarize_pyspy(raw)
                summary["run"] = r
                name = f"{sessions} sessions, {size_label(size)} (under py-spy: {r['msgs_per_s']} msg/s)"
                text = format_profile(name, summary)
                with open(raw.replace(".collapsed.txt", ".summary.md"), "w") as f:
                    f.write(text + "\n")
                profiles[f"{sessions}x{size}"] = summary
                log(f"profile written: {raw}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: reporting what was measured")
    finally:
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)

    rows = summarize(runs, args.servers)
    elapsed = time.monotonic() - started
    changed = source_fingerprint() != info["source_fingerprint"]
    info["source_changed_during_run"] = changed
    print(f"## Inbound acceptance: twisted-mta vs Postfix ({info['date']})\n")
    what = ("profiling runs only" if args.profile_only else
            f"{args.repeats} run(s) per server per cell, alternating; msg/s is the median "
            f"(min-max)")
    print(f"{info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
          f"Python {info['python']}, Twisted {info['twisted']}, Postfix {info['postfix']}; "
          f"queues on {info['filesystem']} (file create {info['fs_probe']['create_us']} us, "
          f"fsync {info['fs_probe']['fsync_us']} us); twisted-mta {info['source']}. {what}; "
          f"wall time {elapsed:.0f}s.\n")
    if changed:
        print("**WARNING: twisted-mta's sources changed during this run; the results mix "
              "versions. Run again.**\n")
    if rows:
        print(markdown_table(rows))
        print()
        print(detail_table(rows))
        print()
        for line in targets(rows):
            print(line)
        errors = [(row["sessions"], row["size"], e) for row in rows for name in args.servers
                  if name in row for e in row[name]["errors"]]
        for s, z, e in errors:
            print(f"- ERROR at {s} sessions {size_label(z)}: {e}")
    for key, summary in profiles.items():
        print()
        sessions, size = (int(x) for x in key.split("x"))
        print(format_profile(f"{sessions} sessions, {size_label(size)} "
                             f"(under py-spy: {summary['run']['msgs_per_s']} msg/s)", summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": {k: v for k, v in vars(args).items()},
                       "elapsed_seconds": round(elapsed, 1), "cells": rows, "runs": runs,
                       "profiles": profiles}, f, indent=1)
    return 130 if interrupted else 0


def _terminate(signum, frame):
    raise KeyboardInterrupt  # stop the servers and clean up as for Ctrl-C


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
