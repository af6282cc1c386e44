"""
Parse the one TOML configuration file into a frozen L{Config}.

Everything the MTA reads from the operator passes through here once, at
start-up.  Unknown keys, wrong types, bad values and missing files are
L{ConfigError}s that name the file and the dotted key, so C{twistd mta} and
C{twisted-mta config check} can print one line instead of a traceback.

Relative paths in the file are relative to the directory holding the file, so
the shipped example works from any working directory.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from typing import Any, Iterable, Mapping

import attrs

ROLES = ("mx", "submission", "submissions")
BARE_NEWLINE_POLICIES = ("normalize", "reject")
LOG_FORMATS = ("text", "json")

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")


class ConfigError(Exception):
    """
    The configuration cannot be used; C{str()} is the whole message.
    """

    def __init__(self, path: str, key: str, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + message)


@attrs.frozen
class Listener:
    role: str
    endpoint: str


@attrs.frozen
class TLSServerSettings:
    certificate: str | None = None
    key: str | None = None

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@attrs.frozen
class LocalSettings:
    domains: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    mailbox: str = "mail/{user}/Maildir"
    aliases: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    postmaster: str = "postmaster"


@attrs.frozen
class RelaySettings:
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")


@attrs.frozen
class Limits:
    message_size: int = 25 * 1024 * 1024
    recipients: int = 100
    command_line_length: int = 2048
    data_line_length: int = 8192
    connections_per_ip: int = 20
    connections: int = 500
    command_timeout: int = 300
    data_timeout: int = 600
    received_headers: int = 100
    errors: int = 20


@attrs.frozen
class InboundSettings:
    bare_newline: str = "normalize"
    banner: str = "ESMTP"


@attrs.frozen
class QueueSettings:
    retry_schedule: tuple[int, ...] = (300, 600, 1200, 2400, 3600, 7200, 14400)
    lifetime: int = 5 * 86400
    delay_warning: int | None = 4 * 3600  # None: no delay warnings
    delivery_concurrency: int = 100  # queue entries being attempted at once
    jitter: float = 0.1


@attrs.frozen
class AuthSettings:
    users_file: str | None = None
    sender_login_match: bool = False
    max_failures: int = 5
    failure_window: int = 600

    @property
    def enabled(self) -> bool:
        return self.users_file is not None


@attrs.frozen
class DNSSettings:
    nameservers: tuple[str, ...] = ()  # empty: the system's resolver configuration
    timeout: int = 10


TLS_MODES = ("starttls", "implicit")


@attrs.frozen
class Smarthost:
    """
    A next hop that replaces MX lookup for some or all remote domains.
    """

    host: str  # a name (looked up as A/AAAA, never MX) or an IP address
    port: int = 25
    tls: str = "starttls"  # "starttls" (opportunistic unless credentials) or "implicit"
    username: str | None = None
    password_file: str | None = None
    tls_policy: str | None = None  # the TLS policy for this smarthost (else the map's)
    tls_fallback: str | None = None

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}"


@attrs.frozen
class TLSPolicyEntry:
    policy: str
    fallback: str | None = None
    min_version: str | None = None
    ciphers: str | None = None
    ca_file: str | None = None
    server_name: str | None = None
    shadow: str | None = None  # a stricter policy evaluated on the same handshakes
    ratchet: bool | None = None  # None: the default's setting


@attrs.frozen
class OutboundTLSSettings:
    policy: str = "opportunistic"  # the default policy
    shadow: str | None = None  # the default's shadow policy (report-only)
    fallback: str | None = None  # the default entry's decider (None: by its policy)
    ca_file: str | None = None  # trust roots for verification (default: the system's)
    domains: tuple[tuple[str, TLSPolicyEntry], ...] = ()  # "example.com" or ".example.com"
    mx_hosts: tuple[tuple[str, TLSPolicyEntry], ...] = ()  # glob patterns on the MX name
    relay: Smarthost | None = None  # for the via-relay decider
    early_warning: tuple[str, ...] = ("strict",)  # policies that warn at the first failure
    plugins: tuple[str, ...] = ()  # dotted paths of extra policies/deciders
    explanation: str | None = None  # a file with the bounce wording for TLS failures
    ratchet: bool = False  # never below the best TLS a domain has shown (opt-in)
    history_expiry: int = 30 * 86400
    broken_tls_after: int = 3  # handshake failures in a row that mark TLS broken
    broken_tls_time: int = 86400  # how long broken TLS is skipped (opportunistic only)


@attrs.frozen
class OutboundSettings:
    port: int = 25
    helo_name: str | None = None  # None: server.hostname
    connect_timeout: int = 30
    greeting_timeout: int = 300  # RFC 5321 4.5.3.2
    command_timeout: int = 300
    data_timeout: int = 600
    handshake_timeout: int = 300  # the TLS handshake (Postfix: smtp_starttls_timeout)
    connections: int = 100  # all destinations together
    connections_per_destination: int = 20
    idle_time: int = 5  # an idle connection waits this long for another message
    dead_destination_time: int = 60  # after every host failed, fail fast this long
    messages_per_connection: int = 100
    smarthost: Smarthost | None = None
    routes: tuple[tuple[str, Smarthost], ...] = ()  # (domain or .parent, smarthost)
    tls: OutboundTLSSettings = OutboundTLSSettings()

    def smarthost_for(self, domain: str) -> Smarthost | None:
        """
        The smarthost for C{domain}: an exact route, then the nearest
        C{.parent} route, then the default; None means deliver by MX.
        """
        domain = domain.lower()
        routes = dict(self.routes)
        if domain in routes:
            return routes[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in routes:
                return routes[parent]
        return self.smarthost


@attrs.frozen
class LoggingSettings:
    format: str = "text"
    file: str | None = None


@attrs.frozen
class MetricsSettings:
    endpoint: str | None = None  # a Twisted server endpoint for the Prometheus page


@attrs.frozen
class Config:
    path: str
    hostname: str
    spool: str
    listeners: tuple[Listener, ...]
    tls: TLSServerSettings = TLSServerSettings()
    local: LocalSettings = LocalSettings()
    relay: RelaySettings = RelaySettings()
    limits: Limits = Limits()
    inbound: InboundSettings = InboundSettings()
    queue: QueueSettings = QueueSettings()
    auth: AuthSettings = AuthSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    dns: DNSSettings = DNSSettings()
    outbound: OutboundSettings = OutboundSettings()

    def to_dict(self) -> dict[str, Any]:
        """
        The effective configuration, defaults filled in, in the file's shape
        (unset optional keys are left out, as TOML has no null).
        """
        d = _plain(attrs.asdict(self, recurse=True))
        d.pop("path")
        out: dict[str, Any] = {"server": {"hostname": d.pop("hostname"),
                                          "spool": d.pop("spool")}}
        routes = d["outbound"].pop("routes")
        if routes:
            d["outbound"]["routes"] = {domain: host for domain, host in routes}
        tls = d["outbound"]["tls"]
        for key in ("domains", "mx_hosts"):
            entries = tls.pop(key)
            if entries:
                tls[key] = {name: entry for name, entry in entries}
        out.update(d)
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Table:
    """
    One TOML table being read; remembers which keys were used so the rest
    can be reported as unknown.
    """

    def __init__(self, path: str, prefix: str, data: Any) -> None:
        self.path = path
        self.prefix = prefix
        if not isinstance(data, dict):
            raise ConfigError(path, prefix, "must be a table")
        self.data = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(self.path, self.key(name), message)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(name)
        if name not in self.data:
            return default
        value = self.data[name]
        if kind is int and isinstance(value, bool):
            raise self.error(name, f"must be an integer, not {value!r}")
        if not isinstance(value, kind):
            raise self.error(name, f"must be {_kind_name(kind)}, not {value!r}")
        return value

    def require(self, name: str, kind: type) -> Any:
        if name not in self.data:
            self.used.add(name)
            raise self.error(name, "is required")
        return self.get(name, kind, None)

    def table(self, name: str) -> "_Table":
        self.used.add(name)
        return _Table(self.path, self.key(name), self.data.get(name, {}))

    def strings(self, name: str, default: Iterable[str]) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return tuple(default)
        for item in value:
            if not isinstance(item, str):
                raise self.error(name, f"must be a list of strings, not {value!r}")
        return tuple(value)

    def positive(self, name: str, default: int, minimum: int = 1) -> int:
        value = self.get(name, int, default)
        if value < minimum:
            raise self.error(name, f"must be at least {minimum}, not {value}")
        return value

    def duration(self, name: str, default: int) -> int:
        return _duration(self, name, self.get(name, (int, str), default))

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "a table",
             bool: "true or false", float: "a number"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _duration(table: _Table, name: str, value: int | str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise table.error(name, f"must be a duration like 30s, 5m, 4h or 5d, not {value!r}")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds <= 0:
        raise table.error(name, f"must be a positive duration, not {value!r}")
    return seconds


def _optional_duration(t: _Table, name: str, default: int | None) -> int | None:
    value = t.get(name, (int, str, bool), default)
    if value is False or value == 0:
        return None
    if value is True:
        raise t.error(name, "must be a duration, or false (or 0) to turn it off")
    return _duration(t, name, value)


def _resolve(base: str, value: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def load_config(path: str) -> Config:
    """
    Read and validate C{path}; raise L{ConfigError} for anything wrong.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file")
    except IsADirectoryError:
        raise ConfigError(path, "", "is a directory, not a configuration file")
    except PermissionError:
        raise ConfigError(path, "", "permission denied")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "", f"not valid TOML: {e}")
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: str) -> Config:
    base = os.path.dirname(os.path.abspath(path))
    top = _Table(path, "", raw)

    server = top.table("server")
    hostname = server.require("hostname", str)
    if not _HOSTNAME.match(hostname):
        raise server.error("hostname", f"is not a valid host name: {hostname!r}")
    spool = _resolve(base, server.require("spool", str))
    server.finish()

    listeners = _listeners(top)
    tls = _tls(top.table("tls"), base)
    for listener in listeners:
        if listener.role == "submissions" and not tls.enabled:
            raise ConfigError(path, "tls.certificate",
                              "is required by the 'submissions' listener (implicit TLS)")
    local = _local(top.table("local"), base)
    relay = _relay(top.table("relay"))
    limits = _limits(top.table("limits"))
    inbound = _inbound(top.table("inbound"))
    queue = _queue(top.table("queue"))
    auth = _auth(top.table("auth"), base)
    logging = _logging(top.table("logging"), base)
    dns = _dns(top.table("dns"))
    outbound = _outbound(top.table("outbound"), base)
    metrics = _metrics(top.table("metrics"))
    top.finish()
    for i, listener in enumerate(listeners):
        if listener.role != "mx" and auth.enabled and not tls.enabled:
            raise ConfigError(path, "tls.certificate",
                              f"is required by listeners[{i}] ({listener.role}) with [auth]: "
                              "credentials never cross cleartext")
    return Config(path=path, hostname=hostname.lower(), spool=spool, listeners=listeners,
                  tls=tls, local=local, relay=relay, limits=limits, inbound=inbound,
                  queue=queue, auth=auth, logging=logging, dns=dns, outbound=outbound,
                  metrics=metrics)


