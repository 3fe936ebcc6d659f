"""The DHCP failover core (services/dhcp/failover): families, the lease store on v6 addresses
and prefixes, LeaseStores, and that v4 keeps its keys and wire."""

from __future__ import annotations

import tempfile
from ipaddress import IPv6Address, IPv6Network

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings
from twisted.internet.task import Clock

from appliance.eager import as_deferred
from appliance.store.embedded import EmbeddedStore
from services.dhcp.failover import leases as core
from services.dhcp.failover.config import Failover
from services.dhcp.failover.family import (DHCP4, DHCP6_NA, DHCP6_PD, MAX_POOL_V6, prefix_int,
                                           prefix_text, v6_client)
from services.dhcp.failover.leases import AddressUnavailable, Lease, LeaseStore
from services.dhcp.failover.stores import (LeaseStores, Scope, ScopeConfig, ScopePool,
                                           ScopeReservation)
from services.dhcp.v4 import leases as v4
from tests.support.sync import inline, ok

T0 = 1_700_000_000.0


def store_and_clock():
    clock = Clock()
    clock.advance(T0)
    store = EmbeddedStore(clock, state_dir=tempfile.mkdtemp(), fsync="never",
                          run_in_thread=inline, turn_batching=False)
    store.startService()
    return store, clock


def na_config(failover=None, reservations=()):
    return ScopeConfig((Scope(1, IPv6Network("2001:db8:1::/64"),
                              (ScopePool("2001:db8:1::100", "2001:db8:1::1ff", 256),),
                              tuple(reservations)),), failover)


def pd_config(failover=None):
    return ScopeConfig((Scope(1, IPv6Network("2001:db8:100::/40"),
                              (ScopePool("2001:db8:100::/56", "2001:db8:100:ff00::/56", 256),
                               ScopePool("2001:db8:200::/60", "2001:db8:200:f0::/60", 16)),
                              delegated_len=56),), failover)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=128), st.integers(min_value=0, max_value=2**128 - 1))
def test_prefix_ints_round_trip_and_never_meet_address_ints(plen, bits):
    net = IPv6Network((bits >> (128 - plen) << (128 - plen), plen))
    n = prefix_int(net)
    assert prefix_text(n) == str(net) and DHCP6_PD.aton(str(net)) == n
    assert n >= 1 << 128 > DHCP6_NA.aton(str(net.network_address))


def test_prefixes_of_a_pool_are_consecutive_ints():
    first = prefix_int("2001:db8:100::/56")
    assert prefix_int("2001:db8:100:100::/56") == first + 1
    assert prefix_int("2001:db8:100:ff00::/56") == first + 255
    with pytest.raises(ValueError):
        DHCP6_PD.canonical("2001:db8:100:1::/56")          # host bits set
    with pytest.raises(ValueError):
        DHCP6_NA.canonical("2001:db8::/64")


def test_v4_family_keeps_the_v4_keys_and_names():
    """dhcp4's store layout and module names are the core's with the DHCP4 family."""
    assert (v4.LEASE_PREFIX, v4.VERSION_PREFIX, v4.CLIENT_PREFIX, v4.EXPIRY_KEY, v4.HELD_KEY) == \
        ("dhcp4:lease:", "dhcp4:lease-ver:", "dhcp4:client:", "dhcp4:expiry", "dhcp4:held")
    assert v4.lease_key("10.0.0.1") == "dhcp4:lease:10.0.0.1" and v4.Lease is core.Lease
    assert issubclass(v4.LeaseStore, core.LeaseStore) and DHCP4.channel == "dhcp4"
    assert DHCP4.canonical(167772161) == "10.0.0.1" == DHCP4.ntoa(DHCP4.aton("10.0.0.1"))


