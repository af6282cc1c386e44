"""
C{twisted-mta tls publish} (a subprocess) against a real authoritative
server: Debian's nsd on loopback serving TLSA records that match the
certificate and that do not, an C{_mta-sts} record with the suggested id
and one with another id whose policy host has no address.  The
configuration's C{[dns] nameservers} is the private nsd, so every query
(the policy host's address too) stays on loopback; a name outside nsd's
zones is answered REFUSED, a DNS failure the report must carry in one
line.

The matching record is made here from the certificate's public key with
C{cryptography} and C{hashlib}, not with the code under test.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.trial import unittest

from tests.interop.dns import NSDServer, shared_nsd, zone
from tests.interop.support import subprocess_env
from twisted_mta.config import PublishSettings
from twisted_mta.tls.publish import policy_id, policy_text

MX1, MX2, ABSENT = "mx1.publish.test", "mx2.publish.test", "mx.absent.test"
# The id tls publish suggests for publish.test when mx1 is the only MX host.
SID = policy_id(policy_text(PublishSettings(), (MX1,)))


def spki_sha256(public_key) -> str:
    """The data of a TLSA 3 1 1 record, computed independently of tls/dane.py."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


CA = trustme.CA()
LEAF = CA.issue_cert(MX1, MX2, ABSENT)
CERT = x509.load_pem_x509_certificate(LEAF.cert_chain_pems[0].bytes())
NEXT_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER = spki_sha256(ec.generate_private_key(ec.SECP256R1()).public_key())
MATCH = spki_sha256(CERT.public_key())

ZONES = {
    "publish.test": zone("publish.test", [
        ("_25._tcp.mx1", "TLSA", f"3 1 1 {MATCH}"),
        ("_25._tcp.mx1", "TLSA", f"3 1 1 {OTHER}"),
        ("_25._tcp.mx2", "TLSA", f"3 1 1 {OTHER}"),
        ("_mta-sts", "TXT", f'"v=STSv1; id={SID}"'),
    ]),
    "other.test": zone("other.test", [("_mta-sts", "TXT", '"v=STSv1; id=20240101"')]),
}


class PublishAgainstNSDTests(unittest.SynchronousTestCase):
    """
    The command's checks against what a real DNS server publishes.
    """

    def setUp(self) -> None:
        self.server: NSDServer = shared_nsd(self, "publish", ZONES)
        self.base = os.path.abspath(self.mktemp())
        os.makedirs(self.base)
        with open(os.path.join(self.base, "cert.pem"), "wb") as f:
            for blob in LEAF.cert_chain_pems:
                f.write(blob.bytes())
        LEAF.private_key_pem.write_to_path(os.path.join(self.base, "key.pem"))
        with open(os.path.join(self.base, "next.pem"), "wb") as f:
            f.write(NEXT_KEY.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def publish(self, extra: str, *flags: str) -> subprocess.CompletedProcess:
        """
        Run C{tls publish} with a configuration whose only resolver is the
        private nsd.
        """
        path = os.path.join(self.base, "mta.toml")
        with open(path, "w") as f:
            f.write(f'[server]\nhostname = "{MX1}"\nspool = "spool"\n'
                    f'[dns]\nnameservers = ["{self.server.address}"]\ntimeout = "3s"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n' + extra)
        return subprocess.run(
            [sys.executable, "-m", "twisted_mta.cli", "tls", "publish", "-c", path, *flags],
            env=subprocess_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=60)

    def test_matching_record_published(self):
        """One published record matches the certificate, one does not: all good, exit 0."""
        result = self.publish('[local]\ndomains = ["publish.test"]\nusers = ["postmaster"]\n',
                              "--json")
        self.assertEqual((result.returncode, result.stderr), (0, ""), result.stdout)
        report = json.loads(result.stdout)
        self.assertEqual(report["warnings"], [])
        self.assertEqual(report["current_key"]["tlsa"], f"3 1 1 {MATCH}")
        texts = [c["text"] for c in report["checks"]]
        self.assertIn(f"_25._tcp.{MX1}: TLSA 3 1 1 {MATCH[:8]}… matches the certificate in "
                      "use now", texts)
        self.assertIn(f"_25._tcp.{MX1}: TLSA 3 1 1 {OTHER[:8]}… matches neither the key in "
                      "use now nor the next key: drop it once no server uses its key", texts)
        self.assertIn(f"_mta-sts.publish.test publishes id={SID}, the id of this policy", texts)

    def test_mismatch_next_key_and_failures(self):
        """A host whose only record is another key's, a next key nobody published, a name nsd refuses, a policy host without an address: one warning line each, exit 1."""
        result = self.publish(
            'next_key = "next.pem"\n'
            f'[publish]\nmx = ["{MX1}", "{MX2}", "{ABSENT}"]\n'
            '[local]\ndomains = ["other.test"]\nusers = ["postmaster"]\n')
        self.assertEqual((result.returncode, result.stderr), (1, ""), result.stdout)
        self.assertNotIn("Traceback", result.stdout)
        warnings = [line for line in result.stdout.splitlines()
                    if line.startswith("warning: ")]
        starts = [
            f"warning: _25._tcp.{MX1}: no published TLSA record matches the next key",
            f"warning: _25._tcp.{MX2}: no published TLSA record matches the certificate in "
            "use now",
            f"warning: _25._tcp.{MX2}: no published TLSA record matches the next key",
            f"warning: _25._tcp.{ABSENT}: the TLSA lookup failed ({self.server.address} "
            "answered REFUSED)",
            "warning: _mta-sts.other.test publishes id=20240101, not ",
        ]
        self.assertEqual(len(warnings), len(starts), warnings)
        for line, start in zip(warnings, starts):
            self.assertTrue(line.startswith(start), f"{line!r} does not start with {start!r}")
        self.assertIn("no address for mta-sts.other.test", warnings[-1])
        next_record = spki_sha256(NEXT_KEY.public_key())
        self.assertIn(f"_25._tcp.{MX2}. IN TLSA 3 1 1 {next_record}  ; DANE: the next key",
                      result.stdout)
