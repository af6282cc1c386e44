"""
docs/operations.md, "A complete mail system: twisted-mta, Dovecot and
OpenDKIM", run as written (issue 15's acceptance item): every block of
that section marked C{<!-- example-file: PATH -->} or C{<!-- example-run:
NAME -->} is read from the Markdown, moved into the test's temporary
directory by L{Relocation} (paths, ports, users: an explicit table; a
path or port the table does not cover fails the test, so the docs cannot
drift from what runs here), and then:

  - the key commands run as written (opendkim-genkey, openssl genpkey,
    chown, chmod);
  - Dovecot runs the docs' local.conf and users file, after a preamble
    standing in for Debian's dovecot.conf and conf.d (its run and state
    directories moved, LMTP only, the PAM passdb and passwd userdb of
    C{auth-system.conf.ext});
  - OpenDKIM runs the docs' opendkim.conf, keytable, signingtable and
    internalhosts, its resolver pointed at a private nsd serving the
    published keys;
  - twisted-mta runs the docs' mta.toml under twistd with the arguments
    of the docs' systemd unit (its C{ExecStartPre} config check first; as
    daemon for the unit's twisted-mta user, under Debian's python3.X with
    the packages linked where daemon may read them, L{readable_python}),
    plus a route for C{remote.test} to a loopback sink and loopback
    C{[dns]}.

Checked end to end: (a) alice, authenticated after STARTTLS on the
submission port from 127.0.0.2 (not an internal host), sends to
remote.test: the copy at the sink carries OpenDKIM's signature
(d=example.org, s=2026a), which dkimpy verifies against the key in the
private DNS; the sendmail command's message to remote.test is signed by
twisted-mta (s=2026m) and verifies too; (b) a message from the Internet
(127.0.0.2 on the mx port) signed by sender.test lands in alice's Dovecot
Maildir with C{Authentication-Results: mx.example.org; dkim=pass}; (c)
C{sendmail -t} run by nobody to alice lands in her Dovecot Maildir.
"""

from __future__ import annotations

import atexit
import os
import re
import shlex
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import uuid

import dkim
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, zone
from tests.interop.dovecot import MAIL_UID, DovecotInstance, dovecot_unavailable
from tests.interop.killloop import Sink
from tests.interop.support import (
    LOOPBACK, PROJECT_ROOT, TWISTD, MTAProcess, free_port, make_tempdir, subprocess_env,
    wait_for, write_server_cert,
)
from tests.interop.test_milter import GENKEY, OPENDKIM, require_opendkim
from tests.interop import support
from tests.interop.requires import missing
from tests.interop.test_sendmail import AS_NOBODY, installed_command, link_tree, system_python
from tests.interop.test_tlsrpt_send import txt
from tests.test_dkim import write_key

_READABLE: list[tuple[str, str]] = []
# Imported by the probe besides every twisted_mta module: what the MTA
# imports only when it needs it.
LAZY_IMPORTS = ("dkim", "dns.resolver", "dns.dnssec", "dns.rdtypes.ANY.TXT", "OpenSSL.SSL",
                "service_identity", "idna", "twisted.internet.ssl", "twisted.protocols.tls",
                "twisted.internet.epollreactor", "twisted.scripts.twistd",
                "twisted.plugins.twisted_mta_plugin")


def readable_python(testcase) -> tuple[str, str]:
    """
    (python, site): Debian's python3.X and a directory, anyone may read,
    of the test's installed packages (hard links), so that the MTA run as
    daemon after twistd's --uid switch imports from files it may read, as
    it does from /usr/local/lib after the docs' pip install (the test's
    own Python is a pyenv under /root).  Made once per process.
    """
    if _READABLE:
        return _READABLE[0]
    python = system_python()
    if python is None:
        missing("no python3.X outside /root that the MTA's user may run (Debian's python3)")
    base = tempfile.mkdtemp(prefix="twisted-mta-readable-python-")
    atexit.register(shutil.rmtree, base, True)
    os.chmod(base, 0o755)
    site = os.path.join(base, "site")
    os.mkdir(site)
    probe = (
        "import importlib, os, pkgutil, sys, twisted_mta\n"
        "for m in pkgutil.walk_packages(twisted_mta.__path__, 'twisted_mta.'):\n"
        "    importlib.import_module(m.name)\n"
        f"for name in {LAZY_IMPORTS!r}:\n"
        "    importlib.import_module(name)\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    for p in sys.path:\n"
        "        if p.endswith('-packages') and f.startswith(p + os.sep):\n"
        "            print(os.path.join(p, os.path.relpath(f, p).split(os.sep)[0]))\n")
    found = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, check=True,
                           capture_output=True, text=True, timeout=120).stdout.split()
    for path in sorted(set(found)):
        link_tree(path, os.path.join(site, os.path.basename(path)))
    _READABLE.append((python, site))
    return python, site


