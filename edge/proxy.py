"""The request pipeline of a cache node: the one place where policy meets I/O.

It takes a plain request view (:class:`edge.http.message.Request`) and
returns what to send (:class:`edge.http.message.Reply`); the connection
layer (`edge.http`) decides how.  Named steps, as in Varnish's request state
machine:

    hit_now  the front's fast path: a fresh memory hit of a plain GET/HEAD,
             answered from the stored object's pre-serialised header block
    recv     resolve the site from Host, refuse unknown hosts, methods the
             site does not allow, loops and heads the parents would refuse
    lookup   find the stored object (and the Vary variant) for the cache key
    decide   ask `policy` what to do with it (fresh, stale-while-revalidate,
             revalidate, fetch); the X-Cache verdict follows from the action
    fetch    through the coalescer (one fetch per key) and the upstream pool
             (parents in ring order, then the origin)
    store    keep what `policy` says is storable; large bodies stream to the
             client and to the store at once (:class:`FillStream`)
    deliver  a Reply with Age, Via, Cache-Status and X-Cache

`X-Cache` uses nginx's vocabulary (HIT, MISS, EXPIRED, STALE, UPDATING,
REVALIDATED, BYPASS); `Cache-Status` follows RFC 9211 with one entry per tier.
Every fetch's coalescing outcome reaches its followers through `_land`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from email.utils import formatdate
from pathlib import Path

from multidict import CIMultiDict, CIMultiDictProxy

from edge import policy
from edge.bans import BanList
from edge.cachekey import (VARIANT_SEPARATOR, cache_key, key_prefix, keyed_target, normalise_target,
                           variant_store_key)
from edge.config import Node, Site, Topology, normalise_host
from edge.http.message import BodyAborted, ClientGone, Reply, Request, error_reply
from edge.http.rules import serialise_fields, status_line
from edge.invalidation import Invalidator
from edge.metrics import NodeMetrics
from edge.slicing import Slicer
from edge.store import CachedObject, CorruptEntry, Meta, Store
from edge.store.base import Writer
from edge.surrogate import TAG_FIELDS
from edge.upstream.client import Upstream, UpstreamError, UpstreamPool
from edge.upstream.coalesce import Coalescer, Flight, Landing, Outcome
from edge.upstream.http1 import TIMEOUT_ERRORS, UpstreamIOError, UpstreamResponse

log = logging.getLogger("edge.proxy")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    "proxy-authenticate", "proxy-authorization",
})
# Set per hop by this node, never taken from storage or passed through.
NODE_RESPONSE_FIELDS = frozenset({"content-length", "x-cache", "age"})
# A cache fill asks for the whole object; the client's own conditionals and
# ranges are answered from the stored response instead (RFC 9111 4.3.2).  A
# fill is a bodyless GET: the client's body framing never goes with it (a
# forwarded Content-Length without its body would stall the upstream).
CLIENT_ONLY_REQUEST_FIELDS = frozenset({
    "if-none-match", "if-modified-since", "if-match", "if-unmodified-since", "if-range", "range",
    "content-length", "expect",
})
CACHEABLE_METHODS = frozenset({"GET", "HEAD"})
VARY_MARKER_STATUS = 0     # a stored Meta with this status records a URL's Vary field names
# The marker's generation is part of every variant key: a purge or an
# invalidation removes the marker, and the variants stored under the old
# generation can never be found again (the LRU reclaims them).
GENERATION_FIELD = "Generation"
DISK_CHUNK = 4 * 1024 * 1024   # disk hits: fewer thread hops per byte (measured: see README, Disk hits)
KNOWN_HOSTS_MAX = 4096     # raw Host values remembered by the hit path
# Longer Host values are looked up every time instead of remembered: a DNS name
# is at most 253 bytes, plus a port.  Without it the memo could hold 4096 Host
# fields of up to max_header_bytes each (128 MiB at the default 32 KiB).
KNOWN_HOST_BYTES_MAX = 300
# The same for raw Via values (our tiers add a few short members: "1.1 l2-a, 1.1 l1-east").
KNOWN_VIA_BYTES_MAX = 300



@dataclass
class Exchange:
    """One client request as it moves through the pipeline."""

    request: Request
    site: Site
    primary: str                 # cache key of the URL
    raw_target: str              # path and query as received
    cache_status: str = "MISS"   # X-Cache value, counted once at the end
    upstream: str = ""           # who answered the fetch (parent name or "origin")
    slice_etag: str | None = None    # a sliced response must be of this version (edge.slicing)

    def reply(self, status: int, headers, body=b"", **kw) -> Reply:
        return Reply(status, headers.items() if hasattr(headers, "items") else headers, body,
                     cache_status=self.cache_status, upstream=self.upstream, **kw)


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
    """An L1 edge or an L2 parent: the same code, the topology decides the role.

    `clock` is the node's idea of now (seconds since the epoch); tests pass
    their own to expire objects without sleeping.  Purges are bans
    (:mod:`edge.bans`) checked wherever a stored object is about to be used
    or stored; `ban_file` keeps them across a restart.
    """

    def __init__(self, topology: Topology, node: Node, store: Store, upstreams: UpstreamPool,
                 metrics: NodeMetrics, clock: Callable[[], float] = time.time, ban_file: Path | None = None):
        self.topology, self.node, self.store = topology, node, store
        self.upstreams, self.metrics, self.clock = upstreams, metrics, clock
        self.bans = BanList()
        # Fetches under way (id -> request time): a ban stays until none older than it is left.
        self._fetches: dict[int, float] = {}
        self._fetch_ids = itertools.count()
        self.invalidator = Invalidator(store, self.bans, clock, self.oldest_fetch, metrics, ban_file)
        metrics.bans.set_function(lambda: len(self.bans))
        self.flights = Coalescer()
        self.inflight = 0
        metrics.inflight.set_function(lambda: self.inflight)
        self.via = f"1.1 {node.name}"
        self._via_token = node.name.encode()
        self._sites_by_raw_host: dict[bytes, tuple[Site, str] | None]
        self._tier_vias: dict[bytes, bool]          # raw Via values -> came through our tier?
        self._background: set[asyncio.Task] = set()
        self._generations = itertools.count()
        self.slicer = Slicer(self)
        self._take_topology(topology, node)

    def reload(self, topology: Topology, node: Node) -> None:
        """Serve from a reloaded topology (sites, tiers, parents' limits, this node's settings).

        One step on the event loop: a request either started before it and
        keeps the site it resolved, or starts after it and sees only the new
        topology.  The cache is kept: objects of a site that stays are found
        under the same keys; a stored object's freshness is worked out again
        under its site's new defaults (see `_assessment`).
        """
        self._take_topology(topology, node)

    def _take_topology(self, topology: Topology, node: Node) -> None:
        tier_names = frozenset(n.name for n in topology.nodes if n.role != "origin") - {node.name}
        # The smallest head any parent accepts: what this node forwards must fit it.
        parents = [topology.node(name).limits for name in node.parents]
        self.topology, self.node, self._tier_names = topology, node, tier_names
        self._parent_head_bytes = min((p.max_header_bytes for p in parents), default=None)
        self._parent_head_fields = min((p.max_headers for p in parents), default=None)
        # Raw Host values resolve again, against the new sites; Via values against the new tiers.
        self._sites_by_raw_host = {}
        self._tier_vias = {}

    async def start(self) -> None:
        """Load the bans kept from the last run and start applying them."""
        await self.invalidator.start()

    async def close(self) -> None:
        await self.invalidator.close()
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    def oldest_fetch(self) -> float | None:
        """The request time of the oldest fetch still under way (it may yet store an object)."""
        return min(self._fetches.values(), default=None)

    # ------------------------------------------------------------- hit path

    def hit_now(self, method: str, target: str, host: bytes | None,
                via: bytes | None) -> tuple[bytes, bytes, str] | None:
        """A fresh, stored, memory-tier 200 for a plain GET/HEAD: the header block and body to write now.

        Everything that changes per object is in the block built once per
        stored Meta; only the Cache-Status ttl and Age are added here.
        Anything unusual returns None and takes the general path.
        """
        if host is None or (method != "GET" and method != "HEAD") or target[:1] != "/":
            return None
        tier = False
        if via is not None:
            if self._via_token in via:
                return None             # maybe a loop: recv decides
            tier = self._tier_vias.get(via)
            if tier is None:
                tier = self._tier_via(via)
        site_and_prefix = self._sites_by_raw_host.get(host) or self._site_by_raw_host(host)
        if site_and_prefix is None:
            return None
        site, prefix = site_and_prefix
        if "?" in target and (site.ignore_query or site.ignore_query_params):
            target = keyed_target(site, target)
        stored = self.store.in_memory(prefix + normalise_target(target))
        if stored is None:
            return None
        meta = stored.meta
        memo = meta.memo
        bans = self.bans
        if meta.request_time < bans.newest and memo.get("bans") != bans.generation:
            return None                 # a purge since it was fetched: _find checks it
        assessed = memo.get("assessment")
        assessment = assessed[1] if assessed is not None and assessed[0] is site.defaults \
            else _assessment(meta, site.defaults)
        age = assessment.initial_age + (self.clock() - assessment.response_time)      # policy.age_at
        ttl = assessment.lifetime - age
        if ttl <= 0 or assessment.no_cache or meta.status != 200:
            return None
        head = self._hit_head(meta, age, ttl, b"", tier)
        body = stored.body
        self.metrics.requests.fast_hit(site.name, method, len(body) if method == "GET" else 0)
        return head, body, "HIT"

    def _hit_block(self, meta: Meta, tier: bool) -> bytes:
        """Status line and fields of a hit on `meta`, up to ``Cache-Status: ...; ttl=``."""
        headers = self._client_headers(meta.fields, None, "", "HIT", tier)
        cache_status = headers.popall("Cache-Status", [""])[0]
        headers["Accept-Ranges"] = "bytes"
        headers["Content-Length"] = str(meta.size)
        entry = policy.cache_status_entry(self.node.name, hit=True)
        prior = cache_status.rstrip(", ")
        return (status_line(meta.status) + serialise_fields(headers.items())
                + f"Cache-Status: {prior + ', ' if prior else ''}{entry}; ttl=".encode())

    def _collapsed_hit(self, ex: Exchange, stored: CachedObject, age: float, ttl: float) -> Reply:
        """A follower's answer from the object's hit block: many followers wake at once."""
        head = self._hit_head(stored.meta, age, ttl, b"; collapsed", self._from_our_tier(ex.request))
        return ex.reply(200, (), stored.body, head=head, bodyless=ex.request.method == "HEAD")

    def _hit_head(self, meta: Meta, age: float, ttl: float, params: bytes, tier: bool) -> bytes:
        """The stored block (built once per Meta, with the tag fields for our own tiers
        and without for clients) with this second's ttl, any further Cache-Status
        parameters, and Age."""
        name = "hit_block_tier" if tier else "hit_block"
        block = meta.memo.get(name)
        if block is None:
            block = meta.memo[name] = self._hit_block(meta, tier)
        return b"%s%d%s\r\nAge: %s\r\n" % (block, ttl, params, policy.age_value(age).encode())

    def _tier_via(self, via: bytes) -> bool:
        """Did a request with this raw Via come through another cache node of this topology?
        Remembered (bounded), as the hit path meets the same few values again and again."""
        names = [member.split()[1] for member in via.decode("latin-1").split(",") if len(member.split()) >= 2]
        tier = not self._tier_names.isdisjoint(names)
        # Bounded in size too: a client may send up to max_header_bytes of Via.
        if len(self._tier_vias) < KNOWN_HOSTS_MAX and len(via) <= KNOWN_VIA_BYTES_MAX:
            self._tier_vias[via] = tier
        return tier

    def _site_by_raw_host(self, host: bytes) -> tuple[Site, str] | None:
        """The site of a raw Host value and its cache-key prefix, remembered (bounded)."""
        try:
            return self._sites_by_raw_host[host]
        except KeyError:
            text = host.decode("latin-1")
            site = self.topology.site_for_host(text)
            found = (site, key_prefix(site, text)) if site is not None else None
            if len(self._sites_by_raw_host) < KNOWN_HOSTS_MAX and len(host) <= KNOWN_HOST_BYTES_MAX:
                self._sites_by_raw_host[host] = found
            return found

    # ------------------------------------------------------------------ recv

    async def handle(self, request: Request) -> Reply:
        """The general path; the front calls `done` once the reply was written."""
        self.inflight += 1
        return await self._recv(request)

    def done(self, request: Request, reply: Reply, sent: int, duration: float) -> None:
        self.inflight -= 1
        self.metrics.request_done(self._site_name(request), reply.cache_status or "ERROR", request.method,
                                  reply.status, duration, sent)

    def _site_name(self, request: Request) -> str:
        """The configured site a request was for, as the metrics' `site` label: "" when none took it
        (no or several Hosts, an unknown one), so the label never takes a value a client made up."""
        hosts = request.headers.getall("Host", ())
        if len(hosts) != 1:
            return ""
        found = self._site_by_raw_host(hosts[0].encode("latin-1"))
        return found[0].name if found is not None else ""

    async def _recv(self, request: Request) -> Reply:
        raw_target = request.target
        if not raw_target.startswith("/"):
            self.metrics.refused.labels("bad_target").inc()
            return self._error(400, "request target must be origin-form (a path)")
        hosts = request.headers.getall("Host", ())
        if len(hosts) != 1:
            # RFC 9112 3.2: no Host, or more than one, is a 400.
            self.metrics.refused.labels("no_host").inc()
            return self._error(400, "a request needs exactly one Host header")
        host = hosts[0]
        site = self.topology.site_for_host(host)
        if site is None:
            # Never an open proxy: a Host we do not serve goes nowhere (RFC 9110 15.5.20).
            self.metrics.refused.labels("unknown_host").inc()
            log.info("refused unknown host %r from %s", host, request.remote)
            return self._error(421, f"this CDN does not serve {host!r}")
        if site.https_redirect and not request.tls and self.node.listen_tls is not None \
                and not self._from_our_tier(request):
            # 308, not 301: the method and body are kept (RFC 9110 15.4.9).  Requests from our
            # own L1s come over plain HTTP on purpose and are never redirected.
            return error_reply(308, "this site is served over HTTPS", [
                ("Location", https_location(host, self.node.listen_tls.port, raw_target)), ("Via", self.via)],
                cache_status="REDIRECT")
        if request.method not in site.allowed_methods:
            return self._method_not_allowed(request, site)
        if self.node.name in via_names(request.headers):
            self.metrics.loops.inc()
            log.warning("loop detected: %s already in Via %r", self.node.name, request.headers.getall("Via"))
            return self._error(508, f"loop detected: {self.node.name} is already in Via")
        if self._too_large_for_parents(request):
            self.metrics.refused.labels("header_too_large").inc()
            return self._error(431, "header fields too large to forward to this node's parents")

        ex = Exchange(request, site, cache_key(site, raw_target, host), raw_target)
        if request.method in CACHEABLE_METHODS:
            if site.slice_size:
                return await self.slicer.handle(ex)     # large objects: fetched and stored in slices
            return await self._lookup(ex)
        return await self._pass(ex)

    def _method_not_allowed(self, request: Request, site: Site) -> Reply:
        """405 for a method the site does not allow (RFC 9110 15.5.6), never forwarded.

        Refused here, before anything goes upstream, so such a request can never
        invalidate a stored object (RFC 9111 4.4 lets any successful unsafe method
        do that): who may change the cache is the site's allowed methods plus
        the purge token, whatever the origin answers.
        """
        self.metrics.refused.labels("method_not_allowed").inc()
        log.info("refused %s %s from %s: method not allowed for site %s", request.method, request.target,
                 request.remote, site.name)
        return error_reply(405, f"{request.method} is not allowed here",
                           [("Allow", site.allow_field), ("Via", self.via)])

    def _too_large_for_parents(self, request: Request) -> bool:
        """Would the head this node forwards (with its Via and X-Forwarded-For) exceed a parent's limits?"""
        if self._parent_head_bytes is None:
            return False
        added = len(self.via) + len(request.remote) + 40    # ", " separators and the two field lines
        size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers) + added
        return size > self._parent_head_bytes or len(request.raw_headers) + 2 > self._parent_head_fields

    # ---------------------------------------------------------------- lookup

    async def _find(self, ex: Exchange) -> tuple[str, CachedObject | None]:
        """The store key for this request's variant (RFC 9111 4.1), and what is stored there
        as the bans see it: absent after a purge, stale after a soft purge."""
        stored = await self.store.get(ex.primary)
        if stored is None or stored.meta.status != VARY_MARKER_STATUS:
            return ex.primary, self._unbanned(ex.primary, stored)
        names = policy.vary_names(stored.meta.fields)
        if names is None:
            return ex.primary, None
        key = _variant_key(ex.primary, stored.meta, names, ex.request.headers)
        return key, self._unbanned(key, await self.store.get(key))

    def _unbanned(self, key: str, stored: CachedObject | None) -> CachedObject | None:
        """`stored` as the live bans see it: None (purged), a stale view (soft-purged) or itself."""
        if stored is None:
            return None
        meta = self.after_bans(key, stored.meta)
        if meta is stored.meta:
            meta.memo["bans"] = self.bans.generation     # the hit path need not ask again
            return stored
        return stored.with_meta(meta) if meta is not None else None

    def after_bans(self, key: str, meta: Meta) -> Meta | None:
        """What the bans leave of an object stored (or about to be) at `key`: None when a
        purge covers it, a copy stale since the purge when a soft purge does, else `meta`."""
        if meta.request_time >= self.bans.newest:
            return meta                 # newer than every ban: its tags need not even be parsed
        verdict = self.bans.check(key, meta.tags, meta.request_time)
        if verdict is None:
            return meta
        if verdict.hard:
            return None
        if meta.stale_at is not None and meta.stale_at <= verdict.stale_at:
            return meta
        return replace(meta, stale_at=verdict.stale_at)

    async def _lookup(self, ex: Exchange) -> Reply:
        key, stored = await self._find(ex)
        if stored is None:
            return await self._miss(ex, None, "uri-miss" if key == ex.primary else "vary-miss")
        return await self._decide(ex, key, stored)

    # ---------------------------------------------------------------- decide

    async def _decide(self, ex: Exchange, key: str, stored: CachedObject) -> Reply:
        decision = policy.decide_assessed(_assessment(stored.meta, ex.site.defaults), self.clock())
        if decision.action is policy.Action.FRESH:
            entry = self._cache_status(ex, hit=True, ttl=decision.ttl)
        elif decision.action is policy.Action.STALE_WHILE_REVALIDATE:
            self._refresh_in_background(ex, key, stored)
            entry = self._cache_status(ex, hit=True, ttl=decision.ttl, detail="stale-while-revalidate")
        else:
            return await self._miss(ex, (key, stored), "stale")
        return await self._deliver_stored(ex, stored, decision.age, entry)

    def _cache_status(self, ex: Exchange, *, hit: bool = False, fwd: str | None = None,
                      fwd_status: int | None = None, stored: bool = False, ttl: float | None = None,
                      detail: str | None = None, collapsed: bool = False) -> str:
        """This node's Cache-Status entry for the response; its X-Cache verdict follows from it."""
        ex.cache_status = policy.x_cache(hit=hit, fwd=fwd, fwd_status=fwd_status, detail=detail)
        return policy.cache_status_entry(self.node.name, hit=hit, fwd=fwd, fwd_status=fwd_status, stored=stored,
                                         ttl=ttl, detail=detail, collapsed=collapsed)

    # ----------------------------------------------------------------- fetch

    async def _miss(self, ex: Exchange, stale: tuple[str, CachedObject] | None, fwd: str) -> Reply:
        """Fetch for a miss or a revalidation, one fetch per key in flight."""
        flight = self.flights.lead(ex.primary)
        if flight is None:
            self.metrics.coalesced.inc()
            landing = await self.flights.wait(ex.primary)
            reply = await self._after_wait(ex, landing, stale)
            if reply is not None:
                return reply
            flight = self.flights.lead(ex.primary)   # None again: fetch alone, uncoalesced
        try:
            reply, landing = await self._fetch(ex, stale, fwd, flight)
        except BaseException:
            if flight is not None:
                flight.finish(Outcome.FAILED)
            raise
        self._land(flight, landing)
        return reply

    def _land(self, flight: Flight | None, landing: Landing | asyncio.Future[Landing]) -> None:
        """Tell the followers how the fetch ended: now, or when a streamed fill completes."""
        if flight is None:
            return
        if isinstance(landing, Landing):
            flight.finish(landing.outcome, landing.error, landing.stored)
        else:
            landing.add_done_callback(lambda done: self._land(flight, done.result()))

    async def _after_wait(self, ex: Exchange, landing: Landing | None,
                          stale: tuple[str, CachedObject] | None) -> Reply | None:
        """A follower acts on the leader's outcome; None means: fetch on your own."""
        outcome = landing.outcome if landing is not None else None
        if outcome is Outcome.STORED:
            stored = landing.stored
            if stored is None:
                key, stored = await self._find(ex)
            if stored is not None:
                age, ttl = self._age_and_ttl(stored.meta, ex.site)
                entry = self._cache_status(ex, hit=True, ttl=ttl, collapsed=True)
                if _plain(ex.request) and stored.body is not None and stored.meta.status == 200 and ttl > 0:
                    return self._collapsed_hit(ex, stored, age, ttl)
                return await self._deliver_stored(ex, stored, age, entry)
            return None     # another variant was stored, or it was evicted already
        if outcome is Outcome.FAILED:
            unreachable = isinstance(landing.error, UpstreamError)
            served = await self._stale_if_error(ex, stale[1], None, unreachable) if stale is not None else None
            if served is None and unreachable:
                return self._upstream_error(ex, landing.error)
            return served
        return None

    def _upstream_headers(self, ex: Exchange, cache_fill: bool) -> CIMultiDict[str]:
        request = ex.request
        headers = strip_hop_by_hop(request.headers, CLIENT_ONLY_REQUEST_FIELDS if cache_fill else frozenset())
        _append(headers, "Via", self.via)
        _append(headers, "X-Forwarded-For", request.remote or "")
        if ex.site.aliases:
            headers["Host"] = ex.site.hosts[0]      # one object for all its hosts: one Host upstream
        return headers

    async def _fetch(self, ex: Exchange, stale: tuple[str, CachedObject] | None, fwd: str,
                     flight: Flight | None) -> tuple[Reply, Landing | asyncio.Future[Landing]]:
        """Fetch from upstream and store what may be stored: the reply, and the coalescing outcome."""
        headers = self._upstream_headers(ex, cache_fill=True)
        if stale is not None:
            headers.update(policy.conditional_headers(stale[1].meta.fields))
        request_time = self.clock()
        fetch = next(self._fetch_ids)
        self._fetches[fetch] = request_time
        reply: Reply | None = None
        try:
            reply, landing = await self._fetch_as(ex, stale, fwd, flight, headers, request_time)
            return reply, landing
        finally:
            body = reply.body if reply is not None else None
            if isinstance(body, FillStream):        # under way until the streamed fill ends...
                body.on_finish = lambda: self._fetches.pop(fetch, None)
                # ...or until the stream is dropped unfinished: a fetch left behind here
                # would keep every later ban from ever retiring.
                weakref.finalize(body, self._fetches.pop, fetch, None)
            else:
                self._fetches.pop(fetch, None)

    async def _fetch_as(self, ex: Exchange, stale: tuple[str, CachedObject] | None, fwd: str,
                        flight: Flight | None, headers: CIMultiDict[str],
                        request_time: float) -> tuple[Reply, Landing | asyncio.Future[Landing]]:
        try:
            response, upstream = await self.upstreams.send("GET", ex.primary, ex.site, ex.raw_target, headers)
        except UpstreamError as exc:
            served = await self._stale_if_error(ex, stale[1], None, True) if stale is not None else None
            return served or self._upstream_error(ex, exc), Landing(Outcome.FAILED, exc)
        ex.upstream = upstream.name
        streaming = False
        try:
            response_time = self.clock()
            if response.status == 304 and stale is not None:
                return await self._revalidated(ex, stale, response, request_time, response_time)
            if response.status >= 500 and stale is not None:
                served = await self._stale_if_error(ex, stale[1], response.status,
                                                    self.upstreams.unreachable(response, upstream))
                if served is not None:
                    return served, Landing(Outcome.FAILED)
            reply, landing = await self._store(ex, response, upstream, request_time, response_time, fwd, flight)
            streaming = isinstance(reply.body, FillStream)
            return reply, landing
        finally:
            if not streaming:
                response.release()

    async def _revalidated(self, ex: Exchange, stale: tuple[str, CachedObject], response: UpstreamResponse,
                           request_time: float, response_time: float) -> tuple[Reply, Landing]:
        """RFC 9111 4.3.4: a 304 freshens the stored headers; the stored body is served."""
        key, stored = stale
        headers = policy.freshen(stored.meta.headers, response.headers)
        headers = _with_date(headers, response_time)
        meta = replace(stored.meta, headers=tuple(headers), request_time=request_time, response_time=response_time,
                       stale_at=None)
        checked = self.after_bans(key, meta)
        if checked is None:
            # Purged while this revalidation was under way: answered once, not kept.
            await self.store.delete(key)
            fresh = stored.with_meta(meta)
        else:
            await self.store.update_meta(key, checked)
            fresh = await self.store.get(key) or stored
        age, ttl = self._age_and_ttl(fresh.meta, ex.site)
        entry = self._cache_status(ex, fwd="stale", fwd_status=304, ttl=ttl)
        return await self._deliver_stored(ex, fresh, age, entry), Landing(Outcome.STORED)

    # ----------------------------------------------------------------- store

    async def _store(self, ex: Exchange, response: UpstreamResponse, upstream: Upstream,
                     request_time: float, response_time: float, fwd: str,
                     flight: Flight | None) -> tuple[Reply, Landing | asyncio.Future[Landing]]:
        """Store what policy allows; small bodies whole, large ones streamed to client and store at once."""
        request = ex.request
        stored_headers = _storable_headers(response.headers, response_time)
        multi = CIMultiDict(stored_headers)
        strip_cookies = ex.site.set_cookie == "strip"
        ok, why = policy.storable("GET", response.status, request.headers, multi, strip_set_cookie=strip_cookies,
                                  defaults=ex.site.defaults)
        names = policy.vary_names(multi) if ok else ()
        if ok and names is None:
            ok, why = False, "vary-star"
        if ok and response.content_length is not None and not _fits_a_tier(self.store, response.content_length):
            # Larger than every tier: not written at all, and Cache-Status does not say stored.
            ok, why = False, "too-large"
        writer: Writer | None = None
        store_key = ex.primary
        if ok:
            if names:
                marker = await self._vary_marker(ex.primary, multi, request_time, response_time)
                store_key = _variant_key(ex.primary, marker, names, request.headers)
            writer = self.store.writer(store_key, size_hint=response.content_length)

        age = policy.current_age(multi, request_time, response_time, self.clock())
        ttl = policy.freshness_lifetime(multi, status=response.status, defaults=ex.site.defaults) - age if ok else None
        entry = self._cache_status(ex, fwd=fwd, fwd_status=response.status, stored=ok, ttl=ttl,
                                   detail=None if ok else why)
        out_headers = self._client_headers(multi, age, entry, ex.cache_status, self._from_our_tier(request))
        length = response.content_length
        status = response.status
        # The stored copy leaves out what no-cache="..." / private="..." name; this client gets all.
        hidden = (policy.hidden_fields(multi) | ({"set-cookie"} if strip_cookies else set())) if ok else frozenset()
        kept = tuple((name, value) for name, value in stored_headers if name.lower() not in hidden)
        # Checked against the bans when it is stored: a purge may have come since the request left.
        meta_of = lambda size: self.after_bans(store_key, Meta(  # noqa: E731
            status=status, headers=kept, request_time=request_time, response_time=response_time, size=size,
            url=f"{ex.site.hosts[0]}{ex.raw_target}"))

        if length is not None and length <= self.node.stream_threshold:
            # Small: read whole, store, then answer (followers are released first).
            try:
                body = await response.read()
            except UpstreamIOError as exc:
                if writer:
                    await writer.abort()
                error = UpstreamError("http_response_incomplete", str(exc) or type(exc).__name__, [upstream.name])
                return self._upstream_error(ex, error), Landing(Outcome.FAILED, error)
            landing = Landing(Outcome.NOT_STORED)
            meta = meta_of(len(body)) if writer else None
            if writer and meta is None:
                await writer.abort()            # purged since this fetch began: not kept
            elif writer and meta is not None:
                if not names:
                    # Followers share this very response now, without waiting for the store.
                    self._land(flight, Landing(Outcome.STORED, stored=CachedObject(meta, body)))
                await writer.write(body)
                committed = await writer.commit(meta)
                landing = Landing(Outcome.STORED if committed else Outcome.NOT_STORED)
            return self._respond(ex, status, out_headers, body), landing

        # Large or unknown length: stream to the client and to the store at once.
        # A Range is served from the whole body as it passes (the fill always
        # fetches everything), once the length is known.
        client_status, span = status, None
        if length is not None and request.method == "GET":
            client_status, span = _apply_range(request, status, out_headers, length)
        # Followers of a response that is not stored fetch for themselves at once;
        # those of a stored one wait until the fill is committed.
        landing: Landing | asyncio.Future[Landing] = Landing(Outcome.NOT_STORED)
        if writer is not None:
            landing = asyncio.get_running_loop().create_future()
        stream = FillStream(self, ex.primary, response, writer, meta_of, span,
                            landing if writer is not None else None)
        if request.method == "HEAD" or client_status == 416:
            reply = ex.reply(client_status, out_headers, stream, bodyless=True,
                             length=0 if client_status == 416 else length)
        else:
            client_length = span[1] - span[0] + 1 if span is not None else length
            reply = ex.reply(client_status, out_headers, stream, length=client_length)
        return reply, landing

    async def _vary_marker(self, primary: str, headers: CIMultiDict[str],
                           request_time: float, response_time: float) -> Meta:
        """The URL's Vary marker for these field names: the stored one, or a new generation."""
        vary = ", ".join(headers.getall("Vary", ()))
        current = await self.store.get(primary)
        if current is not None and current.meta.status == VARY_MARKER_STATUS \
                and policy.vary_names(current.meta.fields) == policy.vary_names(headers):
            return current.meta
        generation = f"{time.time_ns():x}.{next(self._generations)}"
        marker = Meta(status=VARY_MARKER_STATUS, headers=(("Vary", vary), (GENERATION_FIELD, generation)),
                      request_time=request_time, response_time=response_time, size=0)
        writer = self.store.writer(primary, size_hint=0)
        await writer.commit(marker)
        return marker

    def _refresh_in_background(self, ex: Exchange, key: str, stored: CachedObject) -> None:
        """stale-while-revalidate (RFC 5861 3): refresh once, without holding the client."""
        flight = self.flights.lead(ex.primary)
        if flight is None:
            return   # a refresh is already under way

        # Its own Exchange: the client's request is answered (and counted) meanwhile.
        background = replace(ex)

        async def refresh() -> None:
            try:
                await self._miss_as_leader(background, (key, stored), flight)
            except (UpstreamIOError, OSError, BodyAborted) as exc:
                log.info("background refresh of %s broke: %s", ex.primary, exc)

        self.spawn(refresh())

    async def _miss_as_leader(self, ex: Exchange, stale: tuple[str, CachedObject], flight: Flight) -> None:
        """Fetch with no client waiting: the body is read to the end so that it is stored."""
        try:
            reply, landing = await self._fetch(ex, stale, "stale", flight)
        except BaseException:
            flight.finish(Outcome.FAILED)
            raise
        self._land(flight, landing)
        await drain_body(reply)

    def spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stale_if_error(self, ex: Exchange, stored: CachedObject, status: int | None,
                              unreachable: bool) -> Reply | None:
        """Serve the stale copy when the upstream fails, if the response allows it.

        RFC 5861 4 (stale-if-error) for a 5xx answer or an unreachable
        upstream; and, when the upstream could not be reached at all
        (`unreachable`), RFC 9111 4.2.4's disconnected cache, up to the site's
        `stale_if_unreachable` seconds of staleness.
        """
        meta = stored.meta
        now = self.clock()
        defaults = ex.site.defaults
        if policy.stale_if_error_allowed(meta.fields, meta.request_time, meta.response_time, now, defaults,
                                         meta.stale_at):
            detail = "stale-if-error"
        elif unreachable and policy.stale_when_disconnected(meta.fields, meta.request_time, meta.response_time,
                                                               now, ex.site.stale_if_unreachable, defaults,
                                                               meta.stale_at):
            detail = "disconnected"
            self.metrics.disconnected_stale.inc()
        else:
            return None
        age, ttl = self._age_and_ttl(meta, ex.site)
        entry = self._cache_status(ex, hit=True, ttl=ttl, fwd_status=status, detail=detail)
        return await self._deliver_stored(ex, stored, age, entry)

    # ------------------------------------------------------------------ pass

    async def _pass(self, ex: Exchange) -> Reply:
        """Unsafe and unknown methods: forwarded with their body, never stored (nginx BYPASS)."""
        request = ex.request
        headers = self._upstream_headers(ex, cache_fill=False)
        try:
            response, upstream = await self.upstreams.send(request.method, ex.primary, ex.site, ex.raw_target,
                                                           headers, request.body)
        except UpstreamError as exc:
            return self._upstream_error(ex, exc, fwd="bypass")
        except ClientGone as exc:
            # The client stalled or left mid-upload (nginx client_body_timeout): its
            # fault, not the upstream's; the upstream connection was cut, not finished.
            log.info("%s %s: request body failed: %s", request.method, ex.raw_target, exc)
            return self._error(408, "request body not received in time")
        ex.upstream = upstream.name
        try:
            await self._invalidate(ex, response)
        except BaseException:
            response.release()
            raise
        multi = CIMultiDict(strip_hop_by_hop(response.headers))
        entry = self._cache_status(ex, fwd="bypass", fwd_status=response.status)
        out_headers = self._client_headers(multi, None, entry, ex.cache_status, self._from_our_tier(ex.request))
        return ex.reply(response.status, out_headers, _relay(response), length=response.content_length,
                        bodyless=request.method == "HEAD")

    async def _invalidate(self, ex: Exchange, response: UpstreamResponse) -> None:
        """RFC 9111 4.4: a successful unsafe method invalidates the URL and same-origin Location."""
        host = ex.request.headers.get("Host", "")
        request_url = f"http://{host}{ex.raw_target}"
        for url in policy.invalidation_targets(ex.request.method, response.status, request_url, response.headers):
            authority = url.split("://", 1)[-1]
            target = authority[authority.find("/"):] if "/" in authority else "/"
            key = cache_key(ex.site, target, authority.split("/", 1)[0])
            if ex.site.slice_size:
                # Its slices are keyed under the URL, with nothing at the URL itself: a ban finds them.
                await self.invalidator.purge("url", key, soft=False)
                self.metrics.invalidations.labels("unsafe-method").inc()
                log.info("invalidated %s (sliced) after %s", key, ex.request.method)
            elif await self.store.delete(key):
                self.metrics.invalidations.labels("unsafe-method").inc()
                log.info("invalidated %s after %s", key, ex.request.method)

    # --------------------------------------------------------------- deliver

    def _age_and_ttl(self, meta: Meta, site: Site) -> tuple[float, float]:
        """Current age and remaining freshness of a stored response, now."""
        assessment = _assessment(meta, site.defaults)
        age = policy.age_at(assessment, self.clock())
        return age, assessment.lifetime - age

    age_and_ttl = _age_and_ttl      # for operators' views (edge.inspection)

    def _client_headers(self, stored: CIMultiDict[str] | CIMultiDictProxy[str], age: float | None, entry: str,
                        cache_status: str, tier: bool) -> CIMultiDict[str]:
        """The fields of a response to send; the tag fields go only to another of our tiers
        (`tier`), which stores them too, never to a client."""
        headers = CIMultiDict(stored)
        for name in NODE_RESPONSE_FIELDS:
            headers.popall(name, None)
        if not tier:
            for name in TAG_FIELDS:
                headers.popall(name, None)
        if age is not None:
            headers["Age"] = policy.age_value(age)
        _append(headers, "Via", self.via)
        if entry:
            _append(headers, "Cache-Status", entry)
        headers["X-Cache"] = cache_status
        return headers

    def _respond(self, ex: Exchange, status: int, headers: CIMultiDict[str], body: bytes) -> Reply:
        """A whole body in memory: the range, HEAD or full answer."""
        if ex.request.method == "HEAD":
            return ex.reply(status, headers, b"", length=len(body), bodyless=True)
        status, span = _apply_range(ex.request, status, headers, len(body))
        if span is not None:
            body = body[span[0]:span[1] + 1]
        elif status == 416:
            body = b""
        return ex.reply(status, headers, body)

    async def _deliver_stored(self, ex: Exchange, stored: CachedObject, age: float, entry: str) -> Reply:
        request = ex.request
        meta = stored.meta
        multi = meta.fields
        headers = self._client_headers(multi, age, entry, ex.cache_status, self._from_our_tier(request))
        if policy.client_not_modified(request.method, request.headers, multi, status=meta.status):
            # RFC 9110 15.4.5: a 304 carries the validators and caching fields, and no other
            # representation metadata "unless said metadata exists for the purpose of guiding
            # cache updates": to another tier of this CDN it carries every stored field, so a
            # change made at the origin reaches every tier (RFC 9111 4.3.4).
            if not self._from_our_tier(request):
                for name in ("Content-Type", "Content-Encoding", "Content-Language", "Content-Range"):
                    headers.popall(name, None)
            return ex.reply(304, headers, b"", length=None, bodyless=True)
        if request.method == "HEAD":
            return ex.reply(meta.status, headers, b"", length=meta.size, bodyless=True)
        if stored.body is not None:
            return self._respond(ex, meta.status, headers, stored.body)
        status, span = _apply_range(request, meta.status, headers, meta.size)
        if status == 416:
            return ex.reply(416, headers, b"")
        start, end = (span[0], span[1] + 1) if span is not None else (0, meta.size)
        chunks = stored.chunks(DISK_CHUNK, start, end)
        try:
            first = await anext(chunks, b"")
        except CorruptEntry:
            # A broken cache file is a miss, never an error to the client.
            log.warning("corrupt cache entry for %s; fetching again", ex.primary)
            return await self._miss(ex, None, "uri-miss")
        return ex.reply(status, headers, _stored_stream(first, chunks, ex.primary), length=end - start)

    def _from_our_tier(self, request: Request) -> bool:
        """Did the request come through another cache node of this topology (it is in Via)?"""
        return not self._tier_names.isdisjoint(via_names(request.headers))

    def _upstream_error(self, ex: Exchange, exc: UpstreamError, fwd: str = "miss") -> Reply:
        status = 504 if exc.error in TIMEOUT_ERRORS else 503 if exc.error == "connection_limit_reached" else 502
        entry = self._cache_status(ex, fwd=fwd, detail=exc.error)
        log.warning("%s %s: upstream failed: %s", ex.request.method, ex.raw_target, exc)
        reply = error_reply(status, f"upstream unavailable: {exc.error}", [
            ("Proxy-Status", proxy_status(self.node.name, exc)),
            ("Cache-Status", entry), ("X-Cache", ex.cache_status), ("Via", self.via),
        ], cache_status=ex.cache_status)
        reply.upstream = ex.upstream
        return reply

    def _error(self, status: int, text: str) -> Reply:
        return error_reply(status, text, [("Via", self.via)])


