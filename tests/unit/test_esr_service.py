"""The esr service on a Clock with the embedded store and a fake netlink:
config, full reconcile at start, routes following every mapping change at
once, one operation per prefix in flight (latest wins), retries, unknown DNs,
no CAP_NET_ADMIN, RPC and metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry

from appliance.admin.rpc import MethodRegistry
from appliance.config import ConfigError, config_from_string
from appliance.net.netlink import NetlinkError
from services.encap.mapping import MappingTable
from services.encap.routes import PROTO_ESR
from services.esr.plugin import esr_plugin
from services.esr.service import ESRService, has_net_admin
from tests.support.sync import memory_store, ok
from tests.unit.test_encap_routes import FakeNetlink

T0 = 1_700_000_000.0
ESR = """
[node]
id = "esr"
state_dir = "/tmp/esr-unit"
[services.esr]
"""


def parse(body: str):
    return config_from_string(ESR + body, "etc/esr.toml",
                              plugins={"esr": esr_plugin}).services["esr"].config


def test_config_parses_next_hops_and_defaults():
    """next_hops take an address or {via, dev}; table 254 and proto 0xe5 by default."""
    cfg = parse('next_hops = { dn1 = "10.77.0.2", dn2 = { via = "10.77.0.3", dev = "eth0" } }')
    assert cfg.table == 254 and cfg.proto == PROTO_ESR and cfg.source == "store"
    assert str(cfg.next_hops["dn1"].via) == "10.77.0.2" and cfg.next_hops["dn1"].dev is None
    assert cfg.next_hops["dn2"].dev == "eth0"
    cfg = parse('table = 1000\nproto = 200\nsource = "unix:///run/redis.sock"\n'
                'next_hops = { dn1 = { dev = "tun0" } }')
    assert (cfg.table, cfg.proto, cfg.source) == (1000, 200, "unix:///run/redis.sock")


def test_config_problems_are_reported_together():
    """Reserved table and proto, a bad address, an empty hop, an unknown key and a bad
    source are all reported at once with their key paths."""
    with pytest.raises(ConfigError) as e:
        parse('table = 255\nproto = 4\nsource = "http://x"\nscan = 1\n'
              'next_hops = { dn1 = "10.77.0.300", dn2 = {}, dn3 = { via = "10.0.0.1", x = 1 } }')
    text = "\n".join(e.value.problems)
    for needle in ("services.esr.table: 255 is reserved", "services.esr.proto: 4 is the kernel's",
                   "services.esr.source:", "services.esr.scan: unknown key",
                   "services.esr.next_hops.dn1.via:", "services.esr.next_hops.dn2: needs via",
                   "services.esr.next_hops.dn3.x: unknown key"):
        assert needle in text, (needle, text)
    with pytest.raises(ConfigError, match="next_hops: missing"):
        parse("")


def test_has_net_admin_reads_capeff(tmp_path):
    """CAP_NET_ADMIN is bit 12 of CapEff."""
    f = tmp_path / "status"
    f.write_text("Name:\tx\nCapEff:\t0000000000001000\n")
    assert has_net_admin(str(f)) is True
    f.write_text("CapEff:\t0000000000000000\n")
    assert has_net_admin(str(f)) is False


class Lab:
    """A store with DN tables writing claims, and an esr service on a fake kernel."""

    def __init__(self, tmp_path, body='next_hops = { dn1 = "10.77.0.2", dn2 = "10.77.0.3" }',
                 instant=True, net_admin=True):
        self.store, self.clock = memory_store(tmp_path / "store")
        self.clock.advance(T0)
        self.nl = FakeNetlink(instant=instant)
        self.config = parse(body)
        self.rpc, self.metrics = MethodRegistry(), CollectorRegistry()
        self.context = SimpleNamespace(reactor=self.clock, store=self.store, rpc=self.rpc,
                                       metrics=self.metrics, cluster=None, node_id="esr",
                                       providers={})
        self.service = ESRService(self.config, self.context, netlink=self.nl,
                                  net_admin=net_admin)
        self.dn = {d: MappingTable(self.clock, self.store, d, replicate=False)
                   for d in ("dn1", "dn2")}
        for t in self.dn.values():
            ok(t.start())

    def start(self):
        return ok(self.service.startService())

    def claim(self, target, dn):
        e = ok(self.dn[dn].claim(target, dn, "test"))
        self.clock.advance(0)          # the store's change notification
        return e

    def release(self, target, dn):
        r = ok(self.dn[dn].release(target, dn))
        self.clock.advance(0)
        return r

    def kernel(self, table=254):
        return {p: r["via"] for (t, p), r in self.nl.kernel.items() if t == table
                and r["proto"] == PROTO_ESR}


def test_start_reconciles_missing_stale_and_leaves_foreign_routes(tmp_path):
    """At start: missing routes installed, a stale route of ours withdrawn, a correct
    one left as it is (no write), somebody else's route to a mapped prefix untouched."""
    lab = Lab(tmp_path)
    lab.claim("10.200.0.5", "dn1")
    lab.claim("10.200.0.64/26", "dn2")
    lab.claim("10.200.0.9", "dn2")
    lab.nl.kernel[(254, "10.200.0.9/32")] = {"dev": None, "via": "10.77.0.3", "proto": PROTO_ESR}
    lab.nl.kernel[(254, "10.200.0.7/32")] = {"dev": None, "via": "10.77.0.2", "proto": PROTO_ESR}
    lab.nl.kernel[(254, "10.1.0.0/24")] = {"dev": "eth0", "via": None, "proto": 2}
    lab.nl.calls.clear()
    lab.start()
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.2", "10.200.0.64/26": "10.77.0.3",
                            "10.200.0.9/32": "10.77.0.3"}
    assert (254, "10.1.0.0/24") in lab.nl.kernel
    assert not lab.service.samples          # the start's catch-up is no latency sample
    replaced = [c[1] for c in lab.nl.calls if c[0] == "replace"]
    assert sorted(replaced) == ["10.200.0.5/32", "10.200.0.64/26"]      # .9 already right
    assert lab.service.stats["stale_removed"] == 1 and lab.service.reconciled
    assert lab.service.pending() == []


