"""
Real DNSSEC for interop tests: zones signed at test time with Debian's
C{ldnsutils} (C{ldns-keygen}, C{ldns-signzone}), served by the private nsd
of L{tests.interop.dns}, and Debian's C{unbound} as a private validating
resolver on loopback with a trust anchor for the test zones only.

    world = shared_dnssec(self, "key", zones())   # from a test's setUp
    world.resolver_address                        # "127.0.0.1:PORT" (unbound)
    world.nsd.address                             # the authoritative server

A L{Zone} is signed (keys made for it at test time, its DS put in its
parent, or made a trust anchor of unbound's when it has no parent in the
set), unsigned (its parent delegates to it without a DS: provably
insecure under a signed parent; outside every anchor when it has none),
or expired (signed with signatures that ran out ten days ago, its DS in
the parent: bogus).  C{corrupt} names RRsets whose signature is damaged
after signing: bogus names inside a good zone.  A parent gets the
delegation (NS and glue) of each child zone in the set by itself.

Nothing leaves the machine.  unbound forwards every query, the root
included, to the private nsd (C{forward-zone: "."}, so its root hints are
never used), is allowed to query loopback (C{do-not-query-localhost: no}),
answers only loopback clients, and has no trust anchor but the test
zones' DS records (no root key, no RFC 5011 updates).  Its configuration,
log and pid file are in the work directory; no system service or file is
used.  Like the rest of C{tests.interop} this is blocking and
reactor-free.
"""

from __future__ import annotations

import atexit
import datetime
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import dns.exception
import dns.message
import dns.name
import dns.query
import dns.rdataclass
import dns.rdatatype
import dns.zone

from tests.interop.dns import (
    LOOPBACK, NSDServer, PrivateDaemon, Record, free_udp_tcp_port, require_nsd, zone,
)
from tests.interop.requires import missing


def _which(name: str) -> str | None:
    for path in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if path and os.access(path, os.X_OK):
            return path
    return None


UNBOUND = _which("unbound")
LDNS_KEYGEN = _which("ldns-keygen")
LDNS_SIGNZONE = _which("ldns-signzone")

SIGNED, UNSIGNED, EXPIRED = "signed", "unsigned", "expired"

ALGORITHM = "ECDSAP256SHA256"  # algorithm 13: small keys, made in milliseconds


def require_unbound() -> None:
    """
    Skip the test (fail it under CI, L{tests.interop.requires}) unless
    unbound, ldns-keygen, ldns-signzone and nsd are all installed.
    """
    require_nsd()
    absent = [name for name, path in (("unbound", UNBOUND), ("ldns-keygen", LDNS_KEYGEN),
                                      ("ldns-signzone", LDNS_SIGNZONE)) if path is None]
    if absent:
        missing(f"{', '.join(absent)} not installed (Debian packages unbound, ldnsutils: "
                "run scripts/install-test-deps)")


@dataclass(frozen=True)
class Zone:
    """
    One test zone: C{records} as C{(name, type, rdata)} (relative to the
    origin, C{"@"} for the apex, or absolute with a dot; the SOA, NS and
    C{ns} address are added), C{signing} one of C{"signed"},
    C{"unsigned"}, C{"expired"}, and C{corrupt} the C{(name, type)}
    RRsets whose RRSIG is damaged after signing.
    """

    origin: str
    records: tuple[Record, ...] = ()
    signing: str = SIGNED
    corrupt: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.signing not in (SIGNED, UNSIGNED, EXPIRED):
            raise ValueError(f"unknown signing {self.signing!r}")
        if self.corrupt and self.signing == UNSIGNED:
            raise ValueError(f"{self.origin}: an unsigned zone has no signatures to corrupt")
        object.__setattr__(self, "origin", _absolute(self.origin).lower())
        object.__setattr__(self, "records", tuple(self.records))
        object.__setattr__(self, "corrupt", tuple(self.corrupt))


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _name(origin: str, name: str) -> dns.name.Name:
    return dns.name.from_text(name, origin=dns.name.from_text(origin))


