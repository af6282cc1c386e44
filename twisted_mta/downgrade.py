"""
Convert an 8-bit message to 7 bits for a server without 8BITMIME
(RFC 6152 section 3, RFC 1652 section 3 item 6: "convert it to 7 bit MIME
without loss of information").

Pure functions over the message's bytes (the queue file after the envelope
header: CRLF line ends, no dot-stuffing).  Every entity (the message, each
MIME part, each attached message) that is already 7-bit is kept byte for
byte; an 8-bit leaf becomes quoted-printable (text/*) or base64 (anything
else), an 8-bit message/rfc822 or multipart is converted inside.  Only
the Content-Transfer-Encoding field (and, where none was declared, the
MIME-Version and Content-Type the decoder needs) of a converted entity
changes.

Raw 8-bit in a header field can only travel as itself with SMTPUTF8 (RFC
6532); without it, the unstructured fields Subject, Comments and
Content-Description are rewritten as RFC 2047 encoded words (UTF-8), and
8-bit in any other field (addresses, parameters: their syntax forbids
encoded words in most places) is refused.

The conversion is refused, with a reason in plain words, when it would
break a signature: a DKIM-Signature field (its body hash, and usually its
signed Subject, cover the 8-bit bytes), or an 8-bit multipart/signed,
multipart/encrypted or S/MIME (application/pkcs7-mime) entity.

Memory: the message is held whole, with its converted copy (at most about
2.4 times its size for base64 and quoted-printable, whose worst case is
three octets per octet); messages are bounded by [limits] message_size,
and this runs once per delivery to such a server, in the I/O pool.
"""

from __future__ import annotations

import base64
import binascii
import email.header
import email.message
import re

QP_LINE = 76  # RFC 2045 6.7 (5): encoded lines of at most 76 characters
BASE64_LINE = 76

# Fields whose whole value is unstructured text (RFC 5322 3.6.5, RFC 2045
# 8): an RFC 2047 encoded word may stand anywhere in them.
UNSTRUCTURED = frozenset({"subject", "comments", "content-description"})
SIGNED_TYPES = frozenset({"multipart/signed", "multipart/encrypted",
                          "application/pkcs7-mime", "application/x-pkcs7-mime"})
IDENTITY = frozenset({"7bit", "8bit", "binary"})
# RFC 6532 3.7 and RFC 6533 6: international messages and reports, which
# may be encoded (base64) like any leaf.
GLOBAL_TYPES = frozenset({"message/global", "message/global-headers",
                          "message/global-delivery-status",
                          "message/global-disposition-notification"})
CRLF = b"\r\n"


class DowngradeRefused(ValueError):
    """
    The message cannot be converted to 7 bits without breaking it.
    C{reason} is a short keyword (C{dkim-signed}, C{mime-signed},
    C{8bit-header}, C{malformed}); C{str()} says why in plain words.
    """

    def __init__(self, reason: str, words: str) -> None:
        super().__init__(words)
        self.reason = reason
        self.words = words

    @property
    def signed(self) -> bool:
        return self.reason in ("dkim-signed", "mime-signed")


def downgrade(message: bytes) -> bytes:
    """
    The message as 7-bit MIME; a message that is already 7-bit is returned
    as it is.  Raises L{DowngradeRefused} when it must not or cannot be
    converted.
    """
    if message.isascii():
        return message
    headers, body = _split_entity(message)
    for name, _ in headers:
        if name == "dkim-signature":
            raise DowngradeRefused(
                "dkim-signed", "the message is DKIM-signed and contains 8-bit characters; "
                "converting it to 7 bits would break the signature")
    out = _convert(headers, body, "text/plain", top=True)
    if not out.isascii():  # a guard: nothing 8-bit may leave this module
        raise DowngradeRefused("malformed", "the message could not be converted to 7 bits")
    return out


# -- entities -------------------------------------------------------------------

Field = tuple[str, bytes]  # (lower-cased name, the raw field with its CRLFs)


def _split_entity(data: bytes) -> tuple[list[Field], bytes | None]:
    """
    The header fields and the body (None when there is no empty line).
    """
    if data.startswith(CRLF):
        return [], data[2:]
    end = data.find(CRLF + CRLF)
    if end < 0:
        head, body = data, None
    else:
        head, body = data[:end + 2], data[end + 4:]
    fields: list[Field] = []
    for line in head.split(CRLF):
        if not line and not fields:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + CRLF)
        elif line:
            name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
            fields.append((name, line + CRLF))
    return fields, body


