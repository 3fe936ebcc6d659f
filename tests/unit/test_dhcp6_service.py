"""The dhcp6 service on a Clock and an EmbeddedStore: REPLY after durable, RELAY-REPL to the
relay's source, server DUID kept, RPC, metrics, DDNS through appliance/ddns.py, appliancectl -6."""

from __future__ import annotations

from ipaddress import IPv6Address
from types import SimpleNamespace

import pytest
from twisted.internet import defer

from appliance.admin.rpc import ApplicationError
from appliance.config import config_from_string
from appliance.ddns import DHCID_DUID, FQDN_S
from services.dhcp.plugin import dhcp6_plugin
from services.dhcp.v6 import codec as C
from services.dhcp.v6.service import Dhcp6Service
from tests.support.sync import ManualThread, memory_store, ok
from tests.unit.test_dhcp6_server import T0, duid, msg

CONFIG = """
[node]
id = "a"
state_dir = "s"
[services.dhcp6]
listen_address = "::1"
port = 5547
[[services.dhcp6.subnets]]
id = 1
subnet = "2001:db8:1::/64"
pool = ["2001:db8:1::100", "2001:db8:1::1ff"]
pd_pools = [{ prefix = "2001:db8:100::/48", delegated_length = 56 }]
"""


class Sock:
    """The listener's socket options, recorded."""

    def __init__(self):
        self.options = {}

    def setsockopt(self, level, name, value):
        self.options[name] = value

    def getsockopt(self, level, name):
        return max(self.options.values(), default=0)

    def fileno(self):                   # no kernel receive times (SIOCGSTAMP) on a fake
        raise OSError("not a socket")


class Port:
    def __init__(self):
        self.sent = []
        self.socket = Sock()

    def stopListening(self):
        return None

    def write(self, data, addr):
        self.sent.append((C.parse(data), addr))


class Rpc:
    def __init__(self):
        self.methods = {}

    def register(self, name, f, **kw):
        self.methods[name] = f

    def __contains__(self, name):
        return name in self.methods

    def unregister(self, name):
        del self.methods[name]


class Provider:
    """A fake IDDNSUpdater recording its calls."""

    forward_zone = "example.test."

    def __init__(self):
        self.bound, self.released = [], []

    def answer_flags(self, flags):
        return FQDN_S

    def lease_bound(self, fqdn, address, identity, ttl, identity_type, **kw):
        self.bound.append((fqdn, address, identity, identity_type))
        return defer.succeed({"flags": FQDN_S})

    def lease_released(self, fqdn, address, identity, identity_type):
        self.released.append((fqdn, address, identity, identity_type))
        return defer.succeed({})

    def skipped(self, op, result):
        pass


def service(tmp_path, thread=None, providers=None, store=None, clock=None):
    cfg = config_from_string(CONFIG, "t.toml", {"dhcp6": dhcp6_plugin})
    if store is None:
        if thread is None:
            store, clock = memory_store(tmp_path)
        else:
            from twisted.internet.task import Clock
            from appliance.store.embedded import EmbeddedStore
            clock = Clock()
            store = EmbeddedStore(clock, state_dir=tmp_path, fsync="always", run_in_thread=thread,
                                  turn_batching=False)
            store.startService()
            thread.run_all()                           # the load
        clock.advance(T0)
    ctx = SimpleNamespace(reactor=clock, store=store, node_id="a", providers=providers or {},
                          cluster=None, rpc=Rpc(), metrics=SimpleNamespace(register=lambda c: None,
                                                                          unregister=lambda c: None))
    svc = Dhcp6Service(cfg.services["dhcp6"].config, ctx)
    listened = []
    clock.listenUDP = lambda port, proto, interface="": listened.append(Port()) or listened[-1]
    d = svc.startService()
    if thread is not None:
        thread.run_all()                               # the server DUID write
    ok(d)
    assert max(listened[0].socket.options.values()) == 4 * 1024 * 1024   # receive buffer
    svc.port = Port()
    return svc, clock, store


def relayed(m, link="2001:db8:1::1"):
    return C.encode(C.RelayMessage(C.RELAY_FORW, 0, IPv6Address(link).packed,
                                   IPv6Address("fe80::1").packed, m, b"ifx"))


