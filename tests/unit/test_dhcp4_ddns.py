"""DHCPv4 DDNS through the real dhcp4 service's lease path (services/dhcp/v4/ddns.py):
option 81 flags in and answered, names sanitized or skipped, renewals not republished,
the previous name/address on a change, the state recorded on the lease (and sent to the
partner with it), removal on expiry only by the lease owner, the TTL rule, and nothing
a provider does reaching the lease path.  A fake provider on a ``task.Clock``."""

from __future__ import annotations

from ipaddress import IPv4Address
from types import SimpleNamespace

import pytest
from twisted.internet import defer

from appliance.config import config_from_string
from appliance.ddns import (DHCID_CLIENT_ID, DHCID_HWADDR, FQDN_E, FQDN_N, FQDN_O, FQDN_S,
                            DDNSConflict, DDNSNameError)
from services.dhcp.plugin import dhcp4_plugin
from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from services.dhcp.v4.handler import Dhcp4Handler
from services.dhcp.v4.leases import DDNSState, Lease
from services.dhcp.v4.service import Dhcp4Service
from tests.sim.dhcp4.pair import macs_of
from tests.support.sync import memory_store, ok

T0 = 1_700_000_000.0
ZONE = "dhcp.example.test."
SERVER = "10.0.0.1"


class FakeProvider:
    """An IDDNSUpdater that records calls; answers at once unless ``hold`` is set."""

    forward_zone = ZONE
    domains = (ZONE,)

    def __init__(self):
        self.calls: list[dict] = []
        self.hold = False
        self.pending: list[tuple[defer.Deferred, dict]] = []
        self.refuse: set[str] = set()
        self.conflict: set[str] = set()
        self.raise_at_once = False

    def answer_flags(self, flags):
        if flags is None:
            return None
        if flags & FQDN_N:
            return FQDN_N
        return FQDN_S if flags & FQDN_S else 0

    def lease_bound(self, fqdn, address, identity, ttl_s, identity_type=DHCID_CLIENT_ID, *,
                    fqdn_flags=None, previous_fqdn=None, previous_address=None):
        if self.raise_at_once:
            raise RuntimeError("provider bug")
        call = dict(op="bound", fqdn=fqdn, address=address, identity=identity, ttl=ttl_s,
                    kind=identity_type, flags=fqdn_flags, previous_fqdn=previous_fqdn,
                    previous_address=previous_address)
        self.calls.append(call)
        if fqdn in self.refuse:
            return defer.fail(DDNSNameError(f"{fqdn} refused"))
        if fqdn in self.conflict:
            return defer.fail(DDNSConflict(f"{fqdn} taken"))
        result = {"name": fqdn, "address": address, "flags": self.answer_flags(fqdn_flags)}
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, result))
            return d
        return defer.succeed(result)

    def lease_released(self, fqdn, address, identity, identity_type=DHCID_CLIENT_ID):
        if self.raise_at_once:
            raise RuntimeError("provider bug")
        self.calls.append(dict(op="released", fqdn=fqdn, address=address, identity=identity,
                               kind=identity_type))
        result = {"name": fqdn, "forward": "removed"}
        if self.hold:
            d = defer.Deferred()
            self.pending.append((d, result))
            return d
        return defer.succeed(result)

    def skipped(self, op, result):
        self.calls.append(dict(op="skipped", what=(op, result)))

    def bound(self):
        return [c for c in self.calls if c["op"] == "bound"]

    def released(self):
        return [c for c in self.calls if c["op"] == "released"]


def config_text(node="a", failover=False, lease_time_s=600):
    role = "primary" if node == "a" else "secondary"
    peer = "b" if node == "a" else "a"
    fo = f'failover = {{ peer = "{peer}", role = "{role}" }}' if failover else ""
    return f"""
[node]
id = "{node}"
state_dir = "s"

[cluster]
peers = [{{ id = "{peer}", address = "10.0.0.2" }}]
auth_key_file = "k"

[services.dhcp4]
listen_address = "{SERVER}"
{fo}

[[services.dhcp4.subnets]]
id = 1
subnet = "10.0.0.0/24"
pool = ["10.0.0.10", "10.0.0.20"]
lease_time_s = {lease_time_s}
"""


