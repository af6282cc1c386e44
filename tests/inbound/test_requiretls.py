"""
REQUIRETLS and "TLS-Required: No" on the way in (RFC 8689 2, 4.1): the EHLO
keyword only inside TLS, the MAIL parameter only there and without a value,
the envelope tagged from the parameter or the header, and the tag kept
through aliases and the spool.
"""

from twisted.trial.unittest import SynchronousTestCase

from tests.support import FakeTLSTransport, ServerHarness
from twisted_mta.inbound.data import DataReader
from twisted_mta.model import Envelope, EnvelopeError, Recipient, tls_required_no, \
    tls_required_values


def tls_session(testcase, **kw) -> ServerHarness:
    """A session after STARTTLS and a new EHLO."""
    h = ServerHarness(testcase, tls_context=object(), transport_factory=FakeTLSTransport, **kw)
    h.ehlo()
    h.send("STARTTLS\r\n")
    h.protocol.handshakeCompleted()
    return h


class AdvertiseTests(SynchronousTestCase):
    def test_not_before_tls(self):
        """EHLO in cleartext (STARTTLS offered) does not list REQUIRETLS."""
        h = ServerHarness(self, tls_context=object(), transport_factory=FakeTLSTransport)
        lines = h.ehlo()
        self.assertIn("250 STARTTLS", lines)
        self.assertFalse(any("REQUIRETLS" in line for line in lines), lines)

    def test_after_starttls(self):
        """EHLO after STARTTLS lists REQUIRETLS (and no longer STARTTLS)."""
        h = tls_session(self)
        lines = h.ehlo()
        self.assertTrue(any(line[4:] == "REQUIRETLS" for line in lines), lines)
        self.assertFalse(any("STARTTLS" in line for line in lines), lines)

    def test_implicit_tls(self):
        """A session that is TLS from the first byte (port 465 style) lists it at once."""
        h = ServerHarness(self, tls_context=object(), transport_factory=FakeTLSTransport)
        h.protocol.tls_active = True
        self.assertTrue(any(line[4:] == "REQUIRETLS" for line in h.ehlo()))


class MailParameterTests(SynchronousTestCase):
    # (over TLS, MAIL arguments, the reply's first 9 characters)
    TABLE = [
        (False, "MAIL FROM:<s@remote.test> REQUIRETLS", "530 5.7.10"),
        (False, "MAIL FROM:<s@remote.test> REQUIRETLS=yes", "501 5.5.4"),
        (True, "MAIL FROM:<s@remote.test> REQUIRETLS", "250 2.1.0"),
        (True, "MAIL FROM:<s@remote.test> requiretls", "250 2.1.0"),
        (True, "MAIL FROM:<s@remote.test> REQUIRETLS=yes", "501 5.5.4"),
        (True, "MAIL FROM:<s@remote.test> REQUIRETLS=", "501"),  # not even a parameter
        (True, "MAIL FROM:<> REQUIRETLS", "250 2.1.0"),
        (True, "MAIL FROM:<s@remote.test> SIZE=100 REQUIRETLS BODY=8BITMIME", "250 2.1.0"),
    ]

    def test_table(self):
        """REQUIRETLS is accepted only inside TLS and only without a value; each row's reply."""
        for tls, command, expected in self.TABLE:
            if tls:
                h = tls_session(self)
            else:
                h = ServerHarness(self, tls_context=object(), transport_factory=FakeTLSTransport)
            h.ehlo()
            lines = h.send(command + "\r\n")
            self.assertEqual(lines[0][:len(expected)], expected, (tls, command, lines))

    def test_cleartext_words(self):
        """The cleartext refusal says in plain words what to do."""
        h = ServerHarness(self, tls_context=object(), transport_factory=FakeTLSTransport)
        h.ehlo()
        self.assertEqual(h.send("MAIL FROM:<s@remote.test> REQUIRETLS\r\n"), [
            "530 5.7.10 REQUIRETLS is only accepted over TLS: issue STARTTLS first"])


MESSAGE = b"Subject: t\r\n%s\r\nbody\r\n.\r\n"


