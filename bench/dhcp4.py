"""DHCPv4 benchmark: the appliance's dhcp4 service vs Kea, side by side, one run.

Topology (network namespaces on one bridge, built and removed by the bench):
server a 10.80.0.1/12, server b 10.80.0.2/12, client 10.80.0.10/12.  One
subnet 10.80.0.0/12 with a ~980k-address pool, so a rate search never runs
the pool dry.  Every system runs in the same namespaces, one after the other.

Load: ``perfdhcp -4`` in the client namespace acting as a relay (giaddr
10.80.0.10, replies come back to port 67 there), random clients out of 2M
MACs.  The two single-server cases get unicast relayed traffic to 10.80.0.1;
the pair cases get the same relayed packets *broadcast* on the bridge
(``perfdhcp -B 255.255.255.255``), so both partners see every client, as a
split scope or HA load-balancing needs (the hot-standby standby ignores them).

* appliance single: ``twistd -n appliance``, dhcp4 ``listen_address`` = 10.80.0.1,
  the default store (memory, ``fsync = "always"``: each lease fsynced before ACK);
* appliance pair: two nodes, dhcp4 bound to ``eth0`` (hears broadcasts),
  ``failover = {mode = "split-scope", split = 50, delay_s = 0}`` (or
  ``--appliance-mode load-balancing``), lazy updates over the TLS peer link;
* kea single: ``kea-dhcp4`` memfile (persist, no fsync), Kea defaults;
* kea pair: Kea HA hot-standby (``libdhcp_ha.so`` + ``libdhcp_lease_cmds.so``,
  multi-threading, ``http-dedicated-listener``); ``kea pair-lb``: HA
  load-balancing with the pool split in two client classes.

Rate: a short search per system -- double the offered rate while clean
(< 0.1 % of exchanges incomplete, >= 97 % of the offered rate completed and
p99 under 500 ms -- above that a queue is building even if a short run shows no drops),
then bisect; ``dora_per_s`` is the completed DORA rate of the best clean run.
Latency: ``perfdhcp -x t`` prints every exchange's send/receive times; the
percentiles are over DISCOVER-OFFER and REQUEST-ACK delays pooled (the
REQUEST-ACK ones alone are reported as ``ra_latency_ms_p99``).

Failover (``case = failover``): N clients take leases from the pair; then the
serving partner dies like a box (SIGKILL of every process in its namespace
and its link down in the same instant).  ``serve_after_death_ms``: from that
instant to the survivor's first ACK to a new client that the dead partner
owned (it retries DISCOVER every 50 ms); ``kept_address_pct``: of the N
clients, those whose rebinding REQUEST (broadcast, no server id) is ACKed with
the address they had.

The failover rows run both systems with their shipped HA defaults: the appliance
without automatic partner-down, Kea HA hot-standby with no timer set (it declares
the partner down after max-response-delay 60 s and more than max-unacked-clients
10 clients waiting max-ack-delay 10 s; the new-client helper is 12 clients asking
from the kill on, so Kea can count them).

Partition (``case = partition``): the pair is cut apart (nft drop of everything
between a and b; both still hear every client) for 40 s, longer than the
appliance's MCLT (5 s here: the shipped 3600 s cannot be outlived in a bench),
while new relayed clients arrive at 15/s from 3 s before the cut to 5 s after the
heal, each renewing at T1 until its lease ends (tests/support/dhcp4_crowd.py).
Every ACK on the wire is recorded; ``duplicate_addresses`` counts addresses ACKed
to two clients with overlapping lease times.  Kea: HA load-balancing with its
shipped timers and one pool both servers allocate from (the ARM's example).  Each
row's ``note`` says how the system was configured.

    python bench/dhcp4.py [--quick] [--json] [--duration S] [--skip-kea] [--no-failover]
                          [--cases single,pair,failover,partition]

Needs root, iproute2; the anchor needs ``kea-dhcp4-server`` and ``kea-admin``
(perfdhcp) -- without perfdhcp every rate row is null and stderr says why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.dhcp_common import (RPC_SNIPPET, KeaProcess, admin_rpc, fmt, kea_command,  # noqa: E402,F401
                               kill_box, log, parse_perfdhcp, poll, stop_procs)
from bench.dhcp_common import clean as _clean, rate_search as _rate_search  # noqa: E402
from bench.report import percentile, report  # noqa: E402
from tests.support.cluster_lab import dhcp4_pair_config  # noqa: E402
from tests.support.node_process import twistd_command  # noqa: E402

ADDR = {"a": "10.80.0.1", "b": "10.80.0.2"}
PEER = {"a": "b", "b": "a"}
CLIENT = "10.80.0.10"
PREFIX = 12
SUBNET = "10.80.0.0/12"
POOL = ("10.81.0.0", "10.95.255.254")
POOL_HALVES = (("10.81.0.0", "10.88.127.255"), ("10.88.128.0", "10.95.255.254"))
KEA_HOOKS = Path("/usr/lib/x86_64-linux-gnu/kea/hooks")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


# ---------------------------------------------------------------------------
# perfdhcp
# ---------------------------------------------------------------------------

def run_perfdhcp(lab, rate: int, duration: float, server: str, broadcast: bool) -> dict:
    """One fixed-rate perfdhcp run from the client namespace; a result dict."""
    cmd = ["perfdhcp", "-4", "-l", "eth0", "-r", str(int(rate)), "-R", "2000000",
           "-p", str(max(1, round(duration))), "-W", "1000000", "-d", "1", "-x", "t"]
    if broadcast:
        cmd += ["-B", "255.255.255.255"]
    else:
        cmd += [server]
    duration = max(1, round(duration))
    res = lab.run("client", *cmd, check=False, timeout=duration + 60)
    parsed = parse_perfdhcp(res.stdout)
    do = parsed["stats"].get("DISCOVER-OFFER", {})
    ra = parsed["stats"].get("REQUEST-ACK", {})
    sent = do.get("sent packets", 0)
    done = ra.get("received packets", 0)
    lost = max(0.0, sent - done)
    pooled = parsed["delays"].get("DISCOVER-OFFER", []) + parsed["delays"].get("REQUEST-ACK", [])
    ra_d = parsed["delays"].get("REQUEST-ACK", [])
    out = {
        "offered": rate, "sent": sent, "completed": done,
        "dora_per_s": done / duration if duration else 0.0,
        "drop_pct": 100.0 * lost / sent if sent else 100.0,
        "p50": percentile(pooled, 50), "p99": percentile(pooled, 99),
        "ra_p99": percentile(ra_d, 99), "rc": res.returncode,
    }
    if not sent:
        out["error"] = (res.stderr.strip() or res.stdout.strip())[-400:]
    return out


def clean(r: dict) -> bool:
    return _clean(r, "dora_per_s")


def rate_search(lab, label: str, server: str, broadcast: bool, start: int, trials: int,
                duration: float, max_rate: int = 20000) -> dict | None:
    """Best clean run of a doubling-then-bisecting search (or the least bad run):
    bench/dhcp_common.py's, each probe's verdict logged."""
    return _rate_search(lambda rate: run_perfdhcp(lab, rate, duration, server, broadcast),
                        label, start, trials, rate_key="dora_per_s", unit="DORA",
                        max_rate=max_rate)


# ---------------------------------------------------------------------------
# appliance nodes
# ---------------------------------------------------------------------------

def appliance_config(node: str, work: Path, *, pair: bool, mode: str, keys: Path | None,
                     mclt_s: int | None = None) -> str:
    state = work / f"state-{node}"
    head = f"""
