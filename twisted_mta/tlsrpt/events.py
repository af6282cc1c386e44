"""
The C{tls.result} event: what the delivery attempt tells its observers
about each TLS session outcome with a destination, in RFC 8460's terms
(the aggregate, L{twisted_mta.tlsrpt.store.Aggregate}, counts them).

L{result} makes the event from what the attempt knows: the policy choice
(L{twisted_mta.tls.policy.Choice}, with what the destination publishes),
the TLS failure if there was one, and the session's facts.  It decides
what is counted (docs/tls.md, "TLS reporting"):

- the policy: C{tlsa} when the host's DANE records chose the policy (the
  records as C{"3 1 1 <hex>"}, the host as C{mx-host}); C{sts} when the
  domain's MTA-STS policy did (mode enforce), or when a policy in mode
  testing shadows the default (its verdict is the result; delivery goes
  on); else C{no-policy-found} (also when an explicit entry of our
  configuration chose the policy);
- a failure: the TLS failure's result type (L{TLSFailure.tlsrpt_result}),
  and its kind (and detail) as the C{failure-reason-code};
- a success: a session whose TLS handshake completed under the policy;
- a session in cleartext because the server did not offer STARTTLS
  counts as a failure C{starttls-not-supported} (RFC 8460 4.2.2, 4.3.1:
  a failure to negotiate a TLS-enabled connection); one in cleartext
  because our own policy sent none (policy C{none}) is not counted.
"""

from __future__ import annotations

from typing import Any

from twisted_mta.tls.sts import report_strings
from twisted_mta.tlsrpt.counts import NO_POLICY, STS, SUCCESS, TLSA

EVENT = "tls.result"


def policy_of(choice) -> dict[str, Any]:
    """
    The RFC 8460 policy of a L{Choice}: C{policy-type}, and where there
    is one C{policy-string} and C{mx-host}.
    """
    facts = choice.published
    if choice.source == "dane":
        records = choice.requirements.tlsa or ()
        out: dict[str, Any] = {"policy-type": TLSA,
                               "policy-string": [r.to_text() for r in records]}
        if facts is not None:
            out["mx-host"] = [facts.host.host]
        return out
    lookup = facts.sts if facts is not None else None
    policy = lookup.policy if lookup is not None else None
    if policy is not None and (choice.source == "mta-sts" or (
            choice.source == "default" and policy.mode == "testing")):
        return {"policy-type": STS, "policy-string": sts_strings(policy),
                "mx-host": list(policy.mx)}
    return {"policy-type": NO_POLICY}


def testing_sts(choice) -> bool:
    """
    Whether an MTA-STS policy in mode testing is the policy reported (its
    shadow verdict is then the session's result).
    """
    facts = choice.published
    lookup = facts.sts if facts is not None else None
    return choice.source == "default" and lookup is not None and \
        lookup.policy is not None and lookup.policy.mode == "testing"


sts_strings = report_strings  # RFC 8460 4.5's policy-string of an MTA-STS policy


def result(domain: str, choice, time: float, *, failure=None, host: str,
           address: str | None = None, local: str | None = None, helo: str | None = None,
           tls: bool = True, starttls: str = "if-offered") -> dict[str, Any] | None:
    """
    The C{tls.result} event of one session with C{host} (at C{address},
    from our C{local} address; C{helo}: the name the server gave), or
    None when it is not counted.  C{failure}: the TLS failure (a refusal,
    a failed handshake or check, or a testing policy's verdict); else
    C{tls} says whether the handshake completed and C{starttls} what our
    policy asked for.
    """
    event: dict[str, Any] = {"time": time, "domain": domain, **policy_of(choice)}
    if failure is not None:
        detail = failure.detail if failure.detail not in failure.kind else ""
        reason = failure.kind + (f": {detail}" if detail else "")
        event.update({"result": failure.tlsrpt_result, "failure-reason-code": reason})
    elif tls:
        event["result"] = SUCCESS
    elif starttls == "never":
        return None  # our policy sent in cleartext: nothing was tried
    else:
        event.update({"result": "starttls-not-supported",
                      "failure-reason-code": "starttls-not-offered"})
    if event["result"] != SUCCESS:
        for key, value in (("sending-mta-ip", local), ("receiving-mx-hostname", host),
                           ("receiving-mx-helo", helo), ("receiving-ip", address)):
            if value:
                event[key] = value
    return event
