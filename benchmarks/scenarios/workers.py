"""Workers (issue 14): 1 KiB hits from one worker on one CPU, from two workers on two CPUs, and
from nginx with ``worker_processes auto``.

Its own servers on 127.0.72.x (topology rendered into the run directory):
our origin (.1), node ``w1`` with ``workers = 1`` (.2), node ``w2`` with
``workers = 2`` (.3), and nginx (``peers/nginx.conf`` with
``worker_processes auto``, .4) in front of the same origin.

* **one worker on one CPU**: ``w1`` pinned to CPU 0, ``wrk -t1`` pinned to
  CPU 1: the usual layout of the hit scenario.
* **two workers on two CPUs**: ``w2`` on both CPUs, and ``wrk -t2`` on both
  too, because this machine has no third CPU.  The load generator takes part
  of the CPUs the workers would use, so the measured ratio understates what
  two CPUs give the node.  Each row therefore also reports the node's own
  CPU time per second (its process group: the main process and its workers)
  and its requests per CPU-second; ``2 x`` the ratio of those is what two
  whole CPUs would give at the measured efficiency (a projection, marked as
  such, not a measurement).
* **nginx auto**: the same two-CPU layout and the same ``wrk -t2`` command,
  so the node's all-CPU rate is compared with nginx's under the same
  conditions.

Every run must show zero origin requests, zero socket errors and only 2xx.
"""

from __future__ import annotations

import resource
import shlex
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import layout, peers, procs, report, targets, wrk
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow
from benchmarks.layout import Endpoint
from benchmarks.origin_count import OriginCounter
from benchmarks.scenarios.hit import object_path, rotated
from benchmarks.servers import REPO_DIR, HttpTarget, _python_env, _wait_http

ORIGIN = Endpoint("127.0.72.1", 8080)
ORIGIN_ADMIN = Endpoint("127.0.72.1", 8091)
ONE = Endpoint("127.0.72.2", 8080)
ONE_ADMIN = Endpoint("127.0.72.2", 8091)
TWO = Endpoint("127.0.72.3", 8080)
TWO_ADMIN = Endpoint("127.0.72.3", 8091)
NGINX_AUTO = Endpoint("127.0.72.4", 8080)
SIZE = 1024
NOISY_OTHER = 0.10          # CPU-seconds per second used by processes not in the run: the row is noisy

W1 = HttpTarget("edge, 1 worker on CPU 0", ONE)
W2 = HttpTarget("edge, 2 workers on CPUs 0-1", TWO)
NGINX = HttpTarget("nginx, worker_processes auto on CPUs 0-1", NGINX_AUTO)

TOPOLOGY = """# The workers scenario (benchmarks/scenarios/workers.py); workers stated on every cache node.
state_dir = "{state}"
[sites.bench]
hosts = ["{host}"]
origin = "http://{origin}"
[nodes.origin]
role = "origin"
listen = "{origin}"
admin = "{origin_admin}"
[nodes.w1]
role = "l1"
listen = "{one}"
admin = "{one_admin}"
workers = 1
access_log = "off"
[nodes.w2]
role = "l1"
listen = "{two}"
admin = "{two_admin}"
workers = 2
access_log = "off"
"""


@dataclass
class Row:
    target: HttpTarget
    layout: str                                 # where server and client ran
    rps: list[float] = field(default_factory=list)
    own: list[float] = field(default_factory=list)       # the server's CPU-seconds per second
    client: list[float] = field(default_factory=list)    # wrk's
    other: list[float] = field(default_factory=list)     # every other process's (other tenants: noise)
    p99: list[float] = field(default_factory=list)
    origin_requests: int = 0
    errors: int = 0

    @property
    def median_rps(self) -> float:
        return report.median(self.rps)

    @property
    def per_cpu_second(self) -> float:
        own = report.median(self.own)
        return self.median_rps / own if own > 0 else 0.0


def render_nginx(run_dir: Path) -> Path:
    """nginx-auto's config: the peers' nginx template with `worker_processes auto` at NGINX_AUTO."""
    template = (peers.PEERS_DIR / "nginx.conf").read_text()
    assert "worker_processes 1;" in template
    conf = run_dir / "nginx-auto.conf"
    conf.write_text(peers.fill(template.replace("worker_processes 1;", "worker_processes auto;"), {
        **peers.values(run_dir), "origin": str(ORIGIN), "nginx_name": "nginx-auto",
        "nginx_listen": str(NGINX_AUTO), "nginx_access_log": "off",
        # The template's HTTPS server (the tls scenario's) listens beside it, unused here.
        "nginx_listen_tls": f"{NGINX_AUTO.host}:8443", "nginx_listen_h2": f"{NGINX_AUTO.host}:8444",
        "nginx_tls_access_log": "off"}, str(conf)))
    return conf