[node]
id = "{node}"
state_dir = "{state}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{state}/admin.token"
"""
    if not pair:
        return head + f"""
[services.dhcp4]
listen_address = "{ADDR[node]}"

[[services.dhcp4.subnets]]
id = 1
subnet = "{SUBNET}"
pool = ["{POOL[0]}", "{POOL[1]}"]
routers = ["{ADDR['a']}"]
lease_time_s = 3600
"""
    cfg = dhcp4_pair_config(node, work, ADDR, keys, subnet=SUBNET, pool=POOL,
                            routers=ADDR["a"], mode=mode, lease_time_s=3600)
    # the shipped default: no automatic partner-down (heartbeat silence is also what a
    # partition looks like); the survivor serves new clients from COMMUNICATIONS-
    # INTERRUPTED as soon as it suspects the partner (issue 12)
    cfg = cfg.replace("auto_partner_down_s = 1", "auto_partner_down_s = 0")
    if mclt_s is not None:
        cfg = cfg.replace("mclt_s = 30", f"mclt_s = {mclt_s}")
    if mclt_s == 3600:                 # the failover row: the shipped failover table
        cfg = cfg.replace("delay_s = 0", "delay_s = 2")
    return cfg


class Appliance:
    """One or two ``twistd -n appliance`` nodes in namespaces a (and b)."""

    def __init__(self, lab, work: Path, *, pair: bool, mode: str = "split-scope",
                 mclt_s: int | None = None):
        self.lab, self.work, self.pair, self.mode = lab, work, pair, mode
        self.mclt_s = mclt_s
        self.procs: dict[str, subprocess.Popen] = {}
        self.keys = None
        if pair:
            self.keys = work / "keys"
            subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(self.keys),
                            "--node", f"a={ADDR['a']}", "--node", f"b={ADDR['b']}"],
                           check=True, capture_output=True, env=ENV)

    def nodes(self):
        return ("a", "b") if self.pair else ("a",)

    def logs(self) -> str:
        return "".join((self.work / f"{n}.log").read_text()[-2000:] for n in self.nodes()
                       if (self.work / f"{n}.log").exists())

    def start(self) -> None:
        for node in self.nodes():
            shutil.rmtree(self.work / f"state-{node}", ignore_errors=True)
            cfg = self.work / f"{node}.toml"
            cfg.write_text(appliance_config(node, self.work, pair=self.pair, mode=self.mode,
                                            keys=self.keys, mclt_s=self.mclt_s))
            fh = open(self.work / f"{node}.log", "w")
            self.procs[node] = self.lab.popen(node, *twistd_command(), "-c", str(cfg), stdout=fh,
                                              stderr=subprocess.STDOUT, cwd=str(self.work), env=ENV)
        ok = poll(lambda: all("dhcp4 serving" in (self.work / f"{n}.log").read_text()
                              for n in self.nodes()), 30)
        if not ok:
            raise RuntimeError("appliance dhcp4 did not start:\n" + self.logs())
        if self.pair and not poll(lambda: self.partner_state("a") == "NORMAL"
                                  and self.partner_state("b") == "NORMAL", 30, 0.3):
            raise RuntimeError("appliance pair not NORMAL:\n" + self.logs())

    def rpc(self, node: str, method: str, params=None):
        return admin_rpc(self.lab, self.work, node, method, params)

    def partner_state(self, node: str):
        st = self.rpc(node, "cluster.status") or {}
        return st.get("partners", {}).get(PEER[node])

    def pid(self, node: str) -> int | None:
        """The twistd pid (the child of ``ip netns exec``, or itself after exec)."""
        p = self.procs.get(node)
        return p.pid if p else None

    def stop(self) -> None:
        stop_procs(self.procs)


# ---------------------------------------------------------------------------
# Kea
# ---------------------------------------------------------------------------

#: Kea HA as shipped (the failover and partition rows): no timer set (heartbeat-delay
#: 10 s, max-response-delay 60 s, max-ack-delay 10 s, max-unacked-clients 10 are Kea's
#: defaults); the peers talk over the HA hook's own listener (multi-threading, as the
#: rate rows); one pool both servers allocate from (the ARM's load-balancing example).
KEA_SHIPPED = ("Kea 2.2 HA {mode}, shipped HA timers (heartbeat-delay 10 s, max-response-delay "
               "60 s, max-ack-delay 10 s, max-unacked-clients 10), multi-threading with "
               "http-dedicated-listener (no control agent), {pools}")


def kea_config(node: str, work: Path, *, ha: str | None, shipped: bool = False) -> dict:
    """``shipped``: HA with Kea's own defaults (KEA_SHIPPED), one shared pool."""
    d = work / f"kea-{node}"
    d.mkdir(exist_ok=True)
    pools = [{"pool": f"{POOL[0]} - {POOL[1]}"}]
    if ha == "load-balancing" and not shipped:
        pools = [{"pool": f"{POOL_HALVES[0][0]} - {POOL_HALVES[0][1]}", "client-class": "HA_a"},
                 {"pool": f"{POOL_HALVES[1][0]} - {POOL_HALVES[1][1]}", "client-class": "HA_b"}]
    cfg = {
        "interfaces-config": {"interfaces": ["eth0"], "dhcp-socket-type": "raw"},
        "control-socket": {"socket-type": "unix", "socket-name": str(d / "ctl.sock")},
        "lease-database": {"type": "memfile", "persist": True, "name": str(d / "leases4.csv"),
                           "lfc-interval": 0},
        "valid-lifetime": 3600,
        "subnet4": [{"id": 1, "subnet": SUBNET, "pools": pools,
                     "option-data": [{"name": "routers", "data": ADDR["a"]}]}],
        "loggers": [{"name": "kea-dhcp4", "severity": "WARN",
                     "output_options": [{"output": str(d / "kea.log")}]}],
    }
    if ha:
        if ha == "hot-standby":
            roles = {"a": "primary", "b": "standby"}
        else:
            roles = {"a": "primary", "b": "secondary"}
        cfg["multi-threading"] = {"enable-multi-threading": True, "thread-pool-size": 2,
                                  "packet-queue-size": 64}
        timers = {} if shipped else {
            "heartbeat-delay": 1000, "max-response-delay": 2000, "max-ack-delay": 1000,
            "max-unacked-clients": 0, "sync-timeout": 30000}
        cfg["hooks-libraries"] = [
            {"library": str(KEA_HOOKS / "libdhcp_lease_cmds.so")},
            {"library": str(KEA_HOOKS / "libdhcp_ha.so"), "parameters": {"high-availability": [{
                "this-server-name": node, "mode": ha, **timers,
                "multi-threading": {"enable-multi-threading": True, "http-dedicated-listener": True,
                                    "http-listener-threads": 2, "http-client-threads": 2},
                "peers": [{"name": n, "url": f"http://{ADDR[n]}:8001/", "role": roles[n],
                           "auto-failover": True} for n in ("a", "b")],
            }]}},
        ]
    return {"Dhcp4": cfg}