def test_v6_lease_store_allocates_binds_and_keys_by_duid_and_iaid():
    store, clock = store_and_clock()
    ls = LeaseStore(store, na_config(), "a", clock.seconds, family=DHCP6_NA)
    ok(ls.load())
    hw, cid = v6_client(bytes.fromhex("000100010203"), 1)
    hw2, cid2 = v6_client(bytes.fromhex("000100010203"), 2)        # same DUID, another IA
    o1 = ok(as_deferred(ls.offer(1, hw, cid)))
    b1 = ok(as_deferred(ls.bind(1, o1.address, hw, cid, lease_time_s=600)))
    o2 = ok(as_deferred(ls.offer(1, hw2, cid2)))
    assert b1.address == "2001:db8:1::100" and o2.address == "2001:db8:1::101"
    assert ok(store.hgetall("dhcp6:na:lease:2001:db8:1::100"))["state"] == "bound"
    assert ok(store.get(f"dhcp6:na:client:1:id:{cid}")) == "2001:db8:1::100"
    assert ok(as_deferred(ls.find_client(1, hw, cid))).address == b1.address
    with pytest.raises(AddressUnavailable):
        ok(as_deferred(ls.bind(1, b1.address, hw2, cid2, lease_time_s=600)))
    assert Lease.from_wire(b1.to_wire(), DHCP6_NA) == b1.__class__(**{
        **{f: getattr(b1, f) for f in b1.__dataclass_fields__}, "acked": 0.0, "synced": False})


def test_v6_reservation_by_duid():
    store, clock = store_and_clock()
    hw, cid = v6_client(bytes.fromhex("00030001aabbccddeeff"), 9)
    ls = LeaseStore(store, na_config(reservations=[ScopeReservation("2001:db8:1::1f0", hw)]),
                    "a", clock.seconds, family=DHCP6_NA)
    ok(ls.load())
    assert ok(as_deferred(ls.offer(1, hw, cid))).address == "2001:db8:1::1f0"
    other = v6_client(b"\x00\x01zz", 1)
    with pytest.raises(AddressUnavailable):
        ok(as_deferred(ls.bind(1, "2001:db8:1::1f0", *other, lease_time_s=60)))


def test_prefix_store_with_two_lengths_and_split_halves():
    """A PD scope may hold pools of several delegated lengths; with failover each pool is
    split by range (the primary the lowest half)."""
    store, clock = store_and_clock()
    fo = Failover("b", "primary", "split-scope", 50, 2.0, 60)
    ls = LeaseStore(store, pd_config(fo), "a", clock.seconds, family=DHCP6_PD)
    ok(ls.load())
    assert ls.free_count() == 256 + 16
    assert ls.segment_role("2001:db8:100:7f00::/56") == "primary"
    assert ls.segment_role("2001:db8:100:8000::/56") == "secondary"
    assert ls.segment_role("2001:db8:200:80::/60") == "secondary"
    hw, cid = v6_client(b"\x00\x01ab", 3)
    b = ok(as_deferred(ls.bind(1, "2001:db8:200:10::/60", hw, cid, lease_time_s=600,
                               roles=("primary",))))
    assert b.address == "2001:db8:200:10::/60" and b.expires == T0 + 60     # MCLT cap
    with pytest.raises(AddressUnavailable):                                 # partner's half
        ok(as_deferred(ls.bind(1, "2001:db8:200:80::/60", *v6_client(b"\x00\x01cd", 1),
                               lease_time_s=600, roles=("primary",))))


def test_a_v6_pool_above_the_bound_is_refused():
    store, clock = store_and_clock()
    big = ScopeConfig((Scope(1, IPv6Network("2001:db8:1::/64"),
                             (ScopePool("2001:db8:1::", str(IPv6Address("2001:db8:1::")
                                                            + MAX_POOL_V6)),)),))
    with pytest.raises(ValueError, match="more than"):
        LeaseStore(store, big, "a", clock.seconds, family=DHCP6_NA)


def test_lease_stores_dispatch_and_export_both_families():
    store, clock = store_and_clock()
    na = LeaseStore(store, na_config(), "a", clock.seconds, family=DHCP6_NA)
    pd = LeaseStore(store, pd_config(), "a", clock.seconds, family=DHCP6_PD)
    both = LeaseStores({"na": na, "pd": pd})
    ok(both.load())
    hw, cid = v6_client(b"\x00\x01ab", 3)
    for ls in (na, pd):
        o = ok(as_deferred(ls.offer(1, hw, cid)))
        ok(as_deferred(ls.bind(1, o.address, hw, cid, lease_time_s=600)))
    assert both.store_for("2001:db8:100::/56") is pd and both.store_for("2001:db8:1::100") is na
    assert both.address_int("2001:db8:100::/56") >= 1 << 128
    both.trust_acks = False
    assert na.trust_acks is False and pd.trust_acks is False
    seen, cursor = [], None
    while True:
        page, cursor = ok(both.export(cursor, 1))
        seen += [w["address"] for w in page]
        if cursor is None:
            break
    assert seen == ["2001:db8:1::100", "2001:db8:100::/56"]
    wire = ok(pd.get("2001:db8:100::/56")).to_wire()
    assert both.lease_from_wire(wire).address == "2001:db8:100::/56"
    assert sorted(both.unsynced) == []                   # no failover: nothing owed


