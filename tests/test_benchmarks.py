"""Unit tests of the benchmark harness's pure parts (no servers, no load)."""

from __future__ import annotations

import ipaddress
from collections import Counter
import math
import random
import re
from pathlib import Path

import pytest

from benchmarks import cpu, dnsperf, peers, report, wrk, zipf
from benchmarks.profile import fold, frame_name
from benchmarks.scenarios.hit import object_path, rotated

# --------------------------------------------------------------------------- Zipf trace


def test_trace_is_reproducible_from_its_seed():
    first = zipf.make_trace(5000, 1000, 0.8, seed=7)
    again = zipf.make_trace(5000, 1000, 0.8, seed=7)
    other = zipf.make_trace(5000, 1000, 0.8, seed=8)
    assert first.requests == again.requests and first.sizes == again.sizes
    assert first.requests != other.requests


def test_trace_ids_and_sizes_are_in_range():
    trace = zipf.make_trace(20_000, 500, 1.0, seed=1)
    assert len(trace.requests) == 20_000
    assert all(0 <= key < 500 for key in trace.requests)
    assert all(256 <= size <= 256 * 1024 for size in trace.sizes)
    assert trace.working_set_bytes == sum(trace.sizes[k] for k in set(trace.requests))


def test_zipf_cdf_matches_the_closed_form():
    cdf = zipf.zipf_cdf(4, 1.0)
    harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4
    expected = [1 / harmonic, (1 + 1 / 2) / harmonic, (1 + 1 / 2 + 1 / 3) / harmonic, 1.0]
    assert cdf == pytest.approx(expected)
    assert cdf[-1] == 1.0


@pytest.mark.parametrize("alpha", [0.8, 1.0])
def test_most_popular_object_is_drawn_at_its_zipf_rate(alpha):
    requests, objects = 200_000, 1000
    trace = zipf.make_trace(requests, objects, alpha, seed=3)
    p_top = 1.0 / sum(1.0 / rank ** alpha for rank in range(1, objects + 1))
    top_count = Counter(trace.requests).most_common(1)[0][1]
    # Binomial: five standard deviations is a bound a correct sampler never crosses in practice.
    bound = 5 * math.sqrt(requests * p_top * (1 - p_top))
    assert abs(top_count - requests * p_top) < bound


# --------------------------------------------------------------------------- exact LRU


def test_lru_evicts_least_recently_used_by_bytes():
    cache = zipf.LruSimulation(capacity_bytes=10)
    assert cache.access(1, 4) is False        # [1]
    assert cache.access(2, 4) is False        # [1, 2]
    assert cache.access(1, 4) is True         # [2, 1]
    assert cache.access(3, 4) is False        # 2 evicted: [1, 3]
    assert 2 not in cache and 1 in cache and 3 in cache
    assert cache.access(4, 11) is False       # larger than the cache: never admitted
    assert 4 not in cache and cache.used == 8
    assert cache.access(5, 10) is False       # evicts everything else
    assert len(cache) == 1 and cache.used == 10


def _reference_lru(trace: zipf.Trace, capacity: int) -> zipf.HitCounts:
    """An independent, slow LRU: a list ordered by recency, scanned every time."""
    order: list[int] = []
    counts = zipf.HitCounts()
    for key in trace.requests:
        size = trace.sizes[key]
        hit = key in order
        counts.record(size, hit)
        if hit:
            order.remove(key)
            order.append(key)
        elif size <= capacity:
            order.append(key)
            while sum(trace.sizes[k] for k in order) > capacity:
                order.pop(0)
    return counts


@pytest.mark.parametrize("alpha,share", [(0.8, 0.05), (1.0, 0.2)])
def test_lru_simulation_agrees_with_a_naive_lru(alpha, share):
    trace = zipf.make_trace(3000, 200, alpha, seed=11)
    capacity = int(trace.working_set_bytes * share)
    fast = zipf.simulate_lru(trace, capacity)
    slow = _reference_lru(trace, capacity)
    assert (fast.hits, fast.bytes_hit, fast.requests, fast.bytes_requested) == \
           (slow.hits, slow.bytes_hit, slow.requests, slow.bytes_requested)
    assert 0 < fast.object_ratio < 1


