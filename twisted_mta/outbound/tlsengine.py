"""
The TLS policy engine as the outbound pool uses it: which policies and
deciders exist (built-ins, twisted.plugin dropins, dotted paths), the
policy map built from the configuration, and the plain-words explanation
of a TLS failure that ends up in logs and bounces.
"""

from __future__ import annotations

import importlib
from string import Formatter

import attrs

from twisted_mta.config import OutboundTLSSettings, Smarthost
from twisted_mta.interfaces import IFallbackDecider, ITLSPolicy
from twisted_mta.outbound import fallback as fb
from twisted_mta.outbound.tlsfailure import TLSFailure
from twisted_mta.outbound.tlspolicy import (
    BUILTIN as BUILTIN_POLICIES, Choice, Destination, PolicyEntry, PolicyMap,
)


class TLSConfigError(Exception):
    """
    A policy or decider cannot be found or loaded.
    """


@attrs.define
class Registry:
    policies: dict[str, object] = attrs.field(factory=dict)  # plugin policies by name
    deciders: dict[str, object] = attrs.field(factory=dict)

    def policy(self, name: str):
        if name in BUILTIN_POLICIES:
            return BUILTIN_POLICIES[name]
        if name in self.policies:
            return self.policies[name]
        if "." in name:
            obj = _load_dotted(name)
            if not ITLSPolicy.providedBy(obj):
                raise TLSConfigError(f"{name} does not provide ITLSPolicy")
            self.policies[name] = obj
            return obj
        known = sorted(set(BUILTIN_POLICIES) | set(self.policies))
        raise TLSConfigError(f"unknown TLS policy {name!r} (known: {', '.join(known)})")

    def decider(self, spec: str):
        if "." in spec and not spec.startswith("after:") and spec not in self.deciders:
            obj = _load_dotted(spec)
            if not IFallbackDecider.providedBy(obj):
                raise TLSConfigError(f"{spec} does not provide IFallbackDecider")
            self.deciders[spec] = obj
        try:
            return fb.parse_decider(spec, self.deciders)
        except ValueError as e:
            known = sorted(set(fb.BUILTIN) | set(self.deciders))
            raise TLSConfigError(f"{e} (known: {', '.join(known)}, after:<N>m, "
                                 "after:<N>-failures)")


def _load_dotted(path: str):
    module, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise TLSConfigError(f"cannot load {path}: {e}")
    return obj() if isinstance(obj, type) else obj


def load_registry(dotted: tuple[str, ...] = ()) -> Registry:
    """
    Built-ins, every dropin in a C{twisted/plugins/} directory on the path
    that provides L{ITLSPolicy} or L{IFallbackDecider}, and C{dotted}.
    """
    from twisted.plugin import getPlugins
    import twisted.plugins
    registry = Registry()
    for plugin in getPlugins(ITLSPolicy, twisted.plugins):
        if plugin.name not in BUILTIN_POLICIES:
            registry.policies[plugin.name] = plugin
    for plugin in getPlugins(IFallbackDecider, twisted.plugins):
        if plugin.name not in fb.BUILTIN:
            registry.deciders[plugin.name] = plugin
    for path in dotted:
        obj = _load_dotted(path)
        if ITLSPolicy.providedBy(obj):
            registry.policies[obj.name] = obj
        if IFallbackDecider.providedBy(obj):
            registry.deciders[obj.name] = obj
        if not (ITLSPolicy.providedBy(obj) or IFallbackDecider.providedBy(obj)):
            raise TLSConfigError(f"{path} provides neither ITLSPolicy nor IFallbackDecider")
    return registry


DEFAULT_EXPLANATION = (
    "{problem}. This server's \"{policy}\" policy for {domain} requires {requirement}, "
    "so the message was not sent{decision}. "
    "The administrators of {domain} can fix this: {advice}."
)

REQUIREMENT = {
    "strict": "encryption with a valid certificate for the server's name",
    "relaxed": "encryption (the certificate is not checked)",
    "opportunistic": "encryption whenever the server offers it",
    "none": "nothing",
}


