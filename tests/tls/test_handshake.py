"""
The TLS classifier against real handshakes (OpenSSL in memory, no
sockets): certificates made at test time, checked by PolicyCreator and
evaluate() under strict and relaxed requirements.
"""

from __future__ import annotations

import datetime
import os

import trustme
from twisted.internet import protocol, ssl
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_mta.tls.handshake import PolicyCreator, evaluate
from twisted_mta.tls.policy import OPPORTUNISTIC, RELAXED, STRICT, Destination
from twisted_mta.tls.failure import classify_chain, classify_handshake_error

HOST = "mx.peer.test"
NOW = datetime.datetime.now(datetime.timezone.utc)


@implementer(IHandshakeListener)
class Client(protocol.Protocol):
    def __init__(self, creator):
        self.creator = creator
        self.done = False
        self.lost = None

    def handshakeCompleted(self):
        self.done = True
        self.creator.handshake_done(self.transport.getHandle())

    def connectionLost(self, reason):
        self.lost = reason


class TLSHandshakeTests(SynchronousTestCase):
    def setUp(self):
        self.ca = trustme.CA()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca_file = os.path.join(self.dir, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def server_options(self, cert: trustme.LeafCert, max_version=None):
        key = ssl.KeyPair.load(cert.private_key_pem.bytes(), 1)
        certs = [ssl.Certificate.loadPEM(b.bytes()) for b in cert.cert_chain_pems]
        kw = {}
        if max_version:
            kw["lowerMaximumSecurityTo"] = max_version
        return ssl.CertificateOptions(privateKey=key.original, certificate=certs[0].original,
                                      extraCertChain=[c.original for c in certs[1:]], **kw)

    def handshake(self, cert, policy=STRICT, **server):
        req = policy.requirements(Destination("peer.test", HOST))
        import attrs
        req = attrs.evolve(req, ca_file=self.ca_file)
        creator = PolicyCreator(req, HOST)
        client = Client(creator)
        server_factory = TLSMemoryBIOFactory(self.server_options(cert, **server), False,
                                             protocol.Factory.forProtocol(protocol.Protocol))
        client_factory = TLSMemoryBIOFactory(creator, True,
                                             protocol.Factory.forProtocol(lambda: client))
        server_proto = server_factory.buildProtocol(None)
        client_proto = client_factory.buildProtocol(None)
        pump = iosim.connect(server_proto, iosim.makeFakeServer(server_proto),
                             client_proto, iosim.makeFakeClient(client_proto))
        pump.flush()
        return client, evaluate(req, creator, HOST, "192.0.2.1", 25)

    def test_valid_certificate(self):
        client, failure = self.handshake(self.ca.issue_cert(HOST))
        self.assertTrue(client.done)
        self.assertIsNone(failure)
        self.assertTrue(client.creator.record.verified)
        self.assertIn("certificate verified", client.creator.record.describe())

    def test_expired(self):
        cert = self.ca.issue_cert(HOST, not_before=NOW - datetime.timedelta(days=90),
                                  not_after=NOW - datetime.timedelta(days=3))
        client, failure = self.handshake(cert)
        self.assertEqual((failure.kind, failure.detail), ("certificate-expired", "expired"))
        self.assertIn(f"expired on {(NOW - datetime.timedelta(days=3)).day} ",
                      failure.describe())
        self.assertEqual(failure.certificate.subject, HOST)

    def test_not_yet_valid(self):
        cert = self.ca.issue_cert(HOST, not_before=NOW + datetime.timedelta(days=3),
                                  not_after=NOW + datetime.timedelta(days=90))
        _, failure = self.handshake(cert)
        self.assertEqual(failure.kind, "certificate-not-yet-valid")

    def test_self_signed(self):
        """A certificate signed by its own key (here a CA's own certificate) is self-signed."""
        own = trustme.CA()

        class SelfSigned:
            private_key_pem = own.private_key_pem
            cert_chain_pems = [own.cert_pem]
        _, failure = self.handshake(SelfSigned)
        self.assertEqual((failure.kind, failure.detail), ("certificate-untrusted",
                                                          "self-signed"))
        self.assertIn("self-signed", failure.describe())

    def test_leaf_of_unknown_ca(self):
        """Only a leaf whose issuer we do not know: an unknown CA or a missing intermediate."""
        _, failure = self.handshake(trustme.CA().issue_cert(HOST))
        self.assertEqual((failure.kind, failure.detail), ("certificate-untrusted",
                                                          "unknown-issuer"))

    def test_unknown_ca_with_its_root_in_the_chain(self):
        other = trustme.CA()
        leaf = other.issue_cert(HOST)
        leaf_with_root = leaf
        opts = self.server_options(leaf_with_root)
        # add the unknown root to the chain the server sends
        ctx = opts.getContext()
        from OpenSSL import crypto
        ctx.add_extra_chain_cert(crypto.load_certificate(crypto.FILETYPE_PEM,
                                                         other.cert_pem.bytes()))
        _, failure = self.handshake_with_options(opts)
        self.assertEqual((failure.kind, failure.detail), ("certificate-untrusted", "unknown-ca"))

    def handshake_with_options(self, opts, policy=STRICT):
        import attrs
        req = attrs.evolve(policy.requirements(Destination("peer.test", HOST)),
                           ca_file=self.ca_file)
        creator = PolicyCreator(req, HOST)
        client = Client(creator)
        server_proto = TLSMemoryBIOFactory(opts, False, protocol.Factory.forProtocol(
            protocol.Protocol)).buildProtocol(None)
        client_proto = TLSMemoryBIOFactory(creator, True, protocol.Factory.forProtocol(
            lambda: client)).buildProtocol(None)
        iosim.connect(server_proto, iosim.makeFakeServer(server_proto),
                      client_proto, iosim.makeFakeClient(client_proto)).flush()
        return client, evaluate(req, creator, HOST, "192.0.2.1", 25)

    def test_wrong_name(self):
        _, failure = self.handshake(self.ca.issue_cert("*.hosting.test"))
        self.assertEqual(failure.kind, "certificate-host-mismatch")
        self.assertIn("a certificate for *.hosting.test, not for mx.peer.test",
                      failure.describe())

    def test_relaxed_accepts_a_bad_certificate_and_records_it(self):
        client, failure = self.handshake(self.ca.issue_cert("*.hosting.test"), RELAXED)
        self.assertIsNone(failure)
        self.assertTrue(client.done)
        self.assertFalse(client.creator.record.verified)

    def test_no_common_version(self):
        """A TLS 1.1-only server fails under strict (TLS 1.2 floor): no common version."""
        client, failure = self.handshake(self.ca.issue_cert(HOST),
                                         max_version=ssl.TLSVersion.TLSv1_1)
        self.assertFalse(client.done)
        self.assertEqual(classify_handshake_error(client.lost),
                         ("handshake-no-common-version", "versions-refused"))

    def test_chain_classification(self):
        self.assertIsNone(classify_chain([]))
        self.assertEqual(classify_chain([(0, 18)]), ("certificate-untrusted", "self-signed"))
        self.assertEqual(classify_chain([(1, 19)]), ("certificate-untrusted", "unknown-ca"))
        self.assertEqual(classify_chain([(0, 20), (0, 21)]),
                         ("certificate-untrusted", "unknown-issuer"))
        self.assertEqual(classify_chain([(0, 2)]), ("certificate-untrusted", "incomplete-chain"))
        self.assertEqual(classify_chain([(0, 20), (0, 10)]),
                         ("certificate-expired", "expired"))
        self.assertEqual(classify_chain([(0, 66)]), ("certificate-weak", "key-too-small"))
        self.assertEqual(classify_chain([(0, 66), (0, 68)]),
                         ("certificate-weak", "weak-signature"))
        self.assertEqual(classify_chain([(0, 18), (0, 66)]),
                         ("certificate-untrusted", "self-signed"))


def weak_leaf(ca: trustme.CA, name: str, bits: int = 1024, digest: str = "sha1"):
    """
    A leaf for C{name} from C{ca} (an RSA trustme CA) with a C{bits}-bit RSA
    key, signed with C{digest}: (certificate, key) as pyOpenSSL objects.
    cryptography builds it; it no longer signs with SHA-1, so pyOpenSSL
    signs it again.
    """
    import warnings
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID
    from OpenSSL import crypto
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = rsa.generate_private_key(65537, bits)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - datetime.timedelta(hours=1))
            .not_valid_after(NOW + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    ossl = crypto.X509.from_cryptography(cert)
    if digest != "sha256":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ossl.sign(crypto.PKey.from_cryptography_key(ca_key), digest)
    return ossl, crypto.PKey.from_cryptography_key(key)


@implementer(IOpenSSLServerConnectionCreator)
class LegacyServer:
    """
    A server at OpenSSL security level 0 (weak keys, TLS 1.0), as old
    receiving servers are.
    """

    def __init__(self, cert, key, version=None) -> None:
        from OpenSSL import SSL
        self.ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        self.ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
        if version is not None:
            self.ctx.set_min_proto_version(version)
            self.ctx.set_max_proto_version(version)
        self.ctx.use_certificate(cert)
        self.ctx.use_privatekey(key)

    def serverConnectionForTLS(self, tlsProtocol):
        from OpenSSL import SSL
        return SSL.Connection(self.ctx, None)


class Answering(protocol.Protocol):
    """
    A server that is not speaking TLS after its 220: it answers whatever
    arrives in plain text, or closes the connection.
    """

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer

    def dataReceived(self, data: bytes) -> None:
        if self.answer is None:
            self.transport.loseConnection()
        else:
            self.transport.write(self.answer)


class HandshakeClassTests(SynchronousTestCase):
    """
    One class per real cause, found in real OpenSSL handshakes in memory:
    weak keys and signatures, old versions judged at the normal security
    level, a plain-text answer, a connection closed mid-handshake.
    """

    def setUp(self):
        self.ca = trustme.CA(key_type=trustme.KeyType.RSA)
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.ca_file = os.path.join(self.dir, "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def run_handshake(self, server_proto, policy):
        import attrs
        req = attrs.evolve(policy.requirements(Destination("peer.test", HOST)),
                           ca_file=self.ca_file)
        creator = PolicyCreator(req, HOST)
        client = Client(creator)
        client_factory = TLSMemoryBIOFactory(creator, True,
                                             protocol.Factory.forProtocol(lambda: client))
        client_proto = client_factory.buildProtocol(None)
        pump = iosim.connect(server_proto, iosim.makeFakeServer(server_proto),
                             client_proto, iosim.makeFakeClient(client_proto))
        pump.flush()
        return client, creator, evaluate(req, creator, HOST, "192.0.2.1", 25)

    def tls_server(self, creator):
        factory = TLSMemoryBIOFactory(creator, False,
                                      protocol.Factory.forProtocol(protocol.Protocol))
        return factory.buildProtocol(None)

    def test_weak_key_and_signature_fail_strict_with_the_facts(self):
        """RSA-1024 signed with SHA-1 by a trusted CA: strict fails with certificate-weak naming the key size and the signature, not the authority."""
        cert, key = weak_leaf(self.ca, HOST)
        client, creator, failure = self.run_handshake(
            self.tls_server(LegacyServer(cert, key)), STRICT)
        self.assertTrue(client.done)
        self.assertEqual(failure.kind, "certificate-weak")
        self.assertEqual(failure.tlsrpt_result, "certificate-not-trusted")
        text = failure.describe()
        self.assertIn("mx.peer.test[192.0.2.1]:25 presented a certificate", text)
        self.assertIn("1024-bit RSA key", text)
        self.assertIn("SHA-1 signature", text)
        self.assertNotIn("authority we do not trust", text)
        self.assertIn("2048", failure.advice())
        self.assertEqual(creator.record.certificate.key, "RSA 1024 bits")
        self.assertEqual(creator.record.certificate.signature, "SHA-1")

    def test_weak_key_alone(self):
        """A 1024-bit key with a SHA-256 signature is key-too-small."""
        cert, key = weak_leaf(self.ca, HOST, digest="sha256")
        _, _, failure = self.run_handshake(self.tls_server(LegacyServer(cert, key)), STRICT)
        self.assertEqual((failure.kind, failure.detail), ("certificate-weak", "key-too-small"))
        self.assertNotIn("SHA", failure.weakness)

    def test_opportunistic_judges_verification_at_the_normal_level(self):
        """Opportunistic accepts the weak certificate at security level 0, but the record says not verified, with the reason."""
        cert, key = weak_leaf(self.ca, HOST)
        client, creator, failure = self.run_handshake(
            self.tls_server(LegacyServer(cert, key)), OPPORTUNISTIC)
        self.assertTrue(client.done)
        self.assertIsNone(failure)
        self.assertEqual(creator.record.chain_errors, [])  # level 0 saw nothing wrong
        self.assertFalse(creator.record.verified)
        self.assertIn("certificate not verified (weak: a 1024-bit RSA key",
                      creator.record.describe())

    def test_tls10_session_is_not_verified(self):
        """A TLS 1.0 session with a good certificate (opportunistic) is recorded as encrypted, not verified: TLS 1.0 is below the normal floor."""
        from OpenSSL import SSL
        leaf = self.ca.issue_cert(HOST)
        from OpenSSL import crypto
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, leaf.cert_chain_pems[0].bytes())
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, leaf.private_key_pem.bytes())
        client, creator, _ = self.run_handshake(
            self.tls_server(LegacyServer(cert, key, SSL.TLS1_VERSION)), OPPORTUNISTIC)
        self.assertTrue(client.done)
        self.assertEqual(creator.record.version, "TLSv1.0")
        self.assertFalse(creator.record.verified)
        self.assertEqual(creator.record.unverified_reason, "TLS 1.0 is below TLS 1.2")
        # The same certificate over TLS 1.3 is verified.
        client, creator, _ = self.run_handshake(
            self.tls_server(LegacyServer(cert, key)), OPPORTUNISTIC)
        self.assertTrue(creator.record.verified)

    def test_plain_text_answer(self):
        """A server that answers the ClientHello in plain text: handshake-plaintext, not a version mismatch."""
        client, _, _ = self.run_handshake(
            Answering(b"500 5.5.2 Error: command not recognized\r\n"), STRICT)
        self.assertFalse(client.done)
        self.assertEqual(classify_handshake_error(client.lost),
                         ("handshake-plaintext", "plaintext"))

    def test_closed_during_handshake(self):
        """A server that closes the connection on the ClientHello: handshake-closed."""
        client, _, _ = self.run_handshake(Answering(None), RELAXED)
        self.assertFalse(client.done)
        self.assertEqual(classify_handshake_error(client.lost)[0], "handshake-closed")


