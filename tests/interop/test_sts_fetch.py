"""
MTA-STS policy fetches over real HTTPS on loopback: Twisted web servers
with certificates made by trustme, reached through an injected resolver
(a table: C{mta-sts.<domain>} -> 127.0.0.x; any other name fails, so
nothing goes to the system's resolver or leaves the machine).  Each case
checks the result and its TLS-RPT result type; the ones that end early
also check that the server saw the connection close.
"""

from __future__ import annotations

import datetime

import trustme
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.error import DNSLookupError
from twisted.trial import unittest
from twisted.web import resource, server

from twisted_mta.tls.sts import (
    FETCH_ERROR, POLICY_INVALID, WEBPKI_INVALID, Policy, StsError, StsFetchError,
    StsPolicyInvalid, StsWebPKIError,
)
from twisted_mta.tls.sts_cache import PolicyCache
from twisted_mta.tls.sts_fetch import PolicyFetcher

GOOD = (b"version: STSv1\r\nmode: enforce\r\nmx: mail.good.test\r\nmx: *.mx.good.test\r\n"
        b"max_age: 604800\r\n")


class Behaviour(resource.Resource):
    """
    What the policy host does with a request; records every request.
    """

    isLeaf = True

    def __init__(self, code=200, body=GOOD, content_type=b"text/plain; charset=utf-8",
                 headers=(), hang=False, stream=False) -> None:
        super().__init__()
        self.code, self.body, self.content_type = code, body, content_type
        self.headers, self.hang, self.stream = headers, hang, stream
        self.requests: list = []
        self.lost = defer.Deferred()  # a request's connection went away before the end
        self.sent = 0
        self.next = None  # the next write of a stream

    def render_GET(self, request):
        self.requests.append(request)
        request.notifyFinish().addErrback(self._lost)
        request.setResponseCode(self.code)
        if self.content_type is not None:
            request.setHeader(b"content-type", self.content_type)
        for name, value in self.headers:
            request.setHeader(name, value)
        if self.hang:
            return server.NOT_DONE_YET
        if self.stream:
            self._more(request)
            return server.NOT_DONE_YET
        return self.body

    def _lost(self, failure) -> None:
        if self.next is not None and self.next.active():
            self.next.cancel()
        if not self.lost.called:
            self.lost.callback(None)

    def _more(self, request, left: int = 64) -> None:
        # 8 KiB a tick without a length (chunked), 512 KiB at most, until
        # the client goes away.
        self.next = None
        if self.lost.called:
            return
        if left == 0:
            request.finish()
            return
        request.write(b"x" * 8192)
        self.sent += 8192
        self.next = reactor.callLater(0.005, self._more, request, left - 1)


class TrackingSite(server.Site):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.open = 0
        self.server_names: list[bytes | None] = []

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        site = self
        site.open += 1
        lost = protocol.connectionLost

        def connectionLost(reason):
            site.open -= 1
            return lost(reason)
        protocol.connectionLost = connectionLost
        return protocol


class FetchTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.addresses: dict[str, list[str]] = {}
        self.asked: list[str] = []

    def resolve(self, host: str) -> list[str]:
        self.asked.append(host)
        if host not in self.addresses:
            raise DNSLookupError(f"{host} is not in the test's table")
        return self.addresses[host]

    def serve(self, behaviour: Behaviour, names=("mta-sts.good.test",), ca=None,
              address: str = "127.0.0.1", **cert_kw) -> int:
        """
        Listen on C{address} with a certificate for C{names} issued by
        C{ca} (the trusted CA by default); the port.
        """
        cert = (ca or self.ca).issue_cert(*names, **cert_kw)
        key_and_cert = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes())
        options = key_and_cert.options()
        site = TrackingSite(behaviour)
        site.displayTracebacks = False
        context = options.getContext()

        def record(connection) -> None:
            site.server_names.append(connection.get_servername())
        context.set_tlsext_servername_callback(record)
        port = reactor.listenSSL(0, site, options, interface=address)
        self.site = site

        async def close() -> None:
            for _ in range(200):  # wait for the server's side to see every close
                if site.open == 0:
                    break
                await task.deferLater(reactor, 0.01, lambda: None)
            await port.stopListening()
        self.addCleanup(lambda: defer.Deferred.fromCoroutine(close()))
        return port.getHost().port

    def fetcher(self, port: int, **kw) -> PolicyFetcher:
        trust = ssl.Certificate.loadPEM(self.ca.cert_pem.bytes())
        kw.setdefault("timeout", 10.0)
        return PolicyFetcher(reactor, resolve=self.resolve, trust_root=trust, port=port, **kw)

    async def failure_of(self, d: defer.Deferred, kind: type[StsError]) -> StsError:
        try:
            result = await d
        except StsError as e:
            self.assertIsInstance(e, kind)
            return e
        self.fail(f"expected {kind.__name__}, got {result!r}")

    # -- a good policy ------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_good_policy(self):
        """A valid policy over HTTPS with a trusted certificate for mta-sts.<domain>: the Policy; the request was GET /.well-known/mta-sts.txt with Host and SNI mta-sts.good.test, to the address the resolver chose."""
        behaviour = Behaviour()
        port = self.serve(behaviour, address="127.0.0.2")
        self.addresses["mta-sts.good.test"] = ["127.0.0.2"]
        policy = yield self.fetcher(port).fetch("Good.Test.")
        self.assertIsInstance(policy, Policy)
        self.assertEqual((policy.mode, policy.max_age, policy.mx),
                         ("enforce", 604800, ("mail.good.test", "*.mx.good.test")))
        self.assertEqual(policy.text, GOOD.decode())
        [request] = behaviour.requests
        self.assertEqual((request.method, request.uri), (b"GET", b"/.well-known/mta-sts.txt"))
        self.assertEqual(request.getHeader(b"host"), b"mta-sts.good.test")
        self.assertEqual(self.site.server_names, [b"mta-sts.good.test"])
        self.assertEqual(self.asked, ["mta-sts.good.test"])

    @defer.inlineCallbacks
    def test_next_address_after_a_refused_connection(self):
        """When the first address refuses the connection, the next one is tried."""
        port = self.serve(Behaviour())
        self.addresses["mta-sts.good.test"] = ["127.0.0.3", "127.0.0.1"]
        policy = yield self.fetcher(port).fetch("good.test")
        self.assertEqual(policy.mode, "enforce")

    # -- the certificate --------------------------------------------------------------------

    async def _webpki(self, **serve) -> StsError:
        port = self.serve(Behaviour(), **serve)
        self.addresses["mta-sts.good.test"] = ["127.0.0.1"]
        e = await self.failure_of(self.fetcher(port).fetch("good.test"), StsWebPKIError)
        self.assertEqual(e.result_type, WEBPKI_INVALID)
        return e

    def test_certificate_for_another_name(self):
        """A trusted certificate for another name (good.test, without mta-sts.): sts-webpki-invalid, 'not valid for mta-sts.good.test'."""
        async def run():
            e = await self._webpki(names=("good.test", "www.good.test"))
            self.assertIn("not valid for mta-sts.good.test", str(e))
        return defer.Deferred.fromCoroutine(run())

    def test_certificate_from_an_unknown_ca(self):
        """A certificate for the right name from a CA we do not trust: sts-webpki-invalid."""
        async def run():
            e = await self._webpki(ca=trustme.CA())
            self.assertIn("could not be verified", e.detail)
        return defer.Deferred.fromCoroutine(run())

    def test_expired_certificate(self):
        """An expired certificate for the right name from the trusted CA: sts-webpki-invalid."""
        async def run():
            now = datetime.datetime.now(datetime.timezone.utc)
            e = await self._webpki(not_before=now - datetime.timedelta(days=30),
                                   not_after=now - datetime.timedelta(days=1))
            self.assertIn("could not be verified", e.detail)
        return defer.Deferred.fromCoroutine(run())

    # -- HTTP ----------------------------------------------------------------------------------

    async def _fetch_error(self, behaviour: Behaviour, kind=StsFetchError, **fetcher) -> StsError:
        port = self.serve(behaviour)
        self.addresses["mta-sts.good.test"] = ["127.0.0.1"]
        e = await self.failure_of(self.fetcher(port, **fetcher).fetch("good.test"), kind)
        self.assertEqual(e.result_type, POLICY_INVALID if kind is StsPolicyInvalid
                         else FETCH_ERROR)
        return e

    def test_404(self):
        """HTTP 404: sts-policy-fetch-error naming the status."""
        async def run():
            e = await self._fetch_error(Behaviour(code=404, body=b"not here"))
            self.assertIn("HTTP 404", e.detail)
        return defer.Deferred.fromCoroutine(run())

    def test_redirect_is_not_followed(self):
        """A 301 to another https URL: sts-policy-fetch-error, the Location named, and only one request made."""
        async def run():
            behaviour = Behaviour(code=301, body=b"", headers=[
                (b"location", b"https://mta-sts.good.test/elsewhere.txt")])
            e = await self._fetch_error(behaviour)
            self.assertIn("redirect to https://mta-sts.good.test/elsewhere.txt", e.detail)
            self.assertEqual(len(behaviour.requests), 1)
        return defer.Deferred.fromCoroutine(run())

    def test_oversized_with_content_length(self):
        """A body over 64 KiB announced by Content-Length: refused before it is read."""
        async def run():
            body = GOOD + b"x-pad: " + b"p" * 70000 + b"\r\n"
            e = await self._fetch_error(Behaviour(body=body))
            self.assertIn(f"{len(body)} octets long", e.detail)
        return defer.Deferred.fromCoroutine(run())

    def test_oversized_stream_is_aborted(self):
        """A body without a length that goes on past 64 KiB: the transfer is aborted (the server sees the connection go) long before the server's 512 KiB are sent."""
        async def run():
            behaviour = Behaviour(stream=True)
            e = await self._fetch_error(behaviour)
            self.assertIn("larger than the limit of 65536", e.detail)
            await behaviour.lost
            self.assertLess(behaviour.sent, 300 * 1024)
        return defer.Deferred.fromCoroutine(run())

    def test_timeout(self):
        """A server that sends nothing after the request: sts-policy-fetch-error after the timeout, and the connection is closed."""
        async def run():
            behaviour = Behaviour(hang=True)
            e = await self._fetch_error(behaviour, timeout=0.5)
            self.assertIn("no complete answer within 0.5 seconds at "
                          "mta-sts.good.test[127.0.0.1]", e.detail)
            await behaviour.lost
        return defer.Deferred.fromCoroutine(run())

    def test_syntax_error(self):
        """A body that is not a valid policy: sts-policy-invalid with the reason."""
        async def run():
            body = b"version: STSv1\nmode: enforce\nmx: mail.good.test\nmax_age: forever\n"
            e = await self._fetch_error(Behaviour(body=body), kind=StsPolicyInvalid)
            self.assertIn("line 4: max_age must be a number", e.detail)
        return defer.Deferred.fromCoroutine(run())

    def test_wrong_media_type(self):
        """Content-Type text/html: sts-policy-fetch-error; a missing Content-Type too."""
        async def run():
            e = await self._fetch_error(Behaviour(content_type=b"text/html"))
            self.assertIn("not text/plain", e.detail)
        return defer.Deferred.fromCoroutine(run())

    # -- name and connection ------------------------------------------------------------------

    def test_no_address(self):
        """The resolver knows no address for mta-sts.<domain>: sts-policy-fetch-error; only that name was asked for."""
        async def run():
            fetcher = self.fetcher(1)
            e = await self.failure_of(fetcher.fetch("nowhere.test"), StsFetchError)
            self.assertIn("no address for mta-sts.nowhere.test", e.detail)
            self.assertEqual(self.asked, ["mta-sts.nowhere.test"])
        return defer.Deferred.fromCoroutine(run())

    def test_connection_refused(self):
        """Nothing listens at the address: sts-policy-fetch-error, naming the server."""
        async def run():
            port = self.serve(Behaviour())
            self.addresses["mta-sts.good.test"] = ["127.0.0.4"]
            e = await self.failure_of(self.fetcher(port).fetch("good.test"), StsFetchError)
            self.assertIn("connection failed at mta-sts.good.test[127.0.0.4]", e.detail)
        return defer.Deferred.fromCoroutine(run())

    # -- with the cache -------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_cache_over_real_fetches(self):
        """The cache with the real fetcher: fetched once and kept on disk; after a restart the cached policy is used without a request; a new TXT id with a failing server keeps the cached policy and reports sts-policy-fetch-error."""
        behaviour = Behaviour()
        port = self.serve(behaviour)
        self.addresses["mta-sts.good.test"] = ["127.0.0.1"]
        directory = self.mktemp()
        records = {"good.test": [b"v=STSv1; id=one"]}

        def cache() -> PolicyCache:
            c = PolicyCache(directory, self.fetcher(port).fetch, reactor, defer.maybeDeferred,
                            txt_lookup=lambda domain: records[domain])
            c.load()
            return c
        first = yield cache().policy_for("good.test")
        self.assertEqual((first.source, first.policy.mode), ("fetched", "enforce"))
        again = yield cache().policy_for("good.test")  # a restart
        self.assertEqual((again.source, again.policy.mx), ("cache", first.policy.mx))
        self.assertEqual(len(behaviour.requests), 1)
        behaviour.code = 500
        records["good.test"] = [b"v=STSv1; id=two"]
        changed = yield cache().policy_for("good.test")
        self.assertEqual((changed.source, changed.error.result_type), ("cache", FETCH_ERROR))
        self.assertIn("HTTP 500", changed.error.detail)
        self.assertEqual(len(behaviour.requests), 2)
