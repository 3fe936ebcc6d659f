"""Digest credentials from a real slapd in a running node: the first configured server
is down (a closed port) and auth still works through the second; with the directory
stopped, the last good answer is used (stale_served), and a user it never answered for
gets 503."""

from __future__ import annotations

import socket

import pytest

from tests.support.node_process import NodeProcess, free_port
from tests.unit.test_sip_auth import answer

pytestmark = pytest.mark.integration
REALM = "example.test"


def register(sock, port, user, password, n, authorization=None):
    extra = f"Authorization: {authorization}\r\n" if authorization else ""
    data = (f"REGISTER sip:{REALM} SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKldap{user}{n}\r\n"
            f"From: <sip:{user}@{REALM}>;tag=1\r\nTo: <sip:{user}@{REALM}>\r\n"
            f"Call-ID: ldap-{user}-{n}\r\nCSeq: {n} REGISTER\r\n"
            f"Contact: <sip:{user}@127.0.0.1:9>\r\n{extra}Content-Length: 0\r\n\r\n").encode()
    sock.sendto(data, ("127.0.0.1", port))
    sock.settimeout(10)
    return sock.recv(65535).decode()


def digest_register(sock, port, user, password, n):
    """REGISTER, take the challenge, REGISTER again with credentials: the final status line."""
    first = register(sock, port, user, password, n)
    if not first.startswith("SIP/2.0 401"):
        return first.split("\r\n", 1)[0]
    challenge = next(line.split(":", 1)[1].strip() for line in first.split("\r\n")
                     if line.lower().startswith("www-authenticate:"))
    second = register(sock, port, user, password, n + 1,
                      answer(challenge, user, password, uri=f"sip:{REALM}"))
    return second.split("\r\n", 1)[0]


def test_ldap_failover_and_last_good_answer(slapd, tmp_path):
    """Dead first server: auth via the second; directory stopped: cached answer (stale),
    unknown-to-cache user: 503; wrong password: 401."""
    slapd.add_ldif(f"""dn: ou=people,{slapd.base_dn}
objectClass: organizationalUnit
ou: people

dn: uid=alice,ou=people,{slapd.base_dn}
objectClass: inetOrgPerson
uid: alice
cn: Alice
sn: A
userPassword: wonderland

dn: uid=bob,ou=people,{slapd.base_dn}
objectClass: inetOrgPerson
uid: bob
cn: Bob
sn: B
userPassword: builder
""")
    (tmp_path / "ldap.pw").write_text(slapd.admin_password)
    dead = free_port()
    port = free_port()
    node = NodeProcess(tmp_path, f"""
[services.sip]
listen_address = "127.0.0.1"
port = {port}

[services.sip.auth]
realm = "{REALM}"
algorithms = ["MD5"]

[services.sip.auth.ldap]
servers = ["ldap://127.0.0.1:{dead}", "{slapd.url}"]
base_dn = "ou=people,{slapd.base_dn}"
bind_dn = "{slapd.admin_dn}"
password_file = "{tmp_path / 'ldap.pw'}"
timeout_s = 1
cache_ttl_s = 0
serve_stale = true
""").start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            assert digest_register(s, port, "alice", "wonderland", 1) == "SIP/2.0 200 OK"
            assert digest_register(s, port, "alice", "wrong", 10).startswith("SIP/2.0 401")
            slapd.stop()
            assert digest_register(s, port, "alice", "wonderland", 20) == "SIP/2.0 200 OK"
            assert digest_register(s, port, "bob", "builder", 30).startswith("SIP/2.0 503")
        stats = node.rpc("sip.stats")["result"]
        assert stats["ldap"]["stale_served"] >= 1 and stats["ldap"]["errors"] >= 2
        assert stats["auth"]["directory_unavailable"] == 1
    finally:
        node.terminate()
