"""Cache storage: memory LRU, disk LRU with atomic files and rebuild, the tiered stack.

Everything here uses real files under tmp_path and the real stores; damage
(truncated bodies, garbage meta, stale temp files) is done to the files
themselves, the way a crash or a full disk would leave them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
import xxhash

from edge.store.disk import BLOCK_SIZE, SMALL_BODY, _BlockSums
from edge.store.index import SharedIndex, map_size_for
from edge.store import (ENTRY_BASE, CachedObject, CorruptEntry, DiskStore, MemoryStore, Meta,
                        TieredStore, entry_charge, key_hash)

KiB = 1024
MiB = 1024 * 1024


def make_meta(body: bytes, url: str = "http://www.example.com/a.js", status: int = 200,
              extra: tuple[tuple[str, str], ...] = ()) -> Meta:
    headers = (("Content-Type", "application/javascript"),
               ("X-Digest", hashlib.sha256(body).hexdigest()),
               ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")) + extra
    return Meta(status=status, headers=headers, request_time=1_700_000_000.0,
                response_time=1_700_000_000.25, size=len(body), url=url)


def digest_of(meta: Meta) -> str:
    return dict(meta.headers)["X-Digest"]


async def put(store, key: str, body: bytes, chunk: int = 64 * KiB, meta: Meta | None = None) -> bool:
    writer = store.writer(key, size_hint=len(body))
    for start in range(0, len(body), chunk):
        await writer.write(body[start:start + chunk])
    return await writer.commit(meta or make_meta(body))


async def read_all(obj: CachedObject, chunk_size: int = 256 * KiB) -> bytes:
    return b"".join([part async for part in obj.chunks(chunk_size)])


def files_under(directory: Path) -> list[str]:
    """The entries' files (not a shared index's LMDB files and lock file)."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                  and p.relative_to(directory).parts[0] not in ("index.lmdb", "stripes.lock"))


def entry_paths(directory: Path, key: str) -> tuple[Path, Path]:
    h = key_hash(key)
    return directory / h[:2] / f"{h}.meta", directory / h[:2] / f"{h}.body"


def read_meta_record(path: Path) -> dict:
    """A disk meta file is JSON, then a line with the JSON's xxh3-64 in hex."""
    payload, check = path.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)
    assert int(check, 16) == xxhash.xxh3_64_intdigest(payload)
    return json.loads(payload)


def write_meta_record(path: Path, record: dict) -> None:
    payload = json.dumps(record).encode()
    path.write_bytes(b"%s\n%016x\n" % (payload, xxhash.xxh3_64_intdigest(payload)))


