"""
Deliver a queued message into local Maildirs (maildir(5)).

Each copy is written to the Maildir's tmp/, fsync'd, hard-linked into new/
(the moment of delivery) and the new/ directory fsync'd (one fsync shared
by the deliveries into that Maildir that run at the same time).  The file name is
derived from the queue entry and the recipient's position, so delivering
the same recipient twice (after a crash between delivery and the envelope
update) finds the name taken and counts as already delivered: delivery is
idempotent and the envelope update need not be synchronous.

The first delivery into a Maildir in a process also removes what crashed
writers left in its tmp/: files not touched for 36 hours, as maildir(5)
says (L{clean_tmp}).

Blocking: run through the queue's thread pool.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from typing import Iterable, Iterator

import attrs

from twisted_mta import failures
from twisted_mta.model import Envelope, Outcome
from twisted_mta.queue.spool import fsync_dir, read_head, write_all

DELIVERED = Outcome(250, "2.0.0", "Delivered to Maildir")


@attrs.frozen
class LocalTarget:
    index: int  # the recipient's position in the envelope
    address: str
    maildir: str


def maildir_name(envelope: Envelope, index: int, hostname: str) -> str:
    """
    A unique, stable Maildir file name for one recipient of one entry.
    """
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    secs = int(envelope.arrival)
    usec = int((envelope.arrival - secs) * 1e6)
    return f"{secs}.M{usec}Q{envelope.queue_id}R{index}.{host}"


def ensure_maildir(path: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(path, sub), 0o700, exist_ok=True)


_known: set[str] = set()  # Maildirs this process has made sure of


def ensure_maildir_once(path: str) -> None:
    """
    L{ensure_maildir} the first time in this process (three failing
    mkdirs per delivery otherwise).  A Maildir removed later is made
    again by L{deliver}, which retries once when its tmp/ is gone.
    """
    if path not in _known:
        ensure_maildir(path)
        _known.add(path)


class DirectorySync:
    """
    Coalesce the fsyncs of one directory across the I/O threads: a caller
    that renamed or linked a file into it waits for one fsync that started
    after its own change, and callers that arrive while one runs share the
    next.  Twenty deliveries into one busy Maildir cost one or two
    directory fsyncs instead of twenty.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ticket = 0  # changes announced
        self._done = 0  # changes covered by a finished fsync
        self._running = False

    def sync(self, path: str) -> None:
        with self._cond:
            self._ticket += 1
            mine = self._ticket
            while self._done < mine and self._running:
                self._cond.wait()
            if self._done >= mine:
                return
            self._running = True
            covers = self._ticket  # every change announced so far happened before this fsync
        ok = False
        try:
            fsync_dir(path)
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._done = max(self._done, covers)
                self._cond.notify_all()


_syncs: dict[str, DirectorySync] = {}
_syncs_lock = threading.Lock()


def sync_dir(path: str) -> None:
    """
    fsync the directory C{path}, shared with concurrent callers
    (L{DirectorySync}).
    """
    with _syncs_lock:
        syncer = _syncs.get(path)
        if syncer is None:
            syncer = _syncs[path] = DirectorySync()
    syncer.sync(path)


TMP_MAX_AGE = 36 * 3600  # maildir(5): tmp/ files untouched this long are debris

_cleaned: set[str] = set()  # the Maildirs whose tmp/ this process has cleaned
_cleaned_lock = threading.Lock()


def clean_tmp(maildir: str, now: float | None = None) -> int:
    """
    Remove the files in C{maildir}'s tmp/ that nobody has read, written or
    renamed for L{TMP_MAX_AGE} (a writer that crashed, ours or another
    program's); return how many.  Only plain files: anything else is left
    alone.  Errors are ignored (the next process tries again).
    """
    now = time.time() if now is None else now
    tmp = os.path.join(maildir, "tmp")
    removed = 0
    try:
        with os.scandir(tmp) as it:
            entries = list(it)
    except OSError:
        return 0
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                continue
            if now - max(st.st_atime, st.st_mtime, st.st_ctime) > TMP_MAX_AGE:
                os.unlink(entry.path)
                removed += 1
        except OSError:
            continue
    return removed


