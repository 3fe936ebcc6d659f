"""Backup of a running node, restore into a fresh directory, the restored node
starts and its store holds what was written before the backup (and not what
came after)."""

from __future__ import annotations

import subprocess
import sys

from tests.support.node_process import NodeProcess, env_with_dropins, free_port, stored_string


def ctl(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.admin.ctl", *args],
                          capture_output=True, text=True, timeout=60, env=env_with_dropins(),
                          cwd=cwd)


def test_backup_of_a_running_node_restores_and_starts(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    node = NodeProcess(src, '[services.testecho]\nmessage = "hi"\n', node_id="a")
    node.start()
    try:
        assert node.rpc("testecho.put", {"key": "before", "value": "1"})["result"] is True
        archive = tmp_path / "backup.tar.gz"
        r = ctl("--config", str(node.config), "backup", str(archive), cwd=src)   # online
        assert r.returncode == 0, r.stderr
        assert node.rpc("testecho.put", {"key": "after", "value": "2"})["result"] is True
    finally:
        node.terminate()
    dst = tmp_path / "dst"
    r = ctl("restore", str(archive), "--dir", str(dst / "etc"), "--state-dir",
            str(dst / "state"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    restored_cfg = dst / "etc" / "node.toml"
    assert str(src) not in restored_cfg.read_text()        # every path points at dst
    # start the restored node from its restored config (a NodeProcess with that file)
    again = NodeProcess(dst, "", node_id="a")
    again.config = restored_cfg
    again.state_dir = dst / "state"
    again.token_file = dst / "state" / "admin.token"
    # a fresh admin port: the old one may have been taken since (a busy test box)
    text = restored_cfg.read_text()
    old_port = text.split('listen = "tcp:')[1].split(":")[0]
    again.port = free_port()
    restored_cfg.write_text(text.replace(f'listen = "tcp:{old_port}:', f'listen = "tcp:{again.port}:'))
    again.start()
    try:
        status = again.rpc("system.status")["result"]
        assert status["services"]["testecho"]["state"] == "running", status
        assert status["store"]["healthy"] and status["store"]["keys"] >= 2, status
    finally:
        again.terminate()
    assert stored_string(dst / "state", "testecho:before") == "1"
    assert stored_string(dst / "state", "testecho:after") is None
