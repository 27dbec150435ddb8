"""Hit ratio of our memory store on a seeded Zipf trace, against an exact LRU.

Each request asks the store (``get``); on a miss the body is stored the way
the proxy stores it (``writer`` -> ``write`` -> ``commit``).  The store is
sized in bytes to a share of the trace's working set, with no per-object
limit below that, and the exact LRU of :mod:`benchmarks.zipf` gets the same
byte budget.  The store charges each entry the RAM it really takes (its
body plus about 2.2 KiB for the key, the one header field and the Python
objects: :func:`edge.store.memory.entry_charge`), so it holds fewer objects
than the simulation, which counts bodies only: that difference is part of
what is measured.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from benchmarks import report, zipf
from benchmarks.context import Bench


@dataclass(frozen=True)
class HitRatioResult:
    alpha: float
    share: float
    capacity_bytes: int
    store: zipf.HitCounts
    lru: zipf.HitCounts
    store_seconds: float


async def replay_store(trace: zipf.Trace, capacity_bytes: int) -> tuple[zipf.HitCounts, float]:
    from edge.store.base import Meta
    from edge.store.memory import MemoryStore

    store = MemoryStore(max_bytes=capacity_bytes, max_object_bytes=capacity_bytes)
    await store.start()
    largest = max(trace.sizes)
    pool = bytes(largest)        # bodies are slices of one buffer: content does not matter here
    counts = zipf.HitCounts()
    sizes = trace.sizes
    started = time.perf_counter()
    for key in trace.requests:
        size = sizes[key]
        name = f"obj-{key}"
        stored = await store.get(name)
        counts.record(size, stored is not None)
        if stored is None:
            meta = Meta(status=200, headers=(("Content-Type", "application/octet-stream"),),
                        request_time=0.0, response_time=0.0, size=size, url=f"/{name}")
            writer = store.writer(name, size_hint=size)
            await writer.write(pool[:size])
            await writer.commit(meta)
    elapsed = time.perf_counter() - started
    await store.close()
    return counts, elapsed


def measure(bench: Bench) -> list[HitRatioResult]:
    settings = bench.settings
    results = []
    for alpha in settings.trace_alphas:
        trace = zipf.make_trace(settings.trace_requests, settings.trace_objects, alpha, settings.trace_seed)
        working_set = trace.working_set_bytes
        for share in settings.cache_shares:
            capacity = int(working_set * share)
            lru = zipf.simulate_lru(trace, capacity)
            store, seconds = asyncio.run(replay_store(trace, capacity))
            bench.log(f"hit ratio alpha {alpha} cache {share:.0%}: store {store.object_ratio:.3f}/"
                      f"{store.byte_ratio:.3f}, LRU {lru.object_ratio:.3f}/{lru.byte_ratio:.3f} "
                      f"(object/byte), replay {seconds:.1f} s")
            results.append(HitRatioResult(alpha, share, capacity, store, lru, seconds))
    return results


def table(results: list[HitRatioResult], requests: int, objects: int, seed: int) -> report.Table:
    out = report.Table(
        f"Hit ratio (Zipf trace: {requests:,} requests, {objects:,} objects, seed {seed})",
        ["alpha", "cache", "capacity MiB", "store object HR", "LRU object HR", "store byte HR",
         "LRU byte HR", "store ops/s"])
    for r in results:
        out.add(f"{r.alpha:g}", f"{r.share:.0%} of working set", report.mib(r.capacity_bytes),
                f"{r.store.object_ratio:.4f}", f"{r.lru.object_ratio:.4f}",
                f"{r.store.byte_ratio:.4f}", f"{r.lru.byte_ratio:.4f}",
                report.rate(r.store.requests / r.store_seconds if r.store_seconds else 0.0))
    out.notes.append("Object sizes log-uniform 256 B - 256 KiB; the store is edge.store.memory.MemoryStore "
                     "(charges each entry its RAM: body + about 2.2 KiB here); LRU is an exact byte-bounded "
                     "simulation of the same capacity, counting bodies only.")
    return out
