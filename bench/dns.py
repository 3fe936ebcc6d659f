#!/usr/bin/env python3
"""DNS benchmark: how fast records follow an ownership move, and signed updates per second.

Runs in one process (one reactor) against a BIND 9 ``named`` this script
starts on 127.0.0.1 (temp dir, TSIG-protected zone, high port):

* ``move`` -- two nodes ``a`` (127.0.0.1) and ``b`` (127.0.0.2), each a real
  ClusterManager (UDP heartbeats at the shipped 100 ms) plus its own DNSService, bound
  to one resource ``vip1`` with an A and an SRV record.  Each move is a
  ``cluster.promote`` on the standby; a separate process polls named about every
  1 ms and stamps (CLOCK_MONOTONIC) the moment the new A answer is visible (a
  thread of the bench's process waited for the GIL behind the appliance's reactor
  and stamped late).  Metrics
  ``visible_ms_p50`` / ``visible_ms_p95`` (promote call -> answer visible),
  over 50 moves (``--quick``: 15).
  Measured from ``promote()`` (an operator decision), not from failure detection;
  the promote is break-before-make (the owner lets go, seen in its heartbeat, then
  the promoter claims), so it includes up to about one heartbeat interval.  Extra
  rows ``dns_visible_ms_p50/p95``: from the gaining node's "owner" callback to the
  answer at named -- the DNS updater's part alone; ``handshake_ms_p50/p95``: from
  ``promote()`` to that callback -- the cluster's part; ``update_rtt_ms_p50/p95``:
  the move's UPDATE from send to answer (named's part, with its journal fsync).
  Also reported (as fields of the p95 row and in the log): the mean UPDATE
  round trip and ``cas_misses`` (UPDATEs whose guard prerequisite failed
  because the expected guard was stale).
* ``sequential`` -- ``updates_per_s``: signed UPDATEs (each with its guard
  prerequisites) one after the other through the service's Updater; each one
  really changes data (the A record alternates between two values), so BIND
  bumps the serial and writes and fsyncs its journal.  Baselines in the same
  run, same named, same message shape: ``dnspython`` (built, signed, sent with
  ``dns.query.udp``; in blocks alternating with the appliance's, after the nodes
  stopped) and ``nsupdate`` (``nsupdate -k``, one process, process start excluded).

named runs as shipped: its default worker count (``-n`` not given) and its
directory on disk (under /var/tmp; the filesystem type is logged).  The
ClusterManagers run without a store (epoch persistence is not in the path).
The appliance runs with its shipped defaults (heartbeat_interval_ms 100, dead_after 3,
[services.dns] timeout_s, retries, reconcile_interval_s and default_ttl as shipped).

    python bench/dns.py [--quick] [--json] [--named-tmpfs]

``--named-tmpfs`` is a diagnostic: named's directory in /dev/shm (its journal
fsync then costs nothing), every row's case marked "(named on tmpfs)".

With ``--json`` the last stdout line is
``{"bench": "dns", "rows": [{"system", "case", "metric", "value", "unit"}]}``.
``named`` comes from the Debian packages bind9 bind9-utils (installed with
apt-get when running as root; otherwise the script says it is missing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# This file is bench/dns.py: keep its folder off sys.path so "import dns" is dnspython.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer, protocol, task  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench/dns] {msg}", file=sys.stderr, flush=True)


def pct(values, p):
    values = sorted(values)
    k = max(0, min(len(values) - 1, int(round(p / 100 * (len(values) - 1)))))
    return values[k]


_POLLER = r"""
import select, sys, time
import dns.message, dns.query, dns.rdata
port, name = int(sys.argv[1]), sys.argv[2]
query = dns.message.make_query(name, "A")
want = None
while True:
    if want is None or select.select([sys.stdin], [], [], 0)[0]:
        line = sys.stdin.readline()            # a new expectation replaces the old one
        if not line:
            break
        want = dns.rdata.from_text("IN", "A", line.strip())
        continue
    try:
        r = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.5)
        got = set(r.answer[0]) if r.answer else set()
    except Exception:
        got = set()
    if got == {want}:
        print(f"{time.monotonic():.9f}", flush=True)
        want = None
        continue
    time.sleep(0.001)
