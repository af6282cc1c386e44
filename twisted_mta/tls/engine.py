"""
The TLS policy engine as the outbound pool uses it: which policies and
deciders exist (built-ins, twisted.plugin dropins, dotted paths), the
policy map built from the configuration, and the plain-words explanation
of a TLS failure that ends up in logs and bounces.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from string import Formatter
from typing import Iterator

import attrs
from twisted.python.reflect import InvalidName, ObjectNotFound, namedAny

from twisted_mta.config import OutboundTLSSettings, Smarthost
from twisted_mta.interfaces import IFallbackDecider, ITLSPolicy
from twisted_mta.tls import fallback as fb
from twisted_mta.tls.failure import TLSFailure
from twisted_mta.tls import published
from twisted_mta.tls.policy import (
    BUILTIN as BUILTIN_POLICIES, Choice, Destination, PolicyEntry, PolicyMap,
    dane_requirements, default_fallback, sts_requirements,
)
from twisted_mta.tls.published import Facts


class TLSConfigError(Exception):
    """
    A policy or decider cannot be found or loaded; C{str()} is one line
    that names it (and, for a plugin, its file).
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
    """
    The object at a dotted path (L{namedAny}; a class is instantiated).
    A name that is not there says so; anything the plugin's own code raises,
    importing or instantiating, is a L{TLSConfigError} with its type and
    where it was raised, since it is the plugin's code, not ours, that failed.
    """
    try:
        obj = namedAny(path)
        return obj() if isinstance(obj, type) else obj
    except ObjectNotFound:  # not even the first name is a module
        raise TLSConfigError(f"cannot load {path}: No module named {path.split('.')[0]!r}")
    except InvalidName as e:  # not a dotted name, or a module without a dot
        raise TLSConfigError(f"cannot load {path}: {_one_line(e)}")
    except Exception as e:
        frames = traceback.extract_tb(e.__traceback__)
        if isinstance(e, AttributeError) and frames and frames[-1].name == "namedAny":
            # namedAny's own getattr: the module has no such attribute
            raise TLSConfigError(f"cannot load {path}: {_one_line(e)}")
        if isinstance(e, SyntaxError) and e.filename:
            where = f" (in {e.filename} line {e.lineno})"
        else:
            where = _at(frames)
        raise TLSConfigError(f"cannot load {path}: {type(e).__name__}: {_one_line(e)}{where}")


def load_registry(dotted: tuple[str, ...] = ()) -> Registry:
    """
    Built-ins, every dropin in a C{twisted/plugins/} directory on the path
    that provides L{ITLSPolicy} or L{IFallbackDecider}, and C{dotted}.

    A dropin that fails to import, or a plugin without a C{str} C{name},
    is a L{TLSConfigError} naming its file: C{twisted.plugin} would only
    log a traceback and carry on, and the service would then start without
    a policy the configuration may name, or crash on the missing name.
    """
    from twisted.plugin import getPlugins
    import twisted.plugins
    registry = Registry()
    with _discovery_failures() as failures:
        policies = list(getPlugins(ITLSPolicy, twisted.plugins))
        deciders = list(getPlugins(IFallbackDecider, twisted.plugins))
    if failures:
        raise TLSConfigError(failures[0])
    for plugin in policies:
        name = _plugin_name(plugin, None)
        if name not in BUILTIN_POLICIES:
            registry.policies[name] = plugin
    for plugin in deciders:
        name = _plugin_name(plugin, None)
        if name not in fb.BUILTIN:
            registry.deciders[name] = plugin
    for path in dotted:
        obj = _load_dotted(path)
        if not (ITLSPolicy.providedBy(obj) or IFallbackDecider.providedBy(obj)):
            raise TLSConfigError(f"{path} provides neither ITLSPolicy nor IFallbackDecider")
        name = _plugin_name(obj, path)
        if ITLSPolicy.providedBy(obj):
            registry.policies[name] = obj
        if IFallbackDecider.providedBy(obj):
            registry.deciders[name] = obj
    return registry


def _plugin_name(plugin: object, path: str | None) -> str:
    """
    The plugin's C{name}, else a L{TLSConfigError} naming the plugin and
    its file (C{path}: its dotted path, when it was configured by one).
    """
    name = getattr(plugin, "name", None)
    if isinstance(name, str) and name:
        return name
    if path is not None:
        what = f"TLS plugin {path}"
    else:
        attr, file = _dropin_of(plugin)
        what = f"TLS plugin {attr!r} in {file}" if attr else f"TLS plugin in {file}"
    problem = "has no name" if name is None else f"has a name that is not a string: {name!r}"
    raise TLSConfigError(f"{what} {problem}")