def test_reply_leaves_only_after_the_lease_is_durable(tmp_path):
    """A REQUEST's REPLY waits for the store's disk write; the ADVERTISE (nothing written) does
    not; relayed replies go back as RELAY-REPL to the relay's source address and port."""
    thread = ManualThread()
    svc, clock, store = service(tmp_path, thread=thread)
    thread.run_all()
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())])), ("::1", 40000))
    (adv, addr), = svc.port.sent
    assert addr == ("::1", 40000) and adv.msg_type == C.RELAY_REPL and adv.interface_id == b"ifx"
    a = C.ntop(adv.inner.ia_na[0].addresses[0].address)
    svc.datagram(relayed(msg(C.REQUEST, 1, svc.server_duid, na=[(1, [a])])), ("::1", 40000))
    assert len(svc.port.sent) == 1                   # the write is not on disk yet
    thread.run_all()
    assert len(svc.port.sent) == 2
    assert svc.port.sent[1][0].inner.msg_type == C.REPLY


def test_store_failure_sends_no_reply(tmp_path):
    """If the write cannot be made durable, no REPLY leaves; it is counted (store_error)."""
    thread = ManualThread()
    svc, clock, store = service(tmp_path, thread=thread)
    thread.run_all()
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())], rapid_commit=True)), ("::1", 40000))
    thread.run_all(fail=True)
    assert svc.port.sent == [] and svc.drops["store_error"] == 1


def test_malformed_dropped_and_counted(tmp_path):
    """Garbage is counted by reason, never answered, never raises."""
    svc, clock, store = service(tmp_path)
    svc.datagram(b"\x01\x00", ("::1", 1))
    svc.datagram(bytes([12, 0]) + bytes(32), ("::1", 1))
    assert svc.drops["short"] == 1 and svc.drops["bad_relay"] == 1 and svc.port.sent == []


def test_server_duid_generated_once_and_kept(tmp_path):
    """No server_duid in config: a DUID-UUID is made on the first start, kept in the store,
    and the same one is used after a restart."""
    svc, clock, store = service(tmp_path)
    first = svc.server_duid
    assert first[:2] == b"\x00\x04" and len(first) == 18
    ok(svc.stopService())
    svc2, _, _ = service(tmp_path, store=store, clock=clock)
    assert svc2.server_duid == first


def test_rpc_leases_lease_release_scopes_stats(tmp_path):
    """dhcp6.leases lists addresses and prefixes (type filter), dhcp6.lease finds by address,
    prefix or DUID, dhcp6.release frees, scopes and stats answer."""
    svc, clock, store = service(tmp_path)
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())], pd=[(2, ())], rapid_commit=True)),
                 ("::1", 40000))
    rpc = svc.context.rpc.methods
    leases = rpc["dhcp6.leases"]()["leases"]
    assert {le["type"] for le in leases} == {"na", "pd"}
    pd = rpc["dhcp6.leases"](type="pd")["leases"]
    assert pd[0]["prefix"] == "2001:db8:100::/56" and pd[0]["duid"] == duid(1).hex()
    assert pd[0]["iaid"] == 2 and pd[0]["state"] == "bound" and pd[0]["owner"] == "a"
    assert rpc["dhcp6.lease"](address="2001:db8:1::100")["state"] == "bound"
    assert len(rpc["dhcp6.lease"](duid=duid(1).hex(":"))["leases"]) == 2
    released = ok(rpc["dhcp6.release"](prefix="2001:db8:100::/56"))
    assert released["state"] == "released"
    with pytest.raises(ApplicationError):
        ok(rpc["dhcp6.release"](prefix="2001:db8:100::/56"))
    scopes = rpc["dhcp6.scopes"]()["scopes"]
    assert scopes[0]["free"] == 255 and scopes[0]["free_prefixes"] == 256
    stats = rpc["dhcp6.stats"]()
    assert stats["packets"]["in_SOLICIT"] == 1 and stats["leases"]["na"]["bound"] == 1
    names = {m.name for m in svc.collect()}
    assert {"appliance_dhcp6_packets", "appliance_dhcp6_dropped", "appliance_dhcp6_leases",
            "appliance_dhcp6_free"} <= names


