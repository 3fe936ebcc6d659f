"""The EN's failure detection while data flows (issue 15: LAN outage p50 < 50 ms at 100
packets/s without soft handoff): the probe burst starts on the data itself and its
probes overlap, with the loss tolerance of ``dead_after`` unanswered probes kept."""

from services.encap import en as E
from services.encap import wire as W

from tests.unit.test_encap_dn_en import Net, ip_packet, started

SERVER = "10.210.0.10"


def echo_stream(net, ms, cut_at=None, every=0.01, step=0.0005):
    """An echo stream EN -> server at a fixed interval: every packet a DN decapsulates
    is answered at once through that DN (the server's reply).  ``cut_at``: seconds into
    the stream when dn1 is cut.  Returns (seconds from the cut to the EN's switch or
    None, packets sent)."""
    a = net.en.address
    t0 = net.clock.seconds()
    next_send, cut, switched, sent = t0, None, None, 0
    seen = {d: len(net.tun[d]) for d in ("dn1", "dn2")}
    while net.clock.seconds() - t0 < ms / 1000.0:
        now = net.clock.seconds()
        if cut_at is not None and cut is None and now - t0 >= cut_at - 1e-9:
            net.cut.add("dn1")
            cut = now
        if now >= next_send - 1e-9:
            net.en.tun_packets([ip_packet(a, SERVER)])
            sent += 1
            next_send += every
        net.clock.advance(step)
        net.pump()
        for d in ("dn1", "dn2"):
            new = net.tun[d][seen[d]:]
            seen[d] = len(net.tun[d])
            if new and d not in net.cut:
                net.dns[d].tun_packets([ip_packet(SERVER, a) for _ in new])
                net.pump()
        if cut is not None and switched is None and net.en.primary != "dn1":
            switched = net.clock.seconds() - cut
    return switched, sent


def test_a_dead_primary_is_noticed_from_the_data_within_40_ms_at_any_phase():
    """100 packets/s echoes, dn1 cut at 20 phases across the 20 ms probe tick: the
    data watch starts the burst a few ms after the first echo that goes unanswered and
    the burst's probes overlap (each still awaited its full 10 ms), so the switch comes
    25-37 ms after the cut.  The old burst waited for the next active tick (up to 20
    ms) and then awaited its 4 probes one after the other: 40-60 ms."""
    times = []
    for phase in range(20):
        net = started()
        echo_stream(net, 300)                        # active, RTT samples
        switched, _ = echo_stream(net, 200, cut_at=0.005 + phase * 0.001)
        assert switched is not None and net.en.primary == "dn2"
        assert net.en.stats["probe_failures"] == 1
        assert [e for e in net.en.events if e["what"] == "dn_down"][-1]["reason"] == \
            "probe_timeout"
        times.append(switched)
    times.sort()
    assert times[-1] <= 0.040, times
    assert times[len(times) // 2] <= 0.035, times


def test_three_lost_probe_answers_in_a_row_are_no_failure():
    """The evidence is kept: dead_after (4) probes, each awaited a full timeout, without
    any record back.  Everything dn1 sends is lost until the answer to the burst's third
    probe (the echo replies too); the fourth probe's answer comes: no switch."""
    net = started()
    echo_stream(net, 300)
    real = net.en.datagram
    lost = []

    def lossy(dn, data):
        if dn == "dn1" and len([n for n in lost if n < 60]) < 3:
            lost.append(len(data))                   # keepalive answers are < 60 bytes
            return
        real(dn, data)
    net.en.datagram = lossy
    echo_stream(net, 400)
    assert len([n for n in lost if n < 60]) == 3 and max(lost) > 60, lost
    assert net.en.primary == "dn1" and net.en.stats["failovers"] == 0, net.en.events
    assert net.en.stats["suspect_probes"] >= 1


def test_one_way_data_does_not_probe_at_the_data_rate():
    """Data to the primary with nothing coming back (an upload): the data watch starts
    at most one burst per probe timeout, so 1,000 packets/s for one second cost at most
    ~100 watch probes plus the active tick's 50, and never a switch."""
    net = started()
    a = net.en.address
    kas = []
    real = net.dns["dn1"]._inner

    def count(s, addr, kind, value):
        if kind == W.K_KEEPALIVE:
            kas.append(net.clock.seconds())
        real(s, addr, kind, value)
    net.dns["dn1"]._inner = count
    for _ in range(1000):
        net.en.tun_packets([ip_packet(a, SERVER)])
        net.clock.advance(0.001)
        net.pump()
    assert net.en.primary == "dn1" and net.en.stats["failovers"] == 0
    assert len(kas) <= 170, len(kas)
    assert net.en.stats["suspect_probes"] >= 20     # the watch did run


def test_the_watch_does_nothing_while_answers_come_back():
    """Echoes answered at once: no data-watch probe at all (the replies are the
    evidence of life); only the active tick probes."""
    net = started()
    echo_stream(net, 1000)
    assert net.en.stats["suspect_probes"] == 0
    assert net.en.primary == "dn1" and net.en.stats["failovers"] == 0


def test_a_revived_dn_is_not_judged_by_the_fast_rules_before_it_answered_a_probe():
    """dn1 comes back (a new session: its process restarted) and the EN moves home to
    it; while data flows, the revived DN stalls 60 ms before answering any probe of the
    new session (its twistd still starting).  The round trip measured with its previous
    incarnation does not judge it: the EN waits for an answer of the new session (the
    probe timeout is the idle dead time until then) -- no switch away.  (It was declared
    dead 25 ms into the stall and the EN went back to dn2: a false switch.)"""
    net = started()
    a = net.en.address
    echo_stream(net, 300)                               # srtt from dn1's first life
    assert net.en.links["dn1"].srtt is not None
    net.cut.add("dn1")
    echo_stream(net, 300)
    assert net.en.primary == "dn2"
    net.cut.discard("dn1")
    t0 = net.clock.seconds()
    while net.en.primary != "dn1" and net.clock.seconds() - t0 < 2:
        net.en.tun_packets([ip_packet(a, SERVER)])
        net.run(0.001, step=0.001)
    assert net.en.primary == "dn1"
    assert net.en.links["dn1"].srtt is None             # no answer of the new session yet
    net.cut.add("dn1")                                  # the stall, data flowing
    echo_stream(net, 60)
    net.cut.discard("dn1")
    echo_stream(net, 300)
    downs = [e for e in net.en.events if e["what"] == "dn_down"]
    assert len(downs) == 1, downs                       # the cut of dn1's first life only
    assert net.en.primary == "dn1", net.en.events[-6:]
    assert net.en.links["dn1"].srtt is not None         # measured again, from the new life
