"""Review M7: the heartbeat key rotates without a split-brain window (accept the current
or the previous key, send with the current one; reload without a restart); the
peer-link certificates' expiry is shown; appliance-keys safeguards."""

from __future__ import annotations

import dataclasses
import datetime

import pytest

from appliance.cluster.heartbeat import Heartbeat, HeartbeatVerifier, encode
from tests.unit.test_cluster_manager import (ADDR, _owner_changes, make_pair, owners, run,  # noqa: F401
                                             start, tmp_state)

OLD, NEW = b"o" * 32, b"n" * 32


def test_verifier_accepts_the_previous_key_and_counts_it():
    v = HeartbeatVerifier(NEW, "a", ["b"], previous_keys=(OLD,))
    assert v.accept(encode(Heartbeat("b", 1, 1, 0.0), OLD)) is not None
    assert v.accept(encode(Heartbeat("b", 1, 2, 0.0), NEW)) is not None
    assert v.accept(encode(Heartbeat("b", 1, 3, 0.0), b"x" * 32)) is None
    assert dict(v.accepted_by_key) == {"previous": 1, "current": 1}
    assert v.drops["bad_mac"] == 1


def _keyed_pair(tmp_path):
    clock, net, nodes = make_pair()
    files = {}
    for n, m in nodes.items():
        cur, prev = tmp_path / f"{n}.key", tmp_path / f"{n}.previous.key"
        cur.write_bytes(OLD + b"\n")
        files[n] = (cur, prev)
        m.cfg = dataclasses.replace(m.cfg, auth_key_file=str(cur))
        m._key = None                 # read from the file at start
    return clock, net, nodes, files


def _settled(clock, nodes, seconds=1.0):
    run(clock, seconds)
    assert owners(nodes) == ["a"]


def test_rotation_one_node_after_the_other_without_suspicion(tmp_path):
    """The documented procedure (etc/README, "Rotating the heartbeat key"), one node
    after the other: 1. accept the new key everywhere (previous_auth_key_file = new);
    2. sign with the new key (auth_key_file = new, previous = old); 3. drop the old.
    Nobody suspects anybody, no beat is dropped, the owner never changes."""
    clock, net, nodes, files = _keyed_pair(tmp_path)
    start(clock, nodes)
    _settled(clock, nodes)

    def step(n, current, previous):
        cur, prev = files[n]
        cur.write_bytes(current + b"\n")
        m = nodes[n]
        if previous is None:
            m.cfg = dataclasses.replace(m.cfg, previous_auth_key_file=None)
        else:
            prev.write_bytes(previous + b"\n")
            m.cfg = dataclasses.replace(m.cfg, previous_auth_key_file=str(prev))
        m.reload_keys()
        _settled(clock, nodes, 0.7)

    for n in ("a", "b"):
        step(n, OLD, NEW)          # 1. accept the new key too
    for n in ("a", "b"):
        step(n, NEW, OLD)          # 2. sign with the new key
    for n in ("a", "b"):
        step(n, NEW, None)         # 3. forget the old one
    for n, m in nodes.items():
        other = "b" if n == "a" else "a"
        assert m.peers[other].suspected == 0
        assert m.verifier.drops["bad_mac"] == 0, m.verifier.drops
    assert _owner_changes(nodes["b"]) == 0
    st = nodes["b"].status()
    assert st["keys"]["accepted_by_key"]["previous"] > 0


def test_switching_keys_without_the_procedure_is_a_split_brain(tmp_path):
    """The control: one node signing with a key its peer does not accept is dead to it."""
    clock, net, nodes, files = _keyed_pair(tmp_path)
    start(clock, nodes)
    _settled(clock, nodes)
    files["a"][0].write_bytes(NEW + b"\n")
    nodes["a"].reload_keys()
    run(clock, 1.0)
    assert nodes["b"].peers["a"].suspected == 1 and owners(nodes) == ["a", "b"]


