"""
The durable TLS-RPT aggregate (twisted_mta.tlsrpt.store): counting,
writes at most once per second, atomic day files, damaged files set
aside, the caps, the sent markers and pruning.
"""

import json
import os

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tlsrpt import store
from twisted_mta.tlsrpt.counts import Detail, Policy

DAY = "2026-12-03"
T0 = 1796256000.0 + 12 * 3600  # noon, 2026-12-03 UTC
STS = {"policy-type": "sts", "policy-string": ["version: STSv1", "mode: enforce",
                                               "mx: mx.example.org", "max_age: 86400"],
       "mx-host": ["mx.example.org"]}


def event(domain="example.org", result="success", time=T0, policy=None, **fields):
    e = {"time": time, "domain": domain, **(policy or {"policy-type": "no-policy-found"}),
         "result": result}
    e.update({k.replace("_", "-"): v for k, v in fields.items()})
    return e


EXPIRED = dict(result="certificate-expired", sending_mta_ip="192.0.2.1",
               receiving_mx_hostname="mx.example.org", receiving_ip="198.51.100.1",
               failure_reason_code="certificate-expired")


class Recorder:
    """A synchronous run_blocking that counts its calls and can fail."""

    def __init__(self):
        self.calls = []
        self.fail = None

    def __call__(self, f, *args):
        self.calls.append(f.__name__)
        if self.fail is not None and f is store.write_day:
            return defer.fail(self.fail)
        return defer.maybeDeferred(f, *args)


class AggregateTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(T0)
        self.run = Recorder()
        self.agg = self.make()

    def make(self, **kw):
        agg = store.Aggregate(self.dir, self.clock, self.run, **kw)
        self.successResultOf(agg.start())
        return agg

    def on_disk(self, day=DAY):
        return store.load_day(self.dir, day)

    def test_counts_and_writes_once_per_second(self):
        """Events are counted at once and written a second after the first, in one write."""
        for _ in range(3):
            self.agg("tls.result", event())
        self.agg("tls.result", event(**EXPIRED))
        self.agg("tls.result", event(**EXPIRED))
        self.agg("tls.session", {"ignored": True})
        self.assertIsNone(self.on_disk())
        self.clock.advance(0.99)
        self.assertIsNone(self.on_disk())
        self.clock.advance(0.01)
        self.assertEqual(self.run.calls.count("write_day"), 1)
        [c] = self.on_disk().counts("example.org")
        self.assertEqual((c.successes, c.failures), (3, 2))
        self.assertEqual(c.details, {Detail("certificate-expired", "192.0.2.1",
                                            "mx.example.org", None, "198.51.100.1",
                                            "certificate-expired"): 2})
        # quiet: no more writes
        self.clock.advance(10)
        self.assertEqual(self.run.calls.count("write_day"), 1)
        self.assertEqual(os.listdir(self.dir), [f"{DAY}.json"])  # no temporary left

    def test_policies_and_domains_apart(self):
        self.agg("tls.result", event())
        self.agg("tls.result", event(policy=STS))
        self.agg("tls.result", event("Other.Example."))
        self.successResultOf(self.agg.flush())
        day = self.on_disk()
        self.assertEqual(sorted(day.domains), ["example.org", "other.example"])
        self.assertEqual(sorted(c.policy.policy_type for c in day.counts("example.org")),
                         ["no-policy-found", "sts"])
        sts = [c for c in day.counts("example.org") if c.policy.policy_type == "sts"][0]
        self.assertEqual(sts.policy, Policy("sts", tuple(STS["policy-string"]),
                                            ("mx.example.org",)))

    def test_restart_continues_the_day(self):
        """A new aggregate (a restart) reads today's counts and adds to them."""
        self.agg("tls.result", event())
        self.successResultOf(self.agg.stop())
        again = self.make()
        again("tls.result", event())
        self.successResultOf(again.stop())
        [c] = self.on_disk().counts("example.org")
        self.assertEqual(c.successes, 2)

    def test_midnight(self):
        """Events after midnight count for the new day; the old day leaves memory once written."""
        self.agg("tls.result", event())
        self.clock.advance(12 * 3600)
        self.agg("tls.result", event(time=self.clock.seconds()))
        self.successResultOf(self.agg.flush())
        self.assertEqual(store.list_days(self.dir), [DAY, "2026-12-04"])
        self.assertEqual(list(self.agg.days), ["2026-12-04"])

    def test_day_on_disk_not_yet_read_is_merged(self):
        """A day whose file exists but was not read (a late event) is merged, never replaced."""
        self.agg("tls.result", event())
        self.successResultOf(self.agg.stop())
        self.clock.advance(86400)  # the next day: start() reads the 4th only
        again = self.make()
        again("tls.result", event(time=T0))  # a session of the 3rd, reported late
        self.successResultOf(again.flush())
        [c] = self.on_disk().counts("example.org")
        self.assertEqual(c.successes, 2)

    def test_events_while_start_reads(self):
        """Sessions counted before today's file is read are added to it, the file read once."""
        self.agg("tls.result", event())
        self.successResultOf(self.agg.stop())
        pending = []

        def run(f, *args):
            if f is store.write_day:
                return defer.maybeDeferred(f, *args)
            d = defer.Deferred()
            pending.append((d, f, args))
            return d
        agg = store.Aggregate(self.dir, self.clock, run)
        started = agg.start()
        agg("tls.result", event())
        self.clock.advance(1)  # the write waits for the read under way
        self.assertEqual(len(pending), 1)
        d, f, args = pending.pop()
        d.callback(f(*args))
        self.successResultOf(started)
        self.successResultOf(agg.flush())
        self.assertEqual(pending, [])
        self.assertEqual(self.on_disk().counts("example.org")[0].successes, 2)

    def test_damaged_file_set_aside(self):
        """A day file that cannot be read is set aside and named in one log line; counting goes on."""
        from twisted.logger import globalLogPublisher
        logged = []

        def observe(e):
            if e.get("event") == "tlsrpt.damaged":
                logged.append(e)
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        os.makedirs(self.dir, exist_ok=True)
        for junk in (b'{"format": 1, "day": "2026-12-03", "domains": {"a": [{}]}}',
                     b"\x00\x00garbage"):
            with open(os.path.join(self.dir, f"{DAY}.json"), "wb") as f:
                f.write(junk)
            agg = self.make()
            self.assertEqual(self.flushLoggedErrors(), [])
            self.assertEqual(len(logged), 1)
            self.assertIn(f"{DAY}.json.damaged-", logged.pop()["where"])
            self.assertNotIn(f"{DAY}.json", os.listdir(self.dir))
            self.assertTrue(any(n.startswith(f"{DAY}.json.damaged-") for n in
                                os.listdir(self.dir)))
            agg("tls.result", event())
            self.successResultOf(agg.flush())
            self.assertEqual(self.on_disk().counts("example.org")[0].successes, 1)
            for n in os.listdir(self.dir):
                if "damaged" in n:
                    os.unlink(os.path.join(self.dir, n))

    def test_write_failure_retried(self):
        """A failed write is logged once and tried again a second later."""
        self.run.fail = OSError(28, "No space left on device")
        self.agg("tls.result", event())
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.run.calls.count("write_day"), 2)
        self.assertIsNone(self.on_disk())
        self.run.fail = None
        self.clock.advance(1)
        self.assertEqual(self.on_disk().counts("example.org")[0].successes, 1)

    def test_skip_domains(self):
        agg = self.make(skip_domains=["Skip.example"])
        for d in ("skip.example", "mx.skip.example", "noskip.example"):
            agg("tls.result", event(d))
        self.successResultOf(agg.flush())
        self.assertEqual(list(self.on_disk().domains), ["noskip.example"])

    def test_caps(self):
        """At most max_domains domains a day; failure groups past the cap merge per result type."""
        agg = self.make(max_domains=2, max_details=2)
        for d in ("a.example", "b.example", "c.example", "d.example"):
            agg("tls.result", event(d))
        for i in range(5):
            agg("tls.result", event("a.example", **{**EXPIRED, "receiving_ip": f"192.0.2.{i}"}))
        agg("tls.result", event("a.example", result="starttls-not-supported",
                                receiving_ip="192.0.2.99"))
        self.successResultOf(agg.flush())
        day = self.on_disk()
        self.assertEqual((sorted(day.domains), day.dropped), (["a.example", "b.example"], 2))
        [c] = day.counts("a.example")
        self.assertEqual(c.failures, 6)
        self.assertEqual(len(c.details), 4)
        self.assertEqual(c.details[Detail("certificate-expired",
                                          failure_reason_code=store.OTHER_REASON)], 3)
        self.assertEqual(c.details[Detail("starttls-not-supported",
                                          failure_reason_code=store.OTHER_REASON)], 1)


class FileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())

    def write(self, day, domains):
        counts = store.DayCounts(day)
        for d in domains:
            counts.add(d, Policy("no-policy-found"), None)
        store.write_day(self.dir, day, json.dumps(counts.to_json()).encode())

    def test_round_trip_and_listing(self):
        self.write("2026-12-02", ["a.example"])
        self.write("2026-12-01", ["b.example"])
        with open(os.path.join(self.dir, "notes.txt"), "w") as f:
            f.write("x")
        self.assertEqual(store.list_days(self.dir), ["2026-12-01", "2026-12-02"])
        self.assertEqual(list(store.load_day(self.dir, "2026-12-01").domains), ["b.example"])
        self.assertIsNone(store.load_day(self.dir, "2026-11-30"))
        self.assertEqual(store.list_days(self.dir + "-none"), [])
        self.assertRaises(ValueError, store.load_day, self.dir, "../x")

    def test_wrong_day_inside(self):
        self.write("2026-12-02", ["a.example"])
        os.rename(os.path.join(self.dir, "2026-12-02.json"),
                  os.path.join(self.dir, "2026-12-01.json"))
        self.assertRaises(store.DamagedDay, store.load_day, self.dir, "2026-12-01")

    def test_sent_and_prune(self):
        """A past day goes once every domain is marked sent, or when too old; today stays."""
        self.write("2026-12-03", ["a.example"])  # today
        self.write("2026-12-02", ["a.example", "b.example"])
        self.write("2026-11-20", ["c.example"])  # too old, never sent
        store.mark_sent(self.dir, "2026-12-02", "a.example", "report-1")
        self.assertEqual(store.sent_domains(self.dir, "2026-12-02"), {"a.example"})
        self.assertEqual(store.prune(self.dir, "2026-12-03"), ["2026-11-20"])
        store.mark_sent(self.dir, "2026-12-02", "B.example.")
        self.assertEqual(store.prune(self.dir, "2026-12-03"), ["2026-12-02"])
        self.assertEqual(store.list_days(self.dir), ["2026-12-03"])
        self.assertEqual(os.listdir(os.path.join(self.dir, "sent")), [])
        self.assertRaises(ValueError, store.mark_sent, self.dir, "2026-12-02", "../x")
