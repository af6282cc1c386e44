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
 3. tls (only with C{--tests ...,tls}): twisted-mta alone, N queued
    messages delivered to one STARTTLS-capable peer through
    C{[outbound.smarthost]}, once with C{tls_policy = "strict"} (verified
    against a trustme CA, certificate for IP 127.0.0.1) and once with
    C{"none"}, alternating; the ratio of the two rates against 0.8.  The
    peer is C{tlssink} (a small C sink with STARTTLS, L{TLSSINK_C}, built
    at run time) or, with C{--tls-peer postfix}, a private Postfix that
    discards.  Every run checks twistd's log and the peer's record: every
    session verified TLS (or cleartext), N messages, an empty spool.

    python3 bench/outbound.py                  # 10,000 x 1 KiB, 3 repeats, ~5 minutes
    python3 bench/outbound.py --tests tls --repeats 5   # verified TLS vs cleartext, ~3-4 minutes
    python3 bench/outbound.py --quick          # 2,000 messages, one repeat
    python3 bench/outbound.py --json out.json --profile prof/   # + a py-spy run
    PYTHONPATH=/var/tmp/clone python3 bench/outbound.py   # measure another checkout

Needs what bench/inbound.py needs (Linux, root, the C{postfix} package for
C{postfix}, C{postsuper}, C{smtp-source} and C{smtp-sink}; twisted-mta
importable), C{py-spy} for C{--profile}, and for the tls test C{trustme}
and (for tlssink) a C compiler with libssl-dev.  See docs/benchmarks.md.
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
from typing import Any, Iterable

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
TESTS = ("outbound", "e2e", "tls")
DEFAULT_TESTS = ("outbound", "e2e")
SERVERS = ("twisted-mta", "postfix")
TLS_VARIANTS = ("cleartext", "tls")  # the TLS test's two twisted-mta runs per repeat
TLS_TARGET = 0.8  # verified-TLS msg/s >= 0.8 x cleartext msg/s, same peer, same run

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

[dns]
# all mail goes to the smarthost; nothing may ask the system's resolver
nameservers = ["127.0.0.1:9"]

[outbound.smarthost]
host = "[127.0.0.1]:{sink}"
"""


class TwistedOut(inbound.TwistedMTA):
    """
    twisted-mta with every remote domain going to the sink as smarthost;
    C{start} returns as soon as the process is launched (the caller times
    the banner with L{wait_started}).
    """

    def __init__(self, base: str, sink_port: int, extra_config: str = "") -> None:
        super().__init__(base)
        self.sink_port = sink_port
        self.extra_config = extra_config  # appended: smarthost keys, then more tables
        self.started_at = 0.0

    def start(self) -> None:
        self.port = free_port()
        config = os.path.join(self.base, "mta.toml")
        with open(config, "w") as f:
            f.write(TWISTED_CONFIG.format(port=self.port, sink=self.sink_port)
                    + self.extra_config)
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
        Write C{count} entries, due now, into the (fresh) spool.
        """
        write_entries(self.spool, ((recipient(i % recipients), 0.0) for i in range(count)),
                      size)

    def backlog_left(self) -> int:
        return count_files(self.spool, ("new", "cur"))

    def cpu_ticks(self) -> int:
        return proc_cpu_ticks(self.pid)


def write_entries(spool_path: str, entries: Iterable[tuple[str, float]], size: int) -> None:
    """
    Write one queue entry per C{(recipient, next_attempt)} into the spool
    at C{spool_path} (no MTA running) with the spool API: envelope header
    first, then the message with CRLF line ends; each commit fsyncs the
    file and new/ (the spool runs inline here).
    """
    from twisted_mta.model import Envelope, Recipient
    from twisted_mta.queue.spool import Spool

    spool = Spool(spool_path)
    spool.lock()
    try:
        now = time.time()
        for i, (rcpt, when) in enumerate(entries):
            writer = spool.new_message()
            message = make_message(writer.queue_id, rcpt, size, now)
            env = Envelope(queue_id=writer.queue_id, sender=SENDER,
                           recipients=(Recipient(address=rcpt),), arrival=now,
                           next_attempt=when, size=len(message))
            writer.write(env.to_header())
            writer.write(message)
            outcome: list[Any] = []
            writer.commit(env).addBoth(outcome.append)
            if not outcome or not isinstance(outcome[0], Envelope):
                raise BenchError(f"spool commit of entry {i} did not succeed: {outcome!r}")
    finally:
        spool.unlock()


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
""" + inbound.private_main_cf("postfix.bench.test") + """\
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


# -- the TLS test: a peer that speaks STARTTLS --------------------------------


PEER_NAME = "peer.bench.test"


def tls_material(directory: str) -> dict[str, str]:
    """
    A throw-away CA and a certificate for the peer, made with trustme:
    subjectAltName IP 127.0.0.1 (the smarthost twisted-mta connects to, and
    the name it verifies) and DNS peer.bench.test.  Returns the paths of
    the CA certificate (for [outbound.tls] ca_file) and of the peer's key
    and chain in one PEM file (for Postfix's smtpd_tls_chain_files).
    """
    import trustme

    ca = trustme.CA(organization_name="twisted-mta benchmark CA")
    cert = ca.issue_cert("127.0.0.1", PEER_NAME)
    paths = {"ca": os.path.join(directory, "bench-ca.pem"),
             "chain": os.path.join(directory, "peer-key-and-chain.pem")}
    ca.cert_pem.write_to_path(paths["ca"])
    cert.private_key_and_cert_chain_pem.write_to_path(paths["chain"])
    os.chmod(paths["ca"], 0o644)
    os.chmod(paths["chain"], 0o600)  # read by smtpd as root, before it drops privileges
    return paths


PEER_MAIN_CF = """\
# Written by bench/outbound.py: the TLS test's peer.  It accepts mail for
# any domain from loopback, offers STARTTLS with a certificate for
# 127.0.0.1 / peer.bench.test, and discards what it accepted (no onward
# delivery).  Queue files are still written and fsync'd (on tmpfs here).
""" + inbound.private_main_cf("peer.bench.test") + """\
default_transport = discard
relay_transport = discard
smtpd_tls_security_level = may
smtpd_tls_chain_files = {chain}
smtpd_tls_loglevel = 1
"""

