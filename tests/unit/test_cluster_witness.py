"""Witness and quorum on the simulator's network (real managers, Clock):
a partition with a witness never has two owners; without one it does (as before)."""

from __future__ import annotations

from tests.sim.world import World


def _settle(w, seconds, step=0.01):
    """The owners at every ``step`` for ``seconds``."""
    samples = []
    for _ in range(round(seconds / step)):
        w.clock.advance(step)
        samples.append(tuple(w.owners()))
    return samples


def _world(witness):
    w = World(seed=1, n_nodes=2, preempt=True, witness=witness)
    for nid in w.ids:
        w.start(nid)
    assert _settle(w, 1.5)[-1] == ("a",)
    return w


def _partition(w, x, y):
    w.net.links[(x, y)].cut = w.net.links[(y, x)].cut = True


def test_partition_with_witness_keeps_exactly_one_owner():
    """a|b cut, both still hear the witness: the witness backs one side only, so
    exactly one owner at every 10 ms sample, before, during and after."""
    w = _world(witness=True)
    _partition(w, "a", "b")
    during = _settle(w, 5.0)
    assert all(len(s) <= 1 for s in during), [s for s in during if len(s) > 1][:3]
    assert during[-1] in (("a",), ("b",))
    w.net.heal()
    after = _settle(w, 2.0)
    assert all(len(s) <= 1 for s in after)
    assert after[-1] == ("a",)


def test_partition_without_witness_has_two_owners_as_before():
    """Two nodes, no witness: each side of a partition owns (one owner again after heal)."""
    w = _world(witness=False)
    _partition(w, "a", "b")
    assert _settle(w, 2.0)[-1] == ("a", "b")
    w.net.heal()
    assert _settle(w, 0.5)[-1] == ("a",)


def test_isolated_owner_gives_up_before_the_other_takes_over():
    """The owner a loses both links: it releases (no quorum) before b, backed by the
    witness, claims; b then owns; never both."""
    w = _world(witness=True)
    for other in ("b", "w"):
        _partition(w, "a", other)
    samples = _settle(w, 3.0)
    assert all(len(s) <= 1 for s in samples)
    assert samples[-1] == ("b",)
    assert w.nodes["a"].manager.status()["quorum"]["has"] is False


def test_one_way_link_counts_no_vote():
    """a hears b but b does not hear a (and a is cut from the witness): a has no quorum."""
    w = _world(witness=True)
    w.net.links[("a", "b")].cut = True
    _partition(w, "a", "w")
    samples = _settle(w, 3.0)
    assert all(len(s) <= 1 for s in samples)
    assert not w.nodes["a"].manager.has_quorum()
    assert samples[-1] == ("b",)


def test_both_leave_maintenance_at_a_heal_one_owner_at_every_instant():
    """Simulator seed 10617 (--witness): both nodes in maintenance, b->a cut and a
    cut from the witness; at the heal both leave maintenance at the same instant.
    Each saw the other's last beat without a claim (b: a still in maintenance;
    a: b's beat sent before b claimed) and both claimed for a beat.  A claim
    now waits until the connected peer echoed our claiming:<resource> beat."""
    w = World(seed=1, n_nodes=2, preempt=False, witness=True)
    for nid in w.ids:
        w.start(nid)
    _settle(w, 1.5)
    a, b = w.nodes["a"].manager, w.nodes["b"].manager
    a.set_maintenance(True)
    _settle(w, 1.0)
    b.set_maintenance(True)
    w.net.links[("b", "a")].cut = True
    _partition(w, "a", "w")
    _settle(w, 2.0)
    w.net.heal()
    a.set_maintenance(False)
    b.set_maintenance(False)
    samples = _settle(w, 1.0, step=0.001)
    assert all(len(s) <= 1 for s in samples), [s for s in samples if len(s) > 1][:3]
    assert len(samples[-1]) == 1


def _result(d):
    out = []
    d.addBoth(out.append)
    return out


def test_promote_is_break_before_make():
    """b promotes: a lets go first, then b claims (manual); one owner at every ms."""
    w = _world(witness=True)
    res = _result(w.nodes["b"].manager.promote("vip1"))
    samples = _settle(w, 1.0, step=0.001)
    assert all(len(s) <= 1 for s in samples), [s for s in samples if len(s) > 1][:3]
    assert samples[-1] == ("b",)
    assert res and res[0]["owner"] == "b"
    assert w.nodes["b"].manager.resources["vip1"].mine.manual
    assert not any(f.startswith("want:") for f in w.nodes["b"].manager.health_flags())


