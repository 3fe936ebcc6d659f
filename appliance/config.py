"""Configuration: TOML in, frozen typed objects out.

Every problem names the file, the key path and what is wrong, in the form
``etc/bad.toml: services.dhcp4.subnets[0].pool: "10.0.0.300" is not an IPv4
address``.  All problems of a file are collected and reported together
(:class:`ConfigError`), before anything binds.

Relative paths in the config (``state_dir``, ``token_file``, key files) are
taken relative to the working directory the node runs in, as the examples
in ``etc/`` assume (run from the project root, or give absolute paths).

Service tables (``[services.KEY]``) are parsed by the service's plugin with
the same :class:`Table` reader, so their errors look the same.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping


def _demo_config() -> Path:
    """The demo config: ``etc/appliance.toml`` of the checkout, else the copy
    installed inside the package (``appliance/etc/``)."""
    checkout = Path(__file__).resolve().parent.parent / "etc" / "appliance.toml"
    if checkout.exists():
        return checkout
    return Path(__file__).resolve().parent / "etc" / "appliance.toml"


#: The demo config, used when ``twistd appliance`` is given no ``--config``.
DEMO_CONFIG = _demo_config()

_REQUIRED = object()
_NODE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
#: Node ids must also be DNS labels (review M7): the peer link verifies a
#: peer's id as its TLS host name, and IDNA refuses "_", a leading or
#: trailing "-" and "--" at positions 3-4 (the cluster failed to start).
_DNS_LABEL = re.compile(r"^(?!..--)[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$")


def _dns_label(t: "Table", key: str, value: str | None) -> str | None:
    if value is not None and not _DNS_LABEL.match(value):
        t.error(key, f"{_show(value)} is not a DNS label (the peer link checks node ids as TLS "
                     "host names): lowercase letters, digits and inner '-', no '_'")
        return None
    return value


class ConfigError(Exception):
    """One or more configuration problems, each ``file: key.path: problem``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def _show(value: Any) -> str:
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _kind(value: Any) -> str:
    return {
        bool: "boolean", int: "integer", float: "float", str: "string",
        dict: "table", list: "array",
    }.get(type(value), type(value).__name__)


class Problems:
    """Collects problems for one file."""

    def __init__(self, file: str):
        self.file = file
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        where = f"{self.file}: {path}: " if path else f"{self.file}: "
        self.items.append(where + message)

    def raise_if_any(self) -> None:
        if self.items:
            raise ConfigError(self.items)


