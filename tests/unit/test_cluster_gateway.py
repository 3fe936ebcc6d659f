"""[cluster] track_gateway (review M13: a gateway health flag): a node whose
gateway stops answering advertises gateway_down and its resources move to a
peer that reaches it; back after `rise` good pings."""

from __future__ import annotations

import ipaddress

import pytest
import pytest_twisted
from twisted.internet import defer

from appliance.cluster.gateway import FLAG, GatewayCheck, spawn_ping
from appliance.config import ConfigError, GatewayTrack
from tests.unit.test_cluster_manager import make_pair, run, start
from tests.unit.test_cluster_config import parse
from tests.unit.test_cluster_manager import tmp_state  # noqa: F401 (autouse fixture)

def test_config_defaults_and_key_path_errors():
    assert parse().cluster.track_gateway is None
    g = parse('track_gateway = { address = "10.9.0.254" }\n').cluster.track_gateway
    assert g == GatewayTrack(ipaddress.ip_address("10.9.0.254"), 1.0, 1.0, 3, 2)
    for extra, path in [('track_gateway = { address = "nope" }\n', "cluster.track_gateway.address"),
                        ('track_gateway = { }\n', "cluster.track_gateway.address"),
                        ('track_gateway = { address = "10.9.0.254", fall = 0 }\n',
                         "cluster.track_gateway.fall"),
                        ('track_gateway = { address = "10.9.0.254", every = 2 }\n',
                         "cluster.track_gateway.every"),
                        ('role = "witness"\ntrack_gateway = { address = "10.9.0.254" }\n',
                         "cluster.track_gateway")]:
        with pytest.raises(ConfigError) as bad:
            parse(extra)
        assert any(f" {path}: " in p for p in bad.value.problems), bad.value.problems


class Gateway:
    """Which nodes reach the gateway right now."""

    def __init__(self):
        self.reachable = {"a": True, "b": True}

    def probe_for(self, node):
        return lambda address, timeout: defer.succeed(self.reachable[node])


def gateway_pair():
    clock, net, nodes = make_pair()
    gw = Gateway()
    for me, m in nodes.items():
        m.gateway = GatewayCheck(m.clock, m.health, "10.0.0.254", interval_s=0.5, fall=3, rise=2,
                                 probe=gw.probe_for(me))
    return clock, net, nodes, gw


def test_gateway_loss_moves_the_vip_and_it_comes_back():
    clock, net, nodes, gw = gateway_pair()
    start(clock, nodes)
    run(clock, 1.5)
    assert nodes["a"].role("vip1") == "owner"
    gw.reachable["a"] = False
    run(clock, 0.9)                  # 2 failed pings: not yet (fall = 3)
    assert FLAG not in nodes["a"].health_flags() and nodes["a"].role("vip1") == "owner"
    run(clock, 0.6)
    assert FLAG in nodes["a"].health_flags()
    run(clock, 0.2)
    assert nodes["b"].role("vip1") == "owner" and nodes["a"].role("vip1") == "standby"
    st = nodes["a"].status()["gateway"]
    assert st["down"] is True and st["failures_in_a_row"] >= 3
    gw.reachable["a"] = True
    run(clock, 0.6)                  # 1 good ping: still down (rise = 2)
    assert FLAG in nodes["a"].health_flags()
    run(clock, 0.6)
    assert FLAG not in nodes["a"].health_flags()
    run(clock, 0.3)
    assert nodes["a"].role("vip1") == "owner", "preempt: a takes it back"
    assert nodes["b"].role("vip1") == "standby"


def test_both_gateways_lost_keeps_one_owner():
    clock, net, nodes, gw = gateway_pair()
    start(clock, nodes)
    run(clock, 1.5)
    gw.reachable.update(a=False, b=False)
    run(clock, 3.0)
    owners = [n for n in "ab" if nodes[n].role("vip1") == "owner"]
    assert owners == ["a"], "nobody reaches it: a degraded owner rather than none"


def test_without_track_gateway_no_check():
    clock, net, nodes = make_pair()
    assert nodes["a"].gateway is None and nodes["a"].status()["gateway"] is None


@pytest_twisted.ensureDeferred
async def test_spawn_ping_real():
    from twisted.internet import reactor
    assert await spawn_ping(reactor, "127.0.0.1", 1) is True
    # no route (and no network needed): fails at once
    assert await spawn_ping(reactor, "0.0.0.1", 1) is False


def test_a_ping_that_cannot_run_counts_as_no_answer():
    """A probe that fails (ping missing, spawn error) is a failed check, logged; after
    ``fall`` of them the flag is set and the checks go on (no stuck 'busy' state)."""
    from twisted.internet.task import Clock

    class Health:
        def __init__(self):
            self.flags_set, self.changes = set(), 0

        def changed(self):
            self.changes += 1

    clock, health = Clock(), Health()
    g = GatewayCheck(clock, health, "10.0.0.254", interval_s=0.5, fall=2, rise=1,
                     probe=lambda addr, timeout: defer.fail(OSError("no ping binary")))
    g.start()
    for _ in range(6):
        clock.advance(0.5)
    assert g.checks >= 4 and g.last_ok is False
    assert FLAG in health.flags_set and health.changes >= 1
    g.stop()
