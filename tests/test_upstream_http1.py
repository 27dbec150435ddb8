"""Our upstream HTTP/1.1 client (edge.upstream.http1) against scripted upstreams on real loopback sockets.

The upstream here is a raw asyncio server that answers each request with the
exact bytes a test scripts, so it can misbehave in ways a real server
library will not (bytes beyond Content-Length, a closed keep-alive
connection, a head that never ends).  The last tests run a real `edge run`
node (127.0.38.32) in front of such an upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from edge.upstream.http1 import BODY_HIGH_WATER, MAX_HEAD_BYTES, Address, Http1Client, UpstreamIOError
from tests.cluster import single_edge

Script = Callable[[bytes], bytes | None]   # the request's head -> the bytes to answer (None: answer nothing)


class ScriptedUpstream:
    """A raw HTTP/1.1 server: reads each request (head and Content-Length or chunked body), writes `script(head)`.

    `close_after` closes each connection after that many answers, without saying so.
    """

    def __init__(self, script: Script, close_after: int | None = None):
        self.script, self.close_after = script, close_after
        self.connections = 0
        self.requests: list[bytes] = []          # every request received, head and body
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = Address("http", "127.0.0.1", self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                body = await _read_body(reader, head)
                self.requests.append(head + body)
                answer = self.script(head)
                if answer is None:
                    await asyncio.sleep(3600)
                writer.write(answer)
                await writer.drain()
                answered += 1
                if self.close_after is not None and answered >= self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def _read_body(reader: asyncio.StreamReader, head: bytes) -> bytes:
    lower = head.lower()
    if b"content-length:" in lower:
        length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
        return await reader.readexactly(length)
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.strip(), 16)
            chunk = await reader.readexactly(size + 2)
            body += size_line + chunk
            if size == 0:
                return body
    return b""


def answer(body: bytes = b"hello", *fields: str, status: str = "200 OK", extra: bytes = b"") -> Script:
    head = f"HTTP/1.1 {status}\r\n" + "".join(f"{f}\r\n" for f in fields)
    if not any(f.lower().startswith(("content-length", "transfer-encoding")) for f in fields):
        head += f"Content-Length: {len(body)}\r\n"
    data = head.encode() + b"\r\n" + body + extra
    return lambda _head: data


@pytest.fixture
async def client() -> AsyncIterator[Http1Client]:
    excess: list[Address] = []
    client = Http1Client(connect_timeout=1.0, read_timeout=1.0, on_excess=excess.append)
    client.excess = excess      # what the client reported, for the tests
    yield client
    await client.close()


async def get(client: Http1Client, upstream: ScriptedUpstream, target: str = "/",
              method: str = "GET", **kw) -> tuple[int, dict, bytes]:
    response = await client.request(upstream.address, method, target, [("Host", "www.example.com")], **kw)
    try:
        body = await response.read()
    finally:
        response.release()
    return response.status, response.headers, body


# ------------------------------------------------------------------ framing


@pytest.mark.parametrize("script, body", [
    (answer(b"hello"), b"hello"),
    (answer(b"", "Transfer-Encoding: chunked", extra=b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), b"hello world"),
    # RFC 9112 6.3 item 8: no length, not chunked: the body ends when the connection closes.
    (lambda h: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close", b"until close"),
    # 1xx interim responses are read past (RFC 9110 15.2).
    (lambda h: b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", b"ok"),
    (answer(b"", status="204 No Content", extra=b""), b""),
])
async def test_response_framings(client, script, body) -> None:
    close_after = 1 if b"until close" in script(b"") else None
    async with ScriptedUpstream(script, close_after=close_after) as upstream:
        status, _, received = await get(client, upstream)
    assert received == body
    assert status in (200, 204)


async def test_head_and_304_have_no_body_and_keep_the_connection() -> None:
    """A HEAD's Content-Length (RFC 9110 9.3.2) and a 304's (15.4.5) announce no body on the wire."""
    responses = iter([b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
                      b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1000\r\nETag: \"a\"\r\n\r\n",
                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    client = Http1Client(connect_timeout=1.0, read_timeout=1.0)
    try:
        async with ScriptedUpstream(lambda h: next(responses)) as upstream:
            status, headers, body = await get(client, upstream, method="HEAD")
            assert (status, headers["Content-Length"], body) == (200, "1000", b"")
            status, headers, body = await get(client, upstream)
            assert (status, headers["ETag"], body) == (304, '"a"', b"")
            assert await get(client, upstream) == (200, {"Content-Length": "2"}, b"ok")
            assert upstream.connections == 1
    finally:
        await client.close()


async def test_excess_bytes_after_content_length_are_dropped_and_the_connection_closed(client) -> None:
    """RFC 9112 6.3: deliver the Content-Length bytes, close that connection, count it."""
    async with ScriptedUpstream(answer(b"hello", extra=b"GARBAGE THAT IS NOT A RESPONSE")) as upstream:
        assert (await get(client, upstream))[2] == b"hello"
        assert client.excess == [upstream.address]
        assert (await get(client, upstream))[2] == b"hello"       # on a new connection
        assert upstream.connections == 2


async def test_excess_that_looks_like_a_response_is_not_read_as_the_next_one(client) -> None:
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
    async with ScriptedUpstream(answer(b"hello", extra=smuggled)) as upstream:
        assert (await get(client, upstream))[2] == b"hello"
        assert (await get(client, upstream))[2] == b"hello"
        assert upstream.connections == 2 and len(client.excess) == 2


async def test_excess_arriving_after_the_response_closes_the_pooled_connection(client) -> None:
    async def late(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
        await writer.drain()
        await asyncio.sleep(5)
        writer.close()

    server = await asyncio.start_server(late, "127.0.0.1", 0)
    address = Address("http", "127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        response = await client.request(address, "GET", "/", ())
        assert await response.read() == b"ok"
        response.release()
        for _ in range(100):
            if client.excess:
                break
            await asyncio.sleep(0.01)
        assert client.excess == [address]
        assert client._pooled(address) is None      # the out-of-step connection left the pool
    finally:
        server.close()


# --------------------------------------------------------------- keep-alive


async def test_connections_are_reused(client) -> None:
    async with ScriptedUpstream(answer(b"x" * 100)) as upstream:
        for _ in range(5):
            assert (await get(client, upstream))[2] == b"x" * 100
        assert upstream.connections == 1


async def test_a_pooled_connection_the_server_closed_is_retried_once_for_a_get(client) -> None:
    """The keep-alive race (RFC 9112 9.3.1): closed with nothing answered; a GET goes again on a new one."""
    async with ScriptedUpstream(answer(b"ok"), close_after=1) as upstream:
        assert (await get(client, upstream))[2] == b"ok"
        await asyncio.sleep(0.1)        # the server has closed; the client has not looked yet
        assert (await get(client, upstream))[2] == b"ok"
        assert upstream.connections == 2


async def test_a_post_is_never_sent_twice(client) -> None:
    """RFC 9110 9.2.2: a non-idempotent request is not retried automatically."""

    async def half_close(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(half_close, "127.0.0.1", 0)
    address = Address("http", "127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        with pytest.raises(UpstreamIOError) as caught:
            await client.request(address, "POST", "/", [("Content-Length", "0")])
        assert caught.value.error == "connection_terminated"
    finally:
        server.close()


async def test_a_response_not_read_to_its_end_closes_its_connection(client) -> None:
    async with ScriptedUpstream(answer(b"x" * 1_000_000)) as upstream:
        response = await client.request(upstream.address, "GET", "/", ())
        await response.read_chunk()
        response.release()
        await get(client, upstream)
        assert upstream.connections == 2


async def test_a_connection_paused_by_an_unread_body_is_resumed_when_pooled(client) -> None:
    """A whole body past the buffer's high-water mark pauses reading; the next exchange must still be heard."""
    size = BODY_HIGH_WATER + 56       # the last bytes cross the mark: complete, and paused
    async with ScriptedUpstream(answer(b"x" * size)) as upstream:
        response = await client.request(upstream.address, "GET", "/", ())
        for _ in range(200):
            if response.complete:
                break
            await asyncio.sleep(0.01)
        assert response.complete
        response.release()                  # complete, never read: the connection is reusable
        assert (await get(client, upstream))[2] == b"x" * size
        assert upstream.connections == 1