class Outbox:
    """The partner's outbox: the newest record of each address (LeaseOutbox.pending)."""

    def __init__(self):
        self.pending: dict[str, Lease] = {}

    def add(self, lease):
        self.pending[lease.address] = lease


def make(tmp_path, *, node="a", failover=False, lease_time_s=600, provider=None):
    cfg = config_from_string(config_text(node, failover, lease_time_s), "t.toml",
                             {"dhcp4": dhcp4_plugin})
    store, clock = memory_store(tmp_path)
    clock.advance(T0)
    provider = provider or FakeProvider()
    ctx = SimpleNamespace(reactor=clock, store=store, node_id=node,
                          providers={"ddns": provider}, cluster=None, rpc=None, metrics=None)
    svc = Dhcp4Service(cfg.services["dhcp4"].config, ctx)
    ok(svc.leases.load())
    svc.view.state, svc.view.hold = P.NORMAL, False
    svc.running = True            # as after startService (not called: no sockets here)
    svc.outbox = Outbox()
    if failover:
        svc.leases.on_unsynced = svc._owed
    svc.handler = Dhcp4Handler(svc.config, svc.leases, IPv4Address(SERVER), now=clock.seconds,
                               failover=svc.view, on_lease=svc._lease_changed)
    return svc, clock, provider


def handle(svc, pkt):
    return ok(svc.handler.handle(pkt))


def options(mtype, hostname=None, fqdn=None, client_id=None, **more):
    opts = {C.OPT_MESSAGE_TYPE: bytes([mtype])}
    if hostname is not None:
        opts[C.OPT_HOST_NAME] = hostname if isinstance(hostname, bytes) else hostname.encode()
    if fqdn is not None:
        opts[C.OPT_CLIENT_FQDN] = C.encode_option_value(C.OPT_CLIENT_FQDN, fqdn) \
            if isinstance(fqdn, C.ClientFQDN) else fqdn
    if client_id is not None:
        opts[C.OPT_CLIENT_ID] = client_id
    for code, value in more.items():
        opts[int(code.lstrip("o"))] = value
    return opts


def dora(svc, hw: bytes, **kw):
    """DISCOVER/OFFER/REQUEST/ACK: the ACK packet."""
    offer = handle(svc, C.DHCPPacket(op=1, chaddr=hw, options=options(C.DISCOVER, **kw)))
    assert offer is not None and offer[0].message_type == C.OFFER
    return request(svc, hw, requested=offer[0].yiaddr, **kw)


def request(svc, hw: bytes, *, requested=None, ciaddr=None, **kw):
    extra = {}
    if requested is not None:
        extra["o50"] = IPv4Address(requested).packed
        extra["o54"] = IPv4Address(SERVER).packed
    pkt = C.DHCPPacket(op=1, chaddr=hw, options=options(C.REQUEST, **kw, **extra),
                       **({"ciaddr": IPv4Address(ciaddr)} if ciaddr else {}))
    ack = handle(svc, pkt)
    assert ack is not None and ack[0].message_type == C.ACK, ack
    return ack[0]


def renew(svc, hw: bytes, address, **kw):
    return request(svc, hw, ciaddr=address, **kw)


def answer81(ack) -> C.ClientFQDN | None:
    raw = ack.options.get(C.OPT_CLIENT_FQDN)
    return None if raw is None else C.decode_option_value(C.OPT_CLIENT_FQDN, raw)


def record(svc, address) -> Lease:
    return ok(svc.leases.get(str(address)))


HW = bytes([2, 0, 0, 0, 0, 1])


