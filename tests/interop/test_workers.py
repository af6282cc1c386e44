"""
Receiving workers (L{twisted_mta.workers}), as twistd runs them: the main
process opens the listener, receives and delivers, the workers receive
beside it (with every worker stopped, the main process alone answers, on
the mx listener and on the implicit-TLS submissions listener); a worker
killed at any moment is started again and loses nothing (what it queued
but could not report is found in new/); killing the main process takes
the workers with it, so a restart binds the port again at once.
"""

from __future__ import annotations

import os
import signal
import smtplib
import ssl
import subprocess
import sys
import time
import urllib.request
import uuid

from twisted.trial.unittest import SynchronousTestCase

from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, MTA_HOSTNAME, MTAProcess, children, files_containing, free_port,
    make_message, make_tempdir, pid_alive, subprocess_env, wait_for, write_server_cert,
)
from tests.interop.tls_peers import ScriptedPeer
from tests.support import LOOPBACK_DNS
from twisted_mta.model import Envelope, Recipient
from twisted_mta.queue.spool import Spool

TIMEOUT = 20.0
ALICE = f"alice@{LOCAL_DOMAIN}"


def send(port: int, count: int = 1) -> list[str]:
    tokens = []
    with smtplib.SMTP(LOOPBACK, port, local_hostname="client.example.test",
                      timeout=30) as client:
        for _ in range(count):
            token = uuid.uuid4().hex
            client.sendmail("sender@client.example.test", [ALICE], make_message(token))
            tokens.append(token)
    return tokens


def one_worker(testcase, tmpdir: str, extra_config: str) -> tuple[MTAProcess, int]:
    """An MTA with one worker, started; its pid."""
    mta = MTAProcess(tmpdir, workers=1, extra_config=extra_config)
    testcase.addCleanup(mta.cleanup)
    mta.start()
    [worker] = wait_for(lambda: len(children(mta.pid)) == 1 and children(mta.pid),
                        TIMEOUT, lambda: f"one worker; {mta.describe()}")
    return mta, worker


def stop_process(testcase, pid: int) -> None:
    """SIGSTOP C{pid}, and let it run again at the end of the test."""
    os.kill(pid, signal.SIGSTOP)
    testcase.addCleanup(lambda: pid_alive(pid) and os.kill(pid, signal.SIGCONT))


class WorkerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics_port = free_port()
        self.mta = MTAProcess(make_tempdir(self, "workers"), workers=2, extra_config=(
            f'[metrics]\nendpoint = "tcp:{self.metrics_port}:interface=127.0.0.1"\n'
            + LOOPBACK_DNS))  # never the system resolver
        self.addCleanup(self.mta.cleanup)
        self.mta.start()
        self.workers = wait_for(lambda: len(children(self.mta.pid)) == 2 and
                                children(self.mta.pid), TIMEOUT,
                                lambda: f"two workers; {self.mta.describe()}")

    def delivered(self, tokens: list[str]) -> None:
        maildir = self.mta.maildir("alice")
        wait_for(lambda: all(files_containing(maildir, t.encode()) for t in tokens), TIMEOUT,
                 lambda: f"{len(tokens)} messages delivered; {self.mta.describe()}")
        for token in tokens:
            self.assertEqual(len(files_containing(maildir, token.encode())), 1, token)

    def test_workers_receive_and_the_main_process_delivers(self) -> None:
        tokens = []
        for _ in range(8):  # several connections: the kernel spreads them
            tokens += send(self.mta.port, 3)
        self.delivered(tokens)
        self.assertIn("workers: worker 1 started", self.mta.output())
        self.assertEqual(children(self.mta.pid), self.workers)  # none died
        # what the workers received is counted where the metrics are served
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/",
                                    timeout=10) as r:
            text = r.read().decode()
        self.assertIn('twisted_mta_messages_received_total{listener="mx"} 24.0', text)

    def test_a_killed_worker_is_replaced_and_nothing_is_lost(self) -> None:
        # An entry a worker committed but never reported (it died at that
        # instant): written straight into new/, unknown to the main process.
        spool = Spool(self.mta.spool)
        writer = spool.new_message()
        orphan = uuid.uuid4().hex
        envelope = Envelope(queue_id=writer.queue_id, sender="sender@client.example.test",
                            recipients=(Recipient(ALICE),), arrival=time.time(),
                            client={"protocol": "ESMTP", "listener": "mx"})
        writer.write(envelope.to_header())
        writer.write(make_message(orphan))
        self.successResultOf(writer.commit(envelope))
        os.kill(self.workers[0], signal.SIGKILL)
        replaced = wait_for(lambda: (lambda now: len(now) == 2 and self.workers[0] not in now
                                     and now)(children(self.mta.pid)),
                            TIMEOUT, lambda: f"a new worker; {self.mta.describe()}")
        self.assertIn(self.workers[1], replaced)
        self.assertIn("workers: worker 0 ended (signal SIGKILL)", self.mta.output())
        self.delivered([orphan] + send(self.mta.port, 5))

    def test_killing_the_main_process_takes_the_workers_down(self) -> None:
        before = self.mta.pid
        self.mta.kill()
        wait_for(lambda: not any(pid_alive(p) for p in self.workers), 5.0,
                 lambda: f"workers {self.workers} still alive after their parent {before} died")
        self.mta.start()  # the port is free again at once
        wait_for(lambda: len(children(self.mta.pid)) == 2, TIMEOUT, "two new workers")
        self.delivered(send(self.mta.port, 2))

    def test_sigterm_stops_everything(self) -> None:
        # twistd ends by re-raising the signal that stopped it
        self.assertIn(self.mta.stop(), (0, -signal.SIGTERM), self.mta.output())
        self.assertIn("Server Shut Down.", self.mta.output())
        wait_for(lambda: not any(pid_alive(p) for p in self.workers), 5.0,
                 lambda: f"workers {self.workers} still alive after a clean stop")


