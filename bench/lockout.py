#!/usr/bin/env python3
"""
How many hostile addresses does it take to lock mail out of a listener, and
for how long?  On loopback only, against a fresh twisted-mta per run with
the default [limits] (connections = 500 per listener, connections_per_ip =
20, the default timeouts), with stress-adaptive timeouts on (the default)
or off (stress_timeout = false).

Each run:

  1. Ramp: hostile source addresses 127.0.0.11, .12, ... are added one at a
     time; each opens connections_per_ip connections that then either say
     nothing after the greeting (``idle``) or go as far as the 354 of DATA
     and send one byte every 5 s (``trickle``); or, not in the default
     set, send NOOP every 5 s (``noop``), which no timeout cuts.  After
     each address a normal client from 127.0.0.2 connects: the first time
     it gets 421 instead of 220, mail is locked out, after that many
     addresses.
  2. One-shot attackers (``--attack once``): they hold what they have and do
     not reconnect; a normal client connects every 0.25 s until it gets 220
     again: that is how long the lock-out lasts.
     Persistent attackers (``--attack again``): every hostile connection
     that is closed is opened again at once from the same address; for
     ``--window`` seconds a normal client connects every 0.5 s, and the
     share of its connections that got 220 is reported.

Nothing is delivered anywhere: the only recipient is local, the normal
client only reads the greeting and says QUIT, and [dns] nameservers points
at a loopback port where nothing answers.

    python3 bench/lockout.py                      # the full set, ~35 min
    python3 bench/lockout.py --quick              # one run per cell, short window
    python3 bench/lockout.py --modes idle --stress on --attack once --runs 5

Bounded: at most --max-addresses hostile addresses (x connections_per_ip
connections), each run at most --max-wait seconds after the lock-out.
Needs Linux (all of 127.0.0.0/8 on lo), twisted-mta importable by this
interpreter, and a file-descriptor limit above ~1,100.  See
docs/benchmarks.md ("Lock-out").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

HOST = "127.0.0.1"
NORMAL_CLIENT = "127.0.0.2"
FIRST_HOSTILE = 11  # 127.0.0.11, .12, ...
PER_IP = 20  # the default [limits] connections_per_ip
CONNECTIONS = 500  # the default [limits] connections
TRICKLE_EVERY = 5.0  # seconds between the bytes of a trickle


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


CONFIG = """\
# Written by bench/lockout.py: the default [limits], loopback only.
[server]
hostname = "mta.lockout.test"
spool = "spool"

[[listeners]]
role = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"

[local]
domains = ["lockout.test"]
users = ["user", "postmaster"]

[relay]
trusted_networks = ["127.0.0.1/32"]   # the hostile addresses are not trusted

[dns]
nameservers = ["127.0.0.1:{dns_port}"]   # nothing answers: no remote delivery

