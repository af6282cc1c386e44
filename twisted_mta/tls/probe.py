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

from twisted_mta import failures
from twisted_mta.config import Config
from twisted_mta.tls import fallback as fb
from twisted_mta.outbound.attempt import Attempt, AttemptContext, DNSResolver, tcp_connector
from twisted_mta.outbound.client import SessionFailed, Transaction
from twisted_mta.tls import published as pub
from twisted_mta.tls.engine import TLSEngine
from twisted_mta.outbound.router import NextHop
from twisted_mta.tls.handshake import shadow_verdict
from twisted_mta.tls.policy import STRICT


def _day(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


@defer.inlineCallbacks
def explain(config: Config, domain: str, reactor, run_blocking, resolver=None,
            message: dict | None = None, tls: TLSEngine | None = None, published=None):
    """
    Fires with a JSON-able report for C{domain}.  C{message} (age,
    attempts, tls_failures of a queued message) makes the fallback
    decision the one that message would get.  C{published} (DANE and
    MTA-STS look-ups, L{twisted_mta.tap.make_published}) adds what the
    destination publishes and lets it choose the policy, as in delivery.
    """
    settings = config.outbound
    ctx = AttemptContext(settings=settings, hostname=config.hostname, clock=reactor,
                         run_blocking=run_blocking,
                         resolver=resolver or DNSResolver(config.dns),
                         connect=tcp_connector(reactor, settings.connect_timeout),
                         tls=tls if tls is not None else TLSEngine(settings.tls),
                         published=published)
    domain = domain.lower().rstrip(".")
    smarthost = settings.smarthost_for(domain)
    message = message or {}
    hop = NextHop(domain=domain, smarthost=smarthost,
                  requiretls=bool(message.get("requiretls")),
                  tls_required_no=bool(message.get("tls_required_no"))
                  and not message.get("requiretls") and settings.tls.honor_tls_required_no)
    attempt = Attempt(ctx, hop)  # the delivery attempt's own steps, in a dry run
    report: dict[str, Any] = {"domain": domain, "hosts": []}
    if message.get("requiretls"):
        report["message_tag"] = (
            "REQUIRETLS: verified TLS to an MX host validated by DNSSEC or MTA-STS, which "
            "must offer REQUIRETLS (RFC 8689); otherwise the message is returned (5.7.30 or "
            "5.7.10)")
    elif message.get("tls_required_no"):
        report["message_tag"] = (
            "TLS-Required: No: the recipient's DANE and MTA-STS are not enforced (RFC 8689)"
            if hop.tls_required_no else
            "TLS-Required: No, not honoured here ([outbound.tls] honor_tls_required_no = "
            "false)")
    report["route"] = (f"smarthost {smarthost.destination} ({smarthost.tls})"
                       if smarthost is not None else "MX")
    if published is not None and smarthost is None:
        yield published.start()
        state = published.dane_state
        report["dane"] = {"enabled": state.enabled, "why": state.reason}
    try:
        records, port, mx_facts, sts = yield attempt.hosts()
    except SessionFailed as e:
        report["error"] = str(e.outcome)
        return report
    if mx_facts is not None:
        report["mx_dnssec"] = _dns(mx_facts.result)
    if sts is not None:
        report["mta_sts"] = _sts(sts, published)
    for record in records:
        plan = yield attempt.host_plan(record, port, mx_facts, sts)
        choice = plan.choice
        entry: dict[str, Any] = {
            "host": plan.host, "preference": None if smarthost else plan.preference,
            "policy": choice.requirements.policy, "policy_from": choice.reason,
            "source": choice.source,
            "fallback": choice.fallback, "fallback_from": choice.fallback_from,
            "addresses": []}
        if choice.shadow is not None:
            entry["shadow"] = choice.shadow.policy
        if plan.facts is not None and plan.facts.host.dane != pub.OFF:
            entry["dane"] = _host_dane(plan.facts.host)
        if choice.requirements.requires_tls and fb.can_send_cleartext(
                ctx.tls.decider(choice.fallback), choice.requirements) and \
                choice.source not in ("dane", "mta-sts"):
            entry["cleartext_warning"] = (
                f"the fallback decider \"{choice.fallback}\" lets mail for {domain} go out "
                f"in cleartext after a TLS failure, although its policy "
                f"\"{choice.requirements.policy}\" requires TLS")
        report["hosts"].append(entry)
        if plan.failure is not None:
            e = SessionFailed(failures.tls(plan.failure), tls_failure=plan.failure)
            entry["refused"] = _failed(attempt, e, choice, domain, message or {})
            continue
        if plan.error is not None:
            entry["error"] = str(plan.error)
            continue
        for address in plan.addresses:
            entry["addresses"].append((yield _probe(attempt, domain, plan.host, address, port,
                                                    choice, message or {})))
    return report


def _dns(result) -> dict[str, Any]:
    return {"name": result.name, "type": result.rdtype, "status": result.status,
            "secure": result.secure, "records": list(result.record_texts()),
            "canonical_name": result.canonical_name, "why": result.reason,
            "text": result.describe()}


def _host_dane(h) -> dict[str, Any]:
    out: dict[str, Any] = {"state": h.dane, "why": h.why, "tlsa_name": h.tlsa_name,
                           "names": list(h.names)}
    if h.addresses is not None:
        out["addresses_dnssec"] = {"status": h.addresses.status,
                                   "secure": h.addresses.secure,
                                   "canonical_name": h.addresses.canonical_name}
    if h.tlsa is not None:
        out["tlsa_lookup"] = _dns(h.tlsa)
    out["records"] = [{"record": r.to_text(), "names": r.names,
                       "usable": r.is_usable, "unusable_because": r.unusable_reason}
                      for r in h.records]
    return out


def _sts(lookup, published) -> dict[str, Any]:
    out: dict[str, Any] = {"mode": lookup.mode, "source": lookup.source, "why": lookup.why,
                           "txt_id": lookup.record.id if lookup.record else None}
    if lookup.error is not None:
        out["fetch_error"] = {"result_type": lookup.error.result_type,
                              "detail": lookup.error.detail}
    entry = lookup.entry
    policy = lookup.policy
    if policy is not None:
        out.update({"mx": list(policy.mx), "max_age": policy.max_age})
    if entry is not None:
        out.update({"id": entry.policy_id, "fetched": _time(entry.fetched_at),
                    "expires": _time(entry.expires)})
    cache = published.sts_cache if published is not None else None
    if cache is not None:
        out["cache"] = "fetching" if cache.fetching(lookup.domain) else (
            "cached" if cache.entry(lookup.domain) is not None else "not cached")
    return out


def _time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


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
        if e.tls_record is not None and e.tls_record.version is not None:
            out["tls"] = {"version": e.tls_record.version, "cipher": e.tls_record.cipher,
                          "verified": False,
                          "verification_required": choice.requirements.verify}
            if e.tls_record.dane is not None:
                out["tls"]["dane"] = _verdict(e.tls_record.dane)
        out.update(_failed(attempt, e, choice, domain, message))
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
        if record.dane is not None:
            out["tls"]["dane"] = _verdict(record.dane)
        elif not record.verified:
            out["tls"]["not_verified_because"] = record.unverified_reason
            strict = shadow_verdict(STRICT.settings, client.tls, True, client.capabilities,
                                    host, address, port)
            out["tls"]["would_fail_strict"] = strict.kind if strict else (
                record.unverified_reason or "?")
    out["capabilities"] = sorted(client.capabilities)
    client.quit()
    yield client.closed
    return out


def _failed(attempt: Attempt, e: SessionFailed, choice, domain: str,
            message: dict) -> dict[str, Any]:
    """
    A TLS failure, and the decision a queued message in this situation
    would get, with the words its sender would read.
    """
    f = e.tls_failure
    out: dict[str, Any] = {"tls_failure": {"kind": f.kind, "detail": f.detail,
                                           "tlsrpt_result": f.tlsrpt_result,
                                           "problem": f.describe()}}
    if f.certificate is not None:
        out["certificate"] = _cert(f.certificate)
    e.choice = choice
    txn = Transaction(sender="", recipients=(f"postmaster@{domain}",), message=None,
                      age=message.get("age", 0.0), attempts=message.get("attempts", 0),
                      tls_failures=message.get("tls_failures", 0))
    decision, _ = attempt.decide(e, txn, dry_run=True)
    situation = attempt.situation(f, choice, txn)
    out["decision"] = {"action": decision.action, "decider": decision.decider,
                       "rule": decision.rule, "later": decision.later,
                       "reason": decision.reason}
    out["sender_would_read"] = attempt.ctx.tls.explain(f, choice, domain, decision, situation)
    return out


def _verdict(v) -> dict[str, Any]:
    return {"status": v.status, "record": v.record.to_text() if v.record else None,
            "depth": v.depth, "why": v.describe(), "tlsrpt_result": v.tlsrpt_result}


def _cert(c) -> dict[str, Any]:
    return {"subject": c.subject, "names": list(c.sans), "issuer": c.issuer,
            "not_before": _day(c.not_before), "not_after": _day(c.not_after),
            "self_signed": c.self_signed}


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['domain']}: delivered by {report['route']}"]
    if "message_tag" in report:
        lines.append(f"  the message: {report['message_tag']}")
    if "dane" in report:
        d = report["dane"]
        lines.append(f"  DANE: {'on' if d['enabled'] else 'off'} ({d['why']})")
    if "mx_dnssec" in report:
        lines.append(f"  MX records: {_dnssec_words(report['mx_dnssec'])}")
    if "mta_sts" in report:
        lines.extend(_sts_lines(report["mta_sts"]))
    if "error" in report:
        lines.append(f"  no delivery possible: {report['error']}")
    for h in report["hosts"]:
        pref = f"MX {h['preference']} " if h["preference"] is not None else ""
        source = {"entry": "written", "default": "[outbound.tls] fallback",
                  "policy": "the policy's default"}.get(h.get("fallback_from", ""), "")
        lines.append(f"{pref}{h['host']}: policy {h['policy']} (chosen by {h['policy_from']}),"
                     f" fallback {h['fallback']}" + (f" ({source})" if source else ""))
        lines.append(f"  decided by: {SOURCE_WORDS.get(h.get('source'), h.get('source'))}"
                     + (f"; shadow {h['shadow']} (report only)" if h.get("shadow") else ""))
        if "dane" in h:
            lines.extend(_dane_lines(h["dane"]))
        if h.get("cleartext_warning"):
            lines.append(f"  WARNING: {h['cleartext_warning']}")
        if "error" in h:
            lines.append(f"  {h['error']}")
        if "refused" in h:
            lines.append("  not contacted:")
            lines.extend(_failure_lines(h["refused"]))
        for a in h["addresses"]:
            lines.extend(_address_lines(a))
    return "\n".join(lines) + "\n"


