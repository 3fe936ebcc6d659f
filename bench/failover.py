"""Failover benchmark: VIP takeover after a box's death, appliance vs keepalived.

Topology (network namespaces on one bridge, built and removed by the bench):
node a 10.77.0.1, node b 10.77.0.2, client 10.77.0.10; the VIP 10.77.0.100/24.

A death is a power loss: SIGKILL of every process in the owner's namespace
and its link set down in the same instant.  Takeover time = from that
instant to the first echo reply the client gets from the VIP (the client
pings every 5 ms).  Both systems run with their defaults for a primary
and a backup (priority 200/100, preempt): after each trial the dead primary
is revived (its runtime files cleared, as a power cycle would), takes the
VIP back, and the next trial kills it again.

    python bench/failover.py [--quick] [--json] [--trials N] [--intervals 10,100,1000]

Needs root, iproute2 and (for the anchor) keepalived; says so and skips the
anchor if it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import percentile, report  # noqa: E402
from tests.support.cluster_lab import poll, vip_pair_config  # noqa: E402

VIP = "10.77.0.100"
ADDR = {"a": "10.77.0.1", "b": "10.77.0.2"}
PEER = {"a": "b", "b": "a"}




class System:
    """One HA implementation under test on a lab."""

    name = "?"

    def __init__(self, lab, workdir: Path, interval_ms: int):
        self.lab, self.workdir, self.interval_ms = lab, workdir, interval_ms
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, node: str):
        raise NotImplementedError

    def owner(self) -> str | None:
        """The one node holding the VIP (None if none or both)."""
        holders = [n for n in ("a", "b")
                   if any(str(a.ip) == VIP for a in self.lab.addresses(n))]
        return holders[0] if len(holders) == 1 else None

    def kill_box(self, node: str) -> float:
        """SIGKILL everything in the namespace and cut its link; return the instant."""
        ns = self.lab.nodes[node].ns
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
        t0 = time.time()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        self.lab.link_down(node)
        return t0

    def clear_runtime(self, node: str):
        """What a power cycle loses (pid files, addresses)."""

    def revive(self, node: str):
        proc = self.procs.pop(node, None)
        if proc is not None:
            proc.wait(timeout=10)
        self.clear_runtime(node)
        # A powered-off box loses its addresses: clear the VIP the kernel kept.
        self.lab.run(node, "ip", "addr", "del", f"{VIP}/24", "dev", "eth0", check=False)
        self.lab.link_up(node)
        self.start(node)

    def stop(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()


class Appliance(System):
    name = "appliance"

    def __init__(self, lab, workdir, interval_ms):
        super().__init__(lab, workdir, interval_ms)
        (workdir / "cluster.key").write_text("k" * 64 + "\n")

    def config(self, node: str) -> Path:
        path = self.workdir / f"node-{node}.toml"
        path.write_text(vip_pair_config(node, self.workdir, ADDR, f"{VIP}/24", vip_name="vip",
                                        interval_ms=self.interval_ms, preempt=True))
        return path

    def start(self, node: str):
        twistd = shutil.which("twistd") or "twistd"
        log = open(self.workdir / f"twistd-{node}.log", "a")
        self.procs[node] = self.lab.popen(node, twistd, "-n", "--pidfile=", "appliance", "-c",
                                          str(self.config(node)), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=str(self.workdir))


class Keepalived(System):
    name = "keepalived"

    def config(self, node: str) -> Path:
        path = self.workdir / f"keepalived-{node}.conf"
        advert = self.interval_ms / 1000.0
        path.write_text(f"""