def test_hit_counts_ratios():
    counts = zipf.HitCounts()
    counts.record(100, True)
    counts.record(300, False)
    assert counts.object_ratio == 0.5 and counts.byte_ratio == 0.25


# --------------------------------------------------------------------------- wrk

WRK_TEXT = """Running 10s test @ http://127.0.62.1:8080/gen/hit-1024?size=1024
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.51ms  412.33us  14.02ms   91.02%
    Req/Sec    20.01k     1.02k   21.50k    88.00%
  Latency Distribution
     50%    2.43ms
     75%    2.61ms
     90%    2.85ms
     99%    4.10ms
  199168 requests in 10.00s, 236.34MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:  19916.21
Transfer/sec:     23.63MB
"""


def test_wrk_text_output_is_parsed():
    result = wrk.parse(WRK_TEXT)
    assert result.requests == 199168
    assert result.duration_s == pytest.approx(10.0)
    assert result.rps == pytest.approx(19916.8)
    assert result.bytes_read == int(236.34 * 2**20)
    assert (result.p50_ms, result.p90_ms, result.p99_ms, result.max_ms) == pytest.approx((2.43, 2.85, 4.10, 14.02))
    assert (result.errors_connect, result.errors_read, result.errors_write, result.errors_timeout) == (0, 3, 0, 2)
    assert result.socket_errors == 5 and result.errors_status == 7


def test_wrk_microsecond_latencies_and_no_error_lines():
    text = WRK_TEXT.replace("     99%    4.10ms", "     99%  850.00us").replace(
        "  Socket errors: connect 0, read 3, write 0, timeout 2\n", "").replace(
        "  Non-2xx or 3xx responses: 7\n", "")
    result = wrk.parse(text)
    assert result.p99_ms == pytest.approx(0.85)
    assert result.socket_errors == 0 and result.errors_status == 0


def test_wrk_bench_line_wins_over_the_text():
    line = ("BENCH requests=1000 duration_us=2000000 bytes=1100000 connect=1 read=0 write=0 status=4 "
            "timeout=0 p50_us=900 p90_us=1500 p99_us=2500 max_us=9000 mean_us=1000")
    result = wrk.parse(WRK_TEXT + line + "\n")
    assert result.requests == 1000 and result.rps == pytest.approx(500.0)
    assert result.p99_ms == pytest.approx(2.5) and result.max_ms == pytest.approx(9.0)
    assert result.errors_connect == 1 and result.errors_status == 4
    assert result.bytes_per_response == pytest.approx(1100.0)


def test_wrk_output_without_summary_is_an_error():
    with pytest.raises(wrk.WrkParseError):
        wrk.parse("unable to connect to 127.0.62.1:8080 Connection refused\n")


def test_wrk_lua_script_builds_unique_paths_and_rejects_quotes():
    script = wrk.lua_script(unique_prefix="/gen/miss-edge-r0-")
    assert 'wrk.format("GET", "/gen/miss-edge-r0-" .. counter .. "")' in script
    assert "done = function" in script
    assert "request = function" not in wrk.lua_script()
    with pytest.raises(ValueError):
        wrk.lua_script(unique_prefix='/gen/"; os.exit() --')


def test_wrk_command_is_one_thread_keepalive_with_host():
    argv = wrk.command("http://127.0.64.1:8080/x", "/tmp/s.lua", "bench.example.com", duration_s=10)
    assert argv[:4] == ["wrk", "-t1", "-c50", "-d10s"]
    assert ["-H", "Host: bench.example.com"] == argv[argv.index("-H"):argv.index("-H") + 2]
    assert "--latency" in argv and argv[-1] == "http://127.0.64.1:8080/x"


