"""
DKIM through real DNS: keys made here (RSA and Ed25519), their records
served by the private nsd, a message signed by L{twisted_mta.dkim.Signer}
and verified by dkimpy asking nsd through dnspython (loopback only).
"""

from __future__ import annotations

import os

import dkim
import dns.exception
import dns.resolver
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, zone
from tests.interop.support import make_tempdir
from tests.interop.test_tlsrpt_send import txt
from tests.support import make_config
from tests.test_dkim import MESSAGE, write_key
from twisted_mta.dkim import Signer

ZONE = "dkim.test"


class DKIMThroughDNSTests(SynchronousTestCase):
    def test_rsa_and_ed25519(self) -> None:
        require_nsd()
        tmp = make_tempdir(self, "dkim")
        domains = {}
        for name, algorithm in (("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")):
            write_key(os.path.join(tmp, f"{name}.pem"), algorithm)
            domains[f"{name}.{ZONE}"] = {"selector": "sel", "key_file": f"{name}.pem",
                                         "algorithm": algorithm}
        signer = Signer.from_config(make_config(tmp, dkim={"domains": domains}))
        records = [(f"sel._domainkey.{k.domain}.", "TXT", txt(k.dns_record()))
                   for k in signer.keys.values()]
        nsd = NSDServer(os.path.join(tmp, "nsd"), {ZONE: zone(ZONE, records)})
        os.makedirs(nsd.workdir, exist_ok=True)
        nsd.start()
        self.addCleanup(nsd.stop)
        host, port = nsd.address.split(":")
        asked = []

        def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
            asked.append(name)
            resolver = dns.resolver.Resolver(configure=False)
            resolver.nameservers, resolver.port, resolver.lifetime = [host], int(port), timeout
            try:
                answer = resolver.resolve(name.decode(), "TXT")
            except dns.exception.DNSException:
                return None
            return b"".join(answer[0].strings)

        for domain in domains:
            signed = signer.sign(MESSAGE, domain)
            self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc), domain)
            self.assertFalse(dkim.verify(signed.replace(b"body line", b"other"),
                                         dnsfunc=dnsfunc), domain)
        self.assertEqual(sorted(set(asked)), [b"sel._domainkey.ed.dkim.test.",
                                              b"sel._domainkey.rsa.dkim.test."])
