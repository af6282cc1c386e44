"""
Golden-file DSNs for TLS failures under a strict policy: what a sender
reads when a message could not be sent because the recipient's server
failed the policy.  Regenerate (and then read them!) with
TWISTED_MTA_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import email
import os
from email import policy as email_policy

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import OutboundTLSSettings, Smarthost, TLSPolicyEntry
from twisted_mta.dsn.report import FailedRecipient, delay_report, failure_report
from twisted_mta.tls import fallback as fb
from twisted_mta.tls.engine import Registry, TLSEngine
from twisted_mta.tls.failure import CertificateFacts, TLSFailure
from twisted_mta.model import Envelope, Outcome, Recipient
from twisted_mta.queue.manager import expired_outcome

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
ARRIVAL = 1_773_136_800  # 10 March 2026, 10:00 UTC
MARCH_3 = 1_772_496_000  # 3 March 2026, 00:00 UTC

CERT = CertificateFacts(subject="mx1.example.com", sans=("mx1.example.com",),
                        issuer="Example Issuing CA", not_before=1_740_000_000,
                        not_after=MARCH_3, self_signed=False)

WEAK = CertificateFacts(subject="mx1.example.com", sans=("mx1.example.com",),
                        issuer="Example Issuing CA", not_before=1_740_000_000,
                        not_after=1_800_000_000, self_signed=False, key="RSA 1024 bits",
                        signature="SHA-1")
PEER = dict(host="mx1.example.com", address="192.0.2.25", port=25)
VERSIONS = "TLSv1.2-TLSv1.3"

CASES = {
    "certificate-expired": TLSFailure(
        "certificate-expired", **PEER, detail="expired", expected_name="mx1.example.com",
        certificate=CERT),
    "hostname-mismatch": TLSFailure(
        "certificate-host-mismatch", **PEER,
        detail="name", expected_name="mx1.example.com",
        certificate=CertificateFacts(subject="*.hosting.example",
                                     sans=("*.hosting.example", "hosting.example"),
                                     issuer="Example Issuing CA", not_before=1_740_000_000,
                                     not_after=1_800_000_000, self_signed=False)),
    "self-signed": TLSFailure(
        "certificate-untrusted", **PEER, detail="self-signed",
        expected_name="mx1.example.com",
        certificate=CertificateFacts(subject="mx1.example.com", sans=("mx1.example.com",),
                                     issuer="mx1.example.com", not_before=1_740_000_000,
                                     not_after=1_800_000_000, self_signed=True)),
    "starttls-not-offered": TLSFailure("starttls-not-offered", **PEER),
    "weak-key": TLSFailure(
        "certificate-weak", **PEER, detail="weak-signature", expected_name="mx1.example.com",
        certificate=WEAK, weakness="a 1024-bit RSA key and a SHA-1 signature"),
    "plaintext-reply": TLSFailure("handshake-plaintext", **PEER, detail="plaintext",
                                  versions=VERSIONS),
    "closed-in-handshake": TLSFailure("handshake-closed", **PEER, detail="closed",
                                      versions=VERSIONS),
    "handshake-timeout": TLSFailure("handshake-timeout", **PEER, detail="timeout",
                                    versions=VERSIONS, waited=300),
    "no-common-version": TLSFailure("handshake-no-common-version", **PEER,
                                    detail="versions-refused", versions=VERSIONS),
    "no-common-cipher": TLSFailure("handshake-no-common-cipher", **PEER,
                                   detail="no-common-cipher", versions=VERSIONS),
}
# An implicit-TLS route (a smarthost on port 465) whose decider would allow
# cleartext on the next attempt: the hard rule forbids it, and the words
# must say so.
IMPLICIT_HOST = Smarthost(host="smtp.example.net", port=465, tls="implicit",
                          tls_policy="strict", tls_fallback="next-attempt")
IMPLICIT = TLSFailure("certificate-untrusted", host="smtp.example.net", address="192.0.2.26",
                      port=465, detail="self-signed", expected_name="smtp.example.net",
                      implicit=True,
                      certificate=CertificateFacts(subject="smtp.example.net",
                                                   sans=("smtp.example.net",),
                                                   issuer="smtp.example.net",
                                                   not_before=1_740_000_000,
                                                   not_after=1_800_000_000, self_signed=True))


def engine() -> TLSEngine:
    settings = OutboundTLSSettings(
        policy="opportunistic", fallback="now",
        domains=(("example.com", TLSPolicyEntry(policy="strict", fallback="never")),))
    return TLSEngine(settings, registry=Registry())


def outcome_for(failure: TLSFailure, smarthost: Smarthost | None = None,
                tls_failures: int = 0, domain: str = "example.com") -> Outcome:
    e = engine()
    choice = e.choose(domain, failure.host, smarthost)
    situation = fb.Situation(fb.Destination(domain, failure.host, smarthost is not None),
                             choice.requirements, tls_failures=tls_failures,
                             implicit_tls=smarthost is not None and smarthost.tls == "implicit")
    decision = fb.decide(e.decider(choice.fallback), failure, situation)
    return e.outcome(failure, choice, domain, decision, situation)


def envelope() -> Envelope:
    return Envelope(queue_id="6B0A87D251AE92AA51", sender="alice@example.test",
                    recipients=(Recipient("bob@example.com"),), arrival=ARRIVAL)


HEADERS = b"From: Alice <alice@example.test>\r\nTo: bob@example.com\r\nSubject: Contract\r\n"


def failure_sample(name: str) -> bytes:
    last = outcome_for(CASES[name])
    rcpt = Recipient("bob@example.com", state="failed", outcome=expired_outcome(last),
                     done_at=ARRIVAL + 5 * 86400)
    return failure_report(hostname="mx.example.test", envelope=envelope(),
                          failed=[FailedRecipient(rcpt, rcpt.outcome.remote_mta)],
                          original_headers=HEADERS, now=ARRIVAL + 5 * 86400,
                          boundary="=====DSN=====")


def delay_sample(name: str) -> bytes:
    # example.org has no policy entry: the route's own policy and decider apply.
    outcome = outcome_for(IMPLICIT, IMPLICIT_HOST, domain="example.org") \
        if name == "implicit-next-attempt" else outcome_for(CASES[name])
    rcpt = Recipient("bob@example.com", outcome=outcome, done_at=ARRIVAL + 1)
    return delay_report(hostname="mx.example.test", envelope=envelope(),
                        delayed=[FailedRecipient(rcpt, rcpt.outcome.remote_mta)],
                        original_headers=HEADERS, now=ARRIVAL + 1,
                        until=ARRIVAL + 5 * 86400, boundary="=====DSN=====")


def samples():
    for name in CASES:
        yield f"tls-failure-{name}.eml", failure_sample(name)
    yield "tls-delay-certificate-expired.eml", delay_sample("certificate-expired")
    yield "tls-delay-implicit-next-attempt.eml", delay_sample("implicit-next-attempt")


class TLSReportTests(SynchronousTestCase):
    def test_golden(self):
        for filename, data in samples():
            path = os.path.join(GOLDEN, filename)
            if os.environ.get("TWISTED_MTA_REGEN_GOLDEN"):
                with open(path, "wb") as f:
                    f.write(data)
            with open(path, "rb") as f:
                self.assertEqual(data, f.read(), filename)

    def text_of(self, data: bytes) -> str:
        msg = email.message_from_bytes(data, policy=email_policy.compat32)
        self.assertEqual(msg.get_content_type(), "multipart/report")
        return msg.get_payload()[0].get_payload(decode=True).decode()

    def test_plain_words(self):
        """The text part names the server, the date, the policy and what to ask for; no bare status numbers."""
        expired = " ".join(self.text_of(failure_sample("certificate-expired")).split())
        self.assertIn("mx1.example.com[192.0.2.25]:25 presented a certificate that expired on "
                      "3 March 2026", expired)
        # Given up: nothing is promised any more.
        self.assertNotIn("tried again", expired)
        self.assertIn('"strict" policy for example.com', expired)
        self.assertIn("renew the certificate", expired)
        for name in CASES:
            text = self.text_of(failure_sample(name))
            self.assertNotRegex(text, r"\b[245]\.\d\.\d+\b", name)
            self.assertNotRegex(text, r"\b[45]\d\d\b", name)
        for name in CASES:
            text = " ".join(self.text_of(failure_sample(name)).split())
            self.assertIn("mx1.example.com[192.0.2.25]:25", text, name)
        mismatch = " ".join(self.text_of(failure_sample("hostname-mismatch")).split())
        self.assertIn("a certificate for *.hosting.example, hosting.example, not for "
                      "mx1.example.com", mismatch)

    def test_each_class_has_its_own_fact_and_advice(self):
        """Weak key, plain-text reply, closed, timeout, no common version or cipher: each bounce states its own fact and advice, never another class's."""
        facts = {
            "weak-key": ("1024-bit RSA key and a SHA-1 signature", "2048 bits"),
            "plaintext-reply": ("in plain text, so its STARTTLS is broken", "fix STARTTLS"),
            "closed-in-handshake": ("closed the connection during the encryption handshake",
                                    "logs"),
            "handshake-timeout": ("did not answer the encryption handshake within 300 "
                                  "seconds", "firewall"),
            "no-common-version": ("no TLS version in common: we offered TLS 1.2 to TLS 1.3",
                                  "enable TLS 1.2 or TLS 1.3"),
            "no-common-cipher": ("no cipher in common", "current ciphers"),
        }
        for name, (fact, advice) in facts.items():
            text = " ".join(self.text_of(failure_sample(name)).split())
            self.assertIn(fact, text, name)
            self.assertIn(advice, text, name)
            self.assertNotIn("authority we do not trust", text, name)
            if name != "no-common-version":
                self.assertNotIn("TLS 1.2 or later", text, name)

    def test_implicit_tls_warning_promises_no_cleartext(self):
        """An implicit-TLS route with next-attempt: the delay warning says the message stays encrypted (the hard rule), never that it will go without encryption."""
        text = " ".join(self.text_of(delay_sample("implicit-next-attempt")).split())
        self.assertNotIn("sent without encryption", text)
        self.assertIn("never without it: implicit TLS never falls back to cleartext", text)
        self.assertIn("smtp.example.net[192.0.2.26]:465", text)

    def test_machine_part_has_the_tls_codes(self):
        """The delivery-status part carries 5.7.x (4.7.x for a delay) and an X-Twisted-MTA diagnostic."""
        for name, status in [("certificate-expired", "5.7.5"), ("self-signed", "5.7.5"),
                             ("hostname-mismatch", "5.7.5"), ("starttls-not-offered", "5.7.4")]:
            msg = email.message_from_bytes(failure_sample(name), policy=email_policy.compat32)
            block = msg.get_payload()[1].get_payload()[1]
            self.assertEqual(block["Status"], status, name)
            self.assertTrue(block["Diagnostic-Code"].startswith(f"X-Twisted-MTA; 554 {status} "))
            self.assertEqual(block["Remote-MTA"], "dns; mx1.example.com")
        msg = email.message_from_bytes(delay_sample("certificate-expired"),
                                       policy=email_policy.compat32)
        self.assertEqual(msg.get_payload()[1].get_payload()[1]["Status"], "4.7.5")
