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
            ({"headers": ["from", "Received"]}, "dkim.headers", "must not list 'Received'"),
            ({"sign": ["authenticated", "internet"]}, "dkim.sign", "must list some of"),
            ({"sign": "dsn"}, "dkim.sign", "must be a list"),
            ({"subdomains": "yes"}, "dkim.subdomains", "true or false"),
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


# -- signing the mail that is ours (issue 15) -------------------------------------

def signer_for(testcase, domains: dict[str, str], **dkim_table) -> Signer:
    """
    A Signer with a fresh key per domain ({domain: algorithm}), selector s1.
    """
    base = testcase.mktemp()
    os.makedirs(base)
    table = {}
    for i, (domain, algorithm) in enumerate(domains.items()):
        write_key(os.path.join(base, f"k{i}.pem"), algorithm)
        table[domain] = {"selector": "s1", "key_file": f"k{i}.pem", "algorithm": algorithm}
    return Signer.from_config(make_config(base, dkim={"domains": table, **dkim_table}))


def h_tag(signed: bytes) -> list[bytes]:
    """
    The h= of the DKIM-Signature field C{signed} starts with (CRLF or LF).
    """
    lines = signed.split(b"\n")
    field = lines[0]
    for line in lines[1:]:
        if line[:1] not in (b" ", b"\t"):
            break
        field += line
    unfolded = b"".join(field.split())
    return unfolded.split(b";h=")[1].split(b";")[0].split(b":")


class DecisionTests(SynchronousTestCase):
    def test_source(self) -> None:
        """
        Authenticated clients and the trusted networks are ours; anyone
        else (the Internet) is not.
        """
        from twisted_mta.dkim import sign_source
        rows = [((True, True), "authenticated"), ((True, False), "authenticated"),
                ((False, True), "trusted-networks"), ((False, False), None)]
        for args, expected in rows:
            self.assertEqual(sign_source(*args), expected, args)

    def test_signs(self) -> None:
        """
        [dkim] sign lists the sources; None (the Internet) never signs.
        """
        everything = signer_for(self, {"example.test": "ed25519-sha256"})
        some = signer_for(self, {"example.test": "ed25519-sha256"}, sign=["dsn"])
        rows = [(everything, "authenticated", True), (everything, "trusted-networks", True),
                (everything, "sendmail", True), (everything, "dsn", True),
                (everything, None, False),
                (some, "authenticated", False), (some, "dsn", True)]
        for signer, source, expected in rows:
            self.assertEqual(signer.signs(source), expected, (signer.sources, source))
        self.assertFalse(Signer({}, ("from",)).signs("authenticated"))  # no keys

    def test_from_domain(self) -> None:
        from twisted_mta.dkim import from_domain
        rows = [
            (b"From: A <a@Example.Test>\r\nTo: b@x.test\r\n", "example.test", ""),
            (b"from:a@example.test.\r\n", "example.test", ""),
            (b"From: (c)\r\n <a@example.test>\r\n", "example.test", ""),  # folded
            (b"From: a@example.test, b@example.test\r\nSender: a@example.test\r\n",
             "example.test", ""),
            (b"From: a@example.test, b@other.test\r\n", None, "more than one domain"),
            (b"To: a@example.test\r\n", None, "no From"),
            (b"From: a@example.test\r\nFrom: b@example.test\r\n", None, "more than one From"),
            (b"From: undisclosed\r\n", None, "no address"),
            ("From: a@bücher.test\r\n".encode(), "xn--bcher-kva.test", ""),
            # IDNA2008, as routing uses (IDNA2003 would map it to strasse.test)
            ("From: a@straße.test\r\n".encode(), "xn--strae-oqa.test", ""),
        ]
        for head, domain, why in rows:
            got, reason = from_domain(head)
            self.assertEqual(got, domain, head)
            self.assertIn(why, reason, head)

    def test_key_for(self) -> None:
        """
        The From domain's own key; its parent's only with subdomains = true.
        """
        exact = signer_for(self, {"example.test": "ed25519-sha256"})
        parent = signer_for(self, {"example.test": "ed25519-sha256",
                                   "b.example.test": "ed25519-sha256"}, subdomains=True)
        rows = [(exact, "example.test", "example.test"), (exact, "a.example.test", None),
                (exact, "other.test", None), (exact, "test", None),
                (parent, "x.a.example.test", "example.test"),
                (parent, "c.b.example.test", "b.example.test"),
                (parent, "notexample.test", None)]
        for signer, domain, expected in rows:
            key = signer.key_for(domain)
            self.assertEqual(key.domain if key else None, expected, (domain, signer.subdomains))



