"""dnsperf: the command line and parsing its statistics block.

dnsperf 2.10 (Debian bookworm) reports mean, min, max and standard
deviation of latency but no percentiles, so the DNS table shows the mean.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def command(server: str, port: int, query_file: str, duration_s: float, source: str | None,
            outstanding: int = 100, clients: int = 1, threads: int = 1, timeout_s: float = 2.0) -> list[str]:
    argv = ["dnsperf", "-s", server, "-p", str(port), "-d", query_file, "-l", f"{duration_s:g}",
            "-c", str(clients), "-T", str(threads), "-q", str(outstanding), "-t", f"{timeout_s:g}"]
    if source:
        argv += ["-a", source]
    return argv


@dataclass(frozen=True)
class DnsperfResult:
    sent: int
    completed: int
    lost: int
    qps: float
    mean_latency_ms: float
    max_latency_ms: float
    stddev_ms: float
    rcodes: dict[str, int]

    @property
    def noerror_share(self) -> float:
        return self.rcodes.get("NOERROR", 0) / self.completed if self.completed else 0.0


class DnsperfParseError(ValueError):
    pass


def _number(pattern: str, text: str, what: str) -> float:
    match = re.search(pattern, text)
    if not match:
        raise DnsperfParseError(f"no {what} in dnsperf output")
    return float(match.group(1))


def parse(output: str) -> DnsperfResult:
    rcodes = {name: int(count) for name, count in
              re.findall(r"([A-Z]+) (\d+) \([\d.]+%\)", _line("Response codes:", output))}
    latency = re.search(r"Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", output)
    if not latency:
        raise DnsperfParseError("no average latency in dnsperf output")
    return DnsperfResult(
        sent=int(_number(r"Queries sent:\s+(\d+)", output, "queries sent")),
        completed=int(_number(r"Queries completed:\s+(\d+)", output, "queries completed")),
        lost=int(_number(r"Queries lost:\s+(\d+)", output, "queries lost")),
        qps=_number(r"Queries per second:\s+([\d.]+)", output, "queries per second"),
        mean_latency_ms=float(latency.group(1)) * 1e3,
        max_latency_ms=float(latency.group(3)) * 1e3,
        stddev_ms=_number(r"Latency StdDev \(s\):\s+([\d.]+)", output, "latency stddev") * 1e3,
        rcodes=rcodes,
    )


def _line(label: str, text: str) -> str:
    for line in text.splitlines():
        if line.strip().startswith(label):
            return line
    return ""
