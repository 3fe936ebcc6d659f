"""Crash-consistency harness for the embedded store (SIGKILL at random moments).

A *child* process runs random calls against an :class:`EmbeddedStore` on the
real reactor (commits of several ops, plain writes, hashes, sorted sets,
type changes, expiries, ``commit_now`` + ``durable()``), up to 8 in flight,
and prints one line per event on stdout (each line flushed)::

    READY <digest of the state it loaded>
    ISSUED <n> <t> <call as JSON>   before call n is issued (t: reactor time)
    ACK <n> <result as JSON>        when call n's Deferred fired
    ERR <n> <error class> <text>    when it failed
    BAD <text>                      a read disagreed with the child's own model

The harness kills it with SIGKILL after a random delay, opens the state dir
with a fresh store and checks it against :class:`Model`: replaying calls
``1..k`` on the state the child started from must give exactly what the
store holds, for some ``k >= `` the highest acknowledged call (every
acknowledged call is there, none is partly applied, nothing later survives
without everything earlier: the durable state is a prefix).

Keys: ``k00``..``k29`` (they collide and change type) never expire during a
round (long ttls, ``3600 + 10 n`` seconds for call ``n`` so a stale expiry is
told apart), and ``exp:0``..``exp:4``, which only get ``set`` with a long ttl,
``set`` with a 1 ms ttl, ``expire`` 1 ms or ``delete``: the last of those in
the prefix decides (present with the long-ttl value, or absent -- expired by
check time), so the model stays exact without simulating time.

Starting a Python with Twisted costs ~0.3 s, so rounds go through a *zygote*
(``--serve``): one process that has imported everything, forks a child per
round, kills it after the delay and hands back the transcript.

Command lines::

    python -m tests.support.store_crasher STATE_DIR FSYNC SEED [MAX_CALLS]
        the child alone (runs until killed)
    python -m tests.support.store_crasher --serve
        the zygote (reads RUN lines on stdin, see serve())
    python -m tests.support.store_crasher --rounds N --fsync F --seed S [--keep DIR]
        the whole test without pytest (prints a replay line on failure)
    python -m tests.support.store_crasher --check BEFORE_DIR AFTER_DIR TRANSCRIPT
        re-run the check of a kept failure
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAIN_KEYS = [f"k{i:02d}" for i in range(30)]
EXP_KEYS = [f"exp:{i}" for i in range(5)]
FIELDS = [f"f{i}" for i in range(8)]
MEMBERS = [f"m{i}" for i in range(10)]
MAX_INFLIGHT = 8
TINY_TTL = 0.001
EXPIRY_SLACK_S = 2.0          # the store reads the clock a little after ISSUED
ROOT = Path(__file__).resolve().parents[2]


class WrongType(Exception):
    pass


def long_ttl(n: int) -> float:
    return 3600.0 + 10.0 * n


# ----------------------------------------------------------------------
# the model: the store's semantics, exactly, on plain dicts
# ----------------------------------------------------------------------
class Model:
    """State: ``data[key] = ("s", str) | ("h", dict) | ("z", dict)`` and
    ``expiry[key] = absolute time`` (the time the call was issued + ttl)."""

    def __init__(self, data=None, expiry=None):
        self.data = {k: (t, dict(v) if t != "s" else v) for k, (t, v) in (data or {}).items()}
        self.expiry = dict(expiry or {})

    def copy(self) -> "Model":
        return Model(self.data, self.expiry)

    def kind(self, key):
        v = self.data.get(key)
        return None if v is None else v[0]

    def _drop(self, key):
        self.data.pop(key, None)
        self.expiry.pop(key, None)

    def _set(self, key, value, ttl, t):
        self.data[key] = ("s", value)
        if ttl is None:
            self.expiry.pop(key, None)
        elif key.startswith("exp:") and ttl == TINY_TTL:
            self._drop(key)                    # expired by check time
        else:
            self.expiry[key] = t + ttl

    def _want(self, key, t):
        k = self.kind(key)
        if k is not None and k != t:
            raise WrongType(key)

    def _hset(self, key, mapping):
        self._want(key, "h")
        if key not in self.data:
            self.data[key] = ("h", {})
            self.expiry.pop(key, None)
        h = self.data[key][1]
        new = sum(1 for f in mapping if f not in h)
        h.update(mapping)
        return new

    def _hdel(self, key, fields):
        self._want(key, "h")
        if key not in self.data:
            return 0
        h = self.data[key][1]
        gone = [f for f in dict.fromkeys(fields) if f in h]
        for f in gone:
            del h[f]
        if not h:
            self._drop(key)
        return len(gone)

    def _zadd(self, key, mapping):
        self._want(key, "z")
        if key not in self.data:
            self.data[key] = ("z", {})
            self.expiry.pop(key, None)
        z = self.data[key][1]
        new = sum(1 for m in mapping if m not in z)
        z.update({m: float(s) for m, s in mapping.items()})
        return new

    def _zrem(self, key, members):
        self._want(key, "z")
        if key not in self.data:
            return 0
        z = self.data[key][1]
        gone = [m for m in dict.fromkeys(members) if m in z]
        for m in gone:
            del z[m]
        if not z:
            self._drop(key)
        return len(gone)

    def _validate(self, ops):
        """Both backends check the ops against the key *types* a commit
        goes through (delete -> none, set -> string, a non-empty hset/zadd ->
        hash/zset; hdel/zrem keep the type) before applying any."""
        kinds = {}
        for kind, key, *_ in ops:
            cur = kinds[key] if key in kinds else self.kind(key)
            if kind == "delete":
                kinds[key] = None
            elif kind == "set":
                kinds[key] = "s"
            else:
                want = "h" if kind in ("hset", "hdel") else "z"
                if cur is not None and cur != want:
                    raise WrongType(key)
                if kind in ("hset", "zadd"):
                    kinds[key] = want

    def apply(self, call, n, t):
        """Apply call ``n`` issued at ``t``; return its result or raise WrongType."""
        c = call["c"]
        if c in ("commit", "commit_now"):
            for key, value in (call.get("expect") or {}).items():
                k = self.kind(key)
                if k is not None and k != "s":
                    raise WrongType(key)
                if (self.data[key][1] if k else None) != value:
                    return False
            self._validate(call["ops"])
            for kind, key, *args in call["ops"]:
                if kind == "set":
                    self._set(key, args[0], args[1], t)
                elif kind == "delete":
                    self._drop(key)
                elif kind == "hset":
                    self._hset(key, args[0])
                elif kind == "hdel":
                    self._hdel(key, args[0])
                elif kind == "zadd":
                    self._zadd(key, args[0])
                else:
                    self._zrem(key, args[0])
            return True
        if c == "set":
            self._set(call["key"], call["value"], call["ttl"], t)
            return None
        if c == "delete":
            existing = [k for k in dict.fromkeys(call["keys"]) if k in self.data]
            for k in existing:
                self._drop(k)
            return len(existing)
        if c == "expire":
            key = call["key"]
            if key not in self.data:
                return False
            if key.startswith("exp:"):
                self._drop(key)
            else:
                self.expiry[key] = t + call["ttl"]
            return True
        if c == "hset":
            return self._hset(call["key"], call["mapping"])
        if c == "hdel":
            return self._hdel(call["key"], call["fields"])
        if c == "zadd":
            return self._zadd(call["key"], call["mapping"])
        if c == "zrem":
            return self._zrem(call["key"], call["members"])
        if c == "cas":
            key, expected, new = call["key"], call["expected"], call["new"]
            k = self.kind(key)
            if k is not None and k != "s":
                raise WrongType(key)
            if (self.data[key][1] if k else None) != expected:
                return False
            if new is None:
                if expected is not None:
                    self._drop(key)
                return True
            self._set(key, new, call["ttl"], t)
            return True
        raise ValueError(f"unknown call {c!r}")


def call_checked(call) -> bool:
    """Is the call's result independent of time (no exp: keys involved)?"""
    keys = call.get("keys") or [call.get("key")] + [o[1] for o in call.get("ops", [])]
    return not any(k and k.startswith("exp:") for k in keys)


