"""DDNS for DHCP leases with RFC 4703 conflict detection (DHCID, RFC 4701).

On a bound lease (:meth:`DDNSUpdater.lease_bound`):

1. forward zone: "name does not exist" -> add A + DHCID;
2. if the name exists: "DHCID rrset equals this client's" -> replace A;
   a different DHCID means another client owns the name: nothing is
   changed and :class:`~appliance.ddns.DDNSConflict` is raised; if the
   name vanished in between (NXDOMAIN), start again at 1 (RFC 4703 5.3.1);
3. reverse zone: replace the PTR of the address (the server owns the address).

On release or expiry (:meth:`DDNSUpdater.lease_released`) the A record is
removed only while the DHCID still matches, the DHCID once no address
record is left, and the PTR pointing at this name.

Robustness (review H2, M5, M6, L9): the entry points never raise -- every
problem, including a host name that is no DNS name (``a..b``, a 64-octet
label), fails the returned Deferred with
:class:`~appliance.ddns.DDNSNameError`; names the updater manages (and
their guards) are refused; operations on one name (and one PTR) run in
call order; a server that does not answer, or answers SERVFAIL, is retried
with backoff; at most ``MAX_CONCURRENT`` operations are in flight.

Option 81 (RFC 4702 section 4): ``fqdn_flags`` N=1 -> no update (unless
``override_no_update``); S=0 -> the client does the forward update, the
server only the PTR (unless ``override_client_update``: both, O=1); S=1 or
no option 81 -> the server does both.  The result's ``flags`` are the
S/O/N bits for the server's answer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import struct

import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.DHCID
import dns.reversename
from twisted.internet import defer, task
from twisted.logger import Logger
from zope.interface import implementer

from appliance.ddns import (DHCID_CLIENT_ID, DHCID_DUID, FQDN_N, FQDN_O, FQDN_S, DDNSConflict,
                            DDNSNameError, IDDNSUpdater)
from services.dns.backoff import Backoff
from services.dns.message import DNSError, TransportError, check_response, make_update
from services.dns.records import GUARD_LABEL, zone_of
from services.dns.updater import send_update

_log = Logger(namespace="appliance.dns.ddns")

DIGEST_SHA256 = 1
MAX_CONCURRENT = 32
_LABEL = re.compile(rb"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def dhcid_rdata(identity: bytes, fqdn: dns.name.Name, identity_type: int = DHCID_CLIENT_ID):
    """The DHCID rdata for a client and name (RFC 4701 section 3.3-3.5)."""
    wire = fqdn.canonicalize().to_wire()
    digest = hashlib.sha256(bytes(identity) + wire).digest()
    data = struct.pack("!HB", identity_type, DIGEST_SHA256) + digest
    return dns.rdtypes.IN.DHCID.DHCID(dns.rdataclass.IN, dns.rdatatype.DHCID, data)


def dhcid_identity(identity: bytes, identity_type: int) -> tuple[bytes, int]:
    """RFC 4701 section 3.3: an option-61 client identifier of type 255 is an
    RFC 4361 IAID + DUID; its DHCID uses identifier type 2 and the DUID."""
    identity = bytes(identity)
    if identity_type == DHCID_CLIENT_ID and len(identity) > 5 and identity[0] == 255:
        return identity[5:], DHCID_DUID
    return identity, identity_type


def check_host_name(fqdn, domains, managed=frozenset()) -> dns.name.Name:
    """``fqdn`` as a name the DDNS updater may publish, or DDNSNameError saying why."""
    if not isinstance(fqdn, str):
        raise DDNSNameError(f"host name must be text, got {type(fqdn).__name__}")
    try:
        name = dns.name.from_text(fqdn)
    except (dns.exception.DNSException, ValueError, UnicodeError) as e:
        raise DDNSNameError(f"{fqdn[:80]!r} is not a DNS name: {e}") from None
    for label in name.labels[:-1]:
        if not _LABEL.match(label):
            raise DDNSNameError(f"{name.to_text()[:80]!r}: label {label[:63]!r} is not a host "
                                "name label (letters, digits, '-', 1-63 octets)")
    if not any(name.is_subdomain(d) and name != d for d in domains):
        raise DDNSNameError(f"{name} is not inside the DDNS domains "
                            f"({', '.join(d.to_text() for d in domains)})")
    if name in managed:
        raise DDNSNameError(f"{name} is a record the dns service manages; not for DDNS")
    return name


@implementer(IDDNSUpdater)
class DDNSUpdater:
    """Forward A/AAAA + DHCID and reverse PTR updates through the service's clients."""

    def __init__(self, client, key, forward_zone: dns.name.Name, reverse_zone: dns.name.Name | None,
                 metrics=None, zones=(), *, forward_zones=(), reverse_zones=(), managed=(),
                 clock=None, attempts: int = 5, retry_initial_s: float = 0.25,
                 retry_max_s: float = 5.0, override_client_update: bool = False,
                 override_no_update: bool = False, client_for=None, key_for=None, rng=None):
        self.client = client
        self.key = key
        self._client_for = client_for or (lambda zone: self.client)
        self._key_for = key_for or (lambda zone: self.key)
        self.domains = tuple(dict.fromkeys([forward_zone, *forward_zones]))
        self.domain = forward_zone
        self.reverse_domains = tuple(dict.fromkeys(
            [z for z in (reverse_zone, *reverse_zones) if z is not None]))
        self.reverse_zone = reverse_zone
        self._zones = tuple(zones)
        self.metrics = metrics
        self.forward_zone = forward_zone.to_text()
        managed_names = set()
        for name in managed:
            managed_names.add(name)
            managed_names.add(dns.name.Name((GUARD_LABEL.encode(),) + name.labels))
        self.managed = frozenset(managed_names)
        self.clock = clock
        self.attempts = max(1, attempts)
        self.retry_initial_s, self.retry_max_s = retry_initial_s, retry_max_s
        self.override_client_update = override_client_update
        self.override_no_update = override_no_update
        self._rng = rng
        self._tails: dict[dns.name.Name, defer.Deferred] = {}
        self._limit = defer.DeferredSemaphore(MAX_CONCURRENT)
        self.stopped = False

    # -- helpers ---------------------------------------------------------
    def update_zone(self, name: dns.name.Name, domains) -> dns.name.Name:
        """The zone an UPDATE for ``name`` goes to: the configured zone holding it,
        else the DDNS domain holding it."""
        return zone_of(name, self._zones) or zone_of(name, domains)

    def _names(self, fqdn, address):
        name = check_host_name(fqdn, self.domains, self.managed)
        try:
            addr = ipaddress.ip_address(address)
        except ValueError as e:
            raise DDNSNameError(str(e)) from None
        rdtype = dns.rdatatype.A if addr.version == 4 else dns.rdatatype.AAAA
        rev = dns.reversename.from_address(str(addr))
        return name, addr, rdtype, rev

    def _reverse_zone(self, rev: dns.name.Name):
        domain = zone_of(rev, self.reverse_domains)
        return None if domain is None else (zone_of(rev, self._zones) or domain)

    def _count(self, op: str, result: str):
        if self.metrics is not None:
            self.metrics.ddns.labels(op, result).inc()

    def _keyname(self, zone):
        key = self._key_for(zone)
        return key.name if key else None

    async def _send(self, build, zone: dns.name.Name):
        """Send ``build()`` (a fresh message each attempt); retry timeouts and SERVFAIL."""
        backoff = None
        for attempt in range(self.attempts):
            if self.stopped:
                raise TransportError(f"ddns for {zone}: the dns service stopped", "stopped")
            upd = build()
            try:
                response, server, rcode, _ = await send_update(
                    self._client_for(zone), upd, zone.to_text(), self._keyname(zone), self.clock,
                    self.metrics)
            except TransportError as e:
                if attempt + 1 >= self.attempts or self.clock is None or self.stopped:
                    raise
                error = e
            except DNSError as e:
                if e.rcode != "SERVFAIL" or attempt + 1 >= self.attempts or self.clock is None \
                        or self.stopped:
                    raise
                error = e
            else:
                return rcode, server, response
            if backoff is None:
                backoff = Backoff(self.retry_initial_s, self.retry_max_s,
                                  **({"rng": self._rng} if self._rng else {}))
            delay = backoff.next_delay()
            _log.info("ddns: {zone}: {why}; retrying in {delay:.2f}s", zone=zone.to_text(),
                      why=error, delay=delay)
            await task.deferLater(self.clock, delay, lambda: None)
        raise AssertionError("unreachable")

    def _ordered(self, keys, op: str, run) -> defer.Deferred:
        """Run ``run()`` after every earlier operation on any of ``keys``; bounded concurrency."""
        before = [self._tails[k] for k in keys if k in self._tails]
        started = self.clock.seconds() if self.clock is not None else None

        async def go():
            if before:
                await defer.DeferredList(before, consumeErrors=True)
            return await self._limit.run(lambda: defer.ensureDeferred(run()))
        d = defer.ensureDeferred(go())
        tail: defer.Deferred = defer.Deferred()

        def done(result):
            for k in keys:
                if self._tails.get(k) is tail:
                    del self._tails[k]
            tail.callback(None)
            if started is not None and self.metrics is not None:
                self.metrics.ddns_latency.labels(op).observe(self.clock.seconds() - started)
            return result
        for k in keys:
            self._tails[k] = tail
        return d.addBoth(done)

    # -- IDDNSUpdater ----------------------------------------------------
    def lease_bound(self, fqdn, address, client_identity, ttl_s, identity_type=DHCID_CLIENT_ID, *,
                    fqdn_flags=None, previous_fqdn=None, previous_address=None):
        try:
            name, addr, rdtype, rev = self._names(fqdn, address)
            identity, identity_type = dhcid_identity(client_identity, identity_type)
            ttl = max(0, int(ttl_s))
            flags = None if fqdn_flags is None else int(fqdn_flags)
            previous = None
            if previous_fqdn not in (None, fqdn) or previous_address not in (None, address):
                try:
                    previous = self._names(previous_fqdn or fqdn, previous_address or address)
                except DDNSNameError:
                    previous = None       # nothing valid was published under it
            keys = [name, rev] + ([previous[0], previous[3]] if previous else [])
            return self._ordered(keys, "bind", lambda: self._bound(
                name, addr, rdtype, rev, identity, ttl, identity_type, flags, previous))
        except DDNSNameError as e:
            self._count("bind", "bad_name")
            return defer.fail(e)
        except Exception:
            self._count("bind", "error")
            return defer.fail()

    def skipped(self, op: str, result: str) -> None:
        """Count a DDNS decision of the caller that sent nothing (a renewal
        already published, no usable name, not the lease owner)."""
        self._count(op, result)

    def answer_flags(self, fqdn_flags):
        return self._do(None if fqdn_flags is None else int(fqdn_flags))[2]

    def _do(self, flags: int | None) -> tuple[bool, bool, int | None]:
        """(forward, reverse, answer flags) for the client's option 81 flags."""
        if flags is None:
            return True, True, None
        if flags & FQDN_N and not self.override_no_update:
            return False, False, FQDN_N
        if flags & FQDN_N:
            return True, True, FQDN_S | FQDN_O
        if flags & FQDN_S:
            return True, True, FQDN_S
        if self.override_client_update:
            return True, True, FQDN_S | FQDN_O
        return False, True, 0

    async def _bound(self, name, addr, rdtype, rev, identity, ttl, identity_type, flags, previous):
        forward, reverse, answer = self._do(flags)
        result = {"name": name.to_text(), "address": str(addr), "forward": "client",
                  "ptr": None, "flags": answer}
        if not forward and not reverse:
            result["forward"] = "skipped"
            self._count("bind", "skipped")
            return result
        if previous is not None:
            old_name, old_addr, _, old_rev = previous
            removed = await self._released(old_name, old_addr, previous[2], old_rev, identity,
                                           identity_type, keep_ptr=(old_rev == rev),
                                           keep_forward=(old_name == name), op="superseded")
            result["previous"] = removed
        if forward:
            result["forward"] = await self._forward(name, addr, rdtype, identity, ttl,
                                                    identity_type)
        zone = self._reverse_zone(rev) if reverse else None
        if zone is not None:
            ptr = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR, name.to_text())

            def build():
                upd = make_update(zone, self._key_for(zone))
                upd.replace(rev, ttl, ptr)
                return upd
            rcode, server, resp = await self._send(build, zone)
            check_response(resp, zone.to_text(), server, self._keyname(zone))
            result["ptr"] = rev.to_text()
        self._count("bind", "ok")
        _log.info("ddns: {name} -> {addr} {how} (lease bound), ptr {ptr}", name=name.to_text(),
                  addr=str(addr), how=result["forward"], ptr=result["ptr"] or "none")
        return result

    async def _forward(self, name, addr, rdtype, identity, ttl, identity_type) -> str:
        zone = self.update_zone(name, self.domains)
        dhcid = dhcid_rdata(identity, name, identity_type)
        address_rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(addr))

        def add():
            upd = make_update(zone, self._key_for(zone))
            upd.absent(name)
            upd.add(name, ttl, address_rd)
            upd.add(name, ttl, dhcid)
            return upd

        def replace():
            upd = make_update(zone, self._key_for(zone))
            upd.present(name, dhcid)
            upd.replace(name, ttl, address_rd)
            return upd
        for _ in range(2):
            # 1. a new name: add A + DHCID
            rcode, server, resp = await self._send(add, zone)
            if rcode != "YXDOMAIN":
                check_response(resp, zone.to_text(), server, self._keyname(zone))
                return "added"
            # 2. the name exists: only if it carries our DHCID
            rcode, server, resp = await self._send(replace, zone)
            if rcode == "NOERROR":
                return "updated"
            if rcode == "NXRRSET":
                self._count("bind", "conflict")
                _log.warn("ddns: {name} belongs to another client (DHCID differs); "
                          "not publishing {addr}", name=name.to_text(), addr=str(addr))
                raise DDNSConflict(f"{name} is in use by another client (DHCID differs)")
            if rcode != "NXDOMAIN":       # NXDOMAIN: it vanished in between, start again
                check_response(resp, zone.to_text(), server, self._keyname(zone))
        raise DDNSConflict(f"{name} keeps appearing and vanishing; not publishing")

    def lease_released(self, fqdn, address, client_identity, identity_type=DHCID_CLIENT_ID):
        try:
            name, addr, rdtype, rev = self._names(fqdn, address)
            identity, identity_type = dhcid_identity(client_identity, identity_type)
            return self._ordered([name, rev], "release", lambda: self._released(
                name, addr, rdtype, rev, identity, identity_type))
        except DDNSNameError as e:
            self._count("release", "bad_name")
            return defer.fail(e)
        except Exception:
            self._count("release", "error")
            return defer.fail()

    async def _released(self, name, addr, rdtype, rev, identity, identity_type, *,
                        keep_ptr=False, keep_forward=False, op="release"):
        dhcid = dhcid_rdata(identity, name, identity_type)
        address_rd = dns.rdata.from_text(dns.rdataclass.IN, rdtype, str(addr))
        result = {"name": name.to_text(), "address": str(addr), "forward": "kept", "ptr": None}
        zone = self.update_zone(name, self.domains)
        if not keep_forward:
            # 1. the address record, only while the name is ours
            def delete_address():
                upd = make_update(zone, self._key_for(zone))
                upd.present(name, dhcid)
                upd.delete(name, address_rd)
                return upd

            def delete_dhcid():
                upd = make_update(zone, self._key_for(zone))
                upd.present(name, dhcid)
                upd.absent(name, dns.rdatatype.A)
                upd.absent(name, dns.rdatatype.AAAA)
                upd.delete(name, dns.rdatatype.DHCID)
                return upd
            rcode, server, resp = await self._send(delete_address, zone)
            if rcode == "NOERROR":
                result["forward"] = "removed"
                # 2. the DHCID, once no address record is left
                rcode2, server, resp2 = await self._send(delete_dhcid, zone)
                if rcode2 not in ("NOERROR", "YXRRSET", "NXRRSET"):
                    check_response(resp2, zone.to_text(), server, self._keyname(zone))
            elif rcode in ("NXRRSET", "NXDOMAIN"):
                result["forward"] = "not ours"
            else:
                check_response(resp, zone.to_text(), server, self._keyname(zone))
        # 3. the PTR, if it still names this client
        rzone = None if keep_ptr else self._reverse_zone(rev)
        if rzone is not None:
            ptr = dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.PTR, name.to_text())

            def delete_ptr():
                upd = make_update(rzone, self._key_for(rzone))
                upd.delete(rev, ptr)
                return upd
            rcode, server, resp = await self._send(delete_ptr, rzone)
            check_response(resp, rzone.to_text(), server, self._keyname(rzone))
            result["ptr"] = rev.to_text()
        self._count(op, "ok" if result["forward"] == "removed" else result["forward"])
        _log.info("ddns: {name} {addr} {op}: forward {forward}, ptr {ptr} removed",
                  name=name.to_text(), addr=str(addr), op="released" if op == "release" else op,
                  forward=result["forward"], ptr=result["ptr"] or "none")
        return result