# bench/inbound.py's master.cf plus tlsmgr (smtpd's TLS needs it).
PEER_MASTER_CF = inbound.POSTFIX_MASTER_CF + \
    "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"


class PeerPostfix(inbound.Postfix):
    """
    The TLS test's peer: a private Postfix (bench/inbound.py's start, stop
    and /proc sampling) with L{PEER_MAIN_CF}.  Its log is tailed by
    L{PeerLog}.
    """

    INBOUND = ("smtpd", "cleanup")

    def __init__(self, base: str, chain: str) -> None:
        super().__init__(base)
        self.chain = chain

    def postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        if args[:1] == ("start",):
            # Postfix.start wrote inbound's main.cf and master.cf; replace them.
            with open(os.path.join(self.conf, "main.cf"), "w") as f:
                f.write(PEER_MAIN_CF.format(queue=self.queue, data=self.data,
                                            log=self.logdir, chain=self.chain))
            with open(os.path.join(self.conf, "master.cf"), "w") as f:
                f.write(PEER_MASTER_CF.format(port=self.port))
        return super().postfix(*args, check=check)

    def backlog_left(self) -> int:
        return count_files(self.queue, ("incoming", "active", "deferred", "hold"))


class PeerLog:
    """
    Follows the peer's maillog (Postfix's postlogd writes it) from a thread,
    every 10 ms, and counts:

     - C{accepted}: C{cleanup} lines C{message-id=<...@bench.test>}, one per
       message of ours the peer took in (logged while it receives the
       header, a few ms before its 250); the first and the C{target}-th are
       timestamped when read;
     - C{discarded}: C{discard} lines C{status=sent};
     - C{tls}: smtpd's C{... TLS connection established from ...};
     - C{connects}: smtpd's C{connect from} (the banner probe included).
    """

    def __init__(self, path: str, target: int) -> None:
        self.path = path
        self.target = target
        self.accepted = 0
        self.ids: set[str] = set()
        self.discarded = 0
        self.tls = 0
        self.tls_lines: list[str] = []
        self.connects = 0
        self.first_at: float | None = None
        self.reached_at: float | None = None
        self.last_change = time.monotonic()
        self._reached = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    _MSGID = re.compile(r"/cleanup\[\d+\]: \w+: message-id=<([^>]*@bench\.test)>")

    def _line(self, line: str, now: float) -> None:
        m = self._MSGID.search(line)
        if m:
            self.accepted += 1
            self.ids.add(m.group(1))
            self.last_change = time.monotonic()
            if self.first_at is None:
                self.first_at = now
            if self.accepted >= self.target and self.reached_at is None:
                self.reached_at = now
                self._reached.set()
        elif "/discard[" in line and "status=sent" in line:
            self.discarded += 1
        elif "TLS connection established from" in line:
            self.tls += 1
            if len(self.tls_lines) < 3:
                self.tls_lines.append(line.strip().partition("]: ")[2])
        elif "/smtpd[" in line and ": connect from " in line:
            self.connects += 1

    def _run(self) -> None:
        f = None
        buf = ""
        while not self._stop.is_set():
            if f is None:
                try:
                    f = open(self.path, errors="replace")
                except FileNotFoundError:
                    self._stop.wait(0.01)
                    continue
            chunk = f.read()
            if chunk:
                now = time.perf_counter()
                buf += chunk
                lines = buf.split("\n")
                buf = lines.pop()
                for line in lines:
                    self._line(line, now)
            else:
                self._stop.wait(0.01)
        if f is not None:
            for line in (buf + f.read()).split("\n"):
                if line:
                    self._line(line, time.perf_counter())
            f.close()

    def wait(self, timeout: float, stall: float = 60.0, check=None) -> float:
        deadline = time.monotonic() + timeout
        while not self._reached.wait(0.05):
            if check is not None:
                check()
            now = time.monotonic()
            if now > deadline or now - self.last_change > stall:
                raise BenchError(f"the peer has {self.accepted} of {self.target} messages "
                                 f"after {timeout if now > deadline else stall:.0f}s"
                                 + (" without progress" if now <= deadline else ""))
        assert self.reached_at is not None
        return self.reached_at


class PostfixPeer:
    """
    The TLS test's peer as a private Postfix (L{PeerPostfix}) followed
    through its log (L{PeerLog}).
    """

    kind = "postfix"

    def __init__(self, base: str, material: dict[str, str]) -> None:
        self.server = PeerPostfix(base, material["chain"])
        self.log: PeerLog | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def first_at(self) -> float | None:
        return self.log.first_at

    def start(self, target: int) -> None:
        self.server.start()
        self.log = PeerLog(os.path.join(self.server.logdir, "maillog"), target)
        self.log.start()

    def wait(self, timeout: float, stall: float, check) -> float:
        return self.log.wait(timeout, stall, check)

    def alive(self) -> bool:
        return inbound.alive(self.server.master_pid)

    def cpu_ticks(self) -> int:
        return self.server.cpu_ticks()

    def settled(self, count: int) -> bool:
        return self.log.discarded >= count

    def log_tail(self) -> str:
        return self.server.log_tail()

    def stop(self) -> None:
        try:
            self.server.stop()
        finally:
            if self.log is not None:
                self.log.stop()

    def facts(self) -> dict[str, Any]:
        lg = self.log
        return {"peer_accepted": lg.accepted, "peer_distinct": len(lg.ids),
                "peer_discarded": lg.discarded, "peer_tls_sessions": lg.tls,
                "peer_connects": lg.connects - 1,  # minus the banner probe
                "peer_tls_example": lg.tls_lines[0] if lg.tls_lines else None}


