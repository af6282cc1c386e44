"""
The queue envelope: sender, recipients with per-recipient state, and the
retry bookkeeping, as versioned JSON.

JSON (never pickle) so an operator can read it and a future version can
migrate it; C{version} says which layout it has.  The envelope as accepted
travels inside the queue file as its first header field (L{to_header}), so
one file and one fsync make an entry durable; later states are written to
C{envelopes/<id>.json} beside it (see L{twisted_mta.queue.spool}).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any

import attrs

ENVELOPE_VERSION = 1

PENDING = "pending"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DELIVERED, FAILED)


HEADER_NAME = b"X-Twisted-MTA-Envelope"


class EnvelopeError(ValueError):
    """
    An envelope cannot be understood.
    """


def header_end(data: bytes) -> int:
    """
    The offset just past the envelope header field at the start of a queue
    file, or -1 when C{data} does not yet hold all of it.  Raise
    L{EnvelopeError} when the file does not start with one.
    """
    if not data.startswith(HEADER_NAME + b": "):
        if len(data) < len(HEADER_NAME) + 2 and (HEADER_NAME + b": ").startswith(data):
            return -1
        raise EnvelopeError("the queue file does not start with its envelope")
    pos = 0
    while True:
        idx = data.find(b"\r\n", pos)
        if idx < 0 or idx + 2 >= len(data):
            return -1
        if data[idx + 2:idx + 3] != b"\t":
            return idx + 2
        pos = idx + 2


def from_header(data: bytes, end: int | None = None) -> tuple["Envelope", int]:
    """
    Parse the envelope header at the start of C{data} (which must hold all
    of it); return the envelope and the offset where the message starts
    (C{end}, when the caller found it already with L{header_end}).
    """
    if end is None:
        end = header_end(data)
    if end < 0:
        raise EnvelopeError("the envelope header is incomplete")
    value = data[len(HEADER_NAME) + 2:end]
    try:
        raw = base64.b64decode(b"".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise EnvelopeError(f"envelope header is not base64: {e}")
    return Envelope.from_json(raw), end


TLS_REQUIRED = b"tls-required"  # the header field of RFC 8689 3, lower-cased


def tls_required_no(values: list[bytes]) -> bool:
    """
    Whether the C{TLS-Required} header fields of a message (their values,
    unfolded) tag it "TLS-Required: No" (RFC 8689 3, 4.1): exactly one
    field, whose value is C{No} in any case.  Two fields, or another
    value, tag nothing: the header may relax the recipient's policy only
    when it says so plainly.
    """
    return len(values) == 1 and values[0].strip().lower() == b"no"


def tls_required_values(headers: bytes) -> list[bytes]:
    """
    The unfolded values of the C{TLS-Required} fields in a message's
    header section (C{headers}: the message from its first byte; reading
    stops at the first empty line).
    """
    values: list[bytes] = []
    current: list[bytes] | None = None
    # Line by line up to the empty one, not split(): the caller's buffer
    # may hold 64 KiB of body after a header section of a few lines.
    pos, length = 0, len(headers)
    while pos < length:
        nl = headers.find(b"\n", pos)
        if nl < 0:
            nl = length
        line = headers[pos:nl].rstrip(b"\r")
        pos = nl + 1
        if not line:
            break
        if line[:1] in (b" ", b"\t"):
            if current is not None:
                current.append(line)
            continue
        name, colon, value = line.partition(b":")
        if current is not None:
            values.append(b" ".join(v.strip() for v in current if v.strip()))
        current = [value] if colon and name.strip().lower() == TLS_REQUIRED else None
    if current is not None:
        values.append(b" ".join(v.strip() for v in current if v.strip()))
    return values


@attrs.frozen
class Outcome:
    """
    The result of one delivery attempt for one recipient, in the words we
    would give a person and the codes a machine wants.
    """

    code: int
    enhanced: str
    text: str
    remote_mta: str | None = None  # the host whose reply this is, when remote
    dsn_passed: bool = False  # the DSN request went on with the message (RFC 3461 5.2.2)
    # The failure class (ARCHITECTURE.md taxonomy): "reply" for a server's
    # own reply, else what we found (e.g. "connect-failed", "null-mx").
    kind: str | None = None
    policy: str | None = None  # for a TLS failure: the TLS policy that was not met
    # For a TLS deferral: the explanation as it reads once the message is
    # given up (no retry or fallback to promise any more).
    final_text: str | None = None
    # Where a delivered copy went (a Maildir), for our log only: never
    # stored, never shown to a sender.
    where: str | None = attrs.field(default=None, eq=False)

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


@attrs.frozen
class Recipient:
    address: str
    original: str | None = None  # the address the client gave, when an alias expanded it
    state: str = PENDING
    outcome: Outcome | None = None
    done_at: float | None = None
    notify: tuple[str, ...] | None = None  # DSN NOTIFY (RFC 3461); () is NEVER, None unset
    orcpt: str | None = None  # DSN ORCPT as "addr-type;address"
    # A DSN is owed for this recipient's final state and could not be
    # queued yet (the queue manager retries it).
    dsn_pending: bool = False

    def wants(self, condition: str) -> bool:
        """
        Whether the sender asked for (or, unset, gets by default) a DSN on
        C{condition}: FAILURE and DELAY by default, SUCCESS only on request.
        """
        if self.notify is None:
            return condition in ("FAILURE", "DELAY")
        return condition in self.notify

    @property
    def pending(self) -> bool:
        return self.state == PENDING


@attrs.frozen
class Envelope:
    queue_id: str
    sender: str  # "" is the null reverse-path
    recipients: tuple[Recipient, ...]
    arrival: float
    size: int = 0
    client: dict[str, str] = attrs.field(factory=dict)
    attempts: int = 0
    next_attempt: float = 0.0
    last_outcome: Outcome | None = None
    warned: bool = False  # a delay warning was sent
    ret: str | None = None  # DSN RET: "FULL" or "HDRS" (RFC 3461)
    envid: str | None = None  # DSN ENVID, decoded
    tls_failures: int = 0  # attempts that failed on TLS (the fallback decider weighs it)
    tls_override: str | None = None  # operator's one-shot: "relaxed" or "cleartext"
    # RFC 8689: the sender asked for REQUIRETLS (MAIL FROM ... REQUIRETLS):
    # every hop verified TLS to a validated MX that advertises REQUIRETLS.
    requiretls: bool = False
    # RFC 8689 4.1: no REQUIRETLS, and the message carries one
    # "TLS-Required: No" header field: the recipient's published TLS policy
    # (DANE, MTA-STS) is not enforced for it.
    tls_required_no: bool = False
    # RFC 6531: MAIL FROM had SMTPUTF8 (the addresses or the header may be
    # UTF-8); sent on with SMTPUTF8 to servers that offer it.
    smtputf8: bool = False
    # The queue file's length in octets (envelope header included), known
    # from the commit on and recorded with the state; 0 when unknown (the
    # header is written before it is known).  Not part of equality.
    file_size: int = attrs.field(default=0, eq=False)

    def pending(self) -> tuple[Recipient, ...]:
        return tuple(r for r in self.recipients if r.pending)

    @property
    def finished(self) -> bool:
        return not any(r.pending for r in self.recipients)

    def with_results(self, results: dict[str, Recipient]) -> "Envelope":
        """
        Replace the recipients named in C{results} (by address).
        """
        return attrs.evolve(
            self, recipients=tuple(results.get(r.address, r) for r in self.recipients)
        )

    def to_json(self, compact: bool = False) -> bytes:
        # allow_nan=False: a NaN or Infinity would be written as JSON no
        # decoder accepts; better to fail here, before anything is stored.
        if compact:
            return json.dumps(_dump(self), sort_keys=True, separators=(",", ":"),
                              allow_nan=False).encode("utf-8")
        return json.dumps(_dump(self), sort_keys=True, indent=1, allow_nan=False).encode("utf-8")

    def to_dict(self) -> dict[str, Any]:
        """
        What L{to_json} encodes, as a new dict of JSON types (what
        C{json.loads(to_json())} gives, without the round trip).
        """
        return _dump(self)

    def to_header(self) -> bytes:
        """
        The envelope as a folded header field, to start the queue file:
        base64 of compact JSON in lines of 76, so the file stays a valid
        RFC 5322 message that any Maildir reader can open.
        """
        raw = self.to_json(compact=True)
        b64 = base64.b64encode(raw)
        lines = [b64[i:i + 76] for i in range(0, len(b64), 76)]
        return HEADER_NAME + b": " + b"\r\n\t".join(lines) + b"\r\n"

    @classmethod
    def from_json(cls, data: bytes | str) -> "Envelope":
        """
        Decode an envelope written by L{to_json} or L{to_header}; anything
        else (not JSON, NaN or Infinity, a duplicate, missing, unknown or
        mistyped field, a value out of range) raises L{EnvelopeError} and
        nothing else.
        """
        if not isinstance(data, (bytes, bytearray, str)):
            raise EnvelopeError(f"not JSON text: {type(data).__name__}")
        try:
            raw = _decode_json(data)
        except EnvelopeError:
            raise
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise EnvelopeError(f"not JSON: {e}")
        if not isinstance(raw, dict):
            raise EnvelopeError("not a JSON object")
        version = raw.get("version")
        if type(version) is not int or version != ENVELOPE_VERSION:
            raise EnvelopeError(f"unsupported envelope version {_kind(version)}")
        return _load(raw)


def _dump_outcome(o: Outcome | None) -> dict[str, Any] | None:
    if o is None:
        return None
    out: dict[str, Any] = {"code": o.code, "enhanced": o.enhanced, "text": o.text}
    if o.remote_mta is not None:
        out["remote_mta"] = o.remote_mta
    if o.dsn_passed:
        out["dsn_passed"] = True
    if o.kind is not None:
        out["kind"] = o.kind
    if o.policy is not None:
        out["policy"] = o.policy
    if o.final_text is not None:
        out["final_text"] = o.final_text
    return out


def _load_outcome(raw: Any, where: str) -> Outcome | None:
    if raw is None:
        return None
    f = _Fields(raw, where, OUTCOME_FIELDS)
    code = f.integer("code")
    if not 100 <= code <= 999:
        raise EnvelopeError(f"{where}.code: {code} is not a reply code")
    return Outcome(code=code, enhanced=f.string("enhanced"), text=f.string("text"),
                   remote_mta=f.string("remote_mta", None),
                   dsn_passed=f.boolean("dsn_passed"), kind=f.string("kind", None),
                   policy=f.string("policy", None), final_text=f.string("final_text", None))


def _dump(env: Envelope) -> dict[str, Any]:
    return {
        "version": ENVELOPE_VERSION,
        "queue_id": env.queue_id,
        "sender": env.sender,
        "arrival": env.arrival,
        "size": env.size,
        "client": dict(env.client),
        "attempts": env.attempts,
        "next_attempt": env.next_attempt,
        "last_outcome": _dump_outcome(env.last_outcome),
        "warned": env.warned,
        **({"ret": env.ret} if env.ret else {}),
        **({"envid": env.envid} if env.envid is not None else {}),
        **({"tls_failures": env.tls_failures} if env.tls_failures else {}),
        **({"tls_override": env.tls_override} if env.tls_override else {}),
        **({"requiretls": True} if env.requiretls else {}),
        **({"tls_required_no": True} if env.tls_required_no else {}),
        **({"smtputf8": True} if env.smtputf8 else {}),
        **({"file_size": env.file_size} if env.file_size else {}),
        "recipients": [
            {
                "address": r.address,
                "original": r.original,
                "state": r.state,
                "outcome": _dump_outcome(r.outcome),
                "done_at": r.done_at,
                **({"notify": list(r.notify)} if r.notify is not None else {}),
                **({"orcpt": r.orcpt} if r.orcpt is not None else {}),
                **({"dsn_pending": True} if r.dsn_pending else {}),
            }
            for r in env.recipients
        ],
    }


# Every field each object may have; another is an error (a new field
# comes with a new ENVELOPE_VERSION).
ENVELOPE_FIELDS = frozenset({
    "version", "queue_id", "sender", "arrival", "size", "client", "attempts",
    "next_attempt", "last_outcome", "warned", "ret", "envid", "tls_failures",
    "tls_override", "recipients", "file_size", "requiretls", "tls_required_no", "smtputf8"})
RECIPIENT_FIELDS = frozenset({
    "address", "original", "state", "outcome", "done_at", "notify", "orcpt", "dsn_pending"})
OUTCOME_FIELDS = frozenset({
    "code", "enhanced", "text", "remote_mta", "dsn_passed", "kind", "policy", "final_text"})
NOTIFY_CONDITIONS = ("SUCCESS", "FAILURE", "DELAY")
RET_VALUES = ("FULL", "HDRS")
TLS_OVERRIDES = ("relaxed", "cleartext")
_MAX_INT = 2 ** 63 - 1

# A queue id: what the spool makes (upper-case hex), or more generally
# ASCII letters and digits, so it is always one plain file name inside a
# spool directory (no "/", no dot, no ":" of Maildir flags).
QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")


def is_queue_id(value: object) -> bool:
    """
    Whether C{value} has the syntax of a queue id (L{QUEUE_ID}).
    """
    return isinstance(value, str) and QUEUE_ID.fullmatch(value) is not None


def _no_constant(name: str) -> Any:
    raise EnvelopeError(f"not JSON: {name} is not a number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise EnvelopeError(f"field {dup[:40]!r} appears twice")
    return out


# json.loads builds a decoder on every call when given hooks: a tenth of
# decoding an envelope.  This one is built once; _decode_json takes bytes
# as json.loads does (a str that starts with a byte order mark is not
# JSON to the decoder either).
_DECODER = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_no_duplicates)


def _decode_json(data: bytes | bytearray | str) -> Any:
    if not isinstance(data, str):
        data = data.decode(json.detect_encoding(data), "surrogatepass")
    return _DECODER.decode(data)


_ABSENT = object()


class _Fields:
    """
    Typed access to one JSON object of an envelope; each mistake raises
    L{EnvelopeError} naming the field (C{where} is its path).  A field
    given a default may be absent; only those whose default is C{None} may
    also be null.
    """

    def __init__(self, raw: Any, where: str, allowed: frozenset[str]) -> None:
        if not isinstance(raw, dict):
            raise EnvelopeError(f"{where}: expected an object, got {_kind(raw)}")
        unknown = sorted(set(raw) - allowed)
        if unknown:
            raise EnvelopeError(f"{where}: unknown field {unknown[0][:40]!r}")
        self.raw = raw
        self.where = where

    def get(self, name: str, default: Any = _ABSENT) -> Any:
        """
        The raw value; C{default} when absent (L{_ABSENT}: the field is
        required) or when null and the default is C{None}.
        """
        return self._take(name, default)[1]

    def _take(self, name: str, default: Any) -> tuple[bool, Any]:
        """
        (whether the default stands in, the value).
        """
        value = self.raw.get(name, _ABSENT)
        if value is _ABSENT or (value is None and default is None):
            if default is _ABSENT:
                raise EnvelopeError(f"{self.where}: missing field {name!r}")
            return True, default
        return False, value

    def wrong(self, name: str, expected: str, value: Any) -> EnvelopeError:
        return EnvelopeError(f"{self.where}.{name}: expected {expected}, got {_kind(value)}")

    def string(self, name: str, default: Any = _ABSENT) -> Any:
        defaulted, value = self._take(name, default)
        if not defaulted and not isinstance(value, str):
            raise self.wrong(name, "a string", value)
        return value

    def choice(self, name: str, choices: tuple[str, ...]) -> str | None:
        value = self.string(name, None)
        if value is not None and value not in choices:
            raise EnvelopeError(f"{self.where}.{name}: {value[:40]!r} is not one of "
                                f"{', '.join(choices)}")
        return value

    def integer(self, name: str, default: Any = _ABSENT) -> int:
        defaulted, value = self._take(name, default)
        if defaulted:
            return value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.wrong(name, "an integer", value)
        if not 0 <= value <= _MAX_INT:
            raise EnvelopeError(f"{self.where}.{name}: {value} is out of range")
        return value

    def number(self, name: str, default: Any = _ABSENT) -> Any:
        defaulted, value = self._take(name, default)
        if defaulted:
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.wrong(name, "a number", value)
        try:
            value = float(value)
        except OverflowError:
            raise EnvelopeError(f"{self.where}.{name}: out of range")
        if not math.isfinite(value):
            raise EnvelopeError(f"{self.where}.{name}: {value} is not a finite number")
        return value

    def boolean(self, name: str, default: bool = False) -> bool:
        defaulted, value = self._take(name, default)
        if not defaulted and not isinstance(value, bool):
            raise self.wrong(name, "true or false", value)
        return value

    def array(self, name: str, default: Any = _ABSENT) -> Any:
        defaulted, value = self._take(name, default)
        if not defaulted and not isinstance(value, list):
            raise self.wrong(name, "an array", value)
        return value

    def object(self, name: str, default: Any = _ABSENT) -> Any:
        defaulted, value = self._take(name, default)
        if not defaulted and not isinstance(value, dict):
            raise self.wrong(name, "an object", value)
        return value


def _kind(value: Any) -> str:
    """
    A JSON value's type and a short excerpt, for an error message.
    """
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string",
             list: "an array", dict: "an object"}
    name = names.get(type(value), type(value).__name__)
    if isinstance(value, (list, dict)):
        return name
    try:
        text = json.dumps(value, allow_nan=True)
    except ValueError:  # an integer too long to write
        return name
    return f"{name} {text[:40]}" + ("..." if len(text) > 40 else "")


def _load_recipient(raw: Any, where: str) -> Recipient:
    f = _Fields(raw, where, RECIPIENT_FIELDS)
    address = f.string("address")
    if not address:
        raise EnvelopeError(f"{where}.address: empty")
    state = f.string("state")
    if state not in STATES:
        raise EnvelopeError(f"{where}.state: unknown recipient state {state[:40]!r}")
    notify = f.array("notify", None)
    if notify is not None:
        for i, value in enumerate(notify):
            if value not in NOTIFY_CONDITIONS:
                raise EnvelopeError(f"{where}.notify[{i}]: {_kind(value)} is not one of "
                                    f"{', '.join(NOTIFY_CONDITIONS)}")
    return Recipient(
        address=address,
        original=f.string("original", None),
        state=state,
        outcome=_load_outcome(f.get("outcome", None), f"{where}.outcome"),
        done_at=f.number("done_at", None),
        notify=None if notify is None else tuple(notify),
        orcpt=f.string("orcpt", None),
        dsn_pending=f.boolean("dsn_pending"),
    )


# -- the fast path: a well-formed envelope, checked in straight-line code --------
#
# Every envelope the queue reads (a worker's notice, an entry coming due,
# each entry at start-up) goes through _load, and _Fields' method per
# field made that the costliest step of taking a worker's message into
# the queue (about 90 of 160 us per envelope on the EPYC).  The fast path
# accepts only values _Fields accepts and makes the same objects from
# them; on anything else (an int where a float is written, a null, an
# unknown field...) it gives up with None and _Fields decides, and words
# the error.  FastPathTests (tests/queue/test_corruption.py) compares the two.

def _opt_str(raw: dict[str, Any], name: str) -> Any:
    """The string or None; _ABSENT for anything else."""
    value = raw.get(name)
    return value if value is None or type(value) is str else _ABSENT


def _fast_outcome(raw: Any) -> Any:
    if raw is None:
        return None
    if type(raw) is not dict or not raw.keys() <= OUTCOME_FIELDS:
        return _ABSENT
    code, enhanced, text = raw.get("code"), raw.get("enhanced"), raw.get("text")
    dsn_passed = raw.get("dsn_passed", False)
    remote_mta, kind = _opt_str(raw, "remote_mta"), _opt_str(raw, "kind")
    policy, final_text = _opt_str(raw, "policy"), _opt_str(raw, "final_text")
    if type(code) is not int or not 100 <= code <= 999 or type(enhanced) is not str \
            or type(text) is not str or type(dsn_passed) is not bool \
            or _ABSENT in (remote_mta, kind, policy, final_text):
        return _ABSENT
    return Outcome(code=code, enhanced=enhanced, text=text, remote_mta=remote_mta,
                   dsn_passed=dsn_passed, kind=kind, policy=policy, final_text=final_text)


def _fast_recipient(raw: Any) -> Any:
    if type(raw) is not dict or not raw.keys() <= RECIPIENT_FIELDS:
        return _ABSENT
    address, state = raw.get("address"), raw.get("state")
    original, orcpt = _opt_str(raw, "original"), _opt_str(raw, "orcpt")
    done_at, notify = raw.get("done_at"), raw.get("notify")
    dsn_pending = raw.get("dsn_pending", False)
    outcome = _fast_outcome(raw.get("outcome"))
    if type(address) is not str or not address or state not in STATES \
            or type(state) is not str or _ABSENT in (original, orcpt, outcome) \
            or type(dsn_pending) is not bool \
            or not (done_at is None or (type(done_at) is float and math.isfinite(done_at))):
        return _ABSENT
    if notify is not None:
        if type(notify) is not list or not all(
                type(v) is str and v in NOTIFY_CONDITIONS for v in notify):
            return _ABSENT
        notify = tuple(notify)
    return Recipient(address=address, original=original, state=state, outcome=outcome,
                     done_at=done_at, notify=notify, orcpt=orcpt, dsn_pending=dsn_pending)


def _fast_int(raw: dict[str, Any], name: str) -> Any:
    value = raw.get(name, 0)
    return value if type(value) is int and 0 <= value <= _MAX_INT else _ABSENT


def _fast_load(raw: Any) -> Envelope | None:
    """L{_load} of a well-formed envelope; None where L{_Fields} must look."""
    if type(raw) is not dict or not raw.keys() <= ENVELOPE_FIELDS:
        return None
    get = raw.get
    queue_id, sender, arrival = get("queue_id"), get("sender"), get("arrival")
    next_attempt, client, rcpts = get("next_attempt", 0.0), get("client", {}), get("recipients")
    size, attempts = _fast_int(raw, "size"), _fast_int(raw, "attempts")
    tls_failures, file_size = _fast_int(raw, "tls_failures"), _fast_int(raw, "file_size")
    warned, requiretls = get("warned", False), get("requiretls", False)
    tls_required_no, smtputf8 = get("tls_required_no", False), get("smtputf8", False)
    ret, envid, tls_override = _opt_str(raw, "ret"), _opt_str(raw, "envid"), \
        _opt_str(raw, "tls_override")
    if type(queue_id) is not str or QUEUE_ID.fullmatch(queue_id) is None \
            or type(sender) is not str \
            or type(arrival) is not float or not math.isfinite(arrival) \
            or type(next_attempt) is not float or not math.isfinite(next_attempt) \
            or _ABSENT in (size, attempts, tls_failures, file_size, envid) \
            or type(warned) is not bool or type(requiretls) is not bool \
            or type(tls_required_no) is not bool or type(smtputf8) is not bool \
            or (requiretls and tls_required_no) \
            or not (ret is None or ret in RET_VALUES) \
            or not (tls_override is None or tls_override in TLS_OVERRIDES) \
            or type(client) is not dict \
            or not all(type(v) is str for v in client.values()) \
            or type(rcpts) is not list or not rcpts:
        return None
    recipients = tuple(_fast_recipient(r) for r in rcpts)
    last_outcome = _fast_outcome(get("last_outcome"))
    if _ABSENT in recipients or last_outcome is _ABSENT:
        return None
    return Envelope(
        queue_id=queue_id, sender=sender, recipients=recipients, arrival=arrival, size=size,
        client=dict(client), attempts=attempts, next_attempt=next_attempt,
        last_outcome=last_outcome, warned=warned, ret=ret, envid=envid,
        tls_failures=tls_failures, tls_override=tls_override, requiretls=requiretls,
        tls_required_no=tls_required_no, smtputf8=smtputf8, file_size=file_size)


def _load(raw: dict[str, Any]) -> Envelope:
    fast = _fast_load(raw)
    return fast if fast is not None else _load_fields(raw)


def _load_fields(raw: dict[str, Any]) -> Envelope:
    """L{_load} field by field, each mistake an L{EnvelopeError} naming it."""
    f = _Fields(raw, "envelope", ENVELOPE_FIELDS)
    queue_id = f.string("queue_id")
    if not is_queue_id(queue_id):
        raise EnvelopeError(f"envelope.queue_id: {queue_id[:80]!r} is not a queue id")
    recipients = tuple(_load_recipient(r, f"recipients[{i}]")
                       for i, r in enumerate(f.array("recipients")))
    if not recipients:
        raise EnvelopeError("envelope.recipients: no recipients")
    client = f.object("client", {})
    for key, value in client.items():
        if not isinstance(value, str):
            raise EnvelopeError(f"envelope.client.{key[:40]}: expected a string, "
                                f"got {_kind(value)}")
    if f.boolean("requiretls") and f.boolean("tls_required_no"):
        raise EnvelopeError("envelope: requiretls and tls_required_no exclude each other "
                            "(RFC 8689 4.1: with REQUIRETLS the header is ignored)")
    return Envelope(
        queue_id=queue_id,
        sender=f.string("sender"),
        recipients=recipients,
        arrival=f.number("arrival"),
        size=f.integer("size", 0),
        client=dict(client),
        attempts=f.integer("attempts", 0),
        next_attempt=f.number("next_attempt", 0.0),
        last_outcome=_load_outcome(f.get("last_outcome", None), "envelope.last_outcome"),
        warned=f.boolean("warned"),
        ret=f.choice("ret", RET_VALUES),
        envid=f.string("envid", None),
        tls_failures=f.integer("tls_failures", 0),
        tls_override=f.choice("tls_override", TLS_OVERRIDES),
        requiretls=f.boolean("requiretls"),
        tls_required_no=f.boolean("tls_required_no"),
        smtputf8=f.boolean("smtputf8"),
        file_size=f.integer("file_size", 0),
    )


class MessageGone(Exception):
    """
    The queue file of an entry vanished (deleted by an operator, or by a
    crash recovery): there is nothing left to deliver.
    """


@attrs.frozen
class DeliveryRequest:
    """
    One attempt at some recipients of one queued message, as the queue
    manager hands it to a delivery target.
    """

    envelope: Envelope
    path: str  # the queue file (envelope header, then the message)
    indexes: tuple[int, ...]  # the recipients, by position in the envelope
    now: float
    recovering: bool = False  # loaded at start-up: a copy may already be delivered

    @property
    def recipients(self) -> tuple[Recipient, ...]:
        return tuple(self.envelope.recipients[i] for i in self.indexes)
