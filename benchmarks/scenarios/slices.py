"""Slices (issue 15): large objects cached in slices against cached whole, through two L1s of one build.

Its own servers on 127.0.73.x, with a topology rendered into the run
directory: our origin (.1), L1 ``sl-plain`` (.2) and L1 ``sl-sliced`` (.3),
each with the same memory and disk sizes.  The topology has two sites on
the same origin: ``vod.example.com`` (no ``slice_size``: whole objects) and
``vod-sliced.example.com`` (``slice_size = "4MiB"``); ``sl-plain`` is only
ever asked for the first and ``sl-sliced`` for the second, so each L1's
cache, RSS and the origin's bytes belong to one path.

Before anything starts, ``python -m edge check`` reads the rendered file: a
build that does not know ``slice_size`` refuses it (an unknown key is a
config error), and then the topology is rendered without it, only the
origin and ``sl-plain`` start, and every sliced row and target says
``not measured: this build does not slice (slice_size unknown)``.

Measured, each path in turn (fresh URLs, so every cold pass is cold):

1. **Cold tail range**: curl ``-r`` for the last 725 KiB of a fresh large
   object (1 GiB; 256 MiB in ``--quick``), three objects (the median time,
   the worst origin bytes): time to last byte, and the
   origin's ``origin_response_bytes_total`` and ``origin_requests_total``
   (its admin ``/metrics``) over the pass, read once the origin has stopped
   sending (the unsliced L1 keeps filling the whole object behind the
   client).  Then the last one's range warm (median of 3), and, directly from the
   origin, the 4 MiB slice that holds the range (median of 3: "one slice
   fetch").  The received bytes are compared with what the origin's
   synthetic body has at that offset.
2. **Full GET**, cold and then warm, of another fresh object: curl to
   /dev/null, MB/s, the L1's peak RSS growth (VmHWM reset before each pass).
3. **Video-seek trace** (:mod:`benchmarks.slicetrace`, seeded): sessions
   over files of log-uniform size, each reading 2-4 ranges of 1-4 MiB at
   random offsets, 8 sessions in flight (threads, one keep-alive connection
   per session).  The unsliced L1 goes first with a wall-time budget; the
   sliced one replays exactly the sessions the first one started.  Origin
   bytes and requests, bytes the clients read, and the L1 hit ratio (share
   of responses with ``X-Cache: HIT``, else RFC 9211 ``hit``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import http.client
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import layout, procs, report, slicetrace, targets
from benchmarks.context import Bench
from benchmarks.layout import Endpoint
from benchmarks.scenarios import large
from benchmarks.servers import REPO_DIR, HttpTarget, _python_env, _wait_http

ORIGIN = Endpoint("127.0.73.1", 8080)
ORIGIN_ADMIN = Endpoint("127.0.73.1", 8091)
PLAIN_L1 = Endpoint("127.0.73.2", 8080)
PLAIN_ADMIN = Endpoint("127.0.73.2", 8091)
SLICED_L1 = Endpoint("127.0.73.3", 8080)
SLICED_ADMIN = Endpoint("127.0.73.3", 8091)
PLAIN_HOST = "vod.example.com"
SLICED_HOST = "vod-sliced.example.com"
SLICE_SIZE = 4 * 2**20
SLICE_SIZE_TEXT = "4MiB"
TAIL_BYTES = 725 * 1024         # the cold range: the last 725 KiB of the object
COLD_REPEATS = 3                # fresh objects, each read cold once: the median
WARM_REPEATS = 3
MEMORY_SIZE_TEXT = "64MiB"
# Set deliberately: it holds the tail and full-GET objects whole (2 x 1 GiB) with room for
# several trace files, not the trace's whole working set (50 files of 200 MiB-2 GiB).
DISK_SIZE = 8 * 2**30
DISK_SIZE_TEXT = "8GiB"
DISK_SLACK = 2 * 2**30          # free space required beyond both L1s' disk_size
SETTLE_S = 1.0                  # the origin has stopped sending when its byte count holds this long
SETTLE_DEADLINE_S = 600.0
REQUEST_TIMEOUT_S = 600.0       # one range of the trace: the unsliced L1 may fill 2 GiB before it
CLIENT_BUSY = 0.90              # the client CPU (curl, or another tenant) this busy: the pass measured it
NOT_SLICING = "this build does not slice (slice_size unknown)"



def gen_path(name: str, size: int) -> str:
    """A synthetic object of the origin, cacheable for a day, with a strong ETag and a Last-Modified.

    Validators as a video file on disk has them: a sliced L1 stores slices only of responses it can
    check for a change between slices (a strong ETag or Last-Modified).
    """
    return f"{name}?size={size}&cc=max-age=86400&etag=1&lm=1"


PLAIN = HttpTarget("edge L1, unsliced", PLAIN_L1, host=PLAIN_HOST)
SLICED = HttpTarget(f"edge L1, slice_size {SLICE_SIZE_TEXT}", SLICED_L1, host=SLICED_HOST)

TOPOLOGY = """# The slices scenario (benchmarks/scenarios/slices.py): one origin, two L1s, two sites on it.
state_dir = "{state}"
[sites.vod]
hosts = ["{plain_host}"]
origin = "http://{origin}"
[sites.vod-sliced]
hosts = ["{sliced_host}"]
origin = "http://{origin}"
{slice_line}
[nodes.sl-origin]
role = "origin"
listen = "{origin}"
admin = "{origin_admin}"
[nodes.sl-plain]
role = "l1"
workers = 1
listen = "{plain}"
admin = "{plain_admin}"
parents = []
memory_size = "{memory_size}"
disk_size = "{disk_size}"
access_log = "off"
[nodes.sl-sliced]
role = "l1"
workers = 1
listen = "{sliced}"
admin = "{sliced_admin}"
parents = []
memory_size = "{memory_size}"
disk_size = "{disk_size}"
access_log = "off"
"""


def render_topology(run_dir: Path, slicing: bool) -> Path:
    """The scenario's topology; ``slicing=False`` leaves ``slice_size`` out (for builds without it)."""
    path = run_dir / "topology-slices.toml"
    path.write_text(TOPOLOGY.format(
        state=run_dir / "slices-state", plain_host=PLAIN_HOST, sliced_host=SLICED_HOST, origin=ORIGIN,
        origin_admin=ORIGIN_ADMIN, plain=PLAIN_L1, plain_admin=PLAIN_ADMIN, sliced=SLICED_L1,
        sliced_admin=SLICED_ADMIN, memory_size=MEMORY_SIZE_TEXT, disk_size=DISK_SIZE_TEXT,
        slice_line=f'slice_size = "{SLICE_SIZE_TEXT}"' if slicing else ""))
    return path