def test_recover_runs_the_sync_of_every_service_of_a_relationship():
    """dhcp4 and dhcp6 both in failover with peer b register one relationship: RECOVER runs
    the sync of each (the second registration used to replace the first's sync), and a
    service registering again (restarted) replaces only its own."""
    from types import SimpleNamespace
    from appliance.cluster.partners import Partnerships
    from twisted.internet import defer
    clock = Clock()
    m = SimpleNamespace(cfg=SimpleNamespace(auto_partner_down_s=0), dead_after_s=0.3,
                        clock=clock, store=None)
    parts = Partnerships(m)
    calls = []

    class Svc:
        def __init__(self, name):
            self.name = name

        def sync(self, peer):
            calls.append((self.name, id(self), peer))
            return defer.succeed(None)

    v4, v6, v4_again = Svc("dhcp4"), Svc("dhcp6"), Svc("dhcp4")
    for svc in (v4, v6, v4_again):
        parts.register("b", None, primary=True, sync=svc.sync, data_lost=False)
    ok(defer.maybeDeferred(parts.partners["b"].sync, "b"))
    assert sorted(calls) == sorted([("dhcp4", id(v4_again), "b"), ("dhcp6", id(v6), "b")])
    fsm = parts.partners["b"].fsm
    assert not fsm.data_lost and fsm.recover_wait_s == 0.0
    # dhcp6 lost its lease store (dhcp4 did not): the relationship recovers for it too
    parts.register("b", None, primary=True, sync=v6.sync, data_lost=True, recover_wait_s=60.0)
    assert fsm.data_lost and fsm.recover_wait_s == 60.0


def test_v6_stores_reload_their_leases_after_a_restart():
    """A restart reads the stored records back with the store's own family (they were
    parsed as IPv4 and skipped as malformed: a dhcp6 node restarted with its disk knew
    none of its leases and took itself for a node that lost its data -- found by the
    dhcp6 pair simulator, seed 1396)."""
    store, clock = store_and_clock()
    hw, cid = v6_client(b"\x00\x01ab", 3)
    na = LeaseStore(store, na_config(), "a", clock.seconds, family=DHCP6_NA)
    pd = LeaseStore(store, pd_config(), "a", clock.seconds, family=DHCP6_PD)
    for ls in (na, pd):
        ok(ls.load())
        o = ok(as_deferred(ls.offer(1, hw, cid)))
        ok(as_deferred(ls.bind(1, o.address, hw, cid, lease_time_s=600)))
    na2 = LeaseStore(store, na_config(), "a", clock.seconds, family=DHCP6_NA)
    pd2 = LeaseStore(store, pd_config(), "a", clock.seconds, family=DHCP6_PD)
    assert ok(na2.load()) == 1 and ok(pd2.load()) == 1
    assert na2.counters["malformed_records"] == 0 == pd2.counters["malformed_records"]
    assert ok(as_deferred(na2.find_client(1, hw, cid))).address == "2001:db8:1::100"
    assert na2.free_count() == 255 and pd2.free_count() == 256 + 16 - 1


def test_v6_texts_are_the_ipaddress_forms_without_ipaddress():
    """The v6 families' conversions (inet_pton / inet_ntop on the hot path) give exactly
    ipaddress's canonical texts and prefix ints, and refuse what it refuses (host bits
    set, a bad length); the IPv4-mapped/-compatible range still goes through ipaddress."""
    import random
    rnd = random.Random(16)
    values = [0, 1, (1 << 48) - 1, 1 << 48, 0xFFFF << 32, (0xFFFF << 32) | 0x01020304,
              (1 << 128) - 1, int(IPv6Address("2001:db8:0:1::")), int(IPv6Address("1:0:0:1::"))]
    for _ in range(3000):
        a = rnd.getrandbits(128)
        for g in range(8):
            if rnd.random() < 0.5:
                a &= ~(0xFFFF << (16 * g))
        values.append(a)
    for a in values:
        text = str(IPv6Address(a))
        assert DHCP6_NA.ntoa(a) == text and DHCP6_NA.canonical(text.upper()) == text
        assert DHCP6_NA.as_int(text) == a
    for plen in (1, 37, 48, 56, 64, 128):
        for _ in range(200):
            net = IPv6Network((rnd.getrandbits(128) >> (128 - plen) << (128 - plen), plen))
            assert DHCP6_PD.canonical(str(net).upper()) == str(net)
            assert DHCP6_PD.as_int(str(net)) == prefix_int(net)
            assert prefix_text(prefix_int(net)) == str(net)
    for bad in ("2001:db8::1/56", "2001:db8::/129", "2001:db8::/x", "zz::/56", "2001:db8::/-1"):
        with pytest.raises(ValueError):
            DHCP6_PD.canonical(bad)
    for bad in ("1.2.3.4", "2001:db8::1/64", "g::", ""):
        with pytest.raises(ValueError):
            DHCP6_NA.canonical(bad)


