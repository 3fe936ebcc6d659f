"""appliancectl without a node: tables, URL derivation, argument handling, error lines."""

from __future__ import annotations

import io
import json

import pytest

from appliance.admin import ctl
from appliance.admin.listen import EndpointError, admin_url, split_endpoint


def run_ctl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = ctl.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# -- tables ---------------------------------------------------------------
def test_format_table_aligns_and_detects_columns():
    """Columns are the union of keys in first-seen order; numbers right-aligned; None is '-'."""
    rows = [{"address": "10.9.0.50", "state": "active", "expires": 120},
            {"address": "10.9.0.51", "state": "free", "expires": 3600, "owner": "b"},
            {"address": "10.9.0.100", "state": None, "expires": 7}]
    assert ctl.format_table(rows).splitlines() == [
        "ADDRESS     STATE   EXPIRES  OWNER",
        "10.9.0.50   active      120  -",
        "10.9.0.51   free       3600  b",
        "10.9.0.100  -             7  -",
    ]


def test_format_table_cells():
    """Booleans are yes/no, lists comma-joined, floats trimmed, nested objects compact JSON."""
    text = ctl.format_table([{"alive": True, "tags": ["a", "b"], "lag": 0.25, "x": {"k": 1}},
                             {"alive": False, "tags": [], "lag": 2.0, "x": None}])
    lines = text.splitlines()
    assert lines[0].split() == ["ALIVE", "TAGS", "LAG", "X"]
    assert lines[1].split() == ["yes", "a,b", "0.25", '{"k":1}']
    assert lines[2].split() == ["no", "-", "2", "-"]


def test_render_generic_result():
    """Scalars print as `key: value`; a list of objects as a titled table; empty lists say so."""
    text = ctl.render({"leases": [{"address": "10.0.0.1", "state": "active"}], "cursor": None})
    assert text.splitlines() == ["cursor: -", "", "leases (1):", "ADDRESS   STATE",
                                 "10.0.0.1  active"]
    assert ctl.render({"bindings": []}) == "(no bindings)"
    assert ctl.render(["a.b", "c.d"]) == "a.b\nc.d"
    assert ctl.render({"maintenance": True}) == "maintenance: yes"


def test_render_cluster_maps_as_tables():
    """`peers`/`resources` maps become tables keyed by PEER/RESOURCE."""
    text = ctl.render({"peers": {"b": {"alive": True, "last_seen_ms": 40, "state": "normal"}},
                       "resources": {"vip-dhcp": {"owner": "a", "epoch": 3, "role": "active"}}})
    assert text.splitlines() == [
        "peers:",
        "PEER  ALIVE  LAST_SEEN_MS  STATE",
        "b     yes              40  normal",
        "",
        "resources:",
        "RESOURCE  OWNER  EPOCH  ROLE",
        "vip-dhcp  a          3  active",
    ]


def test_render_status():
    """`status` shows node, version, uptime, store health, then SERVICE/STATE/ROLE(/REASON)."""
    status = {"node": "a", "version": "0.1.0", "uptime_s": 3723.5,
              "store": {"backend": "memory", "healthy": True},
              "services": {"dhcp4": {"state": "running", "role": "active"},
                           "sip": {"state": "failed", "role": "standalone",
                                   "reason": "no such interface eth9"}}}
    assert ctl.render_status(status).splitlines() == [
        "node:    a",
        "version: 0.1.0",
        "uptime:  1h 02m 03s",
        "store:   memory (healthy)",
        "",
        "SERVICE  STATE    ROLE        REASON",
        "dhcp4    running  active      -",
        "sip      failed   standalone  no such interface eth9",
    ]
    unhealthy = dict(status, services={}, store={"backend": "redis", "healthy": False})
    assert "store:   redis (UNHEALTHY)" in ctl.render_status(unhealthy)
    assert ctl.render_status(unhealthy).endswith("(no services enabled)")
    counters = dict(status, store={"backend": "memory", "healthy": True, "keys": 4,
                                   "stats": {"writes": 1, "fsyncs": 1}})
    assert "store:    memory (healthy)  keys=4" in ctl.render_status(counters)
    assert "counters: writes=1 fsyncs=1" in ctl.render_status(counters)


def test_render_status_store_error_and_nested_fields():
    """A failed store shows its error next to UNHEALTHY; durability gets its own line
    (what an acknowledged write survives), without repeating a top-level value;
    counters their own."""
    status = {"node": "a", "version": "1", "uptime_s": 1, "services": {},
              "store": {"backend": "memory", "healthy": False, "error": "disk full",
                        "fsync": "always",
                        "durability": {"fsync": "always", "synchronous": "FULL",
                                       "survives": "process crash and power loss"},
                        "stats": {"writes": 3}}}
    out = ctl.render_status(status)
    assert "store:    memory (UNHEALTHY: disk full)  fsync=always" in out
    assert "durable:  survives process crash and power loss (synchronous=FULL)" in out
    assert "counters: writes=3" in out


