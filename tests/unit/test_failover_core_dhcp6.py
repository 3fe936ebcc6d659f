"""A dhcp6 pair on the failover core, on one task.Clock: two Dhcp6Service with their own
EmbeddedStore, a fake cluster (partner states by hand) and a peer link the test pumps.

Address and prefix pools are split by range (RFC 8156 split pools: the primary the lowest
half), lazy updates go over channel "dhcp6", a survivor renews the partner's client with the
same address and prefix, and a partition merge leaves no address or prefix with two clients."""

from __future__ import annotations

from ipaddress import IPv6Address, IPv6Network

from twisted.internet.task import Clock

from services.dhcp.failover import pools as P
from services.dhcp.v6 import codec as C
from tests.sim.dhcp6.pair import Wire, ask, duid, msg, node as _node
from tests.support.sync import ok

T0 = 1_700_000_000.0
MCLT = 60


def node(tmp_path, clock, wire, name, peer, role, state=P.NORMAL):
    return _node(tmp_path, clock, wire, name, peer, role, state, mclt_s=MCLT)


def pair(tmp_path):
    clock = Clock()
    clock.advance(T0)
    wire = Wire()
    a = node(tmp_path, clock, wire, "a", "b", "primary")
    b = node(tmp_path, clock, wire, "b", "a", "secondary")
    wire.pump()                          # hellos, update requests, update_done
    for svc in (a, b):
        assert svc.failover.view.state == P.NORMAL and not svc.failover.view.hold, \
            svc.failover.status()
    return clock, wire, a, b


def sarr(svc, client):
    """SOLICIT (rapid commit) for an address and a prefix: (address, prefix) or Nones."""
    rep = ask(svc, msg(C.SOLICIT, client, na=[(1, ())], pd=[(7, ())], rapid_commit=True))
    return got(rep)


def got(rep):
    if rep is None:
        return None, None
    a = [C.ntop(x.address) for x in rep.ia_na[0].addresses] if rep.ia_na else []
    p = [f"{C.ntop(x.prefix)}/{x.prefix_len}" for x in rep.ia_pd[0].prefixes] if rep.ia_pd else []
    return (a[0] if a else None), (p[0] if p else None)


def rebind(svc, client, address, prefix):
    rep = ask(svc, msg(C.REBIND, client, na=[(1, [address])], pd=[(7, [prefix])]))
    return rep, got(rep)


def owner_half(svc, address):
    return svc.failover.allocator.stores.segment_role(address)


def test_pools_split_by_range_and_updates_reach_the_partner(tmp_path):
    """New clients get addresses and prefixes from their server's own half (primary: the
    lowest), the partner stores them (lazy update on channel dhcp6), and the records end
    synced on both sides (the partner's "stored" report)."""
    clock, wire, a, b = pair(tmp_path)
    la = sarr(a, 1)
    lb = sarr(b, 2)
    assert la[0] and la[1] and lb[0] and lb[1]
    assert owner_half(a, la[0]) == P.PRIMARY and owner_half(a, la[1]) == P.PRIMARY
    assert owner_half(b, lb[0]) == P.SECONDARY and owner_half(b, lb[1]) == P.SECONDARY
    clock.advance(0.1)                   # the outbox's batch delay
    wire.pump()
    for svc in (a, b):
        for address in (*la, *lb):
            lease = svc.leases.get("pd" if "/" in address else "na", address)
            assert lease is not None and lease.state == "bound", (svc.name, address)
        assert not svc.failover.leases.unsynced, svc.failover.status()
    assert b.leases.get("na", la[0]).duid == duid(1).hex()
    # a first lease is capped at the MCLT (the partner had not acked it yet)
    assert a.leases.get("na", la[0]).expires <= T0 + MCLT + 1


