"""appliancectl backup / restore without a running node: the SQLite snapshot,
the files the config names, path rewriting, refusal to overwrite."""

from __future__ import annotations

import io
import sqlite3
import tarfile
import threading

import pytest

from appliance.admin.ctl import main as ctl_main
from appliance.backup import RECOVER_MARKER, BackupError, backup, restore, snapshot_sqlite
from appliance.config import load_config


def make_store(path, rows=100):
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE keys (key TEXT PRIMARY KEY, kind TEXT, value TEXT, expires REAL)")
    conn.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)")
    for i in range(rows):
        conn.execute("INSERT INTO keys VALUES (?, 's', ?, NULL)", (f"k{i}", f"v{i}"))
    return conn


def test_snapshot_is_consistent_while_a_writer_commits(tmp_path):
    """Every snapshot is a state after a whole transaction: a writer moves 'a'
    and 'b' together in each transaction; the copy never shows them apart."""
    db = tmp_path / "store.sqlite3"
    conn = make_store(db, 0)
    conn.execute("INSERT INTO keys VALUES ('a', 's', '0', NULL)")
    conn.execute("INSERT INTO keys VALUES ('b', 's', '0', NULL)")
    stop = threading.Event()

    def writer():
        w = sqlite3.connect(str(db), isolation_level=None)
        n = 0
        while not stop.is_set():
            n += 1
            w.execute("BEGIN IMMEDIATE")
            w.execute("UPDATE keys SET value = ? WHERE key = 'a'", (str(n),))
            w.execute("INSERT INTO keys VALUES (?, 's', 'x', NULL)", (f"pad{n}",))
            w.execute("UPDATE keys SET value = ? WHERE key = 'b'", (str(n),))
            w.execute("COMMIT")
        w.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        for i in range(10):
            out = tmp_path / f"snap{i}.sqlite3"
            snapshot_sqlite(db, out)
            c = sqlite3.connect(str(out))
            a, b = (c.execute("SELECT value FROM keys WHERE key = ?", (k,)).fetchone()[0]
                    for k in ("a", "b"))
            assert a == b
            assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
            c.close()
    finally:
        stop.set()
        t.join()


@pytest.fixture
def node_dir(tmp_path):
    etc = tmp_path / "etc"
    keys = etc / "keys"
    keys.mkdir(parents=True)
    (keys / "cluster.key").write_text("k" * 64)
    (keys / "a.pem").write_text("CERT")
    (keys / "a.key").write_text("KEY")
    (keys / "ca.pem").write_text("CA")
    (etc / "ca").mkdir()
    (etc / "ca" / "ca.key").write_text("CA KEY")
    state = tmp_path / "state"
    state.mkdir()
    make_store(state / "store.sqlite3").close()
    (state / "admin.token").write_text("tok")
    cfg = etc / "appliance.toml"
    cfg.write_text(f"""
[node]
id = "a"
state_dir = "{state}"
[admin]
listen = "tcp:0:interface=127.0.0.1"
token_file = "{state}/admin.token"
[cluster]
peers = [{{ id = "b", address = "127.0.0.2" }}]
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:8742"
tls = {{ cert = "{keys}/a.pem", key = "{keys}/a.key", ca = "{keys}/ca.pem" }}
""")
    return tmp_path, cfg


