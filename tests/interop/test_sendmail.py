"""
The sendmail command against a real twisted-mta (twistd), run by
unprivileged users (C{nobody}, C{daemon}) through C{setpriv}.

The command is run exactly as a packager installs it: the console
script's code (C{twisted_mta.cli.sendmail_script}) in a file linked as
C{sendmail}, under the system's Python (C{/usr/bin/python3.11}), because
the test's own interpreter (a pyenv under C{/root}) cannot be reached by
another user.  The packages it imports are linked (or copied) from the
test's site-packages into a directory everyone may read.

What is checked: a non-root user's message lands in a local Maildir with
the From the command made and the pickup's Received line naming the
user's uid; a message with no header at all gets From, Date, Message-ID
and To; a message submitted while the MTA is stopped waits in the
maildrop and is delivered when it starts; C{-t} with Bcc reaches the Bcc
recipient and no delivered copy shows the Bcc header; C{echo hi |
sendmail -t} (with a To line) as C{nobody}; C{-bs}; other users cannot
list, read or remove a drop; garbage in the maildrop is set aside while
the next message still arrives; and with twistd running the MTA as
C{daemon} (C{--uid}/C{--gid}), the maildrop belongs to daemon (mode 3733)
and the MTA reads nobody's drop through its group.
"""

from __future__ import annotations

import email
import email.policy
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from twisted.trial import unittest

from tests.interop.requires import missing
from tests.interop.support import (
    EVENTS_FILE, MTAProcess, PROJECT_ROOT, files_containing, json_lines, make_tempdir, wait_for,
)

