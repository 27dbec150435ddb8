"""wrk: the command line, the Lua script, and parsing what wrk prints.

wrk's human output rounds latencies ("5.80ms") and omits the socket-error
line when there are none, so every run also loads a small Lua script whose
``done()`` prints one machine-readable line with exact counts and
microsecond percentiles.  Both are parsed; the Lua line wins, the text is
the fallback (and a cross-check in the tests).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BENCH_PREFIX = "BENCH "

# done() runs once after the load, so it costs the measurement nothing.
_DONE_LUA = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
    "p50_us=%.0f p90_us=%.0f p99_us=%.0f max_us=%.0f mean_us=%.0f\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""

# Always-new URLs for the miss path: one thread, so a plain counter is unique.
_UNIQUE_PATH_LUA = """
local counter = 0
request = function()
  counter = counter + 1
  return wrk.format("GET", "{prefix}" .. counter .. "{suffix}")
end
"""


# Exactly `total` distinct paths; the thread stops once `total` responses have
# arrived.  Requests sent after the last new path (at most one per connection)
# ask for the first paths again, so no path beyond `total` is ever asked for.
_COUNTED_PATH_LUA = """
local counter = 0
local responses = 0
local total = {total}
request = function()
  counter = counter + 1
  return wrk.format("GET", "{prefix}" .. ((counter - 1) % total + 1))
end
response = function(status, headers, body)
  responses = responses + 1
  if responses >= total then
    wrk.thread:stop()
  end
end
"""


def counted_script(prefix: str, total: int) -> str:
    """The Lua script for `total` unique paths ``prefix1`` .. ``prefix<total>``, each asked once."""
    if '"' in prefix or "\\" in prefix:
        raise ValueError(f"path prefix must not contain quotes or backslashes: {prefix!r}")
    if total < 1:
        raise ValueError(f"need at least one path, not {total}")
    return _COUNTED_PATH_LUA.format(prefix=prefix, total=total) + _DONE_LUA


def lua_script(unique_prefix: str | None = None, unique_suffix: str = "") -> str:
    """The Lua script for a run; with a prefix, each request gets a new path."""
    script = _DONE_LUA
    if unique_prefix is not None:
        for text in (unique_prefix, unique_suffix):
            if '"' in text or "\\" in text:
                raise ValueError(f"path part must not contain quotes or backslashes: {text!r}")
        script = _UNIQUE_PATH_LUA.format(prefix=unique_prefix, suffix=unique_suffix) + script
    return script


def command(url: str, script_path: str, host: str | None, threads: int = 1,
            connections: int = 50, duration_s: float = 10.0, timeout_s: float = 5.0,
            headers: tuple[str, ...] = ()) -> list[str]:
    """The wrk argv (without CPU pinning); HTTP/1.1 keep-alive is wrk's default.

    ``headers`` are more request header lines, e.g. ``Connection: close`` (wrk
    then opens a new connection for every request).
    """
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
            f"--timeout={timeout_s:g}s", "--latency", "-s", script_path]
    if host:
        argv += ["-H", f"Host: {host}"]
    for header in headers:
        argv += ["-H", header]
    argv.append(url)
    return argv


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    bytes_read: int
    errors_connect: int
    errors_read: int
    errors_write: int
    errors_timeout: int
    errors_status: int      # responses with status > 399 (wrk's own count)
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def socket_errors(self) -> int:
        return self.errors_connect + self.errors_read + self.errors_write + self.errors_timeout

    @property
    def bytes_per_response(self) -> float:
        return self.bytes_read / self.requests if self.requests else 0.0


class WrkParseError(ValueError):
    pass


def parse(output: str) -> WrkResult:
    """Parse wrk's output: the Lua ``BENCH`` line if present, else the text."""
    for line in output.splitlines():
        if line.startswith(BENCH_PREFIX):
            return _parse_bench_line(line)
    return parse_text(output)


def _parse_bench_line(line: str) -> WrkResult:
    fields: dict[str, int] = {}
    for item in line[len(BENCH_PREFIX):].split():
        key, _, value = item.partition("=")
        fields[key] = int(value)
    try:
        return WrkResult(
            requests=fields["requests"], duration_s=fields["duration_us"] / 1e6,
            bytes_read=fields["bytes"], errors_connect=fields["connect"],
            errors_read=fields["read"], errors_write=fields["write"],
            errors_timeout=fields["timeout"], errors_status=fields["status"],
            p50_ms=fields["p50_us"] / 1e3, p90_ms=fields["p90_us"] / 1e3,
            p99_ms=fields["p99_us"] / 1e3, max_ms=fields["max_us"] / 1e3)
    except KeyError as exc:
        raise WrkParseError(f"wrk BENCH line lacks {exc.args[0]}: {line!r}") from None


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_UNIT_BYTES = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
_DURATION = r"([\d.]+)(us|ms|s|m|h)"


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_text(output: str) -> WrkResult:
    """Parse wrk's human-readable report (needs ``--latency`` for percentiles)."""
    summary = re.search(r"(\d+) requests in " + _DURATION + r", ([\d.]+)([KMGT]?B) read", output)
    if not summary:
        raise WrkParseError("no 'N requests in T, X read' line in wrk output")
    requests = int(summary.group(1))
    duration_s = _ms(summary.group(2), summary.group(3)) / 1e3
    bytes_read = int(float(summary.group(4)) * _UNIT_BYTES[summary.group(5)])
    percentiles = {int(p): _ms(v, u) for p, v, u in
                   re.findall(r"^\s+(50|90|99)%\s+" + _DURATION + r"\s*$", output, re.MULTILINE)}
    if set(percentiles) != {50, 90, 99}:
        raise WrkParseError("no latency distribution in wrk output (run it with --latency)")
    latency = re.search(r"Latency\s+" + _DURATION + r"\s+" + _DURATION + r"\s+" + _DURATION, output)
    max_ms = _ms(latency.group(5), latency.group(6)) if latency else percentiles[99]
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    connect, read, write, timeout = (int(g) for g in sockets.groups()) if sockets else (0, 0, 0, 0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(requests=requests, duration_s=duration_s, bytes_read=bytes_read,
                     errors_connect=connect, errors_read=read, errors_write=write,
                     errors_timeout=timeout, errors_status=int(non2xx.group(1)) if non2xx else 0,
                     p50_ms=percentiles[50], p90_ms=percentiles[90], p99_ms=percentiles[99],
                     max_ms=max_ms)
