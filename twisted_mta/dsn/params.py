"""
The SMTP DSN extension's parameters (RFC 3461): RET and ENVID on MAIL,
NOTIFY and ORCPT on RCPT, and the xtext encoding they travel in.

SECURITY: ENVID and the ORCPT address come back in the header fields of the
DSNs we send (Original-Envelope-Id, Original-Recipient).  RFC 3461 4.2 and
4.4 require their decoded values to be printable US-ASCII; a value with a
CR or LF in it (C{ENVID=abc+0D+0AX-Injected:+20yes}) would forge fields in
the report, so anything else is refused here, with the 501 5.5.4 Postfix
gives.
"""

from __future__ import annotations

import re

import twisted.mail.smtp  # noqa: F401 (registers the "xtext" codec)

NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")
RET_VALUES = ("FULL", "HDRS")
ENVID_MAX = 100  # octets, encoded (RFC 3461 4.4)

_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")
_PRINTABLE = re.compile(r"[ -~]*")  # RFC 3461 4.2, 4.4: graphic characters and space


class DSNParamError(ValueError):
    """
    A DSN parameter is malformed; the message says how.
    """


def xtext_decode(value: str) -> str:
    """
    The text an xtext value carries (its octets read as UTF-8), or
    L{DSNParamError} for anything RFC 3461 4 does not allow.

    Twisted's C{xtext} codec does the decoding; it accepts what the RFC
    does not (raw C{=}, spaces and controls, lower-case hex) and crashes
    with a C{TypeError} on a C{+} without two hex digits, so the value is
    checked here first.
    """
    for i, ch in enumerate(value):
        if ch == "+":
            if not _XTEXT_HEX.match(value, i):
                raise DSNParamError("bad xtext: '+' must be followed by two upper-case "
                                    "hex digits")
        elif not ("!" <= ch <= "~") or ch == "=":
            raise DSNParamError(f"bad xtext: character {ch!r} must be encoded as +XX")
    # The codec gives each octet as the character of that number (latin-1).
    return value.encode("ascii").decode("xtext").encode("latin-1").decode("utf-8", "replace")


def xtext_encode(value: str) -> str:
    """
    C{value}'s UTF-8 octets as xtext.  Twisted's codec encodes a C{str}
    one character at a time by its code point (C{"\u20ac"} would become
    C{+20AC}, not octets), so it is given the octets as latin-1 characters.
    """
    return value.encode("utf-8").decode("latin-1").encode("xtext").decode("ascii")


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


def parse_orcpt(value: str | None, utf8: bool = False) -> str:
    """
    C{addr-type;xtext} -> C{"addr-type;decoded"} (type lower-cased).

    With C{utf8} (the transaction has SMTPUTF8, RFC 6533 3) the address
    may be UTF-8: as xtext of its UTF-8 octets (what Postfix sends) or,
    for the type C{utf-8}, with C{\\x{HEX}} escapes; its type is then
    C{utf-8}.  Control characters are refused either way.
    """
    if not value or ";" not in value:
        raise DSNParamError("ORCPT must be addr-type;address, e.g. rfc822;user@example.com")
    kind, _, address = value.partition(";")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", kind) or not address:
        raise DSNParamError("ORCPT must be addr-type;address, e.g. rfc822;user@example.com")
    decoded = xtext_decode(address)
    kind = kind.lower()
    if kind == "utf-8":
        decoded = _EMBEDDED.sub(_unescape, decoded)
    if _PRINTABLE.fullmatch(decoded):
        return f"{kind};{decoded}"
    if utf8 and not _CONTROLS.search(decoded) and "\ufffd" not in decoded:
        return f"utf-8;{decoded}"
    raise DSNParamError("ORCPT address must be printable US-ASCII once decoded "
                        "(RFC 3461 4.2)" + (", or UTF-8 without controls (RFC 6533)"
                                            if utf8 else ""))


_EMBEDDED = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")  # RFC 6533 3: EmbeddedUnicodeChar
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _unescape(m: re.Match) -> str:
    point = int(m.group(1), 16)
    if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
        raise DSNParamError("ORCPT: \\x{...} is not a Unicode scalar value")
    return chr(point)


def utf8_addr_xtext(address: str) -> str:
    """
    C{address} as RFC 6533's utf-8-addr-xtext: ASCII as itself (but "+",
    "=", "\\" and controls), everything else as C{\\x{HEX}}; ASCII
    only, so it may go to any server.
    """
    return "".join(ch if "!" <= ch <= "~" and ch not in "+=\\" else f"\\x{{{ord(ch):X}}}"
                   for ch in address)


def parse_ret(value: str | None) -> str:
    if value is None or value.upper() not in RET_VALUES:
        raise DSNParamError("RET must be FULL or HDRS")
    return value.upper()


def parse_envid(value: str | None) -> str:
    if not value:
        raise DSNParamError("ENVID needs a value")
    if len(value) > ENVID_MAX:
        raise DSNParamError(f"ENVID is longer than {ENVID_MAX} characters")
    decoded = xtext_decode(value)
    if not _PRINTABLE.fullmatch(decoded):
        raise DSNParamError("ENVID must be printable US-ASCII once decoded (RFC 3461 4.4)")
    return decoded