DOC = os.path.join(PROJECT_ROOT, "docs", "operations.md")
SECTION = "## A complete mail system: twisted-mta, Dovecot and OpenDKIM"
MARKED = re.compile(r"<!-- example-(file|run): (\S+) -->\n```[\w-]*\n(.*?)```", re.S)
DOMAIN = "example.org"
HOSTNAME = "mx.example.org"
OUTSIDE = "127.0.0.2"  # an Internet client: loopback, not in OpenDKIM's InternalHosts
TIMEOUT = 30.0
MTA_USER = "daemon"  # stands in for the docs' twisted-mta user

# Every file and command the section must show, and nothing else marked.
EXPECTED = {
    "/etc/dovecot/local.conf", "/etc/dovecot/users", "keys", "/etc/opendkim.conf",
    "/etc/opendkim/keytable", "/etc/opendkim/signingtable", "/etc/opendkim/internalhosts",
    "/etc/twisted-mta/mta.toml", "/etc/systemd/system/twisted-mta.service",
}

# An absolute path in a block: after a space, quote, '=', ':' or the line's start.
ABSOLUTE = re.compile(r"(?:(?<=[\s\"'=:(])|^)(/[A-Za-z][\w.+-]*(?:/[\w.*+-]*)*)", re.M)
PORT = re.compile(r"\btcp:(\d+)|\binet:(\d+)@|\binet6?:[\w.\[\]:]+?:(\d+)\b|\bport\s*=\s*(\d+)")
USER_FIELD = re.compile(r"\b(?:user|group)\s*=\s*([\w-]+)|\bchown\s+([\w-]+):([\w-]+)|"
                        r"--[ug]id[= ]([\w-]+)|^UserID\s+(\S+)", re.M)


def section() -> str:
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end >= 0 else len(text)]


def marked_blocks(text: str) -> dict[str, str]:
    """{path or run name: block text} for each marked fenced block."""
    blocks: dict[str, str] = {}
    for kind, name, body in MARKED.findall(text):
        if name in blocks:
            raise AssertionError(f"{name} is marked twice in {SECTION!r}")
        blocks[name] = body
    return blocks


