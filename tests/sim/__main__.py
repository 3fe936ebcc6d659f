"""Run the cluster fault simulator.

    python -m tests.sim --seeds 10000            # seeds 0..9999, 2 and 3 nodes
    python -m tests.sim --seed 1234 --nodes 2 -v # replay one seed, print its events
    python -m tests.sim --seeds 1000 --lease     # Redis owner leases instead of a witness
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.world import Violation, World


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim")
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds (from --start)")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--seed", type=int, help="replay this one seed")
    ap.add_argument("--nodes", type=int, choices=(2, 3), action="append",
                    help="node counts (default: 2 and 3)")
    ap.add_argument("--duration", type=float, default=30.0, help="simulated seconds per seed")
    ap.add_argument("--witness", action="store_true", help="add a witness node (w)")
    ap.add_argument("--paths", type=int, choices=(1, 2), default=1,
                    help="heartbeat paths per peer (2: each path also goes down and up)")
    ap.add_argument("--lease", action="store_true",
                    help="Redis owner leases (a simulated Redis) instead of a witness")
    ap.add_argument("--store-delay", type=float, default=0.0,
                    help="each store answer after up to this many seconds (claims in flight)")
    ap.add_argument("--rotation", choices=("auto", "safe", "unsafe", "none"), default="auto",
                    help="heartbeat key rotation: in half the seeds (auto), every seed, "
                         "every seed without the accept-first step (must fail), never")
    ap.add_argument("--fencing", choices=("auto", "on", "none"), default="auto",
                    help="pre_takeover fencing: in 30 %% of the seeds (auto), always, never")
    ap.add_argument("--slack", choices=("auto", "on", "none"), default="auto",
                    help="[cluster] deadline_slack_ms 0-2 ms: in 25 %% of the seeds (auto), "
                         "always, never (half a beat period, the default)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the event log")
    args = ap.parse_args(argv)
    counts = args.nodes or [2, 3]
    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    t0, runs, failures, events = time.time(), 0, 0, 0
    for seed in seeds:
        for n in counts:
            try:
                w = World(seed, n, witness=args.witness, lease=args.lease, paths=args.paths,
                          store_delay=args.store_delay,
                          rotation=None if args.rotation == "none" else args.rotation,
                          fencing=None if args.fencing == "none" else args.fencing,
                          slack=None if args.slack == "none" else args.slack,
                          ).run(args.duration)
                events += w.events
                if args.verbose:
                    print("\n".join(w.log))
            except Violation as v:
                failures += 1
                print(f"FAIL {v}\n", flush=True)
            runs += 1
    print(f"{runs} runs ({len(seeds)} seeds x {counts} nodes, {args.duration:g} s simulated "
          f"each, {events} fault events), {failures} failed, {time.time() - t0:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
