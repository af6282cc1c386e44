"""
`twisted-mta tls explain DOMAIN`: what would *this* MTA do for a domain,
and why.  Resolves the next hop as delivery would (smarthost or MX, the
configured resolver and port), connects to every host under the policy the
map chooses, and reports per host: the TLS it got, the certificate, the
verification result, the fallback decision, and the text a sender would
read if delivery failed.  Nothing is sent: each session ends with QUIT
after EHLO (and STARTTLS).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from twisted.internet import defer

from twisted_mta.config import Config
from twisted_mta.tls import fallback as fb
from twisted_mta.outbound import mx
from twisted_mta.outbound.attempt import Attempt, AttemptContext, DNSResolver, tcp_connector
from twisted_mta.outbound.client import SessionFailed, Transaction
from twisted_mta.tls.engine import TLSEngine
from twisted_mta.outbound.router import NextHop
from twisted_mta.config import is_ip
from twisted_mta.tls.handshake import shadow_verdict
from twisted_mta.tls.policy import STRICT


def _day(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


@defer.inlineCallbacks
def explain(config: Config, domain: str, reactor, run_blocking, resolver=None,
            message: dict | None = None, tls: TLSEngine | None = None):
    """
    Fires with a JSON-able report for C{domain}.  C{message} (age,
    attempts, tls_failures of a queued message) makes the fallback
    decision the one that message would get.
    """
    settings = config.outbound
    ctx = AttemptContext(settings=settings, hostname=config.hostname, clock=reactor,
                         run_blocking=run_blocking,
                         resolver=resolver or DNSResolver(config.dns),
                         connect=tcp_connector(reactor, settings.connect_timeout),
                         tls=tls if tls is not None else TLSEngine(settings.tls))
    domain = domain.lower().rstrip(".")
    smarthost = settings.smarthost_for(domain)
    hop = NextHop(domain=domain, smarthost=smarthost)
    attempt = Attempt(ctx, hop)  # the delivery attempt's own steps, in a dry run
    report: dict[str, Any] = {"domain": domain, "hosts": []}
    if smarthost is not None:
        report["route"] = f"smarthost {smarthost.destination} ({smarthost.tls})"
        hosts = [(None, smarthost.host)]
        port = smarthost.port
    else:
        port = settings.port
        try:
            records = yield run_blocking(ctx.resolver.mx, domain)
        except mx.MXError as e:
            report["route"] = "MX"
            report["error"] = str(e.outcome)
            return report
        report["route"] = "MX"
        hosts = [(r.preference, r.name) for r in records]
    for preference, host in hosts:
        choice = ctx.tls.choose(domain, host, smarthost)
        entry: dict[str, Any] = {
            "host": host, "preference": preference,
            "policy": choice.requirements.policy, "policy_from": choice.reason,
            "fallback": choice.fallback, "fallback_from": choice.fallback_from,
            "addresses": []}
        if choice.requirements.requires_tls and fb.can_send_cleartext(
                ctx.tls.decider(choice.fallback), choice.requirements):
            entry["cleartext_warning"] = (
                f"the fallback decider \"{choice.fallback}\" lets mail for {domain} go out "
                f"in cleartext after a TLS failure, although its policy "
                f"\"{choice.requirements.policy}\" requires TLS")
        report["hosts"].append(entry)
        if host in ctx.own_names:
            entry["error"] = "this is us (mail would loop: 5.4.6)"
            continue
        try:
            addresses = [host] if is_ip(host) else (
                yield run_blocking(ctx.resolver.addresses, host))
        except mx.MXError as e:
            entry["error"] = str(e.outcome)
            continue
        if not addresses:
            entry["error"] = "no address (no A or AAAA record)"
        for address in addresses:
            entry["addresses"].append((yield _probe(attempt, domain, host, address, port,
                                                    choice, message or {})))
    return report


@defer.inlineCallbacks
def _probe(attempt: Attempt, domain: str, host: str, address: str, port: int, choice,
           message: dict):
    out: dict[str, Any] = {"address": address, "port": port}
    try:
        client = yield attempt.session(host, address, port, choice, dry_run=True)
    except SessionFailed as e:
        out["ok"] = False
        if e.tls_failure is None:
            out["error"] = str(e.outcome)
            return out
        f = e.tls_failure
        out["tls_failure"] = {"kind": f.kind, "detail": f.detail,
                              "tlsrpt_result": f.tlsrpt_result}
        if e.tls_record is not None and e.tls_record.version is not None:
            out["tls"] = {"version": e.tls_record.version, "cipher": e.tls_record.cipher,
                          "verified": False,
                          "verification_required": choice.requirements.verify}
        if f.certificate is not None:
            out["certificate"] = _cert(f.certificate)
        # The decision a queued message in this situation would get.
        e.choice = choice
        txn = Transaction(sender="", recipients=(f"postmaster@{domain}",), message=None,
                          age=message.get("age", 0.0), attempts=message.get("attempts", 0),
                          tls_failures=message.get("tls_failures", 0))
        decision, _ = attempt.decide(e, txn)
        situation = attempt.situation(f, choice, txn)
        out["decision"] = {"action": decision.action, "decider": decision.decider,
                           "rule": decision.rule, "later": decision.later,
                           "reason": decision.reason}
        out["sender_would_read"] = attempt.ctx.tls.explain(f, choice, domain, decision, situation)
        return out
    record = client.tls.record if client.tls is not None else None
    out["ok"] = True
    if record is None or record.version is None:
        out["tls"] = None
        out["note"] = ("STARTTLS not offered: sent in cleartext"
                       if choice.requirements.starttls != "never"
                       else "the policy does not use TLS")
    else:
        out["tls"] = {"version": record.version, "cipher": record.cipher,
                      "verified": record.verified,
                      "verification_required": choice.requirements.verify}
        if record.certificate is not None:
            out["certificate"] = _cert(record.certificate)
        if not record.verified:
            out["tls"]["not_verified_because"] = record.unverified_reason
            strict = shadow_verdict(STRICT.settings, client.tls, True, client.capabilities,
                                    host, address, port)
            out["tls"]["would_fail_strict"] = strict.kind if strict else (
                record.unverified_reason or "?")
    out["capabilities"] = sorted(client.capabilities)
    client.quit()
    yield client.closed
    return out


def _cert(c) -> dict[str, Any]:
    return {"subject": c.subject, "names": list(c.sans), "issuer": c.issuer,
            "not_before": _day(c.not_before), "not_after": _day(c.not_after),
            "self_signed": c.self_signed}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['domain']}: delivered by {report['route']}"]
    if "error" in report:
        lines.append(f"  no delivery possible: {report['error']}")
    for h in report["hosts"]:
        pref = f"MX {h['preference']} " if h["preference"] is not None else ""
        source = {"entry": "written", "default": "[outbound.tls] fallback",
                  "policy": "the policy's default"}.get(h.get("fallback_from", ""), "")
        lines.append(f"{pref}{h['host']}: policy {h['policy']} (chosen by {h['policy_from']}),"
                     f" fallback {h['fallback']}" + (f" ({source})" if source else ""))
        if h.get("cleartext_warning"):
            lines.append(f"  WARNING: {h['cleartext_warning']}")
        if "error" in h:
            lines.append(f"  {h['error']}")
        for a in h["addresses"]:
            lines.append(f"  {a['address']} port {a['port']}:")
            if a.get("error"):
                lines.append(f"    no session: {a['error']}")
                continue
            tls = a.get("tls")
            if not a.get("ok") and tls:
                lines.append(f"    {tls['version']} {tls['cipher']}; certificate NOT verified "
                             "(required)")
                tls = None
            if a.get("ok") and tls is None:
                lines.append(f"    no TLS: {a.get('note')}")
            elif tls:
                v = "verified" if tls["verified"] else "NOT verified"
                need = "required" if tls["verification_required"] else "not required"
                why = f": {tls['not_verified_because']}" if tls.get("not_verified_because") \
                    else ""
                lines.append(f"    {tls['version']} {tls['cipher']}; certificate {v}{why} "
                             f"({need})")
                if not tls["verified"]:
                    lines.append(f"    under strict this would fail: {tls['would_fail_strict']}")
            c = a.get("certificate")
            if c:
                names = ", ".join(c["names"]) or "(none)"
                lines.append(f"    certificate: {c['subject']}; names {names}; issuer "
                             f"{c['issuer']}; valid {c['not_before']} to {c['not_after']}")
            if "tls_failure" in a:
                f = a["tls_failure"]
                d = a["decision"]
                lines.append(f"    TLS FAILED: {f['kind']}"
                             + (f" ({f['detail']})" if f["detail"] else "")
                             + f"; TLS-RPT {f['tlsrpt_result']}")
                rule = f" [{d['rule']}]" if d.get("rule", "decider") != "decider" else ""
                lines.append(f"    fallback {d['decider']}: {d['action']}{rule} - {d['reason']}")
                lines.append("    a sender would read:")
                import textwrap
                lines.extend(textwrap.wrap(a["sender_would_read"], 76,
                                           initial_indent="      ",
                                           subsequent_indent="      "))
            elif a.get("ok"):
                lines.append("    delivery would go ahead")
    return "\n".join(lines) + "\n"
