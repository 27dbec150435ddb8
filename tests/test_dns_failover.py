"""An edge's death costs a client at most one connection attempt: real processes on 127.0.80.x.

The scheduler takes a dead edge out of its answers within the fall time,
but a client keeps the answer it already has for the TTL.  So every answer
names the nearest healthy edge first and the next nearest after it, and a
client that tries the next address when a connect fails (curl, browsers)
gets through on its first request.  Here: origin .10, L1 l1-1 (east) .31 and
l1-2 (west) .32, the scheduler on .5:8053; clients come from 127.0.81.x
(east) and 127.0.82.x (west).  The nearest L1 is killed with SIGKILL, and
curl is handed the answer the client got before, as a resolver would have
cached it.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import dns.message
import dns.query
import dns.rdatatype
import pytest

from tests.cluster import EAST_WEST_REGIONS, TRAFFIC_PORT, Cluster

NET = "80"
DNS_HOST, DNS_PORT = "127.0.80.5", 8053
EAST_CLIENT, WEST_CLIENT = "127.0.81.1", "127.0.82.1"
EAST_EDGE, WEST_EDGE = "127.0.80.31", "127.0.80.32"
CURL = shutil.which("curl") or "/usr/bin/curl"

SCHEDULER = f"""
{EAST_WEST_REGIONS}[coverage]
"127.0.81.0/24" = "east"
"127.0.82.0/24" = "west"
[dns]
listen = "{DNS_HOST}:{DNS_PORT}"
admin = "{DNS_HOST}:8091"
zones = ["example.com"]
cdn_zone = "cdn.example.net"
[dns.health]
interval = 0.2
timeout = 0.5
"""


@pytest.fixture
def cdn(tmp_path):
    """Origin, two L1s in two regions and the scheduler with its default answer count and TTL."""
    cluster = Cluster.create(tmp_path, NET, l1=2, l1_regions=("east", "west"), extra=SCHEDULER)
    try:
        cluster.start("origin", "l1-1", "l1-2", "dns")
        yield cluster
    finally:
        cluster.stop_all()


def addresses(source: str, tcp: bool = False) -> list[str]:
    """The A records a client at `source` is given for www.example.com, in wire order."""
    query = dns.message.make_query("www.example.com", "A")
    ask = dns.query.tcp if tcp else dns.query.udp
    response = ask(query, DNS_HOST, timeout=3, port=DNS_PORT, source=source)
    return [rr.address for rrset in response.answer if rrset.rdtype == dns.rdatatype.A for rr in rrset]


def curl(answer: list[str], path: str) -> subprocess.CompletedProcess:
    """One curl run with the scheduler's answer as its resolved addresses, tried in that order."""
    return subprocess.run(
        [CURL, "-sS", "-v", "--max-time", "10", "-o", "/dev/null",
         "-w", "%{http_code} %{remote_ip} %{num_connects}\n",
         "--resolve", f"www.example.com:{TRAFFIC_PORT}:{','.join(answer)}",
         f"http://www.example.com:{TRAFFIC_PORT}{path}"],
        capture_output=True, text=True, timeout=20)


def test_curl_version_takes_several_addresses_in_resolve() -> None:
    # --resolve with a list of addresses needs curl 7.59; older curls reject the list.
    version = re.match(r"curl (\d+)\.(\d+)", subprocess.run([CURL, "--version"], capture_output=True,
                                                           text=True).stdout)
    assert version and (int(version[1]), int(version[2])) >= (7, 59), version


def test_each_region_gets_its_nearest_edge_first_and_the_other_after_it(cdn: Cluster) -> None:
    for tcp in (False, True):
        assert addresses(EAST_CLIENT, tcp) == [EAST_EDGE, WEST_EDGE]
        assert addresses(WEST_CLIENT, tcp) == [WEST_EDGE, EAST_EDGE]


def test_with_the_nearest_edge_killed_curl_gets_through_on_its_first_try(cdn: Cluster) -> None:
    answer = addresses(EAST_CLIENT)          # what the client's resolver holds for the TTL
    assert answer[0] == EAST_EDGE
    before = curl(answer, "/gen/failover-warm?size=100")
    assert before.returncode == 0 and before.stdout.split() == ["200", EAST_EDGE, "1"], before.stderr

    cdn.node("l1-1").kill()
    done = curl(answer, "/gen/failover-after-kill?size=1234")
    assert done.returncode == 0, done.stderr
    status, remote, connects = done.stdout.split()
    assert (status, remote) == ("200", WEST_EDGE), done.stderr
    # The dead edge was tried first and refused; the same run went on to the next address.
    tried = re.findall(r"Trying (\d+\.\d+\.\d+\.\d+):", done.stderr)
    assert tried == [EAST_EDGE, WEST_EDGE], done.stderr
    assert "< Via: 1.1 l1-2" in done.stderr, done.stderr
