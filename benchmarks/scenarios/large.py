"""A large object through the L1, on a miss and then on a hit: MB/s and peak RSS.

curl (pinned to the client CPU) downloads the object to /dev/null.  The
node's peak RSS comes from the kernel (VmHWM), reset to the current RSS
just before each pass, so "growth" is exactly what that pass added at its
worst moment.  nginx does the same two passes for the throughput ratio.

A third pass, for our L1 only, is a hit read by a slow client: curl
``--limit-rate 10M`` for a few seconds (``--max-time``; it reads some tens
of MiB of the object and hangs up).  A node that does not wait for the
client would buffer the object in memory; the pass's peak RSS growth shows it.
"""

from __future__ import annotations

import shlex
import uuid
from dataclasses import dataclass

from benchmarks import layout, procs, report, targets
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow
from benchmarks.origin_count import OriginCounter
from benchmarks.procs import Started
from benchmarks.servers import NGINX, HttpTarget

CURL_FORMAT = "%{http_code} %{size_download} %{speed_download} %{time_total}"
CURL_TIMED_OUT = 28         # curl's exit status when --max-time ends the transfer
SLOW = "hit, slow client"   # the slow pass's kind


@dataclass(frozen=True)
class Pass:
    kind: str               # "miss", "hit" or SLOW
    status: int
    bytes: int
    bytes_per_s: float
    seconds: float
    rss_before: int
    rss_peak: int
    origin_requests: int
    client_busy: float

    @property
    def rss_growth(self) -> int:
        return max(0, self.rss_peak - self.rss_before)


@dataclass(frozen=True)
class LargeResult:
    target: HttpTarget
    passes: list[Pass]
    measured_rss: bool      # only for our node (nginx's worker is not ours to read)

    def get(self, kind: str) -> Pass | None:
        return next((p for p in self.passes if p.kind == kind), None)


