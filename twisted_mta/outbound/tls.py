"""
The client side of outbound TLS: a connection creator that encrypts
without requiring a valid certificate, and records what it saw.

This is the "opportunistic" behaviour of the outbound leg; the policy
engine (strict, relaxed, ...) replaces the verification decision but keeps
the recording, because OpenSSL's own error ("certificate verify failed")
does not say why (see research/twisted-notes.md 2.5).
"""

from __future__ import annotations

import attrs
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer


@attrs.define
class TLSRecord:
    """
    What one handshake showed; filled in while it happens.
    """

    server_name: str
    chain_errors: list[tuple[int, int, str]] = attrs.field(factory=list)
    version: str | None = None
    cipher: str | None = None

    @property
    def verified_chain(self) -> bool:
        return not self.chain_errors

    def describe(self) -> str:
        if self.version is None:
            return "no TLS"
        chain = "chain ok" if self.verified_chain else (
            "chain not verified: " + self.chain_errors[0][2])
        return f"{self.version} {self.cipher} ({chain}, not required)"


@implementer(IOpenSSLClientConnectionCreator)
class OpportunisticCreator:
    """
    Encrypt to any peer: send SNI, verify nothing, note chain errors.
    """

    def __init__(self, server_name: str, context: SSL.Context | None = None) -> None:
        self.server_name = server_name
        self.record = TLSRecord(server_name)
        self._context = context if context is not None else shared_context()

    def clientConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self.server_name and not _is_ip(self.server_name):
            connection.set_tlsext_host_name(self.server_name.encode("idna"))
        connection.set_verify(SSL.VERIFY_PEER, self._verify)
        return connection

    def _verify(self, connection, certificate, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self.record.chain_errors.append((depth, errno, _verify_message(errno)))
        return True  # opportunistic: encryption without authentication


_shared: SSL.Context | None = None


def shared_context() -> SSL.Context:
    """
    One client context for all opportunistic connections: loading the
    system's trust store costs tens of milliseconds and about a megabyte,
    far too much to repeat per connection.
    """
    global _shared
    if _shared is None:
        context = ssl.CertificateOptions().getContext()
        context.set_default_verify_paths()  # so the record says whether the chain is good
        _shared = context
    return _shared


def _verify_message(errno: int) -> str:
    try:
        from OpenSSL._util import ffi, lib
        return ffi.string(lib.X509_verify_cert_error_string(errno)).decode()
    except Exception:
        return f"verify error {errno}"


def _is_ip(value: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
