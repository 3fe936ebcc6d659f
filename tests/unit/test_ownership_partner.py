"""Election with priorities, preempt and epochs; the partner state machine."""

from __future__ import annotations

from appliance.cluster import partner as P
from appliance.cluster.ownership import Claim, ResourceSpec, View, decide, elect

SPEC = ResourceSpec("vip", {"a": 200, "b": 100}, preempt=True)
STICKY = ResourceSpec("vip", {"a": 200, "b": 100}, preempt=False)


def test_highest_priority_wins():
    """With everyone able, the highest priority owns it."""
    assert elect(SPEC, View({"a", "b"})) == "a"
    assert elect(SPEC, View({"b"})) == "b"
    assert elect(SPEC, View(set())) is None


def test_zero_priority_never_owns():
    """A node without a priority is never a candidate."""
    spec = ResourceSpec("r", {"a": 0, "b": 10})
    assert elect(spec, View({"a"})) is None


def test_preempt_takes_back_non_preempt_keeps():
    """A returning higher-priority node preempts only when preempt is set."""
    view = View({"a", "b"}, {"b": Claim("b", 2)}, max_epoch=2)
    assert elect(SPEC, view) == "a"
    assert elect(STICKY, view) == "b"
    assert decide(SPEC, view, "a", None).action == "claim"
    assert decide(SPEC, view, "a", None).epoch == 3
    assert decide(STICKY, view, "a", None).action == "keep"


def test_partition_heal_lower_epoch_steps_down():
    """Both claimed during a partition: after heal the higher epoch keeps it (no preempt)."""
    a_mine = Claim("a", 3)
    view_a = View({"a", "b"}, {"b": Claim("b", 4)}, max_epoch=4)
    assert decide(STICKY, view_a, "a", a_mine).action == "release"
    view_b = View({"a", "b"}, {"a": a_mine}, max_epoch=4)
    assert decide(STICKY, view_b, "b", Claim("b", 4)).action == "keep"


def test_ties_broken_by_node_id():
    """Equal priorities: every node computes the same winner."""
    spec = ResourceSpec("r", {"a": 5, "b": 5})
    assert elect(spec, View({"a", "b"})) == "b"


def test_manual_claim_wins_and_demote_excludes():
    """An operator promote beats priority; a demoted node is not a candidate."""
    view = View({"a", "b"}, {"b": Claim("b", 7, manual=True)}, 7)
    assert elect(SPEC, view) == "b"
    assert decide(SPEC, View({"a", "b"}, {}, 1, excluded={"a"}), "a", Claim("a", 1)).action == "release"


def test_dead_claimant_is_ignored():
    """Claims by nodes that are not able do not count."""
    view = View({"b"}, {"a": Claim("a", 9)}, 9)
    d = decide(STICKY, view, "b", None)
    assert d.action == "claim" and d.epoch == 10


def fsm(**kw):
    args = dict(primary=True, auto_partner_down_s=10, startup_wait_s=1, now=0.0)
    args.update(kw)
    return P.PartnerFSM("b", **args)


def test_startup_to_normal_and_comm_interrupted():
    """Hearing the peer -> NORMAL; losing it -> COMMUNICATIONS-INTERRUPTED, not PARTNER-DOWN."""
    f = fsm()
    assert f.heard(P.STARTUP, 0.1).new == P.NORMAL
    t = f.lost(1.0)
    assert t.new == P.COMM_INTERRUPTED
    assert f.serves_own_share and not f.serves_everything
    assert f.tick(5.0) is None
    assert f.heard(P.COMM_INTERRUPTED, 6.0).new == P.NORMAL


def test_auto_partner_down_after_timeout():
    """auto_partner_down_s of silence moves to PARTNER-DOWN; 0 means never."""
    f = fsm()
    f.heard(P.STARTUP, 0.0)
    f.lost(1.0)
    assert f.tick(10.9) is None
    assert f.tick(11.0).new == P.PARTNER_DOWN
    g = fsm(auto_partner_down_s=0)
    g.heard(P.STARTUP, 0.0)
    g.lost(1.0)
    assert g.tick(10_000) is None
    assert g.partner_down(10_001).new == P.PARTNER_DOWN


def test_recovery_cycle():
    """The node that was down recovers, syncs, and both return to NORMAL."""
    survivor, back = fsm(), fsm(primary=False)
    survivor.heard(P.STARTUP, 0)
    survivor.lost(1)
    survivor.partner_down(2)
    assert back.heard(survivor.state, 3).new == P.RECOVER
    assert not back.serves_own_share
    assert survivor.heard(back.state, 3.1) is None        # stays PARTNER-DOWN
    assert back.sync_done(4).new == P.RECOVER_DONE
    assert survivor.heard(back.state, 4.1).new == P.NORMAL
    assert back.heard(survivor.state, 4.2).new == P.NORMAL


def test_startup_silence_and_persisted_partner_down():
    """A silent peer after start gives COMM-INTERRUPTED, or PARTNER-DOWN if that was the state."""
    assert fsm().tick(1.0).new == P.COMM_INTERRUPTED
    assert fsm(persisted=P.PARTNER_DOWN).tick(1.0).new == P.PARTNER_DOWN


