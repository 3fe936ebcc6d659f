"""The ``sip`` service: registrar, location service and redirect server.

Flow of a request: transport (UDP datagram or one framed stream message) ->
:func:`services.sip.message.parse` (malformed: 400 with the reason when the
request allows a response, else a counted drop) -> server transaction table
(a retransmission gets the stored answer or is absorbed while the first copy
is being handled) -> the method:

- ``REGISTER``: §10.3 rules (:mod:`services.sip.registrar`) on the AOR's
  bindings, one commit in the store, **200 only after it is durable**;
- ``INVITE``: redirect: 302 with the AOR's contacts (by q), 480 when a known
  AOR has none left, 404 when it never registered; ACK is absorbed by the
  INVITE's transaction (whose non-2xx answer is retransmitted on UDP until then);
- ``OPTIONS``: 200 with Allow/Supported; ``CANCEL``: 200 (the INVITE was
  answered at once); anything else: 405 with Allow.

With ``[services.sip.auth]`` REGISTERs (and INVITEs if ``invite = true``)
need digest credentials (:mod:`services.sip.auth`) naming the To user.

With ``[services.sip.replication]`` each changed AOR goes to the backups over
the peer link (:mod:`services.sip.replication`); in ``sync`` mode the 200
waits for every live backup.

Who serves (:mod:`services.sip.roles`): every AOR belongs to a shard (one,
unsharded) that is a cluster resource; a REGISTER or INVITE for a shard
this node does not own gets 302 to the owner's SIP address (or, with
``not_owner = "serve-if-owner-down"``, is served here when the owner is
dead and this node is the shard's backup); no binding is ever written for
a shard served elsewhere.  A node without cluster peers owns everything.
"""

from __future__ import annotations

import secrets
import time
from email.utils import formatdate

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.admin.rpc import ApplicationError, Param, Params
from appliance.plugin import start_loop, stop_all, withdraw
from appliance.net.sockets import set_receive_buffer
from appliance.store.interface import StoreError
from services.sip import message as M
from services.sip.location import Location
from services.sip.registrar import decide
from services.sip.transaction import ServerTransactions, transaction_key
from services.sip.transport import Source, StreamFactory, UDPProtocol

_log = Logger(namespace="services.sip")

ALLOW = "REGISTER, INVITE, ACK, CANCEL, OPTIONS"
SUPPORTED = {"path"}
RPC_METHODS = ("sip.bindings", "sip.unregister", "sip.stats", "sip.shards")
KNOWN_METHODS = frozenset({"REGISTER", "INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "SUBSCRIBE",
                           "NOTIFY", "MESSAGE", "INFO", "PRACK", "UPDATE", "REFER", "PUBLISH"})


