"""
A real authoritative DNS server for interop tests: Debian's C{nsd} run in
the foreground on a free loopback port, serving zones written by the test
(L{NSDServer}, L{zone}).

Like the rest of C{tests.interop} this is blocking and reactor-free.  Every
query made here goes to the private server on 127.0.0.1 through a resolver
built with C{configure=False}: the system resolver is never consulted.

nsd runs as whoever runs the tests.  As root it would otherwise drop
privileges to the C{nsd} user (which cannot read a private temp dir), so the
configuration sets C{username: ""} (no privilege drop) and C{chroot: ""}; as
an ordinary user that is what happens anyway, and a port above 1023 needs no
privileges.  Every file nsd writes (pid file, xfrd state, zone list, transfer
dir, log) is inside the work directory, and there is no database, no remote
control and no zone transfer, so nothing on the machine is touched.
"""

from __future__ import annotations

import atexit
import errno
import os
import shutil
import signal
import socket
import subprocess
import time
from typing import Iterable, Mapping

import dns.exception
import dns.flags
import dns.resolver

from tests.interop.requires import missing

LOOPBACK = "127.0.0.1"

NSD = shutil.which("nsd") or ("/usr/sbin/nsd" if os.access("/usr/sbin/nsd", os.X_OK) else None)

Record = tuple[str, str, str]


def require_nsd() -> str:
    """
    The path of the C{nsd} binary, or raise L{SkipTest} saying how to get
    it (L{FailTest} under CI, L{tests.interop.requires}).
    """
    if NSD is None:
        missing("nsd is not installed (run scripts/install-test-deps)")
    return NSD


def zone(origin: str, records: Iterable[Record] = (), ttl: int = 300, serial: int = 1) -> str:
    """
    Master-file text for C{origin}: SOA, an NS C{ns.<origin>} with an
    address on loopback, then C{records} as C{(name, type, rdata)}, names
    relative to the origin (C{"@"} for the apex) or absolute with a dot.
    """
    origin = _absolute(origin)
    lines = [
        f"$ORIGIN {origin}",
        f"$TTL {ttl}",
        f"@ IN SOA ns.{origin} hostmaster.{origin} {serial} 3600 600 86400 {ttl}",
        f"@ IN NS ns.{origin}",
        f"ns IN A {LOOPBACK}",
    ]
    lines.extend(f"{name} IN {rdtype} {rdata}" for name, rdtype, rdata in records)
    return "\n".join(lines) + "\n"


def _absolute(name: str) -> str:
    return name if name.endswith(".") else name + "."


def free_udp_tcp_port() -> int:
    """
    A port on 127.0.0.1 free for both UDP and TCP a moment ago (nsd needs
    both on the same number).
    """
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        continue
                    raise
                return port
    raise AssertionError("no port on 127.0.0.1 free for both UDP and TCP")


class PrivateDaemon:
    """
    What the private servers the tests start (nsd, unbound) share: whether
    it runs, and its output and log for a failure message.  A subclass has
    C{process}, C{output_path}, C{log_path}, C{address}, C{conf_path} and
    C{program}.
    """

    program = "the server"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """
        The server's early output (config errors) and its log file.
        """
        parts = []
        for path in (self.output_path, self.log_path):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except FileNotFoundError:
                continue
            if text:
                parts.append(text)
        return "".join(parts) or f"({self.program} wrote nothing)"

    def describe(self) -> str:
        if self.process is None:
            status = "never started"
        elif self.process.poll() is None:
            status = f"pid {self.process.pid} running"
        else:
            status = f"pid {self.process.pid} exited with {self.process.returncode}"
        return (f"{self.program} on {self.address} ({self.conf_path}) {status}; "
                f"log:\n{self.log()[-6000:]}")


