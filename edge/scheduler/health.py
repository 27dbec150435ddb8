"""Active health checks of the L1 edges, with rise/fall hysteresis.

Every `interval` seconds the checker GETs each edge's admin ``/healthz``
(the cache node's contract: 200 with JSON ``{"status": "ok", "inflight": n,
"max_inflight": m, "overloaded": bool}``).  A non-200, a timeout or a
connection error is a failed probe.  As in HAProxy and gdnsd, an edge goes
down only after `fall` failed probes in a row and comes back only after
`rise` good ones, so one lost probe does not make answers flap.  The very
first probe decides at once: at start there is no history to protect.

:class:`EdgeHealth` is the pure state machine (the clock is a parameter);
:class:`HealthChecker` is the loop that does the I/O and publishes an
immutable snapshot the answerer reads on every query, with a generation
number that moves only when what answers depend on moves (an edge going up
or down, or becoming overloaded or not; not the in-flight counts and
details every probe round changes): the answer cache keys on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import aiohttp

from edge.config import HealthCheck
from edge.scheduler.answer import Edge, EdgeStatus, HealthSnapshot

log = logging.getLogger("edge.dns.health")


@dataclass(frozen=True)
class ProbeResult:
    """One probe of one edge."""

    ok: bool
    overloaded: bool = False
    inflight: int | None = None
    max_inflight: int | None = None
    error: str = ""


@dataclass(frozen=True)
class EdgeHealth:
    """Rise/fall state of one edge; :meth:`observe` returns the next state."""

    up: bool = True
    probed: bool = False
    good: int = 0                  # consecutive good probes
    bad: int = 0                   # consecutive failed probes
    since: float | None = None     # when `up` last changed (or the first probe)
    last: ProbeResult | None = None
    overloaded: bool = False       # from the last good probe

    def observe(self, result: ProbeResult, *, rise: int, fall: int, now: float) -> EdgeHealth:
        good = self.good + 1 if result.ok else 0
        bad = 0 if result.ok else self.bad + 1
        overloaded = result.overloaded if result.ok else self.overloaded
        if not self.probed:
            up = result.ok
        elif self.up:
            up = bad < fall
        else:
            up = good >= rise
        since = now if (up != self.up or not self.probed) else self.since
        return EdgeHealth(up, True, good, bad, since, result, overloaded)

    def status(self) -> EdgeStatus:
        """The view the answerer needs."""
        last = self.last
        if last is None:
            detail = "not probed yet"
        elif last.ok:
            detail = f"probe ok ({self.good} in a row)"
        else:
            detail = f"probe failed ({self.bad} in a row): {last.error}"
        return EdgeStatus(
            up=self.up, overloaded=self.up and self.overloaded,
            inflight=last.inflight if last else None,
            max_inflight=last.max_inflight if last else None,
            probed=self.probed, detail=detail,
        )


def parse_health(status: int, body: object) -> ProbeResult:
    """Read a /healthz reply: 200 is healthy; the JSON load fields are optional."""
    if status != 200:
        return ProbeResult(False, error=f"HTTP {status}")
    if not isinstance(body, dict):
        return ProbeResult(True)

    def count(key: str) -> int | None:
        value = body.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    inflight, max_inflight = count("inflight"), count("max_inflight")
    overloaded = body.get("overloaded") is True
    return ProbeResult(True, overloaded, inflight, max_inflight)


def answers_differ(before: EdgeStatus, after: EdgeStatus) -> bool:
    """Whether the answerer could choose differently: it reads only `up` and `overloaded`."""
    return before.up != after.up or before.overloaded != after.overloaded


# on_change(edge, before, after): called when an edge goes up or down.
ChangeHook = Callable[[Edge, EdgeHealth, EdgeHealth], None]


class HealthChecker:
    """Probes every edge on a fixed beat; :attr:`snapshot` is always a consistent view."""

    def __init__(self, edges: Sequence[Edge], check: HealthCheck, *,
                 on_change: ChangeHook | None = None, clock: Callable[[], float] = time.monotonic):
        self.edges = tuple(edges)
        self.check = check
        self.on_change = on_change
        self.clock = clock
        self.states: dict[str, EdgeHealth] = {edge.name: EdgeHealth() for edge in self.edges}
        self.snapshot: HealthSnapshot = self._publish()
        self.generation = 0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    def _publish(self) -> HealthSnapshot:
        # A new read-only mapping per change: a query never sees half an update.
        return MappingProxyType({name: state.status() for name, state in self.states.items()})

    def retarget(self, edges: Sequence[Edge], check: HealthCheck) -> None:
        """Check another list of edges with other settings (a reload), from the next round on.

        An edge that stays (same name, same health URL) keeps its state, so a
        reload neither brings a down edge back nor takes an up one out; a new
        edge starts as at start-up (up, not probed yet).
        """
        before = {edge.name: edge for edge in self.edges}
        states = {}
        for edge in edges:
            kept = before.get(edge.name)
            states[edge.name] = self.states[edge.name] if kept is not None and \
                kept.health_url == edge.health_url else EdgeHealth()
        self.edges, self.check, self.states = tuple(edges), check, states
        self.snapshot = self._publish()

    async def probe(self, edge: Edge) -> ProbeResult:
        """One GET of the edge's /healthz within the configured timeout."""
        assert self._session is not None
        try:
            async with self._session.get(edge.health_url,
                                         timeout=aiohttp.ClientTimeout(total=self.check.timeout)) as reply:
                try:
                    body = await reply.json(content_type=None)
                except (ValueError, aiohttp.ClientPayloadError):
                    body = None
                return parse_health(reply.status, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return ProbeResult(False, error=f"{type(exc).__name__}: {exc}".rstrip(": "))

    async def probe_all(self) -> None:
        """Probe every edge at once and fold the results into the state."""
        edges = self.edges
        results = await asyncio.gather(*(self.probe(edge) for edge in edges))
        self.fold(results, self.clock(), edges)

    def fold(self, results: Sequence[ProbeResult], now: float, probed: Sequence[Edge] | None = None) -> None:
        """Take one round of results (one per edge probed, in order): states, snapshot, generation, logs.

        `probed` is the edge list the round started with (default: the current
        one). After a reload while the probes ran, only the results still about
        an edge being checked, at the same URL, are folded in.
        """
        changed = moved = False
        current = {edge.name: edge for edge in self.edges}
        for was, result in zip(probed if probed is not None else self.edges, results, strict=True):
            edge = current.get(was.name)
            if edge is None or edge.health_url != was.health_url:
                continue
            before = self.states[edge.name]
            after = before.observe(result, rise=self.check.rise, fall=self.check.fall, now=now)
            self.states[edge.name] = after
            old, new = before.status(), after.status()
            changed = changed or new != old
            moved = moved or answers_differ(old, new)
            if after.up != before.up or not before.probed:
                self._log_change(edge, before, after)
                if self.on_change:
                    self.on_change(edge, before, after)
        if changed:
            # Snapshot and generation change together, with no await between: a
            # query sees either both old or both new.
            self.snapshot = self._publish()
            if moved:
                self.generation += 1

    @staticmethod
    def _log_change(edge: Edge, before: EdgeHealth, after: EdgeHealth) -> None:
        error = after.last.error if after.last else ""
        if not before.probed:
            level = logging.INFO if after.up else logging.WARNING
            log.log(level, "edge %s is %s at first probe%s", edge.name,
                    "up" if after.up else "down", f": {error}" if error else "")
        elif after.up:
            log.info("edge %s is back up after %d good probes", edge.name, after.good)
        else:
            log.warning("edge %s is down after %d failed probes: %s", edge.name, after.bad, error)

    async def start(self) -> None:
        """Open the probe session and start the beat; the first round runs at once."""
        timeout = aiohttp.ClientTimeout(total=self.check.timeout)
        # A fresh connection per probe: a kept-alive socket would hide a dead listener.
        self._session = aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(force_close=True))
        self._task = asyncio.create_task(self._run(), name="dns-health")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_round = loop.time()
        while True:
            try:
                await self.probe_all()
            except Exception:                              # a bug here must not stop the checks
                log.exception("health round failed")
            # A fixed beat from the round's start, so slow probes do not stretch the interval.
            next_round = max(next_round + self.check.interval, loop.time())
            await asyncio.sleep(next_round - loop.time())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