# --------------------------------------------------------------------------- /proc/stat

STAT_BEFORE = """cpu  1000 0 500 8000 100 0 0 50 0 0
cpu0 600 0 300 3000 50 0 0 25 0 0
cpu1 400 0 200 5000 50 0 0 25 0 0
intr 12345
ctxt 999
"""
STAT_AFTER = """cpu  1700 0 700 8500 100 0 0 150 0 0
cpu0 1000 0 400 3050 50 0 0 75 0 0
cpu1 700 0 300 5450 50 0 0 75 0 0
intr 23456
"""


def test_cpu_usage_from_two_snapshots():
    usage = cpu.usage_by_cpu(STAT_BEFORE, STAT_AFTER)
    # cpu0: +400 user +100 system +50 idle +50 steal = 600 jiffies.
    assert usage["cpu0"].busy == pytest.approx(500 / 600)
    assert usage["cpu0"].steal == pytest.approx(50 / 600)
    # cpu1: +300 user +100 system +450 idle +50 steal = 900.
    assert usage["cpu1"].busy == pytest.approx(400 / 900)
    assert usage["cpu"].steal == pytest.approx(100 / 1500)


def test_iowait_counts_as_idle_and_old_kernels_parse():
    before = cpu.parse_proc_stat("cpu0 10 0 10 100 0\n")["cpu0"]
    after = cpu.parse_proc_stat("cpu0 10 0 10 150 50\n")["cpu0"]
    assert before.steal == 0
    assert cpu.usage(before, after).busy == 0.0
    assert cpu.usage(after, after) == cpu.CpuUsage(0.0, 0.0)


# --------------------------------------------------------------------------- dnsperf

DNSPERF_OUTPUT = """DNS Performance Testing Tool
Version 2.10.0

[Status] Command line: dnsperf -s 127.0.67.1 -p 8053 -d q.txt -l 10
[Status] Sending queries (to 127.0.67.1:8053)
[Status] Started at: Mon Nov 23 05:00:00 2026
[Status] Stopping after 10.000000 seconds
[Status] Testing complete (time limit)

Statistics:

  Queries sent:         812345
  Queries completed:    812300 (99.99%)
  Queries lost:         45 (0.01%)

  Response codes:       NOERROR 812200 (99.99%), SERVFAIL 100 (0.01%)
  Average packet size:  request 51, response 67
  Run time (s):         10.000123
  Queries per second:   81229.012345

  Average Latency (s):  0.001213 (min 0.000041, max 0.012345)
  Latency StdDev (s):   0.000345

"""


def test_dnsperf_statistics_are_parsed():
    result = dnsperf.parse(DNSPERF_OUTPUT)
    assert (result.sent, result.completed, result.lost) == (812345, 812300, 45)
    assert result.qps == pytest.approx(81229.012345)
    assert result.mean_latency_ms == pytest.approx(1.213)
    assert result.max_latency_ms == pytest.approx(12.345)
    assert result.stddev_ms == pytest.approx(0.345)
    assert result.rcodes == {"NOERROR": 812200, "SERVFAIL": 100}
    assert result.noerror_share == pytest.approx(812200 / 812300)


def test_dnsperf_without_statistics_is_an_error():
    with pytest.raises(dnsperf.DnsperfParseError):
        dnsperf.parse("Error: unable to open datafile\n")


# --------------------------------------------------------------------------- report


def test_markdown_table_is_padded_and_escaped():
    text = report.markdown_table(["server", "req/s"], [["nginx", "1,000"], ["a|b", "2"]])
    assert text.splitlines() == [
        "| server | req/s |",
        "|--------|-------|",
        "| nginx  | 1,000 |",
        "| a\\|b   | 2     |",
    ]


