"""
Delivery stage: final delivery into local Maildirs.
"""
