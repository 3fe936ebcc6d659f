"""Subprocess for the durability test: write keys, print each acknowledgement.

    python -m tests.support.store_writer STATE_DIR FSYNC COUNT WINDOW

Prints ``ACK <i>`` (flushed) when write ``i`` has been acknowledged by the
store, ``READY`` once the store is loaded.  Keeps up to WINDOW writes in
flight.  The test kills it with SIGKILL at a moment of its choosing.
"""

import sys

from twisted.internet import defer, task


@defer.inlineCallbacks
def main(reactor, state_dir, fsync, count, window):
    from appliance.store.memory import MemoryStore
    store = MemoryStore(reactor, state_dir=state_dir, fsync=fsync,
                        compact_after_bytes=64 * 1024)
    yield store.startService()
    print("READY", flush=True)
    sem = defer.DeferredSemaphore(int(window))

    def one(i):
        d = store.set(f"key:{i:06d}", f"value-{i}-" + "x" * 40)
        d.addCallback(lambda _: print(f"ACK {i}", flush=True))
        return d

    yield defer.gatherResults([sem.run(one, i) for i in range(int(count))])
    print("DONE", flush=True)
    yield store.stopService()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
