"""
Fixtures for the outbound TLS interop matrix (L{tests.interop.test_tls_matrix}):
a catalogue of TLS peers, each on its own loopback address with a
certificate made at test time, served by one private Postfix (one smtpd
service per peer in master.cf, with C{-o} overrides) plus small scripted
SMTP servers (L{ScriptedPeer}), one per behaviour Postfix cannot play
after its C{220} to STARTTLS: dropping the connection, answering the TLS
ClientHello in plain text, and never answering it.

Blocking and reactor-free like the rest of C{tests.interop}.

What each peer does is described by its L{Peer} attributes; the matrix
test computes its expectations from those attributes (and the policies'
documented rules), never from observed output.
"""

from __future__ import annotations

import datetime
import grp
import os
import pwd
import shutil
import socket
import socketserver
import threading
import time
import warnings
from typing import Iterable

import attrs
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.interop.dns import zone
from tests.interop.support import PostfixInstance

# -- the peers --------------------------------------------------------------------

ZONE_ORIGIN = "test"
RELAY_HOST = "relay.tls.test"
RELAY_ADDRESS = "127.0.0.9"


@attrs.frozen
class Peer:
    """
    One server we deliver to.

    C{starttls}: C{"offered"} (STARTTLS advertised and working),
    C{"absent"} (not advertised), C{"refused"} (advertised, answered with
    454), C{"dropped"} (advertised, the connection is closed after the
    220), C{"plaintext"} (advertised, 220, then the TLS ClientHello is
    answered in plain text, C{500 5.5.2}, and the session goes on in
    plain SMTP), C{"hang"} (advertised, 220, then the handshake is never
    answered: the server reads and discards until the client closes, or
    for a minute), C{"implicit"} (TLS from the first byte; reached through
    an C{[outbound.routes]} smarthost entry with C{tls = "implicit"}).
    The dropped, plaintext and hang peers are scripted servers
    (C{scripted}); they accept mail in cleartext on a new connection.

    C{cert}: what is wrong with its certificate, if anything:
    C{"valid"}, C{"expired"}, C{"not-yet-valid"}, C{"self-signed"},
    C{"unknown-ca"} (its issuer, an untrusted root, is sent with it),
    C{"unknown-issuer"} (signed by an unknown CA, the leaf alone is sent),
    C{"wrong-name"}, C{"weak"} (from the trusted CA and for the right
    name, but an RSA-1024 key and a SHA-1 signature: below OpenSSL's
    default security level, so only C{strict}, which checks certificates,
    fails on it).

    C{max_version}: the newest TLS version it speaks (the TLS 1.0 peer
    speaks nothing else).
    C{legacy_cipher_only}: it accepts only a cipher outside OpenSSL's
    default list (so only C{opportunistic}'s C{ALL:@SECLEVEL=0} has it).
    """

    name: str  # the label: mail for <cell>.<name>.test goes to it
    address: str
    what: str  # one line for people
    starttls: str = "offered"
    cert: str = "valid"
    max_version: str = "TLSv1.3"
    legacy_cipher_only: bool = False
    scripted: bool = False  # the scripted server, not Postfix

    @property
    def domain(self) -> str:
        return f"{self.name}.{ZONE_ORIGIN}"

    @property
    def mx_host(self) -> str:
        return f"mx.{self.domain}"

    @property
    def implicit(self) -> bool:
        return self.starttls == "implicit"

    @property
    def scripted_mode(self) -> str:
        """
        The L{ScriptedPeer} mode that plays this peer (scripted peers only).
        """
        return {"dropped": "drop", "refused": "refuse"}.get(self.starttls, self.starttls)

    def smarthost_for(self, domain: str) -> str:
        """
        The smarthost name used for C{domain} (implicit-TLS peers only):
        the recipient domain itself, so every matrix cell is its own next
        hop (its own TLS policy), and a wildcard certificate names it.
        """
        return domain