@pytest.mark.parametrize("seconds, text", [(5, "5.0s"), (65, "1m 05s"), (3600, "1h 00m 00s"),
                                           (90061, "1d 01h 01m"), (None, "-")])
def test_fmt_duration(seconds, text):
    """Uptimes are short and readable."""
    assert ctl.fmt_duration(seconds) == text


# -- URLs from listen strings --------------------------------------------
@pytest.mark.parametrize("listen, url", [
    ("tcp:8740:interface=127.0.0.1", "http://127.0.0.1:8740/rpc"),
    ("tcp:8740", "http://127.0.0.1:8740/rpc"),
    ("tcp:port=8740:interface=0.0.0.0", "http://127.0.0.1:8740/rpc"),
    ("tcp:8740:interface=10.9.0.1", "http://10.9.0.1:8740/rpc"),
    ("tcp6:8740:interface=\\:\\:", "http://[::1]:8740/rpc"),
    ("tcp6:8740:interface=fd00\\:\\:1", "http://[fd00::1]:8740/rpc"),
    ("tcp6:8740", "http://[::1]:8740/rpc"),
    ("ssl:8740:interface=127.0.0.1:privateKey=k.pem:certKey=c.pem",
     "https://127.0.0.1:8740/rpc"),
    ("unix:/run/appliance/admin.sock", "http+unix://%2Frun%2Fappliance%2Fadmin.sock/rpc"),
])
def test_admin_url(listen, url):
    """The node's listen string gives the URL a local client should call."""
    assert admin_url(listen) == url


@pytest.mark.parametrize("listen", ["systemd:domain=INET:index=0", "tcp:", "tcp:0", ":8740"])
def test_admin_url_refuses(listen):
    """Endpoints a client cannot derive a URL from raise EndpointError."""
    with pytest.raises(EndpointError):
        admin_url(listen)


def test_split_endpoint_escapes():
    """Backslash escapes ':' and '=' as in Twisted's strports."""
    assert split_endpoint(r"ssl:8740:privateKey=C\:/k\=1.pem:interface=\:\:1") == (
        "ssl", ["8740"], {"privateKey": "C:/k=1.pem", "interface": "::1"})


# -- error lines ----------------------------------------------------------
def test_describe_error():
    """Application errors show data.reason; standard errors show message and code."""
    assert ctl.describe_error("dhcp4.leases", {"code": -32601, "message": "method not found",
                                               "data": {"method": "dhcp4.leases"}}) \
        == "dhcp4.leases: method not found (-32601)"
    assert ctl.describe_error("cluster.promote", {"code": -32020, "message": "application error",
                                                  "data": {"reason": "unknown resource 'x'"}}) \
        == "cluster.promote: unknown resource 'x'"
    assert ctl.describe_error("m", {"code": -32603, "message": "internal error",
                                    "data": {"reason": "KeyError\n(see log)"}}) \
        == "m: internal error: KeyError; (see log) (-32603)"


# -- argument handling (no network) ------------------------------------------
def test_bad_json_params_exit_2(tmp_path):
    """`call M {bad` exits 2 with one line naming the JSON problem."""
    code, out, err = run_ctl("--url", "http://127.0.0.1:1/rpc", "--token-file",
                             str(tmp_path / "t"), "call", "m", "{bad")
    assert code == 2 and out == ""
    assert err.startswith("appliancectl: call: invalid JSON params: ") and err.count("\n") == 1
    code, _, err = run_ctl("--url", "http://127.0.0.1:1/rpc", "--token-file",
                           str(tmp_path / "t"), "call", "m", "42")
    assert code == 2 and err == "appliancectl: call: params must be a JSON object or array\n"


def test_usage_errors_are_one_line(tmp_path, monkeypatch):
    """Unknown commands, missing arguments and missing targets exit 2 with one line."""
    monkeypatch.chdir(tmp_path)
    for argv in (["frobnicate"], ["promote"], ["maintenance", "maybe"], []):
        code, _, err = run_ctl(*argv)
        assert code == 2, argv
        assert err.startswith("appliancectl: ") and err.count("\n") == 1, err
    code, _, err = run_ctl("status")
    assert code == 2
    assert err == ("appliancectl: no node to talk to: etc/appliance.toml not found here; "
                   "use --config PATH or --url URL --token-file F\n")
    code, _, err = run_ctl("--url", "http://127.0.0.1:1/rpc", "status")
    assert code == 2 and "--token-file" in err


