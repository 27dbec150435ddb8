"""Merging the workers' expositions into the node's (edge.metricsmerge): tables of literal text.

The text is what prometheus-client writes (format 0.0.4: a counter's TYPE line names it with
``_total``), parsed as the node's main process parses its workers' answers.
"""

from __future__ import annotations

import pytest

from edge.metricsmerge import Carry, merge, parse


def exposition(*lines: str) -> list:
    return parse("\n".join(lines) + "\n")


def values(families) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


REQUESTS = ("# TYPE edge_requests_total counter", 'edge_requests_total{cache_status="HIT"} {n}')


def requests(n: float, *more: str) -> list:
    return exposition(REQUESTS[0], REQUESTS[1].replace("{n}", str(n)), *more)


@pytest.mark.parametrize("family, kind, labels, a, b, expected", [
    # counters and histograms add up
    ("edge_upstream_requests_total", "counter", '{upstream="origin"}', 3, 4, 7),
    ("edge_inflight_requests", "gauge", "", 2, 5, 7),
    # the memory tiers are one per worker, the disk tier is the node's: seen alike by both
    ("edge_cache_objects", "gauge", '{tier="memory"}', 10, 12, 22),
    ("edge_cache_objects", "gauge", '{tier="disk"}', 30, 30, 30),
    ("edge_cache_bytes", "gauge", '{tier="disk"}', 900, 905, 905),
    ("edge_cache_evictions_total", "counter", '{tier="disk"}', 4, 4, 4),
    # 0 if any worker refused the reload; a parent is up only while every worker sees it up
    ("edge_config_last_reload_successful", "gauge", "", 1, 0, 0),
    ("edge_parent_up", "gauge", '{parent="l2-a"}', 1, 0, 0),
    ("edge_build_info", "gauge", '{version="1"}', 1, 1, 1),
    ("edge_bans", "gauge", "", 2, 2, 2),
])
def test_a_series_combines_by_its_family(family, kind, labels, a, b, expected):
    merged = merge([("0", 10, exposition(f"# TYPE {family} {kind}", f"{family}{labels} {a}")),
                    ("1", 11, exposition(f"# TYPE {family} {kind}", f"{family}{labels} {b}"))])
    found = [v for (name, _), v in values(merged).items() if name == family]
    assert found == [expected]


def test_process_figures_keep_one_series_per_process_and_requests_get_a_worker_share():
    cpu = ("# TYPE process_cpu_seconds_total counter", "process_cpu_seconds_total 1.5")
    merged = values(merge([("main", 1, exposition(*cpu)), ("0", 10, requests(7, *cpu)), ("1", 11, requests(5, *cpu))]))
    assert merged[("process_cpu_seconds_total", (("worker", "main"),))] == 1.5
    assert merged[("process_cpu_seconds_total", (("worker", "1"),))] == 1.5
    assert merged[("edge_requests_total", (("cache_status", "HIT"),))] == 12
    assert merged[("edge_worker_requests_total", (("worker", "0"),))] == 7
    assert merged[("edge_worker_requests_total", (("worker", "1"),))] == 5


def test_a_counters_created_time_is_the_earliest_not_a_sum():
    lines = ("# TYPE edge_purges_total counter", "edge_purges_total 1",
             "# TYPE edge_purges_created gauge", "edge_purges_created 100")
    other = ("# TYPE edge_purges_total counter", "edge_purges_total 1",
             "# TYPE edge_purges_created gauge", "edge_purges_created 90")
    merged = values(merge([("0", 1, exposition(*lines)), ("1", 2, exposition(*other))]))
    assert merged[("edge_purges_total", ())] == 2 and merged[("edge_purges_created", ())] == 90


def test_counters_stay_monotonic_when_a_worker_is_restarted():
    carry = Carry()
    steps = [
        # (worker 0's pid, its count, worker 1's count, the node's total)
        (100, 40, 10, 50),
        (100, 45, 12, 57),
        (200, 0, 13, 58),       # worker 0 restarted: its 45 are kept
        (200, 3, 14, 62),
        (300, 1, 15, 64),       # restarted again: 45 + 3 kept (what pid 200 counted after its last scrape is lost)
    ]
    for pid, zero, one, total in steps:
        merged = values(merge([("0", pid, requests(zero)), ("1", 11, requests(one))], carry))
        assert merged[("edge_requests_total", (("cache_status", "HIT"),))] == total
    assert merged[("edge_worker_requests_total", (("worker", "0"),))] == 49


def test_series_a_restarted_worker_has_not_shown_yet_keep_the_old_counts():
    carry = Carry()
    upstream = ("# TYPE edge_upstream_requests_total counter", 'edge_upstream_requests_total{upstream="origin"} 9')
    merge([("0", 100, requests(1, *upstream))], carry)
    merged = values(merge([("0", 200, requests(0))], carry))      # the new process has fetched nothing yet
    assert merged[("edge_upstream_requests_total", (("upstream", "origin"),))] == 9
