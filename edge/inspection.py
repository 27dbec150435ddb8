"""What one cache node holds for a URL, for operators (admin ``GET /inspect?url=``).

For the URL's cache key: whether an object is stored, in which tier
(memory, disk or both), every Vary variant, and for each its age, the
freshness left (ttl), size, validators, tags and purge state, as the
pipeline would see it now (bans included).  Reading never changes the
memory tier's LRU order; a disk entry's meta is read on a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Any

from edge import policy
from edge.cachekey import VARIANT_SEPARATOR
from edge.config import Site
from edge.proxy import GENERATION_FIELD, VARY_MARKER_STATUS, CacheNode
from edge.store import Meta

SLICE = 4096        # keys examined between two yields to the event loop


async def describe(node: CacheNode, site: Site, key: str, url: str) -> dict[str, Any]:
    """The JSON-able record of what `node` holds at `key` (the cache key of `url`)."""
    primary = await _stored(node, key)
    record: dict[str, Any] = {"node": node.node.name, "role": node.node.role, "url": url, "key": key,
                              "vary": None, "objects": []}
    if primary is None:
        record["present"] = False
        return record
    meta, tiers = primary
    keys = [key]
    if meta.status == VARY_MARKER_STATUS:
        record["vary"] = list(policy.vary_names(meta.fields) or ())
        generation = meta.fields.get(GENERATION_FIELD, "")
        keys = await _keys_with_prefix(node, f"{key}{VARIANT_SEPARATOR}{generation}{VARIANT_SEPARATOR}")
    for object_key in keys:
        found = primary if object_key == key else await _stored(node, object_key)
        if found is not None and found[0].status != VARY_MARKER_STATUS:
            record["objects"].append(_object(node, site, object_key, *found))
    record["present"] = any(o["state"] != "purged" for o in record["objects"])
    return record


async def _stored(node: CacheNode, key: str) -> tuple[Meta, list[str]] | None:
    """The newest meta stored at `key` and the tiers holding it."""
    meta, tiers = None, []
    for tier in node.store.tiers():
        peek = getattr(tier, "peek", None)
        stored = peek(key) if peek is not None else await tier.get(key)
        if stored is not None:
            tiers.append(tier.name)
            meta = meta or stored.meta
    return (meta, tiers) if meta is not None else None


async def _keys_with_prefix(node: CacheNode, prefix: str) -> list[str]:
    found: dict[str, None] = {}
    for tier in node.store.tiers():
        for i, key in enumerate(tier.keys()):
            if i % SLICE == SLICE - 1:
                await asyncio.sleep(0)
            if key.startswith(prefix):
                found[key] = None
    return list(found)


def _object(node: CacheNode, site: Site, key: str, meta: Meta, tiers: list[str]) -> dict[str, Any]:
    seen = node.after_bans(key, meta)
    state = "purged"
    if seen is not None:
        age, ttl = node.age_and_ttl(seen, site)
        state = "soft-purged" if seen.stale_at is not None else "fresh" if ttl > 0 else "stale"
    else:
        age, ttl = node.age_and_ttl(meta, site)
    fields = meta.fields
    variant = key.split(VARIANT_SEPARATOR, 2)[2] if VARIANT_SEPARATOR in key else ""
    return {
        "variant": variant.replace(VARIANT_SEPARATOR, "; "),
        "tiers": tiers,
        "status": meta.status,
        "state": state,
        "age": int(age),
        "ttl": int(ttl),
        "size": meta.size,
        "etag": fields.get("ETag"),
        "last_modified": fields.get("Last-Modified"),
        "cache_control": fields.get("Cache-Control"),
        "tags": list(meta.tags),
        "stored_at": meta.response_time,
        "stale_at": seen.stale_at if seen is not None else None,
    }
