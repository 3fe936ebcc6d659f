"""DHCPv4 request handling: one parsed request in, at most one reply out.

No sockets here: :class:`Dhcp4Handler` decides with the lease store and
the failover rules (``pools.answers`` / ``allocation_roles``) and returns
``(reply, destination)`` or ``None``.  With a lease store that waits for
its writes, every lease change is durable before the reply exists; with
``immediate_writes`` (what the service uses on the memory store) the change
is applied at once and the *service* holds the reply until
``leases.durable()`` fires -- either way no ACK leaves before its lease is
on disk.
Packets it will not answer are counted by reason in ``self.counters``.

Subnet selection, in order: option 118 (subnet selection), relay
agent link selection (82.5), giaddr, ciaddr, then the subnet of the
receiving interface (``local_subnet``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
import socket
from ipaddress import IPv4Address
from typing import Any, Callable

from appliance.eager import eager
from twisted.logger import Logger

from services.dhcp.v4 import codec as C
from services.dhcp.v4 import pools as P
from services.dhcp.v4.config import Dhcp4Config, Subnet
from services.dhcp.v4.leases import AddressUnavailable, LeaseStore, UnknownSubnet
from services.dhcp.failover.partner import FailoverView  # noqa: F401  (re-exported)

_log = Logger(namespace="services.dhcp4")
ZERO = IPv4Address(0)


def _override(pkt) -> IPv4Address | None:
    """RFC 5107 server identifier override (82.11), honoured only from a relay."""
    return pkt.server_id_override if pkt.giaddr != ZERO else None


def _ip(dotted: str) -> IPv4Address:
    """A stored (canonical) dotted quad as an address, without re-parsing the text."""
    return IPv4Address(socket.inet_aton(dotted))


@dataclass
class Binding:
    """The REQUEST being bound, while ``on_lease("bound", lease)`` runs: the
    DDNS glue (services/dhcp/v4/ddns.py) reads the client's option 81 and
    its record before this bind (``previous``: another address when the
    client moved) and leaves the option 81 answer in ``answer``."""

    address: str
    fqdn: C.ClientFQDN | None = None
    previous: Any = None
    answer: C.ClientFQDN | None = None


class Dhcp4Handler:
    def __init__(self, config: Dhcp4Config, leases: LeaseStore, server_id: IPv4Address, *,
                 now: Callable[[], float], failover: FailoverView | None = None,
                 local_subnet: Subnet | None = None, on_lease: Callable | None = None):
        self.config = config
        self.leases = leases
        self.server_id = server_id
        self.now = now
        self.failover = failover or FailoverView()
        self.local_subnet = local_subnet or (config.subnets[0] if len(config.subnets) == 1 else None)
        self.on_lease = on_lease            # called with (event, lease) after each change
        self.binding: Binding | None = None  # the REQUEST being bound, during on_lease
        self.counters: Counter[str] = Counter()
        self._options_cache: dict[tuple[int, int], tuple[Subnet, dict[int, bytes]]] = {}

    # ------------------------------------------------------------------
    def subnet_for(self, pkt: C.DHCPPacket) -> Subnet | None:
        relayed = pkt.giaddr != ZERO
        # option 118 and relay sub-option 82.5 only from a relay (review L4): a
        # local client does not pick its subnet
        for addr in (pkt.subnet_selection if relayed else None,
                     pkt.link_selection if relayed else None,
                     pkt.giaddr if relayed else None,
                     pkt.ciaddr if pkt.ciaddr != ZERO else None):
            if addr is not None:
                return self.config.subnet_for(addr)
        return self.local_subnet

    def _lease_options(self, subnet: Subnet, lease_time: float) -> dict[int, bytes]:
        """The subnet's encoded options for ``lease_time`` (kept: the same
        few (subnet, lease time) pairs answer every client; read-only)."""
        key = (id(subnet), int(lease_time))
        hit = self._options_cache.get(key)
        if hit is not None and hit[0] is subnet:
            return hit[1]
        if len(self._options_cache) >= 256:
            self._options_cache.clear()
        opts = self._encode_lease_options(subnet, lease_time)
        self._options_cache[key] = (subnet, opts)
        return opts

    def _encode_lease_options(self, subnet: Subnet, lease_time: float) -> dict[int, bytes]:
        enc = C.encode_option_value
        opts = {C.OPT_SUBNET_MASK: enc(C.OPT_SUBNET_MASK, subnet.network.netmask)}
        if subnet.routers:
            opts[C.OPT_ROUTERS] = enc(C.OPT_ROUTERS, list(subnet.routers))
        if subnet.dns_servers:
            opts[C.OPT_DNS_SERVERS] = enc(C.OPT_DNS_SERVERS, list(subnet.dns_servers))
        if subnet.domain_name:
            opts[C.OPT_DOMAIN_NAME] = enc(C.OPT_DOMAIN_NAME, subnet.domain_name)
        lt = int(lease_time)
        opts[C.OPT_LEASE_TIME] = enc(C.OPT_LEASE_TIME, lt)
        ratio_t1 = subnet.t1_s / subnet.lease_time_s if subnet.lease_time_s else 0.5
        ratio_t2 = subnet.t2_s / subnet.lease_time_s if subnet.lease_time_s else 0.875
        opts[C.OPT_RENEWAL_TIME] = enc(C.OPT_RENEWAL_TIME, int(lt * ratio_t1))
        opts[C.OPT_REBINDING_TIME] = enc(C.OPT_REBINDING_TIME, int(lt * ratio_t2))
        return opts

    def _lease_time(self, subnet: Subnet, lease=None) -> float:
        """The lease time an OFFER shows for ``lease`` (the ACK's comes from
        the bind): the MCLT rule of ``LeaseStore.expiry_for`` in failover."""
        if self.failover.mode is None:
            return subnet.lease_time_s
        now = self.now()
        return max(1, self.leases.expiry_for(lease, subnet.lease_time_s, now) - now)

    def _roles(self):
        f = self.failover
        since = None if f.partner_down_since is None else self.now() - f.partner_down_since
        # the partner's last leases end MCLT after it stopped, by its clock
        wait = f.mclt_s + getattr(self.leases, "skew_margin_s", 0.0)
        if f.stale_partner_down and f.state == P.PARTNER_DOWN and (since is None or since < wait):
            return ()
        return P.allocation_roles(f.role, f.state, since, wait, failover=f.mode is not None,
                                  confirmed=f.partner_down_confirmed)

    def _answers(self, pkt: C.DHCPPacket, address_role: str | None) -> bool:
        f = self.failover
        if f.mode is None:
            return True
        key = P.client_hash_key(pkt.client_id, pkt.hwaddr)
        owner = P.owner_of(f.mode, key, f.split, address_role)
        return P.answers(f.mode, f.role, f.state, owner, pkt.secs, f.delay_s)

    def _reply(self, pkt, mtype, subnet=None, yiaddr=None, lease_time=None, fqdn=None):
        options = self._lease_options(subnet, lease_time) if subnet is not None and lease_time else {}
        always = ()
        if fqdn is not None:
            # RFC 4702 section 4: option 81 answers the client's, asked for or not
            try:
                value = C.encode_option_value(C.OPT_CLIENT_FQDN, fqdn)
            except (ValueError, TypeError) as e:
                try:      # the name does not fit the wire format: the flags alone
                    value = C.encode_option_value(C.OPT_CLIENT_FQDN, C.ClientFQDN(
                        "", fqdn.flags, fqdn.rcode1, fqdn.rcode2))
                except (ValueError, TypeError):
                    value = None
                _log.info("option 81 answer without its name ({why})", why=e)
            if value is not None:
                options = {**options, C.OPT_CLIENT_FQDN: value}
                always = (C.OPT_CLIENT_FQDN,)
        server_id = _override(pkt) or self.server_id
        reply = C.build_reply(pkt, mtype, yiaddr=yiaddr, server_id=server_id, options=options,
                              always_send=always)
        return reply, C.reply_destination(pkt, reply)

    def _drop(self, reason: str):
        self.counters[f"drop_{reason}"] += 1
        return None

    # ------------------------------------------------------------------
    def handle(self, pkt: C.DHCPPacket):
        """``(reply, (ip, port, broadcast))`` or ``None`` -- at once when the
        lease store answered from memory, else a Deferred firing with it
        (see ``appliance.eager``; failures are always a failed Deferred)."""
        return self._handle(pkt)

    @eager
    def _handle(self, pkt: C.DHCPPacket):
        mtype = pkt.message_type
        if pkt.op != 1:
            return self._drop("not_request")
        if mtype is None:
            return self._drop("no_message_type")
        self.counters[f"in_{C.MESSAGE_TYPE_NAMES.get(mtype, mtype)}"] += 1
        handler = {C.DISCOVER: self._discover, C.REQUEST: self._request,
                   C.RELEASE: self._release, C.DECLINE: self._decline,
                   C.INFORM: self._inform}.get(mtype)
        if handler is None:
            return self._drop("unexpected_message_type")
        if self.failover.hold and mtype != C.INFORM:
            return self._drop("not_serving")
        result = yield handler(pkt)
        if result is not None:
            name = C.MESSAGE_TYPE_NAMES.get(result[0].message_type, "?")
            self.counters[f"out_{name}"] += 1
        return result

    @eager
    def _discover(self, pkt):
        subnet = self.subnet_for(pkt)
        if subnet is None:
            return self._drop("no_subnet")
        current = yield self.leases.find_client(subnet.id, pkt.hwaddr, pkt.client_id)
        address_role = self.leases.segment_role(current.address) if current else None
        if not self._answers(pkt, address_role):
            return self._drop("not_ours")
        roles = self._roles()
        if roles == ():
            return self._drop("not_serving")
        requested = str(pkt.requested_ip) if pkt.requested_ip else None
        lease = yield self.leases.offer(subnet.id, pkt.hwaddr, pkt.client_id,
                                        requested=requested, roles=roles,
                                        hostname=pkt.hostname or "", current=current)
        if lease is None:
            _log.warn("no free address in subnet {subnet} for {hw}", subnet=str(subnet.network),
                      hw=pkt.hwaddr.hex(":"))
            return self._drop("no_address")
        return self._reply(pkt, C.OFFER, subnet, _ip(lease.address),
                           self._lease_time(subnet, lease))

    @eager
    def _request(self, pkt):
        server_id = pkt.server_id
        if server_id is not None and server_id not in (self.server_id, _override(pkt)):
            return self._drop("other_server")          # the client chose someone else
        subnet = self.subnet_for(pkt)
        if pkt.ciaddr != ZERO:                         # renewing / rebinding
            address = pkt.ciaddr
        elif pkt.requested_ip is not None:             # selecting / init-reboot
            address = pkt.requested_ip
        else:
            return self._drop("request_without_address")
        if subnet is None or address not in subnet.network:
            if server_id is None and pkt.ciaddr == ZERO and subnet is not None:
                return self._reply(pkt, C.NAK)         # init-reboot on the wrong network
            return self._drop("no_subnet")
        current = yield self.leases.find_client(subnet.id, pkt.hwaddr, pkt.client_id)
        address_role = self.leases.segment_role(address)
        if current is None and server_id is None and pkt.ciaddr == ZERO:
            # init-reboot from a client we have no record of: RFC 2131 4.3.2 says
            # silent (in failover too: the partner may know it -- review L1)
            rec = yield self.leases.get(str(address))
            if rec is None:
                return self._drop("unknown_client")
        if server_id is None and not self._answers(pkt, address_role):
            # renew/rebind/init-reboot for the partner's client: the partner answers
            # (unless it is down / the client waited delay_s, see pools.answers)
            return self._drop("not_ours")
        roles = self._roles()
        try:
            lease = yield self.leases.bind(subnet.id, address, pkt.hwaddr, pkt.client_id,
                                           lease_time_s=subnet.lease_time_s,
                                           hostname=pkt.hostname or "", roles=roles)
        except AddressUnavailable as e:
            if self.failover.mode is not None and server_id is None \
                    and self.failover.state != P.PARTNER_DOWN \
                    and address_role is not None and address_role != self.failover.role \
                    and address_role not in (roles or ()):
                # the partner's address and we have no live binding of this client
                # on it: the partner may know better -- silent, never a NAK (M1)
                return self._drop("not_ours")
            _log.info("NAK {address} to {hw}: {why}", address=str(address),
                      hw=pkt.hwaddr.hex(":"), why=e)
            return self._reply(pkt, C.NAK)
        except UnknownSubnet as e:
            _log.info("NAK {address} to {hw}: {why}", address=str(address),
                      hw=pkt.hwaddr.hex(":"), why=e)
            return self._reply(pkt, C.NAK)
        fqdn = self._bound(pkt, lease, current)
        return self._reply(pkt, C.ACK, subnet, _ip(lease.address),
                           # the record's own length (cltt is the bind time), rounded
                           # down: never longer than the record says
                           max(1, int(lease.expires - lease.cltt + 1e-6)), fqdn=fqdn)

    @eager
    def _release(self, pkt):
        if pkt.ciaddr == ZERO:
            return self._drop("release_without_address")
        if not (yield self._held_by(str(pkt.ciaddr), pkt)):
            return self._drop("release_not_holder")
        lease = yield self.leases.release(str(pkt.ciaddr))
        if lease is not None:
            self._notify("released", lease)
        return None

    @eager
    def _decline(self, pkt):
        if pkt.requested_ip is None:
            return self._drop("decline_without_address")
        if not (yield self._held_by(str(pkt.requested_ip), pkt)):
            return self._drop("decline_not_holder")
        lease = yield self.leases.decline(str(pkt.requested_ip))
        if lease is not None:
            _log.warn("address {address} declined by {hw}: quarantined", address=lease.address,
                      hw=pkt.hwaddr.hex(":"))
            self._notify("declined", lease)
        return None

    @eager
    def _inform(self, pkt):
        subnet = self.subnet_for(pkt)
        if subnet is None:
            return self._drop("no_subnet")
        options = self._lease_options(subnet, subnet.lease_time_s)
        server_id = _override(pkt) or self.server_id
        reply = C.build_reply(pkt, C.ACK, yiaddr=None, server_id=server_id, options=options)
        return reply, C.reply_destination(pkt, reply)

    @eager
    def _held_by(self, address: str, pkt) -> bool:
        """Whether the lease on ``address`` belongs to this client: same client
        identifier, or same hardware address (clients often leave option 61
        out of RELEASE/DECLINE)."""
        from services.dhcp.v4.leases import normalize_client_id, normalize_hwaddr
        rec = yield self.leases.get(address)
        if rec is None:
            return False
        if pkt.client_id and rec.client_id:
            # both name a client id: only that decides (review L2)
            return normalize_client_id(pkt.client_id) == rec.client_id
        return bool(rec.hwaddr) and rec.hwaddr == normalize_hwaddr(pkt.hwaddr)

    def _bound(self, pkt, lease, current) -> C.ClientFQDN | None:
        """Tell the listener (the partner's update, then DDNS) about a bound
        lease; returns the option 81 answer the DDNS glue left, if any."""
        self.binding = Binding(lease.address, pkt.client_fqdn, current)
        try:
            self._notify("bound", lease)
            return self.binding.answer
        finally:
            self.binding = None

    def _notify(self, event: str, lease: Any):
        if self.on_lease is not None:
            try:
                self.on_lease(event, lease)
            except Exception:
                _log.failure("lease listener failed on {event}", event=event)
