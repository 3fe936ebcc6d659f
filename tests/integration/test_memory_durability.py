"""kill -9 a process writing to the embedded store: nothing acknowledged is lost.

What this proves and what it does not: SIGKILL ends the process but not the
kernel, so whatever the store handed to ``write()`` survives in the page
cache whether or not it was fsynced.  These tests therefore prove that a
write is acknowledged only after SQLite has written its transaction (the
ack follows the commit), for every fsync policy; they cannot tell
fsync="always" from "never" (that takes a power cut, e.g. a VM killed
without flushing its disk).  The crash-consistency test
(tests/integration/test_store_crash.py) covers multi-key commits, type
changes and the prefix property; this one keeps the simple, large case:
1,000 acknowledged writes, all present after a restart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.store.embedded import EmbeddedStore
from tests.support.store_writer import value_of

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def reopen(state_dir) -> EmbeddedStore:
    clock = Clock()
    clock.advance(time.time())
    store = EmbeddedStore(clock, state_dir=state_dir, turn_batching=False,
                          run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    out = []
    store.startService().addBoth(out.append)
    assert out == [None], out
    return store


def value(store, key):
    """``store.get(key)``'s answer (it answers at once)."""
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


@pytest.mark.parametrize("fsync,window", [("always", 1), ("always", 64), ("batch", 64),
                                          ("never", 64)])
def test_kill9_loses_no_acknowledged_write(tmp_path, fsync, window):
    """1,000 acknowledged writes, kill -9, restart: all 1,000 present (and
    acknowledgements came in issue order)."""
    acked = run_and_kill(tmp_path, fsync, 5000, window, kill_after=1000)
    assert len(acked) >= 1000
    assert acked == sorted(acked)
    store = reopen(tmp_path)
    missing = [i for i in acked if store.get_now(f"key:{i:06d}") != value_of(i)]
    assert missing == []


def test_kill9_mid_stream_then_second_crash(tmp_path):
    """Two crashes in a row: the second life opens the first one's WAL, the
    restart after it holds what both acknowledged."""
    first = run_and_kill(tmp_path, "always", 3000, 32, kill_after=400)
    # The writer restarts from key 0 again; earlier values are overwritten identically.
    second = run_and_kill(tmp_path, "always", 3000, 32, kill_after=700)
    store = reopen(tmp_path)
    for i in set(first) | set(second):
        assert store.get_now(f"key:{i:06d}") == value_of(i), i
