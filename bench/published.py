#!/usr/bin/env python3
"""
What DANE and MTA-STS look-ups cost delivery (issue 12, "Performance":
at least 0.9x with a warm cache).

100 domains (dNNN.pub.test), each with its own MX host (mxNNN.pub.test),
in one zone signed at run time and served by nsd behind a private
validating unbound (L{tests.interop.dnssec.DNSSECWorld}).  Every MX host
has a C{TLSA 3 1 1} record of the sink's key, every domain an
C{_mta-sts} TXT record and an enforce policy listing its MX host, served
over HTTPS by the interop tests' policy host.  Every MX host is
127.0.0.1, where one C{tlssink} (bench/outbound.py: C, epoll, STARTTLS,
forgets each message) listens on C{[outbound] port}.

Two MTA configurations, one world: "with" (C{dane = true},
C{mta_sts = true}, the start-up check names from the signed zone) and
"without" (C{dane = false}, C{mta_sts = false}: the default opportunistic
policy, as before DANE and MTA-STS existed).  Both ask the same unbound
and use STARTTLS to the same sink, so the difference is the look-ups and
the checks.

One run: a fresh spool holding one warm-up message per domain (due now)
and 10 messages per domain due in a day; start the MTA; once the sink has
the warm-up messages (policies fetched and cached, unbound's cache
filled) and the MTA's idle connections have closed, C{queue flush}; timed
from the MTA's log line for the flush to the last message at the sink.
Runs alternate with/without; medians, min-max and the ratio of the
medians are printed.

    python3 bench/published.py --json published.json   # 3 x 2 runs, ~3 minutes
    python3 bench/published.py --quick                 # smoke run, ~15 s
    python3 bench/published.py --repeats 1 --profile prof/   # + py-spy, look-up CPU

Needs nsd, unbound and ldnsutils (scripts/install-test-deps), gcc and
libssl-dev (tlssink), trustme; py-spy for C{--profile}.  Nothing leaves
the machine: every configuration written names the private unbound in
C{[dns] nameservers}.  See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import unittest
from collections import Counter
from typing import Any, Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]

import trustme  # noqa: E402
from cryptography import x509  # noqa: E402

from inbound import (  # noqa: E402  (bench/inbound.py)
    CLK_TCK, BenchError, count_files, log, machine_busy_ticks, machine_info, proc_cpu_ticks,
    thread_cpu_split,
)
from outbound import SinkPeer, build_tlssink, write_entries  # noqa: E402
from tests.interop.dnssec import DNSSECWorld, Zone  # noqa: E402
from tests.interop.support import (  # noqa: E402
    ONE_ATTEMPT_JSON_LOG, MTAProcess, free_port, json_lines,
)
from tests.interop.test_publish import spki_sha256  # noqa: E402
from tests.interop.test_sts_delivery import POLICY_ADDRESS, PolicyHost  # noqa: E402
from tests.interop.tls_peers import free_port_on_all  # noqa: E402

ZONE = "pub.test"
VARIANTS = ("with", "without")
TARGET = 0.9
MESSAGE_SIZE = 1024


def domain(i: int) -> str:
    return f"d{i:03d}.{ZONE}"


def mx_host(i: int) -> str:
    return f"mx{i:03d}.{ZONE}"


def records(domains: int, port: int, spki: str) -> list[tuple[str, str, str]]:
    """
    The zone: per domain an MX, its host's address and TLSA 3 1 1 (under
    C{_PORT._tcp}, the port delivery uses), the C{_mta-sts} TXT record
    and the policy host's address; C{bogus} for the start-up check.
    """
    out = [("bogus", "A", "127.0.0.1")]
    for i in range(domains):
        d, mx = f"d{i:03d}", f"mx{i:03d}"
        out += [(d, "MX", f"10 {mx_host(i)}."), (mx, "A", "127.0.0.1"),
                (f"_{port}._tcp.{mx}", "TLSA", f"3 1 1 {spki}"),
                (f"_mta-sts.{d}", "TXT", '"v=STSv1; id=1"'),
                (f"mta-sts.{d}", "A", POLICY_ADDRESS)]
    return out


def mta_config(variant: str, resolver: str, sink_port: int, https_port: int,
               idle: float = 5.0, outbound: tuple[str, ...] = ()) -> str:
    """
    The MTA's tables beside L{MTAProcess}'s: DNS is the private unbound in
    both variants; only C{dane} and C{mta_sts} differ.
    """
    on = "true" if variant == "with" else "false"
    return "\n".join([
        "[dns]",
        f'nameservers = ["{resolver}"]',
        'timeout = "5s"',
        f'dnssec_secure_name = "{mx_host(0)}"',
        f'dnssec_bogus_name = "bogus.{ZONE}"',
        "",
        "[outbound]",
        f"port = {sink_port}",
        f'idle_time = "{idle:g}s"',
        *outbound,
        "",
        "[outbound.tls]",
        'ca_file = "ca.pem"',
        f"dane = {on}",
        f"mta_sts = {on}",
        'sts_ca_file = "ca.pem"',
        f"sts_port = {https_port}",
        'sts_fetch_timeout = "5s"',
        "",
        "[relay]",
        'trusted_networks = ["127.0.0.0/8"]',
        "",
        ONE_ATTEMPT_JSON_LOG,
    ])


class World:
    """
    The signed zone, nsd and unbound, the policy host and the sink: one
    for all the runs.
    """

    def __init__(self, workdir: str, domains: int) -> None:
        self.workdir = workdir
        self.domains = domains
        self.ca = trustme.CA(organization_name="twisted-mta published benchmark")
        self.dns: DNSSECWorld | None = None
        self.sink: SinkPeer | None = None
        self.policy_host: PolicyHost | None = None
        self.https_port = 0

    def start(self) -> None:
        leaf = self.ca.issue_cert(f"*.{ZONE}", "127.0.0.1")
        chain = os.path.join(self.workdir, "sink.pem")
        leaf.private_key_and_cert_chain_pem.write_to_path(chain)
        sinkdir = os.path.join(self.workdir, "sink")
        os.makedirs(sinkdir)
        self.sink = SinkPeer(sinkdir, {"tlssink": build_tlssink(sinkdir), "chain": chain})
        self.sink.start(1 << 30)
        self.https_port = free_port_on_all((POLICY_ADDRESS,))
        self.policy_host = PolicyHost(self.https_port, self.ca.issue_cert(
            *(f"mta-sts.{domain(i)}" for i in range(self.domains))))
        self.policy_host.overrides.update(
            (domain(i), (200, "enforce", [mx_host(i)])) for i in range(self.domains))
        spki = spki_sha256(x509.load_pem_x509_certificate(
            leaf.cert_chain_pems[0].bytes()).public_key())
        self.dns = DNSSECWorld(os.path.join(self.workdir, "dns"), [Zone(
            ZONE, tuple(records(self.domains, self.sink.port, spki)),
            corrupt=(("bogus", "A"),))])
        try:
            self.dns.start()
        except unittest.SkipTest as e:  # tests.interop.requires: a program is missing
            raise BenchError(str(e))

    def stop(self) -> None:
        for part in (self.dns, self.sink, self.policy_host):
            if part is not None:
                part.stop()


def rearm(sink: SinkPeer, count: int) -> None:
    """Have C{sink} time its next C{count} messages (the first and the last)."""
    sink.first_at = sink.reached_at = None
    sink.target = sink.accepted + count
    sink._reached.clear()


def fill(spool_path: str, domains: int, per_domain: int) -> None:
    """
    A fresh spool: one warm-up entry per domain due now, then
    C{per_domain} per domain due in a day (until the flush).
    """
    later = time.time() + 86400
    due = [0.0] * domains + [later] * (domains * per_domain)
    write_entries(spool_path, ((f"user{n}@{domain(n % domains)}", when)
                               for n, when in enumerate(due)), MESSAGE_SIZE)


def ms_per(ticks: float, count: int) -> float:
    return round(ticks * 1000 / CLK_TCK / count, 3)


def run_once(world: World, variant: str, rundir: str, args: argparse.Namespace
             ) -> dict[str, Any]:
    """
    One timed run of C{variant} in a fresh spool, checked: every message
    at the sink, an empty queue, every session under the expected policy
    source, no policy fetched after the warm-up.
    """
    from twisted_mta.queue import control
    from twisted_mta.queue.spool import Spool

    sink, domains = world.sink, world.domains
    count = domains * args.per_domain
    mta = MTAProcess(rundir, mta_config(variant, world.dns.resolver_address, sink.port,
                                        world.https_port, args.idle, args.outbound),
                     port=free_port())
    world.ca.cert_pem.write_to_path(os.path.join(rundir, "ca.pem"))
    fill(mta.spool, domains, args.per_domain)
    alive = lambda: mta.running or _died(mta)  # noqa: E731
    spy = None
    try:
        rearm(sink, domains)
        mta.start(timeout=60)
        sink.wait(120, 60, alive)
        time.sleep(args.idle + 1.5)  # the warm-up's connections close: each session looks up
        if sink.accepted != sink.target:
            raise BenchError("messages beyond the warm-up reached the sink before the flush")
        rearm(sink, count)
        pids = {"mta": mta.pid, "unbound": world.dns.unbound.process.pid,
                "sink": sink.proc.pid}
        cpu0 = {k: proc_cpu_ticks(p) for k, p in pids.items()}
        split0, busy0 = thread_cpu_split(mta.pid), machine_busy_ticks()
        if args.profile:
            spy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(mta.pid), "--gil", "--threads",
                 "--nonblocking", "--rate", "200", "--format", "raw", "--output",
                 os.path.join(args.profile, os.path.basename(rundir) + ".txt")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached
        control.request(Spool(mta.spool), "flush")
        reached = sink.wait(120, 60, alive)
        offset = time.time() - time.perf_counter()
        cpu = {k: proc_cpu_ticks(p) - cpu0[k] for k, p in pids.items()}
        split = [b - a for a, b in zip(split0, thread_cpu_split(mta.pid))]
        busy = machine_busy_ticks() - busy0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        deadline = time.monotonic() + 30
        while count_files(mta.spool, ("new", "cur")) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = count_files(mta.spool, ("new", "cur", "hold", "corrupt"))
        lines = json_lines(os.path.join(rundir, "events.jsonl"))
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
        mta.cleanup()
    flush = [e["log_time"] for e in lines if e.get("event") == "queue.operator"]
    if not flush:
        raise BenchError(f"no flush in the MTA's log; {mta.describe()}")
    after = [e for e in lines if e.get("log_time", 0) >= flush[0]]
    sessions = [e for e in after if e.get("event") == "outbound.connected"]
    sources = Counter(e.get("source") for e in sessions)
    fetched = sum(e.get("event") == "tls.sts-fetched" for e in after)
    trouble = Counter(e["event"] for e in after if e.get("event") in (
        "outbound.tls_decision", "outbound.host_refused", "outbound.failed", "outbound.error"))
    expected = {"dane"} if variant == "with" else {"default"}
    if left or trouble or set(sources) != expected or fetched:
        raise BenchError(f"{variant}: {left} entries left, {dict(trouble)}, session sources "
                         f"{dict(sources)} (want {expected}), {fetched} policy fetches after "
                         f"the warm-up; see {rundir} (--keep)")
    seconds = reached + offset - flush[0]
    return {
        "variant": variant, "messages": count, "seconds": round(seconds, 4),
        "msg_per_s": round(count / seconds, 1),
        "flush_to_first_s": round(sink.first_at + offset - flush[0], 4),
        "sessions": len(sessions),
        "verified_sessions": sum(bool(e.get("verified")) for e in sessions),
        "dane_sessions": sum(e.get("dane") is not None for e in sessions),
        "cpu_ms_per_msg": {k: ms_per(v, count) for k, v in cpu.items()},
        "mta_threads_ms_per_msg": dict(zip(
            ("reactor_user", "reactor_sys", "pool_user", "pool_sys"),
            (ms_per(t, count) for t in split))),
        "machine_busy_cores": round(busy / CLK_TCK / seconds, 2),
    }


def _died(mta: MTAProcess) -> bool:
    raise BenchError(f"the MTA died; {mta.describe()}")


# -- where the time goes (--profile) ---------------------------------------------------

# py-spy --gil samples (the thread holding the GIL) by what their stack
# contains; the first matching rule wins.
CATEGORIES = (
    ("DNS look-ups (dnspython, tls/dnssec.py, outbound/mx.py)",
     ("(dns/", "/dns/", "twisted_mta/tls/dnssec.py", "twisted_mta/outbound/mx.py")),
    ("MTA-STS cache and policy (tls/sts_cache.py, tls/sts.py)",
     ("twisted_mta/tls/sts_cache.py", "twisted_mta/tls/sts.py")),
    ("DANE match (tls/dane.py)", ("twisted_mta/tls/dane.py",)),
    ("policy engine and published facts (tls/engine.py, policy.py, published.py)",
     ("twisted_mta/tls/engine.py", "twisted_mta/tls/policy.py",
      "twisted_mta/tls/published.py")),
    ("logging", ("twisted/logger/",)),
    ("TLS (pyOpenSSL, twisted/protocols/tls.py, tls/handshake.py)",
     ("OpenSSL/", "twisted/protocols/tls.py", "twisted_mta/tls/handshake.py")),
)
OTHER = "the rest (reactor, TCP, SMTP client, queue, spool, thread hand-offs)"


def gil_profile(path: str, rate: int = 200) -> dict[str, float]:
    """Seconds of GIL holding per category, from py-spy's raw output."""
    seconds: Counter[str] = Counter()
    with open(path, errors="replace") as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not line.startswith("thread (") or not n.isdigit():
                continue  # a frame name with a line break in it
            name = next((c for c, needles in CATEGORIES
                         if any(x in stack for x in needles)), OTHER)
            seconds[name] += int(n) / rate
    return {k: round(v, 2) for k, v in seconds.most_common()}


