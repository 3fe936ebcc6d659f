"""[cluster] pre_takeover (review M13, fencing): a node claims a resource from
a peer it judged dead only after the fence command confirmed (exit 0 within
timeout_s); a failed or timed-out fence means no takeover, logged and retried."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import pytest_twisted
from twisted.internet import defer

from appliance.cluster.fencing import FenceFailed, Fencer, spawn_fence
from appliance.config import ConfigError, PreTakeover
from tests.unit.test_cluster_manager import ADDR, make_pair, owners, run, start  # noqa: F401
from tests.unit.test_cluster_config import parse
from tests.unit.test_cluster_manager import tmp_state  # noqa: F401 (autouse fixture)

def problems(extra):
    with pytest.raises(ConfigError) as bad:
        parse(extra)
    return bad.value.problems


# -- config -------------------------------------------------------------------------
def test_pre_takeover_parsed_and_off_by_default():
    assert parse().cluster.pre_takeover is None
    c = parse('pre_takeover = { command = ["/usr/local/sbin/fence", "--hard"], '
              'timeout_s = 2.5 }\n').cluster
    assert c.pre_takeover == PreTakeover(("/usr/local/sbin/fence", "--hard"), 2.5)
    assert parse('pre_takeover = { command = ["/bin/true"] }\n').cluster.pre_takeover.timeout_s == 10


@pytest.mark.parametrize("extra, path, words", [
    ('pre_takeover = { command = ["fence"] }\n', "cluster.pre_takeover.command[0]",
     "not an absolute path"),
    ('pre_takeover = { command = [] }\n', "cluster.pre_takeover.command", "at least 1"),
    ('pre_takeover = { command = ["/bin/fence", 3] }\n', "cluster.pre_takeover.command[1]",
     "non-empty string"),
    ('pre_takeover = { command = ["/bin/true"], timeout_s = 0 }\n',
     "cluster.pre_takeover.timeout_s", ""),
    ('pre_takeover = { command = ["/bin/true"], timeout = 3 }\n', "cluster.pre_takeover.timeout",
     "unknown key"),
    ('pre_takeover = "/bin/true"\n', "cluster.pre_takeover", "expected a table"),
    ('role = "witness"\npre_takeover = { command = ["/bin/true"] }\n', "cluster.pre_takeover",
     "witness"),
])
def test_pre_takeover_errors_name_the_key_path(extra, path, words):
    found = [p for p in problems(extra) if f" {path}: " in p]
    assert found, problems(extra)
    assert words in found[0]


# -- the takeover waits for the fence -------------------------------------------------
class FakeFence:
    """Records every fence; each returns a Deferred the test fires."""

    def __init__(self):
        self.calls: list[tuple[list[str], dict, float]] = []
        self.pending: list[defer.Deferred] = []

    def __call__(self, argv, env, timeout):
        self.calls.append((argv, env, timeout))
        d = defer.Deferred()
        self.pending.append(d)
        return d


def fenced_pair(fence, state=None):
    clock, net, nodes = make_pair()
    for m in nodes.values():
        if state is not None:       # a maintenance mark must not outlive the test
            from appliance.cluster.transport import MaintenanceMark
            m.state_dir = state / m.node_id
            m.state_dir.mkdir()
            m.maintenance_mark = MaintenanceMark(m.state_dir)
        m.fencer = Fencer(m.clock, m.node_id, ["/usr/sbin/fence", "-x"], 5.0, run=fence,
                          on_change=m.changed)
    return clock, net, nodes


def test_no_takeover_until_the_fence_confirms():
    fence = FakeFence()
    clock, net, nodes = fenced_pair(fence)
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"] and fence.calls == []     # nothing fenced while a lives
    net.cut.add(ADDR["a"])
    run(clock, 1.0)
    assert nodes["b"].role("vip1") == "standby", "claimed before the fence confirmed"
    assert len(fence.calls) == 1, "one fence per death, not one per tick"
    argv, env, timeout = fence.calls[0]
    assert argv == ["/usr/sbin/fence", "-x", "a", "vip1"] and timeout == 5.0
    assert env == {"APPLIANCE_NODE": "b", "APPLIANCE_PEER": "a", "APPLIANCE_RESOURCE": "vip1"}
    assert nodes["b"].status()["fencing"]["peers"]["a"]["state"] == "running"
    t = clock.seconds()
    fence.pending[0].callback("ok")
    run(clock, 0.02)
    assert nodes["b"].role("vip1") == "owner"
    assert clock.seconds() - t < 0.05, "the takeover follows the fence at once"
    assert nodes["b"].status()["fencing"]["fences"] == 1


def test_failed_fence_means_no_takeover_and_is_retried_with_backoff():
    fence = FakeFence()
    clock, net, nodes = fenced_pair(fence)
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    assert len(fence.calls) == 1
    fence.pending[0].errback(FenceFailed("exit status 1: power switch unreachable"))
    run(clock, 0.9)
    st = nodes["b"].status()
    assert nodes["b"].role("vip1") == "standby"
    assert st["fencing"]["peers"]["a"]["state"] == "failed"
    assert "power switch unreachable" in st["fencing"]["peers"]["a"]["error"]
    assert any("fencing a failed" in w for w in st["warnings"])
    assert len(fence.calls) == 1, "retried only after the backoff (1 s)"
    run(clock, 0.2)
    assert len(fence.calls) == 2, "retried after 1 s"
    fence.pending[1].errback(FenceFailed("timed out after 5 s (killed)"))
    run(clock, 1.9)
    assert len(fence.calls) == 2, "second retry after 2 s"
    run(clock, 0.2)
    assert len(fence.calls) == 3
    fence.pending[2].callback("")
    run(clock, 0.05)
    assert nodes["b"].role("vip1") == "owner"   # (a, cut off, is what the fence powers off)


def test_a_peer_heard_again_needs_a_new_fence_and_a_late_result_does_not_count():
    fence = FakeFence()
    clock, net, nodes = fenced_pair(fence)
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    net.cut.discard(ADDR["a"])       # a was only slow: heard again before the fence ended
    run(clock, 0.5)
    fence.pending[0].callback("")    # too late: a fence of a node now alive
    run(clock, 0.2)
    assert owners(nodes) == ["a"]
    assert "a" not in nodes["b"].fencer.peers
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    assert len(fence.calls) == 2 and nodes["b"].role("vip1") == "standby"
    fence.pending[1].callback("")
    run(clock, 0.05)
    assert nodes["b"].role("vip1") == "owner"


def test_no_fence_without_a_dead_previous_owner(tmp_path):
    """A resource nobody held (first election) or handed over by a live
    peer (maintenance) needs no fence."""
    fence = FakeFence()
    clock, net, nodes = fenced_pair(fence, tmp_path)
    start(clock, nodes)
    run(clock, 1.0)
    nodes["a"].set_maintenance(True)
    run(clock, 0.5)
    assert owners(nodes) == ["b"] and fence.calls == []


def test_without_pre_takeover_the_takeover_is_unchanged():
    clock, net, nodes = make_pair()
    assert nodes["b"].fencer is None and nodes["b"].status()["fencing"] is None
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 0.4)
    assert nodes["b"].role("vip1") == "owner"


def test_manager_builds_the_fencer_from_the_config():
    from tests.unit.test_cluster_manager import make_node, Net
    from twisted.internet.task import Clock
    import appliance.cluster.manager as M
    clock = Clock()
    m = make_node(clock, Net(clock), "b")
    cfg = dataclasses.replace(m.cfg, pre_takeover=PreTakeover(("/bin/fence",), 3.0))
    m2 = M.ClusterManager(m.reactor, node_id="b", cluster=cfg, key=b"s" * 32)
    assert m2.fencer is not None and m2.fencer.command == ["/bin/fence"]
    assert m2.fencer.timeout_s == 3.0


# -- the real child process ---------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_spawn_fence_exit_status_timeout_and_missing_command():
    from twisted.internet import reactor
    ok = await spawn_fence(reactor, reactor, [sys.executable, "-c", "print('fenced')"], {}, 10)
    assert ok == "fenced"
    env = await spawn_fence(reactor, reactor, [sys.executable, "-c",
                                               "import os; print(os.environ['APPLIANCE_PEER'])"],
                            {"APPLIANCE_PEER": "a"}, 10)
    assert env == "a"
    with pytest.raises(FenceFailed, match="exit status 3: no power"):
        await spawn_fence(reactor, reactor, [sys.executable, "-c",
                                             "import sys; print('no power'); sys.exit(3)"], {}, 10)
    with pytest.raises(FenceFailed, match="timed out after 0.3 s"):
        await spawn_fence(reactor, reactor, [sys.executable, "-c", "import time; time.sleep(30)"],
                          {}, 0.3)
    with pytest.raises(FenceFailed):
        await spawn_fence(reactor, reactor, ["/nonexistent/fence-peer"], {}, 10)