def test_routes_follow_claims_moves_and_releases_at_once(tmp_path):
    """Each table change is in the kernel as soon as the notification is delivered:
    claim -> route via dn1, takeover -> replaced via dn2, back -> via dn1, release ->
    withdrawn; latencies recorded; listeners told."""
    lab = Lab(tmp_path)
    lab.start()
    told = []
    lab.service.listeners.append(lambda p, r, lat: told.append((p, r and r["dn"])))
    lab.claim("10.200.0.64/26", "dn1")
    assert lab.kernel() == {"10.200.0.64/26": "10.77.0.2"}
    lab.claim("10.200.0.64/26", "dn2")
    assert lab.kernel() == {"10.200.0.64/26": "10.77.0.3"}
    lab.claim("10.200.0.64/26", "dn1")
    assert lab.kernel() == {"10.200.0.64/26": "10.77.0.2"}
    assert lab.release("10.200.0.64/26", "dn1") is True
    assert lab.kernel() == {}
    assert told == [("10.200.0.64/26", "dn1"), ("10.200.0.64/26", "dn2"),
                    ("10.200.0.64/26", "dn1"), ("10.200.0.64/26", None)]
    s = lab.service.stats
    assert (s["injected"], s["withdrawn"]) == (3, 1)
    assert len(lab.service.samples) == 3 and len(lab.service.claim_samples) == 3
    assert not lab.clock.getDelayedCalls()            # no scan interval, nothing periodic


def test_one_operation_per_prefix_in_flight_latest_wins(tmp_path):
    """Changes while the kernel has not answered are not queued one by one: after the
    answer the latest desired route is applied, once."""
    lab = Lab(tmp_path, instant=False)
    d = lab.service.startService()
    lab.nl.answer()                 # the start's read of the kernel table
    ok(d)
    lab.claim("10.200.0.5", "dn1")
    assert len(lab.nl.pending) == 1
    lab.claim("10.200.0.5", "dn2")
    lab.claim("10.200.0.5", "dn1")
    lab.claim("10.200.0.5", "dn2")
    assert len(lab.nl.pending) == 1
    lab.clock.advance(0.003)
    lab.nl.answer()
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.3"}
    vias = [c[3] for c in lab.nl.calls if c[0] == "replace"]
    assert vias == ["10.77.0.2", "10.77.0.3"]
    assert lab.service.installed["10.200.0.5/32"]["dn"] == "dn2"
    assert lab.service.samples[0] == pytest.approx(0.003, abs=1e-6)


def test_failed_route_is_retried_with_backoff(tmp_path):
    """A netlink failure is counted, shown in errors and retried after retry_initial_s."""
    lab = Lab(tmp_path)
    lab.start()
    lab.nl.fail_next = NetlinkError("replace route 10.200.0.5/32: Network is unreachable", 101)
    lab.claim("10.200.0.5", "dn1")
    assert lab.kernel() == {} and lab.service.stats["failures"] == 1
    assert "Network is unreachable" in lab.service.describe()["errors"]["10.200.0.5/32"]
    assert lab.service.pending() == ["10.200.0.5/32"]
    lab.clock.advance(0.5)
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.2"}
    assert lab.service.describe()["errors"] == {} and lab.service.stats["retries"] == 1


def test_unknown_dn_withdraws_our_route(tmp_path):
    """A target moved to a DN without a configured next hop loses our route (traffic
    must not keep going to the old DN) and the error says why."""
    lab = Lab(tmp_path, body='next_hops = { dn1 = "10.77.0.2" }')
    lab.start()
    lab.claim("10.200.0.5", "dn1")
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.2"}
    lab.claim("10.200.0.5", "dn2")
    assert lab.kernel() == {}
    assert "dn2" in lab.service.describe()["errors"]["10.200.0.5/32"]
    assert lab.service.stats["unknown_dn"] == 1