def test_a_survivor_renews_the_dead_partners_client_unchanged(tmp_path):
    """a serves a client (address + prefix), replicated to b; a dies.  In
    COMMUNICATIONS-INTERRUPTED and then PARTNER-DOWN b answers the client's REBIND with the
    same address and the same prefix (never NoBinding), within the MCLT rule."""
    clock, wire, a, b = pair(tmp_path)
    address, prefix = sarr(a, 1)
    clock.advance(0.1)
    wire.pump()
    wire.cut()                                           # a is gone
    b.context.cluster.listener("a", P.COMM_INTERRUPTED, "peer a not heard")
    clock.advance(20)
    rep, (a2, p2) = rebind(b, 1, address, prefix)
    assert rep is not None and rep.msg_type == C.REPLY
    assert (a2, p2) == (address, prefix)
    assert rep.ia_na[0].status is None or rep.ia_na[0].status.code == 0
    b.context.cluster.confirmed = True
    b.context.cluster.listener("a", P.PARTNER_DOWN, "operator partner-down")
    clock.advance(20)
    rep, (a3, p3) = rebind(b, 1, address, prefix)
    assert (a3, p3) == (address, prefix)
    # within the MCLT beyond what a was told (a's potential expiry, 1.5 x the lifetime)
    lease = b.leases.get("na", address)
    assert lease.state == "bound" and lease.expires <= T0 + 0.1 + 1.5 * 4000 + MCLT


def test_nothing_is_served_on_hold_after_a_start(tmp_path):
    """A node that starts while its partner is silent answers nobody (it may be in
    PARTNER-DOWN on our addresses) until NORMAL or PARTNER-DOWN."""
    clock = Clock()
    clock.advance(T0)
    wire = Wire()
    a = node(tmp_path, clock, wire, "a", "b", "primary", state=P.STARTUP)
    assert sarr(a, 1) == (None, None)
    a.context.cluster.listener("b", P.COMM_INTERRUPTED, "peer b not heard")
    assert sarr(a, 1) == (None, None)
    a.context.cluster.listener("b", P.PARTNER_DOWN, "operator partner-down")
    assert sarr(a, 1) != (None, None)


def test_partition_then_merge_leaves_no_duplicate(tmp_path):
    """The partners cannot talk for longer than the MCLT while new clients come to both,
    more than either's half of the pools holds: each allocates only from its own half
    (the partner's is not its to give without a confirmed PARTNER-DOWN), so nothing is
    given twice, and after the heal and the merge no address or prefix is bound to two
    clients, on either side."""
    clock, wire, a, b = pair(tmp_path)
    wire.cut()
    for svc, peer in ((a, "b"), (b, "a")):
        svc.failover._partner_state(peer, P.COMM_INTERRUPTED, "peer not heard")
    got_a = [sarr(a, 100 + i) for i in range(3)]
    got_b = [sarr(b, 200 + i) for i in range(3)]
    clock.advance(MCLT * 2)
    last_a = [sarr(a, 300 + i) for i in range(7)]
    last_b = [sarr(b, 400 + i) for i in range(7)]
    given = [x for pair_ in got_a + got_b + last_a + last_b for x in pair_ if x]
    assert len(given) == len(set(given)), (got_a + last_a, got_b + last_b)
    for svc, got_ in ((a, got_a + last_a), (b, got_b + last_b)):
        role = svc.failover.view.role
        assert all(owner_half(svc, x) == role for pair_ in got_ for x in pair_ if x), got_
    wire.up = True
    for svc, peer in ((a, "b"), (b, "a")):
        svc.failover._partner_state(peer, P.NORMAL, "heard again")
    for _ in range(5):
        clock.advance(0.5)
        wire.pump()
    live = {x for pair_ in last_a + last_b for x in pair_ if x}
    for svc in (a, b):
        assert svc.failover.view.state == P.NORMAL, svc.failover.status()
        holders = {}
        now = clock.seconds()
        for kind in ("na", "pd"):
            for row in svc.leases.leases(kind=kind, limit=1000)["leases"]:
                lease = svc.leases.get(kind, row.get("address") or row.get("prefix"))
                if lease.state == "bound" and lease.expires > now:
                    key = (kind, lease.address)
                    assert key not in holders, (svc.name, key)
                    holders[key] = (lease.duid, lease.iaid)
        # the last round's leases, from both sides, each with its one client
        assert {address for _, address in holders} == live, (svc.name, holders)


def test_prefixes_and_addresses_keep_separate_store_namespaces(tmp_path):
    """IA_NA under dhcp6:na:*, IA_PD under dhcp6:pd:* (prefix text "net/len")."""
    clock, wire, a, b = pair(tmp_path)
    address, prefix = sarr(a, 1)
    store = a.context.store
    assert ok(store.hgetall(f"dhcp6:na:lease:{address}"))["state"] == "bound"
    assert ok(store.hgetall(f"dhcp6:pd:lease:{prefix}"))["state"] == "bound"
    assert IPv6Network(prefix).prefixlen == 56 and IPv6Address(address) in IPv6Network(
        "2001:db8:1::/64")


