"""
Sending in a worker process (docs/architecture.md, "Processes"): what
the main process writes down a worker's pipe (one transaction for one
next hop) and what comes back (an outcome for each recipient), one line
of compact JSON each.  The message stays in the spool: the worker reads
it from the queue file's path, as the main process would.

The next hop travels as its domain and tags; the worker finds the same
smarthost in the same configuration (L{OutboundSettings.smarthost_for}).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from twisted_mta.config import OutboundSettings
from twisted_mta.model import Outcome
from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound.message import QueuedMessage
from twisted_mta.outbound.router import NextHop

# Transaction fields that travel as they are (the message does not).
_PLAIN = ("sender", "recipients", "ret", "envid", "queue_id", "age", "attempts",
          "tls_failures", "tls_override", "requiretls", "smtputf8")
_OUTCOME = tuple(f.name for f in attrs.fields(Outcome) if f.name != "where")


class WireError(ValueError):
    """A line from the other process that does not decode."""


@attrs.frozen
class SendRequest:
    """One transaction as the worker received it, before its message is read."""

    hop: NextHop
    path: str  # the queue file
    fields: dict = attrs.field(eq=False)  # the Transaction's other fields
    # The lengths the message's envelope records, checked as it is read
    # (None: the main process read and checked it).
    expect: QueuedMessage | None = None

    def transaction(self, message) -> Transaction:
        return Transaction(message=message, **self.fields)


def encode_send(hop: NextHop, txn: Transaction) -> bytes:
    data: dict[str, Any] = {name: getattr(txn, name) for name in _PLAIN}
    data["dsn"] = [[list(n) if n is not None else None, o] for n, o in txn.dsn]
    data["path"] = txn.message.path
    # The lengths the envelope records, for the worker's check as it reads
    # the message (a message the main process read was checked already).
    data["lengths"] = ([txn.message.file_size, txn.message.size]
                       if isinstance(txn.message, QueuedMessage) else None)
    data["hop"] = [hop.domain, hop.requiretls, hop.tls_required_no]
    return _dumps(data)


def decode_send(line: bytes, settings: OutboundSettings) -> SendRequest:
    try:
        data = json.loads(line)
        domain, requiretls, tls_required_no = data.pop("hop")
        path = data.pop("path")
        lengths = data.pop("lengths", None)
        expect = None if lengths is None else QueuedMessage(path, int(lengths[0]),
                                                            int(lengths[1]))
        fields = {name: data[name] for name in _PLAIN}
        fields["recipients"] = tuple(fields["recipients"])
        fields["dsn"] = tuple((tuple(n) if n is not None else None, o) for n, o in data["dsn"])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise WireError(f"a send request that does not decode: {e}")
    hop = NextHop(domain=domain, smarthost=settings.smarthost_for(domain),
                  requiretls=bool(requiretls), tls_required_no=bool(tls_required_no))
    return SendRequest(hop, path, fields, expect)


def encode_outcomes(outcomes: dict[str, Outcome]) -> bytes:
    return _dumps({address: [getattr(o, name) for name in _OUTCOME]
                   for address, o in outcomes.items()})


def decode_outcomes(line: bytes) -> dict[str, Outcome]:
    try:
        return {address: Outcome(**dict(zip(_OUTCOME, values, strict=True)))
                for address, values in json.loads(line).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise WireError(f"outcomes that do not decode: {e}")


def encode_event(name: str, event: dict) -> bytes:
    """An observer's event (TLS outcomes, shadow verdicts): plain JSON."""
    return _dumps([name, event])


def decode_event(line: bytes) -> tuple[str, dict]:
    try:
        name, event = json.loads(line)
    except (ValueError, TypeError) as e:
        raise WireError(f"an event that does not decode: {e}")
    if not isinstance(name, str) or not isinstance(event, dict):
        raise WireError("an event that does not decode: not a name and a table")
    return name, event


def encode_history(domain: str, entry) -> bytes:
    """A domain's TLS history entry (None: none), as a worker recorded it."""
    return _dumps([domain, attrs.asdict(entry) if entry is not None else None])


def decode_history(line: bytes):
    from twisted_mta.tls.history import HistoryEntry
    try:
        domain, raw = json.loads(line)
        return str(domain), (HistoryEntry(**raw) if raw is not None else None)
    except (ValueError, TypeError) as e:
        raise WireError(f"a TLS history entry that does not decode: {e}")


def encode_json(data) -> bytes:
    return _dumps(data)


def decode_json(line: bytes):
    try:
        return json.loads(line)
    except ValueError as e:
        raise WireError(f"JSON that does not decode: {e}")


def _dumps(data) -> bytes:
    # default=str: an observer's event may carry a value JSON has no type
    # for; its text is what a report or a metric label would show anyway.
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True, default=str).encode(
        "ascii")
