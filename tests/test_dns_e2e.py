"""End to end: `edge up` on the default topology, then dig and curl as a user would.

This is the "done" check of the DNS scheduler: the whole CDN of the built-in
topology runs as real processes, `dig -b` makes the client appear in a
region, and `curl --resolve` fetches through the edge the answer names.  The
topology is deploy/local.toml with two changes: the state directory is a
temporary one, and every node's address is moved from the default's
(origin 127.0.0.10, L2s 127.0.2.x, L1s 127.0.1.x, scheduler 127.0.5.1) to
127.0.96.x, so the suite runs beside an operator's `edge up` of the default
topology (and vice versa).  The client addresses (127.0.11.1, 127.0.12.1)
stay: they are only sources, matched by the default coverage blocks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge import config
from tests.cluster import moved_local_topology

REPO = Path(__file__).resolve().parent.parent
DIG = shutil.which("dig") or "/usr/bin/dig"
CURL = shutil.which("curl") or "/usr/bin/curl"
# Every listening address of deploy/local.toml, and where this module runs it instead.
MOVED = {"127.0.0.10": "127.0.96.10", "127.0.2.1": "127.0.96.21", "127.0.2.2": "127.0.96.22",
         "127.0.1.1": "127.0.96.31", "127.0.1.2": "127.0.96.32", "127.0.5.1": "127.0.96.5"}
LOCAL_TOML = moved_local_topology(MOVED)
DEFAULT = config.parse(LOCAL_TOML, "local.toml (moved)", REPO)
DNS = DEFAULT.dns
assert DNS is not None
EAST_CLIENT, WEST_CLIENT = "127.0.11.1", "127.0.12.1"
EAST_EDGE, WEST_EDGE = DEFAULT.node("l1-east").listen.host, DEFAULT.node("l1-west").listen.host
CDN = "www.example.com.cdn.example.net."
START_DEADLINE = 90.0


def until(check: Callable[[], bool], deadline: float, what: str) -> float:
    """Poll `check` until it holds; return the seconds it took, fail after `deadline`."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if check():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {deadline}s: {what}")


def dig(*args: str) -> str:
    done = subprocess.run([DIG, f"@{DNS.listen.host}", "-p", str(DNS.listen.port), "+time=2", "+tries=1", *args],
                          capture_output=True, text=True, timeout=15)
    return done.stdout + done.stderr


def dig_addresses(source: str, *args: str) -> list[str]:
    """The A records `dig -b source` gets for www.example.com, in order ([] if no CNAME answer)."""
    out = dig("-b", source, "+short", *args, "www.example.com").split()
    return out[1:] if out[:1] == [CDN] else []


def curl(address: str, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET http://www.example.com:8080<path> through `address`, as a browser the DNS sent there."""
    port = DEFAULT.node("l1-east").listen.port
    done = subprocess.run([CURL, "-sS", "-D", "-", "--max-time", "10",
                           "--resolve", f"www.example.com:{port}:{address}",
                           f"http://www.example.com:{port}{path}"], capture_output=True, timeout=20)
    assert done.returncode == 0, done.stderr.decode()
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in header_lines)}
    return int(status_line.split()[1]), headers, body


