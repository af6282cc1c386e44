"""
Discovery of where a policy domain wants its TLS reports (RFC 8460 §3):
the C{_smtp._tls.<domain>} TXT record, parsed strictly.  Anything wrong
with it means no report for that domain, never a guess: a report sent to
a misread address is worse than none.

Decisions where the RFC is silent:
 - a C{rua=} URI with another scheme than C{mailto:} or C{https:} is
   skipped (named in the reason); the record stays valid when at least one
   usable URI remains, so a future scheme does not silence the others;
 - DMARC's C{!size} suffix is not part of TLSRPT: C{mailto:a@b.example!10m}
   is not an address (a domain has no C{!}) and that URI is skipped;
 - a C{mailto:} URI's C{?header=} part is dropped; %-escapes are decoded;
 - C{rua=} given twice makes the record invalid (which one would count?).
"""

from __future__ import annotations

import re
import urllib.parse

import attrs

from twisted_mta.address import AddressError, parse_mailbox
from twisted_mta.tls.sts import txt_strings

VERSION = "v=TLSRPTv1;"
_WSP = " \t"
# RFC 8460 §3: tlsrpt-ext-name and tlsrpt-ext-value
_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")


def txt_name(domain: str) -> str:
    return f"_smtp._tls.{domain.rstrip('.')}."


@attrs.frozen
class Rua:
    """
    One place to send reports: C{scheme} "mailto" with the decoded address
    as C{target}, or "https" with the URL.
    """

    scheme: str
    target: str


@attrs.frozen
class TLSRPTRecord:
    ruas: tuple[Rua, ...]

    @property
    def mailto(self) -> tuple[str, ...]:
        return tuple(r.target for r in self.ruas if r.scheme == "mailto")

    @property
    def https(self) -> tuple[str, ...]:
        return tuple(r.target for r in self.ruas if r.scheme == "https")


@attrs.frozen
class Discovery:
    """
    What a look-up found: the record (None: no reporting) and, when there
    is none or part of it was skipped, why in words.
    """

    domain: str
    record: TLSRPTRecord | None
    why: str = ""


class TLSRPTDNSError(Exception):
    """
    The TXT look-up failed (SERVFAIL, timeout): try again later.
    """


def _uri(text: str) -> tuple[Rua | None, str]:
    scheme, colon, rest = text.partition(":")
    scheme = scheme.lower()
    if not colon or not rest:
        return None, f"{text!r} is not a URI"
    if scheme == "mailto":
        try:
            address = urllib.parse.unquote(rest.partition("?")[0], errors="strict")
            parsed = parse_mailbox(address)
        except (AddressError, ValueError):
            parsed = None
        if parsed is None or not parsed.domain or parsed.domain.startswith("["):
            return None, f"{text!r} is not one mail address"
        return Rua("mailto", str(parsed)), ""
    if scheme == "https":
        try:
            url = urllib.parse.urlsplit(text)
            host = url.hostname
        except ValueError:
            host = None
        if not host or any(c in text for c in _WSP):
            return None, f"{text!r} is not an https URL"
        return Rua("https", text), ""
    return None, f"{text!r}: scheme {scheme!r} is not mailto or https"


def parse_record(text: str) -> tuple[TLSRPTRecord | None, str]:
    """
    One record (its strings already joined) by the §3 grammar: the record,
    or None and why.  The second item may name URIs skipped from a valid
    record.
    """
    if not text.startswith(VERSION):
        return None, f"does not begin with {VERSION!r}"
    fields = [f.strip(_WSP) for f in text[len(VERSION):].split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing field-delim
    if not fields:
        return None, "no fields after the version"
    ruas: list[Rua] | None = None
    skipped: list[str] = []
    for field in fields:
        name, eq, value = field.partition("=")
        if not eq or not _EXT_NAME.fullmatch(name):
            return None, f"{field[:60]!r} is not a name=value field"
        if name == "rua":
            if ruas is not None:
                return None, "rua= given twice"
            ruas = []
            for part in value.split(","):
                part = part.strip(_WSP)
                if not part:
                    return None, "an empty URI in rua="
                rua, why = _uri(part)
                if rua is None:
                    skipped.append(why)
                else:
                    ruas.append(rua)
        elif not _EXT_VALUE.fullmatch(value):
            return None, f"field {name!r} has an invalid value"
    if ruas is None:
        return None, "no rua= field"
    if not ruas:
        return None, "no usable rua= URI: " + "; ".join(skipped)
    return TLSRPTRecord(tuple(ruas)), "; ".join(f"skipped {w}" for w in skipped)


def examine_records(records: list[bytes]) -> tuple[TLSRPTRecord | None, str]:
    """
    The TXT records at C{_smtp._tls} (each with its strings joined): those
    not beginning with the version are discarded, exactly one must remain.
    """
    texts = []
    for raw in records:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            if raw.startswith(VERSION.encode()):
                texts.append(None)
            continue
        if text.startswith(VERSION):
            texts.append(text)
    if not texts:
        return None, "no TLSRPT record"
    if len(texts) > 1:
        return None, f"{len(texts)} TLSRPT records (exactly one is allowed)"
    if texts[0] is None:
        return None, "the TLSRPT record is not ASCII"
    return parse_record(texts[0])


def lookup_txt(resolver, domain: str) -> list[bytes]:
    """
    The TXT records at C{_smtp._tls.<domain>} through C{resolver} (a
    C{dns.resolver.Resolver}), each as its strings joined without spaces;
    empty for NXDOMAIN or no TXT.  Blocking: run it in the I/O pool.
    """
    return txt_strings(resolver, txt_name(domain), TLSRPTDNSError)


def discover(resolver, domain: str) -> Discovery:
    """
    Look up and examine C{domain}'s record (blocking).  Raises
    L{TLSRPTDNSError} when DNS failed, so the caller can try again rather
    than treat the domain as not reporting.
    """
    record, why = examine_records(lookup_txt(resolver, domain))
    return Discovery(domain, record, why)
