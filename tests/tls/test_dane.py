"""
DANE (RFC 7672) in tls/dane.py: TLSA records, which are usable, and the
match of a presented certificate chain against them, from a table of
cases with certificates made at test time (cryptography, trustme); the
DANE failure classes of tls/failure.py and their words.
"""

from __future__ import annotations

import datetime
import functools

import attrs
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from twisted.internet import protocol, ssl
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_mta import failures
from twisted_mta.tls import dane
from twisted_mta.tls.dane import DaneVerdict, TLSARecord, match, record_for, usable
from twisted_mta.tls.failure import DANE_KINDS, TLS_KINDS, TLSFailure

MX = "mx.example.org"
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)
PEER = dict(host=MX, address="192.0.2.25", port=25)


def _key(kind: str = "ec"):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _cert(cn: str, key, issuer=None, sans=(), ca: bool | None = False,
          not_before=NOW - DAY, not_after=NOW + 30 * DAY):
    """
    A certificate for C{cn} with C{key}, signed by C{issuer} (a (cert,
    key) pair), or by itself.  C{ca=None}: no basicConstraints at all.
    """
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_name, issuer_key = (issuer[0].subject, issuer[1]) if issuer else (subject, key)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after))
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]),
                            critical=False)
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(issuer_key, algorithm)


@functools.lru_cache(maxsize=None)
def pki():
    """
    Everything the table needs, made once: a root, an intermediate, leaves
    below it, another CA, self-signed leaves, an RSA and an Ed25519 root
    that are never sent.
    """
    p = {}
    root_key, int_key, leaf_key = _key(), _key(), _key()
    p["root"] = _cert("Example Root", root_key, ca=True)
    p["int"] = _cert("Example Intermediate", int_key, (p["root"], root_key), ca=True)
    issuer = (p["int"], int_key)
    p["leaf"] = _cert(MX, leaf_key, issuer, sans=[MX])
    p["leaf-other-name"] = _cert("www.example.net", _key(), issuer, sans=["www.example.net",
                                                                          "example.net"])
    p["leaf-cname"] = _cert("mail.provider.example", _key(), issuer,
                            sans=["mail.provider.example"])
    p["leaf-wildcard"] = _cert("*.example.org", _key(), issuer, sans=["*.example.org"])
    p["leaf-cn-only"] = _cert(MX, _key(), issuer)
    p["leaf-expired"] = _cert(MX, _key(), issuer, sans=[MX], not_before=NOW - 90 * DAY,
                              not_after=NOW - 3 * DAY)
    p["leaf-future"] = _cert(MX, _key(), issuer, sans=[MX], not_before=NOW + 3 * DAY,
                             not_after=NOW + 90 * DAY)
    old_int = _cert("Example Intermediate", int_key, (p["root"], root_key), ca=True,
                    not_before=NOW - 90 * DAY, not_after=NOW - 2 * DAY)
    p["int-expired"] = old_int
    # A non-CA certificate (an ordinary leaf of the root) that signs a
    # certificate for the MX host: the basicConstraints attack.
    rogue_key = _key()
    p["rogue"] = _cert("attacker.example", rogue_key, (p["root"], root_key),
                       sans=["attacker.example"])
    p["leaf-by-rogue"] = _cert(MX, _key(), (p["rogue"], rogue_key), sans=[MX])
    other_root_key = _key()
    p["other-root"] = _cert("Other Root", other_root_key, ca=True)
    p["leaf-other-ca"] = _cert(MX, _key(), (p["other-root"], other_root_key), sans=[MX])
    self_key = _key()
    p["self"] = _cert("localhost.localdomain", self_key, ca=None)
    p["self-expired"] = _cert("localhost.localdomain", self_key, ca=None,
                              not_before=NOW - 400 * DAY, not_after=NOW - 30 * DAY)
    p["unrelated"] = _cert("unrelated", _key(), ca=None)
    for kind in ("rsa", "ed25519"):
        k = _key(kind)
        p[f"{kind}-root"] = _cert(f"{kind} root", k, ca=True)
        p[f"leaf-{kind}"] = _cert(MX, _key(), (p[f"{kind}-root"], k), sans=[MX])
    return p