def body_of(n: int, seed: int) -> bytes:
    """n deterministic bytes that differ per seed."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest()
    return (block * (n // len(block) + 1))[:n]


@pytest.fixture(params=["local", "shared"])
async def open_disk(tmp_path, request):
    """Make DiskStores that are closed after the test, started or not.

    Every disk test runs twice: with the one-process index, and with the LMDB
    index the workers of a node share (made fresh, as a node's start makes it).
    """
    stores: list[DiskStore] = []

    async def make(directory: Path | None = None, max_bytes: int = 64 * MiB, start: bool = True,
                   wait: bool = True) -> DiskStore:
        directory = directory or tmp_path / "cache"
        index = None
        if request.param == "shared":
            index = SharedIndex(directory / "index.lmdb", map_size_for(max_bytes), fresh=True)
        store = DiskStore(directory, max_bytes, index=index)
        stores.append(store)
        if start:
            await store.start()
            if wait:
                await asyncio.wait_for(store.rebuilt.wait(), 5)
        return store

    yield make
    for store in stores:
        await store.close()


# ---------------------------------------------------------------------------- Meta

def test_meta_round_trips_through_json_with_repeats_and_odd_characters():
    meta = make_meta(b"xyz", url="http://h/\u00e9t\u00e9?q=\udcff",
                     extra=(("X-Odd", "caf\u00e9 \udc80"), ("x-odd", "second")))
    again = Meta.from_json(meta.to_json())
    assert again == meta
    assert [name for name, _ in again.headers].count("Set-Cookie") == 2


@pytest.mark.parametrize("raw", [
    b'{"status":-1,"headers":[],"request_time":1,"response_time":1,"size":0}',
    b'{"status":1000,"headers":[],"request_time":1,"response_time":1,"size":0}',
    b"", b"not json", b"[]", b'{"status": 200}', b"\xff\xfe",
    b'{"status":"200","headers":[],"request_time":1,"response_time":1,"size":0}',
    b'{"status":200,"headers":[["a"]],"request_time":1,"response_time":1,"size":0}',
    b'{"status":200,"headers":[],"request_time":1,"response_time":1,"size":-1}',
    b'{"status":200,"headers":[],"request_time":NaN,"response_time":1,"size":0}',
    b'{"status":true,"headers":[],"request_time":1,"response_time":1,"size":0}',
])
def test_meta_from_garbage_raises_corrupt_entry(raw):
    with pytest.raises(CorruptEntry):
        Meta.from_json(raw)


# ---------------------------------------------------------------------------- memory

async def test_memory_is_bounded_in_bytes_and_evicts_least_recently_used():
    charge = entry_charge("k0", make_meta(body_of(1000, 0)))     # the same for k0 .. k4
    memory = MemoryStore(max_bytes=3 * charge, max_object_bytes=10_000)
    for i in range(3):
        assert await put(memory, f"k{i}", body_of(1000, i))
    assert (memory.objects, memory.bytes, memory.evictions) == (3, 3 * charge, 0)

    assert await memory.get("k0") is not None        # k0 becomes most recently used
    assert await put(memory, "k3", body_of(1000, 3))
    assert await put(memory, "k4", body_of(1000, 4))
    assert await memory.get("k1") is None and await memory.get("k2") is None
    for key, seed in (("k0", 0), ("k3", 3), ("k4", 4)):
        hit = await memory.get(key)
        assert hit is not None and hit.body == body_of(1000, seed)
    assert (memory.objects, memory.bytes, memory.evictions) == (3, 3 * charge, 2)


async def test_memory_counts_empty_objects_against_the_bound():
    charge = entry_charge("empty99", make_meta(b""))                # the last ten keys' charge
    memory = MemoryStore(max_bytes=10 * charge, max_object_bytes=MiB)
    for i in range(100):
        assert await put(memory, f"empty{i}", b"")
    assert memory.objects == 10
    assert memory.evictions == 90
    assert memory.bytes == 10 * charge


async def test_memory_get_shares_the_body_without_copying():
    memory = MemoryStore(max_bytes=MiB, max_object_bytes=MiB)
    body = body_of(5000, 1)
    assert memory.put("k", make_meta(body), body)
    first, second = await memory.get("k"), await memory.get("k")
    assert first.body is body and second.body is body
    assert await read_all(first, chunk_size=1024) == body   # re-readable, chunked
    assert [len(c) async for c in first.chunks(2048)] == [2048, 2048, 904]


async def test_memory_writer_drops_a_body_above_max_object_bytes():
    memory = MemoryStore(max_bytes=MiB, max_object_bytes=10 * KiB)
    assert await put(memory, "k", b"old")
    writer = memory.writer("k")                       # no size hint: find out while streaming
    await writer.write(b"a" * 6 * KiB)
    assert writer.buffered == 6 * KiB
    await writer.write(b"a" * 6 * KiB)
    assert writer.buffered == 0 and writer.dropped    # the buffer is gone, not kept growing
    await writer.write(b"a" * 6 * KiB)
    assert writer.buffered == 0
    assert not await writer.commit(make_meta(b"a" * 18 * KiB))
    assert await memory.get("k") is None              # the superseded "old" is not served
    assert memory.bytes == 0

    hinted = memory.writer("big", size_hint=11 * KiB)
    await hinted.write(b"b" * KiB)
    assert hinted.buffered == 0
    assert not await hinted.commit(make_meta(b"b" * KiB))

    exact = b"c" * 10 * KiB                           # the limit itself fits
    assert await put(memory, "edge", exact)
    assert (await memory.get("edge")).body == exact


async def test_memory_commit_refuses_a_size_mismatch_and_abort_keeps_nothing():
    memory = MemoryStore(max_bytes=MiB, max_object_bytes=MiB)
    writer = memory.writer("k")
    await writer.write(b"12345")
    assert not await writer.commit(make_meta(b"123456"))
    assert await memory.get("k") is None

    writer = memory.writer("k")
    await writer.write(b"12345")
    await writer.abort()
    assert writer.buffered == 0 and memory.objects == 0


async def test_memory_update_meta_keeps_the_body():
    memory = MemoryStore(max_bytes=MiB, max_object_bytes=MiB)
    body = b"hello"
    assert await put(memory, "k", body)
    fresh = make_meta(body, extra=(("Age", "0"),))
    assert await memory.update_meta("k", fresh)
    hit = await memory.get("k")
    assert hit.meta == fresh and hit.body == body
    assert not await memory.update_meta("absent", fresh)
    assert not await memory.update_meta("k", make_meta(b"other length"))


# ---------------------------------------------------------------------------- disk

KEYS = [
    "GET|www.example.com|/a.js",
    "GET|www.example.com|/" + "long/" * 2000 + "?q=" + "x" * 5000,
    "GET|h|/caf\u00e9/\u65e5\u672c/\U0001f600|\x00|\n|../../etc/passwd",
    "weird \udc80 surrogate",
]


async def test_disk_round_trip_with_any_key(tmp_path, open_disk):
    disk = await open_disk()
    for i, key in enumerate(KEYS):
        body = body_of(300 * KiB + i, i)
        assert await put(disk, key, body, chunk=100 * KiB)
        hit = await disk.get(key)
        assert hit is not None and hit.body is None       # streamed from the file, not held
        assert hit.meta == make_meta(body)
        assert await read_all(hit, chunk_size=64 * KiB) == body
        assert await read_all(hit) == body                # chunks() can be read again
        meta_path, body_path = entry_paths(tmp_path / "cache", key)
        assert body_path.read_bytes() == body
        assert read_meta_record(meta_path)["key"] == key
    assert disk.objects == len(KEYS)
    assert await disk.get("never stored") is None
    assert [f for f in files_under(tmp_path / "cache") if ".tmp-" in f] == []


async def test_disk_empty_body(open_disk):
    disk = await open_disk()
    assert await put(disk, "empty", b"", meta=make_meta(b"", status=204))
    hit = await disk.get("empty")
    assert hit.meta.status == 204 and await read_all(hit) == b""


async def test_a_status_0_marker_survives_a_disk_restart(tmp_path, open_disk):
    # The proxy records a URL's Vary names as a bodiless entry with status 0.
    marker = Meta(status=0, headers=(("Vary", "Accept-Language"),), request_time=1.0,
                  response_time=2.0, size=0)
    first = await open_disk(tmp_path / "cache")
    writer = first.writer("marker", size_hint=0)
    assert await writer.commit(marker)
    await first.close()
    again = await open_disk(tmp_path / "cache")
    assert again.objects == 1 and (await again.get("marker")).meta == marker


async def test_disk_lru_byte_bound_evicts_and_deletes_files(tmp_path, open_disk):
    directory = tmp_path / "cache"
    probe = await open_disk(directory / "probe")
    await put(probe, "k0", body_of(100 * KiB, 0))
    charge = probe.bytes                  # body + meta file, the same for every key below
    assert charge > 100 * KiB

    disk = await open_disk(directory / "lru", max_bytes=3 * charge + 10)
    for i in range(3):
        assert await put(disk, f"k{i}", body_of(100 * KiB, i))
    assert await disk.get("k0") is not None               # k0 is now the most recent
    assert await put(disk, "k3", body_of(100 * KiB, 3))
    assert await put(disk, "k4", body_of(100 * KiB, 4))

    assert disk.evictions == 2 and disk.objects == 3 and disk.bytes == 3 * charge
    assert disk.bytes <= disk.max_bytes
    for gone in ("k1", "k2"):
        assert await disk.get(gone) is None
        assert not any(p.exists() for p in entry_paths(directory / "lru", gone))
    for kept in ("k0", "k3", "k4"):
        assert all(p.exists() for p in entry_paths(directory / "lru", kept))
    assert len(files_under(directory / "lru")) == 6


async def test_disk_never_stores_an_object_larger_than_the_whole_tier(tmp_path, open_disk):
    disk = await open_disk(max_bytes=200 * KiB)
    assert await put(disk, "small", b"s" * KiB)
    writer = disk.writer("big")                           # no hint: it outgrows the tier mid-way
    for _ in range(5):
        await writer.write(b"b" * 64 * KiB)
    assert writer.dropped
    assert [f for f in files_under(tmp_path / "cache") if ".tmp-" in f] == []  # stopped writing
    assert not await writer.commit(make_meta(b"b" * 320 * KiB))
    assert await disk.get("big") is None
    assert await disk.get("small") is not None and disk.evictions == 0

    hinted = disk.writer("big2", size_hint=300 * KiB)
    await hinted.write(b"x")
    assert hinted.dropped and not await hinted.commit(make_meta(b"x"))
    assert len(files_under(tmp_path / "cache")) == 2


async def test_disk_commit_refuses_a_size_mismatch(tmp_path, open_disk):
    disk = await open_disk()
    writer = disk.writer("k")
    await writer.write(b"12345")
    assert not await writer.commit(make_meta(b"123456"))
    assert await disk.get("k") is None
    assert files_under(tmp_path / "cache") == []


async def test_disk_abort_leaves_nothing_behind(tmp_path, open_disk):
    disk = await open_disk()
    assert await put(disk, "kept", b"kept")
    before = files_under(tmp_path / "cache")
    small = disk.writer("small")
    await small.write(b"partial" * 1000)          # small bodies wait in memory until commit
    assert files_under(tmp_path / "cache") == before
    await small.abort()
    writer = disk.writer("k")
    await writer.write(b"p" * (SMALL_BODY + 1))
    assert len(files_under(tmp_path / "cache")) == len(before) + 1   # the temp file
    await writer.abort()
    assert files_under(tmp_path / "cache") == before
    assert await disk.get("k") is None and await disk.get("small") is None and disk.objects == 1


async def test_disk_update_meta_rewrites_only_the_meta(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    body = body_of(50 * KiB, 7)
    assert await put(disk, "k", body)
    meta_path, body_path = entry_paths(directory, "k")
    body_inode = body_path.stat().st_ino
    fresh = Meta(status=200, headers=make_meta(body).headers + (("ETag", '"v2"'),),
                 request_time=1_800_000_000.0, response_time=1_800_000_001.0, size=len(body),
                 url="http://www.example.com/a.js")
    assert await disk.update_meta("k", fresh)
    assert body_path.stat().st_ino == body_inode          # the body file was not rewritten
    hit = await disk.get("k")
    assert hit.meta == fresh and await read_all(hit) == body
    assert not await disk.update_meta("absent", fresh)
    assert not await disk.update_meta("k", make_meta(b"different size"))
    assert (await disk.get("k")).meta == fresh

    await disk.close()
    again = await open_disk(directory)                    # and it survives a restart
    assert (await again.get("k")).meta == fresh


async def test_disk_restart_rebuilds_index_and_lru_order(tmp_path, open_disk):
    directory = tmp_path / "cache"
    first = await open_disk(directory)
    for i in range(4):
        assert await put(first, f"k{i}", body_of(10 * KiB, i))
    charge, total = first.bytes // 4, first.bytes
    await first.close()
    # The LRU order after a restart follows the meta files' modification
    # times: make k2 the oldest and k0 the newest.
    for age, key in enumerate(["k0", "k3", "k1", "k2"]):
        os.utime(entry_paths(directory, key)[0], ns=(10**18 - age * 10**12,) * 2)

    second = await open_disk(directory, max_bytes=total)
    assert (second.objects, second.bytes) == (4, total)
    for i in range(4):
        hit = await second.get(f"k{i}")
        assert await read_all(hit) == body_of(10 * KiB, i)
    third = await open_disk(directory, max_bytes=total)   # fresh order, untouched by gets
    assert await put(third, "k4", body_of(10 * KiB, 4))
    assert third.evictions == 1 and third.bytes == total
    assert await third.get("k2") is None                  # the oldest went first
    assert not any(p.exists() for p in entry_paths(directory, "k2"))
    assert charge * 4 == total


async def test_disk_get_works_before_the_rebuild_finishes(tmp_path, open_disk):
    directory = tmp_path / "cache"
    first = await open_disk(directory)
    for i in range(3):
        assert await put(first, f"k{i}", body_of(KiB, i))
    total = first.bytes
    await first.close()

    second = await open_disk(directory, start=False)      # nothing scanned yet
    assert not second.rebuilt.is_set() and second.objects == 0
    hit = await second.get("k1")
    assert hit is not None and await read_all(hit) == body_of(KiB, 1)
    assert second.objects == 1                            # adopted into the index
    assert await second.get("absent") is None
    assert await second.delete("k2")                      # acts on the files, indexed or not
    assert not any(p.exists() for p in entry_paths(directory, "k2"))

    await second.start()
    await asyncio.wait_for(second.rebuilt.wait(), 5)
    assert second.objects == 2                            # k1 not counted twice, k2 stays gone
    assert second.bytes == total * 2 // 3
    assert await second.get("k2") is None


async def test_disk_rebuild_does_not_resurrect_keys_changed_during_the_scan(tmp_path, open_disk):
    directory = tmp_path / "cache"
    first = await open_disk(directory)
    for key in ("deleted", "restored", "kept"):
        assert await put(first, key, body_of(KiB, len(key)))
    await first.close()
    # A body with no meta (a commit interrupted by a crash) is broken...
    half_done = entry_paths(directory, "half-done")[1]
    half_done.parent.mkdir(exist_ok=True)
    half_done.write_bytes(b"old")

    disk = await open_disk(directory, max_bytes=MiB, start=False)
    scan = await disk._scan()                             # the scan sees them all...
    assert sorted(key for _, key, _, _, _ in scan.found) == ["deleted", "kept", "restored"]
    assert scan.bad == [key_hash("half-done")]
    assert await disk.delete("deleted")                   # ...then traffic changes them
    new_body = body_of(2 * KiB, 99)
    assert await put(disk, "restored", new_body)
    assert await put(disk, "half-done", b"stored properly")   # ...and repairs that one
    await disk._merge(scan)

    assert disk.rebuilt.is_set()
    assert sorted(disk.keys()) == ["half-done", "kept", "restored"]
    assert disk.bytes == sum((directory / name).stat().st_size for name in files_under(directory))
    assert await disk.get("deleted") is None
    assert not any(p.exists() for p in entry_paths(directory, "deleted"))
    assert await read_all(await disk.get("restored")) == new_body
    assert await read_all(await disk.get("kept")) == body_of(KiB, 4)
    assert await read_all(await disk.get("half-done")) == b"stored properly"


async def test_disk_truncated_body_is_a_miss_and_removed(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    body = body_of(100 * KiB, 3)
    assert await put(disk, "k", body)
    meta_path, body_path = entry_paths(directory, "k")
    with open(body_path, "r+b") as f:
        f.truncate(60 * KiB)
    assert await disk.get("k") is None
    assert not meta_path.exists() and not body_path.exists()
    assert disk.objects == 0 and disk.bytes == 0


async def test_disk_body_truncated_after_lookup_raises_corrupt_entry_mid_read(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    body = body_of(3 * BLOCK_SIZE, 3)
    assert await put(disk, "k", body)
    hit = await disk.get("k")
    meta_path, body_path = entry_paths(directory, "k")
    # Truncated between lookup and read: opened fine, runs short while reading
    # (reads are whole checksummed blocks: cut inside the second one).
    stream = hit.chunks(BLOCK_SIZE)
    first = await anext(stream)
    assert first == body[:BLOCK_SIZE]
    with open(body_path, "r+b") as f:
        f.truncate(BLOCK_SIZE + 40 * KiB)
    with pytest.raises(CorruptEntry):
        async for _ in stream:
            pass
    assert not meta_path.exists() and not body_path.exists()
    assert await disk.get("k") is None and disk.objects == 0


async def test_disk_entry_replaced_between_lookup_and_read_is_never_mixed(tmp_path, open_disk):
    disk = await open_disk()
    old, new = body_of(64 * KiB, 1), body_of(64 * KiB, 2)  # same size: only content differs
    assert await put(disk, "k", old)
    hit = await disk.get("k")
    assert await put(disk, "k", new)
    with pytest.raises(CorruptEntry):                     # old headers never go out with new bytes
        await read_all(hit)
    fresh = await disk.get("k")                           # the new entry was not dropped for it
    assert await read_all(fresh) == new and fresh.meta == make_meta(new)

    stale = await disk.get("k")
    assert await disk.delete("k")
    with pytest.raises(CorruptEntry):
        await read_all(stale)


async def test_disk_garbage_meta_is_a_miss_and_removed(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    for key in ("live", "restart", "otherkey"):
        assert await put(disk, key, b"body of " + key.encode())
    meta_live, body_live = entry_paths(directory, "live")
    meta_live.write_bytes(b'{"format": 1, "key": "live", "status": ')       # torn JSON
    assert await disk.get("live") is None                                  # an indexed entry
    assert not meta_live.exists() and not body_live.exists()

    # A meta naming another key is as bad as garbage.
    meta_other, _ = entry_paths(directory, "otherkey")
    record = read_meta_record(meta_other)
    record["key"] = "someone else"
    write_meta_record(meta_other, record)             # a well-formed meta, with its checksum
    assert await disk.get("otherkey") is None and not meta_other.exists()

    meta_restart, body_restart = entry_paths(directory, "restart")
    meta_restart.write_bytes(b"\x00\xff garbage")
    await disk.close()
    again = await open_disk(directory)                                     # removed by the scan
    assert not meta_restart.exists() and not body_restart.exists()
    assert again.objects == 0 and files_under(directory) == []


async def test_disk_start_removes_stale_temp_files_but_not_a_live_writers(tmp_path, open_disk):
    directory = tmp_path / "cache"
    first = await open_disk(directory)
    assert await put(first, "k", b"kept")
    sub = key_hash("k")[:2]
    stale = [directory / sub / ".tmp-deadbeef-0001", directory / "00" / ".tmp-cafe-0002"]
    stale[1].parent.mkdir(exist_ok=True)
    for path in stale:
        path.write_bytes(b"left by a crash")
    orphan_body = entry_paths(directory, "orphan")[1]     # a body whose commit never finished
    orphan_body.parent.mkdir(exist_ok=True)
    orphan_body.write_bytes(b"no meta")
    unrelated = directory / sub / "README"
    unrelated.write_text("not ours")
    await first.close()

    second = await open_disk(directory, start=False)
    writer = second.writer("in-flight")                   # writing while the scan runs
    await writer.write(b"new body")
    await second.start()
    await asyncio.wait_for(second.rebuilt.wait(), 5)
    assert not any(p.exists() for p in stale) and not orphan_body.exists()
    assert unrelated.exists()                             # files that are not ours are left alone
    assert await writer.commit(make_meta(b"new body"))
    assert await read_all(await second.get("in-flight")) == b"new body"
    assert await read_all(await second.get("k")) == b"kept"


async def test_disk_concurrent_writers_last_commit_wins_and_readers_never_see_a_torn_entry(
        tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    a, b = body_of(200 * KiB, 1), body_of(200 * KiB, 2)  # same size: only content tells them apart
    wa, wb = disk.writer("k"), disk.writer("k")
    for start in range(0, len(a), 50 * KiB):              # interleaved streams
        await wa.write(a[start:start + 50 * KiB])
        await wb.write(b[start:start + 50 * KiB])
    assert await wb.commit(make_meta(b))
    assert await wa.commit(make_meta(a))                  # a commits last, so a wins
    hit = await disk.get("k")
    assert await read_all(hit) == a and digest_of(hit.meta) == hashlib.sha256(a).hexdigest()

    bodies = [body_of(64 * KiB, seed) for seed in range(10, 30)]
    stop = asyncio.Event()
    reads = 0

    async def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            hit = await disk.get("k")
            assert hit is not None
            try:
                data = await read_all(hit, chunk_size=16 * KiB)
            except CorruptEntry:
                continue                                  # replaced between lookup and read
            assert hashlib.sha256(data).hexdigest() == digest_of(hit.meta)
            reads += 1

    readers = [asyncio.create_task(reader()) for _ in range(3)]
    results = await asyncio.gather(*(put(disk, "k", body, chunk=16 * KiB) for body in bodies))
    stop.set()
    await asyncio.gather(*readers)
    assert all(results) and reads > 0
    final = await disk.get("k")
    data = await read_all(final)
    assert data in bodies and hashlib.sha256(data).hexdigest() == digest_of(final.meta)
    assert len(files_under(directory)) == 2 and disk.objects == 1
    assert disk.bytes == sum((directory / name).stat().st_size for name in files_under(directory))


async def test_disk_unusable_directory_raises_oserror_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OSError) as info:
        DiskStore(blocker / "cache", MiB)
    assert str(blocker / "cache") in str(info.value)


# ---------------------------------------------------------------------------- tiered

async def test_tiered_large_object_streams_to_disk_and_never_into_memory(tmp_path, open_disk):
    memory = MemoryStore(max_bytes=16 * MiB, max_object_bytes=MiB)
    disk = await open_disk(max_bytes=256 * MiB)
    tiered = TieredStore(memory, disk)
    size = 64 * MiB
    expected = hashlib.sha256()

    tracemalloc.start()
    try:
        writer = tiered.writer("big")                     # no size hint: learnt while streaming
        for i in range(size // MiB):
            chunk = i.to_bytes(4, "big") * (MiB // 4)
            expected.update(chunk)
            await writer.write(chunk)
            assert memory.bytes == 0 and writer.memory.buffered <= MiB
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MiB                                 # never held whole (64 MiB) anywhere
    meta = Meta(status=200, headers=(("X-Digest", expected.hexdigest()),),
                request_time=1.0, response_time=2.0, size=size, url="http://h/big")
    assert await writer.commit(meta)

    assert memory.bytes == 0 and memory.objects == 0 and memory.peek("big") is None
    hit = await tiered.get("big")
    assert hit is not None and hit.body is None           # served from the file
    got = hashlib.sha256()
    async for part in hit.chunks(MiB):
        got.update(part)
    assert got.hexdigest() == expected.hexdigest()
    assert memory.bytes == 0                              # not promoted either
    assert tiered.tiers() == [memory, disk]


async def test_tiered_promotes_small_disk_hits_into_memory(tmp_path, open_disk):
    directory = tmp_path / "cache"
    first = TieredStore(MemoryStore(MiB, 64 * KiB), await open_disk(directory))
    body = body_of(10 * KiB, 5)
    assert await put(first, "k", body)
    assert first.memory.peek("k").body == body
    await first.settled()                                 # written behind: on disk once settled
    assert first.disk.objects == 1
    await first.close()

    memory = MemoryStore(MiB, 64 * KiB)                   # a restarted node: memory is empty
    tiered = TieredStore(memory, await open_disk(directory))
    hit = await tiered.get("k")
    assert hit.body == body and hit.meta == make_meta(body)
    assert memory.peek("k") is not None and memory.peek("k").body == body
    assert (await tiered.get("k")).body is memory.peek("k").body   # now a memory hit


async def test_tiered_replacing_a_small_version_with_a_large_one_leaves_no_stale_copy(open_disk):
    memory = MemoryStore(MiB, 64 * KiB)
    tiered = TieredStore(memory, await open_disk())
    assert await put(tiered, "k", b"small old version")
    large = body_of(200 * KiB, 8)
    assert await put(tiered, "k", large)
    assert memory.peek("k") is None
    hit = await tiered.get("k")
    assert hit.body is None and await read_all(hit) == large

    assert await tiered.update_meta("k", make_meta(large, extra=(("Age", "1"),)))
    assert dict((await tiered.get("k")).meta.headers)["Age"] == "1"
    assert await tiered.delete("k")
    assert await tiered.get("k") is None and not await tiered.delete("k")


async def test_tiered_promotions_racing_commits_never_leave_an_old_version_in_memory(open_disk):
    # Memory holds one object, so reading "filler" pushes "k" out and the next
    # read of "k" promotes it from disk while new versions are being committed.
    memory = MemoryStore(max_bytes=300 * KiB + ENTRY_BASE, max_object_bytes=300 * KiB)
    tiered = TieredStore(memory, await open_disk())
    assert await put(tiered, "filler", body_of(200 * KiB, 0))
    versions = [body_of(200 * KiB, seed) for seed in range(1, 41)]
    stop = asyncio.Event()

    async def reader(key: str) -> None:
        while not stop.is_set():
            await asyncio.sleep(0)                        # a memory hit never yields by itself
            hit = await tiered.get(key)
            if hit is None:                               # replaced while being promoted
                continue
            try:
                data = await read_all(hit)
            except CorruptEntry:
                continue
            assert hashlib.sha256(data).hexdigest() == digest_of(hit.meta)

    readers = [asyncio.create_task(reader(key)) for key in ("k", "filler", "k")]
    for body in versions:
        assert await put(tiered, "k", body, chunk=200 * KiB)
        await asyncio.sleep(0)
    stop.set()
    await asyncio.gather(*readers)
    latest = hashlib.sha256(versions[-1]).hexdigest()
    held = memory.peek("k")
    assert held is None or digest_of(held.meta) == latest
    assert digest_of((await tiered.get("k")).meta) == latest


async def test_tiered_disk_failure_keeps_serving_from_memory(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    tiered = TieredStore(MemoryStore(MiB, 64 * KiB), disk)
    # The entry's subdirectory cannot be created (a file is in the way): every
    # disk write for this key fails, the way a full or broken disk would.
    (directory / key_hash("k")[:2]).write_text("in the way")
    body = body_of(10 * KiB, 9)
    assert await put(tiered, "k", body)                   # no exception into the caller
    await tiered.settled()
    hit = await tiered.get("k")
    assert hit.body == body and disk.objects == 0
    assert [f for f in files_under(directory) if ".tmp-" in f] == []


async def test_tiered_abort_leaves_nothing_behind(tmp_path, open_disk):
    memory = MemoryStore(MiB, 64 * KiB)
    tiered = TieredStore(memory, await open_disk())
    writer = tiered.writer("k")
    await writer.write(b"partial")
    await writer.abort()
    assert await tiered.get("k") is None
    assert memory.objects == 0 and files_under(tmp_path / "cache") == []


@pytest.mark.parametrize(("start", "end"), [(0, None), (1, 2), (1000, 70_000), (299_999, None), (5, 5)])
async def test_chunks_from_an_offset_memory_and_disk(tmp_path, open_disk, start, end):
    body = body_of(300 * KiB, 3)
    memory = MemoryStore(4 * 2**20, 2**20)
    disk = await open_disk()
    for store in (memory, disk):
        assert await put(store, "k", body)
        hit = await store.get("k")
        parts = [part async for part in hit.chunks(64 * KiB, start, end)]
        assert b"".join(parts) == body[start:end]
        assert all(len(part) <= 64 * KiB for part in parts)


async def test_tiered_writes_behind_and_never_serves_the_older_disk_version(open_disk):
    memory = MemoryStore(MiB, 64 * KiB)
    tiered = TieredStore(memory, await open_disk())
    old, new = body_of(10 * KiB, 1), body_of(10 * KiB, 2)
    assert await put(tiered, "k", old)
    await tiered.settled()
    assert await put(tiered, "k", new)                    # returns once memory holds it
    assert "k" in tiered._disk_pending                    # the disk write is still on its way
    await memory.delete("k")                              # evicted before reaching disk
    hit = await tiered.get("k")
    assert await read_all(hit) == new                     # waited for the disk, not the old version
    await tiered.settled()
    assert await read_all(await tiered.disk.get("k")) == new


async def test_tiered_delete_waits_for_the_write_behind(open_disk):
    tiered = TieredStore(MemoryStore(MiB, 64 * KiB), await open_disk())
    assert await put(tiered, "k", body_of(10 * KiB, 3))
    assert await tiered.delete("k")                       # the disk write lands first, then both go
    await tiered.settled()
    assert await tiered.get("k") is None and tiered.disk.objects == 0


async def test_file_calls_queued_during_a_hop_share_the_next_one_in_order():
    import threading

    from edge.store.disk import _ThreadBatch
    batch = _ThreadBatch()
    release = threading.Event()
    ran: list[int] = []

    def call(n: int) -> int:
        if n == 0:
            release.wait(5)          # the first hop is busy while the others queue up
        if n % 7 == 3:
            raise ValueError(n)
        ran.append(n)
        return n * n

    first = asyncio.ensure_future(batch.run(call, 0))
    await asyncio.sleep(0.01)
    rest = [asyncio.ensure_future(batch.run(call, n)) for n in range(1, 50)]
    release.set()
    results = await asyncio.gather(first, *rest, return_exceptions=True)
    assert batch.batches == 2
    assert ran == [n for n in range(50) if n % 7 != 3]
    for n, result in enumerate(results):
        assert (isinstance(result, ValueError) and result.args == (n,)) if n % 7 == 3 else result == n * n


# ------------------------------------------------------------------ disk checksums (issue 10 item 1)


@pytest.mark.parametrize("size", [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 17])
@pytest.mark.parametrize("chunk", [1000, BLOCK_SIZE - 3, BLOCK_SIZE, 5 * BLOCK_SIZE])
def test_block_sums_do_not_depend_on_how_the_body_was_written(size, chunk):
    body = body_of(size, size)
    sums = _BlockSums()
    for start in range(0, size, chunk):
        sums.update(body[start:start + chunk])
    expected = [xxhash.xxh3_64_intdigest(body[i:i + BLOCK_SIZE]) for i in range(0, size, BLOCK_SIZE)]
    assert sums.finish() == expected


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("where", [0, BLOCK_SIZE - 1, BLOCK_SIZE, 2 * BLOCK_SIZE + 500])
async def test_a_flipped_body_bit_is_never_handed_out(tmp_path, open_disk, where):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    body = body_of(2 * BLOCK_SIZE + 1000, 7)
    assert await put(disk, "k", body)
    meta_path, body_path = entry_paths(directory, "k")
    flip_byte(body_path, where)
    hit = await disk.get("k")                        # meta and size are fine: found
    assert hit is not None
    handed_out = b""
    with pytest.raises(CorruptEntry, match=f"block {where // BLOCK_SIZE} fails its checksum"):
        async for piece in hit.chunks(BLOCK_SIZE):
            handed_out += piece
    assert handed_out == body[:where - where % BLOCK_SIZE]     # only blocks that passed
    assert disk.corrupt == 1 and disk.objects == 0
    assert not meta_path.exists() and not body_path.exists()


async def test_a_range_reads_and_checks_only_its_own_blocks(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    body = body_of(3 * BLOCK_SIZE, 8)
    assert await put(disk, "k", body)
    flip_byte(entry_paths(directory, "k")[1], 10)               # block 0
    hit = await disk.get("k")
    start, end = 2 * BLOCK_SIZE + 5, 2 * BLOCK_SIZE + 4000
    assert b"".join([p async for p in hit.chunks(64 * KiB, start, end)]) == body[start:end]
    with pytest.raises(CorruptEntry):
        await read_all(hit)


async def test_a_meta_changed_but_still_json_is_a_miss_and_removed(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    assert await put(disk, "k", b"body")
    meta_path, body_path = entry_paths(directory, "k")
    raw = meta_path.read_bytes()
    meta_path.write_bytes(raw.replace(b"application/javascript", b"application/javascripu"))
    assert await disk.get("k") is None
    assert disk.corrupt == 1 and not meta_path.exists() and not body_path.exists()


async def test_entries_of_the_previous_format_are_dropped_at_start(tmp_path, open_disk):
    """Format 1 had no checksums: nothing in it can be trusted, so a restart starts without it."""
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    assert await put(disk, "k", b"old body")
    await disk.close()
    meta_path, body_path = entry_paths(directory, "k")
    record = read_meta_record(meta_path)
    record["format"] = 1
    del record["sums"], record["block"]
    meta_path.write_bytes(json.dumps(record).encode())          # as format 1 wrote it
    again = await open_disk(directory)
    assert again.objects == 0 and again.corrupt == 1
    assert await again.get("k") is None and not body_path.exists()


# ---------------------------------------------------------------------------- tags and soft purge marks

def tagged_meta(body: bytes, tags: str, **kw) -> Meta:
    return make_meta(body, extra=(("Surrogate-Key", tags), ("Cache-Tag", "shared")), **kw)


async def test_disk_tag_index_follows_stores_updates_deletes_evictions_and_restarts(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory, max_bytes=350 * KiB)       # three entries fit, not four
    body = body_of(100 * KiB, 1)
    for key, tags in (("a", "p1 p2"), ("b", "p2"), ("c", "p3")):
        assert await put(disk, key, body, meta=tagged_meta(body, tags))
    assert sorted(disk.keys_with_tag("p2")) == ["a", "b"]
    assert sorted(disk.keys_with_tag("shared")) == ["a", "b", "c"]
    # A 304 may change the tags: the index follows the rewritten meta.
    assert await disk.update_meta("b", tagged_meta(body, "p4"))
    assert disk.keys_with_tag("p2") == ["a"] and disk.keys_with_tag("p4") == ["b"]
    assert await disk.delete("a")
    assert disk.keys_with_tag("p1") == [] and "p1" not in getattr(disk._index, "_tagged", {})
    assert await put(disk, "d", body, meta=tagged_meta(body, "p5"))
    assert await put(disk, "e", body, meta=tagged_meta(body, "p5"))     # over budget: "c" is evicted
    assert disk.keys() == ["b", "d", "e"]
    assert disk.keys_with_tag("p3") == [] and sorted(disk.keys_with_tag("p5")) == ["d", "e"]
    await disk.close()
    again = await open_disk(directory, max_bytes=350 * KiB)             # rebuilt from the files
    assert sorted(again.keys_with_tag("shared")) == sorted(again.keys()) == ["b", "d", "e"]
    assert again.keys_with_tag("p4") == ["b"] and again.index_complete


async def test_stale_at_is_kept_on_disk_and_read_back(tmp_path, open_disk):
    directory = tmp_path / "cache"
    disk = await open_disk(directory)
    body = body_of(KiB, 2)
    meta = make_meta(body)
    assert await put(disk, "k", body, meta=meta)
    marked = replace(meta, stale_at=1_700_000_100.5)
    assert await disk.update_meta("k", marked, replacing=meta)
    await disk.close()
    again = await open_disk(directory)
    assert (await again.get("k")).meta.stale_at == 1_700_000_100.5
    record = read_meta_record(entry_paths(directory, "k")[0])
    assert record["stale_at"] == 1_700_000_100.5


@pytest.mark.parametrize("tier", ["memory", "disk", "tiered"])
async def test_update_meta_replacing_changes_only_the_version_read(tmp_path, open_disk, tier):
    if tier == "memory":
        store = MemoryStore(MiB, MiB)
    elif tier == "disk":
        store = await open_disk()
    else:
        store = TieredStore(MemoryStore(MiB, MiB), await open_disk())
    body = body_of(KiB, 3)
    old, new = make_meta(body, url="old"), make_meta(body, url="new")
    assert await put(store, "k", body, meta=old)
    assert await put(store, "k", body, meta=new)          # replaced, same size
    if tier == "tiered":
        await store.settled()
    assert not await store.update_meta("k", replace(old, stale_at=5.0), replacing=old)
    assert (await store.get("k")).meta == new
    assert await store.update_meta("k", replace(new, stale_at=5.0), replacing=new)
    assert (await store.get("k")).meta.stale_at == 5.0
    if tier == "tiered":
        assert (await store.disk.get("k")).meta.stale_at == 5.0


@pytest.mark.parametrize("kind", ["memory", "disk", "tiered"])
async def test_a_delete_of_one_version_keeps_a_newer_copy(open_disk, kind):
    """A purge's lurker deletes the version it judged; a refill stored meanwhile stays."""
    if kind == "memory":
        store = MemoryStore(4 * MiB, MiB)
    elif kind == "disk":
        store = await open_disk()
    else:
        store = TieredStore(MemoryStore(4 * MiB, MiB), await open_disk())
    old_body, new_body = body_of(2000, 1), body_of(2000, 2)
    old = make_meta(old_body)
    assert await put(store, "k", old_body, meta=old)
    new = replace(make_meta(new_body), request_time=old.request_time + 5, response_time=old.response_time + 5)
    assert await put(store, "k", new_body, meta=new)
    if kind == "tiered":
        await store.settled("k")
    assert not await store.delete("k", only=old)
    assert await read_all(await store.get("k")) == new_body
    assert await store.delete("k", only=new)
    assert await store.get("k") is None


# ---------------------------------------------------------------------------- shared index (workers)

@pytest.fixture
async def two_workers(tmp_path):
    """Two disk stores on one directory and one LMDB index, as two workers of a node have them:
    the first made the index fresh and rebuilds it (the node's main process does this), the
    second attaches and waits for it."""
    directory = tmp_path / "cache"
    made: list[DiskStore] = []

    async def make(max_bytes: int = 64 * MiB, prefill: dict[str, bytes] | None = None
                   ) -> tuple[DiskStore, DiskStore]:
        if prefill:
            seed = DiskStore(directory, max_bytes)
            await seed.start()
            for key, body in prefill.items():
                assert await put(seed, key, body)
            await seed.close()
        # LMDB opens an environment once per process: the two stores share the handle here
        # (tests/test_workers.py has the real thing, two processes).
        index = SharedIndex(directory / "index.lmdb", map_size_for(max_bytes), fresh=True)
        first = DiskStore(directory, max_bytes, index=index, run_token="run1")
        second = DiskStore(directory, max_bytes, index=index, rebuild=False, run_token="run1")
        made.extend((first, second))
        await first.start()
        await second.start()
        await asyncio.wait_for(first.rebuilt.wait(), 5)
        await asyncio.wait_for(second.rebuilt.wait(), 5)
        return first, second

    yield make
    for store in made:
        await store.close()


async def test_shared_index_an_object_stored_by_one_worker_is_found_by_the_other(two_workers):
    a, b = await two_workers()
    body = body_of(3 * KiB, 1)
    assert await put(a, "k", body)
    hit = await b.get("k")
    assert hit is not None and await read_all(hit) == body
    assert b.objects == a.objects == 1 and b.bytes == a.bytes > len(body)
    assert await b.delete("k")
    assert await a.get("k") is None and a.objects == 0 and a.bytes == 0


async def test_shared_index_holds_the_byte_limit_for_the_node_and_evicts_least_recently_used(tmp_path, two_workers):
    body = body_of(10 * KiB, 2)
    charge = len(body) + len(make_meta(body).to_json()) + 400       # about: the meta file is a little longer
    a, b = await two_workers(max_bytes=4 * charge)
    assert await put(a, "one", body) and await put(b, "two", body) and await put(a, "three", body)
    assert await b.get("one") is not None                              # "two" is now the oldest
    assert await put(b, "four", body) and await put(a, "five", body)   # over budget: evict
    assert a.bytes <= a.max_bytes and a.bytes == b.bytes
    assert "two" not in a.keys() and sorted(a.keys()) == sorted(b.keys())
    assert a.evictions == b.evictions >= 1
    directory = tmp_path / "cache"
    assert len(files_under(directory)) == 2 * a.objects           # evicted entries' files are gone
    assert a.bytes == sum((directory / name).stat().st_size for name in files_under(directory))


async def test_shared_index_is_rebuilt_once_from_the_files_and_the_other_worker_waits_for_it(two_workers):
    bodies = {f"k{i}": body_of(KiB, i) for i in range(5)}
    a, b = await two_workers(prefill=bodies)
    assert a.index_complete and b.index_complete
    assert sorted(b.keys()) == sorted(bodies)
    assert await read_all(await b.get("k3")) == bodies["k3"]
    assert b.keys_with_tag("nope") == []


async def test_shared_index_a_worker_does_not_delete_the_temp_files_of_the_others(tmp_path, two_workers):
    a, b = await two_workers()
    writer = b.writer("big", size_hint=None)
    await writer.write(b"x" * (SMALL_BODY + 1))            # on disk, in a temp file, mid-fill
    other = DiskStore(tmp_path / "cache", 64 * MiB, run_token="run1")    # another process of the run
    await other.start()                                     # a rebuild by the same run spares it
    await asyncio.wait_for(other.rebuilt.wait(), 5)
    await writer.write(b"y")
    assert await writer.commit(make_meta(b"x" * (SMALL_BODY + 1) + b"y"))
    await other.close()
