"""pytest fixtures for a real OpenLDAP ``slapd`` on loopback (see slapd_server.py).

Register with ``pytest_plugins = [..., "tests.support.slapd_fixtures"]``.  When
slapd is missing, root installs it with apt-get (debconf preseed
``slapd slapd/no_configuration boolean true``, then slapd ldap-utils);
otherwise the test skips (laptop) or fails (``CI=true``).
"""

from __future__ import annotations

import pytest

from tests.support.require import unavailable


def _require_slapd() -> None:
    from tests.support.slapd_server import APT_PACKAGES, install_slapd
    if not install_slapd():
        unavailable(f"slapd not installed (preseed slapd/no_configuration=true, then "
                    f"apt-get install {' '.join(APT_PACKAGES)})")


@pytest.fixture
def slapd():
    """A slapd for one test; the test may stop, kill and start/restart it."""
    _require_slapd()
    from tests.support.slapd_server import SlapdServer
    server = SlapdServer()
    try:
        yield server.start()
    finally:
        server.cleanup()
