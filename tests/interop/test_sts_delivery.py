"""
MTA-STS in delivery, end to end: our MTA (C{twistd -n mta}) finds each
domain's C{_mta-sts} TXT record and MX through a private nsd, fetches the
policy over real HTTPS from a policy host on loopback (a trustme
certificate for every C{mta-sts.<domain>}), and delivers to scripted SMTP
peers on loopback that do real STARTTLS with certificates made here.

The cases: enforce with a listed MX host (delivered, verified, policy
mta-sts); enforce with an MX host the policy does not list (never
contacted, deferred as sts-mx-mismatch); enforce with a certificate nobody
vouches for, under a default policy whose fallback is "now" (deferred,
never cleartext); testing mode with an unlisted host (delivered as the
default says, the would-be failure reported as a shadow verdict); a policy
fetch that fails (delivered as the default says, the failure logged); and
a restart with the policy host gone (the cached policy still applies).

Nothing leaves the machine: DNS is the private nsd, the policy host and
the peers listen on 127.0.77.x.
"""

from __future__ import annotations

import email
import http.server
import json
import os
import ssl
import threading

import trustme
from twisted.trial.unittest import SynchronousTestCase

from tests.interop.dns import NSDServer, require_nsd, zone
from tests.interop.support import (
    ONE_ATTEMPT_JSON_LOG, MTAProcess, free_port, make_tempdir, wait_for,
)
from tests.interop.test_operate import cli_ok, events, send
from tests.interop.tls_peers import ScriptedPeer, free_port_on_all

ZONE = "sts.test"
GOOD, OTHER, SELF = "127.0.77.2", "127.0.77.3", "127.0.77.4"
POLICY_ADDRESS = "127.0.77.10"
TIMEOUT = 30.0

# domain -> (MX host, policy served at mta-sts.<domain>: (status, body))
CASES = {
    "enforce-ok": ("mx-good", (200, "enforce", ["mx-good.sts.test"])),
    "enforce-unlisted": ("mx-other", (200, "enforce", ["mx-good.sts.test"])),
    "enforce-badcert": ("mx-self", (200, "enforce", ["*.sts.test"])),
    "testing-unlisted": ("mx-other", (200, "testing", ["mx-good.sts.test"])),
    "fetch-404": ("mx-other", (404, "enforce", ["mx-good.sts.test"])),
}


def policy_text(mode: str, mx: list[str]) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), "max_age: 86400"]
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def records() -> list[tuple[str, str, str]]:
    out = [("mx-good", "A", GOOD), ("mx-other", "A", OTHER), ("mx-self", "A", SELF)]
    for domain, (mx, _) in CASES.items():
        out += [(domain, "MX", f"10 {mx}.{ZONE}."),
                (f"_mta-sts.{domain}", "TXT", '"v=STSv1; id=20261203"'),
                (f"mta-sts.{domain}", "A", POLICY_ADDRESS)]
    return out


