"""
DANE for SMTP (RFC 7672, RFC 6698, RFC 7671; names from RFC 7218): TLSA
records, which of them a mail client may use, and whether the
certificate chain a server presented matches them.

Pure code: no DNS, no sockets, no reactor.  The lookup layer (DNSSEC,
issue 12) hands in the TLSA RRset it found secure; the delivery attempt
hands in the peer's chain after the handshake (C{connection.
get_peer_cert_chain(as_cryptography=True)}, leaf first) and the names the
certificate must carry under DANE-TA (the MX host, and its CNAME-expanded
name where that applies).  L{match} answers with a L{DaneVerdict}: what
matched, or why nothing did, with the TLS-RPT result type (RFC 8460) and
the TLS failure class of L{twisted_mta.tls.failure}.

What is supported:

  - DANE-EE(3), selectors Cert(0) and SPKI(1), matching types Full(0),
    SHA2-256(1) and SHA2-512(2): the leaf alone is compared; names,
    dates, the rest of the chain are ignored (RFC 7672 3.1.1).
  - DANE-TA(2), the same selectors and matching types, where the trust
    anchor is a certificate the server sent (depth 1 or more; RFC 7672
    3.1.2 requires servers to send it).  A DANE-TA record that matches
    only the leaf itself is no match (that is what DANE-EE is for).
  - DANE-TA(2) with a full value (2 0 0: the anchor's certificate; 2 1 0:
    its public key) whose anchor the server did not send (RFC 7671 5.2):
    the record itself is the anchor.  A digest (2 x 1, 2 x 2) of an anchor
    that was not sent cannot be checked, and does not match.
  - Under DANE-TA, the chain from the leaf to the anchor must verify
    signature by signature (the certificates may come in any order; the
    first path found counts), every certificate between them must be a CA
    (basicConstraints CA:TRUE, keyCertSign when keyUsage is present), as
    must an anchor that is a certificate (or a v1 certificate), the leaf
    and the certificates between must be within their dates (the anchor's
    own dates are not checked, as in RFC 5280 path validation), and the
    leaf must name one of the reference identifiers: a DNS name in its
    subjectAltName (service-identity; a wildcard only as the whole
    left-most label, matching one label: RFC 6125, RFC 7672 3.2.3), or,
    when it has no DNS name there at all, its subject's common name under
    the same rules (as OpenSSL's X509_check_host, and so Postfix, do).
    Path length constraints, name constraints, extended key usage and
    revocation are not checked.
  - PKIX-TA(0), PKIX-EE(1), and unassigned or private usages, selectors and
    matching types are unusable (RFC 7672 3.1.3), and so is a digest of
    the wrong length (a SHA2-256 value that is not 32 octets), as OpenSSL
    treats it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import datetime, timezone
from typing import Iterable, Sequence

import attrs

from twisted_mta.tls.failure import TLSRPT_RESULT, CertificateFacts, TLSFailure

DANE_TA, DANE_EE = 2, 3
CERT, SPKI = 0, 1
FULL, SHA2_256, SHA2_512 = 0, 1, 2

USAGES = {0: "PKIX-TA", 1: "PKIX-EE", 2: "DANE-TA", 3: "DANE-EE", 255: "PrivCert"}
SELECTORS = {0: "Cert", 1: "SPKI", 255: "PrivSel"}
MATCHING_TYPES = {0: "Full", 1: "SHA2-256", 2: "SHA2-512", 255: "PrivMatch"}
DIGEST_SIZE = {SHA2_256: 32, SHA2_512: 64}

# The verdict's status.
MATCHED = "matched"  # authenticated by a usable record
UNUSABLE = "unusable"  # no usable record: TLS mandatory, certificate not authenticated
MISMATCH = "mismatch"  # usable records, none matches
NAME_MISMATCH = "name-mismatch"  # DANE-TA: anchor and chain good, the leaf's name is not
CHAIN_INVALID = "chain-invalid"  # DANE-TA: the anchor matched, the chain to it does not hold
STARTTLS_MISSING = "starttls-missing"  # TLSA records published, STARTTLS not offered
LOOKUP_FAILED = "lookup-failed"  # the TLSA lookup failed (not a secure NODATA/NXDOMAIN)
DNSSEC_BOGUS = "dnssec-bogus"  # the answer failed DNSSEC validation

# Each status that stops delivery, and its TLS failure class.
KIND = {
    MISMATCH: "dane-mismatch",
    NAME_MISMATCH: "dane-name-mismatch",
    CHAIN_INVALID: "dane-chain-invalid",
    STARTTLS_MISSING: "dane-starttls-missing",
    LOOKUP_FAILED: "dane-lookup-failed",
    DNSSEC_BOGUS: "dnssec-bogus",
}

MAX_CHAIN = 16  # certificates of a presented chain considered (a server sends 2 to 4)
MAX_PATHS = 32  # paths from the leaf to one anchor tried (cross-signed intermediates)
MAX_STEPS = 512  # partial paths explored for one anchor


def _name(table: dict[int, str], value: int) -> str:
    return f"{table.get(value, 'unassigned')}({value})"


@attrs.frozen
class TLSARecord:
    """
    One TLSA record (RFC 6698 2.1): certificate usage, selector, matching
    type, and the certificate association data.
    """

    usage: int
    selector: int
    mtype: int
    data: bytes = attrs.field(converter=lambda b: bytes(b) if isinstance(
        b, (bytes, bytearray, memoryview)) else b)

    def __attrs_post_init__(self) -> None:
        for field, value in (("usage", self.usage), ("selector", self.selector),
                             ("matching type", self.mtype)):
            if not isinstance(value, int) or isinstance(value, bool) or \
                    not 0 <= value <= 255:
                raise ValueError(f"TLSA {field} must be a number from 0 to 255, "
                                 f"not {value!r}")
        if not isinstance(self.data, bytes) or not self.data:
            raise ValueError("TLSA record without certificate association data")

    @classmethod
    def from_text(cls, text: str) -> TLSARecord:
        """
        The presentation form, C{"3 1 1 4f2a..."}: three numbers and the
        data in hex, which may be split by white space and parentheses (as
        zone files and dig write it).  A leading owner name, class and
        type are not part of it.  ValueError for anything else.
        """
        fields = text.replace("(", " ").replace(")", " ").split()
        if len(fields) < 4:
            raise ValueError(f"TLSA record {text.strip()!r}: expected usage, selector, "
                             "matching type and data")
        numbers = []
        for word in fields[:3]:
            if not re.fullmatch(r"[0-9]{1,3}", word) or int(word) > 255:
                raise ValueError(f"TLSA record {text.strip()!r}: {word!r} is not a number "
                                 "from 0 to 255")
            numbers.append(int(word))
        hexdata = "".join(fields[3:])
        if not re.fullmatch(r"(?:[0-9a-fA-F]{2})+", hexdata):
            raise ValueError(f"TLSA record {text.strip()!r}: the data is not an even "
                             "number of hex digits")
        return cls(*numbers, bytes.fromhex(hexdata))

    @classmethod
    def from_wire(cls, rdata: bytes) -> TLSARecord:
        """
        The record's RDATA as it comes off the wire (RFC 6698 2.1).
        """
        if len(rdata) < 4:
            raise ValueError("TLSA RDATA shorter than 4 octets")
        return cls(rdata[0], rdata[1], rdata[2], rdata[3:])

    def to_text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def short(self) -> str:
        """
        For sentences: C{"TLSA 3 1 1 4f2a9c01..."} (the data cut to 8 hex
        digits).
        """
        data = self.data.hex()
        return (f"TLSA {self.usage} {self.selector} {self.mtype} "
                f"{data[:8]}{'…' if len(data) > 8 else ''}")

    @property
    def names(self) -> str:
        """
        RFC 7218's words: C{"DANE-EE(3) SPKI(1) SHA2-256(1)"}.
        """
        return (f"{_name(USAGES, self.usage)} {_name(SELECTORS, self.selector)} "
                f"{_name(MATCHING_TYPES, self.mtype)}")

    @property
    def unusable_reason(self) -> str | None:
        """
        Why a mail client may not use this record, in words; None when it
        may.
        """
        if self.usage in (0, 1):
            return f"{_name(USAGES, self.usage)} is not used for SMTP (RFC 7672 3.1.3)"
        if self.usage not in (DANE_TA, DANE_EE):
            return f"certificate usage {_name(USAGES, self.usage)} is not supported"
        if self.selector not in (CERT, SPKI):
            return f"selector {_name(SELECTORS, self.selector)} is not supported"
        if self.mtype not in (FULL, SHA2_256, SHA2_512):
            return f"matching type {_name(MATCHING_TYPES, self.mtype)} is not supported"
        size = DIGEST_SIZE.get(self.mtype)
        if size is not None and len(self.data) != size:
            return (f"a {MATCHING_TYPES[self.mtype]} digest is {size} octets, this one "
                    f"{len(self.data)}")
        return None

    @property
    def is_usable(self) -> bool:
        return self.unusable_reason is None


def usable(records: Iterable[TLSARecord]) -> tuple[TLSARecord, ...]:
    """
    The records a mail client may use (RFC 7672 3.1): DANE-TA(2) and
    DANE-EE(3), selectors 0 and 1, matching types 0, 1 and 2, digests of
    the right length; in their order, without duplicates.
    """
    out: list[TLSARecord] = []
    for r in records:
        if r.is_usable and r not in out:
            out.append(r)
    return tuple(out)


def tlsa_name(host: str, port: int = 25) -> str:
    """
    Where the TLSA records of a server are (RFC 7672 2.2.3):
    C{_25._tcp.mx.example.org}.
    """
    return f"_{port}._tcp.{host.rstrip('.')}"


def association(cert, selector: int, mtype: int) -> bytes:
    """
    What a TLSA record of C{selector} and C{mtype} holds for C{cert} (a
    cryptography certificate): its DER or its SubjectPublicKeyInfo, whole
    or hashed.
    """
    from cryptography.hazmat.primitives import serialization
    if selector == CERT:
        body = cert.public_bytes(serialization.Encoding.DER)
    elif selector == SPKI:
        body = cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        raise ValueError(f"selector {selector} is not supported")
    if mtype == FULL:
        return body
    if mtype == SHA2_256:
        return hashlib.sha256(body).digest()
    if mtype == SHA2_512:
        return hashlib.sha512(body).digest()
    raise ValueError(f"matching type {mtype} is not supported")


def record_for(cert, usage: int = DANE_EE, selector: int = SPKI,
               mtype: int = SHA2_256) -> TLSARecord:
    """
    The TLSA record that matches C{cert}: by default the usual C{3 1 1}.
    """
    return TLSARecord(usage, selector, mtype, association(cert, selector, mtype))


@attrs.frozen
class DaneVerdict:
    """
    What DANE says about one server: authenticated (C{status} L{MATCHED},
    C{record} the record that matched, at C{depth} of the chain), or not
    and why.  L{UNUSABLE} lets delivery go on (encrypted, not
    authenticated); every other status but L{MATCHED} stops it, with the
    TLS failure class C{kind}.

    C{records} is the whole RRset, C{detail} a short machine-ish reason
    within the status ("not-linked", "expired", "no-certificate",
    "SERVFAIL", ...), C{names} the reference identifiers checked (DANE-TA),
    C{matched_name} the one the certificate carries, C{leaf_names} the
    names the certificate carries.
    """

    status: str
    records: tuple[TLSARecord, ...] = ()
    record: TLSARecord | None = None
    depth: int | None = None
    detail: str = ""
    names: tuple[str, ...] = ()
    matched_name: str | None = None
    leaf_names: tuple[str, ...] = ()
    leaf: object = attrs.field(default=None, eq=False, repr=False)

    @classmethod
    def starttls_missing(cls, records: Iterable[TLSARecord]) -> DaneVerdict:
        """
        The server publishes TLSA records (usable or not: either way TLS is
        mandatory) but did not offer STARTTLS.
        """
        return cls(STARTTLS_MISSING, tuple(records))

    @classmethod
    def lookup_failed(cls, detail: str = "") -> DaneVerdict:
        """
        The TLSA lookup failed other than with a secure NODATA or NXDOMAIN
        (SERVFAIL, a timeout, ...): defer.
        """
        return cls(LOOKUP_FAILED, detail=detail)

    @classmethod
    def dnssec_bogus(cls, detail: str = "") -> DaneVerdict:
        """
        The resolver found the answer bogus (signatures that do not
        validate): defer.
        """
        return cls(DNSSEC_BOGUS, detail=detail)

    @property
    def authenticated(self) -> bool:
        return self.status == MATCHED

    @property
    def failed(self) -> bool:
        """
        Whether delivery to this server must stop (defer).
        """
        return self.status not in (MATCHED, UNUSABLE)

    @property
    def kind(self) -> str | None:
        """
        The TLS failure class (L{twisted_mta.tls.failure}), None when
        delivery may go on.
        """
        return KIND.get(self.status)

    @property
    def tlsrpt_result(self) -> str | None:
        """
        The TLS-RPT result type (RFC 8460 4.3), None for a match.
        """
        if self.status == UNUSABLE:
            return "tlsa-invalid"
        return TLSRPT_RESULT[self.kind] if self.kind else None

    @property
    def usable_records(self) -> tuple[TLSARecord, ...]:
        return usable(self.records)

    def describe(self) -> str:
        """
        The verdict in words, for logs and C{tls explain}.
        """
        rec = self.record
        names = " or ".join(self.names) or "the server's name"
        if self.status == MATCHED:
            if rec.usage == DANE_EE:
                return (f"the certificate matches {rec.names} ({rec.short}); under DANE-EE "
                        "names and dates are not checked")
            anchor = (f"the certificate at depth {self.depth}" if self.depth is not None
                      else "the trust anchor in the record itself")
            return (f"{anchor} matches {rec.names} ({rec.short}), the chain up to it "
                    f"verifies, and the certificate names {self.matched_name}")
        if self.status == UNUSABLE:
            why = "; ".join(f"{r.short}: {r.unusable_reason}" for r in self.records)
            return (f"no TLSA record is usable ({why or 'none'}): encryption is mandatory, "
                    "the certificate is not authenticated")
        if self.status == MISMATCH:
            if self.detail == "no-certificate":
                return "the server presented no certificate to match the TLSA records"
            return f"the certificate matches none of the TLSA records ({_list(self)})"
        if self.status == NAME_MISMATCH:
            has = ", ".join(self.leaf_names[:4]) or "no name"
            return (f"the chain leads to the trust anchor of {rec.names} ({rec.short}), "
                    f"but the certificate names {has}, not {names}")
        if self.status == CHAIN_INVALID:
            return (f"{rec.names} ({rec.short}) matches a trust anchor, but "
                    f"{_CHAIN_WORDS.get(self.detail, self.detail)}")
        if self.status == STARTTLS_MISSING:
            return ("TLSA records are published, so encryption is mandatory, but STARTTLS "
                    "is not offered")
        if self.status == LOOKUP_FAILED:
            return "the TLSA lookup failed" + (f" ({self.detail})" if self.detail else "")
        if self.status == DNSSEC_BOGUS:
            return "the DNS answer failed DNSSEC validation" + (
                f" ({self.detail})" if self.detail else "")
        return self.status

    def failure(self, host: str, address: str, port: int,
                certificate: CertificateFacts | None = None) -> TLSFailure | None:
        """
        The TLS failure this verdict means for C{host[address]:port}, None
        when delivery may go on.  C{certificate} defaults to the facts of
        the leaf the verdict saw.
        """
        if self.kind is None:
            return None
        if self.status == MISMATCH:
            shown = self.usable_records
        elif self.record is not None:
            shown = (self.record,)
        else:
            shown = self.records
        if certificate is None and self.leaf is not None:
            certificate = certificate_facts(self.leaf)
        return TLSFailure(self.kind, host=host, address=address, port=port,
                          detail=self.detail, certificate=certificate,
                          expected_name=self.names[0] if self.names else None,
                          tlsa=tuple(r.short for r in shown), names=self.names)


_CHAIN_WORDS = {
    "not-linked": "the certificates sent do not link the server's certificate to it",
    "expired": "the server's certificate has expired",
    "not-yet-valid": "the server's certificate is not valid yet",
    "intermediate-expired": "a certificate between the server's and the anchor has expired",
    "intermediate-not-yet-valid": ("a certificate between the server's and the anchor is "
                                   "not valid yet"),
    "not-a-ca": "a certificate that issued another in the chain is not a CA certificate",
}


def _list(v: DaneVerdict) -> str:
    return ", ".join(r.short for r in v.usable_records)


def match(records: Iterable[TLSARecord], chain: Sequence, host_names: Iterable[str],
          now: datetime | None = None) -> DaneVerdict:
    """
    Whether the certificate C{chain} (cryptography certificates, the
    leaf first) that a server presented matches the TLSA RRset
    C{records}; C{host_names} are the names the leaf must carry when a
    DANE-TA record matches (the MX host and, where it applies, its
    CNAME-expanded name), C{now} the time the dates are checked at (DANE-TA
    only).  See the module's documentation for what is supported.
    """
    records = tuple(records)
    names = tuple(n.lower().rstrip(".") for n in host_names)
    good = usable(records)
    if not good:
        return DaneVerdict(UNUSABLE, records, names=names)
    chain = list(chain or ())[:MAX_CHAIN]
    if not chain:
        return DaneVerdict(MISMATCH, records, detail="no-certificate", names=names)
    leaf = chain[0]
    base = dict(records=records, names=names, leaf_names=_dns_names(leaf), leaf=leaf)
    digests: dict[tuple[int, int, int], bytes] = {}

    def matches(i: int, r: TLSARecord) -> bool:
        key = (i, r.selector, r.mtype)
        if key not in digests:
            digests[key] = association(chain[i], r.selector, r.mtype)
        return hmac.compare_digest(digests[key], r.data)

    for r in good:
        if r.usage == DANE_EE and matches(0, r):
            return DaneVerdict(MATCHED, record=r, depth=0, **base)
    problems: list[DaneVerdict] = []
    at = now or datetime.now(timezone.utc)
    for r in good:
        if r.usage != DANE_TA:
            continue
        anchors = [(depth, chain[depth]) for depth in range(1, len(chain))
                   if matches(depth, r)]
        if not anchors and r.mtype == FULL:
            anchor = _anchor_from_record(r)
            if anchor is not None:
                anchors = [(None, anchor)]
        for depth, anchor in anchors:
            trouble = _check_path(chain, anchor, at)
            if trouble is not None:
                problems.append(DaneVerdict(CHAIN_INVALID, record=r, depth=depth,
                                            detail=trouble, **base))
                continue
            name = _name_matches(leaf, names)
            if name is None:
                problems.append(DaneVerdict(NAME_MISMATCH, record=r, depth=depth,
                                            detail="name", **base))
                continue
            return DaneVerdict(MATCHED, record=r, depth=depth, matched_name=name, **base)
    if problems:
        # The one that got furthest: a wrong name (chain good), then a
        # chain that links but fails a check, then one that does not link.
        order = {NAME_MISMATCH: 0}
        return min(problems, key=lambda v: (order.get(v.status, 1),
                                            v.detail == "not-linked"))
    return DaneVerdict(MISMATCH, detail="no-match", **base)


def _anchor_from_record(r: TLSARecord):
    """
    The trust anchor a full-value DANE-TA record holds itself (RFC 7671
    5.2): a certificate (2 0 0) or a public key (2 1 0); None when the data
    does not parse.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    try:
        if r.selector == CERT:
            return x509.load_der_x509_certificate(r.data)
        return load_der_public_key(r.data)
    except (ValueError, TypeError):
        return None


