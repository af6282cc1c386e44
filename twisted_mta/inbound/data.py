"""
Read the DATA phase of one message, chunk by chunk.

SECURITY: the input is the body of a message from an untrusted peer.  The
end of data is recognised only on CR LF . CR LF (RFC 5321 4.1.1.4): bare LF
or bare CR never end it, which defeats the SMTP smuggling forms
(LF.LF, LF.CRLF, CRLF.LF, CR.CR).  A bare CR or LF inside a line is either
rewritten as CRLF ("normalize", as Postfix does) or makes the message fail
("reject"); either way nothing with a bare newline is stored.  Memory is
bounded: the reader keeps at most one partial line, and lines over the limit
are counted but not kept.  Errors do not stop the reading: the reader keeps
going to the real end of data so the session stays in step with the client.

BDAT (RFC 3030) feeds the same reader in raw mode: the server counts the
chunk's octets, so no line ends the data and no dot is removed, but every
other rule above (bare CR/LF, NUL, line length, size, header checks) applies
unchanged.  The message we store, and later send onward with DATA, is
therefore the same canonical CRLF text whichever command brought it in.
"""

from __future__ import annotations

import re
from typing import Callable

from twisted_mta import reply
from twisted_mta.reply import Reply

_RECEIVED = b"received:"
_TLS_REQUIRED = b"tls-required:"
_HEADER = re.compile(rb"[!-9;-~]+:")


def has_long_line(seg: bytes, max_line: int) -> bool:
    """
    Whether C{seg}, whole lines each ending in CRLF with no bare CR or LF,
    has a line longer than C{max_line} octets with its CRLF.  From a line's
    start, the last LF within the next C{max_line} octets ends a line that
    fits (and every line before it); none there means this line is too long.
    So the scan jumps about C{max_line} octets a step instead of splitting
    the run into its lines: a 100 KiB run of short lines takes about 100
    C{rfind}s instead of a list of 1,500 lines.
    """
    rfind, end, pos = seg.rfind, len(seg), 0
    while pos < end:
        last = rfind(b"\n", pos, pos + max_line)
        if last < 0:
            return True
        pos = last + 1
    return False


