"""
What a destination publishes about its TLS, looked up for a delivery
attempt: the DNSSEC status of its MX and address records and the TLSA
records of each MX host (DANE, RFC 7672), and the domain's MTA-STS policy
(RFC 8461).  The policy engine (L{twisted_mta.tls.engine}) turns these
facts into a policy, after any explicit entry of the configuration.

DANE is believed only through a validating resolver: at start-up
L{Published.start} checks that the configured resolver validates (a
known-secure name comes back with AD, a known-bogus one as SERVFAIL) and
that its AD bit may be trusted (loopback, or listed in C{[dns]
trusted_resolvers}).  When it does not, DANE stays off and one warning
says why; nothing is faked.

The DNS look-ups are blocking (dnspython) and go through C{run_blocking};
the MTA-STS cache fetches policies in the background, so one domain's
fetch never holds up another's delivery.
"""

from __future__ import annotations

from typing import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta.tls import dnssec
from twisted_mta.tls.dane import TLSARecord

log = Logger()

# Host.dane: what DANE says about one MX host.
RECORDS = "records"  # a secure TLSA RRset: DANE applies
NO_DANE = "none"  # no TLSA records, or not secure: DANE does not apply
DEFER = "defer"  # the TLSA (or address) answer is bogus or failed: wait
OFF = "off"  # DANE is off (configuration, or no validating resolver)


@attrs.frozen
class DaneState:
    """
    Whether DANE is in use, and why, in one line (without "DANE is on/off").
    """

    enabled: bool
    reason: str


@attrs.frozen
class MXFacts:
    """
    The DNSSEC-aware MX answer of a domain (None when DANE is off, and the
    MX records came from the ordinary resolver).
    """

    result: dnssec.DNSResult

    @property
    def secure(self) -> bool:
        """
        Whether the MX RRset (or, for an implicit MX, the denial of one) is
        DNSSEC-secure: only then do its hosts' TLSA records count (RFC
        7672 2.2.1).
        """
        return self.result.secure


@attrs.frozen
class Host:
    """
    What one MX host publishes: C{dane} (one of L{RECORDS}, L{NO_DANE},
    L{DEFER}, L{OFF}) and why in words; the DNSSEC answers behind it; the
    TLSA records and the names a DANE-TA certificate may carry (the host
    and, where its addresses came securely through a CNAME, the
    CNAME-expanded name, RFC 7672 2.2.2); for L{DEFER}, the TLS failure
    class (C{dane-lookup-failed} or C{dnssec-bogus}).
    """

    host: str
    port: int
    dane: str
    why: str
    addresses: dnssec.AddressResult | None = None
    tlsa: dnssec.DNSResult | None = None
    records: tuple[TLSARecord, ...] = ()
    names: tuple[str, ...] = ()
    failure_kind: str | None = None

    @property
    def tlsa_name(self) -> str:
        return self.tlsa.name if self.tlsa is not None else dnssec.tlsa_name(self.host, self.port)


@attrs.frozen
class Facts:
    """
    Everything the policy engine weighs for one MX host of a domain: the
    domain's MX answer and MTA-STS policy (an L{sts_cache.Lookup}, or None
    when MTA-STS is off), and the host's DANE facts.
    """

    domain: str
    mx: MXFacts | None
    host: Host
    sts: object | None = None  # twisted_mta.tls.sts_cache.Lookup


