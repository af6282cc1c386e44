"""
DKIM signing (RFC 6376, RFC 8463 for Ed25519) with dkimpy: the keys of
the C{[dkim]} table, read and checked once at start-up (a key that cannot
be used is a configuration error, not a report that silently goes out
unsigned), and L{Signer.sign}, which prepends a C{DKIM-Signature} header.

TLS reports sent by mail must carry a valid signature without C{l=}
(RFC 8460 §3).  The same keys sign the mail that is ours (C{[dkim] sign}:
from authenticated clients, from the trusted networks, from the sendmail
command, our DSNs), once, when it is received: L{sign_source} says whether
a session's mail is ours, L{sign_queued} signs a message being written to
the spool before its commit (so the queued file is the signed message),
L{Signer.sign_local} one that is in memory.  The signing domain is the
From header's (L{from_domain}); mail merely relayed in from the Internet
is never signed.
"""

from __future__ import annotations

import base64
import email.utils
import importlib
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta.address import AddressError, a_label
from twisted_mta.config import DKIM_SOURCES, Config, DKIMKey, DKIMSettings
from twisted_mta.model import Envelope

log = Logger()

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


@attrs.frozen
class Signed:
    """
    What L{Signer.sign_outbound} did: C{field} is the C{DKIM-Signature}
    header field to put on top of the message (empty when not signed, and
    C{reason} says why).
    """

    field: bytes = b""
    domain: str | None = None  # d=
    selector: str | None = None
    algorithm: str | None = None
    from_domain: str | None = None
    reason: str = ""
    # The message as signed when it was converted to 7 bit first (else None).
    message: bytes | None = attrs.field(default=None, repr=False)
    eight_bit: str = ""  # what became of 8-bit content: "converted", or why not

    def apply(self, message: bytes) -> bytes | None:
        """
        The message to queue: signed (and converted) when it was; None
        when nothing changed.
        """
        if not self.field:
            return None
        return self.field + (self.message if self.message is not None else message)


def seven_bit(message: bytes) -> tuple[bytes | None, str]:
    """
    RFC 6376 5.3: a signer SHOULD convert 8-bit content to 7 bit first, so
    that a relay without 8BITMIME on the way need not break the signature
    by converting it then.  The converted message (None: as it is) and
    what was done ("" for a 7-bit message).  A header with 8-bit octets
    (SMTPUTF8 mail, RFC 6532) is left as it is, and so is a message the
    conversion refuses (already signed, S/MIME, malformed MIME).
    """
    from twisted_mta.downgrade import DowngradeRefused, downgrade

    if message.isascii():
        return None, ""
    if not header_block(message).isascii():
        return None, "not converted: 8-bit header fields (SMTPUTF8)"
    try:
        return downgrade(message), "converted"
    except DowngradeRefused as e:
        return None, f"not converted: {e.words}"
    except Exception as e:  # a bug in the converter must not cost the signature
        return None, f"not converted: the conversion failed ({type(e).__name__}: {e})"[:300]


def sign_source(authenticated: bool, trusted: bool) -> str | None:
    """
    Which C{[dkim] sign} source a session's mail comes from: an
    authenticated client, or one the relay rules trust (C{[relay]
    trusted_networks}); None for anyone else (mail from the Internet,
    never ours to sign).
    """
    if authenticated:
        return "authenticated"
    if trusted:
        return "trusted-networks"
    return None


def header_block(message: bytes) -> bytes:
    """
    The header of C{message} (CRLF line ends), up to its empty line.
    """
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end + 2]


def header_fields(head: bytes) -> list[tuple[str, bytes]]:
    """
    The fields of a header block as (lower-case name, unfolded value).
    """
    fields: list[tuple[str, bytes]] = []
    for line in head.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in b" \t":
            if fields:
                fields[-1] = (fields[-1][0], fields[-1][1] + line)
            continue
        name, colon, value = line.partition(b":")
        if colon:
            fields.append((name.strip().lower().decode("ascii", "replace"), value))
    return fields


def without_signatures(message: bytes) -> bytes:
    """
    C{message} without its DKIM-Signature header fields: for a message of
    ours changed after it was signed (a DSN redacted), to be signed again.
    """
    head = header_block(message)
    kept, dropping = [], False
    for line in head.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == b"dkim-signature"
        if not dropping:
            kept.append(line)
    return b"".join(line + b"\r\n" for line in kept) + message[len(head):]