class Relocation:
    """
    The table from the docs' absolute paths, ports and users to this
    test's: L{apply} replaces them in a block's text and raises
    AssertionError for any absolute path, port or user the table does
    not cover.
    """

    def __init__(self, root: str, dovecot_base: str, ports: dict[int, int]) -> None:
        self.root = root
        # Longest first: /etc/opendkim.conf before /etc/opendkim.
        self.paths = sorted({
            "/etc/twisted-mta": f"{root}/etc/twisted-mta",
            "/etc/opendkim.conf": f"{root}/etc/opendkim.conf",
            "/etc/opendkim": f"{root}/etc/opendkim",
            "/etc/dovecot": f"{root}/etc/dovecot",
            "/etc/systemd/system": f"{root}/etc/systemd/system",
            "/run/dovecot": f"{dovecot_base}/run",
            "/run/opendkim": f"{root}/run/opendkim",
            "/var/spool/twisted-mta": f"{root}/spool",
            "/srv/mail": f"{root}/srv/mail",
        }.items(), key=lambda item: -len(item[0]))
        # Programs the systemd unit names: twistd and the CLI of this checkout.
        self.programs = {
            "/usr/local/bin/twistd": shlex.join(TWISTD),
            "/usr/local/bin/twisted-mta": shlex.join([sys.executable, "-m", "twisted_mta.cli"]),
        }
        self.ports = ports
        self.users = {"twisted-mta": MTA_USER, "opendkim": "opendkim"}

    def target(self, path: str) -> str | None:
        for docs, here in self.paths:
            if path == docs or path.startswith(docs + "/"):
                return here + path[len(docs):]
        return None

    def apply(self, name: str, text: str) -> str:
        for program, here in self.programs.items():
            text = re.sub(re.escape(program) + r"\b", lambda m: here, text)

        def path(m: re.Match) -> str:
            found = m.group(1)
            if found.startswith(self.root) or found.startswith(sys.executable):
                return found
            moved = self.target(found)
            if moved is None:
                raise AssertionError(f"{name}: the relocation table does not cover the "
                                     f"path {found}")
            return moved
        text = ABSOLUTE.sub(path, text)

        def port(m: re.Match) -> str:
            number = int(next(g for g in m.groups() if g))
            if number not in self.ports:
                raise AssertionError(f"{name}: the relocation table does not cover port "
                                     f"{number} ({m.group(0)!r})")
            new = str(self.ports[number])
            if m.group(1):  # a listener endpoint: loopback only
                return f"tcp:{new}:interface={LOOPBACK}"
            group = next(i for i, g in enumerate(m.groups(), 1) if g)
            start, end = m.start(group) - m.start(), m.end(group) - m.start()
            return m.group(0)[:start] + new + m.group(0)[end:]
        text = PORT.sub(port, text)

        def user(m: re.Match) -> str:
            out = m.group(0)
            for found in filter(None, m.groups()):
                if found not in self.users:
                    raise AssertionError(f"{name}: the relocation table does not cover "
                                         f"the user {found} ({out!r})")
                out = re.sub(rf"(?<![\w-]){re.escape(found)}(?![\w-])", self.users[found], out)
            return out
        return USER_FIELD.sub(user, text)


def write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


class DocsDovecot(DovecotInstance):
    """
    Dovecot on the docs' local.conf: a preamble standing in for Debian's
    dovecot.conf and conf.d (moved directories, LMTP only, Debian's
    C{auth-system.conf.ext}), then C{!include} of the docs' file.  No TCP
    listener: only the docs' socket is waited for.
    """

    def __init__(self, base: str, local_conf: str, mail_root: str) -> None:
        super().__init__(base, {})
        self.mail_root = mail_root
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(
                f"base_dir = {self.base}/run\n"
                f"state_dir = {self.base}/state\n"
                f"log_path = {self.base}/dovecot.log\n"
                "protocols = lmtp\n"
                f"listen = {LOOPBACK}\n"
                "ssl = no\n"
                "default_internal_user = dovecot\n"
                "default_internal_group = dovecot\n"
                "default_login_user = dovenull\n"
                "passdb {\n  driver = pam\n}\n"
                "userdb {\n  driver = passwd\n}\n"
                f"!include {local_conf}\n")

    def home(self, user: str) -> str:
        return os.path.join(self.mail_root, user)  # the docs' /srv/mail, relocated

    def _greets(self, family, address) -> bool:
        if family == socket.AF_INET:
            return True
        return DovecotInstance._greets(family, address)


class CapturingSink(Sink):
    """The remote side (remote.test): keeps each message and its recipients."""

    def __init__(self) -> None:
        self.messages: list[tuple[bytes, list[str]]] = []
        self._taken = threading.Lock()
        super().__init__()

    def took(self, message: bytes, rcpts: list[str]) -> None:
        with self._taken:
            self.messages.append((message, list(rcpts)))

    def containing(self, token: str) -> list[bytes]:
        with self._taken:
            return [m for m, _ in self.messages if token.encode() in m]


