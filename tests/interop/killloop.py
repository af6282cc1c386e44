"""
The kill loop (issue 11): our MTA under twistd, a load of SMTP sessions on
loopback sending to local users and to a remote smarthost (a small sink in
this process), SIGKILLs at random instants with restarts, then the count:
every message acknowledged with 250 must be delivered, each local copy
exactly once; a remote copy at least once (remote delivery is at-least-once
across a crash: the window between the server's 250 and our recorded state).

Used by C{tests/interop/test_killloop.py} (20 kills, for CI) and by
C{scripts/soak} (hundreds, with a report).  Blocking and reactor-free, like
the rest of L{tests.interop.support}.
"""

from __future__ import annotations

import collections
import os
import random
import re
import smtplib
import socket
import socketserver
import threading
import time
from typing import Callable

import attrs

from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, MTAProcess, free_port, message_files, wait_for,
)

LOCAL_USERS = ("alice", "bob")
REMOTE = ("one@remote.test", "two@remote.test")
SENDER = "load@client.example.test"
TOKEN = re.compile(rb"token: (kl-[0-9a-z-]+)")


def config(sink_port: int, dns_port: int) -> str:
    """
    The MTA's extra configuration: every remote recipient through the sink
    (an IP literal: no DNS), and DNS, should anything ask, at a loopback
    port where nothing answers; retries after a second, no delay warnings.
    """
    return (
        "[queue]\n"
        "retry_schedule = [1]\n"
        "jitter = 0\n"
        "delay_warning = false\n"
        "\n[dns]\n"
        f'nameservers = ["{LOOPBACK}:{dns_port}"]\n'
        "\n[outbound.smarthost]\n"
        f'host = "[{LOOPBACK}]:{sink_port}"\n'
    )


# -- the remote side: an SMTP sink ------------------------------------------------