def clean_tmp_once(maildir: str) -> int:
    """
    L{clean_tmp} on the first call for C{maildir} in this process; 0 after.
    """
    key = os.path.abspath(maildir)
    with _cleaned_lock:
        if key in _cleaned:
            return 0
        _cleaned.add(key)
    return clean_tmp(key)


def _already_in_cur(maildir: str, name: str) -> bool:
    try:
        with os.scandir(os.path.join(maildir, "cur")) as it:
            return any(e.name == name or e.name.startswith(name + ":") for e in it)
    except FileNotFoundError:
        return False


classify_os_error = failures.os_error  # one classifier (twisted_mta.failures)


CHUNK = 1024 * 1024


class _FileSource:
    """The message in a queue file from C{offset}, read in chunks each time it is iterated."""

    def __init__(self, path: str, offset: int) -> None:
        self.path, self.offset = path, offset

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as src:
            src.seek(self.offset)
            while chunk := src.read(CHUNK):
                yield chunk


def _copy(source: Iterable[bytes], head: bytes, tmp_path: str) -> None:
    """
    Write C{head} and the message's chunks from C{source}, with LF line
    ends, to a new file (memory stays flat for large messages); fsync it.
    """
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        pending = head
        carry = b""
        for chunk in source:
            chunk = carry + chunk
            # A CR at the end may be the first half of a CRLF.
            carry = b"\r" if chunk.endswith(b"\r") else b""
            if carry:
                chunk = chunk[:-1]
            pending += chunk.replace(b"\r\n", b"\n")
            write_all(fd, pending)
            pending = b""
        write_all(fd, pending + carry)
        os.fsync(fd)
    finally:
        os.close(fd)


def deliver(message: str | bytes, envelope: Envelope, targets: Iterable[LocalTarget],
            hostname: str, recovering: bool = False,
            offset: int | None = None) -> dict[str, Outcome]:
    """
    Deliver to every target; return an outcome per address.

    @param message: the queue file's path, or (delivery on receipt of a
        message held in memory) the message, with C{offset} 0.
    @param recovering: the entry was loaded at start-up, so a copy may
        already have been delivered and read (moved to cur/) by the user.
    @param offset: where the message starts, for a message just received
        (delivery on receipt); else read from the queue file and checked.
    """
    if offset is None:
        # The queue file's length must be the one recorded (a damaged file is
        # not delivered cut short; recovery moves it aside at the next start).
        offset = read_head(message, expect=envelope)[1]
    source: Iterable[bytes] = ((message[offset:],) if isinstance(message, bytes)
                               else _FileSource(message, offset))
    sender = envelope.sender
    results: dict[str, Outcome] = {}
    for target in targets:
        name = maildir_name(envelope, target.index, hostname)
        try:
            ensure_maildir_once(target.maildir)
            clean_tmp_once(target.maildir)
            new_path = os.path.join(target.maildir, "new", name)
            if recovering and (os.path.exists(new_path) or _already_in_cur(target.maildir, name)):
                results[target.address] = DELIVERED
                continue
            head = f"Return-Path: <{sender}>\nDelivered-To: {target.address}\n".encode("utf-8")
            tmp_path = os.path.join(target.maildir, "tmp", name)
            try:
                _copy(source, head, tmp_path)
            except FileExistsError:  # a copy a crash left behind
                os.unlink(tmp_path)
                _copy(source, head, tmp_path)
            except FileNotFoundError:  # the Maildir was removed since we made it
                _known.discard(target.maildir)
                ensure_maildir_once(target.maildir)
                _copy(source, head, tmp_path)
            try:
                os.link(tmp_path, new_path)
            except FileExistsError:
                pass  # delivered before a crash: idempotent
            os.unlink(tmp_path)
            sync_dir(os.path.join(target.maildir, "new"))
            results[target.address] = DELIVERED
        except OSError as e:
            results[target.address] = classify_os_error(e)
    return results