def _listeners(top: _Table) -> tuple[Listener, ...]:
    top.used.add("listeners")
    items = top.data.get("listeners")
    if items is None:
        raise top.error("listeners", "is required: add at least one [[listeners]] entry")
    if not isinstance(items, list) or not items:
        raise top.error("listeners", "must be a non-empty array of tables ([[listeners]])")
    result = []
    for i, item in enumerate(items):
        t = _Table(top.path, f"listeners[{i}]", item)
        role = t.require("role", str)
        if role not in ROLES:
            raise t.error("role", f"must be one of {', '.join(ROLES)}, not {role!r}")
        endpoint = t.require("endpoint", str)
        _check_endpoint(t, endpoint)
        t.finish()
        result.append(Listener(role=role, endpoint=endpoint))
    return tuple(result)


def _check_endpoint(t: _Table, description: str) -> None:
    from twisted.internet import endpoints

    class _NoReactor:
        pass

    try:
        endpoints.serverFromString(_NoReactor(), description)
    except Exception as e:  # Twisted raises several kinds for bad strings.
        raise t.error("endpoint", f"is not a valid Twisted endpoint ({description!r}): {e}")


def _tls(t: _Table, base: str) -> TLSServerSettings:
    cert = t.get("certificate", str, None)
    key = t.get("key", str, None)
    t.finish()
    if (cert is None) != (key is None):
        missing = "key" if key is None else "certificate"
        raise t.error(missing, "is required when the other of certificate/key is set")
    if cert is None:
        return TLSServerSettings()
    cert, key = _resolve(base, cert), _resolve(base, key)
    for name, value in (("certificate", cert), ("key", key)):
        if not os.path.isfile(value):
            raise t.error(name, f"file not found: {value}")
        if not os.access(value, os.R_OK):
            raise t.error(name, f"file not readable: {value}")
    return TLSServerSettings(certificate=cert, key=key)