PEERS = (
    Peer("valid", "127.0.0.10", "STARTTLS, TLS 1.2-1.3, certificate from the trusted CA"),
    Peer("expired", "127.0.0.11", "certificate expired 30 days ago", cert="expired"),
    Peer("notyetvalid", "127.0.0.12", "certificate valid from 30 days from now",
         cert="not-yet-valid"),
    Peer("selfsigned", "127.0.0.13", "self-signed certificate", cert="self-signed"),
    Peer("unknownca", "127.0.0.14", "certificate from an unknown CA, that CA's root sent too",
         cert="unknown-ca"),
    Peer("unknownissuer", "127.0.0.15", "certificate from an unknown CA, the leaf alone sent",
         cert="unknown-issuer"),
    Peer("wrongname", "127.0.0.16", "certificate (trusted CA) for another name",
         cert="wrong-name"),
    Peer("weakkey", "127.0.0.24", "certificate from the trusted CA with an RSA-1024 key and "
         "a SHA-1 signature (Postfix, @SECLEVEL=0)", cert="weak"),
    Peer("nostarttls", "127.0.0.17", "no STARTTLS (Postfix smtpd_tls_security_level = none)",
         starttls="absent"),
    Peer("refuse454", "127.0.0.18", "STARTTLS answered 454 4.7.0 (Postfix with a key that "
         "does not match its certificate)", starttls="refused"),
    Peer("tls10", "127.0.0.19", "TLS 1.0 only (Postfix, @SECLEVEL=0)", max_version="TLSv1.0"),
    Peer("nocipher", "127.0.0.20", "TLS 1.2 only, one cipher outside OpenSSL's default list",
         max_version="TLSv1.2", legacy_cipher_only=True),
    Peer("drop", "127.0.0.21", "closes the connection after its 220 to STARTTLS "
         "(scripted server)", starttls="dropped", scripted=True),
    Peer("plaintext", "127.0.0.25", "answers the TLS ClientHello after its 220 to STARTTLS "
         "in plain text (`500 5.5.2`) and goes on in plain SMTP (scripted server)",
         starttls="plaintext", scripted=True),
    Peer("hang", "127.0.0.26", "never answers the TLS ClientHello after its 220 to STARTTLS "
         "(scripted server)", starttls="hang", scripted=True),
    Peer("implicit-good", "127.0.0.22", "implicit TLS (smtpd_tls_wrappermode), certificate "
         "from the trusted CA", starttls="implicit"),
    Peer("implicit-bad", "127.0.0.23", "implicit TLS (smtpd_tls_wrappermode), self-signed "
         "certificate", starttls="implicit", cert="self-signed"),
)

ADDRESSES = (RELAY_ADDRESS,) + tuple(p.address for p in PEERS)


def free_port_on_all(addresses=ADDRESSES) -> int:
    """
    A TCP port free a moment ago on every one of C{addresses} (and on
    127.0.0.1).
    """
    for _ in range(100):
        socks = []
        try:
            first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(first)
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            for address in addresses:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((address, port))
            return port
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise AssertionError(f"no port free on all of {addresses}")


def matrix_zone(peers=PEERS, extra=(), serial: int = 1) -> dict[str, str]:
    """
    One zone, C{test.}: for each STARTTLS peer a wildcard MX
    (C{*.<peer>.test MX 10 mx.<peer>.test.}) and the MX host's address;
    for each implicit-TLS peer a wildcard address (its smarthost names);
    and the secure relay.  C{extra} records (C{(name, type, rdata)}) are
    added as they are; C{serial} is the SOA serial (bump it when the zone
    is written again for a reload).
    """
    records = [(f"{RELAY_HOST}.", "A", RELAY_ADDRESS)]
    for p in peers:
        if p.implicit:
            records.append((f"*.{p.domain}.", "A", p.address))
        else:
            records.append((f"*.{p.domain}.", "MX", f"10 {p.mx_host}."))
            records.append((f"{p.mx_host}.", "A", p.address))
    records.extend(extra)
    return {ZONE_ORIGIN: zone(ZONE_ORIGIN, records, serial=serial)}


# -- certificates -----------------------------------------------------------------


@attrs.frozen
class CertFiles:
    cert: str  # PEM: leaf first, then whatever chain the peer sends
    key: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    names: tuple[str, ...]


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)


def write_pem(directory: str, stem: str, chain: list[bytes], key: bytes) -> tuple[str, str]:
    """
    C{<stem>.crt} (the PEM blocks of C{chain}, leaf first) and C{<stem>.key}
    (mode 0600) in C{directory}: their paths.
    """
    cert_path = os.path.join(directory, f"{stem}.crt")
    key_path = os.path.join(directory, f"{stem}.key")
    with open(cert_path, "wb") as f:
        f.write(b"".join(chain))
    with open(key_path, "wb") as f:
        f.write(key)
    os.chmod(key_path, 0o600)  # smtpd reads it as root before dropping privileges
    return cert_path, key_path


