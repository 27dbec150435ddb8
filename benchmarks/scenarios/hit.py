"""Cache-hit throughput and latency, each server as a ratio to nginx.

1 KiB and 100 KiB objects, warm cache, HTTP/1.1 keep-alive, wrk with one
thread and 50 connections; the server pinned to one CPU and wrk to the
other; rounds in rotated order (round r starts at server r), median req/s
and median p99.  Every run must show zero origin requests for the URL, zero
socket errors and only 2xx; a run that does not is reported as a problem.

Each size is measured twice for our L1 and nginx: with access logs off, and
with them on as operators run them (nginx: a buffered combined log; our L1:
its default access log on stdout, into a file, at the default log level).
Each server is compared with the nginx of the same setting.  Varnish, ATS
and the two bare Python servers (the ceilings) are in the logs-off block.
After the runs, each logs-on server's access log must hold a line for
(nearly) every measured request, or its "logs on" row would not be what it
says.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks import procs, report, targets, wrk
from benchmarks.context import Bench
from benchmarks.loadrun import LoadRun, LoadRuns, run_wrk
from benchmarks.origin_count import OriginCounter
from benchmarks.servers import NGINX, NGINX_LOGS, OURS, OURS_LOGS, HttpTarget

OBJECT_SIZES = tuple(targets.HIT_RPS_RATIO)      # 1 KiB, 100 KiB
WARMUP_S = 1.0
NOISY_OTHER_LOAD = 0.10     # other processes on the server CPU above this: the row is noisy
ACCESS_LINES_SHARE = 0.9    # a logs-on server must have logged at least this share of its measured requests


def object_path(size: int, name: str = "hit") -> str:
    # Only characters that need no percent-encoding, so every cache forwards
    # the query byte for byte and the origin's per-URL count sees it as ours.
    return f"/gen/{name}-{size}?size={size}&cc=max-age=86400"


def rotated(items: list, round_index: int) -> list:
    """Round r starts at item r: each server goes first once in len(items) rounds."""
    shift = round_index % len(items) if items else 0
    return items[shift:] + items[:shift]


def reference_for(target: HttpTarget) -> HttpTarget:
    """The nginx a server is compared with: the one with the same access-log setting."""
    return NGINX_LOGS if target.logs else NGINX


def ours_for(logs: bool) -> HttpTarget:
    return OURS_LOGS if logs else OURS


@dataclass
class Runs(LoadRuns):
    size: int = 0
    origin_requests: int = 0

    @property
    def invalid(self) -> bool:
        return bool(self.origin_requests or self.socket_errors or self.bad_status)


def warm(bench: Bench, target: HttpTarget, path: str) -> None:
    """Fetch through the server until it is cached: the second fetch must be a hit."""
    for _ in range(2):
        if not procs.http_ok(target.url(path), target.host, timeout_s=30):
            raise RuntimeError(f"{target.label}: warming {path} did not answer 2xx")


def measure(bench: Bench, targets_: list[HttpTarget]) -> list[Runs]:
    settings = bench.settings
    all_runs: list[Runs] = []
    for size in OBJECT_SIZES:
        path = object_path(size)
        counter = OriginCounter(path, targets_[0].host)
        for target in targets_:
            warm(bench, target, path)
        # Each cache fetched the object once; if the origin saw another number,
        # its count is not measuring our URL and the zero checks would be void.
        caches = sum(1 for t in targets_ if t.caches)
        filled = counter.take()
        if filled != caches:
            bench.problem(f"hit {size}B: warming {caches} caches made {filled} origin requests")
        by_label = {t.label: Runs(t, size=size) for t in targets_}
        script = wrk.lua_script()
        for target in targets_:
            # An unmeasured second of load first, so that no server is measured
            # while it is still growing thread pools or buffers.
            run_wrk(bench, target.url(path), target.host, script, "warmup", duration_s=WARMUP_S, record=False)
        during_warmup = counter.take()
        if during_warmup:
            bench.problem(f"hit {size}B: {during_warmup} origin requests during the warm-up load")
        for round_index in range(settings.rounds):
            for target in rotated(targets_, round_index):
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
                bench.record_run(f"hit {targets.size_label(size)}", target.label, round_index + 1, result.rps,
                                 f"p99 {result.p99_ms:.2f} ms", load.client_busy, load.server_own,
                                 load.other_load, load.steal, origin_requests,
                                 result.socket_errors + result.errors_status)
        all_runs += by_label.values()
    check_access_logs(bench, all_runs)
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


# --------------------------------------------------------------------------- access logs

def count_lines(path: Path) -> int:
    lines = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
    return lines


def check_access_logs(bench: Bench, all_runs: list[Runs], wait_s: float = 3.0) -> dict[str, int]:
    """Lines in each logs-on server's access log against the requests it was measured on.

    nginx flushes its buffer every second and our node's stdout may be
    block-buffered, so the count may lag the load by a moment: it is given
    up to ``wait_s`` to catch up before it is called short.
    """
    measured: dict[str, tuple[HttpTarget, int]] = {}
    for runs in all_runs:
        if runs.target.access_log:
            _, before = measured.get(runs.target.label, (runs.target, 0))
            measured[runs.target.label] = (runs.target, before + sum(r.result.requests for r in runs.loads))
    lines: dict[str, int] = {}
    for label, (target, requests) in measured.items():
        path = bench.run_dir / str(target.access_log)
        enough = ACCESS_LINES_SHARE * requests

        def logged(path: Path = path) -> int:
            return count_lines(path) if path.exists() else 0
        try:
            procs.wait_until(lambda: logged() >= enough, f"{label} access log", wait_s, interval_s=0.2)
        except procs.ReadinessError:
            pass
        lines[label] = logged()
        bench.log(f"{label}: {lines[label]:,} lines in {target.access_log} for {requests:,} measured requests")
        if lines[label] < enough:
            bench.problem(f"{label}: {lines[label]:,} lines in {target.access_log} for {requests:,} "
                          "measured requests: it did not log (nearly) every request")
    bench.access_lines.update(lines)
    return lines


# --------------------------------------------------------------------------- report

def table_order(runs: Runs) -> tuple[int, bool]:
    return runs.size, runs.target.logs


def table(all_runs: list[Runs], access_lines: dict[str, int] | None = None) -> report.Table:
    out = report.Table(
        "Cache-hit throughput (warm cache, keep-alive, wrk -t1 -c50)",
        ["object", "server", "req/s", "vs nginx", "p99 ms", "server CPU", "other on server CPU",
         "client CPU", "origin reqs", "errors", "note"])
    by_key = {(r.size, r.target.label): r for r in all_runs}
    for runs in sorted(all_runs, key=table_order):     # stable: logs-off block, then logs-on block
        reference = by_key.get((runs.size, reference_for(runs.target).label))
        ref_rps = reference.rps if reference else 0.0
        notes = []
        if runs.client_limited:
            notes.append("client-limited")
        if runs.other_load > NOISY_OTHER_LOAD:
            notes.append("noisy")
        if runs.invalid:
            notes.append("INVALID")
        if runs.target in (OURS, OURS_LOGS):
            minimum = targets.HIT_RPS_RATIO[runs.size]
            if ref_rps and runs.rps < minimum * ref_rps:
                notes.append(f"below target (>= {minimum:.1f} x nginx)")
        out.add(targets.size_label(runs.size), runs.target.label, report.rate(runs.rps),
                report.ratio(runs.rps, ref_rps), report.ms(runs.p99_ms),
                report.percent(runs.server_own), report.percent(runs.other_load),
                report.percent(runs.client_busy),
                runs.origin_requests, runs.socket_errors + runs.bad_status,
                ", ".join(notes) or "")
    out.notes.append("logs off: access logs off everywhere (nginx `access_log off;`, our L1 `access_log = \"off\"` "
                     "and --log-level WARNING). logs on: as operators run them (nginx `access_log <run dir>/"
                     "nginx-access.log combined buffer=64k flush=1s;`, our L1 at its default access log, "
                     "stdout into a file in the run directory, and the default --log-level INFO). "
                     "vs nginx: against the nginx row of the same setting.")
    out.notes.append("server CPU: CPU time of the server's own processes per second of the run (one "
                     "pinned CPU is 100%); other on server CPU: busy time of that CPU used by anything else "
                     f"(worst round), a row above {NOISY_OTHER_LOAD:.0%} is marked noisy; client CPU: wrk's CPU "
                     "(worst round), above 90% is marked client-limited. Where the nginx row is client-limited, "
                     "nginx's true rate is higher and every ratio in that block is an upper bound.")
    out.notes.append("The two bare Python servers are ceilings, not caches: benchmarks/ceiling.py (an aiohttp "
                     "handler) and benchmarks/ceiling_httptools.py (an asyncio.Protocol on uvloop parsing with "
                     "httptools, answering from a dict of pre-serialised responses).")
    if access_lines:
        out.notes.append("Lines in the logs-on servers' access logs after the hit runs (warm-up and readiness "
                         "requests included; at least 90% of the measured requests are required): "
                         + "; ".join(f"{label} {lines:,}" for label, lines in access_lines.items()) + ".")
    return out


def verdicts(all_runs: list[Runs]) -> list[targets.Verdict]:
    """The hit targets: our L1 against nginx at the same access-log setting, per size."""
    by_key = {(r.size, r.target.label): r for r in all_runs}
    out = []
    for size in OBJECT_SIZES:
        for logs in targets.LOGS:
            ours = by_key.get((size, ours_for(logs).label))
            ref = by_key.get((size, reference_for(ours_for(logs)).label))
            if ours is None or ref is None:
                continue
            notes = []
            if ref.client_limited:
                notes.append("nginx client-limited: ratio is an upper bound")
            if ours.invalid or ref.invalid:
                notes.append("INVALID run (see problems)")
            note = "; ".join(notes)
            out.append(targets.at_least(targets.hit_key(size, logs, "rps"), ours.rps, ref.rps,
                                        targets.HIT_RPS_RATIO[size], note))
            out.append(targets.no_worse(targets.hit_key(size, logs, "p99"), ours.p99_ms, ref.p99_ms,
                                        "INVALID run (see problems)" if ours.invalid or ref.invalid else ""))
    return out
