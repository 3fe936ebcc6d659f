"""The [services.dhcp4] table: typed config out, key-path errors for every mistake."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import hypothesis.strategies as st
from hypothesis import given, settings

from appliance.config import ParseContext, Problems, Table
from services.dhcp.v4.config import Dhcp4Config, normalize_mac, parse_dhcp4

CTX = ParseContext("etc/test.toml", "a", ("b",), ())


def parse(data: dict, context: ParseContext = CTX) -> tuple[Dhcp4Config | None, list[str]]:
    problems = Problems("etc/test.toml")
    table = Table(data, "services.dhcp4", problems)
    cfg = parse_dhcp4(table, context)
    return cfg, problems.items


def base(**over) -> dict:
    data = {
        "interface": "veth0",
        "port": 67,
        "failover": {"peer": "b", "role": "primary", "mode": "split-scope", "split": 50,
                     "delay_s": 2, "mclt_s": 3600, "max_unacked": 100},
        "subnets": [{"id": 1, "subnet": "10.9.0.0/24", "pool": ["10.9.0.50", "10.9.0.249"],
                     "routers": ["10.9.0.1"], "dns_servers": ["10.9.0.1"], "lease_time_s": 3600}],
    }
    data.update(over)
    return data


def subnet(**over) -> dict:
    s = {"id": 1, "subnet": "10.9.0.0/24", "pool": ["10.9.0.50", "10.9.0.249"]}
    s.update(over)
    return s


def test_spec_example_parses():
    """The SPEC.md example gives typed objects with the documented defaults."""
    cfg, problems = parse(base())
    assert problems == []
    assert cfg.interface == "veth0" and cfg.port == 67 and cfg.listen_address is None
    f = cfg.failover
    assert (f.peer, f.role, f.mode, f.split, f.delay_s, f.mclt_s, f.max_unacked) == (
        "b", "primary", "split-scope", 50, 2.0, 3600, 100)
    assert f.partner_role == "secondary"
    s = cfg.subnets[0]
    assert s.id == 1 and s.network == IPv4Network("10.9.0.0/24")
    assert s.pools[0].first == IPv4Address("10.9.0.50") and s.pools[0].size == 200
    assert s.routers == (IPv4Address("10.9.0.1"),)
    assert (s.lease_time_s, s.t1_s, s.t2_s) == (3600, 1800, 3150)
    assert cfg.subnet(1) is s and cfg.subnet_for("10.9.0.7") is s and cfg.subnet_for("10.8.0.1") is None


def test_relay_only_listen_address_and_several_pools():
    """listen_address alone (relayed only) and `pools = [[a,b],...]` are accepted."""
    data = {"listen_address": "127.0.0.1", "server_id": "10.9.0.2",
            "subnets": [subnet(pool=None, pools=[["10.9.0.10", "10.9.0.19"], ["10.9.0.100", "10.9.0.109"]],
                               domain_name="example.net", t1_s=100, t2_s=200, lease_time_s=300,
                               reservations=[{"hwaddr": "52-54-00-AA-bb-01", "address": "10.9.0.5",
                                              "hostname": "printer"}])]}
    del data["subnets"][0]["pool"]
    cfg, problems = parse(data)
    assert problems == []
    assert cfg.listen_address == IPv4Address("127.0.0.1") and cfg.failover is None
    s = cfg.subnets[0]
    assert [p.size for p in s.pools] == [10, 10]
    assert s.reservations[0].hwaddr == "52:54:00:aa:bb:01"
    assert s.reservation_for("52:54:00:aa:bb:01").hostname == "printer"
    assert (s.t1_s, s.t2_s, s.domain_name) == (100, 200, "example.net")


def test_needs_interface_or_listen_address():
    """Without interface or listen_address there is nothing to listen on."""
    data = base()
    del data["interface"]
    _, problems = parse(data)
    assert any("services.dhcp4.interface: missing" in p for p in problems)


def test_bad_pool_address_names_the_key_path():
    """A malformed pool address reads like SPEC: file: key.path: problem."""
    _, problems = parse(base(subnets=[subnet(pool=["10.9.0.300", "10.9.0.249"])]))
    assert 'etc/test.toml: services.dhcp4.subnets[0].pool: "10.9.0.300" is not an IPv4 address' in problems


def test_first_after_last_and_outside_subnet():
    """first > last, and pools/routers/reservations outside the subnet, are errors."""
    _, p1 = parse(base(subnets=[subnet(pool=["10.9.0.200", "10.9.0.100"])]))
    assert any("subnets[0].pool: first address" in p for p in p1)
    _, p2 = parse(base(subnets=[subnet(pool=["10.9.0.50", "10.9.1.10"], routers=["10.8.0.1"],
                                       reservations=[{"hwaddr": "52:54:00:00:00:01",
                                                      "address": "10.7.0.1"}])]))
    assert any("subnets[0].pool:" in p and "not a host address" in p for p in p2)
    assert any("subnets[0].routers[0]" in p and "outside subnet" in p for p in p2)
    assert any("subnets[0].reservations[0].address" in p for p in p2)
    _, p3 = parse(base(subnets=[subnet(pool=["10.9.0.0", "10.9.0.10"])]))
    assert any("not a host address" in p for p in p3)   # the network address


def test_overlapping_pools_and_subnets_and_duplicate_ids():
    """Pools overlapping across subnets, overlapping subnets and duplicate ids are refused."""
    subs = [subnet(), subnet(id=2, subnet="10.9.0.0/23", pool=["10.9.0.200", "10.9.1.20"]),
            subnet(id=1, subnet="10.10.0.0/24", pool=["10.10.0.10", "10.10.0.20"])]
    _, problems = parse(base(subnets=subs))
    assert any("subnets[1].subnet" in p and "overlaps" in p for p in problems)
    assert any("subnets[1].pool" in p and "overlaps pool" in p for p in problems)
    assert any("subnets[2].id: subnet id 1 is already used" in p for p in problems)


def test_ids_required_with_failover_only():
    """Failover needs explicit stable subnet ids; a single node defaults them by position."""
    s = subnet()
    del s["id"]
    _, problems = parse(base(subnets=[s]))
    assert any("subnets[0].id: missing (required when failover is set" in p for p in problems)
    data = base(subnets=[dict(s), dict(s, subnet="10.10.0.0/24", pool=["10.10.0.5", "10.10.0.6"])])
    del data["failover"]
    cfg, problems = parse(data)
    assert problems == [] and [x.id for x in cfg.subnets] == [1, 2]


def test_reservation_mistakes():
    """Bad MAC syntax, duplicate MACs and duplicate addresses in reservations are errors."""
    res = [{"hwaddr": "52:54:00:00:00:01", "address": "10.9.0.5"},
           {"hwaddr": "52:54:00:00:00:0g", "address": "10.9.0.6"},
           {"hwaddr": "52:54:00:00:00:01", "address": "10.9.0.7"},
           {"hwaddr": "52:54:00:00:00:02", "address": "10.9.0.5"}]
    _, problems = parse(base(subnets=[subnet(reservations=res)]))
    assert any("reservations[1].hwaddr" in p and "not a MAC address" in p for p in problems)
    assert any("reservations[2].hwaddr" in p and "already reserved" in p for p in problems)
    assert any("reservations[3].address" in p and "already reserved" in p for p in problems)


def test_failover_checks():
    """The failover peer must be a cluster peer; role, mode and split are checked."""
    _, p1 = parse(base(failover={"peer": "z", "role": "primary"}))
    assert any("failover.peer" in p and "not a cluster peer" in p for p in p1)
    _, p2 = parse(base(failover={"peer": "b", "role": "boss", "mode": "anycast", "split": 101}))
    assert any("failover.role" in p for p in p2)
    assert any("failover.mode" in p for p in p2)
    assert any("failover.split" in p and "above the maximum" in p for p in p2)
    cfg, p3 = parse(base(failover={"peer": "b", "role": "standby", "mode": "hot-standby"}))
    assert p3 == [] and cfg.failover.role == "secondary"
    _, p4 = parse(base(failover={"peer": "b", "role": "standby"}))
    assert any('"standby" is only a role' in p for p in p4)


def test_unknown_keys_and_t1_t2():
    """Unknown keys get a hint; T1 < T2 < lease time is enforced."""
    _, problems = parse(base(subnets=[subnet(lease_tme_s=5, t1_s=900, t2_s=800)]))
    assert any("lease_tme_s: unknown key (did you mean 'lease_time_s'?)" in p for p in problems)
    assert any("t1_s (900) must be below t2_s (800)" in p for p in problems)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=6, max_size=6), st.sampled_from([":", "-"]),
       st.booleans())
def test_mac_normalisation(octets, sep, upper):
    """Any 6-octet MAC with ':' or '-' in any case normalises to lowercase colon form."""
    text = sep.join(f"{o:02x}" for o in octets)
    text = text.upper() if upper else text
    assert normalize_mac(text) == ":".join(f"{o:02x}" for o in octets)
    assert normalize_mac(text + ":00") is None


def test_receive_buffer_default_range_and_socket():
    """receive_buffer_bytes defaults to 4 MiB, is range-checked with its key path, and
    set_receive_buffer gets at least that from the kernel when allowed (root)."""
    import os
    import socket

    from appliance.net.sockets import set_receive_buffer
    cfg, problems = parse(base())
    assert problems == [] and cfg.receive_buffer_bytes == 4 * 1024 * 1024
    _, problems = parse(base(receive_buffer_bytes=10))
    assert any("services.dhcp4.receive_buffer_bytes" in p for p in problems), problems
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        got = set_receive_buffer(s, 4 * 1024 * 1024)
        assert got > 0
        if os.geteuid() == 0:
            assert got >= 4 * 1024 * 1024