class Kea(KeaProcess):
    """kea-dhcp4 alone in a, or an HA pair in a and b."""

    binary = "kea-dhcp4"

    def kea_config(self, node: str, work: Path, *, ha: str | None, shipped: bool) -> dict:
        return kea_config(node, work, ha=ha, shipped=shipped)


# ---------------------------------------------------------------------------
# failover: a relay-agent client in the client namespace (``_client`` subcommand)
# ---------------------------------------------------------------------------

def _client_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind((CLIENT, 67))
    return s


def _pkt(C, mtype, mac, xid, *, ciaddr=None, requested=None, server_id=None, secs=0):
    from ipaddress import IPv4Address
    opts = {C.OPT_MESSAGE_TYPE: bytes([mtype]), C.OPT_PARAMETER_REQUEST_LIST: bytes([1, 3, 51, 54])}
    if requested:
        opts[C.OPT_REQUESTED_IP] = IPv4Address(requested).packed
    if server_id:
        opts[C.OPT_SERVER_ID] = IPv4Address(server_id).packed
    return C.encode(C.DHCPPacket(op=1, htype=1, hlen=6, hops=1, xid=xid, secs=secs,
                                 giaddr=IPv4Address(CLIENT), chaddr=mac,
                                 ciaddr=IPv4Address(ciaddr or 0), options=opts))