# -- option 81 ------------------------------------------------------------------------
def test_option81_flags_go_to_the_provider_and_the_ack_answers_them(tmp_path):
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, fqdn=C.ClientFQDN("laptop", FQDN_S | FQDN_E))
    call, = provider.bound()
    assert call["fqdn"] == "laptop." + ZONE and call["flags"] == FQDN_S | FQDN_E
    got = answer81(ack)
    assert got is not None, "RFC 4702: the ACK answers option 81 (not in the client's PRL)"
    assert got.flags == FQDN_S | FQDN_E and (got.rcode1, got.rcode2) == (255, 255)
    assert got.name == "laptop." + ZONE


def test_option81_s0_and_n1_answers(tmp_path):
    svc, clock, provider = make(tmp_path)
    # S=0, ASCII encoding (E=0): the client does A; the server answers S=0, E=0
    ack = dora(svc, HW, fqdn=C.ClientFQDN("desk." + ZONE, 0))
    assert provider.bound()[-1]["flags"] == 0
    assert answer81(ack).flags == 0 and answer81(ack).name == "desk." + ZONE
    # N=1: nobody updates -- the provider is not asked, the answer says N
    ack = dora(svc, bytes([2, 0, 0, 0, 0, 2]), fqdn=C.ClientFQDN("quiet", FQDN_N | FQDN_E))
    assert [c["fqdn"] for c in provider.bound()] == ["desk." + ZONE]
    assert answer81(ack).flags == FQDN_N | FQDN_E


def test_option81_name_wins_over_option12_and_no_option81_no_answer(tmp_path):
    svc, clock, provider = make(tmp_path)
    dora(svc, HW, hostname="from12", fqdn=C.ClientFQDN("from81", FQDN_S | FQDN_E))
    assert provider.bound()[-1]["fqdn"] == "from81." + ZONE
    ack = dora(svc, bytes([2, 0, 0, 0, 0, 2]), hostname="only12")
    assert provider.bound()[-1]["fqdn"] == "only12." + ZONE
    assert provider.bound()[-1]["flags"] is None
    assert answer81(ack) is None


# -- names ----------------------------------------------------------------------------
@pytest.mark.parametrize("hostname, published", [
    ("a..b", "a." + ZONE),                          # empty label dropped; dotted = FQDN
    ("x" * 300, "x" * 63 + "." + ZONE),             # one label, cut at 63 octets
    ("Café Bar", "caf-bar." + ZONE),                 # non-ASCII and space replaced
    ("host.other.example.", "host." + ZONE),         # outside our domains: label under ours
    ("Host.dhcp.example.test", "host." + ZONE),      # inside: kept (lower case)
])
def test_hostile_host_names_are_sanitized_and_the_lease_acked(tmp_path, hostname, published):
    svc, clock, provider = make(tmp_path, failover=True)
    hw, = macs_of(P.PRIMARY, 1)
    ack = dora(svc, hw, hostname=hostname.encode("utf-8"))
    assert ack.message_type == C.ACK
    assert [c["fqdn"] for c in provider.bound()] == [published]
    assert str(ack.yiaddr) in svc.outbox.pending, "the partner still gets the lease"


@pytest.mark.parametrize("hostname", ["...", "-", "ééé", "\x00\x01"])
def test_a_name_with_nothing_usable_is_a_counted_skip(tmp_path, hostname):
    from services.dhcp.v4.ddns import glue_for
    svc, clock, provider = make(tmp_path, failover=True)
    hw, = macs_of(P.PRIMARY, 1)
    ack = dora(svc, hw, hostname=hostname.encode("utf-8"))
    assert ack.message_type == C.ACK and provider.bound() == []
    assert glue_for(svc).stats["bad_name"] == 1
    assert str(ack.yiaddr) in svc.outbox.pending