class SignOutboundTests(SynchronousTestCase):
    def test_header_list(self) -> None:
        """
        h= is exactly the configured headers the message has, in the
        configured order.
        """
        signer = signer_for(self, {"example.test": "rsa-sha256"},
                            headers=["subject", "from", "x-absent", "to", "message-id"])
        signed = signer.sign_outbound(MESSAGE)
        self.assertEqual(signed.domain, "example.test")
        self.assertEqual(h_tag(signed.field + MESSAGE),
                         [b"subject", b"from", b"to", b"message-id"])
        self.assertTrue(dkim.verify(signed.field + MESSAGE, dnsfunc=dnsfunc_for(signer)))

    def test_parent_domain(self) -> None:
        signer = signer_for(self, {"example.test": "ed25519-sha256"}, subdomains=True)
        message = MESSAGE.replace(b"@example.test>", b"@news.example.test>")
        signed = signer.sign_outbound(message)
        self.assertEqual((signed.domain, signed.from_domain), ("example.test",
                                                                "news.example.test"))
        self.assertTrue(dkim.verify(signed.field + message, dnsfunc=dnsfunc_for(signer)))

    def test_not_signed(self) -> None:
        """
        No key, no From, or a header dkimpy cannot parse: no signature, a
        reason, no exception.
        """
        signer = signer_for(self, {"example.test": "rsa-sha256"})
        rows = [(MESSAGE.replace(b"example.test>", b"other.test>"), "no key for other.test"),
                (MESSAGE.replace(b"From:", b"X-From:"), "no From header"),
                (b"From: a@example.test\r\nno colon here\r\n\r\nbody\r\n",
                 "dkimpy could not sign it")]
        for message, reason in rows:
            signed = signer.sign_outbound(message)
            self.assertEqual(signed.field, b"", message)
            self.assertIn(reason, signed.reason)

    def test_sign_local(self) -> None:
        """
        For the sendmail pickup and the DSNs: the message signed, or as it
        was when its source is not in [dkim] sign.
        """
        signer = signer_for(self, {"example.test": "ed25519-sha256"}, sign=["sendmail"])
        signed = signer.sign_local(MESSAGE, "sendmail")
        self.assertTrue(signed.startswith(b"DKIM-Signature:") and signed.endswith(MESSAGE))
        self.assertTrue(dkim.verify(signed, dnsfunc=dnsfunc_for(signer)))
        self.assertEqual(signer.sign_local(MESSAGE, "dsn"), MESSAGE)


