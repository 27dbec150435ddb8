"""Sending requests upstream: parents in ring order, then the origin, on one HTTP/1.1 client.

`UpstreamPool.send` picks the candidates for a cache key (healthy parents in
consistent-hash order, then the origin when `go_direct` allows), and moves to
the next one when a candidate fails before answering: it cannot be reached,
it times out, or it answers with an error about itself (a `Proxy-Status`
entry naming itself with `proxy_internal_error`, RFC 9209).  An answer is
passed through: an origin's own 5xx, and a parent's 502/504 saying *its*
upstream could not be reached (`connection_refused`,
`destination_unavailable`, ...).  That parent is healthy: one dead origin
must not take every parent out of service for every site.

With `parent_tls`, a parent is reached on its `listen_tls` and must prove the
request's site: SNI is the site's first host name and the parent's certificate
is verified for it (against `parent_ca`, or the system's store), as a client of
that site would verify it.  So there is one pool of connections per parent and
site.  A parent whose certificate does not verify has failed like one that
refuses the connection: the next candidate is tried, the metric counts the
error type, and the log says why.

Every attempt of one request shares one deadline (`upstream_deadline`, like
nginx's `proxy_next_upstream_timeout`): the next candidate is tried only
while time remains.  A parent is given the whole remaining time for its
head, since it bounds its own fetch; the origin gets `parent_timeout` of it.
A bodyless request waiting on a parent that is marked down meanwhile (a
host that vanished without a reset: its probes time out) gives up on it and
goes on to the next candidate, rather than wait out the deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, replace

from multidict import CIMultiDict

from edge.config import Node, Site, Topology
from edge.http.tls import origin_profile, parent_profile
from edge.metrics import NodeMetrics
from edge.upstream.health import ActiveProber, ParentHealth
from edge.upstream.http1 import Address, Http1Client, TlsProfile, UpstreamIOError, UpstreamResponse
from edge.upstream.ring import HashRing

log = logging.getLogger("edge.upstream")

# A parent's error entries about itself: it failed, try the next one.
PARENT_OWN_ERRORS = frozenset({"proxy_internal_error", "proxy_configuration_error"})
# A parent's (or our own) error entries meaning "the upstream could not be reached at all"
# (RFC 9111 4.2.4 disconnected operation may then serve stale).
UNREACHABLE_ERRORS = frozenset({"connection_refused", "connection_terminated", "connection_timeout",
                                "destination_unavailable", "destination_not_found", "destination_ip_unroutable",
                                "dns_error", "dns_timeout", "http_response_timeout"})


@dataclass(frozen=True)
class Upstream:
    name: str            # parent node name, or "origin"
    address: Address
    is_parent: bool


class UpstreamError(Exception):
    """No candidate answered; `error` is an RFC 9209 Proxy-Status error type, `params` its
    extra parameters (such as a TLS alert's alert-id)."""

    def __init__(self, error: str, detail: str, tried: list[str], params: tuple[tuple[str, int | str], ...] = ()):
        super().__init__(f"{error}: {detail} (tried {', '.join(tried) or 'nothing'})")
        self.error, self.detail, self.tried, self.params = error, detail, tried, params


class ParentMarkedDown(Exception):
    """A parent was marked down while a request waited for its answer (see _unless_marked_down)."""


def proxy_status_error(headers: Mapping[str, str], name: str) -> str | None:
    """The error type of the `Proxy-Status` entry (RFC 9209) naming `name`, if it has one."""
    for member in headers.get("Proxy-Status", "").split(","):
        parts = [p.strip() for p in member.split(";")]
        if parts and parts[0].strip('"') == name:
            for param in parts[1:]:
                if param.startswith("error="):
                    return param[len("error="):].strip('"')
    return None


def parent_upstreams(topology: Topology, node: Node) -> dict[str, Upstream]:
    """`node`'s parents by name: on their listen address, or with parent_tls on their listen_tls
    (the server name to verify is added per site, by `UpstreamPool.parent`)."""
    profile = parent_profile(node)
    out = {}
    for name in node.parents:
        parent = topology.node(name)
        if profile is None:
            address = Address.from_url(parent.listen.url)
        else:
            assert parent.listen_tls is not None      # config checks it
            address = Address("https", parent.listen_tls.host, parent.listen_tls.port, profile)
        out[name] = Upstream(name, address, True)
    return out


class UpstreamPool:
    def __init__(self, topology: Topology, node: Node, metrics: NodeMetrics, hash_ring: HashRing | None = None,
                 tls_contexts: Mapping[TlsProfile, ssl.SSLContext] | None = None, listen_host: str | None = None):
        """`listen_host`: where the node's sockets are bound when not on its topology address
        (`edge run --listen-host`); outgoing connections leave from there too."""
        self.node, self.metrics = node, metrics
        self.policy = node.parent_policy
        self.parents = parent_upstreams(topology, node)
        self._site_parents: dict[tuple[str, str], Upstream] = {}
        self._names = _names(topology, node)
        self.client = Http1Client(connect_timeout=self.policy.timeout, read_timeout=self.policy.timeout,
                                  source_ip=_source_ip(listen_host or node.listen.host),
                                  max_conns=self.policy.max_conns,
                                  queue=self.policy.queue, on_excess=self._excess)
        self.client.tls_contexts = dict(tls_contexts or {})
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
        self._origins: dict[tuple, Upstream] = {}
        self._marked_down: dict[str, set[asyncio.Future[None]]] = {}   # requests waiting on each parent
        metrics.watch_upstreams(self.connection_stats)

    def reload(self, topology: Topology, node: Node,
               tls_contexts: Mapping[TlsProfile, ssl.SSLContext] | None = None) -> None:
        """Take a reloaded topology's parents, weights and settings, all at once (no await).

        Parents that stay keep their health and their pooled connections; new
        ones start up, as at start.  Requests already sending keep the
        candidates and the health state they started with.
        """
        policy = node.parent_policy
        parents = parent_upstreams(topology, node)
        weights = {name: 1.0 for name in node.parents}
        weights.update(dict(node.parent_weights))
        ring = HashRing(weights)
        health = self.health.carried_over(node.parents, fall=policy.fall, rise=policy.rise)
        health.on_change = self._on_health_change
        health_urls = {name: f"{topology.node(name).admin.url}/healthz" for name in node.parents}
        # Built and checked; from here on nothing can fail.  Requests still running
        # report to the old state; it no longer moves the gauges (nor logs).
        self.health.on_change = None
        for gone in set(self.parents) - set(parents):
            self.metrics.parent_up.remove(gone)
        for name in parents:
            self.metrics.parent_up.labels(name).set(1 if health.is_up(name) else 0)
        client = self.client
        client.connect_timeout = client.read_timeout = policy.timeout
        client.max_conns, client.queue = policy.max_conns, policy.queue
        # New connections verify with the reloaded bundles (and present the reloaded client
        # certificates); pooled ones were verified already.
        client.tls_contexts = dict(tls_contexts or {})
        self.node, self.policy, self.parents, self.ring, self.health = node, policy, parents, ring, health
        self._site_parents = {}
        self._names = _names(topology, node)
        self.prober.retarget(health, health_urls, interval=policy.probe_interval, timeout=min(policy.timeout, 2.0))

    async def start(self) -> None:
        # Probing runs even with no parents (an idle round a second) so that a
        # reload that adds the first parent finds it probed.
        await self.prober.start()

    async def close(self) -> None:
        await self.prober.close()
        await self.client.close()

    def _name(self, address: Address) -> str:
        return self._names.get((address.host, address.port), "origin")

    def _excess(self, address: Address) -> None:
        """An upstream sent bytes beyond a response (RFC 9112 6.3); its connection was closed."""
        self.metrics.upstream_excess.labels(self._name(address)).inc()

    def connection_stats(self) -> list[tuple[str, str, int, int, int]]:
        """Per upstream address: name, address, connections in use, idle, requests queued.

        Pools that differ only in what the address's text does not show (a CA bundle, a
        client certificate) are added up: one series per name and address."""
        rows: dict[tuple[str, str], list[int]] = {}
        for address, active, idle, queued in self.client.stats():
            row = rows.setdefault((self._name(address), str(address)), [0, 0, 0])
            row[0] += active
            row[1] += idle
            row[2] += queued
        return [(name, text, *row) for (name, text), row in rows.items()]

    def unreachable(self, response: UpstreamResponse, upstream: Upstream) -> bool:
        """Did this parent answer that it could not reach its own upstream at all?"""
        return upstream.is_parent and response.status >= 500 and \
            proxy_status_error(response.headers, upstream.name) in UNREACHABLE_ERRORS

    def _on_health_change(self, name: str, up: bool) -> None:
        self.metrics.parent_up.labels(name).set(1 if up else 0)
        if not up:
            for waiter in self._marked_down.pop(name, ()):
                if not waiter.done():
                    waiter.set_result(None)
        if up:
            log.warning("parent %s is back up", name)
        else:
            log.warning("parent %s marked down after %d consecutive failures", name, self.policy.fall)

    def origin(self, site: Site) -> Upstream:
        # Keyed by the site's fields themselves: this runs on every miss, the profile only once.
        key = (site.origin, site.origin_ca, site.origin_client_cert, site.origin_client_key)
        upstream = self._origins.get(key)
        if upstream is None:
            upstream = self._origins[key] = Upstream("origin", Address.from_url(site.origin, origin_profile(site)),
                                                     False)
        return upstream

    def parent(self, name: str, site: Site) -> Upstream:
        """Parent `name` as `site`'s requests reach it: over TLS, verified for the site's first host."""
        upstream = self.parents[name]
        if upstream.address.scheme != "https":
            return upstream
        key = (name, site.hosts[0])
        found = self._site_parents.get(key)
        if found is None:
            # One per parent and site (both bounded by the topology), so the same objects,
            # and the same pooled connections, serve every request of the site.
            found = self._site_parents[key] = Upstream(name, replace(upstream.address, server_name=site.hosts[0]),
                                                       True)
        return found

    def candidates(self, key: str, site: Site) -> list[Upstream]:
        """Healthy parents in ring order for `key`, then the origin if going direct is allowed."""
        if not self.parents:
            return [self.origin(site)]
        ordered = self.ring.lookup(key)
        healthy = [self.parent(name, site) for name in ordered if self.health.is_up(name)]
        if self.policy.go_direct:
            return healthy + [self.origin(site)]
        # Never direct: when every parent is down, try them anyway rather than fail outright.
        return healthy or [self.parent(name, site) for name in ordered]

    async def send(self, method: str, key: str, site: Site, raw_target: str, headers: CIMultiDict[str],
                   body: AsyncIterator[bytes] | None = None) -> tuple[UpstreamResponse, Upstream]:
        """Send the request to the first candidate that answers; the caller releases the response."""
        tried: list[str] = []
        last_error: tuple[str, str, tuple] = ("destination_unavailable", "no upstream configured", ())
        # This request's view, kept across a reload that happens while it waits.
        candidates, health = self.candidates(key, site), self.health
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.policy.deadline
        for index, upstream in enumerate(candidates):
            left = deadline - loop.time()
            if left <= 0:
                last_error = ("http_response_timeout", f"no answer within the {self.policy.deadline:g}s "
                                                       f"upstream deadline", ())
                break
            tried.append(upstream.name)
            started = time.monotonic()
            try:
                request = self.client.request(
                    upstream.address, method, raw_target, headers.items(), body,
                    read_timeout=left if upstream.is_parent else self.policy.timeout, deadline=deadline)
                if upstream.is_parent and body is None:
                    response = await self._unless_marked_down(upstream.name, request)
                else:
                    response = await request
            except ParentMarkedDown as exc:
                # Nothing was received, and a bodyless request can go to the next candidate.
                last_error = ("connection_timeout", str(exc), ())
                self.metrics.upstream_requests.labels(upstream.name, "parent_down").inc()
                log.info("upstream %s: %s; trying the next candidate", upstream.name, exc)
                continue
            except UpstreamIOError as exc:
                last_error = (exc.error, exc.detail, exc.params)
                if exc.error == "connection_limit_reached":
                    # Our own limit, not the upstream's failure: answer 503 now, try nothing else.
                    self.metrics.upstream_requests.labels(upstream.name, exc.error).inc()
                    break
                self._failed(upstream, exc.error, health, exc.detail)
                if exc.body_started:
                    break   # the body is gone; it cannot be replayed to the next candidate
                continue
            self.metrics.upstream_duration.labels(upstream.name).observe(time.monotonic() - started)
            if upstream.is_parent and proxy_status_error(response.headers, upstream.name) in PARENT_OWN_ERRORS:
                # The parent failed in itself (not its upstream): the next one may do better.
                last_error = ("destination_unavailable", f"{upstream.name} answered {response.status}", ())
                self._failed(upstream, f"status_{response.status}", health)
                if index < len(candidates) - 1 and not response.body_started:
                    response.release()
                    continue
            elif upstream.is_parent:
                health.success(upstream.name)
            self.metrics.upstream_requests.labels(upstream.name, f"{response.status // 100}xx").inc()
            return response, upstream
        raise UpstreamError(last_error[0], last_error[1], tried, last_error[2])

    async def _unless_marked_down(self, name: str, request: Awaitable[UpstreamResponse]) -> UpstreamResponse:
        """Await `request` to parent `name`, unless the parent is marked down first.

        A parent's host that vanishes (no reset, no answer) would hold every request
        waiting on it for the whole upstream deadline; once its probes or other requests
        have marked it down, those waiting give up on it (its connection is aborted) and
        raise ParentMarkedDown, so their fetch moves on to the next candidate.
        """
        task = asyncio.ensure_future(request)
        down = asyncio.get_running_loop().create_future()
        waiting = self._marked_down.setdefault(name, set())
        waiting.add(down)
        try:
            await asyncio.wait((task, down), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            waiting.discard(down)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ParentMarkedDown(f"{name} was marked down while this request waited for its answer")

    def _failed(self, upstream: Upstream, outcome: str, health: ParentHealth, detail: str = "") -> None:
        self.metrics.upstream_requests.labels(upstream.name, outcome).inc()
        if upstream.is_parent:
            health.failure(upstream.name)
        # A TLS failure is a misconfiguration or an impostor, never a passing fault: say it
        # at the level an operator sees by default, with why (which certificate, which alert).
        level = logging.WARNING if outcome.startswith("tls_") else logging.INFO
        log.log(level, "upstream %s failed: %s%s", upstream.name, outcome, f": {detail}" if detail else "")


def _source_ip(host: str) -> str | None:
    """The address outgoing connections leave from: the node's own, when it is one.  A host name
    (a Kubernetes Service's, say) names the node for others, not an address of this machine
    to bind; the kernel then picks, as it does for a wildcard."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return host


def _names(topology: Topology, node: Node) -> dict[tuple[str, int], str]:
    """Parent names by each IP and port they are reached on: traffic (plain or TLS, for every
    server name and TLS profile) and admin (the health probes); anything else is the origin."""
    names = {}
    for name in node.parents:
        parent = topology.node(name)
        for address in (parent.listen, parent.listen_tls, parent.admin):
            if address is not None:
                names[(address.host, address.port)] = name
    return names

