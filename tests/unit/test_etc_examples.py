"""Every sample config shipped in etc/ is valid (the docs say they run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_config

ETC = Path(__file__).resolve().parents[2] / "etc"
SAMPLES = sorted(p for p in ETC.rglob("*.toml") if "keys" not in p.parts)


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: str(p.relative_to(ETC)))
def test_sample_config_is_valid(path):
    """load_config accepts the sample with the installed service plugins."""
    cfg = load_config(path)
    assert cfg.node.id


def test_demo_is_loopback_only():
    """The demo binds nothing but loopback (it must run on a machine with no spare NIC)."""
    cfg = load_config(ETC / "appliance.toml")
    assert "interface=127.0.0.1" in cfg.admin.listen
    assert cfg.cluster is None and not cfg.vips
    for entry in cfg.enabled_services():
        if hasattr(entry.config, "interface"):
            assert entry.config.interface is None, f"{entry.name} must not bind a NIC in the demo"
        listen = getattr(entry.config, "listen_address", None)
        assert listen is None or listen.is_loopback, entry.name