# tlssink: compiled at run time (gcc, libssl-dev) into the peer directory.
TLSSINK_C = r"""#define _GNU_SOURCE
/* tlssink: a minimal SMTP sink that offers STARTTLS (bench/outbound.py's
 * TLS test).  One thread, epoll, non-blocking sockets.  Accepts any
 * EHLO/MAIL/RCPT, takes DATA up to the lone ".", answers 250 and forgets the
 * message.  Events on stdout, one line each, unbuffered:
 *   S <sessions>                      a connection was accepted
 *   T <tls sessions> <version> <cipher>  a STARTTLS handshake completed
 *   M <messages>                      a message's final dot was received
 * usage: tlssink PORT KEY_AND_CHAIN.pem
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <openssl/ssl.h>
#include <openssl/err.h>

#define INBUF 65536
#define OUTBUF 8192

struct conn {
    int fd;
    SSL *ssl;
    int handshaking;       /* SSL_accept not finished */
    int want_write;        /* waiting for EPOLLOUT */
    int data;              /* inside DATA */
    int bol;               /* (DATA) at the beginning of a line */
    int closing;           /* close once the output is flushed */
    size_t inlen, outlen, outoff;
    char in[INBUF];
    char out[OUTBUF];
};

static SSL_CTX *ctx;
static int ep;
static unsigned long sessions, tls_sessions, messages;

static void event(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#include <stdarg.h>
static void event(const char *fmt, ...) {
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0 && write(1, line, (size_t)n) < 0) { /* the reader went away */ }
}

static void arm(struct conn *c) {
    struct epoll_event ev = {.events = EPOLLIN | (c->want_write ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void drop(struct conn *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    if (c->ssl) SSL_free(c->ssl);
    close(c->fd);
    free(c);
}

static void reply(struct conn *c, const char *s) {
    size_t n = strlen(s);
    if (c->outlen + n > OUTBUF) return;  /* cannot happen with these replies */
    memcpy(c->out + c->outlen, s, n);
    c->outlen += n;
}

/* Send what is pending; 0 ok (maybe partial, want_write set), -1 dead. */
static int flush(struct conn *c) {
    while (c->outoff < c->outlen) {
        size_t left = c->outlen - c->outoff;
        if (c->ssl) {
            int r = SSL_write(c->ssl, c->out + c->outoff, (int)left);
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    c->want_write = 1;
                    arm(c);
                    return 0;
                }
                return -1;
            }
            c->outoff += (size_t)r;
        } else {
            ssize_t r = send(c->fd, c->out + c->outoff, left, MSG_NOSIGNAL);
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    c->want_write = 1;
                    arm(c);
                    return 0;
                }
                return -1;
            }
            c->outoff += (size_t)r;
        }
    }
    c->outlen = c->outoff = 0;
    if (c->want_write) {
        c->want_write = 0;
        arm(c);
    }
    return 0;
}

static int starttls(struct conn *c);

static int prefix(const char *line, size_t n, const char *cmd) {
    size_t k = strlen(cmd);
    return n >= k && strncasecmp(line, cmd, k) == 0;
}

/* One complete line (without CRLF); returns -1 to close now, 1 after STARTTLS. */
static int command(struct conn *c, const char *line, size_t n) {
    if (c->data) {
        if (n == 1 && line[0] == '.') {
            c->data = 0;
            messages++;
            char buf[80];
            snprintf(buf, sizeof buf, "250 2.0.0 Ok: queued as %lu\r\n", messages);
            reply(c, buf);
            event("M %lu\n", messages);
        }
        return 0;
    }
    if (prefix(line, n, "EHLO")) {
        reply(c, "250-peer.bench.test\r\n250-PIPELINING\r\n250-SIZE 104857600\r\n"
                 "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n");
        reply(c, c->ssl ? "250 SMTPUTF8\r\n" : "250-SMTPUTF8\r\n250 STARTTLS\r\n");
    } else if (prefix(line, n, "HELO")) {
        reply(c, "250 peer.bench.test\r\n");
    } else if (prefix(line, n, "STARTTLS") && !c->ssl) {
        reply(c, "220 2.0.0 Ready to start TLS\r\n");
        return 1;
    } else if (prefix(line, n, "MAIL")) {
        reply(c, "250 2.1.0 Ok\r\n");
    } else if (prefix(line, n, "RCPT")) {
        reply(c, "250 2.1.5 Ok\r\n");
    } else if (prefix(line, n, "DATA")) {
        reply(c, "354 End data with <CR><LF>.<CR><LF>\r\n");
        c->data = 1;
        c->bol = 1;
    } else if (prefix(line, n, "RSET") || prefix(line, n, "NOOP")) {
        reply(c, "250 2.0.0 Ok\r\n");
    } else if (prefix(line, n, "QUIT")) {
        reply(c, "221 2.0.0 Bye\r\n");
        c->closing = 1;
    } else {
        reply(c, "502 5.5.2 Error: command not recognized\r\n");
    }
    return 0;
}

/* Handle every complete line in the input buffer. */
static int process(struct conn *c) {
    size_t start = 0;
    for (;;) {
        char *nl = memchr(c->in + start, '\n', c->inlen - start);
        if (!nl) break;
        size_t end = (size_t)(nl - c->in);
        size_t n = end - start;
        if (n && c->in[start + n - 1] == '\r') n--;
        int r = command(c, c->in + start, n);
        start = end + 1;
        if (r < 0) return -1;
        if (r == 1) {  /* STARTTLS: anything pipelined after it is discarded */
            c->inlen = 0;
            if (flush(c) < 0) return -1;
            return starttls(c);
        }
        if (c->closing) break;
    }
    memmove(c->in, c->in + start, c->inlen - start);
    c->inlen -= start;
    if (c->inlen == INBUF) {  /* a line longer than the buffer */
        if (!c->data) return -1;
        c->inlen = 0;  /* (DATA) skip it */
    }
    return 0;
}

static int handshake(struct conn *c) {
    int r = SSL_accept(c->ssl);
    if (r == 1) {
        c->handshaking = 0;
        tls_sessions++;
        event("T %lu %s %s\n", tls_sessions, SSL_get_version(c->ssl),
              SSL_CIPHER_get_name(SSL_get_current_cipher(c->ssl)));
        if (c->want_write) { c->want_write = 0; arm(c); }
        return 0;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ) {
        if (c->want_write) { c->want_write = 0; arm(c); }
        return 0;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
        c->want_write = 1;
        arm(c);
        return 0;
    }
    return -1;
}

static int starttls(struct conn *c) {
    c->ssl = SSL_new(ctx);
    if (!c->ssl) return -1;
    SSL_set_mode(c->ssl, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_set_fd(c->ssl, c->fd);
    c->handshaking = 1;
    return handshake(c);
}

/* Read what is there; -1 to close. */
static int readable(struct conn *c) {
    for (;;) {
        if (c->handshaking) {
            if (handshake(c) < 0) return -1;
            if (c->handshaking) return 0;
        }
        size_t room = INBUF - c->inlen;
        ssize_t r;
        if (c->ssl) {
            int k = SSL_read(c->ssl, c->in + c->inlen, (int)room);
            if (k <= 0) {
                int e = SSL_get_error(c->ssl, k);
                if (e == SSL_ERROR_WANT_READ) break;
                if (e == SSL_ERROR_WANT_WRITE) { c->want_write = 1; arm(c); break; }
                return -1;
            }
            r = k;
        } else {
            r = recv(c->fd, c->in + c->inlen, room, 0);
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK) break;
                return -1;
            }
            if (r == 0) return -1;
        }
        c->inlen += (size_t)r;
        int had_ssl = c->ssl != NULL;
        if (process(c) < 0) return -1;
        if (!had_ssl && c->ssl) continue;  /* STARTTLS started: read the handshake */
        if (c->closing) break;
    }
    if (flush(c) < 0) return -1;
    if (c->closing && c->outlen == 0) return -1;
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PORT KEY_AND_CHAIN.pem\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, argv[2]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[2], SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[1]))};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(ls, 4096) < 0) {
        perror("bind/listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct conn *c = evs[i].data.ptr;
            if (!c) {
                for (;;) {
                    int fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (fd < 0) break;
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    c = calloc(1, sizeof *c);
                    c->fd = fd;
                    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
                    sessions++;
                    event("S %lu\n", sessions);
                    reply(c, "220 peer.bench.test ESMTP tlssink\r\n");
                    if (flush(c) < 0) drop(c);
                }
                continue;
            }
            int dead = 0;
            if (evs[i].events & (EPOLLERR | EPOLLHUP) && !(evs[i].events & EPOLLIN)) dead = 1;
            if (!dead && (evs[i].events & EPOLLOUT)) {
                if (c->handshaking) {
                    if (handshake(c) < 0) dead = 1;
                } else if (flush(c) < 0) {
                    dead = 1;
                } else if (c->closing && c->outlen == 0) {
                    dead = 1;
                }
            }
            if (!dead && (evs[i].events & EPOLLIN)) {
                if (readable(c) < 0) dead = 1;
            }
            if (dead) drop(c);
        }
    }
}
"""


