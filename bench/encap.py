"""Encapsulation failover benchmark: the encap service (DN pair + appliance-en) beside
the BIRD 2 OSPF baseline and the thesis's published figures, and tunnel throughput
vs OpenVPN, on namespaces.

Topology (tests/support/encap_lab.py): en, dn1, dn2, esr, server behind the ESR.
How the ESR reaches the DN serving an EN (one lab per case and mode):

* ``appliance``: the appliance's ``esr`` route agent in the esr namespace follows the
  EN-DN mapping table (a Redis shared by the DNs and the ESR) and installs one route
  per slice / taken-over EN via its DN, event-driven.
* ``bird2-ospf`` (the thesis's setup, the baseline): static routes at the ESR to each
  DN's home subnet; a takeover's /32 kernel route on the DN is learned by BIRD 2
  there (etc/bird/dn.conf, BIRD's default kernel scan time -- 60 s in BIRD 2, plus
  its netlink notifications on Linux) and carried by OSPF to BIRD on the ESR
  (etc/bird/esr.conf: hello 1 s, SPF tick 1 s).  Kills are spaced so that the EN's
  /32 is gone at the ESR and OSPF's MinLSInterval (5 s) has passed.
* ``appliance-l2`` (``--routing l2``): no routing protocol: the ESR routes the EN
  subnets on-link and the DNs answer ARP for their ENs (proxy ARP + gratuitous ARP).

A DN failure is a power loss: SIGKILL of the EN's home (primary) DN and its link set
down in the same instant, during an ICMP echo stream from the EN to the server at a
fixed rate (``Stream``: a raw-socket sender that keeps its rate whether replies come
or not -- iputils ``ping -i 0.01`` slows down while replies are missing, ~60 instead
of 100 echoes/s into a black hole, so figures taken with it before 2026-12-04 12:50
undercounted every outage); outage = lost echoes x interval (the thesis's "ms of lost
packets").  A kill starts from the steady state read from the EN's own status (on its
home DN, confirmed, no soft handoff under way) and its stream ends on the exact
conditions of the new path (the EN switched and confirmed, the ESR routes the EN's
address via the survivor) plus a short tail, not after fixed sleeps.  Then the DN is
revived during another stream, the EN moves back home (confirmed, the ESR's route
home) and the echoes lost to that move are counted too.

Cases: ``lan``/``man``/``wan`` (0 / 10 / 100 ms one-way EN-DN delay) at 100 packets/s
(and ``lan`` at 10 packets/s), each without (``lan-100pps``) and with soft handoff
(``soft-lan-100pps``, the shipped default); ``lan-100pps-loss5``/``-loss10``: 5 / 10 %
random loss each way on the EN's underlay (nft), soft handoff on; the outage is net of
the background echo loss measured first, and EN switches with both DNs alive are
counted; every case counts its ``false_switches`` (EN failovers beyond one per kill,
over the kills and the moves home).  EN detection: keepalive 20 ms while data flows
(50 ms idle) x dead_after 4, and while data flows a probe burst -- started when data
went to the primary and nothing came back within its echo RTO, or by the 20 ms tick's
probe -- of dead_after overlapping probes (half a probe timeout apart), the DN dead when
the last has waited its RTO (srtt + 4 rttvar, at least 10 ms) with no record back
(shipped defaults); ``en_switch_ms_p50``: kill -> the EN's switch.  ``man``/``wan``: the EN reaches the DNs through a userspace UDP
relay in its namespace that holds every datagram 10 / 100 ms each way (no netem here).
Download: a 60 MB HTTP GET (python http.server) from the server; the EN's primary DN
dies when 40 % has arrived; penalty = median time with the death - median without.
``openvpn-2remotes``: what a user does today (issue 15): OpenVPN 2.6 with a server
on each DN and a client with two ``remote``s, ``ping 1``/``ping-restart 3``, the
address kept by ``ifconfig-push`` and routed at the ESR by ``learn-address``; same
kill, same echo stream.
Throughput: iperf3 TCP (EN -> server, 5 s) and UDP (1200-byte datagrams, offered
as fast as iperf3 can) through one DN, then the same through OpenVPN 2.6 (UDP,
AES-256-GCM, one server in dn1, TLS with EC P-256 certificates).

    python bench/encap.py [--quick] [--json] [--kills N] [--kills-other N] [--kills-bird N]
                          [--kills-bird-other N] [--kills-openvpn N] [--routing esr,bird,l2] [--cases a,b]
                          [--only outage,openvpn-failover,download,throughput]

Needs root, iproute2, ping (iputils), redis-server, bird2, iperf3 and openvpn
(installed with apt-get if missing; a missing anchor is said and skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.report import percentile, report  # noqa: E402

#: The thesis's published figures (the anchor to beat, issue 15).
THESIS = [
    {"system": "thesis", "case": "lan-100pps", "metric": "outage_ms_published_low", "value": 200,
     "unit": "ms", "note": "200 ms - 1 s of loss per DN failure at 10-100 packets/s"},
    {"system": "thesis", "case": "lan-100pps", "metric": "outage_ms_published_high", "value": 1000,
     "unit": "ms", "note": "limited by BIRD's 1 s kernel scan, EN detection, TCP"},
    {"system": "thesis", "case": "lan-10pps", "metric": "outage_ms_published_low", "value": 200,
     "unit": "ms", "note": ""},
    {"system": "thesis", "case": "lan-10pps", "metric": "outage_ms_published_high", "value": 1000,
     "unit": "ms", "note": ""},
    {"system": "thesis", "case": "throughput", "metric": "pps", "value": 215, "unit": "packets/s",
     "note": "its DN saturated a CPU at ~215 packets/s (hardware of the time)"},
    {"system": "openvpn-2remotes-issue", "case": "lan-100pps", "metric": "outage_ms_p50",
     "value": 7500, "unit": "ms",
     "note": "issue 15's own measurement (ping 1/ping-restart 3, 10 trials)"},
]

SERVER = "10.210.0.10"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure(binary: str, package: str) -> str | None:
    path = shutil.which(binary)
    if path:
        return path
    log(f"{binary} missing: apt-get install {package} ...")
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                    "-o", "DPkg::Lock::Timeout=600", package],
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                   capture_output=True, timeout=600)
    return shutil.which(binary)


RELAY = r"""
import heapq, select, socket, sys, time
delay = float(sys.argv[1])
pairs = []                                   # (socket facing the EN, socket facing the DN, DN)
for spec in sys.argv[2:]:
    port, host = spec.split("=")
    en_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    en_side.bind(("127.0.0.1", int(port)))
    dn_side = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dn_side.bind(("0.0.0.0", 0))
    pairs.append([en_side, dn_side, (host, 7400), None])
