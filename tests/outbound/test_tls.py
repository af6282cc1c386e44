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
from twisted.internet.interfaces import IHandshakeListener
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from twisted_mta.outbound.tls import PolicyCreator, evaluate
from twisted_mta.outbound.tlspolicy import RELAXED, STRICT, Destination
from twisted_mta.outbound.tlsfailure import classify_chain, classify_handshake_error

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
        self.assertEqual(classify_handshake_error(client.lost), "no-common-version")

    def test_chain_classification(self):
        self.assertIsNone(classify_chain([]))
        self.assertEqual(classify_chain([(0, 18)]), ("certificate-untrusted", "self-signed"))
        self.assertEqual(classify_chain([(1, 19)]), ("certificate-untrusted", "unknown-ca"))
        self.assertEqual(classify_chain([(0, 20), (0, 21)]),
                         ("certificate-untrusted", "unknown-issuer"))
        self.assertEqual(classify_chain([(0, 2)]), ("certificate-untrusted", "incomplete-chain"))
        self.assertEqual(classify_chain([(0, 20), (0, 10)]),
                         ("certificate-expired", "expired"))


class ShadowVerdictTests(SynchronousTestCase):
    def creator(self, version: str, verified: bool = True):
        from twisted_mta.outbound.tlsfailure import CertificateFacts
        c = PolicyCreator(STRICT.requirements(Destination("d", HOST)), HOST)
        c.record.version, c.record.cipher = version, "X"
        c.record.certificate = CertificateFacts(HOST, (HOST,), "CA", 0, 2e9, False)
        c.record.name_ok, c.record.verified = verified, verified
        return c

    def test_old_version_fails_strict_shadow(self):
        """A session at TLS 1.0 (OpenSSL calls it "TLSv1") fails a strict shadow: no common version."""
        from twisted_mta.outbound.tls import shadow_verdict
        req = STRICT.requirements(Destination("d", HOST))
        for version in ("TLSv1.0", "TLSv1.1"):
            v = shadow_verdict(req, self.creator(version), True, {"STARTTLS": ""}, HOST,
                               "192.0.2.1", 25)
            self.assertEqual((v.kind, v.detail), ("handshake-failed", "no-common-version"))
        self.assertIsNone(shadow_verdict(req, self.creator("TLSv1.3"), True, {}, HOST,
                                         "192.0.2.1", 25))

    def test_no_starttls_fails_a_shadow_that_requires_it(self):
        from twisted_mta.outbound.tls import shadow_verdict
        req = STRICT.requirements(Destination("d", HOST))
        v = shadow_verdict(req, None, False, {}, HOST, "192.0.2.1", 25)
        self.assertEqual(v.kind, "starttls-not-offered")
        self.assertIsNone(shadow_verdict(req, None, False, {"STARTTLS": ""}, HOST,
                                         "192.0.2.1", 25))
