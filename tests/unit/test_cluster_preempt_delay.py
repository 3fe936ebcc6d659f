"""preempt_delay_s (keepalived's preempt_delay; review M13): a node that starts or
becomes able again waits before taking a resource back from a live peer, and takes
one nobody holds at once."""

from __future__ import annotations

import pytest

from tests.unit.test_cluster_manager import ADDR, make_node, make_pair, owners, start

DELAY = 2.0


@pytest.fixture(autouse=True)
def incarnations(monkeypatch):
    monkeypatch.setattr("appliance.cluster.manager.next_incarnation",
                        lambda d, c=iter(range(1, 10**6)): next(c))


def samples(clock, nodes, seconds, step=0.01):
    out = []
    for _ in range(int(seconds / step)):
        clock.advance(step)
        out.append(tuple(owners(nodes)))
    return out


def restart_a(clock, net, nodes, delay=DELAY):
    old = nodes["a"]
    old.stopService()                       # orderly: b takes over at once
    net.ports.pop(ADDR["a"], None)
    samples(clock, nodes, 0.5)
    assert owners(nodes) == ["b"]
    a = nodes["a"] = make_node(clock, net, "a", store=old.store)
    a.preempt_delay_s = delay
    a.startService()
    return a


def test_returning_node_waits_before_preempting_then_takes_back():
    clock, net, nodes = make_pair()
    start(clock, nodes)
    samples(clock, nodes, 1.0)
    assert owners(nodes) == ["a"]
    a = restart_a(clock, net, nodes)
    waiting = samples(clock, nodes, DELAY)          # start hold + most of the delay
    assert set(waiting) == {("b",)}, "a must not preempt b during preempt_delay_s"
    assert "settling" in nodes["b"].peers["a"].heartbeat.health
    after = samples(clock, nodes, 1.0)
    assert all(len(s) <= 1 for s in after)
    assert after[-1] == ("a",)
    assert "settling" not in a.health_flags()
    assert a.roles[-1][0] == "owner"


def test_settling_node_takes_a_resource_nobody_holds_at_once():
    """b is dead: the returning a does not wait out the delay (only the start hold)."""
    clock, net, nodes = make_pair()
    start(clock, nodes)
    samples(clock, nodes, 1.0)
    a = restart_a(clock, net, nodes, delay=30.0)
    nodes["b"].stopService()
    net.ports.pop(ADDR["b"], None)
    got = samples(clock, nodes, 1.5)
    assert got[-1] == ("a",)
    assert "settling" in a.health_flags()


def test_without_preempt_delay_the_return_preempts_at_once():
    """The control: with 0 (the default) a takes it back right after its start hold."""
    clock, net, nodes = make_pair()
    start(clock, nodes)
    samples(clock, nodes, 1.0)
    restart_a(clock, net, nodes, delay=0.0)
    got = samples(clock, nodes, 1.0)
    assert got[-1] == ("a",)


def test_leaving_maintenance_settles_too():
    clock, net, nodes = make_pair()
    for m in nodes.values():
        m.preempt_delay_s = DELAY
    start(clock, nodes)
    samples(clock, nodes, DELAY + 1.0)              # both settled at start; a owns
    assert owners(nodes) == ["a"]
    a = nodes["a"]
    from appliance.cluster.transport import MaintenanceMark
    import tempfile
    a.maintenance_mark = MaintenanceMark(tempfile.mkdtemp(prefix="apl-pd-"))
    a.set_maintenance(True)
    samples(clock, nodes, 0.5)
    assert owners(nodes) == ["b"]
    a.set_maintenance(False)
    waiting = samples(clock, nodes, DELAY - 0.2)
    assert set(waiting) == {("b",)}
    after = samples(clock, nodes, 1.0)
    assert all(len(s) <= 1 for s in after)
    assert after[-1] == ("a",)


def test_operator_promote_is_not_delayed():
    clock, net, nodes = make_pair()
    start(clock, nodes)
    samples(clock, nodes, 1.0)
    a = restart_a(clock, net, nodes, delay=30.0)
    samples(clock, nodes, 1.0)
    assert owners(nodes) == ["b"]
    a.promote("vip1")
    got = samples(clock, nodes, 0.5)
    assert all(len(s) <= 1 for s in got)
    assert got[-1] == ("a",)


def test_config():
    from appliance.config import ConfigError, config_from_string
    base = ('[node]\nid = "a"\nstate_dir = "/tmp/apl-cfg"\n\n[cluster]\n'
            'auth_key_file = "/dev/null"\npeers = [{ id = "b", address = "10.0.0.2" }]\n')
    assert config_from_string(base, "t.toml", {}).cluster.preempt_delay_s == 0.0
    cfg = config_from_string(base + "preempt_delay_s = 5\n", "t.toml", {})
    assert cfg.cluster.preempt_delay_s == 5.0
    with pytest.raises(ConfigError, match="preempt_delay_s"):
        config_from_string(base + "preempt_delay_s = -1\n", "t.toml", {})
