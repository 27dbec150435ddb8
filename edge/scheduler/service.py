"""The DNS scheduler process: answerer + transport + health checks + admin listener.

``edge run dns`` calls :func:`serve`.  This module wires the pure answerer
to the world and keeps the books (metrics, logs); it decides nothing itself.

A reload (SIGHUP, see `edge.reload`) builds a new Answerer from the new
topology (which validates it), carries the health of the edges that stay
over, and swaps both in one step; the sockets and the transport stay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import TYPE_CHECKING, Any

import dns.message
import dns.rcode
import dns.rdatatype
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge.admin import make_admin_app
from edge.config import Topology
from edge.metrics import process_metrics
from edge.scheduler.answer import Answer, Answerer, Edge
from edge.scheduler.geo import IPAddress
from edge.scheduler.health import EdgeHealth, HealthChecker
from edge.scheduler.overview import Overview
from edge.scheduler.overview import routes as overview_routes
from edge.scheduler.server import DnsServer, Resolved

if TYPE_CHECKING:
    from edge.reload import Reloader

log = logging.getLogger("edge.dns")

# Query types with their own metric label; anything else counts as OTHER, so a
# scan of all 65536 types cannot blow up the number of time series.
_QTYPE_LABELS = frozenset(dns.rdatatype.to_text(t) for t in (
    dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.CNAME, dns.rdatatype.NS, dns.rdatatype.SOA,
    dns.rdatatype.ANY, dns.rdatatype.MX, dns.rdatatype.TXT, dns.rdatatype.PTR, dns.rdatatype.SRV,
    dns.rdatatype.CAA, dns.rdatatype.HTTPS, dns.rdatatype.SVCB, dns.rdatatype.DS,
    dns.rdatatype.DNSKEY, dns.rdatatype.AXFR, dns.rdatatype.IXFR))
ALL_DOWN_LOG_EVERY = 10.0      # seconds between repeated "all edges down" warnings


class SchedulerMetrics:
    """The scheduler's metric objects, on a registry of its own."""

    def __init__(self, registry: CollectorRegistry, edges: tuple[Edge, ...]):
        self.queries = Counter("dns_queries_total", "DNS queries answered, by query type and response code",
                               ["qtype", "rcode"], registry=registry)
        self.answers = Counter("dns_answers_total", "Edges handed out in answers", ["edge"], registry=registry)
        self.edge_up = Gauge("dns_edge_up", "1 if the edge passes its health checks", ["edge"], registry=registry)
        self.all_down = Counter("dns_all_edges_down", "Answers given with every candidate edge down "
                                "(the nearest was answered anyway)", registry=registry)
        self.decision = Histogram("dns_decision_seconds", "Time to decide an answer (parsing excluded)",
                                  buckets=(5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2),
                                  registry=registry)
        self.answers_by_edge: dict[str, Any] = {}
        self.up_by_edge: dict[str, Any] = {}
        self.track_edges(edges, {})
        self._queries: dict[tuple[int | None, int], Any] = {}

    def track_edges(self, edges: tuple[Edge, ...], up: dict[str, bool]) -> None:
        """Per-edge series for these edges (at start, and after a reload): removed edges' series go."""
        names = {edge.name for edge in edges}
        for name in set(self.up_by_edge) - names:
            self.answers.remove(name)
            self.edge_up.remove(name)
        # Label children resolved once: a labels() call per query is measurable at high QPS.
        self.answers_by_edge = {edge.name: self.answers.labels(edge=edge.name) for edge in edges}
        self.up_by_edge = {edge.name: self.edge_up.labels(edge=edge.name) for edge in edges}
        for name, gauge in self.up_by_edge.items():
            gauge.set(1 if up.get(name, True) else 0)      # not probed yet counts as up

    def count_query(self, qtype: int | None, rcode: int) -> None:
        """Count one response; label text is worked out once per (type, rcode) pair."""
        child = self._queries.get((qtype, rcode))
        if child is None:
            label = "NONE" if qtype is None else dns.rdatatype.to_text(qtype)
            if qtype is not None and label not in _QTYPE_LABELS:
                label = "OTHER"
            child = self._queries[(qtype, rcode)] = self.queries.labels(
                qtype=label, rcode=dns.rcode.to_text(rcode))
        child.inc()


