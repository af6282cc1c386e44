"""
The C{_smtp._tls} TXT record (RFC 8460 §3) from tables: what counts as
the one record, the fields, the rua= URIs; and the look-up through a
dnspython resolver (faked: the real name server is in the interop test).
"""

from __future__ import annotations

import dns.exception
import dns.resolver
from twisted.trial.unittest import SynchronousTestCase

from twisted_mta.tlsrpt.record import (
    Discovery, Rua, TLSRPTDNSError, TLSRPTRecord, discover, examine_records, lookup_txt,
    parse_record, txt_name,
)

M = "mailto:tlsrpt@example.org"
H = "https://reports.example.org/tlsrpt"

# (record text, expected ruas or None for invalid, a word the reason must hold)
RECORDS = [
    (f"v=TLSRPTv1; rua={M}", (Rua("mailto", "tlsrpt@example.org"),), ""),
    (f"v=TLSRPTv1;rua={M}", (Rua("mailto", "tlsrpt@example.org"),), ""),
    (f"v=TLSRPTv1; rua={M};", (Rua("mailto", "tlsrpt@example.org"),), ""),
    (f"v=TLSRPTv1; rua={M} ; ", (Rua("mailto", "tlsrpt@example.org"),), ""),
    (f"v=TLSRPTv1; rua={H}", (Rua("https", H),), ""),
    (f"v=TLSRPTv1; rua={M},{H}", (Rua("mailto", "tlsrpt@example.org"), Rua("https", H)), ""),
    (f"v=TLSRPTv1; rua={M} , {H}", (Rua("mailto", "tlsrpt@example.org"), Rua("https", H)), ""),
    # %-escapes decoded; the scheme is case-insensitive; the domain lower-cased
    ("v=TLSRPTv1; rua=MAILTO:tls%2Brpt@Example.ORG",
     (Rua("mailto", "tls+rpt@example.org"),), ""),
    # a ?header part is dropped
    ("v=TLSRPTv1; rua=mailto:r@example.org?subject=x", (Rua("mailto", "r@example.org"),), ""),
    # unknown fields ignored, before or after rua
    (f"v=TLSRPTv1; ext_1=abc; rua={M}; other.x=1", (Rua("mailto", "tlsrpt@example.org"),), ""),
    # another scheme is skipped while a usable URI remains
    (f"v=TLSRPTv1; rua=ftp://x.example,{M}", (Rua("mailto", "tlsrpt@example.org"),), "ftp"),
    # DMARC's !size is not TLSRPT: that URI is not an address
    (f"v=TLSRPTv1; rua=mailto:r@example.org!10m,{H}", (Rua("https", H),), "not one mail"),
    ("v=TLSRPTv1; rua=mailto:r@example.org!10m", None, "no usable"),
    ("v=TLSRPTv1; rua=http://plain.example/", None, "no usable"),
    ("v=TLSRPTv1; rua=https://", None, "no usable"),
    ("v=TLSRPTv1; rua=mailto:", None, "not a URI"),
    ("v=TLSRPTv1; rua=mailto:nobody", None, "no usable"),
    ("v=TLSRPTv1; rua=mailto:a@b.example%2Cc@d.example", None, "no usable"),
    ("v=TLSRPTv1;", None, "no fields"),
    ("v=TLSRPTv1; ext=1", None, "no rua"),
    (f"v=TLSRPTv1; rua={M},", None, "empty URI"),
    (f"v=TLSRPTv1; rua={M}; rua={H}", None, "twice"),
    (f"v=TLSRPTv1; rua={M};; x=1", None, "name=value"),
    (f"v=TLSRPTv1; rua {M}", None, "name=value"),
    (f"v=TLSRPTv1; rua={M}; bad=a=b", None, "invalid value"),
    (f"v=TLSRPTv1; rua={M}; _x=1", None, "name=value"),
    (f"v=TLSRPTv2; rua={M}", None, "does not begin"),
    (f"v=tlsrptv1; rua={M}", None, "does not begin"),
    (f" v=TLSRPTv1; rua={M}", None, "does not begin"),
    (f"v=TLSRPTv1 ; rua={M}", None, "does not begin"),
]


class ParseRecordTests(SynchronousTestCase):
    def test_table(self) -> None:
        for text, ruas, word in RECORDS:
            with self.subTest(text=text):
                record, why = parse_record(text)
                if ruas is None:
                    self.assertIsNone(record)
                    self.assertTrue(why)
                else:
                    self.assertEqual(record, TLSRPTRecord(ruas))
                self.assertIn(word, why)
                if not word:
                    self.assertEqual(why, "")

    def test_mailto_and_https(self) -> None:
        record, _ = parse_record(f"v=TLSRPTv1; rua={H},{M}")
        self.assertEqual(record.mailto, ("tlsrpt@example.org",))
        self.assertEqual(record.https, (H,))


class ExamineRecordsTests(SynchronousTestCase):
    GOOD = f"v=TLSRPTv1; rua={M}".encode()

    def test_table(self) -> None:
        rows = [
            ([self.GOOD], True, ""),
            ([b"v=spf1 -all", self.GOOD], True, ""),  # others are discarded
            ([b"v=TLSRPTv2; rua=" + M.encode(), self.GOOD], True, ""),
            ([self.GOOD, self.GOOD], False, "2 TLSRPT records"),
            # one invalid record still counts as one
            ([self.GOOD, b"v=TLSRPTv1; x=1"], False, "2 TLSRPT records"),
            ([], False, "no TLSRPT record"),
            ([b"v=spf1 -all"], False, "no TLSRPT record"),
            ([b"v=TLSRPTv1; rua=mailto:\xff@x.example"], False, "not ASCII"),
            ([b"v=TLSRPTv1; x=1"], False, "no rua"),
        ]
        for records, valid, word in rows:
            with self.subTest(records=records):
                record, why = examine_records(records)
                self.assertEqual(record is not None, valid)
                self.assertIn(word, why)


class _Rdata:
    def __init__(self, *strings: bytes) -> None:
        self.strings = strings


class _Resolver:
    def __init__(self, answer=None, error=None) -> None:
        self.answer, self.error, self.asked = answer, error, []

    def resolve(self, name, rdtype):
        self.asked.append((name, rdtype))
        if self.error is not None:
            raise self.error
        return self.answer


class LookupTests(SynchronousTestCase):
    def test_name(self) -> None:
        self.assertEqual(txt_name("example.org."), "_smtp._tls.example.org.")

    def test_strings_joined_without_spaces(self) -> None:
        resolver = _Resolver([_Rdata(b"v=TLSRPTv1; rua=mailto:r@exa", b"mple.org")])
        self.assertEqual(lookup_txt(resolver, "example.org"),
                         [b"v=TLSRPTv1; rua=mailto:r@example.org"])
        self.assertEqual(resolver.asked, [("_smtp._tls.example.org.", "TXT")])
        found = discover(resolver, "example.org")
        self.assertEqual(found, Discovery("example.org", TLSRPTRecord(
            (Rua("mailto", "r@example.org"),)), ""))

    def test_none(self) -> None:
        for error in (dns.resolver.NXDOMAIN(), dns.resolver.NoAnswer()):
            found = discover(_Resolver(error=error), "example.org")
            self.assertIsNone(found.record)
            self.assertEqual(found.why, "no TLSRPT record")

    def test_failure(self) -> None:
        with self.assertRaises(TLSRPTDNSError) as e:
            lookup_txt(_Resolver(error=dns.exception.Timeout()), "example.org")
        self.assertIn("_smtp._tls.example.org.", str(e.exception))
