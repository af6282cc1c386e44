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

from twisted_mta.config import OutboundTLSSettings, TLSPolicyEntry
from twisted_mta.dsn.report import FailedRecipient, delay_report, failure_report
from twisted_mta.outbound import fallback as fb
from twisted_mta.outbound.tlsengine import Registry, TLSEngine
from twisted_mta.outbound.tlsfailure import CertificateFacts, TLSFailure
from twisted_mta.queue.envelope import Envelope, Outcome, Recipient
from twisted_mta.queue.manager import expired_outcome

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
ARRIVAL = 1_773_136_800  # 10 March 2026, 10:00 UTC
MARCH_3 = 1_772_496_000  # 3 March 2026, 00:00 UTC

CERT = CertificateFacts(subject="mx1.example.com", sans=("mx1.example.com",),
                        issuer="Example Issuing CA", not_before=1_740_000_000,
                        not_after=MARCH_3, self_signed=False)

CASES = {
    "certificate-expired": TLSFailure(
        "certificate-expired", host="mx1.example.com", address="192.0.2.25", port=25,
        detail="expired", expected_name="mx1.example.com", certificate=CERT),
    "hostname-mismatch": TLSFailure(
        "certificate-host-mismatch", host="mx1.example.com", address="192.0.2.25", port=25,
        detail="name", expected_name="mx1.example.com",
        certificate=CertificateFacts(subject="*.hosting.example",
                                     sans=("*.hosting.example", "hosting.example"),
                                     issuer="Example Issuing CA", not_before=1_740_000_000,
                                     not_after=1_800_000_000, self_signed=False)),
    "self-signed": TLSFailure(
        "certificate-untrusted", host="mx1.example.com", address="192.0.2.25", port=25,
        detail="self-signed", expected_name="mx1.example.com",
        certificate=CertificateFacts(subject="mx1.example.com", sans=("mx1.example.com",),
                                     issuer="mx1.example.com", not_before=1_740_000_000,
                                     not_after=1_800_000_000, self_signed=True)),
    "starttls-not-offered": TLSFailure(
        "starttls-not-offered", host="mx1.example.com", address="192.0.2.25", port=25),
}


def engine() -> TLSEngine:
    settings = OutboundTLSSettings(
        policy="opportunistic", fallback="now",
        domains=(("example.com", TLSPolicyEntry(policy="strict", fallback="never")),))
    return TLSEngine(settings, registry=Registry())


def outcome_for(failure: TLSFailure) -> Outcome:
    e = engine()
    choice = e.choose("example.com", failure.host, None)
    decision = fb.decide(e.decider(choice.fallback), failure,
                         fb.Situation(fb.Destination("example.com", failure.host),
                                      choice.requirements))
    return Outcome(451, failure.enhanced(), e.explain(failure, choice, "example.com", decision),
                   remote_mta=failure.host, kind=failure.kind,
                   policy=choice.requirements.policy)


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
    rcpt = Recipient("bob@example.com", outcome=outcome_for(CASES[name]), done_at=ARRIVAL + 1)
    return delay_report(hostname="mx.example.test", envelope=envelope(),
                        delayed=[FailedRecipient(rcpt, rcpt.outcome.remote_mta)],
                        original_headers=HEADERS, now=ARRIVAL + 1,
                        until=ARRIVAL + 5 * 86400, boundary="=====DSN=====")


def samples():
    for name in CASES:
        yield f"tls-failure-{name}.eml", failure_sample(name)
    yield "tls-delay-certificate-expired.eml", delay_sample("certificate-expired")


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
        self.assertIn("mx1.example.com presented a certificate that expired on 3 March 2026",
                      expired)
        self.assertIn('"strict" policy for example.com', expired)
        self.assertIn("renew the certificate", expired)
        for name in CASES:
            text = self.text_of(failure_sample(name))
            self.assertNotRegex(text, r"\b[245]\.\d\.\d+\b", name)
            self.assertNotRegex(text, r"\b[45]\d\d\b", name)
        mismatch = " ".join(self.text_of(failure_sample("hostname-mismatch")).split())
        self.assertIn("a certificate for *.hosting.example, hosting.example, not for "
                      "mx1.example.com", mismatch)

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
