"""
The DANE interop cases (issue 12): one place that says, for each case,
what the DNS publishes, what the server presents, and what a DANE client
must do, so that the trial test (L{tests.interop.test_dane_matrix}) and
C{scripts/dane-matrix} (docs/dane-matrix.md) run and judge the same thing.

Every case is a recipient domain C{<name>.dm.test} with one MX host and
one server of its own (an smtpd of the peers' Postfix on its own loopback
address), so a client that does the wrong thing (cleartext, say) is seen
doing it.  C{dm.test.} is signed and is the validating resolver's only
trust anchor; a case may put its MX RRset, or its MX host, in an unsigned
child zone (delegated without DS: provably insecure), reach its MX host
through a CNAME, or have signatures corrupted (bogus) or its TLSA name
answered SERVFAIL (the validating resolver forwards it to a server that
fails every query: not a validation failure).
TLSA records are published under C{_<port>._tcp.<host>}, the port both
clients deliver to.

Expectations come from RFC 7672 and the issue's rules, never from what a
client did.  Where Postfix follows a documented rule of its own that
differs, the case says so (L{Case.postfix_expect}, L{Case.difference}).
"""

from __future__ import annotations

import datetime
import hashlib

import attrs
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.interop.dnssec import SIGNED, UNSIGNED, Zone
from tests.interop.tls_peers import self_signed, write_pem

ORIGIN = "dm.test"

# What a client does with a message (the verdict classes both columns use).
VERIFIED = "verified"  # delivered over TLS, the certificate authenticated by DANE
ENCRYPTED = "encrypted"  # delivered over TLS, the certificate not authenticated
CLEARTEXT = "cleartext"  # delivered without TLS
DEFERRED = "deferred"  # not delivered, kept for a later attempt
BOUNCED = "bounced"
MISSING = "missing"  # nothing to tell after the wait

# Case layouts: where the names live.
PLAIN = "plain"  # MX, host, TLSA in the signed zone
UNSIGNED_ZONE = "unsigned-zone"  # the domain is an unsigned child zone holding it all
INSECURE_MX = "insecure-mx"  # MX in an unsigned child zone, host and TLSA signed
CNAME = "cname"  # the MX host is a CNAME to host.<domain>

# The certificate a server presents.
SELF_SIGNED = "self-signed"
CA_ISSUED = "ca-issued"  # by the test CA, which is sent in the chain after the leaf

# Which key or certificate a TLSA record is made from.
LEAF, CA, OTHER = "leaf", "ca", "other"


@attrs.frozen
class Tlsa:
    """One TLSA record: C{params} (usage, selector, matching type) of C{of}."""

    params: str
    of: str = LEAF

    @property
    def numbers(self) -> tuple[int, int, int]:
        u, s, m = (int(x) for x in self.params.split())
        return u, s, m


@attrs.frozen
class Case:
    """
    One recipient domain.  C{expect} is the verdict class RFC 7672 asks
    for; C{our_kind} the failure class our MTA's C{outbound.tls_decision}
    event must name when it defers.  C{cert_name}: the name in the
    server's certificate, C{"mx"} (the MX host name), C{"expanded"} (the
    CNAME target) or C{"other"} (a name the client never asked for).
    C{tlsa_at}: under a CNAME, whether the TLSA records are at the MX host
    name (C{"mx"}) or at the CNAME target (C{"expanded"}).  C{corrupt}: the
    RRset (C{"MX"}, C{"A"}, C{"TLSA"}) whose signature is damaged.
    """

    name: str
    what: str
    expect: str
    our_kind: str | None = None
    tlsa: tuple[Tlsa, ...] = ()
    cert: str = SELF_SIGNED
    cert_name: str = "mx"
    starttls: bool = True
    layout: str = PLAIN
    tlsa_at: str = "mx"
    corrupt: str | None = None
    tlsa_servfail: bool = False
    rfc: str = ""
    postfix_expect: str | None = None  # Postfix's class where its documented rule differs
    difference: str = ""  # why, for docs/dane-matrix.md

    @property
    def domain(self) -> str:
        return f"{self.name}.{ORIGIN}"

    @property
    def mx_host(self) -> str:
        if self.layout == INSECURE_MX:
            return f"{self.name}-mx.{ORIGIN}"
        return f"mx.{self.domain}"

    @property
    def expanded_host(self) -> str:
        """The name the MX host's address records are at (after a CNAME)."""
        return f"host.{self.domain}" if self.layout == CNAME else self.mx_host

    @property
    def tlsa_host(self) -> str:
        return self.expanded_host if self.tlsa_at == "expanded" else self.mx_host

    def tlsa_owner(self, port: int) -> str:
        return f"_{port}._tcp.{self.tlsa_host}"

    @property
    def cert_names(self) -> tuple[str, ...]:
        return {"mx": (self.mx_host,), "expanded": (self.expanded_host,),
                "other": (f"mx.elsewhere.{ORIGIN}",)}[self.cert_name]

    @property
    def dane_usable(self) -> bool:
        """Whether a TLSA record is DANE-TA or DANE-EE (RFC 7672 3.1.3)."""
        return any(t.numbers[0] in (2, 3) for t in self.tlsa)

    @property
    def expected_by_postfix(self) -> str:
        return self.postfix_expect or self.expect

    @property
    def tlsa_text(self) -> str:
        """The records as the document shows them (data by what they hash)."""
        if self.tlsa_servfail:
            return "(lookup fails: SERVFAIL)"
        return ", ".join(f"{t.params} {t.of}" for t in self.tlsa) or "none"