def test_both_partner_down_potential_conflict_resolved_primary_first():
    """Both sides ran PARTNER-DOWN: both go POTENTIAL-CONFLICT (no new allocations); the
    primary pulls first (CONFLICT-DONE), then the secondary pulls and goes NORMAL, and
    the primary follows."""
    prim, sec = fsm(), fsm(primary=False)
    for f in (prim, sec):
        f.heard(P.STARTUP, 0)
        f.partner_down(1)
    assert prim.heard(P.PARTNER_DOWN, 2).new == P.POTENTIAL_CONFLICT
    assert sec.heard(P.PARTNER_DOWN, 2).new == P.POTENTIAL_CONFLICT
    assert not prim.serves_own_share and not sec.serves_own_share
    assert prim.wants_sync and not sec.wants_sync
    assert prim.sync_done(3).new == P.CONFLICT_DONE
    assert sec.heard(prim.state, 3.1) is None and sec.wants_sync
    assert sec.sync_done(4).new == P.NORMAL
    assert prim.heard(sec.state, 4.1).new == P.NORMAL


def test_recover_wait_after_an_incomplete_recovery():
    """A node without stable storage syncs, then waits recover_wait_s (MCLT) in
    RECOVER-WAIT before RECOVER-DONE; with complete knowledge no wait."""
    f = fsm(data_lost=True, recover_wait_s=30)
    assert f.heard(P.NORMAL, 0).new == P.RECOVER
    assert f.sync_done(1).new == P.RECOVER_WAIT
    assert not f.serves_own_share
    assert f.tick(30.9) is None
    assert f.tick(31.0).new == P.RECOVER_DONE
    g = fsm(recover_wait_s=30)
    g.heard(P.PARTNER_DOWN, 0)
    assert g.sync_done(1).new == P.RECOVER_DONE


def test_peer_maintenance_means_partner_down_and_recover_never_times_out():
    """A peer in maintenance is taken over at once; RECOVER with a dead peer never
    turns into PARTNER-DOWN by itself (H4: it never finished its sync); the
    operator's partner-down is its way out."""
    f = fsm()
    f.heard(P.NORMAL, 0)
    assert f.heard(P.NORMAL, 1, maintenance=True).new == P.PARTNER_DOWN
    g = fsm()
    g.heard(P.PARTNER_DOWN, 0)
    assert g.state == P.RECOVER
    g.lost(1)
    assert g.tick(11) is None and g.tick(10_000) is None
    assert g.state == P.RECOVER
    assert g.partner_down(10_001).new == P.PARTNER_DOWN


def test_peer_alive_without_relationship_is_not_normal():
    """H4: a peer whose service does not report us is COMMUNICATIONS-INTERRUPTED."""
    f = fsm()
    assert f.heard(None, 0).new == P.COMM_INTERRUPTED
    assert f.heard(P.STARTUP, 0.1).new == P.NORMAL
    assert f.heard(None, 0.2).new == P.COMM_INTERRUPTED


def test_data_lost_starts_in_recover_and_partner_serves_its_clients():
    """A node without valid stable storage starts in RECOVER (peer heard or silent);
    its NORMAL partner goes PARTNER-DOWN while it recovers."""
    lost, peer = fsm(data_lost=True), fsm(primary=False)
    peer.heard(P.NORMAL, 0)
    assert lost.heard(P.NORMAL, 0.1).new == P.RECOVER
    assert peer.heard(lost.state, 0.2).new == P.PARTNER_DOWN
    assert lost.sync_done(1).new == P.RECOVER_DONE
    assert peer.heard(lost.state, 1.1).new == P.NORMAL
    silent = fsm(data_lost=True)
    assert silent.tick(1.0).new == P.RECOVER
    assert fsm(persisted=P.RECOVER).tick(1.0).new == P.RECOVER


def test_winner_with_stale_epoch_reasserts_above_max():
    """H1: the preempting winner holding a lower epoch than seen re-claims above it."""
    view = View({"a", "b"}, {"b": Claim("b", 2)}, max_epoch=2)
    d = decide(SPEC, view, "a", Claim("a", 1))
    assert (d.action, d.epoch) == ("reassert", 3)
    assert decide(SPEC, View({"a", "b"}, {}, max_epoch=3), "a", Claim("a", 3)).action == "keep"


def test_secondary_partner_down_follows_a_primary_in_conflict_done():
    """Found by the simulator: a secondary in PARTNER-DOWN hearing the primary's
    CONFLICT-DONE joins the resolution (pulls, then NORMAL) instead of waiting forever."""
    sec = fsm(primary=False)
    sec.heard(P.NORMAL, 0)
    sec.partner_down(1)
    assert sec.heard(P.CONFLICT_DONE, 2).new == P.POTENTIAL_CONFLICT
    assert sec.wants_sync
    assert sec.sync_done(3).new == P.NORMAL
