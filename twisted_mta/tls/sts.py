"""
MTA-STS (RFC 8461): what a recipient domain publishes and what it means.

A domain that publishes MTA-STS has a TXT record at C{_mta-sts.<domain>}
(C{v=STSv1; id=...}) and a policy at
C{https://mta-sts.<domain>/.well-known/mta-sts.txt}::

    version: STSv1
    mode: enforce
    mx: mail.example.com
    mx: *.example.net
    max_age: 86400

This module holds the two parsers (strict, per the ABNF of RFC 8461 3.1 and
3.2), the L{Policy} with its MX matching (4.1), the errors a policy fetch
can end with, each with its TLS-RPT result type (RFC 8460 4.3.2.2), and a
blocking TXT lookup for dnspython.  The fetch over HTTPS is
L{twisted_mta.tls.sts_fetch}, the cache on disk and the decision to use,
fetch or refresh a policy L{twisted_mta.tls.sts_cache}.

Strict means: a TXT record or policy that does not follow the grammar is
no record or no policy, with a reason in words (C{tls explain} shows it).
What the grammar allows we accept, including fields we do not know
(extensions), which are kept and otherwise ignored.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import attrs

# -- names and limits -----------------------------------------------------------------

TXT_LABEL = "_mta-sts"
POLICY_HOST_LABEL = "mta-sts"
WELL_KNOWN_PATH = "/.well-known/mta-sts.txt"
MAX_AGE_LIMIT = 31557600  # a year (RFC 8461 3.2)
MAX_POLICY_SIZE = 64 * 1024  # octets; RFC 8461 3.3 suggests 64 KiB

# TLS-RPT result types of MTA-STS policy failures (RFC 8460 4.3.2.2).
FETCH_ERROR = "sts-policy-fetch-error"
POLICY_INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"

MODES = ("enforce", "testing", "none")

_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")


def normalize_domain(domain: str) -> str:
    """
    C{domain} lower-cased, without a trailing dot, in ASCII (IDNA A-labels
    for a name given in Unicode).  Raises C{ValueError} for anything that
    is not a host name made of letters, digits and hyphens.
    """
    name = domain.strip().rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"{domain!r} is not a valid domain name ({e})") from None
    name = name.lower()
    if len(name) > 253 or not _HOST.fullmatch(name):
        raise ValueError(f"{domain!r} is not a valid domain name")
    return name


def txt_name(domain: str) -> str:
    """
    Where the TXT record of C{domain} is: C{_mta-sts.<domain>}.
    """
    return f"{TXT_LABEL}.{normalize_domain(domain)}"


def policy_host(domain: str) -> str:
    """
    The host that serves the policy of C{domain}: C{mta-sts.<domain>}.
    """
    return f"{POLICY_HOST_LABEL}.{normalize_domain(domain)}"


def policy_url(domain: str) -> str:
    return f"https://{policy_host(domain)}{WELL_KNOWN_PATH}"


# -- the TXT record (RFC 8461 3.1) ----------------------------------------------------

@attrs.frozen
class StsRecord:
    """
    A valid C{_mta-sts} TXT record: its policy id and any extension fields
    (name, value), in order.
    """

    id: str
    extensions: tuple[tuple[str, str], ...] = ()


class InvalidRecord(ValueError):
    """
    A TXT record that begins like an MTA-STS record but does not follow
    the grammar; the message says why.
    """


# sts-text-record = sts-version 1*(*WSP %x3B *WSP sts-field) [%x3B]
# sts-field       = sts-id / sts-extension
# sts-id          = %s"id=" 1*32(ALPHA / DIGIT)
# sts-extension   = sts-ext-name "=" sts-ext-value
# sts-ext-name    = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
# sts-ext-value   = 1*(%x21-3A / %x3C / %x3E-7E)   ; VCHAR but "=" and ";"
_RECORD_VERSION = "v=STSv1"
_RECORD_FIELD = re.compile(
    r"[ \t]*;[ \t]*([A-Za-z0-9][A-Za-z0-9_.-]{0,31})=([\x21-\x3a\x3c\x3e-\x7e]+)")
# The optional sts-field-delim after the last field: *WSP ";" *WSP.
_RECORD_END = re.compile(r"(?:[ \t]*;[ \t]*)?")
_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")
# A record "begins with v=STSv1" (3.1) when the version is a whole field.
_CANDIDATE = re.compile(r"v=STSv1(?![^ \t;])")


def parse_sts_record(text: str) -> StsRecord:
    """
    Parse one TXT record (its strings already joined).  Raises
    L{InvalidRecord} with the reason.
    """
    if not text.startswith(_RECORD_VERSION):
        raise InvalidRecord(f"does not begin with {_RECORD_VERSION}")
    pos, fields = len(_RECORD_VERSION), []
    while (m := _RECORD_FIELD.match(text, pos)) is not None:
        fields.append((m.group(1), m.group(2)))
        pos = m.end()
    end = _RECORD_END.match(text, pos)
    if end.end() != len(text):
        raise InvalidRecord(f"cannot parse {text[pos:pos + 20]!r} after "
                            f"{text[:pos][-20:]!r} (fields are name=value, separated "
                            f"by ';', nothing after the last one but a ';')")
    ids = [value for name, value in fields if name == "id"]
    if not ids:
        raise InvalidRecord("no id field")
    # A repeated field: only the first counts (RFC 8461 3.2, which covers
    # TXT records too); the others are ignored, not an error.
    if not _RECORD_ID.fullmatch(ids[0]):
        raise InvalidRecord(f"the id {ids[0]!r} is not 1 to 32 letters and digits")
    return StsRecord(ids[0], tuple((n, v) for n, v in fields if n != "id"))


def _record_text(record: str | bytes | Sequence[bytes]) -> str:
    """
    The text of one TXT record: its character-strings joined without
    spaces (3.1); octets outside ASCII are kept as Latin-1 characters,
    which no field allows.
    """
    if isinstance(record, str):
        return record
    if isinstance(record, (bytes, bytearray)):
        return bytes(record).decode("latin-1")
    return b"".join(record).decode("latin-1")


def examine_sts_records(records: Iterable[str | bytes | Sequence[bytes]]
                        ) -> tuple[StsRecord | None, str]:
    """
    The MTA-STS record among the TXT records at C{_mta-sts.<domain>} (each
    a string, or the record's character-strings as C{bytes}), and words
    for what was found.  Records that do not begin with C{v=STSv1} are
    ignored; unless exactly one is left and it is valid, the domain has no
    MTA-STS record (RFC 8461 3.1) and the record is None.
    """
    candidates = [t for t in map(_record_text, records) if _CANDIDATE.match(t)]
    if not candidates:
        return None, "no v=STSv1 TXT record"
    if len(candidates) > 1:
        return None, f"{len(candidates)} v=STSv1 TXT records (exactly one is allowed)"
    try:
        record = parse_sts_record(candidates[0])
    except InvalidRecord as e:
        return None, f"invalid TXT record {candidates[0][:80]!r}: {e}"
    return record, f"TXT record id={record.id}"


def find_sts_record(records: Iterable[str | bytes | Sequence[bytes]]) -> StsRecord | None:
    """
    L{examine_sts_records} without the words.
    """
    return examine_sts_records(records)[0]


# -- the policy (RFC 8461 3.2) ------------------------------------------------------------

class InvalidPolicy(ValueError):
    """
    A policy body that does not follow the grammar or lacks a required
    field; the message says why (with the line number where there is one).
    """


@attrs.frozen
class Policy:
    """
    A valid policy.  C{mx} holds the patterns as written, lower-cased;
    C{extensions} the fields we do not know, (name, value) in order;
    C{text} the body as fetched (for the cache and for people).
    """

    mode: str
    max_age: int
    mx: tuple[str, ...]
    extensions: tuple[tuple[str, str], ...] = ()
    text: str = attrs.field(default="", eq=False, repr=False)

    def matching_pattern(self, mx_host: str) -> str | None:
        """
        The first C{mx} pattern that C{mx_host} matches (RFC 8461 4.1), or
        None.  A pattern C{*.example.com} matches a name with exactly one
        more label on the left (C{mail.example.com}, not C{example.com} nor
        C{a.b.example.com}); any other pattern matches only the same name.
        Case and a trailing dot do not count.
        """
        host = mx_host.strip().rstrip(".").lower()
        if not host:
            return None
        for pattern in self.mx:
            if pattern.startswith("*."):
                first, dot, rest = host.partition(".")
                if dot and first and rest == pattern[2:]:
                    return pattern
            elif host == pattern:
                return pattern
        return None

    def matches(self, mx_host: str) -> bool:
        return self.matching_pattern(mx_host) is not None

    def describe(self) -> str:
        mx = ", ".join(self.mx) or "no mx"
        return f"mode {self.mode}, max_age {self.max_age}, mx {mx}"


# sts-policy-record = sts-policy-field *WSP *(sts-policy-term sts-policy-field *WSP)
#                     [sts-policy-term]
# sts-policy-term   = LF / CRLF
# a field           = name ":" *WSP value
# sts-policy-ext-name  = (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".")
# sts-policy-ext-value = sts-policy-vchar [*(%x20 / sts-policy-vchar) sts-policy-vchar]
# sts-policy-vchar     = %x21-7E / UTF8-2 / UTF8-3 / UTF8-4
_VCHAR = r"[\x21-\x7e\u0080-\U0010ffff]"
_POLICY_FIELD = re.compile(
    rf"([A-Za-z0-9][A-Za-z0-9_.-]{{0,31}}):[ \t]*({_VCHAR}(?:[ \x21-\x7e\u0080-\U0010ffff]*"
    rf"{_VCHAR})?)[ \t]*")
_MAX_AGE = re.compile(r"[0-9]{1,10}")
_ONCE = ("version", "mode", "max_age")


def parse_policy(body: bytes | str) -> Policy:
    """
    Parse a policy body.  Raises L{InvalidPolicy} with the reason.

    Lines end with LF or CRLF (the last one may have none); every line is
    a field (C{name: value}, spaces or tabs allowed after the colon and at
    the end); C{version} (C{STSv1}), C{mode} and C{max_age} appear at least
    once (the first of each counts, later ones are ignored), C{mx} at least
    once unless the mode is C{none}; names and the known values are
    case-sensitive; other fields are extensions.
    """
    if isinstance(body, (bytes, bytearray)):
        try:
            text = bytes(body).decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidPolicy(f"not UTF-8 text (octet {e.start + 1})") from None
    else:
        text = body
    if not text.strip():
        raise InvalidPolicy("empty policy")
    content = text
    if content.endswith("\r\n"):
        content = content[:-2]
    elif content.endswith("\n"):
        content = content[:-1]
    lines = content.split("\n")
    seen: dict[str, str] = {}
    mx: list[str] = []
    extensions: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if line.endswith("\r"):
            line = line[:-1]
        where = f"line {number}"
        if not line:
            raise InvalidPolicy(f"{where} is empty")
        m = _POLICY_FIELD.fullmatch(line)
        if m is None:
            if "\r" in line:
                raise InvalidPolicy(f"{where}: a CR not followed by LF")
            raise InvalidPolicy(f"{where}: {line[:60]!r} is not a field (name: value)")
        name, value = m.group(1), m.group(2)
        if name in _ONCE:
            if name in seen:
                # Only the first of a repeated field counts; the rest are
                # ignored, whatever they say (RFC 8461 3.2).
                continue
            seen[name] = value
        if name == "version":
            if value != "STSv1":
                raise InvalidPolicy(f"{where}: version must be STSv1, not {value!r}")
        elif name == "mode":
            if value not in MODES:
                raise InvalidPolicy(f"{where}: mode must be enforce, testing or none, "
                                    f"not {value!r}")
        elif name == "max_age":
            if not _MAX_AGE.fullmatch(value):
                raise InvalidPolicy(f"{where}: max_age must be a number of seconds "
                                    f"(up to 10 digits), not {value!r}")
            if int(value) > MAX_AGE_LIMIT:
                raise InvalidPolicy(f"{where}: max_age {int(value)} is more than "
                                    f"{MAX_AGE_LIMIT} (a year)")
        elif name == "mx":
            pattern = _mx_pattern(value, where)
            if pattern not in mx:
                mx.append(pattern)
        else:
            extensions.append((name, value))
    for name in _ONCE:
        if name not in seen:
            raise InvalidPolicy(f"no {name} field")
    if not mx and seen["mode"] != "none":
        raise InvalidPolicy(f"no mx field (required in mode {seen['mode']})")
    return Policy(mode=seen["mode"], max_age=int(seen["max_age"]), mx=tuple(mx),
                  extensions=tuple(extensions), text=text)


def _mx_pattern(value: str, where: str) -> str:
    # sts-policy-mx-value = ["*."] Domain (RFC 5321: letters, digits, hyphens)
    name = value[2:] if value.startswith("*.") else value
    if "*" in name:
        raise InvalidPolicy(f"{where}: mx {value!r}: a wildcard is allowed only as the "
                            f"whole left-most label (*.example.com)")
    if len(name) > 253 or not _HOST.fullmatch(name):
        raise InvalidPolicy(f"{where}: mx {value!r} is not a host name")
    return value.lower()


# -- failures of a policy fetch -------------------------------------------------------------

def report_strings(policy) -> list[str]:
    """
    A policy as RFC 8460 4.5's C{policy-string}: one element per line,
    one C{mx:} element per pattern (what TLS reports name it by).
    """
    lines = ["version: STSv1", f"mode: {policy.mode}"]
    lines += [f"mx: {m}" for m in policy.mx]
    lines.append(f"max_age: {policy.max_age}")
    lines += [f"{k}: {v}" for k, v in policy.extensions]
    return lines


class StsError(Exception):
    """
    A policy could not be had: C{result_type} is the TLS-RPT result type,
    C{detail} short words for what went wrong, C{url} where we looked.
    """

    result_type = FETCH_ERROR
    what = "could not be fetched"

    def __init__(self, domain: str, detail: str, url: str = "") -> None:
        super().__init__(domain, detail, url)
        self.domain = domain
        self.detail = detail
        self.url = url or _url_or_empty(domain)

    def __str__(self) -> str:
        return f"the MTA-STS policy of {self.domain} {self.what} ({self.url}): {self.detail}"

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.args == other.args

    def __hash__(self) -> int:
        return hash((type(self), self.args))


def _url_or_empty(domain: str) -> str:
    try:
        return policy_url(domain)
    except ValueError:
        return ""


class StsFetchError(StsError):
    """
    Network, DNS, HTTP status, redirect, timeout, size or media type.
    """

    result_type = FETCH_ERROR


class StsWebPKIError(StsError):
    """
    The HTTPS server's certificate is not valid for C{mta-sts.<domain>}
    (chain, dates or name).
    """

    result_type = WEBPKI_INVALID
    what = "could not be authenticated"


class StsPolicyInvalid(StsError):
    """
    The body is not a valid policy.
    """

    result_type = POLICY_INVALID
    what = "is not valid"


# -- the TXT lookup (blocking, dnspython) ------------------------------------------------

class StsDNSError(Exception):
    """
    The TXT lookup failed for a reason other than "no such record".
    """


def lookup_sts_txt(resolver, domain: str) -> list[bytes]:
    """
    The TXT records at C{_mta-sts.<domain>} through C{resolver} (a
    C{dns.resolver.Resolver}), each as its strings joined; an empty list
    when there are none (NXDOMAIN, no TXT).  Blocking: run it in the I/O
    pool.  Raises L{StsDNSError} for a failure (SERVFAIL, timeout).
    """
    return txt_strings(resolver, txt_name(domain), StsDNSError)


def txt_strings(resolver, name: str, error: type[Exception]) -> list[bytes]:
    """
    The TXT records at C{name} (MTA-STS's and TLS-RPT's), each as its
    strings joined without spaces; empty for NXDOMAIN or no TXT; any other
    DNS failure raises C{error} with one line of words.  Blocking.
    """
    from twisted_mta import nodoh  # noqa: F401  (before any dns module)
    import dns.exception
    import dns.resolver

    try:
        answer = resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as e:
        raise error(f"TXT lookup for {name} failed: {e or type(e).__name__}") from None
    return [b"".join(rdata.strings) for rdata in answer]
