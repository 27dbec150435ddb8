"""DNS: dnsperf against the scheduler and against knotd with the same names, then a flood.

The queries are the A records of the CDN names, the answer in which the
scheduler chooses the nearest healthy edge for the client's address; knotd
serves the same names from a static zone (always the east edge).  dnsperf
sends from an address in the east coverage block.  Before measuring, one
query from each region proves the scheduler does choose per client, and
the scheduler's answer cache counters, read before and after its runs, give
the hit rate.

Then the flood: for 20 s the scheduler is sent queries for names never
asked before, in random case, half with a random client subnet
(``benchmarks.dnsflood``), while an east client checks once a second that it
still gets its edge; the scheduler's peak RSS growth (VmHWM, reset before)
must stay below its answer cache's bound plus 32 MiB.
"""

from __future__ import annotations

import shlex
import urllib.request
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.query
import dns.rdatatype

from benchmarks import dnsflood, dnsperf, layout, procs, report, targets
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow
from benchmarks.layout import Endpoint
from benchmarks.loadrun import CLIENT_LIMITED_BUSY
from benchmarks.procs import Started
from benchmarks.scenarios.hit import NOISY_OTHER_LOAD, rotated

QUERIES = (layout.SITE_CDN_NAME, layout.FAST_CDN_NAME)
TARGET_RATIO = targets.DNS_QPS_RATIO      # the goal: at least half of knotd's QPS
STRETCH_RATIO = targets.DNS_QPS_STRETCH
FLOOD_S = targets.DNS_FLOOD_S
FLOOD_SEED = 20261213


@dataclass(frozen=True)
class DnsServer:
    label: str
    endpoint: Endpoint


SCHEDULER = DnsServer("edge scheduler", layout.DNS)
KNOT = DnsServer("knotd", layout.KNOT)
CEILING = DnsServer("bare uvloop UDP responder (Python ceiling)", layout.CEILING_DNS)


@dataclass
class DnsRuns:
    server: DnsServer
    results: list[dnsperf.DnsperfResult] = field(default_factory=list)
    client_busy: list[float] = field(default_factory=list)
    server_own: list[float] = field(default_factory=list)
    other_load: list[float] = field(default_factory=list)

    @property
    def qps(self) -> float:
        return report.median([r.qps for r in self.results])

    @property
    def mean_ms(self) -> float:
        return report.median([r.mean_latency_ms for r in self.results])

    @property
    def lost(self) -> int:
        return sum(r.lost for r in self.results)


@dataclass
class CacheCounts:
    hits: float = 0.0
    misses: float = 0.0

    def __sub__(self, other: "CacheCounts") -> "CacheCounts":
        return CacheCounts(self.hits - other.hits, self.misses - other.misses)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def scheduler_metrics() -> dict[str, float]:
    """The scheduler's unlabelled metric samples (its /metrics), by name."""
    with urllib.request.urlopen(f"{layout.DNS_ADMIN.url}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, _, value = line.partition(" ")
            samples[name] = float(value)
    return samples


def cache_counts() -> CacheCounts:
    samples = scheduler_metrics()
    return CacheCounts(samples.get("dns_cache_hits_total", 0.0), samples.get("dns_cache_misses_total", 0.0))


def answer_addresses(server: Endpoint, name: str, source: str) -> list[str]:
    query = dns.message.make_query(name, "A")
    response = dns.query.udp(query, server.host, port=server.port, timeout=2.0, source=source)
    return sorted(item.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A
                  for item in rrset)


def check_nearest(bench: Bench) -> list[str]:
    """The scheduler's answers for an east and a west client (they should differ)."""
    east = answer_addresses(layout.DNS, layout.SITE_CDN_NAME, layout.DNS_CLIENT_EAST)
    west = answer_addresses(layout.DNS, layout.SITE_CDN_NAME, layout.DNS_CLIENT_WEST)
    lines = [f"east client {layout.DNS_CLIENT_EAST} -> {', '.join(east) or 'no A'}",
             f"west client {layout.DNS_CLIENT_WEST} -> {', '.join(west) or 'no A'}"]
    if east != [layout.L1.host] or west != [layout.L1_WEST.host]:
        bench.problem(f"DNS scheduler did not choose the nearest edge: {'; '.join(lines)}")
    return lines


def measure(bench: Bench) -> tuple[list[DnsRuns], list[str], CacheCounts]:
    query_file = bench.run_dir / "dns-queries.txt"
    query_file.write_text("".join(f"{name} A\n" for name in QUERIES))
    nearest = check_nearest(bench)
    servers = [SCHEDULER, KNOT, CEILING]
    runs = {s.label: DnsRuns(s) for s in servers}
    cache = CacheCounts()
    for round_index in range(bench.settings.rounds):
        for server in rotated(servers, round_index):
            before = cache_counts() if server is SCHEDULER else None
            argv = dnsperf.command(server.endpoint.host, server.endpoint.port, str(query_file),
                                   bench.settings.duration_s, layout.DNS_CLIENT_EAST)
            bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
            with CpuWindow(bench.groups.get(server.label)) as window:
                completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=bench.settings.duration_s + 60)
            if completed.returncode != 0:
                raise RuntimeError(f"dnsperf failed: {completed.stderr.strip()[-500:]}")
            if before is not None:
                counted = cache_counts() - before
                cache = CacheCounts(cache.hits + counted.hits, cache.misses + counted.misses)
            result = dnsperf.parse(completed.stdout)
            entry = runs[server.label]
            entry.results.append(result)
            entry.client_busy.append(window.of(layout.CLIENT_CPU).busy)
            entry.server_own.append(window.group_share)
            entry.other_load.append(window.other_load(layout.SERVER_CPU))
            bench.log(f"dns {server.label} round {round_index + 1}: {result.qps:,.0f} qps, "
                      f"mean {result.mean_latency_ms:.3f} ms, lost {result.lost}, "
                      f"client CPU {entry.client_busy[-1]:.0%}")
            bench.record_run("dns", server.label, round_index + 1, result.qps,
                             f"mean {result.mean_latency_ms:.3f} ms", entry.client_busy[-1],
                             entry.server_own[-1], entry.other_load[-1], window.of(None).steal, "-", result.lost)
            if result.noerror_share < 1.0:
                bench.problem(f"dns {server.label}: response codes {result.rcodes}")
    bench.log(f"dns answer cache during the scheduler's runs: {cache.hits:,.0f} hits, {cache.misses:,.0f} "
              f"misses ({cache.hit_rate:.2%})")
    return list(runs.values()), nearest, cache


