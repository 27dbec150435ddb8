"""Reload with real processes on 127.0.94.0/23: `edge up` under load, one `edge run` node, `--watch`.

Nothing is mocked: `python -m edge up` and `python -m edge run` processes,
aiohttp and raw-socket HTTP clients, dnspython over UDP.  Every process is
stopped by PID (the launcher's own stop, then a kill of anything naming the
test's topology file).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest

from tests.cluster import REPO, Cluster, alive, kill_processes_naming, processes_naming

START_DEADLINE = 45.0
RELOAD_DEADLINE = 60.0
LOAD_SECONDS_MAX = 60.0        # the load stops by itself after this, or after LOAD_REQUESTS_MAX
LOAD_REQUESTS_MAX = 50_000
READY_LINE = re.compile(r"^edge up: (\d+) nodes up;")
STARTED_LINE = re.compile(r"^started (\S+) pid (\d+)$")
WWW, NEWS = "www.example.com", "news.example.com"
EAST_CLIENT = "127.0.95.7"     # in the coverage block the reload moves from east to west


# --------------------------------------------------------------------------- topology


def node(name: str, role: str, ip: str, *extra: str) -> str:
    return "\n".join([f"[nodes.{name}]", f'role = "{role}"', f'listen = "{ip}:8080"', f'admin = "{ip}:8091"',
                      *extra]) + "\n"


CACHE = ('memory_size = "16MiB"', 'disk_size = "64MiB"')
L1 = (*CACHE, "parent_probe_interval = 0.2", "parent_fall = 2")


def cdn_topology(state: Path, *, v2: bool) -> str:
    """v1: origin, l2-a, l1-1 (east), l1-2 (west), the scheduler; 127.0.95.0/24 is east.

    v2 adds the site news.example.com and the L2 l2-b, takes l2-a away from
    l1-2 (l1-1 keeps "all": both), moves 127.0.95.0/24 to the west, and
    lowers l1-1's max_inflight.
    """
    text = f'state_dir = "{state}"\n'
    text += '[sites.example]\nhosts = ["www.example.com"]\norigin = "http://127.0.94.10:8080"\n'
    if v2:
        text += '[sites.news]\nhosts = ["news.example.com"]\norigin = "http://127.0.94.10:8080"\n'
    text += "[regions.east]\nlat = 40.71\nlon = -74.01\n[regions.west]\nlat = 37.77\nlon = -122.42\n"
    text += f'[coverage]\n"127.0.95.0/24" = "{"west" if v2 else "east"}"\n'
    text += node("origin", "origin", "127.0.94.10")
    text += node("l2-a", "l2", "127.0.94.21", *CACHE)
    if v2:
        text += node("l2-b", "l2", "127.0.94.22", *CACHE)
    text += node("l1-1", "l1", "127.0.94.31", *L1, 'region = "east"', f"max_inflight = {500 if v2 else 1000}")
    text += node("l1-2", "l1", "127.0.94.32", *L1, 'region = "west"',
                 'parents = ["l2-b"]' if v2 else 'parents = "all"')
    text += ('[dns]\nlisten = "127.0.94.5:8053"\nadmin = "127.0.94.5:8091"\nzones = ["example.com"]\n'
             'cdn_zone = "cdn.example.net"\n[dns.health]\ninterval = 0.5\ntimeout = 0.5\n')
    return text


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- edge up


class Up:
    """`python -m edge up --config FILE [--watch]`, its stderr in a file."""

    def __init__(self, process: asyncio.subprocess.Process, topology: Path, stderr: Path):
        self.process, self.topology, self.stderr_path = process, topology, stderr
        self.stdout: list[str] = []
        self._reader: asyncio.Task | None = None

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def ready(self) -> None:
        async with asyncio.timeout(START_DEADLINE):
            while True:
                raw = await self.process.stdout.readline()
                if not raw:
                    raise AssertionError(f"edge up exited before its table:\n{self.stderr}")
                self.stdout.append(raw.decode().rstrip("\n"))
                if READY_LINE.match(self.stdout[-1]):
                    break
        self._reader = asyncio.create_task(self._read_rest())

    async def _read_rest(self) -> None:
        while raw := await self.process.stdout.readline():
            self.stdout.append(raw.decode().rstrip("\n"))

    def pids(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2)) for m in map(STARTED_LINE.match, self.stdout) if m}

    async def wait_for(self, text: str, after: int = 0) -> str:
        """Wait until stderr, from character `after` on, holds `text`; that part of stderr."""
        async with asyncio.timeout(RELOAD_DEADLINE):
            while text not in (seen := self.stderr[after:]):
                if self.process.returncode is not None:
                    raise AssertionError(f"edge up exited; stderr:\n{self.stderr}")
                await asyncio.sleep(0.05)
        return seen

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            code = await self.process.wait()
            if self._reader is not None:
                await self._reader
        return code


@pytest.fixture
async def edge_up():
    runs: list[Up] = []

    async def start(topology: Path, *options: str) -> Up:
        stderr = topology.parent / f"edge-up-{len(runs)}.stderr"
        with stderr.open("wb") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge", "up", "--config", str(topology), *options,
                stdout=asyncio.subprocess.PIPE, stderr=err, cwd=REPO,
                env={**os.environ, "EDGE_UP_TIMEOUT": "30"})
        run = Up(process, topology, stderr)
        runs.append(run)
        await run.ready()
        return run

    yield start

    for run in runs:
        if run.process.returncode is None:
            run.process.kill()
            await run.process.wait()
        kill_processes_naming(str(run.topology))


# --------------------------------------------------------------------------- clients


async def get_json(http: aiohttp.ClientSession, url: str) -> dict:
    async with http.get(url) as response:
        return json.loads(await response.text())


async def fetch(http: aiohttp.ClientSession, l1: str, path: str, host: str = WWW) -> tuple[int, dict, bytes]:
    async with http.get(f"http://{l1}:8080{path}", headers={"Host": host}) as response:
        return response.status, dict(response.headers), await response.read()


async def ask(name: str, source: str = EAST_CLIENT) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, "127.0.94.5", port=8053, source=source, timeout=2)


def addresses(reply: dns.message.Message) -> list[str]:
    return [r.address for rrset in reply.answer if rrset.rdtype == dns.rdatatype.A for r in rrset]


@dataclass
class Load:
    """Steady HTTP and DNS load until stopped (bounded in count and time); every failure kept."""

    http_ok: int = 0
    dns_ok: int = 0
    failures: list[str] = field(default_factory=list)
    last_ok_at: float = 0.0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    def running(self, started: float) -> bool:
        return (not self.stop.is_set() and self.http_ok + len(self.failures) < LOAD_REQUESTS_MAX
                and time.monotonic() - started < LOAD_SECONDS_MAX)

    async def http_worker(self, http: aiohttp.ClientSession, l1: str, worker: int) -> None:
        started, i = time.monotonic(), 0
        while self.running(started):
            i += 1
            # Hits of a few hot objects, and misses that go through the parents' ring.
            path = (f"/gen/hot-{i % 8}?size=2000&cc=max-age=300" if i % 3 else
                    f"/gen/miss-{worker}-{uuid.uuid4().hex[:10]}?size=1500&cc=max-age=60")
            try:
                status, _, body = await fetch(http, l1, path)
                if status == 200 and len(body) == (2000 if i % 3 else 1500):
                    self.http_ok += 1
                    self.last_ok_at = time.monotonic()
                else:
                    self.failures.append(f"{l1}{path}: {status}, {len(body)} bytes")
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self.failures.append(f"{l1}{path}: {exc!r}")

    async def dns_worker(self) -> None:
        started = time.monotonic()
        while self.running(started):
            try:
                reply = await ask(WWW)
                if reply.rcode() == dns.rcode.NOERROR and addresses(reply):
                    self.dns_ok += 1
                else:
                    self.failures.append(f"dns: {dns.rcode.to_text(reply.rcode())} {addresses(reply)}")
            except Exception as exc:              # a timeout is a failure like any other
                self.failures.append(f"dns: {exc!r}")
            await asyncio.sleep(0.01)


async def raw_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, dict]:
    """One keep-alive request on an open connection; the status and the fields."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {WWW}\r\n\r\n".encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:] if line)}
    await reader.readexactly(int(fields["content-length"]))
    return int(head[0].split()[1]), fields


