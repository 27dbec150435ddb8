"""``python -m benchmarks``: install, start every server, measure, stop, report.

Order of work: install missing Debian packages, render every config into a
fresh temporary run directory, start the servers the chosen scenarios need
(each pinned to the server CPU, each waited for with a deadline), pin this
process to the client CPU, run the scenarios, stop every process this run
started (also on Ctrl-C, SIGTERM or an exception), then print the report
and write it to ``benchmarks/results/latest.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import cpu, install, layout, peers, procs, report, servers, targets
from benchmarks.context import FULL, QUICK, Bench
from benchmarks.procs import Processes, Started
from benchmarks.scenarios import collapse, dns, hit, hitratio, large, memory, miss, slices, tls, workers

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SCENARIOS = ("hit", "collapse", "miss", "large", "hitratio", "dns", "memory", "tls", "workers", "slices")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Measure the CDN against nginx, Varnish, ATS and knotd.")
    parser.add_argument("--quick", action="store_true",
                        help="about two minutes: 1 round of 3 s, 256 MiB large object, 200k-request trace, "
                             "50k URLs for the memory scenario")
    parser.add_argument("--only", default=",".join(SCENARIOS),
                        help=f"comma-separated scenarios to run (default all: {','.join(SCENARIOS)})")
    parser.add_argument("--skip-install", action="store_true", help="do not apt-get missing tools")
    parser.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                        help="also profile the L1 (hit and miss path) and the DNS scheduler with py-spy for SECONDS each (installs py-spy)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.md",
                        help="where to write the Markdown report (default benchmarks/results/latest.md)")
    parser.add_argument("--smoke", action="store_true",
                        help="only start every server, send one request through each, stop (no load)")
    parser.add_argument("--keep-run-dir", action="store_true", help="keep configs, caches and logs")
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)} (have: {', '.join(SCENARIOS)})", file=sys.stderr)
        return 2
    if (os.cpu_count() or 1) < 2:
        print("the benchmark needs two CPUs (server and client pinned apart)", file=sys.stderr)
        return 2
    if not args.skip_install:
        install.ensure_installed(log=lambda m: print(m, file=sys.stderr))

    signal.signal(signal.SIGTERM, _raise_interrupt)
    settings = QUICK if args.quick else FULL
    run_dir = Path(tempfile.mkdtemp(prefix="edge-bench-"))
    configs = peers.render_all(run_dir)
    stat_before = cpu.snapshot()
    processes = Processes(run_dir / "logs")
    bench = Bench(settings=settings, run_dir=run_dir, configs=configs, processes=processes)
    bench.log(f"{settings.mode} run, scenarios {', '.join(chosen)}; run directory {run_dir}")
    tables: list[report.Table] = []
    summary: list[str] = []
    ok = False
    try:
        with processes:
            commit = product_version()
            started = start_servers(bench, chosen)
            bench.groups = server_groups(started)
            if args.smoke:
                smoke(bench, started)
                ok = True
                return 0
            # Everything this process does from here is client work.
            os.sched_setaffinity(0, {layout.CLIENT_CPU})
            tables, summary = run_scenarios(bench, chosen, started)
            if bench.run_rows:
                tables.append(report.Table(
                    "Every measured run", ["scenario", "server", "round", "req/s or QPS", "latency",
                                           "client CPU", "server CPU", "other on server CPU", "steal",
                                           "origin reqs", "errors", "note"], bench.run_rows,
                    ["errors: socket errors + status >= 400 (wrk), or lost queries (dnsperf)."]))
            if args.profile > 0:
                tables += profiles(bench, started, args.profile)
        ok = True
    except KeyboardInterrupt:
        bench.log("interrupted: every server this run started has been stopped")
        return 130
    finally:
        if not ok or args.keep_run_dir:
            bench.log(f"run directory kept: {run_dir} (logs in {run_dir / 'logs'})")
        else:
            # Caches of the miss path hold hundreds of thousands of files: say why we wait.
            bench.log(f"removing the run directory {run_dir}")
            shutil.rmtree(run_dir, ignore_errors=True)

    steal = cpu.usage_by_cpu(stat_before, cpu.snapshot()).get("cpu", cpu.CpuUsage(0, 0)).steal
    text = report.render(report.Report(
        title=f"Benchmark results ({settings.mode} run)",
        summary=summary + [f"Honesty checks failed: {len(bench.problems)}"] + [f"PROBLEM: {p}" for p in bench.problems],
        tables=tables,
        environment=environment(settings.mode, steal, commit),
        commands=[shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:] if argv is None else argv)])]
                 + processes.commands + bench.commands))
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    bench.log(f"report written to {args.output}")
    return 0


def start_servers(bench: Bench, chosen: list[str]) -> dict[str, Started]:
    """Start what the chosen scenarios need; every start waits for readiness."""
    need = set(chosen)
    p, c, run_dir = bench.processes, bench.configs, bench.run_dir
    topology = c["topology"]
    started: dict[str, Started] = {}
    uses_origin = need & {"hit", "collapse", "large", "tls"}
    uses_edge = need & {"hit", "collapse", "miss", "large", "dns", "tls"}
    uses_nginx = need & {"hit", "collapse", "miss", "large", "tls"}
    bench.log("starting servers")
    if uses_origin:
        started["origin"] = servers.start_edge_node(p, topology, "origin", layout.ORIGIN_ADMIN)
    if "miss" in need:
        started["fast_origin"] = servers.start_nginx(p, "fast-origin", c["fast_origin"], run_dir,
                                                     f"{layout.FAST_ORIGIN.url}/gen/ready")
    if uses_edge:
        started["l2"] = servers.start_edge_node(p, topology, "l2", layout.L2_ADMIN)
        started["l1"] = servers.start_edge_node(p, topology, "l1", layout.L1_ADMIN)
    if "miss" in need:
        started["nginx_l2"] = servers.start_nginx(p, "nginx-l2", c["nginx_l2"], run_dir,
                                                  f"{layout.NGINX_L2.url}/gen/ready", layout.FAST_SITE_HOST)
    if uses_nginx:
        ready = (f"{layout.NGINX_L1.url}/gen/ready?size=1", layout.SITE_HOST) if uses_origin else \
                (f"{layout.NGINX_L1.url}/gen/ready", layout.FAST_SITE_HOST)
        started["nginx_l1"] = servers.start_nginx(p, "nginx-l1", c["nginx_l1"], run_dir, *ready)
    if need & {"hit", "collapse"}:
        started["varnish"] = servers.start_varnish(p, c["varnish"], run_dir)
    if need & {"hit", "tls"}:
        # The hit scenario's logs-on nginx; its HTTPS server logs the tls scenario's resumption check.
        started["nginx_l1_logs"] = servers.start_nginx(p, "nginx-l1-logs", c["nginx_l1_logs"], run_dir,
                                                       f"{layout.NGINX_L1_LOGS.url}/gen/ready?size=1",
                                                       layout.SITE_HOST)
    if "hit" in need:
        # The "logs on" pair: our L1 at its default log settings, nginx with a buffered access log.
        started["l1_logs"] = servers.start_edge_node(p, topology, servers.L1_LOGS_NODE, layout.L1_LOGS_ADMIN,
                                                     log_level=None)
        started["ats"] = servers.start_ats(p, c["ats_runroot"])
        started["ceiling"] = servers.start_ceiling(p)
        started["ceiling_httptools"] = servers.start_ceiling_httptools(p)
    if "memory" in need:
        started["mem_origin"] = servers.start_nginx(p, "mem-origin", c["mem_origin"],
                                                    run_dir / peers.MEM_ORIGIN_DIR,
                                                    f"{layout.MEM_ORIGIN.url}/gen/ready")
        started["l1_mem"] = servers.start_edge_node(p, c["memory_topology"], memory.NODE, layout.MEM_L1_ADMIN)
    if "dns" in need:
        started["l1_west"] = servers.start_edge_node(p, topology, "l1-west", layout.L1_WEST_ADMIN)
        started["dns"] = servers.start_dns(p, topology)
        started["knot"] = servers.start_knot(p, c["knot"])
        started["ceiling_dns"] = servers.start_ceiling_dns(p)
    if "workers" in need:
        started.update({f"workers_{name}": proc for name, proc in workers.start(bench).items()})
    if "slices" in need:
        started.update({f"slices_{name}": proc for name, proc in slices.start(bench).items()})
    bench.log(f"started {len(started)} servers: {', '.join(started)}")
    return started


def server_groups(started: dict[str, Started]) -> dict[str, set[int]]:
    """Each measured server's process groups (each start made its own group)."""
    def groups(*names: str) -> set[int]:
        return {started[n].pid for n in names if n in started}
    return {
        servers.OURS.label: groups("l1"),
        servers.NGINX.label: groups("nginx_l1"),
        servers.OURS_LOGS.label: groups("l1_logs"),
        servers.NGINX_LOGS.label: groups("nginx_l1_logs"),
        servers.VARNISH.label: groups("varnish"),
        servers.ATS.label: groups("ats"),
        servers.CEILING.label: groups("ceiling"),
        servers.CEILING_HTTPTOOLS.label: groups("ceiling_httptools"),
        miss.OURS.label: groups("l1", "l2", "fast_origin"),
        miss.NGINX.label: groups("nginx_l1", "nginx_l2", "fast_origin"),
        dns.SCHEDULER.label: groups("dns"),
        dns.KNOT.label: groups("knot"),
        dns.CEILING.label: groups("ceiling_dns"),
        tls.OURS.label: groups("l1"),
        tls.NGINX.label: groups("nginx_l1"),
    }


