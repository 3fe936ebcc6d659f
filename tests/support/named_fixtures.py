"""pytest fixtures for a real BIND 9 ``named`` on loopback (see named_server.py).

Register with ``pytest_plugins = [..., "tests.support.named_fixtures"]``.  When
``named`` is missing, root installs it with apt-get (bind9 bind9-utils
bind9-dnsutils); otherwise the test skips (laptop) or fails (``CI=true``).
"""

from __future__ import annotations

import pytest

from tests.support.require import unavailable


def _require_named() -> None:
    from tests.support.named_server import APT_PACKAGES, install_bind
    if not install_bind():
        unavailable(f"named not installed (apt-get install {' '.join(APT_PACKAGES)})")


@pytest.fixture(scope="module")
def named_module():
    """One named shared by a module's tests (forward example.test., reverse
    0.9.10.in-addr.arpa.); tests must use their own owner names and must not stop it."""
    _require_named()
    from tests.support.named_server import NamedServer
    server = NamedServer().start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def named():
    """A named for one test; the test may stop, kill and restart it."""
    _require_named()
    from tests.support.named_server import NamedServer
    server = NamedServer().start()
    try:
        yield server
    finally:
        server.cleanup()