def _join(fields: list[Field], body: bytes | None) -> bytes:
    head = b"".join(raw for _, raw in fields)
    if body is None:
        return head
    return head + CRLF + body


def _value(fields: list[Field], name: str) -> str | None:
    for field_name, raw in fields:
        if field_name == name:
            value = raw.split(b":", 1)[1] if b":" in raw else b""
            return value.replace(CRLF, b"").decode("ascii", "replace").strip()
    return None


def _content(fields: list[Field], default: str) -> email.message.Message:
    m = email.message.Message()
    m.set_default_type(default)
    value = _value(fields, "content-type")
    if value is not None:
        m["Content-Type"] = value
    return m


def _convert(fields: list[Field], body: bytes | None, default: str, top: bool) -> bytes:
    entity = _join(fields, body)
    if entity.isascii():
        return entity
    content = _content(fields, default)
    ctype = content.get_content_type()
    if ctype in SIGNED_TYPES:
        raise DowngradeRefused(
            "mime-signed", f"the message contains a signed or encrypted MIME part ({ctype}) "
            "with 8-bit characters; converting it to 7 bits would break the signature")
    fields = _headers_7bit(fields)
    if body is None or body.isascii():
        return _join(fields, body)
    cte = (_value(fields, "content-transfer-encoding") or "7bit").lower()
    if ctype.startswith("multipart/"):
        boundary = content.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise DowngradeRefused("malformed", "an 8-bit multipart part has no boundary")
        inner = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        return _join(_relabel(fields, cte), _multipart(body, boundary.encode("ascii",
                                                                              "replace"), inner))
    if ctype == "message/rfc822":
        inner_fields, inner_body = _split_entity(body)
        return _join(_relabel(fields, cte),
                     _convert(inner_fields, inner_body, "text/plain", top=True))
    if ctype.startswith("message/") and ctype not in GLOBAL_TYPES:
        # RFC 2046 5.2: message/partial and external-body are 7-bit only.
        raise DowngradeRefused("malformed", f"a {ctype} part contains 8-bit characters")
    if cte not in IDENTITY:
        raise DowngradeRefused(
            "malformed", f"a part declared {cte} contains 8-bit characters, which that "
            "encoding cannot carry")
    fields = [f for f in fields if f[0] != "content-transfer-encoding"]
    if ctype.startswith("text/"):
        encoded, label = _quoted_printable(body), b"quoted-printable"
    else:
        encoded, label = _base64(body), b"base64"
    added: list[Field] = []
    if top and _value(fields, "mime-version") is None:
        added.append(("mime-version", b"MIME-Version: 1.0" + CRLF))
    if _value(fields, "content-type") is None and ctype == "text/plain":
        added.append(("content-type", b"Content-Type: text/plain; charset="
                      + _charset(body) + CRLF))
    added.append(("content-transfer-encoding", b"Content-Transfer-Encoding: " + label + CRLF))
    return _join(fields + added, encoded)


def _relabel(fields: list[Field], cte: str) -> list[Field]:
    """
    A composite entity whose parts are now 7-bit: an 8bit or binary
    label becomes 7bit (RFC 2045 6.4: its parts carry their own).
    """
    if cte == "7bit" or _value(fields, "content-transfer-encoding") is None:
        return fields
    return [f if f[0] != "content-transfer-encoding"
            else (f[0], b"Content-Transfer-Encoding: 7bit" + CRLF) for f in fields]


def _charset(body: bytes) -> bytes:
    try:
        body.decode("utf-8")
        return b"utf-8"
    except UnicodeDecodeError:
        return b"unknown-8bit"  # RFC 1428


def _multipart(body: bytes, boundary: bytes, inner_default: str) -> bytes:
    """
    Convert each part between the boundary delimiter lines (RFC 2046
    5.1.1); the preamble, the delimiters and the epilogue stay as they are.
    """
    delimiter, close = b"--" + boundary, b"--" + boundary + b"--"
    lines = body.split(CRLF)
    segments: list[bytes] = []
    current: list[bytes] = []
    in_part = False
    closed = False
    found = False
    for line in lines:
        stripped = line.rstrip(b" \t")
        if not closed and stripped in (delimiter, close):
            found = True
            if in_part:
                segments.append(_part(CRLF.join(current), inner_default))
            elif current:
                segments.append(_outside(current))
            segments.append(line)
            current = []
            in_part = stripped == delimiter
            closed = stripped == close
        else:
            current.append(line)
    if not found:
        raise DowngradeRefused("malformed", "an 8-bit multipart part has no boundary line")
    if in_part:  # no closing delimiter: the last part runs to the end
        segments.append(_part(CRLF.join(current), inner_default))
    elif current:
        segments.append(_outside(current))
    return CRLF.join(segments)


