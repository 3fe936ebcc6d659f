"""The DDNS interface between services (RFC 4703): dhcp4/dhcp6 call it, dns provides it.

Services never import each other.  The ``dns`` service, when configured
with ``ddns = { forward_zone, reverse_zone }``, puts an :class:`IDDNSUpdater`
in ``context.providers["ddns"]``; a DHCP service looks it up with
:func:`ddns_provider` when it binds or releases a lease and does nothing
when there is none.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface

#: DHCID identifier types (RFC 4701 section 3.3).
DHCID_HWADDR = 0x0000        # htype (1 byte) + chaddr, DHCPv4 without client identifier
DHCID_CLIENT_ID = 0x0001     # DHCPv4 client identifier option (61) contents
DHCID_DUID = 0x0002          # DHCPv6 DUID (or RFC 4361 DUID in option 61)


class DDNSConflict(Exception):
    """The name belongs to another client (its DHCID differs): nothing was changed."""


class IDDNSUpdater(Interface):
    """Forward (A/AAAA + DHCID) and reverse (PTR) DNS for DHCP leases."""

    forward_zone = Attribute("The zone the client names are added to (text, absolute).")

    def lease_bound(fqdn, address, client_identity, ttl_s, identity_type=DHCID_CLIENT_ID):
        """Publish ``fqdn`` -> ``address`` and its PTR for a bound lease.

        ``client_identity`` (bytes) identifies the client for the DHCID
        (RFC 4701, of ``identity_type``).  Returns a Deferred firing with a
        dict describing what was written, or failing with
        :class:`DDNSConflict` when another client holds the name.
        """

    def lease_released(fqdn, address, client_identity, identity_type=DHCID_CLIENT_ID):
        """Remove what :meth:`lease_bound` published, only if the DHCID still
        matches this client.  Returns a Deferred (dict of what was removed)."""


def ddns_provider(context: Any) -> IDDNSUpdater | None:
    """The node's DDNS updater, or None when no service provides one."""
    providers = getattr(context, "providers", None) or {}
    return providers.get("ddns")