async def test_connections_are_capped_and_waiters_get_a_released_one() -> None:
    """max_conns per address (in use or idle); `queue` requests wait; any more fail at once."""
    client = Http1Client(connect_timeout=1.0, read_timeout=2.0, max_conns=1, queue=1)
    try:
        async with ScriptedUpstream(answer(b"ok")) as upstream:
            first = await client.request(upstream.address, "GET", "/1", ())       # holds the one connection
            waiting = asyncio.create_task(get(client, upstream, "/2"))
            await asyncio.sleep(0.05)
            assert client.stats() == [(upstream.address, 1, 0, 1)]
            with pytest.raises(UpstreamIOError) as caught:
                await get(client, upstream, "/3")
            assert caught.value.error == "connection_limit_reached"
            await first.read()
            first.release()                   # handed straight to the waiter
            assert (await waiting)[2] == b"ok"
            assert upstream.connections == 1
            assert client.stats() == [(upstream.address, 0, 1, 0)]
    finally:
        await client.close()


async def test_a_queued_request_gives_up_at_its_deadline() -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=5.0, max_conns=1, queue=4)
    try:
        async with ScriptedUpstream(answer(b"ok")) as upstream:
            held = await client.request(upstream.address, "GET", "/held", ())
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(UpstreamIOError) as caught:
                await client.request(upstream.address, "GET", "/late", (), deadline=started + 0.3)
            assert caught.value.error == "connection_limit_reached"
            assert 0.25 < loop.time() - started < 1.0
            assert client.stats() == [(upstream.address, 1, 0, 0)]      # the waiter left the queue
            held.release()
    finally:
        await client.close()