by_sock = {}
for p in pairs:
    by_sock[p[0]] = (p, True)
    by_sock[p[1]] = (p, False)
queue, n = [], 0
print("ready", flush=True)
while True:
    timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else 1.0
    for s in select.select(list(by_sock), [], [], timeout)[0]:
        try:
            data, addr = s.recvfrom(65535)
        except OSError:
            continue
        p, from_en = by_sock[s]
        if from_en:
            p[3] = addr
            dest = (p[1], p[2])
        elif p[3] is not None:
            dest = (p[0], p[3])
        else:
            continue
        n += 1
        heapq.heappush(queue, (time.monotonic() + delay, n, dest, data))
    now = time.monotonic()
    while queue and queue[0][0] <= now:
        _, _, (sock, addr), data = heapq.heappop(queue)
        try:
            sock.sendto(data, addr)
        except OSError:
            pass
"""


#: between kills in the bird rows: OSPF's MinLSInterval (5 s) plus a margin
BIRD_SETTLE_S = 5.5
#: routing mode of tests.support.encap_lab -> the system name of its rows
SYSTEMS = {"esr": "appliance", "l2": "appliance-l2", "bird": "bird2-ospf"}
ROUTING_NOTE = {
    "esr": "ESR routes by the esr agent (mapping table on a shared Redis)",
    "l2": "ESR on-link, DNs answer ARP + gratuitous ARP (L2 announce mode)",
    "bird": "DN /32 kernel route -> BIRD 2 -> OSPF -> BIRD on the ESR (etc/bird, default "
            "kernel scan time: BIRD 2's 60 s scan plus netlink notifications; OSPF hello 1 s, "
            "ESR tick 1 s)",
}


def wait_ping(lab, timeout: float = 30.0) -> None:
    """Until one echo comes back through the tunnel (the ESR's route is in)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.run("en", "ping", "-n", "-c", "1", "-W", "1", SERVER,
                   check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError(f"no echo through the tunnel within {timeout} s")


def outage_case(case: str, pps: int, soft: bool, kills: int, work: Path,
                delay_ms: float = 0.0, loss_pct: int = 0, routing: str = "esr",
                stop_at: float | None = None) -> list[dict]:
    from tests.support.encap_lab import EncapLab
    from tests.support.netns import Lab
    rows: list[dict] = []
    outages, moveback, info = [], [], {"detect": []}
    system = SYSTEMS[routing]
    with Lab() as lab:
        endpoints = None
        if delay_ms:
            # the EN reaches the DNs through a userspace relay holding every datagram
            # delay_ms in each direction (this kernel has no netem)
            endpoints = {"dn1": ("127.0.0.1", 17401), "dn2": ("127.0.0.1", 17402)}
        el = EncapLab(lab, work / f"{system}-{case}", soft_handoff=soft, dn_endpoints=endpoints,
                      routing=routing).build()
        try:
            _outage_runs(lab, el, pps, kills, delay_ms, loss_pct, f"{system} {case}",
                         routing, outages, moveback, info, stop_at)
        except Exception as e:        # one case going wrong does not lose the others
            info["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            log(f"{system} {case}: stopped after {len(outages)} kills: {info['error']}\n"
                f"{str(e)[:4000]}")
        finally:
            el.close()
    background, spurious = info.get("background", 0.0), info.get("spurious")
    for metric, p in (("outage_ms_p50", 50), ("outage_ms_p95", 95)):
        rows.append({"system": system, "case": case, "metric": metric,
                     "value": percentile(outages, p), "unit": "ms",
                     "note": f"{len(outages)} kills; soft_handoff={'on' if soft else 'off'}; "
                             + (f"STOPPED EARLY ({info['error']}); " if "error" in info else "")
                             + (f"{info['cut']}; " if "cut" in info else "")
                             + f"{ROUTING_NOTE[routing]}; "
                             "EN keepalive 20 ms while active (50 ms idle) x 4; while "
                             "active a probe burst (started by unanswered data or the "
                             "tick): 4 overlapping probes, each awaited its RTO "
                             "srtt+4rttvar (>= 10 ms)"
                             + (f"; {delay_ms:g} ms one-way EN-DN (relay)" if delay_ms else "")
                             + (f"; {loss_pct}% underlay loss each way, outage net of the "
                                f"{background:.1%} background echo loss" if loss_pct else "")})
    rows.append({"system": system, "case": case, "metric": "outage_ms_max",
                 "value": max(outages) if outages else None, "unit": "ms", "note": ""})
    if info["detect"]:
        rows.append({"system": system, "case": case, "metric": "en_switch_ms_p50",
                     "value": percentile(info["detect"], 50), "unit": "ms",
                     "note": "kill -> the EN's switch event (its failure detection; the rest "
                             "of the outage is the new path: promote, claim, ESR route)"})
    if loss_pct:
        rows.append({"system": system, "case": case, "metric": "background_echo_loss_pct",
                     "value": round(background * 100, 1), "unit": "%",
                     "note": f"echoes lost in 10 s with both DNs alive ({loss_pct}% each way "
                             "on the underlay alone would lose ~"
                             f"{100 * (1 - (1 - loss_pct / 100) ** 2):.0f}%; the rest is "
                             "spurious EN switches and their route changes)"})
    if "false_switches" in info:
        rows.append({"system": system, "case": case, "metric": "false_switches",
                     "value": info["false_switches"], "unit": "switches",
                     "note": f"EN failovers beyond one per kill over the {info['kills_done']} "
                             "kills and moves home (a DN judged dead while alive)"})
    if spurious is not None:
        rows.append({"system": system, "case": case, "metric": "spurious_switches_per_10s",
                     "value": spurious, "unit": "switches",
                     "note": "EN primary changes with both DNs alive (soft handoff hides them)"})
    rows.append({"system": system, "case": case, "metric": "moveback_lost_packets_max",
                 "value": max(moveback) if moveback else None, "unit": "packets",
                 "note": "echoes lost when the EN moves back to its revived home DN"})
    return rows


def _outage_runs(lab, el, pps, kills, delay_ms, loss_pct, case, routing, outages, moveback,
                 info, stop_at=None) -> None:
    """The kills of one case: fills ``outages`` (ms), ``moveback`` (echoes) and ``info``."""
    interval = 1.0 / pps
    el.start_routing()
    if delay_ms:
        relay = lab.popen("en", sys.executable, "-c", RELAY, str(delay_ms / 1000.0),
                          "17401=10.99.0.1", "17402=10.99.0.2")
        relay.stdout.readline()
    el.start_dn("dn1")
    el.start_dn("dn2")
    el.start_en()
    el.wait_en(lambda s: s.get("configured") and s.get("confirmed"))
    wait_ping(lab)
    if routing == "bird":
        bird_warm_up(lab, el)
    background, spurious = 0.0, None
    if loss_pct:
        # random loss on the underlay, both ways, EN <-> each DN (nft numgen)
        for addr in ("10.99.0.1", "10.99.0.2"):
            lab.drop_between("en", addr, percent=loss_pct)
        before = el.en_status()["stats"]["failovers"]
        stream = Stream(lab, interval)
        time.sleep(10.0)
        sent, received = stream.stop()
        background = (sent - received) / sent
        spurious = el.en_status()["stats"]["failovers"] - before
        log(f"{case}: background echo loss {background:.1%}, {spurious} EN switches in 10 s")
    info.update(background=background, spurious=spurious)
    home = el.wait_en(lambda s: s.get("home") and s.get("primary") == s.get("home")
                      and s.get("confirmed"), what="the EN at home")["home"]
    other = "dn2" if home == "dn1" else "dn1"
    # how long the stream goes on once the new path is in (echoes then get through):
    # a few echoes past the switch, and one round trip of the relay
    tail = max(0.3, 5 * interval) + 2 * delay_ms / 1000.0
    # every EN failover beyond one per kill is a false switch (a DN judged dead alive)
    failovers_at_start = el.en_status()["stats"]["failovers"]
    info["kills_done"] = 0
    for k in range(kills):
        if stop_at is not None and time.time() >= stop_at:
            info["cut"] = f"cut at the time limit after {k} of {kills} kills"
            log(f"{case}: {info['cut']}")
            break
        # steady state: the EN on its home DN, the switch confirmed, soft handoff over
        # (the EN's own state; on a lossy underlay a spurious switch may be under way)
        el.wait_en(lambda s: s.get("primary") == home and s.get("confirmed")
                   and s.get("handoff_from") is None, timeout=30, what="the EN at home")
        address = el.en_status()["address"]
        killed_at = []
        stream = Stream(lab, interval)
        time.sleep(max(0.3, 3 * interval))          # the EN is active (fast probes)
        killed_at.append(time.time())
        el.kill_dn(home)
        # until the EN has switched and the survivor confirmed, and the ESR routes the
        # EN's address via the survivor (the exact conditions of the new path)
        st = el.wait_en(lambda s: s.get("primary") == other and s.get("confirmed"),
                        timeout=30, what="the EN's switch to the survivor")
        if routing != "l2":
            wait_esr(el, address, other)
        time.sleep(tail)
        sent, received = stream.stop()
        # with background loss, only what exceeds it is the failure's
        outages.append(max(0.0, (sent - received) - background * sent) * interval * 1000)
        switches = [e["t"] for e in st.get("events", [])
                    if e.get("what") == "switch" and e["t"] >= killed_at[0]]
        if switches:
            info["detect"].append(round((switches[0] - killed_at[0]) * 1000, 1))
        # revive the dead DN during another stream: the EN moves back home
        stream = Stream(lab, interval)
        time.sleep(max(0.3, 3 * interval))
        el.revive_dn(home)
        el.wait_en(lambda s: s.get("primary") == home and s.get("confirmed")
                   and s.get("handoff_from") is None, timeout=30, what="the EN back home")
        waited = 0.0
        if routing != "l2":
            # the takeover's route is gone at the ESR
            waited = el.wait_esr_home(address, home)
        time.sleep(tail)
        sent, received = stream.stop()
        moveback.append(max(0, round((sent - received) - background * sent)))
        info["kills_done"] = k + 1
        info["false_switches"] = el.en_status()["stats"]["failovers"] - failovers_at_start \
            - info["kills_done"]
        log(f"{case} kill {k + 1}/{kills}: outage {outages[-1]:.0f} ms, "
            f"move back lost {moveback[-1]}")
        if routing == "bird":
            # BIRD may originate the EN's /32 again at once (OSPF MinLSInterval: one
            # origination of an LSA per 5 s)
            time.sleep(max(0.0, BIRD_SETTLE_S - waited - tail))


def bird_warm_up(lab, el) -> None:
    """A fresh BIRD's first external LSA waits for its initial SPF (seconds): one
    proto-228 /32 per DN carried to the ESR and withdrawn again before the first kill,
    so kill 1 times what every later kill times (a prefix of its own: the EN's /32
    owes nothing to MinLSInterval)."""
    from tests.support.encap_lab import DN_ADDR
    for i, dn in enumerate(("dn1", "dn2")):
        probe = f"10.200.250.{i + 1}"
        lab.host("ip", "-n", lab.ns_name(dn), "route", "add", probe + "/32", "dev", "eth0",
                 "proto", "228")
        wait_esr(el, probe, dn, timeout=60)
        lab.host("ip", "-n", lab.ns_name(dn), "route", "del", probe + "/32", "dev", "eth0",
                 "proto", "228")
        t0 = time.monotonic()
        while el.esr_next_hop(probe) == DN_ADDR[dn]:
            if time.monotonic() - t0 > 60:
                raise RuntimeError(f"BIRD warm-up: {probe} still routed via {dn}")
            time.sleep(0.05)


def wait_esr(el, address: str, dn: str, timeout: float = 30.0) -> float:
    """Until the ESR routes ``address`` via ``dn``; seconds waited."""
    from tests.support.encap_lab import DN_ADDR
    t0 = time.monotonic()
    while el.esr_next_hop(address) != DN_ADDR[dn]:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the ESR routes {address} via {el.esr_next_hop(address)}, "
                               f"not {dn}, after {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


STREAM = r"""
import json, os, select, socket, struct, sys, time
target, interval = sys.argv[1], float(sys.argv[2])
def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.setblocking(False)
ident = os.getpid() & 0xFFFF
sent, got = {}, set()
seq, stop_at, nxt = 0, None, time.monotonic()
stdin = sys.stdin.fileno()
watch = [sock, stdin]
while True:
    now = time.monotonic()
    if stop_at is None and now >= nxt:
        seq += 1
        head = struct.pack("!BBHHH", 8, 0, 0, ident, seq & 0xFFFF)
        body = b"appliance-encap-bench"
        try:
            sock.sendto(struct.pack("!BBHHH", 8, 0, checksum(head + body), ident,
                                    seq & 0xFFFF) + body, (target, 0))
        except OSError:
            pass                               # no route for a moment: counted lost
        sent[seq & 0xFFFF] = seq
        nxt += interval
    if stop_at is not None and (now >= stop_at or (seq & 0xFFFF) in got):
        break
    wait = (nxt - now) if stop_at is None else (stop_at - now)
    for r in select.select(watch, [], [], max(0.0, min(wait, 0.05)))[0]:
        if r is sock:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                off = (data[0] & 0x0F) * 4
                typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, off)
                if typ == 0 and rid == ident and rseq in sent:
                    got.add(rseq)
        else:
            os.read(stdin, 64)
            watch.remove(stdin)
            stop_at = time.monotonic() + 1.0   # the last echo's answer, at most 1 s
print(json.dumps({"sent": seq, "received": len(got)}), flush=True)
"""


class Stream:
    """An ICMP echo stream from the EN to the server at a fixed interval until
    :meth:`stop` (then it waits for the last echo's answer, at most 1 s): the
    (sent, received) of a stream whose length is set by the bench's conditions."""

    def __init__(self, lab, interval: float):
        self.proc = lab.popen("en", sys.executable, "-c", STREAM, SERVER, f"{interval:g}",
                              stdin=subprocess.PIPE)

    def stop(self) -> tuple[int, int]:
        out, err = self.proc.communicate(input=b"stop\n", timeout=30)
        try:
            r = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"echo stream failed: {out[-300:]!r} {err[-500:]!r}")
        return r["sent"], r["received"]


