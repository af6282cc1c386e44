"""
The corruption table (issue 11): whatever part of a queue entry is damaged
(the queue file's envelope header or body, the state xattr, the state file,
any JSON field given a wrong type or value, ids, NaN and Infinity, a missing
or extra file), recovery completes, and the entry is either recovered from
its header envelope (or its other recorded state) or moved to corrupt/,
logged either way.  The decoders meet random bytes and random
structurally-valid-but-wrong JSON with L{EnvelopeError} and nothing else
(hypothesis).
"""

from __future__ import annotations

import base64
import copy
import json
import os

import attrs
from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.model import (
    HEADER_NAME, Envelope, EnvelopeError, Outcome, Recipient, from_header,
)
from twisted_mta.queue.spool import XATTR, Spool

T0 = 1_800_000_000.5
NOW = T0 + 3600
BODY = b"Received: from client.test\r\n\tby mx.example.test; date\r\nSubject: t\r\n\r\n" + \
    b"body line\r\n" * 20

# Stand-ins for what json.dumps cannot write as a plain value: replaced in
# the text by the JSON (or not-quite-JSON) tokens themselves.
NAN, INF, NINF, HUGE = "\0NaN", "\0Infinity", "\0-Infinity", "\0huge"
TOKENS = {NAN: "NaN", INF: "Infinity", NINF: "-Infinity", HUGE: "1e400"}


def to_text(raw) -> bytes:
    """
    C{raw} as JSON, with the stand-ins written as their tokens.
    """
    text = json.dumps(raw, sort_keys=True)
    for marker, token in TOKENS.items():
        text = text.replace(json.dumps(marker), token)
    return text.encode("utf-8")


def header_bytes(raw) -> bytes:
    b64 = base64.b64encode(to_text(raw))
    return HEADER_NAME + b": " + b"\r\n\t".join(b64[i:i + 76] for i in range(0, len(b64), 76)) \
        + b"\r\n"


# What each field of the JSON must be (the spec this test holds the decoder
# to), and values of the wrong type or out of range for each kind.
ENVELOPE_KINDS = {
    "version": "version", "queue_id": "id", "sender": "str", "arrival": "num", "size": "int",
    "client": "client", "attempts": "int", "next_attempt": "num", "last_outcome": "outcome?",
    "warned": "bool", "ret": "ret?", "envid": "str?", "tls_failures": "int",
    "tls_override": "override?", "file_size": "int", "recipients": "recipients",
}
RECIPIENT_KINDS = {
    "address": "address", "original": "str?", "state": "state", "outcome": "outcome?",
    "done_at": "num?", "notify": "notify?", "orcpt": "str?", "dsn_pending": "bool",
}
OUTCOME_KINDS = {
    "code": "code", "enhanced": "str", "text": "str", "remote_mta": "str?",
    "dsn_passed": "bool", "kind": "str?", "policy": "str?", "final_text": "str?",
}
WRONG = {
    "version": [2, 0, "1", 1.0, True, None],
    "id": ["../../etc/passwd", "", "A/B", ".hidden", "ID:2,S", "X" * 65, 5, None],
    "str": [5, 1.5, True, None, [], {}],
    "str?": [5, True, [], {"a": "b"}],
    "address": ["", 5, None, ["a@b"]],
    "int": ["3", 3.0, 1.5, -1, True, None, [], 2 ** 64, NAN, INF, HUGE],
    "num": ["1800000000", True, None, [], {}, NAN, INF, NINF, HUGE],
    "num?": ["1", True, [], NAN, INF, NINF, HUGE],
    "bool": [1, 0, "true", None, []],
    "state": ["junk", "PENDING", 5, None],
    "code": ["250", 99, 1000, 250.5, True, None, NAN],
    "outcome?": ["junk", 5, True, [], {"code": 250}],
    "client": [[], ["helo", "x"], "x", 5, {"ip": 5}, {"ip": None}, {"ip": ["1"]}],
    "notify?": ["SUCCESS", ["NEVER"], [5], {}, [None]],
    "ret?": ["full", "X", 5, []],
    "override?": ["none", "RELAXED", 5],
    "recipients": [[], {}, "alice@example.test", [5], [None], [[]], None],
}
REQUIRED = {
    (): ("version", "queue_id", "sender", "arrival", "recipients"),
    ("recipients", 0): ("address", "state"),
    ("recipients", 0, "outcome"): ("code", "enhanced", "text"),
}


