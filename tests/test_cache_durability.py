"""The disk tier across restarts, broken cache files, huge objects and a dead origin.

Real processes on 127.0.32.x; each test starts its own nodes because it
restarts or stops them.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.cluster import Cluster

HOST = {"Host": "www.example.com"}
MiB = 2**20


@pytest.fixture
def cluster(tmp_path):
    c = Cluster.create(tmp_path, "32", l1=1)
    try:
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


async def fetch(http, url, headers=None):
    digest, size = hashlib.sha256(), 0
    async with http.get(url, headers={**HOST, **(headers or {})}) as r:
        async for chunk in r.content.iter_chunked(MiB):
            digest.update(chunk)
            size += len(chunk)
        return r.status, r.headers, size, digest.hexdigest()


def body_files(cluster: Cluster, node: str) -> list[Path]:
    return sorted((cluster.config.parent / "state" / "cache" / node).rglob("*.body"))


async def test_restart_keeps_disk_cache_without_origin_contact(cluster, http):
    cluster.start("origin", "l1-1")
    path = f"/gen/persist-{uuid.uuid4().hex}?size=20000&cc=max-age=600"
    vary_path = f"/gen/persist-vary-{uuid.uuid4().hex}?cc=max-age=600&vary=Accept-Language"
    status, h, size, digest = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], size) == (200, "MISS", 20000)
    _, _, _, fr_digest = await fetch(http, cluster.url("l1-1", vary_path), {"Accept-Language": "fr"})
    cluster.node("l1-1").stop()
    cluster.node("origin").stop()              # no origin: a hit must come from disk
    cluster.start("l1-1")
    status, h, size, digest2 = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], size, digest2) == (200, "HIT", 20000, digest)
    status, h, _, fr_digest2 = await fetch(http, cluster.url("l1-1", vary_path), {"Accept-Language": "fr"})
    assert (status, h["X-Cache"], fr_digest2) == (200, "HIT", fr_digest)


async def test_corrupt_cache_file_is_a_miss_and_removed(cluster, http):
    cluster.start("origin", "l1-1")
    path = f"/gen/corrupt-{uuid.uuid4().hex}?size=30000&cc=max-age=600"
    status, h, _, digest = await fetch(http, cluster.url("l1-1", path))
    assert h["X-Origin-Hits"] == "1"
    cluster.node("l1-1").stop()
    (body,) = body_files(cluster, "l1-1")
    body.write_bytes(body.read_bytes()[:1000])     # truncated, as after a crash mid-write
    cluster.start("l1-1")
    status, h, size, digest2 = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], h["X-Origin-Hits"], size, digest2) == (200, "MISS", "2", 30000, digest)
    status, h, _, _ = await fetch(http, cluster.url("l1-1", path))
    assert h["X-Cache"] == "HIT"


async def test_garbage_meta_file_is_a_miss(cluster, http):
    cluster.start("origin", "l1-1")
    path = f"/gen/garbage-{uuid.uuid4().hex}?size=100&cc=max-age=600"
    await fetch(http, cluster.url("l1-1", path))
    cluster.node("l1-1").stop()
    (body,) = body_files(cluster, "l1-1")
    body.with_suffix(".meta").write_bytes(b"\x00not json at all")
    cluster.start("l1-1")
    status, h, size, _ = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], h["X-Origin-Hits"], size) == (200, "MISS", "2", 100)


async def wait_for_body_file(cluster: Cluster, node: str) -> Path:
    """The one body file of `node`'s disk cache, once the write-behind has committed it (meta in place)."""
    for _ in range(200):
        files = body_files(cluster, node)
        if files and files[0].with_suffix(".meta").exists():
            return files[0]
        await asyncio.sleep(0.02)
    raise AssertionError("no body file appeared")


