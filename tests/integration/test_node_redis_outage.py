"""A node on the redis backend: a Redis outage is visible and survivable, never a hang."""

from __future__ import annotations

import time

from tests.support.cluster_lab import wait_for
from tests.support.node_process import NodeProcess


def test_store_outage_reported_and_recovered(tmp_path, redis_server):
    """kill -9 redis under a running node: system.status answers at once with the store
    unhealthy, a service write fails fast; after redis returns everything is healthy."""
    node = NodeProcess(tmp_path, f"""
[store]
backend = "redis"
url = "{redis_server.url}"
namespace = "nodetest"
op_timeout_s = 1.0

[services.testecho]
""")
    node.start()
    try:
        status = node.rpc("system.status")["result"]
        assert status["store"]["backend"] == "redis" and status["store"]["healthy"] is True
        assert status["services"]["testecho"]["state"] == "running"

        redis_server.kill()
        wait_for(lambda: node.rpc("system.status")["result"]["store"]["healthy"] is False, 5,
                 "the node to report the store unhealthy")
        t0 = time.monotonic()
        status = node.rpc("system.status")["result"]
        assert time.monotonic() - t0 < 1.0, "status must not wait for the store"
        assert status["services"]["testecho"]["state"] == "running"
        t0 = time.monotonic()
        error = node.rpc("testecho.put", {"key": "k", "value": "v"})["error"]
        assert time.monotonic() - t0 < 1.5, "a write during the outage fails fast"
        assert error["code"] == -32001 and "store unavailable" in error["data"]["reason"]

        redis_server.restart()
        wait_for(lambda: node.rpc("system.status")["result"]["store"]["healthy"] is True, 10,
                 "the store to recover")
        assert node.rpc("testecho.put", {"key": "k", "value": "v"})["result"] is True
        out = node.ctl("status")
        assert out.returncode == 0 and "redis (healthy)" in out.stdout
    finally:
        node.kill()
