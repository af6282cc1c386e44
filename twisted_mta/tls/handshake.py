"""
The client side of outbound TLS: a connection creator that runs a
handshake under a policy's requirements and records what it saw, and the
check of that record against the requirements.

OpenSSL's own verification error says only "certificate verify failed",
so verification never fails inside OpenSSL here: the verify callback
records every chain error (and accepts), and after the handshake
L{evaluate} decides with all the facts at hand, so a failure can say
"expired on 3 March" instead of a number.  Nothing but EHLO is sent before
that decision.
"""

from __future__ import annotations

from datetime import timezone

import attrs
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from twisted_mta.config import is_ip
from twisted_mta.tls.failure import (
    WEAK_ERRORS, CertificateFacts, TLSFailure, classify_chain, tls_words,
)
from twisted_mta.tls.policy import TLSRequirements

_VERSIONS = {
    "TLSv1.0": SSL.TLS1_VERSION,
    "TLSv1.1": SSL.TLS1_1_VERSION,
    "TLSv1.2": SSL.TLS1_2_VERSION,
    "TLSv1.3": SSL.TLS1_3_VERSION,
}


@attrs.define
class TLSRecord:
    """
    What one handshake showed; filled in while it happens.
    """

    server_name: str
    chain_errors: list[tuple[int, int]] = attrs.field(factory=list)
    version: str | None = None
    cipher: str | None = None
    certificate: CertificateFacts | None = None
    name_ok: bool | None = None  # the expected name is in the certificate
    weakness: tuple[str, str] | None = None  # (detail, words) at the normal level
    # Verified as strict would verify it, at the normal security level,
    # whatever level the connection ran at (see judge).
    verified: bool = False
    unverified_reason: str | None = None  # why not, in a few words
    dane: object = None  # under DANE: the DaneVerdict (twisted_mta.tls.dane)

    def judge(self) -> None:
        """
        Decide C{verified}: the chain and the name, and what OpenSSL's
        default security level would accept (TLS 1.2 or newer, strong
        keys and signatures).  Opportunistic connections run at level 0
        so that weak encryption beats cleartext; their certificate is
        still judged here at the normal level, so a weak key or a TLS 1.0
        session is never recorded (or learnt by the ratchet) as verified.
        """
        reason = None
        if self.certificate is None:
            reason = "no certificate"
        else:
            errors = [(d, e) for d, e in self.chain_errors if e not in WEAK_ERRORS]
            chain = classify_chain(errors)
            if chain is not None:
                reason = chain[1]
            elif self.weakness is not None or any(e in WEAK_ERRORS
                                                  for _, e in self.chain_errors):
                reason = f"weak: {self.weakness[1]}" if self.weakness else "weak key or signature"
            elif not self.name_ok:
                reason = "name mismatch"
            elif self.version not in _VERSIONS or \
                    _VERSIONS[self.version] < _VERSIONS[NORMAL_FLOOR]:
                reason = f"{tls_words(self.version or '?')} is below {tls_words(NORMAL_FLOOR)}"
        self.verified = reason is None
        self.unverified_reason = reason

    def judge_dane(self, verdict) -> None:
        """
        Under DANE the TLSA records, not the WebPKI, say whether the
        certificate is authenticated (RFC 7672 3).
        """
        self.dane = verdict
        self.verified = verdict.authenticated
        self.unverified_reason = None if verdict.authenticated else verdict.describe()

    def describe(self) -> str:
        if self.version is None:
            return "no TLS"
        if self.dane is not None and self.verified:
            return f"{self.version} {self.cipher}, certificate verified by DANE " \
                   f"({self.dane.record.short})"
        if self.verified:
            check = "certificate verified"
        elif self.certificate is None:
            check = "no certificate"
        else:
            check = f"certificate not verified ({self.unverified_reason})"
        return f"{self.version} {self.cipher}, {check}"


NORMAL_FLOOR = "TLSv1.2"  # the oldest version OpenSSL's default security level allows
MIN_RSA_BITS = 2048  # security level 2: 112-bit security
MIN_EC_BITS = 224
WEAK_HASHES = ("md5", "sha1")


