"""The dhcp6 service against real DHCPv6 clients in network namespaces.

* ``dhclient -6 -N -P`` (Debian isc-dhcp-client) in a client namespace, on a veth
  to namespace a where one appliance node's dhcp6 listens on ``eth0`` (ff02::1:2):
  it gets an address and a delegated prefix, renews them at a short T1, releases
  them (``-r``); the lease table (``dhcp6.leases`` / ``dhcp6.lease``) follows.
* ``perfdhcp -6`` SARR smoke (IA_NA + IA_PD) with a duplicate check read through
  ``dhcp6.leases``: no address and no prefix given to two DUIDs, no two
  delegated prefixes overlapping.

Same namespaces and node runner as bench/dhcp6.py (imported from there).  Needs
root, dhclient and perfdhcp: skipped on a laptop without them, failed under
``CI=true`` (tests/support/require.py).
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from pathlib import Path

import pytest

from tests.support.cluster_lab import wait_for
from tests.support.dhcp6_lab import Dhclient, all_leases, check_no_duplicates
from tests.support.node_process import ROOT
from tests.support.require import require_binary, require_root

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("bench_dhcp6", ROOT / "bench" / "dhcp6.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SUBNET = "2001:db8:77::/64"
POOL = ("2001:db8:77::100", "2001:db8:77::1ff")
PD = ("2001:db8:7700::/40", 56)


def short_t1_config(node: str, work: Path, *, pair: bool, keys, mclt_s=None) -> str:
    """One node, dhcp6 on eth0, T1 2 s / T2 5 s (lifetimes 10 s / 20 s): dhclient renews
    within seconds."""
    state = work / f"state-{node}"
    return f"""
[node]
id = "{node}"
state_dir = "{state}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{state}/admin.token"

[services.dhcp6]
interface = "eth0"

[[services.dhcp6.subnets]]
id = 1
subnet = "{SUBNET}"
pool = ["{POOL[0]}", "{POOL[1]}"]
pd_pools = [{{ prefix = "{PD[0]}", delegated_length = {PD[1]} }}]
preferred_lifetime_s = 10
valid_lifetime_s = 20
t1_s = 2
t2_s = 5
"""


@pytest.fixture
def lab():
    require_root()
    from tests.support.netns import Lab
    with Lab() as lab:
        yield lab


def test_dhclient_gets_renews_and_releases_an_address_and_a_prefix(lab, tmp_path):
    """dhclient -6 -N -P on a veth: BOUND6 with an address of the pool and a /56 of the
    delegated-prefix pool; dhcp6.lease shows both bound to dhclient's DUID (one IAID
    each), and `appliancectl leases -6` lists both; at T1 (2 s) it renews and keeps
    both, the leases' cltt moves on; -r releases both: the lease table says released."""
    require_binary("dhclient")
    lab.add_node("a", "2001:db8:77::1/64")
    lab.add_node("client")                         # link-local only, like a host
    app = bench.Appliance(lab, tmp_path, pair=False, config=short_t1_config)
    app.start()
    client = Dhclient(lab, tmp_path)
    try:
        client.start()
        wait_for(lambda: all(client.got(("BOUND6",))), 40,
                 f"dhclient to bind an address and a prefix\n{client.log()}\n{app.logs()}")
        (address,), (prefix,) = client.got(("BOUND6",))
        assert ipaddress.IPv6Address(POOL[0]) <= ipaddress.IPv6Address(address) \
            <= ipaddress.IPv6Address(POOL[1]), address
        net = ipaddress.IPv6Network(prefix)
        assert net.prefixlen == PD[1] and net.subnet_of(ipaddress.IPv6Network(PD[0])), prefix

        duid = client.duid()
        assert duid, f"no client-id in dhclient's lease file:\n{client.leases.read_text()}"
        na = app.rpc("a", "dhcp6.lease", {"address": address})
        pd = app.rpc("a", "dhcp6.lease", {"prefix": prefix})
        assert na and na["state"] == "bound" and na["type"] == "na", na
        assert pd and pd["state"] == "bound" and pd["type"] == "pd", pd
        assert na["duid"] == pd["duid"] == duid, (na, pd, duid)
        table = all_leases(app, state="bound")
        assert sorted((le.get("address") or le.get("prefix"), le["duid"]) for le in table) \
            == sorted([(address, duid), (prefix, duid)]), table
        first_cltt = (na["cltt"], pd["cltt"])
        ctl = lab.run("a", sys.executable, "-m", "appliance.admin.ctl", "--url",
                      "http://127.0.0.1:8740/rpc", "--token-file",
                      str(tmp_path / "state-a" / "admin.token"), "leases", "-6", check=False)
        assert ctl.returncode == 0 and address in ctl.stdout and prefix in ctl.stdout, \
            ctl.stdout + ctl.stderr

        # RENEW at T1 = 2 s: the same address and prefix, the server's clock on them moves
        wait_for(lambda: client.got(("RENEW6",)) == ({address}, {prefix}), 30,
                 f"dhclient to renew the address and the prefix\n{client.seen()}\n{client.log()}")

        def renewed():
            n = app.rpc("a", "dhcp6.lease", {"address": address})
            p = app.rpc("a", "dhcp6.lease", {"prefix": prefix})
            return n["cltt"] > first_cltt[0] and p["cltt"] > first_cltt[1] \
                and n["state"] == p["state"] == "bound"
        wait_for(renewed, 15, "the renewals to show in dhcp6.lease")
        assert client.got(("BOUND6", "RENEW6", "REBIND6")) == ({address}, {prefix}), \
            f"the client was never moved: {client.seen()}"

        # RELEASE (-r): the running dhclient is stopped, the server frees both
        res = client.release()
        assert res.returncode == 0, res.stdout + res.stderr
        wait_for(lambda: app.rpc("a", "dhcp6.lease", {"address": address})["state"] == "released"
                 and app.rpc("a", "dhcp6.lease", {"prefix": prefix})["state"] == "released",
                 15, f"the RELEASE to be applied\n{res.stderr[-1500:]}\n{app.logs()}")
        assert not all_leases(app, state="bound")
        stats = app.rpc("a", "dhcp6.stats")
        assert stats["packets"], stats
    finally:
        if client.proc is not None and client.proc.poll() is None:
            client.proc.kill()
        app.stop()


