"""appliancectl bindings: sip.bindings as a table with relative expiry."""

from __future__ import annotations

import time

from appliance.admin import ctl


def test_render_bindings_table():
    """One row per contact; expiry shown relative to now; an empty list says so."""
    text = ctl.render_bindings({"bindings": [
        {"aor": "sip:a@example.test", "contact": "sip:a@10.0.0.1", "expires": time.time() + 125,
         "q": 0.5, "call_id": "c1", "cseq": 3, "path": ["<sip:edge;lr>"],
         "received": "udp:10.0.0.1:5060"}]})
    header, row = text.splitlines()
    assert header.split() == ["AOR", "CONTACT", "EXPIRES", "Q", "CALL_ID", "CSEQ", "PATH",
                              "RECEIVED"]
    assert "sip:a@10.0.0.1" in row and "in 2m" in row and "<sip:edge;lr>" in row
    assert ctl.render_bindings({"bindings": []}) == "(no bindings)"
    assert ctl.COMMANDS["bindings"][3] is ctl.render_bindings


def test_render_shards_table():
    """appliancectl shards: one row per shard with owner, backup, bindings and backlog."""
    text = ctl.render_shards({"node": "a", "count": 2, "shards": [
        {"shard": 0, "resource": "sip:shard0", "owner": "a", "backup": "b", "role": "owner",
         "epoch": 3, "bindings": 12, "backlog": {"b": 2}},
        {"shard": 1, "resource": "sip:shard1", "owner": "b", "backup": "a", "role": "backup",
         "epoch": 1, "bindings": 9, "backlog": {"b": 0}}]})
    header, first, second = text.splitlines()
    assert header.split() == ["SHARD", "RESOURCE", "OWNER", "BACKUP", "HERE", "BINDINGS",
                              "BACKLOG"]
    assert first.split() == ["0", "sip:shard0", "a", "b", "owner", "12", "b=2"]
    assert ctl.COMMANDS["shards"][1](None) == "sip.shards"
    assert ctl.render_shards({"shards": []}) == "(no shards)"
