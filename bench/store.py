#!/usr/bin/env python3
"""Store benchmark: the appliance's two store backends next to redis-benchmark.

Runs in one process (one reactor):

* ``memory``  -- MemoryStore in a temp dir, fsync policy from ``--fsync``
  (default ``always``); with ``always`` an extra ``memory-fsync-batch`` row
  set shows the cost of durability.
* ``redis``   -- RedisStore against a redis-server this script starts on
  127.0.0.1 (temp config, no persistence).
* ``redis-benchmark`` -- the anchor: ``redis-benchmark -t set -c 1`` against the
  same server, plain (sequential) and with ``-P 16`` (pipelined).

Cases: ``sequential`` = one SET awaited before the next; ``pipelined`` = SETs
issued ``--window`` at a time, then awaited.  Metric: ``ops_per_s``.

    python bench/store.py [--quick] [--json] [--fsync always|batch|never]

With ``--json`` the last stdout line is
``{"bench": "store", "rows": [{"system", "case", "metric", "value", "unit", ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402


def note(msg: str) -> None:
    print(f"[bench/store] {msg}", file=sys.stderr, flush=True)


def row(system, case, value, **extra):
    r = {"system": system, "case": case, "metric": "ops_per_s",
         "value": None if value is None else round(value, 1), "unit": "ops/s"}
    r.update(extra)
    return r


# ----------------------------------------------------------------------
# finding / installing the anchor
# ----------------------------------------------------------------------
def find_or_install(binary: str, package: str, allow_install: bool) -> str | None:
    path = shutil.which(binary)
    if path or not allow_install:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    note(f"{binary} missing: apt-get install {package}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq",
                        "--no-install-recommends", package], env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        note(f"apt-get install {package} failed: {e}")
    return shutil.which(binary)


# ----------------------------------------------------------------------
# the two load shapes, on any IStateStore
# ----------------------------------------------------------------------
async def run_sequential(store, n: int, max_s: float, value: str, prefix: str) -> tuple[int, float]:
    start = time.perf_counter()
    done = 0
    deadline = start + max_s
    while done < n:
        await store.set(f"{prefix}:{done % 10000}", value)
        done += 1
        if done % 64 == 0 and time.perf_counter() > deadline:
            break
    return done, time.perf_counter() - start


async def run_pipelined(store, n: int, max_s: float, value: str, prefix: str,
                        window: int) -> tuple[int, float]:
    start = time.perf_counter()
    done = 0
    deadline = start + max_s
    while done < n:
        batch = min(window, n - done)
        ds = [store.set(f"{prefix}:{(done + i) % 10000}", value) for i in range(batch)]
        await defer.gatherResults(ds, consumeErrors=True)
        done += batch
        if time.perf_counter() > deadline:
            break
    return done, time.perf_counter() - start


async def bench_store(label: str, store, args, value: str, extra: dict) -> list[dict]:
    rows = []
    # warm up (connections, scripts, journal file)
    await run_pipelined(store, 200, 5, value, f"bench:warm:{label}", 100)
    n_seq, n_pipe = args.ops_seq, args.ops_pipe
    done, took = await run_sequential(store, n_seq, args.max_seconds, value, f"bench:seq:{label}")
    rows.append(row(label, "sequential", done / took, ops=done, seconds=round(took, 3), **extra))
    note(f"{label:>20} sequential {done / took:>10.0f} ops/s ({done} ops in {took:.2f} s)")
    done, took = await run_pipelined(store, n_pipe, args.max_seconds, value,
                                      f"bench:pipe:{label}", args.window)
    rows.append(row(label, "pipelined", done / took, ops=done, seconds=round(took, 3),
                    window=args.window, **extra))
    note(f"{label:>20} pipelined  {done / took:>10.0f} ops/s ({done} ops in {took:.2f} s, "
         f"window {args.window})")
    return rows


async def bench_memory(reactor, args, value: str) -> list[dict]:
    from appliance.store.memory import MemoryStore

    policies = [args.fsync]
    if args.fsync == "always" and not args.no_extra:
        policies.append("batch")
    rows = []
    for policy in policies:
        with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
            store = MemoryStore(reactor, state_dir=tmp, fsync=policy)
            await defer.maybeDeferred(store.startService)
            try:
                label = "memory" if policy == args.fsync else f"memory-fsync-{policy}"
                rows += await bench_store(label, store, args, value, {"fsync": policy})
            finally:
                await defer.maybeDeferred(store.stopService)
    return rows


async def bench_redis_store(reactor, args, url: str, value: str) -> list[dict]:
    from appliance.store.redis import RedisStore

    store = RedisStore(reactor, url=url, namespace="bench", op_timeout_s=10.0,
                       connect_timeout_s=5.0)
    await store.startService()
    try:
        if not store.healthy:
            raise RuntimeError(f"RedisStore could not connect to {url}")
        return await bench_store("redis", store, args, value, {"poolsize": store.poolsize})
    finally:
        await store.stopService()


_RB_LINE = re.compile(r"SET:\s*([\d.]+)\s+requests per second")


def redis_benchmark(binary: str, port: int, args, pipeline: int) -> float | None:
    n = args.ops_rb_pipe if pipeline > 1 else args.ops_rb_seq
    cmd = [binary, "-h", "127.0.0.1", "-p", str(port), "-t", "set", "-n", str(n), "-q",
           "-c", "1", "-d", str(args.value_size), "-r", "10000"]
    if pipeline > 1:
        cmd += ["-P", str(pipeline)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=30 if args.quick else 120).stdout
    except subprocess.TimeoutExpired:
        note(f"{' '.join(cmd)} timed out")
        return None
    matches = _RB_LINE.findall(out.replace("\r", "\n"))
    if not matches:
        note(f"could not parse redis-benchmark output: {out[-300:]!r}")
        return None
    return float(matches[-1])


# ----------------------------------------------------------------------
async def main(reactor, args) -> list[dict]:
    value = "v" * args.value_size
    rows: list[dict] = []
    try:
        load1 = os.getloadavg()[0]
        note(f"load average {load1:.2f} on {os.cpu_count()} CPUs"
             + (" -- machine busy, rates are not trustworthy" if load1 > 0.5 else ""))
    except OSError:
        pass

    if "memory" in args.systems:
        try:
            rows += await bench_memory(reactor, args, value)
        except Exception as e:
            note(f"memory store bench failed: {e!r}")
            rows += [row("memory", c, None, note=f"failed: {e}") for c in ("sequential",
                                                                          "pipelined")]

    server = None
    want_redis = {"redis", "redis-benchmark"} & set(args.systems)
    if want_redis:
        server_bin = find_or_install("redis-server", "redis-server", not args.no_install)
        if server_bin is None:
            msg = "redis-server not installed (apt-get install redis-server redis-tools)"
            note(msg + ": redis rows skipped")
            for system in sorted(want_redis):
                for case in ("sequential", "pipelined"):
                    rows.append(row(system, case, None, note=msg))
        else:
            from tests.support.redis_server import RedisServer

            server = RedisServer(server_bin).start()
    try:
        if server is not None and "redis" in args.systems:
            try:
                rows += await bench_redis_store(reactor, args, server.url, value)
            except Exception as e:
                note(f"redis store bench failed: {e!r}")
                rows += [row("redis", c, None, note=f"failed: {e}") for c in ("sequential",
                                                                             "pipelined")]
        if server is not None and "redis-benchmark" in args.systems:
            rb = find_or_install("redis-benchmark", "redis-tools", not args.no_install)
            if rb is None:
                msg = "redis-benchmark not installed (apt-get install redis-tools)"
                note(msg)
                rows += [row("redis-benchmark", c, None, note=msg)
                         for c in ("sequential", "pipelined")]
            else:
                for case, pipeline in (("sequential", 1), ("pipelined", 16)):
                    rate = await task.deferLater(reactor, 0, redis_benchmark, rb, server.port,
                                                 args, pipeline)
                    extra = {"cmd": f"redis-benchmark -t set -c 1 -d {args.value_size}"
                                    + (f" -P {pipeline}" if pipeline > 1 else "")}
                    rows.append(row("redis-benchmark", case, rate, **extra))
                    if rate is not None:
                        note(f"{'redis-benchmark':>20} {case:<10} {rate:>10.0f} ops/s")
    finally:
        if server is not None:
            server.stop()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'system':<22}{'case':<12}{'ops/s':>12}  notes")
    print("-" * 70)
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:,.0f}"
        notes = []
        for k in ("fsync", "window", "poolsize", "cmd", "note"):
            if k in r:
                notes.append(f"{k}={r[k]}")
        print(f"{r['system']:<22}{r['case']:<12}{value:>12}  {' '.join(notes)}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (well under a minute)")
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default="always",
                   help="memory store fsync policy (default: always)")
    p.add_argument("--window", type=int, default=500, help="outstanding SETs when pipelined")
    p.add_argument("--value-size", type=int, default=32, help="bytes per value")
    p.add_argument("--systems", default="memory,redis,redis-benchmark",
                   help="comma-separated subset of memory,redis,redis-benchmark")
    p.add_argument("--no-extra", action="store_true", help="skip the extra fsync=batch rows")
    p.add_argument("--no-install", action="store_true", help="never apt-get install anchors")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if args.quick:
        args.ops_seq, args.ops_pipe, args.max_seconds = 5000, 20000, 3.0
        args.ops_rb_seq, args.ops_rb_pipe = 20000, 200000
    else:
        args.ops_seq, args.ops_pipe, args.max_seconds = 30000, 200000, 15.0
        args.ops_rb_seq, args.ops_rb_pipe = 100000, 1000000
    return args


def run(argv=None) -> int:
    args = parse_args(argv)
    result: dict = {}

    async def go(reactor):
        result["rows"] = await main(reactor, args)

    try:
        task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    rows = result.get("rows", [])
    print_table(rows)
    if args.json:
        print(json.dumps({"bench": "store", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(run())
