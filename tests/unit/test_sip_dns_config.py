"""The DNS example of etc/sip.toml (config level): uncommented into a two-node config it
loads; its records follow the sip service's resource (sip:registrar, registered by the
sip service with its priorities and no preemption before any service starts), and the
records the owner publishes are its own A address and SRV sets listing it first."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from appliance.cluster.manager import ClusterManager
from appliance.config import load_config
from appliance.plugin import NodeContext
from services.sip.service import SIPService

ROOT = Path(__file__).resolve().parents[2]


def example_block() -> str:
    text = (ROOT / "etc" / "sip.toml").read_text()
    block = text.split("# BEGIN dns example\n", 1)[1].split("# END dns example", 1)[0]
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                     for line in block.splitlines()) + "\n"


def two_node_config(tmp_path, node="a") -> Path:
    other = "b" if node == "a" else "a"
    addr = {"a": "10.9.0.1", "b": "10.9.0.2"}
    path = tmp_path / f"{node}.toml"
    path.write_text(f"""
[node]
id = "{node}"
state_dir = "{tmp_path}/{node}"

[admin]
listen = "tcp:0:interface=127.0.0.1"
token_file = "{tmp_path}/{node}/admin.token"

[cluster]
peers = [{{ id = "{other}", address = "{addr[other]}" }}]
bind_address = "{addr[node]}"
heartbeat_port = 8741
auth_key_file = "{tmp_path}/cluster.key"

[services.sip]
listen_address = "{addr[node]}"
port = 5060
domains = ["example.test"]
priority = {{ a = 200, b = 100 }}
""" + example_block().replace("etc/dns-demo.key", str(ROOT / "etc" / "dns-demo.key")))
    return path


def test_dns_example_follows_the_registrar(tmp_path):
    """A for the owner's address, _sip._udp/_sip._tcp SRV with the owner first, all on
    the resource the sip service registers (its priorities, no preemption)."""
    from services.dns.records import desired_rdatas
    cfg = load_config(two_node_config(tmp_path))
    sip = cfg.services["sip"].config
    dns_cfg = cfg.services["dns"].config
    assert list(cfg.services) == ["sip", "dns"]          # sip registers its resource first
    assert {r.resource for r in dns_cfg.records} == {sip.roles.resource} == {"sip:registrar"}
    by_name = {(r.name.to_text(), r.type_text): r for r in dns_cfg.records}
    assert set(by_name) == {("registrar.example.test.", "A"),
                            ("_sip._udp.example.test.", "SRV"),
                            ("_sip._tcp.example.test.", "SRV")}
    a_rec = by_name[("registrar.example.test.", "A")]
    assert {rd.to_text() for rd in desired_rdatas(a_rec, "a")} == {"10.9.0.1"}
    assert {rd.to_text() for rd in desired_rdatas(a_rec, "b")} == {"10.9.0.2"}
    for proto in ("udp", "tcp"):
        srv = by_name[(f"_sip._{proto}.example.test.", "SRV")]
        for owner, first, second in (("a", "a", "b"), ("b", "b", "a")):
            ordered = sorted(desired_rdatas(srv, owner), key=lambda rd: rd.priority)
            assert [rd.target.to_text() for rd in ordered] == [
                f"{first}.sip.example.test.", f"{second}.sip.example.test."]
            assert ordered[0].priority < ordered[1].priority
    # the sip service, built before any service starts, owns the resource's spec
    clock = Clock()
    manager = ClusterManager(clock, node_id="a", cluster=cfg.cluster, state_dir=tmp_path)
    ctx = NodeContext(reactor=clock, config=cfg, store=None, rpc=None, metrics=None,
                      cluster=manager, state_dir=tmp_path)
    svc = SIPService(sip, ctx)
    spec = manager.resources["sip:registrar"].spec
    assert dict(spec.priority) == {"a": 200, "b": 100} and spec.preempt is False
    assert svc.roles.addresses == {"a": "10.9.0.1:5060", "b": "10.9.0.2:5060"}
