"""MethodRegistry: registration, dispatch, and the mapping of errors to JSON-RPC codes."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.admin import ApplicationError, InvalidParams, MethodRegistry, RPCError
from appliance.admin.rpc import InternalError, MethodNotFound
from appliance.store import StoreUnavailable


def result_of(d: defer.Deferred):
    """The result a fired Deferred holds (like SynchronousTestCase.successResultOf)."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure_of(d: defer.Deferred) -> Failure:
    """The Failure a fired Deferred holds (like SynchronousTestCase.failureResultOf)."""
    out = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    assert isinstance(out[0], Failure), f"expected a failure, got {out[0]!r}"
    return out[0]


@pytest.fixture
def registry():
    reg = MethodRegistry()
    reg.events = []
    reg._log = Logger(observer=reg.events.append)
    return reg


def test_register_names_describe(registry):
    """Registered names are listed sorted; describe() gives the docs (or the docstring)."""
    def leases(subnet=None):
        """List leases.

        More text that is not shown."""
    registry.register("dhcp4.leases", leases)
    registry.register("a.first", lambda: 1, doc="First.")
    assert registry.names() == ["a.first", "dhcp4.leases", "system.methods"]
    assert registry.describe()["dhcp4.leases"] == "List leases."
    assert registry.describe()["a.first"] == "First."
    assert "dhcp4.leases" in registry


def test_duplicate_and_reserved_names_are_refused(registry):
    """A name registers once; `rpc.*` is reserved by JSON-RPC; names must be strings."""
    registry.register("x.y", lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("x.y", lambda: 2)
    with pytest.raises(ValueError, match="reserved"):
        registry.register("rpc.discover", lambda: 1)
    with pytest.raises(ValueError):
        registry.register("", lambda: 1)
    with pytest.raises(TypeError):
        registry.register("not.callable", 42)


def test_unregister(registry):
    """Unregistered methods are gone; unregistering an unknown name is a KeyError."""
    registry.register("x.y", lambda: 1)
    registry.unregister("x.y")
    assert "x.y" not in registry.names()
    assert failure_of(registry.dispatch("x.y")).check(MethodNotFound)
    with pytest.raises(KeyError):
        registry.unregister("x.y")


def test_system_methods_is_builtin(registry):
    """`system.methods` returns the sorted method names, itself included."""
    registry.register("b.m", lambda: None)
    assert result_of(registry.dispatch("system.methods")) == ["b.m", "system.methods"]


def test_params_by_name_position_and_absent(registry):
    """A dict is passed as keywords, a list positionally, absent params as no arguments."""
    registry.register("m", lambda a, b=2: [a, b])
    registry.register("none", lambda: "ok")
    assert result_of(registry.dispatch("m", {"a": 1, "b": 3})) == [1, 3]
    assert result_of(registry.dispatch("m", [5])) == [5, 2]
    assert result_of(registry.dispatch("none")) == "ok"
    assert result_of(registry.dispatch("none", [])) == "ok"
    assert result_of(registry.dispatch("none", {})) == "ok"


def test_deferred_results(registry):
    """A method may return a Deferred; dispatch fires when it does."""
    pending = defer.Deferred()
    registry.register("slow", lambda: pending)
    d = registry.dispatch("slow")
    assert not d.called
    pending.callback({"done": True})
    assert result_of(d) == {"done": True}


def test_unknown_method(registry):
    """Unknown names fail with -32601 and the name in data."""
    f = failure_of(registry.dispatch("dhcp4.leases"))
    assert f.check(MethodNotFound)
    assert f.value.to_dict() == {"code": -32601, "message": "method not found",
                                 "data": {"method": "dhcp4.leases"}}


@pytest.mark.parametrize("params, fragment", [
    ({}, "params.resource: missing (required)"),
    ({"resource": "r", "force": True}, "params.force: unknown parameter"),
    (["r", "extra"], "at most 1 positional value(s) (resource), got 2"),
    (42, "expected an object or an array"),
])
def test_invalid_params_name_the_problem(registry, params, fragment):
    """Params that do not fit the signature fail with -32602 naming the parameter."""
    registry.register("cluster.promote", lambda resource: resource)
    f = failure_of(registry.dispatch("cluster.promote", params))
    assert f.check(InvalidParams)
    assert f.value.code == -32602
    assert fragment in f.value.message


def test_type_error_inside_the_method_is_internal(registry):
    """A TypeError raised by the method's own code is an internal error, not bad params."""
    def buggy(x):
        return len(x) + "s"
    registry.register("buggy", buggy)
    f = failure_of(registry.dispatch("buggy", ["abc"]))
    assert f.check(InternalError)
    assert f.value.code == -32603


def test_rpc_errors_pass_through(registry):
    """RPCError subclasses raised (or failed with) by a method reach the client unchanged."""
    registry.register("app", lambda: (_ for _ in ()).throw(
        ApplicationError("unknown resource 'x'", code=-32020)))
    registry.register("params", lambda: defer.fail(InvalidParams("invalid params: limit < 0")))
    app = failure_of(registry.dispatch("app")).value
    assert app.to_dict() == {"code": -32020, "message": "application error",
                             "data": {"reason": "unknown resource 'x'"}}
    assert failure_of(registry.dispatch("params")).value.message == "invalid params: limit < 0"


def test_application_error_code_range():
    """Application errors must use -32099..-32000."""
    assert ApplicationError("r").code == -32000
    with pytest.raises(ValueError):
        ApplicationError("r", code=-32603)
    with pytest.raises(ValueError):
        ApplicationError("r", code=-31999)
    assert isinstance(ApplicationError("r"), RPCError)


def test_store_unavailable_maps_to_32001(registry):
    """StoreUnavailable (raised or as a failed Deferred) becomes -32001 'store unavailable: ...'."""
    def raises():
        raise StoreUnavailable("redis 127.0.0.1:6379: connection refused")
    registry.register("sync", raises)
    registry.register("async", lambda: defer.fail(StoreUnavailable("timeout after 2.0 s")))
    for name, reason in (("sync", "store unavailable: redis 127.0.0.1:6379: connection refused"),
                         ("async", "store unavailable: timeout after 2.0 s")):
        err = failure_of(registry.dispatch(name)).value
        assert isinstance(err, ApplicationError)
        assert err.code == -32001
        assert err.data == {"reason": reason}


def test_internal_error_hides_details_and_logs_traceback(registry):
    """Unexpected exceptions give a short -32603 to the client; the traceback goes to the log."""
    registry.register("boom", lambda: {}["secret-key-name"])
    err = failure_of(registry.dispatch("boom")).value
    assert isinstance(err, InternalError)
    body = repr(err.to_dict())
    assert "secret-key-name" not in body and "Traceback" not in body
    assert err.to_dict()["data"]["reason"].startswith("KeyError")
    logged = [e for e in registry.events if e.get("log_failure") is not None]
    assert len(logged) == 1
    assert logged[0]["method"] == "boom"
    assert logged[0]["log_failure"].check(KeyError)


def test_builtin_without_signature_still_callable(registry):
    """Callables without an inspectable signature are called; their TypeErrors are internal."""
    registry.register("dict", dict)
    assert result_of(registry.dispatch("dict", {"a": 1})) == {"a": 1}
