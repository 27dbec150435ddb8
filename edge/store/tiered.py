"""Memory in front of disk, offered to the proxy as one store.

Reads try memory, then disk; a disk hit small enough for memory is promoted.
Writes go to both tiers at once; the memory writer drops out by itself when
a body outgrows its object limit, so a large object streams only to disk and
is never held whole in memory.  After every commit each tier holds either
the new version or nothing: an old version left in one tier would otherwise
be served in place of the new one.

A commit the memory tier accepted returns at once (within the bound below)
and finishes on disk in the background (write-behind): the disk install is a thread hop that cost
about a millisecond of every miss.  Until it lands, reads of that key do not
fall through to the disk (which may still hold an older version) before it
has, and ``update_meta``/``delete`` of the key wait for it; ``close`` and ``settled``
wait for all of them.

Write-behind is bounded: while more than :data:`WRITE_BEHIND_MAX` installs
(or :data:`WRITE_BEHIND_MAX_BYTES` of bodies) are on their way to disk, a
commit returns only when an install has landed (first come, first served),
so under a miss load the disk cannot keep up with, fills slow down to the
disk's pace instead of queueing without end.  Unbounded, the queue held
about 10 KiB per entry (body, meta, tasks, file names, lock waiters) and
grew past 16,000 entries in 100,000 1 KiB misses (README, "What memory
holds").
"""

from __future__ import annotations

import asyncio
import collections
import logging

from edge.store.base import CachedObject, CorruptEntry, Meta, same_version
from edge.store.disk import DiskStore, DiskWriter
from edge.store.memory import MemoryStore, MemoryWriter

log = logging.getLogger("edge.store.tiered")

WRITE_BEHIND_MAX = 1024                 # disk installs a commit may leave behind it
WRITE_BEHIND_MAX_BYTES = 8 * 2**20      # ... and the bodies they hold


class TieredStore:
    name = "tiered"

    def __init__(self, memory: MemoryStore, disk: DiskStore):
        self.memory = memory
        self.disk = disk
        # The front's hit path: straight to the memory tier, one call fewer per hit.
        self.in_memory = memory.in_memory
        # Keys being promoted from disk, each with the token of its promoter.
        # Any change to a key removes it, which tells the promoter that what it
        # read is outdated and must not be copied into memory.
        self._promotions: dict[str, object] = {}
        # Keys whose newest version is in memory and still on its way to disk.
        self._disk_pending: dict[str, asyncio.Task[bool]] = {}
        # Every install under way (a key may have several, in order), their body
        # bytes, and the commits waiting for the queue to shrink, oldest first.
        self.behind = 0
        self.behind_bytes = 0
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()

    async def _room_behind(self) -> None:
        """Wait while more installs (or body bytes) than the bounds allow are on their way to disk."""
        while self.behind > WRITE_BEHIND_MAX or self.behind_bytes > WRITE_BEHIND_MAX_BYTES:
            waiter = asyncio.get_running_loop().create_future()
            self._waiting.append(waiter)
            await waiter        # one waiter is woken per install that lands

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():       # a cancelled waiter is skipped
                waiter.set_result(None)
                return

    async def start(self) -> None:
        await self.memory.start()
        await self.disk.start()

    async def close(self) -> None:
        await self.settled()
        await self.disk.close()
        await self.memory.close()

    async def settled(self, key: str | None = None) -> None:
        """Wait until the background disk writes (of `key`, or all) have landed."""
        while True:         # a write may be queued behind the ones awaited: look again
            if key is None:
                pending = list(self._disk_pending.values())
            else:
                pending = [self._disk_pending[key]] if key in self._disk_pending else []
            if not pending:
                return
            await asyncio.gather(*pending, return_exceptions=True)

    def _to_disk(self, key: str, commit_disk, meta: Meta) -> asyncio.Task[bool]:
        """Run a disk commit of `key` after the ones already under way for it, in commit order.

        Without the order, an older version whose install started late could
        land on disk after a newer one.
        """
        prior = self._disk_pending.get(key)

        async def in_order() -> bool:
            if prior is not None:
                await asyncio.gather(prior, return_exceptions=True)
            return await commit_disk(meta)

        task = asyncio.ensure_future(in_order())
        self._disk_pending[key] = task
        self.behind += 1
        self.behind_bytes += meta.size

        def landed(done: asyncio.Task) -> None:
            self.behind -= 1
            self.behind_bytes -= meta.size
            self._wake_one()
            if self._disk_pending.get(key) is done:
                del self._disk_pending[key]
            if not done.cancelled() and done.exception() is not None:
                log.warning("tiered store: background disk write of %.120s failed: %r", key, done.exception())

        task.add_done_callback(landed)
        return task

    async def get(self, key: str) -> CachedObject | None:
        hit = self.memory.in_memory(key)
        if hit is not None:
            return hit
        if key in self._disk_pending:
            # Evicted from memory before it reached disk: wait for it rather
            # than read the older version the disk may still hold.
            await self.settled(key)
        hit = await self.disk.get(key)
        if hit is None or not self.memory.fits(hit.meta.size):
            return hit
        token = object()
        self._promotions[key] = token
        try:
            body = b"".join([chunk async for chunk in hit.chunks()])
        except CorruptEntry:
            # Broken (the disk store dropped it) or replaced since the lookup:
            # look once more, without promoting, so a new version still serves.
            return await self.memory.get(key) or await self.disk.get(key)
        finally:
            still_current = self._promotions.get(key) is token
            if still_current:
                del self._promotions[key]
        if still_current:
            self.memory.put(key, hit.meta, body)
        return CachedObject(hit.meta, body)

    def writer(self, key: str, size_hint: int | None = None) -> TieredWriter:
        return TieredWriter(self, key, size_hint)

    # Disk first, then memory: a promotion that read the old version before
    # the disk changed is cancelled (its token popped) or overwritten after.

    async def update_meta(self, key: str, meta: Meta, replacing: Meta | None = None) -> bool:
        await self.settled(key)
        on_disk = await self.disk.update_meta(key, meta, replacing)
        self._promotions.pop(key, None)
        in_memory = await self.memory.update_meta(key, meta, replacing)
        return in_memory or on_disk

    async def delete(self, key: str, only: Meta | None = None) -> bool:
        await self.settled(key)
        held = self.memory.peek(key) if only is not None else None
        if held is not None and not same_version(held.meta, only):
            return False                         # memory holds a newer copy: it stays, in both tiers
        on_disk = await self.disk.delete(key, only)
        self._promotions.pop(key, None)
        # A copy stored while the disk was busy is newer than `only`: memory.delete keeps it.
        in_memory = await self.memory.delete(key, only)
        return in_memory or on_disk

    def tiers(self) -> list[MemoryStore | DiskStore]:
        return [self.memory, self.disk]

    # Totals over both tiers (an object in both counts twice); per-tier
    # figures come from tiers().
    @property
    def objects(self) -> int:
        return self.memory.objects + self.disk.objects

    @property
    def evictions(self) -> int:
        return self.memory.evictions + self.disk.evictions

    @property
    def bytes(self) -> int:
        return self.memory.bytes + self.disk.bytes


