"""
The 7-bit conversion for servers without 8BITMIME (twisted_mta.downgrade):
tables of messages, each converted and read back by the standard library's
MIME parser, which must find the original text in the converted parts.
"""

from __future__ import annotations

import email
import email.policy

from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.downgrade import DowngradeRefused, downgrade

CRLF = "\r\n"


def msg(*lines: str) -> bytes:
    return CRLF.join(lines).encode("utf-8")


def parse(data: bytes):
    return email.message_from_bytes(data, policy=email.policy.default)


def leaves(message):
    return [p for p in message.walk() if not p.is_multipart()
            and p.get_content_type() != "message/rfc822"]


LONG_TEXT = "Ä" + "x" * 200 + " é " * 40 + "end"
BINARY = bytes(range(256)) * 3

SEVEN_BIT = [
    # (name, message): returned unchanged, the same bytes.
    ("plain", msg("From: a@example.test", "Subject: hi", "", "hello", "")),
    ("mime", msg("MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=b", "", "--b",
                 "Content-Type: text/plain", "", "x", "--b--", "")),
    ("no body", msg("Subject: none")),
    ("8bit label on 7-bit text", msg("Content-Transfer-Encoding: 8bit", "", "ascii", "")),
]

CONVERTED = [
    # (name, message, [(content type, decoded payload, transfer encoding)] of its leaves)
    ("text 8bit -> QP",
     msg("MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
         "Content-Transfer-Encoding: 8bit", "", "Grüße", "zweite Zeile ", ""),
     [("text/plain", "Grüße\r\nzweite Zeile \r\n", "quoted-printable")]),
    ("long line gets soft breaks",
     msg("Content-Type: text/plain; charset=utf-8", "", LONG_TEXT, ""),
     [("text/plain", LONG_TEXT + "\r\n", "quoted-printable")]),
    ("binary part -> base64",
     msg("MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=\"=b=\"", "",
         "preamble", "--=b=", "Content-Type: text/plain; charset=utf-8", "", "café",
         "--=b=", "Content-Type: application/octet-stream",
         "Content-Transfer-Encoding: binary", "", "@BIN@", "--=b=--", "epilogue", ""),
     [("text/plain", "café", "quoted-printable"),
      ("application/octet-stream", BINARY, "base64")]),
    ("nested multipart",
     msg("MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=outer", "",
         "--outer", "Content-Type: multipart/alternative; boundary=inner", "",
         "--inner", "Content-Type: text/plain; charset=utf-8", "", "naïve", "--inner",
         "Content-Type: text/html; charset=utf-8", "", "<p>naïve</p>", "--inner--",
         "--outer", "Content-Type: text/plain", "", "seven bit", "--outer--", ""),
     [("text/plain", "naïve", "quoted-printable"),
      ("text/html", "<p>naïve</p>", "quoted-printable"),
      ("text/plain", "seven bit", None)]),
    ("message/rfc822 converted inside",
     msg("MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=b", "",
         "--b", "Content-Type: message/rfc822", "Content-Transfer-Encoding: 8bit", "",
         "Subject: inner", "Content-Type: text/plain; charset=utf-8", "", "ünïcödé",
         "--b--", ""),
     [("text/plain", "ünïcödé", "quoted-printable")]),
    ("8-bit body without MIME headers",
     msg("From: a@example.test", "Subject: plain", "", "Hällo", ""),
     [("text/plain", "Hällo\r\n", "quoted-printable")]),
    ("unstructured 8-bit Subject -> RFC 2047",
     msg("Subject: Grüße", "", "ascii body", ""),
     [("text/plain", "ascii body\r\n", None)]),
]


def expand(data: bytes) -> bytes:
    return data.replace(b"@BIN@", BINARY)


class SevenBitTests(SynchronousTestCase):
    def test_untouched(self):
        """A 7-bit message comes back byte for byte."""
        for name, message in SEVEN_BIT:
            self.assertIs(downgrade(message), message, name)


