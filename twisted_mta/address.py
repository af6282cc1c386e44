"""
Parse the paths and parameters of MAIL FROM and RCPT TO (RFC 5321 4.1.2).

SECURITY: the input is a command line from an untrusted peer.  Parsing is
strict about structure (angle brackets, one mailbox, no control
characters) so that nothing ambiguous reaches the envelope, and bounded by
the RFC's size limits (in octets).  Source routes are accepted and dropped
(RFC 5321 appendix C); quoted local parts are kept as written.

UTF-8 (RFC 6531 3.3) is allowed in local parts and domains only with the
SMTPUTF8 parameter of MAIL; a domain in UTF-8 must be a valid IDNA2008
name (its A-label form, L{a_label}, is what routing and MX lookups use).
Without the parameter, a non-ASCII path raises L{NonASCIIAddress}.
"""

from __future__ import annotations

import ipaddress
import re

import attrs
import idna

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[[^\[\]\\\s]+\]"
_MAILBOX = re.compile(rf"^(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})$")
# RFC 6531 3.3: atext, qtext and sub-domains gain UTF8-non-ascii (RFC 6532
# 3.1); the C1 controls (U+0080-U+009F) stay out, like the C0 ones.
_U8 = "\u00a0-\U0010ffff"
_ATEXT_U = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~{_U8}-]"
_DOT_STRING_U = rf"{_ATEXT_U}+(?:\.{_ATEXT_U}+)*"
_QUOTED_U = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U8}]|\\[\x20-\x7e{_U8}])*"'
_LABEL_U = rf"[A-Za-z0-9{_U8}](?:[A-Za-z0-9{_U8}-]{{0,61}}[A-Za-z0-9{_U8}])?"
_DOMAIN_U = rf"{_LABEL_U}(?:\.{_LABEL_U})*"
_MAILBOX_U = re.compile(
    rf"^(?P<local>{_DOT_STRING_U}|{_QUOTED_U})@(?P<domain>{_DOMAIN_U}|{_LITERAL})$")
_ROUTE = re.compile(rf"^@{_DOMAIN}(?:,@{_DOMAIN})*:")
_PARAM = re.compile(r"^(?P<key>[A-Za-z0-9][A-Za-z0-9-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?$")

MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


class AddressError(ValueError):
    """
    The path is not an acceptable address; C{str()} says why, for the reply.
    """


class NonASCIIAddress(AddressError):
    """
    A path in UTF-8 without the SMTPUTF8 parameter (RFC 6531 3.5: 5.6.7).
    """


def a_label(domain: str) -> str:
    """
    The ASCII (A-label) form of C{domain} for DNS and comparisons: an
    ASCII domain as it is (lower-cased), a U-label one through IDNA2008
    (RFC 5891; UTS 46 mapping folds case first).  Raises L{AddressError}
    when the name is not valid IDNA.
    """
    if domain.isascii():
        return domain.lower()
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as e:
        raise AddressError(f"bad internationalised domain name ({e})")


def ascii_address(address: str) -> str | None:
    """
    C{address} as it may go to a server without SMTPUTF8 (SMTP or LMTP):
    ASCII as it is, a UTF-8 domain as its A-label; None when the local part
    is UTF-8 (or the domain is not valid IDNA).
    """
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{a_label(domain)}"
    except AddressError:
        return None


@attrs.frozen
class Address:
    local: str
    domain: str  # lower-cased; empty only for the bare "postmaster" recipient

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def is_postmaster(self) -> bool:
        return self.local.lower() == "postmaster"



@attrs.frozen
class ParsedCommand:
    address: Address | None  # None is the null reverse-path <>
    params: dict[str, str | None]


def _split_path(arg: str, keyword: str) -> tuple[str, str]:
    """
    Split C{FROM:<path> params} into the path (without brackets) and the rest.
    """
    if arg[: len(keyword)].upper() != keyword:
        raise AddressError(f"syntax: expected {keyword}<address>")
    rest = arg[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):
        raise AddressError("address must be enclosed in <>")
    end = _closing_bracket(rest)
    if end < 0:
        raise AddressError("missing closing >")
    return rest[1:end], rest[end + 1:]


def _closing_bracket(text: str) -> int:
    in_quote = False
    i = 1
    while i < len(text):
        c = text[i]
        if c == "\\" and in_quote:
            i += 2
            continue
        if c == '"':
            in_quote = not in_quote
        elif c == ">" and not in_quote:
            return i
        i += 1
    return -1


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    if text and not text.startswith(" "):
        raise AddressError("garbage after address")
    for word in text.split():
        m = _PARAM.match(word)
        if not m:
            raise AddressError(f"bad parameter {word[:40]!r}")
        params[m.group("key").upper()] = m.group("value")
    return params


def parse_mailbox(path: str, utf8: bool = False) -> Address:
    """
    One mailbox; with C{utf8} (the transaction has SMTPUTF8) UTF-8 is
    allowed in it, and a UTF-8 domain is kept as given (lower-cased) once
    it is found valid IDNA.
    """
    if not utf8 and not path.isascii():
        raise NonASCIIAddress("non-ASCII address without SMTPUTF8")
    if len(path.encode("utf-8")) + 2 > MAX_PATH:
        raise AddressError("path too long")
    m = _ROUTE.match(path)
    if m:
        path = path[m.end():]
    m = (_MAILBOX_U if utf8 else _MAILBOX).match(path)
    if not m:
        raise AddressError("bad address syntax")
    local, domain = m.group("local"), m.group("domain")
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part longer than 64 octets")
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError("domain longer than 255 octets")
    if domain.startswith("["):
        _check_literal(domain)
    elif not domain.isascii():
        a_label(domain)  # valid IDNA, or AddressError
    return Address(local=local, domain=domain.lower())


def _check_literal(literal: str) -> None:
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError("bad address literal")


def parse_mail_from(arg: str) -> ParsedCommand:
    """
    MAIL FROM: a UTF-8 path needs the command's own SMTPUTF8 parameter.
    """
    path, rest = _split_path(arg, "FROM:")
    params = _parse_params(rest)
    if path == "":
        return ParsedCommand(address=None, params=params)
    return ParsedCommand(address=parse_mailbox(path, utf8="SMTPUTF8" in params), params=params)


def parse_rcpt_to(arg: str, utf8: bool = False) -> ParsedCommand:
    """
    RCPT TO: C{utf8} when the transaction's MAIL had SMTPUTF8.
    """
    path, rest = _split_path(arg, "TO:")
    params = _parse_params(rest)
    if path.lower() == "postmaster":
        return ParsedCommand(address=Address(local=path, domain=""), params=params)
    return ParsedCommand(address=parse_mailbox(path, utf8=utf8), params=params)
