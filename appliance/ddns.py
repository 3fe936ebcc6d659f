"""The DDNS interface between services (RFC 4703): dhcp4/dhcp6 call it, dns provides it.

Services never import each other.  The ``dns`` service, when configured
with ``ddns = { forward_zone, reverse_zone }``, puts an :class:`IDDNSUpdater`
in ``context.providers["ddns"]``; a DHCP service looks it up with
:func:`ddns_provider` when it binds or releases a lease and does nothing
when there is none.

Contract (the provider keeps it whatever the caller passes): both methods
return a Deferred and never raise.  A host name that is not a valid DNS
name fails the Deferred with :class:`DDNSNameError`; another client's name
with :class:`DDNSConflict`; a server that cannot be reached, after the
provider's own retries, with its error.  Operations on one name run in
the order they were called.
"""

from __future__ import annotations

import re
from typing import Any

from zope.interface import Attribute, Interface

#: DHCID identifier types (RFC 4701 section 3.3).
DHCID_HWADDR = 0x0000        # htype (1 byte) + chaddr, DHCPv4 without client identifier
DHCID_CLIENT_ID = 0x0001     # DHCPv4 client identifier option (61) contents
DHCID_DUID = 0x0002          # DHCPv6 DUID (or RFC 4361 DUID in option 61)

#: Client FQDN option flags (RFC 4702 section 2.1; option 81, DHCPv6 option 39 has S, O, N).
FQDN_S = 0x01     # client: "server, do the forward (A) update"; server: "I did it"
FQDN_O = 0x02     # server only: "I overrode your S=0"
FQDN_E = 0x04     # canonical wire format of the name (DHCPv4 only)
FQDN_N = 0x08     # client: "nobody updates"; server: "I do no updates"


class DDNSConflict(Exception):
    """The name belongs to another client (its DHCID differs): nothing was changed."""


class DDNSNameError(ValueError):
    """The host name cannot be published (not a valid DNS name, outside the DDNS
    domains, or a name the dns service manages): nothing was changed."""


class IDDNSUpdater(Interface):
    """Forward (A/AAAA + DHCID) and reverse (PTR) DNS for DHCP leases."""

    forward_zone = Attribute("The zone the client names are added to (text, absolute).")

    def lease_bound(fqdn, address, client_identity, ttl_s, identity_type=DHCID_CLIENT_ID, *,
                    fqdn_flags=None, previous_fqdn=None, previous_address=None):
        """Publish ``fqdn`` -> ``address`` and its PTR for a bound lease.

        ``client_identity`` (bytes) identifies the client for the DHCID
        (RFC 4701, of ``identity_type``; option-61 contents of type 255 are
        RFC 4361 DUIDs and hashed as ``DHCID_DUID``).  ``fqdn_flags``: the
        flags byte of the client's option 81 (None: the client sent only a
        host name, the server updates both).  ``previous_fqdn`` /
        ``previous_address``: what this lease published before (a changed
        host name or a moved client), removed first.  Returns a Deferred
        firing with a dict describing what was written, including
        ``"flags"``, the S/O/N flags for the server's option 81 answer;
        failing with :class:`DDNSConflict` when another client holds the
        name, or :class:`DDNSNameError` when the name cannot be used.
        """

    def answer_flags(fqdn_flags):
        """The S/O/N flags :meth:`lease_bound` decides for a client's option 81
        flags (None: no option 81), at once and without DNS traffic, so the
        DHCP server can answer option 81 in its ACK before the update is
        done; the same as the ``"flags"`` of lease_bound's result."""

    def skipped(op, result):
        """Optional: count a caller's decision that sent nothing (``op`` "bind" or
        "release"; ``result`` e.g. "unchanged", "bad_name", "not_owner")."""

    def lease_released(fqdn, address, client_identity, identity_type=DHCID_CLIENT_ID):
        """Remove what :meth:`lease_bound` published, only if the DHCID still
        matches this client.  Returns a Deferred (dict of what was removed)."""


_LDH = re.compile(r"[^a-z0-9-]+")


def sanitize_hostname(text: str | bytes, replacement: str = "-") -> str | None:
    """A client's host name (option 12 / 81) made DNS-safe, as Kea's
    ``hostname-char-set``: lower case, each label reduced to letters, digits
    and ``-`` (others replaced), no leading/trailing ``-``, empty labels
    dropped, labels cut at 63 octets, at most 253 octets in all.  None
    when nothing usable is left."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    labels = []
    for label in str(text).lower().split("."):
        label = _LDH.sub(replacement, label).strip("-")[:63].strip("-")
        if label:
            labels.append(label)
    out = ".".join(labels)
    while len(out) > 253 and "." in out:
        out = out.rsplit(".", 1)[0]
    return out[:63] if len(out) > 253 else (out or None)


def ddns_provider(context: Any) -> IDDNSUpdater | None:
    """The node's DDNS updater, or None when no service provides one."""
    providers = getattr(context, "providers", None) or {}
    return providers.get("ddns")
