"""The front's listeners sharing max_connections (an HTTP and an HTTPS one in production), in-process.

A small pipeline answers every request with a fixed body; the clients are
real sockets on 127.0.99.200.
"""

from __future__ import annotations

import asyncio

from edge.config import FrontLimits
from edge.http.accesslog import AccessLog
from edge.http.message import Reply
from edge.http.server import Front

HOST = "127.0.99.200"


class Fixed:
    """A pipeline that answers everything with one short body."""

    def hit_now(self, method, target, host, via):
        return None

    async def handle(self, request):
        return Reply(200, [("Content-Type", "text/plain")], b"ok")

    def done(self, request, reply, sent, duration):
        pass


async def exchange(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    return reader, writer


async def test_two_listeners_at_the_connection_limit_both_accept_again_when_room_is_made():
    """Both accept loops wait for room at once; freeing it must wake both (one shared wait)."""
    front = Front(Fixed(), FrontLimits(max_connections=1), AccessLog("off"))
    await front.start(HOST, 0)
    await front.start(HOST, 0)
    first_port, second_port = (sock.getsockname()[1] for sock, _ in front._listeners)
    try:
        held = [await exchange(first_port)]
        assert b"200 OK" in await asyncio.wait_for(held[0][0].readuntil(b"\r\n\r\n"), 2)
        # The second listener accepts one more before it sees the limit: both now wait for room.
        held.append(await exchange(second_port))
        await asyncio.sleep(0.2)
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.2)
        for port in (first_port, second_port):           # each listener serves again
            reader, writer = await exchange(port)
            try:
                assert b"200 OK" in await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2), port
            finally:
                writer.close()
                await asyncio.sleep(0.2)                  # its slot is free again for the next
    finally:
        await front.drain()