def test_report_renders_sections_in_order():
    table = report.Table("Hits", ["server", "ratio"])
    table.add("edge", report.ratio(50.0, 100.0))
    table.notes.append("a note")
    text = report.render(report.Report("Results", summary=["one line"], tables=[table],
                                       environment=[("wrk", "4.1.0")], commands=["wrk -t1"]))
    assert text.index("# Results") < text.index("- one line") < text.index("## Hits")
    assert "| edge   | 0.50  |" in text and "- a note" in text
    assert text.index("## Environment") < text.index("## Exact commands") < text.index("wrk -t1")


def test_table_rejects_rows_of_the_wrong_width():
    with pytest.raises(ValueError):
        report.Table("t", ["a", "b"]).add("only one")


def test_number_formats():
    assert report.ratio(3.0, 0.0) == "n/a"
    assert report.ratio(1.0, 3.0) == "0.33"
    assert report.rate(12345.6) == "12,346"
    assert (report.ms(0.456), report.ms(45.6), report.ms(456.0)) == ("0.46", "45.6", "456")
    assert report.percent(0.915) == "92%" and report.mib(3 * 2**20) == "3.0"
    assert report.median([3.0, 1.0, 2.0]) == 2.0 and report.median([]) == 0.0


# --------------------------------------------------------------------------- rotation, paths


def test_rotation_puts_each_server_first_once():
    servers = ["edge", "nginx", "varnish"]
    rounds = [rotated(servers, r) for r in range(3)]
    assert rounds == [["edge", "nginx", "varnish"], ["nginx", "varnish", "edge"], ["varnish", "edge", "nginx"]]
    assert rotated([], 2) == []


def test_hit_object_paths_need_no_percent_encoding():
    path = object_path(102400)
    assert path == "/gen/hit-102400?size=102400&cc=max-age=86400"
    assert re.fullmatch(r"[A-Za-z0-9/?&=.,_-]+", path)


# --------------------------------------------------------------------------- configs


def test_fill_rejects_unknown_placeholders():
    assert peers.fill("listen {{a}};", {"a": "127.0.64.1:8080"}) == "listen 127.0.64.1:8080;"
    with pytest.raises(peers.TemplateError, match="nope"):
        peers.fill("{{nope}}", {})


def test_every_rendered_config_listens_only_on_loopback(tmp_path: Path):
    rendered = peers.render_all(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".conf", ".vcl", ".toml", ".config")]
    assert rendered["topology"] in files and len(files) >= 8
    addresses = set()
    for path in files:
        text = path.read_text()
        assert "{{" not in text, path
        addresses |= set(re.findall(r"\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b", text))
    assert addresses
    for address in addresses:
        ip = ipaddress.ip_address(address)
        assert ip.is_loopback, f"{address} is not loopback"


def test_benchmark_topology_loads_with_the_product_loader(tmp_path: Path):
    from edge import config
    topology = config.load(peers.render_all(tmp_path)["topology"])
    assert {n.name for n in topology.nodes} == {"origin", "l2", "l1", "l1-west"}
    assert topology.node("l1").parents == ("l2",)
    assert topology.site_for_host("fast.example.com").origin == "http://127.0.60.2:8080"
    assert topology.state_dir == tmp_path / "state"


# --------------------------------------------------------------------------- profile folding


def test_profile_fold_counts_self_and_inclusive_once_per_stack():
    collapsed = (
        "run (asyncio/base_events.py:1922);handle (edge/proxy.py:100);get (edge/store/memory.py:50) 30\n"
        "run (asyncio/base_events.py:1922);handle (edge/proxy.py:120) 10\n"
        "run (asyncio/base_events.py:1922);recurse (x.py:1);recurse (x.py:2) 5\n"
        "garbage line\n"
    )
    self_samples, inclusive, total = fold(collapsed)
    assert total == 45
    assert self_samples["get (edge/store/memory.py)"] == 30
    assert self_samples["handle (edge/proxy.py)"] == 10
    assert inclusive["handle (edge/proxy.py)"] == 40
    assert inclusive["run (asyncio/base_events.py)"] == 45
    assert inclusive["recurse (x.py)"] == 5
    assert frame_name("f (a.py:12)") == "f (a.py)"