def _check(topology: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", "check", "--config", str(topology)],
                          capture_output=True, text=True, env={**os.environ, **_python_env()},
                          cwd=REPO_DIR, timeout=60)


def start(bench: Bench) -> dict[str, procs.Started]:
    """Render and check the topology, then start the origin and the L1s (the sliced one if this build slices)."""
    run_dir, p = bench.run_dir, bench.processes
    free = shutil.disk_usage(run_dir).free
    if free < 2 * DISK_SIZE + DISK_SLACK:
        raise RuntimeError(f"slices: {free / 2**30:.1f} GiB free in {run_dir}; the two L1s' disk tiers may "
                           f"take {2 * DISK_SIZE / 2**30:.0f} GiB (plus {DISK_SLACK / 2**30:.0f} GiB slack)")
    topology = render_topology(run_dir, slicing=True)
    checked = _check(topology)
    unknown = slicetrace.check_says_slicing_unknown(checked.returncode, checked.stdout + checked.stderr)
    if unknown is None:
        raise RuntimeError(f"slices: edge check refused {topology}: {(checked.stdout + checked.stderr).strip()}")
    slicing = not unknown
    if not slicing:
        said = next((line for line in (checked.stdout + checked.stderr).splitlines() if "slice_size" in line), "")
        bench.log(f"slices: {NOT_SLICING}: edge check said {said[:120]}")
        topology = render_topology(run_dir, slicing=False)
        checked = _check(topology)
        if checked.returncode != 0:
            raise RuntimeError(f"slices: edge check refused {topology}: {(checked.stdout + checked.stderr).strip()}")
    bench.record_command(f"python -m edge check --config {topology}  # exit {checked.returncode}: slicing "
                         f"{'known' if slicing else 'unknown'}")
    plan = [("origin", "sl-origin", ORIGIN_ADMIN), ("plain", "sl-plain", PLAIN_ADMIN)]
    if slicing:
        plan.append(("sliced", "sl-sliced", SLICED_ADMIN))
    started = {}
    for role, node, admin in plan:
        argv = [sys.executable, "-m", "edge", "run", node, "--config", str(topology), "--log-level", "WARNING"]
        started[role] = p.start(f"slices-{node}", argv, cpu=layout.SERVER_CPU, env=_python_env(), cwd=REPO_DIR)
        _wait_http(p, started[role], f"{admin.url}/healthz")
    return started