def test_promote_the_owner_cannot_hear_changes_nothing():
    """b promotes but a does not hear b (b->a cut): the old promote claimed at once
    (two owners until a heard it); now b waits for a to let go, gives up, and a
    keeps the resource all along."""
    w = _world(witness=False)
    w.net.links[("b", "a")].cut = True
    res = _result(w.nodes["b"].manager.promote("vip1"))
    samples = _settle(w, 3.0)
    assert all(s == ("a",) for s in samples), [s for s in samples if s != ("a",)][:3]
    assert res and "still owns it" in res[0].getErrorMessage()
    assert not any(f.startswith("want:") for f in w.nodes["b"].manager.health_flags())


def test_promote_waits_for_an_intent_of_a_peer_not_connected():
    """Seed 21924 --witness: a's beats reach b late and lossy, so b holds a for
    alive but not connected (a's echo of b is stale), while a hears b's fresh
    echoes.  a advertised claiming:vip1, b echoed it, a claimed; its claim was
    still on the way when b's promote ran.  The old intent check asked only
    connected peers, found none and b claimed at once: two owners.  Any live
    peer's intent now makes the promote wait (a sees want: and lets go)."""
    from dataclasses import replace
    w = _world(witness=True)
    b = w.nodes["b"].manager
    w.net.links[("a", "b")].cut = True          # nothing newer from a reaches b
    hb = b.peers["a"].heartbeat
    # b's latest beat of a: no claim yet, an intent (its claim is on the way)
    b.peers["a"].heartbeat = replace(hb, resources={}, health=("claiming:vip1",))
    connected = b.quorum.connected
    b.quorum.connected = lambda p: False if p.id == "a" else connected(p)
    b.quorum.has_quorum = lambda: True          # b holds the witness's vote, as in the seed
    res = _result(b.promote("vip1"))
    samples = []
    for _ in range(200):                        # a stays alive for b ~316 ms
        w.clock.advance(0.001)
        samples.append(tuple(w.owners()))
    assert all(len(s) <= 1 for s in samples), [s for s in samples if len(s) > 1][:3]
    assert b.role("vip1") == "standby" and not res


def _world3(seed=1):
    w = World(seed=seed, n_nodes=3, preempt=True, witness=True)
    for nid in w.ids:
        w.start(nid)
    assert _settle(w, 1.5)[-1] == ("a",)
    return w


def test_demote_during_a_partition_of_the_other_two_gives_one_owner():
    """Simulator seeds 30534, 30571, 30793 ... (3 nodes + witness): b|c cut, a
    connected to both.  The owner a is demoted: b and c each see the other
    dead, each is the top candidate in its own view, each advertises an intent
    and each got a's echo, so both claimed (two owners for good).  a now backs
    one intent (backs:vip1=b, its own election's choice) and an echo that backs
    another node acknowledges nothing: exactly one of them owns, at every ms."""
    w = _world3()
    _partition(w, "b", "c")
    _settle(w, 1.0)
    assert w.owners() == ["a"]
    w.nodes["a"].manager.demote("vip1")
    samples = _settle(w, 3.0, step=0.001)
    assert all(len(s) <= 1 for s in samples), [s for s in samples if len(s) > 1][:3]
    assert samples[-1] == ("b",)
    a = w.nodes["a"].manager
    assert w.nodes["c"].manager.role("vip1") == "standby"
    w.net.heal()
    after = _settle(w, 2.0)
    assert all(len(s) <= 1 for s in after)
    assert after[-1] == ("b",)
    assert not any(f.startswith("backs:") for f in a.health_flags())   # no intent left


def test_maintenance_of_the_owner_during_a_partition_of_the_other_two_gives_one_owner():
    """The same hand-over by maintenance on a (the other schedule of those seeds)."""
    w = _world3()
    _partition(w, "b", "c")
    _settle(w, 1.0)
    w.nodes["a"].manager.set_maintenance(True)
    samples = _settle(w, 3.0)
    assert all(len(s) <= 1 for s in samples), [s for s in samples if len(s) > 1][:3]
    assert samples[-1] == ("b",)
