"""
Delivery targets, the seam between the queue and the world
(L{twisted_mta.interfaces.IDeliveryTarget}): local Maildirs
(C{delivery.local}) and remote servers through the outbound leg
(C{delivery.remote}).
"""
