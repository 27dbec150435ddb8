"""A cache node's own admin endpoints: purge (by URL, prefix or tag; hard or soft) and inspect.

``POST /purge?url=URL | prefix=URL | tag=TAG [&soft=1]`` needs the admin
token; ``GET /inspect?url=URL`` is a read, like ``/status``.  URLs are
``http://HOST/PATH?QUERY`` with a Host one of the sites serves; they map to
cache keys exactly as requests do, so ``prefix=http://www.example.com/img/``
covers every object of that Host whose target starts with ``/img/``.
Errors are JSON ``{"error": ...}`` with a 4xx (503 when the ban list is full).
"""

from __future__ import annotations

from aiohttp import web

from edge import admin
from edge.bans import BanListFull
from edge.cachekey import NotServed, cache_key, key_prefix, normalise_target, split_url
from edge.config import Site, Topology
from edge.inspection import describe
from edge.proxy import CacheNode
from edge.surrogate import MAX_TAG_LENGTH, valid_tag

PURGE_KINDS = ("url", "prefix", "tag")
TRUE, FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off", ""})


class BadInput(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _split_url(topology: Topology, url: str) -> tuple[Site, str, str]:
    try:
        return split_url(topology, url)
    except NotServed as exc:
        raise BadInput(404, str(exc)) from None
    except ValueError as exc:
        raise BadInput(400, str(exc)) from None


def routes(node: CacheNode, token: str | None) -> list[web.RouteDef]:
    """The routes; the sites are read from `node` on every call (a reload replaces its topology)."""
    async def purge(request: web.Request) -> web.Response:
        try:
            kind, value, soft = _purge_request(node.topology, request)
            result = await node.invalidator.purge(kind, value, soft)
        except BadInput as exc:
            return web.json_response({"node": node.node.name, "error": str(exc)}, status=exc.status)
        except BanListFull as exc:
            return web.json_response({"node": node.node.name, "error": f"too many purges pending: {exc}"},
                                     status=503, headers={"Retry-After": "1"})
        given = request.query[kind]
        return web.json_response({"node": node.node.name, "role": node.node.role, kind: given, **result})

    async def inspect(request: web.Request) -> web.Response:
        url = request.query.get("url", "")
        try:
            site, host, target = _split_url(node.topology, url)
        except BadInput as exc:
            return web.json_response({"node": node.node.name, "error": str(exc)}, status=exc.status)
        return web.json_response(await describe(node, site, cache_key(site, target, host), url))

    return [web.post("/purge", admin.require_token(token, purge)), web.get("/inspect", inspect)]


def _purge_request(topology: Topology, request: web.Request) -> tuple[str, str, bool]:
    """(kind, ban value, soft) of a purge request; BadInput for anything unclear."""
    query = request.query
    given = [kind for kind in PURGE_KINDS if kind in query]
    if len(given) != 1 or len(query.getall(given[0])) != 1:
        raise BadInput(400, "give exactly one of url=, prefix= or tag= (once), e.g. "
                            "/purge?url=http://www.example.com/a.js or /purge?tag=product-42&soft=1")
    kind = given[0]
    soft_text = query.get("soft", "").lower()
    if soft_text not in TRUE | FALSE:
        raise BadInput(400, f"soft must be 1 or 0, got {query['soft']!r}")
    soft = soft_text in TRUE
    value = query[kind]
    if kind == "tag":
        if not valid_tag(value):
            raise BadInput(400, f"a tag is 1 to {MAX_TAG_LENGTH} visible ASCII characters without a comma, "
                                f"got {value[:80]!r}")
        return kind, value, soft
    site, host, target = _split_url(topology, value)
    if kind == "url":
        return kind, cache_key(site, target, host), soft
    return kind, key_prefix(site, host) + normalise_target(target), soft