def from_domain(head: bytes) -> tuple[str | None, str]:
    """
    The domain of the From header field (lower case, in ASCII form), or
    None and why there is none to sign for: no From field, more than one,
    no address in it, or addresses in more than one domain.
    """
    values = [v for name, v in header_fields(head) if name == "from"]
    if not values:
        return None, "no From header field"
    if len(values) > 1:
        return None, "more than one From header field"
    text = values[0].decode("utf-8", "replace")
    domains = {address.rpartition("@")[2].strip().rstrip(".").lower()
               for _, address in email.utils.getaddresses([text]) if "@" in address}
    domains.discard("")
    if not domains:
        return None, "no address in the From header field"
    if len(domains) > 1:
        return None, "From addresses in more than one domain"
    domain = domains.pop()
    try:
        domain = a_label(domain)  # IDNA2008, as routing and the key table use
    except AddressError:
        return None, f"From domain {domain!r} is not a valid domain name"
    return domain, ""


class Signer:
    """
    Signs messages for the domains C{[dkim]} has keys for.
    """

    def __init__(self, keys: dict[str, SigningKey], headers: tuple[str, ...],
                 sources: tuple[str, ...] = DKIM_SOURCES, subdomains: bool = False) -> None:
        self.keys = keys
        self.headers = headers
        self.sources = sources  # [dkim] sign: whose mail is ours to sign
        self.subdomains = subdomains

    @classmethod
    def from_config(cls, config: Config) -> Signer:
        """
        Every key of C{[dkim]} read and checked; L{DKIMKeyError} names the
        file, the key and the reason in one line.
        """
        return cls.from_settings(config.dkim, config.path)

    @classmethod
    def from_settings(cls, settings: DKIMSettings, path: str = "") -> Signer:
        if settings.domains:
            # Now, at start-up: after twistd's --uid switch the MTA's user
            # may not be allowed to read the interpreter's site-packages
            # (a virtualenv under /root), and the first signature would
            # fail with "No module named 'dkim'".
            importlib.import_module("dkim")
        keys = {}
        for domain, key in settings.domains:
            try:
                keys[domain.lower()] = load_key(domain.lower(), key)
            except DKIMKeyError as e:
                prefix = f"{path}: " if path else ""
                raise DKIMKeyError(f"{prefix}dkim.domains.{domain}.key_file: {key.key_file}: "
                                   f"{e}") from None
        return cls(keys, tuple(h.lower() for h in settings.headers),
                   tuple(settings.sign), settings.subdomains)

    def can_sign(self, domain: str) -> bool:
        return domain.lower().rstrip(".") in self.keys

    def signs(self, source: str | None) -> bool:
        """
        Whether mail from C{source} (L{sign_source}, "sendmail", "dsn") is
        ours to sign, and there is a key to sign with.
        """
        return source is not None and source in self.sources and bool(self.keys)

    def key_for(self, domain: str) -> SigningKey | None:
        """
        The key that signs mail From C{domain}: its own, or with
        C{subdomains} the nearest parent domain's.
        """
        domain = domain.lower().rstrip(".")
        if domain in self.keys:
            return self.keys[domain]
        if self.subdomains:
            labels = domain.split(".")
            for i in range(1, len(labels)):
                key = self.keys.get(".".join(labels[i:]))
                if key is not None:
                    return key
        return None

    def signature(self, message: bytes, key: SigningKey, tlsrpt: bool = False) -> bytes:
        """
        The C{DKIM-Signature} header field (CRLF line ends) of C{message}
        by C{key}: relaxed/simple, the configured headers that the message
        has, never C{l=}.
        """
        import dkim

        present = {name for name, _ in header_fields(header_block(message))}
        include = [h for h in self.headers if h in present]
        return dkim.sign(
            message, key.selector.encode("ascii"), key.domain.encode("ascii"), key.private,
            signature_algorithm=key.algorithm.encode("ascii"),
            include_headers=[h.encode("ascii") for h in include],
            canonicalize=(b"relaxed", b"simple"), length=False, linesep=b"\r\n",
            tlsrpt=tlsrpt)

    def sign(self, message: bytes, domain: str, tlsrpt: bool = False) -> bytes:
        """
        C{message} (CRLF line ends) with a C{DKIM-Signature} by C{domain}'s
        own key prepended.  C{KeyError} when there is no key.
        """
        key = self.keys[domain.lower().rstrip(".")]
        return self.signature(message, key, tlsrpt) + message

    def sign_outbound(self, message: bytes) -> Signed:
        """
        The signature of a message that is ours, by the key of its From
        domain, its 8-bit content converted to 7 bit first where it can be
        (L{seven_bit}); never raises (a message dkimpy cannot parse goes
        unsigned, and L{Signed.reason} says why).  Blocking: call it in the
        I/O threads.
        """
        try:
            return self._sign_outbound(message)
        except Exception:  # a bug: the message still goes, unsigned
            log.failure("DKIM signing failed; the message goes unsigned", event="dkim.error")
            return Signed(reason="internal error (traceback in the log)")

    def _sign_outbound(self, message: bytes) -> Signed:
        domain, why = from_domain(header_block(message))
        if domain is None:
            return Signed(reason=why)
        key = self.key_for(domain)
        if key is None:
            return Signed(from_domain=domain, reason=f"no key for {domain}")
        converted, eight_bit = seven_bit(message)
        try:
            field = self.signature(converted if converted is not None else message, key)
        except Exception as e:  # dkimpy: a header it cannot parse, a bad key
            words = " ".join(str(e).split())[:200] or type(e).__name__
            return Signed(from_domain=domain, reason=f"dkimpy could not sign it: {words}")
        return Signed(field, key.domain, key.selector, key.algorithm, domain,
                      message=converted, eight_bit=eight_bit)

    def sign_local(self, message: bytes, source: str, queue_id: str = "") -> bytes:
        """
        C{message} signed when mail from C{source} ("sendmail", "dsn") is
        ours to sign and its From domain has a key; else unchanged.  Logs
        the outcome (L{log_signed}).  Blocking, like L{sign_outbound}.
        """
        if not self.signs(source):
            return message
        signed = self.sign_outbound(message)
        log_signed(signed, source, queue_id)
        changed = signed.apply(message)
        return message if changed is None else changed


