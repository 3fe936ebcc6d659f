"""A real AdminService on loopback: HTTP, token file, /metrics, limits, and mutual TLS."""

from __future__ import annotations

import io
import json
import socket

import pytest
import pytest_twisted
from OpenSSL import SSL
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.web.client import (Agent, FileBodyProducer, HTTPConnectionPool, ResponseNeverReceived,
                                readBody)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from appliance.admin import ApplicationError, MethodRegistry
from appliance.admin.service import AdminListenError, AdminService, AdminSettings
from appliance.net.tls import client_options, make_ca, make_cert, write_pem

# Agent + readBody over a non-persistent pool warn about abortConnection; harmless here.
pytestmark = pytest.mark.filterwarnings("ignore:Using readBody:DeprecationWarning")

def _reactor():
    from twisted.internet import reactor
    return reactor


def make_registry() -> MethodRegistry:
    reg = MethodRegistry()
    reg.register("add", lambda a, b: a + b)
    reg.register("later", lambda value: _later(value))
    reg.register("app", lambda: (_ for _ in ()).throw(ApplicationError("nope", code=-32050)))
    return reg


def _later(value):
    from twisted.internet import task
    return task.deferLater(_reactor(), 0.01, lambda: value)


@defer.inlineCallbacks
def start_admin(tmp_path, registry=None, metrics=None, **settings):
    """Start an AdminService on an ephemeral loopback port; fire with it."""
    settings.setdefault("listen", "tcp:0:interface=127.0.0.1")
    settings.setdefault("token_file", str(tmp_path / "state" / "admin.token"))
    svc = AdminService(_reactor(), AdminSettings(**settings), registry or make_registry(),
                       metrics if metrics is not None else CollectorRegistry())
    yield svc.startService()
    return svc


def token_of(svc) -> bytes:
    with open(svc.config.token_file, "rb") as fh:
        return fh.read().strip()


@implementer(IPolicyForHTTPS)
class _FixedTLS:
    def __init__(self, options):
        self.options = options

    def creatorForNetloc(self, hostname, port):
        return self.options


def agent(tls_options=None) -> Agent:
    pool = HTTPConnectionPool(_reactor(), persistent=False)
    if tls_options is None:
        return Agent(_reactor(), pool=pool)
    return Agent(_reactor(), contextFactory=_FixedTLS(tls_options), pool=pool)


@defer.inlineCallbacks
def http(url: str, body: bytes | None = None, *, token: bytes | None = None, method=b"POST",
         via: Agent | None = None):
    """One request; fire with (status, headers, body bytes)."""
    headers = Headers({b"content-type": [b"application/json"]})
    if token is not None:
        headers.addRawHeader(b"authorization", b"Bearer " + token)
    producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
    d = (via or agent()).request(method, url.encode(), headers, producer)
    d.addTimeout(10, _reactor())
    response = yield d
    content = yield readBody(response)
    return response.code, response.headers, content


@pytest_twisted.inlineCallbacks
def test_token_file_created_private(tmp_path):
    """Starting creates the token file (and its directory) with mode 0600; a restart keeps it."""
    svc = yield start_admin(tmp_path)
    try:
        path = tmp_path / "state" / "admin.token"
        assert path.stat().st_mode & 0o777 == 0o600
        token = path.read_text().strip()
        assert len(token) >= 40
        assert svc.port.getHost().port > 0
    finally:
        yield svc.stopService()
    again = yield start_admin(tmp_path)
    try:
        assert token_of(again).decode() == token
    finally:
        yield again.stopService()


