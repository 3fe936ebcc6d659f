"""A PARTNER-DOWN records whether it is *confirmed* (the operator's command, or an
automatic one backed by the witness's quorum or client evidence) and the façade
answers ``partner_confirmed(peer)``; the listener signature stays (peer, state, reason)."""

from __future__ import annotations

from appliance.cluster import partner as P
from tests.sim.world import World
from tests.unit.test_cluster_manager import ADDR, make_pair, run, start, tmp_state  # noqa: F401


def fsm(**kw):
    args = dict(primary=True, auto_partner_down_s=10, startup_wait_s=1, now=0.0)
    args.update(kw)
    return P.PartnerFSM("b", **args)


def test_fsm_records_which_partner_down_is_confirmed():
    """Operator: confirmed.  Silence alone, a peer in maintenance, a recovering peer:
    not.  Leaving PARTNER-DOWN clears it; the operator confirms an unconfirmed one."""
    f = fsm()
    f.heard(P.NORMAL, 0)
    f.lost(1)
    t = f.tick(11)
    assert t.new == P.PARTNER_DOWN and not t.confirmed and not f.confirmed
    assert "auto_partner_down_s" in t.reason
    t = f.partner_down(12)
    assert t is not None and (t.old, t.new, t.confirmed) == (P.PARTNER_DOWN, P.PARTNER_DOWN, True)
    assert "operator" in t.reason and f.confirmed
    assert f.partner_down(13) is None, "told once"
    assert f.heard(P.RECOVER_DONE, 14).new == P.NORMAL and not f.confirmed

    m = fsm()
    m.heard(P.NORMAL, 0)
    t = m.heard(P.NORMAL, 1, maintenance=True)
    assert t.new == P.PARTNER_DOWN and not t.confirmed and not m.confirmed

    r = fsm()
    r.heard(P.NORMAL, 0)
    t = r.heard(P.RECOVER, 1)
    assert t.new == P.PARTNER_DOWN and not t.confirmed

    o = fsm()
    o.heard(P.NORMAL, 0)
    o.lost(1)
    t = o.partner_down(2)
    assert t.confirmed and o.confirmed


def test_fsm_automatic_partner_down_with_a_confirmation_is_confirmed():
    f = fsm()
    f.heard(P.NORMAL, 0)
    f.lost(1)
    assert f.tick(10.9, confirm="witness w quorum") is None
    t = f.tick(11, confirm="witness w quorum")
    assert t.new == P.PARTNER_DOWN and t.confirmed and f.confirmed
    assert "auto_partner_down_s" in t.reason and "witness w quorum" in t.reason


def test_fsm_restart_keeps_the_confirmation_of_the_previous_run():
    for was in (True, False):
        f = fsm(persisted=P.PARTNER_DOWN)
        f.persisted_confirmed = was
        t = f.tick(1.0)
        assert t.new == P.PARTNER_DOWN and t.confirmed is was and f.confirmed is was


def _pair_with_partners(**kw):
    clock, net, nodes = make_pair(**kw)
    heard = {n: [] for n in nodes}
    for n, m in nodes.items():
        other = "b" if n == "a" else "a"

        def listener(peer, state, reason, m=m, n=n):
            heard[n].append((state, reason, m.partner_confirmed(peer)))
        m.register_partner(other, listener, primary=(n == "a"))
    return clock, net, nodes, heard


def test_operator_partner_down_is_confirmed_on_the_facade_and_persisted():
    """The façade answers partner_confirmed; the listener already sees it; a restart
    that comes back PARTNER-DOWN (peer still silent) keeps the confirmation."""
    clock, net, nodes, heard = _pair_with_partners()
    start(clock, nodes)
    run(clock, 1.0)
    b = nodes["b"]
    assert b.partners["a"].fsm.state == P.NORMAL and not b.partner_confirmed("a")
    net.cut.add(ADDR["a"])
    run(clock, 1.0)
    assert b.partners["a"].fsm.state == P.COMM_INTERRUPTED and not b.partner_confirmed("a")
    b.partner_down("a")
    assert b.partner_confirmed("a")
    assert heard["b"][-1][0] == P.PARTNER_DOWN and heard["b"][-1][2] is True
    assert "operator" in heard["b"][-1][1]
    assert not b.partner_confirmed("nobody")
    st = b.status()
    assert st["peers"]["a"]["partner_confirmed"] is True

    # restart b with its store: PARTNER-DOWN again, still confirmed
    store = b.store
    b.stopService()
    from tests.unit.test_cluster_manager import make_node
    b2 = make_node(clock, net, "b", store=store)
    b2.startService()
    run(clock, 0.05)
    b2.register_partner("a", primary=False)
    run(clock, 2.0)
    assert b2.partners["a"].fsm.state == P.PARTNER_DOWN
    assert b2.partner_confirmed("a")


def test_silence_only_partner_down_is_not_confirmed():
    """auto_partner_down_s without a witness (and no client evidence): PARTNER-DOWN
    may come by silence, never confirmed."""
    clock, net, nodes, heard = _pair_with_partners(auto_pd=0.5)
    start(clock, nodes)
    run(clock, 1.0)
    net.cut.add(ADDR["a"])
    run(clock, 3.0)
    b = nodes["b"]
    assert not b.partner_confirmed("a")
    assert all(not confirmed for _, _, confirmed in heard["b"])


def test_automatic_partner_down_with_witness_quorum_is_confirmed():
    """With a witness: a's side goes away, b keeps the witness's vote (quorum) and its
    automatic PARTNER-DOWN is confirmed."""
    w = World(seed=1, n_nodes=2, preempt=True, witness=True)
    for nid in w.ids:
        w.start(nid)
    for _ in range(150):
        w.clock.advance(0.01)
    b = w.nodes["b"].manager
    b.partners["a"].fsm.auto_partner_down_s = 1.0
    seen = []
    b.partners["a"].listeners.append(
        lambda peer, state, reason: seen.append((state, b.partner_confirmed(peer))))
    assert b.partners["a"].fsm.state == P.NORMAL
    for other in ("b", "w"):
        w.net.links[("a", other)].cut = w.net.links[(other, "a")].cut = True
    for _ in range(300):
        w.clock.advance(0.01)
    assert b.has_quorum()
    assert b.partners["a"].fsm.state == P.PARTNER_DOWN, b.status()["partners"]
    assert b.partner_confirmed("a")
    assert seen[-1] == (P.PARTNER_DOWN, True)


def test_cluster_table_marks_a_confirmed_partner_down():
    from appliance.admin import ctl
    status = {"node": "b", "heartbeat_interval_ms": 100, "resources": {},
              "peers": {"a": {"alive": False, "state": "PARTNER-DOWN", "partner_confirmed": True,
                              "health": []}}}
    row = next(line for line in ctl.render_cluster(status).splitlines() if line.startswith("a "))
    assert "PARTNER-DOWN (confirmed)" in row
