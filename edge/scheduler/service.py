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
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

import dns.message
from aiohttp import web
from prometheus_client import CollectorRegistry

from edge.admin import make_admin_app
from edge.config import Topology
from edge.metrics import process_metrics
from edge.scheduler.answer import Answerer, Edge
from edge.scheduler.geo import IPAddress
from edge.scheduler.health import EdgeHealth, HealthChecker
from edge.scheduler.metrics import SchedulerCollector, SchedulerMetrics, Tally
from edge.scheduler.overview import Overview
from edge.scheduler.overview import routes as overview_routes
from edge.scheduler.rrl import RateLimiter
from edge.scheduler.server import DnsServer, Resolved, Sources

if TYPE_CHECKING:
    from edge.reload import Reloader

log = logging.getLogger("edge.dns")

ALL_DOWN_LOG_EVERY = 10.0      # seconds between repeated "all edges down" warnings


class Scheduler:
    """One DNS scheduler: build with a topology, :meth:`start`, and :meth:`close`.

    It is the transport's resolver: it decides on the full path (through the
    answerer), names what the answer cache keys on (:meth:`place`,
    :attr:`generation`) and counts every answer sent (:meth:`count`).
    """

    def __init__(self, topology: Topology, reloader: Reloader | None = None, listen_host: str | None = None):
        self.topology = topology
        self.reloader = reloader
        # `edge run --listen-host`: bind there (at the topology's ports) instead of dns.listen and
        # dns.admin, which stay what clients and the other nodes use (a load balancer's IP, a name).
        self.listen_host = listen_host
        self.answerer = Answerer(topology)
        # Part of the answer cache's key with the health generation: answers cached
        # from an older topology are never sent again (a new site's name was NXDOMAIN before).
        self._topology_generation = 0
        assert topology.dns is not None                   # Answerer raised ConfigError otherwise
        self.dns = conf = topology.dns
        self.registry = CollectorRegistry()
        process_metrics(self.registry)
        self.metrics = SchedulerMetrics(self.registry, self.answerer.edges)
        self.health = HealthChecker(self.answerer.edges, conf.health, on_change=self._edge_changed)
        # What an answer depends on about the client: the answerer's to say, called per query.
        self.place: Callable[..., Hashable] = self.answerer.place
        limiter = RateLimiter(conf.rrl.rate, conf.rrl.slip, conf.rrl.table_size) if conf.rrl.rate else None
        self.server = DnsServer(self, cache_size=conf.cache_size, rate_limiter=limiter,
                                tcp_idle_timeout=conf.tcp_idle_timeout,
                                max_tcp_connections=conf.tcp_max_connections,
                                max_tcp_per_network=conf.tcp_max_per_network)
        self.registry.register(SchedulerCollector(self.metrics, self.server))
        self.overview = Overview(topology, lambda: self.health.snapshot)    # the status page
        self._admin: web.AppRunner | None = None
        self.admin_address: tuple[str, int] | None = None
        self._all_down_logged = -ALL_DOWN_LOG_EVERY

    # ----------------------------------------------------------------- per query

    @property
    def generation(self) -> int:
        """Moves whenever an edge's up or overloaded state does, and on every reload:
        cached answers of before are not reused (one int: the hit path hashes it per query)."""
        return (self._topology_generation << 32) + self.health.generation

    def resolve(self, query: dns.message.Message, client: IPAddress) -> Resolved:
        started = time.perf_counter()
        result = self.answerer.answer(query, client, self.health.snapshot)
        self.metrics.decision.observe(time.perf_counter() - started)
        if result.choices:
            self.overview.record(result)                   # the status page's last answers (full path)
        edges = tuple(edge.name for choice in result.choices for edge in choice.chosen)
        region = result.location.region if result.location is not None else None
        return Resolved(result.response, (edges, result.all_down, region))

    def tally(self, qtype: int | None, rcode: int, decision: Hashable) -> Tally:
        return self.metrics.tally(qtype, rcode, decision)  # type: ignore[arg-type]

    def count(self, tally: Tally) -> None:
        """Count one answer sent, from the cache or not: the one place answers are counted."""
        tally.count += 1
        if tally.all_down:
            self._report_all_down(tally)

    def _report_all_down(self, tally: Tally) -> None:
        now = time.monotonic()
        if now - self._all_down_logged >= ALL_DOWN_LOG_EVERY:
            self._all_down_logged = now
            log.warning("every candidate edge is down; answering the nearest anyway (region %s): %s",
                        tally.region or "none", ", ".join(tally.edges))

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
        self.place = answerer.place
        # Where each peer address is depends on the coverage: forget what was worked out.
        self.server.sources = Sources(answerer.place, self.server.sources.size)
        self.overview.retarget(topology)
        self._topology_generation += 1

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
        await self.server.start(self.listen_host or self.dns.listen.host, self.dns.listen.port)
        try:
            page = await asyncio.to_thread(overview_routes, self.overview)    # reads the page's files
            app = make_admin_app(self.registry, self.health_report,
                                 routes=[web.get("/explain", self.explain), web.get("/status", self.status),
                                         *page],
                                 allow=self.dns.admin_allow)
            self._admin = web.AppRunner(app, access_log=None)
            await self._admin.setup()
            site = web.TCPSite(self._admin, self.listen_host or self.dns.admin.host, self.dns.admin.port)
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


async def serve(topology: Topology, stop: asyncio.Event, reloader: Reloader | None = None,
                listen_host: str | None = None) -> None:
    """Run the scheduler of `topology` until `stop` is set (``edge run dns``)."""
    scheduler = Scheduler(topology, reloader, listen_host)
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
