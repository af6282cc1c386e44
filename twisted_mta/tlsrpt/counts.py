"""
What the TLS-RPT aggregate counts, as values: the policy that applied
(L{Policy}), one group of failure details (L{Detail}) and a policy's
counts for one domain and day (L{PolicyCounts}), with their JSON forms
for the day files (L{twisted_mta.tlsrpt.store}) and the event the
delivery attempt sends (L{from_event}).

The key names follow RFC 8460 4.4, so the event, the day file and the
report read alike.
"""

from __future__ import annotations

from typing import Any

import attrs

# RFC 8460 4.4 policy-type values.
TLSA, STS, NO_POLICY = "tlsa", "sts", "no-policy-found"
POLICY_TYPES = (TLSA, STS, NO_POLICY)
SUCCESS = "success"  # an event's result when the session was a success

# RFC 8460 4.3 (and the IANA registry, 6.6): the result types.
RESULT_TYPES = (
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)

# The optional fields of a failure-details entry, in the RFC's order.
DETAIL_FIELDS = ("sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo",
                 "receiving-ip", "failure-reason-code")


@attrs.frozen
class Policy:
    """
    The policy that applied to a session, as RFC 8460 4.4 names it:
    C{policy_type} (tlsa, sts, no-policy-found), C{strings} (the TLSA
    records as C{"3 1 1 <hex>"}, or the MTA-STS policy's lines), and
    C{mx_host} (the MTA-STS policy's mx patterns, or the DANE host).
    """

    policy_type: str
    strings: tuple[str, ...] = ()
    mx_host: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"policy-type": self.policy_type}
        if self.strings:
            out["policy-string"] = list(self.strings)
        if self.mx_host:
            out["mx-host"] = list(self.mx_host)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Policy:
        kind = data["policy-type"]
        if kind not in POLICY_TYPES:
            raise ValueError(f"unknown policy-type {kind!r}")
        return cls(kind, _strings(data.get("policy-string", [])),
                   _strings(data.get("mx-host", [])))


@attrs.frozen
class Detail:
    """
    One group of failed sessions: the result type and what identifies the
    sessions (sending address, MX host, its greeting name, its address,
    the reason); a field not known is None and left out of the report.
    """

    result_type: str
    sending_mta_ip: str | None = None
    receiving_mx_hostname: str | None = None
    receiving_mx_helo: str | None = None
    receiving_ip: str | None = None
    failure_reason_code: str | None = None

    def fields(self) -> dict[str, str]:
        values = (self.sending_mta_ip, self.receiving_mx_hostname, self.receiving_mx_helo,
                  self.receiving_ip, self.failure_reason_code)
        return {k: v for k, v in zip(DETAIL_FIELDS, values) if v}

    def to_json(self, count: int) -> dict[str, Any]:
        """
        The failure-details entry, its keys in the order of RFC 8460 4.4.
        """
        fields = self.fields()
        reason = fields.pop("failure-reason-code", None)
        out = {"result-type": self.result_type, **fields, "failed-session-count": count}
        if reason:
            out["failure-reason-code"] = reason
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> tuple[Detail, int]:
        count = data["failed-session-count"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"bad failed-session-count {count!r}")
        values = [data.get(k) for k in DETAIL_FIELDS]
        if not isinstance(data["result-type"], str) or \
                not all(v is None or isinstance(v, str) for v in values):
            raise ValueError("failure details must be strings")
        return cls(data["result-type"], *values), count


@attrs.define
class PolicyCounts:
    """
    One policy's counts for one domain and day: sessions that succeeded,
    sessions that failed, and the failures grouped by L{Detail}.
    """

    policy: Policy
    successes: int = 0
    failures: int = 0
    details: dict[Detail, int] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy.to_json(), "successes": self.successes,
                "failures": self.failures,
                "details": [d.to_json(n) for d, n in self.details.items()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PolicyCounts:
        successes, failures = data["successes"], data["failures"]
        for n in (successes, failures):
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ValueError(f"bad count {n!r}")
        details: dict[Detail, int] = {}
        for item in data["details"]:
            detail, count = Detail.from_json(item)
            details[detail] = details.get(detail, 0) + count
        return cls(Policy.from_json(data["policy"]), successes, failures, details)


def from_event(event: dict[str, Any]) -> tuple[Policy, Detail | None]:
    """
    The policy and (for a failure) the detail group of a C{tls.result}
    event (L{twisted_mta.tlsrpt.events.result}).
    """
    policy = Policy(event["policy-type"], tuple(event.get("policy-string", ())),
                    tuple(event.get("mx-host", ())))
    if event["result"] == SUCCESS:
        return policy, None
    return policy, Detail(event["result"], *(event.get(k) for k in DETAIL_FIELDS))


def _strings(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, not {value!r}")
    return tuple(value)