def smoke(bench: Bench, started: dict[str, Started]) -> None:
    """One request through every HTTP server and one query to every DNS server."""
    for target, needs in ((servers.OURS, "l1"), (servers.NGINX, "nginx_l1"), (servers.OURS_LOGS, "l1_logs"),
                          (servers.NGINX_LOGS, "nginx_l1_logs"), (servers.VARNISH, "varnish"),
                          (servers.ATS, "ats"), (servers.CEILING, "ceiling"),
                          (servers.CEILING_HTTPTOOLS, "ceiling_httptools"),
                          (miss.OURS, "fast_origin"), (miss.NGINX, "nginx_l2")):
        if needs not in started:
            continue
        url = target.url("/gen/smoke?size=1024&cc=max-age=60")
        answered = procs.http_ok(url, target.host, timeout_s=10)
        bench.log(f"smoke {target.label} ({target.host}): {'ok' if answered else 'FAILED'}")
    if "l1_mem" in started:
        answered = procs.http_ok(f"{layout.MEM_L1.url}/gen/m-smoke", layout.MEM_SITE_HOST, timeout_s=10)
        bench.log(f"smoke memory L1 ({layout.MEM_SITE_HOST}): {'ok' if answered else 'FAILED'}")
    for target, needs in ((tls.OURS, "l1"), (tls.NGINX, "nginx_l1")):
        if needs in started:
            path = "/gen/smoke-tls?size=1024&cc=max-age=60"
            status, _ = tls.https_get(target.endpoint, target.host, path, bench.configs["tls_ca"], timeout_s=10)
            bench.log(f"smoke {target.label} ({target.host}, certificate verified): "
                      f"{'ok' if 200 <= status < 300 else f'FAILED ({status})'}")
    if "dns" in started:
        bench.log("smoke DNS: " + "; ".join(dns.check_nearest(bench)))
        knot = dns.answer_addresses(layout.KNOT, layout.SITE_CDN_NAME, layout.DNS_CLIENT_EAST)
        bench.log(f"smoke knotd: {', '.join(knot) or 'no A'}")


