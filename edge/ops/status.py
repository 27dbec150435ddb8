"""``edge status``: one table for the whole CDN.

For each cache node: its role and health (``/status``), objects and bytes
per tier, request rate and hit ratio (two scrapes of ``/metrics``
``interval`` seconds apart), parents up, live bans, and how the DNS
scheduler sees it (its ``/healthz``).  The origin and the scheduler get a
row too.  Hit ratio: responses served from the cache (``HIT``,
``UPDATING``, ``STALE``) over all cache lookups (those and ``MISS``,
``EXPIRED``, ``REVALIDATED``), between the two scrapes, or since the node
started when nothing came in between (marked ``*``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from edge.config import Topology
from edge.metrics import HIT_STATUSES, LOOKUP_STATUSES
from edge.ops.client import AdminClient, Answer
from edge.ops.table import human_bytes, render

HITS, LOOKUPS = HIT_STATUSES, LOOKUP_STATUSES
HEADER = ("NODE", "ROLE", "HEALTH", "MEMORY", "DISK", "REQ/S", "HIT%", "PARENTS", "BANS", "DNS")


def request_counts(metrics_text: str) -> dict[str, float]:
    """edge_requests_total summed per cache_status (over methods)."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "edge_requests":
            continue
        for sample in family.samples:
            if sample.name == "edge_requests_total":
                status = sample.labels.get("cache_status", "")
                counts[status] = counts.get(status, 0.0) + sample.value
    return counts


def rate_and_ratio(before: dict[str, float], after: dict[str, float],
                   interval: float) -> tuple[float, str]:
    """Requests per second between two scrapes, and the hit ratio as a table cell."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    rate = sum(delta.values()) / interval if interval > 0 else 0.0
    for counts, mark in ((delta, ""), (after, "*")):
        lookups = sum(v for k, v in counts.items() if k in LOOKUPS)
        if lookups > 0:
            hits = sum(v for k, v in counts.items() if k in HITS)
            return rate, f"{100 * hits / lookups:.1f}{mark}"
    return rate, "-"


async def status(topology: Topology, token: str | None, interval: float = 1.0, as_json: bool = False,
                 timeout: float = 5.0, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Print the table; 0 when every node answered healthy, else 1."""
    caches = [*topology.by_role("l2"), *topology.by_role("l1")]
    origins = topology.by_role("origin")
    async with AdminClient(token, timeout) as client:
        def each(nodes, path: str):
            return asyncio.gather(*(client.call(n.name, n.admin, "GET", path) for n in nodes))

        async def scheduler() -> Answer | None:
            return await client.call("dns", topology.dns.admin, "GET", "/healthz") if topology.dns else None

        first, states, origin_health, dns = await asyncio.gather(
            each(caches, "/metrics"), each(caches, "/status"), each(origins, "/healthz"), scheduler())
        await asyncio.sleep(interval)
        second = await each(caches, "/metrics")

    edges = dns.data.get("edges", {}) if dns is not None and dns.ok and isinstance(dns.data, dict) else {}
    rows, records, problems = [], [], []
    for node, state, before, after in zip(caches, states, first, second):
        record: dict[str, Any] = {"node": node.name, "role": node.role}
        if not state.ok:
            problems.append(state)
            rows.append((node.name, node.role, "DOWN", None, None, None, None, None, None, _dns_view(node, edges)))
            records.append({**record, "health": "down", "error": state.error})
            continue
        data = state.data
        health = data.get("status", "?") + (" overloaded" if data.get("overloaded") else "")
        if data.get("status") != "ok":
            problems.append(state)
        tiers = {t["tier"]: t for t in data.get("tiers", [])}
        rate, ratio = (rate_and_ratio(request_counts(before.data), request_counts(after.data), interval)
                       if before.ok and after.ok else (None, "-"))
        parents = data.get("parents") or {}
        down = sorted(name for name, p in parents.items() if not p.get("up"))
        parents_cell = (f"{len(parents) - len(down)}/{len(parents)} up" + (f" ({', '.join(down)} down)" if down else "")
                        if parents else None)
        bans = data.get("bans") or {}
        rows.append((node.name, node.role, health, _tier(tiers.get("memory")), _tier(tiers.get("disk")),
                     f"{rate:.1f}" if rate is not None else None, ratio, parents_cell,
                     bans.get("live"), _dns_view(node, edges)))
        records.append({**record, "health": data.get("status"), "tiers": list(tiers.values()),
                        "requests_per_second": rate, "hit_ratio": ratio, "parents": parents, "bans": bans,
                        "dns": edges.get(node.name)})
    for node, answer in zip(origins, origin_health):
        if not answer.ok:
            problems.append(answer)
        rows.append((node.name, node.role, "ok" if answer.ok else "DOWN") + (None,) * 7)
        records.append({"node": node.name, "role": node.role, "health": "ok" if answer.ok else "down"})
    if topology.dns is not None:
        up = sum(1 for e in edges.values() if e.get("up"))
        if not dns.ok:
            problems.append(dns)
        rows.append(("dns", "dns", "ok" if dns.ok else "DOWN") + (None,) * 6
                    + (f"{up}/{len(edges)} edges up" if dns.ok else None,))
        records.append({"node": "dns", "role": "dns", "health": "ok" if dns.ok else "down", "edges": edges})
    if as_json:
        out.write(json.dumps(records, indent=2) + "\n")
    else:
        out.write(render(HEADER, rows))
    for answer in problems:
        err.write(f"edge: {answer.node} ({answer.address}): {answer.error or 'not healthy'}\n")
    return 1 if problems else 0


def _tier(tier: dict[str, Any] | None) -> str | None:
    if tier is None:
        return None
    return f"{tier['objects']} / {human_bytes(tier['bytes'])}"


def _dns_view(node, edges: dict[str, dict[str, Any]]) -> str | None:
    """How the scheduler sees an L1: up, down or overloaded (only L1s are handed out)."""
    seen = edges.get(node.name)
    if seen is None:
        return None
    if not seen.get("up"):
        return "down"
    return "overloaded" if seen.get("overloaded") else "up"
