"""Failover benchmark: VIP takeover after a box's death, appliance vs keepalived.

Topology (network namespaces on one bridge, built and removed by the bench):
node a 10.77.0.1, node b 10.77.0.2, client 10.77.0.10; the VIP 10.77.0.100/24.

A death is a power loss: every process in the owner's namespace is frozen
(SIGSTOP: nothing more leaves, not even a dying daemon's goodbye -- a
keepalived VRRP child hit by its parent's death signal would send a
priority-0 advert and hand over at once), its link is set down, then
everything is killed.  Takeover time = from the freeze (T0: the last
heartbeat left before it) to the first echo reply the client gets from the
VIP *to an echo sent after the link was down* (T1; until then the dying
box's kernel still answers pings to the VIP: the old bench took the death
at T0 and counted those replies, so keepalived-254 showed a 21 ms p50 below
its 301 ms threshold).  The client pings every 1 ms.

Deaths are phase-matched (common random numbers): a sniffer in the
backup's namespace (AF_PACKET, kernel timestamps) times the owner's
heartbeats (appliance: UDP to the heartbeat port) or VRRP adverts
(keepalived), and trial i kills the owner ``u_i`` send periods after one
arrived, with one seeded sequence u_1..u_n (``FAILOVER_BENCH_SEED``,
default 11) for every row.  After the kill the sniffer gives the backup's
last beat: its measured age at the death, and the reaction = the takeover
counted from that beat minus the row's detection threshold (deadline ->
the VIP answering), split on the wire into deadline -> the backup's first
ARP announcement (GARP) and GARP -> its first echo reply.  A takeover
measured from the death is at least ``threshold - one send period``
(appliance: interval / beats_per_interval; keepalived: one advert): trials
below that floor are counted (``trials_below_floor``).  Both systems run
with their defaults for a primary and a backup (priority 200/100,
preempt): after each trial the dead primary is revived (its runtime files
cleared, as a power cycle would), takes the VIP back, and the next trial
kills it again.

Rows: takeover, reaction, deadline -> GARP, GARP -> reply and last-beat
age p50/p95 per heartbeat interval with each system's configured
detection threshold (appliance: dead_after x interval + the deadline's
slack, by default half a beat; keepalived: 3 x advert + skew, skew = (256 -
backup priority) / 256 x advert, so keepalived also runs with priorities
254/253 as ``keepalived-254``, near-zero skew); beside the appliance's
shipped-default row (3 beats per interval) an
``appliance-as-keepalived-254`` row that is NOT the shipped default: the
appliance with exactly keepalived-254's configuration (the same interval,
one beat per interval, dead_after 3 and ``deadline_slack_ms`` = its skew:
threshold 301.2 ms at 100 ms), so with the same u_i both have the same age
of the last beat and differ by their reactions alone: a paired per-trial
difference row (median) follows; ``--systems`` picks rows; spurious
takeovers per 10 minutes at 5/10/20 % random loss between
the nodes (nft, both ways, 100 ms; counted as rising edges of b holding the
VIP, polled every 20 ms, and from b's own log); a 30 s partition between the
nodes: milliseconds with two VIP owners (the appliance with a witness in a
third namespace; keepalived has none) and the time to a single owner after
the heal.

    python bench/failover.py [--quick] [--json] [--trials N] [--intervals 10,100,1000]
                             [--loss-seconds 120] [--partition-seconds 30] [--only takeover,loss,partition]
                             [--systems appliance,appliance-as-keepalived-254,keepalived-254]

Needs root, iproute2 and (for the anchor) keepalived; says so and skips the
anchor if it is missing.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import percentile, report  # noqa: E402
from tests.support.cluster_lab import poll, vip_pair_config, witness_config  # noqa: E402

VIP = "10.77.0.100"
ADDR = {"a": "10.77.0.1", "b": "10.77.0.2"}
PEER = {"a": "b", "b": "a"}




W_ADDR = "10.77.0.3"
SEED = int(os.environ.get("FAILOVER_BENCH_SEED", "11"))    # the death phases u_i
DEAD_AFTER = 3
BEATS = 3                  # the appliance's default beats_per_interval
HB_PORT = 8741             # the appliance's default heartbeat_port
PING_MS = 1.0              # the client's echo period (the takeover's resolution)


def death_phases(trials: int) -> list[float]:
    """The same seeded u_1..u_n in [0, 1) for every row (common random numbers):
    trial i kills the owner u_i send periods after a beat arrived at the backup."""
    rng = random.Random(SEED)
    return [rng.random() for _ in range(trials)]


_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
SO_TIMESTAMPNS = 35
ETH_P_IP = 0x0800
ETH_P_ALL = 0x0003
ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4


class BeatSniffer:
    """When the owner's heartbeats (UDP to the heartbeat port) or VRRP adverts
    (IP protocol 112) arrive at the backup: an AF_PACKET socket opened inside
    the backup's namespace (setns of this thread and back), kernel receive
    timestamps (wall clock, as the pinger's), read by a thread.  The bench
    kills the owner at a chosen phase after a beat and, after the kill, takes
    the last beat the backup heard: the age of its liveness evidence at the
    death, measured, not assumed.  It also notes when the backup sent its
    first ARP announcement of the VIP (the GARP) and its first echo reply
    from the VIP: the reaction split into the node's part (deadline ->
    GARP on the wire) and the client's (GARP -> an echo answered)."""

    def __init__(self, lab, node: str, src: str, match: tuple[str, int]):
        self.src, self.match = socket.inet_aton(src), match
        self.vip = socket.inet_aton(VIP)
        self.arrivals: collections.deque[float] = collections.deque(maxlen=4096)
        self.garps: list[float] = []          # ARP frames sent with the VIP as sender
        self.replies: list[float] = []        # echo replies sent from the VIP
        self.cond = threading.Condition()
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{lab.nodes[node].ns}", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the backup's namespace")
            try:
                self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM,
                                          socket.htons(ETH_P_ALL))
                self.sock.bind(("eth0", ETH_P_ALL))
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(target)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _wanted(self, pkt: bytes) -> bool:
        if len(pkt) < 20 or pkt[12:16] != self.src:
            return False
        kind, value = self.match
        if kind == "proto":
            return pkt[9] == value
        ihl = (pkt[0] & 0x0F) * 4
        return pkt[9] == 17 and len(pkt) >= ihl + 4 and struct.unpack(
            "!H", pkt[ihl + 2:ihl + 4])[0] == value

    def _read(self):
        while self.running:
            try:
                pkt, anc, _, addr = self.sock.recvmsg(2048, 64)
            except (socket.timeout, OSError):
                continue
            proto, outgoing = addr[1], addr[2] == PACKET_OUTGOING
            kind = None
            if not outgoing and proto == ETH_P_IP and self._wanted(pkt):
                kind = "beat"
            elif outgoing and proto == ETH_P_ARP and len(pkt) >= 18 and pkt[14:18] == self.vip:
                kind = "garp"
            elif (outgoing and proto == ETH_P_IP and len(pkt) >= 21 and pkt[9] == 1
                  and pkt[12:16] == self.vip and pkt[(pkt[0] & 0x0F) * 4] == 0):
                kind = "reply"
            if kind is None:
                continue
            at = time.time()
            for level, k, data in anc:
                if level == socket.SOL_SOCKET and k == SO_TIMESTAMPNS and len(data) >= 16:
                    sec, nsec = struct.unpack("qq", data[:16])
                    at = sec + nsec / 1e9
            with self.cond:
                if kind == "beat":
                    self.arrivals.append(at)
                    self.cond.notify_all()
                elif kind == "garp":
                    self.garps.append(at)
                else:
                    self.replies.append(at)

    def first_after(self, kind: str, t: float) -> float | None:
        with self.cond:
            return next((a for a in (self.garps if kind == "garp" else self.replies) if a > t),
                        None)

    def next_beat(self, after: float, timeout: float) -> float | None:
        """The first arrival later than ``after`` (waits up to ``timeout`` s)."""
        end = time.time() + timeout
        with self.cond:
            while not (self.arrivals and self.arrivals[-1] > after):
                left = end - time.time()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return next(a for a in self.arrivals if a > after)

    def last(self) -> float | None:
        with self.cond:
            return self.arrivals[-1] if self.arrivals else None

    def close(self):
        self.running = False
        self.thread.join(timeout=1)
        self.sock.close()