def download(bench: Bench, target: HttpTarget, path: str, timeout_s: float,
             limit_rate: int | None = None) -> tuple[int, int, float, float, float]:
    """(status, bytes, bytes/s, seconds, client CPU busy); with a rate limit, ``timeout_s`` ends it."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-H", f"Host: {target.host}", "-w", CURL_FORMAT,
            "--max-time", f"{timeout_s:g}"]
    if limit_rate is not None:
        argv += ["--limit-rate", str(limit_rate)]
    argv.append(target.url(path))
    bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
    with CpuWindow() as window:
        completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=timeout_s + 10)
    stopped_by_us = limit_rate is not None and completed.returncode == CURL_TIMED_OUT
    if completed.returncode != 0 and not stopped_by_us:
        raise RuntimeError(f"curl {target.label} failed: {completed.stderr.strip()}")
    status, size, speed, seconds = completed.stdout.split()
    return int(status), int(size), float(speed), float(seconds), window.of(layout.CLIENT_CPU).busy


def _pass(bench: Bench, target: HttpTarget, node: Started | None, path: str, counter: OriginCounter,
          kind: str, timeout_s: float, limit_rate: int | None = None) -> Pass:
    rss_before = 0
    if node is not None:
        procs.reset_peak_rss(node.pid)
        rss_before, _ = procs.rss_bytes(node.pid)
    status, got, speed, seconds, client_busy = download(bench, target, path, timeout_s, limit_rate)
    rss_peak = procs.rss_bytes(node.pid)[1] if node is not None else 0
    origin_requests = counter.take()
    one = Pass(kind, status, got, speed, seconds, rss_before, rss_peak, origin_requests, client_busy)
    bench.log(f"large {target.label} {kind}: {got / 2**20:.0f} MiB at {speed / 1e6:.0f} MB/s, "
              f"RSS growth {one.rss_growth / 2**20:.1f} MiB, origin requests {origin_requests}")
    return one


def measure(bench: Bench, target: HttpTarget, node: Started | None, slow_client: bool = False) -> LargeResult:
    size = bench.settings.large_bytes
    path = f"/gen/large-{target.tag}-{uuid.uuid4().hex[:8]}?size={size}&cc=max-age=86400"
    counter = OriginCounter(path, target.host)
    passes = []
    for kind in ("miss", "hit"):
        one = _pass(bench, target, node, path, counter, kind, timeout_s=600)
        passes.append(one)
        if one.status != 200 or one.bytes != size:
            bench.problem(f"large {target.label} {kind}: status {one.status}, {one.bytes} of {size} bytes")
        if kind == "hit" and one.origin_requests:
            bench.problem(f"large {target.label} hit: {one.origin_requests} origin requests")
    if slow_client:
        one = _pass(bench, target, node, path, counter, SLOW, timeout_s=targets.SLOW_CLIENT_S,
                    limit_rate=targets.SLOW_CLIENT_RATE)
        passes.append(one)
        # It must have read for the whole time at about the rate: a short read proves nothing.
        expected = min(size, targets.SLOW_CLIENT_RATE * targets.SLOW_CLIENT_S)
        if one.status != 200 or one.bytes < 0.5 * expected:
            bench.problem(f"large {target.label} {SLOW}: status {one.status}, {one.bytes} bytes "
                          f"(expected about {expected:.0f})")
        if one.origin_requests:
            bench.problem(f"large {target.label} {SLOW}: {one.origin_requests} origin requests")
    return LargeResult(target, passes, node is not None)


def table(results: list[LargeResult], size: int, reference: HttpTarget = NGINX) -> report.Table:
    out = report.Table(f"Large object ({targets.large_label(size)}) through the L1: miss, hit, and a hit "
                       f"read at {targets.SLOW_CLIENT_RATE // 2**20} MiB/s",
                       ["server", "pass", "MB", "MB/s", "vs nginx", "peak RSS growth MiB", "origin reqs",
                        "client CPU", "note"])
    ref = {p.kind: p.bytes_per_s for r in results if r.target == reference for p in r.passes}
    for result in results:
        for one in result.passes:
            notes = []
            if one.client_busy > 0.9 and one.kind != SLOW:      # the slow client is slow by design
                notes.append("client-limited")
            if result.measured_rss and one.rss_growth >= targets.RSS_GROWTH_BYTES:
                notes.append(f"RSS over {targets.RSS_GROWTH_BYTES // 2**20} MiB target")
            ref_speed = ref.get(one.kind, 0.0) if one.kind != SLOW else 0.0
            if (result.measured_rss and one.kind == "hit" and ref_speed
                    and one.bytes_per_s < targets.LARGE_HIT_RATIO * ref_speed):
                notes.append(f"below target (>= {targets.LARGE_HIT_RATIO:.1f} x nginx)")
            out.add(result.target.label, one.kind, f"{one.bytes / 1e6:,.0f}", f"{one.bytes_per_s / 1e6:,.0f}",
                    report.ratio(one.bytes_per_s, ref_speed) if ref_speed else "-",
                    report.mib(one.rss_growth) if result.measured_rss else "-",
                    one.origin_requests, report.percent(one.client_busy), ", ".join(notes))
    out.notes.append("Peak RSS growth: the L1 process's VmHWM (reset before each pass) minus its RSS "
                     f"before the pass. Targets: under {targets.RSS_GROWTH_BYTES // 2**20} MiB in every pass; "
                     f"hit MB/s at least {targets.LARGE_HIT_RATIO:.1f} x nginx's.")
    out.notes.append(f"{SLOW}: curl --limit-rate {targets.SLOW_CLIENT_RATE // 2**20}M --max-time "
                     f"{targets.SLOW_CLIENT_S:g} on the cached object; it hangs up after that (curl's "
                     "timeout is expected), having read the first tens of MB.")
    return out


def verdicts(ours: LargeResult, ref: LargeResult | None) -> list[targets.Verdict]:
    out = []
    hit, ref_hit = ours.get("hit"), ref.get("hit") if ref else None
    if hit is not None:
        out.append(targets.at_least("large-hit", hit.bytes_per_s, ref_hit.bytes_per_s if ref_hit else 0.0,
                                    targets.LARGE_HIT_RATIO,
                                    "nginx client-limited: ratio is an upper bound"
                                    if ref_hit and ref_hit.client_busy > 0.9 else ""))
    full = [p for p in ours.passes if p.kind != SLOW]
    if full:
        worst = max(full, key=lambda p: p.rss_growth)
        out.append(targets.below_bytes("large-rss", worst.rss_growth, note=f"worst pass: {worst.kind}"))
    slow = ours.get(SLOW)
    if slow is not None:
        out.append(targets.below_bytes("large-slow-rss", slow.rss_growth,
                                       note=f"read {slow.bytes / 1e6:.0f} MB in {slow.seconds:.1f} s"))
    return out
