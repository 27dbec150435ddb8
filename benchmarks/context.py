"""What every scenario shares: settings, the run directory, the processes, the log.

Settings come in two sizes: the full run the issue specifies and a quick
one (about two minutes) that keeps every scenario but shortens durations
and rounds and uses a smaller large object and trace; the report says which.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import Processes


@dataclass(frozen=True)
class Settings:
    mode: str
    rounds: int                 # rounds per comparison, in rotated server order
    duration_s: float           # one wrk or dnsperf run
    connections: int = 50       # wrk connections (1 thread)
    collapse_clients: int = 200
    collapse_delay_ms: int = 200
    large_bytes: int = 2**30
    trace_requests: int = 1_000_000
    trace_objects: int = 100_000
    trace_seed: int = 20260101
    trace_alphas: tuple[float, ...] = (0.8, 1.0)
    cache_shares: tuple[float, ...] = (0.01, 0.10)
    memory_urls: int = 300_000  # unique 1 KiB URLs the memory scenario sends its L1
    # The slices scenario's video-seek trace (issue 15): sessions over files of log-uniform size.
    video_sessions: int = 1000
    video_files: int = 50
    video_smallest: int = 200 * 2**20
    video_largest: int = 2 * 2**30
    video_concurrency: int = 8  # sessions in flight at once
    video_budget_s: float = 300.0   # wall time the unsliced L1 may take; the sliced one replays what it did


FULL = Settings(mode="full", rounds=3, duration_s=10.0)
QUICK = Settings(mode="quick", rounds=1, duration_s=3.0, large_bytes=256 * 2**20,
                 trace_requests=200_000, memory_urls=50_000, video_sessions=100, video_files=10,
                 video_smallest=50 * 2**20, video_largest=512 * 2**20, video_budget_s=60.0)


@dataclass
class Bench:
    settings: Settings
    run_dir: Path
    configs: dict[str, Path]
    processes: Processes
    commands: list[str] = field(default_factory=list)     # client commands, for the report
    problems: list[str] = field(default_factory=list)     # honesty checks that failed
    run_rows: list[list[str]] = field(default_factory=list)   # every measured run, for the appendix
    groups: dict[str, set[int]] = field(default_factory=dict)  # server label -> its process groups
    access_lines: dict[str, int] = field(default_factory=dict)  # logs-on server label -> lines it logged
    started_at: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        elapsed = time.monotonic() - self.started_at
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def record_command(self, command: str) -> None:
        if command not in self.commands:
            self.commands.append(command)

    def record_run(self, what: str, server: str, round_number: int, rate: float, latency: str,
                   client_busy: float, server_own: float, other_load: float, steal: float,
                   origin_requests: int | str, errors: int) -> None:
        self.run_rows.append([what, server, str(round_number), f"{rate:,.0f}", latency,
                              f"{client_busy:.0%}", f"{server_own:.0%}", f"{other_load:.0%}", f"{steal:.1%}",
                              str(origin_requests), str(errors),
                              "client-limited" if client_busy > 0.90 else ""])

    def problem(self, message: str) -> None:
        self.problems.append(message)
        self.log(f"PROBLEM: {message}")
