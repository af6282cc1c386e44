"""
Every TLS policy entry of a configuration with its effective fallback
decider: what C{config show} lists and what C{config check} warns about.

The entries are the default (C{[outbound.tls]}), each
C{[outbound.tls.domains]} and C{[outbound.tls.mx_hosts]} entry, the
smarthost and each route that names a C{tls_policy}, and the secure relay.
"""

from __future__ import annotations

import attrs

from twisted_mta.config import OutboundSettings, Smarthost
from twisted_mta.tls import fallback as fb
from twisted_mta.tls.policy import Destination, PolicyEntry

SAMPLE_DOMAIN = "example.com"
SAMPLE_HOST = "mx.example"

SOURCE_WORDS = {
    "entry": "written",
    "default": "[outbound.tls] fallback",
    "policy": "policy default",
}


@attrs.frozen
class TLSEntry:
    where: str  # the dotted key, e.g. outbound.tls.domains."bank.example"
    policy: str
    decider: str  # the effective decider's spec ("never", "after:4h", a plugin's name)
    source: str  # "entry", "default" or "policy": see PolicyMap.fallback_for
    requires_tls: bool  # the policy requires STARTTLS (strict, relaxed)
    can_cleartext: bool  # after a TLS failure, mail may go out without TLS
    # Whether the pool asks this entry's decider at all: not for the relay,
    # whose failed sessions just wait for the next attempt.
    consulted: bool = True

    def describe(self) -> str:
        """
        One line for C{config show}.
        """
        line = f"{self.where}: policy {self.policy}, fallback {self.decider} " \
               f"({SOURCE_WORDS[self.source]})"
        if not self.consulted:
            line += "; not consulted: a failed relay session waits for the next attempt"
        return line

    def warning(self) -> str | None:
        """
        The C{config check} warning, when a destination that requires TLS
        can still get mail in cleartext.
        """
        if not (self.requires_tls and self.can_cleartext and self.consulted):
            return None
        return (f"warning: {self.where}: policy {self.policy} with fallback "
                f"\"{self.decider}\" can send mail in cleartext after a TLS failure")

    def to_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def named_in(outbound: OutboundSettings) -> list[tuple[str, str, str]]:
    """
    Every TLS policy and decider name the configuration writes, as
    C{(dotted key, name, "policy" or "fallback")}, in the file's order:
    L{twisted_mta.tap.prepare_tls} looks each up, so that a typo is an
    error at start-up naming its key, not a surprise at delivery.
    """
    tls = outbound.tls
    names = [("outbound.tls.policy", tls.policy, "policy")]
    if tls.fallback:
        names.append(("outbound.tls.fallback", tls.fallback, "fallback"))
    if tls.relay is not None and tls.relay.tls_policy:
        names.append(("outbound.tls.relay.tls_policy", tls.relay.tls_policy, "policy"))
    if tls.shadow:
        names.append(("outbound.tls.shadow", tls.shadow, "policy"))
    for table, entries in (("domains", tls.domains), ("mx_hosts", tls.mx_hosts)):
        for key, entry in entries:
            where = f"outbound.tls.{table}.{key}"
            names.append((f"{where}.policy", entry.policy, "policy"))
            if entry.shadow:
                names.append((f"{where}.shadow", entry.shadow, "policy"))
            if entry.fallback:
                names.append((f"{where}.fallback", entry.fallback, "fallback"))
    if tls.relay is not None and tls.relay.tls_fallback:
        names.append(("outbound.tls.relay.tls_fallback", tls.relay.tls_fallback, "fallback"))
    hosts = [("outbound.smarthost", outbound.smarthost)] if outbound.smarthost else []
    hosts += [(f"outbound.routes.{domain}", host) for domain, host in outbound.routes]
    names += [(f"{where}.tls_policy", host.tls_policy, "policy")
              for where, host in hosts if host.tls_policy]
    names += [(f"{where}.tls_fallback", host.tls_fallback, "fallback")
              for where, host in hosts if host.tls_fallback]
    return names


