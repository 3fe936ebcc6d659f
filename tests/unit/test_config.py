"""Configuration parsing: typed objects out, ``file: key.path: problem`` errors."""

from __future__ import annotations

import ipaddress

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from appliance.config import DEMO_CONFIG, ConfigError, config_from_string, load_config

MINIMAL = """
[node]
id = "a"
state_dir = "var/a"
"""


def parse(text: str, plugins=None):
    return config_from_string(text, "etc/test.toml", plugins if plugins is not None else {})


def problems(text: str, plugins=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text, plugins)
    return info.value.problems


class FakeService:
    """A plugin whose table has one required IPv4 address and a port."""

    name = "fake"
    description = "test"

    def parse_config(self, table, context):
        pool = table.list("pool", None, ())
        addr = table.ip("address", version=4)
        port = table.int("port", 67, min=1, max=65535)
        peer = table.str("peer", None)
        if peer is not None and peer not in context.peer_ids:
            table.error("peer", f"{peer!r} is not a cluster peer")
        return {"address": addr, "port": port, "pool": pool}

    def make_service(self, config, context):  # pragma: no cover - not used here
        raise NotImplementedError


def test_minimal_config_defaults():
    """A node table alone gives a memory store and a loopback admin listener."""
    cfg = parse(MINIMAL)
    assert cfg.node.id == "a"
    assert cfg.store.backend == "memory"
    assert cfg.store.fsync == "always"
    assert cfg.admin.listen == "tcp:8740:interface=127.0.0.1"
    assert cfg.admin.token_file == "var/a/admin.token"
    assert cfg.cluster is None
    assert cfg.services == {}


def test_demo_config_is_valid():
    """The shipped demo config loads with the installed plugins."""
    cfg = load_config(DEMO_CONFIG)
    assert cfg.node.id == "demo"
    assert cfg.store.backend == "memory"
    assert "127.0.0.1" in cfg.admin.listen


def test_missing_node_table():
    """No [node] table is reported by name."""
    assert problems("[store]\nbackend = 'memory'\n") == ["etc/test.toml: node: missing (required)"]


def test_wrong_types_and_unknown_keys_reported_together():
    """Every problem of a file is reported in one go, each with its key path."""
    found = problems(MINIMAL + """
[store]
backend = "mongo"
fsync = 3
bogus = 1

[admin]
listen = "tcp:notaport"
max_request_bytes = "big"
""")
    assert ('etc/test.toml: store.backend: "mongo" is not one of "memory", "redis" ("embedded" '
            'and "sqlite" are aliases of "memory")') in found
    assert "etc/test.toml: store.fsync: expected a string, got integer 3" in found
    assert any(p.startswith("etc/test.toml: store.bogus: unknown key") for p in found)
    assert any(p.startswith("etc/test.toml: admin.listen:") and "not a server endpoint" in p
               for p in found)
    assert 'etc/test.toml: admin.max_request_bytes: expected an integer, got string "big"' in found
    assert len(found) == 5


def test_unknown_key_suggests_close_match():
    """A typo gets a did-you-mean hint."""
    found = problems(MINIMAL.replace('id = "a"', 'id = "a"\nstate_dri = "x"'))
    assert found == ["etc/test.toml: node.state_dri: unknown key (did you mean 'state_dir'?)"]


def test_invalid_toml_names_file():
    """A TOML syntax error names the file and the position."""
    found = problems("[node\nid=1")
    assert found[0].startswith("etc/test.toml: not valid TOML:")


def test_bad_node_id():
    """Node ids are restricted to a safe alphabet."""
    found = problems(MINIMAL.replace('"a"', '"Node A!"', 1))
    assert found == ['etc/test.toml: node.id: "Node A!" is not a node id (lowercase letters, '
                     "digits, '-', '_'; at most 32)"]


def test_redis_needs_url_or_sentinels():
    """backend = redis without a url or sentinels is an error."""
    found = problems(MINIMAL + '[store]\nbackend = "redis"\n')
    assert found == ['etc/test.toml: store.url: missing: backend "redis" needs url or '
                     "sentinels + master_name"]
    cfg = parse(MINIMAL + '[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:6379/0"\n')
    assert cfg.store.url == "redis://127.0.0.1:6379/0"
    found = problems(MINIMAL + '[store]\nbackend = "redis"\nsentinels = ["nohost"]\n')
    assert "etc/test.toml: store.master_name: missing: sentinels need master_name" in found
    assert 'etc/test.toml: store.sentinels[0]: "nohost" is not host:port' in found


