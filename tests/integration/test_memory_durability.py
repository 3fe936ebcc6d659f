"""kill -9 a process writing to the memory store: nothing acknowledged is lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.store.memory import MemoryStore

ROOT = Path(__file__).resolve().parents[2]


def reopen(state_dir) -> MemoryStore:
    store = MemoryStore(Clock(), state_dir=state_dir,
                        run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    store.startService()
    return store


def value(store, key):
    out = []
    store.get(key).addBoth(out.append)
    return out[0]


def run_and_kill(state_dir, fsync, count, window, kill_after):
    """Start the writer, SIGKILL it after ``kill_after`` acks; return the acked indexes."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.store_writer", str(state_dir), fsync,
         str(count), str(window)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    acked = []
    try:
        for line in proc.stdout:
            if line.startswith("ACK "):
                acked.append(int(line.split()[1]))
                if len(acked) >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
            elif line.startswith("DONE"):
                break
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert acked, proc.stderr.read()
    return acked


@pytest.mark.parametrize("window", [1, 64])
def test_kill9_loses_no_acknowledged_write(tmp_path, window):
    """1,000 acknowledged writes (fsync=always), kill -9, restart: all 1,000 present."""
    acked = run_and_kill(tmp_path, "always", 5000, window, kill_after=1000)
    assert len(acked) >= 1000
    store = reopen(tmp_path)
    missing = [i for i in acked if value(store, f"key:{i:06d}") != f"value-{i}-" + "x" * 40]
    assert missing == []
    # Compaction ran during the run (64 KiB threshold): the snapshot path was exercised.
    assert (tmp_path / "store" / "snapshot").exists()


def test_kill9_mid_stream_then_second_crash(tmp_path):
    """Two crashes in a row: each restart replays snapshot + journals of both lives."""
    first = run_and_kill(tmp_path, "always", 3000, 32, kill_after=400)
    # The writer restarts from key 0 again; earlier values are overwritten identically.
    second = run_and_kill(tmp_path, "always", 3000, 32, kill_after=700)
    store = reopen(tmp_path)
    for i in set(first) | set(second):
        assert value(store, f"key:{i:06d}") == f"value-{i}-" + "x" * 40, i
