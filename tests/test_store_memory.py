"""What the memory tier charges, what it holds, and the bound on the disk writes behind it.

The charges are checked against the RAM per entry measured by
``python -m benchmarks.entrycost`` (CPython 3.11, 64-bit: RSS growth per
entry, stored and hit once, in a fresh interpreter); the figures are in the
tables below.  Nothing here measures memory: the measuring is the
benchmark's, these tests pin the accounting to its results.
"""

from __future__ import annotations

import asyncio

import pytest

from benchmarks import entrycost
from edge.store import memory as memory_module
from edge.store import tiered as tiered_module
from edge.store import MemoryStore, Meta, TieredStore, entry_charge
from edge.store.memory import ENTRY_BASE, FIELD_BASE, FIELD_BYTE

KiB = 1024
MiB = 1024 * KiB

# (shape in benchmarks.entrycost.SHAPES, RSS bytes per entry measured by benchmarks.entrycost)
MEASURED = [
    ("1 KiB from nginx, 7 fields", 5457),
    ("1 KiB behind an L2, 10 fields", 6461),
    ("empty body, 2 fields", 2614),
    ("1 KiB, 20 fields, 50-byte values", 11603),
    ("1 KiB, 10 fields, 200-byte path", 6814),
    ("64 KiB behind an L2, 10 fields", 70989),
]


def shape(name: str) -> entrycost.Shape:
    return next(s for s in entrycost.SHAPES if s.name == name)


def charged_per_entry(name: str, count: int = 50) -> float:
    """What the tier charges entries of a shape, stored as the proxy stores them and hit once."""
    entries = entrycost.MemoryFill(shape(name))
    entries.fill(count)
    before = entries.store.bytes
    entries.hit_all()
    assert entries.store.bytes == before        # a hit never changes the charge: it was counted up front
    return before / count


def test_every_measured_shape_is_in_the_table():
    assert {name for name, _ in MEASURED} == {s.name for s in entrycost.SHAPES}


@pytest.mark.parametrize("name, measured", MEASURED)
def test_an_entry_is_charged_its_measured_ram_or_up_to_ten_percent_more(name, measured):
    charged = charged_per_entry(name)
    assert measured <= charged <= 1.10 * measured, (
        f"{name}: charged {charged:.0f} B against {measured} B measured; re-measure with "
        "python -m benchmarks.entrycost and adjust the constants of edge/store/memory.py")


def meta(fields: tuple[tuple[str, str], ...], size: int, url: str = "") -> Meta:
    return Meta(status=200, headers=fields, request_time=0.0, response_time=0.0, size=size, url=url)


@pytest.mark.parametrize("key, fields, size, url, expected", [
    ("k", (), 0, "", ENTRY_BASE + 1),
    ("k", (), 1024, "", ENTRY_BASE + 1 + 1024),
    ("ten-chars!", (), 0, "h/u", ENTRY_BASE + 10 + 3),
    ("k", (("A", "b"),), 0, "", ENTRY_BASE + 1 + FIELD_BASE + 2 * FIELD_BYTE),
    ("k", (("Age", "0"), ("Age", "1")), 5, "", ENTRY_BASE + 1 + 5 + 2 * FIELD_BASE + 8 * FIELD_BYTE),
])
def test_entry_charge_adds_up_its_parts(key, fields, size, url, expected):
    assert entry_charge(key, meta(fields, size, url)) == expected


# (entries the tier can hold, entries stored): the tier keeps the most recent ones and
# never charges more than its size.
@pytest.mark.parametrize("fit, stored", [(1, 1), (1, 5), (10, 10), (10, 11), (100, 250)])
async def test_the_tier_evicts_once_the_charged_total_would_exceed_its_size(fit, stored):
    fields = (("Content-Type", "text/plain"), ("Cache-Control", "max-age=60"))
    charge = entry_charge("k000", meta(fields, KiB, "u000"))
    memory = MemoryStore(max_bytes=fit * charge + charge - 1, max_object_bytes=MiB)   # one short of fit + 1
    for i in range(stored):
        assert memory.put(f"k{i:03d}", meta(fields, KiB, f"u{i:03d}"), bytes(KiB))
    assert memory.objects == min(fit, stored)
    assert memory.bytes == memory.objects * charge <= memory.max_bytes
    assert memory.evictions == max(0, stored - fit)
    assert memory.keys() == [f"k{i:03d}" for i in range(max(0, stored - fit), stored)]


