"""The failover rules that keep one address from two clients (issue 12), one test per
rule, and the review's reproductions (reviews/dhcp4.md Appendix A) as regressions:
the MCLT cap with the partner-acked potential expiry, pending-free, allocation order,
COMMUNICATIONS-INTERRUPTED answering everybody, the merge never freeing another
client's binding, the durable outbox."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from services.dhcp.v4 import leases as L
from services.dhcp.v4.config import failover_notes
from services.dhcp.v4.leases import Lease
from services.dhcp.v4.replication import LeaseOutbox
from tests.sim.dhcp4.pair import (SERVER_IDS, T0, Pair, discover, dora, lease_time, mac,
                                  macs_of, pair_config, request)
from tests.support.sync import ok

PRIMARY, SECONDARY = P.PRIMARY, P.SECONDARY
M = L.MAX_SKEW_S          # every wait on a partner's time allows for this much clock skew
NOW = T0


@pytest.fixture
def pair():
    made = []

    def make(**kw):
        p = Pair(**kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


def hw(i):
    return mac(i).hex(":")


# -- 1. potential expiration time / MCLT cap --------------------------------------------
def test_first_lease_is_mclt_then_full_after_the_partners_ack(pair):
    """A new client gets MCLT; the renewal after the partner acked gets the full time;
    without an ack, a renewal never runs past acked expiry + MCLT."""
    p = pair(mclt_s=30, lease_time_s=600)
    x, = macs_of(PRIMARY, 1)
    address, t = dora(p.a, x)
    assert t == 30
    assert ok(p.a.leases.get(address)).acked == 0.0
    p.sync()                                              # the partner acks
    acked = ok(p.a.leases.get(address)).acked
    assert acked >= T0 + 600
    p.clock.advance(15)                                   # T1 of the first lease
    ack = p.a.handle(request(x, ciaddr=address))
    assert ack.message_type == C.ACK and lease_time(ack) == 600
    # partner gone (no more acks): renewals stay within acked + MCLT
    p.link_up = False
    for _ in range(6):
        p.clock.advance(300)
        ack = p.a.handle(request(x, ciaddr=address))
        assert ack.message_type == C.ACK
        assert p.clock.seconds() + lease_time(ack) <= max(acked, p.clock.seconds()) + 30 + 1


def renewed_and_synced(p, node, hw, address, after=15):
    """The client renews at T1 of its first (MCLT) lease; the partner acks: it now holds
    the full lease time, known to both."""
    p.sync()
    p.clock.advance(after)
    ack = node.handle(request(hw, ciaddr=address))
    assert ack.message_type == C.ACK
    p.sync()
    return ack


def test_partner_renewal_is_capped_by_what_the_owner_told_it(pair):
    """The non-owner renewing the owner's client (COMMUNICATIONS-INTERRUPTED) gives at
    most MCLT beyond the owner's potential expiry, which it learnt from the update."""
    p = pair(mclt_s=30, lease_time_s=600)
    x, = macs_of(PRIMARY, 1)
    address, _ = dora(p.a, x)
    renewed_and_synced(p, p.a, x, address)
    pexp = ok(p.b.leases.get(address)).acked
    p.link_up = False
    for node in p.nodes:
        node.set_state(P.COMM_INTERRUPTED)
    p.clock.advance(500)
    ack = p.b.handle(request(x, ciaddr=address, secs=30))        # rebinding, reaches b
    assert ack is not None and ack.message_type == C.ACK and str(ack.yiaddr) == address
    assert p.clock.seconds() + lease_time(ack) <= pexp + 30 + 1


