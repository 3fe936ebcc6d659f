"""The [services.dns] table through appliance.config (services.dns.config)."""

from __future__ import annotations

import pytest

from appliance.config import ConfigError, config_from_string
from services.dns.plugin import dns_plugin

KEY = 'key "appliance-key" { algorithm hmac-sha256; secret "rOCVIKJ7soCh+x7zgbchEgUzzIU7gM4ToLfTmkUx/xU="; };\n'


def toml(tmp_path, dns_body: str) -> str:
    (tmp_path / "dns.key").write_text(KEY)
    (tmp_path / "cluster.key").write_text("k" * 32)
    return f"""
[node]
id = "a"
state_dir = "{tmp_path}/state"
[cluster]
peers = [{{ id = "b", address = "127.0.0.2" }}]
auth_key_file = "{tmp_path}/cluster.key"
[[vip]]
name = "vip-sip"
address = "10.9.0.100/24"
interface = "lo"
priority = {{ a = 200, b = 100 }}
[services.dns]
servers = ["127.0.0.1:5353", "127.0.0.2"]
tsig_key_file = "{tmp_path}/dns.key"
zones = ["example.test."]
{dns_body}
"""


def parse(text):
    return config_from_string(text, "etc/dns.toml", plugins={"dns": dns_plugin})


def test_valid_config(tmp_path):
    """Servers, key, zones, defaults and records parse into a frozen DNSConfig."""
    cfg = parse(toml(tmp_path, """
default_ttl = 0
[[services.dns.records]]
name = "_sip._udp.example.test."
type = "SRV"
resource = "vip-sip"
values = { a = "10 5 5060 a.example.test.", b = "20 5 5060 b.example.test." }
[[services.dns.records]]
name = "reg.example.test."
type = "L64"
ttl = 3
resource = "sip:registrar"
values = { a = "10 2001:0db8:1140:1000" }
""")).services["dns"].config
    assert cfg.servers == (("127.0.0.1", 5353), ("127.0.0.2", 53))
    assert cfg.key.name == "appliance-key" and cfg.default_ttl == 0
    assert [(r.name.to_text(), r.ttl, r.resource) for r in cfg.records] == [
        ("_sip._udp.example.test.", 0, "vip-sip"), ("reg.example.test.", 3, "sip:registrar")]


def test_every_record_problem_is_reported_with_its_path(tmp_path):
    """Unknown type, bad rdata, unknown node, name outside the zones, unknown
    resource and a missing key file are all reported at once, each with its key path."""
    text = toml(tmp_path, """
ddns = { forward_zone = "dhcp.example.test." }
[[services.dns.records]]
name = "x.example.test."
type = "MX"
resource = "vip-sip"
values = { a = "10 mx.example.test." }
[[services.dns.records]]
name = "y.example.test."
type = "A"
resource = "vip-sip"
values = { a = "10.0.0.300", c = "10.0.0.1" }
[[services.dns.records]]
name = "z.elsewhere.test."
type = "A"
resource = "vip-nope"
values = { a = "10.0.0.1" }
""").replace(f'tsig_key_file = "{tmp_path}/dns.key"', 'tsig_key_file = "/nonexistent.key"')
    with pytest.raises(ConfigError) as e:
        parse(text)
    problems = "\n".join(e.value.problems)
    assert 'services.dns.records[0].type: "MX" is not one of' in problems
    assert "services.dns.records[1].values.a: '10.0.0.300' is not valid A rdata" in problems
    assert "services.dns.records[1].values.c: 'c' is neither this node nor a cluster peer" in problems
    assert "services.dns.records[2].name: z.elsewhere.test. is not inside any of zones" in problems
    assert "services.dns.records[2].resource: 'vip-nope' is neither a [[vip]] name" in problems
    assert "services.dns.tsig_key_file: /nonexistent.key: cannot read" in problems
    assert all(p.startswith("etc/dns.toml: services.dns") for p in e.value.problems)


def test_one_name_follows_one_resource_and_servers_must_be_host_port(tmp_path):
    """Records of one name bound to different resources, and a bad server, are refused."""
    text = toml(tmp_path, """
[[services.dns.records]]
name = "w.example.test."
type = "A"
resource = "vip-sip"
values = { a = "10.0.0.1" }
[[services.dns.records]]
name = "w.example.test."
type = "AAAA"
resource = "sip:registrar"
values = { a = "fd00::1" }
""").replace('"127.0.0.2"]', '"127.0.0.2:99999"]')
    with pytest.raises(ConfigError) as e:
        parse(text)
    problems = "\n".join(e.value.problems)
    assert "must follow the same resource" in problems
    assert "services.dns.servers[1]: '127.0.0.2:99999' is not host:port" in problems


def test_cname_beside_other_data_is_refused(tmp_path):
    """Review L13: a CNAME and an A at one name is refused at config time."""
    with pytest.raises(ConfigError) as e:
        parse(toml(tmp_path, """
[[services.dns.records]]
name = "www.example.test."
type = "CNAME"
resource = "vip-sip"
values = { a = "a.example.test.", b = "b.example.test." }
[[services.dns.records]]
name = "www.example.test."
type = "A"
resource = "vip-sip"
values = { a = "10.9.0.1" }
"""))
    assert "a CNAME cannot share its name with other data (A" in str(e.value)