# The hit scenario's servers: logs off (with the peers and the ceilings), then logs on.
HIT_TARGETS = [servers.OURS, servers.NGINX, servers.VARNISH, servers.ATS, servers.CEILING,
               servers.CEILING_HTTPTOOLS, servers.OURS_LOGS, servers.NGINX_LOGS]


def run_scenarios(bench: Bench, chosen: list[str], started: dict[str, Started]) -> tuple[list[report.Table], list[str]]:
    s = bench.settings
    tables: list[report.Table] = []
    summary: list[str] = []
    verdicts: list[targets.Verdict] = []
    if "hit" in chosen:
        runs = hit.measure(bench, HIT_TARGETS)
        tables.append(hit.table(runs, bench.access_lines))
        verdicts += hit.verdicts(runs)
    if "collapse" in chosen:
        results = collapse.measure(bench, [servers.OURS, servers.NGINX, servers.VARNISH])
        tables.append(collapse.table(results, s.collapse_clients, s.collapse_delay_ms))
        verdicts.append(collapse.verdict(results[0]))
    if "miss" in chosen:
        runs = miss.measure(bench, [miss.OURS, miss.NGINX])
        tables.append(miss.table(runs))
        verdicts += [v for v in [miss.verdict(runs)] if v]
    if "large" in chosen:
        results = [large.measure(bench, servers.OURS, started["l1"], slow_client=True),
                   large.measure(bench, servers.NGINX, None)]
        tables.append(large.table(results, s.large_bytes))
        verdicts += large.verdicts(*results)
    if "hitratio" in chosen:
        results = hitratio.measure(bench)
        tables.append(hitratio.table(results, s.trace_requests, s.trace_objects, s.trace_seed))
        worst = min(r.store.byte_ratio - r.lru.byte_ratio for r in results)
        summary.append(f"Hit ratio: store byte hit ratio at worst {worst:+.4f} against exact LRU")
    if "dns" in chosen:
        runs, nearest, cache = dns.measure(bench)
        tables.append(dns.table(runs, nearest, cache))
        verdicts += [v for v in [dns.verdict(runs)] if v]
        flood = dns.measure_flood(bench, started["dns"])
        tables.append(dns.flood_table(flood))
        verdicts.append(dns.flood_verdict(flood))
    if "workers" in chosen:
        rows = workers.measure(bench, {name.removeprefix("workers_"): proc for name, proc in started.items()
                                       if name.startswith("workers_")})
        tables.append(workers.table(rows))
        verdicts += workers.verdicts(rows)
        summary.append(workers.summary(rows))
    if "memory" in chosen:
        result = memory.measure(bench, started["l1_mem"])
        tables.append(memory.table(result))
        verdicts.append(memory.verdict(result))
    if "slices" in chosen:
        result = slices.measure(bench, {name.removeprefix("slices_"): proc for name, proc in started.items()
                                        if name.startswith("slices_")})
        tables += slices.tables(result, s.large_bytes)
        verdicts += slices.verdicts(result)
        summary.append(slices.summary(result))
    if "tls" in chosen:
        runs, resumption = tls.measure(bench, [tls.OURS, tls.NGINX])
        tables.append(tls.table(runs, resumption))
        verdicts += tls.verdicts(runs)
        summary.append(tls.summary(runs))
    summary.insert(0, targets.summary(s, verdicts))
    tables.insert(0, targets.table(s, verdicts, set(chosen)))
    return tables, summary


