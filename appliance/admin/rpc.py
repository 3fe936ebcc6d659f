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

Params are checked before the method runs, by a declarative :class:`Params`
spec given at registration (``register(name, func, params=Params(...))``), or,
without one, by a spec derived from the function's signature and its
``str``/``int``/``float``/``bool`` annotations.  Every refusal is -32602 with
``message = "invalid params: REASON"`` and ``data.reason = REASON``, where
REASON names the parameter: ``params.address: "x" is not an IPv4 address``.
"""

from __future__ import annotations

import inspect
import ipaddress
import math
import re
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
    "Param",
    "Params",
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

    @classmethod
    def because(cls, reason: str) -> "InvalidParams":
        """-32602 with ``message = "invalid params: REASON"`` and ``data.reason``."""
        return cls(f"invalid params: {reason}", data={"reason": reason})


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


# ---------------------------------------------------------------------------
# Declarative params validation
# ---------------------------------------------------------------------------

_MISSING = object()
_HWADDR = re.compile(r"^[0-9a-fA-F]{2}([:-]?[0-9a-fA-F]{2}){5}$")


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return '"' + text.replace('"', '\\"') + '"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _got(value: Any) -> str:
    """``got ...`` text: the JSON kind, and the value for scalars."""
    if value is None or isinstance(value, (dict, list)):
        return _json_kind(value)
    return f"{_json_kind(value)} {_show(value)}"


class Param:
    """One parameter: its kind and limits.

    Kinds: ``str``, ``int``, ``number``, ``bool``, ``ipv4``, ``ipv6``, ``ip``
    (addresses, given back normalized as ``str``), ``ipv4_network``,
    ``ipv6_network``, ``hwaddr`` (``aa:bb:cc:dd:ee:ff``, given back lower case
    with ``:``), ``object``, ``array``, ``any``.  ``min``/``max`` bound numbers
    (and the length of strings and arrays); ``choices`` lists allowed values;
    ``nullable`` lets ``null`` through as ``None``.  A param without a
    ``default`` and not ``required`` is simply not passed when absent.
    """

    KINDS = ("str", "int", "number", "bool", "ipv4", "ipv6", "ip", "ipv4_network",
             "ipv6_network", "hwaddr", "object", "array", "any")

    def __init__(self, kind: str = "any", *, required: bool = False, default: Any = _MISSING,
                 min: float | None = None, max: float | None = None,
                 choices: tuple | list | None = None, nullable: bool = False):
        if kind not in self.KINDS:
            raise ValueError(f"unknown param kind {kind!r} (known: {', '.join(self.KINDS)})")
        self.kind, self.required, self.default = kind, required, default
        self.min, self.max = min, max
        self.choices = tuple(choices) if choices is not None else None
        self.nullable = nullable

    def check(self, path: str, value: Any) -> Any:
        """The converted value; raises :class:`InvalidParams` naming ``path``."""
        if value is None and (self.nullable or self.kind == "any"):
            return None
        kind = self.kind
        if kind == "any":
            return value
        if kind == "bool":
            if not isinstance(value, bool):
                raise InvalidParams.because(f"{path}: expected true or false, got "
                                            f"{_got(value)}")
            return value
        if kind in ("int", "number"):
            ok = isinstance(value, int) or (kind == "number" and isinstance(value, float))
            if isinstance(value, bool) or not ok:
                what = "an integer" if kind == "int" else "a number"
                raise InvalidParams.because(f"{path}: expected {what}, got "
                                            f"{_got(value)}")
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidParams.because(f"{path}: {value} is not a finite number")
            self._bounds(path, value, value)
            return self._choice(path, value)
        if kind == "object":
            if not isinstance(value, dict):
                raise InvalidParams.because(f"{path}: expected an object, got {_json_kind(value)}")
            return value
        if kind == "array":
            if not isinstance(value, list):
                raise InvalidParams.because(f"{path}: expected an array, got {_json_kind(value)}")
            self._bounds(path, len(value), value, what="items")
            return value
        if not isinstance(value, str):
            raise InvalidParams.because(f"{path}: expected {self._string_kind()}, got "
                                            f"{_got(value)}")
        if kind == "str":
            self._bounds(path, len(value), value, what="characters")
            return self._choice(path, value)
        if kind in ("ipv4", "ipv6", "ip"):
            try:
                address = ipaddress.ip_address(value)
            except ValueError:
                address = None
            if address is None or (kind != "ip" and address.version != int(kind[-1])):
                raise InvalidParams.because(f"{path}: {_show(value)} is not "
                                            f"{self._string_kind()}")
            return str(address)
        if kind in ("ipv4_network", "ipv6_network"):
            try:
                network = ipaddress.ip_network(value, strict=False)
            except ValueError:
                network = None
            if network is None or network.version != int(kind[3]):
                raise InvalidParams.because(f"{path}: {_show(value)} is not "
                                            f"{self._string_kind()}")
            return str(network)
        if kind == "hwaddr":
            if not _HWADDR.match(value):
                raise InvalidParams.because(f"{path}: {_show(value)} is not {self._string_kind()}")
            digits = re.sub(r"[:-]", "", value).lower()
            return ":".join(digits[i:i + 2] for i in range(0, 12, 2))
        raise AssertionError(kind)   # pragma: no cover

    def _string_kind(self) -> str:
        return {"str": "a string", "ipv4": "an IPv4 address", "ipv6": "an IPv6 address",
                "ip": "an IP address", "ipv4_network": "an IPv4 network",
                "ipv6_network": "an IPv6 network",
                "hwaddr": "a hardware address (aa:bb:cc:dd:ee:ff)"}[self.kind]

    def _bounds(self, path: str, measure: float, value: Any, what: str = "") -> None:
        unit = f" {what}" if what else ""
        shown = _show(value) if not what else f"{measure}{unit}"
        if self.min is not None and measure < self.min:
            raise InvalidParams.because(f"{path}: {shown} is below the minimum "
                                        f"{self.min}{unit}")
        if self.max is not None and measure > self.max:
            raise InvalidParams.because(f"{path}: {shown} is above the maximum "
                                        f"{self.max}{unit}")

    def _choice(self, path: str, value: Any) -> Any:
        if self.choices is not None and value not in self.choices:
            raise InvalidParams.because(f"{path}: {_show(value)} is not one of "
                                        + ", ".join(_show(c) for c in self.choices))
        return value

    def __repr__(self) -> str:
        return f"Param({self.kind!r}, required={self.required})"


class Params:
    """The params of one method: names in positional order, each a :class:`Param`.

    :meth:`check` accepts ``None`` (no params), an object (unknown names are
    refused, with a did-you-mean) or an array (in declaration order) and gives
    back the keyword arguments for the method.
    ``Params(exactly_one_of=("address", "hwaddr"), address=..., hwaddr=...)``
    also requires exactly one of those names.
    """

    def __init__(self, *, exactly_one_of: tuple[str, ...] = (), **params: Param):
        self.params = dict(params)
        self.exactly_one_of = tuple(exactly_one_of)
        for name in self.exactly_one_of:
            if name not in self.params:
                raise ValueError(f"exactly_one_of names {name!r}, which is not a param")

    def check(self, params: Any) -> dict[str, Any]:
        if params is None:
            given: dict[str, Any] = {}
        elif isinstance(params, dict):
            given = params
        elif isinstance(params, (list, tuple)):
            names = list(self.params)
            if len(params) > len(names):
                raise InvalidParams.because(f"params: at most {len(names)} positional "
                                            f"value(s) ({', '.join(names) or 'none'}), "
                                            f"got {len(params)}")
            given = dict(zip(names, params))
        else:
            raise InvalidParams.because("params: expected an object or an array, got "
                                        f"{_json_kind(params)}")
        unknown = [k for k in given if k not in self.params]
        if unknown:
            import difflib
            key = unknown[0]
            known = sorted(self.params)
            hint = difflib.get_close_matches(str(key), known, n=1)
            more = (f" (did you mean {hint[0]!r}?)" if hint else
                    f" (known: {', '.join(known)})" if known else " (this method takes none)")
            raise InvalidParams.because(f"params.{key}: unknown parameter{more}")
        out: dict[str, Any] = {}
        for name, spec in self.params.items():
            if name in given:
                out[name] = spec.check(f"params.{name}", given[name])
            elif spec.required:
                raise InvalidParams.because(f"params.{name}: missing (required)")
            elif spec.default is not _MISSING:
                out[name] = spec.default
        if self.exactly_one_of:
            present = [n for n in self.exactly_one_of if given.get(n) is not None]
            if len(present) != 1:
                names = " or ".join(self.exactly_one_of)
                raise InvalidParams.because(f"params: give exactly one of {names}"
                                            + (f" (got {', '.join(present)})" if present else ""))
        return out

    @classmethod
    def from_signature(cls, func: Callable[..., Any]) -> "Params | None":
        """A spec from ``func``'s signature (None if it takes ``*args``/``**kw``
        or has no signature); ``str``/``int``/``float``/``bool`` annotations
        become kinds, defaults make a param optional."""
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            return None
        try:
            import typing
            hints = typing.get_type_hints(func)
        except Exception:
            hints = {}
        params: dict[str, Param] = {}
        for name, p in signature.parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                return None
            hint = hints.get(name, p.annotation)
            kind = _KIND_OF_HINT.get(hint, "any")
            if p.default is p.empty:
                params[name] = Param(kind, required=True)
            else:
                params[name] = Param(kind, default=p.default, nullable=p.default is None)
        return cls(**params)


_KIND_OF_HINT: dict[Any, str] = {str: "str", int: "int", float: "number", bool: "bool",
                                 "str": "str", "int": "int", "float": "number", "bool": "bool"}


def _describe_exception(exc: BaseException) -> str:
    return type(exc).__name__


class MethodRegistry:
    """Named RPC methods; ``dispatch`` runs one and maps its errors."""

    _log = Logger()

    def __init__(self) -> None:
        self._methods: dict[str, tuple[Callable[..., Any], str, Params | None]] = {}
        self.register("system.methods", self.names, doc="Sorted names of all methods.",
                      params=Params())

    # -- registration ----------------------------------------------------
    def register(self, name: str, func: Callable[..., Any], *, doc: str = "",
                 params: Params | None = None) -> None:
        """Add ``func`` as method ``name``; a name can be registered once.

        ``params`` declares the accepted params (:class:`Params`); without it
        a spec is derived from ``func``'s signature and annotations.
        """
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
        if params is None:
            params = Params.from_signature(func)
        elif not isinstance(params, Params):
            raise TypeError(f"method {name!r}: params must be a Params, not {params!r}")
        self._methods[name] = (func, doc, params)

    def params_of(self, name: str) -> Params | None:
        """The params spec of method ``name`` (None: checked by signature only)."""
        return self._methods[name][2]

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
        func, _doc, spec = entry
        if spec is not None:
            try:
                args, kwargs = (), spec.check(params)
            except InvalidParams as e:
                return defer.fail(e)
        elif params is None:
            args, kwargs = (), {}
        elif isinstance(params, dict):
            args, kwargs = (), params
        elif isinstance(params, (list, tuple)):
            args, kwargs = tuple(params), {}
        else:
            return defer.fail(InvalidParams.because("params: expected an object or an array, "
                                                    f"got {type(params).__name__}"))
        if spec is None:
            if kwargs and not all(isinstance(k, str) for k in kwargs):
                return defer.fail(InvalidParams.because("params: names must be strings"))
            try:
                signature = inspect.signature(func)
            except (TypeError, ValueError):
                signature = None    # builtins without a signature: let the call decide
            if signature is not None:
                try:
                    signature.bind(*args, **kwargs)
                except TypeError as e:
                    return defer.fail(InvalidParams.because(str(e)))
        d = defer.maybeDeferred(func, *args, **kwargs)
        d.addErrback(self._map_failure, method)
        return d

    def _map_failure(self, failure: Failure, method: str) -> Failure:
        exc = failure.value
        if isinstance(exc, RPCError):
            return failure
        from appliance.errors import OperatorError
        if isinstance(exc, OperatorError):     # a core layer refused (cluster, ...)
            return Failure(ApplicationError(str(exc), code=exc.code))
        from appliance.store import StoreUnavailable
        if isinstance(exc, StoreUnavailable):
            self._log.warn("rpc {method}: store unavailable: {why}", method=method, why=exc)
            return Failure(ApplicationError(f"store unavailable: {exc}", code=STORE_UNAVAILABLE))
        self._log.failure("rpc method {method} failed", failure=failure, method=method)
        return Failure(InternalError(
            "internal error", data={"reason": f"{_describe_exception(exc)} (see the node log)"}))
