"""Calls to the admin listeners of the nodes, each answer tagged with the node it came from."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from edge.config import Address


@dataclass
class Answer:
    node: str
    address: str
    ok: bool
    status: int | None          # None: no HTTP answer at all
    data: Any                   # decoded JSON, or the text
    error: str                  # why it failed ("" when ok)


class AdminClient:
    """One HTTP session for a command's admin calls; every call carries the token when there is one."""

    def __init__(self, token: str | None, timeout: float = 10.0):
        self.token = token
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, node: str, address: Address, method: str, path: str,
                   params: dict[str, str] | None = None) -> Answer:
        assert self._session is not None, "use AdminClient in an async with block"
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        where = str(address)
        try:
            async with self._session.request(method, f"{address.url}{path}", params=params,
                                             headers=headers) as response:
                text = await response.text(errors="replace")
                status = response.status
        except asyncio.TimeoutError:
            return Answer(node, where, False, None, None, f"no answer within {self.timeout:g}s")
        except (aiohttp.ClientError, OSError) as exc:
            return Answer(node, where, False, None, None, f"cannot reach it: {_reason(exc)}")
        data: Any = text
        if text[:1] in "{[":
            try:
                data = json.loads(text)
            except ValueError:
                pass
        if 200 <= status < 300:
            return Answer(node, where, True, status, data, "")
        if isinstance(data, dict) and data.get("error"):
            detail = str(data["error"])
        else:
            lines = str(data).strip().splitlines()
            detail = lines[0] if lines else ""
        return Answer(node, where, False, status, data, f"HTTP {status}: {detail}" if detail else f"HTTP {status}")


def _reason(exc: BaseException) -> str:
    """The useful part of a client error: 'Connection refused', not the whole repr."""
    os_error = getattr(exc, "os_error", exc if isinstance(exc, OSError) else None)
    if os_error is not None and os_error.errno:
        return os.strerror(os_error.errno)
    return str(exc) or type(exc).__name__