class InboundSigningTests(SynchronousTestCase):
    """
    The inbound server signs the mail that is ours before its commit: the
    queued file is the signed message.
    """

    BODY = MESSAGE + b"more body\r\n.\r\n"

    def session(self, peer: str, domains=None, authenticated: bool = False, **dkim_table):
        from twisted_mta.users import UserDatabase, hash_password
        from tests.support import FakeTLSTransport, ServerHarness
        signer = signer_for(self, domains or {"example.test": "rsa-sha256"}, **dkim_table)
        if authenticated:
            users = UserDatabase(path="t", users={"alice": hash_password("pw", log_n=4)})
            h = ServerHarness(self, role="submission", peer=peer, tls_context=object(),
                              transport_factory=FakeTLSTransport, users=users)
            h.ehlo()
            h.send("STARTTLS\r\n")
            h.protocol.handshakeCompleted()
            h.ehlo()
            plain = base64.b64encode(b"\x00alice\x00pw").decode()
            self.assertEqual(h.send(f"AUTH PLAIN {plain}\r\n")[0][:3], "235")
        else:
            h = ServerHarness(self, peer=peer)
        h.factory.signer = signer
        return h, signer

    def deliver(self, h, rcpt: str = "bob@example.test") -> list[str]:
        h.start_transaction(rcpts=(rcpt,), sender="alice@example.test")
        return h.send(self.BODY)

    def test_authenticated(self) -> None:
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        h, signer = self.session("192.0.2.10", authenticated=True)
        reply = self.deliver(h, "someone@remote.test")
        self.assertEqual(reply[0][:3], "250", reply)
        [message] = h.queued_messages()
        self.assertTrue(message.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;"), message[:80])
        self.assertIn(b"\r\nReceived: from client.example", message)
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))
        [envelope] = h.queued
        signature = message[:message.index(b"Received:")]
        self.assertEqual(envelope.size, len(self.BODY) - 3 + len(signature))  # without ".\r\n"
        entry = h.spool.read(envelope.queue_id, "new", False)
        self.assertIsNone(entry.problem)  # the file's length agrees with the envelope
        [signed] = [e for e in events if e.get("event") == "dkim.signed"]
        self.assertEqual((signed["domain"], signed["source"], signed["queue_id"]),
                         ("example.test", "authenticated", envelope.queue_id))

    def test_trusted_network(self) -> None:
        h, signer = self.session("127.0.0.1", domains={"example.test": "ed25519-sha256"})
        self.assertEqual(self.deliver(h)[0][:3], "250")
        [message] = h.queued_messages()
        self.assertIn(b"a=ed25519-sha256", message[:200])
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))

    def test_internet_mail_not_signed(self) -> None:
        """
        Mail from the Internet to a local user is never signed, even when
        its From names a domain we have a key for.
        """
        h, _ = self.session("192.0.2.10")
        self.assertEqual(self.deliver(h)[0][:3], "250")
        [message] = h.queued_messages()
        self.assertNotIn(b"DKIM-Signature", message)
        self.assertTrue(message.endswith(MESSAGE + b"more body\r\n"))

    def test_source_not_listed(self) -> None:
        h, _ = self.session("127.0.0.1", sign=["authenticated"])
        self.assertEqual(self.deliver(h)[0][:3], "250")
        self.assertNotIn(b"DKIM-Signature", h.queued_messages()[0])

    def test_domain_without_key(self) -> None:
        h, _ = self.session("127.0.0.1", domains={"example.org": "rsa-sha256"})
        self.assertEqual(self.deliver(h)[0][:3], "250")
        self.assertNotIn(b"DKIM-Signature", h.queued_messages()[0])

    def test_large_message(self) -> None:
        """
        A message larger than the writer keeps in memory (spilled to tmp/
        before the end of data) is read back and signed whole.
        """
        h, signer = self.session("127.0.0.1")
        h.start_transaction(rcpts=("bob@example.test",), sender="alice@example.test")
        line = b"x" * 998 + b"\r\n"
        h.send(MESSAGE)
        for _ in range(300):
            h.send(line)
        self.assertEqual(h.send(b".\r\n")[0][:3], "250")
        [message] = h.queued_messages()
        self.assertGreater(len(message), 300_000)
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))
        self.assertIsNone(h.spool.read(h.queued[0].queue_id, "new", False).problem)

    def test_threaded_io(self) -> None:
        """
        With the I/O in threads (here: calls held until run), the commit
        follows the signing and the 250 only the commit.
        """
        from twisted.internet import defer
        held = []

        def run_blocking(f, *args):
            d = defer.Deferred()
            held.append((d, f, args))
            return d

        h, signer = self.session("127.0.0.1")
        h.spool.run_blocking = h.factory.run_blocking = run_blocking
        h.spool.group_sync._run = run_blocking
        h.start_transaction(rcpts=("bob@example.test",), sender="alice@example.test")
        self.assertEqual(h.send(self.BODY), [])
        for _ in range(20):
            if not held:
                break
            d, f, args = held.pop(0)
            d.callback(f(*args))
        reply = h.read()
        self.assertEqual(reply[0][:3], "250", reply)
        [message] = h.queued_messages()
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))

    def test_bdat(self) -> None:
        """
        A message in BDAT chunks (RFC 3030) is signed like one after DATA.
        """
        h, signer = self.session("127.0.0.1")
        h.ehlo()
        h.send("MAIL FROM:<alice@example.test>\r\n")
        h.send("RCPT TO:<bob@example.test>\r\n")
        first, rest = MESSAGE[:40], MESSAGE[40:]
        h.send(b"BDAT %d\r\n" % len(first) + first)
        reply = h.send(b"BDAT %d LAST\r\n" % len(rest) + rest)
        self.assertEqual(reply[-1][:3], "250", reply)
        [message] = h.queued_messages()
        self.assertTrue(message.startswith(b"DKIM-Signature:"))
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))

    def test_write_failure(self) -> None:
        """
        The file cannot be read back or rewritten: 451, and nothing stays in
        the spool.
        """
        import errno

        from twisted.internet import defer

        from twisted_mta.queue.spool import MessageWriter
        self.patch(MessageWriter, "rewrite",
                   lambda self, change: defer.fail(OSError(errno.EIO, "I/O error")))
        h, _ = self.session("127.0.0.1")
        reply = self.deliver(h)
        self.assertEqual(reply[0][:3], "451", reply)
        self.assertEqual(h.queued, [])
        self.assertEqual(h.spool_entries(), [])


