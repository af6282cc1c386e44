"""
The durable TLS-RPT aggregate: per UTC day, per policy domain, per policy,
the sessions that succeeded and failed and the failures' details, kept in
C{<spool>/tlsrpt/<YYYY-MM-DD>.json}.

What it offers:

- L{Aggregate}: the observer of the delivery attempts' C{tls.result}
  events in the main process (the one writer).  It counts in memory and
  writes each changed day at most once per second through C{run_blocking}:
  a temporary file, fsync, rename over the day file, fsync of the
  directory.  A SIGKILL at any instant leaves every day file whole and
  loses at most the counts of the last second.
- L{list_days}, L{load_day}: read the day files, from any process (the
  MTA running or not): what C{tls report show} and the sender read.
- L{mark_sent}, L{sent_domains}, L{prune}: the sender's record of the
  reports it sent (one marker file per day and domain under C{sent/},
  written by whoever sends, so the counting writer is never raced), and
  the removal of days whose reports were all sent, or that are too old
  to report.

Memory is bounded: at most L{MAX_DOMAINS} policy domains per day (the
sessions of further domains are counted only as C{dropped}) and
L{MAX_DETAILS} failure-detail groups per domain and policy (further
failures go to one group per result type whose reason says so).
"""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, Callable, Iterable

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta.queue.spool import fsync_dir, replace_file_durably
from twisted_mta.tlsrpt.counts import Detail, Policy, PolicyCounts, SUCCESS, from_event

log = Logger()

DIRECTORY = "tlsrpt"  # under the spool
FORMAT = 1  # the day file's version
FLUSH_INTERVAL = 1.0  # seconds: a crash loses at most this much counting
MAX_DOMAINS = 10_000  # policy domains per day
MAX_DETAILS = 100  # failure-detail groups per domain, day and policy
OTHER_REASON = "other (more failure groups than this reporter keeps)"
KEEP_DAYS = 7  # days kept even when unsent: after that a report is too old to matter

_DAY_FILE = re.compile(r"^(\d{4}-\d\d-\d\d)\.json$")


class DamagedDay(ValueError):
    """
    A day file that cannot be read: not JSON, or not our format.
    """


def directory_of(spool: str) -> str:
    return os.path.join(spool, DIRECTORY)


def day_of(t: float) -> str:
    """
    The UTC day of the POSIX time C{t}, C{"2026-12-03"}.
    """
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).date().isoformat()


@attrs.define
class DayCounts:
    """
    One UTC day's counts: per policy domain, per L{Policy}, its
    L{PolicyCounts}; C{dropped}: sessions not counted because the day
    already had L{MAX_DOMAINS} domains.
    """

    day: str
    domains: dict[str, dict[Policy, PolicyCounts]] = attrs.field(factory=dict)
    dropped: int = 0

    def add(self, domain: str, policy: Policy, detail: Detail | None, count: int = 1,
            max_domains: int = MAX_DOMAINS, max_details: int = MAX_DETAILS) -> bool:
        """
        Count C{count} sessions (a failure when C{detail} is given); False
        when the domain cap left them out.
        """
        policies = self.domains.get(domain)
        if policies is None:
            if len(self.domains) >= max_domains:
                self.dropped += count
                return False
            policies = self.domains[domain] = {}
        counts = policies.get(policy)
        if counts is None:
            counts = policies[policy] = PolicyCounts(policy)
        if detail is None:
            counts.successes += count
            return True
        counts.failures += count
        if detail not in counts.details and len(counts.details) >= max_details:
            detail = Detail(detail.result_type, failure_reason_code=OTHER_REASON)
        counts.details[detail] = counts.details.get(detail, 0) + count
        return True

    def merge(self, other: DayCounts, max_domains: int = MAX_DOMAINS,
              max_details: int = MAX_DETAILS) -> None:
        """
        Add C{other}'s counts to these (a day file found after counting began).
        """
        self.dropped += other.dropped
        for domain, policies in other.domains.items():
            for policy, c in policies.items():
                if c.successes:
                    self.add(domain, policy, None, c.successes, max_domains, max_details)
                for detail, n in c.details.items():
                    self.add(domain, policy, detail, n, max_domains, max_details)
                extra = c.failures - sum(c.details.values())
                if extra > 0:  # (never written so, but keep the totals right)
                    self.domains[domain][policy].failures += extra

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "day": self.day, "dropped": self.dropped,
                "domains": {d: [c.to_json() for c in p.values()]
                            for d, p in sorted(self.domains.items())}}

    @classmethod
    def from_json(cls, data: Any) -> DayCounts:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"unknown format {data.get('format')!r}")
            day = data["day"]
            datetime.date.fromisoformat(day)
            dropped = data.get("dropped", 0)
            if not isinstance(dropped, int) or dropped < 0:
                raise ValueError(f"bad dropped count {dropped!r}")
            domains: dict[str, dict[Policy, PolicyCounts]] = {}
            for domain, items in data["domains"].items():
                policies = domains[domain] = {}
                for item in items:
                    c = PolicyCounts.from_json(item)
                    policies[c.policy] = c
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise DamagedDay(f"{type(e).__name__}: {e}") from None
        return cls(day, domains, dropped)

    def counts(self, domain: str) -> list[PolicyCounts]:
        return list(self.domains.get(domain, {}).values())


