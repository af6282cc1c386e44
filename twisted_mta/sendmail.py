"""
C{sendmail}: local submission for cron, PHP's mail() and every Unix tool.

Installed as C{twisted-mta-sendmail} (link it as /usr/sbin/sendmail,
/usr/bin/mailq, /usr/bin/newaliases) and as C{twisted-mta sendmail}.  It
reads the message, completes its header (From, Date, Message-ID, To),
and writes it into the spool's maildrop (L{twisted_mta.maildrop}), where
the running MTA's pickup (L{twisted_mta.inbound.pickup}) queues it within
a second; with the MTA down the drop waits.  The command runs as the
calling user, so it checks for the user's sake; the pickup checks again
for the MTA's.  No other program is run.

Exit status as sendmail's (sysexits): 0 done, 64 usage, 65 bad message,
67 unknown user (-bv), 69 no maildrop yet, 73 cannot write the drop, 75
try again later, 77 permission denied, 78 bad configuration; with one line
on stderr saying why.
"""

from __future__ import annotations

import email.utils
import errno
import getopt
import os
import pwd
import re
import secrets
import sys
import time
from typing import BinaryIO, Callable

import attrs

from twisted_mta.address import AddressError, parse_mail_from, parse_mailbox, parse_rcpt_to
from twisted_mta.config import Config, ConfigError, load_config
from twisted_mta.dsn.params import ENVID_MAX, DSNParamError, parse_notify
from twisted_mta.local import AliasLoop, LocalDirectory, UnknownRecipient
from twisted_mta.maildrop import (
    MAX_RECIPIENTS, Drop, DropError, check_address, check_message, drop_name, encode,
    maildrop_path,
)

EX_OK, EX_USAGE, EX_DATAERR, EX_NOUSER = 0, 64, 65, 67
EX_UNAVAILABLE, EX_SOFTWARE, EX_CANTCREAT, EX_IOERR, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG = (
    69, 70, 73, 74, 75, 77, 78)

DEFAULT_CONFIG = "/etc/twisted-mta/mta.toml"
CONFIG_ENV = "TWISTED_MTA_CONFIG"

# sendmail's options (as Postfix's sendmail takes them); those with a
# colon take a value.
OPTSTRING = "A:B:b:C:e:F:f:Gh:IiL:mN:nO:o:p:R:r:tUV:vX:"
MODES = {"m": "deliver", "s": "smtp", "v": "verify", "p": "queue", "i": "aliases"}
_HEADER = re.compile(rb"^[!-9;-~]+:")


