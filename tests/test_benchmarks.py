"""Unit tests of the benchmark harness's pure parts (no servers, no load)."""

from __future__ import annotations

import ipaddress
from collections import Counter
import math
import random
import re
from pathlib import Path

import pytest

from benchmarks import cpu, dnsperf, layout, peers, report, wrk, zipf
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


def test_wrk_counted_script_asks_each_path_once_then_stops():
    script = wrk.counted_script("/gen/m-", 300_000)
    assert "local total = 300000" in script
    assert 'wrk.format("GET", "/gen/m-" .. ((counter - 1) % total + 1))' in script
    assert "wrk.thread:stop()" in script and "done = function" in script
    with pytest.raises(ValueError):
        wrk.counted_script('/gen/"', 10)
    with pytest.raises(ValueError):
        wrk.counted_script("/gen/m-", 0)


def test_wrk_command_is_one_thread_keepalive_with_host():
    argv = wrk.command("http://127.0.64.1:8080/x", "/tmp/s.lua", "bench.example.com", duration_s=10)
    assert argv[:4] == ["wrk", "-t1", "-c50", "-d10s"]
    assert ["-H", "Host: bench.example.com"] == argv[argv.index("-H"):argv.index("-H") + 2]
    assert "--latency" in argv and argv[-1] == "http://127.0.64.1:8080/x"
    assert argv.count("-H") == 1


def test_wrk_command_adds_more_headers_after_host():
    argv = wrk.command("https://127.0.62.1:8443/x", "/tmp/s.lua", "bench.example.com", duration_s=3,
                       headers=("Connection: close",))
    assert argv[-5:] == ["-H", "Host: bench.example.com", "-H", "Connection: close", "https://127.0.62.1:8443/x"]


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


def _rendered_topology(tmp_path: Path):
    """The benchmark topology as the harness renders it, read by the product's own loader."""
    from edge import config
    return config.load(peers.render_all(tmp_path)["topology"])


def test_benchmark_topology_loads_with_the_product_loader(tmp_path: Path):
    topology = _rendered_topology(tmp_path)
    assert {n.name for n in topology.nodes} == {"origin", "l2", "l1", "l1-logs", "l1-west"}
    assert topology.node("l1").parents == ("l2",)
    assert topology.node("l1-logs").parents == ()      # fills from the origin: one origin request to warm
    assert topology.site_for_host("fast.example.com").origin == "http://127.0.60.2:8080"
    assert topology.state_dir == tmp_path / "state"


def test_quiet_nodes_have_their_access_log_off_and_the_logging_l1_its_defaults(tmp_path: Path):
    import tomllib
    nodes = tomllib.loads(peers.render_all(tmp_path)["topology"].read_text())["nodes"]
    assert [name for name, node in nodes.items() if node.get("access_log") == "off"] == ["l2", "l1", "l1-west"]
    assert "access_log" not in nodes["l1-logs"] and "access_log_format" not in nodes["l1-logs"]
    topology = _rendered_topology(tmp_path / "again")
    assert topology.node("l1").access_log == "off"
    assert topology.node("l1-logs").access_log == "-"


def test_the_logging_l1_does_not_change_the_dns_schedulers_answers(tmp_path: Path):
    from edge.scheduler.answer import Answerer, EdgeStatus
    answerer = Answerer(_rendered_topology(tmp_path))
    # Same region as l1, ranked after it: with every edge up (or l1-logs not running) east gets l1.
    for health in ({}, {"l1-logs": EdgeStatus(up=False)}):
        assert [e.name for e in answerer.choose("east", 4, health).chosen] == ["l1"]
        assert [e.name for e in answerer.choose("west", 4, health).chosen] == ["l1-west"]


def test_the_two_nginx_configs_differ_only_in_name_address_and_access_log(tmp_path: Path):
    rendered = peers.render_all(tmp_path)
    quiet = rendered["nginx_l1"].read_text().splitlines()
    logging_ = rendered["nginx_l1_logs"].read_text().splitlines()
    assert len(quiet) == len(logging_)
    differ = [(a, b) for a, b in zip(quiet, logging_) if a != b]
    directives = [b.split()[0] for a, b in differ if not a.lstrip().startswith("#")]
    assert set(directives) <= {"pid", "error_log", "access_log", "client_body_temp_path", "proxy_temp_path",
                               "fastcgi_temp_path", "uwsgi_temp_path", "scgi_temp_path", "proxy_cache_path",
                               "listen"}
    assert "    access_log off;" in quiet
    assert f"    access_log {tmp_path}/nginx-access.log combined buffer=64k flush=1s;" in logging_
    assert any(line.strip().startswith("listen 127.0.64.3:8080") for line in logging_)
    # The HTTPS server: quiet in nginx-l1 (measured), logging TLS details in nginx-l1-logs (the resumption check).
    assert "        access_log off;" in quiet
    assert f"        access_log {tmp_path}/{peers.NGINX_TLS_ACCESS_LOG_FILE} tls;" in logging_


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


# --------------------------------------------------------------------------- targets

def _load(rps: float, p99_ms: float, client_busy: float = 0.5, requests: int | None = None,
          errors_status: int = 0):
    from benchmarks.loadrun import LoadRun
    requests = int(rps) if requests is None else requests
    result = wrk.WrkResult(requests=requests, duration_s=requests / rps if rps else 1.0,
                           bytes_read=requests * 2048, errors_connect=0, errors_read=0, errors_write=0,
                           errors_timeout=0, errors_status=errors_status, p50_ms=p99_ms / 2,
                           p90_ms=p99_ms / 1.5, p99_ms=p99_ms, max_ms=p99_ms * 2)
    return LoadRun(result=result, client_busy=client_busy, server_busy=1.0, server_own=0.99,
                   other_load=0.0, steal=0.0)


def _hit_runs(figures: dict) -> list:
    """figures: (size, target) -> (req/s, p99 ms[, client busy])."""
    from benchmarks.scenarios.hit import Runs
    return [Runs(target, loads=[_load(*values)], size=size) for (size, target), values in figures.items()]


def test_every_target_is_listed_and_unmeasured_ones_say_why():
    from benchmarks import targets
    from benchmarks.context import FULL, QUICK
    keys = [g.key for g in targets.goals(QUICK)]
    assert len(keys) == len(set(keys)) == 8 + 16      # 2 sizes x 2 log settings x (req/s, p99) + 16 others
    table = targets.table(QUICK, [targets.Verdict("miss", "0.60 x", True)], ran={"miss", "hit"})
    rows = {row[0]: row for row in table.rows}
    assert rows["Miss chain L1 -> L2 -> origin: req/s"][3] == "met"
    assert rows["Warm hit 1 KiB, logs on: edge L1 req/s"][3:] == ["not measured", "not measured"]
    assert rows["DNS scheduler QPS"][3:] == ["not measured", "scenario not run (--only)"]
    assert rows["Warm hit 1 KiB, logs off: edge L1 req/s"][1] == ">= 1.50 x nginx (logs off), one CPU each"
    assert rows["Warm hit 100 KiB, logs on: edge L1 req/s"][1] == ">= 1.00 x nginx (logs on), one CPU each"
    assert any("256 MiB" in row[0] for row in table.rows)
    assert any("1 GiB" in g.what for g in targets.goals(FULL))
    collapse_goal = next(g for g in targets.goals(QUICK) if g.key == "collapse")
    assert collapse_goal.goal == "1 origin request, last response <= 220 ms"
    assert targets.summary(QUICK, [targets.Verdict("miss", "x", True), targets.Verdict("dns", "x", False)]) == \
        "Targets: 1 met, 1 below, 22 not measured (of 24; see the table Targets)"
    memory_goal = next(g for g in targets.goals(FULL) if g.key == "memory-rss")
    assert memory_goal.scenario == "memory" and "300,000 unique 1 KiB URLs" in memory_goal.what
    assert "50,000" in next(g for g in targets.goals(QUICK) if g.key == "memory-rss").what


