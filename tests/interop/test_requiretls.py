"""
REQUIRETLS and "TLS-Required: No" (RFC 8689) end to end: two MTA
processes of ours (A sends, B receives; both advertise REQUIRETLS inside
TLS), a real Postfix 3.7 (which does not), scripted peers, a private nsd
for the MX records and MTA-STS policies served over real HTTPS (the MX
hosts are validated by MTA-STS; DANE is off), certificates from trustme.

The cases: a REQUIRETLS message submitted to A over STARTTLS is relayed to
B with REQUIRETLS and B keeps the flag in its queue (it is still pending
there: B's next hop is down); the same message to Postfix bounces at A
with 5.7.30 and a headers-only report, to a server without STARTTLS with
5.7.10; over two hops (client -> A -> B -> Postfix) it bounces at B, the
hop whose next hop lacks REQUIRETLS, and B's headers-only report comes
back to the sender's mailbox at A with REQUIRETLS (A is the MTA-STS
validated MX of the sender's domain), or, for a sender domain whose MX B
cannot validate, as a redacted copy without REQUIRETLS; B refuses
REQUIRETLS in cleartext (530) and lists it only after STARTTLS; a "TLS-Required: No" message to an MTA-STS enforce domain whose
MX host has a certificate nobody vouches for is delivered, and the same
message without the header is not.

Nothing leaves the machine: DNS is the private nsd, every server listens
on 127.0.0.1 or 127.0.80.x.
"""

from __future__ import annotations

import email
import email.policy
import http.server
import json
import os
import smtplib
import ssl
import threading
import unittest
import uuid

import trustme
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, zone
from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, ONE_ATTEMPT_JSON_LOG, MTAProcess, RawSMTP, free_port, make_message,
    make_tempdir, message_files, postfix_unavailable, start_postfix, wait_for,
)
from tests.interop.test_operate import cli_ok, events
from tests.interop.test_sts_delivery import policy_text, server_context
from tests.interop.tls_peers import ScriptedPeer, free_port_on_all

ZONE = "rtls.test"
POSTFIX, NOTLS, BADCERT, HELD = "127.0.80.6", "127.0.80.7", "127.0.80.8", "127.0.80.9"
POLICY_ADDRESS = "127.0.80.10"
A_MX = "127.0.80.11"  # A as the MX of its own domain (where B's reports go)
ALICE = "alice@example.test"
ALICE_A = f"alice@a.{ZONE}"  # the same mailbox at A, in a domain B can look up
ALICE_NONE = f"alice@a-none.{ZONE}"  # and in one whose MX B cannot validate
TIMEOUT = 40.0

# domain -> (MX host, its address, the MTA-STS mode it publishes)
DOMAINS = {
    "relay": ("mx-b", LOOPBACK, "enforce"),  # our MTA B
    "postfix": ("mx-postfix", POSTFIX, "enforce"),
    "notls": ("mx-notls", NOTLS, "testing"),  # testing mode validates the MX too
    "badcert": ("mx-bad", BADCERT, "enforce"),
    "held": ("mx-held", HELD, "enforce"),  # nobody listens: B's next hop is down
    "twohop": ("mx-b", LOOPBACK, "enforce"),  # B, which passes it on to Postfix
    "a": ("mx-a", A_MX, "enforce"),  # our MTA A: B's reports come back here
    "a-none": ("mx-a", A_MX, "none"),  # A again, but mode none validates no MX
}