def profiles(bench: Bench, started: dict[str, Started], seconds: float) -> list[report.Table]:
    """py-spy profiles of the processes the chosen scenarios started (not measured runs)."""
    from benchmarks import profile
    out = []
    if "origin" in started and "l1" in started:
        out.append(profile.profile_hit_path(bench, started["l1"], seconds))
    if "fast_origin" in started and "l1" in started:
        out.append(profile.profile_miss_path(bench, started["l1"], seconds))
    if "dns" in started:
        out.append(profile.profile_scheduler(bench, started["dns"], seconds))
    return out


def product_version() -> str:
    """The commit the servers run, and whether the product's files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(servers.REPO_DIR), *args],
                              capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "edge", "origin")
    return f"{commit} plus uncommitted changes to edge/ or origin/" if changed else commit


def environment(mode: str, steal: float, commit: str) -> list[tuple[str, str]]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    rows = [
        ("date (UTC)", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")),
        ("mode", mode),
        ("machine", f"{os.cpu_count()} CPUs, {model}, Linux {platform.release()}"),
        ("pinning", f"server under test on CPU {layout.SERVER_CPU}, load generator on CPU {layout.CLIENT_CPU}"),
        ("hypervisor steal over the run", f"{steal * 100:.1f}% (from /proc/stat)"),
        ("edge commit (when the servers started)", commit),
        ("python", platform.python_version()),
    ]
    for module in ("aiohttp", "httptools", "uvloop"):
        try:
            rows.append((module, __import__(module).__version__))
        except ImportError:
            pass
    return rows + install.versions()