def test_provider_refusal_is_a_counted_skip_answered_with_n(tmp_path):
    from services.dhcp.v4.ddns import glue_for
    provider = FakeProvider()
    provider.refuse.add("managed." + ZONE)
    svc, clock, provider = make(tmp_path, failover=True, provider=provider)
    hw, = macs_of(P.PRIMARY, 1)
    ack = dora(svc, hw, fqdn=C.ClientFQDN("managed", FQDN_S | FQDN_E))
    assert ack.message_type == C.ACK
    assert glue_for(svc).stats["bad_name"] == 1
    assert answer81(ack).flags == FQDN_N | FQDN_E
    assert record(svc, ack.yiaddr).ddns is None
    assert str(ack.yiaddr) in svc.outbox.pending


def test_a_provider_that_raises_never_reaches_the_lease_path(tmp_path):
    provider = FakeProvider()
    provider.raise_at_once = True
    svc, clock, provider = make(tmp_path, failover=True, provider=provider)
    hw, = macs_of(P.PRIMARY, 1)
    ack = dora(svc, hw, hostname="boom")
    assert ack.message_type == C.ACK and str(ack.yiaddr) in svc.outbox.pending


# -- renewals, renames, moves -------------------------------------------------------------
def test_unchanged_renewal_is_not_republished(tmp_path):
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, hostname="pc")
    clock.advance(300)
    renew(svc, HW, ack.yiaddr, hostname="pc")
    renew(svc, HW, ack.yiaddr)              # no name this time: the published one stays
    assert len(provider.bound()) == 1
    assert record(svc, ack.yiaddr).ddns == DDNSState("pc." + ZONE, str(ack.yiaddr), None, True)
    assert [c["what"] for c in provider.calls if c["op"] == "skipped"] == \
        [("bind", "unchanged")] * 2, "counted in the provider's DDNS metrics"


def test_renewal_republishes_while_the_first_publish_is_not_confirmed(tmp_path):
    svc, clock, provider = make(tmp_path)
    provider.hold = True
    ack = dora(svc, HW, hostname="pc")
    d, _ = provider.pending.pop()
    d.errback(OSError("timed out"))          # not published (after the provider's retries)
    assert record(svc, ack.yiaddr).ddns.done is False
    provider.hold = False
    renew(svc, HW, ack.yiaddr, hostname="pc")
    assert len(provider.bound()) == 2 and record(svc, ack.yiaddr).ddns.done


def test_a_renamed_client_passes_the_previous_name(tmp_path):
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, fqdn=C.ClientFQDN("old", FQDN_S | FQDN_E))
    renew(svc, HW, ack.yiaddr, fqdn=C.ClientFQDN("new", FQDN_S | FQDN_E))
    call = provider.bound()[-1]
    assert call["fqdn"] == "new." + ZONE and call["previous_fqdn"] == "old." + ZONE
    assert call["previous_address"] is None
    assert record(svc, ack.yiaddr).ddns.fqdn == "new." + ZONE


def test_a_moved_client_passes_the_previous_address(tmp_path):
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, hostname="mover")
    other = "10.0.0.15" if str(ack.yiaddr) != "10.0.0.15" else "10.0.0.16"
    request(svc, HW, requested=other, hostname="mover")
    call = provider.bound()[-1]
    assert call["address"] == other and call["previous_address"] == str(ack.yiaddr)
    assert call["previous_fqdn"] is None


def test_changed_flags_are_republished(tmp_path):
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, fqdn=C.ClientFQDN("pc", 0))
    renew(svc, HW, ack.yiaddr, fqdn=C.ClientFQDN("pc", FQDN_S))
    assert [c["flags"] for c in provider.bound()] == [0, FQDN_S]


# -- the state on the record ---------------------------------------------------------------
def test_ddns_state_goes_to_the_partner_with_the_bound_record(tmp_path):
    svc, clock, provider = make(tmp_path, failover=True)
    provider.hold = True
    hw, = macs_of(P.PRIMARY, 1)
    ack = dora(svc, hw, hostname="pc")
    queued = svc.outbox.pending[str(ack.yiaddr)]
    assert queued.state == "bound"
    assert queued.ddns == DDNSState("pc." + ZONE, str(ack.yiaddr), None, False), \
        "the record the partner gets says what is being published"
    assert Lease.from_wire(queued.to_wire()).ddns == queued.ddns
    d, result = provider.pending.pop()
    d.callback(result)
    assert record(svc, ack.yiaddr).ddns.done is True
    # after a restart the store still knows (the field is in the stored hash)
    assert Lease.from_hash(record(svc, ack.yiaddr).to_hash()).ddns.done is True


