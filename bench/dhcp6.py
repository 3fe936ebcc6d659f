"""DHCPv6 benchmark: the appliance's dhcp6 service vs Kea, side by side, one run.

Topology (network namespaces on one bridge, built and removed by the bench, as
bench/dhcp4.py): server a 2001:db8:80::1/48, server b 2001:db8:80::2/48, client
2001:db8:80::10/48.  One subnet 2001:db8:80::/48; addresses from a 2**19 pool
(2001:db8:80:1:: - 2001:db8:80:1::7:ffff), prefixes /56 out of 2001:db8:8000::/37
(2**19 of them), so a rate search never runs a pool dry (the appliance bounds a
v6 pool; Kea gets the same pools).

Load: ``perfdhcp -6`` in the client namespace, direct (not relayed): SOLICITs go to
ff02::1:2 (All_DHCP_Relay_Agents_and_Servers) on the link, so every server hears
every client -- what a pair needs (the v6 form of dhcp4's broadcast); random
clients out of 2M DUIDs.  ``single``/``pair``: IA_NA only (``-e address-only``),
``single-pd``/``pair-pd``: IA_NA + IA_PD (``-e address-and-prefix``); one SARR
exchange is SOLICIT-ADVERTISE + REQUEST-REPLY.

* appliance single: ``twistd -n appliance``, dhcp6 ``interface = "eth0"`` (joins
  ff02::1:2), the default store (memory, ``fsync = "always"``: each lease fsynced
  before the REPLY);
* appliance pair: two nodes with the dhcp6 failover of the shipped config
  (split pools), lazy updates over the TLS peer link;
* kea single: ``kea-dhcp6`` memfile (persist, no fsync), Kea defaults;
* kea pair: Kea HA hot-standby (``libdhcp_ha.so`` + ``libdhcp_lease_cmds.so``,
  multi-threading, ``http-dedicated-listener``; the standby does not answer).
* ``pair-lb``/``pair-pd-lb`` (NOT the shipped mode): the appliance pair with failover
  ``mode = "load-balancing"`` (the same split pools; in NORMAL only the owner of the
  DUID's RFC 3074 bucket answers a SOLICIT), against Kea HA in ``load-balancing`` mode
  (primary + secondary, both answer their hash half; otherwise as the hot-standby pair).

Rate: bench/dhcp_common.py's search -- double the offered rate while a probe is
clean, then bisect.  Clean: < 0.1 % of the SARR exchanges started incomplete,
>= 97 % of the offered rate completed, pooled p99 under 500 ms; each probe's log line
says clean or which of these it failed.  An unclean probe is repeated once at the same
rate and the repeat decides (one stall of a busy box must not cap the search for good:
a Kea HA pair once stopped at 875/s while its pair-pd row reached 2000/s).
The bisection runs until the next probe would be within max(10/s, 5 %) of the last
(``DEFAULT_TRIALS`` probes at most, repeats included: enough to get there from 500/s for
every row so far; a row whose budget ran out first says so in its note).
``sarr_per_s`` is the completed SARR rate of the best clean probe; the row's ``search``
(JSON) lists every probe with its verdict, its ``bracket`` the best clean offered rate
and the lowest unclean one (the capacity lies between them).
Latency percentiles pool SOLICIT-ADVERTISE and REQUEST-REPLY delays (``-x t``).

Failover (``case = failover``): N clients take an address and a prefix from the
pair (tests/support/dhcp6_client.py); then the serving partner a dies like a box
(SIGKILL of everything in its namespace and its link down in the same instant).
``serve_after_death_ms``: from that instant to the survivor's first REPLY to a new
client (a crowd of 12 fresh DUIDs SOLICITing every 50 ms with a growing elapsed
time, so Kea HA can count unacked clients); ``kept_address_pct``: of the N clients,
those whose REBIND (multicast, no server id: the dead server cannot be RENEWed) is
answered with the address AND the prefix they had.  Both systems run their shipped
HA defaults: the appliance without automatic partner-down, Kea HA hot-standby with
no timer set (max-response-delay 60 s, max-unacked-clients 10, max-ack-delay 10 s).

Partition (``case = partition``, beyond SPEC's rows): the pair is cut apart (nft drop
between a and b) for 40 s, longer than the appliance's MCLT (5 s here), while two
groups of new clients (address + prefix, 4/s each, rebinding every second) arrive;
during the cut one group reaches only a, the other only b.  ``duplicate_addresses``:
addresses or prefixes REPLYed to two DUIDs with overlapping valid lifetimes (read
from the wire); ``served_in_cut``: new clients bound during the cut.  Kea: the HA
hot-standby of the failover row (shipped timers).

    python bench/dhcp6.py [--quick] [--json] [--duration S] [--trials N] [--skip-kea]
                          [--skip-appliance]
                          [--cases single,pair,single-pd,pair-pd,pair-lb,pair-pd-lb,
                                   failover,partition]

``--quick`` (under a minute): the four rate cases, 1 s probes, 2 per system, no
failover or partition (``--quick --cases partition``: a 15 s cut).  Needs root,
iproute2, nft; the anchor needs ``kea-dhcp6-server`` and
``kea-admin`` (perfdhcp) -- without perfdhcp every rate row is null and stderr
says why.
"""

