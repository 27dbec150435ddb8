"""The status page's arithmetic (edge.scheduler.overview), without a network.

The counters come from a real NodeMetrics registry rendered by prometheus-client,
exactly the text a node's /metrics sends; time is passed in.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from types import MappingProxyType

import dns.message
from prometheus_client import CollectorRegistry, generate_latest

from edge import config
from edge.metrics import NodeMetrics
from edge.scheduler.answer import Answerer, EdgeStatus
from edge.scheduler.overview import ANSWERS_KEPT, Counts, Overview, rates, read_counts, recent, series
from tests.cluster import REPO

TOPOLOGY = config.load()        # the built-in default topology: it is only read here, nothing binds


def exposition(requests: list[tuple[str, str, str, int, int]]) -> str:
    """A node's /metrics after these (site, cache status, method, status, body bytes) requests."""
    metrics = NodeMetrics(CollectorRegistry())
    for site, cache_status, method, status, size in requests:
        metrics.request_done(site, cache_status, method, status, 0.001, size)
    metrics.requests.fast_hit("example", "GET", 100)      # the front's hit path, folded in at scrape
    return generate_latest(metrics.registry).decode()


def test_read_counts_sums_hits_and_lookups_as_edge_status_does() -> None:
    counts = read_counts(exposition([
        ("example", "MISS", "GET", 200, 1000), ("example", "HIT", "HEAD", 200, 0),
        ("example", "STALE", "GET", 200, 10), ("example", "REVALIDATED", "GET", 200, 10),
        ("example", "BYPASS", "POST", 200, 5), ("other", "MISS", "GET", 502, 7), ("", "REFUSED", "GET", 421, 3),
    ]))
    assert (counts.requests, counts.hits, counts.lookups, counts.body_bytes) == (8, 3, 6, 1135)
    assert set(counts.sites) == {"example", "other"}          # "" (no site) only counts in the totals
    example = counts.sites["example"]
    assert (example.requests, example.hits, example.lookups, example.body_bytes) == (6, 3, 5, 1125)


def test_read_counts_of_the_origin() -> None:
    text = '# TYPE origin_requests_total counter\norigin_requests_total{method="GET",status="200"} 7\n' \
           'origin_requests_total{method="GET",status="404"} 2\n'
    assert read_counts(text).requests == 9


def test_rates_take_a_drop_as_a_restart() -> None:
    before, after = Counts(100, 50, 80, 1000), Counts(10, 5, 10, 100)     # restarted and counted anew
    assert rates(before, after, 2.0) == {"rps": 5.0, "hit_ratio": 0.5, "bytes_per_s": 50.0}
    assert rates(Counts(10, 0, 0), Counts(20, 0, 0), 1.0)["hit_ratio"] is None   # no lookups: no ratio


def test_series_and_recent() -> None:
    points = deque([(t, 1000.0 + t, Counts(requests=10 * t, hits=4 * t if t < 3 else 8,
                                               lookups=5 * t if t < 3 else 10)) for t in range(6)])
    drawn = series(points)
    assert drawn["t"] == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0]
    assert drawn["rps"] == [10.0] * 5
    assert drawn["hit_ratio"] == [0.8, 0.8, None, None, None]     # no lookups after t=2
    assert recent(points, seconds=2.0) == {"rps": 10.0, "hit_ratio": None, "bytes_per_s": 0.0}
    assert recent(points, seconds=30.0)["hit_ratio"] == 0.8
    assert recent(deque(list(points)[:1])) == {"rps": None, "hit_ratio": None, "bytes_per_s": None}


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_document_adds_up_sites_over_the_l1s_and_blanks_a_node_that_stopped_answering() -> None:
    clock = Clock()
    health = MappingProxyType({"l1-east": EdgeStatus(up=True, probed=True, detail="probe ok"),
                               "l1-west": EdgeStatus(up=False, probed=True, detail="probe failed")})
    overview = Overview(TOPOLOGY, lambda: health, clock=clock, wall=lambda: 1000.0 + clock.now)
    east, west = overview.nodes["l1-east"], overview.nodes["l1-west"]
    for t in range(4):
        clock.now = float(t)
        east.history.append((clock.now, 1000.0 + t, Counts(10 * t, 9 * t, 10 * t, 0,
                                                           {"example": Counts(10 * t, 9 * t, 10 * t, 100 * t)})))
        west.history.append((clock.now, 1000.0 + t, Counts(30 * t, 0, 30 * t, 0,
                                                           {"example": Counts(30 * t, 0, 30 * t, 50 * t)})))
    document = overview.document()
    states = {n["name"]: n["state"] for n in document["nodes"]}
    assert states == {"origin": "unknown", "l2-a": "unknown", "l2-b": "unknown", "l1-east": "up", "l1-west": "down"}
    (site,) = document["sites"]
    # 10 + 30 req/s; the ratio weighted by traffic: (0.9 * 10 + 0 * 30) / 40.
    assert site["now"] == {"rps": 40.0, "hit_ratio": 0.225, "bytes_per_s": 150.0}
    assert site["series"]["rps"] == [40.0, 40.0, 40.0]
    clock.now = 3.0 + 3 * overview.interval          # no scrape of either L1 for three rounds
    document = overview.document()
    assert all(n["now"]["rps"] is None for n in document["nodes"])
    assert document["sites"][0]["now"]["rps"] is None
    assert len(document["sites"][0]["series"]["rps"]) == 3      # the charts keep what was read


def test_answers_are_kept_per_region_bounded_and_newest_first() -> None:
    overview = Overview(TOPOLOGY, lambda: {})
    answerer = Answerer(TOPOLOGY)
    up = MappingProxyType({})
    for i in range(ANSWERS_KEPT + 3):
        for client in ("127.0.11.1", "127.0.12.1", "192.0.2.1"):     # east, west, no block (default east)
            query = dns.message.make_query("www.example.com", "A")
            overview.record(answerer.answer(query, ipaddress.ip_address(client), up))
    regions = {r["region"]: r["answers"] for r in overview.document()["answers"]}
    assert set(regions) == {"east", "west"}
    assert len(regions["east"]) == ANSWERS_KEPT and len(regions["west"]) == ANSWERS_KEPT
    assert regions["west"][0]["edges"] == ["l1-west", "l1-east"] and regions["west"][0]["client"] == "127.0.12.1"
    assert regions["east"][0] == {**regions["east"][0], "client": "192.0.2.1", "via": "source",
                                  "name": "www.example.com", "edges": ["l1-east", "l1-west"], "all_down": False}


def test_a_reload_keeps_the_history_of_nodes_that_stay() -> None:
    overview = Overview(TOPOLOGY, lambda: {})
    overview.nodes["l1-east"].history.append((0.0, 1000.0, Counts(1)))
    text = (REPO / "deploy" / "local.toml").read_text().replace("[nodes.l1-west]", "[nodes.l1-far]")
    overview.retarget(config.parse(text, "reloaded", REPO))
    assert len(overview.nodes["l1-east"].history) == 1
    assert "l1-west" not in overview.nodes and not overview.nodes["l1-far"].history


def test_the_page_files_are_package_data() -> None:
    """An installed package (a wheel) carries the page: every file of edge/scheduler/ui matches a
    package-data pattern of pyproject.toml (a wheel built from it was checked by hand to hold them)."""
    import fnmatch
    import tomllib
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = REPO / "edge" / "scheduler"
    files = [p.relative_to(folder).as_posix() for p in (folder / "ui").iterdir()]
    assert sorted(files) == ["ui/app.js", "ui/index.html", "ui/style.css"]
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns["edge.scheduler"]), name