# --------------------------------------------------------------------------- the test


async def test_reload_under_load_adds_a_site_and_an_l2_moves_a_parent_and_coverage(tmp_path: Path,
                                                                                    edge_up) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text(cdn_topology(tmp_path / "state", v2=False))
    up = await edge_up(topology)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        # Before: no news site anywhere, the east client is sent east, l1-2 has l2-a.
        assert (await fetch(http, "127.0.94.31", "/gen/x?size=10", NEWS))[0] == 421
        assert (await ask(NEWS)).rcode() == dns.rcode.NXDOMAIN
        assert addresses(await ask(WWW))[0] == "127.0.94.31"
        status_2 = await get_json(http, "http://127.0.94.32:8091/status")
        assert set(status_2["parents"]) == {"l2-a"} and status_2["config"]["generation"] == 1
        # A cached object and an open keep-alive connection, to find again after the reload.
        hot = "/gen/kept?size=3000&cc=max-age=300"
        assert (await fetch(http, "127.0.94.31", hot))[1]["X-Cache"] == "MISS"
        reader, writer = await asyncio.open_connection("127.0.94.31", 8080)
        assert (await raw_get(reader, writer, hot))[1]["x-cache"] == "HIT"

        load = Load()
        workers = [asyncio.create_task(load.http_worker(http, l1, w))
                   for w, l1 in enumerate(["127.0.94.31", "127.0.94.32"] * 3)]
        workers.append(asyncio.create_task(load.dns_worker()))
        try:
            async with asyncio.timeout(20):
                while load.http_ok < 200 or load.dns_ok < 20:
                    await asyncio.sleep(0.05)
            before = (load.http_ok, load.dns_ok)
            mark = len(up.stderr)
            topology.write_text(cdn_topology(tmp_path / "state", v2=True))
            up.process.send_signal(signal.SIGHUP)
            log = await up.wait_for("edge up: reloaded", after=mark)
            reloaded_at = time.monotonic()
            async with asyncio.timeout(20):     # the load goes on across and after the reload
                while load.last_ok_at < reloaded_at + 1.0 or load.dns_ok < before[1] + 20:
                    await asyncio.sleep(0.05)
        finally:
            load.stop.set()
            await asyncio.gather(*workers)
        assert load.failures == [], load.failures[:20]
        assert load.http_ok > before[0] + 100, (before, load.http_ok)
        assert "start l2-b" in log and "did not follow" not in log and "refused" not in log, log

        # Every node runs the new file (l2-b, started by the reload, read it at start).
        sha = sha256_of(topology)
        pids = up.pids()
        assert "l2-b" in pids and alive(pids["l2-b"])
        for admin in ("127.0.94.10", "127.0.94.21", "127.0.94.22", "127.0.94.31", "127.0.94.32", "127.0.94.5"):
            assert (await get_json(http, f"http://{admin}:8091/healthz"))["config_sha256"] == sha, admin
        status_1 = await get_json(http, "http://127.0.94.31:8091/status")
        status_2 = await get_json(http, "http://127.0.94.32:8091/status")
        for status in (status_1, status_2):
            assert status["config"]["generation"] == 2 and status["config"]["last_reload_error"] is None
            assert status["sites"] == {"example": [WWW], "news": [NEWS]}
        assert set(status_1["parents"]) == {"l2-a", "l2-b"}          # "all" took the new L2
        assert set(status_2["parents"]) == {"l2-b"}                  # l2-a is no longer l1-2's parent
        assert status_1["max_inflight"] == 500
        assert "edge_config_last_reload_successful 1.0" in await (await http.get(
            "http://127.0.94.31:8091/metrics")).text()

        # Each change in the answers: the new site is served and named, misses of l1-2 go
        # through l2-b only, the east client's block is in the west now.
        for l1 in ("127.0.94.31", "127.0.94.32"):
            assert (await fetch(http, l1, "/gen/news?size=10", NEWS))[0] == 200
        for i in range(4):
            status, headers, _ = await fetch(http, "127.0.94.32", f"/gen/after-{i}-{uuid.uuid4().hex}?size=10")
            assert status == 200 and "l2-b" in headers["Via"] and "l2-a" not in headers["Via"], headers
        news = await ask(NEWS)
        assert news.rcode() == dns.rcode.NOERROR and addresses(news), news
        assert addresses(await ask(WWW)) == ["127.0.94.32", "127.0.94.31"]
        scheduler = await get_json(http, "http://127.0.94.5:8091/status")
        assert scheduler["coverage"] == {"127.0.95.0/24": "west"} and scheduler["config"]["generation"] == 2

        # Kept: the connection opened before the reload, and the cache.
        status, fields = await raw_get(reader, writer, hot)
        assert (status, fields["x-cache"], fields["x-origin-hits"]) == (200, "HIT", "1")
        writer.close()

    assert await up.stop() == 0, up.stderr
    assert "edge up: all 6 nodes stopped" in up.stderr
    assert processes_naming(str(topology)) == []


