"""A second heartbeat path per peer (``addresses``), on the simulator's network:
beats go out on every path and count from any; a peer is suspected only when
every path is silent; each path's loss shows in cluster.status."""

from __future__ import annotations

from appliance.config import ConfigError, config_from_string
from tests.sim.world import World

import pytest


def _settle(w, seconds):
    out = []
    for _ in range(int(round(seconds / 0.01))):
        w.clock.advance(0.01)
        out.append(tuple(w.owners()))
    return out


def _world(paths):
    w = World(seed=3, n_nodes=2, preempt=True, paths=paths)
    for nid in w.ids:
        w.start(nid)
    assert _settle(w, 1.5)[-1] == ("a",)
    return w


def test_one_path_down_is_no_suspicion_and_shows_in_status():
    w = _world(paths=2)
    w.net.cut_paths.add(0)
    samples = _settle(w, 3.0)
    assert all(s == ("a",) for s in samples)
    b = w.nodes["b"].manager
    assert b.peers["a"].alive and b.peers["a"].suspected == 0
    paths = b.status()["peers"]["a"]["paths"]
    assert set(paths) == {"10.0.0.1", "10.0.1.1"}
    assert paths["10.0.0.1"]["last_seen_ms"] >= 2900          # silent since the cut
    assert paths["10.0.1.1"]["last_seen_ms"] < 100 and paths["10.0.1.1"]["lost"] == 0
    assert b.verifier.drops.get("replayed", 0) == 0          # copies are not replays
    from appliance.admin.ctl import render_cluster
    table = render_cluster(b.status())
    assert "paths: 10.0.0.1 loss" in table and "10.0.1.1 loss 0.0%" in table
    # the path comes back: its gap is counted as loss on that path only
    w.net.cut_paths.clear()
    _settle(w, 0.5)
    paths = b.status()["peers"]["a"]["paths"]
    assert paths["10.0.0.1"]["lost"] > 50 and paths["10.0.1.1"]["lost"] == 0
    assert b.status()["peers"]["a"]["lost"] == 0              # no beat lost on both


def test_both_paths_down_is_a_takeover():
    w = _world(paths=2)
    w.net.cut_paths.update({0, 1})
    assert _settle(w, 2.0)[-1] == ("a", "b")                  # no witness: both own
    assert w.nodes["b"].manager.peers["a"].suspected == 1


def test_a_single_path_down_is_a_takeover():
    """The same cut with one configured path: suspicion (what a second path avoids)."""
    w = _world(paths=1)
    w.net.cut_paths.add(0)
    assert _settle(w, 2.0)[-1] == ("a", "b")


_CFG = """
[node]
id = "a"
state_dir = "/tmp/x"
[cluster]
auth_key_file = "k"
peers = [{peer}]
"""


def test_config_addresses():
    c = config_from_string(_CFG.format(peer='{ id = "b", address = "10.9.0.2", '
                                            'addresses = ["10.9.1.2"] }'), "t.toml")
    assert [str(a) for a in c.cluster.peers[0].paths] == ["10.9.0.2", "10.9.1.2"]
    c = config_from_string(_CFG.format(peer='{ id = "b", addresses = ["10.9.0.2", "10.9.1.2"] }'),
                           "t.toml")
    assert str(c.cluster.peers[0].address) == "10.9.0.2"
    assert [str(a) for a in c.cluster.peers[0].paths] == ["10.9.0.2", "10.9.1.2"]
    with pytest.raises(ConfigError, match="more than once"):
        config_from_string(_CFG.format(peer='{ id = "b", address = "10.9.0.2", '
                                            'addresses = ["10.9.0.2"] }'), "t.toml")
    with pytest.raises(ConfigError, match="address"):
        config_from_string(_CFG.format(peer='{ id = "b" }'), "t.toml")


def test_path_copies_signed_with_the_previous_key_are_copies():
    """Key rotation with two paths: b still signs with the old key, which a
    accepts as its previous key.  The second path's copy of each beat is a path
    duplicate and counts on its path, not a replay (the old _path_copy decoded
    with the current key only: every copy went to the verifier as a replay and
    the paths' counters stood still)."""
    w = _world(paths=2)
    a = w.nodes["a"].manager
    new = b"n" * 32
    a._key = a.channel.key = a.channel.verifier.key = new       # a rotated first
    a.channel.verifier.previous_keys = (b"k" * 32,)
    b = w.nodes["b"].manager
    b.channel.verifier.previous_keys = (new,)                  # b accepts the new key
    before = dict(a.channel.paths["b"]["10.0.1.2"])
    samples = _settle(w, 1.0)
    assert all(s == ("a",) for s in samples)
    drops = a.verifier.drops
    assert drops.get("replayed", 0) == 0 and drops.get("reordered", 0) == 0, dict(drops)
    assert a.verifier.accepted_by_key["previous"] > 20
    assert a.channel.paths["b"]["10.0.1.2"]["received"] > before["received"] + 20
    assert a.stats.get("path_duplicates", 0) > 20
    assert b.verifier.drops.get("replayed", 0) == 0
    assert a.peers["b"].suspected == b.peers["a"].suspected == 0
