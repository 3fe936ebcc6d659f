#!/usr/bin/env python3
"""Store benchmark: the appliance's store backends next to raw txredisapi and
redis-benchmark, in one run, one process (one reactor).

Systems (SPEC row names):

* ``embedded-always`` / ``embedded-batch`` / ``embedded-never`` -- the embedded
  SQLite store (``EmbeddedStore``) in a temp dir with that fsync policy.
  ``always`` fsyncs every commit before acknowledging it.
* ``redis`` -- ``RedisStore`` (each ``set`` is an ``EVALSHA`` of a script that
  does ``SET`` + ``PUBLISH``; one ordered connection).
* ``txredisapi`` -- raw txredisapi, one connection, ``SET`` straight on the
  protocol (the cheapest path txredisapi has; no script, no PUBLISH).
* ``redis-benchmark`` -- the anchor, ``redis-benchmark -t set -c 1``
  (``-P 16`` for pipelined).

The Redis rows run twice, against two redis-servers this script starts on
127.0.0.1: one with Redis' SHIPPED DEFAULT config (``appendonly no``, RDB
snapshots: an acknowledged write is in memory only -- case ``sequential`` /
``pipelined``), and one with ``appendonly yes`` + ``appendfsync always``
(fsync before the reply, the fair comparison with ``embedded-always`` -- case
``sequential-aof-always`` / ``pipelined-aof-always``).

Cases: ``sequential`` = one SET awaited before the next; ``pipelined`` = SETs
issued ``--window`` at a time without awaiting, then awaited.  Metric:
``ops_per_s``, the median of ``--repeat`` runs (each run's rate is in ``runs``).  Keys cycle over 10,000 names, values are ``--value-size`` bytes.

    python bench/store.py [--quick] [--json] [--systems a,b,...]

Needs only ``pip install .`` (no pytest).  With ``--json`` the last stdout line
is ``{"bench": "store", "rows": [{"system", "case", "metric", "value", "unit", ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer, task  # noqa: E402

SYSTEMS = ("embedded-always", "embedded-batch", "embedded-never", "redis", "txredisapi",
           "redis-benchmark")
REDIS_CONFIGS = (("", "default"), ("-aof-always", "appendonly yes\nappendfsync always"))


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
# the two load shapes, on anything with set(key, value) -> Deferred
# ----------------------------------------------------------------------
async def run_sequential(set_, n: int, max_s: float, value: str, prefix: str):
    start = time.perf_counter()
    done = 0
    deadline = start + max_s
    while done < n:
        await set_(f"{prefix}:{done % 10000}", value)
        done += 1
        if done % 64 == 0 and time.perf_counter() > deadline:
            break
    return done, time.perf_counter() - start


async def run_pipelined(set_, n: int, max_s: float, value: str, prefix: str, window: int):
    start = time.perf_counter()
    done = 0
    deadline = start + max_s
    while done < n:
        batch = min(window, n - done)
        ds = [set_(f"{prefix}:{(done + i) % 10000}", value) for i in range(batch)]
        await defer.gatherResults(ds, consumeErrors=True)
        done += batch
        if time.perf_counter() > deadline:
            break
    return done, time.perf_counter() - start


async def bench_set(label: str, set_, args, value: str, suffix: str = "", **extra):
    """Both cases, each run ``--repeat`` times; the row holds the median rate."""
    rows = []
    await run_pipelined(set_, 500, 5, value, f"bench:warm:{label}", 100)     # warm up
    for case in ("sequential", "pipelined"):
        rates, total_ops, total_s = [], 0, 0.0
        for _ in range(args.repeat):
            if case == "sequential":
                done, took = await run_sequential(set_, args.ops_seq, args.max_seconds, value,
                                                  f"bench:seq:{label}")
            else:
                done, took = await run_pipelined(set_, args.ops_pipe, args.max_seconds, value,
                                                 f"bench:pipe:{label}", args.window)
            rates.append(done / took)
            total_ops, total_s = total_ops + done, total_s + took
        rate = statistics.median(rates)
        more = dict(extra, ops=total_ops, seconds=round(total_s, 3),
                    runs=[round(r) for r in rates])
        if case == "pipelined":
            more["window"] = args.window
        rows.append(row(label, case + suffix, rate, **more))
        note(f"{label:>16} {case + suffix:<22} {rate:>10.0f} ops/s (median of "
             f"{', '.join(f'{r:.0f}' for r in rates)})")
    return rows


async def bench_embedded(reactor, args, value: str, policy: str) -> list[dict]:
    from appliance.store.embedded import EmbeddedStore

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        store = EmbeddedStore(reactor, state_dir=tmp, fsync=policy)
        await defer.maybeDeferred(store.startService)
        try:
            return await bench_set(f"embedded-{policy}", store.set, args, value, fsync=policy)
        finally:
            await defer.maybeDeferred(store.stopService)


async def bench_redis_store(reactor, args, url: str, value: str, suffix: str, config: str):
    from appliance.store.redis import RedisStore

    store = RedisStore(reactor, url=url, namespace="bench",   # shipped op_timeout_s
                       connect_timeout_s=5.0)
    await store.startService()
    try:
        if not store.healthy:
            raise RuntimeError(f"RedisStore could not connect to {url}")
        return await bench_set("redis", store.set, args, value, suffix, redis_config=config)
    finally:
        await store.stopService()


async def bench_txredisapi(reactor, args, port: int, value: str, suffix: str, config: str):
    import txredisapi

    handler = await txredisapi.Connection("127.0.0.1", port, reconnect=False, convertNumbers=False)
    try:
        conn = handler._factory.pool[0]      # the protocol: no pool round-robin, no coroutine
        return await bench_set("txredisapi", lambda k, v: conn.execute_command("SET", k, v),
                               args, value, suffix, redis_config=config)
    finally:
        await handler.disconnect()


_RB_LINE = re.compile(r"SET:\s*([\d.]+)\s+requests per second")


def redis_benchmark(binary: str, port: int, args, pipeline: int) -> float | None:
    n = args.ops_rb_pipe if pipeline > 1 else args.ops_rb_seq
    cmd = [binary, "-h", "127.0.0.1", "-p", str(port), "-t", "set", "-n", str(n), "-q",
           "-c", "1", "-d", str(args.value_size), "-r", "10000"]
    if pipeline > 1:
        cmd += ["-P", str(pipeline)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=60 if args.quick else 180).stdout
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

    for policy in ("always", "batch", "never"):
        label = f"embedded-{policy}"
        if label not in args.systems:
            continue
        try:
            rows += await bench_embedded(reactor, args, value, policy)
        except Exception as e:
            note(f"{label} bench failed: {e!r}")
            rows += [row(label, c, None, note=f"failed: {e}") for c in ("sequential",
                                                                       "pipelined")]

    want_redis = [s for s in ("redis", "txredisapi", "redis-benchmark") if s in args.systems]
    if not want_redis:
        return rows
    server_bin = find_or_install("redis-server", "redis-server", not args.no_install)
    rb = None
    if "redis-benchmark" in want_redis:
        rb = find_or_install("redis-benchmark", "redis-tools", not args.no_install)
    from tests.support.redis_server import RedisServer

    for suffix, config in REDIS_CONFIGS:
        cases = [c + suffix for c in ("sequential", "pipelined")]
        if server_bin is None:
            msg = "redis-server not installed (apt-get install redis-server redis-tools)"
            note(msg + ": redis rows skipped")
            rows += [row(s, c, None, note=msg) for s in want_redis for c in cases]
            continue
        if config == "default":
            server = RedisServer(server_bin, persistence="default")
        else:
            server = RedisServer(server_bin, persistence="default", extra_config=config)
        server.start()
        shown = "shipped defaults" if config == "default" else config.replace("\n", ", ")
        note(f"redis-server on port {server.port}: {shown}")
        try:
            if "redis" in want_redis:
                try:
                    rows += await bench_redis_store(reactor, args, server.url, value, suffix,
                                                    shown)
                except Exception as e:
                    note(f"redis store bench failed: {e!r}")
                    rows += [row("redis", c, None, note=f"failed: {e}") for c in cases]
            if "txredisapi" in want_redis:
                try:
                    rows += await bench_txredisapi(reactor, args, server.port, value, suffix,
                                                   shown)
                except Exception as e:
                    note(f"txredisapi bench failed: {e!r}")
                    rows += [row("txredisapi", c, None, note=f"failed: {e}") for c in cases]
            if "redis-benchmark" in want_redis:
                if rb is None:
                    msg = "redis-benchmark not installed (apt-get install redis-tools)"
                    note(msg)
                    rows += [row("redis-benchmark", c, None, note=msg) for c in cases]
                    continue
                for case, pipeline in (("sequential", 1), ("pipelined", 16)):
                    rate = await task.deferLater(reactor, 0, redis_benchmark, rb, server.port,
                                                 args, pipeline)
                    cmd = f"redis-benchmark -t set -c 1 -d {args.value_size}" + (
                        f" -P {pipeline}" if pipeline > 1 else "")
                    rows.append(row("redis-benchmark", case + suffix, rate, cmd=cmd,
                                    redis_config=shown))
                    if rate is not None:
                        note(f"{'redis-benchmark':>16} {case + suffix:<22} {rate:>10.0f} ops/s")
        finally:
            server.stop()
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'system':<18}{'case':<24}{'ops/s':>12}  notes")
    print("-" * 96)
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:,.0f}"
        notes = []
        for k in ("fsync", "window", "redis_config", "cmd", "note"):
            if k in r:
                notes.append(f"{k}={r[k]}")
        print(f"{r['system']:<18}{r['case']:<24}{value:>12}  {' '.join(notes)}")
    print("redis rows: case without suffix = redis-server with its shipped defaults "
          "(appendonly no: acknowledged = in memory); -aof-always = appendonly yes + "
          "appendfsync always (fsync before the reply, like embedded-always).")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (under a minute)")
    p.add_argument("--json", action="store_true", help="print the JSON result as the last line")
    p.add_argument("--window", type=int, default=500, help="outstanding SETs when pipelined")
    p.add_argument("--value-size", type=int, default=32, help="bytes per value")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--no-install", action="store_true", help="never apt-get install anchors")
    p.add_argument("--repeat", type=int, default=None,
                   help="runs per case, the median is reported (default 3, --quick 1)")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.quick:
        args.ops_seq, args.ops_pipe, args.max_seconds = 3000, 20000, 1.5
        args.ops_rb_seq, args.ops_rb_pipe = 10000, 100000
    else:
        args.ops_seq, args.ops_pipe, args.max_seconds = 20000, 200000, 5.0
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
