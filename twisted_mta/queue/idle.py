"""
Idle entries: those not due for a while (the manager's C{IDLE_AFTER}) and
those held.  They are on disk; all the manager keeps of each is one line of
bytes (queue id, spool state, whether its next attempt recovers, due time)
in a buffer per minute of due time, so that a queue of 100,000 deferred
entries costs a few MB and no Python object per entry, and the memory goes
back to the system as the buffers empty.

A minute's buffer is handed over when that minute comes near (L{take}), a
few hundred lines at a time, and its entries are then scheduled one by one
as before.  A flush hands every buffer over as due now, still a few hundred
at a time, so a drain never holds the whole queue in objects.  Looking an
entry up by its queue id scans the buffers: for the operator's requests and
a dead worker's orphans, never for each message.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Iterator, NamedTuple

WIDTH = 60.0  # seconds of due time per buffer
RIPEN = 60.0  # a buffer is handed over this long before its first second

_STATE_CODES = {"new": b"n", "cur": b"c", "hold": b"h"}
_STATES = {code[0]: state for state, code in _STATE_CODES.items()}


class IdleEntry(NamedTuple):
    queue_id: str
    state: str
    due: float  # inf for a held entry
    recovering: bool  # its next attempt looks for copies made before a crash


def _line(queue_id: str, state: str, due: float, recovering: bool) -> bytes:
    flag = b"r" if recovering else b"-"
    return b"%s %s%s %r\n" % (queue_id.encode("ascii"), _STATE_CODES[state], flag, due)


def _parse(line: bytes, due_now: float | None = None) -> IdleEntry:
    queue_id, codes, due = line.split(b" ")
    when = float(due)
    if due_now is not None:
        when = min(when, due_now)
    return IdleEntry(queue_id.decode("ascii"), _STATES[codes[0]], when, codes[1:2] == b"r")


class IdleEntries:
    """
    The idle entries of one queue manager.  Every buffer starts with a
    newline and every line ends with one, so C{b"\\n" + queue_id + b" "}
    finds exactly one entry's line.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, bytearray] = {}  # minute of due time -> lines
        self._minutes: list[int] = []  # a heap of the minutes (some maybe emptied)
        self._held = bytearray(b"\n")
        self._flushed: deque[tuple[bytearray, float]] = deque()  # (lines, due at), oldest first
        self.counts: dict[str, int] = {state: 0 for state in _STATE_CODES}

    def __len__(self) -> int:
        return sum(self.counts.values())

    def add(self, queue_id: str, state: str, due: float, recovering: bool = False) -> None:
        line = _line(queue_id, state, math.inf if state == "hold" else due, recovering)
        if state == "hold":
            self._held += line
        else:
            minute = int(due // WIDTH)
            lines = self._buckets.get(minute)
            if lines is None:
                lines = self._buckets[minute] = bytearray(b"\n")
                heapq.heappush(self._minutes, minute)
            lines += line
        self.counts[state] += 1

    def _buffers(self) -> Iterator[tuple[bytearray, float | None]]:
        yield self._held, None
        for lines, due_now in self._flushed:
            yield lines, due_now
        for lines in self._buckets.values():
            yield lines, None

    def find(self, queue_id: str) -> IdleEntry | None:
        """The idle entry C{queue_id}, or None (a scan of every buffer)."""
        found = self._locate(queue_id)
        if found is None:
            return None
        lines, start, end, due_now = found
        return _parse(bytes(lines[start:end]), due_now)

    def remove(self, queue_id: str) -> IdleEntry | None:
        """Take C{queue_id} out (it is scheduled, or gone): the entry, or None."""
        found = self._locate(queue_id)
        if found is None:
            return None
        lines, start, end, due_now = found
        entry = _parse(bytes(lines[start:end]), due_now)
        del lines[start:end + 1]
        self.counts[entry.state] -= 1
        self._drop_empty()
        return entry

    def _locate(self, queue_id: str):
        needle = b"\n%s " % queue_id.encode("ascii", "replace")
        for lines, due_now in self._buffers():
            at = lines.find(needle)
            if at >= 0:
                return lines, at + 1, lines.index(b"\n", at + 1), due_now
        return None

    def _drop_empty(self) -> None:
        self._flushed = deque((lines, when) for lines, when in self._flushed if len(lines) > 1)
        for minute in [m for m, lines in self._buckets.items() if len(lines) == 1]:
            del self._buckets[minute]

    def ripe_at(self) -> float | None:
        """When L{take} next has entries to give (the past: now), or None."""
        if self._flushed:
            return -math.inf
        minutes = self._minutes
        while minutes and minutes[0] not in self._buckets:
            heapq.heappop(minutes)
        return minutes[0] * WIDTH - RIPEN if minutes else None

    def flush(self, now: float) -> None:
        """Every entry not held is due at C{now}."""
        for minute in sorted(self._buckets):
            self._flushed.append((self._buckets[minute], now))
        self._buckets = {}
        self._minutes = []

    def take(self, now: float, limit: int) -> list[IdleEntry]:
        """
        Up to C{limit} entries out, from the oldest flush, else from the
        first minute once it is near (L{RIPEN}): the caller schedules them.
        """
        minute = None
        if self._flushed:
            lines, due_now = self._flushed[0]
        else:
            ripe = self.ripe_at()
            if ripe is None or ripe > now:
                return []
            minute = self._minutes[0]
            lines, due_now = self._buckets[minute], None
        end = 0
        for _ in range(limit):
            at = lines.find(b"\n", end + 1)
            if at < 0:
                break
            end = at
        taken = [_parse(line, due_now) for line in bytes(lines[1:end]).split(b"\n")]
        del lines[:end]  # the newline at end starts the buffer now: no copy
        for entry in taken:
            self.counts[entry.state] -= 1
        if len(lines) == 1:  # emptied: dropped (its minute stays in the heap, stale)
            if minute is None:
                self._flushed.popleft()
            else:
                del self._buckets[minute]
        return taken

    def __iter__(self) -> Iterator[IdleEntry]:
        """Every idle entry (for tests and small queues: it makes them all)."""
        for lines, due_now in list(self._buffers()):
            for line in bytes(lines[1:-1]).split(b"\n"):
                if line:
                    yield _parse(line, due_now)