def sleep_until(t: float):
    """Sleep to within a millisecond of ``t``, then spin to it."""
    left = t - time.time()
    if left > 0.002:
        time.sleep(left - 0.0015)
    while time.time() < t:
        pass


class System:
    """One HA implementation under test on a lab."""

    name = "?"

    def __init__(self, lab, workdir: Path, interval_ms: int, witness: bool = False):
        self.lab, self.workdir, self.interval_ms = lab, workdir, interval_ms
        self.witness = witness
        self.procs: dict[str, subprocess.Popen] = {}

    def detection_threshold_ms(self) -> float:
        raise NotImplementedError

    def became_master(self, node: str) -> int:
        """How often ``node`` took over, from its own log."""
        return 0

    def start(self, node: str):
        raise NotImplementedError

    def ready(self, node: str) -> bool:
        """``node`` runs and hears its peer: a backup that can take over now."""
        return True

    def owner(self) -> str | None:
        """The one node holding the VIP (None if none or both)."""
        holders = [n for n in ("a", "b")
                   if any(str(a.ip) == VIP for a in self.lab.addresses(n))]
        return holders[0] if len(holders) == 1 else None

    def beat_match(self) -> tuple[str, int]:
        """What the owner's liveness packets look like (BeatSniffer)."""
        raise NotImplementedError

    def box_pids(self, node: str) -> list[str]:
        ns = self.lab.nodes[node].ns
        return subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                              text=True).stdout.split()

    def kill_box(self, node: str, pids: list[str] | None = None,
                 at: float | None = None) -> tuple[float, float]:
        """Freeze everything in the namespace (``pids``, listed beforehand so
        the freeze falls at ``at``), cut its link, kill it all; return (freeze
        instant T0, link-down instant T1)."""
        if pids is None:
            pids = self.box_pids(node)
        if at is not None:
            sleep_until(at)
        t0 = time.time()
        for sig in (signal.SIGSTOP, None, signal.SIGKILL):
            if sig is None:
                self.lab.link_down(node)
                t1 = time.time()
                continue
            for pid in pids:
                try:
                    os.kill(int(pid), sig)
                except (ProcessLookupError, ValueError):
                    pass
        return t0, t1

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
    beats = BEATS              # beats_per_interval (BEATS: the shipped default, not written)
    slack_ms: float | None = None   # deadline_slack_ms (None: the default, half a beat)

    def __init__(self, lab, workdir, interval_ms, witness=False):
        super().__init__(lab, workdir, interval_ms, witness)
        (workdir / "cluster.key").write_text("k" * 64 + "\n")

    @classmethod
    def run_interval_ms(cls, interval_ms: int) -> int:
        """The heartbeat interval this row runs with for the case ``interval_ms``."""
        return interval_ms

    def slack(self) -> float:
        """The deadline's slack in ms (the default: half a beat period)."""
        return self.interval_ms / self.beats / 2 if self.slack_ms is None else self.slack_ms

    def detection_threshold_ms(self) -> float:
        return round(self.interval_ms * DEAD_AFTER + self.slack(), 1)

    def send_period_ms(self) -> float:
        return self.interval_ms / self.beats

    def beat_match(self):
        return ("udp", HB_PORT)

    def config(self, node: str) -> Path:
        path = self.workdir / f"node-{node}.toml"
        if node == "w":
            path.write_text(witness_config("w", self.workdir, W_ADDR, ADDR,
                                           interval_ms=self.interval_ms))
        else:
            text = vip_pair_config(node, self.workdir, ADDR, f"{VIP}/24", vip_name="vip",
                                   interval_ms=self.interval_ms, preempt=True,
                                   witness=("w", W_ADDR) if self.witness else None)
            extra = ""
            if self.beats != BEATS:
                extra += f"beats_per_interval = {self.beats}\n"
            if self.slack_ms is not None:
                extra += f"deadline_slack_ms = {self.slack_ms!r}\n"
            text = text.replace(f"dead_after = {DEAD_AFTER}\n", f"dead_after = {DEAD_AFTER}\n{extra}")
            path.write_text(text)
        return path

    def became_master(self, node: str) -> int:
        log = self.workdir / f"twistd-{node}.log"
        return log.read_text().count("is now owner") if log.exists() else 0

    def ready(self, node: str) -> bool:
        out = self.lab.run(node, sys.executable, "-m", "appliance.admin.ctl", "--url",
                           "http://127.0.0.1:8740/rpc", "--token-file",
                           f"{self.workdir}/state-{node}/admin.token", "--json", "call",
                           "cluster.status", check=False)
        try:
            peer = json.loads(out.stdout)["peers"][PEER[node]]
        except (ValueError, KeyError, TypeError):
            return False
        return bool(peer.get("alive"))

    def start(self, node: str):
        twistd = shutil.which("twistd") or "twistd"
        log = open(self.workdir / f"twistd-{node}.log", "a")
        from tests.support.node_process import env_with_dropins
        # the appliance's twistd plugin from this tree (an editable install may hide it)
        self.procs[node] = self.lab.popen(node, twistd, "-n", "--pidfile=", "appliance", "-c",
                                          str(self.config(node)), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=str(self.workdir),
                                          env=env_with_dropins())


