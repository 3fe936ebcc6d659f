"""cluster init / join in one process: the join server in a thread on loopback."""

from __future__ import annotations

import io
import json
import stat
import threading
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import bootstrap
from appliance.bootstrap import (BootstrapError, JoinServer, init_cluster, issue_token,
                                 join_cluster, make_token, parse_token)
from appliance.config import load_config


def test_token_round_trip_and_damage():
    t = make_token(b"s" * 16, "ab" * 32, 1234, 8743)
    assert t.startswith("apj1.")
    p = parse_token(t)
    assert p == {"secret": b"s" * 16, "fingerprint": "ab" * 32, "expires": 1234, "port": 8743}
    with pytest.raises(BootstrapError):
        parse_token(t[:-6])
    with pytest.raises(BootstrapError):
        parse_token("hello")


def _init(tmp_path, **kw):
    a = tmp_path / "a"
    init_cluster(a, "a", "127.0.0.1", state_dir=str(tmp_path / "state-a"),
                 admin_listen="tcp:0:interface=127.0.0.1", **kw)
    return a


def test_init_keeps_the_ca_key_apart_and_private(tmp_path):
    a = _init(tmp_path)
    assert stat.S_IMODE((a / "ca").stat().st_mode) == 0o700
    assert stat.S_IMODE((a / "ca" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((a / "keys" / "a.key").stat().st_mode) in (0o600, 0o640)
    assert not (a / "keys" / "ca.key").exists()
    assert not any("PRIVATE KEY" in p.read_text() for p in (a / "keys").glob("*.pem"))
    config = load_config(a / "appliance.toml")
    assert config.node.id == "a" and config.cluster.peers == ()
    assert config.cluster.tls.ca == str((a / "keys" / "ca.pem").resolve())
    with pytest.raises(BootstrapError):          # no second init over the first
        _init(tmp_path)


@pytest.fixture
def served(tmp_path):
    a = _init(tmp_path)
    log = io.StringIO()
    server = JoinServer(a, ("127.0.0.1", 0), log=log)
    token = issue_token(a, 3600, server.port)
    thread = threading.Thread(target=server.serve, args=(time.time() + 30,), daemon=True)
    thread.start()
    yield a, server, token, thread, log
    server.close()


def _join(tmp_path, token, server, node_id="b", address="127.0.0.2", **kw):
    return join_cluster(token, f"127.0.0.1:{server.port}", tmp_path / node_id, node_id, address,
                        state_dir=str(tmp_path / f"state-{node_id}"),
                        admin_listen="tcp:0:interface=127.0.0.1", **kw)


def test_join_writes_a_config_both_sides_accept(tmp_path, served):
    a, server, token, thread, log = served
    out = _join(tmp_path, token, server)
    thread.join(10)
    b = tmp_path / "b"
    assert out["peers"] == [("a", "127.0.0.1")]
    ca, cb = load_config(a / "appliance.toml"), load_config(b / "appliance.toml")
    assert [(p.id, str(p.address)) for p in ca.cluster.peers] == [("b", "127.0.0.2")]
    assert [(p.id, str(p.address)) for p in cb.cluster.peers] == [("a", "127.0.0.1")]
    assert (a / "keys" / "cluster.key").read_text() == (b / "keys" / "cluster.key").read_text()
    assert (a / "keys" / "ca.pem").read_bytes() == (b / "keys" / "ca.pem").read_bytes()
    assert cb.cluster.heartbeat_port == ca.cluster.heartbeat_port
    # b's certificate: for b's own key (made on b), names b and its address, signed by the CA
    cert = x509.load_pem_x509_certificate((b / "keys" / "b.pem").read_bytes())
    key = serialization.load_pem_private_key((b / "keys" / "b.key").read_bytes(), None)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((a / "keys" / "ca.pem").read_bytes()))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(x) for x in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.2"]
    assert not (b / "ca").exists()             # the CA key stays on a
    assert not (a / "keys" / "b.key").exists()
    tokens = json.loads((a / "ca" / "join-tokens.json").read_text())
    assert [v["used"] for v in tokens.values()] == ["b"]
    assert bootstrap.TOKEN_PREFIX not in (a / "ca" / "join-tokens.json").read_text()


def test_token_is_single_use(tmp_path, served):
    a, server, token, thread, log = served
    server_thread_joins = server.joined
    _join(tmp_path, token, server)
    thread.join(10)
    assert len(server_thread_joins) == 1
    again = threading.Thread(target=server.serve, args=(time.time() + 30, 2), daemon=True)
    again.start()
    with pytest.raises(BootstrapError, match="already used"):
        _join(tmp_path, token, server, node_id="c", address="127.0.0.3")
    assert not (tmp_path / "c" / "appliance.toml").exists()


def test_expired_token_is_refused_by_the_server(tmp_path, served):
    a, server, token, thread, log = served
    tokens_file = a / "ca" / "join-tokens.json"
    tokens = json.loads(tokens_file.read_text())
    for v in tokens.values():
        v["expires"] = time.time() - 1
    tokens_file.write_text(json.dumps(tokens))
    with pytest.raises(BootstrapError, match="expired"):
        _join(tmp_path, token, server)


def test_wrong_fingerprint_is_not_the_cluster(tmp_path, served):
    """A server whose CA is not the token's (a man in the middle) gets nothing:
    the joiner stops before sending the secret."""
    a, server, token, thread, log = served
    t = parse_token(token)
    forged = make_token(t["secret"], "00" * 32, t["expires"], t["port"])
    with pytest.raises(BootstrapError, match="fingerprint"):
        _join(tmp_path, forged, server)
    assert not (tmp_path / "b" / "appliance.toml").exists()
    # the real token still works: the forged attempt did not burn it
    _join(tmp_path, token, server)


def test_wrong_secret_is_refused(tmp_path, served):
    a, server, token, thread, log = served
    t = parse_token(token)
    guessed = make_token(b"x" * 16, t["fingerprint"], t["expires"], t["port"])
    with pytest.raises(BootstrapError, match="unknown join token"):
        _join(tmp_path, guessed, server)


def test_invite_serves_a_new_token_for_another_box(tmp_path, served):
    """``cluster invite`` (the CA key back in place): a fresh token, one more join."""
    a, server, token, thread, log = served
    _join(tmp_path, token, server)
    thread.join(10)
    server.close()
    token_file = tmp_path / "invite.token"
    out, err = io.StringIO(), io.StringIO()
    result = []
    t = threading.Thread(target=lambda: result.append(bootstrap.cluster_main(
        ["invite", "--dir", str(a), "--join-port", "0", "--listen", "127.0.0.1",
         "--token-ttl", "30", "--token-file", str(token_file)], out, err)), daemon=True)
    t.start()
    deadline = time.time() + 10
    while not token_file.exists() and time.time() < deadline:
        time.sleep(0.02)
    new_token = token_file.read_text().strip()
    assert new_token != token
    join_cluster(new_token, "127.0.0.1", tmp_path / "c", "c", "127.0.0.3",
                 state_dir=str(tmp_path / "state-c"), admin_listen="tcp:0:interface=127.0.0.1")
    t.join(10)
    assert result == [0], err.getvalue()
    peers = [(p.id, str(p.address)) for p in load_config(a / "appliance.toml").cluster.peers]
    assert peers == [("b", "127.0.0.2"), ("c", "127.0.0.3")]


@pytest.mark.parametrize("node_id", ["node_b", "-b", "b-", "ab--c", "B"])
def test_node_ids_must_be_dns_labels(tmp_path, node_id):
    """The same rule as the config's (the peer link checks ids as TLS host names)."""
    with pytest.raises(BootstrapError, match="DNS label"):
        init_cluster(tmp_path / "x", node_id, "127.0.0.1", state_dir=str(tmp_path / "s"),
                     admin_listen="tcp:0:interface=127.0.0.1")
