"""
The reading side of TLS reporting end to end: our MTA (twistd, a real
process) receives report mails over SMTP for its report address, delivers
them into that mailbox's Maildir, and C{twisted-mta tls inbox --json}
summarises them, naming the one that is malformed.
"""

from __future__ import annotations

import datetime
import json
import os
import smtplib
import subprocess
import sys

from twisted.trial import unittest

from tests.interop.support import (
    LOCAL_DOMAIN, LOOPBACK, make_message, make_tempdir, message_files, postfix_unavailable,
    start_mta, start_postfix, subprocess_env, wait_for,
)
from tests.tlsrpt.test_inbox import as_gzip, as_json, google_like, microsoft_like, report_mail


def tls_inbox(mta) -> tuple[int, dict, str]:
    """
    C{twisted-mta tls inbox --json} on C{mta}'s configuration: the exit
    status, the JSON, stderr.
    """
    result = subprocess.run(
        [sys.executable, "-m", "twisted_mta.cli", "tls", "inbox", "--json",
         "-c", mta.config_path],
        cwd=mta.tmpdir, env=subprocess_env(), stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=60)
    return result.returncode, json.loads(result.stdout or "null"), result.stderr


def yesterday() -> str:
    return (datetime.datetime.now(datetime.timezone.utc).date()
            - datetime.timedelta(days=1)).isoformat()


class InboxTests(unittest.TestCase):

    def test_reports_received_and_summarised(self) -> None:
        """Four report mails and one other mail sent over SMTP to tlsrpt@ are delivered into its Maildir; tls inbox --json counts the two good reports (the duplicate once), the failure, names the malformed one and the other mail, and exits 1 for the failure."""
        mta = start_mta(self, make_tempdir(self, "tlsrpt-inbox"),
                        users=("alice", "postmaster", "tlsrpt"))
        day = yesterday()
        google = report_mail(as_gzip(google_like(day, host=f"mx2.{LOCAL_DOMAIN}")))
        mails = [
            google,
            google,  # sent twice (two rua URIs to the same box): counted once
            report_mail(as_json(microsoft_like(day, day)), "application/json",
                        "report.json"),
            report_mail(b"\x1f\x8b\x08\x00this is no gzip", filename="broken.json.gz"),
            make_message("spam-token", subject="You have won", recipient="tlsrpt@example.test"),
        ]
        recipient = f"tlsrpt@{LOCAL_DOMAIN}"
        with smtplib.SMTP(LOOPBACK, mta.port, timeout=10) as smtp:
            smtp.ehlo("reporter.example.test")
            for mail in mails:
                refused = smtp.sendmail("tlsrpt-noreply@reporter.example.test", [recipient], mail)
                self.assertEqual(refused, {})
        maildir = mta.maildir("tlsrpt")
        files = wait_for(lambda: len(message_files(maildir)) == 5 and message_files(maildir),
                         20, lambda: f"5 messages in {maildir}; {mta.describe()}")
        broken = [f for f in files if b"broken.json.gz" in open(f, "rb").read()]
        spam = [f for f in files if b"spam-token" in open(f, "rb").read()]
        self.assertEqual(len(broken), 1)

        code, data, err = tls_inbox(mta)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual(data["mailboxes"], [{"name": recipient, "path": maildir,
                                              "exists": True}])
        self.assertEqual((data["files"], data["reports"], data["duplicates"]), (5, 2, 1))
        self.assertEqual(data["malformed"], [{"file": broken[0],
                                              "reason": data["malformed"][0]["reason"]}])
        self.assertIn("bad gzip", data["malformed"][0]["reason"])
        self.assertEqual(data["not_reports"], [
            {"file": spam[0], "reason": "no TLS report in it (text/plain, Subject: You have won "
                                        "spam-token)"}])
        (problem,) = data["problems"]
        self.assertEqual((problem["organization"], problem["mx_host"], problem["result_type"],
                          problem["sessions"]),
                         ("Google LLC", f"mx2.{LOCAL_DOMAIN}", "certificate-expired", 1204))
        self.assertTrue(problem["text"].startswith(
            f"Google LLC saw 1,204 sessions to mx2.{LOCAL_DOMAIN} fail with "
            "certificate-expired on "), problem["text"])
        self.assertEqual(data["healthy"], [{"organization": "Microsoft Corporation",
                                            "sessions": 5326}])
        # Read only: the messages are where delivery put them.
        self.assertEqual(message_files(maildir), files)
        self.assertTrue(all(os.path.dirname(f).endswith("new") for f in files))

    def test_reports_relayed_by_postfix(self) -> None:
        """Report mails a real Postfix relays to us (as a sender's MTA would) land in tlsrpt@'s Maildir and tls inbox --json reads them whole."""
        why = postfix_unavailable()
        if why:
            raise unittest.SkipTest(why)
        mta = start_mta(self, make_tempdir(self, "tlsrpt-postfix"),
                        users=("alice", "postmaster", "tlsrpt"))
        postfix = start_postfix(self, mta.port)
        day = yesterday()
        recipient = f"tlsrpt@{LOCAL_DOMAIN}"
        mails = [report_mail(as_gzip(google_like(day, host=f"mx2.{LOCAL_DOMAIN}"))),
                 report_mail(as_gzip(microsoft_like(day, day)), "application/gzip")]
        with smtplib.SMTP(LOOPBACK, postfix.smtpd_port, local_hostname="reporter.example.test",
                          timeout=10) as smtp:
            for mail in mails:
                self.assertEqual(smtp.sendmail("noreply@reporter.example.test", [recipient],
                                               mail), {})
        maildir = mta.maildir("tlsrpt")
        wait_for(lambda: len(message_files(maildir)) == 2, 30,
                 lambda: f"2 messages in {maildir}\n{postfix.describe()}\n{mta.describe()}")
        code, data, err = tls_inbox(mta)
        self.assertEqual((code, err), (1, ""))
        self.assertEqual((data["files"], data["reports"], data["malformed"],
                          data["not_reports"]), (2, 2, [], []))
        self.assertEqual([(p["organization"], p["mx_host"], p["sessions"])
                          for p in data["problems"]],
                         [("Google LLC", f"mx2.{LOCAL_DOMAIN}", 1204)])
        self.assertEqual(data["healthy"], [{"organization": "Microsoft Corporation",
                                            "sessions": 5326}])
