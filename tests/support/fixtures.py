"""Shared pytest fixtures (loaded from tests/conftest.py via ``pytest_plugins``)."""

from __future__ import annotations

import pytest

from tests.support.require import require_binary


@pytest.fixture(scope="module")
def redis_server_module():
    """One real redis-server on 127.0.0.1 shared by a module's tests.

    Tests that share it must keep to their own namespace (see
    ``redis_namespace``) and must not kill it.
    """
    require_binary("redis-server")
    from tests.support.redis_server import RedisServer

    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server():
    """A real redis-server on 127.0.0.1 for one test; the test may kill/restart it.

    ``appendfsync always``: with ``everysec`` a busy disk lets Redis postpone
    the AOF write of an acknowledged command by up to 2 s, and a kill -9 in
    that window loses it (seen once in CI: a test's "data kept" check failed).
    """
    require_binary("redis-server")
    from tests.support.redis_server import RedisServer

    server = RedisServer(persistence="aof-always").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_namespace(request):
    """A store namespace unique to the running test."""
    import uuid

    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_sentinel():
    """A redis-server master plus one redis-sentinel monitoring it, on loopback."""
    require_binary("redis-server")
    require_binary("redis-sentinel")
    from tests.support.redis_server import SentinelSetup

    setup = SentinelSetup().start()
    try:
        yield setup
    finally:
        setup.stop()
