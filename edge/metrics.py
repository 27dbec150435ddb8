"""Metric objects of a cache node, on a registry made per app (never the global one).

Counters are bumped at exactly one place each: the end of a request in the
proxy (requests, bytes, duration), the upstream pool (upstream requests and
latency), the coalescer's followers, and the parent health hook.  Store
gauges are read from the store at scrape time by a custom collector, so the
hit path does no metric work for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PURGE"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StoreCollector(Collector):
    """Objects, bytes and evictions per cache tier, read when scraped."""

    def __init__(self, tiers: Callable[[], Iterable]):
        self._tiers = tiers

    def collect(self):
        objects = GaugeMetricFamily("edge_cache_objects", "Objects held, per cache tier.", labels=["tier"])
        size = GaugeMetricFamily("edge_cache_bytes", "Bytes counted against each tier's size limit (body plus per-entry overhead).",
                                 labels=["tier"])
        evictions = CounterMetricFamily("edge_cache_evictions", "Objects evicted to make room, per cache tier.",
                                        labels=["tier"])
        for tier in self._tiers():
            objects.add_metric([tier.name], tier.objects)
            size.add_metric([tier.name], tier.bytes)
            evictions.add_metric([tier.name], tier.evictions)
        yield objects
        yield size
        yield evictions


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.requests = Counter("edge_requests", "Client requests by cache status (nginx vocabulary) and method.",
                                ["cache_status", "method"], registry=registry)
        self.response_bytes = Counter("edge_response_body_bytes", "Body bytes sent to clients.",
                                      registry=registry)
        self.request_duration = Histogram("edge_request_duration_seconds",
                                          "Time from request to the end of the response.",
                                          ["cache_status"], buckets=LATENCY_BUCKETS, registry=registry)
        self.upstream_requests = Counter("edge_upstream_requests", "Requests sent upstream, by upstream and outcome.",
                                         ["upstream", "outcome"], registry=registry)
        self.upstream_duration = Histogram("edge_upstream_response_seconds",
                                           "Time from sending a request upstream to its response headers.",
                                           ["upstream"], buckets=LATENCY_BUCKETS, registry=registry)
        self.coalesced = Counter("edge_coalesced_waits", "Requests that waited for another request's fetch.",
                                 registry=registry)
        self.parent_up = Gauge("edge_parent_up", "1 when a parent is considered healthy.", ["parent"],
                               registry=registry)
        self.inflight = Gauge("edge_inflight_requests", "Client requests being served now.", registry=registry)
        self.invalidations = Counter("edge_invalidations", "Stored objects removed by unsafe methods or purge.",
                                     ["reason"], registry=registry)
        self.loops = Counter("edge_loops_detected", "Requests refused with 508 because this node was in Via.",
                             registry=registry)
        self._request_children: dict[tuple[str, str], tuple] = {}
        self.refused = Counter("edge_refused_requests", "Requests refused before proxying, by reason.",
                               ["reason"], registry=registry)

    def request_done(self, cache_status: str, method: str, duration: float, body_bytes: int) -> None:
        """Count one client request; the labelled children are looked up once and kept."""
        if method not in METHODS:
            method = "OTHER"      # extension methods must not grow the label set without bound
        key = (cache_status, method)
        children = self._request_children.get(key)
        if children is None:
            children = self._request_children[key] = (self.requests.labels(cache_status, method),
                                                       self.request_duration.labels(cache_status))
        children[0].inc()
        children[1].observe(duration)
        if body_bytes:
            self.response_bytes.inc(body_bytes)

    def watch_store(self, tiers: Callable[[], Iterable]) -> None:
        self.registry.register(StoreCollector(tiers))
