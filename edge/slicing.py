"""Serving a sliced site: GET and HEAD fetched, stored and answered slice by slice.

The driver for :mod:`edge.slices` (the pure arithmetic).  For a site with
``slice_size``, :meth:`Slicer.handle` replaces the lookup/fetch/store steps of
the pipeline (edge.proxy):

1. the slice holding the start of the client's range (slice 0 without one)
   is found in the store or fetched with a ``Range`` request; its
   Content-Range gives the object's length, its fields the validators;
2. the client's range is resolved against that length; the covering slices
   are looked up (the first few before the head is sent, so Cache-Status can
   say what was a hit); when the first slice came from the store and another
   is missing, that one is fetched before the head is sent too, so a change
   at the origin is found before any byte goes out and the whole answer comes
   from the new version;
3. the body walks the slices in order, reading stored ones from the store
   and fetching missing ones (each through the coalescer, keyed by slice),
   with the next PREFETCH slices fetched while the client reads the current
   one: at most PREFETCH + 2 fetched slices are held in memory.  A fetched
   slice is handed out as soon as its head is checked (validators, length):
   its body streams to the client as it arrives (`Filling`) and into the
   store's writer, committed only once whole and of the right length, so a
   cold slice costs its client one round trip, not one slice download, before
   the first byte; followers of its flight get it once stored, as before;
4. a slice of another version met mid-walk (the origin changed its object
   during the response) aborts the response and drops the stored slices of
   the old version: never a body mixed from two versions.

An origin that answers a slice request with a 200 (it ignores Range) is
sliced on the way in: each slice is stored as it completes, so no later
request asks for that object slice by slice again while its slices stay.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from edge import policy, slices
from edge.http.message import BodyAborted, Reply
from edge.store import CachedObject, CorruptEntry, Meta
from edge.upstream.client import UpstreamError
from edge.upstream.coalesce import Outcome
from edge.upstream.http1 import UpstreamIOError, UpstreamResponse

if TYPE_CHECKING:
    from edge.proxy import CacheNode, Exchange

log = logging.getLogger("edge.slicing")

PLAN_MAX = 16           # slices looked up before the head is sent (Cache-Status); the rest on the way
DETAIL_MAX = 8          # fetched slice indices listed in Cache-Status's detail
# Slices fetched ahead of the one being sent: with the one being sent and the first, a full
# GET holds at most PREFETCH + 2 fetched slices in memory (measured: README, Slicing).
PREFETCH = 2
VERSIONS_MAX = 4096     # URLs whose newest version is remembered after a change (Slicer._versions)


@dataclass
class Piece:
    """One slice as the walk uses it."""

    index: int
    obj: CachedObject       # its meta (status 206, Content-Range) and body (or a disk handle)
    total: int              # the object's length, from Content-Range
    hit: bool               # found in the store (not fetched for this request)
    stored: bool = False    # fetched and kept (known once `settle` returned)
    storing: asyncio.Task[bool] | None = None      # the store write under way
    stale: bool = False     # stored but no longer fresh: to be revalidated (`_obtain(stale=...)`)
    revalidated: bool = False   # a stale stored slice that a 304 freshened
    filling: Filling | None = None  # fetched for this request, its body still arriving (`_fill`)

    async def settle(self) -> bool:
        """Wait for the store write (if any); was the slice kept?"""
        if self.storing is not None:
            try:
                self.stored = await asyncio.shield(self.storing)
            except Exception as exc:
                log.warning("storing slice %d failed: %r", self.index, exc)
                self.stored = False
            self.storing = None
        return self.stored

    @property
    def fields(self):
        return self.obj.meta.fields

    def chunks(self, chunk_size: int, start: int, end: int):
        """Bytes `start`..`end` (exclusive) of the slice: as they arrive while it is filling."""
        if self.filling is not None:
            return self.filling.read(start, end)
        return self.obj.chunks(chunk_size, start, end)


class Filling:
    """A fetched slice's body as it arrives (`Slicer._fill` appends to it), so the client of
    the request that fetched it gets each byte as it comes instead of after the whole slice;
    the store's writer reads it too, committed only once whole and checked.  The head
    (validators, total length) was checked before the Piece was handed out.  Whole, it stays
    the slice's body (followers of the flight read it from here)."""

    def __init__(self, keeping: bool):
        self.parts: list[bytes] = []            # the body so far (whole: the slice's body)
        self.size = 0                           # bytes arrived
        self.whole = False                      # all arrived, of the expected length
        self.error: Exception | None = None     # the body broke (short, reset, cancelled)
        self.keeping = keeping                  # policy and bans allow storing it (when whole)
        self._arrived = asyncio.Event()

    def add(self, chunk: bytes) -> None:
        self.parts.append(chunk)
        self.size += len(chunk)
        self._arrived.set()

    def fail(self, error: Exception) -> None:
        self.error = error
        self._arrived.set()

    async def read(self, start: int, end: int):
        """Bytes `start`..`end` as they arrive; the fill's error if it breaks first."""
        at = start
        parts = self.parts
        index, base = 0, 0          # parts[index] begins at byte `base` (parts only grows)
        while at < end:
            while index < len(parts) and at < end:
                part = parts[index]
                stop = base + len(part)
                if stop > at:
                    yield part[at - base:min(stop, end) - base]
                    at = min(stop, end)
                if stop <= at:
                    index, base = index + 1, stop
            if at >= end:
                return
            if self.error is not None:
                raise self.error
            self._arrived.clear()
            await self._arrived.wait()


