"""The ``dns`` service plugin (SPEC: low-TTL DNS updater, DDNS for DHCP).

Registered in ``plugins/appliance_services.py`` with
``from services.dns.plugin import dns_plugin  # noqa: F401``.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from appliance.plugin import IServicePlugin


@implementer(IPlugin, IServicePlugin)
class DNSPlugin:
    name = "dns"
    description = "low-TTL DNS updater: RFC 2136 + TSIG records that follow failover; DDNS for DHCP"

    def parse_config(self, table, context):
        from services.dns.config import parse
        return parse(table, context)

    def make_service(self, config, context):
        from services.dns.service import DNSService
        return DNSService(config, context)


dns_plugin = DNSPlugin()
