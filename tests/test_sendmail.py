"""
The sendmail command (twisted_mta/sendmail.py) and the maildrop file
(twisted_mta/maildrop.py): flags, reading the message, completing its
header, -t with Bcc, the drop file and its checks, -bs and -bv.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys

from twisted.trial import unittest

from tests.support import make_config
from twisted_mta import maildrop, sendmail
from twisted_mta.maildrop import Drop, DropError
from twisted_mta.sendmail import (
    EX_CONFIG, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_USAGE, Caller, Failed, Header,
    LocalSMTP, Options, Submission, complete, header_recipients, parse_args, read_message,
)

NOW = 1796334547.0


class ParseArgsTests(unittest.TestCase):
    """
    sendmail's flags as real callers give them.
    """

    TABLE = [
        # (argv, prog, expected fields)
        (["-t", "-i"], "sendmail", dict(extract=True, ignore_dots=True)),
        (["-ti"], "sendmail", dict(extract=True, ignore_dots=True)),
        (["-oi", "alice"], "sendmail", dict(ignore_dots=True, recipients=("alice",))),
        (["-f", "a@b.test", "x"], "sendmail", dict(sender="a@b.test", recipients=("x",))),
        (["-fa@b.test", "x"], "sendmail", dict(sender="a@b.test", recipients=("x",))),
        (["-r", "a@b.test", "x"], "sendmail", dict(sender="a@b.test", recipients=("x",))),
        (["-f", "", "x"], "sendmail", dict(sender="", recipients=("x",))),
        (["-F", "Cron Daemon", "-t"], "sendmail", dict(full_name="Cron Daemon", extract=True)),
        (["-bs"], "sendmail", dict(mode="smtp")),
        (["-bv", "alice"], "sendmail", dict(mode="verify", recipients=("alice",))),
        (["-bp"], "sendmail", dict(mode="queue")),
        (["-bm", "x"], "sendmail", dict(mode="deliver", recipients=("x",))),
        (["-bi"], "sendmail", dict(mode="aliases")),
        (["-I"], "sendmail", dict(mode="aliases")),
        ([], "mailq", dict(mode="queue")),
        ([], "newaliases", dict(mode="aliases")),
        (["-C", "/etc/mta.toml", "x"], "sendmail", dict(config="/etc/mta.toml",
                                                       recipients=("x",))),
        (["--config=/x.toml", "x"], "sendmail", dict(config="/x.toml", recipients=("x",))),
        (["-odi", "-oem", "-v", "-oQ/var/q", "-U", "x"], "sendmail",
         dict(verbose=True, recipients=("x",), ignored=("-odi", "-oem", "-oQ/var/q", "-U"))),
        (["-N", "success,delay", "-Rhdrs", "-V", "job-17", "x"], "sendmail",
         dict(notify="success,delay", ret="hdrs", envid="job-17", recipients=("x",))),
        (["-em", "-B", "8BITMIME", "-h", "3", "-m", "-n", "x"], "sendmail",
         dict(recipients=("x",), ignored=("-em", "-B8BITMIME", "-h3", "-m", "-n"))),
        # Options end at the first recipient, as in sendmail and Postfix.
        (["x", "-t"], "sendmail", dict(recipients=("x", "-t"))),
        (["--", "-x"], "sendmail", dict(recipients=("-x",))),
    ]

    def test_table(self) -> None:
        for argv, prog, fields in self.TABLE:
            with self.subTest(argv=argv, prog=prog):
                self.assertEqual(parse_args(argv, prog), Options(**fields))

    ERRORS = [
        (["-q"], "-q (run the queue) is not supported"),
        (["-q1h"], "-q (run the queue) is not supported"),
        (["-bd"], "-bd is not supported"),
        (["-Z"], "option -Z not recognized"),
        (["-f"], "option -f requires argument"),
    ]

    def test_errors(self) -> None:
        for argv, words in self.ERRORS:
            with self.subTest(argv=argv):
                with self.assertRaises(Failed) as caught:
                    parse_args(argv)
                self.assertEqual(caught.exception.status, EX_USAGE)
                self.assertIn(words, str(caught.exception))


class ReadMessageTests(unittest.TestCase):

    def read(self, data: bytes, ignore_dots: bool = False, size: int = 1000,
             line: int = 100) -> bytes:
        return read_message(io.BytesIO(data), ignore_dots, size, line)

    def test_lone_dot_ends_without_i(self) -> None:
        self.assertEqual(self.read(b"a\n.\nb\n"), b"a\r\n")

    def test_lone_dot_is_text_with_i(self) -> None:
        self.assertEqual(self.read(b"a\n.\nb\n", ignore_dots=True), b"a\r\n.\r\nb\r\n")

    def test_line_ends_become_crlf(self) -> None:
        self.assertEqual(self.read(b"a\r\nb\nc"), b"a\r\nb\r\nc\r\n")

    def test_dots_are_not_unstuffed(self) -> None:
        self.assertEqual(self.read(b"..x\n"), b"..x\r\n")

    def test_too_long_line(self) -> None:
        with self.assertRaises(Failed) as caught:
            self.read(b"x" * 200 + b"\n")
        self.assertEqual(caught.exception.status, EX_DATAERR)
        self.assertIn("line 1 of the message is longer than 100", str(caught.exception))

    def test_too_big(self) -> None:
        with self.assertRaises(Failed) as caught:
            self.read(b"0123456789\n" * 100)
        self.assertEqual(caught.exception.status, EX_DATAERR)
        self.assertIn("limit of 1000 octets", str(caught.exception))

    def test_nul(self) -> None:
        with self.assertRaises(Failed) as caught:
            self.read(b"a\nb\0\n")
        self.assertIn("line 2 of the message contains a NUL", str(caught.exception))


class HeaderTests(unittest.TestCase):

    def complete(self, message: bytes, name: str = "Alice Liddell") -> bytes:
        return complete(Header.split(message), "alice@example.test", name,
                        "mx.example.test", NOW).message()

    def fields(self, message: bytes) -> list[str]:
        head = message.split(b"\r\n\r\n", 1)[0].decode()
        return [line.split(":", 1)[0] for line in head.split("\r\n") if line[:1] not in " \t"]

    def test_all_missing(self) -> None:
        out = self.complete(b"hi\r\n")
        self.assertEqual(self.fields(out), ["From", "Date", "Message-ID", "To"])
        self.assertIn(b"From: Alice Liddell <alice@example.test>\r\n", out)
        self.assertIn(b"To: undisclosed-recipients:;\r\n", out)
        self.assertRegex(out, rb"Message-ID: <1796334547\.[0-9a-f]{16}@mx\.example\.test>\r\n")
        self.assertIn(b"Date: ", out)
        self.assertTrue(out.endswith(b"\r\n\r\nhi\r\n"), out)

    def test_present_fields_are_kept(self) -> None:
        message = (b"From: Someone <x@y.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   b"Message-ID: <a@b>\r\nTo: bob@example.test\r\nSubject: s\r\n\r\nbody\r\n")
        self.assertEqual(self.complete(message), message)

    def test_only_to(self) -> None:
        out = self.complete(b"To: bob@example.test\r\n\r\nhi\r\n")
        self.assertEqual(self.fields(out), ["To", "From", "Date", "Message-ID"])

    def test_bcc_removed_everywhere(self) -> None:
        out = self.complete(b"To: a@x.test\r\nBcc: b@x.test,\r\n c@x.test\r\n"
                            b"Resent-Bcc: d@x.test\r\nbcc: e@x.test\r\n\r\nBcc: in body\r\n")
        head, body = out.split(b"\r\n\r\n", 1)
        self.assertNotIn(b"bcc", head.lower())
        self.assertNotIn(b"c@x.test", head)
        self.assertEqual(body, b"Bcc: in body\r\n")

    def test_only_bcc_gets_an_empty_to(self) -> None:
        out = self.complete(b"Bcc: b@x.test\r\n\r\nhi\r\n")
        self.assertIn(b"To: undisclosed-recipients:;\r\n", out)
        self.assertNotIn(b"b@x.test", out)

    def test_body_where_a_field_was_expected(self) -> None:
        out = self.complete(b"Subject: s\r\nthis is body\r\nmore\r\n")
        self.assertTrue(out.endswith(b"\r\n\r\nthis is body\r\nmore\r\n"), out)
        self.assertIn(b"Subject: s\r\n", out)

    def test_mbox_from_line_dropped(self) -> None:
        out = self.complete(b"From alice Thu Dec  3 21:00:00 2026\r\nSubject: s\r\n\r\nb\r\n")
        self.assertNotIn(b"From alice", out)
        self.assertIn(b"Subject: s\r\n", out)

    def test_non_ascii_full_name_is_encoded(self) -> None:
        out = self.complete(b"\r\nhi\r\n", name="Zoë Ångström")
        line = [x for x in out.split(b"\r\n") if x.startswith(b"From:")][0]
        self.assertTrue(line.isascii())
        self.assertIn(b"=?utf-8?", line)
        self.assertIn(b"<alice@example.test>", line)

    def test_empty_full_name(self) -> None:
        self.assertIn(b"From: alice@example.test\r\n", self.complete(b"\r\nhi\r\n", name=""))

    def test_recipients_of_the_header(self) -> None:
        table = [
            (b"To: a@x.test, B <b@x.test>\r\nCc: c@x.test\r\nBcc: d@x.test\r\n\r\n",
             ["a@x.test", "b@x.test", "c@x.test", "d@x.test"]),
            (b"To: team: a@x.test, b@x.test;\r\n\r\n", ["a@x.test", "b@x.test"]),
            (b"To: undisclosed-recipients:;\r\n\r\n", []),
            (b"To: a@x.test,\r\n\tb@x.test\r\n\r\n", ["a@x.test", "b@x.test"]),
            (b"To: root\r\n\r\n", ["root"]),
            # resent: the Resent- fields, not the original ones
            (b"To: a@x.test\r\nResent-To: r@x.test\r\nResent-Bcc: s@x.test\r\n\r\n",
             ["r@x.test", "s@x.test"]),
        ]
        for message, expected in table:
            with self.subTest(message=message):
                self.assertEqual(header_recipients(Header.split(message)), expected)


def submission(base: str, **sections) -> Submission:
    return Submission(make_config(base, **sections), Caller("alice", "Alice Liddell"),
                      now=lambda: NOW)


class SubmissionTests(unittest.TestCase):

    def setUp(self) -> None:
        self.sub = submission(self.mktemp())

    def test_t_with_bcc(self) -> None:
        drop = self.sub.make(b"To: bob\r\nCc: carol@remote.test\r\nBcc: alice\r\n\r\nhi\r\n",
                             "alice@mx.example.test", [], True, None)
        self.assertEqual(drop.recipients, ("bob@mx.example.test", "carol@remote.test",
                                           "alice@mx.example.test"))
        self.assertNotIn(b"Bcc", drop.message)
        self.assertNotIn(b"alice@", drop.message.split(b"From:")[0])

    def test_t_adds_to_the_command_line(self) -> None:
        drop = self.sub.make(b"To: bob@example.test\r\n\r\nhi\r\n", "", ["carol@x.test",
                                                                          "bob@example.test"],
                             True, None)
        self.assertEqual(drop.recipients, ("carol@x.test", "bob@example.test"))

    def test_t_without_recipients(self) -> None:
        with self.assertRaises(Failed) as caught:
            self.sub.make(b"Subject: x\r\n\r\nhi\r\n", "", [], True, None)
        self.assertEqual(caught.exception.status, EX_DATAERR)

    def test_no_recipients(self) -> None:
        with self.assertRaises(Failed) as caught:
            self.sub.make(b"hi\r\n", "", [], False, None)
        self.assertEqual(caught.exception.status, EX_USAGE)

    def test_bad_recipient(self) -> None:
        with self.assertRaises(Failed) as caught:
            self.sub.make(b"hi\r\n", "", ["a b@c"], False, None)
        self.assertEqual(caught.exception.status, EX_USAGE)
        self.assertIn("bad recipient address 'a b@c'", str(caught.exception))

    def test_smtputf8_detected(self) -> None:
        # UTF-8 in an address or the header makes the drop SMTPUTF8 (RFC
        # 6531/6532), as Postfix's sendmail autodetects it; ASCII does not.
        table = [
            ("", ["jöran@example.test"], b"hi\r\n", True),
            ("jöran@example.test", ["bob"], b"hi\r\n", True),
            ("", ["bob"], "Subject: Grüße\r\n\r\nhi\r\n".encode(), True),
            ("", ["bob"], b"Subject: \xe9t\xe9\r\n\r\nhi\r\n", False),  # Latin-1
            ("", ["bob"], "Subject: s\r\n\r\nGrüße\r\n".encode(), False),  # body only
            ("a@x.test", ["bob"], b"hi\r\n", False),
        ]
        for sender, rcpts, message, utf8 in table:
            with self.subTest(sender=sender, rcpts=rcpts, message=message):
                drop = self.sub.make(message, sender, rcpts, False, None)
                self.assertIs(drop.smtputf8, utf8)
                self.assertEqual(maildrop.decode(maildrop.encode(drop), 10 ** 6, 1000), drop)
        with self.assertRaises(Failed) as caught:
            self.sub.make(b"hi\r\n", "", ["jö ran@example.test"], False, None)
        self.assertEqual(caught.exception.status, EX_USAGE)

    def test_full_name_flag_wins_over_gecos(self) -> None:
        drop = self.sub.make(b"hi\r\n", "", ["bob"], False, "Cron Daemon")
        self.assertIn(b"From: Cron Daemon <alice@mx.example.test>\r\n", drop.message)

    def test_domain_setting(self) -> None:
        sub = submission(self.mktemp(), sendmail={"domain": "example.test"})
        drop = sub.make(b"hi\r\n", "", ["bob"], False, None)
        self.assertEqual(drop.recipients, ("bob@example.test",))
        self.assertIn(b"<alice@example.test>", drop.message)

    def test_too_big_after_completion(self) -> None:
        sub = submission(self.mktemp(), limits={"message_size": 1024})
        with self.assertRaises(Failed) as caught:
            sub.make(b"x" * 900 + b"\r\n", "", ["bob"], False, None)
        self.assertIn("more than the limit of 1024", str(caught.exception))

    def test_dsn_requests(self) -> None:
        table = [
            (Options(), {}),
            (Options(notify="never"), {"notify": ()}),
            (Options(notify="failure,success"), {"notify": ("SUCCESS", "FAILURE")}),
            (Options(ret="full", envid="cron job 7"), {"ret": "FULL", "envid": "cron job 7"}),
        ]
        for options, expected in table:
            with self.subTest(options=options):
                self.assertEqual(sendmail.dsn_requests(options), expected)
        for options, words in ((Options(notify="sometimes"), "-N sometimes: NOTIFY value"),
                               (Options(notify="never,success"), "cannot be combined"),
                               (Options(ret="body"), "-R body: must be full or hdrs"),
                               (Options(envid="x" * 101), "1 to 100 printable"),
                               (Options(envid="a\nb"), "1 to 100 printable")):
            with self.subTest(options=options):
                with self.assertRaises(Failed) as caught:
                    sendmail.dsn_requests(options)
                self.assertEqual(caught.exception.status, EX_USAGE)
                self.assertIn(words, str(caught.exception))

    def test_sender(self) -> None:
        own = "alice@mx.example.test"
        for given, expected in ((None, own), ("", ""), ("<>", ""), ("bounce", "bounce@mx.example.test"),
                                ("<list@x.test>", "list@x.test")):
            with self.subTest(given=given):
                self.assertEqual(sendmail.envelope_sender(Options(sender=given), own), expected)
        with self.assertRaises(Failed):
            sendmail.envelope_sender(Options(sender="a b@c"), own)


class DropFileTests(unittest.TestCase):

    def good(self, **meta) -> bytes:
        message = b"Subject: s\r\n\r\nhi\r\n"
        fields = {"sender": "a@x.test", "recipients": ["b@y.test"], "size": len(message)}
        fields.update(meta)
        return maildrop.MAGIC + json.dumps(fields).encode() + b"\n" + message

    def test_round_trip(self) -> None:
        drop = Drop("a@x.test", ("b@y.test", "c@y.test"), b"Subject: s\r\n\r\nhi\r\n")
        self.assertEqual(maildrop.decode(maildrop.encode(drop), 1000, 100), drop)
        null = Drop("", ("b@y.test",), b"x\r\n")
        self.assertEqual(maildrop.decode(maildrop.encode(null), 1000, 100), null)
        dsn = Drop("a@x.test", ("b@y.test",), b"x\r\n", notify=(), ret="HDRS", envid="e 1")
        self.assertEqual(maildrop.decode(maildrop.encode(dsn), 1000, 100), dsn)
        utf8 = Drop("jöran@x.test", ("zoë@y.test",), b"x\r\n", smtputf8=True)
        data = maildrop.encode(utf8)
        self.assertTrue(data.isascii())
        self.assertEqual(maildrop.decode(data, 1000, 100), utf8)

    def test_garbage(self) -> None:
        message = b"Subject: s\r\n\r\nhi\r\n"
        table = [
            (b"", "not a maildrop file"),
            (b"root:x:0:0:root:/root:/bin/bash\n", "not a maildrop file"),
            (maildrop.MAGIC + b"{" + b" " * (maildrop.MAX_META + 10), "envelope line is missing"),
            (maildrop.MAGIC + b"not json\n" + message, "not JSON"),
            (maildrop.MAGIC + b'{"sender": NaN}\n', "not JSON"),
            (maildrop.MAGIC + b"[]\n", "must hold sender, recipients and size"),
            (self.good(extra=1), "must hold sender, recipients and size (and smtputf8"),
            (self.good(notify=["NEVER"]), "notify must list some of"),
            (self.good(notify="SUCCESS"), "notify must list some of"),
            (self.good(ret="BODY"), "ret must be FULL or HDRS"),
            (self.good(envid="a\nb"), "envid must be 1 to 100"),
            (self.good(envid=""), "envid must be 1 to 100"),
            (self.good(smtputf8=1), "smtputf8 must be true or false"),
            (self.good(recipients=["zoë@y.test"]), "the recipient is not an ASCII string"),
            (self.good(smtputf8=True, recipients=["zo ë@y.test"]), "the recipient"),
            (self.good(sender="a b@c"), "the sender 'a b@c'"),
            (self.good(sender=5), "the sender is not an ASCII string"),
            (self.good(sender="ä@x.test"), "the sender is not an ASCII string"),
            (self.good(recipients=[]), "recipients must be a list of 1 to 1000"),
            (self.good(recipients="b@y.test"), "recipients must be a list"),
            (self.good(recipients=["b@y.test"] * 1001), "recipients must be a list of 1 to 1000"),
            (self.good(recipients=["<b@y.test>"]), "the recipient '<b@y.test>'"),
            (self.good(size=3), "says 3"),
            (self.good(size=True), "says True"),
            (self.good(size="17"), "says '17'"),
        ]
        for data, words in table:
            with self.subTest(words=words, data=data[:60]):
                with self.assertRaises(DropError) as caught:
                    maildrop.decode(data, 1000, 100)
                self.assertIn(words, str(caught.exception))

    def test_message_checks(self) -> None:
        table = [
            (b"x" * 2000 + b"\r\n", "more than the limit of 1000"),
            (b"a\nb\r\n", "bare CR or LF"),
            (b"a\rb\r\n", "bare CR or LF"),
            (b"a\0b\r\n", "NUL"),
            (b"x" * 150 + b"\r\n", "longer than 100 octets"),
            (b"no end", "does not end with CRLF"),
        ]
        for message, words in table:
            with self.subTest(words=words):
                data = maildrop.encode(Drop("a@x.test", ("b@y.test",), message))
                with self.assertRaises(DropError) as caught:
                    maildrop.decode(data, 1000, 100)
                self.assertIn(words, str(caught.exception))

    def test_names(self) -> None:
        name = maildrop.drop_name(NOW)
        self.assertTrue(maildrop.is_drop_name(name))
        self.assertNotEqual(name, maildrop.drop_name(NOW))
        self.assertTrue(name.startswith("6B11E3D3"))
        for bad in ("", ".x", "a/b", "a b", "x" * 65, "a\nb"):
            self.assertFalse(maildrop.is_drop_name(bad), bad)

    def test_write_drop(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        old = os.umask(0o077)
        try:
            name = sendmail.write_drop(directory, b"data", NOW)
        finally:
            os.umask(old)
        self.assertEqual(os.listdir(directory), [name])
        path = os.path.join(directory, name)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o640)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"data")

    def test_write_errors_become_exit_statuses(self) -> None:
        import errno
        table = [(errno.ENOENT, EX_UNAVAILABLE, "start the MTA once"),
                 (errno.EACCES, sendmail.EX_NOPERM, "mode 3733"),
                 (errno.ENOSPC, sendmail.EX_TEMPFAIL, "try again later"),
                 (errno.EROFS, sendmail.EX_CANTCREAT, "cannot write")]
        for number, status, words in table:
            with self.subTest(errno=errno.errorcode[number]):
                failed = sendmail.drop_failed(OSError(number, os.strerror(number)), "/s/maildrop")
                self.assertEqual(failed.status, status)
                self.assertIn(words, str(failed))


class LocalSMTPTests(unittest.TestCase):
    """
    sendmail -bs: a short SMTP dialogue, the message through the maildrop.
    """

    def setUp(self) -> None:
        self.sub = submission(self.mktemp())
        self.maildrop = maildrop.maildrop_path(self.sub.config.spool)
        os.makedirs(self.maildrop)

    def dialogue(self, lines: list[bytes]) -> bytes:
        out = io.BytesIO()
        sendmail.run_smtp(LocalSMTP(self.sub), io.BytesIO(b"".join(lines)), out)
        return out.getvalue()

    def drops(self) -> list[Drop]:
        out = []
        for name in sorted(os.listdir(self.maildrop)):
            with open(os.path.join(self.maildrop, name), "rb") as f:
                out.append(maildrop.decode(f.read(), 10 ** 6, 1000))
        return out

    def test_one_message(self) -> None:
        out = self.dialogue([b"EHLO client\r\n", b"MAIL FROM:<cron@example.test>\r\n",
                             b"RCPT TO:<bob@example.test>\r\n", b"RCPT TO:<postmaster>\r\n",
                             b"DATA\r\n", b"Subject: s\r\n", b"\r\n", b"..dot\r\n", b"hi\n",
                             b".\r\n", b"QUIT\r\n", b"NOOP\r\n"])
        codes = [line[:4] for line in out.split(b"\r\n") if line]
        self.assertEqual(codes, [b"220 ", b"250-", b"250-", b"250-", b"250-", b"250-", b"250 ",
                                 b"250 ", b"250 ", b"250 ", b"354 ", b"250 ", b"221 "])
        self.assertIn(b"250-SIZE 26214400", out)
        [drop] = self.drops()
        self.assertEqual(drop.sender, "cron@example.test")
        self.assertEqual(drop.recipients, ("bob@example.test", "postmaster@mx.example.test"))
        self.assertIn(b"\r\n\r\n.dot\r\nhi\r\n", drop.message)
        self.assertIn(b"From: Alice Liddell <alice@mx.example.test>\r\n", drop.message)
        self.assertIn(b"Message-ID: <", drop.message)
        self.assertIn(f"Ok: dropped as {os.listdir(self.maildrop)[0]}".encode(), out)

    def test_smtputf8(self) -> None:
        out = self.dialogue([b"EHLO c\r\n", "MAIL FROM:<jöran@example.test>\r\n".encode(),
                             "MAIL FROM:<jöran@example.test> SMTPUTF8\r\n".encode(),
                             "RCPT TO:<zoë@example.test>\r\n".encode(), b"DATA\r\n",
                             b"hi\r\n", b".\r\n"])
        self.assertIn(b"250-SMTPUTF8\r\n", out)
        codes = [line[:3] for line in out.split(b"\r\n")[7:] if line]
        self.assertEqual(codes, [b"501", b"250", b"250", b"354", b"250"])
        [drop] = self.drops()
        self.assertEqual((drop.sender, drop.recipients, drop.smtputf8),
                         ("jöran@example.test", ("zoë@example.test",), True))

    def test_sequence_errors(self) -> None:
        out = self.dialogue([b"RCPT TO:<a@b.test>\r\n", b"DATA\r\n", b"MAIL FROM:<a b>\r\n",
                             b"MAIL FROM:<>\r\n", b"DATA\r\n", b"MAIL FROM:<>\r\n",
                             b"BOGUS\r\n", b"VRFY x\r\n", b"RSET\r\n", b"x" * 3000 + b"\r\n"])
        codes = [line[:3] for line in out.split(b"\r\n") if line]
        self.assertEqual(codes, [b"220", b"503", b"503", b"501", b"250", b"554", b"503",
                                 b"502", b"252", b"250", b"500"])
        self.assertEqual(self.drops(), [])

    def test_too_big(self) -> None:
        self.sub = submission(self.mktemp(), limits={"message_size": 1024})
        self.maildrop = maildrop.maildrop_path(self.sub.config.spool)
        os.makedirs(self.maildrop)
        out = self.dialogue([b"HELO c\r\n", b"MAIL FROM:<> SIZE=5000\r\n", b"MAIL FROM:<>\r\n",
                             b"RCPT TO:<bob@example.test>\r\n", b"DATA\r\n"]
                            + [b"x" * 70 + b"\r\n"] * 20 + [b".\r\n", b"QUIT\r\n"])
        codes = [line[:3] for line in out.split(b"\r\n") if line]
        self.assertEqual(codes, [b"220", b"250", b"552", b"250", b"250", b"354", b"552", b"221"])
        self.assertEqual(self.drops(), [])

    def test_end_of_input_mid_message(self) -> None:
        self.dialogue([b"HELO c\r\n", b"MAIL FROM:<>\r\n", b"RCPT TO:<bob@example.test>\r\n",
                       b"DATA\r\n", b"half a message\r\n"])
        self.assertEqual(self.drops(), [])


class VerifyTests(unittest.TestCase):

    def test_table(self) -> None:
        config = make_config(self.mktemp())
        status, lines = sendmail.verify(config, "example.test", (
            "alice", "info@example.test", "sales@example.org", "x@remote.test", "nobody",
            "loop1", "a b"))
        self.assertEqual(status, EX_NOUSER)
        self.assertEqual(lines, [
            "alice@example.test: deliverable: local mailbox alice@example.test",
            "info@example.test: deliverable: local mailbox alice@example.test, "
            "local mailbox bob@example.test",
            "sales@example.org: deliverable: local mailbox bob@example.org",
            "x@remote.test: deliverable: relayed to remote.test",
            "nobody@example.test: undeliverable: no such user here",
            "loop1@example.test: undeliverable: alias loop in the configuration",
            "a b: undeliverable: bad address syntax",
        ])
        self.assertEqual(sendmail.verify(config, "example.test", ("bob",))[0], 0)


class MainTests(unittest.TestCase):
    """
    The command as a whole: one line on stderr and a sysexits status,
    never a traceback.
    """

    def run_main(self, argv: list[str], stdin: bytes = b"", env: dict | None = None):
        err, out = io.StringIO(), io.BytesIO()
        self.patch(sys, "stderr", err)
        self.patch(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        self.patch(sys, "stdout", io.TextIOWrapper(out))
        self.patch(os, "environ", env or {})
        status = sendmail.main(argv)
        return status, err.getvalue(), out.getvalue()

    def config(self, **sections) -> str:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        path = os.path.join(base, "mta.toml")
        with open(path, "w") as f:
            f.write('[server]\nhostname = "mx.example.test"\nspool = "spool"\n'
                    '[[listeners]]\nrole = "mx"\nendpoint = "tcp:2525"\n'
                    '[tls]\ncertificate = "missing.pem"\nkey = "missing.key"\n'
                    '[local]\ndomains = ["example.test", "mx.example.test"]\n'
                    'users = ["alice", "postmaster"]\n'
                    '[dns]\nnameservers = ["127.0.0.1:9"]\n')
        return path

    def test_missing_config(self) -> None:
        status, err, _ = self.run_main(["sendmail", "-C", "/nonexistent.toml", "x"])
        self.assertEqual(status, EX_CONFIG)
        self.assertEqual(err, "sendmail: /nonexistent.toml: no such file\n")

    def test_config_from_environment(self) -> None:
        status, err, _ = self.run_main(["sendmail", "x"],
                                       env={"TWISTED_MTA_CONFIG": "/from-env.toml"})
        self.assertEqual(err, "sendmail: /from-env.toml: no such file\n")
        self.assertEqual(sendmail.config_path(Options(), {}), "/etc/twisted-mta/mta.toml")

    def test_no_maildrop_yet(self) -> None:
        # The configuration names key files the user cannot read (here:
        # that do not exist): the command does not open them.
        path = self.config()
        status, err, _ = self.run_main(["sendmail", "-C", path, "alice"], stdin=b"hi\n")
        self.assertEqual(status, EX_UNAVAILABLE)
        self.assertIn("no maildrop", err)
        self.assertEqual(err.count("\n"), 1)

    def test_dropped(self) -> None:
        path = self.config()
        drops = os.path.join(os.path.dirname(path), "spool", "maildrop")
        os.makedirs(drops)
        status, err, _ = self.run_main(["sendmail", "-C", path, "-oi", "-odi", "-v",
                                        "-N", "success", "-R", "hdrs", "alice"],
                                       stdin=b"Subject: s\n\nhi\n.\nthere\n")
        self.assertEqual(status, 0, err)
        [name] = os.listdir(drops)
        self.assertEqual(err, f"sendmail: dropped as {name} for 1 recipient(s)\n")
        with open(os.path.join(drops, name), "rb") as f:
            drop = maildrop.decode(f.read(), 10 ** 6, 1000)
        self.assertEqual(drop.recipients, ("alice@mx.example.test",))
        self.assertEqual((drop.notify, drop.ret, drop.envid), (("SUCCESS",), "HDRS", None))
        self.assertTrue(drop.message.endswith(b"\r\n\r\nhi\r\n.\r\nthere\r\n"))

    def test_usage(self) -> None:
        status, err, _ = self.run_main(["sendmail", "-bd"])
        self.assertEqual((status, err), (EX_USAGE, "sendmail: -bd is not supported (only -bm, "
                                                   "-bs, -bv, -bp and -bi)\n"))

    def test_internal_error_is_one_line(self) -> None:
        def broken(*args):
            raise RuntimeError("boom")
        self.patch(sendmail, "run", broken)
        status, err, _ = self.run_main(["sendmail", "x"])
        self.assertEqual((status, err), (sendmail.EX_SOFTWARE,
                                         "sendmail: internal error: RuntimeError: boom\n"))

    def test_verify(self) -> None:
        status, err, out = self.run_main(["sendmail", "-C", self.config(), "-bv", "alice",
                                          "bob"])
        self.assertEqual(status, EX_NOUSER)
        self.assertEqual(out, b"alice@mx.example.test: deliverable: local mailbox "
                              b"alice@mx.example.test\nbob@mx.example.test: undeliverable: "
                              b"no such user here\n")

    def test_queue_list(self) -> None:
        path = self.config()
        listed = []
        status = sendmail.run(Options(mode="queue"), io.BytesIO(), io.BytesIO(),
                              {"TWISTED_MTA_CONFIG": path}, 0, lambda p: listed.append(p) or 0)
        self.assertEqual((status, listed), (0, [path]))
        with self.assertRaises(Failed) as caught:
            sendmail.run(Options(mode="queue", config=path), io.BytesIO(), io.BytesIO(), {}, 0)
        self.assertIn(f"use twisted-mta queue list -c {path}", str(caught.exception))

    def test_mailq_lists_the_queue(self) -> None:
        from twisted_mta import cli
        path = self.config()
        err, out = io.StringIO(), io.BytesIO()
        self.patch(sys, "stderr", err)
        self.patch(sys, "stdout", io.TextIOWrapper(out))
        self.assertEqual(cli.sendmail_main(["mailq", "-C", path]), 0, err.getvalue())
        sys.stdout.flush()
        self.assertIn(b"The queue is empty", out.getvalue())

    def test_cli_hands_over(self) -> None:
        from twisted_mta import cli
        self.patch(sendmail, "main", lambda argv, list_queue: ("called", argv))
        self.assertEqual(cli.main(["sendmail", "-t", "-i"]), ("called", ["sendmail", "-t", "-i"]))
        self.patch(sys, "argv", ["/usr/sbin/sendmail", "-bs"])
        self.assertEqual(cli.main(), ("called", ["sendmail", "-bs"]))
        self.patch(sys, "argv", ["/usr/bin/mailq"])
        self.assertEqual(cli.main(), ("called", ["mailq"]))
