"""Run one node of the topology (origin, L2 parent or L1 edge) until told to stop.

Each node serves traffic on `listen` and its admin app (metrics, health,
status, purge) on `admin`.  Both sockets are bound before the node reports
healthy, so a bind failure surfaces as an OSError to the command line.
A cache node's traffic goes through our own HTTP front (`edge.http`); the
origin and every admin listener are aiohttp apps.

Stopping a cache node drains it: the traffic listener closes, idle
connections close, `/healthz` answers ``draining`` (so the DNS scheduler
stops sending clients) while in-flight requests get up to `drain_timeout`.

A reload (SIGHUP, see `edge.reload`) opens the new access log first (the only
step that can fail), then swaps the topology into the pipeline, the upstream
pool and the front in one step; connections and the cache are kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge import admin, cache_admin, workers
from edge.http import tls
from edge.config import Address, Node, Topology
from edge.http.accesslog import AccessLog
from edge.http.server import Front
from edge.metrics import NodeMetrics, process_metrics
from edge.proxy import CacheNode
from edge.reload import Reloader
from edge.store import DiskStore, MemoryStore, TieredStore
from edge.upstream.client import UpstreamPool
from edge.workers import WorkerSlot

log = logging.getLogger("edge.node")


async def serve(topology: Topology, node: Node, stop: asyncio.Event, reloader: Reloader | None = None,
                listen_host: str | None = None, worker: WorkerSlot | None = None) -> None:
    """Run `node` until `stop` is set.  `listen_host` (`edge run --listen-host`) binds every listener
    on that host, at the topology's ports, instead of the topology's addresses: those stay what
    other nodes use to reach this one (in Kubernetes, a Service's name or a load balancer's IP).
    As one worker of several (`worker`, see edge.workers): traffic on SO_REUSEPORT listeners, the
    node's shared disk index, the admin app on the worker's Unix socket."""
    def bind(address: Address) -> tuple[str, int]:
        return (listen_host or address.host, address.port)

    async with AsyncExitStack() as stack:
        if node.role == "origin":
            traffic, admin_app = _origin_apps(node, reloader)
            await _listen(stack, traffic, *bind(node.listen))
            await _listen(stack, admin_app, *bind(node.admin))
            log.info("%s (%s) serving traffic on %s, admin on %s%s", node.name, node.role, node.listen, node.admin,
                     f" (bound on {listen_host})" if listen_host else "")
            if reloader is not None:
                # Everything an origin has needs a restart (edge.reload.RESTART_NODE_KEYS): a
                # reload only checks that, so the origin runs the generation the others do.
                reloader.attach(_apply_nothing)
            await stop.wait()
            log.info("%s stopping", node.name)
            return
        # Certificates and CA bundles: read at start (a ConfigError names the file), swapped on reload.
        tls_setup = await asyncio.to_thread(tls.load, topology, node)
        cache_node = await _cache_node(topology, node, stack, tls_setup, listen_host, worker)
        access_log = AccessLog(node.access_log, node.access_log_format)
        await access_log.start()        # an OSError names the file: the command line prints it
        front = Front(cache_node, node.limits, access_log,
                      count_refusal=lambda reason: cache_node.metrics.refused.labels(reason).inc())
        stack.push_async_callback(lambda: front.access_log.close())    # the log of the last reload
        admin_app = _cache_admin_app(cache_node, front, reloader, worker)
        if worker is None:
            await _listen(stack, admin_app, *bind(node.admin))
        else:
            await _listen_unix(stack, admin_app, worker.socket)
        _apply_tls(front, topology, node, tls_setup)
        shared = worker is not None
        await front.start(*bind(node.listen), reuse_port=shared)
        if node.listen_tls is not None:
            await front.start(*bind(node.listen_tls), tls=True, reuse_port=shared)
            log.info("%s serving HTTPS on %s (default certificate: site %s)", node.name, node.listen_tls,
                     tls_setup.default_site)
        if reloader is not None:
            reloader.attach(lambda new: _reload_cache_node(new, cache_node, front), cache_node.metrics.registry)
        log.info("%s (%s) serving traffic on %s, admin on %s%s", node.name, node.role, node.listen,
                 node.admin if worker is None else f"{worker.socket} (worker {worker.index})",
                 f" (bound on {listen_host})" if listen_host else "")
        await stop.wait()
        log.info("%s draining (up to %gs for %d requests in flight)", node.name, node.limits.drain_timeout,
                 front.busy)
        await front.drain()
        log.info("%s stopped", node.name)


async def _reload_cache_node(topology: Topology, cache_node: CacheNode, front: Front) -> None:
    """Apply a reloaded topology (already validated, restart-only keys unchanged)."""
    node = topology.node(cache_node.node.name)
    # Reopened on every reload, as nginx does: `systemctl reload` after logrotate
    # moves the file starts a new one.  The one step that can fail: before any swap.
    access_log = AccessLog(node.access_log, node.access_log_format)
    await access_log.start()
    try:
        tls_setup = await asyncio.to_thread(tls.load, topology, node)
    except BaseException:
        await access_log.close()
        raise
    # One step, no await: every request sees the old topology or the new one.
    cache_node.reload(topology, node)
    cache_node.upstreams.reload(topology, node, tls_setup.upstream)
    _apply_tls(front, topology, node, tls_setup)
    old_log = front.reload(node.limits, access_log)
    await old_log.close()       # writes what it still holds


def _apply_tls(front: Front, topology: Topology, node: Node, tls_setup: tls.TlsSetup) -> None:
    """New handshakes take the new certificates (and ALPN), new plain connections the h2c
    setting; connections already open keep theirs."""
    front.tls_context = tls_setup.server
    front.h2c = node.h2c
    front.redirect_hosts = frozenset(host.encode() for site in topology.sites if site.https_redirect
                                     for host in site.hosts) if node.listen_tls is not None else frozenset()


async def _apply_nothing(topology: Topology) -> None:
    return None


async def _listen(stack: AsyncExitStack, app: web.Application, host: str, port: int) -> None:
    stack.push_async_callback(await listen(app, host, port))


async def listen(app: web.Application, host: str, port: int) -> Callable[[], Awaitable[None]]:
    """Serve `app` on host:port; returns its cleanup."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=1024).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner.cleanup


