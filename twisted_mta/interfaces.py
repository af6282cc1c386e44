"""
Every zope.interface contract of twisted-mta.

Third parties implement L{ITLSPolicy} and L{IFallbackDecider} (and ship them
as twisted.plugin dropins, or name them by dotted path in the configuration);
both are pure decision objects: no I/O, so they are easy to test from a
table.  See docs/plugins.md.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class ITLSPolicy(Interface):
    """
    What TLS a delivery to one destination requires.
    """

    name = Attribute("A short name, used in the configuration and in logs.")

    def requirements(destination):
        """
        The L{twisted_mta.tls.policy.TLSRequirements} for
        C{destination} (a L{twisted_mta.tls.policy.Destination}:
        the recipient domain, the MX or smarthost host, whether it is a
        smarthost).  Called for every connection, so it may vary by
        destination; it must not block.
        """


class IFallbackDecider(Interface):
    """
    Whether a delivery whose TLS failed may go on another way.
    """

    name = Attribute("A short name, used in the configuration and in logs.")

    def decide(failure, situation):
        """
        Return a L{twisted_mta.tls.fallback.Decision} for the typed
        C{failure} (L{twisted_mta.tls.failure.TLSFailure}) in
        C{situation} (L{twisted_mta.tls.fallback.Situation}: the
        destination, the policy's requirements, the message's age,
        attempts and earlier TLS failures).  The hard rules (implicit TLS,
        credentials, REQUIRETLS never go to cleartext) are applied to the
        result afterwards: a decider cannot break them.
        """


class IDeliveryTarget(Interface):
    """
    Where the queue manager hands recipients: local Maildirs, an LMTP
    server for local mail, a remote server by SMTP.  The manager calls every target the
    same way and imports none of them; the service builder plugs them in.
    """

    name = Attribute("A short name for logs and metrics: 'local', 'remote'.")

    def deliver(request):
        """
        Try to deliver one queued message to some of its recipients.

        @param request: a L{twisted_mta.model.DeliveryRequest}.
        @return: a Deferred firing with C{{address: Outcome}} for every
            recipient of the request (a missing one counts as a temporary
            failure); it fails with L{twisted_mta.model.MessageGone} when
            the queue file has vanished.  Any other failure is a bug: the
            manager logs it once and defers the recipients.
        """

    def flush():
        """
        An operator asked to try everything now: forget what would make
        the target fail fast (dead destinations).
        """

    def stop():
        """
        The service is stopping: close idle resources; work under way may
        finish.
        """