@dataclass
class FloodRun:
    flood: dnsflood.FloodResult
    rss_before: int
    rss_peak: int
    cache_max: int                  # the cache's bound (dns_cache_max_bytes)
    cache_bytes: int                # charged at the end
    cache_entries: int
    evictions: int

    @property
    def rss_growth(self) -> int:
        return max(0, self.rss_peak - self.rss_before)

    @property
    def bound(self) -> int:
        return self.cache_max + targets.DNS_FLOOD_SLACK_BYTES


def east_client_answered() -> str | None:
    """One normal query from the east block during the flood: None if it got the east edge within 2 s."""
    try:
        got = answer_addresses(layout.DNS, layout.SITE_CDN_NAME, layout.DNS_CLIENT_EAST)
    except (dns.exception.DNSException, OSError) as exc:
        return f"no answer ({type(exc).__name__})"
    return None if got == [layout.L1.host] else f"got {', '.join(got) or 'no address'}"


def measure_flood(bench: Bench, scheduler: Started) -> FloodRun:
    procs.reset_peak_rss(scheduler.pid)
    rss_before, _ = procs.rss_bytes(scheduler.pid)
    evictions_before = scheduler_metrics().get("dns_cache_evictions_total", 0.0)
    bench.record_command(f"benchmarks.dnsflood.flood(({layout.DNS.host!r}, {layout.DNS.port}), "
                         f"{layout.DNS_CLIENT_FLOOD!r}, {FLOOD_S:g}, seed={FLOOD_SEED})  # in the harness")
    result = dnsflood.flood((layout.DNS.host, layout.DNS.port), layout.DNS_CLIENT_FLOOD, FLOOD_S, FLOOD_SEED,
                            probe=east_client_answered)
    rss_peak = procs.rss_bytes(scheduler.pid)[1]
    samples = scheduler_metrics()
    run = FloodRun(result, rss_before, rss_peak, int(samples.get("dns_cache_max_bytes", 0)),
                   int(samples.get("dns_cache_bytes", 0)), int(samples.get("dns_cache_entries", 0)),
                   int(samples.get("dns_cache_evictions_total", 0) - evictions_before))
    bench.log(f"dns flood: {result.sent:,} queries in {result.seconds:.1f} s, {result.answered:,} answered, "
              f"peak RSS growth {run.rss_growth / 2**20:.1f} MiB (bound {run.bound / 2**20:.0f} MiB), "
              f"normal queries answered {result.probes_ok}/{result.probes}")
    if run.evictions == 0:
        bench.problem("dns flood: the answer cache never filled (no evictions), so its bound was not tested")
    if result.probes_ok < result.probes:
        bench.problem(f"dns flood: {result.probes - result.probes_ok} of {result.probes} normal queries from the "
                      f"east block went wrong: {'; '.join(result.probe_problems)}")
    return run