class Scheduler:
    """One DNS scheduler: build with a topology, :meth:`start`, and :meth:`close`."""

    def __init__(self, topology: Topology, reloader: Reloader | None = None):
        self.topology = topology
        self.reloader = reloader
        self.answerer = Answerer(topology)
        # Part of every rendering's variant: the transport's rendered answers of an
        # older topology are never sent again (a new site's name was NXDOMAIN before).
        self.generation = 0
        assert topology.dns is not None                   # Answerer raised ConfigError otherwise
        self.dns = topology.dns
        self.registry = CollectorRegistry()
        process_metrics(self.registry)
        self.metrics = SchedulerMetrics(self.registry, self.answerer.edges)
        self.health = HealthChecker(self.answerer.edges, self.dns.health, on_change=self._edge_changed)
        self.server = DnsServer(self, on_response=self._count_response)
        self.overview = Overview(topology, lambda: self.health.snapshot)    # the status page
        self._admin: web.AppRunner | None = None
        self.admin_address: tuple[str, int] | None = None
        self._all_down_logged = -ALL_DOWN_LOG_EVERY

    # ----------------------------------------------------------------- per query

    def resolve(self, query: dns.message.Message, client: IPAddress) -> Resolved:
        started = time.perf_counter()
        result = self.answerer.answer(query, client, self.health.snapshot)
        self.metrics.decision.observe(time.perf_counter() - started)
        for choice in result.choices:
            for edge in choice.chosen:
                self.metrics.answers_by_edge[edge.name].inc()
        if result.all_down:
            self._report_all_down(result)
        if result.choices:
            self.overview.record(result)
        # The rendering depends on the query bytes, on which edges were chosen, and on the topology.
        return Resolved(result.response, (self.generation, tuple(choice.chosen for choice in result.choices)))

    def _report_all_down(self, result: Answer) -> None:
        self.metrics.all_down.inc()
        now = time.monotonic()
        if now - self._all_down_logged >= ALL_DOWN_LOG_EVERY:
            self._all_down_logged = now
            location = result.location
            log.warning("every candidate edge is down; answering the nearest anyway (%s, region %s): %s",
                        location.address if location else "?", location.region if location else "?",
                        ", ".join(e.name for c in result.choices for e in c.chosen))

    def _count_response(self, query: dns.message.Message | None, response: dns.message.Message,
                        transport: str) -> None:
        qtype = query.question[0].rdtype if query is not None and query.question else None
        self.metrics.count_query(qtype, response.rcode())

    def _edge_changed(self, edge: Edge, before: EdgeHealth, after: EdgeHealth) -> None:
        self.metrics.up_by_edge[edge.name].set(1 if after.up else 0)

    # ----------------------------------------------------------------- reload

    def reload(self, topology: Topology) -> None:
        """Answer from a reloaded topology: sites, zones, regions, coverage, edges, TTL, answers, health
        settings.  Raises ConfigError (nothing changed) when the scheduler cannot take it."""
        answerer = Answerer(topology)          # validates; everything after this cannot fail
        assert topology.dns is not None
        self.health.retarget(answerer.edges, topology.dns.health)
        self.metrics.track_edges(answerer.edges, {name: s.up for name, s in self.health.snapshot.items()})
        self.topology, self.answerer, self.dns = topology, answerer, topology.dns
        self.overview.retarget(topology)
        self.generation += 1

    # ----------------------------------------------------------------- admin

    def health_report(self) -> dict[str, Any]:
        snapshot = self.health.snapshot
        report = {"status": "ok", "node": "dns", "role": "dns",
                  "edges": {name: {"up": s.up, "overloaded": s.overloaded, "detail": s.detail}
                            for name, s in snapshot.items()}}
        if self.reloader is not None:
            report["config_sha256"] = self.reloader.version.sha256   # how `edge up` sees a reload took
        return report

    async def status(self, request: web.Request) -> web.Response:
        """GET /status: the running topology as the scheduler sees it."""
        return web.json_response({
            **self.health_report(),
            "config": self.reloader.status() if self.reloader is not None else None,
            "sites": {site.name: list(site.hosts) for site in self.topology.sites},
            "regions": [region.name for region in self.topology.regions],
            "coverage": {str(net): region for net, region in self.topology.coverage},
            "ttl": self.dns.ttl, "answers": self.dns.answers,
        })

    async def explain(self, request: web.Request) -> web.Response:
        """GET /explain?name=NAME[&client=IP][&type=A][&subnet=CIDR]: why this answer."""
        name = request.query.get("name", "").strip()
        if not name:
            return _bad_request("missing ?name= (e.g. /explain?name=www.example.com&client=203.0.113.7)")
        client_text = request.query.get("client") or request.remote or ""
        try:
            client = ipaddress.ip_address(client_text)
        except ValueError:
            return _bad_request(f"client is not an IP address: {client_text!r}")
        subnet = None
        if request.query.get("subnet"):
            try:
                subnet = ipaddress.ip_network(request.query["subnet"], strict=False)
            except ValueError:
                return _bad_request(f"subnet is not a CIDR block: {request.query['subnet']!r}")
        try:
            record = self.answerer.explain(name, client, self.health.snapshot,
                                           request.query.get("type", "A"), subnet)
        except ValueError as exc:
            return _bad_request(str(exc))
        return web.json_response(record)

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind DNS (UDP+TCP) and the admin listener, then start health checks.

        Raises OSError, with nothing left open, if any bind fails.
        """
        await self.server.start(self.dns.listen.host, self.dns.listen.port)
        try:
            page = await asyncio.to_thread(overview_routes, self.overview)    # reads the page's files
            app = make_admin_app(self.registry, self.health_report,
                                 routes=[web.get("/explain", self.explain), web.get("/status", self.status),
                                         *page],
                                 allow=self.dns.admin_allow)
            self._admin = web.AppRunner(app, access_log=None)
            await self._admin.setup()
            site = web.TCPSite(self._admin, self.dns.admin.host, self.dns.admin.port)
            await site.start()
            self.admin_address = self._admin.addresses[0][:2]
        except BaseException:
            await self._close_admin()
            await self.server.close()
            raise
        await self.health.start()
        await self.overview.start()

    @property
    def dns_address(self) -> tuple[str, int] | None:
        return self.server.address

    async def _close_admin(self) -> None:
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None

    async def close(self) -> None:
        await self.overview.close()
        await self.health.close()
        await self.server.close()
        await self._close_admin()


def _bad_request(message: str) -> web.Response:
    return web.json_response({"error": message}, status=400)


async def serve(topology: Topology, stop: asyncio.Event, reloader: Reloader | None = None) -> None:
    """Run the scheduler of `topology` until `stop` is set (``edge run dns``)."""
    scheduler = Scheduler(topology, reloader)
    await scheduler.start()
    if reloader is not None:
        async def apply(new: Topology) -> None:
            scheduler.reload(new)
        reloader.attach(apply, scheduler.registry)
    host, port = scheduler.dns_address or ("?", 0)
    zones = ", ".join([*scheduler.dns.customer_zones, scheduler.dns.cdn_zone])
    log.info("dns scheduler authoritative for %s on %s:%d (udp+tcp), admin on http://%s:%d "
             "(status page /, /explain, /metrics, /healthz); try: dig @%s -p %d %s", zones, host, port,
             *(scheduler.admin_address or ("?", 0)), host, port,
             topology.sites[0].hosts[0] if topology.sites else scheduler.dns.cdn_zone)
    try:
        await stop.wait()
    finally:
        await scheduler.close()