EE = Tlsa("3 1 1")

CASES: tuple[Case, ...] = (
    Case("ee-311", "DANE-EE 3 1 1 of a self-signed certificate", VERIFIED, tlsa=(EE,),
         rfc="7672 3.1.1: DANE-EE ignores names, dates and issuer"),
    Case("ee-301", "DANE-EE 3 0 1 (the whole certificate) of a self-signed certificate",
         VERIFIED, tlsa=(Tlsa("3 0 1"),), rfc="6698 2.1.2 selector 0"),
    Case("ee-312", "DANE-EE 3 1 2 (SHA2-512) of a self-signed certificate", VERIFIED,
         tlsa=(Tlsa("3 1 2"),), rfc="6698 2.1.3 matching type 2"),
    Case("ee-extra", "DANE-EE 3 1 1 that matches, and one of another key", VERIFIED,
         tlsa=(EE, Tlsa("3 1 1", OTHER)), rfc="6698 2.1: any usable record may match"),
    Case("ee-mismatch", "DANE-EE 3 1 1 of another key", DEFERRED, "dane-mismatch",
         tlsa=(Tlsa("3 1 1", OTHER),), rfc="7672 2.2: no match, defer"),
    Case("ta-201", "DANE-TA 2 0 1 of the CA (sent in the chain), the MX name in the "
         "certificate", VERIFIED, tlsa=(Tlsa("2 0 1", CA),), cert=CA_ISSUED,
         rfc="7672 3.1.2: the chain to the anchor and the name are checked"),
    Case("ta-211", "DANE-TA 2 1 1 of the CA's key, the MX name in the certificate", VERIFIED,
         tlsa=(Tlsa("2 1 1", CA),), cert=CA_ISSUED, rfc="7672 3.1.2"),
    Case("ta-wrong-name", "DANE-TA 2 0 1 of the CA, the certificate for another name",
         DEFERRED, "dane-name-mismatch", tlsa=(Tlsa("2 0 1", CA),), cert=CA_ISSUED,
         cert_name="other", rfc="7672 3.2.2: the reference identifier is the MX host"),
    Case("unusable", "only PKIX-EE 1 1 1 and PKIX-TA 0 0 1 (unusable for SMTP)", ENCRYPTED,
         tlsa=(Tlsa("1 1 1"), Tlsa("0 0 1", CA)), cert=CA_ISSUED,
         rfc="7672 3.1.3: TLS mandatory, the certificate not authenticated"),
    Case("unusable-nostarttls", "only an unusable 1 1 1, the server offers no STARTTLS",
         DEFERRED, "dane-starttls-missing", tlsa=(Tlsa("1 1 1"),), starttls=False,
         rfc="7672 2.2, 3.1.3: TLS is still mandatory"),
    Case("nostarttls", "DANE-EE 3 1 1, the server offers no STARTTLS", DEFERRED,
         "dane-starttls-missing", tlsa=(EE,), starttls=False,
         rfc="7672 2.2: never cleartext"),
    Case("unsigned", "an unsigned zone (MX, host and a non-matching 3 1 1, all insecure)",
         ENCRYPTED, tlsa=(Tlsa("3 1 1", OTHER),), layout=UNSIGNED_ZONE,
         rfc="7672 2.2: insecure TLSA records are not used; opportunistic TLS"),
    Case("insecure-mx", "MX in an unsigned zone, the MX host and its matching 3 1 1 signed",
         ENCRYPTED, tlsa=(EE,), layout=INSECURE_MX,
         rfc="7672 2.2.1: the MX host name is not authenticated (issue 12: DANE only when "
             "the MX RRset and the host are secure)"),
    Case("insecure-mx-mismatch", "MX in an unsigned zone, the MX host signed, its 3 1 1 "
         "of another key", ENCRYPTED, tlsa=(Tlsa("3 1 1", OTHER),), layout=INSECURE_MX,
         rfc="7672 2.2.1 (issue 12: DANE only when the MX RRset and the host are secure)",
         postfix_expect=DEFERRED,
         difference="Postfix applies `smtp_tls_dane_insecure_mx_policy`, whose default under "
                    "`smtp_tls_security_level = dane` is `dane`: the TLSA records of an MX "
                    "host with secure addresses are enforced even when the MX RRset is "
                    "insecure (so it defers here, and calls the matching key of "
                    "`insecure-mx` `Trusted`, not `Verified`: the name is not authenticated). "
                    "We follow issue 12 and use DANE only when the MX RRset is secure too, so "
                    "the same server gets opportunistic TLS. Neither sends in cleartext."),
    Case("bogus-mx", "the MX RRset's signature is corrupted", DEFERRED, "dns-temp",
         tlsa=(EE,), corrupt="MX",
         rfc="7672 2.1.1: a bogus answer is a failure (for us a failed MX lookup, before "
             "any DANE decision)"),
    Case("bogus-a", "the MX host's A RRset's signature is corrupted", DEFERRED,
         "dnssec-bogus", tlsa=(EE,), corrupt="A", rfc="7672 2.2.1"),
    Case("bogus-tlsa", "the TLSA RRset's signature is corrupted", DEFERRED, "dnssec-bogus",
         tlsa=(EE,), corrupt="TLSA", rfc="7672 2.2: a failed TLSA lookup defers"),
    Case("servfail-tlsa", "the TLSA lookup fails with SERVFAIL (not a validation failure)",
         DEFERRED, "dane-lookup-failed", tlsa_servfail=True,
         rfc="7672 2.2: only a secure NODATA/NXDOMAIN means no DANE"),
    Case("cname-expanded", "MX host is a CNAME; DANE-TA 2 0 1 at the CNAME target, whose "
         "name the certificate carries", VERIFIED, tlsa=(Tlsa("2 0 1", CA),), cert=CA_ISSUED,
         cert_name="expanded", layout=CNAME, tlsa_at="expanded",
         rfc="7672 2.2.2: TLSA at the expanded name first"),
    Case("cname-original-name", "MX host is a CNAME; DANE-TA 2 0 1 at the CNAME target, "
         "the certificate names only the MX host", VERIFIED, tlsa=(Tlsa("2 0 1", CA),),
         cert=CA_ISSUED, cert_name="mx", layout=CNAME, tlsa_at="expanded",
         rfc="7672 2.2.2, 3.2.2 (issue 12: the MX host and its CNAME-expanded name)",
         postfix_expect=DEFERRED,
         difference="Postfix checks a DANE-TA certificate against the TLSA base domain, here "
                    "the CNAME target where the records were found, and not against the MX "
                    "host name the CNAME starts from (its log: `num=62:hostname mismatch`). "
                    "Issue 12 asks us to accept the MX host and its CNAME-expanded name, so "
                    "we deliver. A certificate for the CNAME target (`cname-expanded`) "
                    "satisfies both."),
    Case("cname-tlsa-at-mx", "MX host is a CNAME; DANE-TA 2 0 1 only at the MX host name, "
         "whose name the certificate carries", VERIFIED, tlsa=(Tlsa("2 0 1", CA),),
         cert=CA_ISSUED, cert_name="mx", layout=CNAME, tlsa_at="mx",
         rfc="7672 2.2.2: no TLSA at the expanded name, then the original name"),
)

