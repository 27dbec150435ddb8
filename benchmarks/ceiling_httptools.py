"""Python's lowest ceiling: a bare asyncio.Protocol on uvloop, parsing with httptools.

The same bytes as :mod:`benchmarks.ceiling` (``/gen/NAME?size=BYTES``
answers BYTES bytes held in memory), with nothing between the socket and
the answer but llhttp (through httptools) and one dict lookup: the URL maps
to a pre-serialised header block (status line, Content-Type, Cache-Control,
Content-Length, keep-alive) and the body, both built on the URL's first
use.  Each response is the header block, an ``Age: 0`` line (the one header
a cache must make per response) and the body, in one
``transport.writelines``.  Keep-alive and pipelining: every request is
answered in ``on_message_complete``, so responses leave in request order.
The edge's HTTP front cannot do less work per hit than this in Python.

    python -m benchmarks.ceiling_httptools HOST PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys
from urllib.parse import parse_qsl

import httptools
import uvloop

from benchmarks.ceiling import MAX_SIZE, body, loopback_address

MAX_URLS = 4096             # the dict of answers is a cache of URLs: bounded
AGE_LINE = b"Age: 0\r\n\r\n"

_ANSWERS: dict[bytes, tuple[bytes, bytes]] = {}


def _plain(status: bytes, text: bytes) -> tuple[bytes, bytes]:
    head = (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: " + str(len(text)).encode() + b"\r\nConnection: keep-alive\r\n")
    return head, text


def answer(url: bytes) -> tuple[bytes, bytes]:
    """(header block without the final blank line, body) for a request target; cached per URL."""
    found = _ANSWERS.get(url)
    if found is not None:
        return found
    made = _make_answer(url)
    if len(_ANSWERS) >= MAX_URLS:
        _ANSWERS.clear()
    _ANSWERS[url] = made
    return made


def _make_answer(url: bytes) -> tuple[bytes, bytes]:
    try:
        parsed = httptools.parse_url(url)
    except httptools.HttpParserInvalidURLError:
        return _plain(b"400 Bad Request", b"bad request target\n")
    path = parsed.path or b""
    if not path.startswith(b"/gen/") or len(path) <= 5 or b"/" in path[5:]:
        return _plain(b"404 Not Found", b"not found\n")
    query = dict(parse_qsl((parsed.query or b"").decode("latin-1")))
    try:
        size = int(query.get("size", "1024"))
    except ValueError:
        return _plain(b"400 Bad Request", b"size must be a whole number\n")
    if not 0 <= size <= MAX_SIZE:
        return _plain(b"400 Bad Request", f"size must be within 0..{MAX_SIZE}\n".encode())
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Cache-Control: public, max-age=3600\r\nContent-Length: " + str(size).encode()
            + b"\r\nConnection: keep-alive\r\n")
    return head, body(size)


class HttpProtocol(asyncio.Protocol):
    """One connection: feed bytes to llhttp, answer each complete request at once."""

    __slots__ = ("transport", "parser", "url", "closing", "paused")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.closing = False
        self.paused = False

    # ----------------------------------------------------------------- transport events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._close()
        except httptools.HttpParserError:
            if self.transport is not None and not self.closing:
                head, text = _plain(b"400 Bad Request", b"malformed request\n")
                self.transport.writelines((head.replace(b"keep-alive", b"close"), b"\r\n", text))
            self._close()

    def pause_writing(self) -> None:
        # The client reads slower than we answer (large bodies, deep pipelines):
        # stop reading requests until the buffer drains, so memory stays bounded.
        self.paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # ----------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url += url     # llhttp may deliver the target in pieces

    def on_message_complete(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        head, payload = answer(self.url)
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive:
            head = head.replace(b"Connection: keep-alive", b"Connection: close")
        if self.parser.get_method() == b"HEAD":
            transport.writelines((head, AGE_LINE))
        else:
            transport.writelines((head, AGE_LINE, payload))
        if not keep_alive:
            self._close()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None:
            self.transport.close()      # after what is buffered has been written


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(HttpProtocol, host, port, backlog=1024, reuse_address=True)
    async with server:
        await stop.wait()


def main(argv: list[str]) -> int:
    address = loopback_address(argv, "benchmarks.ceiling_httptools")
    if address is None:
        return 2
    uvloop.run(serve(*address))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
