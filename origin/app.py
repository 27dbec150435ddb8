"""The origin server: a content directory and deterministic synthetic objects.

Tests and benchmarks of the CDN need an origin whose behaviour they control
from the URL alone, and whose request count proves offload.  This app serves:

* **the content directory** (``GET``/``HEAD``): ``/`` and directories serve
  ``index.html`` (a directory without the trailing slash is redirected, as
  nginx does, so relative links work); strong ``ETag`` from mtime and size,
  ``Last-Modified``, the configured ``Cache-Control``, ``Content-Type`` by
  extension, conditional requests (RFC 9110 section 13) and single byte
  ranges (RFC 9110 section 14).  Paths with dot-segments, encoded separators
  or NUL bytes are refused with 400; hidden files (``.git``, ``.env``) and
  symlinks that leave the directory answer 404.

* **synthetic objects** at ``/gen/{any/name}``, any method, shaped by the
  query string (see :func:`parse_gen_query`): ``size``, ``cc``, ``cdncc``,
  ``expires``, ``etag``, ``lm``, ``vary``, ``status``, ``location``, ``age``,
  ``delay``, ``tags`` (``Surrogate-Key``), ``cachetag`` (``Cache-Tag``) and ``norange``.  Unknown parameters are ignored, so ``?v=2`` busts caches.
  The body is self-describing: 64-byte lines ``<46-hex tag> <16-hex line
  number>\\n`` where the tag derives from the path (and the Vary'd request
  header values) and line *n* starts at byte offset ``64 * n``.  Any byte
  served at the wrong offset is therefore detectable, and bodies of any size
  stream in bounded chunks; small ones (<= 1 MiB) are kept in a byte-bounded
  LRU so the benchmark hot path does not regenerate them.

Every response carries ``X-Origin-Hits: N``, the number of requests this
process has received for that URL.  The key is the decoded path plus ``?``
and the raw query string when there is one, because tests vary ``size`` or
``cc`` per URL and expect independent counts.  The table is an LRU of
:data:`MAX_COUNTED_URLS` URLs, so a benchmark with millions of URLs cannot
exhaust memory; only the least recently requested counts are forgotten.

Metrics go to the registry passed to :func:`make_app`:
``origin_requests_total{method,status}`` (methods outside the standard set
are counted as ``other``), ``origin_path_requests_total{path}`` (path without
query; after :data:`MAX_PATH_LABELS` distinct paths new ones count as
``other``) and ``origin_response_bytes_total``.

Methods reach the app when llhttp (aiohttp's parser) knows them: the standard
ones and WebDAV's, ``M-SEARCH`` and the like; made-up ones such as ``FOO``
are answered 400 by aiohttp before the app sees them.

Pure parts live beside this module: :mod:`origin.conditional` (validators,
preconditions, ranges) and :mod:`origin.synthetic` (the /gen/ bodies and
query).
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import stat
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import cachetools
from aiohttp import hdrs, web
from prometheus_client import CollectorRegistry, Counter

SERVER_NAME = "edge-origin"
DEMO_DIR = Path(__file__).parent / "demo"

MAX_COUNTED_URLS = 100_000          # X-Origin-Hits table (LRU), ~20 MB when full
MAX_PATH_LABELS = 1000              # distinct `path` label values before "other"
BODY_CACHE_BYTES = 64 * 2**20       # byte budget of the small-body LRU
BODY_CACHE_OBJECT_MAX = 1 * 2**20   # bigger synthetic bodies are streamed, not cached
FILE_CHUNK = 256 * 2**10            # read size for content-directory files
STANDARD_METHODS = frozenset({
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "PURGE",
})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

from origin.conditional import (
    ByteRange,
    RangeOutcome,
    evaluate_preconditions,
    http_date,
    select_range,
)
from origin.synthetic import (
    BadParameter,
    parse_gen_query,
    synthetic_body,
    synthetic_tag,
    vary_preamble,
)

# --------------------------------------------------------------------------
# Content directory paths (pure) and file access (in worker threads)
# --------------------------------------------------------------------------

class PathRejected(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


def url_path_segments(raw_path: str) -> list[str]:
    """The decoded segments of a request path, or PathRejected (400 or 404).

    Works on the raw (still percent-encoded) path so that an encoded ``/``,
    ``\\``, NUL or dot-segment is seen for what it is after decoding.  Empty
    segments are dropped (``//a`` is ``/a``, as with nginx's merge_slashes).
    Hidden names (``.git``, ``.env``) are not served.
    """
    if not raw_path.startswith("/"):
        raise PathRejected(400, "request path must start with /")
    segments = []
    for raw in raw_path.split("/"):
        if not raw:
            continue
        try:
            segment = urllib.parse.unquote(raw, errors="strict")
        except UnicodeDecodeError:
            raise PathRejected(400, "request path is not valid UTF-8") from None
        if segment in (".", ".."):
            raise PathRejected(400, "dot-segments are not allowed in the request path")
        if any(c in segment for c in "/\\\0"):
            raise PathRejected(400, "encoded '/', '\\' or NUL in the request path")
        if segment.startswith("."):
            raise PathRejected(404, "not found")
        segments.append(segment)
    return segments


@dataclass
class OpenedFile:
    file: BinaryIO
    name: str           # of the file served (index.html for a directory)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Redirect:
    location: str


def _open_in_root(root: Path, segments: list[str], trailing_slash: bool) -> OpenedFile | Redirect | None:
    """Blocking: resolve a path under root (following symlinks) and open it.

    Runs in a worker thread.  The resolved path must stay inside ``root``, so a
    symlink pointing out of the content directory is treated as absent.
    """
    try:
        target = root.joinpath(*segments).resolve(strict=True)
        if not target.is_relative_to(root):
            return None
        if target.is_dir():
            if not trailing_slash and segments:
                return Redirect("/" + "/".join(urllib.parse.quote(s) for s in segments) + "/")
            target = (target / "index.html").resolve(strict=True)
            if not target.is_relative_to(root):
                return None
        # O_NONBLOCK: opening a FIFO planted in the directory must not hang a worker thread.
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError, RuntimeError):   # missing, unreadable, too long, symlink loop
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            return None
        return OpenedFile(os.fdopen(fd, "rb"), target.name, info.st_size, info.st_mtime_ns)
    except OSError:
        os.close(fd)
        return None


_MIME_TYPES = mimetypes.MimeTypes()      # the built-in table only: same answer on every host
for _type, _ext in (("font/woff2", ".woff2"), ("font/woff", ".woff"), ("text/javascript", ".mjs"),
                    ("image/webp", ".webp"), ("application/wasm", ".wasm")):
    _MIME_TYPES.add_type(_type, _ext)
_TEXTUAL = ("application/javascript", "application/json", "application/xml", "image/svg+xml")
_COMPRESSED = {"gzip": "application/gzip", "bzip2": "application/x-bzip2", "xz": "application/x-xz",
               "br": "application/x-brotli", "compress": "application/x-compress"}


def content_type_for(name: str) -> str:
    """Content-Type by file extension; text gets ``charset=utf-8``.

    ``x.tar.gz`` is served as the gzip file it is, not as a tar with a
    Content-Encoding we never send.
    """
    guessed, encoding = _MIME_TYPES.guess_type(name, strict=False)
    if encoding is not None:
        return _COMPRESSED.get(encoding, "application/octet-stream")
    if guessed is None:
        return "application/octet-stream"
    if guessed.startswith("text/") or guessed in _TEXTUAL:
        return f"{guessed}; charset=utf-8"
    return guessed


# --------------------------------------------------------------------------
# Counting and metrics
# --------------------------------------------------------------------------

class OriginMetrics:
    """The origin's counters on a given registry, with bounded label values."""

    def __init__(self, registry: CollectorRegistry, max_path_labels: int = MAX_PATH_LABELS):
        self.requests = Counter("origin_requests", "Requests answered by the origin",
                                ["method", "status"], registry=registry)
        self.path_requests = Counter("origin_path_requests",
                                     "Requests per URL path (first paths seen; the rest as 'other')",
                                     ["path"], registry=registry)
        self.response_bytes = Counter("origin_response_bytes", "Response body bytes sent",
                                      registry=registry)
        self._max_path_labels = max_path_labels
        # Children cached by key: .labels() takes a lock and builds a tuple per call.
        self._path_children: dict[str, Counter] = {}
        self._other_path = self.path_requests.labels("other")
        self._request_children: dict[tuple[str, int], Counter] = {}

    def observe(self, method: str, status: int, path: str) -> None:
        method = method if method in STANDARD_METHODS else "other"
        child = self._request_children.get((method, status))
        if child is None:
            child = self._request_children[(method, status)] = self.requests.labels(method, str(status))
        child.inc()
        child = self._path_children.get(path)
        if child is None:
            if len(self._path_children) < self._max_path_labels:
                child = self._path_children[path] = self.path_requests.labels(path)
            else:
                child = self._other_path
        child.inc()

    def sent(self, nbytes: int) -> None:
        if nbytes:
            self.response_bytes.inc(nbytes)


@dataclass
class OriginState:
    content_root: Path
    cache_control: str
    metrics: OriginMetrics
    hits: cachetools.LRUCache = field(default_factory=lambda: cachetools.LRUCache(MAX_COUNTED_URLS))
    bodies: cachetools.LRUCache = field(
        default_factory=lambda: cachetools.LRUCache(BODY_CACHE_BYTES, getsizeof=len))

    def count(self, key: str) -> int:
        hits = self.hits.get(key, 0) + 1
        self.hits[key] = hits
        return hits

    def hit_count(self, key: str) -> int:
        """Requests seen for ``key`` (path, or path?query) without counting one."""
        return self.hits.get(key, 0)


ORIGIN_STATE = web.AppKey("origin_state", OriginState)
_HITS = web.RequestKey("origin_hits", int)


def hit_key(path: str, query_string: str) -> str:
    """The X-Origin-Hits key: decoded path, plus ``?query`` when there is one."""
    return f"{path}?{query_string}" if query_string else path


@web.middleware
async def _count_hits(request: web.Request, handler) -> web.StreamResponse:
    """Count the URL on arrival, so the response (whatever it is) can carry the number."""
    request[_HITS] = request.app[ORIGIN_STATE].count(hit_key(request.path, request.query_string))
    return await handler(request)


async def _stamp_response(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: runs for every response, errors included, before its headers go out.

    Metrics are recorded here rather than after the handler returns, so that
    a client that has read a response already sees it counted on /metrics.
    """
    state = request.app[ORIGIN_STATE]
    state.metrics.observe(request.method, response.status, request.path)
    if isinstance(response, web.Response) and request.method != "HEAD":
        body = response.body     # whole bodies; streamed ones are counted chunk by chunk
        if isinstance(body, (bytes, bytearray)) and response.status not in (204, 304):
            state.metrics.sent(len(body))
    headers = response.headers
    headers[hdrs.SERVER] = SERVER_NAME
    hits = request.get(_HITS)
    if hits is not None:
        headers["X-Origin-Hits"] = str(hits)
    if via := request.headers.get(hdrs.VIA):
        headers["X-Origin-Via"] = via
    if xff := request.headers.get(hdrs.X_FORWARDED_FOR):
        headers["X-Origin-XFF"] = xff
    conditional = hdrs.IF_NONE_MATCH in request.headers or hdrs.IF_MODIFIED_SINCE in request.headers
    headers["X-Origin-Conditional"] = "1" if conditional else "0"


def _joined(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    return ", ".join(values) if values else None


def _preconditions(request: web.Request, etag: str | None, last_modified: int | None) -> int | None:
    return evaluate_preconditions(
        request.method, etag=etag, last_modified=last_modified,
        if_match=_joined(request, hdrs.IF_MATCH),
        if_unmodified_since=request.headers.get(hdrs.IF_UNMODIFIED_SINCE),
        if_none_match=_joined(request, hdrs.IF_NONE_MATCH),
        if_modified_since=request.headers.get(hdrs.IF_MODIFIED_SINCE))


def _range(request: web.Request, length: int, etag: str | None,
           last_modified: int | None) -> ByteRange | RangeOutcome:
    return select_range(request.method, request.headers.get(hdrs.RANGE),
                        request.headers.get(hdrs.IF_RANGE), length, etag, last_modified)


# --------------------------------------------------------------------------
# Handlers
# --------------------------------------------------------------------------

async def _read_request_body(request: web.Request) -> int:
    """Read and discard the request body, returning its length (any size)."""
    length = 0
    if request.body_exists:
        async for chunk in request.content.iter_chunked(FILE_CHUNK):
            length += len(chunk)
    return length


async def _serve_synthetic(request: web.Request) -> web.StreamResponse:
    state = request.app[ORIGIN_STATE]
    body_length = await _read_request_body(request)
    headers = {"X-Origin-Method": request.method, "X-Origin-Body-Length": str(body_length)}
    try:
        spec = parse_gen_query(request.query)
    except BadParameter as exc:
        return web.Response(status=400, text=f"bad parameter: {exc}\n", headers=headers)
    if spec.delay:
        await asyncio.sleep(spec.delay)

    path = request.path
    preamble = vary_preamble(spec.vary_fields, request.headers)
    tag = synthetic_tag(path, preamble)
    etag = spec.etag
    if etag == "derive":
        digest = hashlib.sha256(b"%s\0%d" % (tag, spec.size)).hexdigest()
        etag = f'"{digest[:20]}"'

    # Validators and caching headers: sent on 200, 206 and 304 alike (RFC 9110 section 15.4.5).
    if spec.cache_control is not None:
        headers[hdrs.CACHE_CONTROL] = spec.cache_control
    if spec.cdn_cache_control is not None:
        headers["CDN-Cache-Control"] = spec.cdn_cache_control
    if spec.expires is not None:
        headers[hdrs.EXPIRES] = http_date(time.time() + spec.expires)
    if etag is not None:
        headers[hdrs.ETAG] = etag
    if spec.last_modified is not None:
        headers[hdrs.LAST_MODIFIED] = http_date(spec.last_modified)
    if spec.vary is not None:
        headers[hdrs.VARY] = spec.vary
    if spec.age is not None:
        headers[hdrs.AGE] = str(spec.age)
    if spec.surrogate_key is not None:
        headers["Surrogate-Key"] = spec.surrogate_key
    if spec.cache_tag is not None:
        headers["Cache-Tag"] = spec.cache_tag
    if spec.status in REDIRECT_STATUSES or spec.location is not None:
        headers[hdrs.LOCATION] = spec.location if spec.location is not None else str(
            request.rel_url.without_query_params("status"))

    status = spec.status
    if 200 <= status < 300:
        decided = _preconditions(request, etag, spec.last_modified)
        if decided is not None:
            return web.Response(status=decided, headers=headers)
    if status in (204, 304):
        return web.Response(status=status, headers=headers)

    headers[hdrs.CONTENT_TYPE] = content_type_for(path)
    first, length = 0, spec.size
    if status == 200 and spec.norange:
        headers[hdrs.ACCEPT_RANGES] = "none"
    elif status == 200:
        headers[hdrs.ACCEPT_RANGES] = "bytes"
        chosen = _range(request, spec.size, etag, spec.last_modified)
        if chosen is RangeOutcome.UNSATISFIABLE:
            headers[hdrs.CONTENT_RANGE] = f"bytes */{spec.size}"
            return web.Response(status=416, headers=headers)
        if isinstance(chosen, ByteRange):
            status, first, length = 206, chosen.first, chosen.length
            headers[hdrs.CONTENT_RANGE] = chosen.content_range(spec.size)

    if request.method == "HEAD":
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = length
        await response.prepare(request)
        return response
    if spec.size <= BODY_CACHE_OBJECT_MAX:
        body = state.bodies.get((tag, spec.size))
        if body is None:
            body = b"".join(synthetic_body(tag, 0, spec.size, preamble))
            state.bodies[(tag, spec.size)] = body
        if length != spec.size:
            body = body[first:first + length]
        return web.Response(status=status, body=body, headers=headers)
    return await _stream(request, status, headers, length,
                         synthetic_body(tag, first, first + length, preamble), state.metrics)


async def _stream(request: web.Request, status: int, headers: dict[str, str], length: int,
                  chunks: Iterator[bytes], metrics: OriginMetrics) -> web.StreamResponse:
    """Send a body of known length chunk by chunk; a client hanging up ends it quietly."""
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    try:
        for chunk in chunks:
            metrics.sent(len(chunk))       # before the write: the client may see it first
            await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        pass
    return response


async def _serve_file(request: web.Request) -> web.StreamResponse:
    state = request.app[ORIGIN_STATE]
    raw_path = request.rel_url.raw_path
    try:
        segments = url_path_segments(raw_path)
    except PathRejected as exc:
        return web.Response(status=exc.status, text=f"{exc}\n")
    found = await asyncio.to_thread(_open_in_root, state.content_root, segments, raw_path.endswith("/"))
    if found is None:
        return web.Response(status=404, text="not found\n")
    if isinstance(found, Redirect):
        location = found.location + (f"?{request.query_string}" if request.query_string else "")
        return web.Response(status=301, headers={hdrs.LOCATION: location})
    try:
        return await _send_file(request, state, found)
    finally:
        await asyncio.to_thread(found.file.close)


async def _send_file(request: web.Request, state: OriginState, opened: OpenedFile) -> web.StreamResponse:
    etag = f'"{opened.mtime_ns:x}-{opened.size:x}"'
    last_modified = opened.mtime_ns // 1_000_000_000
    headers = {
        hdrs.ETAG: etag,
        hdrs.LAST_MODIFIED: http_date(last_modified),
        hdrs.CACHE_CONTROL: state.cache_control,
    }
    decided = _preconditions(request, etag, last_modified)
    if decided is not None:
        return web.Response(status=decided, headers=headers)

    headers[hdrs.CONTENT_TYPE] = content_type_for(opened.name)
    headers[hdrs.ACCEPT_RANGES] = "bytes"
    status, first, length = 200, 0, opened.size
    chosen = _range(request, opened.size, etag, last_modified)
    if chosen is RangeOutcome.UNSATISFIABLE:
        return web.Response(status=416, headers={hdrs.CONTENT_RANGE: f"bytes */{opened.size}"})
    if isinstance(chosen, ByteRange):
        status, first, length = 206, chosen.first, chosen.length
        headers[hdrs.CONTENT_RANGE] = chosen.content_range(opened.size)

    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = length
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    fd, offset, end = opened.file.fileno(), first, first + length
    try:
        while offset < end:
            chunk = await asyncio.to_thread(os.pread, fd, min(FILE_CHUNK, end - offset), offset)
            if not chunk:       # the file shrank under us: close so the client sees a short body
                response.force_close()
                break
            state.metrics.sent(len(chunk))
            await response.write(chunk)
            offset += len(chunk)
        else:
            await response.write_eof()
    except ConnectionResetError:
        pass
    return response


def make_app(content_dir: Path | None, cache_control: str,
             registry: CollectorRegistry) -> web.Application:
    """The origin's traffic app.

    ``content_dir=None`` serves the built-in demo site.  ``cache_control`` is
    sent on every file response; synthetic objects under /gen/ choose their
    own.  Metrics go to ``registry``.  Raises NotADirectoryError (an OSError,
    so the command line prints one line) if the directory is missing.
    """
    directory = Path(content_dir) if content_dir is not None else DEMO_DIR
    if not directory.is_dir():
        raise NotADirectoryError(f"origin content directory {str(directory)!r} does not exist "
                                 "or is not a directory")
    app = web.Application(middlewares=[_count_hits])
    app[ORIGIN_STATE] = OriginState(directory.resolve(), cache_control, OriginMetrics(registry))
    app.on_response_prepare.append(_stamp_response)
    app.router.add_route("*", "/gen/{name:.+}", _serve_synthetic)
    app.router.add_get("/{path:.*}", _serve_file)   # also answers HEAD
    return app
