"""The ban list, tag parsing and soft-purge staleness: pure logic, the clock passed in."""

from __future__ import annotations

import math

import pytest

from edge import policy
from edge.bans import BanList, BanListFull, Verdict
from edge.cachekey import VARIANT_SEPARATOR
from edge.surrogate import MAX_TAGS, parse_tags

KEY = "example|www.example.com|/img/a.png"
VARIANT = f"{KEY}{VARIANT_SEPARATOR}gen{VARIANT_SEPARATOR}accept-encoding=gzip"


@pytest.mark.parametrize("fields, tags", [
    ([("Surrogate-Key", "a b  c")], ("a", "b", "c")),
    ([("Cache-Tag", "a, b,c")], ("a", "b", "c")),
    ([("surrogate-key", "a b"), ("CACHE-TAG", "b,c"), ("Surrogate-Key", "d")], ("a", "b", "c", "d")),
    ([("Surrogate-Key", "Product-1 product-1")], ("Product-1", "product-1")),     # case-sensitive
    ([("Cache-Tag", "with space, ok")], ("ok",)),                                # a space is not in a tag
    ([("Cache-Tag", "x" * 1025 + ",y")], ("y",)),                                # too long: skipped
    ([("Cache-Tag", "caf\u00e9,z")], ("z",)),                                    # not ASCII: skipped
    ([("Content-Type", "a b")], ()),
])
def test_tags_from_surrogate_key_and_cache_tag(fields, tags):
    assert parse_tags(fields) == tags


def test_tags_are_capped_per_object():
    many = " ".join(f"t{i}" for i in range(MAX_TAGS + 10))
    assert len(parse_tags([("Surrogate-Key", many)])) == MAX_TAGS


@pytest.mark.parametrize("kind, value, key, tags, covered", [
    ("url", KEY, KEY, (), True),
    ("url", KEY, VARIANT, (), True),                     # every variant of the URL
    ("url", KEY, KEY + "x", (), False),                  # another URL with the same start
    ("prefix", "example|www.example.com|/img/", KEY, (), True),
    ("prefix", "example|www.example.com|/img/", VARIANT, (), True),
    ("prefix", "example|www.example.com|/css/", KEY, (), False),
    ("prefix", "example|static.example.com|/img/", KEY, (), False),   # another Host
    ("tag", "p1", KEY, ("p0", "p1"), True),
    ("tag", "p1", KEY, ("P1",), False),
])
def test_what_a_ban_covers(kind, value, key, tags, covered):
    bans = BanList()
    bans.add(kind, value, soft=False, now=100.0)
    # Requested before the ban: covered if it matches; after: never.
    assert (bans.check(key, tags, 99.0) is not None) is covered
    assert bans.check(key, tags, 100.0) is None
    assert bans.check(key, tags, 101.0) is None


def test_hard_wins_and_soft_is_stale_since_the_earliest_soft_ban():
    bans = BanList()
    bans.add("tag", "a", soft=True, now=10.0)
    bans.add("prefix", "example|", soft=True, now=20.0)
    assert bans.check(KEY, ("a",), 5.0) == Verdict(False, 10.0)
    assert bans.check(KEY, ("a",), 15.0) == Verdict(False, 20.0)    # the tag ban is older than it
    assert bans.check(KEY, (), 25.0) is None
    bans.add("url", KEY, soft=False, now=30.0)
    assert bans.check(KEY, ("a",), 5.0) == Verdict(True, 10.0)
    assert bans.check(KEY + "/other", ("a",), 5.0) == Verdict(False, 10.0)


def test_a_hard_ban_replaces_an_older_soft_one_and_readding_moves_the_time():
    bans = BanList()
    bans.add("tag", "a", soft=True, now=10.0)
    bans.add("tag", "a", soft=False, now=20.0)
    assert len(bans) == 1 and bans.check(KEY, ("a",), 15.0) == Verdict(True, None)
    again = bans.add("tag", "a", soft=False, now=30.0)
    assert len(bans) == 1 and again.time == 30.0 and bans.check(KEY, ("a",), 25.0) == Verdict(True, None)


def test_generation_and_newest_let_the_hit_path_skip_the_check():
    bans = BanList()
    assert (bans.generation, bans.newest) == (0, -math.inf)
    bans.add("tag", "a", soft=False, now=10.0)
    bans.add("tag", "b", soft=False, now=5.0)        # a clock step back does not lower newest
    assert (bans.generation, bans.newest) == (2, 10.0)


def test_bans_retire_once_applied_and_no_older_fetch_is_under_way():
    bans = BanList()
    a = bans.add("tag", "a", soft=False, now=10.0)
    b = bans.add("prefix", "example|", soft=True, now=20.0)
    assert bans.retire(None) == []                      # not applied yet
    applied = [(ban, ban.time) for ban in bans.pending()]
    bans.add("prefix", "example|", soft=True, now=25.0)  # re-added while the lurker ran
    bans.lurked(applied)
    assert (a.lurked, b.lurked) == (True, False)
    assert bans.retire(oldest_fetch=9.0) == []          # a fetch from before the ban may still store
    assert bans.retire(oldest_fetch=10.0) == [a]
    assert bans.newest == 25.0 and bans.summary() == {"live": 1, "pending": 1}
    bans.lurked([(b, 25.0)])
    assert bans.retire(None) == [b] and bans.newest == -math.inf and len(bans) == 0


