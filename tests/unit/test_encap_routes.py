"""RouteInjector against a fake netlink on a Clock: replace semantics, only
our protocol's routes withdrawn or listed, latency measured to the kernel's
answer, rules added once, failures are errbacks."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.net.netlink import NetlinkError
from services.encap.routes import PROTO_ENCAP, PROTO_ESR, RouteInjector, as_prefix
from tests.support.sync import ok


class FakeNetlink:
    """A kernel routing table in a dict; calls answer when ``answer()`` is called
    (or at once with ``instant=True``)."""

    def __init__(self, instant=True):
        self.instant = instant
        self.kernel: dict[tuple[int, str], dict] = {}
        self.rules: set[tuple[str, int]] = set()
        self.pending: list = []
        self.calls: list = []
        self.fail_next: Exception | None = None

    def _answer(self, fn):
        d = defer.Deferred()
        self.pending.append((fn, d))
        if self.instant:
            self.answer()
        return d

    def answer(self):
        while self.pending:
            fn, d = self.pending.pop(0)
            if self.fail_next is not None:
                e, self.fail_next = self.fail_next, None
                d.errback(e)
                continue
            d.callback(fn())

    def start(self):
        self.calls.append(("start",))

    def route_replace(self, prefix, *, dev=None, via=None, table=254, proto=None, metric=None):
        self.calls.append(("replace", prefix, dev, via, table, proto))

        def fn():
            self.kernel[(table, prefix)] = {"dev": dev, "via": via, "proto": proto}
        return self._answer(fn)

    def route_delete(self, prefix, *, table=254, proto=None):
        def fn():
            r = self.kernel.get((table, prefix))
            if r is None or (proto is not None and r["proto"] != proto):
                return False
            del self.kernel[(table, prefix)]
            return True
        return self._answer(fn)

    def routes(self, *, table=254, proto=None, version=4):
        return self._answer(lambda: [
            {"dst": p, "dev": r["dev"], "via": r["via"], "proto": r["proto"], "table": t,
             "metric": None}
            for (t, p), r in self.kernel.items()
            if t == table and (proto is None or r["proto"] == proto)])

    def rule_add(self, source, table, *, priority=None):
        def fn():
            if (source, table) in self.rules:
                return False
            self.rules.add((source, table))
            return True
        return self._answer(fn)

    def rule_delete(self, source, table):
        return self._answer(lambda: bool(self.rules.discard((source, table)) or True))


def test_as_prefix():
    """An address is a host route; networks are checked strictly."""
    assert as_prefix("10.200.0.5") == "10.200.0.5/32"
    assert as_prefix("fd00::5") == "fd00::5/128"
    assert as_prefix("10.200.0.64/26") == "10.200.0.64/26"
    with pytest.raises(ValueError):
        as_prefix("10.200.0.65/26")


def test_inject_replaces_and_reports_latency():
    """inject writes with our table and proto, replaces the previous next hop, and
    fires with the seconds from the call to the kernel's answer."""
    clock, nl = Clock(), FakeNetlink(instant=False)
    r = RouteInjector(clock, nl, table=1000, proto=PROTO_ESR)
    r.start()
    d = r.inject("10.200.0.64/26", via="10.9.0.2")
    clock.advance(0.004)
    nl.answer()
    assert ok(d) == pytest.approx(0.004)
    ok_d = r.inject("10.200.0.64/26", via="10.9.0.3")
    nl.answer()
    assert ok(ok_d) == 0.0
    assert nl.kernel == {(1000, "10.200.0.64/26"): {"dev": None, "via": "10.9.0.3",
                                                    "proto": PROTO_ESR}}
    assert nl.calls[-1] == ("replace", "10.200.0.64/26", None, "10.9.0.3", 1000, PROTO_ESR)
    assert r.stats["injected"] == 2 and r.stats["latency_s_max"] == pytest.approx(0.004)


def test_withdraw_only_touches_our_routes():
    """withdraw removes a route only when it carries our protocol number."""
    clock, nl = Clock(), FakeNetlink()
    nl.kernel[(254, "10.200.0.5/32")] = {"dev": "eth0", "via": None, "proto": 4}   # someone's
    r = RouteInjector(clock, nl)
    assert ok(r.withdraw("10.200.0.5")) is False
    assert (254, "10.200.0.5/32") in nl.kernel
    ok(r.inject("10.200.0.6", dev="tun0"))
    assert ok(r.withdraw("10.200.0.6")) is True
    assert (254, "10.200.0.6/32") not in nl.kernel and r.stats["withdrawn"] == 1
    assert r.proto == PROTO_ENCAP


def test_owned_lists_only_ours():
    """owned() maps our routes in our table; others' and other tables' are left out."""
    clock, nl = Clock(), FakeNetlink()
    nl.kernel[(254, "10.1.0.0/24")] = {"dev": "eth0", "via": None, "proto": 2}
    nl.kernel[(100, "10.2.0.0/24")] = {"dev": None, "via": "10.9.0.9", "proto": PROTO_ESR}
    r = RouteInjector(clock, nl, table=254, proto=PROTO_ESR)
    ok(r.inject("10.200.0.0/26", via="10.9.0.2"))
    assert ok(r.owned()) == {"10.200.0.0/26": {"dev": None, "via": "10.9.0.2"}}


def test_rule_from_once():
    """rule_from adds the source rule once."""
    clock, nl = Clock(), FakeNetlink()
    r = RouteInjector(clock, nl)
    assert ok(r.rule_from("10.200.0.0/24", 100)) is True
    assert ok(r.rule_from("10.200.0.0/24", 100)) is False
    assert nl.rules == {("10.200.0.0/24", 100)} and r.stats["rules"] == 1


def test_failures_are_errbacks():
    """Bad prefixes and netlink errors arrive as NetlinkError errbacks and are counted."""
    clock, nl = Clock(), FakeNetlink()
    r = RouteInjector(clock, nl)
    for d in (r.inject("10.200.0.65/26", via="10.9.0.1"), r.inject("10.200.0.1"),
              r.withdraw("nope")):
        with pytest.raises(NetlinkError):
            ok(d)
    nl.fail_next = NetlinkError("replace route 10.200.0.1/32: Network is unreachable", 101)
    with pytest.raises(NetlinkError):
        ok(r.inject("10.200.0.1", via="10.99.0.1"))
    assert r.stats["failures"] == 1 and "10.200.0.1/32" not in r.injected