async def _listen_unix(stack: AsyncExitStack, app: web.Application, path: Path) -> None:
    # A worker's admin app, for its node's main process only: the socket lives in a
    # directory only this user can enter (tempfile.mkdtemp makes it 0700).
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.UnixSite(runner, str(path)).start()


def _origin_apps(node: Node, reloader: Reloader | None) -> tuple[web.Application, web.Application]:
    from origin.app import make_app as make_origin_app
    registry = CollectorRegistry()
    process_metrics(registry)
    traffic = make_origin_app(node.content_dir, node.content_cache_control, registry)

    def health() -> dict:
        return {"status": "ok", "node": node.name, "role": node.role, **_config_sha256(reloader)}

    return traffic, admin.make_admin_app(registry, health, allow=node.admin_allow)


def _config_sha256(reloader: Reloader | None) -> dict:
    """The running topology's hash for /healthz: how `edge up` sees that a reload took."""
    return {"config_sha256": reloader.version.sha256} if reloader is not None else {}


async def _cache_node(topology: Topology, node: Node, stack: AsyncExitStack,
                      tls_setup: tls.TlsSetup, listen_host: str | None = None,
                      worker: WorkerSlot | None = None) -> CacheNode:
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    memory = MemoryStore(node.memory_size, min(node.memory_object_max, node.memory_size))
    disk = (DiskStore(topology.cache_dir(node), node.disk_size) if worker is None
            else workers.shared_disk(topology, node, worker))
    store = TieredStore(memory, disk)
    await store.start()
    stack.push_async_callback(store.close)
    metrics.watch_store(store.tiers)

    upstreams = UpstreamPool(topology, node, metrics, tls_contexts=tls_setup.upstream, listen_host=listen_host)
    await upstreams.start()
    stack.push_async_callback(upstreams.close)
    cache_node = CacheNode(topology, node, store, upstreams, metrics,
                           ban_file=topology.cache_dir(node) / (worker.ban_file_name if worker else "bans.json"))
    stack.push_async_callback(cache_node.close)
    await cache_node.start()
    return cache_node


def _cache_admin_app(cache_node: CacheNode, front: Front, reloader: Reloader | None,
                     worker: WorkerSlot | None = None) -> web.Application:
    # The node's settings and topology are read through cache_node each time: a reload replaces them.
    node = cache_node.node
    started = time.time()

    def health() -> dict:
        max_inflight = cache_node.node.max_inflight
        return {
            "status": "draining" if front.draining else "ok", "node": node.name, "role": node.role,
            "inflight": cache_node.inflight, "max_inflight": max_inflight,
            "overloaded": cache_node.inflight > max_inflight, **_config_sha256(reloader),
        }

    async def status(request: web.Request) -> web.Response:
        store = cache_node.store
        upstreams = cache_node.upstreams
        weights = dict(cache_node.node.parent_weights)
        return web.json_response({
            **health(),
            "uptime_seconds": round(time.time() - started, 3),
            "config": reloader.status() if reloader is not None else None,
            "sites": {site.name: list(site.hosts) for site in cache_node.topology.sites},
            "tiers": [{"tier": t.name, "objects": t.objects, "bytes": t.bytes, "evictions": t.evictions}
                      for t in store.tiers()],
            "parents": {name: {**state, "weight": weights.get(name, 1.0)}
                        for name, state in upstreams.health.state().items()},
            "fetches_in_flight": len(cache_node.flights),
            "connections": len(front.connections),
            "bans": cache_node.bans.summary(),
        })

    token = admin.load_token()      # OSError naming a bad token file: the command line prints it
    routes = [web.get("/status", status), *cache_admin.routes(cache_node, token)]
    # A worker's app is reached only through its node's main process, which applies the allow list.
    allow = node.admin_allow if worker is None else None
    return admin.make_admin_app(cache_node.metrics.registry, health, routes, allow=allow)
