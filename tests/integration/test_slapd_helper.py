"""The SlapdServer helper: a real slapd with the nis schema, entries survive a crash."""

from __future__ import annotations

import time

import ldap3
import pytest

pytestmark = pytest.mark.integration

HOSTS = {
    "host-a": ("52:54:00:00:00:0a", "10.9.0.10"),
    "host-b": ("52:54:00:00:00:0b", "10.9.0.11"),
}


def _hosts(server) -> dict[str, tuple[str, str]]:
    conn = ldap3.Connection(ldap3.Server(server.url, get_info=ldap3.NONE),
                            user=server.admin_dn, password=server.admin_password,
                            auto_bind=True)
    try:
        assert conn.search(f"ou=hosts,{server.base_dn}", "(objectClass=ipHost)",
                           attributes=["cn", "macAddress", "ipHostNumber"])
        return {str(e.cn): (str(e.macAddress).lower(), str(e.ipHostNumber))
                for e in conn.entries}
    finally:
        conn.unbind()


def test_hosts_round_trip_and_survive_kill(slapd):
    assert slapd.url == f"ldap://127.0.0.1:{slapd.port}"
    for cn, (mac, ip) in HOSTS.items():
        assert slapd.add_host(cn, mac, ip) == f"cn={cn},ou=hosts,dc=example,dc=net"
    assert _hosts(slapd) == HOSTS

    slapd.kill()
    assert not slapd.alive
    began = time.monotonic()
    assert slapd.start() is slapd
    assert time.monotonic() - began < 2.0
    assert _hosts(slapd) == HOSTS

    slapd.delete("cn=host-a,ou=hosts,dc=example,dc=net")
    slapd.add_ldif("dn: cn=host-c,ou=hosts,dc=example,dc=net\n"
                   "objectClass: device\nobjectClass: ieee802Device\nobjectClass: ipHost\n"
                   "cn: host-c\nmacAddress: 52:54:00:00:00:0c\nipHostNumber: 10.9.0.12\n")
    slapd.stop()
    slapd.start()
    assert _hosts(slapd) == {"host-b": HOSTS["host-b"],
                             "host-c": ("52:54:00:00:00:0c", "10.9.0.12")}