def test_review_h1_survivor_never_hands_out_the_dead_partners_unreported_lease(pair):
    """Review H1 (demo.py part 1): A gave .10 (replicated) and .11 (update lost), then
    died; B in PARTNER-DOWN after the MCLT offered .11 to a new client while its first
    client's 3600 s lease ran.  Now .11's lease is at most MCLT and B takes its own
    segment first: whatever B gives, no client of A still holds it."""
    p = pair(mclt_s=30, lease_time_s=3600)
    x1, x2 = macs_of(PRIMARY, 2)
    a1, _ = dora(p.a, x1)
    p.sync()
    a2, t2 = dora(p.a, x2)                                # never reaches B
    held = {a2: p.clock.seconds() + t2}
    assert t2 <= 30, "a lease the partner never heard of is at most the MCLT"
    p.a.crash()
    p.clock.advance(1)
    p.b.set_state(P.PARTNER_DOWN, confirmed=True)         # the operator says A is dead
    p.clock.advance(30 + M)
    roles = p.b.handler._roles()
    assert set(roles) == {PRIMARY, SECONDARY}
    # old API as in the review's script: B's offer to a new client
    o = ok(p.b.leases.offer(1, hw(3), roles=roles))
    assert p.b.leases.segment_role(o.address) == SECONDARY, "own segment first"
    assert not (o.address in held and held[o.address] > p.clock.seconds())
    # B hands out every address it can: none is one a client of A still holds
    for i, m in enumerate(macs_of(SECONDARY, 12, start=100)):
        got = dora(p.b, m)
        if got is None:
            break
        assert not (got[0] in held and held[got[0]] > p.clock.seconds()), got


def test_review_h1_script_with_the_old_api(tmp_path):
    """demo.py part 1 verbatim in spirit (bind with lease_time_s=3600, B PARTNER-DOWN
    roles after auto 1 s + MCLT 30 s): printed DUPLICATE before the fix."""
    p = Pair(mclt_s=30, lease_time_s=3600)
    try:
        A, B = p.a.leases, p.b.leases
        o = ok(A.offer(1, hw(1), roles=("primary",)))
        l1 = ok(A.bind(1, o.address, hw(1), lease_time_s=3600, roles=("primary",)))
        ok(B.apply_remote(Lease.from_wire(l1.to_wire())))
        o = ok(A.offer(1, hw(2), roles=("primary",)))
        l2 = ok(A.bind(1, o.address, hw(2), lease_time_s=3600, roles=("primary",)))
        assert l2.expires - p.clock.seconds() <= 30
        p.clock.advance(1 + 30)
        roles = P.allocation_roles("secondary", P.PARTNER_DOWN, 30, 30)
        o3 = ok(B.offer(1, hw(3), roles=roles))
        assert not (o3.address == l2.address and l2.expires > p.clock.seconds()), "DUPLICATE"
    finally:
        p.close()


# -- 2. pending-free ------------------------------------------------------------------------
def test_review_h2_expired_address_not_reused_while_the_partner_renewed_it(pair):
    """Review H2 (demo2.py): B renewed X in COMMUNICATIONS-INTERRUPTED; A's reclaim at
    X's old expiry used to free the address and ACK it to Y.  Now it is pending-free:
    not allocatable until the partner acknowledged the expiry."""
    p = pair(mclt_s=3600, lease_time_s=600, pool=("10.9.0.10", "10.9.0.13"))
    A, B = p.a.leases, p.b.leases
    xs = []
    for i in (1, 2):                                      # A's whole segment in use, replicated
        o = ok(A.offer(1, hw(i), roles=("primary",)))
        xs.append(ok(A.bind(1, o.address, hw(i), lease_time_s=600, roles=("primary",))))
    p.sync()
    x = ok(A.get(xs[0].address))
    p.link_up = False
    p.clock.advance(500)
    xb = ok(B.bind(1, x.address, hw(1), lease_time_s=600, roles=("secondary",)))
    assert xb.expires > x.expires
    p.clock.advance(x.expires - p.clock.seconds() + 1 + M)
    changed = ok(A.reclaim())
    assert x.address in [c.address for c in changed]
    assert A.pending_free >= 1
    o = ok(A.offer(1, hw(9), roles=("primary",)))
    assert o is None or o.address != x.address, "DUPLICATE with X"
    with pytest.raises(L.AddressUnavailable):
        ok(A.bind(1, x.address, hw(9), lease_time_s=600, roles=("primary",)))
    # the link comes back: B's renewal beats A's expiry and goes back to A first;
    # the address stays X's
    p.link_up = True
    p.sync()
    back = ok(A.get(x.address))
    assert back.state == L.BOUND and back.client_key == xb.client_key
    assert back.expires == xb.expires
    o = ok(A.offer(1, hw(9), roles=("primary",)))
    assert o is None or o.address != x.address


