"""Request coalescing: one fetch per cache key in flight.

While a leader fetches a key, followers await the leader's outcome (a
future, no polling) and then act on it: read the stored object, fetch on
their own when the response was not storable, or answer with a stale copy
or the leader's error when the fetch failed (never a herd of retries
against a failing upstream).  groupcache's singleflight, adapted to
a cache where the leader also streams to its own client.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass
from typing import Any


class Outcome(enum.Enum):
    STORED = "stored"            # the store now holds a response for the key
    NOT_STORED = "not-stored"    # the response was not storable (or did not fit)
    FAILED = "failed"            # the upstream could not be reached or answered 5xx


@dataclass(frozen=True)
class Landing:
    """How a leader's fetch ended, as its followers learn it."""

    outcome: Outcome
    error: Exception | None = None      # with FAILED: what followers answer without a stale copy
    stored: Any = None                  # with STORED: the object itself, when followers may share it


class Flight:
    """A leader's registration; `finish` must be called exactly once (it is idempotent)."""

    def __init__(self, flights: Coalescer, key: str, future: asyncio.Future[Landing]):
        self._flights, self.key, self._future = flights, key, future

    def finish(self, outcome: Outcome, error: Exception | None = None, stored: Any = None) -> None:
        self._flights._finish(self.key, self._future, Landing(outcome, error, stored))


class Coalescer:
    def __init__(self) -> None:
        self._inflight: dict[str, asyncio.Future[Landing]] = {}

    def __len__(self) -> int:
        return len(self._inflight)

    def lead(self, key: str) -> Flight | None:
        """Become the leader for `key`, or None if a fetch for it is already in flight."""
        if key in self._inflight:
            return None
        future: asyncio.Future[Landing] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        return Flight(self, key, future)

    async def wait(self, key: str) -> Landing | None:
        """Wait for the fetch in flight for `key`; None if there is none."""
        future = self._inflight.get(key)
        if future is None:
            return None
        # shield: a follower that goes away must not cancel the leader's future
        return await asyncio.shield(future)

    def _finish(self, key: str, future: asyncio.Future[Landing], landing: Landing) -> None:
        if self._inflight.get(key) is future:
            del self._inflight[key]
        if not future.done():
            future.set_result(landing)