@pytest_twisted.inlineCallbacks
def test_batch_parse_error_unknown_method(tmp_path):
    """Over real HTTP: a batch keeps order; parse error is -32700; unknown method -32601."""
    svc = yield start_admin(tmp_path)
    try:
        token = token_of(svc)
        batch = json.dumps([
            {"jsonrpc": "2.0", "method": "later", "params": ["slow"], "id": 1},
            {"jsonrpc": "2.0", "method": "add", "params": {"a": 2, "b": 3}, "id": 2},
            {"jsonrpc": "2.0", "method": "app", "id": 3},
        ]).encode()
        code, headers, body = yield http(svc.url, batch, token=token)
        assert code == 200
        assert headers.getRawHeaders(b"content-type") == [b"application/json"]
        answers = json.loads(body)
        assert [a.get("result") for a in answers] == ["slow", 5, None]
        assert answers[2]["error"] == {"code": -32050, "message": "application error",
                                       "data": {"reason": "nope"}}

        code, _, body = yield http(svc.url, b'{"jsonrpc": "2.0", "method"', token=token)
        assert code == 200 and json.loads(body)["error"]["code"] == -32700

        code, _, body = yield http(svc.url, b'{"jsonrpc":"2.0","method":"dhcp4.leases","id":9}',
                                   token=token)
        assert json.loads(body) == {"jsonrpc": "2.0", "id": 9, "error": {
            "code": -32601, "message": "method not found", "data": {"method": "dhcp4.leases"}}}

        code, _, body = yield http(svc.url, b'{"jsonrpc":"2.0","method":"add","params":[1,2]}',
                                   token=token)
        assert code == 204 and body == b""
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_missing_or_wrong_token_is_401(tmp_path):
    """No token or a wrong one: HTTP 401 with WWW-Authenticate: Bearer and a JSON-RPC error."""
    svc = yield start_admin(tmp_path)
    try:
        body = b'{"jsonrpc":"2.0","method":"add","params":[1,2],"id":1}'
        for token in (None, b"not-the-token"):
            code, headers, content = yield http(svc.url, body, token=token)
            assert code == 401
            assert headers.getRawHeaders(b"www-authenticate")[0].startswith(b"Bearer")
            error = json.loads(content)["error"]
            assert error["message"] == "unauthorized"
            assert error["data"]["reason"] == "missing or invalid bearer token"
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_oversize_body_is_413(tmp_path):
    """A body above max_request_bytes gets 413 'request too large' over a real connection."""
    svc = yield start_admin(tmp_path, max_request_bytes=1024)
    try:
        big = json.dumps({"jsonrpc": "2.0", "method": "add", "params": ["x" * 200_000, "y"],
                          "id": 1}).encode()
        code, _, content = yield http(svc.url, big, token=token_of(svc))
        assert code == 413
        assert json.loads(content)["error"] == {
            "code": -32600, "message": "request too large",
            "data": {"reason": "the body exceeds 1024 bytes"}}
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_metrics_index_and_get_rpc(tmp_path):
    """/metrics is Prometheus text with the RPC counter; / is an index; GET /rpc is 405."""
    svc = yield start_admin(tmp_path)
    try:
        token = token_of(svc)
        yield http(svc.url, b'{"jsonrpc":"2.0","method":"add","params":[1,2],"id":1}',
                   token=token)
        base = svc.url[:-len("/rpc")]
        code, headers, content = yield http(base + "/metrics", method=b"GET")
        assert code == 200
        assert headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        text = content.decode()
        assert '# TYPE appliance_rpc_requests_total counter' in text
        assert 'appliance_rpc_requests_total{method="add",outcome="ok"} 1.0' in text

        code, _, content = yield http(base + "/", method=b"GET")
        assert code == 200 and "/rpc" in json.loads(content)["endpoints"]
        code, headers, _ = yield http(svc.url, method=b"GET")
        assert code == 405
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_metrics_auth(tmp_path):
    """With metrics_auth, /metrics needs the bearer token too."""
    svc = yield start_admin(tmp_path, metrics_auth=True)
    try:
        url = svc.url[:-len("/rpc")] + "/metrics"
        code, headers, _ = yield http(url, method=b"GET")
        assert code == 401 and headers.getRawHeaders(b"www-authenticate")
        code, _, content = yield http(url, method=b"GET", token=token_of(svc))
        assert code == 200 and b"appliance_admin_rejected_total" in content
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_address_in_use_is_a_clear_error(tmp_path):
    """A taken port fails startService with 'admin listener LISTEN: address already in use'."""
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen(1)
    port = blocker.getsockname()[1]
    listen = f"tcp:{port}:interface=127.0.0.1"
    try:
        svc = AdminService(_reactor(), AdminSettings(listen=listen,
                                                     token_file=str(tmp_path / "t")),
                           make_registry(), CollectorRegistry())
        with pytest.raises(AdminListenError) as info:
            yield svc.startService()
        assert str(info.value) == f"admin listener {listen}: address already in use"
        assert not svc.running and svc.port is None
        yield svc.stopService()
    finally:
        blocker.close()


@pytest_twisted.inlineCallbacks
def test_stop_closes_the_listener(tmp_path):
    """After stopService the port no longer accepts connections."""
    svc = yield start_admin(tmp_path)
    port = svc.port.getHost().port
    yield svc.stopService()
    probe = socket.socket()
    try:
        with pytest.raises(ConnectionRefusedError):
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()