def test_unreadable_token_file(tmp_path):
    """A missing token file is a one-line usage error naming the file."""
    code, _, err = run_ctl("--url", "http://127.0.0.1:1/rpc", "--token-file",
                           str(tmp_path / "nope"), "status")
    assert code == 2
    assert err == f"appliancectl: cannot read token file {tmp_path / 'nope'}: " \
                  "no such file or directory (the node creates it when it starts)\n"


def test_bad_config_is_one_line(tmp_path):
    """A config whose [admin] does not load gives exit 2 and its problems on one line."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[node]\nid = "a"\n[admin]\nlisten = 5\n')
    code, _, err = run_ctl("--config", str(bad), "status")
    assert code == 2
    assert err == f"appliancectl: {bad}: admin.listen: expected a string, got integer 5\n"


def test_ctl_reads_only_admin_and_state_dir(tmp_path):
    """Broken service tables and unreadable key files of services do not stop appliancectl
    (review LOW 8: it loaded and validated the whole node config)."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
id = "a"
state_dir = "{tmp_path}/st"
[admin]
listen = "tcp:8799:interface=127.0.0.1"
[services.dns]
key_file = "/root/nonexistent/tsig.key"
bogus = 1
[services.nosuchservice]
""")
    args = ctl.build_parser().parse_args(["--config", str(cfg), "status"])
    url, token_file, ca = ctl.resolve_target(args)
    assert (url, token_file, ca) == ("http://127.0.0.1:8799/rpc", f"{tmp_path}/st/admin.token",
                                     None)


def test_ctl_verifies_the_server_with_server_ca_not_client_ca(tmp_path):
    """admin.client_ca is the CA of client certificates; the node's certificate is
    verified with admin.server_ca (or --ca).  The key file is not read by the client."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
id = "a"
state_dir = "{tmp_path}"
[admin]
listen = "ssl:8799:interface=127.0.0.1:privateKey=/root/unreadable/k.pem"
client_ca = "{tmp_path}/clients-ca.pem"
server_ca = "{tmp_path}/server-ca.pem"
""")
    args = ctl.build_parser().parse_args(["--config", str(cfg), "status"])
    assert ctl.resolve_target(args)[2] == f"{tmp_path}/server-ca.pem"
    cfg.write_text(cfg.read_text().replace(f'server_ca = "{tmp_path}/server-ca.pem"\n', ""))
    assert ctl.resolve_target(args)[2] is None


def test_options_after_the_command():
    """Global options may follow the command: `appliancectl status --json --url U`."""
    args = ctl.build_parser().parse_args(["leases", "--v6", "--limit", "5", "--json",
                                          "--url", "http://x:1/rpc"])
    assert args.json is True and args.url == "http://x:1/rpc"
    assert ctl.COMMANDS["leases"][1](args) == "dhcp6.leases"
    assert ctl.COMMANDS["leases"][2](args) == {"limit": 5}
    args = ctl.build_parser().parse_args(["--json", "maintenance", "off"])
    assert args.json is True and ctl.COMMANDS["maintenance"][2](args) == {"on": False}


@pytest.mark.parametrize("argv, method, params", [
    (["status"], "system.status", None),
    (["cluster"], "cluster.status", None),
    (["leases", "--subnet", "10.9.0.0/24", "--state", "active"], "dhcp4.leases",
     {"subnet": "10.9.0.0/24", "state": "active"}),
    (["bindings", "--aor", "sip:a@x"], "sip.bindings", {"aor": "sip:a@x"}),
    (["records"], "dns.records", None),
    (["sessions"], "encap.sessions", None),
    (["promote", "vip-dhcp"], "cluster.promote", {"resource": "vip-dhcp"}),
    (["demote", "vip-dhcp"], "cluster.demote", {"resource": "vip-dhcp"}),
    (["maintenance", "on"], "cluster.maintenance", {"on": True}),
    (["partner-down", "b"], "cluster.partner_down", {"peer": "b"}),
    (["call", "x.y", '["a", 1]'], "x.y", ["a", 1]),
    (["call", "x.y"], "x.y", None),
])
def test_command_mapping(argv, method, params):
    """Each SPEC command calls its JSON-RPC method with the documented params."""
    args = ctl.build_parser().parse_args(argv)
    _help, method_of, params_of, _render = ctl.COMMANDS[args.command]
    assert method_of(args) == method
    assert params_of(args) == params


def test_json_output_is_the_raw_result(tmp_path, monkeypatch):
    """--json prints exactly the result as JSON (Client.call stubbed)."""
    token = tmp_path / "token"
    token.write_text("t\n")
    monkeypatch.setattr(ctl.Client, "call", lambda self, method, params=None: {"m": method})
    code, out, err = run_ctl("--url", "http://127.0.0.1:1/rpc", "--token-file", str(token),
                             "--json", "cluster")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"m": "cluster.status"}
