"""
The pickup: turn what the sendmail command dropped into C{<spool>/maildrop/}
into queue entries, like Postfix's pickup daemon.

The directory (L{prepare_maildrop}) is mode 3733, owned by the MTA: any
local user may create a file in it but not list it, read another's file or
remove it (sticky), and a file made there belongs to the MTA's group
(setgid), so the command makes it 0640 and the MTA reads it without root.
A drop is written to a name starting with a dot and renamed when complete,
so the pickup takes only names without one.

Each second (the main process only: it owns the spool) the service lists
the directory and takes the drops one at a time, in name order, in the I/O
pool: it opens each without following links, checks it is a regular file
with one link, reads at most what the limits allow, and decodes it
(L{twisted_mta.maildrop.decode}).  A bad drop is moved to C{corrupt/} with
one log line (C{pickup.rejected}) and never stops the pickup.  A good one
gets our Received line naming the uid that owns the file, its local
recipients are expanded like RCPT TO's, and it is committed as a queue
entry (fsync'd) before the drop is removed: a crash in between picks it up
again (the message is queued twice, never lost).  Mail from the command
is local mail: it may go to any domain.

C{check}, when given, sees every drop before it is queued and may change
or refuse it: the place for milters on non-SMTP mail (Postfix's
non_smtpd_milters).
"""

from __future__ import annotations

import email.utils
import errno
import os
import pwd
import stat
import time
from typing import Callable

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from twisted_mta.config import Config
from twisted_mta.dkim import Signer, sign_queued
from twisted_mta.local import AliasLoop, LocalDirectory, UnknownRecipient
from twisted_mta.maildrop import (
    MAGIC, MAX_META, Drop, DropError, decode, is_drop_name, maildrop_path,
)
from twisted_mta.model import Envelope, Recipient, tls_required_no, tls_required_values
from twisted_mta.queue.spool import RunBlocking, Spool

log = Logger()

MODE = 0o3733  # setgid, sticky; owner rwx, group and others may only create
DEBRIS_AGE = 86400  # a dot file this old is a writer that died


class DropRefused(Exception):
    """
    Raised by a pickup C{check} (a non-SMTP milter) to refuse a drop.
    """


@attrs.frozen
class PickedUp:
    """
    A checked drop and who dropped it (the owner of the file).
    """

    name: str
    drop: Drop
    uid: int
    user: str


Check = Callable[[PickedUp], defer.Deferred]


def prepare_maildrop(spool: str, owner: tuple[int, int] | None = None) -> str:
    """
    Create the maildrop (mode 3733) and let others through the spool
    directory (mode 0711: they may enter it, not list it); done at
    start-up, as root when twistd runs as root.  With C{owner} (twistd's
    C{--uid}/C{--gid}), the maildrop is given to that user and group (its
    login group without C{--gid}), which must read the drops.  Raises
    L{OSError}.
    """
    path = maildrop_path(spool)
    os.makedirs(path, 0o700, exist_ok=True)
    if owner is not None:
        uid, gid = owner
        if gid == -1:
            try:
                gid = pwd.getpwuid(uid).pw_gid
            except KeyError:
                pass
        os.chown(path, uid, gid)
    os.chmod(path, MODE)
    top = os.stat(spool).st_mode
    if top & 0o011 != 0o011:
        os.chmod(spool, stat.S_IMODE(top) | 0o011)
    return path