class TLSEngine:
    def __init__(self, settings: OutboundTLSSettings, registry: Registry | None = None,
                 explanation: str | None = None) -> None:
        self.settings = settings
        self.registry = registry if registry is not None else load_registry(settings.plugins)
        self.map = PolicyMap(
            default=PolicyEntry(settings.policy, shadow=settings.shadow),
            domains=settings.domains, mx_hosts=settings.mx_hosts,
            default_fallback=settings.fallback, ca_file=settings.ca_file,
            ratchet=settings.ratchet,
            plugins={n: self.registry.policy(n) for n in self._policy_names()})
        if explanation is None and settings.explanation:
            with open(settings.explanation, encoding="utf-8") as f:
                explanation = " ".join(f.read().split())
        self.explanation = explanation or DEFAULT_EXPLANATION

    def _policy_names(self) -> set[str]:
        entries = [e for _, e in self.settings.domains] + [e for _, e in self.settings.mx_hosts]
        names = {self.settings.policy, self.settings.shadow} | {e.policy for e in entries} | {
            e.shadow for e in entries}
        names.discard(None)
        return {n for n in names if n not in BUILTIN_POLICIES} | set(self.registry.policies)

    def choose(self, domain: str, host: str, smarthost: Smarthost | None) -> Choice:
        entry = None
        if smarthost is not None and smarthost.tls_policy:
            entry = PolicyEntry(smarthost.tls_policy, smarthost.tls_fallback)
            if smarthost.tls_policy not in self.map.plugins and \
                    smarthost.tls_policy not in BUILTIN_POLICIES:
                self.map.plugins[smarthost.tls_policy] = self.registry.policy(
                    smarthost.tls_policy)
        return self.map.choose(Destination(domain, host, smarthost is not None), entry)

    def decider(self, spec: str):
        return self.registry.decider(spec)

    def explain(self, failure: TLSFailure, choice: Choice, domain: str,
                decision: fb.Decision | None) -> str:
        """
        The plain-words account of a TLS failure for the sender (a template
        the admin can replace: [outbound.tls] explanation).
        """
        fields = {
            "problem": failure.describe(),  # starts with a host name: no capital
            "policy": choice.requirements.policy,
            "why_policy": choice.reason,
            "domain": domain or failure.host,
            "host": failure.host,
            "address": failure.address,
            "requirement": _requirement(choice),
            "decision": _decision_words(decision),
            "advice": failure.advice(),
            "kind": failure.kind,
        }
        return _render(self.explanation, fields).strip()


def _requirement(choice: Choice) -> str:
    req = choice.requirements
    if choice.ratcheted:
        return f"{_level_words(req)}, because {choice.ratcheted}"
    return REQUIREMENT.get(req.policy, _level_words(req))


def _level_words(req) -> str:
    if req.verify:
        return REQUIREMENT["strict"]
    if req.starttls == "required":
        return "encryption"
    return REQUIREMENT["opportunistic"]


_DEFER_WORDS = {
    "ratchet": "; this server does not let a domain drop silently to cleartext",
    "never": "; it is never sent there without that",
    "next-attempt": "; if the next attempt fails the same way, it will be sent without "
                    "encryption",
    "after": "; if this goes on, it will be sent without encryption later",
}


def _decision_words(decision: fb.Decision | None) -> str:
    """
    What the fallback decider's "not now" means, in words; for a plugin,
    its own reason.
    """
    if decision is None or decision.action != fb.DEFER:
        return ""
    if decision.decider in _DEFER_WORDS:
        return _DEFER_WORDS[decision.decider]
    if decision.decider in fb.BUILTIN:
        return ""
    return f" ({decision.reason})"


def _render(template: str, fields: dict[str, str]) -> str:
    out = []
    for literal, name, spec, conv in Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(str(fields.get(name, "{" + name + "}")))
    return "".join(out)
