"""One pinned wrk run with its accounting: client and server CPU, steal.

A row is only as good as its load generator: if the client CPU was above
:data:`CLIENT_LIMITED_BUSY`, the figure measures wrk, not the server, and
the row says so.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from benchmarks import layout, procs, wrk
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow

CLIENT_LIMITED_BUSY = 0.90


@dataclass(frozen=True)
class LoadRun:
    result: wrk.WrkResult
    client_busy: float
    server_busy: float      # the server CPU, whoever used it
    server_own: float       # the server under test's own processes (CPU seconds per second)
    other_load: float       # process time on the server CPU that was not the server's (noise)
    steal: float            # across all CPUs

    @property
    def client_limited(self) -> bool:
        return self.client_busy > CLIENT_LIMITED_BUSY


def run_wrk(bench: Bench, url: str, host: str | None, script: str, script_name: str,
            groups: set[int] | None = None, duration_s: float | None = None,
            connections: int | None = None, record: bool = True) -> LoadRun:
    settings = bench.settings
    script_path = bench.run_dir / f"{script_name}.lua"
    script_path.write_text(script)
    argv = wrk.command(url, str(script_path), host, threads=1,
                       connections=connections or settings.connections,
                       duration_s=duration_s or settings.duration_s)
    if record:
        bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
    with CpuWindow(groups) as window:
        completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=(duration_s or settings.duration_s) + 60)
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()[-500:]}")
    return LoadRun(result=wrk.parse(completed.stdout),
                   client_busy=window.of(layout.CLIENT_CPU).busy,
                   server_busy=window.of(layout.SERVER_CPU).busy,
                   server_own=window.group_share,
                   other_load=window.other_load(layout.SERVER_CPU),
                   steal=window.of(None).steal)