class FullExampleTests(SynchronousTestCase):
    """The section's set-up, started once per test."""

    def setUp(self) -> None:
        why = dovecot_unavailable()
        if why:
            self.skipTest(why)
        require_nsd()
        require_opendkim()
        if shutil.which("openssl") is None:
            missing("openssl is not installed (run scripts/install-test-deps)")
        self.command = installed_command()  # the sendmail command, runnable by nobody
        self.root = make_tempdir(self, "full-example", 0o755)
        dovecot_base = os.path.join(self.root, "dovecot")
        os.makedirs(dovecot_base)
        self.ports = {25: free_port(), 587: free_port(), 8891: free_port()}
        self.relocation = Relocation(self.root, dovecot_base, self.ports)
        blocks = marked_blocks(section())
        self.assertEqual(set(blocks), EXPECTED)
        self.files = {name: self.relocation.apply(name, text) for name, text in blocks.items()}
        for name, text in self.files.items():
            if name.startswith("/"):
                write(self.relocation.target(name), text)
        self.prepare_system()
        self.run_keys()
        self.prepare_mta_files()
        self.start_dns()
        self.start_dovecot(dovecot_base)
        self.start_opendkim()
        self.sink = CapturingSink()
        self.addCleanup(self.sink.stop)
        self.start_mta()

    # -- what the section's prose says to do, here ---------------------------------

    def prepare_system(self) -> None:
        """useradd's /srv/mail for vmail; the run directory tmpfiles makes for OpenDKIM."""
        mail = self.relocation.target("/srv/mail")
        os.makedirs(mail)
        os.chown(mail, MAIL_UID, MAIL_UID)
        os.chmod(mail, 0o700)
        run = self.relocation.target("/run/opendkim")
        os.makedirs(run)
        shutil.chown(run, "opendkim", "opendkim")

    def run_keys(self) -> None:
        """The docs' key commands, relocated, with genkey and openssl from PATH."""
        script = self.files["keys"].replace("opendkim-genkey ", f"{GENKEY} ")
        result = subprocess.run(["/bin/sh", "-e", "-x", "-c", script], capture_output=True,
                                text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stderr)
        with open(self.relocation.target("/etc/opendkim/keys/2026a.txt"), encoding="ascii") as f:
            self.opendkim_record = "".join(re.findall(r'"([^"]*)"', f.read()))
        self.assertIn("p=", self.opendkim_record)

    def start_dns(self) -> None:
        """nsd serving what section 5 publishes (the two keys), and sender.test's key."""
        from twisted_mta.config import load_config
        from twisted_mta.dkim import Signer
        from tests.support import make_config
        # Section 5: the 2026m record is what twisted-mta dkim record prints.
        config_path = self.relocation.target("/etc/twisted-mta/mta.toml")
        printed = subprocess.run(
            [sys.executable, "-m", "twisted_mta.cli", "dkim", "record", "-c", config_path],
            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60)
        self.assertEqual(printed.returncode, 0, printed.stderr)
        [line] = printed.stdout.splitlines()
        name, rest = line.split(" IN TXT ")
        self.assertEqual(name, f"2026m._domainkey.{DOMAIN}.")
        own_record = "".join(re.findall(r'"([^"]*)"', rest))
        [own] = Signer.from_config(load_config(config_path)).keys.values()
        self.assertEqual(own_record, own.dns_record())
        self.remote_key = os.path.join(self.root, "sender.test.pem")
        write_key(self.remote_key, "rsa-sha256")
        self.foreign = Signer.from_config(make_config(self.root, dkim={"domains": {
            "sender.test": {"selector": "ext", "key_file": self.remote_key}}}))
        [foreign] = self.foreign.keys.values()
        zones = {
            DOMAIN: zone(DOMAIN, [("2026a._domainkey", "TXT", txt(self.opendkim_record)),
                                  ("2026m._domainkey", "TXT", txt(own_record))]),
            "sender.test": zone("sender.test", [(f"{foreign.dns_name}.", "TXT",
                                                 txt(foreign.dns_record()))]),
        }
        self.zones = sorted(zones)
        self.nsd = NSDServer(os.path.join(self.root, "nsd"), zones)
        os.makedirs(self.nsd.workdir)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)

    def start_dovecot(self, base: str) -> None:
        self.dovecot = DocsDovecot(base, self.relocation.target("/etc/dovecot/local.conf"),
                                   self.relocation.target("/srv/mail"))
        self.addCleanup(self.dovecot.cleanup)
        self.dovecot.start()
        socket_path = self.relocation.target("/run/dovecot/lmtp")
        self.assertEqual(socket_path, self.dovecot.lmtp_socket)
        st = os.stat(socket_path)  # srw------- twisted-mta twisted-mta (daemon here)
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o777), (1, 1, 0o600))

    def start_opendkim(self) -> None:
        """opendkim -f -x on the docs' file, plus the test's resolver and log settings."""
        conf = self.relocation.target("/etc/opendkim.conf")
        host, port = self.nsd.address.split(":")
        unbound = os.path.join(self.root, "unbound.conf")
        stubs = "".join(f'stub-zone:\n  name: "{z}"\n  stub-addr: {host}@{port}\n'
                        for z in self.zones)
        write(unbound, 'server:\n  do-not-query-localhost: no\n  module-config: "iterator"\n'
                       '  local-zone: "test." nodefault\n' + stubs)
        with open(conf, encoding="utf-8") as f:
            text = f.read()
        text = re.sub(r"^(Syslog(?:Success)?)\s+yes$", r"\1 no", text, flags=re.M)
        # The key is under /tmp, which anyone may write: OpenDKIM would call
        # it unsafe (as in tests/interop/test_milter.py).
        write(conf, text + f"RequireSafeKeys false\nResolverConfiguration {unbound}\n")
        self.opendkim_out = os.path.join(self.root, "opendkim.out")
        with open(self.opendkim_out, "ab") as out:
            self.opendkim = subprocess.Popen([OPENDKIM, "-f", "-x", conf], stdout=out,
                                             stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)

        def stop() -> None:
            if self.opendkim.poll() is None:
                self.opendkim.terminate()
                try:
                    self.opendkim.wait(10)
                except subprocess.TimeoutExpired:
                    self.opendkim.kill()
                    self.opendkim.wait(10)
        self.addCleanup(stop)

        def listening() -> bool:
            if self.opendkim.poll() is not None:
                raise AssertionError(f"opendkim exited: {self.opendkim_log()}")
            try:
                socket.create_connection((LOOPBACK, self.ports[8891]), timeout=1).close()
            except OSError:
                return False
            return True
        wait_for(listening, 20, self.opendkim_log)

    def opendkim_log(self) -> str:
        with open(self.opendkim_out, encoding="utf-8", errors="replace") as f:
            return "opendkim: " + (f.read()[-3000:] or "(no output)")

    def prepare_mta_files(self) -> None:
        """The certificate and the users file, as section 4 says."""
        tls = self.relocation.target("/etc/twisted-mta/tls")
        os.makedirs(tls)
        self.ca = write_server_cert(tls)
        os.rename(os.path.join(tls, "cert.pem"), os.path.join(tls, "fullchain.pem"))
        os.rename(os.path.join(tls, "key.pem"), os.path.join(tls, "privkey.pem"))
        shutil.chown(os.path.join(tls, "privkey.pem"), group=MTA_USER)
        os.chmod(os.path.join(tls, "privkey.pem"), 0o640)
        users = self.relocation.target("/etc/twisted-mta/users")
        self.password = uuid.uuid4().hex
        subprocess.run([sys.executable, "-m", "twisted_mta.cli", "user", "add", users, "alice",
                        "--password-stdin"], input=self.password + "\n", text=True,
                       check=True, capture_output=True, cwd=PROJECT_ROOT, timeout=60)
        shutil.chown(users, group=MTA_USER)
        os.chmod(users, 0o640)

    def start_mta(self) -> None:
        """The docs' mta.toml with the test's additions, run as the systemd unit says."""
        # The test's additions: remote.test to the sink, DNS on loopback.
        self.config_path = self.relocation.target("/etc/twisted-mta/mta.toml")
        with open(self.config_path, encoding="utf-8") as f:
            docs_config = f.read()
        self.assertNotIn("[dns]", docs_config)
        write(self.config_path, docs_config + (
            '\n[outbound.routes."remote.test"]\n'
            f'host = "[127.0.0.1]:{self.sink.port}"\n'
            '\n[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'))
        unit = self.files["/etc/systemd/system/twisted-mta.service"]
        [pre] = re.findall(r"^ExecStartPre=(.*)$", unit, re.M)
        [start] = re.findall(r"^ExecStart=(.*)$", unit, re.M)
        check = subprocess.run(shlex.split(pre), capture_output=True, text=True,
                               cwd=PROJECT_ROOT, env=subprocess_env(), timeout=120)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        argv = shlex.split(start)
        self.assertEqual(argv[:len(TWISTD) + 2], TWISTD + ["-n", "--pidfile="], start)
        self.assertEqual(argv[-3:], ["mta", "--config", self.config_path], start)
        twistd_args = argv[len(TWISTD) + 2:-3]
        self.assertIn("--uid", twistd_args)
        # twistd and its workers under a Python whose files daemon may read.
        python, site = readable_python(self)
        self.patch(support, "TWISTD", [python] + TWISTD[1:])

        def readable_env() -> dict[str, str]:
            env = subprocess_env()
            env["PYTHONPATH"] = os.pathsep.join([PROJECT_ROOT, site])
            return env
        self.patch(support, "subprocess_env", readable_env)
        self.mta = MTAProcess(self.root, port=self.ports[25], hostname=HOSTNAME,
                              config_name="etc/twisted-mta/mta.toml.generated",
                              twistd_args=twistd_args)
        self.mta.config_path = self.config_path  # the docs' file, not MTAProcess's
        self.addCleanup(self.mta.cleanup)
        self.mta.start(timeout=60)

    # -- helpers --------------------------------------------------------------------

    def describe(self) -> str:
        return (f"{self.mta.describe()}\n{self.dovecot.describe()}\n{self.opendkim_log()}")

    def in_mailbox(self, user: str, token: str) -> bytes:
        found = wait_for(lambda: [m for m in self.dovecot.messages(user) if token.encode() in m],
                         TIMEOUT, lambda: f"{token} not in {user}'s mailbox; {self.describe()}")
        [message] = found
        return message

    def at_sink(self, token: str) -> bytes:
        [message] = wait_for(lambda: self.sink.containing(token), TIMEOUT,
                             lambda: f"{token} not at the sink; {self.describe()}")
        return message

    def sendmail(self, args: list[str], stdin: bytes) -> None:
        result = self.command.run(AS_NOBODY, args, stdin, config=self.config_path)
        self.assertEqual(result.returncode, 0, result.stderr)

    def assert_clean_log(self) -> None:
        """Nothing went wrong on the way (an import the MTA's user could not read, say)."""
        output = self.mta.output()
        for bad in ("Traceback", "No module named", "not DKIM-signed"):
            self.assertNotIn(bad, output)

    @staticmethod
    def signature(message: bytes) -> bytes:
        head = message.split(b"\r\n\r\n")[0].replace(b"\r\n\t", b" ").replace(b"\r\n ", b" ")
        [field] = [f for f in head.split(b"\r\n") if f.lower().startswith(b"dkim-signature:")]
        return field

    # -- the checks -------------------------------------------------------------------

    def test_submitted_mail_signed_by_opendkim(self) -> None:
        """(a) alice authenticated after STARTTLS on port 587, from a host OpenDKIM does not trust: the copy at remote.test carries OpenDKIM's s=2026a signature and dkimpy verifies it; the sendmail command's mail out, and a DSN, are signed s=2026m by twisted-mta and verify."""
        token = uuid.uuid4().hex
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        context.check_hostname = False
        message = (f"From: Alice <alice@{DOMAIN}>\r\nTo: carol@remote.test\r\n"
                   f"Subject: submitted {token}\r\n\r\ntoken {token}\r\n").encode()
        with smtplib.SMTP(LOOPBACK, self.ports[587], local_hostname="laptop.test",
                          timeout=30, source_address=(OUTSIDE, 0)) as client:
            client.starttls(context=context)
            client.login("alice", self.password)
            self.assertEqual(client.sendmail(f"alice@{DOMAIN}", ["carol@remote.test"],
                                             message), {})
        out = self.at_sink(token)
        field = self.signature(out)
        self.assertIn(f"d={DOMAIN}".encode(), field)
        self.assertIn(b"s=2026a", field)
        self.assertTrue(dkim.verify(out, dnsfunc=self.nsd.txt), out[:2000])
        self.assertIn("milter opendkim changed", self.mta.output())
        # Local programs: the sendmail command, signed by twisted-mta's own key.
        token = uuid.uuid4().hex
        self.sendmail(["-t"], f"To: carol@remote.test\nSubject: cron {token}\n\n"
                              f"token {token}\n".encode())
        out = self.at_sink(token)
        field = self.signature(out)
        self.assertIn(f"d={DOMAIN}".encode(), field)
        self.assertIn(b"s=2026m", field)
        self.assertIn(f"DKIM-signed for {DOMAIN} (s=2026m, rsa-sha256), mail from sendmail",
                      self.mta.output())
        self.assertIn(f"<nobody@{DOMAIN}>".encode(), out.split(b"\r\n\r\n")[0])
        self.assertTrue(dkim.verify(out, dnsfunc=self.nsd.txt), out[:2000])
        # Our DSNs: From MAILER-DAEMON@mx.example.org, signed as example.org
        # (subdomains = true).  ghost is no user of ours.
        token = uuid.uuid4().hex
        self.sendmail(["-f", "carol@remote.test", f"ghost@{DOMAIN}"],
                      f"Subject: bounce {token}\n\ntoken {token}\n".encode())
        dsn = self.at_sink(token)
        head = dsn.split(b"\r\n\r\n")[0]
        self.assertIn(f"MAILER-DAEMON@{HOSTNAME}".encode(), head)
        field = self.signature(dsn)
        self.assertIn(f"d={DOMAIN}".encode(), field)
        self.assertIn(b"s=2026m", field)
        self.assertTrue(dkim.verify(dsn, dnsfunc=self.nsd.txt), dsn[:2000])
        self.assert_clean_log()

    def test_internet_mail_verified_into_dovecot(self) -> None:
        """(b) A message from the Internet signed by sender.test lands in alice's Dovecot Maildir with Authentication-Results: mx.example.org; dkim=pass, and is not signed by us."""
        token = uuid.uuid4().hex
        message = (f"From: Dave <dave@sender.test>\r\nTo: alice@{DOMAIN}\r\n"
                   f"Subject: from outside {token}\r\nDate: Thu, 03 Dec 2026 12:00:00 +0000\r\n"
                   f"Message-ID: <{token}@sender.test>\r\n\r\ntoken {token}\r\n").encode()
        signed = self.foreign.sign(message, "sender.test")
        with smtplib.SMTP(LOOPBACK, self.ports[25], local_hostname="mail.sender.test",
                          timeout=30, source_address=(OUTSIDE, 0)) as client:
            self.assertEqual(client.sendmail("dave@sender.test", [f"alice@{DOMAIN}"], signed),
                             {})
        stored = self.in_mailbox("alice", token).replace(b"\r\n", b"\n")
        head = stored.split(b"\n\n")[0].replace(b"\n\t", b" ").replace(b"\n ", b" ")
        results = [f for f in head.split(b"\n") if f.lower().startswith(b"authentication-results:")]
        self.assertEqual(len(results), 1, stored[:2000])
        self.assertIn(f"Authentication-Results: {HOSTNAME};".encode(), results[0])
        self.assertIn(b"dkim=pass", results[0])
        self.assertIn(b"header.d=sender.test", results[0])
        self.assertIn(f"Delivered-To: alice@{DOMAIN}".encode(), stored)
        self.assertNotIn(f"d={DOMAIN}".encode(), stored)
        self.assertEqual(os.stat(self.relocation.target("/srv/mail/alice")).st_uid, MAIL_UID)
        self.assert_clean_log()

    def test_local_mail_into_dovecot(self) -> None:
        """(c) sendmail -t run by nobody to alice, and to root (an alias of alice): both land in her Dovecot Maildir."""
        token = uuid.uuid4().hex
        self.sendmail(["-t"], f"To: alice@{DOMAIN}\nSubject: local {token}\n\n"
                              f"token {token}\n".encode())
        stored = self.in_mailbox("alice", token)
        self.assertIn(b"from userid 65534 (nobody)", stored)
        self.assertIn(f"Return-Path: <nobody@{DOMAIN}>".encode(), stored)
        lmtp = self.relocation.target("/run/dovecot/lmtp")
        # Dovecot saves the file before it answers, and the MTA logs after
        # the answer: the line may follow the file by a moment.
        said = re.compile(re.escape(
            f"delivered to <alice@{DOMAIN}>: 250 2.0.0 LMTP server unix:{lmtp} said: "
            f"250 2.0.0 <alice@{DOMAIN}> ") + r"\S+ Saved")
        wait_for(lambda: said.search(self.mta.output()), TIMEOUT,
                 lambda: f"no LMTP delivery line; {self.describe()}")
        token = uuid.uuid4().hex
        self.sendmail(["root"], f"Subject: to root {token}\n\ntoken {token}\n".encode())
        self.in_mailbox("alice", token)
        self.assert_clean_log()


