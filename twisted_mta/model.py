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


def from_header(data: bytes) -> tuple["Envelope", int]:
    """
    Parse the envelope header at the start of C{data} (which must hold all
    of it); return the envelope and the offset where the message starts.
    """
    end = header_end(data)
    if end < 0:
        raise EnvelopeError("the envelope header is incomplete")
    value = data[len(HEADER_NAME) + 2:end]
    try:
        raw = base64.b64decode(b"".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise EnvelopeError(f"envelope header is not base64: {e}")
    return Envelope.from_json(raw), end


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
        if compact:
            return json.dumps(_dump(self), sort_keys=True, separators=(",", ":")).encode("utf-8")
        return json.dumps(_dump(self), sort_keys=True, indent=1).encode("utf-8")

    def to_header(self) -> bytes:
        """
        The envelope as a folded header field, to start the queue file:
        base64 of compact JSON in lines of 76, so the file stays a valid
        RFC 5322 message that any Maildir reader can open.
        """
        raw = json.dumps(_dump(self), sort_keys=True, separators=(",", ":")).encode("utf-8")
        b64 = base64.b64encode(raw)
        lines = [b64[i:i + 76] for i in range(0, len(b64), 76)]
        return HEADER_NAME + b": " + b"\r\n\t".join(lines) + b"\r\n"

    @classmethod
    def from_json(cls, data: bytes) -> "Envelope":
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise EnvelopeError(f"not JSON: {e}")
        if not isinstance(raw, dict):
            raise EnvelopeError("not a JSON object")
        version = raw.get("version")
        if version != ENVELOPE_VERSION:
            raise EnvelopeError(f"unsupported envelope version {version!r}")
        try:
            return _load(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise EnvelopeError(f"malformed envelope: {e!r}")


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


def _load_outcome(raw: Any) -> Outcome | None:
    if raw is None:
        return None
    remote = raw.get("remote_mta")
    return Outcome(code=int(raw["code"]), enhanced=str(raw["enhanced"]), text=str(raw["text"]),
                   remote_mta=None if remote is None else str(remote),
                   dsn_passed=bool(raw.get("dsn_passed", False)), kind=raw.get("kind"),
                   policy=raw.get("policy"), final_text=raw.get("final_text"))


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
        "recipients": [
            {
                "address": r.address,
                "original": r.original,
                "state": r.state,
                "outcome": _dump_outcome(r.outcome),
                "done_at": r.done_at,
                **({"notify": list(r.notify)} if r.notify is not None else {}),
                **({"orcpt": r.orcpt} if r.orcpt is not None else {}),
            }
            for r in env.recipients
        ],
    }


def _load(raw: dict[str, Any]) -> Envelope:
    recipients = []
    for r in raw["recipients"]:
        state = r["state"]
        if state not in STATES:
            raise ValueError(f"unknown recipient state {state!r}")
        recipients.append(
            Recipient(
                address=str(r["address"]),
                original=r.get("original"),
                state=state,
                outcome=_load_outcome(r.get("outcome")),
                done_at=r.get("done_at"),
                notify=None if r.get("notify") is None else tuple(str(v) for v in r["notify"]),
                orcpt=r.get("orcpt"),
            )
        )
    if not recipients:
        raise ValueError("no recipients")
    return Envelope(
        queue_id=str(raw["queue_id"]),
        sender=str(raw["sender"]),
        recipients=tuple(recipients),
        arrival=float(raw["arrival"]),
        size=int(raw.get("size", 0)),
        client={str(k): str(v) for k, v in raw.get("client", {}).items()},
        attempts=int(raw.get("attempts", 0)),
        next_attempt=float(raw.get("next_attempt", 0.0)),
        last_outcome=_load_outcome(raw.get("last_outcome")),
        warned=bool(raw.get("warned", False)),
        ret=raw.get("ret"),
        envid=raw.get("envid"),
        tls_failures=int(raw.get("tls_failures", 0)),
        tls_override=raw.get("tls_override"),
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