class Table:
    """Reads one TOML table, recording problems with their key paths.

    Each accessor returns the converted value, or ``None`` after recording a
    problem, so that one pass reports every problem.  Call :meth:`done`
    last: keys never asked for are reported as unknown.
    """

    def __init__(self, data: Mapping[str, Any], path: str, problems: Problems):
        self.data = data
        self.path = path
        self.problems = problems
        self._seen: set[str] = set()
        self._done = False

    # -- plumbing -----------------------------------------------------
    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, message: str) -> None:
        self.problems.add(self.key_path(key) if key else self.path, message)

    def has(self, key: str) -> bool:
        return key in self.data

    def _raw(self, key: str, default: Any) -> Any:
        self._seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.error(key, "missing (required)")
                return _REQUIRED
            return default
        return self.data[key]

    def _typed(self, key, default, types, what):
        value = self._raw(key, default)
        if value is _REQUIRED:
            return None
        if key not in self.data:
            return value
        if isinstance(value, bool) and bool not in types:
            self.error(key, f"expected {what}, got {_show(value)}")
            return None
        if not isinstance(value, types):
            self.error(key, f"expected {what}, got {_kind(value)} {_show(value)}")
            return None
        return value

    # -- scalars --------------------------------------------------------
    def str(self, key: str, default: Any = _REQUIRED, *, choices: Iterable[str] | None = None,
            pattern: re.Pattern | None = None, describe: str = "") -> str | None:
        value = self._typed(key, default, (str,), "a string")
        if value is None or key not in self.data:
            return value
        if choices is not None and value not in choices:
            self.error(key, f"{_show(value)} is not one of {', '.join(map(_show, choices))}")
            return None
        if pattern is not None and not pattern.match(value):
            self.error(key, f"{_show(value)} is not {describe or 'valid'}")
            return None
        if not value and default is _REQUIRED:
            self.error(key, "must not be empty")
            return None
        return value

    def int(self, key: str, default: Any = _REQUIRED, *, min: int | None = None,
            max: int | None = None) -> int | None:
        value = self._typed(key, default, (int,), "an integer")
        if value is None or key not in self.data:
            return value
        return self._bounded(key, value, min, max)

    def float(self, key: str, default: Any = _REQUIRED, *, min: float | None = None,
              max: float | None = None) -> float | None:
        value = self._typed(key, default, (int, float), "a number")
        if value is None or key not in self.data:
            return value
        return self._bounded(key, float(value), min, max)

    def _bounded(self, key, value, lo, hi):
        if lo is not None and value < lo:
            self.error(key, f"{value} is below the minimum {lo}")
            return None
        if hi is not None and value > hi:
            self.error(key, f"{value} is above the maximum {hi}")
            return None
        return value

    def bool(self, key: str, default: Any = _REQUIRED) -> bool | None:
        return self._typed(key, default, (bool,), "true or false")

    def path_(self, key: str, default: Any = _REQUIRED) -> str | None:
        """A filesystem path (string, not checked for existence)."""
        return self.str(key, default)

    def ip(self, key: str, default: Any = _REQUIRED, *, version: int | None = None):
        value = self.str(key, default)
        if value is None or key not in self.data:
            return value
        return _convert_ip(self, key, value, ipaddress.ip_address, version, "address")

    def network(self, key: str, default: Any = _REQUIRED, *, version: int | None = None):
        value = self.str(key, default)
        if value is None or key not in self.data:
            return value
        return _convert_ip(self, key, value, lambda v: ipaddress.ip_network(v, strict=True),
                           version, "network")

    def interface(self, key: str, default: Any = _REQUIRED, *, version: int | None = None):
        """An address with prefix length, e.g. ``10.9.0.100/24``."""
        value = self.str(key, default)
        if value is None or key not in self.data:
            return value
        if "/" not in value:
            self.error(key, f"{_show(value)} needs a prefix length (e.g. {value}/24)")
            return None
        return _convert_ip(self, key, value, ipaddress.ip_interface, version, "address/prefix")

    def endpoint(self, key: str, default: Any = _REQUIRED, *,
                 tls_in_string: bool = False) -> str | None:
        """A Twisted server endpoint string, built by Twisted's own parser on a
        reactor that never binds (:func:`appliance.admin.listen.server_endpoint_problem`).

        ``tls_in_string``: an ``ssl:`` string must carry its own key
        (``privateKey=``, read as the runtime reads it); otherwise the TLS
        material comes from elsewhere and ``ssl:`` is checked like ``tcp:``.
        """
        value = self.str(key, default)
        if value is None or key not in self.data:
            return value
        problem = endpoint_problem(value, tls_in_string=tls_in_string)
        if problem:
            self.error(key, f"{_show(value)} is not a server endpoint: {problem}")
            return None
        return value

    # -- compound --------------------------------------------------------
    def list(self, key: str, item: Callable[["Table", str, Any], Any] | None = None,
             default: Any = _REQUIRED, *, min_len: int = 0) -> tuple | None:
        """An array; ``item(table, index_path, value)`` converts each element."""
        value = self._typed(key, default, (list,), "an array")
        if value is None or key not in self.data:
            return tuple(value) if isinstance(value, list) else value
        if len(value) < min_len:
            self.error(key, f"needs at least {min_len} element(s)")
            return None
        out = []
        for i, element in enumerate(value):
            if item is None:
                out.append(element)
                continue
            converted = item(self, f"{self.key_path(key)}[{i}]", element)
            if converted is not None:   # a bad element is already reported
                out.append(converted)
        return tuple(out)

    def table(self, key: str, required: bool = False) -> "Table | None":
        value = self._raw(key, _REQUIRED if required else None)
        if value is _REQUIRED or value is None:
            return None
        if not isinstance(value, dict):
            self.error(key, f"expected a table, got {_kind(value)} {_show(value)}")
            return None
        return Table(value, self.key_path(key), self.problems)

    def tables(self, key: str) -> list["Table"]:
        """An array of tables (``[[key]]``)."""
        value = self._raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            self.error(key, f"expected an array of tables, got {_kind(value)}")
            return []
        return [Table(v, f"{self.key_path(key)}[{i}]", self.problems) for i, v in enumerate(value)]

    def done(self) -> None:
        """Report keys present in the table that nobody asked for (once)."""
        if self._done:
            return
        self._done = True
        known = sorted(self._seen)
        for key in self.data:
            if key not in self._seen:
                hint = difflib.get_close_matches(key, known, n=1)
                more = f" (did you mean {hint[0]!r}?)" if hint else (
                    f" (known: {', '.join(known)})" if known else "")
                self.error(key, "unknown key" + more)


