"""
Crash safety: SIGKILL the MTA at awkward moments, restart it on the same
configuration, and check that an acknowledged message is delivered exactly
once and an unacknowledged one not at all, with nothing left in the spool.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

from twisted.trial import unittest

from tests.interop.support import (
    LOCAL_DOMAIN, MTAProcess, RawSMTP, children, files_containing, make_message,
    pid_alive, start_mta, wait_for,
)

SENDER = "sender@client.example.test"
ALICE = f"alice@{LOCAL_DOMAIN}"

# Pause between reading the 250 and the SIGKILL.  0 is "the moment the 250 is
# read" (the entry is still queued); on a typical machine 0.1-0.8 ms lands the
# crash after the Maildir link but before the entry is removed (the restart
# must then not deliver again), and a few ms after the entry is gone.
KILL_DELAYS = (0, 0, 0.0001, 0.0002, 0.0003, 0.0005, 0.0008, 0.002, 0.02)


class CrashAfterAcceptTests(unittest.TestCase):

    def _send_and_kill(self, mta: MTAProcess, token: str, delay: float) -> None:
        """
        Send one message with a raw socket and SIGKILL the MTA as soon as
        the reply to the final dot has been read (after C{delay} seconds).
        """
        client = RawSMTP(mta.port)
        try:
            client.start_transaction(SENDER, [ALICE])
            client.send(make_message(token) + b".\r\n")
            code, lines = client.reply()
            if delay:
                time.sleep(delay)
            mta.kill()
        finally:
            client.close()
        self.assertEqual(code, 250, f"{lines!r}; {mta.describe()}")

    def test_kill_after_250_then_restart_delivers_exactly_once(self) -> None:
        """A message acknowledged with 250 just before a SIGKILL is delivered exactly once after restart, and the spool ends empty, at several kill timings."""
        mta = start_mta(self)
        maildir = mta.maildir("alice")
        tokens = []
        for i, delay in enumerate(KILL_DELAYS):
            token = f"crash-a-{i}-{uuid.uuid4().hex}"
            tokens.append(token)
            self._send_and_kill(mta, token, delay)
            mta.start()

            def settled(token=token) -> bool:
                return bool(files_containing(maildir, token.encode())) and not mta.spool_contents()

            wait_for(settled, 10, lambda: (
                f"kill #{i} (delay {delay}s): delivered "
                f"{files_containing(maildir, token.encode())}, spool {mta.spool_contents()}; "
                f"{mta.describe()}"))
            copies = files_containing(maildir, token.encode())
            self.assertEqual(len(copies), 1, f"kill #{i} (delay {delay}s): copies {copies}")
        # No later restart re-delivered an earlier message.
        for token in tokens:
            self.assertEqual(len(files_containing(maildir, token.encode())), 1, token)
        self.assertEqual(len(os.listdir(os.path.join(maildir, "new"))), len(tokens))
        self.assertEqual(mta.spool_contents(), {})
        # twistd re-raises the SIGTERM after a clean shutdown.
        self.assertIn(mta.stop(), (0, -signal.SIGTERM), mta.describe())
        self.assertIn("Server Shut Down.", mta.output().rpartition("===== run")[2])


class CrashDuringDataTests(unittest.TestCase):

    def test_kill_mid_data_leaves_no_entry_and_no_delivery(self) -> None:
        """A SIGKILL in the middle of DATA (no final dot) leaves no queue entry after restart and nothing is delivered, while a later message still is."""
        mta = start_mta(self)
        maildir = mta.maildir("alice")
        token = f"crash-b-{uuid.uuid4().hex}"
        filler = ["x" * 76 for _ in range(4000)]  # ~310 KB: more than the writer keeps in memory
        client = RawSMTP(mta.port)
        try:
            client.start_transaction(SENDER, [ALICE])
            client.send(make_message(token, body_lines=filler))  # no final dot

            def partial_on_disk() -> bool:
                tmp = os.path.join(mta.spool, "tmp")
                return any(os.path.getsize(os.path.join(tmp, n)) >= 65536
                           for n in os.listdir(tmp))

            wait_for(partial_on_disk, 10, lambda: f"no partial message in spool tmp/: "
                                                  f"{mta.spool_contents()}; {mta.describe()}")
            # The whole MTA crashes: the workers too, at once. Killing the
            # main process alone leaves the worker that holds the partial
            # message a moment between its parent's pipe closing (it then
            # stops cleanly, removing the partial file) and the kernel's
            # SIGKILL for it (PR_SET_PDEATHSIG), and this test raced it.
            workers = children(mta.pid)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not any(pid_alive(p) for p in workers), 10,
                     lambda: f"workers {workers} still alive after SIGKILL")
            mta.kill()
        finally:
            client.close()
        debris = mta.spool_contents()
        self.assertEqual(list(debris), ["tmp"], debris)

        mta.start()
        self.assertEqual(mta.spool_contents(), {}, mta.describe())

        # A control message proves the queue runner works after the restart, so
        # the absence of the partial one below is not just a slow queue.
        control = f"control-{uuid.uuid4().hex}"
        client = RawSMTP(mta.port)
        try:
            client.start_transaction(SENDER, [ALICE])
            client.send(make_message(control) + b".\r\n")
            client.expect(250)
            client.command("QUIT", 221)
        finally:
            client.close()
        wait_for(lambda: files_containing(maildir, control.encode()) and not mta.spool_contents(),
                 10, lambda: f"control message not delivered; {mta.describe()}")
        self.assertEqual(files_containing(maildir, token.encode()), [])
        self.assertEqual(len(files_containing(maildir, b"token: ")), 1)
