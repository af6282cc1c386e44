"""
What goes between the main process and a sending worker
(L{twisted_mta.outbound.wire}): a transaction and its next hop, outcomes,
observers' events and TLS history entries come out as they went in, and
a line that does not decode raises L{WireError}, never something else.
"""

from __future__ import annotations

import json

import attrs
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta import failures
from twisted_mta.config import OutboundSettings, OutboundTLSSettings, Smarthost
from twisted_mta.model import Outcome
from twisted_mta.outbound import wire
from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound.message import OutgoingMessage, QueuedMessage
from twisted_mta.outbound.router import next_hops
from twisted_mta.tlsrpt.counts import from_event
from twisted_mta.tls.history import HistoryEntry

RELAY = Smarthost(host="relay.example.test", port=2525)
SETTINGS = OutboundSettings(routes=((".routed.test", RELAY),),
                            tls=OutboundTLSSettings(honor_tls_required_no=True))
MESSAGE = OutgoingMessage(path="/var/spool/mta/cur/ABC", offset=40, size=1000,
                          eight_bit=False, data=None, body=b"x" * 10)


class SendTests(SynchronousTestCase):
    def test_hops_and_transactions_round_trip(self) -> None:
        """
        For MX and smarthost hops, with REQUIRETLS and "TLS-Required: No",
        the worker finds the same next hop (the same smarthost) and the
        same transaction but for the message, which it reads from the path.
        """
        cases = [
            (["a@dest.test", "b@dest.test"], False, False, ()),
            (["c@x.routed.test"], False, False, ((("SUCCESS", "DELAY"), "rfc822;c@y.test"),)),
            (["d@dest.test"], True, False, ((None, None),)),
            (["e@dest.test"], False, True, (((), None),)),
            (["f@b\u00fccher.test"], False, False, ()),
        ]
        for addresses, requiretls, no, dsn in cases:
            (hop, addrs), = next_hops(addresses, SETTINGS, requiretls, no).items()
            txn = Transaction("s\u00e9nder@src.test", addrs, MESSAGE, dsn=dsn, ret="HDRS",
                              envid="env 1", queue_id="ABC", age=12.5, attempts=3,
                              tls_failures=1, tls_override="relaxed", requiretls=requiretls,
                              smtputf8=True)
            line = wire.encode_send(hop, txn)
            self.assertNotIn(b"\n", line)
            request = wire.decode_send(line, SETTINGS)
            self.assertEqual(request.hop, hop, addresses)
            self.assertEqual(request.path, MESSAGE.path)
            self.assertEqual(request.transaction(MESSAGE), txn, addresses)

    def test_smarthost_comes_from_the_worker_s_settings(self) -> None:
        (hop, addrs), = next_hops(["c@x.routed.test"], SETTINGS).items()
        line = wire.encode_send(hop, Transaction("s@src.test", addrs, MESSAGE))
        self.assertIsNone(wire.decode_send(line, OutboundSettings()).hop.smarthost)
        self.assertEqual(wire.decode_send(line, SETTINGS).hop.smarthost, RELAY)

    def test_an_unread_message_travels_with_its_lengths(self) -> None:
        """
        A message the main process left unread (L{QueuedMessage}) reaches
        the worker with the lengths its envelope records, which the
        worker checks as it reads it; one the main process read (and
        checked) comes without.
        """
        (hop, addrs), = next_hops(["a@dest.test"], SETTINGS).items()
        queued = QueuedMessage("/var/spool/mta/cur/ABC", 1234, 1000)
        request = wire.decode_send(wire.encode_send(hop, Transaction("s@src.test", addrs, queued)),
                                   SETTINGS)
        self.assertEqual((request.path, request.expect), (queued.path, queued))
        request = wire.decode_send(wire.encode_send(hop, Transaction("s@src.test", addrs,
                                                                    MESSAGE)), SETTINGS)
        self.assertIsNone(request.expect)

    def test_bad_send_lines(self) -> None:
        (hop, addrs), = next_hops(["a@dest.test"], SETTINGS).items()
        good = json.loads(wire.encode_send(hop, Transaction("s@src.test", addrs, MESSAGE)))
        bad_lengths = [json.dumps(dict(good, lengths=value)).encode()
                       for value in ([], [1], "ab", [None, 1], 5)]
        for line in [b"", b"{", b"[]", b'{"hop": 1}', b'{"hop": ["d", false, false]}',
                     *bad_lengths]:
            self.assertRaises(wire.WireError, wire.decode_send, line, SETTINGS)


class OutcomeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        outcomes = {
            "a@dest.test": Outcome(250, "2.0.0", "mx.dest.test said: 250 ok", "mx.dest.test",
                                   dsn_passed=True, kind="reply", where="not sent"),
            "b@dest.test": failures.outcome("sender-ended", why="signal SIGKILL"),
            "c@dest.test": Outcome(451, "4.7.5", "TLS failed", kind="handshake-failed",
                                   policy="verify", final_text="given up: TLS failed"),
        }
        back = wire.decode_outcomes(wire.encode_outcomes(outcomes))
        self.assertEqual(back, outcomes)
        self.assertIsNone(back["a@dest.test"].where)  # the log's own, never sent across

    def test_bad_lines(self) -> None:
        for line in [b"", b"[1]", b'{"a": [250]}', b'{"a": 5}']:
            self.assertRaises(wire.WireError, wire.decode_outcomes, line)


class EventTests(SynchronousTestCase):
    def test_tls_report_event_counts_the_same(self) -> None:
        """A TLS reporting event counts the same after the pipe (lists for tuples)."""
        event = {"time": 1.5, "domain": "dest.test", "policy-type": "sts",
                 "policy-string": ("version: STSv1", "mode: enforce"),
                 "mx-host": ("mx.dest.test",), "result": "certificate-host-mismatch",
                 "failure-reason-code": "name", "receiving-mx-hostname": "mx.dest.test",
                 "receiving-ip": "192.0.2.1"}
        name, back = wire.decode_event(wire.encode_event("tls.result", event))
        self.assertEqual(name, "tls.result")
        self.assertEqual(from_event(back), from_event(event))

    def test_values_json_has_no_type_for_become_text(self) -> None:
        name, back = wire.decode_event(wire.encode_event("tls.shadow", {"x": b"b", "n": None}))
        self.assertEqual(back, {"x": "b'b'", "n": None})

    def test_bad_lines(self) -> None:
        for line in [b"", b"{}", b'["n"]', b'[1, {}]', b'["n", 2]']:
            self.assertRaises(wire.WireError, wire.decode_event, line)


class HistoryTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        entry = HistoryEntry(best="verified", best_at=10.0, failures=2, last_failure=11.0,
                             last_kind="handshake-failed", broken_until=99.0)
        for value in (entry, None):
            self.assertEqual(wire.decode_history(wire.encode_history("dest.test", value)),
                             ("dest.test", value))
        self.assertEqual(attrs.asdict(entry)["best"], "verified")

    def test_bad_lines(self) -> None:
        for line in [b"", b'["d"]', b'["d", {"bogus": 1}]', b'["d", 3]']:
            self.assertRaises(wire.WireError, wire.decode_history, line)