class SIPService(Service):
    name = "sip"
    #: Bytes of datagrams read per reactor turn (Twisted's default 256 KiB is
    #: ~500 REGISTERs during which no durable wait can release its 200).
    READ_BATCH_BYTES = 64 * 1024
    #: ... while the reactor lags (services.sip.admission): shorter turns, the rest
    #: waits in the kernel queue
    READ_BATCH_LAGGING = 4 * 1024

    def __init__(self, config, context):
        self.config = config
        self.context = context
        self.reactor = context.reactor
        self.location = Location(context.store, self.reactor.seconds)
        self.stats: dict[str, int] = {"requests": 0, "responses": 0}
        self.transactions = ServerTransactions(self.reactor, stats=self.stats)
        self.requests: dict[str, int] = {}
        self.responses: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        self.connections = 0
        self.pending = 0
        # REGISTERs beyond max_pending waiting for the store (and sync backups), or beyond
        # shed_min_pending while the reactor lags, get 503 + Retry-After (admission.py)
        from services.sip.admission import Admission
        self.admission = Admission(self.reactor, max_pending=config.max_pending,
                                   lag_s=config.shed_lag_ms / 1000.0,
                                   hold_s=config.shed_hold_ms / 1000.0,
                                   lag_pending=config.shed_min_pending,
                                   on_change=self._lag_changed)
        self._lag_logged_at: float | None = None
        self.udp = None
        self.listeners: list = []
        self._sweeper = None
        self._sweeps = 0
        self.replicator = None
        self.auth = None
        if config.auth is not None:
            from services.sip.auth import DigestAuth
            a = config.auth
            credentials = a.credentials
            if a.ldap is not None:
                from services.sip.ldap_credentials import LdapCredentials
                credentials = LdapCredentials(self.reactor, a.ldap)
            self.credentials = credentials
            self.auth = DigestAuth(a.realm, credentials, algorithms=a.algorithms,
                                   nonce_ttl_s=a.nonce_ttl_s, now=self.reactor.seconds)
        self._tag = secrets.token_hex(3)
        self._date_cache = (None, "")
        self._counter = 0
        self.roles = self._make_roles()
        # registered now, before any service starts: the shard resources get the sip
        # service's priorities even if the dns service (records following them) starts first
        self.roles.register()
        self.syncgate = None
        if config.replication is not None and not self.roles.alone:
            # unable for the shards until the peers sent what this node missed: said now,
            # before the cluster's first election, so a preempting node does not take a
            # shard back with stale bindings
            from services.sip.syncgate import SyncGate
            r = config.replication
            self.syncgate = SyncGate(
                self.context.cluster, r.peers, now=self.reactor.seconds,
                connected=lambda p: (self.replicator is not None
                                     and self.replicator.link.connected(p)),
                alive=self.roles.alive, grace_s=r.sync_grace_s, max_s=r.sync_max_s)
            self.syncgate.begin()

    def _make_roles(self):
        from services.sip.roles import Roles
        cluster = self.context.cluster
        node_config = getattr(self.context, "config", None)
        node_id = getattr(getattr(node_config, "node", None), "id", None) or \
            getattr(cluster, "node_id", None) or "local"
        peers = {}
        section = getattr(node_config, "cluster", None)
        for p in getattr(section, "peers", ()) or ():
            peers[p.id] = str(p.address)
        cfg = self.config
        port = cfg.port
        if not port and cfg.tcp:
            try:
                port = int(cfg.tcp.split(":")[1])
            except (IndexError, ValueError):
                port = 5060
        roles = Roles(cfg.roles, cluster, node_id, port or 5060, peers)
        host = str(cfg.listen_address)
        if host not in ("0.0.0.0", "::"):
            roles.addresses.setdefault(node_id, f"{host}:{port}")
        return roles

    @property
    def role(self) -> str:
        return self.roles.role()

    # ------------------------------------------------------------------
    def startService(self):
        super().startService()
        return defer.ensureDeferred(self._start())

    async def _start(self):
        cfg = self.config
        try:
            await self.location.recount()
        except StoreError as e:
            _log.warn("sip: could not count the stored bindings: {why}", why=e)
        where = []
        if cfg.port:
            self.udp = self.reactor.listenUDP(cfg.port, UDPProtocol(self),
                                             interface=str(cfg.listen_address))
            self.udp.maxThroughput = self.READ_BATCH_BYTES
            rcvbuf = set_receive_buffer(self.udp.socket, cfg.receive_buffer_bytes)
            where.append(f"udp:{cfg.listen_address}:{self.udp.getHost().port} "
                         f"(receive buffer {rcvbuf})")
        for name, description in (("tcp", cfg.tcp), ("tls", cfg.tls)):
            if description is None:
                continue
            ep = endpoints.serverFromString(self.reactor, description)
            port = await ep.listen(StreamFactory(self, name))
            self.listeners.append(port)
            where.append(f"{name}:{port.getHost().host}:{port.getHost().port}")
        self._setup_replication()
        if self.replicator is None and self.syncgate is not None:
            self.syncgate.waiting.clear()          # no peer link: nobody can sync this node
            self.syncgate.tick()
        if self.replicator is not None:
            try:
                await self.replicator.load()
            except StoreError as e:
                _log.warn("sip: could not read the replication backlog: {why}", why=e)
            self.replicator.start()
        self.admission.start()
        self._register_rpc()
        metrics = getattr(self.context, "metrics", None)
        if metrics is not None:
            metrics.register(self)
        self._sweeper = start_loop(self.reactor, 1.0, self._sweep, "sip: sweep loop")
        _log.info("sip: registrar on {where}; domains {domains}; {n} bindings in the store",
                  where=", ".join(where), domains=", ".join(cfg.domains) or "any",
                  n=self.location.count)

    def stopService(self):
        super().stopService()
        self.admission.stop()
        self.transactions.clear()
        if self.replicator is not None:
            self.replicator.stop()
        withdraw(self.context, RPC_METHODS, self)
        udp, self.udp = self.udp, None
        listeners, self.listeners = self.listeners, []
        return stop_all(self._sweeper, udp, *listeners)

    def _setup_replication(self) -> None:
        r = self.config.replication
        if r is None:
            return
        link = getattr(self.context.cluster, "peerlink", None)
        if link is None:
            _log.error("sip: replication to {peers} configured but this node has no peer "
                       "link ([cluster] peer_link and tls): bindings stay on this node",
                       peers=", ".join(r.peers))
            return
        from services.sip.replication import Replicator
        roles = self.roles
        self.replicator = Replicator(
            self.reactor, link, r.peers, r.mode, self.location, timeout_s=r.timeout_s,
            batch=r.batch, backlog_limit=r.backlog_limit, page=r.page, window=r.window,
            pause_s=r.pause_s, page_s=r.page_s, turn_s=r.turn_s, min_rate=r.min_rate,
            shard_of=roles.shard,
            on_synced=self.syncgate.synced if self.syncgate is not None else None)
        _log.info("sip: replicating bindings to {peers} ({mode})", peers=", ".join(r.peers),
                  mode=r.mode)

    def _sweep(self) -> None:
        try:
            self.transactions.sweep()
        except Exception:
            _log.failure("sip: transaction sweep failed")
        self._sweeps += 1
        if self.syncgate is not None:
            try:
                self.syncgate.tick()
            except Exception:
                _log.failure("sip: sync gate check failed")
        if self.auth is not None:
            self.auth.sweep()
        if self._sweeps % max(1, int(self.config.sweep_interval_s)) == 0:
            d = self.location.sweep()
            d.addCallback(lambda n: n and _log.debug("sip: {n} expired bindings removed", n=n))
            d.addErrback(lambda f: _log.warn("sip: expired bindings not removed: {why}",
                                             why=f.getErrorMessage()))

    # ------------------------------------------------------------------
    # receive
    # ------------------------------------------------------------------
    def drop(self, reason: str) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + 1

    def _lag_changed(self, lagging: bool) -> None:
        """The reactor started or stopped lagging: read fewer datagrams per turn meanwhile."""
        if self.udp is not None:
            self.udp.maxThroughput = self.READ_BATCH_LAGGING if lagging else self.READ_BATCH_BYTES
        now = self.reactor.seconds()
        if lagging and (self._lag_logged_at is None or now - self._lag_logged_at >= 10.0):
            # one line per 10 s at most: a log write is reactor time when it has none
            self._lag_logged_at = now
            a = self.admission
            _log.info("sip: the reactor lags (a tick {ms} ms late at worst so far, {n} episodes): "
                      "shedding REGISTERs beyond {min} in flight with 503",
                      ms=a.stats["max_lag_ms"], n=a.stats["lag_episodes"], min=a.lag_pending)

    def received(self, data: bytes, src: Source, stream: bool) -> None:
        try:
            msg = M.parse(data, stream=stream)
        except M.Malformed as e:
            if e.request is not None and e.request.method != "ACK":
                self.drop("malformed_answered")
                self._send(src, self._response(e.request, 400, e.reason))
            else:
                self.drop("malformed")
            return
        if not msg.is_request:
            self.drop("response")      # we send no requests: a stray response
            return
        self.stats["requests"] += 1
        label = msg.method if msg.method in KNOWN_METHODS else "OTHER"   # bounded labels
        self.requests[label] = self.requests.get(label, 0) + 1
        try:
            key = transaction_key(msg)
        except (ValueError, IndexError):
            self.drop("malformed")
            return
        if self.transactions.received(msg, key, src.send) is None:
            return
        self._dispatch(msg, key, src)

    def _dispatch(self, msg: M.Message, key, src: Source) -> None:
        method = msg.method
        if method == "REGISTER":
            self._register(msg, key, src)
        elif method == "INVITE":
            self._invite(msg, key, src)
        elif method in ("OPTIONS",):
            resp = self._response(msg, 200)
            resp.add("Allow", ALLOW)
            resp.add("Accept", "application/sdp")
            resp.add("Supported", ", ".join(sorted(SUPPORTED)))
            self._answer(key, src, resp)
        elif method == "CANCEL":
            self._answer(key, src, self._response(msg, 200))
        else:
            resp = self._response(msg, 405)
            resp.add("Allow", ALLOW)
            self._answer(key, src, resp)

    # ------------------------------------------------------------------
    # responses
    # ------------------------------------------------------------------
    def _to_tag(self) -> str:
        self._counter += 1
        return f"{self._tag}{self._counter:x}"

    def _response(self, msg: M.Message, code: int, reason: str | None = None) -> M.Message:
        resp = M.response_for(msg, code, reason, to_tag=self._to_tag())
        resp.add("Server", self.config.server_header)
        return resp

    def _send(self, src: Source, resp: M.Message) -> None:
        self._count_response(resp)
        src.send(self._via_received(resp, src).to_bytes())

    def _count_response(self, resp: M.Message) -> None:
        self.stats["responses"] += 1
        code = str(resp.code)
        self.responses[code] = self.responses.get(code, 0) + 1

    @staticmethod
    def _via_received(resp: M.Message, src: Source) -> M.Message:
        """RFC 3261 §18.2.1 / RFC 3581: note the source address (and port
        for rport) in the top Via."""
        for i, (name, value) in enumerate(resp.headers):
            if name != "Via":
                continue
            try:
                via = resp.top_via       # parsed once per request (response_for copies it)
            except (ValueError, IndexError):
                return resp
            extra = ""
            if via.host != src.host.lower() and "received" not in via.params:
                extra += f";received={src.host}"
            if "rport" in via.params and not via.params["rport"]:
                value = value.replace(";rport", "", 1)
                extra += f";rport={src.port}"
            if extra:
                resp.headers[i] = (name, value + extra)
            return resp
        return resp

    def _answer(self, key, src: Source, resp: M.Message) -> None:
        self._count_response(resp)
        data = self._via_received(resp, src).to_bytes()
        method = key[3] if key[0] == "3261" else key[5]
        invite_failure = resp.code >= 300 and method == "INVITE"
        self.transactions.respond(key, data, reliable=src.reliable,
                                  invite_failure=invite_failure)

    # ------------------------------------------------------------------
    # REGISTER
    # ------------------------------------------------------------------
    def _domain_ok(self, host_of_uri: str) -> bool:
        if not self.config.domains:
            return True
        return host_of_uri in self.config.domains

    def _register(self, msg: M.Message, key, src: Source) -> None:
        unsupported = [o for o in (v.strip().lower() for v in msg.get_all("Require"))
                       if o not in SUPPORTED]
        if unsupported:
            resp = self._response(msg, 420)
            resp.add("Unsupported", ", ".join(unsupported))
            return self._answer(key, src, resp)
        try:
            aor = M.canonical_aor(msg.to_addr.uri)
            domain = M.canonical_aor(msg.uri).split(":", 1)[1].rpartition("@")[2]
        except ValueError as e:
            return self._answer(key, src, self._response(msg, 404, f"Not Found ({e})"[:80]))
        if not self._domain_ok(domain) or not self._domain_ok(aor.rpartition("@")[2]):
            return self._answer(key, src, self._response(msg, 404, "Domain Not Served"))
        if not self._routed_here(msg, key, src, aor):
            return
        shed = self.admission.admit(self.pending)
        if shed is not None:
            # the store or the sync backups are behind, or the reactor is: an answer that
            # comes seconds late only draws retransmissions (and a starved reactor delays
            # this node's heartbeats): tell the UA to come back instead
            self.drop(shed)
            resp = self._response(msg, 503, "Overloaded")
            resp.add("Retry-After", "1")
            return self._answer(key, src, resp)
        self._authorized(msg, key, src, aor, self._store_binding)

    def _routed_here(self, msg: M.Message, key, src: Source, aor: str) -> bool:
        """True if this node serves ``aor``'s shard now; otherwise answer (302 to the
        owner, or 503 while nobody owns it) and return False."""
        route = self.roles.route(aor)
        if route.action == "serve":
            if route.owner is None:
                self.drop("served_for_dead_owner")
            return True
        if route.action == "redirect" and route.address:
            self.drop("redirected_to_owner")
            resp = self._response(msg, 302, "Moved Temporarily (shard owner)")
            user = aor.split(":", 1)[1].rpartition("@")[0]
            target = f"sip:{user}@{route.address}" if msg.method == "INVITE" and user \
                else f"sip:{route.address}"
            resp.add("Contact", f"<{target}>")
            self._answer(key, src, resp)
            return False
        self.drop("no_owner")
        resp = self._response(msg, 503, "No Registrar Owns This Shard")
        resp.add("Retry-After", "1")
        self._answer(key, src, resp)
        return False

    def _store_binding(self, msg: M.Message, key, src: Source, aor: str) -> None:
        self.pending += 1
        received = str(src)
        now = self.reactor.seconds()
        d = self.location.update(
            aor, lambda existing: decide(aor, existing, msg, now, self.config.limits, received),
            self._replicate_early if self.replicator is not None else None)
        d.addCallbacks(self._stored, self._store_failed, callbackArgs=(msg, key, src, aor, now),
                       errbackArgs=(msg, key, src))
        d.addErrback(lambda f: _log.failure("sip: REGISTER answer failed", failure=f))
        d.addBoth(self._done_one)

    def _stored(self, decision, msg, key, src, aor, now):
        """The binding is durable here: answer now, or once the backups have it."""
        if (self.replicator is None or decision.bindings is None or not decision.changes
                or getattr(decision, "early", False)):
            # early: shipped when decided, and the backups' acks were waited for with
            # the local commit (Location.update)
            return self._registered(decision, msg, key, src, now)
        try:
            w = self._replicate(decision, aor)
        except Exception:
            return self._store_failed(Failure(), msg, key, src)
        return w.addCallbacks(self._registered, self._store_failed,
                              callbackArgs=(msg, key, src, now), errbackArgs=(msg, key, src))

    def _done_one(self, _):
        self.pending -= 1

    def _authorized(self, msg: M.Message, key, src: Source, aor: str | None, then) -> None:
        """Call ``then(msg, key, src, aor)`` if no auth is configured or the request
        carries good credentials; otherwise answer (401 challenge, 403, 400, or 503
        when the directory cannot answer)."""
        if self.auth is None:
            return then(msg, key, src, aor)
        # a REGISTER must authenticate as the user it registers; an INVITE as anyone
        user = aor.split(":", 1)[1].rpartition("@")[0] if msg.method == "REGISTER" else None
        try:
            verdict = self.auth.check(msg.method, msg.get_all("Authorization"), user)
        except Exception:
            _log.failure("sip: authentication check failed")
            return self._answer(key, src, self._response(msg, 500))
        if isinstance(verdict, defer.Deferred):
            verdict.addCallbacks(self._verdict, self._directory_failed,
                                 callbackArgs=(msg, key, src, aor, then),
                                 errbackArgs=(msg, key, src))
            verdict.addErrback(lambda f: _log.failure("sip: answer after auth failed", failure=f))
            return
        self._verdict(verdict, msg, key, src, aor, then)

    def _verdict(self, verdict, msg, key, src, aor, then) -> None:
        if verdict.code == 0:
            return then(msg, key, src, aor)
        reason = {403: "Forbidden (credentials of another user)",
                  400: "Bad Authorization header"}.get(verdict.code)
        resp = self._response(msg, verdict.code, reason)
        for name, value in verdict.headers:
            resp.add(name, value)
        self._answer(key, src, resp)

    def _directory_failed(self, failure, msg, key, src) -> None:
        self.drop("directory_unavailable")
        self.auth.results["directory_unavailable"] = \
            self.auth.results.get("directory_unavailable", 0) + 1
        resp = self._response(msg, 503, "Directory Unavailable")
        resp.add("Retry-After", "5")
        self._answer(key, src, resp)

    def _replicate_early(self, aor: str, decision):
        """Ship a decision as soon as it is in the store's mirror (Location.update's
        ``decided``): the backups store it while the local commit runs, so a sync 200
        waits for the slower of the two instead of their sum.  A 200 still leaves only
        once both are durable; if the local commit fails the REGISTER gets 500 and the
        backup may hold a binding nobody acknowledged (the UA registers again)."""
        if self.replicator is None or decision.bindings is None:
            return None
        removed = [b.uri for b in decision.removed]
        return self.replicator.replicate(aor, decision.bindings, removed,
                                         getattr(decision, "mtime", None),
                                         getattr(decision, "encoded", None))

    def _replicate(self, decision, aor: str):
        """Ship a changed AOR to the backups; in sync mode the 200 waits for them."""
        if decision.bindings is None or not decision.changes:
            return decision
        removed = [b.uri for b in decision.removed]
        d = self.replicator.replicate(aor, decision.bindings, removed,
                                      getattr(decision, "mtime", None),
                                      getattr(decision, "encoded", None))
        return d.addCallback(lambda _: decision)

    def _registered(self, decision, msg, key, src, now) -> None:
        resp = self._response(msg, decision.code, decision.reason)
        for name, value in decision.headers:
            resp.add(name, value)
        if decision.code == 200:
            resp.add("Date", self._date())
        self._answer(key, src, resp)

    def _date(self) -> str:
        """The Date header's value (RFC 1123), formatted once per second."""
        now = int(time.time())
        if self._date_cache[0] != now:
            self._date_cache = (now, formatdate(now, usegmt=True))
        return self._date_cache[1]

    def _store_failed(self, failure, msg, key, src) -> None:
        self.drop("store_error")
        _log.error("sip: {method} for {to} not answered 200: store failed: {why}",
                   method=msg.method, to=msg.get("To"), why=failure.getErrorMessage())
        resp = self._response(msg, 500, "Location Store Unavailable")
        resp.add("Retry-After", "5")
        self._answer(key, src, resp)

    # ------------------------------------------------------------------
    # INVITE -> redirect
    # ------------------------------------------------------------------
    def _invite(self, msg: M.Message, key, src: Source) -> None:
        mf = msg.get("Max-Forwards")
        if mf is not None and int(mf) == 0:
            return self._answer(key, src, self._response(msg, 483))
        try:
            aor = M.canonical_aor(msg.uri)
        except ValueError:
            return self._answer(key, src, self._response(msg, 416))
        if not self._domain_ok(aor.rpartition("@")[2]):
            return self._answer(key, src, self._response(msg, 404, "Domain Not Served"))
        if not self._routed_here(msg, key, src, aor):
            return
        if self.config.auth is not None and self.config.auth.invite:
            return self._authorized(msg, key, src, aor, self._redirect)
        self._redirect(msg, key, src, aor)

    def _redirect(self, msg: M.Message, key, src: Source, aor: str) -> None:
        d = self.location.read(aor)

        def found(result):
            bindings, known = result
            if bindings:
                resp = self._response(msg, 302)
                now = self.reactor.seconds()
                for b in sorted(bindings.values(),
                                key=lambda b: (-(b.q if b.q is not None else 1.0), b.uri)):
                    resp.add("Contact", b.contact_header(now))
            elif known:
                resp = self._response(msg, 480)
            else:
                resp = self._response(msg, 404)
            self._answer(key, src, resp)
        d.addCallbacks(found, self._store_failed, errbackArgs=(msg, key, src))
        d.addErrback(lambda f: _log.failure("sip: INVITE answer failed", failure=f))

    # ------------------------------------------------------------------
    # RPC and metrics
    # ------------------------------------------------------------------
    def _register_rpc(self) -> None:
        rpc = self.context.rpc
        if rpc is None:
            return
        rpc.register("sip.bindings", self.rpc_bindings,
                     doc="{aor?} -> {bindings: [{aor, contact, expires, q, call_id, cseq}]}",
                     params=Params(aor=Param("str", nullable=True, min=1, max=512)))
        rpc.register("sip.unregister", self.rpc_unregister,
                     doc="{aor}: remove every binding of the AOR now",
                     params=Params(aor=Param("str", required=True, min=1, max=512)))
        rpc.register("sip.stats", self.rpc_stats, doc="requests, responses, drops, bindings",
                     params=Params())
        rpc.register("sip.shards", self.rpc_shards,
                     doc="-> {shards: [{shard, resource, owner, backup, role, bindings, backlog}]}",
                     params=Params())

    @staticmethod
    def _aor_param(aor: str) -> str:
        from appliance.admin.rpc import InvalidParams
        try:
            return M.canonical_aor(aor if ":" in aor else "sip:" + aor)
        except ValueError as e:
            raise InvalidParams.because(f"params.aor: {aor!r} is not a SIP address: {e}")

    def _rows(self, aor: str, bindings) -> list[dict]:
        return [{"aor": aor, "contact": b.uri, "expires": b.expires, "q": b.q,
                 "call_id": b.call_id, "cseq": b.cseq, "path": list(b.path),
                 "received": b.received}
                for b in sorted(bindings.values(), key=lambda b: b.uri)]

    async def _bindings(self, aor: str | None) -> dict:
        if aor is not None:
            aor = self._aor_param(aor)
            bindings, _known = await self.location.read(aor)
            return {"bindings": self._rows(aor, bindings)}
        rows = []
        for one in await self.location.all_aors():
            bindings, _known = await self.location.read(one)
            rows.extend(self._rows(one, bindings))
        return {"bindings": rows}

    def rpc_bindings(self, aor: str | None = None):
        return defer.ensureDeferred(self._bindings(aor))

    def rpc_unregister(self, aor: str):
        aor = self._aor_param(aor)
        route = self.roles.route(aor)
        if route.action != "serve":
            raise ApplicationError(f"not_owner: {aor} belongs to {route.resource}, owned by "
                                   f"{route.owner or 'nobody now'}: ask that node")
        d = self.location.remove_aor(aor)
        if self.replicator is not None:
            def ship(n):
                if not n:
                    return n
                d = self.location.mtime(aor)
                d.addCallback(lambda mtime: self.replicator.replicate(aor, {}, [], mtime))
                return d.addCallback(lambda _: n)
            d.addCallback(ship)

        def done(n):
            if n:
                _log.info("sip: {aor} unregistered by the operator ({n} bindings)", aor=aor, n=n)
            return {"aor": aor, "removed": n}
        return d.addCallback(done)

    def rpc_stats(self) -> dict:
        if not self.running:
            raise ApplicationError("sip service not running")
        return {"role": self.role, "node": self.roles.node_id,
                "owned": sorted(self.roles.owned),
                "requests": dict(self.requests), "responses": dict(self.responses),
                "drops": dict(self.drops), "bindings": self.location.count,
                "transactions": len(self.transactions), "connections": self.connections,
                "pending": self.pending,
                "admission": self.admission.status(),
                "auth": dict(self.auth.results) if self.auth is not None else None,
                "ldap": self._ldap_stats(),
                "replication": self._replication_stats(),
                "sync": None if self.syncgate is None else self.syncgate.status(),
                "counters": dict(self.stats)}

    def rpc_shards(self):
        return defer.ensureDeferred(self._shards())

    async def _shards(self) -> dict:
        roles = self.roles
        counts = [0] * roles.count
        rows = await self.store_rows()
        for member in rows:
            aor = member.partition(" ")[0]
            counts[roles.shard(aor)] += 1
        r = self.replicator
        out = []
        for i, name in enumerate(roles.names):
            backlog = None
            if r is not None:
                backlog = {p: sum(1 for a in r.missed[p] if roles.shard(a) == i)
                           for p in r.peers}
            out.append({"shard": i, "resource": name, "owner": roles.owner(name),
                        "backup": roles.backup(name),
                        "role": "owner" if name in roles.owned else "backup",
                        "epoch": roles.epochs.get(name), "bindings": counts[i],
                        "backlog": backlog,
                        "full_resync_needed": None if r is None else
                        {p: r.full_needed[p] for p in r.peers}})
        return {"node": roles.node_id, "shards": out, "count": roles.shards}

    async def store_rows(self) -> list[str]:
        """Every unexpired "<aor> <contact>" in the expiry index."""
        from services.sip.location import EXPIRY
        now = self.reactor.seconds()
        rows = await self.location.store.zrangebyscore(EXPIRY, now, float("inf"))
        return [m for m, _score in rows]

    def _replication_stats(self):
        r = self.replicator
        if r is None:
            return None
        return {**r.stats, "mode": r.mode,
                "backlog": {p: r.backlog(p) for p in r.peers},
                "missed": {p: len(r.missed[p]) for p in r.peers},
                "full_resync_needed": {p: r.full_needed[p] for p in r.peers},
                "peer_bindings": dict(r.peer_bindings)}

    def _ldap_stats(self):
        creds = getattr(self, "credentials", None)
        if creds is None or not hasattr(creds, "last_server"):
            return None
        return {**creds.stats, "server": creds.last_server, "last_error": creds.last_error,
                "cached_users": len(creds.cache)}

    def collect(self):
        req = CounterMetricFamily("appliance_sip_requests", "SIP requests received, by method",
                                  labels=["method"])
        for method, n in sorted(self.requests.items()):
            req.add_metric([method], n)
        yield req
        resp = CounterMetricFamily("appliance_sip_responses", "SIP responses sent, by code",
                                   labels=["code"])
        for code, n in sorted(self.responses.items()):
            resp.add_metric([code], n)
        yield resp
        drops = CounterMetricFamily("appliance_sip_dropped",
                                    "SIP messages dropped or refused as malformed, by reason",
                                    labels=["reason"])
        for reason, n in sorted(self.drops.items()):
            drops.add_metric([reason], n)
        yield drops
        tx = CounterMetricFamily("appliance_sip_transaction_events",
                                 "Retransmissions absorbed, answers resent, ACKs matched",
                                 labels=["event"])
        for k in ("retransmissions_absorbed", "responses_resent", "acks_matched",
                  "acks_unmatched", "invite_retransmits", "invite_timeouts"):
            tx.add_metric([k], self.stats.get(k, 0))
        yield tx
        if self.auth is not None:
            auth = CounterMetricFamily("appliance_sip_auth", "Digest authentication outcomes",
                                       labels=["result"])
            for result, n in sorted(self.auth.results.items()):
                auth.add_metric([result], n)
            yield auth
        yield GaugeMetricFamily("appliance_sip_bindings", "SIP bindings in the location store",
                                value=self.location.count)
        if self.replicator is not None:
            backlog = GaugeMetricFamily("appliance_sip_replication_backlog",
                                        "AOR updates a backup has not acknowledged or missed",
                                        labels=["peer"])
            lag = GaugeMetricFamily("appliance_sip_replication_lag_seconds",
                                    "Age of the oldest unacknowledged message to a backup",
                                    labels=["peer"])
            for p in self.replicator.peers:
                backlog.add_metric([p], self.replicator.backlog(p))
                try:
                    lag.add_metric([p], self.replicator.link.lag_s(p))
                except Exception:
                    pass
            yield backlog
            yield lag
        yield GaugeMetricFamily("appliance_sip_transactions", "Server transactions held",
                                value=len(self.transactions))
        yield GaugeMetricFamily("appliance_sip_shedding",
                                "1 while the reactor lags and REGISTERs beyond "
                                "shed_min_pending get 503 (services.sip.admission)",
                                value=1 if self.admission.lagging() else 0)
        yield GaugeMetricFamily("appliance_sip_reactor_lag_max_seconds",
                                "Latest admission tick the furthest behind schedule",
                                value=self.admission.stats["max_lag_ms"] / 1000.0)
        yield GaugeMetricFamily("appliance_sip_shards_owned",
                                "Shards (cluster resources) this node serves",
                                value=len(self.roles.owned))