def _convert_ip(table: Table, key: str, value: str, convert, version, what):
    try:
        result = convert(value)
    except ValueError:
        kind = f"IPv{version} {what}" if version else f"IP {what}"
        article = "an" if kind[0] in "AEIOU" else "a"
        table.error(key, f"{_show(value)} is not {article} {kind}")
        return None
    if version is not None and result.version != version:
        table.error(key, f"{_show(value)} is not an IPv{version} {what}")
        return None
    return result


def ip_item(version: int | None = None):
    """A list-item converter for :meth:`Table.list` that parses IP addresses."""

    def convert(table: Table, path: str, value: Any):
        kind = f"IPv{version} address" if version else "IP address"
        article = "an"
        if not isinstance(value, str):
            table.problems.add(path, f"expected {article} {kind} string, got {_kind(value)}")
            return None
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            table.problems.add(path, f"{_show(value)} is not {article} {kind}")
            return None
        if version is not None and addr.version != version:
            table.problems.add(path, f"{_show(value)} is not {article} {kind}")
            return None
        return addr

    return convert


def str_item(table: Table, path: str, value: Any):
    if not isinstance(value, str):
        table.problems.add(path, f"expected a string, got {_kind(value)} {_show(value)}")
        return None
    return value


def endpoint_problem(description: str, *, tls_in_string: bool = True) -> str | None:
    """Why ``description`` is not a usable server endpoint string, or None.

    Twisted's own parser decides (one endpoint parser in the codebase).
    """
    from appliance.admin.listen import server_endpoint_problem
    return server_endpoint_problem(description, tls_in_string=tls_in_string)


# ---------------------------------------------------------------------------
# The typed configuration
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NodeSection:
    id: str
    state_dir: str
    fail_fast: bool = False
    #: How long one child (store, cluster, admin, a service) may take to start
    #: or to stop before the node gives up on it (start: failed; stop: skipped).
    start_timeout_s: float = 60.0
    stop_timeout_s: float = 15.0


@dataclass(frozen=True)
class StoreSection:
    backend: str = "memory"
    url: str | None = None
    sentinels: tuple[str, ...] = ()
    master_name: str | None = None
    fsync: str = "always"
    namespace: str = "appliance"
    op_timeout_s: float = 2.0
    connect_timeout_s: float = 3.0
    min_replicas_acked: int = 0
    replicas_timeout_ms: int = 1000


@dataclass(frozen=True)
class AdminSection:
    listen: str = "tcp:8740:interface=127.0.0.1"
    token_file: str = "var/admin.token"
    client_ca: str | None = None
    max_request_bytes: int = 1024 * 1024
    metrics_auth: bool = False
    #: A listener that cannot start stops the node (exit 1); false: run without it.
    required: bool = True
    #: Most members of one JSON-RPC batch (more: -32600).
    max_batch: int = 100
    #: CA that signed the ``ssl:`` listener's certificate: appliancectl verifies
    #: the node with it (``client_ca`` is the CA of *client* certificates).
    server_ca: str | None = None


@dataclass(frozen=True)
class Peer:
    id: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    #: Further heartbeat addresses of this peer (a second path): beats go to
    #: every one, arrive from any; the peer is suspected only when all are silent.
    addresses: tuple = ()

    @property
    def paths(self) -> tuple:
        """Every heartbeat address: ``address`` first, then ``addresses``."""
        return (self.address,) + tuple(a for a in self.addresses if a != self.address)


@dataclass(frozen=True)
class TLSFiles:
    cert: str
    key: str
    ca: str


@dataclass(frozen=True)
class PreTakeover:
    """``[cluster] pre_takeover``: the fencing command run before a takeover
    from a peer judged dead (appliance/cluster/fencing.py)."""

    command: tuple[str, ...]
    timeout_s: float = 10.0


@dataclass(frozen=True)
class GatewayTrack:
    """``[cluster] track_gateway``: ping this address; ``gateway_down`` after
    ``fall`` failures in a row (appliance/cluster/gateway.py)."""

    address: Any
    interval_s: float = 1.0
    timeout_s: float = 1.0
    fall: int = 3
    rise: int = 2


