"""A large object through the L1, on a miss and then on a hit: MB/s and peak RSS.

curl (pinned to the client CPU) downloads the object to /dev/null.  The
node's peak RSS comes from the kernel (VmHWM), reset to the current RSS
just before each pass, so "growth" is exactly what that pass added at its
worst moment.  nginx does the same two passes for the throughput ratio.
"""

from __future__ import annotations

import shlex
import uuid
from dataclasses import dataclass

from benchmarks import layout, procs, report
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow
from benchmarks.origin_count import OriginCounter
from benchmarks.procs import Started
from benchmarks.servers import HttpTarget

RSS_TARGET_BYTES = 64 * 2**20
HIT_TARGET_RATIO = 0.8      # hit throughput within 20% of nginx's
CURL_FORMAT = "%{http_code} %{size_download} %{speed_download} %{time_total}"


@dataclass(frozen=True)
class Pass:
    kind: str               # "miss" or "hit"
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


def download(bench: Bench, target: HttpTarget, path: str, timeout_s: float) -> tuple[int, int, float, float, float]:
    argv = ["curl", "-sS", "-o", "/dev/null", "-H", f"Host: {target.host}", "-w", CURL_FORMAT,
            "--max-time", f"{timeout_s:g}", target.url(path)]
    bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
    with CpuWindow() as window:
        completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=timeout_s + 10)
    if completed.returncode != 0:
        raise RuntimeError(f"curl {target.label} failed: {completed.stderr.strip()}")
    status, size, speed, seconds = completed.stdout.split()
    return int(status), int(size), float(speed), float(seconds), window.of(layout.CLIENT_CPU).busy


def measure(bench: Bench, target: HttpTarget, node: Started | None) -> LargeResult:
    size = bench.settings.large_bytes
    tag = target.label.split()[0].lower()
    path = f"/gen/large-{tag}-{uuid.uuid4().hex[:8]}?size={size}&cc=max-age=86400"
    counter = OriginCounter(path, target.host)
    passes = []
    for kind in ("miss", "hit"):
        rss_before = 0
        if node is not None:
            procs.reset_peak_rss(node.pid)
            rss_before, _ = procs.rss_bytes(node.pid)
        status, got, speed, seconds, client_busy = download(bench, target, path, timeout_s=600)
        rss_peak = procs.rss_bytes(node.pid)[1] if node is not None else 0
        origin_requests = counter.take()
        one = Pass(kind, status, got, speed, seconds, rss_before, rss_peak, origin_requests, client_busy)
        passes.append(one)
        bench.log(f"large {target.label} {kind}: {got / 2**20:.0f} MiB at {speed / 1e6:.0f} MB/s, "
                  f"RSS growth {one.rss_growth / 2**20:.1f} MiB, origin requests {origin_requests}")
        if status != 200 or got != size:
            bench.problem(f"large {target.label} {kind}: status {status}, {got} of {size} bytes")
        if kind == "hit" and origin_requests:
            bench.problem(f"large {target.label} hit: {origin_requests} origin requests")
    return LargeResult(target, passes, node is not None)


def table(results: list[LargeResult], size: int, reference_label: str = "nginx") -> report.Table:
    out = report.Table(f"Large object ({size / 2**30:g} GiB) through the L1, miss then hit",
                       ["server", "pass", "MB/s", "vs nginx", "peak RSS growth MiB", "origin reqs",
                        "client CPU", "note"])
    reference = {p.kind: p.bytes_per_s for r in results if r.target.label == reference_label for p in r.passes}
    for result in results:
        for one in result.passes:
            notes = []
            if one.client_busy > 0.9:
                notes.append("client-limited")
            if result.measured_rss and one.rss_growth >= RSS_TARGET_BYTES:
                notes.append("RSS over 64 MiB target")
            ref = reference.get(one.kind, 0.0)
            if result.measured_rss and one.kind == "hit" and ref and one.bytes_per_s < HIT_TARGET_RATIO * ref:
                notes.append(f"below target (>= {HIT_TARGET_RATIO} x nginx)")
            out.add(result.target.label, one.kind, f"{one.bytes_per_s / 1e6:,.0f}",
                    report.ratio(one.bytes_per_s, reference.get(one.kind, 0.0)),
                    report.mib(one.rss_growth) if result.measured_rss else "-",
                    one.origin_requests, report.percent(one.client_busy), ", ".join(notes))
    out.notes.append("Peak RSS growth: the L1 process's VmHWM (reset before each pass) minus its RSS "
                     "before the pass. Targets: under 64 MiB; hit MB/s within 20% of nginx.")
    return out
