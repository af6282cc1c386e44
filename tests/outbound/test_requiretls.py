"""
REQUIRETLS and "TLS-Required: No" on the way out (RFC 8689 4.2): the
decisions from tables (the MX validated, the end of an attempt), the client
(REQUIRETLS after STARTTLS, the MAIL parameter), and the pool (own
sessions per tag, the permanent failures, what the recipient publishes set
aside for "TLS-Required: No").
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from tests.outbound.test_client import Session, message
from tests.outbound.test_pool import PoolTestBase
from tests.support import make_config
from twisted_mta import failures
from twisted_mta.outbound.attempt import mx_unvalidated, requiretls_choice, requiretls_failure
from twisted_mta.outbound.client import SessionFailed, Transaction
from twisted_mta.outbound.router import NextHop, next_hops
from twisted_mta.tls.failure import TLSFailure
from twisted_mta.tls.policy import Choice, TLSRequirements
from twisted_mta.tls.sts import Policy
from twisted_mta.tls.sts_cache import Lookup


@attrs.frozen
class _MX:
    secure: bool


def _sts(mode: str | None, mx=("mx1.peer.test",)):
    if mode is None:
        return Lookup("peer.test", None, "none")
    return Lookup("peer.test", Policy(mode=mode, max_age=86400, mx=tuple(mx)), "cache")


class MXValidatedTests(SynchronousTestCase):
    # (MX facts (None: DANE off), MTA-STS answer (None: off), host, validated?, words)
    TABLE = [
        (_MX(True), None, "mx1.peer.test", True, None),
        (_MX(True), _sts(None), "mx9.peer.test", True, None),
        (_MX(False), _sts("enforce"), "mx1.peer.test", True, None),
        (_MX(False), _sts("testing"), "mx1.peer.test", True, None),
        (None, _sts("enforce"), "mx1.peer.test", True, None),
        (_MX(False), _sts("enforce"), "mx2.peer.test", False, "does not list mx2.peer.test"),
        (_MX(False), _sts(None), "mx1.peer.test", False, "peer.test has no MTA-STS policy"),
        (_MX(False), None, "mx1.peer.test", False, "not DNSSEC-signed, and MTA-STS is off"),
        (None, None, "mx1.peer.test", False, "DNSSEC validation is off here"),
        (None, _sts("enforce", mx=("*.peer.test",)), "a.b.peer.test", False, "does not list"),
    ]

    def test_table(self):
        """An MX host is validated by a DNSSEC-secure MX answer or by an MTA-STS policy (enforce or testing) that lists it; otherwise the words say what is missing."""
        for mx_facts, sts, host, ok, words in self.TABLE:
            why = mx_unvalidated("peer.test", host, mx_facts, sts)
            self.assertEqual(why is None, ok, (mx_facts, sts, host, why))
            if words:
                self.assertIn(words, why)


def _tls_failed() -> SessionFailed:
    f = TLSFailure("starttls-not-offered", host="mx1.peer.test", address="192.0.2.1", port=25)
    return SessionFailed(failures.tls(f), tls_failure=f)


class AttemptEndTests(SynchronousTestCase):
    UNREACHED = failures.outcome("connect-failed", peer="mx2", why="connection refused")
    REFUSED = failures.outcome("requiretls-unsupported", host="mx1")

    def test_table(self):
        """The end of a REQUIRETLS attempt: a host not reached makes the message wait; else a server without REQUIRETLS (5.7.30); else the TLS failure (for the fallback's hard rule)."""
        tls = _tls_failed()
        for unreached, refused, tls_failed, want in [
                (self.UNREACHED, self.REFUSED, tls, "4.4.1"),
                (None, self.REFUSED, tls, "5.7.30"),
                (None, None, tls, "tls"),
                (None, None, None, "4.4.4")]:
            e = requiretls_failure(unreached, refused, tls_failed, None, "peer.test")
            got = "tls" if e is tls else e.outcome.enhanced
            self.assertEqual(got, want)

    def test_raised_requirements(self):
        """REQUIRETLS raises opportunistic to STARTTLS required and a verified certificate; a DANE choice keeps its TLSA records as the authentication."""
        opp = Choice(TLSRequirements("opportunistic"), "now", "default")
        raised = requiretls_choice(opp).requirements
        self.assertEqual((raised.starttls, raised.verify), ("required", True))
        self.assertIn("REQUIRETLS", requiretls_choice(opp).reason)
        dane = Choice(TLSRequirements("dane", starttls="required", tlsa=("rec",)), "never",
                      "DANE", source="dane")
        self.assertEqual(requiretls_choice(dane).requirements.verify, False)


class RouterTests(SynchronousTestCase):
    def test_tags_on_hops(self):
        """The message's tag goes on every hop; TLS-Required: No only while honoured, and never beside REQUIRETLS."""
        base = make_config(self.mktemp()).outbound
        off = make_config(self.mktemp(), outbound={"tls": {"honor_tls_required_no": False}})
        for settings, requiretls, no, tags in [
                (base, False, False, {None}),
                (base, True, False, {"requiretls"}),
                (base, False, True, {"tls-required-no"}),
                (base, True, True, {"requiretls"}),
                (off.outbound, False, True, {None})]:
            hops = next_hops(["a@x.test", "b@y.test"], settings, requiretls, no)
            self.assertEqual({h.tag for h in hops}, tags)
            self.assertEqual(len(hops), 2)


REQ_EHLO = b"250-mx.peer.test\r\n250-PIPELINING\r\n250-REQUIRETLS\r\n250 SIZE 10000\r\n"


class ClientTests(SynchronousTestCase):
    def starttls(self, s: Session, ehlo: bytes) -> list[bytes]:
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        self.assertEqual(s.feed(b"250-mx.peer.test\r\n250 STARTTLS\r\n"), [b"STARTTLS"])
        s.feed(b"220 go ahead\r\n")
        s.client.tls_done = True  # the fake transport only pretends to encrypt
        return s.feed(ehlo)

    def session(self):
        return Session(self, tls_creator=object(), requiretls=True,
                       requirements=TLSRequirements("strict", starttls="required", verify=True))

    def test_no_requiretls_after_starttls(self):
        """A server that does not list REQUIRETLS after STARTTLS gets QUIT; the session fails with 5.7.30 in plain words, and the next MX may be tried."""
        s = self.session()
        self.assertEqual(self.starttls(s, b"250-mx.peer.test\r\n250 PIPELINING\r\n"), [b"QUIT"])
        [f] = s.failed
        o = f.value.outcome
        self.assertEqual((o.code, o.enhanced, o.kind), (554, "5.7.30", "requiretls-unsupported"))
        self.assertIn("only over verified TLS (REQUIRETLS), and mx.peer.test[192.0.2.5]:25 "
                      "does not support that", o.text)
        self.assertTrue(f.value.next_host)

    def test_cleartext_listing_does_not_count(self):
        """REQUIRETLS listed before STARTTLS proves nothing: STARTTLS still follows."""
        s = self.session()
        s.feed(b"220 mx.peer.test ESMTP\r\n")
        self.assertEqual(s.feed(b"250-mx.peer.test\r\n250-REQUIRETLS\r\n250 STARTTLS\r\n"),
                         [b"STARTTLS"])

    def test_mail_from_carries_requiretls(self):
        """With REQUIRETLS listed inside TLS, MAIL FROM carries the REQUIRETLS parameter."""
        s = self.session()
        self.starttls(s, REQ_EHLO)
        self.assertEqual(s.ready, [s.client])
        txn = Transaction("a@example.test", ("x@peer.test",), message(), requiretls=True)
        s.client.send(txn)
        self.assertEqual(s.sent()[0], b"MAIL FROM:<a@example.test> SIZE=18 REQUIRETLS")

    def test_never_on_an_ordinary_session(self):
        """A REQUIRETLS transaction on a session not set up for it is refused before MAIL."""
        s = Session(self)
        s.establish()
        results = []
        txn = Transaction("a@example.test", ("x@peer.test",), message(), requiretls=True)
        s.client.send(txn).addCallback(results.append)
        self.assertEqual(s.sent(), [])
        self.assertEqual(results[0]["x@peer.test"].enhanced, "5.7.30")


class FakePublished:
    """Stands in for what destinations publish; says whether it was asked."""

    def __init__(self):
        self.asked: list[str] = []
        self.dane_state = attrs.make_class("State", ["reason"])("no validating resolver")

    def dane_enabled(self):
        self.asked.append("dane")
        return defer.succeed(False)

    def sts(self, domain):
        self.asked.append("sts")
        return defer.succeed(_sts("enforce", mx=("nothing.peer.test",)))


class ListingPublished(FakePublished):
    """An MTA-STS policy (mode testing) that lists both MX hosts of peer.test."""

    def sts(self, domain):
        self.asked.append("sts")
        return defer.succeed(_sts("testing", mx=("mx1.peer.test", "mx2.peer.test")))


class PoolTests(PoolTestBase):
    def test_validated_mx_without_starttls_each_host_then_5_7_10(self):
        """MX hosts validated by MTA-STS (mode testing) but without STARTTLS: each is tried, nothing is sent, 5.7.10 at once; the domain's TLS history is not charged with a failure only REQUIRETLS saw."""
        from tests.tls.test_history import history_path
        from twisted_mta.tls.history import TLSHistory
        pool = self.pool(tls={"fallback": "now"})
        pool.ctx.published = ListingPublished()
        pool.history = TLSHistory(history_path(self.mktemp()), self.clock, self.run_blocking)
        r = self.deliver(pool, NextHop("peer.test", requiretls=True), self.req_txn("x@peer.test"))
        self.flush()
        o = r[0]["x@peer.test"]
        self.assertEqual((o.code, o.enhanced, o.kind), (554, "5.7.10", "requiretls-no-tls"))
        self.assertEqual(sorted(a for a, _ in self.connects), ["192.0.2.1", "192.0.2.2"])
        self.assertNotIn(b"DATA", self.commands())
        self.assertIsNone(pool.history.get("peer.test"))

    def req_txn(self, *rcpts):
        return attrs.evolve(self.txn(*rcpts), requiretls=True)

    def test_mx_not_validated_is_permanent_and_nothing_connects(self):
        """REQUIRETLS to a domain whose MX nothing validates (no DNSSEC, no MTA-STS): 5.7.30 at once, without a connection."""
        pool = self.pool()
        r = self.deliver(pool, NextHop("peer.test", requiretls=True), self.req_txn("x@peer.test"))
        self.flush()
        o = r[0]["x@peer.test"]
        self.assertEqual((o.code, o.enhanced, o.kind), (554, "5.7.30",
                                                        "requiretls-mx-unvalidated"))
        self.assertIn("authenticated by DNSSEC or an MTA-STS policy", o.text)
        self.assertEqual(self.connects, [])

    def test_smarthost_without_starttls_is_5_7_10(self):
        """REQUIRETLS through a smarthost that offers no STARTTLS: not sent, 5.7.10, whatever the decider (now would send cleartext); the MX rule does not apply to a smarthost."""
        pool = self.pool(smarthost={"host": "[192.0.2.1]:25"}, tls={"fallback": "now"})
        hop = NextHop("peer.test", smarthost=pool.settings.smarthost, requiretls=True)
        r = self.deliver(pool, hop, self.req_txn("x@peer.test"))
        self.flush()
        o = r[0]["x@peer.test"]
        self.assertEqual((o.code, o.enhanced, o.kind), (554, "5.7.10", "requiretls-no-tls"))
        self.assertIn("does not offer encryption", o.text)
        self.assertEqual(len(self.connects), 1)
        self.assertNotIn(b"MAIL FROM:<a@example.test>", self.commands())
        self.assertNotIn(b"MAIL FROM:<a@example.test> REQUIRETLS", self.commands())

    def test_own_destination_beside_ordinary_mail(self):
        """Ordinary mail to the same domain is delivered in its own sessions while the REQUIRETLS message fails: the tag is part of the destination."""
        pool = self.pool()
        plain = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        req = self.deliver(pool, NextHop("peer.test", requiretls=True),
                           self.req_txn("x@peer.test"))
        self.flush()
        self.assertEqual(plain[0]["y@peer.test"].code, 250)
        self.assertEqual(req[0]["x@peer.test"].enhanced, "5.7.30")
        self.assertEqual(self.commands().count(b"MAIL FROM:<a@example.test>"), 1)

    def test_operator_relaxed_override_does_not_apply(self):
        """The operator's relaxed override does not relax REQUIRETLS."""
        pool = self.pool(smarthost={"host": "[192.0.2.1]:25"})
        hop = NextHop("peer.test", smarthost=pool.settings.smarthost, requiretls=True)
        txn = attrs.evolve(self.req_txn("x@peer.test"), tls_override="relaxed")
        r = self.deliver(pool, hop, txn)
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].enhanced, "5.7.10")

    def test_tls_required_no_skips_what_the_recipient_publishes(self):
        """A "TLS-Required: No" hop never asks for DANE or MTA-STS (here an enforced policy listing no MX would refuse both hosts), is delivered, and says so in the trace header; an untagged message is held by the policy."""
        pool = self.pool()
        published = pool.ctx.published = FakePublished()
        r = self.deliver(pool, NextHop("peer.test", tls_required_no=True), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].code, 250)
        self.assertEqual(published.asked, [])
        [body] = [e[2] for e in self.log if len(e) == 3]
        self.assertIn(b"tls-required-no", body.split(b"\n")[0])
        held = self.deliver(pool, NextHop("peer.test"), self.txn("y@peer.test"))
        self.flush()
        self.assertEqual(held[0]["y@peer.test"].kind, "sts-mx-mismatch")
        self.assertIn("sts", published.asked)

    def test_tls_required_no_keeps_our_admins_entries(self):
        """Our admin's explicit entry for the domain (strict, fallback never) still holds a "TLS-Required: No" message."""
        pool = self.pool(tls={"domains": {"peer.test": {"policy": "strict",
                                                        "fallback": "never"}}})
        r = self.deliver(pool, NextHop("peer.test", tls_required_no=True), self.txn("x@peer.test"))
        self.flush()
        self.assertEqual(r[0]["x@peer.test"].enhanced, "4.7.4")
