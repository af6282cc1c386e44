"""
DNSSEC-aware lookups for DANE (RFC 7672): the records of a name with
whether a validating resolver vouched for them.

We do not validate signatures ourselves.  We ask the configured resolver
with EDNS and the DO bit (and AD set in the query, RFC 6840 5.7) and read
its answer:

  - the AD bit says the answer was validated; it is believed only when
    every configured nameserver is on loopback or in the admin's list of
    trusted validating resolvers (anyone on the path can set AD on a
    packet from elsewhere, RFC 4035 4.9.3, RFC 7672 2.1.1).  The stub
    resolver asks whichever server answers, and a negative answer does
    not say which one did, so one untrusted server makes every answer
    untrusted;
  - SERVFAIL from a trusted resolver is I{bogus} (validation failed) when
    the resolver says so with an Extended DNS Error (RFC 8914: DNSSEC
    Bogus, Signature Expired, DNSKEY Missing, ...).  With no EDE, or an
    ambiguous one (Other, Cached Error), the same question is asked again
    with checking disabled (CD): an answer then means the data is there
    and only validation failed (bogus); another SERVFAIL means the
    failure is elsewhere (an I{error}).  An EDE naming another cause
    (No Reachable Authority, Network Error, ...) is an error.

Every lookup gives a L{DNSResult} with one status:

  - C{secure}: records, validated (AD from a trusted resolver);
  - C{insecure}: records, not validated (an unsigned zone, or AD not
    believed);
  - C{bogus}: validation failed;
  - C{nxdomain}, C{nodata}: no such name, no such records; C{secure} says
    whether the denial was validated;
  - C{error}: anything else (timeout, REFUSED, SERVFAIL for another
    reason); C{reason} says what.

CNAMEs: the resolver follows them and returns the chain in one answer,
under one AD bit, which it sets only when every RRset of the answer is
authentic (RFC 4035 3.2.3).  So C{secure} on an aliased answer means every
step of the chain and the final records were validated (RFC 7672 2.2.2),
and C{canonical_name} is the CNAME-expanded name.

Blocking, like L{twisted_mta.outbound.mx}: call it through the I/O thread
pool.  The resolver never reads /etc/resolv.conf (C{configure=False}).
"""

from __future__ import annotations

import ipaddress
import time
from typing import Iterable, Sequence

import attrs

from twisted_mta import nodoh  # noqa: F401  (before any dns module)

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.resolver

SECURE = "secure"
INSECURE = "insecure"
BOGUS = "bogus"
NXDOMAIN = "nxdomain"
NODATA = "nodata"
ERROR = "error"
STATUSES = (SECURE, INSECURE, BOGUS, NXDOMAIN, NODATA, ERROR)

# What a TLSA lookup means for DANE (L{DNSResult.dane}).
DANE_RECORDS = "records"  # a secure TLSA RRset: DANE applies
DANE_NONE = "none"  # secure denial, or an insecure answer: DANE not in use
DANE_DEFER = "defer"  # bogus or failed: the delivery must wait

EDNS_PAYLOAD = 1232

# Extended DNS Errors (RFC 8914) that say DNSSEC validation failed.
DNSSEC_EDE = frozenset({
    1,  # Unsupported DNSKEY Algorithm
    2,  # Unsupported DS Digest Type
    5,  # DNSSEC Indeterminate
    6,  # DNSSEC Bogus
    7,  # Signature Expired
    8,  # Signature Not Yet Valid
    9,  # DNSKEY Missing
    10,  # RRSIGs Missing
    11,  # No Zone Key Bit Set
    12,  # NSEC Missing
    25,  # Signature Expired before Valid
    27,  # Unsupported NSEC3 Iterations Value
})
# EDEs that name no cause: the CD check decides.
AMBIGUOUS_EDE = frozenset({0, 13})  # Other, Cached Error


