"""
Inbound stage: the ESMTP server that hands complete messages to the queue.

A message is acknowledged with 250 only after the queue reports it durable.
"""