class DSNSigningTests(SynchronousTestCase):
    """
    Our DSNs are signed by the key of their From domain (MAILER-DAEMON@
    our host name), here the parent of the host name's.
    """

    def notices(self, **dkim_table):
        from twisted.internet.task import Clock

        from twisted_mta.local import LocalDirectory
        from twisted_mta.queue.notices import Notices
        from twisted_mta.queue.spool import Spool, run_inline
        signer = signer_for(self, {"example.test": "rsa-sha256"}, **dkim_table)
        config = make_config(self.mktemp())
        spool = Spool(config.spool)
        spool.create()
        queued = []
        notices = Notices(config, spool, Clock(), run_inline, LocalDirectory(config.local),
                          queued.append, lambda *a: None, signer=signer)
        return notices, spool, signer, queued

    def bounce(self, notices, spool) -> None:
        from twisted_mta.model import FAILED, Outcome, Recipient
        d = spool.queue_local(MESSAGE, sender="alice@example.test",
                              recipients=(Recipient(address="x@remote.test"),),
                              arrival=0, next_attempt=0, client={})
        envelope = self.successResultOf(d)
        failed = Recipient(address="x@remote.test", state=FAILED,
                           outcome=Outcome(550, "5.1.1", "no such user", "mx.remote.test"))
        envelope = envelope.with_results({failed.address: failed})
        self.assertTrue(self.successResultOf(notices.send(envelope, [failed])))

    def test_signed(self) -> None:
        notices, spool, signer, queued = self.notices(subdomains=True)
        self.bounce(notices, spool)
        [dsn] = queued
        message = spool.read_message(dsn.queue_id)
        self.assertIn(b"From: Mail Delivery System <MAILER-DAEMON@mx.example.test>", message)
        self.assertTrue(message.startswith(b"DKIM-Signature:"), message[:100])
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))
        self.assertEqual(dsn.size, len(message))

    def test_not_listed_or_no_key(self) -> None:
        for table in ({"subdomains": True, "sign": ["authenticated"]}, {}):
            notices, spool, _, queued = self.notices(**table)
            self.bounce(notices, spool)
            self.assertNotIn(b"DKIM-Signature", spool.read_message(queued[0].queue_id), table)


DKIM_TABLE = """
[dkim.domains."example.test"]
selector = "s1"
key_file = "r.pem"
[dkim.domains."ed.test"]
selector = "s2"
key_file = "e.pem"
algorithm = "ed25519-sha256"
"""


