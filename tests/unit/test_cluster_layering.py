"""Issue 11 deliverable 4: the cluster layer imports no admin code.

The peer link splits its endpoint with :mod:`appliance.net.endpoints` (the
admin listener re-exports it), and a refusal of the cluster core
(:class:`ClusterError`, an :class:`appliance.errors.OperatorError`) becomes a
JSON-RPC application error in the admin dispatcher, not by an admin import in
``cluster/admin.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

from twisted.logger import Logger

import appliance.cluster
from appliance.admin import MethodRegistry
from appliance.admin.rpc import ApplicationError
from appliance.cluster.errors import ClusterError

CLUSTER = Path(appliance.cluster.__file__).parent


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, at any depth (lazy imports in functions too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
    return out


def test_cluster_layer_imports_no_admin_module():
    offenders = [f"{path.name}:{line} imports {module}"
                 for path in sorted(CLUSTER.glob("*.py"))
                 for line, module in _imports(path)
                 if module == "appliance.admin" or module.startswith("appliance.admin.")]
    assert offenders == []


def test_split_endpoint_is_shared_by_admin_and_cluster():
    from appliance.admin import listen
    from appliance.net import endpoints
    assert listen.split_endpoint is endpoints.split_endpoint
    assert listen.EndpointError is endpoints.EndpointError
    assert endpoints.split_endpoint(r"ssl:8742:interface=\:\:1") == (
        "ssl", ["8742"], {"interface": "::1"})


def _dispatch(func):
    reg = MethodRegistry()
    reg._log = Logger(observer=lambda event: None)
    reg.register("cluster.x", func)
    failures = []
    reg.dispatch("cluster.x", {}).addErrback(failures.append)
    assert len(failures) == 1
    return failures[0].value


def test_cluster_refusal_becomes_an_application_error_raised_or_failed():
    from twisted.internet import defer

    def refuse():
        raise ClusterError("unknown resource 'x'", code=-32020)
    for func in (refuse, lambda: defer.fail(ClusterError("busy", code=-32026))):
        err = _dispatch(func)
        assert isinstance(err, ApplicationError)
    assert _dispatch(refuse).code == -32020
    assert _dispatch(refuse).reason == "unknown resource 'x'"
