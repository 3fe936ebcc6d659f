"""A DHCPv4 failover pair on an injected clock: the real handler, lease store,
pools and merge code of two servers, simulated clients and a seeded fault
schedule (``python -m tests.sim.dhcp4 --seeds N``)."""
