"""Metric objects of a cache node, on a registry made per app (never the global one).

Counters are bumped at exactly one place each: the end of a request
(requests, bytes, duration: `NodeMetrics.request_done`, called by the front's
hit path and by the pipeline's `done`), the upstream pool (upstream requests
and latency), the coalescer's followers, and the parent health hook.  Store
gauges are read from the store at scrape time by a custom collector, so the
hit path does no metric work for them.  The per-request figures are plain
integers in :class:`RequestStats`, turned into Prometheus families only when
scraped: prometheus-client's Counter and Histogram take a lock per update,
which cost the hit path about 8% of its time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from edge import __version__

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT", "PURGE"})
STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")   # by status // 100
# The hit ratio as every view of it computes it (`edge status`, the scheduler's status page,
# deploy/grafana, deploy/prometheus/alerts.yml): answers from the cache over lookups, where a
# lookup is every request that could have been a hit (not BYPASS, REFUSED or ERROR).
HIT_STATUSES = frozenset({"HIT", "UPDATING", "STALE"})
LOOKUP_STATUSES = HIT_STATUSES | {"MISS", "EXPIRED", "REVALIDATED"}
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StoreCollector(Collector):
    """Objects, bytes, evictions and corrupt entries per cache tier, read when scraped."""

    def __init__(self, tiers: Callable[[], Iterable]):
        self._tiers = tiers

    def collect(self):
        objects = GaugeMetricFamily("edge_cache_objects", "Objects held, per cache tier.", labels=["tier"])
        size = GaugeMetricFamily("edge_cache_bytes", "Bytes counted against each tier's size limit (body plus per-entry overhead).",
                                 labels=["tier"])
        evictions = CounterMetricFamily("edge_cache_evictions", "Objects evicted to make room, per cache tier.",
                                        labels=["tier"])
        corrupt = CounterMetricFamily("edge_cache_corrupt_entries", "Broken entries found (checksum, size or "
                                      "meta) and removed, per tier that checks its entries.", labels=["tier"])
        for tier in self._tiers():
            objects.add_metric([tier.name], tier.objects)
            size.add_metric([tier.name], tier.bytes)
            evictions.add_metric([tier.name], tier.evictions)
            if hasattr(tier, "corrupt"):      # the memory tier has nothing to check
                corrupt.add_metric([tier.name], tier.corrupt)
        yield objects
        yield size
        yield evictions
        yield corrupt


class UpstreamConnectionsCollector(Collector):
    """Connections to each upstream address in use and idle, and requests queued for one, read when scraped."""

    def __init__(self, stats: Callable[[], Iterable[tuple[str, str, int, int, int]]]):
        self._stats = stats

    def collect(self):
        connections = GaugeMetricFamily("edge_upstream_connections", "Open connections to an upstream, by state.",
                                        labels=["upstream", "address", "state"])
        queued = GaugeMetricFamily("edge_upstream_queued", "Requests waiting for a connection to an upstream "
                                   "(upstream_max_conns reached).", labels=["upstream", "address"])
        for name, address, active, idle, waiting in self._stats():
            connections.add_metric([name, address, "active"], active)
            connections.add_metric([name, address, "idle"], idle)
            queued.add_metric([name, address], waiting)
        yield connections
        yield queued


class RequestStats(Collector):
    """Client requests, body bytes and durations as plain numbers, exported when scraped.

    Requests are counted by site, cache status, method and status class;
    body bytes by site and cache status (the byte hit ratio); durations by
    cache status.  Every label is bounded: `site` takes the configured sites'
    names (``""`` for a request no site took: unknown Host, malformed target),
    methods outside :data:`METHODS` count as ``OTHER``, and status codes
    collapse into their class.  One event loop updates them, so no lock is
    needed.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, str, str], int] = {}
        self.bytes: dict[tuple[str, str], int] = {}
        # per cache status: one count per bucket (the last is +Inf), and the sum
        self.durations: dict[str, tuple[list[int], list[float]]] = {}
        # The front's hit path (always a 200 HIT, duration 0), per site: [GETs, HEADs, body bytes];
        # folded into the general counts at scrape.  A list per site keeps the hit path to one
        # dict lookup and two additions: no tuple key is built per hit.
        self.fast_hits: dict[str, list[int]] = {}

    def add(self, site: str, cache_status: str, method: str, status: int, duration: float,
            body_bytes: int) -> None:
        key = (site, cache_status, method, STATUS_CLASSES[status // 100] if 0 < status < 600 else "other")
        self.counts[key] = self.counts.get(key, 0) + 1
        histogram = self._histogram(cache_status)
        histogram[0][bisect_left(LATENCY_BUCKETS, duration)] += 1
        histogram[1][0] += duration
        if body_bytes:
            key2 = (site, cache_status)
            self.bytes[key2] = self.bytes.get(key2, 0) + body_bytes

    def _histogram(self, cache_status: str) -> tuple[list[int], list[float]]:
        histogram = self.durations.get(cache_status)
        if histogram is None:
            histogram = self.durations[cache_status] = ([0] * (len(LATENCY_BUCKETS) + 1), [0.0])
        return histogram

    def fast_hit(self, site: str, method: str, body_bytes: int) -> None:
        counts = self.fast_hits.get(site)
        if counts is None:
            counts = self.fast_hits[site] = [0, 0, 0]
        if method == "GET":
            counts[0] += 1
            counts[2] += body_bytes
        else:
            counts[1] += 1

    def _fold_fast_hits(self) -> None:
        """Move the hit path's counts into the general ones, as zero-duration 200 HITs."""
        for site, fast in self.fast_hits.items():
            gets, heads, body_bytes = fast
            if not (gets or heads):
                continue
            fast[0] = fast[1] = fast[2] = 0
            for method, count in (("GET", gets), ("HEAD", heads)):
                if count:
                    key = (site, "HIT", method, "2xx")
                    self.counts[key] = self.counts.get(key, 0) + count
            self._histogram("HIT")[0][0] += gets + heads
            if body_bytes:
                self.bytes[(site, "HIT")] = self.bytes.get((site, "HIT"), 0) + body_bytes

    def collect(self):
        self._fold_fast_hits()
        requests = CounterMetricFamily("edge_requests", "Client requests by site, cache status (nginx "
                                       "vocabulary), method and response status class.",
                                       labels=["site", "cache_status", "method", "status_class"])
        for labels, count in sorted(self.counts.items()):
            requests.add_metric(labels, count)
        yield requests
        body = CounterMetricFamily("edge_response_body_bytes", "Body bytes sent to clients, by site and "
                                   "cache status (a byte hit ratio).", labels=["site", "cache_status"])
        for labels, count in sorted(self.bytes.items()):
            body.add_metric(labels, count)
        yield body
        durations = HistogramMetricFamily("edge_request_duration_seconds",
                                          "Time from request to the end of the response.", labels=["cache_status"])
        for cache_status, (counts, total) in sorted(self.durations.items()):
            buckets, running = [], 0
            for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), counts):
                running += count
                buckets.append((bound, running))
            durations.add_metric([cache_status], buckets, total[0])
        yield durations


