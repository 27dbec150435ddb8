"""Memory stays where the operator put it: an L1's RSS after many unique URLs, against its configuration.

One L1 (``benchmarks/topology-memory.toml``: ``memory_size = 64MiB``, a
disk tier large enough that nothing is evicted from it) in front of a fast
static origin (nginx, ``peers/fast-origin.conf`` rendered for 127.0.88.2)
is sent ``count`` unique 1 KiB URLs (300,000; 50,000 with ``--quick``), each
once, by wrk (a Lua counter, 50 connections, stopped once the L1 has
answered them all).  When the disk tier has every entry (the memory tier
writes behind), the L1's RSS is read from the kernel (VmRSS, and VmHWM for
the peak over the run) and compared with what the configuration allows:

    memory_size + disk-index RAM + 64 MiB

where the disk-index RAM is the entries on disk times the RAM one index
entry takes, measured here in this process by
:func:`benchmarks.entrycost.disk_index_entry_cost` with keys of the L1's
key length and as many entries.  The 64 MiB are the interpreter, the
modules, buffers and the allocator's slack.  Misses only: no URL is asked
twice, so what the memory tier holds is what its accounting let in.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass

from benchmarks import entrycost, layout, procs, report, targets, wrk
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow
from benchmarks.procs import Started

NODE = "l1-mem"                 # its name in topology-memory.toml
PATH_PREFIX = "/gen/m-"         # paths /gen/m-1 .. /gen/m-<count>
CONNECTIONS = 50
LANDED_DEADLINE_S = 300.0       # for the written-behind disk entries to land after the load


@dataclass(frozen=True)
class MemoryResult:
    urls: int                   # unique URLs sent
    answered: int               # requests the L1 answered (all statuses)
    errors: int                 # wrk's socket errors and statuses >= 400
    seconds: float              # the load's wall time
    memory_size: int            # the L1's configuration
    memory_objects: int
    memory_bytes: int           # what the memory tier charged for them
    disk_objects: int
    index_entry_bytes: float    # RAM per disk-index entry, measured in this process
    rss_start: int              # the L1's RSS before the load
    rss_end: int                # ... once every disk entry had landed
    rss_peak: int               # VmHWM over the whole run
    inflight_fetches: int       # fetches still registered for coalescing at the end (should be 0)
    client_busy: float

    @property
    def index_bytes(self) -> int:
        return int(self.disk_objects * self.index_entry_bytes)

    @property
    def allowed(self) -> int:
        return allowed_rss(self.memory_size, self.disk_objects, self.index_entry_bytes)


def allowed_rss(memory_size: int, disk_entries: int, index_entry_bytes: float,
                slack: int = targets.MEMORY_SLACK_BYTES) -> int:
    """The goal: memory_size + disk-index RAM (entries x bytes each) + slack."""
    return memory_size + int(disk_entries * index_entry_bytes) + slack


def _admin_json(path: str) -> dict:
    with urllib.request.urlopen(f"{layout.MEM_L1_ADMIN.url}{path}", timeout=10) as response:
        return json.loads(response.read())


def requests_answered() -> int:
    """Client requests the L1 has finished, from its /metrics (every cache status and method)."""
    with urllib.request.urlopen(f"{layout.MEM_L1_ADMIN.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return parse_requests_total(text)


def parse_requests_total(exposition: str) -> int:
    """The sum of every ``edge_requests_total`` sample in a Prometheus exposition."""
    total = 0.0
    for line in exposition.splitlines():
        if line.startswith("edge_requests_total{") or line.startswith("edge_requests_total "):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _tiers() -> dict[str, dict]:
    return {tier["tier"]: tier for tier in _admin_json("/status")["tiers"]}


def measure(bench: Bench, node: Started) -> MemoryResult:
    from edge import config
    from edge.cachekey import cache_key

    topology = config.load(bench.configs["memory_topology"])
    memory_size = topology.node(NODE).memory_size
    count = bench.settings.memory_urls
    target_url = f"{layout.MEM_L1.url}/"
    rss_start, _ = procs.rss_bytes(node.pid)
    procs.reset_peak_rss(node.pid)

    script_path = bench.run_dir / "memory.lua"
    script_path.write_text(wrk.counted_script(PATH_PREFIX, count))
    limit_s = max(60.0, count / 100)            # a bound on the run: 100 misses/s at the very least
    argv = wrk.command(target_url, str(script_path), layout.MEM_SITE_HOST, threads=1,
                       connections=CONNECTIONS, duration_s=limit_s)
    bench.record_command(" ".join(procs.pinned(argv, layout.CLIENT_CPU))
                         + f"  # SIGINT once the L1 has answered {count:,} requests")
    bench.log(f"memory: {count:,} unique 1 KiB URLs through {NODE} (memory_size {report.mib(memory_size)} MiB)")
    started = time.monotonic()
    with CpuWindow() as window:
        completed = procs.run_client_until(argv, layout.CLIENT_CPU, lambda: requests_answered() >= count,
                                           timeout_s=limit_s + 30)
    seconds = time.monotonic() - started
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr.strip()[-500:]}")
    result = wrk.parse(completed.stdout)
    errors = result.socket_errors + result.errors_status
    bench.log(f"memory: {result.requests:,} requests in {seconds:.0f} s ({errors} errors); "
              "waiting for the disk tier")

    deadline = time.monotonic() + LANDED_DEADLINE_S
    tiers = _tiers()
    while tiers["disk"]["objects"] < count and time.monotonic() < deadline:
        time.sleep(0.5)
        tiers = _tiers()
    if tiers["disk"]["objects"] < count:
        bench.problem(f"memory: only {tiers['disk']['objects']:,} of {count:,} URLs reached the disk tier "
                      f"within {LANDED_DEADLINE_S:g} s")
    if errors:
        bench.problem(f"memory: {result.socket_errors} socket errors, {result.errors_status} responses >= 400")
    status = _admin_json("/status")
    rss_end, rss_peak = procs.rss_bytes(node.pid)

    site = topology.sites[0]
    key_length = len(cache_key(site, f"{PATH_PREFIX}{count}", layout.MEM_SITE_HOST))
    index_entry = entrycost.disk_index_entry_cost(tiers["disk"]["objects"] or 1, key_length)
    out = MemoryResult(
        urls=count, answered=requests_answered(), errors=errors, seconds=seconds, memory_size=memory_size,
        memory_objects=tiers["memory"]["objects"], memory_bytes=tiers["memory"]["bytes"],
        disk_objects=tiers["disk"]["objects"], index_entry_bytes=index_entry, rss_start=rss_start,
        rss_end=rss_end, rss_peak=rss_peak, inflight_fetches=status.get("fetches_in_flight", 0),
        client_busy=window.of(layout.CLIENT_CPU).busy)
    bench.log(f"memory: RSS {report.mib(out.rss_end)} MiB (peak {report.mib(out.rss_peak)}), allowed "
              f"{report.mib(out.allowed)} MiB; memory tier {out.memory_objects:,} objects, disk "
              f"{out.disk_objects:,} entries x {index_entry:.0f} B of index")
    return out


def table(r: MemoryResult) -> report.Table:
    out = report.Table(f"Memory: L1 RSS after {r.urls:,} unique 1 KiB URLs (misses only, wrk -t1 -c{CONNECTIONS})",
                       ["what", "value"])
    out.add("memory_size (configured)", f"{report.mib(r.memory_size)} MiB")
    out.add("memory tier: objects, charged bytes", f"{r.memory_objects:,}, {report.mib(r.memory_bytes)} MiB "
            f"({r.memory_bytes / r.memory_objects:,.0f} B each)" if r.memory_objects else "0")
    out.add("disk tier: entries (none evicted)", f"{r.disk_objects:,}")
    out.add("disk index: RAM per entry (measured, key included)", f"{r.index_entry_bytes:.0f} B")
    out.add("disk index: RAM", f"{report.mib(r.index_bytes)} MiB")
    out.add("allowed: memory_size + disk index + 64 MiB", f"{report.mib(r.allowed)} MiB")
    out.add("L1 RSS before the load", f"{report.mib(r.rss_start)} MiB")
    out.add("L1 RSS after the load (settled)", f"{report.mib(r.rss_end)} MiB")
    out.add("L1 peak RSS over the run (VmHWM)", f"{report.mib(r.rss_peak)} MiB")
    out.add("requests answered, errors", f"{r.answered:,}, {r.errors}")
    out.add("load time, rate", f"{r.seconds:.0f} s, {report.rate(r.urls / r.seconds if r.seconds else 0)} req/s")
    out.add("fetches still in flight at the end", str(r.inflight_fetches))
    out.notes.append("Disk-index RAM per entry: benchmarks.entrycost.disk_index_entry_cost, in the benchmark "
                     "process, with as many entries as the L1's disk tier holds and keys of its key length.")
    out.notes.append("The memory tier charges each entry its measured RAM (edge/store/memory.py entry_charge: "
                     "body, key, URL, header fields, what a hit keeps), not its body alone.")
    return out


def verdict(r: MemoryResult) -> targets.Verdict:
    return targets.at_most_bytes("memory-rss", r.rss_end, r.allowed,
                                 f"peak {report.mib(r.rss_peak)} MiB; allowed = {report.mib(r.memory_size)} + "
                                 f"{report.mib(r.index_bytes)} (index, {r.disk_objects:,} x "
                                 f"{r.index_entry_bytes:.0f} B) + 64 MiB")
