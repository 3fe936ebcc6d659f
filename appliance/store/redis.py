"""The shared store: Redis (or a Sentinel-managed Redis) through txredisapi.

Mapping of the :class:`IStateStore` contract onto Redis:

* Keys are stored as ``<namespace>:<key>``; ``scan`` uses ``SCAN .. MATCH``
  with the caller's prefix glob-escaped and strips the namespace again.
* Every write goes through one Lua script (``EVAL``/``EVALSHA``, one round
  trip).  The script checks the ``expect`` guards, checks the types of all the
  keys a multi-op commit touches *before* writing anything (a Lua error does
  not undo the writes made before it, so this is what makes ``commit`` all or
  nothing), applies the ops and ``PUBLISH``es each change -- the op's name on
  ``<namespace>:__chg__:<key>``.  ``set``, ``hset`` and ``zadd`` always
  publish; ``delete``, ``hdel``, ``zrem`` and ``expire`` only when they
  changed something.
* ``subscribe`` shares ONE subscriber connection that ``PSUBSCRIBE``s
  ``<namespace>:__chg__:<escaped prefix>*`` per distinct prefix, and
  re-subscribes after a reconnect.  Changes made while that connection is
  down are not replayed.  TTL expiry is not notified (Redis does not publish
  on our channels when a key times out; ``expired`` is never delivered by
  this backend).  Pub/sub channels are global to a Redis server, not per
  database: stores sharing a server but using different ``db`` numbers
  should use different namespaces.
* Failing fast: when no connection is up an operation errbacks at once with
  :class:`StoreUnavailable`; a command in flight is bounded by
  ``op_timeout_s``.  txredisapi reconnects by itself (backoff capped at 1 s
  here), after which operations succeed again.
"""

from __future__ import annotations

import itertools
from collections import deque
import math
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, error as ierror
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from appliance.store.interface import IStateStore, ISubscription, Op, StoreError, StoreUnavailable

__all__ = ["RedisStore", "glob_escape", "parse_redis_url"]

# Replies that mean "the server is there but cannot serve right now".
_UNAVAILABLE_REPLIES = ("LOADING", "MASTERDOWN", "READONLY", "BUSY", "TRYAGAIN",
                        "CLUSTERDOWN", "NOREPLICAS", "MISCONF")

_WRITE_SCRIPT = r"""
-- ARGV[1] = length of the key namespace prefix, ARGV[2] = channel prefix,
-- then: nguards, (keyidx, present '0'|'1', value)*, nops,
-- (kind, keyidx, nargs, arg*)*
local nslen = tonumber(ARGV[1])
local chg = ARGV[2]
local i = 3
local types = {}
local function ktype(k)
  local t = types[k]
  if t == nil then
    t = redis.call('TYPE', k)['ok']
    types[k] = t
  end
  return t
end
local function wrongtype(k)
  return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value: '
                           .. string.sub(k, nslen + 1))
end
local ng = tonumber(ARGV[i]); i = i + 1
for g = 1, ng do
  local k = KEYS[tonumber(ARGV[i])]
  local present = ARGV[i + 1] == '1'
  local want = ARGV[i + 2]
  i = i + 3
  local t = ktype(k)
  if t ~= 'string' and t ~= 'none' then return wrongtype(k) end
  local cur = redis.call('GET', k)
  if present then
    if cur ~= want then return {0} end
  elseif cur then
    return {0}
  end
end
local nops = tonumber(ARGV[i]); i = i + 1
local ops = {}
for o = 1, nops do
  local n = tonumber(ARGV[i + 2])
  ops[o] = {ARGV[i], KEYS[tonumber(ARGV[i + 1])], i + 3, n}
  i = i + 3 + n
end
if nops > 1 then
  local sim = {}
  for o = 1, nops do
    local kind, k = ops[o][1], ops[o][2]
    local t = sim[k]
    if t == nil then t = ktype(k) end
    if kind == 'set' then
      sim[k] = 'string'
    elseif kind == 'delete' then
      sim[k] = 'none'
    elseif kind == 'hset' or kind == 'hdel' then
      if t ~= 'hash' and t ~= 'none' then return wrongtype(k) end
      if kind == 'hset' and ops[o][4] > 0 then sim[k] = 'hash' else sim[k] = t end
    elseif kind == 'zadd' or kind == 'zrem' then
      if t ~= 'zset' and t ~= 'none' then return wrongtype(k) end
      if kind == 'zadd' and ops[o][4] > 0 then sim[k] = 'zset' else sim[k] = t end
    elseif kind == 'expire' then
      sim[k] = t
    else
      return redis.error_reply('ERR unknown store op ' .. kind)
    end
  end
end
local function chunked(cmd, k, s, n)
  local total, j = 0, 0
  while j < n do
    local m = math.min(1000, n - j)
    total = total + redis.call(cmd, k, unpack(ARGV, s + j, s + j + m - 1))
    j = j + m
  end
  return total
end
local out = {1}
for o = 1, nops do
  local kind, k, s, n = ops[o][1], ops[o][2], ops[o][3], ops[o][4]
  local r, pub = 0, false
  if kind == 'set' then
    if ARGV[s + 1] ~= '' then
      redis.call('SET', k, ARGV[s], 'PX', ARGV[s + 1])
    else
      redis.call('SET', k, ARGV[s])
    end
    r, pub = 1, true
  elseif kind == 'delete' then
    r = redis.call('DEL', k); pub = r > 0
  elseif kind == 'expire' then
    r = redis.call('PEXPIRE', k, ARGV[s]); pub = r > 0
  elseif n > 0 then
    if kind == 'hset' then
      r = chunked('HSET', k, s, n); pub = true
    elseif kind == 'hdel' then
      r = chunked('HDEL', k, s, n); pub = r > 0
    elseif kind == 'zadd' then
      r = chunked('ZADD', k, s, n); pub = true
    elseif kind == 'zrem' then
      r = chunked('ZREM', k, s, n); pub = r > 0
    end
  end
  if pub then redis.call('PUBLISH', chg .. string.sub(k, nslen + 1), kind) end
  out[o + 1] = r
end
return out
"""


