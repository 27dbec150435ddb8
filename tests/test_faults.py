"""Faults between tiers (issue 10 items 2 and 3): an origin outage, a slow origin, a full upstream.

Real processes on 127.0.34.x: origin .10, L2s .21 and .22, L1 .31.  Each
test writes its own topology, since the timeouts and limits are the subject.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import aiohttp
import pytest

from tests.cluster import ADMIN_PORT, TRAFFIC_PORT, Cluster

HOST = {"Host": "www.example.com"}
NET = "127.0.34"


def topology(tmp_path, *, l2: int, l2_lines: str = "", l1_lines: str = "") -> Cluster:
    lines = [f'state_dir = "{tmp_path / "state"}"', "[sites.example]", 'hosts = ["www.example.com"]',
             f'origin = "http://{NET}.10:{TRAFFIC_PORT}"',
             "[nodes.origin]", 'role = "origin"', f'listen = "{NET}.10:{TRAFFIC_PORT}"',
             f'admin = "{NET}.10:{ADMIN_PORT}"']
    for i in range(l2):
        lines += [f"[nodes.l2-{'ab'[i]}]", 'role = "l2"', f'listen = "{NET}.{21 + i}:{TRAFFIC_PORT}"',
                  f'admin = "{NET}.{21 + i}:{ADMIN_PORT}"', l2_lines]
    lines += ["[nodes.l1-1]", 'role = "l1"', f'listen = "{NET}.31:{TRAFFIC_PORT}"', f'admin = "{NET}.31:{ADMIN_PORT}"',
              "parent_fall = 2", "parent_probe_interval = 0.1", l1_lines]
    config = tmp_path / "topology.toml"
    config.write_text("\n".join(lines) + "\n")
    return Cluster(config, "34")


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def get(http, url, headers=None):
    async with http.get(url, headers={**HOST, **(headers or {})}) as r:
        await r.read()
        return r.status, r.headers


def counter(metrics: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in metrics.splitlines():
        match = re.match(rf"{name}(?:{{(.*)}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def test_an_origin_outage_keeps_healthy_parents_in_service(tmp_path, http):
    """Item 2: a parent that reports it could not reach the origin is healthy; its answer is passed on."""
    cluster = topology(tmp_path, l2=2)
    try:
        cluster.start("origin", "l2-a", "l2-b", "l1-1")
        warm = f"/gen/outage-stale-{uuid.uuid4().hex}?cc=max-age=1"
        assert (await get(http, cluster.url("l1-1", warm)))[0] == 200
        cluster.node("origin").stop()
        await asyncio.sleep(1.2)                  # the warm object is stale everywhere now

        for i in range(10):
            status, h = await get(http, cluster.url("l1-1", f"/gen/outage-{i}-{uuid.uuid4().hex}"))
            assert status == 502, (status, dict(h))
            # One parent tried, and it says the origin refused: no entry of the L1's own.
            assert re.fullmatch(r"l2-[ab]; error=connection_refused; .*", h["Proxy-Status"]), h["Proxy-Status"]
        await asyncio.sleep(0.5)                  # several probe rounds
        l1 = cluster.node("l1-1").metrics()
        assert counter(l1, "edge_parent_up") == 2.0, "a parent was marked down for the origin's outage"
        assert counter(l1, "edge_upstream_requests_total", outcome="5xx") == 10
        assert counter(l1, "edge_upstream_requests_total", upstream="origin") == 0     # never went direct
        tried = sum(counter(cluster.node(n).metrics(), "edge_upstream_requests_total", outcome="connection_refused")
                    for n in ("l2-a", "l2-b"))
        assert tried == 10, "a request was tried at more than one parent"

        # Stale served through the outage (the parent's stale copy, or ours when the parent has none).
        status, h = await get(http, cluster.url("l1-1", warm))
        assert status == 200 and "detail=disconnected" in h["Cache-Status"], dict(h)
    finally:
        cluster.stop_all()


async def test_a_slow_origin_costs_one_attempt_not_one_per_candidate(tmp_path, http):
    """Item 3: the L2 gives up on the origin after its timeout and says so; the L1 passes that on
    at once instead of timing out itself and trying the other parent and then the origin."""
    cluster = topology(tmp_path, l2=2, l2_lines="parent_timeout = 1.0", l1_lines="parent_timeout = 1.0")
    try:
        cluster.start("origin", "l2-a", "l2-b", "l1-1")
        started = time.monotonic()
        status, h = await get(http, cluster.url("l1-1", f"/gen/slow-{uuid.uuid4().hex}?delay=5000"))
        elapsed = time.monotonic() - started
        assert status == 504 and "error=http_response_timeout" in h["Proxy-Status"], dict(h)
        assert elapsed < 2.5, f"504 after {elapsed:.1f}s: more than one attempt"
        asked = sum(counter(cluster.node(n).metrics(), "edge_upstream_requests_total", upstream="origin")
                    for n in ("l2-a", "l2-b", "l1-1"))
        assert asked == 1, "the origin was asked more than once"
        assert counter(cluster.node("l1-1").metrics(), "edge_parent_up") == 2.0
    finally:
        cluster.stop_all()


async def test_the_deadline_bounds_all_attempts_of_a_request(tmp_path, http):
    """Item 3: with every parent hung, the client's 504 comes at upstream_deadline, not after
    one parent_timeout per candidate."""
    import socket
    hung = []
    cluster = topology(tmp_path, l2=2, l1_lines="parent_timeout = 2.0\nupstream_deadline = 1.5")
    try:
        for i in range(2):                        # parents that accept and never answer
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((f"{NET}.{21 + i}", TRAFFIC_PORT))
            sock.listen(16)
            hung.append(sock)
        cluster.start("origin", "l1-1")
        started = time.monotonic()
        status, h = await get(http, cluster.url("l1-1", f"/gen/hung-{uuid.uuid4().hex}"))
        elapsed = time.monotonic() - started
        assert status == 504 and "l1-1; error=http_response_timeout" in h["Proxy-Status"], dict(h)
        assert 1.4 < elapsed < 2.5, f"504 after {elapsed:.1f}s"
    finally:
        cluster.stop_all()
        for sock in hung:
            sock.close()


async def test_connections_per_upstream_are_capped_and_the_queue_is_bounded(tmp_path, http):
    """Item 3: beyond upstream_max_conns requests wait; beyond upstream_queue they get 503 at once."""
    cluster = topology(tmp_path, l2=0, l1_lines="upstream_max_conns = 2\nupstream_queue = 3")
    try:
        cluster.start("origin", "l1-1")
        urls = [cluster.url("l1-1", f"/gen/cap-{i}-{uuid.uuid4().hex}?delay=1000&cc=no-store") for i in range(8)]
        tasks = [asyncio.create_task(get(http, url)) for url in urls]
        await asyncio.sleep(0.5)
        metrics = cluster.node("l1-1").metrics()
        assert counter(metrics, "edge_upstream_connections", state="active") == 2
        assert counter(metrics, "edge_upstream_queued") == 3
        started = time.monotonic()
        results = await asyncio.gather(*tasks)
        statuses = sorted(status for status, _ in results)
        assert statuses == [200] * 5 + [503] * 3, statuses
        refused = [h for status, h in results if status == 503]
        assert all("error=connection_limit_reached" in h["Proxy-Status"] for h in refused)
        assert time.monotonic() - started < 3.0          # 2 at a time: 3 rounds of 1 s at most
        assert counter(cluster.node("l1-1").metrics(), "edge_upstream_queued") == 0
    finally:
        cluster.stop_all()


async def test_a_parent_host_that_vanishes_is_left_once_marked_down(tmp_path, http):
    """A parent whose host stops answering without a reset (packets dropped, as when its
    machine dies): its sockets accept and say nothing.  A miss waiting on it is moved on to
    the origin once the probes mark it down, instead of waiting out the upstream deadline
    and failing with 504."""
    import socket
    cluster = topology(tmp_path, l2=1, l1_lines="parent_timeout = 1.0\nupstream_deadline = 15")
    holes = []
    try:
        for port in (TRAFFIC_PORT, ADMIN_PORT):     # l2-a's traffic and admin: the kernel accepts, nobody reads
            hole = socket.socket()
            hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hole.bind((f"{NET}.21", port))
            hole.listen(64)
            holes.append(hole)
        cluster.start("origin", "l1-1")
        started = time.monotonic()
        status, h = await get(http, cluster.url("l1-1", f"/gen/vanished-{uuid.uuid4().hex}?cc=max-age=60"))
        took = time.monotonic() - started
        assert status == 200, dict(h)
        assert took < 8, took           # probes time out after 1 s; two failures mark it down
        l1 = cluster.node("l1-1").metrics()
        assert counter(l1, "edge_upstream_requests_total", upstream="l2-a", outcome="parent_down") == 1
        assert counter(l1, "edge_upstream_requests_total", upstream="origin", outcome="2xx") == 1
    finally:
        cluster.stop_all()
        for hole in holes:
            hole.close()
