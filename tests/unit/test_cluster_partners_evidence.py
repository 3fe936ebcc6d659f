"""Automatic partner-down only with evidence (issue 11 deliver 2, review H5): without a
witness, heartbeat silence alone never makes PARTNER-DOWN; the partner's clients
retransmitting unanswered (``report_client_evidence``, Kea's max-unacked-clients) at
``partner_down_min_clients`` or more after ``auto_partner_down_s`` of silence do, and
that PARTNER-DOWN is confirmed."""

from __future__ import annotations

import dataclasses

import pytest

from appliance.cluster import partner as P
from appliance.config import config_from_string
from tests.unit.test_cluster_manager import ADDR, make_pair, run, start, tmp_state  # noqa: F401


def _pair(auto_pd=1.0, min_clients=None):
    clock, net, nodes = make_pair(auto_pd=auto_pd)
    heard = []
    for n, m in nodes.items():
        if min_clients is not None:
            m.cfg = dataclasses.replace(m.cfg, partner_down_min_clients=min_clients)
        other = "b" if n == "a" else "a"
        m.register_partner(other, lambda peer, state, reason, m=m, n=n: heard.append(
            (n, state, reason, m.partner_confirmed(peer))), primary=(n == "a"))
    start(clock, nodes)
    run(clock, 1.0)
    assert nodes["b"].partners["a"].fsm.state == P.NORMAL
    return clock, net, nodes, heard


def _state(nodes):
    return nodes["b"].partners["a"].fsm.state


def test_silence_alone_never_makes_partner_down():
    """auto_partner_down_s = 1 without a witness: a partition (both sides silent to each
    other) stays COMMUNICATIONS-INTERRUPTED on both sides (the old code went
    PARTNER-DOWN on both after 1 s)."""
    clock, net, nodes, heard = _pair()
    net.cut.add(ADDR["a"])
    run(clock, 10.0)
    assert _state(nodes) == P.COMM_INTERRUPTED
    assert nodes["a"].partners["b"].fsm.state == P.COMM_INTERRUPTED
    warnings = nodes["b"].status()["warnings"]
    assert any("client evidence" in w and "auto_partner_down_s = 1" in w for w in warnings)


def test_client_evidence_after_auto_partner_down_s_is_a_confirmed_partner_down():
    clock, net, nodes, heard = _pair()
    b = nodes["b"]
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    assert _state(nodes) == P.COMM_INTERRUPTED
    b.report_client_evidence("a", 12)
    run(clock, 0.3)
    assert _state(nodes) == P.COMM_INTERRUPTED, "not before auto_partner_down_s of silence"
    run(clock, 1.0)
    assert _state(nodes) == P.PARTNER_DOWN
    assert b.partner_confirmed("a")
    n, state, reason, confirmed = heard[-1]
    assert (n, state, confirmed) == ("b", P.PARTNER_DOWN, True)
    assert "auto_partner_down_s" in reason and "12 clients" in reason
    peer = b.status()["peers"]["a"]
    assert peer["partner_confirmed"] and "client evidence" in peer["partner_confirmed_by"]
    assert peer["unanswered_clients"] == 12


def test_too_little_evidence_or_auto_off_is_not_enough():
    clock, net, nodes, heard = _pair()
    net.cut.add(ADDR["a"])
    nodes["b"].report_client_evidence("a", 9)
    run(clock, 5.0)
    assert _state(nodes) == P.COMM_INTERRUPTED
    nodes["b"].report_client_evidence("a", 10)
    run(clock, 0.1)
    assert _state(nodes) == P.PARTNER_DOWN

    clock, net, nodes, heard = _pair(min_clients=3)
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    nodes["b"].report_client_evidence("a", 3)
    run(clock, 2.0)
    assert _state(nodes) == P.PARTNER_DOWN

    clock, net, nodes, heard = _pair(auto_pd=0.0)
    net.cut.add(ADDR["a"])
    run(clock, 0.5)
    nodes["b"].report_client_evidence("a", 1000)
    run(clock, 10.0)
    assert _state(nodes) == P.COMM_INTERRUPTED, "auto_partner_down_s = 0: operator only"
    assert not nodes["b"].status()["warnings"]


def test_evidence_is_cleared_when_the_partner_answers_again():
    clock, net, nodes, heard = _pair()
    b = nodes["b"]
    b.report_client_evidence("a", 50)
    run(clock, 0.5)
    assert "a" not in b.partnerships.evidence, "a heard with the relationship: refuted"
    net.cut.add(ADDR["a"])
    run(clock, 5.0)
    assert _state(nodes) == P.COMM_INTERRUPTED
    b.report_client_evidence("a", 0)
    b.report_client_evidence("nobody", 50)        # unknown peer: ignored
    run(clock, 1.0)
    assert _state(nodes) == P.COMM_INTERRUPTED


def test_with_a_witness_only_quorum_confirms(monkeypatch):
    """A node with a witness but without quorum never goes PARTNER-DOWN by itself,
    whatever the client evidence (the other side may hold quorum and do the same)."""
    clock, net, nodes, heard = _pair()
    b = nodes["b"]
    net.cut.add(ADDR["a"])
    b.witness_id = "w"
    monkeypatch.setattr(b, "has_quorum", lambda: False)
    run(clock, 0.5)
    b.report_client_evidence("a", 100)
    run(clock, 5.0)
    assert _state(nodes) == P.COMM_INTERRUPTED
    assert b.partnerships.confirmation("a") is None
    monkeypatch.setattr(b, "has_quorum", lambda: True)
    assert b.partnerships.confirmation("a") == "witness w quorum"


@pytest.mark.parametrize("text,expect", [("", 10), ("partner_down_min_clients = 3\n", 3)])
def test_partner_down_min_clients_config(text, expect):
    base = ('[node]\nid = "a"\nstate_dir = "/tmp/apl-cfg"\n\n[cluster]\n'
            'peers = [{ id = "b", address = "10.9.0.2" }]\nauth_key_file = "etc/cluster.key"\n')
    assert config_from_string(base + text, "t.toml", {}).cluster.partner_down_min_clients == expect


def test_cluster_table_notes_link_and_evidence():
    from appliance.admin import ctl
    status = {"node": "b", "heartbeat_interval_ms": 100, "resources": {},
              "warnings": ["auto_partner_down_s = 1 without a witness: automatic partner-down "
                           "then depends on client evidence only"],
              "peers": {"a": {"alive": True, "state": "PARTNER-DOWN", "partner_confirmed": True,
                              "partner_confirmed_by": "client evidence: 12 clients of a",
                              "partner_link": "down", "unanswered_clients": 12, "health": []}}}
    text = ctl.render_cluster(status)
    assert "WARNING: auto_partner_down_s = 1 without a witness" in text
    row = next(line for line in text.splitlines() if line.startswith("a "))
    assert "peer link down" in row and "12 of its clients unanswered" in row
