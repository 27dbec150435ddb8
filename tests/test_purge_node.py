"""Purges on one cache node in this process, with a clock the test advances: 127.0.93.1-3.

The origin is the real test origin and the node the real pipeline behind the
real HTTP front, on loopback sockets; only time is the test's.  The node is
an L2 of a topology that also names an L1 (never started), so a request
carrying that L1 in Via is one from our own tier.  X-Origin-Hits, stored with
each response, tells which origin fetch a client was served.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from edge import config
from edge.cachekey import cache_key, key_prefix
from edge.http.accesslog import AccessLog
from edge.http.server import Front
from edge.metrics import NodeMetrics
from edge.proxy import CacheNode
from edge.store import DiskStore, MemoryStore, TieredStore
from edge.upstream.client import UpstreamPool
from origin.app import make_app as make_origin_app

ORIGIN_IP, NODE_IP = "127.0.93.1", "127.0.93.2"
HOST = "www.example.com"


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Node:
    base: str
    clock: Clock
    origin: Any
    cache: CacheNode
    store: TieredStore
    site: config.Site
    ban_file: Path

    def key(self, target: str) -> str:
        return cache_key(self.site, target, HOST)

    async def purge(self, kind: str, value: str, soft: bool = False) -> dict:
        self.clock.now += 1             # a purge comes after what was fetched before it
        result = await self.cache.invalidator.purge(kind, value, soft)
        self.clock.now += 1
        return result

    async def settle(self) -> None:
        """Wait until every ban has been applied and retired (the lurker is done)."""
        async with asyncio.timeout(10):
            while len(self.cache.bans):
                await asyncio.sleep(0.02)
        await self.store.settled()


@pytest.fixture
async def node(tmp_path, aiohttp_server):
    origin = await aiohttp_server(make_origin_app(None, "public, max-age=60", CollectorRegistry()), host=ORIGIN_IP)
    topology = config.parse(f"""
