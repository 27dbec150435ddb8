"""The memory tier: an LRU of whole responses, bounded in bytes.

Each entry is charged its body length plus :data:`ENTRY_OVERHEAD`, an
estimate of what the key, the header tuples and the Python objects cost, so
that a flood of empty responses is still bounded.  Objects above
``max_object_bytes`` are never buffered whole: the writer drops its buffer
as soon as the body outgrows the limit (the disk tier takes them).
"""

from __future__ import annotations

from cachetools import Cache, LRUCache

from edge.store.base import CachedObject, Meta

# Rough cost of an entry apart from its body: key string, Meta, header tuples,
# dict and LRU-order slots.  Typical responses carry 300-800 bytes of headers.
ENTRY_OVERHEAD = 1024


def _charge(obj: CachedObject) -> int:
    return obj.meta.size + ENTRY_OVERHEAD


class _CountingLRU(LRUCache):
    """cachetools' LRU, counting the entries it pushes out to make room."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize, getsizeof=_charge)
        self.evictions = 0

    def popitem(self):  # cachetools calls this only to make room
        item = super().popitem()
        self.evictions += 1
        return item


class MemoryStore:
    name = "memory"

    def __init__(self, max_bytes: int, max_object_bytes: int):
        if max_bytes < 0 or max_object_bytes < 0:
            raise ValueError("memory store sizes must not be negative")
        self.max_bytes = max_bytes
        self.max_object_bytes = max_object_bytes
        # maxsize 0 would make cachetools refuse everything with ValueError; that
        # is what an empty memory tier means, and put() turns it into False.
        self._cache = _CountingLRU(max_bytes)

    async def start(self) -> None:
        """Nothing to load: memory starts empty."""

    async def close(self) -> None:
        self._cache.clear()

    async def get(self, key: str) -> CachedObject | None:
        return self.in_memory(key)

    def in_memory(self, key: str) -> CachedObject | None:
        """The entry, without awaiting (the front's hit path): a dict lookup plus the LRU move.

        The body is shared, never copied.
        """
        try:
            return self._cache[key]
        except KeyError:
            return None

    def peek(self, key: str) -> CachedObject | None:
        """The entry without touching its LRU position (for status pages and tests)."""
        try:
            return Cache.__getitem__(self._cache, key)     # bypasses LRUCache's reordering
        except KeyError:
            return None

    def fits(self, size: int) -> bool:
        return size <= self.max_object_bytes and size + ENTRY_OVERHEAD <= self.max_bytes

    def put(self, key: str, meta: Meta, body: bytes) -> bool:
        """Store a whole body at once (disk-hit promotion, tests).

        A body that does not fit also drops the key's previous version: it is
        superseded and must not be served in place of the new one.
        """
        if len(body) != meta.size or not self.fits(meta.size):
            self._cache.pop(key, None)
            return False
        try:
            self._cache[key] = CachedObject(meta, body)
        except ValueError:              # larger than the whole tier
            self._cache.pop(key, None)
            return False
        return True

    def writer(self, key: str, size_hint: int | None = None) -> MemoryWriter:
        return MemoryWriter(self, key, size_hint)

    async def update_meta(self, key: str, meta: Meta, replacing: Meta | None = None) -> bool:
        current = self.peek(key)
        if current is None or current.body is None or len(current.body) != meta.size:
            return False
        if replacing is not None and current.meta != replacing:
            return False                # replaced meanwhile: the change was meant for the old version
        self._cache[key] = CachedObject(meta, current.body)    # same charge: no eviction
        return True

    async def delete(self, key: str) -> bool:
        return self._cache.pop(key, None) is not None

    def keys(self) -> list[str]:
        """Keys from least to most recently used (a snapshot, for operators)."""
        return list(self._cache.keys())

    def tiers(self) -> list[MemoryStore]:
        return [self]

    @property
    def objects(self) -> int:
        return len(self._cache)

    @property
    def evictions(self) -> int:
        return self._cache.evictions

    @property
    def bytes(self) -> int:
        return int(self._cache.currsize)


class MemoryWriter:
    """Buffers a body until it outgrows the tier's object limit, then drops it."""

    def __init__(self, store: MemoryStore, key: str, size_hint: int | None):
        self._store = store
        self._key = key
        self._parts: list[bytes] = []
        self.buffered = 0           # bytes held right now (0 once dropped)
        self.written = 0            # bytes offered, held or not
        self.dropped = size_hint is not None and not store.fits(size_hint)
        self._done = False

    async def write(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("write after commit or abort")
        self.written += len(chunk)
        if self.dropped:
            return
        if self.written > self._store.max_object_bytes:
            self.dropped = True
            self._parts.clear()
            self.buffered = 0
            return
        # Copy anything that is not bytes: a memoryview's buffer may be reused.
        self._parts.append(chunk if type(chunk) is bytes else bytes(chunk))
        self.buffered += len(chunk)

    async def commit(self, meta: Meta) -> bool:
        if self._done:
            raise RuntimeError("commit after commit or abort")
        self._done = True
        parts, self._parts, self.buffered = self._parts, [], 0
        if self.dropped or meta.size != self.written:
            # commit means "this response replaces the stored one": never leave
            # the old version behind to be served in its place.
            self._store._cache.pop(self._key, None)
            return False
        return self._store.put(self._key, meta, b"".join(parts))

    async def abort(self) -> None:
        self._done = True
        self._parts.clear()
        self.buffered = 0
