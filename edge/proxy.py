"""The request pipeline of a cache node: the one place where policy meets I/O.

Named steps, as in Varnish's request state machine:

    recv     resolve the site from Host, refuse unknown hosts and loops
    lookup   find the stored object (and the Vary variant) for the cache key
    decide   ask `policy` what to do with it (fresh, stale-while-revalidate,
             revalidate, fetch)
    fetch    through the coalescer (one fetch per key) and the upstream pool
             (parents in ring order, then the origin); store what is storable,
             streaming large bodies to the client and to disk at once
    deliver  add Age, Via, Cache-Status and X-Cache; count the request once

`X-Cache` uses nginx's vocabulary (HIT, MISS, EXPIRED, STALE, UPDATING,
REVALIDATED, BYPASS); `Cache-Status` follows RFC 9211 with one entry per tier.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from edge import policy
from edge.cachekey import cache_key, variant_store_key
from edge.config import Node, Site, Topology
from edge.metrics import NodeMetrics
from edge.store import CachedObject, CorruptEntry, Meta, Store
from edge.upstream.client import UpstreamError, UpstreamPool
from edge.upstream.coalesce import Coalescer, Flight, Landing, Outcome

log = logging.getLogger("edge.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization",
})
# Set per hop by this node, never taken from storage or passed through.
NODE_RESPONSE_FIELDS = frozenset({"content-length", "x-cache", "age"})
# A cache fill asks for the whole object; the client's own conditionals and
# ranges are answered from the stored response instead (RFC 9111 4.3.2).
CLIENT_ONLY_REQUEST_FIELDS = frozenset({
    "if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range", "range",
})
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
VARY_MARKER_STATUS = 0     # a stored Meta with this status records a URL's Vary field names
SMALL_CHUNK = 256 * 1024
DISK_CHUNK = 1024 * 1024   # fewer thread hops per byte when streaming a stored body

AppNode = web.AppKey("edge_node", "CacheNode")


@dataclass
class Exchange:
    """One client request as it moves through the pipeline."""

    request: web.Request
    site: Site
    primary: str                 # cache key of the URL
    raw_target: str              # path and query as received
    cache_status: str = "MISS"   # X-Cache value, counted once at the end


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str],
                     also: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """Drop hop-by-hop fields and those named in Connection (RFC 9110 7.6.1)."""
    drop = set(HOP_BY_HOP) | also
    for value in headers.getall("Connection", ()):
        drop.update(token.strip().lower() for token in value.split(","))
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def via_names(headers: CIMultiDictProxy[str]) -> list[str]:
    """The received-by names in Via (RFC 9110 7.6.3)."""
    names = []
    for value in headers.getall("Via", ()):
        for member in value.split(","):
            parts = member.split()
            if len(parts) >= 2:
                names.append(parts[1])
    return names


class CacheNode:
    """An L1 edge or an L2 parent: the same code, the topology decides the role."""

    def __init__(self, topology: Topology, node: Node, store: Store, upstreams: UpstreamPool,
                 metrics: NodeMetrics, clock: Callable[[], float] = time.time):
        self.topology, self.node, self.store = topology, node, store
        self.upstreams, self.metrics, self.clock = upstreams, metrics, clock
        self.flights = Coalescer()
        self.inflight = 0
        metrics.inflight.set_function(lambda: self.inflight)
        self.via = f"1.1 {node.name}"
        self._background: set[asyncio.Task] = set()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # ------------------------------------------------------------------ recv

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.inflight += 1
        started = time.monotonic()
        status = "ERROR"
        response: web.StreamResponse | None = None
        try:
            response, status = await self._recv(request)
            return response
        finally:
            self.inflight -= 1
            sent = 0
            if response is not None and request.method != "HEAD":
                sent = response.content_length if response.content_length is not None else response.body_length
            self.metrics.request_done(status, request.method, time.monotonic() - started, sent or 0)

    async def _recv(self, request: web.Request) -> tuple[web.StreamResponse, str]:
        raw_target = request.raw_path
        if not raw_target.startswith("/"):
            self.metrics.refused.labels("bad_target").inc()
            return self._error(400, "request target must be origin-form (a path)"), "REFUSED"
        host = request.headers.get("Host")
        if not host:
            self.metrics.refused.labels("no_host").inc()
            return self._error(400, "missing Host header"), "REFUSED"
        site = self.topology.site_for_host(host)
        if site is None:
            # Never an open proxy: a Host we do not serve goes nowhere (RFC 9110 15.5.20).
            self.metrics.refused.labels("unknown_host").inc()
            log.info("refused unknown host %r from %s", host, request.remote)
            return self._error(421, f"this CDN does not serve {host!r}"), "REFUSED"
        if self.node.name in via_names(request.headers):
            self.metrics.loops.inc()
            log.warning("loop detected: %s already in Via %r", self.node.name, request.headers.getall("Via"))
            return self._error(508, f"loop detected: {self.node.name} is already in Via"), "REFUSED"

        ex = Exchange(request, site, cache_key(site, raw_target), raw_target)
        if request.method in CACHEABLE_METHODS:
            response = await self._lookup(ex)
        else:
            response = await self._pass(ex)
        return response, ex.cache_status

    # ---------------------------------------------------------------- lookup

    async def _find(self, ex: Exchange) -> tuple[str, CachedObject | None]:
        """The store key for this request's variant (RFC 9111 4.1), and what is stored there."""
        stored = await self.store.get(ex.primary)
        if stored is None or stored.meta.status != VARY_MARKER_STATUS:
            return ex.primary, stored
        names = policy.vary_names(stored.meta.fields)
        if names is None:
            return ex.primary, None
        key = variant_store_key(ex.primary, policy.variant_key(names, ex.request.headers))
        return key, await self.store.get(key)

    async def _lookup(self, ex: Exchange) -> web.StreamResponse:
        key, stored = await self._find(ex)
        if stored is None:
            return await self._miss(ex, None, "uri-miss" if key == ex.primary else "vary-miss")
        decision = policy.decide_assessed(_assessment(stored.meta), self.clock())
        if decision.action is policy.Action.FRESH:
            ex.cache_status = "HIT"
            return await self._deliver_stored(ex, stored, decision.age, decision.ttl,
                                              policy.cache_status_entry(self.node.name, hit=True, ttl=decision.ttl))
        if decision.action is policy.Action.STALE_WHILE_REVALIDATE:
            ex.cache_status = "UPDATING"
            self._refresh_in_background(ex, key, stored)
            entry = policy.cache_status_entry(self.node.name, hit=True, ttl=decision.ttl,
                                              detail="stale-while-revalidate")
            return await self._deliver_stored(ex, stored, decision.age, decision.ttl, entry)
        return await self._miss(ex, (key, stored), "stale")

    # ----------------------------------------------------------------- fetch

    async def _miss(self, ex: Exchange, stale: tuple[str, CachedObject] | None, fwd: str) -> web.StreamResponse:
        """Fetch for a miss or a revalidation, one fetch per key in flight."""
        flight = self.flights.lead(ex.primary)
        if flight is None:
            self.metrics.coalesced.inc()
            landing = await self.flights.wait(ex.primary)
            response = await self._after_wait(ex, landing, stale)
            if response is not None:
                return response
            flight = self.flights.lead(ex.primary)   # None again: fetch alone, uncoalesced
        try:
            return await self._fetch(ex, stale, fwd, flight)
        finally:
            if flight is not None:
                flight.finish(Outcome.FAILED)   # no-op when _fetch already said how it went

    async def _after_wait(self, ex: Exchange, landing: Landing | None,
                          stale: tuple[str, CachedObject] | None) -> web.StreamResponse | None:
        """A follower acts on the leader's outcome; None means: fetch on your own."""
        outcome = landing.outcome if landing is not None else None
        if outcome is Outcome.STORED:
            key, stored = await self._find(ex)
            if stored is not None:
                ex.cache_status = "HIT"
                age, ttl = self._age_and_ttl(stored.meta)
                entry = policy.cache_status_entry(self.node.name, hit=True, ttl=ttl, collapsed=True)
                return await self._deliver_stored(ex, stored, age, ttl, entry)
            return None     # another variant was stored, or it was evicted already
        if outcome is Outcome.FAILED:
            served = await self._stale_if_error(ex, stale[1], None) if stale is not None else None
            if served is None and isinstance(landing.error, UpstreamError):
                return self._upstream_error(ex, landing.error)
            return served
        return None

    def _upstream_headers(self, ex: Exchange, cache_fill: bool) -> CIMultiDict[str]:
        request = ex.request
        headers = strip_hop_by_hop(request.headers, CLIENT_ONLY_REQUEST_FIELDS if cache_fill else frozenset())
        _append(headers, "Via", self.via)
        _append(headers, "X-Forwarded-For", request.remote or "")
        return headers

    async def _fetch(self, ex: Exchange, stale: tuple[str, CachedObject] | None, fwd: str,
                     flight: Flight | None, deliver: bool = True) -> web.StreamResponse | None:
        """Fetch from upstream, store what may be stored, and answer the client if `deliver`.

        Without `deliver` (a background refresh) nothing is written to the
        client and None is returned.
        """
        headers = self._upstream_headers(ex, cache_fill=True)
        if stale is not None:
            headers.update(policy.conditional_headers(stale[1].meta.fields))
        request_time = self.clock()
        try:
            response, upstream = await self.upstreams.send("GET", ex.primary, ex.site, ex.raw_target, headers)
        except UpstreamError as exc:
            if flight:
                flight.finish(Outcome.FAILED, exc)
            if not deliver:
                log.info("background refresh of %s failed: %s", ex.primary, exc)
                return None
            if stale is not None:
                served = await self._stale_if_error(ex, stale[1], None)
                if served is not None:
                    return served
            return self._upstream_error(ex, exc)
        try:
            response_time = self.clock()
            if response.status == 304 and stale is not None:
                return await self._revalidated(ex, stale, response, request_time, response_time, flight, deliver)
            if response.status >= 500 and stale is not None:
                served = await self._stale_if_error(ex, stale[1], response.status) if deliver else None
                if served is not None or not deliver:
                    if flight:
                        flight.finish(Outcome.FAILED)
                    return served
            if stale is not None:
                ex.cache_status = "EXPIRED"
            return await self._store_and_deliver(ex, response, request_time, response_time, fwd, flight, deliver)
        finally:
            response.release()

    async def _revalidated(self, ex: Exchange, stale: tuple[str, CachedObject], response: aiohttp.ClientResponse,
                           request_time: float, response_time: float, flight: Flight | None,
                           deliver: bool) -> web.StreamResponse | None:
        """RFC 9111 4.3.4: a 304 freshens the stored headers; the stored body is served."""
        key, stored = stale
        headers = policy.freshen(stored.meta.headers, response.headers)
        headers = _with_date(headers, response_time)
        meta = replace(stored.meta, headers=tuple(headers), request_time=request_time, response_time=response_time)
        await self.store.update_meta(key, meta)
        if flight:
            flight.finish(Outcome.STORED)
        if not deliver:
            return None
        fresh = await self.store.get(key) or stored
        ex.cache_status = "REVALIDATED"
        age, ttl = self._age_and_ttl(fresh.meta)
        entry = policy.cache_status_entry(self.node.name, hit=False, fwd="stale", fwd_status=304, ttl=ttl)
        return await self._deliver_stored(ex, fresh, age, ttl, entry)

    async def _store_and_deliver(self, ex: Exchange, response: aiohttp.ClientResponse, request_time: float,
                                 response_time: float, fwd: str, flight: Flight | None,
                                 deliver: bool) -> web.StreamResponse | None:
        request = ex.request
        stored_headers = _storable_headers(response.headers, response_time)
        multi = CIMultiDict(stored_headers)
        ok, why = policy.storable("GET", response.status, request.headers, multi)
        names = policy.vary_names(multi) if ok else ()
        if ok and names is None:
            ok, why = False, "vary-star"
        writer = None
        store_key = ex.primary
        if ok:
            if names:
                store_key = variant_store_key(ex.primary, policy.variant_key(names, request.headers))
                await self._write_vary_marker(ex.primary, multi, request_time, response_time)
            writer = self.store.writer(store_key, size_hint=response.content_length)
        elif flight:
            flight.finish(Outcome.NOT_STORED)

        age = policy.current_age(multi, request_time, response_time, self.clock())
        ttl = policy.freshness_lifetime(multi, status=response.status) - age if ok else None
        entry = policy.cache_status_entry(self.node.name, hit=False, fwd=fwd, fwd_status=response.status,
                                          stored=ok, ttl=ttl, detail=None if ok else why)
        out_headers = self._client_headers(multi, age, entry, ex.cache_status)
        length = response.content_length
        status = response.status
        meta_of = lambda size: Meta(status=status, headers=tuple(stored_headers),  # noqa: E731
                                    request_time=request_time, response_time=response_time, size=size,
                                    url=f"{ex.site.hosts[0]}{ex.raw_target}")

        if length is not None and length <= self.node.stream_threshold:
            # Small: read whole, store, then answer (followers are released first).
            try:
                body = await response.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if writer:
                    await writer.abort()
                error = UpstreamError("http_response_incomplete", str(exc) or type(exc).__name__, [])
                if flight:
                    flight.finish(Outcome.FAILED, error)
                return self._upstream_error(ex, error)
            if writer:
                await writer.write(body)
                committed = await writer.commit(meta_of(len(body)))
                if flight:
                    flight.finish(Outcome.STORED if committed else Outcome.NOT_STORED)
            return await self._respond(ex, status, out_headers, body) if deliver else None

        # Large or unknown length: stream to the client and to the store at once.
        # A Range is served from the whole body as it passes (the fill always
        # fetches everything), once the length is known.
        client_status, span = status, None
        if deliver and length is not None and request.method == "GET":
            client_status, span = _apply_range(request, status, out_headers, length)
        client = web.StreamResponse(status=client_status, headers=out_headers)
        if client_status == 416:
            client.content_length = 0
        elif span is not None:
            client.content_length = span[1] - span[0] + 1
        elif length is not None:
            client.content_length = length
        client_alive = deliver
        try:
            if deliver:
                await client.prepare(request)
                if request.method == "HEAD" or client_status == 416:
                    await client.write_eof()
                    client_alive = False
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            client_alive = False
        if writer is None and not client_alive:
            return client if deliver else None
        written = 0
        try:
            async for chunk in response.content.iter_chunked(SMALL_CHUNK):
                written += len(chunk)
                if writer:
                    await writer.write(chunk)
                if client_alive:
                    try:
                        if span is None:
                            await client.write(chunk)
                        else:
                            piece = _clip(chunk, written - len(chunk), span)
                            if piece:
                                await client.write(piece)
                            if written > span[1]:
                                await client.write_eof()    # the range is complete
                                client_alive = False
                    except (ConnectionError, aiohttp.ClientConnectionResetError):
                        client_alive = False   # keep filling the cache for followers
                    if not client_alive and writer is None:
                        break
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("upstream body for %s broke after %d bytes: %s", ex.primary, written, exc)
            if writer:
                await writer.abort()
            if flight:
                flight.finish(Outcome.FAILED)
            if deliver and request.transport is not None:
                request.transport.abort()   # the client must see a truncated response, not a short one
            return client if deliver else None
        if writer:
            committed = await writer.commit(meta_of(written))
            if flight:
                flight.finish(Outcome.STORED if committed else Outcome.NOT_STORED)
        if client_alive:
            try:
                await client.write_eof()
            except (ConnectionError, aiohttp.ClientConnectionResetError):
                pass
        return client if deliver else None

    async def _write_vary_marker(self, primary: str, headers: CIMultiDict[str],
                                 request_time: float, response_time: float) -> None:
        vary = ", ".join(headers.getall("Vary", ()))
        current = await self.store.get(primary)
        if current is not None and current.meta.status == VARY_MARKER_STATUS \
                and policy.vary_names(current.meta.fields) == policy.vary_names(headers):
            return
        writer = self.store.writer(primary, size_hint=0)
        await writer.commit(Meta(status=VARY_MARKER_STATUS, headers=(("Vary", vary),),
                                 request_time=request_time, response_time=response_time, size=0))

    def _refresh_in_background(self, ex: Exchange, key: str, stored: CachedObject) -> None:
        """stale-while-revalidate (RFC 5861 3): refresh once, without holding the client."""
        flight = self.flights.lead(ex.primary)
        if flight is None:
            return   # a refresh is already under way

        # Its own Exchange: the client's request is answered (and counted) meanwhile.
        background = replace(ex, cache_status="UPDATING")

        async def refresh() -> None:
            try:
                await self._fetch(background, (key, stored), "stale", flight, deliver=False)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                log.info("background refresh of %s broke: %s", ex.primary, exc)
            finally:
                flight.finish(Outcome.FAILED)   # no-op when the refresh said how it went

        task = asyncio.create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stale_if_error(self, ex: Exchange, stored: CachedObject,
                              status: int | None) -> web.StreamResponse | None:
        """RFC 5861 4: serve the stale copy when the upstream fails, if the response allows it."""
        meta = stored.meta
        multi = meta.fields
        now = self.clock()
        if not policy.stale_if_error_allowed(multi, meta.request_time, meta.response_time, now):
            return None
        ex.cache_status = "STALE"
        age, ttl = self._age_and_ttl(meta)
        entry = policy.cache_status_entry(self.node.name, hit=True, ttl=ttl, fwd_status=status,
                                          detail="stale-if-error")
        return await self._deliver_stored(ex, stored, age, ttl, entry)

    # ------------------------------------------------------------------ pass

    async def _pass(self, ex: Exchange) -> web.StreamResponse:
        """Unsafe and unknown methods: forwarded with their body, never stored (nginx BYPASS)."""
        request = ex.request
        ex.cache_status = "BYPASS"
        headers = self._upstream_headers(ex, cache_fill=False)
        body = request.content.iter_chunked(SMALL_CHUNK) if request.body_exists else None
        try:
            response, _ = await self.upstreams.send(request.method, ex.primary, ex.site, ex.raw_target,
                                                    headers, body)
        except UpstreamError as exc:
            return self._upstream_error(ex, exc)
        try:
            await self._invalidate(ex, response)
            multi = CIMultiDict(strip_hop_by_hop(response.headers))
            entry = policy.cache_status_entry(self.node.name, hit=False, fwd="bypass", fwd_status=response.status)
            out_headers = self._client_headers(multi, None, entry, ex.cache_status)
            client = web.StreamResponse(status=response.status, headers=out_headers)
            if response.content_length is not None:
                client.content_length = response.content_length
            await client.prepare(request)
            async for chunk in response.content.iter_chunked(SMALL_CHUNK):
                await client.write(chunk)
            await client.write_eof()
            return client
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
            log.info("pass-through of %s %s broke: %s", request.method, ex.raw_target, exc)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=502)
        finally:
            response.release()

    async def _invalidate(self, ex: Exchange, response: aiohttp.ClientResponse) -> None:
        """RFC 9111 4.4: a successful unsafe method invalidates the URL and same-origin Location."""
        host = ex.request.headers.get("Host", "")
        request_url = f"http://{host}{ex.raw_target}"
        for url in policy.invalidation_targets(ex.request.method, response.status, request_url, response.headers):
            target = url.split("://", 1)[-1]
            target = target[target.find("/"):] if "/" in target else "/"
            key = cache_key(ex.site, target)
            if await self.store.delete(key):
                self.metrics.invalidations.labels("unsafe-method").inc()
                log.info("invalidated %s after %s", key, ex.request.method)

    async def purge(self, site: Site, raw_target: str) -> bool:
        """Remove a URL (and its Vary marker, which orphans the variants) from this node."""
        removed = await self.store.delete(cache_key(site, raw_target))
        if removed:
            self.metrics.invalidations.labels("purge").inc()
        return removed

    # --------------------------------------------------------------- deliver

    def _age_and_ttl(self, meta: Meta) -> tuple[float, float]:
        """Current age and remaining freshness of a stored response, now."""
        assessment = _assessment(meta)
        age = policy.age_at(assessment, self.clock())
        return age, assessment.lifetime - age

    def _client_headers(self, stored: CIMultiDict[str] | CIMultiDictProxy[str], age: float | None, entry: str,
                        cache_status: str) -> CIMultiDict[str]:
        headers = CIMultiDict(stored)
        for name in NODE_RESPONSE_FIELDS:
            headers.popall(name, None)
        if age is not None:
            headers["Age"] = policy.age_value(age)
        _append(headers, "Via", self.via)
        _append(headers, "Cache-Status", entry)
        headers["X-Cache"] = cache_status
        return headers

    async def _respond(self, ex: Exchange, status: int, headers: CIMultiDict[str],
                       body: bytes) -> web.StreamResponse:
        if ex.request.method == "HEAD":
            return await self._head(ex, status, headers, len(body))
        status, span = _apply_range(ex.request, status, headers, len(body))
        if span is not None:
            body = body[span[0]:span[1] + 1]
        elif status == 416:
            body = b""
        return web.Response(status=status, headers=headers, body=body)

    async def _deliver_stored(self, ex: Exchange, stored: CachedObject, age: float, ttl: float,
                              entry: str) -> web.StreamResponse:
        request = ex.request
        meta = stored.meta
        multi = meta.fields
        headers = self._client_headers(multi, age, entry, ex.cache_status)
        if policy.client_not_modified(request.method, request.headers, multi, status=meta.status):
            # RFC 9110 15.4.5: a 304 carries the validators and caching fields, no content fields.
            for name in ("Content-Type", "Content-Encoding", "Content-Language", "Content-Range"):
                headers.popall(name, None)
            return web.Response(status=304, headers=headers)
        if request.method == "HEAD":
            return await self._head(ex, meta.status, headers, meta.size)
        if stored.body is not None:
            return await self._respond(ex, meta.status, headers, stored.body)
        status, span = _apply_range(request, meta.status, headers, meta.size)
        if status == 416:
            return web.Response(status=416, headers=headers)
        start, end = (span[0], span[1] + 1) if span is not None else (0, meta.size)
        chunks = stored.chunks(DISK_CHUNK, start, end)
        try:
            first = await anext(chunks, b"")
        except CorruptEntry:
            # A broken cache file is a miss, never an error to the client.
            log.warning("corrupt cache entry for %s; fetching again", ex.primary)
            ex.cache_status = "MISS"
            return await self._miss(ex, None, "uri-miss")
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = end - start
        await response.prepare(request)
        try:
            if first:
                await response.write(first)
            async for chunk in chunks:
                await response.write(chunk)
            await response.write_eof()
        except CorruptEntry:
            log.warning("cache entry for %s broke mid-response", ex.primary)
            if request.transport is not None:
                request.transport.abort()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        return response

    async def _head(self, ex: Exchange, status: int, headers: CIMultiDict[str], size: int) -> web.StreamResponse:
        """A HEAD answer carries the Content-Length of the GET it stands for (RFC 9110 9.3.2)."""
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = size
        await response.prepare(ex.request)
        await response.write_eof()
        return response

    def _upstream_error(self, ex: Exchange, exc: UpstreamError) -> web.Response:
        status = 504 if exc.error == "connection_timeout" else 502
        ex.cache_status = "MISS" if ex.cache_status in ("HIT",) else ex.cache_status
        log.warning("%s %s: upstream failed: %s", ex.request.method, ex.raw_target, exc)
        headers = {
            "Proxy-Status": f'{self.node.name}; error={exc.error}; details="{_sf_escape(exc.detail)}"',
            "Cache-Status": policy.cache_status_entry(self.node.name, hit=False, fwd="miss",
                                                      detail=exc.error),
            "X-Cache": ex.cache_status,
            "Via": self.via,
        }
        return web.Response(status=status, text=f"{status} upstream unavailable: {exc.error}\n", headers=headers)

    def _error(self, status: int, text: str) -> web.Response:
        return web.Response(status=status, text=f"{status} {text}\n", headers={"Via": self.via})


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    """Add a member to a list-valued field, folding repeated lines into one (RFC 9110 5.3)."""
    prior = ", ".join(headers.popall(name, ()))
    headers[name] = f"{prior}, {value}" if prior else value