class NSDServer(PrivateDaemon):
    """
    nsd serving C{zones} (C{{origin: master-file text}}) on
    C{127.0.0.1:port}, with its configuration, zone files and log in
    C{workdir}.  C{address} is C{"127.0.0.1:PORT"}, the form
    C{[dns] nameservers} and L{twisted_mta.outbound.mx.make_resolver} take.
    """

    program = "nsd"

    def __init__(self, workdir: str, zones: Mapping[str, str]) -> None:
        self.workdir = os.path.abspath(workdir)
        self.zones = {_absolute(origin): text for origin, text in zones.items()}
        if not self.zones:
            raise ValueError("NSDServer needs at least one zone")
        self.conf_path = os.path.join(self.workdir, "nsd.conf")
        self.log_path = os.path.join(self.workdir, "nsd.log")
        self.output_path = os.path.join(self.workdir, "nsd.out")  # before the log is open
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.address: str | None = None

    # -- configuration --------------------------------------------------------

    def _zone_file(self, origin: str) -> str:
        return os.path.join(self.workdir, "zones", (origin.rstrip(".") or "root") + ".zone")

    def _write_files(self, port: int) -> None:
        os.makedirs(os.path.join(self.workdir, "zones"), exist_ok=True)
        os.makedirs(os.path.join(self.workdir, "xfr"), exist_ok=True)
        for origin, text in self.zones.items():
            with open(self._zone_file(origin), "w", encoding="utf-8") as f:
                f.write(text)
        w = self.workdir
        lines = [
            "server:",
            f"    ip-address: {LOOPBACK}@{port}",
            "    do-ip6: no",
            '    username: ""',  # no privilege drop (as root nsd would switch to "nsd")
            '    chroot: ""',
            f'    zonesdir: "{w}"',
            '    database: ""',  # Debian's 4.6 default is /var/lib/nsd/nsd.db
            f'    zonelistfile: "{w}/zone.list"',
            f'    xfrdfile: "{w}/xfrd.state"',
            f'    xfrdir: "{w}/xfr"',
            f'    pidfile: "{w}/nsd.pid"',
            f'    logfile: "{w}/nsd.log"',
            "    log-only-syslog: no",
            "    verbosity: 0",
            "    server-count: 1",
            "    hide-version: yes",
            "remote-control:",
            "    control-enable: no",
        ]
        for origin in self.zones:
            lines += ["zone:", f'    name: "{origin}"', f'    zonefile: "{self._zone_file(origin)}"']
        with open(self.conf_path, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    # -- diagnostics -------------------------------------------------------------


    # -- process control -----------------------------------------------------

    def start(self, timeout: float = 10.0) -> "NSDServer":
        """
        Start C{nsd -d} on a free port and wait until it answers an
        authoritative SOA query for every zone, over UDP and TCP.  Retried
        on a fresh port if another process took the chosen one meanwhile.
        """
        nsd = require_nsd()
        if self.running:
            raise AssertionError("nsd already running")
        for attempt in range(3):
            self.port = free_udp_tcp_port()
            self.address = f"{LOOPBACK}:{self.port}"
            self._write_files(self.port)
            for path in (self.log_path, self.output_path):
                if os.path.exists(path):
                    os.remove(path)
            with open(self.output_path, "wb") as out:
                # Own session: a Ctrl-C at the terminal is ours to handle, and
                # stop() can kill nsd's children (xfrd, server) as a group.
                self.process = subprocess.Popen(
                    [nsd, "-d", "-c", self.conf_path], cwd=self.workdir,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True)
            try:
                self._wait_ready(timeout)
                return self
            except AssertionError:
                lost_port = "Address already in use" in self.log()
                self.stop()
                if not lost_port or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def txt(self, name: bytes, timeout: float = 5) -> bytes | None:
        """
        The TXT record C{name} as this nsd serves it, strings joined, or
        None: dkimpy's C{dnsfunc} for signatures whose keys it serves.
        """
        host, port = self.address.split(":")
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port, resolver.lifetime = [host], int(port), timeout
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except dns.exception.DNSException:
            return None
        return b"".join(answer[0].strings)

    def _wait_ready(self, timeout: float) -> None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [LOOPBACK]
        resolver.port = self.port
        resolver.timeout = resolver.lifetime = 0.5
        # TCP first: before nsd has bound its sockets a TCP query is refused
        # at once, while a UDP one is lost and waits out the timeout.
        pending = [(origin, tcp) for tcp in (True, False) for origin in self.zones]
        last_error = "no query answered yet"
        deadline = time.monotonic() + timeout
        while pending:
            if self.process.poll() is not None:
                raise AssertionError(f"nsd exited during start-up; {self.describe()}")
            origin, tcp = pending[0]
            try:
                answer = resolver.resolve(origin, "SOA", tcp=tcp, raise_on_no_answer=True)
            except dns.exception.DNSException as e:  # REFUSED if the zone did not load
                last_error = f"SOA {origin} over {'TCP' if tcp else 'UDP'}: {e!r}"
            else:
                if answer.response.flags & dns.flags.AA:
                    pending.pop(0)
                    continue
                last_error = f"SOA {origin}: answer not authoritative"
            if " error: " in self.log():  # e.g. a zone file that does not parse
                raise AssertionError(f"nsd reported an error ({last_error}); {self.describe()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"nsd did not answer within {timeout}s ({last_error}); "
                                     f"{self.describe()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """
        SIGTERM and wait; SIGKILL the whole process group if it hangs.
        Safe to call more than once, or before L{start}.
        """
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout)
                raise AssertionError(f"nsd ignored SIGTERM for {timeout}s; {self.describe()}")


# -- one server shared by the tests of a class ---------------------------------

_shared: dict[str, NSDServer] = {}


def shared_nsd(testcase, key: str, zones: Mapping[str, str]) -> NSDServer:
    """
    The L{NSDServer} for C{key}, started (in a C{testcase.mktemp()} dir) by
    the first test asking for it and reused by the rest; stopped when the
    test process exits.  Skips the test if nsd is not installed (fails it
    under CI).

    Trial ignores C{setUpClass}/C{tearDownClass} (and has no module
    fixtures), so a test class calls this from C{setUp} instead.
    """
    require_nsd()
    server = _shared.get(key)
    if server is not None:
        if server.zones != {_absolute(o): t for o, t in zones.items()}:
            raise AssertionError(f"shared nsd {key!r} requested with different zones")
        if not server.running:
            raise AssertionError(f"shared nsd {key!r} failed to start or died; "
                                 f"{server.describe()}")
        return server
    workdir = os.path.abspath(testcase.mktemp())
    os.makedirs(workdir)
    server = NSDServer(workdir, zones)
    _shared[key] = server
    if len(_shared) == 1:
        atexit.register(_stop_shared)
    server.start()
    return server


def _stop_shared() -> None:
    for server in _shared.values():
        server.stop()
    _shared.clear()
