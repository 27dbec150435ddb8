"""The disk tier: one pair of files per entry, an LRU index in memory, bounded in bytes.

Layout (like nginx's ``levels=2``): an entry for ``key`` lives in
``<dir>/<h[:2]>/<h>.meta`` and ``<dir>/<h[:2]>/<h>.body`` where ``h`` is the
sha256 hex digest of the key.  The meta file is JSON (format version, the
key itself, the :class:`Meta` fields, the body's block checksums) followed
by a line with the checksum of that JSON.  An entry is valid only when its
meta matches its checksum, parses, names the same key, and the body file is
exactly ``meta.size`` bytes.

Checksums: the body is checked in blocks of ``BLOCK_SIZE`` bytes, each with
its xxh3-64 (about 40 GB/s here, so a hit pays well under a tenth of its
time for it; zlib's CRC32 ran at 4.7 GB/s).  Every block is checked after it
is read and before any byte of it is handed out; a mismatch drops the entry
(counted in ``corrupt``) and raises :class:`CorruptEntry`: before the first
byte that is a miss, after it the client's connection is cut, so a flipped
bit on disk is never served as a complete response.

Commit protocol (crash safe without fsync for everything but power loss):
the body is streamed to ``.tmp-<instance>-<random>`` in the entry's
directory; on commit the new meta is written to another temp file, the old
meta is unlinked (from here the old entry is invalid, so a crash can never
pair an old meta with a new body), the body is renamed into place and then
the meta: that last rename is the commit point.  ``fsync=True`` also syncs
the files and the directory, which only matters for power loss; without it
a machine crash may leave a zero-filled body of the right length, which no
size check can see (the kernel's ``auto_da_alloc`` makes this rare).

Every file operation runs in a thread (``asyncio.to_thread`` or aiofiles).
Operations on one entry are serialised by a striped asyncio lock, so a
reader never sees the body of one version with the meta of another.

The byte budget charges each entry its body plus its meta file; a commit
that would exceed it evicts least-recently-used entries (both files).  The
index is rebuilt by a background scan on :meth:`DiskStore.start`; the LRU
order it restores is the order of meta-file modification (the last store or
revalidation), since hits do not touch the disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import fcntl
import functools
import itertools
import json
import logging
import os
import secrets
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiofiles
import aiofiles.os
import aiofiles.threadpool
import xxhash

from edge.store.base import DEFAULT_CHUNK_SIZE, CachedObject, CorruptEntry, Meta, same_version
from edge.store.index import LocalIndex, SharedIndex

log = logging.getLogger("edge.store.disk")

FORMAT_VERSION = 2          # 2: block checksums, and a checksum of the meta itself
BLOCK_SIZE = 1024 * 1024    # the unit of body checksums: a read is verified block by block
TEMP_PREFIX = ".tmp-"
_LOCK_STRIPES = 256
REBUILD_POLL = 0.2          # seconds between a worker's looks at whether the node's index is rebuilt
_HEX = frozenset("0123456789abcdef")


def prepare_directory(directory: Path) -> None:
    """Create the cache directory; an OSError naming it if it cannot be made or written.

    Runs once at startup, before any traffic: a plain mkdir is fine here.
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as exc:
        raise OSError(exc.errno, f"cache directory {directory}: {exc.strerror or exc}", str(directory)) from None