async def test_a_closed_connection_frees_its_slot(client) -> None:
    async with ScriptedUpstream(answer(b"ok"), close_after=1) as upstream:
        for _ in range(3):
            assert (await get(client, upstream))[2] == b"ok"
            await asyncio.sleep(0.05)
        assert client.stats() in ([], [(upstream.address, 0, 0, 0)])


# ------------------------------------------------------------------- errors


async def test_refused(client) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))          # bound, never listening: refused
        address = Address("http", "127.0.0.1", sock.getsockname()[1])
        with pytest.raises(UpstreamIOError) as caught:
            await client.request(address, "GET", "/", ())
    assert caught.value.error == "connection_refused"


@pytest.mark.parametrize("script, error", [
    (lambda h: None, "http_response_timeout"),
    (lambda h: b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 10), "http_response_header_section_size"),
    (lambda h: b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 300 + b"\r\n", "http_response_header_section_size"),
    (lambda h: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "http_protocol_error"),
    (lambda h: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     "http_protocol_error"),
    (lambda h: b"NOT HTTP AT ALL\r\n\r\n", "http_protocol_error"),
    (lambda h: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "http_upgrade_failed"),
])
async def test_bad_responses_are_errors_with_their_rfc_9209_type(client, script, error) -> None:
    async with ScriptedUpstream(script) as upstream:
        with pytest.raises(UpstreamIOError) as caught:
            await get(client, upstream)
    assert caught.value.error == error, caught.value


@pytest.mark.parametrize("script, error", [
    (answer(b"", "Content-Length: 10", extra=b"short"), "http_response_incomplete"),
    (answer(b"", "Transfer-Encoding: chunked", extra=b"5\r\nhello\r\n"), "http_response_incomplete"),
])
async def test_a_body_cut_short_is_an_error_not_a_short_body(script, error) -> None:
    client = Http1Client(connect_timeout=1.0, read_timeout=1.0)
    try:
        async with ScriptedUpstream(script, close_after=1) as upstream:
            with pytest.raises(UpstreamIOError) as caught:
                await get(client, upstream)
        assert caught.value.error == error
    finally:
        await client.close()


async def test_a_stalled_body_times_out(client) -> None:
    async with ScriptedUpstream(answer(b"", "Content-Length: 10", extra=b"short")) as upstream:
        with pytest.raises(UpstreamIOError) as caught:
            await get(client, upstream)
    assert caught.value.error == "connection_read_timeout"


# ------------------------------------------------------------- request side


async def body(*chunks: bytes):
    for chunk in chunks:
        yield chunk


async def test_request_bodies_are_framed(client) -> None:
    async with ScriptedUpstream(answer(b"ok")) as upstream:
        await get(client, upstream, method="POST", body=body(b"abc", b"", b"def"))
        response = await client.request(upstream.address, "PUT", "/",
                                        [("Host", "h"), ("Content-Length", "6")], body(b"abc", b"def"))
        await response.read()
        response.release()
    chunked, sized = upstream.requests
    assert b"Transfer-Encoding: chunked\r\n" in chunked and chunked.endswith(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n")
    assert b"Transfer-Encoding" not in sized and sized.endswith(b"\r\n\r\nabcdef")


async def test_host_is_added_when_absent(client) -> None:
    async with ScriptedUpstream(answer(b"ok")) as upstream:
        response = await client.request(upstream.address, "GET", "/p?q", [("X-A", "1")])
        response.release()
    assert upstream.requests[0].startswith(
        f"GET /p?q HTTP/1.1\r\nHost: 127.0.0.1:{upstream.address.port}\r\nX-A: 1\r\n\r\n".encode())


# ---------------------------------------------------------- through a node


EDGE = "http://127.0.38.32:8080"


async def test_an_edge_serves_and_stores_a_response_followed_by_excess_bytes(tmp_path) -> None:
    """Issue 9 item 8: the whole response was a 502 before; now it is served, stored and counted."""
    async with ScriptedUpstream(answer(b"hello", "Cache-Control: max-age=60", extra=b"JUNK")) as upstream:
        node = single_edge(tmp_path, "127.0.38.32", f"""
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.0.1:{upstream.address.port}"
""")
        try:
            path = f"/excess-{uuid.uuid4().hex}"
            async with aiohttp.ClientSession() as http:
                for expected in ("MISS", "HIT"):
                    async with http.get(EDGE + path, headers={"Host": "www.example.com"}) as r:
                        assert (r.status, await r.read(), r.headers["X-Cache"]) == (200, b"hello", expected)
            assert len(upstream.requests) == 1
            metrics = await asyncio.to_thread(node.metrics)
            assert 'edge_upstream_excess_body_total{upstream="origin"} 1.0' in metrics
        finally:
            node.stop()