def proxy_status(name: str, exc: UpstreamError) -> str:
    """The RFC 9209 Proxy-Status member for a failed fetch: the error type, its extra parameters
    (a TLS alert's alert-id and alert-message), and the details."""
    params = "".join(f'; {key}={value}' if isinstance(value, int) else f'; {key}="{_sf_escape(value)}"'
                     for key, value in exc.params)
    return f'{name}; error={exc.error}{params}; details="{_sf_escape(exc.detail)}"'


def https_location(host: str, port: int, target: str) -> str:
    """Where a plain-HTTP request goes on the HTTPS listener: the same host and target, the
    listener's port unless it is 443."""
    name = normalise_host(host)
    if ":" in name:
        name = f"[{name}]"
    return f"https://{name}{'' if port == 443 else f':{port}'}{target}"


class FillStream:
    """A large response streaming from upstream to the client and into the store at once.

    Iterating yields the client's bytes (clipped to its range); every byte
    read goes to the store writer.  When the client stops early (it went
    away, or its range is complete) and the response is being stored, the
    rest is read in the background so that followers still get a stored
    object.  `landing` (when storing) resolves with the coalescing outcome.
    """

    def __init__(self, node: CacheNode, key: str, response: UpstreamResponse, writer: Writer | None,
                 meta_of: Callable[[int], Meta | None], span: tuple[int, int] | None,
                 landing: asyncio.Future[Landing] | None):
        self._node, self._key, self._response, self._writer = node, key, response, writer
        self._meta_of, self._span, self._landing = meta_of, span, landing
        self._read = 0
        self._done = False
        self.on_finish: Callable[[], object] | None = None    # told when the fill has ended, however

    def __aiter__(self) -> FillStream:
        return self

    async def __anext__(self) -> bytes:
        span = self._span
        while not self._done:
            if span is not None and self._read > span[1]:
                break                       # the client's range is complete
            chunk = await self._next_chunk()
            if chunk is None:
                break
            if span is None:
                return chunk
            piece = _clip(chunk, self._read - len(chunk), span)
            if piece:
                return piece
        raise StopAsyncIteration

    async def _next_chunk(self) -> bytes | None:
        """The next upstream chunk, stored; None at the end (the fill is then committed)."""
        try:
            chunk = await self._response.read_chunk()
        except UpstreamIOError as exc:
            log.warning("upstream body for %s broke after %d bytes: %s", self._key, self._read, exc)
            await self._finish(None)
            raise BodyAborted(f"upstream body broke: {exc}") from None
        if not chunk:
            await self._finish(self._read)
            return None
        self._read += len(chunk)
        if self._writer is not None:
            await self._writer.write(chunk)
        return chunk

    async def _finish(self, size: int | None) -> None:
        """Commit (size known) or abort the fill, release the upstream response, settle the landing."""
        if self._done:
            return
        self._done = True
        outcome = Outcome.FAILED if size is None else Outcome.NOT_STORED
        try:
            if self._writer is not None:
                meta = self._meta_of(size) if size is not None else None
                if meta is None:            # broken, or purged since the fetch began
                    await self._writer.abort()
                elif await self._writer.commit(meta):
                    outcome = Outcome.STORED
        finally:
            if self.on_finish is not None:
                self.on_finish()
            self._response.release()
            if self._landing is not None and not self._landing.done():
                self._landing.set_result(Landing(outcome))

    async def aclose(self) -> None:
        if self._done:
            return
        if self._writer is None:
            self._response.close()          # nobody needs the rest
            await self._finish(None)
            return
        self._node.spawn(self._fill_rest())

    async def _fill_rest(self) -> None:
        try:
            while await self._next_chunk() is not None:
                pass
        except BodyAborted:
            pass
        finally:
            await self._finish(None)        # no-op when the fill ended normally