def test_zone_with_its_own_servers_and_key(tmp_path):
    """zones = ["a", { name, servers, tsig_key_file }]: the second zone has its own
    servers and key; an unknown key in a zone table is reported."""
    (tmp_path / "other.key").write_text(KEY.replace("appliance-key", "other-key"))
    text = toml(tmp_path, "").replace(
        'zones = ["example.test."]',
        f'zones = ["example.test.", {{ name = "other.test.", servers = ["10.0.0.9:53"], '
        f'tsig_key_file = "{tmp_path}/other.key" }}]')
    cfg = parse(text).services["dns"].config
    import dns.name
    zs = cfg.zone_settings[dns.name.from_text("other.test.")]
    assert zs.servers == (("10.0.0.9", 53),) and zs.key.name == "other-key"
    assert dns.name.from_text("example.test.") not in cfg.zone_settings
    with pytest.raises(ConfigError) as e:
        parse(text.replace('servers = ["10.0.0.9:53"]', 'srvers = ["10.0.0.9:53"]'))
    assert "srvers" in str(e.value)


def test_config_does_not_import_the_network_client_and_one_guard_type():
    """Review L15 (design): reading a dns config needs no network client (parse_server
    lives in the pure services.dns.servers; the client re-exports it), and the guard
    type is guard.Guard everywhere (message.py had a second, unused Guard class)."""
    import subprocess
    import sys
    code = ("import sys, services.dns.config, services.dns.message as m, services.dns.guard as g;"
            "print('services.dns.client' in sys.modules, m.Guard is g.Guard)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.split() == ["False", "True"], out.stderr[-500:]
    from services.dns.client import parse_server, show_server
    assert show_server(parse_server("[fd00::1]:5353")) == "[fd00::1]:5353"


def test_guard_scope(tmp_path):
    """Review L12: guard_scope = "name" (default) | "resource"; anything else is refused."""
    assert parse(toml(tmp_path, "")).services["dns"].config.guard_scope == "name"
    cfg = parse(toml(tmp_path, 'guard_scope = "resource"')).services["dns"].config
    assert cfg.guard_scope == "resource"
    with pytest.raises(ConfigError, match="guard_scope"):
        parse(toml(tmp_path, 'guard_scope = "zone"'))


def test_discover_primary_zone_option(tmp_path):
    """Review M11: a zone { name, servers, discover_primary, primary_port } (SOA MNAME
    discovery); the default is off and primary_port 53."""
    cfg = parse(toml(tmp_path, "").replace(
        'zones = ["example.test."]',
        'zones = [{ name = "example.test.", servers = ["127.0.0.3"], discover_primary = true,'
        ' primary_port = 5300 }, "other.test."]')).services["dns"].config
    zs = cfg.zone_settings
    import dns.name
    assert zs[dns.name.from_text("example.test.")].discover_primary is True
    assert zs[dns.name.from_text("example.test.")].primary_port == 5300
    assert dns.name.from_text("other.test.") not in zs
    with pytest.raises(ConfigError, match="primary_port"):
        parse(toml(tmp_path, "").replace(
            'zones = ["example.test."]',
            'zones = [{ name = "example.test.", discover_primary = true, primary_port = 0 }]'))


def test_views_zone_option(tmp_path):
    """Review M11 (views): zones = [{ name, views = [{ tsig_key_file, tsig_key_name? }, ...] }]
    needs two views or more, each with its own key; the zone's key is the first view's."""
    (tmp_path / "in.key").write_text(KEY.replace("appliance-key", "inside"))
    (tmp_path / "out.key").write_text(KEY.replace("appliance-key", "outside"))
    import dns.name
    cfg = parse(toml(tmp_path, "").replace(
        'zones = ["example.test."]',
        f'zones = [{{ name = "example.test.", views = [{{ tsig_key_file = "{tmp_path}/in.key" }}, '
        f'{{ tsig_key_file = "{tmp_path}/out.key" }}] }}]')).services["dns"].config
    zs = cfg.zone_settings[dns.name.from_text("example.test.")]
    assert [k.name for k in zs.views] == ["inside", "outside"] and zs.key.name == "inside"
    with pytest.raises(ConfigError, match="at least two views"):
        parse(toml(tmp_path, "").replace(
            'zones = ["example.test."]',
            f'zones = [{{ name = "example.test.", views = [{{ tsig_key_file = "{tmp_path}/in.key" }}] }}]'))
    with pytest.raises(ConfigError, match="already another view"):
        parse(toml(tmp_path, "").replace(
            'zones = ["example.test."]',
            f'zones = [{{ name = "example.test.", views = [{{ tsig_key_file = "{tmp_path}/in.key" }}, '
            f'{{ tsig_key_file = "{tmp_path}/in.key" }}] }}]'))
