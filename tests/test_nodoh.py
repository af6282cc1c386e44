"""
dnspython runs without DNS over HTTPS in the MTA (twisted_mta.nodoh):
its switch exists, is off once our DNS modules are loaded, and loading
them does not load an HTTP client.
"""

import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

HTTP_STACK = ("httpx", "httpx2", "httpcore", "httpcore2", "h2", "trio", "anyio")


class NoDoHTests(SynchronousTestCase):
    def test_switch_is_there_and_off(self) -> None:
        """dns._features.force (private) still exists, and DoH reads as off after our import."""
        import dns._features

        import twisted_mta.nodoh  # noqa: F401
        self.assertTrue(callable(getattr(dns._features, "force", None)),
                        "dnspython changed dns._features: see twisted_mta/nodoh.py")
        self.assertFalse(dns._features.have("doh"))

    def test_dns_modules_load_no_http_client(self) -> None:
        """A fresh interpreter that loads our DNS users and dns.query has no HTTP client (if one is installed, it stays unloaded)."""
        code = (
            "import sys\n"
            "import twisted_mta.tap, twisted_mta.cli, twisted_mta.outbound.mx, twisted_mta.tls.sts\n"
            "twisted_mta.tap.system_nameservers\n"
            "import dns.query, dns.resolver\n"
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HTTP_STACK!r}))\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertEqual(out.stdout.strip(), "[]", out.stdout)
