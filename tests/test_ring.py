"""Tests for edge.upstream.ring: placement by hand, then balance and movement over many keys."""

from __future__ import annotations

import itertools
import math
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from edge.upstream.ring import HashRing, default_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY_COUNT = 100_000
EQUAL = {"l2-a": 1.0, "l2-b": 1.0, "l2-c": 1.0}


def digits_hash(data: bytes) -> int:
    """Virtual node "N-i" hashes to N + 10*i and a key "K" to K, so owners are worked out by hand.

    The same trick as groupcache's consistenthash test: with parents "2", "4"
    and "6" and three virtual nodes each, the ring's points are
    2, 4, 6, 12, 14, 16, 22, 24, 26.
    """
    text = data.decode()
    name, sep, replica = text.partition("-")
    return int(name) + 10 * int(replica) if sep else int(text)


@pytest.fixture(scope="module")
def keys() -> list[str]:
    rng = random.Random(20240611)
    return [f"www.example.com/obj/{rng.getrandbits(64):016x}" for _ in range(KEY_COUNT)]


@pytest.fixture(scope="module")
def equal_owners(keys: list[str]) -> list[str | None]:
    ring = HashRing(EQUAL)
    return [ring.owner(key) for key in keys]


# ----------------------------------------------------------------------- by hand

@pytest.mark.parametrize(("key", "expected"), [
    ("2", ["2", "4", "6"]),     # exactly on a point: that point owns it
    ("0", ["2", "4", "6"]),     # before the first point
    ("11", ["2", "4", "6"]),    # next point 12
    ("13", ["4", "6", "2"]),    # next point 14
    ("15", ["6", "2", "4"]),    # next point 16, then 22, then 24
    ("23", ["4", "6", "2"]),    # next point 24, then 26, then wrap to 2
    ("27", ["2", "4", "6"]),    # past the last point: wraps to 2
])
def test_lookup_by_hand(key: str, expected: list[str]) -> None:
    ring = HashRing({"2": 1, "4": 1, "6": 1}, vnodes=3, hash_fn=digits_hash)
    assert ring.lookup(key) == expected
    assert ring.owner(key) == expected[0]


@pytest.mark.parametrize(("key", "before", "after"), [
    ("2", "2", "2"),
    ("7", "2", "8"),     # 8 now sits between 6 and 12
    ("11", "2", "2"),
    ("17", "2", "8"),    # 18 now sits between 16 and 22
    ("23", "4", "4"),
    ("27", "2", "8"),    # 28 now catches what wrapped to 2
])
def test_adding_a_parent_by_hand(key: str, before: str, after: str) -> None:
    three = HashRing({"2": 1, "4": 1, "6": 1}, vnodes=3, hash_fn=digits_hash)
    four = HashRing({"2": 1, "4": 1, "6": 1, "8": 1}, vnodes=3, hash_fn=digits_hash)
    assert three.owner(key) == before
    assert four.owner(key) == after


@pytest.mark.parametrize(("key", "expected"), [
    ("3", "4"),     # "4" keeps its points 4 and 14 ...
    ("13", "4"),
    ("15", "2"),    # ... but lost 24, so 15..22 goes to 22
    ("23", "2"),    # and past 22 wraps to 2
])
def test_weight_scales_virtual_nodes_by_hand(key: str, expected: str) -> None:
    # round(3 * 2/3) = 2 points for "4": 4 and 14.  "2" keeps 2, 12, 22.
    ring = HashRing({"2": 1, "4": 2 / 3}, vnodes=3, hash_fn=digits_hash)
    assert ring.owner(key) == expected


def test_a_tiny_weight_still_gets_one_point() -> None:
    ring = HashRing({"2": 1, "4": 0.001}, vnodes=3, hash_fn=digits_hash)
    assert ring.owner("3") == "4"       # its single point, 4
    assert ring.owner("13") == "2"      # no point 14 for it


@pytest.mark.parametrize("order", list(itertools.permutations(["c", "a", "b"])))
def test_equal_points_are_broken_by_name(order: tuple[str, ...]) -> None:
    ring = HashRing(dict.fromkeys(order, 1.0), vnodes=4, hash_fn=lambda data: 7)
    assert ring.lookup("anything") == ["a", "b", "c"]
    assert ring.owner("anything") == "a"


def test_empty_ring() -> None:
    ring = HashRing({})
    assert ring.lookup("k") == []
    assert ring.owner("k") is None
    assert ring.nodes == ()


@pytest.mark.parametrize("weight", [0, -1, -0.5, math.nan, math.inf])
def test_invalid_weight_is_named(weight: float) -> None:
    with pytest.raises(ValueError, match="'l2-b'"):
        HashRing({"l2-a": 1.0, "l2-b": weight})


def test_invalid_vnodes() -> None:
    with pytest.raises(ValueError, match="vnodes"):
        HashRing(EQUAL, vnodes=0)


def test_lookup_result_is_the_callers_to_change() -> None:
    ring = HashRing(EQUAL)
    first = ring.lookup("k")
    first.clear()
    assert sorted(ring.lookup("k")) == sorted(EQUAL)


@pytest.mark.parametrize(("data", "digest"), [
    # Known answers for BLAKE2b with an 8-byte digest: placement must never
    # change between releases, or every L2 cache would be reshuffled.
    (b"", "e4a6a0577479b2b4"),
    (b"abc", "d8bb14d833d59559"),
])
def test_default_hash_known_answers(data: bytes, digest: str) -> None:
    assert default_hash(data) == int(digest, 16)