def test_ddns_aaaa_with_dhcid_from_the_duid(tmp_path):
    """A client FQDN (option 39) in a REQUEST: the REPLY answers option 39 (S set, name completed
    with the forward zone) and the provider publishes the address with the DUID as DHCID
    identity (type 2); a renewal changing nothing sends nothing; RELEASE removes it."""
    provider = Provider()
    svc, clock, store = service(tmp_path, providers={"ddns": provider})
    fq = C.ClientFQDN(0x01, "host1", True)
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())], fqdn=fq)), ("::1", 1))
    a = C.ntop(svc.port.sent[0][0].inner.ia_na[0].addresses[0].address)
    svc.datagram(relayed(msg(C.REQUEST, 1, svc.server_duid, na=[(1, [a])], fqdn=fq)), ("::1", 1))
    reply = svc.port.sent[1][0].inner
    assert reply.fqdn == C.ClientFQDN(0x01, "host1.example.test", False)
    assert provider.bound == [("host1.example.test.", a, duid(1), DHCID_DUID)]
    svc.datagram(relayed(msg(C.RENEW, 1, svc.server_duid, na=[(1, [a])], fqdn=fq)), ("::1", 1))
    assert len(provider.bound) == 1
    svc.datagram(relayed(msg(C.RELEASE, 1, svc.server_duid, na=[(1, [a])])), ("::1", 1))
    assert provider.released == [("host1.example.test.", a, duid(1), DHCID_DUID)]


def test_appliancectl_leases_6():
    """`appliancectl leases -6` calls dhcp6.leases and shows prefix rows with DUID and IAID."""
    from appliance.admin.ctl import COMMANDS, build_parser, render_leases
    args = build_parser().parse_args(["leases", "-6"])
    assert COMMANDS["leases"][1](args) == "dhcp6.leases"
    pd = build_parser().parse_args(["leases", "-6", "--type", "pd"])
    assert COMMANDS["leases"][2](pd) == {"type": "pd"}
    text = render_leases({"leases": [{"prefix": "2001:db8:100::/56", "type": "pd",
                                      "duid": "00030001", "iaid": 7, "state": "bound",
                                      "expires": 0, "cltt": 0, "owner": "a", "subnet": 1}],
                          "cursor": None})
    assert "2001:db8:100::/56" in text and "00030001" in text and "IAID" in text


def test_interface_addresses_from_procfs(tmp_path):
    """Direct clients: the interface's addresses (procfs if_inet6) pick the local subnet."""
    from services.dhcp.v6.service import interface_addresses
    f = tmp_path / "if_inet6"
    f.write_text("20010db8000100000000000000000001 05 40 00 80     eth1\n"
                 "fe800000000000000000000000000001 05 40 20 80     eth1\n"
                 "00000000000000000000000000000001 01 80 10 80       lo\n")
    assert interface_addresses("eth1", str(f)) == ["2001:db8:1::1", "fe80::1"]
    assert interface_addresses("nope", str(tmp_path / "missing")) == []


def test_overload_sheds_solicits_not_requests(tmp_path):
    """With MAX_INFLIGHT REPLYs waiting for the disk, a new SOLICIT is dropped (overload)
    while a REQUEST is still handled; once the writes are durable SOLICITs are answered."""
    thread = ManualThread()
    svc, clock, store = service(tmp_path, thread=thread)
    thread.run_all()
    svc.MAX_INFLIGHT = 1
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())], rapid_commit=True)), ("::1", 1))
    svc.datagram(relayed(msg(C.SOLICIT, 2, na=[(1, ())])), ("::1", 1))
    assert svc.drops["overload"] == 1 and svc.port.sent == []
    svc.datagram(relayed(msg(C.REQUEST, 3, svc.server_duid, na=[(1, ())])), ("::1", 1))
    thread.run_all()
    assert len(svc.port.sent) == 2                     # both REPLYs, after the disk
    svc.datagram(relayed(msg(C.SOLICIT, 2, na=[(1, ())])), ("::1", 1))
    assert len(svc.port.sent) == 3


class _Partner:
    """A split-scope partner relationship as the service sees it (Dhcp6Partner's
    answers_overloaded on a FailoverView; no cluster)."""

    def __init__(self, role, state="NORMAL", mode="split-scope"):
        from services.dhcp.failover.partner import FailoverView
        self.view = FailoverView(mode=mode, role=role, state=state)

    def observe(self, m):
        pass

    def answers_solicit(self, m):
        return True

    def status(self):
        return {"state": self.view.state}

    def answers_overloaded(self, m):
        from services.dhcp.v6.failover import Dhcp6Partner
        return Dhcp6Partner.answers_overloaded(self, m)