def tls_entries(engine, outbound: OutboundSettings) -> tuple[TLSEntry, ...]:
    """
    Each policy entry with its effective decider, as the pool would use
    it (every name in L{named_in} already looked up).

    Raises L{twisted_mta.tls.engine.TLSConfigError}: a plugin policy that
    raises for the entry's sample destination.
    """
    settings = engine.settings
    sample = Destination(SAMPLE_DOMAIN, SAMPLE_HOST)
    out = [_entry(engine, "outbound.tls", engine.map.default, sample)]
    for domain, entry in settings.domains:
        dest = Destination(domain.lstrip("."), SAMPLE_HOST)
        out.append(_entry(engine, f"outbound.tls.domains.{_quote(domain)}", entry, dest))
    for pattern, entry in settings.mx_hosts:
        out.append(_entry(engine, f"outbound.tls.mx_hosts.{_quote(pattern)}", entry, sample))
    hosts = ([("outbound.smarthost", SAMPLE_DOMAIN, outbound.smarthost)]
             if outbound.smarthost else [])
    hosts += [(f"outbound.routes.{_quote(d)}", d.lstrip("."), h) for d, h in outbound.routes]
    for where, domain, host in hosts:
        if host.tls_policy:
            out.append(_smarthost_entry(engine, where, domain, host))
    relay = settings.relay
    if relay is not None:
        if relay.tls_policy:
            entry = _smarthost_entry(engine, "outbound.tls.relay", "", relay)
        else:  # the relay is chosen like any destination without a domain
            choice = engine.choose("", relay.host, relay)
            decider = engine.decider(choice.fallback)
            entry = TLSEntry("outbound.tls.relay", choice.requirements.policy, choice.fallback,
                             choice.fallback_from, choice.requirements.requires_tls,
                             _cleartext(decider, choice.requirements,
                                        Destination("", relay.host, True), relay))
        out.append(attrs.evolve(entry, consulted=False))
    return tuple(out)


def _entry(engine, where: str, entry: PolicyEntry, dest: Destination) -> TLSEntry:
    req = _requirements(engine, where, entry.policy, dest)
    spec, source = engine.map.fallback_for(entry, req)
    decider = engine.decider(spec)
    return TLSEntry(where, entry.policy, spec, source, req.requires_tls,
                    fb.can_send_cleartext(decider, req, dest))


def _smarthost_entry(engine, where: str, domain: str, host: Smarthost) -> TLSEntry:
    entry = PolicyEntry(host.tls_policy, host.tls_fallback)
    dest = Destination(domain, host.host, True)
    req = _requirements(engine, where, entry.policy, dest)
    spec, source = engine.map.fallback_for(entry, req)
    return TLSEntry(where, entry.policy, spec, source, req.requires_tls,
                    _cleartext(engine.decider(spec), req, dest, host))


def _requirements(engine, where: str, name: str, dest: Destination):
    """
    The policy's requirements for C{dest}; a plugin policy that raises is
    a configuration error here rather than a crash at delivery.
    """
    from twisted_mta.tls.engine import TLSConfigError
    policy = engine.registry.policy(name)
    try:
        return policy.requirements(dest)
    except Exception as e:
        raise TLSConfigError(f"{where}: TLS policy {name!r} failed for "
                             f"{dest.domain or dest.host}: {type(e).__name__}: {e}")


def _cleartext(decider, req, dest: Destination, host: Smarthost) -> bool:
    """
    Whether the decider can reach cleartext on this smarthost: never on
    implicit TLS or with our login (the hard rules in L{fb.decide}).
    """
    if host.tls == "implicit" or host.username is not None:
        return False
    return fb.can_send_cleartext(decider, req, dest)


def _quote(key: str) -> str:
    return f'"{key}"'
