"""Reservations from a real slapd in a real node: a host entry gets its address;
a first server that accepts TCP but never answers is passed over; the directory
going down keeps the reservations in use, and a restart while it is down uses
the cached set."""

from __future__ import annotations

import socket

from services.dhcp.v4 import probe
from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess, free_port

SUBNET = """
[[services.dhcp4.subnets]]
id = 1
subnet = "10.9.0.0/24"
pool = ["10.9.0.50", "10.9.0.59"]
routers = ["10.9.0.1"]
lease_time_s = 600
"""


def mac(i: int) -> bytes:
    return bytes([0x52, 0x54, 0, 0, 0, i])


def node_config(port: int, servers: list[str], slapd, pw_file) -> str:
    urls = ", ".join(f'"{u}"' for u in servers)
    return f"""
[services.dhcp4]
listen_address = "127.0.0.1"
port = {port}

[services.dhcp4.ldap]
servers = [{urls}]
base_dn = "ou=hosts,{slapd.base_dn}"
bind_dn = "{slapd.admin_dn}"
password_file = "{pw_file}"
refresh_interval_s = 2
timeout_s = 0.5
{SUBNET}"""


def dora(port: int, i: int):
    return probe.run(("127.0.0.1", port), "10.9.0.1", mac(i), release=False,
                     out=lambda *_: None)


def test_ldap_reservations_follow_the_directory(slapd, tmp_path):
    slapd.add_host("printer1", "52:54:00:00:00:01", "10.9.0.200")
    slapd.add_host("broken", "52:54:00:00:00:02", "10.9.0.201")
    pw = tmp_path / "ldap.pw"
    pw.write_text(slapd.admin_password + "\n")
    # a black hole first: it accepts the TCP connection and never answers
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    hole_url = f"ldap://127.0.0.1:{hole.getsockname()[1]}"
    port = free_port()
    node = NodeProcess(tmp_path, node_config(port, [hole_url, slapd.url], slapd, pw))
    node.start()
    try:
        def ldap_status():
            return node.rpc("dhcp4.stats")["result"]["reservations"]

        wait_for(lambda: (ldap_status()["ldap"] or {}).get("source") == "ldap", 10,
                 "reservations read from slapd")
        status = ldap_status()
        assert status["count"] == 2 and status["ldap"]["server"] == slapd.url
        assert str(dora(port, 1)) == "10.9.0.200"
        assert str(dora(port, 2)) == "10.9.0.201"
        assert str(dora(port, 3)).startswith("10.9.0.5")      # no entry: from the pool

        # a new host appears in the directory: picked up at the next refresh
        slapd.add_host("camera7", "52:54:00:00:00:07", "10.9.0.207")
        wait_for(lambda: ldap_status()["count"] == 3, 10, "the new entry")
        assert str(dora(port, 7)) == "10.9.0.207"

        # the directory dies: refreshes fail (counted), reservations stay in use
        slapd.kill()
        errors = ldap_status()["ldap"]["errors"]
        wait_for(lambda: ldap_status()["ldap"]["errors"] > errors, 15, "a failed refresh")
        assert ldap_status()["count"] == 3
        assert str(dora(port, 7)) == "10.9.0.207"

        # the node restarts while the directory is still down: the cached set is used
        node.terminate()
        node.start()
        wait_for(lambda: (ldap_status()["ldap"] or {}).get("source") == "cache", 10,
                 "the cached reservations")
        assert ldap_status()["count"] == 3
        assert str(dora(port, 1)) == "10.9.0.200"

        # the directory is back: the node reads it again
        slapd.start()
        wait_for(lambda: ldap_status()["ldap"]["source"] == "ldap", 15, "slapd again")
    finally:
        node.kill()
        hole.close()
