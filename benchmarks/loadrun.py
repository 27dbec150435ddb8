"""One pinned load-generator run with its accounting: client and server CPU, steal.

A row is only as good as its load generator: if the client CPU was above
:data:`CLIENT_LIMITED_BUSY`, the figure measures wrk, not the server, and
the row says so.  wrk's result is the model; the TLS scenario's other
clients (ab, h2load) give results with the same fields (:class:`ClientResult`).
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from benchmarks import layout, procs, report, wrk
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow
from benchmarks.servers import HttpTarget

CLIENT_LIMITED_BUSY = 0.90


class ClientResult(Protocol):
    """What a load generator's parsed output must tell (wrk's WrkResult has it all)."""

    @property
    def requests(self) -> int: ...
    @property
    def rps(self) -> float: ...
    @property
    def p99_ms(self) -> float: ...
    @property
    def socket_errors(self) -> int: ...
    @property
    def errors_status(self) -> int: ...


@dataclass(frozen=True)
class LoadRun:
    result: ClientResult
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
            connections: int | None = None, record: bool = True, headers: tuple[str, ...] = ()) -> LoadRun:
    settings = bench.settings
    script_path = bench.run_dir / f"{script_name}.lua"
    script_path.write_text(script)
    argv = wrk.command(url, str(script_path), host, threads=1,
                       connections=connections or settings.connections,
                       duration_s=duration_s or settings.duration_s, headers=headers)
    return run_client(bench, argv, lambda done: wrk.parse(done.stdout), groups,
                      timeout_s=(duration_s or settings.duration_s) + 60, record=record)


def run_client(bench: Bench, argv: Sequence[str], parse: Callable[[subprocess.CompletedProcess], ClientResult],
               groups: set[int] | None, timeout_s: float, record: bool = True) -> LoadRun:
    """Run one load generator pinned to the client CPU, and account for both CPUs meanwhile."""
    if record:
        bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
    with CpuWindow(groups) as window:
        completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=timeout_s)
    if completed.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({completed.returncode}): "
                           f"{(completed.stderr or completed.stdout).strip()[-500:]}")
    return LoadRun(result=parse(completed),
                   client_busy=window.of(layout.CLIENT_CPU).busy,
                   server_busy=window.of(layout.SERVER_CPU).busy,
                   server_own=window.group_share,
                   other_load=window.other_load(layout.SERVER_CPU),
                   steal=window.of(None).steal)


@dataclass
class LoadRuns:
    """The rounds measured for one target, and their medians and worst cases."""

    target: HttpTarget
    loads: list[LoadRun] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return report.median([run.result.rps for run in self.loads])

    @property
    def p99_ms(self) -> float:
        return report.median([run.result.p99_ms for run in self.loads])

    @property
    def client_busy(self) -> float:
        return max((run.client_busy for run in self.loads), default=0.0)

    @property
    def server_own(self) -> float:
        return report.median([run.server_own for run in self.loads])

    @property
    def other_load(self) -> float:
        return max((run.other_load for run in self.loads), default=0.0)

    @property
    def steal(self) -> float:
        return max((run.steal for run in self.loads), default=0.0)

    @property
    def socket_errors(self) -> int:
        return sum(run.result.socket_errors for run in self.loads)

    @property
    def bad_status(self) -> int:
        return sum(run.result.errors_status for run in self.loads)

    @property
    def client_limited(self) -> bool:
        return any(run.client_limited for run in self.loads)

    @property
    def errors(self) -> int:
        return self.socket_errors + self.bad_status
