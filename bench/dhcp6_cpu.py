"""DHCPv6 pair cost per exchange, in one process, without the network.

Two real ``Dhcp6Service`` nodes of a split-scope pair (primary a, secondary b, NORMAL; the
failover core's NA and PD lease stores on each node's own embedded store: SQLite in a
temporary directory, its writer work run inline so its CPU counts) joined by an in-memory
peer link (tests/sim/dhcp6/pair.py's ``Wire``: lazy updates, acks, ``mark_synced``).  Each
client does what ``perfdhcp -6 -e address-and-prefix`` does in bench/dhcp6.py's pair rows
(direct, multicast: BOTH nodes get every datagram): SOLICIT (IA_NA + IA_PD, elapsed time,
ORO) to both, REQUEST to both naming the server of the first ADVERTISE.  Every ``turn``
datagrams per node the reactor turn ends (``Clock.advance(0)``: the store's group commit,
the acks, the replies that waited for them, the peer link).

Prints the process CPU per exchange (both nodes, everything: parse, handler, stores,
SQLite, replication, encoding), i.e. what the two nodes of the real pair spend on one
client.  ``--profile`` adds a cProfile top list.  Deterministic input (no randomness),
so two trees can be compared on the same box:

    python bench/dhcp6_cpu.py [--n 3000] [--turn 8] [--na-only] [--profile] [--json]

Not a throughput benchmark (bench/dhcp6.py is); the yardstick for cuts of the request path.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import resource
import sys
import tempfile
import time
from ipaddress import IPv6Address
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet.task import Clock  # noqa: E402

from appliance.store.embedded import EmbeddedStore  # noqa: E402
from services.dhcp.failover import pools as P  # noqa: E402
from services.dhcp.v6 import codec as C  # noqa: E402


def _inline(f, *args):
    from twisted.internet import defer
    return defer.maybeDeferred(f, *args)


class _Port:
    """The listener: keeps what was sent (bytes), parses nothing."""

    def __init__(self):
        self.sent = []
        from tests.unit.test_dhcp6_service import Sock
        self.socket = Sock()

    def write(self, data, addr):
        self.sent.append(data)

    def stopListening(self):
        return None


def client_duid(i: int) -> bytes:
    """A DUID-LLT as perfdhcp sends (type 1, hw 1, time, 6-octet MAC)."""
    return bytes.fromhex("000100010000abcd") + (0x0a0000000000 + i).to_bytes(6, "big")


def solicit(i: int, pd: bool) -> bytes:
    m = C.Message(C.SOLICIT, i & 0xFFFFFF, client_id=client_duid(i), elapsed=0,
                  oro=(C.OPT_DNS_SERVERS,))
    m.ia_na = [C.IA(1)]
    m.ia_pd = [C.IA(1)] if pd else []
    return C.encode(m)


def request(i: int, adv: C.Message, pd: bool) -> bytes:
    m = C.Message(C.REQUEST, (i + 7) & 0xFFFFFF, client_id=client_duid(i),
                  server_id=adv.server_id, elapsed=0, oro=(C.OPT_DNS_SERVERS,))
    m.ia_na = [C.IA(1, addresses=[C.IAAddress(a.address) for a in adv.ia_na[0].addresses])]
    if pd:
        m.ia_pd = [C.IA(1, prefixes=[C.IAPrefix(p.prefix, p.prefix_len)
                                     for p in adv.ia_pd[0].prefixes])]
    return C.encode(m)


def build(tmp: Path, clock: Clock, n: int):
    from types import SimpleNamespace

    from appliance.config import config_from_string
    from services.dhcp.plugin import dhcp6_plugin
    from services.dhcp.v6.service import Dhcp6Service
    from tests.sim.dhcp6 import pair
    wire = pair.Wire()
    size = max(4 * n, 4096)
    last = IPv6Address("2001:db8:1::100") + size
    cfg = dict(mclt_s=3600, valid_s=4000, preferred_s=3000, pool=("2001:db8:1::100", str(last)),
               pd_prefix="2001:db8:8000::/40", pd_len=56)
    nodes = []
    clock.listenUDP = lambda port, proto, interface="": _Port()
    for name, peer, role in (("a", "b", "primary"), ("b", "a", "secondary")):
        (tmp / name).mkdir()
        store = EmbeddedStore(clock, state_dir=tmp / name, fsync="never", run_in_thread=_inline,
                              turn_batching=True)
        store.startService()
        parsed = config_from_string(pair.config(name, peer, role, **cfg), "t.toml",
                                    {"dhcp6": dhcp6_plugin})
        ctx = SimpleNamespace(reactor=clock, store=store, node_id=name, providers={},
                              cluster=pair.Cluster(wire.end(name), P.NORMAL), rpc=pair.Rpc(),
                              state_dir=str(tmp / name),
                              metrics=SimpleNamespace(register=lambda c: None,
                                                      unregister=lambda c: None))
        svc = Dhcp6Service(parsed.services["dhcp6"].config, ctx)
        done = []
        svc.startService().addBoth(done.append)
        for _ in range(50):
            if done:
                break
            clock.advance(0)
        if not done or not (done[0] is None or not hasattr(done[0], "raiseException")):
            raise RuntimeError(f"node {name} did not start: {done}")
        svc.port = _Port()
        nodes.append(svc)
    return wire, nodes


def end_turn(clock, wire, rounds=6):
    for _ in range(rounds):
        clock.advance(0)
        if not wire.pump(1) and not clock.getDelayedCalls():
            break
    clock.advance(0)


def run(n: int, turn: int, pd: bool, profile: bool):
    tmp = Path(tempfile.mkdtemp(prefix="dhcp6cpu-"))
    clock = Clock()
    clock.advance(1_700_000_000.0)
    wire, nodes = build(tmp, clock, n)
    end_turn(clock, wire)
    addr = ("fe80::1", 546)
    prof = cProfile.Profile() if profile else None
    cpu = 0.0
    pending: list[int] = []            # clients whose SOLICIT went out this turn
    stats = {"advertise": 0, "reply": 0, "no_advertise": 0}

    split = {"solicit": 0.0, "request": 0.0, "turn_end": 0.0}

    def timed(f, *args):
        nonlocal cpu
        part = ("turn_end" if f is end_turn else
                "solicit" if args[0][0] == C.SOLICIT else "request")
        on = prof is not None and (profile is True or profile == part)
        t = time.process_time()
        if on:
            prof.enable()
        f(*args)
        if on:
            prof.disable()
        dt = time.process_time() - t
        cpu += dt
        split[part] += dt

    def solicit_turn(batch):
        for i in batch:
            data = solicit(i, pd)
            for svc in nodes:
                timed(svc.datagram, data, addr)
        timed(end_turn, clock, wire)

    def request_turn(batch):
        # the first ADVERTISE each client got (a's or b's: what perfdhcp takes)
        # (both answer every SOLICIT: odd clients take a's, even ones b's, so each node
        # binds half the clients, as with perfdhcp taking whichever ADVERTISE came first)
        offers: dict[int, list] = {}
        for svc in nodes:
            for data in svc.port.sent:
                m = C.parse(data)
                if m.msg_type == C.ADVERTISE:
                    i = int.from_bytes(m.client_id[-6:], "big") - 0x0a0000000000
                    offers.setdefault(i, []).append(m)
            svc.port.sent.clear()
        firsts = {i: ms[(i + 1) % len(ms)] if len(ms) > 1 else ms[0] for i, ms in offers.items()}
        for i in batch:
            adv = firsts.get(i)
            if adv is None or not adv.ia_na or not adv.ia_na[0].addresses:
                stats["no_advertise"] += 1
                continue
            stats["advertise"] += 1
            data = request(i, adv, pd)
            for svc in nodes:
                timed(svc.datagram, data, addr)
        timed(end_turn, clock, wire)
        for svc in nodes:
            for data in svc.port.sent:
                if data[0] == C.REPLY:
                    stats["reply"] += 1
            svc.port.sent.clear()

    wall = time.perf_counter()
    for start in range(0, n, turn):
        batch = list(range(start + 1, min(n, start + turn) + 1))
        solicit_turn(batch)
        request_turn(batch)
        if start % (turn * 8) == 0:
            clock.advance(0.01)        # timers (outbox flush, heartbeats) get their turn
            timed(end_turn, clock, wire)
    for _ in range(20):
        clock.advance(0.05)
        timed(end_turn, clock, wire)
    wall = time.perf_counter() - wall
    out = {"n": n, "turn": turn, "pd": pd, "cpu_s": round(cpu, 3),
           "us_per_exchange": round(1e6 * cpu / n, 1), "wall_s": round(wall, 2), **stats,
           "us_split": {k: round(1e6 * v / n, 1) for k, v in split.items()},
           "states": [s.failover.view.state for s in nodes],
           "unsynced": [len(s.leases.na.unsynced) + len(s.leases.pd.unsynced) for s in nodes],
           "drops": [{k: v for k, v in s.drops.items() if v} for s in nodes],
           "handler": [dict(s.handler.counters) for s in nodes],
           "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    return out, prof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="clients (one SARR each)")
    ap.add_argument("--turn", type=int, default=8, help="clients per reactor turn")
    ap.add_argument("--na-only", action="store_true", help="IA_NA only (no IA_PD)")
    ap.add_argument("--profile", nargs="?", const=True, default=False,
                    choices=(True, "solicit", "request", "turn_end"),
                    help="cProfile top list (of one part only if named)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out, prof = run(args.n, args.turn, not args.na_only, args.profile)
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['n']} SARR ({'NA+PD' if out['pd'] else 'NA'}), {out['turn']}/turn: "
              f"{out['us_per_exchange']} us CPU per exchange (both nodes), "
              f"{out['reply']} REPLYs, states {out['states']}, unsynced {out['unsynced']}")
        print("split (us per exchange):", out["us_split"])
        print("drops", out["drops"])
        print("handler", out["handler"])
    if prof is not None:
        st = pstats.Stats(prof, stream=sys.stdout)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    main()
