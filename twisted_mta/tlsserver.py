"""
Our own TLS identity: the server-side context for STARTTLS and implicit TLS.
"""

from __future__ import annotations

from cryptography import x509
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

    The certificate file may hold the whole chain, leaf first; text
    around the PEM blocks (and other blocks, such as the key) is ignored.
    """
    if not settings.enabled:
        return None
    certs = _load_chain(settings.certificate)
    try:
        with open(settings.key, "rb") as f:
            key = ssl.KeyPair.load(f.read(), crypto.FILETYPE_PEM)
    except (OSError, crypto.Error, ValueError) as e:
        raise TLSSetupError(f"{settings.key}: cannot load private key: {e}")
    try:
        options = ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certs[0],
            extraCertChain=certs[1:],
        )
        options.getContext()
        return options
    except Exception as e:  # pyOpenSSL reports a key/cert mismatch here
        raise TLSSetupError(f"{settings.certificate}: certificate and key do not match: {e}")


def _load_chain(path: str) -> list[crypto.X509]:
    """
    Every certificate in the PEM file C{path}, in file order.
    """
    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise TLSSetupError(f"{path}: cannot load certificate: {e}")
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        # cryptography: "Unable to load PEM file. See <URL> for more
        # details. <reason>", the reason MalformedFraming when the file has
        # no complete CERTIFICATE block; or why a block's DER does not parse.
        message = str(e)
        if message.startswith("Unable to load PEM"):
            reason = message.rpartition("details.")[2].strip()
            if reason in ("", "MalformedFraming"):
                raise TLSSetupError(f"{path}: no certificate found")
            message = f"not valid PEM: {reason}"
        raise TLSSetupError(f"{path}: cannot load certificate: {message}")
    return [crypto.X509.from_cryptography(cert) for cert in chain]
