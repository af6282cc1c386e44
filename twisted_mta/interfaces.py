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