# --------------------------------------------------------------------------- one node: refusals, log reopening


async def wait_until(check, what: str, deadline: float = 15.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        result = await check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {deadline}s: {what}")


async def test_a_node_refuses_a_bad_reload_and_keeps_serving_and_reopens_its_log(tmp_path: Path) -> None:
    cluster = Cluster.create(tmp_path, "95", l1=1, extra_node='access_log = "logs/l1.log"')
    good = cluster.config.read_text()
    try:
        cluster.start("origin", "l1-1")
        l1 = cluster.node("l1-1")
        admin = f"http://{l1.admin}"
        log_file = tmp_path / "logs" / "l1.log"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async def status() -> dict:
                return await get_json(http, f"{admin}/status")

            async def request(path: str) -> int:
                async with http.get(cluster.url("l1-1", path), headers={"Host": WWW}) as response:
                    await response.read()
                    return response.status

            async def reload_and_wait(generation: int) -> dict:
                os.kill(l1.pid, signal.SIGHUP)
                return await wait_until(lambda: _at_generation(status, generation), f"generation {generation}")

            assert await request("/gen/before?size=10") == 200
            await wait_until(lambda: _contains(log_file, "/gen/before"), "the access log line")

            # logrotate: move the file away, reload, and the node writes a new one.
            log_file.rename(tmp_path / "logs" / "l1.log.1")
            assert (await reload_and_wait(2))["config"]["last_reload_error"] is None
            assert await request("/gen/after?size=10") == 200
            await wait_until(lambda: _contains(log_file, "/gen/after"), "a line in the reopened log")
            assert "/gen/after" not in (tmp_path / "logs" / "l1.log.1").read_text()

            # A file that does not validate, then one that moves the node's own address: refused, named.
            for text, logged in [
                (good.replace('role = "l1"', 'role = "l3"'),
                 f"config error: {cluster.config}: nodes.l1-1.role: expected one of origin, l2, l1, got 'l3'"),
                (good.replace("127.0.95.31:8080", "127.0.95.39:8080"),
                 f"config error: {cluster.config}: nodes.l1-1.listen: changed from 127.0.95.31:8080 to "
                 "127.0.95.39:8080; a running process cannot take that: restart it"),
            ]:
                cluster.config.write_text(text)
                os.kill(l1.pid, signal.SIGHUP)
                line = await wait_until(lambda: _line_with(l1.log, logged), f"the refusal {logged!r}")
                assert "reload refused (still running generation 2, sha256 " in line, line
                state = await status()
                assert state["config"]["generation"] == 2 and logged.removeprefix("config error: ") in \
                    state["config"]["last_reload_error"]
                assert "edge_config_last_reload_successful 0.0" in await (await http.get(f"{admin}/metrics")).text()
                assert await request(f"/gen/still-{uuid.uuid4().hex}?size=10") == 200

            cluster.config.write_text(good)
            state = await reload_and_wait(3)
            assert state["config"]["last_reload_error"] is None
            assert state["config"]["sha256"] == sha256_of(cluster.config)
    finally:
        cluster.stop_all()


async def _at_generation(status, generation: int) -> dict | None:
    state = await status()
    return state if state["config"]["generation"] >= generation else None


async def _contains(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text()


async def _line_with(path: Path, text: str) -> str | None:
    return next((line for line in path.read_text().splitlines() if text in line), None)


# --------------------------------------------------------------------------- edge up --watch: stop, restart, refuse


def small_topology(state: Path, *, with_l2_b: bool, l1_admin: str) -> str:
    text = (f'state_dir = "{state}"\n[sites.example]\nhosts = ["www.example.com"]\n'
            'origin = "http://127.0.94.110:8080"\n')
    text += node("origin", "origin", "127.0.94.110")
    text += node("l2-a", "l2", "127.0.94.121", *CACHE)
    if with_l2_b:
        text += node("l2-b", "l2", "127.0.94.122", *CACHE)
    return text + node("l1", "l1", "127.0.94.131", *L1).replace("127.0.94.131:8091", l1_admin)


async def test_watch_reloads_a_changed_file_stops_removed_nodes_and_restarts_moved_ones(
        tmp_path: Path, edge_up) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text(small_topology(tmp_path / "state", with_l2_b=True, l1_admin="127.0.94.131:8091"))
    up = await edge_up(topology, "--watch")
    first = up.pids()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        assert set((await get_json(http, "http://127.0.94.131:8091/status"))["parents"]) == {"l2-a", "l2-b"}

        # No signal: the file changes.  l2-b goes, and l1's admin address moves (a restart).
        mark = len(up.stderr)
        topology.write_text(small_topology(tmp_path / "state", with_l2_b=False, l1_admin="127.0.94.132:8091"))
        log = await up.wait_for("edge up: reloaded", after=mark)
        assert f"{topology} changed: reloading" in log      # the watcher, not a signal
        assert f"edge up: stopped l2-b pid {first['l2-b']} (exited with code 0; removed from the topology)" in log
        assert f"edge up: stopped l1 pid {first['l1']} (exited with code 0; restarting: " in log
        assert not alive(first["l2-b"]) and not alive(first["l1"])
        running = {name: pid for name, pid in up.pids().items() if name != "l2-b"}
        assert running["l1"] != first["l1"] and running["origin"] == first["origin"]
        assert all(alive(pid) for pid in running.values())
        assert "!!!" not in up.stderr                 # stopping them was no surprise
        state = await get_json(http, "http://127.0.94.132:8091/status")
        assert set(state["parents"]) == {"l2-a"} and state["config"]["sha256"] == sha256_of(topology)
        status, _, _ = await fetch(http, "127.0.94.131", "/gen/w?size=10")
        assert status == 200

        # A bad file is refused by the launcher: nothing is signalled, stopped or started.
        mark = len(up.stderr)
        topology.write_text(topology.read_text().replace('role = "l2"', 'role = "l9"'))
        log = await up.wait_for("edge up: reload refused", after=mark)
        assert f"config error: {topology}: nodes.l2-a.role: expected one of origin, l2, l1, got 'l9'" in log
        assert {name: pid for name, pid in up.pids().items() if name != "l2-b"} == running
        assert all(alive(pid) for pid in running.values())
        healthz = await get_json(http, "http://127.0.94.121:8091/healthz")
        assert healthz["status"] == "ok" and healthz["config_sha256"] == state["config"]["sha256"]

    # A stop in the middle of a reload (l2-b is being started again) still stops everything, at once.
    mark = len(up.stderr)
    topology.write_text(small_topology(tmp_path / "state", with_l2_b=True, l1_admin="127.0.94.132:8091"))
    up.process.send_signal(signal.SIGHUP)
    await up.wait_for("edge up: reloading", after=mark)
    stopped_at = time.monotonic()
    assert await up.stop() == 0, up.stderr
    assert time.monotonic() - stopped_at < 15, up.stderr[mark:]
    assert "nodes stopped" in up.stderr[mark:] and "!!!" not in up.stderr
    assert processes_naming(str(topology)) == []


async def test_edge_run_watch_reloads_the_node_when_its_file_changes(tmp_path: Path) -> None:
    topology = tmp_path / "topology.toml"
    topology.write_text('[sites.example]\nhosts = ["www.example.com"]\norigin = "http://127.0.94.150:8080"\n'
                        + node("origin", "origin", "127.0.94.150"))
    log = tmp_path / "origin.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge", "run", "origin", "--config", str(topology), "--watch",
            stdout=out, stderr=out, cwd=REPO)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            async def running_sha() -> str | None:
                try:
                    return (await get_json(http, "http://127.0.94.150:8091/healthz"))["config_sha256"]
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    return None

            first = await wait_until(running_sha, "the origin up", START_DEADLINE)
            assert first == sha256_of(topology)
            topology.write_text(topology.read_text() + '[sites.news]\nhosts = ["news.example.com"]\n'
                                'origin = "http://127.0.94.150:8080"\n')
            changed = sha256_of(topology)
            await wait_until(lambda: _is(running_sha, changed), "the watcher's reload")
        assert f"{topology} changed: reloading" in log.read_text()
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            async with asyncio.timeout(20):
                await process.wait()
    assert process.returncode == 0, log.read_text()


async def _is(get, expected) -> bool:
    return await get() == expected
