"""Prometheus metrics through prometheus_client (DESIGN.md §10). Torch-free.

Each service owns a `Metrics`: its own registry (several services share a process in tests), every
name under the `tandem_` namespace. Series that describe other processes (a coordinator's workers)
come from a Collector that reads the live state at scrape time, so a dead worker's series vanish
with it instead of keeping their last value forever.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.registry import Collector

# No `*_created` series next to every counter and histogram: nothing of ours reads them, and they
# double what a scrape carries.
disable_created_metrics()

NAMESPACE = "tandem"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "NAMESPACE", "Collector", "Metrics"]


class Metrics:
    """One service's metrics. `counter("requests", ...)` is exposed as `tandem_requests_total`."""

    def __init__(self):
        self.registry = CollectorRegistry()

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name, help, list(labels), namespace=NAMESPACE, registry=self.registry)

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(name, help, list(labels), namespace=NAMESPACE, registry=self.registry)

    def histogram(self, name: str, help: str, labels: Iterable[str] = (),
                  buckets: Iterable[float] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(name, help, list(labels), namespace=NAMESPACE, registry=self.registry,
                         buckets=tuple(buckets))

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)

    def render(self) -> bytes:
        """The text exposition format, for GET /metrics (with CONTENT_TYPE)."""
        return generate_latest(self.registry)
