"""The ban list: purges by URL, prefix and tag, checked when an object is looked up (Varnish's bans).

A purge never walks the cache while the request that asked for it waits.
It adds a *ban*: what it covers (a URL, a key prefix or a tag), whether it
is hard or soft, and when it was added.  A stored object is covered by a
ban when the ban matches it and was added after the object's request left
(``Meta.request_time``): an object fetched by a request sent before the
purge may hold the old content, one sent after cannot (every tier upstream
was purged first).

* **hard**: the object counts as absent (a miss); its fill overwrites it.
* **soft** (Fastly's soft purge): the object counts as stale since the ban,
  so revalidation, ``stale-while-revalidate`` and ``stale-if-error`` keep
  working on it.

Bans are bounded: a background *lurker* (:mod:`edge.invalidation`) applies
each new ban to every object it covers (deletes them, or marks them stale
in their stored meta), and a ban is *retired* once it has been lurked and no
fetch that began before it is still in flight (that fetch's store is checked
against the ban when it commits).  At most :data:`MAX_BANS` are live; past
that a purge is refused until the lurker catches up.

Pure: the clock is a parameter, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from edge.cachekey import VARIANT_SEPARATOR
from edge.surrogate import valid_tag

KINDS = ("url", "prefix", "tag")
MAX_BANS = 10_000


class BanListFull(Exception):
    """Too many bans not yet retired: the purge is refused (try again once the lurker caught up)."""


@dataclass
class Ban:
    kind: str          # "url" (a primary cache key), "prefix" (a cache-key prefix) or "tag"
    value: str
    soft: bool
    time: float        # when it was added, on the node's clock
    lurked: bool = False   # every object it covers has been dealt with

    def covers(self, key: str, tags: Iterable[str]) -> bool:
        """Does this ban match the object stored at `key` with `tags` (whatever its age)?"""
        if self.kind == "url":
            return key == self.value or key.startswith(self.value + VARIANT_SEPARATOR)
        if self.kind == "prefix":
            return key.startswith(self.value)
        return self.value in tags

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "soft": self.soft, "time": self.time,
                "lurked": self.lurked}


class Verdict(NamedTuple):
    """What the live bans say about one stored object."""

    hard: bool                  # treat as absent
    stale_at: float | None      # soft: stale since this time (the earliest soft ban covering it)


class BanList:
    """The live bans of one node, indexed so that a lookup costs a few dict probes.

    `generation` changes whenever a ban is added; `newest` is the time of
    the newest live ban (-inf when there is none), so an object requested
    after it needs no further check: that is the hit path's whole cost.
    """

    def __init__(self, limit: int = MAX_BANS):
        self.limit = limit
        self.generation = 0
        self.newest = -math.inf
        self._bans: dict[tuple[str, str, bool], Ban] = {}
        self._by_url: dict[str, list[Ban]] = {}
        self._by_tag: dict[str, list[Ban]] = {}
        self._prefixes: list[Ban] = []

    def __len__(self) -> int:
        return len(self._bans)

    def __iter__(self):
        return iter(list(self._bans.values()))

    def add(self, kind: str, value: str, soft: bool, now: float) -> Ban:
        """Add a ban (or move an equal one's time to `now`); raises BanListFull past the limit.

        A hard ban supersedes a soft ban of the same URL, prefix or tag made
        no later: everything the soft one covers, the hard one covers too.
        """
        if kind not in KINDS:
            raise ValueError(f"ban kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if not value or (kind == "tag" and not valid_tag(value)):
            raise ValueError(f"not a valid {kind}: {value!r}")
        ident = (kind, value, soft)
        ban = self._bans.get(ident)
        if ban is None and len(self._bans) >= self.limit:
            raise BanListFull(f"{len(self._bans)} bans are still being applied (limit {self.limit})")
        if ban is None:
            ban = self._bans[ident] = Ban(kind, value, soft, now)
            self._index(ban)
        else:
            ban.time, ban.lurked = max(ban.time, now), False
        if not soft:
            shadowed = self._bans.get((kind, value, True))
            if shadowed is not None and shadowed.time <= ban.time:
                self._remove(shadowed)
        self.generation += 1
        self.newest = max(self.newest, ban.time)
        return ban

    def check(self, key: str, tags: Iterable[str], request_time: float) -> Verdict | None:
        """The verdict on an object at `key` with `tags` whose request left at `request_time`.

        None when no live ban covers it (the common case, answered at once
        for anything requested after the newest ban).
        """
        if request_time >= self.newest:
            return None
        hard = False
        stale_at: float | None = None
        candidates: list[Ban] = list(self._by_url.get(key.split(VARIANT_SEPARATOR, 1)[0], ()))
        candidates += [ban for ban in self._prefixes if key.startswith(ban.value)]
        for tag in tags:
            candidates += self._by_tag.get(tag, ())
        for ban in candidates:
            if ban.time <= request_time:
                continue
            if not ban.soft:
                hard = True
            elif stale_at is None or ban.time < stale_at:
                stale_at = ban.time
        if not hard and stale_at is None:
            return None
        return Verdict(hard, stale_at)

    def pending(self) -> list[Ban]:
        """Bans the lurker has not applied yet."""
        return [ban for ban in self._bans.values() if not ban.lurked]

    def lurked(self, applied: Iterable[tuple[Ban, float]]) -> None:
        """Mark bans applied, each as of the time it had when the lurker began.

        A ban re-added meanwhile (its time moved on) or removed stays as it is.
        """
        for ban, time in applied:
            if ban.time == time and self._bans.get((ban.kind, ban.value, ban.soft)) is ban:
                ban.lurked = True

    def retire(self, oldest_fetch: float | None) -> list[Ban]:
        """Drop lurked bans that no fetch still in flight began before; the bans dropped.

        `oldest_fetch` is the request time of the oldest fetch that may still
        store an object (None: none in flight).  Such a fetch's object is
        checked against the bans when it commits, so its bans must stay.
        """
        retired = [ban for ban in self._bans.values()
                   if ban.lurked and (oldest_fetch is None or oldest_fetch >= ban.time)]
        for ban in retired:
            self._remove(ban)
        return retired

    def summary(self) -> dict[str, int]:
        return {"live": len(self._bans), "pending": sum(1 for ban in self._bans.values() if not ban.lurked)}

    # ------------------------------------------------------------- persistence

    def to_list(self) -> list[dict[str, Any]]:
        return [ban.to_dict() for ban in self._bans.values()]

    def load(self, records: Any) -> int:
        """Add the bans of :meth:`to_list` output (as read back from a file), none lurked.

        Raises ValueError on anything malformed; the list is unchanged then.
        """
        if not isinstance(records, list):
            raise ValueError("bans: expected a list")
        parsed = []
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise ValueError(f"bans[{i}]: expected an object")
            kind, value, soft, time = (record.get(k) for k in ("kind", "value", "soft", "time"))
            if kind not in KINDS or not isinstance(value, str) or not isinstance(soft, bool) \
                    or isinstance(time, bool) or not isinstance(time, (int, float)) or not math.isfinite(time):
                raise ValueError(f"bans[{i}]: not a ban: {record!r}")
            parsed.append((kind, value, soft, float(time)))
        for kind, value, soft, time in parsed:
            # Lurked again after a restart: the disk index is rebuilt, nothing is known to be done.
            self.add(kind, value, soft, time)
        return len(parsed)

    # ---------------------------------------------------------------- indexes

    def _index(self, ban: Ban) -> None:
        if ban.kind == "url":
            self._by_url.setdefault(ban.value, []).append(ban)
        elif ban.kind == "tag":
            self._by_tag.setdefault(ban.value, []).append(ban)
        else:
            self._prefixes.append(ban)

    def _remove(self, ban: Ban) -> None:
        del self._bans[(ban.kind, ban.value, ban.soft)]
        if ban.kind == "prefix":
            self._prefixes.remove(ban)
        else:
            index = self._by_url if ban.kind == "url" else self._by_tag
            same = index[ban.value]
            same.remove(ban)
            if not same:
                del index[ban.value]
        self.newest = max((b.time for b in self._bans.values()), default=-math.inf)
