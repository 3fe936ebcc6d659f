"""The takeover's path from the liveness deadline to the VIP: the address is
asked for before the log lines of the takeover are formatted and written
(bench/failover.py's reaction, deadline -> GARP)."""

from __future__ import annotations

from twisted.logger import globalLogPublisher

from tests.unit.test_cluster_manager import ADDR, FakeVIPs, make_pair, owners, run, start
from tests.unit.test_cluster_manager import tmp_state  # noqa: F401 (autouse fixture)


class RecordingVips(FakeVIPs):
    """Notes which log lines were already written when the address was asked for."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen
        self.at_acquire = None

    def acquire(self, name, reason=""):
        if self.at_acquire is None:
            self.at_acquire = list(self.seen)
        return super().acquire(name, reason)


def test_vip_acquired_before_the_takeover_is_logged():
    clock, net, nodes = make_pair()
    seen = []

    def observer(event):
        fmt = event.get("log_format") or ""
        # b's lines only (a, cut off, suspects b and logs too)
        if ("suspected dead" in fmt and event.get("peer") == "a"
                or "is now" in fmt and event.get("node") == "b"):
            seen.append(fmt)

    globalLogPublisher.addObserver(observer)
    try:
        b = nodes["b"]
        b.vip_manager = RecordingVips(seen)
        start(clock, nodes)
        run(clock, 1.0)
        assert owners(nodes) == ["a"]
        del seen[:]
        net.cut.add(ADDR["a"])
        run(clock, 0.5)
        assert b.role("vip1") == "owner"
        assert b.vip_manager.log[0] == ("acquire", "vip1")
        # nothing of the takeover was logged before the address was asked for ...
        assert b.vip_manager.at_acquire == [], b.vip_manager.at_acquire
        # ... and both lines come right after it
        assert any("suspected dead" in f for f in seen), seen
        assert any("is now" in f for f in seen), seen
    finally:
        globalLogPublisher.removeObserver(observer)
