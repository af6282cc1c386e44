"""
When the TLS reports go (RFC 8460 §4.1: once per UTC day): a while after
midnight (a random delay up to C{send_delay}, so that not every MTA on
earth posts at 00:00), the previous days not yet reported, one report per
policy domain that had sessions there and publishes a valid TLSRPT record.
A domain's report is marked sent (C{store.mark_sent}) once it has gone to
every rua: the mail on disk in our queue, the POST answered or given up.
Days whose domains are all done, and days older than C{store.KEEP_DAYS},
are pruned.

The operator's C{tls report send --now} asks for today's reports so far
(L{ReportSchedule.send_now}): they carry their own report id and file
name, and do not mark the day sent, so the whole day is still reported
after midnight.
"""

from __future__ import annotations

import datetime
import random
from typing import Callable

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta.config import TLSRPTSettings
from twisted_mta.tlsrpt import report as tlsreport
from twisted_mta.tlsrpt import store
from twisted_mta.tlsrpt.record import Discovery, TLSRPTDNSError
from twisted_mta.tlsrpt.send import Report, ReportSender, default_from

log = Logger()

DAY = 86400
START_DELAY = 60.0  # after start-up, the overdue days wait this long (the queue loads)


def report_id(day: str, domain: str, submitter: str, at: str = "") -> str:
    """
    The day's report id (L{tlsreport.report_id}: the same when sent again
    after a restart); with C{at}, the time of an operator's early report,
    C{2026-12-03T101500Z.example.org@submitter}.
    """
    if not at:
        return tlsreport.report_id(day, domain, submitter)
    return f"{day}{at}.{tlsreport.a_label(domain)}@{tlsreport.a_label(submitter)}"