[limits]
{limits}
"""


class MTA:
    """
    A fresh twistd mta in its own directory, for one run.
    """

    def __init__(self, workdir: str, stress: bool) -> None:
        self.base = tempfile.mkdtemp(prefix="lockout-", dir=workdir)
        self.port = free_port()
        self.stress = stress
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        limits = "" if self.stress else "stress_timeout = false"
        config = os.path.join(self.base, "mta.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(port=self.port, dns_port=free_port(), limits=limits))
        self.logfile = open(os.path.join(self.base, "twistd.log"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "mta", "--config", config],
            cwd=self.base, stdout=self.logfile, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log_text()[-2000:]
                self.stop()
                raise SystemExit("twisted-mta exited at start-up:\n" + text)
            try:
                with socket.create_connection((HOST, self.port), timeout=2) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise SystemExit("twisted-mta did not greet within 30 s")

    def log_text(self) -> str:
        try:
            with open(os.path.join(self.base, "twistd.log"), errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def stop(self, keep: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.logfile.close()
        if not keep:
            shutil.rmtree(self.base, ignore_errors=True)


class Attack:
    """
    The hostile connections of one run.
    """

    def __init__(self, port: int, mode: str, again: bool) -> None:
        self.port = port
        self.mode = mode
        self.again = again
        self.stopping = False
        self.tasks: list[asyncio.Task] = []
        self.held = 0  # connections holding a slot now
        self.opened = 0  # greeted with 220, in all
        self.refused = 0  # got 421 at the greeting
        self.cuts: list[tuple[float, str]] = []  # (when, the server's last words)

    async def _open(self, src: str):
        return await asyncio.wait_for(
            asyncio.open_connection(HOST, self.port, local_addr=(src, 0)), 10)

    async def _command(self, r, w, line: bytes, expect: bytes) -> bool:
        w.write(line)
        while True:
            reply = await asyncio.wait_for(r.readline(), 30)
            if not reply:
                return False
            if reply[3:4] != b"-":
                return reply.startswith(expect)

    async def _hold(self, r, w) -> str:
        """
        Hold the slot until the server closes; the last line it said.
        """
        last = b""
        while True:
            try:
                data = await asyncio.wait_for(r.read(4096), TRICKLE_EVERY)
            except asyncio.TimeoutError:
                if self.mode == "trickle":
                    w.write(b"x")
                elif self.mode == "noop":
                    w.write(b"NOOP\r\n")
                continue
            if not data:
                return last.decode(errors="replace").strip()
            last = data.splitlines()[-1] if data.strip() else last

    async def connection(self, src: str, ready: asyncio.Future) -> None:
        while not self.stopping:
            try:
                r, w = await self._open(src)
            except (OSError, asyncio.TimeoutError):
                if not ready.done():
                    ready.set_result(False)
                if not self.again:
                    return
                await asyncio.sleep(0.05)
                continue
            holding = False
            try:
                greeting = await asyncio.wait_for(r.readline(), 10)
                if not greeting.startswith(b"220"):
                    self.refused += 1
                else:
                    ok = True
                    if self.mode == "trickle":
                        ok = (await self._command(r, w, b"EHLO hostile.test\r\n", b"250")
                              and await self._command(r, w, b"MAIL FROM:<h@hostile.test>\r\n",
                                                      b"250")
                              and await self._command(r, w, b"RCPT TO:<user@lockout.test>\r\n",
                                                      b"250")
                              and await self._command(r, w, b"DATA\r\n", b"354"))
                    if ok:
                        self.opened += 1
                        self.held += 1
                        holding = True
                        if not ready.done():
                            ready.set_result(True)
                        words = await self._hold(r, w)
                        self.cuts.append((time.monotonic(), words))
            except (OSError, asyncio.TimeoutError, ConnectionError):
                pass
            finally:
                if holding:
                    self.held -= 1
                if not ready.done():
                    ready.set_result(False)
                w.close()
            if not self.again:
                return
            await asyncio.sleep(0.05 if not holding else 0)

    def add_address(self, src: str) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        futures = []
        for _ in range(PER_IP):
            ready = loop.create_future()
            self.tasks.append(asyncio.create_task(self.connection(src, ready)))
            futures.append(ready)
        return futures

    async def stop(self) -> None:
        self.stopping = True
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def probe(port: int) -> bool | None:
    """
    A normal client: True for 220, False for 421 (or any other refusal),
    None when it could not even connect.
    """
    try:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(HOST, port, local_addr=(NORMAL_CLIENT, 0)), 5)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        line = await asyncio.wait_for(r.readline(), 5)
        w.write(b"QUIT\r\n")
        return line.startswith(b"220")
    except (OSError, asyncio.TimeoutError, ConnectionError):
        return None
    finally:
        w.close()


async def one_run(port: int, mode: str, again: bool, args) -> dict[str, Any]:
    attack = Attack(port, mode, again)
    result: dict[str, Any] = {"mode": mode, "attack": "again" if again else "once",
                              "max_wait": args.max_wait}
    t0 = time.monotonic()
    t_lock = None
    try:
        for k in range(1, args.max_addresses + 1):
            await asyncio.gather(*attack.add_address(f"127.0.0.{FIRST_HOSTILE + k - 1}"))
            if await probe(port) is False:
                t_lock = time.monotonic()
                result.update(addresses=k, held_at_lockout=attack.held,
                              ramp_s=round(t_lock - t0, 2))
                break
        if t_lock is None:
            result.update(addresses=None, held_at_lockout=attack.held,
                          ramp_s=round(time.monotonic() - t0, 2))
            return result
        if not again:
            while time.monotonic() - t_lock < args.max_wait:
                if await probe(port):
                    break
                await asyncio.sleep(0.25)
            t_end = time.monotonic()
            result["lockout_s"] = (round(t_end - t_lock, 2)
                                   if t_end - t_lock < args.max_wait else None)
            cut = [when for when, _ in attack.cuts]
            result["first_cut_after_lock_s"] = round(min(cut) - t_lock, 2) if cut else None
        else:
            ok = n = streak = worst = 0
            end = t_lock + args.window
            while time.monotonic() < end:
                got = await probe(port)
                n += 1
                if got:
                    ok += 1
                    streak = 0
                else:
                    streak += 1
                    worst = max(worst, streak)
                await asyncio.sleep(0.5)
            result.update(probes=n, probes_ok=ok, share_ok=round(ok / n, 3) if n else None,
                          longest_refused_streak=worst, reconnects=attack.opened - attack.held)
        words = {}
        for _, w in attack.cuts:
            key = re.sub(r"\s+", " ", w)[:70] or "(closed without a reply)"
            words[key] = words.get(key, 0) + 1
        result["server_said"] = words
        return result
    finally:
        await attack.stop()


def summarise(runs: list[dict[str, Any]]) -> str:
    def spread(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        med = statistics.median(values)
        if len(values) == 1:
            return f"{med:g}"
        return f"{med:g} ({min(values):g}-{max(values):g})"

    out = ["| mode | stress-adaptive | attackers | runs | addresses to lock out | "
           "attack connections then | lock-out lasts, s | normal client's share of 220 "
           "while attacked | its longest run of 421s, tries 0.5 s apart |",
           "|---|---|---|---|---|---|---|---|---|"]
    cells: dict[tuple, list] = {}
    for r in runs:
        cells.setdefault((r["mode"], r["stress"], r["attack"]), []).append(r)
    for (mode, stress, attack), rs in cells.items():
        lock = spread([r.get("lockout_s") for r in rs]) if attack == "once" else "-"
        endless = [r for r in rs if attack == "once" and r.get("addresses")
                   and r.get("lockout_s") is None]
        if endless:
            wait = min(r.get("max_wait", 0) for r in endless)
            lock = (f"> {wait:g} in every run" if len(endless) == len(rs)
                    else f"{lock}; > {wait:g} in {len(endless)} of {len(rs)} runs")
        share = spread([r.get("share_ok") for r in rs]) if attack == "again" else "-"
        streak = (spread([r.get("longest_refused_streak") for r in rs]) if attack == "again"
                  else "-")
        out.append(f"| {mode} | {stress} | {'reconnect' if attack == 'again' else 'once'} | "
                   f"{len(rs)} | {spread([r.get('addresses') for r in rs])} | "
                   f"{spread([r.get('held_at_lockout') for r in rs])} | {lock} | {share} | "
                   f"{streak} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="idle,trickle", help="idle, trickle and/or noop")
    p.add_argument("--stress", default="on,off", help="stress-adaptive timeouts: on, off or both")
    p.add_argument("--attack", default="once,again",
                   help="once: attackers do not reconnect; again: they reconnect at once")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=float, default=60.0,
                   help="seconds of probing against persistent attackers")
    p.add_argument("--max-addresses", type=int, default=40)
    p.add_argument("--max-wait", type=float, default=420.0,
                   help="give up waiting for the end of a lock-out after this many seconds")
    p.add_argument("--workdir", default="/var/tmp")
    p.add_argument("--json", metavar="FILE")
    p.add_argument("--keep", action="store_true", help="keep each run's directory and log")
    p.add_argument("--quick", action="store_true", help="one run per cell, a 20 s window")
    p.add_argument("--summarise", metavar="FILE", help="only print the table of a --json file")
    args = p.parse_args()
    if args.summarise:
        with open(args.summarise) as f:
            print(summarise(json.load(f)["runs"]))
        return
    if args.quick:
        args.runs, args.window = 1, 20.0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = (args.max_addresses * PER_IP + 200) * 2
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    runs = []
    cells = [(m, s, a) for a in args.attack.split(",") for m in args.modes.split(",")
             for s in args.stress.split(",")]
    for i in range(args.runs):
        for mode, stress, attack in cells:
            mta = MTA(args.workdir, stress == "on")
            mta.start()
            try:
                result = asyncio.run(one_run(mta.port, mode, attack == "again", args))
            finally:
                text = mta.log_text()
                mta.stop(keep=args.keep)
            result.update(stress=stress, run=i + 1,
                          stress_events=text.count("listener under stress"),
                          tracebacks=text.count("Traceback"))
            runs.append(result)
            log(json.dumps(result))
    print(summarise(runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
    main()
