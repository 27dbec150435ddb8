"""ab (ApacheBench, Debian's apache2-utils): the command line and parsing what it prints.

The TLS scenario's full-handshake row.  ab is an HTTP/1.0 client without
keep-alive (no ``-k``): every request is a new TCP connection and a new TLS
session, because ab makes a new ``SSL`` object for each connection and
never offers a saved session (checked in every run against nginx's
``$ssl_session_reused``).  wrk and h2load are no use for this: both reuse
the previous connection's session when they reconnect, so with
``Connection: close`` they measure resumed handshakes.  ab takes the SNI
name from the ``Host`` header, so the server is asked for the site's name.

``-t`` bounds the run in time, ``-n`` (after it: ab's options are read in
order, and ``-t`` alone means 50,000) in count.  ``-r`` counts receive
errors instead of aborting on the first.  The percentiles ab prints are
whole milliseconds; ``-e FILE`` writes them (1% to 100%) with microseconds,
and the p99 is read from there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def command(url: str, host: str, concurrency: int, duration_s: float, max_requests: int,
            csv_path: str | None = None) -> list[str]:
    """The ab argv (without CPU pinning)."""
    argv = ["ab", "-q", "-r", "-c", str(concurrency), "-t", str(max(1, round(duration_s))),
            "-n", str(max_requests), "-H", f"Host: {host}"]
    if csv_path:
        argv += ["-e", csv_path]
    argv.append(url)
    return argv


@dataclass(frozen=True)
class AbResult:
    complete: int
    failed: int                 # connect + receive + length + exceptions
    failed_connect: int
    failed_receive: int
    failed_length: int
    failed_exceptions: int
    non_2xx: int
    rps: float
    time_taken_s: float
    document_length: int
    p50_ms: float
    p99_ms: float
    tls: str = ""               # "TLSv1.3 TLS_AES_256_GCM_SHA384" as ab reports it
    server_temp_key: str = ""
    server_name: str = ""       # the SNI ab sent

    # The fields every load generator's result has (see benchmarks.loadrun.ClientResult).
    @property
    def requests(self) -> int:
        return self.complete

    @property
    def socket_errors(self) -> int:
        return self.failed

    @property
    def errors_status(self) -> int:
        return self.non_2xx


class AbParseError(ValueError):
    pass


def _number(pattern: str, output: str, what: str) -> float:
    match = re.search(pattern, output, re.MULTILINE)
    if not match:
        raise AbParseError(f"no {what} in ab output")
    return float(match.group(1))


def _text(label: str, output: str) -> str:
    match = re.search(rf"^{re.escape(label)}:\s+(.+)$", output, re.MULTILINE)
    return match.group(1).strip() if match else ""


def parse_csv(text: str) -> dict[int, float]:
    """ab's -e file: "Percentage served,Time in ms" then one "P,MS" line per percent."""
    out = {}
    for line in text.splitlines():
        share, _, value = line.partition(",")
        if share.isdigit():
            out[int(share)] = float(value)
    return out


def parse(output: str, csv_text: str | None = None) -> AbResult:
    """Parse ab's report (and, if given, its -e percentiles, which win over the whole-ms text)."""
    percentiles = {int(p): float(v) for p, v in re.findall(r"^\s+(\d+)%\s+(\d+)", output, re.MULTILINE)}
    if csv_text:
        percentiles.update(parse_csv(csv_text))
    breakdown = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)", output)
    connect, receive, length, exceptions = (int(g) for g in breakdown.groups()) if breakdown else (0, 0, 0, 0)
    protocol = _text("SSL/TLS Protocol", output).split(",")
    non_2xx = re.search(r"^Non-2xx responses:\s+(\d+)", output, re.MULTILINE)
    return AbResult(
        complete=int(_number(r"^Complete requests:\s+(\d+)", output, "complete requests")),
        failed=int(_number(r"^Failed requests:\s+(\d+)", output, "failed requests")),
        failed_connect=connect, failed_receive=receive, failed_length=length, failed_exceptions=exceptions,
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        rps=_number(r"^Requests per second:\s+([\d.]+)", output, "requests per second"),
        time_taken_s=_number(r"^Time taken for tests:\s+([\d.]+) seconds", output, "time taken"),
        document_length=int(_number(r"^Document Length:\s+(\d+) bytes", output, "document length")),
        p50_ms=percentiles.get(50, 0.0), p99_ms=percentiles.get(99, 0.0),
        tls=" ".join(protocol[:2]) if protocol != [""] else "",
        server_temp_key=_text("Server Temp Key", output), server_name=_text("TLS Server Name", output))
