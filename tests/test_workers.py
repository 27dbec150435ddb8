"""A cache node of two worker processes: real processes, real sockets, on 127.0.104.x.

The node's main process supervises the workers; they share the listen
address (SO_REUSEPORT) and the disk cache (one LMDB index).  Which worker a
connection lands on is the kernel's choice (a hash of the connection's
addresses), so the tests open new connections until the per-worker request
counts on the node's one admin port show that each worker answered.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster import ADMIN_PORT, TRAFFIC_PORT, NodeProcess, alive, kill_processes_naming

NET = "127.0.104"
ORIGIN = f"{NET}.10"
EDGE = f"{NET}.31"
URL_PATH = "/gen/shared?size=2048&cc=max-age=600"


def topology(tmp_path: Path, extra: str = "", hosts: str = '"www.example.com"', memory: str = "16MiB",
             disk: str = "64MiB") -> str:
    return f'''state_dir = "{tmp_path / 'state'}"
[sites.example]
hosts = [{hosts}]
origin = "http://{ORIGIN}:{TRAFFIC_PORT}"
[nodes.origin]
role = "origin"
listen = "{ORIGIN}:{TRAFFIC_PORT}"
admin = "{ORIGIN}:{ADMIN_PORT}"
[nodes.edge]
role = "l1"
listen = "{EDGE}:{TRAFFIC_PORT}"
admin = "{EDGE}:{ADMIN_PORT}"
workers = 2
access_log = "off"
memory_size = "{memory}"
disk_size = "{disk}"
{extra}
'''


@pytest.fixture
def node(tmp_path):
    """Start the origin and the two-worker edge; stop both (and anything they left) after."""
    config = tmp_path / "topology.toml"
    started: list[NodeProcess] = []

    def start(**settings: str) -> tuple[NodeProcess, NodeProcess]:
        config.write_text(topology(tmp_path, **settings))
        origin = NodeProcess("origin", config, f"{ORIGIN}:{ADMIN_PORT}", f"{ORIGIN}:{TRAFFIC_PORT}").start()
        started.append(origin)
        edge = NodeProcess("edge", config, f"{EDGE}:{ADMIN_PORT}", f"{EDGE}:{TRAFFIC_PORT}", workers=None).start()
        started.append(edge)
        return origin, edge

    yield start
    for process in reversed(started):
        process.stop()
    kill_processes_naming(str(config))       # by PID, only what carries our topology path


def get(path: str = URL_PATH, host: str = "www.example.com") -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection (so the kernel picks a worker each time)."""
    request = urllib.request.Request(f"http://{EDGE}:{TRAFFIC_PORT}{path}", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def admin(path: str, method: str = "GET") -> dict:
    request = urllib.request.Request(f"http://{EDGE}:{ADMIN_PORT}{path}", method=method,
                                     headers={"Authorization": "Bearer test-token"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
    return total


def origin_requests(origin: NodeProcess) -> float:
    return metric(origin.metrics(), "origin_requests_total")


def per_worker(edge: NodeProcess) -> dict[str, float]:
    text = edge.metrics()
    return {w: metric(text, "edge_worker_requests_total", worker=w) for w in ("0", "1")}


def until_both_answered(edge: NodeProcess, path: str = URL_PATH, limit: int = 200,
                        host: str = "www.example.com") -> list[str]:
    """Requests on new connections until both workers have answered one since now (each must
    be a 200); their X-Cache."""
    before = per_worker(edge)
    seen = []
    for _ in range(limit):
        status, headers, _ = get(path, host)
        assert status == 200
        seen.append(headers.get("X-Cache", ""))
        now = per_worker(edge)
        if all(now[w] > before[w] for w in now):
            return seen
    raise AssertionError(f"one worker got no connection in {limit} tries: {per_worker(edge)}")


def fetch_and_store(edge: NodeProcess) -> None:
    """The first request (a miss), then until its disk copy has landed: the disk tier is
    written behind the response, and the other worker looks there."""
    status, headers, body = get()
    assert status == 200 and headers["X-Cache"] == "MISS" and len(body) == 2048
    wait_for(lambda: metric(edge.metrics(), "edge_cache_objects", tier="disk") == 1, "the object on disk")


def worker_pids(edge: NodeProcess) -> dict[int, int]:
    return {w["worker"]: w["pid"] for w in admin("/status")["workers"]}


def wait_for(predicate, what: str, deadline: float = 15.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {deadline}s: {what}")


def test_two_workers_share_the_listen_address_and_the_disk_cache(node):
    origin, edge = node()
    pids = worker_pids(edge)
    assert len(set(pids.values())) == 2 and edge.pid not in pids.values()
    fetch_and_store(edge)
    # Every later request, whichever worker takes it, is a hit: the other worker finds the
    # object in the shared disk cache and the origin is asked once.
    assert set(until_both_answered(edge)) == {"HIT"}
    assert origin_requests(origin) == 1
    text = edge.metrics()           # the node's one admin port speaks for both workers
    assert metric(text, "edge_cache_objects", tier="disk") == 1         # one disk cache
    assert metric(text, "edge_cache_objects", tier="memory") == 2       # a memory tier each
    assert metric(text, "edge_requests_total", cache_status="MISS") == 1
    assert {w: metric(text, "process_cpu_seconds_total", worker=w) > 0 for w in ("main", "0", "1")} == \
        {"main": True, "0": True, "1": True}
    assert metric(text, "edge_workers") == 2
    status = admin("/status")
    assert [t for t in status["tiers"] if t["tier"] == "disk"][0]["objects"] == 1
    assert admin("/healthz")["workers_serving"] == 2


def test_a_worker_killed_with_sigkill_is_restarted_and_requests_keep_succeeding(node):
    origin, edge = node()
    fetch_and_store(edge)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                status, _, _ = get()
                if status != 200:
                    failures.append(f"status {status}")
                answered[0] += 1
            except OSError as exc:
                failures.append(repr(exc))

    client = threading.Thread(target=load)
    client.start()
    try:
        wait_for(lambda: answered[0] > 20, "load running")
        victim = worker_pids(edge)[0]
        os.kill(victim, signal.SIGKILL)
        restarted = wait_for(lambda: (lambda p: p if p[0] not in (victim, None) else None)(worker_pids(edge)),
                             "worker 0 running again")
        wait_for(lambda: alive(restarted[0]) and admin("/healthz")["workers_serving"] == 2, "both serving")
        mark = answered[0]
        wait_for(lambda: answered[0] > mark + 20, "load after the restart")
    finally:
        stop.set()
        client.join(timeout=30)
    # One client, one request at a time: at most the one in flight when the worker died fails.
    assert len(failures) <= 1, failures
    assert admin("/status")["workers"][0]["restarts"] == 1
    assert metric(edge.metrics(), "edge_worker_restarts_total") == 1
    assert set(until_both_answered(edge)) == {"HIT"}       # the new worker serves, from the shared disk
    assert origin_requests(origin) == 1


def test_sigterm_stops_every_worker_and_a_killed_main_process_takes_its_workers_along(node):
    _, edge = node()
    pids = list(worker_pids(edge).values())
    edge.proc.send_signal(signal.SIGTERM)
    assert edge.proc.wait(timeout=30) == 0
    edge.proc = None
    wait_for(lambda: not any(alive(p) for p in pids), "every worker gone after SIGTERM", 5)
    # However the main process dies, its workers do not outlive it.
    edge.start()
    pids = list(worker_pids(edge).values())
    edge.kill()
    wait_for(lambda: not any(alive(p) for p in pids), "every worker gone after the main process's SIGKILL", 15)


def test_sighup_reaches_every_worker_and_a_bad_file_is_refused_once(node, tmp_path):
    _, edge = node()
    config = tmp_path / "topology.toml"
    assert get(host="static.example.com")[0] == 421          # not a host of the site yet
    config.write_text(topology(tmp_path, hosts='"www.example.com", "static.example.com"'))
    before = admin("/healthz")["config_sha256"]
    edge.proc.send_signal(signal.SIGHUP)
    # The node reports the new file only once every worker runs it.
    wait_for(lambda: admin("/healthz").get("config_sha256") not in (None, before), "workers reloaded")
    until_both_answered(edge, host="static.example.com")     # 200s from both workers
    good = admin("/healthz")["config_sha256"]
    config.write_text(topology(tmp_path, extra="workers_typo = 1"))
    edge.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in edge.log.read_text(), "the refusal logged")
    time.sleep(0.5)                 # would a worker have logged one too?
    refusals = [line for line in edge.log.read_text().splitlines() if "reload refused" in line]
    assert len(refusals) == 1 and "edge.reload ERROR" in refusals[0] and "workers_typo" in refusals[0]
    assert admin("/healthz")["config_sha256"] == good
    assert admin("/status")["config"]["last_reload_error"]


def test_purge_through_the_admin_api_purges_in_every_worker(node):
    origin, edge = node()
    fetch_and_store(edge)
    until_both_answered(edge)               # both workers hold it in memory now
    assert metric(edge.metrics(), "edge_cache_objects", tier="memory") == 2
    result = admin(f"/purge?url=http://www.example.com{URL_PATH.replace('&', '%26')}", method="POST")
    assert result["workers"] == 2 and result["removed"] >= 2
    text = edge.metrics()
    assert metric(text, "edge_cache_objects", tier="memory") == 0
    assert metric(text, "edge_cache_objects", tier="disk") == 0
    assert metric(text, "edge_purges_total") == 2          # each worker took the purge
    assert get()[1]["X-Cache"] == "MISS" and origin_requests(origin) == 2


def test_the_disk_byte_limit_holds_for_the_node_across_workers(node, tmp_path):
    origin, edge = node(memory="64KiB", disk="256KiB")        # memory holds few: the disk does the work
    for i in range(40):                    # 40 x 20 KiB through both workers, over 3 x the limit
        status, _, body = get(f"/gen/fill-{i}?size=20480&cc=max-age=600")
        assert status == 200 and len(body) == 20480
    assert set(per_worker(edge).values()) != {0.0} and 0.0 not in per_worker(edge).values()
    metrics = edge.metrics()
    limit = 256 * 1024
    assert 0 < metric(metrics, "edge_cache_bytes", tier="disk") <= limit
    assert metric(metrics, "edge_cache_evictions_total", tier="disk") >= 20
    cache = tmp_path / "state" / "cache" / "edge"
    on_disk = sum(p.stat().st_size for p in cache.glob("??/*") if p.suffix in (".meta", ".body"))
    assert on_disk <= limit