def valid_raw(queue_id: str) -> dict:
    """
    A state with every field set, as JSON.
    """
    env = Envelope(
        queue_id=queue_id, sender="s@remote.test",
        recipients=(
            Recipient("alice@example.test", original="info@example.test", state="delivered",
                      outcome=Outcome(250, "2.0.0", "ok", "mx.test", True, "reply", "p", "f"),
                      done_at=T0 + 5, notify=("SUCCESS", "FAILURE"), orcpt="rfc822;a@b",
                      dsn_pending=True),
            Recipient("x@elsewhere.test")),
        arrival=T0, size=len(BODY), client={"helo": "client.test", "ip": "192.0.2.1"},
        attempts=2, next_attempt=T0 + 600, last_outcome=Outcome(451, "4.4.0", "later"),
        warned=True, ret="HDRS", envid="env-1", tls_failures=1, tls_override="relaxed")
    return json.loads(env.to_json())


def mutations():
    """
    Every wrong JSON this test tries, as (label, change) where change
    alters a valid envelope's JSON in place: each field of the envelope, a
    recipient and an outcome with each wrong value, each required field
    missing, an unknown field at each level.
    """
    places = [((), ENVELOPE_KINDS), (("recipients", 0), RECIPIENT_KINDS),
              (("recipients", 0, "outcome"), OUTCOME_KINDS),
              (("last_outcome",), OUTCOME_KINDS)]

    def setting(where, name, value):
        return lambda raw: _at(raw, where).__setitem__(name, copy.deepcopy(value))

    def removing(where, name):
        return lambda raw: _at(raw, where).__delitem__(name)

    for where, kinds in places:
        for name, kind in kinds.items():
            for value in WRONG[kind]:
                yield f"{_label(where, name)} = {value!r}"[:100], setting(where, name, value)
        for name in REQUIRED.get(where, ()):
            yield f"{_label(where, name)} missing", removing(where, name)
        yield f"{_label(where, 'surprise')} (an unknown field)", setting(where, "surprise", 1)
    yield ("recipients[1].outcome without text",
           setting(("recipients", 1), "outcome", {"code": 250, "enhanced": "2.0.0"}))


def _at(raw, where):
    for key in where:
        raw = raw[key]
    return raw


def _label(where, name) -> str:
    return ".".join(str(k) for k in (*where, name))


