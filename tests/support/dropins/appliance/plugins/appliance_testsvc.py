"""Test service plugins shipped the way a third-party package would ship them.

``testecho``: writes a key to the store on start, registers ``testecho.ping``.
``testbroken``: its start always fails (``reason`` from config).
"""

from twisted.application.service import Service
from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import implementer

from appliance.plugin import IServicePlugin


class EchoService(Service):
    role = "active"

    def __init__(self, config, context):
        self.config, self.context = config, context

    def startService(self):
        super().startService()
        self.context.rpc.register("testecho.ping", self.ping, doc="echo the message")
        self.context.rpc.register("testecho.put", self.put, doc="write a key to the store")
        return self.context.store.set("testecho:started", self.context.node_id)

    def ping(self, text=None):
        return {"message": self.config["message"], "text": text}

    def put(self, key, value):
        return self.context.store.set(f"testecho:{key}", value).addCallback(lambda _: True)

    def stopService(self):
        super().stopService()
        self.context.rpc.unregister("testecho.ping")
        self.context.rpc.unregister("testecho.put")


class BrokenService(Service):
    def __init__(self, reason):
        self.reason = reason

    def startService(self):
        super().startService()
        return defer.fail(RuntimeError(self.reason))


@implementer(IPlugin, IServicePlugin)
class EchoPlugin:
    name = "testecho"
    description = "test service: echoes"

    def parse_config(self, table, context):
        return {"message": table.str("message", "hello")}

    def make_service(self, config, context):
        return EchoService(config, context)


@implementer(IPlugin, IServicePlugin)
class BrokenPlugin:
    name = "testbroken"
    description = "test service: never starts"

    def parse_config(self, table, context):
        return {"reason": table.str("reason", "broken on purpose")}

    def make_service(self, config, context):
        return BrokenService(config["reason"])


echo = EchoPlugin()
broken = BrokenPlugin()
