"""The ``[services.encap]`` table (the DN), read with :class:`appliance.config.Table`.

Example (see ``etc/encap.toml``)::

    [services.encap]
    listen_address = "0.0.0.0"       # UDP listener of the tunnel
    port = 7400
    psk_file = "etc/encap.psk"       # ONE pre-shared key for every EN (lab mode): 64+ hex
                                     # digits (or 32+ raw bytes); any holder may claim any
                                     # EN address.  Or, per-EN keys (production):
    # en_keys_file = "etc/encap-en.keys"   # "en-id hex-key" lines (or a directory of
    #                                      # files named by EN id): an EN proves its own id
    # ticket_key_file = "etc/encap-dn.key" # the DNs' shared secret (never on an EN): signs
    #                                      # the address tickets the home DN gives its ENs
    tun = "encap0"                   # TUN device (needs CAP_NET_ADMIN)
    mtu = 1400                       # of the TUN device (tunnel overhead: 66 bytes)
    slice_prefixlen = 26             # each DN subnet is cut into slices of this size,
                                     # one per secondary DN (a failover moves one slice)
    esr_gateway = "10.99.0.254"      # optional: decapsulated traffic goes there
    route_table = 100                #   ... through this table (rule "from <EN subnets>")
    announce_interface = "eth0"      # optional: proxy ARP + gratuitous ARP for taken-over ENs
    session_timeout_s = 30           # an EN silent this long loses its session
    read_batch = 64                  # TUN packets per reactor turn

    [[services.encap.nodes]]         # every DN (this node included), the same list on each
    id = "dn1"
    subnet = "10.200.0.0/24"
    secondaries = ["dn2"]

    [[services.encap.nodes]]
    id = "dn2"
    subnet = "10.200.1.0/24"
    secondaries = ["dn1"]

    [services.encap.watchdog]        # the DN-FD (fd.py)
    enabled = true
    interval_s = 0.5
    max_lag_s = 1.0
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from dataclasses import dataclass, field

from services.encap import wire as W


@dataclass(frozen=True)
class DNNode:
    id: str
    subnet: ipaddress.IPv4Network
    secondaries: tuple[str, ...]


@dataclass(frozen=True)
class WatchdogConfig:
    enabled: bool = True
    interval_s: float = 0.5
    max_lag_s: float = 1.0
    fail_after: int = 3
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0


@dataclass(frozen=True)
class EncapConfig:
    listen_address: object          # ipaddress.IPv4Address
    port: int
    psk_file: str | None
    tun: str
    mtu: int
    nodes: tuple[DNNode, ...]
    slice_prefixlen: int
    esr_gateway: str | None = None
    route_table: int = 100
    announce_interface: str | None = None
    session_timeout_s: float = 30.0
    read_batch: int = 64
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)
    en_keys_file: str | None = None
    ticket_key_file: str | None = None
    #: a digest of the key files' contents when the config was read: a config.reload
    #: after the files changed (same paths) sees a different config and reconfigures
    keys_digest: str | None = None

    #: fields a running DN takes without a restart (EncapService.reconfigure)
    KEY_FIELDS = ("psk_file", "en_keys_file", "ticket_key_file", "keys_digest")

    def node(self, node_id: str) -> DNNode | None:
        for n in self.nodes:
            if n.id == node_id:
                return n
        return None


def parse(table, context) -> EncapConfig | None:
    before = len(table.problems.items)
    listen = table.ip("listen_address", "0.0.0.0")
    port = table.int("port", 7400, min=0, max=65535)
    en_keys = table.path_("en_keys_file", None)
    ticket_key = table.path_("ticket_key_file", None)
    psk_file = table.path_("psk_file", None)
    if en_keys is None and psk_file is None:
        table.error("psk_file", "missing: needs psk_file (one key for all ENs) or "
                                "en_keys_file + ticket_key_file (per-EN keys)")
    elif en_keys is not None and psk_file is not None:
        table.error("psk_file", "psk_file and en_keys_file exclude each other (one key for "
                                "every EN, or one per EN)")
    if en_keys is not None and ticket_key is None:
        table.error("ticket_key_file", "missing: per-EN keys (en_keys_file) need the DNs' "
                                       "ticket key")
    if ticket_key is not None and en_keys is None:
        table.error("ticket_key_file", "only with en_keys_file")
    tun = table.str("tun", "encap0")
    if isinstance(tun, str) and not (0 < len(tun) < 16
                                     and tun.replace("-", "").replace("_", "").isalnum()):
        table.error("tun", f'"{tun}" is not an interface name (1-15 letters, digits, - and _)')
    mtu = table.int("mtu", 1400, min=576, max=65000)
    slice_len = table.int("slice_prefixlen", 26, min=1, max=32)
    esr = table.ip("esr_gateway", None, version=4)
    route_table = table.int("route_table", 100, min=1, max=2 ** 31 - 1)
    announce = table.str("announce_interface", None)
    timeout = table.float("session_timeout_s", 30.0, min=0.5, max=86400)
    batch = table.int("read_batch", 64, min=1, max=4096)
    nodes = []
    seen = set()
    for nt in table.tables("nodes"):
        nid = nt.str("id")
        subnet = nt.network("subnet", version=4)
        secs = nt.list("secondaries", default=[])
        nt.done()
        if nid is None or subnet is None or secs is None:
            continue
        if nid in seen:
            nt.error("id", f'"{nid}" appears twice')
            continue
        seen.add(nid)
        if slice_len is not None and slice_len < subnet.prefixlen:
            nt.error("subnet", f"{subnet} is smaller than slice_prefixlen /{slice_len}")
        n_slices = 2 ** ((slice_len or subnet.prefixlen) - subnet.prefixlen) if slice_len else 1
        if len(secs) > n_slices:
            nt.error("secondaries", f"{len(secs)} secondaries but {subnet} has only "
                                    f"{n_slices} /{slice_len} slice(s)")
        nodes.append(DNNode(nid, subnet, tuple(str(s) for s in secs)))
    for n in nodes:
        for s in n.secondaries:
            if s not in seen or s == n.id:
                table.error("nodes", f'{n.id}: secondary "{s}" is not another DN of nodes')
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if a.subnet.overlaps(b.subnet):
                table.error("nodes", f"subnets of {a.id} and {b.id} overlap")
    if context.node_id is not None and nodes and context.node_id not in seen:
        table.error("nodes", f'this node ("{context.node_id}") is not in the list')
    if not nodes:
        table.error("nodes", "needs at least this node's entry (id, subnet)")
    wd = WatchdogConfig()
    wt = table.table("watchdog")
    if wt is not None:
        wd = WatchdogConfig(
            enabled=wt.bool("enabled", True),
            interval_s=wt.float("interval_s", 0.5, min=0.01, max=60),
            max_lag_s=wt.float("max_lag_s", 1.0, min=0.01, max=600),
            fail_after=wt.int("fail_after", 3, min=1, max=1000),
            restart_backoff_s=wt.float("restart_backoff_s", 1.0, min=0.01, max=3600),
            restart_backoff_max_s=wt.float("restart_backoff_max_s", 30.0, min=0.01, max=86400))
        wt.done()
    if len(table.problems.items) != before:
        return None
    if isinstance(listen, str):
        listen = ipaddress.ip_address(listen)
    return EncapConfig(listen, port, psk_file, tun, mtu, tuple(nodes), slice_len,
                       str(esr) if esr is not None else None, route_table, announce, timeout,
                       batch, wd, en_keys, ticket_key,
                       keys_digest(psk_file, en_keys, ticket_key))


def keys_digest(*paths: str | None) -> str:
    """SHA-256 over the key files (a directory: its files, by name); an unreadable
    one counts by its error (load_keys reports it)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(b"\0path\0" + (path or "").encode())
        if not path:
            continue
        try:
            if os.path.isdir(path):
                for name in sorted(os.listdir(path)):
                    full = os.path.join(path, name)
                    if os.path.isfile(full):
                        with open(full, "rb") as f:
                            h.update(b"\0file\0" + name.encode() + b"\0" + f.read())
            else:
                with open(path, "rb") as f:
                    h.update(b"\0data\0" + f.read())
        except OSError as e:
            h.update(f"\0error\0{e.errno}".encode())
    return h.hexdigest()


def load_keys(config: EncapConfig) -> W.KeyRing:
    """The DN's :class:`~services.encap.wire.KeyRing` from its key files (blocking file
    reads: call at start, before the reactor serves anything, or in a thread)."""
    if config.en_keys_file is not None:
        return W.KeyRing(ens=W.load_en_keys(config.en_keys_file),
                         ticket_key=W.load_psk(config.ticket_key_file))
    return W.KeyRing(psk=W.load_psk(config.psk_file))
