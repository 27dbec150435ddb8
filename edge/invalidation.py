"""Purges on one cache node: add a ban, apply it in the background, keep the bans across restarts.

A purge returns as soon as its ban is in the list (:mod:`edge.bans`), which
the pipeline checks on every lookup and every store; from that moment
nothing it covers is served as fresh.  The *lurker* (Varnish's name) then
applies each new ban to the objects it covers, so that the ban can go:

* which objects: a tag's from the disk tier's tag index (no file read),
  a URL's or prefix's by a pass over the tiers' key indexes (in memory,
  in slices that give the event loop back every few thousand keys); the
  memory tier is walked too, as it can hold an object the disk tier lacks;
* a hard ban deletes each covered object stored before it; a soft ban
  marks it stale in its stored meta (``Meta.stale_at``), on disk too, so
  the mark outlives the ban and a restart;
* file work runs on the disk tier's worker threads, never on the event loop.

A hard purge of one URL also deletes that URL at once (with its Vary
marker, which orphans every variant), as before bans existed, and needs no
pass.  Once applied, a ban is retired when no fetch older than it is still
under way (that fetch's object is checked against the ban when it is
stored).  The live bans are written to ``bans.json`` in the node's cache
directory at every change, so a node restarted before its lurker finished
applies them again (the disk tier is indexed anew at start).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from edge.bans import Ban, BanList
from edge.cachekey import VARIANT_SEPARATOR
from edge.metrics import NodeMetrics
from edge.store import Meta, Store

log = logging.getLogger("edge.invalidation")

SLICE = 4096              # keys examined between two yields to the event loop
APPLY_CONCURRENCY = 32    # objects deleted or marked at once (their file calls batch per thread hop)
RETIRE_EVERY = 0.5        # seconds between checks for bans that may go
MARKER_STATUS = 0         # the pipeline's Vary markers: not responses, never banned themselves


class Invalidator:
    def __init__(self, store: Store, bans: BanList, clock: Callable[[], float],
                 oldest_fetch: Callable[[], float | None], metrics: NodeMetrics, ban_file: Path | None = None):
        self.store, self.bans, self.clock = store, bans, clock
        self.oldest_fetch, self.metrics, self.ban_file = oldest_fetch, metrics, ban_file
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._save_lock = asyncio.Lock()
        self.passes = 0           # lurker passes completed (for tests and /status)

    async def start(self) -> None:
        """Read the bans a previous run left (if any) and start the lurker."""
        if self.ban_file is not None:
            try:
                records = await asyncio.to_thread(_read_json, self.ban_file)
                if records is not None:
                    count = self.bans.load(records)
                    log.info("loaded %d bans from %s; applying them again", count, self.ban_file)
            except (OSError, ValueError) as exc:
                # Serving without them beats not serving; said loudly, once.
                log.error("cannot load bans from %s (%s): purges made before the restart may not hold",
                          self.ban_file, exc)
        self._running()
        self._wake.set()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._lurk_forever(), name="ban lurker")

    async def purge(self, kind: str, value: str, soft: bool) -> dict[str, Any]:
        """Add a ban (ValueError, BanListFull) and return what was done.

        `value` is a primary cache key (url), a cache-key prefix (prefix) or a tag.
        """
        ban = self.bans.add(kind, value, soft, self.clock())
        removed = 0
        if kind == "url" and not soft:
            if await self.store.delete(value):
                removed = 1
                self.metrics.invalidations.labels("purge").inc()
                # Deleting the URL orphaned its variants: nothing is left for the lurker.
                self.bans.lurked([(ban, ban.time)])
            # Otherwise the lurker runs: the URL may be stored as slices (edge.slicing), which
            # are keyed under it and have no entry at the URL itself to delete.
        self.metrics.purges.labels(kind, "soft" if soft else "hard").inc()
        await self._save()
        self._running()
        self._wake.set()
        return {"kind": kind, "soft": soft, "time": ban.time, "removed": removed, "bans": self.bans.summary()}

    # ------------------------------------------------------------------ lurker

    async def _lurk_forever(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), RETIRE_EVERY if len(self.bans) else None)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                if self.bans.pending():
                    await self.lurk()
                if len(self.bans):
                    await self._retire()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("ban lurker: pass failed; trying again")
                await asyncio.sleep(1.0)
                self._wake.set()

    async def lurk(self) -> int:
        """One pass: apply every pending ban to the objects it covers; how many were changed."""
        pending = self.bans.pending()
        applied = [(ban, ban.time) for ban in pending]
        for tier in self.store.tiers():
            rebuilt = getattr(tier, "rebuilt", None)
            if rebuilt is not None:
                await rebuilt.wait()        # the index lists what is on disk only once rebuilt
        keys = await self._covered_keys(pending)
        changed = 0
        for start in range(0, len(keys), APPLY_CONCURRENCY):
            done = await asyncio.gather(*(self._apply(key) for key in keys[start:start + APPLY_CONCURRENCY]))
            changed += sum(done)
        self.bans.lurked(applied)
        self.passes += 1
        if pending:
            log.info("applied %d bans: %d of %d objects covered were purged or marked stale",
                     len(pending), changed, len(keys))
        return changed

    async def _covered_keys(self, pending: list[Ban]) -> list[str]:
        urls = {ban.value for ban in pending if ban.kind == "url"}
        prefixes = [ban.value for ban in pending if ban.kind == "prefix"]
        tags = {ban.value for ban in pending if ban.kind == "tag"}
        found: dict[str, None] = {}
        for tier in self.store.tiers():
            peek = getattr(tier, "peek", None)            # a tier holding its metas in memory
            tagged = getattr(tier, "keys_with_tag", None)  # a tier indexing its tags
            if tags and tagged is not None:
                for tag in tags:
                    found.update(dict.fromkeys(tagged(tag)))
            by_meta = bool(tags) and tagged is None and peek is not None
            if not (urls or prefixes or by_meta):
                continue
            for i, key in enumerate(tier.keys()):
                if i % SLICE == SLICE - 1:
                    await asyncio.sleep(0)
                if key.split(VARIANT_SEPARATOR, 1)[0] in urls or any(key.startswith(p) for p in prefixes):
                    found[key] = None
                elif by_meta:
                    stored = peek(key)
                    if stored is not None and not tags.isdisjoint(stored.meta.tags):
                        found[key] = None
        return list(found)

    async def _meta(self, key: str) -> Meta | None:
        """The newest stored meta of `key`: from a memory tier without I/O, else read from disk."""
        for tier in self.store.tiers():
            peek = getattr(tier, "peek", None)
            stored = peek(key) if peek is not None else await tier.get(key)
            if stored is not None:
                return stored.meta
        return None

    async def _apply(self, key: str) -> bool:
        """Delete `key` or mark it stale if a live ban covers it; did anything change?"""
        meta = await self._meta(key)
        if meta is None or meta.status == MARKER_STATUS:
            return False
        verdict = self.bans.check(key, meta.tags, meta.request_time)
        if verdict is None:
            return False
        if verdict.hard:
            # Only the version judged: a refill stored meanwhile was checked when it was stored.
            if await self.store.delete(key, only=meta):
                self.metrics.invalidations.labels("purge").inc()
                return True
            return False
        if meta.stale_at is not None and meta.stale_at <= verdict.stale_at:
            return False
        # Only while it is still the version read: a newer one was checked when it was stored.
        if await self.store.update_meta(key, replace(meta, stale_at=verdict.stale_at), replacing=meta):
            self.metrics.invalidations.labels("soft-purge").inc()
            return True
        return False

    async def _retire(self) -> None:
        # With part of the disk unindexed, an object a ban covers may be on disk
        # unseen by the lurker: the ban stays (checked on lookup) until a restart.
        if not all(getattr(tier, "index_complete", True) for tier in self.store.tiers()):
            return
        retired = self.bans.retire(self.oldest_fetch())
        if retired:
            log.info("retired %d bans (%d live)", len(retired), len(self.bans))
            await self._save()

    # ---------------------------------------------------------------- ban file

    async def _save(self) -> None:
        if self.ban_file is None:
            return
        async with self._save_lock:
            records = self.bans.to_list()
            try:
                await asyncio.to_thread(_write_json, self.ban_file, records)
            except OSError as exc:
                log.error("cannot write bans to %s: %s (they hold until this node restarts)", self.ban_file, exc)


def _read_json(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def _write_json(path: Path, records: list[dict[str, Any]]) -> None:
    """Replace the file atomically (write a temp file beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(records, f, separators=(",", ":"))
    os.replace(tmp, path)
