"""The sip service in a running node (twistd subprocess), driven by real ``sipp``
scenarios and raw sockets on loopback: register/refresh/423/redirect/wildcard/480/404/420,
unique users over UDP and TCP all stored, a retransmitted REGISTER answered with the same
bytes and no second write, malformed input answered 400, appliancectl bindings."""

from __future__ import annotations

import socket
import time

import pytest

from tests.support import sipp
from tests.support.node_process import NodeProcess, free_port
from tests.support.require import require_binary

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    require_binary("sipp")
    tmp = tmp_path_factory.mktemp("sipnode")
    port = free_port()
    n = NodeProcess(tmp, f"""
[services.sip]
listen_address = "127.0.0.1"
port = {port}
tcp = "tcp:{port}:interface=127.0.0.1"
domains = ["example.test"]
min_expires = 60
""").start()
    n.sip_port = port
    try:
        yield n
    finally:
        n.terminate()


def result(node, method, params=None):
    reply = node.rpc(method, params)
    assert "error" not in reply, reply
    return reply["result"]


def test_lifecycle_scenario(node, tmp_path):
    """Per user: register, refresh, 423, INVITE -> 302 with the contact (ACKed),
    wildcard unregister, INVITE -> 480, unknown user -> 404, Require -> 420."""
    r = sipp.run_sipp(tmp_path, sipp.lifecycle(), f"127.0.0.1:{node.sip_port}", calls=20, rate=40)
    assert r.ok and r.successful == 20, (r.stdout, r.errors, node.output()[-3000:])
    assert result(node, "sip.bindings", {"aor": "sip:life1@example.test"})["bindings"] == []


@pytest.mark.parametrize("transport,prefix,calls", [("u1", "udp", 300), ("t1", "tcp", 100)])
def test_unique_users_all_stored(node, tmp_path, transport, prefix, calls):
    """Every 200 OK sipp saw is a binding the node lists (unique users, UDP and TCP)."""
    r = sipp.run_sipp(tmp_path, sipp.register_only(prefix=prefix), f"127.0.0.1:{node.sip_port}",
                      calls=calls, rate=200, transport=transport)
    assert r.ok and r.successful == calls, (r.stdout, r.errors)
    rows = result(node, "sip.bindings")["bindings"]
    mine = {row["aor"] for row in rows if row["aor"].startswith(f"sip:{prefix}")}
    assert len(mine) == calls
    now = time.time()
    assert all(3500 < row["expires"] - now <= 3600 for row in rows if row["aor"] in mine)


def _request(branch: str, user: str, cseq: int = 1, extra: str = "") -> bytes:
    return (f"REGISTER sip:example.test SIP/2.0\r\n"
            f"Via: SIP/2.0/UDP 127.0.0.1:9;branch={branch};rport\r\n"
            f"From: <sip:{user}@example.test>;tag=a\r\nTo: <sip:{user}@example.test>\r\n"
            f"Call-ID: {branch}@test\r\nCSeq: {cseq} REGISTER\r\n"
            f"Contact: <sip:{user}@127.0.0.1:9>\r\n{extra}Content-Length: 0\r\n\r\n").encode()


def _exchange(sock, port, data, n=1, timeout=5.0):
    sock.sendto(data, ("127.0.0.1", port))
    sock.settimeout(timeout)
    return [sock.recv(65535) for _ in range(n)]


def test_retransmission_same_answer_no_second_write(node):
    """The same REGISTER sent again gets the same bytes; the node counts a resent
    answer and the binding keeps the first write (one binding, CSeq 1)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        data = _request("z9hG4bKretrans1", "rt")
        [first] = _exchange(s, node.sip_port, data)
        before = result(node, "sip.stats")["counters"]["responses_resent"]
        [second] = _exchange(s, node.sip_port, data)
    assert first.startswith(b"SIP/2.0 200 OK") and second == first
    assert result(node, "sip.stats")["counters"]["responses_resent"] == before + 1
    rows = result(node, "sip.bindings", {"aor": "sip:rt@example.test"})["bindings"]
    assert [(r["cseq"], r["call_id"]) for r in rows] == [(1, "z9hG4bKretrans1@test")]


def test_malformed_gets_400_with_reason_and_garbage_is_counted(node):
    """A REGISTER with a bad Expires gets 400 naming it; bytes that are no SIP are a drop."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        [answer] = _exchange(s, node.sip_port,
                             _request("z9hG4bKbad", "bad", extra="Expires: soon\r\n"))
        assert answer.startswith(b"SIP/2.0 400 Bad Expires header")
        before = result(node, "sip.stats")["drops"].get("malformed", 0)
        s.sendto(b"\x16\x03\x01 definitely not SIP\r\n\r\n", ("127.0.0.1", node.sip_port))
        deadline = time.monotonic() + 5
        while result(node, "sip.stats")["drops"].get("malformed", 0) == before:
            assert time.monotonic() < deadline, "drop not counted"
            time.sleep(0.05)


def test_appliancectl_bindings_and_unregister(node):
    """appliancectl bindings --aor shows the contact; sip.unregister removes it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        [ok] = _exchange(s, node.sip_port, _request("z9hG4bKctl", "ctl"))
    assert ok.startswith(b"SIP/2.0 200 OK")
    out = node.ctl("bindings", "--aor", "ctl@example.test")
    assert out.returncode == 0 and "sip:ctl@127.0.0.1:9" in out.stdout, out
    assert result(node, "sip.unregister", {"aor": "sip:ctl@example.test"})["removed"] == 1
    bad = node.rpc("sip.unregister", {"aor": "tel:+1555"})
    assert bad["error"]["code"] == -32602
