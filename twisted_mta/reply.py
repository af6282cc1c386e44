"""
SMTP replies as values, and the table of the replies the server sends.

Keeping every reply in one table lets a test check that each carries an
enhanced status code whose class matches its basic code (RFC 2034/3463).
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Reply:
    code: int
    enhanced: str | None
    text: str

    def lines(self) -> list[bytes]:
        """
        The reply as wire lines without CRLF; every line carries the code.
        """
        texts = self.text.split("\n") or [""]
        out = []
        for i, text in enumerate(texts):
            sep = " " if i == len(texts) - 1 else "-"
            prefix = f"{self.enhanced} " if self.enhanced else ""
            out.append(f"{self.code}{sep}{prefix}{text}".encode("utf-8", "replace"))
        return out

    def wire(self) -> bytes:
        """The reply as sent: L{lines}, each ending in CRLF."""
        if "\n" not in self.text:  # one line, the common case: made at once
            prefix = f"{self.enhanced} " if self.enhanced else ""
            return f"{self.code} {prefix}{self.text}\r\n".encode("utf-8", "replace")
        return b"".join(line + b"\r\n" for line in self.lines())

    def with_text(self, text: str) -> "Reply":
        return attrs.evolve(self, text=text)

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


def R(code: int, enhanced: str | None, text: str) -> Reply:
    return Reply(code, enhanced, text)


# Named replies; the server uses these and nothing else (greeting, EHLO and
# HELO, 354 and 334 carry no enhanced code by definition).
OK = R(250, "2.0.0", "Ok")
RESET_OK = R(250, "2.0.0", "Reset state")
NOOP_OK = R(250, "2.0.0", "Ok")
SENDER_OK = R(250, "2.1.0", "Sender ok")
RECIPIENT_OK = R(250, "2.1.5", "Recipient ok")
VRFY_CANNOT = R(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = R(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS")
START_INPUT = R(354, None, "End data with <CR><LF>.<CR><LF>")
READY_TLS = R(220, "2.0.0", "Ready to start TLS")
BYE = R(221, "2.0.0", "Bye")

AUTH_OK = R(235, "2.7.0", "Authentication successful")
AUTH_TOO_MANY = R(421, "4.7.0", "Too many failed authentication attempts, try again later")
AUTH_REQUIRED = R(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = R(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_ALREADY = R(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = R(503, "5.5.1", "AUTH not allowed during a mail transaction")
AUTH_SYNTAX = R(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM = R(504, "5.5.4", "Unrecognized authentication mechanism")
AUTH_CANCELLED = R(501, "5.0.0", "Authentication cancelled")
AUTH_BAD_BASE64 = R(501, "5.5.2", "Cannot decode the response (base64)")
AUTH_FAILED = R(535, "5.7.8", "Authentication credentials invalid")
SENDER_NOT_OWNED = R(553, "5.7.1", "Sender address not owned by user")
TIMEOUT = R(421, "4.4.2", "Timeout exceeded, closing connection")
DATA_TOO_SLOW = R(421, "4.4.2", "Message data arriving too slowly, closing connection")
DATA_TOO_LONG = R(421, "4.4.2", "Time limit for message data exceeded, closing connection")
TOO_MANY_CONNECTIONS_IP = R(421, "4.7.0", "Too many connections from your address, try again later")
TOO_MANY_CONNECTIONS = R(421, "4.3.2", "Too many connections, try again later")
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors, closing connection")
LOCAL_ERROR = R(451, "4.3.0", "Local error in processing, try again later")
QUEUE_WRITE_ERROR = R(451, "4.3.0", "Could not store the message, try again later")
TOO_MANY_RECIPIENTS = R(452, "4.5.3", "Too many recipients")
TLS_NOT_AVAILABLE = R(454, "4.7.0", "TLS not available")
TLS_FAILED = R(454, "4.7.0", "TLS handshake failed")

LINE_TOO_LONG = R(500, "5.5.2", "Line too long")
UNKNOWN_COMMAND = R(500, "5.5.1", "Command unrecognized")
BAD_SYNTAX = R(500, "5.5.2", "Syntax error")
BARE_NEWLINE_COMMAND = R(500, "5.5.2", "Bare CR or LF in command line is not allowed")
INVALID_CHARS = R(500, "5.5.2", "Invalid character in command")
NO_PARAMETERS = R(501, "5.5.4", "Syntax error: no parameters allowed")
BAD_MAIL_SYNTAX = R(501, "5.5.4", "Syntax: MAIL FROM:<address>")
BAD_RCPT_SYNTAX = R(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_ADDRESS = R(501, "5.1.3", "Bad address syntax")
BAD_SENDER_ADDRESS = R(501, "5.1.7", "Bad sender address syntax")
HELO_REQUIRED = R(501, "5.5.4", "Syntax: EHLO hostname")
NOT_IMPLEMENTED = R(502, "5.5.1", "Command not implemented")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command first")
NESTED_MAIL = R(503, "5.5.1", "Sender already specified")
NEED_RCPT = R(503, "5.5.1", "Need RCPT command first")
BDAT_SYNTAX = R(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]; closing the connection")
DATA_AFTER_BDAT = R(503, "5.5.1", "DATA not allowed after BDAT; send RSET")
RCPT_AFTER_BDAT = R(503, "5.5.1", "RCPT not allowed after BDAT; send RSET")
BDAT_AFTER_FAILURE = R(503, "5.5.1", "An earlier BDAT of this message failed; send RSET")
TLS_ALREADY = R(503, "5.5.1", "TLS already active")
NEED_EHLO = R(503, "5.5.1", "Send EHLO or HELO first")
PARAM_UNKNOWN = R(555, "5.5.4", "Unsupported parameter")
TLS_REQUIRED = R(530, "5.7.0", "Must issue a STARTTLS command first")
# RFC 8689 2 names no reply for REQUIRETLS outside TLS; 530 with 5.7.10
# ("Encryption needed", RFC 5248) says what the client can do about it.
REQUIRETLS_NEEDS_TLS = R(530, "5.7.10", "REQUIRETLS is only accepted over TLS: issue "
                                        "STARTTLS first")
# RFC 6531 3.5: a UTF-8 path without the SMTPUTF8 parameter of MAIL.
NON_ASCII_SENDER = R(550, "5.6.7", "Non-ASCII address needs SMTPUTF8: "
                                   "MAIL FROM:<address> SMTPUTF8")
NON_ASCII_RECIPIENT = R(553, "5.6.7", "Non-ASCII address needs SMTPUTF8 on the MAIL command")
NO_SUCH_USER = R(550, "5.1.1", "No such user here")
RELAY_DENIED = R(550, "5.7.1", "Relaying denied")
MESSAGE_TOO_BIG = R(552, "5.3.4", "Message size exceeds the limit")
DATA_LINE_TOO_LONG = R(554, "5.6.0", "Message contains a line longer than the limit")
BARE_NEWLINE_DATA = R(554, "5.6.0", "Message contains a bare CR or LF; lines must end with CRLF")
NUL_IN_DATA = R(554, "5.6.0", "Message contains NUL characters")
TOO_MANY_HOPS = R(554, "5.4.6", "Too many hops (Received headers), possible mail loop")
NO_VALID_RECIPIENTS = R(554, "5.5.1", "No valid recipients")
