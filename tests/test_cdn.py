"""The two-tier CDN as real processes on 127.0.33.x: origin, L2 l2-a/l2-b, L1 l1-1/l1-2.

Cache-Status has one entry per tier (RFC 9211), so the first entry names the
L2 that handled a request; the origin's X-Origin-Hits says whether the origin
was asked.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
import json
import uuid

import aiohttp
import pytest

from edge.cachekey import cache_key
from edge.config import load
from edge.upstream.ring import HashRing
from tests.cluster import Cluster

HOST = {"Host": "www.example.com"}


@pytest.fixture(scope="module")
def cdn(tmp_path_factory):
    c = Cluster.create(tmp_path_factory.mktemp("cdn"), "33", l2=2, l1=2)
    try:
        c.start("origin", "l2-a", "l2-b", "l1-1", "l1-2")
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def owner_of(cdn: Cluster, path: str) -> str:
    topology = load(cdn.config)
    ring = HashRing({"l2-a": 1.0, "l2-b": 1.0})
    return ring.owner(cache_key(topology.sites[0], path, "www.example.com"))


def tiers(headers) -> list[str]:
    return [entry.split(";")[0].strip() for entry in headers["Cache-Status"].split(",")]


async def get(http, url):
    async with http.get(url, headers=HOST) as r:
        await r.read()
        return r.status, r.headers


async def test_l1_to_owner_l2_to_origin_then_l2_hit_from_other_l1(cdn, http):
    path = f"/gen/tiered-{uuid.uuid4().hex}?cc=max-age=60&size=4096"
    owner = owner_of(cdn, path)
    status, h = await get(http, cdn.url("l1-1", path))
    assert status == 200 and h["X-Origin-Hits"] == "1"
    assert tiers(h) == [owner, "l1-1"]
    assert h["Via"] == f"1.1 {owner}, 1.1 l1-1"
    # What the origin received: every hop in Via, and the L1 (from its own IP) in X-Forwarded-For.
    assert h["X-Origin-Via"] == f"1.1 l1-1, 1.1 {owner}"
    assert h["X-Origin-XFF"] == "127.0.0.1, 127.0.33.31"
    assert "fwd=uri-miss" in h["Cache-Status"].split(",")[0]
    status, h = await get(http, cdn.url("l1-2", path))
    assert status == 200 and h["X-Origin-Hits"] == "1"     # the owner L2 had it
    first, second = h["Cache-Status"].split(",")
    assert first.strip().startswith(f"{owner}; hit") and "l1-2; fwd=uri-miss" in second
    status, h = await get(http, cdn.url("l1-2", path))
    assert h["X-Cache"] == "HIT"


async def test_each_key_goes_to_its_ring_owner(cdn, http):
    seen = {}
    for i in range(16):
        path = f"/gen/spread-{i}-{uuid.uuid4().hex[:6]}?cc=max-age=60"
        _, h = await get(http, cdn.url("l1-1", path))
        seen[path] = tiers(h)[0]
        assert seen[path] == owner_of(cdn, path)
    assert set(seen.values()) == {"l2-a", "l2-b"}


def parent_up(cdn: Cluster, l1: str, parent: str) -> bool:
    with urllib.request.urlopen(f"http://{cdn.node(l1).admin}/status", timeout=2) as r:
        return json.load(r)["parents"][parent]["up"]


async def test_owner_l2_dies_and_returns(cdn, http):
    paths = [f"/gen/failover-{i}-{uuid.uuid4().hex[:6]}?cc=max-age=60" for i in range(20)]
    owners = {p: owner_of(cdn, p) for p in paths}
    assert set(owners.values()) == {"l2-a", "l2-b"}
    for p in paths:                       # warm both L2s through l1-1
        status, _ = await get(http, cdn.url("l1-1", p))
        assert status == 200

    errors: list[int] = []
    stop = asyncio.Event()

    async def steady_load():
        n = 0
        while not stop.is_set() and n < 2000:
            n += 1
            status, _ = await get(http, cdn.url("l1-1", f"/gen/load-{uuid.uuid4().hex}?cc=no-store"))
            if status != 200:
                errors.append(status)

    load_task = asyncio.create_task(steady_load())
    await asyncio.sleep(0.2)
    cdn.node("l2-a").proc.kill()          # a crash, not a clean stop
    cdn.node("l2-a").proc.wait()
    cdn.node("l2-a").proc = None
    deadline = time.monotonic() + 10
    while parent_up(cdn, "l1-2", "l2-a") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not parent_up(cdn, "l1-2", "l2-a")

    # Through the cold l1-2: l2-b's keys are still hits at l2-b; only l2-a's keys moved.
    for p in paths:
        status, h = await get(http, cdn.url("l1-2", p))
        assert status == 200
        assert tiers(h)[0] == "l2-b"
        if owners[p] == "l2-b":
            assert h["X-Origin-Hits"] == "1" and h["Cache-Status"].startswith("l2-b; hit")
        else:
            assert h["X-Origin-Hits"] == "2"
    stop.set()
    await load_task
    assert errors == []

    # Bring it back: after the rise threshold its keys go to it again.
    cdn.node("l2-a").start()
    deadline = time.monotonic() + 10
    while not parent_up(cdn, "l1-1", "l2-a") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert parent_up(cdn, "l1-1", "l2-a")
    fresh = [f"/gen/back-{i}-{uuid.uuid4().hex[:6]}?cc=max-age=60" for i in range(12)]
    for p in fresh:
        _, h = await get(http, cdn.url("l1-1", p))
        assert tiers(h)[0] == owner_of(cdn, p)


async def test_parent_5xx_of_its_own_fails_over_but_origin_5xx_passes_through(cdn, http):
    path = f"/gen/err-{uuid.uuid4().hex}?status=503"
    status, h = await get(http, cdn.url("l1-1", path))
    # The origin's own 503 is an answer: passed through, parents stay up.
    assert status == 503 and h["X-Origin-Hits"] == "1"
    assert parent_up(cdn, "l1-1", "l2-a") and parent_up(cdn, "l1-1", "l2-b")


@pytest.mark.parametrize("go_direct", [True, False])
async def test_all_parents_down_goes_direct_only_when_allowed(tmp_path, http, go_direct):
    c = Cluster.create(tmp_path, "35", l2=1, l1=1, extra_node="" if go_direct else "go_direct = false")
    try:
        c.start("origin", "l2-a", "l1-1")
        c.node("l2-a").stop()
        path = f"/gen/direct-{uuid.uuid4().hex}?cc=max-age=60"
        status, h = await get(http, c.url("l1-1", path))
        if go_direct:
            assert status == 200 and tiers(h) == ["l1-1"] and h["X-Origin-Hits"] == "1"
        else:
            assert status == 502 and "l1-1; error=connection_refused" in h["Proxy-Status"]
    finally:
        c.stop_all()


async def test_a_304_to_another_tier_carries_every_stored_field(cdn, http):
    """RFC 9111 4.3.4 / RFC 9110 15.4.5: between tiers a 304 guides the cache update with all fields."""
    path = f"/gen/t304-{uuid.uuid4().hex[:10]}?cc=max-age=60&etag=1"
    l2 = cdn.url(owner_of(cdn, path), path)
    async with http.get(l2, headers=HOST) as r:
        etag, content_type = r.headers["ETag"], r.headers["Content-Type"]
    conditional = {**HOST, "If-None-Match": etag}
    async with http.get(l2, headers={**conditional, "Via": "1.1 l1-1"}) as r:
        assert (r.status, r.headers["Content-Type"]) == (304, content_type)
    async with http.get(l2, headers=conditional) as r:          # a client: the RFC's minimal 304
        assert r.status == 304 and "Content-Type" not in r.headers