def _outside(lines: list[bytes]) -> bytes:
    text = CRLF.join(lines)
    if not text.isascii():
        raise DowngradeRefused("malformed", "the preamble or epilogue of a multipart (text "
                               "outside any part) contains 8-bit characters")
    return text


def _part(data: bytes, default: str) -> bytes:
    fields, body = _split_entity(data)
    return _convert(fields, body, default, top=False)


# -- header fields -----------------------------------------------------------------

def _headers_7bit(fields: list[Field]) -> list[Field]:
    out = []
    for name, raw in fields:
        if raw.isascii():
            out.append((name, raw))
            continue
        label = raw.split(b":", 1)[0].decode("ascii", "replace")
        if name not in UNSTRUCTURED:
            raise DowngradeRefused(
                "8bit-header", f"the header field {label} contains 8-bit characters, which "
                "cannot be converted to 7 bits (only SMTPUTF8 could carry them)")
        value = raw.split(b":", 1)[1].replace(CRLF, b"").strip()
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DowngradeRefused(
                "8bit-header", f"the header field {label} contains 8-bit characters that are "
                "not UTF-8, so their character set is unknown")
        encoded = email.header.Header(text, charset="utf-8", header_name=label,
                                      maxlinelen=QP_LINE).encode(linesep="\r\n")
        out.append((name, label.encode("ascii") + b": " + encoded.encode("ascii") + CRLF))
    return out


# -- transfer encodings ---------------------------------------------------------------

def _quoted_printable(body: bytes) -> bytes:
    """
    RFC 2045 6.7 with CRLF as the line break: the text's own line breaks
    stay hard breaks; lines longer than 76 get soft breaks ("=" CRLF),
    never inside an =XX; space and tab are encoded at the end of a line,
    a bare CR or LF always.  Each line goes through C{binascii.b2a_qp}
    (C code, about 35 MB/s here against 5 for Python: this runs in a
    thread of the I/O pool, holding the GIL) as binary, so nothing in it
    is taken for a line break, and its soft breaks (LF) become CRLF.  It
    sometimes makes a line of 77 with tabs near a soft break; such a line
    is encoded again by L{_qp_line}.
    """
    out = []
    for line in body.split(CRLF):
        enc = binascii.b2a_qp(line, quotetabs=False, istext=False)
        if len(enc) > QP_LINE and any(len(s) > QP_LINE for s in enc.split(b"\n")):
            enc = _qp_line(line)
        out.append(enc.replace(b"=\n", b"=\r\n"))
    return CRLF.join(out)


# Everything but printable ASCII other than "=", and space and tab (RFC
# 2045 6.7 (2), (3)); a bare CR or LF is encoded too.
_QP_ESCAPE = re.compile(rb"[^\x21-\x3c\x3e-\x7e \t]")


def _qp_line(line: bytes) -> bytes:
    """
    One line in quoted-printable, soft breaks as "=" LF (as b2a_qp).
    """
    enc = _QP_ESCAPE.sub(lambda m: b"=%02X" % m.group(0)[0], line)
    if enc[-1:] in (b" ", b"\t"):
        enc = enc[:-1] + b"=%02X" % enc[-1]
    pieces = []
    start = 0
    while len(enc) - start > QP_LINE:
        cut = start + QP_LINE - 1
        if enc[cut - 1:cut] == b"=":
            cut -= 1
        elif enc[cut - 2:cut - 1] == b"=":
            cut -= 2
        pieces.append(enc[start:cut] + b"=")
        start = cut
    pieces.append(enc[start:])
    return b"\n".join(pieces)


def _base64(body: bytes) -> bytes:
    raw = base64.b64encode(body)
    lines = [raw[i:i + BASE64_LINE] for i in range(0, len(raw), BASE64_LINE)]
    return CRLF.join(lines) + CRLF