RATE, PERIOD = 50, 3


def test_perfdhcp_sarr_smoke_no_duplicate_address_or_prefix(lab, tmp_path):
    """perfdhcp -6 -e address-and-prefix at 50 SARR/s for 3 s (multicast, random DUIDs):
    (near) every exchange completes, none rejected; the bound leases read through
    dhcp6.leases give each address and each prefix to one DUID, no DUID holds two
    addresses or two prefixes, and no two delegated prefixes overlap."""
    require_binary("perfdhcp")
    lab.add_node("a", f"{bench.ADDR['a']}/{bench.PREFIX}")
    lab.add_node("client", f"{bench.CLIENT}/{bench.PREFIX}")
    app = bench.Appliance(lab, tmp_path, pair=False)
    app.start()
    try:
        cmd = ["perfdhcp", "-6", "-l", "eth0", "-r", str(RATE), "-R", "16000000",
               "-p", str(PERIOD), "-W", "1000000", "-e", "address-and-prefix", "-u"]
        res = lab.run("client", *cmd, check=False, timeout=60)
        stats = bench.parse_perfdhcp(res.stdout)["stats"]
        assert stats, f"perfdhcp printed no statistics:\n{res.stdout}\n{res.stderr}"
        sa, rr = stats["SOLICIT-ADVERTISE"], stats["REQUEST-REPLY"]
        sent, done = sa["sent packets"], rr["received packets"]
        assert sent >= RATE * PERIOD * 0.9, stats
        assert done >= sent * 0.99, f"{sent - done} of {sent} exchanges incomplete: {stats}"
        for s in (sa, rr):
            assert s.get("rejected leases", 0) == 0 and s.get("non unique addresses", 0) == 0, stats

        leases = all_leases(app, state="bound")
        na = [le for le in leases if le["type"] == "na"]
        pd = [le for le in leases if le["type"] == "pd"]
        assert len(na) >= done * 0.95 and len(pd) >= done * 0.95, (len(na), len(pd), done)
        check_no_duplicates(na, pd)
    finally:
        app.stop()
