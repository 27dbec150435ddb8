"""`edge up`, `edge prometheus-config` and the files in deploy/.

The launcher tests run the real thing: `python -m edge up` as a subprocess,
which starts real `edge run` processes on loopback addresses 127.0.50.x,
ports 28080 (traffic) and 28091 (admin), used by no other test.  Each test
gets its own addresses and a topology file in its tmp_path; "nothing left
running" is checked both by the PIDs the launcher printed and by scanning
/proc for any process whose command line names that topology file.
"""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import pytest

from edge import config, launcher
from tests.cluster import alive, kill_processes_naming, processes_naming

REPO = Path(__file__).resolve().parent.parent
TRAFFIC_PORT = 28080
ADMIN_PORT = 28091
DNS_PORT = 28053
START_DEADLINE = 45.0      # seconds for `edge up` to print its table (the CI machine is shared)
STOP_DEADLINE = 20.0       # more than the launcher's 10 s grace before SIGKILL
READY_LINE = re.compile(r"^edge up: (\d+) nodes up;")
STARTED_LINE = re.compile(r"^started (\S+) pid (\d+)$")

# The DNS scheduler joins the test topology once its `edge run dns` exists.
HAVE_SCHEDULER = importlib.util.find_spec("edge.scheduler.service") is not None


# --------------------------------------------------------------------------- helpers


def write_topology(directory: Path, subnet: int, with_dns: bool = HAVE_SCHEDULER) -> Path:
    """An origin, one L2 and one L1 (and the scheduler) on 127.0.50.<subnet + i>."""
    ip = {name: f"127.0.50.{subnet + i}" for i, name in enumerate(("origin", "l2-a", "l1-a", "dns"))}
    text = f"""
state_dir = "{directory / 'var'}"

[sites.example]
hosts = ["www.example.com"]
origin = "http://{ip['origin']}:{TRAFFIC_PORT}"

[regions.east]
lat = 40.71
lon = -74.01

[nodes.origin]
role = "origin"
listen = "{ip['origin']}:{TRAFFIC_PORT}"
admin = "{ip['origin']}:{ADMIN_PORT}"

[nodes.l2-a]
role = "l2"
region = "east"
listen = "{ip['l2-a']}:{TRAFFIC_PORT}"
admin = "{ip['l2-a']}:{ADMIN_PORT}"
memory_size = "8MiB"
disk_size = "16MiB"

[nodes.l1-a]
role = "l1"
region = "east"
listen = "{ip['l1-a']}:{TRAFFIC_PORT}"
admin = "{ip['l1-a']}:{ADMIN_PORT}"
memory_size = "8MiB"
disk_size = "16MiB"
"""
    if with_dns:
        text += f"""
[dns]
listen = "{ip['dns']}:{DNS_PORT}"
admin = "{ip['dns']}:{ADMIN_PORT}"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
default_region = "east"

[dns.health]
interval = 0.5
timeout = 0.5
"""
    path = directory / "topology.toml"
    path.write_text(text)
    return path


def bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Up:
    """A running `python -m edge up --config FILE`, its stderr going to a file."""

    def __init__(self, process: asyncio.subprocess.Process, topology: Path, stderr_path: Path):
        self.process = process
        self.topology = topology
        self.stderr_path = stderr_path
        self.stdout_lines: list[str] = []

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def read_until_ready(self) -> list[str]:
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(START_DEADLINE):
                while True:
                    raw = await self.process.stdout.readline()
                    if not raw:
                        await self.process.wait()
                        raise AssertionError(f"edge up exited with {self.process.returncode} "
                                             f"before its table; stderr:\n{self.stderr}")
                    line = raw.decode().rstrip("\n")
                    self.stdout_lines.append(line)
                    if READY_LINE.match(line):
                        return self.stdout_lines
        except TimeoutError:
            raise AssertionError(f"no table from edge up within {START_DEADLINE}s; "
                                 f"stdout: {self.stdout_lines}\nstderr:\n{self.stderr}") from None

    async def exit_code(self) -> int:
        try:
            async with asyncio.timeout(STOP_DEADLINE):
                rest, _ = await self.process.communicate()
        except TimeoutError:
            raise AssertionError(f"edge up still running after {STOP_DEADLINE}s; "
                                 f"stderr:\n{self.stderr}") from None
        self.stdout_lines += rest.decode().splitlines()
        assert self.process.returncode is not None
        return self.process.returncode

    def started_pids(self) -> dict[str, int]:
        return {m.group(1): int(m.group(2))
                for m in map(STARTED_LINE.match, self.stdout_lines) if m}