class ApplianceAsKeepalived254(Appliance):
    """NOT the shipped default: the appliance with exactly keepalived-254's
    configuration -- the same interval (advert_int), one beat per interval (one
    advert), dead_after 3 (3 adverts) and ``deadline_slack_ms`` = keepalived's
    skew time at priority 253, (256 - 253) / 256 x interval (1.17 ms at
    100 ms): the same detection threshold (301.2 ms) from the same send
    period, so the same death phase u_i gives both the same age of the last
    beat and the rows differ only by their reaction.  The shipped-default row
    (3 beats per interval, half a beat of slack) stays beside it."""

    name = "appliance-as-keepalived-254"
    beats = 1

    def __init__(self, lab, workdir, interval_ms, witness=False):
        super().__init__(lab, workdir, interval_ms, witness)
        self.slack_ms = self.slack()

    def slack(self) -> float:
        return (256 - Keepalived254.priorities["b"]) / 256 * self.interval_ms


class Keepalived(System):
    name = "keepalived"
    priorities = {"a": 200, "b": 100}

    @classmethod
    def run_interval_ms(cls, interval_ms: int) -> int:
        return interval_ms

    def detection_threshold_ms(self) -> float:
        advert = float(self.interval_ms)
        skew = (256 - self.priorities["b"]) / 256 * advert
        return round(3 * advert + skew, 1)

    def send_period_ms(self) -> float:
        return float(self.interval_ms)

    def beat_match(self):
        return ("proto", 112)

    def became_master(self, node: str) -> int:
        log = self.workdir / f"keepalived-{node}.log"
        return log.read_text().count("Entering MASTER STATE") if log.exists() else 0

    def ready(self, node: str) -> bool:
        log = self.workdir / f"keepalived-{node}.log"
        return log.exists() and "Entering BACKUP STATE" in log.read_text()

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
    priority {self.priorities[node]}
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