def _run(argv: Sequence[str], cwd: str) -> str:
    result = subprocess.run(list(argv), cwd=cwd, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited with {result.returncode}: "
                             f"{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


@dataclass
class _Keys:
    base: str  # the K<zone>+013+<tag> path, without extension
    ds: str  # the DS record's text, as ldns-keygen wrote it


def make_key(directory: str, origin: str) -> _Keys:
    """
    A new ECDSA P-256 key with the SEP flag (one key signs the whole zone)
    for C{origin}, in C{directory}; its DS (SHA-256) as a record's text.
    """
    os.makedirs(directory, exist_ok=True)
    base = _run([LDNS_KEYGEN, "-a", ALGORITHM, "-k", origin], cwd=directory).strip()
    with open(os.path.join(directory, base + ".ds"), encoding="ascii") as f:
        ds = f.read().split(";")[0].strip()
    return _Keys(os.path.join(directory, base), ds)


def _stamp(moment: datetime.datetime) -> str:
    return moment.strftime("%Y%m%d%H%M%S")


def sign(directory: str, origin: str, text: str, keys: _Keys, expired: bool = False) -> str:
    """
    C{text} (master-file text for C{origin}) signed with C{keys} by
    ldns-signzone (NSEC); with C{expired}, signatures valid from 40 to
    10 days ago (beyond any validator's clock skew allowance).
    """
    stem = os.path.join(directory, origin.rstrip(".") or "root")
    with open(stem + ".zone", "w", encoding="utf-8") as f:
        f.write(text)
    argv = [LDNS_SIGNZONE, "-o", origin, "-f", stem + ".signed"]
    if expired:
        now = datetime.datetime.now(datetime.timezone.utc)
        argv += ["-i", _stamp(now - datetime.timedelta(days=40)),
                 "-e", _stamp(now - datetime.timedelta(days=10))]
    _run(argv + [stem + ".zone", keys.base], cwd=directory)
    with open(stem + ".signed", encoding="utf-8") as f:
        return f.read()


def corrupt_signatures(origin: str, text: str, rrsets: Iterable[tuple[str, str]]) -> str:
    """
    C{text} (a signed zone) with the RRSIG of each C{(name, type)} in
    C{rrsets} damaged (one octet of the signature flipped): the records
    are served as before and fail validation.
    """
    z = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=False)
    for name, rdtype in rrsets:
        owner = _name(origin, name)
        covered = dns.rdatatype.from_text(rdtype)
        node = z.get_node(owner)
        sigs = node.get_rdataset(dns.rdataclass.IN, dns.rdatatype.RRSIG, covered) if node else None
        if not sigs:
            raise AssertionError(f"{owner} {rdtype} has no signature to corrupt in {origin}")
        damaged = []
        for sig in sigs:
            signature = bytearray(sig.signature)
            signature[len(signature) // 2] ^= 0xFF
            damaged.append(sig.replace(signature=bytes(signature)))
        ttl = sigs.ttl
        sigs.clear()
        for sig in damaged:
            sigs.add(sig, ttl)
    return z.to_text(relativize=False)


# -- unbound ---------------------------------------------------------------------


class UnboundServer(PrivateDaemon):
    """
    unbound validating on C{address:port} (a free port on 127.0.0.1 by
    default), forwarding everything to C{upstream} (C{"127.0.0.1@PORT"},
    the private nsd), with C{trust_anchors} (DS or DNSKEY records' text)
    as its only anchors.  With C{ede}, failures carry Extended DNS Errors
    (RFC 8914).  C{forwards} sends the queries for some names elsewhere
    (C{{name: "127.0.0.1@PORT"}}, a loopback server of the test's: one
    that answers SERVFAIL, say).  C{address} is C{"127.0.0.1:PORT"}, the
    form L{twisted_mta.tls.dnssec.make_resolver} takes.
    """

    program = "unbound"

    def __init__(self, workdir: str, upstream: str, trust_anchors: Sequence[str],
                 local_tlds: Iterable[str] = ("test",), host: str = LOOPBACK,
                 port: int | None = None, ede: bool = True,
                 forwards: Mapping[str, str] | None = None) -> None:
        self.workdir = os.path.abspath(workdir)
        self.upstream = upstream
        self.trust_anchors = list(trust_anchors)
        self.local_tlds = sorted({t.strip(".").lower() for t in local_tlds})
        self.host = host
        self.fixed_port = port
        self.ede = ede
        self.forwards = dict(forwards or {})
        for upstream in self.forwards.values():
            if not upstream.startswith("127."):
                raise ValueError(f"forward to {upstream}: only loopback servers")
        self.conf_path = os.path.join(self.workdir, "unbound.conf")
        self.log_path = os.path.join(self.workdir, "unbound.log")
        self.output_path = os.path.join(self.workdir, "unbound.out")
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.address: str | None = None

    def _write_config(self) -> None:
        os.makedirs(self.workdir, exist_ok=True)
        w = self.workdir
        lines = [
            "server:",
            f"    interface: {self.host}",
            f"    port: {self.port}",
            "    do-ip4: yes",
            "    do-ip6: no",
            "    do-udp: yes",
            "    do-tcp: yes",
            "    access-control: 0.0.0.0/0 refuse",
            "    access-control: 127.0.0.0/8 allow",
            '    username: ""',  # no privilege drop (as root unbound would switch to "unbound")
            '    chroot: ""',
            f'    directory: "{w}"',
            f'    pidfile: "{w}/unbound.pid"',
            f'    logfile: "{w}/unbound.log"',
            "    use-syslog: no",
            "    log-time-ascii: yes",
            "    verbosity: 1",
            "    val-log-level: 2",  # one line per validation failure, with the reason
            "    num-threads: 1",
            "    so-reuseport: no",
            "    msg-cache-size: 1m",
            "    rrset-cache-size: 1m",
            "    key-cache-size: 1m",
            "    neg-cache-size: 1m",
            "    do-not-query-localhost: no",  # the private nsd is on 127.0.0.1
            "    module-config: \"validator iterator\"",
            "    val-permissive-mode: no",
            "    harden-dnssec-stripped: yes",
            "    aggressive-nsec: no",
            "    prefetch: no",
            "    serve-expired: no",
            "    qname-minimisation: no",
            "    hide-identity: yes",
            "    hide-version: yes",
            "    trust-anchor-signaling: no",  # no RFC 8145 key tag queries
            "    root-key-sentinel: no",
            f"    ede: {'yes' if self.ede else 'no'}",
        ]
        # unbound answers RFC 6761 names (test., invalid., ...) itself by
        # default: let those the test zones live under through.
        lines += [f'    local-zone: "{tld}." nodefault' for tld in self.local_tlds]
        lines += [f'    trust-anchor: "{anchor}"' for anchor in self.trust_anchors]
        lines += [
            "remote-control:",
            "    control-enable: no",
            # Every query, the root's included, goes to the private nsd: the
            # root hints are never used, so nothing can leave the machine.
            "forward-zone:",
            '    name: "."',
            f"    forward-addr: {self.upstream}",
            "    forward-first: no",
        ]
        for name, upstream in sorted(self.forwards.items()):
            lines += ["forward-zone:", f'    name: "{_absolute(name)}"',
                      f"    forward-addr: {upstream}", "    forward-first: no"]
        with open(self.conf_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


    def start(self, timeout: float = 10.0) -> "UnboundServer":
        """
        Check the configuration (C{unbound-checkconf} when installed),
        start C{unbound -d} and wait until it answers over TCP and UDP.
        Retried on a fresh port if another process took the chosen one.
        """
        require_unbound()
        if self.running:
            raise AssertionError("unbound already running")
        for attempt in range(3):
            self.port = self.fixed_port or free_udp_tcp_port()
            self.address = f"{self.host}:{self.port}"
            self._write_config()
            checkconf = _which("unbound-checkconf")
            if checkconf:
                _run([checkconf, self.conf_path], cwd=self.workdir)
            for path in (self.log_path, self.output_path):
                if os.path.exists(path):
                    os.remove(path)
            with open(self.output_path, "wb") as out:
                self.process = subprocess.Popen(
                    [UNBOUND, "-d", "-c", self.conf_path], cwd=self.workdir,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                self._wait_ready(timeout)
                return self
            except AssertionError:
                lost_port = "Address already in use" in self.log()
                self.stop()
                if not lost_port or attempt == 2 or self.fixed_port:
                    raise
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> None:
        # Any answer will do (REFUSED from upstream comes back as SERVFAIL):
        # the name is looked up in unbound's own localhost zone.
        query = dns.message.make_query("localhost.", "A")
        deadline = time.monotonic() + timeout
        pending = [True, False]  # TCP first: refused at once while not listening
        last_error = "no query answered yet"
        while pending:
            if self.process.poll() is not None:
                raise AssertionError(f"unbound exited during start-up; {self.describe()}")
            tcp = pending[0]
            try:
                if tcp:
                    dns.query.tcp(query, self.host, timeout=0.5, port=self.port)
                else:
                    dns.query.udp(query, self.host, timeout=0.5, port=self.port)
                pending.pop(0)
                continue
            except (OSError, dns.exception.DNSException) as e:
                last_error = f"{'TCP' if tcp else 'UDP'}: {e!r}"
            if time.monotonic() >= deadline:
                raise AssertionError(f"unbound did not answer within {timeout}s ({last_error}); "
                                     f"{self.describe()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM and wait; SIGKILL the process group if it hangs.  Safe to
        call more than once, or before L{start}.
        """
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(timeout)
            raise AssertionError(f"unbound ignored SIGTERM for {timeout}s; {self.describe()}")


# -- the whole set-up: keys, signed zones, nsd, unbound -------------------------------


@dataclass
class DNSSECWorld:
    """
    C{zones} signed as each says, served by one nsd, validated by one
    unbound (L{start}); L{resolver} adds more unbounds (without EDE, say,
    or on another address) on the same nsd.
    """

    workdir: str
    zones: Sequence[Zone]
    ede: bool = True
    nsd: NSDServer | None = None
    unbound: UnboundServer | None = None
    trust_anchors: list[str] = field(default_factory=list)
    ds: dict[str, str] = field(default_factory=dict)  # origin -> DS text, signed zones
    texts: dict[str, str] = field(default_factory=dict)  # origin -> zone file served
    _extra: list[UnboundServer] = field(default_factory=list)

    @property
    def resolver_address(self) -> str:
        return self.unbound.address

    def prepare(self) -> None:
        """
        Make the keys, the delegations and DS records, and sign every zone
        (children before parents, since a parent holds its child's DS).
        """
        self.workdir = os.path.abspath(self.workdir)
        origins = [z.origin for z in self.zones]
        if len(set(origins)) != len(origins):
            raise ValueError("a zone is listed twice")
        by_origin = {z.origin: z for z in self.zones}
        parent = {o: self._parent(o, origins) for o in origins}
        keydir = os.path.join(self.workdir, "keys")
        keys = {z.origin: make_key(keydir, z.origin) for z in self.zones if z.signing != UNSIGNED}
        self.ds = {origin: k.ds for origin, k in keys.items()}
        extra: dict[str, list[Record]] = {o: [] for o in origins}
        for child, up in parent.items():
            if up is None:
                if child in keys:
                    self.trust_anchors.append(" ".join(keys[child].ds.split()))
                continue
            extra[up] += [(child, "NS", f"ns.{child}"), (f"ns.{child}", "A", LOOPBACK)]
            if child in keys:
                ds = keys[child].ds.split()
                extra[up].append((child, "DS", " ".join(ds[ds.index("DS") + 1:])))
        # Deepest first: a child is signed before the parent that holds its DS.
        for origin in sorted(origins, key=lambda o: -len(dns.name.from_text(o))):
            z = by_origin[origin]
            text = zone(origin, list(z.records) + extra[origin])
            if z.signing != UNSIGNED:
                text = sign(keydir, origin, text, keys[origin], expired=z.signing == EXPIRED)
                if z.corrupt:
                    text = corrupt_signatures(origin, text, z.corrupt)
            self.texts[origin] = text

    @staticmethod
    def _parent(origin: str, origins: Sequence[str]) -> str | None:
        name = dns.name.from_text(origin)
        ancestors = [o for o in origins if o != origin and name.is_subdomain(dns.name.from_text(o))]
        return max(ancestors, key=lambda o: len(dns.name.from_text(o)), default=None)

    def start(self) -> "DNSSECWorld":
        require_unbound()
        self.prepare()
        self.nsd = NSDServer(os.path.join(self.workdir, "nsd"), self.texts)
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.unbound = self.resolver("unbound", ede=self.ede)
        return self

    def resolver(self, name: str, ede: bool = True, host: str = LOOPBACK,
                 port: int | None = None,
                 forwards: Mapping[str, str] | None = None) -> UnboundServer:
        """
        The unbound called C{name} on the same nsd and anchors (and
        C{forwards}, as L{UnboundServer} takes them): started by the first
        call, the same one after (with the same settings); stopped with
        the rest.
        """
        forwards = dict(forwards or {})
        for server in self._extra:
            if os.path.basename(server.workdir) == name:
                if (server.ede, server.host, server.fixed_port, server.forwards) != (
                        ede, host, port, forwards):
                    raise AssertionError(f"unbound {name!r} asked for with other settings")
                if not server.running:
                    raise AssertionError(f"unbound {name!r} died; {server.describe()}")
                return server
        server = UnboundServer(
            os.path.join(self.workdir, name), f"{LOOPBACK}@{self.nsd.port}", self.trust_anchors,
            local_tlds={dns.name.from_text(o).labels[-2].decode() for o in self.texts},
            host=host, port=port, ede=ede, forwards=forwards)
        self._extra.append(server)
        return server.start()

    def stop(self) -> None:
        errors = []
        for server in reversed(self._extra):
            try:
                server.stop()
            except AssertionError as e:
                errors.append(str(e))
        if self.nsd is not None:
            try:
                self.nsd.stop()
            except AssertionError as e:
                errors.append(str(e))
        if errors:
            raise AssertionError("; ".join(errors))


# -- the standard test zones ----------------------------------------------------------

TLSA_EE = "3 1 1 " + "0123456789abcdef" * 4
TLSA_TA = "2 0 1 " + "fedcba9876543210" * 4


def zones() -> list[Zone]:
    """
    The standard set:

      - C{dane.test.} signed, the trust anchor: MX C{mx.dane.test}, whose A
        and AAAA and TLSA (C{_25._tcp}, two records) are secure; C{notlsa}
        (an address, no TLSA); C{alias} a CNAME to C{mx}, C{cnamemx} an MX
        through it; C{to-insecure} a CNAME into the unsigned child;
        C{badsig} an A, C{badmx} an MX and C{_25._tcp.badtlsa} a TLSA whose
        signatures are corrupted (bogus, beside a good C{badtlsa} A);
      - C{insecure.dane.test.} unsigned, delegated without DS (provably
        insecure): an MX, C{mx} with an address and a TLSA, C{back} a CNAME
        to the signed C{mx.dane.test};
      - C{expired.dane.test.} signed with expired signatures, DS in the
        parent (bogus): an MX and C{mx};
      - C{unsigned.test.} unsigned, under no trust anchor (insecure): an MX
        and C{mx}.
    """
    return [
        Zone("dane.test", (
            ("@", "MX", "10 mx.dane.test."),
            ("mx", "A", "127.0.0.2"),
            ("mx", "AAAA", "::1"),
            ("_25._tcp.mx", "TLSA", TLSA_EE),
            ("_25._tcp.mx", "TLSA", TLSA_TA),
            ("notlsa", "A", "127.0.0.3"),
            ("alias", "CNAME", "mx.dane.test."),
            ("cnamemx", "MX", "10 alias.dane.test."),
            ("to-insecure", "CNAME", "mx.insecure.dane.test."),
            ("badsig", "A", "127.0.0.4"),
            ("badmx", "MX", "10 mx.dane.test."),
            ("badtlsa", "A", "127.0.0.5"),
            ("_25._tcp.badtlsa", "TLSA", TLSA_EE),
        ), corrupt=(("badsig", "A"), ("badmx", "MX"), ("_25._tcp.badtlsa", "TLSA"))),
        Zone("insecure.dane.test", (
            ("@", "MX", "10 mx.insecure.dane.test."),
            ("mx", "A", "127.0.0.6"),
            ("_25._tcp.mx", "TLSA", TLSA_EE),
            ("back", "CNAME", "mx.dane.test."),
        ), signing=UNSIGNED),
        Zone("expired.dane.test", (
            ("@", "MX", "10 mx.expired.dane.test."),
            ("mx", "A", "127.0.0.7"),
        ), signing=EXPIRED),
        Zone("unsigned.test", (
            ("@", "MX", "10 mx.unsigned.test."),
            ("mx", "A", "127.0.0.8"),
        ), signing=UNSIGNED),
    ]


# -- one world shared by the tests of a process --------------------------------------

_shared: dict[str, DNSSECWorld] = {}


def shared_dnssec(testcase, key: str, zone_list: Sequence[Zone] | None = None,
                  ede: bool = True) -> DNSSECWorld:
    """
    The L{DNSSECWorld} for C{key} (the standard L{zones} unless
    C{zone_list} is given), started in a C{testcase.mktemp()} directory by
    the first test asking for it and reused by the rest; stopped when the
    test process exits.  Skips the test when unbound, ldnsutils or nsd is
    missing (fails it under CI).  Call it from C{setUp} (trial has no
    class or module fixtures).
    """
    require_unbound()
    zone_list = list(zones() if zone_list is None else zone_list)
    world = _shared.get(key)
    if world is not None:
        if list(world.zones) != zone_list or world.ede != ede:
            raise AssertionError(f"shared DNSSEC world {key!r} requested with different zones")
        for server in (world.nsd, world.unbound):
            if server is None or not server.running:
                raise AssertionError(f"shared DNSSEC world {key!r} failed to start or died; "
                                     f"{server.describe() if server else 'never started'}")
        return world
    workdir = os.path.abspath(testcase.mktemp())
    os.makedirs(workdir)
    world = DNSSECWorld(workdir, zone_list, ede=ede)
    _shared[key] = world
    if len(_shared) == 1:
        atexit.register(_stop_shared)
    try:
        world.start()
    except BaseException:
        world.stop()
        raise
    return world


def _stop_shared() -> None:
    for world in _shared.values():
        try:
            world.stop()
        except AssertionError:
            pass
    _shared.clear()