from __future__ import annotations

import argparse
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

from bench.dhcp_common import (KeaProcess, add_lab_nodes, admin_rpc, fmt,  # noqa: E402,F401
                               kill_box, log, parse_perfdhcp, poll,
                               search_text, stop_procs)
from bench.dhcp_common import clean as _clean, rate_search as _rate_search  # noqa: E402
from bench.report import percentile, report  # noqa: E402
from tests.support.node_process import twistd_command  # noqa: E402

ADDR = {"a": "2001:db8:80::1", "b": "2001:db8:80::2"}
PEER = {"a": "b", "b": "a"}
CLIENT = "2001:db8:80::10"
PREFIX = 48
SUBNET = "2001:db8:80::/48"
POOL = ("2001:db8:80:1::", "2001:db8:80:1::7:ffff")
POOL_HALVES = (("2001:db8:80:1::", "2001:db8:80:1::3:ffff"),
               ("2001:db8:80:1::4:0", "2001:db8:80:1::7:ffff"))
PD_POOL = ("2001:db8:8000::/37", 56)
KEA_HOOKS = Path("/usr/lib/x86_64-linux-gnu/kea/hooks")
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
RATE_CASES = ("single", "pair", "single-pd", "pair-pd", "pair-lb", "pair-pd-lb")
#: the pair cases with failover mode "load-balancing" (NOT the shipped split-scope) for the
#: appliance, and Kea HA in its load-balancing mode (not hot-standby)
LB_CASES = ("pair-lb", "pair-pd-lb")
#: probes per rate search (repeats of an unclean probe count): from 500/s a search to
#: 8,000/s with repeats on the way up and down needs ~14 to resolve 5 %
DEFAULT_TRIALS = 16


# ---------------------------------------------------------------------------
# perfdhcp -6
# ---------------------------------------------------------------------------

def run_perfdhcp(lab, rate: int, duration: float, pd: bool) -> dict:
    """One fixed-rate ``perfdhcp -6`` run from the client namespace (multicast);
    after the last SOLICIT it waits for late replies as long as the drop time (1 s),
    half that in a 1 s probe (the p99 bound is 500 ms anyway)."""
    duration = max(1, round(duration))
    wait_us = 500000 if duration <= 1 else 1000000
    cmd = ["perfdhcp", "-6", "-l", "eth0", "-r", str(int(rate)), "-R", "2000000",
           "-p", str(duration), "-W", str(wait_us), "-d", "1", "-x", "t",
           "-e", "address-and-prefix" if pd else "address-only"]
    res = lab.run("client", *cmd, check=False, timeout=duration + 60)
    parsed = parse_perfdhcp(res.stdout)
    sa = parsed["stats"].get("SOLICIT-ADVERTISE", {})
    rr = parsed["stats"].get("REQUEST-REPLY", {})
    sent = sa.get("sent packets", 0)
    done = rr.get("received packets", 0)
    lost = max(0.0, sent - done)
    delays = parsed["delays"]
    pooled = delays.get("SOLICIT-ADVERTISE", []) + delays.get("REQUEST-REPLY", [])
    rr_d = parsed["delays"].get("REQUEST-REPLY", [])
    out = {
        "offered": rate, "sent": sent, "completed": done,
        "sarr_per_s": done / duration,
        "drop_pct": 100.0 * lost / sent if sent else 100.0,
        "p50": percentile(pooled, 50), "p99": percentile(pooled, 99),
        "rr_p99": percentile(rr_d, 99), "rc": res.returncode,
        "rejected": sa.get("rejected leases", 0) + rr.get("rejected leases", 0),
    }
    if not sent:
        out["error"] = (res.stderr.strip() or res.stdout.strip())[-400:]
    return out


