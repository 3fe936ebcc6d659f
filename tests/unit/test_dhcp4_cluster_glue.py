"""dhcp4 and the cluster manager's partner API (issue 12): a PARTNER-DOWN is confirmed
by ``cluster.partner_confirmed(peer)`` when the cluster has it (the reason-string
guess only without it), and in COMMUNICATIONS-INTERRUPTED the partner's clients that
keep asking (``secs >= failover.max_ack_delay_s``) are counted and reported with
``cluster.report_client_evidence(peer, n)`` (Kea's unacked clients)."""

from __future__ import annotations

from ipaddress import IPv4Address

from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from tests.unit.test_dhcp4_failover_rules import T0, service


class FakeCluster:
    """The façade methods dhcp4 uses, recording what it was told."""

    peerlink = None

    def __init__(self, confirmed=False):
        self.confirmed = confirmed
        self.asked = []
        self.reports = []

    def register_partner(self, peer, listener, **kw):
        self.listener = listener
        return P.NORMAL

    def partner_confirmed(self, peer):
        self.asked.append(peer)
        return self.confirmed

    def report_client_evidence(self, peer, unanswered_clients):
        self.reports.append((peer, unanswered_clients))


class NoAnswer:
    def handle(self, pkt):
        return None


def started(tmp_path, cluster):
    svc, clock = service(tmp_path, cluster=cluster)
    svc._setup_failover()
    svc.handler = NoAnswer()
    return svc, clock


def macs(owner, n, start=1):
    out, i = [], start
    while len(out) < n:
        m = bytes([2, 0, 0, 0, i >> 8, i & 255])
        if P.hash_owner(P.client_hash_key(None, m), 50) == owner:
            out.append(m)
        i += 1
    return out


def packet(mtype, mac, secs, ciaddr=None, requested=None):
    opts = {C.OPT_MESSAGE_TYPE: bytes([mtype])}
    if requested:
        opts[C.OPT_REQUESTED_IP] = IPv4Address(requested).packed
    return C.encode(C.DHCPPacket(op=1, htype=1, hlen=6, xid=7, secs=secs, chaddr=mac,
                                 ciaddr=IPv4Address(ciaddr or 0),
                                 giaddr=IPv4Address("10.0.0.1"), options=opts))


def test_partner_down_is_confirmed_by_the_cluster_not_by_the_reason_text(tmp_path):
    """The cluster's answer wins over the reason string both ways, and a PARTNER-DOWN the
    cluster confirms later (told PARTNER-DOWN -> PARTNER-DOWN) unlocks the partner's
    addresses MCLT after the confirmation."""
    cluster = FakeCluster(confirmed=False)
    svc, clock = started(tmp_path, cluster)
    svc._partner_state("b", P.PARTNER_DOWN, "operator partner-down")
    assert cluster.asked == ["b"]
    assert not svc.view.partner_down_confirmed, "the cluster said not confirmed"
    assert svc.leases.partner_down_since is None
    clock.advance(100)
    cluster.confirmed = True          # e.g. the witness's quorum arrived
    svc._partner_state("b", P.PARTNER_DOWN, "peer b silent for 10s (auto_partner_down_s)")
    assert svc.view.partner_down_confirmed
    assert svc.leases.partner_down_since == T0 + 100
    svc._partner_state("b", P.NORMAL, "heard")
    cluster.confirmed = True
    svc._partner_state("b", P.PARTNER_DOWN, "peer b silent for 10s (auto_partner_down_s)")
    assert svc.view.partner_down_confirmed, "no witness, but the cluster confirmed it"


def test_without_the_cluster_api_the_reason_guess_stays(tmp_path):
    svc, _ = service(tmp_path, cluster=None)
    svc._partner_state("b", P.PARTNER_DOWN, "operator partner-down")
    assert svc.view.partner_down_confirmed
    svc._partner_state("b", P.NORMAL, "heard")
    svc._partner_state("b", P.PARTNER_DOWN, "peer b silent for 10s (auto_partner_down_s)")
    assert not svc.view.partner_down_confirmed


def test_waiting_partner_clients_are_reported_as_evidence(tmp_path):
    cluster = FakeCluster()
    svc, clock = started(tmp_path, cluster)
    assert svc.config.failover.max_ack_delay_s == 10.0
    theirs = macs(P.SECONDARY, 4)       # a is the primary: the secondary's hash bucket
    mine = macs(P.PRIMARY, 2)
    addr = ("x", 68)
    # NORMAL: nothing is evidence
    svc.datagram(packet(C.DISCOVER, theirs[0], secs=30), addr)
    assert cluster.reports == []
    svc._partner_state("b", P.COMM_INTERRUPTED, "peer b not heard")
    svc.datagram(packet(C.DISCOVER, theirs[0], secs=9), addr)      # not waiting long enough
    svc.datagram(packet(C.DISCOVER, mine[0], secs=30), addr)       # our own client
    assert cluster.reports == []
    svc.datagram(packet(C.DISCOVER, theirs[0], secs=10), addr)
    svc.datagram(packet(C.REQUEST, theirs[0], secs=12), addr)      # the same client again
    assert cluster.reports == [("b", 1)]
    svc.datagram(packet(C.DISCOVER, theirs[1], secs=11), addr)
    # split scope: a client renewing an address of the partner's segment (10.0.0.16..20)
    # is the partner's whatever its hash; one renewing ours is not
    svc.datagram(packet(C.REQUEST, mine[1], secs=20, ciaddr="10.0.0.18"), addr)
    svc.datagram(packet(C.REQUEST, theirs[2], secs=20, ciaddr="10.0.0.11"), addr)
    svc.datagram(packet(C.RELEASE, theirs[3], secs=20, ciaddr="10.0.0.19"), addr)
    assert cluster.reports[-1] == ("b", 3)
    # a sliding window: clients not seen again drop out
    clock.advance(30)
    svc.datagram(packet(C.DISCOVER, theirs[0], secs=40), addr)
    clock.advance(svc.EVIDENCE_WINDOW_S - 29)
    assert cluster.reports[-1] == ("b", 1)
    # back to NORMAL: the count goes to 0
    svc._partner_state("b", P.NORMAL, "heard")
    assert cluster.reports[-1] == ("b", 0)
    assert not clock.getDelayedCalls()
