"""
Helpers for tests that drive real processes over loopback: our MTA run by
twistd as a subprocess (L{MTAProcess}), a private Postfix instance
(L{PostfixInstance}), a raw line-level SMTP client (L{RawSMTP}) and small
polling utilities.

Everything here is blocking and reactor-free, so tests using it are plain
synchronous trial test methods.  Every process is started by a helper that
the test registers for cleanup before waiting on it, so nothing outlives a
failed test.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, TypeVar

import trustme

import twisted_mta
from tests.interop.requires import missing, under_ci

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(twisted_mta.__file__)))
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
LOOPBACK = "127.0.0.1"
MTA_HOSTNAME = "mx.example.test"
LOCAL_DOMAIN = "example.test"
SPOOL_DIRS = ("tmp", "new", "cur", "hold", "corrupt", "envelopes")

T = TypeVar("T")


# -- small utilities ----------------------------------------------------------


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout: float, describe: Callable[[], str] | str,
             interval: float = 0.05) -> T:
    """
    Poll C{predicate} until it returns something true and return that, or
    raise C{AssertionError} with C{describe} (called lazily) after C{timeout}.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = describe() if callable(describe) else describe
            raise AssertionError(f"timed out after {timeout}s: {text}")
        time.sleep(interval)


def read_banner(port: int, timeout: float = 2.0, host: str = LOOPBACK) -> bytes | None:
    """
    Connect to C{port} on C{host} (loopback by default) and return the
    first line the server sends, or C{None} if nobody answers.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            with s.makefile("rb") as f:
                return f.readline()
    except OSError:
        return None


def make_tempdir(testcase, prefix: str, mode: int = 0o700) -> str:
    """
    A fresh absolute temporary directory, removed when C{testcase} ends.
    """
    path = tempfile.mkdtemp(prefix=f"twisted-mta-{prefix}-")
    os.chmod(path, mode)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


# The tail of an MTA configuration for a run judged from one delivery
# attempt per message: nothing is retried by itself, no delay warnings,
# the log as JSON lines in EVENTS_FILE (read with json_lines).
EVENTS_FILE = "events.jsonl"
ONE_ATTEMPT_JSON_LOG = (
    '[queue]\nretry_schedule = ["1h"]\njitter = 0\ndelay_warning = false\n\n'
    f'[logging]\nformat = "json"\nfile = "{EVENTS_FILE}"\n')


def json_lines(path: str) -> list[dict]:
    """
    The JSON objects in C{path}, one a line (a line that does not parse,
    such as one being written, is passed over); none for a missing file.
    """
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out


class WorkDirs:
    """
    The temporary directories of a long interop run (a matrix, a lab):
    L{make} one per process or purpose; L{finish} removes them all, or,
    when the environment variable C{keep_env} is set, keeps them and names
    them on stderr so that logs and spools can be read after the run.
    """

    def __init__(self, label: str, keep_env: str) -> None:
        self.label = label
        self.keep_env = keep_env
        self.dirs: list[str] = []

    def make(self, prefix: str, mode: int = 0o700) -> str:
        path = tempfile.mkdtemp(prefix=f"twisted-mta-{self.label}-{prefix}-")
        os.chmod(path, mode)
        self.dirs.append(path)
        return path

    def finish(self) -> None:
        if os.environ.get(self.keep_env):
            sys.stderr.write(f"{self.label} work directories kept: {' '.join(self.dirs)}\n")
            return
        for d in self.dirs:
            shutil.rmtree(d, True)


def stop_each(*stoppers: Callable[[], object] | None) -> list[str]:
    """
    Call every stopper (those that are None or false are skipped), going
    on after one fails, so that one process that will not stop leaves
    none of the others running; what went wrong, a line each.
    """
    problems = []
    for stop in stoppers:
        if not stop:
            continue
        try:
            stop()
        except Exception as e:
            problems.append(f"stopping: {e!r}")
    return problems


def subprocess_env() -> dict[str, str]:
    """
    The environment for a twistd child: the checkout under test first on
    the path, unbuffered output.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [PROJECT_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_twistd(config_path: str, cwd: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """
    Run C{twistd -n mta --config config_path} to completion (it is expected
    to fail at start-up); stdout and stderr together in C{.stdout} (text).
    """
    return subprocess.run(
        TWISTD + ["-n", "--pidfile=", "mta", "--config", config_path],
        cwd=cwd, env=subprocess_env(), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout,
        text=True, errors="replace")


def children(pid: int) -> list[int]:
    """The processes whose parent is C{pid} that run a worker."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and b"twisted_mta.worker" in cmdline:
            out.append(int(name))
    return sorted(out)


def pid_alive(pid: int) -> bool:
    """
    Whether C{pid} is a live process (a zombie counts as dead).
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    state = stat.rpartition(b")")[2].split()[0:1]
    return state not in ([b"Z"], [b"X"])


def message_files(maildir: str) -> list[str]:
    """
    Every message file in C{maildir}'s new/ and cur/.
    """
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(maildir, sub)
        try:
            names = sorted(os.listdir(d))
        except FileNotFoundError:
            continue
        out.extend(os.path.join(d, n) for n in names if not n.startswith("."))
    return out


def files_containing(maildir: str, token: bytes) -> list[str]:
    """
    The messages in C{maildir} (new/ and cur/) whose content contains C{token}.
    """
    found = []
    for path in message_files(maildir):
        try:
            with open(path, "rb") as f:
                if token in f.read():
                    found.append(path)
        except FileNotFoundError:
            continue
    return found


def parse_message(path: str) -> email.message.Message:
    with open(path, "rb") as f:
        return email.message_from_bytes(f.read(), policy=email.policy.compat32)


def make_message(token: str, subject: str = "interop test", sender: str = "sender@client.example.test",
                 recipient: str = f"alice@{LOCAL_DOMAIN}", body_lines: Iterable[str] = ()) -> bytes:
    """
    A small RFC 5322 message with CRLF line ends carrying C{token} in its body.
    """
    lines = [f"From: <{sender}>", f"To: <{recipient}>", f"Subject: {subject} {token}",
             f"Message-ID: <{token}@client.example.test>", "", f"token: {token}"]
    lines.extend(body_lines)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


# -- a line-level SMTP client -------------------------------------------------


class RawSMTP:
    """
    A minimal blocking SMTP client over a plain socket, so a test controls
    exactly when each byte goes out and can act the instant a reply arrives.
    """

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.transcript: list[bytes] = []

    def reply(self) -> tuple[int, list[bytes]]:
        """
        Read one (possibly multi-line) reply.
        """
        lines = []
        while True:
            line = self.file.readline(4096)
            if not line:
                raise ConnectionError(f"connection closed by server; transcript: {self.transcript!r}")
            self.transcript.append(b"S: " + line)
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def send(self, data: bytes) -> None:
        self.transcript.append(b"C: " + data[:200])
        self.sock.sendall(data)

    def expect(self, code: int) -> list[bytes]:
        got, lines = self.reply()
        if got != code:
            raise AssertionError(f"expected {code}, got {lines!r}; transcript: {self.transcript!r}")
        return lines

    def command(self, line: str, code: int) -> list[bytes]:
        self.send(line.encode("ascii") + b"\r\n")
        return self.expect(code)

    def start_transaction(self, sender: str, recipients: Iterable[str]) -> None:
        """
        Greeting, EHLO, MAIL, RCPT(s) and DATA, up to the 354.
        """
        self.expect(220)
        self.command("EHLO client.example.test", 250)
        self.command(f"MAIL FROM:<{sender}>", 250)
        for rcpt in recipients:
            self.command(f"RCPT TO:<{rcpt}>", 250)
        self.command("DATA", 354)

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


# -- our MTA as a twistd subprocess -------------------------------------------


class MTAProcess:
    """
    twisted-mta run as C{twistd -n mta --config <tmpdir>/mta.toml}.

    The configuration has one C{mx} listener on a free loopback port, the
    local C{domains} (C{example.test}) with C{users}, and the spool and Maildirs
    under C{tmpdir} (relative paths, so resolution against the config file's
    directory is exercised too).  C{extra_config} is appended verbatim (e.g.
    a C{[tls]} table).  Output of every run is appended to C{mta.log}.
    """

    def __init__(self, tmpdir: str, extra_config: str = "", *, port: int | None = None,
                 spool: str = "spool", users: Iterable[str] = ("alice", "bob", "postmaster"),
                 hostname: str = MTA_HOSTNAME, config_name: str = "mta.toml",
                 workers: int | None = None, domains: Iterable[str] = (LOCAL_DOMAIN,),
                 twistd_args: Iterable[str] = ()) -> None:
        self.tmpdir = os.path.abspath(tmpdir)
        os.makedirs(self.tmpdir, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.hostname = hostname
        self.spool = os.path.join(self.tmpdir, spool)
        self.config_path = os.path.join(self.tmpdir, config_name)
        self.log_path = os.path.join(self.tmpdir, config_name + ".log")
        self.process: subprocess.Popen | None = None
        self.runs = 0
        self.twistd_args = list(twistd_args)  # e.g. --uid/--gid, before "mta"
        user_list = ", ".join(f'"{u}"' for u in users)
        domain_list = ", ".join(f'"{d}"' for d in domains)
        text = (
            "[server]\n"
            f'hostname = "{hostname}"\n'
            f'spool = "{spool}"\n'
            + (f"workers = {workers}\n" if workers is not None else "")
            + "\n[[listeners]]\n"
            'role = "mx"\n'
            f'endpoint = "tcp:{self.port}:interface={LOOPBACK}"\n'
            "\n[local]\n"
            f"domains = [{domain_list}]\n"
            f"users = [{user_list}]\n"
            'mailbox = "mail/{user}/Maildir"\n'
            "\n" + extra_config
        )
        if "[dns]" not in extra_config:
            # never the system resolver (the same as tests.support.LOOPBACK_DNS)
            text += '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
        with open(self.config_path, "w", encoding="utf-8") as f:
            f.write(text)

    # process control

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return "(no output)"

    def describe(self) -> str:
        status = "running" if self.running else (
            f"exited with {self.process.returncode}" if self.process else "never started")
        return f"MTA pid {self.pid} {status}; output:\n{self.output()[-6000:]}"

    def start(self, timeout: float = 15.0) -> "MTAProcess":
        """
        Start twistd and wait until the listener answers with a 220 banner
        (so start-up, including spool recovery, is complete).
        """
        if self.running:
            raise AssertionError("MTA already running")
        self.runs += 1
        with open(self.log_path, "ab") as log:
            log.write(f"===== run {self.runs} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                TWISTD + ["-n", "--pidfile=", *self.twistd_args, "mta", "--config",
                          self.config_path],
                cwd=self.tmpdir, env=subprocess_env(), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"MTA exited during start-up; {self.describe()}")
            banner = read_banner(self.port, timeout=1.0)
            return bool(banner and banner.startswith(b"220 " + self.hostname.encode()))

        wait_for(ready, timeout, lambda: f"MTA did not accept connections on port "
                                         f"{self.port}; {self.describe()}", interval=0.05)
        return self

    def kill(self) -> None:
        """
        SIGKILL: a crash, with no chance to clean up.
        """
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self._reap(10)

    def stop(self, timeout: float = 10.0) -> int:
        """
        SIGTERM (a clean twistd shutdown) and wait; SIGKILL if it hangs.
        Return the exit status.
        """
        if self.process is None:
            raise AssertionError("MTA never started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"MTA ignored SIGTERM for {timeout}s; {self.describe()}")
        return self.process.returncode

    def cleanup(self) -> None:
        """
        For addCleanup: make sure no process is left behind.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self._reap(10)

    def _reap(self, timeout: float) -> None:
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass

    # the MTA's files

    def maildir(self, user: str) -> str:
        return os.path.join(self.tmpdir, "mail", user, "Maildir")

    def spool_contents(self, dirs: Iterable[str] = SPOOL_DIRS) -> dict[str, list[str]]:
        """
        The non-empty spool directories and their entries (dot files ignored).
        """
        out = {}
        for d in dirs:
            try:
                names = sorted(n for n in os.listdir(os.path.join(self.spool, d))
                               if not n.startswith("."))
            except FileNotFoundError:
                continue
            if names:
                out[d] = names
        return out


def start_mta(testcase, tmpdir: str | None = None, extra_config: str = "", **kw) -> MTAProcess:
    """
    Make an L{MTAProcess} (in a fresh temp dir unless given), register its
    cleanup on C{testcase} and start it.
    """
    if tmpdir is None:
        tmpdir = make_tempdir(testcase, "mta")
    mta = MTAProcess(tmpdir, extra_config, **kw)
    testcase.addCleanup(mta.cleanup)
    return mta.start()


# -- a private Postfix instance -------------------------------------------------

POSTFIX = shutil.which("postfix") or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)

# Every service with chroot "n": the instance lives in temp dirs.
_MASTER_CF = """\
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
virtual   unix  -       n       n       -       -       virtual
"""


def postfix_unavailable() -> str | None:
    """
    Why a private Postfix cannot run here (the caller skips the test), or
    C{None} if it can.  Under CI (C{CI=true}) it fails the test instead of
    returning a reason: there, a missing Postfix is a failure
    (L{tests.interop.requires}).
    """
    why = None
    if POSTFIX is None:
        why = "postfix is not installed (run scripts/install-test-deps)"
    elif os.geteuid() != 0:
        why = "a private Postfix instance needs root"
    if why is not None and under_ci():
        missing(why)
    return why


class PostfixInstance:
    """
    A private Postfix: C{postfix -c <base>/conf start}, with its queue and
    data directories in C{<base>/queue} and C{<base>/data} (not under the
    config directory), smtpd on C{127.0.0.1:smtpd_port} (or another
    loopback address given as C{listen}), relaying everything to
    C{[127.0.0.1]:relay_port} (nowhere when C{relay_port} is C{None}), and
    no DNS anywhere.  C{main} overrides or adds main.cf parameters;
    L{reconfigure} changes them on the running instance.  The log goes to
    C{<base>/maillog}.

    C{postfix -c DIR} works as root without DIR being listed in
    C{alternate_config_directories} (there need not even be an
    /etc/postfix/main.cf); C{postfix start} creates the queue layout itself.
    """

    hostname = "relay.example.test"

    def __init__(self, base: str, relay_port: int | None, main: dict[str, str] | None = None,
                 smtpd_port: int | None = None, listen: str = LOOPBACK) -> None:
        self.base = os.path.abspath(base)
        self.smtpd_port = smtpd_port if smtpd_port is not None else free_port()
        self.relay_port = relay_port
        self.listen = listen
        self.conf = os.path.join(self.base, "conf")
        self.queue = os.path.join(self.base, "queue")
        self.data = os.path.join(self.base, "data")
        self.maillog_path = os.path.join(self.base, "maillog")
        self.master_pid: int | None = None
        self.started = False
        # The postfix user must be able to reach the queue and data dirs.
        os.chmod(self.base, 0o755)
        for d in (self.conf, self.queue, self.data):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.queue, 0o755)
        shutil.chown(self.data, "postfix", "postfix")
        os.chmod(self.data, 0o700)
        params = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue,
            "data_directory": self.data,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": "example.net",
            "myorigin": "$myhostname",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            # Postfix wants addresses configured on an interface here: not
            # 127.0.0.2 (lo has 127.0.0.1/8), though a master.cf service
            # may still listen there (the listen argument).
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{LOOPBACK}]:{relay_port}" if relay_port is not None else "",
            # No DNS, ever: IP-literal next hop, lookups disabled, no PTR.
            "smtp_dns_support_level": "disabled",
            "lmtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "append_dot_mydomain": "no",
            "biff": "no",
            "smtputf8_enable": "no",
            "maillog_file": self.maillog_path,
            "maillog_file_prefixes": self.base,
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
        }
        params.update(main or {})
        self.params = params
        self._write_main()
        with open(os.path.join(self.conf, "master.cf"), "w", encoding="utf-8") as f:
            f.write(_MASTER_CF.format(listen=f"{listen}:{self.smtpd_port}"))

    def _write_main(self) -> None:
        with open(os.path.join(self.conf, "main.cf"), "w", encoding="utf-8") as f:
            f.writelines(f"{k} = {v}\n" for k, v in self.params.items())

    def reconfigure(self, main: dict[str, str | None]) -> None:
        """
        Change main.cf parameters (C{None} removes one, back to Postfix's
        default) and C{postfix reload}.  Processes already serving a
        connection finish it with the old settings.
        """
        for k, v in main.items():
            if v is None:
                self.params.pop(k, None)
            else:
                self.params[k] = v
        self._write_main()
        result = self._postfix("reload")
        if result.returncode != 0:
            raise AssertionError(f"postfix reload failed ({result.returncode}): "
                                 f"{result.stdout}\n{self.describe()}")

    def maillog(self) -> str:
        try:
            with open(self.maillog_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return "(no maillog)"

    def describe(self) -> str:
        return f"Postfix ({self.conf}) maillog:\n{self.maillog()[-6000:]}"

    def _postfix(self, command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", self.conf, command], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", timeout=timeout)

    def _read_master_pid(self) -> int | None:
        try:
            with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def start(self, timeout: float = 15.0) -> "PostfixInstance":
        self.started = True
        result = self._postfix("start")
        self.master_pid = self._read_master_pid()
        if result.returncode != 0:
            raise AssertionError(f"postfix start failed ({result.returncode}): "
                                 f"{result.stdout}\n{self.describe()}")

        def ready() -> bool:
            banner = read_banner(self.smtpd_port, timeout=1.0, host=self.listen)
            return bool(banner and banner.startswith(b"220 "))

        wait_for(ready, timeout, lambda: f"Postfix smtpd not answering on "
                                         f"{self.listen}:{self.smtpd_port}; "
                                         f"{self.describe()}")
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if not self.started:
            return
        self.started = False
        pid = self.master_pid or self._read_master_pid()
        try:
            self._postfix("stop")
        except subprocess.TimeoutExpired:
            pass
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            try:
                self._postfix("abort")
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def start_postfix(testcase, relay_port: int | None, main: dict[str, str] | None = None,
                  base: str | None = None, **kw) -> PostfixInstance:
    """
    Make a L{PostfixInstance} (in a fresh temp dir unless C{base} is
    given; C{kw} as for the class), register its stop on C{testcase} and
    start it.
    """
    if base is None:
        base = make_tempdir(testcase, "postfix", 0o755)
    postfix = PostfixInstance(base, relay_port, main, **kw)
    testcase.addCleanup(postfix.stop)
    return postfix.start()


def write_server_cert(tmpdir: str) -> trustme.CA:
    """
    Write cert.pem (leaf and chain) and key.pem for 127.0.0.1 and the MTA's
    host name into C{tmpdir}; return the CA that signed them.
    """
    ca = trustme.CA()
    cert = ca.issue_cert(LOOPBACK, MTA_HOSTNAME)
    with open(os.path.join(tmpdir, "cert.pem"), "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    cert.private_key_pem.write_to_path(os.path.join(tmpdir, "key.pem"))
    return ca
