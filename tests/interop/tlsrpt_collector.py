"""
A TLS report collector (RFC 8460 §5.4) for the interop tests: a Twisted
web server with HTTPS on one loopback address, run as its own process::

    python -m tests.interop.tlsrpt_collector ADDRESS PORT PEM OUTDIR

PEM holds the key and the certificate chain (trustme).  Every POST is
answered 200 and kept as C{OUTDIR/N.json}: the path, the Content-Type and
the body (base64).  Prints "ready" once it listens.
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

    def __init__(self, outdir: str) -> None:
        super().__init__()
        self.outdir = outdir
        self.count = 0

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


def main(address: str, port: str, pem: str, outdir: str) -> None:
    with open(pem, "rb") as f:
        certificate = ssl.PrivateCertificate.loadPEM(f.read())
    site = server.Site(Collector(outdir))
    site.noisy = False
    reactor.listenSSL(int(port), site, certificate.options(), interface=address)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(*sys.argv[1:])