# --------------------------------------------------------------------------- the origin's counters

def _origin_counters() -> tuple[float, float]:
    """(response body bytes, requests) the origin has sent so far, from its /metrics."""
    with urllib.request.urlopen(f"{ORIGIN_ADMIN.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return (slicetrace.metric_total(text, "origin_response_bytes_total"),
            slicetrace.metric_total(text, "origin_requests_total"))


class OriginWindow:
    """Origin bytes and requests between two moments; ``take`` waits until the origin stops sending."""

    def __init__(self) -> None:
        self._bytes, self._requests = _origin_counters()

    def take(self, bench: Bench, what: str) -> tuple[int, int]:
        deadline = time.monotonic() + SETTLE_DEADLINE_S
        last = _origin_counters()
        still_since = time.monotonic()
        while time.monotonic() - still_since < SETTLE_S:
            if time.monotonic() > deadline:
                bench.problem(f"slices {what}: the origin was still sending after {SETTLE_DEADLINE_S:g} s")
                break
            time.sleep(0.2)
            now = _origin_counters()
            if now != last:
                last, still_since = now, time.monotonic()
        sent, asked = int(last[0] - self._bytes), int(last[1] - self._requests)
        self._bytes, self._requests = last
        return sent, asked


# --------------------------------------------------------------------------- 1. cold tail range

@dataclass(frozen=True)
class RangeGet:
    status: int
    bytes: int
    seconds: float
    x_cache: str


@dataclass
class TailResult:
    target: HttpTarget
    first: int
    last: int
    colds: list[RangeGet]           # one per fresh object
    warm: list[RangeGet]            # the last of them again, warm
    origin: list[tuple[int, int]]   # (bytes, requests) the origin sent for each cold range
    body_ok: bool

    @property
    def cold_s(self) -> float:
        return report.median([c.seconds for c in self.colds])

    @property
    def warm_s(self) -> float:
        return report.median([w.seconds for w in self.warm])

    @property
    def origin_bytes(self) -> int:
        """The worst cold range's: the bound holds for each."""
        return max((b for b, _ in self.origin), default=0)

    @property
    def origin_requests(self) -> int:
        return max((n for _, n in self.origin), default=0)