DOWNLOADER = r"""
import http.client, json, sys, time
size, mark = int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection(sys.argv[1], 8000, timeout=60)
t0 = time.time()
c.request("GET", "/blob")
r = c.getresponse()
n, marked, last, stalls = 0, False, time.time(), []
while True:
    data = r.read(65536)
    now = time.time()
    if now - last > 0.05:
        stalls.append([last, now - last])      # wall clock: compared with the kill time
    last = now
    if not data:
        break
    n += len(data)
    if not marked and n >= 0.4 * size:
        open(mark, "w").write("40%")
        marked = True
print(json.dumps({"bytes": n, "seconds": time.time() - t0, "stalls": stalls}))
"""


def download_case(trials: int, work: Path) -> list[dict]:
    """Seconds a 60 MB HTTP download takes with a DN death at 40 % minus without."""
    from tests.support.encap_lab import EncapLab
    from tests.support.netns import Lab
    size = 60 * 1024 * 1024
    base, killed, stall = [], [], []
    closers: list = []
    with Lab() as lab, _closing(closers):
        el = EncapLab(lab, work / "download", routing="esr").build()
        closers.append(el.close)
        el.start_routing()
        www = work / "download" / "www"
        www.mkdir(parents=True, exist_ok=True)
        with open(www / "blob", "wb") as f:
            f.truncate(size)
        lab.popen(lab.ns_name("server"), sys.executable, "-m", "http.server", "8000", "--bind",
                  SERVER, "--directory", str(www))
        el.start_dn("dn1")
        el.start_dn("dn2")
        el.start_en()
        el.wait_en(lambda s: s.get("configured") and s.get("confirmed"))
        wait_ping(lab)

        def fetch(kill: bool) -> float | None:
            mark = work / "download" / "mark"
            if mark.exists():
                mark.unlink()
            p = lab.popen("en", sys.executable, "-c", DOWNLOADER, SERVER, str(size), str(mark))
            victim = None
            killed_at = None
            if kill:
                victim = el.en_status()["primary"]
                deadline = time.monotonic() + 60
                while not mark.exists() and time.monotonic() < deadline and p.poll() is None:
                    time.sleep(0.005)
                killed_at = time.time()
                el.kill_dn(victim)
            out, err = p.communicate(timeout=180)
            try:
                res = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                res = {}
            if victim is not None:
                other = "dn2" if victim == "dn1" else "dn1"
                el.wait_en(lambda s: s.get("primary") == other and s.get("confirmed"), timeout=15)
                el.revive_dn(victim)
                el.wait_en(lambda s: s.get("primary") == victim and s.get("confirmed"), timeout=20)
            if res.get("bytes") != size:
                log(f"download failed: {out.decode()[-200:]} {err.decode()[-500:]}")
                return None
            if killed_at is not None:
                # the stall in the byte stream that spans the kill
                around = [g for t, g in res["stalls"]
                          if t <= killed_at + 0.05 and t + g >= killed_at]
                stall.append(max(around) if around else 0.0)
                log("stalls (s after the kill, length): " + ", ".join(
                    f"{t - killed_at:+.2f}:{g:.2f}" for t, g in res["stalls"]))
            return res["seconds"]
        fetch(False)                     # warm-up (not counted): caches, ARP, slow start
        for k in range(trials):
            b = fetch(False)
            d = fetch(True)
            if b is not None:
                base.append(b)
            if d is not None:
                killed.append(d)
            log(f"download trial {k + 1}/{trials}: {b} s clean, {d} s with a DN death at 40 %")
    base_s = percentile(base, 50)
    penalty = (percentile(killed, 50) - base_s) if base and killed else None
    return [{"system": "appliance", "case": "download-60MB", "metric": "penalty_s",
             "value": penalty, "unit": "s",
             "note": f"median of {len(killed)} kills; clean download "
                     f"{base_s and round(base_s, 2)} s"
                     " (busy box: clean runs stall too)"},
            {"system": "appliance", "case": "download-60MB", "metric": "stall_s_p50",
             "value": percentile(stall, 50), "unit": "s",
             "note": "the byte stream's stall across the kill (receiver side)"},
            {"system": "thesis", "case": "download-60MB", "metric": "penalty_s_published_low",
             "value": 1.2, "unit": "s", "note": "HTTP download, +1.2 to 2.7 s per DN failure"},
            {"system": "thesis", "case": "download-60MB", "metric": "penalty_s_published_high",
             "value": 2.7, "unit": "s", "note": ""}]