def test_without_net_admin_nothing_is_written_and_status_says_so(tmp_path):
    """Without CAP_NET_ADMIN the service follows the table, writes nothing and reports it."""
    lab = Lab(tmp_path, net_admin=False)
    lab.start()
    lab.claim("10.200.0.5", "dn1")
    assert [c for c in lab.nl.calls if c[0] == "replace"] == []
    d = lab.rpc.call("esr.routes", {}) if hasattr(lab.rpc, "call") else lab.service.describe()
    info = ok(d) if hasattr(d, "addBoth") else d
    assert info["net_admin"] is False and info["pending"] == ["10.200.0.5/32"]
    assert "CAP_NET_ADMIN" in info["errors"]["10.200.0.5/32"]
    assert lab.service.role == "no-net-admin"           # what system.status shows


def test_demo_esr_uses_a_table_of_its_own():
    """The demo's esr writes into a table that is not main (the host's routing never
    changes) and routes via lo only."""
    from pathlib import Path

    from appliance.config import load_config
    cfg = load_config(Path(__file__).resolve().parents[2] / "etc" / "appliance.toml")
    esr = cfg.services["esr"].config
    assert esr.table not in (254, 255, 253) and all(
        h.via is None and h.dev == "lo" for h in esr.next_hops.values())


def test_rpc_and_metrics_while_running_and_gone_after_stop(tmp_path):
    """esr.routes lists the routes; the collector exports changes and latencies; stop
    unregisters both and leaves the kernel routes in place."""
    lab = Lab(tmp_path)
    lab.start()
    lab.claim("10.200.0.5", "dn1")
    assert "esr.routes" in lab.rpc
    info = lab.service.describe()
    assert info["routes"]["10.200.0.5/32"]["dn"] == "dn1"
    assert info["latency"]["notify"]["n"] == 1
    names = {m.name: m for m in lab.metrics.collect()}
    assert names["appliance_esr_route_changes"].samples[0].value == 1
    assert "appliance_esr_route_latency_seconds" in names
    ok(lab.service.stopService())
    assert "esr.routes" not in lab.rpc
    assert not any(m.name.startswith("appliance_esr") for m in lab.metrics.collect())
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.2"}
    lab.claim("10.200.0.5", "dn2")                  # no longer followed
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.2"}


def test_reconcile_repairs_manual_changes(tmp_path):
    """esr.reconcile re-reads the kernel: a route of ours deleted or changed by hand is
    put back, one of ours the table does not know is removed, others' stay."""
    lab = Lab(tmp_path)
    lab.start()
    lab.claim("10.200.0.5", "dn1")
    lab.claim("10.200.0.64/26", "dn2")
    del lab.nl.kernel[(254, "10.200.0.5/32")]                          # deleted by hand
    lab.nl.kernel[(254, "10.200.0.64/26")]["via"] = "10.77.0.9"         # changed by hand
    lab.nl.kernel[(254, "10.200.7.0/24")] = {"dev": None, "via": "10.77.0.2",
                                             "proto": PROTO_ESR}        # ours, unknown
    lab.nl.kernel[(254, "10.1.0.0/24")] = {"dev": "eth0", "via": None, "proto": 4}
    assert "esr.reconcile" in lab.rpc
    result = ok(lab.service.reconcile())
    assert result == {"repaired": ["10.200.0.5/32", "10.200.0.64/26", "10.200.7.0/24"]}
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.2", "10.200.0.64/26": "10.77.0.3"}
    assert (254, "10.1.0.0/24") in lab.nl.kernel
    assert ok(lab.service.reconcile()) == {"repaired": []}


def test_start_does_not_wait_for_an_unreadable_store(tmp_path):
    """startService returns while the table cannot be loaded; the reconcile happens
    when the store answers (retried), and the routes it finds are kept meanwhile."""
    from tests.unit.test_encap_mapping import FlakyReads
    lab = Lab(tmp_path)
    lab.claim("10.200.0.5", "dn1")
    lab.nl.kernel[(254, "10.200.0.7/32")] = {"dev": None, "via": "10.77.0.2", "proto": PROTO_ESR}
    lab.service = ESRService(lab.config, lab.context, netlink=lab.nl, net_admin=True,
                             store=FlakyReads(lab.store, 3))
    lab.start()
    assert lab.service.running and not lab.service.reconciled
    assert lab.service.describe()["reconciled"] is False
    assert lab.kernel() == {"10.200.0.7/32": "10.77.0.2"}          # untouched meanwhile
    for step in (0.1, 0.2, 0.4):
        lab.clock.advance(step)
    assert lab.service.reconciled
    assert lab.kernel() == {"10.200.0.5/32": "10.77.0.2"}
    ok(lab.service.stopService())
