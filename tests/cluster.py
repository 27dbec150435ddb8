"""Real processes on loopback for integration tests: write a topology, start nodes, stop them by PID.

Every node listens on its own loopback IP with fixed ports (traffic 8080,
admin 8091), like the default topology.  Each test module takes its own
127.0.N.0/24 block so suites never collide.  Readiness is polled with a
deadline, never slept for.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Two regions for the DNS scheduler's tests (New York and San Francisco), as TOML.
EAST_WEST_REGIONS = """[regions.east]
lat = 40.71
lon = -74.01
[regions.west]
lat = 37.77
lon = -122.42
"""
TRAFFIC_PORT, ADMIN_PORT = 8080, 8091


def topology_text(net: str, *, l2: int = 0, l1: int = 1, cache_dir: Path, extra_node: str = "",
                  extra_site: str = "", extra: str = "", l1_regions: tuple[str, ...] = ()) -> str:
    """A topology on 127.0.<net>.x: origin .10, L2s .21.., L1s .31.., one site www.example.com.

    `extra_node` is added to every cache node's table, `extra_site` to the site's.
    `l1_regions` places the L1s in order (l1-1 in the first, ...) for the DNS
    scheduler; `extra` then has to define those regions.
    """
    lines = [
        f'state_dir = "{cache_dir}"',
        "[sites.example]",
        'hosts = ["www.example.com", "static.example.com"]',
        f'origin = "http://127.0.{net}.10:{TRAFFIC_PORT}"',
        extra_site,
        "[nodes.origin]",
        'role = "origin"',
        f'listen = "127.0.{net}.10:{TRAFFIC_PORT}"',
        f'admin = "127.0.{net}.10:{ADMIN_PORT}"',
    ]
    for i in range(l2):
        lines += [f"[nodes.l2-{chr(97 + i)}]", 'role = "l2"',
                  f'listen = "127.0.{net}.{21 + i}:{TRAFFIC_PORT}"', f'admin = "127.0.{net}.{21 + i}:{ADMIN_PORT}"',
                  'memory_size = "16MiB"', 'disk_size = "512MiB"', extra_node]
    for i in range(l1):
        lines += [f"[nodes.l1-{i + 1}]", 'role = "l1"',
                  f'listen = "127.0.{net}.{31 + i}:{TRAFFIC_PORT}"', f'admin = "127.0.{net}.{31 + i}:{ADMIN_PORT}"',
                  'memory_size = "16MiB"', 'disk_size = "512MiB"', 'parents = "all"',
                  "parent_fall = 2", "parent_rise = 2", "parent_probe_interval = 0.1", "parent_timeout = 2.0",
                  f'region = "{l1_regions[i]}"' if i < len(l1_regions) else "", extra_node]
    return "\n".join(lines) + "\n" + extra


def moved_local_topology(moved: dict[str, str], state_dir: Path | None = None) -> str:
    """deploy/local.toml (the default topology) with every node address moved as `moved` says
    (default IP -> new IP; each must be found, with a port, also inside URLs such as the site's
    origin), and with `state_dir` if given: the whole default CDN where a test may run it, beside
    an operator's `edge up` of the real default."""
    text = (REPO / "deploy" / "local.toml").read_text()
    for old, new in moved.items():
        text, count = re.subn(rf'(?<=["/]){re.escape(old)}:', f'{new}:', text)
        assert count, f"deploy/local.toml no longer has {old}"
    left = set(re.findall(r'(?<=["/])(127\.0\.[0-9]+\.[0-9]+):', text)) - set(moved.values())
    assert not left, f"deploy/local.toml has addresses the test does not move: {left}"
    if state_dir is not None:
        text, count = re.subn(r'^state_dir = "var"$', f'state_dir = "{state_dir}"', text, flags=re.M)
        assert count == 1, 'deploy/local.toml no longer has state_dir = "var"'
        # The throw-away certificates edge up makes live in the state dir: move them along.
        text = text.replace('"var/tls/', f'"{state_dir}/tls/')
    return text