def clean(r: dict) -> bool:
    return _clean(r, "sarr_per_s")


def rate_search(lab, label: str, pd: bool, start: int, trials: int, duration: float,
                max_rate: int = 20000) -> dict | None:
    """Best clean run of bench/dhcp_common.py's doubling-then-bisecting search (or the
    least bad run); an unclean probe is repeated once and the repeat decides (confirm)."""
    return _rate_search(lambda rate: run_perfdhcp(lab, rate, duration, pd), label, start,
                        trials, rate_key="sarr_per_s", unit="SARR", max_rate=max_rate,
                        pause=0.5 if duration > 1 else 0.1, confirm=True)


# ---------------------------------------------------------------------------
# appliance nodes
# ---------------------------------------------------------------------------

def appliance_subnet() -> str:
    return f"""
[[services.dhcp6.subnets]]
id = 1
subnet = "{SUBNET}"
pool = ["{POOL[0]}", "{POOL[1]}"]
pd_pools = [{{ prefix = "{PD_POOL[0]}", delegated_length = {PD_POOL[1]} }}]
"""


def appliance_config(node: str, work: Path, *, pair: bool, keys: Path | None,
                     mclt_s: int | None = None, mode: str | None = None) -> str:
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
        return head + '\n[services.dhcp6]\ninterface = "eth0"\n' + appliance_subnet()
    return dhcp6_pair_config(node, work, ADDR, keys, mclt_s=mclt_s, mode=mode) \
        + appliance_subnet()


def dhcp6_pair_config(node: str, work: Path, addrs: dict[str, str], keys: Path, *,
                      mclt_s: int | None = None, auto_partner_down_s: int = 0,
                      extra: str = "", mode: str | None = None) -> str:
    """One node of a dhcp6 failover pair (a primary, b secondary) serving direct clients
    on eth0: heartbeats, the TLS peer link (keys from appliance.cluster.keys), the
    shipped failover (no automatic partner-down unless asked); the caller appends
    the ``[[services.dhcp6.subnets]]``."""
    peer = next(n for n in addrs if n != node)
    role = "primary" if node == "a" else "secondary"
    mclt = f", mclt_s = {mclt_s}" if mclt_s is not None else ""
    if mode is not None:                 # not the shipped mode (split-scope)
        mclt += f', mode = "{mode}"'
    return f"""
[node]
id = "{node}"
state_dir = "{work}/state-{node}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{work}/state-{node}/admin.token"

[cluster]
peers = [{{ id = "{peer}", address = "{addrs[peer]}" }}]
bind_address = "{addrs[node]}"
heartbeat_interval_ms = 100
dead_after = 3
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:8742"
tls = {{ cert = "{keys}/{node}.pem", key = "{keys}/{node}.key", ca = "{keys}/ca.pem" }}
auto_partner_down_s = {auto_partner_down_s}

[services.dhcp6]
interface = "eth0"
failover = {{ peer = "{peer}", role = "{role}"{mclt} }}
{extra}
"""


