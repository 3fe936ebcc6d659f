"""The cluster fault simulator in CI: 500 seeds with 2 nodes, 100 with 3, and 100 with
2 nodes + a witness (about two minutes).  SIM_SEEDS=N scales them (N two-node seeds,
N/5 of each other kind); ``python -m tests.sim --seeds 10000 [--witness]`` for long
runs."""

from __future__ import annotations

import os

import pytest

from tests.sim.world import World

SEEDS = int(os.environ.get("SIM_SEEDS", "500"))
CHUNK = 50
DURATION = 15.0


def _chunks(total):
    return [(start, min(CHUNK, total - start)) for start in range(0, total, CHUNK)]


@pytest.mark.parametrize("nodes,witness,start,count",
                         [(2, False, s, c) for s, c in _chunks(SEEDS)]
                         + [(3, False, s, c) for s, c in _chunks(max(1, SEEDS // 5))]
                         + [(2, True, s, c) for s, c in _chunks(max(1, SEEDS // 5))])
def test_seeds_keep_every_invariant(nodes, witness, start, count):
    """Every seeded fault schedule keeps the invariants (a failure names the seed and
    the one command that replays it)."""
    for seed in range(start, start + count):
        World(seed, nodes, witness=witness).run(DURATION)
