"""VIPManager against a fake Netlink on a Clock: no threads, no sockets."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from appliance.cluster.vip import VIPManager
from appliance.config import VIPSection
from appliance.net.netlink import NetlinkError


def vip(name: str = "vip-dhcp", address: str = "10.9.0.100/24", interface: str = "veth0") -> VIPSection:
    return VIPSection(name=name, address=ipaddress.ip_interface(address), interface=interface,
                      priority={"a": 200, "b": 100})


class FakeNetlink:
    """Records calls; keeps per-interface address lists; can fail or hold
    operations (``manual``) so tests decide when they complete."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.addrs: dict[str, list[Any]] = {}
        self.fail: dict[str, Exception] = {}
        self.manual = False
        self.pending: list[tuple[defer.Deferred, Any]] = []
        self.started = 0
        self.closed = 0

    def start(self) -> None:
        self.started += 1

    def close(self) -> defer.Deferred:
        self.closed += 1
        self.calls.append(("close",))
        return defer.succeed(None)

    def _result(self, op: str, compute) -> defer.Deferred:
        if op in self.fail:
            return defer.fail(self.fail[op])
        if self.manual:
            d: defer.Deferred = defer.Deferred()
            self.pending.append((d, compute))
            return d
        return defer.succeed(compute())

    def complete_next(self) -> None:
        d, compute = self.pending.pop(0)
        d.callback(compute())

    def addresses(self, ifname: str) -> defer.Deferred:
        self.calls.append(("addresses", ifname))
        return self._result("addresses", lambda: list(self.addrs.get(ifname, [])))

    def add_address(self, ifname: str, iface: Any) -> defer.Deferred:
        self.calls.append(("add", ifname, str(iface)))

        def do() -> bool:
            lst = self.addrs.setdefault(ifname, [])
            if iface in lst:
                return False
            lst.append(iface)
            return True

        return self._result("add", do)

    def remove_address(self, ifname: str, iface: Any) -> defer.Deferred:
        self.calls.append(("remove", ifname, str(iface)))

        def do() -> bool:
            lst = self.addrs.setdefault(ifname, [])
            if iface in lst:
                lst.remove(iface)
                return True
            return False

        return self._result("remove", do)

    def announce(self, ifname: str, ip: Any) -> defer.Deferred:
        self.calls.append(("announce", ifname, str(ip)))
        return self._result("announce", lambda: 2)

    def count(self, op: str) -> int:
        return sum(1 for c in self.calls if c[0] == op)


def make(vips=None, **kwargs) -> tuple[VIPManager, FakeNetlink, Clock]:
    clock = Clock()
    nl = FakeNetlink()
    kwargs.setdefault("announce_count", 3)
    kwargs.setdefault("announce_interval_s", 0.05)
    kwargs.setdefault("refresh_interval_s", 60.0)
    mgr = VIPManager(clock, vips if vips is not None else [vip()], netlink=nl, **kwargs)
    return mgr, nl, clock


