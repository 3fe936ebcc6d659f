"""perfdhcp smoke runs (a few seconds, 50 DORA/s) against one appliance node and a pair.

Same namespaces and configs as ``bench/dhcp4.py`` (imported from there):
servers a 10.80.0.1 and b 10.80.0.2, perfdhcp in the client namespace
10.80.0.10 acting as a relay.  The single node gets unicast relayed traffic
on its ``listen_address``; the pair (split-scope failover, TLS peer link)
gets the relayed packets broadcast on the bridge so both partners see every
client.  Checks: (near) every exchange completes, perfdhcp's own uniqueness
check (``-u``) finds no address handed out twice, and the lease tables read
with ``dhcp4.leases`` hold one client per address (across both partners).

Needs root and perfdhcp (Debian ``kea-admin``): skipped on a laptop without
them, failed under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import time

import pytest

from tests.support.node_process import ROOT
from tests.support.require import require_binary, require_root

_spec = importlib.util.spec_from_file_location("bench_dhcp4", ROOT / "bench" / "dhcp4.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

RATE = 50
PERIOD = 3


@pytest.fixture
def lab():
    """Servers a, b and the client (relay) on one bridge, /12 like the bench."""
    require_root()
    require_binary("perfdhcp")
    from tests.support.netns import Lab
    with Lab() as lab:
        lab.add_node("a", f"{bench.ADDR['a']}/{bench.PREFIX}")
        lab.add_node("b", f"{bench.ADDR['b']}/{bench.PREFIX}")
        lab.add_node("client", f"{bench.CLIENT}/{bench.PREFIX}")
        yield lab


def perfdhcp(lab, broadcast: bool) -> dict:
    """50 DORA/s for 3 s with perfdhcp's address-uniqueness check; parsed output."""
    cmd = ["perfdhcp", "-4", "-l", "eth0", "-r", str(RATE), "-R", "16000000", "-p", str(PERIOD),
           "-W", "1000000", "-u"]
    cmd += ["-B", "255.255.255.255"] if broadcast else [bench.ADDR["a"]]
    res = lab.run("client", *cmd, check=False, timeout=60)
    parsed = bench.parse_perfdhcp(res.stdout)
    assert parsed["stats"], f"perfdhcp printed no statistics:\n{res.stdout}\n{res.stderr}"
    return parsed["stats"]


def bound_leases(app, node: str) -> list[dict]:
    """Every bound lease of ``node``, all pages of ``dhcp4.leases``."""
    out, cursor = [], None
    while True:
        params = {"state": "bound", "limit": 1000}
        if cursor:
            params["cursor"] = cursor
        page = app.rpc(node, "dhcp4.leases", params)
        assert page is not None, f"dhcp4.leases failed on {node}\n{app.logs()}"
        out += page["leases"]
        cursor = page.get("cursor")
        if not cursor:
            return out


def check_run(stats: dict) -> int:
    do, ra = stats["DISCOVER-OFFER"], stats["REQUEST-ACK"]
    sent, done = do["sent packets"], ra["received packets"]
    assert sent >= RATE * PERIOD * 0.9, stats
    assert done >= sent * 0.99, f"{sent - done} of {sent} exchanges incomplete: {stats}"
    assert do.get("non unique addresses", 0) == 0 and ra.get("non unique addresses", 0) == 0, stats
    assert ra.get("rejected leases", 0) == 0, stats
    return int(done)


def one_client_per_address(leases: list[dict]) -> None:
    by_address: dict[str, set] = {}
    for le in leases:
        by_address.setdefault(le["address"], set()).add(le["hwaddr"])
    shared = {a: hw for a, hw in by_address.items() if len(hw) > 1}
    assert not shared, f"addresses held by two clients: {shared}"
    by_client: dict[str, set] = {}
    for le in leases:
        by_client.setdefault(le["hwaddr"], set()).add(le["address"])
    doubled = {hw: a for hw, a in by_client.items() if len(a) > 1}
    assert not doubled, f"clients holding two addresses: {doubled}"


def test_perfdhcp_single_node(lab, tmp_path):
    """perfdhcp relay mode at 50/s for 3 s against one node: every DORA completes,
    no address twice (perfdhcp -u), the node's bound leases have one client each."""
    app = bench.Appliance(lab, tmp_path, pair=False)
    app.start()
    try:
        done = check_run(perfdhcp(lab, broadcast=False))
        leases = bound_leases(app, "a")
        assert len(leases) >= done * 0.95, (len(leases), done)
        one_client_per_address(leases)
    finally:
        app.stop()


@pytest.mark.parametrize("mode", ["split-scope", "load-balancing", "hot-standby"])
def test_perfdhcp_pair(lab, tmp_path, mode):
    """perfdhcp broadcasting relayed packets at 50/s for 3 s to a pair in each
    failover mode: every DORA completes, each client answered once, both
    partners see the leases (lazy updates) and no address belongs to two
    clients across them; split-scope and load-balancing partners both serve,
    a hot-standby pair is served by its primary alone."""
    app = bench.Appliance(lab, tmp_path, pair=True, mode=mode)
    app.start()
    try:
        done = check_run(perfdhcp(lab, broadcast=True))
        tables = {}

        def replicated():
            tables.update({n: bound_leases(app, n) for n in ("a", "b")})
            return len(tables["a"]) == len(tables["b"]) >= done * 0.95

        deadline = time.time() + 10
        while not replicated() and time.time() < deadline:
            time.sleep(0.5)
        assert replicated(), {n: len(t) for n, t in tables.items()}
        for node in ("a", "b"):
            one_client_per_address(tables[node])
        one_client_per_address(tables["a"] + tables["b"])
        stats = {n: app.rpc(n, "dhcp4.stats") for n in ("a", "b")}
        served = {n: stats[n]["packets"].get("out_ACK", 0) for n in ("a", "b")}
        if mode == "hot-standby":
            assert served["a"] and not served["b"], f"only the primary serves: {served}"
        else:
            assert all(served.values()), f"both partners serve their half: {served}"
        assert sum(served.values()) >= done, served
    finally:
        app.stop()
