"""
Sending one report: the message (parsed back with the email package, the
attachment decoded, the DKIM signature verified by dkimpy), queued into a
real spool from <> with NOTIFY=NEVER and TLS-Required: No; the HTTPS POST
with a fake request function on a task.Clock (retries, back-off, giving
up, timeouts); the sender's logging and counting per rua.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
import os

import dkim
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support import make_config
from tests.test_dkim import dnsfunc_for, write_key
from twisted_mta.dkim import Signer
from twisted_mta.queue.spool import Spool
from twisted_mta.tlsrpt import report as tlsreport
from twisted_mta.tlsrpt.record import Rua
from twisted_mta.tlsrpt.send import (
    GZIP_TYPE, HTTPSReports, MailReports, Report, ReportSender, default_from,
    report_message,
)

REPORT = {
    "organization-name": "Example Sender",
    "date-range": {"start-datetime": "2026-12-02T00:00:00Z",
                   "end-datetime": "2026-12-02T23:59:59Z"},
    "contact-info": "tlsrpt@sender.test",
    "report-id": "2026-12-02.example.org@sender.test",
    "policies": [{"policy": {"policy-type": "no-policy-found", "policy-domain": "example.org"},
                  "summary": {"total-successful-session-count": 3,
                              "total-failure-session-count": 1}}],
}
NOW = 1_796_256_000.0  # 2026-12-03 00:00 UTC


def make_report() -> Report:
    begin, end = tlsreport.day_bounds("2026-12-02")
    return Report(policy_domain="example.org", submitter="sender.test", report=REPORT,
                  body=tlsreport.to_gzip(REPORT),
                  filename=tlsreport.filename("sender.test", "example.org", begin, end))


def parse(message: bytes):
    return email.message_from_bytes(message, policy=email.policy.default)


class MessageTests(SynchronousTestCase):
    def test_structure(self) -> None:
        report = make_report()
        raw = report_message(report, from_address=default_from("sender.test"),
                             to="rua@example.org", now=NOW, hostname="mx.sender.test")
        self.assertNotIn(b"\n", raw.replace(b"\r\n", b""))  # CRLF only
        msg = parse(raw)
        self.assertEqual(msg["From"], "tlsrpt-noreply@sender.test")
        self.assertEqual(msg["To"], "rua@example.org")
        self.assertEqual(msg["Date"], "Thu, 03 Dec 2026 00:00:00 +0000")
        self.assertTrue(msg["Message-ID"].endswith("@mx.sender.test>"))
        self.assertEqual(msg["Subject"], "Report Domain: example.org Submitter: sender.test "
                         "Report-ID: <2026-12-02.example.org@sender.test>")
        self.assertEqual(msg["TLS-Report-Domain"], "example.org")
        self.assertEqual(msg["TLS-Report-Submitter"], "sender.test")
        self.assertEqual(msg["TLS-Required"], "No")
        self.assertEqual(msg.get_content_type(), "multipart/report")
        self.assertEqual(msg.get_param("report-type"), "tlsrpt")
        text, attachment = msg.get_payload()
        self.assertEqual(text.get_content_type(), "text/plain")
        self.assertIn("3 successful and 1 failed", text.get_content())
        self.assertEqual(attachment.get_content_type(), GZIP_TYPE)
        self.assertEqual(attachment.get_filename(),
                         "sender.test!example.org!1796169600!1796255999.json.gz")
        self.assertEqual(json.loads(gzip.decompress(attachment.get_content())), REPORT)
        # the boundary is ours, not the text "None" of a boundary not made yet
        boundary = msg.get_boundary()
        self.assertTrue(boundary.startswith("=_tlsrpt_"), boundary)
        self.assertIn(b"\r\n--" + boundary.encode() + b"--\r\n", raw)

    def test_organization_not_ascii(self) -> None:
        """
        organization_name is free text: a name that is not ASCII makes a
        quoted-printable text part (found by parsedmarc's test), not an error.
        """
        named = {**REPORT, "organization-name": "Exämple Sender"}
        report = Report(policy_domain="example.org", submitter="sender.test", report=named,
                        body=tlsreport.to_gzip(named), filename=make_report().filename)
        raw = report_message(report, from_address=default_from("sender.test"),
                             to="rua@example.org", now=NOW, hostname="mx.sender.test")
        self.assertTrue(raw.isascii())
        text, attachment = parse(raw).get_payload()
        self.assertEqual(text["Content-Transfer-Encoding"], "quoted-printable")
        self.assertIn("from Exämple Sender for", text.get_content())
        self.assertEqual(json.loads(gzip.decompress(attachment.get_content())), named)


class MailTests(SynchronousTestCase):
    def setUp(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        write_key(os.path.join(base, "k.pem"), "rsa-sha256")
        self.config = make_config(base, dkim={"domains": {"sender.test": {
            "selector": "rpt", "key_file": "k.pem"}}})
        self.signer = Signer.from_config(self.config)
        self.spool = Spool(self.config.spool)
        self.spool.lock()
        self.addCleanup(self.spool.unlock)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.queued = []
        self.mail = MailReports(self.spool, self.queued.append, self.signer, self.clock,
                                default_from, "mx.sender.test")

    def test_queued_signed(self) -> None:
        qid = self.successResultOf(self.mail.queue(make_report(), "rua@example.org"))
        self.assertEqual([e.queue_id for e in self.queued], [qid])
        entry = self.spool.load(qid)
        self.assertEqual(entry.sender, "")
        self.assertEqual([r.address for r in entry.recipients], ["rua@example.org"])
        self.assertEqual(entry.recipients[0].notify, ())  # NOTIFY=NEVER: no bounce at all
        self.assertTrue(entry.tls_required_no)
        self.assertEqual(entry.client.get("tlsrpt_for"), "example.org")
        message = self.spool.read_message(qid)
        self.assertTrue(message.startswith(b"DKIM-Signature: "))
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(self.signer, "tlsrpt"),
                                    tlsrpt="strict"))
        msg = parse(message)
        self.assertEqual(msg["TLS-Report-Domain"], "example.org")
        self.assertEqual(json.loads(gzip.decompress(msg.get_payload()[1].get_content())),
                         REPORT)


class _Response:
    def __init__(self, code: int) -> None:
        self.code = code
        self.delivered = False

    def deliverBody(self, protocol) -> None:
        self.delivered = True


class FakeRequest:
    """
    treq.request's signature; answers from a script: a status code, an
    exception, or None for never (a timeout).
    """

    def __init__(self, clock: Clock, script: list) -> None:
        self.clock, self.script, self.calls = clock, list(script), []

    def __call__(self, method, url, data=None, headers=None, unbuffered=False,
                 allow_redirects=True):
        self.calls.append((self.clock.seconds(), method, url, data, headers,
                           unbuffered and not allow_redirects))
        answer = self.script.pop(0)
        if answer is None:
            return defer.Deferred()
        if isinstance(answer, Exception):
            return defer.fail(answer)
        return defer.succeed(_Response(answer))


class HTTPSTests(SynchronousTestCase):
    URL = "https://collector.example.org/tlsrpt"

    def poster(self, script: list, retry_for: float = 86400, timeout: float = 30):
        self.clock = Clock()
        self.request = FakeRequest(self.clock, script)
        return HTTPSReports(self.clock, self.request, timeout, retry_for)

    def test_sent(self) -> None:
        poster = self.poster([201])
        report = make_report()
        self.assertEqual(self.successResultOf(poster.post(report, self.URL)),
                         (True, "HTTP 201"))
        (_, method, url, data, headers, unbuffered), = self.request.calls
        self.assertEqual((method, url), ("POST", self.URL))
        self.assertEqual(headers, {b"Content-Type": [b"application/tlsrpt+gzip"]})
        self.assertEqual(json.loads(gzip.decompress(data)), REPORT)
        self.assertTrue(unbuffered)

    def test_back_off(self) -> None:
        poster = self.poster([500, ConnectionRefusedError(), None, 200], timeout=30)
        d = poster.post(make_report(), self.URL)
        self.clock.pump([1] * 1000)
        self.assertEqual(self.successResultOf(d), (True, "HTTP 200"))
        times = [c[0] for c in self.request.calls]
        # 0, then 60 s, 120 s and 240 s later (the timeout's 30 s before the third wait)
        self.assertEqual(times, [0, 60, 180, 180 + 30 + 240])

    def test_gives_up(self) -> None:
        poster = self.poster([503] * 100, retry_for=3600)
        d = poster.post(make_report(), self.URL)
        self.clock.pump([1] * 4000)
        sent, detail = self.successResultOf(d)
        self.assertFalse(sent)
        self.assertIn("HTTP 503", detail)
        times = [c[0] for c in self.request.calls]
        self.assertEqual(times, [0, 60, 180, 420, 900, 1860])  # next would be 3780 > 3600
        self.assertIn("gave up after 6 tries", detail)

    def test_stop_cancels_the_request(self) -> None:
        poster = self.poster([None])
        d = poster.post(make_report(), self.URL)
        poster.stop()
        self.failureResultOf(d, defer.CancelledError)

    def test_stop_cancels_the_wait(self) -> None:
        poster = self.poster([500, 200])
        d = poster.post(make_report(), self.URL)
        poster.stop()
        self.failureResultOf(d, defer.CancelledError)
        self.clock.advance(3600)
        self.assertEqual(len(self.request.calls), 1)


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.clock = Clock()
        self.counted = []

    def sender(self, mail, script):
        self.request = FakeRequest(self.clock, script)
        https = HTTPSReports(self.clock, self.request, 30, 86400)
        return ReportSender(mail, https, lambda name, e: self.counted.append((name, e)))

    def logged(self, name: str) -> list:
        return [e for e in self.events if e.get("event") == name]

    def test_no_key_https_still_sent(self) -> None:
        class NoKey:
            def can_sign(self, report):
                return False
        sender = self.sender(NoKey(), [200])
        outcomes = self.successResultOf(sender.send(make_report(), (
            Rua("mailto", "rua@example.org"), Rua("https", "https://c.example.org/"))))
        self.assertEqual([o.sent for o in outcomes], [False, True])
        self.assertEqual(len(self.logged("tlsrpt.unsigned")), 1)
        self.assertEqual([(e["rua"], e["report_id"]) for e in self.logged("tlsrpt.sent")],
                         [("https://c.example.org/", "2026-12-02.example.org@sender.test")])
        self.assertEqual([e["rua"] for e in self.logged("tlsrpt.failed")],
                         ["mailto:rua@example.org"])
        self.assertEqual(self.counted, [
            ("tlsrpt.report", {"domain": "example.org"}),
            ("tlsrpt.failed", {"method": "mailto", "domain": "example.org"}),
            ("tlsrpt.sent", {"method": "https", "domain": "example.org"})])

    def test_queue_failure_is_one_line(self) -> None:
        class Full:
            def can_sign(self, report):
                return True

            def queue(self, report, to):
                return defer.fail(OSError(28, "No space left on device"))
        sender = self.sender(Full(), [])
        outcome, = self.successResultOf(sender.send(make_report(), (
            Rua("mailto", "rua@example.org"),)))
        self.assertFalse(outcome.sent)
        self.assertFalse(outcome.final)
        self.assertIn("No space left on device", outcome.detail)
        self.assertIn("ENOSPC", outcome.detail)


class MetricsTests(SynchronousTestCase):
    def test_counted(self) -> None:
        from twisted_mta.metrics import Metrics
        m = Metrics()
        m("tlsrpt.report", {"domain": "example.org"})
        m("tlsrpt.sent", {"method": "mailto", "domain": "example.org"})
        m("tlsrpt.failed", {"method": "https", "domain": "example.org"})
        m("tlsrpt.failed", {"method": "https", "domain": "example.org"})
        value = m.registry.get_sample_value
        self.assertEqual(value("twisted_mta_tlsrpt_domains_total"), 1)
        self.assertEqual(value("twisted_mta_tlsrpt_reports_total",
                               {"method": "mailto", "result": "sent"}), 1)
        self.assertEqual(value("twisted_mta_tlsrpt_reports_total",
                               {"method": "https", "result": "failed"}), 2)


class CollectorEndpointsTests(SynchronousTestCase):
    """
    The HTTPS agent's way to a collector: our resolver for names, the
    certificate checked for the URL's name, only https.
    """

    def endpoints(self, answers):
        from twisted.internet.testing import MemoryReactorClock

        from twisted_mta.tlsrpt.send import CollectorEndpoints
        self.reactor = MemoryReactorClock()
        self.asked = []

        def resolve(host):
            self.asked.append(host)
            return defer.succeed(answers)
        return CollectorEndpoints(self.reactor, resolve, None, 30)

    def uri(self, text: str):
        from twisted.web.client import URI
        return URI.fromBytes(text.encode())

    def test_name_resolved_by_us(self) -> None:
        from twisted.internet.protocol import Factory
        endpoints = self.endpoints(["192.0.2.7", "2001:db8::7"])
        endpoint = endpoints.endpointForURI(self.uri("https://collector.example:8443/r"))
        factory = Factory()
        endpoint.connect(factory)
        self.assertEqual(self.asked, ["collector.example"])
        (host, port, _, timeout, _), = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.7", 8443, 30))
        self.assertFalse(factory.noisy)

    def test_address_literal(self) -> None:
        from twisted.internet.protocol import Factory
        endpoints = self.endpoints([])
        endpoints.endpointForURI(self.uri("https://[2001:db8::9]/r")).connect(Factory())
        self.assertEqual(self.asked, [])
        (host, port, _, _, _), = self.reactor.tcpClients
        self.assertEqual((host, port), ("2001:db8::9", 443))

    def test_no_address(self) -> None:
        from twisted.internet.error import DNSLookupError
        from twisted.internet.protocol import Factory
        endpoints = self.endpoints([])
        d = endpoints.endpointForURI(self.uri("https://collector.example/")).connect(Factory())
        self.failureResultOf(d, DNSLookupError)

    def test_https_only(self) -> None:
        from twisted.web.error import SchemeNotSupported
        endpoints = self.endpoints([])
        self.assertRaises(SchemeNotSupported, endpoints.endpointForURI,
                          self.uri("http://collector.example/"))