def curl_range(bench: Bench, endpoint: Endpoint, host: str, path: str, first: int, last: int,
               out: Path | None = None) -> RangeGet:
    """One ranged GET with curl on the client CPU: status, bytes, time to last byte, X-Cache."""
    argv = ["curl", "-sS", "-o", str(out) if out else "/dev/null", "-H", f"Host: {host}", "-r", f"{first}-{last}",
            "-w", "%{http_code} %{size_download} %{time_total} %header{x-cache}", "--max-time",
            f"{REQUEST_TIMEOUT_S:g}", f"{endpoint.url}{path}"]
    bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
    completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=REQUEST_TIMEOUT_S + 10)
    if completed.returncode != 0:
        raise RuntimeError(f"curl -r {first}-{last} {endpoint} ({host}) failed: {completed.stderr.strip()}")
    status, size, seconds, *cache = completed.stdout.split()
    return RangeGet(int(status), int(size), float(seconds), " ".join(cache))


def _expected(path: str, first: int, last: int) -> bytes:
    from origin.synthetic import synthetic_body, synthetic_tag
    return b"".join(synthetic_body(synthetic_tag(path.split("?", 1)[0]), first, last + 1))


def measure_tail(bench: Bench, target: HttpTarget) -> TailResult:
    """The tail range of COLD_REPEATS fresh objects (each cold once), then of the last one warm."""
    size = bench.settings.large_bytes
    first, last = slicetrace.tail_range(size, TAIL_BYTES)
    length = last - first + 1
    out = bench.run_dir / f"slices-tail-{target.tag}.bin"
    window = OriginWindow()
    colds, origin, body_ok = [], [], True
    for _ in range(COLD_REPEATS):
        name = f"/gen/slices-tail-{target.tag}-{uuid.uuid4().hex[:8]}"
        path = gen_path(name, size)
        colds.append(curl_range(bench, target.endpoint, target.host, path, first, last, out))
        origin.append(window.take(bench, f"{target.label} cold tail"))
        if out.read_bytes() != _expected(name, first, last):
            body_ok = False
            bench.problem(f"slices {target.label} cold tail: the bytes differ from the origin's at that offset")
        out.unlink()
    warm = [curl_range(bench, target.endpoint, target.host, path, first, last) for _ in range(WARM_REPEATS)]
    warm_origin, _ = window.take(bench, f"{target.label} warm tail")
    result = TailResult(target, first, last, colds, warm, origin, body_ok)
    for kind, got in [("cold", c) for c in colds] + [("warm", w) for w in warm]:
        if got.status != 206 or got.bytes != length:
            bench.problem(f"slices {target.label} {kind} tail: status {got.status}, {got.bytes} of {length} bytes")
    if warm_origin:
        bench.problem(f"slices {target.label} warm tail: the origin sent {warm_origin} bytes")
    bench.log(f"slices {target.label} tail {length} B: cold {', '.join(f'{c.seconds:.3f}' for c in colds)} s "
              f"({colds[0].x_cache}), warm {result.warm_s:.4f} s, origin at worst "
              f"{report.mib(result.origin_bytes)} MiB in {result.origin_requests} requests")
    return result


def measure_slice_fetch(bench: Bench) -> float:
    """One slice from the origin itself (the one that holds the tail range): median seconds of 3."""
    size = bench.settings.large_bytes
    path = gen_path(f"/gen/slices-fetch-{uuid.uuid4().hex[:8]}", size)
    first = (size - 1) // SLICE_SIZE * SLICE_SIZE
    runs = [curl_range(bench, ORIGIN, SLICED_HOST, path, first, size - 1) for _ in range(WARM_REPEATS)]
    for run in runs:
        if run.status != 206 or run.bytes != size - first:
            bench.problem(f"slices: a slice from the origin answered {run.status} with {run.bytes} bytes")
    return report.median([r.seconds for r in runs])


# --------------------------------------------------------------------------- 2. full GET

@dataclass(frozen=True)
class FullPass:
    kind: str                   # "cold" or "warm"
    status: int
    bytes: int
    bytes_per_s: float
    rss_growth: int
    origin_bytes: int
    origin_requests: int
    client_busy: float


