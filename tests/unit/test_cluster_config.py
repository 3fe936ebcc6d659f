"""[cluster] parsing: safe defaults (no automatic partner-down), sub-beats, witness."""

from __future__ import annotations

import pytest

from appliance.config import ConfigError, config_from_string

BASE = """
[node]
id = "a"
state_dir = "/tmp/apl-cfg"

[cluster]
peers = [{ id = "b", address = "10.9.0.2" }]
auth_key_file = "etc/cluster.key"
"""


def parse(extra=""):
    return config_from_string(BASE + extra, "etc/test.toml", {})


def test_defaults_operator_only_partner_down_and_three_beats():
    """H5: automatic partner-down is off unless configured; 3 beats per interval."""
    c = parse().cluster
    assert c.auto_partner_down_s == 0
    assert c.beats_per_interval == 3
    assert c.role == "node" and c.witness is None


def test_witness_table_and_witness_role():
    """[cluster.witness] names the witness; a witness node itself has role = "witness"."""
    c = parse('witness = { id = "w", address = "10.9.0.9" }\n').cluster
    assert c.witness.id == "w" and str(c.witness.address) == "10.9.0.9"
    assert parse('role = "witness"\n').cluster.role == "witness"
    with pytest.raises(ConfigError) as bad:
        parse('witness = { id = "b", address = "10.9.0.9" }\n')
    assert any("also listed in peers" in p for p in bad.value.problems)
