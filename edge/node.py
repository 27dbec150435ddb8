"""Run one node of the topology (origin, L2 parent or L1 edge) until told to stop.

Each node serves traffic on `listen` and its admin app (metrics, health,
status, purge) on `admin`.  Both sockets are bound before the node reports
healthy, so a bind failure surfaces as an OSError to the command line.
A cache node's traffic goes through our own HTTP front (`edge.http`); the
origin and every admin listener are aiohttp apps.

Stopping a cache node drains it: the traffic listener closes, idle
connections close, `/healthz` answers ``draining`` (so the DNS scheduler
stops sending clients) while in-flight requests get up to `drain_timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge import admin, cache_admin
from edge.config import Node, Topology
from edge.http.accesslog import AccessLog
from edge.http.server import Front
from edge.metrics import NodeMetrics
from edge.proxy import CacheNode
from edge.store import DiskStore, MemoryStore, TieredStore
from edge.upstream.client import UpstreamPool

log = logging.getLogger("edge.node")

ADMIN_TOKEN_ENV = "EDGE_ADMIN_TOKEN"


async def serve(topology: Topology, node: Node, stop: asyncio.Event) -> None:
    async with AsyncExitStack() as stack:
        if node.role == "origin":
            traffic, admin_app = _origin_apps(node)
            await _listen(stack, traffic, node.listen.host, node.listen.port)
            await _listen(stack, admin_app, node.admin.host, node.admin.port)
            log.info("%s (%s) serving traffic on %s, admin on %s", node.name, node.role, node.listen, node.admin)
            await stop.wait()
            log.info("%s stopping", node.name)
            return
        cache_node = await _cache_node(topology, node, stack)
        access_log = AccessLog(node.access_log, node.access_log_format)
        await access_log.start()        # an OSError names the file: the command line prints it
        stack.push_async_callback(access_log.close)
        front = Front(cache_node, node.limits, access_log,
                      count_refusal=lambda reason: cache_node.metrics.refused.labels(reason).inc())
        await _listen(stack, _cache_admin_app(topology, cache_node, front), node.admin.host, node.admin.port)
        await front.start(node.listen.host, node.listen.port)
        log.info("%s (%s) serving traffic on %s, admin on %s", node.name, node.role, node.listen, node.admin)
        await stop.wait()
        log.info("%s draining (up to %gs for %d requests in flight)", node.name, node.limits.drain_timeout,
                 front.busy)
        await front.drain()
        log.info("%s stopped", node.name)


async def _listen(stack: AsyncExitStack, app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, host, port, backlog=1024).start()


def _origin_apps(node: Node) -> tuple[web.Application, web.Application]:
    from origin.app import make_app as make_origin_app
    registry = CollectorRegistry()
    traffic = make_origin_app(node.content_dir, node.content_cache_control, registry)
    health = lambda: {"status": "ok", "node": node.name, "role": node.role}  # noqa: E731
    return traffic, admin.make_admin_app(registry, health, allow=node.admin_allow)


async def _cache_node(topology: Topology, node: Node, stack: AsyncExitStack) -> CacheNode:
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    memory = MemoryStore(node.memory_size, min(node.memory_object_max, node.memory_size))
    disk = DiskStore(topology.cache_dir(node), node.disk_size)
    store = TieredStore(memory, disk)
    await store.start()
    stack.push_async_callback(store.close)
    metrics.watch_store(store.tiers)

    upstreams = UpstreamPool(topology, node, metrics)
    await upstreams.start()
    stack.push_async_callback(upstreams.close)
    cache_node = CacheNode(topology, node, store, upstreams, metrics,
                           ban_file=topology.cache_dir(node) / "bans.json")
    stack.push_async_callback(cache_node.close)
    await cache_node.start()
    return cache_node


def _cache_admin_app(topology: Topology, cache_node: CacheNode, front: Front) -> web.Application:
    node = cache_node.node
    started = time.time()

    def health() -> dict:
        return {
            "status": "draining" if front.draining else "ok", "node": node.name, "role": node.role,
            "inflight": cache_node.inflight, "max_inflight": node.max_inflight,
            "overloaded": cache_node.inflight > node.max_inflight,
        }

    async def status(request: web.Request) -> web.Response:
        store = cache_node.store
        return web.json_response({
            **health(),
            "uptime_seconds": round(time.time() - started, 3),
            "tiers": [{"tier": t.name, "objects": t.objects, "bytes": t.bytes, "evictions": t.evictions}
                      for t in store.tiers()],
            "parents": cache_node.upstreams.health.state() if node.parents else {},
            "fetches_in_flight": len(cache_node.flights),
            "connections": len(front.connections),
            "bans": cache_node.bans.summary(),
        })

    token = admin.load_token()      # OSError naming a bad token file: the command line prints it
    routes = [web.get("/status", status), *cache_admin.routes(topology, cache_node, token)]
    return admin.make_admin_app(cache_node.metrics.registry, health, routes, allow=node.admin_allow)
