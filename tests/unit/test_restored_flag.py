"""The restored flag (issue 17): restore marks the services with a partner (dhcp4/dhcp6
failover, sip replication) as having to rejoin through it; each clears its own entry
once NORMAL; the flag never goes into a backup."""

from __future__ import annotations

import io
import json
import tarfile

from appliance.admin.ctl import main as ctl_main
from appliance.backup import (RESTORED_FILE, backup, mark_restored, restore, restored,
                              restored_done)
from tests.unit.test_backup import node_dir  # noqa: F401  (the fixture)


def with_partners(cfg):
    cfg.write_text(cfg.read_text() + """
[services.dhcp4]
failover = { peer = "b", role = "primary" }

[services.sip]
domains = ["example.test"]

[services.sip.replication]
peers = ["b"]
""")


def test_restore_flags_every_partnered_service_and_each_clears_its_own(node_dir):  # noqa: F811
    """dhcp4 and sip are pending after the restore; dns (no partner) never is; the
    file goes when the last one is done."""
    tmp_path, cfg = node_dir
    with_partners(cfg)
    archive = tmp_path / "a.tar.gz"
    m = backup(str(cfg), archive)
    r = restore(archive, tmp_path / "r", state_dir=str(tmp_path / "rs"))
    state = tmp_path / "rs"
    assert r["restored_flag"] == (state / RESTORED_FILE).resolve()
    assert r["pending"] == ["dhcp4", "sip"]
    flag = restored(state)
    assert flag["pending"] == ["dhcp4", "sip"] and flag["backup_created"] == m["created"]
    assert flag["node_id"] == "a" and flag["restored_at"]
    assert restored(state, "dhcp4") and restored(state, "sip") and restored(state, "dns") is None
    assert restored_done(state, "dhcp4") is True
    assert restored(state, "dhcp4") is None and restored(state, "sip")
    assert restored_done(state, "dhcp4") is False
    assert restored_done(state, "sip") is True
    assert not (state / RESTORED_FILE).exists() and restored(state) is None


def test_no_partner_or_no_recover_means_no_flag(node_dir):  # noqa: F811
    """A node without partnered services, or a restore with --no-recover, is not flagged."""
    tmp_path, cfg = node_dir
    archive = tmp_path / "a.tar.gz"
    backup(str(cfg), archive)
    r = restore(archive, tmp_path / "r", state_dir=str(tmp_path / "rs"))
    assert r["restored_flag"] is None and restored(tmp_path / "rs") is None
    with_partners(cfg)
    backup(str(cfg), archive)
    r = restore(archive, tmp_path / "r2", state_dir=str(tmp_path / "rs2"), recover=False)
    assert r["restored_flag"] is None and restored(tmp_path / "rs2") is None


def test_the_flag_is_never_backed_up_and_an_unreadable_one_is_pending(node_dir):  # noqa: F811
    """A node backed up while still recovering does not carry the flag into the
    archive; a corrupt flag counts as pending for every service (the safe side)."""
    tmp_path, cfg = node_dir
    state = tmp_path / "state"
    mark_restored(state, services=["dhcp4"])
    archive = tmp_path / "a.tar.gz"
    backup(str(cfg), archive)
    names = tarfile.open(archive).getnames()
    assert f"state/{RESTORED_FILE}" not in names and "state/store.sqlite3" in names
    (state / RESTORED_FILE).write_text("{not json")
    assert restored(state, "dhcp4")["pending"] is None and restored(state, "sip")
    assert restored_done(state, "sip") is True and not (state / RESTORED_FILE).exists()


def test_ctl_restore_says_what_rejoins(node_dir):  # noqa: F811
    """appliancectl restore names the services that rejoin through their partner."""
    tmp_path, cfg = node_dir
    with_partners(cfg)
    archive = tmp_path / "a.tar.gz"
    backup(str(cfg), archive)
    out, err = io.StringIO(), io.StringIO()
    assert ctl_main(["restore", str(archive), "--dir", str(tmp_path / "r"), "--state-dir",
                     str(tmp_path / "rs")], stdout=out, stderr=err) == 0, err.getvalue()
    assert "restored flag set: dhcp4, sip rejoin through their partner" in out.getvalue()
    assert json.loads((tmp_path / "rs" / RESTORED_FILE).read_text())["pending"] == ["dhcp4", "sip"]
