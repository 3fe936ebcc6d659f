"""DHCPv6 message handling (RFC 8415 sections 16 and 18.3): one message in, at most one out.

No sockets and no reactor: :class:`Dhcp6Handler` decides with the lease
allocator (``leases.py``'s interface) and returns the reply (a
:class:`~services.dhcp.v6.codec.Message`, or the RELAY-REPL chain for a
relayed request) or None.  Lease changes are written to the store at once;
the *service* holds the reply until ``leases.durable()`` fires when
``leases.writes`` moved, so no REPLY leaves before its binding is on disk.
Messages it will not answer are counted by reason in ``self.counters``
(``drop_<reason>``).

Subnet selection: for a relayed message, a subnet whose ``interface_id``
matches the innermost relay's interface-id, else the subnet holding the
link-address of the relay closest to the client that has a global one (RFC
8415 section 13.1; unspecified, loopback and link-local ones name no link);
when none does, and for a direct message, the subnet of the listening interface
(``local_subnet``; with a single configured subnet, that one).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

from twisted.logger import Logger

from services.dhcp.v6 import codec as C
from services.dhcp.v6.config import Dhcp6Config, Subnet
from services.dhcp.v6.leases import NA, PD, Lease6, Unavailable, key_text, parse_key

_log = Logger(namespace="services.dhcp6")

#: the messages a server answers, and whether each must carry our Server ID
#: (True), must not carry one (False), or may (None) -- RFC 8415 section 16
_SERVER_ID_RULE = {C.SOLICIT: False, C.REQUEST: True, C.RENEW: True, C.RELEASE: True,
                   C.DECLINE: True, C.CONFIRM: False, C.REBIND: False,
                   C.INFORMATION_REQUEST: None}


def _names_a_link(address: bytes) -> bool:
    """A relay's link-address that can identify the client's link: not unspecified, not
    loopback (a relay on this box, e.g. perfdhcp -A 1 on lo), not link-local (RFC 8415 9.1:
    a relay without a global address on the link leaves it to the interface-id)."""
    return (address != C.ZERO16 and address != _LOOPBACK
            and not (address[0] == 0xFE and address[1] & 0xC0 == 0x80))


_LOOPBACK = bytes(15) + b"\x01"


@dataclass
class Binding:
    """The request being bound while ``on_lease("bound", lease)`` runs: the
    client's FQDN option (DDNS glue reads it) and the answer it leaves."""

    fqdn: C.ClientFQDN | None = None
    answer: C.ClientFQDN | None = None


