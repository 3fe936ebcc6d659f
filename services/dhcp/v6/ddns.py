"""DDNS for DHCPv6 leases (RFC 4704, RFC 4701, RFC 4703) through appliance/ddns.py.

A client that sends the Client FQDN option (39) with its REQUEST / RENEW /
REBIND (or a rapid-commit SOLICIT) gets, for each IA_NA address bound,
an AAAA record for its name and a PTR in ip6.arpa, both guarded by a DHCID
made from its DUID (RFC 4701 identifier type 0x0002); the ``dns`` service
does the updates (``context.providers["ddns"]``).  Release and expiry
remove them.  A partial name (a host label) is completed with the
provider's forward zone.  Without a provider nothing is sent and option 39
is not answered.

What was published is kept on the lease record (the core's DDNS state:
``{fqdn, address, flags, done}``), so a renewal that changes nothing sends
nothing, and a partner or a restart knows what to remove.

Option 39 flags are S=1, O=2, N=4 (RFC 4704 4.1); the provider speaks the
DHCPv4 option 81 layout (N=8), mapped here.
"""

from __future__ import annotations

import json

from twisted.logger import Logger

from appliance.ddns import DHCID_DUID, FQDN_N, FQDN_O, FQDN_S, ddns_provider
from services.dhcp.v6 import codec as C
from services.dhcp.v6.leases import NA

_log = Logger(namespace="services.dhcp6")
V6_S, V6_O, V6_N = 1, 2, 4


def to_v4_flags(flags: int) -> int:
    return (FQDN_S if flags & V6_S else 0) | (FQDN_O if flags & V6_O else 0) | \
        (FQDN_N if flags & V6_N else 0)


def to_v6_flags(flags: int) -> int:
    return (V6_S if flags & FQDN_S else 0) | (V6_O if flags & FQDN_O else 0) | \
        (V6_N if flags & FQDN_N else 0)


class Ddns6:
    def __init__(self, service):
        self.service = service
        self.stats = {"bound": 0, "released": 0, "unchanged": 0, "failed": 0}

    @property
    def provider(self):
        return ddns_provider(self.service.context)

    def qualify(self, name: str) -> str | None:
        if not name:
            return None
        if name.endswith("."):
            return name
        provider = self.provider
        zone = str(getattr(provider, "forward_zone", "") or "").rstrip(".")
        return f"{name}.{zone}." if zone else f"{name}."

    def answer(self, fqdn: C.ClientFQDN) -> C.ClientFQDN | None:
        """The server's option 39 for the client's (None without a provider)."""
        provider = self.provider
        if provider is None:
            return None
        flags = to_v6_flags(provider.answer_flags(to_v4_flags(fqdn.flags)))
        name = (self.qualify(fqdn.name + ("" if fqdn.partial else ".")) or "").rstrip(".")
        try:
            C.encode_name(name)
        except (ValueError, UnicodeError):
            # completed with the zone it no longer fits a DNS name: the flags alone (the
            # REPLY must still leave; DDNS refuses the name and says so in its stats)
            return C.ClientFQDN(flags, "", True)
        return C.ClientFQDN(flags, name, False)

    def lease_changed(self, event: str, lease, binding) -> None:
        provider = self.provider
        if provider is None or lease.kind != NA:
            return
        try:
            if event == "bound":
                self._bound(provider, lease, binding)
            elif event in ("released", "expired", "declined"):
                self._removed(provider, lease)
        except Exception:
            self.stats["failed"] += 1
            _log.failure("dhcp6 ddns: {event} of {address}", event=event, address=lease.address)

    def _bound(self, provider, lease, binding) -> None:
        fqdn = self.qualify(lease.hostname)
        if fqdn is None:
            return
        flags = None
        if binding is not None and binding.fqdn is not None:
            flags = to_v4_flags(binding.fqdn.flags)
        published = json.loads(lease.ddns) if lease.ddns else None
        if published and published.get("fqdn") == fqdn \
                and published.get("address") == lease.address and published.get("done", True):
            self.stats["unchanged"] += 1
            skipped = getattr(provider, "skipped", None)
            if skipped is not None:
                skipped("bind", "unchanged")
            return
        ttl = max(60, int(self.service.config.subnet(lease.subnet_id).valid_lifetime_s // 3)) \
            if self.service.config.subnet(lease.subnet_id) else 300
        d = provider.lease_bound(fqdn, lease.address, bytes.fromhex(lease.duid), ttl, DHCID_DUID,
                                 fqdn_flags=flags,
                                 previous_fqdn=published.get("fqdn") if published else None,
                                 previous_address=published.get("address") if published else None)

        def done(result):
            self.stats["bound"] += 1
            answer = result.get("flags") if isinstance(result, dict) else None
            self.service.leases.set_ddns(lease, json.dumps(
                {"fqdn": fqdn, "address": lease.address, "flags": answer, "done": True}))
            return result

        def failed(f):
            self.stats["failed"] += 1
            _log.warn("dhcp6 ddns: {fqdn} -> {address} not published: {why}", fqdn=fqdn,
                      address=lease.address, why=f.getErrorMessage())
        d.addCallback(done).addErrback(failed)

    def _removed(self, provider, lease) -> None:
        if not lease.ddns:
            return
        published = json.loads(lease.ddns)
        d = provider.lease_released(published["fqdn"], published["address"],
                                    bytes.fromhex(lease.duid), DHCID_DUID)

        def done(result):
            self.stats["released"] += 1
            self.service.leases.set_ddns(lease, "")
            return result

        def failed(f):
            self.stats["failed"] += 1
            _log.warn("dhcp6 ddns: {fqdn} not removed: {why}", fqdn=published["fqdn"],
                      why=f.getErrorMessage())
        d.addCallback(done).addErrback(failed)
