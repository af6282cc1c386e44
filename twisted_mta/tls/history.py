"""
Per-destination TLS history, on disk (C{<spool>/tls/history.json}), with
expiry: the best TLS each recipient domain has shown (for the opt-in
ratchet: no silent downgrade of a domain that did verified TLS before) and
its recent handshake failures (so a domain with broken TLS, whose policy
sends in cleartext anyway, stops costing a failed handshake per attempt).

The fallback decider sees the entry (C{Situation.history}).  Written
through the I/O pool, at most once a second, atomically (write + rename);
losing the last second of history in a crash costs nothing but a repeat.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

import attrs
from twisted.logger import Logger

log = Logger()

LEVELS = {"none": 0, "encrypted": 1, "verified": 2}
PATH = os.path.join("tls", "history.json")


def history_path(spool: str) -> str:
    return os.path.join(spool, PATH)


@attrs.frozen
class HistoryEntry:
    best: str = "none"  # the best level seen: none, encrypted, verified
    best_at: float = 0.0  # when it was last seen
    failures: int = 0  # TLS failures in a row
    last_failure: float = 0.0
    last_kind: str = ""
    broken_until: float = 0.0  # skip STARTTLS until then (opportunistic only)

    def describe(self) -> str:
        parts = []
        if self.best != "none":
            parts.append(f"{self.best} TLS last seen {_day(self.best_at)}")
        if self.failures:
            parts.append(f"{self.failures} TLS failure(s) in a row, last {self.last_kind} "
                         f"on {_day(self.last_failure)}")
        return "; ".join(parts) or "nothing recorded"


def _day(t: float) -> str:
    d = datetime.fromtimestamp(t, timezone.utc)
    return f"{d.day} {d.strftime('%B %Y')} {d.strftime('%H:%M')} UTC"


class TLSHistory:
    def __init__(self, path: str, clock, run_blocking, *, expiry: float = 30 * 86400,
                 broken_after: int = 3, broken_time: float = 86400) -> None:
        self.path = path
        self.clock = clock
        self.run_blocking = run_blocking
        self.expiry = expiry
        self.broken_after = broken_after
        self.broken_time = broken_time
        self.entries: dict[str, HistoryEntry] = {}
        self._save_pending = False
        # Told the domain (None: all) an operator's forget dropped: the
        # copies in sending workers (twisted_mta.workers.WorkerSending).
        self.forgotten: list = []

    # -- reading ------------------------------------------------------------------

    def load(self) -> None:
        """
        Read the file (blocking: call at start-up).  A damaged file is
        history lost, not an error.
        """
        self.replace(read(self.path))
        self._expire()

    def get(self, domain: str) -> HistoryEntry | None:
        entry = self.entries.get(domain.lower())
        if entry is None:
            return None
        now = self.clock.seconds()
        if entry.best != "none" and now - entry.best_at > self.expiry:
            entry = attrs.evolve(entry, best="none", best_at=0.0)
        if entry.failures and now - entry.last_failure > self.expiry:
            entry = attrs.evolve(entry, failures=0, last_kind="", broken_until=0.0)
        return entry

    def broken(self, domain: str) -> HistoryEntry | None:
        entry = self.get(domain)
        if entry is not None and entry.broken_until > self.clock.seconds():
            return entry
        return None

    # -- recording ------------------------------------------------------------------

    def record_success(self, domain: str, level: str) -> None:
        if not domain:
            return
        domain = domain.lower()
        now = self.clock.seconds()
        old = self.get(domain) or HistoryEntry()
        best, best_at = old.best, old.best_at
        if LEVELS[level] >= LEVELS[best]:
            best, best_at = level, now
        new = HistoryEntry(best=best, best_at=best_at)
        if level == "none" and old.broken_until > now:
            # A cleartext delivery while TLS is known broken keeps the memory.
            new = attrs.evolve(new, failures=old.failures, last_failure=old.last_failure,
                               last_kind=old.last_kind, broken_until=old.broken_until)
        if new != self.entries.get(domain):
            self.entries[domain] = new
            self._changed()

    def record_failure(self, domain: str, kind: str) -> None:
        if not domain:
            return
        domain = domain.lower()
        now = self.clock.seconds()
        old = self.get(domain) or HistoryEntry()
        failures = old.failures + 1
        broken = old.broken_until
        if (kind.startswith("handshake-") or kind == "starttls-refused") and \
                failures >= self.broken_after:
            broken = now + self.broken_time
        self.entries[domain] = attrs.evolve(old, failures=failures, last_failure=now,
                                            last_kind=kind, broken_until=broken)
        self._changed()

    def forget(self, domain: str | None) -> bool:
        if domain is None:
            found = bool(self.entries)
            self.entries.clear()
        else:
            found = self.entries.pop(domain.lower(), None) is not None
        self._changed()
        for tell in self.forgotten:
            tell(domain)
        return found

    # -- sharing with worker processes (twisted_mta.workers) -------------------------

    def put(self, domain: str, entry: HistoryEntry | None) -> None:
        """
        Take C{entry} as C{domain}'s, as a worker process that sent to it
        recorded it (None: forgotten); saved as any change is.
        """
        domain = domain.lower()
        if entry is None:
            self.entries.pop(domain, None)
        else:
            self.entries[domain] = entry
        self._changed()

    def to_json(self) -> dict[str, Any]:
        return {d: attrs.asdict(e) for d, e in sorted(self.entries.items())}

    def replace(self, data: dict[str, Any]) -> None:
        """Every entry from L{to_json}'s form (the main process's copy)."""
        self.entries = {}
        for domain, raw in data.items():
            try:
                self.entries[domain] = HistoryEntry(**raw)
            except TypeError:
                continue

    # -- saving ---------------------------------------------------------------------

    def save_now(self) -> None:
        """
        Write at once, blocking (at shutdown: the debounced save would
        never run).
        """
        self._expire()
        write(self.path, self.to_json())

    def current(self) -> dict[str, HistoryEntry]:
        """
        Every entry as it counts now (expired parts dropped).
        """
        return {d: e for d in sorted(self.entries)
                if (e := self.get(d)) is not None and (e.best != "none" or e.failures)}

    def _expire(self) -> None:
        now = self.clock.seconds()
        for domain in [d for d, e in self.entries.items()
                       if now - max(e.best_at, e.last_failure) > self.expiry]:
            del self.entries[domain]

    def _changed(self) -> None:
        if self._save_pending:
            return
        self._save_pending = True
        self.clock.callLater(1.0, self._save)

    def _save(self) -> None:
        self._save_pending = False
        self._expire()
        d = self.run_blocking(write, self.path, self.to_json())
        d.addErrback(lambda f: log.failure("outbound: could not save the TLS history to "
                                           "{path}", f, path=self.path, event="outbound.error"))


def read(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write(path: str, data: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
