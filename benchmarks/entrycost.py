"""What one cache entry costs in RAM: a memory-tier entry and a disk-index entry, measured.

``python -m benchmarks.entrycost`` prints both, so that the figures in the
README and the constants of :mod:`edge.store.memory` can be checked on any
interpreter.  Everything runs in this process, with no server and no load.

* **Memory tier.**  ``count`` entries of one shape (body size, header
  fields, key) are stored in a :class:`~edge.store.memory.MemoryStore` the
  way the proxy stores them (the fields decoded from bytes as the upstream
  client does, then kept as the pipeline keeps them: names become the
  multidict's ``istr``), then each is hit once through the real hit path
  (:meth:`edge.proxy.CacheNode.hit_now`), which builds what a hit keeps with
  the entry: the header multidict, the policy's assessment and the
  pre-serialised header block.  The heap growth per entry (``tracemalloc``,
  after a garbage collection) is reported as stored and after the hit, next
  to what the tier charges the entry (:func:`edge.store.memory.entry_charge`).
* **Disk index.**  ``count`` keys are indexed by a
  :class:`~edge.store.disk.DiskStore` (the index entry every commit makes,
  ``_index_put``); the heap growth per entry includes the key string, which
  only the index holds once the memory tier has let the entry go.  A smaller
  run through real commits (files in a temporary directory) checks that a
  commit leaves nothing else behind in RAM.

``tracemalloc`` counts the bytes Python asked for; the allocator rounds
small objects up to 16 bytes and keeps pools, so the process's RSS grows by
a little more.  :func:`rss_growth_per_entry` measures that too (in a
separate pass: tracing itself costs memory).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path

SITE_HOST = "mem.example.com"
NODE_NAME = "l1-mem"
# The fields an L1 stores for a 1 KiB object from a static nginx origin (as the
# memory scenario's L1 does): nginx's own, the hop's Age, and the Date.
NGINX_FIELDS = (
    ("Server", "nginx/1.22.1"), ("Date", "Tue, 01 Dec 2026 22:46:55 GMT"),
    ("Content-Type", "application/octet-stream"), ("Last-Modified", "Tue, 01 Dec 2026 22:40:00 GMT"),
    ("ETag", '"692e1a30-400"'), ("Cache-Control", "public, max-age=3600"), ("Accept-Ranges", "bytes"),
)
# What an L1 behind an L2 also keeps: the parent's Via, Cache-Status and Age.
L2_FIELDS = (("Age", "0"), ("Via", "1.1 l2"), ("Cache-Status", "l2; fwd=uri-miss; fwd-status=200; stored; ttl=3600"))


@dataclass(frozen=True)
class Shape:
    """One kind of stored response."""

    name: str
    body: int                                   # body bytes
    fields: tuple[tuple[str, str], ...]         # response header fields
    path_length: int = 24                       # length of the request target (the URL path)


SHAPES = (
    Shape("1 KiB from nginx, 7 fields", 1024, NGINX_FIELDS),
    Shape("1 KiB behind an L2, 10 fields", 1024, NGINX_FIELDS + L2_FIELDS),
    Shape("empty body, 2 fields", 0, NGINX_FIELDS[1:2] + NGINX_FIELDS[5:6]),
    Shape("1 KiB, 20 fields, 50-byte values", 1024, NGINX_FIELDS[1:2] + NGINX_FIELDS[5:6]
          + tuple((f"X-Field-{i:02d}", "v" * 50) for i in range(18))),
    Shape("1 KiB, 10 fields, 200-byte path", 1024, NGINX_FIELDS + L2_FIELDS, path_length=200),
    Shape("64 KiB behind an L2, 10 fields", 64 * 1024, NGINX_FIELDS + L2_FIELDS),
)


@dataclass(frozen=True)
class MemoryEntryCost:
    shape: Shape
    count: int
    stored: float           # heap bytes per entry as stored by a miss
    after_hit: float        # ... once a hit has built its header block and assessment
    charged: float          # what the memory tier charges it against memory_size

    @property
    def charge_over_heap(self) -> float:
        """Charged / true cost after a hit: 1.0 or a little more is right."""
        return self.charged / self.after_hit if self.after_hit else 0.0


def _topology():
    from edge import config
    return config.parse(f"""
