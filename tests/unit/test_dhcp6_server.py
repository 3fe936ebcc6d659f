"""DHCPv6 server rules (RFC 8415 16, 18.3) on the handler + the core's stores (CoreAllocator) +
EmbeddedStore, task.Clock."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network

import pytest
from twisted.internet.task import Clock

from appliance.config import ParseContext, Problems, Table
from appliance.store.embedded import EmbeddedStore
from services.dhcp.v6 import codec as C
from services.dhcp.v6.config import parse_dhcp6
from services.dhcp.v6.handler import Dhcp6Handler
from services.dhcp.v6.failover import CoreAllocator
from services.dhcp.v6.leases import NA, PD

from tests.support.sync import inline, ok

T0 = 1_700_000_000.0
SERVER = bytes.fromhex("0004") + bytes(range(16))
RES_DUID = "000300015254000000ff"


def config(**extra):
    data = {"listen_address": "::1", "port": 5547, "dns_servers": ["2001:db8:1::53"],
            "domain_list": ["example.test"],
            "subnets": [{"id": 1, "subnet": "2001:db8:1::/64",
                         "pool": ["2001:db8:1::100", "2001:db8:1::103"],
                         "pd_pools": [{"prefix": "2001:db8:100::/54", "delegated_length": 56}],
                         "preferred_lifetime_s": 1000, "valid_lifetime_s": 2000,
                         "reservations": [{"duid": RES_DUID, "address": "2001:db8:1::10",
                                           "prefix": "2001:db8:ff00::/56"}]},
                        {"id": 2, "subnet": "2001:db8:2::/64",
                         "pool": ["2001:db8:2::100", "2001:db8:2::1ff"],
                         "interface_id": "eth2"}]}
    data.update(extra)
    problems = Problems("t.toml")
    cfg = parse_dhcp6(Table(data, "services.dhcp6", problems), ParseContext("t.toml", "a", (), ()))
    assert problems.items == []
    return cfg


class Lab:
    def __init__(self, tmp_path, cfg=None, clock=None, store=None):
        self.clock = clock or Clock()
        if self.clock.seconds() < T0:
            self.clock.advance(T0)
        self.cfg = cfg or config()
        if store is None:
            store = EmbeddedStore(self.clock, state_dir=tmp_path, fsync="never",
                                  run_in_thread=inline, turn_batching=False)
            store.startService()
        self.store = store
        self.leases = CoreAllocator(store, self.cfg, "a", now=self.clock.seconds)
        ok(self.leases.load())
        self.events = []
        self.h = Dhcp6Handler(self.cfg, self.leases, SERVER, now=self.clock.seconds,
                              on_lease=lambda e, le: self.events.append((e, le.address)))

    def relay(self, m, link="2001:db8:1::1", interface_id=None):
        r = C.RelayMessage(C.RELAY_FORW, 0, IPv6Address(link).packed,
                           IPv6Address("fe80::1").packed, m, interface_id)
        out = self.h.handle(C.parse(C.encode(r)))
        if out is None:
            return None
        assert isinstance(out, C.RelayMessage) and out.msg_type == C.RELAY_REPL
        assert out.interface_id == interface_id
        return C.parse(C.encode(out)).inner


def duid(i: int) -> bytes:
    return bytes.fromhex("00030001") + (0x525400000000 + i).to_bytes(6, "big")


def msg(mtype, client=1, server=None, na=(), pd=(), **kw):
    m = C.Message(mtype, 0x123456, client_id=duid(client) if client is not None else None,
                  server_id=server, **kw)
    m.ia_na = [C.IA(iaid, addresses=[C.IAAddress(IPv6Address(a).packed) for a in addrs])
               for iaid, addrs in na]
    m.ia_pd = [C.IA(iaid, prefixes=[C.IAPrefix(IPv6Network(p).network_address.packed,
                                               IPv6Network(p).prefixlen) for p in prefs])
               for iaid, prefs in pd]
    return m


def addrs(reply, i=0):
    return [C.ntop(a.address) for a in reply.ia_na[i].addresses]


def prefixes(reply, i=0):
    return [f"{C.ntop(p.prefix)}/{p.prefix_len}" for p in reply.ia_pd[i].prefixes]


def sarr(lab, client=1, pd=True):
    adv = lab.relay(msg(C.SOLICIT, client, na=[(1, ())], pd=[(7, ())] if pd else ()))
    req = msg(C.REQUEST, client, SERVER, na=[(1, addrs(adv))],
              pd=[(7, prefixes(adv))] if pd else ())
    return adv, lab.relay(req)


def test_solicit_advertise_request_reply(tmp_path):
    """SOLICIT gets an ADVERTISE (nothing bound, nothing written); REQUEST binds and the REPLY
    carries T1/T2 and the preferred/valid lifetimes for the address and the prefix."""
    lab = Lab(tmp_path)
    adv = lab.relay(msg(C.SOLICIT, 1, na=[(1, ())], pd=[(7, ())], oro=(23, 24)))
    assert adv.msg_type == C.ADVERTISE and adv.server_id == SERVER and adv.client_id == duid(1)
    assert addrs(adv) == ["2001:db8:1::100"] and prefixes(adv) == ["2001:db8:100::/56"]
    assert lab.leases.writes == 0
    assert adv.dns_servers == (IPv6Address("2001:db8:1::53").packed,)
    assert adv.domain_list == ("example.test",)
    rep = lab.relay(msg(C.REQUEST, 1, SERVER, na=[(1, addrs(adv))], pd=[(7, prefixes(adv))]))
    assert rep.msg_type == C.REPLY and rep.txid == 0x123456
    ia = rep.ia_na[0]
    assert (ia.iaid, ia.t1, ia.t2) == (1, 500, 800)
    assert (ia.addresses[0].preferred, ia.addresses[0].valid) == (1000, 2000)
    assert (rep.ia_pd[0].iaid, rep.ia_pd[0].prefixes[0].valid) == (7, 2000)
    assert lab.leases.writes == 2
    assert lab.leases.get(NA, "2001:db8:1::100").state == "bound"
    assert lab.leases.get(PD, "2001:db8:100::/56").duid == duid(1).hex()


def test_request_binds_the_advertised_offer_without_a_second_offer(tmp_path):
    """The REQUEST after our ADVERTISE binds the offered address and prefix as they are: one
    offer per IA per exchange (the SOLICIT's).  A REQUEST naming another free address, or
    coming after the offer timed out, still goes through the offer (the general path)."""
    lab = Lab(tmp_path)
    calls = []
    real = lab.leases.offer
    lab.leases.offer = lambda kind, *a, **kw: calls.append(kind) or real(kind, *a, **kw)
    adv = lab.relay(msg(C.SOLICIT, 1, na=[(1, ())], pd=[(7, ())]))
    assert sorted(calls) == [NA, PD]
    rep = lab.relay(msg(C.REQUEST, 1, SERVER, na=[(1, addrs(adv))], pd=[(7, prefixes(adv))]))
    assert sorted(calls) == [NA, PD]                   # no second offer
    assert addrs(rep) == addrs(adv) and prefixes(rep) == prefixes(adv)
    assert lab.leases.get(NA, addrs(adv)[0]).state == "bound"
    assert lab.leases.get(PD, prefixes(adv)[0]).state == "bound"
    assert lab.h.counters["bind_conflict"] == 0
    # client 2: offered ::101, asks for ::102 (free, ours): the general path, as before
    adv2 = lab.relay(msg(C.SOLICIT, 2, na=[(1, ())]))
    calls.clear()
    rep2 = lab.relay(msg(C.REQUEST, 2, SERVER, na=[(1, ["2001:db8:1::102"])]))
    assert calls == [NA] and addrs(rep2) == addrs(adv2)
    # client 3: its offer timed out before the REQUEST: the general path
    adv3 = lab.relay(msg(C.SOLICIT, 3, na=[(1, ())]))
    lab.clock.advance(lab.cfg.offer_timeout_s + 1)
    calls.clear()
    rep3 = lab.relay(msg(C.REQUEST, 3, SERVER, na=[(1, addrs(adv3))]))
    assert calls == [NA] and addrs(rep3) == addrs(adv3)


def test_rapid_commit(tmp_path):
    """A SOLICIT with Rapid Commit gets a REPLY carrying Rapid Commit, bound (RFC 8415 18.3.1);
    with rapid_commit = false in config it gets an ADVERTISE."""
    lab = Lab(tmp_path)
    rep = lab.relay(msg(C.SOLICIT, 1, na=[(1, ())], rapid_commit=True))
    assert rep.msg_type == C.REPLY and rep.rapid_commit
    assert lab.leases.get(NA, addrs(rep)[0]).state == "bound"
    lab2 = Lab(tmp_path / "b", cfg=config(rapid_commit=False))
    adv = lab2.relay(msg(C.SOLICIT, 1, na=[(1, ())], rapid_commit=True))
    assert adv.msg_type == C.ADVERTISE and not adv.rapid_commit


def test_message_validation_drops(tmp_path):
    """RFC 8415 16: SOLICIT without Client ID or with a Server ID, REQUEST for another server,
    RENEW without Server ID, ADVERTISE sent to a server: dropped and counted, no reply."""
    lab = Lab(tmp_path)
    assert lab.relay(msg(C.SOLICIT, None, na=[(1, ())])) is None
    assert lab.relay(msg(C.SOLICIT, 1, SERVER, na=[(1, ())])) is None
    assert lab.relay(msg(C.REQUEST, 1, duid(99), na=[(1, ())])) is None
    assert lab.relay(msg(C.RENEW, 1, None, na=[(1, ())])) is None
    assert lab.relay(msg(C.ADVERTISE, 1, SERVER)) is None
    assert lab.relay(msg(C.INFORMATION_REQUEST, 1, na=[(1, ())])) is None
    c = lab.h.counters
    assert c["drop_no_client_id"] == 1 and c["drop_unexpected_server_id"] == 1
    assert c["drop_not_our_server_id"] == 1 and c["drop_no_server_id"] == 1
    assert c["drop_not_for_server"] == 1 and c["drop_ia_in_information_request"] == 1


def test_no_addrs_avail_and_no_prefix_avail(tmp_path):
    """A full pool answers the IA with NoAddrsAvail (IA_NA) / NoPrefixAvail (IA_PD)."""
    lab = Lab(tmp_path)
    for i in range(4):
        sarr(lab, client=10 + i)
    adv = lab.relay(msg(C.SOLICIT, 50, na=[(1, ())], pd=[(7, ())]))
    assert adv.ia_na[0].status.code == C.NO_ADDRS_AVAIL and not adv.ia_na[0].addresses
    assert adv.ia_pd[0].status.code == C.NO_PREFIX_AVAIL   # 4 /56 in the /54: all taken
    assert not adv.ia_pd[0].prefixes
    # subnet 2 has no prefix pool at all
    adv = lab.relay(msg(C.SOLICIT, 52, pd=[(7, ())]), link="2001:db8:2::1")
    assert adv.ia_pd[0].status.code == C.NO_PREFIX_AVAIL


def test_renew_extends_and_no_binding(tmp_path):
    """RENEW extends the binding's lifetimes from now (same address, same prefix); a RENEW for
    an IA the server has no binding for gets NoBinding (RFC 8415 18.3.4)."""
    lab = Lab(tmp_path)
    _, rep = sarr(lab)
    a, p = addrs(rep), prefixes(rep)
    lab.clock.advance(600)
    ren = lab.relay(msg(C.RENEW, 1, SERVER, na=[(1, a)], pd=[(7, p)]))
    assert addrs(ren) == a and prefixes(ren) == p
    assert ren.ia_na[0].addresses[0].valid == 2000
    assert lab.leases.get(NA, a[0]).expires == T0 + 600 + 2000
    nb = lab.relay(msg(C.RENEW, 1, SERVER, na=[(9, ["2001:db8:1::102"])]))
    assert nb.ia_na[0].status.code == C.NO_BINDING


def test_rebind_without_binding(tmp_path):
    """REBIND with no binding here: a free on-link address is bound to the client (it keeps
    it); an address off this link comes back with lifetimes 0 (RFC 8415 18.3.5); an on-link
    address the server cannot give it gets NoBinding."""
    lab = Lab(tmp_path)
    rb = lab.relay(msg(C.REBIND, 1, na=[(1, ["2001:db8:1::102"])]))
    assert addrs(rb) == ["2001:db8:1::102"] and rb.ia_na[0].addresses[0].valid == 2000
    assert lab.leases.get(NA, "2001:db8:1::102").state == "bound"
    rb = lab.relay(msg(C.REBIND, 2, na=[(1, ["2001:db8:9::5"])]))
    assert [(a.preferred, a.valid) for a in rb.ia_na[0].addresses] == [(0, 0)]
    # on the link but another client's: NoBinding, never lifetimes 0 (the address is
    # valid for its holder; in failover it may be the partner's client's)
    rb = lab.relay(msg(C.REBIND, 3, na=[(1, ["2001:db8:1::102"])]))
    assert rb.ia_na[0].status.code == C.NO_BINDING and not rb.ia_na[0].addresses
    assert lab.leases.get(NA, "2001:db8:1::102").duid == duid(1).hex()


def test_release_and_decline(tmp_path):
    """RELEASE frees the binding (status Success); an IA with no binding comes back with
    NoBinding; DECLINE quarantines the address for nobody (RFC 8415 18.3.7, 18.3.8)."""
    lab = Lab(tmp_path)
    _, rep = sarr(lab)
    a, p = addrs(rep), prefixes(rep)
    rel = lab.relay(msg(C.RELEASE, 1, SERVER, na=[(1, a)], pd=[(7, p)]))
    assert rel.status.code == C.SUCCESS and not rel.ia_na and not rel.ia_pd
    assert lab.leases.get(NA, a[0]).state == "released"
    assert lab.leases.get(PD, p[0]).state == "released"
    again = lab.relay(msg(C.RELEASE, 1, SERVER, na=[(1, a)]))
    assert again.ia_na[0].status.code == C.NO_BINDING
    _, rep2 = sarr(lab, client=2, pd=False)
    dec = lab.relay(msg(C.DECLINE, 2, SERVER, na=[(1, addrs(rep2))]))
    assert dec.status.code == C.SUCCESS
    declined = lab.leases.get(NA, addrs(rep2)[0])
    assert declined.state == "declined"
    adv = lab.relay(msg(C.SOLICIT, 2, na=[(1, ())]))
    assert addrs(adv) != addrs(rep2)


def test_confirm(tmp_path):
    """CONFIRM: Success when the addresses are on the link, NotOnLink when one is not, no
    reply without addresses (RFC 8415 18.3.3)."""
    lab = Lab(tmp_path)
    ok_ = lab.relay(msg(C.CONFIRM, 1, na=[(1, ["2001:db8:1::5"])]))
    assert ok_.status.code == C.SUCCESS
    bad = lab.relay(msg(C.CONFIRM, 1, na=[(1, ["2001:db8:1::5", "2001:db8:7::5"])]))
    assert bad.status.code == C.NOT_ON_LINK
    assert lab.relay(msg(C.CONFIRM, 1, na=[(1, ())])) is None


def test_information_request(tmp_path):
    """INFORMATION-REQUEST: a REPLY with the ORO's DNS servers and domain list, no IA."""
    lab = Lab(tmp_path)
    rep = lab.relay(msg(C.INFORMATION_REQUEST, 1, oro=(23, 24)))
    assert rep.msg_type == C.REPLY and rep.dns_servers and rep.domain_list == ("example.test",)
    assert not rep.ia_na and lab.leases.writes == 0


def test_reservation_by_duid(tmp_path):
    """A reserved DUID gets its address and prefix; nobody else is given them."""
    lab = Lab(tmp_path)
    cfg = lab.cfg
    rdu = bytes.fromhex(RES_DUID)
    m = msg(C.SOLICIT, None, na=[(1, ())], pd=[(2, ())])
    m.client_id = rdu
    adv = lab.relay(m)
    assert addrs(adv) == ["2001:db8:1::10"] and prefixes(adv) == ["2001:db8:ff00::/56"]
    req = msg(C.REQUEST, None, SERVER, na=[(1, addrs(adv))], pd=[(2, prefixes(adv))])
    req.client_id = rdu
    rep = lab.relay(req)
    assert addrs(rep) == ["2001:db8:1::10"]
    other = lab.relay(msg(C.REQUEST, 3, SERVER, na=[(1, ["2001:db8:1::10"])]))
    assert addrs(other) != ["2001:db8:1::10"]
    assert cfg.subnets[0].reservations[0].duid == RES_DUID


def test_subnet_selection(tmp_path):
    """Relayed: the innermost relay's interface-id picks a subnet first, else the link-address of
    the relay closest to the client; unknown link: dropped (no_subnet)."""
    lab = Lab(tmp_path)
    adv = lab.relay(msg(C.SOLICIT, 1, na=[(1, ())]), link="2001:db8:2::1")
    assert addrs(adv)[0].startswith("2001:db8:2::")
    adv = lab.relay(msg(C.SOLICIT, 1, na=[(1, ())]), link="::", interface_id=b"eth2")
    assert addrs(adv)[0].startswith("2001:db8:2::")
    # nested: the outer relay has the subnet-2 link, the inner (closest to the client) subnet 1
    inner = C.RelayMessage(C.RELAY_FORW, 0, IPv6Address("2001:db8:1::1").packed,
                           IPv6Address("fe80::9").packed, msg(C.SOLICIT, 1, na=[(1, ())]),
                           b"port9")
    outer = C.RelayMessage(C.RELAY_FORW, 1, IPv6Address("2001:db8:2::1").packed,
                           IPv6Address("fe80::8").packed, inner, b"uplink")
    out = lab.h.handle(C.parse(C.encode(outer)))
    assert out.interface_id == b"uplink" and out.inner.interface_id == b"port9"
    assert out.hop_count == 1 and out.inner.hop_count == 0
    assert C.ntop(out.inner.inner.ia_na[0].addresses[0].address).startswith("2001:db8:1::")
    assert lab.relay(msg(C.SOLICIT, 1, na=[(1, ())]), link="2001:db8:99::1") is None
    assert lab.h.counters["drop_no_subnet"] == 1


def test_lease_stability_and_reclaim(tmp_path):
    """An expired lease goes back to the pool (reclaim); the same client returning gets the same
    address and prefix while nobody took them."""
    lab = Lab(tmp_path)
    _, rep = sarr(lab)
    a, p = addrs(rep), prefixes(rep)
    lab.clock.advance(2001)
    expired = lab.leases.reclaim()
    assert {le.address for le in expired} == {a[0], p[0]}
    assert lab.leases.get(NA, a[0]).state == "expired"
    _, rep2 = sarr(lab)
    assert addrs(rep2) == a and prefixes(rep2) == p


def test_leases_survive_restart(tmp_path):
    """Bindings are in the store: a new lease store on the same store knows them, and a REQUEST
    from another client cannot take a bound address."""
    lab = Lab(tmp_path)
    _, rep = sarr(lab)
    again = Lab(tmp_path, clock=lab.clock, store=lab.store)
    assert again.leases.get(NA, addrs(rep)[0]).state == "bound"
    other = again.relay(msg(C.REQUEST, 2, SERVER, na=[(1, addrs(rep))]))
    assert addrs(other) != addrs(rep)


def test_ack_waits_for_durable(tmp_path):
    """The handler's REQUEST writes (``writes`` moves) so the service must wait on durable();
    an ADVERTISE does not write."""
    lab = Lab(tmp_path)
    w = lab.leases.writes
    lab.relay(msg(C.SOLICIT, 1, na=[(1, ())]))
    assert lab.leases.writes == w
    sarr(lab, client=2)
    assert lab.leases.writes > w
    assert ("bound", "2001:db8:1::101") in lab.events or ("bound", "2001:db8:1::100") in lab.events


@pytest.mark.parametrize("data,where", [
    ({"subnets": [{"subnet": "2001:db8::/64"}]}, "services.dhcp6.interface"),
    ({"listen_address": "127.0.0.1", "subnets": [{"subnet": "2001:db8::/64"}]},
     "services.dhcp6.listen_address"),
    ({"listen_address": "::1", "subnets": [{"subnet": "2001:db8::/64",
                                            "pool": ["2001:db8::1", "2001:db8::ff:ffff"]}]},
     "services.dhcp6.subnets[0].pool"),
    ({"listen_address": "::1", "subnets": [{"subnet": "2001:db8::/64", "pd_pools": [
        {"prefix": "2001:db8:100::/40", "delegated_length": 36}]}]},
     "services.dhcp6.subnets[0].pd_pools[0].delegated_length"),
    ({"listen_address": "::1", "subnets": [{"subnet": "2001:db8::/64", "reservations": [
        {"duid": "xyz", "address": "2001:db8::5"}]}]},
     "services.dhcp6.subnets[0].reservations[0].duid"),
    ({"listen_address": "::1", "subnets": [{"subnet": "2001:db8::/64", "t1_s": 900,
                                            "t2_s": 800}]}, "services.dhcp6.subnets[0].t1_s"),
    ({"listen_address": "::1", "subnets": [{"subnet": "2001:db8::/64", "pol": 1}]},
     "services.dhcp6.subnets[0].pol"),
])
def test_config_errors_name_the_key(data, where):
    """Config errors name the key path."""
    problems = Problems("t.toml")
    assert parse_dhcp6(Table(data, "services.dhcp6", problems),
                       ParseContext("t.toml", "a", (), ())) is None
    assert any(f"t.toml: {where}" in p for p in problems.items), problems.items


def test_failover_config_and_not_serving(tmp_path):
    """``failover`` is the core's table (a known peer; split-scope -- the default, RFC
    8156 --, load-balancing or hot-standby, no other mode); with failover every subnet
    needs an id; a handler told not to serve (on hold) answers nobody and counts it."""
    ctx = ParseContext("t.toml", "a", ("b",), ())
    base = {"listen_address": "::1", "subnets": [{"id": 1, "subnet": "2001:db8::/64"}]}
    problems = Problems("t.toml")
    cfg = parse_dhcp6(Table({**base, "failover": {"peer": "b", "role": "primary"}},
                            "services.dhcp6", problems), ctx)
    assert problems.items == [] and cfg.failover.peer == "b" and cfg.failover.mclt_s == 3600
    assert cfg.failover.mode == "split-scope"
    problems = Problems("t.toml")
    cfg = parse_dhcp6(Table({**base, "failover": {"peer": "b", "role": "primary",
                                                  "mode": "load-balancing"}},
                            "services.dhcp6", problems), ctx)
    assert problems.items == [] and cfg.failover.mode == "load-balancing"
    for bad, where in ((
            {"failover": {"peer": "b", "role": "primary", "mode": "round-robin"}},
            "services.dhcp6.failover.mode"),
            ({"failover": {"peer": "x", "role": "primary"}}, "services.dhcp6.failover.peer"),
            ({"failover": {"peer": "b", "role": "primary"},
              "subnets": [{"subnet": "2001:db8::/64"}]}, "services.dhcp6.subnets[0].id")):
        problems = Problems("t.toml")
        assert parse_dhcp6(Table({**base, **bad}, "services.dhcp6", problems), ctx) is None
        assert any(f"t.toml: {where}" in p for p in problems.items), problems.items
    lab = Lab(tmp_path)
    lab.h.may_serve = lambda: False
    assert lab.relay(msg(C.SOLICIT, 1, na=[(1, ())])) is None
    assert lab.h.counters["drop_not_serving"] == 1


def test_request_for_an_address_off_the_link_gets_not_on_link(tmp_path):
    """RFC 8415 18.3.2: a REQUEST whose IA_NA holds an address not appropriate for the
    client's link comes back with NotOnLink in that IA (and nothing is bound)."""
    lab = Lab(tmp_path)
    rep = lab.relay(msg(C.REQUEST, 1, SERVER, na=[(1, ["2001:db8:2::100"])]))
    assert rep.ia_na[0].status.code == C.NOT_ON_LINK and not rep.ia_na[0].addresses
    assert lab.leases.writes == 0


def test_t1_t2_follow_a_short_lifetime(tmp_path):
    """A binding whose lifetime is shorter than the configured T2 (the MCLT cap of failover,
    a lease near its end) gets T1/T2 at 0.5/0.8 of what is left, never beyond it."""
    from services.dhcp.v6.leases import Lease6
    lab = Lab(tmp_path)
    subnet = lab.cfg.subnets[0]
    now = lab.clock.seconds()
    short = Lease6(NA, "2001:db8:1::100", 1, duid(1).hex(), 1, "bound", now + 100, 0.0, now)
    ia = lab.h._ia_out(NA, C.IA(1), subnet, [short])
    assert (ia.t1, ia.t2, ia.addresses[0].preferred, ia.addresses[0].valid) == (50, 80, 100, 100)
    full = Lease6(NA, "2001:db8:1::101", 1, duid(2).hex(), 1, "bound", now + 2000, 0.0, now)
    ia = lab.h._ia_out(NA, C.IA(1), subnet, [full])
    assert (ia.t1, ia.t2) == (500, 800)


def test_preference_option_in_advertise(tmp_path):
    """``preference`` puts the Preference option (RFC 8415 21.8) in every ADVERTISE; without
    it there is none (clients then treat it as 0)."""
    lab = Lab(tmp_path, cfg=config(preference=255))
    assert lab.relay(msg(C.SOLICIT, 1, na=[(1, ())])).preference == 255
    plain = Lab(tmp_path / "p")
    assert plain.relay(msg(C.SOLICIT, 1, na=[(1, ())])).preference is None