@contextlib.contextmanager
def _closing(closers: list):
    """Calls what ``closers`` holds on the way out (what lives outside the lab)."""
    try:
        yield
    finally:
        for close in closers:
            close()


def iperf(lab, seconds: float, rounds: int = 2) -> dict:
    """TCP Mbit/s and UDP packets/s from the EN to the server: the best of
    ``rounds`` runs (the box is shared: the best run is the least disturbed)."""
    best: dict = {}
    for _ in range(rounds):
        for key, value in _iperf_once(lab, seconds).items():
            if value is not None and (key not in best or value > best[key]):
                best[key] = value
    return best


def _iperf_once(lab, seconds: float) -> dict:
    server_ns = lab.ns_name("server")
    srv = lab.popen(server_ns, "iperf3", "-s", "-B", SERVER, "-1")
    time.sleep(0.5)
    tcp = lab.run("en", "iperf3", "-c", SERVER, "-t", str(seconds), "-J", check=False,
                  timeout=seconds + 30)
    srv.wait(timeout=30)
    srv = lab.popen(server_ns, "iperf3", "-s", "-B", SERVER, "-1")
    time.sleep(0.5)
    udp = lab.run("en", "iperf3", "-c", SERVER, "-u", "-b", "0", "-l", "1200", "-t",
                  str(seconds), "-J", check=False, timeout=seconds + 30)
    srv.wait(timeout=30)
    out = {}
    try:
        out["mbit_per_s"] = json.loads(tcp.stdout)["end"]["sum_received"]["bits_per_second"] / 1e6
    except (ValueError, KeyError):
        log(f"iperf3 tcp failed: {tcp.stdout[-500:]} {tcp.stderr[-500:]}")
    try:
        s = json.loads(udp.stdout)["end"]["sum"]
        out["pps"] = (s["packets"] - s["lost_packets"]) / s["seconds"]
        out["udp_loss_pct"] = s.get("lost_percent")
    except (ValueError, KeyError):
        log(f"iperf3 udp failed: {udp.stdout[-500:]} {udp.stderr[-500:]}")
    return out


