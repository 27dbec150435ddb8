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
MAX_SIZE = 16 * 2**20


def body(size: int) -> bytes:
    """The body both ceilings answer for a size, made once per size."""
    made = _BODIES.get(size)
    if made is None:
        made = _BODIES[size] = bytes(i % 251 for i in range(size))
    return made


def loopback_address(argv: list[str], prog: str) -> tuple[str, int] | None:
    """HOST PORT from the command line, loopback only; None (after saying why) otherwise."""
    if len(argv) != 2:
        print(f"usage: python -m {prog} HOST PORT", file=sys.stderr)
        return None
    if not argv[0].startswith("127."):
        print("ceiling: refusing to bind outside loopback", file=sys.stderr)
        return None
    return argv[0], int(argv[1])


async def generated(request: web.Request) -> web.Response:
    try:
        size = int(request.query.get("size", "1024"))
    except ValueError:
        raise web.HTTPBadRequest(text="size must be a whole number\n") from None
    if not 0 <= size <= MAX_SIZE:
        raise web.HTTPBadRequest(text=f"size must be within 0..{MAX_SIZE}\n")
    return web.Response(body=body(size), content_type="application/octet-stream",
                        headers={"Cache-Control": "public, max-age=3600"})


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/gen/{name}", generated)
    return app


def main(argv: list[str]) -> int:
    address = loopback_address(argv, "benchmarks.ceiling")
    if address is None:
        return 2
    web.run_app(make_app(), host=address[0], port=address[1], access_log=None, print=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
