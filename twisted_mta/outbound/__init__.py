"""
Outbound stage: routing of non-local recipients (remote delivery is not built
yet; such recipients are deferred with a clear reason).
"""