def _exchange(C, sock, data, xid, want, timeout, xids=None):
    """Broadcast ``data`` (None: nothing); the first reply with ``xid`` (or any of
    ``xids``) of type ``want`` or NAK (or None)."""
    if data is not None:
        sock.sendto(data, ("255.255.255.255", 67))
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sock.settimeout(left)
        try:
            raw, _ = sock.recvfrom(4096)
            p = C.parse(raw)
        except socket.timeout:
            return None
        except Exception:
            continue
        if (p.xid == xid or (xids and p.xid in xids)) and p.message_type in (want, C.NAK):
            return p


def _dora(C, sock, mac, timeout=1.0):
    xid = int.from_bytes(os.urandom(4), "big")
    offer = _exchange(C, sock, _pkt(C, C.DISCOVER, mac, xid), xid, C.OFFER, timeout)
    if offer is None or offer.message_type != C.OFFER:
        return None
    ack = _exchange(C, sock, _pkt(C, C.REQUEST, mac, xid, requested=str(offer.yiaddr),
                                  server_id=str(offer.server_id)), xid, C.ACK, timeout)
    if ack is None or ack.message_type != C.ACK:
        return None
    return str(ack.yiaddr), str(ack.server_id)


def client_main(argv) -> int:
    """``bench/dhcp4.py _client lease|new|rebind ...`` (runs in the client namespace)."""
    from services.dhcp.v4 import codec as C
    from services.dhcp.v4 import pools as P
    ap = argparse.ArgumentParser(prog="dhcp4.py _client")
    ap.add_argument("what", choices=("lease", "new", "rebind"))
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--leases", help="JSON file from 'lease' (rebind)")
    ap.add_argument("--owner", default="any", help="new: primary|secondary|any (split 50 hash)")
    ap.add_argument("--mark", help="new: start when this file holds the kill instant")
    ap.add_argument("--deadline", type=float, default=30.0)
    ap.add_argument("--crowd", type=int, default=12, help="new: clients asking at once")
    a = ap.parse_args(argv)
    sock = _client_socket()
    if a.what == "lease":
        got = []
        for i in range(a.n):
            mac = bytes([2, 0x66, 0, 0, i >> 8, i & 0xFF])
            for _ in range(3):
                r = _dora(C, sock, mac)
                if r:
                    got.append({"mac": mac.hex(), "address": r[0], "server": r[1]})
                    break
        print(json.dumps(got))
        return 0
    if a.what == "new":
        # --crowd fresh MACs owned by the wanted role, all asking from the kill on
        # (Kea counts distinct unanswered clients before it declares the partner down)
        macs = []
        while len(macs) < a.crowd:
            mac = bytes([2, 0x77]) + os.urandom(4)
            if a.owner == "any" or P.hash_owner(P.client_hash_key(None, mac), 50) == a.owner:
                macs.append(mac)
        while not (a.mark and os.path.exists(a.mark) and open(a.mark).read().strip()):
            time.sleep(0.002)
        t0 = float(open(a.mark).read())
        xids = {int.from_bytes(os.urandom(4), "big"): mac for mac in macs}
        secs_start = time.time()
        while time.time() - t0 < a.deadline:
            secs = int(time.time() - secs_start)
            for xid, mac in xids.items():
                sock.sendto(_pkt(C, C.DISCOVER, mac, xid, secs=secs), ("255.255.255.255", 67))
            offer = _exchange(C, sock, None, None, C.OFFER, 0.05, xids=xids)
            if offer is not None and offer.message_type == C.OFFER:
                mac = xids[offer.xid]
                ack = _exchange(C, sock, _pkt(C, C.REQUEST, mac, offer.xid,
                                              requested=str(offer.yiaddr),
                                              server_id=str(offer.server_id), secs=secs),
                                offer.xid, C.ACK, 0.5)
                if ack is not None and ack.message_type == C.ACK:
                    print(json.dumps({"ms": (time.time() - t0) * 1000.0, "server": str(ack.server_id)}))
                    return 0
        print(json.dumps({"ms": None}))
        return 1
    leases = json.loads(open(a.leases).read())
    kept = 0
    pending = list(leases)
    deadline = time.time() + a.deadline
    while pending and time.time() < deadline:
        still = []
        for le in pending:
            mac = bytes.fromhex(le["mac"])
            xid = int.from_bytes(os.urandom(4), "big")
            ack = _exchange(C, sock, _pkt(C, C.REQUEST, mac, xid, ciaddr=le["address"]),
                            xid, C.ACK, 0.3)
            if ack is None:
                still.append(le)
            elif ack.message_type == C.ACK and str(ack.yiaddr) == le["address"]:
                kept += 1
        pending = still
    print(json.dumps({"kept": kept, "total": len(leases), "unanswered": len(pending)}))
    return 0