def rec(usage, selector, mtype, name):
    return lambda p: record_for(p[name], usage, selector, mtype)


def text(t):
    return lambda p: TLSARecord.from_text(t)


def chain(*names):
    return lambda p: [p[n] for n in names]


EE311 = rec(3, 1, 1, "leaf")
TA_INT = rec(2, 0, 1, "int")
TA_ROOT = rec(2, 0, 1, "root")
FULL = [MX]

# name, records, chain, names, status, detail, TLS-RPT result, record that
# matched or was reported (index into records), depth, words in describe().
CASES = [
    ("DANE-EE 3 1 1, self-signed, names ignored", [rec(3, 1, 1, "self")], chain("self"),
     FULL, "matched", "", None, 0, 0, "DANE-EE(3) SPKI(1) SHA2-256(1)"),
    ("DANE-EE 3 0 1", [rec(3, 0, 1, "self")], chain("self"), FULL, "matched", "", None, 0,
     0, "DANE-EE(3) Cert(0) SHA2-256(1)"),
    ("DANE-EE 3 1 2", [rec(3, 1, 2, "self")], chain("self"), FULL, "matched", "", None, 0,
     0, "DANE-EE(3) SPKI(1) SHA2-512(2)"),
    ("DANE-EE 3 1 0", [rec(3, 1, 0, "self")], chain("self"), FULL, "matched", "", None, 0,
     0, "DANE-EE(3) SPKI(1) Full(0)"),
    ("DANE-EE 3 0 0", [rec(3, 0, 0, "self")], chain("self"), FULL, "matched", "", None, 0,
     0, "DANE-EE(3) Cert(0) Full(0)"),
    ("DANE-EE, expired self-signed leaf still matches", [rec(3, 1, 1, "self-expired")],
     chain("self-expired"), FULL, "matched", "", None, 0, 0, "dates are not checked"),
    ("DANE-EE on a CA-issued leaf with another name: no chain, no name needed",
     [rec(3, 1, 1, "leaf-other-name")], chain("leaf-other-name"), FULL, "matched", "", None,
     0, 0, "DANE-EE(3)"),
    ("DANE-EE of another leaf of the same CA", [EE311], chain("leaf-other-name", "int"),
     FULL, "mismatch", "no-match", "tlsa-invalid", None, None,
     "matches none of the TLSA records"),
    ("DANE-EE mismatch", [rec(3, 1, 1, "unrelated")], chain("self"), FULL, "mismatch",
     "no-match", "tlsa-invalid", None, None, "matches none of the TLSA records (TLSA 3 1 1"),
    ("DANE-EE matches only the leaf, not a CA in the chain", [rec(3, 1, 1, "int")],
     chain("leaf", "int", "root"), FULL, "mismatch", "no-match", "tlsa-invalid", None, None,
     "none"),
    ("DANE-TA 2 0 1, intermediate sent, right name", [TA_INT], chain("leaf", "int", "root"),
     FULL, "matched", "", None, 0, 1, "DANE-TA(2) Cert(0) SHA2-256(1)"),
    ("DANE-TA 2 0 1, root sent (depth 2)", [TA_ROOT], chain("leaf", "int", "root"), FULL,
     "matched", "", None, 0, 2, f"names {MX}"),
    ("DANE-TA 2 1 1, intermediate", [rec(2, 1, 1, "int")], chain("leaf", "int"), FULL,
     "matched", "", None, 0, 1, "DANE-TA(2) SPKI(1) SHA2-256(1)"),
    ("DANE-TA 2 0 2, chain sent out of order", [rec(2, 0, 2, "root")],
     chain("leaf", "root", "int"), FULL, "matched", "", None, 0, 1, "depth 1"),
    ("DANE-TA, wrong name", [TA_INT], chain("leaf-other-name", "int", "root"), FULL,
     "name-mismatch", "name", "certificate-host-mismatch", 0, 1,
     f"names www.example.net, example.net, not {MX}"),
    ("DANE-TA, the CNAME-expanded name", [TA_INT], chain("leaf-cname", "int"),
     [MX, "mail.provider.example"], "matched", "", None, 0, 1, "mail.provider.example"),
    ("DANE-TA, wildcard for one label", [TA_INT], chain("leaf-wildcard", "int"), FULL,
     "matched", "", None, 0, 1, f"names {MX}"),
    ("DANE-TA, wildcard does not cover two labels", [TA_INT], chain("leaf-wildcard", "int"),
     ["a.mx.example.org"], "name-mismatch", "name", "certificate-host-mismatch", 0, 1,
     "not a.mx.example.org"),
    ("DANE-TA, common name when there is no subjectAltName", [TA_INT],
     chain("leaf-cn-only", "int"), ["MX.Example.Org."], "matched", "", None, 0, 1,
     f"names {MX}"),
    ("DANE-TA, chain that does not link", [rec(2, 0, 1, "other-root")],
     chain("leaf", "int", "other-root"), FULL, "chain-invalid", "not-linked",
     "validation-failure", 0, 2, "do not link"),
    ("DANE-TA, intermediate missing", [TA_ROOT], chain("leaf", "root"), FULL,
     "chain-invalid", "not-linked", "validation-failure", 0, 1, "do not link"),
    ("DANE-TA, expired leaf", [TA_INT], chain("leaf-expired", "int"), FULL,
     "chain-invalid", "expired", "validation-failure", 0, 1, "has expired"),
    ("DANE-TA, leaf not valid yet", [TA_INT], chain("leaf-future", "int"), FULL,
     "chain-invalid", "not-yet-valid", "validation-failure", 0, 1, "not valid yet"),
    ("DANE-TA, expired intermediate (the anchor's dates do not count)", [TA_ROOT],
     chain("leaf", "int-expired", "root"), FULL, "chain-invalid", "intermediate-expired",
     "validation-failure", 0, 2, "has expired"),
    ("DANE-TA, expired and current cross-signed intermediates: the good path counts",
     [TA_ROOT], chain("leaf", "int-expired", "int", "root"), FULL, "matched", "", None, 0, 3,
     f"names {MX}"),
    ("DANE-TA, a non-CA issuer in the chain", [TA_ROOT],
     chain("leaf-by-rogue", "rogue", "root"), FULL, "chain-invalid", "not-a-ca",
     "validation-failure", 0, 2, "not a CA"),
    ("DANE-TA, the anchor itself not a CA", [rec(2, 0, 1, "rogue")],
     chain("leaf-by-rogue", "rogue"), FULL, "chain-invalid", "not-a-ca",
     "validation-failure", 0, 1, "not a CA"),
    ("DANE-TA 2 0 0, anchor not sent (RFC 7671 5.2)", [rec(2, 0, 0, "root")],
     chain("leaf", "int"), FULL, "matched", "", None, 0, None,
     "trust anchor in the record itself"),
    ("DANE-TA 2 1 0, anchor key not sent", [rec(2, 1, 0, "root")], chain("leaf", "int"),
     FULL, "matched", "", None, 0, None, "trust anchor in the record itself"),
    ("DANE-TA 2 1 0, RSA anchor key not sent", [rec(2, 1, 0, "rsa-root")],
     chain("leaf-rsa"), FULL, "matched", "", None, 0, None, "DANE-TA(2) SPKI(1) Full(0)"),
    ("DANE-TA 2 1 0, Ed25519 anchor key not sent", [rec(2, 1, 0, "ed25519-root")],
     chain("leaf-ed25519"), FULL, "matched", "", None, 0, None, "SPKI(1) Full(0)"),
    ("DANE-TA 2 1 0, anchor key that signed nothing sent", [rec(2, 1, 0, "other-root")],
     chain("leaf", "int"), FULL, "chain-invalid", "not-linked", "validation-failure", 0,
     None, "do not link"),
    ("DANE-TA digest of an anchor not sent cannot match", [TA_ROOT], chain("leaf", "int"),
     FULL, "mismatch", "no-match", "tlsa-invalid", None, None, "none of"),
    ("DANE-TA matching only the leaf is no match", [rec(2, 0, 1, "self")], chain("self"),
     FULL, "mismatch", "no-match", "tlsa-invalid", None, None, "none of"),
    ("only PKIX records: unusable", [rec(0, 0, 1, "root"), rec(1, 1, 1, "leaf")],
     chain("leaf", "int", "root"), FULL, "unusable", "", "tlsa-invalid", None, None,
     "PKIX-TA(0) is not used for SMTP"),
    ("mixed: PKIX-EE would match, DANE-EE does not", [rec(1, 1, 1, "leaf"),
                                                      rec(3, 1, 1, "unrelated")],
     chain("leaf", "int"), FULL, "mismatch", "no-match", "tlsa-invalid", None, None,
     "none of the TLSA records (TLSA 3 1 1"),
    ("mixed: PKIX-TA and a matching DANE-EE", [rec(0, 0, 1, "root"), EE311],
     chain("leaf", "int", "root"), FULL, "matched", "", None, 1, 0, "DANE-EE(3)"),
    ("mixed: DANE-TA wrong name, DANE-EE matches", [TA_INT, rec(3, 1, 1, "leaf-other-name")],
     chain("leaf-other-name", "int"), FULL, "matched", "", None, 1, 0, "DANE-EE(3)"),
    ("mixed: DANE-EE mismatch, DANE-TA good", [rec(3, 1, 1, "unrelated"), TA_INT],
     chain("leaf", "int"), FULL, "matched", "", None, 1, 1, "DANE-TA(2)"),
    ("unknown matching type", [text("3 1 7 " + "ab" * 32)], chain("self"), FULL, "unusable",
     "", "tlsa-invalid", None, None, "matching type unassigned(7) is not supported"),
    ("digest of the wrong length", [text("3 1 1 " + "ab" * 31)], chain("self"), FULL,
     "unusable", "", "tlsa-invalid", None, None, "digest is 32 octets, this one 31"),
    ("no certificate", [EE311], chain(), FULL, "mismatch", "no-certificate", "tlsa-invalid",
     None, None, "no certificate"),
]


