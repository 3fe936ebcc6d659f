"""The ``dhcp4`` and ``dhcp6`` service plugins (registered in plugins/appliance_services.py)."""

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


def _lazy(module: str, attr: str):
    """A plugin method that imports ``module`` only when the service is used."""
    def call(*args):
        from importlib import import_module
        return getattr(import_module(module), attr)(*args)
    return staticmethod(call)


@implementer(IPlugin, IServicePlugin)
class Dhcp6Plugin:
    name = "dhcp6"
    description = "DHCPv6 server (RFC 8415): IA_NA addresses and IA_PD delegated prefixes"
    parse_config = _lazy("services.dhcp.v6.config", "parse_dhcp6")        # (table, context)
    make_service = _lazy("services.dhcp.v6.service", "Dhcp6Service")      # (config, context)


dhcp6_plugin = Dhcp6Plugin()
