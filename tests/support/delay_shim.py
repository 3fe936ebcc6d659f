"""A userspace UDP delay shim (this kernel has no netem).

    shim = DelayShim(listen=("127.0.0.3", port), target=("127.0.0.2", port), delay_s=0.1)
    shim.start(); ...; shim.set_delay(0.3); ...; shim.stop()

Every datagram received on ``listen`` is forwarded to ``target`` after
``delay_s`` (order preserved), optionally dropping ``loss`` of them at
random.  Runs in its own thread with a bounded queue; loopback only.
"""

from __future__ import annotations

import heapq
import random
import select
import socket
import threading
import time


class DelayShim:
    def __init__(self, listen, target, delay_s: float = 0.0, loss: float = 0.0,
                 max_queue: int = 10000):
        self.listen, self.target = listen, target
        self.delay_s, self.loss = delay_s, loss
        self.max_queue = max_queue
        self.forwarded = self.dropped = 0
        self._stop = threading.Event()
        self._thread = None
        self._sock = None

    def set_delay(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def start(self) -> "DelayShim":
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(self.listen)
        self._sock.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="delay-shim", daemon=True)
        self._thread.start()
        return self

    def _run(self):
        out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        queue: list[tuple[float, int, bytes]] = []
        n = 0
        while not self._stop.is_set():
            timeout = 0.05
            if queue:
                timeout = max(0.0, min(timeout, queue[0][0] - time.monotonic()))
            ready, _, _ = select.select([self._sock], [], [], timeout)
            if ready:
                try:
                    data, _ = self._sock.recvfrom(65535)
                except BlockingIOError:
                    data = None
                if data is not None:
                    if random.random() < self.loss or len(queue) >= self.max_queue:
                        self.dropped += 1
                    else:
                        n += 1
                        heapq.heappush(queue, (time.monotonic() + self.delay_s, n, data))
            now = time.monotonic()
            while queue and queue[0][0] <= now:
                _, _, data = heapq.heappop(queue)
                try:
                    out.sendto(data, self.target)
                    self.forwarded += 1
                except OSError:
                    self.dropped += 1
        out.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