def self_signed(names: tuple[str, ...], not_before: datetime.datetime,
                not_after: datetime.datetime) -> tuple[bytes, bytes]:
    """
    A self-signed leaf (not a CA) for C{names}: PEM certificate and key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tls-matrix self-signed")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()))


def weak_leaf(ca: trustme.CA, names: tuple[str, ...], not_before: datetime.datetime,
              not_after: datetime.datetime) -> tuple[bytes, bytes]:
    """
    A leaf for C{names} issued by C{ca} (so its chain is trusted) with what
    OpenSSL's default security level refuses: an RSA-1024 key and a SHA-1
    signature.  PEM certificate and key.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0]),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME,
                                                    "tls-matrix weak key")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            ca_cert.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    # cryptography no longer signs with SHA-1 ("not supported for
    # signatures"); pyOpenSSL's X509.sign (deprecated, still there) signs
    # the same certificate again with it, algorithm identifiers included.
    from OpenSSL import crypto
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        legacy = crypto.X509.from_cryptography(cert)
        legacy.sign(crypto.PKey.from_cryptography_key(ca_key), "sha1")
        cert = legacy.to_cryptography()
    if not isinstance(cert.signature_hash_algorithm, hashes.SHA1):
        raise AssertionError(f"the weak certificate is signed with "
                             f"{cert.signature_algorithm_oid}, not SHA-1")
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM,
                              serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()))


def make_certificates(directory: str, trusted: trustme.CA, peers=PEERS) -> dict[str, CertFiles]:
    """
    Write a certificate and key for every Postfix peer (by name) and for
    the relay (C{"relay"}) into C{directory}; C{trusted} is the CA our MTA
    trusts.  A peer whose STARTTLS is refused also gets a key that does
    not match its certificate (C{"refuse454"} uses it).
    """
    now = _now()
    day = datetime.timedelta(days=1)
    usual = (now - day, now + 30 * day)
    out: dict[str, CertFiles] = {}

    def issue(stem: str, ca: trustme.CA, names: tuple[str, ...], dates=usual,
              extra_chain: list[bytes] = ()) -> None:
        leaf = ca.issue_cert(*names, not_before=dates[0], not_after=dates[1])
        chain = [b.bytes() for b in leaf.cert_chain_pems] + list(extra_chain)
        cert, key = write_pem(directory, stem, chain, leaf.private_key_pem.bytes())
        out[stem] = CertFiles(cert, key, dates[0], dates[1], names)

    issue("relay", trusted, (RELAY_HOST,))
    for p in peers:
        if p.scripted:
            continue
        names = (f"*.{p.domain}", p.mx_host) if p.implicit else (p.mx_host,)
        if p.cert == "valid":
            issue(p.name, trusted, names)
        elif p.cert == "expired":
            issue(p.name, trusted, names, (now - 60 * day, now - 30 * day))
        elif p.cert == "not-yet-valid":
            issue(p.name, trusted, names, (now + 30 * day, now + 60 * day))
        elif p.cert == "wrong-name":
            issue(p.name, trusted, (f"mx.other-name.{ZONE_ORIGIN}",))
        elif p.cert == "unknown-ca":
            unknown = trustme.CA(organization_name="tls-matrix unknown CA")
            issue(p.name, unknown, names, extra_chain=[unknown.cert_pem.bytes()])
        elif p.cert == "unknown-issuer":
            issue(p.name, trustme.CA(organization_name="tls-matrix unknown CA"), names)
        elif p.cert == "self-signed":
            cert_pem, key_pem = self_signed(names, *usual)
            cert, key = write_pem(directory, p.name, [cert_pem], key_pem)
            out[p.name] = CertFiles(cert, key, usual[0], usual[1], names)
        elif p.cert == "weak":
            cert_pem, key_pem = weak_leaf(trusted, names, *usual)
            cert, key = write_pem(directory, p.name, [cert_pem], key_pem)
            out[p.name] = CertFiles(cert, key, usual[0], usual[1], names)
        else:
            raise ValueError(f"unknown certificate kind {p.cert!r}")
        if p.starttls == "refused":
            # A key of another certificate: smtpd logs "key values mismatch",
            # disables TLS, still advertises STARTTLS and answers 454.
            stray = trusted.issue_cert("stray.invalid")
            _, key = write_pem(directory, p.name + "-stray", [b""], stray.private_key_pem.bytes())
            out[p.name] = attrs.evolve(out[p.name], key=key)
    return out


