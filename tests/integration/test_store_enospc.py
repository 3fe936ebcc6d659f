"""The embedded store on a full disk: a state, not a hang.

A child process (``python -m tests.support.store_writer enospc DIR MODE``)
runs in a private mount namespace (``unshare -m --propagation private``)
with an 8 MiB tmpfs mounted on DIR.  It writes a 4 MiB ballast file,
starts an :class:`~appliance.store.embedded.EmbeddedStore` (fsync="always")
there and writes 2 KiB values, 8 in flight, until a write fails; then fills
what is left of the disk with a second file, asks the store to recover while
the disk is still full, removes both files and recovers by
``store.recheck()`` (MODE ``recheck``) or by the store's own retry (MODE
``retry``), writes again, and restarts the store.  It reports each step as
``WORD <json>`` on stdout; the tests below check them.

A second geometry (2 MiB disk, 512 KiB ballast) shows a store bug, kept as a
strict xfail: after the store filled the disk itself, its recovery probe (a
one-row write) fits in the WAL space the failed transaction had already
taken, so recheck() and the automatic retry call the store healthy with 0
bytes free, and the next real write fails again.

Needs root, ``unshare`` and ``mount``; skips without them on a laptop, fails
under CI (tests.support.require).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.require import require_binary, require_root, unavailable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
_results: dict[str, dict] = {}


def run_scenario(tmp_dir: Path, mode: str, disk: str = "8m", ballast_kib: int = 4096,
                 complete: bool = True) -> dict:
    """Run the child once per (mode, disk) and session; return {WORD: fields}
    (``_log``: its output, for assertion messages)."""
    key = f"{mode}-{disk}"
    if key not in _results:
        require_root()
        require_binary("unshare")
        require_binary("mount")
        probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            unavailable(f"cannot make a private mount namespace (unshare -m): "
                        f"{probe.stderr.strip()}")
        mnt = tmp_dir / f"disk-{key}"
        mnt.mkdir()
        script = (f'mount -t tmpfs -o size={disk} tmpfs "$0" && exec "$1" -m '
                  f'tests.support.store_writer enospc "$0" "$2" "$3"')
        proc = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", script, str(mnt),
             sys.executable, mode, str(ballast_kib)],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        out = {}
        for line in proc.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word.isupper() and rest.startswith("{"):
                out[word] = json.loads(rest)
        out["_log"] = (f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                       f"stderr:\n{proc.stderr[-4000:]}")
        _results[key] = out
    out = _results[key]
    if complete:
        assert "RESULT" in out, out["_log"]
    return out


@pytest.mark.parametrize("mode", ["recheck", "retry"])
def test_disk_full_fails_writes_and_the_store_recovers(tmp_path, mode):
    """Writes fail with StoreDown "disk is full"; nothing issued after the
    first failure is acknowledged; unhealthy with the reason; after the space
    is freed (recheck, or the automatic retry) writes are acknowledged again
    and a restarted store holds every acknowledged write."""
    r = run_scenario(tmp_path, mode)
    log = r["_log"]
    full = r["FULL"]
    assert full["acked"] > 0 and full["failed"] > 0, log
    assert full["errors"] and all(e.startswith("StoreDown: ") and "full" in e
                                  for e in full["errors"]), log
    assert full["acked_after_first_fail"] == [], log
    assert full["max_acked"] < full["first_fail"], log
    assert full["still_pending"] == 0, log                     # nothing hangs
    assert [k for _, k, _ in full["late"]] == ["StoreDown"] * 5, log
    assert full["durable"] == ["StoreDown"], log
    health = r["HEALTH"]
    assert health["healthy"] is False, log
    assert "full" in health["error"], log
    rec = r["RECOVERED"]
    assert rec["healthy"] is True and rec["error"] is None, log
    if mode == "retry":
        assert rec["after_s"] < 20, log
    after = r["WRITES_AFTER"]
    assert after["acked"] == list(range(20)) and after["failed"] == [], log
    assert after["missing_acked"] == [], log
    assert after["failed_present"] == [], log                 # failed writes were rolled back
    restart = r["RESTART"]
    assert restart["healthy"] is True, log
    assert restart["missing_acked"] == [] and restart["missing_after"] == [], log
    assert restart["failed_present"] == [] and restart["late_present"] == [], log


@pytest.mark.xfail(strict=True, reason=(
    "store bug: recheck()'s probe is a one-row write, and it fits in the space the failed "
    "transaction's frames already took in the WAL; on a disk with 0 bytes free the store "
    "is called healthy and the next real write fails again (store_down flaps)"))
@pytest.mark.parametrize("mode", ["recheck", "retry"])
def test_a_store_on_a_still_full_disk_stays_down(tmp_path, mode):
    """2 MiB disk, 512 KiB ballast: when the store has filled the disk and a
    file took the rest (0 bytes free), recheck() and the 1 s retry must not
    report the store healthy."""
    r = run_scenario(tmp_path, mode, disk="2m", ballast_kib=512, complete=False)
    assert r["FILLED"]["free_bytes"] == 0, r["_log"]
    seen = r["RECHECK_FULL"] if mode == "recheck" else r["RETRY_FULL"]
    assert seen["healthy"] is False, r["_log"]
    assert "full" in (seen["error"] or ""), r["_log"]