class ShadowVerdictTests(SynchronousTestCase):
    def creator(self, version: str, verified: bool = True):
        from twisted_mta.tls.failure import CertificateFacts
        c = PolicyCreator(STRICT.requirements(Destination("d", HOST)), HOST)
        c.record.version, c.record.cipher = version, "X"
        c.record.certificate = CertificateFacts(HOST, (HOST,), "CA", 0, 2e9, False)
        c.record.name_ok, c.record.verified = verified, verified
        return c

    def test_old_version_fails_strict_shadow(self):
        """A session at TLS 1.0 (OpenSSL calls it "TLSv1") fails a strict shadow: no common version."""
        from twisted_mta.tls.handshake import shadow_verdict
        req = STRICT.requirements(Destination("d", HOST))
        for version in ("TLSv1.0", "TLSv1.1"):
            v = shadow_verdict(req, self.creator(version), True, {"STARTTLS": ""}, HOST,
                               "192.0.2.1", 25)
            self.assertEqual((v.kind, v.detail), ("handshake-no-common-version",
                                                  "server-too-old"))
        self.assertIsNone(shadow_verdict(req, self.creator("TLSv1.3"), True, {}, HOST,
                                         "192.0.2.1", 25))

    def test_no_starttls_fails_a_shadow_that_requires_it(self):
        from twisted_mta.tls.handshake import shadow_verdict
        req = STRICT.requirements(Destination("d", HOST))
        v = shadow_verdict(req, None, False, {}, HOST, "192.0.2.1", 25)
        self.assertEqual(v.kind, "starttls-not-offered")
        self.assertIsNone(shadow_verdict(req, None, False, {"STARTTLS": ""}, HOST,
                                         "192.0.2.1", 25))