def process_metrics(registry: CollectorRegistry) -> None:
    """What every process exports (cache nodes, the origin, the DNS scheduler): ``edge_build_info``
    and prometheus-client's process metrics (CPU, memory, open files; read from /proc at scrape)."""
    Gauge("edge_build_info", "Always 1; the running version in the label.", ["version"],
          registry=registry).labels(__version__).set(1)
    ProcessCollector(registry=registry)


class NodeMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        process_metrics(registry)
        self.requests = RequestStats()
        registry.register(self.requests)
        self.upstream_requests = Counter("edge_upstream_requests", "Requests sent upstream, by upstream and outcome.",
                                         ["upstream", "outcome"], registry=registry)
        self.upstream_excess = Counter(
            "edge_upstream_excess_body", "Upstream responses followed by bytes beyond their framing "
            "(RFC 9112 6.3): the response is delivered and that connection closed.", ["upstream"], registry=registry)
        self.upstream_duration = Histogram("edge_upstream_response_seconds",
                                           "Time from sending a request upstream to its response headers.",
                                           ["upstream"], buckets=LATENCY_BUCKETS, registry=registry)
        self.coalesced = Counter("edge_coalesced_waits", "Requests that waited for another request's fetch.",
                                 registry=registry)
        self.parent_up = Gauge("edge_parent_up", "1 when a parent is considered healthy.", ["parent"],
                               registry=registry)
        self.inflight = Gauge("edge_inflight_requests", "Client requests being served now.", registry=registry)
        self.invalidations = Counter("edge_invalidations", "Stored objects removed by unsafe methods or purge "
                                     "(reason purge), or marked stale by a soft purge (reason soft-purge).",
                                     ["reason"], registry=registry)
        self.purges = Counter("edge_purges", "Purge requests accepted, by kind (url, prefix, tag) and mode "
                              "(hard, soft).", ["kind", "mode"], registry=registry)
        self.bans = Gauge("edge_bans", "Purges (bans) still checked on lookup: not yet applied to every "
                          "object they cover, or a fetch older than them is still under way.", registry=registry)
        self.disconnected_stale = Counter(
            "edge_disconnected_stale", "Stale copies served because the upstream could not be reached "
            "(RFC 9111 4.2.4).", registry=registry)
        self.loops = Counter("edge_loops_detected", "Requests refused with 508 because this node was in Via.",
                             registry=registry)
        self.refused = Counter("edge_refused_requests", "Requests refused before proxying, by reason.",
                               ["reason"], registry=registry)

    def request_done(self, site: str, cache_status: str, method: str, status: int, duration: float,
                     body_bytes: int) -> None:
        """Count one client request (`site` is a configured site's name, or "" for none)."""
        if method not in METHODS:
            method = "OTHER"      # extension methods must not grow the label set without bound
        self.requests.add(site, cache_status, method, status, duration, body_bytes)

    def watch_store(self, tiers: Callable[[], Iterable]) -> None:
        self.registry.register(StoreCollector(tiers))

    def watch_upstreams(self, stats: Callable[[], Iterable[tuple[str, str, int, int, int]]]) -> None:
        self.registry.register(UpstreamConnectionsCollector(stats))