def test_conflict_leaves_nothing_recorded(tmp_path):
    provider = FakeProvider()
    provider.conflict.add("taken." + ZONE)
    svc, clock, provider = make(tmp_path, provider=provider)
    ack = dora(svc, HW, hostname="taken")
    assert ack.message_type == C.ACK and record(svc, ack.yiaddr).ddns is None


# -- removal ----------------------------------------------------------------------------------
def test_release_removes_the_recorded_name_not_the_host_name(tmp_path):
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, hostname="first", fqdn=C.ClientFQDN("published", FQDN_S | FQDN_E))
    handle(svc, C.DHCPPacket(op=1, chaddr=HW, ciaddr=ack.yiaddr, options=options(
        C.RELEASE, o54=IPv4Address(SERVER).packed)))
    rel, = provider.released()
    assert rel["fqdn"] == "published." + ZONE and rel["address"] == str(ack.yiaddr)
    assert rel["kind"] == DHCID_HWADDR and rel["identity"] == b"\x01" + HW
    assert record(svc, ack.yiaddr).ddns is None


def expired(address, owner="a", ddns=True):
    state = DDNSState("pc." + ZONE, address, None, True) if ddns else None
    return Lease(address, 1, "expired", "02:00:00:00:00:09", "", "pc", T0, T0 - 600, owner,
                 owner, 3, ddns=state)


def segment_addresses(svc):
    own = [f"10.0.0.{i}" for i in range(10, 21)
           if svc.leases.segment_role(f"10.0.0.{i}") == svc.view.role]
    other = [f"10.0.0.{i}" for i in range(10, 21)
             if svc.leases.segment_role(f"10.0.0.{i}") not in (svc.view.role, None)]
    return own[0], other[0]


def test_expiry_removes_only_on_the_lease_owner_or_the_partner_down_survivor(tmp_path):
    for node in ("a", "b"):
        svc, clock, provider = make(tmp_path / node, node=node, failover=True)
        own, other = segment_addresses(svc)
        svc._ddns("expired", expired(own))
        svc._ddns("expired", expired(other))
        assert [c["address"] for c in provider.released()] == [own], node
        svc.view.state = P.PARTNER_DOWN
        svc.view.partner_down_confirmed = True
        svc._ddns("expired", expired(other))
        assert [c["address"] for c in provider.released()] == [own, other], node


def expire_all(svc, clock):
    """Run the reclaim as the service does and hand the expiries to DDNS."""
    changed = ok(svc.leases.reclaim())
    for lease in changed:
        if lease.state == "expired":
            svc._ddns("expired", lease)
    return changed


def test_expiry_out_of_touch_with_the_partner_is_held_until_normal(tmp_path):
    """COMMUNICATIONS-INTERRUPTED (or an unconfirmed PARTNER-DOWN): the partner may have
    renewed the lease unseen, so the owner holds the removal; once NORMAL again it removes
    the name if the record is still the expired one, and drops it if it changed."""
    svc, clock, provider = make(tmp_path, failover=True, lease_time_s=60)
    hws = macs_of(P.PRIMARY, 2)
    acks = [dora(svc, hw, hostname=f"pc{i}") for i, hw in enumerate(hws)]
    svc.view.state = P.COMM_INTERRUPTED
    clock.advance(3600)
    assert len(expire_all(svc, clock)) == 2
    assert provider.released() == [], "held while the partner cannot be heard"
    clock.advance(5)
    assert provider.released() == [], "still out of touch"
    # the partner renewed pc1 meanwhile: its record comes back over the peer link
    fresh = record(svc, acks[1].yiaddr)
    from dataclasses import replace
    ok(svc.leases.apply_remote(replace(fresh, state="bound", cltt=clock.seconds(),
                                       expires=clock.seconds() + 60, updated_by="b",
                                       owner="b", pexp=clock.seconds() + 60)))
    svc.view.state = P.NORMAL
    clock.advance(5)
    assert [c["fqdn"] for c in provider.released()] == ["pc0." + ZONE]
    assert record(svc, acks[0].yiaddr).ddns is None