def _domain(t: _Table, name: str, value: str) -> str:
    if not _HOSTNAME.match(value):
        raise t.error(name, f"is not a valid domain: {value!r}")
    return value.lower()


def _local(t: _Table, base: str) -> LocalSettings:
    domains = tuple(_domain(t, "domains", d) for d in t.strings("domains", ()))
    users = t.strings("users", ())
    for user in users:
        if not _LOCAL_PART.match(user) or user.startswith(".") or "/" in user:
            raise t.error("users", f"is not a valid mailbox name: {user!r}")
    mailbox = t.get("mailbox", str, LocalSettings().mailbox)
    if "{user}" not in mailbox:
        raise t.error("mailbox", "must contain {user}, e.g. \"mail/{user}/Maildir\"")
    try:
        mailbox.format(user="u", domain="d")
    except (KeyError, IndexError, ValueError) as e:
        raise t.error("mailbox", f"has a bad placeholder ({e}); use {{user}} and {{domain}}")
    postmaster = t.get("postmaster", str, "postmaster")
    aliases_t = t.table("aliases")
    aliases: dict[str, tuple[str, ...]] = {}
    for name, targets in aliases_t.data.items():
        aliases_t.used.add(name)
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets) or not targets:
            raise aliases_t.error(name, "must be an address or a non-empty list of addresses")
        aliases[name.lower()] = tuple(targets)
    aliases_t.finish()
    t.finish()
    if domains and not users and not aliases:
        raise t.error("users", "is empty: list the local mailboxes of the local domains")
    settings = LocalSettings(domains=domains, users=users,
                             mailbox=_resolve(base, mailbox), aliases=aliases,
                             postmaster=postmaster)
    pm = postmaster.lower()
    known = {u.lower() for u in users} | set(aliases)
    if domains and "@" not in postmaster and pm not in known:
        raise t.error("postmaster", f"names {postmaster!r}, which is neither a local user nor an alias")
    return settings