def flood_table(run: FloodRun) -> report.Table:
    out = report.Table(f"DNS flood ({FLOOD_S:g} s of names never asked before, random case, half with a random "
                       "client subnet)", ["queries sent", "answered", "answered/s", "peak RSS growth MiB",
                                         "bound MiB", "cache MiB at the end", "cache entries", "evictions",
                                         "normal queries answered"])
    flood = run.flood
    out.add(f"{flood.sent:,}", f"{flood.answered:,}", report.rate(flood.answered / flood.seconds if flood.seconds
                                                                   else 0.0),
            report.mib(run.rss_growth), report.mib(run.bound), report.mib(run.cache_bytes),
            f"{run.cache_entries:,}", f"{run.evictions:,}", f"{flood.probes_ok}/{flood.probes}")
    out.notes.append("Peak RSS growth: the scheduler's VmHWM (reset before the flood) minus its RSS before it. "
                     "Bound: the answer cache's size (dns.cache_size) plus "
                     f"{targets.DNS_FLOOD_SLACK_BYTES // 2**20} MiB. The flood keeps 200 queries in flight (dnsperf's -q), "
                     "so it runs as fast as the scheduler answers misses; response rate limiting is off in the "
                     "benchmark topology.")
    return out


def table(all_runs: list[DnsRuns], nearest: list[str], cache: CacheCounts) -> report.Table:
    out = report.Table("DNS (dnsperf, A queries for the CDN names, one client address in the east block)",
                       ["server", "QPS", "vs knotd", "mean latency ms", "lost", "server CPU",
                        "other on server CPU", "client CPU", "note"])
    reference = next((r.qps for r in all_runs if r.server.label == KNOT.label), 0.0)
    for runs in all_runs:
        client = max(runs.client_busy, default=0.0)
        other = max(runs.other_load, default=0.0)
        notes = (["client-limited"] if client > CLIENT_LIMITED_BUSY else []) + \
                (["noisy"] if other > NOISY_OTHER_LOAD else [])
        if runs.server is SCHEDULER and reference and runs.qps < TARGET_RATIO * reference:
            notes.append(f"below target (>= {TARGET_RATIO} x knotd)")
        elif runs.server is SCHEDULER and reference and runs.qps >= STRETCH_RATIO * reference:
            notes.append(f"stretch goal met (>= {STRETCH_RATIO} x knotd)")
        out.add(runs.server.label, report.rate(runs.qps), report.ratio(runs.qps, reference),
                f"{runs.mean_ms:.3f}", runs.lost, report.percent(report.median(runs.server_own)),
                report.percent(other), report.percent(client), ", ".join(notes))
    out.notes.append("Scheduler's choice per client: " + "; ".join(nearest) + ".")
    out.notes.append(f"Scheduler's answer cache over its runs: {cache.hit_rate:.2%} hits "
                     f"({cache.hits:,.0f} hits, {cache.misses:,.0f} misses, from its /metrics).")
    out.notes.append("knotd serves the same names statically (one UDP worker). Target: scheduler QPS at "
                     f"least {TARGET_RATIO} x knotd's (stretch {STRETCH_RATIO} x).")
    out.notes.append("The Python ceiling (benchmarks/ceiling_dns.py) answers every datagram with its own ID and "
                     "question and one fixed A record, on uvloop, without parsing: no Python DNS server does less "
                     "per query.")
    return out


def verdict(all_runs: list[DnsRuns]) -> targets.Verdict | None:
    ours = next((r for r in all_runs if r.server is SCHEDULER), None)
    ref = next((r for r in all_runs if r.server is KNOT), None)
    if ours is None or ref is None:
        return None
    limited = max(ref.client_busy, default=0.0) > CLIENT_LIMITED_BUSY
    return targets.at_least("dns", ours.qps, ref.qps, TARGET_RATIO,
                            "knotd client-limited: ratio is an upper bound" if limited else "")


def flood_verdict(run: FloodRun) -> targets.Verdict:
    note = f"bound {report.mib(run.bound)} MiB = cache {report.mib(run.cache_max)} MiB + " \
           f"{targets.DNS_FLOOD_SLACK_BYTES // 2**20} MiB"
    return targets.below_bytes("dns-flood", run.rss_growth, run.bound, note)