class Keepalived254(Keepalived):
    """keepalived with priorities 254/253: skew_time about 0.01 x advert, so its
    detection threshold is the appliance's (3 adverts)."""

    name = "keepalived-254"
    priorities = {"a": 254, "b": 253}


def client_ping_ok(lab) -> bool:
    return lab.run("client", "ping", "-c1", "-W1", VIP, check=False).returncode == 0


def trial(system: System, lab, workdir: Path, settle_s: float, u: float) -> dict | None:
    """Kill the owner ``u`` send periods after one of its beats arrived at the
    backup; the takeover (death -> first reply from the VIP to an echo sent
    after the link was down), the age of the backup's last beat at the death
    and the reaction (the takeover counted from that beat, minus the
    detection threshold: deadline -> the VIP answering)."""
    owner = system.owner()
    if owner is None or not poll(lambda: holders(lab) == [owner], 10):
        return None                 # no owner, or two: nothing to time
    # The backup must be up and hear the owner: trial 1 started while b was
    # still starting (twistd takes seconds on the busy box) and timed its start.
    if not poll(lambda: system.ready(PEER[owner]), 20, step=0.2):
        return None
    mark = workdir / "mark"
    mark.unlink(missing_ok=True)
    interval_s = system.interval_ms / 1000.0
    period = system.send_period_ms() / 1000.0
    duration = 8 + 6 * interval_s
    sniffer = BeatSniffer(lab, PEER[owner], ADDR[owner], system.beat_match())
    try:
        pinger = lab.popen("client", sys.executable, str(ROOT / "bench" / "pinger.py"), VIP,
                           "--interval-ms", f"{PING_MS:g}", "--duration", str(duration),
                           "--mark-file", str(mark), stdout=subprocess.PIPE, text=True)
        time.sleep(settle_s)
        pids = system.box_pids(owner)
        # The death phase: u_i of one seeded sequence, the same for every row
        # (common random numbers), counted from a beat's arrival at the
        # backup; too close to act on -> from the next beat (predicted one
        # period on; the age is measured below either way).
        beat = sniffer.next_beat(time.time(), timeout=2.0)
        if beat is None:
            pinger.kill()
            pinger.wait()
            return None
        at = beat + u * period
        while at < time.time() + 0.002:
            at += period
        t0, t1 = system.kill_box(owner, pids, at=at)
        tmp = mark.with_suffix(".tmp")
        tmp.write_text(f"{t0!r} {t1!r}")
        tmp.replace(mark)                # the pinger never reads half a mark
        out, _ = pinger.communicate(timeout=duration + 10)
        last = sniffer.last()
        garp = sniffer.first_after("garp", t0)
        reply = sniffer.first_after("reply", t0)
    finally:
        sniffer.close()
    result = json.loads(out.strip().splitlines()[-1])
    system.revive(owner)
    # The revived primary takes the VIP back (preempt) before the next trial.
    poll(lambda: system.owner() == "a" and client_ping_ok(lab), 15 + 10 * interval_s)
    time.sleep(max(1.0, 4 * interval_s))
    if result["outage_ms"] is None:
        return None
    threshold = system.detection_threshold_ms()
    from_beat = (result["first_reply_after"] - last) * 1000
    deadline = last + threshold / 1000
    return {"u": round(u, 4), "outage_ms": result["outage_ms"],
            "age_ms": round((t0 - last) * 1000, 2),
            "target_age_ms": round(u * period * 1000, 2),
            "from_last_beat_ms": round(from_beat, 2),
            "reaction_ms": round(from_beat - threshold, 2),
            # the reaction's parts: deadline -> the backup's first GARP on
            # the wire (the node); GARP -> its first echo reply (the client)
            "garp_ms": None if garp is None else round((garp - deadline) * 1000, 2),
            "garp_to_reply_ms": None if garp is None or reply is None
            else round((reply - garp) * 1000, 2)}


