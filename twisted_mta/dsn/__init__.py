"""
Delivery status notifications (RFC 3464): reports to the sender about
recipients that failed.
"""
