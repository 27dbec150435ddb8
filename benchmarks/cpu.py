"""CPU accounting from /proc/stat: how busy each CPU was, and hypervisor steal.

A benchmark row is only honest if we know the load generator was not the
bottleneck (its CPU under 90%) and whether the hypervisor took time away
(steal).  The arithmetic is pure and works on two text snapshots of
/proc/stat; only :func:`snapshot` reads the file.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")

# /proc/stat field order after the "cpuN" label (see proc(5)).  guest and
# guest_nice are already included in user and nice, so they are not summed.
_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative jiffies of one CPU line ("cpu" for all, "cpu0", "cpu1", ...)."""

    user: int = 0
    nice: int = 0
    system: int = 0
    idle: int = 0
    iowait: int = 0
    irq: int = 0
    softirq: int = 0
    steal: int = 0

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in _FIELDS)

    @property
    def idle_all(self) -> int:
        # iowait is time the CPU had nothing to run; count it as idle.
        return self.idle + self.iowait


@dataclass(frozen=True)
class CpuUsage:
    """Shares (0..1) of one CPU's time between two snapshots."""

    busy: float     # user + nice + system + irq + softirq (not idle, not steal)
    steal: float    # taken by the hypervisor for other guests
    tasks: float = 0.0  # user + nice + system: time charged to processes (irq work is not)


def parse_proc_stat(text: str) -> dict[str, CpuTimes]:
    """Map "cpu", "cpu0", "cpu1", ... to their cumulative times."""
    cpus: dict[str, CpuTimes] = {}
    for line in text.splitlines():
        if not line.startswith("cpu"):
            continue
        label, *values = line.split()
        numbers = [int(v) for v in values[: len(_FIELDS)]]
        numbers += [0] * (len(_FIELDS) - len(numbers))   # old kernels lack steal
        cpus[label] = CpuTimes(*numbers)
    return cpus


def usage(before: CpuTimes, after: CpuTimes) -> CpuUsage:
    """Busy and steal shares of the interval between two snapshots of one CPU."""
    elapsed = after.total - before.total
    if elapsed <= 0:
        return CpuUsage(busy=0.0, steal=0.0)
    idle = after.idle_all - before.idle_all
    steal = after.steal - before.steal
    busy = elapsed - idle - steal
    tasks = (after.user + after.nice + after.system) - (before.user + before.nice + before.system)
    return CpuUsage(busy=max(0.0, busy / elapsed), steal=max(0.0, steal / elapsed),
                    tasks=max(0.0, tasks / elapsed))


def usage_by_cpu(before_text: str, after_text: str) -> dict[str, CpuUsage]:
    """Usage of every CPU line present in both snapshots."""
    before, after = parse_proc_stat(before_text), parse_proc_stat(after_text)
    return {label: usage(before[label], after[label]) for label in after if label in before}


def snapshot() -> str:
    return PROC_STAT.read_text()


def parse_pid_stat(text: str) -> tuple[int, int]:
    """(process group, utime + stime in clock ticks) from one /proc/PID/stat line."""
    # The command name is in parentheses and may itself hold spaces or ')'.
    rest = text[text.rfind(")") + 2:].split()
    # rest[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    return int(rest[2]), int(rest[11]) + int(rest[12])


def group_cpu_seconds(groups: set[int]) -> float:
    """CPU seconds used so far by every live process in these process groups."""
    ticks = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            group, used = parse_pid_stat((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue            # the process ended while we looked
        if group in groups:
            ticks += used
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuWindow:
    """Measures CPU usage over a block: ``with CpuWindow(groups) as w: ...; w.usage``.

    ``groups`` are the process groups of the server under test: their own
    CPU time tells the server's share apart from whatever else ran on its CPU.
    """

    def __init__(self, groups: set[int] | None = None) -> None:
        self.groups = groups or set()
        self._before = ""
        self._group_before = 0.0
        self._started = 0.0
        self.usage: dict[str, CpuUsage] = {}
        self.group_share = 0.0      # CPU seconds of the groups per wall second

    def __enter__(self) -> "CpuWindow":
        self._before = snapshot()
        self._group_before = group_cpu_seconds(self.groups) if self.groups else 0.0
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.usage = usage_by_cpu(self._before, snapshot())
        wall = time.monotonic() - self._started
        if self.groups and wall > 0:
            self.group_share = (group_cpu_seconds(self.groups) - self._group_before) / wall

    def of(self, cpu: int | None) -> CpuUsage:
        """Usage of one CPU by number, or of all CPUs together for None."""
        return self.usage.get("cpu" if cpu is None else f"cpu{cpu}", CpuUsage(0.0, 0.0))

    def other_load(self, cpu: int) -> float:
        """Process time on ``cpu`` not used by the watched groups (other tenants, helpers)."""
        return max(0.0, self.of(cpu).tasks - self.group_share)
