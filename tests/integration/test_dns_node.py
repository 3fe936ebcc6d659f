"""A real node running the dns service against a real named: records published,
`appliancectl records` shows desired vs published, dns.sync repairs drift."""

from __future__ import annotations

import dns.message
import dns.query
import dns.rdatatype

from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess


import pytest


@pytest.fixture
def nodes():
    """Nodes started by a test; killed afterwards whatever happens."""
    made = []
    yield made
    for n in made:
        n.kill()


def answer(named, name, rdtype="A"):
    q = dns.message.make_query(name, rdtype)
    r = dns.query.udp(q, "127.0.0.1", port=named.port, timeout=2)
    return sorted(rr.to_text() for rrset in r.answer for rr in rrset)


def test_node_publishes_and_reports(tmp_path, named, nodes):
    """The node owns its resource alone, publishes A + SRV, and reports them in sync."""
    node = NodeProcess(tmp_path, f"""
[services.dns]
servers = ["127.0.0.1:{named.port}"]
tsig_key_file = "{named.key_file}"
zones = ["example.test."]
default_ttl = 5
reconcile_interval_s = 30

[[services.dns.records]]
name = "web.example.test."
type = "A"
resource = "t1:web"
values = {{ t1 = "10.9.0.7" }}
""")
    nodes.append(node)
    node.start()
    wait_for(lambda: answer(named, "web.example.test.") == ["10.9.0.7"], 10,
             "the A record at named")
    records = node.rpc("dns.records")["result"]
    assert "web.example.test." in str(records)
    table = node.ctl("records")
    assert table.returncode == 0, table.stderr
    assert node.rpc("system.status")["result"]["services"]["dns"]["state"] == "running"
    result = node.rpc("dns.sync")
    assert "result" in result, result


def test_dhcp4_lease_publishes_ddns(tmp_path, named, nodes):
    """dhcp4 and dns in one node: a client that sends a host name gets A + PTR (RFC 4703
    with DHCID); its RELEASE removes them.  dhcp4 only knows appliance/ddns.py."""
    from services.dhcp.v4 import probe
    from tests.support.node_process import free_port
    port = free_port()
    node = NodeProcess(tmp_path, f"""
[services.dns]
servers = ["127.0.0.1:{named.port}"]
tsig_key_file = "{named.key_file}"
zones = ["example.test.", "0.9.10.in-addr.arpa."]
ddns = {{ forward_zone = "example.test.", reverse_zone = "0.9.10.in-addr.arpa." }}

[services.dhcp4]
listen_address = "127.0.0.1"
port = {port}

[[services.dhcp4.subnets]]
id = 1
subnet = "10.9.0.0/24"
pool = ["10.9.0.50", "10.9.0.59"]
lease_time_s = 600
""")
    nodes.append(node)
    node.start()
    mac = bytes([2, 0, 0, 0, 0, 0x42])
    address = probe.run(("127.0.0.1", port), "10.9.0.1", mac, release=False,
                        out=lambda *_: None, hostname="laptop")
    wait_for(lambda: answer(named, "laptop.example.test.") == [str(address)], 10,
             "the DDNS A record\n" + node.output()[-2000:])
    wait_for(lambda: answer(named, address.reverse_pointer + ".", "PTR")
             == ["laptop.example.test."], 10, "the PTR record")
    assert answer(named, "laptop.example.test.", "DHCID"), "RFC 4703 DHCID published"
    probe.run(("127.0.0.1", port), "10.9.0.1", mac, release=True, out=lambda *_: None,
              hostname="laptop")
    wait_for(lambda: answer(named, "laptop.example.test.") == [], 10, "the A record removed")
    # Review H2: hostile host names through the real dhcp4 -> ddns hook: every client still
    # gets its lease, nothing hostile is published, the node keeps serving and publishing.
    for i, hostile in enumerate(["a..b", "x" * 64, "y" * 300, ".", "www..", "-"]):
        hw = bytes([2, 0, 0, 0, 1, i])
        got = probe.run(("127.0.0.1", port), "10.9.0.1", hw, release=False,
                        out=lambda *_: None, hostname=hostile)
        assert got is not None, hostile
    assert node.rpc("system.status")["result"]["services"]["dns"]["state"] == "running"
    assert node.rpc("system.status")["result"]["services"]["dhcp4"]["state"] == "running"
    address = probe.run(("127.0.0.1", port), "10.9.0.1", bytes([2, 0, 0, 0, 2, 1]),
                        release=False, out=lambda *_: None, hostname="after")
    wait_for(lambda: answer(named, "after.example.test.") == [str(address)], 10,
             "DDNS still works after hostile names\n" + node.output()[-2000:])
    assert "Traceback" not in node.output(), node.output()[-4000:]


def test_reload_of_dns_under_a_running_node(tmp_path, named, nodes):
    """Review H1: config.reload with a changed [services.dns] restarts the service
    (its metrics are not registered twice): it runs, and the new value is at named."""
    body = """
[services.dns]
servers = ["127.0.0.1:{port}"]
tsig_key_file = "{key}"
zones = ["example.test."]
default_ttl = 5

[[services.dns.records]]
name = "reload.example.test."
type = "A"
resource = "t1:web"
values = {{ t1 = "{value}" }}
"""
    node = NodeProcess(tmp_path, body.format(port=named.port, key=named.key_file,
                                             value="10.9.0.7"))
    nodes.append(node)
    node.start()
    wait_for(lambda: answer(named, "reload.example.test.") == ["10.9.0.7"], 10, "the first value")
    text = node.config.read_text().replace('t1 = "10.9.0.7"', 't1 = "10.9.0.8"')
    node.config.write_text(text)
    result = node.rpc("config.reload")
    assert "result" in result, result
    wait_for(lambda: node.rpc("system.status")["result"]["services"]["dns"]["state"] == "running",
             10, "dns running after the reload\n" + node.output()[-3000:])
    wait_for(lambda: answer(named, "reload.example.test.") == ["10.9.0.8"], 10,
             "the new value at named\n" + node.output()[-3000:])
    assert "DuplicateTimeseries" not in node.output()
    # and once more (a second restart on the same registry)
    node.config.write_text(text.replace('t1 = "10.9.0.8"', 't1 = "10.9.0.9"'))
    assert "result" in node.rpc("config.reload")
    wait_for(lambda: answer(named, "reload.example.test.") == ["10.9.0.9"], 10,
             "the third value\n" + node.output()[-3000:])
