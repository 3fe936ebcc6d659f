"""DDNS for DHCP leases with RFC 4703 conflict detection (DHCID, RFC 4701).

On a bound lease (:meth:`DDNSUpdater.lease_bound`):

1. forward zone: "name does not exist" -> add A + DHCID;
2. if the name exists: "DHCID rrset equals this client's" -> replace A;
   a different DHCID means another client owns the name: nothing is
   changed and :class:`~appliance.ddns.DDNSConflict` is raised;
3. reverse zone: replace the PTR of the address (the server owns the address).

On release or expiry (:meth:`DDNSUpdater.lease_released`) the A record is
removed only while the DHCID still matches, the DHCID once no address
record is left, and the PTR pointing at this name.
"""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.DHCID
import dns.rdata
import dns.reversename
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from appliance.ddns import DHCID_CLIENT_ID, DDNSConflict, IDDNSUpdater
from services.dns.message import check_response, make_update, rcode_text
from services.dns.records import zone_of

_log = Logger(namespace="appliance.dns.ddns")

DIGEST_SHA256 = 1


def dhcid_rdata(identity: bytes, fqdn: dns.name.Name, identity_type: int = DHCID_CLIENT_ID):
    """The DHCID rdata for a client and name (RFC 4701 section 3.3-3.5)."""
    wire = fqdn.canonicalize().to_wire()
    digest = hashlib.sha256(bytes(identity) + wire).digest()
    data = struct.pack("!HB", identity_type, DIGEST_SHA256) + digest
    return dns.rdtypes.IN.DHCID.DHCID(dns.rdataclass.IN, dns.rdatatype.DHCID, data)


