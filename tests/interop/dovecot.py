"""
A private Dovecot for interop tests: its own dovecot.conf, run directory,
state, log, passwd-file users and Maildirs under one temporary directory,
serving LMTP only, on a Unix socket in its run directory and on a free
loopback TCP port.  Never the system instance: nothing of /etc/dovecot is
read (C{dovecot -c} with a complete file) and nothing listens beyond
127.0.0.1.

Usage::

    dovecot = start_dovecot(self, users={"alice": None, "tiny": "1K"})
    ... [local.lmtp] address = f"unix:{dovecot.lmtp_socket}" ...
    dovecot.messages("alice")

Mail is stored as uid/gid L{MAIL_UID} (any number above Dovecot's
first_valid_uid works; it needs no passwd entry).  Dovecot itself runs as
root (the tests do), its helpers as the packaged C{dovecot} and
C{dovenull} users.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

from tests.interop.requires import missing, under_ci
from tests.interop.support import LOOPBACK, free_port, make_tempdir, wait_for

DOVECOT = shutil.which("dovecot") or (
    "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)
LMTP_SERVICE = "/usr/lib/dovecot/lmtp"  # from dovecot-lmtpd
MAIL_UID = 5000

_CONF = """\
# A private Dovecot for twisted-mta's tests: LMTP only, everything under
# {base}.
base_dir = {base}/run
state_dir = {base}/state
log_path = {base}/dovecot.log
protocols = lmtp
listen = {listen}
ssl = no
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = 1000
mail_location = maildir:~/Maildir
# The user as our RCPT TO names it, with or without its domain.
auth_username_format = %Ln
passdb {{
  driver = passwd-file
  args = {base}/users
}}
userdb {{
  driver = passwd-file
  args = {base}/users
}}
# Quota (per user, from the users file): over it, LMTP answers 452 4.2.2
# (a temporary failure) instead of 552.
mail_plugins = $mail_plugins quota
quota_full_tempfail = yes
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  unix_listener lmtp {{
    mode = 0666
  }}
  inet_listener lmtp {{
    address = {listen}
    port = {port}
  }}
}}
"""


def dovecot_unavailable() -> str | None:
    """
    Why a private Dovecot cannot run here (the caller skips), or None;
    under CI (C{CI=true}) a missing Dovecot fails the test instead.
    """
    why = None
    if DOVECOT is None:
        why = "dovecot is not installed (dovecot-core; run scripts/install-test-deps)"
    elif not os.path.exists(LMTP_SERVICE):
        why = "Dovecot's LMTP service is not installed (dovecot-lmtpd)"
    elif os.geteuid() != 0:
        why = "a private Dovecot storing mail as another uid needs root"
    if why is not None and under_ci():
        missing(why)
    return why


class DovecotInstance:
    """
    C{dovecot -F -c <base>/dovecot.conf}: LMTP on L{lmtp_socket} and on
    127.0.0.1:L{lmtp_port}.  C{users} maps each user to its quota
    (C{"1K"}: storage of one kilobyte) or None for no quota.
    """

    def __init__(self, base: str, users: dict[str, str | None], port: int | None = None,
                 extra_config: str = "") -> None:
        self.base = os.path.abspath(base)
        self.lmtp_port = port if port is not None else free_port()
        self.lmtp_socket = os.path.join(self.base, "run", "lmtp")
        self.log_path = os.path.join(self.base, "dovecot.log")
        self.conf = os.path.join(self.base, "dovecot.conf")
        self.process: subprocess.Popen | None = None
        os.chmod(self.base, 0o755)  # the auth and lmtp processes reach the users and mail
        for d in ("run", "state", "mail"):
            os.makedirs(os.path.join(self.base, d), exist_ok=True)
        os.chown(os.path.join(self.base, "mail"), MAIL_UID, MAIL_UID)
        lines = []
        for user, quota in users.items():
            extra = f"userdb_quota_rule=*:storage={quota}" if quota else ""
            lines.append(f"{user}:{{PLAIN}}unused:{MAIL_UID}:{MAIL_UID}::"
                         f"{self.home(user)}::{extra}\n")
        with open(os.path.join(self.base, "users"), "w", encoding="utf-8") as f:
            f.writelines(lines)
        os.chmod(os.path.join(self.base, "users"), 0o644)
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write(_CONF.format(base=self.base, listen=LOOPBACK, port=self.lmtp_port))
            f.write(extra_config)

    def home(self, user: str) -> str:
        return os.path.join(self.base, "mail", user)

    def maildir(self, user: str) -> str:
        return os.path.join(self.home(user), "Maildir")

    def messages(self, user: str) -> list[bytes]:
        """
        The messages Dovecot stored in C{user}'s INBOX (new/ and cur/).
        """
        out = []
        for sub in ("new", "cur"):
            d = os.path.join(self.maildir(user), sub)
            try:
                names = sorted(os.listdir(d))
            except FileNotFoundError:
                continue
            for name in names:
                with open(os.path.join(d, name), "rb") as f:
                    out.append(f.read())
        return out

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return "(no log)"

    def describe(self) -> str:
        state = ("running" if self.running else
                 f"exited with {self.process.returncode}" if self.process else "never started")
        return f"Dovecot ({self.conf}) {state}; log:\n{self.log()[-4000:]}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 20.0) -> "DovecotInstance":
        """
        Start Dovecot in the foreground (its own process group) and wait
        until its LMTP service greets on the socket and the port.
        """
        if self.running:
            raise AssertionError("Dovecot already running")
        with open(os.path.join(self.base, "dovecot.out"), "ab") as out:
            self.process = subprocess.Popen(
                [DOVECOT, "-F", "-c", self.conf], stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"Dovecot exited during start-up; {self.describe()}")
            return self._greets(socket.AF_UNIX, self.lmtp_socket) and self._greets(
                socket.AF_INET, (LOOPBACK, self.lmtp_port))

        wait_for(ready, timeout, lambda: f"Dovecot's LMTP does not answer; {self.describe()}",
                 interval=0.1)
        return self

    @staticmethod
    def _greets(family, address) -> bool:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                s.connect(address)
                return s.recv(100).startswith(b"220 ")
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """
        SIGTERM to the master (a clean stop) and wait for it; SIGKILL to
        its process group when it does not go.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        """
        SIGKILL to Dovecot's process group (the master and every service
        process it started): a crash mid-session.
        """
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            pass
        # The master's pid file says "running" to the next start otherwise.
        try:
            os.remove(os.path.join(self.base, "run", "master.pid"))
        except FileNotFoundError:
            pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self._group_alive():
            time.sleep(0.05)

    def _group_alive(self) -> bool:
        try:
            os.killpg(self.process.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def cleanup(self) -> None:
        if self.process is not None:
            self.stop(5)
            if self._group_alive():
                self.kill()


def start_dovecot(testcase, users: dict[str, str | None], base: str | None = None,
                  **kw) -> DovecotInstance:
    """
    Make a L{DovecotInstance} in a fresh temporary directory (unless
    C{base}), register its cleanup on C{testcase} and start it.
    """
    if base is None:
        base = make_tempdir(testcase, "dovecot", 0o755)
    dovecot = DovecotInstance(base, users, **kw)
    testcase.addCleanup(dovecot.cleanup)
    return dovecot.start()
