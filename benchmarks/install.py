"""Install the peers and load generators from Debian when they are missing.

Installing a server package may start its system service.  Those services
would hold ports and CPU during the measurement, so the install runs with a
policy-rc.d that forbids starting services (as scripts/test.sh does), and
afterwards any service process that appeared during it anyway is stopped,
by PID; any that were already running before are left alone (not ours).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tool:
    binary: str           # what must be on PATH
    package: str          # the Debian package providing it
    version_argv: tuple[str, ...]


TOOLS = (
    Tool("nginx", "nginx", ("nginx", "-v")),
    Tool("varnishd", "varnish", ("varnishd", "-V")),
    Tool("traffic_server", "trafficserver", ("traffic_server", "-V")),
    Tool("wrk", "wrk", ("wrk", "-v")),
    Tool("h2load", "nghttp2-client", ("h2load", "--version")),
    Tool("ab", "apache2-utils", ("ab", "-V")),
    Tool("dnsperf", "dnsperf", ("dnsperf", "-h")),
    Tool("knotd", "knot", ("knotd", "-V")),
    Tool("taskset", "util-linux", ("taskset", "--version")),
    Tool("curl", "curl", ("curl", "--version")),
)

POLICY_RC_D = Path("/usr/sbin/policy-rc.d")

# Process names a package's service would run under.
SERVICE_PROCESS_NAMES = ("nginx", "varnishd", "cache-main", "traffic_server", "traffic_manager", "knotd")


def missing(tools: tuple[Tool, ...] = TOOLS) -> list[Tool]:
    return [tool for tool in tools if shutil.which(tool.binary) is None
            and not Path("/usr/sbin", tool.binary).exists()]


def service_pids() -> set[int]:
    """PIDs of running processes whose name is one a service would use."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if name in SERVICE_PROCESS_NAMES:
            pids.add(int(entry.name))
    return pids


def _apt_get(args: list[str], attempts: int = 20, wait_s: float = 6.0) -> None:
    """Run apt-get, retrying while another apt holds the lock."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in range(attempts):
        result = subprocess.run(["apt-get", *args], capture_output=True, text=True, env=env)
        if result.returncode == 0:
            return
        locked = "Could not get lock" in result.stderr or "Unable to acquire" in result.stderr
        if not locked or attempt == attempts - 1:
            raise RuntimeError(f"apt-get {' '.join(args)} failed:\n{result.stderr[-2000:]}")
        time.sleep(wait_s)


def ensure_installed(log: Callable[[str], None] = print) -> list[str]:
    """Install what is missing; returns the package names installed."""
    need = missing()
    if not need:
        return []
    if os.geteuid() != 0:
        names = " ".join(sorted({t.package for t in need}))
        raise RuntimeError(f"missing tools and not root: run `sudo apt-get install {names}`")
    packages = sorted({tool.package for tool in need})
    log(f"installing {' '.join(packages)} with apt-get")
    before = service_pids()
    # policy-rc.d exiting 101 tells the packages' scripts not to start their
    # services at all; anything that starts anyway is stopped below.
    created_policy = not POLICY_RC_D.exists()
    if created_policy:
        POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC_D.chmod(0o755)
    try:
        try:
            _apt_get(["install", "-y", "--no-install-recommends", *packages])
        except RuntimeError:
            _apt_get(["update"])
            _apt_get(["install", "-y", "--no-install-recommends", *packages])
    finally:
        if created_policy:
            POLICY_RC_D.unlink(missing_ok=True)
    stop_new_services(before, log)
    still = missing()
    if still:
        raise RuntimeError(f"still missing after apt-get: {', '.join(t.binary for t in still)}")
    return packages


def stop_new_services(before: set[int], log: Callable[[str], None] = print) -> None:
    """Stop the service processes the install started (not any that ran before)."""
    for pid in sorted(service_pids() - before):
        try:
            os.kill(pid, signal.SIGTERM)
            log(f"stopped service process {pid} started by the package install")
        except ProcessLookupError:
            pass


def versions() -> list[tuple[str, str]]:
    """(tool, first line of its version output) for the report."""
    out = []
    for tool in TOOLS:
        try:
            result = subprocess.run(list(tool.version_argv), capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            out.append((tool.binary, "not installed"))
            continue
        text = (result.stdout + result.stderr).strip()
        lines = [line for line in text.splitlines() if line.strip()]
        first = lines[0] if lines else "unknown"
        if tool.binary == "dnsperf":
            first = next((line for line in lines if "DNS Performance" in line or "version" in line.lower()),
                         _dpkg_version(tool.package))
        out.append((tool.binary, first.strip()))
    return out


def _dpkg_version(package: str) -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    return f"{package} {result.stdout.strip()}" if result.returncode == 0 else "unknown"
