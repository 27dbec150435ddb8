"""The status page on the scheduler's admin listener: every node, its health and traffic, at a glance.

The scheduler already watches every L1 (its health checks decide the DNS
answers), so the page lives here: ``GET /`` is a small HTML page (with
``/ui/app.js`` and ``/ui/style.css``, shipped in the package, nothing
fetched from elsewhere) that polls ``GET /api/overview``, one JSON document
this module builds.  Same origin, so the admin listener's allow list covers
the page and its data alike, and no CORS is needed.

Every `interval` seconds :class:`Overview` reads each cache node's and the
origin's own ``/metrics`` (and the ``/healthz`` of the nodes the scheduler
does not already probe: L2s and the origin) and keeps the counters it needs,
summed, for the last :data:`HISTORY_SECONDS`: request rate and hit ratio per
node, and per site at the L1s (the traffic clients see).  The charts are
drawn from those counters, so they show what Prometheus would, from the same
source.  The resolver hands every answer to :meth:`Overview.record`, which
keeps the last few per region (a bounded deque per region of the topology).

The work is small and bounded: one GET per node and round (two for L2s and
the origin), the exposition parsed in a worker thread (never on the loop that
answers DNS), and a fixed number of rounds kept.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from edge.config import Node, Topology
from edge.metrics import HIT_STATUSES, LOOKUP_STATUSES
from edge.scheduler.answer import Answer, EdgeStatus

log = logging.getLogger("edge.dns.overview")

HISTORY_SECONDS = 600.0     # what the charts show: the last ten minutes
RECENT_SECONDS = 30.0       # the "now" figures: rates over the last half minute
ANSWERS_KEPT = 8            # last answers shown per region
MIN_INTERVAL = 1.0          # never scrape the nodes more often than this
STALE_ROUNDS = 2.5          # a node's figures are blank when its last good scrape is older than this
NO_FIGURES: dict[str, float | None] = {"rps": None, "hit_ratio": None, "bytes_per_s": None}
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
# Only our own files: a script or style from anywhere else is refused by the browser.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


# --------------------------------------------------------------------------- counters (pure)


@dataclass(frozen=True)
class Counts:
    """Counters of one scrape, summed over methods and status classes (per site for cache nodes)."""

    requests: float = 0.0
    hits: float = 0.0
    lookups: float = 0.0
    body_bytes: float = 0.0
    sites: Mapping[str, Counts] = field(default_factory=dict)


def read_counts(text: str) -> Counts:
    """The counters the page needs from one node's exposition.

    A cache node's ``edge_requests_total`` and ``edge_response_body_bytes_total``
    (hit ratio as `edge.metrics` defines it), or the origin's ``origin_requests_total``.
    """
    totals = {"requests": 0.0, "hits": 0.0, "lookups": 0.0, "body_bytes": 0.0}
    sites: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "edge_requests_total":
                status = sample.labels.get("cache_status", "")
                keys = ["requests"]
                if status in LOOKUP_STATUSES:
                    keys.append("lookups")
                    if status in HIT_STATUSES:
                        keys.append("hits")
            elif sample.name == "edge_response_body_bytes_total":
                keys = ["body_bytes"]
            elif sample.name == "origin_requests_total":
                keys = ["requests"]
            else:
                continue
            site = sample.labels.get("site")
            per_site = sites.setdefault(site, dict.fromkeys(totals, 0.0)) if site else None
            for key in keys:
                totals[key] += sample.value
                if per_site is not None:
                    per_site[key] += sample.value
    return Counts(**totals, sites={name: Counts(**values) for name, values in sites.items()})


def _increase(before: float, after: float) -> float:
    """A counter's increase; a drop means the node restarted and counted from zero (as Prometheus takes it)."""
    return after - before if after >= before else after


