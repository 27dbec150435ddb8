"""The miss path: always-new URLs through L1 -> L2 -> origin, vs nginx chained alike.

Every request has a URL never seen before (wrk's Lua counter), so each one
goes L1 miss -> L2 miss -> origin and is stored at both tiers.  The origin is
a fast static nginx (peers/fast-origin.conf) shared by both chains, so the
figure is the cost of the two cache tiers.  The whole chain (L1, L2,
origin) runs on the server CPU; wrk on the other.
"""

from __future__ import annotations


from benchmarks import layout, report, targets, wrk
from benchmarks.context import Bench
from benchmarks.loadrun import LoadRuns, run_wrk
from benchmarks.scenarios.hit import NOISY_OTHER_LOAD, rotated
from benchmarks.servers import HttpTarget

OURS = HttpTarget("edge L1 -> L2", layout.L1, host=layout.FAST_SITE_HOST)
NGINX = HttpTarget("nginx -> nginx", layout.NGINX_L1, host=layout.FAST_SITE_HOST)
REFERENCE = NGINX.label


class MissRuns(LoadRuns):
    """The rounds of one chain on the miss path."""


def measure(bench: Bench, targets: list[HttpTarget]) -> list[MissRuns]:
    runs = {t.label: MissRuns(t) for t in targets}
    for round_index in range(bench.settings.rounds):
        for target in rotated(targets, round_index):
            script = wrk.lua_script(unique_prefix=f"/gen/miss-{target.tag}-r{round_index}-")
            load = run_wrk(bench, target.url("/"), target.host, script, "miss",
                           groups=bench.groups.get(target.label))
            runs[target.label].loads.append(load)
            result = load.result
            bench.log(f"miss {target.label} round {round_index + 1}: {result.rps:,.0f} req/s "
                      f"p99 {result.p99_ms:.2f} ms, client CPU {load.client_busy:.0%}")
            bench.record_run("miss", target.label, round_index + 1, result.rps, f"p99 {result.p99_ms:.2f} ms",
                             load.client_busy, load.server_own, load.other_load, load.steal, "-",
                             result.socket_errors + result.errors_status)
            if result.socket_errors or result.errors_status:
                bench.problem(f"miss {target.label}: {result.socket_errors} socket errors, "
                              f"{result.errors_status} responses >= 400")
    return list(runs.values())


def table(all_runs: list[MissRuns]) -> report.Table:
    out = report.Table("Miss path (always-new 1 KiB URLs, L1 -> L2 -> origin, wrk -t1 -c50)",
                       ["chain", "req/s", "vs nginx", "p99 ms", "chain CPU", "other on server CPU",
                        "client CPU", "errors", "note"])
    reference = next((r.rps for r in all_runs if r.target.label == REFERENCE), 0.0)
    for runs in all_runs:
        client = max((run.client_busy for run in runs.loads), default=0.0)
        own = report.median([run.server_own for run in runs.loads])
        other = max((run.other_load for run in runs.loads), default=0.0)
        limited = any(run.client_limited for run in runs.loads)
        notes = (["client-limited"] if limited else []) + (["noisy"] if other > NOISY_OTHER_LOAD else [])
        if runs.target is OURS and reference and runs.rps < targets.MISS_RPS_RATIO * reference:
            notes.append(f"below target (>= {targets.MISS_RPS_RATIO:.1f} x nginx chain)")
        out.add(runs.target.label, report.rate(runs.rps), report.ratio(runs.rps, reference),
                report.ms(runs.p99_ms), report.percent(own), report.percent(other), report.percent(client),
                runs.errors, ", ".join(notes))
    out.notes.append("chain CPU: CPU time of L1 + L2 + origin processes per second (all on one CPU).")
    out.notes.append("Origin: one static nginx (peers/fast-origin.conf) for both chains, on the server CPU "
                     "with the chain. Access logs off in both chains (our L1 and L2: access_log = \"off\", "
                     "--log-level WARNING).")
    return out


def verdict(all_runs: list[MissRuns]) -> targets.Verdict | None:
    ours = next((r for r in all_runs if r.target is OURS), None)
    ref = next((r for r in all_runs if r.target.label == REFERENCE), None)
    if ours is None or ref is None:
        return None
    return targets.at_least("miss", ours.rps, ref.rps, targets.MISS_RPS_RATIO,
                            "nginx client-limited: ratio is an upper bound" if ref.client_limited else "")
