"""RPC params as a user sends them, to a real node with dhcp4 on loopback.

Bad params get -32602 with ``data.reason`` naming the parameter, never -32603
"internal error" (issue 10: ``dhcp4.release`` with a malformed address
answered -32603, ``dhcp4.leases`` accepted ``limit: -5``).
"""

from __future__ import annotations

import pytest

from tests.support.node_process import NodeProcess, free_port

SUBNET = """
[[services.dhcp4.subnets]]
id = 1
subnet = "10.9.0.0/24"
pool = ["10.9.0.50", "10.9.0.59"]
lease_time_s = 600
"""


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rpc-params")
    n = NodeProcess(tmp, f"""
[services.dhcp4]
listen_address = "127.0.0.1"
port = {free_port()}
{SUBNET}""")
    n.start()
    yield n
    n.kill()


@pytest.mark.parametrize("method, params, reason", [
    ("dhcp4.release", {"address": "x"}, 'params.address: "x" is not an IPv4 address'),
    ("dhcp4.release", {"address": "fe80::1"}, 'params.address: "fe80::1" is not an IPv4 address'),
    ("dhcp4.release", {"address": 7}, "params.address: expected an IPv4 address, got an integer 7"),
    ("dhcp4.release", {}, "params.address: missing (required)"),
    ("dhcp4.release", {"address": "10.9.0.50", "force": True},
     "params.force: unknown parameter (known: address)"),
    ("dhcp4.leases", {"limit": -5}, "params.limit: -5 is below the minimum 1"),
    ("dhcp4.leases", {"limit": 10**6}, "params.limit: 1000000 is above the maximum 1000"),
    ("dhcp4.leases", {"limit": "10"}, 'params.limit: expected an integer, got a string "10"'),
    ("dhcp4.leases", {"state": "happy"}, 'params.state: "happy" is not one of'),
    ("dhcp4.leases", {"cursor": "10.9.0"}, 'params.cursor: "10.9.0" is not an IPv4 address'),
    ("dhcp4.leases", {"subnet": "x"}, "params.subnet: 'x' is not an IPv4 network or address"),
    ("dhcp4.leases", {"subnet": "192.168.0.0/24"},
     "params.subnet: '192.168.0.0/24' is not a configured subnet"),
    ("dhcp4.leases", {"subnet": 9}, "params.subnet: no subnet with id 9 (ids: 1)"),
    ("dhcp4.leases", {"limt": 5}, "params.limt: unknown parameter (did you mean 'limit'?)"),
    ("dhcp4.lease", {}, "params: give exactly one of address or hwaddr"),
    ("dhcp4.lease", {"hwaddr": "zz:00"}, 'params.hwaddr: "zz:00" is not a hardware address'),
    ("dhcp4.lease", {"address": "10.9.0.50", "hwaddr": "02:00:00:00:00:01"},
     "params: give exactly one of address or hwaddr (got address, hwaddr)"),
    ("dhcp4.scopes", {"x": 1}, "params.x: unknown parameter (this method takes none)"),
    ("system.status", [1], "params: at most 0 positional value(s) (none), got 1"),
    ("cluster.maintenance", {"on": "yes"}, 'params.on: expected true or false, got a string "yes"'),
    ("cluster.promote", {}, "params.resource: missing (required)"),
])
def test_bad_params_are_32602_with_the_reason(node, method, params, reason):
    """Each bad call is answered -32602, data.reason names the parameter and the problem."""
    error = node.rpc(method, params)["error"]
    assert error["code"] == -32602, error
    assert error["data"]["reason"].startswith(reason), error
    assert error["message"] == "invalid params: " + error["data"]["reason"]


def test_good_params_still_work(node):
    """Valid params (also positional and normalized forms) reach the method."""
    assert node.rpc("dhcp4.leases", {"limit": 5, "state": "bound"})["result"]["leases"] == []
    assert node.rpc("dhcp4.leases", {"subnet": "10.9.0.0/24"})["result"]["leases"] == []
    assert node.rpc("dhcp4.leases", {"subnet": 1, "cursor": "10.9.0.50"})["result"]["cursor"] \
        is None
    assert node.rpc("dhcp4.release", ["10.9.0.50"])["error"]["code"] == -32041   # not leased
    assert node.rpc("dhcp4.lease", {"hwaddr": "02-00-00-00-00-01"})["error"]["code"] == -32040


def test_ctl_shows_the_reason(node):
    """appliancectl prints the reason on one line and exits 1."""
    out = node.ctl("call", "dhcp4.release", '{"address": "x"}')
    assert out.returncode == 1
    assert out.stderr == ('appliancectl: dhcp4.release: invalid params: params.address: "x" '
                          "is not an IPv4 address (-32602)\n")