class MatchTableTests(SynchronousTestCase):
    def test_table(self):
        """Every case: status, detail, TLS-RPT result type, the record and depth, the words, and the failure class that follows."""
        p = pki()
        for (name, makers, make_chain, names, status, detail, tlsrpt, index, depth,
             words) in CASES:
            records = [m(p) for m in makers]
            v = match(records, make_chain(p), names)
            self.assertEqual((v.status, v.detail, v.tlsrpt_result), (status, detail, tlsrpt),
                             (name, v.describe()))
            self.assertEqual(v.record, None if index is None else records[index], name)
            self.assertEqual(v.depth, depth, name)
            self.assertIn(words, v.describe(), name)
            self.assertEqual(v.authenticated, status == "matched", name)
            self.assertEqual(v.failed, status not in ("matched", "unusable"), name)
            failure = v.failure(**PEER)
            if not v.failed:
                self.assertIsNone(failure, name)
                self.assertIsNone(v.kind, name)
                continue
            self.assertEqual(failure.kind, v.kind, name)
            self.assertIn(failure.kind, DANE_KINDS, name)
            self.assertEqual(failure.tlsrpt_result, tlsrpt, name)
            self.assertEqual(failure.detail, detail, name)
            self.assertTrue(failure.describe().startswith(f"{MX}[192.0.2.25]:25 "), name)
            self.assertTrue(failure.advice(), name)

    def test_mismatch_words(self):
        """The bounce names the server and the record: "mx.example.org[192.0.2.25]:25 published a DANE record (TLSA 3 1 1 4f2a...) that its certificate does not match"."""
        p = pki()
        r = record_for(p["unrelated"])
        failure = match([r], [p["self"]], [MX]).failure(**PEER)
        self.assertEqual(failure.describe(),
                         f"{MX}[192.0.2.25]:25 published a DANE record "
                         f"(TLSA 3 1 1 {r.data.hex()[:8]}…) that its certificate does not "
                         "match")
        self.assertIn("3 1 1", failure.advice())
        self.assertEqual(failure.enhanced(), "4.7.5")
        self.assertEqual(failure.enhanced(permanent=True), "5.7.5")
        # Unusable records are not blamed; every usable one is listed.
        two = [TLSARecord.from_text("1 1 1 " + "00" * 32), r,
               record_for(p["unrelated"], 3, 0, 1)]
        failure = match(two, [p["self"]], [MX]).failure(**PEER)
        self.assertEqual(failure.tlsa, (two[1].short, two[2].short))
        self.assertIn("published DANE records (TLSA 3 1 1 ", failure.describe())
        self.assertNotIn("TLSA 1 1 1", failure.describe())

    def test_name_mismatch_words(self):
        p = pki()
        v = match([TA_INT(p)], [p["leaf-other-name"], p["int"]], [MX, "mx.provider.example"])
        failure = v.failure(**PEER)
        self.assertEqual(failure.certificate.sans, ("www.example.net", "example.net"))
        self.assertIn("presented a certificate for www.example.net, example.net, not for "
                      f"{MX} or mx.provider.example, from the authority named by a DANE "
                      "record (TLSA 2 0 1 ", failure.describe())
        self.assertIn(f"names {MX} or mx.provider.example", failure.advice())
        self.assertIn("3 1 1", failure.advice())

    def test_chain_words(self):
        p = pki()
        failure = match([TA_INT(p)], [p["leaf-expired"], p["int"]], [MX]).failure(**PEER)
        day = NOW - 3 * DAY
        self.assertIn(f"naming a trust anchor, but its certificate expired on {day.day} "
                      f"{day.strftime('%B %Y')}", failure.describe())
        self.assertEqual(failure.advice(), "renew the certificate")
        failure = match([TA_ROOT(p)], [p["leaf"], p["root"]], [MX]).failure(**PEER)
        self.assertIn("do not link its own certificate to that anchor", failure.describe())
        self.assertIn("up to and including", failure.advice())

    def test_dates_are_checked_at_the_given_time(self):
        """DANE-TA checks the dates at C{now}; DANE-EE never does."""
        p = pki()
        later = NOW + 60 * DAY
        self.assertEqual(match([TA_INT(p)], [p["leaf"], p["int"]], [MX], now=later).detail,
                         "expired")
        self.assertEqual(match([TA_INT(p)], [p["leaf"], p["int"]], [MX], now=NOW).status,
                         "matched")
        self.assertEqual(match([EE311(p)], [p["leaf"]], [MX], now=later).status, "matched")

    def test_rrset_order_and_duplicates(self):
        """The first usable record that matches is named; duplicates are one record."""
        p = pki()
        a, b = record_for(p["self"]), record_for(p["self"], 3, 0, 1)
        self.assertEqual(match([a, b, a], [p["self"]], []).record, a)
        self.assertEqual(match([b, a], [p["self"]], []).record, b)
        self.assertEqual(usable([a, b, a]), (a, b))

    def test_long_chain_is_cut(self):
        """A server that sends hundreds of certificates costs at most MAX_CHAIN of them."""
        p = pki()
        junk = [p["unrelated"]] * 200
        v = match([TA_ROOT(p)], [p["leaf"]] + junk + [p["int"], p["root"]], [MX])
        self.assertEqual(v.status, "mismatch")


    def test_certificates_that_all_sign_each_other(self):
        """Fifteen certificates with one name and one key sign each other in every order: the search for a path to the anchor stops early instead of trying every permutation."""
        import time
        p = pki()
        key = _key()
        loop = [_cert("Loop CA", key, ca=True) for _ in range(14)]
        leaf = _cert(MX, _key(), (loop[0], key), sans=[MX])
        started = time.monotonic()
        v = match([rec(2, 0, 1, "other-root")(p)], [leaf] + loop + [p["other-root"]], [MX])
        self.assertEqual((v.status, v.detail), ("chain-invalid", "not-linked"))
        self.assertLess(time.monotonic() - started, 5)