class LogCapture:
    def __init__(self, testcase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def about(self, name: str, *events: str) -> list[dict]:
        return [e for e in self.events if e.get("event") in events
                and name in (e.get("queue_id"), e.get("name"))]


class CorruptionTableTests(SynchronousTestCase):
    """
    Each case is an entry of one spool, recovered together: the entry comes
    back from its header envelope (or other state), or goes to corrupt/,
    and a line about it is logged.
    """

    def setUp(self) -> None:
        self.patch(os, "fsync", lambda fd: None)  # hundreds of commits: durability not tested here
        self.spool = Spool(self.mktemp(), clock=lambda: NOW)
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        self.log = LogCapture(self)
        self.expected: dict[str, tuple[str, str]] = {}  # name -> (label, outcome)

    # building entries

    def commit(self, state: str = "cur") -> tuple[str, Envelope]:
        """
        A real entry in C{state}/ with a recorded state (so the header and
        the state differ); returns its id and header envelope.
        """
        w = self.spool.new_message()
        header = Envelope(queue_id=w.queue_id, sender="s@remote.test",
                          recipients=(Recipient("alice@example.test", notify=("SUCCESS",)),
                                      Recipient("x@elsewhere.test")),
                          arrival=T0, next_attempt=T0, client={"ip": "192.0.2.1"})
        w.write(header.to_header())
        w.write(BODY)
        env = self.successResultOf(w.commit(attrs.evolve(header, size=len(BODY) - 60)))
        self.spool.update_and_move(attrs.evolve(env, attempts=1, next_attempt=T0 + 300),
                                   "new", state)
        return w.queue_id, header

    def expect(self, name: str, label: str, outcome: str) -> None:
        self.expected[name] = (label, outcome)

    def recover_and_check(self) -> None:
        headers = self.headers
        report = self.spool.recover()
        found = {env.queue_id: env for env, _ in report.entries}
        corrupt = set(os.listdir(os.path.join(self.spool.path, "corrupt")))
        problems = []
        for name, (label, outcome) in sorted(self.expected.items(), key=lambda i: i[1]):
            logged = self.log.about(name, "queue.state-lost", "queue.quarantined",
                                    "queue.orphan-removed")
            if outcome == "quarantined":
                ok = name not in found and name in corrupt and any(
                    e["event"] == "queue.quarantined" for e in logged)
            elif outcome == "header":
                ok = (found.get(name) == headers[name] and logged
                      and found[name].attempts == 0)
            elif outcome == "due now":
                ok = (found.get(name) == attrs.evolve(headers[name], next_attempt=NOW)
                      and logged)
            elif outcome == "state":
                ok = name in found and found[name].attempts >= 1 and logged
            else:
                raise AssertionError(outcome)
            if not ok:
                problems.append(f"{label}: expected {outcome}; found "
                                f"{'in corrupt/' if name in corrupt else found.get(name)}; "
                                f"logged {[e['event'] for e in logged]}")
        self.assertEqual(problems, [], f"{len(problems)} of {len(self.expected)} cases:\n"
                         + "\n".join(problems))
        # A second start finds nothing more to do, and says nothing more
        # (but for a header's next attempt far ahead, until it is attempted).
        before = len(self.log.events)
        again = self.spool.recover()
        self.assertEqual(sorted(e.queue_id for e, _ in again.entries), sorted(found))
        self.assertEqual(again.quarantined, ())
        self.assertEqual([e for e in self.log.events[before:] if
                          self.expected.get(e.get("queue_id"), ("", ""))[1] != "due now"], [])

    @property
    def headers(self) -> dict[str, Envelope]:
        out = {}
        for state in ("new", "cur", "hold"):
            for name in os.listdir(os.path.join(self.spool.path, state)):
                with open(os.path.join(self.spool.path, state, name), "rb") as f:
                    try:
                        out[name] = from_header(f.read())[0]
                    except EnvelopeError:
                        pass
        return out

    # the table

    def test_every_json_field_wrong_in_the_header(self) -> None:
        """Each field of the header envelope with a wrong type or value (and missing or unknown fields): quarantined, logged; recovery completes."""
        for label, change in mutations():
            qid = self.spool.new_queue_id()
            raw = valid_raw(qid)
            change(raw)
            with open(os.path.join(self.spool.path, "cur", qid), "wb") as f:
                f.write(header_bytes(raw) + BODY)
            self.expect(qid, f"header {label}", "quarantined")
        self.assertGreater(len(self.expected), 200)
        self.recover_and_check()

    def test_every_json_field_wrong_in_the_state_xattr(self) -> None:
        """Each field of the state xattr with a wrong type or value: the entry restarts from its header envelope, logged, the xattr removed."""
        for label, change in mutations():
            qid, _ = self.commit()
            raw = valid_raw(qid)
            change(raw)
            os.setxattr(self.spool.path_in("cur", qid), XATTR, to_text(raw))
            self.expect(qid, f"xattr {label}", "header")
        self.recover_and_check()
        for qid in self.expected:
            self.assertNotIn(XATTR, os.listxattr(self.spool.path_in("cur", qid)))

    def test_every_json_field_wrong_in_the_state_file(self) -> None:
        """Each field of the state file with a wrong type or value: the entry restarts from its header envelope, logged, the file removed."""
        for label, change in mutations():
            qid, _ = self.commit()
            raw = valid_raw(qid)
            change(raw)
            os.removexattr(self.spool.path_in("cur", qid), XATTR)
            with open(self.spool.envelope_path(qid), "wb") as f:
                f.write(to_text(raw))
            self.expect(qid, f"state file {label}", "header")
        self.recover_and_check()
        self.assertEqual(os.listdir(os.path.join(self.spool.path, "envelopes")), [])

    def test_damaged_parts(self) -> None:
        """Every other part of an entry damaged: each row recovered from its header (or other state) or quarantined, and logged."""
        path = self.spool.path
        rows = []

        def row(label, outcome):
            def register(make):
                rows.append((label, outcome, make))
                return make
            return register

        def state_of(qid):
            return Envelope.from_json(os.getxattr(self.spool.path_in("cur", qid), XATTR))

        def set_state(qid, **fields):
            os.setxattr(self.spool.path_in("cur", qid), XATTR,
                        attrs.evolve(state_of(qid), **fields).to_json())

        @row("xattr: garbage (issue 11, F1)", "header")
        def _(qid):
            os.setxattr(self.spool.path_in("cur", qid), XATTR, b"garbage")

        @row("xattr: the first half of the real JSON (torn)", "header")
        def _(qid):
            data = os.getxattr(self.spool.path_in("cur", qid), XATTR)
            os.setxattr(self.spool.path_in("cur", qid), XATTR, data[:len(data) // 2])

        @row("xattr: empty", "header")
        def _(qid):
            os.setxattr(self.spool.path_in("cur", qid), XATTR, b"")

        @row("xattr: not UTF-8", "header")
        def _(qid):
            os.setxattr(self.spool.path_in("cur", qid), XATTR, b'{"version": 1, "\xff": 1}')

        @row("state file: deeply nested JSON, no xattr", "header")
        def _(qid):
            os.removexattr(self.spool.path_in("cur", qid), XATTR)
            with open(self.spool.envelope_path(qid), "wb") as f:
                f.write(b"[" * 100000 + b"]" * 100000)

        @row("xattr: a duplicate field", "header")
        def _(qid):
            data = os.getxattr(self.spool.path_in("cur", qid), XATTR)
            os.setxattr(self.spool.path_in("cur", qid), XATTR,
                        data[:-1] + b',"attempts":7}')

        @row("xattr: queue_id of another entry (F3)", "header")
        def _(qid):
            set_state(qid, queue_id=self.other)

        @row("xattr: next_attempt Infinity (F3)", "header")
        def _(qid):
            data = os.getxattr(self.spool.path_in("cur", qid), XATTR)
            os.setxattr(self.spool.path_in("cur", qid), XATTR, data.replace(
                b'"next_attempt":' + json.dumps(state_of(qid).next_attempt).encode(),
                b'"next_attempt":Infinity'))

        @row("xattr: next_attempt NaN (F3)", "header")
        def _(qid):
            data = os.getxattr(self.spool.path_in("cur", qid), XATTR)
            os.setxattr(self.spool.path_in("cur", qid), XATTR, data.replace(
                b'"next_attempt":' + json.dumps(state_of(qid).next_attempt).encode(),
                b'"next_attempt":NaN'))

        @row("xattr: next_attempt a thousand years ahead (F3)", "header")
        def _(qid):
            set_state(qid, next_attempt=T0 + 1000 * 365 * 86400)

        @row("xattr: other recipients", "header")
        def _(qid):
            set_state(qid, recipients=(Recipient("mallory@example.test"),))

        @row("xattr: another sender", "header")
        def _(qid):
            set_state(qid, sender="other@remote.test")

        @row("xattr: another arrival", "header")
        def _(qid):
            set_state(qid, arrival=T0 - 86400)

        @row("xattr: garbage, state file good: the file is used", "state")
        def _(qid):
            data = os.getxattr(self.spool.path_in("cur", qid), XATTR)
            with open(self.spool.envelope_path(qid), "wb") as f:
                f.write(data)
            os.setxattr(self.spool.path_in("cur", qid), XATTR, b"garbage")

        @row("state file: garbage, xattr good: the xattr is used", "state")
        def _(qid):
            with open(self.spool.envelope_path(qid), "wb") as f:
                f.write(b"\x00garbage")

        @row("state file: torn, no xattr", "header")
        def _(qid):
            data = os.getxattr(self.spool.path_in("cur", qid), XATTR)
            os.removexattr(self.spool.path_in("cur", qid), XATTR)
            with open(self.spool.envelope_path(qid), "wb") as f:
                f.write(data[:40])

        @row("state file: a directory", "state")
        def _(qid):
            os.mkdir(self.spool.envelope_path(qid))

        @row("header: missing (a file without envelope)", "quarantined")
        def _(qid):
            with open(self.spool.path_in("cur", qid), "wb") as f:
                f.write(BODY)

        @row("header: not base64", "quarantined")
        def _(qid):
            with open(self.spool.path_in("cur", qid), "r+b") as f:
                f.seek(len(HEADER_NAME) + 10)
                f.write(b"!!!!")

        @row("header: base64 of garbage", "quarantined")
        def _(qid):
            with open(self.spool.path_in("cur", qid), "wb") as f:
                f.write(HEADER_NAME + b": " + base64.b64encode(os.urandom(60)) + b"\r\n" + BODY)

        @row("header: cut short (the file ends inside it)", "quarantined")
        def _(qid):
            os.truncate(self.spool.path_in("cur", qid), 50)

        @row("header: names another entry", "quarantined")
        def _(qid):
            with open(self.spool.path_in("cur", qid), "rb") as f:
                header, offset = from_header(f.read())
                f.seek(offset)
                rest = f.read()
            with open(self.spool.path_in("cur", qid), "wb") as f:
                f.write(attrs.evolve(header, queue_id=self.other).to_header() + rest)

        @row("header: next_attempt a thousand years ahead", "due now")
        def _(qid):
            with open(self.spool.path_in("cur", qid), "rb") as f:
                header, offset = from_header(f.read())
                f.seek(offset)
                rest = f.read()
            os.removexattr(self.spool.path_in("cur", qid), XATTR)
            with open(self.spool.path_in("cur", qid), "wb") as f:
                f.write(attrs.evolve(header, next_attempt=T0 + 1000 * 365 * 86400).to_header()
                        + rest)

        @row("file: empty", "quarantined")
        def _(qid):
            os.truncate(self.spool.path_in("cur", qid), 0)

        @row("body: truncated (F9)", "quarantined")
        def _(qid):
            os.truncate(self.spool.path_in("cur", qid),
                        os.path.getsize(self.spool.path_in("cur", qid)) - 100)

        @row("body: one octet cut (F9)", "quarantined")
        def _(qid):
            os.truncate(self.spool.path_in("cur", qid),
                        os.path.getsize(self.spool.path_in("cur", qid)) - 1)

        @row("body: grown", "quarantined")
        def _(qid):
            with open(self.spool.path_in("cur", qid), "ab") as f:
                f.write(b"more\r\n")

        @row("body: truncated, length unknown, shorter than the envelope's size", "quarantined")
        def _(qid):
            set_state(qid, file_size=0)
            os.truncate(self.spool.path_in("cur", qid),
                        os.path.getsize(self.spool.path_in("cur", qid)) - 100)

        for label, outcome, make in rows:
            self.other, _ = self.commit()
            qid, _ = self.commit()
            make(qid)
            self.expect(qid, label, outcome)
        # The entries named by others are fine: recovered, nothing said.
        self.recover_and_check()
        self.assertEqual(os.listdir(os.path.join(path, "tmp")), [])

    def test_ids_and_files(self) -> None:
        """Names that are not queue ids, a copy in two state directories, directories and links where files belong, files where none belong: set aside or removed, logged; the real entries recovered."""
        path = self.spool.path
        good, _ = self.commit()
        with open(self.spool.path_in("cur", good), "rb") as f:
            data = f.read()
        strays = {"cur/ID.json": "not a queue id", "cur/" + good + ":2,S": "Maildir flags",
                  "new/..x": None, "hold/a b": "a space"}
        for name in strays:
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)
        copy_id, _ = self.commit(state="hold")
        with open(os.path.join(path, "new", copy_id), "wb") as f:
            f.write(data)  # the same name in new/ and hold/
        os.mkdir(os.path.join(path, "new", "ADIRECTORY"))
        os.symlink("/etc/passwd", os.path.join(path, "new", "ALINK"))
        os.mkfifo(os.path.join(path, "new", "AFIFO"))  # opened without blocking, then refused
        os.mkdir(os.path.join(path, "tmp", "leftover"))
        with open(os.path.join(path, "tmp", "leftover", "x"), "wb") as f:
            f.write(b"x")
        with open(os.path.join(path, "envelopes", "notes.txt"), "wb") as f:
            f.write(b"x")
        with open(os.path.join(path, "envelopes", "ABC123.json"), "wb") as f:
            f.write(b"{}")  # no queue file of that name: an orphan
        # corrupt/ already holds one of the names: nothing there is replaced
        with open(os.path.join(path, "corrupt", "ADIRECTORY"), "wb") as f:
            f.write(b"quarantined before")

        report = self.spool.recover()

        self.assertEqual(sorted(e.queue_id for e, _ in report.entries), sorted([good, copy_id]))
        corrupt = sorted(os.listdir(os.path.join(path, "corrupt")))
        self.assertEqual(corrupt, sorted(["ID.json", good + ":2,S", "a b", copy_id,
                                          "ADIRECTORY", "ADIRECTORY.1", "ALINK", "AFIFO"]))
        with open(os.path.join(path, "corrupt", "ADIRECTORY"), "rb") as f:
            self.assertEqual(f.read(), b"quarantined before")
        self.assertTrue(os.path.isdir(os.path.join(path, "corrupt", "ADIRECTORY.1")))
        self.assertTrue(os.path.islink(os.path.join(path, "corrupt", "ALINK")))
        self.assertEqual(os.listdir(os.path.join(path, "new")), ["..x"])  # dot files: not ours
        self.assertEqual(os.listdir(os.path.join(path, "tmp")), [])
        self.assertEqual(os.listdir(os.path.join(path, "envelopes")), [])
        self.assertEqual(report.removed_orphans, 2)
        for name in ("ID.json", good + ":2,S", "a b", copy_id, "ADIRECTORY", "ALINK", "AFIFO"):
            self.assertTrue(self.log.about(name, "queue.quarantined"), name)
        for name in ("ADIRECTORY", "ALINK", "AFIFO"):
            self.assertIn("not a regular file", str(self.log.about(name, "queue.quarantined")))
        for name in ("notes.txt", "ABC123.json"):
            self.assertTrue(self.log.about(name, "queue.orphan-removed"), name)


# -- the decoders under hypothesis -------------------------------------------------------

FAST = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    | st.sampled_from(list(TOKENS)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=8)


def paths(raw, where=()):
    """
    Every place in a JSON value: (container path, key) pairs.
    """
    if isinstance(raw, dict):
        for key, value in raw.items():
            yield where, key
            yield from paths(value, (*where, key))
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            yield where, i
            yield from paths(value, (*where, i))


BASE = valid_raw("6B0A87D251AE92AA51")
PATHS = list(paths(BASE))


@st.composite
def wrong_envelopes(draw):
    """
    A valid envelope's JSON with one to three places changed: a value
    replaced by any JSON value (NaN and Infinity included), a field
    removed, or an unknown one added.
    """
    raw = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 3))):
        where, key = draw(st.sampled_from(PATHS))
        try:
            container = _at(raw, where)
            container[key]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier change removed this place
        op = draw(st.sampled_from(["replace", "remove", "add"]))
        if op == "replace":
            container[key] = draw(json_values)
        elif op == "remove" and isinstance(container, dict):
            del container[key]
        elif op == "add" and isinstance(container, dict):
            container[draw(st.text(max_size=8))] = draw(json_values)
    return to_text(raw)


