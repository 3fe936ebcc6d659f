"""The cluster fault simulator in CI: 500 seeds with 2 nodes, 100 with 3, 100 with
2 nodes + a witness and 100 with 2 nodes + Redis owner leases (about two minutes).
SIM_SEEDS=N scales them (N two-node seeds, N/5 of each other kind);
``python -m tests.sim --seeds 10000 [--witness | --lease]`` for long runs."""

from __future__ import annotations

import os

import pytest

from tests.sim.world import World

SEEDS = int(os.environ.get("SIM_SEEDS", "500"))
CHUNK = 50
DURATION = 15.0


def _chunks(total):
    return [(start, min(CHUNK, total - start)) for start in range(0, total, CHUNK)]


@pytest.mark.parametrize("nodes,witness,lease,start,count",
                         [(2, False, False, s, c) for s, c in _chunks(SEEDS)]
                         + [(3, False, False, s, c) for s, c in _chunks(max(1, SEEDS // 5))]
                         + [(2, True, False, s, c) for s, c in _chunks(max(1, SEEDS // 5))]
                         + [(2, False, True, s, c) for s, c in _chunks(max(1, SEEDS // 5))])
def test_seeds_keep_every_invariant(nodes, witness, lease, start, count):
    """Every seeded fault schedule keeps the invariants (a failure names the seed and
    the one command that replays it)."""
    for seed in range(start, start + count):
        World(seed, nodes, witness=witness, lease=lease).run(DURATION)
