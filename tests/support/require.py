"""Skip-or-fail for tests that need root, namespaces or a real peer.

On a laptop a missing peer skips the test with a clear reason.  Under CI
(``CI=true``) the same condition fails the test: CI runs as root with every
peer installed, so a skip there would hide a broken install step.
"""

from __future__ import annotations

import os
import shutil


def under_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip (laptop) or fail (CI) the running test with ``reason``.

    Outside pytest (a bench uses the same helpers) it raises RuntimeError."""
    try:
        import pytest          # lazily: benches import this module without pytest
    except ImportError:
        raise RuntimeError(reason) from None
    if under_ci():
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def require_binary(name: str) -> str:
    """Return the path of executable ``name`` or skip/fail."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (apt-get install it, see tests/run.sh)")
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        unavailable("needs root (network namespaces)")