# -- the day files (blocking; any process) ------------------------------------------------

def day_path(directory: str, day: str) -> str:
    datetime.date.fromisoformat(day)  # never a path of the caller's making
    return os.path.join(directory, f"{day}.json")


def list_days(directory: str) -> list[str]:
    """
    The days that have a day file, oldest first.
    """
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(m.group(1) for m in map(_DAY_FILE.match, names) if m)


def load_day(directory: str, day: str) -> DayCounts | None:
    """
    The day's counts as last written; None when there is no file.
    Raises L{DamagedDay} when the file cannot be read as one.
    """
    try:
        with open(day_path(directory, day), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:  # (UnicodeDecodeError too)
        raise DamagedDay(f"not JSON: {e}") from None
    counts = DayCounts.from_json(data)
    if counts.day != day:
        raise DamagedDay(f"holds the counts of {counts.day}")
    return counts


def write_day(directory: str, day: str, data: bytes) -> None:
    """
    Replace the day file atomically and durably: temporary file, fsync,
    rename, fsync of the directory.
    """
    os.makedirs(directory, exist_ok=True)
    replace_file_durably(day_path(directory, day), data, 0o640)


def set_aside(directory: str, day: str, now: float) -> str:
    """
    Move a damaged day file out of the way (kept for a person to read);
    its new name.
    """
    stamp = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime(
        "%Y%m%dT%H%M%SZ")
    target = os.path.join(directory, f"{day}.json.damaged-{stamp}")
    os.replace(day_path(directory, day), target)
    fsync_dir(directory)
    return target


def _sent_dir(directory: str, day: str) -> str:
    datetime.date.fromisoformat(day)
    return os.path.join(directory, "sent", day)


def _marker_name(domain: str) -> str:
    name = domain.strip().rstrip(".").lower()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"not a domain: {domain!r}")
    return name


def mark_sent(directory: str, day: str, domain: str, note: str = "") -> None:
    """
    Record that the report of C{domain} for C{day} was sent (or given up
    on for good): a marker file C{sent/<day>/<domain>} holding C{note}
    (the report id, say), written atomically.  Blocking.
    """
    where = _sent_dir(directory, day)
    os.makedirs(where, exist_ok=True)
    replace_file_durably(os.path.join(where, _marker_name(domain)), note.encode("utf-8"), 0o644)


def sent_domains(directory: str, day: str) -> set[str]:
    """
    The domains whose report for C{day} was marked sent.
    """
    try:
        return {n for n in os.listdir(_sent_dir(directory, day)) if not n.startswith(".")}
    except FileNotFoundError:
        return set()


