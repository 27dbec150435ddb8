"""A seeded Zipf request trace and an exact byte-bounded LRU simulation.

The trace is the workload of the hit-ratio benchmark: object popularity
follows Zipf(alpha) over ``objects`` ranks, each object has a fixed size
drawn log-uniformly (small objects are common, large ones rare, as on a real
CDN), and popularity is shuffled against object ids so that size and
popularity are independent.  Everything derives from one seed, so two runs
replay the same requests.

:class:`LruSimulation` is the yardstick: the textbook LRU bounded in bytes
(evict least recently used until the new object fits; an object larger than
the whole cache is never admitted).  The store under test is reported next
to it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Trace:
    alpha: float
    seed: int
    sizes: tuple[int, ...]      # size in bytes of object id i
    requests: tuple[int, ...]   # object ids, in request order

    @property
    def working_set_bytes(self) -> int:
        """Bytes of every object that is requested at least once."""
        return sum(self.sizes[i] for i in set(self.requests))


def object_sizes(objects: int, seed: int, smallest: int = 256, largest: int = 256 * 2**10) -> list[int]:
    """Log-uniform sizes in [smallest, largest], seeded."""
    rng = random.Random(f"sizes-{seed}")
    low, high = math.log(smallest), math.log(largest)
    return [int(round(math.exp(rng.uniform(low, high)))) for _ in range(objects)]


def zipf_cdf(objects: int, alpha: float) -> list[float]:
    """Cumulative popularity of ranks 1..objects with weight 1/rank**alpha."""
    weights = [1.0 / (rank ** alpha) for rank in range(1, objects + 1)]
    total = sum(weights)
    cdf = list(itertools.accumulate(w / total for w in weights))
    cdf[-1] = 1.0   # guard the last bucket against float round-off
    return cdf


def make_trace(requests: int, objects: int, alpha: float, seed: int) -> Trace:
    """A reproducible trace: the same arguments always give the same requests."""
    rng = random.Random(f"trace-{seed}-{alpha}")
    cdf = zipf_cdf(objects, alpha)
    rank_to_object = list(range(objects))
    rng.shuffle(rank_to_object)
    draws = (bisect.bisect_left(cdf, rng.random()) for _ in range(requests))
    ids = tuple(rank_to_object[min(rank, objects - 1)] for rank in draws)
    return Trace(alpha=alpha, seed=seed, sizes=tuple(object_sizes(objects, seed)), requests=ids)


@dataclass
class HitCounts:
    requests: int = 0
    hits: int = 0
    bytes_requested: int = 0
    bytes_hit: int = 0

    def record(self, size: int, hit: bool) -> None:
        self.requests += 1
        self.bytes_requested += size
        if hit:
            self.hits += 1
            self.bytes_hit += size

    @property
    def object_ratio(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def byte_ratio(self) -> float:
        return self.bytes_hit / self.bytes_requested if self.bytes_requested else 0.0


class LruSimulation:
    """An exact LRU bounded in bytes: the reference the store is compared to."""

    def __init__(self, capacity_bytes: int):
        self.capacity = capacity_bytes
        self.used = 0
        self._entries: OrderedDict[int, int] = OrderedDict()   # id -> size, oldest first

    def __contains__(self, key: int) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def access(self, key: int, size: int) -> bool:
        """Request one object: True on a hit; on a miss, admit it if it can fit."""
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        if size > self.capacity:
            return False
        while self.used + size > self.capacity:
            _, evicted_size = self._entries.popitem(last=False)
            self.used -= evicted_size
        self._entries[key] = size
        self.used += size
        return False


def simulate_lru(trace: Trace, capacity_bytes: int) -> HitCounts:
    cache = LruSimulation(capacity_bytes)
    counts = HitCounts()
    sizes = trace.sizes
    for key in trace.requests:
        size = sizes[key]
        counts.record(size, cache.access(key, size))
    return counts