class OtherVerdictTests(SynchronousTestCase):
    def test_lookup_layer_verdicts(self):
        """STARTTLS missing, a failed lookup and a bogus answer: each stops delivery, with its class, TLS-RPT result type and enhanced code."""
        records = (TLSARecord.from_text("3 1 1 " + "4f2a" * 16),)
        for v, kind, tlsrpt, code, words in [
            (DaneVerdict.starttls_missing(records), "dane-starttls-missing",
             "starttls-not-supported", "4.7.4",
             f"{MX}[192.0.2.25]:25 publishes DANE (TLSA) records, so encryption is "
             "mandatory, but it does not offer STARTTLS"),
            (DaneVerdict.starttls_missing([TLSARecord.from_text("1 1 1 " + "00" * 32)]),
             "dane-starttls-missing", "starttls-not-supported", "4.7.4", "mandatory"),
            (DaneVerdict.lookup_failed("SERVFAIL"), "dane-lookup-failed", "dnssec-invalid",
             "4.7.5", f"the DANE (TLSA) records of {MX}[192.0.2.25]:25 could not be looked "
             "up (SERVFAIL)"),
            (DaneVerdict.dnssec_bogus("signature expired"), "dnssec-bogus",
             "dnssec-invalid", "4.7.5", "failed DNSSEC validation (signature expired)"),
        ]:
            self.assertTrue(v.failed)
            self.assertEqual((v.kind, v.tlsrpt_result), (kind, tlsrpt))
            failure = v.failure(**PEER)
            self.assertEqual((failure.kind, failure.tlsrpt_result, failure.enhanced()),
                             (kind, tlsrpt, code))
            self.assertEqual(failure.enhanced(permanent=True), "5" + code[1:])
            self.assertIn(words, failure.describe())
            self.assertTrue(failure.advice())
        lookup = DaneVerdict.lookup_failed("timeout").failure(MX, "", 25)
        self.assertIn(f"records of {MX} could not", lookup.describe())
        self.assertIn(f"_25._tcp.{MX}", lookup.advice())

    def test_unusable_rrset_lets_delivery_go_on(self):
        """No usable record: TLS is mandatory, the certificate is not authenticated, nothing fails (RFC 7672 2.2)."""
        v = match([TLSARecord.from_text("0 0 1 " + "00" * 32)], [pki()["self"]], [MX])
        self.assertEqual((v.status, v.authenticated, v.failed, v.kind),
                         ("unusable", False, False, None))
        self.assertEqual(v.tlsrpt_result, "tlsa-invalid")
        self.assertIn("encryption is mandatory", v.describe())
        self.assertEqual(match([], [pki()["self"]], [MX]).status, "unusable")

    def test_real_handshake(self):
        """The chain as pyOpenSSL gives it after a real (in-memory) handshake matches DANE-TA on the trustme intermediate and DANE-EE on the leaf."""
        ca = trustme.CA()
        child = ca.create_child_ca()
        leaf = child.issue_cert(MX)
        peer = _handshake(leaf)
        self.assertEqual(len(peer), 2)
        inter = x509.load_pem_x509_certificate(child.cert_pem.bytes())
        for r, status, depth in [(record_for(inter, 2, 1, 1), "matched", 1),
                                 (record_for(peer[0]), "matched", 0),
                                 (record_for(inter, 3, 1, 1), "mismatch", None)]:
            v = match([r], peer, [MX])
            self.assertEqual((v.status, v.depth), (status, depth), r)


