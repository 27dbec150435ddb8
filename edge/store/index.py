"""The disk tier's index: which entries exist, what each is charged, their LRU order and tags.

Two implementations behind one small interface, chosen by how many processes
share the cache directory:

* :class:`LocalIndex`: an ``OrderedDict`` in the process (one worker: exactly
  what the disk tier always had).
* :class:`SharedIndex`: the same facts in an LMDB environment inside the cache
  directory, memory-mapped by every worker of the node, so that an object
  stored by one worker is found by the others, the byte budget and the LRU
  order are the node's, and eviction pops victims in one transaction (two
  workers never evict the same entry, nor both miss the budget).

Why LMDB (the maintained ``lmdb`` binding): readers never lock (MVCC on a
shared mapping: a lookup is about 2 µs, no system call), writers are
serialised across processes by LMDB's own robust mutex (a worker killed
while writing does not wedge the others), and a write transaction here is
about 4 µs, because the environment is opened with ``writemap`` and without
syncs: nothing is flushed per transaction.  The index is not durable and
need not be: the node's main process deletes it at start and rebuilds it
from the files (one scan for the node), as the one-process index is rebuilt.
A write transaction therefore runs on the event loop like the dict update it
replaces; it never does file I/O, so another worker holds the writer mutex
for microseconds at most.

Layout (keys are the raw 32-byte SHA-256 of the cache key; LMDB caps keys at
511 bytes, cache keys can be longer):

* ``entries``: hash -> version, charge, LRU tick, then the cache key and tags
* ``lru``: tick (8 bytes, big-endian, so byte order is age order) -> hash
* ``tags``: 16-byte digest of a tag -> hashes (a dupsort table)
* ``touched``: hashes stored, deleted or evicted while the start-up scan runs
* ``state``: bytes, evictions, the version and tick counters, complete
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
import struct
from collections import OrderedDict
from pathlib import Path

import lmdb


class Entry:
    """What the index knows about an entry: its charge, which version it is, and its tags."""

    __slots__ = ("charge", "version", "tags")

    def __init__(self, charge: int, version: int, tags: tuple[str, ...] = ()):
        self.charge = charge
        self.version = version
        self.tags = tags


# What the start-up scan found: (mtime_ns, key, hash hex, charge, tags).
Found = tuple[int, str, str, int, tuple[str, ...]]


class LocalIndex:
    """The index of a disk tier used by one process: an LRU-ordered dict, oldest first."""

    shared = False

    def __init__(self) -> None:
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        # tag -> keys of the entries carrying it: a purge by tag finds its objects
        # without reading any file (kept in step with the entries).
        self._tagged: dict[str, set[str]] = {}
        self._bytes = 0
        self._evictions = 0
        self._versions = itertools.count(1)
        # Hashes stored, deleted, evicted or adopted since the rebuild began: the
        # scan's view of them may be stale, so the merge must not act on them.
        self._touched: set[str] | None = set()
        self._complete = False

    # ------------------------------------------------------------------ lookups

    def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    def absent(self, key: str) -> bool:
        """Known not to be stored: not indexed, and the index lists everything on disk."""
        return self._complete and key not in self._entries

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    # ------------------------------------------------------------------ changes

    def use(self, key: str) -> None:
        """A hit: the entry becomes the most recently used."""
        if key in self._entries:
            self._entries.move_to_end(key)

    def put(self, key: str, charge: int, tags: tuple[str, ...] = ()) -> Entry:
        """A new version of `key` (stored or adopted), most recently used."""
        self.drop(key)
        entry = self._entries[key] = Entry(charge, next(self._versions), tags)
        self._bytes += charge
        self._tag(key, tags)
        return entry

    def restate(self, key: str, charge: int, tags: tuple[str, ...]) -> None:
        """The same version with a new meta (a 304, a soft purge): new charge and tags, most recently used."""
        entry = self._entries.get(key)
        if entry is None:
            self.put(key, charge, tags)
            return
        self._bytes += charge - entry.charge
        entry.charge = charge
        if entry.tags != tags:          # a 304 may change Surrogate-Key
            self._untag(key, entry.tags)
            entry.tags = tags
            self._tag(key, tags)
        self._entries.move_to_end(key)

    def drop(self, key: str) -> bool:
        old = self._entries.pop(key, None)
        if old is None:
            return False
        self._bytes -= old.charge
        self._untag(key, old.tags)
        return True

    def evict_over(self, max_bytes: int) -> list[str]:
        """Drop least recently used entries until the charges fit `max_bytes`; their keys."""
        victims = []
        while self._bytes > max_bytes and self._entries:
            key, entry = self._entries.popitem(last=False)
            self._bytes -= entry.charge
            self._untag(key, entry.tags)
            self._evictions += 1
            victims.append(key)
        return victims

    def note(self, h: str) -> None:
        """`h` was acted on while the start-up scan may still be running."""
        if self._touched is not None:
            self._touched.add(h)

    def was_touched(self, h: str) -> bool:
        return self._touched is not None and h in self._touched

    def merge(self, found: list[Found], complete: bool) -> None:
        """Add what the scan found, skipping every hash touched since the scan began."""
        touched = self._touched if self._touched is not None else set()
        # Newest first, each pushed to the LRU front: the oldest ends up evicted
        # first, and everything used since start-up stays more recent.
        for _mtime, key, h, charge, tags in sorted(found, reverse=True):
            if h in touched or key in self._entries:
                continue
            self._entries[key] = Entry(charge, next(self._versions), tags)
            self._entries.move_to_end(key, last=False)
            self._bytes += charge
            self._tag(key, tags)
        # With a subdirectory unreadable the index stays incomplete: lookups
        # keep checking the files, so nothing on disk is silently ignored.
        if complete:
            self._touched = None
            self._complete = True

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ views

    def keys(self) -> list[str]:
        return list(self._entries)

    def keys_with_tag(self, tag: str) -> list[str]:
        return list(self._tagged.get(tag, ()))

    @property
    def complete(self) -> bool:
        return self._complete

    @property
    def objects(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def evictions(self) -> int:
        return self._evictions

    def _tag(self, key: str, tags: tuple[str, ...]) -> None:
        for tag in tags:
            self._tagged.setdefault(tag, set()).add(key)

    def _untag(self, key: str, tags: tuple[str, ...]) -> None:
        for tag in tags:
            keys = self._tagged.get(tag)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tagged[tag]


# --------------------------------------------------------------------------- shared

_HEAD = struct.Struct("<QQQI")      # version, charge, tick, key length
_TICK = struct.Struct(">Q")
_COUNT = struct.Struct("<q")
# Ticks of entries found by the start-up scan count up from 1, live ones from
# here: whatever the scan adds is older than anything used since start-up.
LIVE_TICKS = 1 << 48
MERGE_BATCH = 2000                  # scan results added per write transaction


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _tag_digest(tag: str) -> bytes:
    return hashlib.blake2b(tag.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _encode(version: int, charge: int, tick: int, key: str, tags: tuple[str, ...]) -> bytes:
    raw_key = key.encode("utf-8", "surrogatepass")
    # Tags are whitespace-free tokens (edge.surrogate), so a newline separates them.
    return _HEAD.pack(version, charge, tick, len(raw_key)) + raw_key + "\n".join(tags).encode(
        "utf-8", "surrogatepass")


def _decode(raw: bytes) -> tuple[int, int, int, str, tuple[str, ...]]:
    version, charge, tick, key_len = _HEAD.unpack_from(raw)
    start = _HEAD.size
    key = raw[start:start + key_len].decode("utf-8", "surrogatepass")
    rest = raw[start + key_len:]
    tags = tuple(rest.decode("utf-8", "surrogatepass").split("\n")) if rest else ()
    return version, charge, tick, key, tags


class SharedIndex:
    """The index of a disk tier shared by the worker processes of one node (LMDB, see the module doc).

    ``SharedIndex(path, map_size, fresh=True)`` deletes whatever was at `path`
    and starts empty (the node's main process, at start); ``fresh=False``
    attaches to it (each worker).
    """

    shared = True

    def __init__(self, path: Path, map_size: int, *, fresh: bool):
        self.path = Path(path)
        if fresh:
            # Before any traffic and before the workers exist: plain file calls are fine here.
            shutil.rmtree(self.path, ignore_errors=True)
        elif not (self.path / "data.mdb").exists():
            raise FileNotFoundError(f"shared disk index {self.path} does not exist (the node's main process makes it)")
        self.path.mkdir(parents=True, exist_ok=True)
        # writemap + no syncs: a transaction is memory writes only (see the module doc);
        # the map is sparse, so its size costs address space, not disk or RAM.
        self.env = lmdb.open(str(self.path), map_size=map_size, max_dbs=5, subdir=True, sync=False,
                             metasync=False, writemap=True, readahead=False, max_readers=512)
        self._entries = self.env.open_db(b"entries")
        self._lru = self.env.open_db(b"lru")
        self._tags = self.env.open_db(b"tags", dupsort=True)
        self._touched = self.env.open_db(b"touched")
        self._state = self.env.open_db(b"state")
        if fresh:
            with self.env.begin(write=True) as txn:
                self._set(txn, b"tick", LIVE_TICKS)
        self._complete = False          # once True it stays True: cached so lookups skip a read

    # ------------------------------------------------------------------ helpers

    def _count(self, txn: lmdb.Transaction, name: bytes) -> int:
        raw = txn.get(name, db=self._state)
        return _COUNT.unpack(raw)[0] if raw is not None else 0

    def _set(self, txn: lmdb.Transaction, name: bytes, value: int) -> None:
        txn.put(name, _COUNT.pack(value), db=self._state)

    def _add(self, txn: lmdb.Transaction, name: bytes, delta: int) -> int:
        value = self._count(txn, name) + delta
        self._set(txn, name, value)
        return value

    def _remove(self, txn: lmdb.Transaction, digest: bytes, raw: bytes) -> tuple[int, int, int, str, tuple]:
        decoded = _decode(raw)
        _version, charge, tick, _key, tags = decoded
        txn.delete(digest, db=self._entries)
        txn.delete(_TICK.pack(tick), db=self._lru)
        for tag in tags:
            txn.delete(_tag_digest(tag), digest, db=self._tags)
        self._add(txn, b"bytes", -charge)
        return decoded

    def _insert(self, txn: lmdb.Transaction, digest: bytes, key: str, version: int, charge: int,
                tags: tuple[str, ...], tick: int | None = None) -> None:
        if tick is None:
            tick = self._add(txn, b"tick", 1)
        txn.put(digest, _encode(version, charge, tick, key, tags), db=self._entries)
        txn.put(_TICK.pack(tick), digest, db=self._lru)
        for tag in tags:
            txn.put(_tag_digest(tag), digest, db=self._tags, dupdata=True)
        self._add(txn, b"bytes", charge)

    def _note_in(self, txn: lmdb.Transaction, digest: bytes) -> None:
        if not self.complete:
            txn.put(digest, b"", db=self._touched)

    # ------------------------------------------------------------------ lookups

    def get(self, key: str) -> Entry | None:
        with self.env.begin() as txn:
            raw = txn.get(_digest(key), db=self._entries)
        if raw is None:
            return None
        version, charge, _tick, _key, tags = _decode(raw)
        return Entry(charge, version, tags)

    def absent(self, key: str) -> bool:
        if not self.complete:
            return False
        with self.env.begin() as txn:
            return txn.get(_digest(key), db=self._entries) is None

    def __contains__(self, key: str) -> bool:
        with self.env.begin() as txn:
            return txn.get(_digest(key), db=self._entries) is not None

    # ------------------------------------------------------------------ changes

    def use(self, key: str) -> None:
        digest = _digest(key)
        with self.env.begin(write=True) as txn:
            raw = txn.get(digest, db=self._entries)
            if raw is None:
                return
            version, charge, tick, stored_key, tags = _decode(raw)
            txn.delete(_TICK.pack(tick), db=self._lru)
            tick = self._add(txn, b"tick", 1)
            txn.put(digest, _encode(version, charge, tick, stored_key, tags), db=self._entries)
            txn.put(_TICK.pack(tick), digest, db=self._lru)

    def put(self, key: str, charge: int, tags: tuple[str, ...] = ()) -> Entry:
        digest = _digest(key)
        with self.env.begin(write=True) as txn:
            raw = txn.get(digest, db=self._entries)
            if raw is not None:
                self._remove(txn, digest, raw)
            version = self._add(txn, b"version", 1)
            self._insert(txn, digest, key, version, charge, tags)
            self._note_in(txn, digest)
        return Entry(charge, version, tags)

    def restate(self, key: str, charge: int, tags: tuple[str, ...]) -> None:
        digest = _digest(key)
        with self.env.begin(write=True) as txn:
            raw = txn.get(digest, db=self._entries)
            if raw is None:
                version = self._add(txn, b"version", 1)
            else:
                version = self._remove(txn, digest, raw)[0]     # same version: readers stay valid
            self._insert(txn, digest, key, version, charge, tags)
            self._note_in(txn, digest)

    def drop(self, key: str) -> bool:
        digest = _digest(key)
        with self.env.begin(write=True) as txn:
            self._note_in(txn, digest)
            raw = txn.get(digest, db=self._entries)
            if raw is None:
                return False
            self._remove(txn, digest, raw)
        return True

    def evict_over(self, max_bytes: int) -> list[str]:
        victims = []
        with self.env.begin(write=True) as txn:
            cursor = txn.cursor(db=self._lru)
            while self._count(txn, b"bytes") > max_bytes and cursor.first():
                digest = cursor.value()
                raw = txn.get(digest, db=self._entries)
                if raw is None:             # cannot happen while both tables change together
                    cursor.delete()
                    continue
                victims.append(self._remove(txn, digest, raw)[3])
                self._note_in(txn, digest)
            if victims:
                self._add(txn, b"evictions", len(victims))
        return victims

    def note(self, h: str) -> None:
        if not self.complete:
            with self.env.begin(write=True) as txn:
                txn.put(bytes.fromhex(h), b"", db=self._touched)

    def was_touched(self, h: str) -> bool:
        if self.complete:
            return False
        with self.env.begin() as txn:
            return txn.get(bytes.fromhex(h), db=self._touched) is not None

    def merge(self, found: list[Found], complete: bool) -> None:
        """Add what the scan found (skipping what was touched since), oldest first.

        Blocking (many transactions, each may wait for the writer mutex): the
        caller runs it on a thread.
        """
        ordered = sorted(found)
        for start in range(0, len(ordered), MERGE_BATCH):
            with self.env.begin(write=True) as txn:
                for tick, (_mtime, key, h, charge, tags) in enumerate(ordered[start:start + MERGE_BATCH],
                                                                        start + 1):
                    digest = bytes.fromhex(h)
                    if (txn.get(digest, db=self._touched) is not None
                            or txn.get(digest, db=self._entries) is not None):
                        continue
                    version = self._add(txn, b"version", 1)
                    self._insert(txn, digest, key, version, charge, tags, tick=tick)
        if complete:
            with self.env.begin(write=True) as txn:
                self._set(txn, b"complete", 1)
                txn.drop(self._touched, delete=False)

    def close(self) -> None:
        self.env.close()            # a second close is a no-op

    # ------------------------------------------------------------------ views

    def keys(self) -> list[str]:
        """Keys from least to most recently used (a snapshot)."""
        out = []
        with self.env.begin() as txn:
            for digest in txn.cursor(db=self._lru).iternext(keys=False, values=True):
                raw = txn.get(digest, db=self._entries)
                if raw is not None:
                    out.append(_decode(raw)[3])
        return out

    def keys_with_tag(self, tag: str) -> list[str]:
        out = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._tags)
            if cursor.set_key(_tag_digest(tag)):
                for digest in cursor.iternext_dup():
                    raw = txn.get(digest, db=self._entries)
                    if raw is not None:
                        out.append(_decode(raw)[3])
        return out

    def count(self, name: str) -> int:
        with self.env.begin() as txn:
            return self._count(txn, name.encode())

    @property
    def complete(self) -> bool:
        if not self._complete:
            self._complete = self.count("complete") == 1
        return self._complete

    @property
    def objects(self) -> int:
        with self.env.begin() as txn:
            return txn.stat(self._entries)["entries"]

    @property
    def bytes(self) -> int:
        return self.count("bytes")

    @property
    def evictions(self) -> int:
        return self.count("evictions")


def map_size_for(disk_size: int) -> int:
    """The LMDB map for a disk tier of `disk_size`: room for an index entry per object of any size.

    An entry costs its key and tags (both also in the entry's meta file, so
    within the tier's charges) plus about 200 bytes of B-tree; three times the
    tier is plenty, and the map is sparse (address space, not disk).
    """
    return max(64 * 2**20, 3 * disk_size + 64 * 2**20)
