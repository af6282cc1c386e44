"""
The daily run on a task.Clock: when it fires (midnight plus the random
delay, a minute after start-up for overdue days), which domains get a
report (sessions counted, a valid record, not skipped, not yet sent),
what is marked sent and pruned, and the operator's send --now.  The
sender is real down to its two ends: a fake queue and a fake HTTP request.
"""

from __future__ import annotations

import gzip
import json
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from tests.support import make_config
from twisted_mta.tlsrpt import store
from twisted_mta.tlsrpt.counts import Detail, Policy
from twisted_mta.tlsrpt.record import Discovery, TLSRPTDNSError, parse_record
from twisted_mta.tlsrpt.schedule import START_DELAY, ReportSchedule
from twisted_mta.tlsrpt.send import HTTPSReports, ReportSender

DAY = 86400
MIDNIGHT = 1_796_256_000.0  # 2026-12-03 00:00 UTC
YESTERDAY = "2026-12-02"
TODAY = "2026-12-03"


def run_inline(f, *args):
    return defer.maybeDeferred(f, *args)


class FakeMail:
    def __init__(self) -> None:
        self.queued = []

    def can_sign(self, report) -> bool:
        return True

    def queue(self, report, to):
        self.queued.append((report, to))
        return defer.succeed(f"Q{len(self.queued)}")


class _Response:
    def __init__(self, code):
        self.code = code

    def deliverBody(self, protocol):
        pass