def _assessment(meta: Meta) -> policy.Assessment:
    """The policy's time-independent view of a stored response, computed once per Meta."""
    assessment = meta.memo.get("assessment")
    if assessment is None:
        assessment = meta.memo["assessment"] = policy.assess(meta.fields, meta.request_time,
                                                             meta.response_time, meta.status)
    return assessment


def _apply_range(request: web.Request, status: int, headers: CIMultiDict[str],
                 size: int) -> tuple[int, tuple[int, int] | None]:
    """Answer a Range request from a whole stored body (RFC 9110 14): the status and span to send.

    Sets Content-Range (and Accept-Ranges) in `headers`; the span is inclusive.
    """
    if status != 200:
        return status, None
    headers["Accept-Ranges"] = "bytes"
    span = policy.requested_range(request.method, request.headers, headers, status, size)
    if span is None:
        return status, None
    if span == policy.UNSATISFIABLE:
        headers["Content-Range"] = f"bytes */{size}"
        return 416, None
    headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
    return 206, span


def _clip(chunk: bytes, position: int, span: tuple[int, int]) -> bytes:
    """The part of `chunk` (which starts at byte `position`) inside the inclusive `span`."""
    low = max(span[0] - position, 0)
    high = min(span[1] + 1 - position, len(chunk))
    return chunk[low:high] if high > low else b""


def _sf_escape(text: str) -> str:
    return "".join(c for c in text if 32 <= ord(c) < 127).replace("\\", "\\\\").replace('"', '\\"')[:200]


def _with_date(headers: list[tuple[str, str]], response_time: float) -> list[tuple[str, str]]:
    if any(name.lower() == "date" for name, _ in headers):
        return headers
    from email.utils import formatdate
    return headers + [("Date", formatdate(response_time, usegmt=True))]


def _storable_headers(headers: CIMultiDictProxy[str], response_time: float) -> list[tuple[str, str]]:
    """What a stored response keeps of the upstream's fields: end-to-end ones, and a Date."""
    kept = strip_hop_by_hop(headers, frozenset({"content-length", "x-cache"}))
    return _with_date(list(kept.items()), response_time)


def make_app(node: CacheNode) -> web.Application:
    app = web.Application(handler_args={"max_field_size": 16384})
    app[AppNode] = node
    app.router.add_route("*", "/{tail:.*}", node.handle)
    return app
