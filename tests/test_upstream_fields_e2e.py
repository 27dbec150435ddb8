"""Response fields the test origin cannot send, from a scripted upstream, through a real node.

Invalid HTTP-dates (RFC 9110 5.6.7, 6.6.1; RFC 9111 5.3) and qualified
no-cache/private (RFC 9111 5.2.2.4/5.2.2.7).  The upstream is an aiohttp
server inside the test that answers with the fields it is told to in the
query; the cache node is a real `edge run` process on 127.0.39.31.
"""

from __future__ import annotations

import time
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp import web

from edge.policy import parse_http_date
from tests.cluster import single_edge

EDGE = "http://127.0.39.31:8080"


@pytest.fixture
async def upstream(aiohttp_server):
    hits: dict[str, int] = {}

    async def handler(request: web.Request) -> web.Response:
        hits[request.path] = hits.get(request.path, 0) + 1
        headers = {name: value for name, value in (("Date", request.query.get("date")),
                                                    ("Expires", request.query.get("expires")),
                                                    ("Cache-Control", request.query.get("cc")),
                                                    ("Set-Cookie", request.query.get("cookie")),
                                                    ("X-Token", request.query.get("token"))) if value}
        headers["X-Seen-Host"] = request.headers.get("Host", "")
        return web.Response(text="body", headers=headers)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app, host="127.0.0.1")
    return server, hits


@pytest.fixture
def node(tmp_path, upstream):
    server, _ = upstream
    process = single_edge(tmp_path, "127.0.39.31", f"""
[sites.example]
hosts = ["www.example.com", "static.example.com"]
origin = "http://127.0.0.1:{server.port}"
[sites.tuned]
hosts = ["tuned.example.com"]
origin = "http://127.0.0.1:{server.port}"
ignore_query_params = ["utm_source", "utm_medium"]
set_cookie = "strip"
default_ttl = 300
max_ttl = 600
[sites.nocookies]
hosts = ["plain.example.com"]
origin = "http://127.0.0.1:{server.port}"
ignore_query = true
[sites.aliased]
hosts = ["a.example.com", "b.example.com"]
origin = "http://127.0.0.1:{server.port}"
aliases = true
""")
    try:
        yield process
    finally:
        process.stop()


async def fetch(session: aiohttp.ClientSession, path: str, host: str = "www.example.com",
                **query: str) -> aiohttp.ClientResponse:
    async with session.get(EDGE + path, params=query, headers={"Host": host}) as response:
        await response.read()
        return response


async def test_an_expires_in_another_zone_is_already_expired(node, upstream):
    """email.utils would read this as 2094 and keep the object for seventy years."""
    _, hits = upstream
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            response = await fetch(session, "/utc-expires", expires="Sun, 06 Nov 2094 08:49:37 UTC")
            assert response.headers["X-Cache"] == "MISS"
    assert hits["/utc-expires"] == 2


async def test_a_valid_expires_is_honoured(node, upstream):
    _, hits = upstream
    expires = formatdate(time.time() + 600, usegmt=True)
    async with aiohttp.ClientSession() as session:
        statuses = [(await fetch(session, "/valid-expires", expires=expires)).headers["X-Cache"] for _ in range(2)]
    assert statuses == ["MISS", "HIT"] and hits["/valid-expires"] == 1


async def test_an_invalid_date_is_replaced_by_the_time_received(node, upstream):
    async with aiohttp.ClientSession() as session:
        before = time.time()
        response = await fetch(session, "/bad-date", date="Sun, 06 Nov 94 08:49:37 GMT")
        after = time.time()
    (date,) = response.headers.getall("Date")
    received = parse_http_date(date)
    assert received is not None and before - 1 <= received <= after + 1


async def test_qualified_private_and_no_cache_store_the_response_without_those_fields(node, upstream):
    _, hits = upstream
    async with aiohttp.ClientSession() as session:
        query = {"cc": 'max-age=60, private="Set-Cookie", no-cache="X-Token"', "cookie": "id=alice", "token": "t1"}
        first = await fetch(session, "/qualified", **query)
        second = await fetch(session, "/qualified", **query)
    assert (first.headers["X-Cache"], first.headers["Set-Cookie"], first.headers["X-Token"]) == ("MISS", "id=alice", "t1")
    assert second.headers["X-Cache"] == "HIT" and hits["/qualified"] == 1
    assert "Set-Cookie" not in second.headers and "X-Token" not in second.headers


