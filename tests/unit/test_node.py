"""ApplianceNode on a MemoryReactorClock: start/stop robustness and config.reload.

Fake plugins stand in for services (they record what they bound and
released); the store is a small in-memory service with ``describe()`` and
``recheck()``; the cluster manager and the admin service are the real ones
(single node; the admin "listens" on the MemoryReactor).
"""

from __future__ import annotations

import gc

import pytest
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from appliance.admin.rpc import ApplicationError, InvalidParams
from appliance.config import config_from_string
from appliance.node import ApplianceNode


class FakeStore(Service):
    """The IStateStore bits the node itself uses."""

    backend = "memory"
    name = "store"

    def __init__(self):
        self.healthy = True
        self.rechecks = 0

    def describe(self):
        return {"backend": self.backend, "healthy": self.healthy, "durability": "fsync=always",
                "error": None if self.healthy else "disk full"}

    def recheck(self):
        self.rechecks += 1
        self.healthy = True
        return defer.succeed(self.describe())


class Bound:
    """A pretend port: what a service binds and must release."""

    def __init__(self, log, name):
        self.log, self.name = log, name
        log.append(("bind", name))

    def release(self):
        self.log.append(("release", self.name))


class FakeService(Service):
    """Binds at start; ``mode`` decides how the start ends."""

    def __init__(self, config, log, pending):
        self.config, self.log, self.pending = config, log, pending
        self.port = None

    def startService(self):
        super().startService()
        self.port = Bound(self.log, self.config["name"])
        mode = self.config["mode"]
        if mode == "fail":
            return defer.fail(RuntimeError("no such interface eth9"))
        if mode == "hang":
            d = defer.Deferred()
            self.pending.append(d)
            return d
        return None

    def stopService(self):
        super().stopService()
        if self.port is not None:
            self.port.release()
            self.port = None


class FakePlugin:
    description = "test"

    def __init__(self, name, log, pending):
        self.name, self.log, self.pending = name, log, pending
        self.made = 0

    def parse_config(self, table, context):
        return {"name": self.name, "mode": table.str("mode", "ok")}

    def make_service(self, config, context):
        self.made += 1
        return FakeService(config, self.log, self.pending)


@pytest.fixture
def world(tmp_path):
    log: list = []
    pending: list = []
    plugins = {n: FakePlugin(n, log, pending) for n in ("a", "b", "c")}
    return tmp_path, log, pending, plugins


def write_config(tmp_path, services: str, extra_node: str = "", admin: str = "") -> str:
    path = tmp_path / "node.toml"
    path.write_text(f"""
[node]
id = "n1"
state_dir = "{tmp_path / 'state'}"
{extra_node}
[admin]
listen = "tcp:0:interface=127.0.0.1"
token_file = "{tmp_path / 'admin.token'}"
{admin}
{services}""")
    return str(path)


def make_node(world, services: str, **kw):
    tmp_path, log, pending, plugins = world
    path = write_config(tmp_path, services, **kw)
    from appliance.config import load_config
    config = load_config(path, plugins)
    reactor = MemoryReactorClock()
    node = ApplianceNode(config, reactor, plugins, store=FakeStore())
    return node, reactor


def fired(d) -> list:
    """A list that gets ``d``'s result when it fires (passed on unchanged)."""
    out: list = []

    def keep(result):
        out.append(result)
        return result
    d.addBoth(keep)
    return out


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


# -- start failures release what they bound (review M7) ------------------------
def test_failed_start_is_stopped_so_its_ports_are_released(world):
    """A service whose start fails gets its stopService called: the port it bound is freed."""
    node, _ = make_node(world, '[services.a]\nmode = "fail"\n[services.b]\n')
    result_of(node.startService())
    log = world[1]
    assert node.slots["a"].state == "failed"
    assert "no such interface eth9" in node.slots["a"].reason
    assert ("release", "a") in log and log.index(("release", "a")) > log.index(("bind", "a"))
    assert node.slots["b"].state == "running"


