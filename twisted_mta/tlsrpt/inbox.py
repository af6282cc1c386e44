"""
The reader of the TLS reports other senders send us (RFC 8460): what
C{twisted-mta tls inbox} shows an admin whose report address
(C{_smtp._tls} TXT C{rua=mailto:tlsrpt@...}) is a local mailbox.

Three steps, each testable on its own:
 - L{read_file}: the reports in one file of the Maildir: a
   C{multipart/report; report-type=tlsrpt} mail with an
   C{application/tlsrpt+gzip} or C{+json} part (or the C{application/gzip},
   C{json} or C{octet-stream} parts named C{*.json.gz} / C{*.json} that
   real senders use), a mail whose body is the report itself, or the
   HTTPS-style body (the gzip or the JSON as the whole file).  Every
   report is checked against RFC 8460 §4.4; whatever is wrong with a file
   is a L{Malformed} with the reason in words, never an exception that
   stops the reader.
 - L{summarize}: counts per sending organization and our MX host, over a
   window; a report seen twice (same organization and report-id) counts
   once.
 - L{plain_words} / L{format_text} / L{Summary.to_dict}: what to fix,
   worst first, with a hint per result type.

The Maildir is only read: no message is moved, renamed or flagged.

Decisions where the RFC is silent:
 - the fields the summary needs are required with their types
   (organization-name, date-range, report-id, policies, each policy's
   policy-type, policy-domain and summary, each failure detail's
   result-type and failed-session-count); contact-info is required as the
   RFC says.  sending-mta-ip and receiving-ip, which the RFC's own example
   leaves out of a detail, are optional; any optional field present must
   have its type.  Unknown fields are ignored (the format is extensible).
 - C{mx-host} is a string in the RFC's schema and an array in its
   example: both are read.
 - a duplicate is the same report-id from the same organization (two
   senders may pick the same simple ids).
 - a failure count in C{summary} above the sum of the details is shown as
   result type C{not-detailed} (the sender truncated its details).
 - a mail with no report in it at all is other mail (L{NotAReport}: a
   report address is public and draws spam), named apart from broken
   reports; neither changes the exit status, which says whether a sender
   reported failures (1) or not (0): nothing about them is ours to fix.
 - successes are counted per policy by the senders, failures per MX
   host: a policy's successes go to its C{mx-host}, else to "the MX hosts
   of" its domain.
"""

from __future__ import annotations

import datetime
import email
import email.policy
import json
import os
import urllib.parse
import zlib
from collections import defaultdict
from typing import Any, Iterable, Iterator

import attrs

from twisted_mta.config import Config
from twisted_mta.local import AliasLoop, LocalDirectory, UnknownRecipient

# A report larger than this once decompressed is refused (a gzip bomb);
# real daily reports are kilobytes.
MAX_REPORT = 20 * 1024 * 1024
# A message file larger than this is not read (its report would be over
# MAX_REPORT anyway, as base64 of a gzip that does not compress).
MAX_FILE = 40 * 1024 * 1024

GZIP_MAGIC = b"\x1f\x8b"
REPORT_TYPES = ("application/tlsrpt+gzip", "application/tlsrpt+json")
# What some senders label their report part with; only with a report's name.
LOOSE_TYPES = ("application/gzip", "application/x-gzip", "application/json",
               "application/octet-stream")
REPORT_NAMES = (".json.gz", ".json")
POLICY_TYPES = ("tlsa", "sts", "no-policy-found")
NOT_DETAILED = "not-detailed"
# What a sender wrote is shown at most this long.
MAX_TEXT = 200
_CONTROL = dict.fromkeys(list(range(0x20)) + [0x7f] + list(range(0x80, 0xa0)), " ")