class Published:
    """
    The look-ups of what destinations publish, for every attempt.

    @param dane_resolver: a L{dnssec.DNSSECResolver}, or None when DANE
        is off by configuration.
    @param check_names: (known-secure, known-bogus) for the start-up check.
    @param sts_cache: an L{sts_cache.PolicyCache}, or None when MTA-STS is
        off.
    """

    def __init__(self, *, run_blocking: Callable, dane_resolver=None,
                 check_names: tuple[str, str] = ("", ""), sts_cache=None,
                 no_resolver: str | None = None) -> None:
        """
        C{no_resolver}: why DANE, on by configuration, has no resolver to
        ask (warned once at start).
        """
        self.run_blocking = run_blocking
        self.dane_resolver = dane_resolver
        self.check_names = check_names
        self.sts_cache = sts_cache
        self.no_resolver = no_resolver
        if no_resolver is not None:
            self.dane_state = DaneState(False, no_resolver)
        elif dane_resolver is None:
            self.dane_state = DaneState(False, "[outbound.tls] dane = false")
        else:
            self.dane_state = DaneState(False, "the check that the resolver validates has "
                                               "not finished")
        self._ready: defer.Deferred | None = None

    # -- start-up -------------------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """
        Check the resolver (when DANE is on by configuration); fires when
        the state is known.  Never fails: a check that cannot complete
        leaves DANE off, with one warning.
        """
        if self._ready is None:
            if self.dane_resolver is None:
                if self.no_resolver is not None:
                    log.warn("tls: DANE is off: {reason}", reason=self.no_resolver,
                             event="tls.dane-off")
                self._ready = defer.succeed(self.dane_state)
            else:
                secure, bogus = self.check_names
                d = self.run_blocking(dnssec.validates, self.dane_resolver, secure, bogus)
                d.addCallbacks(self._checked, self._check_failed)
                self._ready = d
        return self._ready

    def _checked(self, validation: dnssec.Validation) -> DaneState:
        if validation:
            self.dane_state = DaneState(True, validation.reason)
            log.info("tls: DANE is on: {reason}", reason=validation.reason,
                     event="tls.dane-on")
        else:
            self.dane_state = DaneState(False, validation.reason)
            log.warn("tls: DANE is off: {reason}", reason=validation.reason,
                     event="tls.dane-off")
        return self.dane_state

    def _check_failed(self, failure) -> DaneState:
        why = f"the check that the resolver validates failed: {failure.getErrorMessage()}"
        self.dane_state = DaneState(False, why)
        log.warn("tls: DANE is off: {reason}", reason=why, event="tls.dane-off")
        return self.dane_state

    @defer.inlineCallbacks
    def dane_enabled(self):
        """
        Fires with whether DANE is in use (after the start-up check).
        """
        yield self.start()  # (its result goes to the first waiter: read the state)
        return self.dane_state.enabled

    # -- look-ups ---------------------------------------------------------------------

    def mx(self, domain: str) -> defer.Deferred:
        """
        The domain's MX answer with its DNSSEC status (an L{MXFacts}).
        """
        d = self.run_blocking(dnssec.mx_secure, self.dane_resolver, domain)
        d.addCallback(MXFacts)
        return d

    def host(self, host: str, port: int, mx: MXFacts) -> defer.Deferred:
        """
        The L{Host} facts of C{host}: its addresses, DNSSEC-aware, and,
        when both the MX answer and the addresses are secure, its TLSA
        records (under the CNAME-expanded name first).
        """
        return self.run_blocking(self._host, host, port, mx)

    def _host(self, host: str, port: int, mx: MXFacts) -> Host:
        resolver = self.dane_resolver
        addresses = dnssec.addresses_secure(resolver, host)
        if not mx.secure:  # (bogus addresses are then just unusable: no address)
            return Host(host, port, NO_DANE, "the MX records are not DNSSEC-signed, so the "
                        "hosts' TLSA records do not count (RFC 7672 2.2.1)", addresses)
        if addresses.status == dnssec.BOGUS:
            return Host(host, port, DEFER, f"the addresses of {host} failed DNSSEC validation "
                        f"({addresses.reason})", addresses, failure_kind="dnssec-bogus")
        if not addresses.secure:
            return Host(host, port, NO_DANE, f"the addresses of {host} are not "
                        "DNSSEC-signed, so its TLSA records do not count", addresses)
        names = dnssec.tlsa_base_domains(addresses)
        result = None
        for base in names:
            result = dnssec.tlsa(resolver, base, port)
            if result.dane != dnssec.DANE_NONE:
                break
        assert result is not None
        reference = tuple(dict.fromkeys(n for n in (addresses.canonical_name, host) if n))
        if result.dane == dnssec.DANE_DEFER:
            kind = "dnssec-bogus" if result.status == dnssec.BOGUS else "dane-lookup-failed"
            why = result.reason or result.status
            return Host(host, port, DEFER, f"the TLSA lookup {result.name} failed ({why})",
                        addresses, result, names=reference, failure_kind=kind)
        if result.dane == dnssec.DANE_NONE:
            what = "not DNSSEC-signed" if result.status == dnssec.INSECURE else \
                "none (securely denied)"
            return Host(host, port, NO_DANE, f"TLSA records at {result.name}: {what}",
                        addresses, result, names=reference)
        records = []
        for rdata in result.records:
            try:
                records.append(TLSARecord.from_wire(rdata.to_wire()))
            except ValueError:
                continue  # malformed: not usable (RFC 7672 3.1.3 treats it like unusable)
        return Host(host, port, RECORDS, f"{len(records)} TLSA record(s) at {result.name}, "
                    "DNSSEC-secure", addresses, result, tuple(records), reference)

    def sts(self, domain: str) -> defer.Deferred:
        """
        The domain's MTA-STS answer (an L{sts_cache.Lookup}); None when
        MTA-STS is off.  Waits for a fetch only when there is no cached
        policy in force (bounded by the fetch timeout).
        """
        if self.sts_cache is None:
            return defer.succeed(None)
        return self.sts_cache.policy_for(domain)