def weakness(chain: list) -> tuple[str, str] | None:
    """
    (detail, words) for the first certificate of C{chain} (cryptography
    certificates, the peer's first) that OpenSSL's default security level
    would refuse: a key under 2048 bits (RSA, DSA) or 224 bits (EC), or a
    signature made with MD5 or SHA-1 (a root's signature on itself does
    not count).  None when the chain is strong.
    """
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
    for depth, cert in enumerate(chain):
        key = cert.public_key()
        problems, detail = [], None
        if isinstance(key, (rsa.RSAPublicKey, dsa.DSAPublicKey)) and \
                key.key_size < MIN_RSA_BITS:
            kind = "RSA" if isinstance(key, rsa.RSAPublicKey) else "DSA"
            problems.append(f"a {key.key_size}-bit {kind} key")
            detail = "key-too-small"
        elif isinstance(key, ec.EllipticCurvePublicKey) and key.key_size < MIN_EC_BITS:
            problems.append(f"a {key.key_size}-bit EC key")
            detail = "key-too-small"
        hash_name = _hash_name(cert)
        if hash_name.replace("-", "").lower() in WEAK_HASHES and cert.issuer != cert.subject:
            problems.append(f"a {hash_name} signature")
            detail = detail or "weak-signature"
        if problems:
            words = " and ".join(problems)
            if depth:
                words = f"a certificate in its chain ({_cn(cert.subject)}) having {words}"
            return detail, words
    return None


def _hash_name(cert) -> str:
    try:
        algorithm = cert.signature_hash_algorithm
    except Exception:  # an algorithm cryptography does not know
        return "unknown"
    if algorithm is None:  # Ed25519 and the like hash internally
        return ""
    name = algorithm.name.upper()
    return {"SHA1": "SHA-1", "SHA224": "SHA-224", "SHA256": "SHA-256", "SHA384": "SHA-384",
            "SHA512": "SHA-512"}.get(name, name)


def _cn(name) -> str:
    from cryptography.x509.oid import NameOID
    cn = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cn[0].value) if cn else name.rfc4514_string()


_contexts: dict[tuple, SSL.Context] = {}


def client_context(req: TLSRequirements) -> SSL.Context:
    """
    One context per distinct set of settings, shared by all connections:
    loading a trust store costs tens of milliseconds and a megabyte.
    """
    key = (req.min_version, req.ciphers, req.ca_file)
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_options(SSL.OP_NO_COMPRESSION)
        ctx.set_min_proto_version(_VERSIONS.get(req.min_version or "TLSv1.2",
                                                SSL.TLS1_2_VERSION))
        if req.ciphers:
            ctx.set_cipher_list(req.ciphers.encode("ascii"))
        if req.ca_file:
            ctx.load_verify_locations(req.ca_file)
        else:
            ctx.set_default_verify_paths()
        _contexts[key] = ctx
    return ctx


