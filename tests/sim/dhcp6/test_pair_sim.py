"""The DHCPv6 failover pair simulator in CI: 100 seeds (SIM_DHCP6_SEEDS=N scales them) of 60
simulated seconds each (a seed costs about a second: two real services and their stores);
``python -m tests.sim.dhcp6 --seeds 10000`` for long runs.  A failing seed names itself and
the command that replays it."""

from __future__ import annotations

import os

import pytest

from tests.sim.dhcp6.world import World

SEEDS = int(os.environ.get("SIM_DHCP6_SEEDS", "100"))
CHUNK = 20
DURATION = 60.0


@pytest.mark.parametrize("start,count", [(s, min(CHUNK, SEEDS - s)) for s in range(0, SEEDS, CHUNK)])
def test_v6_pair_never_gives_one_address_or_prefix_to_two_clients(start, count):
    """No address and no prefix given to a client while another holds an unexpired one for
    it -- under partitions longer than the MCLT, kill -9 and restart with and without the
    disk (RECOVER when the partner ran PARTNER-DOWN or the data is lost, then RECOVER-WAIT)
    and the operator's partner-down; a node restarted without its data recovers as such."""
    for seed in range(start, start + count):
        World(seed, duration=DURATION).run()


@pytest.mark.parametrize("seed", [1396, 1479])
def test_v6_seeds_that_found_bugs(seed):
    """1396, 1479 (the first long run): the core's LeaseStore.load parsed v6 records with the
    v4 family and skipped them all, so a dhcp6 node restarted with its disk knew none of
    its leases (and took itself for one that had lost its data): it gave a bound address
    to a second client."""
    World(seed, duration=DURATION * 1.5).run()
