"""The memory tier: an LRU of whole responses, bounded in bytes of RAM.

Each entry is charged what it really holds on the heap (:func:`entry_charge`),
not only its body: for a 1 KiB response the body is less than a fifth of
it.  An entry keeps its key, a :class:`CachedObject`, the :class:`Meta`
(header tuples, timing), the body, cachetools' three per-key slots (value,
size and LRU order) and, once it has been hit, what the hit path keeps with
it: the header fields as a case-insensitive multidict, the policy's
assessment and the pre-serialised header block (``Meta.memo``).  The charge
counts all of that from the start, so ``memory_size`` bounds the heap the
tier holds however many of its entries get hit.  Objects above
``max_object_bytes`` are never buffered whole: the writer drops its buffer
as soon as the body outgrows the limit (the disk tier takes them).
"""

from __future__ import annotations

from cachetools import Cache, LRUCache

from edge.store.base import CachedObject, Meta, same_version

# What an entry costs in RSS apart from its body, key, URL and header fields,
# measured on CPython 3.11 (64-bit) with ``python -m benchmarks.entrycost``
# (README, "What memory holds"): the CachedObject, the Meta and its dict, the
# two times and the size, the LRU's three slots, the multidict, memo dict,
# assessment and the constant part of the header block that a hit builds, and
# the allocator's rounding (the body's included).
ENTRY_BASE = 1824
# Per header field: the (name, value) tuple, the name (an ``istr``, as the
# upstream response's multidict made it, with its lower-cased form) and the
# value, the item in the multidict a hit builds, the block's ": " and CRLF.
FIELD_BASE = 280
# Each byte of a field: a name is held three times (the istr, its lower-cased
# form, the header block), a value twice (its string, the header block), and
# the allocator's size classes round long values up by about as much again.
FIELD_BYTE = 3


def entry_charge(key: str, meta: Meta) -> int:
    """The bytes of RAM an entry for `key` with `meta` (and its body) holds, hit or not.

    0-3% above the RSS growth per entry measured for the shapes
    ``benchmarks/entrycost.py`` stores (bodies of 0 to 64 KiB, 2 to 20
    fields); about 0.6 us per store of a 10-field response, nothing per hit.
    """
    field_bytes = 0
    for name, value in meta.headers:
        field_bytes += len(name) + len(value)
    return (ENTRY_BASE + meta.size + len(key) + len(meta.url) + FIELD_BASE * len(meta.headers)
            + FIELD_BYTE * field_bytes)


class _Held(CachedObject):
    """A memory-tier entry: the object and the charge it was admitted with."""

    __slots__ = ("charge",)

    def __init__(self, meta: Meta, body: bytes, charge: int):
        super().__init__(meta, body)
        self.charge = charge


def _charge(obj: _Held) -> int:
    return obj.charge


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
        """Could a body of `size` bytes be held (before its key and fields are known)?"""
        return size <= self.max_object_bytes and size + ENTRY_BASE <= self.max_bytes

    def put(self, key: str, meta: Meta, body: bytes) -> bool:
        """Store a whole body at once (disk-hit promotion, tests).

        A body that does not fit also drops the key's previous version: it is
        superseded and must not be served in place of the new one.
        """
        if len(body) != meta.size or not self.fits(meta.size):
            self._cache.pop(key, None)
            return False
        try:
            self._cache[key] = _Held(meta, body, entry_charge(key, meta))
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
        try:
            # New fields, a new charge: cachetools evicts others if it grew.
            self._cache[key] = _Held(meta, current.body, entry_charge(key, meta))
        except ValueError:              # now larger than the whole tier
            self._cache.pop(key, None)
            return False
        return True

    async def delete(self, key: str, only: Meta | None = None) -> bool:
        if only is not None:
            current = self.peek(key)
            if current is not None and not same_version(current.meta, only):
                return False
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