class NotSliceable(Exception):
    """Upstream answered a slice request with neither a matching 206 nor a 200 of known
    length (an error status, a 304, a 416 for an empty object): relayed, not stored."""

    def __init__(self, response: UpstreamResponse, upstream: str):
        super().__init__(f"{response.status} from {upstream}")
        self.response, self.upstream = response, upstream


class ObjectChanged(Exception):
    """A slice of another version of the object turned up during a response."""

    def __init__(self, piece: Piece):
        super().__init__(f"slice {piece.index} is of another version")
        self.piece = piece


def if_match(ex: Exchange) -> tuple[str, ...]:
    """The strong ETags of the request's If-Match ("*" and weak ones left out)."""
    value = ",".join(ex.request.headers.getall("If-Match", ()))
    return tuple(tag.strip() for tag in value.split(",") if tag.strip().startswith('"'))


def required_etags(ex: Exchange, tier: bool) -> tuple[str, ...]:
    """The versions stored and fetched slices must be of: the one a retry after a change
    settled on, or, from another of our tiers (`tier`), its If-Match: how an L1 tells its L2
    which version it needs, a slice of an older one stored there then being dropped and
    fetched anew.  A client's If-Match is only compared (412), never a reason to drop and
    refetch: no client may force origin traffic."""
    if ex.slice_etag is not None:
        return (ex.slice_etag,)
    return if_match(ex) if tier else ()


