"""
Parse the one TOML configuration file into a frozen L{Config}.

Everything the MTA reads from the operator passes through here once, at
start-up.  Unknown keys, wrong types, bad values and missing files are
L{ConfigError}s that name the file and the dotted key, so C{twistd mta} and
C{twisted-mta config check} can print one line instead of a traceback.

The file's tables are structured into the attrs classes below by cattrs
(unknown keys forbidden); what a value must be is said where the class
declares it: a type with a structure hook (L{Duration}, L{FilePath},
L{HostName}, ...) or a field validator.  What spans tables or touches the
file system is checked afterwards (L{_check}).  Policy and plugin names are
not looked up here, so reading the configuration imports no TLS code:
C{tap.prepare_tls} does it, for C{twistd mta} and C{config check} alike.

Relative paths in the file are relative to the directory holding the file, so
the shipped example works from any working directory.
"""

from __future__ import annotations

import contextvars
import ipaddress
import math
import os
import re
import unicodedata
import tomllib
import typing
from typing import Any, Callable, Mapping, NewType

import attrs
import cattrs
from cattrs.errors import AttributeValidationNote, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

ROLES = ("mx", "submission", "submissions")
BARE_NEWLINE_POLICIES = ("normalize", "reject")
LOG_FORMATS = ("text", "json")
TLS_MODES = ("starttls", "implicit")
TLS_VERSION_NAMES = ("TLSv1.0", "TLSv1.1", "TLSv1.2", "TLSv1.3")
MILTER_DEFAULT_ACTIONS = ("accept", "tempfail", "reject")

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_LOCAL_PART = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}$")
# A local user's name: an RFC 5321 dot-atom character or UTF-8 (RFC 6531;
# no C0/C1 controls), never "/" (it names a directory), at most 64 octets.
_LOCAL_USER = re.compile(r"^[A-Za-z0-9!#$%&'*+=?^_`{|}~.\u00a0-\U0010ffff-]{1,64}$")
_CONTACT = re.compile(
    r"^(mailto:)?[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)

# Field types whose structure hooks check and convert what the file says.
Duration = NewType("Duration", int)  # seconds: 30, or "30s", "5m", "4h", "5d"
ZeroOrDuration = NewType("ZeroOrDuration", int)  # the same, or 0 (off)
FilePath = NewType("FilePath", str)  # resolved against the file's directory
HostName = NewType("HostName", str)  # checked, lower-cased
Domain = NewType("Domain", str)  # the same, in a list of domains


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


class _Invalid(ValueError):
    """
    A value is wrong; C{str()} is the reason.  C{key}: the keys below the
    table being structured that it concerns (a validator's field).
    """

    def __init__(self, message: str, *key: str) -> None:
        super().__init__(message)
        self.key = key


def parse_duration(value: object, zero: bool = False) -> int:
    """
    Seconds from an integer or a string like C{30s}, C{5m}, C{4h}, C{5d};
    L{ValueError} (with the words for the operator) for anything else, and
    for 0 unless C{zero}.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        seconds = value
    else:
        m = _DURATION.match(value) if isinstance(value, str) else None
        if not m:
            raise _Invalid(f"must be a duration like 30s, 5m, 4h or 5d, not {value!r}")
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
    if seconds < 0 or seconds == 0 and not zero:
        raise _Invalid(f"must be a positive duration{' or 0' if zero else ''}, not {value!r}")
    return seconds


# Validators: each raises _Invalid naming its field.

def _valid(ok: Callable[[Any], bool], message: str) -> Callable:
    """
    A field validator: C{message} (formatted with the value) unless C{ok}.
    """
    def validate(_, attribute, value) -> None:
        if not ok(value):
            raise _Invalid(message.format(value), attribute.name)
    return validate


def _each(ok: Callable[[Any], bool], message: str) -> Callable:
    def validate(_, attribute, values) -> None:
        for value in values:
            if not ok(value):
                raise _Invalid(message.format(value), attribute.name)
    return validate


def _one_of(*choices: str) -> Callable:
    return _valid(lambda v: v in choices, f"must be one of {', '.join(choices)}, not {{!r}}")


def _at_least(minimum: int) -> Callable:
    return _valid(lambda v: v >= minimum, f"must be at least {minimum}, not {{}}")


_port = _valid(lambda v: 0 < v < 65536, "must be a TCP port (1-65535), not {}")


def _parses(parse: Callable[[str], object]) -> Callable[[str], bool]:
    def ok(value: str) -> bool:
        try:
            parse(value)
        except ValueError:
            return False
        return True
    return ok


is_ip = _parses(ipaddress.ip_address)
_is_network = _parses(lambda net: ipaddress.ip_network(net, strict=False))


def _is_nameserver(server: str) -> bool:
    host = server[1:].partition("]")[0] if server.startswith("[") else (
        server.rpartition(":")[0] if server.count(":") == 1 else server)
    return is_ip(host)


def _endpoint(_, attribute, description: str | None) -> None:
    from twisted.internet import endpoints

    class _NoReactor:
        pass

    if description is None:  # [metrics] endpoint unset
        return
    try:
        endpoints.serverFromString(_NoReactor(), description)
    except Exception as e:  # Twisted raises several kinds for bad strings.
        raise _Invalid(f"is not a valid Twisted endpoint ({description!r}): {e}",
                       attribute.name)


def _mailbox(_, attribute, template: str) -> None:
    if "{user}" not in template:
        raise _Invalid("must contain {user}, e.g. \"mail/{user}/Maildir\"", attribute.name)
    try:
        template.format(user="u", domain="d")
    except (KeyError, IndexError, ValueError) as e:
        raise _Invalid(f"has a bad placeholder ({e}); use {{user}} and {{domain}}",
                       attribute.name)


def _domain_keys(_, attribute, pairs: tuple[tuple[str, Any], ...]) -> None:
    for domain, _value in pairs:
        if not _HOSTNAME.match(domain.lstrip(".")):
            raise _Invalid("must be a domain, or .domain for its subdomains", attribute.name,
                           domain)


def _milter_address(_, attribute, text: str) -> None:
    from twisted_mta.milter_protocol import parse_milter_address
    try:
        parse_milter_address(text)
    except ValueError as e:
        raise _Invalid(f"is not a milter address ({text!r}): {e}", attribute.name)


@attrs.frozen
class MilterSettings:
    """
    One milter (C{[milters.NAME]}), run by the listeners that name it.
    The timeouts and the default action follow Postfix's milter_*.
    """

    address: str = attrs.field(validator=_milter_address)
    connect_timeout: Duration = Duration(30)
    command_timeout: Duration = Duration(30)
    content_timeout: Duration = Duration(300)  # the end of message: the milter's edits
    default_action: str = attrs.field(default="tempfail",
                                      validator=_one_of(*MILTER_DEFAULT_ACTIONS))


@attrs.frozen
class Listener:
    role: str = attrs.field(validator=_one_of(*ROLES))
    endpoint: str = attrs.field(validator=_endpoint)
    # Names of [milters.NAME] tables, run in this order on every session.
    milters: tuple[str, ...] = ()


@attrs.frozen
class TLSServerSettings:
    certificate: FilePath | None = None
    key: FilePath | None = None
    # The key the server will use next (a TLSA rollover: publish its record
    # beside the current one before switching); only `tls publish` reads it.
    next_key: FilePath | None = None

    def __attrs_post_init__(self) -> None:
        if (self.certificate is None) != (self.key is None):
            raise _Invalid("is required when the other of certificate/key is set",
                           "key" if self.key is None else "certificate")

    @property
    def enabled(self) -> bool:
        return self.certificate is not None


@attrs.frozen
class PublishSettings:
    """
    What `twisted-mta tls publish` suggests for this server's own domains.
    """

    mx: tuple[HostName, ...] = ()  # the domains' MX hosts (default: server.hostname)
    sts_mode: str = attrs.field(default="testing", validator=_one_of(
        "enforce", "testing", "none"))
    sts_max_age: Duration = 604800
    tlsrpt_rua: tuple[str, ...] = ()  # default: mailto:tlsrpt@<domain>


@attrs.frozen
class TLSRPTSettings:
    """
    SMTP TLS Reporting (RFC 8460): the daily reports we send to the domains
    we deliver to. Opt-in: a report names the organization that sends it.
    """

    enabled: bool = False  # count TLS sessions per policy domain and day, and report them
    organization_name: str | None = None  # the report's organization-name (required when on)
    contact_info: str | None = None  # the report's contact-info: an address (or mailto:address)
    submitter: HostName | None = None  # TLS-Report-Submitter (default: contact_info's domain)
    skip_domains: tuple[Domain, ...] = ()  # policy domains never counted nor reported
    # Reading (twisted-mta tls inbox): the local user or alias whose Maildir
    # holds the reports others send us (default: the local mailto: addresses
    # tls publish suggests, tlsrpt@ each local domain).
    inbox: str | None = None
    # Sending (RFC 8460 5): the daily run starts after UTC midnight plus a
    # random delay up to send_delay; https: rua get a POST that is retried
    # for https_retry_for (the RFC says up to 24 hours), each try bounded by
    # https_timeout, the collector's certificate checked against ca_file
    # (default: the system's roots).  Reports by mail come from from_address
    # (default tlsrpt-noreply@<submitter>), signed with [dkim]'s key of the
    # submitter domain.
    send_delay: ZeroOrDuration = ZeroOrDuration(3600)
    https_timeout: Duration = 60
    https_retry_for: ZeroOrDuration = ZeroOrDuration(86400)
    ca_file: FilePath | None = None
    from_address: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.contact_info is not None and not _CONTACT.match(self.contact_info):
            raise _Invalid(f"must be an address (local@domain) or mailto:address, "
                           f"not {self.contact_info!r}", "contact_info")
        if self.from_address is not None and not _CONTACT.match(self.from_address) \
                or (self.from_address or "").startswith("mailto:"):
            raise _Invalid(f"must be an address (local@domain), not {self.from_address!r}",
                           "from_address")
        if not self.enabled:
            return
        for key in ("organization_name", "contact_info"):
            if not getattr(self, key):
                raise _Invalid("is required when enabled is true", key)
        if self.submitter is not None and self.submitter != self.contact_domain:
            # RFC 8460 5.3: the submitter MUST match contact-info's domain
            raise _Invalid(f"must be the domain of contact_info ({self.contact_domain}), "
                           "as RFC 8460 requires", "submitter")

    @property
    def contact_address(self) -> str | None:
        """
        The contact-info as the report writes it: an addr-spec.
        """
        if self.contact_info is None:
            return None
        return self.contact_info.removeprefix("mailto:")

    @property
    def contact_domain(self) -> str | None:
        address = self.contact_address
        return None if address is None else address.rpartition("@")[2].lower()

    @property
    def submitter_domain(self) -> str | None:
        return self.submitter or self.contact_domain


LOCAL_DELIVERIES = ("maildir", "lmtp")
_LMTP_TCP = re.compile(r"^tcp:(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):(\d{1,5})$")


def parse_lmtp_address(address: str) -> tuple[str, str, int]:
    """
    C{("unix", path, 0)} or C{("tcp", host, port)} from an LMTP server
    address as the configuration writes it (C{unix:/run/dovecot/lmtp},
    C{tcp:127.0.0.1:24}, C{tcp:[::1]:24}); L{ValueError} otherwise.
    """
    if address.startswith("unix:") and len(address) > 5:
        return "unix", address[5:], 0
    m = _LMTP_TCP.match(address)
    if m:
        host, port = m.group(1), int(m.group(2))
        if host.startswith("["):
            host = host[1:-1]
            if ":" not in host or not is_ip(host):
                raise ValueError(f"{host!r} is not an IPv6 address")
        elif not (_HOSTNAME.match(host) or is_ip(host)):
            raise ValueError(f"{host!r} is not a host name or IP address")
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        return "tcp", host.lower(), port
    raise ValueError("must be \"unix:/path/to/socket\" or \"tcp:host:port\"")


LMTPAddress = NewType("LMTPAddress", str)  # unix:PATH (resolved like a path) or tcp:HOST:PORT


def _recipient_template(_, attribute, template: str | None) -> None:
    if template is None:
        return
    if "{user}" not in template:
        raise _Invalid("must contain {user}, e.g. \"{user}@{domain}\" or \"{user}\"",
                       attribute.name)
    try:
        template.format(user="u", domain="d")
    except (KeyError, IndexError, ValueError) as e:
        raise _Invalid(f"has a bad placeholder ({e}); use {{user}} and {{domain}}",
                       attribute.name)


@attrs.frozen
class LMTPSettings:
    """
    The LMTP server (RFC 2033) local mail is handed to where delivery is
    "lmtp", e.g. Dovecot's lmtp service.
    """

    address: LMTPAddress | None = None
    # What RCPT TO names: {user} (as listed in [local] users) and {domain}
    # (lower-cased); "{user}" for a userdb keyed by the bare name.
    recipient: str = attrs.field(default="{user}@{domain}", validator=_recipient_template)
    lhlo_name: HostName | None = None  # None: server.hostname
    connect_timeout: Duration = 30
    command_timeout: Duration = 300  # the greeting and each reply to LHLO, MAIL, RCPT, DATA
    data_timeout: Duration = 600  # sending the message, and each reply after its final dot


@attrs.frozen
class LocalRoute:
    """
    How mail for one local domain is stored, when not as [local] delivery says.
    """

    delivery: str = attrs.field(validator=_one_of(*LOCAL_DELIVERIES))
    address: LMTPAddress | None = None  # default: [local.lmtp] address
    recipient: str | None = attrs.field(default=None, validator=_recipient_template)


@attrs.frozen
class LocalDelivery:
    """
    The effective delivery of one local domain (L{LocalSettings.delivery_for}).
    """

    kind: str  # "maildir" or "lmtp"
    address: str | None = None  # the LMTP server, for "lmtp"
    recipient: str = "{user}@{domain}"


@attrs.frozen
class LocalSettings:
    domains: tuple[Domain, ...] = ()
    users: tuple[str, ...] = attrs.field(default=(), validator=_each(
        lambda u: _LOCAL_USER.match(u) and not u.startswith(".") and "/" not in u
        and len(u.encode("utf-8")) <= 64,
        "is not a valid mailbox name: {!r}"))
    mailbox: FilePath = attrs.field(default="mail/{user}/Maildir", validator=_mailbox)
    aliases: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)
    postmaster: str = "postmaster"
    # How local mail is stored: "maildir" (our own writer) or "lmtp" (handed
    # to [local.lmtp]'s server); [local.routes."domain"] overrides per domain.
    delivery: str = attrs.field(default="maildir", validator=_one_of(*LOCAL_DELIVERIES))
    lmtp: LMTPSettings = LMTPSettings()
    routes: tuple[tuple[str, LocalRoute], ...] = ()
    # Mail whose every recipient is in a Maildir of ours is copied there by
    # the receiving process before its 250, not queued first.
    deliver_on_receipt: bool = True

    def __attrs_post_init__(self) -> None:
        if self.domains and not self.users and not self.aliases:
            raise _Invalid("is empty: list the local mailboxes of the local domains", "users")
        known = {u.lower() for u in self.users} | set(self.aliases)
        if self.domains and "@" not in self.postmaster and self.postmaster.lower() not in known:
            raise _Invalid(f"names {self.postmaster!r}, which is neither a local user nor an "
                           "alias", "postmaster")
        for domain, route in self.routes:
            if domain not in self.domains:
                raise _Invalid("is not one of local.domains", "routes", domain)
            if route.delivery == "lmtp" and route.address is None and self.lmtp.address is None:
                raise _Invalid("is required: local.routes." + domain + " has delivery = "
                               "\"lmtp\" and names no address", "lmtp", "address")
        if self.delivery == "lmtp" and self.lmtp.address is None:
            raise _Invalid("is required when local.delivery is \"lmtp\" (e.g. "
                           "\"unix:/run/dovecot/lmtp\" or \"tcp:127.0.0.1:24\")", "lmtp",
                           "address")

    def delivery_for(self, domain: str) -> LocalDelivery:
        """
        How mail for the local C{domain} is stored: its route, else the default.
        """
        route = dict(self.routes).get(domain.lower())
        kind = route.delivery if route is not None else self.delivery
        if kind == "maildir":
            return LocalDelivery("maildir")
        return LocalDelivery(
            "lmtp", address=(route and route.address) or self.lmtp.address,
            recipient=(route and route.recipient) or self.lmtp.recipient)


@attrs.frozen
class RelaySettings:
    trusted_networks: tuple[str, ...] = attrs.field(
        default=("127.0.0.0/8", "::1/128"), validator=_each(_is_network,
                                                            "is not a network: {!r}"))


@attrs.frozen
class Limits:
    message_size: int = attrs.field(default=25 * 1024 * 1024, validator=_at_least(1024))
    recipients: int = attrs.field(default=100, validator=_at_least(1))
    command_line_length: int = attrs.field(default=2048, validator=_at_least(512))
    data_line_length: int = attrs.field(default=8192, validator=_at_least(1000))
    connections_per_ip: int = attrs.field(default=20, validator=_at_least(1))
    connections: int = attrs.field(default=500, validator=_at_least(1))
    command_timeout: Duration = 300  # idle between commands
    data_timeout: Duration = 600  # idle between octets of message data
    data_time: Duration = 1800  # the whole of one message's data, 354 to the dot
    min_data_rate: int = attrs.field(default=500, validator=_at_least(0))  # octets/s; 0: off
    data_rate_grace: Duration = 60  # free time before min_data_rate counts
    # Stress (Postfix: ${stress?...}): with this fraction of `connections` in
    # use on a listener, its timeouts above are cut to stress_timeout.
    stress_threshold: float = attrs.field(default=0.8, validator=_valid(
        lambda v: 0 < v <= 1, "must be more than 0 and at most 1, not {}"))
    stress_timeout: Duration | None = 10  # None: no stress-adaptive timeouts (false or 0)
    received_headers: int = attrs.field(default=100, validator=_at_least(10))
    errors: int = attrs.field(default=20, validator=_at_least(1))
    # NOOP, VRFY, RSET and HELP a session may send before each one counts
    # as an error (Postfix: smtpd_junk_command_limit ${stress?1}{100}); under
    # stress 1, and then a single error ends the session.
    junk_commands: int = attrs.field(default=100, validator=_at_least(1))

    @property
    def stress_connections(self) -> int:
        """
        Connections in use on one listener from which it is under stress.
        """
        return max(1, math.ceil(round(self.stress_threshold * self.connections, 6)))


@attrs.frozen
class InboundSettings:
    bare_newline: str = attrs.field(default="normalize",
                                    validator=_one_of(*BARE_NEWLINE_POLICIES))
    banner: str = attrs.field(default="ESMTP", validator=_valid(
        lambda v: "\r" not in v and "\n" not in v, "must be one line"))
    chunking: bool = True  # advertise CHUNKING and take BDAT (RFC 3030)


@attrs.frozen
class QueueSettings:
    retry_schedule: tuple[Duration, ...] = attrs.field(
        default=(300, 600, 1200, 2400, 3600, 7200, 14400),
        validator=_valid(bool, "must list at least one interval"))
    lifetime: Duration = 5 * 86400
    delay_warning: Duration | None = 4 * 3600  # None: no delay warnings (false or 0)
    delivery_concurrency: int = attrs.field(default=100, validator=_at_least(1))  # entries at once
    jitter: float = attrs.field(default=0.1, validator=_valid(
        lambda v: 0 <= v <= 0.5, "must be between 0 and 0.5, not {}"))


@attrs.frozen
class AuthSettings:
    users_file: FilePath | None = None
    sender_login_match: bool = False
    max_failures: int = attrs.field(default=5, validator=_at_least(1))
    failure_window: Duration = 600

    @property
    def enabled(self) -> bool:
        return self.users_file is not None


@attrs.frozen
class DNSSettings:
    # empty: the system's resolver configuration
    nameservers: tuple[str, ...] = attrs.field(default=(), validator=_each(
        _is_nameserver, "must list IP addresses (with an optional :port), not {!r}"))
    timeout: Duration = 10
    # The longest an answer is reused inside the MTA (its TTL when shorter);
    # 0: every look-up asks the name server.
    cache_ttl: ZeroOrDuration = ZeroOrDuration(60)
    # Besides loopback, the resolvers whose AD bit (DNSSEC validated) DANE
    # believes: a validating resolver on another host of a trusted network.
    trusted_resolvers: tuple[str, ...] = attrs.field(default=(), validator=_each(
        _is_nameserver, "must list IP addresses (with an optional :port), not {!r}"))
    # The start-up check that the resolver validates (DANE stays off when
    # it does not): a name that must come back secure, and one that must
    # come back bogus.
    dnssec_secure_name: HostName = HostName("ietf.org")
    dnssec_bogus_name: HostName = HostName("dnssec-failed.org")


@attrs.frozen
class Smarthost:
    """
    A next hop that replaces MX lookup for some or all remote domains.
    """

    host: str = attrs.field(validator=_valid(  # a name (A/AAAA, never MX) or an IP address
        lambda h: _HOSTNAME.match(h) or is_ip(h), "is not a host name or IP address: {!r}"))
    port: int = attrs.field(default=25, validator=_port)
    # "starttls" (opportunistic unless credentials) or "implicit"
    tls: str = attrs.field(default="starttls", validator=_one_of(*TLS_MODES))
    username: str | None = None
    password_file: FilePath | None = None
    tls_policy: str | None = None  # the TLS policy for this smarthost (else the map's)
    tls_fallback: str | None = None

    def __attrs_post_init__(self) -> None:
        if (self.username is None) != (self.password_file is None):
            raise _Invalid("is required with " + ("password_file" if self.username is None
                                                  else "username"),
                           "username" if self.username is None else "password_file")

    @property
    def destination(self) -> str:
        return f"[{self.host}]:{self.port}"


@attrs.frozen
class TLSPolicyEntry:
    policy: str
    fallback: str | None = None
    min_version: str | None = attrs.field(
        default=None, validator=attrs.validators.optional(_one_of(*TLS_VERSION_NAMES)))
    ciphers: str | None = None
    ca_file: FilePath | None = None
    server_name: str | None = None
    shadow: str | None = None  # a stricter policy evaluated on the same handshakes
    ratchet: bool | None = None  # None: the default's setting


@attrs.frozen
class OutboundTLSSettings:
    policy: str = "opportunistic"  # the default policy
    shadow: str | None = None  # the default's shadow policy (report-only)
    fallback: str | None = None  # the default entry's decider (None: by its policy)
    ca_file: FilePath | None = None  # trust roots for verification (default: the system's)
    domains: tuple[tuple[str, TLSPolicyEntry], ...] = attrs.field(  # "example.com", ".example.com"
        default=(), validator=_domain_keys)
    mx_hosts: tuple[tuple[str, TLSPolicyEntry], ...] = ()  # glob patterns on the MX name
    relay: Smarthost | None = None  # for the via-relay decider
    early_warning: tuple[str, ...] = ("strict",)  # policies that warn at the first failure
    plugins: tuple[str, ...] = ()  # dotted paths of extra policies/deciders
    explanation: FilePath | None = None  # a file with the bounce wording for TLS failures
    ratchet: bool = False  # never below the best TLS a domain has shown (opt-in)
    history_expiry: Duration = 30 * 86400
    broken_tls_after: int = attrs.field(default=3, validator=_at_least(1))  # failures in a row
    broken_tls_time: Duration = 86400  # how long broken TLS is skipped (opportunistic only)
    # What destinations publish (docs/tls.md, "DANE and MTA-STS"): used where
    # no explicit entry names the destination.  DANE needs a validating
    # resolver ([dns]); it stays off, with one warning, when the start-up
    # check finds none.
    dane: bool = True
    mta_sts: bool = True
    sts_ca_file: FilePath | None = None  # roots for policy hosts' HTTPS (default: system's)
    sts_fetch_timeout: Duration = 10  # the whole fetch: DNS, connect, TLS, body
    sts_refresh_interval: Duration = 86400  # refresh a cached policy after (at most) this
    sts_retry_interval: Duration = 300  # after a failed fetch, no new one for this long
    sts_port: int = attrs.field(default=443, validator=_port)  # tests use another
    # RFC 8689 4.2.2: a message with "TLS-Required: No" (and no REQUIRETLS) is
    # sent without the recipient's published policy (DANE, MTA-STS) holding
    # it back; false: such messages are treated like any other.
    honor_tls_required_no: bool = True


@attrs.frozen
class OutboundSettings:
    port: int = attrs.field(default=25, validator=_port)
    helo_name: HostName | None = None  # None: server.hostname
    connect_timeout: Duration = 30
    greeting_timeout: Duration = 300  # RFC 5321 4.5.3.2
    command_timeout: Duration = 300
    data_timeout: Duration = 600
    handshake_timeout: Duration = 300  # the TLS handshake (Postfix: smtp_starttls_timeout)
    connections: int = attrs.field(default=100, validator=_at_least(1))  # all destinations
    connections_per_destination: int = attrs.field(default=20, validator=_at_least(1))
    idle_time: Duration = 5  # an idle connection waits this long for another message
    dead_destination_time: Duration = 60  # after every host failed, fail fast this long
    messages_per_connection: int = attrs.field(default=100, validator=_at_least(1))
    # RFC 3030: send with BDAT when the server offers CHUNKING, in chunks of
    # at most chunk_size octets (each one is read into memory whole).
    chunking: bool = True
    chunk_size: int = attrs.field(default=1024 * 1024, validator=_valid(
        lambda v: 4096 <= v <= 64 * 1024 * 1024,
        "must be between 4096 and 67108864 octets, not {}"))
    smarthost: Smarthost | None = None
    routes: tuple[tuple[str, Smarthost], ...] = attrs.field(  # (domain or .parent, smarthost)
        default=(), validator=_domain_keys)
    tls: OutboundTLSSettings = OutboundTLSSettings()
    # With [server] workers: the workers send too (docs/architecture.md,
    # "Processes"); false: the main process sends.
    send_in_workers: bool = True
    # With send_in_workers: a worker with room runs a whole attempt of an
    # idle entry (reads, sends, records, removes); false: only transactions.
    attempts_in_workers: bool = True

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
    format: str = attrs.field(default="text", validator=_one_of(*LOG_FORMATS))
    file: FilePath | None = None

    def __attrs_post_init__(self) -> None:
        if self.format == "json" and self.file is None:
            raise _Invalid("is required when format is \"json\"", "file")


@attrs.frozen
class MetricsSettings:
    endpoint: str | None = attrs.field(default=None, validator=_endpoint)  # Prometheus page


DKIM_ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
# Signed when present (RFC 6376 5.4.1's list, the MIME headers, and the
# TLS report's own headers); From always.
DKIM_HEADERS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
    "mime-version", "content-type", "content-transfer-encoding", "content-id",
    "content-description", "in-reply-to", "references", "list-id", "list-help",
    "list-unsubscribe", "list-subscribe", "list-post", "list-owner", "list-archive",
    "tls-report-domain", "tls-report-submitter", "tls-required",
)
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
# RFC 6376 5.4.1 advises against signing these (dkimpy refuses them): they
# are added or changed on the way by design.
DKIM_UNSIGNABLE = ("return-path", "received", "comments", "keywords", "bcc", "resent-bcc",
                   "dkim-signature")
# Where the mail we sign comes from (docs/configuration.md, [dkim] sign).
DKIM_SOURCES = ("authenticated", "trusted-networks", "sendmail", "dsn")


@attrs.frozen
class DKIMKey:
    """
    The key one signing domain signs with (its public half published at
    C{<selector>._domainkey.<domain>}).
    """

    selector: str = attrs.field(validator=_valid(
        lambda s: bool(_HOSTNAME.match(s)), "is not a DNS name: {!r}"))
    key_file: FilePath  # PEM (PKCS#1 or PKCS#8); for Ed25519 also dkimpy's base64 seed
    algorithm: str = attrs.field(default="rsa-sha256", validator=_one_of(*DKIM_ALGORITHMS))


def _dkim_domains(_, attribute, pairs: tuple[tuple[str, Any], ...]) -> None:
    for domain, _value in pairs:
        if not _HOSTNAME.match(domain):
            raise _Invalid("must be a domain", attribute.name, domain)


@attrs.frozen
class DKIMSettings:
    """
    DKIM signing (RFC 6376) of the mail that is ours (C{sign}: its sources)
    and of the TLS reports.  The keys are read and checked at start-up
    (tap.prepare).
    """

    headers: tuple[str, ...] = attrs.field(default=DKIM_HEADERS, validator=[
        _each(lambda h: bool(_HEADER_NAME.match(h)), "must list header names, not {!r}"),
        _each(lambda h: h.lower() not in DKIM_UNSIGNABLE,
              "must not list {!r}: it changes on the way (RFC 6376 5.4.1)"),
        _valid(lambda hs: "from" in [h.lower() for h in hs], "must include \"from\"")])
    domains: tuple[tuple[str, DKIMKey], ...] = attrs.field(default=(), validator=_dkim_domains)
    sign: tuple[str, ...] = attrs.field(default=DKIM_SOURCES, validator=_each(
        lambda v: v in DKIM_SOURCES, f"must list some of {', '.join(DKIM_SOURCES)}, not {{!r}}"))
    subdomains: bool = False  # a domain's key also signs for its subdomains

    def key_for(self, domain: str) -> DKIMKey | None:
        return dict(self.domains).get(domain.lower().rstrip("."))


@attrs.frozen
class SendmailSettings:
    """
    The local submission command (C{twisted-mta sendmail}) and the pickup
    of its maildrop.
    """

    # The domain of the From and envelope sender it makes for a user, and of
    # a bare recipient name (Postfix's myorigin); None: [server] hostname.
    domain: HostName | None = None


@attrs.frozen
class Config:
    path: str
    hostname: HostName
    spool: FilePath
    listeners: tuple[Listener, ...]
    # Processes that receive mail beside the main process, which runs the
    # queue, delivers and receives too (docs/architecture.md, "Processes");
    # None: one fewer than the CPU cores; 0: everything in one process.
    workers: int | None = attrs.field(default=None, validator=attrs.validators.optional(
        _at_least(0)))
    tls: TLSServerSettings = TLSServerSettings()
    local: LocalSettings = LocalSettings()
    relay: RelaySettings = RelaySettings()
    limits: Limits = Limits()
    inbound: InboundSettings = InboundSettings()
    queue: QueueSettings = QueueSettings()
    auth: AuthSettings = AuthSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    dkim: DKIMSettings = DKIMSettings()
    dns: DNSSettings = DNSSettings()
    outbound: OutboundSettings = OutboundSettings()
    publish: PublishSettings = PublishSettings()
    tlsrpt: TLSRPTSettings = TLSRPTSettings()
    sendmail: SendmailSettings = SendmailSettings()
    milters: tuple[tuple[str, MilterSettings], ...] = ()

    def milter(self, name: str) -> MilterSettings:
        return dict(self.milters)[name.lower()]

    def to_dict(self) -> dict[str, Any]:
        """
        The effective configuration, defaults filled in, in the file's shape
        (unset optional keys are left out, as TOML has no null).
        """
        d = _plain(attrs.asdict(self, recurse=True))
        d.pop("path")
        if self.limits.stress_timeout is None:  # turned off, not unset
            d["limits"]["stress_timeout"] = False
        if self.queue.delay_warning is None:  # turned off, not unset
            d["queue"]["delay_warning"] = False
        out: dict[str, Any] = {"server": {"hostname": d.pop("hostname"),
                                          "spool": d.pop("spool")}}
        workers = d.pop("workers", None)
        if workers is not None:
            out["server"]["workers"] = workers
        routes = d["outbound"].pop("routes")
        if routes:
            d["outbound"]["routes"] = {domain: host for domain, host in routes}
        d["dkim"]["domains"] = {domain: key for domain, key in d["dkim"]["domains"]}
        local_routes = d["local"].pop("routes")
        if local_routes:
            d["local"]["routes"] = {domain: route for domain, route in local_routes}
        milters = d.pop("milters")
        if milters:
            d["milters"] = {name: milter for name, milter in milters}
        for listener in d["listeners"]:
            if not listener["milters"]:
                del listener["milters"]
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


# Structure hooks: the file's values into the types above, strictly (cattrs
# would otherwise turn 25 into "25" and "25" into 25).

_base: contextvars.ContextVar[str] = contextvars.ContextVar("config_base")
_converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)


class _Key(str):
    """
    A note on an exception: the table key (or list index) it happened under.
    """

    def __new__(cls, name: str) -> "_Key":
        return super().__new__(cls, f"at key {name}")

    def __init__(self, name: str) -> None:
        self.name = name


def _scalar(kind: type | tuple[type, ...], words: str,
            convert: Callable | None = None) -> Callable:
    def structure(value: object, _) -> Any:
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise _Invalid(f"must be {words}, not {value!r}")
        return convert(value) if convert else value
    return structure


def _path(value: object, _) -> str:
    text = _converter.structure(value, str)
    if not text:
        raise _Invalid("must not be empty")
    return os.path.normpath(os.path.join(_base.get(), os.path.expanduser(text)))


def _lmtp_address(value: object, _) -> str:
    text = _converter.structure(value, str)
    try:
        kind, where, port = parse_lmtp_address(text)
    except ValueError as e:
        raise _Invalid(f"is not an LMTP server address ({e}): {text!r}")
    if kind == "unix":
        return "unix:" + _path(where, None)
    return f"tcp:[{where}]:{port}" if ":" in where else f"tcp:{where}:{port}"


def _host_name(words: str) -> Callable:
    def structure(value: object, _) -> str:
        if not _HOSTNAME.match(_converter.structure(value, str)):
            raise _Invalid(f"is not a valid {words}: {value!r}")
        return value.lower()
    return structure


def _optional_duration(value: object, _) -> int | None:
    if value is False or value == 0:
        return None
    if value is True:
        raise _Invalid("must be a duration, or false (or 0) to turn it off")
    return parse_duration(value)


def _list(value: object, type_: Any) -> tuple:
    """
    A TOML array as a tuple; an item's error names the array, or for a
    table the item's index too.
    """
    item = typing.get_args(type_)[0]
    if not isinstance(value, list):
        raise _Invalid(f"must be a list, not {value!r}")
    if getattr(item, "__supertype__", item) is str and not all(isinstance(v, str) for v in value):
        raise _Invalid(f"must be a list of strings, not {value!r}")
    out = []
    for i, v in enumerate(value):
        try:
            out.append(_converter.structure(v, item))
        except Exception as e:
            if attrs.has(item):
                e.add_note(_Key(f"[{i}]"))
            raise
    return tuple(out)


def _table(value: object, type_: Any) -> tuple:
    """
    A table of tables (C{[outbound.routes."example.org"]}) as C{(key, value)}
    pairs, the keys lower-cased.
    """
    item = typing.get_args(typing.get_args(type_)[0])[1]
    if not isinstance(value, dict):
        raise _Invalid("must be a table")
    out = []
    for key, v in value.items():
        try:
            out.append((key.lower(), _converter.structure(v, item)))
        except Exception as e:
            e.add_note(_Key(key))
            raise
    return tuple(out)


def _aliases(value: object, _) -> dict[str, tuple[str, ...]]:
    if not isinstance(value, dict):
        raise _Invalid("must be a table")
    out = {}
    for name, targets in value.items():
        targets = [targets] if isinstance(targets, str) else targets
        if not isinstance(targets, list) or not targets or \
                not all(isinstance(t, str) for t in targets):
            raise _Invalid("must be an address or a non-empty list of addresses", name)
        # Keyed as local.LocalDirectory looks up: lower case, Unicode NFC.
        out[unicodedata.normalize("NFC", name.lower())] = tuple(targets)
    return out


def _smarthost_host(data: dict) -> dict:
    """
    C{host = "host:port"} or C{"[host]:port"}: the port goes to C{port}
    unless that is written too.
    """
    host = data.get("host")
    if not isinstance(host, str):
        return data
    port = None
    if host.startswith("["):  # [2001:db8::1]:587 or [relay.example]:587
        host, _, rest = host[1:].partition("]")
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                raise _Invalid(f"must be host, host:port or [host]:port, not {rest!r}", "host")
            port = int(rest[1:])
    elif host.count(":") == 1:
        host, _, number = host.partition(":")
        if not number.isdigit():
            raise _Invalid(f"has a port that is not a number: {number!r}", "host")
        port = int(number)
    if port is not None and not 0 < port < 65536:
        raise _Invalid(f"has a port out of range: {port}", "host")
    if port is not None and "port" not in data:
        data = {**data, "port": port}
    return {**data, "host": host.lower()}


def _classes(cls: type) -> Callable:
    structure = make_dict_structure_fn(cls, _converter, _cattrs_forbid_extra_keys=True,
                                       _cattrs_detailed_validation=True)

    def hook(value: object, type_: type) -> Any:
        if not isinstance(value, dict):
            raise _Invalid("must be a table")
        return structure(_smarthost_host(value) if cls is Smarthost else value, type_)
    return hook


def _is_list(t: Any) -> bool:
    args = typing.get_args(t)
    return typing.get_origin(t) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_table(t: Any) -> bool:
    return _is_list(t) and typing.get_origin(typing.get_args(t)[0]) is tuple


_converter.register_structure_hook(str, _scalar(str, "a string"))
_converter.register_structure_hook(int, _scalar(int, "an integer"))
_converter.register_structure_hook(bool, _scalar(bool, "true or false"))
_converter.register_structure_hook(float, _scalar((int, float), "a number", float))
_converter.register_structure_hook(Duration, lambda v, _: parse_duration(v))
_converter.register_structure_hook(ZeroOrDuration, lambda v, _: parse_duration(v, zero=True))
_converter.register_structure_hook(FilePath, _path)
_converter.register_structure_hook(LMTPAddress, _lmtp_address)
_converter.register_structure_hook(HostName, _host_name("host name"))
_converter.register_structure_hook(Domain, _host_name("domain"))
_converter.register_structure_hook_func(lambda t: t == Duration | None, _optional_duration)
_converter.register_structure_hook_func(lambda t: t == Mapping[str, tuple[str, ...]], _aliases)
_converter.register_structure_hook_func(_is_list, _list)
_converter.register_structure_hook_func(_is_table, _table)
_converter.register_structure_hook_factory(attrs.has, _classes)


def load_config(path: str, check_files: bool = True) -> Config:
    """
    Read and validate C{path}; raise L{ConfigError} for anything wrong.

    @param check_files: also check the files the configuration names (keys,
        users file, ...); the sendmail command, run by any user, reads the
        configuration without them (it may not read the MTA's secrets).
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
    return parse_config(raw, path, check_files)


def parse_config(raw: dict[str, Any], path: str, check_files: bool = True) -> Config:
    """
    The configuration from the file's parsed TOML.
    """
    server = raw.get("server", {})
    if not isinstance(server, dict):
        raise ConfigError(path, "server", "must be a table")
    unknown = sorted(set(raw) & {"path", "hostname", "spool", "workers"}) + sorted(
        f"server.{k}" for k in set(server) - {"hostname", "spool", "workers"})
    if unknown:
        raise ConfigError(path, unknown[0], "unknown key")
    listeners = raw.get("listeners")
    if listeners is None:
        raise ConfigError(path, "listeners", "is required: add at least one [[listeners]] entry")
    if not isinstance(listeners, list) or not listeners:
        raise ConfigError(path, "listeners", "must be a non-empty array of tables ([[listeners]])")
    fields = {k: v for k, v in raw.items() if k != "server"} | server | {"path": path}
    base = os.path.dirname(os.path.abspath(path))
    token = _base.set(base)
    try:
        config = _converter.structure(fields, Config)
    except (cattrs.BaseValidationError, _Invalid) as e:
        key, message = _explain(e)
        if key in ("hostname", "spool", "workers"):
            key = f"server.{key}"
        raise ConfigError(path, key, message)
    finally:
        _base.reset(token)
    if not os.path.isabs(config.local.mailbox):  # the default, not structured
        mailbox = os.path.join(base, config.local.mailbox)
        config = attrs.evolve(config, local=attrs.evolve(config.local, mailbox=mailbox))
    if check_files:
        _check(config)
    return config


def _explain(error: BaseException, where: tuple[str, ...] = ()) -> tuple[str, str]:
    """
    The dotted key and the reason of the first failure in what cattrs
    raised: its notes name the attributes and keys on the way down.
    """
    for note in reversed(getattr(error, "__notes__", ())):  # added inside out
        if isinstance(note, (AttributeValidationNote, _Key)):
            where += (note.name,)
    if isinstance(error, BaseExceptionGroup):
        return _explain(error.exceptions[0], where)
    if isinstance(error, ForbiddenExtraKeysError):
        where, message = where + (sorted(error.extra_fields)[0],), "unknown key"
    elif isinstance(error, KeyError):  # a required key is missing
        message = "is required"
    else:
        where, message = where + getattr(error, "key", ()), str(error)
    return ".".join(where).replace(".[", "["), message


def _check(config: Config) -> None:
    """
    What spans tables or needs the files the configuration names.
    """
    def error(key: str, message: str) -> ConfigError:
        return ConfigError(config.path, key, message)

    for name in ("certificate", "key"):
        value = getattr(config.tls, name)
        if value is not None and not os.path.isfile(value):
            raise error(f"tls.{name}", f"file not found: {value}")
        if value is not None and not os.access(value, os.R_OK):
            raise error(f"tls.{name}", f"file not readable: {value}")
    if not config.tls.enabled and any(x.role == "submissions" for x in config.listeners):
        raise error("tls.certificate", "is required by the 'submissions' listener (implicit TLS)")
    if config.auth.users_file is not None:
        from twisted_mta.users import UsersFileError, read_users_file
        try:
            read_users_file(config.auth.users_file)
        except UsersFileError as e:
            raise error("auth.users_file", str(e))
    outbound, tls = config.outbound, config.outbound.tls
    hosts = [("outbound.smarthost", outbound.smarthost), ("outbound.tls.relay", tls.relay)]
    hosts += [(f"outbound.routes.{domain}", host) for domain, host in outbound.routes]
    for where, host in hosts:
        if host is not None and host.password_file is not None:
            try:
                with open(host.password_file, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise error(f"{where}.password_file", f"cannot be read: {e.strerror}")
    files = [("outbound.tls.ca_file", tls.ca_file), ("outbound.tls.explanation", tls.explanation)]
    for table, entries in (("domains", tls.domains), ("mx_hosts", tls.mx_hosts)):
        files += [(f"outbound.tls.{table}.{key}.ca_file", e.ca_file) for key, e in entries]
    files.append(("tlsrpt.ca_file", config.tlsrpt.ca_file))
    for key, value in files:
        if value is not None and not os.path.isfile(value):
            raise error(key, f"no such file: {value}")
    for name, _ in config.milters:
        if not re.match(r"^[a-z0-9_.-]+$", name):
            raise error(f"milters.{name}", "a milter's name must be one word of letters, "
                        "digits, '_', '.' or '-'")
    for i, listener in enumerate(config.listeners):
        for name in listener.milters:
            if name.lower() not in dict(config.milters):
                raise error(f"listeners[{i}].milters",
                            f"names {name!r}, but there is no [milters.{name}] table")
        if listener.role != "mx" and config.auth.enabled and not config.tls.enabled:
            raise error("tls.certificate", f"is required by listeners[{i}] ({listener.role}) "
                        "with [auth]: credentials never cross cleartext")
