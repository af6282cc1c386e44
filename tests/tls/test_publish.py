"""
tls/publish.py: the records and policy files suggested for our own
domains, and the checks of what is published now, from certificates made
at test time and lookups answered from tables (no DNS); the resolver
adapter on a scripted resolver; C{tls publish} through the command line.
"""

from __future__ import annotations

import datetime
import json
import os

import dns.rdata
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.trial.unittest import SynchronousTestCase

from tests.support import make_config
from tests.test_cli import run_cli
from twisted_mta.tls import dnssec, publish, sts
from twisted_mta.tls.dane import TLSARecord, record_for
from twisted_mta.tls.publish import Answer, Keys, LookupFailed, Lookups

MX = "mx.example.test"
TLSA = f"_25._tcp.{MX}"
DOMAIN = "example.test"
STS_TXT = f"_mta-sts.{DOMAIN}"
NOW = datetime.datetime(2030, 6, 1, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(key, names=(MX,), days=90, issuer=None, ca=False, at=NOW):
    """
    A certificate for C{names} with C{key}, valid from 30 days before
    C{at} to C{days} after it; self-signed unless C{issuer} is a (cert,
    key) pair.
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "x")])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(at - 30 * DAY).not_valid_after(at + days * DAY)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


CA_KEY = _key()
CA = _cert(CA_KEY, ("Test CA",), days=3650, ca=True)
KEY, NEXT_KEY, OTHER_KEY = _key(), _key(), _key()
CERT = _cert(KEY, issuer=(CA, CA_KEY))
CHAIN = (CERT, CA)
MATCH = record_for(CERT)
NEXT = record_for(_cert(NEXT_KEY))
STALE = record_for(_cert(OTHER_KEY))


def _config(base, **sections):
    sections.setdefault("local", {"domains": [DOMAIN], "users": ["postmaster"], "aliases": {}})
    return make_config(base, **sections)


def _policy_id(config) -> str:
    mx = config.publish.mx or (config.hostname,)
    return publish.policy_id(publish.policy_text(config.publish, mx))


class FakeLookups:
    """
    Lookups answered from tables: a name (or domain) to an L{Answer}, a
    L{LookupFailed} to raise, or (policies) a policy; what was asked is
    kept.
    """

    def __init__(self, tlsa=None, txt=None, policies=None):
        self.tables = {"tlsa": tlsa or {}, "txt": txt or {}, "policy": policies or {}}
        self.asked: list[tuple[str, str]] = []

    def _ask(self, kind: str, name: str):
        self.asked.append((kind, name))
        value = self.tables[kind].get(name, Answer() if kind != "policy" else None)
        if isinstance(value, Exception):
            raise value
        if value is None:
            raise LookupFailed(f"no policy host for {name}")
        return value

    def lookups(self) -> Lookups:
        return Lookups(tlsa=lambda n: self._ask("tlsa", n), txt=lambda n: self._ask("txt", n),
                       policy=lambda d: self._ask("policy", d))


class ReportCase(SynchronousTestCase):
    """
    Reports built from tables of published records.
    """

    def setUp(self):
        self.config = _config(self.mktemp())
        self.sid = _policy_id(self.config)
        self.good_txt = {STS_TXT: Answer([f"v=STSv1; id={self.sid}".encode()], True)}

    def report(self, tlsa=None, txt=None, policies=None, keys=None, config=None, now=NOW):
        fake = FakeLookups(tlsa, self.good_txt if txt is None else txt, policies)
        keys = keys if keys is not None else Keys(CHAIN, "cert.pem")
        self.fake = fake
        return publish.build(config or self.config, keys, fake.lookups(), now)

    def levels(self, report, level):
        return [c.text for c in report.checks if c.level == level]

    def assertWarns(self, report, *fragments):
        """Each fragment is in exactly one warning, and exit status is 1."""
        warnings = report.warnings
        for fragment in fragments:
            self.assertEqual(len([w for w in warnings if fragment in w]), 1,
                             f"{fragment!r} not in exactly one of {warnings}")
        self.assertEqual(len(warnings), len(fragments), warnings)
        self.assertEqual(report.exit_code, 1)



class BuildTests(ReportCase):
    """
    L{publish.build}: the DANE records and the certificate checks.
    """

    def test_all_good(self):
        """A published 3 1 1 record that matches, the policy's id: no warning, exit 0."""
        report = self.report({TLSA: Answer([MATCH, STALE], True)})
        self.assertEqual(report.warnings, ())
        self.assertEqual(report.exit_code, 0)
        self.assertIn(f"{TLSA}: {MATCH.short} matches the certificate in use now",
                      self.levels(report, publish.OK))
        self.assertIn(f"{TLSA}: {STALE.short} matches neither the key in use now nor the "
                      "next key: drop it once no server uses its key",
                      self.levels(report, publish.NOTE))
        self.assertNotIn(("policy", DOMAIN), self.fake.asked)

    def test_records_suggested(self):
        """TLSA 3 1 1 of the leaf's key at _25._tcp.<mx>, the STS and TLS-RPT TXT records."""
        report = self.report({TLSA: Answer([MATCH], True)})
        self.assertEqual([(r.name, r.rtype, r.value) for r in report.records], [
            (TLSA, "TLSA", MATCH.to_text()),
            (STS_TXT, "TXT", f"v=STSv1; id={self.sid}"),
            (f"_smtp._tls.{DOMAIN}", "TXT", f"v=TLSRPTv1; rua=mailto:tlsrpt@{DOMAIN}"),
        ])
        self.assertTrue(MATCH.to_text().startswith("3 1 1 "))
        self.assertEqual(report.records[1].zone_line().split("  ;")[0],
                         f'{STS_TXT}. IN TXT "v=STSv1; id={self.sid}"')

    def test_mismatching_record(self):
        """Only a record of another key: one warning naming it, exit 1."""
        report = self.report({TLSA: Answer([STALE], True)})
        self.assertWarns(report, "no published TLSA record matches the certificate in use now")
        self.assertIn(STALE.short, report.warnings[0])

    def test_unusable_record_only(self):
        """A PKIX-EE record of our key does not count for SMTP: a warning, and a note why."""
        pkix = TLSARecord(1, 1, 1, MATCH.data)
        report = self.report({TLSA: Answer([pkix], True)})
        self.assertWarns(report, "no published TLSA record matches the certificate in use now")
        self.assertTrue(any("is ignored by senders: PKIX-EE(1) is not used for SMTP" in n
                            for n in self.levels(report, publish.NOTE)))

    def test_dane_ta_record_matches(self):
        """A 2 1 1 record of the CA that issued the certificate matches through the chain."""
        ta = record_for(CA, usage=2)
        report = self.report({TLSA: Answer([ta], True)})
        self.assertEqual(report.warnings, ())
        self.assertIn(f"{TLSA}: {ta.short} matches the certificate in use now",
                      self.levels(report, publish.OK))

    def test_next_key(self):
        """[tls] next_key: its record is suggested; published, ok; not published, a warning; under DANE-TA, a note."""
        keys = Keys(CHAIN, "cert.pem", NEXT_KEY.public_key(), "next.pem")
        ta = record_for(CA, usage=2)
        cases = [
            ([MATCH, NEXT], None, f"{TLSA}: {NEXT.short} matches the next key"),
            ([MATCH], "switching to it would break DANE", None),
            ([ta], None, "a certificate for the next key from the same CA keeps matching"),
        ]
        for published, warning, fine in cases:
            report = self.report({TLSA: Answer(published, True)}, keys=keys)
            tlsa = [r.value for r in report.records if r.rtype == "TLSA"]
            self.assertEqual(tlsa, [MATCH.to_text(), NEXT.to_text()])
            if warning:
                self.assertWarns(report, warning)
            else:
                self.assertEqual(report.warnings, (), published)
                self.assertTrue(any(fine in c.text for c in report.checks), report.checks)

    def test_next_key_is_current(self):
        """A next_key that is the key in use now: one record, a note."""
        keys = Keys(CHAIN, "cert.pem", KEY.public_key(), "next.pem")
        report = self.report({TLSA: Answer([MATCH], True)}, keys=keys)
        self.assertEqual([r.value for r in report.records if r.rtype == "TLSA"],
                         [MATCH.to_text()])
        self.assertIsNone(report.next)
        self.assertIn("[tls] next_key next.pem is the key in use now",
                      self.levels(report, publish.NOTE))

    def test_no_records(self):
        """NXDOMAIN/NODATA (an empty answer): no record matches, a warning."""
        report = self.report({TLSA: Answer()})
        self.assertWarns(report, f"{TLSA}: no TLSA record is published")

    def test_not_dnssec_validated(self):
        """Records the resolver did not vouch for: a note, not a warning."""
        report = self.report({TLSA: Answer([MATCH], secure=False)})
        self.assertEqual(report.warnings, ())
        self.assertTrue(any("not DNSSEC-validated" in n for n in self.levels(report, publish.NOTE)))

    def test_dns_failure(self):
        """A failed lookup is one warning line each, and the rest of the report goes on."""
        failed = LookupFailed("no answer from 127.0.0.1:9 within 1s")
        report = self.report({TLSA: failed}, {STS_TXT: failed})
        self.assertWarns(report, f"{TLSA}: the TLSA lookup failed (no answer from",
                         f"{STS_TXT}: the TXT lookup failed (no answer from")
        self.assertTrue(all("\n" not in w for w in report.warnings))
        self.assertEqual(len(report.records), 3)
        self.assertIn(f"the certificate in cert.pem names {MX}", self.levels(report, publish.OK))

    def test_certificate_dates(self):
        """Expiring within 30 days, or expired: a warning; 31 days: fine."""
        for days, warning in ((10, "expires on 2030-06-11, in 10 days"),
                              (-2, "expired on 2030-05-30"), (31, None)):
            cert = _cert(KEY, issuer=(CA, CA_KEY), days=days)
            report = self.report({TLSA: Answer([MATCH], True)}, keys=Keys((cert, CA), "c.pem"))
            if warning:
                self.assertWarns(report, warning)
            else:
                self.assertEqual(report.warnings, ())

    def test_certificate_name(self):
        """A certificate without the MX host's name: a warning naming the names it has."""
        cert = _cert(KEY, names=("other.example.test",), issuer=(CA, CA_KEY))
        report = self.report({TLSA: Answer([MATCH], True)}, keys=Keys((cert, CA), "c.pem"))
        self.assertWarns(report, f"is not valid for {MX} (it names other.example.test)")

    def test_publish_mx_hosts(self):
        """[publish] mx: a TLSA record and a name check for each, an mx: line each."""
        config = _config(self.mktemp(), publish={"mx": [MX, "mx2.example.test"]})
        sid = _policy_id(config)
        self.assertNotEqual(sid, self.sid)
        report = self.report({TLSA: Answer([MATCH], True)}, config=config,
                             txt={STS_TXT: Answer([f"v=STSv1; id={sid}"])})
        self.assertEqual([r.name for r in report.records if r.rtype == "TLSA"],
                         [TLSA, "_25._tcp.mx2.example.test"])
        self.assertWarns(report, "_25._tcp.mx2.example.test: no TLSA record is published",
                         "is not valid for mx2.example.test")
        self.assertIn("mx: mx.example.test\r\nmx: mx2.example.test\r\n", report.policies[0].text)

    def test_self_signed_under_enforce(self):
        """A self-signed certificate: a note, a warning when the policy would be enforce."""
        cert = _cert(KEY)
        for mode, level in (("testing", publish.NOTE), ("enforce", publish.WARNING)):
            config = _config(self.mktemp(), publish={"sts_mode": mode})
            report = self.report({TLSA: Answer([MATCH], True)}, keys=Keys((cert,), "c.pem"),
                                 config=config,
                                 txt={STS_TXT: Answer([f"v=STSv1; id={_policy_id(config)}"])})
            self.assertEqual([c.level for c in report.checks if "self-signed" in c.text],
                             [level])

    def test_no_certificate(self):
        """No [tls] certificate: said in one line; MTA-STS and TLS-RPT still suggested; no TLSA lookup."""
        report = self.report(keys=Keys())
        self.assertWarns(report, "no [tls] certificate is configured")
        self.assertEqual([r.rtype for r in report.records], ["TXT", "TXT"])
        self.assertEqual(len(report.policies), 1)
        self.assertFalse(any(kind == "tlsa" for kind, _ in self.fake.asked))

    def test_unreadable_files(self):
        """Key files that cannot be used are warnings (from load_keys), not 'not configured'."""
        keys = Keys(certificate_file="cert.pem", problems=("cannot read [tls] certificate "
                                                           "cert.pem: No such file",))
        report = self.report(keys=keys)
        self.assertWarns(report, "cannot read [tls] certificate cert.pem")


class StsTests(ReportCase):
    """
    The published _mta-sts id against the suggested policy.
    """

    def sts_checks(self, txt, policies=None):
        report = self.report({TLSA: Answer([MATCH], True)}, {STS_TXT: txt}, policies)
        return report, [c for c in report.checks if STS_TXT in c.text]

    def test_policy_text(self):
        """The policy parses (sts.parse_policy), has CRLF endings, and its id is its hash."""
        report = self.report({TLSA: Answer([MATCH], True)})
        (policy,) = report.policies
        self.assertEqual(policy.text, "version: STSv1\r\nmode: testing\r\nmx: mx.example.test\r\n"
                                      "max_age: 604800\r\n")
        self.assertEqual(policy.url, f"https://mta-sts.{DOMAIN}/.well-known/mta-sts.txt")
        parsed = sts.parse_policy(policy.text)
        self.assertEqual((parsed.mode, parsed.max_age, parsed.mx),
                         ("testing", 604800, (MX,)))
        self.assertRegex(policy.id, r"^[0-9a-f]{16}$")
        other = _config(self.mktemp(), publish={"sts_max_age": "1d"})
        self.assertNotEqual(_policy_id(other), policy.id)
        self.assertEqual(_policy_id(_config(self.mktemp())), policy.id)

    def test_id_matches(self):
        """The suggested id published: ok, and the policy is not fetched."""
        _, checks = self.sts_checks(Answer([f"v=STSv1; id={self.sid}"]))
        self.assertEqual([c.level for c in checks], [publish.OK])
        self.assertNotIn(("policy", DOMAIN), self.fake.asked)

    def test_id_differs_policy_differs(self):
        """Another id, and the policy served is not this one: a warning saying what to do."""
        served = sts.parse_policy("version: STSv1\nmode: enforce\nmx: old.example.test\n"
                                  "max_age: 86400\n")
        report, checks = self.sts_checks(Answer(["v=STSv1; id=20240101"]), {DOMAIN: served})
        self.assertWarns(report, f"{STS_TXT} publishes id=20240101, not {self.sid}, and the "
                                 "policy at")
        self.assertIn(f"serve this policy, then publish id={self.sid}", report.warnings[0])

    def test_id_differs_policy_same(self):
        """Another id (the admin's own scheme) with this very policy: ok."""
        served = sts.parse_policy(f"version: STSv1\nmode: testing\nmx: {MX}\nmax_age: 604800\n")
        report, checks = self.sts_checks(Answer(["v=STSv1; id=20240101"]), {DOMAIN: served})
        self.assertEqual(report.warnings, ())
        self.assertEqual([c.level for c in checks], [publish.OK])

    def test_id_differs_fetch_fails(self):
        """Another id, and the policy cannot be fetched: one warning with the reason."""
        report, _ = self.sts_checks(Answer(["v=STSv1; id=20240101"]),
                                    {DOMAIN: LookupFailed("HTTP 404 Not Found")})
        self.assertWarns(report, "the policy served was not checked: HTTP 404 Not Found")

    def test_no_or_invalid_record(self):
        """No v=STSv1 record, or two: a warning with sts's words; with mode none, a note."""
        for records, words in (([], "no v=STSv1 TXT record"),
                               ([b"v=STSv1; id=a", b"v=STSv1; id=b"], "2 v=STSv1 TXT records")):
            report, _ = self.sts_checks(Answer(records))
            self.assertWarns(report, f"{STS_TXT}: {words}")
        config = _config(self.mktemp(), publish={"sts_mode": "none"})
        report = self.report({TLSA: Answer([MATCH], True)}, {STS_TXT: Answer()}, config=config)
        self.assertEqual(report.warnings, ())

    def test_max_age_too_long(self):
        """An sts_max_age past a year: the policy is not valid, said in one warning; nothing fetched."""
        config = _config(self.mktemp(), publish={"sts_max_age": "400d"})
        report = self.report({TLSA: Answer([MATCH], True)}, config=config)
        self.assertWarns(report, "the policy made from [publish] is not valid: line 4: max_age "
                                 "34560000 is more than 31557600 (a year)")
        self.assertEqual([kind for kind, _ in self.fake.asked], ["tlsa"])

    def test_tlsrpt_rua(self):
        """[publish] tlsrpt_rua replaces the default; a URI neither mailto: nor https: warns."""
        config = _config(self.mktemp(), publish={
            "tlsrpt_rua": ["mailto:reports@example.net", "ftp://example.net/x"]})
        report = self.report({TLSA: Answer([MATCH], True)}, config=config)
        (tlsrpt,) = [r for r in report.records if r.name.startswith("_smtp._tls.")]
        self.assertEqual(tlsrpt.value,
                         "v=TLSRPTv1; rua=mailto:reports@example.net,ftp://example.net/x")
        self.assertWarns(report, "'ftp://example.net/x' is neither a mailto: nor an https: URI")


class OutputTests(ReportCase):
    """
    The report as JSON and in words.
    """

    def test_json_shape(self):
        """One JSON object: keys, records, policies (CRLF), checks and warnings."""
        keys = Keys(CHAIN, "cert.pem", NEXT_KEY.public_key(), "next.pem")
        report = self.report({TLSA: Answer([MATCH], True)}, keys=keys)
        data = json.loads(json.dumps(report.to_dict()))
        self.assertEqual(sorted(data), ["checks", "current_key", "domains", "mx_hosts",
                                        "next_key", "policies", "records", "warnings"])
        self.assertEqual(data["current_key"]["tlsa"], MATCH.to_text())
        self.assertEqual(data["current_key"]["certificate"]["sans"], [MX])
        self.assertEqual(data["next_key"], {"file": "next.pem", "tlsa": NEXT.to_text()})
        self.assertEqual(data["records"][0], {"name": TLSA, "rtype": "TLSA",
                                              "value": MATCH.to_text(),
                                              "about": "DANE: the key in use now (cert.pem)"})
        self.assertTrue(data["policies"][0]["text"].endswith("max_age: 604800\r\n"))
        self.assertEqual(data["warnings"], [w for w in report.warnings])
        self.assertEqual(data["warnings"], [c["text"] for c in data["checks"]
                                            if c["level"] == "warning"])
        self.assertEqual(len(data["warnings"]), 1)

    def test_text(self):
        """Zone-file lines, the policy file, then one line per check."""
        text = publish.format_report(self.report({TLSA: Answer([STALE], True)}))
        lines = text.splitlines()
        self.assertIn(f"{TLSA}. IN TLSA {MATCH.to_text()}  ; DANE: the key in use now "
                      "(cert.pem)", lines)
        self.assertIn(f"# serve as text/plain at https://mta-sts.{DOMAIN}/.well-known/"
                      "mta-sts.txt (CRLF line endings):", lines)
        self.assertIn("mode: testing", lines)
        self.assertEqual(len([line for line in lines if line.startswith("warning: ")]), 1)
        self.assertNotIn("\r", text)


class LoadKeysTests(SynchronousTestCase):
    """
    L{publish.load_keys}: the chain and the next key from PEM files.
    """

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.base, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def settings(self, **files):
        from twisted_mta.config import TLSServerSettings
        return TLSServerSettings(**files)

    def test_chain_and_next_key_forms(self):
        """The chain leaf first; next_key as a private key, a public key or a certificate."""
        pem = serialization.Encoding.PEM
        chain = self.write("cert.pem", CERT.public_bytes(pem) + CA.public_bytes(pem))
        forms = {
            "private": NEXT_KEY.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()),
            "public": NEXT_KEY.public_key().public_bytes(
                pem, serialization.PublicFormat.SubjectPublicKeyInfo),
            "certificate": _cert(NEXT_KEY).public_bytes(pem),
        }
        for form, data in forms.items():
            keys = publish.load_keys(self.settings(certificate=chain, key=chain,
                                                   next_key=self.write(form, data)))
            self.assertEqual(keys.problems, (), form)
            self.assertEqual(keys.chain, CHAIN)
            self.assertEqual(record_for(publish._KeyOnly(keys.next_key)), NEXT, form)

    def test_problems(self):
        """A missing file, a file without PEM, an encrypted key: one problem line each."""
        pem = serialization.Encoding.PEM
        encrypted = self.write("enc.pem", NEXT_KEY.private_bytes(
            pem, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        junk = self.write("junk.pem", b"not a key\n")
        missing = os.path.join(self.base, "missing.pem")
        for settings, problem in (
                (self.settings(certificate=missing, key=missing),
                 f"cannot read [tls] certificate {missing}: No such file"),
                (self.settings(certificate=junk, key=junk),
                 f"[tls] certificate {junk} holds no PEM certificate"),
                (self.settings(next_key=junk),
                 f"[tls] next_key {junk}: holds no PEM private key, public key or certificate"),
                (self.settings(next_key=encrypted), "the key is encrypted")):
            keys = publish.load_keys(settings)
            self.assertEqual(len(keys.problems), 1, keys.problems)
            self.assertIn(problem, keys.problems[0])
            self.assertEqual((keys.chain, keys.next_key), ((), None))


class FakeResolver:
    """
    Answers L{dnssec.DNSResult}s from a table, as L{dnssec.DNSSECResolver.lookup} does.
    """

    def __init__(self, table):
        self.table = table

    def lookup(self, name: str, rdtype: str) -> dnssec.DNSResult:
        return self.table[name, rdtype]


class DNSLookupsTests(SynchronousTestCase):
    """
    L{publish.dns_lookups}: dnspython answers into L{Answer}s, failures into
    L{LookupFailed}.
    """

    def test_answers(self):
        """TLSA rdata become TLSARecords, TXT strings are joined; secure is kept; NXDOMAIN is empty."""
        tlsa = dns.rdata.from_text("IN", "TLSA", MATCH.to_text())
        txt = dns.rdata.from_text("IN", "TXT", '"v=STSv1; " "id=abc"')
        lookups = publish.dns_lookups(FakeResolver({
            (TLSA, "TLSA"): dnssec.DNSResult(TLSA, "TLSA", dnssec.SECURE, True, (tlsa,)),
            (STS_TXT, "TXT"): dnssec.DNSResult(STS_TXT, "TXT", dnssec.INSECURE, False, (txt,)),
            ("_25._tcp.none.test", "TLSA"): dnssec.DNSResult("_25._tcp.none.test", "TLSA",
                                                             dnssec.NXDOMAIN, True),
        }), policy=lambda domain: None)
        self.assertEqual(lookups.tlsa(TLSA), Answer((MATCH,), True))
        self.assertEqual(lookups.txt(STS_TXT), Answer((b"v=STSv1; id=abc",), False))
        self.assertEqual(lookups.tlsa("_25._tcp.none.test"), Answer((), True))

    def test_failures(self):
        """An error or a bogus answer is LookupFailed with the resolver's reason."""
        lookups = publish.dns_lookups(FakeResolver({
            (TLSA, "TLSA"): dnssec.DNSResult(TLSA, "TLSA", dnssec.ERROR,
                                             reason="127.0.0.1:9 answered REFUSED"),
            (STS_TXT, "TXT"): dnssec.DNSResult(STS_TXT, "TXT", dnssec.BOGUS, rcode="SERVFAIL",
                                               reason="validation failed at 127.0.0.1:53"),
        }), policy=lambda domain: None)
        with self.assertRaises(LookupFailed) as error:
            lookups.tlsa(TLSA)
        self.assertEqual(str(error.exception), "127.0.0.1:9 answered REFUSED")
        with self.assertRaises(LookupFailed) as error:
            lookups.txt(STS_TXT)
        self.assertEqual(str(error.exception), "the answer failed DNSSEC validation: "
                                               "validation failed at 127.0.0.1:53")


class CommandTests(SynchronousTestCase):
    """
    C{twisted-mta tls publish} with DNS on a closed loopback port: every
    lookup fails at once, each in one line, and the report is printed.
    """

    def setUp(self):
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        pem = serialization.Encoding.PEM
        today = datetime.datetime.now(datetime.timezone.utc)
        cert = _cert(KEY, issuer=(CA, CA_KEY), at=today)
        for name, data in (("cert.pem", cert.public_bytes(pem) + CA.public_bytes(pem)),
                           ("key.pem", KEY.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))):
            with open(os.path.join(self.base, name), "wb") as f:
                f.write(data)
        self.conf = os.path.join(self.base, "mta.toml")
        with open(self.conf, "w") as f:
            f.write(f'[server]\nhostname = "{MX}"\nspool = "spool"\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n'
                    f'[local]\ndomains = ["{DOMAIN}"]\nusers = ["postmaster"]\n')

    def test_dns_failures_json(self):
        """--json: one object; each failed lookup one warning; exit 1; nothing on stderr."""
        code, out, err = run_cli("tls", "publish", "--json", "-c", self.conf)
        self.assertEqual((code, err), (1, ""))
        data = json.loads(out)
        self.assertEqual(data["current_key"]["tlsa"], MATCH.to_text())
        self.assertEqual(len(data["warnings"]), 2, data["warnings"])
        self.assertTrue(data["warnings"][0].startswith(f"{TLSA}: the TLSA lookup failed ("))
        self.assertTrue(data["warnings"][1].startswith(f"{STS_TXT}: the TXT lookup failed ("))

    def test_text_and_bad_config(self):
        """The text report names the record; a bad configuration is one line on stderr, exit 1."""
        code, out, err = run_cli("tls", "publish", "-c", self.conf)
        self.assertEqual((code, err), (1, ""))
        self.assertIn(f"{TLSA}. IN TLSA {MATCH.to_text()}", out)
        self.assertNotIn("Traceback", out)
        code, out, err = run_cli("tls", "publish", "-c", os.path.join(self.base, "nope.toml"))
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("twisted-mta: "), err)
        self.assertEqual(err.count("\n"), 1)