[sites.mem]
hosts = ["{SITE_HOST}"]
origin = "http://127.0.88.2:8080"
[nodes.{NODE_NAME}]
role = "l1"
listen = "127.0.88.1:8080"
admin = "127.0.88.1:8091"
parents = []
""", "entrycost.toml", Path(tempfile.gettempdir()))


def target(i: int, length: int = 24) -> str:
    """The i-th unique request target, padded to `length` characters."""
    return f"/gen/mem-{i}-".ljust(length, "x")


def _heap() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


class MemoryFill:
    """A memory tier and the node whose hit path reads it, filled with entries of one shape."""

    def __init__(self, shape: Shape):
        from prometheus_client import CollectorRegistry

        from edge.metrics import NodeMetrics
        from edge.proxy import CacheNode
        from edge.store.memory import MemoryStore
        from edge.upstream.client import UpstreamPool

        self.shape = shape
        topology = _topology()
        node = topology.node(NODE_NAME)
        self.site = topology.sites[0]
        self.store = MemoryStore(max_bytes=2**40, max_object_bytes=2**40)
        metrics = NodeMetrics(CollectorRegistry())
        self.node = CacheNode(topology, node, store=self.store, upstreams=UpstreamPool(topology, node, metrics),
                              metrics=metrics)
        self.host = SITE_HOST.encode()
        self.node.hit_now("GET", "/warm-up", self.host, None)     # the Host memo is per node, not per entry
        self.count = 0

    def fill(self, count: int) -> None:
        """Store `count` entries as the proxy stores a miss: the fields as the upstream client
        parses them (new strings each), kept as the pipeline keeps them; a new body each."""
        from multidict import CIMultiDict, CIMultiDictProxy

        from edge.cachekey import cache_key
        from edge.proxy import _storable_headers
        from edge.store.base import Meta

        shape = self.shape
        now = time.time()
        date = formatdate(now, usegmt=True)     # fresh for the hit path: its age is 0
        raw = [(name.encode("latin-1"), (date if name == "Date" else value).encode())
               for name, value in shape.fields]
        for i in range(self.count, self.count + count):
            path = target(i, shape.path_length)
            parsed: CIMultiDict[str] = CIMultiDict()
            for name, value in raw:             # as edge.upstream.http1 builds a response's headers
                parsed.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            fields = tuple(_storable_headers(CIMultiDictProxy(parsed), now))
            meta = Meta(status=200, headers=fields, request_time=now, response_time=now, size=shape.body,
                        url=f"{SITE_HOST}{path}")
            self.store.put(cache_key(self.site, path, SITE_HOST), meta, os.urandom(shape.body))
        self.count += count

    def hit_all(self) -> None:
        """One hit on each entry through the front's hit path, which builds what hits keep."""
        for i in range(self.count):
            if self.node.hit_now("GET", target(i, self.shape.path_length), self.host, None) is None:
                raise RuntimeError(f"entry {i} of {self.shape.name!r} was not a hit")


def memory_entry_cost(shape: Shape, count: int = 20_000) -> MemoryEntryCost:
    """Store `count` entries of `shape`, hit each once; heap bytes per entry before and after the hit."""
    entries = MemoryFill(shape)
    tracemalloc.start()
    try:
        base = _heap()
        entries.fill(count)
        stored = _heap() - base
        entries.hit_all()
        after_hit = _heap() - base
    finally:
        tracemalloc.stop()
    return MemoryEntryCost(shape, count, stored / count, after_hit / count, entries.store.bytes / count)


def memory_entry_rss(shape: Shape, count: int = 100_000) -> float:
    """RSS growth per entry of `shape`, stored and hit once, untraced (allocator rounding included)."""
    entries = MemoryFill(shape)
    gc.collect()
    before = _rss()
    entries.fill(count)
    entries.hit_all()
    gc.collect()
    return (_rss() - before) / count


def disk_index_entry_cost(count: int, key_length: int) -> float:
    """Heap bytes per disk-index entry (key string included) with `count` keys indexed."""
    return _index_cost(count, key_length, through_commits=False)


