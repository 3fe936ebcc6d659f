"""The ``esr`` service plugin (SPEC: route agent for the edge service router).

Registered in ``plugins/appliance_services.py``.
"""

from __future__ import annotations

from twisted.plugin import IPlugin
from zope.interface import implementer

from appliance.plugin import IServicePlugin


@implementer(IPlugin, IServicePlugin)
class ESRPlugin:
    name = "esr"
    description = ("route agent for the edge service router: follows the EN-DN mapping "
                   "table and routes each EN address or slice to its DN at once")

    def parse_config(self, table, context):
        from services.esr.config import parse
        return parse(table, context)

    def make_service(self, config, context):
        from services.esr.service import ESRService
        return ESRService(config, context)


esr_plugin = ESRPlugin()