def test_cluster_and_vips():
    """Peers, VIPs and their cross-references are checked."""
    cfg = parse(MINIMAL + """
[cluster]
peers = [{ id = "b", address = "10.9.0.2" }]
auth_key_file = "etc/cluster.key"

[[vip]]
name = "vip-dhcp"
address = "10.9.0.100/24"
interface = "veth0"
priority = { a = 200, b = 100 }
""")
    assert cfg.cluster.peers[0].address == ipaddress.ip_address("10.9.0.2")
    assert cfg.cluster.heartbeat_interval_ms == 100
    assert cfg.vips[0].address == ipaddress.ip_interface("10.9.0.100/24")
    assert dict(cfg.vips[0].priority) == {"a": 200, "b": 100}

    found = problems(MINIMAL + """
[cluster]
peers = [{ id = "a", address = "10.9.0.300" }, { id = "c", address = "10.9.0.3" }]

[[vip]]
name = "v"
address = "10.9.0.100"
interface = "veth0"
priority = { z = 1, c = 300 }
""")
    assert 'etc/test.toml: cluster.peers[0].address: "10.9.0.300" is not an IP address' in found
    assert "etc/test.toml: cluster.auth_key_file: missing: peers need an HMAC key file for heartbeats" in found
    assert 'etc/test.toml: vip[0].address: "10.9.0.100" needs a prefix length (e.g. 10.9.0.100/24)' in found
    assert "etc/test.toml: vip[0].priority.z: 'z' is neither this node nor a cluster peer" in found
    assert "etc/test.toml: vip[0].priority.c: 300 is above the maximum 255" in found


def test_service_table_parsed_by_plugin():
    """[services.KEY] goes to the plugin; its errors carry the full key path."""
    plugins = {"fake": FakeService()}
    cfg = parse(MINIMAL + '[services.fake]\naddress = "127.0.0.1"\nport = 6767\n', plugins)
    entry = cfg.services["fake"]
    assert entry.enabled is True
    assert entry.config["port"] == 6767
    assert cfg.enabled_services() == [entry]

    found = problems(MINIMAL + '[services.fake]\naddress = "10.0.0.300"\nport = 0\nextra = 1\n'
                     'peer = "zz"\nenabled = "yes"\n', plugins)
    assert 'etc/test.toml: services.fake.address: "10.0.0.300" is not an IPv4 address' in found
    assert "etc/test.toml: services.fake.port: 0 is below the minimum 1" in found
    assert any(p.startswith("etc/test.toml: services.fake.extra: unknown key") for p in found)
    assert "etc/test.toml: services.fake.peer: 'zz' is not a cluster peer" in found
    assert 'etc/test.toml: services.fake.enabled: expected true or false, got string "yes"' in found


def test_disabled_service_is_parsed_but_not_enabled():
    """enabled = false keeps the table validated but the service off."""
    cfg = parse(MINIMAL + '[services.fake]\nenabled = false\naddress = "127.0.0.1"\n',
                {"fake": FakeService()})
    assert cfg.services["fake"].enabled is False
    assert cfg.enabled_services() == []


def test_unknown_service():
    """A service key with no installed plugin is an error listing what is installed."""
    found = problems(MINIMAL + "[services.dhcp9]\n", {"fake": FakeService()})
    assert found == ["etc/test.toml: services.dhcp9: unknown service 'dhcp9' (installed: fake)"]


def test_missing_file():
    """A config file that cannot be read is one clear line."""
    with pytest.raises(ConfigError) as info:
        load_config("/nonexistent/x.toml", {})
    assert str(info.value).startswith("/nonexistent/x.toml: cannot read:")


def test_client_ca_needs_tls_listener():
    """Mutual TLS on a plain TCP listener is refused."""
    found = problems(MINIMAL + '[admin]\nclient_ca = "ca.pem"\n')
    assert found == ['etc/test.toml: admin.client_ca: needs an "ssl:" listen endpoint '
                     "(client certificates need TLS)"]


scalars = st.one_of(st.integers(-10**6, 10**6), st.text(max_size=20), st.booleans(),
                    st.floats(allow_nan=False), st.lists(st.integers(), max_size=3))
keys = st.sampled_from(["id", "state_dir", "backend", "fsync", "listen", "url", "peers",
                        "token_file", "heartbeat_port", "address", "name", "priority", "x"])
tables = st.dictionaries(keys, scalars, max_size=6)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["node", "store", "admin", "cluster", "vip", "services"]),
                       tables, max_size=5))
def test_arbitrary_documents_never_crash(doc):
    """Any TOML-shaped document either parses or raises ConfigError with file-prefixed lines."""
    from appliance.config import _parse
    try:
        _parse(doc, "f.toml", {})
    except ConfigError as e:
        assert e.problems and all(p.startswith("f.toml: ") for p in e.problems)


# -- store (issue 10: SQLite embedded store, redis checks as the runtime does) ----------
@pytest.mark.parametrize("backend", ["memory", "embedded", "sqlite"])
def test_store_backend_aliases(backend):
    """"embedded" and "sqlite" are aliases of the canonical "memory" backend."""
    cfg = parse(MINIMAL + f'[store]\nbackend = "{backend}"\nfsync = "batch"\n')
    assert cfg.store.backend == "memory" and cfg.store.fsync == "batch"


def test_compact_after_bytes_is_gone():
    """The old journal key is refused with a clear reason (not just "unknown key")."""
    found = problems(MINIMAL + "[store]\ncompact_after_bytes = 8388608\n")
    assert found == ["etc/test.toml: store.compact_after_bytes: no longer used: the embedded "
                     "store runs on SQLite; remove this key"]


