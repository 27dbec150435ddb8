"""Python's own ceiling: a bare aiohttp handler returning the same bytes.

No cache, no lookup, no headers beyond what the edge's hit would carry in
spirit: it answers /gen/NAME?size=BYTES with BYTES bytes held in memory.
Whatever the edge does per hit costs time on top of this, so the ratio of
edge to ceiling is how much of Python's budget the hit path spends.

    python -m benchmarks.ceiling HOST PORT
"""

from __future__ import annotations

import sys

from aiohttp import web

_BODIES: dict[int, bytes] = {}
_MAX_SIZE = 16 * 2**20


def _body(size: int) -> bytes:
    body = _BODIES.get(size)
    if body is None:
        body = _BODIES[size] = bytes(i % 251 for i in range(size))
    return body


async def generated(request: web.Request) -> web.Response:
    try:
        size = int(request.query.get("size", "1024"))
    except ValueError:
        raise web.HTTPBadRequest(text="size must be a whole number\n") from None
    if not 0 <= size <= _MAX_SIZE:
        raise web.HTTPBadRequest(text=f"size must be within 0..{_MAX_SIZE}\n")
    return web.Response(body=_body(size), content_type="application/octet-stream",
                        headers={"Cache-Control": "public, max-age=3600"})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/gen/{name}", generated)
    return app


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m benchmarks.ceiling HOST PORT", file=sys.stderr)
        return 2
    host, port = argv[0], int(argv[1])
    if not host.startswith("127."):
        print("ceiling: refusing to bind outside loopback", file=sys.stderr)
        return 2
    web.run_app(make_app(), host=host, port=port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
