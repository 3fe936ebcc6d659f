"""`appliancectl cluster`: heartbeat loss/jitter per peer, the detection threshold and
the warning about automatic partner-down without a witness."""

from __future__ import annotations

from appliance.admin import ctl


def test_cluster_table_shows_loss_jitter_and_warnings():
    """Loss (from sequence gaps) and jitter are columns; warnings lead the output."""
    status = {"node": "a", "heartbeat_interval_ms": 100, "maintenance": False, "health": [],
              "heartbeat": {"beats_per_interval": 3, "deadline_ms": 316.7},
              "warnings": ["auto_partner_down_s = 10 without a witness or client evidence"],
              "peers": {"b": {"alive": True, "last_seen_ms": 12, "state": "NORMAL", "health": [],
                              "loss": 0.1034, "jitter_ms": 1.25, "suspected": 0, "skew_s": 0.001}},
              "resources": {"vip1": {"owner": "a", "epoch": 3, "role": "owner", "kind": "vip",
                                     "since_s": 5, "reason": "election",
                                     "vip_error": "add failed 2x; retry in 2s"}}}
    text = ctl.render_cluster(status)
    assert "3 beats/interval, suspect after 316.7 ms" in text
    assert "WARNING: auto_partner_down_s = 10" in text
    header = next(line for line in text.splitlines() if line.startswith("PEER"))
    assert "LOSS" in header and "JITTER_MS" in header and "SUSPECTED" in header
    row = next(line for line in text.splitlines() if line.startswith("b "))
    assert "10.3%" in row and "1.25" in row
    assert "VIP: add failed 2x" in text


def test_cluster_header_shows_quorum_and_witness_vote():
    """With a witness the header says whether this node has quorum and whom it backs."""
    base = {"node": "a", "heartbeat_interval_ms": 100, "peers": {}, "resources": {}}
    text = ctl.render_cluster({**base, "quorum": {"has": True, "witness": "w",
                                                  "witness_vote": "a"}})
    assert "quorum:" in text and "witness w backs a" in text
    text = ctl.render_cluster({**base, "quorum": {"role": "witness", "vote": "b"}})
    assert "role:" in text and "vote:" in text and "b" in text
