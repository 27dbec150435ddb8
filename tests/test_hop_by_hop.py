"""Hop-by-hop fields are stripped both ways (RFC 9110 7.6.1), seen from a real upstream.

The site's origin here is an aiohttp server inside the test that records
what it receives and answers with hop-by-hop fields of its own; the cache
node between them is a real `edge run` process on 127.0.38.31.
"""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from tests.cluster import single_edge

HOP_BY_HOP_SENT = {
    "Connection": "keep-alive, X-Hop-Token",
    "X-Hop-Token": "must not pass",
    "Keep-Alive": "timeout=5",
    "TE": "trailers",
    "Proxy-Authorization": "Basic c2VjcmV0",
    "Upgrade": "websocket",
}


@pytest.fixture
async def upstream(aiohttp_server):
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(text="ok", headers={
            "Cache-Control": "no-store",
            "Connection": "X-Upstream-Hop",
            "X-Upstream-Hop": "must not pass",
            "Keep-Alive": "timeout=9, max=100",
            "Proxy-Authenticate": "Basic",
            "X-End-To-End": "kept",
        })

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return server, seen


@pytest.fixture
def node(tmp_path, upstream):
    server, _ = upstream
    process = single_edge(tmp_path, "127.0.38.31", f"""
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.0.1:{server.port}"
""")
    try:
        yield process
    finally:
        process.stop()


async def test_hop_by_hop_fields_are_stripped_both_ways(node, upstream):
    _, seen = upstream
    async with aiohttp.ClientSession() as session:
        async with session.get("http://127.0.38.31:8080/page", headers={
                "Host": "www.example.com", "X-End-To-End": "kept", **HOP_BY_HOP_SENT}) as response:
            assert response.status == 200
            received_by_client = {name.lower() for name in response.headers}
    (received,) = seen
    lower = {name.lower(): value for name, value in received.items()}
    for name in ("x-hop-token", "keep-alive", "te", "proxy-authorization", "upgrade"):
        assert name not in lower, f"{name} reached the upstream"
    assert "x-hop-token" not in lower.get("connection", "").lower()
    assert lower["x-end-to-end"] == "kept"
    assert lower["via"] == "1.1 edge"
    for name in ("x-upstream-hop", "proxy-authenticate", "keep-alive"):
        assert name not in received_by_client, f"{name} reached the client"
    assert "x-end-to-end" in received_by_client
