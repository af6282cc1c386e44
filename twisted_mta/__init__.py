"""
twisted-mta: a mail transfer agent on Twisted.

Mail flows inbound/ -> queue/ -> outbound/ -> delivery/ + dsn/; see
docs/architecture.md.
"""

__version__ = "0.1.0"