def key_hash(key: str) -> str:
    """The file name of a key's entry ("surrogatepass": a key may be any str)."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _short(key: str) -> str:
    return key if len(key) <= 120 else key[:117] + "..."


class DiskStore:
    name = "disk"

    def __init__(self, directory: Path, max_bytes: int, *, fsync: bool = False,
                 index: LocalIndex | SharedIndex | None = None, rebuild: bool = True,
                 run_token: str | None = None):
        """`index`: a SharedIndex when several worker processes share this directory (default: a
        LocalIndex of this process).  `rebuild`: this store scans the directory at start; a
        worker sharing an index another process rebuilds only waits for it.  `run_token`: what the
        temp files of every process sharing the directory begin with (so one's scan spares the
        others'); default: this instance's own."""
        if max_bytes < 0:
            raise ValueError("disk store size must not be negative")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        prepare_directory(self.directory)
        self._index = index if index is not None else LocalIndex()
        self._rebuilds = rebuild
        self._locks = [asyncio.Lock() for _ in range(_LOCK_STRIPES)]
        # Temp files carry this run's token: the rebuild deletes everyone else's
        # (left by a crash) but never those of a writer running now, in this
        # process or (with a shared index) in another worker of the node.
        own = secrets.token_hex(4)
        self._keep_prefix = f"{TEMP_PREFIX}{run_token or own}-"
        self._temp_prefix = self._keep_prefix if run_token is None else f"{self._keep_prefix}{own}-"
        # Workers sharing the directory also exclude each other around the renames of one
        # entry (a lock file, one byte per stripe), so two never interleave one commit.
        self._xlock = _StripeFileLock(self.directory / "stripes.lock") if self._index.shared else None
        self._temp_counter = itertools.count()
        self._subdirs_ready: set[str] = set()
        self._rebuild_task: asyncio.Task[None] | None = None
        self._writers: weakref.WeakSet[DiskWriter] = weakref.WeakSet()
        self._files = _ThreadBatch()     # lookups, installs and removals, batched per thread hop
        self.rebuilt = asyncio.Event()   # set when the start-up scan has finished
        self.rebuild_errors = 0          # subdirectories the scan could not read
        self.corrupt = 0                 # broken entries found (checksum, size, meta) and removed

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start rebuilding the index in the background; returns at once."""
        if self._rebuild_task is None and not self.rebuilt.is_set():
            self._rebuild_task = asyncio.create_task(
                self._rebuild() if self._rebuilds else self._await_rebuild(),
                name=f"disk cache index rebuild {self.directory}")

    async def close(self) -> None:
        task, self._rebuild_task = self._rebuild_task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        for writer in list(self._writers):
            await writer.abort()
        self._index.close()
        if self._xlock is not None:
            self._xlock.close()

    def fits(self, size: int) -> bool:
        """Could a body of `size` bytes be stored at all (its meta aside)?"""
        return size <= self.max_bytes

    # ------------------------------------------------------------------ reads

    def in_memory(self, key: str) -> CachedObject | None:
        return None         # bodies live in files: never answered without awaiting

    async def get(self, key: str) -> CachedObject | None:
        if self._index.absent(key):
            return None
        h = key_hash(key)
        meta_path, body_path = self._paths(h)
        async with self._lock(h):
            try:
                found = await self._files.run(_read_entry, meta_path, body_path, key)
            except CorruptEntry as exc:
                await self._discard_locked(key, h, str(exc))
                return None
            if found is None:
                if self._index.drop(key):
                    self._touch(h)
                    log.warning("disk cache: entry for %s vanished from %s", _short(key), meta_path)
                return None
            meta, meta_len, sums = found
            entry = self._index.get(key)
            if entry is None:            # on disk but not indexed yet: adopt it
                entry = self._index.put(key, meta.size + meta_len, meta.tags)
                self._touch(h)
            else:
                self._index.use(key)
            return DiskObject(meta, self, key, h, entry.version, sums)

    async def _open_body(self, obj: DiskObject) -> Any:
        """Open the body of exactly the version ``obj`` was looked up as."""
        meta_path, body_path = self._paths(obj.hash)
        async with self._lock(obj.hash):
            entry = self._index.get(obj.key)
            if entry is None or entry.version != obj.version:
                raise CorruptEntry("entry was replaced or removed after it was looked up")
            try:
                raw = await asyncio.to_thread(_open_body_checked, body_path, obj.meta.size)
            except (OSError, CorruptEntry) as exc:
                await self._discard_locked(obj.key, obj.hash, f"cannot open body: {exc}")
                raise CorruptEntry(f"cannot open body: {exc}") from None
        return aiofiles.threadpool.wrap(raw)

    async def _discard_version(self, obj: DiskObject, problem: str) -> None:
        """Drop an entry found corrupt while reading, unless it was replaced meanwhile."""
        async with self._lock(obj.hash):
            entry = self._index.get(obj.key)
            if entry is not None and entry.version == obj.version:
                await self._discard_locked(obj.key, obj.hash, problem)

    async def _discard_locked(self, key: str, h: str, problem: str) -> None:
        log.warning("disk cache: dropping entry for %s (%s): %s", _short(key), h, problem)
        self.corrupt += 1
        self._index.drop(key)
        self._touch(h)
        await asyncio.to_thread(self._x(_remove_quietly, h), *self._paths(h))

    # ------------------------------------------------------------------ writes

    def writer(self, key: str, size_hint: int | None = None) -> DiskWriter:
        writer = DiskWriter(self, key, size_hint)
        self._writers.add(writer)
        return writer

    async def _temp_path(self, h: str, fresh_dir: bool = False) -> Path:
        """A new temp file name beside the entry, creating its subdirectory if needed."""
        sub = h[:2]
        if fresh_dir or sub not in self._subdirs_ready:
            await aiofiles.os.makedirs(self.directory / sub, exist_ok=True)
            self._subdirs_ready.add(sub)
        return self._temp_name(h)

    def _temp_name(self, h: str) -> Path:
        # A counter behind a random per-process prefix: unique without a
        # urandom call per file on the miss path.
        return self.directory / h[:2] / f"{self._temp_prefix}{next(self._temp_counter)}"

    async def _install(self, key: str, h: str, tmp_body: Path, meta_bytes: bytes,
                       charge: int, body: bytes | None = None, tags: tuple[str, ...] = ()) -> bool:
        """Move a finished body and its meta into place; the meta rename commits.

        With `body`, the body is first written to `tmp_body` in the same thread hop.
        """
        meta_path, body_path = self._paths(h)
        tmp_meta = self._temp_name(h)        # beside tmp_body: the directory exists
        async with self._lock(h):
            self._touch(h)
            try:
                await self._files.run(self._x(_install_files, h), tmp_body, tmp_meta, meta_bytes,
                                      meta_path, body_path, self.fsync, body)
            except OSError as exc:
                log.warning("disk cache: cannot store %s in %s: %s", _short(key), meta_path, exc)
                self._index.drop(key)
                await asyncio.to_thread(self._x(_remove_quietly, h), tmp_body, tmp_meta, meta_path, body_path)
                return False
            self._index.put(key, charge, tags)
        await self._evict_to_budget()
        return True

    async def update_meta(self, key: str, meta: Meta, replacing: Meta | None = None) -> bool:
        """Rewrite only the meta (after a 304, a soft purge); False if absent or the size differs,
        or (with `replacing`) if the stored meta is no longer that one."""
        if self._index.absent(key):
            return False
        h = key_hash(key)
        meta_path, body_path = self._paths(h)
        tmp_meta = self._temp_name(h)        # used only if the entry (so its directory) exists
        async with self._lock(h):
            self._touch(h)
            try:
                outcome, meta_len = await asyncio.to_thread(self._x(_rewrite_meta, h), key, meta, tmp_meta,
                                                            meta_path, body_path, self.fsync, replacing)
            except CorruptEntry as exc:
                await self._discard_locked(key, h, str(exc))
                return False
            except OSError as exc:
                log.warning("disk cache: cannot update %s: %s", meta_path, exc)
                return False
            if outcome == "absent":
                self._index.drop(key)
                return False
            if outcome in ("size differs", "replaced"):
                return False
            # Same body, same version (readers stay valid); new charge and tags.
            self._index.restate(key, meta.size + meta_len, meta.tags)
        return True

    async def delete(self, key: str, only: Meta | None = None) -> bool:
        if self._index.absent(key):
            return False
        h = key_hash(key)
        async with self._lock(h):
            if only is not None:
                try:
                    found = await self._files.run(_read_entry, *self._paths(h), key)
                except CorruptEntry:
                    found = None                 # broken: remove it whatever it was
                if found is not None and not same_version(found[0], only):
                    return False
            indexed = self._index.drop(key)
            self._touch(h)
            try:
                existed = await self._files.run(self._x(_remove_files, h), *self._paths(h))
            except OSError as exc:
                log.warning("disk cache: cannot delete entry %s: %s", h, exc)
                existed = True
        return indexed or existed

    async def _evict_to_budget(self) -> None:
        # With a shared index the victims are popped in one transaction: two workers
        # over budget at once evict different entries, and the budget is the node's.
        victims = self._index.evict_over(self.max_bytes)
        for key in victims:
            h = key_hash(key)
            async with self._lock(h):
                if key in self._index:   # stored again meanwhile: the files are the new entry
                    continue
                self._touch(h)
                await asyncio.to_thread(self._x(_remove_quietly, h), *self._paths(h))

    # ------------------------------------------------------------------ index

    def _paths(self, h: str) -> tuple[Path, Path]:
        sub = self.directory / h[:2]
        return sub / f"{h}.meta", sub / f"{h}.body"

    def _lock(self, h: str) -> asyncio.Lock:
        return self._locks[int(h[:2], 16) % _LOCK_STRIPES]

    def _touch(self, h: str) -> None:
        self._index.note(h)

    def _x(self, fn: Callable[..., Any], h: str) -> Callable[..., Any]:
        """`fn` (a file helper run on a thread), holding the entry's stripe across processes."""
        if self._xlock is None:
            return fn
        return functools.partial(self._xlock.run, int(h[:2], 16) % _LOCK_STRIPES, fn)

    async def _rebuild(self) -> None:
        try:
            await self._merge(await self._scan())
        except Exception:
            # Unexpected: keep serving with direct lookups rather than die silently.
            log.exception("disk cache %s: index rebuild failed", self.directory)
            self.rebuild_errors += 1
            self.rebuilt.set()

    async def _await_rebuild(self) -> None:
        """A worker whose node's main process rebuilds the shared index: wait until it is complete."""
        while not self._index.complete:
            await asyncio.sleep(REBUILD_POLL)
        self.rebuilt.set()

    async def _scan(self) -> _ScanResult:
        """Read every subdirectory, one thread hop each, so close() can stop it between."""
        result = _ScanResult()
        try:
            subdirs = await asyncio.to_thread(_list_subdirs, self.directory)
        except OSError as exc:
            log.error("disk cache %s: cannot list the cache directory: %s", self.directory, exc)
            self.rebuild_errors += 1
            result.complete = False
            return result
        for sub in subdirs:
            try:
                found, bad = await asyncio.to_thread(
                    _scan_subdir, self.directory / sub, sub, self._keep_prefix)
            except OSError as exc:
                log.error("disk cache %s: cannot scan %s: %s", self.directory, sub, exc)
                self.rebuild_errors += 1
                result.complete = False
                continue
            result.found.extend(found)
            result.bad.extend(bad)
            self._subdirs_ready.add(sub)
        return result

    async def _merge(self, result: _ScanResult) -> None:
        """Add what the scan found, skipping every hash touched since the scan began."""
        # Broken entries first, while the index still tracks what was touched since the scan.
        removed = 0
        for h in result.bad:
            async with self._lock(h):
                if not self._index.was_touched(h):
                    await asyncio.to_thread(self._x(_remove_quietly, h), *self._paths(h))
                    removed += 1
        if self._index.shared:
            # Many write transactions, each may wait for a worker's: off the event loop.
            await asyncio.to_thread(self._index.merge, result.found, result.complete)
        else:
            self._index.merge(result.found, result.complete)
        if removed:
            self.corrupt += removed
            log.warning("disk cache %s: removed %d broken entries", self.directory, removed)
        log.info("disk cache %s: index rebuilt: %d entries, %d bytes",
                 self.directory, self._index.objects, self._index.bytes)
        self.rebuilt.set()
        await self._evict_to_budget()

    # ------------------------------------------------------------------ gauges

    def keys(self) -> list[str]:
        """Indexed keys from least to most recently used (a snapshot, for operators)."""
        return self._index.keys()

    def keys_with_tag(self, tag: str) -> list[str]:
        """Indexed keys whose entries carry `tag` (a snapshot; no file is read)."""
        return self._index.keys_with_tag(tag)

    @property
    def index_complete(self) -> bool:
        """Has the start-up scan merged every subdirectory (so the index lists every entry)?"""
        return self._index.complete

    def tiers(self) -> list[DiskStore]:
        return [self]

    @property
    def objects(self) -> int:
        return self._index.objects

    @property
    def evictions(self) -> int:
        return self._index.evictions

    @property
    def bytes(self) -> int:
        return self._index.bytes


class _ScanResult:
    """What the start-up scan saw; merged into the index on the event loop."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str, str, int, tuple[str, ...]]] = []    # (mtime_ns, key, hash, charge, tags)
        self.bad: list[str] = []                            # hashes of broken entries
        self.complete = True


class DiskObject(CachedObject):
    """A disk hit: the meta is read, the body is opened, read and checked on demand."""

    __slots__ = ("store", "key", "hash", "version", "sums")

    def __init__(self, meta: Meta, store: DiskStore, key: str, h: str, version: int, sums: list[int]):
        super().__init__(meta, None)
        self.store = store
        self.key = key
        self.hash = h
        self.version = version
        self.sums = sums                 # xxh3-64 of each BLOCK_SIZE block of the body

    async def chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE, start: int = 0,
                     end: int | None = None) -> AsyncIterator[bytes]:
        """The body from `start` to `end`, each piece checked before it is yielded.

        Reads whole blocks (from the block holding `start` to the one holding
        the last byte) so that every byte handed out was checked; a read is
        `chunk_size` rounded down to whole blocks, at least one, and what is
        yielded comes in pieces of at most `chunk_size`.
        """
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        size = self.meta.size
        stop = size if end is None else min(end, size)
        if start >= stop:
            return
        read_size = max(BLOCK_SIZE, chunk_size - chunk_size % BLOCK_SIZE)
        last = min(size, -(-stop // BLOCK_SIZE) * BLOCK_SIZE)    # the end of the block holding stop - 1
        position = start - start % BLOCK_SIZE
        file = await self.store._open_body(self)
        problem = ""
        try:
            if position:
                await file.seek(position)
            while position < last:
                want = min(read_size, last - position)
                try:
                    data = await file.read(want)
                except OSError as exc:
                    problem = f"read error: {exc}"
                    break
                if len(data) != want:
                    problem = f"body ended {last - position - len(data)} bytes short of {size}"
                    break
                problem = _check_blocks(data, position, self.sums)
                if problem:
                    break
                low, high = max(start - position, 0), min(stop - position, want)
                position += want
                if low == 0 and high == want and want <= chunk_size:
                    yield data
                    continue
                for piece in range(low, high, chunk_size):
                    yield data[piece:min(piece + chunk_size, high)]
        finally:
            try:
                await file.close()
            except OSError:
                pass
        if problem:
            await self.store._discard_version(self, problem)
            raise CorruptEntry(problem)


def _check_blocks(data: bytes, position: int, sums: list[int]) -> str:
    """'' when every block of `data` (read from block-aligned `position`) matches its checksum."""
    view = memoryview(data)
    first = position // BLOCK_SIZE
    for offset in range(0, len(data), BLOCK_SIZE):
        index = first + offset // BLOCK_SIZE
        if xxhash.xxh3_64_intdigest(view[offset:offset + BLOCK_SIZE]) != sums[index]:
            return f"block {index} fails its checksum"
    return ""


class _BlockSums:
    """Checksums of a body's blocks, computed as the body is written in chunks of any size."""

    def __init__(self) -> None:
        self.sums: list[int] = []
        self._hasher = xxhash.xxh3_64()
        self._filled = 0

    def update(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            take = min(len(view), BLOCK_SIZE - self._filled)
            self._hasher.update(view[:take])
            self._filled += take
            view = view[take:]
            if self._filled == BLOCK_SIZE:
                self.sums.append(self._hasher.intdigest())
                self._hasher.reset()
                self._filled = 0

    def finish(self) -> list[int]:
        if self._filled:
            self.sums.append(self._hasher.intdigest())
            self._hasher.reset()
            self._filled = 0
        return self.sums


SMALL_BODY = 256 * 1024   # bodies up to this size are written at commit, in one thread hop


class DiskWriter:
    """Streams a body to a temp file; commit moves it into place."""

    def __init__(self, store: DiskStore, key: str, size_hint: int | None):
        self._store = store
        self._key = key
        self._hash = key_hash(key)
        self._tmp: Path | None = None
        self._file: Any = None
        self.written = 0
        self.failed = False          # a disk error happened (logged)
        # Something that can never fit is not written at all.
        self.dropped = size_hint is not None and size_hint > store.max_bytes
        self._done = False
        # Small bodies wait in memory and reach the disk in one thread hop at
        # commit, instead of an open, writes and a close through aiofiles.
        self._buffer: list[bytes] = []
        self._sums = _BlockSums()

    async def write(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("write after commit or abort")
        self.written += len(chunk)
        if self.dropped:
            return
        self._sums.update(chunk)
        if self.written > self._store.max_bytes:
            self.dropped = True      # outgrew the whole tier: stop spending disk on it
            await self._discard_temp()
            return
        if self._file is None and self.written <= SMALL_BODY:
            self._buffer.append(chunk)
            return
        try:
            if self._file is None:
                await self._open_temp()
                buffered, self._buffer = b"".join(self._buffer), []
                if buffered:
                    await self._file.write(buffered)
            await self._file.write(chunk)
        except OSError as exc:
            self._fail(exc)
            await self._discard_temp()

    async def commit(self, meta: Meta) -> bool:
        if self._done:
            raise RuntimeError("commit after commit or abort")
        self._done = True
        store = self._store
        meta_bytes = _encode_meta(self._key, meta, self._sums.finish())
        charge = meta.size + len(meta_bytes)
        if self.dropped or meta.size != self.written or charge > store.max_bytes:
            await self._discard_temp()
            # Commit means "this response replaces the stored one": never leave
            # the old version behind to be served in its place.
            await store.delete(self._key)
            return False
        if self._file is None:           # a small (or empty) body, still in memory
            body, self._buffer = b"".join(self._buffer), []
            tmp = await store._temp_path(self._hash)
            return await asyncio.shield(store._install(self._key, self._hash, tmp, meta_bytes, charge, body,
                                                       meta.tags))
        try:
            if store.fsync:
                await self._file.flush()
                await asyncio.to_thread(os.fsync, self._file.fileno())
            await self._file.close()
            self._file = None
        except OSError as exc:
            self._fail(exc)
            await self._discard_temp()
            await store.delete(self._key)
            return False
        tmp, self._tmp = self._tmp, None
        assert tmp is not None
        # Shielded: once the renames start, a cancelled caller must not leave
        # files in place that the index does not know about.
        return await asyncio.shield(store._install(self._key, self._hash, tmp, meta_bytes, charge, tags=meta.tags))

    async def abort(self) -> None:
        self._done = True
        await self._discard_temp()

    async def _open_temp(self) -> None:
        self._tmp = await self._store._temp_path(self._hash)
        try:
            self._file = await aiofiles.open(self._tmp, "wb")
        except FileNotFoundError:        # the subdirectory was removed under us
            self._tmp = await self._store._temp_path(self._hash, fresh_dir=True)
            self._file = await aiofiles.open(self._tmp, "wb")

    def _fail(self, exc: OSError) -> None:
        log.warning("disk cache: cannot write %s for %s: %s; not caching it",
                    self._tmp, _short(self._key), exc)
        self.failed = True
        self.dropped = True

    async def _discard_temp(self) -> None:
        self._buffer = []
        file, self._file = self._file, None
        tmp, self._tmp = self._tmp, None
        if file is not None:
            try:
                await file.close()
            except OSError:
                pass
        if tmp is not None:
            try:
                await aiofiles.os.remove(tmp)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("disk cache: cannot remove temp file %s: %s", tmp, exc)


# ---------------------------------------------------------------------------- file helpers
class _StripeFileLock:
    """One byte of a lock file per stripe, locked with ``lockf`` around a file helper, on its thread.

    ``lockf`` locks belong to the process, not the thread, so it only excludes
    other processes; within one, the store's asyncio stripe locks already keep
    two operations on one entry apart, and a thread lock per stripe covers the
    rest.  The file stays open for the store's life: closing any descriptor of
    it would drop every lock this process holds on it.
    """

    def __init__(self, path: Path):
        # Once, at start-up, before any traffic.
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._threads = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def run(self, stripe: int, fn: Callable[..., Any], *args: Any) -> Any:
        with self._threads[stripe]:
            fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, stripe)
            try:
                return fn(*args)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, stripe)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _ThreadBatch:
    """File calls queued while a worker thread runs the previous ones go together in one hop.

    Under a miss load every response installs files; a thread hop per install
    cost more than the file calls themselves (it wakes a worker and makes it
    and the event loop take turns on the GIL).  Calls run in the order they
    were queued, one batch at a time; each caller gets its own result or
    exception.
    """

    def __init__(self) -> None:
        self._queue: list[tuple[Callable[..., Any], tuple, asyncio.Future]] = []
        self._draining: asyncio.Task[None] | None = None
        self.batches = 0                 # thread hops taken so far

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._queue.append((fn, args, future))
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        jobs: list[tuple[Callable[..., Any], tuple, asyncio.Future]] = []
        try:
            while self._queue:
                jobs, self._queue = self._queue, []
                self.batches += 1
                results = await asyncio.to_thread(_run_calls, [(fn, args) for fn, args, _ in jobs])
                for (_, _, future), (failed, value) in zip(jobs, results):
                    if not future.done():
                        if failed:
                            future.set_exception(value)
                        else:
                            future.set_result(value)
                jobs = []
        finally:
            self._draining = None
            for _, _, future in jobs + self._queue:      # cancelled mid-batch: nobody waits forever
                if not future.done():
                    future.set_exception(OSError("disk cache worker stopped"))
            self._queue = []


def _run_calls(calls: list[tuple[Callable[..., Any], tuple]]) -> list[tuple[bool, Any]]:
    results: list[tuple[bool, Any]] = []
    for fn, args in calls:
        try:
            results.append((False, fn(*args)))
        except Exception as exc:     # handed to that call's caller, not to the batch
            results.append((True, exc))
    return results


# These run in worker threads (asyncio.to_thread), never on the event loop.

def _encode_meta(key: str, meta: Meta, sums: list[int]) -> bytes:
    """The meta file: JSON, then a line with the JSON's own checksum (16 hex digits)."""
    # Fixed-width hex: an entry's charge (its meta length) depends on its body's size only.
    record = {"format": FORMAT_VERSION, "key": key, **meta.to_dict(), "block": BLOCK_SIZE,
              "sums": [f"{value:016x}" for value in sums]}
    payload = json.dumps(record, separators=(",", ":")).encode("ascii")
    return b"%s\n%016x\n" % (payload, xxhash.xxh3_64_intdigest(payload))


def _decode_meta(raw: bytes) -> tuple[str, Meta, list[int]]:
    payload, _, check = raw.rstrip(b"\n").rpartition(b"\n")
    try:
        valid = int(check, 16) == xxhash.xxh3_64_intdigest(payload)
    except ValueError:
        valid = False
    if not valid:
        raise CorruptEntry("meta fails its checksum")
    try:
        record = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptEntry(f"meta is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise CorruptEntry("meta is not a JSON object")
    if record.get("format") != FORMAT_VERSION:
        raise CorruptEntry(f"meta format {record.get('format')!r} is not {FORMAT_VERSION}")
    key = record.get("key")
    if not isinstance(key, str):
        raise CorruptEntry("meta has no key")
    meta = Meta.from_dict(record)
    sums = record.get("sums")
    if (record.get("block") != BLOCK_SIZE or not isinstance(sums, list)
            or len(sums) != -(-meta.size // BLOCK_SIZE)
            or not all(isinstance(v, str) and len(v) == 16 and set(v) <= _HEX for v in sums)):
        raise CorruptEntry("meta block checksums do not fit the body")
    return key, meta, [int(value, 16) for value in sums]


def _read_entry(meta_path: Path, body_path: Path, key: str) -> tuple[Meta, int, list[int]] | None:
    """The entry's meta, meta length and block checksums; None if absent; CorruptEntry if invalid."""
    try:
        with open(meta_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptEntry(f"cannot read meta: {exc}") from None
    stored_key, meta, sums = _decode_meta(raw)
    if stored_key != key:
        raise CorruptEntry("meta names another key")
    try:
        size = os.stat(body_path).st_size
    except OSError as exc:
        raise CorruptEntry(f"body unreadable: {exc.strerror or exc}") from None
    if size != meta.size:
        raise CorruptEntry(f"body is {size} bytes, meta says {meta.size}")
    return meta, len(raw), sums


def _open_body_checked(body_path: Path, size: int) -> Any:
    file = open(body_path, "rb")
    actual = os.fstat(file.fileno()).st_size
    if actual != size:
        file.close()
        raise CorruptEntry(f"body is {actual} bytes, meta says {size}")
    return file


def _write_file(path: Path, data: bytes, fsync: bool) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install_files(tmp_body: Path, tmp_meta: Path, meta_bytes: bytes,
                   meta_path: Path, body_path: Path, fsync: bool, body: bytes | None = None) -> None:
    try:
        if body is not None:
            _write_file(tmp_body, body, fsync)
        _write_file(tmp_meta, meta_bytes, fsync)
        _unlink(meta_path)               # the old entry stops being valid first
        os.replace(tmp_body, body_path)
        os.replace(tmp_meta, meta_path)  # the commit point
    except OSError:
        _unlink(tmp_meta)
        if body is not None:
            _unlink(tmp_body)
        raise
    if fsync:
        _fsync_dir(meta_path.parent)


def _rewrite_meta(key: str, meta: Meta, tmp_meta: Path, meta_path: Path, body_path: Path,
                  fsync: bool, replacing: Meta | None = None) -> tuple[str, int]:
    """Replace the entry's meta, keeping its body and block checksums: the outcome and the new meta length."""
    current = _read_entry(meta_path, body_path, key)
    if current is None:
        return "absent", 0
    if current[0].size != meta.size:
        return "size differs", 0
    if replacing is not None and current[0] != replacing:
        return "replaced", 0
    meta_bytes = _encode_meta(key, meta, current[2])
    try:
        _write_file(tmp_meta, meta_bytes, fsync)
        os.replace(tmp_meta, meta_path)
    except OSError:
        _unlink(tmp_meta)
        raise
    return "ok", len(meta_bytes)


def _unlink(path: Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _remove_files(meta_path: Path, body_path: Path) -> bool:
    """Remove an entry, meta first so that it stops being valid at once."""
    removed_meta = _unlink(meta_path)
    removed_body = _unlink(body_path)
    return removed_meta or removed_body


def _remove_quietly(*paths: Path) -> None:
    for path in paths:
        try:
            _unlink(path)
        except OSError as exc:
            log.warning("disk cache: cannot remove %s: %s", path, exc)


def _is_hash(name: str) -> bool:
    return len(name) == 64 and set(name) <= _HEX


def _list_subdirs(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries
                      if len(e.name) == 2 and set(e.name) <= _HEX and e.is_dir(follow_symlinks=False))


def _scan_subdir(path: Path, sub: str, own_temp_prefix: str
                 ) -> tuple[list[tuple[int, str, str, int, tuple[str, ...]]], list[str]]:
    """Valid entries (mtime_ns, key, hash, charge, tags) and broken entries' hashes in one subdirectory.

    Stale temp files (a crashed writer's) are deleted here; files that are
    not ours are left alone.
    """
    metas: dict[str, tuple[str, int]] = {}
    bodies: dict[str, int] = {}
    with os.scandir(path) as entries:
        for e in entries:
            name = e.name
            if name.startswith(TEMP_PREFIX):
                if not name.startswith(own_temp_prefix):
                    try:
                        _unlink(Path(e.path))
                    except OSError as exc:
                        log.warning("disk cache: cannot remove stale temp file %s: %s", e.path, exc)
                continue
            stem, _, ext = name.partition(".")
            if not _is_hash(stem) or stem[:2] != sub:
                continue
            try:
                if ext == "meta":
                    metas[stem] = (e.path, e.stat(follow_symlinks=False).st_mtime_ns)
                elif ext == "body":
                    bodies[stem] = e.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    found, bad = [], []
    for h in sorted(metas.keys() | bodies.keys()):
        if h not in metas or h not in bodies:   # an interrupted commit or delete
            bad.append(h)
            continue
        meta_path, mtime = metas[h]
        try:
            with open(meta_path, "rb") as f:
                raw = f.read()
            key, meta, _ = _decode_meta(raw)
        except (OSError, CorruptEntry):
            bad.append(h)
            continue
        if key_hash(key) != h or bodies[h] != meta.size:
            bad.append(h)
            continue
        found.append((mtime, key, h, meta.size + len(raw), meta.tags))
    return found, bad