def test_released_address_is_free_only_after_the_partners_ack(pair):
    p = pair(mclt_s=30, lease_time_s=600)
    x, = macs_of(PRIMARY, 1)
    address, _ = dora(p.a, x)
    p.sync()
    ok(p.a.leases.release(address))
    assert p.a.leases.pending_free == 1
    before = p.a.leases.free_count(1, roles=(PRIMARY,))
    p.sync()
    assert p.a.leases.pending_free == 0
    assert p.a.leases.free_count(1, roles=(PRIMARY,)) == before + 1


def test_pending_free_unlocks_in_confirmed_partner_down_after_mclt(pair):
    p = pair(mclt_s=30, lease_time_s=600)
    x, = macs_of(PRIMARY, 1)
    address, _ = dora(p.a, x)
    p.sync()
    p.b.crash()
    ok(p.a.leases.release(address))
    rec = ok(p.a.leases.get(address))
    basis = max(rec.expires, rec.pexp, rec.acked)
    p.a.set_state(P.PARTNER_DOWN, confirmed=True)
    p.a.leases.unlock_pending()
    assert p.a.leases.pending_free == 1
    p.clock.advance(basis + 30 + M - p.clock.seconds() - 1)
    assert p.a.leases.unlock_pending() == 0
    p.clock.advance(2)
    assert p.a.leases.unlock_pending() == 1


def test_unconfirmed_partner_down_never_unlocks_the_partners_addresses():
    """Heartbeat silence (auto partner-down without a witness) is what a partition looks
    like: own segment only, whatever the time."""
    assert P.allocation_roles(PRIMARY, P.PARTNER_DOWN, 10_000, 30, confirmed=False) == (PRIMARY,)
    assert set(P.allocation_roles(PRIMARY, P.PARTNER_DOWN, 31, 30, confirmed=True)) == \
        {PRIMARY, SECONDARY}
    assert P.allocation_roles(PRIMARY, P.PARTNER_DOWN, 29, 30, confirmed=True) == (PRIMARY,)


# -- 3. allocation order --------------------------------------------------------------------
def test_own_segment_first_then_the_partners_oldest_freed_first(pair):
    p = pair(mclt_s=30, lease_time_s=600)
    B = p.b.leases
    # B learns of A's clients on .10 and .11; they release (acked); .12-.14 never used
    for i, a in ((1, "10.9.0.11"), (2, "10.9.0.10")):
        lease = ok(p.a.leases.bind(1, a, hw(i), lease_time_s=600, roles=(PRIMARY,)))
        p.sync()
        p.clock.advance(1)
        ok(p.a.leases.release(a))
        p.sync()
    p.a.crash()
    p.b.set_state(P.PARTNER_DOWN, confirmed=True)
    # A may have renewed its clients up to MCLT past the potential expiry it told B
    horizon = max(max(r.pexp, r.acked, r.expires) for r in (ok(B.get("10.9.0.10")),
                                                            ok(B.get("10.9.0.11"))))
    p.clock.advance(31)
    roles = p.b.handler._roles()
    assert ok(B.offer(1, hw(49), roles=roles)).address.startswith("10.9.0.1")
    p.clock.advance(horizon + 30 + M + 1 - p.clock.seconds())
    roles = p.b.handler._roles()
    got = []
    for i in range(10):
        o = ok(B.offer(1, hw(50 + i), roles=roles))
        got.append(o.address)
    assert [B.segment_role(a) for a in got[:5]] == [SECONDARY] * 5, got
    assert got[5:7] == ["10.9.0.11", "10.9.0.10"], "oldest-freed first"
    assert set(got[7:]) == {"10.9.0.12", "10.9.0.13", "10.9.0.14"}