def failover_case(lab, work: Path, system, n_clients: int, victim_owner: str,
                  deadline: float = 30.0) -> dict:
    """Leases for N clients, kill the serving partner (a), new client + rebinding clients."""
    me = [sys.executable, str(Path(__file__).resolve()), "_client"]
    res = lab.run("client", *me, "lease", "--n", str(n_clients), check=False, timeout=120)
    leases = json.loads(res.stdout or "[]")
    if not leases:
        raise RuntimeError(f"no leases for the failover clients: {res.stderr[-500:]}")
    (work / "fo-leases.json").write_text(json.dumps(leases))
    time.sleep(1.5)                     # lazy updates reach the partner
    mark = work / "fo-mark"
    mark.write_text("")
    newc = lab.popen("client", *me, "new", "--owner", victim_owner, "--mark", str(mark),
                     "--deadline", str(deadline), text=True)
    time.sleep(1.0)                     # the helper is up and waiting
    t0 = kill_box(lab, "a")
    mark.write_text(repr(t0))
    out, err = newc.communicate(timeout=deadline + 30)
    first = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"ms": None}
    reb = lab.run("client", *me, "rebind", "--leases", str(work / "fo-leases.json"),
                  "--deadline", "20", check=False, timeout=90)
    kept = json.loads(reb.stdout.strip().splitlines()[-1]) if reb.stdout.strip() else {}
    lab.link_up("a")
    pct = 100.0 * kept.get("kept", 0) / kept["total"] if kept.get("total") else None
    log(f"  failover: first ACK to a new client {fmt(first.get('ms'))} ms after the kill "
        f"(from {first.get('server')}); kept {kept.get('kept')}/{kept.get('total')} addresses")
    return {"serve_after_death_ms": first.get("ms"), "kept_address_pct": pct}