class PackagedDovecotTests(SynchronousTestCase):
    """
    The docs' local.conf on top of Debian's own /etc/dovecot (a copy, read
    by doveconf; no Dovecot is started from it): it parses, and what it
    sets wins over conf.d, as FullExampleTests' preamble assumes.
    """

    def test_local_conf_over_debian_defaults(self) -> None:
        """doveconf -n of a copy of the packaged /etc/dovecot plus the docs' local.conf: maildir, %Ln, the users file after Debian's passwd userdb, the socket's owner and mode."""
        if dovecot_unavailable():
            self.skipTest(dovecot_unavailable())
        packaged = "/etc/dovecot/dovecot.conf"
        doveconf = shutil.which("doveconf") or "/usr/bin/doveconf"
        with open(packaged, encoding="utf-8") as f:
            if "!include_try local.conf" not in f.read():
                self.fail(f"{packaged} does not read local.conf: not Debian's file")
        root = make_tempdir(self, "dovecot-packaged", 0o755)
        copy = os.path.join(root, "dovecot")
        shutil.copytree("/etc/dovecot", copy, ignore=shutil.ignore_patterns("private"))
        relocation = Relocation(root, os.path.join(root, "run"), {})
        text = relocation.apply("local.conf", marked_blocks(section())["/etc/dovecot/local.conf"])
        write(os.path.join(copy, "local.conf"), text)
        result = subprocess.run([doveconf, "-c", os.path.join(copy, "dovecot.conf"), "-n"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        effective = result.stdout
        self.assertIn("mail_location = maildir:~/Maildir\n", effective)
        self.assertIn("auth_username_format = %Ln\n", effective)
        self.assertIn("quota_full_tempfail = yes\n", effective)
        users = relocation.target("/etc/dovecot/users")
        self.assertRegex(effective, r"userdb \{\n  driver = passwd\n\}\nuserdb \{\n  args = "
                         + re.escape(users) + r"\n  driver = passwd-file\n\}")
        self.assertRegex(effective, r"service lmtp \{\n  unix_listener lmtp \{\n"
                         r"    group = daemon\n    mode = 0600\n    user = daemon\n")


class RelocationTableTests(SynchronousTestCase):
    """The table fails on what it does not cover (the checks above can fail)."""

    def setUp(self) -> None:
        self.relocation = Relocation("/tmp/t", "/tmp/t/dovecot", {25: 2525, 8891: 18891})

    def test_moves_paths_ports_users(self) -> None:
        text = ('spool = "/var/spool/twisted-mta"\nendpoint = "tcp:25"\n'
                'address = "inet:127.0.0.1:8891"\nSocket inet:8891@127.0.0.1\n'
                "KeyTable file:/etc/opendkim/keytable\nuser = twisted-mta\n"
                "chown twisted-mta:twisted-mta /etc/twisted-mta/x.pem\n")
        self.assertEqual(self.relocation.apply("t", text), (
            'spool = "/tmp/t/spool"\nendpoint = "tcp:2525:interface=127.0.0.1"\n'
            'address = "inet:127.0.0.1:18891"\nSocket inet:18891@127.0.0.1\n'
            "KeyTable file:/tmp/t/etc/opendkim/keytable\nuser = daemon\n"
            "chown daemon:daemon /tmp/t/etc/twisted-mta/x.pem\n"))

    def test_uncovered(self) -> None:
        for text in ('certificate = "/etc/ssl/certs/x.pem"', 'endpoint = "tcp:465"',
                     "TrustAnchorFile /usr/share/dns/root.key", "user = vmail",
                     "--uid mail"):
            self.assertRaises(AssertionError, self.relocation.apply, "t", text)

    def test_section_marks_every_file(self) -> None:
        """The section exists and marks exactly the expected files and commands."""
        self.assertEqual(set(marked_blocks(section())), EXPECTED)