class Appliance:
    """One or two ``twistd -n appliance`` nodes with dhcp6 in namespaces a (and b)."""

    def __init__(self, lab, work: Path, *, pair: bool, mclt_s: int | None = None,
                 config=appliance_config, mode: str | None = None):
        self.lab, self.work, self.pair, self.mclt_s, self.mode = lab, work, pair, mclt_s, mode
        self.config = config
        self.procs: dict[str, subprocess.Popen] = {}
        self.keys = None
        if pair:
            self.keys = work / "keys"
            if not (self.keys / "cluster.key").exists():
                subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(self.keys),
                                "--node", f"a={ADDR['a']}", "--node", f"b={ADDR['b']}"],
                               check=True, capture_output=True, env=ENV)

    def nodes(self):
        return ("a", "b") if self.pair else ("a",)

    def logs(self) -> str:
        return "".join((self.work / f"{n}.log").read_text()[-3000:] for n in self.nodes()
                       if (self.work / f"{n}.log").exists())

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes():
            shutil.rmtree(self.work / f"state-{node}", ignore_errors=True)
            cfg = self.work / f"{node}.toml"
            kw = {"mode": self.mode} if self.mode else {}
            cfg.write_text(self.config(node, self.work, pair=self.pair, keys=self.keys,
                                       mclt_s=self.mclt_s, **kw))
            fh = open(self.work / f"{node}.log", "w")
            self.procs[node] = self.lab.popen(node, *twistd_command(), "-c", str(cfg), stdout=fh,
                                              stderr=subprocess.STDOUT, cwd=str(self.work), env=ENV)
        def up(node):
            text = (self.work / f"{node}.log").read_text()
            if self.procs[node].poll() is not None or "service dhcp6 failed" in text:
                raise RuntimeError(f"appliance dhcp6 in {node} failed:\n" + self.logs())
            return self.rpc(node, "dhcp6.scopes") is not None

        for node in self.nodes():
            deadline = time.time() + timeout
            while not up(node):
                if time.time() > deadline:
                    raise RuntimeError(f"appliance dhcp6 in {node} did not start:\n" + self.logs())
                time.sleep(0.2)
        if self.pair and not poll(lambda: self.partner_state("a") == "NORMAL"
                                  and self.partner_state("b") == "NORMAL", timeout, 0.3):
            raise RuntimeError("appliance dhcp6 pair not NORMAL "
                               f"({self.partner_state('a')}, {self.partner_state('b')}):\n"
                               + self.logs())

    def rpc(self, node: str, method: str, params=None):
        return admin_rpc(self.lab, self.work, node, method, params)

    def server_duid(self, node: str) -> str | None:
        return (self.rpc(node, "dhcp6.scopes") or {}).get("server_duid")

    def partner_state(self, node: str):
        """The dhcp6 failover state of ``node`` toward its partner (the dhcp6 service's
        own view if it reports one, else the cluster's)."""
        st = self.rpc(node, "dhcp6.stats") or {}
        fo = st.get("failover") if isinstance(st, dict) else None
        if isinstance(fo, dict) and fo.get("state"):
            return fo["state"]
        st = self.rpc(node, "cluster.status") or {}
        return st.get("partners", {}).get(PEER[node])

    def stop(self) -> None:
        stop_procs(self.procs)


# ---------------------------------------------------------------------------
# Kea
# ---------------------------------------------------------------------------

KEA_SHIPPED = ("Kea 2.2 HA {mode}, shipped HA timers (heartbeat-delay 10 s, max-response-delay "
               "60 s, max-ack-delay 10 s, max-unacked-clients 10), multi-threading with "
               "http-dedicated-listener (no control agent), one pool")


def kea_config(node: str, work: Path, *, ha: str | None, shipped: bool = False) -> dict:
    """kea-dhcp6 on eth0 (link-local + ff02::1:2), memfile; ``ha``: hot-standby pair."""
    d = work / f"kea-{node}"
    d.mkdir(exist_ok=True)
    cfg = {
        "data-directory": str(d),                       # the server DUID file
        "interfaces-config": {"interfaces": ["eth0"]},
        "control-socket": {"socket-type": "unix", "socket-name": str(d / "ctl.sock")},
        "lease-database": {"type": "memfile", "persist": True, "name": str(d / "leases6.csv"),
                           "lfc-interval": 0},
        "subnet6": [{"id": 1, "subnet": SUBNET, "interface": "eth0",
                     "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}],
                     "pd-pools": [{"prefix": PD_POOL[0].split("/")[0],
                                   "prefix-len": int(PD_POOL[0].split("/")[1]),
                                   "delegated-len": PD_POOL[1]}]}],
        "loggers": [{"name": "kea-dhcp6", "severity": "WARN",
                     "output_options": [{"output": str(d / "kea.log")}]}],
    }
    if ha:
        roles = {"a": "primary", "b": "standby" if ha == "hot-standby" else "secondary"}
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
                "peers": [{"name": n, "url": f"http://[{ADDR[n]}]:8001/", "role": roles[n],
                           "auto-failover": True} for n in ("a", "b")],
            }]}},
        ]
    return {"Dhcp6": cfg}


