"""Cache-hit throughput and latency, each server as a ratio to nginx.

1 KiB and 100 KiB objects, warm cache, HTTP/1.1 keep-alive, wrk with one
thread and 50 connections; the server pinned to one CPU and wrk to the
other; rounds in rotated order (round r starts at server r), median req/s
and median p99.  Every run must show zero origin requests for the URL, zero
socket errors and only 2xx; a run that does not is reported as a problem.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks import procs, report, wrk
from benchmarks.context import Bench
from benchmarks.loadrun import LoadRun, LoadRuns, run_wrk
from benchmarks.origin_count import OriginCounter
from benchmarks.servers import OURS, HttpTarget

OBJECT_SIZES = (1024, 100 * 1024)
REFERENCE = "nginx"
TARGET_RATIO = 1.0          # the goal for our L1: at least nginx's hit rate per core
WARMUP_S = 1.0
NOISY_OTHER_LOAD = 0.10     # other processes on the server CPU above this: the row is noisy


def object_path(size: int, name: str = "hit") -> str:
    # Only characters that need no percent-encoding, so every cache forwards
    # the query byte for byte and the origin's per-URL count sees it as ours.
    return f"/gen/{name}-{size}?size={size}&cc=max-age=86400"


def rotated(items: list, round_index: int) -> list:
    """Round r starts at item r: each server goes first once in len(items) rounds."""
    shift = round_index % len(items) if items else 0
    return items[shift:] + items[:shift]


@dataclass
class Runs(LoadRuns):
    size: int = 0
    origin_requests: int = 0


def warm(bench: Bench, target: HttpTarget, path: str) -> None:
    """Fetch through the server until it is cached: the second fetch must be a hit."""
    for _ in range(2):
        if not procs.http_ok(target.url(path), target.host, timeout_s=30):
            raise RuntimeError(f"{target.label}: warming {path} did not answer 2xx")


def measure(bench: Bench, targets: list[HttpTarget]) -> list[Runs]:
    settings = bench.settings
    all_runs: list[Runs] = []
    for size in OBJECT_SIZES:
        path = object_path(size)
        counter = OriginCounter(path, targets[0].host)
        for target in targets:
            warm(bench, target, path)
        # Each cache fetched the object once; if the origin saw another number,
        # its count is not measuring our URL and the zero checks would be void.
        caches = sum(1 for t in targets if t.caches)
        filled = counter.take()
        if filled != caches:
            bench.problem(f"hit {size}B: warming {caches} caches made {filled} origin requests")
        by_label = {t.label: Runs(t, size=size) for t in targets}
        script = wrk.lua_script()
        for target in targets:
            # An unmeasured second of load first, so that no server is measured
            # while it is still growing thread pools or buffers.
            run_wrk(bench, target.url(path), target.host, script, "warmup", duration_s=WARMUP_S, record=False)
        during_warmup = counter.take()
        if during_warmup:
            bench.problem(f"hit {size}B: {during_warmup} origin requests during the warm-up load")
        for round_index in range(settings.rounds):
            for target in rotated(targets, round_index):
                load = run_wrk(bench, target.url(path), target.host, script, "hit",
                               groups=bench.groups.get(target.label))
                runs = by_label[target.label]
                runs.loads.append(load)
                origin_requests = counter.take()
                runs.origin_requests += origin_requests
                result = load.result
                bench.log(f"hit {size}B {target.label} round {round_index + 1}: {result.rps:,.0f} req/s "
                          f"p99 {result.p99_ms:.2f} ms, client CPU {load.client_busy:.0%}, "
                          f"origin requests {origin_requests}")
                _check(bench, target, size, load, origin_requests)
                bench.record_run(f"hit {_size_label(size)}", target.label, round_index + 1, result.rps,
                                 f"p99 {result.p99_ms:.2f} ms", load.client_busy, load.server_own,
                                 load.other_load, load.steal, origin_requests,
                                 result.socket_errors + result.errors_status)
        all_runs += by_label.values()
    return all_runs


def _check(bench: Bench, target: HttpTarget, size: int, load: LoadRun, origin_requests: int) -> None:
    result = load.result
    where = f"hit {size}B {target.label}"
    if origin_requests:
        bench.problem(f"{where}: {origin_requests} origin requests during a hit run")
    if result.socket_errors:
        bench.problem(f"{where}: {result.socket_errors} socket errors")
    if result.errors_status:
        bench.problem(f"{where}: {result.errors_status} responses with status >= 400")
    # wrk counts only >= 400 as errors; a 3xx or an empty 200 would carry
    # fewer bytes than the object, so the average response must hold it.
    if result.requests and result.bytes_per_response < size:
        bench.problem(f"{where}: {result.bytes_per_response:.0f} bytes per response, object is {size}")


def table(all_runs: list[Runs]) -> report.Table:
    out = report.Table(
        "Cache-hit throughput (warm cache, keep-alive, wrk -t1 -c50)",
        ["object", "server", "req/s", "vs nginx", "p99 ms", "server CPU", "other on server CPU",
         "client CPU", "origin reqs", "errors", "note"])
    for size in OBJECT_SIZES:
        rows = [r for r in all_runs if r.size == size]
        reference = next((r.rps for r in rows if r.target.label == REFERENCE), 0.0)
        for runs in rows:
            notes = []
            if runs.client_limited:
                notes.append("client-limited")
            if runs.other_load > NOISY_OTHER_LOAD:
                notes.append("noisy")
            if runs.origin_requests or runs.socket_errors or runs.bad_status:
                notes.append("INVALID")
            if runs.target is OURS and reference and runs.rps < TARGET_RATIO * reference:
                notes.append(f"below target (>= {TARGET_RATIO:.1f} x nginx)")
            out.add(_size_label(size), runs.target.label, report.rate(runs.rps),
                    report.ratio(runs.rps, reference), report.ms(runs.p99_ms),
                    report.percent(runs.server_own), report.percent(runs.other_load),
                    report.percent(runs.client_busy),
                    runs.origin_requests, runs.socket_errors + runs.bad_status,
                    ", ".join(notes) or "")
    out.notes.append("server CPU: CPU time of the server's own processes per second of the run (one "
                     "pinned CPU is 100%); other on server CPU: busy time of that CPU used by anything else "
                     f"(worst round), a row above {NOISY_OTHER_LOAD:.0%} is marked noisy; client CPU: wrk's CPU "
                     "(worst round), above 90% is marked client-limited. Where the nginx row is client-limited, "
                     "nginx's true rate is higher and every ratio in that block is an upper bound.")
    return out


def _size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"
