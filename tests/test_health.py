"""Tests for edge.upstream.health: the rise/fall table, then the prober against real servers."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web

from edge.upstream.health import ActiveProber, ParentHealth
from edge.upstream.http1 import Address, Http1Client

OK, FAIL = True, False      # an event: a good or a failed request/probe
UP, DOWN = True, False      # the state after it

# ----------------------------------------------------------------------- state machine

STATE_MACHINE_CASES = [
    # (fall, rise, events, state after each event)
    pytest.param(3, 2, [FAIL, FAIL], [UP, UP], id="fall=3: two failures stay up"),
    pytest.param(3, 2, [FAIL, FAIL, FAIL], [UP, UP, DOWN], id="fall=3: the third failure marks down"),
    pytest.param(3, 2, [FAIL, FAIL, OK, FAIL, FAIL], [UP] * 5, id="a success resets the failure streak"),
    pytest.param(1, 1, [FAIL], [DOWN], id="fall=1: one failure marks down"),
    pytest.param(1, 2, [FAIL, OK, OK], [DOWN, DOWN, UP], id="rise=2: two successes bring it up"),
    pytest.param(1, 2, [FAIL, OK, FAIL, OK, OK], [DOWN, DOWN, DOWN, DOWN, UP],
                 id="rise=2: a failure in between resets the success streak"),
    pytest.param(1, 1, [FAIL, OK], [DOWN, UP], id="rise=1: one success brings it up"),
    pytest.param(1, 3, [FAIL, FAIL, FAIL], [DOWN] * 3, id="failures while down change nothing"),
    pytest.param(2, 2, [OK, OK, OK], [UP] * 3, id="successes while up change nothing"),
    pytest.param(2, 2, [FAIL, FAIL, OK, OK, FAIL, OK, FAIL], [UP, DOWN, DOWN, UP, UP, UP, UP],
                 id="a full cycle, then the streak starts over"),
    pytest.param(2, 2, [FAIL, FAIL, OK, OK, FAIL, FAIL], [UP, DOWN, DOWN, UP, UP, DOWN],
                 id="down again after coming back"),
]


@pytest.mark.parametrize(("fall", "rise", "events", "states"), STATE_MACHINE_CASES)
def test_rise_and_fall(fall: int, rise: int, events: list[bool], states: list[bool]) -> None:
    health = ParentHealth(["l2-a", "l2-b"], fall=fall, rise=rise)
    changes: list[tuple[str, bool]] = []
    health.on_change = lambda name, up: changes.append((name, up))
    expected_changes = []
    was_up = True
    for event, expected in zip(events, states, strict=True):
        changed = health.success("l2-a") if event is OK else health.failure("l2-a")
        assert health.is_up("l2-a") is expected
        assert changed is (was_up is not expected)
        if changed:
            expected_changes.append(("l2-a", expected))
        was_up = expected
    assert changes == expected_changes
    # The other parent is untouched.
    assert health.is_up("l2-b")
    assert health.state()["l2-b"] == {"up": True, "fails": 0, "oks": 0}
    assert health.up() == (["l2-a", "l2-b"] if states[-1] else ["l2-b"])


@pytest.mark.parametrize(("events", "fails", "oks"), [
    ([], 0, 0),
    ([FAIL, FAIL], 2, 0),
    ([FAIL, FAIL, OK], 0, 1),
    ([OK, OK, FAIL], 1, 0),
    ([FAIL, FAIL, FAIL, FAIL, FAIL], 5, 0),
])
def test_state_reports_streaks(events: list[bool], fails: int, oks: int) -> None:
    health = ParentHealth(["l2-a"], fall=3, rise=2)
    for event in events:
        health.success("l2-a") if event is OK else health.failure("l2-a")
    assert health.state() == {"l2-a": {"up": health.is_up("l2-a"), "fails": fails, "oks": oks}}


def test_up_keeps_the_given_order() -> None:
    health = ParentHealth(["l2-c", "l2-a", "l2-b"], fall=1, rise=1)
    health.failure("l2-a")
    assert health.up() == ["l2-c", "l2-b"]
    assert health.names == ("l2-c", "l2-a", "l2-b")


def test_unknown_parent_is_named() -> None:
    health = ParentHealth(["l2-a"], fall=1, rise=1)
    for call in (health.is_up, health.failure, health.success):
        with pytest.raises(KeyError, match="l2-x"):
            call("l2-x")


@pytest.mark.parametrize(("names", "fall", "rise"), [
    (["l2-a"], 0, 1),
    (["l2-a"], 1, 0),
    (["l2-a", "l2-a"], 1, 1),
])
def test_invalid_construction(names: list[str], fall: int, rise: int) -> None:
    with pytest.raises(ValueError):
        ParentHealth(names, fall=fall, rise=rise)


# ----------------------------------------------------------------------- prober, real servers

INTERVAL = 0.05


class SwitchableHealthz:
    """A parent's admin /healthz whose answer the test sets; it records every answer it gave."""

    def __init__(self) -> None:
        self.status = 200
        self.glitches = 0               # answer 503 this many times, then `status` again
        self.answers: list[int] = []

    async def handle(self, request: web.Request) -> web.Response:
        if self.glitches:
            self.glitches -= 1
            status = 503
        else:
            status = self.status
        self.answers.append(status)
        return web.json_response({"status": "ok" if status == 200 else "down"}, status=status)

    def trailing(self, status: int) -> int:
        """How many of the latest answers in a row were `status`."""
        count = 0
        for answer in reversed(self.answers):
            if answer != status:
                break
            count += 1
        return count


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting until {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def session() -> AsyncIterator[Http1Client]:
    """The upstream client the probers share (a node's own, as in production)."""
    client = Http1Client(connect_timeout=2.0, read_timeout=2.0)
    yield client
    await client.close()


@pytest.fixture
def make_parent(aiohttp_server) -> Callable:
    async def make() -> tuple[SwitchableHealthz, str]:
        healthz = SwitchableHealthz()
        app = web.Application()
        app.router.add_get("/healthz", healthz.handle)
        server = await aiohttp_server(app, host="127.0.0.1")
        return healthz, str(server.make_url("/healthz"))
    return make


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A loopback port bound but never listening: connections are refused, and no one else can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/healthz"


@pytest.fixture
async def hung_url(aiohttp_server) -> AsyncIterator[str]:
    """A /healthz that never answers until the test ends."""
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="too late")

    app = web.Application()
    app.router.add_get("/healthz", handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    yield str(server.make_url("/healthz"))
    release.set()   # let the server shut down without waiting on the handler


@pytest.fixture
async def probers(session: Http1Client) -> AsyncIterator[list[ActiveProber]]:
    """Probers a test starts; all are closed at the end (before their session) even if the test fails."""
    started: list[ActiveProber] = []
    yield started
    for prober in started:
        await prober.close()


async def test_down_after_fall_probes_and_up_after_rise(make_parent, session, probers) -> None:
    parent, url = await make_parent()
    health = ParentHealth(["l2-a"], fall=3, rise=2)
    # At each transition, note how many answers in a row caused it.
    transitions: list[tuple[bool, int]] = []
    health.on_change = lambda name, up: transitions.append((up, parent.trailing(200 if up else 503)))
    prober = ActiveProber(health, {"l2-a": url}, session, interval=INTERVAL, timeout=1.0)
    probers.append(prober)
    await prober.start()

    await wait_until(lambda: len(parent.answers) >= 2, "two probes were answered")
    assert health.is_up("l2-a")

    parent.status = 503
    await wait_until(lambda: not health.is_up("l2-a"), "the parent is marked down")
    assert transitions == [(DOWN, 3)]

    parent.status = 200
    await wait_until(lambda: health.is_up("l2-a"), "the parent is back up")
    assert transitions == [(DOWN, 3), (UP, 2)]


@pytest.mark.parametrize("glitches", [1, 2])
async def test_no_flapping_on_fewer_than_fall_failures(make_parent, session, probers, glitches: int) -> None:
    parent, url = await make_parent()
    health = ParentHealth(["l2-a"], fall=3, rise=2)
    transitions: list[tuple[str, bool]] = []
    health.on_change = lambda name, up: transitions.append((name, up))
    prober = ActiveProber(health, {"l2-a": url}, session, interval=INTERVAL, timeout=1.0)
    probers.append(prober)
    await prober.start()

    await wait_until(lambda: len(parent.answers) >= 1, "a first probe was answered")
    parent.glitches = glitches
    await wait_until(lambda: 503 in parent.answers and parent.trailing(200) >= 3,
                     "the glitch passed and three good probes followed")
    assert parent.answers.count(503) == glitches
    assert transitions == []
    assert health.state()["l2-a"]["up"] is True
    assert health.state()["l2-a"]["fails"] == 0


async def test_refused_and_hung_parents_go_down_healthy_stays_up(
        make_parent, refused_url, hung_url, session, probers) -> None:
    healthy, healthy_url = await make_parent()
    health = ParentHealth(["healthy", "refused", "hung"], fall=2, rise=2)
    transitions: list[tuple[str, bool]] = []
    health.on_change = lambda name, up: transitions.append((name, up))
    urls = {"healthy": healthy_url, "refused": refused_url, "hung": hung_url}
    # The hung parent is only found through the timeout; without it this never finishes.
    prober = ActiveProber(health, urls, session, interval=INTERVAL, timeout=0.2)
    probers.append(prober)
    await prober.start()

    await wait_until(lambda: health.up() == ["healthy"], "refused and hung are down")
    assert sorted(transitions) == [("hung", DOWN), ("refused", DOWN)]
    assert health.state()["refused"]["fails"] >= 2
    # Every round probed the healthy parent too, and it never wavered.
    assert len(healthy.answers) >= 2
    assert set(healthy.answers) == {200}


async def test_only_200_is_healthy(aiohttp_server, session, probers) -> None:
    statuses = [200, 204, 302, 404, 500, 503]

    def answer(status: int):
        async def handle(request: web.Request) -> web.Response:
            headers = {"Location": "/elsewhere"} if status == 302 else None
            return web.Response(status=status, headers=headers)
        return handle

    app = web.Application()
    for status in statuses:
        app.router.add_get(f"/{status}/healthz", answer(status))
    app.router.add_get("/elsewhere", answer(200))   # a redirect is not followed to a 200
    server = await aiohttp_server(app, host="127.0.0.1")
    names = [f"p{status}" for status in statuses]
    health = ParentHealth(names, fall=1, rise=1)
    urls = {f"p{status}": str(server.make_url(f"/{status}/healthz")) for status in statuses}
    prober = ActiveProber(health, urls, session, interval=INTERVAL, timeout=1.0)
    probers.append(prober)
    await prober.start()

    await wait_until(lambda: health.up() == ["p200"], "every non-200 parent is down")
    assert health.state()["p200"]["oks"] >= 1


async def test_a_failing_hook_does_not_stop_probing(make_parent, session, probers, caplog) -> None:
    parent, url = await make_parent()
    health = ParentHealth(["l2-a"], fall=1, rise=1)
    calls: list[bool] = []

    def broken_hook(name: str, up: bool) -> None:
        calls.append(up)
        raise RuntimeError("metrics exploded")

    health.on_change = broken_hook
    prober = ActiveProber(health, {"l2-a": url}, session, interval=INTERVAL, timeout=1.0)
    probers.append(prober)
    parent.status = 503
    with caplog.at_level(logging.ERROR, logger="edge.upstream.health"):
        await prober.start()
        await wait_until(lambda: not health.is_up("l2-a"), "the parent is marked down")
        parent.status = 200
        await wait_until(lambda: health.is_up("l2-a"), "the parent is back up")
    assert calls == [DOWN, UP]
    assert prober.running
    assert "parent probe round failed" in caplog.text


async def test_start_and_close(make_parent, session) -> None:
    parent, url = await make_parent()
    health = ParentHealth(["l2-a"], fall=1, rise=1)
    prober = ActiveProber(health, {"l2-a": url}, session, interval=INTERVAL, timeout=1.0)
    assert not prober.running
    await prober.start()
    try:
        assert prober.running
        with pytest.raises(RuntimeError):
            await prober.start()
        await wait_until(lambda: len(parent.answers) >= 1, "a probe was answered")
    finally:
        await prober.close()
    assert not prober.running
    await prober.close()   # a second close is harmless
    # The client belongs to the caller: it still sends requests.
    response = await session.request(Address.from_url(url), "GET", "/healthz", ())
    response.release()
    assert response.status == 200


async def test_probe_once_records_one_result_per_parent(make_parent, refused_url, session) -> None:
    parent, url = await make_parent()
    health = ParentHealth(["good", "bad"], fall=3, rise=1)
    prober = ActiveProber(health, {"good": url, "bad": refused_url}, session, interval=INTERVAL, timeout=1.0)
    await prober.probe_once()
    await prober.probe_once()
    assert health.state() == {"good": {"up": True, "fails": 0, "oks": 2},
                              "bad": {"up": True, "fails": 2, "oks": 0}}
    assert parent.answers == [200, 200]


async def test_parents_are_probed_concurrently(aiohttp_server, session) -> None:
    # Each /healthz answers only once both probes are in flight: probing one
    # parent after the other would leave the first waiting until its timeout.
    both_arrived = asyncio.Event()
    arrivals: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        arrivals.append(request.path)
        if len(arrivals) == 2:
            both_arrived.set()
        await both_arrived.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{parent}/healthz", handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    health = ParentHealth(["l2-a", "l2-b"], fall=1, rise=1)
    urls = {name: str(server.make_url(f"/{name}/healthz")) for name in health.names}
    prober = ActiveProber(health, urls, session, interval=INTERVAL, timeout=2.0)
    try:
        await prober.probe_once()
    finally:
        both_arrived.set()   # never leave a handler waiting at shutdown
    assert sorted(arrivals) == ["/l2-a/healthz", "/l2-b/healthz"]
    assert health.state() == {"l2-a": {"up": True, "fails": 0, "oks": 1},
                              "l2-b": {"up": True, "fails": 0, "oks": 1}}


@pytest.mark.parametrize(("urls", "interval", "timeout"), [
    ({"l2-x": "http://127.0.0.1:1/healthz"}, 1.0, 1.0),
    ({"l2-a": "http://127.0.0.1:1/healthz"}, 0, 1.0),
    ({"l2-a": "http://127.0.0.1:1/healthz"}, 1.0, 0),
])
async def test_invalid_prober(session, urls: dict[str, str], interval: float, timeout: float) -> None:
    with pytest.raises(ValueError):
        ActiveProber(ParentHealth(["l2-a"], fall=1, rise=1), urls, session, interval, timeout)