@implementer(IHandshakeListener)
class _Client(protocol.Protocol):
    chain = None

    def handshakeCompleted(self):
        self.chain = self.transport.getHandle().get_peer_cert_chain(as_cryptography=True)


def _handshake(cert: trustme.LeafCert) -> list:
    from twisted_mta.tls.handshake import PolicyCreator
    from twisted_mta.tls.policy import OPPORTUNISTIC, Destination
    key = ssl.KeyPair.load(cert.private_key_pem.bytes(), 1)
    certs = [ssl.Certificate.loadPEM(b.bytes()) for b in cert.cert_chain_pems]
    options = ssl.CertificateOptions(privateKey=key.original, certificate=certs[0].original,
                                     extraCertChain=[c.original for c in certs[1:]])
    creator = PolicyCreator(OPPORTUNISTIC.requirements(Destination("example.org", MX)), MX)
    client = _Client()
    server_factory = TLSMemoryBIOFactory(options, False,
                                         protocol.Factory.forProtocol(protocol.Protocol))
    client_factory = TLSMemoryBIOFactory(creator, True,
                                         protocol.Factory.forProtocol(lambda: client))
    server_proto = server_factory.buildProtocol(None)
    client_proto = client_factory.buildProtocol(None)
    iosim.connect(server_proto, iosim.makeFakeServer(server_proto), client_proto,
                  iosim.makeFakeClient(client_proto)).flush()
    return client.chain


