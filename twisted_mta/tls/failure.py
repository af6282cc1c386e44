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
| certificate-weak | certificate-not-trusted | 4.7.5 / 5.7.5 |
| handshake-plaintext | starttls-not-supported | 4.7.5 / 5.7.5 |
| handshake-closed | validation-failure | 4.7.5 / 5.7.5 |
| handshake-timeout | validation-failure | 4.7.5 / 5.7.5 |
| handshake-no-common-version | validation-failure | 4.7.5 / 5.7.5 |
| handshake-no-common-cipher | validation-failure | 4.7.5 / 5.7.5 |
| handshake-failed | validation-failure | 4.7.5 / 5.7.5 |
| dane-mismatch | tlsa-invalid | 4.7.5 / 5.7.5 |
| dane-name-mismatch | certificate-host-mismatch | 4.7.5 / 5.7.5 |
| dane-chain-invalid | validation-failure | 4.7.5 / 5.7.5 |
| dane-starttls-missing | starttls-not-supported | 4.7.4 / 5.7.4 |
| dane-lookup-failed | dnssec-invalid | 4.7.5 / 5.7.5 |
| dnssec-bogus | dnssec-invalid | 4.7.5 / 5.7.5 |
| sts-mx-mismatch | validation-failure | 4.7.5 / 5.7.5 |

The DANE classes (RFC 7672; L{twisted_mta.tls.dane} makes them) stop
delivery to a server whose TLSA records say TLS is mandatory: a
certificate that matches none of them, a DANE-TA chain whose leaf does not
name the server or does not link to the anchor, STARTTLS not offered, and
a TLSA lookup that failed or came back bogus.  They are not certificate
classes (a relaxed retry cannot help).  RFC 8460's words decide their
result types: C{certificate-host-mismatch} names DANE's name check,
C{starttls-not-supported} is any MX without STARTTLS (C{dane-required} is
for a sender that requires TLSA records and found none), and
C{dnssec-invalid} is "no valid records were returned from the recursive
resolver".

C{sts-mx-mismatch} is an MX host that the destination's MTA-STS policy
(mode enforce) does not list: RFC 8461 4.1 forbids delivering to it, so
no connection is made.  A certificate that fails under such a policy is
one of the certificate classes, with the policy as the rule that required
it (and no relaxed retry: L{twisted_mta.tls.fallback}).

