"""
The TLS-RPT report itself (RFC 8460 4 and 5.1), from a day's counts:
pure functions, no I/O.

- L{build}: the report's JSON object for one policy domain and UTC day,
  exactly as RFC 8460 4.4 lays it out;
- L{to_gzip}: its bytes, gzip-compressed (5.2), the same bytes for the
  same report (no time in the gzip header);
- L{filename}: the file name of 5.1,
  C{submitter!policy-domain!begin!end!unique-id.json.gz};
- L{day_bounds}: the day's first and last second, for the file name;
- L{report_id}: an id that is the same for the same day and domain;
- L{describe}: one domain's day in plain words (C{tls report show}).

Choices where the RFC leaves room (docs/tls.md, "TLS reporting"):
the date range is the full UTC day written as the RFC's own example does
(C{00:00:00Z} to C{23:59:59Z}); C{mx-host} is a list of patterns (the
RFC's schema calls it a string but an MTA-STS policy has several, and
most readers take a list); fields we do not know are left out, never
written empty; C{failure-details} is left out when nothing failed.
"""

from __future__ import annotations

import datetime
import gzip
import json
import re
from typing import Any, Iterable

from twisted_mta.tlsrpt.counts import PolicyCounts

_UNIQUE = re.compile(r"^[A-Za-z0-9]+$")


def as_date(day: str | datetime.date) -> datetime.date:
    """
    A UTC day, from C{"2026-12-03"} or a date.
    """
    if isinstance(day, datetime.date):
        return day
    return datetime.date.fromisoformat(day)


def day_bounds(day: str | datetime.date) -> tuple[int, int]:
    """
    The POSIX times of the day's first and last second (UTC).
    """
    start = datetime.datetime.combine(as_date(day), datetime.time(), datetime.timezone.utc)
    begin = int(start.timestamp())
    return begin, begin + 86399


def a_label(domain: str) -> str:
    """
    The domain in A-labels, lower case, no trailing dot (RFC 8460 4.4:
    policy-domain and mx-host never carry U-labels).
    """
    domain = domain.strip().rstrip(".").lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


def build(day: str | datetime.date, policy_domain: str, counts: Iterable[PolicyCounts],
          organization: str, contact: str, report_id: str) -> dict[str, Any]:
    """
    The RFC 8460 4.4 report of C{policy_domain} for the UTC C{day}: one
    entry of C{policies} per policy that applied that day (always a list),
    each with its summary and, when sessions failed, the failure details
    (most frequent first).  C{contact} may be written C{mailto:...}.
    """
    date = as_date(day).isoformat()
    policies = []
    for c in sorted(counts, key=lambda c: (c.policy.policy_type, c.policy.strings,
                                          c.policy.mx_host)):
        policy: dict[str, Any] = {"policy-type": c.policy.policy_type}
        if c.policy.strings:
            policy["policy-string"] = list(c.policy.strings)
        policy["policy-domain"] = a_label(policy_domain)
        if c.policy.mx_host:
            policy["mx-host"] = [a_label(m) if not m.startswith("*.") else
                                 "*." + a_label(m[2:]) for m in c.policy.mx_host]
        entry: dict[str, Any] = {
            "policy": policy,
            "summary": {"total-successful-session-count": c.successes,
                        "total-failure-session-count": c.failures},
        }
        details = sorted(c.details.items(), key=lambda item: (
            -item[1], item[0].result_type, sorted(item[0].fields().items())))
        if details:
            entry["failure-details"] = [d.to_json(n) for d, n in details if n > 0]
        policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{date}T00:00:00Z",
                       "end-datetime": f"{date}T23:59:59Z"},
        "contact-info": contact.removeprefix("mailto:"),
        "report-id": report_id,
        "policies": policies,
    }


def report_id(day: str | datetime.date, policy_domain: str, submitter: str) -> str:
    """
    A report id that is the same for the same day, domain and submitter
    (so a report sent twice can be told as one, RFC 8460 5.3), in the
    C{left@right} form the Subject's Report-ID takes:
    C{"2026-12-03.example.org@example.net"}.
    """
    return f"{as_date(day).isoformat()}.{a_label(policy_domain)}@{a_label(submitter)}"


def to_json(report: dict[str, Any]) -> bytes:
    """
    The report as I-JSON (RFC 7493): UTF-8, no NaN, keys in the RFC's order.
    """
    return json.dumps(report, ensure_ascii=False, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")


def to_gzip(report: dict[str, Any]) -> bytes:
    """
    The report's JSON, gzip-compressed with no time or name in the header,
    so the same report always gives the same bytes.
    """
    return gzip.compress(to_json(report), compresslevel=9, mtime=0)


def filename(submitter: str, policy_domain: str, begin: int, end: int,
             unique_id: str | None = None) -> str:
    """
    RFC 8460 5.1: C{submitter!policy-domain!begin!end[!unique-id].json.gz},
    the times in POSIX seconds; C{unique_id} is letters and digits only.
    """
    for value in (begin, end):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"a timestamp must be a non-negative integer, not {value!r}")
    name = f"{a_label(submitter)}!{a_label(policy_domain)}!{begin}!{end}"
    if unique_id is not None:
        if not _UNIQUE.match(unique_id):
            raise ValueError(f"the unique id must be letters and digits, not {unique_id!r}")
        name += f"!{unique_id}"
    return name + ".json.gz"


def describe(day: str | datetime.date, policy_domain: str,
             counts: Iterable[PolicyCounts]) -> str:
    """
    One line per domain and day, in plain words: C{"example.org,
    2026-12-03: 1,204 sessions, 3 failed: certificate-expired at
    mx2.example.org [192.0.2.1] (3)"}, the policies that applied after.
    """
    counts = list(counts)
    successes = sum(c.successes for c in counts)
    failures = sum(c.failures for c in counts)
    total = successes + failures
    line = (f"{policy_domain}, {as_date(day).isoformat()}: {total:,} "
            f"session{'' if total == 1 else 's'}")
    groups: dict[tuple, int] = {}
    for c in counts:
        for d, n in c.details.items():
            key = (d.result_type, d.receiving_mx_hostname, d.receiving_ip)
            groups[key] = groups.get(key, 0) + n
    if failures:
        parts = []
        for (kind, host, address), n in sorted(groups.items(), key=lambda i: (-i[1], i[0])):
            where = " at " + " ".join(w for w in (host, f"[{address}]" if address else None)
                                      if w) if host or address else ""
            parts.append(f"{kind}{where} ({n:,})")
        line += f", {failures:,} failed: " + "; ".join(parts)
    else:
        line += ", none failed"
    kinds = sorted({_policy_words(c) for c in counts})
    return line + f" (policy: {', '.join(kinds)})"


def _policy_words(c: PolicyCounts) -> str:
    p = c.policy
    if p.policy_type == "sts":
        mode = next((s.partition(":")[2].strip() for s in p.strings
                     if s.startswith("mode:")), "")
        return f"MTA-STS{' ' + mode if mode else ''}"
    if p.policy_type == "tlsa":
        host = f" for {p.mx_host[0]}" if p.mx_host else ""
        return f"DANE{host}"
    return "none published"
