"""
The modes that compare twisted-mta with a private Postfix in the same
run: what each sets up, what its clock measures, and how it checks that
every message landed where it must, once.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from typing import Any

from .core import (
    KIB, LOCAL_RCPT, LOOPBACK, SERVERS, BenchError, Mode, Run, CLOSED_PORT, delivered,
    fill_spool, finish_source, log, percentile, remote_rcpt, smarthost, smtp_source,
    wait_until)

# Messages per run by (sessions, size): a run lasts seconds.
COUNTS = {(1, KIB): 1000, (20, KIB): 2000, (100, KIB): 2000,
          (1, 100 * KIB): 400, (20, 100 * KIB): 800, (100, 100 * KIB): 800}


def ints(text: str | None, default: str) -> list[int]:
    return [int(x) for x in (text or default).split(",")]


class Local(Mode):
    """
    C{smtp-source} sends to one local recipient; the clock runs until the
    last message is a file in the recipient's Maildir C{new/}.
    """

    name = "local"
    servers = ",".join(SERVERS)
    rcpt = LOCAL_RCPT

    def cells(self, quick: bool, a: Any) -> list[dict[str, Any]]:
        sessions = ints(a.sessions, "1,20" if quick else "1,20,100")
        sizes = ints(a.sizes, "1024" if quick else "1024,102400")
        return [{"sessions": s, "size": z,
                 "messages": a.messages or (200 if quick else COUNTS.get((s, z), 1000))}
                for z in sizes for s in sessions]

    def setup(self, run: Run) -> None:
        run.start_server()

    def landed(self, run: Run) -> int:
        return delivered(run.server.maildir_new)

    def timed(self, run: Run) -> dict[str, Any]:
        c, new = run.cell, run.server.maildir_new
        t0 = time.monotonic()
        source = smtp_source(run.server.port, c["sessions"], c["messages"], c["size"], self.rcpt)
        received: list[float] = []

        def check() -> None:
            run.check()
            if not received and source.poll() is not None:
                received.append(time.monotonic())
                if source.returncode:
                    finish_source(source)

        t1 = wait_until(lambda: self.landed(run) >= c["messages"],
                        120 + c["messages"] * c["size"] / 1e6,
                        lambda: f"{self.landed(run)} of {c['messages']} in {new}", check)
        finish_source(source)
        return {"messages": c["messages"], "seconds": t1 - t0,
                "received_seconds": (received or [time.monotonic()])[0] - t0}

    def check(self, run: Run, result: dict[str, Any]) -> None:
        time.sleep(0.5)  # a duplicate would show up here
        if (n := self.landed(run)) != run.cell["messages"]:
            raise BenchError(f"{n} messages landed, {run.cell['messages']} sent")


class Queue(Local):
    """
    Acceptance into the queue: every recipient remote and deferred.  The
    clock stops when C{smtp-source} has had every 250 (both servers answer
    the final dot once the message is on disk); then the queue must hold
    exactly the messages sent.  twisted-mta's smarthost is a closed
    loopback port (the first attempt is refused, the destination is then
    dead for [outbound] dead_destination_time and the rest defer without
    a connection); Postfix defers its smtp transport (C{defer_transports}),
    so it never connects.
    """

    name = "queue"
    servers = "postfix,workers=auto"
    rcpt = remote_rcpt(0)

    def setup(self, run: Run) -> None:
        run.start_server(mta_extra=smarthost(CLOSED_PORT), relay_port=CLOSED_PORT,
                         postfix_main={"defer_transports": "smtp"})

    def landed(self, run: Run) -> int:
        return run.server.queued()

    def timed(self, run: Run) -> dict[str, Any]:
        c = run.cell
        t0 = time.monotonic()
        finish_source(smtp_source(run.server.port, c["sessions"], c["messages"], c["size"],
                                  self.rcpt))
        return {"messages": c["messages"], "seconds": time.monotonic() - t0}

    def check(self, run: Run, result: dict[str, Any]) -> None:
        n = run.cell["messages"]
        wait_until(lambda: self.landed(run) >= n, 60,
                   lambda: f"{self.landed(run)} of {n} queued", run.check, 0.1)
        super().check(run, result)


class EndToEnd(Local):
    """
    C{smtp-source} -> the server -> C{smtp-sink}: the clock runs until the
    sink has the last message; then the queue must empty and the sink
    must hold exactly the messages sent.
    """

    name = "e2e"
    servers = "postfix,workers=auto"
    rcpt = remote_rcpt(0)

    def cells(self, quick: bool, a: Any) -> list[dict[str, Any]]:
        return [{"sessions": s, "size": z, "messages": a.messages or (300 if quick else 10_000)}
                for z in ints(a.sizes, "1024") for s in ints(a.sessions, "20")]

    def setup(self, run: Run) -> None:
        peer = run.start_peer()
        run.start_server(mta_extra=smarthost(peer.port), relay_port=peer.port)

    def landed(self, run: Run) -> int:
        return run.peer.messages

    def check(self, run: Run, result: dict[str, Any]) -> None:
        wait_until(lambda: not run.server.queued(), 60,
                   lambda: f"{run.server.queued()} messages still queued", run.check, 0.1)
        super().check(run, result)


# twisted-mta's JSON log for the modes that read its events.
JSON_LOG = '[logging]\nformat = "json"\nfile = "events.jsonl"\n'


def events(run: Run) -> list[dict[str, Any]]:
    from tests.interop.support import json_lines
    return json_lines(os.path.join(run.base, "events.jsonl"))


class Outbound(EndToEnd):
    """
    N messages already queued, never attempted, then released to
    C{smtp-sink}; the clock runs from the release until the sink has the
    last one.  twisted-mta: entries due in a day written into its spool
    before it starts and read (its C{queue.recovered} line), then C{queue
    flush}, timed from the request (the MTA sees it at once, with
    inotify, or within a second without; C{taken_after_s} in the JSON is
    when it removed the request, having made every entry due).  Postfix:
    C{smtp-source} into the hold queue, then C{postsuper -H ALL} and
    C{postqueue -f}, timed from just before C{postsuper}.
    """

    name = "outbound"
    # Only the modes that read the MTA's events turn its JSON log on: the
    # rest run the default logging, as a user would compare them.
    json_log = False

    def cells(self, quick: bool, a: Any) -> list[dict[str, Any]]:
        return [{"size": z, "messages": a.messages or (300 if quick else 10_000)}
                for z in ints(a.sizes, "1024")]

    def label(self, cell: dict[str, Any]) -> str:
        return f"{cell['messages']} messages of {cell['size'] // KIB} KiB"

    def start(self, run: Run, port: int, mta: str = "", main: dict[str, str] | None = None,
              outbound: str = "") -> None:
        c = run.cell
        due = time.time() + 86400
        server = run.start_server(
            mta_extra=smarthost(port, outbound) + mta + "\n" + (JSON_LOG if self.json_log else ""),
            relay_port=port,
            postfix_main={"smtpd_end_of_data_restrictions": "check_client_access static:HOLD",
                          **(main or {})},
            fill=lambda s: fill_spool(s.mta.spool, (remote_rcpt(0),) * c["messages"],
                                      c["size"], due))
        if server.postfix:
            finish_source(smtp_source(server.port, 20, c["messages"], c["size"],
                                      remote_rcpt(0)))
            wait_until(lambda: server.held() >= c["messages"], 60,
                       lambda: f"{server.held()} of {c['messages']} on hold", run.check, 0.1)
        else:
            # Postfix's clock starts with its queue in hand: twisted-mta's
            # too, once it has read its spool (queue.recovered), which
            # it finishes in the background after the banner.
            loaded = f"queue: {c['messages']} entries in "
            wait_until(lambda: loaded in server.mta.output(), 120,
                       lambda: "the MTA has not finished reading its spool", run.check, 0.1)

    def setup(self, run: Run) -> None:
        self.start(run, run.start_peer().port)

    def timed(self, run: Run) -> dict[str, Any]:
        n, server = run.cell["messages"], run.server
        t0 = time.time()
        if server.postfix:
            for cmd in (["postsuper", "-c", server.postfix.conf, "-H", "ALL"],
                        ["postqueue", "-c", server.postfix.conf, "-f"]):
                p = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if p.returncode:
                    raise BenchError(f"{' '.join(cmd)}: {p.stdout}{p.stderr}")
        else:
            from twisted_mta.queue import control
            from twisted_mta.queue.spool import Spool
            flush = control.request(Spool(server.mta.spool), "flush")
        progress = [0, time.monotonic()]
        taken: list[float] = []

        def check() -> None:
            run.check()
            if server.mta and not taken and not os.path.exists(flush):
                taken.append(time.time())  # the MTA removes a request once carried out
            if run.peer.messages > progress[0]:
                progress[:] = [run.peer.messages, time.monotonic()]
            elif time.monotonic() - progress[1] > 30:
                raise BenchError("no message reached the sink for 30 s")

        wait_until(lambda: run.peer.messages >= n, 900,
                   lambda: f"the sink has {run.peer.messages} of {n}", check)
        t1 = time.time()
        result = {"messages": n, "seconds": t1 - t0}
        if server.mta:
            # Seen at once (inotify), or within a second without it.
            if not taken and os.path.exists(flush):
                raise BenchError("the MTA never carried out the flush request")
            result["taken_after_s"] = (taken[0] if taken else t1) - t0
        return result


class TLS(Outbound):
    """
    The outbound test to C{tlssink} (it offers STARTTLS; smtp-sink does
    not), once in cleartext and once with the certificate verified
    against a throw-away CA (twisted-mta: smarthost C{tls_policy =
    "strict"}, no fallback; Postfix: TLS policy C{secure}, matching the
    certificate's name); every session checked at both ends.
    """

    name = "tls"
    PEER_NAME = "peer.bench.test"
    json_log = True  # the check reads outbound.connected

    def cells(self, quick: bool, a: Any) -> list[dict[str, Any]]:
        return [{"tls": tls, "size": z, "messages": a.messages or (300 if quick else 10_000)}
                for z in ints(a.sizes, "1024") for tls in (False, True)]

    def label(self, cell: dict[str, Any]) -> str:
        return super().label(cell) + (", verified TLS" if cell["tls"] else ", cleartext")

    def setup(self, run: Run) -> None:
        import trustme

        from .core import build_tlssink
        ca = trustme.CA(organization_name="twisted-mta benchmark CA")
        ca_file, chain = os.path.join(run.base, "ca.pem"), os.path.join(run.base, "peer.pem")
        ca.cert_pem.write_to_path(ca_file)
        ca.issue_cert(LOOPBACK, self.PEER_NAME).private_key_and_cert_chain_pem.write_to_path(chain)
        os.chmod(ca_file, 0o644)
        port = run.start_peer((build_tlssink(run.base), chain)).port
        if run.cell["tls"]:
            mta = 'tls_policy = "strict"\ntls_fallback = "never"\n'
            main = {"smtp_tls_CAfile": ca_file, "smtp_tls_loglevel": "1",
                    "smtp_tls_policy_maps": f"inline:{{ {{ [{LOOPBACK}]:{port} = secure "
                                            f"match={self.PEER_NAME} }} }}"}
        else:
            mta, main = 'tls_policy = "none"\n', {}
        # mta: keys of [outbound.smarthost], the last table smarthost() writes
        self.start(run, port, mta + f'\n[outbound.tls]\nca_file = "{ca_file}"\n', main)

    def check(self, run: Run, result: dict[str, Any]) -> None:
        super().check(run, result)
        sessions = run.peer.sessions - 1  # tlssink counts connections, its banner probe too
        if run.server.mta:
            run.server.stop()  # its log is complete
            connected = [e for e in events(run) if e.get("event") == "outbound.connected"]
            ours = sum(bool(e.get("verified")) for e in connected) if run.cell["tls"] else len(
                [e for e in connected if not e.get("version")])
        else:
            text = run.server.postfix.maillog()
            ours = text.count("Verified TLS connection established") if run.cell["tls"] else (
                sessions if "TLS connection established" not in text else -1)
        want_tls = sessions if run.cell["tls"] else 0
        result |= {"peer_sessions": sessions, "peer_tls_sessions": run.peer.tls,
                   "tls_example": run.peer.tls_example}
        if not sessions or run.peer.tls != want_tls or ours != sessions:
            raise BenchError(f"{sessions} sessions at the peer, {run.peer.tls} with TLS; "
                             f"{ours} {'verified' if run.cell['tls'] else 'cleartext'} "
                             "sessions in the server's log")

    def notes(self, rows: list[dict[str, Any]]) -> str:
        out = []
        for name in dict.fromkeys(r["server"] for r in rows):
            by = {r["cell"].endswith("verified TLS"): r["msg_per_s"]
                  for r in rows if r["server"] == name}
            if len(by) == 2:
                out.append(f"{name}: verified TLS / cleartext {by[True] / by[False]:.2f}")
        return "\n" + "; ".join(out) + ".\n" if out else ""


class Chunking(Outbound):
    """
    The outbound test to C{tlssink chunking} (it offers CHUNKING, which
    smtp-sink does not), in cleartext, twisted-mta with C{[outbound]
    chunking} on (BDAT, pipelined behind MAIL and RCPT: one round trip per
    message) and off (DATA: two); the sink counts the messages that came
    with BDAT, which must be all of them or none.  Postfix, if asked for
    (C{--servers postfix,workers=auto}), sends DATA in both cells: its
    smtp client has no BDAT.
    """

    name = "chunking"
    servers = "workers=auto"
    paired = "bdat"  # DATA and BDAT of one size in the same round, alternating first

    def cells(self, quick: bool, a: Any) -> list[dict[str, Any]]:
        return [{"bdat": bdat, "size": z, "messages": a.messages or (300 if quick else 10_000)}
                for z in ints(a.sizes, "1024" if quick else "1024,102400")
                for bdat in (False, True)]

    def label(self, cell: dict[str, Any]) -> str:
        return super().label(cell) + (", BDAT" if cell["bdat"] else ", DATA")

    def setup(self, run: Run) -> None:
        import trustme

        from .core import build_tlssink
        chain = os.path.join(run.base, "peer.pem")
        trustme.CA().issue_cert(LOOPBACK).private_key_and_cert_chain_pem.write_to_path(chain)
        port = run.start_peer((build_tlssink(run.base), chain, "chunking")).port
        # mta: keys of [outbound.smarthost], the last table smarthost() writes
        self.start(run, port, 'tls_policy = "none"\n',
                   outbound=f"chunking = {'true' if run.cell['bdat'] else 'false'}\n")

    def check(self, run: Run, result: dict[str, Any]) -> None:
        super().check(run, result)
        n = run.cell["messages"]
        want = n if run.cell["bdat"] and run.server.mta else 0
        result["peer_bdat_messages"] = run.peer.bdat
        if run.peer.bdat != want:
            raise BenchError(f"{run.peer.bdat} of {n} messages came with BDAT, not {want}")

    def notes(self, rows: list[dict[str, Any]]) -> str:
        out = []
        for name in dict.fromkeys(r["server"] for r in rows):
            for size in dict.fromkeys(r["cell"].rsplit(", ", 1)[0] for r in rows):
                by = {r["cell"].endswith("BDAT"): r["msg_per_s"] for r in rows
                      if r["server"] == name and r["cell"].startswith(size + ", ")}
                if len(by) == 2:
                    out.append(f"{name}, {size}: BDAT / DATA {by[True] / by[False]:.2f}")
        return "\n" + "; ".join(out) + ".\n" if out else ""

    def run_notes(self, runs: list[dict[str, Any]]) -> str:
        """
        BDAT / DATA per round (the two ran in the same round, L{plan}):
        msg/s and the server's CPU per message, which a busy machine
        disturbs less.
        """
        out = []
        for name in dict.fromkeys(r["server"] for r in runs):
            for size in dict.fromkeys(r["size"] for r in runs):
                rs = [r for r in runs if r["server"] == name and r["size"] == size]
                pairs = [{r["bdat"]: r for r in rs[i:i + 2]} for i in range(0, len(rs) - 1, 2)]
                pairs = [p for p in pairs if len(p) == 2]
                if not pairs:
                    continue
                cpu = lambda r: r["server_cpu"] / r["messages"]  # noqa: E731
                rate = ", ".join(f"{p[True]['msg_per_s'] / p[False]['msg_per_s']:.2f}"
                                 for p in pairs)
                work = ", ".join(f"{cpu(p[True]) / cpu(p[False]):.2f}" for p in pairs)
                out.append(f"{name}, {rs[0]['messages']} messages of {size // KIB} KiB, "
                           f"BDAT / DATA per round: msg/s {rate}; CPU per message {work}")
        return "\n" + ".\n".join(out) + ".\n" if out else ""


class Latency(Local):
    """
    End of DATA to the 250, per message, at SESSIONS concurrent sessions,
    with the same small client for both servers (smtp-source times
    nothing): one message per connection, delivered into the local
    Maildir, every message counted there.  Compared: p99 (lower is better).
    """

    name = "latency"
    servers = "postfix,workers=auto"
    metric = "p99_ms"
    lower_is_better = True
    also = ("p50_ms", "msg_per_s")

    def notes(self, rows: list[dict[str, Any]]) -> str:
        return "\np50, median of the rounds: " + "; ".join(
            f"{r['cell']} {r['server']} {r['p50_ms']:.1f} ms" for r in rows) + ".\n"

    def cells(self, quick: bool, a: Any) -> list[dict[str, Any]]:
        return [{"sessions": s, "size": z, "messages": a.messages or (200 if quick else 4000)}
                for z in ints(a.sizes, "1024") for s in ints(a.sessions, "20")]

    def timed(self, run: Run) -> dict[str, Any]:
        c = run.cell
        t0 = time.monotonic()
        latencies = asyncio.run(send_all(run.server.port, c["sessions"], c["messages"],
                                         c["size"]))
        wait_until(lambda: self.landed(run) >= c["messages"], 120,
                   lambda: f"{self.landed(run)} of {c['messages']} delivered", run.check)
        ms = [1000 * x for x in latencies]
        return {"messages": c["messages"], "seconds": time.monotonic() - t0,
                "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "max_ms": max(ms),
                "latencies_ms": [round(x, 3) for x in ms]}


async def send_all(port: int, sessions: int, messages: int, size: int) -> list[float]:
    """
    C{messages} messages over C{sessions} concurrent connections, one per
    connection; the seconds from the end of DATA to each 250.
    """
    from .core import HELO, SENDER, make_message
    todo = iter(range(messages))
    out: list[float] = []

    async def session() -> None:
        for i in todo:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)

            async def reply(code: bytes) -> None:
                while True:
                    line = await reader.readline()
                    if not line.startswith(code):
                        raise BenchError(f"expected {code!r}, got {line!r}")
                    if line[3:4] != b"-":
                        return

            await reply(b"220")
            for cmd, code in ((f"EHLO {HELO}", b"250"), (f"MAIL FROM:<{SENDER}>", b"250"),
                              (f"RCPT TO:<{LOCAL_RCPT}>", b"250"), ("DATA", b"354")):
                writer.write(cmd.encode() + b"\r\n")
                await reply(code)
            writer.write(make_message(f"lat{i}", LOCAL_RCPT, size))
            await writer.drain()
            writer.write(b".\r\n")
            t = time.perf_counter()
            await reply(b"250")
            out.append(time.perf_counter() - t)
            writer.write(b"QUIT\r\n")
            await reply(b"221")
            writer.close()
            await writer.wait_closed()

    await asyncio.gather(*(session() for _ in range(sessions)))
    if len(out) != messages:
        log(f"warning: {len(out)} latencies for {messages} messages")
    return out


MODES = {m.name: m for m in (Local(), Queue(), Outbound(), EndToEnd(), TLS(), Chunking(),
                             Latency())}
