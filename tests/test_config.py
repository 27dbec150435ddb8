"""The topology loader: the default loads, and every mistake names the file, the key and the problem."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from edge import config
from tests.cluster import REPO

MINIMAL = """
[sites.example]
hosts = ["www.example.com"]
origin = "http://127.0.0.10:8080"
[nodes.origin]
role = "origin"
listen = "127.0.0.10:8080"
admin = "127.0.0.10:8091"
[nodes.l2-a]
role = "l2"
listen = "127.0.2.1:8080"
admin = "127.0.2.1:8091"
[nodes.l1]
role = "l1"
listen = "127.0.1.1:8080"
admin = "127.0.1.1:8091"
"""


def test_default_topology_is_the_documented_one():
    topology = config.load()

    def nodes(t: config.Topology) -> list[config.Node]:
        # Paths in the file are relative to it, in the built-in copy to the working directory
        # (as state_dir): both name edge up's throw-away CA in their own state dir.
        assert all(n.parent_ca in (None, t.state_dir / "tls" / "ca.pem") for n in t.nodes)
        return [replace(n, parent_ca=None) for n in t.nodes]

    assert nodes(config.load(REPO / "deploy" / "local.toml")) == nodes(topology)
    roles = {n.name: (n.role, str(n.listen), str(n.admin)) for n in topology.nodes}
    assert roles == {
        "origin": ("origin", "127.0.0.10:8080", "127.0.0.10:8091"),
        "l2-a": ("l2", "127.0.2.1:8080", "127.0.2.1:8091"),
        "l2-b": ("l2", "127.0.2.2:8080", "127.0.2.2:8091"),
        "l1-east": ("l1", "127.0.1.1:8080", "127.0.1.1:8091"),
        "l1-west": ("l1", "127.0.1.2:8080", "127.0.1.2:8091"),
    }
    assert topology.node("l1-east").parents == ("l2-a", "l2-b")
    assert str(topology.dns.listen) == "127.0.5.1:8053"
    assert topology.dns.answers == 2          # the nearest healthy L1, then the fallback
    assert topology.sites[0].cdn_name == "www.example.com.cdn.example.net"


def test_minimal_topology_defaults():
    topology = config.parse(MINIMAL, "t.toml", Path("/srv"))
    l1 = topology.node("l1")
    assert l1.parents == ("l2-a",) and l1.parent_policy.go_direct
    assert (l1.parent_policy.deadline, l1.parent_policy.max_conns, l1.parent_policy.queue) == (20.0, 512, 1024)
    assert topology.cache_dir(l1) == Path("/srv/var/cache/l1")
    assert topology.dns is None


@pytest.mark.parametrize(
    ("replace", "by", "key", "problem"),
    [
        ('role = "l1"', 'role = "edge"', "nodes.l1.role", "expected one of origin, l2, l1"),
        ('listen = "127.0.1.1:8080"', 'listen = "127.0.1.1"', "nodes.l1.listen", "expected HOST:PORT"),
        ('listen = "127.0.1.1:8080"', 'listen = "bad_host!:80"', "nodes.l1.listen",
         "expected an IP address or a host name, got 'bad_host!'"),
        ('listen = "127.0.1.1:8080"', 'listen = "[edge.example]:80"', "nodes.l1.listen",
         "expected an IP address or a host name"),
        ('[nodes.origin]', '[dns]\nlisten = "dns.example.net:53"\nadmin = "127.0.5.1:8091"\nzones = ["example.com"]\n'
                           'cdn_zone = "cdn.example.net"\n[nodes.origin]',
         "dns.listen", "expected an IP address (the NS record's glue carries it), got 'dns.example.net'"),
        ('admin = "127.0.1.1:8091"', 'admin = "127.0.2.1:8091"', "nodes.l1.admin", "already used by nodes.l2-a.admin"),
        ('role = "l1"', 'role = "l1"\nparents = ["l2-z"]', "nodes.l1.parents", "'l2-z' is not an l2 node"),
        ('role = "l1"', 'role = "l1"\nmemory_size = "lots"', "nodes.l1.memory_size", "expected a size"),
        ('role = "l1"', 'role = "l1"\nparent_fall = 0', "nodes.l1.parent_fall", "at least 1"),
        ('role = "l1"', 'role = "l1"\nupstream_deadline = 0', "nodes.l1.upstream_deadline", "at least 0.01"),
        ('role = "l1"', 'role = "l1"\nupstream_deadline = "20s"', "nodes.l1.upstream_deadline", "expected a number"),
        ('role = "l1"', 'role = "l1"\nupstream_max_conns = 0', "nodes.l1.upstream_max_conns", "at least 1"),
        ('role = "l1"', 'role = "l1"\nupstream_max_conns = 2.5', "nodes.l1.upstream_max_conns", "whole number"),
        ('role = "l1"', 'role = "l1"\nupstream_queue = -1', "nodes.l1.upstream_queue", "at least 0"),
        ('role = "l1"', 'role = "l1"\ncolour = "red"', "nodes.l1.colour", "unknown key"),
        ('role = "l2"', 'role = "l2"\nparents = ["l1"]', "nodes.l2-a.parents", "only an l1 node has parents"),
        ('origin = "http://127.0.0.10:8080"', 'origin = "ftp://x"', "sites.example.origin", "http://"),
        ('hosts = ["www.example.com"]', 'hosts = []', "sites.example.hosts", "non-empty list"),
        ('hosts = ["www.example.com"]', 'hosts = ["bad host!"]', "sites.example.hosts", "not a valid DNS name"),
        ('role = "l1"', 'role = "l1"\nregion = "mars"', "nodes.l1.region", "unknown region 'mars'"),
        ('[nodes.origin]', '[coverage]\n"10.0.0.0/33" = "east"\n[nodes.origin]', 'coverage."10.0.0.0/33"', "not a CIDR"),
        ('role = "l1"', 'role = "l1"\naccess_log_format = "xml"', "nodes.l1.access_log_format",
         "expected one of combined, json"),
        ('role = "l1"', 'role = "l1"\nmax_request_line = "100B"', "nodes.l1.max_request_line", "at least 256 bytes"),
        ('role = "l1"', 'role = "l1"\nmax_headers = 2', "nodes.l1.max_headers", "at least 8"),
        ('role = "l1"', 'role = "l1"\nclient_header_timeout = "10s"', "nodes.l1.client_header_timeout",
         "expected a number"),
        ('role = "l1"', 'role = "l1"\nmax_connections = 0', "nodes.l1.max_connections", "at least 1"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nstale_if_unreachable = -1',
         "sites.example.stale_if_unreachable", "at least 0"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nset_cookie = "keep"',
         "sites.example.set_cookie", "expected never or strip"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nignore_query_params = "utm"',
         "sites.example.ignore_query_params", "expected a list of parameter names"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\naliases = "yes"',
         "sites.example.aliases", "expected true or false"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\ndefault_ttl = "5m"',
         "sites.example.default_ttl", "expected a number"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nstale_if_error = 1.5',
         "sites.example.stale_if_error", "whole number"),
        # allowed_methods: tokens the front knows, case-sensitive, GET and HEAD always, never CONNECT
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = "GET"',
         "sites.example.allowed_methods", "expected a list of methods"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = ["GET", "HEAD", 1]',
         "sites.example.allowed_methods", "expected a list of methods"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = ["GET", "HEAD", "FOO"]',
         "sites.example.allowed_methods", "'FOO' is not a method the HTTP front knows"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = ["GET", "HEAD", "post"]',
         "sites.example.allowed_methods", "did you mean 'POST'? (methods are case-sensitive"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = ["GET", "POST"]',
         "sites.example.allowed_methods", "HEAD must be allowed"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = []',
         "sites.example.allowed_methods", "GET must be allowed"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = ["GET", "HEAD", "CONNECT"]',
         "sites.example.allowed_methods", "CONNECT asks for a tunnel"),
        ('hosts = ["www.example.com"]', 'hosts = ["www.example.com"]\nallowed_methods = ["GET", "HEAD", "GET"]',
         "sites.example.allowed_methods", "listed twice"),
        # admin_allow: a non-empty list of addresses or CIDR blocks, topology-wide or per listener
        ('[sites.example]', 'admin_allow = "10.0.0.0/8"\n[sites.example]', "admin_allow", "non-empty list"),
        ('[sites.example]', 'admin_allow = []\n[sites.example]', "admin_allow", "leave the key out"),
        ('[sites.example]', 'admin_allow = ["10.0.0.0/33"]\n[sites.example]', "admin_allow",
         "not an address or CIDR block: '10.0.0.0/33'"),
        ('[sites.example]', 'admin_allow = ["monitoring.example.com"]\n[sites.example]', "admin_allow",
         "not an address or CIDR block"),
        ('[sites.example]', 'admin_allow = [10]\n[sites.example]', "admin_allow", "expected an address or CIDR"),
        ('role = "l1"', 'role = "l1"\nadmin_allow = ["10.1.2.3/8"]', "nodes.l1.admin_allow",
         "did you mean '10.0.0.0/8'?"),
        ('role = "l1"', 'role = "l1"\nadmin_allow = ["2001:db8::/129"]', "nodes.l1.admin_allow", "not an address"),
        # workers: cache nodes only, a whole number of processes or "auto"
        ('role = "l1"', 'role = "l1"\nworkers = 0', "nodes.l1.workers", "expected 1 to 256 processes, got 0"),
        ('role = "l1"', 'role = "l1"\nworkers = 2.5', "nodes.l1.workers", 'whole number of processes or "auto"'),
        ('role = "l1"', 'role = "l1"\nworkers = "all"', "nodes.l1.workers", 'whole number of processes or "auto"'),
        ('role = "l1"', 'role = "l1"\nworkers = true', "nodes.l1.workers", 'whole number of processes or "auto"'),
        ('role = "origin"', 'role = "origin"\nworkers = 2', "nodes.origin.workers", "only a cache node"),
        # slice_size: off, or 64KiB to 64MiB
        ('origin = "http://127.0.0.10:8080"', 'origin = "http://127.0.0.10:8080"\nslice_size = "1KiB"',
         "sites.example.slice_size", "from 64KiB to 64MiB"),
        ('origin = "http://127.0.0.10:8080"', 'origin = "http://127.0.0.10:8080"\nslice_size = "1GiB"',
         "sites.example.slice_size", "from 64KiB to 64MiB"),
        ('origin = "http://127.0.0.10:8080"', 'origin = "http://127.0.0.10:8080"\nslice_size = "big"',
         "sites.example.slice_size", "expected a size"),
    ],
)
def test_mistakes_name_file_key_and_problem(replace, by, key, problem):
    assert replace in MINIMAL
    with pytest.raises(config.ConfigError) as err:
        config.parse(MINIMAL.replace(replace, by, 1), "topo.toml", Path("."))
    assert (err.value.source, err.value.key) == ("topo.toml", key)
    assert problem in err.value.problem
    assert str(err.value).startswith(f"topo.toml: {key}: ")


def test_node_addresses_may_be_host_names():
    """Other nodes reach a node by name where its address is not known in advance (a Kubernetes
    Service); the process itself binds with `edge run --listen-host`."""
    text = (MINIMAL.replace('listen = "127.0.2.1:8080"', 'listen = "Edge-L2-A.edge.svc.cluster.local.:8080"')
            .replace('admin = "127.0.2.1:8091"', 'admin = "edge-l2-a.edge.svc.cluster.local:8091"'))
    l2 = config.parse(text, "t.toml", Path(".")).node("l2-a")
    assert (str(l2.listen), l2.admin.url) == ("edge-l2-a.edge.svc.cluster.local:8080",
                                              "http://edge-l2-a.edge.svc.cluster.local:8091")


def test_workers_unset_auto_or_a_number():
    assert config.parse(MINIMAL, "t.toml", Path(".")).node("l1").workers is None     # edge run: CPUs; edge up: 1
    for value, parsed in (('"auto"', 0), ("1", 1), ("4", 4)):
        text = MINIMAL.replace('role = "l1"', f'role = "l1"\nworkers = {value}')
        assert config.parse(text, "t.toml", Path(".")).node("l1").workers == parsed


def test_front_limits_and_access_log_defaults_and_settings():
    l1 = config.parse(MINIMAL, "t.toml", Path("/srv")).node("l1")
    assert l1.limits == config.FrontLimits() and (l1.access_log, l1.access_log_format) == ("-", "combined")
    text = MINIMAL.replace('role = "l1"', 'role = "l1"\nmax_header_bytes = "16KiB"\nkeepalive_timeout = 5\n'
                                          'drain_timeout = 0\naccess_log = "log/l1.log"\naccess_log_format = "json"')
    l1 = config.parse(text, "t.toml", Path("/srv")).node("l1")
    assert (l1.limits.max_header_bytes, l1.limits.keepalive_timeout, l1.limits.drain_timeout) == (16384, 5.0, 0.0)
    assert (l1.access_log, l1.access_log_format) == ("/srv/log/l1.log", "json")    # relative to the file


def test_allowed_methods_default_to_rfc_9110_without_connect_and_trace():
    site = config.parse(MINIMAL, "t.toml", Path(".")).sites[0]
    assert site.allowed_methods == ("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS")
    assert site.allow_field == "GET, HEAD, POST, PUT, DELETE, OPTIONS"
    text = MINIMAL.replace('hosts = ["www.example.com"]',
                           'hosts = ["www.example.com"]\nallowed_methods = ["HEAD", "GET", "PATCH", "PURGE", "TRACE"]')
    site = config.parse(text, "t.toml", Path(".")).sites[0]
    assert site.allow_field == "HEAD, GET, PATCH, PURGE, TRACE"      # the operator's order, in Allow


def test_parser_methods_are_exactly_what_the_front_parses():
    """PARSER_METHODS is what config accepts; llhttp must parse each (and refuse what is not listed)."""
    import httptools

    def parses(method: str) -> bool:
        parser = httptools.HttpRequestParser(object())
        try:
            parser.feed_data(method.encode() + b" /x HTTP/1.1\r\nHost: a\r\n\r\n")
        except httptools.HttpParserUpgrade:
            return True         # CONNECT: parsed, then a tunnel is asked for
        except httptools.HttpParserError:
            return False
        return True

    assert [m for m in sorted(config.PARSER_METHODS) if not parses(m)] == []
    assert [m for m in ("FOO", "FROBNICATE", "DESCRIBE", "PRI", "get") if parses(m)] == []
    assert set(config.DEFAULT_ALLOWED_METHODS) <= config.PARSER_METHODS


def test_admin_allow_topology_wide_with_per_listener_override():
    import ipaddress
    dns = ('[dns]\nlisten = "127.0.5.1:8053"\nadmin = "127.0.5.1:8091"\nzones = ["example.com"]\n'
           'cdn_zone = "cdn.example.net"\n')
    topology = config.parse(MINIMAL + dns, "t.toml", Path("."))
    assert {n.admin_allow for n in topology.nodes} == {None} and topology.dns.admin_allow is None
    text = ('admin_allow = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]\n'
            + MINIMAL.replace('role = "l1"', 'role = "l1"\nadmin_allow = ["127.0.0.1"]')
            + dns + 'admin_allow = ["127.0.0.0/8"]\n')
    topology = config.parse(text, "t.toml", Path("."))
    wide = tuple(map(ipaddress.ip_network, ("10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32")))
    assert topology.node("l2-a").admin_allow == topology.node("origin").admin_allow == wide
    assert topology.node("l1").admin_allow == (ipaddress.ip_network("127.0.0.1/32"),)
    assert topology.dns.admin_allow == (ipaddress.ip_network("127.0.0.0/8"),)


def test_site_lookup_ignores_port_and_case_and_falls_back_to_default():
    text = MINIMAL + '[sites.catchall]\nhosts = ["other.example.com"]\norigin = "http://127.0.0.10:8080"\ndefault = true\n'
    topology = config.parse(text, "t.toml", Path("."))
    assert topology.site_for_host("WWW.EXAMPLE.COM:8080").name == "example"
    assert topology.site_for_host("nobody.example.org").name == "catchall"
    assert config.parse(MINIMAL, "t.toml", Path(".")).site_for_host("nobody.example.org") is None


def test_cli_prints_one_line_and_exits_2_on_a_bad_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('role = "l1"', 'role = "l3"'))
    result = subprocess.run([sys.executable, "-m", "edge", "run", "l1", "--config", str(bad)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"edge: config error: {bad}: nodes.l1.role: "
                                     "expected one of origin, l2, l1, got 'l3'")


def test_cli_names_a_node_that_cannot_bind(tmp_path):
    import socket
    topo = tmp_path / "t.toml"
    topo.write_text(MINIMAL.replace("127.0.0.10", "127.0.36.10"))
    with socket.socket() as busy:
        busy.bind(("127.0.36.10", 8080))
        busy.listen()
        result = subprocess.run([sys.executable, "-m", "edge", "run", "origin", "--config", str(topo)],
                                capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 1
    assert "edge: origin: cannot start:" in result.stderr and "Traceback" not in result.stderr


def test_cli_names_an_access_log_it_cannot_open(tmp_path):
    topo = tmp_path / "t.toml"
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    topo.write_text(MINIMAL.replace("127.0.1.1", "127.0.36.31").replace(
        'role = "l1"', f'role = "l1"\naccess_log = "{blocker}/access.log"'))
    result = subprocess.run([sys.executable, "-m", "edge", "run", "l1", "--config", str(topo)],
                            capture_output=True, text=True, cwd=REPO, timeout=30)
    assert result.returncode == 1
    assert f"{blocker}/access.log" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------- edge check: what a node would refuse

DNS_TABLE = ('[dns]\nlisten = "127.0.94.5:8053"\nadmin = "127.0.94.5:8091"\nzones = ["example.com"]\n'
             'cdn_zone = "cdn.example.net"\n')


def _checked(tmp_path: Path, text: str) -> list[tuple[str, str]]:
    from edge import checks
    topology = config.parse(f'state_dir = "{tmp_path / "state"}"\n' + text, "topo.toml", tmp_path)
    return [(p.key, p.problem) for p in checks.problems(topology)]


def test_check_finds_nothing_wrong_with_a_good_topology(tmp_path):
    assert _checked(tmp_path, MINIMAL + DNS_TABLE) == []
    assert _checked(tmp_path, MINIMAL.replace('role = "l1"', 'role = "l1"\naccess_log = "logs/l1.log"')) == []


@pytest.mark.parametrize(("edit", "key", "problem"), [
    # The scheduler hands an L1's address to clients: a wildcard is refused by `edge run dns`.
    (lambda t, d: t.replace('listen = "127.0.1.1:8080"', 'listen = "0.0.0.0:8080"') + DNS_TABLE,
     "nodes.l1.listen", "must be a specific address, not 0.0.0.0"),
    # ... and answers addresses, never names.
    (lambda t, d: t.replace('listen = "127.0.1.1:8080"', 'listen = "edge.example.net:8080"') + DNS_TABLE,
     "nodes.l1.listen", "it must be an IP address, not the name 'edge.example.net'"),
    (lambda t, d: t.replace('role = "l1"', f'role = "l1"\ncache_dir = "{d / "a-file"}"'),
     "nodes.l1.cache_dir", "a-file' is a file, not a directory"),
    (lambda t, d: t.replace('role = "l1"', f'role = "l1"\ncache_dir = "{d / "a-file" / "cache"}"'),
     "nodes.l1.cache_dir", "a-file', which is a file"),
    (lambda t, d: t.replace('role = "l1"', f'role = "l1"\naccess_log = "{d / "a-file" / "access.log"}"'),
     "nodes.l1.access_log", "a-file' is a file, not a directory"),
    (lambda t, d: t.replace('role = "l1"', f'role = "l1"\naccess_log = "{d}"'),
     "nodes.l1.access_log", "is a directory"),
    (lambda t, d: t.replace('role = "origin"', f'role = "origin"\ncontent_dir = "{d / "a-file"}"'),
     "nodes.origin.content_dir", "the origin serves files from it: '"),
])
def test_check_finds_what_a_node_would_refuse_at_start(tmp_path, edit, key, problem):
    (tmp_path / "a-file").write_text("not a directory")
    found = _checked(tmp_path, edit(MINIMAL, tmp_path))
    assert len(found) == 1, found
    assert found[0][0] == key and problem in found[0][1], found


def test_check_names_state_dir_when_the_cache_directory_comes_from_it(tmp_path):
    from edge import checks
    (tmp_path / "a-file").write_text("")
    topology = config.parse(f'state_dir = "{tmp_path / "a-file"}"\n' + MINIMAL, "topo.toml", tmp_path)
    assert {(p.key, p.problem.split(":")[0]) for p in checks.problems(topology)} == {
        ("state_dir", "cache directory of l2-a"), ("state_dir", "cache directory of l1")}


def _edge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=30)


def test_edge_check_and_edge_run_refuse_the_same_wildcard_l1(tmp_path):
    topo = tmp_path / "t.toml"
    topo.write_text(MINIMAL.replace("127.0.1.1", "0.0.0.0").replace("127.0.2.1", "127.0.94.21")
                    .replace("127.0.0.10", "127.0.94.10") + DNS_TABLE)
    check = _edge("check", "--config", str(topo))
    assert check.returncode == 2 and check.stdout == ""
    line = (f"edge: config error: {topo}: nodes.l1.listen: the DNS scheduler hands this address to clients: "
            "it must be a specific address, not 0.0.0.0")
    assert check.stderr.strip() == line
    run = _edge("run", "dns", "--config", str(topo))          # refused before it binds anything
    assert (run.returncode, run.stderr.strip()) == (2, line)


def test_edge_check_and_edge_run_refuse_the_same_cache_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    topo = tmp_path / "t.toml"
    topo.write_text(MINIMAL.replace("127.0.1.1", "127.0.94.31").replace(
        'role = "l1"', f'role = "l1"\ncache_dir = "{blocker}"'))
    check = _edge("check", "--config", str(topo))
    assert check.returncode == 2
    assert check.stderr.strip() == (f"edge: config error: {topo}: nodes.l1.cache_dir: cache directory of l1: "
                                    f"{str(blocker)!r} is a file, not a directory")
    run = _edge("run", "l1", "--config", str(topo))           # fails creating the store, before it binds
    assert run.returncode == 1 and f"cache directory {blocker}" in run.stderr and "Traceback" not in run.stderr
    blocker.unlink()
    check = _edge("check", "--config", str(topo))
    assert check.returncode == 0 and "l1" in check.stdout, check.stderr


DNS = ('[dns]\nlisten = "127.0.5.1:8053"\nadmin = "127.0.5.1:8091"\nzones = ["example.com"]\n'
       'cdn_zone = "cdn.example.net"\n')


def test_dns_cache_tcp_and_rate_limit_defaults_and_settings():
    dns = config.parse(MINIMAL + DNS, "t.toml", Path(".")).dns
    assert (dns.cache_size, dns.tcp_idle_timeout, dns.tcp_max_connections, dns.tcp_max_per_network) == (
        32 * 2**20, 10.0, 512, 32)
    assert (dns.rrl.rate, dns.rrl.slip, dns.rrl.table_size) == (1000, 2, 65536)   # on by default
    text = MINIMAL + DNS + ('cache_size = "1MiB"\ntcp_idle_timeout = 2.5\ntcp_max_connections = 64\n'
                            'tcp_max_per_network = 8\n[dns.rrl]\nrate = 0\nslip = 1\ntable_size = 10\n')
    dns = config.parse(text, "t.toml", Path(".")).dns
    assert (dns.cache_size, dns.tcp_idle_timeout, dns.tcp_max_connections, dns.tcp_max_per_network) == (
        2**20, 2.5, 64, 8)
    assert (dns.rrl.rate, dns.rrl.slip, dns.rrl.table_size) == (0, 1, 10)


@pytest.mark.parametrize(("extra", "key", "problem"), [
    ('cache_size = "big"\n', "dns.cache_size", "expected a size such as 64MiB"),
    ("tcp_idle_timeout = 0\n", "dns.tcp_idle_timeout", "at least 0.1"),
    ("tcp_max_connections = 0\n", "dns.tcp_max_connections", "at least 1"),
    ("tcp_max_per_network = 1.5\n", "dns.tcp_max_per_network", "whole number"),
    ("tcp_max_connections = 10\ntcp_max_per_network = 11\n", "dns.tcp_max_per_network",
     "11 is more than dns.tcp_max_connections (10)"),
    ("rrl = 5\n", "dns.rrl", "expected a table"),
    ("[dns.rrl]\nrate = -1\n", "dns.rrl.rate", "at least 0"),
    ("[dns.rrl]\nrate = 0.5\n", "dns.rrl.rate", "whole number"),
    ("[dns.rrl]\nslip = -1\n", "dns.rrl.slip", "at least 0"),
    ("[dns.rrl]\ntable_size = 0\n", "dns.rrl.table_size", "at least 1"),
    ("[dns.rrl]\nwindow = 15\n", "dns.rrl.window", "unknown key"),
])
def test_dns_cache_tcp_and_rate_limit_mistakes_name_file_key_and_problem(extra, key, problem):
    with pytest.raises(config.ConfigError) as caught:
        config.parse(MINIMAL + DNS + extra, "t.toml", Path("."))
    assert caught.value.source == "t.toml" and caught.value.key == key
    assert problem in caught.value.problem


def test_slice_size_is_off_by_default_and_read_as_a_size():
    assert config.parse(MINIMAL, "topo.toml", Path(".")).sites[0].slice_size == 0
    text = MINIMAL.replace('origin = "http://127.0.0.10:8080"', 'origin = "http://127.0.0.10:8080"\nslice_size = "4MiB"', 1)
    assert config.parse(text, "topo.toml", Path(".")).sites[0].slice_size == 4 * 2**20