def measure_full(bench: Bench, target: HttpTarget, node: procs.Started) -> list[FullPass]:
    size = bench.settings.large_bytes
    path = gen_path(f"/gen/slices-full-{target.tag}-{uuid.uuid4().hex[:8]}", size)
    window = OriginWindow()
    passes = []
    for kind in ("cold", "warm"):
        procs.reset_peak_rss(node.pid)
        rss_before, _ = procs.rss_bytes(node.pid)
        status, got, speed, _, client_busy = large.download(bench, target, path, timeout_s=REQUEST_TIMEOUT_S)
        rss_peak = procs.rss_bytes(node.pid)[1]
        origin_bytes, origin_requests = window.take(bench, f"{target.label} full {kind}")
        one = FullPass(kind, status, got, speed, max(0, rss_peak - rss_before), origin_bytes, origin_requests,
                       client_busy)
        passes.append(one)
        if status != 200 or got != size:
            bench.problem(f"slices {target.label} full {kind}: status {status}, {got} of {size} bytes")
        if kind == "warm" and origin_bytes:
            bench.problem(f"slices {target.label} full warm: the origin sent {origin_bytes} bytes")
        bench.log(f"slices {target.label} full {kind}: {speed / 1e6:.0f} MB/s, RSS growth "
                  f"{report.mib(one.rss_growth)} MiB, origin {report.mib(origin_bytes)} MiB")
    return passes


# --------------------------------------------------------------------------- 3. video-seek trace

@dataclass
class TraceResult:
    target: HttpTarget
    sessions: int = 0
    seeks: int = 0
    hits: int = 0
    client_bytes: int = 0
    errors: int = 0
    seconds: float = 0.0
    origin_bytes: int = 0
    origin_requests: int = 0
    stopped_by_budget: bool = False
    x_cache: collections.Counter = field(default_factory=collections.Counter)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.seeks if self.seeks else 0.0


def video_path(run_tag: str, file: int, size: int) -> str:
    return gen_path(f"/gen/vod-{run_tag}-{file}.mp4", size)


def _session(target: HttpTarget, trace: slicetrace.VideoTrace, run_tag: str,
             seeks: tuple[slicetrace.Seek, ...], result: TraceResult, lock: threading.Lock) -> None:
    connection = http.client.HTTPConnection(target.endpoint.host, target.endpoint.port, timeout=REQUEST_TIMEOUT_S)
    try:
        for seek in seeks:
            path = video_path(run_tag, seek.file, trace.sizes[seek.file])
            try:
                connection.request("GET", path, headers={"Host": target.host, "Range": seek.range_header})
                response = connection.getresponse()
                got = 0
                while chunk := response.read(256 * 1024):
                    got += len(chunk)
                ok = response.status == 206 and got == seek.length
                x_cache = response.getheader("X-Cache") or "-"
                hit = slicetrace.is_hit(response.getheader("X-Cache"), response.getheader("Cache-Status"))
            except (OSError, http.client.HTTPException):
                connection.close()
                ok, got, x_cache, hit = False, 0, "error", False
            with lock:
                result.seeks += 1
                result.client_bytes += got
                result.errors += 0 if ok else 1
                result.hits += 1 if hit and ok else 0
                result.x_cache[x_cache] += 1
    finally:
        connection.close()


