"""The pure slice arithmetic of edge.slices, table-driven."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from edge import slices

S = 64 * 1024


@pytest.mark.parametrize("value, expected", [
    (None, 0),
    ("bytes=0-99", 0),
    (f"bytes={S - 1}-{S}", 0),
    (f"bytes={S}-", 1),
    (f"bytes={5 * S + 7}-{9 * S}", 5),
    ("bytes=-500", 0),               # suffix: the length is not known yet, slice 0 tells it
    ("bytes=0-9,200-299", 0),        # several ranges: answered whole, from slice 0 on
    ("items=3-4", 0),
    ("bytes=x-", 0),
    (" BYTES = 131072 - ", 2),
])
def test_first_slice(value, expected):
    assert slices.first_slice(value, S) == expected


@pytest.mark.parametrize("first, last, expected", [
    (0, 0, [0]), (0, S - 1, [0]), (0, S, [0, 1]), (S - 1, S, [0, 1]), (3 * S + 5, 6 * S - 1, [3, 4, 5]),
])
def test_covering(first, last, expected):
    assert list(slices.covering(first, last, S)) == expected


@pytest.mark.parametrize("index, total, span, header", [
    (0, 10 * S, (0, S - 1), f"bytes=0-{S - 1}"),
    (9, 10 * S, (9 * S, 10 * S - 1), f"bytes={9 * S}-{10 * S - 1}"),
    (2, 2 * S + 100, (2 * S, 2 * S + 99), f"bytes={2 * S}-{3 * S - 1}"),   # the short last slice
    (0, 10, (0, 9), f"bytes=0-{S - 1}"),                                   # an object smaller than a slice
])
def test_span_and_range_header(index, total, span, header):
    assert slices.slice_span(index, S, total) == span
    assert slices.range_header(index, S) == header


@pytest.mark.parametrize("value, expected", [
    ("bytes 0-99/1000", (0, 99, 1000)),
    ("bytes 900-999/1000", (900, 999, 1000)),
    ("bytes 0-99/*", None), ("bytes */1000", None), ("bytes 100-99/1000", None), ("bytes 0-1000/1000", None),
    (None, None), ("", None), ("items 0-1/2", None),
])
def test_parse_content_range(value, expected):
    assert slices.parse_content_range(value) == expected


@pytest.mark.parametrize("index, content_range, length, expected", [
    (0, f"bytes 0-{S - 1}/{3 * S}", S, 3 * S),
    (2, f"bytes {2 * S}-{2 * S + 9}/{2 * S + 10}", 10, 2 * S + 10),
    (0, "bytes 0-9/10", 10, 10),
    (0, "bytes 0-9/10", None, 10),                  # chunked: the body length is checked after
    (1, f"bytes 0-{S - 1}/{3 * S}", S, None),       # another slice than asked
    (0, f"bytes 0-{S - 2}/{3 * S}", S - 1, None),   # shorter than asked, not the end
    (0, f"bytes 0-{S - 1}/{3 * S}", S - 1, None),   # Content-Length disagrees
    (0, "bytes 0-9/*", 10, None),
    (0, None, 10, None),
])
def test_check_partial(index, content_range, length, expected):
    assert slices.check_partial(index, S, content_range, length) == expected


def fields(**kw) -> CIMultiDict[str]:
    return CIMultiDict({name.replace("_", "-"): value for name, value in kw.items()})


LM = "Thu, 01 Jan 2026 00:00:00 GMT"
LM2 = "Fri, 02 Jan 2026 00:00:00 GMT"


@pytest.mark.parametrize("a, b, totals, expected", [
    (fields(ETag='"v1"'), fields(ETag='"v1"'), (10, 10), True),
    (fields(ETag='"v1"'), fields(ETag='"v2"'), (10, 10), False),
    (fields(ETag='"v1"'), fields(ETag='"v1"'), (10, 11), False),          # the length changed
    (fields(ETag='"v1"', Last_Modified=LM), fields(ETag='"v1"', Last_Modified=LM2), (10, 10), True),  # ETag rules
    (fields(ETag='"v1"'), fields(Last_Modified=LM), (10, 10), False),     # one side lost its ETag
    (fields(ETag='W/"v1"'), fields(ETag='W/"v1"'), (10, 10), True),       # weak: only the (absent) dates count
    (fields(ETag='W/"v1"', Last_Modified=LM), fields(ETag='W/"v1"', Last_Modified=LM2), (10, 10), False),
    (fields(Last_Modified=LM), fields(Last_Modified=LM), (10, 10), True),
    (fields(Last_Modified=LM), fields(Last_Modified=LM2), (10, 10), False),
    (fields(), fields(), (10, 10), True),                                   # nothing to compare but the length
])
def test_same_object(a, b, totals, expected):
    assert slices.same_object(a, totals[0], b, totals[1]) is expected
    assert slices.same_object(b, totals[1], a, totals[0]) is expected


@pytest.mark.parametrize("f, expected", [
    (fields(ETag='"v1"'), True), (fields(Last_Modified=LM), True), (fields(ETag='W/"v1"'), False), (fields(), False),
])
def test_has_validator(f, expected):
    assert slices.has_validator(f) is expected


def test_slice_keys_live_under_the_url_and_the_slice_size():
    key = slices.slice_key("site|www.example.com|/a.iso", S, 3)
    assert key.startswith("site|www.example.com|/a.iso\n")      # a URL purge covers it (edge.bans)
    assert key != slices.slice_key("site|www.example.com|/a.iso", 2 * S, 3)


async def _collect(filling, start, end, into):
    async for chunk in filling.read(start, end):
        into.append(bytes(chunk))


async def test_a_filling_slice_is_read_as_its_bytes_arrive():
    import asyncio

    from edge.slicing import Filling
    filling = Filling(keeping=True)
    got: list[bytes] = []
    reader = asyncio.create_task(_collect(filling, 3, 10, got))     # bytes 3..9 of the slice
    await asyncio.sleep(0)
    filling.add(b"ab")                  # before the range: nothing sent
    await asyncio.sleep(0)
    assert got == []
    filling.add(b"cdef")                # 3..5 arrive: sent at once, not after the whole slice
    await asyncio.sleep(0)
    assert got == [b"def"] and not reader.done()
    filling.add(b"ghijkl")
    await reader
    assert b"".join(got) == b"defghij"


async def test_a_broken_fill_fails_its_reader_after_the_bytes_that_came():
    import asyncio

    from edge.slicing import Filling
    from edge.upstream.client import UpstreamError
    filling = Filling(keeping=True)
    got: list[bytes] = []
    reader = asyncio.create_task(_collect(filling, 0, 100, got))
    filling.add(b"12345")
    await asyncio.sleep(0)
    filling.fail(UpstreamError("http_response_incomplete", "short slice", ["origin"]))
    with pytest.raises(UpstreamError):
        await reader
    assert got == [b"12345"]