def processes_naming(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text` (our unique topology path)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue   # exited while we looked
        if text.encode() in cmdline:
            found.append(int(entry))
    return found


def kill_processes_naming(text: str) -> None:
    """SIGKILL what a test started with this topology path and left behind (by PID, never by name)."""
    for pid in processes_naming(text):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass   # exited on its own meanwhile


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def get(ip: str, host: str, path: str, port: int = TRAFFIC_PORT) -> tuple[int, dict[str, str], bytes]:
    """A plain-HTTP GET of `path` from a node at `ip` for site `host`: status, fields (lower-case), body;
    an error status is an answer here, not an exception."""
    request = urllib.request.Request(f"http://{ip}:{port}{path}", headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def wait_port_free(host: str, port: int, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                return
            except OSError:
                time.sleep(0.05)
    raise AssertionError(f"{host}:{port} still busy after {deadline}s")


@dataclass
class NodeProcess:
    name: str
    config: Path
    admin: str                      # host:port
    traffic: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    args: tuple[str, ...] = ()      # more `edge run` options (--watch, --listen-host HOST)
    # `--workers 1` unless a test says otherwise (None: what the topology says): a cache node's
    # default is one worker per CPU, and the suite's expectations are those of one process.
    workers: int | None = 1

    def start(self, deadline: float = 20.0) -> NodeProcess:
        host, port = self.traffic.rsplit(":", 1)
        wait_port_free(host, int(port))
        self.log = self.config.parent / f"{self.name}.log"
        env = dict(os.environ, PYTHONPATH=str(REPO), EDGE_ADMIN_TOKEN="test-token")
        workers = ["--workers", str(self.workers)] if self.workers is not None and self.name != "dns" else []
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "edge", "run", self.name, "--config", str(self.config),
                 "--log-level", "INFO", *workers, *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with urllib.request.urlopen(f"http://{self.admin}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"{self.name} not healthy within {deadline}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no drain, the listening socket simply goes away."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def peak_rss(self) -> int:
        """VmHWM: the process's peak resident set, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.admin}/metrics", timeout=5) as r:
            return r.read().decode()


@dataclass
class Cluster:
    config: Path
    net: str
    nodes: dict[str, NodeProcess] = field(default_factory=dict)

    @classmethod
    def create(cls, tmp_path: Path, net: str, **kwargs) -> Cluster:
        config = tmp_path / "topology.toml"
        config.write_text(topology_text(net, cache_dir=tmp_path / "state", **kwargs))
        return cls(config, net)

    def node(self, name: str) -> NodeProcess:
        """A node of the topology by name; "dns" is the scheduler (its traffic address is DNS)."""
        if name not in self.nodes:
            from edge.config import load
            topology = load(self.config)
            spec = topology.dns if name == "dns" and topology.dns is not None else topology.node(name)
            self.nodes[name] = NodeProcess(name, self.config, str(spec.admin), str(spec.listen))
        return self.nodes[name]

    def start(self, *names: str) -> None:
        for name in names:
            self.node(name).start()

    def stop_all(self) -> None:
        for node in self.nodes.values():
            node.stop()

    def url(self, name: str, path: str) -> str:
        return f"http://{self.node(name).traffic}{path}"


def single_edge(tmp_path: Path, ip: str, sites: str) -> NodeProcess:
    """One L1 node "edge" on `ip` (ports 8080/8091) for the given `[sites.*]` TOML; started, stop it after."""
    config = tmp_path / "topology.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n{sites}\n[nodes.edge]\nrole = "l1"\n'
                      f'listen = "{ip}:{TRAFFIC_PORT}"\nadmin = "{ip}:{ADMIN_PORT}"\n')
    return NodeProcess("edge", config, f"{ip}:{ADMIN_PORT}", f"{ip}:{TRAFFIC_PORT}").start()


@dataclass
class EdgeUp:
    """`edge up --config FILE` as a real process, and the PIDs of the nodes it started (from its output).

    `stop` ends the launcher with SIGTERM (it stops its nodes) and then SIGKILLs, by
    PID, any of its nodes still running; `kill` is a crash of one node (SIGKILL).
    """

    config: Path
    output: Path
    proc: subprocess.Popen
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, topology_text: str, deadline: float = 90.0) -> EdgeUp:
        config = workdir / "topology.toml"
        config.write_text(topology_text)
        output = workdir / "edge-up.log"
        with open(output, "wb") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "edge", "up", "--config", str(config)],
                                    stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=str(REPO),
                                    env=dict(os.environ, PYTHONPATH=str(REPO), EDGE_UP_TIMEOUT="60"))
        up = cls(config, output, proc)
        end = time.monotonic() + deadline
        try:
            while "nodes up;" not in output.read_text():
                if proc.poll() is not None:
                    raise AssertionError(f"edge up exited with {proc.returncode}:\n{output.read_text()}")
                if time.monotonic() > end:
                    raise AssertionError(f"edge up not up within {deadline}s:\n{output.read_text()}")
                time.sleep(0.05)
            up.pids = {m[1]: int(m[2]) for m in re.finditer(r"^started (\S+) pid (\d+)$", output.read_text(), re.M)}
        except BaseException:
            up.stop()
            raise
        return up

    def kill(self, name: str) -> None:
        os.kill(self.pids[name], signal.SIGKILL)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for name, pid in self.pids.items():     # only if the launcher could not stop them
            if self._still_ours(name, pid):
                os.kill(pid, signal.SIGKILL)

    def _still_ours(self, name: str, pid: int) -> bool:
        """Is `pid` still the `edge run NAME --config OURS` we started (not a PID reused since)?"""
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return name.encode() in command and str(self.config).encode() in command
