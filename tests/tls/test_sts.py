"""
MTA-STS (RFC 8461): the TXT record and policy parsers and the MX matching
from tables, the fetcher's handling of responses and failures with fakes
(no socket: the real HTTPS fetches are in tests/interop/test_sts_fetch.py),
the cache's decisions from a table, and the cache itself (one fetch per
domain, refresh, failures, mode none, the files on disk) on a task.Clock.
"""

from __future__ import annotations

import json
import os

import attrs
import dns.exception
import dns.resolver
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed, ResponseNeverReceived
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from twisted_mta.tls.sts import (
    FETCH_ERROR, MAX_AGE_LIMIT, POLICY_INVALID, WEBPKI_INVALID, InvalidPolicy, InvalidRecord,
    Policy, StsDNSError, StsFetchError, StsPolicyInvalid, StsRecord, StsWebPKIError,
    examine_sts_records, find_sts_record, lookup_sts_txt, normalize_domain, parse_policy,
    parse_sts_record, policy_host, policy_url, txt_name,
)
from twisted_mta.tls.sts_cache import (
    FETCH, NONE, REFRESH, USE, CacheEntry, PolicyCache, Quiet, cache_directory, decide,
    entry_path,
)
from twisted_mta.tls.sts_fetch import PolicyFetcher, classify_fetch_failure, policy_body

T0 = 1_800_000_000.0
DAY = 86400


def make_policy(mode: str = "enforce", max_age: int = DAY,
                mx: tuple[str, ...] = ("mail.example.org",)) -> Policy:
    lines = ["version: STSv1", f"mode: {mode}"] + [f"mx: {m}" for m in mx] + \
        [f"max_age: {max_age}"]
    return parse_policy("\r\n".join(lines) + "\r\n")


# -- the TXT record ---------------------------------------------------------------------

VALID_RECORDS = [
    # text, id, extensions
    ("v=STSv1; id=20160831085700Z;", "20160831085700Z", ()),
    ("v=STSv1; id=20160831085700Z", "20160831085700Z", ()),
    ("v=STSv1;id=a", "a", ()),
    ("v=STSv1 ;\tid=a", "a", ()),  # *WSP around the semicolon
    ("v=STSv1; id=" + "A1" * 16, "A1" * 16, ()),  # 32 characters
    ("v=STSv1; id=abc; ext=value", "abc", (("ext", "value"),)),
    ("v=STSv1; x-ext.1_b=a:b/c<>?; id=abc;", "abc", (("x-ext.1_b", "a:b/c<>?"),)),
    ("v=STSv1; v=STSv1; id=1", "1", (("v", "STSv1"),)),  # a second v= is an extension
    ("v=STSv1; " + "n" * 32 + "=1; id=1", "1", (("n" * 32, "1"),)),
    # The last field may be followed by the delimiter, *WSP ";" *WSP.
    ("v=STSv1; id=abc; ", "abc", ()),
    ("v=STSv1; id=abc ;", "abc", ()),
    ("v=STSv1; id=abc\t;\t", "abc", ()),
    # A repeated field: the first counts, the others are ignored (RFC 8461 3.2).
    ("v=STSv1; id=a; id=b", "a", ()),
    ("v=STSv1; id=a; id=not-an-id", "a", ()),
]

INVALID_RECORDS = [
    # text, words in the reason
    ("v=STSv1", "no id field"),
    ("v=STSv1;", "no id field"),
    ("v=STSv1; ext=1", "no id field"),
    ("v=STSv1; ID=abc", "no id field"),  # names are case-sensitive: an extension
    ("v=STSv1; id=", "cannot parse"),
    ("v=STSv1; id=" + "a" * 33, "not 1 to 32 letters and digits"),
    ("v=STSv1; id=ab-cd", "not 1 to 32 letters and digits"),
    ("v=STSv1; id=abc ", "cannot parse ' '"),  # no whitespace after the last field
    ("v=STSv1;; id=abc", "cannot parse"),
    ("v=STSv1; id=abc;;", "cannot parse"),
    ("v=STSv1; id=abc; ;", "cannot parse"),
    ("v=STSv1; id=ab-c; id=abc", "not 1 to 32 letters and digits"),  # the first counts
    ("v=STSv1 id=abc", "cannot parse"),  # the semicolon is required
    ("v=STSv1; id=abc; e=x=y", "cannot parse"),  # '=' is not allowed in a value
    ("v=STSv1; id=abc; e=a b", "cannot parse"),
    ("v=STSv1; id=abc; _e=1", "cannot parse"),  # a name begins with a letter or digit
    ("v=STSv1; id=abc; " + "n" * 33 + "=1", "cannot parse"),
    ("v=STSv1; id=abc; e=caf\xe9", "cannot parse"),  # 8-bit
]


class RecordTests(SynchronousTestCase):
    def test_valid(self):
        """Every valid record of the table parses to its id and extensions."""
        for text, id_, extensions in VALID_RECORDS:
            with self.subTest(text=text):
                self.assertEqual(parse_sts_record(text), StsRecord(id_, extensions))
                self.assertEqual(find_sts_record([text]), StsRecord(id_, extensions))

    def test_invalid(self):
        """Every invalid record of the table is refused with its reason, and counts as no record."""
        for text, reason in INVALID_RECORDS:
            with self.subTest(text=text):
                with self.assertRaises(InvalidRecord) as caught:
                    parse_sts_record(text)
                self.assertIn(reason, str(caught.exception))
                record, why = examine_sts_records([text])
                self.assertIsNone(record)
                self.assertIn(reason, why)

    def test_exactly_one_record(self):
        """Records not beginning with v=STSv1 are ignored (v=STSv10 and V=STSv1 too); none, or two, is no record."""
        cases = [
            ([], None, "no v=STSv1 TXT record"),
            (["v=spf1 -all"], None, "no v=STSv1 TXT record"),
            (["v=spf1 -all", "v=STSv1; id=a"], "a", "TXT record id=a"),
            (["v=STSv10; id=b", "v=STSv1; id=a"], "a", "TXT record id=a"),
            (["V=STSv1; id=b", "v=STSv1; id=a"], "a", "TXT record id=a"),
            (["v=STSv1; id=a", "v=STSv1; id=b"], None, "2 v=STSv1 TXT records"),
            (["v=STSv1; id=a", "v=STSv1; id=a"], None, "2 v=STSv1 TXT records"),
            (["v=STSv1; id=a", "v=STSv1"], None, "2 v=STSv1 TXT records"),
        ]
        for records, id_, why in cases:
            with self.subTest(records=records):
                record, words = examine_sts_records(records)
                self.assertEqual(record.id if record else None, id_)
                self.assertIn(why, words)

    def test_character_strings_are_joined(self):
        """A record of several character-strings is read as their concatenation, without spaces; 8-bit octets make it invalid."""
        self.assertEqual(find_sts_record([(b"v=STSv1; i", b"d=abc")]), StsRecord("abc"))
        self.assertEqual(find_sts_record([b"v=STSv1; id=abc"]), StsRecord("abc"))
        self.assertIsNone(find_sts_record([(b"v=STSv1; id=abc; e=\xff",)]))