def _hash_clients():
    """Client numbers (tests' ``msg`` DUIDs) whose RFC 3074 bucket the primary owns, and
    ones the secondary owns (split 50)."""
    from services.dhcp.failover import pools as P
    own = {P.PRIMARY: [], P.SECONDARY: []}
    for n in range(1, 200):
        own[P.hash_owner(msg(C.SOLICIT, n).client_id, 50)].append(n)
    return own[P.PRIMARY], own[P.SECONDARY]


def test_overloaded_split_scope_partner_answers_its_own_clients(tmp_path):
    """Overloaded (MAX_INFLIGHT REPLYs wait for the disk), a split-scope node in NORMAL
    still answers the SOLICITs of the clients it owns by DUID hash and sheds the
    partner's: when both partners are overloaded at once (same traffic), every client
    still gets one ADVERTISE instead of both dropping the same SOLICITs.  Past twice the
    limit, or in any other state or mode, it sheds every SOLICIT as before."""
    thread = ManualThread()
    svc, clock, store = service(tmp_path, thread=thread)
    thread.run_all()
    svc.failover = _Partner("primary")
    svc.MAX_INFLIGHT = 1
    mine, theirs = _hash_clients()
    assert mine and theirs
    svc.datagram(relayed(msg(C.SOLICIT, mine[3], na=[(1, ())], rapid_commit=True)), ("::1", 1))
    assert svc._inflight == 1 and svc.port.sent == []          # its REPLY waits: overloaded
    svc.datagram(relayed(msg(C.SOLICIT, theirs[0], na=[(1, ())])), ("::1", 1))
    assert svc.drops["overload"] == 1 and svc.port.sent == []
    svc.datagram(relayed(msg(C.SOLICIT, mine[0], na=[(1, ())])), ("::1", 1))
    assert len(svc.port.sent) == 1 and svc.port.sent[0][0].inner.msg_type == C.ADVERTISE
    assert svc.overload_answered == 1 and svc.rpc_stats()["overload_answered"] == 1
    svc.datagram(relayed(msg(C.SOLICIT, mine[4], na=[(1, ())], rapid_commit=True)), ("::1", 1))
    assert svc._inflight == 2 and svc.overload_answered == 2   # twice the limit: shed all
    svc.datagram(relayed(msg(C.SOLICIT, mine[1], na=[(1, ())])), ("::1", 1))
    assert svc.drops["overload"] == 2 and len(svc.port.sent) == 1
    thread.run_all()
    assert svc._inflight == 0 and len(svc.port.sent) == 3      # the two rapid REPLYs
    svc.datagram(relayed(msg(C.SOLICIT, mine[5], na=[(1, ())], rapid_commit=True)), ("::1", 1))
    for partner in (_Partner("primary", state="COMMUNICATIONS-INTERRUPTED"),
                    _Partner("primary", mode="load-balancing"), None):
        svc.failover = partner
        svc.datagram(relayed(msg(C.SOLICIT, mine[2], na=[(1, ())])), ("::1", 1))
    assert svc.drops["overload"] == 5 and svc.overload_answered == 2
    svc.failover = _Partner("secondary")                       # the other side of the hash
    svc.datagram(relayed(msg(C.SOLICIT, theirs[1], na=[(1, ())])), ("::1", 1))
    assert svc.overload_answered == 3 and svc.drops["overload"] == 5


def test_stale_solicits_are_shed_requests_are_not(tmp_path, monkeypatch):
    """A SOLICIT that waited in the socket queue longer than solicit_max_age_ms is dropped
    ("stale": perfdhcp at overload got late ADVERTISEs it had given up on); a REQUEST of
    the same age is still answered; 0 turns the check off."""
    import time
    from services.dhcp.v6 import service as S
    svc, clock, store = service(tmp_path)
    assert svc.config.solicit_max_age_ms == 1000
    svc._max_age_s = 1.0                 # (the fake socket has no receive times)
    monkeypatch.setattr(S, "last_received_at", lambda sock: time.time() - 1.5)
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())])), ("::1", 1))
    assert svc.drops["stale"] == 1 and svc.port.sent == []
    svc.datagram(relayed(msg(C.REQUEST, 2, svc.server_duid, na=[(1, ())])), ("::1", 1))
    assert len(svc.port.sent) == 1 and svc.port.sent[0][0].inner.msg_type == C.REPLY
    monkeypatch.setattr(S, "last_received_at", lambda sock: time.time() - 0.5)
    svc.datagram(relayed(msg(C.SOLICIT, 3, na=[(1, ())])), ("::1", 1))
    assert len(svc.port.sent) == 2 and svc.port.sent[1][0].inner.msg_type == C.ADVERTISE
    svc._max_age_s = 0.0                 # solicit_max_age_ms = 0: off
    monkeypatch.setattr(S, "last_received_at", lambda sock: time.time() - 100)
    svc.datagram(relayed(msg(C.SOLICIT, 4, na=[(1, ())])), ("::1", 1))
    assert svc.drops["stale"] == 1 and len(svc.port.sent) == 3


