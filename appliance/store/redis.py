"""The shared store: Redis (or a Sentinel-managed Redis) through txredisapi.

Mapping of the :class:`IStateStore` contract onto Redis:

* Keys are stored as ``<namespace>:<key>``; ``scan`` uses ``SCAN .. MATCH``
  with the caller's prefix glob-escaped and strips the namespace again.
* Every write goes through one Lua script (``EVALSHA``, one round trip; the
  scripts are in ``redis_lua.py``).  The script checks the ``expect`` guards,
  checks the types of all the keys a multi-op commit touches *before* writing
  anything (a Lua error does not undo the writes made before it, so this is
  what makes ``commit`` all or nothing), applies the ops and ``PUBLISH``es
  each change -- the op's name on ``<namespace>:__chg__:<key>``.  ``set``,
  ``hset`` and ``zadd`` always publish; ``delete``, ``hdel``, ``zrem`` and
  ``expire`` only when they changed something.

Program order.  Every command -- reads and writes -- goes over ONE
connection, pipelined: a command is written to the socket as soon as it is
issued, without waiting for the replies of the ones before it.  Redis runs
the commands of one connection one at a time in the order they arrive and
answers in that order, and txredisapi fires the Deferreds in reply order.
So ``set(k, "1"); set(k, "2")`` without awaiting leaves ``"2"``, a ``get``
issued after a ``set`` sees it, and the Deferreds fire in issue order (the
interface's ordering guarantee).  A new connection is only used after its
handshake (``SCRIPT LOAD`` of both scripts, the instance check and the
durability probe below), so ``EVALSHA`` never meets a missing script on a
fresh connection; if one does anyway (``SCRIPT FLUSH`` by an operator), the
write fails with :class:`StoreUnavailable` -- it was not applied -- and the
scripts are loaded again; there is no ``EVAL`` fallback, because re-sending
a write after the commands issued behind it would reorder them.

Change feed.  ``subscribe`` shares ONE subscriber connection that
``PSUBSCRIBE``s ``<namespace>:__chg__:<escaped prefix>*`` per distinct prefix.
A subscription's ``ready`` fires once the server has the PSUBSCRIBE (writes
issued after that are notified).  A notification of a write is delivered
only after that write's Deferred fired (if the write came from this store:
notifications are held until every write issued before they arrived has
been answered).  Pub/sub is not replayable: after every re-subscribe except
the first (a reconnect, a Sentinel failover, Redis dropping a slow
subscriber) each subscriber gets ``callback(prefix, RESYNC)`` -- changes may
have been missed, re-read what you cache.  TTL expiry is not notified
(``expired`` is never delivered by this backend).  Pub/sub channels are
global to a Redis server, not per database: stores sharing a server but
using different ``db`` numbers should use different namespaces.

Durability.  A write is acknowledged when Redis answers, which says nothing
about disk: with ``appendonly no`` (Redis' shipped default: RDB snapshots
only) a Redis crash loses every write since the last snapshot, and a
Sentinel failover loses what was not yet replicated.  At every connect the
store reads ``INFO persistence``, ``INFO replication`` and (when allowed)
``CONFIG GET appendfsync``/``save``, shows them in
``describe()["durability"]`` and logs a warning when AOF is off.  With
``min_replicas_acked = n`` every write is followed (on the same connection)
by ``WAIT n replicas_timeout_ms``; when fewer replicas acknowledged in time
the write fails with :class:`StoreUnavailable` -- it may still have been
applied on the master (and be lost or kept by a failover).

Data loss.  At first start the store puts a random id in
``__store_instance__:<namespace>`` (``SET NX``; outside the namespace, so
``scan`` never returns it).  When that key is missing or different after a
reconnect, Redis came back without its data (or another deployment took over
the namespace): the store turns unhealthy, ``describe()["error"]`` says data
loss, writes fail with :class:`StoreDown`, subscribers get ``RESYNC``.  Reads
still work.  :meth:`RedisStore.recheck` (``appliancectl call store.recheck``)
accepts the new state: it re-creates the key and the store is healthy again.
A loss while no store of the deployment is running cannot be told from a
first start.

Sentinel.  The master is looked up with ``SENTINEL get-master-addr-by-name``
before every connection attempt, and every ``master_check_s`` (default 1 s)
while connected: a master Sentinel no longer names is left at once.  A dead
master drops our connections by itself; a demoted master that is still alive
(``SENTINEL FAILOVER``, a partition) keeps accepting writes until Sentinel
reconfigures it (~10 s), and Redis discards those writes when it becomes a
replica.  So without ``min_replicas_acked``, writes acknowledged in the up to
``master_check_s`` before the store notices can be lost; with it they mostly
fail instead (the old master's replicas leave it) -- but not entirely: a
replica may still be attached to the old master for a moment.

Failing fast: when no connection is up an operation errbacks at once with
:class:`StoreUnavailable`; a command in flight is bounded by ``op_timeout_s``
(plus ``replicas_timeout_ms`` when ``WAIT`` is used, since commands queue
behind it).  txredisapi reconnects by itself (backoff capped at 1 s here),
also after a refused ``AUTH`` (fixing the password on the server is enough).
"""