class TaggingTests(SynchronousTestCase):
    def transaction(self, mail: str, headers: bytes, rcpt: str = "alice@example.test",
                    **kw) -> Envelope:
        h = tls_session(self, **kw)
        h.ehlo()
        self.assertEqual(h.send(f"MAIL FROM:<s@remote.test>{mail}\r\n")[0][:3], "250")
        self.assertEqual(h.send(f"RCPT TO:<{rcpt}>\r\n")[0][:3], "250")
        self.assertEqual(h.send("DATA\r\n")[0][:3], "354")
        lines = h.send(MESSAGE % headers)
        self.assertEqual(lines[0][:3], "250", lines)
        self.h = h
        return h.queued[-1]

    # (MAIL parameters, header fields, requiretls, tls_required_no)
    TABLE = [
        ("", b"", False, False),
        (" REQUIRETLS", b"", True, False),
        ("", b"TLS-Required: No\r\n", False, True),
        ("", b"tls-required:   nO  \r\n", False, True),
        ("", b"TLS-Required:\r\n No\r\n", False, True),  # folded
        ("", b"TLS-Required: Yes\r\n", False, False),
        ("", b"TLS-Required: No thanks\r\n", False, False),
        ("", b"TLS-Required: No\r\nTLS-Required: No\r\n", False, False),  # exactly one
        ("", b"X-TLS-Required: No\r\n", False, False),
        (" REQUIRETLS", b"TLS-Required: No\r\n", True, False),  # the header is ignored
    ]

    def test_table(self):
        """The envelope's tags from the MAIL parameter and the TLS-Required header, row by row; the spool's copy agrees."""
        for mail, headers, requiretls, no in self.TABLE:
            env = self.transaction(mail, headers)
            self.assertEqual((env.requiretls, env.tls_required_no), (requiretls, no),
                             (mail, headers))
            # The entry as recovered from its queue file alone (no state yet).
            stored = self.h.spool.load(env.queue_id)
            self.assertEqual((stored.requiretls, stored.tls_required_no), (requiretls, no),
                             (mail, headers))

    def test_header_in_body_does_not_count(self):
        """A "TLS-Required: No" line in the body is not a header field."""
        env = self.transaction("", b"\r\nTLS-Required: No")
        self.assertFalse(env.tls_required_no)

    def test_header_kept_in_message(self):
        """With REQUIRETLS the header is ignored but relayed as it came (RFC 8689 4.1 MAY)."""
        self.transaction(" REQUIRETLS", b"TLS-Required: No\r\n")
        self.assertIn(b"TLS-Required: No\r\n", self.h.queued_messages()[-1])


class EnvelopeTests(SynchronousTestCase):
    def envelope(self, **kw) -> Envelope:
        return Envelope(queue_id="ABC", sender="a@x.test",
                        recipients=(Recipient("b@y.test"),), arrival=1.0, **kw)

    def test_round_trip(self):
        """Both tags survive JSON and the envelope header; untagged envelopes write neither field."""
        for kw in ({}, {"requiretls": True}, {"tls_required_no": True}):
            env = self.envelope(**kw)
            self.assertEqual(Envelope.from_json(env.to_json()), env)
        self.assertNotIn(b"requiretls", self.envelope().to_json())
        self.assertNotIn(b"tls_required_no", self.envelope().to_json())

    def test_old_envelope_loads_untagged(self):
        """An envelope written before the fields existed loads with both False."""
        raw = (b'{"version": 1, "queue_id": "ABC", "sender": "", "arrival": 1.0, '
               b'"recipients": [{"address": "b@y.test", "state": "pending"}]}')
        env = Envelope.from_json(raw)
        self.assertEqual((env.requiretls, env.tls_required_no), (False, False))

    def test_bad_values(self):
        """A tag that is not true/false, or both tags at once, is an EnvelopeError."""
        base = (b'{"version": 1, "queue_id": "ABC", "sender": "", "arrival": 1.0, '
                b'"recipients": [{"address": "b@y.test", "state": "pending"}], ')
        for extra in (b'"requiretls": "yes"}', b'"tls_required_no": 1}',
                      b'"requiretls": true, "tls_required_no": true}'):
            self.assertRaises(EnvelopeError, Envelope.from_json, base + extra)


class HeaderFunctionTests(SynchronousTestCase):
    def test_values(self):
        """tls_required_values unfolds, stops at the end of the header section, and ignores other fields."""
        text = (b"Subject: x\r\nTLS-Required: \r\n\tNo\r\nX-TLS-Required: no\r\n\r\n"
                b"TLS-Required: no\r\n")
        self.assertEqual(tls_required_values(text), [b"No"])
        self.assertTrue(tls_required_no(tls_required_values(text)))
        self.assertFalse(tls_required_no([]))
        self.assertFalse(tls_required_no([b"no", b"no"]))

    def test_reader_keeps_at_most_two(self):
        """The DATA reader keeps no more than two TLS-Required values, whatever a message holds."""
        out = []
        r = DataReader(out.append, max_size=10 ** 7, max_line=1000, max_received=100,
                       bare_newline="reject")
        r.feed(b"TLS-Required: No\r\n" * 1000 + b"\r\nbody\r\n.\r\n")
        self.assertEqual(r.tls_required, [b"No", b"No"])