class Dhcp6Handler:
    def __init__(self, config: Dhcp6Config, leases, server_duid: bytes, *,
                 now: Callable[[], float], local_subnet: Subnet | None = None,
                 on_lease: Callable | None = None,
                 fqdn_answer: Callable[[C.ClientFQDN], C.ClientFQDN | None] | None = None,
                 may_serve: Callable[[], bool] | None = None):
        self.config = config
        self.leases = leases
        self.server_duid = server_duid
        self.now = now
        self.local_subnet = local_subnet or (config.subnets[0] if len(config.subnets) == 1
                                             else None)
        self.on_lease = on_lease            # (event, lease) after each change
        self.binding: Binding | None = None
        #: the option 39 answer for a client's option 39 (the DDNS glue's
        #: flags); None: no DDNS, the option is not answered (RFC 4704 4.2)
        self.fqdn_answer = fqdn_answer
        #: failover: False while this node must answer nobody (on hold after a start or
        #: a recovery, or in a state that does not serve); None: always serve
        self.may_serve = may_serve
        self.counters: Counter[str] = Counter()

    # ------------------------------------------------------------------
    def _drop(self, reason: str):
        self.counters[f"drop_{reason}"] += 1
        return None

    def subnet_for(self, msg) -> Subnet | None:
        if isinstance(msg, C.RelayMessage):
            chain = msg.chain()
            by_id = self.config.subnet_for_interface_id(chain[-1].interface_id)
            if by_id is not None:
                return by_id
            for layer in reversed(chain):                  # closest to the client first
                if _names_a_link(layer.link_address):
                    return self.config.subnet_for(layer.link_address)
            return self.local_subnet
        return self.local_subnet

    def handle(self, msg: "C.Message | C.RelayMessage"):
        """The reply to send back where ``msg`` came from, or None."""
        if isinstance(msg, C.RelayMessage):
            if msg.msg_type != C.RELAY_FORW:
                return self._drop("not_for_server")
            inner = msg.innermost()
            if inner is None or isinstance(inner, C.RelayMessage):
                return self._drop("bad_relay")
        else:
            inner = msg
        self.counters[f"in_{inner.name}"] += 1
        if self.may_serve is not None and not self.may_serve():
            return self._drop("not_serving")
        reply = self._answer(inner, self.subnet_for(msg))
        if reply is None:
            return None
        self.counters[f"out_{reply.name}"] += 1
        if isinstance(msg, C.RelayMessage):
            return C.relay_reply(msg, reply)
        return reply

    # ------------------------------------------------------------------
    def _answer(self, m: C.Message, subnet: Subnet | None) -> C.Message | None:
        rule = _SERVER_ID_RULE.get(m.msg_type, "drop")
        if rule == "drop":
            return self._drop("not_for_server")
        if m.client_id is None and m.msg_type != C.INFORMATION_REQUEST:
            return self._drop("no_client_id")
        if rule is True and m.server_id != self.server_duid:
            return self._drop("not_our_server_id" if m.server_id else "no_server_id")
        if rule is False and m.server_id is not None:
            return self._drop("unexpected_server_id")
        if rule is None and m.server_id is not None and m.server_id != self.server_duid:
            return self._drop("not_our_server_id")
        if m.msg_type == C.INFORMATION_REQUEST:
            if m.ia_na or m.ia_pd:
                return self._drop("ia_in_information_request")
            return self._reply(m, C.REPLY, subnet)
        if m.msg_type == C.CONFIRM:
            return self._confirm(m, subnet)
        if subnet is None:
            return self._drop("no_subnet")
        duid = m.client_id.hex()
        if m.msg_type == C.SOLICIT:
            rapid = m.rapid_commit and self.config.rapid_commit
            out = self._reply(m, C.REPLY if rapid else C.ADVERTISE, subnet)
            out.rapid_commit = rapid
            out.ia_na = [self._assign(NA, ia, subnet, duid, m, commit=rapid) for ia in m.ia_na]
            out.ia_pd = [self._assign(PD, ia, subnet, duid, m, commit=rapid) for ia in m.ia_pd]
            if self.config.preference is not None:
                out.preference = self.config.preference
            return self._with_fqdn(m, out)
        if m.msg_type == C.REQUEST:
            out = self._reply(m, C.REPLY, subnet)
            out.ia_na = [self._assign(NA, ia, subnet, duid, m, commit=True) for ia in m.ia_na]
            out.ia_pd = [self._assign(PD, ia, subnet, duid, m, commit=True) for ia in m.ia_pd]
            return self._with_fqdn(m, out)
        if m.msg_type in (C.RENEW, C.REBIND):
            out = self._reply(m, C.REPLY, subnet)
            out.ia_na = [self._extend(NA, ia, subnet, duid, m) for ia in m.ia_na]
            out.ia_pd = [self._extend(PD, ia, subnet, duid, m) for ia in m.ia_pd]
            return self._with_fqdn(m, out)
        if m.msg_type in (C.RELEASE, C.DECLINE):
            return self._release(m, subnet, duid)
        return self._drop("not_for_server")

    def _with_fqdn(self, m: C.Message, out: C.Message) -> C.Message:
        if m.fqdn is not None and self.fqdn_answer is not None and (out.ia_na or out.ia_pd):
            try:
                out.fqdn = self.fqdn_answer(m.fqdn)
            except Exception:
                _log.failure("dhcp6: option 39 answer failed")
        return out

    def _reply(self, m: C.Message, mtype: int, subnet: Subnet | None) -> C.Message:
        out = C.Message(mtype, m.txid, client_id=m.client_id, server_id=self.server_duid)
        oro = m.oro or ()
        dns = (subnet.dns_servers if subnet is not None and subnet.dns_servers
               else self.config.dns_servers)
        domains = (subnet.domain_list if subnet is not None and subnet.domain_list
                   else self.config.domain_list)
        if mtype in (C.REPLY, C.ADVERTISE) and m.msg_type not in (C.RELEASE, C.DECLINE):
            if dns and C.OPT_DNS_SERVERS in oro:
                out.dns_servers = tuple(a.packed for a in dns)
            if domains and C.OPT_DOMAIN_LIST in oro:
                out.domain_list = tuple(domains)
        return out

    # ------------------------------------------------------------------
    def _times(self, subnet: Subnet) -> tuple[int, int, int, int]:
        return subnet.t1_s, subnet.t2_s, subnet.preferred_lifetime_s, subnet.valid_lifetime_s

    @staticmethod
    def _hints(kind: str, ia: C.IA) -> list[str]:
        if kind == NA:
            return [C.ntop(a.address) for a in ia.addresses]
        out = []
        for p in ia.prefixes:
            if p.prefix != C.ZERO16 and p.prefix_len:
                a = int.from_bytes(p.prefix, "big")
                a &= ((1 << 128) - 1) ^ ((1 << (128 - p.prefix_len)) - 1)
                out.append(key_text(a, p.prefix_len))
        return out

    def _ia_out(self, kind: str, ia: C.IA, subnet: Subnet, leases: list[Lease6],
                zero: list[str] = ()) -> C.IA:
        t1, t2, pref, valid = self._times(subnet)
        now = self.now()
        out = C.IA(ia.iaid, t1, t2)
        for lease in leases:
            left_valid = max(0, round(lease.expires - now))
            left_pref = max(0, min(left_valid, round(lease.preferred_until - now))) \
                if lease.preferred_until else min(pref, left_valid)
            if lease.state == "offered":
                left_pref, left_valid = pref, valid
            a, plen = parse_key(kind, lease.address)
            if kind == NA:
                out.addresses.append(C.IAAddress(a.to_bytes(16, "big"), left_pref, left_valid))
            else:
                out.prefixes.append(C.IAPrefix(a.to_bytes(16, "big"), plen, left_pref,
                                               left_valid))
        lives = [x.preferred for x in out.addresses + out.prefixes if x.preferred]
        if lives and min(lives) < t2:
            # a lifetime shorter than the configured T2 (the MCLT cap in failover, a lease
            # near its end): renew at 0.5 / 0.8 of it, not after it is gone (RFC 8415 21.4)
            out.t1, out.t2 = min(lives) // 2, min(lives) * 4 // 5
        for text in zero:                       # RFC 8415 18.3.4/18.3.5: not for this link
            a, plen = parse_key(kind, text)
            if kind == NA:
                out.addresses.append(C.IAAddress(a.to_bytes(16, "big"), 0, 0))
            else:
                out.prefixes.append(C.IAPrefix(a.to_bytes(16, "big"), plen, 0, 0))
        return out

    def _no(self, kind: str, ia: C.IA, code: int | None = None) -> C.IA:
        if code is None:
            code = C.NO_ADDRS_AVAIL if kind == NA else C.NO_PREFIX_AVAIL
        return C.IA(ia.iaid, 0, 0, status=C.Status(code, C.STATUS_NAMES[code]))

    def _assign(self, kind: str, ia: C.IA, subnet: Subnet, duid: str, m: C.Message, *,
                commit: bool) -> C.IA:
        """SOLICIT / REQUEST: an address (prefix) for this IA, bound if ``commit``."""
        hints = self._hints(kind, ia)
        if commit and kind == NA and m.msg_type == C.REQUEST and any(
                not self._on_link(kind, h, subnet) for h in hints):
            # RFC 8415 18.3.2: an address not appropriate for the client's link
            self.counters["not_on_link"] += 1
            return self._no(kind, ia, C.NOT_ON_LINK)
        if commit and m.msg_type == C.REQUEST:
            # the REQUEST after our ADVERTISE: bind the offer it names (or, naming none,
            # the IA's offer) as it is -- no second offer; bind checks the address again,
            # and anything else (no offer, another address, bind refused) takes the
            # general path below
            offered = getattr(self.leases, "offered", None)
            pending = offered(kind, subnet, duid, ia.iaid) if offered is not None else None
            if pending is not None and (not hints or pending.address in hints):
                bound = self._bind(kind, subnet, duid, ia.iaid, pending.address, m, quiet=True)
                if bound is not None:
                    return self._ia_out(kind, ia, subnet, [bound])
        lease = self.leases.offer(kind, subnet, duid, ia.iaid, hints)
        if lease is None:
            self.counters[f"no_{kind}_available"] += 1
            return self._no(kind, ia)
        if not commit:
            return self._ia_out(kind, ia, subnet, [lease])
        bound = self._bind(kind, subnet, duid, ia.iaid, lease.address, m)
        if bound is None:
            return self._no(kind, ia)
        return self._ia_out(kind, ia, subnet, [bound])

    def _bind(self, kind, subnet, duid, iaid, address, m: C.Message, *,
              quiet: bool = False) -> Lease6 | None:
        _, _, pref, valid = self._times(subnet)
        hostname = None
        if m.fqdn is not None and m.fqdn.name:
            hostname = m.fqdn.name + ("" if m.fqdn.partial else ".")
        try:
            lease = self.leases.bind(kind, subnet, duid, iaid, address, pref, valid, hostname)
        except Unavailable:
            if not quiet:
                self.counters["bind_conflict"] += 1
            return None
        self._changed("bound", lease, m)
        return lease

    def _changed(self, event: str, lease: Lease6, m: C.Message | None = None) -> None:
        if self.on_lease is None:
            return
        self.binding = Binding(m.fqdn if m is not None else None)
        try:
            self.on_lease(event, lease)
        except Exception:
            _log.failure("dhcp6: lease hook failed for {address}", address=lease.address)
        finally:
            self.binding = None

    def _extend(self, kind: str, ia: C.IA, subnet: Subnet, duid: str, m: C.Message) -> C.IA:
        """RENEW / REBIND (RFC 8415 18.3.4, 18.3.5)."""
        now = self.now()
        mine = [le for le in self.leases.find(kind, subnet.id, duid, ia.iaid)
                if le.state == "bound" and le.expires > now]
        asked = self._hints(kind, ia)
        on_link = [a for a in asked if self._on_link(kind, a, subnet)]
        off_link = [a for a in asked if a not in on_link]
        if not mine and m.msg_type == C.REBIND and asked:
            # no binding here (e.g. the client's server is gone): keep the client's
            # addresses if they are ours to give and free; only addresses not for this
            # link get lifetimes 0 (one held by another client, or by the partner's
            # half in failover, is not "not appropriate for the link": NoBinding, the
            # client asks again with a Request)
            for text in on_link:
                bound = self._bind(kind, subnet, duid, ia.iaid, text, m)
                if bound is not None:
                    mine.append(bound)
            if not mine and off_link and not on_link:
                return self._ia_out(kind, ia, subnet, [], off_link)
        elif mine:
            mine = [b for b in (self._bind(kind, subnet, duid, ia.iaid, le.address, m)
                                for le in mine) if b is not None]
        if not mine:
            self.counters["no_binding"] += 1
            return self._no(kind, ia, C.NO_BINDING)
        held = {le.address for le in mine}
        stale = [a for a in asked if a not in held]
        return self._ia_out(kind, ia, subnet, mine, stale)

    def _on_link(self, kind: str, text: str, subnet: Subnet) -> bool:
        try:
            a, plen = parse_key(kind, text)
        except ValueError:
            return False
        if kind == NA:
            net = subnet.network
            return int(net.network_address) <= a <= int(net.broadcast_address)
        return any(plen >= p.prefix.prefixlen and int(p.prefix.network_address) <= a
                   <= int(p.prefix.broadcast_address) for p in subnet.pd_pools) or \
            any(r.prefix is not None and int(r.prefix.network_address) == a
                and r.prefix.prefixlen == plen for r in subnet.reservations)

    def _confirm(self, m: C.Message, subnet: Subnet | None) -> C.Message | None:
        """RFC 8415 18.3.3: Success when every address is on the client's link,
        NotOnLink when one is not; no reply when there is nothing to check."""
        addrs = [a.address for ia in m.ia_na for a in ia.addresses]
        if not addrs:
            return self._drop("confirm_without_addresses")
        if subnet is None:
            return self._drop("no_subnet")
        lo, hi = int(subnet.network.network_address), int(subnet.network.broadcast_address)
        ok = all(lo <= int.from_bytes(a, "big") <= hi for a in addrs)
        out = self._reply(m, C.REPLY, subnet)
        code = C.SUCCESS if ok else C.NOT_ON_LINK
        out.status = C.Status(code, C.STATUS_NAMES[code])
        return out

    def _release(self, m: C.Message, subnet: Subnet, duid: str) -> C.Message:
        """RFC 8415 18.3.7 / 18.3.8: each IA without a binding comes back with NoBinding."""
        out = self._reply(m, C.REPLY, subnet)
        decline = m.msg_type == C.DECLINE
        for kind, ias, target in ((NA, m.ia_na, out.ia_na), (PD, m.ia_pd, out.ia_pd)):
            if decline and kind == PD:
                continue                   # DECLINE is about addresses only
            for ia in ias:
                found = 0
                for text in self._hints(kind, ia):
                    if decline:
                        lease = self.leases.decline(kind, text, duid, ia.iaid)
                    else:
                        lease = self.leases.release(kind, text, duid, ia.iaid)
                    if lease is not None:
                        found += 1
                        self._changed("declined" if decline else "released", lease, m)
                if not found:
                    target.append(self._no(kind, ia, C.NO_BINDING))
        out.status = C.Status(C.SUCCESS, "Decline received" if decline else "Release received")
        return out
