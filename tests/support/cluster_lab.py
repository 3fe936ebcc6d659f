"""Helpers shared by the cluster tests and bench/failover.py: polling, pair configs."""

from __future__ import annotations

import time
from pathlib import Path


def poll(pred, timeout: float, step: float = 0.02) -> bool:
    """Call ``pred`` until it is true (True) or ``timeout`` seconds pass (False)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def wait_for(pred, timeout: float, what: str) -> None:
    """Like :func:`poll` but fail the test with ``what`` on timeout."""
    if not poll(pred, timeout, 0.05):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def vip_pair_config(node: str, workdir: Path, addrs: dict[str, str], vip: str, *,
                    interval_ms: int = 100, preempt: bool = True, vip_name: str = "vip1",
                    dead_after: int = 3, witness: tuple[str, str] | None = None) -> str:
    """The TOML of one node of a two-node pair sharing one VIP (priority a=200, b=100).

    ``addrs`` maps the two node ids to their addresses; the HMAC key is
    ``workdir/cluster.key`` (the caller writes it).  ``witness``: ``(id,
    address)`` of a witness node (see :func:`witness_config`).
    """
    peer = next(n for n in addrs if n != node)
    witness_line = (f'witness = {{ id = "{witness[0]}", address = "{witness[1]}" }}\n'
                    if witness else "")
    return f"""
[node]
id = "{node}"
state_dir = "{workdir}/state-{node}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{workdir}/state-{node}/admin.token"

[cluster]
peers = [{{ id = "{peer}", address = "{addrs[peer]}" }}]
bind_address = "{addrs[node]}"
heartbeat_interval_ms = {interval_ms}
dead_after = {dead_after}
auth_key_file = "{workdir}/cluster.key"
auto_partner_down_s = 0
{witness_line}
[[vip]]
name = "{vip_name}"
address = "{vip}"
interface = "eth0"
priority = {{ a = 200, b = 100 }}
preempt = {"true" if preempt else "false"}
"""


def witness_config(node: str, workdir: Path, address: str, nodes: dict[str, str], *,
                   interval_ms: int = 100, dead_after: int = 3) -> str:
    """The TOML of a witness: ``role = "witness"``, the nodes as peers, no services."""
    peers = ", ".join(f'{{ id = "{n}", address = "{a}" }}' for n, a in nodes.items())
    return f"""
[node]
id = "{node}"
state_dir = "{workdir}/state-{node}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{workdir}/state-{node}/admin.token"

[cluster]
role = "witness"
peers = [{peers}]
bind_address = "{address}"
heartbeat_interval_ms = {interval_ms}
dead_after = {dead_after}
auth_key_file = "{workdir}/cluster.key"
"""


def dhcp4_pair_config(node: str, workdir: Path, addrs: dict[str, str], keys: Path, *,
                      subnet: str, pool: tuple[str, str], routers: str, subnet_id: int = 1,
                      mode: str = "split-scope", lease_time_s: int = 600) -> str:
    """One node of a dhcp4 failover pair (a primary, b secondary) serving direct clients
    on eth0, with heartbeats, the TLS peer link (keys from appliance-keys) and
    auto partner-down after 1 s."""
    peer = next(n for n in addrs if n != node)
    role = "primary" if node == "a" else "secondary"
    return f"""
[node]
id = "{node}"
state_dir = "{workdir}/state-{node}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{workdir}/state-{node}/admin.token"

[cluster]
peers = [{{ id = "{peer}", address = "{addrs[peer]}" }}]
bind_address = "{addrs[node]}"
heartbeat_interval_ms = 100
dead_after = 3
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:8742"
tls = {{ cert = "{keys}/{node}.pem", key = "{keys}/{node}.key", ca = "{keys}/ca.pem" }}
auto_partner_down_s = 1

[services.dhcp4]
interface = "eth0"
failover = {{ peer = "{peer}", role = "{role}", mode = "{mode}", split = 50, delay_s = 0, mclt_s = 30, max_unacked = 1000 }}

[[services.dhcp4.subnets]]
id = {subnet_id}
subnet = "{subnet}"
pool = ["{pool[0]}", "{pool[1]}"]
routers = ["{routers}"]
lease_time_s = {lease_time_s}
"""