@pytest.fixture
async def start_up(tmp_path: Path) -> AsyncIterator:
    """Starts `edge up`; afterwards kills, by PID, anything of the test still running."""
    runs: list[Up] = []

    async def start(topology: Path, **env: str) -> Up:
        stderr_path = topology.parent / f"edge-up-{len(runs)}.stderr"
        with stderr_path.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "edge", "up", "--config", str(topology),
                stdout=asyncio.subprocess.PIPE, stderr=stderr, cwd=REPO,
                env={**os.environ, "EDGE_UP_TIMEOUT": "30", **env})
        run = Up(process, topology, stderr_path)
        runs.append(run)
        return run

    yield start

    for run in runs:
        if run.process.returncode is None:
            run.process.kill()
            await run.process.wait()
        # Only processes started for this test name its tmp topology file.
        kill_processes_naming(str(run.topology))


# --------------------------------------------------------------------------- edge up


async def test_up_starts_every_node_serves_and_stops_cleanly(tmp_path: Path, start_up) -> None:
    topology_path = write_topology(tmp_path, subnet=1)
    topology = config.load(topology_path)
    expected = [m.name for m in launcher.members(topology)]

    run = await start_up(topology_path)
    stdout = "\n".join(await run.read_until_ready())

    pids = run.started_pids()
    assert sorted(pids) == sorted(expected)
    assert READY_LINE.search(stdout.splitlines()[-1]).group(1) == str(len(expected))
    for member in launcher.members(topology):
        assert alive(pids[member.name]), f"{member.name} is not running"
        table_row = next(line for line in stdout.splitlines() if line.split()[:2] == [member.name, member.role])
        assert str(member.traffic) in table_row and member.admin.url in table_row

    # The commands the launcher suggests must work as printed.
    curl_head = re.search(r"curl -sI -H 'Host: (\S+)' (http://\S+)", stdout)
    curl_metrics = re.search(r"curl -s (http://\S+/metrics) \| grep (\w+)", stdout)
    assert curl_head and curl_metrics, stdout
    l1 = topology.by_role("l1")[0]
    assert curl_head.group(2) == f"{l1.listen.url}/"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        site = {"Host": curl_head.group(1)}
        async with session.get(curl_head.group(2), headers=site) as response:
            body = await response.read()
            assert response.status == 200, (response.status, body[:200])
            assert body
        # `curl -sI` sends HEAD.
        async with session.head(curl_head.group(2), headers=site) as response:
            assert response.status == 200, response.status
        async with session.get(curl_metrics.group(1)) as response:
            metrics = await response.text()
            assert response.status == 200
        assert curl_metrics.group(2) in metrics
    if topology.dns is not None:
        dig = re.search(r"dig @(\S+) -p (\d+) (\S+)", stdout)
        assert dig, stdout
        query = dns.message.make_query(dig.group(3), "A")
        reply = await dns.asyncquery.udp(query, dig.group(1), port=int(dig.group(2)), timeout=5)
        addresses = {item.address for rrset in reply.answer for item in rrset if rrset.rdtype == 1}
        assert addresses == {l1.listen.host}, reply

    run.process.send_signal(signal.SIGTERM)
    assert await run.exit_code() == 0, run.stderr
    assert f"edge up: all {len(expected)} nodes stopped" in run.stderr
    for name, pid in pids.items():   # SIGTERM is a graceful stop for every node
        assert f"edge up: stopped {name} pid {pid} (exited with code 0)" in run.stderr
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert processes_naming(str(topology_path)) == []
    for member in launcher.members(topology):
        assert bindable(member.admin.host, member.admin.port), f"{member.name} admin still bound"
        assert bindable(member.traffic.host, member.traffic.port), f"{member.name} traffic still bound"


