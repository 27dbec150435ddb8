"""Tests of edge.http.accesslog: line formats, escaping, buffering and the writer thread.

The clock is always passed in: T is 2026-12-01 22:38:14 UTC plus 0.123 s.  Lines
are checked through what reaches the file (or stdout), never through internals;
waits for the timer poll with a deadline instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time

import pytest

from edge.http.accesslog import FORMATS, AccessLog

T = 1796164694.123  # 2026-12-01T22:38:14.123Z

RECORD = dict(
    remote="192.0.2.7", method="GET", target="/img/logo.png?v=2", version="1.1", status=200, sent=5120,
    host="cdn.example", referer="https://example.com/", user_agent="curl/8.5.0", cache_status="HIT",
    upstream="10.0.0.2:8080", duration=0.0123456,
)
LINE = ('192.0.2.7 - - [01/Dec/2026:22:38:14 +0000] "GET /img/logo.png?v=2 HTTP/1.1" 200 5120 '
        '"https://example.com/" "curl/8.5.0" "cdn.example" HIT 10.0.0.2:8080 0.012')

JSON_KEYS = ["time", "remote", "host", "method", "target", "protocol", "status", "bytes", "referer",
             "user_agent", "cache_status", "upstream", "duration"]


def fixed(now: float):
    return lambda: now


async def lines_of(tmp_path, fmt, records, clock=fixed(T)) -> list[str]:
    """Log each (overrides, now) pair through a real file and return the file's lines."""
    path = tmp_path / "access.log"
    now = [clock()]
    alog = AccessLog(str(path), fmt, clock=lambda: now[0], flush_interval=60)
    await alog.start()
    for overrides, when in records:
        now[0] = when
        alog.log(**{**RECORD, **overrides})
    await alog.close()
    return path.read_text("ascii").splitlines()


async def wait_for_lines(path, count: int, deadline: float = 2.0) -> list[str]:
    """Poll the file until it holds `count` lines or the deadline passes."""
    end = time.monotonic() + deadline
    while True:
        lines = path.read_text("ascii").splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > end:
            return lines
        await asyncio.sleep(0.005)


# -- combined format ---------------------------------------------------------

@pytest.mark.parametrize("overrides, now, expected", [
    pytest.param({}, T, LINE, id="full record"),
    pytest.param({"referer": "", "user_agent": "", "upstream": "", "cache_status": ""}, T,
                 '192.0.2.7 - - [01/Dec/2026:22:38:14 +0000] "GET /img/logo.png?v=2 HTTP/1.1" 200 5120 '
                 '"-" "-" "cdn.example" - - 0.012', id="empty fields print as -"),
    pytest.param({"method": "HEAD", "version": "1.0", "status": 304, "sent": 0, "cache_status": "MISS",
                  "duration": 1.5}, T,
                 '192.0.2.7 - - [01/Dec/2026:22:38:14 +0000] "HEAD /img/logo.png?v=2 HTTP/1.0" 304 0 '
                 '"https://example.com/" "curl/8.5.0" "cdn.example" MISS 10.0.0.2:8080 1.500', id="miss"),
    pytest.param({"duration": 0.0}, 0.0,
                 '192.0.2.7 - - [01/Jan/1970:00:00:00 +0000] "GET /img/logo.png?v=2 HTTP/1.1" 200 5120 '
                 '"https://example.com/" "curl/8.5.0" "cdn.example" HIT 10.0.0.2:8080 0.000', id="epoch"),
    pytest.param({}, 1772323199.999,  # 2026-02-28T23:59:59.999Z: the second is truncated, not rounded
                 '192.0.2.7 - - [28/Feb/2026:23:59:59 +0000] "GET /img/logo.png?v=2 HTTP/1.1" 200 5120 '
                 '"https://example.com/" "curl/8.5.0" "cdn.example" HIT 10.0.0.2:8080 0.012', id="end of a second"),
])
async def test_combined_line(tmp_path, overrides, now, expected):
    assert await lines_of(tmp_path, "combined", [(overrides, now)]) == [expected]


