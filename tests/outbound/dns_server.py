"""
A small authoritative DNS server on loopback for tests, answering from a
zone text with dnspython: real DNS on the wire, no system resolver.
"""

from __future__ import annotations

import socket
import threading

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.zone


class ZoneServer:
    """
    Serves C{zone_text} (origin C{origin}) over UDP on 127.0.0.1; names under
    C{servfail} get SERVFAIL, names outside the zone get REFUSED.
    """

    def __init__(self, origin: str, zone_text: str, servfail: tuple[str, ...] = ()) -> None:
        self.zone = dns.zone.from_text(zone_text, origin=origin, relativize=False)
        self.origin = dns.name.from_text(origin)
        self.servfail = {dns.name.from_text(n) for n in servfail}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.queries: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                continue
            query = dns.message.from_wire(data)
            self.sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        question = query.question[0]
        self.queries.append((question.name.to_text(), dns.rdatatype.to_text(question.rdtype)))
        if question.name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
            return response
        if not question.name.is_subdomain(self.origin):
            response.set_rcode(dns.rcode.REFUSED)
            return response
        response.flags |= dns.flags.AA
        node = self.zone.get_node(question.name)
        if node is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        rdataset = node.get_rdataset(question.rdclass, question.rdtype)
        if rdataset is not None:
            response.answer.append(dns.rrset.from_rdata_list(
                question.name, rdataset.ttl, list(rdataset)))
        return response
