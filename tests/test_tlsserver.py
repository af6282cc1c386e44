"""
Tests for our own TLS identity (twisted_mta.tlsserver): the certificate
chain file split into certificates, and one-line errors naming the file.
"""

from __future__ import annotations

import os

import trustme
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import TLSServerSettings
from twisted_mta.tlsserver import TLSSetupError, server_context


class ServerContextTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca = trustme.CA()
        self.intermediate = self.ca.create_child_ca()
        self.leaf = self.intermediate.issue_cert("mx.example.test")
        self.key = self.write("key.pem", self.leaf.private_key_pem.bytes())

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def chain(self) -> bytes:
        return b"".join(blob.bytes() for blob in self.leaf.cert_chain_pems)

    def context(self, cert: str, key: str | None = None):
        return server_context(TLSServerSettings(certificate=cert, key=key or self.key))

    def refused(self, cert: str, key: str | None = None) -> str:
        with self.assertRaises(TLSSetupError) as cm:
            self.context(cert, key)
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        return message

    def test_disabled(self):
        """Without a certificate there is no context."""
        self.assertIsNone(server_context(TLSServerSettings()))

    def test_leaf_and_intermediates(self):
        """A chain file gives the leaf as our certificate and the rest as the extra chain, in order."""
        options = self.context(self.write("chain.pem", self.chain()))
        self.assertEqual(options.certificate.get_subject().get_components(),
                         self._subject(self.leaf.cert_chain_pems[0]))
        self.assertEqual(
            [c.get_subject().get_components() for c in options.extraCertChain],
            [self._subject(blob) for blob in self.leaf.cert_chain_pems[1:]])
        self.assertEqual(len(options.extraCertChain), 1)  # the intermediate

    def _subject(self, blob):
        from cryptography import x509
        from OpenSSL import crypto
        cert = x509.load_pem_x509_certificate(blob.bytes())
        return crypto.X509.from_cryptography(cert).get_subject().get_components()

    def test_text_and_key_around_blocks(self):
        """Text before and between the blocks (as openssl writes it) and the key in the same file are ignored."""
        text = (b"subject=CN = mx.example.test\n" + self.leaf.cert_chain_pems[0].bytes()
                + b"\nissuer follows\n"
                + b"".join(b.bytes() for b in self.leaf.cert_chain_pems[1:])
                + self.leaf.private_key_pem.bytes())
        options = self.context(self.write("all.pem", text), self.write("k.pem", text))
        self.assertEqual(len(options.extraCertChain), len(self.leaf.cert_chain_pems) - 1)

    def test_no_certificate(self):
        """An empty file, text, or a key alone: no certificate found."""
        for name, data in [("empty.pem", b""), ("text.pem", b"hello\n"),
                           ("key-only.pem", self.leaf.private_key_pem.bytes()),
                           ("unterminated.pem", b"-----BEGIN CERTIFICATE-----\nMIIB\n")]:
            path = self.write(name, data)
            self.assertEqual(self.refused(path), f"{path}: no certificate found")

    def test_bad_base64(self):
        """A block that is not base64 says so, naming the file."""
        lines = self.leaf.cert_chain_pems[0].bytes().split(b"\n")
        lines[2] = b"!!!!" + lines[2][4:]
        path = self.write("bad.pem", b"\n".join(lines))
        message = self.refused(path)
        self.assertTrue(message.startswith(f"{path}: cannot load certificate: not valid PEM: "),
                        message)
        self.assertNotIn("https://", message)

    def test_not_a_certificate_inside(self):
        """A CERTIFICATE block whose contents are not a certificate."""
        path = self.write("junk.pem", b"-----BEGIN CERTIFICATE-----\nAAAA\n"
                                      b"-----END CERTIFICATE-----\n")
        self.assertTrue(self.refused(path).startswith(f"{path}: cannot load certificate: "))

    def test_missing_file(self):
        """A certificate file that went away names the file."""
        path = os.path.join(self.dir, "gone.pem")
        self.assertIn(f"{path}: cannot load certificate: ", self.refused(path))

    def test_key_mismatch(self):
        """Another certificate's key is refused."""
        other = self.ca.issue_cert("other.test")
        path = self.write("chain.pem", self.chain())
        key = self.write("other.key", other.private_key_pem.bytes())
        self.assertIn(f"{path}: certificate and key do not match", self.refused(path, key))

    def test_bad_key(self):
        """A key file that holds no key names the key file."""
        key = self.write("nokey.pem", b"nothing\n")
        self.assertIn(f"{key}: cannot load private key", self.refused(
            self.write("chain.pem", self.chain()), key))