class DataReader:
    """
    Feed it bytes with L{feed}; it writes the unstuffed, CRLF-normalised
    message through C{write} and reports when the terminating dot came.

    Body text without dots at line starts or anything to rewrite is copied
    in runs (C-speed scans); everything else goes line by line.
    """

    def __init__(self, write: Callable[[bytes], None], *, max_size: int, max_line: int,
                 max_received: int, bare_newline: str, raw: bool = False) -> None:
        self._write = write
        self._raw = raw  # BDAT: no end-of-data line, no dot-unstuffing
        self._max_size = max_size
        self._max_line = max_line  # octets, including CRLF
        self._max_received = max_received
        self._normalize = bare_newline == "normalize"
        self._skipping_tail = False  # inside the rest of an over-long line
        self._in_headers = True
        self._seen_header = False
        self._fast_until = 0  # buffer offset below which the fast path failed
        self.size = 0
        self.received_count = 0
        self.error: Reply | None = None
        # The values of the TLS-Required header fields (RFC 8689 3), unfolded:
        # the server tags the message "TLS-Required: No" from them.
        self.tls_required: list[bytes] = []
        self._in_tls_required = False

    def _fail(self, error: Reply) -> None:
        if self.error is None:
            self.error = error

    def feed(self, buf: bytes) -> tuple[int, bool]:
        """
        Consume complete lines from C{buf}.

        @return: how many bytes were consumed, and whether the end of data
            was among them.  Unconsumed bytes are a partial line (or what
            follows the end of data) and must be offered again.
        """
        pos = 0
        out: list[bytes] = []
        find = buf.find
        done = False
        while True:
            if pos >= self._fast_until and not self._in_headers and self.error is None \
                    and not self._skipping_tail:
                pos = self._fast(buf, pos, out)
            idx = find(b"\r\n", pos)
            if idx < 0:
                remaining = len(buf) - pos
                if remaining >= self._max_line:
                    # Keep a trailing CR: its LF may start the next chunk.
                    keep = 1 if buf.endswith(b"\r") else 0
                    self._note_long_line(remaining - keep)
                    pos = len(buf) - keep
                break
            line = buf[pos:idx]
            pos = idx + 2
            if self._skipping_tail:
                self._skipping_tail = False
                self.size += len(line) + 2
                continue
            if not self._raw:
                if line == b".":
                    done = True
                    break
                if line[:1] == b".":
                    line = line[1:]
            self._line(line, out)
        self._fast_until = max(0, self._fast_until - pos)
        if out and self.error is None:
            self._write(b"".join(out))
        return pos, done

    def _fast(self, buf: bytes, pos: int, out: list[bytes]) -> int:
        """
        Take the run of body lines before the next line starting with a dot
        in one piece when it needs no rewriting; return the new position.

        Anything unusual (bare CR/LF, NUL, a long line, the size limit) is
        left to the line-by-line path, which reports it; the run is then not
        tried again, so hostile input costs linear time.
        """
        if self._raw:
            dot = -1
        elif buf.startswith(b".", pos):
            return pos
        else:
            dot = buf.find(b"\r\n.", pos)
        end = dot + 2 if dot >= 0 else buf.rfind(b"\r\n", pos) + 2
        if end - pos < 2:
            return pos
        seg = buf[pos:end]
        crlf = seg.count(b"\r\n")
        if (seg.count(b"\r") != crlf or seg.count(b"\n") != crlf or b"\x00" in seg
                or (len(seg) > self._max_line and has_long_line(seg, self._max_line))
                or self.size + len(seg) > self._max_size):
            self._fast_until = end
            return pos
        self.size += len(seg)
        out.append(seg)
        return end

    def finish(self, rest: bytes) -> None:
        """
        The end of a raw (BDAT) message: C{rest} is what L{feed} left
        unconsumed, a last line without its CRLF.  It is stored with one, as
        every line is; a lone CR at its end counts as that line's end (under
        "reject" it is refused like any bare CR).
        """
        out: list[bytes] = []
        if self._skipping_tail:
            self._skipping_tail = False
            self.size += len(rest)
        elif rest:
            if self._normalize and rest.endswith(b"\r"):
                rest = rest[:-1]
            self._line(rest, out)
        if out and self.error is None:
            self._write(b"".join(out))

    def _note_long_line(self, length: int) -> None:
        self._fail(reply.DATA_LINE_TOO_LONG.with_text(
            f"Message contains a line longer than {self._max_line} octets"))
        self.size += length
        self._skipping_tail = True

    def _line(self, line: bytes, out: list[bytes]) -> None:
        size = len(line) + 2
        self.size += size
        if size > self._max_line:
            self._fail(reply.DATA_LINE_TOO_LONG.with_text(
                f"Message contains a line longer than {self._max_line} octets"))
            return
        if self.size > self._max_size:
            self._fail(reply.MESSAGE_TOO_BIG.with_text(
                f"Message exceeds the size limit of {self._max_size} octets"))
            return
        if b"\r" in line or b"\n" in line:
            if not self._normalize:
                self._fail(reply.BARE_NEWLINE_DATA)
                return
            line = line.replace(b"\r", b"\n").replace(b"\n", b"\r\n")
        if b"\x00" in line:
            self._fail(reply.NUL_IN_DATA)
            return
        if self._in_headers:
            if not line:
                self._in_headers = False
            elif _HEADER.match(line) or (self._seen_header and line[:1] in (b" ", b"\t")):
                self._seen_header = True
                if line[:1] in (b" ", b"\t"):
                    if self._in_tls_required and len(self.tls_required[-1]) < 1000:
                        self.tls_required[-1] = b" ".join(
                            v for v in (self.tls_required[-1], line.strip()) if v)
                else:
                    # Two fields already decide (no tag): keep no more.
                    self._in_tls_required = (line[:13].lower() == _TLS_REQUIRED
                                             and len(self.tls_required) < 2)
                    if self._in_tls_required:
                        self.tls_required.append(line[13:].strip())
                if line[:9].lower() == _RECEIVED:
                    self.received_count += 1
                    if self.received_count > self._max_received:
                        self._fail(reply.TOO_MANY_HOPS)
                        return
            else:
                # Body text where a header field was expected: close the
                # header section with an empty line (as Postfix's cleanup
                # does), or readers would take it for a broken header
                # following our Received field.
                self._in_headers = False
                out.append(b"\r\n")
        if self.error is None:
            out.append(line + b"\r\n")