def _is_certificate(obj) -> bool:
    from cryptography import x509
    return isinstance(obj, x509.Certificate)


def _issued_by(cert, issuer) -> bool:
    """
    Whether C{issuer} (a certificate, or a bare public key) signed C{cert};
    for a certificate, its subject must also be C{cert}'s issuer.
    """
    from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
    try:
        if _is_certificate(issuer):
            cert.verify_directly_issued_by(issuer)
        else:
            _verify_with_key(cert, issuer)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _verify_with_key(cert, key) -> None:
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
    params = cert.signature_algorithm_parameters
    algorithm = cert.signature_hash_algorithm
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, params, algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, params)
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        key.verify(cert.signature, cert.tbs_certificate_bytes)
    elif isinstance(key, dsa.DSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, algorithm)
    else:
        raise TypeError(f"unsupported key {type(key).__name__}")


def _paths(chain: list, anchor):
    """
    The paths of certificates from the leaf up, each signed by the next
    and the last by C{anchor}, taken from C{chain} in any order (a
    cross-signed intermediate may give more than one).  Each signature is
    checked once; at most L{MAX_PATHS} paths are tried, and L{MAX_STEPS}
    partial ones (a chain of certificates that all sign each other must
    not cost the factorial of its length).
    """
    signed: dict[tuple[int, int], bool] = {}

    def by(i: int, j: int) -> bool:  # chain[i] signed by chain[j] (-1: the anchor)
        if (i, j) not in signed:
            signed[i, j] = _issued_by(chain[i], anchor if j < 0 else chain[j])
        return signed[i, j]

    found = steps = 0
    stack = [[0]]
    while stack and found < MAX_PATHS and steps < MAX_STEPS:
        steps += 1
        path = stack.pop()
        i = path[-1]
        if by(i, -1):
            found += 1
            yield [chain[k] for k in path]
        for j in reversed(range(1, len(chain))):
            if j not in path and chain[j] is not anchor and by(i, j):
                stack.append(path + [j])