def run_trace(bench: Bench, target: HttpTarget, trace: slicetrace.VideoTrace, run_tag: str,
              sessions: int, budget_s: float) -> TraceResult:
    """Sessions 0..sessions-1 in order, ``video_concurrency`` at once; none starts after ``budget_s``."""
    result = TraceResult(target)
    bench.record_command(f"# video trace: {sessions} sessions, {bench.settings.video_concurrency} at once, Python "
                         f"http.client (one keep-alive connection per session), GET {target.endpoint.url}"
                         f"{video_path(run_tag, 0, trace.sizes[0])} with Range: bytes=FIRST-LAST, Host: {target.host}")
    lock = threading.Lock()
    window = OriginWindow()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=bench.settings.video_concurrency) as pool:
        pending: set[concurrent.futures.Future] = set()
        for index in range(sessions):
            if time.monotonic() - started > budget_s:
                result.stopped_by_budget = True
                break
            if len(pending) >= bench.settings.video_concurrency:
                done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    future.result()         # a session's own failures are counted; anything else is a bug
            pending.add(pool.submit(_session, target, trace, run_tag, trace.sessions[index], result, lock))
            result.sessions += 1
        for future in concurrent.futures.as_completed(pending):
            future.result()
    result.seconds = time.monotonic() - started
    result.origin_bytes, result.origin_requests = window.take(bench, f"{target.label} trace")
    bench.log(f"slices {target.label} trace: {result.sessions} sessions, {result.seeks} seeks in "
              f"{result.seconds:.0f} s, hit ratio {result.hit_ratio:.3f}, origin {report.mib(result.origin_bytes)} "
              f"MiB, errors {result.errors}")
    if result.errors:
        bench.problem(f"slices {target.label} trace: {result.errors} seeks failed or came back short")
    return result


# --------------------------------------------------------------------------- the scenario

@dataclass
class SlicesResult:
    slicing: bool
    slice_fetch_s: float
    tail: dict[str, TailResult]             # PLAIN.label / SLICED.label ->
    full: dict[str, list[FullPass]]
    trace: dict[str, TraceResult]
    trace_spec: slicetrace.VideoTrace
    concurrency: int


def make_trace(bench: Bench) -> slicetrace.VideoTrace:
    s = bench.settings
    return slicetrace.make_trace(s.video_sessions, s.video_files, s.video_smallest, s.video_largest, s.trace_seed)


def measure(bench: Bench, started: dict[str, procs.Started]) -> SlicesResult:
    slicing = "sliced" in started
    paths = [(PLAIN, started["plain"])] + ([(SLICED, started["sliced"])] if slicing else [])
    slice_fetch_s = measure_slice_fetch(bench)
    tail = {t.label: measure_tail(bench, t) for t, _ in paths}
    full = {t.label: measure_full(bench, t, node) for t, node in paths}
    trace = make_trace(bench)
    run_tag = uuid.uuid4().hex[:8]
    s = bench.settings
    bench.log(f"slices: video trace of {len(trace.sessions)} sessions ({trace.seeks} seeks) over {len(trace.sizes)} "
              f"files ({report.mib(sum(trace.sizes)) } MiB in all), {s.video_concurrency} at once, unsliced first "
              f"(budget {s.video_budget_s:g} s)")
    traces = {PLAIN.label: run_trace(bench, PLAIN, trace, run_tag, len(trace.sessions), s.video_budget_s)}
    if slicing:
        done = traces[PLAIN.label].sessions
        traces[SLICED.label] = run_trace(bench, SLICED, trace, run_tag, done, 2 * s.video_budget_s)
        if traces[SLICED.label].sessions != done:
            bench.problem(f"slices: the sliced L1 replayed {traces[SLICED.label].sessions} of the {done} "
                          "sessions the unsliced one did")
    return SlicesResult(slicing, slice_fetch_s, tail, full, traces, trace, s.video_concurrency)


def _not_measured_row(cells: int) -> list[str]:
    return [SLICED.label, f"not measured: {NOT_SLICING}"] + ["-"] * (cells - 2)


