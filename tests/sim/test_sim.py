"""The cluster fault simulator in CI, 15 s each: 250 seeds with 2 nodes, 60 with
3, 80 with 2 nodes + a witness, 100 with 2 nodes + Redis owner leases, and with
store answers delayed up to 80 ms (``--store-delay 0.08``: claims in flight
while beats arrive) 30 with 2 nodes and 10 with 3 (530 seeds, about two minutes
of CPU here: a 3-node or witness run costs twice a two-node one).  SIM_SEEDS=N
scales them (N - N/6 two-node seeds, N/5 three-node, 4N/15 witness, N/3 lease,
N/10 and N/30 store-delay); ``python -m tests.sim --seeds 10000 [--nodes 3 |
--witness | --lease | --store-delay 0.08]`` for long runs (counts in the issue
notes).  The store-delay seeds start at 100 (2 nodes: seed 107 of the long run)
and 20 (3 nodes: seed 29), whose heal windows once tripped the check."""

from __future__ import annotations

import os

import pytest

from tests.sim.world import Violation, World

SEEDS = int(os.environ.get("SIM_SEEDS", "300"))
CHUNK = 50
DURATION = 15.0
STORE_DELAY = 0.08


def _chunks(total, first=0):
    return [(first + start, min(CHUNK, total - start)) for start in range(0, total, CHUNK)]


@pytest.mark.parametrize(
    "nodes,witness,lease,store_delay,start,count",
    [(2, False, False, 0.0, s, c) for s, c in _chunks(SEEDS - SEEDS // 6)]
    + [(3, False, False, 0.0, s, c) for s, c in _chunks(max(1, SEEDS // 5))]
    + [(2, True, False, 0.0, s, c) for s, c in _chunks(max(1, SEEDS * 4 // 15))]
    + [(2, False, True, 0.0, s, c) for s, c in _chunks(max(1, SEEDS // 3))]
    + [(2, False, False, STORE_DELAY, s, c) for s, c in _chunks(max(1, SEEDS // 10), 100)]
    + [(3, False, False, STORE_DELAY, s, c) for s, c in _chunks(max(1, SEEDS // 30), 20)])
def test_seeds_keep_every_invariant(nodes, witness, lease, store_delay, start, count):
    """Every seeded fault schedule keeps the invariants (a failure names the seed and
    the one command that replays it)."""
    for seed in range(start, start + count):
        World(seed, nodes, witness=witness, lease=lease, store_delay=store_delay).run(DURATION)


#: Seeds that once broke an invariant (the full 30 s run of the replay command).
REGRESSIONS = [
    # two owners with a witness: b's promote ignored the intent of a peer alive
    # but not connected (a slow, lossy a->b link) whose claim was on the way
    (21924, 2, True, False),
    # model: an extra beat left at the same instant as a scheduled one and
    # overtook it; the sim took the overtaken one for liveness evidence
    (3706, 2, True, False),
    # harness: an operator promote of a resource the node already owned (one
    # epoch up) was taken for a takeover from its dead peer without a fence
    (20257, 2, False, False),
]

# Found by the `live` invariant (2026-12-04, witness mode, 2 nodes): a demoted while it
# did not own the resource, b demoted later, both out of maintenance: each demote ended
# only when someone else took it, so nobody ever did (no owner).  Demoted nodes now
# stand aside only for a candidate that is not demoted.
LIVENESS_SEEDS = [(70485, 2, True), (70534, 2, True), (70881, 2, True)]


@pytest.mark.parametrize("seed,nodes,witness", LIVENESS_SEEDS)
def test_liveness_seeds(seed, nodes, witness):
    World(seed, nodes, witness=witness).run(15.0)


@pytest.mark.parametrize("seed,nodes,witness,lease", REGRESSIONS)
def test_regression_seeds(seed, nodes, witness, lease):
    World(seed, nodes, witness=witness, lease=lease).run(30.0)


# Found by the long run of 2026-12-04 (seeds 30000-31349, 15 s, 3 nodes + witness; they
# failed the same on 2f05b00): an operator demote / maintenance of the owner a while b and
# c cannot hear each other (a partition b|c, or loss) left b AND c claiming the resource:
# each saw the other dead and got a's echo of its intent.  Fixed by the backing flag
# (resources.py, backs:<name>=<node>): an echo acknowledges only the intent it backs.
WITNESS_HANDOVER_SPLITS = [30534, 30571, 30793, 30931, 30938, 31263, 31329, 31350, 31380]


@pytest.mark.parametrize("seed", WITNESS_HANDOVER_SPLITS)
def test_witness_handover_split_seeds(seed):
    World(seed, 3, witness=True).run(15.0)


def test_unsafe_key_rotation_is_caught():
    """The simulator's key rotation has teeth: switching a node's signing key before
    the others accept it (etc/README's step 1 skipped) is a suspicion of a live peer."""
    from tests.sim.world import Violation
    with pytest.raises(Violation, match="suspected .* although a beat of it arrived"):
        World(0, 2, rotation="unsafe").run(DURATION)
    # the same seed with the three steps keeps every invariant
    World(0, 2, rotation="safe").run(DURATION)


def test_fencing_seeds_and_the_fencing_invariant_has_teeth(monkeypatch):
    """pre_takeover fencing runs in 30 % of the seeds above (its own generator);
    here always.  With the fence gate taken out of the election, a takeover
    from a peer judged dead without a fence is caught."""
    from appliance.cluster import resources
    from tests.sim.world import Violation
    for seed in range(10):
        World(seed, 2, fencing="on").run(DURATION)
    monkeypatch.setattr(resources.ResourceTable, "_fence_cleared", lambda self, res, f: True)
    with pytest.raises(Violation, match="without a fence of it"):
        World(0, 2, fencing="on").run(DURATION)


def test_small_deadline_slack_seeds_and_the_detector_invariant_has_teeth(monkeypatch):
    """[cluster] deadline_slack_ms 0-2 ms runs in a quarter of the seeds above (its own
    generator); here always: no suspicion unless dead_after intervals of beats were
    lost or late.  A negative slack (a deadline before dead_after intervals) is caught."""
    from appliance.cluster import manager
    from tests.sim.world import Violation
    for seed in range(10):
        World(seed, 2, slack="on").run(DURATION)
    monkeypatch.setattr(manager, "deadline_slack_s", lambda cluster, beat_period: -0.03)
    with pytest.raises(Violation, match="suspected .* although a beat of it arrived"):
        for seed in range(10):
            World(seed, 2, slack="on").run(DURATION)