from __future__ import annotations

from collections import deque
import ipaddress
import math
import uuid
from typing import Any

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer, error as ierror, task
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance.store import redis_lua as lua
from appliance.store.interface import (RESYNC, IStateStore, ISubscription, Op, StoreDown,
                                       StoreError, StoreUnavailable)
from appliance.store.redis_url import glob_escape, mask_url, parse_redis_url
from appliance.store.validate import check_str

__all__ = ["RedisStore", "glob_escape", "mask_url", "parse_redis_url"]

# Replies that mean "the server is there but cannot serve right now".
_UNAVAILABLE_REPLIES = ("LOADING", "MASTERDOWN", "READONLY", "BUSY", "TRYAGAIN",
                        "CLUSTERDOWN", "NOREPLICAS", "MISCONF", "NOSCRIPT")



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


def _none(_):
    return None


def _resp(args) -> bytes:
    """A command as a RESP frame (all arguments are str)."""
    out = [f"*{len(args)}\r\n"]
    for a in args:
        out.append(f"${len(a) if a.isascii() else len(a.encode())}\r\n{a}\r\n")
    return "".join(out).encode()


def _same_endpoint(peer_host: str, peer_port: int, host: str, port: int) -> bool:
    """Is the connected peer the address Sentinel reports?  (Sentinel may report
    a hostname: then only the port can be compared.)"""
    if int(peer_port) != port:
        return False
    try:
        return ipaddress.ip_address(peer_host) == ipaddress.ip_address(host)
    except ValueError:
        return True


def _info(text) -> dict[str, str]:
    """``INFO`` reply text -> ``{field: value}``."""
    out = {}
    for line in str(text or "").splitlines():
        name, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            out[name.strip()] = value.strip()
    return out


# ----------------------------------------------------------------------
# txredisapi plumbing
# ----------------------------------------------------------------------
class _RecordLoss:
    """Remember why the command connection went away (for the log and describe)."""

    def connectionLost(self, why):
        store = getattr(self.factory, "store", None)
        if store is not None and self._ready:
            store._lost_reason = why.getErrorMessage()
        super().connectionLost(why)


class _DeliverMessages:
    def messageReceived(self, pattern, channel, message):
        self.factory.store._on_message(pattern, channel, message)


class _Proto(_RecordLoss, txredisapi.RedisProtocol):
    pass


class _SentinelProto(_RecordLoss, txredisapi.SentinelRedisProtocol):
    pass


class _SubProto(_DeliverMessages, txredisapi.SubscriberProtocol):
    pass


class _SentinelSubProto(_DeliverMessages, txredisapi.SubscriberProtocol,
                        txredisapi.SentinelRedisProtocol):
    """A subscriber that, like SentinelRedisProtocol, only stays on a master."""


class _Hooks:
    """Tell the store when a connection becomes usable or goes away, and keep
    retrying after a refused AUTH/SELECT (txredisapi stops the slot for good)."""

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

    def connectionError(self, why):
        super().connectionError(why)
        if self.store is not None:
            self.store._factory_error(self, why)

    def stopTrying(self):
        # called by txredisapi after a failed AUTH or SELECT: the slot would
        # never reconnect.  While the store runs, the slot keeps its backoff
        # (capped at maxDelay) and retries instead.
        store = self.store
        if store is not None and store.running and not store._stopping:
            return defer.succeed(None)
        return super().stopTrying()


class _Factory(_Hooks, txredisapi.RedisFactory):
    pass


class _SentinelFactory(_Hooks, txredisapi.SentinelConnectionFactory):
    initialDelay = 0.1


