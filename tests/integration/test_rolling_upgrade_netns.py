"""Rolling upgrade of a pair with clients running throughout (issue 17, deliver 4).

Two nodes in namespaces, both started from the *previous release* (commit 33b2f38,
unpacked by tests/support/old_release.py from git, or from the committed snapshot in a
shallow clone): heartbeats, the TLS peer link, a VIP (``preempt = false``) that the SIP
registrar follows, and a split-scope dhcp4 failover pair.  From a client namespace,
throughout the whole procedure:

* ``ping`` to the VIP every 100 ms, and a sampler that looks for the VIP on both nodes'
  NICs every ~100 ms;
* a DHCP crowd (tests/support/dhcp4_crowd.py): new relayed clients every 250 ms, each
  renewing (rebinding broadcast) every T1 = 5 s (lease 10 s);
* sipp registering new users through the VIP (5 per second).

The procedure is the README's "Rolling upgrade": ``maintenance on`` b, ``appliancectl
upgrade-check`` (safe to stop), stop b, start b from this checkout, ``upgrade-check
--rejoined`` (both partners NORMAL again, b went through RECOVER, SIP replication
caught up), ``maintenance off`` b; the same for a (its maintenance
moves the VIP to b).  While a is old and b new the pair runs mixed versions.

Checked afterwards: the VIP never on both NICs, ping loss bounded (the one VIP move),
no DHCP address ACKed to two clients, no client NAKed or moved to another address, every
unexpired ACKed lease bound on both nodes, every REGISTER that got a 200 present on
both nodes.  A second test upgrades an encapsulation DN pair the same way under an EN
client (old release) pinging through its tunnel: the EN keeps its address and its
tunnels.  Needs root, namespaces and sipp: skipped without them, failed under CI.

For experiments, ``UPGRADE_OLD_TREE`` / ``UPGRADE_NEW_TREE`` (directories with
``appliance``, ``services``, ``plugins`` and the twistd dropin) replace the previous
release / this checkout, e.g. to check that the next wire version still meets this one
(the checks on which release reports what are then left out).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.support import sipp
from tests.support.cluster_lab import wait_for
from tests.support.dhcp4_crowd import overlapping, read_acks
from tests.support.node_process import ROOT, twistd_command
from tests.support.old_release import OLD_COMMIT, unpack_old_release
from tests.support.require import require_binary, require_root, unavailable

pytestmark = pytest.mark.integration
pytest_plugins = ["tests.support.netns"]

ADDR = {"a": "10.79.0.1", "b": "10.79.0.2"}
OTHER = {"a": "b", "b": "a"}
CLIENT = "10.79.0.10"
VIP = "10.79.0.100"
LEASE_S = 10
CROWD_RATE = 4            # new DHCP clients per second
SIP_RATE = 5              # new SIP users per second
MAX_PING_LOSS = 30        # pings (100 ms apart) lost over the whole procedure: 3 s
MIXED_S = 3.0             # seconds of client traffic with a old and b new, both NORMAL


def node_config(node: str, tmp, keys) -> str:
    peer = OTHER[node]
    role = "primary" if node == "a" else "secondary"
    return f"""
[node]
id = "{node}"
state_dir = "{tmp}/state-{node}"