SETPRIV = shutil.which("setpriv")
AS_NOBODY = [SETPRIV or "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
AS_DAEMON = [SETPRIV or "setpriv", "--reuid=daemon", "--regid=daemon", "--clear-groups"]
NOBODY_UID = 65534
EXTRA = f'[logging]\nformat = "json"\nfile = "{EVENTS_FILE}"\n'


def system_python() -> str | None:
    """
    A Python of our minor version outside /root, which any user may run.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def link_tree(src: str, dst: str) -> None:
    """
    C{src} (a package directory or module file) at C{dst}, files hard
    linked when the file system allows, else copied.
    """
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=link,
                        ignore=shutil.ignore_patterns("__pycache__", "tests", "test"))
    else:
        link(src, dst)


class Command:
    """
    The sendmail command installed for other users: C{bin/sendmail} (a
    link to C{bin/twisted-mta-sendmail}, the console script) and the
    packages it needs in C{site/}, under a directory of mode 0755.
    """

    def __init__(self) -> None:
        python = system_python()
        if python is None:
            missing(f"no python{sys.version_info.major}.{sys.version_info.minor} outside "
                    "/root that another user may run (Debian's python3 package)")
        if SETPRIV is None:
            missing("setpriv (util-linux) is not installed")
        self.base = tempfile.mkdtemp(prefix="twisted-mta-sendmail-cmd-")
        try:
            self._install(python)
        except BaseException:
            self.cleanup()
            raise

    def _install(self, python: str) -> None:
        os.chmod(self.base, 0o755)
        site = os.path.join(self.base, "site")
        os.mkdir(site)
        # The distributions the command imports, found by importing it.
        found = subprocess.run(
            [sys.executable, "-c",
             "import os, sys, twisted_mta.cli\n"
             "for m in list(sys.modules.values()):\n"
             "    f = getattr(m, '__file__', None) or ''\n"
             "    for p in sys.path:\n"
             "        if p.endswith('-packages') and f.startswith(p + os.sep):\n"
             "            print(os.path.join(p, os.path.relpath(f, p).split(os.sep)[0]))\n"],
            cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout.split()
        for path in sorted(set(found)):
            link_tree(path, os.path.join(site, os.path.basename(path)))
        bin_dir = os.path.join(self.base, "bin")
        os.mkdir(bin_dir)
        script = os.path.join(bin_dir, "twisted-mta-sendmail")
        with open(script, "w") as f:
            f.write(f"#!{python}\nimport sys\nfrom twisted_mta.cli import sendmail_script\n"
                    "sendmail_script()\n")
        os.chmod(script, 0o755)
        os.symlink("twisted-mta-sendmail", os.path.join(bin_dir, "sendmail"))
        self.bin = bin_dir
        self.sendmail = os.path.join(bin_dir, "sendmail")
        self.env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "LANG": "C.UTF-8",
                    "PYTHONPATH": f"{PROJECT_ROOT}:{site}", "PYTHONDONTWRITEBYTECODE": "1"}
        # The checkout must be readable by others (it is, in CI's /work).
        check = self.run(AS_NOBODY, ["-bi"], config="/nonexistent.toml")
        if check.stderr != b"sendmail: /nonexistent.toml: no such file\n":
            raise AssertionError(f"the command does not run as nobody: {check.returncode} "
                                 f"{check.stderr}")

    def run(self, user: list[str], args: list[str], stdin: bytes = b"",
            config: str | None = None, shell: str | None = None) -> subprocess.CompletedProcess:
        env = dict(self.env)
        if config is not None:
            env["TWISTED_MTA_CONFIG"] = config
        argv = user + (["/bin/sh", "-c", shell] if shell else [self.sendmail] + args)
        return subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=60,
                              cwd="/")

    def cleanup(self) -> None:
        shutil.rmtree(self.base, True)


def decoded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    result.stderr = result.stderr.decode("utf-8", "replace")
    return result


_COMMAND: list[Command] = []


def installed_command() -> Command:
    """
    The command, installed once per test process (removed at exit).
    """
    if not _COMMAND:
        import atexit
        command = Command()
        atexit.register(command.cleanup)
        _COMMAND.append(command)
    return _COMMAND[0]


class SendmailTests(unittest.TestCase):

    def setUp(self) -> None:
        self.command = installed_command()
        tmpdir = make_tempdir(self, "sendmail", mode=0o711)
        self.mta = MTAProcess(tmpdir, EXTRA, domains=("example.test", "mx.example.test"),
                              users=("alice", "bob", "postmaster"), workers=1)
        self.addCleanup(self.mta.cleanup)
        os.chmod(self.mta.config_path, 0o644)
        self.mta.start()

    def sendmail(self, args: list[str], stdin: bytes, user: list[str] = AS_NOBODY,
                 **kw) -> subprocess.CompletedProcess:
        result = self.command.run(user, args, stdin, config=self.mta.config_path, **kw)
        result.stderr = result.stderr.decode("utf-8", "replace")
        return result

    def delivered(self, user: str, token: bytes, count: int = 1,
                  timeout: float = 10) -> list[email.message.Message]:
        maildir = self.mta.maildir(user)
        paths = wait_for(lambda: (lambda found: found if len(found) >= count else None)(
            files_containing(maildir, token)), timeout,
            lambda: f"{count} message(s) with {token!r} not in {maildir}; {self.mta.describe()}")
        out = []
        for path in paths:
            with open(path, "rb") as f:
                out.append(email.message_from_bytes(f.read(), policy=email.policy.compat32))
        return out

    def events(self, name: str) -> list[dict]:
        return [e for e in json_lines(os.path.join(self.mta.tmpdir, EVENTS_FILE))
                if e.get("event") == name]

    def test_unprivileged_user_submits(self) -> None:
        started = time.monotonic()
        result = self.sendmail(["-oi", "alice"], b"Subject: from nobody\n\nbody TOKEN-N1\n")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        [message] = self.delivered("alice", b"TOKEN-N1")
        latency = time.monotonic() - started
        self.assertEqual(message["From"], "nobody <nobody@mx.example.test>")
        self.assertEqual(message["Return-Path"], "<nobody@mx.example.test>")
        received = message.get_all("Received")[0]
        self.assertIn(f"(twisted-mta pickup, from userid {NOBODY_UID} (nobody))", received)
        [accepted] = self.events("pickup.accepted")
        self.assertEqual((accepted["uid"], accepted["user"]), (NOBODY_UID, "nobody"))
        self.assertEqual(os.listdir(os.path.join(self.mta.spool, "maildrop")), [])
        # picked up within a second of the poll (2 s of slack on a busy machine)
        self.assertLess(latency, 6, f"delivered {latency:.2f}s after submission began")

    def test_all_headers_missing(self) -> None:
        result = self.sendmail(["-F", "Night Job", "bob"], b"no header at all TOKEN-H1\n")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        [message] = self.delivered("bob", b"TOKEN-H1")
        self.assertEqual(message["From"], "Night Job <nobody@mx.example.test>")
        self.assertEqual(message["To"], "undisclosed-recipients:;")
        self.assertRegex(message["Message-ID"], r"^<\d+\.[0-9a-f]{16}@mx\.example\.test>$")
        self.assertIsNotNone(email.utils.parsedate_to_datetime(message["Date"]))
        self.assertEqual(message.get_payload(), "no header at all TOKEN-H1\n")

    def test_mta_stopped_during_submission(self) -> None:
        self.assertIn(self.mta.stop(), (0, -signal.SIGTERM), self.mta.output())
        result = self.sendmail(["-v", "alice@example.test"], b"Subject: later\n\nTOKEN-S1\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("sendmail: dropped as ", result.stderr)
        name = result.stderr.split("dropped as ")[1].split()[0]
        drops = os.path.join(self.mta.spool, "maildrop")
        self.assertEqual(os.listdir(drops), [name])
        self.assertEqual(os.stat(os.path.join(drops, name)).st_uid, NOBODY_UID)
        time.sleep(1.5)
        self.assertEqual(files_containing(self.mta.maildir("alice"), b"TOKEN-S1"), [])
        self.mta.start()
        [message] = self.delivered("alice", b"TOKEN-S1")
        self.assertIn("from userid 65534 (nobody)", message["Received"])
        self.assertEqual(os.listdir(drops), [])

    def test_t_with_bcc(self) -> None:
        message = (b"To: alice@example.test\nCc: postmaster\nBcc: bob@example.test\n"
                   b"Subject: minutes\n\nTOKEN-B1\n")
        result = self.sendmail(["-t", "-i"], message)
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        copies = [*self.delivered("alice", b"TOKEN-B1"), *self.delivered("bob", b"TOKEN-B1"),
                  *self.delivered("postmaster", b"TOKEN-B1")]
        self.assertEqual(len(copies), 3)
        for copy in copies:
            self.assertIsNone(copy["Bcc"])
            self.assertNotIn("bob@example.test", str(copy).split("\n\n", 1)[0].replace(
                "Delivered-To: bob@example.test", ""))
            self.assertEqual(copy["To"], "alice@example.test")

    def test_echo_hi_sendmail_t(self) -> None:
        # exactly what a cron line or a script does, through the shell and PATH
        result = self.sendmail([], b"", shell="(echo 'To: alice@example.test'; echo; echo hi) "
                               "| sendmail -t")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        maildir = self.mta.maildir("alice")
        wait_for(lambda: os.path.isdir(os.path.join(maildir, "new")) and
                 os.listdir(os.path.join(maildir, "new")), 10, self.mta.describe)
        [name] = os.listdir(os.path.join(maildir, "new"))
        with open(os.path.join(maildir, "new", name), "rb") as f:
            message = email.message_from_bytes(f.read(), policy=email.policy.compat32)
        self.assertEqual(message.get_payload(), "hi\n")
        self.assertEqual(message["To"], "alice@example.test")
        self.assertEqual(message["From"], "nobody <nobody@mx.example.test>")

    def test_bs(self) -> None:
        dialogue = (b"EHLO client.example.test\r\nMAIL FROM:<cron@example.test>\r\n"
                    b"RCPT TO:<bob@example.test>\r\nDATA\r\nSubject: over stdin\r\n\r\n"
                    b"..TOKEN-SMTP\r\n.\r\nQUIT\r\n")
        result = self.sendmail(["-bs"], dialogue)
        self.assertEqual(result.returncode, 0, result.stderr)
        codes = [line[:3] for line in result.stdout.split(b"\r\n") if line]
        # 220, the EHLO reply (six lines), MAIL, RCPT, DATA, the message, QUIT
        self.assertEqual(codes, [b"220"] + [b"250"] * 6 + [b"250", b"250", b"354", b"250",
                                                           b"221"])
        self.assertIn(b"250-SMTPUTF8\r\n", result.stdout)
        [message] = self.delivered("bob", b"TOKEN-SMTP")
        self.assertEqual(message.get_payload(), ".TOKEN-SMTP\n")
        self.assertEqual(message["Return-Path"], "<cron@example.test>")
        self.assertIn("from userid 65534 (nobody)", message["Received"])

    def test_dsn_flags(self) -> None:
        # -f and -N success: the sender gets a success DSN (RFC 3461) with -V's id
        result = self.sendmail(["-f", "alice@example.test", "-N", "success", "-R", "hdrs",
                                "-V", "nightly-42", "bob"], b"Subject: report\n\nTOKEN-D1\n")
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.delivered("bob", b"TOKEN-D1")
        [dsn] = self.delivered("alice", b"nightly-42")
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        report = str(dsn)
        self.assertIn("Action: delivered", report)
        self.assertIn("Original-Envelope-Id: nightly-42", report)
        self.assertNotIn("TOKEN-D1", report)  # RET=HDRS: the headers only

    def test_other_users_cannot_touch_a_drop(self) -> None:
        self.mta.stop()
        result = self.sendmail(["-v", "alice"], b"Subject: private\n\nTOKEN-P1\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        name = result.stderr.split("dropped as ")[1].split()[0]
        drops = os.path.join(self.mta.spool, "maildrop")
        probe = ("import os, sys\n"
                 "d, n = sys.argv[1], sys.argv[2]\n"
                 "for what, f in (('list', lambda: os.listdir(d)),\n"
                 "                ('read', lambda: open(os.path.join(d, n), 'rb').read()),\n"
                 "                ('remove', lambda: os.unlink(os.path.join(d, n))),\n"
                 "                ('rename', lambda: os.rename(os.path.join(d, n),\n"
                 "                                             os.path.join(d, 'X'))),\n"
                 "                ('spool', lambda: os.listdir(os.path.dirname(d)))):\n"
                 "    try:\n"
                 "        f()\n"
                 "        print(what, 'allowed')\n"
                 "    except OSError as e:\n"
                 "        print(what, e.errno)\n")
        out = subprocess.run(AS_DAEMON + [system_python(), "-c", probe, drops, name],
                             capture_output=True, text=True, timeout=30, cwd="/")
        self.assertEqual(out.stdout.split("\n"), ["list 13", "read 13", "remove 1",
                                                  "rename 1", "spool 13", ""], out.stderr)
        # nobody itself may not list the directory either
        out = subprocess.run(AS_NOBODY + [system_python(), "-c", probe, drops, "none"],
                             capture_output=True, text=True, timeout=30, cwd="/")
        self.assertEqual(out.stdout.split("\n")[0], "list 13")
        self.assertEqual(os.listdir(drops), [name])
        self.mta.start()
        self.delivered("alice", b"TOKEN-P1")

    def test_garbage_in_the_maildrop(self) -> None:
        drops = os.path.join(self.mta.spool, "maildrop")
        garbage = ("import os, sys\n"
                   "d = sys.argv[1]\n"
                   "open(os.path.join(d, 'JUNK1'), 'wb').write(b'TWISTED-MTA-MAILDROP 1\\n{]\\n')\n"
                   "os.symlink('/etc/shadow', os.path.join(d, 'JUNK2'))\n")
        out = subprocess.run(AS_NOBODY + [system_python(), "-c", garbage, drops],
                             capture_output=True, text=True, timeout=30, cwd="/")
        self.assertEqual(out.returncode, 0, out.stderr)
        result = self.sendmail(["alice"], b"Subject: after junk\n\nTOKEN-G1\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.delivered("alice", b"TOKEN-G1")
        wait_for(lambda: len(self.events("pickup.rejected")) == 2, 10, self.mta.describe)
        rejected = {e["drop"]: e for e in self.events("pickup.rejected")}
        self.assertIn("not JSON", rejected["JUNK1"]["why"])
        self.assertIn("symbolic link", rejected["JUNK2"]["why"])
        self.assertEqual(rejected["JUNK1"]["uid"], NOBODY_UID)
        self.assertEqual(sorted(os.listdir(os.path.join(self.mta.spool, "corrupt"))),
                         ["maildrop-JUNK1", "maildrop-JUNK2"])
        self.assertTrue(self.mta.running)


class UnprivilegedMTATests(unittest.TestCase):
    """
    The MTA as packaged: twistd starts as root and runs as its own user
    (here daemon, C{--uid}/C{--gid}); it reads nobody's drop through the
    maildrop's group, without root.
    """

    def test_mta_user_reads_drops_by_group(self) -> None:
        command = installed_command()
        tmpdir = make_tempdir(self, "sendmail-uid", mode=0o711)
        mail = os.path.join(tmpdir, "mail")
        os.mkdir(mail)
        os.chown(mail, 1, 1)  # the Maildirs are made by the MTA's user
        mta = MTAProcess(tmpdir, EXTRA, domains=("example.test",), workers=0,
                         twistd_args=["--uid=1", "--gid=1"])
        self.addCleanup(mta.cleanup)
        os.chmod(mta.config_path, 0o644)
        mta.start()
        drops = os.path.join(mta.spool, "maildrop")
        st = os.stat(drops)
        self.assertEqual((st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)), (1, 1, 0o3733))
        self.assertEqual(stat.S_IMODE(os.stat(mta.spool).st_mode), 0o711)
        result = command.run(AS_NOBODY, ["-v", "alice@example.test"],
                             b"Subject: as daemon\n\nTOKEN-U1\n", config=mta.config_path)
        self.assertEqual(result.returncode, 0, result.stderr)
        name = result.stderr.decode().split("dropped as ")[1].split()[0]
        wait_for(lambda: files_containing(mta.maildir("alice"), b"TOKEN-U1"), 10,
                 mta.describe)
        [path] = files_containing(mta.maildir("alice"), b"TOKEN-U1")
        self.assertEqual(os.stat(path).st_uid, 1)
        with open(path, "rb") as f:
            self.assertIn(b"from userid 65534 (nobody)", f.read())
        [accepted] = [e for e in json_lines(os.path.join(mta.tmpdir, EVENTS_FILE))
                      if e.get("event") == "pickup.accepted"]
        self.assertEqual(accepted["drop"], name)
        self.assertEqual(os.listdir(drops), [])