class Slicer:
    def __init__(self, node: CacheNode):
        self.node = node
        # URL -> the newest version seen after a change cut a response short (bounded).  Later
        # requests ask every slice to be of it (If-Match upstream), so stored slices of the old
        # version here and in the parents are dropped as they are met, instead of cutting
        # response after response short at the first old slice.
        self._versions: OrderedDict[str, str] = OrderedDict()

    def _saw_version(self, primary: str, piece: Piece) -> None:
        etag = slices.strong_etag(piece.fields)
        if etag is None:
            return
        self._versions[primary] = etag
        self._versions.move_to_end(primary)
        while len(self._versions) > VERSIONS_MAX:
            self._versions.popitem(last=False)

    # ------------------------------------------------------------ the request

    async def handle(self, ex: Exchange, retried: bool = False) -> Reply:
        request, size = ex.request, ex.site.slice_size
        start = slices.first_slice(request.headers.get("Range"), size)
        hinted = ex.slice_etag is None and "If-Match" not in request.headers and ex.primary in self._versions
        if hinted:
            ex.slice_etag = self._versions[ex.primary]
        try:
            ref, planned = await self._begin(ex, start)
        except NotSliceable as exc:
            if hinted and exc.response.status == 412:
                # Changed once more since: forget the remembered version and start afresh.
                exc.response.close()
                self._versions.pop(ex.primary, None)
                ex.slice_etag = None
                return await self.handle(ex, retried=True)
            if exc.response.status == 416 and start == 0 \
                    and exc.response.headers.get("Content-Range", "").replace(" ", "") == "bytes*/0":
                # An empty object has no slice 0: it is fetched and stored whole, the usual way.
                exc.response.close()
                return await self.node._lookup(ex)
            return self._relay(ex, exc)
        except UpstreamError as exc:
            return self.node._upstream_error(ex, exc)
        total = ref.total
        fields = CIMultiDict(ref.fields)
        fields.popall("Content-Range", None)
        required = required_etags(ex, self.node._from_our_tier(request)) or if_match(ex)
        if required and slices.strong_etag(ref.fields) not in required:
            # RFC 9110 13.1.1: the version at hand is not the one asked for (for our tiers and
            # retries: the current one, just fetched, as a stored one would have been dropped).
            entry = self._entry(ex, ref, range(ref.index, ref.index + 1), planned)
            return ex.reply(412, self._headers(ex, ref, fields, entry), b"")
        if policy.client_not_modified(request.method, request.headers, fields, status=200):
            return await self._not_modified(ex, ref, fields)
        span = policy.requested_range(request.method, request.headers, fields, 200, total)
        if span == policy.UNSATISFIABLE:
            fields["Content-Range"] = f"bytes */{total}"
            entry = self._entry(ex, ref, range(ref.index, ref.index + 1), planned)
            return ex.reply(416, self._headers(ex, ref, fields, entry), b"")
        status = 200
        if span is not None:
            status = 206
            fields["Content-Range"] = f"bytes {span[0]}-{span[1]}/{total}"
        first, last = span if span is not None else (0, total - 1)
        indices = slices.covering(first, last, size) if total else range(0)
        stale: dict[int, Piece] = {}
        for i in indices[:PLAN_MAX]:
            if i not in planned:
                stored = await self._stored(ex, i, ref)
                if stored is not None and stored.stale:
                    stale[i] = stored
                elif stored is not None:
                    planned[i] = stored
        gap = next((i for i in indices[:PLAN_MAX] if i not in planned), None)
        if ref.hit and gap is not None:
            # Fetched before the head goes out: if the origin's object changed since the
            # stored slices were fetched, the whole answer still comes from one version.
            try:
                planned[gap] = await self._obtain(ex, gap, ref, stale=stale.get(gap))
            except ObjectChanged as changed:
                await self._drop(ex, set(indices[:PLAN_MAX]) | set(planned))
                # Start again, asking every slice (here and upstream) to be of the new version.
                ex.slice_etag = slices.strong_etag(changed.piece.fields)
                self._saw_version(ex.primary, changed.piece)
                if retried:
                    return self.node._upstream_error(ex, UpstreamError(
                        "http_protocol_error", "the object keeps changing between slices", [ex.upstream]))
                log.info("%s changed at the origin; its stored slices are dropped", ex.primary)
                return await self.handle(ex, retried=True)
            except (NotSliceable, UpstreamError) as exc:
                return self._after_error(ex, exc)
        for piece in planned.values():
            # Cache-Status says `stored` only of what was kept, or (a slice still arriving,
            # streamed to this client) of what policy and the store's size allow to be kept.
            if piece.filling is None or piece.storing is None or piece.storing.done():
                await piece.settle()
        stale_indices = set(stale) | {i for i, piece in planned.items() if piece.revalidated}
        entry = self._entry(ex, ref, indices, planned, stale_indices)
        # The walk keeps only what was fetched (held nowhere else); stored slices are looked up
        # again as it reaches them, so a long answer never pins evictable bodies in memory.
        planned = {i: piece for i, piece in planned.items() if not piece.hit or i == ref.index}
        headers = self._headers(ex, ref, fields, entry)
        headers["Accept-Ranges"] = "bytes"
        length = last - first + 1 if total else 0
        if request.method == "HEAD":
            return ex.reply(status, headers, b"", length=length, bodyless=True)
        body = self._walk(ex, ref, planned, indices, first, last)
        return ex.reply(status, headers, body, length=length)

    async def _begin(self, ex: Exchange, start: int) -> tuple[Piece, dict[int, Piece]]:
        """The first slice (from the store or upstream): the object's length and validators."""
        stored = await self._stored(ex, start, None)
        if stored is not None and not stored.stale:
            return stored, {start: stored}
        piece = await self._obtain(ex, start, None, stale=stored)
        return piece, {start: piece}

    def _after_error(self, ex: Exchange, exc: Exception) -> Reply:
        if isinstance(exc, NotSliceable):
            exc.response.close()
            exc = UpstreamError("http_protocol_error", f"slice answered {exc.response.status}", [exc.upstream])
        return self.node._upstream_error(ex, exc)

    # ---------------------------------------------------------------- heads

    def _headers(self, ex: Exchange, ref: Piece, fields: CIMultiDict[str], entry: str) -> CIMultiDict[str]:
        age, _ = self._age_and_ttl(ex, ref.obj.meta)
        node = self.node
        return node._client_headers(fields, age, entry, ex.cache_status, node._from_our_tier(ex.request))

    def _age_and_ttl(self, ex: Exchange, meta: Meta) -> tuple[float, float]:
        # Assessed as a 200: a slice's freshness is its object's (206 is heuristically cacheable too).
        assessment = policy.assess(meta.fields, meta.request_time, meta.response_time, 200, ex.site.defaults)
        if meta.stale_at is not None:
            assessment = policy.stale_from(assessment, meta.stale_at)
        age = policy.age_at(assessment, self.node.clock())
        return age, assessment.lifetime - age

    def _entry(self, ex: Exchange, ref: Piece, indices: range, planned: dict[int, Piece],
               stale: set[int] | frozenset[int] = frozenset()) -> str:
        """This node's Cache-Status member, from what is known before the head is sent.

        ``hit`` when every covering slice is stored; ``fwd=uri-miss`` when none
        is; ``fwd=partial`` (RFC 9211 2.2: "the cache had a partial response")
        otherwise.  Only the first PLAN_MAX slices are looked up ahead; with
        more the verdict is about those, and ``detail`` says so with a "+"
        (``slices 0-255+``).  ``detail`` lists the slices fetched (or to be).
        ``stored`` only when every slice fetched so far was kept and none is
        left to fetch.  ``fwd=stale`` when every slice that went upstream was a
        stale stored one being revalidated (`stale`).
        """
        checked = indices[:PLAN_MAX] if indices else range(ref.index, ref.index + 1)
        more = len(indices) > PLAN_MAX
        fetched = [i for i in checked if i not in planned or not planned[i].hit]
        if not ref.hit and ref.index not in checked:
            fetched.insert(0, ref.index)        # slice 0, fetched to learn a suffix range's length
        hits = len(checked) - len([i for i in fetched if i in checked])
        _, ttl = self._age_and_ttl(ex, ref.obj.meta)
        span = f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(checked[0])
        listed = ",".join(map(str, fetched[:DETAIL_MAX])) + ("+" if len(fetched) > DETAIL_MAX else "")
        detail = f"slices {span}{'+' if more else ''}; fetched {listed or 'none'}"
        if not fetched and not more:
            return self.node._cache_status(ex, hit=True, ttl=ttl, detail=detail)
        stored = bool(fetched) and not more and all(i in planned and planned[i].stored for i in fetched)
        fwd = "stale" if fetched and all(i in stale for i in fetched) else "partial" if hits else "uri-miss"
        # 304 (X-Cache REVALIDATED) when every slice that went upstream is known to have got one.
        status = 304 if fwd == "stale" and all(i in planned and planned[i].revalidated for i in fetched) else 206
        return self.node._cache_status(ex, fwd=fwd, fwd_status=status, stored=stored, ttl=ttl, detail=detail)

    async def _not_modified(self, ex: Exchange, ref: Piece, fields: CIMultiDict[str]) -> Reply:
        entry = self._entry(ex, ref, range(ref.index, ref.index + 1), {ref.index: ref})
        headers = self._headers(ex, ref, fields, entry)
        if not self.node._from_our_tier(ex.request):
            for name in ("Content-Type", "Content-Encoding", "Content-Language", "Content-Range"):
                headers.popall(name, None)
        return ex.reply(304, headers, b"", length=None, bodyless=True)

    def _relay(self, ex: Exchange, exc: NotSliceable) -> Reply:
        """Pass an answer that is not a slice (404, 5xx, ...) through, unstored."""
        from edge.proxy import _relay, strip_hop_by_hop
        response = exc.response
        ex.upstream = exc.upstream
        entry = self.node._cache_status(ex, fwd="uri-miss", fwd_status=response.status, detail="not sliced")
        headers = self.node._client_headers(CIMultiDict(strip_hop_by_hop(response.headers)), None, entry,
                                            ex.cache_status, self.node._from_our_tier(ex.request))
        if ex.request.method == "HEAD":
            response.close()
            return ex.reply(response.status, headers, b"", length=response.content_length, bodyless=True)
        return ex.reply(response.status, headers, _relay(response), length=response.content_length)

    # ----------------------------------------------------------------- walk

    async def _walk(self, ex: Exchange, ref: Piece, planned: dict[int, Piece], indices: range,
                    first: int, last: int):
        """The body: each covering slice in order, the next PREFETCH ones under way while this
        one is read (a cold slice costs a round trip per tier before its first byte)."""
        size = ex.site.slice_size
        ahead: dict[int, asyncio.Task[Piece]] = {}
        try:
            for i in indices:
                task = ahead.pop(i, None)
                piece = planned.pop(i, None) or (await task if task is not None
                                                 else await self._obtain_or_stored(ex, i, ref))
                for j in range(i + 1, min(i + 1 + PREFETCH, indices.stop)):
                    if j not in ahead and j not in planned:
                        ahead[j] = asyncio.create_task(self._obtain_or_stored(ex, j, ref))
                low = max(first - i * size, 0)
                high = min(last + 1 - i * size, piece.obj.meta.size)
                async for chunk in piece.chunks(policy_chunk(), low, high):
                    yield chunk
                await piece.settle()    # at most the slices held anyway are being written
        except ObjectChanged as changed:
            log.warning("%s changed at the origin during a sliced response; dropping its old slices", ex.primary)
            self._saw_version(ex.primary, changed.piece)
            await self._drop(ex, set(indices))
            raise BodyAborted("the object changed at the origin during the response") from None
        except (UpstreamError, NotSliceable, CorruptEntry) as exc:
            if isinstance(exc, NotSliceable):
                exc.response.close()
            log.warning("sliced response for %s broke: %s", ex.primary, exc)
            raise BodyAborted(f"slice unavailable: {exc}") from None
        finally:
            for task in ahead.values():
                task.cancel()
            await asyncio.gather(*ahead.values(), return_exceptions=True)

    async def _obtain_or_stored(self, ex: Exchange, index: int, ref: Piece) -> Piece:
        stored = await self._stored(ex, index, ref)
        if stored is not None and not stored.stale:
            return stored
        return await self._obtain(ex, index, ref, stale=stored)

    async def _drop(self, ex: Exchange, indices: set[int]) -> None:
        """Remove stored slices of an older version of the object.  Only those this response
        touched: the others are checked (and dropped) when a request meets them."""
        store, size = self.node.store, ex.site.slice_size
        for i in sorted(indices):
            await store.delete(slices.slice_key(ex.primary, size, i))

    # --------------------------------------------------------------- lookup

    async def _stored(self, ex: Exchange, index: int, ref: Piece | None) -> Piece | None:
        """Slice `index` from the store if it is there, unpurged and of `ref`'s version (a
        slice of another version is dropped: it will be fetched again); a stale one comes
        back marked `stale`, for `_obtain` to revalidate."""
        key = slices.slice_key(ex.primary, ex.site.slice_size, index)
        found = self.node._unbanned(key, await self.node.store.get(key))
        if found is None:
            return None
        parsed = slices.parse_content_range(found.meta.fields.get("Content-Range"))
        if parsed is None or found.meta.status != 206:
            await self.node.store.delete(key, only=found.meta)
            return None
        total = parsed[2]
        required = required_etags(ex, self.node._from_our_tier(ex.request))
        if (ref is not None and not slices.same_object(ref.fields, ref.total, found.meta.fields, total)) \
                or (required and slices.strong_etag(found.meta.fields) not in required):
            await self.node.store.delete(key, only=found.meta)      # of an older version
            return None
        _, ttl = self._age_and_ttl(ex, found.meta)
        stale = ttl <= 0 or policy.assess(found.meta.fields, found.meta.request_time, found.meta.response_time,
                                          200, ex.site.defaults).no_cache
        return Piece(index, found, total, hit=not stale, stale=stale)

    # ---------------------------------------------------------------- fetch

    async def _obtain(self, ex: Exchange, index: int, ref: Piece | None, stale: Piece | None = None) -> Piece:
        """Slice `index` from upstream, one fetch per slice in flight (followers share it),
        revalidating the `stale` stored one when there is one; ObjectChanged when it is not of
        `ref`'s version."""
        key = slices.slice_key(ex.primary, ex.site.slice_size, index)
        flights = self.node.flights
        flight = flights.lead(key)
        piece: Piece | None = None
        if flight is None:
            self.node.metrics.coalesced.inc()
            landing = await flights.wait(key)
            if landing is not None and isinstance(landing.stored, Piece):
                piece = landing.stored
                piece = Piece(piece.index, piece.obj, piece.total, hit=False, stored=piece.stored,
                              storing=piece.storing, filling=piece.filling)
            elif landing is not None and landing.outcome is Outcome.FAILED and isinstance(landing.error, Exception):
                raise landing.error
            else:
                flight = flights.lead(key)      # None again: fetch alone, uncoalesced
        if piece is None:
            try:
                piece = await self._fetch(ex, index, stale)
            except BaseException as exc:
                if flight is not None:
                    error = exc if isinstance(exc, UpstreamError) else None
                    flight.finish(Outcome.FAILED, error)
                raise
            if flight is not None:
                # The flight stays open until the slice is in the store: a request arriving
                # meanwhile follows it rather than fetching again.  Followers then share the
                # fetched slice itself.
                done = piece
                if piece.storing is None:
                    flight.finish(Outcome.NOT_STORED, stored=done)
                else:
                    piece.storing.add_done_callback(lambda task, f=flight: _land(f, task, done))
        if ref is not None and not slices.same_object(ref.fields, ref.total, piece.fields, piece.total):
            raise ObjectChanged(piece)
        return piece

    async def _fetch(self, ex: Exchange, index: int, stale: Piece | None = None) -> Piece:
        node, size = self.node, ex.site.slice_size
        headers = node._upstream_headers(ex, cache_fill=True)
        headers["Range"] = slices.range_header(index, size)
        if stale is not None:
            # RFC 9111 4.3.1: a 304 freshens the stored slice; a 206 replaces it.
            headers.update(policy.conditional_headers(stale.fields))
        required = required_etags(ex, self.node._from_our_tier(ex.request))
        if required:
            headers["If-Match"] = ", ".join(required)       # a 412 when upstream has moved on again
        request_time = node.clock()
        fetch: int | None = next(node._fetch_ids)
        node._fetches[fetch] = request_time     # bans wait for it (see CacheNode.oldest_fetch)
        try:
            response, upstream = await node.upstreams.send("GET", ex.primary, ex.site, ex.raw_target, headers)
            ex.upstream = upstream.name
            handed = False
            try:
                response_time = node.clock()
                if response.status == 304 and stale is not None:
                    return await self._freshened(ex, stale, response.headers, request_time, response_time)
                if response.status == 206:
                    total = slices.check_partial(index, size, response.headers.get("Content-Range"),
                                                 response.content_length)
                    if total is None:
                        raise UpstreamError("http_protocol_error",
                                            f"asked for {headers['Range']}, got Content-Range "
                                            f"{response.headers.get('Content-Range')!r}", [upstream.name])
                    # Handed out now, its body streaming in (`_fill`): the validators and the
                    # length are known, so the walk can send each byte as it arrives.
                    piece = self._streaming(ex, index, response.headers, total, request_time, response_time)
                    assert piece.filling is not None
                    piece.storing = asyncio.create_task(
                        self._fill(ex, piece, piece.filling, response, upstream.name, fetch))
                    node._background.add(piece.storing)
                    piece.storing.add_done_callback(node._background.discard)
                    piece.storing.add_done_callback(_retrieved)     # its failure is the readers'
                    handed = True
                    fetch = None        # its bans wait until the fill ends
                    return piece
                if response.status == 200 and response.content_length is not None:
                    return await self._slice_whole(ex, index, response, upstream.name, request_time, response_time)
                handed = True
                raise NotSliceable(response, upstream.name)
            finally:
                if not handed:
                    if response.complete:
                        response.release()
                    else:
                        response.close()
        finally:
            if fetch is not None:
                node._fetches.pop(fetch, None)

    async def _freshened(self, ex: Exchange, stale: Piece, not_modified, request_time: float,
                         response_time: float) -> Piece:
        """RFC 9111 4.3.4: the stored slice, its fields updated by the 304 (its Content-Range kept)."""
        from edge.proxy import _with_date
        meta = stale.obj.meta
        headers = _with_date(policy.freshen(meta.headers, not_modified), response_time)
        headers = [(n, v) for n, v in headers if n.lower() != "content-range"]
        headers.append(("Content-Range", meta.fields["Content-Range"]))
        fresh = Meta(status=meta.status, headers=tuple(headers), request_time=request_time,
                     response_time=response_time, size=meta.size, url=meta.url)
        key = slices.slice_key(ex.primary, ex.site.slice_size, stale.index)
        checked = self.node.after_bans(key, fresh)
        kept = checked is not None and await self.node.store.update_meta(key, checked, replacing=meta)
        return Piece(stale.index, stale.obj.with_meta(fresh), stale.total, hit=False, stored=kept, revalidated=True)

    def _streaming(self, ex: Exchange, index: int, response_fields, total: int,
                   request_time: float, response_time: float) -> Piece:
        """A fetched slice whose body is yet to arrive (`_fill`), its meta built from the head."""
        from edge.proxy import _fits_a_tier
        first, last = slices.slice_span(index, ex.site.slice_size, total)
        meta, ok = self._slice_meta(ex, index, response_fields, total, last - first + 1,
                                    request_time, response_time)
        key = slices.slice_key(ex.primary, ex.site.slice_size, index)
        keeping = ok and _fits_a_tier(self.node.store, meta.size) and self.node.after_bans(key, meta) is not None
        return Piece(index, CachedObject(meta, None), total, hit=False, stored=keeping, filling=Filling(keeping))

    async def _fill(self, ex: Exchange, piece: Piece, filling: Filling, response: UpstreamResponse,
                    upstream: str, fetch: int) -> bool:
        """Read a slice's body into `filling` (the walk sends from it meanwhile) and into the
        store's writer as it arrives; committed only once whole, of the length its
        Content-Range said, and past the bans.  Was it kept?  A short or broken body fails the
        readers (the response is cut) and is aborted in the store."""
        node = self.node
        expected = piece.obj.meta.size
        key = slices.slice_key(ex.primary, ex.site.slice_size, piece.index)
        writer = node.store.writer(key, size_hint=expected) if filling.keeping else None
        # The store is written from the filling by a task of its own, so the upstream is read
        # (and the client served) at its pace, not at the disk's.
        writing = asyncio.create_task(self._write_filling(writer, filling, expected)) if writer else None
        try:
            try:
                try:
                    while chunk := await response.read_chunk():
                        if filling.size + len(chunk) > expected:
                            break
                        filling.add(chunk)
                except UpstreamIOError as exc:
                    raise UpstreamError("http_response_incomplete", str(exc) or type(exc).__name__,
                                        [upstream]) from None
                if filling.size != expected or not response.complete:
                    raise UpstreamError("http_response_incomplete", "short slice", [upstream])
            except BaseException as exc:
                filling.fail(exc if isinstance(exc, Exception) else
                             UpstreamError("http_response_incomplete", "slice fetch cancelled", [upstream]))
                if writing is not None:
                    writing.cancel()
                    await asyncio.gather(writing, return_exceptions=True)
                if writer is not None:
                    await writer.abort()
                raise
            finally:
                if response.complete:
                    response.release()
                else:
                    response.close()
            filling.whole = True
            if writer is None or writing is None:
                return False
            try:
                await writing
            except BaseException:
                await writer.abort()
                raise
            checked = node.after_bans(key, piece.obj.meta)  # a purge may have come meanwhile
            if checked is None:
                await writer.abort()
                return False
            try:
                return await writer.commit(checked)
            except BaseException:
                await writer.abort()
                raise
        finally:
            node._fetches.pop(fetch, None)      # bans waited for this fetch until now

    @staticmethod
    async def _write_filling(writer, filling: Filling, expected: int) -> None:
        async for chunk in filling.read(0, expected):
            await writer.write(chunk)

    def _slice_meta(self, ex: Exchange, index: int, response_fields, total: int, size: int,
                    request_time: float, response_time: float) -> tuple[Meta, bool]:
        """The stored form of a slice's head (its Content-Range normalised); may it be stored?"""
        from edge.proxy import _storable_headers
        kept = [(name, value) for name, value in _storable_headers(response_fields, response_time)
                if name.lower() != "content-range"]
        first, last = slices.slice_span(index, ex.site.slice_size, total)
        kept.append(("Content-Range", f"bytes {first}-{last}/{total}"))
        multi = CIMultiDict(kept)
        ok, why = policy.storable("GET", 200, ex.request.headers, multi,
                                  strip_set_cookie=ex.site.set_cookie == "strip", defaults=ex.site.defaults)
        if ok and policy.vary_names(multi) != ():
            ok, why = False, "vary"             # sliced objects are not stored per variant
        if ok and not slices.has_validator(multi):
            ok, why = False, "no-validator"     # a change could never be noticed
        if ok:
            hidden = policy.hidden_fields(multi) | ({"set-cookie"} if ex.site.set_cookie == "strip" else set())
            kept = [(name, value) for name, value in kept if name.lower() not in hidden]
        elif why:
            log.debug("slice %d of %s not stored: %s", index, ex.primary, why)
        meta = Meta(status=206, headers=tuple(kept), request_time=request_time, response_time=response_time,
                    size=size, url=f"{ex.site.hosts[0]}{ex.raw_target}")
        return meta, ok

    async def _keep(self, ex: Exchange, index: int, response_fields, total: int, body: bytes,
                    request_time: float, response_time: float) -> Piece:
        """Store one slice (when policy allows) and return it."""
        node = self.node
        meta, ok = self._slice_meta(ex, index, response_fields, total, len(body), request_time, response_time)
        key = slices.slice_key(ex.primary, ex.site.slice_size, index)
        piece = Piece(index, CachedObject(meta, body), total, hit=False)
        checked = node.after_bans(key, meta) if ok else None
        if checked is not None:
            # Written while the slice is being sent (a disk write of a slice costs about as
            # much as its fetch); who needs to know the outcome awaits `settle`.
            piece.storing = asyncio.create_task(self._write(key, checked, body))
            node._background.add(piece.storing)
            piece.storing.add_done_callback(node._background.discard)
        return piece

    async def _write(self, key: str, meta: Meta, body: bytes) -> bool:
        node = self.node
        fetch = next(node._fetch_ids)
        node._fetches[fetch] = meta.request_time    # a ban stays until this write is checked against it
        writer = node.store.writer(key, size_hint=len(body))
        try:
            await writer.write(body)
            checked = node.after_bans(key, meta)    # a purge may have come while it was written
            if checked is None:
                await writer.abort()
                return False
            return await writer.commit(checked)
        except BaseException:
            await writer.abort()
            raise
        finally:
            node._fetches.pop(fetch, None)

    async def _slice_whole(self, ex: Exchange, index: int, response: UpstreamResponse, upstream: str,
                           request_time: float, response_time: float) -> Piece:
        """The origin ignored Range and sent the whole object: slice it on the way in.

        Each slice is stored as it completes (one slice buffered at a time),
        so later requests find them and never ask this origin for a slice
        again while they stay; the slice asked for is returned.
        """
        size = ex.site.slice_size
        total = response.content_length
        assert total is not None
        fields = CIMultiDict(response.headers)
        fields.popall("Content-Length", None)
        wanted: Piece | None = None
        buffer = bytearray()
        current = 0
        received = 0
        try:
            while chunk := await response.read_chunk():
                received += len(chunk)
                buffer += chunk
                while len(buffer) >= size or (received == total and buffer):
                    part = bytes(buffer[:size])
                    del buffer[:size]
                    piece = await self._keep(ex, current, fields, total, part, request_time, response_time)
                    if current == index:
                        wanted = piece
                    else:
                        await piece.settle()    # one slice in memory at a time, not the object
                    current += 1
        except UpstreamIOError as exc:
            raise UpstreamError("http_response_incomplete", str(exc) or type(exc).__name__, [upstream]) from None
        if received != total or wanted is None:
            if total == 0 or index * size >= total:
                raise UpstreamError("http_protocol_error", f"slice {index} is past the end ({total} bytes)",
                                    [upstream])
            raise UpstreamError("http_response_incomplete", f"{received} of {total} bytes", [upstream])
        return wanted


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


def _land(flight, task: asyncio.Task[bool], piece: Piece) -> None:
    """End a slice's flight once its fill and store write are over: followers share the whole
    slice, or, when its body broke, fetch it themselves."""
    if piece.filling is None or piece.filling.whole:   # whole (even if its store write failed)
        flight.finish(Outcome.STORED, stored=piece)
    else:
        error = None if task.cancelled() else task.exception()
        flight.finish(Outcome.FAILED, error if isinstance(error, UpstreamError) else None)


def policy_chunk() -> int:
    from edge.proxy import DISK_CHUNK
    return DISK_CHUNK
