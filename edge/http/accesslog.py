"""Access log of a cache node: one line per request, buffered, written off the event loop.

Formats (``FORMATS``):

``combined``
    nginx's "combined" format followed by the CDN's own fields::

        $remote - - [$time_local] "$method $target HTTP/$version" $status $sent "$referer" "$user_agent" "$host" $cache_status $upstream $duration

    ``time_local`` is UTC in nginx's layout (``01/Dec/2026:22:38:14 +0000``),
    ``duration`` is seconds with three decimals (nginx's ``$request_time``).
    Empty fields print as ``-``.  Every string field is escaped like nginx's
    default escaping: ``"``, ``\\`` and bytes below 0x20 or from 0x7f up (the
    UTF-8 bytes of non-ASCII text included) become ``\\xHH``, so a line is
    always printable ASCII and a request can never forge or split one.

``json``
    one JSON object per line (ASCII only, compact separators) with the keys
    ``time`` (ISO 8601 UTC with milliseconds), ``remote``, ``host``,
    ``method``, ``target``, ``protocol``, ``status``, ``bytes``, ``referer``,
    ``user_agent``, ``cache_status``, ``upstream`` and ``duration``; empty
    fields stay empty strings.

Why buffered: a write per request would be a system call on the hit path.
As nginx does with ``access_log ... buffer=64k flush=1s``, :meth:`AccessLog.log`
only formats the line (the time string is built at most once per second) and
appends it to a list; the list is written as one chunk at least every
``flush_interval`` seconds, as soon as it passes 64 KiB, and on
:meth:`AccessLog.close`.  What waits to be written is bounded by
``max_pending`` bytes: beyond it new lines are dropped and counted in
:attr:`AccessLog.dropped`, so a stalled disk costs log lines, not memory.

The event loop never does file I/O: opening, writing (``os.write``, looping over
partial writes) and closing all run on a single worker thread owned by the
log, which also keeps the chunks in order.  A failing write (disk full, EPIPE)
is logged once on the ``edge.access`` logger and never raised to the caller.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("edge.access")

FORMATS = ("combined", "json")

#: Buffered bytes that trigger a write before the timer fires (nginx's ``buffer=64k``).
FLUSH_AT = 64 * 1024

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Characters written as they are: printable ASCII except '"' and '\'.
_NEEDS_ESCAPE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")
_BYTE_TEXT = tuple(
    chr(b) if 0x20 <= b < 0x7F and b not in (0x22, 0x5C) else f"\\x{b:02X}" for b in range(256)
)


def _escape(value: str) -> str:
    """nginx's default access-log escaping; the common clean string is returned as it is."""
    if not _NEEDS_ESCAPE.search(value):
        return value
    try:
        raw = value.encode("utf-8", "surrogateescape")  # undecodable request bytes come back as they were
    except UnicodeEncodeError:
        raw = value.encode("utf-8", "surrogatepass")
    return "".join([_BYTE_TEXT[b] for b in raw])


def _field(value: str) -> str:
    return _escape(value) if value else "-"


