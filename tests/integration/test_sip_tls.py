"""SIP over TLS in a running node: a REGISTER and an OPTIONS written in one TLS record
are framed by Content-Length and both answered on the connection; the binding is stored."""

from __future__ import annotations

import socket
import ssl

import pytest

from appliance.net.tls import make_ca, make_cert, write_pem
from tests.support.node_process import NodeProcess, free_port

pytestmark = pytest.mark.integration


def test_register_over_tls(tmp_path):
    """TLS listener from an ssl: endpoint string; two pipelined requests, two answers."""
    ca_cert, ca_key = make_ca("sip-test-ca")
    cert, key = make_cert(ca_cert, ca_key, "127.0.0.1")
    write_pem(tmp_path / "ca.pem", ca_cert)
    write_pem(tmp_path / "cert.pem", cert)
    write_pem(tmp_path / "key.pem", key, private=True)
    port = free_port()
    node = NodeProcess(tmp_path, f"""
[services.sip]
listen_address = "127.0.0.1"
port = 0
tls = "ssl:{port}:interface=127.0.0.1:privateKey={tmp_path / 'key.pem'}:certKey={tmp_path / 'cert.pem'}"
""").start()
    try:
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        reg = ("REGISTER sip:example.test SIP/2.0\r\n"
               "Via: SIP/2.0/TLS 127.0.0.1:5061;branch=z9hG4bKtls1\r\n"
               "From: <sip:tls@example.test>;tag=1\r\nTo: <sip:tls@example.test>\r\n"
               "Call-ID: tls-1\r\nCSeq: 1 REGISTER\r\n"
               "Contact: <sips:tls@127.0.0.1:5061>\r\nContent-Length: 0\r\n\r\n")
        opt = (reg.replace("REGISTER sip", "OPTIONS sip").replace("1 REGISTER", "1 OPTIONS")
               .replace("z9hG4bKtls1", "z9hG4bKtls2"))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall((reg + opt).encode())
                data = b""
                while data.count(b"SIP/2.0 200 OK") < 2:
                    chunk = s.recv(65535)
                    assert chunk, data
                    data += chunk
        assert b"CSeq: 1 REGISTER" in data and b"CSeq: 1 OPTIONS" in data
        rows = node.rpc("sip.bindings", {"aor": "sip:tls@example.test"})["result"]["bindings"]
        assert [r["contact"] for r in rows] == ["sips:tls@127.0.0.1:5061"]
        assert rows[0]["received"].startswith("tls:127.0.0.1:")
    finally:
        node.terminate()