# -- 4. COMMUNICATIONS-INTERRUPTED answers everybody ---------------------------------------
def test_comm_interrupted_answers_new_clients_and_the_partners_renewals(pair):
    p = pair(mclt_s=30, lease_time_s=600, mode="hot-standby", split=50)
    y, = macs_of(PRIMARY, 1)                              # hot-standby: A owns everybody
    ya, _ = dora(p.a, y)
    renewed_and_synced(p, p.a, y, ya)
    p.a.crash()                                           # A dies; B only suspects it
    p.b.set_state(P.COMM_INTERRUPTED)
    # a new client is answered at once from B's own segment, for at most MCLT
    n = macs_of(SECONDARY, 1, start=500)[0]
    got = dora(p.b, n)
    assert got is not None and p.b.leases.segment_role(got[0]) == SECONDARY and got[1] <= 30
    # A's client rebinding reaches B: renewed on its address within the MCLT rule
    p.clock.advance(300)
    ack = p.b.handle(request(y, ciaddr=ya))
    assert ack is not None and ack.message_type == C.ACK and str(ack.yiaddr) == ya
    assert p.clock.seconds() + lease_time(ack) <= ok(p.b.leases.get(ya)).acked + 30 + 1


def test_review_m1_non_owner_is_silent_for_the_partners_unknown_client(pair):
    """h2.py: A (NORMAL) NAKed a rebinding client on the partner's .16 it had no record of."""
    p = pair(mclt_s=3600, lease_time_s=3600)
    r = p.a.handle(request(mac(1), ciaddr="10.9.0.16", secs=30))
    assert r is None
    p.a.set_state(P.COMM_INTERRUPTED)
    assert p.a.handle(request(mac(1), ciaddr="10.9.0.16", secs=30)) is None


def test_review_l1_init_reboot_of_an_unknown_client_is_silent_in_failover(pair):
    p = pair()
    assert p.a.handle(request(mac(1), requested="10.9.0.11")) is None


# -- merge --------------------------------------------------------------------------------
def test_review_m2_remote_release_never_frees_another_clients_binding(pair):
    p = pair(mclt_s=30, lease_time_s=600)
    A = p.a.leases
    y = ok(A.bind(1, "10.9.0.10", hw(2), lease_time_s=600, roles=(PRIMARY,)))
    p.clock.advance(5)
    # the partner's record: client X released .10, with a newer cltt
    remote = Lease("10.9.0.10", 1, L.RELEASED, hw(1), "", "", p.clock.seconds(), p.clock.seconds(),
                   "b", "b", 3)
    result = ok(A.apply_remote(remote))
    assert result == L.LOCAL_WON
    kept = ok(A.get("10.9.0.10"))
    assert kept.state == L.BOUND and kept.client_key == y.client_key


# -- 5. durable outbox ------------------------------------------------------------------------
def test_updates_owed_to_the_partner_survive_a_crash(pair):
    p = pair(mclt_s=30, lease_time_s=600)
    x, = macs_of(PRIMARY, 1)
    address, _ = dora(p.a, x)
    p.a.crash()                                           # before the update left
    p.a.start()
    assert address in p.a.outbox, "rebuilt from the store at start"
    p.sync()
    assert ok(p.b.leases.get(address)).client_key == ok(p.a.leases.get(address)).client_key
    assert not p.a.leases.unsynced