def flip(path: Path, offset: int) -> None:
    """Change four bytes of a file in place: same size, same names, wrong content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(4)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


async def test_flipped_bytes_in_a_disk_body_are_never_served(cluster, http):
    """Issue 10 item 1: a body that has its size but not its content is a miss (first block) ..."""
    cluster.start("origin", "l1-1")
    path = f"/gen/flipped-{uuid.uuid4().hex}?size={2 * MiB}&cc=max-age=600"   # disk only (> memory_object_max)
    status, h, size, digest = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], size) == (200, "MISS", 2 * MiB)
    body = await wait_for_body_file(cluster, "l1-1")
    assert (await fetch(http, cluster.url("l1-1", path)))[1]["X-Cache"] == "HIT"
    flip(body, 1000)                                     # inside the first checksummed block
    status, h, size, digest2 = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], h["X-Origin-Hits"], size, digest2) == (200, "MISS", "2", 2 * MiB, digest)
    assert 'edge_cache_corrupt_entries_total{tier="disk"} 1.0' in cluster.node("l1-1").metrics()

    # ... and a client already receiving a response when a later block fails (past
    # the first 4 MiB read, which is checked before the head is sent) gets a cut
    # connection, never a complete-looking response with wrong bytes.
    cluster.node("l1-1").stop()
    for stale in body_files(cluster, "l1-1"):
        stale.unlink()
        stale.with_suffix(".meta").unlink()
    cluster.start("l1-1")
    path = f"/gen/flipped-late-{uuid.uuid4().hex}?size={6 * MiB}&cc=max-age=600"
    status, h, size, digest = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], size) == (200, "MISS", 6 * MiB)
    flip(await wait_for_body_file(cluster, "l1-1"), 5 * MiB + 1000)
    received, complete = 0, False
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(cluster.url("l1-1", path), headers=HOST) as r:
            assert r.headers["X-Cache"] == "HIT"
            async for chunk in r.content.iter_chunked(MiB):
                received += len(chunk)
            complete = True
    assert not complete and received < 6 * MiB
    status, h, size, digest2 = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], size, digest2) == (200, "MISS", 6 * MiB, digest)
    assert 'edge_cache_corrupt_entries_total{tier="disk"} 1.0' in cluster.node("l1-1").metrics()


async def test_200_mib_object_streams_with_small_memory(cluster, http):
    cluster.start("origin", "l1-1")
    node = cluster.node("l1-1")
    before = node.peak_rss()
    path = f"/gen/huge-{uuid.uuid4().hex}?size={200 * MiB}&cc=max-age=600"
    status, h, size, digest = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], size) == (200, "MISS", 200 * MiB)
    status, h, size, digest2 = await fetch(http, cluster.url("l1-1", path))
    assert (status, h["X-Cache"], size, digest2) == (200, "HIT", 200 * MiB, digest)
    growth = node.peak_rss() - before
    # Far below the object size: the body only ever passes through in chunks.
    assert growth < 48 * MiB, f"peak RSS grew by {growth / MiB:.1f} MiB for a 200 MiB object"


async def test_stale_if_error_serves_stale_when_origin_is_down(cluster, http):
    cluster.start("origin", "l1-1")
    ok_path = f"/gen/sie-{uuid.uuid4().hex}?cc=max-age=0,stale-if-error=600&etag=1"
    plain_path = f"/gen/plain-{uuid.uuid4().hex}?cc=max-age=0&etag=1"
    no_path = f"/gen/nosie-{uuid.uuid4().hex}?cc=max-age=0,must-revalidate&etag=1"
    _, _, _, digest = await fetch(http, cluster.url("l1-1", ok_path))
    _, _, _, plain_digest = await fetch(http, cluster.url("l1-1", plain_path))
    await fetch(http, cluster.url("l1-1", no_path))
    cluster.node("origin").stop()
    status, h, _, digest2 = await fetch(http, cluster.url("l1-1", ok_path))
    assert (status, h["X-Cache"], digest2) == (200, "STALE", digest)
    assert "stale-if-error" in h["Cache-Status"]
    # No stale-if-error, but the origin cannot be reached: a disconnected cache (RFC 9111 4.2.4).
    status, h, _, digest3 = await fetch(http, cluster.url("l1-1", plain_path))
    assert (status, h["X-Cache"], digest3) == (200, "STALE", plain_digest)
    assert "detail=disconnected" in h["Cache-Status"]
    status, h, _, _ = await fetch(http, cluster.url("l1-1", no_path))
    assert status == 502 and "error=connection_refused" in h["Proxy-Status"]


async def test_followers_share_a_failed_fetch_instead_of_retrying(cluster, http):
    # The origin's address accepts connections and never answers: the fetch times out.
    with socket.socket() as blackhole:
        blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blackhole.bind(("127.0.32.10", 8080))
        blackhole.listen(64)
        cluster.start("l1-1")
        url = cluster.url("l1-1", f"/gen/blackhole-{uuid.uuid4().hex}?cc=max-age=60")

        async def status_of():
            async with http.get(url, headers=HOST) as r:
                await r.read()
                return r.status, r.headers.get("Proxy-Status", "")

        results = await asyncio.gather(*(status_of() for _ in range(20)))
    assert {status for status, _ in results} == {504}
    # Connected, then no response head in time: RFC 9209's http_response_timeout.
    assert all("error=http_response_timeout" in proxy_status for _, proxy_status in results)
    metrics = cluster.node("l1-1").metrics()
    assert 'edge_upstream_requests_total{outcome="http_response_timeout",upstream="origin"} 1.0' in metrics
    assert "edge_coalesced_waits_total 19.0" in metrics
