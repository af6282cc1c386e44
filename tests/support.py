"""
Shared, verified test helpers: configurations, a server under a fake
transport, and a fake TLS transport.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport, ITLSTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides, implementer

from twisted_mta.config import Config, parse_config
from twisted_mta.delivery.local import OnReceipt
from twisted_mta.inbound.milter import MilterStage
from twisted_mta.inbound.server import InboundFactory
from twisted_mta.queue.spool import Spool, run_inline


# For every configuration a test writes: DNS goes to a closed port on
# loopback (9, discard), so a lookup fails at once and no query ever
# leaves the machine through the system resolver.
LOOPBACK_DNS = '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = "1s"\n'
# The same as a parsed table, for configurations built from dicts.
LOOPBACK_DNS_TABLE = {"nameservers": ["127.0.0.1:9"], "timeout": "1s"}


def make_config(base: str, **sections: dict[str, Any]) -> Config:
    """
    A valid configuration rooted at C{base}; C{sections} override tables.
    """
    raw: dict[str, Any] = {
        "server": {"hostname": "mx.example.test", "spool": "spool"},
        "listeners": [{"role": "mx", "endpoint": "tcp:0:interface=127.0.0.1"}],
        "local": {
            "domains": ["example.test", "example.org"],
            "users": ["alice", "bob", "postmaster"],
            "mailbox": "mail/{user}/Maildir",
            "aliases": {"info": ["alice", "bob"], "sales@example.org": "bob",
                        "loop1": "loop2", "loop2": "loop1"},
        },
        "dns": dict(LOOPBACK_DNS_TABLE),  # never the system resolver
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **value}
        else:
            raw[name] = value
    os.makedirs(base, exist_ok=True)
    return parse_config(raw, os.path.join(base, "test.toml"))


class FakeConnection:
    """
    Stands in for the pyOpenSSL connection behind a TLS transport.
    """

    def get_protocol_version_name(self) -> str:
        return "TLSv1.3"

    def get_cipher_name(self) -> str:
        return "TLS_AES_256_GCM_SHA384"

    def get_cipher_bits(self) -> int:
        return 256


@implementer(ITLSTransport)
class FakeTLSTransport(StringTransport):
    """
    A StringTransport that can start (pretend) TLS.
    """

    tls_context = None

    def startTLS(self, ctx, normal=True) -> None:
        self.tls_context = ctx
        directlyProvides(self, ITLSTransport, ISSLTransport)

    def getHandle(self) -> FakeConnection:
        return FakeConnection()


class ServerHarness:
    """
    One inbound session on a fake transport, a real spool on disk, a fake
    clock; L{send} returns the reply lines the input produced.
    """

    def __init__(self, testcase, role: str = "mx", peer: str = "192.0.2.10",
                 tls_context: Any = None, transport_factory=StringTransport,
                 users: Any = None, milter_connect: Any = None, on_receipt: bool = False,
                 **sections: dict[str, Any]) -> None:
        base = testcase.mktemp()
        self.config = make_config(base, **sections)
        self.spool = Spool(self.config.spool)
        self.spool.lock()
        testcase.addCleanup(self.spool.unlock)
        self.queued: list = []
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        milters = None
        if milter_connect is not None:  # the first listener's milters, reached through it
            milters = MilterStage([(n, self.config.milter(n))
                                   for n in self.config.listeners[0].milters],
                                  self.clock, milter_connect, run_inline)
        self.delivered: list = []  # (listener, recipients, latency): delivered on receipt
        receipt = OnReceipt.from_settings(self.config.local, self.config.hostname) \
            if on_receipt else None
        self.factory = InboundFactory(self.config, role, self.spool, self.clock,
                                      on_queued=self.queued.append, tls_context=tls_context,
                                      users=users, milters=milters, on_receipt=receipt,
                                      on_delivered=lambda *counted: self.delivered.append(
                                          counted))
        self.transport_factory = transport_factory
        self.peer = peer
        self.protocol, self.transport = self.connect()
        self.greeting = self.read()

    def connect(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", self.peer, 40000))
        transport = self.transport_factory(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 25),
            peerAddress=IPv4Address("TCP", self.peer, 40000))
        proto.makeConnection(transport)
        return proto, transport

    def read(self, transport=None) -> list[str]:
        transport = transport or self.transport
        data = transport.value()
        transport.clear()
        return [line for line in data.decode("utf-8", "replace").split("\r\n") if line]

    def send(self, data: bytes | str) -> list[str]:
        if isinstance(data, str):
            data = data.encode()
        self.protocol.dataReceived(data)
        return self.read()

    def ehlo(self) -> list[str]:
        return self.send(b"EHLO client.example\r\n")

    def start_transaction(self, rcpts=("alice@example.test",), sender="s@remote.test"):
        self.ehlo()
        assert self.send(f"MAIL FROM:<{sender}>\r\n") == ["250 2.1.0 Sender ok"]
        for r in rcpts:
            assert self.send(f"RCPT TO:<{r}>\r\n") == ["250 2.1.5 Recipient ok"], r
        assert self.send(b"DATA\r\n") == ["354 End data with <CR><LF>.<CR><LF>"]

    def queued_messages(self) -> list[bytes]:
        return [self.spool.read_message(env.queue_id) for env in self.queued]

    def spool_entries(self) -> list[str]:
        names = []
        for d in ("new", "cur", "envelopes", "tmp"):
            names += os.listdir(os.path.join(self.spool.path, d))
        return names


def queued(manager) -> list[str]:
    """Every entry a queue manager knows of, idle or not (sorted queue ids)."""
    return sorted([*manager.entries, *(entry.queue_id for entry in manager.idle)])