#: The partition case: MCLT of the appliance pair (the shipped 3600 s cannot be
#: outlived in a bench), seconds before/while/after the servers are cut apart, and
#: new clients per second arriving all along (each renews at T1 until its lease ends).
PARTITION_MCLT_S = 5
PARTITION = {"before": 3.0, "cut": 40.0, "after": 5.0, "rate": 15.0}


def partition_case(lab, work: Path, system, quick: bool = False) -> dict:
    """Cut a from b (nft drop of every packet between them; both still hear the
    clients) for longer than the MCLT while new relayed clients arrive on the bridge;
    every ACK on the wire is recorded (tests/support/dhcp4_crowd.py); the duplicates
    are the addresses ACKed to two clients whose lease times overlap."""
    from tests.support.dhcp4_crowd import duplicate_addresses, read_acks
    p = dict(PARTITION)
    if quick:
        p.update(cut=4 * PARTITION_MCLT_S, rate=10.0)
    out = work / f"partition-{system.__class__.__name__}.jsonl"
    out.unlink(missing_ok=True)
    total = p["before"] + p["cut"] + p["after"]
    crowd = lab.popen("client", sys.executable, "-m", "tests.support.dhcp4_crowd",
                      "--giaddr", CLIENT, "--out", str(out), "--rate", str(p["rate"]),
                      "--duration", str(total), "--linger", "3", "--renew", "--tries", "8",
                      stdout=subprocess.PIPE, text=True, env=ENV, cwd=str(ROOT))
    time.sleep(p["before"])
    lab.drop_between("a", ADDR["b"])
    time.sleep(p["cut"] / 2)
    states = {n: system.partner_state(n) if isinstance(system, Appliance) else system.ha_state(n)
              for n in ("a", "b")}
    time.sleep(p["cut"] / 2)
    lab.undrop("a", ADDR["b"])
    log(f"  partition: states in the middle of the cut: {states}")
    summary, _ = crowd.communicate(timeout=total + 60)
    acks = read_acks(out) if out.exists() else []
    ok = [a for a in acks if a["type"] == "ACK"]
    dups = duplicate_addresses(acks)
    servers = sorted({a["server"] for a in ok})
    log(f"  partition: {p['cut']:.0f} s cut, {summary.strip()}, {len(ok)} ACKs on the wire from "
        f"{servers}, {len(dups)} addresses ACKed to two clients with overlapping leases"
        + (f" (e.g. {dups[:5]})" if dups else ""))
    return {"duplicate_addresses": len(dups), "acks": len(ok), "cut_s": p["cut"],
            "servers": len(servers)}