def test_the_partners_clients_waiting_are_reported_as_evidence(tmp_path):
    """In COMMUNICATIONS-INTERRUPTED a REBIND of the partner's client (its address in the
    partner's half) with an elapsed time of at least max_ack_delay_s (10 s) counts as an
    unanswered client of the partner (cluster.report_client_evidence), as in dhcp4; our own
    client, or a short wait, does not; back to NORMAL the count goes to 0."""
    clock, wire, a, b = pair(tmp_path)
    address, prefix = sarr(a, 1)                       # a's client, a's half
    mine = sarr(b, 2)                                  # b's own client
    clock.advance(0.1)
    wire.pump()
    wire.cut()
    b.failover._partner_state("a", P.COMM_INTERRUPTED, "peer a not heard")
    reports = b.context.cluster.evidence
    ask(b, msg(C.REBIND, 2, na=[(1, [mine[0]])], elapsed=2000))
    ask(b, msg(C.REBIND, 1, na=[(1, [address])], pd=[(7, [prefix])], elapsed=500))
    assert reports == []
    ask(b, msg(C.REBIND, 1, na=[(1, [address])], pd=[(7, [prefix])], elapsed=1500))
    assert reports == [("a", 1)]
    wire.up = True
    b.failover._partner_state("a", P.NORMAL, "heard")
    assert reports[-1] == ("a", 0)


def test_hot_standby_standby_answers_only_when_the_primary_is_not_heard(tmp_path):
    """mode = "hot-standby": the standby answers nobody in NORMAL, and serves from its
    reserve (its share of the split) in COMMUNICATIONS-INTERRUPTED."""
    clock = Clock()
    clock.advance(T0)
    wire = Wire()
    b = _node(tmp_path, clock, wire, "b", "a", "secondary", P.NORMAL, mclt_s=MCLT,
              mode="hot-standby", split=75)
    b.failover._remote_update("a", {"update_done": b.failover._catch_token})
    assert b.failover.view.state == P.NORMAL
    assert sarr(b, 1) == (None, None)
    b.failover._partner_state("a", P.COMM_INTERRUPTED, "peer a not heard")
    address, prefix = sarr(b, 1)
    assert owner_half(b, address) == P.SECONDARY and owner_half(b, prefix) == P.SECONDARY


def lb_pair(tmp_path, **cfg):
    clock = Clock()
    clock.advance(T0)
    wire = Wire()
    a = _node(tmp_path, clock, wire, "a", "b", "primary", P.NORMAL, mclt_s=MCLT, **cfg)
    b = _node(tmp_path, clock, wire, "b", "a", "secondary", P.NORMAL, mclt_s=MCLT, **cfg)
    wire.pump()
    for svc in (a, b):
        assert svc.failover.view.state == P.NORMAL and not svc.failover.view.hold
    return clock, wire, a, b


def solicit(svc, client, elapsed=None):
    rep = ask(svc, msg(C.SOLICIT, client, na=[(1, ())], pd=[(7, ())], elapsed=elapsed))
    assert rep is None or rep.msg_type == C.ADVERTISE
    return rep is not None


def test_load_balancing_the_duid_hash_owner_alone_answers_a_new_client(tmp_path):
    """mode = "load-balancing" (not the default): the split pools stay, and a SOLICIT is
    answered at once only by the owner of the client's RFC 3074 bucket (the DUID's hash,
    as Kea HA): each partner does half the new clients' SOLICIT work.  The other answers
    once the client's elapsed time reaches delay_s, and everybody when the partner is not
    heard."""
    clock, wire, a, b = lb_pair(tmp_path, mode="load-balancing")
    owners = {i: P.hash_owner(duid(i), 50) for i in range(1, 41)}
    assert set(owners.values()) == {P.PRIMARY, P.SECONDARY}
    for i, owner in owners.items():
        assert (solicit(a, i), solicit(b, i)) == (owner == P.PRIMARY, owner == P.SECONDARY), i
    assert a.drops["not_owner"] + b.drops["not_owner"] == 40
    # the owner looks silent: the client's elapsed time reached delay_s (2 s)
    i = next(i for i, o in owners.items() if o == P.SECONDARY)
    assert not solicit(a, i, elapsed=150) and solicit(a, i, elapsed=200)
    # the partner not heard: everybody is answered, from this node's own half
    a.failover._partner_state("b", P.COMM_INTERRUPTED, "peer b not heard")
    assert all(solicit(a, i) for i in owners)
    # a REQUEST of the owner's ADVERTISE binds there as in split-scope
    address, prefix = sarr(b, i)
    assert owner_half(b, address) == P.SECONDARY and owner_half(b, prefix) == P.SECONDARY