class RecordCommandTests(SynchronousTestCase):
    """
    twisted-mta dkim record: the zone-file lines to publish, which dkimpy
    accepts as the key of a signature.
    """

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        import contextlib
        import io

        from twisted_mta.cli import main
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_record(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        write_key(os.path.join(base, "r.pem"), "rsa-sha256")
        write_key(os.path.join(base, "e.pem"), "ed25519-sha256")
        config = self.write_config(base, DKIM_TABLE)
        code, out, err = self.run_cli("dkim", "record", "-c", config.path)
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertEqual([line.split(" ")[0] for line in lines],
                         ["s2._domainkey.ed.test.", "s1._domainkey.example.test."])
        signer = Signer.from_config(config)
        records = {}
        for line in lines:
            name, rest = line.split(" IN TXT ")
            records[name.encode()] = "".join(rest.strip('"').split('" "')).encode()
        for domain in ("example.test", "ed.test"):
            message = MESSAGE.replace(b"example.test>", domain.encode() + b">")
            self.assertTrue(dkim.verify(signer.sign(message, domain),
                                        dnsfunc=lambda name, timeout=5: records.get(name)))
        code, out, _ = self.run_cli("dkim", "record", "ED.test.", "-c", config.path)
        self.assertEqual((code, len(out.splitlines())), (0, 1))
        code, out, err = self.run_cli("dkim", "record", "other.test", "-c", config.path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("no [dkim.domains] key for other.test", err)
        self.assertEqual(err.count("\n"), 1)

    def write_config(self, base: str, extra: str):
        from twisted_mta.config import load_config
        os.makedirs(base, exist_ok=True)
        path = os.path.join(base, "mta.toml")
        with open(path, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:0"\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\n' + extra)
        return load_config(path)

    def test_no_keys(self) -> None:
        config = self.write_config(self.mktemp(), "")
        code, out, err = self.run_cli("dkim", "record", "-c", config.path)
        self.assertEqual((code, out), (1, ""))
        self.assertIn("[dkim] has no domains", err)


EIGHT_BIT = ("From: A <a@example.test>\r\n"
             "To: b@example.org\r\n"
             "Subject: 8-bit\r\n"
             "MIME-Version: 1.0\r\n"
             "Content-Type: text/plain; charset=utf-8\r\n"
             "Content-Transfer-Encoding: 8bit\r\n"
             "\r\n"
             "Grüße aus Köln, ½ € mehr\r\n").encode("utf-8")


class EightBitTests(SynchronousTestCase):
    """
    RFC 6376 5.3: 8-bit content is converted to 7 bit before it is signed
    (twisted_mta.downgrade), where that leaves the message intact.
    """

    def test_converted(self) -> None:
        import email
        import email.policy
        signer = signer_for(self, {"example.test": "rsa-sha256"})
        signed = signer.sign_outbound(EIGHT_BIT)
        self.assertEqual(signed.eight_bit, "converted")
        message = signed.apply(EIGHT_BIT)
        self.assertTrue(message.isascii())
        self.assertIn(b"Content-Transfer-Encoding: quoted-printable", message)
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))
        parsed = email.message_from_bytes(message, policy=email.policy.default)
        self.assertEqual(parsed.get_content(), "Grüße aus Köln, ½ € mehr\r\n")

    def test_left_as_is(self) -> None:
        """
        UTF-8 header fields (SMTPUTF8) and a message already signed are
        signed as they are.
        """
        signer = signer_for(self, {"example.test": "rsa-sha256"})
        utf8_subject = EIGHT_BIT.replace(b"Subject: 8-bit", "Subject: Grüße".encode())
        presigned = b"DKIM-Signature: v=1; d=example.org; b=x\r\n" + EIGHT_BIT
        for message, why in ((utf8_subject, "SMTPUTF8"), (presigned, "DKIM-signed")):
            signed = signer.sign_outbound(message)
            self.assertIn(why, signed.eight_bit)
            self.assertIsNone(signed.message)
            out = signed.apply(message)
            self.assertEqual(out, signed.field + message)
            self.assertTrue(dkim.verify(out, dnsfunc=dnsfunc_for(signer)))

    def test_queued_file_converted(self) -> None:
        """
        Through the server: the queue file holds the converted, signed
        message, and the envelope's size follows it.
        """
        h, signer = InboundSigningTests.session(self, "127.0.0.1")
        h.start_transaction(rcpts=("bob@example.test",), sender="alice@example.test")
        self.assertEqual(h.send(EIGHT_BIT + b".\r\n")[0][:3], "250")
        [message] = h.queued_messages()
        self.assertTrue(message.isascii())
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))
        received = message.index(b"Received:")
        self.assertEqual(h.queued[0].size, len(message) - (message.index(b"From:") - received))
        self.assertIsNone(h.spool.read(h.queued[0].queue_id, "new", False).problem)


class PickupSigningTests(SynchronousTestCase):
    """
    Mail from the sendmail command is signed when the maildrop is picked
    up, before its commit.
    """

    def pickup(self, **dkim_table):
        from twisted.internet.task import Clock

        from twisted_mta import maildrop
        from twisted_mta.inbound.pickup import PickupService, prepare_maildrop
        from twisted_mta.queue.spool import Spool, run_inline
        signer = signer_for(self, {"example.test": "ed25519-sha256"}, **dkim_table)
        config = make_config(self.mktemp())
        clock = Clock()
        clock.advance(1796334547)
        spool = Spool(config.spool, run_inline)
        spool.create()
        drops = prepare_maildrop(spool.path)
        with open(os.path.join(drops, maildrop.drop_name(clock.seconds())), "wb") as f:
            f.write(maildrop.encode(maildrop.Drop("cron@example.test", ("x@remote.test",),
                                                  MESSAGE)))
        queued = []
        service = PickupService(config, spool, clock, run_inline, queued.append,
                                wall=clock.seconds, signer=signer)
        service.startService()
        self.addCleanup(service.stopService)
        [envelope] = queued
        return spool.read_message(envelope.queue_id), envelope, signer

    def test_signed(self) -> None:
        message, envelope, signer = self.pickup()
        self.assertTrue(message.startswith(b"DKIM-Signature:"), message[:100])
        self.assertTrue(dkim.verify(message, dnsfunc=dnsfunc_for(signer)))
        self.assertTrue(message.endswith(MESSAGE))

    def test_not_listed(self) -> None:
        message, _, _ = self.pickup(sign=["authenticated"])
        self.assertNotIn(b"DKIM-Signature", message)


