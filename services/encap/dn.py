"""The decapsulation node (DN): sessions with ENs, the data path, takeovers.

:class:`DecapNode` is the DN's logic with its I/O injected (``send(data,
addr)`` for UDP, ``tun_write(packets)`` for the TUN device), so unit tests
drive it with plain bytes on a ``Clock``; :mod:`services.encap.service`
wires it to a UDP port, a TUN device, the mapping table and the route
injector.

Data path.  A RECORD from an EN is opened (replay window, tag), its DATA
packet is checked (source address = the EN's address; a flow number already
forwarded for this EN is a soft-handoff duplicate) and queued for the TUN;
the queue is written once per reactor turn.  A packet read from the TUN is
sealed to the session of the EN whose address is its destination.

Addresses.  Each DN's subnet (``[[services.encap.nodes]]``) is cut into
``/slice_prefixlen`` slices, slice *i* backed by the DN's *i*-th secondary;
the subnet's first host is the DN's own TUN address.  A primary DN gives an
EN an address from the slice of the EN's first secondary DN (so when this
DN dies that secondary moves *one slice route*), never one another EN holds
here (leases, persisted in the store under ``encap:leases:<node>``) or that
another DN holds in the mapping table.

Takeover.  A secondary DN becomes the EN's primary (claims the EN's address
in the mapping table, injects a /32 route to its TUN, announces it, tells
the EN ``promoted``) on the EN's ``promote`` or its first DATA record.  When
the cluster declares a primary DN dead (a cluster resource per slice,
``encap:<dn>:<slice>``, priority 200 for the primary, 100 for the slice's
secondary), the secondary claims the whole slice, injects the slice route
and tells the slice's ENs ``primary_down``; on the primary's return it
withdraws the slice and tells them ``primary_back``.  A route this DN
injected is withdrawn when the mapping table shows another DN holds the
target (the EN moved back) or the EN sends ``demote``.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import deque

from twisted.internet import defer
from twisted.logger import Logger

from services.encap import wire as W
from services.encap.session import (ROLE_PRIMARY, ROLE_SECONDARY, ROLE_TAKEN_OVER, DNSession,
                                    FlowFilter)

_log = Logger(namespace="services.encap.dn")

LEASES_KEY = "encap:leases:"
#: After a lost claim or a failed route injection, data packets do not retry before this.
CLAIM_RETRY_S = 1.0
#: A route this DN injected stays this long after the target moved to another DN (or
#: the EN demoted us): make-before-break, the ESR (agent or routing daemon) may still
#: send us the EN's traffic until its own route changed, and we still forward it.
ROUTE_HANDBACK_GRACE_S = 1.0
_INDEX_SEQ = W.RECORD_INDEX_SEQ
_DATA0 = W.data_plain(0, b"")          # kind DATA, flow 0 (downlink flows are not numbered)
_FLOW = W.FLOW


def _ip_bytes(address: str) -> bytes:
    return ipaddress.ip_address(address).packed


def packet_dst(packet: bytes) -> bytes | None:
    v = packet[0] >> 4
    if v == 4 and len(packet) >= 20:
        return packet[16:20]
    if v == 6 and len(packet) >= 40:
        return packet[24:40]
    return None


def packet_src(packet: bytes) -> bytes | None:
    v = packet[0] >> 4
    if v == 4 and len(packet) >= 20:
        return packet[12:16]
    if v == 6 and len(packet) >= 40:
        return packet[8:24]
    return None


class AddressPlan:
    """Subnets and slices of every DN (pure)."""

    def __init__(self, nodes, slice_prefixlen: int):
        self.nodes = {n.id: n for n in nodes}
        self.slice_prefixlen = slice_prefixlen

    def gateway(self, dn: str) -> ipaddress.IPv4Address:
        return self.nodes[dn].subnet.network_address + 1

    def slices(self, dn: str) -> list[tuple[ipaddress.IPv4Network, str | None]]:
        node = self.nodes[dn]
        plen = max(self.slice_prefixlen, node.subnet.prefixlen)
        out = []
        for i, net in enumerate(node.subnet.subnets(new_prefix=plen)):
            out.append((net, node.secondaries[i] if i < len(node.secondaries) else None))
        return out

    def slice_for(self, dn: str, secondary: str | None) -> list[ipaddress.IPv4Network]:
        """The slices to allocate from for an EN of ``dn`` backed by ``secondary``
        (its own slice first, then the unbacked ones, then the rest)."""
        own = [n for n, s in self.slices(dn) if s == secondary and s is not None]
        free = [n for n, s in self.slices(dn) if s is None]
        rest = [n for n, s in self.slices(dn) if n not in own and n not in free]
        return own + free + rest

    def backup_slices(self, me: str) -> list[tuple[str, ipaddress.IPv4Network]]:
        """``(primary, slice)`` of every slice ``me`` is the secondary for."""
        return [(dn, net) for dn in self.nodes for net, s in self.slices(dn) if s == me]

    def owner_of(self, address) -> tuple[str, ipaddress.IPv4Network, str | None] | None:
        ip = ipaddress.ip_address(address)
        for dn, node in self.nodes.items():
            if ip in node.subnet:
                for net, sec in self.slices(dn):
                    if ip in net:
                        return dn, net, sec
        return None

    def usable(self, dn: str, address) -> bool:
        ip = ipaddress.ip_address(address)
        subnet = self.nodes[dn].subnet
        return (ip in subnet and ip != subnet.network_address and ip != subnet.broadcast_address
                and ip != self.gateway(dn))


class DecapNode:
    """The DN's protocol logic (see the module docstring)."""

    def __init__(self, reactor, config, node_id: str, keys, *, send, tun_write,
                 mapping=None, routes=None, announce=None, store=None, tun_name: str = "encap0"):
        self.reactor = reactor
        self.config = config
        self.node_id = node_id
        self.send = send
        self.tun_write = tun_write
        self.mapping = mapping
        self.routes = routes
        self.announce = announce          # announce(address) -> Deferred, or None
        self.store = store
        self.tun_name = tun_name
        self.plan = AddressPlan(config.nodes, config.slice_prefixlen)
        #: one pre-shared key (bytes) or a wire.KeyRing (per-EN keys + address tickets)
        self.responder = W.Responder(keys, node_id)
        self.keys = self.responder.keys
        self.sessions: dict[int, DNSession] = {}
        self.by_en: dict[str, int] = {}
        self.by_address: dict[bytes, DNSession] = {}
        self.leases: dict[str, str] = {}             # en -> address (we are its home DN)
        self.flows = FlowFilter()
        self.routes_held: dict[str, float] = {}      # target -> injected at (reactor time)
        self._withdrawals: dict[str, object] = {}    # prefix -> pending delayed withdrawal
        self.slices_taken: set[str] = set()
        self.drops: dict[str, int] = {}
        self.stats = {"rx_datagrams": 0, "tx_datagrams": 0, "rx_packets": 0, "tx_packets": 0,
                      "rx_bytes": 0, "tx_bytes": 0, "handshakes": 0, "sessions_expired": 0,
                      "handoffs": 0, "route_injections": 0, "route_withdrawals": 0,
                      "route_failures": 0, "claims_lost": 0, "keepalives": 0,
                      "tun_write_batches": 0, "icmp_unreachable": 0}
        self.injection_latency = deque(maxlen=256)   # seconds
        self.handoff_log = deque(maxlen=64)
        self._tun_queue: list[bytes] = []
        self._flush_call = None
        self.last_data_rx = 0.0
        self.last_tun_rx = 0.0
        self.probe_ident: str | None = None          # the watchdog's probe session

    # ------------------------------------------------------------------
    def drop(self, reason: str, session: DNSession | None = None) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        if session is not None:
            session.drop(reason)

    def _send(self, session: DNSession, plain: bytes) -> None:
        data = session.keys.seal(plain)
        self.stats["tx_datagrams"] += 1
        try:
            self.send(data, session.addr)
        except OSError as e:
            self.drop("send_error")
            _log.debug("encap: send to {en} failed: {e}", en=session.en, e=e)

    def control(self, session: DNSession, msg: dict) -> None:
        self._send(session, W.control_plain(msg))

    # ------------------------------------------------------------------
    # UDP in
    # ------------------------------------------------------------------
    def datagram(self, data: bytes, addr) -> None:
        self.stats["rx_datagrams"] += 1
        if data[:1] == b"\x04" and len(data) >= W.MIN_RECORD:
            # the hot path: a RECORD, parsed without building a Record object
            receiver, seq = _INDEX_SEQ.unpack_from(data, 1)
            s = self.sessions.get(receiver)
            if s is None:
                return self.drop("unknown_session")
            try:
                plain = s.keys.open_datagram(data, seq)
                if plain[0] == W.K_DATA and len(plain) >= 29:
                    s.last_rx = now = self.reactor.seconds()
                    if s.addr != addr:
                        s.addr = addr
                    packet = plain[9:]
                    if packet[0] >> 4 not in (4, 6):
                        raise W.Drop("not_ip")
                    self._data(s, _FLOW.unpack_from(plain, 1)[0], packet, now)
                    return
                kind, value = W.parse_inner(plain)
            except W.Drop as d:
                s.drop(d.reason)
                return self.drop(d.reason)
            self._inner(s, addr, kind, value)
            return
        try:
            msg = W.decode(data)
            if isinstance(msg, W.Record):
                self._record(msg, addr)
            elif isinstance(msg, W.Hello):
                self.send(self.responder.hello(msg, addr, self.reactor.seconds()), addr)
                self.stats["tx_datagrams"] += 1
            elif isinstance(msg, W.Confirm):
                self._confirmed(msg, addr)
            else:
                raise W.Drop("unexpected_type")
        except W.Drop as d:
            self.drop(d.reason)
        except OSError:
            self.drop("send_error")

    def _confirmed(self, msg: W.Confirm, addr) -> None:
        now = self.reactor.seconds()
        pending, keys = self.responder.confirm(msg, addr, now)
        s = DNSession(pending.index, keys, pending.peer_ident, addr, now, now)
        old = self.by_en.get(s.en)
        if old is not None and old in self.sessions:
            prev = self.sessions[old]
            # a new session of the same EN replaces the old one (EN restart / rekey)
            s.role, s.address, s.primary, s.dns, s.epoch = (prev.role, prev.address,
                                                            prev.primary, prev.dns, prev.epoch)
            s.address_bytes = prev.address_bytes
            self._remove(old, keep_address=True)
        if s.en == self.probe_ident:
            s.role = "probe"
        self.sessions[s.index] = s
        self.by_en[s.en] = s.index
        if s.address is not None:
            self.by_address[_ip_bytes(s.address)] = s
        self.stats["handshakes"] += 1
        _log.info("encap: session {index:08x} with EN {en} from {addr}", index=s.index, en=s.en,
                  addr=f"{addr[0]}:{addr[1]}")

    def _record(self, rec: W.Record, addr) -> None:
        s = self.sessions.get(rec.receiver)
        if s is None:
            raise W.Drop("unknown_session")
        try:
            plain = s.keys.open(rec)
            kind, value = W.parse_inner(plain)
        except W.Drop as d:
            s.drop(d.reason)
            raise
        self._inner(s, addr, kind, value)

    def _inner(self, s: DNSession, addr, kind: int, value) -> None:
        now = self.reactor.seconds()
        s.last_rx = now
        if s.addr != addr:
            s.addr = addr                     # the EN roamed (or its NAT rebound)
        if kind == W.K_DATA:
            self._data(s, value[0], value[1], now)
        elif kind == W.K_KEEPALIVE:
            self.stats["keepalives"] += 1
            if value & W.KA_ECHO:
                self._send(s, W.keepalive_plain(False, value >> 8))   # the EN's stamp back
        else:
            self._control(s, value)

    # ------------------------------------------------------------------
    # data
    # ------------------------------------------------------------------
    def _data(self, s: DNSession, flow: int, packet: bytes, now: float) -> None:
        if s.address is None:
            return self.drop("no_address", s)
        src = packet_src(packet)
        if src != s.address_bytes:
            return self.drop("spoofed_source", s)
        if not self.flows.fresh(s.en, flow):
            return self.drop("duplicate", s)
        s.rx_packets += 1
        s.rx_bytes += len(packet)
        self.stats["rx_packets"] += 1
        self.stats["rx_bytes"] += len(packet)
        self.last_data_rx = now
        if s.role == ROLE_SECONDARY and now >= s.next_claim:
            self.take_over(s, "first_data")
        self._tun_queue.append(packet)
        if self._flush_call is None:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        queue, self._tun_queue = self._tun_queue, []
        if queue:
            self.stats["tun_write_batches"] += 1
            try:
                sent = self.tun_write(queue)
            except Exception:
                _log.failure("encap: TUN write failed")
                sent = 0
            if sent < len(queue):
                self.drops["tun_write"] = self.drops.get("tun_write", 0) + len(queue) - sent

    def tun_packets(self, packets: list[bytes]) -> None:
        """Packets read from the TUN: each to the EN owning its destination."""
        self.last_tun_rx = self.reactor.seconds()
        by_address, send = self.by_address, self.send
        sent = nbytes = 0
        for packet in packets:
            v = packet[0] >> 4
            dst = packet[16:20] if v == 4 else (packet[24:40] if v == 6 else None)
            s = by_address.get(dst) if dst is not None else None
            if s is None:
                self.drop("no_session_for_destination")
                continue
            n = len(packet)
            s.tx_packets += 1
            s.tx_bytes += n
            sent += 1
            nbytes += n
            try:
                send(s.keys.seal(_DATA0 + packet), s.addr)
            except OSError:
                self.drop("send_error", s)
        stats = self.stats
        stats["tx_packets"] += sent
        stats["tx_bytes"] += nbytes
        stats["tx_datagrams"] += sent

    # ------------------------------------------------------------------
    # control
    # ------------------------------------------------------------------
    def _control(self, s: DNSession, msg: dict) -> None:
        t = msg["t"]
        if t == W.C_INFO:
            self._info(s, msg)
        elif t == W.C_PROMOTE:
            if s.address is None:
                return self.drop("no_address", s)
            self.take_over(s, str(msg.get("reason") or "promote"), confirm=True)
        elif t == W.C_DEMOTE:
            self._demote(s)
            # the acknowledgement (the EN sends demote again until it hears it)
            self.control(s, {"t": W.C_SECONDARY, "dn": self.node_id, "primary": s.primary,
                             "demoted": True})
        else:
            self.drop("unexpected_control", s)

    def _info(self, s: DNSession, msg: dict) -> None:
        role = msg.get("role")
        dns = msg.get("dns")
        address = msg.get("address")
        s.dns = tuple(str(d) for d in dns)[:16] if isinstance(dns, list) else ()
        if address is not None:
            try:
                address = str(ipaddress.IPv4Address(address))
            except (ValueError, TypeError):
                return self.drop("bad_control", s)
        if role == "primary":
            self._serve_primary(s, address, msg.get("ticket"))
        elif role == "secondary":
            if address is None:
                return self.drop("bad_control", s)
            if not self._ticket_ok(s, address, msg.get("ticket")):
                return
            if not self._address_ok_for(s.en, address):
                self.control(s, {"t": W.C_ERROR, "reason": "address_in_use"})
                return self.drop("address_in_use", s)
            self._set_address(s, address)
            s.primary = str(msg.get("primary") or "")
            if s.role != ROLE_TAKEN_OVER:
                s.role = ROLE_SECONDARY
            self.control(s, {"t": W.C_SECONDARY, "dn": self.node_id, "primary": s.primary})
        else:
            self.drop("bad_control", s)

    def _address_ok_for(self, en: str, address: str) -> bool:
        """``address`` is not the lease of another EN here."""
        for other, a in self.leases.items():
            if a == address and other != en:
                return False
        s = self.by_address.get(_ip_bytes(address))
        return s is None or s.en == en

    def _set_address(self, s: DNSession, address: str) -> None:
        if s.address is not None and s.address != address:
            cur = self.by_address.get(s.address_bytes)
            if cur is s:
                del self.by_address[s.address_bytes]
        s.address = address
        s.address_bytes = _ip_bytes(address)
        self.by_address[s.address_bytes] = s

    def _ticket_ok(self, s: DNSession, address: str, ticket) -> bool:
        """Per-EN keys: ``s.en`` may claim ``address`` only with the ticket its home
        DN (the owner of the address's subnet) gave it for that address; refused and
        counted (``address_not_yours``) otherwise.  One shared key: always true."""
        if not self.keys.per_en:
            return True
        owner = self.plan.owner_of(address)
        if owner is not None and self.keys.ticket_ok(s.en, address, owner[0], ticket):
            return True
        _log.warn("encap: EN {en} claimed {a} without a valid ticket: refused", en=s.en,
                  a=address)
        self.control(s, {"t": W.C_ERROR, "reason": "address_not_yours"})
        self.drop("address_not_yours", s)
        return False

    def _serve_primary(self, s: DNSession, requested: str | None,
                       msg_ticket=None) -> None:
        address = None
        if requested is not None and self._address_ok_for(s.en, requested):
            owner = self.plan.owner_of(requested)
            if owner is not None and owner[0] == self.node_id:
                # ours if this EN's lease (it comes back home), or nobody else's
                if self.plan.usable(self.node_id, requested) and (
                        self.leases.get(s.en) == requested or not self._held_elsewhere(requested)):
                    address = requested
            elif owner is not None:
                # an address of another DN's subnet: the EN keeps it, we take over
                if not self._ticket_ok(s, requested, msg_ticket):
                    return
                self._set_address(s, requested)
                s.role = ROLE_SECONDARY
                s.primary = owner[0]
                self.take_over(s, "primary_info", confirm=True)
                return
        if address is None:
            address = self.leases.get(s.en)
        if address is None:
            secondary = next((d for d in s.dns if d != self.node_id), None)
            address = self.allocate(s.en, secondary)
        if address is None:
            self.control(s, {"t": W.C_ERROR, "reason": "no_address"})
            return self.drop("no_address", s)
        self._lease(s.en, address)
        self._set_address(s, address)
        s.role = ROLE_PRIMARY
        s.primary = self.node_id
        owner = self.plan.owner_of(address)
        assign = {"t": W.C_ASSIGN, "address": address, "prefixlen": 32,
                  "mtu": self.config.mtu, "dn": self.node_id,
                  "gateway": str(self.plan.gateway(self.node_id)),
                  "slice": str(owner[1]) if owner else None}
        ticket = self.keys.ticket(s.en, address, self.node_id)
        if ticket is not None:
            assign["ticket"] = ticket       # shown to the other DNs in every info
        self.control(s, assign)
        # confirms the path (promoted); an EN coming back to its home DN wins its
        # address back in the table first
        self.take_over(s, "home", confirm=True)

    def _held_elsewhere(self, address: str) -> bool:
        if self.mapping is None:
            return False
        entry = self.mapping.lookup(address)
        return entry is not None and entry.get("dn") not in (None, self.node_id) \
            and self.by_address.get(_ip_bytes(address)) is None

    def allocate(self, en: str, secondary: str | None) -> str | None:
        """A free address of this DN's subnet, from ``secondary``'s slice first."""
        used = set(self.leases.values())
        used.update(socket.inet_ntoa(a) for a in self.by_address if len(a) == 4)
        if self.mapping is not None:
            for target, entry in self.mapping.entries().items():
                if "/" not in target and entry.get("dn") != self.node_id:
                    used.add(target)
        for net in self.plan.slice_for(self.node_id, secondary):
            for ip in net:
                a = str(ip)
                if a not in used and self.plan.usable(self.node_id, a):
                    return a
        return None

    def _lease(self, en: str, address: str) -> None:
        if self.leases.get(en) == address:
            return
        self.leases[en] = address
        if self.store is not None:
            d = defer.maybeDeferred(self.store.hset, LEASES_KEY + self.node_id, {en: address})
            d.addErrback(lambda f: _log.warn("encap: lease {en} -> {a} not stored: {e}",
                                             en=en, a=address, e=f.getErrorMessage()))

    def load_leases(self) -> defer.Deferred:
        if self.store is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(self.store.hgetall, LEASES_KEY + self.node_id)

        def got(table):
            for en, address in (table or {}).items():
                try:
                    if self.plan.usable(self.node_id, address):
                        self.leases[en] = str(ipaddress.IPv4Address(address))
                except ValueError:
                    continue
            return len(self.leases)
        return d.addCallback(got)

    # ------------------------------------------------------------------
    # takeover and hand-back
    # ------------------------------------------------------------------
    def take_over(self, s: DNSession, reason: str, confirm: bool = False) -> None:
        """Become the EN's primary: claim, inject, announce, tell it ``promoted``."""
        address = s.address
        home = self.plan.owner_of(address)
        mine = home is not None and home[0] == self.node_id
        if s.claiming:
            return
        if (mine or s.role == ROLE_TAKEN_OVER) and self._holds(address):
            # ours already (our subnet, nobody else in the table; or taken over before)
            if s.role != ROLE_TAKEN_OVER:
                s.role = ROLE_PRIMARY
            if self.announce is not None:
                self._announce(address)      # the EN may come back from another DN
            self.control(s, {"t": W.C_PROMOTED, "address": address, "epoch": s.epoch,
                             "latency_ms": 0.0})
            return
        s.claiming = True
        t0 = self.reactor.seconds()
        self.stats["handoffs"] += 1
        self.handoff_log.append({"en": s.en, "address": address, "reason": reason,
                                 "at": time.time()})
        _log.info("encap: taking over EN {en} ({address}): {reason}", en=s.en, address=address,
                  reason=reason)
        if self.mapping is not None:
            d = defer.maybeDeferred(self.mapping.claim, address, self.node_id, reason)
        else:
            d = defer.succeed({"dn": self.node_id, "epoch": None})

        def claimed(entry):
            if entry is None or entry.get("dn") != self.node_id:
                self.stats["claims_lost"] += 1
                s.next_claim = self.reactor.seconds() + CLAIM_RETRY_S
                _log.warn("encap: claim of {a} lost to {dn}", a=address,
                          dn=(entry or {}).get("dn"))
                return None
            s.epoch = entry.get("epoch")
            if mine:
                return 0.0     # our connected subnet route covers it
            return self._inject(address + "/32")

        def injected(latency):
            s.claiming = False
            if latency is None:
                return
            s.role = ROLE_PRIMARY if mine else ROLE_TAKEN_OVER
            if self.announce is not None:
                self._announce(address)
            total = self.reactor.seconds() - t0
            # always confirm: the EN may have switched on its own (first data)
            self.control(s, {"t": W.C_PROMOTED, "address": address, "epoch": s.epoch,
                             "latency_ms": round(total * 1000, 3)})
            if mine and self.mapping is not None:
                # back home: our slice covers the address, the host entry can go
                # (the other DN saw our claim and withdrew its route)
                r = defer.maybeDeferred(self.mapping.release, address, self.node_id)
                r.addErrback(lambda f: _log.warn("encap: release of {a} after the move home "
                                                 "failed: {e}", a=address, e=f.getErrorMessage()))

        def failed(f):
            s.claiming = False
            s.next_claim = self.reactor.seconds() + CLAIM_RETRY_S
            self.stats["route_failures"] += 1
            _log.error("encap: takeover of {a} failed: {e}", a=address, e=f.getErrorMessage())
        d.addCallback(claimed).addCallback(injected).addErrback(failed)
        d.addErrback(lambda f: _log.failure("encap: takeover bookkeeping", failure=f))

    def _holds(self, address: str | None) -> bool:
        if address is None:
            return False
        if self.mapping is None:
            return True
        entry = self.mapping.lookup(address)
        if entry is not None:
            return entry.get("dn") == self.node_id
        home = self.plan.owner_of(address)
        return home is not None and home[0] == self.node_id

    def _inject(self, prefix: str) -> defer.Deferred:
        pending = self._withdrawals.pop(prefix, None)
        if pending is not None and pending.active():
            pending.cancel()                 # taken back within the grace: keep the route
        if self.routes is None:
            return defer.succeed(0.0)
        t0 = self.reactor.seconds()
        d = defer.maybeDeferred(self.routes.inject, prefix, dev=self.tun_name)

        def done(latency):
            latency = latency if isinstance(latency, (int, float)) else self.reactor.seconds() - t0
            self.routes_held[prefix] = self.reactor.seconds()
            self.stats["route_injections"] += 1
            self.injection_latency.append(latency)
            return latency
        return d.addCallback(done)

    def _withdraw_later(self, prefix: str) -> None:
        """Withdraw ``prefix`` after ``ROUTE_HANDBACK_GRACE_S`` unless we hold it again
        by then: whoever routes to us (the ESR) switches to the new DN meanwhile, and
        what still reaches us goes on to the EN (we keep its session)."""
        if prefix not in self.routes_held or prefix in self._withdrawals:
            return
        self._withdrawals[prefix] = self.reactor.callLater(
            ROUTE_HANDBACK_GRACE_S, self._withdraw_if_gone, prefix)

    def _withdraw_if_gone(self, prefix: str) -> None:
        self._withdrawals.pop(prefix, None)
        target = prefix[:-3] if prefix.endswith("/32") else prefix
        entry = self.mapping.lookup(target) if self.mapping is not None else None
        if entry is not None and entry.get("dn") == self.node_id:
            return                           # ours again
        self._withdraw(prefix)

    def stop(self) -> None:
        """Cancel what is scheduled (the service stops or the watchdog restarts it)."""
        for call in self._withdrawals.values():
            if call.active():
                call.cancel()
        self._withdrawals.clear()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None

    def _withdraw(self, prefix: str) -> defer.Deferred:
        pending = self._withdrawals.pop(prefix, None)
        if pending is not None and pending.active():
            pending.cancel()
        if prefix not in self.routes_held:
            return defer.succeed(None)
        del self.routes_held[prefix]
        self.stats["route_withdrawals"] += 1
        if self.routes is None:
            return defer.succeed(None)
        d = defer.maybeDeferred(self.routes.withdraw, prefix)
        d.addErrback(lambda f: _log.warn("encap: withdraw {p} failed: {e}", p=prefix,
                                         e=f.getErrorMessage()))
        return d

    def _announce(self, address: str) -> None:
        d = defer.maybeDeferred(self.announce, address)
        d.addErrback(lambda f: _log.warn("encap: announcing {a} failed: {e}", a=address,
                                         e=f.getErrorMessage()))

    def _demote(self, s: DNSession) -> None:
        """The EN moved back to its home DN: give its address up."""
        address = s.address
        was = s.role
        s.role = ROLE_SECONDARY
        if address is None or was != ROLE_TAKEN_OVER:
            return
        self._withdraw_later(address + "/32")
        if self.mapping is not None:
            d = defer.maybeDeferred(self.mapping.release, address, self.node_id)
            d.addErrback(lambda f: _log.warn("encap: release of {a} failed: {e}", a=address,
                                             e=f.getErrorMessage()))

    def mapping_changed(self, target: str, entry: dict | None) -> None:
        """Mapping-table watcher: another DN now holds a target we routed."""
        if entry is None or entry.get("dn") == self.node_id:
            return
        prefix = target if "/" in target else target + "/32"
        if prefix in self.routes_held:
            _log.info("encap: {t} moved to {dn}: withdrawing our route in {g:g} s", t=target,
                      dn=entry.get("dn"), g=ROUTE_HANDBACK_GRACE_S)
            self._withdraw_later(prefix)
        if "/" not in target:
            s = self.by_address.get(_ip_bytes(target))
            if s is not None and s.role in (ROLE_TAKEN_OVER, ROLE_PRIMARY):
                s.role = ROLE_SECONDARY

    # cluster: one resource per slice we back up ---------------------------
    def slice_role(self, primary: str, net, role: str) -> None:
        """Cluster listener for resource ``encap:<primary>:<net>``."""
        target = str(net)
        ens = [s for s in self.sessions.values()
               if s.address is not None and ipaddress.ip_address(s.address) in net]
        if primary == self.node_id:
            return
        if role == "owner" and target not in self.slices_taken:
            self.slices_taken.add(target)
            _log.warn("encap: primary DN {p} declared dead: taking slice {t}", p=primary, t=target)
            if self.mapping is not None:
                d = defer.maybeDeferred(self.mapping.claim, target, self.node_id, "primary_dead")
            else:
                d = defer.succeed({"dn": self.node_id})
            d.addCallback(lambda e: self._inject(target) if e and e.get("dn") == self.node_id
                          else None)
            d.addErrback(lambda f: _log.error("encap: slice {t} takeover failed: {e}", t=target,
                                              e=f.getErrorMessage()))
            for s in ens:
                self.control(s, {"t": W.C_PRIMARY_DOWN, "primary": primary})
                if self.announce is not None:
                    self._announce(s.address)
        elif role != "owner" and target in self.slices_taken:
            self.slices_taken.discard(target)
            _log.info("encap: primary DN {p} is back: handing slice {t} back", p=primary, t=target)
            self._withdraw_later(target)
            if self.mapping is not None:
                d = defer.maybeDeferred(self.mapping.release, target, self.node_id)
                d.addErrback(lambda f: _log.warn("encap: release of {t}: {e}", t=target,
                                                 e=f.getErrorMessage()))
            for s in ens:
                self.control(s, {"t": W.C_PRIMARY_BACK, "primary": primary})

    # ------------------------------------------------------------------
    # keys reload (config.reload)
    # ------------------------------------------------------------------
    def update_keys(self, keys) -> dict:
        """New key material (``config.reload`` re-read the key files): the sessions of
        an EN whose key is gone or changed end (told ``error session_ended`` first: it
        handshakes again at once, or, removed, cannot), and a route or table entry we
        hold for it is given up; with a new ticket key the ENs served here get their
        ``assign`` again with a fresh ticket (the old ones no longer verify).  The
        watchdog probe's in-memory key is kept.  Returns what changed."""
        new = keys if isinstance(keys, W.KeyRing) else W.KeyRing(psk=keys)
        old = self.keys
        if new.ens is not None:
            new._local.update({i: k for i, k in old._local.items() if i not in new.ens})
        self.responder.keys = new
        self.keys = new
        self.responder.pending.clear()        # half-open handshakes used the old keys
        ended, reassigned = [], []
        for index, s in list(self.sessions.items()):
            if s.en == self.probe_ident and s.role == "probe":
                continue
            if old.key_for(s.en) == new.key_for(s.en) and new.key_for(s.en) is not None:
                continue
            ended.append(s.en)
            self.control(s, {"t": W.C_ERROR, "reason": "session_ended"})
            if s.address is not None and s.address + "/32" in self.routes_held:
                self._withdraw(s.address + "/32")      # (also one in its grace)
            if s.role == ROLE_TAKEN_OVER and s.address is not None:
                if self.mapping is not None:
                    d = defer.maybeDeferred(self.mapping.release, s.address, self.node_id)
                    d.addErrback(lambda f, a=s.address: _log.warn(
                        "encap: release of {a} failed: {e}", a=a, e=f.getErrorMessage()))
            self._remove(index)
        if old.ticket_key != new.ticket_key:
            for s in self.sessions.values():
                if s.role == ROLE_PRIMARY and s.address is not None \
                        and self.leases.get(s.en) == s.address:
                    ticket = new.ticket(s.en, s.address, self.node_id)
                    owner = self.plan.owner_of(s.address)
                    self.control(s, {"t": W.C_ASSIGN, "address": s.address, "prefixlen": 32,
                                     "mtu": self.config.mtu, "dn": self.node_id,
                                     "gateway": str(self.plan.gateway(self.node_id)),
                                     "slice": str(owner[1]) if owner else None,
                                     "ticket": ticket})
                    reassigned.append(s.en)
        self.stats["keys_reloads"] = self.stats.get("keys_reloads", 0) + 1
        self.stats["sessions_ended_by_keys"] = (self.stats.get("sessions_ended_by_keys", 0)
                                                + len(ended))
        _log.info("encap: keys reloaded: {n} EN keys; sessions ended: {ended}; new tickets "
                  "for: {re}", n=len(new.ens) if new.ens is not None else "one shared",
                  ended=sorted(set(ended)) or "none", re=sorted(reassigned) or "none")
        return {"ended": sorted(set(ended)), "reassigned": sorted(reassigned)}

    # ------------------------------------------------------------------
    # housekeeping
    # ------------------------------------------------------------------
    def _remove(self, index: int, keep_address: bool = False) -> None:
        s = self.sessions.pop(index, None)
        if s is None:
            return
        if self.by_en.get(s.en) == index:
            del self.by_en[s.en]
        if s.address is not None and self.by_address.get(s.address_bytes) is s:
            del self.by_address[s.address_bytes]

    def sweep(self) -> int:
        now = self.reactor.seconds()
        self.responder.expire(now)
        old = [i for i, s in self.sessions.items()
               if now - s.last_rx > self.config.session_timeout_s]
        for i in old:
            s = self.sessions[i]
            _log.info("encap: session with EN {en} expired ({idle:.1f} s silent)", en=s.en,
                      idle=now - s.last_rx)
            self._remove(i)
        self.stats["sessions_expired"] += len(old)
        return len(old)

    def describe_sessions(self) -> dict:
        now = self.reactor.seconds()
        return {"node": self.node_id,
                "sessions": [s.describe(now) for s in self.sessions.values()],
                "leases": dict(self.leases), "routes": sorted(self.routes_held),
                "slices_taken": sorted(self.slices_taken)}

    def describe_stats(self) -> dict:
        lat = sorted(self.injection_latency)
        return {"stats": dict(self.stats), "drops": dict(self.drops),
                "route_injection_ms": {
                    "count": len(lat),
                    "p50": round(lat[len(lat) // 2] * 1000, 3) if lat else None,
                    "max": round(lat[-1] * 1000, 3) if lat else None},
                "handoffs": list(self.handoff_log)[-10:]}
