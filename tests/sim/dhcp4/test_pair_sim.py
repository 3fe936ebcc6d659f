"""The DHCPv4 failover pair simulator in CI: 500 seeds (SIM_DHCP4_SEEDS=N scales them)
of 90 simulated seconds each; ``python -m tests.sim.dhcp4 --seeds 10000`` for long
runs.  A failing seed names itself and the command that replays it."""

from __future__ import annotations

import os

import pytest

from tests.sim.dhcp4.world import World

SEEDS = int(os.environ.get("SIM_DHCP4_SEEDS", "500"))
CHUNK = 50
DURATION = 90.0


@pytest.mark.parametrize("start,count", [(s, min(CHUNK, SEEDS - s)) for s in range(0, SEEDS, CHUNK)])
def test_pair_never_gives_one_address_to_two_clients(start, count):
    """No address ACKed to a client while another holds an unexpired ACK for it; no ACKed
    lease lost across a restart that kept the disk; no renewing client NAKed while the
    server knew its binding -- under partitions, link loss, kill -9 with and without the
    disk, clock skew and operator partner-down."""
    for seed in range(start, start + count):
        World(seed, duration=DURATION).run()


@pytest.mark.parametrize("seed", [198, 1365, 1989, 5122, 5149, 5443, 5974, 6441, 6593, 6661,
                                  6957, 7275])
def test_seeds_that_found_bugs(seed):
    """5122: a partner recovering without its data acked our expiry while we were NORMAL
    for a moment (its ack freed an address its lost renewal still held); 5149: operator
    partner-down on a node that restarted during a partition and never heard its
    partner, which had run PARTNER-DOWN on its addresses; 5974: a client got its old
    (released) address back from the partner's segment in PARTNER-DOWN before the MCLT past
    its potential expiry, while the dead partner had re-given it; 198: the addresses held
    after a recovery without data were forgotten by a restart (disk kept) before the
    holds ran out; 5443, 6441: the simulator's recovery sync did not pass the recovering
    node's "held" notices to its partner as the service does (the partner re-gave an
    address a lease lost with the wiped disk still held)."""
    World(seed, duration=DURATION).run()


@pytest.mark.parametrize("seed,duration", [(4658, 240.0), (7609, 240.0), (12110, 240.0)])
def test_long_seeds_that_found_bugs(seed, duration):
    """Found by the 240 s runs (replayed at that length).  4658: the peer link down
    while heartbeats were up: b ran PARTNER-DOWN on a's addresses, the link came back
    and the heartbeats said NORMAL before b's leases arrived; a served its "free"
    addresses from a stale view (the cluster now reports COMMUNICATIONS-INTERRUPTED
    while the link is down, and NORMAL waits for the partner's update_done).  7609: a
    rebinding client NAKed after PARTNER-DOWN/RECOVER: b bound an offer it made in
    PARTNER-DOWN on a's address after it left that state, and a kept its own offer of
    the address to another client when b's binding arrived (see
    tests/unit/test_dhcp4_lease_stability.py; the seed's schedule differs under the
    current link model).  12110 (the session-6 long run): the simulator's recovery
    without data did not pass the recovering node's "without_data" notice to its
    partner before the pages' acks, as the service does, so the partner's expiry of an
    address the lost leases still held was acked and re-given; and the partner now
    trusts the acks again when the recovered node says it is in step ("with_data").
    """
    World(seed, duration=duration).run()