class _Sentinel(txredisapi.Sentinel):
    """Finds the master with ``SENTINEL get-master-addr-by-name``.

    txredisapi asks ``SENTINEL MASTERS``, which keeps naming the old master
    until the whole failover has ended (the other replicas reconfigured, ~4 s
    here); get-master-addr-by-name names the promoted replica as soon as it is
    promoted.  It matters when the old master is still alive (SENTINEL
    FAILOVER, a partition): it keeps accepting writes, which are thrown away
    when Sentinel turns it into a replica.
    """

    reactor = None      # set by the store

    def discover_master(self, service_name):
        result = defer.Deferred()

        def answered(reply):
            if not result.called and isinstance(reply, list) and len(reply) == 2:
                result.callback((reply[0], int(reply[1])))

        for sentinel in self.sentinels:
            q = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", service_name)
            q.addTimeout(self.discovery_timeout, self.reactor)
            q.addCallbacks(answered, lambda f: None)

        def timed_out():
            if not result.called:
                result.errback(txredisapi.MasterNotFoundError(
                    f"No master found for {service_name}"))
        call = self.reactor.callLater(self.discovery_timeout, timed_out)

        def cancel_timer(r):
            if call.active():
                call.cancel()
            return r
        return result.addBoth(cancel_timer)


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
    store just starts unhealthy) and each connection attempt.  One
    connection carries all commands (program order), one more the change
    feed.  ``min_replicas_acked`` > 0: every write waits (``WAIT``) for that
    many replicas, at most ``replicas_timeout_ms``, and fails with
    :class:`StoreUnavailable` when they did not acknowledge it.
    """

    backend = "redis"
    name = "store"
    _log = Logger(namespace="appliance.store.redis")

    def __init__(self, reactor, *, url: str | None = None, sentinels: tuple[str, ...] = (),
                 master_name: str | None = None, namespace: str = "appliance",
                 op_timeout_s: float = 2.0, connect_timeout_s: float = 3.0,
                 min_replicas_acked: int = 0, replicas_timeout_ms: int = 1000,
                 master_check_s: float = 1.0):
        if not isinstance(namespace, str) or not namespace:
            raise ValueError("namespace must be a non-empty string")
        if int(min_replicas_acked) < 0:
            raise ValueError("min_replicas_acked must be >= 0")
        if int(replicas_timeout_ms) < 0:
            raise ValueError("replicas_timeout_ms must be >= 0 (0 waits forever: not allowed)")
        self._reactor = reactor
        self.namespace = namespace
        self.op_timeout_s = float(op_timeout_s)
        self.connect_timeout_s = float(connect_timeout_s)
        self.min_replicas_acked = int(min_replicas_acked)
        self.master_check_s = float(master_check_s)
        self.replicas_timeout_ms = int(replicas_timeout_ms)
        # commands queue behind a WAIT on the one connection
        self._deadline_s = self.op_timeout_s + (
            self.replicas_timeout_ms / 1000.0 if self.min_replicas_acked else 0.0)
        self._ns = namespace + ":"
        self._chg = namespace + ":__chg__:"
        self._instance_key = f"__store_instance__:{namespace}"
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
        self._master_check = None       # LoopingCall: is Sentinel's master still ours?
        self._checking_master = False
        self._conn = None               # the command connection, once its handshake is done
        self._up = False                # last logged state of the command connection
        self._down_logged = False
        self._lost_reason: str | None = None
        self._last_error: str | None = None
        self._auth_error: str | None = None
        self._down_since: float | None = None
        self._start_waiter: defer.Deferred | None = None
        self._start_timer = None
        self._stopping = False
        # data-loss detection and durability
        self._instance: str | None = None
        self._data_loss: str | None = None
        self._durability: dict[str, Any] = {"appendonly": None, "appendfsync": None,
                                            "rdb_save": None, "replicas": None}
        self._durability_logged: tuple | None = None
        # subscriptions
        self._patterns: dict[str, list[_Subscription]] = {}
        self._active_patterns: set[str] = set()
        self._ever_active: set[str] = set()
        self._subconn = None
        # notifications held until the writes issued before them were answered
        self._writes_issued = 0
        self._writes_done = 0
        self._held: deque = deque()
        self._held_call = None
        self._inflight: deque = deque()
        self._sweep_call = None
        self.stats = {"reconnects": 0, "unavailable": 0, "notifications": 0, "resyncs": 0,
                      "replica_wait_failures": 0, "data_loss": 0}

    # ------------------------------------------------------------------
    # life cycle
    # ------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        conn = self._conn
        return bool(self.running and conn is not None and conn.connected
                    and self._data_loss is None)

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
        info["durability"] = dict(self._durability, min_replicas_acked=self.min_replicas_acked)
        if self.min_replicas_acked:
            info["durability"]["replicas_timeout_ms"] = self.replicas_timeout_ms
        info["subscriber_connected"] = self._subconn is not None
        info["subscriptions"] = sum(len(v) for v in self._patterns.values())
        if self._data_loss is not None:
            info["error"] = self._data_loss
        elif not info["healthy"] and self._last_error:
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
        if self.sentinels and self.master_check_s > 0:
            self._master_check = task.LoopingCall(self._check_master)
            self._master_check.clock = self._reactor
            self._master_check.start(self.master_check_s, now=False).addErrback(
                lambda f: self._log.failure("sentinel master check stopped", f))
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
        if self._master_check is not None and self._master_check.running:
            self._master_check.stop()
        self._master_check = None
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        self._inflight.clear()      # their connections are closed below: they errback
        self._held.clear()          # notifications nobody will read
        if self._held_call is not None and self._held_call.active():
            self._held_call.cancel()
        self._held_call = None
        ds = []
        for f in (self._factory, self._subfactory):
            if f is not None:
                ds.append(f.disconnect())
        if self._sentinel is not None:
            ds.append(self._sentinel.disconnect())
        self._factory = self._subfactory = self._sentinel = None
        self._conn = self._subconn = None
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
                self._sentinel = _Sentinel(self._sentinel_addrs)
                self._sentinel.reactor = self._reactor
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
                poolsize=1, isLazy=True, charset="utf-8", password=info["password"],
                replyTimeout=None, convertNumbers=False, username=info["username"])
            factory.protocol = _SentinelSubProto if subscriber else _SentinelProto
            endpoint = txredisapi._SentinelEndpoint(factory)
        else:
            factory = _Factory(
                None, None if subscriber else info["db"], 1,
                isLazy=True, charset="utf-8", password=info["password"],
                replyTimeout=None, convertNumbers=False, username=info["username"])
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
        # errbacks once if AUTH/SELECT fails; _Hooks.connectionError reports every failure
        factory.deferred.addErrback(lambda f: None)
        factory.startConnecting(_ReportingEndpoint(endpoint, self))
        return factory

    def _factory_error(self, factory, why: str):
        """AUTH or SELECT refused: logged once per distinct reason; the slot retries."""
        if self._stopping or factory not in (self._factory, self._subfactory):
            return
        self._last_error = str(why)
        if self._auth_error != self._last_error:
            self._auth_error = self._last_error
            self._log.error("redis at {where}: {error} (retrying every {delay:g} s)",
                            where=self._where, error=self._last_error, delay=factory.maxDelay)

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
        self._auth_error = None
        if factory is self._subfactory:
            self._subconn = conn
            self._resubscribe(conn)
            return
        if factory is not self._factory:
            return
        d = defer.ensureDeferred(self._handshake(conn))
        d.addErrback(self._handshake_failed, conn)

    async def _handshake(self, conn):
        """Make a new command connection usable: load the scripts, check the
        instance key, read the durability settings.  Commands issued before
        this finishes fail fast; the ones after it queue behind it in order."""
        def raw(*args, optional=False):
            d = self._raw(conn, *args)
            if optional:    # e.g. CONFIG renamed away: fine, we just know less
                d.addErrback(lambda f: f.trap(StoreError) and None)
            return d

        ds = [raw("SCRIPT", "LOAD", lua.WRITE.source), raw("SCRIPT", "LOAD", lua.SET.source),
              raw("GET", self._instance_key), raw("INFO", "persistence"),
              raw("INFO", "replication"), raw("CONFIG", "GET", "appendfsync", optional=True),
              raw("CONFIG", "GET", "save", optional=True)]
        try:
            _, _, current, persistence, replication, appendfsync, save = \
                await defer.gatherResults(ds, consumeErrors=True)
        except defer.FirstError as e:
            e.subFailure.raiseException()
        self._note_durability(persistence, replication, appendfsync, save)
        if self._instance is None:
            if current is None:
                await raw("SET", self._instance_key, uuid.uuid4().hex, "NX")
                current = await raw("GET", self._instance_key)
            self._instance = current
        elif current != self._instance:
            self._mark_data_loss(current)
        if self._factory is None or conn not in self._factory.pool or not conn.connected:
            return
        self._conn = conn
        self._connected()

    def _handshake_failed(self, failure, conn):
        if self._stopping:
            return
        self._last_error = f"connection handshake failed: {failure.getErrorMessage()}"
        self._log.warn("redis at {where}: {error}; reconnecting", where=self._where,
                       error=self._last_error)
        if conn.connected:
            conn.transport.loseConnection()

    def _connected(self):
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

    def _note_durability(self, persistence, replication, appendfsync, save):
        p, r = _info(persistence), _info(replication)
        d = self._durability
        d["appendonly"] = p.get("aof_enabled") == "1" if "aof_enabled" in p else None
        d["appendfsync"] = appendfsync[1] if isinstance(appendfsync, list) and \
            len(appendfsync) == 2 else None
        d["rdb_save"] = save[1] if isinstance(save, list) and len(save) == 2 else None
        try:
            d["replicas"] = int(r.get("connected_slaves", "0"))
        except ValueError:
            d["replicas"] = None
        state = (d["appendonly"], d["appendfsync"], d["rdb_save"], d["replicas"])
        if state == self._durability_logged:
            return
        self._durability_logged = state
        if d["appendonly"] is False:
            self._log.warn("redis at {where} runs with appendonly no (rdb save {save!r}): "
                           "a Redis crash loses acknowledged writes made since its last "
                           "snapshot; set appendonly yes", where=self._where,
                           save=d["rdb_save"])
        elif d["appendonly"] and d["appendfsync"] not in (None, "always"):
            self._log.info("redis at {where}: appendonly yes, appendfsync {fsync} (a power "
                           "loss can cost about a second of acknowledged writes)",
                           where=self._where, fsync=d["appendfsync"])
        if self.min_replicas_acked and (d["replicas"] or 0) < self.min_replicas_acked:
            self._log.warn("redis at {where} has {n} connected replicas but "
                           "min_replicas_acked = {need}: writes will fail",
                           where=self._where, n=d["replicas"], need=self.min_replicas_acked)

    def _mark_data_loss(self, current):
        what = "is missing" if current is None else f"holds another id ({current})"
        self._data_loss = (
            f"data loss: the store's instance key {self._instance_key} {what} after "
            f"reconnecting to {self._where} (redis restarted without its data, or a failover "
            f"to a replica that never had it); writes are refused until "
            f"'appliancectl call store.recheck' accepts the new state")
        self.stats["data_loss"] += 1
        self._log.critical("redis store: {error}", error=self._data_loss)
        self._resync_all()

    def _conn_down(self, factory, conn):
        if factory is self._subfactory or (self._subconn is conn):
            if self._subconn is conn:
                self._subconn = None
                self._active_patterns.clear()
            return
        if factory is not self._factory:
            return
        if conn is self._conn:
            self._conn = None
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

    # -- following Sentinel ----------------------------------------------------
    # A master that died drops our connections, and the reconnect asks Sentinel.
    # A master that is still alive after a failover (SENTINEL FAILOVER, a
    # partition) keeps accepting writes until Sentinel converts it to a replica,
    # about 10 s later, and those writes are then thrown away.  So ask Sentinel
    # every master_check_s and leave a master it no longer names.
    def _check_master(self):
        if self._sentinel is None or self._checking_master:
            return
        if self._pick() is None and self._subconn is None:
            return
        self._checking_master = True
        d = self._sentinel.discover_master(self.master_name)
        d.addCallback(self._compare_master)
        d.addErrback(lambda f: None)    # no sentinel answered: our connections will tell

        def done(_):
            self._checking_master = False
        d.addBoth(done)

    def _compare_master(self, address):
        host, port = str(address[0]), int(address[1])
        for conn in (self._conn, self._subconn):
            if conn is None or not conn.connected:
                continue
            try:
                peer = conn.transport.getPeer()
            except Exception:
                continue
            if _same_endpoint(peer.host, peer.port, host, port):
                continue
            self._lost_reason = (f"sentinel now names {host}:{port} as master, "
                                 f"not {peer.host}:{peer.port}")
            self._log.warn("redis store: {reason}; reconnecting", reason=self._lost_reason)
            conn.transport.loseConnection()

    # ------------------------------------------------------------------
    # recheck (operator: appliancectl call store.recheck)
    # ------------------------------------------------------------------
    def recheck(self):
        """Ping, check the instance key, re-read the durability settings; accept
        a detected data loss (re-create the instance key).  Fires with describe()."""
        def failed(f):
            self._log.warn("redis store recheck failed: {e}", e=f.getErrorMessage())
            return self.describe()
        return defer.ensureDeferred(self._recheck()).addErrback(failed)

    async def _recheck(self):
        conn = self._pick()
        if not self.running or conn is None:
            return self.describe()
        await self._raw(conn, "PING")
        persistence, replication, appendfsync, save, current = await defer.gatherResults([
            self._raw(conn, "INFO", "persistence"), self._raw(conn, "INFO", "replication"),
            self._raw(conn, "CONFIG", "GET", "appendfsync").addErrback(lambda f: None),
            self._raw(conn, "CONFIG", "GET", "save").addErrback(lambda f: None),
            self._raw(conn, "GET", self._instance_key)], consumeErrors=True)
        self._note_durability(persistence, replication, appendfsync, save)
        if self._data_loss is None and current is not None and current == self._instance:
            return self.describe()
        was = self._data_loss or f"instance key changed to {current!r} (noticed by recheck)"
        if current is None:
            if self._instance is None:
                self._instance = uuid.uuid4().hex
            await self._raw(conn, "SET", self._instance_key, self._instance)
        else:
            self._instance = current
        if self._data_loss is None:
            self._resync_all()
        self._data_loss = None
        self._log.critical("redis store: operator accepted the current state of {where} "
                           "after: {was}; writes are accepted again (instance {id})",
                           where=self._where, was=was, id=self._instance)
        return self.describe()

    # ------------------------------------------------------------------
    # running commands
    # ------------------------------------------------------------------
    def _pick(self):
        conn = self._conn
        if conn is not None and conn.connected:
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
            raise self._unavailable(f"no reply within {self._deadline_s:g} s")
        if failure.check(txredisapi.ConnectionError, ierror.ConnectionLost,
                         ierror.ConnectionDone, ierror.ConnectError):
            raise self._unavailable(failure.getErrorMessage())
        if failure.check(txredisapi.ResponseError):
            msg = failure.getErrorMessage()
            if msg.split(" ", 1)[0] in _UNAVAILABLE_REPLIES:
                if msg.startswith("NOSCRIPT"):
                    self._reload_scripts()
                if msg.startswith("READONLY") and self.sentinels:
                    # still talking to a demoted master: reconnect via Sentinel
                    for conn in list(self._factory.pool if self._factory else ()):
                        conn.transport.loseConnection()
                raise self._unavailable(msg)
            raise StoreError(msg)
        if failure.check(UnicodeError, txredisapi.InvalidData):
            raise StoreError(f"cannot encode the arguments: {failure.getErrorMessage()}")
        if failure.check(txredisapi.RedisError):
            raise StoreError(failure.getErrorMessage())
        raise StoreError(f"{failure.type.__name__}: {failure.getErrorMessage()}")

    def _raw(self, conn, *args):
        """One command on ``conn``, translated and bounded by the op timeout."""
        return self._send(conn, args)

    def _send(self, conn, args):
        """Write one command on ``conn`` and return the Deferred of its reply.

        The hot path, so it skips txredisapi's ``execute_command`` (per-argument
        encoding, two Deferreds per command) and does what it does directly:
        write the RESP frame, take the next slot of the connection's reply
        queue.  Replies come back in the order the frames were written, which
        is what the ordering guarantee rests on.  (txredisapi 1.6 internals:
        ``replyQueue``; the version is pinned in setup.py.)
        """
        if not conn.connected:
            return defer.fail(self._unavailable("not connected"))
        try:
            frame = _resp(args)
        except (UnicodeEncodeError, AttributeError) as e:
            return defer.fail(StoreError(f"cannot encode the arguments: {e}"))
        conn.transport.write(frame)
        d = conn.replyQueue.get()
        d.addCallbacks(self._reply, self._translate)
        self._track(d, conn)
        return d

    def _reply(self, reply):
        if isinstance(reply, Exception):    # error replies and "connection lost" are queued as values
            return self._translate(Failure(reply))
        return reply

    def _cmd(self, *args):
        """Run one read on the command connection, bounded by ``op_timeout_s``."""
        conn = self._pick()
        if conn is None or not self.running:
            return defer.fail(self._unavailable())
        return self._raw(conn, *args)

    # -- op timeouts --------------------------------------------------------
    # Equivalent to d.addTimeout(deadline) on every command, but one deque
    # entry per command instead of a DelayedCall: commands are issued in
    # deadline order, so a single timer at the oldest deadline suffices.
    def _track(self, d, conn):
        q = self._inflight
        # drop answered commands from the head now (replies come in order), so a
        # long deadline does not keep every answered Deferred alive until the sweep
        while q and q[0][1].called and not q[0][1].paused:
            q.popleft()
        q.append((self._reactor.seconds() + self._deadline_s, d, conn))
        if self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(self._deadline_s, self._sweep)

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
                # drop the connection so it reconnects (and health shows it)
                self._lost_reason = f"no reply within {self._deadline_s:g} s"
                conn.transport.abortConnection()
        if q and self._sweep_call is None:
            self._sweep_call = self._reactor.callLater(max(0.001, q[0][0] - now), self._sweep)

    # -- writes ---------------------------------------------------------------
    def _script(self, script: lua.Script, keys, args):
        """Run a write script (EVALSHA), then WAIT for replicas if configured."""
        conn = self._conn
        if conn is None or not conn.connected or not self.running:
            return defer.fail(self._unavailable())
        if self._data_loss is not None:
            # refused, but answered in issue order: behind what is in flight
            return self._send(conn, ("PING",)).addCallback(self._refuse_after_loss)
        d = self._send(conn, ("EVALSHA", script.sha, str(len(keys)), *keys, *args))
        if self.min_replicas_acked:
            d = self._wait_replicas(conn, d)
        self._writes_issued += 1
        d.addBoth(self._write_answered)
        return d

    def _refuse_after_loss(self, _):
        raise StoreDown(self._data_loss or "data loss detected (accepted since)")

    def _reload_scripts(self):
        """A script went missing (SCRIPT FLUSH): the write that noticed was not
        applied and fails.  No EVAL retry: it would run after the commands
        issued behind it.  Load the scripts again for the writes to come."""
        conn = self._pick()
        if conn is None:
            return
        self._log.warn("redis at {where} lost the store's Lua scripts (SCRIPT FLUSH?); "
                       "loading them again", where=self._where)
        for script in (lua.WRITE, lua.SET):
            self._raw(conn, "SCRIPT", "LOAD", script.source).addErrback(
                lambda f: self._log.warn("SCRIPT LOAD failed: {e}", e=f.getErrorMessage()))

    def _wait_replicas(self, conn, d):
        """``WAIT n timeout`` right behind the write on the same connection; the
        write's result fires with the WAIT reply (so still in issue order)."""
        need, ms = self.min_replicas_acked, self.replicas_timeout_ms
        waited = self._raw(conn, "WAIT", str(need), str(ms))
        result = defer.Deferred()
        answer: list = []
        d.addBoth(answer.append)

        def replicas_answered(n):
            written = answer[0] if answer else Failure(self._unavailable("no reply"))
            if isinstance(written, Failure):
                result.errback(written)
            elif isinstance(n, Failure):
                result.errback(StoreUnavailable(
                    f"write done on the master but not confirmed by replicas: "
                    f"{n.getErrorMessage()} (it may or may not survive a failover)"))
            elif int(n) < need:
                self.stats["replica_wait_failures"] += 1
                result.errback(StoreUnavailable(
                    f"only {int(n)} of {need} replicas acknowledged the write within "
                    f"{ms} ms; it was applied on the master and may be lost by a failover"))
            else:
                result.callback(written)
        waited.addBoth(replicas_answered)
        return result

    def _write_answered(self, result):
        self._writes_done += 1
        if self._held and self._held_call is None and self._held[0][0] <= self._writes_done:
            # after the callbacks the caller adds to this Deferred
            self._held_call = self._reactor.callLater(0, self._release_held)
        return result

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
        d = self._script(lua.WRITE, keys, argv)
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
    # owner leases (the cluster's Redis witness: appliance/cluster/lease_witness.py)
    # ------------------------------------------------------------------
    # Plain commands on the command connection, in the store's namespace, not
    # on the change feed and without WAIT (a lease must answer within its
    # TTL).  Each fires True/False, or fails with StoreUnavailable.
    def lease_acquire(self, key: str, value: str, ttl_ms: int):
        """``SET key value NX PX ttl_ms``: True when this call created it."""
        def go():
            check_str(key)
            return self._cmd("SET", self._k(key), value, "NX", "PX", str(int(ttl_ms)))
        return self._guarded(go).addCallback(lambda r: r is not None)

    def lease_renew(self, key: str, expected: str, value: str, ttl_ms: int):
        """Compare-and-renew: only while ``key`` still holds ``expected``, set it
        to ``value`` with a fresh TTL (Lua, atomic)."""
        def go():
            check_str(key)
            return self._cmd("EVAL", lua.LEASE_RENEW_SOURCE, "1", self._k(key),
                             expected, value, str(int(ttl_ms)))
        return self._guarded(go).addCallback(lambda r: int(r) == 1)

    def lease_release(self, key: str, value: str):
        """Compare-and-delete: only while ``key`` still holds ``value``."""
        def go():
            check_str(key)
            return self._cmd("EVAL", lua.LEASE_RELEASE_SOURCE, "1", self._k(key), value)
        return self._guarded(go).addCallback(lambda r: int(r) == 1)

    # ------------------------------------------------------------------
    # IStateStore: plain keys
    # ------------------------------------------------------------------
    def get(self, key):
        def go():
            check_str(key)
            return self._cmd("GET", self._k(key))
        return self._guarded(go)

    def set(self, key, value, ttl_s=None):
        try:
            check_str(key, value)
            px = "" if ttl_s is None else _px(ttl_s)
        except StoreError:
            return defer.fail()
        return self._script(lua.SET, (self._ns + key,), (value, px, self._chg + key)).addCallback(
            _none)

    def delete(self, *keys):
        def go():
            check_str(*keys)
            if not keys:
                return defer.succeed(0)
            return self._write([("delete", k, []) for k in keys]).addCallback(sum)
        return self._guarded(go)

    def expire(self, key, ttl_s):
        def go():
            check_str(key)
            px = _px(ttl_s)
            return self._write([("expire", key, [px])]).addCallback(lambda r: bool(r[0]))
        return self._guarded(go)

    def ttl(self, key):
        def go():
            check_str(key)
            return self._cmd("PTTL", self._k(key)).addCallback(
                lambda ms: None if int(ms) < 0 else int(ms) / 1000.0)
        return self._guarded(go)

    # ------------------------------------------------------------------
    # hashes
    # ------------------------------------------------------------------
    def hset(self, key, mapping):
        def go():
            check_str(key)
            if not mapping:
                raise StoreError("hset needs at least one field")
            args = []
            for f, v in mapping.items():
                check_str(f, v)
                args += [f, v]
            return self._write([("hset", key, args)]).addCallback(lambda r: r[0])
        return self._guarded(go)

    def hget(self, key, field):
        def go():
            check_str(key, field)
            return self._cmd("HGET", self._k(key), field)
        return self._guarded(go)

    def hgetall(self, key):
        def go():
            check_str(key)
            return self._cmd("HGETALL", self._k(key)).addCallback(
                lambda r: dict(zip(r[::2], r[1::2])))
        return self._guarded(go)

    def hdel(self, key, *fields):
        def go():
            check_str(key, *fields)
            if not fields:
                return defer.succeed(0)
            return self._write([("hdel", key, list(fields))]).addCallback(lambda r: r[0])
        return self._guarded(go)

    # ------------------------------------------------------------------
    # sorted sets
    # ------------------------------------------------------------------
    def zadd(self, key, mapping):
        def go():
            check_str(key)
            if not mapping:
                raise StoreError("zadd needs at least one member")
            args = []
            for m, s in mapping.items():
                check_str(m)
                args += [_score(s), m]
            return self._write([("zadd", key, args)]).addCallback(lambda r: r[0])
        return self._guarded(go)

    def zrem(self, key, *members):
        def go():
            check_str(key, *members)
            if not members:
                return defer.succeed(0)
            return self._write([("zrem", key, list(members))]).addCallback(lambda r: r[0])
        return self._guarded(go)

    def zscore(self, key, member):
        def go():
            check_str(key, member)
            return self._cmd("ZSCORE", self._k(key), member).addCallback(
                lambda s: None if s is None else float(s))
        return self._guarded(go)

    def zcard(self, key):
        def go():
            check_str(key)
            return self._cmd("ZCARD", self._k(key)).addCallback(int)
        return self._guarded(go)

    def zrangebyscore(self, key, min_score, max_score, limit=None):
        def go():
            check_str(key)
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
            check_str(key)
            if expected is not None:
                check_str(expected)
            if new is None:
                op = ("delete", key, [])
            else:
                check_str(new)
                op = ("set", key, [new, "" if ttl_s is None else _px(ttl_s)])
            return self._write([op], [(key, expected)]).addCallback(lambda r: r is not None)
        return self._guarded(go)

    def commit(self, ops, expect=None):
        def go():
            guards = []
            for key, value in (expect or {}).items():
                check_str(key)
                if value is not None:
                    check_str(value)
                guards.append((key, value))
            wire = []
            for o in ops:
                if not isinstance(o, Op) or o.kind not in Op.KINDS:
                    raise StoreError(f"not a store operation: {o!r}")
                check_str(o.key)
                if o.kind == "set":
                    value, ttl_s = o.args
                    check_str(value)
                    wire.append(("set", o.key, [value, "" if ttl_s is None else _px(ttl_s)]))
                elif o.kind == "delete":
                    wire.append(("delete", o.key, []))
                elif o.kind == "hset":
                    args = []
                    for f, v in o.args[0]:
                        check_str(f, v)
                        args += [f, v]
                    wire.append(("hset", o.key, args))
                elif o.kind in ("hdel", "zrem"):
                    check_str(*o.args[0])
                    wire.append((o.kind, o.key, list(o.args[0])))
                elif o.kind == "zadd":
                    args = []
                    for m, s in o.args[0]:
                        check_str(m)
                        args += [_score(s), m]
                    wire.append(("zadd", o.key, args))
            return self._write(wire, guards).addCallback(lambda r: r is not None)
        return self._guarded(go)

    # ------------------------------------------------------------------
    # iteration and change feed
    # ------------------------------------------------------------------
    def scan(self, prefix, cursor=None, count=100):
        def go():
            check_str(prefix)
            if cursor is not None:
                check_str(cursor)
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
        check_str(prefix)
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
            if not subs:
                return
            self._active_patterns.add(pattern)
            again = pattern in self._ever_active
            self._ever_active.add(pattern)
            for sub in list(subs):
                if not sub.ready.called:
                    sub.ready.callback(None)
                elif again:
                    # subscribed before the gap: notifications may have been missed
                    self._resync(sub)

        def failed(f):
            if f.check(txredisapi.ConnectionError):
                return None     # resubscribed when the connection is back
            self._log.warn("redis psubscribe {pattern} failed: {e}", pattern=pattern,
                           e=f.getErrorMessage())
            if conn.connected:
                conn.transport.loseConnection()   # reconnect and try again
        try:
            d = conn.psubscribe(pattern)
        except Exception as e:
            # e.g. the connection dropped in this very turn: it resubscribes when
            # back; anything else: reconnect and try again
            failed(Failure(e))
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
        self._ever_active.discard(sub.pattern)
        conn = self._subconn
        if conn is not None and conn.connected:
            try:
                conn.punsubscribe(sub.pattern).addErrback(lambda f: None)
            except Exception:
                pass

    def _on_message(self, pattern, channel, message):
        if not isinstance(channel, str) or not channel.startswith(self._chg):
            return
        key = channel[len(self._chg):]
        op = message if isinstance(message, str) else str(message)
        if self._writes_done < self._writes_issued or self._held:
            # maybe our own write whose reply is not in yet: deliver after it
            self._held.append((self._writes_issued, pattern, key, op))
            return
        self._deliver(pattern, key, op)

    def _release_held(self):
        self._held_call = None
        held = self._held
        while held and held[0][0] <= self._writes_done:
            _, pattern, key, op = held.popleft()
            self._deliver(pattern, key, op)

    def _deliver(self, pattern, key, op):
        subs = self._patterns.get(pattern)
        if not subs:
            return
        self.stats["notifications"] += 1
        for sub in list(subs):
            if not sub.active:
                continue
            try:
                sub.callback(key, op)
            except Exception:
                self._log.failure("store subscriber for {prefix!r} failed on {key}",
                                  prefix=sub.prefix, key=key)

    def _resync(self, sub):
        if not sub.active:
            return
        self.stats["resyncs"] += 1
        try:
            sub.callback(sub.prefix, RESYNC)
        except Exception:
            self._log.failure("store subscriber for {prefix!r} failed on resync",
                              prefix=sub.prefix)

    def _resync_all(self):
        for subs in list(self._patterns.values()):
            for sub in list(subs):
                if sub.ready.called:
                    self._resync(sub)

    def ping(self):
        return self._cmd("PING").addCallback(lambda _: True)
