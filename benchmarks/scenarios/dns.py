"""DNS: dnsperf against the scheduler and against knotd with the same names.

The queries are the A records of the CDN names, the answer in which the
scheduler chooses the nearest healthy edge for the client's address; knotd
serves the same names from a static zone (always the east edge).  dnsperf
sends from an address in the east coverage block.  Before measuring, one
query from each region proves the scheduler does choose per client.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field

import dns.message
import dns.query
import dns.rdatatype

from benchmarks import dnsperf, layout, procs, report, targets
from benchmarks.context import Bench
from benchmarks.cpu import CpuWindow
from benchmarks.layout import Endpoint
from benchmarks.loadrun import CLIENT_LIMITED_BUSY
from benchmarks.scenarios.hit import NOISY_OTHER_LOAD, rotated

QUERIES = (layout.SITE_CDN_NAME, layout.FAST_CDN_NAME)
TARGET_RATIO = targets.DNS_QPS_RATIO      # the goal: at least half of knotd's QPS


@dataclass(frozen=True)
class DnsServer:
    label: str
    endpoint: Endpoint


SCHEDULER = DnsServer("edge scheduler", layout.DNS)
KNOT = DnsServer("knotd", layout.KNOT)


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


def measure(bench: Bench) -> tuple[list[DnsRuns], list[str]]:
    query_file = bench.run_dir / "dns-queries.txt"
    query_file.write_text("".join(f"{name} A\n" for name in QUERIES))
    nearest = check_nearest(bench)
    servers = [SCHEDULER, KNOT]
    runs = {s.label: DnsRuns(s) for s in servers}
    for round_index in range(bench.settings.rounds):
        for server in rotated(servers, round_index):
            argv = dnsperf.command(server.endpoint.host, server.endpoint.port, str(query_file),
                                   bench.settings.duration_s, layout.DNS_CLIENT_EAST)
            bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
            with CpuWindow(bench.groups.get(server.label)) as window:
                completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=bench.settings.duration_s + 60)
            if completed.returncode != 0:
                raise RuntimeError(f"dnsperf failed: {completed.stderr.strip()[-500:]}")
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
    return list(runs.values()), nearest


def table(all_runs: list[DnsRuns], nearest: list[str]) -> report.Table:
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
        out.add(runs.server.label, report.rate(runs.qps), report.ratio(runs.qps, reference),
                f"{runs.mean_ms:.3f}", runs.lost, report.percent(report.median(runs.server_own)),
                report.percent(other), report.percent(client), ", ".join(notes))
    out.notes.append("Scheduler's choice per client: " + "; ".join(nearest) + ".")
    out.notes.append("knotd serves the same names statically (one UDP worker). Target: scheduler QPS at "
                     "least half of knotd's.")
    return out


def verdict(all_runs: list[DnsRuns]) -> targets.Verdict | None:
    ours = next((r for r in all_runs if r.server is SCHEDULER), None)
    ref = next((r for r in all_runs if r.server is KNOT), None)
    if ours is None or ref is None:
        return None
    limited = max(ref.client_busy, default=0.0) > CLIENT_LIMITED_BUSY
    return targets.at_least("dns", ours.qps, ref.qps, TARGET_RATIO,
                            "knotd client-limited: ratio is an upper bound" if limited else "")