def test_seeded_randomness_is_not_global():
    # make_trace must not depend on or disturb the global random state.
    random.seed(1)
    first = zipf.make_trace(100, 50, 1.0, seed=5).requests
    random.seed(2)
    assert zipf.make_trace(100, 50, 1.0, seed=5).requests == first


def test_process_time_share_excludes_interrupt_work():
    usage = cpu.usage_by_cpu(STAT_BEFORE, STAT_AFTER)["cpu0"]
    assert usage.tasks == pytest.approx(500 / 600)     # user + system; no irq/softirq in this sample
    before = cpu.parse_proc_stat("cpu0 100 0 100 100 0 0 0 0\n")["cpu0"]
    after = cpu.parse_proc_stat("cpu0 150 0 150 100 0 0 100 0\n")["cpu0"]
    assert cpu.usage(before, after).busy == pytest.approx(1.0)
    assert cpu.usage(before, after).tasks == pytest.approx(0.5)


def test_pid_stat_parsing_survives_odd_command_names():
    line = ("4242 (nginx: worker (x) 1) S 4240 4240 4240 0 -1 4194624 1200 0 0 0 "
            "350 125 0 0 20 0 1 0 12345 1000000 500 18446744073709551615\n")
    assert cpu.parse_pid_stat(line) == (4240, 475)


def test_profile_time_by_source_file():
    from collections import Counter as C
    from benchmarks.profile import by_file, source_file
    assert source_file("handle (aiohttp/web_protocol.py)") == "aiohttp/web_protocol.py"
    files = by_file(C({"a (x/y.py)": 3, "b (x/y.py)": 4, "c (z.py)": 1}))
    assert files == C({"x/y.py": 7, "z.py": 1})


def test_profile_fold_leaves_out_idle_executor_threads():
    collapsed = ("Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:81) 70\n"
                 "Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83);read (f.py:3) 5\n"
                 "main (m.py:1);handle (edge/proxy.py:9) 25\n")
    self_samples, inclusive, total = fold(collapsed)
    assert total == 30
    assert self_samples["read (f.py)"] == 5 and "_worker (concurrent/futures/thread.py)" not in self_samples


# --------------------------------------------------------------------------- processes


def test_processes_stop_what_they_started(tmp_path: Path):
    from benchmarks.procs import Processes
    with Processes(tmp_path) as processes:
        started = processes.start("sleeper", ["sleep", "30"])
        assert started.process.poll() is None
    assert started.process.poll() is not None and processes.started == []
    assert processes.commands == ["sleep 30"]


def test_a_server_ignoring_sigterm_is_killed_with_its_children(tmp_path: Path):
    from benchmarks.procs import Processes, wait_until
    processes = Processes(tmp_path)
    # The shell ignores SIGTERM and has a child; both must be gone after the deadline.
    started = processes.start("stubborn", ["sh", "-c", "trap '' TERM; sleep 30 & echo $!; wait"])
    wait_until(lambda: started.log_path.read_text().strip().isdigit(), "child pid", 5.0)
    child = int(started.log_path.read_text().strip())
    processes.stop_all(deadline_s=0.3)
    assert started.process.poll() is not None

    def child_gone() -> bool:
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"     # killed, waiting for init to reap it
    wait_until(child_gone, "child gone", 5.0)


def test_wait_until_gives_up_at_its_deadline():
    from benchmarks.procs import ReadinessError, wait_until
    with pytest.raises(ReadinessError, match="never"):
        wait_until(lambda: False, "never", deadline_s=0.2, interval_s=0.05)


def test_profile_inclusive_column_is_the_products_own_code():
    from benchmarks.profile import is_product_code
    assert is_product_code("CacheNode.handle (edge/proxy.py)")
    assert not is_product_code("main (edge/cli.py)")
    assert not is_product_code("RequestHandler.start (aiohttp/web_protocol.py)")
