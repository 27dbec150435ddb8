"""Consistent hashing of cache keys onto parents (pure: no I/O, no clock).

Every L1 builds the same ring from the topology, so every L1 sends a given
key to the same L2 and that L2's cache holds one copy of it instead of each
L2 holding everything.  Adding or removing a parent moves only that parent's
share of keys.

Each parent is placed on a 64-bit ring at ``round(vnodes * weight)`` points
(at least one), the hashes of ``f"{name}-{i}"`` for ``i`` in ``0..count-1``.
A key belongs to the first point at or after its own hash, wrapping around
(groupcache's rule).  Walking on from there and keeping each parent the first
time it is met gives the failover order (uhashring's observation): the order
in which to try parents when the owner is down.  Because removing a parent
only deletes its points, the failover order of a key is exactly the order the
ring would give with the failed parents removed.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Callable, Mapping

HashFn = Callable[[bytes], int]


def default_hash(data: bytes) -> int:
    """A 64-bit BLAKE2b digest of `data`, as an unsigned integer.

    Never the built-in ``hash()``: it is salted per process, and every L1
    (separate processes, possibly separate hosts and Python versions) must
    place keys identically.
    """
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashRing:
    """An immutable consistent-hash ring of weighted parents.

    Changing membership or weights means building a new ring; the old one
    keeps answering for requests already in flight.
    """

    __slots__ = ("_nodes", "_points", "_owners", "_orders", "_hash")

    def __init__(self, weights: Mapping[str, float], vnodes: int = 160,
                 hash_fn: HashFn = default_hash) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, got {vnodes!r}")
        points: list[tuple[int, str]] = []
        for name, weight in weights.items():
            # `weight > 0` is False for NaN, so NaN is rejected here too.
            if not (weight > 0 and math.isfinite(weight)):
                raise ValueError(f"parent {name!r}: weight must be a positive number, got {weight!r}")
            for i in range(max(1, round(vnodes * weight))):
                points.append((hash_fn(f"{name}-{i}".encode()), name))
        # Sorting (point, name) pairs makes the ring independent of the order of
        # `weights` and breaks ties between equal points by name.
        points.sort()
        self._nodes = tuple(sorted(weights))
        self._points = [point for point, _ in points]
        self._owners = [name for _, name in points]
        # Failover order starting at each point, filled in on first use: a
        # lookup then costs one bisect plus a copy of at most len(nodes) names,
        # instead of a walk over many points to meet every parent.
        self._orders: list[tuple[str, ...] | None] = [None] * len(points)
        self._hash = hash_fn

    @property
    def nodes(self) -> tuple[str, ...]:
        """The parents on the ring, sorted by name."""
        return self._nodes

    def owner(self, key: str) -> str | None:
        """The parent that owns `key`; None on an empty ring."""
        if not self._points:
            return None
        return self._owners[self._index(key)]

    def lookup(self, key: str) -> list[str]:
        """Every parent, each once: the owner of `key` first, then its failover order.

        The caller filters out parents that are down and tries the rest in
        this order.  An empty ring gives an empty list.
        """
        if not self._points:
            return []
        index = self._index(key)
        order = self._orders[index]
        if order is None:
            order = self._orders[index] = self._walk(index)
        return list(order)

    def _index(self, key: str) -> int:
        index = bisect_left(self._points, self._hash(key.encode()))
        return index if index < len(self._points) else 0   # past the last point: wrap

    def _walk(self, start: int) -> tuple[str, ...]:
        seen: dict[str, None] = {}   # insertion-ordered set
        count = len(self._owners)
        for step in range(count):
            seen.setdefault(self._owners[(start + step) % count])
            if len(seen) == len(self._nodes):
                break
        return tuple(seen)

    def __repr__(self) -> str:
        return f"HashRing(nodes={self._nodes!r}, points={len(self._points)})"