class ConvertedTests(SynchronousTestCase):
    def test_table(self):
        """
        Each 8-bit message becomes 7-bit, every line at most 998 octets
        (the encoded ones at most 76), and its leaves decode to the
        original content with the expected transfer encoding.
        """
        for name, message, expected in CONVERTED:
            out = downgrade(expand(message))
            self.assertTrue(out.isascii(), name)
            self.assertNotIn(b"\r\n.\r\n", out, name)
            for line in out.split(b"\r\n"):
                self.assertLessEqual(len(line), 998, name)
                self.assertNotIn(b"\r", line, name)
                self.assertNotIn(b"\n", line, name)
            parts = leaves(parse(out))
            self.assertEqual(len(parts), len(expected), name)
            for part, (ctype, payload, cte) in zip(parts, expected):
                self.assertEqual(part.get_content_type(), ctype, name)
                self.assertEqual(part.get("Content-Transfer-Encoding"), cte, name)
                decoded = part.get_payload(decode=True)
                if isinstance(payload, str):
                    decoded = decoded.decode(part.get_content_charset() or "ascii")
                self.assertEqual(decoded, payload, name)
                if cte in ("quoted-printable", "base64"):
                    lines = part.get_payload().split("\n")
                    self.assertLessEqual(max(len(l.rstrip("\r")) for l in lines), 76, name)

    def test_subject_encoded(self):
        """An 8-bit Subject becomes encoded words that decode to the original."""
        out = downgrade(msg("Subject: Grüße " + "lang " * 30, "", "x", ""))
        self.assertTrue(out.isascii())
        self.assertEqual(str(parse(out)["Subject"]), "Grüße " + ("lang " * 30).strip())

    def test_soft_breaks(self):
        """
        A long 8-bit line is cut by soft breaks ("=" CRLF) into lines of at
        most 76 characters, never inside an =XX escape.
        """
        out = downgrade(msg("Content-Type: text/plain; charset=utf-8", "", "é" * 100, ""))
        body = out.split(b"\r\n\r\n", 1)[1]
        lines = body.split(b"\r\n")
        self.assertGreater(len(lines), 3)
        for line in lines[:-2]:
            self.assertTrue(line.endswith(b"="), line)
            self.assertLessEqual(len(line), 76)
        self.assertEqual(lines[-1], b"")  # the text's own CRLF stays a hard break

    def test_global_report_part(self):
        """An RFC 6533 message/global-headers part (a DSN's) is encoded as base64."""
        import base64
        out = downgrade(msg("Content-Type: multipart/report; boundary=b", "", "--b",
                            "Content-Type: message/global-headers", "", "Subject: Grüße",
                            "--b--", ""))
        self.assertTrue(out.isascii())
        head, _, rest = out.partition(b"Content-Type: message/global-headers\r\n")
        encoded = rest.split(b"\r\n\r\n", 1)[1].split(b"--b--")[0]
        self.assertIn(b"Content-Transfer-Encoding: base64", rest)
        self.assertEqual(base64.b64decode(encoded), "Subject: Grüße".encode())

    def test_trailing_space_encoded(self):
        """Space at the end of a line is encoded (RFC 2045 6.7 (3))."""
        out = downgrade(msg("Content-Type: text/plain; charset=utf-8", "", "é ", ""))
        self.assertIn(b"=C3=A9=20\r\n", out)

    def test_only_converted_part_changes(self):
        """The 7-bit part next to a converted one keeps its exact bytes."""
        seven = "Content-Type: text/plain\r\nX-Odd:   spacing  \r\n\r\nline one\r\n\tline two"
        message = msg("MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=b", "",
                      "--b", seven, "--b", "Content-Type: text/plain; charset=utf-8", "",
                      "ö", "--b--", "")
        out = downgrade(message)
        self.assertIn(("--b\r\n" + seven + "\r\n--b\r\n").encode(), out)


