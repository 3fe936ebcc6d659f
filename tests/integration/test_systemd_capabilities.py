"""The capabilities the unit grants (AmbientCapabilities= of
etc/systemd/appliance.service) are enough: a node whose capability bounding
set holds only those (setpriv, inside a network namespace, with
no_new_privs as NoNewPrivileges=yes) binds DHCP's port 67 on its interface,
adds its VIP over netlink and answers JSON-RPC.  The same node without
CAP_NET_ADMIN cannot add the VIP: the check is real.

(uid stays 0 here because the test's Python lives under /root, mode 0700;
ports, netlink and raw sockets check capabilities, not the uid.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.cluster_lab import wait_for
from tests.support.node_process import env_with_dropins, twistd_command
from tests.support.require import require_binary, require_root

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "etc" / "systemd" / "appliance.service"


def unit_caps() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("AmbientCapabilities="):
            return [c.lower().removeprefix("cap_") for c in line.split("=", 1)[1].split()]
    raise AssertionError("no AmbientCapabilities= in the unit")


def start(lab, tmp_path: Path, caps: list[str]):
    state = tmp_path / "state"
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
id = "a"
state_dir = "{state}"
[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{state}/admin.token"
[[vip]]
name = "vip1"
address = "10.78.0.100/24"
interface = "eth0"
priority = {{ a = 100 }}
[services.dhcp4]
interface = "eth0"
[[services.dhcp4.subnets]]
id = 1
subnet = "10.78.0.0/24"
pool = ["10.78.0.50", "10.78.0.99"]
""")
    spec = ",".join(["-all"] + [f"+{c}" for c in caps])
    setpriv = [require_binary("setpriv"), f"--bounding-set={spec}", f"--inh-caps={spec}",
               f"--ambient-caps={spec}", "--no-new-privs"]
    log = open(tmp_path / "node.log", "w")
    proc = lab.popen("a", *setpriv, *twistd_command(), "-c", str(cfg), env=env_with_dropins(),
                     cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    return proc, cfg


def status(lab, cfg):
    r = lab.run("a", sys.executable, "-m", "appliance.admin.ctl", "--config", str(cfg), "--json",
                "status", check=False, timeout=15)
    return json.loads(r.stdout) if r.returncode == 0 else None


def vip_present(lab) -> bool:
    return "10.78.0.100/24" in lab.run("a", "ip", "-o", "addr", "show", "dev", "eth0").stdout


def test_the_units_capabilities_are_enough(netns_lab, tmp_path):
    require_root()
    caps = unit_caps()
    assert sorted(caps) == ["net_admin", "net_bind_service", "net_raw"]
    netns_lab.add_node("a", "10.78.0.1/24")
    proc, cfg = start(netns_lab, tmp_path, caps)
    try:
        wait_for(lambda: (status(netns_lab, cfg) or {}).get("services", {}).get("dhcp4", {})
                 .get("state") == "running", 30, "dhcp4 running (port 67 bound)")
        wait_for(lambda: vip_present(netns_lab), 15, "the VIP on eth0")
        assert ":67 " in netns_lab.run("a", "ss", "-uln").stdout
        # the node ran with exactly those (ip netns exec and setpriv exec, no fork)
        fields = dict(line.split(":\t", 1) for line in
                      Path(f"/proc/{proc.pid}/status").read_text().splitlines() if ":\t" in line)
        bits = (1 << 10) | (1 << 12) | (1 << 13)    # NET_BIND_SERVICE, NET_ADMIN, NET_RAW
        assert int(fields["CapEff"], 16) == bits and int(fields["CapBnd"], 16) == bits
        assert fields["NoNewPrivs"].strip() == "1"
    finally:
        proc.terminate()
        proc.wait(15)


def test_without_net_admin_the_vip_cannot_be_added(netns_lab, tmp_path):
    require_root()
    netns_lab.add_node("a", "10.78.0.1/24")
    proc, cfg = start(netns_lab, tmp_path, ["net_raw", "net_bind_service"])
    try:
        wait_for(lambda: status(netns_lab, cfg) is not None, 30, "the node answering")
        wait_for(lambda: "Operation not permitted" in (tmp_path / "node.log").read_text()
                 or "EPERM" in (tmp_path / "node.log").read_text()
                 or "not permitted" in (tmp_path / "node.log").read_text(), 15,
                 "the VIP add refused")
        assert not vip_present(netns_lab)
    finally:
        proc.terminate()
        proc.wait(15)