def _dropin_of(plugin: object) -> tuple[str | None, str]:
    """
    The attribute and file of the C{twisted.plugins} module that holds
    C{plugin}; else the file of the module that defines its class.
    """
    for modname, module in list(sys.modules.items()):
        if not modname.startswith("twisted.plugins.") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if value is plugin:
                return attr, getattr(module, "__file__", None) or modname
    module = sys.modules.get(type(plugin).__module__)
    return None, getattr(module, "__file__", None) or type(plugin).__module__


@contextlib.contextmanager
def _discovery_failures() -> Iterator[list[str]]:
    """
    Collect, as one line each, the failures C{twisted.plugin} logs (and
    otherwise ignores) while it loads the dropins.

    Its C{log.err} is diverted for the duration: before logging has begun
    (C{twistd} option parsing, C{twisted-mta config check}) Twisted prints
    such failures on stderr as tracebacks, and the operator should read
    one line instead.  An observer on the global publisher catches what
    still reaches it.
    """
    import twisted.plugin
    from twisted.logger import globalLogPublisher
    found: list[str] = []

    def add(failure) -> None:
        line = _dropin_failure(failure)
        if line not in found:
            found.append(line)

    def observe(event: dict) -> None:
        # twisted.python.log events carry "failure"; a "why" marks a
        # dropin.cache write, not a load.
        failure = event.get("log_failure") or event.get("failure")
        if failure is not None and not event.get("why"):
            add(failure)

    real = getattr(twisted.plugin, "log", None)
    if real is not None:
        twisted.plugin.log = _CollectingLog(real, add)
    globalLogPublisher.addObserver(observe)
    try:
        yield found
    finally:
        globalLogPublisher.removeObserver(observe)
        if real is not None:
            twisted.plugin.log = real


class _CollectingLog:
    """
    Stands in for C{twisted.python.log} inside C{twisted.plugin}: a load
    failure goes to C{add}, everything else to the real log.
    """

    def __init__(self, real, add) -> None:
        self._real = real
        self._add = add

    def err(self, _stuff=None, _why=None, **kw) -> None:
        from twisted.python.failure import Failure
        if _why:
            self._real.err(_stuff, _why, **kw)
        else:
            self._add(_stuff if isinstance(_stuff, Failure) else Failure(_stuff))

    def __getattr__(self, name: str):
        return getattr(self._real, name)


_PLUGINS_DIR = os.sep + os.path.join("twisted", "plugins") + os.sep


def _dropin_failure(failure) -> str:
    """
    One line for a dropin that raised while loading: its file (the deepest
    traceback frame in a C{twisted/plugins/} directory, or where Python
    could not parse it) and the exception.
    """
    error = failure.value
    file = None
    if isinstance(error, SyntaxError) and error.filename:
        file = f"{error.filename} (line {error.lineno})"
    else:
        for frame in reversed(failure.frames or []):
            if _PLUGINS_DIR in frame[1]:
                file = f"{frame[1]} (line {frame[2]})"
                break
    what = f"{type(error).__name__}: {_one_line(error)}"
    if file is None:
        return f"a plugin dropin in twisted/plugins failed to load: {what}"
    return f"plugin dropin {file} failed to load: {what}"


def _at(frames) -> str:
    """
    " (in FILE line N)" for the deepest frame of a traceback, if any.
    """
    frames = [f for f in frames if not f.filename.startswith("<frozen")]
    return f" (in {frames[-1].filename} line {frames[-1].lineno})" if frames else ""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


DEFAULT_EXPLANATION = (
    "{problem}. {why}{decision}. "
    "The administrators of {domain} can fix this: {advice}."
)

