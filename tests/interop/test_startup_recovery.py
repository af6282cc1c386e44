"""
Start-up as an operator sees it after damage (issue 11): a garbage state
xattr, an envelope with wrong types or a queue file cut short no longer
stop the MTA (it greets within 5 s, the entry restarted from its header or
set aside in corrupt/, logged); and a start-up that cannot complete exits
non-zero within 10 s with one line saying why, instead of staying alive
with its port bound and no greeting.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import uuid

import attrs
from twisted.trial import unittest

from tests.interop.support import (
    LOCAL_DOMAIN, MTAProcess, TWISTD, files_containing, make_message, make_tempdir,
    read_banner, subprocess_env, wait_for,
)
from twisted_mta.model import HEADER_NAME, Envelope, Recipient
from twisted_mta.queue.spool import XATTR, Spool

ALICE = f"alice@{LOCAL_DOMAIN}"


def plant(spool: Spool, token: str, attempts: int = 1) -> str:
    """
    Queue a message for alice as the MTA would have (committed, attempted
    once, deferred in cur/); return its queue id.
    """
    w = spool.new_message()
    body = make_message(token)
    now = time.time()
    env = Envelope(queue_id=w.queue_id, sender="sender@client.example.test",
                   recipients=(Recipient(ALICE),), arrival=now, next_attempt=now,
                   size=len(body), client={"ip": "192.0.2.1", "protocol": "ESMTP"})
    w.write(env.to_header())
    w.write(body)
    w.commit(env).addCallback(lambda committed: spool.update_and_move(
        attrs.evolve(committed, attempts=attempts, next_attempt=now + 3600), "new", "cur"))
    return w.queue_id


def run(argv_prefix: list[str], config_path: str, cwd: str, timeout: float = 10):
    """
    twistd -n mta --config FILE, to completion within C{timeout} seconds
    (stdout and stderr together), and how long it took.
    """
    started = time.monotonic()
    result = subprocess.run(
        argv_prefix + ["-n", "--pidfile=", "mta", "--config", config_path],
        cwd=cwd, env=subprocess_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, timeout=timeout, text=True, errors="replace")
    return result, time.monotonic() - started


class DamagedSpoolStartsTests(unittest.TestCase):

    def test_garbage_state_xattr_greets_within_5s(self) -> None:
        """F1/F2/F9: with a garbage state xattr, a torn one, an envelope whose client is an array and a queue file cut short in the spool, the MTA greets within 5 s; the first two are delivered (restarted from their header envelope), the others are in corrupt/; each is logged."""
        tmp = make_tempdir(self, "startup")
        mta = MTAProcess(tmp)
        self.addCleanup(mta.cleanup)
        spool = Spool(mta.spool)
        spool.create()
        tokens = {name: f"{name}-{uuid.uuid4().hex}" for name in
                  ("garbage", "torn", "client", "truncated")}
        ids = {name: plant(spool, token) for name, token in tokens.items()}

        def path(name: str) -> str:
            return spool.path_in("cur", ids[name])

        os.setxattr(path("garbage"), XATTR, b"garbage")
        data = os.getxattr(path("torn"), XATTR)
        os.setxattr(path("torn"), XATTR, data[:len(data) // 2])
        raw = json.loads(Envelope.from_json(os.getxattr(path("client"), XATTR)).to_json())
        raw["client"] = ["helo", "x"]
        with open(path("client"), "wb") as f:
            f.write(HEADER_NAME + b": " + base64.b64encode(json.dumps(raw).encode()) + b"\r\n")
            f.write(make_message(tokens["client"]))
        os.truncate(path("truncated"), os.path.getsize(path("truncated")) - 10)

        started = time.monotonic()
        mta.start(timeout=5.0)
        self.assertLess(time.monotonic() - started, 5.0)

        maildir = mta.maildir("alice")
        for name in ("garbage", "torn"):
            wait_for(lambda name=name: files_containing(maildir, tokens[name].encode()), 10,
                     lambda: f"{name} not delivered; {mta.describe()}")
        for name in ("client", "truncated"):
            self.assertEqual(files_containing(maildir, tokens[name].encode()), [], name)
        self.assertEqual(sorted(os.listdir(os.path.join(mta.spool, "corrupt"))),
                         sorted([ids["client"], ids["truncated"]]))
        out = mta.output()
        for name in ("garbage", "torn"):
            self.assertIn(f"recorded state of {ids[name]} is unusable", out)
        self.assertIn(f"{ids['client']} in cur/ cannot be used (envelope.client: expected an "
                      "object, got an array)", out)
        self.assertIn(f"{ids['truncated']} in cur/ cannot be used (the queue file is", out)
        self.assertNotIn("Traceback", out)
        wait_for(lambda: not mta.spool_contents(("new", "cur")), 10, mta.describe)


class StartupFailureTests(unittest.TestCase):
    """
    A start-up that cannot complete: non-zero within 10 s, one line saying
    why, no traceback, nothing left listening.
    """

    def assertOneLineFailure(self, result, took: float, port: int, *expected: str) -> None:
        out = result.stdout
        self.assertNotEqual(result.returncode, 0, out)
        self.assertLess(took, 10.0)
        self.assertNotIn("Traceback", out)
        lines = [line for line in out.splitlines() if all(text in line for text in expected)]
        self.assertEqual(len(lines), 1, f"not one line saying why:\n{out}")
        self.assertFalse([line for line in out.splitlines() if line not in lines and (
            "#error]" in line or "#critical]" in line)], out)
        self.assertIsNone(read_banner(port, timeout=1.0), "something still listens")

    def test_spool_not_a_directory(self) -> None:
        """The spool path is a regular file: exit 1, one line naming the spool."""
        tmp = make_tempdir(self, "startup")
        mta = MTAProcess(tmp)
        self.addCleanup(mta.cleanup)
        with open(mta.spool, "w") as f:
            f.write("not a directory\n")
        result, took = run(TWISTD, mta.config_path, tmp)
        self.assertOneLineFailure(result, took, mta.port, mta.spool, "cannot create spool")

    def test_recovery_that_raises(self) -> None:
        """Recovery raising at start-up (here: an injected OSError from the directory listing, Spool.recover_start, as from a spool directory that cannot be read) stops twistd: exit 1 within 10 s, one line saying what failed, the port closed; before, the process stayed alive, listening without a greeting."""
        tmp = make_tempdir(self, "startup")
        mta = MTAProcess(tmp)
        self.addCleanup(mta.cleanup)
        prelude = (
            "import errno, os\n"
            "from twisted_mta.queue import spool\n"
            "def recover_start(self):\n"
            "    raise OSError(errno.EIO, os.strerror(errno.EIO), os.path.join(self.path, 'new'))\n"
            "spool.Spool.recover_start = recover_start\n"
            "from twisted.scripts.twistd import run; run()\n")
        result, took = run([TWISTD[0], "-c", prelude], mta.config_path, tmp)
        self.assertOneLineFailure(result, took, mta.port, "start-up failed",
                                  "queue-manager cannot start",
                                  os.path.join(mta.spool, "new"), "Input/output error")
        self.assertEqual(result.returncode, 1)