def disk_index_entry_cost_by_commits(count: int, key_length: int) -> float:
    """The same through real commits (a body and a meta file each, in a temporary directory)."""
    return _index_cost(count, key_length, through_commits=True)


def _index_cost(count: int, key_length: int, through_commits: bool) -> float:
    from edge.store.base import Meta
    from edge.store.disk import DiskStore

    async def run(directory: Path) -> float:
        disk = DiskStore(directory, max_bytes=2**50)
        await disk.start()
        await disk.rebuilt.wait()           # an empty directory: the start-up scan is done at once
        meta = Meta(status=200, headers=NGINX_FIELDS, request_time=0.0, response_time=0.0, size=1024)
        body = bytes(1024)
        tracemalloc.start()
        try:
            base = _heap()
            for i in range(count):
                key = f"{SITE_HOST}|{i}|".ljust(key_length, "k")
                if through_commits:
                    writer = disk.writer(key, size_hint=1024)
                    await writer.write(body)
                    if not await writer.commit(meta):
                        raise RuntimeError(f"disk commit {i} failed")
                else:
                    disk._index_put(key, 1500 + i)      # what every commit does to the index
                del key
            grown = _heap() - base
        finally:
            tracemalloc.stop()
        if disk.objects != count:
            raise RuntimeError(f"{disk.objects} entries indexed, expected {count}")
        await disk.close()
        return grown / count

    with tempfile.TemporaryDirectory(prefix="entrycost-") as directory:
        return asyncio.run(run(Path(directory)))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_shape(index: int, count: int, rss_count: int) -> dict[str, float]:
    """Every figure of one shape, RSS first (in a fresh process, before anything was freed)."""
    shape = SHAPES[index]
    rss = memory_entry_rss(shape, rss_count)
    cost = memory_entry_cost(shape, count)
    return {"stored": cost.stored, "after_hit": cost.after_hit, "rss": rss, "charged": cost.charged}


def _in_child(index: int, count: int, rss_count: int) -> dict[str, float]:
    """measure_shape in a new interpreter: RSS growth means something only in a fresh heap."""
    completed = subprocess.run([sys.executable, "-m", "benchmarks.entrycost", "--shape", str(index),
                                "--count", str(count), "--rss-count", str(rss_count)],
                               capture_output=True, text=True, timeout=600, check=True,
                               cwd=Path(__file__).resolve().parent.parent)
    return json.loads(completed.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.entrycost", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="traced entries per shape (default 20,000)")
    parser.add_argument("--rss-count", type=int, default=50_000,
                        help="entries per shape for the untraced RSS growth (default 50,000)")
    parser.add_argument("--index-count", type=int, default=300_000,
                        help="disk-index entries (default 300,000, the memory scenario's count)")
    parser.add_argument("--shape", type=int, help=argparse.SUPPRESS)    # one shape, JSON out (a child)
    args = parser.parse_args(argv)
    if args.shape is not None:
        print(json.dumps(measure_shape(args.shape, args.count, args.rss_count)))
        return 0
    from edge.cachekey import cache_key
    key_length = len(cache_key(_topology().sites[0], target(args.index_count), SITE_HOST))

    print(f"Memory tier: bytes per entry; heap from tracemalloc ({args.count:,} entries), RSS growth "
          f"untraced ({args.rss_count:,} entries, stored and hit once), each shape in a fresh interpreter")
    print(f"  {'shape':34} {'heap stored':>11} {'heap hit':>9} {'RSS hit':>8} {'charged':>8} {'charged/RSS':>11}")
    for index, shape in enumerate(SHAPES):
        cost = _in_child(index, args.count, args.rss_count)
        print(f"  {shape.name:34} {cost['stored']:11.0f} {cost['after_hit']:9.0f} {cost['rss']:8.0f} "
              f"{cost['charged']:8.0f} {cost['charged'] / cost['rss']:11.2f}")
    print(f"Disk index: heap bytes per entry, key ({key_length} characters) included:")
    for count in sorted({20_000, 100_000, args.index_count}):
        print(f"  {count:>9,} entries indexed: {disk_index_entry_cost(count, key_length):6.0f}")
    commits = min(args.count, 20_000)
    print(f"  {commits:>9,} real commits:     {disk_index_entry_cost_by_commits(commits, key_length):6.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