class ScheduleTests(SynchronousTestCase):
    RECORDS = {
        "mail.example": "v=TLSRPTv1; rua=mailto:rua@mail.example",
        "both.example": "v=TLSRPTv1; rua=mailto:r@both.example,https://c.both.example/r",
        "web.example": "v=TLSRPTv1; rua=https://c.web.example/r",
        "bad.example": "v=TLSRPTv1; rua=ftp://x",
        "skip.example": "v=TLSRPTv1; rua=mailto:r@skip.example",
        "sub.skipped.example": "v=TLSRPTv1; rua=mailto:r@skipped.example",
    }

    def setUp(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        self.config = make_config(base, tlsrpt={
            "enabled": True, "organization_name": "Sender Org",
            "contact_info": "tlsrpt@sender.test", "send_delay": "1h",
            "skip_domains": ["skip.example", "skipped.example"]})
        self.directory = store.directory_of(self.config.spool)
        self.clock = Clock()
        self.clock.advance(MIDNIGHT - 5 * 3600)  # 2026-12-02 19:00
        self.mail = FakeMail()
        self.posts = []
        self.answers = {}
        self.asked = []
        self.dns_fails = set()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        https = HTTPSReports(self.clock, self.request, 30, 3600)
        self.sender = ReportSender(self.mail, https)
        self.schedule = ReportSchedule(self.config.tlsrpt, self.directory, self.sender,
                                       self.discover, self.clock, run_inline,
                                       rand=lambda: 0.5)

    def request(self, method, url, data=None, headers=None, unbuffered=False,
                allow_redirects=True):
        self.posts.append((self.clock.seconds(), url, data))
        return defer.succeed(_Response(self.answers.get(url, 200)))

    def discover(self, domain):
        self.asked.append(domain)
        if domain in self.dns_fails:
            return defer.fail(TLSRPTDNSError("SERVFAIL"))
        text = self.RECORDS.get(domain)
        if text is None:
            return defer.succeed(Discovery(domain, None, "no TLSRPT record"))
        record, why = parse_record(text)
        return defer.succeed(Discovery(domain, record, why))

    def count(self, day: str, domains, ok=3, failed=1) -> None:
        counts = store.DayCounts(day)
        for domain in domains:
            policy = Policy("no-policy-found")
            counts.add(domain, policy, None, ok)
            counts.add(domain, policy, Detail("certificate-expired",
                                              receiving_mx_hostname=f"mx.{domain}"), failed)
        store.write_day(self.directory, day, json.dumps(counts.to_json()).encode())

    def logged(self, name):
        return [e for e in self.events if e.get("event") == name]

    def test_when(self) -> None:
        """
        After midnight plus rand() * send_delay, then every day; at start-up
        after midnight's time: a minute later.
        """
        self.count(YESTERDAY, ["mail.example"])
        self.schedule.startService()
        self.addCleanup(self.schedule.stopService)
        self.clock.pump([1] * (5 * 3600 + 1800 - 1))  # 00:29:59
        self.assertEqual(self.mail.queued, [])
        self.clock.advance(1)  # 00:30 = midnight + 0.5 * 1 h
        self.assertEqual([to for _, to in self.mail.queued], ["rua@mail.example"])
        self.assertEqual(store.list_days(self.directory), [])  # sent, so pruned
        # the next run is the next day at 00:30
        self.assertEqual(self.schedule._timer.getTime(), MIDNIGHT + DAY + 1800)

    def test_start_after_the_time(self) -> None:
        self.count(YESTERDAY, ["mail.example"])
        self.clock.advance(5 * 3600 + 7200)  # 02:00: today's time has passed
        self.schedule.startService()
        self.addCleanup(self.schedule.stopService)
        self.clock.advance(START_DELAY - 1)
        self.assertEqual(self.mail.queued, [])
        self.clock.advance(1)
        self.assertEqual(len(self.mail.queued), 1)

    def test_which_domains(self) -> None:
        self.count(YESTERDAY, ["mail.example", "both.example", "web.example", "bad.example",
                               "none.example", "skip.example", "sub.skipped.example"])
        self.clock.advance(6 * 3600)
        self.successResultOf(self.schedule.run())
        # skipped domains are not even looked up
        self.assertEqual(sorted(self.asked), ["bad.example", "both.example", "mail.example",
                                              "none.example", "web.example"])
        self.assertEqual(sorted(to for _, to in self.mail.queued),
                         ["r@both.example", "rua@mail.example"])
        self.assertEqual(sorted(url for _, url, _ in self.posts),
                         ["https://c.both.example/r", "https://c.web.example/r"])
        # the POSTed body is the report, for its domain
        report = json.loads(gzip.decompress(
            [d for _, u, d in self.posts if "web" in u][0]))
        self.assertEqual(report["policies"][0]["policy"]["policy-domain"], "web.example")
        self.assertEqual(report["policies"][0]["summary"],
                         {"total-successful-session-count": 3,
                          "total-failure-session-count": 1})
        self.assertEqual(report["report-id"], "2026-12-02.web.example@sender.test")
        self.assertEqual(report["organization-name"], "Sender Org")
        # the invalid record is one warning line; the absent one none
        invalid = self.logged("tlsrpt.invalid_record")
        self.assertEqual([e["domain"] for e in invalid], ["bad.example"])
        # every domain is done, so the day was pruned
        self.assertEqual(store.list_days(self.directory), [])

    def test_mail_file_name(self) -> None:
        self.count(YESTERDAY, ["mail.example"])
        self.clock.advance(6 * 3600)
        self.successResultOf(self.schedule.run())
        (report, to), = self.mail.queued
        self.assertEqual(report.filename,
                         "sender.test!mail.example!1796169600!1796255999.json.gz")
        self.assertEqual(report.submitter, "sender.test")
        self.assertEqual(json.loads(gzip.decompress(report.body)), report.report)

    def test_sent_once(self) -> None:
        self.count(YESTERDAY, ["mail.example"])
        self.clock.advance(6 * 3600)
        store.mark_sent(self.directory, YESTERDAY, "other.example")  # a day kept: see below
        self.count(YESTERDAY, ["mail.example", "dns.example"])
        self.dns_fails.add("dns.example")
        self.successResultOf(self.schedule.run())
        self.successResultOf(self.schedule.run())
        self.assertEqual(len(self.mail.queued), 1)
        # the DNS failure waits for the next run, the day stays
        self.assertEqual(self.asked.count("dns.example"), 2)
        self.assertEqual(len(self.logged("tlsrpt.dns")), 2)
        self.assertEqual(store.list_days(self.directory), [YESTERDAY])

    def test_https_retry_then_marked(self) -> None:
        """
        The day is marked for the domain once the POST is done; meanwhile
        other domains are not held up.
        """
        self.answers["https://c.web.example/r"] = 503
        self.count(YESTERDAY, ["web.example", "mail.example"])
        self.clock.advance(6 * 3600)
        self.successResultOf(self.schedule.run())
        self.assertEqual(len(self.mail.queued), 1)
        self.assertEqual(store.sent_domains(self.directory, YESTERDAY), {"mail.example"})
        self.answers["https://c.web.example/r"] = 200
        self.clock.advance(60)
        self.assertEqual(store.sent_domains(self.directory, YESTERDAY),
                         {"mail.example", "web.example"})
        self.assertEqual([e["rua"] for e in self.logged("tlsrpt.sent")],
                         ["mailto:rua@mail.example", "https://c.web.example/r"])

    def test_not_queued_is_tried_again(self) -> None:
        class Full(FakeMail):
            def queue(self, report, to):
                return defer.fail(OSError(28, "No space left on device"))
        self.sender.mail = Full()
        self.count(YESTERDAY, ["mail.example"])
        self.clock.advance(6 * 3600)
        self.successResultOf(self.schedule.run())
        self.assertEqual(store.sent_domains(self.directory, YESTERDAY), set())
        self.sender.mail = self.mail
        self.successResultOf(self.schedule.run())
        self.assertEqual(len(self.mail.queued), 1)
        self.assertEqual(store.list_days(self.directory), [])  # sent, so pruned

    def test_stopped_is_tried_again(self) -> None:
        """
        A POST still retrying when the MTA stops does not mark the day: the
        next run (after the restart) sends the report again.
        """
        self.answers["https://c.web.example/r"] = 503
        self.count(YESTERDAY, ["web.example"])
        self.clock.advance(6 * 3600)
        self.schedule.startService()
        self.successResultOf(self.schedule.run())
        self.successResultOf(self.schedule.stopService())
        self.assertEqual(store.sent_domains(self.directory, YESTERDAY), set())
        (failed,) = self.logged("tlsrpt.failed")
        self.assertIn("stopped", failed["detail"])
        self.assertEqual(store.list_days(self.directory), [YESTERDAY])

    def test_old_days_pruned(self) -> None:
        self.count("2026-11-20", ["dns.example"])
        self.dns_fails.add("dns.example")
        self.clock.advance(6 * 3600)
        self.successResultOf(self.schedule.run())
        self.assertEqual(store.list_days(self.directory), [])

    def test_today_waits(self) -> None:
        self.clock.advance(6 * 3600)
        self.count(TODAY, ["mail.example"])
        self.successResultOf(self.schedule.run())
        self.assertEqual(self.mail.queued, [])
        self.assertEqual(store.list_days(self.directory), [TODAY])

    def test_send_now(self) -> None:
        """
        Today's reports so far, with an id and file name of their own; the
        day is not marked, so the whole day still goes after midnight.
        """
        self.clock.advance(5 * 3600 + 3600 + 15 * 60)  # 2026-12-03 01:15
        self.count(TODAY, ["mail.example", "web.example"])
        words = self.schedule.send_now()
        self.assertEqual(words, "sending today's TLS reports")
        (report, to), = self.mail.queued
        self.assertEqual(report.report_id, "2026-12-03T011500Z.mail.example@sender.test")
        self.assertEqual(report.filename, "sender.test!mail.example!1796256000!1796342399"
                         "!T011500Z.json.gz")
        self.assertEqual(len(self.posts), 1)
        self.assertEqual(store.sent_domains(self.directory, TODAY), set())
        self.schedule.send_now("WEB.example.")
        self.assertEqual(len(self.mail.queued), 1)
        self.assertEqual(len(self.posts), 2)
        self.schedule.send_now("nothing.example")
        self.assertEqual(len(self.logged("tlsrpt.none")), 1)

    def test_aggregate_snapshot_first(self) -> None:
        """
        Today's counts come from the running aggregate (newer than its file).
        """
        class Aggregate:
            def snapshot(self, day):
                counts = store.DayCounts(day)
                counts.add("mail.example", Policy("no-policy-found"), None, 7)
                return counts
        self.schedule.aggregate = Aggregate()
        self.clock.advance(6 * 3600)
        self.schedule.send_now()
        (report, _), = self.mail.queued
        self.assertEqual(report.report["policies"][0]["summary"][
            "total-successful-session-count"], 7)
