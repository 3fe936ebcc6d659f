"""JSON-RPC 2.0 over HTTP: the ``/rpc`` resource.

Protocol decisions (the JSON-RPC 2.0 spec leaves the HTTP mapping open):

- Only ``POST``; ``GET``/``HEAD`` get HTTP 405 with ``Allow: POST``.
- The bearer token is checked before anything else: HTTP 401,
  ``WWW-Authenticate: Bearer`` and an error body with code
  :data:`UNAUTHORIZED` (-32002), ``data.reason`` "missing or invalid bearer token".
- Bodies above ``max_request_bytes`` get HTTP 413 and a -32600 "request too
  large" error; they are never parsed.
- Every other answer, including JSON-RPC errors (parse error, invalid
  request, method errors), is HTTP 200 with ``Content-Type: application/json``.
- A request that produces no response object (one notification, or a batch
  of notifications only) gets **HTTP 204 with an empty body**.
- Invalid request objects are answered with ``id: null`` (the id is not
  trusted from an object that is not a valid request).
- Batch members run concurrently; responses keep the order of the requests.
  A batch has at most ``max_batch`` members (default 100, ``admin.max_batch``);
  a larger one is refused whole with one -32600 error, nothing is run.
- Results are encoded with ``allow_nan=False``; ``ipaddress`` objects, sets,
  paths and datetimes are converted; anything else that is not JSON becomes a
  -32603 error for that call (and a log entry), never a broken body.
"""

from __future__ import annotations

import datetime
import enum
import ipaddress
import json
from pathlib import PurePath
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from appliance.admin.metrics import INVALID_METHOD, UNKNOWN_METHOD
from appliance.admin.rpc import (INTERNAL_ERROR, INVALID_REQUEST, PARSE_ERROR, InternalError,
                                 MethodRegistry, RPCError)

__all__ = ["JSONRPCResource", "UNAUTHORIZED", "error_body"]

#: JSON-RPC error code in the 401 body.
UNAUTHORIZED = -32002

_CONTENT_TYPE = b"application/json"


def _json_default(value: Any) -> Any:
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address, ipaddress.IPv4Network,
                          ipaddress.IPv6Network, ipaddress.IPv4Interface,
                          ipaddress.IPv6Interface, PurePath)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_json_default)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def error_body(code: int, message: str, data: dict | None = None, id: Any = None) -> bytes:
    """A complete JSON-RPC error response, encoded."""
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _dumps({"jsonrpc": "2.0", "error": error, "id": id}).encode()


def _valid_id(value: Any) -> bool:
    return value is None or isinstance(value, str) or (
        isinstance(value, (int, float)) and not isinstance(value, bool))


def _request_problem(obj: Any) -> str | None:
    """Why ``obj`` is not a JSON-RPC 2.0 request object, or None."""
    if not isinstance(obj, dict):
        return f"a request must be an object, not {_kind(obj)}"
    if obj.get("jsonrpc") != "2.0":
        return 'member "jsonrpc" must be exactly "2.0"'
    method = obj.get("method")
    if not isinstance(method, str):
        return 'member "method" must be a string'
    if "params" in obj and not isinstance(obj["params"], (list, dict)):
        return 'member "params" must be an object or an array'
    if "id" in obj and not _valid_id(obj["id"]):
        return 'member "id" must be a string, a number or null'
    return None


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