class PolicyHost:
    """
    One HTTPS server for every C{mta-sts.<domain>}: the policy by the Host
    header; counts the requests.
    """

    def __init__(self, port: int, certificate: trustme.LeafCert) -> None:
        self.requests: list[str] = []
        self.overrides: dict[str, tuple] = {}  # domain -> policy served instead of CASES
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = (self.headers.get("Host") or "").split(":")[0]
                host.requests.append(name)
                domain = name.removeprefix("mta-sts.").removesuffix("." + ZONE)
                status, mode, mx = host.overrides.get(domain) or \
                    CASES.get(domain, ("", (404, "", [])))[1]
                body = policy_text(mode, mx) if status == 200 else b"not here\n"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        certificate.configure_cert(context)
        self.server = http.server.ThreadingHTTPServer((POLICY_ADDRESS, port), Handler)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def server_context(certificate: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    certificate.configure_cert(context)
    return context


class MTASTSDeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        require_nsd()
        self.tmp = make_tempdir(self, "sts-delivery")
        self.nsd = NSDServer(os.path.join(self.tmp, "nsd"), {ZONE: zone(ZONE, records())})
        os.makedirs(self.nsd.workdir, exist_ok=True)
        self.nsd.start()
        self.addCleanup(self.nsd.stop)
        ca, stranger = trustme.CA(), trustme.CA()
        self.ca_path = os.path.join(self.tmp, "ca.pem")
        ca.cert_pem.write_to_path(self.ca_path)
        port = free_port_on_all((GOOD, OTHER, SELF))
        self.peers = {
            "mx-good": ScriptedPeer(GOOD, port, f"mx-good.{ZONE}", mode="tls",
                                    tls_context=server_context(ca.issue_cert(f"mx-good.{ZONE}"))),
            "mx-other": ScriptedPeer(OTHER, port, f"mx-other.{ZONE}", mode="no-starttls"),
            "mx-self": ScriptedPeer(SELF, port, f"mx-self.{ZONE}", mode="tls",
                                    tls_context=server_context(
                                        stranger.issue_cert(f"mx-self.{ZONE}"))),
        }
        for peer in self.peers.values():
            self.addCleanup(peer.stop)
        self.https_port = free_port_on_all((POLICY_ADDRESS,))
        self.policy_host = PolicyHost(self.https_port, ca.issue_cert(
            *(f"mta-sts.{d}.{ZONE}" for d in CASES)))
        self.addCleanup(self.policy_host.stop)
        config = "\n".join([
            "[dns]",
            f'nameservers = ["{self.nsd.address}"]',
            "",
            "[outbound]",
            f"port = {port}",
            'connect_timeout = "5s"',
            "",
            "[outbound.tls]",
            'policy = "opportunistic"',
            'fallback = "now"',  # the default would send in cleartext at once
            'ca_file = "ca.pem"',
            "dane = false",
            'sts_ca_file = "ca.pem"',
            f"sts_port = {self.https_port}",
            'sts_fetch_timeout = "5s"',
            "",
            "[relay]",
            'trusted_networks = ["127.0.0.0/8"]',
            "",
            ONE_ATTEMPT_JSON_LOG,
        ])
        self.mta = MTAProcess(os.path.join(self.tmp, "mta"), config, port=free_port())
        with open(os.path.join(self.mta.tmpdir, "ca.pem"), "wb") as f:
            f.write(ca.cert_pem.bytes())
        self.addCleanup(self.mta.cleanup)
        self.mta.start()

    def event(self, name: str, **match) -> dict:
        def found():
            for e in events(self.mta):
                if e.get("event") == name and all(e.get(k) == v for k, v in match.items()):
                    return e
            return None
        return wait_for(found, TIMEOUT, lambda: f"no {name} event matching {match}; "
                        f"{self.mta.describe()}")

    def received(self, peer: str, token: str) -> list:
        def got():
            return [m for m in self.peers[peer].messages if token.encode() in m.data]
        return wait_for(got, TIMEOUT, lambda: f"{peer} did not receive {token}; "
                        f"{self.mta.describe()}")

    def test_policies_in_delivery(self) -> None:
        tokens = {d: send(self.mta, f"user@{d}.{ZONE}", d) for d in CASES}

        # enforce, listed host: verified TLS, chosen by the MTA-STS policy
        (message,) = self.received("mx-good", tokens["enforce-ok"])
        self.assertTrue(message.tls)
        trace = email.message_from_bytes(message.data)["X-Twisted-MTA-TLS"]
        self.assertIn("certificate verified", trace)
        self.assertIn("policy mta-sts", trace)
        connected = self.event("outbound.connected", source="mta-sts")
        self.assertEqual(connected["policy"], "mta-sts")

        # enforce, unlisted host: refused before any connection, deferred
        refused = self.event("outbound.host_refused", kind="sts-mx-mismatch")
        self.assertEqual(refused["host"], f"mx-other.{ZONE}")
        decision = self.event("outbound.tls_decision", kind="sts-mx-mismatch")
        self.assertEqual((decision["action"], decision["rule"]), ("defer", "decider"))
        self.assertEqual(decision["policy"], "mta-sts")

        # enforce, untrusted certificate: deferred although the default says "now"
        decision = self.event("outbound.tls_decision", kind="certificate-untrusted")
        self.assertEqual((decision["action"], decision["policy"]), ("defer", "mta-sts"))
        self.assertEqual(self.peers["mx-self"].messages, [])

        # testing: delivered as the default says; the would-be failure reported
        (message,) = self.received("mx-other", tokens["testing-unlisted"])
        self.assertFalse(message.tls)
        shadow = self.event("tls.shadow", kind="sts-mx-mismatch",
                            domain=f"testing-unlisted.{ZONE}")
        self.assertEqual(shadow["shadow"], "mta-sts")

        # a failed fetch: no policy, delivered as the default says, logged
        self.received("mx-other", tokens["fetch-404"])
        failed = self.event("tls.sts-fetch-failed", domain=f"fetch-404.{ZONE}")
        self.assertEqual(failed["result_type"], "sts-policy-fetch-error")

        # nothing unlisted got mail for the enforce-unlisted domain
        self.assertEqual([m for m in self.peers["mx-other"].messages
                          if tokens["enforce-unlisted"].encode() in m.data], [])
        self.assertEqual(
            sorted(e["domain"] for e in events(self.mta) if e.get("event") == "tls.sts-fetched"),
            sorted(f"{d}.{ZONE}" for d in CASES if d != "fetch-404"))

        # the operator refreshes a policy that changed (same TXT id): the running
        # MTA re-reads it, and the deferred message goes out under it
        self.policy_host.overrides["enforce-unlisted"] = (200, "testing",
                                                           [f"mx-good.{ZONE}"])
        refreshed = json.loads(cli_ok(self.mta, "tls", "sts", "refresh",
                                      f"enforce-unlisted.{ZONE}", "--json"))
        self.assertEqual(refreshed["mode"], "testing")
        self.event("tls.sts-reloaded", domain=f"enforce-unlisted.{ZONE}")
        cli_ok(self.mta, "queue", "flush")
        (message,) = self.received("mx-other", tokens["enforce-unlisted"])
        self.assertFalse(message.tls)

        # restart with the policy host gone: the cached policy still applies
        self.policy_host.stop()
        self.mta.stop()
        self.mta.start()
        again = send(self.mta, f"user@enforce-ok.{ZONE}", "after restart")
        (message,) = self.received("mx-good", again)
        trace = email.message_from_bytes(message.data)["X-Twisted-MTA-TLS"]
        self.assertIn("policy mta-sts", trace)

    def test_operator_commands(self) -> None:
        """tls explain shows the policy, where it came from, and the host it refuses; tls sts list/show/refresh show the cache and a failed fetch."""
        report = json.loads(cli_ok(self.mta, "tls", "explain", f"enforce-unlisted.{ZONE}",
                                   "--json"))
        self.assertEqual(report["mta_sts"]["mode"], "enforce")
        self.assertEqual(report["mta_sts"]["mx"], [f"mx-good.{ZONE}"])
        self.assertEqual(report["mta_sts"]["id"], "20261203")
        (host,) = report["hosts"]
        self.assertEqual((host["source"], host["policy"]), ("mta-sts", "mta-sts"))
        self.assertEqual(host["refused"]["tls_failure"]["kind"], "sts-mx-mismatch")
        self.assertEqual(host["refused"]["decision"]["action"], "defer")
        self.assertIn("not one of the mail servers", host["refused"]["sender_would_read"])
        self.assertEqual(host["addresses"], [])  # never contacted
        text = cli_ok(self.mta, "tls", "explain", f"enforce-ok.{ZONE}")
        self.assertIn("decided by: MTA-STS (the domain's policy, mode enforce)", text)
        self.assertIn("certificate verified", text)
        self.assertIn("MTA-STS: mode enforce, id 20261203", text)

        cached = json.loads(cli_ok(self.mta, "tls", "sts", "list", "--json"))
        self.assertEqual(sorted(e["domain"] for e in cached),
                         sorted(f"{d}.{ZONE}" for d in ("enforce-ok", "enforce-unlisted")))
        shown = json.loads(cli_ok(self.mta, "tls", "sts", "show", f"testing-unlisted.{ZONE}",
                                  "--json"))
        self.assertEqual((shown["mode"], shown["source"]), ("testing", "fetched"))
        again = json.loads(cli_ok(self.mta, "tls", "sts", "show", f"testing-unlisted.{ZONE}",
                                  "--json"))
        self.assertEqual((again["mode"], again["source"]), ("testing", "cache"))
        self.assertEqual(len(self.policy_host.requests), 3)  # the cache was used
        failed = json.loads(cli_ok(self.mta, "tls", "sts", "refresh", f"fetch-404.{ZONE}",
                                   "--json"))
        self.assertEqual(failed["fetch_error"]["result_type"], "sts-policy-fetch-error")
        self.assertIsNone(failed["summary"])
