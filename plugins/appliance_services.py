"""The appliance's own service plugins: one object per service key of SPEC.md.

Each object is an :class:`appliance.plugin.IServicePlugin`; the service code
lives in ``services/`` and is imported only when the service is used.
"""

from services.dhcp.plugin import dhcp4_plugin, dhcp6_plugin
from services.dns.plugin import dns_plugin
from services.encap.plugin import encap_plugin
from services.esr.plugin import esr_plugin
from services.sip.plugin import sip_plugin

__all__ = ["dhcp4_plugin", "dhcp6_plugin", "dns_plugin", "encap_plugin", "esr_plugin", "sip_plugin"]
