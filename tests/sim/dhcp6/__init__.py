"""A DHCPv6 failover pair on an injected clock: two real dhcp6 services on the failover
core (IA_NA and IA_PD), simulated clients and a seeded fault schedule
(``python -m tests.sim.dhcp6 --seeds N``)."""