class MainProcessReceivesTests(SynchronousTestCase):
    """
    The main process accepts on the shared sockets too: with its one worker
    stopped (SIGSTOP), mail on the mx listener is still received and
    delivered, and the submissions listener still answers in TLS.
    """

    def test_the_main_process_receives_while_the_worker_is_stopped(self) -> None:
        tmp = make_tempdir(self, "main-receives")
        ca = write_server_cert(tmp)
        smtps = free_port()
        mta, worker = one_worker(self, tmp, (
            '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n\n'
            f'[[listeners]]\nrole = "submissions"\n'
            f'endpoint = "tcp:{smtps}:interface={LOOPBACK}"\n' + LOOPBACK_DNS))
        stop_process(self, worker)
        tokens = []
        for _ in range(4):  # four connections, all for the main process
            tokens += send(mta.port)
        maildir = mta.maildir("alice")
        wait_for(lambda: all(files_containing(maildir, t.encode()) for t in tokens), TIMEOUT,
                 lambda: f"delivered with the worker stopped; {mta.describe()}")
        context = ssl.create_default_context()
        ca.configure_trust(context)
        with smtplib.SMTP_SSL(LOOPBACK, smtps, local_hostname="client.example.test",
                              timeout=10, context=context) as client:
            code, banner = client.ehlo()
            self.assertEqual(code, 250, banner)
            self.assertTrue(banner.startswith(MTA_HOSTNAME.encode()), banner)
            self.assertIn(client.sock.version(), ("TLSv1.2", "TLSv1.3"))


