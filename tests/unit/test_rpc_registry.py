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


# -- declarative params (issue 10: bad params are -32602 with the reason) -------------
from appliance.admin.rpc import Param, Params  # noqa: E402


def reason_of(registry, method, params) -> str:
    f = failure_of(registry.dispatch(method, params))
    assert f.check(InvalidParams) and f.value.code == -32602
    assert f.value.message == "invalid params: " + f.value.data["reason"]
    return f.value.data["reason"]


def test_params_spec_checks_before_the_method_runs(registry):
    """Types, ranges, address syntax, required and unknown keys; the method never runs."""
    ran = []
    registry.register("m", lambda address, limit=100: ran.append((address, limit)) or "ok",
                      params=Params(address=Param("ipv4", required=True),
                                    limit=Param("int", default=100, min=1, max=1000)))
    assert reason_of(registry, "m", {"address": "x"}) == 'params.address: "x" is not an IPv4 address'
    assert reason_of(registry, "m", {"address": "10.0.0.1", "limit": -5}) == \
        "params.limit: -5 is below the minimum 1"
    assert reason_of(registry, "m", {"address": "10.0.0.1", "limit": True}) == \
        "params.limit: expected an integer, got a boolean true"
    assert reason_of(registry, "m", {"address": "10.0.0.1", "limit": 1.5}) == \
        "params.limit: expected an integer, got a number 1.5"
    assert reason_of(registry, "m", {"adress": "10.0.0.1"}) == \
        "params.adress: unknown parameter (did you mean 'address'?)"
    assert reason_of(registry, "m", {}) == "params.address: missing (required)"
    assert ran == []
    assert result_of(registry.dispatch("m", {"address": "010.0.0.1"[1:]})) == "ok"
    assert result_of(registry.dispatch("m", ["10.0.0.2", 5])) == "ok"
    assert ran == [("10.0.0.1", 100), ("10.0.0.2", 5)]


@pytest.mark.parametrize("kind, value, out", [
    ("ipv6", "FE80::0001", "fe80::1"),
    ("ip", "10.0.0.1", "10.0.0.1"),
    ("ipv4_network", "10.0.0.7/24", "10.0.0.0/24"),
    ("hwaddr", "02-00-00-AA-bb-01", "02:00:00:aa:bb:01"),
    ("hwaddr", "0200000000ff", "02:00:00:00:00:ff"),
    ("number", 2, 2),
    ("str", "a", "a"),
])
def test_param_kinds_normalize(kind, value, out):
    """Addresses come back normalized, hardware addresses lower case with ':'."""
    assert Param(kind).check("params.x", value) == out


@pytest.mark.parametrize("spec, value, reason", [
    (Param("ipv6"), "10.0.0.1", 'params.x: "10.0.0.1" is not an IPv6 address'),
    (Param("ipv4"), None, "params.x: expected an IPv4 address, got null"),
    (Param("number"), float("nan"), "params.x: nan is not a finite number"),
    (Param("str", max=3), "abcd", "params.x: 4 characters is above the maximum 3 characters"),
    (Param("str", choices=("a", "b")), "c", 'params.x: "c" is not one of "a", "b"'),
    (Param("array", max=1), [1, 2], "params.x: 2 items is above the maximum 1 items"),
    (Param("object"), [], "params.x: expected an object, got an array"),
    (Param("bool"), 0, "params.x: expected true or false, got an integer 0"),
])
def test_param_refusals(spec, value, reason):
    """Each refusal names the parameter and says what was expected."""
    with pytest.raises(InvalidParams) as info:
        spec.check("params.x", value)
    assert info.value.data["reason"] == reason


def test_spec_from_annotations(registry):
    """Without a spec, the signature and its annotations decide (cluster methods)."""
    def set_maintenance(on: bool):
        return on
    registry.register("cluster.maintenance", set_maintenance)
    assert reason_of(registry, "cluster.maintenance", {"on": "yes"}) == \
        'params.on: expected true or false, got a string "yes"'
    assert result_of(registry.dispatch("cluster.maintenance", {"on": True})) is True


def test_every_method_of_a_node_has_a_spec(tmp_path):
    """Every method a node registers is validated (explicit or derived spec)."""
    from twisted.internet.testing import MemoryReactorClock

    from appliance.config import config_from_string
    from appliance.node import ApplianceNode
    from tests.unit.test_node import FakeStore
    config = config_from_string(f'[node]\nid = "n"\nstate_dir = "{tmp_path}"\n', plugins={})
    node = ApplianceNode(config, MemoryReactorClock(), {}, store=FakeStore())
    missing = [name for name in node.rpc.names() if node.rpc.params_of(name) is None]
    assert missing == []