async def drain_body(reply: Reply) -> None:
    """Read a reply's body to its end with nobody to send it to (a background refresh)."""
    body = reply.body
    if isinstance(body, bytes):
        return
    try:
        async for _ in body:
            pass
    finally:
        await body.aclose()


async def _stored_stream(first: bytes, chunks, key: str):
    """A disk hit's body; a corrupt entry mid-stream aborts the response (never wrong bytes)."""
    try:
        if first:
            yield first
        async for chunk in chunks:
            yield chunk
    except CorruptEntry as exc:
        log.warning("cache entry for %s broke mid-response: %s", key, exc)
        raise BodyAborted(str(exc)) from None
    finally:
        await chunks.aclose()


async def _relay(response: UpstreamResponse):
    """A pass-through body, chunk by chunk; the upstream connection is released at the end."""
    try:
        while chunk := await response.read_chunk():
            yield chunk
    except UpstreamIOError as exc:
        raise BodyAborted(f"upstream body broke: {exc}") from None
    finally:
        response.release()


_NOT_PLAIN = ("Range", "If-Range", "If-Match", "If-None-Match", "If-Modified-Since", "If-Unmodified-Since")


def _plain(request: Request) -> bool:
    """A GET or HEAD with no range and no conditionals: the stored block answers it as it is."""
    headers = request.headers
    return request.method in CACHEABLE_METHODS and not any(name in headers for name in _NOT_PLAIN)