def matches(model: Model, state: dict) -> str | None:
    """None if the dumped store ``state`` equals ``model``, else the first difference."""
    data, expiry = state["data"], state["expiry"]
    if set(data) != set(model.data):
        extra = sorted(set(data) - set(model.data))
        missing = sorted(set(model.data) - set(data))
        return f"keys differ: extra {extra}, missing {missing}"
    for key in sorted(data):
        if data[key] != model.data[key]:
            return f"{key}: store {data[key]!r}, model {model.data[key]!r}"
        e, m = expiry.get(key), model.expiry.get(key)
        if (e is None) != (m is None):
            return f"{key}: expiry store {e!r}, model {m!r}"
        if e is not None and not (-1e-6 <= e - m <= EXPIRY_SLACK_S):
            return f"{key}: expiry store {e!r}, model {m!r} (off by {e - m:.3f} s)"
    return None


def digest(state: dict) -> str:
    blob = json.dumps([sorted((k, v[0], sorted(v[1].items()) if v[0] != "s" else v[1])
                              for k, v in state["data"].items())], ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------
# reading a store
# ----------------------------------------------------------------------
def dump_store(store) -> dict:
    """Everything a started store holds, through its public reads (the
    absolute expiry comes from ``_expiry``: ``ttl()`` is relative)."""
    from appliance.store.interface import StoreError

    def now(d):
        out = []
        d.addBoth(out.append)
        if not out:
            raise RuntimeError("a read did not answer at once")
        if hasattr(out[0], "raiseException"):
            out[0].raiseException()
        return out[0]

    keys, cursor = [], None
    while True:
        cursor, page = now(store.scan("", cursor, 100))
        keys.extend(page)
        if cursor is None:
            break
    data = {}
    for key in keys:
        try:
            v = store.get_now(key)
            data[key] = ("s", v)
            continue
        except StoreError:
            pass
        try:
            data[key] = ("h", store.hgetall_now(key))
            continue
        except StoreError:
            pass
        data[key] = ("z", dict(now(store.zrangebyscore(key, -math.inf, math.inf))))
    if len(set(keys)) != len(keys):
        raise AssertionError(f"scan returned a key twice: {sorted(keys)}")
    expiry = {k: store._expiry[k] for k in data if k in store._expiry}
    return {"data": data, "expiry": expiry}


def open_and_dump(state_dir, fsync="always") -> dict:
    """Open ``state_dir`` with a fresh store (this process, writer work
    inline, the clock at the real time), dump it and close it."""
    from twisted.internet import defer
    from twisted.internet.task import Clock

    from appliance.store.embedded import EmbeddedStore

    clock = Clock()
    clock.advance(time.time())
    store = EmbeddedStore(clock, state_dir=state_dir, fsync=fsync, turn_batching=False,
                          run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    out = []
    store.startService().addBoth(out.append)
    if not out or hasattr(out[0], "raiseException"):
        raise AssertionError(f"the store does not open after the crash: "
                             f"{out[0].getErrorMessage() if out else 'no answer'}; "
                             f"describe: {store.describe()}")
    try:
        return dump_store(store)
    finally:
        store.stopService()


# ----------------------------------------------------------------------
# the child
# ----------------------------------------------------------------------
class Generator:
    """Random calls from ``rng``, mostly valid for the current key types."""

    def __init__(self, rng: random.Random, model: Model):
        self.rng, self.model = rng, model

    def value(self):
        r = self.rng.random()
        if r < 0.05:
            return ""
        if r < 0.12:
            return "ünï€😀-" + str(self.rng.randrange(1000))
        if r < 0.15:
            return "nul\x00" + str(self.rng.randrange(100))
        if r < 0.18:
            return "L" * self.rng.randrange(200, 3000)
        return f"v{self.rng.randrange(10**6)}"

    def score(self):
        r = self.rng.random()
        if r < 0.03:
            return math.inf
        if r < 0.06:
            return -math.inf
        if r < 0.5:
            return float(self.rng.randrange(-5, 20))
        return self.rng.uniform(-1e6, 1e6)

    def fields(self, k=None):
        return self.rng.sample(FIELDS, k or self.rng.randint(1, 3))

    def op(self, kinds, n, valid=True):
        """One op for a commit; ``kinds`` is the type simulation so far."""
        rng = self.rng
        if rng.random() < 0.08:
            key = rng.choice(EXP_KEYS)
            r = rng.random()
            if r < 0.4:
                return ["set", key, self.value(), long_ttl(n)]
            if r < 0.8:
                return ["set", key, self.value(), TINY_TTL]
            return ["delete", key]
        key = rng.choice(MAIN_KEYS)
        cur = kinds[key] if key in kinds else self.model.kind(key)
        choices = ["set", "delete"]
        choices += ["hset", "hdel"] if cur in (None, "h") or not valid else []
        choices += ["zadd", "zrem"] if cur in (None, "z") or not valid else []
        if valid and cur in ("s", "h", "z") and rng.random() < 0.3:
            choices = ["set", "delete"]          # type changes
        kind = rng.choice(choices)
        if kind == "set":
            kinds[key] = "s"
            return ["set", key, self.value(), long_ttl(n) if rng.random() < 0.2 else None]
        if kind == "delete":
            kinds[key] = None
            return ["delete", key]
        if kind == "hset":
            kinds[key] = "h"
            return ["hset", key, {f: self.value() for f in self.fields()}]
        if kind == "hdel":
            return ["hdel", key, self.fields()]
        if kind == "zadd":
            kinds[key] = "z"
            return ["zadd", key, {m: self.score() for m in rng.sample(MEMBERS, rng.randint(1, 4))}]
        return ["zrem", key, rng.sample(MEMBERS, rng.randint(1, 3))]

    def commit(self, n, c="commit"):
        rng = self.rng
        kinds: dict = {}
        ops = []
        for _ in range(rng.randint(1, 6)):
            r = rng.random()
            key = rng.choice(MAIN_KEYS)
            cur = kinds[key] if key in kinds else self.model.kind(key)
            if r < 0.1 and cur is not None:
                # a type change inside one commit: delete + the other container
                kinds[key] = None
                ops.append(["delete", key])
                if cur == "h":
                    kinds[key] = "z"
                    ops.append(["zadd", key, {rng.choice(MEMBERS): self.score()}])
                else:
                    kinds[key] = "h"
                    ops.append(["hset", key, {rng.choice(FIELDS): self.value()}])
                continue
            ops.append(self.op(kinds, n, valid=rng.random() > 0.03))
        call = {"c": c, "ops": ops}
        if rng.random() < 0.2:
            expect = {}
            for key in rng.sample(MAIN_KEYS, rng.randint(1, 2)):
                k = self.model.kind(key)
                if k not in (None, "s"):
                    continue
                cur = self.model.data[key][1] if k else None
                expect[key] = cur if rng.random() < 0.8 else "not-" + str(cur)
            if expect:
                call["expect"] = expect
        return call

    def call(self, n):
        rng = self.rng
        r = rng.random()
        key = rng.choice(MAIN_KEYS)
        kind = self.model.kind(key)
        if r < 0.45:
            return self.commit(n)
        if r < 0.50:
            return self.commit(n, "commit_now")
        if r < 0.58:
            return {"c": "set", "key": key, "value": self.value(),
                    "ttl": long_ttl(n) if rng.random() < 0.2 else None}
        if r < 0.62:
            if rng.random() < 0.5:
                k = rng.choice(EXP_KEYS)
                return {"c": "set", "key": k, "value": self.value(),
                        "ttl": long_ttl(n) if rng.random() < 0.5 else TINY_TTL}
            return {"c": "expire", "key": rng.choice(EXP_KEYS), "ttl": TINY_TTL}
        if r < 0.66:
            return {"c": "delete", "keys": rng.sample(MAIN_KEYS, rng.randint(1, 3))}
        if r < 0.73:
            return {"c": "hset", "key": key, "mapping": {f: self.value() for f in self.fields()}}
        if r < 0.77:
            return {"c": "hdel", "key": key, "fields": self.fields()}
        if r < 0.84:
            return {"c": "zadd", "key": key,
                    "mapping": {m: self.score() for m in rng.sample(MEMBERS, rng.randint(1, 4))}}
        if r < 0.88:
            return {"c": "zrem", "key": key, "members": rng.sample(MEMBERS, rng.randint(1, 3))}
        if r < 0.93:
            return {"c": "expire", "key": key, "ttl": long_ttl(n)}
        cur = self.model.data[key][1] if kind == "s" else None
        expected = cur if rng.random() < 0.8 else "other"
        new = None if rng.random() < 0.2 else self.value()
        return {"c": "cas", "key": key, "expected": expected, "new": new,
                "ttl": long_ttl(n) if new is not None and rng.random() < 0.3 else None}


def _ops(call):
    from appliance.store.interface import Op

    out = []
    for kind, key, *args in call["ops"]:
        if kind == "set":
            out.append(Op.set(key, args[0], ttl_s=args[1]))
        elif kind == "delete":
            out.append(Op.delete(key))
        elif kind == "hset":
            out.append(Op.hset(key, args[0]))
        elif kind == "hdel":
            out.append(Op.hdel(key, args[0]))
        elif kind == "zadd":
            out.append(Op.zadd(key, args[0]))
        else:
            out.append(Op.zrem(key, args[0]))
    return out


def issue(store, call):
    """Issue ``call`` on ``store``; return its Deferred."""
    from twisted.internet import defer

    c = call["c"]
    if c == "commit":
        return store.commit(_ops(call), call.get("expect"))
    if c == "commit_now":
        try:
            ok = store.commit_now(_ops(call), call.get("expect"))
        except Exception:
            return defer.fail()
        return store.durable().addCallback(lambda _: ok)
    if c == "set":
        return store.set(call["key"], call["value"], call["ttl"])
    if c == "delete":
        return store.delete(*call["keys"])
    if c == "expire":
        return store.expire(call["key"], call["ttl"])
    if c == "hset":
        return store.hset(call["key"], call["mapping"])
    if c == "hdel":
        return store.hdel(call["key"], *call["fields"])
    if c == "zadd":
        return store.zadd(call["key"], call["mapping"])
    if c == "zrem":
        return store.zrem(call["key"], *call["members"])
    if c == "cas":
        return store.cas(call["key"], call["expected"], call["new"], call["ttl"])
    raise ValueError(c)


def child_main(reactor, state_dir, fsync, seed, max_calls=100000):
    """Run random calls until killed (or ``max_calls``, then idle)."""
    from twisted.internet import defer

    from appliance.store.embedded import EmbeddedStore
    from appliance.store.interface import StoreDown

    out = sys.stdout

    def emit(line):
        out.write(line + "\n")
        out.flush()

    rng = random.Random(seed)
    store = EmbeddedStore(reactor, state_dir=state_dir, fsync=fsync, batch_interval_s=0.02)
    done = defer.Deferred()
    state = {"n": 0, "inflight": 0, "scheduled": False, "recovering": False}

    def check_mirror(call, model):
        keys = call.get("keys") or [call.get("key")] + [o[1] for o in call.get("ops", [])]
        for key in keys:
            if not key or key.startswith("exp:"):
                continue
            got = dump_one(store, key)
            want = model.data.get(key)
            if got != want:
                emit(f"BAD after {state['n']}: {key} store {got!r} model {want!r}")

    def pump():
        state["scheduled"] = False
        while state["inflight"] < MAX_INFLIGHT and state["n"] < max_calls:
            n = state["n"] = state["n"] + 1
            call = gen.call(n)
            t = reactor.seconds()
            emit(f"ISSUED {n} {t!r} {json.dumps(call)}")
            state["inflight"] += 1
            try:
                model.apply(call, n, t)
            except WrongType:
                pass
            d = issue(store, call)
            d.addCallbacks(acked, failed, callbackArgs=(n,), errbackArgs=(n,))
            if state["recovering"]:
                return                       # one refused call per recovery attempt
            if call_checked(call) and rng.random() < 0.3 and store.healthy:
                check_mirror(call, model)
            if rng.random() < 0.3:
                break                        # the rest in a later reactor turn
        schedule()

    def schedule():
        if not state["scheduled"] and state["n"] < max_calls:
            state["scheduled"] = True
            r = rng.random()
            reactor.callLater(0 if r < 0.7 else rng.uniform(0, 0.003), pump)

    def acked(result, n):
        state["inflight"] -= 1
        emit(f"ACK {n} {json.dumps(result)}")
        if rng.random() < 0.2:
            pump() if not state["scheduled"] else None
        else:
            schedule()

    def failed(f, n):
        state["inflight"] -= 1
        kind = type(f.value).__name__
        emit(f"ERR {n} {kind} {f.getErrorMessage()!r}")
        if f.check(StoreDown) and not state["recovering"]:
            state["recovering"] = True
            reactor.callLater(rng.uniform(0.005, 0.03), recover)
        if not state["recovering"]:
            schedule()

    def recover():
        """After a StoreDown: recheck until healthy, then take the reloaded
        state as the model (the test checks it is exactly the acknowledged
        calls) and go on."""
        def done(desc):
            if not store.healthy:
                if state["n"] < max_calls and rng.random() < 0.5:
                    pump()                   # a call while down: refused at once
                reactor.callLater(rng.uniform(0.002, 0.02), recover)
                return
            state["recovering"] = False
            loaded = dump_store(store)
            model.__init__(loaded["data"], loaded["expiry"])
            emit(f"RECOVERED {digest(loaded)}")
            schedule()
        store.recheck().addCallback(done).addErrback(
            lambda f: emit(f"BAD recheck failed: {f.getErrorMessage()!r}"))

    def started(_):
        loaded = dump_store(store)
        model.__init__(loaded["data"], loaded["expiry"])
        emit(f"READY {digest(loaded)}")
        pump()

    model = Model()
    gen = Generator(rng, model)         # generates from the model the calls update
    d = store.startService()
    d.addCallback(started)
    d.addErrback(lambda f: (emit(f"FAILED start {f.getErrorMessage()!r}"), done.errback(f)))
    return done


def dump_one(store, key):
    from appliance.store.interface import StoreError

    try:
        v = store.get_now(key)
        return None if v is None else ("s", v)
    except StoreError:
        pass
    try:
        return ("h", store.hgetall_now(key))
    except StoreError:
        pass
    out = []
    store.zrangebyscore(key, -math.inf, math.inf).addBoth(out.append)
    return ("z", dict(out[0]))


def inject_fault(fault: str | None) -> None:
    """Break the store on purpose (the harness's self-test: it must notice).

    ``early_ack``: writes are acknowledged before their transaction commits;
    ``torn``: a batch is committed as two transactions; ``io_error``: a
    commit fails now and then (a disk error; the store must recover and this
    must pass); ``io_error_keep_waiters``: and the failure leaves the queued
    writes waiting (the old store's H3), to be acknowledged later."""
    if not fault:
        return
    from appliance.store import embedded, sqlite_file

    if fault == "early_ack":
        orig_kick = embedded.EmbeddedStore._kick

        def kick(self):
            waiters = self._take_waiters()
            orig_kick(self)
            for w in waiters:
                w.callback(None)
        embedded.EmbeddedStore._kick = kick
        orig_apply = sqlite_file.SQLiteFile.apply

        def slow_apply(self, batch):
            time.sleep(0.003)
            return orig_apply(self, batch)
        sqlite_file.SQLiteFile.apply = slow_apply
    elif fault == "torn":
        orig_apply = sqlite_file.SQLiteFile.apply

        def torn_apply(self, batch):
            first, second = sqlite_file.Batch(), sqlite_file.Batch()
            for name in ("drop", "keys", "expires", "hset", "hdel", "zadd", "zdel"):
                rows = getattr(batch, name)
                getattr(first, name).extend(rows[:len(rows) // 2])
                getattr(second, name).extend(rows[len(rows) // 2:])
            t = orig_apply(self, first)
            time.sleep(0.002)
            return t + orig_apply(self, second)
        sqlite_file.SQLiteFile.apply = torn_apply
    elif fault in ("io_error", "io_error_keep_waiters"):
        import sqlite3
        rng = random.Random()
        p = float(os.environ.get("STORE_CRASHER_IO_P", "0.05"))
        orig_apply, orig_probe = sqlite_file.SQLiteFile.apply, sqlite_file.SQLiteFile.probe

        def failing_apply(self, batch):
            if rng.random() < p:
                raise sqlite3.OperationalError("disk I/O error (injected)")
            return orig_apply(self, batch)

        def failing_probe(self, *args, **kw):
            if rng.random() < 0.3:
                raise sqlite3.OperationalError("disk I/O error (injected, probe)")
            return orig_probe(self, *args, **kw)
        sqlite_file.SQLiteFile.apply = failing_apply
        sqlite_file.SQLiteFile.probe = failing_probe
        if fault == "io_error_keep_waiters":
            # the old store's H3: a failure leaves the queued writes waiting,
            # and a later empty commit acknowledges them
            def fail(self, reason):
                self._failed = reason
                self.stats["failures"] += 1
                self._schedule_retry()
            embedded.EmbeddedStore._fail = fail
    else:
        raise ValueError(f"unknown fault {fault!r}")


def run_child(argv):
    from twisted.internet import task

    inject_fault(os.environ.get("STORE_CRASHER_FAULT"))

    state_dir, fsync, seed = argv[0], argv[1], int(argv[2])
    max_calls = int(argv[3]) if len(argv) > 3 else 100000
    task.react(lambda reactor: child_main(reactor, state_dir, fsync, seed, max_calls))


# ----------------------------------------------------------------------
# the zygote
# ----------------------------------------------------------------------
def serve():
    """Read ``RUN <json>`` lines on stdin; for each, fork a child, wait for
    READY, let it run ``delay_ms``, SIGKILL it, write its output to
    ``transcript`` and answer ``DONE <json>`` on stdout."""
    import sqlite3  # noqa: F401  (imported once here, not in every child)

    import twisted.internet.defer  # noqa: F401
    import twisted.internet.epollreactor  # noqa: F401
    import twisted.internet.task  # noqa: F401
    import twisted.internet.threads  # noqa: F401

    import appliance.store.embedded  # noqa: F401
    assert "twisted.internet.reactor" not in sys.modules
    sys.stdout.write("SERVING\n")
    sys.stdout.flush()
    for line in sys.stdin:
        if not line.startswith("RUN "):
            continue
        req = json.loads(line[4:])
        reply = run_forked(req)
        sys.stdout.write("DONE " + json.dumps(reply) + "\n")
        sys.stdout.flush()


def run_forked(req) -> dict:
    r, w = os.pipe()
    err = os.open(req["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pid = os.fork()
    if pid == 0:                                          # the child
        code = 70
        try:
            os.close(r)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(w, 1)
            os.dup2(err, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            if req.get("fault"):
                os.environ["STORE_CRASHER_FAULT"] = req["fault"]
            from twisted.internet import epollreactor
            epollreactor.install()
            run_child([req["state_dir"], req["fsync"], str(req["seed"])])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    os.close(err)
    buf = bytearray()
    t0 = time.monotonic()
    ready_at = None
    deadline = t0 + 30.0
    # early_ms: kill that long after the fork, READY or not (a crash while
    # the store opens: WAL recovery, the load, the first expiry deletions)
    kill_at = t0 + req["early_ms"] / 1000.0 if req.get("early_ms") is not None else None
    eof = False
    while not eof:
        now = time.monotonic()
        if ready_at is None and b"READY" in buf:
            ready_at = now
            if req.get("early_ms") is None:
                kill_at = now + req["delay_ms"] / 1000.0
        limit = kill_at if kill_at is not None else deadline
        if now >= limit:
            break
        rl, _, _ = select.select([r], [], [], max(0.0, limit - now))
        if rl:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                eof = True
            buf += chunk
    exited_before_kill = eof
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    killed_at = time.monotonic()
    while True:
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    Path(req["transcript"]).write_bytes(bytes(buf))
    return {"ready": ready_at is not None, "exited_before_kill": exited_before_kill,
            "status": status, "start_ms": ((ready_at or killed_at) - t0) * 1e3,
            "ran_ms": (killed_at - (ready_at or killed_at)) * 1e3}


class Zygote:
    """The test's handle on a ``--serve`` process."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.store_crasher", "--serve"], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        if line.strip() != "SERVING":
            raise RuntimeError(f"store_crasher --serve did not start: {line!r}")

    def run(self, **req) -> dict:
        self.proc.stdin.write("RUN " + json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("DONE "):
            raise RuntimeError(f"store_crasher --serve: {line!r}")
        return json.loads(line[5:])

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------
# the check
# ----------------------------------------------------------------------
class CrashCheckFailed(AssertionError):
    pass


def parse_transcript(text: str) -> dict:
    """The child's lines, plus its outages (StoreDown .. RECOVERED): the
    calls issued from the first one that failed with StoreDown until the
    store recovered are *tainted* (none may be acknowledged; their errors
    were decided on a mirror holding writes that were then thrown away)."""
    t = {"ready": None, "issued": {}, "acks": {}, "errs": {}, "bad": [], "ack_order": [],
         "tainted": set(), "recoveries": []}
    lines = text.split("\n")
    if lines and lines[-1] != "":
        lines = lines[:-1]          # the last line was cut by the kill: never issued
    since, down = [], None          # calls issued since the last recovery; first StoreDown
    for line in lines:
        if not line:
            continue
        word, _, rest = line.partition(" ")
        if word == "READY":
            t["ready"] = rest
        elif word == "ISSUED":
            n, when, call = rest.split(" ", 2)
            t["issued"][int(n)] = (float(when), json.loads(call))
            since.append(int(n))
        elif word == "ACK":
            n, result = rest.split(" ", 1)
            t["acks"][int(n)] = json.loads(result)
            t["ack_order"].append(int(n))
        elif word == "ERR":
            n, what = rest.split(" ", 1)
            t["errs"][int(n)] = what
            if what.startswith("StoreDown"):
                down = int(n) if down is None else min(down, int(n))
        elif word == "RECOVERED":
            if down is not None:
                t["tainted"].update(m for m in since if m >= down)
            t["recoveries"].append((max(since, default=0), rest))
            since, down = [], None
        else:
            t["bad"].append(line)
    if down is not None:
        t["tainted"].update(m for m in since if m >= down)
    return t


def _replay(model: Model, n: int, call, t: float, tr: dict):
    """Apply call ``n`` unless it failed; return (model, result, error)."""
    if n in tr["errs"] and (n in tr["tainted"] or tr["errs"][n].startswith("StoreDown")):
        return model, None, "skipped"
    before = model.copy()
    try:
        return model, model.apply(call, n, t), None
    except WrongType as e:
        return before, None, f"WRONGTYPE {e}"      # all or nothing


def check_round(initial: dict, transcript: str, after: dict, started: bool = True) -> dict:
    """Raise CrashCheckFailed unless ``after`` (the store dumped after the
    kill) is ``initial`` plus a prefix of the issued calls covering every ack
    (calls that failed with StoreDown left out: a failure throws them away)."""
    tr = parse_transcript(transcript)
    issued, acks, errs = tr["issued"], tr["acks"], tr["errs"]
    problems = []
    if tr["ready"] is None:
        if started or issued:
            problems.append("the child never became READY")
    elif tr["ready"] != digest(initial):
        problems.append(f"the child loaded state {tr['ready']}, the last check saw "
                        f"{digest(initial)}")
    problems += [f"child: {b}" for b in tr["bad"]]
    if tr["ack_order"] != sorted(tr["ack_order"]):
        problems.append(f"acknowledgements out of issue order: {tr['ack_order'][:50]}")
    late = sorted(n for n in acks if n in tr["tainted"])
    if late:
        problems.append(f"calls acknowledged although issued after a failed one "
                        f"(StoreDown): {late[:20]}")
    model = Model(initial["data"], initial["expiry"])
    numbers = sorted(issued)
    if numbers != list(range(1, len(numbers) + 1)):
        problems.append("ISSUED numbers are not 1..n")
    recoveries = dict(tr["recoveries"])
    top = max(acks, default=0)
    best = None
    if top == 0 and matches(model, after) is None:
        best = 0
    for n in numbers:
        t, call = issued[n]
        model, result, error = _replay(model, n, call, t, tr)
        if error == "skipped":
            pass
        elif n in errs:
            if error is None:
                problems.append(f"call {n} failed ({errs[n]}) but the model applies it: {call}")
        elif n in acks:
            if error is not None:
                problems.append(f"call {n} acknowledged ({acks[n]!r}) but the model refuses it "
                                f"({error}): {call}")
            elif call_checked(call) and acks[n] != result:
                problems.append(f"call {n} answered {acks[n]!r}, the model says {result!r}: "
                                f"{call}")
        if n in recoveries:
            got = recoveries[n]
            want = digest({"data": model.data})
            if got != want:
                problems.append(f"after the outage the store reloaded state {got}, but the calls "
                                f"acknowledged before it give {want} (issued up to {n})")
        if n >= top and best is None and matches(model, after) is None:
            best = n
    if best is None:
        model = Model(initial["data"], initial["expiry"])
        diffs = []
        for n in [0] + numbers:
            if n:
                t, call = issued[n]
                model, _, _ = _replay(model, n, call, t, tr)
            if n >= top:
                diffs.append(f"  prefix 1..{n}: {matches(model, after)}")
        problems.append(f"the store after the crash is no prefix 1..k with k >= {top} (highest "
                        f"ack) of the {len(numbers)} issued calls:\n" + "\n".join(diffs[:12]))
    if problems:
        raise CrashCheckFailed("\n".join(problems))
    return {"issued": len(numbers), "acked": len(acks), "top_ack": top, "prefix": best,
            "outages": len(tr["recoveries"]) + (1 if tr["tainted"] and not tr["recoveries"]
                                                 else 0)}


def run_rounds(rounds: int, fsync: str, seed: int, workdir: Path, chain: int = 4,
               zygote: Zygote | None = None, fault: str | None = None) -> dict:
    """Run ``rounds`` kill rounds; raise CrashCheckFailed with a replay line."""
    rng = random.Random(seed)
    own = zygote is None
    zygote = zygote or Zygote()
    stats = {"rounds": 0, "issued": 0, "acked": 0, "unacked_survived": 0, "seconds": 0.0,
             "ran_ms": 0.0, "outages": 0, "killed_while_opening": 0}
    t0 = time.monotonic()
    state_dir = None
    initial = None
    try:
        for i in range(rounds):
            if i % chain == 0:
                if state_dir is not None:
                    shutil.rmtree(state_dir, ignore_errors=True)
                state_dir = workdir / f"state-{i}"
                state_dir.mkdir(parents=True)
                initial = {"data": {}, "expiry": {}}
            round_seed = rng.randrange(2**32)
            r = rng.random()
            delay = rng.uniform(0, 20) if r < 0.1 else (
                rng.uniform(200, 600) if r > 0.9 else rng.uniform(20, 200))
            before = workdir / "before"
            shutil.rmtree(before, ignore_errors=True)
            shutil.copytree(state_dir, before)
            transcript = workdir / "transcript.txt"
            early = rng.uniform(0, 60) if rng.random() < 0.05 else None
            reply = zygote.run(state_dir=str(state_dir), fsync=fsync, seed=round_seed,
                               delay_ms=delay, early_ms=early, transcript=str(transcript),
                               stderr=str(workdir / "stderr.txt"), fault=fault)
            text = transcript.read_text(errors="replace")
            try:
                if reply["exited_before_kill"] or not reply["ready"] and early is None:
                    raise CrashCheckFailed(
                        f"the child did not run until the kill: {reply}; stderr:\n"
                        + (workdir / "stderr.txt").read_text(errors="replace")[-3000:]
                        + "\nstdout tail:\n" + text[-2000:])
                after = open_and_dump(state_dir, fsync)
                res = check_round(initial, text, after, started=reply["ready"])
            except Exception as e:
                keep = workdir / f"failed-round-{i}"
                keep.mkdir(exist_ok=True)
                shutil.copytree(before, keep / "before", dirs_exist_ok=True)
                shutil.copytree(state_dir, keep / "after", dirs_exist_ok=True)
                shutil.copy(transcript, keep / "transcript.txt")
                raise CrashCheckFailed(
                    f"round {i} (fsync={fsync}, fault={fault}, round seed {round_seed}, "
                    f"base seed {seed}, "
                    + (f"kill {early:.0f} ms after the fork" if early is not None
                       else f"kill {delay:.0f} ms after READY") + f") failed:\n{e}\n"
                    f"kept in {keep}\nre-check: python -m tests.support.store_crasher --check "
                    f"{keep}/before {keep}/after {keep}/transcript.txt\n"
                    f"replay the run: STORE_CRASH_SEED={seed} STORE_CRASH_ROUNDS={i + 1} "
                    f"python -m pytest -q tests/integration/test_store_crash.py  (or: python -m "
                    f"tests.support.store_crasher --rounds {i + 1} --fsync {fsync} --seed {seed}"
                    f"{' --fault ' + fault if fault else ''})"
                ) from e
            initial = after
            stats["rounds"] += 1
            stats["issued"] += res["issued"]
            stats["acked"] += res["acked"]
            stats["unacked_survived"] += res["prefix"] - res["top_ack"]
            stats["outages"] += res["outages"]
            stats["killed_while_opening"] += not reply["ready"]
            stats["ran_ms"] += reply["ran_ms"]
    finally:
        if own:
            zygote.close()
    stats["seconds"] = time.monotonic() - t0
    return stats


def main(argv):
    import argparse

    if argv and argv[0] == "--serve":
        serve()
        return 0
    if argv and argv[0] == "--check":
        before, after, transcript = argv[1:4]
        initial = open_and_dump(before) if Path(before, "store.sqlite3").exists() \
            else {"data": {}, "expiry": {}}
        try:
            print(check_round(initial, Path(transcript).read_text(), open_and_dump(after)))
        except CrashCheckFailed as e:
            print(f"FAILED:\n{e}")
            return 1
        return 0
    if argv and argv[0] == "--rounds":
        p = argparse.ArgumentParser()
        p.add_argument("--rounds", type=int, required=True)
        p.add_argument("--fsync", default="always")
        p.add_argument("--seed", type=int, default=random.randrange(2**32))
        p.add_argument("--keep", default=None)
        p.add_argument("--fault", default=None,
                       help="early_ack, torn, io_error_keep_waiters (must be caught), "
                            "io_error (must pass)")
        a = p.parse_args(argv)
        work = Path(a.keep or tempfile.mkdtemp(prefix="store-crash-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"seed {a.seed} fsync {a.fsync} in {work}", flush=True)
        stats = run_rounds(a.rounds, a.fsync, a.seed, work, fault=a.fault)
        print(stats)
        return 0
    run_child(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