@dataclass(frozen=True)
class ClusterSection:
    peers: tuple[Peer, ...] = ()
    heartbeat_port: int = 8741
    heartbeat_interval_ms: int = 100
    dead_after: int = 3
    auth_key_file: str | None = None
    peer_link: str | None = None
    tls: TLSFiles | None = None
    #: 0 = PARTNER-DOWN only by operator (dhcpd and Microsoft ship it so);
    #: silence alone cannot tell a dead partner from a partition.
    auto_partner_down_s: float = 0.0
    bind_address: Any = None
    #: Heartbeats per interval; the deadline stays dead_after intervals, so
    #: a false suspicion needs dead_after x beats_per_interval lost in a row.
    beats_per_interval: int = 3
    #: "node", or "witness": runs no services, owns nothing, only votes.
    role: str = "node"
    #: [cluster.witness] { id, address }: the tie-breaking third vote.
    witness: Peer | None = None
    #: [cluster.witness] redis_lease = true: Redis owner leases break ties
    #: instead of a witness node (needs [store] backend = "redis").
    redis_lease: bool = False
    #: The leases' TTL; 0 = the liveness deadline (dead_after intervals + half a beat).
    lease_ttl_ms: int = 0
    #: Client evidence for automatic partner-down without a witness (Kea's
    #: max-unacked-clients): this many distinct clients of the partner
    #: retransmitting unanswered (reported by the service).
    partner_down_min_clients: int = 10
    #: Key rotation (review M7): beats signed with this key are accepted too;
    #: ours are signed with auth_key_file only (etc/README: rotating the key).
    previous_auth_key_file: str | None = None
    #: keepalived's preempt_delay: for this long after it starts (or becomes
    #: able again) a node takes nothing a live peer holds (it takes what nobody holds).
    preempt_delay_s: float = 0.0
    #: Fencing (review M13): run before claiming a resource from a peer judged dead.
    pre_takeover: PreTakeover | None = None
    #: Gateway health flag (review M13): unable while the gateway does not answer.
    track_gateway: GatewayTrack | None = None
    #: The liveness deadline's slack after dead_after intervals, in ms; None (the
    #: default) = half a beat period (interval / beats_per_interval / 2).
    #: keepalived's counterpart is its skew time, (256 - priority) / 256 x advert.
    deadline_slack_ms: float | None = None


@dataclass(frozen=True)
class VIPSection:
    name: str
    address: Any  # ipaddress.IPv4Interface | IPv6Interface
    interface: str
    priority: Mapping[str, int]
    preempt: bool = True
    #: The service this VIP follows (review M6): a node whose service of that
    #: name failed gives the VIP up to a peer where it runs.
    service: str | None = None
    #: keepalived's use_vmac: a VRID 1..255; the VIP then lives on a macvlan
    #: ``vrrp.<vrid>`` with the VRRP MAC 00:00:5e:00:01:<vrid> (IPv4) that
    #: moves with it, so clients need no ARP update on a takeover.
    vmac: int | None = None


@dataclass(frozen=True)
class ServiceEntry:
    """One ``[services.KEY]`` table: ``config`` is what the plugin parsed."""

    name: str
    enabled: bool
    config: Any
    raw: Mapping[str, Any]


@dataclass(frozen=True)
class ParseContext:
    """What a service plugin may look at while parsing its table."""

    file: str
    node_id: str | None
    peer_ids: tuple[str, ...]
    vip_names: tuple[str, ...]


@dataclass(frozen=True)
class NodeConfig:
    file: str
    node: NodeSection
    store: StoreSection
    admin: AdminSection
    cluster: ClusterSection | None
    vips: tuple[VIPSection, ...]
    services: Mapping[str, ServiceEntry] = field(default_factory=lambda: MappingProxyType({}))

    def enabled_services(self) -> list[ServiceEntry]:
        return [entry for entry in self.services.values() if entry.enabled]


# ---------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------