def _variant_key(primary: str, marker: Meta, names: tuple[str, ...], request_headers) -> str:
    """Where this request's variant lives (RFC 9111 4.1), under the marker's generation."""
    generation = marker.fields.get(GENERATION_FIELD, "")
    return variant_store_key(primary, f"{generation}{VARIANT_SEPARATOR}{policy.variant_key(names, request_headers)}")


def _fits_a_tier(store: Store, size: int) -> bool:
    """Could some tier of `store` hold a body of `size` bytes?  (A tier without `fits` may.)"""
    return any(getattr(tier, "fits", None) is None or tier.fits(size) for tier in store.tiers())


def _append(headers: CIMultiDict[str], name: str, value: str) -> None:
    """Add a member to a list-valued field, folding repeated lines into one (RFC 9110 5.3)."""
    prior = ", ".join(headers.popall(name, ()))
    headers[name] = f"{prior}, {value}" if prior else value


def _assessment(meta: Meta, defaults: policy.SiteDefaults) -> policy.Assessment:
    """The policy's time-independent view of a stored response (under its site's defaults),
    computed once per Meta and per defaults object: a stored response belongs to one site, and
    a reload that gives the site new defaults (default_ttl, max_ttl, ...) has it worked out
    again, so memory and disk hits agree on an object's freshness.  A soft-purged one
    (`stale_at`) is stale from then on."""
    assessed = meta.memo.get("assessment")
    if assessed is not None and assessed[0] is defaults:
        return assessed[1]
    assessment = policy.assess(meta.fields, meta.request_time, meta.response_time, meta.status, defaults)
    if meta.stale_at is not None:
        assessment = policy.stale_from(assessment, meta.stale_at)
    meta.memo["assessment"] = (defaults, assessment)
    return assessment


def _apply_range(request: Request, status: int, headers: CIMultiDict[str],
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
    """The fields with one valid Date: a missing or invalid one becomes the time the
    response was received (RFC 9110 6.6.1)."""
    dates = [value for name, value in headers if name.lower() == "date"]
    if len(dates) == 1 and policy.parse_http_date(dates[0]) is not None:
        return headers
    kept = [(name, value) for name, value in headers if name.lower() != "date"]
    return kept + [("Date", formatdate(response_time, usegmt=True))]


def _storable_headers(headers: CIMultiDictProxy[str], response_time: float) -> list[tuple[str, str]]:
    """What a stored response keeps of the upstream's fields: end-to-end ones, and a Date."""
    kept = strip_hop_by_hop(headers, frozenset({"content-length", "x-cache"}))
    return _with_date(list(kept.items()), response_time)