def result_of(d: defer.Deferred) -> Any:
    """The synchronous result of a fired Deferred (fails the test otherwise)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert not isinstance(out[0], Exception) and not hasattr(out[0], "raiseException"), out[0]
    return out[0]


def test_acquire_adds_then_announces_count_times_at_interval():
    """acquire adds the address, announces once at once, then twice more
    0.05 s apart, and nothing more until the refresh interval."""
    mgr, nl, clock = make()
    assert result_of(mgr.acquire("vip-dhcp", "promoted")) is True
    assert nl.calls[0] == ("add", "veth0", "10.9.0.100/24")
    assert nl.calls[1] == ("announce", "veth0", "10.9.0.100/24")
    assert nl.count("announce") == 1
    clock.advance(0.049)
    assert nl.count("announce") == 1
    clock.advance(0.001)
    assert nl.count("announce") == 2
    clock.advance(0.05)
    assert nl.count("announce") == 3
    clock.advance(10)
    assert nl.count("announce") == 3
    assert mgr.held() == {"vip-dhcp"}
    assert mgr.stats["acquired"] == 1
    assert mgr.stats["announcements"] == 3
    assert mgr.stats["errors"] == 0


def test_refresh_reannounces_and_readds_missing_address():
    """While held, every refresh interval the address is re-ensured and
    announced; if something removed it, it is re-added and counted."""
    mgr, nl, clock = make(refresh_interval_s=60.0)
    mgr.acquire("vip-dhcp")
    clock.advance(1)
    assert nl.count("announce") == 3
    clock.advance(59)
    assert nl.count("add") == 2
    assert nl.count("announce") == 4
    assert mgr.stats["readded"] == 0
    nl.addrs["veth0"].clear()  # someone deleted it behind our back
    with capturedLogs() as events:
        clock.advance(60)
    assert nl.addrs["veth0"] == [ipaddress.ip_interface("10.9.0.100/24")]
    assert mgr.stats["readded"] == 1
    assert nl.count("announce") == 5
    assert any("was missing" in formatEvent(e) for e in events)


def test_release_removes_and_stops_announcing():
    """release removes the address, cancels pending announcements and the
    refresh: no timers are left on the clock."""
    mgr, nl, clock = make()
    mgr.acquire("vip-dhcp", "promoted")
    assert nl.count("announce") == 1
    assert result_of(mgr.release("vip-dhcp", "demoted")) is True
    assert ("remove", "veth0", "10.9.0.100/24") in nl.calls
    assert nl.addrs["veth0"] == []
    assert mgr.held() == set()
    assert clock.getDelayedCalls() == []
    clock.advance(1000)
    assert nl.count("announce") == 1
    assert mgr.stats["released"] == 1


def test_release_of_absent_vip_is_fine():
    """Releasing a VIP that is not on the interface succeeds (idempotent)."""
    mgr, nl, clock = make()
    assert result_of(mgr.release("vip-dhcp", "demoted")) is True
    assert mgr.stats["errors"] == 0
    assert mgr.stats["released"] == 0


def test_acquire_twice_does_not_double_refresh():
    """A second acquire re-announces but keeps a single refresh loop."""
    mgr, nl, clock = make(announce_count=1, refresh_interval_s=10)
    mgr.acquire("vip-dhcp")
    mgr.acquire("vip-dhcp")
    assert nl.count("announce") == 2
    assert mgr.stats["acquired"] == 1
    clock.advance(10)
    assert nl.count("announce") == 3
    assert len(clock.getDelayedCalls()) == 1


def test_release_while_add_in_flight_wins():
    """If release comes before the add completes, the late add completion
    neither marks the VIP held nor announces it; the remove runs after."""
    mgr, nl, clock = make()
    nl.manual = True
    d_acq = mgr.acquire("vip-dhcp", "promoted")
    d_rel = mgr.release("vip-dhcp", "demoted")
    nl.complete_next()  # the add
    nl.complete_next()  # the remove
    assert result_of(d_acq) is False
    assert result_of(d_rel) is True
    assert mgr.held() == set()
    assert nl.count("announce") == 0
    assert nl.addrs["veth0"] == []
    assert clock.getDelayedCalls() == []


def test_start_removes_stale_addresses_only():
    """startService removes configured VIP addresses found on their
    interfaces (left by a crashed run) and leaves other addresses alone."""
    mgr, nl, clock = make([vip(), vip("vip-sip", "10.9.0.101/24"),
                           vip("vip-v6", "fd00:9::100/64", "veth1")])
    nl.addrs["veth0"] = [ipaddress.ip_interface("10.9.0.1/24"),
                         ipaddress.ip_interface("10.9.0.100/24")]
    nl.addrs["veth1"] = [ipaddress.ip_interface("fd00:9::100/64")]
    with capturedLogs() as events:
        assert result_of(mgr.startService()) is None
    assert nl.started == 1
    assert nl.count("addresses") == 2  # one query per interface
    assert nl.addrs["veth0"] == [ipaddress.ip_interface("10.9.0.1/24")]
    assert nl.addrs["veth1"] == []
    assert mgr.held() == set()
    assert mgr.stats["errors"] == 0
    texts = [formatEvent(e) for e in events]
    assert any("vip vip-dhcp 10.9.0.100/24 removed from veth0: stale" in t for t in texts)


def test_start_keeps_vip_acquired_meanwhile():
    """A VIP acquired while the stale check is in flight is not removed."""
    mgr, nl, clock = make()
    nl.addrs["veth0"] = [ipaddress.ip_interface("10.9.0.100/24")]
    nl.manual = True
    d_start = mgr.startService()
    mgr.acquire("vip-dhcp", "promoted")
    nl.complete_next()  # addresses -> sees the VIP, but it is wanted now
    nl.complete_next()  # add (EEXIST -> False)
    assert result_of(d_start) is None
    assert nl.count("remove") == 0
    assert mgr.held() == {"vip-dhcp"}


def test_stop_releases_everything_and_closes_netlink():
    """stopService releases every held VIP, closes the netlink thread and
    leaves no timers behind."""
    mgr, nl, clock = make([vip(), vip("vip-sip", "10.9.0.101/24")])
    result_of(mgr.startService())
    mgr.acquire("vip-dhcp", "promoted")
    mgr.acquire("vip-sip", "promoted")
    with capturedLogs() as events:
        assert result_of(mgr.stopService()) is None
    assert nl.addrs["veth0"] == []
    assert mgr.held() == set()
    assert nl.closed == 1
    assert nl.calls[-1] == ("close",)
    assert clock.getDelayedCalls() == []
    assert mgr.stats["released"] == 2
    texts = [formatEvent(e) for e in events]
    assert "vip vip-sip 10.9.0.101/24 removed from veth0: service stopping" in texts


def test_add_failure_is_logged_and_counted_not_raised():
    """A failing add fires False, logs the reason, counts an error, and the
    VIP is not held; nothing is announced."""
    mgr, nl, clock = make()
    nl.fail["add"] = NetlinkError("add 10.9.0.100/24 on veth0: No such device", 19)
    with capturedLogs() as events:
        assert result_of(mgr.acquire("vip-dhcp", "promoted")) is False
    assert mgr.stats["errors"] == 1
    assert mgr.held() == set()
    assert nl.count("announce") == 0
    assert clock.getDelayedCalls() == []
    texts = [formatEvent(e) for e in events]
    assert any("add 10.9.0.100/24 on veth0: No such device" in t for t in texts)


def test_announce_failures_counted_and_refresh_survives():
    """Failing announcements are counted as errors; the refresh loop keeps
    running (a LoopingCall would die on an escaped exception)."""
    mgr, nl, clock = make(refresh_interval_s=5)
    nl.fail["announce"] = NetlinkError("announce 10.9.0.100 on veth0: Network is down", 100)
    with capturedLogs():
        assert result_of(mgr.acquire("vip-dhcp")) is True
        clock.advance(0.1)
        assert mgr.stats["errors"] == 3
        clock.advance(5)
        clock.advance(5)
    assert mgr.stats["errors"] == 5
    assert mgr.stats["announcements"] == 0
    assert mgr.held() == {"vip-dhcp"}
    del nl.fail["announce"]
    clock.advance(5)
    assert mgr.stats["announcements"] == 1


def test_remove_failure_is_logged_and_counted():
    """A failing remove fires False and counts an error; the VIP is no
    longer believed held."""
    mgr, nl, clock = make()
    mgr.acquire("vip-dhcp")
    nl.fail["remove"] = NetlinkError("remove 10.9.0.100/24 from veth0: Operation not permitted", 1)
    with capturedLogs() as events:
        assert result_of(mgr.release("vip-dhcp", "demoted")) is False
    assert mgr.stats["errors"] == 1
    assert mgr.held() == set()
    assert any("Operation not permitted" in formatEvent(e) for e in events)


def test_unexpected_exception_logged_with_traceback():
    """A non-netlink exception is logged as a failure (with traceback) and
    counted, still not raised."""
    mgr, nl, clock = make()
    nl.fail["add"] = ZeroDivisionError("boom")
    with capturedLogs() as events:
        assert result_of(mgr.acquire("vip-dhcp")) is False
    assert mgr.stats["errors"] == 1
    assert any(e.get("log_failure") is not None for e in events)


def test_unknown_vip_is_an_error_not_an_exception():
    """acquire/release of an unconfigured name fire False and count errors."""
    mgr, nl, clock = make()
    with capturedLogs():
        assert result_of(mgr.acquire("nope")) is False
        assert result_of(mgr.release("nope")) is False
    assert mgr.stats["errors"] == 2
    assert nl.calls == []


def test_log_lines_carry_the_reason():
    """Every add/remove is one structured event naming VIP, address,
    interface and reason."""
    mgr, nl, clock = make()
    with capturedLogs() as events:
        mgr.acquire("vip-dhcp", "promoted (peer b dead)")
        mgr.release("vip-dhcp", "demoted (peer b back, preempt)")
    texts = [formatEvent(e) for e in events if e.get("event_type") in ("vip_added", "vip_removed")]
    assert texts == [
        "vip vip-dhcp 10.9.0.100/24 added on veth0: promoted (peer b dead)",
        "vip vip-dhcp 10.9.0.100/24 removed from veth0: demoted (peer b back, preempt)",
    ]
    added = [e for e in events if e.get("event_type") == "vip_added"][0]
    assert added["vip"] == "vip-dhcp" and added["interface"] == "veth0"
    assert added["reason"] == "promoted (peer b dead)"


def test_ipv6_vip_announced_by_address():
    """An IPv6 VIP goes through the same path (the Netlink picks NA)."""
    mgr, nl, clock = make([vip("vip-v6", "fd00:9::100/64")], announce_count=2)
    mgr.acquire("vip-v6")
    clock.advance(0.05)
    assert nl.calls == [("add", "veth0", "fd00:9::100/64"),
                        ("announce", "veth0", "fd00:9::100/64"),
                        ("announce", "veth0", "fd00:9::100/64")]


def test_refresh_disabled_with_zero_interval():
    """refresh_interval_s=0 means the burst only, no periodic timer."""
    mgr, nl, clock = make(refresh_interval_s=0)
    mgr.acquire("vip-dhcp")
    clock.advance(1)
    assert clock.getDelayedCalls() == []
    assert nl.count("announce") == 3


def test_duplicate_vip_names_rejected():
    """Two VIPs with one name are a configuration bug: ValueError at build."""
    with pytest.raises(ValueError, match="duplicate"):
        make([vip(), vip()])


def test_service_name():
    """The service is called ``vip`` (the node looks it up by name)."""
    mgr, nl, clock = make()
    assert mgr.name == "vip"