@attrs.frozen
class DNSResult:
    """
    The answer to one question.  C{name} is the name asked (lower case,
    no final dot), C{canonical_name} the name the records belong to after
    CNAMEs (the same when there is none), C{records} the final RRset's
    rdata (dnspython objects), C{rcode} the resolver's (C{None} when none
    answered), C{ede} the Extended DNS Errors as C{(code, text)}, and
    C{reason} words for a failure or a status that needs explaining.
    """

    name: str
    rdtype: str
    status: str
    secure: bool = False
    records: tuple = ()
    canonical_name: str = ""
    rcode: str | None = None
    ede: tuple[tuple[int, str], ...] = ()
    reason: str = ""

    @property
    def aliased(self) -> bool:
        return bool(self.canonical_name) and self.canonical_name != self.name

    @property
    def found(self) -> bool:
        """Records came back (secure or insecure)."""
        return self.status in (SECURE, INSECURE)

    @property
    def secure_denial(self) -> bool:
        """A validated NXDOMAIN or NODATA."""
        return self.secure and self.status in (NXDOMAIN, NODATA)

    @property
    def dane(self) -> str:
        """
        For a TLSA lookup: C{"records"} for a secure RRset (DANE applies);
        C{"none"} for a secure NXDOMAIN or NODATA, or an insecure answer
        (RFC 6698 4.1, RFC 7672 2.2: insecure TLSA records are not used);
        C{"defer"} for bogus or failed lookups (RFC 7672 2.2: the delivery
        waits, never falls back).
        """
        if self.status == SECURE:
            return DANE_RECORDS
        if self.status in (INSECURE, NXDOMAIN, NODATA):
            return DANE_NONE
        return DANE_DEFER

    def record_texts(self) -> tuple[str, ...]:
        return tuple(r.to_text() for r in self.records)

    def describe(self) -> str:
        """One line for a log or C{tls explain}."""
        via = f" (via CNAME {self.canonical_name})" if self.aliased else ""
        if self.found:
            words = f"{self.status}{via}: {', '.join(self.record_texts())}"
        elif self.status in (NXDOMAIN, NODATA):
            words = f"{self.status}{via}, {'secure' if self.secure else 'not validated'}"
        else:
            words = self.status
        if self.reason:
            words += f" ({self.reason})"
        return f"{self.name} {self.rdtype}: {words}"


@attrs.frozen
class AddressResult:
    """
    The A and AAAA records of C{host} together: C{status} and C{secure}
    as for one lookup (secure only when both answers were validated),
    C{addresses} IPv4 first, and the two lookups themselves.
    """

    host: str
    status: str
    secure: bool
    addresses: tuple[str, ...]
    canonical_name: str
    reason: str
    a: DNSResult
    aaaa: DNSResult

    @property
    def aliased(self) -> bool:
        return self.canonical_name != self.host


@attrs.frozen
class Validation:
    """
    Whether the resolver validates (true as a boolean only when it does),
    and why, in words.
    """

    ok: bool
    reason: str

    def __bool__(self) -> bool:
        return self.ok


# -- the resolver ---------------------------------------------------------------------


