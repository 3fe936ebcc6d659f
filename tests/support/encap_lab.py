"""Namespaces for the encap service: en, dn1, dn2, esr, server (tests and bench/encap.py).

::

    en 10.99.0.10 ---+                                  (tunnel: UDP to dn1/dn2:7400)
    dn1 10.99.0.1 ---+-- br0 --- esr 10.99.0.254 eth0 | eth1 10.210.0.1 --- server 10.210.0.10
    dn2 10.99.0.2 ---+

The DNs run ``twistd -n appliance`` with the ``encap`` service (TUN ``encap0``,
subnets 10.200.0.0/24 and 10.200.1.0/24, each the other's secondary) and the
source rule to the ESR (they have no default route).  How the ESR finds the DN
serving an EN (``routing``):

* ``"l2"`` (default): the L2 announce mode (proxy ARP + gratuitous ARP on eth0);
  the ESR routes 10.200.0.0/16 on-link on eth0, so the DN answering ARP for an
  EN address (the one with a route to it) gets its traffic.
* ``"esr"``: the DNs and the ESR share one Redis (a unix socket: a file, so it
  works across namespaces) holding the EN-DN mapping table; a ``twistd -n
  appliance`` node with the ``esr`` service in the esr namespace installs one
  route per slice / taken-over EN via its DN (:meth:`start_esr`).
* ``"bird"``: the thesis's setup: the ESR has static routes to each DN's home
  subnet; a takeover's /32 kernel route (proto 228) on the DN is learned by
  BIRD 2 there and carried by OSPF to BIRD on the ESR (etc/bird/*.conf, BIRD's
  default kernel scan time; :meth:`start_bird`).

Keys (``keys``): ``"per-en"`` (default: the DNs hold an EN keys file with en1's
and en2's keys and a ticket secret; the EN has its own key) or ``"psk"`` (one
shared key).  The EN runs ``appliance-en`` (id en1) with 10.210.0.0/24 through
the tunnel.
Everything is in namespaces of a :class:`tests.support.netns.Lab`; call
:meth:`close` after the lab (it stops what lives outside it: Redis).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.node_process import env_with_dropins, twistd_command

SERVER = "10.210.0.10"
DN_ADDR = {"dn1": "10.99.0.1", "dn2": "10.99.0.2"}
SUBNET = {"dn1": "10.200.0.0/24", "dn2": "10.200.1.0/24"}


class EncapLab:
    def __init__(self, lab, workdir: Path, *, keepalive_ms: int = 50, dead_after: int = 4,
                 soft_handoff: bool = True, announce: bool = True, cluster: bool = False,
                 active_keepalive_ms: int | None = None,
                 dn_endpoints: dict[str, tuple[str, int]] | None = None,
                 routing: str = "l2", keys: str = "per-en"):
        if routing not in ("l2", "esr", "bird"):
            raise ValueError("routing is l2, esr or bird")
        if keys not in ("per-en", "psk"):
            raise ValueError("keys is per-en or psk")
        self.lab = lab
        self.routing = routing
        self.keys = keys
        self.redis = None
        self.birds: list = []
        self.wd = Path(workdir)
        self.keepalive_ms, self.dead_after = keepalive_ms, dead_after
        self.soft_handoff = soft_handoff
        self.announce = announce and routing == "l2"
        self.cluster = cluster            # dn1 and dn2 as [cluster] peers (slice resources)
        self.active_keepalive_ms = active_keepalive_ms   # None: the EN's default
        #: where the EN sends to reach each DN (default: the DN itself, port 7400)
        self.dn_endpoints = dn_endpoints or {n: (a, 7400) for n, a in DN_ADDR.items()}
        self.procs: dict[str, subprocess.Popen] = {}
        self.psk = self.wd / "encap.psk"          # the EN's key file (shared PSK or its own)
        self.en_keys = self.wd / "en.keys"        # per-en: the DNs' keys file ...
        self.ticket_key = self.wd / "ticket.key"  # ... and their ticket secret

    # ------------------------------------------------------------------
    def build(self) -> "EncapLab":
        lab = self.lab
        self.wd.mkdir(parents=True, exist_ok=True)
        key = os.urandom(32).hex()
        self.psk.write_text(key + "\n")
        if self.keys == "per-en":
            # en1's own key; en2's exists too (a key holder the DNs know, not this EN)
            self.en_keys.write_text(f"en1 {key}\nen2 {os.urandom(32).hex()}\n")
            self.ticket_key.write_text(os.urandom(32).hex() + "\n")
        lab.add_node("en", "10.99.0.10/24")
        # the EN shares the bridge with the ESR: it must not answer ARP for its tunnel
        # address on eth0 (replies would bypass the tunnel)
        lab.sysctl("en", "net.ipv4.conf.all.arp_ignore", 1)
        lab.sysctl("en", "net.ipv4.conf.eth0.arp_ignore", 1)
        for name in ("dn1", "dn2"):
            lab.add_node(name, DN_ADDR[name] + "/24")
            for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.all.rp_filter", 0),
                               ("net.ipv4.conf.default.rp_filter", 0)):
                lab.sysctl(name, key, value)
        lab.add_node("esr", "10.99.0.254/24")
        lab.sysctl("esr", "net.ipv4.ip_forward", 1)
        # the server sits behind the ESR on its own link
        server = lab.add_namespace("server")
        esr = lab.ns_name("esr")
        lab.host("ip", "-n", esr, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0",
                 "netns", server)
        lab.host("ip", "-n", esr, "addr", "add", "10.210.0.1/24", "dev", "eth1")
        lab.host("ip", "-n", esr, "link", "set", "eth1", "up")
        lab.host("ip", "-n", server, "addr", "add", SERVER + "/24", "dev", "eth0")
        lab.host("ip", "-n", server, "link", "set", "eth0", "up")
        lab.host("ip", "-n", server, "route", "add", "default", "via", "10.210.0.1")
        if self.routing == "l2":
            lab.host("ip", "-n", esr, "route", "add", "10.200.0.0/16", "dev", "eth0")
        elif self.routing == "bird":
            for name in ("dn1", "dn2"):      # home subnets: the operator's static routes
                lab.host("ip", "-n", esr, "route", "add", SUBNET[name], "via", DN_ADDR[name])
        else:
            from tests.support.redis_server import RedisServer
            self.redis_sock = self.wd / "redis.sock"
            self.redis = RedisServer(
                extra_config=f"unixsocket {self.redis_sock}\nunixsocketperm 700",
                persistence="none").start()
            self._esr_config()
        for name in ("dn1", "dn2"):
            self._dn_config(name)
        self._en_config()
        return self

    def _dn_config(self, name: str) -> None:
        d = self.wd / name
        d.mkdir(exist_ok=True)
        other = "dn2" if name == "dn1" else "dn1"
        announce = 'announce_interface = "eth0"\n' if self.announce else ""
        cluster = ""
        if self.cluster:
            key = self.wd / "cluster.key"
            if not key.exists():
                key.write_text(os.urandom(32).hex() + "\n")
            cluster = f"""