def _is_ca(cert, anchor: bool = False) -> bool:
    from cryptography import x509
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return anchor and cert.version == x509.Version.v1
    if not bc.ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def _check_path(chain: list, anchor, at: datetime) -> str | None:
    """
    Why no chain from the leaf to C{anchor} holds (a detail of
    L{CHAIN_INVALID}: the first path's trouble), or None when one does.
    """
    if _is_certificate(anchor) and not _is_ca(anchor, anchor=True):
        # Checked after a path is found: an anchor that signed nothing
        # here is "not linked", whatever it is.
        anchor_trouble = "not-a-ca"
    else:
        anchor_trouble = None
    first = None
    for path in _paths(chain, anchor):
        trouble = anchor_trouble or _path_trouble(path, at)
        if trouble is None:
            return None
        first = first or trouble
    return first or "not-linked"


def _path_trouble(path: list, at: datetime) -> str | None:
    if any(not _is_ca(c) for c in path[1:]):
        return "not-a-ca"
    for depth, c in enumerate(path):
        prefix = "" if depth == 0 else "intermediate-"
        if at > c.not_valid_after_utc:
            return prefix + "expired"
        if at < c.not_valid_before_utc:
            return prefix + "not-yet-valid"
    return None


def _dns_names(cert) -> tuple[str, ...]:
    """
    The DNS names in C{cert}'s subjectAltName; its common name when there
    is none.
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(ext.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        sans = ()
    if sans:
        return sans
    return tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME))


def _name_matches(cert, names: tuple[str, ...]) -> str | None:
    """
    The first of C{names} that C{cert} carries (RFC 7672 3.2.3), or None.
    """
    from cryptography import x509
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        has_dns = bool(ext.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        has_dns = False
    for name in names:
        if has_dns:
            try:
                verify_certificate_hostname(cert, name)
            except (VerificationError, CertificateError, ValueError):
                continue
            return name
        if any(_wildcard_match(cn, name) for cn in _dns_names(cert)):
            return name
    return None


def _wildcard_match(pattern: str, name: str) -> bool:
    """
    RFC 6125 6.4.3 as RFC 7672 3.2.3 narrows it: equal (case-insensitive),
    or C{*.rest} where the name has one label more than C{rest}.
    """
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return "*" not in name
    if not pattern.startswith("*.") or "*" in pattern[2:]:
        return False
    label, dot, rest = name.partition(".")
    return bool(label and dot and rest.count(".") >= 1 and rest == pattern[2:])


def certificate_facts(cert) -> CertificateFacts:
    """
    The facts a failure names, from a cryptography certificate (the
    handshake record has the same from pyOpenSSL's).
    """
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    def name_of(n) -> str:
        cn = n.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else n.rfc4514_string()
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(ext.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        sans = ()
    has_cn = bool(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return CertificateFacts(
        subject=name_of(cert.subject) if has_cn or not sans else sans[0], sans=sans,
        issuer=name_of(cert.issuer), not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
        self_signed=cert.subject == cert.issuer)
