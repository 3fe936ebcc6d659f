"""The ``encap`` service plugin (registered in plugins/appliance_services.py)."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from appliance.plugin import IServicePlugin


@implementer(IPlugin, IServicePlugin)
class EncapPlugin:
    name = "encap"
    description = "encapsulation decapsulation node (DN): EN sessions, TUN, takeover routes"

    def parse_config(self, table, context):
        from services.encap.config import parse
        return parse(table, context)

    def make_service(self, config, context):
        from services.encap.service import EncapService
        return EncapService(config, context)


encap_plugin = EncapPlugin()
