"""The admin API: JSON-RPC 2.0 over HTTP(S) (``/rpc``), Prometheus ``/metrics``,
bearer-token auth, and the ``appliancectl`` client.

Services register their methods on the node's :class:`MethodRegistry` and raise
:class:`ApplicationError` (``data.reason``) or :class:`InvalidParams` for the
client; everything else is mapped to a JSON-RPC internal error and logged.
"""

from appliance.admin.rpc import ApplicationError, InvalidParams, MethodRegistry, RPCError

__all__ = ["MethodRegistry", "RPCError", "ApplicationError", "InvalidParams"]
