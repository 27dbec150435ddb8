"""What every cache tier stores and the interface every tier offers.

A stored response is a :class:`Meta` (status, header fields, timing, size)
plus a body.  Tiers are interchangeable behind :class:`Store` (Varnish's
storage "stevedores" play the same role): the proxy asks for a
:class:`CachedObject`, streams its body with :meth:`CachedObject.chunks`,
and stores new responses through a :class:`Writer` so that a large body can
flow to disk while it flows to the client.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from edge.surrogate import parse_tags

DEFAULT_CHUNK_SIZE = 256 * 1024


def same_version(a: Meta, b: Meta) -> bool:
    """Are two metas of one key the same stored response (not a refetch of it)?"""
    return (a.request_time, a.response_time) == (b.request_time, b.response_time)


class CorruptEntry(Exception):
    """A stored entry is unreadable (bad meta, short body, replaced mid-read).

    The proxy treats it as a miss when nothing was sent to the client yet.
    """


@dataclass(frozen=True)
class Meta:
    """Everything about a stored response except its body."""

    status: int                             # HTTP status; 0 for the proxy's internal markers
    headers: tuple[tuple[str, str], ...]    # response fields, original case, repeats kept
    request_time: float                     # when the request left (RFC 9111 section 4.2.3)
    response_time: float                    # when the response arrived
    size: int                               # body length in bytes
    url: str = ""                           # for operators (status and purge listings)
    # A soft purge: stale from this time on, whatever its freshness (None: not purged).
    stale_at: float | None = None

    @cached_property
    def fields(self) -> CIMultiDictProxy[str]:
        """The headers as a read-only case-insensitive multidict, built once per Meta.

        The memory tier hands out the same Meta on every hit, so the hit path
        does not rebuild it per request.
        """
        return CIMultiDictProxy(CIMultiDict(self.headers))

    @cached_property
    def tags(self) -> tuple[str, ...]:
        """Its tags (surrogate keys) from the Surrogate-Key and Cache-Tag fields, parsed once."""
        return parse_tags(self.headers)

    @cached_property
    def memo(self) -> dict[str, Any]:
        """Scratch space for values readers derive from this Meta (never stored).

        The proxy keeps the policy's assessment of the response here.
        """
        return {}

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "headers": [[name, value] for name, value in self.headers],
            "request_time": self.request_time,
            "response_time": self.response_time,
            "size": self.size,
            "url": self.url,
            "stale_at": self.stale_at,
        }

    def to_json(self) -> bytes:
        # ensure_ascii keeps odd header bytes (surrogate-escaped) round-trippable.
        return json.dumps(self.to_dict(), separators=(",", ":")).encode("ascii")

    @classmethod
    def from_dict(cls, data: Any) -> Meta:
        """Validate a decoded dict field by field; anything off raises CorruptEntry."""
        if not isinstance(data, dict):
            raise CorruptEntry(f"meta is a {type(data).__name__}, not an object")
        status = data.get("status")
        # 0 is allowed: the proxy stores markers (a URL's Vary names) with status 0.
        if not _is_int(status) or not 0 <= status <= 999:
            raise CorruptEntry(f"meta status is not an HTTP status: {status!r}")
        headers = data.get("headers")
        if not isinstance(headers, list) or not all(
                isinstance(pair, list) and len(pair) == 2
                and isinstance(pair[0], str) and isinstance(pair[1], str) for pair in headers):
            raise CorruptEntry("meta headers are not a list of [name, value] strings")
        times = []
        for field in ("request_time", "response_time"):
            value = data.get(field)
            if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
                raise CorruptEntry(f"meta {field} is not a finite number: {value!r}")
            times.append(float(value))
        size = data.get("size")
        if not _is_int(size) or size < 0:
            raise CorruptEntry(f"meta size is not a byte count: {size!r}")
        url = data.get("url", "")
        if not isinstance(url, str):
            raise CorruptEntry(f"meta url is not a string: {url!r}")
        stale_at = data.get("stale_at")       # absent in entries written before soft purges
        if stale_at is not None and (not (_is_int(stale_at) or isinstance(stale_at, float))
                                     or not math.isfinite(stale_at)):
            raise CorruptEntry(f"meta stale_at is not a finite number: {stale_at!r}")
        return cls(status=status, headers=tuple((n, v) for n, v in headers),
                   request_time=times[0], response_time=times[1], size=size, url=url,
                   stale_at=None if stale_at is None else float(stale_at))

    @classmethod
    def from_json(cls, data: bytes) -> Meta:
        try:
            decoded = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise CorruptEntry(f"meta is not JSON: {exc}") from None
        return cls.from_dict(decoded)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class CachedObject:
    """One stored response as returned by ``Store.get``.

    ``body`` is the whole body when the tier holds it in memory, else None;
    either way :meth:`chunks` yields it.  A memory object can be iterated any
    number of times; tiers that read from files override :meth:`chunks`.
    """

    __slots__ = ("meta", "body")

    def __init__(self, meta: Meta, body: bytes | None = None):
        self.meta = meta
        self.body = body

    async def chunks(self, chunk_size: int = DEFAULT_CHUNK_SIZE, start: int = 0,
                     end: int | None = None) -> AsyncIterator[bytes]:
        """The body from byte `start` up to (not including) `end`, in chunks."""
        body = self.body
        if body is None:
            raise CorruptEntry("object has no body to read")
        stop = len(body) if end is None else min(end, len(body))
        if start == 0 and stop == len(body) and stop <= chunk_size:
            if body:
                yield body              # the common case: no slicing, no copy
            return
        view = memoryview(body)
        for offset in range(start, stop, chunk_size):
            yield bytes(view[offset:min(offset + chunk_size, stop)])

    def with_meta(self, meta: Meta) -> CachedObject:
        """The same stored body under another Meta (a soft purge's view of it); nothing is stored."""
        clone = copy.copy(self)
        clone.meta = meta
        return clone

    def __repr__(self) -> str:
        where = "memory" if self.body is not None else "file"
        return f"<{type(self).__name__} {self.meta.status} {self.meta.size}B in {where} {self.meta.url!r}>"


class Writer(Protocol):
    """Stores one response body as it streams in; nothing is visible before commit."""

    async def write(self, chunk: bytes) -> None: ...

    async def commit(self, meta: Meta) -> bool:
        """Publish the entry; False (and nothing stored) if ``meta.size`` differs
        from the bytes written or the object does not fit this tier.

        A commit replaces the key's stored version even when it fails: the
        old version is removed rather than served in place of the new one.
        """
        ...

    async def abort(self) -> None:
        """Forget what was written; the stored version (if any) stays."""
        ...


class Store(Protocol):
    """A cache tier (or a stack of them) keyed by the proxy's cache key."""

    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, key: str) -> CachedObject | None: ...

    def in_memory(self, key: str) -> CachedObject | None:
        """The entry if this store holds it in memory, found without awaiting; else None."""
        ...

    def writer(self, key: str, size_hint: int | None = None) -> Writer: ...

    async def update_meta(self, key: str, meta: Meta, replacing: Meta | None = None) -> bool:
        """Replace the stored meta of `key` (same body); with `replacing`, only while that is the stored one."""
        ...

    async def delete(self, key: str, only: Meta | None = None) -> bool:
        """Remove `key`; with `only`, only while the stored version is that one
        (fetched at its request and response times): a newer copy stays."""
        ...

    @property
    def objects(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    def tiers(self) -> list[Store]: ...