def test_target_arithmetic():
    from benchmarks import targets
    assert targets.at_least("k", 150.0, 100.0, 1.5).met
    assert not targets.at_least("k", 149.0, 100.0, 1.5).met
    assert targets.at_least("k", 149.0, 100.0, 1.5).measured == "1.49 x"
    assert not targets.at_least("k", 1.0, 0.0, 1.0).met              # no reference: never a pass
    assert targets.no_worse("k", 1.0, 1.0).met and not targets.no_worse("k", 1.01, 1.0).met
    assert not targets.no_worse("k", 0.0, 1.0).met
    assert targets.below_bytes("k", 64 * 2**20 - 1).met and not targets.below_bytes("k", 64 * 2**20).met
    assert targets.collapse(1, 220.0, 200, True).met
    assert not targets.collapse(1, 220.4, 200, True).met
    assert targets.collapse(1, 220.4, 200, True).measured == "1 origin request(s), last at 220.4 ms"
    assert not targets.collapse(2, 205.0, 200, True).met
    assert not targets.collapse(1, 205.0, 200, False).met
    assert targets.at_most_bytes("k", 2**20, 2**20).met and not targets.at_most_bytes("k", 2**20 + 1, 2**20).met
    assert targets.at_most_bytes("k", 3 * 2**19, 2**21).measured == "1.5 MiB of 2.0 MiB allowed"


def test_hit_targets_compare_with_the_nginx_of_the_same_log_setting():
    from benchmarks import servers
    from benchmarks.scenarios import hit
    figures = {
        (1024, servers.OURS): (150_000, 1.0), (1024, servers.NGINX): (100_000, 1.2, 0.95),
        (1024, servers.OURS_LOGS): (100_000, 2.0), (1024, servers.NGINX_LOGS): (80_000, 1.5),
        (1024, servers.CEILING_HTTPTOOLS): (200_000, 0.5),
        (102400, servers.OURS): (30_000, 3.0), (102400, servers.NGINX): (30_000, 3.0),
        (102400, servers.OURS_LOGS): (20_000, 3.0), (102400, servers.NGINX_LOGS): (25_000, 3.0),
    }
    verdicts = {v.key: v for v in hit.verdicts(_hit_runs(figures))}
    assert len(verdicts) == 8
    assert verdicts["hit-1024-off-rps"].met and verdicts["hit-1024-off-rps"].measured == "1.50 x"
    assert "upper bound" in verdicts["hit-1024-off-rps"].note          # nginx was client-limited
    assert verdicts["hit-1024-off-p99"].met
    assert not verdicts["hit-1024-on-rps"].met                         # 1.25 x the logs-on nginx
    assert verdicts["hit-1024-on-rps"].measured == "1.25 x"
    assert not verdicts["hit-1024-on-p99"].met
    assert verdicts["hit-102400-off-rps"].met and verdicts["hit-102400-off-p99"].met
    assert not verdicts["hit-102400-on-rps"].met


def test_hit_table_puts_logs_on_rows_after_logs_off_and_ratios_to_their_own_nginx():
    from benchmarks import servers
    from benchmarks.scenarios import hit
    figures = {
        (1024, servers.OURS_LOGS): (40_000, 2.0), (1024, servers.NGINX_LOGS): (80_000, 1.5),
        (1024, servers.OURS): (50_000, 1.0), (1024, servers.NGINX): (100_000, 1.2),
        (1024, servers.CEILING): (25_000, 3.0), (1024, servers.CEILING_HTTPTOOLS): (120_000, 0.5),
    }
    table = hit.table(_hit_runs(figures))
    order = [row[1] for row in table.rows]
    assert order == ["edge L1, logs off", "nginx, logs off", "bare aiohttp (Python ceiling)",
                     "bare httptools+uvloop (Python ceiling)", "edge L1, logs on", "nginx, logs on"]
    ratio = {row[1]: row[3] for row in table.rows}
    assert ratio["edge L1, logs on"] == "0.50" and ratio["edge L1, logs off"] == "0.50"
    assert ratio["bare httptools+uvloop (Python ceiling)"] == "1.20"
    notes = {row[1]: row[-1] for row in table.rows}
    assert "below target (>= 1.5 x nginx)" in notes["edge L1, logs on"]
    assert notes["nginx, logs on"] == ""