@pytest.mark.parametrize("size_name", ["1 KiB behind an L2, 10 fields", "1 KiB from nginx, 7 fields"])
def test_64_mib_holds_what_its_entries_really_cost_not_64_mib_of_bodies(size_name):
    count = 30_000              # more than 64 MiB holds of either shape
    entries = entrycost.MemoryFill(shape(size_name))
    entries.store = MemoryStore(max_bytes=64 * MiB, max_object_bytes=MiB)
    entries.node.store = entries.store
    entries.fill(count)
    per_entry = dict(MEASURED)[size_name]
    assert entries.store.bytes <= 64 * MiB
    # Within the charge's margin of what 64 MiB of measured entries is; the old
    # accounting (body + 1 KiB) let 32,768 entries in.
    assert 64 * MiB / (1.10 * per_entry) <= entries.store.objects <= 64 * MiB / per_entry


async def test_update_meta_recharges_the_entry_and_evicts_if_it_grew():
    small = (("A", "b"),)
    large = small + (("X-Long", "v" * 500),)
    charge_small = entry_charge("k1", meta(small, 10))
    grown = entry_charge("k1", meta(large, 10)) - charge_small
    assert grown == FIELD_BASE + FIELD_BYTE * (6 + 500)
    memory = MemoryStore(max_bytes=2 * charge_small + grown // 2, max_object_bytes=MiB)
    assert memory.put("k0", meta(small, 10), bytes(10))
    assert memory.put("k1", meta(small, 10), bytes(10))
    assert memory.bytes == 2 * charge_small
    assert await memory.update_meta("k1", meta(large, 10))
    assert memory.keys() == ["k1"] and memory.evictions == 1          # k0 made room
    assert memory.bytes == charge_small + grown
    assert await memory.update_meta("k1", meta(small, 10))
    assert memory.bytes == charge_small


def test_an_object_whose_fields_do_not_fit_is_refused_and_drops_the_old_version():
    fields = tuple((f"X-{i}", "v" * 100) for i in range(10))
    memory = MemoryStore(max_bytes=ENTRY_BASE + 2 * KiB, max_object_bytes=MiB)
    assert memory.fits(KiB)                                  # the body alone would fit
    assert memory.put("k", meta((), KiB), bytes(KiB))
    assert not memory.put("k", meta(fields, KiB), bytes(KiB))     # its fields do not
    assert memory.objects == 0 and memory.bytes == 0


def test_the_charge_constants_are_what_the_module_documents():
    # The module docstring and README quote these; a change must update both.
    assert (memory_module.ENTRY_BASE, memory_module.FIELD_BASE, memory_module.FIELD_BYTE) == (1824, 280, 3)


# ---------------------------------------------------------------------------- write-behind bound

class GatedDisk:
    """A disk tier whose installs wait for the test to let them land, one at a time, in order."""

    name = "disk"

    def __init__(self) -> None:
        self.gate = asyncio.Semaphore(0)
        self.landed = 0

    def writer(self, key: str, size_hint: int | None = None) -> GatedWriter:
        return GatedWriter(self)

    async def delete(self, key: str) -> bool:
        return False

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class GatedWriter:
    def __init__(self, disk: GatedDisk) -> None:
        self.disk = disk

    async def write(self, chunk: bytes) -> None: ...

    async def commit(self, meta: Meta) -> bool:
        await self.disk.gate.acquire()
        self.disk.landed += 1
        return True

    async def abort(self) -> None: ...


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# (entries bound, bytes bound, body sizes committed at once, commits returned after 0, 1, 2, ...
# installs have landed).  A commit returns once at most the bounds' worth of installs, its own
# included, are on their way; each landing wakes one waiting commit.
@pytest.mark.parametrize("max_entries, max_bytes, sizes, returned", [
    (8, 1 * MiB, [100] * 5, [5]),                       # within both bounds: all written behind
    (2, 1 * MiB, [100] * 5, [2, 2, 2, 3, 4, 5]),        # three too many: they wait for three landings
    (8, 2500, [1000] * 5, [2, 2, 2, 3, 4, 5]),          # the bytes bound, the same way
    (8, 500, [1000], [0, 1]),                           # larger than the bound: waits for its own install
])
async def test_write_behind_is_bounded_and_commits_wait_for_room(monkeypatch, max_entries, max_bytes, sizes,
                                                                 returned):
    monkeypatch.setattr(tiered_module, "WRITE_BEHIND_MAX", max_entries)
    monkeypatch.setattr(tiered_module, "WRITE_BEHIND_MAX_BYTES", max_bytes)
    disk = GatedDisk()
    store = TieredStore(MemoryStore(max_bytes=64 * MiB, max_object_bytes=MiB), disk)

    async def commit(i: int, size: int) -> bool:
        writer = store.writer(f"k{i}", size_hint=size)
        await writer.write(bytes(size))
        return await writer.commit(meta((), size))

    commits = [asyncio.create_task(commit(i, size)) for i, size in enumerate(sizes)]
    await settle()
    for landings, expected in enumerate(returned):
        if landings:
            disk.gate.release()
            await settle()
        assert disk.landed == landings
        assert sum(task.done() for task in commits) == expected
        assert store.behind == len(sizes) - landings
    assert all(task.result() for task in commits if task.done())
    for _ in sizes:
        disk.gate.release()
    await asyncio.gather(*commits)
    await store.settled()
    assert (store.behind, store.behind_bytes) == (0, 0)


async def test_a_cancelled_waiting_commit_does_not_hold_up_the_others(monkeypatch):
    monkeypatch.setattr(tiered_module, "WRITE_BEHIND_MAX", 1)
    disk = GatedDisk()
    store = TieredStore(MemoryStore(max_bytes=64 * MiB, max_object_bytes=MiB), disk)

    async def commit(key: str) -> bool:
        writer = store.writer(key, size_hint=1)
        await writer.write(b"x")
        return await writer.commit(meta((), 1))

    first = asyncio.create_task(commit("a"))
    waiting = [asyncio.create_task(commit(key)) for key in ("b", "c")]
    await settle()
    assert first.done() and not any(task.done() for task in waiting)
    waiting[0].cancel()
    disk.gate.release()                 # a and b land: c's turn, though b's committer went away
    disk.gate.release()
    await settle()
    assert waiting[1].done() and waiting[1].result()
    assert store.memory.peek("b") is not None     # b was stored all the same; only its caller left
    disk.gate.release()
    await store.settled()
    assert store.behind == 0


# ---------------------------------------------------------------------------- the hit path's Host memo

@pytest.mark.parametrize("host, remembered", [
    (b"mem.example.com", True),
    (b"MEM.Example.com:8080", True),                    # a known site, another spelling
    (b"unknown.example.net", True),                     # unknown hosts are remembered as such
    (b"a" * 300, True),                                 # a DNS name and a port fit
    (b"a" * 301, False),
    (b"mem.example.com" + b" " * 32_000, False),        # up to max_header_bytes could come in
])
def test_the_host_memo_keeps_only_host_values_of_a_plausible_length(host, remembered):
    from edge.proxy import KNOWN_HOST_BYTES_MAX
    node = entrycost.MemoryFill(shape("empty body, 2 fields")).node
    before = set(node._sites_by_raw_host)
    node.hit_now("GET", "/x", host, None)
    assert (host in node._sites_by_raw_host) is remembered
    assert all(len(h) <= KNOWN_HOST_BYTES_MAX for h in node._sites_by_raw_host)
    assert set(node._sites_by_raw_host) - before == ({host} - before if remembered else set())


def test_the_host_memo_is_bounded_in_entries(monkeypatch):
    from edge import proxy
    monkeypatch.setattr(proxy, "KNOWN_HOSTS_MAX", 50)
    node = entrycost.MemoryFill(shape("empty body, 2 fields")).node
    for port in range(200):
        node.hit_now("GET", "/x", b"mem.example.com:%d" % port, None)
    assert len(node._sites_by_raw_host) == 50


@pytest.mark.parametrize("via, remembered", [
    (b"1.1 l2-a", True),
    (b"1.1 proxy.example.net, 1.1 other", True),
    (b"1.1 x" + b" " * 400, False),                     # up to max_header_bytes could come in
])
def test_the_via_memo_keeps_only_via_values_of_a_plausible_length(via, remembered):
    from edge.proxy import KNOWN_VIA_BYTES_MAX
    node = entrycost.MemoryFill(shape("empty body, 2 fields")).node
    node.hit_now("GET", "/x", b"mem.example.com", via)
    assert (via in node._tier_vias) is remembered
    assert all(len(v) <= KNOWN_VIA_BYTES_MAX for v in node._tier_vias)
