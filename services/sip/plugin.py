"""The ``sip`` service plugin (registered in plugins/appliance_services.py)."""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from appliance.plugin import IServicePlugin


@implementer(IPlugin, IServicePlugin)
class SIPPlugin:
    name = "sip"
    description = "SIP registrar + location service (+ redirect), RFC 3261 §10"

    def parse_config(self, table, context):
        from services.sip.config import parse
        return parse(table, context)

    def make_service(self, config, context):
        from services.sip.service import SIPService
        return SIPService(config, context)


sip_plugin = SIPPlugin()