def decodes_or_refuses(testcase, decode, data) -> None:
    """
    C{decode(data)} gives a well-typed envelope (it encodes and decodes to
    itself) or raises L{EnvelopeError}; nothing else.
    """
    try:
        env = decode(data)
    except EnvelopeError:
        return
    if isinstance(env, tuple):
        env = env[0]
    testcase.assertIsInstance(env, Envelope)
    testcase.assertEqual(Envelope.from_json(env.to_json()), env)


class DecoderPropertyTests(SynchronousTestCase):

    @FAST
    @given(st.binary(max_size=400))
    def test_random_bytes_as_json(self, data: bytes) -> None:
        """Random bytes given to Envelope.from_json: an envelope or EnvelopeError, nothing else."""
        decodes_or_refuses(self, Envelope.from_json, data)

    @FAST
    @given(json_values)
    def test_random_json_as_envelope(self, value) -> None:
        """Any JSON value (NaN and Infinity included): EnvelopeError."""
        with self.assertRaises(EnvelopeError):
            Envelope.from_json(to_text(value))

    @FAST
    @given(wrong_envelopes())
    def test_structurally_valid_but_wrong_json(self, data: bytes) -> None:
        """A real envelope's JSON with fields replaced by random values, removed or added: an envelope that round-trips, or EnvelopeError."""
        decodes_or_refuses(self, Envelope.from_json, data)

    @FAST
    @given(wrong_envelopes(), st.binary(max_size=50))
    def test_structurally_valid_but_wrong_header(self, data: bytes, body: bytes) -> None:
        """The same as the queue file's envelope header: an envelope or EnvelopeError."""
        b64 = base64.b64encode(data)
        decodes_or_refuses(self, from_header, HEADER_NAME + b": " + b64 + b"\r\n" + body)

    @FAST
    @given(st.binary(max_size=300))
    def test_random_bytes_as_header(self, data: bytes) -> None:
        """Random bytes, bare or after the header's name: from_header gives an envelope or EnvelopeError."""
        decodes_or_refuses(self, from_header, data)
        decodes_or_refuses(self, from_header, HEADER_NAME + b": " + data)

    def test_a_valid_envelope_decodes(self) -> None:
        """The base of the properties is itself valid, so they test something."""
        env = Envelope.from_json(to_text(BASE))
        self.assertEqual(env.recipients[0].outcome.dsn_passed, True)
        self.assertEqual(json.loads(env.to_json()), BASE)