def test_outbox_never_drops_a_batch_on_a_failed_send():
    clock = Clock()

    class Link:
        def __init__(self):
            self.calls, self.fail = [], True

        def send(self, peer, channel, body, *, limit=None):
            self.calls.append(body)
            if self.fail:
                return defer.fail(RuntimeError("peer link stopping"))
            return defer.succeed(None)

    link, acked = Link(), []
    box = LeaseOutbox(clock, link, "b", "dhcp4", 100, on_acked=acked.extend)
    lease = Lease("10.9.0.10", 1, L.BOUND, hw(1), "", "", T0 + 30, T0, "a", "a", 1)
    box.add(lease)
    clock.advance(0.01)
    assert len(link.calls) == 1 and box.backlog == 1, "kept after the failure"
    link.fail = False
    clock.advance(LeaseOutbox.RETRY_S)
    assert len(link.calls) == 2 and box.backlog == 0 and acked == [lease]


# -- config --------------------------------------------------------------------------------
def test_note_when_lease_time_is_above_mclt():
    assert failover_notes(pair_config("a", mclt_s=3600, lease_time_s=3600)) == []
    notes = failover_notes(pair_config("a", mclt_s=30, lease_time_s=600))
    assert len(notes) == 1 and "mclt_s" in notes[0] and "first lease" in notes[0]


# -- the service's wiring ----------------------------------------------------------------
def service(tmp_path, cluster=None):
    from types import SimpleNamespace
    from appliance.config import config_from_string
    from services.dhcp.plugin import dhcp4_plugin
    from services.dhcp.v4.service import Dhcp4Service
    from tests.support.sync import memory_store
    from tests.unit.test_dhcp4_replication import CONFIG
    cfg = config_from_string(CONFIG, "t.toml", {"dhcp4": dhcp4_plugin})
    store, clock = memory_store(tmp_path)
    clock.advance(T0)
    ctx = SimpleNamespace(reactor=clock, store=store, node_id="a", providers={},
                          cluster=cluster, rpc=None, metrics=None)
    svc = Dhcp4Service(cfg.services["dhcp4"].config, ctx)
    ok(svc.leases.load())
    return svc, clock


def test_only_a_real_partner_down_unlocks_the_partners_addresses(tmp_path):
    """Heartbeat silence (auto partner-down) without a witness, a recovering partner, a
    partner in maintenance: alive or maybe alive -- not confirmed.  The operator's
    command, or auto partner-down with a witness (quorum): confirmed."""
    from types import SimpleNamespace
    svc, clock = service(tmp_path)
    cases = [("peer b silent for 10s (auto_partner_down_s)", False),
             ("peer b recovering; serve its clients", False),
             ("peer b in maintenance", False),
             ("operator partner-down", True)]
    for reason, confirmed in cases:
        svc._partner_state("b", P.NORMAL, "heard")
        svc._partner_state("b", P.PARTNER_DOWN, reason)
        assert svc.view.partner_down_confirmed is confirmed, reason
        assert (svc.leases.partner_down_since is not None) is confirmed
    svc2, _ = service(tmp_path / "w", cluster=SimpleNamespace(witness_id="w"))
    svc2._partner_state("b", P.PARTNER_DOWN, "peer b silent for 10s (auto_partner_down_s)")
    assert svc2.view.partner_down_confirmed


def test_no_service_before_the_partner_is_heard_after_a_start_or_recovery(tmp_path):
    """Review M3: STARTUP -> COMMUNICATIONS-INTERRUPTED (partner silent) or RECOVER-DONE ->
    COMMUNICATIONS-INTERRUPTED serve nobody: the partner may be in PARTNER-DOWN using our
    addresses.  NORMAL or PARTNER-DOWN lift the hold."""
    svc, clock = service(tmp_path)
    assert svc.view.hold
    svc._partner_state("b", P.COMM_INTERRUPTED, "peer b not heard within 0.6s of start")
    assert svc.view.hold
    svc._partner_state("b", P.NORMAL, "peer heard")
    assert not svc.view.hold
    svc._partner_state("b", P.COMM_INTERRUPTED, "peer b not heard")
    assert not svc.view.hold, "a partition after NORMAL keeps serving"
    svc._partner_state("b", P.RECOVER, "peer b ran in PARTNER-DOWN; resync")
    svc._partner_state("b", P.RECOVER_DONE, "recovery sync finished")
    svc._partner_state("b", P.COMM_INTERRUPTED, "peer b not heard")
    assert svc.view.hold


