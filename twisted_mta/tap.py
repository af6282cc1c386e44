"""
C{twistd mta}: options and the service tree.

    twistd -n mta --config conf/example.toml

A bad configuration, certificate, plugin or spool stops start-up with one
line naming the problem and a non-zero exit, not a traceback.  Everything
that can fail without touching the spool or the network is built once by
L{prepare}, which C{twisted-mta config check} calls too: a configuration
that passes the check starts.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import TYPE_CHECKING

import attrs
from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python import threadpool, usage

from twisted_mta.config import Config, ConfigError, OutboundTLSSettings, load_config
from twisted_mta.inbound.server import listener_factory
from twisted_mta.logsetup import install_json_log, speed_up_text_log
from twisted_mta.queue.committer import start_committer
from twisted_mta.queue.manager import REMOVE_GATHER, QueueManager
from twisted_mta.queue.spool import InlineReads, Spool, SpoolError
from twisted_mta.tlsserver import TLSSetupError, server_context
from twisted_mta.users import UserDatabase, UsersFileError

if TYPE_CHECKING:
    from twisted.internet.ssl import CertificateOptions

    from twisted_mta.dkim import Signer
    from twisted_mta.outbound.attempt import DNSResolver
    from twisted_mta.tls.engine import TLSEngine
    from twisted_mta.tls.entries import TLSEntry

log = Logger()


class PrepareError(Exception):
    """
    Something the configuration names cannot be built; C{str()} is one line.
    """


@attrs.frozen
class Prepared:
    """
    What the service builds from the configuration that can fail, built
    without side effects (no spool lock, no listening port).
    """

    tls: TLSEngine  # outbound policies, deciders and plugins
    tls_entries: tuple[TLSEntry, ...]  # each policy entry with its effective decider
    server_tls: CertificateOptions | None  # our certificate; None without [tls]
    users: UserDatabase | None  # the AUTH users; None without [auth]
    resolver: DNSResolver  # outbound DNS
    dkim: Signer | None = None  # the [dkim] keys, read and checked; None without keys


def prepare_tls(config: Config) -> tuple[TLSEngine, tuple[TLSEntry, ...]]:
    """
    The outbound TLS engine and its policy entries with their effective
    deciders: every plugin loaded, every policy and decider the file names
    looked up (L{named_in}).  The one place that checks them, for
    C{twistd mta}, C{config check} and C{config show}; each failure is one
    line naming the file and the key.
    """
    from twisted_mta.tls.engine import TLSConfigError, TLSEngine, load_registry
    from twisted_mta.tls.entries import named_in, tls_entries
    settings = config.outbound.tls
    try:
        registry = load_registry(settings.plugins)
    except TLSConfigError as e:
        # Keyed to [outbound.tls] plugins when the file sets anything there;
        # without TLS settings a broken dropin is the dropin's alone.
        if settings == OutboundTLSSettings():
            raise PrepareError(str(e))
        raise PrepareError(f"{config.path}: outbound.tls.plugins: {e}")
    for key, name, kind in named_in(config.outbound):
        try:
            registry.policy(name) if kind == "policy" else registry.decider(name)
        except TLSConfigError as e:
            raise PrepareError(f"{config.path}: {key}: {e}")
    try:
        engine = TLSEngine(settings, registry=registry)
        return engine, tls_entries(engine, config.outbound)
    except TLSConfigError as e:  # a plugin policy that raises
        raise PrepareError(f"{config.path}: {e}")
    except (OSError, UnicodeError) as e:  # the explanation template
        raise PrepareError(f"{settings.explanation}: cannot be read: "
                           f"{getattr(e, 'strerror', None) or e}")


def prepare(config: Config) -> Prepared:
    """
    Build every fallible part of the service for C{config}, or raise
    L{PrepareError}.  C{twistd mta} (before it forks or binds) and
    C{twisted-mta config check} both call this, so they agree.
    """
    from twisted_mta import nodoh  # noqa: F401  (before any dns module)
    import dns.exception

    from twisted_mta.outbound.attempt import DNSResolver
    engine, entries = prepare_tls(config)
    try:
        ctx = server_context(config.tls)
        users = UserDatabase.load(config.auth.users_file) if config.auth.enabled else None
    except (TLSSetupError, UsersFileError) as e:
        raise PrepareError(str(e))
    try:
        resolver = DNSResolver(config.dns)
    except dns.exception.DNSException as e:
        raise PrepareError(f"{config.path}: dns.nameservers: none set, and the system's "
                           f"resolver configuration cannot be used: {e}")
    if config.outbound.tls.mta_sts:
        _trust_root(config.outbound.tls.sts_ca_file)  # fails here, not at start-up
    from twisted_mta.workers import SHAREABLE, worker_count
    if worker_count(config):
        for n, listener in enumerate(config.listeners):
            kind = listener.endpoint.split(":", 1)[0].lower()
            if kind not in SHAREABLE:
                raise PrepareError(
                    f"{config.path}: listeners[{n}].endpoint: a {kind!r} endpoint cannot be "
                    f"shared with worker processes (use {', '.join(SHAREABLE)}), or set "
                    "[server] workers = 0")
    if config.logging.file:
        folder = os.path.dirname(config.logging.file)
        if not os.path.isdir(folder):
            raise PrepareError(f"{config.path}: logging.file: no such directory: {folder}")
    if config.tlsrpt.enabled:
        _trust_root(config.tlsrpt.ca_file, "tlsrpt.ca_file")  # fails here, not at start-up
    signer = None
    if config.dkim.domains:
        from twisted_mta.dkim import DKIMKeyError, Signer
        try:
            signer = Signer.from_config(config)
        except DKIMKeyError as e:
            raise PrepareError(str(e))
    return Prepared(tls=engine, tls_entries=entries, server_tls=ctx, users=users,
                    resolver=resolver, dkim=signer)


class Options(usage.Options):
    optParameters = [["config", "c", None, "Path to the TOML configuration file."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config FILE is required")
        try:
            self["parsed"] = load_config(self["config"])
            self["prepared"] = prepare(self["parsed"])
        except (ConfigError, PrepareError) as e:
            # Not a usage mistake: one line, without twistd's usage text.
            sys.stderr.write(f"twistd: {e}\n")
            raise SystemExit(1)


# Threads of the main process's pool for reading queue entries (make_service).
READ_THREADS = 2


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


class PublishedService(service.Service):
    """
    Starts the check that the resolver validates (DANE stays off until it
    says so); delivery waits for it only where it needs DANE.
    """

    def __init__(self, published) -> None:
        self.published = published

    def startService(self) -> None:
        service.Service.startService(self)
        self.published.start()


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


def describe_failure(error: BaseException) -> str:
    """
    A start-up failure in one line: our own errors as they are, a file
    system error with its path, anything else with its type.
    """
    from twisted.internet.error import CannotListenError
    if isinstance(error, (SpoolError, PrepareError, CannotListenError)):
        return " ".join(str(error).split())
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class MTAService(OrderedMultiService):
    """
    The top of the service tree: a start-up that cannot complete (a
    listener that cannot listen, a spool recovery that raises, any child's
    start that fails) stops twistd at once with one line saying why and a
    non-zero exit, instead of a traceback and a process that stays alive
    on its thread pool with its ports bound and no reactor to greet.
    """

    # twistd's options (pidfile, statusPipe when daemonized), from makeService.
    twistd_config: dict | None = None

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()  # the listeners bind here
            except Exception as e:
                self._abandon(f"{child.name or type(child).__name__} cannot start", e)

    def startService(self) -> None:
        speed_up_text_log()  # twistd's text log, begun by now: same lines, cheaper
        service.Service.startService(self)
        for child in self:
            try:
                child.startService()
            except Exception as e:
                self._abandon(f"{child.name or type(child).__name__} cannot start", e)

    def _abandon(self, what: str, error: Exception) -> None:
        line = f"twistd: start-up failed: {what}: {describe_failure(error)}"
        log.critical("{line}", line=line, event="startup.failed")
        # Stop what started (the thread pool first of all: its threads would
        # keep the process alive), without waiting for the reactor.
        for child in reversed(list(self)):
            if child.running:
                try:
                    child.stopService()
                except Exception:
                    pass
        self.running = False
        config = self.twistd_config or {}
        pipe = config.get("statusPipe")
        if pipe is not None:
            # Daemonized: the waiting parent prints this and exits 1.
            try:
                os.write(pipe, b"1 " + line.encode("ascii", "backslashreplace")[:98])
                os.close(pipe)
            except OSError:
                pass
        pidfile = config.get("pidfile")
        if pidfile:
            try:
                with open(pidfile) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(pidfile)
            except (OSError, ValueError):
                pass
        raise SystemExit(1)


def make_published(config: Config, reactor, run_blocking, resolver):
    """
    The look-ups of what destinations publish (DANE, MTA-STS), as
    C{[outbound.tls] dane} and C{mta_sts} say; None when both are off.
    The MTA-STS cache is read from the spool here (blocking: start-up).
    DANE is only on once L{Published.start} has found the resolver
    validating.
    """
    from twisted_mta.tls import dnssec
    from twisted_mta.tls.published import Published
    from twisted_mta.tls.sts_cache import PolicyCache, cache_directory
    from twisted_mta.tls.sts_fetch import PolicyFetcher
    tls, dns_settings = config.outbound.tls, config.dns
    if not (tls.dane or tls.mta_sts) or config.outbound.smarthost is not None:
        return None  # (with a smarthost for every domain, no MX is ever used)
    dane_resolver = None
    if tls.dane:
        servers = dns_settings.nameservers or tuple(system_nameservers())
        if servers:
            dane_resolver = dnssec.make_resolver(servers, dns_settings.timeout,
                                                 dns_settings.trusted_resolvers,
                                                 dns_settings.cache_ttl)
    cache = None
    if tls.mta_sts:
        fetcher = PolicyFetcher(
            reactor, resolve=lambda host: run_blocking(resolver.addresses, host),
            trust_root=_trust_root(tls.sts_ca_file), port=tls.sts_port,
            timeout=tls.sts_fetch_timeout)
        cache = PolicyCache(cache_directory(config.spool), fetcher.fetch, reactor, run_blocking,
                            txt_lookup=lambda domain: run_blocking(resolver.sts_txt, domain),
                            refresh_interval=tls.sts_refresh_interval,
                            retry_interval=tls.sts_retry_interval)
        cache.load()
    no_resolver = None
    if tls.dane and dane_resolver is None:
        no_resolver = ("no name server is configured ([dns] nameservers) and the system's "
                       "resolver configuration names none")
    return Published(run_blocking=run_blocking, dane_resolver=dane_resolver,
                     check_names=(dns_settings.dnssec_secure_name,
                                  dns_settings.dnssec_bogus_name),
                     sts_cache=cache, no_resolver=no_resolver)


def system_nameservers() -> list[str]:
    """The name servers of /etc/resolv.conf; empty when it cannot be read."""
    from twisted_mta import nodoh  # noqa: F401  (before any dns module)
    import dns.resolver
    try:
        return list(dns.resolver.Resolver().nameservers)
    except Exception:
        return []


def _trust_root(path: str | None, key: str = "outbound.tls.sts_ca_file"):
    """
    The roots in the PEM file C{path} for policy hosts' HTTPS; None for the
    system's.  L{PrepareError} (one line) for a file that cannot be read
    or holds no certificate.
    """
    if path is None:
        return None
    from OpenSSL import crypto
    from twisted.internet import ssl
    try:
        with open(path, "rb") as f:
            data = f.read()
        marker = b"-----END CERTIFICATE-----"
        pems = [block + marker for block in data.split(marker) if b"-----BEGIN" in block]
        roots = [ssl.Certificate.loadPEM(p) for p in pems]
    except OSError as e:
        raise PrepareError(f"{key}: {path}: {e.strerror}")
    except (crypto.Error, ValueError) as e:
        raise PrepareError(f"{key}: {path}: not a PEM certificate ({e})")
    if not roots:
        raise PrepareError(f"{key}: {path}: no PEM certificate in it")
    return ssl.trustRootFromCertificates(roots)


def make_service(config, reactor, owner: tuple[int, int] | None = None,
                 prepared: Prepared | None = None) -> service.MultiService:
    """
    The service tree for C{config}.

    @param owner: the uid and gid twistd will switch to (C{--uid}/C{--gid})
        after binding the ports; the spool, created and locked here while
        still root, is handed to them.
    @param prepared: L{prepare}'s result for C{config}; built here if not
        given (raises L{PrepareError}).
    """
    from twisted.internet.threads import deferToThreadPool

    if prepared is None:
        prepared = prepare(config)
    top = MTAService()
    pool = threadpool.ThreadPool(minthreads=2, maxthreads=16, name="mta-io")
    ThreadPoolService(pool).setServiceParent(top)
    # Reading queue entries and messages: short work on the page cache,
    # run on the reactor thread (InlineReads); only while the disk is slow
    # does it go to a pool of its own, a few threads, not the sixteen that
    # fsyncs and DNS look-ups need (each thread's Python competes with the
    # reactor for the GIL, docs/benchmarks.md).
    reads = threadpool.ThreadPool(minthreads=0, maxthreads=READ_THREADS, name="mta-read")
    ThreadPoolService(reads).setServiceParent(top)

    def run_blocking(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    def read_in_thread(f, *args):
        return deferToThreadPool(reactor, reads, f, *args)

    run_reading = InlineReads(read_in_thread)

    spool = Spool(config.spool, run_blocking=run_blocking)
    spool.lock()
    spool.committer = start_committer(spool.path, reactor, run_blocking)
    from twisted_mta.inbound.pickup import prepare_maildrop
    try:
        prepare_maildrop(config.spool, owner)
    except OSError as e:
        raise SpoolError(f"cannot prepare the maildrop in {config.spool}: {e.strerror}")
    if owner is not None:
        spool.chown(*owner)
    SpoolLockService(spool).setServiceParent(top)
    if config.logging.format == "json":
        try:
            install_json_log(config.logging.file, reactor)
        except OSError as e:
            raise PrepareError(f"{config.logging.file}: cannot be opened: {e.strerror}")

    from twisted_mta.outbound.attempt import tcp_connector
    from twisted_mta.outbound.pool import OutboundPool
    from twisted_mta.metrics import Metrics
    from twisted_mta.tls.shadow import ShadowLog
    from twisted_mta.tls.history import TLSHistory, history_path
    metrics = Metrics()
    tls = config.outbound.tls
    history = TLSHistory(history_path(config.spool), reactor, run_blocking,
                         expiry=tls.history_expiry, broken_after=tls.broken_tls_after,
                         broken_time=tls.broken_tls_time)
    history.load()
    for entry in prepared.tls_entries:
        warning = entry.warning()
        if warning:
            log.warn("{warning}", warning=warning.removeprefix("warning: "),
                     event="config.tls_warning")
    published = make_published(config, reactor, run_blocking, prepared.resolver)
    if published is not None:
        PublishedService(published).setServiceParent(top)
    observers = [ShadowLog(config.spool, run_blocking), metrics]
    if config.tlsrpt.enabled:  # TLS reporting counts the TLS outcomes (RFC 8460)
        from twisted_mta.tlsrpt.store import Aggregate, AggregateService, directory_of
        aggregate = Aggregate(directory_of(config.spool), reactor, run_blocking,
                              config.tlsrpt.skip_domains)
        AggregateService(aggregate).setServiceParent(top)  # stops after the manager
        observers.append(aggregate)
        if published is not None and published.sts_cache is not None:
            published.sts_cache.observers.append(aggregate)  # failed policy fetches
    from twisted_mta.workers import (SharedListener, WorkerPool, WorkerSending, sending_shares,
                                     worker_count)
    workers = worker_count(config)
    sends_in_workers = bool(workers and config.outbound.send_in_workers)
    # With workers, they send too, and so does this process; each pool has
    # its share of the connection limits.
    settings, main_sends = sending_shares(config.outbound, workers) if sends_in_workers else (
        config.outbound, True)
    outbound = OutboundPool(
        settings=settings, hostname=config.hostname, clock=reactor,
        run_blocking=run_blocking, resolver=prepared.resolver,
        connect=tcp_connector(reactor, config.outbound.connect_timeout),
        observers=observers, history=history,
        tls=prepared.tls, published=published)
    from twisted_mta.delivery.local import OnReceipt
    from twisted_mta.delivery.remote import RemoteDelivery
    from twisted_mta.delivery.routing import make_local_target
    from twisted_mta.queue.manager import Targets
    sending = WorkerSending(
        outbound, history, outbound.observers, main_sends, keep=settings.connections,
        sts_cache=published.sts_cache if published is not None else None, read=run_reading,
        delegates=config.outbound.attempts_in_workers
    ) if sends_in_workers else None
    targets = Targets(
        local=make_local_target(config.local, config.hostname, reactor, run_blocking),
        remote=RemoteDelivery(sending or outbound, config.outbound, run_reading))
    from twisted_mta.queue import control
    manager = QueueManager(config, spool, reactor, run_blocking, targets, run_reading=run_reading,
                           remove_gather=REMOVE_GATHER,
                           watch_control=functools.partial(control.watch, reactor),
                           observers=[metrics], tls_history=history,
                           sts_cache=published.sts_cache if published is not None else None,
                           after_load=freeze_gc, signer=prepared.dkim, delegate=sending)
    metrics.watch_queue(manager.state_counts)
    manager.setServiceParent(top)
    # The sendmail command's drops: picked up here, in the process that
    # owns the spool (never in a worker), after the manager has started.
    from twisted_mta.inbound.pickup import PickupService
    PickupService(config, spool, reactor, run_blocking, manager.enqueue,
                  signer=prepared.dkim).setServiceParent(top)
    if config.tlsrpt.enabled:
        make_report_schedule(config, reactor, run_blocking, spool, manager, prepared,
                             [metrics], outbound.observers).setServiceParent(top)
    ctx, users = prepared.server_tls, prepared.users
    on_receipt = OnReceipt.from_settings(config.local, config.hostname)
    shared = []
    for listener in config.listeners:
        factory = listener_factory(
            config, listener, spool, reactor, on_queued=manager.enqueue,
            on_delivered=manager.delivered_on_receipt,
            milter_result=lambda name, result: metrics(
                "milter.result", {"milter": name, "result": result}),
            on_receipt=on_receipt, tls_context=ctx, users=users, run_blocking=run_blocking,
            signer=prepared.dkim)
        if workers:  # the socket is shared: the workers adopt it, we accept on it too
            svc = SharedListener(reactor, with_backlog(listener.endpoint), factory)
            shared.append(svc)
        else:
            svc = _endpoint_service(
                endpoints.serverFromString(reactor, with_backlog(listener.endpoint)), factory)
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
    if workers:
        WorkerPool(config, reactor, workers, shared, spool, manager,
                   run_blocking, observers=[metrics], sending=sending).setServiceParent(top)
    top.metrics = metrics
    return top


def make_report_schedule(config: Config, reactor, run_blocking, spool: Spool,
                         manager: QueueManager, prepared: Prepared, observers: list,
                         outbound_observers: list):
    """
    The daily TLS reports (RFC 8460): their sender (mail through the
    queue, HTTPS with treq) and schedule; C{tls report send --now} reaches
    it through the queue manager's operator requests.
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    from twisted_mta.metrics import notify
    from twisted_mta.outbound.mx import lookup_addresses, make_resolver
    from twisted_mta.tlsrpt import record, store
    from twisted_mta.tlsrpt.schedule import ReportSchedule, from_address
    from twisted_mta.tlsrpt.send import (
        CollectorEndpoints, HTTPSReports, MailReports, ReportSender,
    )

    settings = config.tlsrpt
    dns = config.dns
    resolver = make_resolver(dns.nameservers or None, dns.timeout, dns.cache_ttl)
    collectors = CollectorEndpoints(
        reactor, lambda host: run_blocking(lookup_addresses, resolver, host),
        _trust_root(settings.ca_file, "tlsrpt.ca_file"), settings.https_timeout)
    agent = Agent.usingEndpointFactory(reactor, collectors,
                                       pool=HTTPConnectionPool(reactor, persistent=False))
    client = HTTPClient(agent)
    mail = MailReports(spool, manager.enqueue, prepared.dkim, reactor,
                       from_address(settings), config.hostname)
    sender = ReportSender(mail, HTTPSReports(reactor, client.request, settings.https_timeout,
                                             settings.https_retry_for),
                          lambda name, e: notify(observers, name, e, log, "tlsrpt.error"))
    aggregate = next((o for o in outbound_observers if isinstance(o, store.Aggregate)), None)
    schedule = ReportSchedule(
        settings, store.directory_of(config.spool), sender,
        lambda domain: run_blocking(record.discover, resolver, domain), reactor, run_blocking,
        aggregate=aggregate)
    manager.tlsrpt = schedule
    return schedule


def freeze_gc() -> None:
    """
    Leave what start-up built (the loaded queue above all) out of the
    garbage collector's full collections: at 100,000 entries each one
    walked a million objects, a pause of about 100 ms every few seconds
    of a flush.  Those objects are still freed by reference counting.
    """
    import gc
    gc.freeze()


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
        top = make_service(options["parsed"], reactor, owner, options.get("prepared"))
    except (SpoolError, PrepareError) as e:
        # twistd reports a UsageError from here with a traceback; this is
        # an operator's mistake, so one line and a non-zero exit instead.
        sys.stderr.write(f"twistd: {e}\n")
        raise SystemExit(1)
    top.twistd_config = parent
    return top
