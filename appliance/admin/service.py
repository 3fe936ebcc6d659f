"""The admin listener: JSON-RPC at ``/rpc``, Prometheus text at ``/metrics``.

:class:`AdminService` needs only a settings object with the attributes of
:class:`AdminSettings` (the node passes its ``config.admin`` section):

``listen``
    Twisted server endpoint string (``tcp:8740:interface=127.0.0.1``,
    ``ssl:8740:interface=127.0.0.1:privateKey=k.pem:certKey=c.pem``, ``unix:...``).
``token_file``
    Bearer token file, created (0600) on first start.
``client_ca``
    PEM file with the CA certificate(s) whose client certificates are
    required; only with an ``ssl:`` listener.
``max_request_bytes``
    Largest request body accepted.  A larger ``Content-Length`` is answered
    413 as soon as the headers are in, and the connection is closed (the body
    is never read); a chunked body is counted and capped, never buffered whole.
``max_batch``
    Most members of one JSON-RPC batch (more: -32600, nothing runs).
``metrics_auth``
    If true, ``/metrics`` also needs the bearer token.  ``/`` (name and
    version) and, by default, ``/metrics`` need no token: fine on loopback;
    on other addresses set ``metrics_auth = true`` (and use ``ssl:``).

The node runs as root (DHCP binds port 67 after ``startService``;
``privilegedStartService`` binds nothing), so ``twistd --uid/--gid`` is not
supported: see etc/README.md.
"""

from __future__ import annotations

import errno
import io
import json
import os
import weakref

from twisted.application.service import Service
from twisted.internet import defer, endpoints
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource

from appliance import __version__
from appliance.admin.auth import BearerTokenAuth, TokenFileError
from appliance.admin.jsonrpc import JSONRPCResource
from appliance.admin.listen import EndpointError, split_endpoint
from appliance.admin.metrics import AdminMetrics, metrics_resource
from appliance.config import AdminSection

__all__ = ["AdminService", "AdminSettings", "AdminListenError"]


#: What :class:`AdminService` reads: the ``[admin]`` section of the node config.
AdminSettings = AdminSection


class AdminListenError(Exception):
    """The admin listener could not start; the message is one line naming it."""


class _CappedBody(io.BytesIO):
    """A request body buffer that keeps at most ``cap`` bytes (the rest is counted, dropped)."""

    def __init__(self, cap: int):
        super().__init__()
        self.cap = cap
        self.received = 0

    def write(self, data) -> int:
        size = len(data)
        self.received += size
        room = self.cap - self.tell()
        if room > 0:
            super().write(bytes(data[:room]))
        return size


def _too_large_response(max_request_bytes: int) -> bytes:
    from appliance.admin.jsonrpc import error_body
    from appliance.admin.rpc import INVALID_REQUEST
    body = error_body(INVALID_REQUEST, "request too large",
                      {"reason": f"the body exceeds {max_request_bytes} bytes"})
    return (b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: application/json\r\nCache-Control: no-store\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() +
            b"\r\n\r\n" + body)


def _request_factory(max_request_bytes: int, metrics: AdminMetrics | None = None):
    class AdminRequest(server.Request):
        # The body is JSON, never a form: do not parse it as one.
        _parsePOSTFormSubmission = False
        _refused = False

        def gotLength(self, length):
            # Keep one byte more than the limit so the resource can tell
            # "exactly at the limit" from "over it" without buffering a huge body.
            self.content = _CappedBody(max_request_bytes + 1)
            if length is not None and length > max_request_bytes:
                # Declared too large: answer now and close, before any body
                # byte is read (an unauthenticated client cannot stream on).
                self._refused = True
                if metrics is not None:
                    metrics.reject("too_large")
                transport = self.channel.transport
                transport.write(_too_large_response(max_request_bytes))
                transport.loseConnection()

        def handleContentChunk(self, data):
            if not self._refused:
                super().handleContentChunk(data)

        def requestReceived(self, command, path, version):
            if self._refused:
                return          # already answered 413; the connection is closing
            super().requestReceived(command, path, version)

    return AdminRequest


