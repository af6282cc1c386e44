"""
Tests for SMTP AUTH (RFC 4954) on the inbound server: only inside TLS, PLAIN
and LOGIN, failures rate-limited, authenticated relay, submission rules.
"""

import base64

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.inbound.server import AuthFailureLimiter
from twisted_mta.users import UserDatabase, hash_password
from tests.support import FakeTLSTransport, ServerHarness

MSG = b"Subject: test\r\n\r\nbody\r\n.\r\n"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


PLAIN_OK = b64(b"\x00alice\x00s3cret")
PLAIN_BAD = b64(b"\x00alice\x00wrong")


class AuthTests(SynchronousTestCase):
    def harness(self, role="submission", tls=True, **sections):
        users = UserDatabase(path="test", users={"alice": hash_password("s3cret", log_n=4)})
        h = ServerHarness(self, role=role, tls_context=object(), transport_factory=FakeTLSTransport,
                          users=users, **sections)
        h.ehlo()
        if tls:
            h.send("STARTTLS\r\n")
            h.protocol.handshakeCompleted()
        return h

    def test_not_offered_before_tls(self):
        """AUTH is not advertised before TLS, and AUTH before TLS is 538 5.7.11."""
        h = self.harness(tls=False)
        self.assertFalse(any("AUTH" in line for line in h.ehlo()))
        self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_OK}\r\n"),
                         ["538 5.7.11 Encryption required for requested authentication mechanism"])

    def test_offered_after_tls(self):
        """After STARTTLS, EHLO offers AUTH PLAIN LOGIN."""
        h = self.harness()
        self.assertEqual([line[4:] for line in h.ehlo() if "AUTH" in line], ["AUTH PLAIN LOGIN"])

    def test_plain_success(self):
        """AUTH PLAIN with an initial response: 235 2.7.0; a second AUTH is 503."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_OK}\r\n"), ["235 2.7.0 Authentication successful"])
        self.assertEqual(h.protocol.user, "alice")
        self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_OK}\r\n"), ["503 5.5.1 Already authenticated"])

    def test_plain_in_two_steps(self):
        """AUTH PLAIN without initial response gets an empty 334 challenge."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send("AUTH PLAIN\r\n"), ["334 "])
        self.assertEqual(h.send(PLAIN_OK + "\r\n"), ["235 2.7.0 Authentication successful"])

    def test_login(self):
        """AUTH LOGIN asks for Username: and Password: in base64, then 235."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send("AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"])
        self.assertEqual(h.send(b64(b"alice") + "\r\n"), ["334 UGFzc3dvcmQ6"])
        self.assertEqual(h.send(b64(b"s3cret") + "\r\n"), ["235 2.7.0 Authentication successful"])

    def test_wrong_password(self):
        """A wrong password is 535 5.7.8 and the session goes on."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_BAD}\r\n"), ["535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(h.send("NOOP\r\n"), ["250 2.0.0 Ok"])

    def test_cancel_and_bad_base64(self):
        """'*' cancels with 501 5.0.0; a response that is not base64 is 501 5.5.2."""
        h = self.harness()
        h.ehlo()
        h.send("AUTH PLAIN\r\n")
        self.assertEqual(h.send("*\r\n"), ["501 5.0.0 Authentication cancelled"])
        self.assertEqual(h.send("AUTH PLAIN ***\r\n"), ["501 5.5.2 Cannot decode the response (base64)"])

    def test_malformed_plain(self):
        """A PLAIN response without the NUL separators fails cleanly with 535."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send(f"AUTH PLAIN {b64(b'alice:s3cret')}\r\n"),
                         ["535 5.7.8 Authentication credentials invalid"])
        self.assertEqual(h.send("AUTH PLAIN =\r\n")[0][:3], "535")

    def test_unknown_mechanism_and_syntax(self):
        """An unknown mechanism is 504; AUTH alone is 501."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send("AUTH CRAM-MD5\r\n"), ["504 5.5.4 Unrecognized authentication mechanism"])
        self.assertEqual(h.send("AUTH\r\n"), ["501 5.5.4 Syntax: AUTH mechanism [initial-response]"])

    def test_auth_inside_transaction(self):
        """AUTH after MAIL FROM is 503 (on the mx role, where MAIL needs no AUTH)."""
        h = self.harness(role="mx")
        h.ehlo()
        h.send("MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_OK}\r\n"),
                         ["503 5.5.1 AUTH not allowed during a mail transaction"])

    def test_failures_rate_limited(self):
        """After max_failures failed attempts the client is disconnected with 421, and a new connection is refused too."""
        h = self.harness(auth={"max_failures": 3})
        h.ehlo()
        for _ in range(2):
            self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_BAD}\r\n")[0][:3], "535")
        self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_BAD}\r\n"), [
            "535 5.7.8 Authentication credentials invalid",
            "421 4.7.0 Too many failed authentication attempts, try again later"])
        self.assertTrue(h.transport.disconnecting)
        self.assertIn("421 4.7.0 Too many failed authentication attempts, try again later",
                      self.auth_on_new_connection(h))
        h.clock.advance(601)
        self.assertIn("235 2.7.0 Authentication successful", self.auth_on_new_connection(h))

    def auth_on_new_connection(self, h):
        """A new session from the same address: EHLO, STARTTLS, EHLO, AUTH; its replies."""
        proto, transport = h.connect()
        h.read(transport)
        proto.dataReceived(b"EHLO c\r\nSTARTTLS\r\n")
        proto.handshakeCompleted()
        h.read(transport)
        proto.dataReceived(f"EHLO c\r\nAUTH PLAIN {PLAIN_OK}\r\n".encode())
        return h.read(transport)

    def test_submission_requires_auth(self):
        """On submission, MAIL without AUTH is 530 5.7.0; after AUTH the user may relay."""
        h = self.harness()
        h.ehlo()
        self.assertEqual(h.send("MAIL FROM:<alice@example.test>\r\n"), ["530 5.7.0 Authentication required"])
        h.send(f"AUTH PLAIN {PLAIN_OK}\r\n")
        self.assertEqual(h.send("MAIL FROM:<alice@example.test>\r\n"), ["250 2.1.0 Sender ok"])
        self.assertEqual(h.send("RCPT TO:<someone@elsewhere.test>\r\n"), ["250 2.1.5 Recipient ok"])
        h.send("DATA\r\n")
        h.send(MSG)
        self.assertIn(b" with ESMTPSA id ", h.queued_messages()[0])

    def test_unauthenticated_relay_refused(self):
        """Without AUTH, relaying from outside the trusted networks stays refused (mx role)."""
        h = self.harness(role="mx")
        h.ehlo()
        h.send("MAIL FROM:<a@remote.test>\r\n")
        self.assertEqual(h.send("RCPT TO:<x@elsewhere.test>\r\n")[0][:9], "550 5.7.1")

    def test_sender_login_match(self):
        """With sender_login_match, an authenticated user may only send as their own address."""
        h = self.harness(auth={"sender_login_match": True})
        h.ehlo()
        h.send(f"AUTH PLAIN {PLAIN_OK}\r\n")
        self.assertEqual(h.send("MAIL FROM:<bob@example.test>\r\n"),
                         ["553 5.7.1 <bob@example.test>: sender address not owned by user alice"])
        self.assertEqual(h.send("MAIL FROM:<alice@example.org>\r\n"), ["250 2.1.0 Sender ok"])

    def test_no_auth_without_users_file(self):
        """Without a users file AUTH is neither offered nor understood."""
        h = ServerHarness(self, tls_context=object(), transport_factory=FakeTLSTransport)
        h.ehlo()
        h.send("STARTTLS\r\n")
        h.protocol.handshakeCompleted()
        self.assertFalse(any("AUTH" in line for line in h.ehlo()))
        self.assertEqual(h.send(f"AUTH PLAIN {PLAIN_OK}\r\n"), ["500 5.5.1 Command unrecognized"])