def log_signed(signed: Signed, source: str, queue_id: str) -> None:
    """
    One line per message of ours: C{dkim.signed}, or C{dkim.unsigned} and why.
    """
    if signed.field:
        log.info("{queue_id}: DKIM-signed for {domain} (s={selector}, {algorithm}), mail from "
                 "{source}{note}", event="dkim.signed", queue_id=queue_id, domain=signed.domain,
                 selector=signed.selector, algorithm=signed.algorithm, source=source,
                 from_domain=signed.from_domain, eight_bit=signed.eight_bit,
                 note=f"; 8-bit content {signed.eight_bit}" if signed.eight_bit else "")
    else:
        log.info("{queue_id}: not DKIM-signed: {reason}", event="dkim.unsigned",
                 queue_id=queue_id, reason=signed.reason, source=source,
                 from_domain=signed.from_domain)


def sign_queued(signer: Signer | None, writer: Any, envelope: Envelope,
                source: str | None) -> defer.Deferred:
    """
    Sign a message being written to the spool, between its end of data
    and its commit, when it is ours (C{source}, L{Signer.signs}): the
    signature goes on top of the message in the queue file, its 8-bit
    parts converted first (C{writer.rewrite}, a
    L{twisted_mta.queue.spool.MessageWriter}).  Fires with C{envelope},
    its size changed as the message was; fails only
    when the file cannot be read or written (the writer is then dropped:
    the caller answers 451, as for a failed commit).
    """
    if signer is None or not signer.signs(source):
        return defer.succeed(envelope)
    outcome: list[Signed] = []

    def change(message: bytes) -> bytes | None:
        outcome.append(signer.sign_outbound(message))
        return outcome[0].apply(message)

    def done(delta: int) -> Envelope:
        log_signed(outcome[0], source, envelope.queue_id)
        return attrs.evolve(envelope, size=envelope.size + delta)

    def failed(failure):
        writer.abort()
        return failure

    d = writer.rewrite(change)
    d.addCallbacks(done, failed)
    return d
