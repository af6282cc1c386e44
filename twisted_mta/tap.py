"""
C{twistd mta}: options and the service tree.

    twistd -n mta --config conf/example.toml

A bad configuration, certificate or spool stops start-up with one line
naming the problem and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.python import threadpool, usage

from twisted_mta.config import ConfigError, load_config
from twisted_mta.inbound.server import InboundFactory
from twisted_mta.logsetup import install_json_log
from twisted_mta.queue.manager import QueueManager
from twisted_mta.queue.spool import Spool, SpoolError
from twisted_mta.tlsserver import TLSSetupError, server_context
from twisted_mta.users import UserDatabase, UsersFileError


class Options(usage.Options):
    optParameters = [["config", "c", None, "Path to the TOML configuration file."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self["parsed"] = load_config(self["config"])
        except ConfigError as e:
            # Not a usage mistake: one line, without twistd's usage text.
            sys.stderr.write(f"twistd: {e}\n")
            raise SystemExit(1)


class ThreadPoolService(service.Service):
    """
    The pool that runs blocking file work (fsync) off the reactor thread.
    """

    def __init__(self, pool: threadpool.ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        service.Service.startService(self)
        self.pool.start()

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.pool.stop()


class SpoolLockService(service.Service):
    """
    Holds the spool lock for the life of the process: one owner per spool.
    """

    def __init__(self, spool: Spool) -> None:
        self.spool = spool

    def stopService(self) -> None:
        service.Service.stopService(self)
        self.spool.unlock()


class OrderedMultiService(service.MultiService):
    """
    Stops its children one after another, last started first, waiting for
    each: listeners close before the queue manager finishes its attempts,
    and the thread pool those attempts run in stops last.
    """

    @defer.inlineCallbacks
    def stopService(self):
        service.Service.stopService(self)
        for child in reversed(list(self)):
            yield defer.maybeDeferred(child.stopService)


def make_service(config, reactor, owner: tuple[int, int] | None = None) -> service.MultiService:
    """
    The service tree for C{config}.

    @param owner: the uid and gid twistd will switch to (C{--uid}/C{--gid})
        after binding the ports; the spool, created and locked here while
        still root, is handed to them.
    """
    from twisted.internet.threads import deferToThreadPool

    top = OrderedMultiService()
    pool = threadpool.ThreadPool(minthreads=2, maxthreads=16, name="mta-io")
    ThreadPoolService(pool).setServiceParent(top)

    def run_blocking(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    spool = Spool(config.spool, run_blocking=run_blocking)
    spool.lock()
    if owner is not None:
        spool.chown(*owner)
    SpoolLockService(spool).setServiceParent(top)
    if config.logging.format == "json":
        install_json_log(config.logging.file)

    from twisted_mta.outbound.pool import DNSResolver, OutboundPool, tcp_connector
    from twisted_mta.metrics import Metrics
    from twisted_mta.outbound.shadow import ShadowLog
    from twisted_mta.outbound.history import TLSHistory, history_path
    metrics = Metrics()
    tls = config.outbound.tls
    history = TLSHistory(history_path(config.spool), reactor, run_blocking,
                         expiry=tls.history_expiry, broken_after=tls.broken_tls_after,
                         broken_time=tls.broken_tls_time)
    history.load()
    outbound = OutboundPool(
        settings=config.outbound, hostname=config.hostname, clock=reactor,
        run_blocking=run_blocking, resolver=DNSResolver(config.dns),
        connect=tcp_connector(reactor, config.outbound.connect_timeout),
        observers=[ShadowLog(config.spool, run_blocking), metrics], history=history)
    manager = QueueManager(config, spool, reactor, run_blocking, outbound=outbound,
                           observers=[metrics])
    metrics.watch_queue(lambda: manager.states)
    manager.setServiceParent(top)
    ctx = server_context(config.tls)
    users = UserDatabase.load(config.auth.users_file) if config.auth.enabled else None
    for listener in config.listeners:
        factory = InboundFactory(config, listener.role, spool, reactor,
                                 on_queued=manager.enqueue, tls_context=ctx,
                                 users=users, run_blocking=run_blocking)
        endpoint = endpoints.serverFromString(reactor, with_backlog(listener.endpoint))
        if listener.role == "submissions":
            endpoint = endpoints.wrapServerTLS(ctx, endpoint)
        svc = _endpoint_service(endpoint, factory)
        svc.setName(f"listener-{listener.role}-{listener.endpoint}")
        svc.setServiceParent(top)
    if config.metrics.endpoint:
        from twisted.web.server import Site
        site = Site(metrics.resource())
        site.noisy = False
        svc = _endpoint_service(endpoints.serverFromString(reactor, config.metrics.endpoint),
                                site)
        svc.setName(f"metrics-{config.metrics.endpoint}")
        svc.setServiceParent(top)
    top.metrics = metrics
    return top


DEFAULT_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """
    Add a listen backlog to TCP endpoint strings that set none.

    Twisted's default of 50 drops connection attempts when many clients
    connect at once; each dropped SYN costs the client a one-second retry.
    """
    kind = description.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in description:
        return description + f":backlog={DEFAULT_BACKLOG}"
    return description


def _endpoint_service(endpoint, factory):
    from twisted.application.internet import StreamServerEndpointService

    svc = StreamServerEndpointService(endpoint, factory)
    svc._raiseSynchronously = True
    return svc


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    parent = getattr(options, "parent", None) or {}
    uid, gid = parent.get("uid"), parent.get("gid")
    owner = None
    if uid is not None and os.getuid() == 0:
        owner = (uid, gid if gid is not None else -1)
    try:
        return make_service(options["parsed"], reactor, owner)
    except (SpoolError, TLSSetupError, UsersFileError) as e:
        # twistd reports a UsageError from here with a traceback; this is
        # an operator's mistake, so one line and a non-zero exit instead.
        sys.stderr.write(f"twistd: {e}\n")
        raise SystemExit(1)
