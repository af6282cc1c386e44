"""
The maildrop file: how the sendmail command (run by any local user) hands
a message to the running MTA's pickup.

A drop is one file in C{<spool>/maildrop/}::

    TWISTED-MTA-MAILDROP 1 LF
    {"recipients": [...], "sender": "...", "size": N} LF
    N octets of message, CRLF line ends

(with C{"smtputf8": true} in the JSON when an address or the header is
UTF-8, RFC 6531/6532, the addresses then checked as UTF-8 ones; and the
DSN requests of -N, -R and -V as C{"notify"}, C{"ret"}, C{"envid"}).

The writer is not trusted: anyone may put anything into the directory, so
L{decode} checks every part against bounds (the first two lines, the
number and syntax of the addresses, the message's size, line length, line
ends, NUL) and raises L{DropError} with one line for anything else.  Who
wrote it is not in the file: the pickup takes the owner of the file, which
a user cannot forge.  Pure functions, shared by both ends.
"""

from __future__ import annotations

import json
import os
import re
import secrets

import attrs

from twisted_mta.address import AddressError, parse_mailbox
from twisted_mta.dsn.params import ENVID_MAX, NOTIFY_VALUES

MAGIC = b"TWISTED-MTA-MAILDROP 1\n"
DIRECTORY = "maildrop"
# The envelope line: 1000 addresses of at most 256 octets each fit.
MAX_META = 512 * 1024
# Recipients in one drop (Postfix's smtpd_recipient_limit default): a cron
# job or a list script with more splits its mail.
MAX_RECIPIENTS = 1000
# A drop's name: letters and digits (a time prefix, then random), so the
# pickup takes them roughly in order and nobody can guess another's name.
_NAME = re.compile(r"^[A-Za-z0-9]{1,64}$")
_BAD_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class DropError(ValueError):
    """
    The drop file cannot be used; C{str()} says why in one line.
    """


@attrs.frozen
class Drop:
    """
    What a drop file asks for: the envelope sender (C{""} for C{<>}), the
    recipients and the message (CRLF line ends).
    """

    sender: str
    recipients: tuple[str, ...]
    message: bytes
    smtputf8: bool = False  # UTF-8 in an address or the header (RFC 6531)
    # DSN (RFC 3461), for every recipient: NOTIFY (() is NEVER), RET, ENVID
    notify: tuple[str, ...] | None = None
    ret: str | None = None
    envid: str | None = None


def drop_name(now: float) -> str:
    """
    A fresh name for a drop: the time in hex, then 128 random bits.
    """
    return f"{int(now):08x}{secrets.token_hex(16)}".upper()


def is_drop_name(name: str) -> bool:
    return bool(_NAME.match(name))


def maildrop_path(spool: str) -> str:
    return os.path.join(spool, DIRECTORY)


def encode(drop: Drop) -> bytes:
    fields: dict[str, object] = {"sender": drop.sender, "recipients": list(drop.recipients),
                                 "size": len(drop.message)}
    if drop.smtputf8:
        fields["smtputf8"] = True
    for key in ("notify", "ret", "envid"):
        value = getattr(drop, key)
        if value is not None:
            fields[key] = list(value) if key == "notify" else value
    meta = json.dumps(fields, sort_keys=True, ensure_ascii=True)
    return MAGIC + meta.encode("ascii") + b"\n" + drop.message


def check_message(message: bytes, max_size: int, max_line: int) -> None:
    """
    Raise L{DropError} unless C{message} fits what the spool takes:
    at most C{max_size} octets, CRLF line ends only, lines of at most
    C{max_line} octets (CRLF included), no NUL.
    """
    if len(message) > max_size:
        raise DropError(f"the message is {len(message)} octets, more than the limit of "
                        f"{max_size} ([limits] message_size)")
    if not message.endswith(b"\r\n"):
        raise DropError("the message does not end with CRLF")
    if b"\0" in message:
        raise DropError("the message contains a NUL octet")
    if _BAD_LINE_END.search(message):
        raise DropError("the message has a bare CR or LF")
    start = 0
    while True:
        end = message.find(b"\r\n", start)
        if end < 0:
            break
        if end + 2 - start > max_line:
            raise DropError(f"a line of the message is longer than {max_line} octets "
                            "([limits] data_line_length)")
        start = end + 2


def check_address(address: object, what: str, utf8: bool = False) -> str:
    """
    C{address} if it is one mailbox (in UTF-8 only with C{utf8}), else
    L{DropError}.
    """
    if not isinstance(address, str) or not (utf8 or address.isascii()):
        raise DropError(f"{what} is not an ASCII string")
    try:
        parse_mailbox(address, utf8=utf8)
    except AddressError as e:
        raise DropError(f"{what} {address[:80]!r}: {e}")
    return address


def decode(data: bytes, max_size: int, max_line: int) -> Drop:
    """
    The drop in the file's bytes C{data}, checked; L{DropError} for
    anything else.
    """
    if not data.startswith(MAGIC):
        raise DropError("not a maildrop file (no TWISTED-MTA-MAILDROP 1 line)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + MAX_META)
    if end < 0:
        raise DropError(f"the envelope line is missing or longer than {MAX_META} octets")
    try:
        meta = json.loads(data[len(MAGIC):end].decode("ascii"),
                          parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise DropError(f"the envelope line is not JSON: {str(e)[:80]}")
    if not isinstance(meta, dict) or not {"sender", "recipients", "size"} <= set(meta) or \
            not set(meta) <= {"sender", "recipients", "size", "smtputf8", "notify", "ret",
                              "envid"}:
        raise DropError("the envelope line must hold sender, recipients and size "
                        "(and smtputf8, notify, ret, envid), nothing else")
    sender, recipients, size = meta["sender"], meta["recipients"], meta["size"]
    utf8 = meta.get("smtputf8", False)
    if not isinstance(utf8, bool):
        raise DropError("smtputf8 must be true or false")
    if sender != "":
        check_address(sender, "the sender", utf8)
    if not isinstance(recipients, list) or not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise DropError(f"recipients must be a list of 1 to {MAX_RECIPIENTS} addresses")
    for rcpt in recipients:
        check_address(rcpt, "the recipient", utf8)
    message = data[end + 1:]
    if not isinstance(size, int) or isinstance(size, bool) or size != len(message):
        raise DropError(f"the file holds {len(message)} octets of message, "
                        f"its envelope line says {size!r}")
    check_message(message, max_size, max_line)
    return Drop(sender=sender, recipients=tuple(dict.fromkeys(recipients)), message=message,
                smtputf8=utf8, **_dsn(meta))


def _dsn(meta: dict) -> dict:
    """
    The DSN requests of a drop's envelope line, checked.
    """
    out: dict = {}
    notify = meta.get("notify")
    if notify is not None:
        if not isinstance(notify, list) or not all(v in NOTIFY_VALUES for v in notify):
            raise DropError(f"notify must list some of {', '.join(NOTIFY_VALUES)} "
                            "(none: NEVER)")
        out["notify"] = tuple(v for v in NOTIFY_VALUES if v in notify)
    ret = meta.get("ret")
    if ret is not None:
        if ret not in ("FULL", "HDRS"):
            raise DropError("ret must be FULL or HDRS")
        out["ret"] = ret
    envid = meta.get("envid")
    if envid is not None:
        if not isinstance(envid, str) or not 0 < len(envid) <= ENVID_MAX or \
                not all(" " <= c <= "~" for c in envid):
            raise DropError(f"envid must be 1 to {ENVID_MAX} printable ASCII characters")
        out["envid"] = envid
    return out


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")