# The hot path: one plain SET (+ PUBLISH).  KEYS[1] = key; ARGV = value, px or '', channel
_SET_SCRIPT = r"""
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', ARGV[3], 'set')
return 1
"""


class _Script:
    """A Lua script run with EVALSHA, falling back to EVAL when the server lacks it."""

    def __init__(self, source: str):
        import hashlib

        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


_WRITE = _Script(_WRITE_SCRIPT)
_SET = _Script(_SET_SCRIPT)


def glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so ``text`` matches literally."""
    out = []
    for ch in text:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def parse_redis_url(url: str) -> dict[str, Any]:
    """``redis://[[user]:password@]host[:port][/db]`` or ``unix:///path?db=N&password=P``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    query = parse_qs(parts.query)
    info: dict[str, Any] = {"username": None, "password": None, "db": 0}
    if parts.username:
        info["username"] = unquote(parts.username)
    if parts.password is not None:
        info["password"] = unquote(parts.password)
    if scheme == "redis":
        info["host"] = parts.hostname or "127.0.0.1"
        try:
            info["port"] = parts.port or 6379
        except ValueError as e:
            raise ValueError(f"bad redis url {mask_url(url)!r}: {e}") from None
        path = parts.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValueError(f"bad redis url {mask_url(url)!r}: db must be a number")
            info["db"] = int(path)
    elif scheme in ("unix", "redis+unix"):
        if not parts.path:
            raise ValueError(f"bad redis url {mask_url(url)!r}: no socket path")
        info["path"] = parts.path
    else:
        raise ValueError(f"bad redis url {mask_url(url)!r}: scheme must be redis:// or unix://")
    if "db" in query:
        try:
            info["db"] = int(query["db"][0])
        except ValueError:
            raise ValueError(f"bad redis url {mask_url(url)!r}: db must be a number") from None
    if "password" in query:
        info["password"] = query["password"][0]
    return info


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        if parts.password is None and "password=" not in parts.query:
            return url
        netloc = parts.netloc
        if "@" in netloc:
            cred, host = netloc.rsplit("@", 1)
            user = cred.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in cred else f"{cred}@{host}"
        query = parts.query
        if "password=" in query:
            query = "&".join("password=***" if q.startswith("password=") else q
                             for q in query.split("&"))
        out = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
        scheme = parts.scheme + "://"
        if url.startswith(scheme) and not out.startswith(scheme):   # unix:///path
            out = scheme + out[len(parts.scheme) + 1:]
        return out
    except Exception:
        return "<unparsable url>"


def _check_str(*values):
    for v in values:
        if not isinstance(v, str):
            raise StoreError(f"keys, fields and values must be str, not {type(v).__name__}")


def _px(ttl_s) -> str:
    try:
        ttl = float(ttl_s)
    except (TypeError, ValueError):
        raise StoreError(f"ttl_s must be a number, not {ttl_s!r}") from None
    if not ttl > 0 or math.isinf(ttl):
        raise StoreError("ttl_s must be positive")
    return str(max(1, int(round(ttl * 1000))))


