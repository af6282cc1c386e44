"""
The SMTP DSN extension's parameters (RFC 3461): RET and ENVID on MAIL,
NOTIFY and ORCPT on RCPT, and the xtext encoding they travel in.
"""

from __future__ import annotations

import re

NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")
RET_VALUES = ("FULL", "HDRS")
ENVID_MAX = 100  # octets, encoded (RFC 3461 4.4)

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


class DSNParamError(ValueError):
    """
    A DSN parameter is malformed; the message says how.
    """


def xtext_decode(value: str) -> str:
    for i, ch in enumerate(value):
        if ch == "+":
            if not _XTEXT_HEX.match(value, i):
                raise DSNParamError("bad xtext: '+' must be followed by two upper-case "
                                    "hex digits")
        elif not ("!" <= ch <= "~") or ch == "=":
            raise DSNParamError(f"bad xtext: character {ch!r} must be encoded as +XX")
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == "+":
            out.append(int(value[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(value[i]))
            i += 1
    return out.decode("utf-8", "replace")


def xtext_encode(value: str) -> str:
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=" else
                    "".join(f"+{b:02X}" for b in ch.encode("utf-8")) for ch in value)


def parse_notify(value: str | None) -> tuple[str, ...]:
    """
    C{NEVER} gives an empty tuple; otherwise the listed conditions.
    """
    if not value:
        raise DSNParamError("NOTIFY needs a value: NEVER, or SUCCESS, FAILURE and/or DELAY")
    items = [v.strip().upper() for v in value.split(",")]
    if items == ["NEVER"]:
        return ()
    if "NEVER" in items:
        raise DSNParamError("NOTIFY=NEVER cannot be combined with other values")
    for item in items:
        if item not in NOTIFY_VALUES:
            raise DSNParamError(f"NOTIFY value {item!r} is not SUCCESS, FAILURE, DELAY or NEVER")
    return tuple(v for v in NOTIFY_VALUES if v in items)


def parse_orcpt(value: str | None) -> str:
    """
    C{addr-type;xtext} -> C{"addr-type;decoded"} (type lower-cased).
    """
    if not value or ";" not in value:
        raise DSNParamError("ORCPT must be addr-type;address, e.g. rfc822;user@example.com")
    kind, _, address = value.partition(";")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", kind) or not address:
        raise DSNParamError("ORCPT must be addr-type;address, e.g. rfc822;user@example.com")
    return f"{kind.lower()};{xtext_decode(address)}"


def parse_ret(value: str | None) -> str:
    if value is None or value.upper() not in RET_VALUES:
        raise DSNParamError("RET must be FULL or HDRS")
    return value.upper()


def parse_envid(value: str | None) -> str:
    if not value:
        raise DSNParamError("ENVID needs a value")
    if len(value) > ENVID_MAX:
        raise DSNParamError(f"ENVID is longer than {ENVID_MAX} characters")
    return xtext_decode(value)