class BenchTests(SynchronousTestCase):
    """
    scripts/bench dkim (scripts/benchlib/dkimsign.py): its messages, and a
    run of two messages per cell that signs every one (it checks).
    """

    def load(self):
        import sys
        scripts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "scripts")
        if scripts not in sys.path:
            sys.path.insert(0, scripts)
        from benchlib import dkimsign
        return dkimsign

    def test_messages(self) -> None:
        bench = self.load()
        for size, eight_bit in bench.CELLS:
            data = bench.message(size, eight_bit)
            body = data[data.index(b"\r\n\r\n") + 4:]
            self.assertLessEqual(size - 80, len(body))
            self.assertLessEqual(len(body), size)
            self.assertEqual(data.isascii(), not eight_bit)

    def test_run(self) -> None:
        bench = self.load()
        base = self.mktemp()
        os.makedirs(base)
        rows = bench.run(base, 2)
        self.assertEqual([(r["key"], r["size"], r["eight_bit"]) for r in rows],
                         [(k, s, e) for k, _ in bench.ALGORITHMS for s, e in bench.CELLS])
        self.assertTrue(all(r["sign_cpu_ms"] > 0 for r in rows))
        self.assertEqual(len(bench.table(rows).splitlines()), 2 + len(rows))


class RedactedDSNTests(SynchronousTestCase):
    def test_without_signatures(self) -> None:
        from twisted_mta.dkim import without_signatures
        message = (b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\nReceived: x\r\n"
                   b"dkim-signature: v=1;\r\n b=def\r\nFrom: a@example.test\r\n\r\n"
                   b"DKIM-Signature: in the body stays\r\n")
        self.assertEqual(without_signatures(message),
                         b"Received: x\r\nFrom: a@example.test\r\n\r\n"
                         b"DKIM-Signature: in the body stays\r\n")
        self.assertEqual(without_signatures(MESSAGE), MESSAGE)

    def test_redacted_copy_signed_anew(self) -> None:
        """
        A signed REQUIRETLS report redacted on its way back carries one
        signature, of the redacted copy, which verifies.
        """
        from tests.queue.test_manager import ManagerTestBase
        from tests.queue.test_requiretls_dsn import BODY, RequireTLSOutbound

        class Case(ManagerTestBase):
            def runTest(self) -> None:
                pass
        case = Case()
        case.setUp()
        self.addCleanup(case.tearDown)
        case.outbound = RequireTLSOutbound()
        m = case.manager()
        signer = signer_for(self, {"example.test": "ed25519-sha256"}, subdomains=True)
        m.notices.signer = signer
        env = case.queue(["x@elsewhere.test"], sender="s@remote.test", body=BODY,
                         requiretls=True)
        m.enqueue(env)
        for _ in range(6):
            case.clock.advance(0)
        copies = {q: case.successResultOf(m.envelope(q)) for q in m.entries}
        [copy_id] = [q for q, e in copies.items() if "redacted_from" in e.client]
        data = case.spool.read_message(copy_id)
        self.assertIn(b"(RFC 8689 section 5)", data)  # the redacted copy
        self.assertEqual(data.count(b"DKIM-Signature:"), 1)
        self.assertTrue(dkim.verify(data, dnsfunc=dnsfunc_for(signer)))


class SigningBugTests(SynchronousTestCase):
    def test_converter_bug(self) -> None:
        """
        A converter that crashes costs the conversion, not the signature.
        """
        from twisted_mta import downgrade

        def broken(message: bytes) -> bytes:
            raise RuntimeError("oops")
        self.patch(downgrade, "downgrade", broken)
        signer = signer_for(self, {"example.test": "rsa-sha256"})
        signed = signer.sign_outbound(EIGHT_BIT)
        self.assertIn("the conversion failed (RuntimeError: oops)", signed.eight_bit)
        self.assertTrue(dkim.verify(signed.apply(EIGHT_BIT), dnsfunc=dnsfunc_for(signer)))

    def test_bug_is_unsigned_and_logged(self) -> None:
        import twisted_mta.dkim as module

        def broken(head: bytes):
            raise RuntimeError("oops")
        self.patch(module, "from_domain", broken)
        signer = signer_for(self, {"example.test": "rsa-sha256"})
        signed = signer.sign_outbound(MESSAGE)
        self.assertEqual((signed.field, signed.reason),
                         (b"", "internal error (traceback in the log)"))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