def prune(directory: str, today: str, keep_days: int = KEEP_DAYS) -> list[str]:
    """
    Remove the day files (and sent markers) of days before C{today} whose
    every domain was marked sent, and of days more than C{keep_days}
    before C{today} whatever their state; the days removed.  A damaged
    file is left for a person.  Blocking.
    """
    oldest = (datetime.date.fromisoformat(today) - datetime.timedelta(days=keep_days))
    removed = []
    for day in list_days(directory):
        if day >= today:
            continue
        if datetime.date.fromisoformat(day) >= oldest:
            try:
                counts = load_day(directory, day)
            except DamagedDay:
                continue
            if counts is not None and set(counts.domains) - sent_domains(directory, day):
                continue
        os.unlink(day_path(directory, day))
        removed.append(day)
    for day in _sent_days(directory):
        if day < today and (day in removed or not os.path.exists(day_path(directory, day))):
            where = _sent_dir(directory, day)
            for name in os.listdir(where):
                os.unlink(os.path.join(where, name))
            os.rmdir(where)
    if removed:
        fsync_dir(directory)
    return removed


def _sent_days(directory: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(directory, "sent"))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        try:
            datetime.date.fromisoformat(name)
        except ValueError:
            continue
        out.append(name)
    return out


# -- the counting observer (the main process) ---------------------------------------------

