"""A real ``twistd -n appliance`` process: plugins, status, failures, reload, shutdown."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from appliance import __version__
from tests.support.node_process import (NodeProcess, ROOT, env_with_dropins, stored_string,
                                        twistd_command)

SERVICES = """
[services.testecho]
message = "hi"

[services.testbroken]
reason = "no such interface eth9"
"""


@pytest.fixture
def node(tmp_path):
    n = NodeProcess(tmp_path, SERVICES)
    yield n
    n.kill()


def test_status_reports_store_and_services(node):
    """A failing service is reported `failed` with its reason; the others run."""
    node.start()
    result = node.rpc("system.status")["result"]
    assert result["node"] == "t1"
    assert result["version"] == __version__
    assert result["store"]["backend"] == "memory"
    assert result["store"]["healthy"] is True
    assert result["services"]["testecho"] == {"state": "running", "role": "active"}
    broken = result["services"]["testbroken"]
    assert broken["state"] == "failed"
    assert "no such interface eth9" in broken["reason"]
    # The plugin's own RPC method is reachable through the node's registry.
    assert node.rpc("testecho.ping", {"text": "x"})["result"] == {"message": "hi", "text": "x"}


def test_appliancectl_json_status(node):
    """`appliancectl --json status` prints node id, version, store and services."""
    node.start()
    out = node.ctl("--json", "status")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["node"] == "t1"
    assert status["store"]["backend"] == "memory" and status["store"]["healthy"] is True
    assert set(status["services"]) == {"testecho", "testbroken"}
    table = node.ctl("status")
    assert table.returncode == 0, table.stderr
    assert "testbroken" in table.stdout and "failed" in table.stdout


def test_sigterm_is_orderly_and_state_survives(node):
    """SIGTERM stops services, then admin, then flushes the store; exit 0; data kept."""
    node.start()
    assert node.rpc("system.status")["result"]["services"]["testecho"]["state"] == "running"
    code = node.terminate()
    log = node.output()
    # twistd re-raises the SIGTERM after an orderly shutdown (exit status -15),
    # as systemd expects; anything else would be a crash.
    assert code in (0, -15), log
    assert "node t1 stopped" in log
    assert "Traceback" not in log
    # The store's file holds what the service wrote on start.
    assert stored_string(node.state_dir, "testecho:started") == "t1"


def test_token_file_created_private(node):
    """The admin token file is created with mode 0600; a request without it is 401."""
    node.start()
    assert node.token_file.stat().st_mode & 0o777 == 0o600
    import urllib.error
    import urllib.request
    req = urllib.request.Request(node.url, data=b'{"jsonrpc":"2.0","id":1,"method":"system.status"}',
                                 method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=5)
    assert info.value.code == 401


def test_fail_fast_stops_the_node(tmp_path):
    """With node.fail_fast a failing service makes twistd exit non-zero."""
    n = NodeProcess(tmp_path, SERVICES.replace("[services.testecho]", "[services.testecho]"))
    n.config.write_text(n.config.read_text().replace('id = "t1"', 'id = "t1"\nfail_fast = true'))
    logfh = open(n.log, "w")
    proc = subprocess.run(twistd_command() + ["-c", str(n.config)], cwd=tmp_path,
                          env=env_with_dropins(), stdout=logfh, stderr=subprocess.STDOUT,
                          timeout=30)
    logfh.close()
    assert proc.returncode != 0
    assert "testbroken failed (node.fail_fast = true)" in n.output()


def test_bad_config_exits_before_binding(tmp_path):
    """A bad config exits non-zero with `file: key.path: problem`, binding nothing."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nid = "a"\nstate_dir = "s"\n[store]\nbackend = "mongo"\n'
                   '[admin]\nlisten = "tcp:99999"\n')
    proc = subprocess.run(twistd_command() + ["-c", str(bad)], cwd=tmp_path,
                          env=env_with_dropins(), capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert f'{bad}: store.backend: "mongo" is not one of "memory", "redis"' in proc.stderr
    assert f"{bad}: admin.listen:" in proc.stderr
    assert not (tmp_path / "s").exists(), "nothing was created before validation"


def test_check_flag_and_appliance_check(tmp_path):
    """`--check` and `appliance-check` validate only and exit 0/1."""
    good = NodeProcess(tmp_path, SERVICES).config
    proc = subprocess.run(twistd_command() + ["-c", str(good), "--check"], cwd=tmp_path,
                          env=env_with_dropins(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout and "testecho" in proc.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nid = "a"\n')
    proc = subprocess.run([sys.executable, "-m", "appliance.tap", str(bad)],
                          cwd=tmp_path, env=env_with_dropins(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{bad}: node.state_dir: missing (required)"


def test_config_reload_starts_and_stops_services(node):
    """config.reload applies service changes at run time and refuses a broken file."""
    node.start()
    text = node.config.read_text()
    node.config.write_text(text.replace("[services.testbroken]", "[services.testbroken]\nenabled = false")
                           .replace('message = "hi"', 'message = "changed"'))
    result = node.rpc("config.reload")["result"]
    assert "services.testbroken: stopped" in result["applied"]
    assert "services.testecho: restarted" in result["applied"]
    assert result["restart_required"] == []
    assert node.rpc("testecho.ping")["result"]["message"] == "changed"
    assert "testbroken" not in node.rpc("system.status")["result"]["services"]

    node.config.write_text(text.replace('message = "hi"', "message = 5"))
    error = node.rpc("config.reload")["error"]
    assert error["code"] == -32010
    assert "services.testecho.message: expected a string, got integer 5" in error["data"]["reason"]
    assert node.rpc("testecho.ping")["result"]["message"] == "changed", "old config still active"

    node.config.write_text(text.replace("[admin]\n", "[admin]\nmax_request_bytes = 4096\n"))
    result = node.rpc("config.reload")["result"]
    assert result["restart_required"] == ["admin"]


def test_reload_retries_failed_services_and_overlapping_reloads_are_serialized(node):
    """A failed service is retried by every reload (its table did not change), and a
    reload batch sent together with SIGHUPs never answers -32603 (review M6)."""
    import signal
    import time
    node.start()
    assert node.rpc("system.status")["result"]["services"]["testbroken"]["state"] == "failed"
    text = node.config.read_text()
    node.config.write_text(text.replace('message = "hi"', 'message = "again"'))
    node.proc.send_signal(signal.SIGHUP)
    batch = [{"jsonrpc": "2.0", "method": "config.reload", "id": i} for i in range(3)]
    answers = node.rpc_batch(batch)
    node.proc.send_signal(signal.SIGHUP)
    assert all("result" in a for a in answers), answers
    lines = [line for a in answers for line in a["result"]["applied"]]
    assert lines.count("services.testecho: restarted") <= 1, lines   # the SIGHUP may win
    assert all(any(line.startswith("services.testbroken: failed to restart (RuntimeError: "
                                   "no such interface eth9)") for line in a["result"]["applied"])
               for a in answers), answers
    assert all(a["result"]["failed"] == ["testbroken"] for a in answers)
    time.sleep(0.5)
    status = node.rpc("system.status")["result"]["services"]
    assert status["testecho"]["state"] == "running"
    assert node.rpc("testecho.ping")["result"]["message"] == "again"
    log = node.output()
    assert log.count("service testecho running") == 2, log     # started once, restarted once
    assert "Unhandled" not in log and "Traceback" not in log


def test_rpc_params_are_validated(node):
    """Bad params get -32602 with the reason naming the parameter, never -32603."""
    node.start()
    error = node.rpc("service.restart", {"service": 5})["error"]
    assert error["code"] == -32602
    assert error["data"]["reason"] == "params.service: expected a string, got an integer 5"
    error = node.rpc("system.status", {"verbose": True})["error"]
    assert error["code"] == -32602 and "params.verbose: unknown parameter" in error["message"]
    out = node.rpc("store.recheck")["result"]
    assert out["backend"] == "memory" and out["healthy"] is True


def test_twistd_lists_the_plugin():
    """`twistd --help` lists the appliance subcommand (the dropin is installed)."""
    proc = subprocess.run(twistd_command()[:1] + ["--help"] if twistd_command()[0] != sys.executable
                          else [sys.executable, "-m", "twisted", "--help"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "appliance" in proc.stdout


def test_sighup_reloads(node):
    """SIGHUP applies a changed service config like config.reload does."""
    import signal as _signal
    node.start()
    node.config.write_text(node.config.read_text().replace('message = "hi"', 'message = "hup"'))
    node.proc.send_signal(_signal.SIGHUP)
    from tests.support.cluster_lab import wait_for
    wait_for(lambda: node.rpc("testecho.ping")["result"]["message"] == "hup", 5, "the reload")
    wait_for(lambda: "SIGHUP: " in node.output(), 5, "the reload to be logged")


def test_admin_port_in_use_is_fatal(tmp_path):
    """An admin listener that cannot bind stops the node with exit 1 and a clear line
    (it used to run on without /rpc and /metrics, visible only in the log)."""
    import socket
    n = NodeProcess(tmp_path, "")
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", n.port))
        blocker.listen(1)
        proc = subprocess.run(twistd_command() + ["-c", str(n.config)], cwd=tmp_path,
                              env=env_with_dropins(), capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert (f"admin listener tcp:{n.port}:interface=127.0.0.1 failed: admin listener "
            f"tcp:{n.port}:interface=127.0.0.1: address already in use "
            "(set admin.required = false to run without it)") in out