SOURCE_WORDS = {
    "config": "an explicit entry of the configuration",
    "dane": "DANE (the host's TLSA records)",
    "mta-sts": "MTA-STS (the domain's policy, mode enforce)",
    "default": "the default policy (nothing explicit, nothing published)",
}


def _dnssec_words(d: dict[str, Any]) -> str:
    secure = "DNSSEC-secure" if d["secure"] else "not DNSSEC-validated"
    why = f" ({d['why']})" if d.get("why") else ""
    return f"{d['status']}, {secure}{why}"


def _sts_lines(m: dict[str, Any]) -> list[str]:
    if m["mode"] == "none" and not m.get("id"):
        out = [f"  MTA-STS: none ({m['why']})"]
    else:
        out = [f"  MTA-STS: mode {m['mode']}, id {m.get('id') or m.get('txt_id')}, max_age "
               f"{m.get('max_age')}, mx {', '.join(m.get('mx') or []) or 'none'}"]
        if m.get("fetched"):
            out.append(f"    fetched {m['fetched']}, in force until {m['expires']}; "
                       f"{m.get('cache', '')} ({m['why']})")
    if m.get("fetch_error"):
        e = m["fetch_error"]
        out.append(f"    fetch failed: {e['result_type']}: {e['detail']}")
    return out