def lookup_cost(world: World, rounds: int = 3) -> dict[str, dict[str, float]]:
    """
    CPU and wall time of each look-up a session makes, in this process,
    one at a time, against the warm unbound: what each costs the MTA.
    """
    from twisted_mta.config import DNSSettings
    from twisted_mta.outbound.attempt import DNSResolver
    from twisted_mta.tls import dnssec

    address = world.dns.resolver_address
    secure = dnssec.make_resolver((address,), 5.0)
    plain = DNSResolver(DNSSettings(nameservers=(address,), timeout=5))
    port, n = world.sink.port, world.domains
    calls: dict[str, Callable[[int], object]] = {
        "MX (without)": lambda i: plain.mx(domain(i)),
        "A + AAAA (without)": lambda i: plain.addresses(mx_host(i)),
        "MX, DNSSEC-aware (with)": lambda i: dnssec.mx_secure(secure, domain(i)),
        "A + AAAA, DNSSEC-aware (with)": lambda i: dnssec.addresses_secure(secure, mx_host(i)),
        "TLSA (with)": lambda i: dnssec.tlsa(secure, mx_host(i), port),
        "_mta-sts TXT (with)": lambda i: plain.sts_txt(domain(i)),
    }
    out = {}
    for name, call in calls.items():
        for i in range(n):
            call(i)  # unbound's cache
        r0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(rounds):
            for i in range(n):
                call(i)
        r1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        k = 1000 / (rounds * n)
        out[name] = {"user_ms": round((r1.ru_utime - r0.ru_utime) * k, 3),
                     "sys_ms": round((r1.ru_stime - r0.ru_stime) * k, 3),
                     "wall_ms": round((w1 - w0) * k, 3)}
    return out