def load_config(path: str | Path, plugins: Mapping[str, Any] | None = None) -> NodeConfig:
    """Read and validate ``path``; raise :class:`ConfigError` on any problem.

    ``plugins`` maps service keys to plugins (default: the installed ones).
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    return config_from_string(text, path, plugins)


def load_admin_section(path: str | Path) -> AdminSection:
    """Only what ``appliancectl`` needs: ``[admin]`` (and ``node.state_dir`` for
    the default token path).  Other tables are not read, so a broken service
    table or an unreadable key file of some service does not stop the client.
    Raises :class:`ConfigError` for problems in ``[admin]`` only.
    """
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror or e}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    problems = Problems(path)
    node_table = data.get("node")
    state_dir = node_table.get("state_dir") if isinstance(node_table, dict) else None
    node = NodeSection("ctl", state_dir) if isinstance(state_dir, str) and state_dir else None
    admin_table = data.get("admin", {})
    if not isinstance(admin_table, dict):
        problems.add("admin", f"expected a table, got {_kind(admin_table)}")
        problems.raise_if_any()
    admin = _parse_admin(Table(admin_table, "admin", problems), node, read_tls=False)
    problems.raise_if_any()
    return admin


def config_from_string(text: str, file: str = "<string>",
                       plugins: Mapping[str, Any] | None = None) -> NodeConfig:
    """Parse TOML ``text`` as if it were read from ``file``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{file}: not valid TOML: {e}"]) from None
    if plugins is None:
        from appliance.plugin import discover_plugins
        plugins = discover_plugins()
    return _parse(data, file, plugins)


def _parse(data: dict, file: str, plugins: Mapping[str, Any]) -> NodeConfig:
    problems = Problems(file)
    top = Table(data, "", problems)

    node = _parse_node(top.table("node", required=True))
    store = _parse_store(top.table("store"))
    admin = _parse_admin(top.table("admin"), node)
    cluster = _parse_cluster(top.table("cluster"), node)
    if cluster is not None and cluster.redis_lease and (store is None or store.backend != "redis"):
        problems.add("cluster.witness.redis_lease", 'needs the Redis store ([store] backend = '
                     '"redis"): the leases live there')
    peer_ids = tuple(p.id for p in cluster.peers) if cluster else ()
    vips = tuple(v for v in (_parse_vip(t, node, peer_ids) for t in top.tables("vip")) if v)
    names = [v.name for v in vips]
    for name in {n for n in names if names.count(n) > 1}:
        problems.add("vip", f"name {name!r} is used more than once")
    vrids = [v.vmac for v in vips if v.vmac is not None]
    for i, v in enumerate(vips):
        if v.vmac is not None and vrids.count(v.vmac) > 1:
            problems.add(f"vip[{i}].vmac", f"VRID {v.vmac} is used by more than one VIP "
                                           "(one macvlan, one MAC per VRID)")

    context = ParseContext(file, node.id if node else None, peer_ids, tuple(names))
    services = _parse_services(top.table("services"), plugins, context)
    top.done()
    problems.raise_if_any()
    return NodeConfig(file, node, store, admin, cluster, vips, MappingProxyType(services))


def _parse_node(t: Table | None) -> NodeSection | None:
    if t is None:
        return None
    node_id = _dns_label(t, "id", t.str("id", pattern=_NODE_ID,
                                        describe="a node id (lowercase letters, digits, '-', "
                                                 "'_'; at most 32)"))
    state_dir = t.path_("state_dir")
    fail_fast = t.bool("fail_fast", False)
    start_timeout = t.float("start_timeout_s", NodeSection.start_timeout_s, min=0.1, max=3600)
    stop_timeout = t.float("stop_timeout_s", NodeSection.stop_timeout_s, min=0.1, max=3600)
    t.done()
    if node_id is None or state_dir is None:
        return None
    return NodeSection(node_id, state_dir, bool(fail_fast),
                       start_timeout or NodeSection.start_timeout_s,
                       stop_timeout or NodeSection.stop_timeout_s)


#: ``store.backend`` values: "memory" is the canonical name (SPEC) of the
#: embedded store, which runs on SQLite under ``node.state_dir``.
STORE_BACKENDS = ("memory", "embedded", "sqlite", "redis")


def _redis_url_problem(url: str) -> str | None:
    """What the runtime's Redis URL parser says about ``url`` (None: fine)."""
    try:
        from appliance.store.redis_url import parse_redis_url
    except ImportError:
        from appliance.store.redis import parse_redis_url
    try:
        parse_redis_url(url)
    except ValueError as e:
        return str(e)
    return None