def run_system(cls, interval_ms: int, trials: int, log) -> list[dict | None]:
    """One row: ``trials`` kills at the phases death_phases(trials); a list
    indexed by trial (None: no reply timed)."""
    from tests.support.netns import Lab
    interval_ms = cls.run_interval_ms(interval_ms)
    results: list[dict | None] = []
    phases = death_phases(trials)
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
                return results
            time.sleep(max(1.0, 4 * interval_ms / 1000.0))
            # One holder, the primary, before the first trial: a backup that never
            # heard the primary holds the VIP too, and "killing the owner" would
            # then time the client's ARP, not a takeover (seen at the start of
            # several runs: outages of 0.7-2.9 s in trial 1 on a busy box).
            if not poll(lambda: holders(lab) == ["a"], 20):
                log(f"{system.name} interval={interval_ms}ms: the VIP is held by "
                    f"{holders(lab) or 'nobody'} before the first trial, not by a alone "
                    "(the nodes do not hear each other); no trials")
                return results
            for i, u in enumerate(phases):
                r = trial(system, lab, workdir, settle_s=0.3, u=u)
                log(f"  {system.name} interval={interval_ms}ms trial {i + 1}/{trials}: "
                    + ("no reply" if r is None else
                       f"{r['outage_ms']:.1f} ms (u {r['u']:.3f}: age {r['age_ms']:.1f} ms, "
                       f"target {r['target_age_ms']:.1f}; from the last beat "
                       f"{r['from_last_beat_ms']:.1f} ms, reaction {r['reaction_ms']:.1f} ms: "
                       f"GARP at deadline+{r['garp_ms']} ms, reply {r['garp_to_reply_ms']} ms "
                       f"later) at {time.strftime('%H:%M:%S', time.gmtime())}"))
                results.append(r)
        finally:
            system.stop()
    return results


