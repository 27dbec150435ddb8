"""The scheduler's status page in a real headless Chromium, against a real `edge up`.

The topology is deploy/local.toml moved to 127.0.96.1xx (origin, two L2s, two
L1s, the scheduler), run by `edge up` as an operator would.  Chromium (Debian's
package, driven over its DevTools protocol: tests/browser.py) opens the page on
the scheduler's admin listener; the test reads the DOM the page's own script
built, so what is asserted is what a person would see.  Screenshots are written
under the test's temporary directory and their paths printed in the test output.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import dns.asyncquery
import dns.message
import pytest

from tests.browser import Chromium
from tests.cluster import EdgeUp, moved_local_topology

MOVED = {"127.0.0.10": "127.0.96.110", "127.0.2.1": "127.0.96.121", "127.0.2.2": "127.0.96.122",
         "127.0.1.1": "127.0.96.131", "127.0.1.2": "127.0.96.132", "127.0.5.1": "127.0.96.105"}
SCHEDULER_ADMIN = "http://127.0.96.105:8091"
DNS_SERVER = ("127.0.96.105", 8053)
EAST_CLIENT, WEST_CLIENT = "127.0.11.1", "127.0.12.1"       # the default topology's coverage blocks
NODES = {"origin", "l2-a", "l2-b", "l1-east", "l1-west"}
RED = "rgb(211, 47, 47)"                                    # --down in style.css
GREEN = "rgb(46, 125, 50)"                                  # --up


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeUp]:
    workdir = tmp_path_factory.mktemp("status-page")
    cluster = EdgeUp.start(workdir, moved_local_topology(MOVED, workdir / "var"))
    try:
        yield cluster
    finally:
        cluster.stop()


def overview() -> dict:
    with urllib.request.urlopen(f"{SCHEDULER_ADMIN}/api/overview", timeout=5) as reply:
        return json.load(reply)


async def eventually(check, deadline: float, what: str) -> float:
    """Await `check()` until it is true; the seconds it took; fail after `deadline`."""
    started = time.monotonic()
    while time.monotonic() - started < deadline:
        if await check():
            return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {deadline}s: {what}")


def test_page_and_assets_are_served_from_the_package_with_a_strict_policy(up: EdgeUp) -> None:
    assert f"Status page: {SCHEDULER_ADMIN}/\n" in up.output.read_text()     # where `edge up` says it is
    with urllib.request.urlopen(f"{SCHEDULER_ADMIN}/", timeout=5) as reply:
        page = reply.read().decode()
        assert reply.headers["Content-Type"].startswith("text/html")
        assert reply.headers["Content-Security-Policy"].startswith("default-src 'self'")
    # Every script and style the page loads is its own (relative), none from another host.
    assert 'src="ui/app.js"' in page and 'href="ui/style.css"' in page and "http" not in page.split("<body>")[0]
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        with urllib.request.urlopen(f"{SCHEDULER_ADMIN}/ui/{name}", timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith(kind)
            assert reply.read() == (Path(__file__).parent.parent / "edge/scheduler/ui" / name).read_bytes()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{SCHEDULER_ADMIN}/ui/..%2fservice.py", timeout=5)
    assert refused.value.code == 404


async def send_traffic(http: aiohttp.ClientSession) -> None:
    """One miss and nineteen hits on l1-east, five misses on l1-west; DNS questions from both regions."""
    for i in range(20):
        async with http.get("http://127.0.96.131:8080/gen/page-hot?size=2000&cc=max-age%3D600",
                            headers={"Host": "www.example.com"}) as reply:
            assert reply.status == 200 and len(await reply.read()) == 2000
    for i in range(5):
        async with http.get(f"http://127.0.96.132:8080/gen/page-cold-{i}?size=500",
                            headers={"Host": "www.example.com"}) as reply:
            assert reply.status == 200
    for source in (EAST_CLIENT, WEST_CLIENT):
        query = dns.message.make_query("www.example.com", "A")
        response = await dns.asyncquery.udp(query, DNS_SERVER[0], port=DNS_SERVER[1], source=source, timeout=3)
        assert response.answer


NODE_STATES = """JSON.stringify({
  map: Object.fromEntries([...document.querySelectorAll('#map .dot')].map(
    e => [e.dataset.node, [e.dataset.state, getComputedStyle(e).fill]])),
  cards: Object.fromEntries([...document.querySelectorAll('#nodes .node')].map(
    e => [e.dataset.node, [e.dataset.state, getComputedStyle(e).borderLeftColor, e.dataset.rps || null,
                           e.dataset.hitRatio || null,
                           e.querySelector('svg.chart.rps') ? Number(e.querySelector('svg.chart.rps').dataset.points) : 0]])),
  sites: [...document.querySelectorAll('#sites tbody tr')].map(e => [e.dataset.site, e.cells[2].textContent]),
  answers: Object.fromEntries([...document.querySelectorAll('#answers .answers')].map(
    e => [e.dataset.region, [...e.querySelectorAll('tr')].map(r => r.cells[3].textContent)])),
  problem: document.getElementById('problem').hidden ? null : document.getElementById('problem').textContent,
})"""


async def test_status_page_in_chromium_shows_every_node_and_a_killed_node_turns_red(
        up: EdgeUp, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The scheduler must have scraped l1-east before the traffic, so a rate covers it.
    await eventually(lambda: _async(len(node(overview(), "l1-east")["series"]["t"]) >= 1), 20,
                     "two scrapes of l1-east by the scheduler")
    async with aiohttp.ClientSession() as http:
        await send_traffic(http)

    def shot(path: Path) -> None:
        with capsys.disabled():
            print(f"\nstatus page screenshot: {path}")

    async with Chromium(tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        page = await browser.new_page()
        await page.goto(f"{SCHEDULER_ADMIN}/")

        async def state() -> dict:
            return json.loads(await page.evaluate(NODE_STATES))

        async def healthy_with_traffic() -> bool:
            seen = await state()
            return (set(seen["map"]) == NODES and set(seen["cards"]) == NODES
                    and all(v == ["up", GREEN] for v in seen["map"].values())
                    and float(seen["cards"]["l1-east"][3] or 0) >= 0.9
                    and all(n in seen["answers"] for n in ("east", "west"))
                    and bool(seen["answers"]["east"]) and bool(seen["answers"]["west"]))
        await eventually(healthy_with_traffic, 20, "every node green on the map, l1-east's hit ratio, DNS answers")
        seen = await state()
        for name, (node_state, border, _, _, points) in seen["cards"].items():
            assert (node_state, border) == ("up", GREEN), name
            assert points >= 1, f"{name}: no request-rate chart"
        assert 0.9 <= float(seen["cards"]["l1-east"][3]) <= 1.0      # 19 hits of 20 lookups
        assert seen["sites"][0][0] == "example" and float(seen["sites"][0][1]) > 0
        # The scheduler's last answers per region: nearest edge first.
        assert seen["answers"]["east"][0].startswith("l1-east") and seen["answers"]["west"][0].startswith("l1-west")
        assert seen["problem"] is None
        shot(await page.screenshot(tmp_path / "status-healthy.png"))

        # A crash of an L1 (its health is the scheduler's own verdict: fall 2 probes 1 s apart,
        # 1 s timeout) and of an L2 (the page's own /healthz probe, every second).
        up.kill("l1-east")
        up.kill("l2-b")

        async def red() -> bool:
            seen = await state()
            return all(seen["map"][n] == ["down", RED] and seen["cards"][n][:2] == ["down", RED]
                       for n in ("l1-east", "l2-b"))
        took = await eventually(red, 15, "l1-east and l2-b red on the map and their cards")
        # Fall time of the L1 (2 x 1 s + 1 s timeout), one scrape round and one page poll (1 s each).
        assert took <= 6.0, f"took {took:.1f}s to turn red"
        seen = await state()
        for name in NODES - {"l1-east", "l2-b"}:
            assert seen["map"][name] == ["up", GREEN], name
        shot(await page.screenshot(tmp_path / "status-killed.png"))
        assert page.console_errors() == []


async def _async(value: bool) -> bool:
    return value


def node(document: dict, name: str) -> dict:
    (found,) = [n for n in document["nodes"] if n["name"] == name]
    return found