[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{tmp}/state-{node}/admin.token"

[cluster]
peers = [{{ id = "{peer}", address = "{ADDR[peer]}" }}]
bind_address = "{ADDR[node]}"
heartbeat_interval_ms = 100
dead_after = 3
auth_key_file = "{keys}/cluster.key"
peer_link = "ssl:8742"
tls = {{ cert = "{keys}/{node}.pem", key = "{keys}/{node}.key", ca = "{keys}/ca.pem" }}
auto_partner_down_s = 0

[[vip]]
name = "vip-sip"
address = "{VIP}/16"
interface = "eth0"
priority = {{ a = 200, b = 100 }}
preempt = false

[services.sip]
listen_address = "0.0.0.0"
port = 5060
domains = ["example.test"]
resource = "vip-sip"

[services.sip.replication]
peers = ["{peer}"]
mode = "sync"
timeout_s = 2

[services.dhcp4]
interface = "eth0"
failover = {{ peer = "{peer}", role = "{role}", mode = "split-scope", split = 50, delay_s = 0, mclt_s = 600, max_unacked = 1000 }}

[[services.dhcp4.subnets]]
id = 7
subnet = "10.79.0.0/16"
pool = ["10.79.1.0", "10.79.255.254"]
routers = ["{ADDR['a']}"]
lease_time_s = {LEASE_S}
"""


class Pair:
    """The two nodes; each runs the code of ``tree[node]`` (a PYTHONPATH root)."""

    def __init__(self, lab, tmp, old_root):
        self.lab, self.tmp = lab, tmp
        self.trees = {"old": str(old_root), "new": os.environ.get("UPGRADE_NEW_TREE", str(ROOT))}
        self.running: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        keys = tmp / "keys"
        subprocess.run([sys.executable, "-m", "appliance.cluster.keys", str(keys), "--node",
                        f"a={ADDR['a']}", "--node", f"b={ADDR['b']}"], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        for node in ("a", "b"):
            (tmp / f"{node}.toml").write_text(node_config(node, tmp, keys))

    def start(self, node, tree):
        log = open(self.tmp / f"{node}.log", "a")
        log.write(f"==== starting {node} from the {tree} tree\n")
        log.flush()
        env = {**os.environ, "PYTHONPATH": self.trees[tree]}
        self.procs[node] = self.lab.popen(node, *twistd_command(), "-c",
                                          str(self.tmp / f"{node}.toml"), stdout=log,
                                          stderr=subprocess.STDOUT, cwd=str(self.tmp), env=env)
        self.running[node] = tree
        wait_for(lambda: "error" not in self.rpc(node, "system.version"), 30,
                 f"{node} ({tree}) answering\n" + self.logs())

    def stop(self, node):
        proc = self.procs.pop(node)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        self.running.pop(node)

    def rpc(self, node, method, params=None):
        # appliancectl of this checkout, against either release's node
        args = [sys.executable, "-m", "appliance.admin.ctl", "--url",
                "http://127.0.0.1:8740/rpc", "--token-file",
                f"{self.tmp}/state-{node}/admin.token", "--json", "call", method]
        if params is not None:
            args.append(json.dumps(params))
        res = self.lab.run(node, *args, check=False, timeout=30)
        try:
            return json.loads(res.stdout) if res.returncode == 0 else {"error": res.stderr.strip()}
        except ValueError:
            return {"error": res.stdout[-300:]}

    def ctl(self, node, *args):
        cmd = [sys.executable, "-m", "appliance.admin.ctl", "--url", "http://127.0.0.1:8740/rpc",
               "--token-file", f"{self.tmp}/state-{node}/admin.token", *args]
        return self.lab.run(node, *cmd, check=False, timeout=30)

    def partners_normal(self) -> bool:
        return all(self.rpc(n, "cluster.status").get("partners", {}).get(OTHER[n]) == "NORMAL"
                   for n in ("a", "b"))

    def sip_caught_up(self) -> bool:
        for n in ("a", "b"):
            repl = self.rpc(n, "sip.stats").get("replication") or {}
            other = OTHER[n]
            if (repl.get("backlog", {}).get(other) != 0
                    or repl.get("full_resync_needed", {}).get(other)
                    or repl.get("peer_bindings", {}).get(other) is None):
                return False
        return True

    def vip_owner(self, node) -> str | None:
        res = self.rpc(node, "cluster.status").get("resources", {}).get("vip-sip", {})
        return res.get("owner")

    def logs(self):
        out = []
        for n in ("a", "b"):
            path = self.tmp / f"{n}.log"
            lines = path.read_text(errors="replace").splitlines() if path.exists() else []
            keep = [ln for ln in lines if "Traceback" in ln or "Error" in ln or "partner" in ln
                    or "resource vip-sip" in ln or "====" in ln or "peer link" in ln]
            out.append(f"--- {n}\n" + "\n".join(keep[-30:]) + f"\n--- {n} (last lines)\n"
                       + "\n".join(lines[-12:]))
        return "\n".join(out)


class VipSampler(threading.Thread):
    """Which nodes have the VIP on their NIC, about every 100 ms.

    The two NICs cannot be read at the same instant, and a move between two reads
    would look like two holders: each sample reads x, y, x (x alternating between the
    nodes) and counts an overlap only when x held the VIP at both of its reads and y at
    the read in between."""

    def __init__(self, lab):
        super().__init__(daemon=True)
        self.lab = lab
        self.stop = threading.Event()
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.overlaps: list[tuple[float, float]] = []      # (first read, last read)

    def holds(self, n) -> bool:
        out = self.lab.host("ip", "-n", self.lab.nodes[n].ns, "-o", "addr", "show",
                            "dev", "eth0", check=False).stdout
        return f"inet {VIP}/" in out

    def run(self):
        first = "a"
        while not self.stop.is_set():
            second = OTHER[first]
            t0 = time.time()
            x1 = self.holds(first)
            y = self.holds(second)
            x2 = self.holds(first)
            if x1 and y and x2:
                self.overlaps.append((t0, time.time()))
            holders = tuple(n for n, h in ((first, x2), (second, y)) if h)
            self.samples.append((t0, holders))
            first = second
            self.stop.wait(0.1)


def acked_users(log_text: str, prefix: str) -> set[str]:
    """Users whose REGISTER got a 200, from sipp's -trace_msg log."""
    users = set()
    for block in log_text.split("message received"):
        head = block.split("\n\n", 1)[-1].lstrip()
        if head.startswith("SIP/2.0 200") and "REGISTER" in head:
            m = re.search(rf"^To:\s*<sip:({prefix}\d+)@", head, re.MULTILINE)
            if m:
                users.add(m.group(1))
    return users


def bound_table(pair, node) -> dict[str, str]:
    """address -> hwaddr of every bound lease (paged through dhcp4.leases)."""
    table, cursor = {}, None
    while True:
        params = {"limit": 1000, "state": "bound"}
        if cursor:
            params["cursor"] = cursor
        page = pair.rpc(node, "dhcp4.leases", params)
        if "leases" not in page:
            raise AssertionError(f"dhcp4.leases on {node}: {page}")
        for le in page["leases"]:
            table[le["address"]] = le["hwaddr"].replace(":", "").lower()
        cursor = page.get("cursor")
        if not cursor:
            return table


def upgrade(pair, node, steps: list):
    """The README procedure on one node; ``steps`` gets (what, seconds)."""
    t = time.monotonic()
    res = pair.ctl(node, "maintenance", "on")
    assert res.returncode == 0, res.stderr
    other = OTHER[node]
    # the partner took over: it owns the VIP and serves alone
    wait_for(lambda: pair.vip_owner(other) == other and pair.vip_owner(node) != node, 15,
             f"{other} owning the VIP after maintenance on {node}\n" + pair.logs())
    wait_for(lambda: pair.rpc(other, "cluster.status").get("partners", {}).get(node)
             == "PARTNER-DOWN", 15, f"{other} PARTNER-DOWN for {node} in maintenance\n"
             + pair.logs())
    res = pair.ctl(node, "upgrade-check", "--wait", "30")
    assert res.returncode == 0, f"upgrade-check on {node}:\n{res.stdout}{res.stderr}"
    assert "safe to stop this node" in res.stdout, res.stdout
    steps.append((f"{node}: maintenance on -> partner serving alone", time.monotonic() - t))
    t = time.monotonic()
    pair.stop(node)
    pair.start(node, "new")
    steps.append((f"{node}: stop old, start new (answering)", time.monotonic() - t))
    t = time.monotonic()
    res = pair.ctl(node, "upgrade-check", "--rejoined", "--wait", "60")
    assert res.returncode == 0, (f"upgrade-check --rejoined on {node}:\n{res.stdout}"
                                 f"{res.stderr}\n{pair.logs()}")
    wait_for(pair.partners_normal, 45, f"both partners NORMAL after {node}'s upgrade\n"
             + pair.logs())
    wait_for(pair.sip_caught_up, 30, f"SIP replication caught up after {node}'s upgrade\n"
             + pair.logs())
    res = pair.ctl(node, "maintenance", "off")
    assert res.returncode == 0, res.stderr
    wait_for(pair.partners_normal, 30, f"both partners NORMAL after maintenance off on {node}\n"
             + pair.logs())
    steps.append((f"{node}: RECOVER -> NORMAL, SIP caught up", time.monotonic() - t))


def test_rolling_upgrade_from_the_previous_release_keeps_every_client(netns_lab, tmp_path):
    """Upgrade b then a from 33b2f38 to this checkout with ping, DHCP and SIP clients
    running: one VIP owner at a time, bounded ping loss, no lease or binding lost."""
    require_root()
    require_binary("sipp")
    require_binary("ping")
    if os.environ.get("UPGRADE_OLD_TREE"):
        run_upgrade(netns_lab, tmp_path, os.environ["UPGRADE_OLD_TREE"], "UPGRADE_OLD_TREE")
        return
    old_root = tmp_path / "old-release"
    try:
        source = unpack_old_release(old_root)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        unavailable(f"the previous release ({OLD_COMMIT[:7]}) is not available: {e}")
    try:
        run_upgrade(netns_lab, tmp_path, old_root, source)
    finally:
        shutil.rmtree(old_root, ignore_errors=True)     # the old tree goes with the test


def run_upgrade(lab, tmp_path, old_root, source):
    lab.add_node("a", f"{ADDR['a']}/16")
    lab.add_node("b", f"{ADDR['b']}/16")
    lab.add_node("client", f"{CLIENT}/16")
    pair = Pair(lab, tmp_path, old_root)
    started = time.monotonic()
    steps: list[tuple[str, float]] = []
    for node in ("a", "b"):
        pair.start(node, "old")
    wait_for(lambda: pair.vip_owner("a") == "a", 30, "a owning the VIP\n" + pair.logs())
    wait_for(pair.partners_normal, 30, "both partners NORMAL (old release)\n" + pair.logs())
    wait_for(lambda: (pair.rpc("a", "cluster.status").get("peer_link") or {}).get("b", {})
             .get("connected"), 20, "the peer link\n" + pair.logs())
    experiment = bool(os.environ.get("UPGRADE_OLD_TREE") or os.environ.get("UPGRADE_NEW_TREE"))
    if not experiment:
        assert "version" not in pair.rpc("a", "cluster.status")["peer_link"]["b"], \
            "node a is not running the old release"
    steps.append(("both old nodes up, NORMAL", time.monotonic() - started))

    # -- clients, running throughout ------------------------------------------------
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    sampler = VipSampler(lab)
    sampler.start()
    ping = lab.popen("client", "ping", "-n", "-i", "0.1", "-W", "1", VIP,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    acks_file = tmp_path / "acks.jsonl"
    crowd = lab.popen("client", sys.executable, "-m", "tests.support.dhcp4_crowd",
                      "--giaddr", CLIENT, "--out", str(acks_file), "--rate", str(CROWD_RATE),
                      "--duration", "600", "--renew", "--tries", "8",
                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    xml = tmp_path / "register.xml"
    xml.write_text(sipp.register_only(prefix="up"))
    sipp_dir = tmp_path / "sipp"
    sipp_dir.mkdir()
    register = lab.popen("client", sipp.sipp_binary() or "sipp", f"{VIP}:5060", "-sf", str(xml),
                         "-m", "100000", "-r", str(SIP_RATE), "-l", "50", "-t", "u1",
                         "-i", CLIENT, "-nostdin", "-trace_msg", "-timeout", "600s",
                         "-max_recv_loops", "1000", cwd=str(sipp_dir),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)                    # clients bound and registered before the first step

    # -- the procedure: b, then a ---------------------------------------------------
    upgrade(pair, "b", steps)
    mixed = pair.rpc("b", "cluster.status")["peer_link"]["a"]
    if not experiment:
        assert mixed.get("version") == 1 and mixed.get("caps") == [], mixed   # b new, a old
    mixed_from = time.time()
    time.sleep(MIXED_S)              # both serving, one release apart, replicating both ways
    mixed_until = time.time()
    # the same config files: neither release sees a config difference in the other
    for n in ("a", "b"):
        st = pair.rpc(n, "cluster.status")
        peer = st.get("peers", {}).get(OTHER[n], {})
        assert not peer.get("config_mismatch"), (n, peer.get("config_mismatch"))
        assert not [w for w in st.get("warnings", []) if "differ" in w], st.get("warnings")
    upgrade(pair, "a", steps)
    time.sleep(2)                    # a last round of client traffic on the new pair

    # -- stop the clients -----------------------------------------------------------
    register.send_signal(signal.SIGUSR1)    # sipp: stop gracefully, flush the trace
    crowd.send_signal(signal.SIGTERM)
    ping.send_signal(signal.SIGINT)
    ping_out, _ = ping.communicate(timeout=10)
    crowd.wait(timeout=10)
    try:
        register.wait(timeout=15)
    except subprocess.TimeoutExpired:
        register.kill()
    sampler.stop.set()
    sampler.join(timeout=5)
    total = time.monotonic() - started
    print(f"old release from {source}; steps: "
          + "; ".join(f"{what} {secs:.1f}s" for what, secs in steps) + f"; total {total:.0f}s")

    # -- VIP: one owner at a time, bounded loss ------------------------------------
    assert not sampler.overlaps, f"the VIP was on both NICs: {sampler.overlaps}"
    assert len(sampler.samples) > 100
    m = re.search(r"(\d+) packets transmitted, (\d+) received", ping_out)
    assert m, ping_out[-500:]
    sent, got = int(m.group(1)), int(m.group(2))
    print(f"ping: {sent} sent, {sent - got} lost; VIP samples {len(sampler.samples)}")
    assert sent > 100 and sent - got <= MAX_PING_LOSS, ping_out[-800:]

    # -- DHCP: no duplicate, no NAK, no client moved, every live lease on both ------
    acks = read_acks(acks_file)
    ok = [a for a in acks if a["type"] == "ACK"]
    naks = [a for a in acks if a["type"] == "NAK"]
    assert not overlapping(acks), f"addresses ACKed to two clients: {overlapping(acks)[:5]}"
    assert not naks, f"{len(naks)} NAKs, e.g. {naks[:3]}"
    addresses: dict[str, set[str]] = {}
    for a in ok:
        addresses.setdefault(a["mac"], set()).add(a["ip"])
    moved = {mac: ips for mac, ips in addresses.items() if len(ips) > 1}
    assert not moved, f"{len(moved)} clients moved to another address: {list(moved.items())[:3]}"
    renewed = sum(1 for mac in addresses if sum(a["mac"] == mac for a in ok) > 1)
    servers = {a["server"] for a in ok}
    mixed_servers = {a["server"] for a in ok if mixed_from <= a["t"] <= mixed_until}
    assert mixed_servers == set(ADDR.values()), \
        f"while mixed only {mixed_servers} ACKed (both should serve their split)"
    assert len(addresses) >= 40 and renewed >= 20 and servers == set(ADDR.values()), \
        (len(addresses), renewed, servers)
    now = time.time()
    last = {}
    for a in sorted(ok, key=lambda a: a["t"]):
        last[a["mac"]] = a
    live = [a for a in last.values() if a["t"] + a["lease"] > now + 3]

    def missing():
        tables = {n: bound_table(pair, n) for n in ("a", "b")}
        return {n: [(a["ip"], a["mac"]) for a in live if tables[n].get(a["ip"]) != a["mac"]]
                for n in ("a", "b")}

    lost = missing()
    deadline = time.time() + 10
    while any(lost.values()) and time.time() < deadline:
        time.sleep(1)
        lost = missing()
    assert not lost["a"] and not lost["b"], (
        f"ACKed leases not bound on a: {len(lost['a'])} {lost['a'][:5]}; "
        f"on b: {len(lost['b'])} {lost['b'][:5]}\n{pair.logs()}")

    # -- SIP: every 200'd REGISTER on both nodes ------------------------------------
    text = "".join(p.read_text(errors="replace") for p in sipp_dir.glob("*_messages.log"))
    registered = acked_users(text, "up")
    assert len(registered) >= 50, f"only {len(registered)} REGISTERs got a 200"
    wait_for(pair.sip_caught_up, 20, "SIP replication caught up at the end\n" + pair.logs())
    for n in ("a", "b"):
        rows = pair.rpc(n, "sip.bindings")["bindings"]
        have = {r["aor"].split(":", 1)[1].split("@")[0] for r in rows}
        gone = sorted(registered - have)
        assert not gone, f"{n} lacks {len(gone)} acknowledged bindings: {gone[:10]}"
    print(f"dhcp4: {len(addresses)} clients, {len(ok)} ACKs ({renewed} renewed), {len(live)} "
          f"live leases on both; sip: {len(registered)} bindings on both")


# -- the encapsulation DN pair ---------------------------------------------------------

def test_rolling_upgrade_of_the_dn_pair_keeps_the_en_tunnel(netns_lab, tmp_path):
    """Two DNs (cluster peers, slice resources) and an EN client, all from the previous
    release; the DNs are upgraded one after the other (maintenance on, upgrade-check,
    stop, start new, upgrade-check --rejoined, maintenance off) while the EN pings the
    server behind the ESR through its tunnel every 50 ms: the EN keeps its address (the
    session survives), pings are lost only around the handovers, and at the end both
    tunnels are up to new DNs (the EN itself stays on the old release)."""
    require_root()
    require_binary("ping")
    from tests.support.encap_lab import SERVER, EncapLab
    if os.environ.get("UPGRADE_OLD_TREE"):
        old_root, cleanup = os.environ["UPGRADE_OLD_TREE"], False
    else:
        old_root, cleanup = tmp_path / "old-release", True
        try:
            unpack_old_release(old_root)
        except (RuntimeError, subprocess.CalledProcessError) as e:
            unavailable(f"the previous release ({OLD_COMMIT[:7]}) is not available: {e}")
    new_root = os.environ.get("UPGRADE_NEW_TREE", str(ROOT))
    trees = {"old": str(old_root), "new": new_root}
    running: dict[str, str] = {}

    class Lab(EncapLab):
        def start_dn(self, name, timeout=30.0, tree="old"):
            d = self.wd / name
            log = open(d / "twistd.log", "a")
            log.write(f"==== starting {name} from the {tree} tree\n")
            log.flush()
            proc = self.lab.popen(name, *twistd_command(), "-c", str(d / "node.toml"),
                                  cwd=str(d), env={**os.environ, "PYTHONPATH": trees[tree]},
                                  stdout=log, stderr=subprocess.STDOUT)
            self.procs[name] = proc
            running[name] = tree
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.log(name)}")
                if "encap: DN " in self.log(name).rsplit("==== starting", 1)[-1]:
                    return proc
                time.sleep(0.1)
            raise RuntimeError(f"{name} did not start within {timeout}s:\n{self.log(name)}")

        def start_en(self):
            log = open(self.wd / "en.log", "a")
            proc = self.lab.popen("en", sys.executable, "-m", "services.encap.en", "--config",
                                  str(self.wd / "en.toml"), "--status-file",
                                  str(self.wd / "en.status"),
                                  env={**os.environ, "PYTHONPATH": trees["old"]},
                                  stdout=log, stderr=subprocess.STDOUT)
            self.procs["en"] = proc
            return proc

        def ctl(self, name, *args):
            d = self.wd / name
            return self.lab.run(name, sys.executable, "-m", "appliance.admin.ctl", "--url",
                                "http://127.0.0.1:8740/rpc", "--token-file",
                                str(d / "state" / "admin.token"), *args, check=False,
                                timeout=120)

    lab = netns_lab
    el = Lab(lab, tmp_path, keepalive_ms=100, dead_after=4, cluster=True, keys="psk").build()
    try:
        el.start_dn("dn1")
        el.start_dn("dn2")
        time.sleep(1.0)                       # the peers see each other before the EN comes
        el.start_en()
        st = el.wait_en(lambda s: s.get("configured") and s.get("confirmed")
                        and all(s["links"][n]["state"] == "up" for n in ("dn1", "dn2")),
                        timeout=30, what="EN up on both DNs")
        address = st["address"]
        pinger = lab.popen("en", "ping", "-n", "-i", "0.05", "-W", "1", SERVER,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ping_started = time.monotonic()
        time.sleep(1.0)
        steps = []
        for dn in ("dn2", "dn1"):
            t = time.monotonic()
            res = el.ctl(dn, "maintenance", "on")
            assert res.returncode == 0, res.stderr
            res = el.ctl(dn, "upgrade-check", "--wait", "30")
            assert res.returncode == 0, f"upgrade-check on {dn}:\n{res.stdout}{res.stderr}"
            proc = el.procs[dn]
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
            el.start_dn(dn, tree="new")
            res = el.ctl(dn, "upgrade-check", "--rejoined", "--wait", "60")
            assert res.returncode == 0, \
                f"upgrade-check --rejoined on {dn}:\n{res.stdout}{res.stderr}\n{el.log(dn)[-3000:]}"
            res = el.ctl(dn, "maintenance", "off")
            assert res.returncode == 0, res.stderr
            el.wait_en(lambda s: s.get("confirmed") and all(
                s["links"][n]["state"] == "up" for n in ("dn1", "dn2")), timeout=30,
                what=f"EN tunnels up after {dn}'s upgrade")
            steps.append(f"{dn} {time.monotonic() - t:.1f}s")
        time.sleep(1.0)
        pinger.send_signal(signal.SIGINT)
        out, _ = pinger.communicate(timeout=10)
        m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
        assert m, out[-500:]
        sent, got = int(m.group(1)), int(m.group(2))
        st = el.en_status()
        print(f"encap rolling upgrade: {', '.join(steps)}; ping {sent} sent, {sent - got} "
              f"lost; EN events {[e['what'] for e in st.get('events', [])][-8:]}")
        assert running == {"dn1": "new", "dn2": "new"}
        assert st.get("address") == address, "the EN lost its address (a new session)"
        # the pinger ran through both upgrades (at least half its 20/s, however quick
        # they were: ~4 s on an idle box, 12 s on a busy one); at most 2 s of it lost
        ping_s = time.monotonic() - ping_started
        assert sent >= 10 * ping_s - 10 and sent - got <= 40, (ping_s, out[-800:])
    finally:
        el.close()
        if cleanup:
            shutil.rmtree(old_root, ignore_errors=True)
