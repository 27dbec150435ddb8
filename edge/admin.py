"""The admin listener: metrics, health and status, separate from traffic.

Every process (origin, cache node, DNS scheduler) serves one of these on its
own admin address.  Read-only endpoints are open; mutating ones (purge) need
the admin token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

HealthProbe = Callable[[], dict[str, Any]]


def make_admin_app(registry: CollectorRegistry, health: HealthProbe,
                   routes: list[web.RouteDef] | None = None) -> web.Application:
    """An admin app serving /metrics from `registry` and /healthz from `health()`.

    `health()` returns a JSON-able dict; a ``"status"`` other than ``"ok"``
    answers 503 so that load balancers and the DNS scheduler take the node out.
    """
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def healthz(request: web.Request) -> web.Response:
        state = health()
        return web.json_response(state, status=200 if state.get("status") == "ok" else 503)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_routes(routes or [])
    return app


def require_token(token: str | None,
                  handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    """Wrap a mutating admin handler: it needs ``Authorization: Bearer <token>``.

    With no token configured the endpoint is disabled (403), never open.
    """
    async def guarded(request: web.Request) -> web.StreamResponse:
        if not token:
            raise web.HTTPForbidden(text="admin token not configured (set EDGE_ADMIN_TOKEN)\n")
        if request.headers.get("Authorization", "") != f"Bearer {token}":
            raise web.HTTPUnauthorized(text="missing or wrong admin token\n",
                                       headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return guarded
