"""
JSON-lines logging beside twistd's text log.

twistd keeps writing its human-readable log (stdout with -n, or twistd.log);
with C{[logging] format = "json"} every event is also written as one JSON
object per line to C{[logging] file}, with its structured fields (C{event},
C{queue_id}, C{peer}, ...), for log shippers.

The text log's lines are formatted by L{classic_text_formatter} and the
JSON log's by L{json_event_formatter}: the same text as Twisted's, more
cheaply.  Both logs are written through a
L{TurnBufferedStream}: one write per reactor turn instead of a write and a
flush per event.
"""

from __future__ import annotations

import io
import json
import math
import string
import sys
import threading
from typing import Callable

from twisted.logger import (
    FileLogObserver, LogLevel, Logger, eventAsJSON, formatEventAsClassicLogText, formatTime,
    globalLogPublisher, timeFormatRFC3339,
)
from twisted.python import threadable
from twisted.python.failure import Failure

# A turn's lines are written at once beyond this many characters.
TURN_BUFFER_LIMIT = 64 * 1024


class TurnBufferedStream:
    """
    A log stream that writes what the reactor thread logs once per reactor
    turn: a C{FileLogObserver} writes and flushes every event, two system
    calls per line, and with a few lines per delivered message that was
    most of what logging cost the main process (docs/benchmarks.md).

    Lines stay in order and reach the file by the end of the turn they
    were logged in (or at C{TURN_BUFFER_LIMIT} characters); so a process
    killed outright loses at most that turn's lines, never a message.
    Lines from other threads, and any line while the reactor is not
    running (start-up, after shutdown), are written at once, after what
    is pending.  A write that fails drops the pending lines with one line
    on stderr, so a full disk cannot make logging raise in a loop.

    A signal handler may log while this thread is inside L{write} or
    L{flush_now} (twistd's SIGTERM handler does): that line is only added
    to what is pending, and the reactor is asked, the signal-safe way
    (C{callFromThread}), to write it.  With a plain lock that call waited
    for the lock its own thread held, and the process never stopped.
    """

    def __init__(self, stream, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.stream = stream
        self._reactor = reactor
        self._pending: list = []
        self._size = 0
        self._scheduled = False
        # Re-entrant: a signal handler runs in the thread that may hold it.
        self._lock = threading.RLock()
        self._depth = 0  # the lock owner's calls in progress: 2 means re-entered
        self._complained = False
        reactor.addSystemEventTrigger("after", "shutdown", self.flush_now)

    def write(self, text) -> None:
        with self._lock:
            self._depth += 1
            try:
                self._pending.append(text)
                self._size += len(text)
                reentered = self._depth > 1
                if not reentered:
                    if not (self._reactor.running and threadable.isInIOThread()):
                        self._write_pending()
                        return
                    if self._size >= TURN_BUFFER_LIMIT:
                        self._write_pending()
                        return
                    if self._scheduled:
                        return
                    self._scheduled = True
            finally:
                self._depth -= 1
        if reentered:
            # Neither the stream nor the reactor's timed calls may be in a
            # consistent state here; the line waits for a flush.
            if self._reactor.running:
                self._reactor.callFromThread(self.flush_now)
            return
        self._reactor.callLater(0, self._turn_ended)

    def flush(self) -> None:
        """
        The observer's flush after each event: the turn's end flushes.
        """

    def _turn_ended(self) -> None:
        self._scheduled = False
        self.flush_now()

    def flush_now(self) -> None:
        with self._lock:
            self._depth += 1
            try:
                if self._depth == 1:
                    self._write_pending()
            finally:
                self._depth -= 1

    def _write_pending(self) -> None:
        # Taken before it is joined: a line added meanwhile (a signal
        # handler's) is either in this write or left for the next.
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._size = 0
        text = ("" if isinstance(pending[0], str) else b"").join(pending)
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception as e:
            if not self._complained:
                self._complained = True
                try:
                    print(f"twisted-mta: cannot write the log: {e}; lines are dropped",
                          file=sys.__stderr__)
                except Exception:
                    pass


def install_json_log(path: str, reactor=None):
    stream = io.open(path, "a", encoding="utf-8")
    as_json = json_event_formatter()
    observer = FileLogObserver(TurnBufferedStream(stream, reactor),
                               lambda event: as_json(event) + "\n")
    globalLogPublisher.addObserver(observer)
    return observer


class _Unusual(Exception):
    """An event L{json_event_formatter} leaves to Twisted's own encoder."""


# How Twisted's JSON encodes each log level (eventAsJSON's object hook).
_LEVELS = {level: json.loads(eventAsJSON({"log_level": level}))["log_level"]
           for level in LogLevel.iterconstants()}


def json_event_formatter() -> Callable[[dict], str]:
    """
    A formatter that writes what Twisted's L{eventAsJSON} writes (the
    JSON log: one line per event, the same text, readable with
    C{eventsFromJSONLogFile}), at about a third of the cost for the plain
    events that make up nearly all of our log.  Twisted parses each
    event's format string to flatten its fields and builds a JSON encoder
    for every event: here the fields a format names are worked out once
    per format, and one encoder serves every event.  The event is
    flattened in place, as Twisted does, for the observers after this one.

    Anything else goes to Twisted's L{eventAsJSON}: a format naming
    attributes, items, calls or positions, an event flattened before,
    a failure, a missing field.  tests/test_logsetup.py compares the two
    on a table of events.  The JSON log cost the main process about a
    tenth of its time at full load (docs/benchmarks.md).
    """
    plans: dict[str, list[tuple[str, str, str, bool]] | None] = {}

    def default(value: object) -> object:
        # Twisted's default hook, for the values our events carry.
        if isinstance(value, bytes):
            return value.decode("charmap")
        if isinstance(value, Failure):
            raise _Unusual()
        try:
            level = _LEVELS.get(value)  # type: ignore[call-overload]
        except TypeError:  # unhashable
            level = None
        return dict(level) if level is not None else {"unpersistable": True}

    encoder = json.JSONEncoder(skipkeys=True, default=default)

    def plan_for(fmt: str) -> list[tuple[str, str, str, bool]] | None:
        """
        (flattened key, structured key, field, repr?) for each field of
        C{fmt}, keyed as Twisted's flattenEvent keys them; None when a
        field is not a plain name.
        """
        counts: dict[str, int] = {}

        def key(name: str, spec: str, conversion: str) -> str:
            k = f"{name}!{conversion}:{spec}"
            counts[k] = counts.get(k, 0) + 1
            return k if counts[k] == 1 else f"{k}/{counts[k]}"

        plan = []
        try:
            parsed = list(string.Formatter().parse(fmt))
        except ValueError:
            return None
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if not name.isidentifier():
                return None
            conversion = "r" if conversion == "r" else "s"
            flat = key(name, spec or "", conversion)
            plan.append((flat, key(name, spec or "", ""), name, conversion == "r"))
        return plan

    def fast(event: dict) -> str:
        fmt = event.get("log_format")
        if fmt is not None:
            if type(fmt) is not str or "log_flattened" in event:
                raise _Unusual()
            plan = plans.get(fmt, False)
            if plan is False:
                plan = plan_for(fmt)
                if len(plans) < 10_000:  # formats are the code's constants
                    plans[fmt] = plan
            if plan is None:
                raise _Unusual()
            if plan:
                fields: dict = {}
                for flat, structured, name, use_repr in plan:
                    value = event[name]  # a missing field: Twisted's error
                    fields[flat] = repr(value) if use_repr else str(value)
                    fields[structured] = value
                event["log_flattened"] = fields
        return encoder.encode(event)

    def format_event(event: dict) -> str:
        try:
            return fast(event)
        except Exception:
            return eventAsJSON(event)

    return format_event


def classic_text_formatter(time_format: str | None = timeFormatRFC3339
                           ) -> Callable[[dict], str | None]:
    """
    A formatter that writes the same lines as Twisted's
    L{textFileLogObserver} (C{"{time} [{system}] {text}\\n"}), at a fraction
    of the cost for the plain events that make up nearly all of our log:
    the time stamp is formatted once per second, and a format without
    calls is filled in by C{str.format_map} (also for an event the JSON
    log has flattened in place: its own fields give the same text).
    Anything else (a failure with its traceback, a format that needs calls
    or names a missing field) goes to Twisted's own formatter, so the
    output is the same line for line.  Logging was a fifth of the main
    process's time at full load (docs/benchmarks.md).
    """
    last_second: list = [None, ""]

    def slow(event: dict) -> str | None:
        return formatEventAsClassicLogText(event, formatTime=lambda t: formatTime(t, time_format))

    def format_event(event: dict) -> str | None:
        fmt = event.get("log_format")
        if type(fmt) is not str or "log_failure" in event or "()" in fmt:
            return slow(event)
        # A flattened event (the JSON log, when it runs first, flattens the
        # shared event in place) formats the same from its own fields,
        # except that Twisted's flattened text ignores format specs.
        if "log_flattened" in event and _has_spec(fmt):
            return slow(event)
        try:
            text = fmt.format_map(event)
        except Exception:
            return slow(event)
        if not text:
            return None
        when = event.get("log_time")
        if when is None or time_format is None:
            stamp = formatTime(when, time_format)
        else:
            second = math.floor(when)  # the time format has no fractions
            if second != last_second[0]:
                last_second[:] = [second, formatTime(when, time_format)]
            stamp = last_second[1]
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
        elif type(system) is not str:
            return slow(event)
        return f"{stamp} [{system}] {text}".replace("\n", "\n\t") + "\n"

    return format_event


_specs: dict[str, bool] = {}  # format -> has a field with a format spec


def _has_spec(fmt: str) -> bool:
    found = _specs.get(fmt)
    if found is None:
        try:
            found = any(spec for _, name, spec, _ in string.Formatter().parse(fmt)
                        if name is not None)
        except ValueError:
            found = True
        if len(_specs) < 10_000:  # formats are the code's constants: a few hundred
            _specs[fmt] = found
    return found


TWISTED_TEXT_FORMATTER = "textFileLogObserver.<locals>.formatEvent"


def speed_up_text_log(publisher=globalLogPublisher, reactor=None) -> int:
    """
    Give twistd's text log observer (made by L{textFileLogObserver} with
    its default time format) the formatter of L{classic_text_formatter}
    and a L{TurnBufferedStream} over its file; return how many observers
    were changed.  It reaches into the publisher's private observer list
    and the observer's private C{_outFile}: tests/test_twisted_internals.py
    fails by name when either changes.  Any other observer (syslog, a
    custom C{--logger}) is left alone.
    """
    changed = 0
    for observer in list(getattr(publisher, "_observers", ())):
        if isinstance(observer, FileLogObserver) and \
                getattr(observer.formatEvent, "__qualname__", "") == TWISTED_TEXT_FORMATTER:
            observer.formatEvent = classic_text_formatter(timeFormatRFC3339)
            if hasattr(observer, "_outFile") and \
                    not isinstance(observer._outFile, TurnBufferedStream):
                observer._outFile = TurnBufferedStream(observer._outFile, reactor)
            changed += 1
    return changed
