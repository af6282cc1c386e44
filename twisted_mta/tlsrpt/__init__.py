"""
SMTP TLS Reporting (RFC 8460): the daily reports we send to the domains
we deliver to (what our TLS sessions with their MX hosts did, counted per
policy and day), and the reader of the reports other senders send to us.

It sits beside the outbound leg: its counts come from the delivery
attempts' TLS outcomes, and reports sent by mail go through our own queue.
"""
