"""
Find where mail for a domain goes: MX records (RFC 5321 5.1), null MX
(RFC 7505), implicit MX, and the addresses of each host.

Blocking (dnspython's stub resolver): run through the I/O thread pool.  The
resolver is built from the configuration: with C{[dns] nameservers} it never
reads /etc/resolv.conf (C{configure=False}), so tests and operators can pin
it to a server of their choice.

Every failure is an L{Outcome} with the temporary/permanent decision made
here: NXDOMAIN and null MX are permanent, SERVFAIL and timeouts temporary.
"""

from __future__ import annotations

import random
from typing import Callable

import attrs

from twisted_mta import nodoh  # noqa: F401  (before any dns module)

import dns.exception
import dns.name
import dns.rdatatype
import dns.resolver

from twisted_mta import failures
from twisted_mta.tls.dnssec import (
    BOGUS, ERROR, NODATA, NXDOMAIN, DNSResult, cache_for, split_server,
)
from twisted_mta.model import Outcome


@attrs.frozen
class MXHost:
    preference: int
    name: str  # without the trailing dot, lower-cased


class MXError(Exception):
    """
    The domain has no usable mail exchanger; C{outcome} says why.
    """

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(str(outcome))
        self.outcome = outcome


def make_resolver(nameservers: tuple[str, ...] | None, timeout: float,
                  cache_ttl: float = 0.0) -> dns.resolver.Resolver:
    """
    A resolver for C{nameservers} (C{"host"} or C{"host:port"}), or the
    system's configuration when C{None}; answers cached for at most
    C{cache_ttl} seconds (their TTL when shorter).
    """
    if not nameservers:
        resolver = dns.resolver.Resolver()
    else:
        resolver = dns.resolver.Resolver(configure=False)
        hosts, ports = [], set()
        for server in nameservers:
            host, port = split_server(server)
            hosts.append(host)
            ports.add(port)
        resolver.nameservers = hosts
        resolver.port = ports.pop() if len(ports) == 1 else 53
    resolver.lifetime = timeout
    resolver.timeout = min(timeout, 5.0)
    resolver.cache = cache_for(cache_ttl)
    return resolver


def _temporary(domain: str, why: str) -> MXError:
    return MXError(failures.outcome("dns-temp", domain=domain, why=why))


def lookup_mx(resolver: dns.resolver.Resolver, domain: str,
              shuffle: Callable[[list], None] = random.shuffle) -> list[MXHost]:
    """
    The mail exchangers of C{domain}, most preferred first, equal
    preferences in random order; the domain itself when it has no MX.
    """
    try:
        answer = resolver.resolve(domain, "MX")
    except dns.resolver.NXDOMAIN:
        raise MXError(failures.outcome("dns-nxdomain", domain=domain))
    except dns.resolver.NoAnswer:
        return [MXHost(0, domain.lower().rstrip("."))]  # implicit MX (RFC 5321 5.1)
    except dns.resolver.NoNameservers as e:
        raise _temporary(domain, f"no name server answered: {e}")
    except dns.exception.Timeout:
        raise _temporary(domain, "timeout")
    except dns.exception.DNSException as e:
        raise _temporary(domain, str(e) or type(e).__name__)
    return _ordered(domain, [(r.preference, r.exchange) for r in answer], shuffle)


def from_dnssec(result: DNSResult, domain: str,
                shuffle: Callable[[list], None] = random.shuffle) -> list[MXHost]:
    """
    L{lookup_mx}'s answer from a DNSSEC-aware MX look-up (one look-up
    feeds both the MX rules and DANE): the same rules, and an answer that
    failed validation is a temporary failure (RFC 7672 2.2.1: never used).
    """
    if result.status == BOGUS:
        raise _temporary(domain, f"the MX records failed DNSSEC validation"
                                 f"{f' ({result.reason})' if result.reason else ''}")
    if result.status == ERROR:
        raise _temporary(domain, result.reason or result.rcode or "lookup failed")
    if result.status == NXDOMAIN:
        raise MXError(failures.outcome("dns-nxdomain", domain=domain))
    if result.status == NODATA:
        return [MXHost(0, domain.lower().rstrip("."))]  # implicit MX (RFC 5321 5.1)
    return _ordered(domain, [(r.preference, r.exchange) for r in result.records], shuffle)


def _ordered(domain: str, records: list[tuple[int, dns.name.Name]],
             shuffle: Callable[[list], None]) -> list[MXHost]:
    """
    The MX hosts most preferred first, equal preferences shuffled; a null
    MX (RFC 7505) alone is a permanent failure, beside others ignored.
    """
    if any(exchange == dns.name.root for _, exchange in records):
        if len(records) == 1:
            raise MXError(failures.outcome("null-mx", domain=domain))
        records = [(p, x) for p, x in records if x != dns.name.root]
    by_preference: dict[int, list[MXHost]] = {}
    for preference, exchange in records:
        host = exchange.to_text(omit_final_dot=True).lower()
        by_preference.setdefault(preference, []).append(MXHost(preference, host))
    result = []
    for preference in sorted(by_preference):
        group = by_preference[preference]
        shuffle(group)
        result.extend(group)
    return result


def lookup_addresses(resolver: dns.resolver.Resolver, host: str) -> list[str]:
    """
    The IPv4 and IPv6 addresses of C{host} (IPv4 first); an empty list
    when it has none.  Temporary DNS failures raise L{MXError}.
    """
    addresses: list[str] = []
    for rdtype in ("A", "AAAA"):
        try:
            addresses.extend(r.address for r in resolver.resolve(host, rdtype))
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            continue
        except dns.exception.Timeout:
            raise _temporary(host, "timeout")
        except dns.exception.DNSException as e:
            raise _temporary(host, str(e) or type(e).__name__)
    return addresses