# The AUTH-failure limiter on its own: (what, (max_failures, window,
# max_addresses), script).  Script steps: "fail IP" counts a failure, "wait S"
# advances the clock, "blocked IP" / "free IP" check, "entries N" checks the
# number of addresses held.
LIMITER_TABLE = [
    ("below the limit is free", (3, 600, 10),
     ["fail a", "fail a", "free a", "entries 1"]),
    ("the limit blocks", (3, 600, 10),
     ["fail a", "fail a", "fail a", "blocked a", "free b"]),
    ("a repeat offender is still blocked just inside the window", (3, 600, 10),
     ["fail a", "fail a", "fail a", "wait 599", "blocked a"]),
    ("failures expire after the window", (3, 600, 10),
     ["fail a", "fail a", "fail a", "wait 600", "free a", "entries 0"]),
    ("the window slides: the oldest failure leaves first", (3, 600, 10),
     ["fail a", "wait 300", "fail a", "fail a", "blocked a", "wait 300", "free a",
      "fail a", "blocked a"]),
    ("an address never seen again is dropped on the next insert", (3, 600, 10),
     ["fail a", "wait 600", "fail b", "entries 1"]),
    ("when full, the address with the oldest last failure is dropped", (2, 600, 2),
     ["fail a", "fail a", "fail b", "fail c", "entries 2", "free a", "fail a", "free a"]),
    ("a repeat offender stays blocked until max_addresses newer ones push it out", (3, 600, 3),
     ["fail a", "fail a", "fail b", "fail a", "fail c", "entries 3", "blocked a",
      "fail d", "blocked a", "fail e", "entries 3", "free a"]),
    ("per address only max_failures times are kept", (2, 600, 10),
     ["fail a"] * 1000 + ["blocked a", "wait 600", "free a"]),
]


