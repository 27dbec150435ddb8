"""Where the time goes: py-spy on the L1 (hit and miss path) and the scheduler, under load.

py-spy samples the running L1 (only while its thread is on CPU, idle time
is left out) and writes collapsed stacks; this module folds them into the
functions that hold the most samples, by self time (the leaf frame) and by
inclusive time (anywhere on the stack).  The folding is pure and tested;
py-spy is installed into this interpreter's environment on first use.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from benchmarks import dnsperf, layout, procs, report, wrk
from benchmarks.context import Bench
from benchmarks.procs import Started
from benchmarks.scenarios.hit import object_path
from benchmarks.servers import OURS

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_LINE_NUMBER = re.compile(r"[:]\d+\)$")


def frame_name(frame: str) -> str:
    """'handle (aiohttp/web_protocol.py:512)' -> 'handle (aiohttp/web_protocol.py)'."""
    return _LINE_NUMBER.sub(")", frame.strip())


def source_file(name: str) -> str:
    """'handle (aiohttp/web_protocol.py)' -> 'aiohttp/web_protocol.py'."""
    start = name.rfind("(")
    return name[start + 1:-1] if start >= 0 and name.endswith(")") else name


def by_file(self_samples: Counter) -> Counter:
    """Self samples summed per source file: which module the time goes to."""
    files: Counter = Counter()
    for name, count in self_samples.items():
        files[source_file(name)] += count
    return files


# Leaves that are a thread blocked in C (py-spy cannot always tell such a
# thread is idle): an executor worker waiting on its queue.
IDLE_LEAVES = frozenset({"_worker (concurrent/futures/thread.py)"})


def fold(collapsed: str) -> tuple[Counter, Counter, int]:
    """(self samples by function, inclusive samples by function, total samples).

    Stacks whose leaf is an idle wait (:data:`IDLE_LEAVES`) are left out.
    """
    self_samples: Counter = Counter()
    inclusive: Counter = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rstrip().rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";") if f.strip()]
        if not frames or frames[-1] in IDLE_LEAVES:
            continue
        total += count
        self_samples[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    return self_samples, inclusive, total


def py_spy() -> str:
    """The py-spy binary, installed with pip into this environment if missing."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found:
        return found
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    return str(beside) if beside.exists() else "py-spy"


def profile_under_load(bench: Bench, pid: int, name: str, load_argv: list[str],
                       seconds: float) -> tuple[Counter, Counter, int]:
    """Sample one process with py-spy while ``load_argv`` (pinned to the client CPU) runs."""
    load = subprocess.Popen(procs.pinned(load_argv, layout.CLIENT_CPU),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    output = bench.run_dir / f"profile-{name}.collapsed"
    # Blocking mode (py-spy pauses the process for each sample) gives whole
    # stacks; --nonblocking truncates half of them.  These runs are not measured.
    argv = [py_spy(), "record", "--pid", str(pid), "--duration", f"{seconds:g}", "--rate", "250",
            "--format", "raw", "--output", str(output)]
    bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
    try:
        procs.run_client(argv, layout.CLIENT_CPU, timeout_s=seconds + 60)
    finally:
        try:
            load.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            load.kill()
            load.wait()
    collapsed = output.read_text() if output.exists() else ""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"profile-{name}.collapsed").write_text(collapsed)
    folded = fold(collapsed)
    bench.log(f"profile {name}: {folded[2]} samples")
    return folded


def profile_hit_path(bench: Bench, l1: Started, seconds: float) -> report.Table:
    script = bench.run_dir / "profile-hit.lua"
    script.write_text(wrk.lua_script())
    load = wrk.command(OURS.url(object_path(1024)), str(script), OURS.host, duration_s=seconds + 4)
    folded = profile_under_load(bench, l1.pid, "l1-hit", load, seconds)
    return table("Profile of the L1 hit path (py-spy, {total} on-CPU samples, 1 KiB hits)", "l1-hit", *folded)


def profile_miss_path(bench: Bench, l1: Started, seconds: float) -> report.Table:
    script = bench.run_dir / "profile-miss.lua"
    script.write_text(wrk.lua_script(unique_prefix="/gen/profile-miss-"))
    load = wrk.command(f"{layout.L1.url}/", str(script), layout.FAST_SITE_HOST, duration_s=seconds + 4)
    folded = profile_under_load(bench, l1.pid, "l1-miss", load, seconds)
    return table("Profile of the L1 on the miss path (py-spy, {total} on-CPU samples, always-new 1 KiB URLs)",
                 "l1-miss", *folded, top=10)


def profile_scheduler(bench: Bench, scheduler: Started, seconds: float) -> report.Table:
    query_file = bench.run_dir / "profile-dns-queries.txt"
    query_file.write_text(f"{layout.SITE_CDN_NAME} A\n{layout.FAST_CDN_NAME} A\n")
    load = dnsperf.command(layout.DNS.host, layout.DNS.port, str(query_file), seconds + 4,
                           layout.DNS_CLIENT_EAST)
    folded = profile_under_load(bench, scheduler.pid, "dns", load, seconds)
    return table("Profile of the DNS scheduler (py-spy, {total} on-CPU samples, dnsperf A queries)",
                 "dns", *folded, top=10)


TRUNK_SHARE = 0.97     # frames on (nearly) every stack are the event loop's trunk, not a finding
_ENTRY_POINTS = ("edge/cli.py", "edge/__main__.py")


def is_product_code(name: str) -> bool:
    """A frame of the product's own code, not its command-line entry point."""
    where = source_file(name)
    return where.startswith(("edge/", "origin/")) and where not in _ENTRY_POINTS


def table(title: str, name: str, self_samples: Counter, inclusive: Counter, total: int,
          top: int = 20) -> report.Table:
    out = report.Table(title.format(total=total),
                       ["rank", "self %", "function (self time)", "inclusive %", "edge function (inclusive)",
                        "self %", "source file (self time)"])
    by_self = self_samples.most_common(top)
    by_inclusive = [(name, count) for name, count in inclusive.most_common()
                    if is_product_code(name) and count < TRUNK_SHARE * total][:top]
    files = by_file(self_samples).most_common(top)

    def cell(items: list, rank: int) -> tuple[str, str]:
        if rank >= len(items) or not total:
            return "", ""
        name, count = items[rank]
        return report.percent(count / total), name

    for rank in range(max(len(by_self), len(by_inclusive), len(files))):
        out.add(rank + 1, *cell(by_self, rank), *cell(by_inclusive, rank), *cell(files, rank))
    out.notes.append("Inclusive: the product's own functions (edge/), with their callees, leaving out "
                     f"the process's trunk (frames on more than {TRUNK_SHARE:.0%} of samples). Collapsed stacks: "
                     f"benchmarks/results/profile-{name}.collapsed (flamegraph.pl input).")
    return out