REQUIREMENT = {
    "strict": "encryption with a valid certificate for the server's name",
    "relaxed": "encryption (the certificate is not checked)",
    "opportunistic": "encryption whenever the server offers it",
    "none": "nothing",
    "dane": "encryption with a certificate that matches its DANE (TLSA) records",
    "mta-sts": "encryption with a valid certificate for the server's name",
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

    def choose(self, domain: str, host: str, smarthost: Smarthost | None,
               facts: Facts | None = None) -> Choice:
        """
        The policy for C{host}, in this order: an explicit entry (domain,
        parent domain, MX host, smarthost or route); what the destination
        publishes (C{facts}): DANE when the host has a DNSSEC-secure TLSA
        RRset (or its look-up must be waited for), then the domain's
        MTA-STS policy in mode enforce; else the default (which an MTA-STS
        policy in mode testing shadows).
        """
        entry = None
        if smarthost is not None and smarthost.tls_policy:
            entry = PolicyEntry(smarthost.tls_policy, smarthost.tls_fallback)
            if smarthost.tls_policy not in self.map.plugins and \
                    smarthost.tls_policy not in BUILTIN_POLICIES:
                self.map.plugins[smarthost.tls_policy] = self.registry.policy(
                    smarthost.tls_policy)
        choice = self.map.choose(Destination(domain, host, smarthost is not None), entry)
        if facts is None or smarthost is not None:
            return choice
        choice = attrs.evolve(choice, published=facts)
        if choice.source != "default":
            return choice
        return self._published(choice, facts, host)

    def _published(self, default: Choice, facts: Facts, host: str) -> Choice:
        h = facts.host
        if h.dane in (published.RECORDS, published.DEFER):
            req = dane_requirements(h.records, h.names)
            return Choice(req, default_fallback(req), f"DANE: {h.why}", source="dane",
                          published=facts, fallback_from="policy")
        lookup = facts.sts
        policy = lookup.policy if lookup is not None else None
        if policy is None:
            return default
        words = f"MTA-STS policy of {facts.domain} ({sts_summary(lookup)})"
        req = attrs.evolve(sts_requirements(host), ca_file=self.map.ca_file)
        if policy.mode == "enforce":
            return Choice(req, default_fallback(req), words, source="mta-sts",
                          published=facts, fallback_from="policy")
        # testing: deliver as the default says; report what enforce would refuse
        return attrs.evolve(default, shadow=req, reason=f"{default.reason}; {words}, "
                                                        "report only")

    def decider(self, spec: str):
        return self.registry.decider(spec)

    def explain(self, failure: TLSFailure, choice: Choice, domain: str,
                decision: fb.Decision | None, situation: fb.Situation | None = None,
                final: bool = False) -> str:
        """
        The plain-words account of a TLS failure for the sender (a template
        the admin can replace: [outbound.tls] explanation).  Why it was not
        sent names the rule that required TLS; what happens next is made
        from the final C{decision}, after the hard rules.
        """
        domain = domain or failure.host
        rule = requiring_rule(failure, choice, situation)
        fields = {
            "problem": failure.describe(),  # starts with a host name: no capital
            "policy": choice.requirements.policy,
            "why_policy": choice.reason,
            "domain": domain,
            "host": failure.host,
            "address": failure.address,
            "peer": failure.peer,
            "requirement": _requirement(choice, rule),
            "why": _why(rule, failure, choice, domain, None if final else decision),
            "rule": rule,
            # Given up (expired): nothing more will happen, so nothing is promised.
            "decision": "" if final else decision_words(decision, rule),
            "advice": failure.advice(),
            "kind": failure.kind,
        }
        return _render(self.explanation, fields).strip()


    def outcome(self, failure: TLSFailure, choice: Choice, domain: str,
                decision: fb.Decision, situation: fb.Situation | None = None):
        """
        The recipient's outcome for a deferral after a TLS failure: 451
        with the class's enhanced code and the explanation, and the words
        the bounce will use if the message is given up later.
        """
        from twisted_mta import failures
        text = self.explain(failure, choice, domain, decision, situation)
        final = self.explain(failure, choice, domain, decision, situation, final=True)
        return failures.tls(failure, text, choice.requirements.policy, final)


def sts_summary(lookup) -> str:
    """
    "mode enforce, id 20260301, max_age 604800, mx mail.example.org":
    an MTA-STS answer in a few words.
    """
    policy = lookup.policy
    policy_id = lookup.entry.policy_id if lookup.entry is not None else (
        lookup.record.id if lookup.record is not None else "?")
    return (f"mode {policy.mode}, id {policy_id}, max_age {policy.max_age}, "
            f"mx {', '.join(policy.mx) or 'none'}")


def requiring_rule(failure: TLSFailure, choice: Choice,
                   situation: fb.Situation | None) -> str:
    """
    Which rule made this failure stop the message: the policy (or the
    ratchet that raised it), or, where the policy itself would have sent
    in cleartext, implicit TLS, our login, or REQUIRETLS.
    """
    req = choice.requirements
    if failure.is_certificate or req.requires_tls:
        published = choice.source in ("dane", "mta-sts")  # requires more than a ratchet
        return "ratchet" if choice.ratcheted and not published else "policy"
    if situation is not None:
        for rule, applies in (("implicit-tls", situation.implicit_tls or failure.implicit),
                              ("login", situation.credentials),
                              ("requiretls", situation.requiretls)):
            if applies:
                return rule
    elif failure.implicit:
        return "implicit-tls"
    return "policy"


def _requirement(choice: Choice, rule: str = "policy") -> str:
    req = choice.requirements
    if rule == "ratchet":
        return f"{_level_words(req)}, because {choice.ratcheted}"
    if rule in ("implicit-tls", "login", "requiretls"):
        return "encryption"
    return REQUIREMENT.get(req.policy, _level_words(req))


def _level_words(req) -> str:
    if req.verify:
        return REQUIREMENT["strict"]
    if req.starttls == "required":
        return "encryption"
    return REQUIREMENT["opportunistic"]


def _why(rule: str, failure: TLSFailure, choice: Choice, domain: str,
         decision: fb.Decision | None) -> str:
    """
    The sentence that says which rule stopped the message.
    """
    policy = choice.requirements.policy
    if rule == "implicit-tls":
        text = (f"The route to {failure.host} uses implicit TLS (encryption from the first "
                "byte), which is never given up")
    elif rule == "login":
        text = (f"We log in to {failure.host} to send this mail, and our login is never sent "
                "without encryption")
    elif rule == "requiretls":
        text = "The sender required TLS for this message (REQUIRETLS)"
    elif choice.source == "dane" and failure.kind in ("dane-lookup-failed", "dnssec-bogus"):
        text = (f"The mail servers of {domain} are listed in DNSSEC-signed DNS, so whether "
                f"{failure.host} publishes DANE (TLSA) records, and which, must be known "
                "before anything is sent to it")
    elif choice.source == "dane" and rule == "policy":
        text = (f"{failure.host} publishes DANE (TLSA) records in DNSSEC-signed DNS, which "
                f"require {_requirement(choice, rule)}")
    elif choice.source == "mta-sts" and failure.kind == "sts-mx-mismatch":
        text = (f"The MTA-STS policy of {domain} (mode enforce) allows only the mail "
                "servers it lists")
    elif choice.source == "mta-sts" and rule == "policy":
        text = (f"The MTA-STS policy of {domain} (mode enforce) requires "
                f"{_requirement(choice, rule)}")
    else:
        text = (f"This server's \"{policy}\" policy for {domain} requires "
                f"{_requirement(choice, rule)}")
    if decision is None or decision.action == fb.DEFER:
        text += ", so the message was not sent"
    return text


_NEVER_WORDS = {
    "dane": "its DANE (TLSA) records make encryption mandatory",
    "mta-sts": "its MTA-STS policy requires encryption with a valid certificate",
    "implicit-tls": "implicit TLS never falls back to cleartext",
    "login": "our login never goes without encryption",
    "requiretls": "the sender required TLS",
    "ratchet": "this server does not let a domain drop silently to cleartext",
}


def decision_words(decision: fb.Decision | None, rule: str = "policy") -> str:
    """
    What happens next, from the final decision (after the hard rules):
    retried with TLS only, cleartext on a later attempt, sent another way
    now, or, for a plugin that did not say, its own reason.
    """
    if decision is None:
        return ""
    if decision.action == fb.CLEARTEXT:
        return (f"; the fallback decider \"{decision.decider}\" sends it without encryption "
                "instead")
    if decision.action == fb.RELAXED:
        return "; it is sent encrypted instead, without checking the certificate"
    if decision.action == fb.VIA_RELAY:
        return "; it is sent through the secure relay instead"
    if decision.rule == "decider-error":
        return f" ({decision.reason}); it will be tried again later"
    if decision.rule == "no-relay":
        return "; no secure relay is configured, so it will be tried again later"
    if decision.later == fb.TLS_ONLY:
        words = "; it will be tried again with encryption"
        # Implicit TLS already said "never given up" in the sentence before.
        if decision.rule in _NEVER_WORDS and not rule == decision.rule == "implicit-tls":
            return f"{words}, never without it: {_NEVER_WORDS[decision.rule]}"
        return f"{words}, and never sent there without it"
    if decision.later == fb.CLEARTEXT_NEXT:
        return "; if the next attempt fails the same way, it will be sent without encryption"
    if decision.later == fb.CLEARTEXT_LATER:
        return "; if this goes on, it will be sent without encryption later"
    return f" ({decision.reason})" if decision.decider not in fb.BUILTIN else ""


def _render(template: str, fields: dict[str, str]) -> str:
    out = []
    for literal, name, spec, conv in Formatter().parse(template):
        out.append(literal)
        if name is not None:
            out.append(str(fields.get(name, "{" + name + "}")))
    return "".join(out)