def _sentinel_problem(address: str) -> str | None:
    """``host:port`` or ``[v6]:port``, the way the Redis store splits it."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return f"{_show(address)} is not host:port"
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"{_show(address)}: port {port!r} is not a number 1..65535"
    if host.startswith("[") or host.endswith("]"):
        try:
            ok = host.startswith("[") and host.endswith("]") and \
                ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            ok = False
        if not ok:
            return f"{_show(address)}: {host} is not a bracketed IPv6 address"
    elif ":" in host:
        return f"{_show(address)}: write an IPv6 address in brackets, e.g. [::1]:26379"
    elif any(c.isspace() for c in host):
        return f"{_show(address)} is not host:port"
    return None


def _parse_store(t: Table | None) -> StoreSection:
    if t is None:
        return StoreSection()
    backend = t.str("backend", "memory")
    if backend is not None and backend not in STORE_BACKENDS:
        t.error("backend", f'{_show(backend)} is not one of "memory", "redis" '
                           '("embedded" and "sqlite" are aliases of "memory")')
        backend = None
    if backend in ("embedded", "sqlite"):
        backend = "memory"      # aliases of the embedded (SQLite) store
    url = t.str("url", None)
    sentinels = t.list("sentinels", str_item, ())
    master_name = t.str("master_name", None)
    fsync = t.str("fsync", "always", choices=("always", "batch", "never"))
    namespace = t.str("namespace", "appliance", pattern=re.compile(r"^[A-Za-z0-9_.-]+$"),
                      describe="a namespace (letters, digits, '_', '.', '-')")
    op_timeout = t.float("op_timeout_s", 2.0, min=0.05, max=60)
    connect_timeout = t.float("connect_timeout_s", 3.0, min=0.1, max=120)
    min_replicas = t.int("min_replicas_acked", 0, min=0, max=100)
    replicas_timeout = t.int("replicas_timeout_ms", 1000, min=1, max=60_000)
    if t.has("compact_after_bytes"):
        t.int("compact_after_bytes", None)      # seen: not reported as unknown
        t.error("compact_after_bytes", "no longer used: the embedded store runs on SQLite; "
                                       "remove this key")
    if backend == "redis":
        if url is None and not sentinels:
            t.error("url", 'missing: backend "redis" needs url or sentinels + master_name')
        if sentinels and not master_name:
            t.error("master_name", "missing: sentinels need master_name")
        if url is not None:
            problem = _redis_url_problem(url)
            if problem:
                t.error("url", problem)
        for i, s in enumerate(sentinels or ()):
            problem = _sentinel_problem(s) if s is not None else None
            if problem:
                t.problems.add(f"{t.key_path('sentinels')}[{i}]", problem)
    elif backend == "memory":
        for key in ("min_replicas_acked", "replicas_timeout_ms"):
            if t.has(key):
                t.error(key, 'only for backend "redis"')
    t.done()
    return StoreSection(backend or "memory", url, sentinels or (), master_name, fsync or "always",
                        namespace or "appliance", op_timeout or 2.0, connect_timeout or 3.0,
                        min_replicas or 0, replicas_timeout or 1000)


def _parse_admin(t: Table | None, node: NodeSection | None, *,
                 read_tls: bool = True) -> AdminSection:
    """``read_tls=False`` (appliancectl): an ``ssl:`` listener's key is not read."""
    default_token = f"{node.state_dir}/admin.token" if node else "var/admin.token"
    if t is None:
        return AdminSection(token_file=default_token)
    listen = t.endpoint("listen", AdminSection.listen, tls_in_string=read_tls)
    token_file = t.path_("token_file", default_token)
    client_ca = t.path_("client_ca", None)
    max_bytes = t.int("max_request_bytes", 1024 * 1024, min=1024, max=64 * 1024 * 1024)
    metrics_auth = t.bool("metrics_auth", False)
    required = t.bool("required", True)
    max_batch = t.int("max_batch", AdminSection.max_batch, min=1, max=10_000)
    server_ca = t.path_("server_ca", None)
    if client_ca and listen and not listen.startswith("ssl:"):
        t.error("client_ca", 'needs an "ssl:" listen endpoint (client certificates need TLS)')
    if server_ca and listen and not listen.startswith("ssl:"):
        t.error("server_ca", 'needs an "ssl:" listen endpoint')
    t.done()
    return AdminSection(listen or AdminSection.listen, token_file or default_token,
                        client_ca, max_bytes or 1024 * 1024, bool(metrics_auth),
                        True if required is None else bool(required),
                        max_batch or AdminSection.max_batch, server_ca)