def test_unconfirmed_partner_down_holds_confirmed_removes(tmp_path):
    svc, clock, provider = make(tmp_path, failover=True)
    own, other = segment_addresses(svc)
    svc.view.state = P.PARTNER_DOWN
    svc._ddns("expired", expired(other))
    assert provider.released() == []
    svc.view.partner_down_confirmed = True
    svc._ddns("expired", expired(other))
    assert [c["address"] for c in provider.released()] == [other]


def test_expiry_without_failover_removes_and_old_records_fall_back_to_the_host_name(tmp_path):
    svc, clock, provider = make(tmp_path)
    svc._ddns("expired", expired("10.0.0.12", ddns=False))   # written before the field
    rel, = provider.released()
    assert rel["fqdn"] == "pc." + ZONE


def test_client_identifier_is_the_dhcid_identity(tmp_path):
    svc, clock, provider = make(tmp_path)
    dora(svc, HW, hostname="cid", client_id=b"\x01" + HW)
    call = provider.bound()[-1]
    assert call["identity"] == b"\x01" + HW and call["kind"] == DHCID_CLIENT_ID


# -- TTL ---------------------------------------------------------------------------------------
def test_ttl_is_a_third_of_the_configured_lease_time_at_least_60s(tmp_path):
    from services.dhcp.v4.ddns import ttl_for
    assert ttl_for(3600) == 1200 and ttl_for(90) == 60 and ttl_for(1) == 60
    svc, clock, provider = make(tmp_path, lease_time_s=7200)
    dora(svc, HW, hostname="pc")
    assert provider.bound()[-1]["ttl"] == 2400
    svc2, clock2, provider2 = make(tmp_path / "2", lease_time_s=30)
    dora(svc2, HW, hostname="pc")
    assert provider2.bound()[-1]["ttl"] == 60


def test_override_answers_o_flag(tmp_path):
    """With a provider that overrides S=0 (override_client_update) the answer says S|O."""
    provider = FakeProvider()
    provider.answer_flags = lambda flags: None if flags is None else FQDN_S | FQDN_O
    svc, clock, provider = make(tmp_path, provider=provider)
    ack = dora(svc, HW, fqdn=C.ClientFQDN("pc", FQDN_E))
    assert answer81(ack).flags == FQDN_S | FQDN_O | FQDN_E


def test_a_late_removal_never_points_the_client_index_back(tmp_path):
    """The removal of a released lease's name finishes after the client took another
    address: recording it on the old record leaves the client's index on its new lease."""
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, hostname="pc")
    provider.hold = True
    handle(svc, C.DHCPPacket(op=1, chaddr=HW, ciaddr=ack.yiaddr, options=options(
        C.RELEASE, o54=IPv4Address(SERVER).packed)))
    removal, result = provider.pending.pop()
    provider.hold = False
    other = "10.0.0.15" if str(ack.yiaddr) != "10.0.0.15" else "10.0.0.16"
    request(svc, HW, requested=other, hostname="pc")
    assert ok(svc.leases.find_client(1, HW, None)).address == other
    removal.callback(result)                      # the old name is gone now
    assert record(svc, ack.yiaddr).ddns is None
    assert ok(svc.leases.find_client(1, HW, None)).address == other


