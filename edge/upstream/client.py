"""Sending requests upstream: one shared ClientSession, parents in ring order, then the origin.

`UpstreamPool.send` picks the candidates for a cache key (healthy parents in
consistent-hash order, then the origin when `go_direct` allows), and moves to
the next one when a candidate fails before answering: a connection error, a
timeout, or an error the parent generated itself (it says so with a
`Proxy-Status` entry naming itself, RFC 9209).  An origin's own 5xx is an
answer, not a parent failure, and is passed through.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from edge.config import Node, Site, Topology
from edge.metrics import NodeMetrics
from edge.upstream.health import ActiveProber, ParentHealth
from edge.upstream.ring import HashRing

log = logging.getLogger("edge.upstream")

PARENT_FAILURE_STATUSES = frozenset({502, 503, 504})


@dataclass(frozen=True)
class Upstream:
    name: str            # parent node name, or "origin"
    base_url: str        # scheme://host:port, no trailing slash
    is_parent: bool


class UpstreamError(Exception):
    """No candidate answered; `error` is an RFC 9209 Proxy-Status error type."""

    def __init__(self, error: str, detail: str, tried: list[str]):
        super().__init__(f"{error}: {detail} (tried {', '.join(tried) or 'nothing'})")
        self.error, self.detail, self.tried = error, detail, tried


def make_session(timeout: float, source_ip: str | None = None) -> aiohttp.ClientSession:
    """The process's one upstream session: keep-alive, no decompression, no added headers.

    Connections leave from `source_ip` (the node's own address) so parents and
    origins see which node asked, as they would across hosts.
    """
    local_addr = (source_ip, 0) if source_ip and source_ip not in ("0.0.0.0", "::") else None
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300,
                                     local_addr=local_addr)
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,       # bodies are stored and relayed exactly as received
        skip_auto_headers=("User-Agent", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class _CountingBody:
    """Wraps a request body stream so we know whether any byte was sent (then no retry)."""

    def __init__(self, chunks: AsyncIterator[bytes]):
        self._chunks, self.started = chunks, False

    async def __aiter__(self):
        async for chunk in self._chunks:
            self.started = True
            yield chunk


def proxy_status_error(headers: Mapping[str, str], name: str) -> bool:
    """True when a Proxy-Status entry (RFC 9209) names `name` with an error."""
    for member in headers.get("Proxy-Status", "").split(","):
        parts = [p.strip() for p in member.split(";")]
        if parts and parts[0].strip('"') == name and any(p.startswith("error=") for p in parts[1:]):
            return True
    return False


class UpstreamPool:
    def __init__(self, topology: Topology, node: Node, session: aiohttp.ClientSession, metrics: NodeMetrics,
                 hash_ring: HashRing | None = None):
        self.node, self.session, self.metrics = node, session, metrics
        self.policy = node.parent_policy
        self.parents = {
            name: Upstream(name, topology.node(name).listen.url, True) for name in node.parents
        }
        weights = {name: 1.0 for name in node.parents}
        weights.update(dict(node.parent_weights))
        self.ring = hash_ring if hash_ring is not None else HashRing(weights)
        self.health = ParentHealth(node.parents, fall=self.policy.fall, rise=self.policy.rise)
        self.health.on_change = self._on_health_change
        for name in node.parents:
            metrics.parent_up.labels(name).set(1)
        health_urls = {name: f"{topology.node(name).admin.url}/healthz" for name in node.parents}
        self.prober = ActiveProber(self.health, health_urls, session,
                                   interval=self.policy.probe_interval, timeout=min(self.policy.timeout, 2.0))
        self._origins: dict[str, Upstream] = {}
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.policy.timeout,
                                              sock_read=self.policy.timeout)

    async def start(self) -> None:
        if self.parents:
            await self.prober.start()

    async def close(self) -> None:
        await self.prober.close()

    def _on_health_change(self, name: str, up: bool) -> None:
        self.metrics.parent_up.labels(name).set(1 if up else 0)
        if up:
            log.warning("parent %s is back up", name)
        else:
            log.warning("parent %s marked down after %d consecutive failures", name, self.policy.fall)

    def origin(self, site: Site) -> Upstream:
        upstream = self._origins.get(site.origin)
        if upstream is None:
            upstream = self._origins[site.origin] = Upstream("origin", site.origin, False)
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

    async def send(self, method: str, key: str, site: Site, raw_target: str, headers: Mapping[str, str],
                   body: AsyncIterator[bytes] | None = None) -> tuple[aiohttp.ClientResponse, Upstream]:
        """Send the request to the first candidate that answers; the caller releases the response."""
        counted = _CountingBody(body) if body is not None else None
        tried: list[str] = []
        last_error = ("destination_unavailable", "no upstream configured")
        candidates = self.candidates(key, site)
        for index, upstream in enumerate(candidates):
            tried.append(upstream.name)
            url = URL(upstream.base_url + raw_target, encoded=True)
            started = time.monotonic()
            try:
                response = await self.session.request(
                    method, url, headers=headers, data=counted, allow_redirects=False,
                    timeout=self._timeout, compress=None)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                last_error = _classify(exc)
                self._failed(upstream, last_error[0])
                if counted is not None and counted.started:
                    break   # the body is gone; it cannot be replayed to the next candidate
                continue
            self.metrics.upstream_duration.labels(upstream.name).observe(time.monotonic() - started)
            is_last = index == len(candidates) - 1
            if (upstream.is_parent and response.status in PARENT_FAILURE_STATUSES
                    and proxy_status_error(response.headers, upstream.name) and not is_last
                    and (counted is None or not counted.started)):
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


def _classify(exc: BaseException) -> tuple[str, str]:
    """Map a client exception to an RFC 9209 Proxy-Status error type."""
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return "connection_timeout", str(exc) or "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if exc.os_error is not None and exc.os_error.errno == errno.ECONNREFUSED:
            return "connection_refused", str(exc.os_error)
        return "destination_unavailable", str(exc)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection_terminated", "upstream closed the connection"
    return "proxy_internal_error", str(exc) or type(exc).__name__