class AccessLog:
    """Buffered access log writing to a file, to stdout (``"-"``) or nowhere (``"off"``)."""

    def __init__(self, target: str, fmt: str = "combined", *, clock: Callable[[], float] = time.time,
                 flush_interval: float = 1.0, max_pending: int = 8 * 2**20):
        if fmt not in FORMATS:
            raise ValueError(f"access log format {fmt!r} is not one of {', '.join(FORMATS)}")
        if flush_interval <= 0:
            raise ValueError(f"access log flush interval must be positive, not {flush_interval!r}")
        self.target = target
        self.fmt = fmt
        self.enabled = target != "off"
        self.dropped = 0
        self._clock = clock
        self._flush_interval = flush_interval
        self._max_pending = max_pending
        self._format = self._combined if fmt == "combined" else self._json
        self._buf: list[str] = []
        self._buf_bytes = 0          # lines are ASCII, so characters are bytes
        self._inflight = 0           # bytes handed to the worker thread and not yet written
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_write: asyncio.Future | None = None
        self._closed = False
        self._failing = False        # a write failed and was reported; touched by the worker thread only
        self._sec: int | None = None
        self._sec_text = ""

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the target on the worker thread and start the periodic flush.

        Raises OSError naming the path when the file or its directory cannot be made.
        """
        if not self.enabled or self._executor is not None or self._closed:
            return
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-access-log")
        try:
            self._fd = await self._loop.run_in_executor(self._executor, self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._timer = self._loop.call_later(self._flush_interval, self._tick)

    def _open(self) -> int:
        if self.target == "-":
            return 1
        try:
            parent = os.path.dirname(self.target)
            if parent:
                os.makedirs(parent, exist_ok=True)
            return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OSError(e.errno, f"cannot open access log {self.target!r}: {e.strerror or e}", self.target) from e

    async def close(self) -> None:
        """Write what is buffered, stop the timer, close the file (never stdout) and the worker thread."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._executor is None:   # never started (or "off"): nothing was opened
            self._buf.clear()
            self._buf_bytes = 0
            return
        await self._drain()
        fd, self._fd = self._fd, None
        if fd is not None and fd != 1:
            try:
                await self._loop.run_in_executor(self._executor, os.close, fd)
            except OSError as e:
                log.warning("closing access log %s: %s", self.target, e)
        self._executor.shutdown(wait=False)  # idle by now: the thread just exits
        self._executor = None

    # -- hit path ----------------------------------------------------------

    def log(self, remote: str, method: str, target: str, version: str, status: int, sent: int,
            host: str, referer: str, user_agent: str, cache_status: str, upstream: str,
            duration: float) -> None:
        """Format one request's line and buffer it; never blocks, never writes."""
        if not self.enabled or self._closed:
            return
        line = self._format(remote, method, target, version, status, sent, host, referer, user_agent,
                            cache_status, upstream, duration)
        size = len(line)
        if self._buf_bytes + self._inflight + size > self._max_pending:
            self.dropped += 1
            return
        self._buf.append(line)
        self._buf_bytes += size
        if self._buf_bytes >= FLUSH_AT:
            self._submit()

    def _combined(self, remote, method, target, version, status, sent, host, referer, user_agent,
                  cache_status, upstream, duration) -> str:
        now = self._clock()
        sec = int(now)
        if sec != self._sec:
            t = time.gmtime(sec)
            self._sec_text = (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
                              f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000")
            self._sec = sec
        if not _NEEDS_ESCAPE.search(f"{remote}{method}{target}{version}{referer}{user_agent}{host}"
                                    f"{cache_status}{upstream}"):
            # The common line: nothing to escape, one search instead of one per field.
            return (f'{remote or "-"} - - [{self._sec_text}] "{method} {target} HTTP/{version}" {status} {sent} '
                    f'"{referer or "-"}" "{user_agent or "-"}" "{host or "-"}" '
                    f'{cache_status or "-"} {upstream or "-"} {duration:.3f}\n')
        return (f'{_field(remote)} - - [{self._sec_text}] '
                f'"{_escape(method)} {_escape(target)} HTTP/{_escape(version)}" {int(status)} {int(sent)} '
                f'"{_field(referer)}" "{_field(user_agent)}" "{_field(host)}" '
                f'{_field(cache_status)} {_field(upstream)} {duration:.3f}\n')

    def _json(self, remote, method, target, version, status, sent, host, referer, user_agent,
              cache_status, upstream, duration) -> str:
        sec, ms = divmod(round(self._clock() * 1000), 1000)
        if sec != self._sec:
            t = time.gmtime(sec)
            self._sec_text = (f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
                              f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
            self._sec = sec
        record = {
            "time": f"{self._sec_text}.{ms:03d}Z",
            "remote": remote,
            "host": host,
            "method": method,
            "target": target,
            "protocol": f"HTTP/{version}",
            "status": int(status),
            "bytes": int(sent),
            "referer": referer,
            "user_agent": user_agent,
            "cache_status": cache_status,
            "upstream": upstream,
            "duration": round(duration, 3),
        }
        return json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"

    # -- writing -----------------------------------------------------------

    async def flush(self) -> None:
        """Write everything buffered so far (on the worker thread); returns once it is written."""
        if self._executor is None:
            return
        await self._drain()

    async def _drain(self) -> None:
        self._submit()
        if self._last_write is not None:
            # One worker thread runs the writes in order: the last one done means all are.
            await asyncio.shield(self._last_write)

    def _tick(self) -> None:
        self._timer = None
        self._submit()
        if not self._closed and self._loop is not None:
            self._timer = self._loop.call_later(self._flush_interval, self._tick)

    def _submit(self) -> None:
        """Hand the buffered lines to the worker thread as one chunk, without waiting for it."""
        if not self._buf or self._executor is None:
            return
        data = "".join(self._buf).encode("ascii")
        self._buf.clear()
        self._buf_bytes = 0
        self._inflight += len(data)
        fut = self._loop.run_in_executor(self._executor, self._write, self._fd, data)
        fut.add_done_callback(lambda f, n=len(data): self._written(f, n))
        self._last_write = fut

    def _written(self, fut: asyncio.Future, size: int) -> None:
        self._inflight -= size
        if not fut.cancelled() and fut.exception() is not None:  # _write catches everything; belt and braces
            log.warning("access log %s: write failed: %r", self.target, fut.exception())

    def _write(self, fd: int, data: bytes) -> None:
        """Runs on the worker thread: write the whole chunk, reporting the first failure only."""
        view = memoryview(data)
        try:
            while view:
                n = os.write(fd, view)
                if n <= 0:
                    raise OSError(f"write returned {n}")
                view = view[n:]
        except Exception as e:  # a log write must never take the node down
            if not self._failing:
                self._failing = True
                log.warning("access log %s: write failed, lines are being lost: %s", self.target, e)
            return
        if self._failing:
            self._failing = False
            log.warning("access log %s: writing again", self.target)
