"""How to start each server of the benchmark and how to know it is ready.

Every function starts one server through :class:`~benchmarks.procs.Processes`
(so it is stopped on exit), pinned to the server CPU, and returns only once
the server answers, or raises after a deadline.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from benchmarks import layout, procs
from benchmarks.layout import Endpoint
from benchmarks.procs import Processes, Started

REPO_DIR = Path(__file__).resolve().parent.parent
START_DEADLINE_S = 60.0
LOG_LEVEL = "WARNING"


@dataclass(frozen=True)
class HttpTarget:
    """A server that answers cache-hit traffic, as the tables name it."""

    label: str
    endpoint: Endpoint
    host: str = layout.SITE_HOST
    caches: bool = True             # False for the bare handler, which has no origin

    def url(self, path: str) -> str:
        return f"{self.endpoint.url}{path}"


OURS = HttpTarget("edge L1", layout.L1)
NGINX = HttpTarget("nginx", layout.NGINX_L1)
VARNISH = HttpTarget("Varnish", layout.VARNISH)
ATS = HttpTarget("ATS", layout.ATS)
CEILING = HttpTarget("aiohttp bare", layout.CEILING, caches=False)


def _python_env() -> dict[str, str]:
    # The benchmark runs from a clone: make `edge` and `origin` importable
    # whether or not the project is installed.
    return {"PYTHONPATH": str(REPO_DIR)}


def _wait_http(processes: Processes, started: Started, url: str, host: str | None = None) -> None:
    procs.wait_until(lambda: procs.http_ok(url, host), f"{started.name} at {url}", START_DEADLINE_S,
                     alive=lambda: processes.check_alive(started))


def start_edge_node(processes: Processes, topology: Path, node: str, admin: Endpoint,
                    cpu: int | None = layout.SERVER_CPU) -> Started:
    """One node of our CDN (origin, l2, l1) via the product's own command line."""
    started = processes.start(
        node, [sys.executable, "-m", "edge", "run", node, "--config", str(topology), "--log-level", LOG_LEVEL],
        cpu=cpu, env=_python_env(), cwd=REPO_DIR)
    _wait_http(processes, started, f"{admin.url}/healthz")
    return started


def start_dns(processes: Processes, topology: Path, cpu: int | None = layout.SERVER_CPU) -> Started:
    started = processes.start(
        "dns", [sys.executable, "-m", "edge", "run", "dns", "--config", str(topology), "--log-level", LOG_LEVEL],
        cpu=cpu, env=_python_env(), cwd=REPO_DIR)
    _wait_dns(processes, started, layout.DNS, layout.SITE_CDN_NAME)
    return started


def _wait_dns(processes: Processes, started: Started, server: Endpoint, name: str) -> None:
    def answers() -> bool:
        query = dns.message.make_query(name, "A")
        try:
            dns.query.udp(query, server.host, port=server.port, timeout=0.5, source=layout.DNS_CLIENT_EAST)
        except dns.exception.Timeout:
            return False
        return True
    procs.wait_until(answers, f"{started.name} at {server}", START_DEADLINE_S,
                     alive=lambda: processes.check_alive(started))


def start_nginx(processes: Processes, name: str, conf: Path, run_dir: Path, ready_url: str,
                host: str | None = None) -> Started:
    started = processes.start(name, ["nginx", "-c", str(conf), "-p", str(run_dir), "-g", "daemon off;"],
                              cpu=layout.SERVER_CPU)
    _wait_http(processes, started, ready_url, host)
    return started


def start_varnish(processes: Processes, vcl: Path, run_dir: Path) -> Started:
    # One thread pool (the closest Varnish has to "one worker"); malloc storage
    # large enough that nothing is evicted during the run.
    argv = ["varnishd", "-F", "-a", str(layout.VARNISH), "-T", "none", "-f", str(vcl),
            "-n", str(run_dir / "varnish"), "-s", "malloc,1G", "-p", "thread_pools=1"]
    started = processes.start("varnish", argv, cpu=layout.SERVER_CPU)
    _wait_http(processes, started, f"{layout.VARNISH.url}/gen/ready?size=1", layout.SITE_HOST)
    return started


def start_ats(processes: Processes, runroot: Path) -> Started:
    started = processes.start("ats", ["traffic_server", f"--run-root={runroot}"], cpu=layout.SERVER_CPU)
    _wait_http(processes, started, f"{layout.ATS.url}/gen/ready?size=1", layout.SITE_HOST)
    return started


def start_knot(processes: Processes, conf: Path) -> Started:
    started = processes.start("knot", ["knotd", "-c", str(conf)], cpu=layout.SERVER_CPU)
    _wait_dns(processes, started, layout.KNOT, layout.SITE_CDN_NAME)
    return started


def start_ceiling(processes: Processes) -> Started:
    started = processes.start(
        "ceiling", [sys.executable, "-m", "benchmarks.ceiling", layout.CEILING.host, str(layout.CEILING.port)],
        cpu=layout.SERVER_CPU, env=_python_env(), cwd=REPO_DIR)
    _wait_http(processes, started, f"{layout.CEILING.url}/gen/ready?size=1")
    return started