# -- reporting -------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        rates = [r["msg_per_s"] for r in rs]

        def med(get: Callable[[dict], float]) -> float:
            return statistics.median(get(r) for r in rs)
        out[v] = {
            "runs": len(rs), "msg_per_s": med(lambda r: r["msg_per_s"]),
            "min": min(rates), "max": max(rates), "seconds": med(lambda r: r["seconds"]),
            "sessions": med(lambda r: r["sessions"]),
            "reactor_ms": med(lambda r: r["mta_threads_ms_per_msg"]["reactor_user"]
                              + r["mta_threads_ms_per_msg"]["reactor_sys"]),
            "pool_ms": med(lambda r: r["mta_threads_ms_per_msg"]["pool_user"]
                           + r["mta_threads_ms_per_msg"]["pool_sys"]),
            "unbound_ms": med(lambda r: r["cpu_ms_per_msg"]["unbound"]),
            "sink_ms": med(lambda r: r["cpu_ms_per_msg"]["sink"]),
            "machine_cores": med(lambda r: r["machine_busy_cores"]),
        }
    ratio = out["with"]["msg_per_s"] / out["without"]["msg_per_s"]
    pairs = zip(*([r for r in runs if r["variant"] == v] for v in VARIANTS))
    out["ratio"] = round(ratio, 3)
    out["paired_ratios"] = [round(a["msg_per_s"] / b["msg_per_s"], 3) for a, b in pairs]
    out["target"] = TARGET
    out["pass"] = ratio >= TARGET
    return out