async def test_up_survives_a_dead_node_and_stops_on_ctrl_c(
        tmp_path: Path, start_up) -> None:
    topology_path = write_topology(tmp_path, subnet=11, with_dns=False)
    topology = config.load(topology_path)
    run = await start_up(topology_path)
    await run.read_until_ready()
    pids = run.started_pids()
    assert len(pids) == 3

    # A node that dies is reported loudly; the launcher and the others carry on.
    os.kill(pids["l1-a"], signal.SIGKILL)
    report = f"edge up: !!! l1-a (pid {pids['l1-a']}) was killed by SIGKILL unexpectedly"
    async with asyncio.timeout(10):
        while report not in run.stderr:
            await asyncio.sleep(0.05)
    assert run.process.returncode is None
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        for name in ("origin", "l2-a"):
            async with session.get(f"{topology.node(name).admin.url}/healthz") as response:
                assert response.status == 200, name

    # The same stop delivered twice at once (as timeout(1) does to a process and
    # its group) is one stop: the nodes still get their graceful shutdown.
    run.process.send_signal(signal.SIGINT)
    run.process.send_signal(signal.SIGINT)
    assert await run.exit_code() == 0, run.stderr
    assert "edge up: all 3 nodes stopped" in run.stderr
    assert "killing" not in run.stderr
    for name in ("origin", "l2-a"):
        assert f"edge up: stopped {name} pid {pids[name]} (exited with code 0)" in run.stderr
    assert [name for name, pid in pids.items() if alive(pid)] == []
    assert processes_naming(str(topology_path)) == []


async def test_nodes_stop_when_the_launcher_is_killed(tmp_path: Path, start_up) -> None:
    topology_path = write_topology(tmp_path, subnet=16, with_dns=False)
    run = await start_up(topology_path)
    await run.read_until_ready()
    pids = run.started_pids()
    run.process.kill()                    # no chance to clean up: the kernel must tell the children
    await run.process.wait()
    async with asyncio.timeout(STOP_DEADLINE):
        while [pid for pid in pids.values() if alive(pid)]:
            await asyncio.sleep(0.05)
    assert processes_naming(str(topology_path)) == []


async def test_up_refuses_a_busy_address_and_starts_nothing(tmp_path: Path, start_up) -> None:
    topology_path = write_topology(tmp_path, subnet=21, with_dns=False)
    l1 = config.load(topology_path).node("l1-a")
    with socket.socket() as squatter:
        squatter.bind((l1.listen.host, l1.listen.port))
        squatter.listen()
        run = await start_up(topology_path)
        code = await run.exit_code()

    assert code == 1, run.stderr
    assert f"l1-a: cannot start: traffic address {l1.listen} (tcp): " in run.stderr
    assert "in use" in run.stderr.lower()
    assert "nothing started" in run.stderr
    assert run.started_pids() == {}
    assert processes_naming(str(topology_path)) == []


