"""
queue show says when a message was received with SMTPUTF8 (text and JSON).
"""

import json

from twisted.trial.unittest import SynchronousTestCase

from tests import test_requiretls_cli
from tests.test_cli import run_cli


class SMTPUTF8ShowTests(SynchronousTestCase):
    entry = test_requiretls_cli.QueueShowTests.entry  # a spool with one entry, its config

    def test_show(self):
        """The SMTPUTF8 line and the JSON field for a flagged entry; neither otherwise."""
        for tags in ({"smtputf8": True}, {}):
            conf, qid = self.entry(**tags)
            code, out, err = run_cli("queue", "show", qid, "-c", conf)
            self.assertEqual(code, 0, err)
            self.assertEqual("SMTPUTF8:      yes" in out, bool(tags), out)
            code, out, err = run_cli("queue", "show", qid, "-c", conf, "--json")
            self.assertEqual(json.loads(out).get("smtputf8", False), bool(tags), out)