[cluster]
peers = [{{ id = "{other}", address = "{DN_ADDR[other]}" }}]
heartbeat_port = 8741
heartbeat_interval_ms = 100
dead_after = 3
auth_key_file = "{key}"
"""
        (d / "node.toml").write_text(f"""
[node]
id = "{name}"
state_dir = "{d}/state"

{self._store_config()}
[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{d}/state/admin.token"
{cluster}
[services.encap]
listen_address = "{DN_ADDR[name]}"
port = 7400
{self._key_config()}
tun = "encap0"
slice_prefixlen = 26
esr_gateway = "10.99.0.254"
route_table = 100
{announce}
[[services.encap.nodes]]
id = "{name}"
subnet = "{SUBNET[name]}"
secondaries = ["{other}"]

[[services.encap.nodes]]
id = "{other}"
subnet = "{SUBNET[other]}"
secondaries = ["{name}"]
""")

    def _key_config(self) -> str:
        if self.keys == "per-en":
            return (f'en_keys_file = "{self.en_keys}"\n'
                    f'ticket_key_file = "{self.ticket_key}"')
        return f'psk_file = "{self.psk}"'

    def _store_config(self) -> str:
        if self.routing == "esr":
            return (f'[store]\nbackend = "redis"\nurl = "unix://{self.redis_sock}"\n'
                    f'namespace = "encaplab"\n')
        return '[store]\nbackend = "memory"\nfsync = "never"\n'

    def _esr_config(self) -> None:
        d = self.wd / "esr"
        d.mkdir(exist_ok=True)
        (d / "node.toml").write_text(f"""
[node]
id = "esr"
state_dir = "{d}/state"

{self._store_config()}
[admin]
listen = "tcp:8740:interface=127.0.0.1"
token_file = "{d}/state/admin.token"

[services.esr]
next_hops = {{ dn1 = "{DN_ADDR['dn1']}", dn2 = "{DN_ADDR['dn2']}" }}
""")

    def start_esr(self, timeout: float = 30.0) -> subprocess.Popen:
        """routing "esr": the route agent node in the esr namespace."""
        d = self.wd / "esr"
        log = open(d / "twistd.log", "a")
        proc = self.lab.popen("esr", *twistd_command(), "-c", str(d / "node.toml"),
                              cwd=str(d), env=env_with_dropins(), stdout=log,
                              stderr=subprocess.STDOUT)
        self.procs["esr"] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"esr exited {proc.returncode}:\n{self.log('esr')}")
            if "esr: following the mapping table" in self.log("esr"):
                return proc
            time.sleep(0.1)
        raise RuntimeError(f"esr did not start within {timeout}s:\n{self.log('esr')}")

    def start_bird(self) -> None:
        """routing "bird": BIRD 2 on dn1, dn2 and the ESR (etc/bird configs, BIRD's
        default kernel scan time), waited for until the OSPF adjacencies are Full."""
        from bench.encap_bird import start_birds
        d = self.wd / "bird"
        d.mkdir(exist_ok=True)
        self.birds = start_birds(self.lab, self.lab.ns_name("esr"),
                                 [self.lab.ns_name("dn1"), self.lab.ns_name("dn2")], d)

    def start_routing(self) -> None:
        """What the routing mode needs besides the DNs (before them)."""
        if self.routing == "esr":
            self.start_esr()
        elif self.routing == "bird":
            self.start_bird()

    def esr_next_hop(self, address: str) -> str | None:
        """The gateway the ESR's kernel uses towards ``address`` now (None: on-link or
        unreachable)."""
        out = self.lab.run("esr", "ip", "-j", "route", "get", address, check=False)
        try:
            return json.loads(out.stdout)[0].get("gateway")
        except (ValueError, IndexError, AttributeError):
            return None

    def wait_esr_home(self, address: str, home: str, timeout: float = 60.0) -> float:
        """Until the ESR routes ``address`` via its ``home`` DN again (routing "esr" or
        "bird": a takeover's route is withdrawn); seconds waited."""
        t0 = time.monotonic()
        while self.esr_next_hop(address) != DN_ADDR[home]:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"the ESR still routes {address} via "
                                     f"{self.esr_next_hop(address)} after {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - t0

    def close(self) -> None:
        """After the lab's own close (or before: stops BIRD and Redis)."""
        for b in self.birds:
            b.stop()
        self.birds = []
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def _en_config(self) -> None:
        (self.wd / "en.toml").write_text(f"""
[en]
id = "en1"
psk_file = "{self.psk}"
tun = "en0"
routes = ["10.210.0.0/24"]
keepalive_ms = {self.keepalive_ms}
{"" if self.active_keepalive_ms is None else f"active_keepalive_ms = {self.active_keepalive_ms}"}
dead_after = {self.dead_after}
handshake_retry_ms = 200
soft_handoff = {"true" if self.soft_handoff else "false"}
status_interval_s = 0.2

[[en.dns]]
id = "dn1"
address = "{self.dn_endpoints['dn1'][0]}"
port = {self.dn_endpoints['dn1'][1]}

[[en.dns]]
id = "dn2"
address = "{self.dn_endpoints['dn2'][0]}"
port = {self.dn_endpoints['dn2'][1]}
""")

    # ------------------------------------------------------------------
    def start_dn(self, name: str, timeout: float = 30.0) -> subprocess.Popen:
        d = self.wd / name
        log = open(d / "twistd.log", "a")
        proc = self.lab.popen(name, *twistd_command(), "-c", str(d / "node.toml"),
                              cwd=str(d), env=env_with_dropins(), stdout=log,
                              stderr=subprocess.STDOUT)
        self.procs[name] = proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.log(name)}")
            if "encap: DN " in self.log(name):
                return proc
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start within {timeout}s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        p = self.wd / name / "twistd.log"
        return p.read_text() if p.exists() else ""

    def start_en(self) -> subprocess.Popen:
        log = open(self.wd / "en.log", "a")
        proc = self.lab.popen("en", sys.executable, "-m", "services.encap.en", "--config",
                              str(self.wd / "en.toml"), "--status-file",
                              str(self.wd / "en.status"), env=env_with_dropins(),
                              stdout=log, stderr=subprocess.STDOUT)
        self.procs["en"] = proc
        return proc

    def en_status(self) -> dict:
        try:
            return json.loads((self.wd / "en.status").read_text())
        except (OSError, ValueError):
            return {}

    def wait_en(self, predicate, timeout: float = 20.0, what: str = "EN state") -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.en_status()
            if st and predicate(st):
                return st
            if self.procs["en"].poll() is not None:
                raise RuntimeError(f"EN exited:\n{(self.wd / 'en.log').read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"{what} not reached in {timeout}s: {self.en_status()}\n"
                             f"{(self.wd / 'en.log').read_text()[-3000:]}")

    def rpc(self, name: str, method: str) -> dict:
        out = self.lab.run(name, sys.executable, "-m", "appliance.admin.ctl", "--config",
                           str(self.wd / name / "node.toml"), "--json", "call", method,
                           check=True, timeout=20)
        return json.loads(out.stdout)

    def kill_dn(self, name: str) -> None:
        """kill -9 the DN process and take its link down."""
        proc = self.procs[name]
        os.kill(proc.pid, signal.SIGKILL)
        self.lab.link_down(name)
        proc.wait(timeout=10)

    def revive_dn(self, name: str) -> subprocess.Popen:
        self.lab.link_up(name)
        return self.start_dn(name)
