"""
Our own TLS identity: the server-side context for STARTTLS and implicit TLS.
"""

from __future__ import annotations

from OpenSSL import crypto
from twisted.internet import ssl

from twisted_mta.config import TLSServerSettings


class TLSSetupError(Exception):
    """
    The certificate or key cannot be loaded; C{str()} names the file.
    """


def server_context(settings: TLSServerSettings) -> ssl.CertificateOptions | None:
    """
    Build the server context, or C{None} when no certificate is configured.

    The certificate file may hold the whole chain, leaf first.
    """
    if not settings.enabled:
        return None
    try:
        with open(settings.certificate, "rb") as f:
            pem = f.read()
        certs = [ssl.Certificate.loadPEM(block) for block in _pem_blocks(pem)]
        if not certs:
            raise TLSSetupError(f"{settings.certificate}: no certificate found")
    except (OSError, crypto.Error, ValueError) as e:
        raise TLSSetupError(f"{settings.certificate}: cannot load certificate: {e}")
    try:
        with open(settings.key, "rb") as f:
            key = ssl.KeyPair.load(f.read(), crypto.FILETYPE_PEM)
    except (OSError, crypto.Error, ValueError) as e:
        raise TLSSetupError(f"{settings.key}: cannot load private key: {e}")
    try:
        options = ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certs[0].original,
            extraCertChain=[c.original for c in certs[1:]],
        )
        options.getContext()
        return options
    except Exception as e:  # pyOpenSSL reports a key/cert mismatch here
        raise TLSSetupError(f"{settings.certificate}: certificate and key do not match: {e}")


def _pem_blocks(pem: bytes) -> list[bytes]:
    marker = b"-----END CERTIFICATE-----"
    blocks = []
    for part in pem.split(marker)[:-1]:
        start = part.find(b"-----BEGIN CERTIFICATE-----")
        if start >= 0:
            blocks.append(part[start:] + marker + b"\n")
    return blocks
