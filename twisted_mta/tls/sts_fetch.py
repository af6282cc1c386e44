"""
Fetch an MTA-STS policy (RFC 8461 3.3):
C{GET https://mta-sts.<domain>/.well-known/mta-sts.txt}.

 - The HTTPS certificate must be valid for C{mta-sts.<domain>} under the
   WebPKI: Twisted's C{optionsForClientTLS} (OpenSSL checks the chain and
   the dates against the trust roots, service-identity the name; SNI is the
   name), TLS 1.2 or newer.  The trust roots are the system's unless given
   (tests use a trustme CA).
 - Only C{200} is a policy; a redirect is not followed (3.3: "HTTP 3xx
   redirects MUST NOT be followed") and is a fetch error like any other
   status.
 - The media type must be C{text/plain} (any parameters); no
   C{Content-Encoding} other than identity (we ask for none).
 - At most 64 KiB: a larger C{Content-Length} is refused before the body,
   and a body that grows past the limit is aborted at once.
 - One deadline covers it all (name lookup, connect, TLS, headers, body);
   past it the connection is aborted.
 - The name C{mta-sts.<domain>} is resolved by an injected callable (the
   MTA's own resolver, or a table in tests) when one is given; the
   connection then goes to the address it chose, while SNI and the
   certificate check use the name.  Without one, Twisted's
   C{HostnameEndpoint} asks the system's resolver.

Why twisted.web's C{Agent} and not treq: treq always wraps the agent in a
C{ContentDecoderAgent} for gzip, whose decoder inflates each received chunk
whole (a few KiB can become tens of MiB before any size check sees a
byte), and C{treq.collect} cannot be cancelled (a deadline in the middle of
the body would leave the connection open).  Without those, treq would add
only URL handling and a cookie jar we do not want.

The result is a L{Policy}, or a failure with an L{StsError}: L{StsFetchError}
(C{sts-policy-fetch-error}: DNS, connection, HTTP status, redirect, media
type, size, timeout), L{StsWebPKIError} (C{sts-webpki-invalid}: the
certificate), L{StsPolicyInvalid} (C{sts-policy-invalid}: the body).
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import TLSVersion, optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory
from zope.interface import implementer

from twisted_mta.tls.sts import (
    MAX_POLICY_SIZE, WELL_KNOWN_PATH, InvalidPolicy, Policy, StsError, StsFetchError,
    StsPolicyInvalid, StsWebPKIError, normalize_domain, parse_policy, policy_host,
)

DEFAULT_TIMEOUT = 10.0  # seconds for the whole fetch
# No version: the package's __init__ is the application stage (tests/test_layers.py).
USER_AGENT = "twisted-mta (MTA-STS policy fetcher)"

Resolve = Callable[[str], "defer.Deferred[Sequence[str]] | Sequence[str]"]


class PolicyFetcher:
    """
    Fetches policies; one instance serves every domain (each fetch has its
    own connection, closed after it).

    @param reactor: the reactor (connections and the deadline).
    @param resolve: C{resolve(host)} returns (or fires with) the addresses
        to connect to for C{mta-sts.<domain>}, tried in order; None for the
        system's resolver.
    @param trust_root: an C{IOpenSSLTrustRoot} (or a C{Certificate}); None
        for the system's trust store.
    @param port: 443; tests listen elsewhere.
    """

    def __init__(self, reactor, *, resolve: Resolve | None = None, trust_root=None,
                 port: int = 443, timeout: float = DEFAULT_TIMEOUT,
                 max_size: int = MAX_POLICY_SIZE, user_agent: str = USER_AGENT) -> None:
        self.reactor = reactor
        self.resolve = resolve
        self.trust_root = trust_root
        self.port = port
        self.timeout = timeout
        self.max_size = max_size
        self.user_agent = user_agent

    def fetch(self, domain: str) -> "defer.Deferred[Policy]":
        """
        Fetch and parse the policy of C{domain}.
        """
        try:
            domain = normalize_domain(domain)
        except ValueError as e:
            return defer.fail(StsFetchError(domain, str(e)))
        host = policy_host(domain)
        url = f"https://{host}{WELL_KNOWN_PATH}"
        creator = optionsForClientTLS(
            host, trustRoot=self.trust_root,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})
        endpoints = _PolicyEndpoints(self.reactor, host, self.port, self.resolve, creator,
                                     self.timeout)
        agent = Agent.usingEndpointFactory(self.reactor, endpoints,
                                           pool=HTTPConnectionPool(self.reactor,
                                                                   persistent=False))
        headers = Headers({b"User-Agent": [self.user_agent.encode("ascii")],
                           b"Accept": [b"text/plain"]})
        d = agent.request(b"GET", url.encode("ascii"), headers)
        d.addCallback(policy_body, domain, url, self.max_size)
        d.addCallback(self._parse, domain, url)
        d.addTimeout(self.timeout, self.reactor, onTimeoutCancel=lambda result, timeout: Failure(
            StsFetchError(domain, f"no complete answer within {timeout:g} seconds"
                                  f"{endpoints.where()}", url)))
        d.addErrback(self._failed, domain, url, endpoints)
        return d

    def _parse(self, data: bytes, domain: str, url: str) -> Policy:
        try:
            return parse_policy(data)
        except InvalidPolicy as e:
            raise StsPolicyInvalid(domain, str(e), url) from None

    def _failed(self, failure: Failure, domain: str, url: str, endpoints) -> Failure:
        if failure.check(StsError):
            return failure
        return Failure(classify_fetch_failure(failure, domain, url, endpoints.where()))


def policy_body(response, domain: str, url: str,
                max_size: int = MAX_POLICY_SIZE) -> "defer.Deferred[bytes]":
    """
    The body of C{response} (an C{IResponse}) if it can hold a policy: HTTP
    200, C{text/plain}, no content coding, at most C{max_size} octets (the
    transfer is aborted past it).  Otherwise an L{StsFetchError}, or the
    reason the connection failed before the end.  Cancelling the Deferred
    aborts the connection.
    """
    return defer.maybeDeferred(_policy_body, response, domain, url, max_size)


def _policy_body(response, domain: str, url: str, max_size: int) -> "defer.Deferred[bytes]":
    def refuse(detail: str):
        _discard(response)
        raise StsFetchError(domain, detail, url)

    if response.code != 200:
        phrase = response.phrase.decode("latin-1", "replace") if response.phrase else ""
        status = f"HTTP {response.code} {phrase[:60]}".rstrip()
        if 300 <= response.code < 400:
            location = _header(response.headers, b"location")
            to = f" to {location[:200]}" if location else ""
            refuse(f"{status}: a redirect{to}, which MTA-STS does not follow")
        refuse(status)
    content_type = _header(response.headers, b"content-type")
    if content_type is None:
        refuse("no Content-Type (text/plain required)")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != "text/plain":
        refuse(f"Content-Type {content_type[:60]!r}, not text/plain")
    encoding = _header(response.headers, b"content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        refuse(f"Content-Encoding {encoding[:40]!r}, which was not asked for")
    if response.length is not UNKNOWN_LENGTH and response.length > max_size:
        refuse(f"the policy is {response.length} octets long, more than the limit "
               f"of {max_size}")
    finished: defer.Deferred = defer.Deferred(lambda d: body.abort())
    body = _LimitedBody(finished, max_size, domain, url)
    response.deliverBody(body)
    return finished


def classify_fetch_failure(failure: Failure, domain: str, url: str,
                           where: str = "") -> StsError:
    """
    The L{StsError} for a failed request: a certificate problem (a name
    that service-identity did not find in the certificate; OpenSSL's
    "certificate verify failed" for the chain or the dates) is
    L{StsWebPKIError}, anything else L{StsFetchError}.

    OpenSSL's words do not say what was wrong with the chain (expired,
    unknown authority): pyOpenSSL has no public way to read the
    verification result, and replacing Twisted's verify callback to record
    it would also replace the name check that newer Twisted releases make
    there.
    """
    reasons = list(_causes(failure))
    for reason in reasons:
        if _is_name_mismatch(reason):
            return StsWebPKIError(domain, f"the certificate is not valid for "
                                          f"{policy_host(domain)} (a name mismatch){where}",
                                  url)
    for reason in reasons:
        if reason.check(SSL.Error) and "certificate verify failed" in _text(reason).lower():
            return StsWebPKIError(domain, f"the certificate could not be verified (no "
                                          f"valid chain to a trusted authority, or outside "
                                          f"its dates){where}", url)
    for reason in reasons:
        if reason.check(error.DNSLookupError):
            return StsFetchError(domain, f"no address for {policy_host(domain)}: "
                                         f"{_text(reason)}", url)
    for reason in reasons:
        if reason.check(error.ConnectError):
            return StsFetchError(domain, f"connection failed{where}: {_text(reason)}", url)
    for reason in reasons:
        if reason.check(SSL.Error):
            return StsFetchError(domain, f"TLS failed{where}: {_text(reason)}", url)
    words = "; ".join(dict.fromkeys(_text(r) for r in reasons)) or _text(failure)
    return StsFetchError(domain, f"{words}{where}", url)


def _causes(failure: Failure) -> Iterable[Failure]:
    """
    The failures inside Twisted's wrapper exceptions (ResponseFailed,
    RequestTransmissionFailed carry a list of them), innermost last.
    """
    yield failure
    for inner in getattr(failure.value, "reasons", None) or ():
        if isinstance(inner, Failure):
            yield from _causes(inner)


def _is_name_mismatch(reason: Failure) -> bool:
    try:
        from service_identity import VerificationError, CertificateError
    except ImportError:  # pragma: no cover - a dependency
        return False
    return bool(reason.check(VerificationError, CertificateError))


def _text(failure: Failure) -> str:
    value = failure.value
    if isinstance(value, SSL.Error) and value.args and isinstance(value.args[0], list):
        parts = [e[-1] for e in value.args[0] if isinstance(e, tuple) and e and e[-1]]
        if parts:
            return ", ".join(parts)
    text = str(value).strip()
    return text or type(value).__name__


def _header(headers: Headers, name: bytes) -> str | None:
    values = headers.getRawHeaders(name)
    if not values:
        return None
    return values[-1].decode("latin-1")


def _discard(response) -> None:
    """
    Close the connection of a response whose body we do not read (it
    would wait, paused, for a reader).
    """
    reader = Protocol()
    response.deliverBody(reader)
    if reader.transport is not None:
        reader.transport.stopProducing()


class _LimitedBody(Protocol):
    """
    Collect a body of at most C{limit} octets; abort the connection past
    it, or when the fetch is cancelled (the deadline).
    """

    def __init__(self, finished: defer.Deferred, limit: int, domain: str, url: str) -> None:
        self.finished = finished
        self.limit = limit
        self.domain = domain
        self.url = url
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False

    def dataReceived(self, data: bytes) -> None:
        if self.done:
            return
        self.size += len(data)
        if self.size > self.limit:
            self._finish(Failure(StsFetchError(
                self.domain, f"the policy is larger than the limit of {self.limit} octets "
                             f"(transfer aborted)", self.url)))
            self.transport.stopProducing()
            return
        self.chunks.append(data)

    def connectionLost(self, reason: Failure = None) -> None:
        if self.done:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            # PotentialDataLoss: a body that ends with the connection (no
            # length, not chunked), which HTTP/1.1 allows.
            self.done = True
            self.finished.callback(b"".join(self.chunks))
        else:
            self._finish(reason)

    def abort(self) -> None:
        if not self.done:
            self.done = True
            if self.transport is not None:
                self.transport.stopProducing()

    def _finish(self, failure: Failure) -> None:
        self.done = True
        self.finished.errback(failure)


@implementer(IAgentEndpointFactory)
class _PolicyEndpoints:
    """
    The agent's way to the policy host: TLS (C{creator}) over TCP to the
    address C{resolve} chose, or over Twisted's C{HostnameEndpoint}.
    Refuses any other URL (there is no other: redirects are not followed).
    """

    def __init__(self, reactor, host: str, port: int, resolve: Resolve | None, creator,
                 timeout: float) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.resolve = resolve
        self.creator = creator
        self.timeout = timeout
        self.tried: list[str] = []

    def endpointForURI(self, uri) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii", "replace").lower()
        if uri.scheme != b"https" or host != self.host:
            raise error.SchemeNotSupported(f"only https://{self.host}/ is fetched here")
        if self.resolve is None:
            tcp = HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        else:
            tcp = _ResolvingEndpoint(self)
        return wrapClientTLS(self.creator, tcp)

    def where(self) -> str:
        """
        The server(s) tried, for the words: C{" at mta-sts.x[192.0.2.1]:443"}.
        """
        if not self.tried:
            return ""
        return " at " + ", ".join(f"{self.host}[{a}]:{self.port}" for a in self.tried)


@implementer(IStreamClientEndpoint)
class _ResolvingEndpoint:
    """
    Ask C{resolve} for the addresses, then connect to each in turn until
    one answers.
    """

    def __init__(self, owner: _PolicyEndpoints) -> None:
        self.owner = owner

    def connect(self, factory) -> defer.Deferred:
        owner = self.owner
        d = defer.maybeDeferred(owner.resolve, owner.host)

        def addresses(found) -> defer.Deferred:
            found = [str(a) for a in (found or ())]
            if not found:
                raise error.DNSLookupError(f"{owner.host} has no address")
            return attempt(found, 0, None)

        def attempt(found: list[str], index: int, last: Failure | None):
            if index == len(found):
                return last
            address = found[index]
            owner.tried.append(address)
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = kind(owner.reactor, address, owner.port, timeout=owner.timeout)
            connecting = endpoint.connect(factory)

            def next_one(f: Failure):
                if f.check(defer.CancelledError):
                    return f
                return attempt(found, index + 1, f)
            connecting.addErrback(next_one)
            return connecting

        d.addCallback(addresses)
        return d
