"""Route propagation from a DN to the edge service router: BIRD 2 + OSPF (the
thesis's setup) beside the appliance's ``esr`` agent.

One sample = the time from the DN's decision to the route being in the ESR
namespace's kernel table:

* ``bird``: the DN injects ``10.200.<i>.0/26 dev en0 proto 228`` with
  :class:`~services.encap.routes.RouteInjector` (real netlink in the dn
  namespace); BIRD 2 on the DN learns it (``protocol kernel { learn; }``,
  ``etc/bird/dn.conf``), originates an OSPF external LSA; BIRD on the ESR
  (``etc/bird/esr.conf``) runs its SPF at its next ``tick`` and installs the
  route (proto bird).  ``scan_time``: ``None`` = BIRD's default (the line stays
  commented out in etc/bird/dn.conf), or a number of seconds (the thesis: 1).
* ``esr``: the DN claims the slice in the mapping table
  (:class:`~services.encap.mapping.MappingTable` on a Redis shared over a unix
  socket); the ``esr`` service of a real ``twistd -n appliance`` node in the
  ESR namespace installs the route via the DN.

The ESR's kernel is polled every millisecond from a thread (one pyroute2
``IPRoute`` kept open), so a sample is accurate to ~1 ms plus the poll's own
cost.  Prefixes are fresh for every sample (no LSA re-origination limits) and
samples are spaced by a random 0.2-1.2 s so they fall at random phases of
BIRD's timers.

Use from another bench (blocking; runs this module in a child process with
its own reactor and namespaces, needs root, ``bird2`` and ``redis-server``)::

    from bench.encap_bird import propagation_samples
    bird = propagation_samples("bird", n=20)                 # seconds
    esr = propagation_samples("esr", n=20)

For a bench whose DNs run the real encap service (outage rows ``bird2-ospf``):
``start_birds(lab, esr_ns, [dn1_ns, dn2_ns], workdir)`` starts BIRD with the
etc/bird configs in those namespaces and waits for the OSPF adjacencies.

or ``python -m bench.encap_bird bird|esr [--n N] [--scan-time S] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BIRD_DIR = ROOT / "etc" / "bird"
ESR_ADDR, DN_ADDR = "10.77.0.1", "10.77.0.2"


# ----------------------------------------------------------------------
# blocking API for other benches and tests
# ----------------------------------------------------------------------
def propagation_samples(path: str, n: int = 10, *, scan_time: int | None = None,
                        timeout: float = 300.0) -> list[float]:
    """Route-propagation latencies in seconds (``path`` = ``"bird"`` or ``"esr"``)."""
    return run(path, n, scan_time=scan_time, timeout=timeout)["samples_s"]


def run(path: str, n: int = 10, *, scan_time: int | None = None,
        timeout: float = 300.0) -> dict:
    """The whole result of one run (samples, withdraw samples, settings)."""
    if path not in ("bird", "esr"):
        raise ValueError("path is bird or esr")
    cmd = [sys.executable, "-m", "bench.encap_bird", path, "--n", str(n), "--json"]
    if scan_time is not None:
        cmd += ["--scan-time", str(scan_time)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"bench.encap_bird {path} failed ({out.returncode}):\n"
                           f"{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------
# pieces
# ----------------------------------------------------------------------
def bird_config(name: str, scan_time: int | None = None, iface: str = "eth0") -> str:
    """etc/bird/<name>.conf, with ``scan time`` set when asked (else BIRD's default)
    and ``iface`` as the OSPF interface (and router-id source) instead of eth0."""
    text = (BIRD_DIR / f"{name}.conf").read_text().replace('"eth0"', f'"{iface}"')
    if scan_time is not None:
        text, count = re.subn(r"#\s*scan time \d+;", f"scan time {int(scan_time)};", text)
        if count != 1:
            raise RuntimeError(f"etc/bird/{name}.conf has no '# scan time N;' line")
    return text


class Bird:
    """One ``bird -f`` in a namespace of ``lab``, with its own control socket."""

    def __init__(self, lab, ns: str, workdir: Path, name: str, config: str):
        self.lab, self.ns, self.name = lab, ns, name
        self.conf = workdir / f"{name}.conf"
        self.sock = workdir / f"{name}.ctl"
        self.log = workdir / f"{name}.log"
        self.conf.write_text(config)
        self.proc = None

    def start(self):
        bird = shutil.which("bird")
        if bird is None:
            raise RuntimeError("bird not installed (apt-get install bird2)")
        self.fh = open(self.log, "w")
        self.proc = self.lab.popen(self.ns, bird, "-f", "-c", str(self.conf), "-s",
                                   str(self.sock), "-P", str(self.sock) + ".pid",
                                   stdout=self.fh, stderr=subprocess.STDOUT)
        return self

    def birdc(self, *cmd: str) -> str:
        out = subprocess.run(["birdc", "-s", str(self.sock), *cmd], capture_output=True,
                             text=True, timeout=10)
        return out.stdout

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "fh", None):
            self.fh.close()


def start_birds(lab, esr_ns: str, dn_nss: list[str], workdir: Path, *,
                scan_time: int | None = None, iface: str = "eth0",
                timeout: float = 60.0) -> list[Bird]:
    """BIRD 2 with etc/bird/esr.conf in ``esr_ns`` and etc/bird/dn.conf in each of
    ``dn_nss`` (all on one link, interface ``iface``), started and waited for until
    the ESR has a Full adjacency with every DN; for benches whose DNs run the real
    encap service (its routes carry proto 228, which dn.conf exports).  Stop them
    with ``Bird.stop()``; the lab's close() also ends them."""
    workdir = Path(workdir)
    birds = [Bird(lab, esr_ns, workdir, "esr", bird_config("esr", iface=iface)).start()]
    for i, ns in enumerate(dn_nss):
        birds.append(Bird(lab, ns, workdir, f"dn{i + 1}",
                          bird_config("dn", scan_time, iface=iface)).start())
    wait_until(lambda: birds[0].birdc("show", "ospf", "neighbors").count("Full")
               >= len(dn_nss), timeout, "OSPF adjacencies of the ESR")
    return birds


def wait_until(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not within {timeout} s")
        time.sleep(step)


class KernelWatch:
    """Polls one namespace's main table (IPv4) from a thread, every ``step`` s."""

    def __init__(self, ns: str, step: float = 0.001):
        from pyroute2 import IPRoute
        self.ipr = IPRoute(netns=ns, flags=0)
        self.step = step

    def vias(self) -> dict[str, str | None]:
        out = {}
        for m in self.ipr.get_routes(family=socket.AF_INET, table=254):
            if m["type"] == 1:
                gw = m.get("RTA_GATEWAY")
                if gw is None:
                    mp = m.get("RTA_MULTIPATH")
                    gw = mp[0].get("RTA_GATEWAY") if mp else None
                out[f"{m.get('RTA_DST') or '0.0.0.0'}/{m['dst_len']}"] = gw
        return out

    def until(self, prefix: str, present: bool, timeout: float) -> float:
        """Blocking: the monotonic time at which ``prefix`` is (not) routed."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if (prefix in self.vias()) == present:
                return now
            if now > deadline:
                raise RuntimeError(f"{prefix} {'never appeared' if present else 'stayed'} "
                                   f"within {timeout} s")
            time.sleep(self.step)

    def close(self):
        self.ipr.close()


def build_lab():
    from tests.support.netns import Lab
    lab = Lab()
    lab.add_node("esr", f"{ESR_ADDR}/24")
    lab.add_node("dn1", f"{DN_ADDR}/24")
    dn = lab.nodes["dn1"].ns
    # en0: the stand-in for the DN's TUN device (the ENs' side)
    lab.host("ip", "-n", dn, "link", "add", "en0", "type", "veth", "peer", "name", "en1")
    lab.host("ip", "-n", dn, "link", "set", "en0", "up")
    lab.host("ip", "-n", dn, "link", "set", "en1", "up")
    return lab


def _spacing():
    return random.uniform(0.2, 1.2)


# ----------------------------------------------------------------------
# the two paths (run under the reactor, in the child process)
# ----------------------------------------------------------------------
async def bird_path(reactor, n: int, scan_time: int | None) -> dict:
    from twisted.internet.threads import deferToThread
    from twisted.internet.task import deferLater

    from appliance.net.netlink import Netlink
    from services.encap.routes import PROTO_ENCAP, RouteInjector

    work = Path(tempfile.mkdtemp(prefix="encap-bird-"))
    lab = build_lab()
    birds = []
    watch = nl = None
    try:
        esr_ns, dn_ns = lab.nodes["esr"].ns, lab.nodes["dn1"].ns
        t_up = time.monotonic()
        birds = await deferToThread(start_birds, lab, esr_ns, [dn_ns], work,
                                    scan_time=scan_time)
        adjacency_s = time.monotonic() - t_up
        # a route of somebody else on the DN (not proto 228): BIRD must not carry it
        lab.host("ip", "-n", dn_ns, "route", "add", "10.201.0.0/24", "dev", "en0",
                 "proto", "static")
        watch = KernelWatch(esr_ns)
        nl = Netlink(reactor, dn_ns)
        routes = RouteInjector(reactor, nl, proto=PROTO_ENCAP)
        routes.start()
        # one warm-up route: the first external LSA also waits for the initial SPF
        await routes.inject("10.200.250.0/26", dev="en0")
        await deferToThread(watch.until, "10.200.250.0/26", True, 60)
        samples, withdraws = [], []
        for i in range(n):
            await deferLater(reactor, _spacing(), lambda: None)
            prefix = f"10.200.{i}.0/26"
            t0 = time.monotonic()
            await routes.inject(prefix, dev="en0")
            seen = await deferToThread(watch.until, prefix, True, 120)
            samples.append(seen - t0)
            await deferLater(reactor, _spacing(), lambda: None)
            t0 = time.monotonic()
            await routes.withdraw(prefix)
            gone = await deferToThread(watch.until, prefix, False, 120)
            withdraws.append(gone - t0)
        vias = watch.vias()
        via = vias.get("10.200.250.0/26")
        foreign_carried = "10.201.0.0/24" in vias
        version = subprocess.run(["bird", "--version"], capture_output=True,
                                 text=True).stderr.strip() or "bird"
        return {"path": "bird", "scan_time": scan_time, "samples_s": samples,
                "withdraw_samples_s": withdraws, "adjacency_s": adjacency_s,
                "via": via, "daemon": version,
                "foreign_carried": foreign_carried}
    finally:
        if nl is not None:
            await nl.close()
        if watch is not None:
            watch.close()
        for b in birds:
            b.stop()
        lab.close()
        shutil.rmtree(work, ignore_errors=True)


async def esr_path(reactor, n: int) -> dict:
    from twisted.internet import defer
    from twisted.internet.threads import deferToThread
    from twisted.internet.task import deferLater

    from appliance.store.redis import RedisStore
    from services.encap.mapping import MappingTable
    from tests.support.node_process import env_with_dropins, free_port, twistd_command
    from tests.support.redis_server import RedisServer

    work = Path(tempfile.mkdtemp(prefix="encap-esr-"))
    sock = work / "redis.sock"
    server = RedisServer(extra_config=f"unixsocket {sock}\nunixsocketperm 700").start()
    lab = build_lab()
    namespace = f"b{uuid.uuid4().hex[:10]}"
    store = node = watch = fh = None
    try:
        esr_ns = lab.nodes["esr"].ns
        port = free_port()
        state = work / "esr-state"
        config = work / "esr.toml"
        config.write_text(f"""
[node]
id = "esr"
state_dir = "{state}"
[store]
backend = "redis"
url = "unix://{sock}"
namespace = "{namespace}"
[admin]
listen = "tcp:{port}:interface=127.0.0.1"
token_file = "{state}/admin.token"
[services.esr]
next_hops = {{ dn1 = "{DN_ADDR}" }}
""")
        fh = open(work / "esr.log", "w")
        t_up = time.monotonic()
        node = lab.popen("esr", *twistd_command(), "-c", str(config), cwd=work,
                         env=env_with_dropins(), stdout=fh, stderr=subprocess.STDOUT)
        store = RedisStore(reactor, url=f"unix://{sock}", namespace=namespace)
        await defer.maybeDeferred(store.startService)
        table = MappingTable(reactor, store, "dn1")
        await table.start()
        watch = KernelWatch(esr_ns)
        # warm-up: the agent is up once its first route is in
        await table.claim("10.200.250.0/26", "dn1", "warm-up")
        await deferToThread(watch.until, "10.200.250.0/26", True, 60)
        startup_s = time.monotonic() - t_up
        samples, withdraws = [], []
        for i in range(n):
            await deferLater(reactor, _spacing(), lambda: None)
            prefix = f"10.200.{i}.0/26"
            t0 = time.monotonic()
            await table.claim(prefix, "dn1", "bench")
            seen = await deferToThread(watch.until, prefix, True, 30)
            samples.append(seen - t0)
            await deferLater(reactor, _spacing(), lambda: None)
            t0 = time.monotonic()
            await table.release(prefix, "dn1")
            gone = await deferToThread(watch.until, prefix, False, 30)
            withdraws.append(gone - t0)
        table.stop()
        return {"path": "esr", "samples_s": samples, "withdraw_samples_s": withdraws,
                "startup_s": startup_s, "via": watch.vias().get("10.200.250.0/26")}
    finally:
        if watch is not None:
            watch.close()
        if store is not None:
            await defer.maybeDeferred(store.stopService)
        if node is not None and node.poll() is None:
            node.terminate()
            try:
                node.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.kill()
        if fh is not None:
            fh.close()
        lab.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def _summary(result: dict) -> str:
    from bench.report import percentile
    s = sorted(result["samples_s"])
    w = sorted(result["withdraw_samples_s"])
    ms = lambda v: f"{v * 1000:.1f}"  # noqa: E731
    head = result["path"] + (f" (scan time {result['scan_time'] or 'default'})"
                             if result["path"] == "bird" else "")
    return (f"{head}: add p50 {ms(percentile(s, 50))} ms, p95 {ms(percentile(s, 95))} ms, "
            f"max {ms(s[-1])} ms; withdraw p50 {ms(percentile(w, 50))} ms, max {ms(w[-1])} ms "
            f"(n={len(s)})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", choices=("bird", "esr"))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--scan-time", type=int, default=None,
                    help="BIRD kernel scan time in s (default: BIRD's own default)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from twisted.internet import task

    result = {}

    async def go(reactor):
        if args.path == "bird":
            result.update(await bird_path(reactor, args.n, args.scan_time))
        else:
            result.update(await esr_path(reactor, args.n))

    def react_main(reactor):
        from twisted.internet import defer
        return defer.ensureDeferred(go(reactor))
    try:
        task.react(react_main)
    except SystemExit as e:
        if e.code:
            return int(e.code)
    print(json.dumps(result) if args.json else _summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
