"""
The text and JSON logs' formatters write exactly what Twisted's would, for
every kind of event, and replace only twistd's own text observer.
"""

from __future__ import annotations

import io
import os
import signal

from twisted.logger import (
    FileLogObserver, LogLevel, LogPublisher, formatEventAsClassicLogText, formatTime,
    jsonFileLogObserver, textFileLogObserver,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import logsetup
from twisted_mta.logsetup import (
    TurnBufferedStream, classic_text_formatter, install_json_log, json_event_formatter,
    speed_up_text_log,
)


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

# What else the JSON log meets: values JSON cannot hold, repeated fields,
# keys that are not text, events flattened before.
JSON_EVENTS = EVENTS + [
    {"log_format": "{a} {a} {a!r} {a:>3} {a}", "a": "x"},
    {"log_format": "{peer}", "peer": ("127.0.0.1", 25), "octets": b"\xff\x00raw",
     "log_logger": object(), "log_source": Thing()},
    {"log_format": "{n}", "n": float("nan"), "big": 10**30, "nested": {"k": [1, None, True]}},
    {"log_format": "{level}", "level": LogLevel.warn, 7: "a key that is not text",
     ("t",): "skipped"},
    {"log_format": "already {a}", "a": 1, "log_flattened": {"a!s:": "kept", "a!:": "kept"}},
    {"log_format": "{0} positional", 0: "zero"},
    {"log_format": "{a-b} not an identifier", "a-b": "dash"},
    {"log_format": "{unbalanced", "x": 1},
    {"log_format": None, "x": 1},
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


class JSONFormatterTests(SynchronousTestCase):
    def outcome(self, fmt, event: dict):
        """What C{fmt} returns (or raises) for a copy of C{event}, and the copy after."""
        copy = dict(event)
        try:
            return ("ok", fmt(copy)), copy
        except Exception as e:
            return ("raised", type(e)), copy

    def test_same_json_as_twisted(self) -> None:
        """
        Every event of the table, twice (the second time from the cached
        plan), gives Twisted's eventAsJSON text, or its error; both leave
        the event flattened the same way for the observers after them.
        """
        from twisted.logger import eventAsJSON
        fmt = json_event_formatter()
        for _ in range(2):
            for extra in JSON_EVENTS:
                event = {**BASE, **extra}
                if event.get("log_level", 0) is None:
                    del event["log_level"]
                ours, after_ours = self.outcome(fmt, event)
                theirs, after_theirs = self.outcome(eventAsJSON, event)
                self.assertEqual(ours, theirs, extra)
                self.assertEqual(after_ours.get("log_flattened"),
                                 after_theirs.get("log_flattened"), extra)

    def test_fast_path_taken(self) -> None:
        """A plain event is not encoded by Twisted (else nothing is gained); a failure is."""
        import twisted_mta.logsetup as ls
        real, calls = ls.eventAsJSON, []
        self.patch(ls, "eventAsJSON", lambda event: calls.append(event) or real(event))
        fmt = ls.json_event_formatter()
        fmt(dict(BASE, log_format="{a} and {b!r}", a=1, b="x"))
        fmt(dict(BASE, log_format="{a} and {b!r}", a=2, b="y"))
        self.assertEqual(calls, [])
        fmt(dict(BASE, log_format="failed", log_failure=failure()))
        self.assertEqual(len(calls), 1)

    def test_json_log_file(self) -> None:
        """
        install_json_log writes one line per event that Twisted's reader
        gives back with its text.
        """
        from twisted.logger import eventsFromJSONLogFile, formatEvent
        path = self.mktemp()
        publisher = LogPublisher()
        self.patch(logsetup, "globalLogPublisher", publisher)
        reactor = MemoryReactorClock()
        observer = install_json_log(path, reactor)
        publisher(dict(BASE, log_format="{queue_id}: delivered to <{rcpt}>", queue_id="Q1",
                       rcpt="a@b.test", event="delivery.delivered"))
        publisher(dict(BASE, log_format="failed: {why}", why="boom", log_failure=failure()))
        observer._outFile.flush_now()
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read().count("\n"), 2)
        with open(path, encoding="utf-8") as f:
            events = list(eventsFromJSONLogFile(f))
        self.assertEqual([formatEvent(e) for e in events],
                         ["Q1: delivered to <a@b.test>", "failed: boom"])
        self.assertEqual(events[0]["event"], "delivery.delivered")
        self.assertIs(events[0]["log_level"], LogLevel.info)
        self.assertEqual(events[1]["log_failure"].type.__name__, "ZeroDivisionError")


class SpeedUpTests(SynchronousTestCase):
    def test_only_twistds_text_observer_changes(self) -> None:
        publisher = LogPublisher()
        text_out, json_out, other_out = io.StringIO(), io.StringIO(), io.StringIO()
        text = textFileLogObserver(text_out)
        other = FileLogObserver(other_out, lambda e: "custom\n")
        publisher.addObserver(text)
        publisher.addObserver(jsonFileLogObserver(json_out))
        publisher.addObserver(other)
        self.assertEqual(speed_up_text_log(publisher, MemoryReactorClock()), 1)
        publisher(dict(BASE, log_format="hello {x}", x=1))
        self.assertEqual(text_out.getvalue(), twisted_line(dict(BASE, log_format="hello {x}", x=1)))
        self.assertEqual(other_out.getvalue(), "custom\n")
        self.assertIn('"hello {x}"', json_out.getvalue())


class Recorder:
    """A stream that records each write and flush as the system calls would."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list = []
        self.fail = fail

    def write(self, text) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        self.calls.append(("write", text))

    def flush(self) -> None:
        self.calls.append(("flush",))


class TurnBufferedStreamTests(SynchronousTestCase):
    """
    The reactor thread's lines reach the file once per turn, in order;
    anything else is written at once.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.in_reactor = True
        self.patch(threadable, "isInIOThread", lambda: self.in_reactor)
        self.out = Recorder()
        self.stream = TurnBufferedStream(self.out, self.reactor)

    def test_one_write_per_turn(self) -> None:
        for line in ("a\n", "b\n", "c\n"):
            self.stream.write(line)
            self.stream.flush()
        self.assertEqual(self.out.calls, [])
        self.reactor.advance(0)
        self.assertEqual(self.out.calls, [("write", "a\nb\nc\n"), ("flush",)])
        self.stream.write("d\n")
        self.reactor.advance(0)
        self.assertEqual(self.out.calls[2:], [("write", "d\n"), ("flush",)])
        self.reactor.advance(0)  # nothing pending: nothing written
        self.assertEqual(len(self.out.calls), 4)

    def test_not_running_writes_at_once(self) -> None:
        self.reactor.running = False
        self.stream.write("early\n")
        self.assertEqual(self.out.calls, [("write", "early\n"), ("flush",)])

    def test_other_thread_writes_after_pending(self) -> None:
        self.stream.write("first\n")
        self.in_reactor = False
        self.stream.write("from a thread\n")
        self.assertEqual(self.out.calls, [("write", "first\nfrom a thread\n"), ("flush",)])
        self.in_reactor = True
        self.reactor.advance(0)
        self.assertEqual(len(self.out.calls), 2)

    def test_limit_writes_at_once(self) -> None:
        self.patch(logsetup, "TURN_BUFFER_LIMIT", 10)
        self.stream.write("12345\n")
        self.assertEqual(self.out.calls, [])
        self.stream.write("67890\n")
        self.assertEqual(self.out.calls, [("write", "12345\n67890\n"), ("flush",)])

    def test_shutdown_flushes(self) -> None:
        self.stream.write("last words\n")
        for trigger, args, kwargs in self.reactor.triggers["after"]["shutdown"]:
            trigger(*args, **kwargs)
        self.assertEqual(self.out.calls, [("write", "last words\n"), ("flush",)])

    def test_bytes_stream(self) -> None:
        self.stream.write(b"a\n")
        self.stream.write(b"b\n")
        self.reactor.advance(0)
        self.assertEqual(self.out.calls[0], ("write", b"a\nb\n"))

    def test_failing_write_says_so_once(self) -> None:
        err = io.StringIO()
        self.patch(logsetup.sys, "__stderr__", err)
        self.out.fail = True
        self.stream.write("lost\n")
        self.reactor.advance(0)
        self.stream.write("lost too\n")
        self.reactor.advance(0)
        self.assertEqual(err.getvalue(), "twisted-mta: cannot write the log: [Errno 28] No "
                                         "space left on device; lines are dropped\n")
        self.out.fail = False
        self.stream.write("back\n")
        self.reactor.advance(0)
        self.assertEqual(self.out.calls, [("write", "back\n"), ("flush",)])

    def handler_logs_on(self, sig: int, line: str) -> None:
        """
        A real signal whose handler logs through the stream, as twistd's
        SIGTERM handler does; if the stream ever waits for itself again,
        SIGALRM interrupts the wait and fails the test instead of hanging.
        """
        self.from_thread: list = []
        self.reactor.callFromThread = lambda f, *a: self.from_thread.append((f, a))

        def waited(*args):
            raise AssertionError("the log stream waited for a lock its own thread held")

        for number, handler in ((sig, lambda *args: self.stream.write(line)),
                                (signal.SIGALRM, waited)):
            self.addCleanup(signal.signal, number, signal.signal(number, handler))
        signal.setitimer(signal.ITIMER_REAL, 5)
        self.addCleanup(signal.setitimer, signal.ITIMER_REAL, 0)

    def test_signal_handler_logs_during_a_write(self) -> None:
        """The handler runs while a turn's lines are being written: its line is kept for the flush it asks for."""
        self.handler_logs_on(signal.SIGUSR1, "Received SIGUSR1\n")
        write = self.out.write

        def write_then_signal(text) -> None:
            write(text)
            if len(self.out.calls) == 1:
                os.kill(os.getpid(), signal.SIGUSR1)  # delivered before kill returns

        self.out.write = write_then_signal
        self.stream.write("a\n")
        self.reactor.advance(0)
        self.assertEqual(self.out.calls, [("write", "a\n"), ("flush",)])
        self.assertEqual(self.from_thread, [(self.stream.flush_now, ())])
        for f, args in self.from_thread:
            f(*args)
        self.assertEqual(self.out.calls[2:], [("write", "Received SIGUSR1\n"), ("flush",)])

    def test_signal_handler_logs_during_an_append(self) -> None:
        """The handler runs while a line is being added: both lines are written, once each."""
        self.handler_logs_on(signal.SIGUSR1, "Received SIGUSR1\n")

        class Signals(str):
            def __len__(self) -> int:
                os.kill(os.getpid(), signal.SIGUSR1)
                return str.__len__(self)

        self.stream.write(Signals("a\n"))
        self.reactor.advance(0)
        for f, args in self.from_thread:
            f(*args)
        self.assertEqual(self.out.calls, [("write", "a\nReceived SIGUSR1\n"), ("flush",)])
        self.assertEqual(len(self.from_thread), 1)

    def test_observers_write_the_same_lines(self) -> None:
        """Through twistd's text observer and the JSON one: the same text as unbuffered."""
        events = [dict(BASE, log_format="{queue_id}: delivered to <{rcpt}>", queue_id=f"Q{i}",
                       rcpt="a@b.test") for i in range(3)]
        for make in (textFileLogObserver, jsonFileLogObserver):
            plain, buffered = io.StringIO(), io.StringIO()
            direct, through = make(plain), make(TurnBufferedStream(buffered, self.reactor))
            for event in events:
                direct(dict(event))
                through(dict(event))
            self.assertEqual(buffered.getvalue(), "")
            self.reactor.advance(0)
            self.assertEqual(buffered.getvalue(), plain.getvalue())

    def test_speed_up_wraps_twistds_file_once(self) -> None:
        publisher = LogPublisher()
        out = io.StringIO()
        observer = textFileLogObserver(out)
        publisher.addObserver(observer)
        speed_up_text_log(publisher, self.reactor)
        speed_up_text_log(publisher, self.reactor)
        self.assertIsInstance(observer._outFile, TurnBufferedStream)
        self.assertIs(observer._outFile.stream, out)
        publisher(dict(BASE, log_format="hello"))
        self.assertEqual(out.getvalue(), "")
        self.reactor.advance(0)
        self.assertEqual(out.getvalue(), twisted_line(dict(BASE, log_format="hello")))