class RecordTests(SynchronousTestCase):
    def test_text_round_trip(self):
        r = TLSARecord.from_text("3 1 1 4F2A" + "00" * 30)
        self.assertEqual((r.usage, r.selector, r.mtype, len(r.data)), (3, 1, 1, 32))
        self.assertEqual(r.to_text(), "3 1 1 4f2a" + "00" * 30)
        self.assertEqual(TLSARecord.from_text(r.to_text()), r)
        self.assertEqual(r.short, "TLSA 3 1 1 4f2a0000…")
        self.assertEqual(TLSARecord.from_text("2 0 1 ( 4f2a\n 0000 )").data, b"\x4f\x2a\0\0")
        self.assertEqual(TLSARecord.from_text("3 1 0 abcd").short, "TLSA 3 1 0 abcd")
        self.assertEqual(TLSARecord.from_wire(bytes([3, 1, 1]) + r.data), r)

    def test_malformed_text(self):
        for bad in ["", "3 1 1", "3 1 1 xyz", "3 1 1 abc", "256 1 1 ab", "-1 1 1 ab",
                    "a b c dd", "3 1 ² ab", "3 1 1 0x4f2a", "DANE-EE SPKI SHA2-256 ab"]:
            self.assertRaises(ValueError, TLSARecord.from_text, bad)
        self.assertRaises(ValueError, TLSARecord, 3, 1, 1, b"")
        self.assertRaises(ValueError, TLSARecord, 3, 1, 1, 5)
        self.assertRaises(ValueError, TLSARecord, 3, 1, 256, b"x")
        self.assertRaises(ValueError, TLSARecord.from_wire, b"\3\1\1")

    def test_rfc7218_names(self):
        for t, words in [
            ("3 1 1", "DANE-EE(3) SPKI(1) SHA2-256(1)"),
            ("2 0 2", "DANE-TA(2) Cert(0) SHA2-512(2)"),
            ("0 0 0", "PKIX-TA(0) Cert(0) Full(0)"),
            ("1 1 0", "PKIX-EE(1) SPKI(1) Full(0)"),
            ("4 2 3", "unassigned(4) unassigned(2) unassigned(3)"),
            ("255 255 255", "PrivCert(255) PrivSel(255) PrivMatch(255)"),
        ]:
            self.assertEqual(TLSARecord.from_text(f"{t} ab").names, words)

    def test_usable(self):
        """DANE-TA and DANE-EE with selectors 0/1 and matching types 0/1/2 are usable; PKIX-TA, PKIX-EE and unknown values are not (RFC 7672 3.1.3)."""
        for usage in range(5):
            for selector in range(3):
                for mtype in range(4):
                    size = {1: 32, 2: 64}.get(mtype, 3)
                    r = TLSARecord(usage, selector, mtype, b"\1" * size)
                    ok = usage in (2, 3) and selector in (0, 1) and mtype in (0, 1, 2)
                    self.assertEqual(r.is_usable, ok, r)
                    self.assertEqual(usable([r]), (r,) if ok else ())
                    self.assertEqual(r.unusable_reason is None, ok, r)
        self.assertIn("RFC 7672 3.1.3", TLSARecord(1, 1, 1, b"\1" * 32).unusable_reason)
        self.assertFalse(TLSARecord(3, 1, 2, b"\1" * 32).is_usable)
        self.assertEqual(dane.tlsa_name("mx.example.org."), "_25._tcp.mx.example.org")
        self.assertEqual(dane.tlsa_name("mx.example.org", 465), "_465._tcp.mx.example.org")


