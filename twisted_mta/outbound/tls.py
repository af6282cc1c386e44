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

from twisted_mta.config import _is_ip
from twisted_mta.outbound.tlsfailure import CertificateFacts, TLSFailure, classify_chain
from twisted_mta.outbound.tlspolicy import TLSRequirements

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
    verified: bool = False  # chain and name good (whether or not required)

    def describe(self) -> str:
        if self.version is None:
            return "no TLS"
        if self.verified:
            check = "certificate verified"
        elif self.certificate is None:
            check = "no certificate"
        else:
            kind = classify_chain(self.chain_errors)
            check = f"certificate not verified ({kind[1] if kind else 'name mismatch'})"
        return f"{self.version} {self.cipher}, {check}"


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
        if not _is_ip(self.expected_name):
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
        if cert is None:
            return
        r.certificate = certificate_facts(cert)
        r.name_ok = _name_matches(connection, self.expected_name)
        r.verified = not r.chain_errors and bool(r.name_ok)


def evaluate(req: TLSRequirements, creator: PolicyCreator, host: str, address: str,
             port: int) -> TLSFailure | None:
    """
    Whether the handshake recorded by C{creator} meets C{req}: None if so,
    else the typed failure.
    """
    if not req.verify:
        return None
    r = creator.record
    facts = dict(host=host, address=address, port=port, expected_name=creator.expected_name,
                 certificate=r.certificate)
    if r.certificate is None:
        return TLSFailure("certificate-untrusted", detail="no-certificate", **facts)
    chain = classify_chain(r.chain_errors)
    if chain is not None:
        return TLSFailure(chain[0], detail=chain[1], **facts)
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
        self_signed=c.subject == c.issuer)


def _name_matches(connection: SSL.Connection, name: str) -> bool:
    from service_identity import VerificationError
    from service_identity.pyopenssl import verify_hostname, verify_ip_address
    try:
        if _is_ip(name):
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
        return TLSFailure("handshake-failed", detail="no-common-version",
                          versions=f"{floor}-TLSv1.3", **facts)
    return evaluate(shadow, creator, host, address, port)
