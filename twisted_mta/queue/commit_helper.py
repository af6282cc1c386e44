"""
The commit helper's program and its file work, with the standard library
only: it runs as a process of its own (C{python -m
twisted_mta.queue.commit_helper SPOOL}, started by
L{twisted_mta.queue.committer.Committer}) and stays small (about 14 MB
resident against 30 with Twisted imported).

Standard input: C{QUEUE-ID LENGTH\n} and the queue file's content (the
envelope header first), message after message.  For everything that has
arrived (L{run_batch}): each file written to C{tmp/}, each fsync'd, each
renamed into C{new/}, C{new/} fsync'd once; then standard output answers
each, in order: C{QUEUE-ID ok}, or C{QUEUE-ID err ERRNO RENAMED} (1 when
the file reached C{new/} and only C{new/}'s fsync failed).  It ends when
its standard input closes, and dies with its parent.
"""

from __future__ import annotations

import errno
import os
import sys


class CommitError(OSError):
    """
    A commit that failed; C{renamed} says whether the file had reached
    C{new/} (then only C{new/}'s fsync failed, and the caller must take
    the entry out again).
    """

    def __init__(self, code: int, renamed: bool) -> None:
        super().__init__(code, os.strerror(code) if code else "the commit failed")
        self.renamed = renamed


def _paths(spool: str, queue_id: str) -> tuple[str, str]:
    return os.path.join(spool, "tmp", queue_id), os.path.join(spool, "new", queue_id)


def write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _create(path: str) -> int:
    """A new file for writing, readable by us only; it must not exist."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def write_file_durably(path: str, data: bytes) -> None:
    """
    Create C{path} (which must not exist), write C{data} and fsync it.
    """
    fd = _create(path)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_in_thread(spool: str, queue_id: str, data: bytes) -> None:
    """
    The helper's work for one message, blocking (the I/O threads run it
    when the helper cannot): an entry the helper renamed already is only
    made durable in its directory; a partial file in C{tmp/} is written
    again.
    """
    tmp, new = _paths(spool, queue_id)
    if not os.path.exists(new):
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        write_file_durably(tmp, data)
        os.rename(tmp, new)
    try:
        fsync_dir(os.path.dirname(new))
    except OSError as e:
        raise CommitError(e.errno or errno.EIO, True)


def run_batch(spool: str, batch: list[tuple[str, bytes | memoryview]]) -> list[bytes]:
    """
    Commit C{batch}, (queue id, file content) in order, and give each its
    answer line: all files written first, then each fsync'd (on ext4 the
    first fsync's journal commit takes the others' data with it), renamed,
    and C{new/} fsync'd once for all.
    """
    fds: list[int | None] = []
    codes: list[int] = []  # errno per message, 0 while it goes well
    for queue_id, data in batch:
        fd = None
        try:
            fd = _create(_paths(spool, queue_id)[0])
            write_all(fd, data)
            codes.append(0)
        except OSError as e:
            if fd is not None:
                os.close(fd)
                fd = None
            codes.append(e.errno or errno.EIO)
        fds.append(fd)
    for i, fd in enumerate(fds):
        if fd is not None:
            try:
                os.fsync(fd)
            except OSError as e:
                codes[i] = e.errno or errno.EIO
            finally:
                os.close(fd)
    renamed = [False] * len(batch)
    for i, (queue_id, _) in enumerate(batch):
        if not codes[i]:
            try:
                os.rename(*_paths(spool, queue_id))
                renamed[i] = True
            except OSError as e:
                codes[i] = e.errno or errno.EIO
    if any(renamed):
        try:
            fsync_dir(os.path.join(spool, "new"))
        except OSError as e:
            codes = [(e.errno or errno.EIO) if r else c for c, r in zip(codes, renamed)]
    return [b"%s ok\n" % q.encode() if not c else b"%s err %d %d\n" % (q.encode(), c, r)
            for (q, _), c, r in zip(batch, codes, renamed)]


def parse_requests(buffer: bytes) -> tuple[list[tuple[str, memoryview]], bytes]:
    """
    The complete requests at the start of C{buffer} (C{QUEUE-ID LENGTH\\n}
    and as many octets; each content a view into C{buffer}, not a copy),
    and what is left of it.
    """
    batch = []
    view = memoryview(buffer)
    start = 0
    while True:
        end = buffer.find(b"\n", start)
        if end < 0:
            break
        queue_id, _, length = buffer[start:end].partition(b" ")
        size = int(length)
        if len(buffer) < end + 1 + size:
            break
        batch.append((queue_id.decode("ascii"), view[end + 1:end + 1 + size]))
        start = end + 1 + size
    return batch, buffer[start:] if start else buffer


def main(argv: list[str] | None = None) -> int:
    """The helper: commit what comes on standard input until it closes."""
    from twisted_mta.lifetime import die_with_parent
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m twisted_mta.queue.commit_helper SPOOL", file=sys.stderr)
        return 2
    die_with_parent()
    spool = args[0]
    buffer = b""
    while True:
        chunk = os.read(0, 1 << 20)
        if not chunk:
            return 0
        buffer += chunk
        batch, buffer = parse_requests(buffer)
        if batch:
            write_all(1, b"".join(run_batch(spool, batch)))


if __name__ == "__main__":
    sys.exit(main())
