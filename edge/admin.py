"""The admin listener: metrics, health and status, separate from traffic.

Every process (origin, cache node, DNS scheduler) serves one of these on its
own admin address.  Who may use it is the listener's optional allow list of
client networks (`admin_allow`, nginx's ``allow``; 403 for anyone else) and,
for mutating endpoints (purge), the admin token as well.  ``/healthz`` is
always open: the DNS scheduler, the L1s' parent probes and ``edge up`` call
it from node addresses, and an allow list that forgot one of them would take
healthy nodes out of service.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from edge.config import Network

log = logging.getLogger("edge.admin")

HealthProbe = Callable[[], dict[str, Any]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/healthz"})


def make_admin_app(registry: CollectorRegistry, health: HealthProbe,
                   routes: list[web.RouteDef] | None = None,
                   allow: tuple[Network, ...] | None = None) -> web.Application:
    """An admin app serving /metrics from `registry` and /healthz from `health()`.

    `health()` returns a JSON-able dict; a ``"status"`` other than ``"ok"``
    answers 503 so that load balancers and the DNS scheduler take the node out.
    With `allow`, only clients in those networks reach anything but /healthz.
    """
    app = web.Application(middlewares=[allow_list(allow)] if allow is not None else [])

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


def client_allowed(remote: str | None, allow: tuple[Network, ...]) -> bool:
    """Is the peer address `remote` inside one of the `allow` networks?

    An IPv4 client of a listener on an IPv6 socket arrives as ``::ffff:a.b.c.d``
    and is matched as the IPv4 address it is.
    """
    try:
        address = ipaddress.ip_address((remote or "").split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in allow)


def allow_list(allow: tuple[Network, ...]):
    """Middleware: 403 for clients outside `allow`, on every path but the open ones (/healthz)."""
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS or client_allowed(request.remote, allow):
            return await handler(request)
        log.info("admin: refused %s %s from %s (not in admin_allow)", request.method, request.path, request.remote)
        raise web.HTTPForbidden(text="your address may not use this admin listener\n")
    return guard


TOKEN_ENV = "EDGE_ADMIN_TOKEN"
TOKEN_FILE_ENV = "EDGE_ADMIN_TOKEN_FILE"


def load_token(environ: Mapping[str, str] = os.environ, token_file: str | None = None) -> str | None:
    """The admin token: `token_file` (a command-line option), else ``$EDGE_ADMIN_TOKEN``, else the
    file named by ``$EDGE_ADMIN_TOKEN_FILE`` (systemd credentials, Kubernetes secrets); None if none.

    The file holds the token, surrounding whitespace ignored.  It is read once, at
    start-up; a missing or empty file is an error naming it (OSError, as for other files).
    """
    path = token_file or (None if environ.get(TOKEN_ENV) else environ.get(TOKEN_FILE_ENV))
    if not path:
        return environ.get(TOKEN_ENV) or None
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise OSError(f"admin token file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not token:
        raise OSError(f"admin token file {path}: empty")
    return token


def require_token(token: str | None, handler: Handler) -> Handler:
    """Wrap a mutating admin handler: it needs ``Authorization: Bearer <token>``.

    With no token configured the endpoint is disabled (403), never open.  The
    comparison takes the same time wherever the given value first differs
    (``hmac.compare_digest``), so the token cannot be guessed a byte at a time.
    """
    expected = f"Bearer {token}".encode("utf-8", "surrogateescape") if token else b""

    async def guarded(request: web.Request) -> web.StreamResponse:
        if not token:
            raise web.HTTPForbidden(
                text="admin token not configured (set EDGE_ADMIN_TOKEN or EDGE_ADMIN_TOKEN_FILE)\n")
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            raise web.HTTPUnauthorized(text="missing or wrong admin token\n",
                                       headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)
    return guarded
