"""
C{scripts/bench dkim}: what DKIM signing on receipt costs per message
(issue 15).  twisted-mta against itself, in one process, no network: the
question is the cost of the signing step, not a comparison with Postfix
(which signs through a milter).

Per key (RSA-2048, Ed25519) and message size (1 KiB, 100 KiB of 7-bit
text; and 100 KiB of 8-bit text, converted to quoted-printable first):

  - sign: L{Signer.sign_outbound} alone (From domain, header list,
    dkimpy's canonicalisation, hashing and the signature), CPU seconds
    per message;
  - receive: what a message costs between its end of data and its 250,
    in a spool under C{--workdir}: the queue file written, then committed
    (fsync of the file and of new/) without signing, and with the signing
    step before the commit (the file read back, signed, rewritten:
    L{twisted_mta.dkim.sign_queued}); the medians of both and the
    difference, the signing step's own cost.

The I/O runs inline (the server runs it in its I/O threads; the reactor
thread does none of it).  Medians over C{--messages} messages per cell
(default 200; C{--quick}: 5).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from .core import describe_machine, log, machine, report, write_json

ALGORITHMS = (("RSA-2048", "rsa-sha256"), ("Ed25519", "ed25519-sha256"))
CELLS = ((1024, False), (102400, False), (102400, True))  # (body octets, 8-bit)


def message(size: int, eight_bit: bool) -> bytes:
    """
    A message with the usual header fields and C{size} octets of text
    body in lines of 72 characters (8-bit: UTF-8 umlauts in every line).
    """
    head = ("From: Alice <alice@example.test>\r\nTo: bob@example.org\r\n"
            "Subject: a benchmark message\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
            "Message-ID: <bench@example.test>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}\r\n\r\n")
    line = ("Grüße aus Köln, " if eight_bit else "Greetings from Cologne, ") * 3
    line = line[:70] + "\r\n"
    body = (line * (size // len(line.encode()) + 1)).encode("utf-8")[:size]
    return head.encode() + body[:body.rfind(b"\r\n") + 2]


def make_signer(workdir: str, algorithm: str):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    from twisted_mta.config import DKIMKey, DKIMSettings
    from twisted_mta.dkim import Signer
    key = (rsa.generate_private_key(65537, 2048) if algorithm == "rsa-sha256"
           else ed25519.Ed25519PrivateKey.generate())
    path = os.path.join(workdir, f"{algorithm}.pem")
    with open(path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    settings = DKIMSettings(domains=(("example.test", DKIMKey(
        selector="bench", key_file=path, algorithm=algorithm)),))
    return Signer.from_settings(settings)


def time_sign(signer, data: bytes, count: int) -> float:
    """CPU seconds per L{Signer.sign_outbound}, the median of C{count}."""
    times = []
    for _ in range(count):
        start = time.process_time()
        signed = signer.sign_outbound(data)
        times.append(time.process_time() - start)
        if not signed.field:
            raise AssertionError(f"not signed: {signed.reason}")
    return statistics.median(times)


def time_receive(spool, signer, data: bytes, count: int) -> tuple[float, float]:
    """
    Wall and CPU seconds from the end of data to the commit (the 250),
    the medians of C{count}: with C{signer}, the signing step runs before
    the commit as in the server.
    """
    from twisted_mta.dkim import sign_queued
    from twisted_mta.model import Envelope, Recipient
    times, cpu = [], []
    for _ in range(count):
        writer = spool.new_message()
        envelope = Envelope(queue_id=writer.queue_id, sender="alice@example.test",
                            recipients=(Recipient(address="bob@example.org"),),
                            arrival=0, next_attempt=0, client={}, size=len(data))
        writer.write(envelope.to_header())
        writer.write(data)
        start, start_cpu = time.perf_counter(), time.process_time()
        d = sign_queued(signer, writer, envelope, "authenticated")
        d.addCallback(writer.commit)
        done = []
        d.addBoth(done.append)
        elapsed, used = time.perf_counter() - start, time.process_time() - start_cpu
        if not done or not hasattr(done[0], "queue_id"):
            raise AssertionError(f"commit did not complete: {done}")
        times.append(elapsed)
        cpu.append(used)
        spool.remove(envelope.queue_id)
    return statistics.median(times), statistics.median(cpu)


def run(workdir: str, count: int) -> list[dict[str, Any]]:
    from twisted_mta.queue.spool import Spool
    spool = Spool(os.path.join(workdir, "spool"))
    spool.create()
    rows = []
    for label, algorithm in ALGORITHMS:
        signer = make_signer(workdir, algorithm)
        for size, eight_bit in CELLS:
            data = message(size, eight_bit)
            n = count if size <= 1024 else max(3, count // 4)
            log(f"dkim: {label}, {size} octets{' 8-bit' if eight_bit else ''}: {n} messages")
            sign = time_sign(signer, data, n)
            plain = time_receive(spool, None, data, n)
            signed = time_receive(spool, signer, data, n)
            rows.append({"key": label, "size": size, "eight_bit": eight_bit, "messages": n,
                         "sign_cpu_ms": sign * 1e3, "commit_ms": plain[0] * 1e3,
                         "sign_and_commit_ms": signed[0] * 1e3,
                         "step_ms": (signed[0] - plain[0]) * 1e3,
                         "step_cpu_ms": (signed[1] - plain[1]) * 1e3})
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| key | message | sign (CPU ms) | end of data -> commit, unsigned (ms) | "
             "signed (ms) | the signing step (ms) | the step's CPU (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        kind = f"{r['size'] // 1024} KiB{', 8-bit (converted)' if r['eight_bit'] else ''}"
        lines.append(f"| {r['key']} | {kind} | {r['sign_cpu_ms']:.2f} | {r['commit_ms']:.2f} | "
                     f"{r['sign_and_commit_ms']:.2f} | {r['step_ms']:.2f} | "
                     f"{r['step_cpu_ms']:.2f} |")
    return "\n".join(lines)


def main(a) -> int:
    count = 5 if a.quick else (a.messages or 200)
    info = machine(a.workdir)
    workdir = tempfile.mkdtemp(prefix="twisted-mta-bench-dkim-", dir=a.workdir)
    try:
        rows = run(workdir, count)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    info["load_after"] = os.getloadavg()
    text = (describe_machine(info) + " Medians over "
            f"{count} messages (100 KiB: {max(3, count // 4)}); `scripts/bench dkim`.\n\n"
            + table(rows))
    write_json(a.json, {"machine": info, "rows": rows})
    report("dkim", text, a.docs)
    return 0