class _SinkHandler(socketserver.StreamRequestHandler):
    timeout = 60

    def reply(self, line: bytes) -> None:
        self.wfile.write(line + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        sink: Sink = self.server.sink  # type: ignore[attr-defined]
        rcpts: list[str] = []
        try:
            self.reply(b"220 sink.remote.test ESMTP")
            while True:
                line = self.rfile.readline(4096)
                if not line:
                    return
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    self.reply(b"250 sink.remote.test")
                elif verb == b"MAIL":
                    rcpts = []
                    self.reply(b"250 2.1.0 Ok")
                elif verb == b"RCPT":
                    rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                    self.reply(b"250 2.1.5 Ok")
                elif verb == b"DATA":
                    self.reply(b"354 End data with <CR><LF>.<CR><LF>")
                    data = []
                    while True:
                        line = self.rfile.readline(65536)
                        if not line:
                            return  # the MTA died mid-message: nothing taken
                        if line == b".\r\n":
                            break
                        data.append(line[1:] if line.startswith(b".") else line)
                    sink.took(b"".join(data), rcpts)
                    self.reply(b"250 2.0.0 Ok: taken")
                elif verb == b"QUIT":
                    self.reply(b"221 2.0.0 Bye")
                    return
                else:  # RSET, NOOP
                    self.reply(b"250 2.0.0 Ok")
        except OSError:
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class Sink:
    """
    An SMTP server on loopback that takes every message (no extensions:
    no PIPELINING, no STARTTLS) and counts, per token, the copies each
    recipient got.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.copies: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()
        self._server = _Server((LOOPBACK, self.port), _SinkHandler)
        self._server.sink = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def snapshot(self) -> collections.Counter[tuple[str, str]]:
        """
        The copies so far (the MTA may be delivering while we count).
        """
        with self._lock:
            return collections.Counter(self.copies)

    def took(self, message: bytes, rcpts: list[str]) -> None:
        m = TOKEN.search(message)
        token = m.group(1).decode() if m else "?"
        with self._lock:
            for r in rcpts:
                self.copies[(token, r)] += 1

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# -- the load ---------------------------------------------------------------------


class Load:
    """
    C{clients} threads, each opening SMTP sessions to the MTA one after the
    other (one to five messages each, one to three recipients each, local
    and remote) for as long as it runs.  A message counts as acknowledged
    only when the 250 to its final dot was read; any other ending (the
    MTA killed, a refused connection while it restarts) is retried as a
    new message with a new token.
    """

    def __init__(self, port: int, clients: int, seed: int, name: str = "kl") -> None:
        self.port = port
        self.acked: dict[str, tuple[str, ...]] = {}  # token -> recipients
        self.sent: dict[str, tuple[str, ...]] = {}  # every message whose DATA was sent
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, seed + i, name),
                                          daemon=True) for i in range(clients)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def snapshot(self) -> tuple[dict[str, tuple[str, ...]], dict[str, tuple[str, ...]], int]:
        """
        (acknowledged, sent, client errors) so far.
        """
        with self._lock:
            return dict(self.acked), dict(self.sent), self.errors

    def _run(self, n: int, seed: int, name: str) -> None:
        rng = random.Random(seed)
        counter = 0
        everyone = [f"{u}@{LOCAL_DOMAIN}" for u in LOCAL_USERS] + list(REMOTE)
        while not self._stop.is_set():
            try:
                with smtplib.SMTP(LOOPBACK, self.port, timeout=10) as client:
                    for _ in range(rng.randint(1, 5)):
                        if self._stop.is_set():
                            break
                        counter += 1
                        token = f"{name}-{n}-{counter}"
                        rcpts = tuple(rng.sample(everyone, rng.randint(1, 3)))
                        body = (f"From: <{SENDER}>\r\nTo: <{rcpts[0]}>\r\n"
                                f"Subject: kill loop {token}\r\n"
                                f"Message-ID: <{token}@client.example.test>\r\n\r\n"
                                f"token: {token}\r\n")
                        with self._lock:
                            self.sent[token] = rcpts
                        client.sendmail(SENDER, list(rcpts), body.encode("ascii"))
                        with self._lock:
                            self.acked[token] = rcpts
            except (OSError, smtplib.SMTPException):
                with self._lock:
                    self.errors += 1
                self._stop.wait(0.05)


# -- counting ----------------------------------------------------------------------


def local_copies(mta: MTAProcess) -> collections.Counter[tuple[str, str]]:
    """
    (token, recipient) -> copies, over every local user's Maildir.
    """
    copies: collections.Counter[tuple[str, str]] = collections.Counter()
    for user in LOCAL_USERS:
        for path in message_files(mta.maildir(user)):
            try:
                with open(path, "rb") as f:
                    m = TOKEN.search(f.read())
            except FileNotFoundError:
                continue
            copies[(m.group(1).decode() if m else "?", f"{user}@{LOCAL_DOMAIN}")] += 1
    return copies


@attrs.define
class Report:
    kills: int = 0
    duration: float = 0.0
    drain: float = 0.0
    sent: int = 0
    acked: int = 0
    client_errors: int = 0
    local_expected: int = 0
    remote_expected: int = 0
    local_missing: list = attrs.Factory(list)
    local_duplicates: list = attrs.Factory(list)
    remote_missing: list = attrs.Factory(list)
    remote_duplicates: int = 0
    unacked_delivered: int = 0
    spool_left: dict = attrs.Factory(dict)
    maildir_tmp_left: int = 0

    @property
    def ok(self) -> bool:
        return not (self.local_missing or self.local_duplicates or self.remote_missing
                    or self.spool_left)

    def text(self) -> str:
        lines = [
            f"kills:                      {self.kills}",
            f"duration:                   {self.duration:.1f} s "
            f"(then {self.drain:.1f} s until the queue was empty)",
            f"messages sent (DATA):       {self.sent}",
            f"acknowledged (250):         {self.acked}",
            f"client errors (retried):    {self.client_errors}",
            f"local copies expected:      {self.local_expected}",
            f"  missing:                  {len(self.local_missing)} {self.local_missing[:10]}",
            f"  duplicated:               {len(self.local_duplicates)} "
            f"{self.local_duplicates[:10]}",
            f"remote copies expected:     {self.remote_expected}",
            f"  missing:                  {len(self.remote_missing)} {self.remote_missing[:10]}",
            f"  duplicates (at-least-once): {self.remote_duplicates}",
            f"unacknowledged, delivered:  {self.unacked_delivered}",
            f"left in the spool:          {self.spool_left or 'nothing'}",
            f"files left in Maildir tmp/: {self.maildir_tmp_left}",
            "result:                     " + ("OK" if self.ok else "FAILED"),
        ]
        return "\n".join(lines)


def count(mta: MTAProcess, load: Load, sink: Sink, report: Report) -> Report:
    acked, sent, errors = load.snapshot()
    remote = sink.snapshot()
    local = local_copies(mta)
    report.sent, report.acked, report.client_errors = len(sent), len(acked), errors
    report.local_missing, report.local_duplicates, report.remote_missing = [], [], []
    report.local_expected = report.remote_expected = 0
    for token, rcpts in acked.items():
        for r in rcpts:
            if r.endswith("@" + LOCAL_DOMAIN):
                report.local_expected += 1
                if local[(token, r)] == 0:
                    report.local_missing.append((token, r))
            else:
                report.remote_expected += 1
                if remote[(token, r)] == 0:
                    report.remote_missing.append((token, r))
    report.local_duplicates = sorted(k for k, n in local.items() if n > 1)
    report.remote_duplicates = sum(n - 1 for n in remote.values() if n > 1)
    delivered = {t for t, _ in local} | {t for t, _ in remote}
    report.unacked_delivered = len(delivered - set(acked))
    report.spool_left = mta.spool_contents()
    report.maildir_tmp_left = sum(
        len(os.listdir(os.path.join(mta.maildir(u), "tmp")))
        for u in LOCAL_USERS if os.path.isdir(os.path.join(mta.maildir(u), "tmp")))
    return report


def kill_loop(mta: MTAProcess, load: Load, sink: Sink, kills: int, rng: random.Random,
              run_for: tuple[float, float] = (0.05, 1.0), drain_timeout: float = 60.0,
              progress: Callable[[int], None] | None = None) -> Report:
    """
    With C{mta} running and C{load} started: C{kills} times, let the MTA
    run for a random time in C{run_for} seconds, SIGKILL it and start it
    again.  Then stop the load, wait until every acknowledged message is
    delivered and the spool is empty (or C{drain_timeout}), and count.
    """
    report = Report()
    start = time.monotonic()
    for i in range(kills):
        time.sleep(rng.uniform(*run_for))
        mta.kill()
        report.kills += 1
        mta.start(timeout=30)
        if progress is not None:
            progress(i + 1)
    load.stop()
    report.duration = time.monotonic() - start

    def drained() -> bool:
        count(mta, load, sink, report)
        return not (report.local_missing or report.remote_missing or report.spool_left)

    drain_start = time.monotonic()
    try:
        wait_for(drained, drain_timeout, "", interval=0.25)
    except AssertionError:
        pass  # the report says what is missing
    report.drain = time.monotonic() - drain_start
    return count(mta, load, sink, report)


def closed_port() -> int:
    """
    A loopback UDP port with nobody behind it (for [dns] nameservers).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]
