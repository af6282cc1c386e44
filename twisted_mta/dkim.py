"""
DKIM signing (RFC 6376, RFC 8463 for Ed25519) with dkimpy: the keys of
the C{[dkim]} table, read and checked once at start-up (a key that cannot
be used is a configuration error, not a report that silently goes out
unsigned), and L{Signer.sign}, which prepends a C{DKIM-Signature} header.

TLS reports sent by mail must carry a valid signature without C{l=}
(RFC 8460 §3); the integrations issue reuses the same table to sign all
outbound mail.
"""

from __future__ import annotations

import base64

import attrs

from twisted_mta.config import Config, DKIMKey, DKIMSettings

MIN_RSA_BITS = 1024  # RFC 8301 §3.2: verifiers must reject less


class DKIMKeyError(Exception):
    """
    A key of C{[dkim]} cannot be used; C{str()} is one line naming the file
    and the key.
    """


@attrs.frozen
class SigningKey:
    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    private: bytes = attrs.field(repr=False)  # in the form dkimpy signs with
    public: str  # the p= of the DNS record (base64)

    def dns_record(self, service: str | None = None) -> str:
        """
        The TXT record to publish at C{<selector>._domainkey.<domain>};
        C{service} "tlsrpt" restricts the key to TLS reports (s=tlsrpt).
        """
        kind = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        service_tag = f" s={service};" if service else ""
        return f"v=DKIM1; k={kind};{service_tag} p={self.public}"

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def load_key(domain: str, key: DKIMKey) -> SigningKey:
    """
    Read C{key.key_file} for C{key.algorithm}; raise L{DKIMKeyError} (the
    reason, without the key's name) when it cannot be used.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    try:
        with open(key.key_file, "rb") as f:
            data = f.read(1024 * 1024)
    except OSError as e:
        raise DKIMKeyError(f"cannot be read: {e.strerror or e}")
    private = None
    if b"-----BEGIN" in data:
        try:
            private = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise DKIMKeyError(f"not a usable PEM private key ({str(e).splitlines()[0]})")
    elif key.algorithm == "ed25519-sha256":
        try:  # dkimpy's own form: the 32-octet seed in base64
            seed = base64.b64decode(data.strip(), validate=True)
            private = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        except ValueError:
            raise DKIMKeyError("not a PEM private key nor a base64 Ed25519 seed")
    else:
        raise DKIMKeyError("not a PEM private key")
    public_der: bytes
    if key.algorithm == "rsa-sha256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise DKIMKeyError("is not an RSA key (algorithm rsa-sha256)")
        if private.key_size < MIN_RSA_BITS:
            raise DKIMKeyError(f"RSA key of {private.key_size} bits: at least "
                               f"{MIN_RSA_BITS} are needed (RFC 8301)")
        signing = private.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.TraditionalOpenSSL,
                                        serialization.NoEncryption())
        public_der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    else:
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise DKIMKeyError("is not an Ed25519 key (algorithm ed25519-sha256)")
        signing = base64.b64encode(private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))
        public_der = private.public_key().public_bytes(  # RFC 8463: the raw 32 octets
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        try:  # dkimpy signs Ed25519 with PyNaCl
            import importlib
            importlib.import_module("nacl.signing")
        except ImportError:
            raise DKIMKeyError("ed25519-sha256 needs PyNaCl (pip install pynacl)")
    return SigningKey(domain=domain, selector=key.selector, algorithm=key.algorithm,
                      private=signing, public=base64.b64encode(public_der).decode("ascii"))


class Signer:
    """
    Signs messages for the domains C{[dkim]} has keys for.
    """

    def __init__(self, keys: dict[str, SigningKey], headers: tuple[str, ...]) -> None:
        self.keys = keys
        self.headers = headers

    @classmethod
    def from_config(cls, config: Config) -> Signer:
        """
        Every key of C{[dkim]} read and checked; L{DKIMKeyError} names the
        file, the key and the reason in one line.
        """
        return cls.from_settings(config.dkim, config.path)

    @classmethod
    def from_settings(cls, settings: DKIMSettings, path: str = "") -> Signer:
        keys = {}
        for domain, key in settings.domains:
            try:
                keys[domain.lower()] = load_key(domain.lower(), key)
            except DKIMKeyError as e:
                prefix = f"{path}: " if path else ""
                raise DKIMKeyError(f"{prefix}dkim.domains.{domain}.key_file: {key.key_file}: "
                                   f"{e}") from None
        return cls(keys, tuple(h.lower() for h in settings.headers))

    def can_sign(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.keys

    def sign(self, message: bytes, domain: str, tlsrpt: bool = False) -> bytes:
        """
        C{message} (CRLF line ends) with a C{DKIM-Signature} by C{domain}'s
        key prepended: relaxed/simple, the configured headers that the
        message has, never C{l=}.  C{KeyError} when there is no key.
        """
        import dkim

        key = self.keys[domain.lower().rstrip(".")]
        end = message.find(b"\r\n\r\n")
        head = message if end < 0 else message[:end + 2]
        present = {line.split(b":", 1)[0].strip().lower().decode("ascii", "replace")
                   for line in head.split(b"\r\n") if line and line[:1] not in b" \t"}
        include = [h for h in self.headers if h in present]
        signature = dkim.sign(
            message, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
            signature_algorithm=key.algorithm.encode("ascii"),
            include_headers=[h.encode("ascii") for h in include],
            canonicalize=(b"relaxed", b"simple"), length=False, linesep=b"\r\n",
            tlsrpt=tlsrpt)
        return signature + message