def test_start_timeout_fails_the_service_and_the_next_one_starts(world):
    """A start that never fires is given up after node.start_timeout_s; the next service starts."""
    node, reactor = make_node(world, '[services.a]\nmode = "hang"\n[services.b]\n',
                              extra_node="start_timeout_s = 5")
    d = node.startService()
    assert node.slots["a"].state == "starting" and node.slots["b"].state == "stopped"
    reactor.advance(4.9)
    assert node.slots["a"].state == "starting"
    reactor.advance(0.2)
    result_of(d)
    assert node.slots["a"].state == "failed"
    assert node.slots["a"].reason == "did not start within 5 s (node.start_timeout_s)"
    assert ("release", "a") in world[1]
    assert node.slots["b"].state == "running"


def test_stop_timeout_does_not_block_shutdown(world):
    """A child whose stop never fires is skipped after node.stop_timeout_s."""
    node, reactor = make_node(world, '[services.a]\n[services.b]\n',
                              extra_node="stop_timeout_s = 2")
    result_of(node.startService())
    node.slots["b"].service.stopService = lambda: defer.Deferred()    # hangs
    d = node.stopService()
    assert fired(d) == []
    reactor.advance(2.1)
    result_of(d)
    assert node.slots["a"].state == "stopped"
    assert not node.store.running


def test_sigterm_during_start_cancels_it(world):
    """A stop during the start cancels the child being started; later ones never start."""
    node, reactor = make_node(world, '[services.a]\nmode = "hang"\n[services.b]\n')
    start = node.startService()
    assert node.slots["a"].state == "starting"
    stop = node.stopService()
    result_of(stop)
    result_of(start)
    assert node.exit_code == 0
    assert node.slots["a"].state == "stopped"
    assert ("release", "a") in world[1]
    assert ("bind", "b") not in world[1], "a service started after shutdown began"
    reactor.advance(120)     # no timer left to start anything
    assert ("bind", "b") not in world[1]


def test_admin_that_cannot_listen_is_fatal_by_default(world):
    """admin.required (default true): a listener that cannot start fails the node."""
    node, _ = make_node(world, "[services.a]\n")
    node.admin.startService = lambda: defer.fail(RuntimeError("address already in use"))
    result_of(node.startService())
    assert node.exit_code == 1
    assert "bind" not in {e[0] for e in world[1]}, "services started without the admin API"


def test_admin_optional_when_not_required(world):
    """admin.required = false: the node runs on without /rpc."""
    node, _ = make_node(world, "[services.a]\n", admin="required = false")
    node.admin.startService = lambda: defer.fail(RuntimeError("address already in use"))
    result_of(node.startService())
    assert node.exit_code == 0 and node.slots["a"].state == "running"


def test_no_global_gc_tuning_in_the_node(world):
    """Building and starting a node in-process leaves the GC thresholds alone (LOW 10)."""
    before = gc.get_threshold()
    node, _ = make_node(world, "[services.a]\n")
    result_of(node.startService())
    assert gc.get_threshold() == before
    gc.unfreeze()


# -- config.reload (review M6) ------------------------------------------------
def test_concurrent_reloads_are_serialized(world):
    """Two reloads at once: the second waits; no KeyError, no orphaned second instance."""
    tmp_path, log, pending, plugins = world
    node, reactor = make_node(world, "[services.a]\n[services.b]\n")
    result_of(node.startService())
    # Remove a, add c whose start hangs until we let it finish.
    write_config(tmp_path, '[services.b]\n[services.c]\nmode = "hang"\n')
    first = node.reload()
    second = node.reload()
    assert fired(first) == [] and fired(second) == []
    assert len(pending) == 1
    pending[0].callback(None)
    one, two = result_of(first), result_of(second)
    assert one["applied"] == ["services.a: stopped", "services.c: started"]
    assert two["applied"] == [] and two["failed"] == []
    assert plugins["c"].made == 1, "the second reload started c again"
    assert set(node.slots) == {"b", "c"} and node.slots["c"].state == "running"


def test_reload_restarts_failed_services(world):
    """A failed service is retried by config.reload even if its table did not change."""
    tmp_path, log, pending, plugins = world
    node, _ = make_node(world, "[services.a]\n")
    plugins["a"].parse_config = lambda table, ctx: {"name": "a", "mode": table.str("mode", "ok")}
    # Fail the first start only.
    real_make = plugins["a"].make_service
    calls = []

    def make(config, context):
        calls.append(1)
        svc = real_make(config, context)
        if len(calls) == 1:
            svc.config = dict(config, mode="fail")
        return svc
    plugins["a"].make_service = make
    result_of(node.startService())
    assert node.slots["a"].state == "failed"
    result = result_of(node.reload())
    assert result["applied"] == ["services.a: restarted"]
    assert node.slots["a"].state == "running"