@pytest.mark.parametrize("overrides, old, new", [
    pytest.param({"user_agent": 'say "hi"'}, '"curl/8.5.0"', '"say \\x22hi\\x22"', id="quote"),
    pytest.param({"referer": "C:\\dir"}, '"https://example.com/"', '"C:\\x5Cdir"', id="backslash"),
    pytest.param({"user_agent": "a\tb\x00c\x7fd\x1b"}, '"curl/8.5.0"', '"a\\x09b\\x00c\\x7Fd\\x1B"',
                 id="control bytes and DEL"),
    pytest.param({"user_agent": "caf\u00e9 \u2603"}, '"curl/8.5.0"', '"caf\\xC3\\xA9 \\xE2\\x98\\x83"',
                 id="non-ASCII as UTF-8 bytes"),
    pytest.param({"target": "/a\r\nb\"c"}, "/img/logo.png?v=2", "/a\\x0D\\x0Ab\\x22c", id="target cannot split the line"),
    pytest.param({"method": 'G"T'}, '"GET ', '"G\\x22T ', id="method"),
    pytest.param({"host": "evil\"\\host"}, '"cdn.example"', '"evil\\x22\\x5Chost"', id="host"),
    pytest.param({"target": "/\udcff"}, "/img/logo.png?v=2", "/\\xFF", id="undecodable request byte"),
])
async def test_combined_escaping(tmp_path, overrides, old, new):
    expected = LINE.replace(old, new, 1)
    assert expected != LINE
    assert await lines_of(tmp_path, "combined", [(overrides, T)]) == [expected]


# -- json format -------------------------------------------------------------

@pytest.mark.parametrize("overrides, now, changed", [
    pytest.param({}, T, {}, id="full record"),
    pytest.param({"referer": "", "user_agent": "", "upstream": "", "cache_status": ""}, T,
                 {"referer": "", "user_agent": "", "upstream": "", "cache_status": ""}, id="empty fields"),
    pytest.param({"user_agent": 'caf\u00e9 "q" \\ \n', "version": "1.0", "duration": 2.0}, 1772323199.5,
                 {"user_agent": 'caf\u00e9 "q" \\ \n', "protocol": "HTTP/1.0", "duration": 2.0,
                  "time": "2026-02-28T23:59:59.500Z"}, id="escaped text, other clock"),
])
async def test_json_line(tmp_path, overrides, now, changed):
    [line] = await lines_of(tmp_path, "json", [(overrides, now)])
    assert line.isascii() and " ," not in line and ": " not in line
    record = json.loads(line)
    assert list(record) == JSON_KEYS
    assert record == {
        "time": "2026-12-01T22:38:14.123Z", "remote": "192.0.2.7", "host": "cdn.example", "method": "GET",
        "target": "/img/logo.png?v=2", "protocol": "HTTP/1.1", "status": 200, "bytes": 5120,
        "referer": "https://example.com/", "user_agent": "curl/8.5.0", "cache_status": "HIT",
        "upstream": "10.0.0.2:8080", "duration": 0.012, **changed,
    }
    assert type(record["status"]) is int and type(record["bytes"]) is int and type(record["duration"]) is float


# -- time string cached per second ------------------------------------------

@pytest.mark.parametrize("fmt, stamp", [
    ("combined", lambda line: line.split("[", 1)[1].split("]", 1)[0]),
    ("json", lambda line: json.loads(line)["time"]),
])
async def test_time_follows_the_clock_per_second(tmp_path, fmt, stamp):
    base = 1796164694.0
    stamps = [stamp(line) for line in await lines_of(
        tmp_path, fmt, [({}, base + 0.1), ({}, base + 0.9), ({}, base + 1.0), ({}, base + 0.5), ({}, base + 61.25)])]
    if fmt == "combined":
        assert stamps == ["01/Dec/2026:22:38:14 +0000", "01/Dec/2026:22:38:14 +0000", "01/Dec/2026:22:38:15 +0000",
                          "01/Dec/2026:22:38:14 +0000", "01/Dec/2026:22:39:15 +0000"]
    else:
        assert stamps == ["2026-12-01T22:38:14.100Z", "2026-12-01T22:38:14.900Z", "2026-12-01T22:38:15.000Z",
                          "2026-12-01T22:38:14.500Z", "2026-12-01T22:39:15.250Z"]


# -- buffering and writing ---------------------------------------------------

