"""``edge inspect URL``: what every cache node holds for a URL, as one table (or JSON)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from edge.config import Topology
from edge.ops.client import AdminClient
from edge.ops.table import human_bytes, render, seconds

HEADER = ("NODE", "ROLE", "HELD", "TIER", "VARIANT", "STATE", "AGE", "TTL", "SIZE", "VALIDATORS", "TAGS")


async def inspect(topology: Topology, url: str, token: str | None, as_json: bool = False,
                  timeout: float = 10.0, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Ask every cache node (L2s, then L1s); 0 when all answered, else 1."""
    nodes = [*topology.by_role("l2"), *topology.by_role("l1")]
    async with AdminClient(token, timeout) as client:
        answers = await asyncio.gather(*(client.call(n.name, n.admin, "GET", "/inspect", {"url": url})
                                         for n in nodes))
    if as_json:
        out.write(json.dumps([a.data if a.ok else {"node": a.node, "error": a.error} for a in answers],
                             indent=2) + "\n")
    else:
        rows: list[tuple[Any, ...]] = []
        for node, answer in zip(nodes, answers):
            if not answer.ok:
                rows.append((node.name, node.role, "ERROR", answer.error) + (None,) * (len(HEADER) - 4))
                continue
            record = answer.data
            objects = record.get("objects") or []
            if not objects:
                rows.append((node.name, node.role, "no") + (None,) * (len(HEADER) - 3))
            for obj in objects:
                rows.append(_row(node.name, node.role, obj))
        out.write(render(HEADER, rows))
    failed = [a for a in answers if not a.ok]
    for answer in failed:
        err.write(f"edge: inspect failed on {answer.node} ({answer.address}): {answer.error}\n")
    return 1 if failed else 0


def _row(name: str, role: str, obj: dict[str, Any]) -> tuple[Any, ...]:
    validators = ", ".join(v for v in (obj.get("etag"), obj.get("last_modified")) if v) or None
    return (name, role, "no" if obj.get("state") == "purged" else "yes", "+".join(obj.get("tiers") or []) or None,
            obj.get("variant") or None, obj.get("state"), seconds(obj.get("age")), seconds(obj.get("ttl")),
            human_bytes(obj.get("size") or 0), validators, " ".join(obj.get("tags") or []) or None)
