"""Shared by the benches: percentiles and the table + ``--json`` report of SPEC.md."""

from __future__ import annotations

import json


def percentile(values, p):
    """Linear-interpolated ``p``-th percentile of ``values`` (None if empty)."""
    values = sorted(values)
    if not values:
        return None
    k = (len(values) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def report(bench: str, rows: list[dict], as_json: bool, extra: tuple[str, ...] = ()) -> int:
    """Print the human table, then (with ``as_json``) one JSON object last on stdout."""
    cols = ("system", "case", "metric")
    widths = [max([len(c)] + [len(str(r.get(c, ""))) for r in rows]) for c in cols]
    head = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    print(f"{head}  {'value':>10}  unit" + "".join(f"  {e}" for e in extra))
    for r in rows:
        v = "-" if r.get("value") is None else f"{r['value']:.2f}"
        cells = "  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths))
        print(f"{cells}  {v:>10}  {r.get('unit', '')}" + "".join(f"  {r.get(e, '')}" for e in extra))
    if as_json:
        print(json.dumps({"bench": bench, "rows": rows}))
    return 0
