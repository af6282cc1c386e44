"""
A TLS report collector (RFC 8460 §5.4) for the interop tests: a Twisted
web server with HTTPS on one loopback address, run as its own process::

    python -m tests.interop.tlsrpt_collector ADDRESS PORT PEM OUTDIR [POLICY]

PEM holds the key and the certificate chain (trustme).  Every POST is
answered 200 and kept as C{OUTDIR/N.json}: the path, the Content-Type and
the body (base64).  A GET of C{/.well-known/mta-sts.txt} is answered with
the file POLICY (an MTA-STS policy, so one server can also be a domain's
policy host), anything else with 404.  Prints "ready" once it listens.
"""

from __future__ import annotations

import base64
import json
import os
import sys

from twisted.internet import reactor, ssl
from twisted.web import resource, server


class Collector(resource.Resource):
    isLeaf = True

    def __init__(self, outdir: str, policy: str | None) -> None:
        super().__init__()
        self.outdir = outdir
        self.policy = policy
        self.count = 0

    def render_GET(self, request) -> bytes:
        if request.path != b"/.well-known/mta-sts.txt" or self.policy is None:
            request.setResponseCode(404)
            return b"not here\n"
        request.setHeader("content-type", "text/plain")
        with open(self.policy, "rb") as f:
            return f.read()

    def render_POST(self, request) -> bytes:
        self.count += 1
        record = {"path": request.path.decode(),
                  "content_type": (request.getHeader("content-type") or ""),
                  "body": base64.b64encode(request.content.read()).decode()}
        tmp = os.path.join(self.outdir, f".{self.count}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.outdir, f"{self.count}.json"))
        request.setResponseCode(200)
        return b"thanks\n"


def main(address: str, port: str, pem: str, outdir: str, policy: str | None = None) -> None:
    with open(pem, "rb") as f:
        certificate = ssl.PrivateCertificate.loadPEM(f.read())
    site = server.Site(Collector(outdir, policy))
    site.noisy = False
    reactor.listenSSL(int(port), site, certificate.options(), interface=address)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
