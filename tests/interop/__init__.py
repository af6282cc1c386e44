"""
Interop and crash-safety tests: real processes (twistd, Postfix) on loopback.
"""