def test_the_list_is_bounded():
    bans = BanList(limit=2)
    bans.add("tag", "a", soft=False, now=1.0)
    bans.add("tag", "b", soft=False, now=1.0)
    bans.add("tag", "a", soft=False, now=2.0)          # an existing ban: not a new one
    with pytest.raises(BanListFull):
        bans.add("tag", "c", soft=False, now=3.0)


@pytest.mark.parametrize("kind, value", [("tag", "has space"), ("tag", ""), ("tag", "a,b"), ("url", ""),
                                         ("host", "x")])
def test_bad_bans_are_refused(kind, value):
    with pytest.raises(ValueError):
        BanList().add(kind, value, soft=False, now=1.0)


def test_bans_survive_a_round_trip_and_come_back_unapplied():
    bans = BanList()
    bans.add("tag", "a", soft=True, now=10.5)
    bans.add("url", KEY, soft=False, now=11.0)
    bans.lurked([(ban, ban.time) for ban in bans.pending()])
    again = BanList()
    assert again.load(bans.to_list()) == 2
    assert again.summary() == {"live": 2, "pending": 2}
    assert again.check(KEY, ("a",), 10.0) == Verdict(True, 10.5)


@pytest.mark.parametrize("records", [{}, [1], [{"kind": "tag", "value": "a", "soft": 1, "time": 1.0}],
                                     [{"kind": "tag", "value": "a", "soft": False, "time": "1"}],
                                     [{"kind": "tag", "value": "a", "soft": False, "time": math.nan}]])
def test_a_malformed_ban_file_is_refused_whole(records):
    bans = BanList()
    with pytest.raises(ValueError):
        bans.load(records)
    assert len(bans) == 0


# Soft purge: RFC 9111 freshness arithmetic with the purge's time as the end of freshness.

def _assessed(cache_control: str, stored_at: float = 1000.0) -> policy.Assessment:
    return policy.assess({"Cache-Control": cache_control}, stored_at, stored_at)


@pytest.mark.parametrize("cache_control, purged, now, action, ttl", [
    # fresh for 60 s, purged 10 s after storing: stale from then on, by now - purge
    ("max-age=60", 1010.0, 1010.0, policy.Action.FETCH, 0.0),
    ("max-age=60", 1010.0, 1015.0, policy.Action.FETCH, -5.0),
    # stale-while-revalidate counts from the purge
    ("max-age=60, stale-while-revalidate=30", 1010.0, 1030.0, policy.Action.STALE_WHILE_REVALIDATE, -20.0),
    ("max-age=60, stale-while-revalidate=30", 1010.0, 1041.0, policy.Action.FETCH, -31.0),
    # already stale when purged: unchanged
    ("max-age=5", 1010.0, 1020.0, policy.Action.FETCH, -15.0),
    # must-revalidate still forbids serving it stale
    ("max-age=60, must-revalidate, stale-while-revalidate=30", 1010.0, 1011.0, policy.Action.FETCH, -1.0),
])
def test_soft_purge_makes_a_response_stale_from_the_purge(cache_control, purged, now, action, ttl):
    decision = policy.decide_assessed(policy.stale_from(_assessed(cache_control), purged), now)
    assert (decision.action, decision.ttl) == (action, ttl)
    # The Age it is sent with says just as much to the next cache: lifetime + seconds since the purge.
    if ttl <= 0 and cache_control != "max-age=5":
        assert decision.age == 60.0 + (now - purged)


@pytest.mark.parametrize("cache_control, purged, now, allowed", [
    ("max-age=60, stale-if-error=30", 1010.0, 1040.0, True),
    ("max-age=60, stale-if-error=30", 1010.0, 1041.0, False),     # 31 s stale since the purge
    ("max-age=60", 1010.0, 1011.0, False),                        # no stale-if-error at all
    ("max-age=60, stale-if-error=30", None, 1041.0, True),        # without the purge: still fresh
])
def test_stale_if_error_counts_from_a_soft_purge(cache_control, purged, now, allowed):
    headers = {"Cache-Control": cache_control}
    assert policy.stale_if_error_allowed(headers, 1000.0, 1000.0, now, stale_at=purged) is allowed


def test_disconnected_staleness_counts_from_a_soft_purge():
    headers = {"Cache-Control": "max-age=600"}
    assert policy.stale_when_disconnected(headers, 1000.0, 1000.0, 1100.0, 60.0, stale_at=1050.0)
    assert not policy.stale_when_disconnected(headers, 1000.0, 1000.0, 1111.0, 60.0, stale_at=1050.0)
