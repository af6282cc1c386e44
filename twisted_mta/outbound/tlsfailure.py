"""
The TLS part of the failure taxonomy: what went wrong with encryption to
one server, with the facts a person needs, and the one place that turns a
handshake's outcome into such a failure.

The classes and their codes (ARCHITECTURE.md, "The failure taxonomy"):

| kind | TLS-RPT result type | temporary / permanent |
|---|---|---|
| starttls-not-offered | starttls-not-supported | 4.7.4 / 5.7.4 |
| starttls-refused | starttls-not-supported | 4.7.4 / 5.7.4 |
| certificate-expired | certificate-expired | 4.7.5 / 5.7.5 |
| certificate-not-yet-valid | validation-failure | 4.7.5 / 5.7.5 |
| certificate-untrusted | certificate-not-trusted | 4.7.5 / 5.7.5 |
| certificate-host-mismatch | certificate-host-mismatch | 4.7.5 / 5.7.5 |
| handshake-failed | validation-failure | 4.7.5 / 5.7.5 |
"""

from __future__ import annotations

from datetime import datetime, timezone

import attrs
from twisted.internet import error
from twisted.python.failure import Failure

TLS_KINDS = (
    "starttls-not-offered", "starttls-refused", "certificate-expired",
    "certificate-not-yet-valid", "certificate-untrusted", "certificate-host-mismatch",
    "handshake-failed",
)
CERTIFICATE_KINDS = ("certificate-expired", "certificate-not-yet-valid",
                     "certificate-untrusted", "certificate-host-mismatch")

TLSRPT_RESULT = {
    "starttls-not-offered": "starttls-not-supported",
    "starttls-refused": "starttls-not-supported",
    "certificate-expired": "certificate-expired",
    "certificate-not-yet-valid": "validation-failure",
    "certificate-untrusted": "certificate-not-trusted",
    "certificate-host-mismatch": "certificate-host-mismatch",
    "handshake-failed": "validation-failure",
}

# OpenSSL X509_V_ERR_* numbers we name (x509_vfy.h).
X509_NOT_YET_VALID = 9
X509_EXPIRED = 10
X509_SELF_SIGNED_LEAF = 18
X509_SELF_SIGNED_IN_CHAIN = 19
X509_UNKNOWN_ISSUER = 20
X509_UNABLE_TO_VERIFY_LEAF = 21
X509_NO_ISSUER = 2


@attrs.frozen
class CertificateFacts:
    subject: str  # the subject's common name, or the whole subject
    sans: tuple[str, ...]
    issuer: str
    not_before: float | None
    not_after: float | None
    self_signed: bool


