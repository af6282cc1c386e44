"""
The Sendmail milter protocol, version 6, as pure functions over bytes.

The MTA side only: packets we send (L{encode} and the C{*_packet} helpers),
the packets a milter answers with (L{PacketParser}, L{decode_response}), the
option negotiation (L{negotiate}) and the header edits a milter asks for at
end of message (L{apply_header_edits}).  No I/O here, so every rule is
tested from tables (tests/test_milter_protocol.py); the client that speaks
it over a socket is L{twisted_mta.inbound.milter}.

A packet is a 4-octet big-endian length (of what follows), one command
octet and its data; strings are NUL-terminated.  Everything a milter sends
is untrusted: a malformed packet is a L{MilterProtocolError}, which the
client treats like an unreachable milter (its default action).
"""

from __future__ import annotations

import re
import struct

import attrs

from twisted_mta.reply import Reply

VERSION = 6

# Commands, MTA to milter (SMFIC_*).
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"

# Replies and modifications, milter to MTA (SMFIR_*).
R_ADDRCPT = b"+"
R_DELRCPT = b"-"
R_ADDRCPT_PAR = b"2"
R_SHUTDOWN = b"4"
R_ACCEPT = b"a"
R_REPLBODY = b"b"
R_CONTINUE = b"c"
R_DISCARD = b"d"
R_CHGFROM = b"e"
R_CONN_FAIL = b"f"
R_ADDHEADER = b"h"
R_INSHEADER = b"i"
R_SETSYMLIST = b"l"
R_CHGHEADER = b"m"
R_PROGRESS = b"p"
R_QUARANTINE = b"q"
R_REJECT = b"r"
R_SKIP = b"s"
R_TEMPFAIL = b"t"
R_REPLYCODE = b"y"

# Actions a milter may take at end of message (SMFIF_*).
F_ADDHDRS = 0x01
F_CHGBODY = 0x02
F_ADDRCPT = 0x04
F_DELRCPT = 0x08
F_CHGHDRS = 0x10
F_QUARANTINE = 0x20
F_CHGFROM = 0x40
F_ADDRCPT_PAR = 0x80
F_SETSYMLIST = 0x100
# What we carry out: everything version 6 defines.
OUR_ACTIONS = (F_ADDHDRS | F_CHGBODY | F_ADDRCPT | F_DELRCPT | F_CHGHDRS | F_QUARANTINE
               | F_CHGFROM | F_ADDRCPT_PAR | F_SETSYMLIST)

# Protocol steps a milter may ask us to leave out or not to wait for (SMFIP_*).
P_NOCONNECT = 0x01
P_NOHELO = 0x02
P_NOMAIL = 0x04
P_NORCPT = 0x08
P_NOBODY = 0x10
P_NOHDRS = 0x20
P_NOEOH = 0x40
P_NR_HDR = 0x80
P_NOUNKNOWN = 0x100
P_NODATA = 0x200
P_SKIP = 0x400
P_RCPT_REJ = 0x800
P_NR_CONN = 0x1000
P_NR_HELO = 0x2000
P_NR_MAIL = 0x4000
P_NR_RCPT = 0x8000
P_NR_DATA = 0x10000
P_NR_UNKN = 0x20000
P_NR_EOH = 0x40000
P_NR_BODY = 0x80000
P_HDR_LEADSPC = 0x100000
# What we honour.  Not offered: RCPT_REJ (we never send refused RCPTs),
# HDR_LEADSPC (values go without their leading space, as Sendmail does
# by default) and the larger body chunk sizes (ours are at most 65535).
OUR_PROTOCOL = (P_NOCONNECT | P_NOHELO | P_NOMAIL | P_NORCPT | P_NOBODY | P_NOHDRS | P_NOEOH
                | P_NR_HDR | P_NOUNKNOWN | P_NODATA | P_SKIP | P_NR_CONN | P_NR_HELO
                | P_NR_MAIL | P_NR_RCPT | P_NR_DATA | P_NR_UNKN | P_NR_EOH | P_NR_BODY)

# For each command: the flag that leaves it out, the flag that says the
# milter sends no reply to it.
STEP_FLAGS = {
    CONNECT: (P_NOCONNECT, P_NR_CONN),
    HELO: (P_NOHELO, P_NR_HELO),
    MAIL: (P_NOMAIL, P_NR_MAIL),
    RCPT: (P_NORCPT, P_NR_RCPT),
    DATA: (P_NODATA, P_NR_DATA),
    HEADER: (P_NOHDRS, P_NR_HDR),
    EOH: (P_NOEOH, P_NR_EOH),
    BODY: (P_NOBODY, P_NR_BODY),
}

