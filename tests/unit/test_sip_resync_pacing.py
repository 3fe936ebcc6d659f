"""Full resync pacing on the live node (task.Clock, a fake peer link that acks pages after
a backup cost proportional to their size): no reactor turn spends more than the turn
budget building pages, and pages are sized so their round trip (the time a live sync
REGISTER may wait behind one at the backup) stays near ``page_s``; every AOR still goes
exactly once, then the end marker."""

from __future__ import annotations

import gc

import pytest

from twisted.internet import defer
from twisted.python.failure import Failure

from services.sip import replication
from services.sip.replication import Replicator
from tests.unit.test_sip_service import Peer, make, req, settle

USERS = 400
ENCODE_S = 0.0005            # fake cost of reading + encoding one AOR state (live node)
BACKUP_FIXED_S = 0.002       # fake cost of one page at the backup (commit, ack)
BACKUP_AOR_S = 0.0002        # ... and of each AOR in it


@pytest.fixture(autouse=True)
def _unfreeze():
    """A full resync freezes the heap (gc.freeze): give the next tests a normal one."""
    yield
    gc.unfreeze()


class PagedLink:
    """Records what is sent; acks a page after the backup's (fake) cost on the clock."""

    def __init__(self, clock):
        self.clock = clock
        self.sent = []           # (clock time, body)
        self.rtts = []           # (AORs in the page, clock seconds until its ack)

    def connected(self, peer):
        return True

    def send(self, peer, channel, body, *, limit=None):
        d = defer.Deferred()
        self.sent.append((self.clock.seconds(), body))
        states = body.get("states") if isinstance(body, dict) else None
        cost = BACKUP_FIXED_S + BACKUP_AOR_S * len(states) if states else 0.0
        if states:
            self.rtts.append((len(states), cost))
        self.clock.callLater(cost, d.callback, None)
        return d


def _primary(tmp_path):
    a, clock, thread, _store, _rpc = make(tmp_path)
    peer = Peer()
    for i in range(USERS):
        a.received(req("REGISTER", "sip:example.test", to=f"sip:u{i}@example.test",
                       branch=f"z9hG4bKu{i}", call_id=f"cu{i}",
                       contacts=[f"<sip:u{i}@10.0.{i // 250}.{i % 250 + 1}>"]), peer.src, False)
    settle(clock, thread)
    assert a.location.count == USERS
    return a, clock, thread


def test_full_resync_paces_the_live_node(tmp_path, monkeypatch):
    a, clock, thread = _primary(tmp_path)
    link = PagedLink(clock)
    r = Replicator(clock, link, ("b",), "sync", a.location, page=100, window=1, pause_s=0.0)
    # set as attributes (not constructor arguments) so the same test runs on older code
    fake_now = [0.0]
    r.timer = lambda: fake_now[0]
    r.turn_s = 0.002
    r.page_s = 0.012
    r.min_rate = 1000.0

    # which reactor turn runs now: every call the clock runs is one turn
    turn = {"id": 0, "work": {}}
    original = clock.callLater

    def call_later(delay, f, *args, **kw):
        def run(*a2, **kw2):
            turn["id"] += 1
            return f(*a2, **kw2)
        return original(delay, run, *args, **kw)
    monkeypatch.setattr(clock, "callLater", call_later)

    encode = replication.state_body

    def costly_state_body(*args, **kw):
        fake_now[0] += ENCODE_S
        work = turn["work"]
        work[turn["id"]] = work.get(turn["id"], 0) + 1
        return encode(*args, **kw)
    monkeypatch.setattr(replication, "state_body", costly_state_body)

    r.full_needed["b"] = True
    done = r.full_resync("b")
    for _ in range(20000):
        if done.called:
            break
        settle(clock, thread)
        clock.advance(0.0005)
    assert done.called, "the full resync did not finish"
    assert done.result is None

    # everything went exactly once, between the begin and end markers
    kinds = [next(iter(b)) if "states" not in b else "states" for _, b in link.sent]
    assert kinds[0] == "full_begin" and kinds[-1] == "full_end"
    aors = [st["aor"] for _, b in link.sent if "states" in b for st in b["states"]]
    assert len(aors) == len(set(aors)) == USERS

    # the live node: no turn builds more than the budget allows (one slice past it)
    per_turn = max(turn["work"].values())
    allowed = int(r.turn_s / ENCODE_S) + getattr(Replicator, "SLICE", 5)
    assert per_turn <= allowed, f"{per_turn} AOR states built in one reactor turn"
    # the backup: once sized, a page's round trip stays near page_s (a live sync
    # REGISTER waits behind at most one page)
    settled = link.rtts[3:]
    assert settled and max(rtt for _, rtt in settled) <= r.page_s * 1.25, link.rtts
    # ... without crawling: pages stay well above the minimum where the cost allows
    assert min(n for n, _ in settled[:-1]) >= 30, link.rtts