def test_round_trip_rewrites_paths_and_restores_the_store(node_dir):
    tmp_path, cfg = node_dir
    archive = tmp_path / "a.tar.gz"
    m = backup(str(cfg), archive)
    names = tarfile.open(archive).getnames()
    assert "state/store.sqlite3" in names and "files/keys/a.key" in names
    assert not any("ca.key" in n for n in names)           # the CA key stays offline
    assert m["store"]["method"] == "sqlite3 online backup"
    r = restore(archive, tmp_path / "new-etc", state_dir=str(tmp_path / "new-state"))
    config = load_config(r["config"])
    new = tmp_path / "new-etc"
    assert config.node.state_dir == str((tmp_path / "new-state").resolve())
    assert config.cluster.auth_key_file == str((new / "keys" / "cluster.key").resolve())
    assert config.cluster.tls.key == str((new / "keys" / "a.key").resolve())
    assert (new / "keys" / "a.key").read_text() == "KEY"
    assert config.admin.token_file == str((tmp_path / "new-state").resolve() / "admin.token")
    c = sqlite3.connect(str(tmp_path / "new-state" / "store.sqlite3"))
    assert c.execute("SELECT count(*) FROM keys").fetchone()[0] == 100
    c.close()
    assert r["recover_marker"] is None                     # no dhcp4 failover here
    with pytest.raises(BackupError, match="exists"):
        restore(archive, new, state_dir=str(tmp_path / "new-state"))


def test_restore_marks_dhcp4_for_recover(node_dir):
    """With dhcp4 failover configured the restored node must resync first."""
    tmp_path, cfg = node_dir
    cfg.write_text(cfg.read_text() + """
[services.dhcp4]
failover = { peer = "b", role = "primary" }
""")
    archive = tmp_path / "a.tar.gz"
    backup(str(cfg), archive)
    r = restore(archive, tmp_path / "r", state_dir=str(tmp_path / "rs"))
    assert r["recover_marker"] == (tmp_path / "rs" / RECOVER_MARKER).resolve()
    assert r["recover_marker"].exists()


def test_ctl_dispatches_backup_and_restore(node_dir):
    tmp_path, cfg = node_dir
    out, err = io.StringIO(), io.StringIO()
    assert ctl_main(["--config", str(cfg), "backup", str(tmp_path / "b.tgz")],
                    stdout=out, stderr=err) == 0, err.getvalue()
    assert "backup of node a" in out.getvalue()
    assert ctl_main(["restore", str(tmp_path / "b.tgz"), "--dir", str(tmp_path / "r"),
                     "--state-dir", str(tmp_path / "rs")], stdout=out, stderr=err) == 0
    assert ctl_main(["restore", str(tmp_path / "nope.tgz"), "--dir", str(tmp_path / "r2")],
                    stdout=out, stderr=err) == 2
    assert "not a backup" in err.getvalue()


def test_dhcp4_recovers_after_restore_only_because_of_the_marker(tmp_path):
    """The dhcp4 service alone starts in RECOVER only for an *empty* lease store;
    a restored store holds (old) leases, so without the marker restore leaves it
    would rejoin as if its data were current.  With the marker: data_lost."""
    from tests.unit.test_dhcp4_failover_rules import service
    calls = []

    class Cluster:
        peerlink = None

        def register_partner(self, peer, listener, **kw):
            calls.append(kw)
            return "STARTUP"

    state = tmp_path / "state"
    state.mkdir()
    (state / "dhcp4.held-leases").touch()         # it held leases before the backup
    svc, _ = service(tmp_path / "s1", cluster=Cluster())
    svc.context.state_dir = state
    svc._records_at_start = 42                     # the restored store is not empty
    svc._setup_failover()
    assert calls[-1]["data_lost"] is False         # the gap restore has to close
    (state / RECOVER_MARKER).touch()               # what restore leaves
    svc2, _ = service(tmp_path / "s2", cluster=Cluster())
    svc2.context.state_dir = state
    svc2._records_at_start = 42
    svc2._setup_failover()
    assert calls[-1]["data_lost"] is True


def test_local_commands_after_global_options(node_dir):
    """Global options (with and without values, --opt=value) may precede backup."""
    tmp_path, cfg = node_dir
    out, err = io.StringIO(), io.StringIO()
    assert ctl_main(["--json", f"--config={cfg}", "--timeout", "3", "backup",
                     str(tmp_path / "c.tgz")], stdout=out, stderr=err) == 0, err.getvalue()
    assert (tmp_path / "c.tgz").exists()
