"""
An injected failing file system for the queue path: L{FaultyFS} stands in
for the C{os} module (and the C{open} builtin) of the modules that write the
spool and the Maildirs, counts every call that writes, and makes a chosen
one fail with C{ENOSPC} or C{EIO}.

Write points are numbered in the order they happen, so a test can run a
scenario once to list them (L{FaultyFS.points}) and then once per point with
the fault there.  Two kinds of fault:

  - C{until}: a full disk.  Every write from the chosen one on fails until
    the (fake) clock has moved C{duration} seconds past the first failure;
    removing things (C{unlink}, C{removexattr}) still works, as on a real
    full disk.
  - C{once}: one failing write (an I/O error), the calls around it succeed.

Only calls from the patched modules are affected (never trial's own files),
and only those under C{root}.
"""

from __future__ import annotations

import errno
import fnmatch
import os

WRITES_WITH_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
FREEING = ("unlink", "removexattr")  # never ENOSPC


class _File:
    """
    A file opened for writing through L{FaultyFS.open}: writes are points.
    """

    def __init__(self, fs: "FaultyFS", f, label: str) -> None:
        self._fs = fs
        self._f = f
        self._label = label

    def write(self, data):
        self._fs.point("write", self._label)
        return self._f.write(data)

    def close(self):
        self._fs.point("close", self._label)  # the buffered data reaches the kernel here
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is not None:
            self._f.close()
            return False
        self.close()
        return False

    def __getattr__(self, name):
        return getattr(self._f, name)


class FaultyFS:
    """
    The fault injector: L{os} is what the patched modules see as C{os},
    L{open} what they see as the C{open} builtin.
    """

    def __init__(self, root: str, clock) -> None:
        self._root = os.path.abspath(root)
        self._clock = clock
        self._fds: dict[int, str] = {}
        self.points: list[str] = []  # every write point, in order, as a label
        self.tag = ""  # what the test is doing now: each point's is kept in tags
        self.tags: list[str] = []
        self.failed: list[str] = []  # the points that were made to fail
        self.fail_at: int | None = None
        self.errno = errno.ENOSPC
        self.mode = "until"
        self.duration = 100.0
        self.started: float | None = None
        self.refused: tuple[str, ...] = ()  # label patterns that fail, see refuse()
        self.sync = True  # False: an fsync under the root is counted, not done (speed)
        self.os = _OS(self)

    # -- set-up ---------------------------------------------------------------

    def install(self, testcase, *modules) -> None:
        """
        Become C{os} and C{open} of each module, for the length of the test.
        """
        for module in modules:
            testcase.patch(module, "os", self.os)
            had, old = "open" in vars(module), vars(module).get("open")
            module.open = self.open
            testcase.addCleanup(
                (lambda m=module, o=old: setattr(m, "open", o)) if had else
                (lambda m=module: delattr(m, "open")))

    def reset(self, root: str | None = None) -> None:
        """
        Forget every point and fault (and move to another root).
        """
        if root is not None:
            self._root = os.path.abspath(root)
        self._fds.clear()
        self.points, self.tags, self.failed = [], [], []
        self.fail_at, self.started, self.refused = None, None, ()

    def arm(self, index: int, err: int, mode: str, duration: float = 100.0) -> None:
        """
        Make write point C{index} fail with C{err}: C{mode} C{"once"}, or
        C{"until"} C{duration} seconds have passed since.
        """
        self.fail_at, self.errno, self.mode, self.duration = index, err, mode, duration

    def refuse(self, *patterns: str, err: int = errno.ENOSPC) -> None:
        """
        Make every write whose label matches one of C{patterns} (shell
        style, e.g. C{"create spool/tmp/*"}) fail with C{err} until
        L{refuse} is called again without patterns.
        """
        self.refused, self.errno = patterns, err

    @property
    def active(self) -> bool:
        """
        Whether a lasting fault is on now (started and not yet over).
        """
        if self.started is None or self.mode == "once":
            return False
        return self._clock.seconds() < self.started + self.duration

    # -- the points -----------------------------------------------------------

    def name(self, path) -> str | None:
        """
        C{path} (or a file descriptor's path) relative to the root, or
        C{None} outside it.
        """
        if isinstance(path, int):
            return self._fds.get(path)
        path = os.path.abspath(os.fsdecode(path))
        if path != self._root and not path.startswith(self._root + os.sep):
            return None
        return os.path.relpath(path, self._root)

    def point(self, op: str, name: str | None) -> None:
        """
        A write is about to happen: count it, and raise if it is to fail.
        """
        if name is None:
            return
        index = len(self.points)
        label = f"{op} {name}"
        self.points.append(label)
        self.tags.append(self.tag)
        if any(fnmatch.fnmatchcase(label, p) for p in self.refused):
            self.failed.append(label)
            raise OSError(self.errno, os.strerror(self.errno), name)
        if self.fail_at is None or index < self.fail_at:
            return
        if self.mode == "once":
            fail = index == self.fail_at
        else:
            if self.started is None:
                self.started = self._clock.seconds()
            fail = self.active and not (self.errno == errno.ENOSPC and op in FREEING)
        if fail:
            self.failed.append(label)
            raise OSError(self.errno, os.strerror(self.errno), name)

    def open(self, path, mode="r", *args, **kw):
        """
        The C{open} builtin: opening for writing, each write and the close
        are points.
        """
        if isinstance(path, int) or not any(c in mode for c in "wax+"):
            return open(path, mode, *args, **kw)
        name = self.name(path)
        self.point("open", name)
        f = open(path, mode, *args, **kw)
        return f if name is None else _File(self, f, name)


class _OS:
    """
    The C{os} module with every call that writes made a point of L{FaultyFS}.
    """

    def __init__(self, fs: FaultyFS) -> None:
        self._fs = fs

    def open(self, path, flags, *args, **kw):
        name = self._fs.name(path)
        if flags & WRITES_WITH_FLAGS:
            self._fs.point("create", name)
        fd = os.open(path, flags, *args, **kw)
        if name is not None:
            self._fs._fds[fd] = name
        return fd

    def close(self, fd):
        self._fs._fds.pop(fd, None)
        return os.close(fd)

    def write(self, fd, data):
        self._fs.point("write", self._fs.name(fd))
        return os.write(fd, data)

    def fsync(self, fd):
        name = self._fs.name(fd)
        self._fs.point("fsync", name)
        if name is None or self._fs.sync:
            os.fsync(fd)

    def rename(self, src, dst, *args, **kw):
        self._fs.point("rename", self._fs.name(dst))
        return os.rename(src, dst, *args, **kw)

    def link(self, src, dst, *args, **kw):
        self._fs.point("link", self._fs.name(dst))
        return os.link(src, dst, *args, **kw)

    def unlink(self, path, *args, **kw):
        if os.path.lexists(path):
            self._fs.point("unlink", self._fs.name(path))
        return os.unlink(path, *args, **kw)

    def setxattr(self, path, *args, **kw):
        self._fs.point("setxattr", self._fs.name(path))
        return os.setxattr(path, *args, **kw)

    def removexattr(self, path, *args, **kw):
        self._fs.point("removexattr", self._fs.name(path))
        return os.removexattr(path, *args, **kw)

    def makedirs(self, path, *args, **kw):
        if not os.path.isdir(path):
            self._fs.point("mkdir", self._fs.name(path))
        return os.makedirs(path, *args, **kw)

    def __getattr__(self, name: str):
        return getattr(os, name)