def test_aor_changed_while_its_page_is_built_goes_as_held_now(tmp_path, monkeypatch):
    """A page is built across several reactor turns now: an AOR changed (and replicated
    live) after it was read into the page must not leave in the page with its older state
    after its live state -- the backup, applying in order, must end with what the primary
    holds (also for AORs without a version, which the backup cannot order)."""
    from dataclasses import replace as dc_replace

    from appliance.store.interface import Op
    from services.sip.location import AOR_PREFIX, MTIME_PREFIX
    a, clock, thread = _primary(tmp_path)
    link = PagedLink(clock)
    r = Replicator(clock, link, ("b",), "sync", a.location, page=100, window=1, pause_s=0.0)
    fake_now = [0.0]
    r.timer = lambda: fake_now[0]
    r.turn_s = 0.002
    store = a.location.store
    first = "sip:u0@example.test"                     # the first AOR in key order
    store.commit_now([Op.delete(MTIME_PREFIX + first)])      # an unversioned AOR
    encode = replication.state_body
    changed = []

    def costly_state_body(aor, *args, **kw):
        fake_now[0] += ENCODE_S
        return encode(aor, *args, **kw)
    monkeypatch.setattr(replication, "state_body", costly_state_body)

    original = clock.callLater

    def call_later(delay, f, *args, **kw):
        def run(*a2, **kw2):
            encoded = any("full" in b for _, b in link.sent) or r.stats["full_sent"]
            if not changed and r._building.get("b") is not None and fake_now[0] > 0 \
                    and not encoded:
                # between two slices of the first page: the first AOR changes (a live
                # REGISTER: a new contact), is written, then replicated
                [old] = a.location._read_now(first)[0].values()
                new = dc_replace(old, uri="sip:u0@10.9.9.9", cseq=old.cseq + 1)
                store.commit_now([Op.hset(AOR_PREFIX + first, {new.uri: new.to_json()})])
                changed.append(new.uri)
                now_held = a.location._read_now(first)[0]
                r.replicate(first, now_held, [])
            return f(*a2, **kw2)
        return original(delay, run, *args, **kw)
    monkeypatch.setattr(clock, "callLater", call_later)

    r.full_needed["b"] = True
    done = r.full_resync("b")
    for _ in range(20000):
        if done.called:
            break
        settle(clock, thread)
        clock.advance(0.0005)
    assert done.called and done.result is None
    assert changed, "the change did not fall inside a page's building"
    # the states of the first AOR in the order the backup applies them: the last one wins
    last = None
    for _, body in link.sent:
        for st in body.get("states", ()) if isinstance(body, dict) else ():
            if st["aor"] == first:
                last = st
    assert last is not None and changed[0] in last["set"], last


def test_page_size_rules():
    """Sized to page_s from the last round trip, at most doubling, at least PAGE_MIN and
    at most ``page``; on a slow box (long cycles between two pages) at least what keeps
    min_rate AORs/s."""
    r = Replicator(None, PagedLink(None), ("b",), "sync", _NoLocation(), page=100,
                   page_s=0.008, min_rate=2500)
    assert r._next_page(50, 50, 0.004) == 100           # fast: doubles (capped at page)
    assert r._next_page(20, 20, 0.001) == 40            # at most doubling
    assert r._next_page(100, 100, 0.016) == 50          # slow: scaled to page_s
    assert r._next_page(100, 100, 0.100) == Replicator.PAGE_MIN
    # the cycle (send to send) is 30 ms: 2500/s needs 75 a page, more than page_s gives
    assert r._next_page(100, 100, 0.016, cycle=0.030) == 75
    assert r._next_page(100, 100, 0.016, cycle=0.200) == 100   # never beyond page


class _NoLocation:
    store = None


def fake_gc(monkeypatch):
    """Replace the replication module's gc with one that records collect/freeze calls."""
    calls = []

    class FakeGC:
        @staticmethod
        def collect(generation=2):
            calls.append(("collect", generation))

        @staticmethod
        def freeze():
            calls.append(("freeze",))
    monkeypatch.setattr(replication, "gc", FakeGC, raising=False)
    return calls


def test_backup_freezes_the_heap_during_a_full_resync(tmp_path, monkeypatch):
    """What a full resync stores stays out of the cyclic GC's full walks (gc.freeze every
    FREEZE_PAGES pages and at the end): those walks grew with the copied bindings and
    stalled the backup -- and every live sync REGISTER waiting for it -- 30-50 ms each."""
    calls = fake_gc(monkeypatch)
    b, clock, thread, _store, _rpc = make(tmp_path)
    r = Replicator(clock, PagedLink(clock), ("a",), "sync", b.location)
    done = []
    r.apply("a", {"full_begin": {"id": "t", "shards": None, "at": 0.0}}).addBoth(done.append)
    settle(clock, thread)
    pages = 40
    for p in range(pages):
        states = [{"aor": f"sip:p{p}x{i}@example.test", "mtime": 1.0, "replace": True,
                   "set": {f"sip:p{p}x{i}@10.0.0.1": '{"uri":"sip:p%dx%d@10.0.0.1","expires":'
                           '1700003600.0,"q":null,"call_id":"c","cseq":1,"path":[],'
                           '"received":"","params":""}' % (p, i)}, "del": []}
                  for i in range(5)]
        r.apply("a", {"states": states, "full": "t"}).addBoth(done.append)
        settle(clock, thread)
    r.apply("a", {"full_end": {"id": "t", "shards": None, "sent": pages * 5}}).addBoth(
        done.append)
    settle(clock, thread)
    assert len(done) == pages + 2 and not [x for x in done if isinstance(x, Failure)], done
    assert b.location.count == pages * 5
    freezes = calls.count(("freeze",))
    assert freezes >= pages // 16 + 1, calls


def test_live_node_starts_a_full_resync_without_a_gc_collection(tmp_path, monkeypatch):
    """The live node freezes its heap when a full resync starts, but runs no collection:
    gc.collect(1) walked the young generations for ~95 ms in one reactor turn at the start
    of a 100k resync on the live node (py-spy), its worst live REGISTER of the run."""
    a, clock, thread = _primary(tmp_path)
    calls = fake_gc(monkeypatch)
    link = PagedLink(clock)
    r = Replicator(clock, link, ("b",), "sync", a.location, page=100, window=1, pause_s=0.0)
    r.full_needed["b"] = True
    done = r.full_resync("b")
    for _ in range(2000):
        if done.called:
            break
        settle(clock, thread)
        clock.advance(0.001)
    assert done.called and done.result is None
    assert ("freeze",) in calls
    assert not [c for c in calls if c[0] == "collect"], calls
