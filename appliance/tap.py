"""``twistd appliance``: command-line options and the service tree.

``makeService`` only builds objects; nothing binds or touches the network
until twistd starts the returned service.
"""

from __future__ import annotations

import gc
import sys

from twisted.python import usage

from appliance import __version__
from appliance.config import DEMO_CONFIG, ConfigError, NodeConfig, load_config


class Options(usage.Options):
    synopsis = "[--config PATH] [--check]"
    longdesc = ("Run one appliance node. Without --config the demo config "
                f"({DEMO_CONFIG}) is used: single node, memory store, loopback only.")
    optParameters = [
        ["config", "c", None, "Node configuration file (TOML)."],
    ]
    optFlags = [
        ["check", None, "Validate the configuration, print the result, and exit 0/1."],
    ]

    def opt_version(self):
        """Print the appliance version and exit."""
        print(f"appliance {__version__}")
        sys.exit(0)

    def postOptions(self):
        path = self["config"] or str(DEMO_CONFIG)
        self["config"] = path
        try:
            self.node_config: NodeConfig = load_config(path)
        except ConfigError as e:
            # One line per problem, no usage dump: "file: key.path: problem".
            print(str(e), file=sys.stderr)
            raise SystemExit(1)
        if self["check"]:
            print(check_summary(self.node_config))
            raise SystemExit(0)


def check_summary(config: NodeConfig) -> str:
    services = ", ".join(e.name for e in config.enabled_services()) or "none"
    return (f"{config.file}: OK (node {config.node.id}, store {config.store.backend}, "
            f"admin {config.admin.listen}, services: {services})")


def tune_gc_for_serving(node=None) -> None:
    """Process-wide GC tuning for a node process, once everything has started.

    What exists now (modules, classes, loaded state) lives as long as the
    process: keep it out of the cyclic GC's full passes, which otherwise pause
    the reactor in proportion to it (measured: 50-145 ms under load).  A
    packet allocates a few hundred short-lived objects: with the default
    700-allocation young generation many are collected (and promoted) while
    still in use; a larger one lets them die first.

    Done here, by ``twistd appliance``, not by ``ApplianceNode``: library code
    and tests that build nodes in-process keep the interpreter's defaults.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(max(gc.get_threshold()[0], 20000), *gc.get_threshold()[1:])


def makeService(options):
    from appliance.node import ApplianceNode
    return ApplianceNode(options.node_config, on_running=tune_gc_for_serving)


def check_main(argv: list[str] | None = None) -> int:
    """``appliance-check PATH...``: validate config files, exit 0/1."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print("usage: appliance-check PATH [PATH...]\n"
              "Validate appliance node configuration files; exit 0 if all are valid.")
        return 0 if args else 2
    status = 0
    for path in args:
        try:
            print(check_summary(load_config(path)))
        except ConfigError as e:
            print(str(e), file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":  # pragma: no cover
    sys.exit(check_main())
