"""Parent health: a rise/fall state machine, and an active prober that feeds it.

:class:`ParentHealth` is pure (no I/O, no clock), in the manner of HAProxy's
``fall``/``rise`` and nginx's ``max_fails``: a parent is marked down after
``fall`` consecutive failures and back up after ``rise`` consecutive
successes.  Both the request path (passive checks: a failed fetch is a
failure) and :class:`ActiveProber` (a background loop probing every parent's
admin ``/healthz``) feed the same object, so a dead parent is found whether
traffic reaches it or not, and one bad answer never takes a parent out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from edge.upstream.http1 import Address, Http1Client

log = logging.getLogger(__name__)


@dataclass
class _Streak:
    up: bool = True     # parents start up, as in nginx and HAProxy: no traffic is lost at start
    fails: int = 0      # consecutive failures
    oks: int = 0        # consecutive successes


class ParentHealth:
    """Which parents are up, from a stream of successes and failures."""

    def __init__(self, names: Iterable[str], fall: int, rise: int) -> None:
        if fall < 1 or rise < 1:
            raise ValueError(f"fall and rise must be at least 1, got fall={fall!r} rise={rise!r}")
        self._streaks: dict[str, _Streak] = {}
        for name in names:
            if name in self._streaks:
                raise ValueError(f"parent {name!r} is listed twice")
            self._streaks[name] = _Streak()
        self.fall = fall
        self.rise = rise
        # Called as on_change(name, up) on every transition, after the state
        # has changed; set by the owner for metrics and logging.
        self.on_change: Callable[[str, bool], None] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._streaks)

    def carried_over(self, names: Iterable[str], fall: int, rise: int) -> ParentHealth:
        """A new state for a reloaded parent list: a parent that stays keeps its streak
        (a parent down stays down until it rises), a new one starts up.  `on_change` is not copied."""
        health = ParentHealth(names, fall, rise)
        for name, streak in health._streaks.items():
            kept = self._streaks.get(name)
            if kept is not None:
                streak.up, streak.fails, streak.oks = kept.up, kept.fails, kept.oks
        return health

    def is_up(self, name: str) -> bool:
        return self._streak(name).up

    def up(self) -> list[str]:
        """The healthy parents, in the order they were given."""
        return [name for name, streak in self._streaks.items() if streak.up]

    def failure(self, name: str) -> bool:
        """Record a failed request or probe; True when this call marked `name` down."""
        streak = self._streak(name)
        streak.oks = 0
        streak.fails += 1
        if streak.up and streak.fails >= self.fall:
            streak.up = False
            self._changed(name, False)
            return True
        return False

    def success(self, name: str) -> bool:
        """Record a good request or probe; True when this call brought `name` back up.

        While up, a success only ends the failure streak; while down, it
        takes `rise` of them in a row.
        """
        streak = self._streak(name)
        streak.fails = 0
        streak.oks += 1
        if not streak.up and streak.oks >= self.rise:
            streak.up = True
            self._changed(name, True)
            return True
        return False

    def state(self) -> dict[str, dict[str, bool | int]]:
        """A JSON-able snapshot for /status and metrics: up, fails, oks per parent."""
        return {name: {"up": s.up, "fails": s.fails, "oks": s.oks} for name, s in self._streaks.items()}

    def _streak(self, name: str) -> _Streak:
        try:
            return self._streaks[name]
        except KeyError:
            raise KeyError(f"unknown parent {name!r} (have: {', '.join(self._streaks) or 'none'})") from None

    def _changed(self, name: str, up: bool) -> None:
        if self.on_change is not None:
            self.on_change(name, up)


class ActiveProber:
    """Probes every parent's health URL every `interval` seconds, feeding a ParentHealth.

    A probe succeeds on HTTP 200 only; any other status, a connection error
    or no complete answer within `timeout` seconds is a failure.  All parents
    are probed at once each round, so one hung parent delays the others by at
    most `timeout`, and idle parents are probed too: a dead parent is found
    before a request has to fail on it.  The client is the caller's (one per
    process) and is not closed here.
    """

    def __init__(self, health: ParentHealth, urls: Mapping[str, str],
                 client: Http1Client, interval: float, timeout: float) -> None:
        unknown = sorted(set(urls) - set(health.names))
        if unknown:
            raise ValueError(f"no health state for parent {unknown[0]!r}")
        if interval <= 0 or timeout <= 0:
            raise ValueError(f"interval and timeout must be positive, got {interval!r} and {timeout!r}")
        self._health = health
        self._urls = {name: (Address.from_url(url), urlsplit(url).path or "/") for name, url in urls.items()}
        self._client = client
        self._interval = interval
        self._timeout = timeout
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the background loop; the first round runs at once."""
        if self._task is not None:
            raise RuntimeError("prober already started")
        self._task = asyncio.create_task(self._run(), name="parent-prober")

    async def close(self) -> None:
        """Stop the loop and wait for it to finish; safe to call more than once."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def retarget(self, health: ParentHealth, urls: Mapping[str, str], interval: float, timeout: float) -> None:
        """Probe another set of parents (a reload) from the next round on; the loop keeps running."""
        replacement = ActiveProber(health, urls, self._client, interval, timeout)   # validates
        self._health, self._urls = replacement._health, replacement._urls
        self._interval, self._timeout = interval, timeout

    async def probe_once(self) -> None:
        """One round: probe every parent concurrently, then record each result."""
        # The round reports to the state it started with: a reload meanwhile
        # replaces both, and this round's answers are about the old list.
        health, urls = self._health, self._urls
        names = list(urls)
        results = await asyncio.gather(*(self._probe(urls[name], name) for name in names))
        for name, ok in zip(names, results):
            if ok:
                health.success(name)
            else:
                health.failure(name)

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_once()
            except Exception:
                # A bug (say, in an on_change hook) must not silently end all
                # probing: parents marked down would then never come back.
                log.exception("parent probe round failed")
            await asyncio.sleep(self._interval)

    async def _probe(self, target: tuple[Address, str], name: str) -> bool:
        address, path = target
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._client.request(address, "GET", path, (), read_timeout=self._timeout)
                try:
                    await response.read()   # a complete answer, not just a status line
                finally:
                    response.release()
            if response.status == 200:
                return True
            log.debug("parent %s: probe %s%s answered %d", name, address, path, response.status)
        except Exception as exc:   # refused, reset, timed out, bad answer: all mean "not healthy"
            log.debug("parent %s: probe %s%s failed: %r", name, address, path, exc)
        return False
