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
