"""
TLS policies: what a delivery to one destination requires, the built-in
policies (none, opportunistic, relaxed, strict), and the policy map that
picks one per destination and says why.

What each built-in accepts, and why (docs/tls.md has the long version):

 - C{opportunistic} takes whatever encryption the peer can do, down to
   TLS 1.0 and OpenSSL security level 0 (old ciphers, even anonymous ones):
   weak encryption still beats the cleartext it replaces.
 - C{relaxed} and C{strict} keep a floor: TLS 1.2 and OpenSSL's default
   ciphers.  C{relaxed} encrypts without checking the certificate; C{strict}
   requires a chain to a trusted root and the MX host's name in it.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import attrs
from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_mta.config import TLSPolicyEntry as PolicyEntry  # one line of the policy map
from twisted_mta.interfaces import ITLSPolicy

LEGACY_CIPHERS = "ALL:@SECLEVEL=0"


@attrs.frozen
class Destination:
    domain: str  # the recipient domain ("" for a smarthost route without one)
    host: str  # the MX host or smarthost we are about to talk to
    smarthost: bool = False


@attrs.frozen
class TLSRequirements:
    """
    The settings one connection runs under.  C{policy} names where they
    came from (for logs and bounces).
    """

    policy: str
    starttls: str = "if-offered"  # never | if-offered | required
    verify: bool = False  # chain to a trusted root + host name
    min_version: str | None = None  # None: the library's floor (TLS 1.2)
    ciphers: str | None = None  # an OpenSSL cipher string; None: default
    ca_file: str | None = None  # trust these roots instead of the system's
    server_name: str | None = None  # SNI and the name to verify; None: the host
    # DANE (RFC 7672): the server's TLSA RRset, DNSSEC-secure; the
    # certificate is judged against it instead of the WebPKI (an RRset with
    # no usable record makes TLS mandatory and authenticates nothing).
    tlsa: tuple | None = None  # of twisted_mta.tls.dane.TLSARecord
    dane_names: tuple[str, ...] = ()  # DANE-TA: the names the certificate may carry

    @property
    def requires_tls(self) -> bool:
        return self.starttls == "required"


def default_fallback(req: TLSRequirements) -> str:
    """
    The fallback decider of a policy entry that names none: C{never} for a
    policy that requires TLS (strict, relaxed, or a plugin's that says
    C{starttls="required"}), C{now} for the others.  Whoever writes
    "strict" means never without a verified certificate; a default that
    sent in cleartext at the first failure would make strict weaker than
    opportunistic, which at least encrypts.
    """
    return "never" if req.requires_tls else "now"


def fails_under(req: TLSRequirements, kind: str) -> bool:
    """
    Whether a failure of C{kind} counts as a failure under C{req} at all:
    a policy that does not check certificates has no certificate
    failures, and one that does not require STARTTLS sends in cleartext
    when it is not offered.
    """
    if req.starttls == "never":
        return False
    if kind == "starttls-not-offered":  # under DANE: dane-starttls-missing instead
        return req.starttls == "required" and req.tlsa is None
    if kind.startswith("certificate-"):
        return req.verify and req.tlsa is None
    if kind.startswith("dane-") or kind == "dnssec-bogus":
        return req.tlsa is not None
    if kind == "sts-mx-mismatch":
        return req.policy == "mta-sts"
    return True


@implementer(ITLSPolicy, IPlugin)
@attrs.frozen
class FixedPolicy:
    """
    A policy that asks the same of every destination (all built-ins).
    """

    name: str
    settings: TLSRequirements

    def requirements(self, destination: Destination) -> TLSRequirements:
        return self.settings


NONE = FixedPolicy("none", TLSRequirements("none", starttls="never"))
OPPORTUNISTIC = FixedPolicy("opportunistic", TLSRequirements(
    "opportunistic", starttls="if-offered", min_version="TLSv1.0", ciphers=LEGACY_CIPHERS))
RELAXED = FixedPolicy("relaxed", TLSRequirements(
    "relaxed", starttls="required", min_version="TLSv1.2"))
STRICT = FixedPolicy("strict", TLSRequirements(
    "strict", starttls="required", verify=True, min_version="TLSv1.2"))
BUILTIN = {p.name: p for p in (NONE, OPPORTUNISTIC, RELAXED, STRICT)}


def dane_requirements(records: tuple, names: tuple[str, ...]) -> TLSRequirements:
    """
    What a server with a DNSSEC-secure TLSA RRset requires (RFC 7672):
    STARTTLS always, the certificate judged by its records, TLS 1.2 or
    newer like every policy that requires TLS here.
    """
    return TLSRequirements("dane", starttls="required", min_version="TLSv1.2",
                           tlsa=tuple(records), dane_names=tuple(names))


def sts_requirements(host: str) -> TLSRequirements:
    """
    What an MTA-STS policy in mode enforce requires of a listed MX host
    (RFC 8461 4.2): STARTTLS, TLS 1.2 or newer, a certificate valid under
    the WebPKI for the host's name.
    """
    return TLSRequirements("mta-sts", starttls="required", verify=True, min_version="TLSv1.2",
                           server_name=host)


@attrs.frozen
class Choice:
    requirements: TLSRequirements
    fallback: str
    reason: str  # which map entry chose them
    shadow: TLSRequirements | None = None  # report-only: what a stricter policy would say
    ratchet: bool = False  # the destination's TLS history may raise the requirements
    ratcheted: str | None = None  # set when it did: why, in words
    # Where the fallback decider came from: "entry" (the map entry, route or
    # smarthost named it), "default" ([outbound.tls] fallback, for the
    # default entry), or "policy" (none was written: default_fallback).
    fallback_from: str = "entry"
    # What chose the policy (precedence, highest first): "config" (an
    # explicit domain, MX host or smarthost entry), "dane" (the server's
    # TLSA records), "mta-sts" (the domain's policy in mode enforce),
    # "default".  C{published} holds what the destination publishes, for
    # tls explain and the logs (twisted_mta.outbound.published.Published).
    source: str = "config"
    published: object = attrs.field(default=None, eq=False, repr=False)

    @property
    def sts_enforced(self) -> bool:
        return self.source == "mta-sts"

    @property
    def dane(self) -> bool:
        return self.requirements.tlsa is not None


class PolicyMap:
    """
    Chooses the policy for a destination: an exact recipient-domain entry,
    then the nearest C{.parent} entry, then the first MX-host pattern that
    matches, then the smarthost's own setting, then the default.
    """

    def __init__(self, default: PolicyEntry, domains: Iterable[tuple[str, PolicyEntry]] = (),
                 mx_hosts: Iterable[tuple[str, PolicyEntry]] = (),
                 default_fallback: str | None = None, ca_file: str | None = None,
                 plugins: dict[str, object] | None = None, ratchet: bool = False) -> None:
        self.ratchet = ratchet
        self.default = default
        self.domains = dict(domains)
        self.mx_hosts = list(mx_hosts)
        self.default_fallback = default_fallback
        self.ca_file = ca_file
        self.plugins = plugins or {}

    def choose(self, destination: Destination, smarthost_entry: PolicyEntry | None = None
               ) -> Choice:
        entry, reason = self._entry(destination, smarthost_entry)
        policy = self.policy_named(entry.policy)
        req = policy.requirements(destination)
        changes = {k: v for k, v in (("min_version", entry.min_version),
                                     ("ciphers", entry.ciphers),
                                     ("server_name", entry.server_name),
                                     ("ca_file", entry.ca_file or req.ca_file or self.ca_file))
                   if v is not None}
        req = attrs.evolve(req, **changes)
        shadow = None
        if entry.shadow:
            shadow = self.policy_named(entry.shadow).requirements(destination)
            shadow = attrs.evolve(shadow, ca_file=shadow.ca_file or req.ca_file,
                                  server_name=shadow.server_name or req.server_name)
        ratchet = self.ratchet if entry.ratchet is None else entry.ratchet
        fallback, source = self.fallback_for(entry, req)
        return Choice(req, fallback, reason, shadow, ratchet, fallback_from=source,
                      source="default" if entry is self.default else "config")

    def fallback_for(self, entry: PolicyEntry, req: TLSRequirements) -> tuple[str, str]:
        """
        The decider for C{entry} and where it came from: the entry's own;
        for the default entry, C{[outbound.tls] fallback}; else the
        policy's default (L{default_fallback}).  The table-wide key is not
        inherited by the other entries: a strict entry written without a
        fallback stays strict even when the default is C{now}.
        """
        if entry.fallback:
            return entry.fallback, "entry"
        if entry is self.default and self.default_fallback:
            return self.default_fallback, "default"
        return default_fallback(req), "policy"

    def _entry(self, destination: Destination, smarthost_entry: PolicyEntry | None
               ) -> tuple[PolicyEntry, str]:
        domain = destination.domain.lower()
        if domain in self.domains:
            return self.domains[domain], f"domain {domain}"
        labels = domain.split(".")
        for i in range(1, len(labels)):
            parent = "." + ".".join(labels[i:])
            if parent in self.domains:
                return self.domains[parent], f"domain {parent}"
        host = destination.host.lower()
        for pattern, entry in self.mx_hosts:
            if fnmatch.fnmatchcase(host, pattern):
                return entry, f"mx host {pattern}"
        if smarthost_entry is not None:
            return smarthost_entry, f"smarthost {destination.host}"
        return self.default, "default"

    def policy_named(self, name: str):
        if name in BUILTIN:
            return BUILTIN[name]
        return self.plugins[name]
