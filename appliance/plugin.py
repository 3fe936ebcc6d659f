"""Service plugins: an interface, a name and a factory.

Each service key of SPEC.md (``dhcp4``, ``sip``, ...) is one object
providing :class:`IServicePlugin`, found with
:func:`twisted.plugin.getPlugins` in the ``appliance.plugins`` package.  The
project's own plugins live in the top-level ``plugins/`` folder, which
``setup.py`` installs as ``appliance.plugins``; a third-party distribution
adds a service by shipping a module in its own ``appliance/plugins/``
folder (no ``__init__.py``), which ``plugins/__init__.py`` picks up with
:func:`twisted.plugin.pluginPackagePaths`.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin, getPlugins
from zope.interface import Attribute
from zope.interface.verify import verifyObject

_log = Logger(namespace="appliance.plugin")

PLUGIN_PACKAGE = "appliance.plugins"


class IServicePlugin(IPlugin):
    """A pluggable service of the appliance."""

    name = Attribute("The service key, the X of [services.X] (e.g. 'dhcp4').")
    description = Attribute("One line saying what the service does.")

    def parse_config(table, context):
        """Turn ``table`` (an :class:`appliance.config.Table`) into a frozen
        config object.  Record problems with ``table.error(key, message)``;
        return ``None`` when the table is unusable.  ``context`` is an
        :class:`appliance.config.ParseContext` (node id, peer ids, VIP names).
        """

    def make_service(config, context):
        """Build the service: return an ``IService`` (not started) for the
        parsed ``config``, wired to the node through ``context`` (a
        :class:`NodeContext`).  Must not do I/O; ``startService`` does."""


@dataclass
class NodeContext:
    """What a service gets from the node it runs in."""

    reactor: Any
    config: Any          # appliance.config.NodeConfig
    store: Any           # IStateStore
    rpc: Any             # appliance.admin.rpc.MethodRegistry
    metrics: Any         # prometheus_client.CollectorRegistry
    cluster: Any         # appliance.cluster.manager.ClusterManager (alone: owns everything)
    state_dir: Path
    #: Small cross-service interfaces by name (e.g. "ddns": an IDDNSUpdater the dns
    #: service provides and dhcp4 uses).  Services never import each other.
    providers: dict[str, Any] = field(default_factory=dict)

    @property
    def node_id(self) -> str:
        return self.config.node.id


def withdraw(context, methods=(), collector=None) -> None:
    """What a stopping service undoes: its JSON-RPC ``methods`` and its metrics
    ``collector`` (either may be absent, also in a test's bare context)."""
    rpc = getattr(context, "rpc", None)
    for name in methods:
        if rpc is not None and name in rpc:
            rpc.unregister(name)
    registry = getattr(context, "metrics", None)
    if registry is not None and collector is not None:
        try:
            registry.unregister(collector)
        except KeyError:
            pass


def start_loop(reactor, interval: float, f, what: str, *, now: bool = False):
    """A :class:`~twisted.internet.task.LoopingCall` of ``f`` every ``interval``
    seconds on ``reactor`` (a Clock in tests), started; if ``f`` raises, the loop
    ends and that is logged as ``"<what> stopped"``.  Stop it with :func:`stop_all`."""
    from twisted.internet import task
    loop = task.LoopingCall(f)
    loop.clock = reactor
    loop.start(interval, now=now).addErrback(
        lambda failure: _log.failure("{what} stopped", failure=failure, what=what))
    return loop


def stop_all(*things):
    """What a stopping service closes, in order: LoopingCalls (stopped if running),
    listening ports (``stopListening``) and anything with ``close()``; ``None`` is
    skipped.  Returns a Deferred that fires when all of them have finished (their
    errors are logged, never raised), for ``stopService`` to return."""
    from twisted.internet import defer, task
    ds = []
    for thing in things:
        if thing is None:
            continue
        if isinstance(thing, task.LoopingCall):
            if thing.running:
                thing.stop()
            continue
        stop = getattr(thing, "stopListening", None) or getattr(thing, "close", None)
        if stop is not None:
            d = defer.maybeDeferred(stop)
            d.addErrback(lambda failure: _log.failure("stopping {thing!r}", failure=failure,
                                                      thing=thing))
            ds.append(d)
    return defer.gatherResults(ds, consumeErrors=True).addCallback(lambda _: None)


def plugin_package():
    """The ``appliance.plugins`` package, installed or from a source checkout."""
    try:
        return importlib.import_module(PLUGIN_PACKAGE)
    except ModuleNotFoundError as e:
        if e.name != PLUGIN_PACKAGE:
            raise
    # A source checkout (tests, editable installs): ``plugins/`` sits beside
    # ``appliance/`` and setup.py's package_dir mapping has not been applied.
    source = Path(__file__).resolve().parent.parent / "plugins" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        PLUGIN_PACKAGE, source, submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PLUGIN_PACKAGE] = module
    spec.loader.exec_module(module)
    import appliance
    appliance.plugins = module   # twisted.python.modules walks attributes
    return module


def discover_plugins() -> dict[str, Any]:
    """Map each installed service key to its plugin.

    A plugin object that does not provide the interface properly, or a
    second plugin for a key already taken, is logged and left out.
    """
    found: dict[str, Any] = {}
    for plugin in getPlugins(IServicePlugin, plugin_package()):
        try:
            verifyObject(IServicePlugin, plugin)
        except Exception as e:
            _log.error("service plugin {plugin!r} rejected: {why}", plugin=plugin, why=e)
            continue
        if plugin.name in found:
            _log.error("service plugin {plugin!r} ignored: key {name!r} already provided by {other!r}",
                       plugin=plugin, name=plugin.name, other=found[plugin.name])
            continue
        found[plugin.name] = plugin
    return found
