"""The ``dhcp4`` service plugin (registered in plugins/appliance_services.py)."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from appliance.plugin import IServicePlugin


@implementer(IPlugin, IServicePlugin)
class Dhcp4Plugin:
    name = "dhcp4"
    description = "DHCPv4 server: split-scope pools, lazy-update failover with a partner"

    def parse_config(self, table, context):
        from services.dhcp.v4.config import parse_dhcp4
        return parse_dhcp4(table, context)

    def make_service(self, config, context):
        from services.dhcp.v4.service import Dhcp4Service
        return Dhcp4Service(config, context)


dhcp4_plugin = Dhcp4Plugin()


@implementer(IPlugin, IServicePlugin)
class Dhcp6Plugin:
    name = "dhcp6"
    description = "DHCPv6 server (RFC 8415): IA_NA addresses and IA_PD delegated prefixes"

    def parse_config(self, table, context):
        from services.dhcp.v6.config import parse_dhcp6
        return parse_dhcp6(table, context)

    def make_service(self, config, context):
        from services.dhcp.v6.service import Dhcp6Service
        return Dhcp6Service(config, context)


dhcp6_plugin = Dhcp6Plugin()
