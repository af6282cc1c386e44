"""
The MTA-STS policy cache (RFC 8461 5.1, 10.2): which policy is in force for
a domain, when to fetch one, and the policies kept on disk.

One file per domain, C{<spool>/tls/sts/<domain>.json}, written atomically
(a temporary file, fsync'd, renamed into place) through the I/O pool, read
at start-up: a cached policy survives a restart (trust on first use would
start again otherwise).  A policy in mode C{none} removes the domain's file.

What to do for a domain is L{decide}'s, a pure function of the cache entry,
the id in the domain's TXT record, the time and a short memory of recent
failed fetches (L{Quiet}):

| cache entry | TXT record | decision |
|---|---|---|
| none, or expired | none (absent, invalid, lookup failed) | C{none}: no policy |
| none, or expired | id X | C{fetch} (and wait for it); unless a fetch for X failed (or said C{none}) recently: C{none} |
| in force, id X | id X | C{use}; when due for a refresh, C{refresh}: use it and fetch in the background |
| in force | id Y (changed) | C{fetch} (and wait), the cached policy in force if that fails; if a fetch for Y failed recently: C{use} |
| in force | none | C{use} (RFC 8461 5.1: a cached policy outlives its TXT record), C{refresh} when due |

A policy is in force from its fetch for C{max_age} seconds (at least
C{min_lifetime}, a minute, so that C{max_age: 0} does not cost a fetch per
message).  It is due for a refresh after C{refresh_interval} (a day), or
half its C{max_age} if that is shorter (but not within C{min_lifetime} of
its fetch); a refresh that fails leaves it in
force until it expires.  A failed fetch is not tried again for the same id
before C{retry_interval} (5 minutes): messages go on with the cached
policy, or without one.

Fetches: at most one per domain at a time.  Everyone who asks about a
domain while its policy is being fetched waits for that fetch (bounded by
the fetcher's timeout); other domains never wait for it.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from twisted_mta.metrics import notify
from twisted_mta.tls.sts import (
    InvalidPolicy, Policy, StsError, StsFetchError, StsRecord, examine_sts_records,
    normalize_domain, parse_policy, report_strings,
)

log = Logger()

DIRECTORY = os.path.join("tls", "sts")
FORMAT = 1

USE = "use"
REFRESH = "refresh"  # use the cached policy, and fetch a new one in the background
FETCH = "fetch"  # fetch, and wait for it
NONE = "none"


def cache_directory(spool: str) -> str:
    return os.path.join(spool, DIRECTORY)


@attrs.frozen
class CacheEntry:
    """
    A policy as cached: the domain, the policy, the TXT id it was fetched
    under and when it was fetched (seconds since the epoch).
    """

    domain: str
    policy: Policy
    policy_id: str
    fetched_at: float

    @property
    def expires(self) -> float:
        return self.fetched_at + self.policy.max_age

    def in_force_until(self, min_lifetime: float) -> float:
        return self.fetched_at + max(self.policy.max_age, min_lifetime)

    def to_json(self) -> dict:
        return {"format": FORMAT, "domain": self.domain, "id": self.policy_id,
                "fetched_at": self.fetched_at, "policy": self.policy.text}

    @classmethod
    def from_json(cls, data) -> "CacheEntry":
        """
        Raises C{ValueError} for anything but a file we wrote (and whose
        policy still parses).
        """
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError("not a cache entry of format 1")
        domain, policy_id, fetched_at, text = (data.get(k) for k in
                                               ("domain", "id", "fetched_at", "policy"))
        if not isinstance(domain, str) or not isinstance(policy_id, str) or \
                not isinstance(fetched_at, (int, float)) or not isinstance(text, str):
            raise ValueError("a field is missing or of the wrong type")
        try:
            policy = parse_policy(text)
        except InvalidPolicy as e:
            raise ValueError(f"the cached policy no longer parses: {e}") from None
        return cls(normalize_domain(domain), policy, policy_id, float(fetched_at))


@attrs.frozen
class Quiet:
    """
    No fetch for C{policy_id} before C{until}: the last one failed, or
    said mode C{none}.  C{why} in words.
    """

    policy_id: str
    until: float
    why: str


@attrs.frozen
class Decision:
    action: str  # USE, REFRESH, FETCH, NONE
    entry: CacheEntry | None  # the cached policy in force (for FETCH: to fall back on)
    why: str


def decide(entry: CacheEntry | None, txt_id: str | None, now: float, *,
           quiet: Quiet | None = None, refresh_interval: float = 86400.0,
           min_lifetime: float = 60.0) -> Decision:
    """
    What to do for a domain (the table in this module's docstring).
    C{txt_id} is the id of its valid TXT record, or None when it has none
    (or the lookup failed).
    """
    live = entry if entry is not None and now < entry.in_force_until(min_lifetime) else None
    if quiet is not None and now >= quiet.until:
        quiet = None
    if live is None:
        if txt_id is None:
            why = "no MTA-STS TXT record"
            if entry is not None:
                why += f"; the cached policy (id {entry.policy_id}) has expired"
            return Decision(NONE, None, why)
        if quiet is not None and quiet.policy_id == txt_id:
            return Decision(NONE, None, f"{quiet.why}; next fetch for id {txt_id} "
                                        f"after {quiet.until:.0f}")
        why = "no cached policy" if entry is None else \
            f"the cached policy (id {entry.policy_id}) has expired"
        return Decision(FETCH, None, f"{why}; TXT id {txt_id}")
    if txt_id is not None and txt_id != live.policy_id:
        if quiet is not None and quiet.policy_id == txt_id:
            return Decision(USE, live, f"the TXT id changed to {txt_id} but {quiet.why}; "
                                       f"the cached policy (id {live.policy_id}) stays "
                                       f"in force")
        return Decision(FETCH, live, f"the TXT id changed from {live.policy_id} to {txt_id}")
    refresh_at = live.fetched_at + max(min_lifetime,
                                       min(refresh_interval, live.policy.max_age / 2))
    refresh_id = txt_id or live.policy_id
    if now >= refresh_at and not (quiet is not None and quiet.policy_id == refresh_id):
        return Decision(REFRESH, live, "cached policy, due for a refresh")
    why = "cached policy" if txt_id is not None else \
        "cached policy (the domain has no MTA-STS TXT record now)"
    return Decision(USE, live, why)


@attrs.frozen
class Lookup:
    """
    The answer for a domain: the policy in force (None: no MTA-STS for it
    now, or mode none), where it came from (C{"cache"}, C{"fetched"},
    C{"none"}), the TXT record seen, the cache entry in force, the
    failure of a fetch made for this answer (for TLS-RPT: its
    C{result_type}), and words.
    """

    domain: str
    policy: Policy | None
    source: str
    record: StsRecord | None = None
    entry: CacheEntry | None = None
    error: StsError | None = None
    why: str = ""

    @property
    def mode(self) -> str:
        return self.policy.mode if self.policy is not None else "none"


class _Inflight:
    def __init__(self, policy_id: str) -> None:
        self.policy_id = policy_id
        self.waiters: list[defer.Deferred] = []


def fetch_failure_event(domain: str, error: StsError, now: float,
                        entry: "CacheEntry | None") -> dict:
    """
    The C{tls.result} event of a failed policy fetch: under the cached
    policy when one is still known (a refresh failed), else under
    C{sts} with no policy string; the reason names what failed and the
    policy's URL.
    """
    event: dict = {"time": now, "domain": domain, "policy-type": "sts",
                   "result": error.result_type,
                   "failure-reason-code": f"{error.detail} ({error.url})"}
    if entry is not None:
        event["policy-string"] = report_strings(entry.policy)
        event["mx-host"] = list(entry.policy.mx)
    return event


class PolicyCache:
    """
    The policies in force, per domain, on disk under C{directory}.

    @param fetch: C{fetch(domain)} fires with a L{Policy} or fails with an
        L{StsError} (a L{twisted_mta.tls.sts_fetch.PolicyFetcher}'s
        C{fetch}).
    @param clock: C{seconds()} and C{callLater} (the reactor; a
        C{task.Clock} in tests).
    @param run_blocking: C{run_blocking(f, *args)} runs C{f} in the I/O
        pool and returns a Deferred.
    @param txt_lookup: for L{policy_for}: C{txt_lookup(domain)} returns (or
        fires with) the TXT records at C{_mta-sts.<domain>}; a failure
        counts as no record.
    @param observers: told C{("tls.result", event)} of every fetch that
        failed, for TLS reporting (RFC 8460 4.3.2.1: the domain learns
        that its policy host is broken, C{sts-policy-fetch-error} and the
        others of L{StsError.result_type}), once per fetch, whatever the
        number of messages that waited for it.
    """

    def __init__(self, directory: str, fetch: Callable[[str], defer.Deferred], clock,
                 run_blocking, *, txt_lookup: Callable | None = None,
                 refresh_interval: float = 86400.0, retry_interval: float = 300.0,
                 min_lifetime: float = 60.0, observers: list | None = None) -> None:
        self.directory = directory
        self.observers = observers if observers is not None else []
        # Told each domain whose file is re-read (tls sts refresh): the
        # caches of sending workers (twisted_mta.workers.WorkerSending).
        self.reloaded: list = []
        self.fetch = fetch
        self.clock = clock
        self.run_blocking = run_blocking
        self.txt_lookup = txt_lookup
        self.refresh_interval = refresh_interval
        self.retry_interval = retry_interval
        self.min_lifetime = min_lifetime
        self._entries: dict[str, CacheEntry] = {}
        self._quiet: dict[str, Quiet] = {}
        self._inflight: dict[str, _Inflight] = {}

    # -- reading -----------------------------------------------------------------------

    def load(self) -> None:
        """
        Read the cache directory (blocking: call at start-up).  Files that
        are damaged, expired or left over from an interrupted write are
        removed.
        """
        self._entries = {}
        now = self.clock.seconds()
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return
        for name in names:
            path = os.path.join(self.directory, name)
            if name.endswith(".tmp"):
                _remove(path)
                continue
            if not name.endswith(".json"):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    entry = CacheEntry.from_json(json.load(f))
                if entry_path(self.directory, entry.domain) != path:
                    raise ValueError(f"the file names another domain ({entry.domain})")
            except (OSError, ValueError) as e:
                log.warn("tls: MTA-STS cache file {path} is unusable and was removed: "
                         "{why}", path=path, why=str(e), event="tls.sts-cache-error")
                _remove(path)
                continue
            if now >= entry.in_force_until(self.min_lifetime):
                _remove(path)
                continue
            self._entries[entry.domain] = entry

    def entry(self, domain: str) -> CacheEntry | None:
        """
        The cache entry of C{domain}, expired or not.
        """
        return self._entries.get(_key(domain) or "")

    def entries(self) -> dict[str, CacheEntry]:
        return dict(sorted(self._entries.items()))

    def fetching(self, domain: str) -> bool:
        return (_key(domain) or "") in self._inflight

    # -- the answer for a domain -------------------------------------------------------

    def policy_for(self, domain: str) -> defer.Deferred:
        """
        Look up the TXT record of C{domain} (C{txt_lookup}), then L{get}.
        """
        if self.txt_lookup is None:
            raise RuntimeError("PolicyCache.policy_for needs a txt_lookup")
        d = defer.maybeDeferred(self.txt_lookup, domain)

        def examined(records) -> defer.Deferred:
            record, why = examine_sts_records(records or ())
            return self.get(domain, record, txt_why=why)

        def failed(f: Failure) -> defer.Deferred:
            return self.get(domain, None, txt_why=f"TXT lookup failed: "
                                                  f"{f.getErrorMessage()}")
        d.addCallbacks(examined, failed)
        return d

    def get(self, domain: str, record: StsRecord | None, *, txt_why: str = "") -> defer.Deferred:
        """
        The L{Lookup} for C{domain}, given its TXT record (None: none, an
        invalid one, or the lookup failed).  Fires at once unless a fetch
        must be waited for.
        """
        key = _key(domain)
        if key is None:
            return defer.succeed(Lookup(domain, None, NONE, record,
                                        why="not a domain name MTA-STS can apply to"))
        now = self.clock.seconds()
        txt_id = record.id if record is not None else None
        decision = decide(self._entries.get(key), txt_id, now, quiet=self._quiet.get(key),
                          refresh_interval=self.refresh_interval,
                          min_lifetime=self.min_lifetime)
        why = "; ".join(w for w in (txt_why, decision.why) if w)
        expired = self._entries.get(key)
        if expired is not None and now >= expired.in_force_until(self.min_lifetime):
            del self._entries[key]
            self._save(key, None)
        if decision.action == NONE:
            return defer.succeed(Lookup(key, None, NONE, record, why=why))
        if decision.action in (USE, REFRESH):
            if decision.action == REFRESH:
                self._start(key, txt_id or decision.entry.policy_id).addErrback(
                    lambda f: None)  # the outcome is logged and remembered
            entry = decision.entry
            return defer.succeed(Lookup(key, entry.policy, "cache", record, entry, why=why))
        d = self._start(key, txt_id)
        d.addCallback(self._answer, key, record, why)
        return d

    def refresh(self, domain: str, record: StsRecord | None = None) -> defer.Deferred:
        """
        Fetch now, whatever the cache says (C{tls sts refresh}); fires with
        the L{Lookup}, fetched or, when the fetch failed, from the cache.
        """
        key = _key(domain)
        if key is None:
            return defer.succeed(Lookup(domain, None, NONE, record,
                                        why="not a domain name MTA-STS can apply to"))
        entry = self._entries.get(key)
        policy_id = record.id if record is not None else \
            entry.policy_id if entry is not None else ""
        d = self._start(key, policy_id)
        d.addCallback(self._answer, key, record, "refresh asked for")
        return d

    def reload(self, domain: str) -> defer.Deferred:
        """
        Re-read C{domain}'s file (C{tls sts refresh} wrote it while the
        MTA was running); fires with whether a policy is cached now.  A
        missing or unusable file drops the entry.
        """
        key = _key(domain)
        if key is None:
            return defer.succeed(False)
        for tell in self.reloaded:
            tell(key)

        def read() -> CacheEntry | None:
            try:
                with open(entry_path(self.directory, key), encoding="utf-8") as f:
                    entry = CacheEntry.from_json(json.load(f))
            except (OSError, ValueError):
                return None
            return entry if entry.domain == key else None

        def got(entry: CacheEntry | None) -> bool:
            if entry is None:
                self._entries.pop(key, None)
            else:
                self._entries[key] = entry
                self._quiet.pop(key, None)
            log.info("tls: MTA-STS policy of {domain} reloaded: {policy}", domain=key,
                     policy=entry.policy.describe() if entry else "none cached",
                     event="tls.sts-reloaded")
            return entry is not None
        return self.run_blocking(read).addCallback(got)

    def forget(self, domain: str | None = None) -> defer.Deferred:
        """
        Drop the policy of C{domain} (every domain's for None), in memory
        and on disk.
        """
        keys = list(self._entries) if domain is None else [_key(domain) or ""]
        paths = []
        for key in keys:
            self._quiet.pop(key, None)
            if self._entries.pop(key, None) is not None:
                paths.append(entry_path(self.directory, key))
        return self.run_blocking(_remove_all, paths)

    # -- fetching -------------------------------------------------------------------------

    def _start(self, key: str, policy_id: str) -> defer.Deferred:
        """
        A Deferred for the outcome of the fetch of C{key}'s policy (a
        L{Policy} or a Failure), starting one unless one is running.
        Each caller gets a Deferred of its own; cancelling it does not stop
        the fetch the others wait for.
        """
        inflight = self._inflight.get(key)
        start = inflight is None
        if inflight is None:
            inflight = self._inflight[key] = _Inflight(policy_id)
        elif policy_id:
            # The TXT id changed while fetching: publishers update the
            # policy before the id (RFC 8461 8.1), so what is being fetched
            # is at least as new as the id.
            inflight.policy_id = policy_id

        def cancelled(waiter: defer.Deferred) -> None:
            if waiter in inflight.waiters:
                inflight.waiters.remove(waiter)
        waiter: defer.Deferred = defer.Deferred(cancelled)
        inflight.waiters.append(waiter)
        if start:  # after the waiter is in: the fetch may end at once
            defer.maybeDeferred(self.fetch, key).addBoth(self._fetched, key, inflight)
        return waiter

    def _fetched(self, result, key: str, inflight: _Inflight) -> None:
        del self._inflight[key]
        now = self.clock.seconds()
        policy_id = inflight.policy_id
        if isinstance(result, Failure):
            error = result.value if isinstance(result.value, StsError) else \
                StsFetchError(key, f"internal error: {result.getErrorMessage()}")
            if not isinstance(result.value, StsError):
                log.failure("tls: MTA-STS fetch for {domain} crashed", result, domain=key,
                            event="tls.sts-error")
            self._quiet[key] = Quiet(policy_id, now + self.retry_interval,
                                     f"the last fetch failed ({error.result_type}: "
                                     f"{error.detail})")
            log.info("tls: MTA-STS policy of {domain} not fetched ({result_type}): {detail}",
                     domain=key, result_type=error.result_type, detail=error.detail,
                     policy_id=policy_id, event="tls.sts-fetch-failed")
            notify(self.observers, "tls.result", fetch_failure_event(
                key, error, now, self._entries.get(key)), log, "tls.sts-error")
            outcome: object = error
        elif result.mode == "none":
            self._quiet[key] = Quiet(policy_id, now + max(result.max_age, self.min_lifetime),
                                     "the policy says mode none")
            if self._entries.pop(key, None) is not None:
                self._save(key, None)
            log.info("tls: MTA-STS policy of {domain} is mode none: forgotten", domain=key,
                     policy_id=policy_id, event="tls.sts-forgotten")
            outcome = result
        else:
            self._quiet.pop(key, None)
            entry = CacheEntry(key, result, policy_id, now)
            self._entries[key] = entry
            self._save(key, entry)
            log.info("tls: MTA-STS policy of {domain} fetched: {policy}", domain=key,
                     policy=result.describe(), policy_id=policy_id, event="tls.sts-fetched")
            outcome = result
        for waiter in inflight.waiters:
            waiter.callback(outcome)

    def _answer(self, outcome, key: str, record: StsRecord | None, why: str) -> Lookup:
        """
        The L{Lookup} after a fetch this caller waited for.
        """
        if isinstance(outcome, Policy):
            if outcome.mode == "none":
                return Lookup(key, None, NONE, record, why=f"{why}; fetched: mode none")
            return Lookup(key, outcome, "fetched", record, self._entries.get(key), why=why)
        entry = self._entries.get(key)
        now = self.clock.seconds()
        if entry is not None and now < entry.in_force_until(self.min_lifetime):
            return Lookup(key, entry.policy, "cache", record, entry, outcome,
                          f"{why}; the fetch failed, the cached policy (id "
                          f"{entry.policy_id}) stays in force")
        return Lookup(key, None, NONE, record, None, outcome,
                      f"{why}; the fetch failed and no policy is cached")

    # -- saving ---------------------------------------------------------------------------

    def _save(self, key: str, entry: CacheEntry | None) -> None:
        path = entry_path(self.directory, key)
        if entry is None:
            d = self.run_blocking(_remove_all, [path])
        else:
            d = self.run_blocking(write_entry, path, entry.to_json())
        d.addErrback(lambda f: log.failure("tls: could not save the MTA-STS policy of "
                                           "{domain} to {path}", f, domain=key, path=path,
                                           event="tls.sts-cache-error"))


def _key(domain: str) -> str | None:
    try:
        return normalize_domain(domain)
    except ValueError:
        return None


def entry_path(directory: str, domain: str) -> str:
    """
    The file of C{domain} (a normalized domain: letters, digits, hyphens
    and dots only, so it cannot name another directory).
    """
    return os.path.join(directory, f"{domain}.json")


def write_entry(path: str, data: dict) -> None:
    """
    Write atomically: a temporary file beside it, fsync'd, renamed over it.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        _remove(path)