class Kea(KeaProcess):
    """kea-dhcp6 alone in a, or an HA hot-standby pair in a and b."""

    binary = "kea-dhcp6"

    def kea_config(self, node: str, work: Path, *, ha: str | None, shipped: bool) -> dict:
        return kea_config(node, work, ha=ha, shipped=shipped)

    def server_duid(self, node: str) -> str | None:
        """The DUID kea-dhcp6 generated and keeps in its data directory (hex)."""
        f = self.work / f"kea-{node}" / "kea-dhcp6-serverid"
        try:
            return f.read_text().strip().replace(":", "").lower()
        except OSError:
            return None


# ---------------------------------------------------------------------------
# failover
# ---------------------------------------------------------------------------

#: The DHCPv6 test client (stdlib only: runs by path in any namespace).
CLIENT6 = (sys.executable, str(ROOT / "tests" / "support" / "dhcp6_client.py"))


def failover_case(lab, work: Path, system, n_clients: int, deadline: float = 30.0) -> dict:
    """Address + prefix for N clients, kill the serving partner (a), a crowd of new
    clients from the kill on, then every old client REBINDs."""
    victim = system.server_duid("a")
    res = lab.run("client", *CLIENT6, "lease",
                  "--n", str(n_clients), "--pd", check=False, timeout=120)
    leases = json.loads(res.stdout or "[]")
    if not leases:
        raise RuntimeError(f"no leases for the failover clients: {res.stderr[-500:]}")
    (work / "fo-leases.json").write_text(json.dumps(leases))
    servers = sorted({le["server"] for le in leases})
    time.sleep(1.5)                     # lazy updates reach the partner
    mark = work / "fo-mark"
    mark.write_text("")
    newc = lab.popen("client", *CLIENT6, "new",
                     "--pd", "--mark", str(mark), "--deadline", str(deadline), text=True,
                     env=ENV, cwd=str(ROOT))
    time.sleep(1.0)                     # the helper is up and waiting
    t0 = kill_box(lab, "a")
    mark.write_text(repr(t0))
    out, err = newc.communicate(timeout=deadline + 30)
    first = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"ms": None}
    reb = lab.run("client", *CLIENT6, "rebind",
                  "--leases", str(work / "fo-leases.json"), "--deadline", "20",
                  check=False, timeout=90)
    kept = json.loads(reb.stdout.strip().splitlines()[-1]) if reb.stdout.strip() else {}
    lab.link_up("a")
    # a link down flushes static IPv6 addresses (keep_addr_on_down = 0): put a's back
    lab.host("ip", "-n", lab.nodes["a"].ns, "addr", "replace", f"{ADDR['a']}/{PREFIX}",
             "dev", "eth0")
    pct = 100.0 * kept.get("kept", 0) / kept["total"] if kept.get("total") else None
    dead_total = (kept.get("total_by_server") or {}).get(victim, 0)
    dead_kept = (kept.get("kept_by_server") or {}).get(victim, 0)
    log(f"  failover: first REPLY to a new client {fmt(first.get('ms'))} ms after the kill "
        f"(server {first.get('server')}); kept {kept.get('kept')}/{kept.get('total')} "
        f"address+prefix ({kept.get('unanswered')} unanswered, e.g. changed "
        f"{kept.get('changed')}); "
        f"the leases came from {len(servers)} server(s), {dead_total} from the dead one "
        f"({victim}), {dead_kept} of those kept")
    return {"serve_after_death_ms": first.get("ms"), "kept_address_pct": pct,
            "servers": len(servers), "dead_total": dead_total, "dead_kept": dead_kept,
            "total": kept.get("total")}


#: The partition case: the appliance pair's MCLT (the shipped 3600 s cannot be outlived
#: in a bench), seconds before / during / after the cut, new clients per second per group.
PARTITION_MCLT_S = 5
PARTITION = {"before": 3.0, "cut": 40.0, "after": 5.0, "rate": 4.0}


def link_local(lab, ns: str) -> str:
    return next(str(a.ip) for a in lab.addresses(ns) if a.version == 6 and a.ip.is_link_local)