class _Index(Resource):
    """``GET /``: what is served here."""

    def render_GET(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({
            "service": "appliance admin",
            "version": __version__,
            "endpoints": {
                "/rpc": "JSON-RPC 2.0 (POST, Authorization: Bearer <token>)",
                "/metrics": "Prometheus text format",
            },
        }).encode()

    def getChild(self, path: bytes, request):
        if path == b"":
            return self
        return super().getChild(path, request)


class _RequireToken(Resource):
    """Wraps a leaf resource: 401 unless the request carries the bearer token."""

    isLeaf = True

    def __init__(self, wrapped: Resource, authorizer, metrics: AdminMetrics | None):
        super().__init__()
        self.wrapped = wrapped
        self.authorizer = authorizer
        self.metrics = metrics

    def render(self, request):
        if not self.authorizer.check(request):
            if self.metrics is not None:
                self.metrics.reject("unauthorized")
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="appliance"')
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"unauthorized: missing or invalid bearer token\n"
        return self.wrapped.render(request)


class _AdminSite(server.Site):
    """A Site that remembers its connections so stopping can close idle keep-alives."""

    noisy = False
    displayTracebacks = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.channels: weakref.WeakSet = weakref.WeakSet()

    def log(self, request):
        # No per-request access log: Prometheus scrapes would drown the node log.
        # Refused requests are counted (appliance_admin_rejected_total); state
        # changes made through RPC methods are logged by the services themselves.
        pass

    def buildProtocol(self, addr):
        channel = super().buildProtocol(addr)
        if channel is not None:
            self.channels.add(channel)
        return channel


def _reason(exc: BaseException) -> str:
    """One lower-case phrase for why listening failed."""
    if isinstance(exc, CannotListenError):
        sock_error = exc.socketError
        if isinstance(sock_error, OSError):
            if sock_error.errno == errno.EADDRINUSE:
                return "address already in use"
            if sock_error.strerror:
                return sock_error.strerror[0].lower() + sock_error.strerror[1:]
        return str(sock_error)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return where + exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


class AdminService(Service):
    """Serves the admin site on ``config.listen``; see the module docstring."""

    name = "admin"
    _log = Logger()

    def __init__(self, reactor, config, registry, metrics_registry=None):
        self.reactor = reactor
        self.config = config
        self.registry = registry
        self.auth = BearerTokenAuth(config.token_file)
        self.metrics = AdminMetrics(metrics_registry) if metrics_registry is not None else None
        self.port = None
        self.rpc_resource = JSONRPCResource(registry, self.auth,
                                            max_request_bytes=config.max_request_bytes,
                                            metrics=self.metrics,
                                            max_batch=getattr(config, "max_batch", 100))
        root = _Index()
        root.putChild(b"rpc", self.rpc_resource)
        if metrics_registry is not None:
            metrics: Resource = metrics_resource(metrics_registry)
            if config.metrics_auth:
                metrics = _RequireToken(metrics, self.auth, self.metrics)
            root.putChild(b"metrics", metrics)
        self.site = _AdminSite(root, requestFactory=_request_factory(config.max_request_bytes,
                                                                        self.metrics),
                               timeout=60, reactor=reactor)

    # -- lifecycle -------------------------------------------------------
    def startService(self) -> defer.Deferred:
        """Load or create the token and listen; fires when listening.

        Fails with :class:`AdminListenError` ("admin listener LISTEN: reason").
        """
        super().startService()
        try:
            self.auth.load_or_create()
            endpoint = self._endpoint()
            d = endpoint.listen(self.site)
        except Exception:
            return defer.fail(self._failed(Failure()))
        d.addCallbacks(self._listening, self._failed)
        return d

    def _endpoint(self):
        listen = self.config.listen
        if not self.config.client_ca:
            return endpoints.serverFromString(self.reactor, listen)
        return self._mutual_tls_endpoint(listen, self.config.client_ca)

    def _mutual_tls_endpoint(self, listen: str, client_ca: str):
        from appliance.net.tls import server_options
        try:
            kind, args, kwargs = split_endpoint(listen)
        except EndpointError as e:
            raise AdminListenError(str(e)) from None
        if kind != "ssl":
            raise ValueError('client_ca needs an "ssl:" listener')
        unknown = set(kwargs) - {"port", "interface", "backlog", "privateKey", "certKey",
                                 "extraCertChain"}
        if unknown or len(args) > 1:
            raise ValueError("unsupported option(s) with client_ca: "
                             + ", ".join(sorted(unknown) or args[1:]))
        try:
            port = int(kwargs.get("port", args[0] if args else ""))
            backlog = int(kwargs.get("backlog", 50))
        except ValueError:
            raise ValueError("port and backlog must be numbers") from None
        if "privateKey" not in kwargs:
            raise ValueError("an ssl: listener needs privateKey=")
        key_pem = _read(kwargs["privateKey"])
        cert_pem = _read(kwargs.get("certKey", kwargs["privateKey"]))
        if "extraCertChain" in kwargs:
            cert_pem += b"\n" + _read(kwargs["extraCertChain"])
        ca_pem = _read(client_ca)
        try:
            options = server_options(cert_pem, key_pem, ca_pem)
        except Exception as e:
            raise ValueError(f"bad TLS material: {e}") from None
        return endpoints.SSL4ServerEndpoint(self.reactor, port, options, backlog=backlog,
                                            interface=kwargs.get("interface", ""))

    def _listening(self, port):
        self.port = port
        host = port.getHost()
        address = getattr(host, "name", None) or f"{getattr(host, 'host', '?')}:{getattr(host, 'port', '?')}"
        self._log.info("admin listening on {address} ({listen}, mutual TLS: {mtls})",
                       address=address, listen=self.config.listen,
                       mtls=bool(self.config.client_ca))
        return port

    def _failed(self, failure: Failure) -> Failure:
        self.running = False
        exc = failure.value
        if isinstance(exc, AdminListenError):
            return failure
        if isinstance(exc, TokenFileError):
            return Failure(AdminListenError(str(exc)))
        message = f"admin listener {self.config.listen}: {_reason(exc)}"
        return Failure(AdminListenError(message))

    def stopService(self) -> defer.Deferred:
        """Stop listening and close idle connections."""
        super().stopService()
        port, self.port = self.port, None
        for channel in list(self.site.channels):
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.loseConnection()
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    # -- helpers for the node and tests ------------------------------------
    @property
    def url(self) -> str | None:
        """``http(s)://host:port/rpc`` of the live listener (None if not listening)."""
        if self.port is None:
            return None
        host = self.port.getHost()
        if not hasattr(host, "port"):
            return None
        scheme = "https" if self.config.listen.startswith("ssl:") else "http"
        h = host.host if ":" not in host.host else f"[{host.host}]"
        if h in ("0.0.0.0", ""):
            h = "127.0.0.1"
        elif h == "[::]":
            h = "[::1]"
        return f"{scheme}://{h}:{host.port}/rpc"


def _read(path: str) -> bytes:
    with open(os.path.expanduser(path), "rb") as fh:
        return fh.read()