def make_certs(d: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(key, cert, stem):
        (d / f"{stem}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (d / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench-ca")).issuer_name(name("bench-ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    save(ca_key, ca, "ca")
    for i, (cn, eku) in enumerate((("server", ExtendedKeyUsageOID.SERVER_AUTH),
                                   ("client", ExtendedKeyUsageOID.CLIENT_AUTH))):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(10 + i)
                .not_valid_before(now - datetime.timedelta(days=1))
                .not_valid_after(now + datetime.timedelta(days=2))
                .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        save(key, cert, cn)


OVPN_CLIENT_ADDR = "10.201.0.10"
LEARN_ADDRESS = """#!/bin/sh
# OpenVPN learn-address: route the client's address at the router (the ESR) via this
# server's DN ($1 = add|update|delete, $2 = address, $3 = common name)
case "$1" in
  add|update) {ip} -n {esr} route replace "$2/32" via {via} ;;
  delete) {ip} -n {esr} route del "$2/32" via {via} 2>/dev/null ;;
esac
exit 0
"""


def openvpn_failover(kills: int, work: Path) -> list[dict]:
    """What a user does today (issue 15): OpenVPN 2.6 with a server on each DN, the
    client with two ``remote``s and ``ping 1``/``ping-restart 3`` (the servers'
    ``keepalive 1 3``), its address kept by a per-client ``ifconfig-push`` and routed
    at the ESR by a ``learn-address`` script.  Same kill (kill -9 + link down of the
    server the client uses) during the same 100 packets/s echo stream; OpenVPN never
    moves back, so the next kill takes the other server."""
    from tests.support.encap_lab import DN_ADDR, EncapLab
    from tests.support.netns import Lab
    if not ensure("openvpn", "openvpn"):
        log("openvpn missing and not installable: the openvpn-2remotes row is skipped")
        return []
    d = work / "openvpn-2remotes"
    d.mkdir(parents=True, exist_ok=True)
    make_certs(d)
    (d / "ccd").mkdir(exist_ok=True)
    (d / "ccd" / "client").write_text(f"ifconfig-push {OVPN_CLIENT_ADDR} 255.255.255.0\n")
    outages: list[float] = []
    with Lab() as lab:
        el = EncapLab(lab, d / "lab").build()
        servers: dict = {}
        esr = lab.ns_name("esr")

        def start_server(dn: str) -> None:
            script = d / f"learn-{dn}.sh"
            script.write_text(LEARN_ADDRESS.format(ip=shutil.which("ip"), esr=esr,
                                                   via=DN_ADDR[dn]))
            script.chmod(0o755)
            (d / f"{dn}.conf").write_text(f"""dev tun
proto udp
local {DN_ADDR[dn]}
port 1194
topology subnet
server 10.201.0.0 255.255.255.0
client-config-dir {d}/ccd
push "route 10.210.0.0 255.255.255.0"
keepalive 1 3
script-security 2
learn-address {script}
ca {d}/ca.pem
cert {d}/server.pem
key {d}/server.key
dh none
data-ciphers AES-256-GCM
verb 3
""")
            servers[dn] = lab.popen(dn, "openvpn", "--config", str(d / f"{dn}.conf"),
                                    stdout=open(d / f"{dn}.log", "a"),
                                    stderr=subprocess.STDOUT)

        def route_to_server(dn: str) -> None:      # (a link down removes it)
            lab.host("ip", "-n", lab.ns_name(dn), "route", "replace", "10.210.0.0/24", "via",
                     "10.99.0.254")
        for dn in ("dn1", "dn2"):
            route_to_server(dn)
            start_server(dn)
        time.sleep(0.5)
        (d / "client.conf").write_text(f"""client
dev tun
proto udp
remote {DN_ADDR['dn1']} 1194
remote {DN_ADDR['dn2']} 1194
nobind
persist-tun
persist-key
ping 1
ping-restart 3
ca {d}/ca.pem
cert {d}/client.pem
key {d}/client.key
data-ciphers AES-256-GCM
verb 3
""")
        lab.popen("en", "openvpn", "--config", str(d / "client.conf"),
                  stdout=open(d / "client.log", "w"), stderr=subprocess.STDOUT)
        try:
            wait_ping(lab, timeout=60)
        except RuntimeError:
            log("openvpn-2remotes: no tunnel: " + (d / "client.log").read_text()[-1500:])
            return []
        by_addr = {a: n for n, a in DN_ADDR.items()}
        for k in range(kills):
            victim = by_addr.get(el.esr_next_hop(OVPN_CLIENT_ADDR))
            if victim is None:
                log("openvpn-2remotes: the ESR has no route to the client")
                break
            other = "dn2" if victim == "dn1" else "dn1"

            def kill(victim=victim):
                proc = servers[victim]
                os.kill(proc.pid, 9)
                lab.link_down(victim)
                proc.wait(timeout=10)
            pps = 100
            stream = Stream(lab, 1.0 / pps)
            time.sleep(0.3)
            kill()
            # until the ESR routes the client via the other server (learn-address once
            # the client has reconnected there), then a second of echoes past it
            deadline = time.monotonic() + 60
            while el.esr_next_hop(OVPN_CLIENT_ADDR) != DN_ADDR[other] and \
                    time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(1.0)
            sent, received = stream.stop()
            outages.append((sent - received) * 1000.0 / pps)
            log(f"openvpn-2remotes kill {k + 1}/{kills}: outage {outages[-1]:.0f} ms")
            lab.link_up(victim)
            route_to_server(victim)
            start_server(victim)
            deadline = time.monotonic() + 30
            while el.esr_next_hop(OVPN_CLIENT_ADDR) != DN_ADDR[other] and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            wait_ping(lab, timeout=30)
            time.sleep(1.0)            # the revived server is up before the next kill
    note = (f"{len(outages)} kills; OpenVPN 2.6, server on each DN (keepalive 1 3), client "
            "with two remotes, ping 1/ping-restart 3, persist-tun, ifconfig-push + "
            "learn-address route at the ESR; 100 packets/s")
    return [{"system": "openvpn-2remotes", "case": "lan-100pps", "metric": metric,
             "value": percentile(outages, q) if outages else None, "unit": "ms", "note": note}
            for metric, q in (("outage_ms_p50", 50), ("outage_ms_p95", 95))] + \
        [{"system": "openvpn-2remotes", "case": "lan-100pps", "metric": "outage_ms_max",
          "value": max(outages) if outages else None, "unit": "ms", "note": ""}]


def throughput(seconds: float, work: Path) -> list[dict]:
    from tests.support.encap_lab import EncapLab
    from tests.support.netns import Lab
    rows: list[dict] = []
    if not ensure("iperf3", "iperf3"):
        log("iperf3 missing and not installable: throughput skipped")
        return rows
    closers: list = []
    with Lab() as lab, _closing(closers):
        el = EncapLab(lab, work / "throughput", routing="esr").build()
        closers.append(el.close)
        el.start_routing()
        el.start_dn("dn1")
        el.start_dn("dn2")
        el.start_en()
        el.wait_en(lambda s: s.get("configured") and s.get("confirmed"))
        wait_ping(lab)
        r = iperf(lab, seconds)
        for metric, unit in (("pps", "packets/s"), ("mbit_per_s", "Mbit/s")):
            rows.append({"system": "appliance", "case": "throughput", "metric": metric,
                         "value": r.get(metric), "unit": unit,
                         "note": "iperf3 EN->server through one DN (TCP; UDP 1200 B); best of 2"})
        for name in ("en", "dn1", "dn2"):
            proc = el.procs.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
        if not ensure("openvpn", "openvpn"):
            log("openvpn missing and not installable: the OpenVPN anchor is skipped")
            return rows
        d = work / "openvpn"
        d.mkdir(parents=True, exist_ok=True)
        make_certs(d)
        (d / "server.conf").write_text(f"""dev tun
proto udp
local 10.99.0.1
port 1194
topology subnet
server 10.201.0.0 255.255.255.0
push "route 10.210.0.0 255.255.255.0"
ca {d}/ca.pem
cert {d}/server.pem
key {d}/server.key
dh none
data-ciphers AES-256-GCM
verb 3
""")
        (d / "client.conf").write_text(f"""client
dev tun
proto udp
remote 10.99.0.1 1194
nobind
ca {d}/ca.pem
cert {d}/client.pem
key {d}/client.key
data-ciphers AES-256-GCM
verb 3
""")
        lab.host("ip", "-n", lab.ns_name("esr"), "route", "add", "10.201.0.0/24", "via",
                 "10.99.0.1")
        lab.host("ip", "-n", lab.ns_name("dn1"), "route", "add", "10.210.0.0/24", "via",
                 "10.99.0.254")
        lab.popen("dn1", "openvpn", "--config", str(d / "server.conf"),
                  stdout=open(d / "server.log", "w"), stderr=subprocess.STDOUT)
        time.sleep(0.5)
        lab.popen("en", "openvpn", "--config", str(d / "client.conf"),
                  stdout=open(d / "client.log", "w"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if "Initialization Sequence Completed" in (d / "client.log").read_text():
                break
            time.sleep(0.2)
        else:
            log("openvpn did not connect: " + (d / "client.log").read_text()[-1500:])
            return rows
        r = iperf(lab, seconds)
        for metric, unit in (("pps", "packets/s"), ("mbit_per_s", "Mbit/s")):
            rows.append({"system": "openvpn", "case": "throughput", "metric": metric,
                         "value": r.get(metric), "unit": unit,
                         "note": "OpenVPN 2.6 UDP AES-256-GCM, same namespaces; best of 2"})
    return rows


#: (case, packets/s, soft handoff, one-way delay ms, loss %, headline): every delay with
#: and without soft handoff, loss 0/5/10 % (soft handoff on, the shipped default)
CASES = [
    ("lan-100pps", 100, False, 0, 0, True),
    ("soft-lan-100pps", 100, True, 0, 0, True),
    ("lan-10pps", 10, False, 0, 0, False),
    ("soft-lan-10pps", 10, True, 0, 0, False),
    ("man-100pps", 100, False, 10, 0, False),
    ("soft-man-100pps", 100, True, 10, 0, False),
    ("wan-100pps", 100, False, 100, 0, False),
    ("soft-wan-100pps", 100, True, 100, 0, False),
    ("lan-100pps-loss5", 100, True, 0, 5, False),
    ("lan-100pps-loss10", 100, True, 0, 10, False),
]
#: the cases of the BIRD 2 OSPF baseline (its outage does not depend on the EN side)
BIRD_CASES = ("lan-100pps", "soft-lan-100pps", "lan-10pps", "man-100pps", "wan-100pps",
              "lan-100pps-loss10")
#: the cases of the L2 announce mode (no routing protocol: ARP)
L2_CASES = ("lan-100pps", "soft-lan-100pps")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 kills per case, 3 s iperf runs")
    p.add_argument("--json", action="store_true", help="print the JSON result last on stdout")
    p.add_argument("--kills", type=int, default=None,
                   help="kills per headline case (lan-100pps, soft-lan-100pps; default 10; "
                        "quick 2)")
    p.add_argument("--kills-other", type=int, default=None,
                   help="kills per other case (default: --kills, at most 5)")
    p.add_argument("--kills-bird", type=int, default=None,
                   help="kills per headline bird2-ospf case (default: --kills, at most 10; "
                        "each kill waits out OSPF's 5 s MinLSInterval)")
    p.add_argument("--kills-bird-other", type=int, default=None,
                   help="kills per other bird2-ospf case (default: --kills-other, at most 3)")
    p.add_argument("--routing", default="esr,bird",
                   help="ESR routing modes to measure: esr (the appliance's agent: system "
                        "appliance), bird (bird2-ospf), l2 (appliance-l2)")
    p.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    p.add_argument("--seconds", type=float, default=None, help="iperf3 seconds (default 5)")
    p.add_argument("--kills-openvpn", type=int, default=None,
                   help="kills of the openvpn-2remotes row (default: --kills-other, at "
                        "most 5; each costs ~20 s)")
    p.add_argument("--only", default="outage,openvpn-failover,download,throughput")
    p.add_argument("--download-trials", type=int, default=None,
                   help="download trials (each one clean and one with a DN death; default 3, "
                        "quick 1)")
    p.add_argument("--stop-at", default=None,
                   help="UTC time HH:MM: no kill starts after it (a case cut short says "
                        "so in its note and its kill count; the cases not begun are skipped)")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/encap.py needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    kills = args.kills or (2 if args.quick else 10)
    kills_other = args.kills_other or min(kills, 5)
    kills_bird = args.kills_bird or min(kills, 10)
    kills_bird_other = args.kills_bird_other or min(kills_other, kills_bird, 3)
    seconds = args.seconds or (3 if args.quick else 5)
    only = set(args.only.split(","))
    stop_at = None
    if args.stop_at:
        import datetime
        hh, mm = (int(x) for x in args.stop_at.split(":"))
        now = datetime.datetime.now(datetime.timezone.utc)
        stop_at = now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()
    routings = [r for r in args.routing.split(",") if r]
    wanted = set(args.cases.split(",")) if args.cases else None
    if "bird" in routings and not (shutil.which("bird") or ensure("bird", "bird2")):
        log("bird missing and not installable: the bird2-ospf rows are skipped")
        routings.remove("bird")
    work = Path(tempfile.mkdtemp(prefix="bench-encap-"))
    rows: list[dict] = []
    started = time.monotonic()
    try:
        if "openvpn-failover" in only:
            rows += openvpn_failover(args.kills_openvpn or min(kills_other, 5), work)
            log(f"[{(time.monotonic() - started) / 60:.1f} min]")
        if "outage" in only:
            # every case of one routing mode, then the next (the appliance's rows first)
            for routing in routings:
                for case, pps, soft, delay, loss, headline in CASES:
                    if wanted is not None and case not in wanted:
                        continue
                    if (routing == "bird" and case not in BIRD_CASES) or \
                            (routing == "l2" and case not in L2_CASES):
                        continue
                    if routing == "bird":
                        n = kills_bird if headline else kills_bird_other
                    else:
                        n = kills if headline else kills_other
                    if stop_at is not None and time.time() >= stop_at:
                        log(f"{SYSTEMS[routing]} {case}: not run (--stop-at reached)")
                        continue
                    rows += outage_case(case, pps, soft, n, work, delay_ms=delay,
                                        loss_pct=loss, routing=routing, stop_at=stop_at)
                    log(f"[{(time.monotonic() - started) / 60:.1f} min] rows so far: "
                        + json.dumps([[r["system"], r["case"], r["metric"], r["value"]]
                                      for r in rows if r["case"] == case]))
        if "download" in only:
            rows += download_case(args.download_trials or (1 if args.quick else 3), work)
        if "throughput" in only:
            rows += throughput(seconds, work)
        rows += THESIS
        log(f"load average at the end: {os.getloadavg()[0]:.2f} (2 vCPUs shared); "
            f"{(time.monotonic() - started) / 60:.1f} min")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report("encap", rows, args.json, extra=("note",))


if __name__ == "__main__":
    sys.exit(main())