def partition_case(lab, work: Path, system, quick: bool = False) -> dict:
    """Cut a from b (nft drop between them) for longer than the MCLT while two groups
    of new clients (address + prefix, rebinding every second) keep arriving: during
    the cut group 1 (namespace client) reaches only a and group 2 (namespace c2) only
    b.  Every binding REPLY on the wire is recorded (tests/support/dhcp6_client.py
    crowd); duplicates are addresses or prefixes given to two DUIDs with overlapping
    valid lifetimes; ``served_in_cut`` the new clients that got a first binding
    during the cut (out of those that arrived then)."""
    from tests.support.dhcp6_client import duplicates, read_jsonl
    p = dict(PARTITION)
    if quick:
        p.update(cut=3 * PARTITION_MCLT_S)
    if "c2" not in lab.nodes:
        lab.add_node("c2")
    total = p["before"] + p["cut"] + p["after"]
    outs = {ns: work / f"partition-{system.__class__.__name__}-{ns}.jsonl"
            for ns in ("client", "c2")}
    crowds = {}
    for i, (ns, out) in enumerate(outs.items()):
        out.unlink(missing_ok=True)
        crowds[ns] = lab.popen(ns, *CLIENT6, "crowd", "--pd", "--out", str(out),
                               "--tag", str(0x20 + i), "--rate", str(p["rate"]),
                               "--duration", str(total), "--linger", "3", text=True)
    time.sleep(p["before"])
    cuts = [("a", ADDR["b"]), ("b", link_local(lab, "client")), ("a", link_local(lab, "c2"))]
    t_cut = time.time()
    for ns, addr in cuts:
        lab.drop_between(ns, addr)
    time.sleep(p["cut"] / 2)
    states = {n: system.partner_state(n) if isinstance(system, Appliance) else system.ha_state(n)
              for n in ("a", "b")}
    time.sleep(p["cut"] / 2)
    for ns, addr in cuts:
        lab.undrop(ns, addr)
    t_heal = time.time()
    for crowd in crowds.values():
        crowd.communicate(timeout=total + 60)
    replies = [r for out in outs.values() if out.exists() for r in read_jsonl(out)]
    dups = duplicates(replies)
    first: dict[str, float] = {}
    for r in replies:
        if r["valid"] > 0:
            first[r["duid"]] = min(first.get(r["duid"], r["t"]), r["t"])
    in_cut = sum(1 for t in first.values() if t_cut <= t < t_heal)
    arrived = int(p["cut"] * p["rate"] * 2)
    log(f"  partition: {p['cut']:.0f} s cut, states in the middle {states}, {len(replies)} binding "
        f"REPLYs from {len({r['server'] for r in replies})} servers, {in_cut} of ~{arrived} new "
        f"clients bound during the cut, {len(dups)} addresses/prefixes given to two DUIDs"
        + (f" (e.g. {dups[:5]})" if dups else ""))
    return {"duplicates": len(dups), "served_in_cut": in_cut, "arrived_in_cut": arrived,
            "cut_s": p["cut"], "states": states}


# ---------------------------------------------------------------------------

def have_kea() -> tuple[bool, str]:
    missing = [b for b in ("perfdhcp", "kea-dhcp6") if shutil.which(b) is None]
    if missing:
        return False, (f"{', '.join(missing)} not installed: apt-get install -y "
                       "--no-install-recommends kea-dhcp6-server kea-admin")
    return True, ""


