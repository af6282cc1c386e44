"""
Which local target stores the mail of each local domain: our own Maildir
writer (L{twisted_mta.delivery.local}) or an LMTP server
(L{twisted_mta.delivery.lmtp}), as C{[local] delivery} and
C{[local.routes]} say.  The queue manager has one local target;
L{LocalRouter} is it when some domain is not stored the default way, and
splits each request by domain.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from twisted_mta import failures
from twisted_mta.address import AddressError, a_label
from twisted_mta.config import LocalSettings
from twisted_mta.delivery.lmtp import LMTPDelivery
from twisted_mta.delivery.local import MaildirDelivery
from twisted_mta.interfaces import IDeliveryTarget
from twisted_mta.local import LocalDirectory
from twisted_mta.model import DeliveryRequest, MessageGone, Outcome
from twisted_mta.queue.spool import RunBlocking

log = Logger()

# A part of a request whose target raised (a bug): its recipients wait.
CRASHED = failures.outcome("internal", why="an internal error interrupted local delivery; "
                                           "it will be retried")


@implementer(IDeliveryTarget)
class LocalRouter:
    """
    The local target that hands each recipient to its domain's target;
    the parts of one request run side by side.  A part whose target
    raises defers only its own recipients (logged once), so a recipient
    another part delivered is not delivered again.
    """

    name = "local"

    def __init__(self, default, by_domain: dict[str, object]) -> None:
        self.default = default
        self.by_domain = {d.lower(): t for d, t in by_domain.items()}

    @property
    def targets(self) -> list:
        seen: dict[int, object] = {id(self.default): self.default}
        for target in self.by_domain.values():
            seen.setdefault(id(target), target)
        return list(seen.values())

    def target_for(self, address: str):
        domain = address.rpartition("@")[2].lower()
        if not domain.isascii():  # SMTPUTF8: the routes name the A-label
            try:
                domain = a_label(domain)
            except AddressError:
                pass
        return self.by_domain.get(domain, self.default)

    @defer.inlineCallbacks
    def deliver(self, request: DeliveryRequest):
        groups: dict[int, tuple[object, list[int]]] = {}
        for index in request.indexes:
            target = self.target_for(request.envelope.recipients[index].address)
            groups.setdefault(id(target), (target, []))[1].append(index)
        calls = [self._part(target, DeliveryRequest(
                     envelope=request.envelope, path=request.path, indexes=tuple(indexes),
                     now=request.now, recovering=request.recovering))
                 for target, indexes in groups.values()]
        results: dict[str, Outcome] = {}
        gone = None
        for part in (yield defer.gatherResults(calls, consumeErrors=True)):
            if isinstance(part, MessageGone):
                gone = part
            else:
                results.update(part)
        if gone is not None:
            raise gone
        return results

    def _part(self, target, request: DeliveryRequest) -> defer.Deferred:
        addresses = [r.address for r in request.recipients]

        def failed(failure):
            if failure.check(MessageGone):
                return failure.value
            log.failure("{target} delivery of {queue_id} crashed", failure,
                        target=target.name, queue_id=request.envelope.queue_id,
                        event="delivery.error")
            return {a: CRASHED for a in addresses}

        return defer.maybeDeferred(target.deliver, request).addErrback(failed)

    def flush(self) -> None:
        for target in self.targets:
            target.flush()

    def stop(self) -> None:
        for target in self.targets:
            target.stop()


def make_local_target(settings: LocalSettings, hostname: str, reactor,
                      run_blocking: RunBlocking, connect_for=None):
    """
    The manager's local target: the Maildir writer alone when every local
    domain is stored in Maildirs (the default), else a L{LocalRouter}
    with one L{LMTPDelivery} per distinct LMTP server and recipient form.

    @param connect_for: for tests, C{address -> connect} (see
        L{LMTPDelivery}); default the reactor's endpoints.
    """
    directory = LocalDirectory(settings)
    maildir = MaildirDelivery(directory, hostname, run_blocking)
    lmtp: dict[tuple[str, str], LMTPDelivery] = {}

    def target_for(domain: str):
        delivery = settings.delivery_for(domain)  # "": no route, the default
        if delivery.kind == "maildir":
            return maildir
        key = (delivery.address, delivery.recipient)
        if key not in lmtp:
            lmtp[key] = LMTPDelivery(
                directory, delivery.address, delivery.recipient, settings.lmtp, hostname,
                reactor, run_blocking,
                connect=connect_for(delivery.address) if connect_for else None)
        return lmtp[key]

    by_domain = {domain: target_for(domain) for domain in settings.domains}
    default = target_for("")
    if all(t is maildir for t in by_domain.values()) and default is maildir:
        return maildir
    return LocalRouter(default, by_domain)
