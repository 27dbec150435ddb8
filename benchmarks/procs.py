"""Start the servers under test, wait until they answer, stop exactly them.

Every process is started by :class:`Processes` in its own session (so its
own process group), optionally pinned to a CPU with ``taskset``, with its
output in a log file.  Stopping is by the PIDs recorded here: SIGTERM, a
deadline, then SIGKILL to that process group (which holds only what we
started).  Readiness is always polled against a deadline, never slept for.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


class ReadinessError(RuntimeError):
    pass


@dataclass
class Started:
    name: str
    argv: list[str]
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def pinned(argv: Sequence[str], cpu: int | None) -> list[str]:
    """argv prefixed with taskset when a CPU is given."""
    return (["taskset", "-c", str(cpu)] if cpu is not None else []) + list(argv)


class Processes:
    """The processes of one benchmark run; a context manager that stops them all."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[Started] = []
        self.commands: list[str] = []     # every command line, for the report

    def __enter__(self) -> "Processes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], cpu: int | None = None,
              env: dict[str, str] | None = None, cwd: Path | None = None) -> Started:
        full = pinned(argv, cpu)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            process = subprocess.Popen(full, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        started = Started(name, full, process, log_path)
        self.started.append(started)
        self.commands.append(shlex.join(full))
        return started

    def stop(self, started: Started, deadline_s: float = 10.0) -> None:
        self._stop([started], deadline_s)

    def stop_all(self, deadline_s: float = 10.0) -> None:
        self._stop(list(reversed(self.started)), deadline_s)

    def _stop(self, targets: list[Started], deadline_s: float) -> None:
        """SIGTERM every PID at once; after a shared deadline, SIGKILL what is left.

        Children (nginx workers, varnish's cache process, ATS's crash logger)
        live in the process group whose id is our PID, so a server that
        outlives the deadline is killed by group, and only that group.
        """
        for started in targets:
            if started.process.poll() is None:
                try:
                    started.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        end = time.monotonic() + deadline_s
        for started in targets:
            try:
                started.process.wait(timeout=max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for started in targets:
            # Only while our leader is alive is its group id certainly ours
            # (once reaped, its PID could be reused by anyone).
            if started.process.poll() is None:
                try:
                    os.killpg(started.process.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                started.process.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                pass
            if started in self.started:
                self.started.remove(started)

    def check_alive(self, started: Started) -> None:
        code = started.process.poll()
        if code is not None:
            raise ReadinessError(f"{started.name} exited with status {code}; log {started.log_path}:\n"
                                 f"{started.log_tail()}")


def wait_until(probe: Callable[[], bool], what: str, deadline_s: float,
               alive: Callable[[], None] | None = None, interval_s: float = 0.05) -> None:
    """Poll ``probe`` until it returns True; fail after ``deadline_s`` seconds."""
    end = time.monotonic() + deadline_s
    last_error = ""
    while time.monotonic() < end:
        if alive is not None:
            alive()
        try:
            if probe():
                return
            last_error = "answered, but not yet as expected"
        except (OSError, urllib.error.URLError) as exc:
            last_error = str(exc)
        time.sleep(interval_s)
    raise ReadinessError(f"{what} not ready within {deadline_s:g}s ({last_error or 'probe said no'})")


def http_ok(url: str, host: str | None = None, timeout_s: float = 2.0,
            accept: Callable[[int], bool] = lambda status: 200 <= status < 300) -> bool:
    """One GET; True if the status is accepted.  Used only for readiness."""
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return accept(response.status)
    except urllib.error.HTTPError as exc:
        return accept(exc.code)


def tcp_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    with socket.create_connection((host, port), timeout=timeout_s):
        return True


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_client(argv: Sequence[str], cpu: int | None, timeout_s: float) -> subprocess.CompletedProcess:
    """Run a load generator to completion (bounded by its own duration and a timeout)."""
    return subprocess.run(pinned(argv, cpu), capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL)


def run_client_until(argv: Sequence[str], cpu: int | None, done: Callable[[], bool], timeout_s: float,
                     poll_s: float = 0.5) -> subprocess.CompletedProcess:
    """Run a load generator until ``done()`` says so (or `timeout_s`), then SIGINT it, by its PID.

    For wrk, whose ``-d`` is a sleep its threads cannot end early: on SIGINT it
    stops, prints its report and runs the script's ``done()``, as at the end
    of its duration.
    """
    process = subprocess.Popen(pinned(argv, cpu), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL)
    end = time.monotonic() + timeout_s
    try:
        while process.poll() is None and time.monotonic() < end:
            try:
                if done():
                    break
            except (OSError, urllib.error.URLError):
                pass                    # asked again at the next poll
            time.sleep(poll_s)
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
