"""Run the DHCPv4 failover pair simulator.

    python -m tests.sim.dhcp4 --seeds 10000        # seeds 0..9999
    python -m tests.sim.dhcp4 --seed 1234 -v       # replay one seed, print its events
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

from tests.sim.dhcp4.world import Violation, World


def main(argv=None, *, world=World, violation=Violation, prog="python -m tests.sim.dhcp4",
         duration: float = 240.0) -> int:
    """The command line of a pair simulator (``tests.sim.dhcp6`` runs its World with it)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds (from --start)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, help="replay this one seed")
    ap.add_argument("--duration", type=float, default=duration, help="simulated seconds per seed")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the event log")
    ap.add_argument("--keep-going", action="store_true", help="run every seed, count failures")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    t0, failures, totals = time.time(), 0, Counter()
    for seed in seeds:
        try:
            w = world(seed, duration=args.duration, verbose=args.verbose).run()
            totals.update(w.stats)
            totals["events"] += w.events
            if args.verbose:
                print("\n".join(w.log))
        except violation as v:
            failures += 1
            print(f"FAIL {v}\n", flush=True)
            if not args.keep_going:
                break
    print(f"{len(seeds)} seeds x {args.duration:g} s simulated, {failures} failed, "
          f"{time.time() - t0:.1f} s; totals {dict(totals)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