def test_handler_holds_every_request_while_not_in_step(pair):
    p = pair()
    x, = macs_of(PRIMARY, 1)
    p.a.set_state(P.STARTUP)
    p.a.set_state(P.COMM_INTERRUPTED)
    assert p.a.handle(discover(x)) is None
    assert p.a.handler.counters["drop_not_serving"] == 1
    p.a.set_state(P.NORMAL)
    assert p.a.handle(discover(x)) is None         # NORMAL once caught up with b
    p.sync()                                       # b's update_done
    assert dora(p.a, x) is not None


def test_review_m4_a_failing_ddns_never_keeps_the_update_from_the_partner(tmp_path):
    svc, clock = service(tmp_path)
    queued = []
    svc.outbox = SimpleOutbox(queued)

    def boom(event, lease):
        raise ValueError("label too long")
    svc._ddns = boom
    lease = Lease("10.0.0.10", 1, L.BOUND, hw(1), "", "x" * 64, T0 + 30, T0, "a", "a", 1)
    svc._lease_changed("bound", lease)         # must not raise
    assert queued == [lease]


class SimpleOutbox:
    def __init__(self, queued):
        self.queued = queued

    def add(self, lease):
        self.queued.append(lease)


def test_merge_winner_goes_back_before_the_batch_is_acked(tmp_path):
    """H4: our record that beats the partner's (a renewal it has not seen, when it sends
    the expiry) is sent back at once, before the peer link acks its batch."""
    from types import SimpleNamespace
    sent = []
    link = SimpleNamespace(send=lambda peer, ch, body, limit=None: sent.append(body) or
                           defer.succeed(None), on=lambda *a: None)
    svc, clock = service(tmp_path, cluster=SimpleNamespace(peerlink=link))
    mine = ok(svc.leases.bind(1, "10.0.0.10", hw(1), lease_time_s=600, roles=None))
    expired = Lease("10.0.0.10", 1, L.EXPIRED, hw(1), "", "", T0 - 10, T0 - 100, "b", "b", 1)
    result = svc._remote_update("b", {"leases": [expired.to_wire()]})
    assert sent and sent[0]["leases"][0]["state"] == L.BOUND, "sent back in the handler"
    assert ok(svc.leases.get("10.0.0.10")).state == L.BOUND
    assert result is None or isinstance(result, defer.Deferred)
    assert mine.state == L.BOUND


def test_review_m5_reclaim_drains_a_backlog_in_full_batches(tmp_path):
    svc, clock = service(tmp_path)
    svc.RECLAIM_BATCH = 3
    svc.running = True          # (as after startService)
    for i in range(8):
        ok(svc.leases.bind(1, f"10.0.0.{10 + i}", hw(i), lease_time_s=60, roles=None))
    clock.advance(600)
    svc._reclaim_due()
    for _ in range(5):
        clock.advance(0)
    assert svc.leases.counters["reclaimed"] == 8


