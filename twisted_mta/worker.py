"""
One worker (L{twisted_mta.workers}): started by the main process as
C{python -m twisted_mta.worker --config FILE --listener N:FD:FAMILY ...
[--senders N]}, it serves SMTP on the listening sockets it inherited (the
configuration's listener N on file descriptor FD), writes each message
into the shared spool, and reports its queue id on file descriptor 3.
With C{--senders}, it also sends what the main process hands it on its
standard input (L{twisted_mta.outbound.sender}): transactions, and whole
attempts of idle entries (L{twisted_mta.queue.delegated}), and answers on
file descriptor 3.  It stops when its standard input closes, on SIGTERM
(letting transactions under way finish first), and, on Linux, when the
main process dies.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from twisted.internet import defer
from twisted.logger import FileLogObserver, Logger, globalLogBeginner
from twisted.python import threadpool

from twisted_mta.lifetime import die_with_parent

log = Logger(namespace="twisted_mta.worker")

FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}
NOTIFY_FD = 3


class _ParentPipe:
    """
    Standard input from the main process: lines for the sending side
    (L{twisted_mta.outbound.sender}); its end closing means stop.
    """

    def __init__(self, reactor, on_line=None) -> None:
        self.reactor = reactor
        self.on_line = on_line
        self.buffer = b""
        os.set_blocking(0, False)

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "worker-parent-pipe"

    def doRead(self):
        from twisted.internet import main
        try:
            data = os.read(0, 65536)
        except BlockingIOError:
            return None
        if not data:
            return main.CONNECTION_DONE
        if self.on_line is not None:
            *lines, self.buffer = (self.buffer + data).split(b"\n")
            for line in lines:
                self.on_line(line)
        return None

    def connectionLost(self, reason) -> None:
        self.reactor.removeReader(self)
        if self.reactor.running:
            self.reactor.stop()


NOTICE_MAX = 4096  # PIPE_BUF: a write this short reaches the pipe whole


def write_up(data: bytes) -> None:
    """
    Write C{data} whole on the pipe to the main process (blocking; only
    the reactor thread writes there, so lines never interleave).
    """
    view = memoryview(data)
    while view:
        view = view[os.write(NOTIFY_FD, view):]


def notify(envelope) -> None:
    """
    Tell the main process a message was queued: C{queued ID ENVELOPE} (its
    compact JSON, which has no newline), so the main process need not read
    the entry back from the spool; a large envelope goes as the id alone.
    """
    line = b"queued " + envelope.queue_id.encode("ascii")
    data = envelope.to_json(compact=True)
    if len(line) + len(data) + 2 <= NOTICE_MAX:
        line += b" " + data
    os.write(NOTIFY_FD, line + b"\n")


def notify_delivered(listener: str, count: int, latency: float) -> None:
    """
    Tell the main process, for its metrics, that a message was delivered
    on receipt: C{delivered COUNT LATENCY LISTENER} (listener names are
    one word, config.py).
    """
    os.write(NOTIFY_FD, f"delivered {count} {max(latency, 0.0):.6f} {listener}\n".encode(
        "ascii", "replace"))


def notify_milter(name: str, result: str) -> None:
    """
    Tell the main process a milter's result, for its metrics: C{milter
    RESULT NAME} (milter names are checked to be one word, config.py).
    """
    os.write(NOTIFY_FD, f"milter {result} {name}\n".encode("ascii", "replace"))


def build_pool(config, reactor, run_blocking, observers: list, history: TLSHistory,
               senders: int):
    """
    The worker's L{OutboundPool} for C{config}, as the main process builds
    its own (tap.make_service), with its share of the connection limits
    (L{twisted_mta.workers.sending_shares}; C{senders}: the workers).
    """
    from twisted_mta.outbound.attempt import DNSResolver, tcp_connector
    from twisted_mta.outbound.pool import OutboundPool
    from twisted_mta.tap import make_published, prepare_tls
    engine, _ = prepare_tls(config)
    resolver = DNSResolver(config.dns)
    published = make_published(config, reactor, run_blocking, resolver)
    if published is not None:
        published.start()
        if published.sts_cache is not None:
            published.sts_cache.observers.extend(observers)  # failed policy fetches
    from twisted_mta.workers import sending_shares
    settings, _ = sending_shares(config.outbound, senders)
    return OutboundPool(settings=settings, hostname=config.hostname, clock=reactor,
                        run_blocking=run_blocking, resolver=resolver,
                        connect=tcp_connector(reactor, settings.connect_timeout),
                        observers=observers, history=history, tls=engine, published=published)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="twisted_mta.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--listener", action="append", default=[],
                        help="N:FD:FAMILY: the configuration's listener N on FD")
    parser.add_argument("--senders", type=int, default=0,
                        help="send mail too, as one of this many workers")
    args = parser.parse_args(argv)
    die_with_parent()

    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    from twisted_mta.config import ConfigError, load_config
    from twisted_mta.delivery.local import OnReceipt
    from twisted_mta.inbound.server import listener_factory
    from twisted_mta.logsetup import TurnBufferedStream, classic_text_formatter, install_json_log
    from twisted_mta.queue.committer import start_committer
    from twisted_mta.queue.spool import Spool
    from twisted_mta.tlsserver import server_context
    from twisted_mta.users import UserDatabase

    globalLogBeginner.beginLoggingTo([FileLogObserver(TurnBufferedStream(sys.stdout, reactor),
                                                      classic_text_formatter())],
                                     redirectStandardIO=False)
    try:
        config = load_config(args.config)
        ctx = server_context(config.tls)
        users = UserDatabase.load(config.auth.users_file) if config.auth.enabled else None
        signer = None
        if config.dkim.domains:  # checked by the main process already
            from twisted_mta.dkim import Signer
            signer = Signer.from_config(config)
        if config.logging.format == "json":
            install_json_log(config.logging.file, reactor)
    except (ConfigError, OSError, Exception) as e:  # one line, as the main process says
        print(f"twisted-mta worker {args.index}: cannot start: {e}", file=sys.stderr)
        return 1
    pool = threadpool.ThreadPool(minthreads=2, maxthreads=16, name="worker-io")
    pool.start()
    reactor.addSystemEventTrigger("after", "shutdown", pool.stop)

    def run_blocking(f, *a):
        return deferToThreadPool(reactor, pool, f, *a)

    spool = Spool(config.spool, run_blocking=run_blocking)
    spool.committer = start_committer(spool.path, reactor, run_blocking)
    on_receipt = OnReceipt.from_settings(config.local, config.hostname)
    ports = []
    for spec in args.listener:
        n, fd, family = spec.split(":")
        listener = config.listeners[int(n)]
        factory = listener_factory(config, listener, spool, reactor, on_queued=notify,
                                   on_delivered=notify_delivered, milter_result=notify_milter,
                                   on_receipt=on_receipt, tls_context=ctx, users=users,
                                   run_blocking=run_blocking, signer=signer)
        ports.append(reactor.adoptStreamPort(int(fd), FAMILIES[family], factory))
        os.close(int(fd))
    sender = None
    if args.senders:
        from twisted_mta.delivery.remote import RemoteDelivery
        from twisted_mta.outbound.sender import Sender
        from twisted_mta.queue.delegated import WorkerAttempts
        from twisted_mta.queue.spool import REMOVE_GATHER, InlineReads
        reads = InlineReads(run_blocking)
        attempts = WorkerAttempts(
            config, spool, reactor, run_blocking, read=reads, remove_gather=REMOVE_GATHER,
            index=args.index, target_for=lambda pool: RemoteDelivery(pool, config.outbound, reads))
        sender = Sender(reactor, write_up, lambda observers, history: build_pool(
            config, reactor, run_blocking, observers, history, args.senders), config.outbound,
            attempts=attempts)
    reactor.addReader(_ParentPipe(reactor, sender.line if sender is not None else None))

    @defer.inlineCallbacks
    def close_ports():
        yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in ports])
        if sender is not None:
            yield sender.stop()
    reactor.addSystemEventTrigger("before", "shutdown", close_ports)
    log.info("worker {index}: receiving on {count} listener(s)", index=args.index,
             count=len(ports), event="workers.ready")
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