def have_kea_ha() -> tuple[bool, str]:
    libs = [KEA_HOOKS / "libdhcp_ha.so", KEA_HOOKS / "libdhcp_lease_cmds.so"]
    missing = [str(p) for p in libs if not p.exists()]
    if missing:
        return False, f"Kea HA hook for v6 missing: {', '.join(missing)}"
    return True, ""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short version (under a minute)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--duration", type=float, help="seconds per perfdhcp probe")
    ap.add_argument("--trials", type=int, help="perfdhcp probes per system")
    ap.add_argument("--skip-kea", action="store_true")
    ap.add_argument("--skip-appliance", action="store_true")
    ap.add_argument("--cases", help="comma-separated subset of single,pair,single-pd,pair-pd,"
                    "pair-lb,pair-pd-lb,"
                    "failover,partition (default: all; --quick: the rate cases)")
    args = ap.parse_args(argv)
    default = ",".join(RATE_CASES) + ("" if args.quick else ",failover,partition")
    cases = {c.strip() for c in (args.cases or default).split(",") if c.strip()}
    duration = args.duration or (1.0 if args.quick else 8.0)
    trials = args.trials or (2 if args.quick else DEFAULT_TRIALS)   # repeats count
    n_clients = 20 if args.quick else 100
    systems = [s for s, skip in (("appliance", args.skip_appliance), ("kea", args.skip_kea))
               if not skip]

    rows: list[dict] = []

    def row(system, case, metric, value, unit, note=None):
        rows.append({"system": system, "case": case, "metric": metric,
                     "value": None if value is None else round(float(value), 2), "unit": unit})
        if note:
            rows[-1]["note"] = note

    def rate_rows(system, case, r, note=None):
        if r and r.get("unclean"):
            note = ((note + "; ") if note else "") + "no run under 0.1 % loss: the least lossy one"
        if r and r.get("budget_stopped"):
            note = ((note + "; ") if note else "") + ("probe budget ran out before 5 % "
                                                        "resolution (see bracket)")
        row(system, case, "sarr_per_s", r and r["sarr_per_s"], "exchanges/s", note)
        if search_text(r):
            rows[-1]["search"] = search_text(r)        # every probe's rate and verdict
        if r and r.get("bracket"):
            rows[-1]["bracket"] = list(r["bracket"])   # [best clean, lowest unclean] offered
        row(system, case, "latency_ms_p99", r and r["p99"], "ms")
        row(system, case, "latency_ms_p50", r and r["p50"], "ms")
        row(system, case, "rr_latency_ms_p99", r and r["rr_p99"], "ms")
        row(system, case, "drop_pct", r and r["drop_pct"], "%")

    def null_rows(system, which, why):
        log(f"dhcp6 bench: {system}: {why}")
        for case in which:
            if case == "failover":
                row(system, case, "serve_after_death_ms", None, "ms", why)
                row(system, case, "kept_address_pct", None, "%", why)
            elif case == "partition":
                row(system, case, "duplicate_addresses", None, "addresses+prefixes", why)
            else:
                rate_rows(system, case, None, why)

    ordered = [c for c in (*RATE_CASES, "failover", "partition") if c in cases]
    if os.geteuid() != 0:
        for system in systems:
            null_rows(system, ordered, "not root (network namespaces)")
        return finish(rows, args)

    kea_ok, kea_why = have_kea()
    ha_ok, ha_why = have_kea_ha()
    perfdhcp = shutil.which("perfdhcp") is not None

    from tests.support.netns import Lab
    with tempfile.TemporaryDirectory(prefix="d6b-") as tmp, Lab() as lab:
        work = Path(tmp)
        add_lab_nodes(lab, ADDR, CLIENT, PREFIX)

        def appliance(pair, mclt_s=None, mode=None):
            a = Appliance(lab, work, pair=pair, mclt_s=mclt_s, mode=mode)
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

        notes = {
            ("appliance", False): "dhcp6 shipped defaults, memory store fsync always",
            ("appliance", True): "dhcp6 pair, shipped failover (split-scope 50/50 pools: both "
                                 "partners answer new clients), TLS peer link, fsync always",
            ("kea", False): "kea-dhcp6 2.2 defaults, memfile (no fsync): unequal durability",
            ("kea", True): "Kea HA hot-standby (tuned timers: heartbeat-delay 1 s, "
                           "max-response-delay 2 s; the standby only syncs), multi-threading, "
                           "memfile: unequal durability",
            ("appliance", "lb"): "dhcp6 pair, NOT the shipped mode: failover mode "
                                 "load-balancing (split 50/50 pools, the DUID hash owner answers "
                                 "a SOLICIT), TLS peer link, fsync always",
            ("kea", "lb"): "Kea HA load-balancing (tuned timers as hot-standby), "
                           "multi-threading, memfile: unequal durability",
        }
        start = 400 if args.quick else 500     # the same search for every system
        for case in RATE_CASES:
            if case not in cases:
                continue
            pair, pd, lb = case.startswith("pair"), "-pd" in case, case in LB_CASES
            for system in systems:
                note = notes[(system, "lb" if lb else pair)]
                if not perfdhcp:
                    null_rows(system, (case,), kea_why)
                    continue
                if system == "kea" and not kea_ok:
                    null_rows(system, (case,), kea_why)
                    continue
                if system == "kea" and pair and not ha_ok:
                    null_rows(system, (case,), ha_why)
                    continue
                srv = None
                try:
                    if system == "appliance":
                        srv = appliance(pair, mode="load-balancing" if lb else None)
                    else:
                        srv = kea(("load-balancing" if lb else "hot-standby") if pair else None)
                    log(f"{system} {case}: started")
                    r = rate_search(lab, f"{system} {case}", pd, start, trials, duration)
                    rate_rows(system, case, r, note)
                except Exception as e:          # a broken system gives null rows, not a crash
                    log(f"{system} {case}: FAILED: {e}")
                    rate_rows(system, case, None, f"failed: {str(e).splitlines()[0][:120]}")
                finally:
                    if srv is not None:
                        srv.stop()

        if "partition" in cases:
            for system in systems:
                if system == "kea" and not (kea_ok and ha_ok):
                    row("kea", "partition", "duplicate_addresses", None, "addresses",
                        kea_why or ha_why)
                    continue
                if system == "appliance":
                    factory = lambda: appliance(True, mclt_s=PARTITION_MCLT_S)   # noqa: E731
                    note = (f"appliance dhcp6 pair split-scope, mclt_s {PARTITION_MCLT_S}, shipped "
                            "failover otherwise (no automatic partner-down)")
                else:
                    factory = lambda: kea("hot-standby", shipped=True)   # noqa: E731
                    note = KEA_SHIPPED.format(mode="hot-standby")
                srv = None
                try:
                    srv = factory()
                    log(f"{system} partition: started")
                    pr = partition_case(lab, work, srv, args.quick)
                    row(system, "partition", "duplicate_addresses", pr["duplicates"],
                        "addresses+prefixes", f"{note}; cut {pr['cut_s']:.0f} s, one client group "
                        "reaches only a, the other only b")
                    row(system, "partition", "served_in_cut", pr["served_in_cut"], "clients",
                        f"new clients first bound during the cut (~{pr['arrived_in_cut']} "
                        "arrived in it)")
                except Exception as e:
                    log(f"{system} partition: FAILED: {e}")
                    row(system, "partition", "duplicate_addresses", None, "addresses+prefixes",
                        f"failed: {str(e).splitlines()[0][:120]}")
                finally:
                    if srv is not None:
                        srv.stop()

        if "failover" in cases:
            for system in systems:
                if system == "kea" and not (kea_ok and ha_ok):
                    null_rows("kea", ("failover",), kea_why or ha_why)
                    continue
                if system == "appliance":
                    factory = lambda: appliance(True)            # noqa: E731
                    note = ("appliance dhcp6 pair, shipped failover defaults (no automatic "
                            "partner-down, heartbeats 100 ms x 3)")
                    deadline = 30.0
                else:
                    factory = lambda: kea("hot-standby", shipped=True)   # noqa: E731
                    note = KEA_SHIPPED.format(mode="hot-standby")
                    deadline = 150.0
                srv = None
                try:
                    srv = factory()
                    log(f"{system} failover: started")
                    fo = failover_case(lab, work, srv, n_clients, deadline)
                    row(system, "failover", "serve_after_death_ms", fo["serve_after_death_ms"],
                        "ms", note + ("; new clients: the survivor answers them from its own "
                                      "pool half in NORMAL too (split pools, no client owner)"
                                      if system == "appliance" else ""))
                    row(system, "failover", "kept_address_pct", fo["kept_address_pct"], "%",
                        f"{note}; address AND prefix kept by REBIND; {fo['dead_kept']} of the "
                        f"{fo['dead_total']} (of {fo['total']}) clients the dead partner had "
                        "served")
                except Exception as e:
                    log(f"{system} failover: FAILED: {e}")
                    why = f"failed: {str(e).splitlines()[0][:120]}"
                    row(system, "failover", "serve_after_death_ms", None, "ms", why)
                    row(system, "failover", "kept_address_pct", None, "%", why)
                finally:
                    if srv is not None:
                        srv.stop()
    return finish(rows, args)


def finish(rows, args) -> int:
    return report("dhcp6", rows, args.json, extra=("bracket", "note"))


if __name__ == "__main__":
    sys.exit(main())