def test_reload_step_failure_does_not_stop_the_others(world):
    """A reconfigure that raises is reported; later steps still run; the old table is kept."""
    tmp_path, log, pending, plugins = world
    node, _ = make_node(world, "[services.a]\n[services.b]\n")
    result_of(node.startService())

    def broken(config):
        raise ValueError("cannot change that live")
    node.slots["a"].service.reconfigure = broken
    write_config(tmp_path, '[services.a]\nmode = "other"\n[services.b]\n[services.c]\n')
    result = result_of(node.reload())
    assert result["failed"] == ["a"]
    assert result["applied"][0].startswith("services.a: reconfigure failed (ValueError")
    assert result["applied"][1] == "services.c: started"
    assert node.slots["c"].state == "running"
    # The next reload sees the difference again (old table kept) and retries.
    assert node.config.services["a"].config["mode"] == "ok"
    assert node.config.services["c"].config["mode"] == "ok"


def test_service_restart_rpc(world):
    """service.restart stops and starts one service; an unknown name is -32602."""
    node, _ = make_node(world, "[services.a]\n")
    result_of(node.startService())
    first = node.slots["a"].service
    out = result_of(node.rpc.dispatch("service.restart", {"service": "a"}))
    assert out == {"service": "a", "state": "running", "role": "standalone"}
    assert node.slots["a"].service is not first and not first.running
    with pytest.raises(InvalidParams) as info:
        result_of(node.rpc.dispatch("service.restart", {"service": "zz"}))
    assert "'zz' is not an enabled service" in info.value.data["reason"]


# -- store status and recheck ---------------------------------------------------
def test_status_includes_the_store_describe(world):
    """system.status has the store's describe() fields (backend, healthy, durability, error)."""
    node, _ = make_node(world, "")
    result_of(node.startService())
    node.store.healthy = False
    store = result_of(node.rpc.dispatch("system.status"))["store"]
    assert store == {"backend": "memory", "healthy": False, "durability": "fsync=always",
                     "error": "disk full"}


def test_store_recheck_rpc(world):
    """store.recheck calls the store's recheck() and answers its describe()."""
    node, _ = make_node(world, "")
    result_of(node.startService())
    node.store.healthy = False
    out = result_of(node.rpc.dispatch("store.recheck"))
    assert node.store.rechecks == 1 and out["healthy"] is True and out["backend"] == "memory"
    with pytest.raises(InvalidParams):
        result_of(node.rpc.dispatch("store.recheck", {"force": True}))


def test_reload_refused_while_stopping(world):
    """A reload after the stop began is refused with an application error."""
    node, _ = make_node(world, "[services.a]\n")
    result_of(node.startService())
    result_of(node.stopService())
    with pytest.raises(ApplicationError):
        result_of(node.reload())


# -- make_store ------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["memory", "embedded", "sqlite"])
def test_make_store_builds_the_embedded_store(tmp_path, backend):
    """All three names build the embedded store under node.state_dir, with the fsync policy."""
    from appliance.node import make_store
    config = config_from_string(f'[node]\nid = "n"\nstate_dir = "{tmp_path}"\n[store]\n'
                                f'backend = "{backend}"\nfsync = "batch"\n', plugins={})
    store = make_store(MemoryReactorClock(), config)
    assert store.backend == "memory" and store.fsync == "batch"
    assert type(store).__name__ == "EmbeddedStore"
    assert store.describe()["file"] == str(tmp_path / "store.sqlite3")


def test_make_store_passes_the_redis_replica_keys():
    """min_replicas_acked / replicas_timeout_ms reach the RedisStore."""
    from appliance.node import make_store
    config = config_from_string('[node]\nid = "n"\nstate_dir = "s"\n[store]\nbackend = "redis"\n'
                                'url = "redis://127.0.0.1:1/0"\nmin_replicas_acked = 2\n'
                                'replicas_timeout_ms = 250\n', plugins={})
    store = make_store(MemoryReactorClock(), config)
    assert store.backend == "redis"
    assert (store.min_replicas_acked, store.replicas_timeout_ms) == (2, 250)