def agree(testcase, raw) -> None:
    """
    The fast path of the decoder (L{model._fast_load}) gives up (None)
    wherever the field-by-field one refuses C{raw}, and where it accepts
    it makes the same envelope: equal, the same JSON, the same file size.
    """
    from twisted_mta import model
    try:
        slow = model._load_fields(copy.deepcopy(raw))
    except EnvelopeError:
        slow = None
    fast = model._fast_load(copy.deepcopy(raw))
    if slow is None:
        testcase.assertIsNone(fast, raw)
    elif fast is not None:
        testcase.assertEqual(fast, slow)
        testcase.assertEqual(fast.to_json(), slow.to_json())
        testcase.assertEqual(fast.file_size, slow.file_size)


class FastPathTests(SynchronousTestCase):
    """
    Envelopes decode through a fast path that hands anything unusual to the
    field-by-field checks; the two must agree on every envelope.
    """

    def test_valid_envelopes_take_the_fast_path(self) -> None:
        """A full envelope and a fresh one are decoded by the fast path, to what the checks make."""
        from twisted_mta import model
        fresh = json.loads(Envelope("6B0A87D251AE92AA52", "", (Recipient("a@b.test"),),
                                    arrival=T0).to_json())
        for raw in (BASE, fresh, dict(BASE, file_size=1234)):
            fast = model._fast_load(copy.deepcopy(raw))
            self.assertIsNotNone(fast)
            self.assertEqual(fast.to_json(), model._load_fields(copy.deepcopy(raw)).to_json())

    def test_every_mutation(self) -> None:
        """Every wrong value, missing and unknown field of the corruption table: both refuse."""
        count = 0
        for label, change in mutations():
            raw = copy.deepcopy(BASE)
            change(raw)
            raw = json.loads(to_text(raw), parse_constant=float)
            agree(self, raw)
            count += 1
        self.assertGreater(count, 150)

    def test_types_the_checks_convert(self) -> None:
        """An integer time (the checks make it a float) and nulls where a default stands: the same envelope or the same refusal."""
        for change in ({"arrival": 1_800_000_000}, {"next_attempt": 5}, {"size": None},
                       {"client": None}, {"warned": None}, {"ret": None}, {"envid": None},
                       {"last_outcome": None}, {"requiretls": True, "tls_required_no": True}):
            agree(self, dict(BASE, **change))
        recipient = dict(BASE["recipients"][0], done_at=1_800_000_000, notify=None)
        agree(self, dict(BASE, recipients=[recipient]))

    def test_text_decoded_as_json_loads_decodes_it(self) -> None:
        """from_json's one decoder reads the text json.loads with the same hooks reads (UTF-8 with or without a byte order mark, UTF-16, str) and refuses, with EnvelopeError, what it refuses (a str with a byte order mark, bytes that are not text)."""
        from twisted_mta import model
        text = to_text(BASE).decode("utf-8")
        cases = [text, text.encode("utf-8"), b"\xef\xbb\xbf" + text.encode("utf-8"),
                 text.encode("utf-16"), "\ufeff" + text, b"\xff\xfe\xfd" + text.encode(),
                 text.encode("utf-8")[:-1] + b"\xc3"]
        outcomes = []
        for data in cases:
            try:
                json.loads(data, parse_constant=model._no_constant,
                           object_pairs_hook=model._no_duplicates)
            except ValueError:
                self.assertRaises(EnvelopeError, Envelope.from_json, data)
                outcomes.append("refused")
            else:
                self.assertEqual(Envelope.from_json(data).to_json(), Envelope.from_json(
                    text).to_json())
                outcomes.append("read")
        self.assertEqual(outcomes, ["read"] * 4 + ["refused"] * 3)

    @FAST
    @given(wrong_envelopes())
    def test_random_changes(self, data: bytes) -> None:
        """The hypothesis envelopes of DecoderPropertyTests: both agree."""
        agree(self, json.loads(data, parse_constant=float))


class RecoveryPropertyTests(SynchronousTestCase):
    """
    Recovery with random bytes, or a wrong envelope, as the state xattr:
    it completes, with the entry from its header or its state.
    """

    def setUp(self) -> None:
        self.spool = Spool(self.mktemp(), clock=lambda: NOW)
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        w = self.spool.new_message()
        self.header = Envelope(queue_id=w.queue_id, sender="s@remote.test",
                               recipients=(Recipient("alice@example.test"),), arrival=T0,
                               next_attempt=T0)
        w.write(self.header.to_header() + BODY)
        self.successResultOf(w.commit(self.header))
        self.qid = w.queue_id

    @settings(max_examples=100, deadline=None, database=None)
    @given(st.binary(max_size=200) | wrong_envelopes())
    def test_any_xattr(self, data: bytes) -> None:
        """Any bytes in the state xattr: recovery completes with the entry (from its header unless the state is usable)."""
        os.setxattr(self.spool.path_in("new", self.qid), XATTR, data)
        report = self.spool.recover()
        [(env, state)] = report.entries
        self.assertEqual((env.queue_id, state), (self.qid, "new"))
        self.assertEqual(report.quarantined, ())