def _dane_lines(d: dict[str, Any]) -> list[str]:
    out = []
    if "addresses_dnssec" in d:
        a = d["addresses_dnssec"]
        out.append(f"  addresses: {a['status']}, "
                   f"{'DNSSEC-secure' if a['secure'] else 'not DNSSEC-validated'}")
    out.append(f"  DANE: {d['state']}: {d['why']}")
    for r in d.get("records", []):
        use = "usable" if r["usable"] else f"unusable: {r['unusable_because']}"
        out.append(f"    TLSA {r['record']} ({r['names']}; {use})")
    return out


def _failure_lines(a: dict[str, Any]) -> list[str]:
    import textwrap
    f, d = a["tls_failure"], a["decision"]
    rule = f" [{d['rule']}]" if d.get("rule", "decider") != "decider" else ""
    lines = [f"    TLS FAILED: {f['kind']}" + (f" ({f['detail']})" if f["detail"] else "")
             + f"; TLS-RPT {f['tlsrpt_result']}",
             f"    fallback {d['decider']}: {d['action']}{rule} - {d['reason']}",
             "    a sender would read:"]
    lines.extend(textwrap.wrap(a["sender_would_read"], 76, initial_indent="      ",
                               subsequent_indent="      "))
    return lines


def _address_lines(a: dict[str, Any]) -> list[str]:
    lines = [f"  {a['address']} port {a['port']}:"]
    if a.get("error"):
        return lines + [f"    no session: {a['error']}"]
    tls = a.get("tls")
    if not a.get("ok") and tls:
        required = "required" if tls["verification_required"] or tls.get("dane") else ""
        lines.append(f"    {tls['version']} {tls['cipher']}; certificate NOT verified"
                     + (f" ({required})" if required else ""))
        if tls.get("dane"):
            lines.append(f"    DANE: {tls['dane']['why']}")
        tls = None
    if a.get("ok") and tls is None:
        lines.append(f"    no TLS: {a.get('note')}")
    elif tls:
        v = "verified" if tls["verified"] else "NOT verified"
        need = "required" if tls["verification_required"] else "not required"
        why = f": {tls['not_verified_because']}" if tls.get("not_verified_because") else ""
        if tls.get("dane"):
            v = "verified by DANE" if tls["verified"] else "NOT authenticated (DANE)"
            why, need = "", "TLS required"
        lines.append(f"    {tls['version']} {tls['cipher']}; certificate {v}{why} ({need})")
        if tls.get("dane"):
            lines.append(f"    DANE: {tls['dane']['why']}")
        elif not tls["verified"]:
            lines.append(f"    under strict this would fail: {tls['would_fail_strict']}")
    c = a.get("certificate")
    if c:
        names = ", ".join(c["names"]) or "(none)"
        lines.append(f"    certificate: {c['subject']}; names {names}; issuer "
                     f"{c['issuer']}; valid {c['not_before']} to {c['not_after']}")
    if "tls_failure" in a:
        lines.extend(_failure_lines(a))
    elif a.get("ok"):
        lines.append("    delivery would go ahead")
    return lines