def test_a_logs_on_server_that_did_not_log_is_a_problem(tmp_path: Path):
    from benchmarks import servers
    from benchmarks.context import QUICK, Bench
    from benchmarks.procs import Processes
    from benchmarks.scenarios import hit
    bench = Bench(settings=QUICK, run_dir=tmp_path, configs={}, processes=Processes(tmp_path / "logs"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "l1-logs.log").write_text("startup line\n" + "GET / 200\n" * 1000)
    (tmp_path / "nginx-access.log").write_text("GET / 200\n" * 500)
    runs = _hit_runs({(1024, servers.OURS_LOGS): (500, 1.0), (102400, servers.OURS_LOGS): (500, 1.0),
                      (1024, servers.NGINX_LOGS): (1000, 1.0), (1024, servers.OURS): (1000, 1.0)})
    lines = hit.check_access_logs(bench, runs, wait_s=0.0)
    assert lines == {"edge L1, logs on": 1001, "nginx, logs on": 500}
    assert len(bench.problems) == 1 and bench.problems[0].startswith("nginx, logs on: 500 lines")


def test_large_object_targets_cover_full_and_slow_reads():
    from benchmarks import servers
    from benchmarks.scenarios import large

    def one(kind, speed, growth_mib, client_busy=0.3):
        return large.Pass(kind, 200, 2**28, speed, 1.0, 100 * 2**20, 100 * 2**20 + int(growth_mib * 2**20), 0,
                          client_busy)
    ours = large.LargeResult(servers.OURS, [one("miss", 1e8, 2), one("hit", 1.5e9, 10),
                                            one(large.SLOW, 1.1e7, 70)], True)
    ref = large.LargeResult(servers.NGINX, [one("miss", 2e8, 0), one("hit", 1.7e9, 0, 0.95)], False)
    verdicts = {v.key: v for v in large.verdicts(ours, ref)}
    assert not verdicts["large-hit"].met and verdicts["large-hit"].measured == "0.88 x"
    assert "upper bound" in verdicts["large-hit"].note
    assert verdicts["large-rss"].met and verdicts["large-rss"].measured == "10.0 MiB"
    assert not verdicts["large-slow-rss"].met and verdicts["large-slow-rss"].measured == "70.0 MiB"
    table = large.table([ours, ref], 2**28)
    slow_row = next(row for row in table.rows if row[1] == large.SLOW)
    assert slow_row[4] == "-" and "RSS over 64 MiB target" in slow_row[-1]


def test_server_labels_are_unique_and_tags_url_safe():
    from benchmarks import servers
    from benchmarks.run import HIT_TARGETS
    labels = [t.label for t in HIT_TARGETS]
    assert len(set(labels)) == len(labels) == 8
    assert "bare httptools+uvloop (Python ceiling)" in labels and "bare aiohttp (Python ceiling)" in labels
    assert servers.OURS_LOGS.tag == "edge-l1-logs-on"
    assert all(re.fullmatch(r"[a-z0-9-]+", t.tag) for t in HIT_TARGETS)
    assert [t.label for t in HIT_TARGETS if t.logs] == ["edge L1, logs on", "nginx, logs on"]


# --------------------------------------------------------------------------- the httptools ceiling


class _FakeTransport:
    def __init__(self):
        self.written = b""
        self.closed = False
        self.reading = True

    def writelines(self, parts):
        self.written += b"".join(parts)

    def close(self):
        self.closed = True

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True


def _responses(data: bytes) -> list[tuple[bytes, dict, bytes]]:
    """Split a byte stream of HTTP/1.1 responses with Content-Length."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        length = int(headers[b"Content-Length"])
        out.append((lines[0], headers, rest[:length]))
        data = rest[length:]
    return out


def test_httptools_ceiling_answers_pipelined_requests_in_order():
    from benchmarks import ceiling_httptools as ch
    protocol, transport = ch.HttpProtocol(), _FakeTransport()
    protocol.connection_made(transport)
    stream = (b"GET /gen/a?size=3&cc=x HTTP/1.1\r\nHost: b\r\n\r\nGET /gen/b?size=5 HTTP/1.1\r\nHo"
              b"st: b\r\n\r\nGET /missing HTTP/1.1\r\nHost: b\r\n\r\nGET /gen/c?size=nope HTTP/1.1\r\n\r\n")
    protocol.data_received(stream[:50])      # a request split across reads
    protocol.data_received(stream[50:])
    answers = _responses(transport.written)
    assert [a[0] for a in answers] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found",
                                       b"HTTP/1.1 400 Bad Request"]
    assert answers[0][2] == bytes([0, 1, 2]) and answers[1][2] == bytes(range(5))
    first = answers[0][1]
    assert first[b"Content-Type"] == b"application/octet-stream"
    assert first[b"Cache-Control"] == b"public, max-age=3600"
    assert first[b"Connection"] == b"keep-alive" and first[b"Age"] == b"0"
    assert not transport.closed


def test_httptools_ceiling_closes_when_asked_and_on_garbage():
    from benchmarks import ceiling_httptools as ch
    protocol, transport = ch.HttpProtocol(), _FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"GET /gen/a?size=2 HTTP/1.1\r\nConnection: close\r\n\r\n")
    (status, headers, body), = _responses(transport.written)
    assert headers[b"Connection"] == b"close" and body == b"\x00\x01" and transport.closed
    protocol, transport = ch.HttpProtocol(), _FakeTransport()
    protocol.connection_made(transport)
    protocol.data_received(b"NOT HTTP AT ALL\r\n\r\n")
    assert transport.written.startswith(b"HTTP/1.1 400 ") and transport.closed


def test_httptools_ceiling_stops_reading_while_the_client_is_slow():
    from benchmarks import ceiling_httptools as ch
    protocol, transport = ch.HttpProtocol(), _FakeTransport()
    protocol.connection_made(transport)
    protocol.pause_writing()
    assert not transport.reading
    protocol.resume_writing()
    assert transport.reading


def test_httptools_ceiling_bodies_match_the_aiohttp_ceiling():
    from benchmarks import ceiling, ceiling_httptools as ch
    head, body = ch.answer(b"/gen/same?size=1000")
    assert body == ceiling.body(1000) and b"Content-Length: 1000\r\n" in head
    assert ch.answer(b"/gen/same?size=1000")[1] is body        # built once per URL
    assert ch.answer(b"/gen/x?size=%d" % (ch.MAX_SIZE + 1))[0].startswith(b"HTTP/1.1 400")
    assert ch.main(["0.0.0.0", "8080"]) == 2                     # loopback only


def test_httptools_ceiling_serves_over_a_real_socket(tmp_path: Path):
    import socket
    import sys
    from benchmarks.procs import Processes, tcp_open, wait_until
    host = "127.0.68.250"
    with socket.socket() as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]
    with Processes(tmp_path) as processes:
        started = processes.start("ceiling-httptools",
                                  [sys.executable, "-m", "benchmarks.ceiling_httptools", host, str(port)],
                                  cwd=Path(__file__).resolve().parent.parent)
        wait_until(lambda: tcp_open(host, port), "ceiling", 10.0, alive=lambda: processes.check_alive(started))
        with socket.create_connection((host, port), timeout=5) as connection:
            connection.sendall(b"GET /gen/a?size=4 HTTP/1.1\r\nHost: x\r\n\r\n"
                               b"GET /gen/b?size=70000 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := connection.recv(65536):
                data += chunk
    answers = _responses(data)
    assert [len(a[2]) for a in answers] == [4, 70000]
    assert answers[1][1][b"Connection"] == b"close"


# --------------------------------------------------------------------------- memory scenario


def test_memory_scenario_counts_every_request_the_l1_answered():
    from benchmarks.scenarios.memory import parse_requests_total
    exposition = (
        "# HELP edge_requests_total Client requests by cache status (nginx vocabulary) and method.\n"
        "# TYPE edge_requests_total counter\n"
        'edge_requests_total{cache_status="MISS",method="GET"} 99990.0\n'
        'edge_requests_total{cache_status="HIT",method="GET"} 59.0\n'
        'edge_requests_created{cache_status="HIT",method="GET"} 1.7e+09\n'
        "edge_response_body_bytes_total 1.0e+08\n")
    assert parse_requests_total(exposition) == 100_049
    assert parse_requests_total("") == 0


@pytest.mark.parametrize("memory_size, entries, per_entry, allowed", [
    (64 * 2**20, 0, 281.0, 128 * 2**20),
    (64 * 2**20, 300_000, 273.0, 128 * 2**20 + 81_900_000),
    (512 * 2**20, 1_000, 250.5, 576 * 2**20 + 250_500),
])
def test_memory_scenario_goal_is_memory_size_plus_index_plus_64_mib(memory_size, entries, per_entry, allowed):
    from benchmarks.scenarios.memory import allowed_rss
    assert allowed_rss(memory_size, entries, per_entry) == allowed


def test_memory_topology_has_one_l1_with_64_mib_in_front_of_the_fast_origin(tmp_path: Path):
    from edge import config
    rendered = peers.render_all(tmp_path)
    topology = config.load(rendered["memory_topology"])
    node = topology.node("l1-mem")
    assert [n.name for n in topology.nodes] == ["l1-mem"] and node.parents == ()
    assert node.memory_size == 64 * 2**20 and node.disk_size >= 2 * 300_000 * 1700
    assert str(node.listen) == str(layout.MEM_L1) and str(node.admin) == str(layout.MEM_L1_ADMIN)
    assert topology.site_for_host(layout.MEM_SITE_HOST).origin == layout.MEM_ORIGIN.url
    origin_conf = rendered["mem_origin"].read_text()
    assert f"listen {layout.MEM_ORIGIN} " in origin_conf
    assert f"pid {tmp_path}/{peers.MEM_ORIGIN_DIR}/fast-origin.pid;" in origin_conf
    assert (tmp_path / peers.MEM_ORIGIN_DIR / "fast-origin" / "www" / "object").stat().st_size == 1024


# --------------------------------------------------------------------------- the DNS flood


def test_dns_flood_packets_are_new_names_that_the_answer_cache_takes():
    """Every packet parses, asks a name never asked before, and is of the shape the cache's pre-parser reads."""
    import random

    import dns.message

    from benchmarks import dnsflood
    from edge.scheduler.wire import parse_query
    rng = random.Random(1)
    names, subnets, mixed_case = set(), 0, 0
    for qid in range(3000):
        wire = dnsflood.packet(rng, qid)
        message = dns.message.from_wire(wire)
        (question,) = message.question
        assert message.id == qid and question.name.to_text().lower().endswith(("example.com.", "example.net."))
        names.add(question.name.to_text().lower())
        subnets += any(o.otype == 8 for o in message.options)
        mixed_case += question.name.to_text() != question.name.to_text().lower()
        assert parse_query(wire) is not None, wire.hex()
    assert len(names) == 3000 and 1200 < subnets < 1800 and mixed_case > 2500
    assert dnsflood.packet(random.Random(1), 0) == dnsflood.packet(random.Random(1), 0)      # seeded
    assert dnsflood.packet(random.Random(1), 0) != dnsflood.packet(random.Random(2), 0)


def test_dns_ceiling_answers_any_name_with_its_id_and_question(tmp_path: Path):
    import socket
    import sys

    import dns.message
    import dns.query
    import dns.rdatatype

    from benchmarks.procs import Processes, wait_until
    host = "127.0.90.250"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port = probe.getsockname()[1]

    def answers(name: str) -> dns.message.Message | None:
        try:
            return dns.query.udp(dns.message.make_query(name, "A"), host, port=port, timeout=0.5)
        except dns.exception.Timeout:
            return None

    with Processes(tmp_path) as processes:
        started = processes.start("ceiling-dns", [sys.executable, "-m", "benchmarks.ceiling_dns", host, str(port)],
                                  cwd=Path(__file__).resolve().parent.parent)
        wait_until(lambda: answers("a.example.com") is not None, "dns ceiling", 10.0,
                   alive=lambda: processes.check_alive(started))
        for name in ("bench.example.com.cdn.example.net", "WwW.Example.COM"):
            response = answers(name)        # dnspython checks that the ID and question match
            assert response is not None and response.flags & dns.flags.AA
            assert [(r.name.to_text(), r.rdtype, [x.address for x in r]) for r in response.answer] == [
                (name + ".", dns.rdatatype.A, ["127.0.62.1"])]


# --------------------------------------------------------------------------- HTTPS: h2load, ab, the tls scenario

H2LOAD_NGINX = """starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 0s of warm-up time and 3s of main duration for measurements.
Warm-up started for thread #0.
progress: 10% of clients started
progress: 100% of clients started
TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2
Warm-up phase is over for thread #0.
Main benchmark duration is started for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 81201.50 req/s, 94.40MB/s
requests: 162403 total, 162503 started, 162403 done, 162403 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 162403 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 188.80MB (197969747) total, 27.41MB (28745331) headers (space savings 27.16%), 158.60MB (166300672) data
                     min         max         mean         sd        +/- sd
time for request:       29us     70.02ms      1.45ms      1.82ms    93.95%
time for connect:        0us         0us         0us         0us     0.00%
time to 1st byte:        0us         0us         0us         0us     0.00%
req/s           :    6550.24     6684.51     6628.22       40.79    60.00%
"""

# Our L1 before HTTP/2: ALPN offers http/1.1 only, h2load offered h2 only.
H2LOAD_NO_PROTOCOL = """starting benchmark...
spawning thread #0: 1 total client(s). 1 total requests
TLS Protocol: TLSv1.3
Cipher: TLS_AES_256_GCM_SHA384
Server Temp Key: X25519 253 bits
No protocol negotiated. Fallback behaviour may be activated
No supported protocol was negotiated. Supported protocols were:
h2

finished in 4.01s, 0.00 req/s, 0B/s
requests: 1 total, 0 started, 0 done, 0 succeeded, 1 failed, 1 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
"""

H2LOAD_REFUSED = """starting benchmark...
spawning thread #0: 1 total client(s). 10 total requests

finished in 442us, 0.00 req/s, 0B/s
requests: 10 total, 0 started, 0 done, 0 succeeded, 10 failed, 10 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 0B (0) total, 0B (0) headers (space savings 0.00%), 0B (0) data
"""

H2LOAD_404 = """TLS Protocol: TLSv1.3
Cipher: TLS_AES_128_GCM_SHA256
Server Temp Key: X25519 253 bits
Application protocol: h2

finished in 9.54s, 10.48 req/s, 1.25KB/s
requests: 100 total, 100 started, 100 done, 0 succeeded, 100 failed, 0 errored, 0 timeout
status codes: 0 2xx, 0 3xx, 100 4xx, 0 5xx
traffic: 11.90KB (12189) total, 9.07KB (9291) headers (space savings 38.03%), 1000B (1000) data
"""

# A server that offers http/1.1 only, asked by an h2load that still offers http/1.1 (its default list).
H2LOAD_FELL_BACK = H2LOAD_404.replace("Application protocol: h2", "Application protocol: http/1.1").replace(
    "0 succeeded, 100 failed", "100 succeeded, 0 failed").replace("0 2xx, 0 3xx, 100 4xx", "100 2xx, 0 3xx, 0 4xx")


@pytest.mark.parametrize("output, rps, done, socket_errors, not_2xx, per_response, tls, refusal", [
    (H2LOAD_NGINX, 81201.5, 162403, 0, 0, 1024.0, "TLSv1.3 TLS_AES_128_GCM_SHA256", None),
    (H2LOAD_NO_PROTOCOL, 0.0, 0, 1, 0, 0.0, "TLSv1.3 TLS_AES_256_GCM_SHA384",
     'no protocol negotiated (h2load: "No protocol negotiated")'),
    (H2LOAD_REFUSED, 0.0, 0, 10, 0, 0.0, "", "every request failed (10 errored; no connection?)"),
    (H2LOAD_404, 10.48, 100, 0, 100, 10.0, "TLSv1.3 TLS_AES_128_GCM_SHA256", None),
    (H2LOAD_FELL_BACK, 10.48, 100, 0, 0, 10.0, "TLSv1.3 TLS_AES_128_GCM_SHA256", "ALPN chose http/1.1, not h2"),
])
def test_h2load_output_is_parsed(output, rps, done, socket_errors, not_2xx, per_response, tls, refusal):
    from benchmarks import h2load
    result = h2load.parse(output)
    assert result.rps == pytest.approx(rps)
    assert (result.requests, result.socket_errors, result.errors_status) == (done, socket_errors, not_2xx)
    assert result.bytes_per_response == pytest.approx(per_response)
    assert result.tls == tls
    assert result.refusal() == refusal
    assert result.p99_ms == 0.0 and result.log is None         # no --log-file given


def test_a_timed_h2load_run_ends_with_streams_in_flight_and_that_is_not_an_error():
    from benchmarks import h2load
    result = h2load.parse(H2LOAD_NGINX)
    assert result.started - result.done == 100 and result.socket_errors == 0
    assert result.application_protocol == "h2" and result.temp_key == "X25519 253 bits"


def test_h2load_output_without_its_summary_is_an_error():
    from benchmarks import h2load
    with pytest.raises(h2load.H2loadParseError):
        h2load.parse("h2load: unrecognized option '--bogus'\n")


@pytest.mark.parametrize("log, statuses, non_2xx, p50, p99, worst", [
    ("", {}, 0, 0.0, 0.0, 0.0),
    ("1796184018015553\t200\t4942\n", {200: 1}, 0, 4.942, 4.942, 4.942),
    ("".join(f"17961840180{i:05d}\t200\t{(i + 1) * 1000}\n" for i in range(100)), {200: 100}, 0, 50.0, 99.0, 100.0),
    ("1\t200\t1000\n2\t-1\t5000\n3\t404\t2000\n4\t200\t3000\n", {200: 2, -1: 1, 404: 1}, 2, 2.0, 5.0, 5.0),
])
def test_h2load_request_log_gives_statuses_and_percentiles(log, statuses, non_2xx, p50, p99, worst):
    from benchmarks import h2load
    parsed = h2load.parse_log(log)
    assert dict(parsed.statuses) == statuses and parsed.non_2xx == non_2xx
    assert (parsed.p50_ms, parsed.p99_ms, parsed.max_ms) == pytest.approx((p50, p99, worst))
    result = h2load.parse(H2LOAD_NGINX, log)
    assert result.p99_ms == pytest.approx(p99)


def test_h2load_log_lines_it_does_not_understand_are_an_error():
    from benchmarks import h2load
    with pytest.raises(h2load.H2loadParseError):
        h2load.parse_log("1\tOK\t1000\n")


def test_h2load_command_offers_h2_only_and_connects_to_the_address():
    from benchmarks import h2load
    argv = h2load.command("https://bench.example.com:8444/x", "127.0.64.1:8444", 10, 10, duration_s=2.5,
                          log_file="/tmp/h.log")
    assert argv[0] == "h2load" and argv[-1] == "https://bench.example.com:8444/x"
    assert {"--threads=1", "--clients=10", "--max-concurrent-streams=10", "--npn-list=h2",
            "--connect-to=127.0.64.1:8444", "--duration=2500ms", "--log-file=/tmp/h.log"} <= set(argv)
    counted = h2load.command("https://b/x", "127.0.62.1:8443", 1, 1, requests=1)
    assert "--requests=1" in counted and not any(a.startswith("--duration") for a in counted)
    with pytest.raises(ValueError):
        h2load.command("https://b/x", "127.0.62.1:8443", 1, 1)
    with pytest.raises(ValueError):
        h2load.command("https://b/x", "127.0.62.1:8443", 1, 1, duration_s=1, requests=1)


AB_OUTPUT = """This is ApacheBench, Version 2.3 <$Revision$>
Copyright 1996 Adam Twiss, Zeus Technology Ltd, http://www.zeustech.net/
Licensed to The Apache Software Foundation, http://www.apache.org/

Benchmarking 127.0.62.1 (be patient).....done


Server Software:        edge-origin
Server Hostname:        127.0.62.1
Server Port:            8443
SSL/TLS Protocol:       TLSv1.3,TLS_AES_256_GCM_SHA384,256,256
Server Temp Key:        X25519 253 bits
TLS Server Name:        bench.example.com

Document Path:          /gen/tls-1024?size=1024&cc=max-age=86400
Document Length:        1024 bytes

Concurrency Level:      50
Time taken for tests:   2.000 seconds
Complete requests:      2594
Failed requests:        0
Total transferred:      3950662 bytes
HTML transferred:       2656256 bytes
Requests per second:    1296.98 [#/sec] (mean)
Time per request:       38.551 [ms] (mean)
Time per request:       0.771 [ms] (mean, across all concurrent requests)
Transfer rate:          1929.01 [Kbytes/sec] received

Connection Times (ms)
              min  mean[+/-sd] median   max
Connect:        4   36   5.0     36      62
Processing:     1    2   1.4      2      25
Waiting:        1    2   0.8      2      24
Total:         11   38   4.8     38      64

Percentage of the requests served within a certain time (ms)
  50%     38
  66%     38
  75%     39
  80%     39
  90%     41
  95%     42
  98%     54
  99%     62
 100%     64 (longest request)
"""

AB_CSV = "Percentage served,Time in ms\n0,10.991\n1,22.043\n50,37.512\n98,53.596\n99,61.883\n100,63.658\n"

AB_FAILURES = AB_OUTPUT.replace("Failed requests:        0\n", "Failed requests:        7\n"
                                "   (Connect: 1, Receive: 2, Length: 3, Exceptions: 1)\n"
                                "Non-2xx responses:      5\n")


@pytest.mark.parametrize("output, csv, failed, breakdown, non_2xx, p50, p99", [
    (AB_OUTPUT, None, 0, (0, 0, 0, 0), 0, 38.0, 62.0),
    (AB_OUTPUT, AB_CSV, 0, (0, 0, 0, 0), 0, 37.512, 61.883),
    (AB_FAILURES, None, 7, (1, 2, 3, 1), 5, 38.0, 62.0),
])
def test_ab_output_is_parsed(output, csv, failed, breakdown, non_2xx, p50, p99):
    from benchmarks import ab
    result = ab.parse(output, csv)
    assert result.requests == result.complete == 2594
    assert result.rps == pytest.approx(1296.98) and result.time_taken_s == pytest.approx(2.0)
    assert (result.socket_errors, result.errors_status) == (failed, non_2xx)
    assert (result.failed_connect, result.failed_receive, result.failed_length, result.failed_exceptions) == breakdown
    assert (result.p50_ms, result.p99_ms) == pytest.approx((p50, p99))
    assert result.document_length == 1024
    assert result.tls == "TLSv1.3 TLS_AES_256_GCM_SHA384" and result.server_name == "bench.example.com"
    assert result.server_temp_key == "X25519 253 bits"


def test_ab_over_plain_http_has_no_tls_and_garbage_is_an_error():
    from benchmarks import ab
    plain = "\n".join(line for line in AB_OUTPUT.splitlines()
                      if not line.startswith(("SSL/TLS", "Server Temp Key", "TLS Server Name")))
    assert ab.parse(plain).tls == "" and ab.parse(plain).server_name == ""
    with pytest.raises(ab.AbParseError):
        ab.parse("ab: invalid URL\nUsage: ab [options] [http[s]://]hostname[:port]/path\n")


def test_ab_command_bounds_the_run_in_time_then_count():
    from benchmarks import ab
    argv = ab.command("https://127.0.62.1:8443/x", "bench.example.com", 50, 3.0, 60_000, "/tmp/p.csv")
    assert argv[0] == "ab" and argv[-1] == "https://127.0.62.1:8443/x"
    # -n after -t: ab reads its options in order, and -t alone means -n 50000.
    assert argv.index("-t") < argv.index("-n") and argv[argv.index("-t") + 1] == "3"
    assert argv[argv.index("-n") + 1] == "60000" and argv[argv.index("-c") + 1] == "50"
    assert ["-H", "Host: bench.example.com"] == argv[argv.index("-H"):argv.index("-H") + 2]
    assert ["-e", "/tmp/p.csv"] == argv[argv.index("-e"):argv.index("-e") + 2]
    assert "-k" not in argv and "-r" in argv         # no keep-alive; receive errors are counted, not fatal


def test_tls_resumption_is_counted_from_nginxs_log_lines():
    from benchmarks.scenarios import tls
    lines = [". TLSv1.3 TLS_AES_256_GCM_SHA384 bench.example.com 200 1 1",
             "r TLSv1.3 TLS_AES_256_GCM_SHA384 127.0.64.3 200 2 1",
             "r TLSv1.3 TLS_AES_256_GCM_SHA384 127.0.64.3 200 3 1", ""]
    assert tls.count_resumed(lines) == (2, 1)
    assert tls.count_resumed([]) == (0, 0)


def _tls_runs(figures: dict) -> list:
    """figures: (kind, target) -> (req/s, p99 ms[, client busy]) or a reason it was not measured."""
    from benchmarks.scenarios import tls
    out = []
    for (kind, target), values in figures.items():
        if isinstance(values, str):
            out.append(tls.TlsRuns(target, kind=kind, not_measured=values))
        else:
            out.append(tls.TlsRuns(target, loads=[_load(*values)], kind=kind))
    return out


def test_tls_targets_and_the_h2_row_until_the_l1_speaks_h2():
    from benchmarks import targets
    from benchmarks.context import QUICK
    from benchmarks.scenarios import tls
    why = "the L1 did not negotiate h2: no protocol negotiated"
    runs = _tls_runs({(tls.KEEPALIVE, tls.OURS): (21_000, 5.0), (tls.KEEPALIVE, tls.NGINX): (20_000, 6.0, 0.95),
                      (tls.FULL, tls.OURS): (600, 80.0), (tls.FULL, tls.NGINX): (1_500, 40.0, 0.98),
                      (tls.RESUMED, tls.OURS): (800, 60.0), (tls.RESUMED, tls.NGINX): (1_600, 30.0),
                      (tls.H2, tls.OURS): why, (tls.H2, tls.NGINX): (80_000, 15.0)})
    verdicts = {v.key: v for v in tls.verdicts(runs)}
    assert verdicts["tls-hit-rps"].met and verdicts["tls-hit-rps"].measured == "1.05 x"
    assert "upper bound" in verdicts["tls-hit-rps"].note
    assert not verdicts["h2-hit-rps"].judged and verdicts["h2-hit-rps"].note == why
    table = targets.table(QUICK, list(verdicts.values()), ran={"tls"})
    rows = {row[0]: row for row in table.rows}
    assert rows["HTTP/2 warm hit 1 KiB (h2load): edge L1 req/s"][2:] == ["-", "not measured", why]
    assert rows["HTTPS/1.1 warm hit 1 KiB, keep-alive: edge L1 req/s"][3] == "met"
    assert rows["HTTPS/1.1 warm hit 1 KiB, keep-alive: edge L1 req/s"][1] == ">= 1.00 x nginx (HTTPS), one CPU each"
    assert rows["HTTP/2 warm hit 1 KiB (h2load): edge L1 req/s"][1] == ">= 0.50 x nginx (HTTP/2), one CPU each"
    assert targets.summary(QUICK, list(verdicts.values())) == \
        "Targets: 1 met, 0 below, 23 not measured (of 24; see the table Targets)"
    assert tls.summary(runs) == ("TLS handshakes, a new connection per request (no goal): full 0.40 x nginx "
                                 "(600 vs 1,500/s) (nginx client-limited: upper bound); resumed 0.50 x nginx "
                                 "(800 vs 1,600/s)")
    report_rows = {(row[0], row[2]): row for row in tls.table(runs, []).rows}
    assert report_rows[(tls.H2, tls.OURS.label)][-1] == f"not measured: {why}"
    assert report_rows[(tls.H2, tls.NGINX.label)][4] == "1.00"
    assert report_rows[(tls.FULL, tls.OURS.label)][4] == "0.40"
    assert report_rows[(tls.KEEPALIVE, tls.NGINX.label)][-1] == "client-limited"


def test_tls_h2_target_is_judged_once_the_l1_speaks_h2():
    from benchmarks.scenarios import tls
    runs = _tls_runs({(tls.H2, tls.OURS): (30_000, 9.0), (tls.H2, tls.NGINX): (80_000, 15.0)})
    (verdict,) = tls.verdicts(runs)
    assert verdict.key == "h2-hit-rps" and verdict.judged and not verdict.met and verdict.measured == "0.38 x"
    row = next(r for r in tls.table(runs, []).rows if r[2] == tls.OURS.label)
    assert "below target (>= 0.5 x nginx)" in row[-1]


def test_tls_certificate_is_made_for_the_site_and_served_by_both(tmp_path: Path):
    import ssl
    import tomllib

    from cryptography import x509
    from edge import config
    rendered = peers.render_all(tmp_path)
    topology = config.load(rendered["topology"])
    site = topology.site_for_host(layout.SITE_HOST)
    assert site.tls_cert == tmp_path / peers.TLS_CERT and site.tls_key == tmp_path / peers.TLS_KEY
    assert str(topology.node("l1").listen_tls) == str(layout.L1_TLS)
    assert [n.name for n in topology.nodes if n.listen_tls] == ["l1"]
    assert rendered["tls_ca"] == tmp_path / "state" / "tls" / "ca.pem"
    # The leaf is for the site's host, signed by the run's CA, and its key matches.
    context = ssl.create_default_context(cafile=str(rendered["tls_ca"]))
    assert [c["subject"] for c in context.get_ca_certs()]
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(site.tls_cert, site.tls_key)
    leaf = x509.load_pem_x509_certificate(site.tls_cert.read_bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [layout.SITE_HOST]
    assert (site.tls_key.stat().st_mode & 0o777) == 0o600
    # nginx serves the same files, on its HTTP/1.1 and HTTP/2 ports, TLS 1.2 and 1.3 only.
    nginx = rendered["nginx_l1"].read_text()
    assert f"ssl_certificate {site.tls_cert};" in nginx and f"ssl_certificate_key {site.tls_key};" in nginx
    assert f"listen {layout.NGINX_L1_TLS} ssl backlog=4096;" in nginx
    assert f"listen {layout.NGINX_L1_H2} ssl http2 backlog=4096;" in nginx
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in nginx
    # Only the tls scenario's L1 listens for TLS: the hit scenario's logs-on L1 and the others do not.
    nodes = tomllib.loads(rendered["topology"].read_text())["nodes"]
    assert [name for name, node in nodes.items() if "listen_tls" in node] == ["l1"]


def test_tls_targets_have_unique_labels_and_their_own_groups():
    from benchmarks import run
    from benchmarks.procs import Started
    from benchmarks.scenarios import tls

    class _Process:
        def __init__(self, pid):
            self.pid = pid
    started = {name: Started(name, [], _Process(pid), Path("/dev/null"))
               for name, pid in (("l1", 11), ("nginx_l1", 22), ("l2", 33))}
    groups = run.server_groups(started)
    assert groups[tls.OURS.label] == {11} and groups[tls.NGINX.label] == {22}
    assert len({tls.OURS.label, tls.NGINX.label, tls.PROBE.label}) == 3
    assert tls.OURS.https_url("/x") == "https://127.0.62.1:8443/x"
    assert tls.NGINX.https_url("/x", tls.NGINX.h2) == "https://127.0.64.1:8444/x"
    assert "tls" in run.SCENARIOS


def test_the_workers_scenario_renders_the_shared_nginx_template(tmp_path):
    """Every placeholder of peers/nginx.conf is filled (the tls scenario added some), and nginx
    runs `worker_processes auto` on the scenario's address."""
    from benchmarks.scenarios import workers
    text = workers.render_nginx(tmp_path).read_text()
    assert "{{" not in text and "worker_processes auto;" in text
    assert f"listen {workers.NGINX_AUTO} backlog=4096;" in text


# --------------------------------------------------------------------------- slices (issue 15)

MiB = 2**20


def test_video_trace_is_reproducible_from_its_seed():
    from benchmarks import slicetrace
    first = slicetrace.make_trace(200, 20, 200 * MiB, 2048 * MiB, seed=7)
    again = slicetrace.make_trace(200, 20, 200 * MiB, 2048 * MiB, seed=7)
    other = slicetrace.make_trace(200, 20, 200 * MiB, 2048 * MiB, seed=8)
    assert first == again
    assert first.sessions != other.sessions and first.sizes != other.sizes


@pytest.mark.parametrize("sessions, files, smallest, largest", [
    (1000, 50, 200 * MiB, 2048 * MiB),      # the trace
    (100, 10, 50 * MiB, 512 * MiB),         # --quick
    (50, 3, 2 * MiB, 2 * MiB),              # files barely larger than a range
])
def test_video_trace_keeps_every_seek_inside_its_file(sessions, files, smallest, largest):
    from benchmarks import slicetrace
    trace = slicetrace.make_trace(sessions, files, smallest, largest, seed=1)
    assert len(trace.sizes) == files and len(trace.sessions) == sessions
    assert all(smallest <= size <= largest for size in trace.sizes)
    for session in trace.sessions:
        assert 2 <= len(session) <= 4
        assert len({seek.file for seek in session}) == 1            # one file per session
        for seek in session:
            size = trace.sizes[seek.file]
            assert 1 * MiB <= seek.length <= 4 * MiB or seek.length == size
            assert 0 <= seek.first and seek.last < size
            assert seek.range_header == f"bytes={seek.first}-{seek.first + seek.length - 1}"
    assert trace.seeks == sum(len(s) for s in trace.sessions)
    assert trace.requested_bytes == sum(seek.length for s in trace.sessions for seek in s)


def test_video_trace_sizes_are_log_uniform():
    from benchmarks import slicetrace
    sizes = slicetrace.file_sizes(20_000, 200 * MiB, 2048 * MiB, seed=3)
    # Log-uniform: half of the files below the geometric mean of the bounds (binomial, 5 sigma).
    below = sum(1 for s in sizes if s < math.sqrt(200 * 2048) * MiB)
    assert abs(below - 10_000) < 5 * math.sqrt(20_000 * 0.25)


@pytest.mark.parametrize("size, length, expected", [
    (2**30, 725 * 1024, (2**30 - 742_400, 2**30 - 1)),
    (256 * MiB, 725 * 1024, (256 * MiB - 742_400, 256 * MiB - 1)),
    (100, 725 * 1024, (0, 99)),                                  # shorter than the range: all of it
])
def test_tail_range(size, length, expected):
    from benchmarks import slicetrace
    assert slicetrace.tail_range(size, length) == expected


@pytest.mark.parametrize("first, last, slice_size, spanned", [
    (0, 0, 4 * MiB, 1),
    (0, 4 * MiB - 1, 4 * MiB, 1),
    (4 * MiB - 1, 4 * MiB, 4 * MiB, 2),
    (2**30 - 742_400, 2**30 - 1, 4 * MiB, 1),                   # the tail range: one slice
    (1, 12 * MiB, 4 * MiB, 4),
])
def test_slices_spanned(first, last, slice_size, spanned):
    from benchmarks import slicetrace
    assert slicetrace.slices_spanned(first, last, slice_size) == spanned


@pytest.mark.parametrize("warm_s, slice_s, cold_s, met", [
    (0.003, 0.005, 0.016, True),            # exactly 2 x (warm + slice)
    (0.003, 0.005, 0.0161, False),
    (0.010, 0.020, 0.5, False),             # the unsliced L1 streaming the whole object first
    (0.0, 0.0, 0.0, True),
])
def test_tail_time_bound(warm_s, slice_s, cold_s, met):
    from benchmarks import slicetrace
    assert (cold_s <= slicetrace.tail_time_limit(warm_s, slice_s)) is met


@pytest.mark.parametrize("origin_bytes, met", [
    (4 * MiB + 742_400, True),              # one slice plus the range
    (4 * MiB + 742_401, False),
    (8 * MiB, False),                       # two slices
    (256 * MiB, False),
])
def test_tail_origin_bound(origin_bytes, met):
    from benchmarks import slicetrace
    assert (origin_bytes <= slicetrace.tail_origin_limit(4 * MiB, 742_400)) is met


def test_metric_total_sums_every_labelled_sample():
    from benchmarks import slicetrace
    text = ("# HELP origin_response_bytes_total Response body bytes sent\n"
            "# TYPE origin_response_bytes_total counter\n"
            "origin_response_bytes_total 1.073741824e+09\n"
            "origin_response_bytes_created 1.7e+09\n"
            'origin_requests_total{method="GET",status="200"} 3.0\n'
            'origin_requests_total{method="GET",status="206"} 4.0\n'
            "origin_requests_totally 99\n")
    assert slicetrace.metric_total(text, "origin_response_bytes_total") == 2**30
    assert slicetrace.metric_total(text, "origin_requests_total") == 7
    assert slicetrace.metric_total(text, "absent_total") == 0


@pytest.mark.parametrize("x_cache, cache_status, hit", [
    ("HIT", None, True),
    ("MISS", "edge; hit", False),            # X-Cache decides when present
    (None, "edge-l1; hit; ttl=10", True),
    (None, "edge-l2; hit, edge-l1; fwd=uri-miss; stored", False),   # the last entry is this node's
    (None, None, False),
    (" hit ", None, True),
])
def test_is_hit(x_cache, cache_status, hit):
    from benchmarks import slicetrace
    assert slicetrace.is_hit(x_cache, cache_status) is hit


@pytest.mark.parametrize("returncode, output, unknown", [
    (0, "sl-origin origin ...", False),
    (2, "sites.vod-sliced.slice_size: unknown key (allowed: aliases, ...)", True),
    (2, "nodes.sl-plain.disk_size: bad size", None),
])
def test_check_says_slicing_unknown(returncode, output, unknown):
    from benchmarks import slicetrace
    assert slicetrace.check_says_slicing_unknown(returncode, output) is unknown


def test_the_slices_topology_renders_with_and_without_slice_size(tmp_path):
    from benchmarks.scenarios import slices
    from edge import config
    sliced = slices.render_topology(tmp_path, slicing=True).read_text()
    assert sliced.count('slice_size = "4MiB"') == 1
    assert sliced.index("[sites.vod-sliced]") < sliced.index("slice_size") < sliced.index("[nodes.")
    topology = config.load(slices.render_topology(tmp_path, slicing=False))
    nodes = {node.name: node for node in topology.nodes}
    assert set(nodes) == {"sl-origin", "sl-plain", "sl-sliced"}
    assert all(str(node.listen).startswith("127.0.73.") for node in nodes.values())
    assert nodes["sl-plain"].disk_size == nodes["sl-sliced"].disk_size == slices.DISK_SIZE


def _slices_result(sliced_cold_s: float, sliced_origin: int, sliced_mbps: tuple[float, float], rss: int):
    from benchmarks import slicetrace
    from benchmarks.scenarios import slices
    def tail(target, cold_s, origin):
        # Three cold objects: the median time and the worst origin bytes are judged.
        return slices.TailResult(target, 2**30 - 742_400, 2**30 - 1,
                                 [slices.RangeGet(206, 742_400, t, "MISS") for t in (0.001, cold_s, 9.0)],
                                 [slices.RangeGet(206, 742_400, 0.003, "HIT")] * 3,
                                 [(4 * MiB, 1), (origin, 1), (0, 0)], True)
    def full(cold, warm, growth):
        return [slices.FullPass("cold", 200, 2**30, cold, growth, 2**30, 1, 0.5),
                slices.FullPass("warm", 200, 2**30, warm, growth, 0, 0, 0.5)]
    trace = slicetrace.make_trace(4, 2, 10 * MiB, 20 * MiB, seed=1)
    return slices.SlicesResult(
        True, 0.005,
        {slices.PLAIN.label: tail(slices.PLAIN, 2.5, 2**30), slices.SLICED.label: tail(slices.SLICED, sliced_cold_s,
                                                                                       sliced_origin)},
        {slices.PLAIN.label: full(400e6, 1800e6, 1 * MiB), slices.SLICED.label: full(*sliced_mbps, rss)},
        {slices.PLAIN.label: slices.TraceResult(slices.PLAIN, 4, 12, 11, 30 * MiB, 0, 1.0, 60 * MiB, 2),
         slices.SLICED.label: slices.TraceResult(slices.SLICED, 4, 12, 8, 30 * MiB, 0, 1.0, 40 * MiB, 12)},
        trace, 8)


@pytest.mark.parametrize("cold_s, origin, mbps, rss, results", [
    (0.016, 4 * MiB + 742_400, (360e6, 1620e6), 63 * MiB, ["met", "met", "met", "met", "met"]),
    (0.017, 4 * MiB + 742_401, (359e6, 1619e6), 64 * MiB, ["below"] * 5),
])
def test_slices_verdicts(cold_s, origin, mbps, rss, results):
    from benchmarks import targets
    from benchmarks.context import QUICK
    from benchmarks.scenarios import slices
    r = _slices_result(cold_s, origin, mbps, rss)
    verdicts = {v.key: targets.result_word(v) for v in slices.verdicts(r)}
    assert list(verdicts) == ["slices-tail-time", "slices-tail-origin", "slices-full-cold", "slices-full-warm",
                              "slices-full-rss"]
    assert list(verdicts.values()) == results
    assert {g.key for g in targets.goals(QUICK) if g.scenario == "slices"} == set(verdicts)
    tables = slices.tables(r, 2**30)
    assert [len(t.rows) for t in tables] == [2, 4, 2]
    assert "0.67" in slices.summary(r)                   # origin bytes, sliced over unsliced
    assert all(row[-1] == "" for row in tables[1].rows)     # no pass had a busy client CPU


def test_a_build_without_slicing_reports_every_sliced_row_as_not_measured():
    from benchmarks import targets
    from benchmarks.scenarios import slices
    r = _slices_result(0.01, 0, (1.0, 1.0), 0)
    r.slicing = False
    for table in (r.tail, r.full, r.trace):
        del table[slices.SLICED.label]
    verdicts = slices.verdicts(r)
    assert len(verdicts) == 5 and all(targets.result_word(v) == "not measured" for v in verdicts)
    assert all(v.note == "this build does not slice (slice_size unknown)" for v in verdicts)
    for table in slices.tables(r, 2**30):
        assert table.rows[-1][1] == "not measured: this build does not slice (slice_size unknown)"
    assert "sliced not measured" in slices.summary(r)


def test_slices_is_a_scenario_and_its_objects_carry_validators():
    from benchmarks import run
    from benchmarks.scenarios import slices
    assert run.SCENARIOS[-1] == "slices"
    # A sliced L1 stores slices only of responses with a strong ETag or Last-Modified.
    assert slices.gen_path("/gen/a", 10) == "/gen/a?size=10&cc=max-age=86400&etag=1&lm=1"


def test_a_full_get_with_a_busy_client_cpu_says_so():
    from benchmarks.scenarios import slices
    r = _slices_result(0.01, 0, (360e6, 1620e6), 0)
    r.full[slices.SLICED.label][1] = slices.FullPass("warm", 200, 2**30, 1620e6, 0, 0, 0, 0.97)
    warm = next(v for v in slices.verdicts(r) if v.key == "slices-full-warm")
    assert warm.met and warm.note.endswith(f"client CPU over 90% during: {slices.SLICED.label}")
    rows = slices.tables(r, 2**30)[1].rows
    assert [row[-1] for row in rows] == ["", "", "", "client CPU busy: MB/s a lower bound"]