def takeover_rows(cls, interval: int, results: list[dict | None], log) -> list[dict]:
    """p50/p95 of the takeover (from the death), of the reaction (deadline -> the
    VIP answering) and of the measured age of the last beat; threshold; floor."""
    done = [r for r in results if r is not None]
    outages = [r["outage_ms"] for r in done]
    case = f"interval={interval}ms"
    probe = object.__new__(cls)      # no lab, no files: thresholds only
    probe.interval_ms = cls.run_interval_ms(interval)
    if cls is ApplianceAsKeepalived254:
        case += (f" (1 beat, slack {probe.slack():.3g} ms: keepalived-254's config, "
                 "not the default)")
    threshold = probe.detection_threshold_ms()
    floor = round(threshold - probe.send_period_ms(), 1)
    below = sum(1 for o in outages if o < floor)
    log(f"{cls.name} {case}: detection threshold {threshold} ms after the last beat (floor "
        f"from the death {floor} ms), outages {sorted(outages)}, {below} below the floor; "
        f"reactions {sorted(r['reaction_ms'] for r in done)}")
    rows = []
    for name, values in (("takeover_ms", outages),
                         ("reaction_ms", [r["reaction_ms"] for r in done]),
                         ("deadline_to_garp_ms", [r["garp_ms"] for r in done
                                                  if r["garp_ms"] is not None]),
                         ("garp_to_reply_ms", [r["garp_to_reply_ms"] for r in done
                                               if r["garp_to_reply_ms"] is not None]),
                         ("last_beat_age_ms", [r["age_ms"] for r in done])):
        for p in (50, 95):
            value = percentile(values, p)
            rows.append({"system": cls.name, "case": case, "metric": f"{name}_p{p}",
                         "value": None if value is None else round(value, 1),
                         "unit": "ms", "n": len(values)})
    rows.append({"system": cls.name, "case": case, "metric": "detection_threshold_ms",
                 "value": threshold, "unit": "ms", "n": 1})
    rows.append({"system": cls.name, "case": case, "metric": "trials_below_floor",
                 "value": below, "unit": "count", "n": len(outages)})
    return rows


def paired_rows(per_trial: dict[str, list], interval: int, log) -> list[dict]:
    """appliance-as-keepalived-254 minus keepalived-254, trial by trial (the same
    u_i: the same death phase of the same send period): the median difference of
    the takeover and of the reaction."""
    a = per_trial.get(ApplianceAsKeepalived254.name)
    k = per_trial.get(Keepalived254.name)
    if not a or not k:
        return []
    pairs = [(x, y) for x, y in zip(a, k) if x is not None and y is not None]
    rows = []
    for name in ("outage_ms", "reaction_ms", "garp_ms", "age_ms"):
        diffs = [x[name] - y[name] for x, y in pairs
                 if x[name] is not None and y[name] is not None]
        value = percentile(diffs, 50)
        log(f"paired {ApplianceAsKeepalived254.name} - {Keepalived254.name} {name}: "
            f"median {value} ms over {len(diffs)} trials, {sorted(round(d, 1) for d in diffs)}")
        rows.append({"system": f"{ApplianceAsKeepalived254.name} - {Keepalived254.name}",
                     "case": f"interval={interval}ms, paired by trial",
                     "metric": f"{name.replace('outage', 'takeover')}_diff_p50",
                     "value": None if value is None else round(value, 1), "unit": "ms",
                     "n": len(diffs)})
    return rows


def holders(lab) -> list[str]:
    return [n for n in ("a", "b") if any(str(a.ip) == VIP for a in lab.addresses(n))]


def _pair(cls, lab, workdir, interval_ms, witness=False, log=print):
    system = cls(lab, workdir, interval_ms, witness)
    if witness:
        lab.add_node("w", f"{W_ADDR}/24")
        system.start("w")
    system.start("a")
    poll(lambda: system.owner() == "a", 10)
    system.start("b")
    if not poll(lambda: system.owner() == "a" and client_ping_ok(lab), 20):
        log(f"{system.name}: VIP never came up on a")
        system.stop()
        return None
    time.sleep(2.0)
    return system


def run_loss(cls, percent: int, seconds: float, log) -> float | None:
    """Spurious takeovers per 10 minutes at ``percent`` loss between a and b."""
    from tests.support.netns import Lab
    with tempfile.TemporaryDirectory(prefix="apl-bench-") as tmp, Lab() as lab:
        lab.two_nodes_and_client()
        system = _pair(cls, lab, Path(tmp), 100, log=log)
        if system is None:
            return None
        try:
            before = system.became_master("b")
            lab.drop_between("b", ADDR["a"], percent=percent)
            edges, had_b = 0, False
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                has_b = "b" in holders(lab)
                edges += has_b and not had_b
                had_b = has_b
                time.sleep(0.02)
            dropped = lab.dropped("b", ADDR["a"])
            lab.undrop("b", ADDR["a"])
            from_log = system.became_master("b") - before
            count = max(edges, from_log)
            log(f"  {system.name} loss={percent}%: {seconds:g}s, {dropped} packets dropped, "
                f"takeovers {count} (VIP edges {edges}, log {from_log})")
            return round(count * 600.0 / seconds, 2)
        finally:
            system.stop()