async def test_a_site_keys_objects_on_host_unless_its_hosts_are_aliases(node, upstream):
    """Never a response for a Host it was not fetched for; aliases share, and the origin sees one Host."""
    _, hits = upstream
    async with aiohttp.ClientSession() as session:
        www = await fetch(session, "/per-host", cc="max-age=60")
        other = await fetch(session, "/per-host", host="WWW.EXAMPLE.COM:8080", cc="max-age=60")
        a = await fetch(session, "/shared", host="a.example.com", cc="max-age=60")
        b = await fetch(session, "/shared", host="b.example.com", cc="max-age=60")
    assert (www.headers["X-Cache"], other.headers["X-Cache"]) == ("MISS", "HIT")    # same host, normalised
    assert (a.headers["X-Cache"], b.headers["X-Cache"]) == ("MISS", "HIT") and hits["/shared"] == 1
    assert a.headers["X-Seen-Host"] == "a.example.com"


async def test_hosts_that_are_not_aliases_never_share_an_object(node, upstream, tmp_path):
    _, hits = upstream
    async with aiohttp.ClientSession() as session:
        first = await fetch(session, "/apart", host="www.example.com", cc="max-age=60")
        second = await fetch(session, "/apart", host="static.example.com", cc="max-age=60")
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "MISS") and hits["/apart"] == 2
    assert second.headers["X-Seen-Host"] == "static.example.com"


async def test_a_sites_ignored_query_parameters_are_not_in_the_key(node, upstream):
    _, hits = upstream
    async with aiohttp.ClientSession() as session:
        first = await fetch(session, "/campaign", host="tuned.example.com", cc="max-age=60", utm_source="mail")
        second = await fetch(session, "/campaign", host="tuned.example.com", cc="max-age=60", utm_source="ad",
                             utm_medium="x")
        other = await fetch(session, "/campaign", host="tuned.example.com", cc="max-age=60", page="2")
        bare = await fetch(session, "/whole", host="plain.example.com", cc="max-age=60", a="1")
        bare2 = await fetch(session, "/whole", host="plain.example.com", cc="max-age=60", a="2")
    assert (first.headers["X-Cache"], second.headers["X-Cache"], other.headers["X-Cache"]) == ("MISS", "HIT", "MISS")
    assert hits["/campaign"] == 2
    assert (bare.headers["X-Cache"], bare2.headers["X-Cache"]) == ("MISS", "HIT") and hits["/whole"] == 1


async def test_set_cookie_strip_stores_the_response_without_it(node, upstream):
    _, hits = upstream
    async with aiohttp.ClientSession() as session:
        first = await fetch(session, "/cookie", host="tuned.example.com", cc="max-age=60", cookie="id=bob")
        second = await fetch(session, "/cookie", host="tuned.example.com", cc="max-age=60", cookie="id=bob")
        kept_out = await fetch(session, "/cookie", cc="max-age=60", cookie="id=bob")        # site default: never
        again = await fetch(session, "/cookie", cc="max-age=60", cookie="id=bob")
    assert (first.headers["X-Cache"], first.headers["Set-Cookie"]) == ("MISS", "id=bob")
    assert second.headers["X-Cache"] == "HIT" and "Set-Cookie" not in second.headers
    assert (kept_out.headers["X-Cache"], again.headers["X-Cache"]) == ("MISS", "MISS")


async def test_site_default_ttl_and_max_ttl(node, upstream):
    """nginx proxy_cache_valid: a bare 200 is kept default_ttl; any lifetime is capped at max_ttl."""
    _, hits = upstream
    async with aiohttp.ClientSession() as session:
        bare = [await fetch(session, "/bare", host="tuned.example.com") for _ in range(2)]
        long = [await fetch(session, "/long", host="tuned.example.com", cc="max-age=86400") for _ in range(2)]
        elsewhere = [await fetch(session, "/bare-www") for _ in range(2)]          # no defaults on that site
    assert [r.headers["X-Cache"] for r in bare] == ["MISS", "HIT"] and hits["/bare"] == 1
    assert "ttl=299" in bare[1].headers["Cache-Status"] or "ttl=300" in bare[1].headers["Cache-Status"]
    assert [r.headers["X-Cache"] for r in long] == ["MISS", "HIT"]
    assert "ttl=599" in long[1].headers["Cache-Status"] or "ttl=600" in long[1].headers["Cache-Status"]
    assert [r.headers["X-Cache"] for r in elsewhere] == ["MISS", "MISS"]