def legacy_cipher() -> str:
    """
    A TLS 1.2 ECDSA cipher that C{ALL:@SECLEVEL=0} (opportunistic) offers
    but OpenSSL's default client list (relaxed and strict) does not.
    """
    from OpenSSL import SSL
    default = set(SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None).get_cipher_list())
    legacy = SSL.Context(SSL.TLS_CLIENT_METHOD)
    legacy.set_cipher_list(b"ALL:@SECLEVEL=0")
    offered = set(SSL.Connection(legacy, None).get_cipher_list())
    for name in ("ECDHE-ECDSA-CAMELLIA256-SHA384", "ECDHE-ECDSA-ARIA256-GCM-SHA384",
                 "ECDHE-ECDSA-AES256-CCM", "ECDHE-ECDSA-CAMELLIA128-SHA256"):
        if name in offered and name not in default:
            return name
    raise AssertionError("no cipher offered by ALL:@SECLEVEL=0 but missing from OpenSSL's "
                         "default list; cannot build the no-common-cipher peer")


# -- the Postfix that plays every Postfix peer ----------------------------------------


def virtual_delivery(base: str, recipients: Iterable[str]) -> tuple[str, dict[str, str]]:
    """
    What a Postfix playing peers needs to store mail for C{recipients}
    with virtual(8): C{<base>} (made, mode 0755), C{<base>/vmail} (the
    postfix user's) and C{<base>/maps/mailboxes}, which puts each address
    in C{<vmail>/<domain>/<local part>/} (a Maildir).  Returns the vmail
    directory and the main.cf parameters (the caller adds
    C{virtual_mailbox_domains}).
    """
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    vmail = os.path.join(base, "vmail")
    os.makedirs(vmail)
    shutil.chown(vmail, "postfix", "postfix")
    maps = os.path.join(base, "maps")
    os.makedirs(maps)
    mailbox_map = os.path.join(maps, "mailboxes")
    with open(mailbox_map, "w") as f:  # virtual(8) allows no regexp substitution here
        for address in recipients:
            local, _, domain = address.lower().partition("@")
            f.write(f"{address.lower()} {domain}/{local}/\n")
    uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
    return vmail, {
        "virtual_mailbox_base": vmail,
        "virtual_mailbox_maps": f"texthash:{mailbox_map}",
        "virtual_uid_maps": f"static:{uid}",
        "virtual_gid_maps": f"static:{gid}",
        "virtual_transport": "virtual",
    }