def start(bench: Bench) -> dict[str, procs.Started]:
    """Render the scenario's topology and nginx config, start origin, w1 (CPU 0), w2 and nginx (both CPUs)."""
    run_dir, p = bench.run_dir, bench.processes
    topology = run_dir / "topology-workers.toml"
    topology.write_text(TOPOLOGY.format(state=run_dir / "workers-state", host=layout.SITE_HOST, origin=ORIGIN,
                                        origin_admin=ORIGIN_ADMIN, one=ONE, one_admin=ONE_ADMIN, two=TWO,
                                        two_admin=TWO_ADMIN))
    conf = render_nginx(run_dir)
    started = {}
    for name, admin, cpu in (("origin", ORIGIN_ADMIN, layout.SERVER_CPU), ("w1", ONE_ADMIN, layout.SERVER_CPU),
                             ("w2", TWO_ADMIN, None)):
        argv = [sys.executable, "-m", "edge", "run", name, "--config", str(topology), "--log-level", "WARNING"]
        started[name] = p.start(f"workers-{name}", argv, cpu=cpu, env=_python_env(), cwd=REPO_DIR)
        _wait_http(p, started[name], f"{admin.url}/healthz")
    (run_dir / "nginx-auto").mkdir(exist_ok=True)
    started["nginx"] = p.start("nginx-auto", ["nginx", "-c", str(conf), "-p", str(run_dir), "-g", "daemon off;"])
    _wait_http(p, started["nginx"], f"{NGINX_AUTO.url}/gen/ready?size=1", layout.SITE_HOST)
    return started


def _run(bench: Bench, target: HttpTarget, threads: int, cpu: int | None, group: int, path: str,
         script: Path, duration_s: float) -> tuple[wrk.WrkResult, float, float, float]:
    """wrk's result, and CPU-seconds per second of the server, of wrk, and of everything else."""
    argv = wrk.command(target.url(path), str(script), target.host, threads=threads,
                       connections=bench.settings.connections * threads, duration_s=duration_s)
    bench.record_command(shlex.join(procs.pinned(argv, cpu)))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    with CpuWindow({group}) as window:
        completed = procs.run_client(argv, cpu, timeout_s=duration_s + 60)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()[-500:]}")
    # wrk (exec'd by taskset: the same child) was reaped by run_client: its own CPU time.
    client = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / wall
    cpus = len(window.usage) - 1 or 1
    everything = window.of(None).tasks * cpus          # CPU-seconds per second, all processes
    return (wrk.parse(completed.stdout), window.group_share, client,
            max(0.0, everything - window.group_share - client))


def measure(bench: Bench, started: dict[str, procs.Started]) -> list[Row]:
    path = object_path(SIZE, "workers")
    counter = OriginCounter(path, layout.SITE_HOST, ORIGIN)
    plan = [(W1, 1, layout.CLIENT_CPU, started["w1"].pid, "edge CPU 0, wrk -t1 on CPU 1"),
            (W2, 2, None, started["w2"].pid, "edge and wrk -t2 on CPUs 0-1"),
            (NGINX, 2, None, started["nginx"].pid, "nginx and wrk -t2 on CPUs 0-1")]
    rows = {target.label: Row(target, where) for target, *_, where in plan}
    for target, *_ in plan:
        if not procs.http_ok(target.url(path), target.host, timeout_s=30):
            raise RuntimeError(f"{target.label}: warming {path} did not answer 2xx")
    # The disk copy is written behind the response, and w2's other worker will look there:
    # wait for it, then a few more connections so that both workers hold it in memory.
    procs.wait_until(lambda: _disk_objects(TWO_ADMIN) >= 1, "w2's disk copy", 30)
    for target, *_ in plan:
        for _ in range(20 if target is W2 else 1):
            procs.http_ok(target.url(path), target.host, timeout_s=10)
    filled = counter.take()
    if filled != len(plan):
        bench.problem(f"workers: warming {len(plan)} caches made {filled} origin requests")
    script = bench.run_dir / "workers.lua"
    script.write_text(wrk.lua_script())
    for target, threads, cpu, group, _ in plan:
        _run(bench, target, threads, cpu, group, path, script, 1.0)       # unmeasured warm-up
    counter.take()
    for round_index in range(bench.settings.rounds):
        for target, threads, cpu, group, _ in rotated(plan, round_index):
            result, own, client, other = _run(bench, target, threads, cpu, group, path, script,
                                              bench.settings.duration_s)
            row = rows[target.label]
            origin_requests = counter.take()
            row.rps.append(result.rps)
            row.own.append(own)
            row.client.append(client)
            row.other.append(other)
            row.p99.append(result.p99_ms)
            row.origin_requests += origin_requests
            row.errors += result.socket_errors + result.errors_status
            bench.log(f"workers {target.label} round {round_index + 1}: {result.rps:,.0f} req/s, CPU-s/s: server "
                      f"{own:.2f}, wrk {client:.2f}, other processes {other:.2f}; origin requests {origin_requests}")
            bench.record_run("workers 1 KiB", target.label, round_index + 1, result.rps,
                             f"p99 {result.p99_ms:.2f} ms", client, own, other, 0.0, origin_requests,
                             result.socket_errors + result.errors_status)
            if origin_requests or result.socket_errors or result.errors_status:
                bench.problem(f"workers {target.label}: {origin_requests} origin requests, "
                              f"{result.socket_errors} socket errors, {result.errors_status} statuses >= 400")
    return list(rows.values())