def _score(value) -> str:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"score must be a number, not {value!r}") from None
    if math.isnan(score):
        raise StoreError("score must not be NaN")
    return repr(score)


# ----------------------------------------------------------------------
# txredisapi plumbing
# ----------------------------------------------------------------------
class _Proto(txredisapi.RedisProtocol):
    def connectionLost(self, why):
        store = getattr(self.factory, "store", None)
        if store is not None and self._ready:
            store._lost_reason = why.getErrorMessage()
        super().connectionLost(why)


class _SentinelProto(txredisapi.SentinelRedisProtocol):
    def connectionLost(self, why):
        store = getattr(self.factory, "store", None)
        if store is not None and self._ready:
            store._lost_reason = why.getErrorMessage()
        super().connectionLost(why)


class _SubProto(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.store._on_message(pattern, channel, message)


class _SentinelSubProto(txredisapi.SubscriberProtocol, txredisapi.SentinelRedisProtocol):
    """A subscriber that, like SentinelRedisProtocol, only stays on a master."""

    def messageReceived(self, pattern, channel, message):
        self.factory.store._on_message(pattern, channel, message)


class _Hooks:
    """Tell the store when a pool connection becomes usable or goes away."""

    initialDelay = 0.2
    maxDelay = 1.0
    store: "RedisStore" = None  # type: ignore[assignment]
    subscriber = False

    def addConnection(self, conn):
        super().addConnection(conn)
        if conn in self.pool and self.store is not None:
            self.store._conn_up(self, conn)

    def delConnection(self, conn):
        super().delConnection(conn)
        if self.store is not None:
            self.store._conn_down(self, conn)


class _Factory(_Hooks, txredisapi.RedisFactory):
    pass


class _SentinelFactory(_Hooks, txredisapi.SentinelConnectionFactory):
    initialDelay = 0.1


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """Wraps an endpoint to record why connection attempts fail."""

    def __init__(self, inner, store: "RedisStore"):
        self.inner, self.store = inner, store

    def connect(self, factory):
        d = self.inner.connect(factory)

        def failed(f):
            self.store._connect_failed(f)
            return f

        return d.addErrback(failed)


@implementer(ISubscription)
class _Subscription:
    def __init__(self, store: "RedisStore", prefix: str, pattern: str, callback):
        self.store, self.prefix, self.pattern, self.callback = store, prefix, pattern, callback
        self.active = True
        #: fires (with None) once the PSUBSCRIBE is in place on the server;
        #: writes made after that are guaranteed to be notified
        self.ready = defer.Deferred()

    def cancel(self) -> None:
        if self.active:
            self.active = False
            self.store._unsubscribe(self)
            if not self.ready.called:
                self.ready.callback(None)

    def __repr__(self):
        return f"<redis subscription {self.prefix!r} active={self.active}>"


# ----------------------------------------------------------------------
# the store
# ----------------------------------------------------------------------
@implementer(IStateStore)
class RedisStore(Service):
    """:class:`IStateStore` on Redis (see the module docstring).

    ``url``: ``redis://[[user]:password@]host[:port][/db]`` or
    ``unix:///path/redis.sock?db=N[&password=P]`` (default
    ``redis://127.0.0.1:6379/0``).  With ``sentinels`` (``"host:port"``
    strings) and ``master_name`` the master is found through Sentinel and
    re-discovered on every reconnect; ``url`` then only supplies the
    password and db.  ``op_timeout_s`` bounds every command in flight;
    ``connect_timeout_s`` bounds ``startService`` (which never fails: the
    store just starts unhealthy) and each connection attempt.
    ``poolsize`` connections carry the commands; one more carries the
    change feed.  Subscriptions carry a ``ready`` Deferred that fires once
    the server has the PSUBSCRIBE (writes after that are notified).
    """

    backend = "redis"
    name = "store"
    _log = Logger(namespace="appliance.store.redis")

    def __init__(self, reactor, *, url: str | None = None, sentinels: tuple[str, ...] = (),
                 master_name: str | None = None, namespace: str = "appliance",
                 op_timeout_s: float = 2.0, connect_timeout_s: float = 3.0,
                 poolsize: int = 2):
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty string")
        self._reactor = reactor
        self.namespace = namespace
        self.op_timeout_s = float(op_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.poolsize = int(poolsize)
        self._ns = namespace + ":"
        self._chg = namespace + ":__chg__:"
        self.sentinels = tuple(sentinels)
        self.master_name = master_name
        if self.sentinels:
            if not master_name:
                raise ValueError("sentinels need a master_name")
            self._sentinel_addrs = []
            for s in self.sentinels:
                host, sep, port = s.rpartition(":")
                if not sep or not port.isdigit():
                    raise ValueError(f"sentinel address must be host:port, not {s!r}")
                self._sentinel_addrs.append((host.strip("[]") or "127.0.0.1", int(port)))
            info = parse_redis_url(url) if url else {"username": None, "password": None, "db": 0}
            self.url = mask_url(url) if url else None
            self._where = f"master {master_name!r} via sentinels {','.join(self.sentinels)}"
        else:
            url = url or "redis://127.0.0.1:6379/0"
            info = parse_redis_url(url)
            self.url = mask_url(url)
            if "path" in info:
                self._where = f"unix:{info['path']}"
            else:
                host = info["host"]
                self._where = f"[{host}]:{info['port']}" if ":" in host else f"{host}:{info['port']}"
        self._conninfo = info
        self._factory = None
        self._subfactory = None
        self._sentinel = None
        self._rr = itertools.count()
        self._up = False                # last logged state of the command pool
        self._down_logged = False
        self._lost_reason: str | None = None
        self._last_error: str | None = None
        self._down_since: float | None = None
        self._start_waiter: defer.Deferred | None = None
        self._start_timer = None
        self._stopping = False
        # subscriptions
        self._patterns: dict[str, list[_Subscription]] = {}
        self._active_patterns: set[str] = set()
        self._subconn = None
        self._inflight: deque = deque()
        self._sweep_call = None
        self.stats = {"reconnects": 0, "unavailable": 0, "notifications": 0}

    # ------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return bool(self.running and self._factory is not None and self._factory.size > 0)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"backend": "redis", "healthy": self.healthy,
                                "namespace": self.namespace}
        if self.sentinels:
            info["sentinels"] = list(self.sentinels)
            info["master_name"] = self.master_name
            conn = self._pick()
            if conn is not None:
                try:
                    peer = conn.transport.getPeer()
                    info["master"] = f"{peer.host}:{peer.port}"
                except Exception:
                    pass
        else:
            info["url"] = self.url
        info["subscriber_connected"] = self._subconn is not None
        info["subscriptions"] = sum(len(v) for v in self._patterns.values())
        if not self.healthy and self._last_error:
            info["error"] = self._last_error
        return info

    def startService(self):
        super().startService()
        self._stopping = False
        self._up = self._down_logged = False
        self._down_since = None
        self._start_waiter = d = defer.Deferred()
        self._factory = self._build_factory(subscriber=False)
        self._start_timer = self._reactor.callLater(self.connect_timeout_s, self._start_timed_out)
        if self._patterns:
            self._start_subscriber()
        return d

    def _start_timed_out(self):
        self._start_timer = None
        if self._start_waiter is not None:
            self._log.warn("redis at {where} not reachable within {timeout} s of start "
                           "({reason}); starting unhealthy, will keep reconnecting",
                           where=self._where, timeout=self.connect_timeout_s,
                           reason=self._last_error or "no answer")
            self._down_logged = True
            self._fire_start()

    def _fire_start(self):
        if self._start_timer is not None and self._start_timer.active():
            self._start_timer.cancel()
        self._start_timer = None
        d, self._start_waiter = self._start_waiter, None
        if d is not None:
            d.callback(None)

    def stopService(self):
        super().stopService()
        self._stopping = True
        self._fire_start()
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        self._inflight.clear()      # their connections are closed below: they errback
        ds = []
        for f in (self._factory, self._subfactory):
            if f is not None:
                ds.append(f.disconnect())
        if self._sentinel is not None:
            ds.append(self._sentinel.disconnect())
        self._factory = self._subfactory = self._sentinel = None
        self._subconn = None
        self._active_patterns.clear()
        d = defer.gatherResults(ds, consumeErrors=True)
        d.addTimeout(5, self._reactor)
        d.addErrback(lambda f: self._log.warn("redis store: disconnect incomplete: {e}",
                                              e=f.getErrorMessage()))
        d.addCallback(lambda _: None)
        return d

    def _build_factory(self, subscriber: bool):
        info = self._conninfo
        if self.sentinels:
            if self._sentinel is None:
                self._sentinel = txredisapi.Sentinel(self._sentinel_addrs)
                self._sentinel.discovery_timeout = 1
                for handler in self._sentinel.sentinels:
                    try:
                        handler._factory.maxDelay = 1
                        handler._factory.initialDelay = 0.2
                    except AttributeError:
                        pass
            factory = _SentinelFactory(
                sentinel_manager=self._sentinel, service_name=self.master_name,
                is_master=True, uuid=None, dbid=None if subscriber else info["db"],
                poolsize=1 if subscriber else self.poolsize, isLazy=True,
                charset="utf-8", password=info["password"],
                replyTimeout=None,
                convertNumbers=False, username=info["username"])
            factory.protocol = _SentinelSubProto if subscriber else _SentinelProto
            endpoint = txredisapi._SentinelEndpoint(factory)
        else:
            factory = _Factory(
                None, None if subscriber else info["db"], 1 if subscriber else self.poolsize,
                isLazy=True, charset="utf-8", password=info["password"],
                replyTimeout=None,
                convertNumbers=False, username=info["username"])
            factory.protocol = _SubProto if subscriber else _Proto
            if "path" in info:
                endpoint = UNIXClientEndpoint(self._reactor, info["path"],
                                              timeout=self.connect_timeout_s)
            elif ":" in info["host"] or not info["host"].replace(".", "").isdigit():
                endpoint = HostnameEndpoint(self._reactor, info["host"], info["port"],
                                            timeout=self.connect_timeout_s)
            else:
                endpoint = TCP4ClientEndpoint(self._reactor, info["host"], info["port"],
                                              timeout=self.connect_timeout_s)
        factory.store = self
        factory.subscriber = subscriber
        # errbacks if authentication / SELECT fails (the slot then stops)
        factory.deferred.addErrback(self._factory_error)
        factory.startConnecting(_ReportingEndpoint(endpoint, self))
        return factory

    def _factory_error(self, failure):
        self._last_error = failure.getErrorMessage()
        self._log.error("redis at {where}: {error} (not retrying)", where=self._where,
                        error=self._last_error)
        return None

    # -- connection state -------------------------------------------------
    def _connect_failed(self, failure):
        if failure.check(defer.CancelledError) or self._stopping:
            return
        self._last_error = failure.getErrorMessage()
        if not self._up and not self._down_logged and self._start_waiter is None:
            self._down_logged = True
            self._log.warn("redis at {where} unreachable: {reason}", where=self._where,
                           reason=self._last_error)

    def _conn_up(self, factory, conn):
        if factory is self._subfactory:
            self._subconn = conn
            self._resubscribe(conn)
            return
        if factory is not self._factory:
            return
        if not self._up:
            self._up = True
            if self._down_since is not None:
                self.stats["reconnects"] += 1
                self._log.info("redis at {where} is back after {down:.1f} s "
                               "(was: {reason})", where=self._where,
                               down=self._reactor.seconds() - self._down_since,
                               reason=self._last_error or "unknown")
            else:
                self._log.info("redis at {where} connected", where=self._where)
            self._down_since = None
            self._down_logged = False
            self._last_error = None
        self._fire_start()

    def _conn_down(self, factory, conn):
        if factory is self._subfactory or (self._subconn is conn):
            if self._subconn is conn:
                self._subconn = None
                self._active_patterns.clear()
            return
        if factory is not self._factory or factory.size > 0:
            return
        if self._stopping or not self.running:
            self._up = False
            return
        if self._up:
            self._up = False
            self._down_since = self._reactor.seconds()
            self._last_error = self._lost_reason or "connection lost"
            self._down_logged = True
            self._log.warn("redis at {where} connection down: {reason}; operations fail "
                           "fast until it is back", where=self._where, reason=self._last_error)

    # ------------------------------------------------------------------
    # running commands
    # ------------------------------------------------------------------
    def _pick(self):
        f = self._factory
        if f is None or not f.pool:
            return None
        pool = f.pool
        for _ in range(len(pool)):
            conn = pool[next(self._rr) % len(pool)]
            if conn.connected:
                return conn
        return None

    def _unavailable(self, why: str | None = None) -> StoreUnavailable:
        self.stats["unavailable"] += 1
        if not self.running:
            return StoreUnavailable(f"redis store is not running ({self._where})")
        return StoreUnavailable(f"redis at {self._where} unreachable: "
                                f"{why or self._last_error or 'not connected'}")

    def _translate(self, failure):
        if failure.check(StoreError):
            return failure
        if failure.check(defer.TimeoutError, defer.CancelledError):
            raise self._unavailable(f"no reply within {self.op_timeout_s:g} s")
        if failure.check(txredisapi.ConnectionError, ierror.ConnectionLost,
                         ierror.ConnectionDone, ierror.ConnectError):
            raise self._unavailable(failure.getErrorMessage())
        if failure.check(txredisapi.ResponseError):
            msg = failure.getErrorMessage()
            if msg.split(" ", 1)[0] in _UNAVAILABLE_REPLIES:
                if msg.startswith("READONLY") and self.sentinels:
                    # still talking to a demoted master: reconnect via Sentinel
                    for conn in list(self._factory.pool if self._factory else ()):
                        conn.transport.loseConnection()
                raise self._unavailable(msg)
            raise StoreError(msg)
        if failure.check(txredisapi.RedisError):
            raise StoreError(failure.getErrorMessage())
        return failure

    def _cmd(self, *args):
        """Run one command on a live connection, bounded by ``op_timeout_s``."""
        conn = self._pick()
        if conn is None or not self.running:
            return defer.fail(self._unavailable())
        try:
            d = conn.execute_command(*args)
        except Exception as e:
            return defer.fail(e).addErrback(self._translate)
        d.addErrback(self._translate)
        self._track(d, conn)
        return d

    # -- op timeouts --------------------------------------------------------
    # Equivalent to d.addTimeout(op_timeout_s) on every command, but one
    # deque entry per command instead of a DelayedCall: commands are issued
    # in deadline order, so a single timer at the oldest deadline suffices.
    def _track(self, d, conn):
        self._inflight.append((self._reactor.seconds() + self.op_timeout_s, d, conn))
        if self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(self.op_timeout_s, self._sweep)

    def _sweep(self):
        self._sweep_call = None
        now = self._reactor.seconds()
        q = self._inflight
        stuck = []
        while q:
            deadline, d, conn = q[0]
            if d.called and not d.paused:
                q.popleft()
                continue
            if deadline > now:
                break
            q.popleft()
            if conn not in stuck:
                stuck.append(conn)
            d.cancel()      # -> CancelledError -> StoreUnavailable("no reply within ...")
        for conn in stuck:
            if conn.connected:
                # no answer in time: the server is frozen or the path is broken;
                # drop the connection so the pool reconnects (and health shows it)
                self._lost_reason = f"no reply within {self.op_timeout_s:g} s"
                conn.transport.abortConnection()
        if q and self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(max(0.001, q[0][0] - now), self._sweep)

    def _script(self, script: _Script, keys: list[str], args: list[str]):
        conn = self._pick()
        if conn is None or not self.running:
            return defer.fail(self._unavailable())
        n = len(keys)
        try:
            d = conn.execute_command("EVALSHA", script.sha, n, *keys, *args)
        except Exception as e:
            return defer.fail(e).addErrback(self._translate)

        def noscript(failure):
            if (failure.check(txredisapi.ResponseError)
                    and failure.getErrorMessage().startswith("NOSCRIPT")
                    and conn.connected):
                return conn.execute_command("EVAL", script.source, n, *keys, *args)
            return failure

        d.addErrback(noscript)
        d.addErrback(self._translate)
        self._track(d, conn)
        return d

    def _k(self, key: str) -> str:
        return self._ns + key

    def _write(self, ops: list[tuple[str, str, list[str]]],
               guards: list[tuple[str, str | None]] = ()):
        """Run the write script: ``ops`` = [(kind, key, args)], ``guards`` = [(key, value)].

        Fires with ``None`` if a guard failed, else the list of per-op results.
        """
        keys: list[str] = []
        index: dict[str, int] = {}

        def idx(key):
            full = self._ns + key
            i = index.get(full)
            if i is None:
                keys.append(full)
                i = index[full] = len(keys)
            return str(i)

        argv = [str(len(self._ns)), self._chg, str(len(guards))]
        for key, value in guards:
            argv += [idx(key), "0" if value is None else "1", "" if value is None else value]
        argv.append(str(len(ops)))
        for kind, key, args in ops:
            argv += [kind, idx(key), str(len(args))]
            argv += args
        d = self._script(_WRITE, keys, argv)
        d.addCallback(lambda r: None if int(r[0]) == 0 else [int(x) for x in r[1:]])
        return d

    @staticmethod
    def _guarded(f, *args):
        """Run a synchronous argument check; StoreError -> failed Deferred."""
        try:
            return f(*args)
        except StoreError:
            return defer.fail()
        except Exception as e:
            return defer.fail(StoreError(str(e)))

    # ------------------------------------------------------------------
    # IStateStore: plain keys
    # ------------------------------------------------------------------
    def get(self, key):
        def go():
            _check_str(key)
            return self._cmd("GET", self._k(key))
        return self._guarded(go)

    def set(self, key, value, ttl_s=None):
        def go():
            _check_str(key, value)
            px = "" if ttl_s is None else _px(ttl_s)
            return self._script(_SET, [self._ns + key], [value, px, self._chg + key]).addCallback(
                lambda _: None)
        return self._guarded(go)

    def delete(self, *keys):
        def go():
            _check_str(*keys)
            if not keys:
                return defer.succeed(0)
            return self._write([("delete", k, []) for k in keys]).addCallback(sum)
        return self._guarded(go)

    def expire(self, key, ttl_s):
        def go():
            _check_str(key)
            px = _px(ttl_s)
            return self._write([("expire", key, [px])]).addCallback(lambda r: bool(r[0]))
        return self._guarded(go)

    def ttl(self, key):
        def go():
            _check_str(key)
            return self._cmd("PTTL", self._k(key)).addCallback(
                lambda ms: None if int(ms) < 0 else int(ms) / 1000.0)
        return self._guarded(go)

    # ------------------------------------------------------------------
    # hashes
    # ------------------------------------------------------------------
    def hset(self, key, mapping):
        def go():
            _check_str(key)
            if not mapping:
                raise StoreError("hset needs at least one field")
            args = []
            for f, v in mapping.items():
                _check_str(f, v)
                args += [f, v]
            return self._write([("hset", key, args)]).addCallback(lambda r: r[0])
        return self._guarded(go)

    def hget(self, key, field):
        def go():
            _check_str(key, field)
            return self._cmd("HGET", self._k(key), field)
        return self._guarded(go)

    def hgetall(self, key):
        def go():
            _check_str(key)
            return self._cmd("HGETALL", self._k(key)).addCallback(
                lambda r: dict(zip(r[::2], r[1::2])))
        return self._guarded(go)

    def hdel(self, key, *fields):
        def go():
            _check_str(key, *fields)
            if not fields:
                return defer.succeed(0)
            return self._write([("hdel", key, list(fields))]).addCallback(lambda r: r[0])
        return self._guarded(go)

    # ------------------------------------------------------------------
    # sorted sets
    # ------------------------------------------------------------------
    def zadd(self, key, mapping):
        def go():
            _check_str(key)
            if not mapping:
                raise StoreError("zadd needs at least one member")
            args = []
            for m, s in mapping.items():
                _check_str(m)
                args += [_score(s), m]
            return self._write([("zadd", key, args)]).addCallback(lambda r: r[0])
        return self._guarded(go)

    def zrem(self, key, *members):
        def go():
            _check_str(key, *members)
            if not members:
                return defer.succeed(0)
            return self._write([("zrem", key, list(members))]).addCallback(lambda r: r[0])
        return self._guarded(go)

    def zscore(self, key, member):
        def go():
            _check_str(key, member)
            return self._cmd("ZSCORE", self._k(key), member).addCallback(
                lambda s: None if s is None else float(s))
        return self._guarded(go)

    def zcard(self, key):
        def go():
            _check_str(key)
            return self._cmd("ZCARD", self._k(key)).addCallback(int)
        return self._guarded(go)

    def zrangebyscore(self, key, min_score, max_score, limit=None):
        def go():
            _check_str(key)
            lo, hi = _score(min_score), _score(max_score)
            args = ["ZRANGEBYSCORE", self._k(key), lo, hi, "WITHSCORES"]
            if limit is not None:
                if int(limit) <= 0:
                    # validate the key's type like the real call would
                    return self._cmd("ZCARD", self._k(key)).addCallback(lambda _: [])
                args += ["LIMIT", "0", str(int(limit))]
            return self._cmd(*args).addCallback(
                lambda r: [(m, float(s)) for m, s in zip(r[::2], r[1::2])])
        return self._guarded(go)

    # ------------------------------------------------------------------
    # atomic writes
    # ------------------------------------------------------------------
    def cas(self, key, expected, new, ttl_s=None):
        def go():
            _check_str(key)
            if expected is not None:
                _check_str(expected)
            if new is None:
                op = ("delete", key, [])
            else:
                _check_str(new)
                op = ("set", key, [new, "" if ttl_s is None else _px(ttl_s)])
            return self._write([op], [(key, expected)]).addCallback(lambda r: r is not None)
        return self._guarded(go)

    def commit(self, ops, expect=None):
        def go():
            guards = []
            for key, value in (expect or {}).items():
                _check_str(key)
                if value is not None:
                    _check_str(value)
                guards.append((key, value))
            wire = []
            for o in ops:
                if not isinstance(o, Op) or o.kind not in Op.KINDS:
                    raise StoreError(f"not a store operation: {o!r}")
                _check_str(o.key)
                if o.kind == "set":
                    value, ttl_s = o.args
                    _check_str(value)
                    wire.append(("set", o.key, [value, "" if ttl_s is None else _px(ttl_s)]))
                elif o.kind == "delete":
                    wire.append(("delete", o.key, []))
                elif o.kind == "hset":
                    args = []
                    for f, v in o.args[0]:
                        _check_str(f, v)
                        args += [f, v]
                    wire.append(("hset", o.key, args))
                elif o.kind in ("hdel", "zrem"):
                    _check_str(*o.args[0])
                    wire.append((o.kind, o.key, list(o.args[0])))
                elif o.kind == "zadd":
                    args = []
                    for m, s in o.args[0]:
                        _check_str(m)
                        args += [_score(s), m]
                    wire.append(("zadd", o.key, args))
            return self._write(wire, guards).addCallback(lambda r: r is not None)
        return self._guarded(go)

    # ------------------------------------------------------------------
    # iteration and change feed
    # ------------------------------------------------------------------
    def scan(self, prefix, cursor=None, count=100):
        def go():
            _check_str(prefix)
            if cursor is not None:
                _check_str(cursor)
                if not cursor.isdigit():
                    raise StoreError(f"bad scan cursor {cursor!r}")
            if int(count) < 1:
                raise StoreError("count must be at least 1")
            pattern = glob_escape(self._ns + prefix) + "*"
            d = self._cmd("SCAN", cursor or "0", "MATCH", pattern, "COUNT", str(int(count)))

            def page(reply):
                nxt, keys = reply
                n = len(self._ns)
                out = [k[n:] for k in keys if isinstance(k, str) and k.startswith(self._ns)]
                return (None if str(nxt) == "0" else str(nxt)), out
            return d.addCallback(page)
        return self._guarded(go)

    def subscribe(self, prefix, callback):
        if not isinstance(prefix, str):
            raise StoreError("prefix must be str")
        pattern = glob_escape(self._chg + prefix) + "*"
        sub = _Subscription(self, prefix, pattern, callback)
        subs = self._patterns.setdefault(pattern, [])
        subs.append(sub)
        if pattern in self._active_patterns:
            sub.ready.callback(None)
        elif self.running:
            if self._subfactory is None:
                self._start_subscriber()
            elif self._subconn is not None and len(subs) == 1:
                self._psubscribe(self._subconn, pattern)
        return sub

    def _start_subscriber(self):
        self._subfactory = self._build_factory(subscriber=True)

    def _resubscribe(self, conn):
        self._active_patterns.clear()
        for pattern in list(self._patterns):
            self._psubscribe(conn, pattern)

    def _psubscribe(self, conn, pattern):
        def done(_):
            if conn is not self._subconn:
                return
            subs = self._patterns.get(pattern)
            if subs:
                self._active_patterns.add(pattern)
                for sub in subs:
                    if not sub.ready.called:
                        sub.ready.callback(None)

        def failed(f):
            if f.check(txredisapi.ConnectionError):
                return None     # resubscribed when the connection is back
            self._log.warn("redis psubscribe {pattern} failed: {e}", pattern=pattern,
                           e=f.getErrorMessage())
            if conn.connected:
                conn.transport.loseConnection()   # reconnect and try again
        try:
            d = conn.psubscribe(pattern)
        except Exception:
            return
        d.addCallbacks(done, failed)

    def _unsubscribe(self, sub):
        subs = self._patterns.get(sub.pattern)
        if subs is None:
            return
        try:
            subs.remove(sub)
        except ValueError:
            pass
        if subs:
            return
        del self._patterns[sub.pattern]
        self._active_patterns.discard(sub.pattern)
        conn = self._subconn
        if conn is not None and conn.connected:
            try:
                conn.punsubscribe(sub.pattern).addErrback(lambda f: None)
            except Exception:
                pass

    def _on_message(self, pattern, channel, message):
        subs = self._patterns.get(pattern)
        if not subs or not isinstance(channel, str) or not channel.startswith(self._chg):
            return
        key = channel[len(self._chg):]
        op = message if isinstance(message, str) else str(message)
        self.stats["notifications"] += 1
        for sub in list(subs):
            if not sub.active:
                continue
            try:
                sub.callback(key, op)
            except Exception:
                self._log.failure("store subscriber for {prefix!r} failed on {key}",
                                  prefix=sub.prefix, key=key)

    def ping(self):
        return self._cmd("PING").addCallback(lambda _: True)