def test_previous_auth_key_file_config():
    from appliance.config import config_from_string
    base = ('[node]\nid = "a"\nstate_dir = "/tmp/apl-cfg"\n\n[cluster]\n'
            'peers = [{ id = "b", address = "10.9.0.2" }]\nauth_key_file = "k"\n')
    assert config_from_string(base, "t.toml", {}).cluster.previous_auth_key_file is None
    c = config_from_string(base + 'previous_auth_key_file = "old.key"\n', "t.toml", {}).cluster
    assert c.previous_auth_key_file.endswith("old.key")


# -- certificate expiry ---------------------------------------------------------------
def _cert(tmp_path, days):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
    path = tmp_path / f"cert-{days}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def test_cert_expiry_in_status_metrics_and_a_warning_under_30_days(tmp_path):
    from appliance.config import TLSFiles
    clock, net, nodes = make_pair()
    m = nodes["a"]
    m.cfg = dataclasses.replace(m.cfg, tls=TLSFiles(_cert(tmp_path, 12), "unused.key",
                                                    _cert(tmp_path, 3650)))
    m.startService()
    st = m.status()
    assert 11 < st["tls"]["cert"]["days_left"] <= 12 and st["tls"]["ca"]["days_left"] > 3000
    assert any("expires in" in w and "cert" in w for w in st["warnings"]), st["warnings"]
    assert not any("peer-link ca" in w for w in st["warnings"])
    metrics = {(f.name, s.labels.get("which")): s.value for f in m.collect() for s in f.samples}
    assert 11 < metrics[("appliance_cluster_cert_expiry_days", "cert")] <= 12
    text = __import__("appliance.admin.ctl", fromlist=["x"]).render_cluster(st)
    assert "WARNING: peer-link cert" in text
    m.stopService()


# -- node ids and appliance-keys --------------------------------------------------------
def test_node_ids_must_be_dns_labels():
    """An id with '_' passed validation, then PeerLink's TLS dial (idna) refused it and the
    cluster failed to start; now the config names the problem."""
    from appliance.config import ConfigError, config_from_string
    for bad in ('[node]\nid = "node_a"\nstate_dir = "/tmp/x"\n',
                '[node]\nid = "a"\nstate_dir = "/tmp/x"\n[cluster]\nauth_key_file = "k"\n'
                'peers = [{ id = "node_b", address = "10.0.0.2" }]\n'):
        with pytest.raises(ConfigError) as e:
            config_from_string(bad, "t.toml", {})
        assert any("not a DNS label" in p and "_" in p for p in e.value.problems), e.value.problems
    config_from_string('[node]\nid = "node-a1"\nstate_dir = "/tmp/x"\n', "t.toml", {})


def test_appliance_keys_bundles_and_ca_safeguards(tmp_path, capsys):
    import os
    from appliance.cluster import keys
    d = tmp_path / "pki"
    assert keys.main([str(d), "--node", "a=10.0.0.1", "--node", "b=10.0.0.2"]) == 0
    for n, other in (("a", "b"), ("b", "a")):
        bundle = sorted(p.name for p in (d / n).iterdir())
        assert bundle == sorted(["ca.pem", "cluster.key", f"{n}.key", f"{n}.pem"]), bundle
        assert os.stat(d / n / f"{n}.key").st_mode & 0o777 == 0o600
        assert (d / n / "cluster.key").read_bytes() == (d / "cluster.key").read_bytes()
    assert not list(tmp_path.rglob(".*.key.*")), "no temporary files left"
    ca = (d / "ca.pem").read_bytes()
    (d / "ca.key").rename(tmp_path / "offline-ca.key")
    assert keys.main([str(d), "--node", "c=10.0.0.3"]) == 2
    assert "--force-new-ca" in capsys.readouterr().err
    assert (d / "ca.pem").read_bytes() == ca and not (d / "c.pem").exists()
    assert keys.main([str(d), "--node", "c=10.0.0.3", "--force-new-ca"]) == 0
    assert (d / "ca.pem").read_bytes() != ca
    assert keys.main([str(d), "--node", "node_d=10.0.0.4"]) == 2
    assert "DNS label" in capsys.readouterr().err