Every sentence names the server as C{host[address]:port}, the way the
trace header does, so the reader can tell which of several MX hosts (or
addresses of one) was at fault.
"""

from __future__ import annotations

from datetime import datetime, timezone

import attrs
from twisted.internet import error
from twisted.python.failure import Failure

TLSRPT_RESULT = {
    "starttls-not-offered": "starttls-not-supported",
    "starttls-refused": "starttls-not-supported",
    "certificate-expired": "certificate-expired",
    "certificate-not-yet-valid": "validation-failure",
    "certificate-untrusted": "certificate-not-trusted",
    "certificate-host-mismatch": "certificate-host-mismatch",
    "certificate-weak": "certificate-not-trusted",
    # 220 to STARTTLS, then no TLS: the server does not really support it.
    "handshake-plaintext": "starttls-not-supported",
    "handshake-closed": "validation-failure",
    "handshake-timeout": "validation-failure",
    "handshake-no-common-version": "validation-failure",
    "handshake-no-common-cipher": "validation-failure",
    "handshake-failed": "validation-failure",
    # DANE (RFC 7672): the server's TLSA records, and the DNSSEC behind them.
    "dane-mismatch": "tlsa-invalid",
    "dane-name-mismatch": "certificate-host-mismatch",
    "dane-chain-invalid": "validation-failure",
    "dane-starttls-missing": "starttls-not-supported",
    "dane-lookup-failed": "dnssec-invalid",
    "dnssec-bogus": "dnssec-invalid",
    # MTA-STS (RFC 8461): an MX host the enforced policy does not list.
    "sts-mx-mismatch": "validation-failure",
}
TLS_KINDS = tuple(TLSRPT_RESULT)
CERTIFICATE_KINDS = tuple(k for k in TLS_KINDS if k.startswith("certificate-"))
HANDSHAKE_KINDS = tuple(k for k in TLS_KINDS if k.startswith("handshake-"))
DANE_KINDS = ("dane-mismatch", "dane-name-mismatch", "dane-chain-invalid",
              "dane-starttls-missing", "dane-lookup-failed", "dnssec-bogus")

# OpenSSL X509_V_ERR_* numbers we name (x509_vfy.h).
X509_NOT_YET_VALID = 9
X509_EXPIRED = 10
X509_SELF_SIGNED_LEAF = 18
X509_SELF_SIGNED_IN_CHAIN = 19
X509_UNKNOWN_ISSUER = 20
X509_UNABLE_TO_VERIFY_LEAF = 21
X509_NO_ISSUER = 2
X509_EE_KEY_TOO_SMALL = 66
X509_CA_KEY_TOO_SMALL = 67
X509_CA_MD_TOO_WEAK = 68
WEAK_ERRORS = (X509_EE_KEY_TOO_SMALL, X509_CA_KEY_TOO_SMALL, X509_CA_MD_TOO_WEAK)


@attrs.frozen
class CertificateFacts:
    subject: str  # the subject's common name, or the whole subject
    sans: tuple[str, ...]
    issuer: str
    not_before: float | None
    not_after: float | None
    self_signed: bool
    key: str = ""  # "RSA 1024 bits", "EC P-256"
    signature: str = ""  # the signature's hash: "SHA-256", "SHA-1"


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
    weakness: str = ""  # certificate-weak: what is weak, in words
    waited: float | None = None  # handshake-timeout: seconds we waited
    implicit: bool = False  # TLS from the first byte (no STARTTLS)
    tlsa: tuple[str, ...] = ()  # DANE: the TLSA records concerned, "TLSA 3 1 1 4f2a..."
    names: tuple[str, ...] = ()  # DANE-TA: the names the certificate may carry
    sts: str = ""  # sts-mx-mismatch: the policy's domain and its mx patterns, in words

    @property
    def peer(self) -> str:
        """
        The server as the trace header writes it: C{host[address]:port}.
        """
        return f"{self.host}[{self.address}]:{self.port}"

    @property
    def tlsrpt_result(self) -> str:
        return TLSRPT_RESULT[self.kind]

    def enhanced(self, permanent: bool = False) -> str:
        cls = "5" if permanent else "4"
        starttls = self.kind.startswith("starttls") or self.kind == "dane-starttls-missing"
        return f"{cls}.7.4" if starttls else f"{cls}.7.5"

    @property
    def is_certificate(self) -> bool:
        return self.kind in CERTIFICATE_KINDS

    @property
    def is_handshake(self) -> bool:
        return self.kind in HANDSHAKE_KINDS

    @property
    def is_dane(self) -> bool:
        return self.kind in DANE_KINDS

    def describe(self) -> str:
        """
        What happened, in plain words, naming the server and the facts.
        """
        h = self.peer
        cert = self.certificate
        issuer = f" (issued by {cert.issuer})" if cert and cert.issuer else ""
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
            if self.detail == "no-certificate":
                return f"{h} presented no certificate at all"
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
                    f"{self.expected_name or self.host}")
        if self.kind == "certificate-weak":
            what = self.weakness or "a key or signature too weak to rely on"
            return (f"{h} presented a certificate{issuer} with {what}, too weak to prove "
                    "who the server is (we accept RSA keys of 2048 bits or more, EC keys of "
                    "224 bits or more, and signatures made with SHA-256 or better)")
        if self.kind == "handshake-plaintext":
            if self.implicit:
                return (f"{h} answered our TLS hello in plain text: it does not speak TLS "
                        "on this port")
            return (f"{h} answered STARTTLS with 220 but then replied to our TLS hello in "
                    "plain text, so its STARTTLS is broken")
        if self.kind == "handshake-closed":
            return f"{h} closed the connection during the encryption handshake"
        if self.kind == "handshake-timeout":
            waited = f" within {self.waited:g} seconds" if self.waited else ""
            return f"{h} did not answer the encryption handshake{waited}"
        if self.kind == "handshake-no-common-version":
            ours = _versions_words(self.versions)
            if self.detail == "server-too-old":
                theirs = "it chose an older version"
            elif self.detail == "server-too-new":
                theirs = "it chose a newer one"
            else:
                theirs = "it refused them, so it speaks only older (or other) versions"
            return (f"{h} and this server have no TLS version in common: we offered "
                    f"{ours}; {theirs}")
        if self.kind == "handshake-no-common-cipher":
            ours = _versions_words(self.versions)
            return (f"{h} and this server have no cipher in common (we offered "
                    f"{ours} with current ciphers; it accepted none of them)")
        if self.kind in DANE_KINDS:
            return self._describe_dane()
        if self.kind == "sts-mx-mismatch":
            return (f"{self.host} is not one of the mail servers that the MTA-STS policy "
                    f"{self.sts or 'of the domain'} lists, so it was not used")
        words = f" ({self.detail})" if self.detail else ""
        return f"the encryption handshake with {h} failed{words}"

    def _records_words(self) -> str:
        """
        "a DANE record (TLSA 3 1 1 4f2a...)" or "DANE records (TLSA ..., TLSA ...)".
        """
        if not self.tlsa:
            return "DANE (TLSA) records"
        shown = ", ".join(self.tlsa[:3]) + (", ..." if len(self.tlsa) > 3 else "")
        return f"a DANE record ({shown})" if len(self.tlsa) == 1 else \
            f"DANE records ({shown})"

    def _describe_dane(self) -> str:
        h = self.peer
        cert = self.certificate
        records = self._records_words()
        expected = " or ".join(self.names) or self.expected_name or self.host
        if self.kind == "dane-mismatch":
            if self.detail == "no-certificate":
                return f"{h} published {records} but presented no certificate"
            return f"{h} published {records} that its certificate does not match"
        if self.kind == "dane-name-mismatch":
            names = ", ".join((cert.sans or (cert.subject,))[:4]) if cert else "another name"
            return (f"{h} presented a certificate for {names}, not for {expected}, from the "
                    f"authority named by {records}")
        if self.kind == "dane-chain-invalid":
            d = self.detail
            if d == "expired" and cert and cert.not_after:
                what = f"its certificate expired on {_day(cert.not_after)}"
            elif d == "not-yet-valid" and cert and cert.not_before:
                what = f"its certificate is not valid until {_day(cert.not_before)}"
            else:
                what = _DANE_CHAIN_WORDS.get(d, f"its certificate chain is invalid ({d})"
                                             if d else "its certificate chain is invalid")
            return f"{h} published {records} naming a trust anchor, but {what}"
        if self.kind == "dane-starttls-missing":
            return (f"{h} publishes DANE (TLSA) records, so encryption is mandatory, but it "
                    "does not offer STARTTLS")
        where = self.host if not self.address else h
        words = f" ({self.detail})" if self.detail else ""
        if self.kind == "dane-lookup-failed":
            return (f"the DANE (TLSA) records of {where} could not be looked up{words}, so we "
                    "cannot tell whether it requires encryption and which certificate")
        return (f"the DNS answer about {where} (its address or DANE records) failed DNSSEC "
                f"validation{words}, so it cannot be trusted")

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
        if self.kind == "certificate-weak":
            return ("replace the certificate with one that has an RSA key of at least 2048 "
                    "bits (or an EC key) and a SHA-256 signature")
        if self.kind == "handshake-plaintext":
            if self.implicit:
                return "serve TLS on this port, or tell us the right port"
            return ("fix STARTTLS on the server (a proxy or firewall in front of it may be "
                    "intercepting SMTP), or stop advertising it")
        if self.kind == "handshake-closed":
            return ("look in the server's logs for why it drops TLS handshakes (often a "
                    "certificate or key it cannot load)")
        if self.kind == "handshake-timeout":
            return ("check that the server (and any firewall or proxy in front of it) "
                    "completes TLS handshakes")
        if self.kind == "handshake-no-common-version":
            return "enable TLS 1.2 or TLS 1.3 on the server"
        if self.kind == "handshake-no-common-cipher":
            return "enable current ciphers (ECDHE with AES-GCM or ChaCha20-Poly1305)"
        if self.kind == "dane-mismatch":
            if self.detail == "no-certificate":
                return "configure the server to present its certificate"
            return ("publish TLSA records that match the certificate the server presents "
                    "(3 1 1 with the SHA-256 digest of its public key is the usual choice), "
                    "and publish the next key's record before changing keys")
        if self.kind == "dane-name-mismatch":
            expected = " or ".join(self.names) or self.expected_name or self.host
            return (f"install a certificate that names {expected}, or publish a DANE-EE "
                    "record (3 1 1), which does not depend on names")
        if self.kind == "dane-chain-invalid":
            return _DANE_CHAIN_ADVICE.get(
                self.detail, "send the full chain up to the certificate the DANE-TA record "
                "names, or publish a DANE-EE record (3 1 1) for the server's own key")
        if self.kind == "dane-starttls-missing":
            return "enable STARTTLS on the server, or withdraw its TLSA records"
        if self.kind == "dane-lookup-failed":
            return (f"make sure the zone's DNS servers answer TLSA queries for "
                    f"_{self.port}._tcp.{self.host} with signed answers (a signed NODATA "
                    "when there are none)")
        if self.kind == "dnssec-bogus":
            return ("fix the zone's DNSSEC (expired signatures, or a DS record that does not "
                    "match the zone's keys, are the usual causes)")
        if self.kind == "sts-mx-mismatch":
            return (f"add {self.host} to the mx lines of the MTA-STS policy (and change the "
                    "id of the _mta-sts TXT record), or remove it from the MX records")
        return "check the server's TLS set-up and logs"


_DANE_CHAIN_WORDS = {
    "not-linked": ("the certificates it sent do not link its own certificate to that "
                   "anchor"),
    "expired": "its certificate has expired",
    "not-yet-valid": "its certificate is not valid yet",
    "intermediate-expired": "a certificate in its chain below the anchor has expired",
    "intermediate-not-yet-valid": ("a certificate in its chain below the anchor is not "
                                   "valid yet"),
    "not-a-ca": ("a certificate in its chain that issues others is not a CA certificate "
                 "(basicConstraints CA:TRUE)"),
}
_DANE_CHAIN_ADVICE = {
    "not-linked": ("send the full chain, up to and including the certificate the DANE-TA "
                   "record names"),
    "expired": "renew the certificate",
    "not-yet-valid": "check the certificate's dates and the server's clock",
    "intermediate-expired": "install the current intermediate certificates",
    "intermediate-not-yet-valid": ("check the intermediate certificates' dates and the "
                                   "server's clock"),
    "not-a-ca": ("issue the server's certificate from a CA certificate (basicConstraints "
                 "CA:TRUE), and point the DANE-TA record at it"),
}


def _versions_words(versions: str) -> str:
    """
    "TLSv1.2-TLSv1.3" -> "TLS 1.2 to TLS 1.3".
    """
    if not versions:
        return "TLS 1.2 to TLS 1.3"
    low, _, high = versions.partition("-")
    low, high = tls_words(low), tls_words(high)
    return low if not high or low == high else f"{low} to {high}"


def tls_words(version: str) -> str:
    """
    OpenSSL's version names as people write them: "TLSv1.2" -> "TLS 1.2".
    """
    if version == "TLSv1":
        return "TLS 1.0"
    return version.replace("TLSv", "TLS ") if version.startswith("TLSv") else version


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
    if X509_CA_MD_TOO_WEAK in codes:
        return "certificate-weak", "weak-signature"
    if X509_EE_KEY_TOO_SMALL in codes or X509_CA_KEY_TOO_SMALL in codes:
        return "certificate-weak", "key-too-small"
    return "certificate-untrusted", f"verify-error-{codes[0]}"


_PLAINTEXT = ("wrong version number", "http request", "https proxy request",
              "unknown protocol", "packet length too long", "record layer failure")
_SERVER_TOO_OLD = ("unsupported protocol", "version too low")
_REFUSED_VERSIONS = ("alert protocol version", "protocol version", "no protocols available")
_NO_CIPHER = ("no shared cipher", "no ciphers", "no suitable", "alert handshake failure",
              "insufficient security")
_CLOSED = ("unexpected eof", "eof while reading", "connection reset")


def classify_handshake_error(reason: Failure | None) -> tuple[str, str]:
    """
    The class and C{detail} of a handshake that died: a plain-text answer,
    no common version or cipher, closed, timed out, or (C{handshake-failed})
    OpenSSL's own words.
    """
    if reason is None:
        return "handshake-closed", "closed"
    value = reason.value
    from OpenSSL import SSL
    if isinstance(value, SSL.Error):
        texts = " ".join(str(r[2]) for r in (value.args[0] if value.args and
                                             isinstance(value.args[0], list) else [])
                         if len(r) > 2).lower() or str(value).lower()
        if any(w in texts for w in _PLAINTEXT):
            return "handshake-plaintext", "plaintext"
        if any(w in texts for w in _SERVER_TOO_OLD):
            return "handshake-no-common-version", "server-too-old"
        if any(w in texts for w in _REFUSED_VERSIONS):
            return "handshake-no-common-version", "versions-refused"
        if any(w in texts for w in _NO_CIPHER):
            return "handshake-no-common-cipher", "no-common-cipher"
        if any(w in texts for w in _CLOSED):
            return "handshake-closed", "closed"
        return "handshake-failed", texts or "tls-error"
    if isinstance(value, (error.ConnectionLost, error.ConnectionDone)):
        return "handshake-closed", "closed"
    if isinstance(value, error.TimeoutError):
        return "handshake-timeout", "timeout"
    return "handshake-failed", str(value) or type(value).__name__
