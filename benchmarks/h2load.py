"""h2load (Debian's nghttp2-client): the command line and parsing what it prints.

The HTTP/2 row of the TLS scenario.  h2load connects to ``--connect-to``
(the server's loopback address) but takes the URL's host name for SNI and
``:authority``, so a server is asked for the benchmark site exactly as a
browser would.  It is told to offer ALPN ``h2`` only (``--npn-list=h2``): by
default it also offers ``http/1.1`` and silently falls back to it, and the
row would then measure HTTP/1.1.  A server that does not pick ``h2`` makes
h2load print "No protocol negotiated" (and send nothing); the scenario
reports that server's row as not measured.

h2load prints mean and standard deviation of request times but no
percentiles, so every measured run also writes h2load's per-request log
(``--log-file``: start time in microseconds, status, microseconds until the
end of the response; status -1 for a failed stream), from which the p99 and
the statuses are counted.  In a timed run (``--duration``) the summary's
req/s is over the measured duration; no ``--warm-up-time`` is used (the
scenario warms up with a run of its own), so the traffic counters cover
exactly the measured requests.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass


def command(url: str, connect_to: str, clients: int, streams: int, duration_s: float | None = None,
            requests: int | None = None, log_file: str | None = None, protocols: str = "h2",
            threads: int = 1) -> list[str]:
    """The h2load argv (without CPU pinning): timed (``duration_s``) or counted (``requests``)."""
    if (duration_s is None) == (requests is None):
        raise ValueError("give either a duration or a number of requests")
    argv = ["h2load", f"--threads={threads}", f"--clients={clients}", f"--max-concurrent-streams={streams}",
            f"--npn-list={protocols}", f"--connect-to={connect_to}"]
    if duration_s is not None:
        # h2load takes whole units only: milliseconds keep a fractional duration.
        argv.append(f"--duration={round(duration_s * 1000)}ms")
    else:
        argv.append(f"--requests={requests}")
    if log_file:
        argv.append(f"--log-file={log_file}")
    argv.append(url)
    return argv


@dataclass(frozen=True)
class RequestLog:
    """What h2load's --log-file says: statuses and the latency percentiles."""

    statuses: Counter
    p50_ms: float
    p99_ms: float
    max_ms: float

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)


@dataclass(frozen=True)
class H2loadResult:
    rps: float
    total: int
    started: int
    done: int
    succeeded: int
    failed: int                 # h2load counts responses >= 400 here too
    errored: int
    timed_out: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    data_bytes: int             # response bodies
    tls_protocol: str = ""
    cipher: str = ""
    temp_key: str = ""
    application_protocol: str = ""      # what ALPN chose; "" when nothing was negotiated
    no_protocol: bool = False           # h2load said "No protocol negotiated"
    log: RequestLog | None = None

    # The fields every load generator's result has (see benchmarks.loadrun.ClientResult).
    @property
    def requests(self) -> int:
        return self.done

    @property
    def p99_ms(self) -> float:
        return self.log.p99_ms if self.log else 0.0

    @property
    def socket_errors(self) -> int:
        """Requests that got no response: stream or connection errors, and timeouts.

        Not "started" minus "done": a timed run stops with every stream in
        flight (clients x streams) started and never done, by design.
        """
        return self.errored + self.timed_out

    @property
    def errors_status(self) -> int:
        """Responses that were not 2xx (this row expects only 2xx)."""
        return self.status_3xx + self.status_4xx + self.status_5xx

    @property
    def bytes_per_response(self) -> float:
        return self.data_bytes / self.done if self.done else 0.0

    @property
    def tls(self) -> str:
        return " ".join(part for part in (self.tls_protocol, self.cipher) if part)

    def refusal(self) -> str | None:
        """Why this run did not speak HTTP/2, or None if it did."""
        if self.application_protocol == "h2":
            return None
        if self.application_protocol:
            return f"ALPN chose {self.application_protocol}, not h2"
        if self.no_protocol:
            return "no protocol negotiated (h2load: \"No protocol negotiated\")"
        if self.errored and not self.done:
            return f"every request failed ({self.errored} errored; no connection?)"
        return "h2load reported no application protocol"


class H2loadParseError(ValueError):
    pass


_REQUESTS = re.compile(r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", re.MULTILINE)
_STATUS = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", re.MULTILINE)
_FINISHED = re.compile(r"^finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s", re.MULTILINE)
_DATA = re.compile(r"^traffic: .*?, [\d.]+[KMGT]?B \((\d+)\) data", re.MULTILINE)


def _field(label: str, output: str) -> str:
    match = re.search(rf"^{re.escape(label)}: (.+)$", output, re.MULTILINE)
    return match.group(1).strip() if match else ""


def parse(output: str, log_text: str | None = None) -> H2loadResult:
    """Parse h2load's summary (and, if given, its --log-file)."""
    requests = _REQUESTS.search(output)
    statuses = _STATUS.search(output)
    finished = _FINISHED.search(output)
    if not (requests and statuses and finished):
        raise H2loadParseError("no 'finished in', 'requests:' and 'status codes:' lines in h2load output")
    data = _DATA.search(output)
    total, started, done, succeeded, failed, errored, timed_out = (int(g) for g in requests.groups())
    s2, s3, s4, s5 = (int(g) for g in statuses.groups())
    return H2loadResult(
        rps=float(finished.group(3)), total=total, started=started, done=done, succeeded=succeeded,
        failed=failed, errored=errored, timed_out=timed_out, status_2xx=s2, status_3xx=s3, status_4xx=s4,
        status_5xx=s5, data_bytes=int(data.group(1)) if data else 0,
        tls_protocol=_field("TLS Protocol", output), cipher=_field("Cipher", output),
        temp_key=_field("Server Temp Key", output), application_protocol=_field("Application protocol", output),
        no_protocol="No protocol negotiated" in output,
        log=parse_log(log_text) if log_text is not None else None)


def percentile(ordered: list[float], share: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def parse_log(text: str) -> RequestLog:
    """h2load's --log-file: one "start_us<TAB>status<TAB>duration_us" line per request."""
    statuses: Counter = Counter()
    durations: list[float] = []
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        try:
            status, duration_us = int(fields[1]), int(fields[2])
        except ValueError:
            raise H2loadParseError(f"h2load log line not understood: {line!r}") from None
        statuses[status] += 1
        durations.append(duration_us / 1e3)
    durations.sort()
    return RequestLog(statuses=statuses, p50_ms=percentile(durations, 0.50), p99_ms=percentile(durations, 0.99),
                      max_ms=durations[-1] if durations else 0.0)