def test_an_answer_name_too_long_for_option81_never_costs_the_ack(tmp_path):
    """A 250-octet partial name plus the zone is no DNS name (over 255 octets): the
    provider refuses it, and the ACK still goes out (without an option 81 it cannot
    encode)."""
    from appliance.ddns import DDNSNameError as NameError_
    provider = FakeProvider()
    long_name = ".".join(["a" * 49] * 5)                 # 249 octets, partial

    def refuse_long(fqdn, *a, **kw):
        if len(fqdn) > 253:
            provider.calls.append(dict(op="bound", fqdn=fqdn))
            return defer.fail(NameError_("too long"))
        return FakeProvider.lease_bound(provider, fqdn, *a, **kw)
    provider.lease_bound = refuse_long
    svc, clock, provider = make(tmp_path, provider=provider)
    for flags in (0, FQDN_S | FQDN_E):                    # ASCII and wire format
        ack = dora(svc, bytes([2, 0, 0, 0, 9, flags]), fqdn=C.ClientFQDN(long_name, flags))
        assert ack.message_type == C.ACK
        assert answer81(ack).flags & FQDN_N, "refused: the server does no update"


def test_any_option12_and_option81_bytes_get_their_ack():
    """Whatever a client puts in option 12 and option 81, its REQUEST is ACKed (with the
    real DDNS name checks refusing what is no name), and nothing escapes."""
    import tempfile
    from pathlib import Path

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from services.dns.ddns import check_host_name
    import dns.name as dnsname

    provider = FakeProvider()
    real_bound = provider.lease_bound

    def checked(fqdn, *a, **kw):
        try:
            check_host_name(fqdn, [dnsname.from_text(ZONE)])
        except DDNSNameError as e:
            return defer.fail(e)
        return real_bound(fqdn, *a, **kw)
    provider.lease_bound = checked
    svc, clock, provider = make(Path(tempfile.mkdtemp(prefix="ddns-fuzz-")), provider=provider)
    counter = iter(range(1 << 20))

    @settings(max_examples=150, deadline=None)
    @given(o12=st.one_of(st.none(), st.binary(min_size=1, max_size=300)),
           o81=st.one_of(st.none(), st.binary(min_size=0, max_size=300)))
    def one(o12, o81):
        i = next(counter)
        hw = bytes([2, 0, 0, (i >> 16) & 255, (i >> 8) & 255, i & 255])
        kw = {}
        if o12 is not None:
            kw["hostname"] = o12
        if o81 is not None:
            kw["fqdn"] = o81
        ack = dora(svc, hw, **kw)
        assert ack.message_type == C.ACK
        handle(svc, C.DHCPPacket(op=1, chaddr=hw, ciaddr=ack.yiaddr, options=options(
            C.RELEASE, o54=IPv4Address(SERVER).packed)))
    one()


def test_a_restart_sweeps_removals_left_undone(tmp_path):
    """A released lease whose removal failed (DNS down beyond the provider's retries)
    still names its published records; after a restart the first lease event starts a
    sweep that removes them (and records it)."""
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, hostname="pc")
    real_release = provider.lease_released
    provider.lease_released = lambda *a, **kw: defer.fail(OSError("named down"))
    handle(svc, C.DHCPPacket(op=1, chaddr=HW, ciaddr=ack.yiaddr, options=options(
        C.RELEASE, o54=IPv4Address(SERVER).packed)))
    assert record(svc, ack.yiaddr).ddns is not None, "still published as far as we know"
    provider.lease_released = real_release
    # a restart: a new service on the same store
    svc2 = Dhcp4Service(svc.config, svc.context)
    ok(svc2.leases.load())
    svc2.view.state, svc2.view.hold, svc2.running = P.NORMAL, False, True
    svc2.handler = Dhcp4Handler(svc2.config, svc2.leases, IPv4Address(SERVER),
                                now=clock.seconds, failover=svc2.view,
                                on_lease=svc2._lease_changed)
    dora(svc2, bytes([2, 0, 0, 0, 0, 7]), hostname="other")
    assert provider.released() == []
    clock.advance(10)
    rel, = provider.released()
    assert rel["fqdn"] == "pc." + ZONE and rel["address"] == str(ack.yiaddr)
    assert record(svc2, ack.yiaddr).ddns is None


