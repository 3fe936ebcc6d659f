"""``GET /metrics`` (Prometheus text) and the admin API's own counters.

The exposition format is produced by ``prometheus_client`` itself
(:class:`prometheus_client.twisted.MetricsResource`), never by hand.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.twisted import MetricsResource
from twisted.web.resource import Resource

__all__ = ["metrics_resource", "AdminMetrics", "UNKNOWN_METHOD", "INVALID_METHOD"]

#: ``method`` label for calls of unregistered methods (keeps label cardinality bounded).
UNKNOWN_METHOD = "(unknown)"
#: ``method`` label for request objects that are not valid JSON-RPC.
INVALID_METHOD = "(invalid)"


def metrics_resource(registry: CollectorRegistry) -> Resource:
    """A twisted.web resource serving ``registry`` in the Prometheus text format."""
    return MetricsResource(registry=registry)


class AdminMetrics:
    """Counters of the admin API, registered on ``registry``.

    - ``appliance_rpc_requests_total{method, outcome}``: one per JSON-RPC call
      (each batch member counts), outcome ``ok`` or ``error``.
    - ``appliance_admin_rejected_total{reason}``: HTTP requests refused before
      any method ran: ``unauthorized``, ``too_large``, ``parse_error``,
      ``invalid_request``.
    """

    def __init__(self, registry: CollectorRegistry):
        self.rpc_requests = Counter(
            "appliance_rpc_requests", "JSON-RPC calls by method and outcome",
            ["method", "outcome"], registry=registry)
        self.rejected = Counter(
            "appliance_admin_rejected", "Admin HTTP requests refused before dispatch",
            ["reason"], registry=registry)

    def record(self, method: str, ok: bool) -> None:
        """Count one call of ``method``."""
        self.rpc_requests.labels(method=method, outcome="ok" if ok else "error").inc()

    def reject(self, reason: str) -> None:
        """Count one refused HTTP request."""
        self.rejected.labels(reason=reason).inc()