[sites.example]
hosts = ["{HOST}"]
origin = "http://{ORIGIN_IP}:{origin.port}"
[nodes.l2]
role = "l2"
listen = "{NODE_IP}:0"
admin = "{NODE_IP}:0"
[nodes.l1-x]
role = "l1"
listen = "127.0.93.3:8080"
admin = "127.0.93.3:8091"
""", "test.toml", tmp_path)
    spec = topology.node("l2")
    clock = Clock(time.time())
    store = TieredStore(MemoryStore(2**20, 2**20), DiskStore(tmp_path / "cache", 2**26))
    await store.start()
    metrics = NodeMetrics(CollectorRegistry())
    upstreams = UpstreamPool(topology, spec, metrics)
    ban_file = tmp_path / "cache" / "bans.json"
    cache = CacheNode(topology, spec, store, upstreams, metrics, clock=clock, ban_file=ban_file)
    await cache.start()
    front = Front(cache, spec.limits, AccessLog("off"))
    await front.start(NODE_IP, 0)
    try:
        yield Node(f"http://{NODE_IP}:{front.port}", clock, origin, cache, store, topology.sites[0], ban_file)
    finally:
        await front.drain()
        await cache.close()
        await upstreams.close()
        await store.close()


async def get(node: Node, target: str, **headers: str) -> tuple[int, Any, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.get(node.base + target, headers={"Host": HOST, **headers}) as response:
            return response.status, response.headers, await response.read()


def fast_gets(node: Node) -> int:
    """GETs answered on the hit path so far (counted per site until a scrape folds them in)."""
    return sum(counts[0] for counts in node.cache.metrics.requests.fast_hits.values())


def unique(name: str) -> str:
    return f"/gen/{name}-{uuid.uuid4().hex[:10]}"


async def test_hard_purge_by_tag_on_the_hit_path_and_the_lurker(node):
    tagged = unique("tagged") + "?cc=max-age=600&tags=product-1,cat-2"
    other = unique("other") + "?cc=max-age=600&cachetag=cat-3"
    for target in (tagged, other):
        assert (await get(node, target))[1]["X-Cache"] == "MISS"
    fast = fast_gets(node)
    _, h, _ = await get(node, tagged)
    assert h["X-Cache"] == "HIT" and fast_gets(node) == fast + 1   # the hit path
    await node.purge("tag", "cat-2")
    _, h, _ = await get(node, tagged)
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("MISS", "2")
    _, h, _ = await get(node, other)
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("HIT", "1")              # another tag: untouched
    await node.settle()
    _, h, _ = await get(node, tagged)
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("HIT", "2")              # the new copy is not purged


async def test_the_lurker_deletes_what_nobody_asked_for_and_the_ban_goes(node):
    targets = [unique("lurk") + f"?cc=max-age=600&tags=batch-{i % 2}" for i in range(6)]
    for target in targets:
        await get(node, target)
    await node.store.settled()
    keys = [node.key(t) for t in targets]
    assert all(node.store.memory.peek(k) and k in node.store.disk.keys() for k in keys)
    result = await node.purge("tag", "batch-0")
    assert result["bans"] == {"live": 1, "pending": 1}
    await node.settle()                                   # applied, then retired: the list is empty again
    for i, key in enumerate(keys):
        held = node.store.memory.peek(key) is not None, key in node.store.disk.keys()
        assert held == ((False, False) if i % 2 == 0 else (True, True)), (i, held)
    assert json.loads(node.ban_file.read_text()) == []


async def test_prefix_purge_covers_the_path_below_only(node):
    base = unique("dir")
    inside = [f"{base}/a?cc=max-age=600", f"{base}/sub/b?cc=max-age=600&vary=Accept-Language"]
    outside = f"{base}-sibling/c?cc=max-age=600"
    for target in (*inside, outside):
        await get(node, target)
    await node.purge("prefix", key_prefix(node.site, HOST) + base + "/")
    for target in inside:
        assert (await get(node, target))[1]["X-Cache"] == "MISS", target
    assert (await get(node, outside))[1]["X-Cache"] == "HIT"


async def test_soft_purge_serves_stale_while_revalidating_then_the_new_answer(node):
    target = unique("soft") + "?cc=max-age=600,stale-while-revalidate=30&etag=1&tags=t"
    assert (await get(node, target))[1]["X-Cache"] == "MISS"
    await node.purge("tag", "t", soft=True)
    status, h, _ = await get(node, target)
    # Stale since the purge: served at once, refreshed behind (a conditional request, answered 304).
    assert (status, h["X-Cache"], h["X-Origin-Hits"]) == (200, "UPDATING", "1")
    assert int(h["Age"]) >= 600                            # stale to the next cache too
    assert "detail=stale-while-revalidate" in h["Cache-Status"]
    async with asyncio.timeout(5):
        while (h := (await get(node, target))[1])["X-Cache"] != "HIT":
            await asyncio.sleep(0.02)
    assert (h["X-Origin-Hits"], h["X-Origin-Conditional"]) == ("2", "1")   # revalidated, not refetched


async def test_soft_purge_without_a_stale_window_revalidates_at_once(node):
    target = unique("soft-reval") + "?cc=max-age=600&etag=1"
    await get(node, target)
    await node.purge("url", node.key(target), soft=True)
    _, h, _ = await get(node, target)
    assert (h["X-Cache"], h["X-Origin-Hits"], h["X-Origin-Conditional"]) == ("REVALIDATED", "2", "1")
    assert (await get(node, target))[1]["X-Cache"] == "HIT"


async def test_soft_purge_keeps_stale_if_error_within_its_window_from_the_purge(node):
    target = unique("soft-sie") + "?cc=max-age=600,stale-if-error=60&tags=t2"
    await get(node, target)
    await node.purge("tag", "t2", soft=True)
    await node.settle()                                   # the ban is gone: the stored mark carries it
    assert node.store.memory.peek(node.key(target)).meta.stale_at is not None
    await node.origin.close()                             # the origin is unreachable from now on
    node.clock.now += 30
    status, h, _ = await get(node, target)
    assert (status, h["X-Cache"]) == (200, "STALE") and "detail=stale-if-error" in h["Cache-Status"]
    node.clock.now += 40                                  # 71 s stale since the purge: past stale-if-error,
    status, h, _ = await get(node, target)               # but disconnected operation allows a day
    assert (status, h["X-Cache"]) == (200, "STALE") and "detail=disconnected" in h["Cache-Status"]


async def test_a_fill_under_way_when_the_purge_comes_is_not_kept(node):
    target = unique("inflight") + "?cc=max-age=600&delay=400&size=2000000"      # streamed to the store
    small = unique("inflight-small") + "?cc=max-age=600&delay=400"
    fetches = [asyncio.create_task(get(node, t)) for t in (target, small)]
    await asyncio.sleep(0.2)                              # both requests have left for the origin
    await node.purge("prefix", key_prefix(node.site, HOST) + "/gen/inflight")
    assert len(node.cache.bans) == 1                      # the fills are older than the ban: it stays
    for task in fetches:
        assert (await task)[1]["X-Cache"] == "MISS"      # the clients get what they asked for...
    await node.settle()                                   # (the ban goes once both fills have ended)
    for t in (target, small):
        _, h, _ = await get(node, t)
        assert (h["X-Cache"], h["X-Origin-Hits"]) == ("MISS", "2"), t    # ...but it was not stored


async def test_tags_go_to_our_tiers_and_never_to_clients(node):
    target = unique("tier") + "?cc=max-age=600&tags=a,b&cachetag=c"
    for via in (None, "1.1 l1-x", None, "1.1 l1-x"):      # miss, then hits on the hit path
        _, h, _ = await get(node, target, **({"Via": via} if via else {}))
        if via:
            assert (h["Surrogate-Key"], h["Cache-Tag"]) == ("a b", "c")
        else:
            assert "Surrogate-Key" not in h and "Cache-Tag" not in h
    _, h, _ = await get(node, target, **{"Via": "1.1 somebody-else"})
    assert "Surrogate-Key" not in h


async def test_bans_left_in_the_file_are_applied_again_after_a_restart(node, tmp_path):
    target = unique("restart") + "?cc=max-age=600&tags=r"
    await get(node, target)
    await node.store.settled()
    key = node.key(target)
    # A node that stopped after taking the purge but before applying it left this file.
    node.ban_file.write_text(json.dumps([{"kind": "tag", "value": "r", "soft": False,
                                          "time": node.clock.now + 1, "lurked": True}]))
    await node.cache.invalidator.close()
    node.cache.bans.load([])
    await node.cache.invalidator.start()
    assert node.cache.bans.summary() == {"live": 1, "pending": 1}   # pending again, whatever the file said
    await node.settle()
    assert node.store.memory.peek(key) is None and key not in node.store.disk.keys()


async def test_a_streamed_fill_held_up_by_its_client_keeps_the_ban_until_it_ends(node):
    target = unique("slow-reader") + "?cc=max-age=600&size=20000000"
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (NODE_IP, int(node.base.rsplit(":", 1)[1])))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")     # the fill is streaming
        await node.purge("prefix", key_prefix(node.site, HOST) + "/gen/slow-reader")
        await asyncio.sleep(1.2)                  # the lurker had two chances to retire the ban...
        assert len(node.cache.bans) == 1          # ...but a fetch from before it may still store
        received = 0
        while chunk := await reader.read(1 << 20):
            received += len(chunk)
        assert received == 20_000_000
    finally:
        writer.close()
    await node.settle()
    _, h, _ = await get(node, target)
    assert (h["X-Cache"], h["X-Origin-Hits"]) == ("MISS", "2")
