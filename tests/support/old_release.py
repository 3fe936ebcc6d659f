"""The previous release of the appliance, unpacked next to a test, for rolling-upgrade tests.

The "old version" is commit :data:`OLD_COMMIT` (33b2f38, the tree at the start of
session 6: heartbeat VERSION 1 with the exact-version check, a peer-link hello without
version or capabilities -- the last release before the wire-version rule of issue 17).
Its code comes from git when the checkout has that history (``git archive``: the same
tree a ``git worktree add`` would give, without registering a worktree in the shared
repository); otherwise (a shallow CI clone) from :data:`FIXTURE`, the same ``git
archive`` of the same paths committed in the repository (made with
``git archive 33b2f38 appliance services plugins twisted/plugins/appliance_plugin.py
| xz -9``; ~285 KB).  Nothing is fetched.

When a release changes a wire or record format, move :data:`OLD_COMMIT` to the last
commit of the release before it and regenerate :data:`FIXTURE` with the command above
(same paths), in one commit.

``APPLIANCE_OLD_RELEASE=fixture`` in the environment skips git (to try the
fallback on a full clone).

A node runs the old code with ``PYTHONPATH=<unpacked tree>`` ahead of everything
else: ``twistd`` finds the old dropin and ``appliance``/``services`` resolve there.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OLD_COMMIT = "33b2f38d90a6828454cd74b7dad048f5c76a5109"
FIXTURE = ROOT / "tests" / "fixtures" / "appliance-33b2f38.tar.xz"
PATHS = ("appliance", "services", "plugins", "twisted/plugins/appliance_plugin.py")


def have_commit(commit: str = OLD_COMMIT) -> bool:
    try:
        res = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                             capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0


def unpack_old_release(dest: Path) -> str:
    """Put the old release's code under ``dest``; return where it came from
    (``"git"`` or ``"fixture"``).  Raises RuntimeError when neither is there."""
    dest.mkdir(parents=True, exist_ok=True)
    if os.environ.get("APPLIANCE_OLD_RELEASE") != "fixture" and have_commit():
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_COMMIT, *PATHS],
                                 capture_output=True, check=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
        source = "git"
    elif FIXTURE.exists():
        with tarfile.open(FIXTURE, "r:xz") as tar:
            tar.extractall(dest, filter="data")
        source = "fixture"
    else:
        raise RuntimeError(f"neither commit {OLD_COMMIT[:7]} nor {FIXTURE} is available")
    if not (dest / "appliance" / "cluster" / "heartbeat.py").exists():
        raise RuntimeError(f"the old release unpacked from {source} has no appliance package")
    return source
