"""
Operator requests to the queue: flush, hold, release, delete.

The running MTA owns the spool, so the command line does not move its files
behind its back: it drops a request file into C{spool/control/}, which the
queue manager picks up within a second (L{QueueManager}) and carries out
between attempts.  When no MTA owns the spool, the command line takes the
lock and acts on the files itself (L{apply_offline}).
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable

from twisted.logger import Logger

from twisted_mta.model import is_queue_id
from twisted_mta.queue.spool import QueueIdError, Spool, check_queue_id as _check_id

log = Logger()

ACTIONS = ("flush", "hold", "release", "delete", "tlsforget", "stsreload", "tlsrptsend")
DOMAIN_ACTIONS = ("tlsforget", "stsreload", "tlsrptsend")  # name a domain, not a queue id
ALL = "ALL"
# One-shot TLS overrides for the next attempt of one message, written as
# "release:relaxed" or "flush:cleartext" (audited in the log and the trace).
OVERRIDES = ("relaxed", "cleartext")


def split_action(action: str) -> tuple[str, str | None]:
    base, _, override = action.partition(":")
    return base, override or None


class ControlError(Exception):
    """
    A request cannot be made; C{str()} says why.
    """


# What "tls history --forget" names: a domain or host name, kept to one
# plain file name component (no "/", no leading dot, no spaces or controls).
_DOMAIN = re.compile(r"[^/.\s\x00-\x1f\x7f][^/\s\x00-\x1f\x7f]{0,252}")


def check_queue_id(queue_id: str) -> str:
    """
    C{queue_id} if it is a queue id (the syntax the spool makes, always a
    plain name inside the spool), else raise L{ControlError} saying so in
    one line: for every id the command line or a request names.
    """
    try:
        return _check_id(queue_id)
    except QueueIdError as e:
        raise ControlError(str(e))


def valid_target(action: str, target: str) -> bool:
    """
    Whether C{target} can be what a request of C{action} names: C{ALL}, a
    queue id, or for C{tlsforget}, C{stsreload} and C{tlsrptsend} a domain
    name.
    """
    if target == ALL:
        return True
    if split_action(action)[0] in DOMAIN_ACTIONS:
        return _DOMAIN.fullmatch(target) is not None
    return is_queue_id(target)


def control_dir(spool: Spool) -> str:
    return os.path.join(spool.path, "control")


def request(spool: Spool, action: str, queue_id: str = ALL) -> str:
    """
    Leave a request for the running MTA; return the request file's path.
    """
    base, override = split_action(action)
    if base not in ACTIONS or (override is not None and (
            override not in OVERRIDES or base not in ("flush", "release"))):
        raise ControlError(f"unknown action {action!r}")
    if not valid_target(base, queue_id):
        if base not in DOMAIN_ACTIONS:
            check_queue_id(queue_id)
        raise ControlError(f"{queue_id[:80]!r} is not a domain name")
    directory = control_dir(spool)
    os.makedirs(directory, 0o700, exist_ok=True)
    name = f"{time.time():.6f}-{os.getpid()}-{action}-{queue_id}"
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w"):
        pass
    os.rename(path + ".tmp", path)
    return path


def read_requests(spool: Spool) -> list[tuple[str, str, str]]:
    """
    Pending requests, oldest first, as (file name, action, queue id).
    Blocking; malformed names, and those naming no valid target
    (L{valid_target}), are removed.
    """
    directory = control_dir(spool)
    try:
        names = sorted(n for n in os.listdir(directory) if not n.endswith(".tmp"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        parts = name.split("-", 3)
        base, override = split_action(parts[2]) if len(parts) == 4 else ("", None)
        if len(parts) != 4 or base not in ACTIONS or (override and override not in OVERRIDES) \
                or not valid_target(base, parts[3]):
            try:
                os.unlink(os.path.join(directory, name))
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
            continue
        out.append((name, parts[2], parts[3]))
    return out


def done(spool: Spool, name: str) -> None:
    try:
        os.unlink(os.path.join(control_dir(spool), name))
    except FileNotFoundError:
        pass


def apply_offline(spool: Spool, action: str, queue_id: str) -> str:
    """
    Carry out a request on a spool that no MTA owns (the caller holds the
    lock); return what happened, in words.
    """
    check_queue_id(queue_id)
    state = spool.state_of(queue_id)
    if state is None:
        raise ControlError(f"no queue entry {queue_id}")
    if action == "hold":
        if state == "hold":
            return f"{queue_id} is already held"
        spool.move(queue_id, state, "hold")
        return f"{queue_id} held"
    if action == "release":
        if state != "hold":
            return f"{queue_id} is not held"
        spool.move(queue_id, "hold", "cur")
        return f"{queue_id} released; it will be attempted when the MTA starts"
    if action == "delete":
        spool.remove(queue_id)
        return f"{queue_id} deleted"
    return f"{queue_id} will be attempted when the MTA starts"


def watch(reactor, directory: str, on_request: Callable[[], None]) -> Callable[[], object] | None:
    """
    Call C{on_request} as soon as a request is renamed into C{directory}
    (Linux inotify), so that C{queue flush} and the other commands are
    carried out at once, as Postfix's C{postqueue -f} is, instead of at the
    manager's next look (up to a second later).  Returns the function that
    stops watching, or None where inotify cannot be used: the once-a-second
    look still finds every request.
    """
    notifier = None
    try:
        from twisted.internet import inotify
        from twisted.python.filepath import FilePath
        notifier = inotify.INotify(reactor)
        notifier.startReading()
        notifier.watch(FilePath(directory), mask=inotify.IN_MOVED_TO,
                       callbacks=[lambda _ignored, _path, _mask: on_request()])
    except Exception as e:
        if notifier is not None:
            notifier.loseConnection()  # its descriptor, not left open and polled
        log.info("operator requests in {directory} are not watched ({error}): they are "
                 "found by the look every second", directory=directory, error=e,
                 event="queue.control_unwatched")
        return None
    return notifier.loseConnection
