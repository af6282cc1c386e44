"""
DKIM signing: the [dkim] table, keys made at test time (RSA and Ed25519,
PEM and dkimpy's base64 seed) and each signature verified by dkimpy with a
C{dnsfunc} that serves the public key record; the keys that cannot be used
are one configuration line each.  (The key served by a real name server:
tests/interop/test_tlsrpt_send.py.)
"""

from __future__ import annotations

import base64
import os

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.trial.unittest import SynchronousTestCase

from tests.support import make_config
from twisted_mta.config import ConfigError
from twisted_mta.dkim import DKIMKeyError, Signer

MESSAGE = (b"From: Reports <tlsrpt-noreply@example.test>\r\n"
           b"To: r@example.org\r\n"
           b"Subject: a test\r\n"
           b"Date: Thu, 03 Dec 2026 00:00:00 +0000\r\n"
           b"Message-ID: <1@example.test>\r\n"
           b"\r\n"
           b"body line\r\n")


def write_key(path: str, algorithm: str, raw_seed: bool = False, bits: int = 2048) -> None:
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    if raw_seed:
        data = base64.b64encode(key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())) + b"\n"
    else:
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    with open(path, "wb") as f:
        f.write(data)


def dnsfunc_for(signer: Signer, service: str | None = None):
    records = {f"{k.dns_name}.".encode(): k.dns_record(service).encode()
               for k in signer.keys.values()}
    asked = []

    def dnsfunc(name, timeout=5):
        asked.append(name)
        return records.get(name)
    dnsfunc.asked = asked
    return dnsfunc


class SignTests(SynchronousTestCase):
    def signer(self, algorithm: str, raw_seed: bool = False) -> Signer:
        base = self.mktemp()
        os.makedirs(base)
        write_key(os.path.join(base, "k.pem"), algorithm, raw_seed)
        config = make_config(base, dkim={"domains": {"example.test": {
            "selector": "s1", "key_file": "k.pem", "algorithm": algorithm}}})
        return Signer.from_config(config)

    def check(self, signer: Signer, algorithm: str) -> None:
        signed = signer.sign(MESSAGE, "Example.Test")
        self.assertTrue(signed.startswith(b"DKIM-Signature: "))
        self.assertTrue(signed.endswith(MESSAGE))
        head = signed[:signed.index(b"From:")]
        self.assertIn(f"a={algorithm}".encode(), head)
        self.assertIn(b"d=example.test", head)
        self.assertIn(b"s=s1", head)
        self.assertNotIn(b"l=", head.replace(b"\r\n", b"").replace(b" ", b"").replace(
            b"bh=", b"").split(b"b=")[0])
        dnsfunc = dnsfunc_for(signer)
        self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc))
        self.assertEqual(dnsfunc.asked, [b"s1._domainkey.example.test."])
        # a changed header or body breaks it
        self.assertFalse(dkim.verify(signed.replace(b"a test", b"b test"), dnsfunc=dnsfunc))
        self.assertFalse(dkim.verify(signed.replace(b"body line", b"body lime"),
                                     dnsfunc=dnsfunc))

    def test_rsa(self) -> None:
        self.check(self.signer("rsa-sha256"), "rsa-sha256")

    def test_ed25519(self) -> None:
        self.check(self.signer("ed25519-sha256"), "ed25519-sha256")

    def test_ed25519_base64_seed(self) -> None:
        self.check(self.signer("ed25519-sha256", raw_seed=True), "ed25519-sha256")

    def test_signed_headers(self) -> None:
        """
        The configured headers that the message has, From included.
        """
        signer = self.signer("rsa-sha256")
        signed = signer.sign(MESSAGE, "example.test")
        field = signed[:signed.index(b"From:")].replace(b"\r\n", b"").replace(b" ", b"")
        h = field.split(b"h=")[1].split(b";")[0]
        self.assertEqual(h.split(b":"), [b"from", b"subject", b"date", b"message-id", b"to"])

    def test_tlsrpt_service(self) -> None:
        """
        A key restricted to TLS reports (s=tlsrpt) verifies a report.
        """
        signer = self.signer("rsa-sha256")
        signed = signer.sign(MESSAGE, "example.test", tlsrpt=True)
        self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc_for(signer, "tlsrpt"),
                                    tlsrpt="strict"))

    def test_no_key(self) -> None:
        signer = self.signer("rsa-sha256")
        self.assertFalse(signer.can_sign("other.test"))
        self.assertTrue(signer.can_sign("EXAMPLE.test."))
        self.assertRaises(KeyError, signer.sign, MESSAGE, "other.test")


