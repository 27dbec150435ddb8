"""Reload, in process: what a running node may take from a new topology, and the pieces that swap.

Pure tables first (restart-only keys, the change summary, the watcher's
settling, health carried over), then the Reloader against real files, then
the scheduler's reload through its real transport (no sockets: the
transport's `handle` is fed wire bytes).  The real-process tests under load
are in test_reload_e2e.py.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry

from edge import config, reload
from edge.scheduler.answer import Edge
from edge.scheduler.health import EdgeHealth, HealthChecker, ProbeResult
from edge.upstream.health import ParentHealth
from edge.watch import Settle

BASE = """
state_dir = "/srv/edge"
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.94.10:8080"
[regions.east]
lat = 40.71
lon = -74.01
[regions.west]
lat = 37.77
lon = -122.42
[coverage]
"127.0.95.0/24" = "east"
[nodes.origin]
role = "origin"
listen = "127.0.94.10:8080"
admin = "127.0.94.10:8091"
[nodes.l2-a]
role = "l2"
listen = "127.0.94.21:8080"
admin = "127.0.94.21:8091"
[nodes.l1]
role = "l1"
region = "east"
listen = "127.0.94.31:8080"
admin = "127.0.94.31:8091"
[dns]
listen = "127.0.94.5:8053"
admin = "127.0.94.5:8091"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
"""
L2_B = '[nodes.l2-b]\nrole = "l2"\nlisten = "127.0.94.22:8080"\nadmin = "127.0.94.22:8091"\n'


def parse(text: str) -> config.Topology:
    return config.parse(text, "topo.toml", Path("/etc/edge"))


def l1_with(extra: str) -> str:
    return BASE.replace('region = "east"\n', f'region = "east"\n{extra}\n')


# --------------------------------------------------------------------------- restart-only keys


@pytest.mark.parametrize(("new", "member", "key"), [
    (l1_with("").replace("127.0.94.31:8080", "127.0.94.39:8080"), "l1", "nodes.l1.listen"),
    (l1_with("").replace("127.0.94.31:8091", "127.0.94.31:8092"), "l1", "nodes.l1.admin"),
    (l1_with('memory_size = "1MiB"'), "l1", "nodes.l1.memory_size"),
    (l1_with('memory_object_max = "1KiB"'), "l1", "nodes.l1.memory_object_max"),
    (l1_with('disk_size = "1MiB"'), "l1", "nodes.l1.disk_size"),
    (l1_with('admin_allow = ["127.0.0.1"]'), "l1", "nodes.l1.admin_allow"),
    (l1_with('cache_dir = "/elsewhere"'), "l1", "nodes.l1.cache_dir"),
    (BASE.replace('state_dir = "/srv/edge"', 'state_dir = "/srv/other"'), "l1", "state_dir"),
    (BASE.replace('role = "l2"', 'role = "l1"\nregion = "west"'), "l2-a", "nodes.l2-a.role"),
    (BASE.replace('[nodes.origin]\nrole = "origin"',
                  '[nodes.origin]\nrole = "origin"\ncontent_cache_control = "no-store"'), "origin",
     "nodes.origin.content_cache_control"),
    (BASE.replace("127.0.94.5:8053", "127.0.94.6:8053"), "dns", "dns.listen"),
    (BASE.replace('cdn_zone = "cdn.example.net"', 'cdn_zone = "cdn.example.net"\nadmin_allow = ["10.0.0.0/8"]'),
     "dns", "dns.admin_allow"),
])
def test_what_needs_a_restart_is_named_by_key(new: str, member: str, key: str) -> None:
    problems = reload.restart_needed(parse(BASE), parse(new), member)
    assert [p.key for p in problems] == [key]
    assert problems[0].source == "topo.toml"
    assert "restart" in problems[0].problem and "changed from" in problems[0].problem


def test_a_listen_change_names_both_addresses() -> None:
    new = parse(BASE.replace("127.0.94.31:8080", "127.0.94.39:8080"))
    [problem] = reload.restart_needed(parse(BASE), new, "l1")
    assert str(problem) == ("topo.toml: nodes.l1.listen: changed from 127.0.94.31:8080 to 127.0.94.39:8080; "
                            "a running process cannot take that: restart it")


@pytest.mark.parametrize("new", [
    BASE,
    BASE + '[sites.news]\nhosts = ["news.example.com"]\norigin = "http://127.0.94.11:8080"\n',
    BASE + L2_B,                                                             # a new parent, "all" takes it
    l1_with('parents = ["l2-a"]\nparent_weights = { l2-a = 3.0 }'),
    l1_with("parent_fall = 5\nparent_rise = 1\nupstream_deadline = 5\nupstream_max_conns = 8"),
    l1_with("keepalive_timeout = 5\nmax_connections = 10\nmax_inflight = 3\nstream_threshold = 1024"),
    l1_with('access_log = "off"\naccess_log_format = "json"'),
    BASE.replace('"127.0.95.0/24" = "east"', '"127.0.95.0/24" = "west"'),   # coverage
    BASE.replace("lat = 40.71", "lat = 41.0"),                               # a region moves
    BASE.replace('cdn_zone = "cdn.example.net"', 'cdn_zone = "cdn.example.net"\nttl = 5\nanswers = 1'),
], ids=["same", "site", "l2", "parents", "upstream", "limits", "access_log", "coverage", "region", "dns"])
def test_everything_else_is_taken_running(new: str) -> None:
    for member in ("origin", "l2-a", "l1", "dns"):
        assert reload.restart_needed(parse(BASE), parse(new), member) == [], member


def test_a_node_or_the_scheduler_gone_from_the_topology_is_refused() -> None:
    without_l1 = BASE.replace('[nodes.l1]\nrole = "l1"\nregion = "east"\nlisten = "127.0.94.31:8080"\n'
                              'admin = "127.0.94.31:8091"\n', "")
    [gone] = reload.restart_needed(parse(BASE), parse(without_l1), "l1")
    assert (gone.key, gone.problem) == ("nodes.l1", "this node is no longer in the topology; stop it instead")
    [gone] = reload.restart_needed(parse(BASE), parse(BASE[:BASE.index("[dns]")]), "dns")
    assert gone.key == "dns"


def test_changes_are_summed_up_for_the_log() -> None:
    new = parse(BASE.replace('"127.0.95.0/24" = "east"', '"127.0.95.0/24" = "west"\n"10.0.0.0/8" = "east"')
                .replace('region = "east"\nlisten', 'region = "west"\nlisten')
                + L2_B + '[sites.news]\nhosts = ["news.example.com"]\norigin = "http://127.0.94.11:8080"\n')
    assert reload.describe_changes(parse(BASE), new) == \
        "sites +news; nodes +l2-b ~l1; coverage +10.0.0.0/8 ~127.0.95.0/24"
    assert reload.describe_changes(parse(BASE), parse(BASE)) == "no changes"
    assert reload.describe_changes(parse(BASE), parse(BASE.replace("ttl", "ttl").replace(
        'cdn_zone = "cdn.example.net"', 'cdn_zone = "cdn.example.net"\nttl = 5'))) == "dns ~"


# --------------------------------------------------------------------------- watching


A, B, C = (1, 10, 100, 5), (1, 11, 100, 6), (1, 11, 120, 7)


@pytest.mark.parametrize(("seen", "reloads"), [
    ([A, A, A], [False, False, False]),                    # nothing changes
    ([B, B, B], [False, True, False]),                     # a change, reported once it looked the same twice
    ([B, C, C, C], [False, False, True, False]),           # still being written: wait until it settles
    ([None, None, B, B], [False, False, False, True]),     # missing mid-swap: wait for it, never report it
    ([None, A, A], [False, False, False]),                 # back as it was: nothing to do
    ([B, B, A, A], [False, True, False, True]),            # changed back after a reload: reload again
])
def test_the_watcher_reloads_once_a_change_has_settled(seen: list, reloads: list[bool]) -> None:
    settle = Settle(A)
    assert [settle.observe(s) for s in seen] == reloads


# --------------------------------------------------------------------------- health carried over


def test_parent_health_carries_over_for_parents_that_stay() -> None:
    health = ParentHealth(["l2-a", "l2-b"], fall=2, rise=2)
    health.failure("l2-a")
    health.failure("l2-a")                 # down
    health.failure("l2-b")                 # one failure, still up
    again = health.carried_over(["l2-a", "l2-c"], fall=3, rise=1)
    assert again.state() == {"l2-a": {"up": False, "fails": 2, "oks": 0},
                             "l2-c": {"up": True, "fails": 0, "oks": 0}}
    assert (again.fall, again.rise) == (3, 1)
    assert again.success("l2-a") is True   # the new rise applies
    assert health.state()["l2-a"]["up"] is False    # the old state is left alone


def edge(name: str, url: str) -> Edge:
    return Edge(name, ipaddress.ip_address("127.0.94.31"), "east", 0.0, 0.0, url, rdata=None)


def test_scheduler_health_carries_over_for_edges_that_stay() -> None:
    a, b = edge("l1-a", "http://127.0.94.31:8091/healthz"), edge("l1-b", "http://127.0.94.32:8091/healthz")
    checker = HealthChecker([a, b], config.HealthCheck(fall=1))
    down = EdgeHealth().observe(ProbeResult(False, error="refused"), rise=2, fall=1, now=1.0)
    checker.states = {"l1-a": down, "l1-b": down}
    moved = edge("l1-b", "http://127.0.94.39:8091/healthz")      # the same name, somewhere else
    checker.retarget([edge("l1-a", a.health_url), moved, edge("l1-c", "http://127.0.94.33:8091/healthz")],
                     config.HealthCheck(interval=0.5))
    assert {name: (s.up, s.probed) for name, s in checker.snapshot.items()} == {
        "l1-a": (False, True), "l1-b": (True, False), "l1-c": (True, False)}
    assert checker.check.interval == 0.5


# --------------------------------------------------------------------------- the Reloader, with real files


@pytest.fixture
def topology_file(tmp_path: Path) -> Path:
    path = tmp_path / "topo.toml"
    path.write_text(BASE)
    return path


def reloader_for(path: Path, member: str = "l1") -> reload.Reloader:
    topology, sha256, mtime = reload.read(path)
    return reload.Reloader(path, member, topology, sha256, mtime)


async def test_a_good_file_is_applied_and_counted(topology_file: Path) -> None:
    reloader = reloader_for(topology_file)
    applied: list[config.Topology] = []

    async def apply(topology: config.Topology) -> None:
        applied.append(topology)

    registry = CollectorRegistry()
    reloader.attach(apply, registry)
    first = reloader.version
    topology_file.write_text(BASE + L2_B)
    assert await reloader.reload() is True
    assert [t.node("l1").parents for t in applied] == [("l2-a", "l2-b")]
    assert reloader.version.generation == first.generation + 1 == 2
    assert reloader.version.sha256 != first.sha256 and reloader.topology is applied[0]
    assert reloader.status()["last_reload_error"] is None
    assert registry.get_sample_value("edge_config_last_reload_successful") == 1


@pytest.mark.parametrize(("text", "logged"), [
    (BASE.replace('role = "l2"', 'role = "l3"'),
     "config error: {file}: nodes.l2-a.role: expected one of origin, l2, l1, got 'l3'"),
    (BASE.replace("127.0.94.31:8080", "127.0.94.39:8080"),
     "config error: {file}: nodes.l1.listen: changed from 127.0.94.31:8080 to 127.0.94.39:8080; "
     "a running process cannot take that: restart it"),
    ("[sites", "config error: {file}: (syntax): "),
], ids=["invalid", "listen", "syntax"])
async def test_a_refused_file_changes_nothing_and_says_why(topology_file: Path, caplog, text: str,
                                                           logged: str) -> None:
    reloader = reloader_for(topology_file)
    applied = []

    async def apply(topology: config.Topology) -> None:
        applied.append(topology)

    registry = CollectorRegistry()
    reloader.attach(apply, registry)
    before = reloader.version
    topology_file.write_text(text)
    with caplog.at_level(logging.ERROR, logger="edge.reload"):
        assert await reloader.reload() is False
    assert applied == [] and reloader.version == before
    expected = logged.format(file=topology_file)
    assert any(expected in r.getMessage() and "still running generation 1" in r.getMessage()
               for r in caplog.records), caplog.text
    assert expected.removeprefix("config error: ") in reloader.status()["last_reload_error"]
    assert registry.get_sample_value("edge_config_last_reload_successful") == 0
    # Fixed, it is taken.
    topology_file.write_text(BASE)
    assert await reloader.reload() is True and reloader.status()["last_reload_error"] is None


async def test_what_the_node_would_refuse_at_start_is_refused_for_it_alone(topology_file: Path,
                                                                          tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    bad_log = f'access_log = "{tmp_path / "a-file" / "l1.log"}"'
    reloader = reloader_for(topology_file, member="l1")

    async def apply(topology: config.Topology) -> None:
        pass

    reloader.attach(apply)
    topology_file.write_text(BASE.replace('role = "l2"', f'role = "l2"\n{bad_log}'))
    assert await reloader.reload() is True          # l2-a's log is l2-a's business, on its own host
    topology_file.write_text(l1_with(bad_log))
    assert await reloader.reload() is False
    assert reloader.last_error.startswith(f"{topology_file}: nodes.l1.access_log: ")


async def test_a_failure_while_applying_is_a_refusal(topology_file: Path) -> None:
    reloader = reloader_for(topology_file)

    async def apply(topology: config.Topology) -> None:
        raise OSError(13, "cannot open access log '/x': Permission denied")

    reloader.attach(apply)
    assert await reloader.reload() is False
    assert reloader.version.generation == 1 and "Permission denied" in reloader.last_error


async def test_requests_while_reloading_fold_into_one_more_reload(topology_file: Path) -> None:
    reloader = reloader_for(topology_file)
    started, release = asyncio.Event(), asyncio.Event()
    seen: list[tuple[str, ...]] = []

    async def apply(topology: config.Topology) -> None:
        seen.append(tuple(n.name for n in topology.nodes))
        started.set()
        await release.wait()

    reloader.request()                     # before attach: kept, then run by attach
    reloader.attach(apply)
    await asyncio.wait_for(started.wait(), 5)
    topology_file.write_text(BASE + L2_B)  # written while the first reload runs
    for _ in range(3):
        reloader.request()
    release.set()
    async with asyncio.timeout(5):
        while reloader.version.generation < 3:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert reloader.version.generation == 3           # one reload, then exactly one more
    assert seen[-1][-1] == "l2-b"                      # the last file written is the one applied
    await reloader.close()


# --------------------------------------------------------------------------- the scheduler, through its transport


def test_scheduler_reload_answers_from_the_new_topology_through_the_answer_cache() -> None:
    from edge.scheduler.service import Scheduler
    before = parse(BASE)
    after = parse(BASE.replace('"127.0.95.0/24" = "east"', '"127.0.95.0/24" = "west"')
                  .replace('cdn_zone = "cdn.example.net"', 'cdn_zone = "cdn.example.net"\nttl = 5')
                  + '[sites.news]\nhosts = ["news.example.com"]\norigin = "http://127.0.94.10:8080"\n'
                  + '[nodes.l1-w]\nrole = "l1"\nregion = "west"\nlisten = "127.0.94.32:8080"\n'
                    'admin = "127.0.94.32:8091"\n')
    scheduler = Scheduler(before)
    client = ipaddress.ip_address("127.0.95.7")

    def ask(name: str, rdtype: str = "A") -> dns.message.Message:
        wire = dns.message.make_query(name, rdtype).to_wire()
        return dns.message.from_wire(scheduler.server.handle_udp(wire, str(client)))

    for _ in range(2):                      # the second answer comes from the transport's answer cache
        assert ask("news.example.com").rcode() == dns.rcode.NXDOMAIN
        assert [r.address for r in ask("www.example.com").answer[-1]] == ["127.0.94.31"]
        assert ask("example.com", "SOA").answer[0][0].minimum == 30
    scheduler.reload(after)
    # An answer with no edge in it is rendered anew too: the SOA carries the new TTL.
    assert ask("example.com", "SOA").answer[0][0].minimum == 5
    news = ask("news.example.com")
    assert news.rcode() == dns.rcode.NOERROR
    assert str(news.answer[0][0].target) == "news.example.com.cdn.example.net."
    # The client's block is in the west now: the west L1 first, then the east one.
    assert [r.address for r in ask("www.example.com").answer[-1]] == ["127.0.94.32", "127.0.94.31"]
    assert set(scheduler.metrics.up_by_edge) == {"l1", "l1-w"}
