"""
RFC 8460 4.4 as a JSON Schema, written from the RFC's text (its field list
and the descriptions under "JSON Report Format"), for the tests of the
reports we build; and the same rules as plain checks (L{problems}) that
need no library.

Where the RFC's text and its example differ (C{mx-host}: a string in the
schema, and in Appendix B), either a string or a list of strings is
accepted; C{receiving-mx-helo}, C{additional-information} and the policy's
C{policy-string}/C{mx-host} are optional, as 4.4 and 4.5 say.
"""

import datetime
import ipaddress
import re

RESULT_TYPES = [
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
    "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
]
_STRINGS = {"type": "array", "items": {"type": "string"}}
_COUNT = {"type": "integer", "minimum": 0}
_DATETIME = {"type": "string",
             "pattern": r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$"}
_ADDR = {"type": "string", "minLength": 3}
_DOMAIN = {"type": "string", "pattern": r"^[A-Za-z0-9.*-]+$"}  # A-labels only

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["organization-name", "date-range", "contact-info", "report-id", "policies"],
    "properties": {
        "organization-name": {"type": "string", "minLength": 1},
        "date-range": {
            "type": "object", "required": ["start-datetime", "end-datetime"],
            "properties": {"start-datetime": _DATETIME, "end-datetime": _DATETIME},
            "additionalProperties": False,
        },
        "contact-info": {"type": "string", "pattern": r"^[^@\s]+@[^@\s]+$"},
        "report-id": {"type": "string", "minLength": 1},
        "policies": {
            "type": "array", "minItems": 1,
            "items": {
                "type": "object", "required": ["policy", "summary"],
                "additionalProperties": False,
                "properties": {
                    "policy": {
                        "type": "object", "required": ["policy-type", "policy-domain"],
                        "additionalProperties": False,
                        "properties": {
                            "policy-type": {"enum": ["tlsa", "sts", "no-policy-found"]},
                            "policy-string": _STRINGS,
                            "policy-domain": _DOMAIN,
                            "mx-host": {"anyOf": [_DOMAIN, {"type": "array",
                                                            "items": _DOMAIN}]},
                        },
                    },
                    "summary": {
                        "type": "object", "additionalProperties": False,
                        "required": ["total-successful-session-count",
                                     "total-failure-session-count"],
                        "properties": {"total-successful-session-count": _COUNT,
                                       "total-failure-session-count": _COUNT},
                    },
                    "failure-details": {
                        "type": "array",
                        "items": {
                            "type": "object", "additionalProperties": False,
                            "required": ["result-type", "failed-session-count"],
                            "properties": {
                                "result-type": {"enum": RESULT_TYPES},
                                "sending-mta-ip": _ADDR,
                                "receiving-mx-hostname": _DOMAIN,
                                "receiving-mx-helo": {"type": "string", "minLength": 1},
                                "receiving-ip": _ADDR,
                                "failed-session-count": {"type": "integer", "minimum": 1},
                                "additional-information": {"type": "string",
                                                           "format": "uri"},
                                "failure-reason-code": {"type": "string", "minLength": 1},
                            },
                        },
                    },
                },
            },
        },
    },
    "additionalProperties": False,
}


def problems(report: dict) -> list[str]:
    """
    What in C{report} breaks RFC 8460 4.4 beyond the schema: RFC 3339
    times that parse, a range that covers a full UTC day, addresses that
    are IP addresses, failure counts that add up to the summary.
    """
    out = []
    rng = report["date-range"]
    start = datetime.datetime.fromisoformat(rng["start-datetime"].replace("Z", "+00:00"))
    end = datetime.datetime.fromisoformat(rng["end-datetime"].replace("Z", "+00:00"))
    if (start.hour, start.minute, start.second) != (0, 0, 0) or \
            not 86399 <= (end - start).total_seconds() <= 86400:
        out.append(f"not a full UTC day: {rng}")
    for p in report["policies"]:
        details = p.get("failure-details", [])
        for d in details:
            for key in ("sending-mta-ip", "receiving-ip"):
                if key in d:
                    try:
                        ipaddress.ip_address(d[key])
                    except ValueError:
                        out.append(f"{key} is not an IP address: {d[key]!r}")
        failed = sum(d["failed-session-count"] for d in details)
        if failed != p["summary"]["total-failure-session-count"]:
            out.append(f"failure details add up to {failed}, the summary says "
                       f"{p['summary']['total-failure-session-count']}")
        if p["policy"]["policy-type"] == "tlsa":
            for s in p["policy"].get("policy-string", []):
                if not re.fullmatch(r"\d{1,3} \d{1,3} \d{1,3} [0-9a-fA-F]+", s):
                    out.append(f"not a TLSA record in presentation form: {s!r}")
    return out


def validate(testcase, report: dict) -> None:
    """
    Fail C{testcase} unless C{report} follows the schema and the checks.
    """
    import jsonschema
    jsonschema.Draft202012Validator(SCHEMA).validate(report)
    testcase.assertEqual(problems(report), [])
