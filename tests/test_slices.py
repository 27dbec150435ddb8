"""Slice caching (issue #15) as real processes on 127.0.107.x: origin, L2 l2-a, L1 l1-1, slice_size 64KiB.

Both tiers slice: the L1 asks the L2 for slice ranges and the L2 answers them
from its own slices.  The origin's byte counter (its /metrics) and its
X-Origin-Hits per URL prove what went upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import urllib.request
import uuid

import aiohttp
import pytest

from tests.cluster import Cluster

HOST = {"Host": "www.example.com"}
SLICE = 64 * 1024
ORIGIN = "127.0.107.10:8080"


@pytest.fixture(scope="module")
def cdn(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slices")
    c = Cluster.create(tmp, "107", l2=1, l1=1, extra_site='slice_size = "64KiB"')
    content = tmp / "content"
    content.mkdir()
    text = c.config.read_text().replace('role = "origin"', f'role = "origin"\ncontent_dir = "{content}"', 1)
    c.config.write_text(text)
    c.content = content
    try:
        c.start("origin", "l2-a", "l1-1")
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def origin_bytes(cdn: Cluster) -> int:
    text = cdn.node("origin").metrics()
    return int(float(re.search(r"^origin_response_bytes_total ([0-9.e+]+)$", text, re.M).group(1)))


def origin_hits(path: str) -> int:
    """How often the origin served `path` before (this request is one more, and subtracted)."""
    request = urllib.request.Request(f"http://{ORIGIN}{path}", method="HEAD", headers=HOST)
    with urllib.request.urlopen(request, timeout=5) as r:
        return int(r.headers["X-Origin-Hits"]) - 1


def from_origin(path: str, range_value: str | None = None) -> bytes:
    headers = dict(HOST, **({"Range": range_value} if range_value else {}))
    with urllib.request.urlopen(urllib.request.Request(f"http://{ORIGIN}{path}", headers=headers), timeout=10) as r:
        return r.read()


async def get(http, cdn, path, range_value=None, node="l1-1"):
    headers = dict(HOST, **({"Range": range_value} if range_value else {}))
    async with http.get(cdn.url(node, path), headers=headers) as r:
        return r.status, r.headers, await r.read()


def replace_file(target, data: bytes) -> None:
    """A new version, atomically (as a deploy does): the origin reads one version per request
    with its validators.  Rewritten in place, a file can be served as new bytes under the old
    ETag (the origin stats, then reads), which no cache can detect."""
    time.sleep(0.01)                                         # a new mtime: a new ETag
    tmp = target.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def l1_entry(headers) -> str:
    """The L1's Cache-Status member (the last; its detail may hold commas)."""
    value = headers["Cache-Status"]
    return value[value.index("l1-1;"):]


async def test_tail_range_of_a_cold_object_fetches_one_slice(cdn, http):
    size = 40 * SLICE
    path = f"/gen/tail-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300"
    before = origin_bytes(cdn)
    status, h, body = await get(http, cdn, path, f"bytes={size - 725}-")
    assert status == 206 and h["Content-Range"] == f"bytes {size - 725}-{size - 1}/{size}"
    assert body == from_origin(path, f"bytes={size - 725}-")
    assert origin_bytes(cdn) - before - 725 == SLICE       # one slice from the origin (and our check)
    assert re.fullmatch(r'l1-1; fwd=uri-miss; fwd-status=206; ttl=(299|300); stored; detail="slices 39; fetched 39"',
                        l1_entry(h))
    status, h, again = await get(http, cdn, path, f"bytes={size - 725}-")
    assert again == body and h["X-Cache"] == "HIT" and l1_entry(h).startswith("l1-1; hit")
    # A suffix range starts from slice 0 (its Content-Range gives the length), as nginx's does.
    status, h, tail = await get(http, cdn, path, "bytes=-100")
    assert status == 206 and tail == body[-100:]
    assert 'fetched 0' in l1_entry(h)


