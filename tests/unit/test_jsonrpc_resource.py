"""JSONRPCResource on DummyRequest: JSON-RPC 2.0 semantics, auth, limits, error hiding."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from appliance.admin import ApplicationError, MethodRegistry
from appliance.admin.auth import AllowAll
from appliance.admin.jsonrpc import JSONRPCResource
from appliance.admin.metrics import AdminMetrics
from appliance.store import StoreUnavailable

TOKEN = b"s3cret-token"


class FixedToken:
    """An authorizer with a known token (BearerTokenAuth has its own tests)."""

    def check(self, request) -> bool:
        return request.getHeader(b"authorization") == b"Bearer " + TOKEN


def make_registry() -> MethodRegistry:
    reg = MethodRegistry()
    reg._log = Logger(observer=lambda event: None)
    reg.register("echo", lambda *args, **kwargs: {"args": list(args), "kwargs": kwargs})
    reg.register("add", lambda a, b: a + b)
    reg.register("boom", lambda: {}["internal-detail"])
    reg.register("app", lambda: (_ for _ in ()).throw(ApplicationError("no such lease",
                                                                      code=-32030)))
    reg.register("store", lambda: defer.fail(StoreUnavailable("redis down")))
    reg.register("nan", lambda: float("nan"))
    reg.register("object", lambda: object())
    return reg


def make_resource(registry=None, *, max_request_bytes=1_048_576, metrics=None, auth=None):
    resource = JSONRPCResource(registry or make_registry(), auth or FixedToken(),
                               max_request_bytes=max_request_bytes, metrics=metrics)
    resource._log = Logger(observer=lambda event: None)
    return resource


class _NoRead(io.BytesIO):
    def read(self, *args):
        raise AssertionError("the body must not be read")


def post(resource, body, *, token: bytes | None = TOKEN, length: int | None = None,
         content=None) -> DummyRequest:
    """Render a POST; return the request (finished unless a method is still running)."""
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    request = DummyRequest([])
    request.method = b"POST"
    request.content = content if content is not None else io.BytesIO(body)
    if token is not None:
        request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer " + token])
    request.requestHeaders.setRawHeaders(
        b"content-length", [str(len(body) if length is None else length).encode()])
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request


def body_of(request: DummyRequest):
    assert request.finished
    return json.loads(b"".join(request.written))


def header(request: DummyRequest, name: bytes):
    values = request.responseHeaders.getRawHeaders(name)
    return values[-1] if values else None


def test_single_call():
    """A call returns result and id with Content-Type application/json and HTTP 200."""
    req = post(make_resource(), {"jsonrpc": "2.0", "method": "add", "params": [2, 3], "id": "x"})
    assert req.responseCode == 200
    assert header(req, b"content-type") == b"application/json"
    assert body_of(req) == {"jsonrpc": "2.0", "result": 5, "id": "x"}


def test_batch_keeps_request_order_with_deferreds():
    """Batch responses come in request order even when later calls finish first."""
    reg = make_registry()
    slow = defer.Deferred()
    reg.register("slow", lambda: slow)
    req = post(make_resource(reg), [
        {"jsonrpc": "2.0", "method": "slow", "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 1}, "id": 2},
        {"jsonrpc": "2.0", "method": "echo", "params": ["n"]},          # notification
        {"jsonrpc": "2.0", "method": "missing", "id": 3},
    ])
    assert not req.finished
    slow.callback("late")
    assert body_of(req) == [
        {"jsonrpc": "2.0", "result": "late", "id": 1},
        {"jsonrpc": "2.0", "result": 2, "id": 2},
        {"jsonrpc": "2.0", "error": {"code": -32601, "message": "method not found",
                                     "data": {"method": "missing"}}, "id": 3},
    ]


@pytest.mark.parametrize("raw", [b"{", b'{"jsonrpc": "2.0", "method": "add", "params": [1, 2]',
                                 b"\xff\xfe\x00garbage", b"", b"[NaN]", b"1e99999x"])
def test_parse_error(raw):
    """Unparseable bodies give -32700 with id null (HTTP 200)."""
    req = post(make_resource(), raw)
    assert req.responseCode == 200
    body = body_of(req)
    assert body["error"]["code"] == -32700
    assert body["id"] is None


@pytest.mark.parametrize("obj, why", [
    ({"jsonrpc": "1.0", "method": "add", "id": 1}, "jsonrpc"),
    ({"method": "add", "id": 1}, "jsonrpc"),
    ({"jsonrpc": "2.0", "method": 1, "params": "bar"}, "method"),
    ({"jsonrpc": "2.0", "method": "add", "params": "bar", "id": 1}, "params"),
    ({"jsonrpc": "2.0", "method": "add", "id": [1]}, "id"),
    ({"jsonrpc": "2.0", "method": "add", "id": True}, "id"),
    ("just a string", "object"),
    (42, "object"),
    (None, "object"),
])
def test_invalid_request(obj, why):
    """Invalid request objects give -32600 with id null and a reason."""
    body = body_of(post(make_resource(), obj))
    assert body["error"]["code"] == -32600
    assert why in body["error"]["data"]["reason"]
    assert body["id"] is None


def test_batch_of_invalid_items_answers_each():
    """`[1,2,3]` gets three -32600 errors (JSON-RPC 2.0 spec example)."""
    body = body_of(post(make_resource(), [1, 2, 3]))
    assert [item["error"]["code"] for item in body] == [-32600] * 3
    assert all(item["id"] is None for item in body)


def test_empty_batch_is_one_error():
    """An empty batch is answered with a single -32600 error object, not an array."""
    body = body_of(post(make_resource(), []))
    assert isinstance(body, dict)
    assert body["error"]["code"] == -32600
    assert body["id"] is None


def test_unknown_method_and_invalid_params():
    """Unknown method -> -32601; wrong params -> -32602 naming the parameter."""
    res = make_resource()
    assert body_of(post(res, {"jsonrpc": "2.0", "method": "nope", "id": 7}))["error"]["code"] \
        == -32601
    err = body_of(post(res, {"jsonrpc": "2.0", "method": "add", "params": {"a": 1},
                             "id": 8}))["error"]
    assert err["code"] == -32602
    assert "params.b" in err["message"] and err["data"]["reason"] == "params.b: missing (required)"


def test_notifications_get_no_response():
    """A notification, or a batch of notifications only, gets HTTP 204 and no body."""
    reg = make_registry()
    seen = []
    reg.register("note", seen.append)
    res = make_resource(reg)
    req = post(res, {"jsonrpc": "2.0", "method": "note", "params": ["a"]})
    assert req.finished and req.responseCode == 204 and req.written == []
    req = post(res, [{"jsonrpc": "2.0", "method": "note", "params": ["b"]},
                     {"jsonrpc": "2.0", "method": "boom"},
                     {"jsonrpc": "2.0", "method": "missing"}])
    assert req.responseCode == 204 and req.written == []
    assert seen == ["a", "b"]


def test_null_id_is_a_request_not_a_notification():
    """`"id": null` is answered (only a missing id makes a notification)."""
    body = body_of(post(make_resource(), {"jsonrpc": "2.0", "method": "add", "params": [1, 1],
                                          "id": None}))
    assert body == {"jsonrpc": "2.0", "result": 2, "id": None}


def test_internal_error_hides_traceback():
    """An exception in a method gives -32603 without traceback or exception text."""
    raw = b"".join(post(make_resource(), {"jsonrpc": "2.0", "method": "boom", "id": 1}).written)
    body = json.loads(raw)
    assert body["error"]["code"] == -32603
    assert b"Traceback" not in raw and b"internal-detail" not in raw


def test_application_and_store_errors():
    """ApplicationError keeps its code and data.reason; StoreUnavailable becomes -32001."""
    res = make_resource()
    app = body_of(post(res, {"jsonrpc": "2.0", "method": "app", "id": 1}))["error"]
    assert app == {"code": -32030, "message": "application error",
                   "data": {"reason": "no such lease"}}
    store = body_of(post(res, {"jsonrpc": "2.0", "method": "store", "id": 2}))["error"]
    assert store["code"] == -32001
    assert store["data"]["reason"] == "store unavailable: redis down"


def test_results_that_are_not_json_become_internal_errors():
    """NaN or arbitrary objects in a result give -32603 for that call; the batch survives."""
    body = body_of(post(make_resource(), [
        {"jsonrpc": "2.0", "method": "nan", "id": 1},
        {"jsonrpc": "2.0", "method": "object", "id": 2},
        {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 3},
    ]))
    assert [b.get("error", {}).get("code") for b in body] == [-32603, -32603, None]
    assert body[2]["result"] == 3


def test_oversize_body_by_content_length_is_not_read():
    """A Content-Length above the limit gets 413 and -32600 'request too large' unread."""
    req = post(make_resource(max_request_bytes=100), b"x", length=101, content=_NoRead())
    assert req.responseCode == 413
    body = body_of(req)
    assert body["error"]["code"] == -32600
    assert body["error"]["message"] == "request too large"
    assert body["id"] is None


def test_oversize_body_without_content_length():
    """A body longer than the limit is refused even when Content-Length understates it."""
    big = json.dumps({"jsonrpc": "2.0", "method": "echo", "params": ["x" * 200], "id": 1})
    req = post(make_resource(max_request_bytes=100), big.encode(), length=10)
    assert req.responseCode == 413
    ok = json.dumps({"jsonrpc": "2.0", "method": "echo", "id": 1}).encode()
    req = post(make_resource(max_request_bytes=len(ok)), ok)
    assert req.responseCode == 200


@pytest.mark.parametrize("token", [None, b"wrong", TOKEN + b"x"])
def test_missing_or_bad_token_is_401(token):
    """Without the right bearer token: 401, WWW-Authenticate: Bearer, a JSON-RPC error body."""
    reg = make_registry()
    called = []
    reg.register("spy", lambda: called.append(1))
    req = post(make_resource(reg), {"jsonrpc": "2.0", "method": "spy", "id": 1}, token=token)
    assert req.responseCode == 401
    assert header(req, b"www-authenticate").startswith(b"Bearer")
    body = body_of(req)
    assert body["error"]["message"] == "unauthorized"
    assert -32099 <= body["error"]["code"] <= -32000
    assert body["error"]["data"] == {"reason": "missing or invalid bearer token"}
    assert body["id"] is None
    assert called == []


def test_auth_is_checked_before_size_and_parsing():
    """An unauthenticated oversize or garbage body is 401, not 413 or a parse error."""
    req = post(make_resource(max_request_bytes=10), b"{" * 50, token=None, content=_NoRead())
    assert req.responseCode == 401


def test_get_is_405():
    """GET /rpc is 405 Method Not Allowed with Allow: POST."""
    request = DummyRequest([])
    request.method = b"GET"
    request.render(make_resource(auth=AllowAll()))
    assert request.responseCode == 405
    assert header(request, b"allow") == b"POST"


def test_client_gone_before_result_is_not_written():
    """If the client disconnects while a method runs, the late result is dropped quietly."""
    reg = make_registry()
    slow = defer.Deferred()
    reg.register("slow", lambda: slow)
    req = post(make_resource(reg), {"jsonrpc": "2.0", "method": "slow", "id": 1})
    req.processingFailed(Failure(ConnectionError("client went away")))
    slow.callback("late")
    assert req.written == [] and not req.finished


def test_metrics_count_calls_by_method_and_outcome():
    """appliance_rpc_requests_total counts ok/error per method; unknown names share a label."""
    registry = CollectorRegistry()
    res = make_resource(metrics=AdminMetrics(registry))
    post(res, [{"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 1},
               {"jsonrpc": "2.0", "method": "add", "params": [1], "id": 2},
               {"jsonrpc": "2.0", "method": "no-such-1", "id": 3},
               {"jsonrpc": "2.0", "method": "no-such-2", "id": 4}])
    post(res, {"jsonrpc": "2.0", "method": "add", "id": 5}, token=b"bad")

    def value(labels, name="appliance_rpc_requests_total"):
        return registry.get_sample_value(name, labels) or 0

    assert value({"method": "add", "outcome": "ok"}) == 1
    assert value({"method": "add", "outcome": "error"}) == 1
    assert value({"method": "(unknown)", "outcome": "error"}) == 2
    assert value({"reason": "unauthorized"}, "appliance_admin_rejected_total") == 1


# ----------------------------------------------------------------------
# property: whatever the body, the answer is well-formed JSON-RPC
# ----------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)
methods = st.sampled_from(["echo", "add", "boom", "app", "store", "nan", "object", "missing",
                           "system.methods", "rpc.x", ""]) | st.text(max_size=8)
request_objects = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2])},
    optional={"method": methods | json_values,
              "params": st.lists(json_values, max_size=3)
              | st.dictionaries(st.sampled_from(["a", "b", "x"]), json_values, max_size=3)
              | json_values,
              "id": st.integers() | st.text(max_size=5) | st.none() | json_values},
)
bodies = (request_objects | st.lists(request_objects | json_values, max_size=5)
          | json_values).map(lambda v: json.dumps(v).encode()) | st.binary(max_size=40)


def _check_response(obj):
    assert isinstance(obj, dict)
    assert obj["jsonrpc"] == "2.0"
    assert "id" in obj
    assert ("result" in obj) != ("error" in obj)
    if "error" in obj:
        assert isinstance(obj["error"]["code"], int)
        assert isinstance(obj["error"]["message"], str)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(body=bodies)
def test_any_body_gets_a_well_formed_answer(body):
    """Random bodies never leak a traceback; the answer is 204 or well-formed JSON-RPC."""
    req = post(make_resource(), body)
    assert req.finished, "every request is finished synchronously here"
    raw = b"".join(req.written)
    assert b"Traceback" not in raw
    if req.responseCode == 204:
        assert raw == b""
        return
    assert req.responseCode == 200
    parsed = json.loads(raw)
    for item in parsed if isinstance(parsed, list) else [parsed]:
        _check_response(item)
    if isinstance(parsed, list):
        assert parsed, "an all-notification batch is 204, never []"


def test_batch_size_is_bounded():
    """A batch larger than max_batch is refused whole (-32600), no member runs; at the
    limit it is served (review LOW 13: the size was bounded only by bytes)."""
    reg = make_registry()
    ran = []
    reg.register("note", ran.append)
    res = JSONRPCResource(reg, FixedToken(), max_batch=3)
    res._log = Logger(observer=lambda event: None)
    batch = [{"jsonrpc": "2.0", "method": "note", "params": [i], "id": i} for i in range(4)]
    body = body_of(post(res, batch))
    assert body["error"]["code"] == -32600
    assert body["error"]["data"]["reason"] == ("a batch of 4 requests exceeds the limit of 3 "
                                               "(admin.max_batch)")
    assert ran == []
    assert len(body_of(post(res, batch[:3]))) == 3 and ran == [0, 1, 2]


def test_default_batch_limit_is_100():
    """Without a setting, 100 members pass and 101 are refused."""
    res = make_resource()
    ok = [{"jsonrpc": "2.0", "method": "system.methods", "id": i} for i in range(100)]
    assert len(body_of(post(res, ok))) == 100
    assert body_of(post(res, ok + [ok[0]]))["error"]["code"] == -32600