def test_split_scope_still_has_both_partners_answer_every_new_client(tmp_path):
    clock, wire, a, b = lb_pair(tmp_path)                  # the shipped mode
    assert all(solicit(a, i) and solicit(b, i) for i in range(1, 21))
    assert a.drops["not_owner"] == b.drops["not_owner"] == 0


def test_a_request_for_the_partner_is_dropped_before_the_parse(tmp_path, monkeypatch):
    """Both partners get every client message (multicast); a REQUEST (or RENEW) naming the
    partner's server id is dropped on a walk over its option headers, without the full
    parse, and counted in dhcp6.stats drops (not_our_server_id); one naming us is served.
    In COMMUNICATIONS-INTERRUPTED such a message is parsed: it is client evidence."""
    clock, wire, a, b = pair(tmp_path)
    adv = ask(a, msg(C.SOLICIT, 1, na=[(1, ())], pd=[(7, ())]))
    address, prefix = got(adv)
    req = msg(C.REQUEST, 1, a.server_duid, na=[(1, [address])], pd=[(7, [prefix])])
    parsed = []
    real = C.parse
    monkeypatch.setattr(C, "parse", lambda data, *k: parsed.append(1) or real(data, *k))
    assert ask(b, req) is None
    assert parsed == [] and b.rpc_stats()["drops"] == {"not_our_server_id": 1}
    assert "in_REQUEST" not in b.handler.counters
    rep = ask(a, req)
    assert got(rep) == (address, prefix) and parsed
    clock.advance(0.1)
    wire.pump()
    wire.cut()
    b.failover._partner_state("a", P.COMM_INTERRUPTED, "peer a not heard")
    parsed.clear()
    renew = msg(C.RENEW, 1, a.server_duid, na=[(1, [address])], pd=[(7, [prefix])],
                elapsed=1500)
    assert ask(b, renew) is None
    assert parsed and b.context.cluster.evidence == [("a", 1)]


def test_the_partners_ack_marks_its_records_in_one_store_commit(tmp_path, monkeypatch):
    """The partner's "stored" report of a lazy-update batch marks every record it names
    that is still current (synced, the acked potential expiry) in ONE store commit per
    lease type, not one per record; a version that changed since stays owed."""
    clock, wire, a, b = pair(tmp_path)
    wire.cut()                                          # the updates wait in a's outbox
    got_ = [sarr(a, i) for i in range(1, 7)]
    fl = a.failover.allocator.stores
    assert len(fl.unsynced) == 12
    entries = []
    for address, prefix in got_:
        for text in (address, prefix):
            entries.append([text, ok(fl.get(text)).version])
    stale = entries[0][0]
    entries[0][1] -= 1                                  # the partner stored an older version
    calls = []
    for st in (a.failover.allocator.na, a.failover.allocator.pd):
        monkeypatch.setattr(st, "_commit_now", lambda ops, expect=None, real=st._commit_now,
                            **kw: calls.append(len(ops)) or real(ops, expect, **kw))
    a.failover._partner_stored(entries)
    assert sorted(calls) == [5, 6], "one commit for the addresses, one for the prefixes"
    assert list(fl.unsynced) == [stale]
    for address, prefix in got_[1:]:
        for text in (address, prefix):
            rec = ok(fl.get(text))
            assert rec.synced and rec.acked >= rec.expires
    store = a.context.store
    commits = store.stats["commits"]
    clock.advance(0)
    assert store.stats["commits"] == commits, "the marks wait for the next commit"
    clock.advance(store.LAZY_S)
    assert store.stats["commits"] == commits + 1, "... or LAZY_S"
    assert ok(store.hgetall(f"dhcp6:na:lease:{got_[1][0]}"))["synced"] == "1"
    assert ok(store.hgetall(f"dhcp6:na:lease:{stale}"))["synced"] == "0"
