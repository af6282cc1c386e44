"""
Queue stage: the Maildir-backed spool and the manager that hands due entries
to delivery.
"""