# Macro stages in SETSYMLIST (SMFIM_*) and the command each goes before.
MACRO_STAGES = {0: CONNECT, 1: HELO, 2: MAIL, 3: RCPT, 4: DATA, 5: BODYEOB, 6: EOH}

BODY_CHUNK = 65535  # the largest body packet without MDS_256K/MDS_1M
MAX_PACKET = 1024 * 1024 + 64  # a REPLBODY of MDS_1M and its header


class MilterProtocolError(Exception):
    """
    The milter broke the protocol (a bad packet, an unknown reply, an edit
    it did not negotiate).
    """


def encode(command: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + command + data


def _z(*strings: bytes) -> bytes:
    """
    NUL-terminated strings; a NUL inside one would end it early, so it is
    dropped (no MTA value may carry one).
    """
    return b"".join(s.replace(b"\x00", b"") + b"\x00" for s in strings)


def optneg_packet(actions: int = OUR_ACTIONS, protocol: int = OUR_PROTOCOL) -> bytes:
    return encode(OPTNEG, struct.pack("!III", VERSION, actions, protocol))


def macro_packet(command: bytes, macros: dict[str, str]) -> bytes:
    """
    The macros for the next C{command}; names longer than one letter are
    braced, as milters look them up (C{{daemon_name}}, C{i}).
    """
    data = b""
    for name, value in macros.items():
        if len(name) > 1 and not name.startswith("{"):
            name = "{" + name + "}"
        data += _z(name.encode("utf-8"), value.encode("utf-8", "replace"))
    return encode(MACRO, command + data)


def connect_packet(hostname: str, family: str, port: int, address: str) -> bytes:
    """
    C{family}: C{4} or C{6} (TCP), C{L} (a Unix socket), C{U} (unknown:
    no port or address follows).
    """
    data = _z(hostname.encode("utf-8", "replace")) + family.encode("ascii")
    if family != "U":
        data += struct.pack("!H", port) + _z(address.encode("utf-8", "replace"))
    return encode(CONNECT, data)


def helo_packet(name: str) -> bytes:
    return encode(HELO, _z(name.encode("utf-8", "replace")))


def args_packet(command: bytes, address: str, params: list[str]) -> bytes:
    """
    MAIL or RCPT: the address in angle brackets, then each ESMTP parameter.
    """
    return encode(command, _z(*(p.encode("utf-8", "replace")
                                for p in [f"<{address}>", *params])))


def header_packet(name: bytes, value: bytes) -> bytes:
    return encode(HEADER, _z(name, value))


def body_packets(chunk: bytes) -> list[bytes]:
    return [encode(BODY, chunk[i:i + BODY_CHUNK]) for i in range(0, len(chunk), BODY_CHUNK)]


class PacketParser:
    """
    Split what a milter sends into C{(command, data)} packets; a packet
    longer than L{MAX_PACKET} is refused before it is buffered.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self._buf += data
        out = []
        while len(self._buf) >= 4:
            (length,) = struct.unpack("!I", self._buf[:4])
            if length < 1 or length > MAX_PACKET:
                raise MilterProtocolError(f"packet length {length} out of range")
            if len(self._buf) < 4 + length:
                break
            packet, self._buf = self._buf[4:4 + length], self._buf[4 + length:]
            out.append((packet[:1], packet[1:]))
        return out


@attrs.frozen
class Negotiated:
    version: int
    actions: int
    protocol: int
    # SETSYMLIST: the macros the milter wants before each command.
    macros: dict[bytes, tuple[str, ...]] = attrs.field(factory=dict)

    def sends(self, command: bytes) -> bool:
        flags = STEP_FLAGS.get(command)
        return flags is None or not self.protocol & flags[0]

    def replies(self, command: bytes) -> bool:
        flags = STEP_FLAGS.get(command)
        return flags is None or not self.protocol & flags[1]


def negotiate(data: bytes) -> Negotiated:
    """
    The milter's answer to our OPTNEG: it may ask for no action and no
    protocol flag we did not offer, and must speak version 2 to 6.
    """
    if len(data) < 12:
        raise MilterProtocolError("short OPTNEG reply")
    version, actions, protocol = struct.unpack("!III", data[:12])
    if not 2 <= version <= VERSION:
        raise MilterProtocolError(f"milter speaks protocol version {version}")
    if actions & ~OUR_ACTIONS:
        raise MilterProtocolError(f"milter asks for actions 0x{actions & ~OUR_ACTIONS:x} "
                                  "we do not offer")
    if protocol & ~OUR_PROTOCOL:
        # libmilter asks for steps it was built to skip even when not offered:
        # refusing would make any such milter unusable, so they are dropped.
        protocol &= OUR_PROTOCOL
    macros: dict[bytes, tuple[str, ...]] = {}
    rest = data[12:]
    while rest:
        if len(rest) < 5 or b"\x00" not in rest[4:]:
            raise MilterProtocolError("bad macro list in OPTNEG reply")
        (stage,) = struct.unpack("!I", rest[:4])
        names, _, rest = rest[4:].partition(b"\x00")
        if stage in MACRO_STAGES:
            macros[MACRO_STAGES[stage]] = tuple(
                n.strip("{}") for n in names.decode("ascii", "replace").split())
    return Negotiated(version, actions, protocol, macros)


# -- replies ---------------------------------------------------------------

@attrs.frozen
class Verdict:
    """
    A milter's answer to a command: C{continue}, C{accept} (nothing more
    for this message), C{reject}, C{tempfail}, C{discard}, C{skip} (no more
    body), with the SMTP reply for a reject or tempfail when it gave one.
    """

    kind: str
    reply: Reply | None = None


@attrs.frozen
class AddHeader:
    name: bytes
    value: bytes


@attrs.frozen
class InsertHeader:
    index: int
    name: bytes
    value: bytes


@attrs.frozen
class ChangeHeader:
    """An empty value deletes the C{index}th (from 1) field of that name."""
    index: int
    name: bytes
    value: bytes


@attrs.frozen
class ReplaceBody:
    chunk: bytes


@attrs.frozen
class Quarantine:
    reason: str


@attrs.frozen
class ChangeFrom:
    address: str


@attrs.frozen
class AddRecipient:
    address: str


@attrs.frozen
class DeleteRecipient:
    address: str


Modification = (AddHeader | InsertHeader | ChangeHeader | ReplaceBody | Quarantine | ChangeFrom
                | AddRecipient | DeleteRecipient)

_SIMPLE = {R_CONTINUE: "continue", R_ACCEPT: "accept", R_REJECT: "reject",
           R_TEMPFAIL: "tempfail", R_DISCARD: "discard", R_SKIP: "skip",
           R_SHUTDOWN: "tempfail", R_CONN_FAIL: "tempfail"}
_NEEDS = {R_ADDHEADER: F_ADDHDRS, R_INSHEADER: F_ADDHDRS, R_CHGHEADER: F_CHGHDRS,
          R_REPLBODY: F_CHGBODY, R_QUARANTINE: F_QUARANTINE, R_CHGFROM: F_CHGFROM,
          R_ADDRCPT: F_ADDRCPT, R_ADDRCPT_PAR: F_ADDRCPT_PAR, R_DELRCPT: F_DELRCPT}
_HEADER_NAME = re.compile(rb"^[!-9;-~]+$")
_REPLY_LINE = re.compile(r"^([45][0-9][0-9])([ -])(?:([45]\.[0-9]{1,3}\.[0-9]{1,3}) )?(.*)$")


def _strings(data: bytes, count: int, what: str) -> list[bytes]:
    parts = data.split(b"\x00")
    if len(parts) < count + 1:
        raise MilterProtocolError(f"{what}: expected {count} string(s)")
    return parts[:count]


def parse_reply_code(text: bytes) -> Reply:
    """
    An SMFIR_REPLYCODE text (C{550 5.7.1 words}, maybe several lines with
    C{550-}): a 4xx or 5xx reply, every line the same code, the enhanced
    code's class matching it; anything else is a protocol error.
    """
    try:
        lines = text.decode("utf-8").replace("\r\n", "\n").rstrip("\n").split("\n")
    except UnicodeDecodeError:
        raise MilterProtocolError("reply code text is not UTF-8")
    code, enhanced, texts = None, None, []
    for i, line in enumerate(lines):
        m = _REPLY_LINE.match(line)
        if not m:
            raise MilterProtocolError(f"bad reply code text {line[:80]!r}")
        last = i == len(lines) - 1
        if (m.group(2) == " ") != last or (code is not None and m.group(1) != code):
            raise MilterProtocolError(f"bad multi-line reply {line[:80]!r}")
        code = m.group(1)
        if m.group(3) and m.group(3)[0] != code[0]:
            raise MilterProtocolError(f"enhanced code {m.group(3)} does not match {code}")
        enhanced = enhanced or m.group(3)
        if any(ord(c) < 32 and c != "\t" for c in m.group(4)):
            raise MilterProtocolError("control characters in reply text")
        texts.append(m.group(4))
    assert code is not None
    return Reply(int(code), enhanced or ("4.7.1" if code[0] == "4" else "5.7.1"), "\n".join(texts))


def decode_response(command: bytes, data: bytes, actions: int = OUR_ACTIONS
                    ) -> Verdict | Modification | None:
    """
    One packet of a milter's answer: a L{Verdict}, a modification (allowed
    only when C{actions} negotiated it), or None for SMFIR_PROGRESS (keep
    waiting).
    """
    if command in _SIMPLE:
        return Verdict(_SIMPLE[command])
    if command == R_PROGRESS:
        return None
    if command == R_REPLYCODE:
        r = parse_reply_code(_strings(data, 1, "REPLYCODE")[0])
        return Verdict("tempfail" if r.code < 500 else "reject", r)
    need = _NEEDS.get(command)
    if need is None:
        raise MilterProtocolError(f"unknown reply {command!r}")
    if not actions & need:
        raise MilterProtocolError(f"modification {command!r} was not negotiated")
    if command == R_ADDHEADER:
        name, value = _strings(data, 2, "ADDHEADER")
        return AddHeader(_header_name(name), _header_value(value))
    if command in (R_INSHEADER, R_CHGHEADER):
        if len(data) < 4:
            raise MilterProtocolError("short header change")
        (index,) = struct.unpack("!I", data[:4])
        name, value = _strings(data[4:], 2, "header change")
        cls = InsertHeader if command == R_INSHEADER else ChangeHeader
        return cls(index, _header_name(name), _header_value(value))
    if command == R_REPLBODY:
        return ReplaceBody(data)
    if command == R_QUARANTINE:
        return Quarantine(_strings(data, 1, "QUARANTINE")[0].decode("utf-8", "replace")[:200])
    address = _address(_strings(data, 1, "envelope change")[0])
    if command == R_CHGFROM:
        return ChangeFrom(address)  # "" is the null sender
    if not address:
        raise MilterProtocolError("empty recipient address")
    if command in (R_ADDRCPT, R_ADDRCPT_PAR):
        return AddRecipient(address)
    return DeleteRecipient(address)


def _header_name(name: bytes) -> bytes:
    if not _HEADER_NAME.match(name):
        raise MilterProtocolError(f"bad header name {name[:80]!r}")
    return name


def _header_value(value: bytes) -> bytes:
    """
    The value as it will be stored: line ends made CRLF, and each
    continuation line must start with white space (else the header would
    end there and the rest become a header or body of its own).
    """
    lines = value.replace(b"\r\n", b"\n").split(b"\n")
    if any(b"\r" in line for line in lines) or any(
            not line[:1] in (b" ", b"\t") for line in lines[1:]):
        raise MilterProtocolError("header value with a bad line break")
    if any(not line.strip() for line in lines[1:]):
        raise MilterProtocolError("header value with an empty continuation line")
    return b"\r\n".join(lines)


def _address(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace").strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    if any(c in text for c in "<> \t\r\n"):
        raise MilterProtocolError(f"bad address {text[:80]!r}")
    return text


# -- headers -----------------------------------------------------------------

Header = tuple[bytes, bytes]  # name, and the raw text after the colon (folds CRLF)


def split_header_block(block: bytes) -> list[Header]:
    """
    The fields of a header block (CRLF line ends, without the blank line):
    each name and its raw value, continuation lines kept.  A line that is
    neither a field nor a continuation (our DATA reader lets none through
    at the start, but a body-less message can end anywhere) becomes part of
    the field before it.
    """
    headers: list[list[bytes]] = []
    for line in block.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1][1] += b"\r\n" + line
            continue
        name, colon, value = line.partition(b":")
        if colon and _HEADER_NAME.match(name):
            headers.append([name, value])
        elif headers:
            headers[-1][1] += b"\r\n" + line
    return [(n, v) for n, v in headers]


def milter_value(raw: bytes) -> bytes:
    """
    A value as milters get it without HDR_LEADSPC: leading white space
    off, line breaks as LF (as Sendmail and Postfix send them).
    """
    return raw.lstrip(b" \t").replace(b"\r\n", b"\n")


def stored_value(value: bytes) -> bytes:
    """A milter's value as we store it: one space after the colon."""
    return value if value[:1] in (b" ", b"\t") else b" " + value