def tables(r: SlicesResult, size: int) -> list[report.Table]:
    length = TAIL_BYTES
    big = targets.large_label(size)
    tail = report.Table(
        f"Slices: cold range at the tail of a {big} object (the last {length // 1024} KiB), curl -r",
        ["L1", f"cold (median of {COLD_REPEATS} objects) s", f"warm (median of {WARM_REPEATS}) s",
         "one slice from the origin s", "bound 2 x (warm + slice) s", "origin MiB (worst cold)",
         "bound slice + range MiB", "origin reqs (worst)", "X-Cache cold / warm", "note"])
    for label, t in r.tail.items():
        limit_s = slicetrace.tail_time_limit(t.warm_s, r.slice_fetch_s)
        limit_b = slicetrace.tail_origin_limit(SLICE_SIZE, t.last - t.first + 1)
        tail.add(label, f"{t.cold_s:.3f} ({', '.join(f'{c.seconds:.3f}' for c in t.colds)})", f"{t.warm_s:.4f}", f"{r.slice_fetch_s:.4f}", f"{limit_s:.3f}",
                 report.mib(t.origin_bytes), report.mib(limit_b), t.origin_requests,
                 f"{'/'.join(sorted({c.x_cache or '-' for c in t.colds}))} / "
                 f"{'/'.join(sorted({w.x_cache or '-' for w in t.warm}))}",
                 "" if t.body_ok else "BYTES DIFFER from the origin's")
    if not r.slicing:
        tail.rows.append(_not_measured_row(len(tail.headers)))
    tail.notes.append(f"Bounds (issue 15, for the sliced L1; shown for both): time to last byte <= 2 x (the same "
                      f"range warm + one {SLICE_SIZE // 2**20} MiB slice fetched from the origin directly), origin "
                      "bytes <= one slice + the range, for the worst of the cold objects. Origin bytes and requests: the origin's "
                      "origin_response_bytes_total and origin_requests_total over the pass, read once it stopped "
                      "sending (the unsliced L1 fills the whole object behind the client).")

    full = report.Table(f"Slices: full GET of a {big} object, cold then warm (curl to /dev/null)",
                        ["L1", "pass", "MB", "MB/s", "vs unsliced", "peak RSS growth MiB", "origin MiB",
                         "origin reqs", "client CPU", "note"])
    ref = {p.kind: p.bytes_per_s for p in r.full.get(PLAIN.label, [])}
    for label, passes in r.full.items():
        for p in passes:
            full.add(label, p.kind, f"{p.bytes / 1e6:,.0f}", f"{p.bytes_per_s / 1e6:,.0f}",
                     report.ratio(p.bytes_per_s, ref.get(p.kind, 0.0)), report.mib(p.rss_growth),
                     report.mib(p.origin_bytes), p.origin_requests, report.percent(p.client_busy),
                     "client CPU busy: MB/s a lower bound" if p.client_busy > CLIENT_BUSY else "")
    if not r.slicing:
        full.rows.append(_not_measured_row(len(full.headers)))
    full.notes.append(f"Targets for the sliced L1: MB/s >= {targets.SLICED_FULL_RATIO:.1f} x the unsliced L1's in "
                      f"the same pass, peak RSS growth (VmHWM reset before the pass) < "
                      f"{targets.RSS_GROWTH_BYTES // 2**20} MiB.")

    spec = r.trace_spec
    trace = report.Table(
        f"Slices: video-seek trace (seed {spec.seed}: {len(spec.sessions):,} sessions over {len(spec.sizes)} files "
        f"of {report.mib(min(spec.sizes)):s}-{report.mib(max(spec.sizes))} MiB, 2-4 ranges of 1-4 MiB each)",
        ["L1", "sessions", "ranges", "client MiB", "origin MiB", "origin / client bytes", "origin reqs",
         "L1 hit ratio", "X-Cache seen", "errors", "seconds"])
    for label, t in r.trace.items():
        trace.add(label, f"{t.sessions:,}" + (" (budget)" if t.stopped_by_budget else ""), f"{t.seeks:,}",
                  report.mib(t.client_bytes), report.mib(t.origin_bytes), report.ratio(t.origin_bytes, t.client_bytes),
                  t.origin_requests, f"{t.hit_ratio:.3f}",
                  ", ".join(f"{k} {v}" for k, v in sorted(t.x_cache.items())), t.errors, f"{t.seconds:.0f}")
    if not r.slicing:
        trace.rows.append(_not_measured_row(len(trace.headers)))
    trace.notes.append(f"Sessions in flight: up to {r.concurrency} (threads, one "
                       "keep-alive connection per session). The unsliced L1 runs first and starts no session after "
                       "its wall-time budget ('(budget)'); the sliced L1 replays the same sessions. Both L1s have "
                       f"memory_size {MEMORY_SIZE_TEXT} and disk_size {DISK_SIZE_TEXT} (set deliberately: smaller than "
                       "the trace's files together; the tail and full-GET objects are on disk before it starts). "
                       "Hit ratio: ranges answered X-Cache HIT (else Cache-Status hit) over ranges asked.")
    return [tail, full, trace]


