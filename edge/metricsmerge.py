"""One exposition for a node of several workers: its workers' /metrics merged, pure.

Why not prometheus-client's multiprocess mode: it aggregates only Counter,
Gauge and Histogram objects whose values live in per-process mmap files, and
the hot figures of a cache node are deliberately not such objects (the
request counts are plain integers folded into families when scraped, because
a locked metric update cost the hit path about 8%; the store and upstream
gauges are custom collectors read at scrape time).  So the node's main
process scrapes each worker's own exposition over its private Unix socket
and merges the text here, the way MultiProcessCollector merges its files:

* every family is combined across workers sample by sample (same name, same
  labels), by the family's :data:`MODES` entry, ``sum`` unless listed;
* figures of the shared disk tier (``tier="disk"`` objects, bytes, evictions)
  are the same number seen by every worker: ``max``;
* ``process_*`` (CPU, memory, file descriptors: one process each) keep one
  series per process with a ``worker`` label (``main`` for the supervisor);
* ``edge_worker_requests_total{worker}`` is added: each worker's share of the
  requests, the one per-worker view of traffic.

Counters stay monotonic when a worker is restarted: :class:`Carry` adds what
the previous process of that worker slot had counted (as of the last scrape)
to what the new one counts, as multiprocess mode keeps a dead process's file.
Counts made after a worker's last scrape and before it died are lost.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

# How a family's samples combine across workers; anything not listed is summed.
MODES: dict[str, str] = {
    # 0 if any process refused the last reload; the oldest load time of any.
    "edge_config_last_reload_successful": "min",
    "edge_config_last_reload_success_timestamp_seconds": "min",
    # Each worker probes the parents itself: up only while every worker sees it up.
    "edge_parent_up": "min",
    "edge_build_info": "max",
    # Every worker received every purge; its ban list is the node's.
    "edge_bans": "max",
}
SHARED_TIER_FAMILIES = frozenset({"edge_cache_objects", "edge_cache_bytes", "edge_cache_evictions"})
PER_PROCESS_PREFIXES = ("process_", "python_")
MONOTONIC_TYPES = frozenset({"counter", "histogram", "summary"})
REQUESTS_FAMILY = "edge_requests"


@dataclass
class Carry:
    """Counts of the earlier processes of each worker slot, kept across restarts (see the module doc)."""

    base: dict[str, dict[tuple, float]] = field(default_factory=dict)     # slot -> sample key -> value
    last: dict[str, tuple[int, dict[tuple, float]]] = field(default_factory=dict)  # slot -> (pid, values)
    owners: dict[str, Metric] = field(default_factory=dict)   # sample name -> an empty family like its own

    def fold(self, slot: str, pid: int, values: dict[tuple, float]) -> dict[tuple, float]:
        """The slot's monotonic values with every earlier process's last counts added."""
        previous = self.last.get(slot)
        if previous is not None and previous[0] != pid:
            base = self.base.setdefault(slot, {})
            for key, value in previous[1].items():
                base[key] = base.get(key, 0.0) + value
        self.last[slot] = (pid, dict(values))
        base = self.base.get(slot, {})
        if not base:
            return values
        out = dict(values)
        for key, value in base.items():
            out[key] = out.get(key, 0.0) + value
        return out


def _key(sample: Sample) -> tuple:
    return (sample.name, tuple(sorted(sample.labels.items())))


def _monotonic(family: Metric, sample: Sample) -> bool:
    # A counter's _created is a time, not a count: never carried, never summed.
    return (family.type in MONOTONIC_TYPES and not family.name.startswith(PER_PROCESS_PREFIXES)
            and not sample.name.endswith("_created"))


def parse(text: str) -> list[Metric]:
    return list(text_string_to_metric_families(text))


def merge(scrapes: Iterable[tuple[str, int, list[Metric]]], carry: Carry | None = None) -> list[Metric]:
    """Merge the families of each (slot, pid, families) scrape into the node's families.

    `slot` is the worker's number as text (``main`` for the supervisor), `pid`
    its process: a new pid in a slot is a restart, for `carry`.
    """
    carry = carry if carry is not None else Carry()
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple, list[float]]] = {}
    per_worker: list[tuple[str, float]] = []

    def family_like(family: Metric) -> tuple[Metric, dict[tuple, list[float]]]:
        if family.name not in merged:
            merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            values[family.name] = {}
        return merged[family.name], values[family.name]

    for slot, pid, families in scrapes:
        monotonic: dict[tuple, float] = {}
        for family in families:
            for sample in family.samples:
                if _monotonic(family, sample):
                    monotonic[_key(sample)] = sample.value
                    carry.owners.setdefault(sample.name, Metric(family.name, family.documentation,
                                                                family.type, family.unit))
        folded = carry.fold(slot, pid, monotonic) if monotonic else carry.fold(slot, pid, {})
        seen: set[tuple] = set()
        for family in families:
            target, bucket = family_like(family)
            if family.name.startswith(PER_PROCESS_PREFIXES):
                for sample in family.samples:
                    target.samples.append(sample._replace(labels={**sample.labels, "worker": slot}))
                continue
            for sample in family.samples:
                key = _key(sample)
                seen.add(key)
                bucket.setdefault(key, []).append(folded.get(key, sample.value))
        # Counts of an earlier process in series the new one has not shown (yet).
        for key, value in carry.base.get(slot, {}).items():
            if key not in seen and key[0] in carry.owners:
                _, bucket = family_like(carry.owners[key[0]])
                bucket.setdefault(key, []).append(value)
                folded[key] = value
        if slot != "main":
            per_worker.append((slot, sum(v for (name, _), v in folded.items() if name == "edge_requests_total")))
    for name, target in merged.items():
        for (sample_name, labels), found in values[name].items():
            target.samples.append(Sample(sample_name, dict(labels), combine(name, sample_name, dict(labels), found)))
    if per_worker:
        shares = Metric("edge_worker_requests", "Client requests answered by each worker process of the node.",
                        "counter")
        for slot, requests in per_worker:
            shares.samples.append(Sample("edge_worker_requests_total", {"worker": slot}, requests))
        merged[shares.name] = shares
    return list(merged.values())


def combine(family: str, sample_name: str, labels: dict[str, str], found: list[float]) -> float:
    """One series' values across workers."""
    if family in SHARED_TIER_FAMILIES and labels.get("tier") == "disk":
        return max(found)
    mode = "min" if sample_name.endswith("_created") else MODES.get(family, "sum")
    if mode == "min":
        return min(found)
    if mode == "max":
        return max(found)
    return sum(found)


class Families:
    """A collector yielding fixed families, for ``generate_latest``."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families
