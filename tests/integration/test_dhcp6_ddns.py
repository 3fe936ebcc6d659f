"""DDNS for DHCPv6 leases against a real BIND 9: AAAA + PTR (ip6.arpa) + DHCID.

One node runs dhcp6 (on [::1], a free port) and the dns service pointed at a
``named`` on loopback serving example.test. and the ip6.arpa zone of
2001:db8:1::/64 (TSIG-signed updates).  A client (tests/support/dhcp6_client.py,
its own codec) takes an address with a Client FQDN option (RFC 4704, partial
name "laptop6", S bit): named answers AAAA laptop6.example.test. -> the address,
PTR of the address -> laptop6.example.test., and a DHCID for the name; the
client's RELEASE removes the AAAA and the PTR.

Needs named (Debian bind9; root apt-installs it): skipped on a laptop without it,
failed under ``CI=true``.
"""

from __future__ import annotations

from ipaddress import IPv6Address

import pytest

from tests.support.cluster_lab import wait_for
from tests.support.dhcp6_client import Client6, duid_ll
from tests.support.node_process import NodeProcess, free_port
from tests.support.require import unavailable

pytestmark = pytest.mark.integration

REV = "1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."


@pytest.fixture
def named():
    from tests.support.named_server import APT_PACKAGES, NamedServer, install_bind
    if not install_bind():
        unavailable(f"named not installed (apt-get install {' '.join(APT_PACKAGES)})")
    server = NamedServer(extra_zones=(REV,)).start()
    try:
        yield server
    finally:
        server.cleanup()


def answer(named, name: str, rdtype: str) -> list[str]:
    import dns.message
    import dns.query
    r = dns.query.udp(dns.message.make_query(name, rdtype), "127.0.0.1", port=named.port,
                      timeout=2)
    return sorted(rr.to_text() for rrset in r.answer for rr in rrset)


def test_aaaa_ptr_and_dhcid_follow_a_dhcpv6_lease(named, tmp_path):
    """A client with FQDN "laptop6" gets an address; named then answers AAAA
    laptop6.example.test. with it, the ip6.arpa PTR with the name, and a DHCID for
    the name; after the client's RELEASE the AAAA and the PTR are gone."""
    port = free_port()
    node = NodeProcess(tmp_path, f"""
[services.dns]
servers = ["127.0.0.1:{named.port}"]
tsig_key_file = "{named.key_file}"
zones = ["example.test.", "{REV}"]
ddns = {{ forward_zone = "example.test.", reverse_zone = "{REV}" }}

[services.dhcp6]
listen_address = "::1"
port = {port}

[[services.dhcp6.subnets]]
id = 1
subnet = "2001:db8:1::/64"
pool = ["2001:db8:1::100", "2001:db8:1::1ff"]
""")
    node.start()
    client = Client6("lo", server="::1", port=0, server_port=port)
    try:
        duid = duid_ll(bytes([2, 0, 0, 0, 0x60, 0x42]))
        rep = client.lease(duid, fqdn="laptop6", timeout=2.0)
        assert rep is not None and rep.address, f"no lease\n{node.output()[-3000:]}"
        address = rep.address
        ptr = IPv6Address(address).reverse_pointer + "."
        wait_for(lambda: answer(named, "laptop6.example.test.", "AAAA") == [address], 15,
                 f"AAAA laptop6.example.test. {address}\n{node.output()[-3000:]}")
        wait_for(lambda: answer(named, ptr, "PTR") == ["laptop6.example.test."], 15,
                 f"PTR {ptr}\n{node.output()[-3000:]}")
        assert len(answer(named, "laptop6.example.test.", "DHCID")) == 1
        lease = node.rpc("dhcp6.lease", {"address": address})["result"]
        assert lease["duid"] == duid.hex() and lease["state"] == "bound", lease

        released = client.release(duid, rep.server_duid, address, None, timeout=2.0)
        assert released is not None and released.status == 0, released
        wait_for(lambda: not answer(named, "laptop6.example.test.", "AAAA")
                 and not answer(named, ptr, "PTR"), 15,
                 f"the records to go after RELEASE\n{node.output()[-3000:]}")
        assert "Traceback" not in node.output()
    finally:
        client.close()
        node.kill()
