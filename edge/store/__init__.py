"""Cache storage: a memory LRU, a disk LRU, and the two stacked (see base.Store)."""

from __future__ import annotations

from edge.store.base import DEFAULT_CHUNK_SIZE, CachedObject, CorruptEntry, Meta, Store, Writer
from edge.store.disk import DiskObject, DiskStore, DiskWriter, key_hash
from edge.store.memory import ENTRY_BASE, MemoryStore, MemoryWriter, entry_charge
from edge.store.tiered import TieredStore, TieredWriter

__all__ = [
    "DEFAULT_CHUNK_SIZE", "CachedObject", "CorruptEntry", "Meta", "Store", "Writer",
    "DiskObject", "DiskStore", "DiskWriter", "key_hash",
    "ENTRY_BASE", "MemoryStore", "MemoryWriter", "entry_charge",
    "TieredStore", "TieredWriter",
]