def build_tlssink(directory: str) -> str:
    src = os.path.join(directory, "tlssink.c")
    binary = os.path.join(directory, "tlssink")
    with open(src, "w") as f:
        f.write(TLSSINK_C)
    p = subprocess.run(["cc", "-O2", "-o", binary, src, "-lssl", "-lcrypto"],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise BenchError("cannot build tlssink (needs a C compiler and libssl-dev; or use "
                         f"--tls-peer postfix):\n{p.stderr[-2000:]}")
    return binary


class SinkPeer:
    """
    The TLS test's peer as C{tlssink} (L{TLSSINK_C}): like smtp-sink, one
    process, one thread, and it forgets each message at the final dot, but
    it offers STARTTLS.  A thread reads its event lines (S, T, M) and
    timestamps the first message and the C{target}-th.
    """

    kind = "tlssink"

    def __init__(self, base: str, material: dict[str, str]) -> None:
        self.base = base
        self.binary = material["tlssink"]
        self.chain = material["chain"]
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.accepted = self.tls = self.connects = 0
        self.tls_lines: list[str] = []
        self.target = 0
        self.first_at: float | None = None
        self.reached_at: float | None = None
        self.last_change = time.monotonic()
        self._reached = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.errlog = open(os.path.join(self.base, "tlssink.err"), "wb")
        self.proc = subprocess.Popen([self.binary, str(self.port), self.chain],
                                     stdout=subprocess.PIPE, stderr=self.errlog,
                                     stdin=subprocess.DEVNULL)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        poll_banner(self.port, 10, self.alive)

    def _read(self) -> None:
        for line in self.proc.stdout:
            now = time.perf_counter()
            kind, _, rest = line.decode(errors="replace").strip().partition(" ")
            if kind == "M":
                self.accepted = int(rest)
                self.last_change = time.monotonic()
                if self.first_at is None:
                    self.first_at = now
                if self.accepted >= self.target and self.reached_at is None:
                    self.reached_at = now
                    self._reached.set()
            elif kind == "T":
                self.tls = int(rest.split()[0])
                if len(self.tls_lines) < 3:
                    self.tls_lines.append(rest.partition(" ")[2])
            elif kind == "S":
                self.connects = int(rest)

    def wait(self, timeout: float, stall: float, check) -> float:
        deadline = time.monotonic() + timeout
        while not self._reached.wait(0.05):
            if check is not None:
                check()
            now = time.monotonic()
            if now > deadline or now - self.last_change > stall:
                raise BenchError(f"tlssink has {self.accepted} of {self.target} messages "
                                 f"after {timeout if now > deadline else stall:.0f}s"
                                 + (" without progress" if now <= deadline else ""))
        return self.reached_at

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_ticks(self) -> int:
        return proc_cpu_ticks(self.proc.pid)

    def settled(self, count: int) -> bool:
        return True

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.base, "tlssink.err"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

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

    def facts(self) -> dict[str, Any]:
        return {"peer_accepted": self.accepted, "peer_distinct": None, "peer_discarded": None,
                "peer_tls_sessions": self.tls, "peer_connects": self.connects - 1,
                "peer_tls_example": self.tls_lines[0] if self.tls_lines else None}


PEERS = {"tlssink": SinkPeer, "postfix": PostfixPeer}


# The twisted-mta side of the TLS test, appended to TWISTED_CONFIG (whose
# last table is [outbound.smarthost]).  "tls": STARTTLS required and the
# certificate verified against the trustme CA for the name 127.0.0.1 (the
# smarthost is an IP literal: PolicyCreator expects that IP in the
# certificate's IP SANs); tls_fallback = "never", so a failed verification
# defers instead of falling back to cleartext.  "cleartext": policy none.
TLS_VARIANT_CONFIG = {
    "tls": 'tls_policy = "strict"\ntls_fallback = "never"\n',
    "cleartext": 'tls_policy = "none"\n',
}
TLS_COMMON_CONFIG = '\n[outbound.tls]\nca_file = "{ca}"\n'


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


def run_tls(variant: str, rundir: str, peerdir: str, material: dict[str, str],
            args: argparse.Namespace, profile_to: str | None = None) -> dict[str, Any]:
    """
    One run of the TLS test: a fresh peer (C{--tls-peer}), a fresh spool of
    N entries, then twistd launched with the smarthost at the peer under
    C{variant}'s policy; timed until the peer has N messages, then checked:
    the spool empties, the peer took exactly N (Postfix: N distinct
    Message-IDs, N discarded), and every session was verified TLS on both
    ends (twistd's log, the peer's record of its handshakes), or cleartext.
    """
    count, size = args.messages, args.size
    base = tempfile.mkdtemp(prefix=f"tls-{variant}-", dir=rundir)
    os.chmod(base, 0o755)
    pbase = tempfile.mkdtemp(prefix=f"peer-{variant}-", dir=peerdir)
    os.chmod(pbase, 0o755)
    result: dict[str, Any] = {"test": "tls", "server": variant, "peer": args.tls_peer,
                              "messages": count, "size": size}
    peer = PEERS[args.tls_peer](pbase, material)
    server: TwistedOut | None = None
    sampler: Sampler | None = None
    pyspy: subprocess.Popen | None = None
    try:
        peer.start(count)
        server = TwistedOut(base, peer.port, TLS_VARIANT_CONFIG[variant]
                            + TLS_COMMON_CONFIG.format(ca=material["ca"]))
        t = time.perf_counter()
        server.fill(count, size, args.recipients)
        result["fill_seconds"] = round(time.perf_counter() - t, 2)
        sampler = Sampler(server, 0.25)
        busy0 = inbound.machine_busy_ticks()
        peer_cpu0 = peer.cpu_ticks()
        # -- the timed part: from twistd's launch --
        server.start()
        t0 = server.started_at
        sampler.start()
        t_banner = server.wait_started()
        result["startup_seconds"] = round(t_banner - t0, 3)
        reactor0 = server.reactor_cpu_ticks()
        if profile_to:
            pyspy = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--rate", str(args.pyspy_rate),
                 "--idle", "--threads", "--nonblocking", "--format", "raw", "-o", profile_to],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)

        def check() -> None:
            if server.proc.poll() is not None:
                raise BenchError("twistd exited during the run:\n" + server.log_tail())
            if not peer.alive():
                raise BenchError(f"the peer ({peer.kind}) died:\n" + peer.log_tail())

        t_end = peer.wait(timeout=900, stall=60, check=check)
        cpu1 = server.cpu_ticks()
        reactor1 = server.reactor_cpu_ticks()
        peer_cpu1 = peer.cpu_ticks()
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
        assert peer.first_at is not None
        seconds = t_end - t0
        window = max(1e-6, t_end - peer.first_at)
        delivering = max(1e-6, t_end - t_banner)
        result.update(
            seconds=round(seconds, 3),
            msgs_per_s=round(count / seconds, 1),  # from twistd's launch
            first_at_peer_seconds=round(peer.first_at - t0, 3),
            # first to N-th message at the peer: delivery alone (the quantity compared)
            window_msgs_per_s=round((count - 1) / window, 1),
            after_startup_msgs_per_s=round(count / delivering, 1),
            cpu_ms_per_msg=round((cpu1 * 1000 / CLK_TCK) / count, 3),  # from launch
            reactor_busy_pct=round(100.0 * (reactor1 - reactor0) / CLK_TCK / delivering, 1),
            reactor_cpu_ms_per_msg=round((reactor1 - reactor0) * 1000 / CLK_TCK / count, 3),
            peer_cpu_ms_per_msg=round((peer_cpu1 - peer_cpu0) * 1000 / CLK_TCK / count, 3),
            machine_cpu_ms_per_msg=round(busy * 1000 / count, 3),
            machine_busy_pct=round(100.0 * busy / seconds / (os.cpu_count() or 1), 1),
        )
        result["other_cpu_ms_per_msg"] = _other_cpu(result)
        sampler.stop()
        # -- checks --
        errors = []
        deadline = time.monotonic() + 60
        while (server.backlog_left() or not peer.settled(count)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        left = server.backlog_left()
        if left:
            errors.append(f"{left} entries still in twisted-mta's spool")
        result["peak_rss_mb"] = server.memory()["peak_rss_mb"]
        server.stop()  # its QUITs end the peer's sessions; its log is complete
        with open(os.path.join(base, "twistd.log"), errors="replace") as f:
            log_text = f.read()
        sessions = log_text.count("outbound: session with ")
        verified = log_text.count("certificate verified; policy strict")
        plain = log_text.count("no TLS; policy none")
        fallbacks = log_text.count("fallback for")
        time.sleep(0.5)
        peer.stop()
        facts = peer.facts()
        result.update(sessions=sessions, sessions_verified=verified, sessions_cleartext=plain,
                      **{k: v for k, v in facts.items() if v is not None})
        m = re.search(r"session with \S+ \((TLS[^;]*)", log_text)
        if m:
            result["tls_example"] = m.group(1)
        if facts["peer_accepted"] != count:
            errors.append(f"the peer received {facts['peer_accepted']} messages for {count}")
        if facts["peer_distinct"] is not None and facts["peer_distinct"] != count:
            errors.append(f"the peer logged {facts['peer_distinct']} distinct Message-IDs "
                          f"for {count}")
        if facts["peer_discarded"] is not None and facts["peer_discarded"] != count:
            errors.append(f"the peer discarded {facts['peer_discarded']} of {count}")
        if sessions == 0 or sessions != facts["peer_connects"]:
            errors.append(f"{sessions} sessions in twistd's log, {facts['peer_connects']} "
                          f"at the peer")
        if fallbacks:
            errors.append(f"{fallbacks} TLS fallbacks in twistd's log")
        tls_peer = facts["peer_tls_sessions"]
        if variant == "tls" and not (verified == sessions == tls_peer):
            errors.append(f"{sessions} sessions, {verified} with a verified certificate, "
                          f"{tls_peer} TLS sessions at the peer")
        if variant == "cleartext" and not (plain == sessions and tls_peer == 0):
            errors.append(f"{sessions} sessions, {plain} cleartext, {tls_peer} TLS sessions "
                          f"at the peer")
        if errors:
            result["error"] = "; ".join(errors)
    except BenchError as e:
        result["error"] = str(e)[:2000]
        log(f"  ERROR: {e}")
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if pyspy is not None and pyspy.poll() is None:
            pyspy.kill()
            pyspy.wait()
        try:
            if server is not None:
                server.stop()
        finally:
            peer.stop()
            if not args.keep:
                shutil.rmtree(base, ignore_errors=True)
                shutil.rmtree(pbase, ignore_errors=True)
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


def tls_progress(r: dict[str, Any]) -> str:
    if "msgs_per_s" not in r:
        return f"tls      {r['server']:9s}: ERROR {r.get('error')}"
    return (f"tls      {r['server']:9s} x{r['messages']}: peer window "
            f"{r['window_msgs_per_s']:7.1f} msg/s, from launch {r['msgs_per_s']:.1f} msg/s "
            f"({r['seconds']:.2f}s; first at the peer {r['first_at_peer_seconds']:.2f}s, "
            f"start-up {r['startup_seconds']:.2f}s), twistd {r['cpu_ms_per_msg']:.2f} CPU "
            f"ms/msg, reactor busy {r['reactor_busy_pct']:.0f}%, peer "
            f"{r['peer_cpu_ms_per_msg']:.2f} CPU ms/msg, machine "
            f"{r['machine_cpu_ms_per_msg']:.2f} (other {_other_cpu(r):.2f}); sessions "
            f"{r.get('sessions')} "
            f"(verified {r.get('sessions_verified')}, peer TLS {r.get('peer_tls_sessions')}), "
            f"peer took {r.get('peer_accepted')}"
            + (f" ({r['peer_distinct']} distinct, {r.get('peer_discarded')} discarded)"
               if "peer_distinct" in r else "")
            + (f"  ERROR: {r['error']}" if "error" in r else ""))


def _other_cpu(r: dict[str, Any]) -> float:
    """
    CPU per message spent by neither twistd nor the peer over the timed part:
    the bench script, the kernel's work for nobody in particular, and the
    machine's other users.  The TLS runs are sensitive to it (see the doc).
    """
    return round(r["machine_cpu_ms_per_msg"] - r["cpu_ms_per_msg"] - r["peer_cpu_ms_per_msg"], 3)


def summarize_tls(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """
    The TLS test: per variant, medians over the runs that completed without
    error (an error, e.g. a session not verified, disqualifies the run);
    the ratio tls / cleartext of the medians of the peer-window rate (the
    target's quantity) and of the rate from launch; the paired ratios.
    """
    row: dict[str, Any] = {}
    tls_runs = [r for r in runs if r["test"] == "tls"]
    if tls_runs:
        row["peer"] = tls_runs[0]["peer"]
    for name in TLS_VARIANTS:
        allr = [r for r in tls_runs if r["server"] == name]
        rs = [r for r in allr if "msgs_per_s" in r and "error" not in r]
        errors = [r["error"] for r in allr if "error" in r]
        if not rs:
            if allr:
                row[name] = {"runs": 0, "errors": errors}
            continue
        win = [r["window_msgs_per_s"] for r in rs]
        row[name] = {
            "runs": len(rs),
            "window_msgs_per_s": [r["window_msgs_per_s"] for r in rs],
            "median_window_msgs_per_s": round(statistics.median(win), 1),
            "min_window_msgs_per_s": min(win),
            "max_window_msgs_per_s": max(win),
            "median_msgs_per_s": round(statistics.median(r["msgs_per_s"] for r in rs), 1),
            "median_after_startup_msgs_per_s": round(statistics.median(
                r["after_startup_msgs_per_s"] for r in rs), 1),
            "median_seconds": median([r["seconds"] for r in rs]),
            "median_first_at_peer_seconds": median([r["first_at_peer_seconds"] for r in rs]),
            "median_startup_seconds": median([r["startup_seconds"] for r in rs]),
            "median_cpu_ms_per_msg": median([r["cpu_ms_per_msg"] for r in rs]),
            "median_reactor_cpu_ms_per_msg": median([r["reactor_cpu_ms_per_msg"] for r in rs]),
            "median_reactor_busy_pct": median([r["reactor_busy_pct"] for r in rs]),
            "median_peer_cpu_ms_per_msg": median([r["peer_cpu_ms_per_msg"] for r in rs]),
            "median_machine_cpu_ms_per_msg": median([r["machine_cpu_ms_per_msg"] for r in rs]),
            "other_cpu_ms_per_msg": [_other_cpu(r) for r in rs],
            "max_peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "median_sessions": median([r["sessions"] for r in rs]),
            "sessions_verified": sum(r["sessions_verified"] for r in rs),
            "peer_tls_sessions": sum(r["peer_tls_sessions"] for r in rs),
            "sessions": sum(r["sessions"] for r in rs),
            "messages_at_peer": sum(r.get("peer_distinct", r["peer_accepted"]) for r in rs),
            "errors": errors,
        }
        for key in ("tls_example", "peer_tls_example"):
            ex = [r[key] for r in rs if key in r]
            if ex:
                row[name][key] = ex[0]
    tls, clear = row.get("tls"), row.get("cleartext")
    if tls and clear and tls.get("runs") and clear.get("runs"):
        row["ratio"] = round(tls["median_window_msgs_per_s"]
                             / clear["median_window_msgs_per_s"], 3)
        row["ratio_from_launch"] = round(tls["median_msgs_per_s"] / clear["median_msgs_per_s"], 3)
        pairs = []
        for rep in sorted({r["repeat"] for r in tls_runs}):
            a = [r for r in tls_runs if r["repeat"] == rep and r["server"] == "tls"
                 and "msgs_per_s" in r and "error" not in r]
            b = [r for r in tls_runs if r["repeat"] == rep and r["server"] == "cleartext"
                 and "msgs_per_s" in r and "error" not in r]
            if a and b:
                pairs.append(a[0]["window_msgs_per_s"] / b[0]["window_msgs_per_s"])
        if pairs:
            row["paired_ratios"] = [round(x, 2) for x in pairs]
            row["paired_ratio_median"] = round(statistics.median(pairs), 2)
    return row


def tls_markdown(row: dict[str, Any], count: int, size: int) -> str:
    def f(s, key, fmt):
        return format(s[key], fmt) if s and key in s else "-"

    peer = {"tlssink": "tlssink (a C sink with STARTTLS)",
            "postfix": "a private Postfix (STARTTLS offered, mail discarded)"}.get(
                row.get("peer"), row.get("peer"))
    lines = [f"TLS test: N = {count} messages of {size_label(size)} per run, twisted-mta to "
             f"{peer} as smarthost, `tls_policy = \"strict\"` (verified) vs `\"none\"` "
             f"(cleartext).", "",
             "| variant | runs | peer-window msg/s, median (min-max) | from launch msg/s | "
             "first at the peer, s | twistd CPU ms/msg (all / reactor after start-up) | "
             "reactor busy % | peer CPU ms/msg | machine CPU ms/msg | other CPU ms/msg, "
             "per run | sessions | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in TLS_VARIANTS:
        s = row.get(name)
        if not s or not s.get("runs"):
            lines.append(f"| {name} | 0 | - | - | - | - | - | - | - | - | - | - |")
            continue
        lines.append("| " + " | ".join([
            name, str(s["runs"]),
            f"{s['median_window_msgs_per_s']:.0f} ({s['min_window_msgs_per_s']:.0f}-"
            f"{s['max_window_msgs_per_s']:.0f})",
            f(s, "median_msgs_per_s", ".0f"), f(s, "median_first_at_peer_seconds", ".2f"),
            f"{s['median_cpu_ms_per_msg']:.2f} / {s['median_reactor_cpu_ms_per_msg']:.2f}",
            f(s, "median_reactor_busy_pct", ".0f"), f(s, "median_peer_cpu_ms_per_msg", ".2f"),
            f(s, "median_machine_cpu_ms_per_msg", ".2f"),
            " ".join(f"{x:.2f}" for x in s["other_cpu_ms_per_msg"]),
            f(s, "median_sessions", ".0f"),
            f(s, "max_peak_rss_mb", ".0f"),
        ]) + " |")
    if "ratio" in row:
        lines += ["", f"Ratio tls / cleartext: {row['ratio']:.2f} (peer window, medians); "
                  f"paired {row.get('paired_ratio_median')} ({row.get('paired_ratios')}); "
                  f"from launch {row['ratio_from_launch']:.2f}."]
    t = row.get("tls")
    if t and t.get("runs"):
        lines += ["", f"Verified: {t['sessions_verified']} of {t['sessions']} TLS-run sessions "
                  f"logged `certificate verified; policy strict` by twistd, {t['peer_tls_sessions']} "
                  f"TLS sessions logged by the peer; {t['messages_at_peer']} messages at the "
                  f"peer over {t['runs']} runs"
                  + (" (distinct Message-IDs in its log, all discarded)"
                     if row.get("peer") == "postfix" else " (final dots counted by tlssink)")
                  + f". twistd: `{t.get('tls_example', '?')}`; peer: "
                  f"`{t.get('peer_tls_example', '?')}`."]
    return "\n".join(lines)


def tls_target_lines(row: dict[str, Any]) -> list[str]:
    if "ratio" not in row:
        return ["FAIL: tls: no complete pair of runs (see the errors)"]
    ok = "PASS" if row["ratio"] >= TLS_TARGET else "FAIL"
    return [f"{ok}: tls {row['ratio']:.2f}x cleartext (paired {row.get('paired_ratio_median')}x; "
            f"from launch {row['ratio_from_launch']:.2f}x; target >= {TLS_TARGET}x)"]


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


# The TLS layer: Twisted's TLSMemoryBIOProtocol and pyOpenSSL (with cffi
# under it).  A sample counts as TLS when the innermost of these frames is
# deeper than the innermost frame of the work TLS carries (our client,
# twisted.mail, logging, Deferreds, the queue): encrypting our writes and
# decrypting the peer's replies, and the handshake.
TLS_FRAMES = ("twisted/protocols/tls.py", "OpenSSL/", "_cffi_backend", "cryptography/",
              "twisted/internet/_sslverify.py", "twisted_mta/tls/handshake.py",
              "service_identity/")
TLS_CARRIED = ("twisted_mta/outbound/client.py", "twisted_mta/outbound/pool.py",
               "twisted_mta/queue/", "twisted/mail/", "twisted/logger/", "Deferred.",
               "threadpool.py", "QueueManager.")
TLS_CATEGORY = "TLS layer (TLSMemoryBIOProtocol, pyOpenSSL: record encryption, handshakes)"


def _outbound_category(funcs: list[str]) -> str:
    last_tls = max((i for i, fn in enumerate(funcs) if any(n in fn for n in TLS_FRAMES)),
                   default=-1)
    last_app = max((i for i, fn in enumerate(funcs) if any(n in fn for n in TLS_CARRIED)),
                   default=-1)
    if last_tls > last_app:
        return TLS_CATEGORY
    return _inbound_category(funcs)


_inbound_category = inbound._category


def profile_summary(raw: str) -> dict[str, Any]:
    saved = inbound._CATEGORIES, inbound._category
    inbound._CATEGORIES = OUTBOUND_CATEGORIES
    inbound._category = _outbound_category
    try:
        return inbound.summarize_pyspy(raw)
    finally:
        inbound._CATEGORIES, inbound._category = saved


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
    p.add_argument("--tests", default=",".join(DEFAULT_TESTS),
                   help="which tests: outbound, e2e, tls (default outbound,e2e)")
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
                   help="tests to profile (default outbound; tls profiles both of its "
                        "variants)")
    p.add_argument("--pyspy-rate", type=int, default=200,
                   help="py-spy samples per second (default 200)")
    p.add_argument("--tls-peer", choices=sorted(PEERS), default="tlssink",
                   help="the TLS test's peer: tlssink (a small C sink with STARTTLS, built "
                        "at run time; default) or postfix (a private Postfix that discards)")
    p.add_argument("--peer-workdir", default=None,
                   help="where the TLS test's peer Postfix keeps its queue (default "
                        "/dev/shm, a tmpfs, so the peer's intake is fast; see "
                        "docs/benchmarks.md)")
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
    if "tls" in args.tests + (args.profile_tests if args.profile else []):
        try:
            import trustme  # noqa: F401
        except ImportError:
            raise BenchError("the tls test needs trustme: pip install trustme")


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
    peerdir = material = None
    if "tls" in args.tests + (args.profile_tests if args.profile else []):
        # The peer's queue, log and the trustme material: on tmpfs by default.
        peerdir = tempfile.mkdtemp(prefix="outbound-bench-peer-",
                                   dir=args.peer_workdir or "/dev/shm")
        os.chmod(peerdir, 0o755)
        material = tls_material(peerdir)
        if args.tls_peer == "tlssink":
            material["tlssink"] = build_tlssink(peerdir)
        log(f"TLS test: peer {args.tls_peer} under {peerdir} ({inbound.fs_of(peerdir)}); "
            f"trustme CA {material['ca']}, peer certificate for IP 127.0.0.1 and DNS "
            f"{PEER_NAME}")
    try:
        if not args.profile_only:
            def names(test: str) -> list[str]:
                return list(TLS_VARIANTS) if test == "tls" else list(args.servers)
            total = args.repeats * sum(len(names(t)) for t in args.tests)
            i = 0
            for rep in range(args.repeats):
                for ti, test in enumerate(args.tests):
                    order = names(test)
                    if (rep + ti) % 2:
                        order.reverse()
                    for name in order:
                        i += 1
                        if test == "tls":
                            r = run_tls(name, rundir, peerdir, material, args)
                        else:
                            r = run_once(test, name, rundir, args)
                        r["repeat"] = rep
                        runs.append(r)
                        if test == "tls":
                            log(f"[{i}/{total} {time.monotonic() - started:4.0f}s] "
                                + tls_progress(r))
                        elif "msgs_per_s" in r:
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
                for variant in (TLS_VARIANTS if test == "tls" else (None,)):
                    key = f"tls-{variant}" if variant else test
                    raw = os.path.join(os.path.abspath(args.profile),
                                       f"twisted-mta-{key}-{args.messages}.collapsed.txt")
                    if variant:
                        r = run_tls(variant, rundir, peerdir, material, args, profile_to=raw)
                    else:
                        r = run_once(test, "twisted-mta", rundir, args, profile_to=raw)
                    if "msgs_per_s" not in r:
                        log(f"profile run failed: {r.get('error')}")
                        continue
                    if variant:
                        log("profile run: " + tls_progress(r))
                    summary = profile_summary(raw)
                    summary["run"] = r
                    rate = (f"peer window {r['window_msgs_per_s']} msg/s" if variant else
                            f"sink window {r['sink_window_msgs_per_s']} msg/s")
                    title = (f"{key}, {args.messages} x {size_label(args.size)} "
                             f"(under py-spy: {r['msgs_per_s']} msg/s, {rate})")
                    with open(raw.replace(".collapsed.txt", ".summary.md"), "w") as f:
                        f.write(inbound.format_profile(title, summary) + "\n")
                    profiles[key] = {"title": title, **summary}
                    log(f"profile written: {raw}")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: reporting what was measured")
    finally:
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
            if peerdir:
                shutil.rmtree(peerdir, ignore_errors=True)

    rows = summarize(runs, [t for t in args.tests if t != "tls"], args.servers)
    tls_row = summarize_tls(runs) if "tls" in args.tests else None
    elapsed = time.monotonic() - started
    changed = inbound.source_fingerprint() != info["source_fingerprint"]
    info["source_changed_during_run"] = changed
    title = ("twisted-mta vs Postfix, both to smtp-sink" if rows else
             f"twisted-mta over verified TLS vs cleartext, to {args.tls_peer}")
    print(f"## Outbound delivery: {title} ({info['date']})\n")
    print(f"{info['nproc']} CPUs ({info['cpu']}), {info['memory']} RAM, Linux {info['kernel']}, "
          f"Python {info['python']}, Twisted {info['twisted']}, Postfix {info['postfix']}; "
          f"queues on {info['filesystem']} (file create {info['fs_probe']['create_us']} us, "
          f"fsync {info['fs_probe']['fsync_us']} us); twisted-mta {info['source']}. "
          f"{args.repeats} run(s) per server per test, alternating; msg/s is the median "
          f"(min-max); wall time {elapsed:.0f}s.\n")
    if changed:
        print("**WARNING: twisted-mta's sources changed during this run; the results mix "
              "versions. Run again.**\n")
    if rows and any(r["test"] != "tls" for r in runs):
        print(markdown_tables(rows, args.messages, args.size))
        print()
        for line in target_lines(rows, args.messages):
            print(line)
        for test, row in rows.items():
            for name in args.servers:
                for e in row.get(name, {}).get("errors", []):
                    print(f"ERROR in {test} / {name}: {e}")
    if tls_row is not None and any(r["test"] == "tls" for r in runs):
        print()
        print(tls_markdown(tls_row, args.messages, args.size))
        print()
        for line in tls_target_lines(tls_row):
            print(line)
        for name in TLS_VARIANTS:
            for e in tls_row.get(name, {}).get("errors", []):
                print(f"ERROR in tls / {name}: {e}")
    for test, summary in profiles.items():
        print()
        print(inbound.format_profile(summary["title"], summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "elapsed_seconds": round(elapsed, 1),
                       "summary": rows, "tls_summary": tls_row, "runs": runs,
                       "profiles": profiles}, f, indent=1)
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