# ---------------------------------------------------------------------------

def have_kea() -> tuple[bool, str]:
    missing = [b for b in ("perfdhcp", "kea-dhcp4") if shutil.which(b) is None]
    if missing:
        return False, (f"{', '.join(missing)} not installed: apt-get install -y --no-install-recommends "
                       "kea-dhcp4-server kea-admin kea-ctrl-agent")
    if not (KEA_HOOKS / "libdhcp_ha.so").exists():
        return True, f"Kea HA hooks missing in {KEA_HOOKS}"
    return True, ""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_client":
        return client_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short version (under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--duration", type=float, help="seconds per perfdhcp probe")
    ap.add_argument("--trials", type=int, help="perfdhcp probes per system")
    ap.add_argument("--appliance-mode", default="split-scope", choices=("split-scope", "load-balancing"))
    ap.add_argument("--skip-kea", action="store_true")
    ap.add_argument("--no-failover", action="store_true")
    ap.add_argument("--kea-lb", action="store_true", help="also Kea HA load-balancing (full run default)")
    ap.add_argument("--cases", default="single,pair,failover,partition",
                    help="comma-separated subset of single,pair,failover,partition")
    args = ap.parse_args(argv)
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if args.no_failover:
        cases.discard("failover")
    duration = args.duration or (1.0 if args.quick else 8.0)
    trials = args.trials or (2 if args.quick else 6)
    n_clients = 20 if args.quick else 100
    kea_lb = args.kea_lb or not args.quick

    rows: list[dict] = []

    def row(system, case, metric, value, unit, note=None):
        rows.append({"system": system, "case": case, "metric": metric,
                     "value": None if value is None else round(float(value), 2), "unit": unit})
        if note:
            rows[-1]["note"] = note

    def rate_rows(system, case, r):
        row(system, case, "dora_per_s", r and r["dora_per_s"], "exchanges/s")
        row(system, case, "latency_ms_p99", r and r["p99"], "ms")
        row(system, case, "latency_ms_p50", r and r["p50"], "ms")
        row(system, case, "ra_latency_ms_p99", r and r["ra_p99"], "ms")
        row(system, case, "drop_pct", r and r["drop_pct"], "%")

    def null_rows(system, cases, why):
        log(f"dhcp4 bench: {system}: {why}")
        for case in cases:
            if case == "failover":
                row(system, case, "serve_after_death_ms", None, "ms", why)
                row(system, case, "kept_address_pct", None, "%", why)
            elif case == "partition":
                row(system, case, "duplicate_addresses", None, "addresses", why)
            else:
                rate_rows(system, case, None)

    if os.geteuid() != 0:
        log("dhcp4 bench: needs root (network namespaces); every row is null")
        null_rows("appliance", ("single", "pair", "failover", "partition"), "not root")
        null_rows("kea", ("single", "pair", "failover", "partition"), "not root")
        return finish(rows, args)

    kea_ok, kea_why = have_kea()
    perfdhcp = shutil.which("perfdhcp") is not None

    from tests.support.netns import Lab
    with tempfile.TemporaryDirectory(prefix="d4b-") as tmp, Lab() as lab:
        work = Path(tmp)
        lab.add_node("a", f"{ADDR['a']}/{PREFIX}")
        lab.add_node("b", f"{ADDR['b']}/{PREFIX}")
        lab.add_node("client", f"{CLIENT}/{PREFIX}")

        def bench(system, case, factory, broadcast, start):
            if not perfdhcp:
                null_rows(system, (case,), kea_why)
                return
            srv = None
            try:
                srv = factory()
                log(f"{system} {case}: started")
                r = rate_search(lab, f"{system} {case}", ADDR["a"], broadcast, start, trials, duration)
                rate_rows(system, case, r)
                if r and r.get("unclean"):
                    log(f"  {system} {case}: no run under 0.1% drops; reporting the least lossy one")
            except Exception as e:      # a broken system gives null rows, not a crash
                log(f"{system} {case}: FAILED: {e}")
                rate_rows(system, case, None)
            finally:
                if srv is not None:
                    srv.stop()

        def appliance(pair, mclt_s=None):
            a = Appliance(lab, work, pair=pair, mode=args.appliance_mode, mclt_s=mclt_s)
            try:
                a.start()
            except Exception:
                a.stop()
                raise
            return a

        def kea(ha, shipped=False):
            k = Kea(lab, work, ha=ha, shipped=shipped)
            try:
                k.start()
            except Exception:
                k.stop()
                raise
            return k

        start = 800 if args.quick else 1000      # the same search for every system
        if "single" in cases:
            bench("appliance", "single", lambda: appliance(False), False, start)
            if kea_ok and not args.skip_kea:
                bench("kea", "single", lambda: kea(None), False, start)
            elif not args.skip_kea:
                null_rows("kea", ("single",), kea_why)
        if "pair" in cases:
            bench("appliance", "pair", lambda: appliance(True), True, start)
            if kea_ok and not args.skip_kea:
                bench("kea", "pair", lambda: kea("hot-standby"), True, start)
                if kea_lb:
                    bench("kea", "pair-lb", lambda: kea("load-balancing"), True, start)
            elif not args.skip_kea:
                null_rows("kea", ("pair",), kea_why)

        appliance_note = ("appliance split-scope 50/50, shipped failover defaults (no automatic "
                          "partner-down, heartbeats 100 ms x 3), mclt_s {mclt}, lease 3600 s")
        if "failover" in cases:
            for system, factory, owner, note, deadline in (
                    ("appliance", lambda: appliance(True, mclt_s=3600), "primary",
                     appliance_note.format(mclt=3600) + ", delay_s 2", 30.0),
                    ("kea", lambda: kea("hot-standby", shipped=True), "any",
                     KEA_SHIPPED.format(mode="hot-standby", pools="one pool"), 150.0)):
                if system == "kea" and (args.skip_kea or not kea_ok):
                    if not args.skip_kea:
                        null_rows("kea", ("failover",), kea_why)
                    continue
                srv = None
                try:
                    srv = factory()
                    log(f"{system} failover: started")
                    fo = failover_case(lab, work, srv, n_clients, owner, deadline)
                    row(system, "failover", "serve_after_death_ms", fo["serve_after_death_ms"],
                        "ms", note)
                    row(system, "failover", "kept_address_pct", fo["kept_address_pct"], "%", note)
                except Exception as e:
                    log(f"{system} failover: FAILED: {e}")
                    row(system, "failover", "serve_after_death_ms", None, "ms", f"failed: {e}")
                    row(system, "failover", "kept_address_pct", None, "%", f"failed: {e}")
                finally:
                    if srv is not None:
                        srv.stop()

        if "partition" in cases:
            for system, factory, note in (
                    ("appliance", lambda: appliance(True, mclt_s=PARTITION_MCLT_S),
                     appliance_note.format(mclt=PARTITION_MCLT_S)),
                    ("kea", lambda: kea("load-balancing", shipped=True),
                     KEA_SHIPPED.format(mode="load-balancing",
                                        pools="one pool shared by both servers"))):
                if system == "kea" and (args.skip_kea or not kea_ok):
                    if not args.skip_kea:
                        null_rows("kea", ("partition",), kea_why)
                    continue
                srv = None
                try:
                    srv = factory()
                    log(f"{system} partition: started")
                    pr = partition_case(lab, work, srv, args.quick)
                    row(system, "partition", "duplicate_addresses", pr["duplicate_addresses"],
                        "addresses", f"{note}; cut {pr['cut_s']:.0f} s, {pr['acks']} ACKs on the "
                        "wire")
                except Exception as e:
                    log(f"{system} partition: FAILED: {e}")
                    row(system, "partition", "duplicate_addresses", None, "addresses",
                        f"failed: {e}")
                finally:
                    if srv is not None:
                        srv.stop()
    return finish(rows, args)


def finish(rows, args) -> int:
    return report("dhcp4", rows, args.json, extra=("note",))


if __name__ == "__main__":
    sys.exit(main())