class FailureClassTests(SynchronousTestCase):
    def test_dane_classes(self):
        """Each DANE class: in TLS_KINDS with its RFC 8460 result type, its code, not a certificate class (no relaxed retry), and its own words and advice."""
        expect = {
            "dane-mismatch": ("tlsa-invalid", "4.7.5"),
            "dane-name-mismatch": ("certificate-host-mismatch", "4.7.5"),
            "dane-chain-invalid": ("validation-failure", "4.7.5"),
            "dane-starttls-missing": ("starttls-not-supported", "4.7.4"),
            "dane-lookup-failed": ("dnssec-invalid", "4.7.5"),
            "dnssec-bogus": ("dnssec-invalid", "4.7.5"),
        }
        self.assertEqual(set(DANE_KINDS), set(expect))
        self.assertTrue(set(DANE_KINDS) <= set(TLS_KINDS))
        described, advised = set(), set()
        for kind, (tlsrpt, code) in expect.items():
            f = TLSFailure(kind, tlsa=("TLSA 3 1 1 4f2a9c01…",), **PEER)
            self.assertEqual((f.tlsrpt_result, f.enhanced()), (tlsrpt, code), kind)
            self.assertTrue(f.is_dane)
            self.assertFalse(f.is_certificate or f.is_handshake, kind)
            self.assertIn(f"{MX}", f.describe(), kind)
            self.assertNotIn("handshake", f.describe(), kind)
            described.add(f.describe())
            advised.add(f.advice())
            o = failures.tls(f)
            self.assertEqual((o.code, o.enhanced, o.kind), (451, code, kind))
            self.assertEqual(failures.tlsrpt_result(o), tlsrpt)
            gone = failures.expired(o)
            self.assertEqual((gone.code, gone.enhanced), (554, "5" + code[1:]))
        self.assertEqual(len(described), len(expect))
        self.assertEqual(len(advised), len(expect))

    def test_existing_classes_unchanged(self):
        """Adding the DANE fields changes nothing for the classes there were."""
        f = TLSFailure("starttls-not-offered", **PEER)
        self.assertEqual(f.enhanced(), "4.7.4")
        self.assertEqual(f.describe(), f"{MX}[192.0.2.25]:25 does not offer encryption "
                                       "(no STARTTLS)")
        self.assertFalse(f.is_dane)
        self.assertEqual(attrs.evolve(f, kind="handshake-failed").enhanced(), "4.7.5")