def _relay(t: _Table) -> RelaySettings:
    nets = t.strings("trusted_networks", RelaySettings().trusted_networks)
    for net in nets:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise t.error("trusted_networks", f"is not a network: {net!r}")
    t.finish()
    return RelaySettings(trusted_networks=nets)


def _limits(t: _Table) -> Limits:
    d = Limits()
    limits = Limits(
        message_size=t.positive("message_size", d.message_size, 1024),
        recipients=t.positive("recipients", d.recipients, 1),
        command_line_length=t.positive("command_line_length", d.command_line_length, 512),
        data_line_length=t.positive("data_line_length", d.data_line_length, 1000),
        connections_per_ip=t.positive("connections_per_ip", d.connections_per_ip),
        connections=t.positive("connections", d.connections),
        command_timeout=t.duration("command_timeout", d.command_timeout),
        data_timeout=t.duration("data_timeout", d.data_timeout),
        received_headers=t.positive("received_headers", d.received_headers, 10),
        errors=t.positive("errors", d.errors, 1),
    )
    t.finish()
    return limits


def _inbound(t: _Table) -> InboundSettings:
    bare = t.get("bare_newline", str, InboundSettings().bare_newline)
    if bare not in BARE_NEWLINE_POLICIES:
        raise t.error("bare_newline", f"must be one of {', '.join(BARE_NEWLINE_POLICIES)}, not {bare!r}")
    banner = t.get("banner", str, InboundSettings().banner)
    if "\r" in banner or "\n" in banner:
        raise t.error("banner", "must be one line")
    t.finish()
    return InboundSettings(bare_newline=bare, banner=banner)


def _queue(t: _Table) -> QueueSettings:
    d = QueueSettings()
    raw = t.get("retry_schedule", list, None)
    if raw is None:
        schedule = d.retry_schedule
    else:
        if not raw:
            raise t.error("retry_schedule", "must list at least one interval")
        schedule = tuple(_duration(t, "retry_schedule", v) for v in raw)
    jitter = t.get("jitter", (int, float), d.jitter)
    if not 0 <= jitter <= 0.5:
        raise t.error("jitter", f"must be between 0 and 0.5, not {jitter}")
    q = QueueSettings(
        retry_schedule=schedule,
        lifetime=t.duration("lifetime", d.lifetime),
        delay_warning=_optional_duration(t, "delay_warning", d.delay_warning),
        delivery_concurrency=t.positive("delivery_concurrency", d.delivery_concurrency),
        jitter=float(jitter),
    )
    t.finish()
    return q