def test_lease_stores_on_one_store_wait_once_for_durable():
    """NA and PD stores journaling into one state store: ``durable()`` is one wait on it
    (one Deferred per REPLY, not a DeferredList over two waits on the same commit)."""
    store, clock = store_and_clock()
    kw = dict(family=DHCP6_NA, immediate_writes=True)
    na = LeaseStore(store, na_config(), "a", clock.seconds, **kw)
    pd = LeaseStore(store, pd_config(), "a", clock.seconds, family=DHCP6_PD,
                    immediate_writes=True)
    both = LeaseStores({"na": na, "pd": pd})
    ok(both.load())
    hw, cid = v6_client(b"\x00\x01ab", 3)
    store.turn_batching = True
    for ls in (na, pd):
        o = ok(as_deferred(ls.offer(1, hw, cid)))
        ls.bind(1, o.address, hw, cid, lease_time_s=600)
    before = len(store._waiters)
    d = both.durable()
    assert len(store._waiters) == before + 1
    clock.advance(0)                                     # the end of the turn: the commit
    assert ok(d) is None and both.writes == 2


def test_a_read_reuses_the_parsed_record_while_its_version_stands(tmp_path, monkeypatch):
    """On the embedded store a record read or written is kept parsed: reading it again
    does not copy and parse the stored hash; a change behind the lease store (another
    writer moving the version key) is read afresh, and the record read is always what a
    fresh parse of the store gives."""
    from appliance.store.interface import Op
    store, clock = store_and_clock()
    ls = LeaseStore(store, na_config(), "a", clock.seconds, family=DHCP6_NA)
    ok(ls.load())
    hw, cid = v6_client(bytes.fromhex("000100010203"), 1)
    o = ok(as_deferred(ls.offer(1, hw, cid)))
    b = ok(as_deferred(ls.bind(1, o.address, hw, cid, lease_time_s=600)))
    copies = []
    real = store.hgetall_now
    monkeypatch.setattr(ls, "_hgetall_now", lambda key: copies.append(key) or real(key))
    assert ls._get(b.address) == b and ls._get(b.address) == b
    assert copies == []
    fresh = Lease.from_hash(real(f"dhcp6:na:lease:{b.address}"), DHCP6_NA)
    assert fresh == b
    other = Lease(b.address, 1, "released", b.hwaddr, b.client_id, "", b.expires, b.cltt + 1,
                  "b", "b", b.version + 1)
    store.commit_now([Op.hset(f"dhcp6:na:lease:{b.address}", other.to_hash()),
                      Op.set(f"dhcp6:na:lease-ver:{b.address}", str(other.version))])
    assert ls._get(b.address) == other and len(copies) == 1


def test_the_synced_copy_is_dataclasses_replace():
    """core._synced (the hand-written copy on every ack and partner update) is exactly
    dataclasses.replace(synced=True, acked=..., address=...): no field is lost."""
    from dataclasses import replace
    lease = Lease("2001:db8:1::5", 3, "bound", "hw", "cid", "h.example.", 10.5, 2.5, "a", "b",
                  7, 11.5, 1.5, False, core.DDNSState("h.example.", "2001:db8:1::5"), 4)
    assert core._synced(lease, 99.0) == replace(lease, synced=True, acked=99.0)
    assert core._synced(lease, 99.0, "2001:db8:1::6") == replace(
        lease, synced=True, acked=99.0, address="2001:db8:1::6")
    assert len(Lease.__dataclass_fields__) == 16, "a new field: add it to _synced"