def clean(text: str, limit: int = MAX_TEXT) -> str:
    """
    C{text} from a report or a mail, safe to print: control characters
    (a terminal escape a sender slipped into its organization-name, a
    newline in a reason) become spaces, runs of spaces one, at most
    C{limit} characters.
    """
    text = " ".join(text.translate(_CONTROL).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Malformed(Exception):
    """
    A file holds no readable report; C{str()} is the reason, one line.
    """

    def __str__(self) -> str:
        return clean(super().__str__(), 400)


class NotAReport(Malformed):
    """
    A mail with no TLS report in it at all: other mail (or spam: a report
    address is public, in DNS) that reached the report mailbox.
    """


@attrs.frozen
class FailureDetail:
    result_type: str
    count: int
    mx_host: str | None = None  # receiving-mx-hostname
    sending_mta_ip: str | None = None
    receiving_ip: str | None = None
    reason_code: str | None = None  # failure-reason-code


@attrs.frozen
class PolicyResult:
    policy_type: str
    domain: str
    mx_hosts: tuple[str, ...]
    successes: int
    failures: int
    details: tuple[FailureDetail, ...]


@attrs.frozen
class Report:
    organization: str
    contact: str
    report_id: str
    start: datetime.datetime
    end: datetime.datetime
    policies: tuple[PolicyResult, ...]

    @property
    def first_day(self) -> datetime.date:
        return self.start.date()

    @property
    def last_day(self) -> datetime.date:
        """
        The last UTC day the range covers: it ends at midnight after it, or
        (like Google's 23:59:59Z) within it.
        """
        last = self.end - datetime.timedelta(microseconds=1)
        return max(last.date(), self.start.date())


@attrs.frozen
class FileResult:
    """
    What one file gave: reports, or why it gave none (C{problem}).
    """

    path: str
    reports: tuple[Report, ...] = ()
    problem: str | None = None
    mtime: float = 0.0
    not_report: bool = False  # the problem is that it is other mail (L{NotAReport})


# -- decoding ----------------------------------------------------------------


def gunzip(data: bytes, limit: int = MAX_REPORT) -> bytes:
    """
    The decompressed gzip C{data} (all members), or L{Malformed} when it is
    not gzip, is cut short, or would exceed C{limit} bytes: decompression
    stops there, so a bomb costs C{limit} bytes of memory, not its size.
    """
    out: list[bytes] = []
    size = 0
    rest = data
    while rest:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            # At most one byte more than the budget: all the input is used
            # unless the output would exceed it.
            chunk = d.decompress(rest, limit - size + 1)
        except zlib.error as e:
            raise Malformed(f"bad gzip: {e}") from None
        out.append(chunk)
        size += len(chunk)
        if size > limit:
            raise Malformed(f"bad gzip: decompresses to more than {limit // (1024 * 1024)} MB")
        if not d.eof:
            raise Malformed("bad gzip: cut short")
        rest = d.unused_data
        if rest and not rest.startswith(GZIP_MAGIC):
            if rest.strip(b"\0") == b"":  # padding some tools leave
                break
            raise Malformed("bad gzip: trailing data after the compressed report")
    return b"".join(out)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # I-JSON (RFC 7493 §2.3): names are unique
            raise Malformed(f"bad JSON: the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise Malformed(f"bad JSON: {name} is not JSON")


def load_json(data: bytes) -> Any:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise Malformed(f"bad JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise Malformed(f"bad JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise Malformed("bad JSON: nested too deeply") from None


# -- validation (RFC 8460 §4.4) ----------------------------------------------


def _type_words(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


class _Fields:
    """
    One JSON object being checked; errors name the path to the field.
    """

    def __init__(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            raise Malformed(f"{where or 'the report'}: must be an object, "
                            f"not {_type_words(value)}")
        self.value = value
        self.where = where

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def get(self, key: str, kind: type, required: bool = True) -> Any:
        if key not in self.value:
            if required:
                raise Malformed(f"{self.path(key)}: missing")
            return None
        value = self.value[key]
        if kind is int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise Malformed(f"{self.path(key)}: must be a count (an integer, 0 or more), "
                                f"not {json.dumps(value)[:40]}")
        elif not isinstance(value, kind):
            words = {str: "a string", list: "an array", dict: "an object"}[kind]
            raise Malformed(f"{self.path(key)}: must be {words}, not {_type_words(value)}")
        if kind is str and required and not clean(value):
            raise Malformed(f"{self.path(key)}: is empty")
        return value

    def strings(self, key: str) -> tuple[str, ...]:
        """
        An optional array of strings (or one string, for C{mx-host}).
        """
        if key not in self.value:
            return ()
        value = self.value[key]
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise Malformed(f"{self.path(key)}: must be an array of strings")
        return tuple(value)


def _datetime(fields: _Fields, key: str) -> datetime.datetime:
    text = fields.get(key, str)
    try:
        value = datetime.datetime.fromisoformat(text.strip().replace("z", "Z"))
    except ValueError:
        raise Malformed(f"{fields.path(key)}: not an RFC 3339 date-time: {text[:40]!r}") from None
    if value.tzinfo is None:
        raise Malformed(f"{fields.path(key)}: has no time zone: {text[:40]!r}")
    return value.astimezone(datetime.timezone.utc)


def _detail(value: Any, where: str) -> FailureDetail:
    f = _Fields(value, where)
    result_type = f.get("result-type", str)
    count = f.get("failed-session-count", int)
    for key in ("receiving-mx-helo", "additional-information"):
        f.get(key, str, required=False)
    code = f.get("failure-reason-code", str, required=False)
    return FailureDetail(
        result_type=clean(result_type).lower(), count=count,
        mx_host=_host(f.get("receiving-mx-hostname", str, required=False)),
        sending_mta_ip=_optional(f.get("sending-mta-ip", str, required=False)),
        receiving_ip=_optional(f.get("receiving-ip", str, required=False)),
        reason_code=_optional(code))


def _optional(text: str | None) -> str | None:
    return clean(text) or None if text is not None else None


def _host(name: str | None) -> str | None:
    if name is None or not clean(name):
        return None
    return clean(name).rstrip(".").lower()


def _policy(value: Any, where: str) -> PolicyResult:
    f = _Fields(value, where)
    p = _Fields(f.get("policy", dict), f.path("policy"))
    policy_type = clean(p.get("policy-type", str)).lower()
    if policy_type not in POLICY_TYPES:
        raise Malformed(f"{p.path('policy-type')}: must be one of {', '.join(POLICY_TYPES)}, "
                        f"not {policy_type[:40]!r}")
    p.strings("policy-string")
    domain = _host(p.get("policy-domain", str))
    mx_hosts = tuple(h for h in (_host(m) for m in p.strings("mx-host")) if h)
    s = _Fields(f.get("summary", dict), f.path("summary"))
    successes = s.get("total-successful-session-count", int)
    failures = s.get("total-failure-session-count", int)
    raw = f.get("failure-details", list, required=False) or []
    details = tuple(_detail(d, f"{f.path('failure-details')}[{i}]") for i, d in enumerate(raw))
    return PolicyResult(policy_type=policy_type, domain=domain or "", mx_hosts=mx_hosts,
                        successes=successes, failures=failures, details=details)


def parse_report(data: bytes) -> Report:
    """
    One report from its JSON, checked against RFC 8460 §4.4.
    """
    f = _Fields(load_json(data), "")
    organization = clean(f.get("organization-name", str))
    r = _Fields(f.get("date-range", dict), "date-range")
    start, end = _datetime(r, "start-datetime"), _datetime(r, "end-datetime")
    if end < start:
        raise Malformed("date-range: ends before it starts")
    contact = clean(f.get("contact-info", str))
    report_id = f.get("report-id", str).strip()  # compared, never printed
    policies = f.get("policies", list)
    return Report(organization=organization, contact=contact, report_id=report_id,
                  start=start, end=end,
                  policies=tuple(_policy(p, f"policies[{i}]") for i, p in enumerate(policies)))


def parse_payload(data: bytes) -> Report:
    """
    A report from the bytes of an attachment or an HTTPS-style body: gzip
    (recognised by its magic, whatever the label says) or JSON.
    """
    if data.startswith(GZIP_MAGIC):
        data = gunzip(data)
    elif len(data) > MAX_REPORT:
        raise Malformed(f"more than {MAX_REPORT // (1024 * 1024)} MB of JSON")
    return parse_report(data)


def _report_part(part: email.message.Message) -> bool:
    ctype = part.get_content_type()
    if ctype in REPORT_TYPES:
        return True
    name = (part.get_filename() or "").strip().lower()
    return ctype in LOOSE_TYPES and name.endswith(REPORT_NAMES)


def _decoded(part: email.message.Message) -> bytes:
    data = part.get_payload(decode=True)
    return data if isinstance(data, bytes) else b""


def reports_in(raw: bytes) -> tuple[Report, ...]:
    """
    The reports in one file's bytes; L{Malformed} when there is none, or
    when one of its report parts does not read.
    """
    if raw.startswith(GZIP_MAGIC) or raw.lstrip().startswith(b"{"):
        return (parse_payload(raw),)  # the HTTPS-style body
    try:
        message = email.message_from_bytes(raw, policy=email.policy.compat32)
    except Exception as e:  # the parser is lenient; this is belt and braces
        raise Malformed(f"not a mail message: {e}") from None
    parts = [p for p in message.walk() if not p.is_multipart() and _report_part(p)]
    if not parts and not message.is_multipart():
        body = _decoded(message)
        if body.startswith(GZIP_MAGIC) or body.lstrip().startswith(b"{"):
            return (parse_payload(body),)  # a mail whose body is the report
    if not parts:
        subject = " ".join(str(message.get("Subject", "")).split())[:60]
        raise NotAReport(f"no TLS report in it ({message.get_content_type()}"
                        + (f", Subject: {subject}" if subject else "") + ")")
    reports = []
    for i, part in enumerate(parts):
        try:
            reports.append(parse_payload(_decoded(part)))
        except Malformed as e:
            if len(parts) == 1:
                raise
            name = part.get_filename() or f"part {i + 1}"
            raise Malformed(f"{name}: {e}") from None
    return tuple(reports)


# -- the Maildir -------------------------------------------------------------


def maildir_files(maildir: str) -> list[str]:
    """
    The message files in C{maildir}'s new/ and cur/ (names starting with a
    dot are not messages), sorted; L{OSError} when the Maildir cannot be
    listed.
    """
    out = []
    for sub in ("new", "cur"):
        d = os.path.join(maildir, sub)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            if not os.path.isdir(maildir):
                raise
            continue
        out.extend(os.path.join(d, n) for n in sorted(names) if not n.startswith("."))
    return out


def _moved(path: str) -> str | None:
    """
    Where a message listed in new/ went when a mail client read it since:
    cur/ under the same unique name with flags (maildir(5)).
    """
    directory, name = os.path.split(path)
    if os.path.basename(directory) != "new":
        return None
    cur = os.path.join(os.path.dirname(directory), "cur")
    try:
        for candidate in os.listdir(cur):
            if candidate == name or candidate.startswith(name + ":"):
                return os.path.join(cur, candidate)
    except OSError:
        pass
    return None


def read_file(path: str) -> FileResult | None:
    """
    The reports in the file at C{path} (read only, never more than
    L{MAX_FILE} bytes), or None when it is gone (deleted meanwhile).
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        try:
            # Not even the access time changes, where we may say so (we
            # own the file); a mail client may be watching it.
            fd = os.open(path, flags | getattr(os, "O_NOATIME", 0))
        except PermissionError:
            fd = os.open(path, flags)
    except FileNotFoundError:
        moved = _moved(path)
        return read_file(moved) if moved else None
    except OSError as e:
        return FileResult(path, problem=f"cannot be read: {e.strerror}")
    try:
        st = os.fstat(fd)
        if st.st_size > MAX_FILE:
            return FileResult(path, problem=f"too large to be a TLS report "
                              f"({st.st_size // (1024 * 1024)} MB)", mtime=st.st_mtime)
        with os.fdopen(fd, "rb") as f:
            fd = -1
            raw = f.read(MAX_FILE + 1)
    except OSError as e:
        return FileResult(path, problem=f"cannot be read: {e.strerror}")
    finally:
        if fd >= 0:
            os.close(fd)
    try:
        return FileResult(path, reports=reports_in(raw), mtime=st.st_mtime)
    except NotAReport as e:
        return FileResult(path, problem=str(e), mtime=st.st_mtime, not_report=True)
    except Malformed as e:
        return FileResult(path, problem=str(e), mtime=st.st_mtime)
    except RecursionError:  # a MIME tree nested beyond reason
        return FileResult(path, problem="MIME parts nested too deeply", mtime=st.st_mtime)
    except Exception as e:
        # The email package on input no fuzzing here found: one file's
        # surprise must not hide every other report.
        return FileResult(path, problem=clean(f"could not be parsed: {type(e).__name__}: {e}"),
                          mtime=st.st_mtime)


def read_maildirs(maildirs: Iterable[str]) -> Iterator[FileResult]:
    """
    L{read_file} over every message of every Maildir, in order.
    """
    for maildir in maildirs:
        for path in maildir_files(maildir):
            result = read_file(path)
            if result is not None:
                yield result


class MailboxError(Exception):
    """
    The report mailbox cannot be found or read; C{str()} says why, one line.
    """


@attrs.frozen
class Mailbox:
    """
    A Maildir to read, and the address (or path) it was named by.
    """

    path: str
    name: str

    @property
    def exists(self) -> bool:
        return os.path.isdir(self.path)


def default_addresses(config: Config) -> tuple[str, ...]:
    """
    The report addresses when the command names none: C{[tlsrpt] inbox},
    else the local C{mailto:} addresses that C{tls publish} puts in the
    C{_smtp._tls} records (C{[publish] tlsrpt_rua}, by default
    C{tlsrpt@} each local domain).
    """
    if config.tlsrpt.inbox:
        return (config.tlsrpt.inbox,)
    rua = config.publish.tlsrpt_rua
    if rua:
        return tuple(urllib.parse.unquote(u[len("mailto:"):].partition("?")[0]) for u in rua
                     if u.lower().startswith("mailto:"))
    return tuple(f"tlsrpt@{d}" for d in config.local.domains)


def find_mailboxes(config: Config, name: str | None) -> tuple[Mailbox, ...]:
    """
    The Maildirs to read: C{name} is a path (it has a C{/}) or a local
    address or name (a user or an alias, expanded as delivery does); with
    no C{name}, L{default_addresses}.  L{MailboxError} when none is found.
    """
    if name is not None and ("/" in name or name.startswith("~")):
        path = os.path.abspath(os.path.expanduser(name))
        if not os.path.isdir(path):
            raise MailboxError(f"{name}: no such Maildir")
        if not any(os.path.isdir(os.path.join(path, s)) for s in ("new", "cur")):
            raise MailboxError(f"{name}: not a Maildir (it has no new/ or cur/)")
        return (Mailbox(path, name),)
    directory = LocalDirectory(config.local)
    names = (name,) if name is not None else default_addresses(config)
    found: dict[str, Mailbox] = {}
    missing = []
    for address in names:
        _, at, domain = address.rpartition("@")
        if at and not directory.is_local_domain(domain):
            missing.append(f"{address} is not in a local domain")
            continue
        try:
            finals = directory.expand(address)
        except (UnknownRecipient, AliasLoop):
            missing.append(f"{address} is no local user or alias")
            continue
        local = [a for a in finals if directory.is_local_domain(a.rpartition("@")[2])]
        if not local:
            missing.append(f"{address} forwards to {', '.join(finals)}: no local mailbox")
        for final in local:
            path = directory.maildir_for(final)
            found.setdefault(path, Mailbox(path, address))
    if found:
        return tuple(found.values())
    if not names:
        raise MailboxError("no report mailbox: no local domains; name one with --mailbox "
                           "or [tlsrpt] inbox")
    raise MailboxError(f"no report mailbox: {'; '.join(missing)}; name one with --mailbox "
                       "USER|PATH or [tlsrpt] inbox")


# -- the summary -------------------------------------------------------------


@attrs.define
class _Counts:
    successes: int = 0
    failures: dict[str, int] = attrs.field(factory=dict)
    domains: set[str] = attrs.field(factory=set)
    reports: set[tuple[str, str]] = attrs.field(factory=set)
    first: datetime.date | None = None
    last: datetime.date | None = None

    def seen(self, report: Report) -> None:
        self.reports.add((report.organization, report.report_id))
        self.first = min(filter(None, (self.first, report.first_day)))
        self.last = max(filter(None, (self.last, report.last_day)))


@attrs.define
class _Failure:
    count: int = 0
    first: datetime.date | None = None
    last: datetime.date | None = None
    domains: set[str] = attrs.field(factory=set)
    reason_codes: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen
class Row:
    """
    One sending organization's sessions to one of our MX hosts.
    """

    organization: str
    host: str | None  # None: the report names none (the policy's MX hosts)
    domains: tuple[str, ...]
    successes: int
    failures: tuple[tuple[str, int], ...]  # (result type, sessions), most first
    first_day: datetime.date
    last_day: datetime.date
    reports: int

    @property
    def failed(self) -> int:
        return sum(n for _, n in self.failures)

    @property
    def where(self) -> str:
        return _where(self.host, self.domains)

    @property
    def sessions(self) -> int:
        return self.successes + self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"organization": self.organization, "mx_host": self.host,
                "policy_domains": list(self.domains), "sessions": self.sessions,
                "successful": self.successes, "failed": self.failed,
                "failures": dict(self.failures), "first_day": self.first_day.isoformat(),
                "last_day": self.last_day.isoformat(), "reports": self.reports}


@attrs.frozen
class Problem:
    """
    One thing to fix: an organization saw sessions to our MX host fail
    with one result type.
    """

    organization: str
    host: str | None  # None: the report names none (the policy's MX hosts)
    result_type: str
    sessions: int
    first_day: datetime.date
    last_day: datetime.date
    ongoing: bool  # seen in the organization's latest report day
    domains: tuple[str, ...]
    reason_codes: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        return _where(self.host, self.domains)

    def to_dict(self, today: datetime.date) -> dict[str, Any]:
        return {"organization": self.organization, "mx_host": self.host,
                "result_type": self.result_type, "sessions": self.sessions,
                "first_day": self.first_day.isoformat(), "last_day": self.last_day.isoformat(),
                "ongoing": self.ongoing, "policy_domains": list(self.domains),
                "failure_reason_codes": list(self.reason_codes),
                "text": sentence(self, today), "hint": hint(self)}


@attrs.frozen
class Unreadable:
    path: str
    reason: str

    def line(self) -> str:
        return f"{clean(self.path, 1000)}: {self.reason}"


@attrs.frozen
class Summary:
    since: datetime.datetime | None  # the window's start; None: everything
    now: datetime.datetime
    files: int
    reports: int
    duplicates: int
    older: int  # reports that ended before the window
    rows: tuple[Row, ...]
    problems: tuple[Problem, ...]
    healthy: tuple[tuple[str, int], ...]  # (organization, sessions) with no failure
    unreadable: tuple[Unreadable, ...]  # reports (or files) that do not read
    other_mail: tuple[Unreadable, ...] = ()  # mails with no report in them

    @property
    def exit_code(self) -> int:
        """
        0: no sender reported a failure; 1: one did.  Files that are no
        readable report are named but change nothing here: a sender's bug
        or spam to a public address is nothing to fix on our MX hosts, and
        a cron job that mails on 1 should not fire for it.
        """
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        today = self.now.date()
        return {
            "since": _rfc3339(self.since) if self.since else None,
            "now": _rfc3339(self.now),
            "files": self.files, "reports": self.reports, "duplicates": self.duplicates,
            "older": self.older,
            "problems": [p.to_dict(today) for p in self.problems],
            "healthy": [{"organization": o, "sessions": n} for o, n in self.healthy],
            "rows": [r.to_dict() for r in self.rows],
            "malformed": [{"file": u.path, "reason": u.reason} for u in self.unreadable],
            "not_reports": [{"file": u.path, "reason": u.reason} for u in self.other_mail],
            "exit_code": self.exit_code,
        }


def _rfc3339(t: datetime.datetime) -> str:
    return t.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _policy_host(policy: PolicyResult) -> str | None:
    """
    Where a policy's counts that name no MX host go: its mx-host (all of
    them; a pattern such as C{*.mail.example.org} stays one), else None.
    """
    return ", ".join(policy.mx_hosts) if policy.mx_hosts else None


def _where(host: str | None, domains: tuple[str, ...]) -> str:
    return host or f"the MX hosts of {' and '.join(domains) or 'the domain'}"


def summarize(results: Iterable[FileResult], now: datetime.datetime,
              since: datetime.datetime | None = None) -> Summary:
    """
    Count the reports of C{results} that end after C{since} (all when
    None), each (organization, report-id) once.  A file with no readable
    report, or other mail, is listed when it arrived (its mtime) after
    C{since}.
    """
    rows: dict[tuple[str, str | None], _Counts] = defaultdict(_Counts)
    fails: dict[tuple[str, str | None, str], _Failure] = defaultdict(_Failure)
    latest: dict[str, datetime.date] = {}
    seen: set[tuple[str, str]] = set()
    files = duplicates = older = 0
    unreadable = []
    other_mail = []
    for result in results:
        files += 1
        if result.problem is not None:
            if since is None or result.mtime >= since.timestamp():
                (other_mail if result.not_report else unreadable).append(
                    Unreadable(result.path, result.problem))
            continue
        for report in result.reports:
            if since is not None and report.end <= since:
                older += 1
                continue
            key = (report.organization, report.report_id)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            org = report.organization
            latest[org] = max(latest.get(org, report.last_day), report.last_day)
            for policy in report.policies:
                home = _policy_host(policy)
                counts = rows[org, home]
                counts.seen(report)
                counts.successes += policy.successes
                counts.domains.add(policy.domain)
                detailed = 0
                by_place: list[tuple[str | None, str, int, str | None]] = []
                for d in policy.details:
                    detailed += d.count
                    by_place.append((d.mx_host or home, d.result_type, d.count, d.reason_code))
                if policy.failures > detailed:
                    by_place.append((home, NOT_DETAILED, policy.failures - detailed, None))
                for host, result_type, count, code in by_place:
                    if count == 0:
                        continue
                    counts = rows[org, host]
                    counts.seen(report)
                    counts.domains.add(policy.domain)
                    counts.failures[result_type] = counts.failures.get(result_type, 0) + count
                    f = fails[org, host, result_type]
                    f.count += count
                    f.domains.add(policy.domain)
                    f.first = min(filter(None, (f.first, report.first_day)))
                    f.last = max(filter(None, (f.last, report.last_day)))
                    if code:
                        f.reason_codes[code] = f.reason_codes.get(code, 0) + count
    out_rows = tuple(sorted(
        (Row(organization=org, host=host, domains=tuple(sorted(c.domains)),
             successes=c.successes,
             failures=tuple(sorted(c.failures.items(), key=lambda kv: (-kv[1], kv[0]))),
             first_day=c.first, last_day=c.last, reports=len(c.reports))
         for (org, host), c in rows.items() if c.first is not None),
        key=lambda r: (-r.failed, r.organization.lower(), r.host or "")))
    problems = tuple(sorted(
        (Problem(organization=org, host=host, result_type=rt, sessions=f.count,
                 first_day=f.first, last_day=f.last, ongoing=f.last >= latest[org],
                 domains=tuple(sorted(f.domains)),
                 reason_codes=tuple(c for c, _ in sorted(f.reason_codes.items(),
                                                         key=lambda kv: (-kv[1], kv[0]))))
         for (org, host, rt), f in fails.items()),
        key=lambda p: (-p.sessions, p.organization.lower(), p.host or "", p.result_type)))
    failing = {p.organization for p in problems}
    sessions: dict[str, int] = defaultdict(int)
    for r in out_rows:
        sessions[r.organization] += r.sessions
    healthy = tuple(sorted(((o, n) for o, n in sessions.items() if o not in failing),
                           key=lambda on: (-on[1], on[0].lower())))
    return Summary(since=since, now=now, files=files, reports=len(seen), duplicates=duplicates,
                   older=older, rows=out_rows, problems=problems, healthy=healthy,
                   unreadable=tuple(unreadable), other_mail=tuple(other_mail))


# -- words -------------------------------------------------------------------


def _day(day: datetime.date, today: datetime.date, year: bool = True) -> str:
    text = f"{day.day} {day.strftime('%B')}"
    return f"{text} {day.year}" if year and day.year != today.year else text


def _sessions(n: int) -> str:
    return f"{n:,} session" + ("" if n == 1 else "s")


def sentence(problem: Problem, today: datetime.date) -> str:
    """
    "Google saw 1,204 sessions to mx2.example.org fail with
    certificate-expired since 1 December".
    """
    first, last = problem.first_day, problem.last_day
    if first == last:
        when = f"on {_day(first, today)}"
    elif problem.ongoing:
        when = f"since {_day(first, today)}"
    else:
        start = (str(first.day) if (first.year, first.month) == (last.year, last.month)
                 else _day(first, today, year=first.year != last.year))
        when = f"from {start} to {_day(last, today)}"
    return (f"{problem.organization} saw {_sessions(problem.sessions)} to {problem.where} "
            f"fail with {problem.result_type} {when}")


def _domain_words(problem: Problem) -> str:
    return " and ".join(problem.domains) or "the domain"


def hint(problem: Problem) -> str:
    """
    What to check for one result type (RFC 8460 §4.3), in a line.
    """
    host, rt = problem.where, problem.result_type
    tlsa = f"_25._tcp.{problem.host}" if problem.host else host
    policies = ", ".join(f"https://mta-sts.{d}/.well-known/mta-sts.txt" for d in problem.domains)
    hints = {
        "starttls-not-supported":
            f"{host} did not offer STARTTLS: check that its listener has a certificate and "
            "key, and that nothing in front of it (firewall, proxy) strips STARTTLS",
        "certificate-host-mismatch":
            f"the certificate on {host} does not name {host}: add the name to its subject "
            "alternative names, or make the MX records and the MTA-STS mx: lines match it",
        "certificate-expired":
            f"renew the certificate on {host} (and check that the renewal reloads the server)",
        "certificate-not-trusted":
            f"{host}'s certificate is not trusted: serve the full chain (intermediates "
            "included) of a public CA, not a self-signed or private one",
        "validation-failure":
            "the sender's failure-reason-code says why"
            + (f": {', '.join(problem.reason_codes[:3])}" if problem.reason_codes else
               " (it gave none: ask the contact in its report)"),
        "tlsa-invalid":
            f"the TLSA records of {tlsa} no longer match its certificate: publish the "
            "records of the key it serves (twisted-mta tls publish prints them) and keep the "
            "old ones until the new key is in use",
        "dnssec-invalid":
            f"DNSSEC validation of {_domain_words(problem)} or {host} failed: check the zone's "
            "signatures (expired RRSIGs?) and the DS record at the parent",
        "dane-required":
            f"the sender requires DANE but found no DNSSEC-signed TLSA records for {host}: "
            "sign the zone and publish them (twisted-mta tls publish)",
        "sts-policy-fetch-error":
            f"the policy host did not serve {policies or 'the MTA-STS policy'}: check that it "
            "answers over HTTPS with status 200 and the policy as text/plain",
        "sts-policy-invalid":
            f"the MTA-STS policy at {policies or 'the policy host'} does not parse: compare it "
            "with what twisted-mta tls publish prints",
        "sts-webpki-invalid":
            "the certificate of the MTA-STS policy host"
            + (f" mta-sts.{problem.domains[0]}" if len(problem.domains) == 1 else "")
            + " is not valid: renew it, serve the full chain, check its names",
        NOT_DETAILED: "the sender counted failures without saying which: ask the contact in its "
                      "report",
    }
    if rt not in hints:
        return ("an unregistered result type: read the sender's report"
                + (f" (failure-reason-code {problem.reason_codes[0]})"
                   if problem.reason_codes else ""))
    if problem.reason_codes and rt != "validation-failure":
        return f"{hints[rt]} (the sender says: {', '.join(problem.reason_codes[:3])})"
    return hints[rt]


def plain_words(summary: Summary) -> list[str]:
    """
    What to fix, worst first, a line each with its hint indented under it;
    then the healthy senders in one line.
    """
    today = summary.now.date()
    lines = []
    for p in summary.problems:
        lines.append(sentence(p, today) + ".")
        lines.append(f"    -> {hint(p)}.")
    if summary.healthy:
        names = ", ".join(f"{o} ({_sessions(n)})" for o, n in summary.healthy)
        lines.append(f"No failures reported by {names}.")
    return lines


def format_text(summary: Summary, mailboxes: Iterable[str], since_words: str | None) -> str:
    today = summary.now.date()
    where = ", ".join(mailboxes)
    window = (f" since {_day(summary.since.date(), today)} ({since_words})"
              if summary.since is not None else "")
    orgs = len({r.organization for r in summary.rows})
    head = (f"TLS reports in {where}{window}: {summary.reports} report"
            f"{'' if summary.reports == 1 else 's'} from {orgs} organization"
            f"{'' if orgs == 1 else 's'}")
    extras = []
    if summary.duplicates:
        extras.append(f"{summary.duplicates} duplicate{'' if summary.duplicates == 1 else 's'} "
                      "counted once")
    if summary.older:
        extras.append(f"{summary.older} older report{'' if summary.older == 1 else 's'} left out")
    if summary.unreadable:
        n = len(summary.unreadable)
        extras.append(f"{n} unreadable file{'' if n == 1 else 's'}")
    if summary.other_mail:
        n = len(summary.other_mail)
        extras.append(f"{n} other mail{'' if n == 1 else 's'}")
    lines = [head + (f" ({'; '.join(extras)})" if extras else "") + "."]
    words = plain_words(summary)
    if words:
        lines.append("")
        lines.extend(words)
    if summary.rows:
        lines.append("")
        header = ("ORGANIZATION", "MX HOST", "SESSIONS", "OK", "FAILED", "DAYS", "FAILURES")
        table = [header] + [
            (r.organization, r.where, f"{r.sessions:,}", f"{r.successes:,}", f"{r.failed:,}",
             r.first_day.isoformat() + ("" if r.last_day == r.first_day
                                        else ".." + r.last_day.isoformat()[5:]),
             ", ".join(f"{rt} {n:,}" for rt, n in r.failures) or "-")
            for r in summary.rows]
        widths = [max(len(row[i]) for row in table) for i in range(6)]
        for row in table:
            cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
            cells += [row[i].rjust(widths[i]) for i in (2, 3, 4)]
            cells.append(row[5].ljust(widths[5]))
            lines.append("  ".join(cells) + "  " + row[6])
    if summary.unreadable:
        lines.append("")
        lines.append("Not readable as TLS reports:")
        lines.extend(f"  {u.line()}" for u in summary.unreadable)
    if summary.other_mail:
        lines.append("")
        lines.append("Other mail in the report mailbox (no TLS report in it):")
        lines.extend(f"  {u.line()}" for u in summary.other_mail)
    return "\n".join(lines) + "\n"