def table(summary: dict[str, Any], messages: int, domains: int) -> str:
    lines = [f"{messages} messages to {domains} domains after a warm-up round, "
             "queue flush -> last message at the sink; medians (msg/s: min-max)", "",
             "| variant | msg/s | seconds | TLS sessions | MTA CPU ms/msg: reactor thread "
             "| I/O pool threads | unbound ms/msg | sink ms/msg | machine busy, cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        s = summary[v]
        lines.append(f"| {v} | {s['msg_per_s']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | "
                     f"{s['seconds']:.2f} | {s['sessions']:.0f} | {s['reactor_ms']:.2f} | "
                     f"{s['pool_ms']:.2f} | {s['unbound_ms']:.2f} | {s['sink_ms']:.2f} | "
                     f"{s['machine_cores']:.2f} |")
    paired = ", ".join(f"{p:.2f}" for p in summary["paired_ratios"])
    verdict = "PASS" if summary["pass"] else "FAIL"
    lines += ["", f"ratio with/without: {summary['ratio']:.2f} (paired {paired}); "
              f"target >= {TARGET}: {verdict}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--domains", type=int, default=100)
    p.add_argument("--per-domain", type=int, default=10, help="measured messages per domain")
    p.add_argument("--repeats", type=int, default=3, help="runs of each variant")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 10 domains x 5, one run each, idle_time 1s")
    p.add_argument("--json", metavar="FILE", help="write every run's figures here")
    p.add_argument("--workdir", default="/var/tmp", help="where the work directory goes")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--outbound", metavar="LINE", action="append", default=[],
                   help="one more [outbound] line in both variants (an experiment)")
    p.add_argument("--profile", metavar="DIR",
                   help="py-spy --gil each measured phase into DIR, and time each look-up "
                   "(slower: not for the figures)")
    args = p.parse_args(argv)
    args.outbound = tuple(args.outbound)
    args.idle = 5.0  # [outbound] idle_time: the default
    if args.quick:
        args.domains, args.per_domain, args.repeats, args.idle = 10, 5, 1, 1.0
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="twisted-mta-published-", dir=args.workdir)
    info = machine_info(workdir)
    world = World(workdir, args.domains)
    runs: list[dict[str, Any]] = []
    profile: dict[str, Any] = {}
    began = time.monotonic()
    try:
        world.start()
        if args.profile:
            os.makedirs(args.profile, exist_ok=True)
            profile["lookup_cost"] = lookup_cost(world)
        for r in range(args.repeats):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                result = run_once(world, variant, os.path.join(workdir, f"{variant}-{r}"), args)
                runs.append(result)
                log(f"run {r + 1}/{args.repeats} {variant}: {result['msg_per_s']:.0f} msg/s, "
                    f"{result['seconds']:.2f} s, {result['sessions']} sessions, "
                    f"MTA {result['cpu_ms_per_msg']['mta']:.2f} ms/msg")
                if args.profile:
                    profile[f"{variant}-{r}"] = gil_profile(
                        os.path.join(args.profile, f"{variant}-{r}.txt"))
    finally:
        world.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(runs)
    print(f"twisted-mta {info['source']}, {info['date']}, {info['nproc']} CPUs "
          f"({info['cpu']}), Python {info['python']}, Twisted {info['twisted']}")
    print(table(summary, args.domains * args.per_domain, args.domains))
    if profile:
        print("\n" + json.dumps(profile, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args),
                       "elapsed_seconds": round(time.monotonic() - began, 1),
                       "summary": summary, "runs": runs, "profile": profile}, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        log(f"error: {e}")
        sys.exit(1)
