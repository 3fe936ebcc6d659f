"""The heartbeat + failover manager shared by every service.

heartbeat.py (wire format, HMAC, replay protection), detector.py (peer
liveness), ownership.py (election with epochs), partner.py (failover
states of a partner relationship), vip.py (address takeover), manager.py
(the ``cluster`` service wiring them to the reactor, the store and RPC).
"""