def test_placement_is_the_same_in_other_processes() -> None:
    # Different hash seeds would change hash(); they must not change the ring.
    probe = ("from edge.upstream.ring import HashRing; "
             "ring = HashRing({'l2-a': 1.0, 'l2-b': 2.0, 'l2-c': 1.0}); "
             "print([ring.lookup(f'/k/{i}') for i in range(200)])")
    here = HashRing({"l2-a": 1.0, "l2-b": 2.0, "l2-c": 1.0})
    expected = str([here.lookup(f"/k/{i}") for i in range(200)])
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed,
               "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                             text=True, check=True, timeout=30)
        assert out.stdout.strip() == expected


# ----------------------------------------------------------------------- many keys

def test_equal_parents_share_keys_evenly(equal_owners: list[str | None]) -> None:
    counts = Counter(equal_owners)
    assert set(counts) == set(EQUAL)
    for name in EQUAL:
        share = counts[name] / KEY_COUNT
        assert abs(share - 1 / 3) <= 0.1 / 3, (name, share)


def test_adding_a_parent_moves_keys_only_onto_it(keys: list[str], equal_owners: list[str | None]) -> None:
    four = HashRing({**EQUAL, "l2-d": 1.0})
    moved = 0
    for key, before in zip(keys, equal_owners):
        after = four.owner(key)
        if after != before:
            assert after == "l2-d", (key, before, after)
            moved += 1
    assert moved / KEY_COUNT <= 0.30
    # The new parent takes about its fair quarter, not a sliver.
    assert abs(moved / KEY_COUNT - 1 / 4) <= 0.1 / 4


def test_removing_a_parent_moves_only_its_keys(keys: list[str], equal_owners: list[str | None]) -> None:
    full = HashRing(EQUAL)
    without_b = HashRing({"l2-a": 1.0, "l2-c": 1.0})
    for key, before in zip(keys, equal_owners):
        after = without_b.owner(key)
        if before != "l2-b":
            assert after == before, key
        # The new owner is the one the full ring named as the next to try.
        assert after == next(name for name in full.lookup(key) if name != "l2-b"), key


def test_failover_order_is_the_ring_without_the_failed_parent(keys: list[str]) -> None:
    full = HashRing({**EQUAL, "l2-d": 1.0})
    for failed in full.nodes:
        smaller = HashRing({name: 1.0 for name in full.nodes if name != failed})
        for key in keys[:5000]:
            assert smaller.lookup(key) == [n for n in full.lookup(key) if n != failed], (failed, key)


def test_configuration_order_does_not_matter(keys: list[str]) -> None:
    weights = {"l2-a": 1.0, "l2-b": 2.0, "l2-c": 0.5, "l2-d": 1.0}
    rings = [HashRing({name: weights[name] for name in order})
             for order in itertools.permutations(weights)]
    reference = rings[0]
    for ring in rings[1:]:
        assert ring.nodes == reference.nodes == ("l2-a", "l2-b", "l2-c", "l2-d")
        for key in keys[:2000]:
            assert ring.lookup(key) == reference.lookup(key), key


def share_bound(points: int, total_points: int, sigmas: float = 4.0) -> float:
    """How far a parent's share of keys may honestly stray from points / total_points.

    A parent holding k of N independent, uniform points owns the sum of k
    spacings, which is Beta(k, N - k): standard deviation sqrt(p(1-p)/(N+1))
    with p = k/N.  Sampling KEY_COUNT keys adds sqrt(p(1-p)/KEY_COUNT).
    Four standard deviations of both is a 1-in-15,000 miss per parent for an
    unlucky choice of names, and still far tighter than the error of ignoring
    weights (the weight-2 parent would own 1/3 instead of 1/2: 8 sigma off).
    """
    p = points / total_points
    return sigmas * math.sqrt(p * (1 - p) / (total_points + 1) + p * (1 - p) / KEY_COUNT)


def test_weight_two_gets_about_twice_the_share(keys: list[str]) -> None:
    weights = {"l2-a": 2.0, "l2-b": 1.0, "l2-c": 1.0}
    vnodes = 160
    ring = HashRing(weights, vnodes=vnodes)
    counts = Counter(ring.owner(key) for key in keys)
    points = {name: round(vnodes * weight) for name, weight in weights.items()}
    total_points = sum(points.values())
    for name in weights:
        expected = points[name] / total_points      # 1/2, 1/4, 1/4
        share = counts[name] / KEY_COUNT
        assert abs(share - expected) <= share_bound(points[name], total_points), (name, share, expected)
    # The heavy parent's own share is tight enough to hold to the 10% rule too.
    assert abs(counts["l2-a"] / KEY_COUNT - 1 / 2) <= 0.1 / 2


def test_lookup_names_every_parent_once(keys: list[str]) -> None:
    ring = HashRing({"l2-a": 1.0, "l2-b": 3.0, "l2-c": 0.2, "l2-d": 1.0, "l2-e": 1.0})
    owners = Counter()
    for key in keys[:20000]:
        order = ring.lookup(key)
        assert len(order) == len(set(order)) == 5, key
        assert set(order) == set(ring.nodes), key
        assert order[0] == ring.owner(key), key
        owners[order[0]] += 1
    assert set(owners) == set(ring.nodes)   # every parent owns some keys
