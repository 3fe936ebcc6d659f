"""A small network-namespace lab for integration tests.

Everything lives in namespaces this module creates, named
``apl-<random4>-<role>``; the root namespace's interfaces, addresses and
routes are never touched (veth pairs are created *inside* the switch
namespace and their far end is moved straight into the node namespace).

Topology: one switch namespace ``apl-XXXX-sw`` holding a bridge ``br0``;
every node namespace gets a veth whose inner end is ``eth0`` (or the name
you choose) and whose outer end is a bridge port.  ``Lab.two_nodes_and_client()``
builds the usual HA picture::

    node a 10.77.0.1/24 eth0 --+
    node b 10.77.0.2/24 eth0 --+-- br0 (apl-XXXX-sw)
    client 10.77.0.10/24 eth0 -+

Cleanup: ``close()`` (context-manager exit, fixture teardown) kills the
processes started with :meth:`Lab.popen`, then any process still inside the
lab's namespaces, then deletes every namespace it created, even after a
failure half-way through building.  A pid file under ``/run/apl-netns/``
records which process owns which tag, so :func:`cleanup_stale` removes
namespaces left by a crashed run (owner dead) without touching those of a
concurrent run.

Needs root and ``ip`` (iproute2); :meth:`drop_between` needs ``nft``
(nftables) and :meth:`sysctl` needs ``sysctl`` (procps).  Missing either
skips the test on a laptop and fails it under ``CI=true``
(:mod:`tests.support.require`).

Fixtures (register the module with ``pytest_plugins = ["tests.support.netns"]``):

* ``netns_lab`` -- an empty :class:`Lab`, closed after the test;
* ``two_nodes_lab`` -- a :class:`Lab` on which ``two_nodes_and_client()`` ran.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

try:
    import pytest              # the fixtures below; benches use the Lab without pytest
except ImportError:
    pytest = None

from tests.support.require import require_binary, require_root

PREFIX = "apl-"
NETNS_DIR = "/run/netns"
OWNER_DIR = "/run/apl-netns"
#: A namespace with no owner file older than this is considered stale.
ORPHAN_AGE_S = 600.0
_TAG_RE = re.compile(r"^apl-([0-9a-f]{4})-")


def _ip_bin() -> str:
    return require_binary("ip")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _delete_ns(ns: str) -> None:
    """Kill what still runs in ``ns`` (processes our tests started there), delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = [p for p in _ns_pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and any(_pid_alive(p) for p in pids):
            time.sleep(0.02)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def cleanup_stale() -> list[str]:
    """Delete ``apl-*`` namespaces whose owning process is gone.

    The owner is read from ``/run/apl-netns/<tag>.pid``; without that file a
    namespace is removed only if older than ``ORPHAN_AGE_S``.  Returns the
    names deleted.
    """
    removed: list[str] = []
    try:
        names = sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return removed
    now = time.time()
    for name in names:
        m = _TAG_RE.match(name)
        if not m:
            continue
        owner_file = os.path.join(OWNER_DIR, f"{m.group(1)}.pid")
        try:
            with open(owner_file) as f:
                owner = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            owner = None
        if owner is not None:
            if _pid_alive(owner):
                continue
        else:
            try:
                age = now - os.stat(os.path.join(NETNS_DIR, name)).st_mtime
            except FileNotFoundError:
                continue
            if age < ORPHAN_AGE_S:
                continue
        _delete_ns(name)
        removed.append(name)
    # drop owner files of tags that no longer have namespaces
    try:
        live_tags = {m.group(1) for n in os.listdir(NETNS_DIR) if (m := _TAG_RE.match(n))}
        for fname in os.listdir(OWNER_DIR):
            tag = fname.removesuffix(".pid")
            if tag not in live_tags:
                try:
                    with open(os.path.join(OWNER_DIR, fname)) as f:
                        owner = int(f.read().strip() or 0)
                except (OSError, ValueError):
                    owner = 0
                if not (owner and _pid_alive(owner)):
                    os.unlink(os.path.join(OWNER_DIR, fname))
    except FileNotFoundError:
        pass
    return removed


@dataclass
class Node:
    """One namespace attached to the lab bridge."""

    role: str
    ns: str
    ifname: str
    port: str  # the bridge-side veth in the switch namespace
    addresses: list[Any] = field(default_factory=list)

    @property
    def address(self) -> Any:
        """The first address (an ``ip_interface``)."""
        return self.addresses[0]


class Lab:
    """Namespaces, one bridge, veth pairs; deletes all of it on close."""

    def __init__(self) -> None:
        require_root()
        _ip_bin()
        self.tag = secrets.token_hex(2)
        self.prefix = f"{PREFIX}{self.tag}-"
        self.namespaces: list[str] = []
        self.nodes: dict[str, Node] = {}
        self.switch: str | None = None
        self._procs: list[subprocess.Popen] = []
        self._drops: dict[tuple[str, str], str] = {}
        self._closed = False
        cleanup_stale()
        os.makedirs(OWNER_DIR, exist_ok=True)
        with open(os.path.join(OWNER_DIR, f"{self.tag}.pid"), "w") as f:
            f.write(str(os.getpid()))

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop our processes and delete every namespace we created."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in reversed(self.namespaces):
            _delete_ns(ns)
        self.namespaces.clear()
        try:
            os.unlink(os.path.join(OWNER_DIR, f"{self.tag}.pid"))
        except FileNotFoundError:
            pass

    # -- commands ----------------------------------------------------------

    def ns_name(self, role: str) -> str:
        return f"{self.prefix}{role}"

    def _resolve(self, ns: str) -> str:
        """Accept a role (``"a"``) or a full namespace name."""
        if ns in self.nodes:
            return self.nodes[ns].ns
        if ns == "sw" and self.switch:
            return self.switch
        return ns

    def host(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``cmd`` in the root namespace (only ``ip netns``/``ip -n`` use)."""
        res = subprocess.run(list(cmd), capture_output=True, text=True)
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def run(self, ns: str, *cmd: str, check: bool = True, timeout: float = 30.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside namespace ``ns`` (role or full name), text output."""
        full = ["ip", "netns", "exec", self._resolve(ns), *cmd]
        res = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise RuntimeError(f"[{ns}] {' '.join(cmd)} failed ({res.returncode}): "
                               f"{res.stderr.strip() or res.stdout.strip()}")
        return res

    def popen(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen:
        """Start ``cmd`` in ``ns``; terminated (by pid) when the lab closes."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(["ip", "netns", "exec", self._resolve(ns), *cmd], **kwargs)
        self._procs.append(proc)
        return proc

    def sysctl(self, ns: str, key: str, value: Any) -> None:
        require_binary("sysctl")
        self.run(ns, "sysctl", "-qw", f"{key}={value}")

    # -- building ----------------------------------------------------------

    def add_namespace(self, role: str) -> str:
        ns = self.ns_name(role)
        self.host("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        self.host("ip", "-n", ns, "link", "set", "lo", "up")
        # Addresses usable at once: no IPv6 duplicate address detection.
        for key in ("net.ipv6.conf.all.accept_dad", "net.ipv6.conf.default.accept_dad"):
            self._write_proc(ns, key, "0")
        return ns

    def _write_proc(self, ns: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.run(ns, "sh", "-c", f"echo {value} > {path}", check=False)

    def ensure_switch(self) -> str:
        """The switch namespace with bridge ``br0`` (created on first use)."""
        if self.switch is None:
            ns = self.add_namespace("sw")
            self.switch = ns
            self.host("ip", "-n", ns, "link", "add", "br0", "type", "bridge",
                      "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0")
            self.host("ip", "-n", ns, "link", "set", "br0", "up")
        return self.switch

    def add_node(self, role: str, *addresses: str, ifname: str = "eth0") -> Node:
        """A namespace ``role`` with ``ifname`` on the bridge and ``addresses``."""
        if role in self.nodes or role == "sw":
            raise ValueError(f"role {role!r} already used")
        sw = self.ensure_switch()
        ns = self.add_namespace(role)
        port = f"p-{role}"[:15]
        self.host("ip", "-n", sw, "link", "add", port, "type", "veth",
                  "peer", "name", ifname, "netns", ns)
        self.host("ip", "-n", sw, "link", "set", port, "master", "br0", "up")
        node = Node(role=role, ns=ns, ifname=ifname, port=port)
        self.nodes[role] = node
        for addr in addresses:
            self.host("ip", "-n", ns, "addr", "add", addr, "dev", ifname)
            node.addresses.append(ipaddress.ip_interface(addr))
        self.host("ip", "-n", ns, "link", "set", ifname, "up")
        return node

    def two_nodes_and_client(self, subnet: str = "10.77.0") -> dict[str, Node]:
        """Nodes ``a`` (.1), ``b`` (.2) and ``client`` (.10), /24 on one bridge."""
        self.add_node("a", f"{subnet}.1/24")
        self.add_node("b", f"{subnet}.2/24")
        self.add_node("client", f"{subnet}.10/24")
        return self.nodes

    # -- inspection --------------------------------------------------------

    def mac(self, ns: str, ifname: str = "eth0") -> str:
        """``aa:bb:cc:dd:ee:ff`` of ``ifname`` in ``ns``."""
        out = self.host("ip", "-n", self._resolve(ns), "-o", "link", "show", "dev", ifname).stdout
        m = re.search(r"link/ether ([0-9a-f:]{17})", out)
        if not m:
            raise RuntimeError(f"no MAC for {ifname} in {ns}: {out!r}")
        return m.group(1)

    def addresses(self, ns: str, ifname: str = "eth0") -> list[Any]:
        """The ``ip_interface`` list on ``ifname`` in ``ns`` (both families)."""
        out = self.host("ip", "-n", self._resolve(ns), "-o", "addr", "show", "dev", ifname).stdout
        return [ipaddress.ip_interface(m) for m in re.findall(r"inet6? (\S+)", out)]

    def neighbour(self, ns: str, address: str, ifname: str = "eth0") -> tuple[str | None, str]:
        """``(lladdr or None, state)`` of ``address`` in the neighbour table."""
        out = self.host("ip", "-n", self._resolve(ns), "neigh", "show", address,
                        "dev", ifname).stdout.strip()
        if not out:
            return None, "NONE"
        m = re.search(r"lladdr ([0-9a-f:]{17})", out)
        return (m.group(1) if m else None), out.split()[-1]

    def set_neighbour(self, ns: str, address: str, lladdr: str, ifname: str = "eth0",
                      nud: str = "stale") -> None:
        self.host("ip", "-n", self._resolve(ns), "neigh", "replace", address,
                  "lladdr", lladdr, "dev", ifname, "nud", nud)

    # -- faults ------------------------------------------------------------

    def link_down(self, ns: str, ifname: str = "eth0") -> None:
        self.host("ip", "-n", self._resolve(ns), "link", "set", ifname, "down")

    def link_up(self, ns: str, ifname: str = "eth0") -> None:
        self.host("ip", "-n", self._resolve(ns), "link", "set", ifname, "up")

    def drop_between(self, ns: str, addr: str, percent: int = 100,
                     direction: str = "both") -> None:
        """Drop IP traffic between namespace ``ns`` and ``addr`` (both
        directions, at ``ns``; ``direction="in"`` only what ``ns`` receives
        from ``addr``, ``"out"`` only what it sends there), all of it or
        ``percent`` % at random (``numgen random mod 100 < P``; there is no
        netem here).  ARP and neighbour discovery of other addresses are
        untouched.  :meth:`dropped` reads the rules' packet counters."""
        if direction not in ("both", "in", "out"):
            raise ValueError("direction is both, in or out")
        require_binary("nft")
        if not 0 < percent <= 100:
            raise ValueError("percent must be in 1..100")
        full = self._resolve(ns)
        ip = ipaddress.ip_address(addr)
        key = (full, str(ip))
        if key in self._drops:
            self.undrop(ns, addr)
        fam = "ip" if ip.version == 4 else "ip6"
        chain = "d" + hashlib.sha1(str(ip).encode()).hexdigest()[:10]
        match = "" if percent >= 100 else f"numgen random mod 100 < {percent} "
        script = "add table inet apl_lab\n"
        if direction in ("both", "in"):
            script += (f"add chain inet apl_lab {chain}_in {{ type filter hook input priority -10; }}\n"
                       f"add rule inet apl_lab {chain}_in {fam} saddr {ip} {match}counter drop\n")
        if direction in ("both", "out"):
            script += (f"add chain inet apl_lab {chain}_out {{ type filter hook output priority -10; }}\n"
                       f"add rule inet apl_lab {chain}_out {fam} daddr {ip} {match}counter drop\n")
        self.run(full, "nft", "-f", "-", input=script)
        self._drops[key] = chain

    def dropped(self, ns: str, addr: str) -> int:
        """Packets the :meth:`drop_between` rules for ``(ns, addr)`` dropped so far."""
        full = self._resolve(ns)
        chain = self._drops.get((full, str(ipaddress.ip_address(addr))))
        if chain is None:
            return 0
        total = 0
        for suffix in ("_in", "_out"):
            out = self.run(full, "nft", "list", "chain", "inet", "apl_lab", chain + suffix,
                           check=False)
            for word, value in zip(out.stdout.split(), out.stdout.split()[1:]):
                if word == "packets" and value.isdigit():
                    total += int(value)
        return total

    def undrop(self, ns: str, addr: str) -> None:
        """Remove what :meth:`drop_between` added for ``(ns, addr)``."""
        full = self._resolve(ns)
        key = (full, str(ipaddress.ip_address(addr)))
        chain = self._drops.pop(key, None)
        if chain is None:
            return
        self.run(full, "nft", "delete", "chain", "inet", "apl_lab", f"{chain}_in", check=False)
        self.run(full, "nft", "delete", "chain", "inet", "apl_lab", f"{chain}_out", check=False)


if pytest is not None:
    @pytest.fixture
    def netns_lab() -> Iterator[Lab]:
        """An empty :class:`Lab`; everything it created is deleted afterwards."""
        lab = Lab()
        try:
            yield lab
        finally:
            lab.close()

    @pytest.fixture
    def two_nodes_lab() -> Iterator[Lab]:
        """A :class:`Lab` with nodes ``a`` (10.77.0.1), ``b`` (10.77.0.2) and
        ``client`` (10.77.0.10), /24 on ``eth0``, all on one bridge."""
        lab = Lab()
        try:
            lab.two_nodes_and_client()
            yield lab
        finally:
            lab.close()


__all__ = ["Lab", "Node", "cleanup_stale", "netns_lab", "two_nodes_lab"]