@implementer(IDDNSUpdater)
class DDNSUpdater:
    """Forward A/AAAA + DHCID and reverse PTR updates through the service's client."""

    def __init__(self, client, key, forward_zone: dns.name.Name, reverse_zone: dns.name.Name | None,
                 metrics=None, zones=()):
        self.client = client
        self.key = key
        self.domain = forward_zone
        # UPDATEs go to the zone apex on the server: the configured zone
        # holding the forward/reverse domain, else the domain itself.
        self.zone = zone_of(forward_zone, zones) or forward_zone
        self.reverse_zone = reverse_zone
        self.reverse_update_zone = (zone_of(reverse_zone, zones) or reverse_zone
                                    if reverse_zone is not None else None)
        self.metrics = metrics
        self.forward_zone = forward_zone.to_text()

    # -- helpers ---------------------------------------------------------
    def _names(self, fqdn: str, address: str):
        name = dns.name.from_text(fqdn)
        if not name.is_subdomain(self.domain):
            raise ValueError(f"{name} is not inside the DDNS forward zone {self.domain}")
        addr = ipaddress.ip_address(address)
        rdtype = dns.rdatatype.A if addr.version == 4 else dns.rdatatype.AAAA
        rev = dns.reversename.from_address(str(addr))
        return name, addr, rdtype, rev

    def _count(self, op: str, result: str):
        if self.metrics is not None:
            self.metrics.ddns.labels(op, result).inc()

    @defer.inlineCallbacks
    def _send(self, upd, zone: dns.name.Name):
        key = self.key.name if self.key else None
        response, server = yield self.client.exchange(upd, zone.to_text(), key)
        return rcode_text(response), server, response

    # -- IDDNSUpdater ----------------------------------------------------
    def lease_bound(self, fqdn, address, client_identity, ttl_s, identity_type=DHCID_CLIENT_ID):
        try:
            name, addr, rdtype, rev = self._names(fqdn, address)
        except ValueError as e:
            return defer.fail(e)
        return defer.ensureDeferred(self._bound(name, addr, rdtype, rev, bytes(client_identity),
                                                int(ttl_s), identity_type))

    async def _bound(self, name, addr, rdtype, rev, identity, ttl, identity_type):
        dhcid = dhcid_rdata(identity, name, identity_type)
        address_rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(addr))
        # 1. a new name: add A + DHCID
        upd = make_update(self.zone, self.key)
        upd.absent(name)
        upd.add(name, ttl, address_rd)
        upd.add(name, ttl, dhcid)
        rcode, server, resp = await self._send(upd, self.zone)
        how = "added"
        if rcode == "YXDOMAIN":
            # 2. the name exists: only if it carries our DHCID
            upd = make_update(self.zone, self.key)
            upd.present(name, dhcid)
            upd.replace(name, ttl, address_rd)
            rcode, server, resp = await self._send(upd, self.zone)
            how = "updated"
            if rcode in ("NXRRSET", "NXDOMAIN"):
                self._count("bind", "conflict")
                _log.warn("ddns: {name} belongs to another client (DHCID differs); "
                          "not publishing {addr}", name=name.to_text(), addr=str(addr))
                raise DDNSConflict(f"{name} is in use by another client (DHCID differs)")
        check_response(resp, self.zone.to_text(), server, self.key.name if self.key else None)
        result = {"name": name.to_text(), "address": str(addr), "forward": how, "ptr": None}
        # 3. the PTR of the address
        if self.reverse_zone is not None and rev.is_subdomain(self.reverse_zone):
            upd = make_update(self.reverse_update_zone, self.key)
            upd.replace(rev, ttl, dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR,
                                                      name.to_text()))
            rcode, server, resp = await self._send(upd, self.reverse_update_zone)
            check_response(resp, self.reverse_update_zone.to_text(), server,
                           self.key.name if self.key else None)
            result["ptr"] = rev.to_text()
        self._count("bind", "ok")
        _log.info("ddns: {name} -> {addr} {how} (lease bound), ptr {ptr}", name=name.to_text(),
                  addr=str(addr), how=how, ptr=result["ptr"] or "none")
        return result

    def lease_released(self, fqdn, address, client_identity, identity_type=DHCID_CLIENT_ID):
        try:
            name, addr, rdtype, rev = self._names(fqdn, address)
        except ValueError as e:
            return defer.fail(e)
        return defer.ensureDeferred(self._released(name, addr, rdtype, rev,
                                                   bytes(client_identity), identity_type))

    async def _released(self, name, addr, rdtype, rev, identity, identity_type):
        dhcid = dhcid_rdata(identity, name, identity_type)
        address_rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(addr))
        keyname = self.key.name if self.key else None
        result = {"name": name.to_text(), "address": str(addr), "forward": "kept", "ptr": None}
        # 1. the address record, only while the name is ours
        upd = make_update(self.zone, self.key)
        upd.present(name, dhcid)
        upd.delete(name, address_rd)
        rcode, server, resp = await self._send(upd, self.zone)
        if rcode == "NOERROR":
            result["forward"] = "removed"
            # 2. the DHCID, once no address record is left
            upd = make_update(self.zone, self.key)
            upd.present(name, dhcid)
            upd.absent(name, dns.rdatatype.A)
            upd.absent(name, dns.rdatatype.AAAA)
            upd.delete(name, dns.rdatatype.DHCID)
            rcode2, server, resp2 = await self._send(upd, self.zone)
            if rcode2 not in ("NOERROR", "YXRRSET", "NXRRSET"):
                check_response(resp2, self.zone.to_text(), server, keyname)
        elif rcode in ("NXRRSET", "NXDOMAIN"):
            result["forward"] = "not ours"
        else:
            check_response(resp, self.zone.to_text(), server, keyname)
        # 3. the PTR, if it still names this client
        if self.reverse_zone is not None and rev.is_subdomain(self.reverse_zone):
            upd = make_update(self.reverse_update_zone, self.key)
            upd.delete(rev, dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR,
                                                name.to_text()))
            rcode, server, resp = await self._send(upd, self.reverse_update_zone)
            check_response(resp, self.reverse_update_zone.to_text(), server, keyname)
            result["ptr"] = rev.to_text()
        self._count("release", "ok" if result["forward"] == "removed" else result["forward"])
        _log.info("ddns: {name} {addr} released: forward {forward}, ptr {ptr} removed",
                  name=name.to_text(), addr=str(addr), forward=result["forward"],
                  ptr=result["ptr"] or "none")
        return result