@pytest.mark.parametrize("name", ["dhcp6.toml", "appliance.toml"])
def test_shipped_configs_parse(name):
    """etc/dhcp6.toml and the demo etc/appliance.toml give a valid dhcp6 table."""
    import tomllib
    from pathlib import Path
    from appliance.config import ParseContext, Problems, Table
    text = (Path(__file__).resolve().parents[2] / "etc" / name).read_text()
    problems = Problems(name)
    parsed = dhcp6_plugin.parse_config(
        Table(tomllib.loads(text)["services"]["dhcp6"], "services.dhcp6", problems),
        ParseContext(name, "demo", (), ()))
    assert problems.items == [] and parsed.subnets and parsed.port in (547, 5547)


def test_reclaim_expires_and_in_failover_runs_the_cores_reclaim(tmp_path):
    """Alone: the reclaim tick expires due bindings (and tells DDNS); with a partner the
    tick is the core's reclaim (it also unlocks pending-free addresses in PARTNER-DOWN)."""
    provider = Provider()
    svc, clock, store = service(tmp_path, providers={"ddns": provider})
    fq = C.ClientFQDN(0x01, "gone", True)
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())], rapid_commit=True, fqdn=fq)),
                 ("::1", 1))
    assert provider.bound
    clock.advance(4001)
    svc._reclaim_due()
    assert svc.leases.get("na", "2001:db8:1::100").state == "expired"
    assert [r[0] for r in provider.released] == ["gone.example.test."]
    calls = []
    svc.failover = SimpleNamespace(_reclaim_due=lambda: calls.append(1))
    svc._reclaim_due()
    assert calls == [1]


def test_send_error_is_counted_not_raised(tmp_path):
    """A reply the kernel refuses (unreachable, no buffer) is counted as send_error; the
    service keeps answering."""
    svc, clock, store = service(tmp_path)

    class Refusing(Port):
        def write(self, data, addr):
            raise OSError(101, "Network is unreachable")
    svc.port = Refusing()
    svc.received(relayed(msg(C.SOLICIT, 1, na=[(1, ())])), ("::1", 1))
    assert svc.drops["send_error"] == 1 and svc.drops.get("crash", 0) == 0


def test_role_for_status(tmp_path):
    """`appliancectl status` shows dhcp6 standalone, or its failover role and state."""
    svc, clock, store = service(tmp_path)
    assert svc.role == "standalone"
    svc.config = SimpleNamespace(failover=SimpleNamespace(role="primary"))
    svc.failover = SimpleNamespace(view=SimpleNamespace(state="NORMAL"))
    assert svc.role == "primary (NORMAL)"


def test_fqdn_too_long_with_the_zone_still_gets_its_reply(tmp_path):
    """A host name that no longer fits a DNS name once completed with the forward zone: the
    REPLY still leaves (option 39 with the flags only), the lease is bound."""
    provider = Provider()
    svc, clock, store = service(tmp_path, providers={"ddns": provider})
    long_name = ".".join(["x" * 60] * 4)                 # 243 octets: + zone > 255
    fq = C.ClientFQDN(0x01, long_name, True)
    svc.datagram(relayed(msg(C.SOLICIT, 1, na=[(1, ())], rapid_commit=True, fqdn=fq)),
                 ("::1", 1))
    (reply, _), = svc.port.sent
    assert reply.inner.msg_type == C.REPLY and reply.inner.ia_na[0].addresses
    assert reply.inner.fqdn == C.ClientFQDN(0x01, "", True)