def _peer_item(node: NodeSection | None):
    def convert(table: Table, path: str, value: Any):
        if not isinstance(value, dict):
            table.problems.add(path, f"expected a table {{ id, address }}, got {_kind(value)}")
            return None
        pt = Table(value, path, table.problems)
        peer_id = _dns_label(pt, "id", pt.str("id", pattern=_NODE_ID, describe="a node id"))
        extra = tuple(a for a in (pt.list("addresses", ip_item(), ()) or ()) if a is not None)
        address = pt.ip("address", None if "addresses" in value else _REQUIRED)
        pt.done()
        if address is None and extra:
            address, extra = extra[0], extra[1:]
        elif address is None and "addresses" in value and "address" not in value:
            pt.error("address", "missing: give address or a non-empty addresses")
        if peer_id is None or address is None:
            return None
        if len(set((address,) + extra)) != 1 + len(extra):
            table.problems.add(f"{path}.addresses", "an address appears more than once")
            return None
        if node is not None and peer_id == node.id:
            table.problems.add(f"{path}.id", f"{_show(peer_id)} is this node's own id (node.id)")
            return None
        return Peer(peer_id, address, extra)

    return convert


def _parse_cluster(t: Table | None, node: NodeSection | None) -> ClusterSection | None:
    if t is None:
        return None
    peers = t.list("peers", _peer_item(node), ())
    hb_port = t.int("heartbeat_port", 8741, min=1, max=65535)
    interval = t.int("heartbeat_interval_ms", 100, min=5, max=60_000)
    dead_after = t.int("dead_after", 3, min=1, max=1000)
    key_file = t.path_("auth_key_file", None)
    peer_link = t.endpoint("peer_link", None)
    bind_address = t.ip("bind_address", None)
    tls = None
    tls_table = t.table("tls")
    if tls_table is not None:
        cert, key, ca = tls_table.path_("cert"), tls_table.path_("key"), tls_table.path_("ca")
        tls_table.done()
        if cert and key and ca:
            tls = TLSFiles(cert, key, ca)
    auto_pd = t.float("auto_partner_down_s", 0.0, min=0)
    min_clients = t.int("partner_down_min_clients", 10, min=1, max=1_000_000)
    previous_key_file = t.path_("previous_auth_key_file", None)
    beats = t.int("beats_per_interval", 3, min=1, max=20)
    deadline_slack = t.float("deadline_slack_ms", None, min=0, max=60_000)
    preempt_delay = t.float("preempt_delay_s", 0.0, min=0, max=3600)
    role = t.str("role", "node", choices=("node", "witness"))
    witness = None
    redis_lease, lease_ttl_ms = False, 0
    wt = t.table("witness")
    if wt is not None and wt.data.get("redis_lease") is True:
        redis_lease = True
        wt.bool("redis_lease", False)
        lease_ttl_ms = wt.int("lease_ttl_ms", 0, min=0, max=600_000) or 0
        for k in ("id", "address"):
            if k in wt.data:
                wt.error(k, "a Redis lease witness has no id or address (remove redis_lease "
                            "for a witness node)")
        if role == "witness":
            t.error("witness", 'a node with role = "witness" has no [cluster.witness]')
        if lease_ttl_ms and lease_ttl_ms < 2 * (interval or 100):
            wt.error("lease_ttl_ms", f"{lease_ttl_ms} is below two heartbeat intervals "
                                     f"({2 * (interval or 100)} ms): the lease could not be "
                                     "renewed in time")
        wt.done()
    elif wt is not None:
        wt.bool("redis_lease", False)
        w_id = _dns_label(wt, "id", wt.str("id", pattern=_NODE_ID, describe="a node id"))
        w_addr = wt.ip("address")
        wt.done()
        if w_id is not None and w_addr is not None:
            witness = Peer(w_id, w_addr)
            if node is not None and w_id == node.id:
                t.error("witness", f"{_show(w_id)} is this node's own id (node.id)")
            if any(p and p.id == w_id for p in peers or ()):
                t.error("witness", f"{_show(w_id)} is also listed in peers")
    if role == "witness" and witness is not None:
        t.error("witness", 'a node with role = "witness" is the witness; it has no [cluster.witness]')
    ids = [p.id for p in peers or () if p]
    for dup in {i for i in ids if ids.count(i) > 1}:
        t.error("peers", f"peer id {dup!r} appears more than once")
    pre_takeover = _parse_pre_takeover(t.table("pre_takeover"))
    track_gateway = None
    gt = t.table("track_gateway")
    if gt is not None:
        g_addr = gt.ip("address")
        g_interval = gt.float("interval_s", 1.0, min=0.1, max=3600)
        g_timeout = gt.float("timeout_s", 1.0, min=1, max=60)
        g_fall = gt.int("fall", 3, min=1, max=100)
        g_rise = gt.int("rise", 2, min=1, max=100)
        gt.done()
        if g_addr is not None and None not in (g_interval, g_timeout, g_fall, g_rise):
            track_gateway = GatewayTrack(g_addr, g_interval, g_timeout, g_fall, g_rise)
        if role == "witness":
            t.error("track_gateway", 'a node with role = "witness" owns nothing to move')
    if pre_takeover is not None and role == "witness":
        t.error("pre_takeover", 'a node with role = "witness" takes nothing over')
    if peers and key_file is None:
        t.error("auth_key_file", "missing: peers need an HMAC key file for heartbeats")
    if peer_link and tls is None:
        t.error("tls", "missing: peer_link needs tls = { cert, key, ca }")
    t.done()
    return ClusterSection(peers or (), hb_port or 8741, interval or 100, dead_after or 3,
                          key_file, peer_link, tls,
                          auto_pd if auto_pd is not None else 0.0, bind_address, beats or 3,
                          role or "node", witness, redis_lease=redis_lease,
                          lease_ttl_ms=lease_ttl_ms,
                          partner_down_min_clients=min_clients or 10,
                          previous_auth_key_file=previous_key_file,
                          preempt_delay_s=preempt_delay or 0.0,
                          pre_takeover=pre_takeover, track_gateway=track_gateway,
                          deadline_slack_ms=deadline_slack)