async def test_full_get_after_scattered_ranges_fetches_only_the_missing_slices(cdn, http):
    size = 8 * SLICE + 1000                                # 9 slices, the last one short
    path = f"/gen/scatter-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300"
    for first in (1 * SLICE + 5, 4 * SLICE, 8 * SLICE + 10):
        status, _, body = await get(http, cdn, path, f"bytes={first}-{first + 99}")
        assert status == 206 and body == from_origin(path, f"bytes={first}-{first + 99}")
    before = origin_bytes(cdn)
    status, h, body = await get(http, cdn, path)
    whole = from_origin(path)
    assert status == 200 and int(h["Content-Length"]) == size
    assert hashlib.sha256(body).digest() == hashlib.sha256(whole).digest()
    assert origin_bytes(cdn) - before - size == 6 * SLICE    # slices 0, 2, 3, 5, 6, 7
    assert "fwd=partial" in l1_entry(h) and 'fetched 0,2,3,5,6,7' in l1_entry(h)
    status, h, again = await get(http, cdn, path)
    assert again == whole and h["X-Cache"] == "HIT"
    # Multipart ranges are answered with the whole 200, built from the slices.
    status, h, multi = await get(http, cdn, path, "bytes=0-9,100-109")
    assert status == 200 and multi == whole