def verdicts(r: SlicesResult) -> list[targets.Verdict]:
    keys = ("slices-tail-time", "slices-tail-origin", "slices-full-cold", "slices-full-warm", "slices-full-rss")
    if not r.slicing or SLICED.label not in r.tail:
        return [targets.not_measured(key, NOT_SLICING) for key in keys]
    t = r.tail[SLICED.label]
    limit_s = slicetrace.tail_time_limit(t.warm_s, r.slice_fetch_s)
    limit_b = slicetrace.tail_origin_limit(SLICE_SIZE, t.last - t.first + 1)
    out = [targets.Verdict("slices-tail-time", f"{t.cold_s:.3f} s of {limit_s:.3f} s allowed",
                           t.cold_s <= limit_s and t.body_ok,
                           f"median of {len(t.colds)} cold objects; warm {t.warm_s:.4f} s, slice "
                           f"{r.slice_fetch_s:.4f} s; unsliced cold {r.tail[PLAIN.label].cold_s:.2f} s"
                           + ("" if t.body_ok else "; BYTES DIFFER")),
           targets.at_most_bytes("slices-tail-origin", t.origin_bytes, limit_b,
                                 f"{t.origin_requests} origin requests; unsliced "
                                 f"{report.mib(r.tail[PLAIN.label].origin_bytes)} MiB")]
    ref = {p.kind: p for p in r.full[PLAIN.label]}
    sliced = {p.kind: p for p in r.full[SLICED.label]}
    for kind in ("cold", "warm"):
        busy = [label for label, p in ((SLICED.label, sliced[kind]), (PLAIN.label, ref[kind]))
                if p.client_busy > CLIENT_BUSY]
        out.append(targets.at_least(f"slices-full-{kind}", sliced[kind].bytes_per_s, ref[kind].bytes_per_s,
                                    targets.SLICED_FULL_RATIO,
                                    f"{sliced[kind].bytes_per_s / 1e6:.0f} vs {ref[kind].bytes_per_s / 1e6:.0f} MB/s"
                                    + (f"; client CPU over {CLIENT_BUSY:.0%} during: {', '.join(busy)}"
                                       if busy else "")))
    worst = max(sliced.values(), key=lambda p: p.rss_growth)
    out.append(targets.below_bytes("slices-full-rss", worst.rss_growth, note=f"worst pass: {worst.kind}"))
    return out


def summary(r: SlicesResult) -> str:
    plain = r.trace[PLAIN.label]
    if SLICED.label not in r.trace:
        return (f"Slices: video trace through the unsliced L1: origin {report.mib(plain.origin_bytes)} MiB for "
                f"{report.mib(plain.client_bytes)} MiB read, hit ratio {plain.hit_ratio:.3f}; sliced not measured "
                f"({NOT_SLICING})")
    sliced = r.trace[SLICED.label]
    return (f"Slices: video trace, origin MiB sliced {report.mib(sliced.origin_bytes)} vs unsliced "
            f"{report.mib(plain.origin_bytes)} ({report.ratio(sliced.origin_bytes, plain.origin_bytes)} x), "
            f"L1 hit ratio {sliced.hit_ratio:.3f} vs {plain.hit_ratio:.3f}")