# ----------------------------------------------------------------------
# mutual TLS
# ----------------------------------------------------------------------
@pytest.fixture
def pki(tmp_path):
    """A CA, a server cert for 127.0.0.1, a client cert from the CA, and a rogue CA's client."""
    ca, ca_key = make_ca("admin test CA")
    server, server_key = make_cert(ca, ca_key, "node-a", ips=("127.0.0.1",))
    client, client_key = make_cert(ca, ca_key, "operator")
    rogue_ca, rogue_key = make_ca("rogue CA")
    rogue, rogue_client_key = make_cert(rogue_ca, rogue_key, "operator")
    files = {}
    for name, data, private in [("ca.pem", ca, False), ("server.pem", server, False),
                                ("server.key", server_key, True), ("client.pem", client, False),
                                ("client.key", client_key, True), ("rogue.pem", rogue, False),
                                ("rogue.key", rogue_client_key, True)]:
        files[name] = str(write_pem(tmp_path / "pki" / name, data, private))
    return {"ca": ca, "client": (client, client_key), "rogue": (rogue, rogue_client_key),
            "files": files}


def tls_listen(pki) -> str:
    f = pki["files"]
    return f"ssl:0:interface=127.0.0.1:privateKey={f['server.key']}:certKey={f['server.pem']}"


@pytest_twisted.inlineCallbacks
def test_mutual_tls_requires_a_client_cert_from_the_ca(tmp_path, pki):
    """With client_ca: a CA-signed client cert works; no cert or a rogue CA's cert is refused."""
    svc = yield start_admin(tmp_path, listen=tls_listen(pki), client_ca=pki["files"]["ca.pem"])
    try:
        assert svc.url.startswith("https://127.0.0.1:")
        token = token_of(svc)
        body = b'{"jsonrpc":"2.0","method":"add","params":[20,22],"id":1}'
        good = agent(client_options("127.0.0.1", pki["ca"], *pki["client"]))
        code, _, content = yield http(svc.url, body, token=token, via=good)
        assert code == 200 and json.loads(content)["result"] == 42

        for alert, tls in [("certificate required", client_options("127.0.0.1", pki["ca"])),
                           ("unknown ca", client_options("127.0.0.1", pki["ca"], *pki["rogue"]))]:
            with pytest.raises(ResponseNeverReceived) as info:
                yield http(svc.url, body, token=token, via=agent(tls))
            reasons = [f.value for f in info.value.reasons]
            # The server's TLS alert names the refusal; if the server's close overtakes the
            # alert (a reset under load), the connection is simply lost.
            assert any(isinstance(r, SSL.Error) and alert in str(r) or
                       isinstance(r, (ConnectionLost, ConnectionDone)) for r in reasons), reasons
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_plain_tls_without_client_ca(tmp_path, pki):
    """An ssl: listener without client_ca serves clients that present no certificate."""
    svc = yield start_admin(tmp_path, listen=tls_listen(pki))
    try:
        code, _, content = yield http(
            svc.url, b'{"jsonrpc":"2.0","method":"add","params":[1,1],"id":1}',
            token=token_of(svc), via=agent(client_options("127.0.0.1", pki["ca"])))
        assert code == 200 and json.loads(content)["result"] == 2
    finally:
        yield svc.stopService()


@pytest_twisted.inlineCallbacks
def test_mutual_tls_needs_ssl_and_readable_files(tmp_path, pki):
    """client_ca with a tcp: listener, or a missing key file, fails start with a clear message."""
    svc = AdminService(_reactor(), AdminSettings(listen="tcp:0:interface=127.0.0.1",
                                                 token_file=str(tmp_path / "t"),
                                                 client_ca=pki["files"]["ca.pem"]),
                       make_registry(), CollectorRegistry())
    with pytest.raises(AdminListenError, match='client_ca needs an "ssl:" listener'):
        yield svc.startService()
    missing = tls_listen(pki).replace("server.key", "missing.key")
    svc = AdminService(_reactor(), AdminSettings(listen=missing, token_file=str(tmp_path / "t"),
                                                 client_ca=pki["files"]["ca.pem"]),
                       make_registry(), CollectorRegistry())
    with pytest.raises(AdminListenError, match="missing.key: no such file or directory"):
        yield svc.startService()


def _declare_huge_body(port: int, token: bytes) -> bytes:
    """Send only headers declaring 100 MB, never the body; return what the server says."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + token +
                     b"\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        data = b""
        while True:
            chunk = sock.recv(65536)     # the server must answer *and close* unprompted
            if not chunk:
                return data
            data += chunk


@pytest_twisted.inlineCallbacks
def test_declared_oversize_body_is_refused_before_reading(tmp_path):
    """Content-Length above the cap: 413 right after the headers and the connection closes;
    the body is never read (review LOW 13: it was read to the end first)."""
    from twisted.internet import threads
    svc = yield start_admin(tmp_path, max_request_bytes=1024)
    try:
        port = svc.port.getHost().port
        raw = yield threads.deferToThread(_declare_huge_body, port, token_of(svc))
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413 ")
        assert json.loads(body)["error"] == {
            "code": -32600, "message": "request too large",
            "data": {"reason": "the body exceeds 1024 bytes"}}
    finally:
        yield svc.stopService()
