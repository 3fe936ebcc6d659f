"""Prometheus metrics of the dns service.

The counters and histograms live in a registry of their own, one per
service instance; :meth:`DNSMetrics.attach` registers a small collector on
the node's ``CollectorRegistry`` at ``startService`` and :meth:`detach`
removes it at ``stopService`` (review H1: a restart by ``config.reload``
builds a new service and must not register the same names twice).  The
gauges are computed at scrape time from the service's state (``gauges``,
a callable set by the service).
"""

from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Bridge:
    """What the node registry sees: the private registry plus the gauges."""

    def __init__(self, metrics: "DNSMetrics"):
        self.metrics = metrics

    def collect(self):
        yield from self.metrics.own.collect()
        gauges = self.metrics.gauges
        if gauges is not None:
            yield from gauges()

    def describe(self):
        return []       # no describe at register time: collect() needs a running service


class DNSMetrics:
    """Counters and latency histograms; exported only while attached."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.node_registry = registry
        self.own = CollectorRegistry(auto_describe=False)
        registry = self.own
        self.updates = Counter("appliance_dns_updates", "DNS UPDATEs answered, by rcode",
                               ["rcode"], registry=registry)
        self.failures = Counter("appliance_dns_update_failures",
                                "DNS UPDATEs that failed, by rcode or transport reason",
                                ["rcode"], registry=registry)
        self.drift = Counter("appliance_dns_drift_repairs",
                             "Published rrsets found different from the desired state and rewritten",
                             registry=registry)
        self.stale = Counter("appliance_dns_stale_refused",
                             "Updates not written because the server holds a newer owner epoch",
                             registry=registry)
        self.takeovers = Counter("appliance_dns_guard_takeovers",
                                 "Guards taken over: written by another cluster identity, another "
                                 "resource, an older format, or reset by the operator",
                                 ["why"], registry=registry)
        self.cas_misses = Counter("appliance_dns_cas_misses",
                                  "UPDATEs sent again because the expected guard was stale "
                                  "(each costs a read and a round trip)", registry=registry)
        self.latency = Histogram("appliance_dns_update_latency_seconds",
                                 "Time from sending an UPDATE to its answer",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.read_failures = Counter("appliance_dns_read_failures",
                                     "Reads of the primary that failed (reconcile, guard reads "
                                     "of a compare-and-set, guard refreshes), by rcode or "
                                     "transport reason", ["rcode"], registry=registry)
        self.ddns = Counter("appliance_dns_ddns", "DDNS operations for DHCP, by result",
                            ["op", "result"], registry=registry)
        self.ddns_latency = Histogram("appliance_dns_ddns_latency_seconds",
                                      "Time of one DDNS operation (all its UPDATEs and retries)",
                                      ["op"], buckets=LATENCY_BUCKETS, registry=registry)
        self.gauges: Callable[[], Iterable] | None = None
        self._bridge: _Bridge | None = None

    def attach(self) -> None:
        """Export through the node registry (idempotent)."""
        if self.node_registry is not None and self._bridge is None:
            self._bridge = _Bridge(self)
            self.node_registry.register(self._bridge)

    def detach(self) -> None:
        if self._bridge is not None:
            try:
                self.node_registry.unregister(self._bridge)
            except KeyError:
                pass
            self._bridge = None

    def answered(self, rcode: str, seconds: float) -> None:
        self.updates.labels(rcode).inc()
        self.latency.observe(seconds)
        if rcode != "NOERROR":
            self.failures.labels(rcode).inc()

    def failed(self, rcode: str) -> None:
        self.failures.labels(rcode).inc()

    def read_failed(self, rcode: str) -> None:
        self.read_failures.labels(rcode).inc()


def gauge(name: str, doc: str, labels: list[str], rows) -> GaugeMetricFamily:
    """A gauge family from ``[(label values, value), ...]``."""
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(list(values), value)
    return family