def run_partition(cls, seconds: float, witness: bool, log) -> tuple[float, float] | None:
    """(milliseconds with two VIP owners, ms from the heal to a single owner)."""
    from tests.support.netns import Lab
    with tempfile.TemporaryDirectory(prefix="apl-bench-") as tmp, Lab() as lab:
        lab.two_nodes_and_client()
        system = _pair(cls, lab, Path(tmp), 100, witness=witness, log=log)
        if system is None:
            return None
        try:
            lab.drop_between("a", ADDR["b"])
            dual_s, last = 0.0, time.monotonic()
            end = last + seconds
            while time.monotonic() < end:
                both = len(holders(lab)) > 1
                now = time.monotonic()
                if both:
                    dual_s += now - last
                last = now
                time.sleep(0.01)
            lab.undrop("a", ADDR["b"])
            healed = time.monotonic()
            single = None
            while time.monotonic() < healed + 10:
                if len(holders(lab)) == 1:
                    single = (time.monotonic() - healed) * 1000
                    break
                time.sleep(0.005)
            log(f"  {system.name}{' + witness' if witness else ''} partition {seconds:g}s: "
                f"two owners for {dual_s * 1000:.0f} ms; single owner {single} ms after heal")
            return round(dual_s * 1000, 1), None if single is None else round(single, 1)
        finally:
            system.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 trials at 100 ms only")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--intervals", default="10,100,1000")
    ap.add_argument("--loss-seconds", type=float, default=120.0,
                    help="seconds per loss level (rows are scaled to 10 minutes)")
    ap.add_argument("--partition-seconds", type=float, default=30.0)
    ap.add_argument("--only", default="takeover,loss,partition")
    ap.add_argument("--systems", default="",
                    help="takeover rows only for these systems (comma-separated names; "
                         "default all: appliance, appliance-as-keepalived-254, keepalived, "
                         "keepalived-254)")
    args = ap.parse_args()
    parts = set(args.only.split(","))
    # Killed from outside: unwind so every namespace and process is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    trials = 3 if args.quick else args.trials
    intervals = [100] if args.quick else [int(x) for x in args.intervals.split(",")]
    log = (lambda m: print(m, file=sys.stderr, flush=True))
    if os.geteuid() != 0:
        print("failover bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    systems = [Appliance]
    anchors = []
    same_config = [ApplianceAsKeepalived254]
    if shutil.which("keepalived"):
        anchors = [Keepalived, Keepalived254]
    else:
        log("keepalived not installed (apt-get install keepalived): anchor rows skipped")
    rows = []
    if "takeover" in parts:
        wanted = set(filter(None, args.systems.split(",")))
        for interval in intervals:
            per_trial: dict[str, list] = {}
            # interleaved per system so both see the same box load in one run
            for cls in systems + same_config * bool(anchors) + anchors:
                if wanted and cls.name not in wanted:
                    continue
                results = run_system(cls, interval, trials, log)
                per_trial[cls.name] = results
                rows.extend(takeover_rows(cls, interval, results, log))
            rows.extend(paired_rows(per_trial, interval, log))
    loss_seconds = 20.0 if args.quick else args.loss_seconds
    if "loss" in parts:
        for percent in (5, 10, 20):
            for cls in systems + anchors[:1]:
                value = run_loss(cls, percent, loss_seconds, log)
                rows.append({"system": cls.name, "case": f"loss={percent}%",
                             "metric": "spurious_takeovers_per_10min", "value": value,
                             "unit": "count", "n": round(loss_seconds)})
    part_seconds = 10.0 if args.quick else args.partition_seconds
    if "partition" in parts:
        for cls, witness in [(Appliance, True)] + [(a, False) for a in anchors[:1]]:
            result = run_partition(cls, part_seconds, witness, log)
            name = cls.name + (" (witness)" if witness else "")
            dual, single = result if result else (None, None)
            case = f"partition-{part_seconds:g}s"
            rows.append({"system": name, "case": case, "metric": "dual_owner_ms",
                         "value": dual, "unit": "ms", "n": 1})
            rows.append({"system": name, "case": case, "metric": "single_owner_after_heal_ms",
                         "value": single, "unit": "ms", "n": 1})
    return report("failover", rows, args.json, extra=("n",))


if __name__ == "__main__":
    raise SystemExit(main())