async def test_up_names_a_node_that_dies_while_starting_and_stops_the_rest(
        tmp_path: Path, start_up) -> None:
    """The address is taken after the launcher's own check, so the child itself fails."""
    topology_path = write_topology(tmp_path, subnet=31, with_dns=False)
    topology = config.load(topology_path)
    origin, l1 = topology.node("origin"), topology.node("l1-a")
    run = await start_up(topology_path)

    # The origin answering means the launcher has checked every address and is
    # now starting the L2, which takes far longer than binding one socket here.
    squatter = socket.socket()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as session:
            async with asyncio.timeout(START_DEADLINE):
                while True:
                    try:
                        async with session.get(f"{origin.admin.url}/healthz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.02)
        squatter.bind((l1.admin.host, l1.admin.port))
        squatter.listen()
        code = await run.exit_code()
    finally:
        squatter.close()

    assert code == 1, run.stderr
    assert "edge up: l1-a exited with code 1 before it was healthy" in run.stderr
    assert "in use" in run.stderr.lower()
    assert "edge up: stopping the other nodes" in run.stderr
    assert "edge up: all 3 nodes stopped" in run.stderr
    assert processes_naming(str(topology_path)) == []


async def test_up_gives_up_at_the_deadline_and_stops_what_it_started(
        tmp_path: Path, start_up) -> None:
    # No Python process imports aiohttp and binds in 10 ms: the origin is late.
    topology_path = write_topology(tmp_path, subnet=41, with_dns=False)
    run = await start_up(topology_path, EDGE_UP_TIMEOUT="0.01")
    code = await run.exit_code()

    assert code == 1, run.stderr
    assert "edge up: origin not healthy after 0.01s" in run.stderr
    assert "edge up: all 1 nodes stopped" in run.stderr
    assert run.started_pids() == {}
    assert processes_naming(str(topology_path)) == []


async def test_up_refuses_what_edge_check_refuses_and_starts_nothing(tmp_path: Path, start_up) -> None:
    topology_path = write_topology(tmp_path, subnet=46, with_dns=False)
    (tmp_path / "var").write_text("state_dir is a file")       # no node could make its cache directory
    run = await start_up(topology_path)
    assert await run.exit_code() == 2, run.stderr
    assert (f"edge up: config error: {topology_path}: state_dir: cache directory of l2-a: "
            f"{str(tmp_path / 'var' / 'cache' / 'l2-a')!r} is under {str(tmp_path / 'var')!r}, which is a file, "
            "not a directory") in run.stderr
    assert "edge up: nothing started" in run.stderr and run.started_pids() == {}
    assert processes_naming(str(topology_path)) == []


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
async def test_up_rejects_a_bad_timeout(tmp_path: Path, start_up, value: str) -> None:
    topology_path = write_topology(tmp_path, subnet=51, with_dns=False)
    run = await start_up(topology_path, EDGE_UP_TIMEOUT=value)
    assert await run.exit_code() == 2
    assert f"EDGE_UP_TIMEOUT must be a positive number of seconds, got {value!r}" in run.stderr
    assert "Traceback" not in run.stderr
    assert processes_naming(str(topology_path)) == []


# --------------------------------------------------------------------------- start order, prometheus


def test_members_start_parents_before_children() -> None:
    order = [m.role for m in launcher.members(config.load())]
    assert order == sorted(order, key=["origin", "l2", "l1", "dns"].index)
    assert order[0] == "origin" and order[-1] == "dns"


def scrape_targets(text: str) -> set[tuple[str, str, str]]:
    """(target, node, role) of every static target in prometheus_config's output."""
    pattern = re.compile(r'- targets: \["([^"]+)"\]\n\s+labels:\n\s+node: "([^"]+)"\n\s+role: "([^"]+)"')
    return set(pattern.findall(text))


def test_prometheus_config_scrapes_every_admin_listener_of_the_default_topology() -> None:
    topology = config.load()
    text = launcher.prometheus_config(topology)
    expected = {(str(n.admin), n.name, n.role) for n in topology.nodes}
    expected.add((str(topology.dns.admin), "dns", "dns"))
    assert scrape_targets(text) == expected
    # The addresses issue #3 gives for the default topology.
    assert {t for t, _, _ in scrape_targets(text)} == {
        "127.0.0.10:8091", "127.0.2.1:8091", "127.0.2.2:8091",
        "127.0.1.1:8091", "127.0.1.2:8091", "127.0.5.1:8091"}
    assert text.count("job_name:") == 1


def test_prometheus_config_without_dns_and_with_ipv6(tmp_path: Path) -> None:
    path = tmp_path / "topology.toml"
    path.write_text("""
[sites.s]
hosts = ["www.example.com"]
origin = "http://[::1]:9080"
[nodes.true]
role = "origin"
listen = "[::1]:9080"
admin = "[::1]:9091"
""")
    text = launcher.prometheus_config(config.load(path))
    assert scrape_targets(text) == {("[::1]:9091", "true", "origin")}
    assert '"dns"' not in text


def test_deploy_prometheus_yml_is_the_generated_default() -> None:
    assert (REPO / "deploy" / "prometheus.yml").read_text() == launcher.prometheus_config(config.load())


async def test_prometheus_config_command_prints_it(tmp_path: Path) -> None:
    topology_path = write_topology(tmp_path, subnet=61, with_dns=True)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", "prometheus-config", "--config", str(topology_path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err
    assert out.decode() == launcher.prometheus_config(config.load(topology_path))
    assert ("127.0.50.64:28091", "dns", "dns") in scrape_targets(out.decode())


@pytest.mark.parametrize(("seconds", "duration"), [
    (15, "15s"), (1, "1s"), (0.5, "500ms"), (2.25, "2250ms"), (90, "90s"), (0.001, "1ms")])
def test_prometheus_duration(seconds: float, duration: str) -> None:
    assert launcher.prometheus_duration(seconds) == duration


@pytest.mark.parametrize("seconds", [0, -1, 0.0001, float("nan"), float("inf")])
def test_prometheus_duration_refuses_what_prometheus_cannot_take(seconds: float) -> None:
    with pytest.raises(ValueError):
        launcher.prometheus_duration(seconds)


async def test_prometheus_config_interval_is_valid_for_promtool(tmp_path: Path) -> None:
    out = tmp_path / "prometheus.yml"
    with out.open("wb") as stdout:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edge", "prometheus-config", "--interval", "5",
            stdout=stdout, stderr=asyncio.subprocess.PIPE, cwd=REPO)
        async with asyncio.timeout(30):
            _, err = await process.communicate()
    assert process.returncode == 0, err
    text = out.read_text()
    assert "  scrape_interval: 5s\n  evaluation_interval: 5s\n" in text
    assert scrape_targets(text) == scrape_targets(launcher.prometheus_config(config.load()))
    if shutil.which("promtool"):      # scripts/test.sh installs it; a 5 s interval under the 10 s default timeout
        check = subprocess.run(["promtool", "check", "config", str(out)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", "prometheus-config", "--interval", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    async with asyncio.timeout(30):
        out_bytes, err = await bad.communicate()
    assert bad.returncode == 2 and out_bytes == b""
    assert "--interval: expected a positive number of seconds, got '0'" in err.decode()


async def test_version_is_the_package_version() -> None:
    import edge
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", "--version",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err
    assert out.decode() == f"edge {edge.__version__}\n"
    # One place holds the version: the package metadata is read from it.
    assert 'version = {attr = "edge.__version__"}' in (REPO / "pyproject.toml").read_text()


# --------------------------------------------------------------------------- deploy/


DOCUMENTATION_NETS = [ipaddress.ip_network(n) for n in
                      ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")]


def test_multi_host_example_loads_with_documentation_addresses_only() -> None:
    topology = config.load(REPO / "deploy" / "multi-host.toml")
    assert [len(topology.by_role(r)) for r in ("origin", "l2", "l1")] == [1, 2, 3]
    assert topology.dns is not None and topology.regions and topology.coverage
    hosts = {n.listen.host for n in topology.nodes} | {n.admin.host for n in topology.nodes}
    hosts |= {topology.dns.listen.host, topology.dns.admin.host}
    assert len({n.listen.host for n in topology.nodes}) == 6, "one host per node"
    for host in hosts:
        assert any(ipaddress.ip_address(host) in net for net in DOCUMENTATION_NETS), host
    for net, _region in topology.coverage:
        assert any(net.subnet_of(doc) for doc in DOCUMENTATION_NETS if doc.version == net.version), net


async def test_edge_check_accepts_the_multi_host_example() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "edge", "check", "--config", str(REPO / "deploy" / "multi-host.toml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO)
    async with asyncio.timeout(30):
        out, err = await process.communicate()
    assert process.returncode == 0, err
    assert len(out.decode().splitlines()) == 7   # 6 nodes and the scheduler


def test_systemd_unit_runs_one_node_per_instance_without_root() -> None:
    unit = (REPO / "deploy" / "systemd" / "edge@.service").read_text()
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), value.strip())
    assert settings["ExecStart"] == "/usr/local/bin/edge run %i --config /etc/edge/topology.toml"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"      # `systemctl reload`: SIGHUP re-reads it
    assert settings["User"] == "edge"
    assert settings["Restart"] == "on-failure" and settings["RestartSec"]
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert settings["StateDirectory"] == "edge" and "/var/lib/edge" in settings["ReadWritePaths"]