class WorkersSendTests(SynchronousTestCase):
    """
    With workers, the worker sends too (C{[outbound] send_in_workers}, on
    by default).  The main process keeps what it has room for (its share
    of C{connections}, here one transaction) and hands the rest of a
    backlog to the process with the fewest under way.  Twelve messages
    are deferred (their smarthost is down), the smarthost comes up, the
    worker is stopped (SIGSTOP) and the queue flushed: some wait for the
    worker, the main process sends the others, and the waiting ones go as
    soon as it runs again; killed with transactions under way, their
    messages are tried again and arrive once; with C{send_in_workers =
    false} the main process sends everything while the worker is stopped.
    """

    def backlog(self, outbound: str = "", count: int = 12, queue: str = ""
                ) -> tuple[MTAProcess, int, ScriptedPeer, list[str]]:
        port = free_port()
        mta, worker = one_worker(self, make_tempdir(self, "workers-send"), (
            f"{queue}[outbound]\nconnections = 2\n{outbound}\n[outbound.smarthost]\n"
            f'host = "{LOOPBACK}"\nport = {port}\n' + LOOPBACK_DNS))
        tokens = [self.send_remote(mta) for _ in range(count)]
        wait_for(lambda: mta.output().count("delivery.deferred") >= count or
                 mta.output().count(" deferred: ") >= count, TIMEOUT,
                 lambda: f"{count} deferred; {mta.describe()}")
        peer = ScriptedPeer(LOOPBACK, port, "sink.example.test", mode="no-starttls")
        self.addCleanup(peer.server.shutdown)
        self.addCleanup(peer.server.server_close)
        stop_process(self, worker)
        self.flush(mta)
        return mta, worker, peer, tokens

    def flush(self, mta: MTAProcess) -> None:
        flushed = subprocess.run(
            [sys.executable, "-m", "twisted_mta.cli", "queue", "flush", "-c", mta.config_path],
            env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=30)
        self.assertEqual(flushed.returncode, 0, flushed.stdout + flushed.stderr)

    def send_remote(self, mta: MTAProcess) -> str:
        token = uuid.uuid4().hex
        with smtplib.SMTP(LOOPBACK, mta.port, local_hostname="client.example.test",
                          timeout=30) as client:
            client.sendmail(ALICE, ["rcpt@remote.test"], make_message(token))
        return token

    def arrived(self, peer: ScriptedPeer, token: str) -> int:
        with peer.lock:
            return sum(token.encode() in m.data for m in peer.messages)

    def test_the_worker_sends(self) -> None:
        self.held_by_the_stopped_worker()

    def held_by_the_stopped_worker(self, queue: str = "") -> tuple[MTAProcess, list, list]:
        """
        Some of the backlog waits for the stopped worker while the main
        process sends the others; each arrives once when it runs again.
        """
        mta, worker, peer, tokens = self.backlog(queue=queue)
        time.sleep(3.0)
        waiting = [t for t in tokens if not self.arrived(peer, t)]
        self.assertTrue(waiting, "nothing handed to the stopped worker")
        self.assertLess(len(waiting), len(tokens), "the main process sent nothing")
        os.kill(worker, signal.SIGCONT)
        wait_for(lambda: all(self.arrived(peer, t) for t in tokens), TIMEOUT,
                 lambda: mta.describe())
        self.assertEqual([self.arrived(peer, t) for t in tokens], [1] * len(tokens))
        return mta, tokens, waiting

    def test_a_worker_killed_while_sending_loses_nothing(self, queue: str = "") -> None:
        mta, worker, peer, tokens = self.backlog(queue=queue)
        time.sleep(1.0)  # some handed to the stopped worker
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: "their messages will be tried again" in mta.output(), TIMEOUT,
                 lambda: f"the lost transaction logged; {mta.describe()}")
        wait_for(lambda: len(children(mta.pid)) == 1, TIMEOUT, "the worker started again")
        self.flush(mta)
        wait_for(lambda: all(self.arrived(peer, t) for t in tokens), TIMEOUT,
                 lambda: mta.describe())
        self.assertEqual([self.arrived(peer, t) for t in tokens], [1] * len(tokens))

    def test_idle_entries_are_attempted_in_the_worker(self) -> None:
        """
        Entries not due for a while are idle (on disk only); flushed, the
        worker runs whole attempts of some (C{[outbound]
        attempts_in_workers}, on by default): it reads the entry, sends,
        and removes it.  The ones it holds while stopped go when it runs
        again, each message once.
        """
        mta, tokens, waiting = self.held_by_the_stopped_worker(
            queue='[queue]\nretry_schedule = ["30m"]\n')
        wait_for(lambda: mta.output().count("removed from queue (1 delivered") == len(tokens),
                 TIMEOUT, lambda: mta.describe())
        by_worker = mta.output().count("removed from queue (1 delivered, 0 failed) by worker 0")
        self.assertGreaterEqual(by_worker, len(waiting), mta.describe())

    def test_a_worker_killed_during_whole_attempts_loses_nothing(self) -> None:
        """The same with idle entries, whose whole attempts the worker held."""
        self.test_a_worker_killed_while_sending_loses_nothing(
            queue='[queue]\nretry_schedule = ["30m"]\n')

    def test_off_the_main_process_sends(self) -> None:
        mta, worker, peer, tokens = self.backlog("send_in_workers = false\n")
        wait_for(lambda: all(self.arrived(peer, t) for t in tokens), TIMEOUT,
                 lambda: mta.describe())
        self.assertEqual([self.arrived(peer, t) for t in tokens], [1] * len(tokens))