def _command_word(table: Table, path: str, value: Any):
    if not isinstance(value, str) or not value or "\0" in value:
        table.problems.add(path, f"expected a non-empty string, got {_kind(value)} {_show(value)}")
        return None
    return value


def _parse_pre_takeover(pt: Table | None) -> PreTakeover | None:
    """``pre_takeover = { command = ["/abs/path", "arg", ...], timeout_s = 10 }``."""
    if pt is None:
        return None
    command = pt.list("command", _command_word, min_len=1)
    timeout = pt.float("timeout_s", 10.0, min=0.1, max=600)
    pt.done()
    if command and len(command) == len(pt.data.get("command", ())):
        if not command[0].startswith("/"):
            pt.problems.add(f"{pt.key_path('command')}[0]",
                            f"{_show(command[0])} is not an absolute path (the command runs "
                            "without a shell and without a PATH lookup)")
            return None
        return PreTakeover(tuple(command), timeout if timeout is not None else 10.0)
    return None


def _parse_vip(t: Table, node: NodeSection | None, peer_ids: tuple[str, ...]) -> VIPSection | None:
    name = t.str("name", pattern=re.compile(r"^[A-Za-z0-9_.:-]{1,64}$"),
                 describe="a resource name (letters, digits, '_', '.', ':', '-')")
    address = t.interface("address")
    interface = t.str("interface")
    priority = {}
    pt = t.table("priority")
    if pt is not None:
        members = ({node.id} if node else set()) | set(peer_ids)
        for member in list(pt.data):
            value = pt.int(member, min=0, max=255)
            if member not in members:
                pt.error(member, f"{member!r} is neither this node nor a cluster peer")
            elif value is not None:
                priority[member] = value
        pt.done()
    preempt = t.bool("preempt", True)
    service = t.str("service", None, pattern=re.compile(r"^[A-Za-z0-9_.-]{1,64}$"),
                    describe="a service key (services.KEY)")
    vmac = t.int("vmac", None, min=1, max=255)
    if vmac is not None and address is not None and address.version != 4:
        t.error("vmac", "only for an IPv4 VIP (the VRRP MAC 00:00:5e:00:01:<vrid>)")
        vmac = None
    t.done()
    if name is None or address is None or interface is None:
        return None
    return VIPSection(name, address, interface, MappingProxyType(priority), bool(preempt),
                      service=service, vmac=vmac)


def _parse_services(t: Table | None, plugins: Mapping[str, Any],
                    context: ParseContext) -> dict[str, ServiceEntry]:
    services: dict[str, ServiceEntry] = {}
    if t is None:
        return services
    for key in list(t.data):
        st = t.table(key)
        if st is None:
            continue
        plugin = plugins.get(key)
        if plugin is None:
            installed = ", ".join(sorted(plugins)) or "none"
            t.error(key, f"unknown service {key!r} (installed: {installed})")
            continue
        enabled = st.bool("enabled", True)
        before = len(t.problems.items)
        try:
            parsed = plugin.parse_config(st, context)
        except ConfigError:
            raise
        except Exception as e:  # a plugin bug must still read as a config problem
            st.error(None, f"service {key!r} could not parse its table: {e!r}")
            parsed = None
        st.done()
        if len(t.problems.items) == before:
            services[key] = ServiceEntry(key, bool(enabled), parsed, MappingProxyType(dict(st.data)))
    t.done()
    return services