def records() -> list[tuple[str, str, str]]:
    out = []
    for domain, (mx, address, _) in DOMAINS.items():
        out += [(domain, "MX", f"10 {mx}.{ZONE}."),
                (f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=20261203"'),
                (f"mta-sts.{domain}", "A", POLICY_ADDRESS)]
        if (mx, "A", address) not in out:  # mx-b and mx-a serve two domains each
            out.append((mx, "A", address))
    return out


class Policies:
    """
    One HTTPS server for every C{mta-sts.<domain>.rtls.test}: the policy of
    DOMAINS by the Host header (its mode, its one MX host).
    """

    def __init__(self, port: int, certificate: trustme.LeafCert) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = (self.headers.get("Host") or "").split(":")[0]
                domain = name.removeprefix("mta-sts.").removesuffix("." + ZONE)
                if domain in DOMAINS:
                    mx, _, mode = DOMAINS[domain]
                    body, status = policy_text(mode, [f"{mx}.{ZONE}"]), 200
                else:
                    body, status = b"not here\n", 404
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((POLICY_ADDRESS, port), Handler)
        self.server.socket = server_context(certificate).wrap_socket(self.server.socket,
                                                                     server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def mta_config(nsd: NSDServer, port: int, https_port: int, extra: str = "") -> str:
    return "\n".join([
        '[tls]\ncertificate = "cert.pem"\nkey = "key.pem"\n',
        "[dns]", f'nameservers = ["{nsd.address}"]', "",
        "[outbound]", f"port = {port}", 'connect_timeout = "5s"', "",
        "[outbound.tls]",
        'policy = "opportunistic"',
        'fallback = "now"',
        'ca_file = "ca.pem"',
        "dane = false",
        'sts_ca_file = "ca.pem"',
        f"sts_port = {https_port}",
        'sts_fetch_timeout = "5s"', "",
        "[relay]", 'trusted_networks = ["127.0.0.0/8"]', "",
        ONE_ATTEMPT_JSON_LOG, extra])


def write_cert(ca: trustme.CA, directory: str, *names: str) -> None:
    os.makedirs(directory, exist_ok=True)
    cert = ca.issue_cert(*names)
    with open(os.path.join(directory, "cert.pem"), "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    cert.private_key_pem.write_to_path(os.path.join(directory, "key.pem"))
    ca.cert_pem.write_to_path(os.path.join(directory, "ca.pem"))


class RequireTLSTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_nsd()
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        self.tmp = make_tempdir(self, "requiretls", 0o755)
        self.nsd = NSDServer(os.path.join(self.tmp, "nsd"), {ZONE: zone(ZONE, records())})
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        ca, stranger = trustme.CA(), trustme.CA()
        port = free_port_on_all((POSTFIX, NOTLS, BADCERT, HELD, A_MX))
        self.peers = {
            "notls": ScriptedPeer(NOTLS, port, f"mx-notls.{ZONE}", mode="no-starttls"),
            "badcert": ScriptedPeer(BADCERT, port, f"mx-bad.{ZONE}", mode="tls",
                                    tls_context=server_context(
                                        stranger.issue_cert(f"mx-bad.{ZONE}"))),
        }
        for peer in self.peers.values():
            self.addCleanup(peer.stop)
        https_port = free_port_on_all((POLICY_ADDRESS,))
        self.policies = Policies(https_port, ca.issue_cert(
            *(f"mta-sts.{d}.{ZONE}" for d in DOMAINS)))
        self.addCleanup(self.policies.stop)

        # Postfix 3.7 with STARTTLS and a certificate we trust: it lacks REQUIRETLS.
        pf_dir = os.path.join(self.tmp, "postfix-tls")
        write_cert(ca, pf_dir, f"mx-postfix.{ZONE}")
        for name in ("cert.pem", "key.pem"):
            os.chmod(os.path.join(pf_dir, name), 0o644)
        os.chmod(pf_dir, 0o755)
        self.postfix = start_postfix(self, None, {
            "smtpd_tls_security_level": "may",
            "smtpd_tls_cert_file": os.path.join(pf_dir, "cert.pem"),
            "smtpd_tls_key_file": os.path.join(pf_dir, "key.pem"),
        }, smtpd_port=port, listen=POSTFIX)

        # B: mx-b.rtls.test on 127.0.0.1:port, our MTA, REQUIRETLS inside TLS.
        # It passes relay.rtls.test on through a route whose host is down, so
        # the message stays in its queue, and twohop.rtls.test to Postfix (by
        # its name: the certificate is checked against it), which lacks
        # REQUIRETLS, so such a message bounces at B.
        route = (f'[outbound.routes."relay.{ZONE}"]\nhost = "[{HELD}]:{port}"\n'
                 f'[outbound.routes."twohop.{ZONE}"]\nhost = "mx-postfix.{ZONE}:{port}"\n')
        self.b = MTAProcess(os.path.join(self.tmp, "b"),
                            mta_config(self.nsd, port, https_port, route),
                            port=port, hostname=f"mx-b.{ZONE}")
        write_cert(ca, self.b.tmpdir, f"mx-b.{ZONE}")
        self.addCleanup(self.b.cleanup)
        # A: the sender, submitted to over STARTTLS on 127.0.0.1; also
        # mx-a.rtls.test on A_MX:port, the MX of a.rtls.test (one of its local
        # domains), where B sends its reports.  One certificate for both names.
        listener = f'[[listeners]]\nrole = "mx"\nendpoint = "tcp:{port}:interface={A_MX}"\n'
        self.a = MTAProcess(os.path.join(self.tmp, "a"),
                            mta_config(self.nsd, port, https_port, listener), port=free_port(),
                            domains=(LOCAL_DOMAIN, f"a.{ZONE}", f"a-none.{ZONE}"))
        write_cert(ca, self.a.tmpdir, LOOPBACK, f"mx-a.{ZONE}")
        self.a_ca = ca
        self.addCleanup(self.a.cleanup)
        self.b.start()
        self.a.start()

    # -- helpers ---------------------------------------------------------------

    def submit(self, rcpt: str, requiretls: bool = False, header: str | None = None,
               sender: str = ALICE) -> str:
        token = uuid.uuid4().hex
        message = make_message(token, subject="rfc8689", sender=sender, recipient=rcpt)
        if header:
            message = (header + "\r\n").encode() + message
        with smtplib.SMTP(LOOPBACK, self.a.port, local_hostname="client.example.test",
                          timeout=30) as client:
            if requiretls:
                context = ssl.create_default_context()
                self.a_ca.configure_trust(context)
                client.starttls(context=context)
                client.ehlo()
                self.assertTrue(client.has_extn("requiretls"), client.esmtp_features)
            refused = client.sendmail(sender, [rcpt], message,
                                      mail_options=["REQUIRETLS"] if requiretls else [])
        self.assertEqual(refused, {})
        return token

    def event(self, mta: MTAProcess, name: str, **match) -> dict:
        def found():
            for e in events(mta):
                if e.get("event") == name and all(e.get(k) == v for k, v in match.items()):
                    return e
            return None
        return wait_for(found, TIMEOUT, lambda: f"no {name} event matching {match}; "
                        f"{mta.describe()}")

    def dsn(self, token: str) -> email.message.Message:
        def found():
            for path in message_files(self.a.maildir("alice")):
                with open(path, "rb") as f:
                    data = f.read()
                if token.encode() in data and b"multipart/report" in data:
                    return data
            return None
        data = wait_for(found, TIMEOUT, lambda: f"no report on {token}; {self.a.describe()}")
        self.assertNotIn(f"token: {token}".encode(), data)  # never the content
        return email.message_from_bytes(data, policy=email.policy.compat32)

    def status(self, report: email.message.Message) -> tuple[str, str]:
        human, status, headers = report.get_payload()
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        block = status.get_payload()[1]
        return str(block["Status"]).strip(), " ".join(human.get_payload().split())

    # -- the cases -------------------------------------------------------------

    def test_requiretls_two_hops_and_bounces(self) -> None:
        relay = self.submit(f"user@relay.{ZONE}", requiretls=True)
        postfix = self.submit(f"user@postfix.{ZONE}", requiretls=True)
        notls = self.submit(f"user@notls.{ZONE}", requiretls=True)

        # A -> B: B took it with MAIL FROM ... REQUIRETLS and keeps the flag
        queued = self.event(self.b, "inbound.queued", requiretls=True)
        self.assertEqual(queued["recipients"], [f"user@relay.{ZONE}"])
        connected = self.event(self.a, "outbound.connected", destination=f"relay.{ZONE}")
        self.assertTrue(connected["verified"])
        self.assertIn("requiretls", connected["note"])
        [entry] = json.loads(cli_ok(self.b, "queue", "list", "--json"))
        self.assertTrue(entry["requiretls"], entry)
        shown = cli_ok(self.b, "queue", "show", entry["queue_id"])
        self.assertIn("TLS:           REQUIRETLS", shown)
        with open(os.path.join(self.b.spool, "cur", entry["queue_id"]), "rb") as f:
            stored = f.read()
        self.assertIn(relay.encode(), stored)
        self.assertIn(b"requiretls", stored.split(b"\r\n\r\n")[0].split(b"X-Twisted-MTA-TLS")[1])

        # A -> Postfix 3.7: verified TLS, but no REQUIRETLS after STARTTLS: 5.7.30
        refused = self.event(self.a, "outbound.requiretls_refused",
                             kind="requiretls-unsupported")
        self.assertEqual(refused["host"], f"mx-postfix.{ZONE}")
        code, words = self.status(self.dsn(postfix))
        self.assertEqual(code, "5.7.30")
        self.assertIn("only over verified TLS (REQUIRETLS), and "
                      f"mx-postfix.{ZONE}[{POSTFIX}]", words)
        self.assertIn("only its headers are attached", words)
        # Postfix saw STARTTLS and two EHLOs, and no MAIL (its per-session command counts)
        disconnect = wait_for(lambda: [line for line in self.postfix.maillog().splitlines()
                                       if "disconnect from" in line and "ehlo=" in line],
                              TIMEOUT, self.postfix.describe)
        self.assertIn("starttls=1", disconnect[0])
        self.assertIn("ehlo=2", disconnect[0])
        self.assertNotIn("mail=", disconnect[0])

        # A -> a server without STARTTLS: 5.7.10, nothing sent there
        code, words = self.status(self.dsn(notls))
        self.assertEqual(code, "5.7.10")
        self.assertIn("does not offer encryption", words)
        self.assertEqual(self.peers["notls"].messages, [])

    def bounce_at_b(self, sender: str) -> str:
        """
        client -> A -> B -> Postfix: submit a REQUIRETLS message from
        C{sender} to A for twohop.rtls.test; check that it reached B with
        REQUIRETLS and that B refused Postfix 3.7 (no REQUIRETLS after
        STARTTLS), which got no MAIL.  Return the message's token.
        """
        rcpt = f"user@twohop.{ZONE}"
        token = self.submit(rcpt, requiretls=True, sender=sender)
        # A -> B with REQUIRETLS; B keeps the flag
        queued = self.event(self.b, "inbound.queued", requiretls=True, sender=sender)
        self.assertEqual(queued["recipients"], [rcpt])
        connected = self.event(self.a, "outbound.connected", destination=f"twohop.{ZONE}")
        self.assertTrue(connected["verified"])
        self.assertIn("requiretls", connected["note"])
        # B -> Postfix: verified TLS, no REQUIRETLS after STARTTLS, so no MAIL
        refused = self.event(self.b, "outbound.requiretls_refused",
                             kind="requiretls-unsupported")
        self.assertEqual(refused["host"], f"mx-postfix.{ZONE}")
        disconnect = wait_for(lambda: [line for line in self.postfix.maillog().splitlines()
                                       if "disconnect from" in line and "ehlo=" in line],
                              TIMEOUT, self.postfix.describe)
        self.assertEqual(len(disconnect), 1, disconnect)
        self.assertIn("starttls=1", disconnect[0])
        self.assertNotIn("mail=", disconnect[0])
        self.assertEqual([e for e in events(self.a)
                          if e.get("event") == "outbound.requiretls_refused"], [])
        return token

    def test_requiretls_bounce_at_second_hop(self) -> None:
        """
        client -> A -> B -> Postfix: B, whose next hop lacks REQUIRETLS,
        bounces with 5.7.30.  The headers-only report goes back B -> A with
        MAIL FROM:<> REQUIRETLS: A lists REQUIRETLS inside TLS and MTA-STS
        validates its MX host, so the report travels the REQUIRETLS way and
        the redacted-copy path (dsn.redacted) is not taken.
        """
        token = self.bounce_at_b(ALICE_A)
        # B -> A: the report, from <>, with REQUIRETLS, over verified TLS to mx-a
        back = self.event(self.b, "outbound.connected", destination=f"a.{ZONE}")
        self.assertTrue(back["verified"])
        self.assertEqual(back["source"], "mta-sts")
        self.assertIn("requiretls", back["note"])
        # to alice, a user of A: delivered on receipt
        report = self.event(self.a, "inbound.delivered", sender="", requiretls=True)
        self.assertEqual(report["recipients"], [ALICE_A])
        dsn = self.dsn(token)  # in alice's Maildir at A; never the content
        code, words = self.status(dsn)
        self.assertEqual(code, "5.7.30")
        self.assertIn(f"mx-postfix.{ZONE}", words)
        self.assertIn("only its headers are attached", words)
        self.assertEqual(dsn["Return-Path"], "<>")
        # the trace header B wrote on the report (the attached headers carry A's)
        self.assertIn("requiretls", " ".join(dsn["X-Twisted-MTA-TLS"].split()))
        self.assertEqual([e for e in events(self.b) if e.get("event") == "dsn.redacted"], [])
        wait_for(lambda: json.loads(cli_ok(self.b, "queue", "list", "--json")) == [],
                 TIMEOUT, lambda: f"B still holds mail; {self.b.describe()}")

    def test_requiretls_bounce_redacted_on_the_way_back(self) -> None:
        """
        The same two hops, from a sender whose domain (a-none.rtls.test,
        MX mx-a, MTA-STS mode none) gives B nothing to validate A's MX host
        by: B's REQUIRETLS report cannot go back, so a redacted copy (the
        original headers removed, a note why) goes to the same address
        without REQUIRETLS (RFC 8689 5: the bounce is not discarded).
        """
        token = self.bounce_at_b(ALICE_NONE)
        unvalidated = self.event(self.b, "outbound.requiretls_refused",
                                 kind="requiretls-mx-unvalidated")
        self.assertEqual((unvalidated["host"], unvalidated["domain"]),
                         (f"mx-a.{ZONE}", f"a-none.{ZONE}"))
        redacted = self.event(self.b, "dsn.redacted", sender=ALICE_NONE)
        self.assertEqual(redacted["kind"], "requiretls-mx-unvalidated")
        report = self.event(self.a, "inbound.delivered", sender="")
        self.assertEqual(report["recipients"], [ALICE_NONE])
        self.assertFalse(report["requiretls"])

        def found():
            return [path for path in message_files(self.a.maildir("alice"))
                    if b"multipart/report" in open(path, "rb").read()]
        [path] = wait_for(found, TIMEOUT, lambda: f"no report; {self.a.describe()}")
        with open(path, "rb") as f:
            data = f.read()
        self.assertNotIn(token.encode(), data)  # neither the headers nor the content
        dsn = email.message_from_bytes(data, policy=email.policy.compat32)
        self.assertEqual(dsn["To"], f"<{ALICE_NONE}>")
        human, status, note = dsn.get_payload()
        self.assertEqual([p.get_content_type() for p in dsn.get_payload()],
                         ["text/plain", "message/delivery-status", "text/plain"])
        self.assertEqual(str(status.get_payload()[1]["Status"]).strip(), "5.7.30")
        words = " ".join(human.get_payload().split())
        self.assertIn(f"mx-postfix.{ZONE}", words)
        self.assertIn("the way back to you does not offer that", words)
        self.assertNotIn("attached", words)
        self.assertIn("headers of the original message were removed",
                      " ".join(note.get_payload().split()))
        self.assertNotIn("requiretls", " ".join(dsn["X-Twisted-MTA-TLS"].split()))

    def test_cleartext_refusal_and_advertising(self) -> None:
        """B lists REQUIRETLS only after STARTTLS and answers MAIL ... REQUIRETLS in cleartext with 530 5.7.10."""
        smtp = RawSMTP(self.b.port)
        self.addCleanup(smtp.close)
        smtp.expect(220)
        lines = smtp.command("EHLO client.example.test", 250)
        self.assertFalse(any(b"REQUIRETLS" in line for line in lines), lines)
        self.assertTrue(any(b"STARTTLS" in line for line in lines), lines)
        lines = smtp.command(f"MAIL FROM:<{ALICE}> REQUIRETLS", 530)
        self.assertIn(b"5.7.10", lines[0])
        with smtplib.SMTP(LOOPBACK, self.b.port, local_hostname="client.example.test",
                          timeout=30) as client:
            context = ssl.create_default_context(cafile=os.path.join(self.b.tmpdir, "ca.pem"))
            context.check_hostname = False
            client.starttls(context=context)
            client.ehlo()
            self.assertTrue(client.has_extn("requiretls"), client.esmtp_features)

    def test_tls_required_no_past_enforce(self) -> None:
        """With "TLS-Required: No", a message to an MTA-STS enforce domain whose MX has a certificate nobody vouches for is delivered (STARTTLS still used); without it, it is held back."""
        plain = self.submit(f"user@badcert.{ZONE}")
        relaxed = self.submit(f"other@badcert.{ZONE}", header="TLS-Required: No")
        peer = self.peers["badcert"]

        def got():
            return [m for m in peer.messages if relaxed.encode() in m.data]
        [message] = wait_for(got, TIMEOUT, lambda: f"not delivered; {self.a.describe()}")
        self.assertTrue(message.tls)
        trace = " ".join(email.message_from_bytes(message.data)["X-Twisted-MTA-TLS"].split())
        self.assertIn("tls-required-no", trace)
        self.assertIn("policy opportunistic", trace)
        self.event(self.a, "outbound.tls_required_no", domain=f"badcert.{ZONE}")
        queued = self.event(self.a, "inbound.queued", tls_required_no=True)
        self.assertEqual(queued["recipients"], [f"other@badcert.{ZONE}"])
        decision = self.event(self.a, "outbound.tls_decision", kind="certificate-untrusted")
        self.assertEqual((decision["action"], decision["policy"]), ("defer", "mta-sts"))
        self.assertEqual([m for m in peer.messages if plain.encode() in m.data], [])
