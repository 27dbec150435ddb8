"""Response rate limiting, pure: token buckets per network, slip, the fixed table; the clock is passed in."""

from __future__ import annotations

import ipaddress

import pytest

from edge.scheduler.rrl import ANSWER, DROP, SLIP, RateLimiter, network_key


def net(address: str) -> int:
    ip = ipaddress.ip_address(address)
    return network_key(ip.version, int(ip))


NETWORKS = [
    # (a, b, same network?)
    ("192.0.2.1", "192.0.2.254", True),
    ("192.0.2.1", "192.0.3.1", False),
    ("2001:db8:0:ff::1", "2001:db8:0:0::2", True),      # one /56
    ("2001:db8:0:100::1", "2001:db8:0:0::2", False),    # the next /56
    ("0.0.0.1", "::1", False),                          # IPv4 and IPv6 never share a bucket
    ("0.1.0.1", "::1:0:0:0:0:1", False),
]


@pytest.mark.parametrize("a,b,same", NETWORKS)
def test_networks_are_v4_slash_24_and_v6_slash_56(a: str, b: str, same: bool) -> None:
    assert (net(a) == net(b)) == same


def run(limiter: RateLimiter, network: int, times: list[float]) -> list[int]:
    return [limiter.check(network, t) for t in times]


def test_a_burst_gets_rate_answers_then_every_slip_th_is_truncated() -> None:
    limiter = RateLimiter(rate=5, slip=2, table_size=64)
    verdicts = run(limiter, net("192.0.2.1"), [0.0] * 12)
    assert verdicts == [ANSWER] * 5 + [DROP, SLIP, DROP, SLIP, DROP, SLIP, DROP]
    assert (limiter.slipped, limiter.dropped) == (3, 4)


@pytest.mark.parametrize("slip,expected", [
    (0, [DROP] * 4),                   # 0: drop them all
    (1, [SLIP] * 4),                   # 1: truncate them all (Knot's default)
    (3, [DROP, DROP, SLIP, DROP]),
])
def test_slip_values(slip: int, expected: list[int]) -> None:
    limiter = RateLimiter(rate=1, slip=slip, table_size=8)
    assert run(limiter, 7, [0.0] * 5) == [ANSWER] + expected


def test_tokens_come_back_at_the_rate_and_never_beyond_one_second_of_them() -> None:
    limiter = RateLimiter(rate=10, slip=0, table_size=8)
    network = net("198.51.100.9")
    assert run(limiter, network, [0.0] * 11) == [ANSWER] * 10 + [DROP]
    assert run(limiter, network, [0.25] * 3) == [ANSWER, ANSWER, DROP]         # 2.5 tokens in 0.25 s
    assert run(limiter, network, [100.0] * 11) == [ANSWER] * 10 + [DROP]       # idle for long: still 10
    # Steady traffic at the rate is always answered.
    assert run(limiter, network, [200.0 + i / 10 for i in range(50)]) == [ANSWER] * 50


def test_one_network_over_its_limit_does_not_touch_another() -> None:
    limiter = RateLimiter(rate=3, slip=2, table_size=1024)
    noisy, quiet = net("203.0.113.5"), net("198.51.100.5")
    assert run(limiter, noisy, [1.0] * 10).count(ANSWER) == 3
    assert run(limiter, quiet, [1.0] * 3) == [ANSWER] * 3


def test_the_table_is_fixed_and_a_newcomer_takes_over_a_slot() -> None:
    limiter = RateLimiter(rate=2, slip=0, table_size=4)
    for i in range(1000):                                  # a thousand networks, four slots
        limiter.check(i, 0.0)
    assert limiter.networks() == 4
    # Network 4 shares slot 0 with network 0: it replaced it, so 0 starts over with a full bucket.
    assert run(limiter, 0, [0.0] * 3) == [ANSWER, ANSWER, DROP]


@pytest.mark.parametrize("rate,slip,size", [(0, 2, 10), (-1, 2, 10), (10, -1, 10), (10, 2, 0)])
def test_bad_settings_are_refused(rate: float, slip: int, size: int) -> None:
    with pytest.raises(ValueError):
        RateLimiter(rate, slip, size)
