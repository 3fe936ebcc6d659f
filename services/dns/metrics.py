"""Prometheus metrics of the dns service (on the node's CollectorRegistry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class DNSMetrics:
    """Counters and the update latency histogram; ``registry=None`` keeps them private."""

    def __init__(self, registry: CollectorRegistry | None = None):
        registry = registry if registry is not None else CollectorRegistry()
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
        self.latency = Histogram("appliance_dns_update_latency_seconds",
                                 "Time from sending an UPDATE to its answer",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.ddns = Counter("appliance_dns_ddns", "DDNS operations for DHCP, by result",
                            ["op", "result"], registry=registry)

    def answered(self, rcode: str, seconds: float) -> None:
        self.updates.labels(rcode).inc()
        self.latency.observe(seconds)
        if rcode != "NOERROR":
            self.failures.labels(rcode).inc()

    def failed(self, rcode: str) -> None:
        self.failures.labels(rcode).inc()