class ReportSchedule(service.Service):
    name = "tlsrpt-reports"

    def __init__(self, settings: TLSRPTSettings, directory: str, sender: ReportSender,
                 discover: Callable[[str], defer.Deferred], clock, run_blocking,
                 rand: Callable[[], float] = random.random, aggregate=None) -> None:
        self.settings = settings
        self.directory = directory  # store.directory_of(spool)
        self.sender = sender
        self.discover = discover  # domain -> Deferred[Discovery] (record.discover in the pool)
        self.clock = clock
        self.run_blocking = run_blocking
        self.rand = rand
        self.aggregate = aggregate  # a store.Aggregate: today's counts not yet on disk
        self._timer = None
        self._running: defer.Deferred | None = None
        self.sending: set[defer.Deferred] = set()  # reports on their way (HTTPS retries)

    @property
    def submitter(self) -> str:
        return self.settings.submitter_domain or ""

    # -- the timer --

    def startService(self) -> None:
        service.Service.startService(self)
        now = self.clock.seconds()
        at = now - now % DAY + self.rand() * self.settings.send_delay
        self._arm(at - now if at > now else START_DELAY)

    def stopService(self):
        service.Service.stopService(self)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.sender.https.stop()  # the POSTs waiting to try again give up
        return defer.DeferredList(list(self.sending))

    def _arm(self, delay: float) -> None:
        self._timer = self.clock.callLater(max(0.0, delay), self._due)

    def _due(self) -> None:
        self._timer = None
        d = self.run()
        d.addErrback(lambda f: log.failure("tlsrpt: the daily reports failed", f,
                                           event="tlsrpt.error"))
        now = self.clock.seconds()
        self._arm(now - now % DAY + DAY + self.rand() * self.settings.send_delay - now)

    # -- a run --

    def run(self) -> defer.Deferred:
        """
        Report every past day not yet reported, then prune; fires when the
        reports are on their way (the mail queued; the POSTs may still be
        retrying).
        """
        if self._running is not None:
            return self._running
        d = defer.ensureDeferred(self._run())
        if not d.called:
            self._running = d

            def done(result):
                self._running = None
                return result
            d.addBoth(done)
        return d

    async def _run(self) -> None:
        today = store.day_of(self.clock.seconds())
        days = await self.run_blocking(store.list_days, self.directory)
        for day in days:
            if day < today:
                await self._report_day(day)
        removed = await self.run_blocking(store.prune, self.directory, today)
        if removed:
            log.info("tlsrpt: pruned the counts of {days}", days=", ".join(removed),
                     event="tlsrpt.pruned")

    def send_now(self, domain: str | None = None) -> str:
        """
        The operator's request: today's reports so far, for C{domain} or
        all; returns at once, in words (the outcomes are logged).
        """
        now = self.clock.seconds()
        at = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("T%H%M%SZ")
        d = defer.ensureDeferred(self._report_day(store.day_of(now), only=domain, at=at))
        d.addErrback(lambda f: log.failure("tlsrpt: sending today's reports failed", f,
                                           event="tlsrpt.error"))
        return f"sending today's TLS reports{' for ' + domain if domain else ''}"

    async def _counts(self, day: str):
        today = store.day_of(self.clock.seconds())
        if self.aggregate is not None and day == today:  # newer than its file
            counts = self.aggregate.snapshot(day)
            if counts is not None:
                return counts
        try:
            return await self.run_blocking(store.load_day, self.directory, day)
        except store.DamagedDay as e:
            log.warn("tlsrpt: the counts of {day} cannot be read ({why}); not reported",
                     day=day, why=str(e), event="tlsrpt.damaged")
            return None

    async def _report_day(self, day: str, only: str | None = None, at: str = "") -> None:
        counts = await self._counts(day)
        if counts is None:
            return
        done = set() if at else await self.run_blocking(store.sent_domains, self.directory,
                                                        day)
        domains = sorted(counts.domains)
        if only is not None:
            only = only.lower().rstrip(".")
            domains = [d for d in domains if d == only]
            if not domains:
                log.info("tlsrpt: no sessions with {domain} counted on {day}: no report",
                         domain=only, day=day, event="tlsrpt.none")
        for domain in domains:
            if domain in done:
                continue
            if self._skipped(domain):
                if not at:
                    await self._mark(day, domain, "skipped ([tlsrpt] skip_domains)")
                continue
            try:
                found: Discovery = await self.discover(domain)
            except TLSRPTDNSError as e:
                log.warn("tlsrpt: {domain}: {why}; its report for {day} waits for the next "
                         "run", domain=domain, why=str(e), day=day, event="tlsrpt.dns")
                continue
            except Exception:
                log.failure("tlsrpt: looking up the TLSRPT record of {domain} failed",
                            domain=domain, event="tlsrpt.error")
                continue
            if found.record is None:
                if found.why != "no TLSRPT record":  # published, but invalid: say so once
                    log.warn("tlsrpt: {domain} publishes no valid TLSRPT record ({why}): "
                             "no report for {day}", domain=domain, why=found.why, day=day,
                             event="tlsrpt.invalid_record")
                if not at:
                    await self._mark(day, domain, f"no record: {found.why}")
                continue
            if found.why:
                log.info("tlsrpt: {domain}'s TLSRPT record: {why}", domain=domain,
                         why=found.why, event="tlsrpt.record")
            report = self.build(day, domain, counts.counts(domain), at)
            mail, d = self.sender.start(report, found.record.ruas)
            self.sending.add(d)
            d.addBoth(self._sent, d, day, domain, report, at)
            # The mail on disk before the next domain; the POSTs may retry
            # for hours meanwhile.
            await mail

    def _sent(self, outcomes, d, day: str, domain: str, report: Report, at: str):
        self.sending.discard(d)
        if at or not isinstance(outcomes, list):
            return None
        if not all(o.final for o in outcomes):  # (the disk refused it, the MTA stopped)
            return None  # the next run tries again
        return self._mark(day, domain, report.report_id)

    def _mark(self, day: str, domain: str, note: str) -> defer.Deferred:
        d = self.run_blocking(store.mark_sent, self.directory, day, domain, note)
        d.addErrback(lambda f: log.warn("tlsrpt: cannot record that the report of {domain} "
                                        "for {day} was sent: {why}", domain=domain, day=day,
                                        why=f.getErrorMessage(), event="tlsrpt.error"))
        return d

    def _skipped(self, domain: str) -> bool:
        return any(domain == s or domain.endswith("." + s.lower().rstrip("."))
                   for s in self.settings.skip_domains)

    def build(self, day: str, domain: str, counts, at: str = "") -> Report:
        submitter = self.submitter
        rid = report_id(day, domain, submitter, at)
        data = tlsreport.build(day, domain, counts, self.settings.organization_name or "",
                               self.settings.contact_info or "", rid)
        begin, end = tlsreport.day_bounds(day)
        unique = "".join(c for c in at if c.isalnum()) or None
        return Report(policy_domain=tlsreport.a_label(domain), submitter=submitter,
                      report=data, body=tlsreport.to_gzip(data),
                      filename=tlsreport.filename(submitter, domain, begin, end, unique))


def from_address(settings: TLSRPTSettings) -> Callable[[str], str]:
    return lambda submitter: settings.from_address or default_from(submitter)