# -- the policy -----------------------------------------------------------------------------

VALID_POLICIES = [
    # body, mode, max_age, mx, extensions
    (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\n"
     b"mx: backupmx.example.com\r\nmax_age: 604800\r\n",
     "enforce", 604800, ("mail.example.com", "*.example.net", "backupmx.example.com"), ()),
    (b"version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400\n",
     "testing", 86400, ("mx.example.com",), ()),
    (b"version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400",  # no last LF
     "testing", 86400, ("mx.example.com",), ()),
    (b"version: STSv1\r\nmode: enforce\nmx: a.example\r\nmax_age: 1",  # CRLF and LF mixed
     "enforce", 1, ("a.example",), ()),
    (b"max_age: 0\nmx: A.Example.COM\nmode: enforce\nversion: STSv1\n",  # any order
     "enforce", 0, ("a.example.com",), ()),
    (b"version:STSv1\nmode:\t enforce \t\nmx:  a.example  \nmax_age: 0086400\t\n",
     "enforce", 86400, ("a.example",), ()),
    (b"version: STSv1\nmode: none\nmax_age: 86400\n", "none", 86400, (), ()),
    (b"version: STSv1\nmode: none\nmx: old.example\nmax_age: 1\n", "none", 1,
     ("old.example",), ()),
    (f"version: STSv1\nmode: enforce\nmx: a\nmax_age: {MAX_AGE_LIMIT}\n".encode(),
     "enforce", MAX_AGE_LIMIT, ("a",), ()),
    (b"version: STSv1\nmode: enforce\nmx: a.example\nmx: A.EXAMPLE\nmax_age: 5\n",
     "enforce", 5, ("a.example",), ()),  # the same pattern twice is kept once
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 5\nx-note: caf\u00e9 au lait\n"
     "Mode: none\n1st.ext-x_y: !~\n".encode(),
     "enforce", 5, ("a.example",),
     (("x-note", "caf\u00e9 au lait"), ("Mode", "none"), ("1st.ext-x_y", "!~"))),
    # A repeated version, mode or max_age: the first counts, the others are
    # ignored whatever they say (RFC 8461 3.2).
    (b"version: STSv1\nversion: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n",
     "enforce", 1, ("a",), ()),
    (b"version: STSv1\nmode: testing\nmode: enforce\nmx: a\nmode: bogus\nmax_age: 1\n",
     "testing", 1, ("a",), ()),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\nmax_age: forever\n",
     "enforce", 1, ("a",), ()),
]

