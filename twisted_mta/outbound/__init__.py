"""
The outbound leg: where remote recipients go (C{router}), MX look-ups
(C{mx}), one delivery attempt to a next hop step by step (C{attempt}), the
connections shared by attempts (C{pool}), the ESMTP client (C{client}) and
the message as it is sent (C{message}).  The TLS engine it runs under is
L{twisted_mta.tls}.
"""
