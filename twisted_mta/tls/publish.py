"""
What an admin publishes so that senders can require authenticated TLS to
this server's own domains, checked against what is published now.

The receiving side of issue 12: the TLSA C{3 1 1} record of each MX host
(DANE, RFC 7672), and the next key's for a rollover; the C{_mta-sts} TXT
record and the policy file (MTA-STS, RFC 8461); the C{_smtp._tls} TXT
record (TLS-RPT, RFC 8460).  The checks catch what would make senders that
rely on them defer mail to us: published TLSA records that the certificate
no longer matches (or will not match after the key rollover), a
certificate about to expire or without the MX name, a policy changed
without a new id.

Nothing here touches the network: the DNS lookups and the policy fetch
are callables handed in (L{Lookups}, L{dns_lookups} for a resolver), so
L{build} is a function of its inputs and the unit tests need no DNS.
L{load_keys} reads the key files the configuration names.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timedelta
from typing import Any, Callable, Iterable, Sequence

import attrs

from twisted_mta.config import Config, PublishSettings, TLSServerSettings
from twisted_mta.tls import dnssec, sts
from twisted_mta.tls.dane import (
    DANE_EE, DANE_TA, SPKI, TLSARecord, association, certificate_facts, match, record_for,
    tlsa_name, usable,
)
from twisted_mta.tls.failure import CertificateFacts

EXPIRY_WARNING = timedelta(days=30)
STS_ID_LENGTH = 16  # hex digits of the policy's SHA-256 (RFC 8461 allows 1 to 32)
TLSRPT_LABEL = "_smtp._tls"

# The level of a check.
OK, NOTE, WARNING = "ok", "note", "warning"


class LookupFailed(Exception):
    """
    A lookup or fetch that failed other than with "no such record"
    (SERVFAIL, a timeout, an HTTPS error); the message says why, in one
    line.
    """


@attrs.frozen
class Answer:
    """
    What one DNS question found: C{records} (L{TLSARecord}s, or the TXT
    records' texts), none for NXDOMAIN or NODATA; C{secure} whether a
    validating resolver vouched for them.
    """

    records: tuple = attrs.field(default=(), converter=tuple)
    secure: bool = False


@attrs.frozen
class Lookups:
    """
    How L{build} learns what is published; each raises L{LookupFailed}.
    """

    tlsa: Callable[[str], Answer]  # the TLSA RRset at a name
    txt: Callable[[str], Answer]  # the TXT records at a name, as text
    policy: Callable[[str], sts.Policy]  # the MTA-STS policy a domain serves now


@attrs.frozen
class Keys:
    """
    The certificate chain the server presents (leaf first; empty when none
    is configured or it cannot be read), the public key of C{[tls]
    next_key} (None likewise), the files they came from, and why a file
    could not be used.
    """

    chain: tuple = ()
    certificate_file: str | None = None
    next_key: Any = None
    next_key_file: str | None = None
    problems: tuple[str, ...] = ()


@attrs.frozen
class Record:
    """
    One DNS record to publish; C{about} says what it is for.
    """

    name: str
    rtype: str
    value: str
    about: str = ""

    def zone_line(self) -> str:
        """
        The record as a master-file line, the owner name absolute.
        """
        value = _quoted(self.value) if self.rtype == "TXT" else self.value
        line = f"{self.name}. IN {self.rtype} {value}"
        return f"{line}  ; {self.about}" if self.about else line


@attrs.frozen
class PolicyFile:
    """
    The MTA-STS policy to serve at C{url} for C{domain}, CRLF line endings.
    """

    domain: str
    url: str
    id: str
    text: str


@attrs.frozen
class Check:
    """
    One thing checked: L{OK}, L{NOTE} (worth knowing, nothing broken) or
    L{WARNING} (senders relying on it would defer or ignore it).
    """

    level: str
    text: str


@attrs.frozen
class KeyRecord:
    """
    A key's TLSA record, the file it came from, and the certificate's
    facts (None for the next key, which is a key alone).
    """

    file: str
    record: TLSARecord
    certificate: CertificateFacts | None = None


@attrs.frozen
class Report:
    """
    Everything C{tls publish} prints.
    """

    mx_hosts: tuple[str, ...]
    domains: tuple[str, ...]
    current: KeyRecord | None
    next: KeyRecord | None
    records: tuple[Record, ...]
    policies: tuple[PolicyFile, ...]
    checks: tuple[Check, ...]

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(c.text for c in self.checks if c.level == WARNING)

    @property
    def exit_code(self) -> int:
        return 1 if self.warnings else 0

    def to_dict(self) -> dict[str, Any]:
        def key(k: KeyRecord | None) -> dict[str, Any] | None:
            if k is None:
                return None
            out: dict[str, Any] = {"file": k.file, "tlsa": k.record.to_text()}
            if k.certificate is not None:
                out["certificate"] = attrs.asdict(k.certificate,
                                                  filter=lambda _, value: value != "")
            return out
        return {
            "mx_hosts": list(self.mx_hosts),
            "domains": list(self.domains),
            "current_key": key(self.current),
            "next_key": key(self.next),
            "records": [attrs.asdict(r) for r in self.records],
            "policies": [attrs.asdict(p) for p in self.policies],
            "checks": [attrs.asdict(c) for c in self.checks],
            "warnings": list(self.warnings),
        }


# -- reading the keys ----------------------------------------------------------------

def load_keys(settings: TLSServerSettings) -> Keys:
    """
    The certificate chain of C{[tls] certificate} and the public key of
    C{[tls] next_key}.  A file that cannot be used is a problem in words,
    not an exception: the rest of the report is still worth printing.
    """
    from cryptography import x509

    problems: list[str] = []
    chain: tuple = ()
    if settings.certificate is not None:
        try:
            chain = tuple(x509.load_pem_x509_certificates(_read(settings.certificate)))
        except OSError as e:
            problems.append(f"cannot read [tls] certificate {settings.certificate}: "
                            f"{e.strerror or e}")
        except ValueError as e:
            problems.append(f"[tls] certificate {settings.certificate} holds no PEM "
                            f"certificate ({e})")
    next_key = None
    if settings.next_key is not None:
        try:
            next_key = _public_key(_read(settings.next_key))
        except OSError as e:
            problems.append(f"cannot read [tls] next_key {settings.next_key}: "
                            f"{e.strerror or e}")
        except ValueError as e:
            problems.append(f"[tls] next_key {settings.next_key}: {e}")
    return Keys(chain, settings.certificate, next_key, settings.next_key, tuple(problems))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _public_key(data: bytes):
    """
    The public key in a PEM private key (the file the server will use as
    C{[tls] key}), public key or certificate.
    """
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(data, password=None).public_key()
    except TypeError:
        raise ValueError("the key is encrypted (the server needs it unencrypted)") from None
    except (ValueError, UnsupportedAlgorithm):
        pass
    for load in (serialization.load_pem_public_key,
                 lambda d: x509.load_pem_x509_certificate(d).public_key()):
        try:
            return load(data)
        except (ValueError, UnsupportedAlgorithm):
            continue
    raise ValueError("holds no PEM private key, public key or certificate")


@attrs.frozen
class _KeyOnly:
    """
    A bare public key where L{association} expects a certificate: enough
    for selector SPKI, which is all a key rollover needs.
    """

    key: Any

    def public_key(self):
        return self.key


def _matches_key(record: TLSARecord, key) -> bool:
    """
    Whether the usable DANE-EE SPKI C{record} is C{key}'s.
    """
    if record.usage != DANE_EE or record.selector != SPKI or not record.is_usable:
        return False
    return hmac.compare_digest(association(_KeyOnly(key), SPKI, record.mtype), record.data)


# -- the suggestions -------------------------------------------------------------------

def policy_text(settings: PublishSettings, mx_hosts: Sequence[str]) -> str:
    """
    The MTA-STS policy file, with the CRLF line endings RFC 8461 3.2 shows.
    """
    lines = ["version: STSv1", f"mode: {settings.sts_mode}"]
    lines += [f"mx: {host}" for host in mx_hosts]
    lines.append(f"max_age: {settings.sts_max_age}")
    return "".join(line + "\r\n" for line in lines)


def policy_id(text: str) -> str:
    """
    The policy's id: a hash of its text, so it changes exactly when the
    policy does and senders fetch the new one (RFC 8461 3.1).
    """
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:STS_ID_LENGTH]


def tlsrpt_value(settings: PublishSettings, domain: str) -> str:
    """
    The C{_smtp._tls} TXT record: where senders send their daily reports.
    """
    rua = settings.tlsrpt_rua or (f"mailto:tlsrpt@{domain}",)
    return f"v=TLSRPTv1; rua={','.join(rua)}"


def _quoted(value: str) -> str:
    """
    A TXT value in master-file form: quoted character-strings of at most
    255 characters (a long C{rua} list needs more than one).
    """
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for c in chunks)


# -- the report --------------------------------------------------------------------------

def build(config: Config, keys: Keys, lookups: Lookups, now: datetime) -> Report:
    """
    The records and policy files to publish for C{config}'s own domains,
    and the checks of what is published now against C{keys} at C{now}.
    """
    settings = config.publish
    mx_hosts = tuple(settings.mx) or (config.hostname,)
    checks = [Check(WARNING, p) for p in keys.problems]
    current = nxt = None
    if keys.chain:
        current = KeyRecord(keys.certificate_file, record_for(keys.chain[0]),
                            certificate_facts(keys.chain[0]))
    elif keys.certificate_file is None:
        checks.append(Check(WARNING, "no [tls] certificate is configured: the server does "
                                     "not offer STARTTLS, so there is no TLSA record to "
                                     "publish, and senders enforcing MTA-STS would defer "
                                     "mail to it"))
    if keys.next_key is not None:
        nxt = KeyRecord(keys.next_key_file, record_for(_KeyOnly(keys.next_key)))
        if current is not None and nxt.record == current.record:
            checks.append(Check(NOTE, f"[tls] next_key {nxt.file} is the key in use now"))
            nxt = None

    records: list[Record] = []
    for host in mx_hosts:
        name = tlsa_name(host)
        if current is not None:
            records.append(Record(name, "TLSA", current.record.to_text(),
                                  f"DANE: the key in use now ({current.file})"))
        if nxt is not None:
            records.append(Record(name, "TLSA", nxt.record.to_text(),
                                  f"DANE: the next key ({nxt.file}); publish both, switch "
                                  "keys, then drop the old record"))
        if current is not None or nxt is not None:
            checks.extend(_check_tlsa(host, keys.chain, keys.next_key if nxt else None,
                                      lookups.tlsa, now))
    if keys.chain:
        checks.extend(_check_certificate(keys.chain[0], keys.certificate_file, mx_hosts,
                                         settings.sts_mode, now))

    text = policy_text(settings, mx_hosts)
    sid = policy_id(text)
    try:
        suggested = sts.parse_policy(text)
    except sts.InvalidPolicy as e:  # e.g. an sts_max_age of more than a year
        suggested = None
        checks.append(Check(WARNING, f"the policy made from [publish] is not valid: {e}"))
    policies: list[PolicyFile] = []
    domains = tuple(config.local.domains)
    if not domains:
        checks.append(Check(NOTE, "[local] domains is empty: no MTA-STS or TLS-RPT records "
                                  "to publish"))
    for domain in domains:
        url = sts.policy_url(domain)
        records.append(Record(sts.txt_name(domain), "TXT", f"v=STSv1; id={sid}",
                              f"MTA-STS: the policy at {url}"))
        records.append(Record(f"{TLSRPT_LABEL}.{domain}", "TXT", tlsrpt_value(settings, domain),
                              "TLS-RPT: where senders report TLS failures"))
        policies.append(PolicyFile(domain, url, sid, text))
        if suggested is not None:
            checks.extend(_check_sts(domain, sid, suggested, lookups))
    for uri in settings.tlsrpt_rua:
        if not uri.startswith(("mailto:", "https:")):
            checks.append(Check(WARNING, f"[publish] tlsrpt_rua {uri!r} is neither a mailto: "
                                         "nor an https: URI (RFC 8460 3): senders ignore it"))
    return Report(mx_hosts, domains, current, nxt, tuple(records), tuple(policies),
                  tuple(checks))


def _check_tlsa(host: str, chain: Sequence, next_key, lookup: Callable[[str], Answer],
                now: datetime) -> list[Check]:
    """
    The published TLSA RRset of C{host} against the certificate in use
    now (as a sender would match it) and against the next key.
    """
    name = tlsa_name(host)
    try:
        answer = lookup(name)
    except LookupFailed as e:
        return [Check(WARNING, f"{name}: the TLSA lookup failed ({e}); the published "
                               "records were not checked")]
    published = answer.records
    if not published:
        return [Check(WARNING, f"{name}: no TLSA record is published; senders do not use "
                               f"DANE for {host}")]
    out: list[Check] = []
    verdict = match(published, chain, (host,), now) if chain else None
    if verdict is not None:
        if verdict.authenticated:
            out.append(Check(OK, f"{name}: {verdict.record.short} matches the certificate "
                                 "in use now"))
        else:
            out.append(Check(WARNING, f"{name}: no published TLSA record matches the "
                                      f"certificate in use now: {verdict.describe()}; senders "
                                      "using DANE defer mail to it"))
    if next_key is not None:
        ahead = next((r for r in published if _matches_key(r, next_key)), None)
        if ahead is not None:
            out.append(Check(OK, f"{name}: {ahead.short} matches the next key"))
        elif verdict is not None and verdict.authenticated and verdict.record.usage == DANE_TA:
            out.append(Check(NOTE, f"{name}: no record matches the next key, but the "
                                   f"certificate in use now matches {verdict.record.short} "
                                   "(DANE-TA): a certificate for the next key from the same "
                                   "CA keeps matching"))
        else:
            out.append(Check(WARNING, f"{name}: no published TLSA record matches the next "
                                      "key: switching to it would break DANE; publish its "
                                      "record first"))
    good = usable(published)
    for r in published:
        if r not in good:
            out.append(Check(NOTE, f"{name}: {r.short} is ignored by senders: "
                                   f"{r.unusable_reason}"))
        elif r.usage == DANE_EE and not (verdict is not None and verdict.record == r) \
                and not (next_key is not None and _matches_key(r, next_key)) \
                and not (chain and match((r,), chain, (host,), now).authenticated):
            out.append(Check(NOTE, f"{name}: {r.short} matches neither the key in use now "
                                   "nor the next key: drop it once no server uses its key"))
    if not answer.secure:
        out.append(Check(NOTE, f"{name}: the answer was not DNSSEC-validated (an unsigned "
                               "zone, or a resolver that does not validate); senders use "
                               "TLSA records only from a signed zone"))
    return out


def _check_certificate(cert, path: str, mx_hosts: Iterable[str], sts_mode: str,
                       now: datetime) -> list[Check]:
    """
    Dates and names: a sender enforcing MTA-STS checks both as the WebPKI
    does (RFC 8461 4.2); DANE-EE does not, so only the dates warn early.
    """
    from service_identity import CertificateError, VerificationError
    from service_identity.cryptography import verify_certificate_hostname

    facts = certificate_facts(cert)
    out: list[Check] = []
    until = cert.not_valid_after_utc
    day = until.strftime("%Y-%m-%d")
    if until <= now:
        out.append(Check(WARNING, f"the certificate in {path} expired on {day}"))
    elif until - now <= EXPIRY_WARNING:
        days = (until - now).days
        out.append(Check(WARNING, f"the certificate in {path} expires on {day}, in {days} "
                                  f"day{'' if days == 1 else 's'}: renew it, and publish the "
                                  "new key's TLSA record first if the key changes"))
    else:
        out.append(Check(OK, f"the certificate in {path} is valid until {day}"))
    if cert.not_valid_before_utc > now:
        out.append(Check(WARNING, f"the certificate in {path} is not valid before "
                                  f"{cert.not_valid_before_utc:%Y-%m-%d}"))
    for host in mx_hosts:
        try:
            verify_certificate_hostname(cert, host)
        except (VerificationError, CertificateError, ValueError):
            names = ", ".join(facts.sans) or "no DNS name"
            out.append(Check(WARNING, f"the certificate in {path} is not valid for {host} "
                                      f"(it names {names}): senders enforcing MTA-STS need "
                                      "a WebPKI-valid certificate for the MX host"))
        else:
            out.append(Check(OK, f"the certificate in {path} names {host}"))
    if facts.self_signed:
        out.append(Check(WARNING if sts_mode == "enforce" else NOTE,
                         f"the certificate in {path} is self-signed: DANE-EE senders accept "
                         "it, senders enforcing MTA-STS do not"))
    return out


def _check_sts(domain: str, sid: str, suggested: sts.Policy, lookups: Lookups) -> list[Check]:
    """
    The published C{_mta-sts} record against the suggested policy's id;
    when the ids differ, the published policy against the suggested one
    (an id of the admin's own scheme is fine while the policy is the same).
    """
    name = sts.txt_name(domain)
    try:
        answer = lookups.txt(name)
    except LookupFailed as e:
        return [Check(WARNING, f"{name}: the TXT lookup failed ({e}); the published MTA-STS "
                               "record was not checked")]
    record, words = sts.examine_sts_records(answer.records)
    if record is None:
        level = NOTE if suggested.mode == "none" else WARNING
        return [Check(level, f"{name}: {words}; senders do not use MTA-STS for {domain}")]
    if record.id == sid:
        return [Check(OK, f"{name} publishes id={sid}, the id of this policy")]
    url = sts.policy_url(domain)
    try:
        published = lookups.policy(domain)
    except LookupFailed as e:
        return [Check(WARNING, f"{name} publishes id={record.id}, not {sid}, and the "
                               f"policy served was not checked: {e}")]
    if _same_policy(published, suggested):
        return [Check(OK, f"{name} publishes id={record.id}, not {sid}, but the policy at "
                          f"{url} is this one")]
    return [Check(WARNING, f"{name} publishes id={record.id}, not {sid}, and the policy at "
                           f"{url} differs ({published.describe()}; this one: "
                           f"{suggested.describe()}): serve this policy, then publish "
                           f"id={sid}")]


def _same_policy(a: sts.Policy, b: sts.Policy) -> bool:
    return (a.mode, a.max_age, sorted(a.mx), a.extensions) == \
        (b.mode, b.max_age, sorted(b.mx), b.extensions)


# -- DNS through a resolver --------------------------------------------------------------

def dns_lookups(resolver: dnssec.DNSSECResolver,
                policy: Callable[[str], sts.Policy]) -> Lookups:
    """
    L{Lookups} that ask C{resolver} (blocking) and fetch policies with
    C{policy}.  Each question is asked once, failures included, so a
    report built twice (L{twisted_mta.cli}: before and after fetching the
    policies it asked for) costs one round of lookups.
    """
    asked: dict[tuple[str, str], Answer | LookupFailed] = {}

    def answer(name: str, rdtype: str, convert: Callable[[Any], Any]) -> Answer:
        if (name, rdtype) not in asked:
            try:
                asked[name, rdtype] = _answer(name, rdtype, convert)
            except LookupFailed as e:
                asked[name, rdtype] = e
        found = asked[name, rdtype]
        if isinstance(found, LookupFailed):
            raise found
        return found

    def _answer(name: str, rdtype: str, convert: Callable[[Any], Any]) -> Answer:
        result = resolver.lookup(name, rdtype)
        if result.status == dnssec.BOGUS:
            raise LookupFailed(f"the answer failed DNSSEC validation: "
                               f"{result.reason or result.rcode}")
        if result.status == dnssec.ERROR:
            raise LookupFailed(result.reason or result.rcode or "no answer")
        return Answer(tuple(convert(r) for r in result.records), result.secure)

    return Lookups(
        tlsa=lambda name: answer(name, "TLSA", lambda r: TLSARecord.from_text(r.to_text())),
        txt=lambda name: answer(name, "TXT", lambda r: b"".join(r.strings)),
        policy=policy)


# -- in words ------------------------------------------------------------------------------

def format_report(report: Report) -> str:
    """
    The report for people: zone-file lines, the policy files, the checks.
    """
    lines: list[str] = []
    tlsa = [r for r in report.records if r.rtype == "TLSA"]
    if tlsa:
        lines.append("# DANE: TLSA records for the MX hosts (in a DNSSEC-signed zone)")
        lines.extend(r.zone_line() for r in tlsa)
        lines.append("")
    for policy in report.policies:
        lines.append(f"# MTA-STS and TLS-RPT for {policy.domain}")
        names = (sts.txt_name(policy.domain), f"{TLSRPT_LABEL}.{policy.domain}")
        lines.extend(r.zone_line() for r in report.records
                     if r.rtype == "TXT" and r.name in names)
        lines.append(f"# serve as text/plain at {policy.url} (CRLF line endings):")
        lines.extend(policy.text.splitlines())
        lines.append("")
    lines.append("# checks")
    lines.extend(f"{c.level}: {c.text}" for c in report.checks)
    return "\n".join(lines) + "\n"
