"""appliancectl against a live AdminService on loopback (in a thread, and as a subprocess)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from prometheus_client import CollectorRegistry
from twisted.internet import defer, threads

from appliance.admin import ApplicationError, MethodRegistry
from appliance.admin import ctl
from appliance.admin.service import AdminService, AdminSettings
from appliance.net.tls import make_ca, make_cert, write_pem

ROOT = Path(__file__).resolve().parents[2]
STATUS = {"node": "a", "version": "0.1.0", "uptime_s": 12.0,
          "store": {"backend": "memory", "healthy": True},
          "services": {"dhcp4": {"state": "running", "role": "active"}}}


def _reactor():
    from twisted.internet import reactor
    return reactor


def make_registry() -> MethodRegistry:
    reg = MethodRegistry()
    reg.register("system.status", lambda: STATUS)
    reg.register("dhcp4.leases", lambda subnet=None, state=None, limit=None, cursor=None: {
        "leases": [{"address": "10.9.0.50", "hwaddr": "02:00:00:00:00:01", "state": state,
                    "subnet": subnet}], "cursor": None})

    def promote(resource):
        raise ApplicationError(f"unknown resource {resource!r} (known: vip-dhcp)", code=-32020)
    reg.register("cluster.promote", promote)
    reg.register("cluster.maintenance", lambda on: {"maintenance": on})
    return reg


@defer.inlineCallbacks
def start_admin(tmp_path, **settings):
    settings.setdefault("listen", "tcp:0:interface=127.0.0.1")
    settings.setdefault("token_file", str(tmp_path / "admin.token"))
    svc = AdminService(_reactor(), AdminSettings(**settings), make_registry(),
                       CollectorRegistry())
    yield svc.startService()
    return svc


def ctl_in_thread(*argv: str) -> defer.Deferred:
    """Run ctl.main(argv) off the reactor thread; fire with (exit code, stdout, stderr)."""
    def run():
        out, err = io.StringIO(), io.StringIO()
        code = ctl.main(list(argv), stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()
    return threads.deferToThread(run)


@pytest_twisted.inlineCallbacks
def test_json_call_system_methods(tmp_path):
    """`appliancectl --url U --token-file F --json call system.methods` prints the names."""
    svc = yield start_admin(tmp_path)
    try:
        code, out, err = yield ctl_in_thread("--url", svc.url, "--token-file",
                                             svc.config.token_file, "--json", "call",
                                             "system.methods")
        assert (code, err) == (0, "")
        assert json.loads(out) == sorted(["system.methods", "system.status", "dhcp4.leases",
                                          "cluster.promote", "cluster.maintenance"])
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_tables_and_params(tmp_path):
    """`status` and `leases` print tables; options become params; maintenance sends a bool."""
    svc = yield start_admin(tmp_path)
    base = ["--url", svc.url, "--token-file", svc.config.token_file]
    try:
        code, out, err = yield ctl_in_thread(*base, "status")
        assert code == 0, err
        assert out.splitlines()[:4] == ["node:    a", "version: 0.1.0", "uptime:  12.0s",
                                        "store:   memory (healthy)"]
        assert "dhcp4    running  active" in out
        code, out, err = yield ctl_in_thread(*base, "leases", "--subnet", "10.9.0.0/24",
                                             "--state", "active")
        assert code == 0, err
        assert "10.9.0.50" in out and "10.9.0.0/24" in out and "active" in out
        code, out, _ = yield ctl_in_thread(*base, "maintenance", "on", "--json")
        assert json.loads(out) == {"maintenance": True}
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_error_lines_and_exit_codes(tmp_path):
    """Method not found, application error, bad token, bad JSON, connection refused: one line each."""
    svc = yield start_admin(tmp_path)
    url = svc.url
    base = ["--url", url, "--token-file", svc.config.token_file]
    try:
        code, out, err = yield ctl_in_thread(*base, "records")
        assert (code, out, err) == (1, "", "appliancectl: dns.records: method not found (-32601)\n")

        code, _, err = yield ctl_in_thread(*base, "promote", "vip-x")
        assert (code, err) == (1, "appliancectl: cluster.promote: unknown resource 'vip-x' "
                                  "(known: vip-dhcp)\n")

        code, _, err = yield ctl_in_thread(*base, "call", "cluster.maintenance", '{"of": 1}')
        assert code == 1 and "invalid params" in err and err.count("\n") == 1

        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-the-token\n")
        code, _, err = yield ctl_in_thread("--url", svc.url, "--token-file", str(wrong),
                                           "status")
        assert (code, err) == (3, "appliancectl: unauthorized (check --token-file)\n")

        code, _, err = yield ctl_in_thread(*base, "call", "system.status", "[1,")
        assert code == 2 and err.startswith("appliancectl: call: invalid JSON params:")
    finally:
        yield svc.stopService()
    code, _, err = yield ctl_in_thread(*base, "status")
    assert (code, err) == (3, f"appliancectl: cannot connect to {url}: connection refused\n")


@pytest_twisted.inlineCallbacks
def test_mutual_tls_with_cert_flags(tmp_path):
    """Over mutual TLS: --ca/--cert/--key works; without a client cert it fails with one line."""
    ca, ca_key = make_ca("ctl test CA")
    server, server_key = make_cert(ca, ca_key, "node-a", ips=("127.0.0.1",))
    client, client_key = make_cert(ca, ca_key, "operator")
    f = {name: str(write_pem(tmp_path / name, data, name.endswith(".key")))
         for name, data in [("ca.pem", ca), ("server.pem", server), ("server.key", server_key),
                            ("client.pem", client), ("client.key", client_key)]}
    svc = yield start_admin(
        tmp_path, client_ca=f["ca.pem"],
        listen=f"ssl:0:interface=127.0.0.1:privateKey={f['server.key']}:certKey={f['server.pem']}")
    base = ["--url", svc.url, "--token-file", svc.config.token_file, "--ca", f["ca.pem"]]
    try:
        code, out, err = yield ctl_in_thread(*base, "--cert", f["client.pem"], "--key",
                                             f["client.key"], "--json", "status")
        assert code == 0, err
        assert json.loads(out)["node"] == "a"
        code, out, err = yield ctl_in_thread(*base, "status")
        assert code == 3 and out == "", err
        # Usually the TLS alert; a reset can win the race when the server closes first.
        assert err in (f"appliancectl: TLS error with {svc.url}: tlsv13 alert certificate "
                       "required (the node wants a client certificate it trusts: --cert/--key)\n",
                       f"appliancectl: {svc.url} closed the connection (the node may require "
                       "a client certificate: --cert/--key)\n"), err
        assert err.count("\n") == 1
        code, _, err = yield ctl_in_thread("--url", svc.url, "--token-file",
                                           svc.config.token_file, "status")
        assert code == 3 and "cannot verify the server certificate" in err
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_subprocess_with_default_config(tmp_path):
    """`python -m appliance.admin.ctl status` in a directory with etc/appliance.toml just works."""
    svc = yield start_admin(tmp_path, token_file=str(tmp_path / "var" / "admin.token"))
    try:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "appliance.toml").write_text(
            '[node]\nid = "a"\nstate_dir = "var"\n\n'
            f'[admin]\nlisten = "tcp:{svc.port.getHost().port}:interface=127.0.0.1"\n'
            'token_file = "var/admin.token"\n')
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = yield threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "appliance.admin.ctl", "status"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "dhcp4    running  active" in proc.stdout
        proc = yield threads.deferToThread(
            subprocess.run, [sys.executable, "-m", "appliance.admin.ctl", "--json", "call",
                             "system.status"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and json.loads(proc.stdout) == STATUS
    finally:
        yield svc.stopService()
