"""A cache node in this process with a clock the test advances: objects expire without sleeping.

The origin is the real test origin on a loopback socket; the node is the
real pipeline behind the real HTTP front, also on a socket.  Only time is
the test's: `CacheNode` takes its clock from outside.
"""

from __future__ import annotations

import time
import uuid

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from edge import config
from edge.http.accesslog import AccessLog
from edge.http.server import Front
from edge.metrics import NodeMetrics
from edge.proxy import CacheNode
from edge.store import DiskStore, MemoryStore, TieredStore
from edge.upstream.client import UpstreamPool, make_session
from origin.app import make_app as make_origin_app


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
[nodes.edge]
role = "l1"
listen = "127.0.0.1:0"
admin = "127.0.0.1:0"
""", "test.toml", tmp_path)
    node = topology.node("edge")
    clock = Clock(time.time())
    store = TieredStore(MemoryStore(2**20, 2**20), DiskStore(tmp_path / "cache", 2**24))
    await store.start()
    session = make_session(5.0)
    metrics = NodeMetrics(CollectorRegistry())
    upstreams = UpstreamPool(topology, node, session, metrics)
    cache_node = CacheNode(topology, node, store, upstreams, metrics, clock=clock)
    front = Front(cache_node, node.limits, AccessLog("off"))
    await front.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{front.port}", clock
    finally:
        await front.drain()
        await cache_node.close()
        await session.close()
        await store.close()


async def get(url: str) -> tuple[int, aiohttp.typedefs.LooseHeaders]:
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers={"Host": "www.example.com"}) as response:
            await response.read()
            return response.status, response.headers


@pytest.mark.parametrize("size", [100, 3_000_000])    # the memory hit path; a body streamed to disk
async def test_object_expires_when_the_clock_passes_its_max_age(edge_with_clock, size):
    base, clock = edge_with_clock
    url = f"{base}/gen/clock-{uuid.uuid4().hex[:8]}?size={size}&cc=max-age=60"
    status, h1 = await get(url)
    assert (status, h1["X-Cache"], h1["X-Origin-Hits"]) == (200, "MISS", "1")
    clock.now += 58         # the origin's Date adds under a second of apparent age
    status, h2 = await get(url)
    assert (status, h2["X-Cache"], h2["X-Origin-Hits"], h2["Age"]) == (200, "HIT", "1", "58")
    assert "ttl=1" in h2["Cache-Status"]
    clock.now += 2
    status, h3 = await get(url)
    assert (status, h3["X-Cache"], h3["X-Origin-Hits"]) == (200, "EXPIRED", "2")
