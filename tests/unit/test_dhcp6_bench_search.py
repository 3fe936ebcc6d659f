"""bench/dhcp_common.py's rate search (bench/dhcp6.py and bench/dhcp4.py): each probe's
verdict names the criterion it failed, and with ``confirm`` (dhcp6) one transient unclean
probe does not cap the search (the repeat at the same rate decides)."""

from __future__ import annotations

from bench import dhcp_common as B


def probe_of(capacity: int, blips=()):
    """A fake fixed-rate probe: clean up to ``capacity``; the offered rates in ``blips``
    fail once (a stall of the box), then behave."""
    blips = list(blips)
    calls = []

    def probe(rate):
        calls.append(rate)
        if rate in blips:
            blips.remove(rate)
            return {"offered": rate, "sent": rate, "x_per_s": rate * 0.9, "drop_pct": 10.0,
                    "p99": 800.0}
        done = min(rate, capacity)
        return {"offered": rate, "sent": rate, "x_per_s": float(done),
                "drop_pct": 0.0 if rate <= capacity else 5.0, "p99": 20.0}
    return probe, calls


def test_verdict_names_each_failed_criterion():
    r = {"offered": 1000, "sent": 1000, "x_per_s": 900.0, "drop_pct": 0.25, "p99": 612.0}
    why = B.verdict(r, "x_per_s")
    assert why == ["loss 0.250% >= 0.1%", "completed 900/s < 97% of 1000/s",
                   "p99 612 ms >= 500 ms"]
    assert B.verdict({**r, "x_per_s": 1000.0, "drop_pct": 0.0, "p99": 30.0}, "x_per_s") == []
    assert B.verdict({**r, "sent": 0}, "x_per_s") == ["perfdhcp sent nothing"]


def test_one_transient_unclean_probe_does_not_cap_the_search_with_confirm():
    probe, calls = probe_of(3000, blips=(1000,))
    best = B.rate_search(probe, "t", 500, 10, rate_key="x_per_s", unit="X", pause=0,
                         confirm=True)
    assert calls[:3] == [500, 1000, 1000]                # the repeat decides
    assert best["x_per_s"] >= 2000 and not best.get("unclean")
    assert [p["verdict"] for p in best["search"]][:3] == [
        "clean", "loss 10.000% >= 0.1%; completed 900/s < 97% of 1000/s; p99 800 ms >= 500 ms",
        "clean"]
    # without confirm (dhcp4's search, unchanged) the blip caps it below 1000
    probe, calls = probe_of(3000, blips=(1000,))
    best = B.rate_search(probe, "t", 500, 10, rate_key="x_per_s", unit="X", pause=0)
    assert best["x_per_s"] < 1000


def test_a_real_ceiling_is_still_found_and_confirmed():
    probe, calls = probe_of(1500)
    best = B.rate_search(probe, "t", 500, 12, rate_key="x_per_s", unit="X", pause=0,
                         confirm=True)
    assert 1400 <= best["x_per_s"] <= 1500
    assert calls.count(2000) == 2                       # the unclean 2000 repeated once
    assert B.search_text(best).startswith("500/s clean, 1000/s clean, 2000/s loss")


def test_the_result_says_where_the_capacity_lies():
    """The row's bracket: the best clean offered rate and the lowest unclean one, at most
    5 % apart when the search resolved it."""
    probe, calls = probe_of(1180)
    best = B.rate_search(probe, "t", 500, 16, rate_key="x_per_s", unit="X", pause=0,
                         confirm=True)
    lo, hi = best["bracket"]
    assert lo <= 1180 < hi and hi - lo <= 0.05 * hi + 10
    assert best["offered"] == lo and not best.get("budget_stopped")


def test_a_search_stopped_by_its_budget_says_so():
    # the old dhcp6 budget (8 probes, repeats counted): 500, 1000, 2000 x2, 1500 x2,
    # 1250 x2 -- it stopped at 1000 with the capacity (1180) unresolved above it
    probe, calls = probe_of(1180)
    best = B.rate_search(probe, "t", 500, 8, rate_key="x_per_s", unit="X", pause=0,
                         confirm=True)
    assert len(calls) == 8 and best["offered"] == 1000
    assert best["bracket"] == (1000, 1250) and best["budget_stopped"]


def test_the_dhcp6_bench_budget_resolves_every_row_so_far():
    """bench/dhcp6.py's default budget takes the search from 500/s to within 5 % of a
    capacity anywhere from the appliance pair's (~1,000-1,250/s: the old budget stopped
    at 1,000 there) to Kea alone (~8,000/s), repeats of unclean probes included."""
    from bench import dhcp6 as D6
    for capacity in (1100, 1180, 1240, 1900, 3000, 6000, 8000, 9500):
        probe, calls = probe_of(capacity)
        best = B.rate_search(probe, "t", 500, D6.DEFAULT_TRIALS, rate_key="x_per_s",
                             unit="X", pause=0, confirm=True)
        lo, hi = best["bracket"]
        assert lo <= capacity < hi, (capacity, best["bracket"])
        assert not best.get("budget_stopped"), (capacity, calls)
