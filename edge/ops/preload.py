"""``edge preload``: fetch URLs into their owner L2 and, optionally, into the L1s of some regions.

Each URL is requested (a plain GET, as a client would, its body read and
dropped) from the L2 that owns its cache key on the consistent-hash ring,
the same ring the L1s use (every distinct ring among the L1s, so an L1 with
other parents or weights gets its own owner too), then from each L1 of the
regions asked for, which fetch it from that L2.  What each node did is read
from its own ``Cache-Status`` entry: ``stored``, already fresh (``hit``), or
failed (an error, an unreachable node, or a response the node would not
store, with the reason it gave).  At most ``concurrency`` URLs are under way
at once; progress goes to stderr, the summary to stdout.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

import aiohttp

from edge.cachekey import cache_key, split_url
from edge.config import Node, Topology
from edge.ops.table import render
from edge.upstream.ring import HashRing

OUTCOMES = ("stored", "fresh", "failed")


@dataclass
class Result:
    url: str
    node: str
    outcome: str        # stored | fresh | failed
    detail: str = ""


def rings(topology: Topology) -> list[HashRing]:
    """The distinct parent rings of the topology's L1s, built as each L1 builds its own
    (every L2 on one ring when there is no L1)."""
    found: dict[tuple, HashRing] = {}
    for l1 in topology.by_role("l1"):
        weights = {name: 1.0 for name in l1.parents}
        weights.update(dict(l1.parent_weights))
        if weights:
            found.setdefault(tuple(sorted(weights.items())), HashRing(weights))
    if not found and topology.by_role("l2"):
        found[()] = HashRing({node.name: 1.0 for node in topology.by_role("l2")})
    return list(found.values())


def owners(topology: Topology, key: str, on: list[HashRing] | None = None) -> list[Node]:
    """The L2s owning `key` on those rings (one L2 when the L1s agree)."""
    names = sorted({ring.owner(key) for ring in (on if on is not None else rings(topology))} - {None})
    return [topology.node(name) for name in names]


def l1s_in(topology: Topology, regions: list[str]) -> list[Node]:
    """The L1s of these regions ("all": every L1); ValueError naming an unknown region."""
    l1s = topology.by_role("l1")
    if regions == ["all"]:
        return list(l1s)
    known = {r.name for r in topology.regions} | {n.region for n in l1s if n.region}
    unknown = [r for r in regions if r not in known]
    if unknown:
        raise ValueError(f"unknown region {unknown[0]!r} (have: {', '.join(sorted(known)) or 'none'})")
    return [node for node in l1s if node.region in regions]


def plan(topology: Topology, urls: list[str], regions: list[str]) -> list[tuple[str, list[Node]]]:
    """Each URL with the nodes to fetch it through, owner L2s first; ValueError for a bad URL."""
    l1s = l1s_in(topology, regions) if regions else []
    parent_rings = rings(topology)
    steps = []
    for url in urls:
        site, host, target = split_url(topology, url)
        nodes = owners(topology, cache_key(site, target, host), parent_rings) + l1s
        if not nodes:
            raise ValueError("nothing to preload into: the topology has no L2, and no --regions were given")
        steps.append((url, nodes))
    return steps


def classify(node: str, status: int, headers) -> tuple[str, str]:
    """(outcome, detail) of one node's answer, from its own Cache-Status entry."""
    entry = ""
    for member in headers.get("Cache-Status", "").split(","):
        if member.split(";", 1)[0].strip() == node:
            entry = member.strip()
    params = {name.strip(): value.strip() for name, _, value in (p.partition("=") for p in entry.split(";")[1:])}
    x_cache = headers.get("X-Cache", "")
    if status >= 400:
        return "failed", f"HTTP {status} {x_cache}".strip()
    if "stored" in params or x_cache in ("REVALIDATED", "UPDATING"):
        return "stored", x_cache
    if "hit" in params and x_cache == "HIT":
        return "fresh", x_cache
    return "failed", f"not stored ({params.get('detail', x_cache or 'no Cache-Status')})"


class Progress:
    """A one-line progress bar on a terminal; a line per tenth of the work otherwise."""

    def __init__(self, total: int, stream: TextIO):
        self.total, self.stream = total, stream
        self.done = 0
        self.counts: Counter[str] = Counter()
        self.tty = stream.isatty()
        self._last_tenth = -1

    def step(self, outcome: str) -> None:
        self.done += 1
        self.counts[outcome] += 1
        tenth = self.done * 10 // max(self.total, 1)
        if not self.tty and tenth == self._last_tenth:
            return
        self._last_tenth = tenth
        width = 30
        filled = width * self.done // max(self.total, 1)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}  "
                + "  ".join(f"{name} {self.counts[name]}" for name in OUTCOMES))
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        if self.tty and self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


async def preload(topology: Topology, steps: list[tuple[str, list[Node]]], concurrency: int = 8,
                  headers: dict[str, str] | None = None, timeout: float = 60.0,
                  out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Fetch every step's URL through its nodes; 0 when nothing failed, else 1."""
    progress = Progress(sum(len(nodes) for _, nodes in steps), err)
    results: list[Result] = []
    gate = asyncio.Semaphore(concurrency)
    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=concurrency * 4)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        async def one(url: str, nodes: list[Node]) -> None:
            async with gate:
                site, host, target = split_url(topology, url)
                for node in nodes:      # the owner L2 first: the L1s then fill from it
                    result = await _fetch(http, node, host, target, url, headers or {})
                    results.append(result)
                    progress.step(result.outcome)

        await asyncio.gather(*(one(url, nodes) for url, nodes in steps))
    counts = Counter(r.outcome for r in results)
    out.write(f"preloaded {len(steps)} URLs through {progress.total} node fetches in "
              f"{time.monotonic() - started:.1f}s: {counts['stored']} stored, {counts['fresh']} already fresh, "
              f"{counts['failed']} failed\n")
    failed = [r for r in results if r.outcome == "failed"]
    if failed:
        out.write(render(("URL", "NODE", "PROBLEM"), [(r.url, r.node, r.detail) for r in failed]))
    return 1 if failed else 0


async def _fetch(http: aiohttp.ClientSession, node: Node, host: str, target: str, url: str,
                 headers: dict[str, str]) -> Result:
    try:
        async with http.get(f"{node.listen.url}{target}", headers={**headers, "Host": host},
                            allow_redirects=False) as response:
            async for _ in response.content.iter_chunked(1 << 20):
                pass                    # read to the end: a streamed fill is stored when it completes
            outcome, detail = classify(node.name, response.status, response.headers)
    except asyncio.TimeoutError:
        return Result(url, node.name, "failed", f"no complete answer from {node.listen}")
    except (aiohttp.ClientError, OSError) as exc:
        return Result(url, node.name, "failed", f"cannot fetch from {node.listen}: {exc}")
    return Result(url, node.name, outcome, detail)
