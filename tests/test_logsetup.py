"""
The text log's formatter writes exactly what Twisted's would, for every
kind of event, and replaces only twistd's own text observer.
"""

from __future__ import annotations

import io

from twisted.logger import (
    FileLogObserver, LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime,
    jsonFileLogObserver, textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.logsetup import classic_text_formatter, speed_up_text_log


class Thing:
    real = 7

    def __repr__(self) -> str:
        return "<thing>"

    def name(self) -> str:
        return "called"


def failure() -> Failure:
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


BASE = {"log_time": 1_800_000_000.75, "log_namespace": "twisted_mta.queue.manager",
        "log_level": LogLevel.info}
EVENTS = [
    {"log_format": "{queue_id}: delivered to <{rcpt}>", "queue_id": "Q1", "rcpt": "a@b.test"},
    {"log_format": "plain text, no fields"},
    {"log_format": "{x!r} {x!s} {n:>5} {n:05.1f} {t.real} {d[k]}", "x": "q", "n": 3.5,
     "t": Thing(), "d": {"k": "v"}},
    {"log_format": "two\nlines {x}", "x": "and\nmore"},
    {"log_format": "{missing} field"},
    {"log_format": "{t.name()} needs a call", "t": Thing()},
    {"log_format": "positional {} field"},
    {"log_format": "{{braces}} kept {x}", "x": 1},
    {"log_format": "", "x": 1},
    {"log_format": b"bytes format {x}", "x": 2},
    {"log_format": 42},
    {"x": "no format at all"},
    {"log_format": "with a system", "log_system": "custom-system"},
    {"log_format": "a system that is not text", "log_system": 12},
    {"log_format": "failed: {why}", "why": "boom", "log_failure": failure()},
    {"log_format": "no level", "log_level": None},
    {"log_format": "no time", "log_time": None},
    {"log_format": "negative time", "log_time": -0.25},
    {"log_format": "a later second", "log_time": 1_800_000_001.0},
    {"log_format": "back again", "log_time": 1_800_000_000.1},
    {"log_format": "unicode {x}", "x": "h\u00e9\u2603"},
]


def twisted_line(event: dict) -> str | None:
    return formatEventAsClassicLogText(event, formatTime=lambda t: formatTime(t))


class FormatterTests(SynchronousTestCase):
    def test_same_text_as_twisted(self) -> None:
        """Every event of the table, in order (the time cache sees repeats), as Twisted writes it."""
        fmt = classic_text_formatter()
        for extra in EVENTS:
            event = dict(BASE, **extra)
            if event.get("log_level", 0) is None:
                del event["log_level"]
            self.assertEqual(fmt(event), twisted_line(event), extra)

    def test_flattened_events_same_text(self) -> None:
        """
        Events the JSON log flattened first (it runs before twistd's text
        observer) give Twisted's text too, and take the fast path.
        """
        from twisted.logger import eventAsJSON
        import twisted_mta.logsetup as ls
        fmt = classic_text_formatter()
        for extra in EVENTS:
            event = dict(BASE, **extra)
            if event.get("log_level", 0) is None:
                del event["log_level"]
            try:
                eventAsJSON(event)  # flattens in place, as jsonFileLogObserver does
            except Exception:
                continue  # Twisted cannot flatten it (a missing field): not our case
            self.assertEqual(fmt(event), twisted_line(event), extra)
        calls = []
        self.patch(ls, "formatEventAsClassicLogText", lambda *a, **k: calls.append(a))
        event = dict(BASE, log_format="{a} and {b!r}", a=1, b="x")
        eventAsJSON(event)
        self.assertIn("log_flattened", event)
        ls.classic_text_formatter()(event)
        self.assertEqual(calls, [])

    def test_fast_path_taken(self) -> None:
        """A plain event does not go through Twisted's formatter (else nothing is gained)."""
        import twisted_mta.logsetup as ls
        calls = []
        self.patch(ls, "formatEventAsClassicLogText", lambda *a, **k: calls.append(a))
        fmt = ls.classic_text_formatter()
        fmt(dict(BASE, log_format="{a} and {b}", a=1, b=2))
        fmt(dict(BASE, log_format="{t.name()}", t=Thing()))
        self.assertEqual(len(calls), 1)


class SpeedUpTests(SynchronousTestCase):
    def test_only_twistds_text_observer_changes(self) -> None:
        publisher = LogPublisher()
        text_out, json_out, other_out = io.StringIO(), io.StringIO(), io.StringIO()
        text = textFileLogObserver(text_out)
        other = FileLogObserver(other_out, lambda e: "custom\n")
        publisher.addObserver(text)
        publisher.addObserver(jsonFileLogObserver(json_out))
        publisher.addObserver(other)
        self.assertEqual(speed_up_text_log(publisher), 1)
        publisher(dict(BASE, log_format="hello {x}", x=1))
        self.assertEqual(text_out.getvalue(), twisted_line(dict(BASE, log_format="hello {x}", x=1)))
        self.assertEqual(other_out.getvalue(), "custom\n")
        self.assertIn('"hello {x}"', json_out.getvalue())