def test_held_removals_survive_a_restart_on_the_embedded_store(tmp_path):
    """An expiry held while the partner cannot be heard is written to the store
    (dhcp4:ddns:held); after a restart (the embedded store closed and opened again on
    the same state directory, a new service) the service's start hook brings it back
    and, once NORMAL, the name is removed -- without any lease event -- and the held
    entry leaves the store.  A held removal whose record changed meanwhile is dropped."""
    from services.dhcp.v4 import ddns as G
    from tests.support.sync import memory_store
    svc, clock, provider = make(tmp_path, failover=True, lease_time_s=60)
    hws = macs_of(P.PRIMARY, 2)
    acks = [dora(svc, hw, hostname=f"pc{i}") for i, hw in enumerate(hws)]
    svc.view.state = P.COMM_INTERRUPTED
    clock.advance(3600)
    assert len(expire_all(svc, clock)) == 2
    assert provider.released() == []
    held = ok(svc.context.store.hgetall(G.HELD_KEY))
    assert sorted(held) == sorted(str(a.yiaddr) for a in acks), held
    # the node stops before the partner is heard again
    ok(svc.context.store.stopService())
    store2, _ = memory_store(tmp_path, clock)
    # the partner renewed pc1 unseen: it arrives with the recovery, after the restart
    provider2 = FakeProvider()
    ctx = SimpleNamespace(reactor=clock, store=store2, node_id="a",
                          providers={"ddns": provider2}, cluster=None, rpc=None, metrics=None)
    svc2 = Dhcp4Service(svc.config, ctx)
    ok(svc2.leases.load())
    svc2.view.state, svc2.view.hold, svc2.running = P.COMM_INTERRUPTED, False, True
    svc2.outbox = Outbox()
    assert ok(G.Dhcp4DDNS.started(G._glue.setdefault(svc2, G.Dhcp4DDNS(svc2)))) == 2
    fresh = record(svc2, acks[1].yiaddr)
    from dataclasses import replace
    ok(svc2.leases.apply_remote(replace(fresh, state="bound", cltt=clock.seconds(),
                                        expires=clock.seconds() + 60, updated_by="b",
                                        owner="b", pexp=clock.seconds() + 60)))
    clock.advance(5)
    assert provider2.released() == [], "still out of touch with the partner"
    svc2.view.state = P.NORMAL
    clock.advance(5)
    assert [c["fqdn"] for c in provider2.released()] == ["pc0." + ZONE]
    assert record(svc2, acks[0].yiaddr).ddns is None
    assert ok(store2.hgetall(G.HELD_KEY)) == {}
    assert G.glue_for(svc2).stats["removed"] == 1, "removed once (held entry or sweep)"


def test_the_start_hook_never_raises_and_schedules_the_sweep(tmp_path):
    """service_started (called by the dhcp4 service at the end of its start) swallows
    any failure, and the sweep of removals left undone runs without a lease event."""
    from services.dhcp.v4 import ddns as G
    svc, clock, provider = make(tmp_path)
    ack = dora(svc, HW, hostname="pc")
    real_release = provider.lease_released
    provider.lease_released = lambda *a, **kw: defer.fail(OSError("named down"))
    handle(svc, C.DHCPPacket(op=1, chaddr=HW, ciaddr=ack.yiaddr, options=options(
        C.RELEASE, o54=IPv4Address(SERVER).packed)))
    provider.lease_released = real_release
    svc2 = Dhcp4Service(svc.config, svc.context)
    ok(svc2.leases.load())
    svc2.view.state, svc2.view.hold, svc2.running = P.NORMAL, False, True
    G.service_started(svc2)
    clock.advance(G.Dhcp4DDNS.SWEEP_AFTER_S)
    rel, = provider.released()
    assert rel["fqdn"] == "pc." + ZONE
    broken = SimpleNamespace(context=None, reactor=None)
    G.service_started(broken)          # logged, not raised