def _ratio(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def rates(before: Counts, after: Counts, seconds: float) -> dict[str, float | None]:
    """Requests per second, hit ratio and bytes per second between two scrapes `seconds` apart."""
    requests = _increase(before.requests, after.requests)
    return {
        "rps": round(requests / seconds, 3) if seconds > 0 else None,
        "hit_ratio": _ratio(_increase(before.hits, after.hits), _increase(before.lookups, after.lookups)),
        "bytes_per_s": round(_increase(before.body_bytes, after.body_bytes) / seconds, 1) if seconds > 0 else None,
    }


Point = tuple[float, float, Counts]     # (monotonic time, wall time, counters)


def series(points: Iterable[Point], pick: Callable[[Counts], Counts | None] = lambda c: c) -> dict[str, list]:
    """Per-interval rates between consecutive points: ``t`` (wall seconds) and one list per figure."""
    out: dict[str, list] = {"t": [], "rps": [], "hit_ratio": []}
    previous = None
    for point in points:
        counts = pick(point[2])
        if previous is not None and counts is not None and previous[1] is not None:
            figures = rates(previous[1], counts, point[0] - previous[0][0])
            out["t"].append(round(point[1], 1))
            out["rps"].append(figures["rps"])
            out["hit_ratio"].append(figures["hit_ratio"])
        previous = (point, counts)
    return out


def recent(points: deque[Point], pick: Callable[[Counts], Counts | None] = lambda c: c,
           seconds: float = RECENT_SECONDS) -> dict[str, float | None]:
    """Rates over the last `seconds` (or as much of them as is kept)."""
    if len(points) < 2:
        return NO_FIGURES
    last = points[-1]
    first = next((p for p in points if last[0] - p[0] <= seconds + 1e-6), points[-2])
    if first is last:
        first = points[-2]
    before, after = pick(first[2]), pick(last[2])
    if after is None:
        return NO_FIGURES
    return rates(before or Counts(), after, last[0] - first[0])


def sum_counts(counts: Iterable[Counts]) -> Counts:
    counts = list(counts)
    return Counts(sum(c.requests for c in counts), sum(c.hits for c in counts),
                  sum(c.lookups for c in counts), sum(c.body_bytes for c in counts))


# --------------------------------------------------------------------------- one node


@dataclass
class NodeWatch:
    """What the page knows of one node: its place, its last probe and its kept counters."""

    node: Node
    lat: float | None
    lon: float | None
    history: deque[Point]
    probed: bool = False            # its /healthz (L2s and the origin; the scheduler probes L1s)
    up: bool = False
    overloaded: bool = False
    detail: str = "not probed yet"
    metrics_error: str | None = "not scraped yet"
    metrics_at: float | None = None


def _located(topology: Topology, node: Node) -> tuple[float | None, float | None]:
    """A node's coordinates: its own, else its region's; None for a node placed nowhere (the origin)."""
    if node.lat is not None and node.lon is not None:
        return node.lat, node.lon
    if node.region is not None:
        region = topology.region(node.region)
        return region.lat, region.lon
    return None, None


# --------------------------------------------------------------------------- the overview


class Overview:
    """Scrapes every node on a beat, keeps a bounded history, and answers /api/overview."""

    def __init__(self, topology: Topology, edge_health: Callable[[], Mapping[str, EdgeStatus]],
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.edge_health = edge_health          # the scheduler's verdict on each L1, read live
        self.clock, self.wall = clock, wall
        self.nodes: dict[str, NodeWatch] = {}
        self.answers: dict[str | None, deque[tuple[float, Answer]]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None
        self.retarget(topology)

    def retarget(self, topology: Topology) -> None:
        """Watch the nodes of a (reloaded) topology; a node that stays keeps its history."""
        assert topology.dns is not None
        self.topology = topology
        self.interval = max(MIN_INTERVAL, topology.dns.health.interval)
        self.timeout = min(topology.dns.health.timeout, self.interval)
        kept = math.ceil(HISTORY_SECONDS / self.interval) + 1
        nodes = {}
        for node in topology.nodes:
            lat, lon = _located(topology, node)
            old = self.nodes.get(node.name)
            if old is not None and old.node.admin == node.admin and old.node.role == node.role:
                old.node, old.lat, old.lon = node, lat, lon
                old.history = deque(old.history, maxlen=kept)
                nodes[node.name] = old
            else:
                nodes[node.name] = NodeWatch(node, lat, lon, deque(maxlen=kept))
        self.nodes = nodes
        regions = {region.name for region in topology.regions}
        for region in [r for r in self.answers if r is not None and r not in regions]:
            del self.answers[region]

    # ------------------------------------------------------------------ per query

    def record(self, answer: Answer) -> None:
        """Keep an answer the resolver gave (a deque append: this runs once per query)."""
        region = answer.location.region if answer.location is not None else None
        kept = self.answers.get(region)
        if kept is None:
            kept = self.answers[region] = deque(maxlen=ANSWERS_KEPT)
        kept.append((self.wall(), answer))

    # ------------------------------------------------------------------ scraping

    async def start(self) -> None:
        # A fresh connection each time, as the health checks do: a kept-alive socket would hide a dead node.
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        self._task = asyncio.create_task(self._run(), name="dns-overview")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            try:
                await self.scrape_all()
            except Exception:                       # a bug here must not stop the page (nor DNS)
                log.exception("status page: scrape round failed")
            next_round = max(next_round + self.interval, loop.time())
            await asyncio.sleep(next_round - loop.time())

    async def scrape_all(self) -> None:
        watches = list(self.nodes.values())
        texts = await asyncio.gather(*(self._scrape(watch) for watch in watches))
        # Parsing the expositions is CPU work: off the loop that answers DNS.
        counted = await asyncio.to_thread(lambda: [read_counts(t) if t is not None else None for t in texts])
        now, wall = self.clock(), self.wall()
        for watch, counts in zip(watches, counted):
            if counts is not None:
                watch.history.append((now, wall, counts))
                watch.metrics_at = round(wall, 3)

    async def _scrape(self, watch: NodeWatch) -> str | None:
        """GET the node's /metrics (and /healthz unless it is an L1); the exposition, or None."""
        admin = watch.node.admin.url
        if watch.node.role != "l1":
            watch.up, watch.overloaded, watch.detail = await self._healthz(f"{admin}/healthz")
            watch.probed = True
        try:
            async with self._get(f"{admin}/metrics") as reply:
                if reply.status != 200:
                    watch.metrics_error = f"/metrics: HTTP {reply.status}"
                    return None
                text = await reply.text()
        except (aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError) as exc:
            watch.metrics_error = f"/metrics: {_error_text(exc)}"
            return None
        watch.metrics_error = None
        return text

    async def _healthz(self, url: str) -> tuple[bool, bool, str]:
        try:
            async with self._get(url) as reply:
                try:
                    body = await reply.json(content_type=None)
                except (ValueError, aiohttp.ClientPayloadError):
                    body = None
                state = body.get("status") if isinstance(body, dict) else None
                if reply.status != 200:
                    return False, False, f"/healthz: HTTP {reply.status}" + (f" ({state})" if state else "")
                return True, isinstance(body, dict) and body.get("overloaded") is True, "probe ok"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, False, f"/healthz: {_error_text(exc)}"

    def _get(self, url: str):
        assert self._session is not None
        return self._session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout))

    # ------------------------------------------------------------------ the document

    def document(self) -> dict[str, Any]:
        """Everything the page shows, as JSON."""
        topology = self.topology
        edge_health = self.edge_health()
        nodes = []
        for watch in self.nodes.values():
            node = watch.node
            if node.role == "l1":
                status = edge_health.get(node.name)
                if status is None or not status.probed:
                    state, detail = "unknown", status.detail if status else "not probed yet"
                else:
                    state = "down" if not status.up else "overloaded" if status.overloaded else "up"
                    detail = status.detail
            elif not watch.probed:
                state, detail = "unknown", watch.detail
            else:
                state = "down" if not watch.up else "overloaded" if watch.overloaded else "up"
                detail = watch.detail
            nodes.append({
                "name": node.name, "role": node.role, "region": node.region, "lat": watch.lat, "lon": watch.lon,
                "admin": node.admin.url, "parents": list(node.parents), "state": state, "detail": detail,
                "metrics_error": watch.metrics_error, "metrics_at": watch.metrics_at,
                "now": recent(watch.history) if self._current(watch) else NO_FIGURES,
                "series": series(watch.history),
            })
        l1s = [w for w in self.nodes.values() if w.node.role == "l1"]
        return {
            "generated": round(self.wall(), 3),
            "interval": self.interval,
            "history_seconds": HISTORY_SECONDS,
            "recent_seconds": RECENT_SECONDS,
            "regions": [{"name": r.name, "lat": r.lat, "lon": r.lon} for r in topology.regions],
            "nodes": nodes,
            "sites": [self._site(site.name, list(site.hosts), l1s) for site in topology.sites],
            "answers": self._answers(),
        }

    def _site(self, name: str, hosts: list[str], l1s: list[NodeWatch]) -> dict[str, Any]:
        """A site's traffic at the L1s: each L1's rates for the site, added up (rates, not counters:
        the L1s' rounds are not the same instants)."""
        pick = lambda counts: counts.sites.get(name, Counts())    # noqa: E731
        per_node = [(recent(w.history, pick) if self._current(w) else NO_FIGURES, series(w.history, pick))
                    for w in l1s]
        now = dict(NO_FIGURES)
        if any(r["rps"] is not None for r, _ in per_node):
            now["rps"] = round(sum(r["rps"] or 0.0 for r, _ in per_node), 3)
            now["bytes_per_s"] = round(sum(r["bytes_per_s"] or 0.0 for r, _ in per_node), 1)
            # Weighted by each L1's traffic, so a quiet edge's ratio does not count as much as a busy one's.
            weighted = [(r["hit_ratio"], r["rps"] or 0.0) for r, _ in per_node if r["hit_ratio"] is not None]
            weight = sum(w for _, w in weighted)
            if weight > 0:
                now["hit_ratio"] = round(sum(h * w for h, w in weighted) / weight, 4)
        longest = max((s for _, s in per_node), key=lambda s: len(s["t"]), default={"t": [], "rps": []})
        rps = [0.0] * len(longest["t"])
        for _, s in per_node:                       # aligned at the newest point
            for i, value in enumerate(reversed(s["rps"])):
                if i < len(rps) and value is not None:
                    rps[len(rps) - 1 - i] += value
        return {"name": name, "hosts": hosts, "now": now,
                "series": {"t": longest["t"], "rps": [round(v, 3) for v in rps]}}

    def _current(self, watch: NodeWatch) -> bool:
        """Were the node's counters read in the last rounds?  A node that stopped answering has no
        "now" figures (its charts keep what was read, and stop)."""
        return bool(watch.history) and self.clock() - watch.history[-1][0] <= STALE_ROUNDS * self.interval

    def _answers(self) -> list[dict[str, Any]]:
        regions: list[str | None] = [region.name for region in self.topology.regions]
        if None in self.answers:
            regions.append(None)
        out = []
        for region in regions:
            kept = self.answers.get(region, ())
            out.append({"region": region, "answers": [_answer_json(at, answer) for at, answer in reversed(kept)]})
        return out


def _answer_json(at: float, answer: Answer) -> dict[str, Any]:
    question = answer.response.question[0] if answer.response.question else None
    location = answer.location
    return {
        "at": round(at, 3),
        "name": question.name.to_text(omit_final_dot=True) if question is not None else "",
        "client": str(location.address) if location is not None else "",
        "via": location.via if location is not None else "",
        "edges": [edge.name for choice in answer.choices for edge in choice.chosen],
        "all_down": answer.all_down,
    }


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}".lower()
    return f"{type(exc).__name__}: {exc}".rstrip(": ")


# --------------------------------------------------------------------------- routes


def _assets() -> dict[str, bytes]:
    """The page's files, shipped in the package (pyproject's package-data), read once."""
    folder = resources.files("edge.scheduler").joinpath("ui")
    return {name: folder.joinpath(name).read_bytes() for name in ("index.html", *ASSETS)}


def routes(overview: Overview) -> list[web.RouteDef]:
    assets = _assets()

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=assets["index.html"], content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(body=assets[name], headers={**SECURITY_HEADERS, "Content-Type": ASSETS[name]})

    async def document(request: web.Request) -> web.Response:
        return web.json_response(overview.document(), headers={"Cache-Control": "no-store"})

    return [web.get("/", page), web.get("/ui/{name}", asset), web.get("/api/overview", document)]
