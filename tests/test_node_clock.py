"""A cache node in this process with a clock the test advances: objects expire without sleeping.

The origin is the real test origin on a loopback socket; the node is the
real pipeline behind the real HTTP front, also on a socket.  Only time is
the test's: `CacheNode` takes its clock from outside.
"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge import config
from edge.http.accesslog import AccessLog
from edge.http.server import Front
from edge.metrics import NodeMetrics
from edge.proxy import CacheNode
from edge.store import DiskStore, MemoryStore, TieredStore
from edge.upstream.client import UpstreamPool
from origin.app import make_app as make_origin_app


@dataclass
class Edge:
    base: str
    clock: Clock
    origin: Any                 # the aiohttp test server: close() makes it unreachable
    metrics: NodeMetrics


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def edge_with_clock(tmp_path, aiohttp_server):
    origin = await aiohttp_server(make_origin_app(None, "public, max-age=60", CollectorRegistry()),
                                  host="127.0.0.1")
    topology = config.parse(f"""
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.0.1:{origin.port}"
stale_if_unreachable = 300
[nodes.edge]
role = "l1"
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
""", "test.toml", tmp_path)
    node = topology.node("edge")
    clock = Clock(time.time())
    store = TieredStore(MemoryStore(2**20, 2**20), DiskStore(tmp_path / "cache", 2**24))
    await store.start()
    metrics = NodeMetrics(CollectorRegistry())
    upstreams = UpstreamPool(topology, node, metrics)
    cache_node = CacheNode(topology, node, store, upstreams, metrics, clock=clock)
    front = Front(cache_node, node.limits, AccessLog("off"))
    await front.start("127.0.0.1", 0)
    try:
        yield Edge(f"http://127.0.0.1:{front.port}", clock, origin, metrics)
    finally:
        await front.drain()
        await cache_node.close()
        await upstreams.close()
        await store.close()


async def get(url: str) -> tuple[int, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Host": "www.example.com"}) as response:
            await response.read()
            return response.status, response.headers


@pytest.mark.parametrize("size", [100, 3_000_000])    # the memory hit path; a body streamed to disk
async def test_object_expires_when_the_clock_passes_its_max_age(edge_with_clock, size):
    base, clock = edge_with_clock.base, edge_with_clock.clock
    url = f"{base}/gen/clock-{uuid.uuid4().hex[:8]}?size={size}&cc=max-age=60"
    status, h1 = await get(url)
    assert (status, h1["X-Cache"], h1["X-Origin-Hits"]) == (200, "MISS", "1")
    clock.now += 58         # the origin's Date adds under a second of apparent age
    status, h2 = await get(url)
    assert (status, h2["X-Cache"], h2["X-Origin-Hits"], h2["Age"]) == (200, "HIT", "1", "58")
    # ttl: 60 - 58 s, less the origin's Date rounding (under a second): 1 or 2, never more.
    assert re.search(r"; ttl=[12](,|$)", h2["Cache-Status"]), h2["Cache-Status"]
    clock.now += 2
    status, h3 = await get(url)
    assert (status, h3["X-Cache"], h3["X-Origin-Hits"]) == (200, "EXPIRED", "2")


async def test_a_disconnected_node_serves_stale_within_the_sites_bound(edge_with_clock):
    """RFC 9111 4.2.4: with the origin unreachable, a stale copy is served up to stale_if_unreachable."""
    base, clock = edge_with_clock.base, edge_with_clock.clock
    fresh_for_a_minute = f"{base}/gen/down-{uuid.uuid4().hex[:8]}?cc=max-age=60&etag=1"
    must_revalidate = f"{base}/gen/down-{uuid.uuid4().hex[:8]}?cc=max-age=60,must-revalidate&etag=1"
    for url in (fresh_for_a_minute, must_revalidate):
        assert (await get(url))[1]["X-Cache"] == "MISS"
    await edge_with_clock.origin.close()             # refused from now on
    clock.now += 200                                 # stale by about 140 s
    status, h = await get(fresh_for_a_minute)
    assert (status, h["X-Cache"]) == (200, "STALE")
    assert "detail=disconnected" in h["Cache-Status"] and "ttl=-14" in h["Cache-Status"]
    status, h = await get(must_revalidate)            # RFC 9111 4.2.4: never stale
    assert status == 502 and "connection_refused" in h["Proxy-Status"]
    clock.now += 300                                 # now stale by about 440 s: past the site's 300
    status, _ = await get(fresh_for_a_minute)
    assert status == 502
    text = generate_latest(edge_with_clock.metrics.registry).decode()
    assert "edge_disconnected_stale_total 1.0" in text
