"""JSON-RPC method registry and error types (no I/O).

Services register plain callables under dotted names (``dhcp4.leases``);
:meth:`MethodRegistry.dispatch` calls one with JSON-RPC params and always
returns a ``Deferred`` that either fires with the result or fails with an
:class:`RPCError`.  That is the single place where exceptions are mapped to
JSON-RPC error codes (STYLE practice 12: map errors at the boundary):

==========================================  ======================================
raised by / around the method               JSON-RPC error
==========================================  ======================================
unknown method name                         -32601 :class:`MethodNotFound`
params do not fit the signature             -32602 :class:`InvalidParams`
:class:`RPCError` (incl. ApplicationError)  passed through unchanged
``appliance.store.StoreUnavailable``        -32001 ``store unavailable: ...``
anything else                               -32603 internal error; the traceback
                                            goes to the log, never to the client
==========================================  ======================================

Application errors use -32000..-32099 and carry ``data = {"reason": ...}``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "RPCError",
    "ParseError",
    "InvalidRequest",
    "MethodNotFound",
    "InvalidParams",
    "InternalError",
    "ApplicationError",
    "STORE_UNAVAILABLE",
    "MethodRegistry",
]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: Application error code for "the state store cannot be reached right now".
STORE_UNAVAILABLE = -32001


class RPCError(Exception):
    """An error that becomes a JSON-RPC ``error`` object as it is."""

    code: int = INTERNAL_ERROR
    message: str = "internal error"

    def __init__(self, message: str | None = None, *, code: int | None = None,
                 data: dict[str, Any] | None = None):
        if message is not None:
            self.message = message
        if code is not None:
            self.code = code
        self.data = data
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-RPC ``error`` member."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code}, message={self.message!r}, data={self.data!r})"


class ParseError(RPCError):
    """-32700: the body is not JSON."""

    code = PARSE_ERROR
    message = "parse error"

    def __init__(self, reason: str):
        super().__init__(data={"reason": reason})


class InvalidRequest(RPCError):
    """-32600: JSON, but not a valid request object (or the body is too large)."""

    code = INVALID_REQUEST
    message = "invalid request"

    def __init__(self, reason: str, message: str | None = None):
        super().__init__(message, data={"reason": reason})


class MethodNotFound(RPCError):
    """-32601: no method of that name is registered."""

    code = METHOD_NOT_FOUND
    message = "method not found"

    def __init__(self, method: str | None = None):
        super().__init__(data={"method": method} if method is not None else None)


class InvalidParams(RPCError):
    """-32602: the params do not fit the method (the message says how)."""

    code = INVALID_PARAMS
    message = "invalid params"

    def __init__(self, message: str = "invalid params", data: dict[str, Any] | None = None):
        super().__init__(message, data=data)


class InternalError(RPCError):
    """-32603: the method failed unexpectedly (details are in the node log)."""

    code = INTERNAL_ERROR
    message = "internal error"


class ApplicationError(RPCError):
    """An application error (-32000..-32099) with a human ``data.reason``.

    ``raise ApplicationError("unknown resource 'x'", code=-32020)``
    """

    def __init__(self, reason: str, code: int = -32000, message: str = "application error"):
        if not -32099 <= code <= -32000:
            raise ValueError(f"application error codes are -32099..-32000, not {code}")
        super().__init__(message, code=code, data={"reason": reason})

    @property
    def reason(self) -> str:
        return self.data["reason"]


def _describe_exception(exc: BaseException) -> str:
    return type(exc).__name__


class MethodRegistry:
    """Named RPC methods; ``dispatch`` runs one and maps its errors."""

    _log = Logger()

    def __init__(self) -> None:
        self._methods: dict[str, tuple[Callable[..., Any], str]] = {}
        self.register("system.methods", self.names, doc="Sorted names of all methods.")

    # -- registration ----------------------------------------------------
    def register(self, name: str, func: Callable[..., Any], *, doc: str = "") -> None:
        """Add ``func`` as method ``name``; a name can be registered once."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"method name must be a non-empty string, not {name!r}")
        if name.startswith("rpc."):
            raise ValueError(f"method names starting with 'rpc.' are reserved: {name!r}")
        if not callable(func):
            raise TypeError(f"method {name!r}: {func!r} is not callable")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        if not doc:
            doc = inspect.getdoc(func) or ""
            doc = doc.splitlines()[0] if doc else ""
        self._methods[name] = (func, doc)

    def unregister(self, name: str) -> None:
        """Remove method ``name`` (KeyError if it is not registered)."""
        if name not in self._methods:
            raise KeyError(name)
        del self._methods[name]

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def names(self) -> list[str]:
        """Sorted method names."""
        return sorted(self._methods)

    def describe(self) -> dict[str, str]:
        """``{name: doc}`` for every method, sorted by name."""
        return {name: self._methods[name][1] for name in sorted(self._methods)}

    # -- calling ---------------------------------------------------------
    def dispatch(self, method: str, params: Any = None) -> defer.Deferred:
        """Call ``method`` with ``params`` (dict: keywords, list: positional, None: none).

        Never raises: the Deferred fails with an :class:`RPCError`.
        """
        entry = self._methods.get(method) if isinstance(method, str) else None
        if entry is None:
            return defer.fail(MethodNotFound(method if isinstance(method, str) else None))
        func = entry[0]
        if params is None:
            args, kwargs = (), {}
        elif isinstance(params, dict):
            args, kwargs = (), params
        elif isinstance(params, (list, tuple)):
            args, kwargs = tuple(params), {}
        else:
            return defer.fail(InvalidParams("invalid params: expected an object or an array, "
                                            f"got {type(params).__name__}"))
        if kwargs and not all(isinstance(k, str) for k in kwargs):
            return defer.fail(InvalidParams("invalid params: parameter names must be strings"))
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            signature = None    # builtins without a signature: let the call decide
        if signature is not None:
            try:
                signature.bind(*args, **kwargs)
            except TypeError as e:
                return defer.fail(InvalidParams(f"invalid params: {e}"))
        d = defer.maybeDeferred(func, *args, **kwargs)
        d.addErrback(self._map_failure, method)
        return d

    def _map_failure(self, failure: Failure, method: str) -> Failure:
        exc = failure.value
        if isinstance(exc, RPCError):
            return failure
        from appliance.store import StoreUnavailable
        if isinstance(exc, StoreUnavailable):
            self._log.warn("rpc {method}: store unavailable: {why}", method=method, why=exc)
            return Failure(ApplicationError(f"store unavailable: {exc}", code=STORE_UNAVAILABLE))
        self._log.failure("rpc method {method} failed", failure=failure, method=method)
        return Failure(InternalError(
            "internal error", data={"reason": f"{_describe_exception(exc)} (see the node log)"}))