def _disk_objects(admin: Endpoint) -> float:
    with urllib.request.urlopen(f"{admin.url}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith('edge_cache_objects{tier="disk"}'):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def scaling(rows: list[Row]) -> tuple[float, float]:
    """(measured w2/w1 req/s, projected: 2 x w2's req/s per CPU-second over w1's)."""
    by = {r.target.label: r for r in rows}
    one, two = by[W1.label], by[W2.label]
    measured = two.median_rps / one.median_rps if one.median_rps else 0.0
    projected = 2 * two.per_cpu_second / one.per_cpu_second if one.per_cpu_second else 0.0
    return measured, projected


def table(rows: list[Row]) -> report.Table:
    out = report.Table("Workers: 1 KiB hits, one worker on one CPU, two on two, nginx worker_processes auto",
                       ["server", "where", "req/s", "p99 ms", "server CPU-s/s", "wrk CPU-s/s",
                        "other CPU-s/s (worst)", "req per server CPU-s", "origin reqs", "errors", "note"])
    for row in rows:
        worst = max(row.other, default=0.0)
        out.add(row.target.label, row.layout, report.rate(row.median_rps), report.ms(report.median(row.p99)),
                f"{report.median(row.own):.2f}", f"{report.median(row.client):.2f}", f"{worst:.2f}",
                report.rate(row.per_cpu_second), row.origin_requests, row.errors,
                "noisy" if worst > NOISY_OTHER else "")
    measured, projected = scaling(rows)
    by = {r.target.label: r for r in rows}
    out.notes.append("CPU-s/s: CPU seconds per second of wall time (user + system; the kernel's softirq work "
                     "for loopback traffic is in nobody's column). server: its process group (main process "
                     "and workers); wrk: its own rusage; other: every other process on the machine (other "
                     f"tenants), a row whose worst round is above {NOISY_OTHER:.2f} is marked noisy.")
    out.notes.append(f"2 workers on 2 CPUs / 1 worker on 1 CPU: measured {measured:.2f} x (wrk shares the two "
                     f"CPUs with the workers: a lower bound); at the measured requests per server CPU-second, "
                     f"two whole CPUs would give {projected:.2f} x (a projection, not a measurement).")
    out.notes.append(f"Node (2 workers) against nginx worker_processes auto, same two CPUs and same wrk -t2: "
                     f"{report.ratio(by[W2.label].median_rps, by[NGINX.label].median_rps)}.")
    return out


def verdicts(rows: list[Row]) -> list[targets.Verdict]:
    measured, projected = scaling(rows)
    note = (f"wrk on the same two CPUs (a lower bound); at the measured requests per server "
            f"CPU-second, two whole CPUs: {projected:.2f} x")
    if not {r.target.label: r for r in rows}[W1.label].median_rps:
        return [targets.Verdict("workers-scaling", "n/a", False, "no one-worker figure")]
    noisy = [r.target.label for r in rows if max(r.other, default=0.0) > NOISY_OTHER]
    if noisy:
        note = f"NOISY (other processes used the CPUs during: {', '.join(noisy)}): see every round; " + note
    return [targets.Verdict("workers-scaling", f"{measured:.2f} x", measured >= targets.WORKERS_SCALING and not noisy,
                            note)]


def summary(rows: list[Row]) -> str:
    """The all-CPU comparison, which the issue asks for without a goal."""
    by = {r.target.label: r for r in rows}
    return (f"Workers: 1 KiB hits on both CPUs, the node (2 workers) {report.rate(by[W2.label].median_rps)} req/s "
            f"against nginx worker_processes auto {report.rate(by[NGINX.label].median_rps)}: "
            f"{report.ratio(by[W2.label].median_rps, by[NGINX.label].median_rps)}")