async def test_a_changed_object_is_never_mixed_into_one_body(cdn, http):
    name = f"changing-{uuid.uuid4().hex}.bin"
    target = cdn.content / name
    old = bytes(range(256)) * (4 * SLICE // 256)
    target.write_bytes(old)
    status, _, body = await get(http, cdn, f"/{name}", f"bytes=0-{SLICE - 1}")    # slice 0 stored
    assert status == 206 and body == old[:SLICE]
    new = bytes(reversed(range(256))) * (4 * SLICE // 256)
    replace_file(target, new)
    status, h, body = await get(http, cdn, f"/{name}")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(from_origin(f"/{name}")).hexdigest()
    assert body == new


async def test_an_origin_that_ignores_range_is_asked_once(cdn, http):
    size = 10 * SLICE
    path = f"/gen/norange-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300&norange=1"
    whole = from_origin(path)
    status, h, body = await get(http, cdn, path, f"bytes={3 * SLICE}-{3 * SLICE + 9}")
    assert status == 206 and body == whole[3 * SLICE:3 * SLICE + 10]
    # The L2 sliced the whole answer on the way in; the L1 asks it for another slice.
    status, h, body = await get(http, cdn, path, f"bytes={7 * SLICE}-{7 * SLICE + 9}")
    assert status == 206 and body == whole[7 * SLICE:7 * SLICE + 10] and h["Cache-Status"].startswith("l2-a; hit")
    status, h, body = await get(http, cdn, path)
    assert status == 200 and body == whole and h["Cache-Status"].startswith("l2-a; hit")
    assert origin_hits(path) == 2                            # ours, and the L2's one fetch


async def test_a_hundred_ranges_into_one_cold_slice_reach_upstream_once(cdn, http):
    size = 20 * SLICE
    path = f"/gen/herd-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300&delay=300"
    first = 12 * SLICE + 1000
    results = await asyncio.gather(*(get(http, cdn, path, f"bytes={first + i}-{first + i + 99}")
                                     for i in range(100)))
    whole = from_origin(path)
    for i, (status, _, body) in enumerate(results):
        assert status == 206 and body == whole[first + i:first + i + 100]
    assert origin_hits(path) == 2                            # ours (whole), and one slice fetch


async def test_slices_survive_a_restart(cdn, http):
    size = 6 * SLICE
    path = f"/gen/restart-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300"
    status, _, whole = await get(http, cdn, path)
    assert status == 200 and len(whole) == size
    assert origin_hits(path) == 6                            # one request per slice
    for name in ("l1-1", "l2-a"):
        cdn.node(name).stop()
    cdn.start("l2-a", "l1-1")
    status, h, body = await get(http, cdn, path, f"bytes={2 * SLICE}-{4 * SLICE + 5}")
    assert status == 206 and body == whole[2 * SLICE:4 * SLICE + 6]
    assert h["X-Cache"] == "HIT" and l1_entry(h).startswith("l1-1; hit")
    assert origin_hits(path) == 6 + 1                        # only our own check since


async def test_a_change_during_a_response_aborts_it_rather_than_mix(cdn, http):
    """The origin's object changes while a long sliced answer is being read: the client gets
    a cut-short response (its length says so) or one version whole, never a mix."""
    name = f"midway-{uuid.uuid4().hex}.bin"
    target = cdn.content / name
    size = 256 * SLICE                                       # 16 MiB: more than the sockets buffer
    old = bytes(range(256)) * (size // 256)
    new = bytes(reversed(range(256))) * (size // 256)
    target.write_bytes(old)
    received = bytearray()
    aborted = False
    async with http.get(cdn.url("l1-1", f"/{name}"), headers=HOST) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == size
        received += await r.content.readexactly(SLICE)
        replace_file(target, new)
        try:
            while chunk := await r.content.read(1 << 20):
                received += chunk
        except aiohttp.ClientPayloadError:
            aborted = True
    if aborted:
        assert len(received) < size and bytes(received) == old[:len(received)]
    else:
        assert bytes(received) in (old, new)
    # The next answer is the new version, whole.
    status, _, body = await get(http, cdn, f"/{name}")
    assert status == 200 and body == new


async def test_purging_a_url_drops_its_slices(cdn, http):
    size = 4 * SLICE
    path = f"/gen/purge-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300"
    await get(http, cdn, path, f"bytes={2 * SLICE}-{2 * SLICE + 9}")
    _, h, _ = await get(http, cdn, path, f"bytes={2 * SLICE}-{2 * SLICE + 9}")
    assert h["X-Cache"] == "HIT"
    async with http.post(f"http://{cdn.node('l1-1').admin}/purge", params={"url": f"http://www.example.com{path}"},
                         headers={"Authorization": "Bearer test-token"}) as r:
        assert r.status == 200
    _, h, _ = await get(http, cdn, path, f"bytes={2 * SLICE}-{2 * SLICE + 9}")
    assert l1_entry(h).startswith("l1-1; fwd=uri-miss")        # the L2 still has it
    _, h, _ = await get(http, cdn, path, f"bytes={2 * SLICE}-{2 * SLICE + 9}")
    assert h["X-Cache"] == "HIT"
    # An unsafe method on the URL invalidates its slices too (RFC 9111 4.4).
    async with http.post(cdn.url("l1-1", path), headers=HOST, data=b"x") as r:
        assert r.status == 200
    _, h, _ = await get(http, cdn, path, f"bytes={2 * SLICE}-{2 * SLICE + 9}")
    assert l1_entry(h).startswith("l1-1; fwd=uri-miss")


async def test_head_and_conditionals_on_a_sliced_object(cdn, http):
    size = 3 * SLICE + 5
    path = f"/gen/head-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300"
    async with http.head(cdn.url("l1-1", path), headers=HOST) as r:
        assert r.status == 200 and int(r.headers["Content-Length"]) == size
        etag = r.headers["ETag"]
    status, h, body = await get(http, cdn, path, f"bytes={size}-")
    assert status == 416 and h["Content-Range"] == f"bytes */{size}"
    async with http.get(cdn.url("l1-1", path), headers=dict(HOST, **{"If-None-Match": etag})) as r:
        assert r.status == 304
    hits = origin_hits(path)
    async with http.get(cdn.url("l1-1", path), headers=dict(HOST, **{"If-Match": '"other"'})) as r:
        assert r.status == 412
    assert origin_hits(path) == hits + 1      # only our own count: a client's If-Match drops nothing
    async with http.get(cdn.url("l1-1", path), headers=dict(HOST, **{"If-Match": etag})) as r:
        assert r.status == 200 and 'fetched 1,2"' in l1_entry(r.headers)     # HEAD took 0, the 416 took 3


async def test_an_empty_object_and_an_error_pass_through(cdn, http):
    path = f"/gen/empty-{uuid.uuid4().hex}?size=0&etag=1&cc=max-age=300"
    status, h, body = await get(http, cdn, path)
    assert status == 200 and body == b"" and h["Content-Length"] == "0"
    path = f"/gen/missing-{uuid.uuid4().hex}?status=404&size=10"
    status, h, body = await get(http, cdn, path)
    assert status == 404 and len(body) == 10 and 'detail="not sliced"' in l1_entry(h)


async def test_a_full_get_of_a_large_sliced_object_holds_little_memory(cdn, http):
    """128 MiB through both tiers: the L1's peak memory grows by its memory tier (16 MiB) and a
    few slices, not by the object."""
    size = 128 * 2**20
    path = f"/gen/large-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=300"
    l1 = cdn.node("l1-1")
    before = l1.peak_rss()
    digest, received = hashlib.sha256(), 0
    async with http.get(cdn.url("l1-1", path), headers=HOST) as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(1 << 20):
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert l1.peak_rss() - before < 48 * 2**20
    expected = hashlib.sha256()
    with urllib.request.urlopen(urllib.request.Request(f"http://{ORIGIN}{path}", headers=HOST), timeout=60) as r:
        while chunk := r.read(1 << 20):
            expected.update(chunk)
    assert digest.digest() == expected.digest()


def test_an_object_larger_than_every_tier_is_not_said_stored(tmp_path):
    """Without slicing, an object no tier can hold is not written, and Cache-Status says so
    (it used to say `stored` while the store refused it)."""
    c = Cluster.create(tmp_path, "108", l1=1)
    c.config.write_text(c.config.read_text().replace('disk_size = "512MiB"', 'disk_size = "1MiB"'))
    try:
        c.start("origin", "l1-1")
        path = f"/gen/huge-{uuid.uuid4().hex}?size={2 * 2**20}&etag=1&cc=max-age=300"
        for hits in ("1", "2"):
            request = urllib.request.Request(c.url("l1-1", path), headers=HOST)
            with urllib.request.urlopen(request, timeout=10) as r:
                assert len(r.read()) == 2 * 2**20
                assert r.headers["X-Origin-Hits"] == hits
                assert r.headers["Cache-Status"] == 'l1-1; fwd=uri-miss; fwd-status=200; detail=too-large'
    finally:
        c.stop_all()


async def test_a_stale_slice_is_revalidated_not_fetched_again(cdn, http):
    size = 4 * SLICE
    path = f"/gen/stale-{uuid.uuid4().hex}?size={size}&etag=1&cc=max-age=1"
    range_value = f"bytes={SLICE}-{2 * SLICE + 9}"               # slices 1 and 2
    status, _, first = await get(http, cdn, path, range_value)
    assert status == 206
    await asyncio.sleep(1.2)                                      # both tiers' slices are stale now
    before = origin_bytes(cdn)
    status, h, again = await get(http, cdn, path, range_value)
    assert status == 206 and again == first
    assert origin_bytes(cdn) == before                            # 304s only: no body bytes again
    assert l1_entry(h).startswith("l1-1; fwd=stale") and 'fetched 1,2"' in l1_entry(h)
    _, h, _ = await get(http, cdn, path, range_value)
    assert h["X-Cache"] == "HIT"                                  # freshened
    # A range inside one stale slice: known revalidated before the head, so a 304 and REVALIDATED.
    await asyncio.sleep(1.2)
    _, h, body = await get(http, cdn, path, f"bytes={SLICE}-{SLICE + 9}")
    assert body == first[:10] and h["X-Cache"] == "REVALIDATED"
    assert l1_entry(h).startswith("l1-1; fwd=stale; fwd-status=304")