@implementer(IOpenSSLClientConnectionCreator)
class PolicyCreator:
    """
    Start TLS to C{host} under C{req}: SNI, the version floor and ciphers
    of the policy, and a record of the chain and the name.
    """

    def __init__(self, req: TLSRequirements, host: str) -> None:
        self.req = req
        self.expected_name = (req.server_name or host).lower().rstrip(".")
        self.record = TLSRecord(self.expected_name)
        self._context = client_context(req)

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if not is_ip(self.expected_name):
            connection.set_tlsext_host_name(self.expected_name.encode("idna"))
        connection.set_verify(SSL.VERIFY_PEER, self._verify)
        return connection

    def _verify(self, connection, certificate, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self.record.chain_errors.append((depth, errno))
        return True  # decided after the handshake, with every fact (see evaluate)

    def handshake_done(self, connection: SSL.Connection) -> None:
        """
        Fill in the record once the handshake completed.
        """
        r = self.record
        version = connection.get_protocol_version_name()
        r.version = "TLSv1.0" if version == "TLSv1" else version  # OpenSSL's name for 1.0
        r.cipher = connection.get_cipher_name()
        cert = connection.get_peer_certificate()
        if cert is not None:
            r.certificate = certificate_facts(cert)
            r.name_ok = _name_matches(connection, self.expected_name)
            chain = connection.get_peer_cert_chain(as_cryptography=True) or [
                cert.to_cryptography()]
            r.weakness = weakness(chain)
        else:
            chain = []
        r.judge()
        if self.req.tlsa is not None:
            from twisted_mta.tls import dane
            r.judge_dane(dane.match(self.req.tlsa, chain,
                                    self.req.dane_names or (self.expected_name,)))


def evaluate(req: TLSRequirements, creator: PolicyCreator, host: str, address: str,
             port: int) -> TLSFailure | None:
    """
    Whether the handshake recorded by C{creator} meets C{req}: None if so,
    else the typed failure.
    """
    r = creator.record
    if req.tlsa is not None:
        verdict = r.dane
        return verdict.failure(host, address, port) if verdict is not None else None
    if not req.verify:
        return None
    facts = dict(host=host, address=address, port=port, expected_name=creator.expected_name,
                 certificate=r.certificate)
    if r.certificate is None:
        return TLSFailure("certificate-untrusted", detail="no-certificate", **facts)
    chain = classify_chain([(d, e) for d, e in r.chain_errors if e not in WEAK_ERRORS])
    if chain is not None:
        return TLSFailure(chain[0], detail=chain[1], **facts)
    weak_codes = [e for _, e in r.chain_errors if e in WEAK_ERRORS]
    if r.weakness is not None or weak_codes:
        detail, words = r.weakness or (classify_chain([(0, weak_codes[0])])[1], "")
        return TLSFailure("certificate-weak", detail=detail, weakness=words, **facts)
    if not r.name_ok:
        return TLSFailure("certificate-host-mismatch", detail="name", **facts)
    return None


def certificate_facts(cert) -> CertificateFacts:
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    c = cert.to_cryptography()

    def name_of(n) -> str:
        cn = n.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cn[0].value) if cn else n.rfc4514_string()
    try:
        ext = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(ext.get_values_for_type(x509.DNSName)) + tuple(
            str(a) for a in ext.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        sans = ()
    has_cn = bool(c.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    subject = name_of(c.subject) if has_cn or not sans else sans[0]
    return CertificateFacts(
        subject=subject, sans=sans, issuer=name_of(c.issuer),
        not_before=c.not_valid_before_utc.replace(tzinfo=timezone.utc).timestamp(),
        not_after=c.not_valid_after_utc.replace(tzinfo=timezone.utc).timestamp(),
        self_signed=c.subject == c.issuer, key=_key_words(c.public_key()),
        signature=_hash_name(c))


def _key_words(key) -> str:
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size} bits"
    if isinstance(key, dsa.DSAPublicKey):
        return f"DSA {key.key_size} bits"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "Ed448"
    return type(key).__name__


def _name_matches(connection: SSL.Connection, name: str) -> bool:
    from service_identity import VerificationError
    from service_identity.pyopenssl import verify_hostname, verify_ip_address
    try:
        if is_ip(name):
            verify_ip_address(connection, name)
        else:
            verify_hostname(connection, name)
    except VerificationError:
        return False
    except Exception:
        return False
    return True


def shadow_verdict(shadow: TLSRequirements, creator: PolicyCreator | None, tls_done: bool,
                   capabilities: dict, host: str, address: str, port: int
                   ) -> TLSFailure | None:
    """
    What the report-only policy C{shadow} would have said about a session
    that the active policy accepted: the same handshake, judged again.
    """
    facts = dict(host=host, address=address, port=port)
    if shadow.starttls == "never":
        return None
    if creator is None or not tls_done:
        if shadow.starttls == "required" and "STARTTLS" not in capabilities:
            return TLSFailure("starttls-not-offered", **facts)
        return None  # not tried under the active policy: unknown
    record = creator.record
    floor = shadow.min_version or "TLSv1.2"
    if record.version in _VERSIONS and _VERSIONS[record.version] < _VERSIONS[floor]:
        return TLSFailure("handshake-no-common-version", detail="server-too-old",
                          versions=f"{floor}-TLSv1.3", **facts)
    return evaluate(shadow, creator, host, address, port)
