"""How to start each server of the benchmark and how to know it is ready.

Every function starts one server through :class:`~benchmarks.procs.Processes`
(so it is stopped on exit), pinned to the server CPU, and returns only once
the server answers, or raises after a deadline.
"""

from __future__ import annotations

import re
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
LOG_LEVEL = "WARNING"           # our quiet nodes; the "logs on" L1 runs at the default (INFO)
L1_LOGS_NODE = "l1-logs"        # its name in topology.toml and in the run's logs/ directory


@dataclass(frozen=True)
class HttpTarget:
    """A server that answers cache-hit traffic, as the tables name it."""

    label: str
    endpoint: Endpoint
    host: str = layout.SITE_HOST
    caches: bool = True             # False for the bare handlers, which have no origin
    logs: bool = False              # True: access log on, as operators run it
    # Where its access lines go, relative to the run directory (logs-on only).
    access_log: str | None = None

    def url(self, path: str) -> str:
        return f"{self.endpoint.url}{path}"

    @property
    def tag(self) -> str:
        """The label as a URL-safe word, for per-server object names."""
        return re.sub(r"[^a-z0-9]+", "-", self.label.lower()).strip("-")


OURS = HttpTarget("edge L1, logs off", layout.L1)
NGINX = HttpTarget("nginx, logs off", layout.NGINX_L1)
OURS_LOGS = HttpTarget("edge L1, logs on", layout.L1_LOGS, logs=True, access_log=f"logs/{L1_LOGS_NODE}.log")
NGINX_LOGS = HttpTarget("nginx, logs on", layout.NGINX_L1_LOGS, logs=True, access_log="nginx-access.log")
VARNISH = HttpTarget("Varnish, logs off", layout.VARNISH)
ATS = HttpTarget("ATS, logs off", layout.ATS)
CEILING = HttpTarget("bare aiohttp (Python ceiling)", layout.CEILING, caches=False)
CEILING_HTTPTOOLS = HttpTarget("bare httptools+uvloop (Python ceiling)", layout.CEILING_HTTPTOOLS, caches=False)


def _python_env() -> dict[str, str]:
    # The benchmark runs from a clone: make `edge` and `origin` importable
    # whether or not the project is installed.
    return {"PYTHONPATH": str(REPO_DIR)}


def _wait_http(processes: Processes, started: Started, url: str, host: str | None = None) -> None:
    procs.wait_until(lambda: procs.http_ok(url, host), f"{started.name} at {url}", START_DEADLINE_S,
                     alive=lambda: processes.check_alive(started))


def start_edge_node(processes: Processes, topology: Path, node: str, admin: Endpoint,
                    cpu: int | None = layout.SERVER_CPU, log_level: str | None = LOG_LEVEL) -> Started:
    """One node of our CDN (origin, l2, l1) via the product's own command line.

    ``log_level=None`` leaves ``--log-level`` at the product's default.  The
    node's stdout and stderr (its access log when ``access_log = "-"``) go to
    ``logs/NODE.log`` in the run directory.
    """
    argv = [sys.executable, "-m", "edge", "run", node, "--config", str(topology)]
    if log_level is not None:
        argv += ["--log-level", log_level]
    started = processes.start(node, argv, cpu=cpu, env=_python_env(), cwd=REPO_DIR)
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


def start_ceiling(processes: Processes, name: str = "ceiling", module: str = "benchmarks.ceiling",
                  endpoint: Endpoint = layout.CEILING) -> Started:
    """A bare Python server answering /gen/ (benchmarks.ceiling or benchmarks.ceiling_httptools)."""
    started = processes.start(
        name, [sys.executable, "-m", module, endpoint.host, str(endpoint.port)],
        cpu=layout.SERVER_CPU, env=_python_env(), cwd=REPO_DIR)
    _wait_http(processes, started, f"{endpoint.url}/gen/ready?size=1")
    return started


def start_ceiling_dns(processes: Processes) -> Started:
    """benchmarks.ceiling_dns: Python's ceiling for a DNS answer."""
    started = processes.start(
        "ceiling-dns", [sys.executable, "-m", "benchmarks.ceiling_dns", layout.CEILING_DNS.host,
                        str(layout.CEILING_DNS.port)],
        cpu=layout.SERVER_CPU, env=_python_env(), cwd=REPO_DIR)
    _wait_dns(processes, started, layout.CEILING_DNS, layout.SITE_CDN_NAME)
    return started


def start_ceiling_httptools(processes: Processes) -> Started:
    return start_ceiling(processes, "ceiling-httptools", "benchmarks.ceiling_httptools", layout.CEILING_HTTPTOOLS)
