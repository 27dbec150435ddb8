"""What passes between the connection layer and the pipeline: a request view and a reply.

The pipeline (`edge.proxy`) never sees a socket or a server library: it gets a
:class:`Request` (method, raw target, header fields, client address and a
body stream) and returns a :class:`Reply` (status, header fields, and a body
that is bytes or an async stream).  The connection layer decides how to put
that on the wire: framing, keep-alive, backpressure.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from email.utils import formatdate

from multidict import CIMultiDict, CIMultiDictProxy

log = logging.getLogger("edge.http")


class BodyAborted(Exception):
    """A reply body stream broke after bytes were sent (upstream cut, corrupt entry).

    The connection layer aborts the connection so that the client sees a
    truncated response, never a complete-looking wrong one.
    """


class ClientGone(Exception):
    """The client closed its connection (or timed out) while its body was being read."""


class ArrivingBody:
    """A message body as it arrives from a socket, read with backpressure.

    The connection feeds chunks in; when more than ``high_water`` bytes wait,
    it stops reading from the socket (``pause``) until the reader has taken
    them (``resume``).  A reader waits at most ``timeout`` seconds for the next
    chunk, then gets ``timeout_error(timeout)``.  Used for request bodies here
    and for response bodies by the upstream client.
    """

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None], timeout: float,
                 timeout_error: Callable[[float], Exception], high_water: int = 256 * 1024):
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._pause, self._resume = pause, resume
        self._timeout = timeout
        self._timeout_error = timeout_error
        self._high_water = high_water
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False          # the whole body has arrived
        self.error: Exception | None = None
        self.received = 0

    # ------------------------------------------------------- connection side

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self.received += len(chunk)
        if self._buffered > self._high_water and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: Exception) -> None:
        if not self.complete:
            self.error = error
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ----------------------------------------------------------- reader side

    async def read(self) -> bytes:
        """The next chunk; b"" at the end of the body."""
        while not self._chunks:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, self._timeout)
            except asyncio.TimeoutError:
                raise self._timeout_error(self._timeout) from None
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= self._high_water // 4:
            self._paused = False
            self._resume()
        return chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while chunk := await self.read():
            yield chunk


def _body_timeout(timeout: float) -> Exception:
    return ClientGone(f"no request body bytes for {timeout:g}s")


class RequestBody(ArrivingBody):
    """A request body.  For ``Expect: 100-continue`` the interim response is
    sent the first time the body is read, as uvicorn and aiohttp do: a
    pipeline that answers without reading the body never asks for it.
    ``timeout`` is nginx's ``client_body_timeout``.
    """

    def __init__(self, pause: Callable[[], None], resume: Callable[[], None], timeout: float,
                 send_continue: Callable[[], None] | None = None, high_water: int = 256 * 1024):
        super().__init__(pause, resume, timeout, _body_timeout, high_water)
        self._send_continue = send_continue

    async def read(self) -> bytes:
        if self._send_continue is not None:
            send, self._send_continue = self._send_continue, None
            send()
        return await super().read()


class Request:
    """One parsed request as the pipeline sees it: no socket, no server library."""

    __slots__ = ("method", "target", "version", "raw_headers", "remote", "body", "keep_alive", "tls", "_headers")

    def __init__(self, method: str, target: str, version: str, raw_headers: list[tuple[bytes, bytes]],
                 remote: str, body: RequestBody | None = None, keep_alive: bool = True, tls: bool = False):
        self.method = method
        self.target = target                  # the request-target exactly as received
        self.version = version                # "1.0" or "1.1"
        self.raw_headers = raw_headers
        self.remote = remote                  # client IP address
        self.body = body                      # None when the request has no body
        self.keep_alive = keep_alive          # the client allows the connection to be kept
        self.tls = tls                        # it came over the HTTPS listener
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The fields as a case-insensitive multidict, built on first use (the hit path never asks)."""
        if self._headers is None:
            # Field values were checked to be visible ASCII, space or tab: latin-1 is exact.
            self._headers = CIMultiDictProxy(CIMultiDict(
                (name.decode("latin-1"), value.decode("latin-1")) for name, value in self.raw_headers))
        return self._headers

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.target!r} HTTP/{self.version} from {self.remote}>"


Body = bytes | AsyncIterator[bytes]


class Reply:
    """What to send: status, header fields and a body (bytes, or an async stream of bytes).

    ``length`` is the Content-Length to announce: ``len(body)`` for bytes,
    None for a stream of unknown length (sent chunked, or close-delimited to
    an HTTP/1.0 client).  ``bodyless`` replies (HEAD, 304, 416...) announce
    ``length`` but send no body.  A stream may raise :class:`BodyAborted`;
    the connection layer then aborts the connection.  It always closes the
    stream (``aclose``), also when the client went away, so a stream that
    fills the cache finishes filling it.
    """

    __slots__ = ("status", "headers", "body", "length", "bodyless", "cache_status", "upstream", "head")

    def __init__(self, status: int, headers: Iterable[tuple[str, str]], body: Body = b"", *,
                 length: int | None = -1, bodyless: bool = False, cache_status: str = "",
                 upstream: str = "", head: bytes | None = None):
        self.status = status
        self.headers = headers
        self.body = body
        if length == -1:
            length = len(body) if isinstance(body, bytes) else None
        self.length = length
        self.bodyless = bodyless
        self.cache_status = cache_status      # X-Cache verdict, for metrics and the access log
        self.upstream = upstream              # who answered the fetch, for the access log
        # Pre-serialised status line and fields, Content-Length included (a stored
        # object's block, as the hit path writes it): sent instead of `headers`.
        self.head = head

    def __repr__(self) -> str:
        return f"<Reply {self.status} {self.cache_status} length={self.length}>"


def error_reply(status: int, text: str, fields: Iterable[tuple[str, str]] = (),
                cache_status: str = "REFUSED") -> Reply:
    """A short plain-text answer this node makes itself (a refusal, an upstream failure)."""
    return Reply(status, [("Date", formatdate(usegmt=True)), ("Content-Type", "text/plain; charset=utf-8"),
                          *fields], f"{status} {text}\n".encode("utf-8", "replace"), cache_status=cache_status)


async def close_body(reply: Reply) -> None:
    """Close a reply's stream, if it is one (a cache fill behind it finishes); never raises."""
    body = reply.body
    if not isinstance(body, bytes):
        aclose = getattr(body, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception as exc:        # a broken stream must not break the connection's bookkeeping
                log.info("closing a reply body failed: %r", exc)
