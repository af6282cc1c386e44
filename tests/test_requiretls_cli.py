"""
The operator sees a message's RFC 8689 tag: queue show (text and JSON) and
the line tls explain prints for it.
"""

import json
import os
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.test_cli import run_cli
from twisted_mta.model import Envelope, Recipient
from twisted_mta.queue.spool import Spool
from twisted_mta.tls.probe import format_report


class QueueShowTests(SynchronousTestCase):
    def entry(self, **tags) -> tuple[str, str]:
        base = self.mktemp()
        os.makedirs(base)
        conf = os.path.join(base, "mta.toml")
        with open(conf, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n')
        spool = Spool(os.path.join(base, "spool"))
        spool.create()
        w = spool.new_message()
        now = time.time()
        env = Envelope(queue_id=w.queue_id, sender="a@remote.test",
                       recipients=(Recipient("x@elsewhere.test"),), arrival=now,
                       next_attempt=now + 300, **tags)
        w.write(env.to_header() + b"Subject: hi\r\n\r\nbody\r\n")
        self.successResultOf(w.commit(env))
        return conf, env.queue_id

    def test_show(self):
        """queue show names REQUIRETLS or TLS-Required: No, and nothing for an untagged entry; --json has the field."""
        for tags, words in (({"requiretls": True}, "TLS:           REQUIRETLS"),
                            ({"tls_required_no": True}, "TLS:           TLS-Required: No"),
                            ({}, None)):
            conf, qid = self.entry(**tags)
            code, out, err = run_cli("queue", "show", qid, "-c", conf)
            self.assertEqual(code, 0, err)
            if words:
                self.assertIn(words, out)
            else:
                self.assertNotIn("TLS:", out)
            code, out, err = run_cli("queue", "show", qid, "-c", conf, "--json")
            for key in ("requiretls", "tls_required_no"):
                self.assertEqual(json.loads(out).get(key, False), tags.get(key, False))

    def test_explain_line(self):
        """tls explain prints the message's tag under the domain line."""
        text = format_report({"domain": "peer.test", "route": "MX", "hosts": [],
                              "message_tag": "REQUIRETLS: verified TLS"})
        self.assertEqual(text.splitlines()[1], "  the message: REQUIRETLS: verified TLS")
