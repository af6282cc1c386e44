"""
The DSNs the queue sends (RFC 3464): failure reports, one delay warning,
success reports on request, each queued as a new entry from <>.  A bounce
is never answered with a bounce.  A DSN that cannot be queued (a full disk)
is not counted as sent: L{Notices.send} says so, and the queue manager keeps
the entry and tries again.
"""

from __future__ import annotations

import errno
from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger

from twisted_mta.config import Config
from twisted_mta.dkim import Signer, without_signatures
from twisted_mta.dsn.report import (
    FailedRecipient, delay_report, failure_report, redact, success_report,
)
from twisted_mta.failures import REQUIRETLS_KINDS
from twisted_mta.local import LocalDirectory
from twisted_mta.model import Envelope, MessageGone, Recipient
from twisted_mta.queue.results import warning_due
from twisted_mta.queue.spool import RunBlocking, Spool

log = Logger()

FULL_RETURN_LIMIT = 1024 * 1024  # RET=FULL returns messages up to this size, else headers


def _success_action(r: Recipient) -> str:
    # Delivered here, or handed to a server that was not asked to confirm.
    if r.outcome is not None and r.outcome.remote_mta:
        return "relayed"
    return "delivered"


class Notices:
    def __init__(self, config: Config, spool: Spool, clock, run_blocking: RunBlocking,
                 directory: LocalDirectory, enqueue: Callable[[Envelope], None],
                 notify: Callable[[str, dict], None], signer: Signer | None = None) -> None:
        self.config = config
        self.signer = signer  # [dkim]: signs the DSNs when "dsn" is in [dkim] sign
        self.spool = spool
        self.clock = clock
        self.run_blocking = run_blocking
        self.directory = directory
        self.enqueue = enqueue  # the manager's: a queued DSN is attempted like any entry
        self.notify = notify

    def postmaster(self) -> str | None:
        """
        The final address of the postmaster, or None without local domains.
        """
        if not self.config.local.domains:
            return None
        try:
            return self.directory.expand(f"postmaster@{self.directory.primary_domain}")[0]
        except Exception:
            return None

    def due_for_warning(self, envelope: Envelope, now: float) -> bool:
        return warning_due(self.config, envelope, now)

    @defer.inlineCallbacks
    def send(self, envelope: Envelope, failed: list[Recipient], until: float | None = None,
                success: bool = False):
        """
        Tell the sender, in a DSN queued as a new entry from <>, which
        recipients failed (or, with C{until}, are delayed and retried until
        then).  A bounce is never answered with a bounce: when one fails,
        the postmaster gets the report instead, and when that fails,
        nobody.

        Fires with True when nothing more is owed (the DSN is queued, or
        none is wanted: NOTIFY, a bounce of a bounce), False when it could
        not be queued (the caller tries again later); fails with
        L{MessageGone} when the message it reports on is gone.
        """
        qid = envelope.queue_id
        to = envelope.sender
        client = {"protocol": "local", "dsn_for": qid}
        if not success and until is None:
            # NOTIFY=NEVER (or without FAILURE): the sender asked for silence.
            quiet = [r for r in failed if not r.wants("FAILURE")]
            if quiet:
                log.info("{queue_id}: no DSN for {count} failed recipient(s) (NOTIFY)",
                         event="dsn.suppressed", queue_id=qid, count=len(quiet))
                failed = [r for r in failed if r.wants("FAILURE")]
                if not failed:
                    return True
        if not to and until is None and not success and self._redactable(envelope, failed):
            return (yield self._send_redacted(envelope, failed))
        if not to:
            # A bounce that cannot be delivered goes to the postmaster, once:
            # a failing report to the postmaster is only logged.
            postmaster = self.postmaster()
            if until is not None or envelope.client.get("double_bounce") or not postmaster:
                log.warn("{queue_id}: {count} recipient(s) of a bounce failed; no DSN for a DSN",
                         event="dsn.suppressed", queue_id=qid, count=len(failed))
                return True
            to, client["double_bounce"] = postmaster, "yes"
        try:
            # RFC 8689 5: a REQUIRETLS message's report behaves as RET=HDRS.
            if envelope.ret == "FULL" and not success and envelope.size <= FULL_RETURN_LIMIT \
                    and not envelope.requiretls:
                headers = yield self.run_blocking(self.spool.read_message, qid)
            else:
                headers = yield self.run_blocking(self.spool.read_headers, qid)
        except FileNotFoundError as e:
            raise MessageGone(str(e))
        except OSError as e:
            return self._not_queued(qid, to, e)
        try:
            now = self.clock.seconds()
            listed = [FailedRecipient(r, r.outcome.remote_mta if r.outcome else None,
                                      _success_action(r) if success else None)
                      for r in failed]
            if success:
                report = success_report(
                    hostname=self.config.hostname, envelope=envelope, delivered=listed,
                    original_headers=headers, now=now)
            elif until is None:
                report = failure_report(
                    hostname=self.config.hostname, envelope=envelope, failed=listed,
                    original_headers=headers, now=now, to=to)
            else:
                report = delay_report(
                    hostname=self.config.hostname, envelope=envelope, delayed=listed,
                    original_headers=headers, now=now, until=until)
            if self.signer is not None and self.signer.signs("dsn"):
                report = yield self.run_blocking(self.signer.sign_local, report, "dsn", qid)
            # RFC 8689 5: the report of a REQUIRETLS message is REQUIRETLS too.
            dsn = yield self.spool.queue_local(
                report, sender="", recipients=(Recipient(address=to),), arrival=now,
                next_attempt=now, client=client, requiretls=envelope.requiretls,
                # RFC 6533: the report on an international message is one too.
                smtputf8=envelope.smtputf8 or not to.isascii())
        except OSError as e:
            return self._not_queued(qid, to, e)
        except Exception:
            log.failure("{queue_id}: could not queue a DSN for <{sender}>; will try again",
                        queue_id=qid, sender=to, event="dsn.error")
            return False
        kind = "delivered" if success else ("failed" if until is None else "delayed")
        self.notify("dsn.queued", {"kind": kind})
        log.info("{queue_id}: DSN {dsn_id} queued for <{sender}> ({count} {kind} recipient(s))",
                 event="dsn.queued", queue_id=qid, dsn_id=dsn.queue_id, kind=kind,
                 sender=to, count=len(failed),
                 recipients=[r.address for r in failed])
        self.enqueue(dsn)
        return True

    @staticmethod
    def _redactable(envelope: Envelope, failed: list[Recipient]) -> bool:
        """
        Whether a failed bounce is a REQUIRETLS report that its way back
        refused for want of REQUIRETLS alone (RFC 8689 5: that "SHOULD NOT
        cause a bounce to be discarded"), and not already a redacted copy.
        """
        return (envelope.requiretls and not envelope.sender and bool(failed)
                and "redacted_from" not in envelope.client
                and all(r.outcome is not None and r.outcome.kind in REQUIRETLS_KINDS
                        for r in failed))

    @defer.inlineCallbacks
    def _send_redacted(self, envelope: Envelope, failed: list[Recipient]):
        """
        Send the REQUIRETLS report again without the original message's
        headers and without REQUIRETLS, to the same recipients: what it
        protected is gone, and the sender still learns what happened.
        """
        qid = envelope.queue_id
        to = ", ".join(r.address for r in failed)
        try:
            report = yield self.run_blocking(self.spool.read_message, qid)
        except FileNotFoundError as e:
            raise MessageGone(str(e))
        except OSError as e:
            return self._not_queued(qid, to, e)
        redacted = redact(report)
        if redacted is None:
            log.warn("{queue_id}: a REQUIRETLS report could not be redacted; not sent",
                     event="dsn.suppressed", queue_id=qid)
            return True
        if self.signer is not None and self.signer.signs("dsn"):
            # The report's signature does not cover the redacted copy: sign it anew.
            redacted = yield self.run_blocking(self.signer.sign_local,
                                               without_signatures(redacted), "dsn", qid)
        try:
            now = self.clock.seconds()
            copy = yield self.spool.queue_local(
                redacted, sender="", recipients=tuple(Recipient(address=r.address) for r in failed),
                arrival=now, next_attempt=now, client={"protocol": "local", "redacted_from": qid})
        except OSError as e:
            return self._not_queued(qid, to, e)
        except Exception:
            log.failure("{queue_id}: could not queue a redacted report; will try again",
                        queue_id=qid, event="dsn.error")
            return False
        self.notify("dsn.queued", {"kind": "redacted"})
        log.info("{queue_id}: REQUIRETLS report refused on its way back ({kind}); a redacted "
                 "copy {dsn_id} without the original headers and without REQUIRETLS queued "
                 "for <{sender}>", event="dsn.redacted", queue_id=qid, dsn_id=copy.queue_id,
                 kind=failed[0].outcome.kind, sender=to)
        self.enqueue(copy)
        return True

    def _not_queued(self, qid: str, to: str, e: OSError) -> bool:
        """
        The disk refused the DSN (or its source): one line, and try again.
        """
        if e.errno is None:  # not from the system: a bug, with its traceback
            log.failure("{queue_id}: could not queue a DSN for <{sender}>; will try again",
                        queue_id=qid, sender=to, event="dsn.error")
            return False
        name = errno.errorcode.get(e.errno, str(e.errno))
        log.warn("{queue_id}: could not queue a DSN for <{sender}>: {error} [{errno}]; "
                 "will try again", queue_id=qid, sender=to, error=e.strerror or name,
                 errno=name, event="dsn.error")
        return False
