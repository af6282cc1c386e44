"""
C{scripts/bench published}: what DANE and MTA-STS look-ups cost delivery
(issue 12: at least 0.9x with a warm cache).  twisted-mta against itself:
no Postfix here, the question is the cost of its own checks.

DOMAINS domains (dNNN.pub.test), each with its own MX host, in one zone
signed at run time and served by nsd behind a private validating unbound
(L{tests.interop.dnssec.DNSSECWorld}).  Every MX host has a C{TLSA 3 1 1}
record of the sink's key, every domain an C{_mta-sts} TXT record and an
enforce policy served over HTTPS by the interop tests' policy host; every
MX host is 127.0.0.1, where one C{tlssink} listens on C{[outbound] port}.
"with": C{dane} and C{mta_sts} on; "without": both off (the default
opportunistic policy).  Both ask the same unbound and use STARTTLS to the
same sink, so the difference is the look-ups and the checks.

One run: a fresh spool with one warm-up message per domain (due now) and
PER_DOMAIN per domain due in a day; start; once the sink has the warm-up
(policies fetched and cached, unbound's cache filled) and the MTA's idle
connections have closed, C{queue flush}, timed from the MTA's log line
for the flush to the last message at the sink; then checked: an empty
queue, every session under the expected policy source, no policy fetched
after the warm-up.  Runs alternate with/without.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
import unittest
from collections import Counter
from typing import Any

from .core import (
    BenchError, Peer, build_tlssink, describe_machine, fill_spool, log, machine, machine_cpu,
    report, tree_cpu, wait_until, write_json)

ZONE = "pub.test"
VARIANTS = ("with", "without")
TARGET = 0.9


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
    from tests.interop.test_sts_delivery import POLICY_ADDRESS
    out = [("bogus", "A", "127.0.0.1")]
    for i in range(domains):
        d, mx = f"d{i:03d}", f"mx{i:03d}"
        out += [(d, "MX", f"10 {mx_host(i)}."), (mx, "A", "127.0.0.1"),
                (f"_{port}._tcp.{mx}", "TLSA", f"3 1 1 {spki}"),
                (f"_mta-sts.{d}", "TXT", '"v=STSv1; id=1"'),
                (f"mta-sts.{d}", "A", POLICY_ADDRESS)]
    return out


def mta_config(variant: str, resolver: str, sink_port: int, https_port: int,
               idle: float = 5.0) -> str:
    """
    The MTA's tables beside L{MTAProcess}'s: DNS is the private unbound on
    loopback in both variants (C{[dns] nameservers}); only C{dane} and
    C{mta_sts} differ.
    """
    from tests.interop.support import ONE_ATTEMPT_JSON_LOG
    on = "true" if variant == "with" else "false"
    return "\n".join([
        "[dns]", f'nameservers = ["{resolver}"]', 'timeout = "5s"',
        f'dnssec_secure_name = "{mx_host(0)}"', f'dnssec_bogus_name = "bogus.{ZONE}"', "",
        "[outbound]", f"port = {sink_port}", f'idle_time = "{idle:g}s"', "",
        "[outbound.tls]", 'ca_file = "ca.pem"', f"dane = {on}", f"mta_sts = {on}",
        'sts_ca_file = "ca.pem"', f"sts_port = {https_port}", 'sts_fetch_timeout = "5s"', "",
        "[relay]", 'trusted_networks = ["127.0.0.0/8"]', "", ONE_ATTEMPT_JSON_LOG])


class World:
    """The signed zone, nsd and unbound, the policy host and the sink, for all runs."""

    def __init__(self, workdir: str, domains: int) -> None:
        import trustme
        self.workdir, self.domains = workdir, domains
        self.ca = trustme.CA(organization_name="twisted-mta published benchmark")
        self.dns = self.sink = self.policy_host = None
        self.https_port = 0

    def start(self) -> None:
        from cryptography import x509

        from tests.interop.dnssec import DNSSECWorld, Zone
        from tests.interop.test_publish import spki_sha256
        from tests.interop.test_sts_delivery import POLICY_ADDRESS, PolicyHost
        from tests.interop.tls_peers import free_port_on_all

        leaf = self.ca.issue_cert(f"*.{ZONE}", "127.0.0.1")
        chain = os.path.join(self.workdir, "sink.pem")
        leaf.private_key_and_cert_chain_pem.write_to_path(chain)
        self.sink = Peer(self.workdir, (build_tlssink(self.workdir), chain))
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


def run_once(world: World, variant: str, rundir: str, per_domain: int, idle: float
             ) -> dict[str, Any]:
    from tests.interop.support import MTAProcess, free_port, json_lines
    from twisted_mta.queue import control
    from twisted_mta.queue.spool import Spool

    sink, n = world.sink, world.domains
    count = n * per_domain
    mta = MTAProcess(rundir, mta_config(variant, world.dns.resolver_address, sink.port,
                                        world.https_port, idle), port=free_port())
    world.ca.cert_pem.write_to_path(os.path.join(rundir, "ca.pem"))
    fill_spool(mta.spool, (f"user{i}@{domain(i % n)}" for i in range(n)), 1024, 0.0)
    fill_spool(mta.spool, (f"user{i}@{domain(i % n)}" for i in range(count)), 1024,
               time.time() + 86400)

    def alive() -> None:
        if not mta.running:
            raise BenchError(f"the MTA died; {mta.describe()}")

    try:
        base = sink.messages
        mta.start(timeout=60)
        wait_until(lambda: sink.messages >= base + n, 120, lambda: "warm-up not delivered", alive)
        time.sleep(idle + 1.5)  # the warm-up's connections close: each session looks up
        if sink.messages != base + n:
            raise BenchError("messages beyond the warm-up reached the sink before the flush")
        pids = {"mta": mta.pid, "unbound": world.dns.unbound.process.pid, "sink": sink.pid}
        cpu0 = {k: tree_cpu(p)[0] for k, p in pids.items()}
        busy0 = machine_cpu()
        control.request(Spool(mta.spool), "flush")
        wait_until(lambda: sink.messages >= base + n + count, 300,
                   lambda: f"the sink has {sink.messages - base - n} of {count}", alive)
        reached = time.time()
        cpu = {k: tree_cpu(p)[0] - cpu0[k] for k, p in pids.items()}
        busy = machine_cpu() - busy0
        wait_until(lambda: not mta.spool_contents(("new", "cur", "hold", "corrupt")), 30,
                   lambda: f"left in the spool: {mta.spool_contents()}", alive, 0.1)
        lines = json_lines(os.path.join(rundir, "events.jsonl"))
    finally:
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
    if trouble or set(sources) != expected or fetched:
        raise BenchError(f"{variant}: {dict(trouble)}, session sources {dict(sources)} (want "
                         f"{expected}), {fetched} policy fetches after the warm-up")
    seconds = reached - flush[0]
    return {
        "variant": variant, "messages": count, "seconds": round(seconds, 4),
        "msg_per_s": round(count / seconds, 1), "sessions": len(sessions),
        "verified_sessions": sum(bool(e.get("verified")) for e in sessions),
        "dane_sessions": sum(e.get("dane") is not None for e in sessions),
        "cpu_ms_per_msg": {k: round(v * 1000 / count, 3) for k, v in cpu.items()},
        "machine_busy_cores": round(busy / seconds, 2),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for v in VARIANTS:
        rs = [r for r in runs if r["variant"] == v]
        rates = [r["msg_per_s"] for r in rs]
        out[v] = {"runs": len(rs), "msg_per_s": statistics.median(rates),
                  "min": min(rates), "max": max(rates),
                  "seconds": statistics.median(r["seconds"] for r in rs),
                  "sessions": statistics.median(r["sessions"] for r in rs),
                  **{f"{k}_ms": statistics.median(r["cpu_ms_per_msg"][k] for r in rs)
                     for k in ("mta", "unbound", "sink")},
                  "machine_cores": statistics.median(r["machine_busy_cores"] for r in rs)}
    pairs = zip(*([r for r in runs if r["variant"] == v] for v in VARIANTS))
    out["ratio"] = round(out["with"]["msg_per_s"] / out["without"]["msg_per_s"], 3)
    out["paired_ratios"] = [round(a["msg_per_s"] / b["msg_per_s"], 3) for a, b in pairs]
    out["target"], out["pass"] = TARGET, out["ratio"] >= TARGET
    return out


def table(summary: dict[str, Any], messages: int, domains: int) -> str:
    lines = [f"{messages} messages to {domains} domains after a warm-up round, "
             "queue flush -> last message at the sink; medians (msg/s: min-max)", "",
             "| variant | msg/s | seconds | TLS sessions | MTA CPU ms/msg | unbound ms/msg "
             "| sink ms/msg | machine busy, cores |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        s = summary[v]
        lines.append(f"| {v} | {s['msg_per_s']:.0f} ({s['min']:.0f}-{s['max']:.0f}) | "
                     f"{s['seconds']:.2f} | {s['sessions']:.0f} | {s['mta_ms']:.2f} | "
                     f"{s['unbound_ms']:.2f} | {s['sink_ms']:.2f} | {s['machine_cores']:.2f} |")
    paired = ", ".join(f"{p:.2f}" for p in summary["paired_ratios"])
    lines += ["", f"ratio with/without: {summary['ratio']:.2f} (paired {paired}); "
              f"target >= {TARGET}: {'PASS' if summary['pass'] else 'FAIL'}"]
    return "\n".join(lines)


def main(a: Any) -> int:
    domains, per_domain, idle = (10, 5, 1.0) if a.quick else (a.domains, a.per_domain, 5.0)
    workdir = tempfile.mkdtemp(prefix="bench-published-", dir=a.workdir)
    info = machine(workdir)
    world = World(workdir, domains)
    runs: list[dict[str, Any]] = []
    try:
        world.start()
        for r in range(a.repeats):
            for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                runs.append(run_once(world, variant, os.path.join(workdir, f"{variant}-{r}"),
                                     per_domain, idle))
                log(f"run {r + 1}/{a.repeats} {variant}: {runs[-1]['msg_per_s']:.0f} msg/s, "
                    f"{runs[-1]['sessions']} sessions")
    finally:
        world.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    info["load_after"] = os.getloadavg()
    summary = summarize(runs)
    report("published", "`scripts/bench published`: " + describe_machine(info) + "\n\n"
           + table(summary, domains * per_domain, domains), a.docs)
    write_json(a.json, {"mode": "published", "machine": info, "summary": summary, "runs": runs})
    return 0
