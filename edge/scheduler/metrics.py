"""The scheduler's metrics: answers counted as plain integers, summed when Prometheus scrapes.

A prometheus_client Counter takes a lock on every ``inc()``; at tens of
thousands of answers a second the hit path would spend more time counting
than answering.  So each kind of answer (query type label, rcode, the edges
handed out, whether every candidate was down) is one :class:`Tally`, the
same object on a cache hit as on the miss that filled the entry, whose
``count`` is bumped in place; :class:`SchedulerCollector` sums the tallies
into ``dns_queries_total``, ``dns_answers_total`` and
``dns_all_edges_down_total`` at scrape time, and reads the cache, RRL and
TCP figures off the transport the same way.  Tallies are interned by value,
and every part of the value comes from a bounded set (known query types or
OTHER, the rcodes we send, the topology's edges and regions), so there are
few of them however many queries arrive.
"""

from __future__ import annotations

from collections import Counter as Sums
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import dns.rcode
import dns.rdatatype
from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edge.scheduler.answer import Edge
from edge.scheduler.server import DnsServer

# Query types with their own metric label; anything else counts as OTHER, so a
# scan of all 65536 types cannot blow up the number of time series.
_QTYPE_LABELS = {int(t): dns.rdatatype.to_text(t) for t in (
    dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME, dns.rdatatype.NS, dns.rdatatype.SOA,
    dns.rdatatype.ANY, dns.rdatatype.MX, dns.rdatatype.TXT, dns.rdatatype.PTR, dns.rdatatype.SRV,
    dns.rdatatype.CAA, dns.rdatatype.HTTPS, dns.rdatatype.SVCB, dns.rdatatype.DS,
    dns.rdatatype.DNSKEY, dns.rdatatype.AXFR, dns.rdatatype.IXFR)}

# What the resolver decided for one answer: the edges handed out, whether every
# candidate was down, and the client's region (for the all-down warning).
Decision = tuple[tuple[str, ...], bool, str | None]


@dataclass(eq=False)
class Tally:
    """One kind of answer and how many of it were sent."""

    qtype: str
    rcode: str
    edges: tuple[str, ...]
    all_down: bool
    region: str | None
    count: int = 0


class SchedulerMetrics:
    """The metric objects that are not per answer, and the interned tallies."""

    def __init__(self, registry: CollectorRegistry, edges: tuple[Edge, ...]):
        self.edge_up = Gauge("dns_edge_up", "1 if the edge passes its health checks", ["edge"], registry=registry)
        self.decision = Histogram("dns_decision_seconds", "Time to decide an answer on the full path "
                                  "(cache misses; parsing excluded)",
                                  buckets=(5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2),
                                  registry=registry)
        self.up_by_edge: dict[str, Any] = {}
        self.track_edges(edges, {})
        self._tallies: dict[tuple[str, int, Hashable], Tally] = {}

    def track_edges(self, edges: tuple[Edge, ...], up: dict[str, bool]) -> None:
        """Per-edge series for these edges (at start, and after a reload): removed edges' series go."""
        names = tuple(edge.name for edge in edges)
        for gone in set(self.up_by_edge) - set(names):
            self.edge_up.remove(gone)
        self.edge_names = names
        self.up_by_edge = {name: self.edge_up.labels(edge=name) for name in names}
        for name, gauge in self.up_by_edge.items():
            gauge.set(1 if up.get(name, True) else 0)      # not probed yet counts as up

    def tally(self, qtype: int | None, rcode: int, decision: Decision | None) -> Tally:
        """The tally of one kind of answer (made on first use)."""
        label = "NONE" if qtype is None else _QTYPE_LABELS.get(qtype, "OTHER")
        key = (label, rcode, decision)
        found = self._tallies.get(key)
        if found is None:
            edges, all_down, region = decision if decision is not None else ((), False, None)
            found = self._tallies[key] = Tally(label, dns.rcode.to_text(rcode), edges, all_down, region)
        return found

    def tallies(self) -> list[Tally]:
        return list(self._tallies.values())


class SchedulerCollector:
    """Sums tallies and reads the transport's figures when Prometheus scrapes."""

    def __init__(self, metrics: SchedulerMetrics, server: DnsServer):
        self.metrics = metrics
        self.server = server

    def collect(self) -> Iterator[Metric]:
        queries: Sums[tuple[str, str]] = Sums()
        answers: Sums[str] = Sums(dict.fromkeys(self.metrics.edge_names, 0))
        all_down = 0
        for tally in self.metrics.tallies():
            queries[(tally.qtype, tally.rcode)] += tally.count
            for edge in tally.edges:
                answers[edge] += tally.count
            if tally.all_down:
                all_down += tally.count
        family = CounterMetricFamily("dns_queries", "DNS queries answered, by query type and response code",
                                     labels=["qtype", "rcode"])
        for (qtype, rcode), count in sorted(queries.items()):
            family.add_metric([qtype, rcode], count)
        yield family
        family = CounterMetricFamily("dns_answers", "Edges handed out in answers", labels=["edge"])
        for edge, count in answers.items():
            family.add_metric([edge], count)
        yield family
        yield CounterMetricFamily("dns_all_edges_down", "Answers given with every candidate edge down "
                                  "(the nearest was answered anyway)", value=all_down)

        server, cache = self.server, self.server.cache
        yield CounterMetricFamily("dns_cache_hits", "Queries answered from the answer cache", value=cache.hits)
        yield CounterMetricFamily("dns_cache_misses", "Queries answered on the full path (not in the cache, "
                                  "or of a shape the cache does not take)", value=cache.misses)
        yield CounterMetricFamily("dns_cache_evictions", "Answers pushed out of the cache to make room",
                                  value=cache.evictions)
        yield GaugeMetricFamily("dns_cache_entries", "Answers in the answer cache", value=cache.entries)
        yield GaugeMetricFamily("dns_cache_bytes", "Bytes charged against the answer cache's bound",
                                value=cache.bytes)
        yield GaugeMetricFamily("dns_cache_max_bytes", "The answer cache's bound (dns.cache_size)",
                                value=cache.max_bytes)
        family = CounterMetricFamily("dns_rrl_limited", "UDP answers refused by response rate limiting",
                                     labels=["action"])
        rrl = server.rrl
        family.add_metric(["slipped"], rrl.slipped if rrl else 0)
        family.add_metric(["dropped"], rrl.dropped if rrl else 0)
        yield family
        yield GaugeMetricFamily("dns_tcp_connections", "Open TCP connections", value=server.tcp_connections)
        family = CounterMetricFamily("dns_tcp_closed", "TCP connections the server closed, by reason",
                                     labels=["reason"])
        family.add_metric(["network_limit"], server.tcp_refused)
        family.add_metric(["replaced"], server.tcp_replaced)
        family.add_metric(["idle"], server.tcp_timed_out)
        yield family