class AuthFailureLimiterTests(SynchronousTestCase):
    def test_table(self):
        """Each row of LIMITER_TABLE: blocked or free, and how many addresses are held, as the clock moves."""
        for what, (max_failures, window, max_addresses), script in LIMITER_TABLE:
            clock = Clock()
            limiter = AuthFailureLimiter(clock, max_failures, window, max_addresses)
            for n, step in enumerate(script):
                verb, arg = step.split()
                where = f"{what}: step {n} ({step})"
                if verb == "fail":
                    limiter.note_failure(arg)
                elif verb == "wait":
                    clock.advance(float(arg))
                elif verb in ("blocked", "free"):
                    self.assertEqual(limiter.blocked(arg), verb == "blocked", where)
                elif verb == "entries":
                    self.assertEqual(len(limiter), int(arg), where)
                else:
                    self.fail(f"unknown step {step!r}")
            for times in limiter._failures.values():
                self.assertLessEqual(len(times), max_failures, what)

    def test_a_million_addresses_leave_at_most_the_maximum(self):
        """An attacker rotating through 1,000,000 addresses (one IPv6 /64 has plenty) within one window cannot grow the map past max_addresses (10,000); the first ones lost their count."""
        limiter = AuthFailureLimiter(Clock(), 1, 600)
        for i in range(1_000_000):
            limiter.note_failure(f"2001:db8::{i:x}")
        self.assertEqual(len(limiter), 10_000)
        self.assertFalse(limiter.blocked("2001:db8::0"))
        self.assertTrue(limiter.blocked(f"2001:db8::{999_999:x}"))

    def test_the_factory_uses_the_auth_settings(self):
        """The listener's limiter takes max_failures and failure_window from [auth]."""
        h = ServerHarness(self, auth={"max_failures": 7, "failure_window": 60})
        limiter = h.protocol.factory.auth_failures
        self.assertEqual((limiter.max_failures, limiter.window), (7, 60))