def test_an_empty_store_after_holding_leases_starts_in_recover_without_data(tmp_path):
    """A wiped lease store (the node held leases before: its marker in state_dir) tells
    the cluster data_lost (RECOVER, sync, RECOVER-WAIT of MCLT) and holds what the
    partner reports until its potential expiry + MCLT; a fresh node does not."""
    from types import SimpleNamespace
    calls = []

    class Cluster:
        peerlink = None

        def register_partner(self, peer, listener, **kw):
            calls.append(kw)
            return P.STARTUP
    state = tmp_path / "state"
    state.mkdir()
    svc, clock = service(tmp_path / "s1", cluster=Cluster())
    svc.context.state_dir = state
    svc._setup_failover()
    assert calls[-1]["data_lost"] is False, "a fresh node"
    svc._owed_marker_now()                  # it held leases
    svc2, clock2 = service(tmp_path / "s2", cluster=Cluster())   # ... then lost its store
    svc2.context.state_dir = state
    svc2._setup_failover()
    assert calls[-1]["data_lost"] is True and calls[-1]["recover_wait_s"] == 3600
    remote = Lease("10.0.0.12", 1, L.BOUND, hw(1), "", "", T0 + 10, T0 - 5, "b", "b", 1,
                   T0 + 100)
    svc2._apply_updates("b", [remote.to_wire()])
    assert svc2.leases._held[L._aton("10.0.0.12")] >= T0 + 100 + 3600
    svc2._partner_state("b", P.NORMAL, "peer heard")
    assert not (state / "dhcp4.recovering-without-data").exists()


# -- low findings ---------------------------------------------------------------------------
def test_review_l2_release_with_another_client_id_is_ignored(pair):
    """h.py: a RELEASE with client-id B released client-id A's lease on the same MAC."""
    from tests.sim.dhcp4.pair import Node, release
    p = pair()
    hw1 = mac(1)
    cid_a, cid_b = b"\xff" + b"A" * 8, b"\xff" + b"B" * 8
    node = p.a if P.hash_owner(cid_a, 50) == PRIMARY else p.b
    d = discover(hw1)
    d.options[C.OPT_CLIENT_ID] = cid_a
    offer = node.handle(d)
    r = request(hw1, requested=offer.yiaddr, server=SERVER_IDS[node.name])
    r.options[C.OPT_CLIENT_ID] = cid_a
    ack = node.handle(r)
    assert ack.message_type == C.ACK
    rel = release(hw1, ack.yiaddr, SERVER_IDS[node.name])
    rel.options[C.OPT_CLIENT_ID] = cid_b
    node.handle(rel)
    assert ok(node.leases.get(str(ack.yiaddr))).state == L.BOUND
    rel.options[C.OPT_CLIENT_ID] = cid_a
    node.handle(rel)
    assert ok(node.leases.get(str(ack.yiaddr))).state == L.RELEASED


def test_review_l4_server_id_override_only_from_a_relay(pair):
    """A local (non-relayed) client cannot make us accept another server's id via 82.11."""
    from ipaddress import IPv4Address
    p = pair()
    x = macs_of(PRIMARY, 1)[0]
    offer = p.a.handle(discover(x))
    other = IPv4Address("10.9.0.99")
    r = request(x, requested=offer.yiaddr, server=other)
    r.options[C.OPT_RELAY_AGENT_INFO] = C.encode_option_value(C.OPT_RELAY_AGENT_INFO,
                                                              {11: other.packed})
    assert p.a.handle(r) is None
    assert p.a.handler.counters["drop_other_server"] == 1


def test_recovery_sync_is_flow_controlled_and_times_out_on_silence_only(tmp_path):
    """Review M10/H4: the partner's sync keeps at most SYNC_WINDOW batches unacked; the
    recovering side gives up after SYNC_IDLE_S without a batch, not after a fixed time."""
    from types import SimpleNamespace
    from services.dhcp.v4 import service as S
    pending = []
    link = SimpleNamespace(on=lambda *a: None,
                           send=lambda peer, ch, body, limit=None: pending.append(
                               (body, defer.Deferred())) or pending[-1][1])
    svc, clock = service(tmp_path, cluster=SimpleNamespace(peerlink=link))
    svc.SYNC_WINDOW = 2
    for i in range(9):                       # 9 leases, 1 per batch
        ok(svc.leases.bind(1, f"10.0.0.{10 + i}", hw(i), lease_time_s=600, roles=None))
    old_batch, S.SYNC_BATCH = S.SYNC_BATCH, 1
    try:
        svc._send_all("b")
        assert len(pending) == 2, "the window"
        for _ in range(20):
            for body, d in list(pending):
                if not d.called:
                    d.callback(None)
        assert sum(len(b.get("leases", ())) for b, _ in pending) == 9
        assert pending[-1][0] == {"sync_done": 9}
    finally:
        S.SYNC_BATCH = old_batch
    pending.clear()
    failures = []
    svc.SYNC_IDLE_S = 60
    d = svc._sync_from_partner("b")
    d.addErrback(failures.append)
    for _ in range(5):                       # batches keep coming: no timeout
        clock.advance(50)
        svc._apply_updates("b", [])
    assert not failures
    clock.advance(61)
    assert failures and failures[0].check(defer.TimeoutError)