def healthy(admin: config.Address) -> bool:
    try:
        with urllib.request.urlopen(f"http://{admin}/healthz", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def gone(pid: int) -> bool:
    """True once `pid` has exited (a zombie not yet reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def stop(pid: int, deadline: float = 20.0) -> None:
    """SIGTERM one process we started (directly or through `edge up`), SIGKILL if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
        until(lambda: gone(pid), deadline, f"pid {pid} to exit")
    except ProcessLookupError:
        return
    except AssertionError:
        os.kill(pid, signal.SIGKILL)


@dataclass
class Up:
    topology: Path
    launcher: subprocess.Popen
    output: Path
    pids: dict[str, int] = field(default_factory=dict)
    extra: list[subprocess.Popen] = field(default_factory=list)   # nodes we restarted by hand

    def run_node(self, name: str) -> subprocess.Popen:
        log = open(self.output.parent / f"{name}.log", "ab")
        proc = subprocess.Popen([sys.executable, "-m", "edge", "run", name, "--config", str(self.topology),
                                 "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=dict(os.environ, PYTHONPATH=str(REPO)))
        log.close()
        self.extra.append(proc)
        return proc


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    workdir = tmp_path_factory.mktemp("dns-e2e")
    text, count = re.subn(r'^state_dir = "var"$', f'state_dir = "{workdir / "var"}"', LOCAL_TOML, flags=re.M)
    assert count == 1, "deploy/local.toml no longer has state_dir = \"var\""
    topology = workdir / "local.toml"
    topology.write_text(text)
    output = workdir / "edge-up.log"
    with open(output, "wb") as sink:
        launcher = subprocess.Popen([sys.executable, "-m", "edge", "up", "--config", str(topology)],
                                    stdout=sink, stderr=subprocess.STDOUT, cwd=REPO,
                                    env=dict(os.environ, PYTHONPATH=str(REPO), EDGE_UP_TIMEOUT="60"))
    cluster = Up(topology, launcher, output)
    try:
        def ready() -> bool:
            if launcher.poll() is not None:
                raise AssertionError(f"edge up exited with {launcher.returncode}:\n{output.read_text()}")
            return "nodes up;" in output.read_text()
        until(ready, START_DEADLINE, "edge up to report every node up")
        cluster.pids = {m[1]: int(m[2]) for m in re.finditer(r"^started (\S+) pid (\d+)$",
                                                            output.read_text(), re.M)}
        assert set(cluster.pids) == {"origin", "l2-a", "l2-b", "l1-east", "l1-west", "dns"}
        yield cluster
    finally:
        for proc in cluster.extra:
            stop(proc.pid)
            proc.wait(timeout=10)
        stop(launcher.pid, deadline=40)
        launcher.wait(timeout=10)
        for pid in cluster.pids.values():                  # only if the launcher could not stop them
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_dig_from_the_east_gets_the_cname_and_the_east_edge(up: Up) -> None:
    out = dig("-b", EAST_CLIENT, "www.example.com")
    assert "status: NOERROR" in out and re.search(r"flags: qr aa", out)
    assert re.search(rf"^www\.example\.com\.\s+\d+\s+IN\s+CNAME\s+{re.escape(CDN)}$", out, re.M)
    # The nearest edge first, the other after it: the client's fallback while it keeps the answer.
    assert re.findall(rf"^{re.escape(CDN)}\s+{DNS.ttl}\s+IN\s+A\s+(\S+)$", out, re.M) == [EAST_EDGE, WEST_EDGE]


def test_dig_from_the_west_gets_the_west_edge_over_udp_and_tcp(up: Up) -> None:
    assert dig_addresses(WEST_CLIENT) == [WEST_EDGE, EAST_EDGE]
    assert dig_addresses(WEST_CLIENT, "+tcp") == [WEST_EDGE, EAST_EDGE]


def test_dig_with_a_client_subnet_gets_that_subnets_edge_and_a_scope(up: Up) -> None:
    out = dig("-b", EAST_CLIENT, "+subnet=203.0.113.0/24", "www.example.com")
    assert re.findall(rf"^{re.escape(CDN)}\s+\d+\s+IN\s+A\s+(\S+)$", out, re.M) == [WEST_EDGE, EAST_EDGE]
    assert "CLIENT-SUBNET: 203.0.113.0/24/24" in out


def test_names_outside_the_zones_are_refused(up: Up) -> None:
    out = dig("-b", EAST_CLIENT, "www.example.org")
    assert "status: REFUSED" in out and "ANSWER: 0" in out


def test_garbage_packets_do_not_stop_the_server(up: Up) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((EAST_CLIENT, 0))
        for junk in (b"\x00", b"\xff" * 11, bytes(range(256)) * 2, b"\x12\x34\x01\x00\x00\x05" + bytes(6)):
            sock.sendto(junk, (DNS.listen.host, DNS.listen.port))
    with socket.create_connection((DNS.listen.host, DNS.listen.port), timeout=3) as conn:
        conn.sendall(b"\x00\x05hello")
    assert dig_addresses(EAST_CLIENT) == [EAST_EDGE, WEST_EDGE]


def test_curl_through_the_answer_fetches_from_that_edge(up: Up) -> None:
    address = dig_addresses(EAST_CLIENT)[0]
    assert address == EAST_EDGE
    path = "/gen/dns-e2e/a.js?size=3000&cc=max-age%3D60"
    status, headers, body = curl(address, path)
    assert status == 200 and len(body) == 3000
    assert headers.get("x-cache", "").startswith("MISS")
    status, headers, body = curl(address, path)
    assert status == 200 and len(body) == 3000 and headers.get("x-cache", "").startswith("HIT")


def test_a_stopped_edge_loses_its_clients_within_the_fall_time_and_gets_them_back(up: Up) -> None:
    health = DNS.health
    assert dig_addresses(EAST_CLIENT) == [EAST_EDGE, WEST_EDGE]
    pid = up.pids["l1-east"]
    os.kill(pid, signal.SIGTERM)
    until(lambda: gone(pid), 20, "l1-east to exit")
    # fall failed probes, `interval` apart, each failing within `timeout`.
    bound = health.fall * health.interval + health.timeout + 1.0
    took = until(lambda: dig_addresses(EAST_CLIENT) == [WEST_EDGE], bound + 5, "east clients sent west")
    assert took <= bound, f"took {took:.1f}s, configured fall time allows {bound:.1f}s"
    status, _, body = curl(WEST_EDGE, "/gen/dns-e2e/b.js?size=100")
    assert status == 200 and len(body) == 100

    up.run_node("l1-east")
    until(lambda: healthy(DEFAULT.node("l1-east").admin), 30, "l1-east restarted")
    bound = health.rise * health.interval + health.timeout + 1.0
    took = until(lambda: dig_addresses(EAST_CLIENT) == [EAST_EDGE, WEST_EDGE], bound + 5, "east clients back east")
    assert took <= bound, f"took {took:.1f}s, configured rise time allows {bound:.1f}s"
    assert dig_addresses(WEST_CLIENT) == [WEST_EDGE, EAST_EDGE]


def test_explain_on_the_scheduler_admin_listener(up: Up) -> None:
    url = f"http://{DNS.admin}/explain?name=www.example.com&client=203.0.113.7"
    with urllib.request.urlopen(url, timeout=3) as reply:
        record = json.load(reply)
    assert record["location"]["region"] == "west"
    assert record["location"]["coverage_block"] == "203.0.113.0/24"
    assert [c["edge"] for c in record["candidates"]] == ["l1-west", "l1-east"]
    assert record["answer"] == [WEST_EDGE, EAST_EDGE]
