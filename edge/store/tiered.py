"""Memory in front of disk, offered to the proxy as one store.

Reads try memory, then disk; a disk hit small enough for memory is promoted.
Writes go to both tiers at once; the memory writer drops out by itself when
a body outgrows its object limit, so a large object streams only to disk and
is never held whole in memory.  After every commit each tier holds either
the new version or nothing: an old version left in one tier would otherwise
be served in place of the new one.
"""

from __future__ import annotations

import logging

from edge.store.base import CachedObject, CorruptEntry, Meta
from edge.store.disk import DiskStore, DiskWriter
from edge.store.memory import MemoryStore, MemoryWriter

log = logging.getLogger("edge.store.tiered")


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

    async def start(self) -> None:
        await self.memory.start()
        await self.disk.start()

    async def close(self) -> None:
        await self.disk.close()
        await self.memory.close()

    async def get(self, key: str) -> CachedObject | None:
        hit = self.memory.in_memory(key)
        if hit is not None:
            return hit
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

    async def update_meta(self, key: str, meta: Meta) -> bool:
        on_disk = await self.disk.update_meta(key, meta)
        self._promotions.pop(key, None)
        in_memory = await self.memory.update_meta(key, meta)
        return in_memory or on_disk

    async def delete(self, key: str) -> bool:
        on_disk = await self.disk.delete(key)
        self._promotions.pop(key, None)
        in_memory = await self.memory.delete(key)
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
        if held is not None and held.meta is not meta:
            await store.memory.delete(self._key)
        return in_memory or on_disk

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