class TieredWriter:
    """Tees one body into the memory and the disk writer."""

    def __init__(self, store: TieredStore, key: str, size_hint: int | None):
        self._store = store
        self._key = key
        self.memory: MemoryWriter = store.memory.writer(key, size_hint)
        self.disk: DiskWriter | None = store.disk.writer(key, size_hint)

    async def write(self, chunk: bytes) -> None:
        await self.memory.write(chunk)
        if self.disk is not None:
            try:
                await self.disk.write(chunk)
            except Exception as exc:     # the disk tier must never fail the response
                await self._drop_disk(exc)

    async def commit(self, meta: Meta) -> bool:
        store = self._store
        store._promotions.pop(self._key, None)
        in_memory = await self.memory.commit(meta)
        on_disk = store._to_disk(self._key, self._commit_disk, meta)
        if not in_memory:
            return await asyncio.shield(on_disk)    # a caller that goes away must not cancel the install
        await store._room_behind()  # written behind, once the queue is within its bounds
        return True

    async def _commit_disk(self, meta: Meta) -> bool:
        store = self._store
        on_disk = False
        if self.disk is not None:
            try:
                on_disk = await self.disk.commit(meta)
            except Exception as exc:
                await self._drop_disk(exc)
        if not on_disk:
            await self._forget_on_disk()   # an older version there must not resurface
        # A promotion that read the old disk version while the disk commit ran
        # must not land; one that already landed is removed.
        store._promotions.pop(self._key, None)
        held = store.memory.peek(self._key)
        pending = store._disk_pending.get(self._key)
        newer_commit = pending is not None and pending is not asyncio.current_task()
        if held is not None and held.meta is not meta and not newer_commit:
            await store.memory.delete(self._key)
        return on_disk

    async def abort(self) -> None:
        await self.memory.abort()
        if self.disk is not None:
            try:
                await self.disk.abort()
            except Exception as exc:
                log.warning("tiered store: aborting the disk writer of %.120s failed: %s", self._key, exc)
            self.disk = None

    async def _drop_disk(self, exc: Exception) -> None:
        log.warning("tiered store: disk write of %.120s failed, serving without storing it: %r",
                    self._key, exc)
        disk, self.disk = self.disk, None
        if disk is not None:
            try:
                await disk.abort()
            except Exception as abort_exc:
                log.warning("tiered store: aborting the disk writer failed too: %r", abort_exc)

    async def _forget_on_disk(self) -> None:
        try:
            await self._store.disk.delete(self._key)
        except Exception as exc:
            log.warning("tiered store: cannot remove the old disk entry of %.120s: %r", self._key, exc)
