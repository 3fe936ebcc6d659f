"""The committed snapshot of the previous release (tests/fixtures/appliance-33b2f38.tar.xz,
the rolling-upgrade test's fallback in a shallow clone) is that release: the files git
has for commit 33b2f38 when the history is there, and in any case a heartbeat module with
the exact-version check that the wire-version rule replaced."""

from __future__ import annotations

import hashlib
import tarfile

from tests.support import old_release


def _digest(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_fixture_is_the_old_release(tmp_path, monkeypatch):
    """Unpacked from the fixture: the old heartbeat (VERSION 1, exact match) and peer
    link (hello without a version); identical to git's tree of the commit if present."""
    assert old_release.FIXTURE.stat().st_size < 500_000
    monkeypatch.setenv("APPLIANCE_OLD_RELEASE", "fixture")
    assert old_release.unpack_old_release(tmp_path / "fx") == "fixture"
    hb = (tmp_path / "fx" / "appliance" / "cluster" / "heartbeat.py").read_text()
    assert "VERSION = 1\n" in hb and "if version != VERSION:" in hb
    pl = (tmp_path / "fx" / "appliance" / "cluster" / "peerlink.py").read_text()
    assert '"inc": self.link.incarnation})' in pl
    assert (tmp_path / "fx" / "twisted" / "plugins" / "appliance_plugin.py").exists()
    if old_release.have_commit():
        monkeypatch.delenv("APPLIANCE_OLD_RELEASE")
        assert old_release.unpack_old_release(tmp_path / "git") == "git"
        assert _digest(tmp_path / "git") == _digest(tmp_path / "fx")
    with tarfile.open(old_release.FIXTURE, "r:xz") as tar:
        assert all(not m.name.startswith(("/", "..")) for m in tar.getmembers())