def apply_header_edits(headers: list[Header], edits: list[Modification]) -> list[Header]:
    """
    The header block after one milter's edits, applied in the order it
    sent them (Sendmail's semantics):

      - add: at the end;
      - insert at index I: before the I-th field (from 0), at the end when
        there are fewer;
      - change the I-th (from 1) field named N (case-insensitively): its
        value replaced, or the field deleted when the value is empty; when
        there are fewer than I such fields a non-empty value is added.
    """
    out = list(headers)
    for edit in edits:
        if isinstance(edit, AddHeader):
            out.append((edit.name, stored_value(edit.value)))
        elif isinstance(edit, InsertHeader):
            out.insert(min(edit.index, len(out)), (edit.name, stored_value(edit.value)))
        elif isinstance(edit, ChangeHeader):
            want = edit.name.lower()
            seen = 0
            for position, (name, _) in enumerate(out):
                if name.lower() == want:
                    seen += 1
                    if seen == max(edit.index, 1):
                        if edit.value:
                            out[position] = (name, stored_value(edit.value))
                        else:
                            del out[position]
                        break
            else:
                if edit.value:
                    out.append((edit.name, stored_value(edit.value)))
    return out


def join_headers(headers: list[Header]) -> bytes:
    return b"".join(name + b":" + value + b"\r\n" for name, value in headers)


