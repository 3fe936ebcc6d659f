"""The operator's maintenance survives a restart of the node (state_dir/cluster.maintenance)."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from appliance.cluster import partner as P
from tests.unit.test_cluster_manager import NodeReactor, make_pair, make_node, owners, run, start


@pytest.fixture(autouse=True)
def incarnations(monkeypatch):
    monkeypatch.setattr("appliance.cluster.manager.next_incarnation",
                        lambda d, c=iter(range(1, 10**6)): next(c))


def _with_state(m, tmp_path):
    from appliance.cluster.transport import MaintenanceMark
    m.state_dir = tmp_path / m.node_id
    m.maintenance_mark = MaintenanceMark(m.state_dir)
    return m


def _restart(clock, net, nodes, me, tmp_path):
    """kill -9 and start again with the same state dir."""
    old = nodes[me]
    old.port = None                      # nothing more leaves (no orderly shutdown beat)
    old.stopService()
    net.ports.pop({"a": "10.0.0.1", "b": "10.0.0.2"}[me], None)
    m = _with_state(make_node(clock, net, me, store=old.store), tmp_path)
    nodes[me] = m
    return m


def test_maintenance_survives_a_restart_until_turned_off(tmp_path):
    """maintenance on, then a restart of the node: it claims nothing (its peer keeps
    the VIP), logs why at start, and only maintenance off ends it."""
    clock, net, nodes = make_pair()
    for m in nodes.values():
        _with_state(m, tmp_path)
        m.register_partner("b" if m.node_id == "a" else "a", primary=m.node_id == "a")
    start(clock, nodes)
    run(clock, 1.0)
    assert owners(nodes) == ["a"]
    answer = nodes["a"].set_maintenance(True)
    assert answer == {"maintenance": True, "persisted": True}
    assert (tmp_path / "a" / "cluster.maintenance").exists()
    run(clock, 0.5)
    assert owners(nodes) == ["b"]

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        a = _restart(clock, net, nodes, "a", tmp_path)
        a.register_partner("b", primary=True)
        a.startService()
        run(clock, 3.0)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert a.maintenance is True
    assert a.status()["maintenance"] is True
    assert owners(nodes) == ["b"], "a restarted in maintenance must not claim"
    assert a.roles == []
    assert nodes["b"].partners["a"].fsm.state == P.PARTNER_DOWN
    started = [e for e in events if "starts in MAINTENANCE" in e.get("log_format", "")]
    assert started and started[0]["node"] == "a"

    assert a.set_maintenance(False) == {"maintenance": False, "persisted": True}
    assert not (tmp_path / "a" / "cluster.maintenance").exists()
    run(clock, 1.0)
    assert owners(nodes) == ["a"]             # preempt: back to the priority-200 node
    assert a.partners["b"].fsm.state == P.NORMAL
    assert nodes["b"].partners["a"].fsm.state == P.NORMAL

    # ... and the next restart is an ordinary one
    a = _restart(clock, net, nodes, "a", tmp_path)
    a.startService()
    run(clock, 2.0)
    assert a.maintenance is False
    assert owners(nodes) == ["a"]


def test_orderly_shutdown_beat_is_not_kept(tmp_path):
    """The shutdown's own maintenance beat (peers take over at once) is no
    operator maintenance: the node claims again after the restart."""
    clock, net, nodes = make_pair()
    for m in nodes.values():
        _with_state(m, tmp_path)
    start(clock, nodes)
    run(clock, 1.0)
    nodes["a"].stopService()
    run(clock, 0.5)
    assert owners(nodes) == ["b"]
    assert not (tmp_path / "a" / "cluster.maintenance").exists()
    net.ports.pop("10.0.0.1", None)
    a = nodes["a"] = _with_state(make_node(clock, net, "a", store=nodes["a"].store), tmp_path)
    a.startService()
    run(clock, 2.0)
    assert a.maintenance is False
    assert owners(nodes) == ["a"]


class _Pool:
    """Runs the 'thread' work when told to, as a thread pool would later."""

    def __init__(self):
        self.queued = []

    def callInThreadWithCallback(self, on_result, f, *args, **kw):
        self.queued.append((on_result, f, args, kw))

    def run_all(self):
        while self.queued:
            on_result, f, args, kw = self.queued.pop(0)
            try:
                on_result(True, f(*args, **kw))
            except Exception as e:          # pragma: no cover
                on_result(False, e)


@implementer(IReactorThreads)
class ThreadedReactor(NodeReactor):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.pool = _Pool()

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


def test_mark_written_off_the_reactor_in_order(tmp_path):
    """With a real reactor the mark is written in a thread (fsync); the answer
    comes once it is on disk, and quick on/off/on saves land in that order."""
    clock, net, nodes = make_pair()
    a = nodes["a"]
    a.reactor = ThreadedReactor(clock, net, "10.0.0.1")
    _with_state(a, tmp_path)
    start(clock, nodes)
    run(clock, 1.0)
    answers = []
    for on in (True, False, True):
        d = a.set_maintenance(on)
        assert isinstance(d, defer.Deferred)
        d.addCallback(answers.append)
    assert answers == [] and a.maintenance is True     # in force at once, saved later
    assert not (tmp_path / "a" / "cluster.maintenance").exists()
    a.reactor.pool.run_all()
    assert answers == [{"maintenance": True, "persisted": True},
                       {"maintenance": False, "persisted": True},
                       {"maintenance": True, "persisted": True}]
    assert (tmp_path / "a" / "cluster.maintenance").exists()


def test_unwritable_state_dir_still_maintenance_but_not_persisted(tmp_path):
    (tmp_path / "file").write_text("")
    clock, net, nodes = make_pair()
    a = nodes["a"]
    _with_state(a, tmp_path / "file")          # a state dir below a file: cannot be created
    start(clock, nodes)
    run(clock, 1.0)
    assert a.set_maintenance(True) == {"maintenance": True, "persisted": False}
    run(clock, 0.5)
    assert owners(nodes) == ["b"]
