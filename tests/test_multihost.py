"""The CDN on several hosts, for real: one network namespace per host, one shared topology file.

Each node of deploy/multi-host.toml (the origin, two L2s, three L1s and the
DNS scheduler) runs as `edge run NODE --config FILE` inside a network
namespace of its own, with the address the file gives it; a client
namespace per region asks the scheduler with `dig` and fetches with `curl`
through the edge it was answered; an "ops" namespace has the address of the
example's monitoring host, which its admin listeners let in (as they do the
operators' network and the scheduler, and nobody else).  The hosts are wired by veth pairs to a bridge in a
"switch" namespace (tests/netns.py), so the subnet exists only there.

The topology is the example file itself with two kinds of change: its
documentation networks (RFC 5737) move to the lab's private 10.77.0.0/16,
keeping the last two octets' structure (192.0.2.x -> 10.77.2.x, 198.51.100.x
-> 10.77.100.x, 203.0.113.x -> 10.77.113.x), so every host, coverage block
and allow-list entry keeps its place; and its paths (state_dir, the origin's
content_dir) move to a temporary directory.  Ports are the file's: the L1s on
80, the scheduler on 53.

Run as root (CI does); elsewhere the module is skipped, saying why.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from edge import checks, config
from edge.scheduler.answer import Answerer
from tests import netns

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "deploy" / "multi-host.toml"
LAB_SUBNET = "10.77.0.0/16"
# The example's documentation networks, and where the lab has them.
MOVED_NETWORKS = {"192.0.2.": "10.77.2.", "198.51.100.": "10.77.100.", "203.0.113.": "10.77.113."}
# A client host per region, inside that region's coverage block of the (moved) example.
CLIENTS = {"east": "10.77.2.130", "central": "10.77.100.130", "west": "10.77.113.130"}
# The example's Prometheus host (its admin_allow), moved: where the test reads /metrics and /status.
OPS = "10.77.100.99"
# The nearest L1 first, then the next nearest (New York, Chicago, San Francisco).
NEAREST = {"east": ["l1-nyc", "l1-chi"], "central": ["l1-chi", "l1-nyc"], "west": ["l1-sfo", "l1-chi"]}
HOST = "www.example.com"
START_DEADLINE = 30.0
DIG = shutil.which("dig")
CURL = shutil.which("curl")


def lab_topology(state_dir: Path, content_dir: Path) -> str:
    """deploy/multi-host.toml, moved into the lab (see the module's docstring)."""
    text = EXAMPLE.read_text()
    for documentation, lab in MOVED_NETWORKS.items():
        text, count = re.subn(rf"(?<![\d.]){re.escape(documentation)}(?=\d)", lab, text)
        assert count, f"{EXAMPLE} no longer has addresses in {documentation}0/24"
    outside = [a for a in re.findall(r"(?<![\d.])\d+\.\d+\.\d+\.\d+(?![\d.])", text)
               if ipaddress.ip_address(a) not in ipaddress.ip_network(LAB_SUBNET)]
    assert not outside, f"{EXAMPLE} has addresses the test does not move into the lab: {outside}"
    for key, value in (("state_dir", state_dir), ("content_dir", content_dir)):
        text, count = re.subn(rf'^{key} = "[^"]*"', f'{key} = "{value}"', text, flags=re.M)
        assert count == 1, f"{EXAMPLE} no longer has one {key}"
    return text


# ---------------------------------------------------------------- what a client and an operator do


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def tiers(self) -> list[str]:
        """The nodes of Cache-Status, upstream first (RFC 9211: one entry per tier)."""
        return [entry.split(";")[0].strip() for entry in self.headers.get("cache-status", "").split(",")]


@dataclass
class Cdn:
    lab: netns.Lab
    topology: config.Topology
    workdir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def address(self, node: str) -> str:
        return self.topology.node(node).listen.host

    def dig(self, region: str, *args: str) -> list[str]:
        """`dig +short www.example.com` from the region's client: the CNAME, then the A records."""
        dns = self.topology.dns
        done = self.lab.run(f"client-{region}", [DIG, f"@{dns.listen.host}", "-p", str(dns.listen.port),
                                                 "+time=2", "+tries=2", "+short", *args, HOST], timeout=15)
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode().split()

    def answered(self, region: str) -> list[str]:
        """The L1s the scheduler answers the region's client with, by node name, in order."""
        names = {self.address(n.name): n.name for n in self.topology.by_role("l1")}
        cname, *addresses = self.dig(region)
        expected = f"{self.topology.site_for_host(HOST).cdn_name}."
        assert cname == expected, f"expected the CNAME {expected} first, got {cname!r}"
        return [names[a] for a in addresses]

    def curl(self, region: str, edge: str, path: str) -> Reply:
        """GET http://www.example.com<path> from the region's client, through `edge`, as a
        browser the DNS sent there would."""
        listen = self.topology.node(edge).listen
        started = time.monotonic()
        done = self.lab.run(f"client-{region}", [
            CURL, "-sS", "-D", "-", "--max-time", "30", "--resolve", f"{HOST}:{listen.port}:{listen.host}",
            f"http://{HOST}:{listen.port}{path}"], timeout=40)
        seconds = time.monotonic() - started
        assert done.returncode == 0, f"curl {path} via {edge} from {region}: {done.stderr.decode().strip()}"
        head, _, body = done.stdout.partition(b"\r\n\r\n")
        status_line, *lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
        return Reply(int(status_line.split()[1]), headers, body, seconds)

    def admin_get(self, node: str, path: str, host: str = "ops") -> tuple[int, str]:
        """GET an admin endpoint of `node` ("dns" for the scheduler) from the ops host (or another)."""
        admin = self.topology.dns.admin if node == "dns" else self.topology.node(node).admin
        done = self.lab.run(host, [CURL, "-sS", "--max-time", "5", "-w", "\n%{http_code}", f"http://{admin}{path}"],
                            timeout=15)
        assert done.returncode == 0, f"GET {admin}{path}: {done.stderr.decode().strip()}"
        body, _, status = done.stdout.decode().rpartition("\n")
        return int(status), body

    def origin_count(self, path: str) -> int:
        """How many requests for `path` the origin has served (its origin_path_requests_total)."""
        status, text = self.admin_get("origin", "/metrics")
        assert status == 200
        found = re.search(rf'^origin_path_requests_total{{path="{re.escape(path)}"}} ([0-9.e+]+)$', text, re.M)
        return int(float(found[1])) if found else 0

    def parent_up(self, l1: str, parent: str) -> bool:
        status, body = self.admin_get(l1, "/status")
        assert status == 200, body
        return json.loads(body)["parents"][parent]["up"]

    def log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def until(check: Callable[[], bool], deadline: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if check():
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not within {deadline}s: {what}")


# ---------------------------------------------------------------- the lab


def _start(cdn: Cdn, topology_file: Path) -> None:
    """Every node in its host's namespace, as `edge up` orders them: the cache nodes and the
    origin first (at once), each answering /healthz, then the scheduler, until it has found
    every L1 up (its first probe of an edge decides, and one that is not listening yet would
    only come back after `rise` probes)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")

    def start(name: str) -> None:
        # One process a node: seven hosts share this machine's CPUs, where each would run a worker
        # per CPU (the file leaves `workers` to each host); tests/test_workers.py covers workers.
        workers = ["--workers", "1"] if name != "dns" and cdn.topology.node(name).role != "origin" else []
        cdn.procs[name] = cdn.lab.spawn(name, [sys.executable, "-m", "edge", "run", name, "--config",
                                               str(topology_file), *workers], cdn.workdir / f"{name}.log",
                                        env=env, cwd=REPO)

    def healthy(names: list[str]) -> Callable[[], bool]:
        def check() -> bool:
            for name, proc in cdn.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"{name} exited with {proc.returncode}:\n{cdn.log(name)}")
            argv = [CURL, "-s", "--max-time", "2", "-w", "%{http_code}\n"]
            for name in names:
                argv += ["-o", "/dev/null", f"http://{cdn.topology.node(name).admin}/healthz"]
            return cdn.lab.run("ops", argv, timeout=30).stdout.decode().split() == ["200"] * len(names)
        return check

    nodes = [n.name for n in cdn.topology.nodes]
    for name in nodes:
        start(name)
    until(healthy(nodes), START_DEADLINE, f"{', '.join(nodes)} healthy")
    start("dns")
    l1s = {n.name for n in cdn.topology.by_role("l1")}

    def scheduler_ready() -> bool:
        if cdn.procs["dns"].poll() is not None:
            raise AssertionError(f"dns exited with {cdn.procs['dns'].returncode}:\n{cdn.log('dns')}")
        done = cdn.lab.run("ops", [CURL, "-s", "--max-time", "2", f"http://{cdn.topology.dns.admin}/healthz"])
        try:
            edges = json.loads(done.stdout)["edges"]
        except (ValueError, KeyError):
            return False
        return {name for name, edge in edges.items() if edge["up"] and edge["detail"] != "not probed yet"} == l1s

    until(scheduler_ready, START_DEADLINE, "the scheduler up, with every L1 probed and up")


@pytest.fixture(scope="module")
def cdn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cdn]:
    reason = netns.refusal()
    if reason:
        pytest.skip(f"multi-host test needs network namespaces: {reason}")
    missing = [tool for tool, path in (("curl", CURL), ("dig (dnsutils)", DIG)) if path is None]
    if missing:
        pytest.skip(f"multi-host test drives the CDN with curl and dig: install {', '.join(missing)}")
    netns.remove_leftovers()
    workdir = tmp_path_factory.mktemp("multihost")
    content = workdir / "www"
    content.mkdir()
    (content / "index.html").write_text("<h1>www.example.com, multi-host</h1>\n")
    topology_file = workdir / "topology.toml"
    topology_file.write_text(lab_topology(workdir / "state", content))
    topology = config.load(topology_file)
    assert checks.problems(topology) == []          # what `edge check` says
    locate = Answerer(topology).locate
    for region, address in CLIENTS.items():
        assert locate(ipaddress.ip_address(address)).region == region, f"{address} is not a {region} client"

    lab = netns.Lab(LAB_SUBNET)
    try:
        try:
            lab.open()
        except netns.Refused as exc:
            pytest.skip(f"network namespaces, bridges or veth pairs are refused here: {exc}")
        for node in topology.nodes:
            assert node.admin.host == node.listen.host, f"{node.name}: one host, one address"
            lab.add_host(node.name, node.listen.host)
        lab.add_host("dns", topology.dns.listen.host)
        for region, address in CLIENTS.items():
            lab.add_host(f"client-{region}", address)
        lab.add_host("ops", OPS)
        cdn = Cdn(lab, topology, workdir)
        _start(cdn, topology_file)
        yield cdn
    finally:
        lab.close()


# ---------------------------------------------------------------- the tests, in the order they run


def test_each_region_is_answered_its_nearest_l1_then_the_next(cdn: Cdn) -> None:
    for region, expected in NEAREST.items():
        assert cdn.answered(region) == expected, region
        assert cdn.answered(region) == expected, f"{region}, again (the answer cache)"
    # Over TCP too, from the west.
    assert cdn.dig("west", "+tcp")[1:] == [cdn.address(n) for n in NEAREST["west"]]


def test_admin_listeners_let_in_monitoring_operators_and_the_scheduler(cdn: Cdn) -> None:
    assert cdn.admin_get("l1-nyc", "/metrics", host="ops")[0] == 200
    assert cdn.admin_get("l1-nyc", "/metrics", host="client-central")[0] == 200     # the operators' /25
    assert cdn.admin_get("l1-nyc", "/metrics", host="client-east")[0] == 403
    assert cdn.admin_get("l1-nyc", "/healthz", host="client-east")[0] == 200        # always open
    # The scheduler's status page reads every node's /metrics from the scheduler's host.
    errors: dict[str, str | None] = {}

    def every_node_scraped() -> bool:
        status, body = cdn.admin_get("dns", "/api/overview")
        assert status == 200, body
        errors.update({node["name"]: node["metrics_error"] for node in json.loads(body)["nodes"]})
        return not any(errors.values())

    try:
        until(every_node_scraped, 10, "the status page to have every node's metrics")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {errors}") from None


WARM = [f"/gen/multihost/warm-{i}.js" for i in range(8)]
QUERY = "?size=3000&cc=public%2C%20max-age%3D600"


def test_miss_then_hit_and_every_other_region_hits_at_the_l2(cdn: Cdn) -> None:
    east, central, west = (cdn.answered(r)[0] for r in ("east", "central", "west"))
    owners = {}
    for path in WARM:
        first = cdn.curl("east", east, path + QUERY)
        assert first.status == 200 and len(first.body) == 3000
        assert first.headers["x-cache"] == "MISS" and first.headers["x-origin-hits"] == "1"
        owners[path], tier = first.tiers()[0], first.headers["cache-status"].split(",")[0]
        assert first.tiers() == [owners[path], east] and "fwd=uri-miss" in tier and "stored" in tier
        again = cdn.curl("east", east, path + QUERY)
        assert again.status == 200 and again.headers["x-cache"] == "HIT" and again.body == first.body
        for region, edge in (("west", west), ("central", central)):
            other = cdn.curl(region, edge, path + QUERY)
            assert other.status == 200 and other.body == first.body, (region, other.status, other.headers, len(other.body))
            # A miss at this region's L1, a hit at the L2 that owns the key: the origin is not asked.
            assert other.headers["x-cache"] == "MISS", region
            assert other.tiers() == [owners[path], edge], region
            assert other.headers["cache-status"].startswith(f"{owners[path]}; hit"), (region, other.headers)
            assert other.headers["x-origin-hits"] == "1", region
    assert set(owners.values()) == {"l2-east", "l2-west"}, owners      # the keys are spread over both L2s
    assert {path: cdn.origin_count(path) for path in WARM} == {path: 1 for path in WARM}


def test_killing_an_l2_host_loses_no_request(cdn: Cdn) -> None:
    """SIGKILL to an L2's process, then its namespace deleted: the process crashes (its kernel
    closes its connections) and the host leaves the network (its address is gone from the
    subnet, so new connections to it go unanswered until the L1s' connect timeout).  Clients of
    every region keep fetching, a new object each request, during and after; every request
    succeeds (200, whole body), and only the dead L2's keys are fetched from the origin again,
    once for the whole CDN."""
    victim, survivor = "l2-east", "l2-west"
    edges = {region: cdn.answered(region)[0] for region in CLIENTS}
    # Objects in the L2s (and in the east's L1), not yet in the other regions' L1s.
    owners = {}
    for path in (f"/gen/multihost/before-{i}.js" for i in range(8)):
        reply = cdn.curl("east", edges["east"], path + QUERY)
        assert reply.status == 200 and reply.headers["x-cache"] == "MISS"
        owners[path] = reply.tiers()[0]
    assert set(owners.values()) == {victim, survivor}, owners

    results: list[tuple[str, str, int, int, float]] = []      # region, path, status, bytes, seconds
    failures: list[str] = []
    stop = threading.Event()

    def load(region: str) -> None:
        # Until told to stop, bounded in count and time.  A fixed 200 was too few: with the L1s
        # failing over at once, a region could finish them before every L1 had marked the L2 down.
        began = time.monotonic()
        for i in range(20_000):
            if stop.is_set() or time.monotonic() - began > 120:
                return
            path = f"/gen/multihost/during-{region}-{i}.js"
            try:
                reply = cdn.curl(region, edges[region], path + QUERY)
            except AssertionError as exc:        # curl failed: no answer at all
                failures.append(f"{region} {path}: {exc}")
                continue
            results.append((region, path, reply.status, len(reply.body), reply.seconds))
            if reply.status != 200 or len(reply.body) != 3000:
                failures.append(f"{region} {path}: {reply.status}, {len(reply.body)} bytes, {reply.headers}")

    def done(region: str) -> int:
        return sum(1 for r in list(results) if r[0] == region)

    threads = [threading.Thread(target=load, args=(region,), name=f"load-{region}") for region in CLIENTS]
    for thread in threads:
        thread.start()
    try:
        until(lambda: all(done(region) >= 2 for region in CLIENTS), 15, "two requests from every region")
        killed_at = time.monotonic()
        cdn.lab.kill_host(victim)
        until(lambda: not any(cdn.parent_up(n.name, victim) for n in cdn.topology.by_role("l1")),
              20, f"every L1 to mark {victim} down")
        marked_down = time.monotonic() - killed_at
        after = {region: done(region) for region in CLIENTS}
        until(lambda: all(done(region) >= after[region] + 3 for region in CLIENTS), 40,
              "three more requests from every region after that")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == []
    print(f"\n{len(results)} requests during and after the kill, none lost; every L1 marked {victim} "
          f"down {marked_down:.1f}s after it; slowest request {max(r[4] for r in results):.1f}s")

    # The objects from before, now from the west and then the centre: the survivor's keys are
    # still hits there; the victim's go to the survivor, which fetches each once for both.
    for path, owner in owners.items():
        west = cdn.curl("west", edges["west"], path + QUERY)
        central = cdn.curl("central", edges["central"], path + QUERY)
        for reply, edge in ((west, edges["west"]), (central, edges["central"])):
            assert reply.status == 200 and len(reply.body) == 3000
            assert reply.tiers() == [survivor, edge], (path, reply.headers)
        assert central.headers["cache-status"].startswith(f"{survivor}; hit"), (path, central.headers)
        if owner == survivor:
            assert west.headers["cache-status"].startswith(f"{survivor}; hit"), (path, west.headers)
        assert cdn.origin_count(path) == (1 if owner == survivor else 2), (path, owner)
    for region in CLIENTS:
        assert cdn.answered(region) == NEAREST[region], f"{region} after the L2 died"
