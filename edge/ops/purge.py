"""``edge purge``: purge URLs, prefixes or tags on every cache node, L2s first, then L1s.

The L2s go first so that an L1 purged after them can only refill from an
L2 that no longer holds the old copy.  Within a tier the nodes are called at
once.  If an L2 fails, the L1s are purged anyway (each still drops its own
copy) and the command says that the failed L2 may hand the old copy back
to them until it is purged too.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from edge.cachekey import split_url
from edge.config import Node, Topology
from edge.ops.client import AdminClient, Answer
from edge.ops.table import render
from edge.surrogate import MAX_TAG_LENGTH, valid_tag


def check_values(topology: Topology, kind: str, values: list[str]) -> str | None:
    """What is wrong with the values given, before anything is sent; None when all are usable."""
    for value in values:
        if kind == "tag":
            if not valid_tag(value):
                return f"not a tag: {value[:80]!r} (1 to {MAX_TAG_LENGTH} visible ASCII characters, no comma)"
        else:
            try:
                split_url(topology, value)
            except ValueError as exc:
                return str(exc)
    return None


async def purge(topology: Topology, kind: str, values: list[str], soft: bool, token: str,
                timeout: float = 10.0, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Purge every value on every cache node; 0 when every node took every purge, else 1."""
    tiers = [topology.by_role("l2"), topology.by_role("l1")]
    answers: list[tuple[Node, str, Answer]] = []
    async with AdminClient(token, timeout) as client:
        for nodes in tiers:
            calls = [(node, value) for node in nodes for value in values]
            done = await asyncio.gather(*(
                client.call(node.name, node.admin, "POST", "/purge", {kind: value, "soft": "1" if soft else "0"})
                for node, value in calls))
            answers += [(node, value, answer) for (node, value), answer in zip(calls, done)]
    rows = [(node.name, node.role, value, "ok" if answer.ok else "FAILED", _detail(answer))
            for node, value, answer in answers]
    out.write(render(("NODE", "ROLE", kind.upper(), "RESULT", "DETAIL"), rows))
    failed = [(node, answer) for node, _, answer in answers if not answer.ok]
    for node, answer in failed:
        err.write(f"edge: purge failed on {node.name} ({answer.address}): {answer.error}\n")
    if any(node.role == "l2" for node, _ in failed) and tiers[1]:
        err.write("edge: the L1s may refill old copies from a failed L2: purge again once it answers\n")
    return 1 if failed else 0


def _detail(answer: Answer) -> str:
    if not answer.ok:
        return answer.error
    data = answer.data if isinstance(answer.data, dict) else {}
    mode = "marked stale" if data.get("soft") else "purged"
    removed = f", {data['removed']} removed now" if data.get("removed") else ""
    bans = data.get("bans") or {}
    return f"{mode}{removed} ({bans.get('live', '?')} bans live)"