# -- addresses -----------------------------------------------------------------

@attrs.frozen
class MilterAddress:
    """Where a milter listens: TCP C{host}:C{port}, or the Unix socket C{path}."""
    host: str | None = None
    port: int | None = None
    path: str | None = None


def parse_milter_address(text: str) -> MilterAddress:
    """
    C{inet:HOST:PORT} (also Sendmail's C{inet:PORT@HOST}, and
    C{inet6:[ADDR]:PORT}) or C{unix:PATH} (also C{local:PATH}); raise
    ValueError with the reason otherwise.
    """
    kind, colon, rest = text.partition(":")
    kind = kind.lower()
    if not colon or not rest:
        raise ValueError("must be inet:HOST:PORT or unix:PATH")
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError("unix: needs an absolute path")
        return MilterAddress(path=rest)
    if kind not in ("inet", "inet6"):
        raise ValueError(f"unknown kind {kind!r}: must be inet:HOST:PORT or unix:PATH")
    if "@" in rest:
        port, _, host = rest.partition("@")
    elif rest.startswith("["):
        host, _, tail = rest[1:].partition("]")
        port = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port = rest.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bad port {port!r}")
    if not host:
        raise ValueError("no host")
    return MilterAddress(host=host, port=int(port))


def split_head(data: bytes, complete: bool) -> tuple[list[Header], int, bool] | None:
    """
    The header fields at the start of C{data} (each name and raw value,
    continuation lines kept), the offset where the body starts, and
    whether a blank line separated them; None when C{data} may not hold
    the whole header yet (unless C{complete}: then what is not a whole
    field is body).  The header ends at the blank line, or at the first
    line that is neither a field nor a continuation (that line is body).
    """
    headers: list[Header] = []
    pos = 0
    while True:
        idx = data.find(b"\r\n", pos)
        if idx < 0 or (idx + 2 == len(data) and not complete and data[pos:idx]):
            # The next line could still be a continuation of this one.
            if not complete:
                return None
            if idx < 0:
                return headers, pos, False
        line = data[pos:idx]
        if not line:
            return headers, idx + 2, True
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\r\n" + line)
        else:
            name, colon, value = line.partition(b":")
            if not (colon and _HEADER_NAME.match(name)):
                return headers, pos, False
            headers.append((name, value))
        pos = idx + 2


class CRLFNormalizer:
    """
    Line ends made CRLF across the chunks of a stream (a milter's
    replacement body): a bare LF or CR becomes CRLF, and the stream ends
    with CRLF, so nothing with a bare newline is stored.
    """

    def __init__(self) -> None:
        self._cr = False  # the last chunk ended in CR
        self._last = b"\n"

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        if self._cr:
            chunk = b"\r" + chunk
        self._cr = chunk.endswith(b"\r")
        if self._cr:
            chunk = chunk[:-1]
        out = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if out:
            self._last = out[-1:]
        return out

    def finish(self) -> bytes:
        if self._cr:
            self._cr = False
            self._last = b"\n"
            return b"\r\n"
        return b"" if self._last == b"\n" else b"\r\n"
