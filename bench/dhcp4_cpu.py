"""DHCPv4 request path cost, in one process, without the network.

Drives ``Dhcp4Handler`` with encoded relayed DISCOVER/REQUEST packets
(parse -> handle -> wait for the disk if a lease was written -> encode, as
the service does) on the node's real embedded store (SQLite, the store
``backend = "memory"`` builds) in a temporary directory, ``window`` DORAs in flight at once on the
real reactor.  Prints DORA/s and the CPU per DORA of the reactor thread and of
the other threads (the store's SQLite writer), so a busy box's contention shows
as wall time, not as cost; ``--profile`` adds a cProfile top list (or use
``py-spy record -- python bench/dhcp4_cpu.py``).  This is the profiling
harness behind the request-path work; ``bench/dhcp4.py`` is the benchmark.

    python bench/dhcp4_cpu.py [--n 20000] [--window 64] [--fsync always] [--profile] [--pair]

``--pair``: one partner of a split-scope pair (primary, NORMAL), as in the
pair benchmark where both partners hear every client: clients the RFC 3074
hash gives this node get a DORA; the others' DISCOVER and REQUEST (to the
partner's server id) are parsed and dropped, and their leases arrive as the
partner's lazy updates (JSON batches of 32, applied as the service does).
DORA/s then counts all clients: per-node cost of a pair's throughput.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twisted.internet import defer, reactor  # noqa: E402

from appliance.config import ParseContext, Problems, Table  # noqa: E402
from appliance.eager import as_deferred  # noqa: E402
from services.dhcp.v4 import codec as C  # noqa: E402


def open_store(reactor, state_dir, fsync):
    """The store a node with ``backend = "memory"`` runs on (appliance.node.make_store)."""
    try:
        from appliance.store.embedded import EmbeddedStore
    except ImportError as e:      # before the SQLite store landed: the journal store
        if e.name != "appliance.store.embedded":
            raise
        from appliance.store.memory import MemoryStore as EmbeddedStore
    return EmbeddedStore(reactor, state_dir=state_dir, fsync=fsync)
from services.dhcp.v4.config import parse_dhcp4  # noqa: E402
from services.dhcp.v4 import pools as P  # noqa: E402
from services.dhcp.v4.handler import Dhcp4Handler, FailoverView  # noqa: E402
from services.dhcp.v4.leases import BOUND, Lease, LeaseStore  # noqa: E402

RELAY = IPv4Address("10.80.0.10")


PARTNER = IPv4Address("10.80.0.2")


def make_config(pair: bool = False):
    data = {"listen_address": "127.0.0.1",
            "subnets": [{"id": 1, "subnet": "10.80.0.0/12", "pool": ["10.81.0.0", "10.95.255.254"],
                         "routers": ["10.80.0.1"], "dns_servers": ["10.80.0.1"]}]}
    if pair:
        data["failover"] = {"peer": "b", "role": "primary", "mode": "split-scope", "split": 50}
    problems = Problems("bench.toml")
    cfg = parse_dhcp4(Table(data, "services.dhcp4", problems),
                      ParseContext("bench.toml", "a", ("b",) if pair else (), ()))
    assert not problems.items, problems.items
    return cfg


def packet(mtype, mac: bytes, xid: int, requested=None, server_id=None) -> bytes:
    opts = {C.OPT_MESSAGE_TYPE: bytes([mtype]), C.OPT_PARAMETER_REQUEST_LIST: bytes([1, 3, 6, 51, 54])}
    if requested is not None:
        opts[C.OPT_REQUESTED_IP] = requested.packed
    if server_id is not None:
        opts[C.OPT_SERVER_ID] = server_id.packed
    return C.encode(C.DHCPPacket(op=1, htype=1, hlen=6, hops=1, xid=xid, giaddr=RELAY,
                                 chaddr=mac, options=opts))


async def answer(handler, data: bytes):
    """What the service does with a datagram: handle it, and when it wrote a
    lease (immediate writes), wait for the store before the reply goes out."""
    writes = handler.leases.writes
    res = await as_deferred(handler.handle(C.parse(data)))
    if res is not None and handler.leases.writes != writes:
        await handler.leases.durable()
    return res


async def one(handler, i: int) -> bool:
    mac = (0x5254_0000_0000 + i).to_bytes(6, "big")
    res = await answer(handler, packet(C.DISCOVER, mac, i))
    if res is None:
        return False
    offer = C.parse(C.encode(res[0]))
    res = await answer(handler, packet(C.REQUEST, mac, i, offer.yiaddr, offer.server_id))
    if res is None:
        return False
    return C.parse(C.encode(res[0])).message_type == C.ACK


class Partner:
    """The other half of the pair: its clients' packets reach us and are
    dropped; the leases it gives them arrive as batched lazy updates."""

    def __init__(self, leases: LeaseStore, now):
        self.leases, self.now = leases, now
        seg = next(fs for fs in leases._sets if fs.role == P.SECONDARY)
        self.next_address = seg.first
        self.batch: list[dict] = []
        self.pending: list = []

    async def client(self, handler, mac: bytes, i: int) -> bool:
        for pkt in (packet(C.DISCOVER, mac, i),
                    packet(C.REQUEST, mac, i, IPv4Address(self.next_address), PARTNER)):
            if await answer(handler, pkt) is not None:
                return False                      # the partner's client: not ours to answer
        now = self.now()
        self.batch.append(Lease(str(IPv4Address(self.next_address)), 1, BOUND, mac.hex(":"), "",
                                "", now + 3600, now, "b", "b", 1).to_wire())
        self.next_address += 1
        if len(self.batch) >= 32:
            await self.flush()
        return True

    async def flush(self):
        wires, self.batch = json.loads(json.dumps({"leases": self.batch})), []
        results = [self.leases.apply_remote(Lease.from_wire(w)) for w in wires["leases"]]
        waits = [r for r in results if isinstance(r, defer.Deferred)]
        if waits:
            await defer.gatherResults(waits)
        await self.leases.durable()          # the partner's ack waits for the disk


async def run(args) -> dict:
    tmp = tempfile.mkdtemp(prefix="dhcp4cpu-")
    store = open_store(reactor, tmp, args.fsync)
    await defer.maybeDeferred(store.startService)
    leases = LeaseStore(store, make_config(args.pair), "a", reactor.seconds, immediate_writes=True)
    await leases.load()
    failover = FailoverView(mode="split-scope", role=P.PRIMARY, split=50) if args.pair else None
    handler = Dhcp4Handler(leases.config, leases, IPv4Address("10.80.0.1"), now=reactor.seconds,
                           failover=failover)
    partner = Partner(leases, reactor.seconds) if args.pair else None
    todo = iter(range(args.n))
    done = {"ok": 0, "fail": 0}

    async def client(i: int) -> bool:
        if partner is None:
            return await one(handler, i)
        mac = (0x5254_0000_0000 + i).to_bytes(6, "big")
        if P.hash_owner(mac, 50) == P.PRIMARY:
            return await one(handler, i)
        return await partner.client(handler, mac, i)

    async def worker():
        for i in todo:
            if await client(i):
                done["ok"] += 1
            else:
                done["fail"] += 1

    prof = cProfile.Profile() if args.profile else None
    cpu0, main0 = time.process_time(), time.thread_time()
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(args.window)])
    if partner is not None:
        await partner.flush()
    if prof:
        prof.disable()
    dt = time.perf_counter() - t0
    cpu, main = time.process_time() - cpu0, time.thread_time() - main0
    await defer.maybeDeferred(store.stopService)
    if prof:
        pstats.Stats(prof).sort_stats(args.sort).print_stats(35)
    # CPU per DORA: the reactor thread (parse, handler, lease logic, encode) and the
    # rest of the process (the store's writer thread: SQLite, fsync waits excluded)
    out = {"dora_per_s": done["ok"] / dt, "ok": done["ok"], "fail": done["fail"],
           "seconds": dt, "dora_per_cpu_s": done["ok"] / cpu if cpu else None,
           "reactor_us_per_dora": 1e6 * main / max(1, done["ok"]),
           "other_threads_us_per_dora": 1e6 * (cpu - main) / max(1, done["ok"]),
           "store": dict(getattr(store, "stats", {}))}
    if partner is not None:
        out["drops"] = {k: v for k, v in handler.counters.items() if k.startswith("drop_")}
        out["remote"] = {k: v for k, v in leases.counters.items() if v}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--fsync", default="always", choices=("always", "batch", "never"))
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--pair", action="store_true", help="one partner of a split-scope pair")
    ap.add_argument("--sort", default="tottime")
    args = ap.parse_args(argv)
    out = {}

    def go():
        d = defer.ensureDeferred(run(args))
        d.addCallback(out.update)
        d.addErrback(lambda f: (f.printTraceback(), out.update(error=str(f.value))))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(go)
    reactor.run()
    print(out)
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