INVALID_POLICIES = [
    # body, words in the reason
    (b"", "empty policy"),
    (b" \r\n", "empty policy"),
    (b"mode: enforce\nmx: a\nmax_age: 1\n", "no version field"),
    (b"version: STSv1\nmx: a\nmax_age: 1\n", "no mode field"),
    (b"version: STSv1\nmode: enforce\nmx: a\n", "no max_age field"),
    (b"version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx field (required in mode enforce)"),
    (b"version: STSv1\nmode: testing\nmax_age: 1\n", "no mx field (required in mode testing)"),
    (b"Version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\n", "no version field"),
    (b"version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "line 1: version must be STSv1"),
    (b"version: stsv1\nmode: enforce\nmx: a\nmax_age: 1\n", "line 1: version must be STSv1"),
    (b"version: STSv1\nmode: ENFORCE\nmx: a\nmax_age: 1\n", "line 2: mode must be enforce"),
    (b"version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "line 2: mode must be enforce"),
    (b"version: STSv1\nmode:\nmx: a\nmax_age: 1\n", "line 2: 'mode:' is not a field"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age must be a number"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1.5\n", "max_age must be a number"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1 day\n", "max_age must be a number"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 12345678901\n",
     "max_age must be a number of seconds (up to 10 digits)"),
    (f"version: STSv1\nmode: enforce\nmx: a\nmax_age: {MAX_AGE_LIMIT + 1}\n".encode(),
     f"max_age {MAX_AGE_LIMIT + 1} is more than {MAX_AGE_LIMIT}"),
    (b"version: STSv2\nversion: STSv1\nmode: enforce\nmx: a\nmax_age: 1\n",
     "line 1: version must be STSv1"),  # the first of a repeated field counts
    (b"version: STSv1\nmode: testing\nmode: enforce\nmax_age: 1\n",
     "no mx field (required in mode testing)"),
    (b"version: STSv1\n\nmode: enforce\nmx: a\nmax_age: 1\n", "line 2 is empty"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\n\n", "line 5 is empty"),
    (b"version: STSv1\r\n\r\nmode: enforce\r\nmx: a\r\nmax_age: 1\r\n", "line 2 is empty"),
    (b"version: STSv1\rmode: enforce\nmx: a\nmax_age: 1\n", "line 1: a CR not followed by LF"),
    (b"version: STSv1\nmode enforce\nmx: a\nmax_age: 1\n", "line 2: 'mode enforce' is not"),
    (b"version: STSv1\nmode : enforce\nmx: a\nmax_age: 1\n", "line 2: 'mode : enforce' is not"),
    (b"version: STSv1\n mode: enforce\nmx: a\nmax_age: 1\n", "line 2: ' mode: enforce' is not"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\nx-e: a\tb\n", "line 5"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\nx-e: a\x00b\n", "line 5"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\n_x: 1\n", "line 5"),
    (b"version: STSv1\nmode: enforce\nmx: mail.*.example\nmax_age: 1\n",
     "line 3: mx 'mail.*.example': a wildcard is allowed only as the whole left-most label"),
    (b"version: STSv1\nmode: enforce\nmx: *\nmax_age: 1\n", "a wildcard is allowed only"),
    (b"version: STSv1\nmode: enforce\nmx: *mail.example\nmax_age: 1\n",
     "a wildcard is allowed only"),
    (b"version: STSv1\nmode: enforce\nmx: *.*.example\nmax_age: 1\n",
     "a wildcard is allowed only"),
    (b"version: STSv1\nmode: enforce\nmx: *.\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: mail.example.\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: mail..example\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: mail_1.example\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: -mail.example\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: mail.example com\nmax_age: 1\n", "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: " + b"a" * 64 + b".example\nmax_age: 1\n",
     "is not a host name"),
    ("version: STSv1\nmode: enforce\nmx: m\u00e4il.example\nmax_age: 1\n".encode(),
     "is not a host name"),
    (b"version: STSv1\nmode: enforce\nmx: a\nmax_age: 1\nx: caf\xe9\n", "not UTF-8 text"),
    (b"\xef\xbb\xbfversion: STSv1\nmode: enforce\nmx: a\nmax_age: 1\n", "line 1"),  # a BOM
]


class PolicyTests(SynchronousTestCase):
    def test_valid(self):
        """Every valid policy of the table parses to its mode, max_age, mx patterns and extensions; the text is kept."""
        for body, mode, max_age, mx, extensions in VALID_POLICIES:
            with self.subTest(body=body):
                policy = parse_policy(body)
                self.assertEqual((policy.mode, policy.max_age, policy.mx, policy.extensions),
                                 (mode, max_age, mx, extensions))
                self.assertEqual(policy.text, body.decode("utf-8"))
                self.assertEqual(parse_policy(body.decode("utf-8")), policy)

    def test_invalid(self):
        """Every invalid policy of the table is refused with its reason."""
        for body, reason in INVALID_POLICIES:
            with self.subTest(body=body):
                with self.assertRaises(InvalidPolicy) as caught:
                    parse_policy(body)
                self.assertIn(reason, str(caught.exception))


MATCHES = [
    # patterns, MX host, the pattern it matches (None: no match)
    (("mail.example.com",), "mail.example.com", "mail.example.com"),
    (("mail.example.com",), "MAIL.Example.com.", "mail.example.com"),
    (("mail.example.com",), "mail2.example.com", None),
    (("mail.example.com",), "example.com", None),
    (("mail.example.com",), "x.mail.example.com", None),
    (("*.example.com",), "mail.example.com", "*.example.com"),
    (("*.example.com",), "MX1.EXAMPLE.COM.", "*.example.com"),
    (("*.example.com",), "example.com", None),  # exactly one label
    (("*.example.com",), "a.b.example.com", None),
    (("*.example.com",), ".example.com", None),
    (("*.example.com",), "mail.example.com.evil.test", None),
    (("*.example.com",), "mailexample.com", None),
    (("*.example.com", "backup.example.net"), "backup.example.net", "backup.example.net"),
    (("a.example", "*.example"), "a.example", "a.example"),  # the first that matches
    (("mail.example.com",), "", None),
]


class MatchTests(SynchronousTestCase):
    def test_matches(self):
        """MX hosts against mx patterns (RFC 8461 4.1): the left-most wildcard stands for exactly one label; case and a final dot do not count."""
        for patterns, host, expected in MATCHES:
            with self.subTest(patterns=patterns, host=host):
                policy = make_policy(mx=patterns)
                self.assertEqual(policy.matching_pattern(host), expected)
                self.assertEqual(policy.matches(host), expected is not None)


class NameTests(SynchronousTestCase):
    def test_names(self):
        """The TXT name, the policy host and URL of a domain; the domain normalized (case, final dot, IDNA)."""
        self.assertEqual(txt_name("Example.ORG."), "_mta-sts.example.org")
        self.assertEqual(policy_host("example.org"), "mta-sts.example.org")
        self.assertEqual(policy_url("example.org"),
                         "https://mta-sts.example.org/.well-known/mta-sts.txt")
        self.assertEqual(normalize_domain("b\u00fccher.example"), "xn--bcher-kva.example")

    def test_not_domains(self):
        """Names that are not host names are refused (nothing can be fetched or cached under them)."""
        for name in ("", ".", "a..b", "a/b", "../x", "a b", "_x.example", "-a.example",
                     "a" * 64 + ".example", "x." * 127 + "example"):
            with self.subTest(name=name):
                self.assertRaises(ValueError, normalize_domain, name)


class FakeRdata:
    def __init__(self, *strings: bytes) -> None:
        self.strings = strings


class FakeResolver:
    def __init__(self, answer=None, error=None) -> None:
        self.answer, self.error, self.asked = answer, error, []

    def resolve(self, name, rdtype):
        self.asked.append((name, rdtype))
        if self.error is not None:
            raise self.error
        return self.answer


class LookupTests(SynchronousTestCase):
    def test_records(self):
        """The TXT records at _mta-sts.<domain>, each with its strings joined."""
        resolver = FakeResolver([FakeRdata(b"v=STSv1; ", b"id=1"), FakeRdata(b"v=spf1")])
        self.assertEqual(lookup_sts_txt(resolver, "Example.org"), [b"v=STSv1; id=1", b"v=spf1"])
        self.assertEqual(resolver.asked, [("_mta-sts.example.org", "TXT")])

    def test_none_and_failures(self):
        """NXDOMAIN and no TXT are no records; SERVFAIL and timeouts are StsDNSError."""
        self.assertEqual(lookup_sts_txt(FakeResolver(error=dns.resolver.NXDOMAIN()), "a.b"), [])
        self.assertEqual(lookup_sts_txt(FakeResolver(error=dns.resolver.NoAnswer()), "a.b"), [])
        for e in (dns.resolver.NoNameservers(), dns.exception.Timeout()):
            with self.subTest(error=e):
                with self.assertRaises(StsDNSError) as caught:
                    lookup_sts_txt(FakeResolver(error=e), "a.b")
                self.assertIn("_mta-sts.a.b", str(caught.exception))


# -- the fetcher, without sockets ------------------------------------------------------------

class FakeBodyTransport:
    def __init__(self) -> None:
        self.stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeResponse:
    def __init__(self, code=200, headers=None, length=UNKNOWN_LENGTH, phrase=b"OK") -> None:
        self.code, self.phrase, self.length = code, phrase, length
        self.headers = Headers({k: [v] for k, v in (headers if headers is not None else
                                                    {b"content-type": b"text/plain"}).items()})
        self.transport = FakeBodyTransport()
        self.protocol = None

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, *chunks: bytes, end: Failure | None = None) -> None:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
        self.protocol.connectionLost(end or Failure(ResponseDone()))


URL = "https://mta-sts.example.org/.well-known/mta-sts.txt"


class ResponseTests(SynchronousTestCase):
    def body(self, response, max_size=100):
        return policy_body(response, "example.org", URL, max_size)

    def refused(self, response, words: str) -> StsFetchError:
        e = self.failureResultOf(self.body(response), StsFetchError).value
        self.assertIn(words, e.detail)
        self.assertEqual(e.result_type, FETCH_ERROR)
        self.assertTrue(response.transport.stopped, "the connection was not closed")
        return e

    def test_the_body(self):
        """HTTP 200, text/plain (with or without parameters, any case): the body, in pieces up to the limit; a body ended by the connection (no length) counts."""
        for content_type in (b"text/plain", b"text/plain; charset=utf-8",
                             b"Text/Plain ;format=flowed", b"text/plain;"):
            with self.subTest(content_type=content_type):
                response = FakeResponse(headers={b"content-type": content_type})
                d = self.body(response)
                response.send(b"a" * 60, b"b" * 40)
                self.assertEqual(self.successResultOf(d), b"a" * 60 + b"b" * 40)
        response = FakeResponse()
        d = self.body(response)
        response.send(b"abc", end=Failure(PotentialDataLoss()))
        self.assertEqual(self.successResultOf(d), b"abc")

    def test_status(self):
        """Anything but 200 is a fetch error naming the status; a redirect names where it pointed and is not followed."""
        self.refused(FakeResponse(404, phrase=b"Not Found"), "HTTP 404 Not Found")
        self.refused(FakeResponse(204, phrase=b"No Content"), "HTTP 204 No Content")
        self.refused(FakeResponse(500, phrase=b""), "HTTP 500")
        for code in (301, 302, 303, 307, 308):
            with self.subTest(code=code):
                e = self.refused(FakeResponse(code, phrase=b"Moved", headers={
                    b"location": b"https://elsewhere.example/p.txt"}),
                    "a redirect to https://elsewhere.example/p.txt, which MTA-STS does not follow")
                self.assertIn(f"HTTP {code} Moved", e.detail)

    def test_media_type_and_coding(self):
        """A missing or other media type, or a content coding, is a fetch error."""
        self.refused(FakeResponse(headers={}), "no Content-Type")
        self.refused(FakeResponse(headers={b"content-type": b"text/html"}), "not text/plain")
        self.refused(FakeResponse(headers={b"content-type": b"text/plainx"}), "not text/plain")
        self.refused(FakeResponse(headers={b"content-type": b"application/octet-stream"}),
                     "not text/plain")
        self.refused(FakeResponse(headers={b"content-type": b"text/plain",
                                           b"content-encoding": b"gzip"}),
                     "Content-Encoding 'gzip'")

    def test_size(self):
        """A Content-Length over the limit is refused before the body; a body that grows past it is aborted at once; exactly the limit is fine."""
        self.refused(FakeResponse(length=101), "101 octets long, more than the limit of 100")
        response = FakeResponse()
        d = self.body(response)
        response.protocol.dataReceived(b"x" * 100)
        self.assertNoResult(d)
        response.protocol.dataReceived(b"x")
        e = self.failureResultOf(d, StsFetchError).value
        self.assertIn("larger than the limit of 100 octets", e.detail)
        self.assertTrue(response.transport.stopped)
        response.protocol.dataReceived(b"more")  # late data and the end change nothing
        response.protocol.connectionLost(Failure(ResponseDone()))
        response = FakeResponse(length=100)
        d = self.body(response)
        response.send(b"y" * 100)
        self.assertEqual(len(self.successResultOf(d)), 100)

    def test_cut_short_and_cancelled(self):
        """A body cut short fails with the reason; cancelling (the deadline) aborts the connection."""
        response = FakeResponse()
        d = self.body(response)
        response.send(b"abc", end=Failure(ResponseFailed([Failure(error.ConnectionLost())])))
        self.failureResultOf(d, ResponseFailed)
        response = FakeResponse()
        d = self.body(response)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(response.transport.stopped)


def failure(e: BaseException) -> Failure:
    return Failure(e)


class ClassifyTests(SynchronousTestCase):
    def test_table(self):
        """Failures of a request to their error class, TLS-RPT result type and words, looking inside Twisted's wrapper exceptions."""
        verify_failed = SSL.Error([("SSL routines", "", "certificate verify failed")])
        cases = [
            (ResponseNeverReceived([failure(VerificationError(errors=[]))]), StsWebPKIError,
             WEBPKI_INVALID, "not valid for mta-sts.example.org (a name mismatch)"),
            (ResponseNeverReceived([failure(verify_failed)]), StsWebPKIError, WEBPKI_INVALID,
             "could not be verified"),
            (verify_failed, StsWebPKIError, WEBPKI_INVALID, "could not be verified"),
            (ResponseNeverReceived([failure(SSL.Error([("SSL routines", "",
                                                        "tlsv1 alert protocol version")]))]),
             StsFetchError, FETCH_ERROR, "TLS failed: tlsv1 alert protocol version"),
            (error.ConnectionRefusedError(), StsFetchError, FETCH_ERROR, "connection failed"),
            (error.TCPTimedOutError(), StsFetchError, FETCH_ERROR, "connection failed"),
            (error.DNSLookupError("nope"), StsFetchError, FETCH_ERROR,
             "no address for mta-sts.example.org"),
            (ResponseFailed([failure(error.ConnectionLost("gone"))]), StsFetchError,
             FETCH_ERROR, "gone"),
            (ValueError("odd"), StsFetchError, FETCH_ERROR, "odd"),
        ]
        for exc, kind, result_type, words in cases:
            with self.subTest(exc=exc):
                e = classify_fetch_failure(Failure(exc), "example.org", URL)
                self.assertIsInstance(e, kind)
                self.assertEqual(e.result_type, result_type)
                self.assertIn(words, e.detail)
                self.assertEqual(e.url, URL)

    def test_words(self):
        """An error reads as a sentence naming the domain and the URL; errors compare by value."""
        e = StsPolicyInvalid("example.org", "no mode field")
        self.assertEqual(str(e), "the MTA-STS policy of example.org is not valid "
                                 f"({URL}): no mode field")
        self.assertEqual(e.result_type, POLICY_INVALID)
        self.assertEqual(e, StsPolicyInvalid("example.org", "no mode field"))
        self.assertNotEqual(e, StsFetchError("example.org", "no mode field"))


class FetcherTests(SynchronousTestCase):
    """
    The fetcher up to the connection, on a MemoryReactorClock: where it
    connects, what it does when the resolver has nothing, the deadline.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.asked: list[str] = []

    def fetcher(self, addresses, **kw) -> PolicyFetcher:
        def resolve(host):
            self.asked.append(host)
            if isinstance(addresses, Exception):
                raise addresses
            return addresses
        return PolicyFetcher(self.reactor, resolve=resolve, port=8443, **kw)

    def test_connects_where_the_resolver_says_and_times_out(self):
        """The connection goes to the resolver's address on the given port; at the deadline the attempt is stopped and the fetch fails with sts-policy-fetch-error, naming the server."""
        d = self.fetcher(["127.0.0.9"], timeout=7).fetch("Example.ORG")
        self.assertEqual(self.asked, ["mta-sts.example.org"])
        self.assertEqual([c[:2] for c in self.reactor.tcpClients], [("127.0.0.9", 8443)])
        self.assertNoResult(d)
        self.reactor.advance(7)
        e = self.failureResultOf(d, StsFetchError).value
        self.assertIn("no complete answer within 7 seconds at "
                      "mta-sts.example.org[127.0.0.9]:8443", e.detail)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_next_address(self):
        """A refused connection moves on to the next address (IPv6 too); the last failure is the answer."""
        d = self.fetcher(["127.0.0.9", "::1"]).fetch("example.org")
        factory = self.reactor.tcpClients[0][2]
        factory.clientConnectionFailed(self.reactor.connectors[0],
                                       Failure(error.ConnectionRefusedError()))
        self.assertEqual([c[:2] for c in self.reactor.tcpClients],
                         [("127.0.0.9", 8443), ("::1", 8443)])
        factory = self.reactor.tcpClients[1][2]
        factory.clientConnectionFailed(self.reactor.connectors[1],
                                       Failure(error.ConnectionRefusedError()))
        e = self.failureResultOf(d, StsFetchError).value
        self.assertIn("connection failed at mta-sts.example.org[127.0.0.9]:8443, "
                      "mta-sts.example.org[::1]:8443", e.detail)

    def test_no_address(self):
        """No address, or a resolver that fails: sts-policy-fetch-error, no connection."""
        for addresses in ([], error.DNSLookupError("SERVFAIL")):
            with self.subTest(addresses=addresses):
                d = self.fetcher(addresses).fetch("example.org")
                e = self.failureResultOf(d, StsFetchError).value
                self.assertIn("no address for mta-sts.example.org", e.detail)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_not_a_domain(self):
        """A name that is not a domain is a fetch error at once, with no lookup."""
        e = self.failureResultOf(self.fetcher([]).fetch("a/b"), StsFetchError).value
        self.assertIn("not a valid domain name", e.detail)
        self.assertEqual(self.asked, [])


# -- the cache's decisions -----------------------------------------------------------------

def entry(max_age: int = DAY, policy_id: str = "a", fetched_at: float = T0,
          mode: str = "enforce") -> CacheEntry:
    return CacheEntry("example.org", make_policy(mode, max_age), policy_id, fetched_at)


E1 = entry()  # a day
E7 = entry(max_age=7 * DAY)
E0 = entry(max_age=0)

DECISIONS = [
    # cache entry, TXT id, seconds after T0, quiet, action, the entry in the decision
    (None, None, 0, None, NONE, None),
    (None, "a", 0, None, FETCH, None),
    (None, "a", 0, Quiet("a", T0 + 300, "failed"), NONE, None),
    (None, "a", 0, Quiet("b", T0 + 300, "failed"), FETCH, None),  # quiet for another id
    (None, "a", 300, Quiet("a", T0 + 300, "failed"), FETCH, None),  # quiet is over
    (E1, "a", 10, None, USE, E1),
    (E1, None, 10, None, USE, E1),  # a cached policy outlives its TXT record
    (E1, "b", 10, None, FETCH, E1),  # a new id: fetch, the cached one to fall back on
    (E1, "b", 10, Quiet("b", T0 + 300, "failed"), USE, E1),
    (E1, "b", 10, Quiet("a", T0 + 300, "failed"), FETCH, E1),
    (E1, "a", DAY / 2 - 1, None, USE, E1),
    (E1, "a", DAY / 2, None, REFRESH, E1),  # half of max_age
    (E1, None, DAY / 2, None, REFRESH, E1),
    (E1, "a", DAY / 2, Quiet("a", T0 + DAY, "failed"), USE, E1),  # a refresh just failed
    (E1, "a", DAY - 1, None, REFRESH, E1),
    (E1, "a", DAY, None, FETCH, None),  # expired
    (E1, None, DAY, None, NONE, None),
    (E1, "a", DAY, Quiet("a", T0 + DAY + 300, "failed"), NONE, None),
    (E7, "a", DAY - 1, None, USE, E7),
    (E7, "a", DAY, None, REFRESH, E7),  # refresh_interval: a day
    (E7, "a", 7 * DAY - 1, None, REFRESH, E7),
    (E7, "b", 7 * DAY, None, FETCH, None),
    (E0, "a", 59, None, USE, E0),  # max_age 0 is in force for min_lifetime
    (E0, "a", 60, None, FETCH, None),
]


class DecisionTests(SynchronousTestCase):
    def test_table(self):
        """Every row: what to do given the cache entry, the TXT id, the time (a task.Clock) and a recent failed fetch."""
        for row, (cached, txt_id, after, quiet, action, used) in enumerate(DECISIONS):
            with self.subTest(row=row, txt_id=txt_id, after=after, action=action):
                clock = Clock()
                clock.advance(T0 + after)
                decision = decide(cached, txt_id, clock.seconds(), quiet=quiet,
                                  refresh_interval=DAY, min_lifetime=60)
                self.assertEqual((decision.action, decision.entry), (action, used),
                                 decision.why)
                self.assertTrue(decision.why)

    def test_words(self):
        """The decision says why."""
        self.assertIn("the TXT id changed from a to b", decide(E1, "b", T0 + 1).why)
        self.assertIn("has expired", decide(E1, "a", T0 + DAY).why)
        self.assertIn("no MTA-STS TXT record", decide(None, None, T0).why)


# -- the cache -------------------------------------------------------------------------------

class FakeFetcher:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.pending: dict[str, list[defer.Deferred]] = {}

    def fetch(self, domain: str) -> defer.Deferred:
        self.calls.append(domain)
        d: defer.Deferred = defer.Deferred()
        self.pending.setdefault(domain, []).append(d)
        return d

    def answer(self, domain: str, result) -> None:
        d = self.pending[domain].pop(0)
        if isinstance(result, BaseException):
            d.errback(result)
        else:
            d.callback(result)


A = StsRecord("a")
B = StsRecord("b")
ENFORCE = make_policy()


class CacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(T0)
        self.spool = self.mktemp()
        self.directory = cache_directory(self.spool)
        self.fetcher = FakeFetcher()

    def cache(self, **kw) -> PolicyCache:
        cache = PolicyCache(self.directory, self.fetcher.fetch, self.clock, defer.maybeDeferred,
                            **kw)
        cache.load()
        return cache

    def lookup(self, cache, domain="example.org", record=A):
        return self.successResultOf(cache.get(domain, record))

    def test_first_fetch_waits_then_saved_and_survives_a_restart(self):
        """Without a cached policy the caller waits for the fetch; the policy is written to <spool>/tls/sts/<domain>.json (no temporary file left) and a restarted cache uses it without fetching."""
        cache = self.cache()
        d = cache.get("Example.ORG.", A)
        self.assertNoResult(d)
        self.assertEqual(self.fetcher.calls, ["example.org"])
        self.assertTrue(cache.fetching("example.org"))
        self.fetcher.answer("example.org", ENFORCE)
        found = self.successResultOf(d)
        self.assertEqual((found.domain, found.source, found.policy, found.record, found.error),
                         ("example.org", "fetched", ENFORCE, A, None))
        path = os.path.join(self.spool, "tls", "sts", "example.org.json")
        self.assertEqual(os.listdir(os.path.dirname(path)), ["example.org.json"])
        with open(path) as f:
            data = json.load(f)
        self.assertEqual((data["id"], data["fetched_at"], data["policy"]),
                         ("a", T0, ENFORCE.text))
        again = self.lookup(self.cache())
        self.assertEqual((again.source, again.policy, again.entry.fetched_at),
                         ("cache", ENFORCE, T0))
        self.assertEqual(self.fetcher.calls, ["example.org"])

    def test_one_fetch_per_domain_and_other_domains_do_not_wait(self):
        """Callers for a domain being fetched share its fetch; another domain's fetch runs beside it and its caller does not wait for the first."""
        cache = self.cache()
        first, second = cache.get("example.org", A), cache.get("example.org", A)
        other = cache.get("other.example", A)
        self.assertEqual(self.fetcher.calls, ["example.org", "other.example"])
        self.fetcher.answer("other.example", make_policy("testing", mx=("mx.other.example",)))
        self.assertEqual(self.successResultOf(other).policy.mode, "testing")
        self.assertNoResult(first)
        self.fetcher.answer("example.org", ENFORCE)
        self.assertEqual(self.successResultOf(first).policy, ENFORCE)
        self.assertEqual(self.successResultOf(second).policy, ENFORCE)

    def test_cancelling_one_caller(self):
        """A caller that gives up does not stop the fetch the others wait for."""
        cache = self.cache()
        first, second = cache.get("example.org", A), cache.get("example.org", A)
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.fetcher.answer("example.org", ENFORCE)
        self.assertEqual(self.successResultOf(second).source, "fetched")

    def test_failed_fetches_told_once_each(self):
        """
        Every failed fetch, and only those, tells the observers one
        tls.result for TLS reporting (RFC 8460 4.3.2.1), however many
        callers waited for it: under the cached policy when a refresh
        failed (its policy string and mx patterns), else under sts alone.
        """
        told = []
        cache = self.cache(retry_interval=300, observers=[lambda n, e: told.append((n, e))])
        first, second = cache.get("example.org", A), cache.get("example.org", A)
        self.fetcher.answer("example.org", StsFetchError("example.org", "connection refused"))
        self.successResultOf(first), self.successResultOf(second)
        self.assertEqual(told, [("tls.result", {
            "time": T0, "domain": "example.org", "policy-type": "sts",
            "result": "sts-policy-fetch-error",
            "failure-reason-code": "connection refused "
                                   "(https://mta-sts.example.org/.well-known/mta-sts.txt)"})])
        self.clock.advance(300)
        d = cache.get("example.org", A)
        self.fetcher.answer("example.org", ENFORCE)
        self.successResultOf(d)
        self.assertEqual(len(told), 1)  # a fetch that worked tells nothing
        self.clock.advance(10)
        d = cache.get("example.org", B)  # a new id: fetched again, and this one fails
        self.fetcher.answer("example.org", StsWebPKIError("example.org", "expired"))
        self.successResultOf(d)
        name, event = told[1]
        self.assertEqual((event["result"], event["policy-string"], event["mx-host"]),
                         (WEBPKI_INVALID, ["version: STSv1", "mode: enforce",
                                           *(f"mx: {m}" for m in ENFORCE.mx),
                                           f"max_age: {ENFORCE.max_age}"], list(ENFORCE.mx)))

    def test_fetch_that_ends_at_once(self):
        """A fetch that has its answer at once (a synchronous fetcher) still answers its caller."""
        cache = PolicyCache(self.directory, lambda d: defer.succeed(ENFORCE), self.clock,
                            defer.maybeDeferred)
        self.assertEqual(self.successResultOf(cache.get("example.org", A)).source, "fetched")

    def test_id_change_refetches_and_a_failure_keeps_the_cached_policy(self):
        """A new TXT id is fetched (the caller waits); when that fails the cached policy stays in force, the failure reported with its result type, and the new id is not tried again before retry_interval."""
        cache = self.cache(retry_interval=300)
        d = cache.get("example.org", A)
        self.fetcher.answer("example.org", ENFORCE)
        self.clock.advance(10)
        d = cache.get("example.org", B)
        self.assertNoResult(d)
        self.fetcher.answer("example.org", StsWebPKIError("example.org", "expired"))
        found = self.successResultOf(d)
        self.assertEqual((found.source, found.policy, found.entry.policy_id),
                         ("cache", ENFORCE, "a"))
        self.assertEqual(found.error.result_type, WEBPKI_INVALID)
        self.assertIn("the fetch failed, the cached policy (id a) stays in force", found.why)
        self.clock.advance(299)
        self.assertEqual(self.lookup(cache, record=B).source, "cache")
        self.assertEqual(len(self.fetcher.calls), 2)
        self.clock.advance(1)
        d = cache.get("example.org", B)
        self.assertEqual(len(self.fetcher.calls), 3)
        new = make_policy(mx=("mail2.example.org",))
        self.fetcher.answer("example.org", new)
        found = self.successResultOf(d)
        self.assertEqual((found.source, found.policy, found.entry.policy_id),
                         ("fetched", new, "b"))
        self.assertEqual(self.cache().entry("example.org").policy_id, "b")

    def test_refresh_ahead_of_expiry(self):
        """Half-way through max_age the cached policy is answered at once while a fetch runs in the background (one, however many ask); its success starts the policy's time again."""
        cache = self.cache()
        cache.get("example.org", A)
        self.fetcher.answer("example.org", ENFORCE)
        self.clock.advance(DAY / 2)
        found = self.lookup(cache)
        self.assertEqual(found.source, "cache")
        self.assertEqual(self.lookup(cache).source, "cache")
        self.assertEqual(len(self.fetcher.calls), 2)
        self.fetcher.answer("example.org", ENFORCE)
        self.assertEqual(cache.entry("example.org").fetched_at, T0 + DAY / 2)
        self.clock.advance(DAY / 2 - 1)
        self.assertEqual(self.lookup(cache).source, "cache")
        self.assertEqual(len(self.fetcher.calls), 2)
        self.clock.advance(2)  # past the first fetch's expiry: still in force, due again
        self.assertEqual(self.lookup(cache).source, "cache")
        self.assertEqual(len(self.fetcher.calls), 3)

    def test_failed_refresh_keeps_the_policy_until_it_expires(self):
        """A background refresh that fails leaves the policy in force, with no new fetch per message before retry_interval; once the policy has expired, a caller waits for a new fetch, and without one it has no policy."""
        cache = self.cache(retry_interval=3600)
        cache.get("example.org", A)
        self.fetcher.answer("example.org", ENFORCE)
        self.clock.advance(DAY / 2)
        self.lookup(cache)
        self.fetcher.answer("example.org", StsFetchError("example.org", "HTTP 503"))
        self.clock.advance(3599)
        self.assertEqual(self.lookup(cache).source, "cache")
        self.assertEqual(len(self.fetcher.calls), 2)
        self.clock.advance(1)
        self.assertEqual(self.lookup(cache).source, "cache")  # and a second try
        self.assertEqual(len(self.fetcher.calls), 3)
        self.fetcher.answer("example.org", StsFetchError("example.org", "HTTP 503"))
        self.clock.advance(DAY / 2 - 3600)
        d = cache.get("example.org", A)
        self.assertNoResult(d)
        self.fetcher.answer("example.org", StsFetchError("example.org", "HTTP 503"))
        found = self.successResultOf(d)
        self.assertEqual((found.policy, found.source, found.error.detail),
                         (None, "none", "HTTP 503"))

    def test_mode_none_forgets_the_policy(self):
        """A policy in mode none removes the cached one (memory and file) and the answer is no policy; the same id is not fetched again for its max_age."""
        cache = self.cache()
        cache.get("example.org", A)
        self.fetcher.answer("example.org", ENFORCE)
        path = entry_path(self.directory, "example.org")
        self.assertTrue(os.path.exists(path))
        d = cache.get("example.org", B)
        self.fetcher.answer("example.org", make_policy("none", max_age=3600, mx=()))
        found = self.successResultOf(d)
        self.assertEqual((found.policy, found.source, found.mode), (None, "none", "none"))
        self.assertIsNone(cache.entry("example.org"))
        self.assertFalse(os.path.exists(path))
        self.clock.advance(3599)
        self.assertEqual(self.lookup(cache, record=B).source, "none")
        self.assertEqual(len(self.fetcher.calls), 2)
        self.clock.advance(1)
        cache.get("example.org", B)
        self.assertEqual(len(self.fetcher.calls), 3)

    def test_expiry(self):
        """After max_age from the fetch the policy is gone: without a TXT record no policy and no fetch; with one, a new fetch."""
        cache = self.cache()
        cache.get("example.org", A)
        self.fetcher.answer("example.org", make_policy(max_age=3600))
        self.clock.advance(1799)  # not yet due for a refresh (half of max_age)
        self.assertEqual(self.lookup(cache, record=None).source, "cache")
        self.clock.advance(1801)
        found = self.lookup(cache, record=None)
        self.assertEqual((found.policy, found.source), (None, "none"))
        self.assertIn("has expired", found.why)
        self.assertEqual(len(self.fetcher.calls), 1)
        self.assertIsNone(cache.entry("example.org"))  # dropped, its file too
        self.assertEqual(os.listdir(self.directory), [])
        self.assertNoResult(cache.get("example.org", A))
        self.assertEqual(len(self.fetcher.calls), 2)

    def test_fetch_failure_without_a_cached_policy(self):
        """A failed first fetch: no policy (delivery goes on as without MTA-STS), the error with its result type; no new fetch before retry_interval."""
        cache = self.cache(retry_interval=300)
        d = cache.get("example.org", A)
        self.fetcher.answer("example.org", StsPolicyInvalid("example.org", "no mode field"))
        found = self.successResultOf(d)
        self.assertEqual((found.policy, found.error.result_type), (None, POLICY_INVALID))
        self.assertIn("the fetch failed and no policy is cached", found.why)
        again = self.lookup(cache)
        self.assertEqual(again.source, "none")
        self.assertIn("the last fetch failed (sts-policy-invalid: no mode field)", again.why)
        self.assertEqual(len(self.fetcher.calls), 1)

    def test_a_fetcher_that_crashes(self):
        """A fetcher bug is logged and answered as a fetch error, not raised to the caller."""
        cache = PolicyCache(self.directory, lambda d: 1 / 0, self.clock, defer.maybeDeferred)
        found = self.successResultOf(cache.get("example.org", A))
        self.assertEqual(found.error.result_type, FETCH_ERROR)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_id_change_while_fetching(self):
        """A new id seen while a fetch runs joins that fetch, and the policy is kept under the newest id."""
        cache = self.cache()
        first, second = cache.get("example.org", A), cache.get("example.org", B)
        self.fetcher.answer("example.org", ENFORCE)
        self.assertEqual(self.successResultOf(second).entry.policy_id, "b")
        self.assertEqual(self.successResultOf(first).policy, ENFORCE)
        self.assertEqual(len(self.fetcher.calls), 1)

    def test_not_a_domain(self):
        """A name that is not a domain has no policy and is never fetched."""
        found = self.lookup(self.cache(), domain="a/../b")
        self.assertEqual(found.source, "none")
        self.assertEqual(self.fetcher.calls, [])

    def test_refresh_and_forget(self):
        """refresh() fetches whatever the cache says; forget() drops a domain, or all, from memory and disk."""
        cache = self.cache()
        d = cache.refresh("example.org", A)
        self.fetcher.answer("example.org", ENFORCE)
        self.assertEqual(self.successResultOf(d).source, "fetched")
        d = cache.refresh("example.org")
        self.fetcher.answer("example.org", ENFORCE)
        self.assertEqual(self.successResultOf(d).entry.policy_id, "a")
        d = cache.get("other.example", A)
        self.fetcher.answer("other.example", ENFORCE)
        self.assertEqual(sorted(cache.entries()), ["example.org", "other.example"])
        self.successResultOf(cache.forget("Example.org"))
        self.assertEqual(sorted(self.cache().entries()), ["other.example"])
        self.successResultOf(cache.forget())
        self.assertEqual(self.cache().entries(), {})

    def test_load_cleans_up(self):
        """At start-up, damaged files, files of expired policies, files named for another domain and temporary files are removed; good ones are loaded."""
        os.makedirs(self.directory)
        good = CacheEntry("good.example", ENFORCE, "a", T0 - 10)
        expired = CacheEntry("old.example", make_policy(max_age=5), "a", T0 - 100)
        bad_policy = attrs.evolve(good, domain="bad.example").to_json()
        bad_policy["policy"] = "version: STSv9\n"
        files = {
            "good.example.json": json.dumps(good.to_json()),
            "old.example.json": json.dumps(expired.to_json()),
            "other.example.json": json.dumps(good.to_json()),  # names good.example
            "bad.example.json": json.dumps(bad_policy),
            "broken.example.json": "{not json",
            "format.example.json": json.dumps({"format": 99}),
            "good.example.json.tmp": "half",
            "README": "left alone",
        }
        for name, text in files.items():
            with open(os.path.join(self.directory, name), "w") as f:
                f.write(text)
        cache = self.cache()
        self.assertEqual(list(cache.entries()), ["good.example"])
        self.assertEqual(cache.entry("good.example"), good)
        self.assertEqual(sorted(os.listdir(self.directory)), ["README", "good.example.json"])

    def test_policy_for_looks_up_the_txt_record(self):
        """policy_for looks up the TXT records: a valid one leads to the fetch; invalid or failing lookups count as no record (a cached policy stays in force) and say why."""
        records = {"example.org": [b"v=spf1 -all", b"v=STSv1; id=a"]}

        def txt_lookup(domain):
            if domain not in records:
                raise StsDNSError("SERVFAIL")
            return records[domain]
        cache = self.cache(txt_lookup=txt_lookup)
        d = cache.policy_for("example.org")
        self.fetcher.answer("example.org", ENFORCE)
        self.assertEqual(self.successResultOf(d).record, A)
        records["example.org"] = [b"v=STSv1; id=a", b"v=STSv1; id=b"]
        found = self.successResultOf(cache.policy_for("example.org"))
        self.assertEqual((found.source, found.record), ("cache", None))
        self.assertIn("2 v=STSv1 TXT records", found.why)
        found = self.successResultOf(cache.policy_for("unknown.example"))
        self.assertEqual(found.source, "none")
        self.assertIn("TXT lookup failed: SERVFAIL", found.why)