class Aggregate:
    """
    Counts the C{tls.result} events of the delivery attempts (an observer
    of L{twisted_mta.outbound.attempt.AttemptContext}) and keeps them on
    disk.  L{start} reads today's file before delivery starts; a day not
    yet read when its first event comes (midnight passed) is read before
    its first write, so counts on disk are never replaced by fewer.
    """

    def __init__(self, directory: str, clock, run_blocking: Callable,
                 skip_domains: Iterable[str] = (), max_domains: int = MAX_DOMAINS,
                 max_details: int = MAX_DETAILS, interval: float = FLUSH_INTERVAL) -> None:
        self.directory = directory
        self.clock = clock
        self.run_blocking = run_blocking
        self.skip = tuple(d.lower().rstrip(".") for d in skip_domains)
        self.max_domains = max_domains
        self.max_details = max_details
        self.interval = interval
        self.days: dict[str, DayCounts] = {}
        self._read: set[str] = set()  # days whose file has been merged in
        self._reading: dict[str, defer.Deferred] = {}  # reads under way
        self._dirty: set[str] = set()
        self._timer = None
        self._writing: defer.Deferred | None = None
        self._warned_full: set[str] = set()
        self._failing = False

    # -- start and stop --

    def start(self) -> defer.Deferred:
        """
        Read today's day file (a damaged one is set aside, named in one
        log line); fires when done, never fails.
        """
        return defer.ensureDeferred(self._read_day(day_of(self.clock.seconds())))

    @defer.inlineCallbacks
    def stop(self):
        """
        Write what is not yet on disk (the service stops).
        """
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._writing is not None:
            yield self._writing
        yield self.flush()

    # -- counting --

    def __call__(self, name: str, event: dict) -> None:
        if name != "tls.result":
            return
        domain = (event.get("domain") or "").lower().rstrip(".")
        if not domain or self.skipped(domain):
            return
        day = day_of(event.get("time", self.clock.seconds()))
        policy, detail = from_event(event)
        counts = self.days.get(day)
        if counts is None:
            counts = self.days[day] = DayCounts(day)
        if not counts.add(domain, policy, detail, 1, self.max_domains, self.max_details) \
                and day not in self._warned_full:
            self._warned_full.add(day)
            log.warn("tlsrpt: {day} already counts {max} policy domains; sessions with "
                     "further domains are not counted that day", day=day,
                     max=self.max_domains, event="tlsrpt.full")
        self._dirty.add(day)
        self._schedule()

    def skipped(self, domain: str) -> bool:
        return any(domain == s or domain.endswith("." + s) for s in self.skip)

    def snapshot(self, day: str) -> DayCounts | None:
        """
        The day's counts as counted so far (memory, not disk).
        """
        return self.days.get(day)

    # -- writing --

    def _schedule(self) -> None:
        if self._timer is None and self._writing is None:
            self._timer = self.clock.callLater(self.interval, self._due)

    def _due(self) -> None:
        self._timer = None
        self.flush()

    def flush(self) -> defer.Deferred:
        """
        Write every changed day now; fires when written (never fails: a
        write that fails is logged and tried again a second later).
        """
        if self._writing is not None:
            return self._writing
        d = self._writing = defer.ensureDeferred(self._write_dirty())

        def done(_):
            self._writing = None
            if self._dirty:
                self._schedule()
        d.addBoth(done)
        return d

    async def _write_dirty(self) -> None:
        today = day_of(self.clock.seconds())
        for day in sorted(self._dirty):
            if day not in self._read:
                await self._read_day(day)
            counts = self.days[day]
            self._dirty.discard(day)
            data = json.dumps(counts.to_json(), separators=(",", ":")).encode()
            try:
                await self.run_blocking(write_day, self.directory, day, data)
            except Exception as e:
                self._dirty.add(day)
                if not self._failing:
                    self._failing = True
                    log.error("tlsrpt: cannot write the counts of {day} in {directory}: "
                              "{why}; trying again every second", day=day,
                              directory=self.directory, why=_why(e), event="tlsrpt.store_error")
                continue
            if self._failing:
                self._failing = False
                log.info("tlsrpt: the counts of {day} are written again", day=day,
                         event="tlsrpt.store_recovered")
            if day < today and day not in self._dirty:
                del self.days[day]  # a past day: no more events will come
                self._read.discard(day)

    async def _read_day(self, day: str) -> None:
        """
        Merge the day's file into memory (once per day, however many ask
        at once); a damaged one is set aside, with one log line.
        """
        if day in self._read:
            return
        d = self._reading.get(day)
        if d is None:
            d = self._reading[day] = defer.ensureDeferred(self._merge_day(day))
            d.addBoth(lambda r: (self._reading.pop(day, None), r)[1])
        waiter = defer.Deferred()
        d.addBoth(lambda r: (waiter.callback(None), r)[1])
        await waiter

    async def _merge_day(self, day: str) -> None:
        def read():
            try:
                return load_day(self.directory, day), None
            except DamagedDay as e:
                try:
                    where = set_aside(self.directory, day, self.clock.seconds())
                except OSError as oe:
                    where = f"(not moved: {oe.strerror})"
                return None, (str(e), where)
            except OSError as e:
                return None, (e.strerror or str(e), None)

        try:
            found, damaged = await self.run_blocking(read)
        except Exception as e:  # run_blocking itself failed
            found, damaged = None, (_why(e), None)
        if damaged is not None:
            why, where = damaged
            log.error("tlsrpt: the counts of {day} could not be read ({why}); set aside as "
                      "{where}, counting starts again from zero", day=day, why=why,
                      where=where, event="tlsrpt.damaged")
        self._read.add(day)
        if found is not None:
            counts = self.days.get(day)
            if counts is None:
                self.days[day] = found
            else:
                found.merge(counts, self.max_domains, self.max_details)
                self.days[day] = found
        self.days.setdefault(day, DayCounts(day))


class AggregateService(service.Service):
    """
    Starts the aggregate (today's counts read) and, at shutdown, writes
    what is not yet on disk; placed before the queue manager so it stops
    after the last delivery attempt.
    """

    name = "tlsrpt-aggregate"

    def __init__(self, aggregate: Aggregate) -> None:
        self.aggregate = aggregate

    def startService(self) -> None:
        service.Service.startService(self)
        self.aggregate.start()

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        return self.aggregate.stop()


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__


def success_event(domain: str, policy: Policy, time: float) -> dict:
    """
    A C{tls.result} event of a successful session (for tests and tools).
    """
    return {"time": time, "domain": domain, **policy.to_json(), "result": SUCCESS}
