"""
The outbound client and international mail: SMTPUTF8 passed on to servers
that offer it, refused (5.6.7, 5.6.9) for those that do not, UTF-8 domains
sent as A-labels where that suffices; 8-bit mail converted to 7 bits for a
server without 8BITMIME, or bounced with the reason when it is signed.
"""

from __future__ import annotations

import email
import email.policy
import os

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from tests.outbound.test_client import Session
from twisted_mta.outbound.client import Transaction
from twisted_mta.outbound.message import OutgoingMessage, stuff

UTF8_EHLO = (b"250-mx.peer.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
             b"250 ENHANCEDSTATUSCODES\r\n")
PLAIN_EHLO = b"250-mx.peer.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
SEVEN_BIT_EHLO = b"250-mx.peer.test\r\n250 PIPELINING\r\n"

ASCII_HEADER = "Subject: hello\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGrüße\r\n"
UTF8_HEADER = "Subject: Grüße\r\n\r\nbody\r\n"


def message(testcase, text: str) -> OutgoingMessage:
    body = text.encode("utf-8")
    path = testcase.mktemp()
    with open(path, "wb") as f:
        f.write(b"X-Envelope: ignored\r\n" + body)
    head = body.split(b"\r\n\r\n")[0]
    return OutgoingMessage(path=path, offset=len(b"X-Envelope: ignored\r\n"), size=len(body),
                           eight_bit=not body.isascii(), data=stuff(body), body=body,
                           header_eight_bit=not head.isascii())


def send(s: Session, txn: Transaction) -> list:
    results: list = []
    s.client.send(txn).addCallback(results.append)
    return results


class SMTPUTF8Tests(SynchronousTestCase):
    def test_passed_on(self):
        """To a server with SMTPUTF8, MAIL carries it and the UTF-8 addresses go as they are."""
        s = Session(self)
        s.establish(UTF8_EHLO)
        results = send(s, Transaction("jösé@x.test", ("用户@例子.test",),
                                      message(self, UTF8_HEADER), smtputf8=True))
        self.assertEqual(s.sent()[:2], ["MAIL FROM:<jösé@x.test> BODY=8BITMIME SMTPUTF8".encode(),
                                        "RCPT TO:<用户@例子.test>".encode()])
        s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        s.feed(b"250 2.0.0 queued\r\n")
        self.assertEqual(results[0]["用户@例子.test"].code, 250)

    def test_not_flagged_no_parameter(self):
        """A message without the flag goes without SMTPUTF8 even where it is offered."""
        s = Session(self)
        s.establish(UTF8_EHLO)
        send(s, Transaction("a@x.test", ("b@peer.test",), message(self, ASCII_HEADER)))
        self.assertEqual(s.sent()[0], b"MAIL FROM:<a@x.test> BODY=8BITMIME")

    # (sender, recipients, message, {recipient: (code, enhanced) or None when sent},
    #  the commands expected on the wire (None: nothing sent))
    REFUSALS = [
        ("jösé@x.test", ("b@peer.test",), ASCII_HEADER,
         {"b@peer.test": (553, "5.6.7")}, None),
        ("a@x.test", ("b@peer.test",), UTF8_HEADER,
         {"b@peer.test": (554, "5.6.9")}, None),
        ("a@x.test", ("jörg@peer.test", "b@peer.test"), ASCII_HEADER,
         {"jörg@peer.test": (553, "5.6.7"), "b@peer.test": None},
         [b"MAIL FROM:<a@x.test> BODY=8BITMIME", b"RCPT TO:<b@peer.test>", b"DATA"]),
        # A UTF-8 domain with an ASCII local part goes as its A-label.
        ("a@bücher.test", ("b@例子.test",), ASCII_HEADER,
         {"b@例子.test": None},
         [b"MAIL FROM:<a@xn--bcher-kva.test> BODY=8BITMIME", b"RCPT TO:<b@xn--fsqu00a.test>",
          b"DATA"]),
    ]

    def test_refusals_without_smtputf8(self):
        """Each row, to a server with 8BITMIME and without SMTPUTF8."""
        for sender, rcpts, text, expected, wire in self.REFUSALS:
            s = Session(self)
            s.establish(PLAIN_EHLO)
            results = send(s, Transaction(sender, rcpts, message(self, text), smtputf8=True))
            sent = s.sent()
            if wire is None:
                self.assertEqual(sent, [], sender)
                got = results[0]
            else:
                self.assertEqual(sent, wire, sender)
                s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
                s.feed(b"250 2.0.0 queued\r\n")
                got = results[0]
            for rcpt, code in expected.items():
                if code is None:
                    self.assertEqual(got[rcpt].code, 250, rcpt)
                else:
                    self.assertEqual((got[rcpt].code, got[rcpt].enhanced), code, rcpt)
                    self.assertIn("no SMTPUTF8", got[rcpt].text)
                    self.assertIn(got[rcpt].kind, ("smtputf8-address", "smtputf8-header"))