FIRST_ADDRESS = (127, 0, 3, 10)


def address_of(index: int) -> str:
    """The loopback address of case number C{index}'s server: 127.0.3.10 up."""
    a, b, c, d = FIRST_ADDRESS
    return f"{a}.{b}.{c}.{d + index}"


ADDRESSES = tuple(address_of(i) for i in range(len(CASES)))


def address_for(case: Case) -> str:
    return address_of(CASES.index(case))


# The names of our MTA's start-up check that the resolver validates
# ([dns] dnssec_secure_name and dnssec_bogus_name), in every zone set.
CHECK_SECURE = f"check-secure.{ORIGIN}"
CHECK_BOGUS = f"check-bogus.{ORIGIN}"


# -- certificates and TLSA data ----------------------------------------------------------


@attrs.frozen
class ServerCert:
    cert: str  # PEM file: the leaf, then the CA for CA_ISSUED
    key: str
    leaf: x509.Certificate


@attrs.frozen
class Credentials:
    """What the cases' servers present, and the keys their TLSA records hash."""

    servers: dict[str, ServerCert]  # by case name
    ca: x509.Certificate
    other: x509.Certificate  # a certificate nobody presents: TLSA records that never match

    def subject(self, case: Case, of: str) -> x509.Certificate:
        """The certificate a TLSA record of C{case} is made from."""
        return {LEAF: self.servers[case.name].leaf, CA: self.ca, OTHER: self.other}[of]


