"""The project's performance targets (issue 8, and those added since), judged against one run: pure.

Every target is a ratio to a peer measured in the same run (nginx, or knotd
for DNS) or an absolute bound that does not depend on the machine (RSS
growth, origin requests, a latency bound set by the origin's own delay).
The report's target table lists every target in a fixed order; a target
whose scenario did not run (``--only``) or could not be measured says so
instead of passing silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks import report
from benchmarks.context import Settings

# Warm hits, per object size: our L1's req/s at least this many times nginx's,
# both on one pinned CPU ("per core"), with the same access-log setting.
HIT_RPS_RATIO = {1024: 1.5, 100 * 1024: 1.0}
MISS_RPS_RATIO = 0.5            # L1 -> L2 -> origin against nginx -> nginx -> origin
LARGE_HIT_RATIO = 1.0           # large-object hit MB/s against nginx's
RSS_GROWTH_BYTES = 64 * 2**20   # the L1's peak RSS growth while it serves a large object
COLLAPSE_SLACK_MS = 20          # last collapsed response within the origin's delay plus this
DNS_QPS_RATIO = 0.5             # scheduler against knotd
DNS_QPS_STRETCH = 0.8           # issue 11's stretch goal
DNS_FLOOD_S = 20.0              # seconds of flood (random names and client subnets) at the scheduler
DNS_FLOOD_SLACK_BYTES = 32 * 2**20   # its peak RSS growth stays below its answer cache's bound plus this
SLOW_CLIENT_RATE = 10 * 2**20   # bytes/s: curl --limit-rate 10M
SLOW_CLIENT_S = 4.0             # how long the slow client reads (about 40 MiB)
WORKERS_SCALING = 1.8           # two workers on two CPUs against one on one (issue 14)
MEMORY_SLACK_BYTES = 64 * 2**20  # an L1's RSS beyond memory_size and its disk index (issue 10)
TLS_HIT_RPS_RATIO = 1.0         # HTTPS/1.1 keep-alive 1 KiB hits against nginx's HTTPS (issue 13)
H2_HIT_RPS_RATIO = 0.5          # HTTP/2 1 KiB hits against nginx's HTTP/2 (issue 13)
SLICED_FULL_RATIO = 0.9         # a full GET of a sliced large object against the unsliced path (issue 15)

LOGS = (False, True)            # the hit scenario's two variants: logs off, logs on


@dataclass(frozen=True)
class Goal:
    key: str
    scenario: str               # which --only scenario measures it
    what: str
    goal: str


@dataclass(frozen=True)
class Verdict:
    key: str
    measured: str
    met: bool
    note: str = ""
    judged: bool = True         # False: the scenario ran but could not measure this (the note says why)


def logs_word(logs: bool) -> str:
    return "logs on" if logs else "logs off"


def size_label(size: int) -> str:
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def large_label(size: int) -> str:
    return f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB"


def hit_key(size: int, logs: bool, what: str) -> str:
    return f"hit-{size}-{'on' if logs else 'off'}-{what}"


def goals(settings: Settings) -> list[Goal]:
    """Every target, in the order the report lists them."""
    out = []
    for size, ratio in HIT_RPS_RATIO.items():
        for logs in LOGS:
            where = f"Warm hit {size_label(size)}, {logs_word(logs)}"
            out.append(Goal(hit_key(size, logs, "rps"), "hit", f"{where}: edge L1 req/s",
                            f">= {ratio:.2f} x nginx ({logs_word(logs)}), one CPU each"))
            out.append(Goal(hit_key(size, logs, "p99"), "hit", f"{where}: edge L1 p99 latency",
                            f"<= nginx's p99 ({logs_word(logs)})"))
    out.append(Goal("miss", "miss", "Miss chain L1 -> L2 -> origin: req/s",
                    f">= {MISS_RPS_RATIO:.2f} x nginx -> nginx -> origin"))
    large = large_label(settings.large_bytes)
    out.append(Goal("large-hit", "large", f"Large object ({large}) hit: MB/s",
                    f">= {LARGE_HIT_RATIO:.2f} x nginx"))
    out.append(Goal("large-rss", "large", f"Large object ({large}) miss and hit: L1 peak RSS growth",
                    f"< {RSS_GROWTH_BYTES // 2**20} MiB"))
    out.append(Goal("large-slow-rss", "large",
                    f"Large object hit, client reading at {SLOW_CLIENT_RATE // 2**20} MiB/s for "
                    f"{SLOW_CLIENT_S:g} s: L1 peak RSS growth", f"< {RSS_GROWTH_BYTES // 2**20} MiB"))
    out.append(Goal("collapse", "collapse",
                    f"Collapsing {settings.collapse_clients} concurrent requests for a cold URL "
                    f"(origin takes {settings.collapse_delay_ms} ms)",
                    f"1 origin request, last response <= {settings.collapse_delay_ms + COLLAPSE_SLACK_MS} ms"))
    out.append(Goal("dns", "dns", "DNS scheduler QPS", f">= {DNS_QPS_RATIO:.2f} x knotd "
                    f"(stretch {DNS_QPS_STRETCH:.2f} x)"))
    out.append(Goal("dns-flood", "dns", f"DNS scheduler under a {DNS_FLOOD_S:g} s flood of new names and "
                    "client subnets: peak RSS growth",
                    f"< its answer cache's size + {DNS_FLOOD_SLACK_BYTES // 2**20} MiB"))
    out.append(Goal("workers-scaling", "workers", "Warm hit 1 KiB: 2 workers on 2 CPUs against 1 worker on 1 CPU",
                    f">= {WORKERS_SCALING:.1f} x (issue 14)"))
    out.append(Goal("memory-rss", "memory",
                    f"L1 RSS after {settings.memory_urls:,} unique 1 KiB URLs (memory_size 64 MiB)",
                    f"<= memory_size + disk-index RAM + {MEMORY_SLACK_BYTES // 2**20} MiB"))
    out.append(Goal("tls-hit-rps", "tls", "HTTPS/1.1 warm hit 1 KiB, keep-alive: edge L1 req/s",
                    f">= {TLS_HIT_RPS_RATIO:.2f} x nginx (HTTPS), one CPU each"))
    out.append(Goal("h2-hit-rps", "tls", "HTTP/2 warm hit 1 KiB (h2load): edge L1 req/s",
                    f">= {H2_HIT_RPS_RATIO:.2f} x nginx (HTTP/2), one CPU each"))
    out.append(Goal("slices-tail-time", "slices",
                    f"Cold range, last 725 KiB of a {large} object, sliced L1 (4 MiB): time to last byte",
                    "<= 2 x (the same range warm + one slice fetch) (issue 15)"))
    out.append(Goal("slices-tail-origin", "slices", "Cold range, last 725 KiB, sliced L1: origin bytes",
                    "<= one slice + the range"))
    for kind in ("cold", "warm"):
        out.append(Goal(f"slices-full-{kind}", "slices", f"Full GET of a sliced {large} object, {kind}: MB/s",
                        f">= {SLICED_FULL_RATIO:.1f} x the unsliced L1"))
    out.append(Goal("slices-full-rss", "slices", f"Full GET of a sliced {large} object, cold and warm: L1 peak "
                    "RSS growth", f"< {RSS_GROWTH_BYTES // 2**20} MiB"))
    return out


# --------------------------------------------------------------------------- judging one target

def at_least(key: str, value: float, reference: float, minimum: float, note: str = "") -> Verdict:
    """value / reference >= minimum; no reference figure means not met (and says why)."""
    if reference <= 0:
        return Verdict(key, "n/a", False, _join("no reference figure", note))
    ratio = value / reference
    return Verdict(key, f"{ratio:.2f} x", ratio >= minimum, note)


def no_worse(key: str, value_ms: float, reference_ms: float, note: str = "") -> Verdict:
    """A latency no higher than the reference's."""
    if value_ms <= 0 or reference_ms <= 0:
        return Verdict(key, "n/a", False, _join("no latency figure", note))
    return Verdict(key, f"{report.ms(value_ms)} ms vs {report.ms(reference_ms)} ms",
                   value_ms <= reference_ms, note)