def test_partner_updates_wait_while_the_clocks_are_too_far_apart(tmp_path):
    """Merges compare two clocks' times: beyond MAX_SKEW_S the batch waits (unacked, so
    the partner keeps capping those leases) and dhcp4.stats says why."""
    from types import SimpleNamespace
    skew = {"b": 10.0}
    cluster = SimpleNamespace(peerlink=None, skew=lambda peer: skew[peer])
    svc, clock = service(tmp_path, cluster=cluster)
    lease = Lease("10.0.0.12", 1, L.BOUND, hw(1), "", "", T0 + 100, T0, "b", "b", 1)
    d = svc._apply_updates("b", [lease.to_wire()])
    assert isinstance(d, defer.Deferred) and not d.called
    assert ok(svc.leases.get("10.0.0.12")) is None
    assert svc.rpc_stats()["merge_held_by_skew"]["skew_s"] == 10.0
    clock.advance(1)
    assert ok(svc.leases.get("10.0.0.12")) is None, "still waiting"
    skew["b"] = 0.5
    clock.advance(1)
    clock.advance(0)
    assert ok(svc.leases.get("10.0.0.12")).client_key == lease.client_key
    assert svc.rpc_stats()["merge_held_by_skew"] is None


def test_review_m6_reserved_client_whose_address_is_taken_gets_no_offer_it_cannot_bind(tmp_path):
    """demo.py part 3: the reserved client was OFFERed a pool address that its REQUEST then
    got NAKed for (a DISCOVER/NAK loop).  Now OFFER and REQUEST agree: no offer."""
    from ipaddress import IPv4Address
    from tests.unit.test_dhcp4_leases import config, make
    ls, store, clock = make(tmp_path, config())
    ok(ls.bind(1, "10.9.0.12", hw(7), lease_time_s=3600))
    ls.set_external_reservations([(hw(8), IPv4Address("10.9.0.12"))])
    assert ok(ls.offer(1, hw(8))) is None
    assert ls.counters["reservation_busy"] == 1


def test_an_address_hold_survives_a_restart(pair):
    """Simulator seed 198: b recovered without its data and held an address until the
    potential expiry + MCLT of a lease it had given (its update lost with the disk);
    kill -9 of b with the disk kept, restart: the hold was memory only, b gave the
    address to a new client while the first one's lease still ran.  Holds are stored."""
    p = pair(pool=("10.9.0.10", "10.9.0.11"), split=0)      # b's segment: both addresses
    until = NOW + 300
    for address in ("10.9.0.10", "10.9.0.11"):
        p.b.leases.hold(p.b.leases.address_int(address), until)
    p.b.crash()
    p.b.start()
    assert p.b.leases.held_until("10.9.0.10") == until
    x, = macs_of(SECONDARY, 1, split=0)
    assert dora(p.b, x) is None, "a held address went to a new client after the restart"
    p.clock.advance(301)
    p.b.leases.release_held()
    assert dora(p.b, x) is not None
    p.b.crash()
    p.b.start()
    assert p.b.leases.held_until("10.9.0.10") is None
