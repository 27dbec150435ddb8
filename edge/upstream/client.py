"""Sending requests upstream: parents in ring order, then the origin, on one HTTP/1.1 client.

`UpstreamPool.send` picks the candidates for a cache key (healthy parents in
consistent-hash order, then the origin when `go_direct` allows), and moves to
the next one when a candidate fails before answering: a connection error, a
timeout, or an error the parent generated itself (it says so with a
`Proxy-Status` entry naming itself, RFC 9209).  An origin's own 5xx is an
answer, not a parent failure, and is passed through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

from multidict import CIMultiDict

from edge.config import Node, Site, Topology
from edge.metrics import NodeMetrics
from edge.upstream.health import ActiveProber, ParentHealth
from edge.upstream.http1 import Address, Http1Client, UpstreamIOError, UpstreamResponse
from edge.upstream.ring import HashRing

log = logging.getLogger("edge.upstream")

PARENT_FAILURE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Upstream:
    name: str            # parent node name, or "origin"
    address: Address
    is_parent: bool


class UpstreamError(Exception):
    """No candidate answered; `error` is an RFC 9209 Proxy-Status error type."""

    def __init__(self, error: str, detail: str, tried: list[str]):
        super().__init__(f"{error}: {detail} (tried {', '.join(tried) or 'nothing'})")
        self.error, self.detail, self.tried = error, detail, tried


def proxy_status_error(headers: Mapping[str, str], name: str) -> bool:
    """True when a Proxy-Status entry (RFC 9209) names `name` with an error."""
    for member in headers.get("Proxy-Status", "").split(","):
        parts = [p.strip() for p in member.split(";")]
        if parts and parts[0].strip('"') == name and any(p.startswith("error=") for p in parts[1:]):
            return True
    return False


class UpstreamPool:
    def __init__(self, topology: Topology, node: Node, metrics: NodeMetrics, hash_ring: HashRing | None = None):
        self.node, self.metrics = node, metrics
        self.policy = node.parent_policy
        self.parents = {
            name: Upstream(name, Address.from_url(topology.node(name).listen.url), True) for name in node.parents
        }
        self._names = {upstream.address: name for name, upstream in self.parents.items()}
        self.client = Http1Client(connect_timeout=self.policy.timeout, read_timeout=self.policy.timeout,
                                  source_ip=node.listen.host, on_excess=self._excess)
        weights = {name: 1.0 for name in node.parents}
        weights.update(dict(node.parent_weights))
        self.ring = hash_ring if hash_ring is not None else HashRing(weights)
        self.health = ParentHealth(node.parents, fall=self.policy.fall, rise=self.policy.rise)
        self.health.on_change = self._on_health_change
        for name in node.parents:
            metrics.parent_up.labels(name).set(1)
        health_urls = {name: f"{topology.node(name).admin.url}/healthz" for name in node.parents}
        self.prober = ActiveProber(self.health, health_urls, self.client,
                                   interval=self.policy.probe_interval, timeout=min(self.policy.timeout, 2.0))
        self._origins: dict[str, Upstream] = {}

    async def start(self) -> None:
        if self.parents:
            await self.prober.start()

    async def close(self) -> None:
        await self.prober.close()
        await self.client.close()

    def _excess(self, address: Address) -> None:
        """An upstream sent bytes beyond a response (RFC 9112 6.3); its connection was closed."""
        self.metrics.upstream_excess.labels(self._names.get(address, "origin")).inc()

    def _on_health_change(self, name: str, up: bool) -> None:
        self.metrics.parent_up.labels(name).set(1 if up else 0)
        if up:
            log.warning("parent %s is back up", name)
        else:
            log.warning("parent %s marked down after %d consecutive failures", name, self.policy.fall)

    def origin(self, site: Site) -> Upstream:
        upstream = self._origins.get(site.origin)
        if upstream is None:
            upstream = self._origins[site.origin] = Upstream("origin", Address.from_url(site.origin), False)
        return upstream

    def candidates(self, key: str, site: Site) -> list[Upstream]:
        """Healthy parents in ring order for `key`, then the origin if going direct is allowed."""
        if not self.parents:
            return [self.origin(site)]
        ordered = self.ring.lookup(key)
        healthy = [self.parents[name] for name in ordered if self.health.is_up(name)]
        if self.policy.go_direct:
            return healthy + [self.origin(site)]
        # Never direct: when every parent is down, try them anyway rather than fail outright.
        return healthy or [self.parents[name] for name in ordered]

    async def send(self, method: str, key: str, site: Site, raw_target: str, headers: CIMultiDict[str],
                   body: AsyncIterator[bytes] | None = None) -> tuple[UpstreamResponse, Upstream]:
        """Send the request to the first candidate that answers; the caller releases the response."""
        tried: list[str] = []
        last_error = ("destination_unavailable", "no upstream configured")
        candidates = self.candidates(key, site)
        for index, upstream in enumerate(candidates):
            tried.append(upstream.name)
            started = time.monotonic()
            try:
                response = await self.client.request(upstream.address, method, raw_target, headers.items(), body)
            except UpstreamIOError as exc:
                last_error = (exc.error, exc.detail)
                self._failed(upstream, exc.error)
                if exc.body_started:
                    break   # the body is gone; it cannot be replayed to the next candidate
                continue
            self.metrics.upstream_duration.labels(upstream.name).observe(time.monotonic() - started)
            is_last = index == len(candidates) - 1
            if (upstream.is_parent and response.status in PARENT_FAILURE_STATUSES
                    and proxy_status_error(response.headers, upstream.name) and not is_last
                    and not response.body_started):
                # The parent itself could not get an answer: try the next one.
                response.release()
                last_error = ("destination_unavailable", f"{upstream.name} answered {response.status}")
                self._failed(upstream, f"status_{response.status}")
                continue
            if upstream.is_parent:
                self.health.success(upstream.name)
            self.metrics.upstream_requests.labels(upstream.name, f"{response.status // 100}xx").inc()
            return response, upstream
        raise UpstreamError(last_error[0], last_error[1], tried)

    def _failed(self, upstream: Upstream, outcome: str) -> None:
        self.metrics.upstream_requests.labels(upstream.name, outcome).inc()
        if upstream.is_parent:
            self.health.failure(upstream.name)
        log.info("upstream %s failed: %s", upstream.name, outcome)