async def test_flush_and_close_write_every_line_in_order(tmp_path):
    path = tmp_path / "logs" / "edge" / "access.log"  # parent directories are created
    alog = AccessLog(str(path), clock=fixed(T), flush_interval=60)
    await alog.start()
    assert path.exists() and path.read_bytes() == b""
    alog.log(**{**RECORD, "target": "/0"})
    alog.log(**{**RECORD, "target": "/1"})
    assert path.read_bytes() == b""  # buffered, not written per line
    await alog.flush()
    assert [line.split('"')[1] for line in path.read_text().splitlines()] == ["GET /0 HTTP/1.1", "GET /1 HTTP/1.1"]
    for i in range(2, 500):
        alog.log(**{**RECORD, "target": f"/{i}"})
    await alog.close()
    lines = path.read_text().splitlines()
    assert [line.split('"')[1] for line in lines] == [f"GET /{i} HTTP/1.1" for i in range(500)]
    alog.log(**RECORD)  # after close: ignored, never raises
    await alog.flush()
    await alog.close()
    assert len(path.read_text().splitlines()) == 500


async def test_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("earlier line\n")
    alog = AccessLog(str(path), clock=fixed(T))
    await alog.start()
    alog.log(**RECORD)
    await alog.close()
    assert path.read_text().splitlines() == ["earlier line", LINE]


async def test_periodic_flush_without_explicit_flush(tmp_path):
    path = tmp_path / "access.log"
    alog = AccessLog(str(path), clock=fixed(T), flush_interval=0.05)
    await alog.start()
    try:
        alog.log(**RECORD)
        assert await wait_for_lines(path, 1) == [LINE]
        alog.log(**RECORD)  # the timer keeps running after its first flush
        assert await wait_for_lines(path, 2) == [LINE, LINE]
    finally:
        await alog.close()


async def test_early_flush_when_buffer_passes_64k(tmp_path):
    path = tmp_path / "access.log"
    alog = AccessLog(str(path), clock=fixed(T), flush_interval=60)
    await alog.start()
    try:
        count = 64 * 1024 // (len(LINE) + 1) + 1  # the line that takes the buffer past 64 KiB
        for _ in range(count):
            alog.log(**RECORD)
        assert len(await wait_for_lines(path, count)) == count  # no flush() called, timer far away
    finally:
        await alog.close()


async def test_max_pending_drops_and_counts(tmp_path):
    path = tmp_path / "access.log"
    alog = AccessLog(str(path), clock=fixed(T), flush_interval=60, max_pending=200)
    await alog.start()
    assert len(LINE) + 1 <= 200 < 2 * (len(LINE) + 1)  # one line fits, two do not
    for _ in range(3):
        alog.log(**RECORD)
    assert alog.dropped == 2
    await alog.flush()
    assert path.read_text().splitlines() == [LINE]
    alog.log(**RECORD)  # written out, so there is room again
    await alog.close()
    assert alog.dropped == 2
    assert path.read_text().splitlines() == [LINE, LINE]


async def test_stdout_target(capfd):
    alog = AccessLog("-", clock=fixed(T), flush_interval=60)
    await alog.start()
    alog.log(**RECORD)
    await alog.close()
    assert capfd.readouterr().out == LINE + "\n"
    os.fstat(1)  # stdout is left open


async def test_off_writes_nothing(tmp_path, capfd):
    alog = AccessLog("off", clock=fixed(T))
    assert alog.enabled is False
    await alog.start()
    alog.log(**RECORD)
    await alog.flush()
    await alog.close()
    assert alog.dropped == 0
    assert capfd.readouterr() == ("", "")
    assert list(tmp_path.iterdir()) == [] and not os.path.exists("off")


def under_a_regular_file(tmp):
    (tmp / "file").write_text("x")
    return tmp / "file" / "logs" / "access.log"


def a_directory(tmp):
    (tmp / "logs").mkdir()
    return tmp / "logs"


@pytest.mark.parametrize("make_target", [under_a_regular_file, a_directory])
async def test_bad_target_makes_start_raise(tmp_path, make_target):
    target = str(make_target(tmp_path))
    alog = AccessLog(target)
    with pytest.raises(OSError) as raised:
        await alog.start()
    assert target in str(raised.value)
    await alog.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_write_error_is_logged_once_and_not_raised(caplog):
    alog = AccessLog("/dev/full", clock=fixed(T), flush_interval=60)
    await alog.start()
    with caplog.at_level(logging.WARNING, logger="edge.access"):
        for _ in range(3):
            alog.log(**RECORD)
            await alog.flush()
        await alog.close()
    warnings = [r for r in caplog.records if r.name == "edge.access"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "/dev/full" in warnings[0].getMessage()


@pytest.mark.parametrize("fmt", ["common", "JSON", ""])
def test_unknown_format_is_refused(fmt):
    assert fmt not in FORMATS
    with pytest.raises(ValueError):
        AccessLog("-", fmt)