global_defs {{
    router_id {node}
    vrrp_version 3
    script_user root
    enable_script_security
}}
vrrp_instance VI_1 {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {200 if node == 'a' else 100}
    advert_int {advert:g}
    unicast_src_ip {ADDR[node]}
    unicast_peer {{
        {ADDR[PEER[node]]}
    }}
    virtual_ipaddress {{
        {VIP}/24 dev eth0
    }}
}}
""")
        return path

    def clear_runtime(self, node: str):
        for pid in (self.workdir / node).glob("*.pid"):
            pid.unlink()

    def start(self, node: str):
        log = open(self.workdir / f"keepalived-{node}.log", "a")
        d = self.workdir / node
        d.mkdir(exist_ok=True)
        self.procs[node] = self.lab.popen(
            node, "keepalived", "-n", "-l", "-D", "-f", str(self.config(node)),
            "-p", str(d / "k.pid"), "-r", str(d / "v.pid"), "-c", str(d / "c.pid"),
            stdout=log, stderr=subprocess.STDOUT)


def client_ping_ok(lab) -> bool:
    return lab.run("client", "ping", "-c1", "-W1", VIP, check=False).returncode == 0


def trial(system: System, lab, workdir: Path, settle_s: float) -> float | None:
    owner = system.owner()
    if owner is None:
        return None
    mark = workdir / "mark"
    mark.unlink(missing_ok=True)
    interval_s = system.interval_ms / 1000.0
    duration = 8 + 6 * interval_s
    pinger = lab.popen("client", sys.executable, str(ROOT / "bench" / "pinger.py"), VIP,
                       "--interval-ms", "5", "--duration", str(duration),
                       "--mark-file", str(mark), stdout=subprocess.PIPE, text=True)
    time.sleep(settle_s)
    t0 = system.kill_box(owner)
    mark.write_text(repr(t0))
    out, _ = pinger.communicate(timeout=duration + 10)
    result = json.loads(out.strip().splitlines()[-1])
    system.revive(owner)
    # The revived primary takes the VIP back (preempt) before the next trial.
    poll(lambda: system.owner() == "a" and client_ping_ok(lab), 15 + 10 * interval_s)
    time.sleep(max(1.0, 4 * interval_s))
    return result["outage_ms"]


def run_system(cls, interval_ms: int, trials: int, log) -> list[float]:
    from tests.support.netns import Lab
    outages: list[float] = []
    with tempfile.TemporaryDirectory(prefix="apl-bench-") as tmp, Lab() as lab:
        lab.two_nodes_and_client()
        workdir = Path(tmp)
        system = cls(lab, workdir, interval_ms)
        try:
            system.start("a")
            poll(lambda: system.owner() == "a", 10)
            system.start("b")
            if not poll(lambda: system.owner() is not None and client_ping_ok(lab), 20):
                log(f"{system.name} interval={interval_ms}ms: VIP never came up")
                return outages
            time.sleep(max(1.0, 4 * interval_ms / 1000.0))
            for i in range(trials):
                outage = trial(system, lab, workdir, settle_s=0.3)
                log(f"  {system.name} interval={interval_ms}ms trial {i + 1}/{trials}: "
                    f"{'no reply' if outage is None else f'{outage:.1f} ms'}")
                if outage is not None:
                    outages.append(outage)
        finally:
            system.stop()
    return outages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 trials at 100 ms only")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--intervals", default="10,100,1000")
    args = ap.parse_args()
    # Killed from outside: unwind so every namespace and process is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    trials = 3 if args.quick else args.trials
    intervals = [100] if args.quick else [int(x) for x in args.intervals.split(",")]
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    if os.geteuid() != 0:
        print("failover bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    systems = [Appliance]
    if shutil.which("keepalived"):
        systems.append(Keepalived)
    else:
        log("keepalived not installed (apt-get install keepalived): anchor rows skipped")
    rows = []
    for interval in intervals:
        for cls in systems:
            outages = run_system(cls, interval, trials, log)
            case = f"interval={interval}ms"
            for metric, p in (("takeover_ms_p50", 50), ("takeover_ms_p95", 95)):
                value = percentile(outages, p)
                rows.append({"system": cls.name, "case": case, "metric": metric,
                             "value": None if value is None else round(value, 1), "unit": "ms",
                             "n": len(outages)})
    return report("failover", rows, args.json, extra=("n",))


if __name__ == "__main__":
    raise SystemExit(main())
