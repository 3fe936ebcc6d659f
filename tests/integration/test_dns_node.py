"""A real node running the dns service against a real named: records published,
`appliancectl records` shows desired vs published, dns.sync repairs drift."""

from __future__ import annotations

import dns.message
import dns.query
import dns.rdatatype

from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess


def answer(named, name, rdtype="A"):
    q = dns.message.make_query(name, rdtype)
    r = dns.query.udp(q, "127.0.0.1", port=named.port, timeout=2)
    return sorted(rr.to_text() for rrset in r.answer for rr in rrset)


def test_node_publishes_and_reports(tmp_path, named):
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