class DowngradeTests(SynchronousTestCase):
    def test_converted(self):
        """
        To a server without 8BITMIME, the 8-bit message goes as 7-bit MIME
        (no BODY=8BITMIME, SIZE of the converted copy) and decodes back to
        the original text.
        """
        s = Session(self)
        s.establish(b"250-mx.peer.test\r\n250-PIPELINING\r\n250 SIZE 100000\r\n")
        results = send(s, Transaction("a@x.test", ("b@peer.test",), message(self, ASCII_HEADER)))
        sent = s.sent()
        self.assertTrue(sent[0].startswith(b"MAIL FROM:<a@x.test> SIZE="), sent)
        self.assertNotIn(b"8BITMIME", sent[0])
        data = b"\r\n".join(s.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")) + b"\r\n"
        self.assertTrue(data.isascii())
        self.assertTrue(data.endswith(b"\r\n.\r\n"), data)
        self.assertEqual(int(sent[0].split(b"SIZE=")[1]), len(data) - 3)
        part = email.message_from_bytes(data[:-3], policy=email.policy.default)
        self.assertEqual(part["Content-Transfer-Encoding"], "quoted-printable")
        self.assertEqual(part.get_payload(decode=True).decode("utf-8"), "Grüße\r\n")
        s.feed(b"250 2.0.0 queued\r\n")
        self.assertEqual(results[0]["b@peer.test"].code, 250)

    def test_signed_bounced(self):
        """A DKIM-signed 8-bit message is not converted: 5.6.2 naming the signature, nothing sent."""
        s = Session(self)
        s.establish(SEVEN_BIT_EHLO)
        signed = "DKIM-Signature: v=1; d=x.test; s=s; bh=a; b=b\r\n" + ASCII_HEADER
        results = send(s, Transaction("a@x.test", ("b@peer.test",), message(self, signed)))
        self.assertEqual(s.sent(), [])
        r = results[0]["b@peer.test"]
        self.assertEqual((r.code, r.enhanced, r.kind), (554, "5.6.2", "8bit-signed"))
        self.assertIn("DKIM-signed", r.text)
        self.assertIn("no 8BITMIME", r.text)
        self.assertTrue(s.client.ready)  # the session stays usable

    def test_unconvertible_bounced(self):
        """An 8-bit From: cannot be converted: 5.6.3 naming the field."""
        s = Session(self)
        s.establish(SEVEN_BIT_EHLO)
        results = send(s, Transaction("a@x.test", ("b@peer.test",),
                                      message(self, "From: Jürgen <j@x.test>\r\n\r\nx\r\n")))
        r = results[0]["b@peer.test"]
        self.assertEqual((r.code, r.enhanced, r.kind), (554, "5.6.3", "8bit-unconvertible"))
        self.assertIn("header field From", r.text)

    def test_connection_lost_during_conversion(self):
        """The connection breaks while the I/O pool converts: a temporary outcome, nothing sent after."""
        pending = defer.Deferred()
        calls = []

        def run_blocking(f, *args):
            calls.append((f, args))
            return pending

        s = Session(self, run_blocking=run_blocking)
        s.establish(SEVEN_BIT_EHLO)
        msg = message(self, ASCII_HEADER)
        results = send(s, Transaction("a@x.test", ("b@peer.test",), msg))
        s.lose()
        self.assertEqual(results[0]["b@peer.test"].code // 100, 4)
        f, args = calls[0]
        pending.callback(f(*args))  # the conversion finishes late
        self.assertEqual(s.sent(), [])


class RoutingTests(SynchronousTestCase):
    def test_u_label_domain_routed_by_a_label(self):
        """
        Recipients in a UTF-8 domain go to the next hop of its A-label (the
        name the MX lookup, smarthost table and TLS policy use), together
        with those written as the A-label.
        """
        from twisted_mta.outbound.router import next_hops
        hops = next_hops(["a@例子.test", "b@XN--FSQU00A.test", "c@bücher.test"])
        self.assertEqual({hop.domain: addrs for hop, addrs in hops.items()},
                         {"xn--fsqu00a.test": ("a@例子.test", "b@XN--FSQU00A.test"),
                          "xn--bcher-kva.test": ("c@bücher.test",)})

    def test_domain_of_is_a_label(self):
        """The domain the TLS decisions and reports name is the A-label too."""
        from twisted_mta.outbound.attempt import domain_of
        from twisted_mta.outbound.router import next_hops
        [(hop, addrs)] = next_hops(["a@例子.test"]).items()
        txn = Transaction("s@x.test", addrs, None)
        self.assertEqual(domain_of(txn, hop), "xn--fsqu00a.test")


class ConversionWaitTests(SynchronousTestCase):
    def test_unexpected_reply_while_converting(self):
        """
        A reply while the message is being converted (nothing was sent):
        a protocol error for the transaction, not a crash, and nothing is
        sent when the conversion ends.
        """
        pending = defer.Deferred()
        calls = []

        def run_blocking(f, *args):
            calls.append((f, args))
            return pending

        s = Session(self, run_blocking=run_blocking)
        s.establish(SEVEN_BIT_EHLO)
        results = send(s, Transaction("a@x.test", ("b@peer.test",),
                                      message(self, ASCII_HEADER)))
        s.feed(b"250 surprise\r\n")
        r = results[0]["b@peer.test"]
        self.assertEqual((r.code, r.kind), (451, "protocol-error"))
        self.assertIn("unexpected reply", r.text)
        f, args = calls[0]
        pending.callback(f(*args))
        self.assertNotIn(b"MAIL", b"".join(s.sent()))


class ConversionBugTests(SynchronousTestCase):
    def test_bug_in_conversion(self):
        """
        An unexpected error while converting is logged with its traceback
        and defers the recipients (4.3.0); nothing is sent.
        """
        from twisted_mta.outbound import message as outgoing

        def broken(_):
            raise RuntimeError("boom")

        self.patch(outgoing, "seven_bit", broken)
        s = Session(self)
        s.establish(SEVEN_BIT_EHLO)
        results = send(s, Transaction("a@x.test", ("b@peer.test",), message(self, ASCII_HEADER)))
        r = results[0]["b@peer.test"]
        self.assertEqual((r.code, r.enhanced), (451, "4.3.0"))
        self.assertIn("could not convert the message to 7 bits: boom", r.text)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(s.sent(), [])