class JSONRPCResource(Resource):
    """``POST /rpc``: single requests and batches, dispatched to a :class:`MethodRegistry`."""

    isLeaf = True
    _log = Logger()

    def __init__(self, registry: MethodRegistry, authorizer, *,
                 max_request_bytes: int = 1_048_576, metrics=None, max_batch: int = 100):
        super().__init__()
        self.max_batch = max_batch
        self.registry = registry
        self.authorizer = authorizer
        self.max_request_bytes = max_request_bytes
        self.metrics = metrics

    # -- HTTP ------------------------------------------------------------
    def render_GET(self, request) -> bytes:
        request.setHeader(b"allow", b"POST")
        return self._error_now(request, 405, INVALID_REQUEST, "method not allowed",
                               {"reason": "use POST with a JSON-RPC 2.0 body"})

    def render_POST(self, request):
        if not self.authorizer.check(request):
            self._reject("unauthorized")
            request.setHeader(b"www-authenticate", b'Bearer realm="appliance"')
            return self._error_now(request, 401, UNAUTHORIZED, "unauthorized",
                                   {"reason": "missing or invalid bearer token"})
        if self._declared_length(request) > self.max_request_bytes:
            return self._too_large(request)
        content = getattr(request, "content", None)
        body = content.read(self.max_request_bytes + 1) if content is not None else b""
        if len(body) > self.max_request_bytes:
            return self._too_large(request)
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:    # UnicodeDecodeError is a ValueError
            self._reject("parse_error")
            return self._error_now(request, 200, PARSE_ERROR, "parse error",
                                   {"reason": _short(e)})

        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))
        d = self.handle(payload)
        d.addCallback(self._respond, request, gone)
        d.addErrback(self._respond_failure, request, gone)
        d.addErrback(lambda f: self._log.failure("admin rpc: cannot finish a response",
                                                 failure=f))
        return NOT_DONE_YET

    def _declared_length(self, request) -> int:
        value = request.getHeader(b"content-length")
        if not value:
            return 0
        try:
            return int(value)
        except (TypeError, ValueError):
            return 0

    def _too_large(self, request) -> bytes:
        self._reject("too_large")
        return self._error_now(request, 413, INVALID_REQUEST, "request too large",
                               {"reason": f"the body exceeds {self.max_request_bytes} bytes"})

    def _error_now(self, request, status: int, code: int, message: str, data: dict) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", _CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        return error_body(code, message, data)

    def _reject(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.reject(reason)

    def _respond(self, body: bytes | None, request, gone: list) -> None:
        if gone:
            return          # the client went away; nothing to write to
        request.setHeader(b"cache-control", b"no-store")
        if body is None:
            request.setResponseCode(204)
        else:
            request.setResponseCode(200)
            request.setHeader(b"content-type", _CONTENT_TYPE)
            request.write(body)
        request.finish()

    def _respond_failure(self, failure: Failure, request, gone: list) -> None:
        # handle() maps every error itself; this is the last line of defence.
        self._log.failure("admin rpc: request handling failed", failure=failure)
        if gone:
            return
        request.setResponseCode(500)
        request.setHeader(b"content-type", _CONTENT_TYPE)
        request.write(error_body(INTERNAL_ERROR, "internal error"))
        request.finish()

    # -- JSON-RPC --------------------------------------------------------
    def handle(self, payload: Any) -> defer.Deferred:
        """Process a parsed body; fire with the response bytes, or None for "no response"."""
        try:
            if isinstance(payload, list):
                if not payload:
                    self._record(INVALID_METHOD, False)
                    return defer.succeed(error_body(INVALID_REQUEST, "invalid request",
                                                    {"reason": "empty batch"}))
                if len(payload) > self.max_batch:
                    self._record(INVALID_METHOD, False)
                    return defer.succeed(error_body(
                        INVALID_REQUEST, "invalid request",
                        {"reason": f"a batch of {len(payload)} requests exceeds the limit of "
                                   f"{self.max_batch} (admin.max_batch)"}))
                calls = [self._call(item) for item in payload]
                d = defer.gatherResults(calls, consumeErrors=True)
                d.addCallback(lambda parts: [p for p in parts if p is not None])
                d.addCallback(lambda parts: ("[" + ",".join(parts) + "]").encode()
                              if parts else None)
                return d
            d = self._call(payload)
            d.addCallback(lambda part: part.encode() if part is not None else None)
            return d
        except Exception:
            return defer.fail()

    def _call(self, obj: Any) -> defer.Deferred:
        """One request object -> Deferred of its encoded response (str) or None."""
        problem = _request_problem(obj)
        if problem is not None:
            self._record(INVALID_METHOD, False)
            return defer.succeed(_dumps({"jsonrpc": "2.0", "error": {
                "code": INVALID_REQUEST, "message": "invalid request",
                "data": {"reason": problem}}, "id": None}))
        method: str = obj["method"]
        notification = "id" not in obj
        request_id = obj.get("id")
        label = method if method in self.registry else UNKNOWN_METHOD
        d = self.registry.dispatch(method, obj.get("params"))
        d.addCallback(self._encode_result, request_id, method)
        d.addErrback(self._encode_error, request_id, method)

        def finish(part_ok):
            part, ok = part_ok
            self._record(label, ok)
            return None if notification else part
        d.addCallback(finish)
        return d

    def _encode_result(self, result: Any, request_id: Any, method: str) -> tuple[str, bool]:
        try:
            return _dumps({"jsonrpc": "2.0", "result": result, "id": request_id}), True
        except (TypeError, ValueError, RecursionError) as e:
            self._log.error("rpc {method}: result is not JSON: {why}", method=method,
                            why=_short(e))
            error = InternalError("internal error",
                                  data={"reason": "result is not JSON (see the node log)"})
            return _dumps({"jsonrpc": "2.0", "error": error.to_dict(), "id": request_id}), False

    def _encode_error(self, failure: Failure, request_id: Any, method: str) -> tuple[str, bool]:
        exc = failure.value
        if not isinstance(exc, RPCError):
            self._log.failure("rpc {method}: unexpected failure", failure=failure, method=method)
            exc = InternalError()
        try:
            return _dumps({"jsonrpc": "2.0", "error": exc.to_dict(), "id": request_id}), False
        except (TypeError, ValueError, RecursionError):
            self._log.error("rpc {method}: error data is not JSON: {error!r}", method=method,
                            error=exc)
            return _dumps({"jsonrpc": "2.0", "error": {"code": exc.code, "message": str(
                exc.message)}, "id": request_id}), False

    def _record(self, method: str, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.record(method, ok)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