def _auth(t: _Table, base: str) -> AuthSettings:
    d = AuthSettings()
    users_file = t.get("users_file", str, None)
    settings = AuthSettings(
        users_file=_resolve(base, users_file) if users_file else None,
        sender_login_match=t.get("sender_login_match", bool, d.sender_login_match),
        max_failures=t.positive("max_failures", d.max_failures),
        failure_window=t.duration("failure_window", d.failure_window),
    )
    t.finish()
    if settings.users_file is not None:
        from twisted_mta.users import UsersFileError, read_users_file
        try:
            read_users_file(settings.users_file)
        except UsersFileError as e:
            raise t.error("users_file", str(e))
    return settings


def _logging(t: _Table, base: str) -> LoggingSettings:
    fmt = t.get("format", str, "text")
    if fmt not in LOG_FORMATS:
        raise t.error("format", f"must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    file = t.get("file", str, None)
    t.finish()
    if fmt == "json" and file is None:
        raise t.error("file", "is required when format is \"json\"")
    return LoggingSettings(format=fmt, file=_resolve(base, file) if file else None)



def _dns(t: _Table) -> DNSSettings:
    servers = t.strings("nameservers", ())
    for server in servers:
        host = server[1:].partition("]")[0] if server.startswith("[") else (
            server.rpartition(":")[0] if server.count(":") == 1 else server)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise t.error("nameservers", f"must list IP addresses (with an optional :port), "
                          f"not {server!r}")
    settings = DNSSettings(nameservers=servers, timeout=t.duration("timeout", 10))
    t.finish()
    return settings


def _port(t: _Table, name: str, default: int) -> int:
    port = t.get(name, int, default)
    if not 0 < port < 65536:
        raise t.error(name, f"must be a TCP port (1-65535), not {port}")
    return port


def _smarthost(t: _Table, base: str) -> Smarthost:
    host = t.require("host", str)
    port = 25
    if host.startswith("["):  # [2001:db8::1]:587 or [relay.example]:587
        inner, _, rest = host[1:].partition("]")
        host = inner
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise t.error("host", f"must be host, host:port or [host]:port, not {rest!r}")
            port = int(rest[1:])
    elif host.count(":") == 1:
        host, _, number = host.partition(":")
        if not number.isdigit():
            raise t.error("host", f"has a port that is not a number: {number!r}")
        port = int(number)
    if not (_HOSTNAME.match(host) or _is_ip(host)):
        raise t.error("host", f"is not a host name or IP address: {host!r}")
    if "port" in t.data:
        port = _port(t, "port", port)
    if not 0 < port < 65536:
        raise t.error("host", f"has a port out of range: {port}")
    tls_policy = t.get("tls_policy", str, None)
    tls_fallback = t.get("tls_fallback", str, None)
    tls = t.get("tls", str, "starttls")
    if tls not in TLS_MODES:
        raise t.error("tls", f"must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    username = t.get("username", str, None)
    password_file = t.get("password_file", str, None)
    t.finish()
    if (username is None) != (password_file is None):
        raise t.error("username" if username is None else "password_file",
                      "is required with " + ("password_file" if username is None
                                             else "username"))
    if password_file is not None:
        password_file = _resolve(base, password_file)
        try:
            with open(password_file, "rb") as f:
                f.read(1)
        except OSError as e:
            raise t.error("password_file", f"cannot be read: {e.strerror}")
    return Smarthost(host=host.lower(), port=port, tls=tls, username=username,
                     tls_policy=tls_policy, tls_fallback=tls_fallback,
                     password_file=password_file)


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _outbound(t: _Table, base: str) -> OutboundSettings:
    d = OutboundSettings()
    helo = t.get("helo_name", str, None)
    if helo is not None and not _HOSTNAME.match(helo):
        raise t.error("helo_name", f"is not a valid host name: {helo!r}")
    smarthost = None
    if "smarthost" in t.data:
        smarthost = _smarthost(t.table("smarthost"), base)
    routes = []
    if "routes" in t.data:
        table = t.table("routes")
        for domain in table.data:
            table.used.add(domain)
            name = domain.lower()
            if not _HOSTNAME.match(name.lstrip(".")):
                raise table.error(domain, "must be a domain, or .domain for its subdomains")
            routes.append((name, _smarthost(table.table(domain), base)))
    settings = OutboundSettings(
        port=_port(t, "port", d.port),
        helo_name=helo.lower() if helo else None,
        connect_timeout=t.duration("connect_timeout", d.connect_timeout),
        greeting_timeout=t.duration("greeting_timeout", d.greeting_timeout),
        command_timeout=t.duration("command_timeout", d.command_timeout),
        data_timeout=t.duration("data_timeout", d.data_timeout),
        handshake_timeout=t.duration("handshake_timeout", d.handshake_timeout),
        connections=t.positive("connections", d.connections),
        connections_per_destination=t.positive("connections_per_destination",
                                               d.connections_per_destination),
        idle_time=t.duration("idle_time", d.idle_time),
        dead_destination_time=t.duration("dead_destination_time", d.dead_destination_time),
        messages_per_connection=t.positive("messages_per_connection",
                                           d.messages_per_connection),
        smarthost=smarthost,
        routes=tuple(routes),
        tls=_outbound_tls(t.table("tls"), base) if "tls" in t.data else OutboundTLSSettings(),
    )
    t.finish()
    return settings


TLS_VERSION_NAMES = ("TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")


def _tls_entry(t: _Table, base: str, default_policy: str | None = None) -> TLSPolicyEntry:
    policy = t.get("policy", str, default_policy)
    if policy is None:
        raise t.error("policy", "is required")
    min_version = t.get("min_version", str, None)
    if min_version is not None and min_version not in TLS_VERSION_NAMES:
        raise t.error("min_version", f"must be one of {', '.join(TLS_VERSION_NAMES)}, "
                      f"not {min_version!r}")
    ca_file = t.get("ca_file", str, None)
    entry = TLSPolicyEntry(
        policy=policy, fallback=t.get("fallback", str, None), min_version=min_version,
        ciphers=t.get("ciphers", str, None),
        ca_file=_resolve(base, ca_file) if ca_file else None,
        server_name=t.get("server_name", str, None),
        shadow=t.get("shadow", str, None),
        ratchet=t.get("ratchet", bool, None))
    if entry.ca_file and not os.path.isfile(entry.ca_file):
        raise t.error("ca_file", f"no such file: {entry.ca_file}")
    return entry


def _outbound_tls(t: _Table, base: str) -> OutboundTLSSettings:
    d = OutboundTLSSettings()
    ca_file = t.get("ca_file", str, None)
    if ca_file is not None:
        ca_file = _resolve(base, ca_file)
        if not os.path.isfile(ca_file):
            raise t.error("ca_file", f"no such file: {ca_file}")
    domains, mx_hosts = [], []
    if "domains" in t.data:
        table = t.table("domains")
        for domain in table.data:
            table.used.add(domain)
            if not _HOSTNAME.match(domain.lower().lstrip(".")):
                raise table.error(domain, "must be a domain, or .domain for its subdomains")
            domains.append((domain.lower(), _tls_entry(table.table(domain), base)))
    if "mx_hosts" in t.data:
        table = t.table("mx_hosts")
        for pattern in table.data:
            table.used.add(pattern)
            mx_hosts.append((pattern.lower(), _tls_entry(table.table(pattern), base)))
    relay = _smarthost(t.table("relay"), base) if "relay" in t.data else None
    explanation = t.get("explanation", str, None)
    settings = OutboundTLSSettings(
        policy=t.get("policy", str, d.policy),
        shadow=t.get("shadow", str, None),
        fallback=t.get("fallback", str, d.fallback),
        ca_file=ca_file,
        domains=tuple(domains),
        mx_hosts=tuple(mx_hosts),
        relay=relay,
        early_warning=t.strings("early_warning", d.early_warning),
        plugins=t.strings("plugins", ()),
        explanation=_resolve(base, explanation) if explanation else None,
        ratchet=t.get("ratchet", bool, d.ratchet),
        history_expiry=t.duration("history_expiry", d.history_expiry),
        broken_tls_after=t.positive("broken_tls_after", d.broken_tls_after),
        broken_tls_time=t.duration("broken_tls_time", d.broken_tls_time),
    )
    t.finish()
    if settings.explanation and not os.path.isfile(settings.explanation):
        raise t.error("explanation", f"no such file: {settings.explanation}")
    return settings


def _metrics(t: _Table) -> MetricsSettings:
    endpoint = t.get("endpoint", str, None)
    if endpoint is not None:
        _check_endpoint(t, endpoint)
    t.finish()
    return MetricsSettings(endpoint=endpoint)