REFUSED = [
    # (name, message, reason, words in the explanation)
    ("DKIM-signed",
     msg("DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=s; bh=x; b=y",
         "Subject: x", "", "ümlaut", ""),
     "dkim-signed", "DKIM-signed"),
    ("multipart/signed",
     msg("MIME-Version: 1.0",
         "Content-Type: multipart/signed; boundary=s; protocol=\"application/pkcs7-signature\"",
         "", "--s", "Content-Type: text/plain; charset=utf-8", "", "ümlaut", "--s",
         "Content-Type: application/pkcs7-signature", "", "AAAA", "--s--", ""),
     "mime-signed", "multipart/signed"),
    ("S/MIME opaque",
     msg("MIME-Version: 1.0", "Content-Type: application/pkcs7-mime; smime-type=signed-data",
         "Content-Transfer-Encoding: binary", "", "\u00ff\u00fe", ""),
     "mime-signed", "application/pkcs7-mime"),
    ("8-bit address header",
     msg("From: Jürgen <j@example.test>", "", "x", ""),
     "8bit-header", "From"),
    ("8-bit in a base64 part",
     msg("Content-Type: text/plain", "Content-Transfer-Encoding: base64", "", "ü", ""),
     "malformed", "base64"),
    ("multipart without boundary line",
     msg("Content-Type: multipart/mixed; boundary=b", "", "ü", ""),
     "malformed", "boundary"),
]


class RefusedTests(SynchronousTestCase):
    def test_table(self):
        """Each message is refused with its reason, named in the words."""
        for name, message, reason, words in REFUSED:
            with self.assertRaises(DowngradeRefused, msg=name) as caught:
                downgrade(message)
            self.assertEqual(caught.exception.reason, reason, name)
            self.assertIn(words, str(caught.exception), name)
            self.assertEqual(caught.exception.signed, reason.endswith("-signed"), name)

    def test_signed_but_seven_bit(self):
        """A signed message that is already 7-bit needs no conversion: untouched."""
        message = msg("DKIM-Signature: v=1; d=example.test", "", "ascii", "")
        self.assertIs(downgrade(message), message)

    def test_signed_part_seven_bit_beside_8bit(self):
        """
        A 7-bit signed part (attached) is not touched when another part
        is converted, so its signature holds: no refusal.
        """
        message = msg("MIME-Version: 1.0", "Content-Type: multipart/mixed; boundary=b", "",
                      "--b", "Content-Type: text/plain; charset=utf-8", "", "ü", "--b",
                      "Content-Type: multipart/signed; boundary=s", "", "--s", "", "a",
                      "--s", "", "sig", "--s--", "--b--", "")
        self.assertIn(b"--s\r\n\r\na\r\n--s", downgrade(message))


class QuotedPrintablePropertyTests(SynchronousTestCase):
    def test_random_lines(self):
        """
        Random 8-bit text lines (spaces, tabs, "=", dots, bare CR and LF,
        UTF-8 and not): the output is ASCII, every line at most 76
        characters without a bare CR or LF, and it decodes to the input
        octet for octet (seeded, so a failure repeats).
        """
        import random
        rnd = random.Random(15)
        alphabet = b"ab =\t.\xc3\xa4\xff\r\n"
        for _ in range(400):
            lines = [bytes(rnd.choice(alphabet) for _ in range(rnd.randint(0, 300)))
                     .replace(b"\r\n", b"\r") for _ in range(rnd.randint(1, 8))]
            text = b"\r\n".join(lines) + b"\x80\r\n"
            out = downgrade(b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text)
            self.assertTrue(out.isascii())
            for line in out.split(b"\r\n"):
                self.assertLessEqual(len(line), 76, line)
                self.assertNotIn(b"\r", line)
                self.assertNotIn(b"\n", line)
            self.assertEqual(parse(out).get_payload(decode=True), text)
