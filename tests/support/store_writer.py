"""Child processes that write to the embedded store and report on stdout.

``python -m tests.support.store_writer STATE_DIR FSYNC COUNT WINDOW``
    Writes ``key:<i>`` = ``value-<i>-xxx...`` for i in 0..COUNT-1, up to
    WINDOW writes in flight; prints ``READY`` once the store is loaded,
    ``ACK <i>`` (flushed) when write ``i`` is acknowledged, ``DONE`` at the
    end.  The durability test kills it with SIGKILL.

``python -m tests.support.store_writer enospc DIR MODE [BALLAST_KIB]``
    The disk-full scenario; DIR is a tiny, otherwise empty file system (the
    test mounts a tmpfs there in a private mount namespace).  It writes a
    ballast file (default 4 MiB), starts a store in ``DIR/state`` (fsync="always") and writes
    until the disk is full; then removes the ballast and recovers by
    ``store.recheck()`` (MODE ``recheck``) or by waiting for the store's own
    retry (MODE ``retry``); writes again; restarts the store and reads back
    everything.  One line per fact (``FULL``, ``HEALTH``, ``RECOVERED``,
    ``RESULT``...), each ``<WORD> <json>``; the test parses them.
"""

from __future__ import annotations

import json
import os
import sys
import time

from twisted.internet import defer, task


def value_of(i: int) -> str:
    return f"value-{i}-" + "x" * 40


@defer.inlineCallbacks
def writer(reactor, state_dir, fsync, count, window):
    from appliance.store.embedded import EmbeddedStore

    store = EmbeddedStore(reactor, state_dir=state_dir, fsync=fsync)
    yield store.startService()
    print("READY", flush=True)
    sem = defer.DeferredSemaphore(int(window))

    def one(i):
        d = store.set(f"key:{i:06d}", value_of(i))
        d.addCallback(lambda _: print(f"ACK {i}", flush=True))
        return d

    yield defer.gatherResults([sem.run(one, i) for i in range(int(count))])
    print("DONE", flush=True)
    yield store.stopService()


# ----------------------------------------------------------------------
# ENOSPC
# ----------------------------------------------------------------------
def emit(word, **fields):
    print(f"{word} {json.dumps(fields, sort_keys=True)}", flush=True)