def below_bytes(key: str, value: int, limit: int = RSS_GROWTH_BYTES, note: str = "") -> Verdict:
    return Verdict(key, f"{report.mib(value)} MiB", value < limit, note)


def at_most_bytes(key: str, value: int, limit: int, note: str = "") -> Verdict:
    """A byte figure no higher than its limit; both shown."""
    return Verdict(key, f"{report.mib(value)} MiB of {report.mib(limit)} MiB allowed", value <= limit, note)


def collapse(origin_requests: int, last_ms: float, delay_ms: int, all_ok: bool) -> Verdict:
    met = origin_requests == 1 and last_ms <= delay_ms + COLLAPSE_SLACK_MS and all_ok
    # One decimal: a last response at 220.4 ms misses a 220 ms bound, and must not read "220".
    return Verdict("collapse", f"{origin_requests} origin request(s), last at {last_ms:.1f} ms",
                   met, "" if all_ok else "not every response was 2xx")


def not_measured(key: str, why: str) -> Verdict:
    """The scenario ran but this target has no figure (e.g. our L1 does not speak HTTP/2 yet)."""
    return Verdict(key, "-", False, why, judged=False)


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# --------------------------------------------------------------------------- the table

def result_word(verdict: Verdict | None) -> str:
    if verdict is None or not verdict.judged:
        return "not measured"
    return "met" if verdict.met else "below"


def table(settings: Settings, verdicts: list[Verdict], ran: set[str]) -> report.Table:
    """One row per target; targets without a verdict say why."""
    by_key = {v.key: v for v in verdicts}
    out = report.Table("Targets (ratios to peers measured in this run)",
                       ["target", "goal", "measured", "result", "note"])
    for goal in goals(settings):
        verdict = by_key.get(goal.key)
        if verdict is None:
            why = "scenario not run (--only)" if goal.scenario not in ran else "not measured"
            out.add(goal.what, goal.goal, "-", result_word(None), why)
        else:
            out.add(goal.what, goal.goal, verdict.measured, result_word(verdict), verdict.note)
    out.notes.append("Hit targets compare our L1 with nginx at the same access-log setting, each on one "
                     "pinned CPU; where nginx's row is client-limited, nginx could go faster and the ratio "
                     "is an upper bound (the note says so).")
    return out


def summary(settings: Settings, verdicts: list[Verdict]) -> str:
    known = {g.key for g in goals(settings)}
    judged = [v for v in verdicts if v.key in known and v.judged]
    met = sum(1 for v in judged if v.met)
    missing = len(known) - len(judged)
    return (f"Targets: {met} met, {len(judged) - met} below, {missing} not measured "
            f"(of {len(known)}; see the table Targets)")
