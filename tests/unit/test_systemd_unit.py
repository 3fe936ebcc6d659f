"""etc/systemd/appliance.service: what the unit promises, checked with
``systemd-analyze verify`` (apt package ``systemd``; required under CI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.require import require_binary

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "systemd" / "appliance.service"
DROPIN = ROOT / "etc" / "systemd" / "redis-ordering.conf"


def directives(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (comments and blank lines skipped)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def one(d, key):
    assert key in d, f"{key} missing"
    return d[key][-1]


def test_unit_runs_twistd_as_a_notify_service_with_a_watchdog():
    d = directives(UNIT.read_text())
    exec_start = one(d, "Service.ExecStart").split()
    assert exec_start[0].endswith("/twistd")
    assert exec_start[1:4] == ["-n", "--pidfile=", "appliance"]
    assert exec_start[4:] == ["--config", "/etc/appliance/appliance.toml"]
    assert one(d, "Service.Type") == "notify"
    assert one(d, "Service.NotifyAccess") == "main"
    assert one(d, "Service.WatchdogSec")
    assert one(d, "Service.Restart") == "always"
    assert one(d, "Service.RestartSec")
    assert one(d, "Unit.StartLimitIntervalSec") and one(d, "Unit.StartLimitBurst")


def test_unit_runs_as_appliance_with_only_the_network_capabilities():
    d = directives(UNIT.read_text())
    assert one(d, "Service.User") == "appliance"
    caps = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_NET_BIND_SERVICE"}
    assert set(one(d, "Service.AmbientCapabilities").split()) == caps
    assert set(one(d, "Service.CapabilityBoundingSet").split()) == caps
    assert one(d, "Service.NoNewPrivileges") == "yes"


def test_unit_hardening_keeps_netlink_tun_and_raw_sockets():
    d = directives(UNIT.read_text())
    assert one(d, "Service.ProtectSystem") == "strict"
    assert "/var/lib/appliance" in one(d, "Service.ReadWritePaths").split()
    assert one(d, "Service.PrivateTmp") == "yes"
    assert one(d, "Service.ProtectHome") == "yes"
    families = set(one(d, "Service.RestrictAddressFamilies").split())
    assert {"AF_NETLINK", "AF_PACKET", "AF_UNIX", "AF_INET", "AF_INET6"} <= families
    assert "/dev/net/tun rw" in d["Service.DeviceAllow"]
    # these would break TUN or the node's own network
    assert d.get("Service.PrivateDevices", ["no"])[-1] != "yes"
    assert d.get("Service.PrivateNetwork", ["no"])[-1] != "yes"


def test_redis_dropin_orders_after_redis_and_sentinel():
    d = directives(DROPIN.read_text())
    after = set(" ".join(d["Unit.After"]).split())
    assert {"redis-server.service", "redis-sentinel.service"} <= after
    assert "Unit.Requires" not in d        # a Redis outage does not take the node down


def _verify(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    analyze = require_binary("systemd-analyze")
    twistd = shutil.which("twistd") or sys.executable
    unit = tmp_path / "appliance.service"
    # the packaged path does not exist on a build machine: point at this twistd
    unit.write_text(text.replace("/opt/appliance/bin/twistd", twistd))
    return subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    """No error and no warning (an unknown or misplaced key is a warning)."""
    r = _verify(tmp_path, UNIT.read_text())
    assert r.returncode == 0, r.stderr
    assert "appliance.service" not in r.stderr, r.stderr


def test_systemd_analyze_verify_accepts_the_unit_with_the_redis_dropin(tmp_path):
    r = _verify(tmp_path, UNIT.read_text() + "\n" + DROPIN.read_text())
    assert r.returncode == 0, r.stderr
    assert "appliance.service" not in r.stderr, r.stderr


def test_verify_would_catch_a_broken_unit(tmp_path):
    """The check is real: a misspelt key is reported."""
    r = _verify(tmp_path, UNIT.read_text().replace("NotifyAccess=", "NotifyAcess="))
    assert "NotifyAcess" in r.stderr
