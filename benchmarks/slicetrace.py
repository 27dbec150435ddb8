"""The slices scenario's pure parts: a seeded video-seek trace, the target formulas, metric parsing.

The trace is what a video player does to a CDN: a session opens one file
and seeks a few times, each seek reading a range of a few MiB at a random
offset.  Files have sizes drawn log-uniformly between the smallest and the
largest (many short clips, few long films); which file a session watches is
uniform.  Everything derives from one seed, so the sliced and the unsliced
L1 replay the same requests, and two runs replay the same trace.

The target formulas (issue 15) are functions of measured figures only, so
that the report's verdict can be recomputed by hand from its table.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

MiB = 2**20


@dataclass(frozen=True)
class Seek:
    file: int
    first: int                  # byte offset of the range
    length: int                 # bytes

    @property
    def last(self) -> int:
        """Inclusive, as in a Range header."""
        return self.first + self.length - 1

    @property
    def range_header(self) -> str:
        return f"bytes={self.first}-{self.last}"


@dataclass(frozen=True)
class VideoTrace:
    seed: int
    sizes: tuple[int, ...]                      # size in bytes of file i
    sessions: tuple[tuple[Seek, ...], ...]      # each session's seeks, in order

    @property
    def seeks(self) -> int:
        return sum(len(s) for s in self.sessions)

    @property
    def requested_bytes(self) -> int:
        return sum(seek.length for session in self.sessions for seek in session)

    def files_touched(self, sessions: int | None = None) -> set[int]:
        return {s[0].file for s in self.sessions[:sessions] if s}


def file_sizes(files: int, smallest: int, largest: int, seed: int) -> list[int]:
    """Log-uniform sizes in [smallest, largest], whole KiB, seeded."""
    rng = random.Random(f"video-sizes-{seed}")
    low, high = math.log(smallest), math.log(largest)
    return [min(largest, max(smallest, int(math.exp(rng.uniform(low, high))) // 1024 * 1024))
            for _ in range(files)]


def make_trace(sessions: int, files: int, smallest: int, largest: int, seed: int,
               seeks: tuple[int, int] = (2, 4), seek_bytes: tuple[int, int] = (1 * MiB, 4 * MiB)) -> VideoTrace:
    """A reproducible video-seek trace: the same arguments always give the same seeks.

    Each session picks one file uniformly and reads ``seeks`` (inclusive
    bounds) ranges of ``seek_bytes`` (inclusive bounds) at uniform offsets
    that keep the range inside the file.
    """
    sizes = file_sizes(files, smallest, largest, seed)
    rng = random.Random(f"video-trace-{seed}")
    out = []
    for _ in range(sessions):
        file = rng.randrange(files)
        size = sizes[file]
        session = []
        for _ in range(rng.randint(*seeks)):
            length = min(size, rng.randint(*seek_bytes))
            first = rng.randint(0, size - length)
            session.append(Seek(file, first, length))
        out.append(tuple(session))
    return VideoTrace(seed=seed, sizes=tuple(sizes), sessions=tuple(out))


def tail_range(size: int, length: int) -> tuple[int, int]:
    """The last ``length`` bytes of an object of ``size``: (first, last), inclusive."""
    length = min(length, size)
    return size - length, size - 1


def slices_spanned(first: int, last: int, slice_size: int) -> int:
    """How many aligned slices of ``slice_size`` the inclusive range first..last touches."""
    return last // slice_size - first // slice_size + 1


# --------------------------------------------------------------------------- target formulas (issue 15)

TAIL_TIME_FACTOR = 2.0          # cold tail range within 2 x (warm range + one slice fetch)


def tail_time_limit(warm_s: float, slice_fetch_s: float) -> float:
    """The cold tail range's time-to-last-byte bound: 2 x (the same range warm + one slice fetch)."""
    return TAIL_TIME_FACTOR * (warm_s + slice_fetch_s)


def tail_origin_limit(slice_size: int, range_bytes: int) -> int:
    """The cold tail range's origin-byte bound: one slice plus the range."""
    return slice_size + range_bytes


# --------------------------------------------------------------------------- what the servers say

def metric_total(exposition: str, name: str) -> float:
    """The sum of every sample of ``name`` (any labels) in a Prometheus text exposition."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def is_hit(x_cache: str | None, cache_status: str | None) -> bool:
    """A response served from this L1's cache: X-Cache HIT (nginx's word), else RFC 9211's ``hit``.

    Cache-Status has one entry per tier, the last one being this node's.
    """
    if x_cache:
        return x_cache.strip().upper() == "HIT"
    if cache_status:
        last = cache_status.split(",")[-1]
        params = [p.strip().lower() for p in last.split(";")[1:]]
        return "hit" in params
    return False


def check_says_slicing_unknown(returncode: int, output: str) -> bool | None:
    """From ``python -m edge check`` on a topology with ``slice_size``: does this build not know it?

    True: it refused the key (this build does not slice); False: it took the
    file; None: it failed for another reason (the rendered file is wrong).
    """
    if returncode == 0:
        return False
    return True if "slice_size" in output else None
