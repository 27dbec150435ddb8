"""Request collapsing: many concurrent requests for one cold URL, slow origin.

The client opens every connection first, then sends all requests at once
(t0) and times each complete response from t0, so connection set-up is not
part of the figure.  The origin answers after ``delay`` ms; a cache that
collapses sends one request upstream and answers everyone just after that.
Origin requests are the origin's own per-URL count.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from benchmarks import report, targets
from benchmarks.context import Bench
from benchmarks.origin_count import OriginCounter
from benchmarks.servers import HttpTarget


@dataclass(frozen=True)
class Response:
    status: int
    body_bytes: int
    seconds: float          # from t0 to the last body byte


@dataclass(frozen=True)
class CollapseResult:
    target: HttpTarget
    responses: list[Response]
    origin_requests: int
    delay_ms: int

    @property
    def times_ms(self) -> list[float]:
        return sorted(r.seconds * 1e3 for r in self.responses)

    @property
    def all_ok(self) -> bool:
        return all(200 <= r.status < 300 for r in self.responses)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, int]:
    """(status, body length) of one HTTP/1.1 response with Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status, length


async def fire(host: str, port: int, path: str, host_header: str, clients: int,
               timeout_s: float = 30.0) -> list[Response]:
    """Open ``clients`` connections, then send one request on each at the same moment."""
    connections = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(clients)))
    request = (f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: edge-bench\r\n"
               f"Accept: */*\r\n\r\n").encode("ascii")
    try:
        t0 = time.perf_counter()
        for _, writer in connections:
            writer.write(request)

        async def one(reader: asyncio.StreamReader) -> Response:
            status, length = await _read_response(reader)
            return Response(status, length, time.perf_counter() - t0)

        return list(await asyncio.wait_for(asyncio.gather(*(one(r) for r, _ in connections)), timeout_s))
    finally:
        for _, writer in connections:
            writer.close()


def measure(bench: Bench, targets: list[HttpTarget]) -> list[CollapseResult]:
    settings = bench.settings
    results = []
    for target in targets:
        name = f"collapse-{target.tag}-{uuid.uuid4().hex[:8]}"
        path = f"/gen/{name}?size=1024&delay={settings.collapse_delay_ms}&cc=max-age=86400"
        counter = OriginCounter(path, target.host)
        responses = asyncio.run(fire(target.endpoint.host, target.endpoint.port, path, target.host,
                                     settings.collapse_clients))
        result = CollapseResult(target, responses, counter.take(), settings.collapse_delay_ms)
        times = result.times_ms
        bench.log(f"collapse {target.label}: origin requests {result.origin_requests}, "
                  f"first {times[0]:.0f} ms, median {report.median(times):.0f} ms, last {times[-1]:.0f} ms")
        if not result.all_ok:
            bad = sum(1 for r in responses if not 200 <= r.status < 300)
            bench.problem(f"collapse {target.label}: {bad} responses were not 2xx")
        results.append(result)
    return results


def table(results: list[CollapseResult], clients: int, delay_ms: int) -> report.Table:
    out = report.Table(
        f"Request collapsing ({clients} concurrent requests, one cold URL, origin takes {delay_ms} ms)",
        ["server", "origin requests", "first ms", "median ms", "last ms", "all 2xx", "target met"])
    for result in results:
        times = result.times_ms
        met = verdict(result).met
        out.add(result.target.label, result.origin_requests, report.ms(times[0]),
                report.ms(report.median(times)), report.ms(times[-1]),
                "yes" if result.all_ok else "NO", "yes" if met else "no")
    out.notes.append("nginx's last response at ~500 ms is nginx's own design: requests waiting on "
                     "proxy_cache_lock re-check the cache every 500 ms (a fixed timer), so they are "
                     "served at the first check after the fill.")
    out.notes.append(f"Target: exactly one origin request and the last response within "
                     f"{targets.COLLAPSE_SLACK_MS} ms of the origin's delay ({delay_ms + targets.COLLAPSE_SLACK_MS} "
                     "ms). Times from the moment all requests were sent (connections opened before).")
    return out


def verdict(result: CollapseResult) -> targets.Verdict:
    times = result.times_ms
    return targets.collapse(result.origin_requests, times[-1] if times else float("inf"),
                            result.delay_ms, result.all_ok)