def split_server(server: str) -> tuple[str, int]:
    """
    C{"host"}, C{"host:port"} or C{"[v6]:port"} as C{(host, port)}.
    """
    if server.startswith("["):
        host, _, port = server[1:].partition("]")
        return host, int(port.lstrip(":") or 53)
    if server.count(":") == 1:
        host, port = server.split(":")
        return host, int(port)
    return server, 53


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(split_server(text)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_trusted(server: str, trusted: Iterable[str] = (), trust_loopback: bool = True) -> bool:
    """
    Whether the AD bit of answers from C{server} (an address with an
    optional port) is believed: it is on loopback (unless
    C{trust_loopback} is false), or its address is in C{trusted} (the
    admin's list of validating resolvers reached over a network they
    trust).
    """
    address = _ip(server)
    if address is None:
        return False
    if trust_loopback and address.is_loopback:
        return True
    return any(address == _ip(t) for t in trusted)


class CappedCache(dns.resolver.Cache):
    """
    dnspython's cache (answers and denials, each for its TTL), keeping none
    longer than C{max_ttl} seconds: the connections of a burst to many
    domains reuse their look-ups, and a changed record is seen soon.
    Failures (SERVFAIL, timeouts) are never cached.
    """

    def __init__(self, max_ttl: float) -> None:
        super().__init__()
        self.max_ttl = max_ttl

    def put(self, key, value) -> None:
        value.expiration = min(value.expiration, time.time() + self.max_ttl)
        super().put(key, value)


def cache_for(max_ttl: float) -> CappedCache | None:
    """The cache for C{[dns] cache_ttl} seconds; None for 0 (no cache)."""
    return CappedCache(max_ttl) if max_ttl > 0 else None


class DNSSECResolver:
    """
    A dnspython stub resolver (C{configure=False}) for C{nameservers}
    (C{"host"} or C{"host:port"}), asking with EDNS0, the DO bit and AD,
    and what it takes to judge its answers.  C{trusted} lists the
    addresses, besides loopback, whose AD bit is believed.
    """

    def __init__(self, nameservers: Sequence[str], timeout: float = 10.0,
                 trusted: Iterable[str] = (), trust_loopback: bool = True,
                 cache_ttl: float = 0.0) -> None:
        if not nameservers:
            raise ValueError("DNSSECResolver needs at least one nameserver")
        servers = [split_server(s) for s in nameservers]
        self.servers = tuple(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in servers)
        trusted = tuple(trusted)
        self.untrusted = tuple(s for s in self.servers
                               if not is_trusted(s, trusted, trust_loopback))
        self.timeout = timeout
        self.resolver = dns.resolver.Resolver(configure=False)
        nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
        self.resolver.nameservers = nameservers
        # dnspython names a server "Do53:HOST@PORT" in its error list
        self._servers = {str(ns): server for ns, server in zip(nameservers, servers)}
        self.resolver.use_edns(0, dns.flags.DO, EDNS_PAYLOAD)
        self.resolver.flags = dns.flags.RD | dns.flags.AD
        self.resolver.lifetime = timeout
        self.resolver.timeout = min(timeout, 5.0)
        self.resolver.cache = cache_for(cache_ttl)

    @property
    def trusted(self) -> bool:
        """Whether the AD bit is believed (every nameserver is trusted)."""
        return not self.untrusted

    def lookup(self, name: str, rdtype: str) -> DNSResult:
        """
        The L{DNSResult} for C{name} and C{rdtype} (C{"MX"}, C{"TLSA"}, ...).
        """
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as e:
            return DNSResult(name.lower().rstrip("."), rdtype, ERROR,
                             reason=f"not a valid name: {e}")
        shown = _text(qname)
        try:
            answer = self.resolver.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as e:
            response = next(iter(e.responses().values()), None)
            return self._from_response(shown, rdtype, NXDOMAIN, response, qname)
        except dns.resolver.NoNameservers as e:
            return self._from_failures(qname, shown, rdtype, e.kwargs.get("errors") or [])
        except dns.exception.Timeout:
            return DNSResult(shown, rdtype, ERROR,
                             reason=f"no answer from {', '.join(self.servers)} "
                                    f"within {self.timeout:g}s")
        except dns.exception.DNSException as e:
            return DNSResult(shown, rdtype, ERROR, reason=str(e) or type(e).__name__)
        status = NODATA if answer.rrset is None else None
        return self._from_response(shown, rdtype, status, answer.response, qname)

    # -- reading answers ------------------------------------------------------------

    def _ad(self, response: dns.message.Message) -> bool:
        return self.trusted and bool(response.flags & dns.flags.AD)

    def _from_response(self, shown: str, rdtype: str, status: str | None,
                       response: dns.message.Message | None, qname: dns.name.Name) -> DNSResult:
        if response is None:  # pragma: no cover - dnspython always keeps it
            return DNSResult(shown, rdtype, status or ERROR, reason="no response kept")
        canonical, records = qname, ()
        try:
            chain = response.resolve_chaining()
        except dns.exception.DNSException:
            chain = None
        if chain is not None:
            canonical = chain.canonical_name
            if chain.answer is not None:
                records = tuple(chain.answer)
        secure = self._ad(response)
        if status is None:
            status = SECURE if secure else INSECURE
        reason = ""
        if response.flags & dns.flags.AD and not self.trusted:
            reason = f"AD bit ignored: {', '.join(self.untrusted)} not trusted"
        return DNSResult(shown, rdtype, status, secure, records, _text(canonical),
                         dns.rcode.to_text(response.rcode()), _ede(response), reason)

    def _from_failures(self, qname: dns.name.Name, shown: str, rdtype: str,
                       errors: list) -> DNSResult:
        """
        Every server failed: a SERVFAIL from a trusted server may be bogus;
        anything else is an error, in words.
        """
        words = []
        servfails = []
        for error in errors:
            problem, response = error[3], error[4]
            server, port = self._servers.get(str(error[0]), (str(error[0]), error[2]))
            where = f"[{server}]:{port}" if ":" in server else f"{server}:{port}"
            if response is not None and response.rcode() == dns.rcode.SERVFAIL:
                servfails.append((server, port, where, response))
            elif response is not None:
                words.append(f"{where} answered {dns.rcode.to_text(response.rcode())}")
            else:
                words.append(f"{where}: {problem}")
        results = [self._servfail(qname, shown, rdtype, *s) for s in servfails]
        for result in results:
            if result.status == BOGUS:
                return result
        if results:
            first = results[0]
            if words:
                first = attrs.evolve(first, reason=f"{first.reason}; {'; '.join(words)}")
            return first
        return DNSResult(shown, rdtype, ERROR,
                         reason="; ".join(words) or "no nameserver answered")

    def _servfail(self, qname: dns.name.Name, shown: str, rdtype: str, server: str, port: int,
                  where: str, response: dns.message.Message) -> DNSResult:
        ede = _ede(response)

        def result(status: str, reason: str) -> DNSResult:
            return DNSResult(shown, rdtype, status, rcode="SERVFAIL", ede=ede, reason=reason)

        if not self.trusted:
            return result(ERROR, _with_ede(f"{where} answered SERVFAIL (not a trusted validating "
                                           "resolver, so not judged bogus)", ede))
        codes = {code for code, _ in ede}
        if codes & DNSSEC_EDE:
            return result(BOGUS, _with_ede(f"validation failed at {where}", ede))
        if codes - AMBIGUOUS_EDE:
            return result(ERROR, _with_ede(f"{where} answered SERVFAIL", ede))
        # No EDE to go by: ask again with checking disabled.
        query = dns.message.make_query(qname, rdtype, use_edns=0, want_dnssec=True,
                                       payload=EDNS_PAYLOAD)
        query.flags |= dns.flags.CD
        try:
            checked, _ = dns.query.udp_with_fallback(query, server, timeout=min(self.timeout, 5.0),
                                                     port=port)
        except (OSError, ValueError, dns.exception.DNSException) as e:
            return result(ERROR, _with_ede(
                f"{where} answered SERVFAIL, and the same query with checking disabled failed "
                f"({e or type(e).__name__})", ede))
        rcode = dns.rcode.to_text(checked.rcode())
        if rcode in ("NOERROR", "NXDOMAIN"):
            return result(BOGUS, _with_ede(
                f"validation failed at {where}: SERVFAIL, but {rcode} with checking disabled", ede))
        return result(ERROR, _with_ede(
            f"{where} answered SERVFAIL, and {rcode} with checking disabled (not a validation "
            "failure)", ede))


def _text(name: dns.name.Name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _ede(response: dns.message.Message) -> tuple[tuple[int, str], ...]:
    return tuple((int(option.code), option.text or "") for option in response.extended_errors())


# RFC 8914 4 (and the IANA registry): the names of the codes.
EDE_NAMES = {
    0: "Other Error", 1: "Unsupported DNSKEY Algorithm", 2: "Unsupported DS Digest Type",
    3: "Stale Answer", 4: "Forged Answer", 5: "DNSSEC Indeterminate", 6: "DNSSEC Bogus",
    7: "Signature Expired", 8: "Signature Not Yet Valid", 9: "DNSKEY Missing",
    10: "RRSIGs Missing", 11: "No Zone Key Bit Set", 12: "NSEC Missing", 13: "Cached Error",
    14: "Not Ready", 15: "Blocked", 16: "Censored", 17: "Filtered", 18: "Prohibited",
    19: "Stale NXDomain Answer", 20: "Not Authoritative", 21: "Not Supported",
    22: "No Reachable Authority", 23: "Network Error", 24: "Invalid Data",
    25: "Signature Expired before Valid", 26: "Too Early",
    27: "Unsupported NSEC3 Iterations Value", 28: "Unable to conform to policy",
    29: "Synthesized", 30: "Invalid Query Type",
}


def ede_words(ede: tuple[tuple[int, str], ...]) -> str:
    """C{"EDE 6 (DNSSEC Bogus): the resolver's text"}, one per error."""
    return "; ".join(f"EDE {code} ({EDE_NAMES.get(code, 'unassigned')})"
                     + (f": {text}" if text else "") for code, text in ede)


def _with_ede(words: str, ede: tuple[tuple[int, str], ...]) -> str:
    return f"{words}: {ede_words(ede)}" if ede else words


# -- what DANE asks --------------------------------------------------------------------


def make_resolver(nameservers: Sequence[str], timeout: float = 10.0,
                  trusted: Iterable[str] = (), cache_ttl: float = 0.0) -> DNSSECResolver:
    """
    The resolver for DANE: C{nameservers} as in C{[dns] nameservers},
    C{trusted} the addresses (besides loopback) whose AD bit is believed,
    C{cache_ttl} as C{[dns] cache_ttl}.
    """
    return DNSSECResolver(nameservers, timeout, trusted, cache_ttl=cache_ttl)


def mx_secure(resolver: DNSSECResolver, domain: str) -> DNSResult:
    """The MX RRset of C{domain} with its DNSSEC status."""
    return resolver.lookup(domain, "MX")


def addresses_secure(resolver: DNSSECResolver, host: str) -> AddressResult:
    """
    The A and AAAA records of C{host}: secure only when both answers were
    validated (a validated NODATA for one of them counts).
    """
    a = resolver.lookup(host, "A")
    aaaa = resolver.lookup(host, "AAAA")
    parts = (a, aaaa)
    addresses = tuple(r.address for part in parts if part.found for r in part.records)
    canonical = next((p.canonical_name for p in parts if p.found), a.canonical_name or a.name)
    secure = all(p.secure for p in parts)
    failed = [p for p in parts if p.status == BOGUS] or [p for p in parts if p.status == ERROR]
    if failed:
        status, secure = failed[0].status, False
        reason = "; ".join(f"{p.rdtype}: {p.reason}" for p in failed if p.reason)
    elif addresses:
        status = SECURE if secure else INSECURE
        reason = "; ".join(f"{p.rdtype}: {p.reason}" for p in parts if p.reason)
    else:
        status = NXDOMAIN if all(p.status == NXDOMAIN for p in parts) else NODATA
        reason = ""
    return AddressResult(a.name, status, secure, addresses, canonical, reason, a, aaaa)


def tlsa_name(host: str, port: int = 25, protocol: str = "tcp") -> str:
    """C{_25._tcp.mx.example.org}: where the TLSA records of a service are."""
    return f"_{port}._{protocol}.{host.rstrip('.')}"


def tlsa(resolver: DNSSECResolver, host: str, port: int = 25) -> DNSResult:
    """
    The TLSA RRset of C{host}'s C{port} over TCP.  L{DNSResult.dane} says
    what it means: records, none (DANE not in use) or defer.
    """
    return resolver.lookup(tlsa_name(host, port), "TLSA")


def tlsa_base_domains(addresses: AddressResult) -> tuple[str, ...]:
    """
    The names to look TLSA records up under, in order (RFC 7672 2.2.2):
    when the host's addresses came securely through CNAMEs, the
    CNAME-expanded name first, then the original name if the first has no
    TLSA records (secure NXDOMAIN/NODATA); otherwise only the original
    name.
    """
    if addresses.secure and addresses.aliased:
        return (addresses.canonical_name, addresses.host)
    return (addresses.host,)


def validates(resolver: DNSSECResolver, secure_name: str, bogus_name: str,
              rdtype: str = "A") -> Validation:
    """
    Whether C{resolver} validates: its servers are trusted, C{secure_name}
    comes back validated (AD, with records or a validated denial), and
    C{bogus_name} fails validation (SERVFAIL known as bogus: by an EDE, or
    because the answer comes with checking disabled).  When not, DANE must
    be off; C{reason} says why in one line.
    """
    servers = ", ".join(resolver.servers)
    if not resolver.trusted:
        return Validation(False, f"the resolver {', '.join(resolver.untrusted)} is neither on "
                                 "loopback nor listed as a trusted validating resolver: its AD "
                                 "bit is not believed")
    good = resolver.lookup(secure_name, rdtype)
    if good.status in (BOGUS, ERROR):
        return Validation(False, f"the known-secure name {good.name} failed at {servers}: "
                                 f"{good.status} ({good.reason})")
    if not good.secure:
        return Validation(False, f"{servers} does not validate: the known-secure name "
                                 f"{good.name} came back without the AD bit ({good.status})")
    bad = resolver.lookup(bogus_name, rdtype)
    if bad.status != BOGUS:
        detail = f"{bad.status}" + (f": {bad.reason}" if bad.reason else "")
        if bad.status == ERROR:
            why = f"the known-bogus name {bad.name} failed, but not as bogus ({detail})"
        else:
            why = (f"{servers} does not validate: the known-bogus name {bad.name} came back "
                   f"{detail}, not SERVFAIL")
        return Validation(False, why)
    return Validation(True, f"{servers} validates: {good.name} is secure and {bad.name} "
                            f"is bogus ({bad.reason})")