def free_bytes(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def size(state_dir, name) -> int:
    try:
        return os.stat(os.path.join(state_dir, name)).st_size
    except OSError:
        return -1


def fill(path) -> None:
    """Write ``path`` until the file system is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                if os.write(fd, chunk) < len(chunk):
                    break
            except OSError:
                break
        try:
            while os.write(fd, b"\0"):
                pass
        except OSError:
            pass
    finally:
        os.close(fd)


def sleep(reactor, s):
    return task.deferLater(reactor, s, lambda: None)


@defer.inlineCallbacks
def enospc(reactor, root, mode, ballast_kib="4096"):
    from appliance.store.embedded import EmbeddedStore
    from appliance.store.interface import StoreDown

    ballast = os.path.join(root, "ballast")
    with open(ballast, "wb") as f:
        f.write(os.urandom(int(ballast_kib) * 1024))
        f.flush()
        os.fsync(f.fileno())
    state_dir = os.path.join(root, "state")
    store = EmbeddedStore(reactor, state_dir=state_dir, fsync="always")
    yield store.startService()
    st = os.statvfs(root)
    emit("READY", free_bytes=st.f_bavail * st.f_frsize)
    big = "v" * 2048
    acked, failed = [], {}          # index -> error class and message
    order = []                      # completion order: ("ack"|"fail", i)
    issued = 0
    window = 8
    inflight = []

    def on_ack(_, i):
        acked.append(i)
        order.append(("ack", i))

    def on_fail(f, i):
        failed[i] = (type(f.value).__name__, f.getErrorMessage())
        order.append(("fail", i))

    t0 = time.monotonic()
    while not failed and time.monotonic() - t0 < 60:
        while len([d for d in inflight if not d.called]) < window:
            d = store.set(f"key:{issued:06d}", f"{issued}:{big}")
            d.addCallbacks(on_ack, on_fail, callbackArgs=(issued,), errbackArgs=(issued,))
            inflight.append(d)
            issued += 1
        yield sleep(reactor, 0)
        inflight = [d for d in inflight if not d.called]
    first_fail = min(failed) if failed else None
    # writes issued after the failure: refused at once, never acknowledged
    late = []
    for j in range(5):
        d = store.set(f"late:{j}", "x")
        d.addCallbacks(lambda _, j=j: late.append((j, "ack", "")),
                       lambda f, j=j: late.append((j, type(f.value).__name__,
                                                   f.getErrorMessage())))
    d = store.durable()
    durable_after = []
    d.addCallbacks(lambda _: durable_after.append("ok"),
                   lambda f: durable_after.append(type(f.value).__name__))
    yield sleep(reactor, 0.05)
    emit("FULL", issued=issued, acked=len(acked), max_acked=max(acked, default=-1),
         first_fail=first_fail, failed=len(failed),
         errors=sorted({f"{c}: {m}" for c, m in failed.values()}),
         acked_after_first_fail=sorted(i for i in acked if first_fail is not None
                                       and i > first_fail),
         late=late, durable=durable_after, still_pending=len(inflight))
    desc = store.describe()
    emit("HEALTH", healthy=store.healthy, error=desc.get("error"), stats=desc["stats"])
    # The store's own files can give space back (closing the connection
    # checkpoints the WAL), so fill what is left with a second file: now the
    # disk is full whatever the store does, and a recheck must fail.
    emit("FILES", free_bytes=free_bytes(root), wal=size(state_dir, "store.sqlite3-wal"),
         db=size(state_dir, "store.sqlite3"))
    filler = os.path.join(root, "filler")
    fill(filler)
    emit("FILLED", free_bytes=free_bytes(root))
    if mode == "recheck":
        desc = yield store.recheck()
        emit("RECHECK_FULL", healthy=desc["healthy"], error=desc.get("error"))
    else:
        yield sleep(reactor, 1.5)              # the first automatic retry (1 s) finds it full
        emit("RETRY_FULL", healthy=store.healthy, error=store.describe().get("error"),
             recoveries=store.stats["recoveries"])
    os.unlink(ballast)
    os.unlink(filler)
    t_free = time.monotonic()
    if mode == "recheck":
        desc = yield store.recheck()
    else:
        while not store.healthy and time.monotonic() - t_free < 20:
            yield sleep(reactor, 0.1)
        desc = store.describe()
    emit("RECOVERED", healthy=desc["healthy"], error=desc.get("error"),
         after_s=round(time.monotonic() - t_free, 3), stats=desc["stats"])
    # reads after recovery: every acknowledged write is there
    missing = [i for i in acked if store.get_now(f"key:{i:06d}") != f"{i}:{big}"]
    present_failed = [i for i in failed if store.get_now(f"key:{i:06d}") is not None]
    after_acked, after_failed = [], []
    for j in range(20):
        try:
            yield store.set(f"after:{j}", f"after-{j}")
            after_acked.append(j)
        except StoreDown as e:
            after_failed.append((j, str(e)))
    emit("WRITES_AFTER", acked=after_acked, failed=after_failed,
         missing_acked=missing, failed_present=present_failed)
    yield store.stopService()
    store2 = EmbeddedStore(reactor, state_dir=state_dir, fsync="always")
    yield store2.startService()
    missing = [i for i in acked if store2.get_now(f"key:{i:06d}") != f"{i}:{big}"]
    missing_after = [j for j in after_acked if store2.get_now(f"after:{j}") != f"after-{j}"]
    present_failed = [i for i in failed if store2.get_now(f"key:{i:06d}") is not None]
    present_late = [j for j in range(5) if store2.get_now(f"late:{j}") is not None]
    emit("RESTART", healthy=store2.healthy, acked=len(acked), missing_acked=missing,
         missing_after=missing_after, failed_present=present_failed, late_present=present_late)
    yield store2.stopService()
    emit("RESULT", ok=True)


def main(argv):
    if argv and argv[0] == "enospc":
        task.react(enospc, argv[1:4])
    else:
        task.react(writer, argv[0:4])


if __name__ == "__main__":
    main(sys.argv[1:])