@attrs.frozen
class TLSFailure:
    """
    One failed attempt at encryption with one server, and why.

    C{detail} is a short machine-ish reason within the kind ("self-signed",
    "unknown-ca", "no-common-version", "reset", ...).
    """

    kind: str
    host: str  # the server's name (MX or smarthost)
    address: str
    port: int
    detail: str = ""
    expected_name: str | None = None
    certificate: CertificateFacts | None = None
    versions: str = ""  # what we offered, e.g. "TLSv1.2-TLSv1.3"
    reply: str = ""  # the server's words, for starttls-refused

    @property
    def tlsrpt_result(self) -> str:
        return TLSRPT_RESULT[self.kind]

    def enhanced(self, permanent: bool = False) -> str:
        cls = "5" if permanent else "4"
        return f"{cls}.7.4" if self.kind.startswith("starttls") else f"{cls}.7.5"

    @property
    def is_certificate(self) -> bool:
        return self.kind in CERTIFICATE_KINDS

    def describe(self) -> str:
        """
        What happened, in plain words, naming the server and the facts.
        """
        h = self.host
        cert = self.certificate
        if self.kind == "starttls-not-offered":
            return f"{h} does not offer encryption (no STARTTLS)"
        if self.kind == "starttls-refused":
            words = f": {self.reply}" if self.reply else ""
            return f"{h} offers encryption but refused to start it{words}"
        if self.kind == "certificate-expired" and cert and cert.not_after:
            return f"{h} presented a certificate that expired on {_day(cert.not_after)}"
        if self.kind == "certificate-expired":
            return f"{h} presented an expired certificate"
        if self.kind == "certificate-not-yet-valid" and cert and cert.not_before:
            return (f"{h} presented a certificate that is not valid until "
                    f"{_day(cert.not_before)}")
        if self.kind == "certificate-not-yet-valid":
            return f"{h} presented a certificate that is not valid yet"
        if self.kind == "certificate-untrusted":
            if self.detail == "self-signed":
                return f"{h} presented a self-signed certificate, which nobody vouches for"
            issuer = f" (issued by {cert.issuer})" if cert and cert.issuer else ""
            if self.detail == "incomplete-chain":
                return (f"{h} presented a certificate{issuer} without the intermediate "
                        "certificates needed to check it")
            if self.detail == "unknown-issuer":
                return (f"{h} presented a certificate{issuer} from an authority we do not "
                        "trust, or without the intermediate certificates needed to check it")
            return (f"{h} presented a certificate{issuer} from an authority we do not "
                    "trust")
        if self.kind == "certificate-host-mismatch":
            names = ", ".join((cert.sans or (cert.subject,))[:4]) if cert else "another name"
            return (f"{h} presented a certificate for {names}, not for "
                    f"{self.expected_name or h}")
        return {
            "no-common-version": f"{h} and this server have no TLS version in common "
                                 f"(we offered {self.versions or 'modern versions'})",
            "no-common-cipher": f"{h} and this server have no cipher in common",
            "reset": f"{h} closed the connection during the encryption handshake",
            "timeout": f"{h} stopped answering during the encryption handshake",
        }.get(self.detail, f"the encryption handshake with {h} failed"
                           + (f" ({self.detail})" if self.detail else ""))

    def advice(self) -> str:
        """
        What the recipient's administrators should do about it.
        """
        if self.kind == "starttls-not-offered":
            return "enable STARTTLS on the server"
        if self.kind == "starttls-refused":
            return "fix the server's TLS set-up (it advertises STARTTLS but refuses it)"
        if self.kind == "certificate-expired":
            return "renew the certificate"
        if self.kind == "certificate-not-yet-valid":
            return "check the certificate's dates and the server's clock"
        if self.kind == "certificate-untrusted":
            if self.detail == "incomplete-chain":
                return "install the full certificate chain (with the intermediates)"
            if self.detail == "unknown-issuer":
                return ("install a certificate from a public certificate authority, with "
                        "its full chain")
            return "install a certificate from a public certificate authority"
        if self.kind == "certificate-host-mismatch":
            return f"install a certificate that names {self.expected_name or self.host}"
        return "allow TLS 1.2 or later with current ciphers"


def _day(t: float) -> str:
    d = datetime.fromtimestamp(t, timezone.utc)
    return f"{d.day} {d.strftime('%B %Y')}"


def classify_chain(errors: list[tuple[int, int]]) -> tuple[str, str] | None:
    """
    (kind, detail) for the first chain error recorded by the verify
    callback (C{(depth, errno)} pairs), or None for a good chain.
    """
    if not errors:
        return None
    codes = [errno for _, errno in errors]
    if X509_EXPIRED in codes:
        return "certificate-expired", "expired"
    if X509_NOT_YET_VALID in codes:
        return "certificate-not-yet-valid", "not-yet-valid"
    if X509_SELF_SIGNED_LEAF in codes:
        return "certificate-untrusted", "self-signed"
    if X509_SELF_SIGNED_IN_CHAIN in codes:
        return "certificate-untrusted", "unknown-ca"
    if X509_UNKNOWN_ISSUER in codes:
        # The leaf's issuer is unknown here: an unknown CA, or a chain sent
        # without its intermediates; OpenSSL cannot tell them apart.
        depths = [depth for depth, errno in errors if errno == X509_UNKNOWN_ISSUER]
        return "certificate-untrusted", "unknown-ca" if max(depths) > 0 else "unknown-issuer"
    if X509_UNABLE_TO_VERIFY_LEAF in codes or X509_NO_ISSUER in codes:
        return "certificate-untrusted", "incomplete-chain"
    return "certificate-untrusted", f"verify-error-{codes[0]}"


def classify_handshake_error(reason: Failure | None) -> str:
    """
    The C{detail} of a handshake that died: no common version or cipher,
    reset, timeout, or OpenSSL's own words.
    """
    if reason is None:
        return "reset"
    value = reason.value
    from OpenSSL import SSL
    if isinstance(value, SSL.Error):
        texts = " ".join(str(r[2]) for r in (value.args[0] if value.args and
                                             isinstance(value.args[0], list) else [])
                         if len(r) > 2).lower() or str(value).lower()
        if any(w in texts for w in ("protocol version", "unsupported protocol",
                                    "wrong version number", "version too low")):
            return "no-common-version"
        if any(w in texts for w in ("no shared cipher", "no ciphers", "handshake failure",
                                    "sslv3 alert handshake failure", "no suitable")):
            return "no-common-cipher"
        return texts or "tls-error"
    if isinstance(value, (error.ConnectionLost, error.ConnectionDone)):
        return "reset"
    if isinstance(value, error.TimeoutError):
        return "timeout"
    return str(value) or type(value).__name__