def make_credentials(directory: str, cases=CASES) -> Credentials:
    """
    A certificate and key for every case's server in C{directory}: a
    self-signed leaf, or a leaf from a fresh CA (sent in the chain after
    it, as RFC 7672 3.1.2 asks of DANE-TA servers); all valid from a day
    ago for 30 days.
    """
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    day = datetime.timedelta(days=1)
    ca = trustme.CA(organization_name="dane-matrix trust anchor")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    servers = {}
    for case in cases:
        if case.cert == SELF_SIGNED:
            cert_pem, key_pem = self_signed(case.cert_names, now - day, now + 30 * day)
            chain = [cert_pem]
        else:
            issued = ca.issue_cert(*case.cert_names, not_before=now - day,
                                   not_after=now + 30 * day)
            cert_pem, key_pem = issued.cert_chain_pems[0].bytes(), issued.private_key_pem.bytes()
            chain = [b.bytes() for b in issued.cert_chain_pems] + [ca.cert_pem.bytes()]
        cert, key = write_pem(directory, case.name, chain, key_pem)
        servers[case.name] = ServerCert(cert, key, x509.load_pem_x509_certificate(cert_pem))
    other_pem, _ = self_signed((f"unused.{ORIGIN}",), now - day, now + 30 * day)
    return Credentials(servers, ca_cert, x509.load_pem_x509_certificate(other_pem))


def association(cert: x509.Certificate, selector: int, mtype: int) -> str:
    """The TLSA certificate association data (hex) of C{cert} (RFC 6698 2.1)."""
    if selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    if mtype == 0:
        return data.hex()
    return (hashlib.sha256 if mtype == 1 else hashlib.sha512)(data).hexdigest()


def tlsa_rdata(case: Case, creds: Credentials) -> list[str]:
    out = []
    for t in case.tlsa:
        u, s, m = t.numbers
        out.append(f"{u} {s} {m} {association(creds.subject(case, t.of), s, m)}")
    return out


# -- the zones --------------------------------------------------------------------------


def _relative(name: str) -> str:
    """C{name} relative to C{dm.test.} (as L{Zone} C{corrupt} takes it)."""
    return name[:-len(ORIGIN) - 1]


def zones(port: int, creds: Credentials, cases=CASES) -> list[Zone]:
    """
    C{dm.test.} signed (the trust anchor) with every case's names and the
    start-up check's, and an unsigned child zone for each case whose MX
    RRset lives in one.
    """
    parent = [(f"{CHECK_SECURE}.", "A", "127.0.0.1"), (f"{CHECK_BOGUS}.", "A", "127.0.0.1")]
    corrupt = [(_relative(CHECK_BOGUS), "A")]
    children: list[Zone] = []

    for case in cases:
        address = address_for(case)
        owner = case.tlsa_owner(port)
        tlsa = [(f"{owner}.", "TLSA", r) for r in tlsa_rdata(case, creds)]
        if case.layout == UNSIGNED_ZONE:
            children.append(Zone(case.domain, (
                ("@", "MX", f"10 {case.mx_host}."),
                (f"{case.mx_host}.", "A", address),
                *tlsa), signing=UNSIGNED))
            continue
        if case.layout == INSECURE_MX:
            children.append(Zone(case.domain, (("@", "MX", f"10 {case.mx_host}."),),
                                 signing=UNSIGNED))
        else:
            parent.append((f"{case.domain}.", "MX", f"10 {case.mx_host}."))
        if case.layout == CNAME:
            parent.append((f"{case.mx_host}.", "CNAME", f"{case.expanded_host}."))
        parent.append((f"{case.expanded_host}.", "A", address))
        parent += tlsa
        if case.corrupt == "MX":
            corrupt.append((_relative(case.domain), "MX"))
        elif case.corrupt == "A":
            corrupt.append((_relative(case.expanded_host), "A"))
        elif case.corrupt == "TLSA":
            corrupt.append((_relative(owner), "TLSA"))
    return [Zone(ORIGIN, tuple(parent), signing=SIGNED, corrupt=tuple(corrupt)), *children]


def servfail_names(port: int, cases=CASES) -> tuple[str, ...]:
    """
    The TLSA names the resolver must send to a server that answers
    SERVFAIL (a broken authoritative server: the lookup fails, and not
    because of DNSSEC).
    """
    return tuple(c.tlsa_owner(port) for c in cases if c.tlsa_servfail)