class Failed(Exception):
    """
    The command cannot go on: one line for stderr and an exit status.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Options:
    mode: str = "deliver"  # deliver, smtp (-bs), verify (-bv), queue (-bp), aliases (-bi)
    extract: bool = False  # -t: recipients from To, Cc, Bcc
    ignore_dots: bool = False  # -i, -oi: a lone dot is text
    sender: str | None = None  # -f/-r; "" is <>
    full_name: str | None = None  # -F
    config: str | None = None  # -C, --config
    verbose: bool = False  # -v
    notify: str | None = None  # -N: DSN NOTIFY (never, or success,delay,failure)
    ret: str | None = None  # -R: DSN RET (full or hdrs)
    envid: str | None = None  # -V: DSN ENVID
    recipients: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()  # flags accepted without effect


def parse_args(argv: list[str], prog: str = "sendmail") -> Options:
    """
    sendmail's command line (after argv[0], whose basename is C{prog}:
    C{mailq} lists the queue, C{newaliases} is -bi).  Options end at the
    first recipient.  Raises L{Failed} (EX_USAGE) naming the flag.
    """
    fields: dict[str, object] = {}
    ignored: list[str] = []
    if prog == "mailq":
        fields["mode"] = "queue"
    elif prog == "newaliases":
        fields["mode"] = "aliases"
    try:
        opts, rest = getopt.getopt(argv, OPTSTRING, ["config="])
    except getopt.GetoptError as e:
        if e.opt == "q":
            raise Failed(EX_USAGE, "-q (run the queue) is not supported here: the MTA runs "
                         "its queue by itself; use twisted-mta queue flush")
        raise Failed(EX_USAGE, f"{e.msg} (see docs/operations.md, the sendmail command)")
    for flag, value in opts:
        if flag == "-b":
            if value not in MODES:
                raise Failed(EX_USAGE, f"-b{value} is not supported (only -bm, -bs, -bv, "
                             "-bp and -bi)")
            fields["mode"] = MODES[value]
        elif flag == "-I":
            fields["mode"] = "aliases"
        elif flag in ("-C", "--config"):
            fields["config"] = value
        elif flag in ("-f", "-r"):
            fields["sender"] = value
        elif flag == "-F":
            fields["full_name"] = value
        elif flag == "-t":
            fields["extract"] = True
        elif flag == "-i" or flag == "-o" and value == "i":
            fields["ignore_dots"] = True
        elif flag == "-v":
            fields["verbose"] = True
        elif flag in ("-N", "-R", "-V"):
            fields[{"-N": "notify", "-R": "ret", "-V": "envid"}[flag]] = value
        else:  # -o..., -e..., -h, -B, -U, -m, -n, ...: no effect here
            ignored.append(flag + value)
    return Options(**fields, recipients=tuple(rest), ignored=tuple(ignored))  # type: ignore


# -- the message --------------------------------------------------------------


def read_message(stream: BinaryIO, ignore_dots: bool, max_size: int, max_line: int) -> bytes:
    """
    The message on C{stream} with CRLF line ends: up to the end of input,
    or (without -i) a line holding only a dot.  Raises L{Failed} for a
    message over C{max_size} octets, a line over C{max_line}, or a NUL.
    """
    out: list[bytes] = []
    size = 0
    number = 0
    while True:
        line = stream.readline(max_line + 1)
        if not line:
            break
        number += 1
        if len(line) > max_line and not line.endswith(b"\n"):
            raise Failed(EX_DATAERR, f"line {number} of the message is longer than "
                         f"{max_line} octets ([limits] data_line_length)")
        text = line.rstrip(b"\n").rstrip(b"\r")
        if not ignore_dots and text == b".":
            break
        if b"\0" in text:
            raise Failed(EX_DATAERR, f"line {number} of the message contains a NUL octet")
        text = text.replace(b"\r", b"")  # a CR inside a line is not a line end
        size += len(text) + 2
        if size > max_size:
            raise Failed(EX_DATAERR, f"the message is longer than the limit of {max_size} "
                         "octets ([limits] message_size)")
        out.append(text + b"\r\n")
    return b"".join(out)


@attrs.frozen
class Header:
    """
    The header section split into fields (each its raw lines, CRLF
    included) and the body.
    """

    fields: tuple[bytes, ...]
    body: bytes

    @classmethod
    def split(cls, message: bytes) -> "Header":
        """
        Body text where a field is expected ends the header section, as
        the SMTP side does (it gets the empty line); an mbox C{From } line
        at the very start is dropped.
        """
        lines = message.split(b"\r\n")
        if lines and lines[-1] == b"":
            lines.pop()
        if lines and lines[0].startswith(b"From "):
            lines.pop(0)
        fields: list[bytes] = []
        i = 0
        while i < len(lines):
            line = lines[i]
            if line == b"":
                i += 1
                break
            if _HEADER.match(line):
                fields.append(line + b"\r\n")
            elif line[:1] in (b" ", b"\t") and fields:
                fields[-1] += line + b"\r\n"
            else:
                break
            i += 1
        body = b"".join(line + b"\r\n" for line in lines[i:])
        return cls(tuple(fields), body)

    def named(self, name: str) -> list[bytes]:
        """
        The unfolded values of every field called C{name}.
        """
        key = name.lower().encode("ascii") + b":"
        return [f[len(key):].replace(b"\r\n", b"").strip() for f in self.fields
                if f[:len(key)].lower() == key]

    def without(self, *names: str) -> "Header":
        keys = tuple(n.lower().encode("ascii") + b":" for n in names)
        return Header(tuple(f for f in self.fields if not f.lower().startswith(keys)), self.body)

    def has(self, name: str) -> bool:
        return bool(self.named(name))

    def message(self) -> bytes:
        return b"".join(self.fields) + b"\r\n" + self.body


def header_recipients(header: Header) -> list[str]:
    """
    The addresses of To, Cc and Bcc (of Resent-To, Resent-Cc and
    Resent-Bcc when the message has any of those: it is being resent).
    """
    names = ["Resent-To", "Resent-Cc", "Resent-Bcc"]
    if not any(header.has(n) for n in names):
        names = ["To", "Cc", "Bcc"]
    values = [v.decode("utf-8", "replace") for n in names for v in header.named(n)]
    return [addr for _, addr in email.utils.getaddresses(values) if addr]


def utf8_header(header: Header) -> bool:
    """
    Whether the header section is UTF-8 beyond ASCII (RFC 6532).
    """
    raw = b"".join(header.fields)
    if raw.isascii():
        return False
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def complete(header: Header, from_address: str, full_name: str, hostname: str,
             now: float) -> Header:
    """
    The header as sent: Bcc and Resent-Bcc removed (after -t read them),
    and what is missing added: From (the user, with their full name),
    Date, Message-ID, and, when no To or Cc is left, an empty To group so
    that no recipient is shown.
    """
    header = header.without("Bcc", "Resent-Bcc")
    added: list[str] = []
    if not header.has("From"):
        added.append("From: " + email.utils.formataddr((full_name, from_address),
                                                        charset="utf-8"))
    if not header.has("Date"):
        added.append("Date: " + email.utils.formatdate(now, localtime=True))
    if not header.has("Message-ID"):
        added.append(f"Message-ID: <{int(now)}.{secrets.token_hex(8)}@{hostname}>")
    if not header.has("To") and not header.has("Cc"):
        added.append("To: undisclosed-recipients:;")
    return Header(header.fields + tuple(a.encode("utf-8") + b"\r\n" for a in added),
                  header.body)


# -- who is calling -------------------------------------------------------------


@attrs.frozen
class Caller:
    login: str
    full_name: str


def caller(uid: int) -> Caller:
    """
    The calling user's login and full name (the first field of the
    passwd GECOS, with & as the capitalised login).
    """
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return Caller(login=f"uid{uid}", full_name="")
    gecos = pw.pw_gecos.split(",")[0].replace("&", pw.pw_name.capitalize()).strip()
    return Caller(login=pw.pw_name, full_name=gecos)


def qualify(address: str, domain: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address if "@" in address else f"{address}@{domain}"


def check_recipient(address: str, domain: str, status: int) -> str:
    final = qualify(address, domain)
    try:
        parse_mailbox(final, utf8=True)
    except AddressError as e:
        raise Failed(status, f"bad recipient address {address[:80]!r}: {e}")
    return final


def dsn_requests(options: Options) -> dict[str, object]:
    """
    The DSN requests of -N, -R and -V (RFC 3461) for every recipient, as
    L{Drop} fields; L{Failed} (EX_USAGE) for a bad value.
    """
    out: dict[str, object] = {}
    if options.notify is not None:
        try:
            out["notify"] = parse_notify(options.notify)
        except DSNParamError as e:
            raise Failed(EX_USAGE, f"-N {options.notify}: {e}")
    if options.ret is not None:
        ret = options.ret.upper()
        if ret not in ("FULL", "HDRS"):
            raise Failed(EX_USAGE, f"-R {options.ret}: must be full or hdrs")
        out["ret"] = ret
    if options.envid is not None:
        envid = options.envid
        if not 0 < len(envid) <= ENVID_MAX or not all(" " <= c <= "~" for c in envid):
            raise Failed(EX_USAGE, f"-V: the envelope id must be 1 to {ENVID_MAX} printable "
                         "ASCII characters")
        out["envid"] = envid
    return out


def envelope_sender(options: Options, own: str) -> str:
    """
    -f/-r if given (anyone may set it, as in Postfix; the pickup records
    the real uid in the Received line), else the user's own address.
    """
    if options.sender is None:
        return own
    given = options.sender.strip()
    if given in ("", "<>"):
        return ""
    sender = qualify(given, own.rpartition("@")[2])
    try:
        parse_mailbox(sender, utf8=True)
    except AddressError as e:
        raise Failed(EX_USAGE, f"bad sender address {given[:80]!r} (-f): {e}")
    return sender


# -- the maildrop -----------------------------------------------------------------


def write_drop(maildrop: str, data: bytes, now: float) -> str:
    """
    Write C{data} as a new drop: a dot name first, fsync, rename to its
    final name (which the pickup takes), fsync again (the rename changed
    the file's ctime, so this commits the rename on journaling file
    systems: the directory itself may not be opened by the user), then
    the directory when we may.  Returns the drop's name.
    """
    name = drop_name(now)
    tmp = os.path.join(maildrop, "." + name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    try:
        os.fchmod(fd, 0o640)  # whatever the umask: the MTA's group reads it
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.rename(tmp, os.path.join(maildrop, name))
        os.fsync(fd)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    try:
        dfd = os.open(maildrop, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return name
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return name


def drop_failed(e: OSError, maildrop: str) -> Failed:
    if e.errno == errno.ENOENT:
        return Failed(EX_UNAVAILABLE, f"no maildrop {maildrop}: start the MTA once to "
                      "create it")
    if e.errno in (errno.EACCES, errno.EPERM):
        return Failed(EX_NOPERM, f"cannot write into {maildrop}: {e.strerror} (the MTA "
                      "makes it mode 3733 at start-up)")
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN):
        return Failed(EX_TEMPFAIL, f"cannot write into {maildrop}: {e.strerror}; try again "
                      "later")
    return Failed(EX_CANTCREAT, f"cannot write into {maildrop}: {e.strerror}")


@attrs.frozen
class Submission:
    """
    What the command knows about the calling user and the MTA: enough to
    make and drop a message.
    """

    config: Config
    caller: Caller
    now: Callable[[], float] = time.time

    @property
    def domain(self) -> str:
        return self.config.sendmail.domain or self.config.hostname

    @property
    def own_address(self) -> str:
        return f"{self.caller.login}@{self.domain}"

    def make(self, message: bytes, sender: str, recipients: list[str], extract: bool,
             full_name: str | None) -> Drop:
        """
        The drop for C{message}: the header completed, with -t the
        recipients of To/Cc/Bcc added to C{recipients}.  Raises L{Failed}.
        """
        header = Header.split(message)
        rcpts = [check_recipient(r, self.domain, EX_USAGE) for r in recipients]
        if extract:
            found = header_recipients(header)
            if not found and not rcpts:
                raise Failed(EX_DATAERR, "no recipient addresses found in the message "
                             "header (-t)")
            rcpts += [check_recipient(r, self.domain, EX_DATAERR) for r in found]
        if not rcpts:
            raise Failed(EX_USAGE, "no recipients: name them on the command line, or use -t "
                         "to read them from the message")
        rcpts = list(dict.fromkeys(rcpts))
        # SMTPUTF8 when an address or the header is UTF-8 (as Postfix's
        # smtputf8_autodetect_classes does for sendmail).
        utf8 = not all(a.isascii() for a in [sender, *rcpts]) or utf8_header(header)
        try:  # what the pickup will accept
            for rcpt in rcpts:
                check_address(rcpt, "the recipient", utf8)
            if sender:
                check_address(sender, "the sender", utf8)
        except DropError as e:
            raise Failed(EX_DATAERR, str(e))
        if len(rcpts) > MAX_RECIPIENTS:
            raise Failed(EX_DATAERR, f"{len(rcpts)} recipients, more than {MAX_RECIPIENTS} "
                         "in one message")
        name = self.caller.full_name if full_name is None else full_name
        text = complete(header, self.own_address, name, self.config.hostname,
                        self.now()).message()
        limits = self.config.limits
        try:
            check_message(text, limits.message_size, limits.data_line_length)
        except DropError as e:
            raise Failed(EX_DATAERR, str(e))
        return Drop(sender=sender, recipients=tuple(rcpts), message=text, smtputf8=utf8)

    def drop(self, drop: Drop) -> str:
        maildrop = maildrop_path(self.config.spool)
        try:
            return write_drop(maildrop, encode(drop), self.now())
        except OSError as e:
            raise drop_failed(e, maildrop)


# -- -bs: SMTP on standard input and output ---------------------------------------


class LocalSMTP:
    """
    The SMTP dialogue of C{sendmail -bs}, one line in, replies out; each
    message goes through the maildrop like any other (L{Submission}).
    Pure: the caller reads lines and writes the replies.
    """

    def __init__(self, submission: Submission) -> None:
        self.submission = submission
        self.limits = submission.config.limits
        self.hostname = submission.config.hostname
        self.done = False
        self._reset()

    def _reset(self) -> None:
        self.sender: str | None = None
        self.utf8 = False  # MAIL FROM had SMTPUTF8
        self.recipients: list[str] = []
        self._data: list[bytes] | None = None
        self._size = 0
        self._too_big = False

    def greeting(self) -> bytes:
        return f"220 {self.hostname} ESMTP twisted-mta (sendmail -bs)\r\n".encode()

    @staticmethod
    def _reply(code: int, text: str) -> bytes:
        return f"{code} {text}\r\n".encode("utf-8", "replace")

    def line(self, raw: bytes) -> bytes:
        """
        The reply to one input line (CRLF or LF stripped or not); b"" while
        message data is being read.
        """
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if self._data is not None:
            return self._data_line(line)
        if len(raw) > self.limits.command_line_length:
            return self._reply(500, "5.5.2 Line too long")
        text = line.decode("utf-8", "replace")
        verb, _, arg = text.partition(" ")
        handler = getattr(self, "smtp_" + verb.upper(), None)
        if handler is None or not verb.isalpha():
            return self._reply(502, "5.5.2 Command not recognized")
        return handler(arg.strip())

    def smtp_HELO(self, arg: str) -> bytes:
        self._reset()
        return self._reply(250, self.hostname)

    def smtp_EHLO(self, arg: str) -> bytes:
        self._reset()
        return (f"250-{self.hostname}\r\n250-PIPELINING\r\n250-SIZE {self.limits.message_size}"
                "\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n").encode()

    def smtp_MAIL(self, arg: str) -> bytes:
        if self.sender is not None:
            return self._reply(503, "5.5.1 Error: nested MAIL command")
        try:
            parsed = parse_mail_from(arg)
        except AddressError as e:
            return self._reply(501, f"5.1.7 Bad sender address syntax: {e}")
        size = parsed.params.get("SIZE")
        if size and size.isdigit() and int(size) > self.limits.message_size:
            return self._reply(552, "5.3.4 Message size exceeds fixed limit")
        self.sender = str(parsed.address) if parsed.address is not None else ""
        self.utf8 = "SMTPUTF8" in parsed.params
        return self._reply(250, "2.1.0 Ok")

    def smtp_RCPT(self, arg: str) -> bytes:
        if self.sender is None:
            return self._reply(503, "5.5.1 Error: need MAIL command")
        try:
            parsed = parse_rcpt_to(arg, utf8=self.utf8)
        except AddressError as e:
            return self._reply(501, f"5.1.3 Bad recipient address syntax: {e}")
        if len(self.recipients) >= MAX_RECIPIENTS:
            return self._reply(452, "4.5.3 Error: too many recipients")
        self.recipients.append(qualify(str(parsed.address), self.submission.domain))
        return self._reply(250, "2.1.5 Ok")

    def smtp_DATA(self, arg: str) -> bytes:
        if self.sender is None:
            return self._reply(503, "5.5.1 Error: need MAIL command")
        if not self.recipients:
            return self._reply(554, "5.5.1 Error: no valid recipients")
        self._data = []
        return self._reply(354, "End data with <CR><LF>.<CR><LF>")

    def _data_line(self, line: bytes) -> bytes:
        assert self._data is not None
        if line == b".":
            return self._end_of_data()
        if line.startswith(b"."):
            line = line[1:]
        self._size += len(line) + 2
        if self._size > self.limits.message_size or \
                len(line) + 2 > self.limits.data_line_length or b"\0" in line:
            self._too_big = True
        if not self._too_big:
            self._data.append(line.replace(b"\r", b"") + b"\r\n")
        return b""

    def _end_of_data(self) -> bytes:
        data, sender, rcpts, bad = self._data or [], self.sender, self.recipients, self._too_big
        self._reset()
        if bad:
            return self._reply(552, "5.3.4 Message too big, a line too long, or a NUL octet")
        try:
            drop = self.submission.make(b"".join(data), sender or "", rcpts, False, None)
            name = self.submission.drop(drop)
        except Failed as e:
            code = "451 4.3.0" if e.status == EX_TEMPFAIL else "554 5.6.0"
            return f"{code} {e}\r\n".encode("utf-8", "replace")
        return self._reply(250, f"2.0.0 Ok: dropped as {name}")

    def smtp_RSET(self, arg: str) -> bytes:
        self._reset()
        return self._reply(250, "2.0.0 Ok")

    def smtp_NOOP(self, arg: str) -> bytes:
        return self._reply(250, "2.0.0 Ok")

    def smtp_VRFY(self, arg: str) -> bytes:
        return self._reply(252, "2.0.0 Send some mail, I'll try my best")

    def smtp_QUIT(self, arg: str) -> bytes:
        self.done = True
        return self._reply(221, "2.0.0 Bye")


def run_smtp(session: LocalSMTP, stdin: BinaryIO, stdout: BinaryIO) -> int:
    stdout.write(session.greeting())
    stdout.flush()
    limit = max(session.limits.command_line_length, session.limits.data_line_length) + 2
    while not session.done:
        line = stdin.readline(limit)
        if not line:
            break
        out = session.line(line)
        if out:
            stdout.write(out)
            stdout.flush()
    return EX_OK


# -- -bv ----------------------------------------------------------------------


def verify(config: Config, domain: str, addresses: tuple[str, ...]) -> tuple[int, list[str]]:
    """
    What would become of each address, from our local users and aliases
    only (nothing is sent): the exit status and a line per address.
    """
    if not addresses:
        raise Failed(EX_USAGE, "-bv needs addresses to verify")
    directory = LocalDirectory(config.local)
    lines, status = [], EX_OK
    for given in addresses:
        address = qualify(given, domain)
        try:
            parse_mailbox(address, utf8=True)
        except AddressError as e:
            lines.append(f"{given}: undeliverable: {e}")
            status = EX_NOUSER
            continue
        rcpt_domain = address.rpartition("@")[2].lower()
        if not directory.is_local_domain(rcpt_domain):
            lines.append(f"{address}: deliverable: relayed to {rcpt_domain}")
            continue
        try:
            finals = directory.expand(address)
        except UnknownRecipient:
            lines.append(f"{address}: undeliverable: no such user here")
            status = EX_NOUSER
            continue
        except AliasLoop:
            lines.append(f"{address}: undeliverable: alias loop in the configuration")
            status = EX_NOUSER
            continue
        where = [f"local mailbox {f}" if directory.is_local_domain(f.rpartition("@")[2])
                 else f"relayed to {f}" for f in finals]
        lines.append(f"{address}: deliverable: {', '.join(where)}")
    return status, lines


# -- main -----------------------------------------------------------------------


def config_path(options: Options, environ: dict[str, str]) -> str:
    """
    -C/--config, else $TWISTED_MTA_CONFIG, else /etc/twisted-mta/mta.toml.
    """
    return options.config or environ.get(CONFIG_ENV) or DEFAULT_CONFIG


def run(options: Options, stdin: BinaryIO, stdout: BinaryIO, environ: dict[str, str],
        uid: int, list_queue: Callable[[str], int] | None = None) -> int:
    """
    The command after its flags.  C{list_queue} prints the queue of a
    configuration file for -bp (C{twisted-mta queue list}, handed in by
    L{twisted_mta.cli}, which imports this module).
    """
    path = config_path(options, environ)
    try:
        # The user may not read the MTA's keys: the files it names are not
        # opened, only the configuration's own syntax is checked.
        config = load_config(path, check_files=False)
    except ConfigError as e:
        raise Failed(EX_CONFIG, str(e))
    submission = Submission(config, caller(uid))
    if options.mode == "aliases":
        sys.stderr.write(f"sendmail: nothing to rebuild: aliases are [local.aliases] in {path}, "
                         "read when the MTA starts\n")
        return EX_OK
    if options.mode == "queue":
        if list_queue is None:
            raise Failed(EX_UNAVAILABLE, f"use twisted-mta queue list -c {path}")
        return EX_OK if list_queue(path) == 0 else EX_NOPERM
    if options.mode == "verify":
        status, lines = verify(config, submission.domain, options.recipients)
        stdout.write("".join(line + "\n" for line in lines).encode("utf-8", "replace"))
        return status
    if options.mode == "smtp":
        return run_smtp(LocalSMTP(submission), stdin, stdout)
    sender = envelope_sender(options, submission.own_address)
    dsn = dsn_requests(options)
    if not options.recipients and not options.extract:
        raise Failed(EX_USAGE, "no recipients: name them on the command line, or use -t to "
                     "read them from the message")
    message = read_message(stdin, options.ignore_dots, config.limits.message_size,
                           config.limits.data_line_length)
    drop = attrs.evolve(submission.make(message, sender, list(options.recipients),
                                        options.extract, options.full_name), **dsn)
    name = submission.drop(drop)
    if options.verbose:
        sys.stderr.write(f"sendmail: dropped as {name} for {len(drop.recipients)} "
                         "recipient(s)\n")
    return EX_OK


def main(argv: list[str] | None = None,
         list_queue: Callable[[str], int] | None = None) -> int:
    """
    The command: C{argv} includes the program name (its basename picks
    C{mailq} and C{newaliases}).  Never a traceback: one line and a
    sysexits status.
    """
    argv = list(sys.argv if argv is None else argv)
    prog = os.path.basename(argv[0]) if argv else "sendmail"
    try:
        options = parse_args(argv[1:], prog)
        return run(options, sys.stdin.buffer, sys.stdout.buffer, dict(os.environ), os.getuid(),
                   list_queue)
    except Failed as e:
        sys.stderr.write(f"sendmail: {e}\n")
        return e.status
    except KeyboardInterrupt:
        sys.stderr.write("sendmail: interrupted; nothing was sent\n")
        return EX_TEMPFAIL
    except BrokenPipeError:  # the reader of our output went away (-bs, -bv, -bp)
        return EX_IOERR
    except Exception as e:  # a bug: one line, not a traceback
        sys.stderr.write(f"sendmail: internal error: {type(e).__name__}: {e}\n")
        return EX_SOFTWARE