class MatrixPostfix(PostfixInstance):
    """
    One private Postfix: the relay (relay.tls.test) on the main smtpd
    service, and one more smtpd service per peer on the peer's own
    address, each with its host name and TLS settings as C{-o} overrides.
    A message for one of C{recipients} is stored by virtual(8) in
    C{<vmail>/<recipient domain>/<local part>/} (a Maildir), whichever
    service accepted it.
    """

    hostname = RELAY_HOST

    def __init__(self, base: str, port: int, certs: dict[str, CertFiles],
                 recipients: list[str], peers=PEERS) -> None:
        self.vmail, delivery = virtual_delivery(base, recipients)
        domains_map = os.path.join(base, "maps", "domains.re")
        with open(domains_map, "w") as f:
            f.write(f"/\\.{ZONE_ORIGIN}$/ OK\n")
        self.cipher = legacy_cipher()
        relay = certs["relay"]
        main = {
            "virtual_mailbox_domains": f"regexp:{domains_map}",
            **delivery,
            "smtpd_recipient_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": relay.cert,
            "smtpd_tls_key_file": relay.key,
            "smtpd_tls_loglevel": "1",
            "smtpd_tls_received_header": "yes",
            "smtpd_tls_ciphers": "medium",
            # Hundreds of messages arrive at once: no flow-control pauses.
            "in_flow_delay": "0",
            # The broken-TLS peer would mail the postmaster about it.
            "notify_classes": "",
            # Used by the -o overrides below (master.cf values have no spaces).
            "matrix_tls10_protocols": ">=TLSv1, <=TLSv1",
            "matrix_tls12_protocols": ">=TLSv1.2, <=TLSv1.2",
        }
        super().__init__(base, None, main, smtpd_port=port, listen=RELAY_ADDRESS)
        lines = []
        for p in peers:
            if p.scripted:
                continue
            c = certs[p.name]
            opts = [f"myhostname={p.mx_host}", f"smtpd_tls_cert_file={c.cert}",
                    f"smtpd_tls_key_file={c.key}"]
            if p.starttls == "absent":
                opts.append("smtpd_tls_security_level=none")
            if p.implicit:
                opts.append("smtpd_tls_wrappermode=yes")
            if p.max_version == "TLSv1.0":
                opts += ["smtpd_tls_protocols=$matrix_tls10_protocols",
                         "tls_medium_cipherlist=HIGH:MEDIUM:!aNULL:@SECLEVEL=0"]
            if p.cert == "weak":
                # OpenSSL's default security level (2 on Debian) refuses to
                # load an RSA-1024 key or a SHA-1-signed certificate.
                opts.append("tls_medium_cipherlist=HIGH:MEDIUM:!aNULL:@SECLEVEL=0")
            if p.legacy_cipher_only:
                opts += ["smtpd_tls_protocols=$matrix_tls12_protocols",
                         f"tls_medium_cipherlist={self.cipher}"]
            lines.append(f"{p.address}:{port} inet n - n - - smtpd "
                         + " ".join(f"-o {o}" for o in opts))
        with open(os.path.join(self.conf, "master.cf"), "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def maildir(self, address: str) -> str:
        local, _, domain = address.partition("@")
        return os.path.join(self.vmail, domain.lower(), local.lower())


# -- the scripted peer ----------------------------------------------------------------


@attrs.define
class ScriptedMessage:
    recipients: list[str]
    data: bytes
    tls: bool = False  # the session was encrypted (mode "tls")


class ScriptedPeer:
    """
    A tiny SMTP server on C{address}:C{port} that advertises STARTTLS and
    otherwise accepts mail in cleartext, keeping it in L{messages}.  What
    it does with STARTTLS is its C{mode}:

      - C{"drop"}: answers C{220} and closes the connection at once;
      - C{"refuse"}: answers C{454} (the session goes on);
      - C{"plaintext"}: answers C{220}, reads the TLS ClientHello (one TLS
        record, or whatever arrives) and answers it in plain text
        (C{500 5.5.2 Error: command not recognized}), as a server whose
        TLS layer is missing would; the session goes on in plain SMTP;
      - C{"hang"}: answers C{220}, then reads and discards whatever comes,
        answering nothing, until the client closes or C{hang_for} seconds
        have passed;
      - C{"tls"}: a real STARTTLS with C{tls_context} (an C{ssl.SSLContext}
        holding the server's certificate); the session goes on encrypted
        and its messages say so;
      - C{"no-starttls"}: does not advertise STARTTLS at all.

    Serves each connection in a thread; L{stop} ends it.
    """

    MODES = ("drop", "refuse", "plaintext", "hang", "tls", "no-starttls")

    def __init__(self, address: str, port: int, hostname: str, refuse: bool = False,
                 mode: str = "drop", hang_for: float = 60.0, tls_context=None) -> None:
        if refuse:
            mode = "refuse"
        if mode not in self.MODES:
            raise ValueError(f"unknown scripted mode {mode!r}")
        self.hostname = hostname
        self.mode = mode
        self.hang_for = hang_for
        if (mode == "tls") != (tls_context is not None):
            raise ValueError("mode tls goes with a tls_context, and only it")
        self.tls_context = tls_context
        self.messages: list[ScriptedMessage] = []
        self.starttls_seen = 0
        self.hellos: list[bytes] = []  # what the plaintext mode read after its 220
        self.lock = threading.Lock()
        peer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def handle(self) -> None:
                peer._session(self.rfile, self.wfile, self.request)

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True
            request_queue_size = 64  # every cell of a column connects at once

        self.server = Server((address, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name=f"scripted SMTP {hostname}")
        self.thread.start()

    @staticmethod
    def _read_hello(rfile) -> bytes:
        """
        The client's first TLS record (a ClientHello: type 22, a 5-byte
        header with its length), read whole; or, when what comes is not a
        TLS record, whatever one read returns.
        """
        head = rfile.read1(5)
        if len(head) < 5 or head[0] != 0x16:
            return head
        while len(head) < 5:
            more = rfile.read1(5 - len(head))
            if not more:
                return head
            head += more
        body = b""
        length = int.from_bytes(head[3:5], "big")
        while len(body) < length:
            more = rfile.read1(length - len(body))
            if not more:
                break
            body += more
        return head + body

    def _hang(self, sock) -> None:
        deadline = time.monotonic() + self.hang_for
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            sock.settimeout(left)
            try:
                if not sock.recv(65536):
                    return
            except (TimeoutError, socket.timeout):
                return

    def _session(self, rfile, wfile, sock) -> None:
        def reply(text: str) -> None:
            wfile.write(text.encode("ascii") + b"\r\n")
            wfile.flush()
        try:
            reply(f"220 {self.hostname} ESMTP scripted")
            sender, rcpts, encrypted = None, [], False
            while True:
                line = rfile.readline(2048)
                if not line:
                    return
                verb = line.strip().split(b" ", 1)[0].upper()
                if verb in (b"EHLO", b"HELO"):
                    if verb == b"EHLO" and (self.mode == "no-starttls" or encrypted):
                        reply(f"250-{self.hostname}\r\n250-PIPELINING\r\n250 8BITMIME")
                    elif verb == b"EHLO":
                        reply(f"250-{self.hostname}\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                              "250 STARTTLS")
                    else:
                        reply(f"250 {self.hostname}")
                elif verb == b"STARTTLS":
                    with self.lock:
                        self.starttls_seen += 1
                    if self.mode == "refuse":
                        reply("454 4.7.0 TLS not available (scripted)")
                        continue
                    reply("220 2.0.0 Ready to start TLS")
                    if self.mode == "drop":
                        sock.shutdown(socket.SHUT_RDWR)
                        return
                    if self.mode == "hang":
                        self._hang(sock)
                        return
                    if self.mode == "tls":
                        try:
                            sock = self.tls_context.wrap_socket(sock, server_side=True)
                        except (OSError, ValueError):
                            return  # the client refused our certificate
                        rfile, wfile = sock.makefile("rb"), sock.makefile("wb")
                        sender, rcpts, encrypted = None, [], True
                        continue
                    hello = self._read_hello(rfile)  # plaintext
                    if not hello:
                        return
                    with self.lock:
                        self.hellos.append(hello)
                    reply("500 5.5.2 Error: command not recognized")
                elif verb == b"MAIL":
                    sender, rcpts = line, []
                    reply("250 2.1.0 Ok")
                elif verb == b"RCPT":
                    addr = line.split(b"<", 1)[1].split(b">", 1)[0].decode("ascii", "replace")
                    rcpts.append(addr)
                    reply("250 2.1.5 Ok")
                elif verb == b"DATA":
                    if sender is None or not rcpts:
                        reply("503 5.5.1 Error: need RCPT command")
                        continue
                    reply("354 End data with <CR><LF>.<CR><LF>")
                    chunks = []
                    while True:
                        data = rfile.readline(65536)
                        if not data:
                            return
                        if data == b".\r\n":
                            break
                        chunks.append(data[1:] if data.startswith(b"..") else data)
                    with self.lock:
                        self.messages.append(ScriptedMessage(list(rcpts), b"".join(chunks),
                                                             tls=encrypted))
                    sender, rcpts = None, []
                    reply("250 2.0.0 Ok: queued")
                elif verb == b"RSET":
                    sender, rcpts = None, []
                    reply("250 2.0.0 Ok")
                elif verb == b"NOOP":
                    reply("250 2.0.0 Ok")
                elif verb == b"QUIT":
                    reply("221 2.0.0 Bye")
                    return
                else:
                    reply("502 5.5.2 Error: command not recognized")
        except OSError:
            return

    def received_for(self, address: str) -> list[ScriptedMessage]:
        with self.lock:
            return [m for m in self.messages if address.lower() in
                    (r.lower() for r in m.recipients)]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