def test_redis_replica_keys():
    """min_replicas_acked / replicas_timeout_ms: redis only, ranges checked."""
    cfg = parse(MINIMAL + '[store]\nbackend = "redis"\nurl = "redis://127.0.0.1:6379/0"\n'
                'min_replicas_acked = 1\nreplicas_timeout_ms = 250\n')
    assert (cfg.store.min_replicas_acked, cfg.store.replicas_timeout_ms) == (1, 250)
    assert parse(MINIMAL).store.min_replicas_acked == 0
    assert parse(MINIMAL).store.replicas_timeout_ms == 1000
    found = problems(MINIMAL + '[store]\nbackend = "redis"\nurl = "redis://h/0"\n'
                     "min_replicas_acked = -1\n")
    assert found == ["etc/test.toml: store.min_replicas_acked: -1 is below the minimum 0"]
    found = problems(MINIMAL + "[store]\nmin_replicas_acked = 1\n")
    assert found == ['etc/test.toml: store.min_replicas_acked: only for backend "redis"']


@pytest.mark.parametrize("url, why", [
    ("rediss://127.0.0.1:6379/0", "scheme must be redis:// or unix://"),
    ("redis://127.0.0.1:99999/0", "Port out of range"),
    ("redis://127.0.0.1:6379/x", "db must be a number"),
])
def test_redis_url_checked_by_the_runtime_parser(url, why):
    """--check refuses every URL the Redis store would refuse at start (review M5)."""
    found = problems(MINIMAL + f'[store]\nbackend = "redis"\nurl = "{url}"\n')
    assert len(found) == 1 and found[0].startswith("etc/test.toml: store.url: ") and why in found[0]


def test_redis_sentinels_accept_ipv6():
    """Sentinels: host:port and [v6]:port, as the store splits them."""
    cfg = parse(MINIMAL + '[store]\nbackend = "redis"\nmaster_name = "m"\n'
                'sentinels = ["[::1]:26379", "sentinel-1:26379", "127.0.0.1:26380"]\n')
    assert cfg.store.sentinels == ("[::1]:26379", "sentinel-1:26379", "127.0.0.1:26380")
    found = problems(MINIMAL + '[store]\nbackend = "redis"\nmaster_name = "m"\n'
                     'sentinels = ["::1:26379", "[nope]:1", "h:0"]\n')
    assert [p.split(": ", 2)[1] for p in found] == [
        "store.sentinels[0]", "store.sentinels[1]", "store.sentinels[2]"]


# -- endpoints: Twisted's own parser (review M5) ---------------------------------------
def test_ipv6_admin_endpoint_with_escapes():
    """tcp6 with an escaped IPv6 interface is accepted (it was refused)."""
    cfg = parse(MINIMAL + '[admin]\nlisten = "tcp6:8740:interface=\\\\:\\\\:1"\n')
    assert cfg.admin.listen == r"tcp6:8740:interface=\:\:1"


@pytest.mark.parametrize("listen, why", [
    ("ssl:8740", "needs privateKey="),
    ("ssl:8740:privateKey=/nonexistent/k.pem", "cannot read /nonexistent/k.pem"),
    ("tcp:8740:bogus=1", "unknown option 'bogus'"),
    ("tcp:99999", "port 99999 is not a number 0..65535"),
    ("tcp:8740:interface=10.0.0.300", "is not an IP address"),
    ("nope:1", "Unknown endpoint type"),
])
def test_admin_endpoint_refused_like_the_runtime(listen, why):
    """Endpoints the runtime cannot build are config errors, with Twisted's reason."""
    found = problems(MINIMAL + f'[admin]\nlisten = "{listen}"\n')
    assert len(found) == 1 and found[0].startswith(f'etc/test.toml: admin.listen: "{listen}" '
                                                   "is not a server endpoint: ")
    assert why in found[0]


def test_ssl_admin_endpoint_with_real_key(tmp_path):
    """An ssl: listener whose key and certificate exist passes (Twisted loads them)."""
    from appliance.net.tls import make_ca, make_cert, write_pem
    ca_cert, ca_key = make_ca("test-ca")
    cert, key = make_cert(ca_cert, ca_key, "localhost")
    write_pem(tmp_path / "c.pem", cert)
    write_pem(tmp_path / "k.pem", key, private=True)
    listen = f"ssl:8740:interface=127.0.0.1:privateKey={tmp_path}/k.pem:certKey={tmp_path}/c.pem"
    assert parse(MINIMAL + f'[admin]\nlisten = "{listen}"\n').admin.listen == listen


def test_peer_link_ssl_without_key_in_string():
    """cluster.peer_link takes its TLS files from [cluster.tls]: "ssl:8742" is fine there."""
    cfg = parse(MINIMAL + '[cluster]\npeer_link = "ssl:8742"\n'
                'tls = { cert = "c.pem", key = "k.pem", ca = "ca.pem" }\n')
    assert cfg.cluster.peer_link == "ssl:8742"