class KeyErrorTests(SynchronousTestCase):
    def error(self, algorithm: str, content: bytes | None, name: str = "k.pem") -> str:
        base = self.mktemp()
        os.makedirs(base)
        if content is not None:
            with open(os.path.join(base, name), "wb") as f:
                f.write(content)
        config = make_config(base, dkim={"domains": {"example.test": {
            "selector": "s1", "key_file": name, "algorithm": algorithm}}})
        with self.assertRaises(DKIMKeyError) as e:
            Signer.from_config(config)
        text = str(e.exception)
        self.assertNotIn("\n", text)
        path = os.path.join(os.path.abspath(base), name)
        self.assertIn(f"dkim.domains.example.test.key_file: {path}", text)
        return text

    def pem(self, key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def test_missing(self) -> None:
        self.assertIn("cannot be read", self.error("rsa-sha256", None))

    def test_garbage(self) -> None:
        self.assertIn("not a PEM private key", self.error("rsa-sha256", b"hello\n"))
        self.assertIn("not a usable PEM", self.error(
            "rsa-sha256", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
        self.assertIn("nor a base64", self.error("ed25519-sha256", b"!!\n"))

    def test_wrong_algorithm(self) -> None:
        self.assertIn("not an RSA key", self.error(
            "rsa-sha256", self.pem(ed25519.Ed25519PrivateKey.generate())))
        self.assertIn("not an Ed25519 key", self.error(
            "ed25519-sha256", self.pem(rsa.generate_private_key(65537, 1024))))


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        config = make_config(self.mktemp())
        self.assertEqual(config.dkim.domains, ())
        self.assertIn("from", config.dkim.headers)
        self.assertEqual(config.to_dict()["dkim"]["domains"], {})

    def test_errors(self) -> None:
        rows = [
            ({"domains": {"example.test": {"selector": "s1"}}},
             "dkim.domains.example.test.key_file", "is required"),
            ({"domains": {"example.test": {"selector": "s1", "key_file": "k",
                                           "algorithm": "rsa-sha1"}}},
             "dkim.domains.example.test.algorithm", "must be one of"),
            ({"domains": {"example.test": {"selector": "s 1", "key_file": "k"}}},
             "dkim.domains.example.test.selector", "is not a DNS name"),
            ({"domains": {"bad domain": {"selector": "s1", "key_file": "k"}}},
             "dkim.domains", "must be a domain"),
            ({"headers": ["subject"]}, "dkim.headers", "must include"),
            ({"headers": ["from", "bad name"]}, "dkim.headers", "header names"),
            ({"other": 1}, "dkim.other", "unknown key"),
        ]
        for table, key, words in rows:
            with self.subTest(table=table):
                with self.assertRaises(ConfigError) as e:
                    make_config(self.mktemp(), dkim=table)
                self.assertIn(f": {key}", str(e.exception))
                self.assertIn(words, str(e.exception))

    def test_to_dict(self) -> None:
        config = make_config(self.mktemp(), dkim={"domains": {"example.test": {
            "selector": "s1", "key_file": "/k.pem"}}})
        self.assertEqual(config.to_dict()["dkim"]["domains"], {"example.test": {
            "selector": "s1", "key_file": "/k.pem", "algorithm": "rsa-sha256"}})
        self.assertEqual(config.dkim.key_for("Example.Test.").selector, "s1")


class PrepareTests(SynchronousTestCase):
    """
    The keys are read by tap.prepare: what config check and start-up run.
    """

    def test_unusable_key_is_one_line(self) -> None:
        from twisted_mta.tap import PrepareError, prepare
        base = self.mktemp()
        os.makedirs(base)
        config = make_config(base, dkim={"domains": {"example.test": {
            "selector": "s1", "key_file": "missing.pem"}}})
        with self.assertRaises(PrepareError) as e:
            prepare(config)
        self.assertIn("dkim.domains.example.test.key_file", str(e.exception))
        self.assertNotIn("\n", str(e.exception))

    def test_signer_prepared(self) -> None:
        from twisted_mta.tap import prepare
        base = self.mktemp()
        os.makedirs(base)
        self.assertIsNone(prepare(make_config(base)).dkim)
        write_key(os.path.join(base, "k.pem"), "ed25519-sha256")
        config = make_config(base, dkim={"domains": {"example.test": {
            "selector": "s1", "key_file": "k.pem", "algorithm": "ed25519-sha256"}}})
        self.assertTrue(prepare(config).dkim.can_sign("example.test"))
