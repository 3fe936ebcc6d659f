"""The heartbeat + failover manager shared by every service.

Pure logic: heartbeat.py (wire format, HMAC, echo-based replay protection),
ownership.py (election with epochs), partner.py (failover states of a
partner relationship).  Components: transport.py (socket, incarnation,
drift-free send schedule), detector.py (peer liveness, loss, jitter, skew),
health.py (local flags), resources.py (elections, epochs, claims, VIPs),
partners.py (partner state machines, persistence, syncs), quorum.py (majority
and the witness vote), admin.py (RPC,
status, metrics; the only module that maps to admin errors), clock.py
(monotonic timers), peerlink.py (the mutual-TLS replication stream),
vip.py (address takeover).  manager.py is the ``cluster`` service: a thin
façade wiring them to the reactor, the store and RPC.
"""