"""


class Poller(protocol.ProcessProtocol):
    """Queries named every ~1 ms from a process of its own (a thread of this process
    would wait for the GIL while the appliance's reactor runs Python, and stamp the
    answer late); ``expect(rdata)`` arms it, the Deferred fires with the
    ``time.monotonic()`` at which named answered ``rdata`` (CLOCK_MONOTONIC: the same
    clock in both processes)."""

    def __init__(self, reactor, port: int, name: str):
        self.seen: defer.Deferred | None = None
        self.buffer = b""
        reactor.spawnProcess(self, sys.executable, [sys.executable, "-c", _POLLER, str(port),
                                                    name], env=None)

    def expect(self, rdata) -> defer.Deferred:
        self.seen = defer.Deferred()
        self.transport.write(rdata.to_text().encode() + b"\n")
        return self.seen

    def outReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            seen, self.seen = self.seen, None
            if seen is not None and not seen.called:
                seen.callback(float(line))

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.closeStdin()      # the poller ends at EOF


def fs_type(path: Path) -> str:
    """The filesystem type holding ``path`` (from /proc/mounts)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype = line.split()[:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def baseline_message(server, key, shape, value: str):
    """The appliance's UPDATE shape in plain dnspython: per name a guard prerequisite
    (value-dependent), the rrset replaced, the guard replaced."""
    import dns.tsig
    import dns.update
    www, srv, guards = shape
    upd = dns.update.UpdateMessage(server.zone, keyring=dns.tsig.Key(key.name, key.secret,
                                                                     key.algorithm),
                                   keyname=key.name)
    for spec in (www, srv):
        gname = "_appliance-owner." + spec.name.to_text()
        upd.present(gname, "TXT", f'"{guards[spec.name]}"')
        upd.replace(gname, spec.ttl, "TXT", f'"{guards[spec.name]}"')
    upd.replace(www.name, www.ttl, "A", value)
    srv_values = sorted(rd.to_text() for rd in srv.values.values())
    upd.replace(srv.name, srv.ttl, "SRV", *srv_values)
    return upd


def dnspython_baseline(server, key, shape, n: int) -> float:
    """The same changing UPDATE, built, signed and sent with dns.query.udp, one after another."""
    import dns.query
    values = ("10.9.0.21", "10.9.0.22")
    t0 = time.perf_counter()
    for i in range(n):
        r = dns.query.udp(baseline_message(server, key, shape, values[i % 2]), "127.0.0.1",
                          port=server.port, timeout=2)
        if r.rcode() != 0:
            raise RuntimeError(f"dnspython baseline: rcode {r.rcode()}")
    return n / (time.perf_counter() - t0)


def nsupdate_baseline(server, shape, n: int) -> float | None:
    """``nsupdate -k`` sending the same changing UPDATE ``n`` times in one process
    (rate from the difference of an n-update and a 1-update run: process start excluded)."""
    import shutil
    import subprocess
    exe = shutil.which("nsupdate")
    if exe is None:
        log("nsupdate missing (bind9-dnsutils): no nsupdate row")
        return None
    www, srv, guards = shape

    def script(count: int) -> str:
        out = [f"server 127.0.0.1 {server.port}", f"zone {server.zone}"]
        for i in range(count):
            for spec in (www, srv):
                g = "_appliance-owner." + spec.name.to_text()
                out.append(f'prereq yxrrset {g} IN TXT "{guards[spec.name]}"')
                out.append(f"update delete {g} TXT")
                out.append(f'update add {g} {spec.ttl} TXT "{guards[spec.name]}"')
            out.append(f"update delete {www.name} A")
            out.append(f"update add {www.name} {www.ttl} A 10.9.0.{31 + i % 2}")
            out.append(f"update delete {srv.name} SRV")
            for rd in srv.values.values():
                out.append(f"update add {srv.name} {srv.ttl} SRV {rd.to_text()}")
            out.append("send")
        return "\n".join(out) + "\n"

    def timed(count: int) -> float:
        t0 = time.perf_counter()
        p = subprocess.run([exe, "-k", str(server.key_file)], input=script(count), text=True,
                           capture_output=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"nsupdate failed: {p.stderr[-500:]}")
        return time.perf_counter() - t0
    one = min(timed(1) for _ in range(3))
    return (n - 1) / max(1e-6, timed(n) - one)


def node_toml(me, server, tmp, hb_port):
    other = "b" if me == "a" else "a"
    addr = {"a": "127.0.0.1", "b": "127.0.0.2"}
    return f"""
[node]
id = "{me}"
state_dir = "{tmp}/state-{me}"
[cluster]
peers = [{{ id = "{other}", address = "{addr[other]}" }}]
bind_address = "{addr[me]}"
heartbeat_port = {hb_port}
auth_key_file = "{tmp}/cluster.key"
[[vip]]
name = "vip1"
address = "10.9.0.100/24"
interface = "lo"
priority = {{ a = 200, b = 100 }}
preempt = false
[services.dns]
servers = ["{server.address}"]
tsig_key_file = "{server.key_file}"
zones = ["{server.zone}"]
[[services.dns.records]]
name = "www.{server.zone}"
type = "A"
resource = "vip1"
values = {{ a = "10.9.0.1", b = "10.9.0.2" }}
[[services.dns.records]]
name = "_sip._udp.{server.zone}"
type = "SRV"
resource = "vip1"
values = {{ a = "10 5 5060 a.{server.zone}", b = "20 5 5060 b.{server.zone}" }}
"""


async def run(reactor, args) -> list[dict]:
    import dns.name
    import dns.rdata
    from prometheus_client import CollectorRegistry

    from appliance.admin.rpc import MethodRegistry
    from appliance.cluster.manager import ClusterManager
    from appliance.config import config_from_string
    from appliance.plugin import NodeContext
    from services.dns.plugin import dns_plugin
    from services.dns.client import DNSClient
    from services.dns.records import Change, plan
    from services.dns.service import DNSService
    from services.dns.updater import Updater
    from tests.support.named_server import NamedServer, free_port

    def sleep(s):
        return task.deferLater(reactor, s, lambda: None)

    tmp = Path(tempfile.mkdtemp(prefix="bench-dns-"))
    (tmp / "cluster.key").write_text("k" * 32)
    # named as shipped: its default worker count, its directory on disk (ext4 here),
    # so every changing update pays BIND's journal write and fsync
    # --named-tmpfs (a diagnostic, not the shipped setup): named's directory in
    # /dev/shm, so its journal fsync costs nothing -- the rows' case says so
    workdir = Path(tempfile.mkdtemp(prefix="bench-named-",
                                    dir="/dev/shm" if args.named_tmpfs else "/var/tmp"))
    suffix = " (named on tmpfs)" if args.named_tmpfs else ""
    server = NamedServer(workdir=workdir, workers=None).start()
    import shutil

    def cleanup():
        server.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    reactor.addSystemEventTrigger("after", "shutdown", cleanup)   # also on SIGTERM
    log(f"named on {server.address}, directory {workdir} ({fs_type(workdir)}), default workers")
    rows: list[dict] = []
    nodes = {}
    owner_at: dict[str, float] = {}
    rtts: list[tuple[float, float]] = []      # (answered at, UPDATE round trip s)

    def stamped(me, listener):
        """The dns service's cluster listener, stamping when ``me`` hears "owner"."""
        def heard(resource, role, epoch, *rest):
            if role == "owner":
                owner_at[me] = time.monotonic()
            return listener(resource, role, epoch, *rest)
        return heard
    try:
        hb = free_port()
        for me in ("a", "b"):
            cfg = config_from_string(node_toml(me, server, tmp, hb), f"{tmp}/{me}.toml",
                                     plugins={"dns": dns_plugin})
            cluster = ClusterManager(reactor, node_id=me, cluster=cfg.cluster, vips=cfg.vips,
                                     state_dir=tmp / f"state-{me}")
            ctx = NodeContext(reactor=reactor, config=cfg, store=None, rpc=MethodRegistry(),
                              metrics=CollectorRegistry(), cluster=cluster, state_dir=tmp)
            service = DNSService(cfg.services["dns"].config, ctx)
            service._role_changed = stamped(me, service._role_changed)   # before start

            def published(result, *rest, _orig=service._published):
                rtts.append((time.monotonic(), result.latency_s))
                return _orig(result, *rest)
            service._published = published
            nodes[me] = (cluster, service)
        for cluster, service in nodes.values():
            await cluster.startService()
            service.startService()
        poller = Poller(reactor, server.port, f"www.{server.zone}")
        value = {n: dns.rdata.from_text("IN", "A", f"10.9.0.{1 if n == 'a' else 2}") for n in "ab"}
        first = poller.expect(value["a"])          # a owns it first
        first.addTimeout(10, reactor)
        try:
            await first
        except defer.TimeoutError:
            raise RuntimeError(f"a's record never became visible: {nodes['a'][1].records()}, "
                               f"{nodes['a'][0].status()['resources']}") from None
        await sleep(0.2)       # both nodes have heard each other's claims
        moves = args.moves or (15 if args.quick else 50)
        missed = 0
        samples = []
        dns_samples = []
        handshake = []
        move_rtts = []
        owner = "a"
        for i in range(moves):
            new = "b" if owner == "a" else "a"
            seen = poller.expect(value[new])
            seen.addTimeout(3, reactor)
            t0 = time.monotonic()
            nodes[new][0].promote("vip1")
            try:
                at = await seen
                samples.append((at - t0) * 1000)
                if owner_at.get(new, 0.0) >= t0:
                    dns_samples.append((at - owner_at[new]) * 1000)
                    handshake.append((owner_at[new] - t0) * 1000)
            except defer.TimeoutError:
                missed += 1
                log(f"move {i}: {new}'s answer not visible within 3 s: {nodes[new][1].records()}")
            owner = new
            # let the old owner see the claim and step down before the next move
            old = "a" if new == "b" else "b"
            while nodes[old][0].role("vip1") == "owner":
                await sleep(0.01)
            await sleep(0.05)
            move_rtts.extend(rtt * 1000 for when, rtt in rtts if when >= t0)
            rtts.clear()
        poller.stop()
        prereq = sum(n[1].context.metrics.get_sample_value(
            "appliance_dns_updates_total", {"rcode": r}) or 0
            for n in nodes.values() for r in ("NXRRSET", "YXRRSET"))
        log(f"move: {int(prereq)} UPDATEs failed their guard prerequisite (stale expectation)")
        lat = [n[1].metrics.latency.collect()[0] for n in nodes.values()]
        total = sum(m.value for h in lat for m in h.samples if m.name.endswith("_sum"))
        count = sum(m.value for h in lat for m in h.samples if m.name.endswith("_count"))
        update_ms = total / count * 1000 if count else 0.0
        log(f"move: mean UPDATE round trip {update_ms:.2f} ms over {int(count)} updates")
        if not samples:
            raise RuntimeError("no move became visible")
        p50, p95 = statistics.median(samples), pct(samples, 95)
        log(f"move: {moves} moves, visible p50 {p50:.2f} ms, p95 {p95:.2f} ms, max {max(samples):.2f} ms")
        # the SPEC rows only; the UPDATE round trip and the CAS misses ride along as fields
        d50, d95 = statistics.median(dns_samples), pct(dns_samples, 95)
        log(f"move: from the gaining node's owner callback: p50 {d50:.2f} ms, p95 {d95:.2f} ms")
        h50, h95 = statistics.median(handshake), pct(handshake, 95)
        log(f"move: promote -> the gaining node's owner callback (cluster handshake): "
            f"p50 {h50:.2f} ms, p95 {h95:.2f} ms")
        r50, r95 = (statistics.median(move_rtts), pct(move_rtts, 95)) if move_rtts else (0, 0)
        log(f"move: UPDATE round trip at named: p50 {r50:.2f} ms, p95 {r95:.2f} ms "
            f"over {len(move_rtts)} updates")
        rows += [{"system": "appliance", "case": "move" + suffix, "metric": "visible_ms_p50",
                  "value": round(p50, 3), "unit": "ms", "moves": moves},
                 {"system": "appliance", "case": "move" + suffix, "metric": "visible_ms_p95",
                  "value": round(p95, 3), "unit": "ms", "moves": moves, "missed": missed,
                  "update_rtt_ms_mean": round(update_ms, 3), "cas_misses": int(prereq)},
                 # more rows: the DNS part alone (owner callback -> answer at named)
                 {"system": "appliance", "case": "move" + suffix, "metric": "dns_visible_ms_p50",
                  "value": round(d50, 3), "unit": "ms", "moves": len(dns_samples)},
                 {"system": "appliance", "case": "move" + suffix, "metric": "dns_visible_ms_p95",
                  "value": round(d95, 3), "unit": "ms", "moves": len(dns_samples)},
                 # where the rest goes: the cluster's promote handshake, named's round trip
                 {"system": "appliance", "case": "move" + suffix, "metric": "handshake_ms_p50",
                  "value": round(h50, 3), "unit": "ms", "moves": len(handshake)},
                 {"system": "appliance", "case": "move" + suffix, "metric": "handshake_ms_p95",
                  "value": round(h95, 3), "unit": "ms", "moves": len(handshake)},
                 {"system": "appliance", "case": "move" + suffix, "metric": "update_rtt_ms_p50",
                  "value": round(r50, 3), "unit": "ms", "updates": len(move_rtts)},
                 {"system": "appliance", "case": "move" + suffix, "metric": "update_rtt_ms_p95",
                  "value": round(r95, 3), "unit": "ms", "updates": len(move_rtts)}]

        # sequential signed updates, each one really changing data (the A alternates
        # between two values: BIND bumps the serial, writes its journal and fsyncs -- a
        # repeated identical update is a no-op).  The nodes stop first (a quiet reactor);
        # the appliance's side is the Updater and DNSClient the service uses, with the
        # owner's guards, in blocks alternating with the dnspython baseline so that a
        # busy box's load falls on both alike.
        cluster, service = nodes[owner]
        zone = dns.name.from_text(server.zone)
        epochs = dict(service.owned)
        changes = plan(service.config.records, epochs, owner)[zone]
        www = next(c for c in changes if c.spec.type_text == "A")
        srv = [c for c in changes if c is not www]
        alt = [dns.rdata.from_text("IN", "A", "10.9.0.11"), dns.rdata.from_text("IN", "A", "10.9.0.12")]
        batches = [[Change(www.spec, frozenset([alt[i % 2]]), "bench")] + srv for i in range(2)]
        n = args.updates or (200 if args.quick else 1000)
        key = service.config.key
        cached = dict(service.updater.guards)
        guards = {c.spec.name: b"".join(next(iter(cached[c.spec.name])).strings).decode()
                  for c in changes}
        cluster_id, timeout_s = service.cluster_id, service.config.timeout_s
        for cl, sv in nodes.values():
            if sv.running:
                await sv.stopService()
            if cl.running:
                await cl.stopService()
        client = DNSClient(reactor, [("127.0.0.1", server.port)], timeout_s)
        updater = Updater(client, key, owner, reactor, cluster=cluster_id)
        updater.guards.update(cached)
        shape = (www.spec, srv[0].spec, guards)
        blocks = 4
        per = max(1, n // blocks)
        rounds, app_s, py_s = 0, 0.0, 0.0
        try:
            for _ in range(blocks):
                t0 = time.perf_counter()
                for i in range(per):
                    result = await updater.publish(zone, batches[i % 2], epochs)
                    rounds += result.rounds
                app_s += time.perf_counter() - t0
                py_s += per / dnspython_baseline(server, key, shape, per)
        finally:
            await client.close()
        done = per * blocks
        rate = done / app_s
        log(f"sequential: {done} signed changing updates, {rate:.0f}/s ({rounds} UPDATEs sent)")
        rows.append({"system": "appliance", "case": "sequential" + suffix, "metric": "updates_per_s",
                     "value": round(rate, 1), "unit": "updates/s", "updates": done})
        rate = done / py_s
        log(f"sequential: dnspython dns.query.udp, the same UPDATE: {rate:.0f}/s "
            f"(in {blocks} blocks alternating with the appliance's)")
        rows.append({"system": "dnspython", "case": "sequential" + suffix, "metric": "updates_per_s",
                     "value": round(rate, 1), "unit": "updates/s", "updates": done})
        n_ns = min(n, 200 if args.quick else 500)
        rate = nsupdate_baseline(server, shape, n_ns)
        if rate is not None:
            log(f"sequential: nsupdate -k, the same UPDATE: {rate:.0f}/s")
            rows.append({"system": "nsupdate", "case": "sequential" + suffix, "metric": "updates_per_s",
                         "value": round(rate, 1), "unit": "updates/s",
                         "updates": n_ns})
    finally:
        for cluster, service in nodes.values():
            if service.running:
                await service.stopService()
            if cluster.running:
                await cluster.stopService()
        cleanup()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer moves and updates (smoke check)")
    p.add_argument("--json", action="store_true", help="print the JSON result last on stdout")
    p.add_argument("--moves", type=int, default=0, help=argparse.SUPPRESS)     # smoke tests
    p.add_argument("--updates", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--named-tmpfs", action="store_true",
                   help="diagnostic: named's directory on tmpfs (no journal fsync cost); "
                        "the rows' case says so")
    args = p.parse_args()
    from tests.support.named_server import APT_PACKAGES, install_bind
    if not install_bind():
        print(f"[bench/dns] named is missing: install {' '.join(APT_PACKAGES)} "
              "(apt-get install -y --no-install-recommends ...) and run again", file=sys.stderr)
        if args.json:
            print(json.dumps({"bench": "dns", "rows": [], "error": "named missing"}))
        return 2

    def report(rows):
        width = max([12] + [len(r["case"]) + 2 for r in rows])
        print(f"{'system':<11}{'case':<{width}}{'metric':<20}{'value':>10}  unit")
        print("-" * (50 + width))
        for r in rows:
            print(f"{r['system']:<11}{r['case']:<{width}}{r['metric']:<20}{r['value']:>10}  "
                  f"{r['unit']}")
        if args.json:
            print(json.dumps({"bench": "dns", "rows": rows}))

    def go(reactor):
        return defer.ensureDeferred(run(reactor, args)).addCallback(report)
    task.react(go)     # exits with 0, or 1 on failure
    return 0


if __name__ == "__main__":
    sys.exit(main())