def read_drop(path: str, max_size: int, max_line: int) -> tuple[Drop, int]:
    """
    The drop at C{path} and the uid that owns it; L{DropError} for
    anything that is not a complete drop within the limits (a link, a
    FIFO, a directory, a file with other names, garbage).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DropError("it is a symbolic link")
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DropError("it is not a regular file")
        if st.st_nlink != 1:
            raise DropError(f"it has {st.st_nlink} names (a hard link)")
        bound = len(MAGIC) + MAX_META + max_size + 1
        if st.st_size > bound:
            raise DropError(f"it is {st.st_size} octets, more than a message of "
                            f"{max_size} octets needs")
        chunks, got = [], 0
        while got <= bound:
            chunk = os.read(fd, min(1 << 20, bound + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if got > bound:
            raise DropError("it grew past the size limit while it was read")
        return decode(b"".join(chunks), max_size, max_line), st.st_uid
    finally:
        os.close(fd)


def shown(name: str) -> str:
    """
    A file name anyone chose, safe for one log line.
    """
    return "".join(c if c.isprintable() else "?" for c in name[:80])


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def expand(directory: LocalDirectory, recipients: tuple[str, ...],
           notify: tuple[str, ...] | None = None) -> tuple[Recipient, ...]:
    """
    The envelope recipients of a drop: local addresses through aliases,
    as RCPT TO does; an unknown local address is kept (local delivery
    fails it and the sender gets a DSN, as Postfix's pickup does).
    """
    out: dict[str, Recipient] = {}
    for given in recipients:
        domain = given.rpartition("@")[2]
        finals: tuple[str, ...] = (given,)
        if directory.is_local_domain(domain):
            try:
                finals = directory.expand(given)
            except UnknownRecipient:
                pass
            except AliasLoop:
                log.error("alias loop expanding {rcpt}", event="inbound.alias-loop", rcpt=given)
        for final in finals:
            if final not in out:
                out[final] = Recipient(address=final, notify=notify,
                                       original=given if final != given else None)
    return tuple(out.values())


def received_header(hostname: str, uid: int, user: str, queue_id: str, now: float) -> bytes:
    return (f"Received: by {hostname} (twisted-mta pickup, from userid {uid} ({user}))\r\n"
            f"\tid {queue_id}; {email.utils.formatdate(now, localtime=True)}\r\n"
            ).encode("utf-8", "replace")


class PickupService(service.Service):
    """
    Polls the maildrop every C{interval} seconds (see the module docstring).

    @param enqueue: the queue manager's C{enqueue}, given each committed
        envelope.
    """

    name = "pickup"

    def __init__(self, config: Config, spool: Spool, clock, run_blocking: RunBlocking,
                 enqueue: Callable[[Envelope], None], check: Check | None = None,
                 interval: float = 1.0, wall: Callable[[], float] = time.time,
                 signer: Signer | None = None) -> None:
        self.config = config
        self.signer = signer  # [dkim]: signs the drops when "sendmail" is in [dkim] sign
        self.spool = spool
        self.clock = clock
        self.run_blocking = run_blocking
        self.enqueue = enqueue
        self.check = check
        self.interval = interval
        self.wall = wall
        self.path = maildrop_path(spool.path)
        self.directory = LocalDirectory(config.local)
        self._loop: task.LoopingCall | None = None
        self._running: defer.Deferred | None = None
        self._stuck: set[str] = set()  # bad drops that could not be moved away
        self._failing = False  # the maildrop could not be read at the last look
        self._queue_failing = False  # the last drop could not be queued (a full disk)

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self):
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._running is not None:
            d: defer.Deferred = defer.Deferred()
            self._running.addBoth(lambda _: d.callback(None))
            return d
        return None

    def poll(self) -> defer.Deferred | None:
        """
        One look at the maildrop; at most one runs at a time.
        """
        if self._running is not None:
            return None
        self._running = running = defer.Deferred()
        d = self.run_blocking(self._list)
        d.addCallback(self._listed)
        d.addCallback(self._take_all)
        d.addErrback(self._list_failed)

        def done(_: object) -> None:
            self._running = None
            running.callback(None)
        d.addBoth(done)
        return None

    def _listed(self, names: list[str]) -> list[str]:
        if self._failing:
            self._failing = False
            log.info("pickup: the maildrop {path} can be read again", path=self.path,
                     event="pickup.recovered")
        return names

    def _list_failed(self, failure) -> None:
        """
        The maildrop cannot be read (removed, its permissions changed):
        one line, not one a second, until it can be read again.
        """
        if self._failing:
            return
        self._failing = True
        if failure.check(OSError):
            log.error("pickup: cannot read the maildrop {path}: {error}; drops wait",
                      path=self.path, error=failure.value.strerror or str(failure.value),
                      event="pickup.error")
        else:
            log.failure("pickup: cannot read {path}", failure, path=self.path,
                        event="pickup.error")

    def _list(self) -> list[str]:
        names = []
        now = self.wall()
        if not os.path.isdir(self.path):
            prepare_maildrop(self.spool.path)  # removed by hand: made again, as at start
            log.warn("pickup: the maildrop {path} was missing; made it again", path=self.path,
                     event="pickup.error")
        with os.scandir(self.path) as it:
            for entry in it:
                if entry.name.startswith("."):
                    self._remove_debris(entry, now)
                elif entry.name not in self._stuck:
                    names.append(entry.name)
        return sorted(names)

    def _remove_debris(self, entry: os.DirEntry, now: float) -> None:
        try:
            st = entry.stat(follow_symlinks=False)
            if now - st.st_mtime > DEBRIS_AGE and not stat.S_ISDIR(st.st_mode):
                os.unlink(entry.path)
                log.info("pickup: removed {name}, a drop never finished (uid {uid})",
                         name=entry.name, uid=st.st_uid, event="pickup.debris")
        except FileNotFoundError:
            pass

    @defer.inlineCallbacks
    def _take_all(self, names: list[str]):
        for name in names:
            if not self.running:
                return
            yield self._take(name)

    @defer.inlineCallbacks
    def _take(self, name: str):
        path = os.path.join(self.path, name)
        limits = self.config.limits
        try:
            if not is_drop_name(name):
                raise DropError("its name is not letters and digits")
            drop, uid = yield self.run_blocking(read_drop, path, limits.message_size,
                                                limits.data_line_length)
        except FileNotFoundError:
            return
        except DropError as e:
            yield self._reject(name, str(e))
            return
        except OSError as e:
            yield self._reject(name, e.strerror or str(e))
            return
        picked = PickedUp(name=name, drop=drop, uid=uid, user=user_name(uid))
        if self.check is not None:
            try:
                picked = yield self.check(picked)
            except DropRefused as e:
                yield self._reject(name, f"refused: {e}")
                return
        yield self._queue(picked, path)

    @defer.inlineCallbacks
    def _queue(self, picked: PickedUp, path: str):
        drop = picked.drop
        now = self.clock.seconds()
        writer = self.spool.new_message()
        envelope = Envelope(
            queue_id=writer.queue_id, sender=drop.sender,
            recipients=expand(self.directory, drop.recipients, drop.notify), arrival=now,
            ret=drop.ret, envid=drop.envid,
            size=len(drop.message), next_attempt=now,
            client={"protocol": "sendmail", "listener": "pickup", "uid": str(picked.uid),
                    "user": picked.user},
            tls_required_no=tls_required_no(tls_required_values(drop.message)),
            smtputf8=drop.smtputf8)
        writer.write(envelope.to_header())
        writer.write(received_header(self.config.hostname, picked.uid, picked.user,
                                     writer.queue_id, now))
        writer.write(drop.message)
        try:
            envelope = yield sign_queued(self.signer, writer, envelope, "sendmail")
            committed = yield writer.commit(envelope)
        except OSError as e:
            # A full disk: the drop stays, and the next poll tries again;
            # one line until a drop is queued again.
            if not self._queue_failing:
                self._queue_failing = True
                log.error("pickup: could not queue {drop}: {error}; it waits in the maildrop",
                          drop=picked.name, error=e.strerror or str(e), event="pickup.error")
            return
        except Exception:
            log.failure("pickup: could not queue {drop}", drop=picked.name, event="pickup.error")
            return
        self._queue_failing = False
        try:
            yield self.run_blocking(os.unlink, path)
        except FileNotFoundError:
            pass
        log.info("picked up {queue_id} from uid {uid} ({user}): <{sender}> for {count} "
                 "recipient(s), {size} octets", event="pickup.accepted",
                 queue_id=committed.queue_id, uid=picked.uid, user=picked.user,
                 sender=drop.sender, count=len(committed.recipients),
                 recipients=[r.address for r in committed.recipients],
                 size=committed.size, drop=picked.name)
        try:
            self.enqueue(committed)
        except Exception:
            log.failure("queue manager did not take {queue_id}", queue_id=committed.queue_id,
                        event="queue.error")

    def _reject(self, name: str, why: str) -> defer.Deferred:
        d = self.run_blocking(self._set_aside, name)

        def moved(result: tuple[str | None, int | str]) -> None:
            dest, uid = result
            if dest is None:
                self._stuck.add(name)
            log.warn("pickup: rejected {drop} (uid {uid}): {why}; {where}",
                     event="pickup.rejected", drop=shown(name), uid=uid, why=why,
                     where=f"moved to corrupt/{dest}" if dest else "left in place (cannot move)",
                     dest=dest)
        d.addCallback(moved)
        return d

    def _set_aside(self, name: str) -> tuple[str | None, int | str]:
        """
        Move a bad drop to corrupt/ under a name of its own: that name (None
        when it cannot be moved, a directory of another user, say) and the
        uid that owned it.
        """
        src = os.path.join(self.path, name)
        try:
            uid: int | str = os.lstat(src).st_uid
        except OSError:
            uid = "?"
        corrupt = os.path.join(self.spool.path, "corrupt")
        base = "maildrop-" + "".join(c if c.isalnum() else "_" for c in name[:80])
        dest, n = base, 0
        while os.path.lexists(os.path.join(corrupt, dest)):
            n += 1
            dest = f"{base}.{n}"
        try:
            os.rename(src, os.path.join(corrupt, dest))
        except FileNotFoundError:
            return "(gone)", uid
        except OSError:
            return None, uid
        return dest, uid
