"""
The [tlsrpt] table: opt-in, what it requires when on, one clear line for
each mistake.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.config import ConfigError, load_config
from tests import test_config

M = test_config.ConfigTests.MINIMAL


class TLSRPTConfigTests(SynchronousTestCase):
    def load(self, text: str):
        path = os.path.abspath(self.mktemp()) + ".toml"
        with open(path, "w") as f:
            f.write(M + text)
        return load_config(path)

    def test_off_by_default(self):
        config = self.load("")
        self.assertFalse(config.tlsrpt.enabled)
        self.assertIsNone(config.tlsrpt.submitter_domain)

    def test_on(self):
        config = self.load('[tlsrpt]\nenabled = true\norganization_name = "Example"\n'
                           'contact_info = "mailto:TLSRPT@Example.org"\n'
                           'skip_domains = ["Skip.example"]\n')
        t = config.tlsrpt
        self.assertEqual((t.contact_address, t.submitter_domain, t.skip_domains),
                         ("TLSRPT@Example.org", "example.org", ("skip.example",)))
        self.assertEqual(config.to_dict()["tlsrpt"]["organization_name"], "Example")

    CASES = [
        ('[tlsrpt]\nenabled = true\ncontact_info = "a@example.org"\n',
         "tlsrpt.organization_name", "is required when enabled is true"),
        ('[tlsrpt]\nenabled = true\norganization_name = "E"\n',
         "tlsrpt.contact_info", "is required when enabled is true"),
        ('[tlsrpt]\ncontact_info = "nobody"\n', "tlsrpt.contact_info",
         "must be an address (local@domain) or mailto:address, not 'nobody'"),
        ('[tlsrpt]\nenabled = true\norganization_name = "E"\ncontact_info = "a@example.org"\n'
         'submitter = "other.example"\n', "tlsrpt.submitter",
         "must be the domain of contact_info (example.org), as RFC 8460 requires"),
        ('[tlsrpt]\nenabled = "yes"\n', "tlsrpt.enabled", "must be true or false, not 'yes'"),
        ('[tlsrpt]\nskip_domains = ["a b"]\n', "tlsrpt.skip_domains",
         "is not a valid domain: 'a b'"),
        ('[tlsrpt]\norganisation = "E"\n', "tlsrpt.organisation", "unknown key"),
    ]

    def test_messages(self):
        for text, key, message in self.CASES:
            with self.assertRaises(ConfigError, msg=text) as cm:
                self.load(text)
            self.assertEqual((cm.exception.key, cm.exception.message), (key, message))
