"""HTTPS: warm 1 KiB hits over TLS, our L1 against nginx with the same certificate.

Our L1 (node ``l1``, its ``listen_tls``) and nginx-l1's HTTPS server serve
bench.example.com with the one certificate the run made (edge/devcerts.py,
an ECDSA P-256 key signed by a throw-away CA in the run directory), TLS 1.2
and 1.3, each with its own defaults otherwise (see peers/nginx.conf and the
README).  Each figure is a ratio to nginx measured in the same run:

1. **HTTPS/1.1 keep-alive**: wrk -t1 -c50 over https (target >= 1.0 x nginx).
2. **Full handshakes**: a new connection and a new TLS session for every
   request: ab -c50 (HTTP/1.0, no keep-alive).  Reported, no goal.
3. **Resumed handshakes**: a new connection for every request, the session
   resumed from the previous connection's ticket: wrk -c50 with
   ``Connection: close``.  Reported, no goal.
4. **HTTP/2**: h2load -c10 -m10, ALPN h2 only (target >= 0.5 x nginx, whose
   HTTP/2 is a second port of the same server with ``http2``).  Until our L1
   negotiates h2, its row says so and the target is "not measured".

Before measuring, two honesty checks: the object is fetched through each
server over HTTPS with the certificate verified against the run's CA (so
both serve the site's certificate, by SNI), and the handshake clients are
run briefly against nginx-l1-logs's HTTPS server, which logs
``$ssl_session_reused``: ab must resume none, wrk with ``Connection: close``
nearly all.  Every measured run must show zero origin requests for the
URL, zero errors and only 2xx, or it is listed as a problem.  Rounds are
rotated like the hit scenario's; figures are medians of the rounds.
"""

from __future__ import annotations

import http.client
import shlex
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from benchmarks import ab, h2load, layout, peers, procs, report, targets, wrk
from benchmarks.context import Bench
from benchmarks.layout import Endpoint
from benchmarks.loadrun import LoadRun, LoadRuns, run_client, run_wrk
from benchmarks.origin_count import OriginCounter
from benchmarks.scenarios.hit import NOISY_OTHER_LOAD, WARMUP_S, object_path, rotated
from benchmarks.servers import HttpTarget

SIZE = 1024
H2_CLIENTS = 10             # h2load -c: connections
H2_STREAMS = 10             # h2load -m: concurrent streams on each
MAX_HANDSHAKES_PER_S = 20_000   # ab's -n: a count bound well above any server here
PROBE_REQUESTS = 200        # the resumption check's ab run
PROBE_S = 1.0               # the resumption check's wrk run
RESUMED_SHARE = 0.9         # wrk with Connection: close must resume at least this share of its sessions

KEEPALIVE = "HTTPS/1.1 keep-alive"
FULL = "new connection per request, full handshake"
RESUMED = "new connection per request, resumed session"
H2 = "HTTP/2"
KINDS = (KEEPALIVE, FULL, RESUMED, H2)
CLIENTS = {KEEPALIVE: "wrk -t1 -c50", FULL: "ab -c50", RESUMED: "wrk -t1 -c50, Connection: close",
           H2: f"h2load -c{H2_CLIENTS} -m{H2_STREAMS}"}


@dataclass(frozen=True)
class TlsTarget(HttpTarget):
    """A server's HTTPS listener, and where it offers HTTP/2 (ours: the same one)."""

    h2: Endpoint | None = None

    def https_url(self, path: str, endpoint: Endpoint | None = None) -> str:
        return f"{(endpoint or self.endpoint).https_url}{path}"


OURS = TlsTarget("edge L1, HTTPS", layout.L1_TLS, h2=layout.L1_TLS)
NGINX = TlsTarget("nginx, HTTPS", layout.NGINX_L1_TLS, h2=layout.NGINX_L1_H2)
PROBE = TlsTarget("nginx-l1-logs, HTTPS", layout.NGINX_L1_LOGS_TLS)    # logs $ssl_session_reused


@dataclass
class TlsRuns(LoadRuns):
    kind: str = ""
    origin_requests: int = 0
    tls: str = ""               # protocol and cipher, as the client reported them
    not_measured: str = ""      # why this row has no figure

    @property
    def invalid(self) -> bool:
        return bool(self.origin_requests or self.socket_errors or self.bad_status)


@dataclass(frozen=True)
class Resumption:
    """How many sessions a handshake client resumed, from nginx's log of $ssl_session_reused."""

    kind: str
    resumed: int
    full: int

    @property
    def total(self) -> int:
        return self.resumed + self.full


# --------------------------------------------------------------------------- HTTPS with a pinned address

class _PinnedHttps(http.client.HTTPSConnection):
    """HTTPS to a host name (SNI, Host, certificate check) at a given address, as curl --resolve does."""

    def __init__(self, address: Endpoint, host: str, context: ssl.SSLContext, timeout_s: float):
        super().__init__(host, address.port, context=context, timeout=timeout_s)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address.host, self._address.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)    # type: ignore[attr-defined]


def https_get(address: Endpoint, host: str, path: str, ca: Path, timeout_s: float = 30.0) -> tuple[int, int]:
    """(status, body length) of one GET, the certificate verified against ``ca`` for ``host``."""
    connection = _PinnedHttps(address, host, ssl.create_default_context(cafile=str(ca)), timeout_s)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, len(response.read())
    finally:
        connection.close()


def warm(bench: Bench, target: TlsTarget, path: str) -> None:
    """Fetch twice over verified HTTPS: both must be 2xx with the whole object (the second a hit)."""
    for _ in range(2):
        try:
            status, length = https_get(target.endpoint, target.host, path, bench.configs["tls_ca"])
        except ssl.SSLCertVerificationError as exc:
            raise RuntimeError(f"{target.label} does not serve {target.host}'s certificate: {exc}") from None
        if not 200 <= status < 300 or length != SIZE:
            raise RuntimeError(f"{target.label}: warming {path} over HTTPS gave {status} with {length} bytes")


# --------------------------------------------------------------------------- measuring

def measure(bench: Bench, servers_: list[TlsTarget]) -> tuple[list[TlsRuns], list[Resumption]]:
    path = object_path(SIZE, "tls")
    counter = OriginCounter(path, layout.SITE_HOST)
    for target in servers_:
        warm(bench, target, path)
    filled = counter.take()
    if filled != len(servers_):
        bench.problem(f"tls: warming {len(servers_)} caches over HTTPS made {filled} origin requests")
    resumption = check_resumption(bench)
    runs: list[TlsRuns] = []
    for kind in KINDS:
        runs += _measure_kind(bench, kind, servers_, path, counter)
    return runs, resumption


def _measure_kind(bench: Bench, kind: str, servers_: list[TlsTarget], path: str,
                  counter: OriginCounter) -> list[TlsRuns]:
    by_label = {t.label: TlsRuns(t, kind=kind) for t in servers_}
    measured = list(servers_)
    if kind == H2:
        for target in servers_:
            why = h2_refusal(bench, target, path)
            if why:
                by_label[target.label].not_measured = why
                measured.remove(target)
                bench.log(f"tls {kind} {target.label}: not measured: {why}")
    if kind in (KEEPALIVE, H2):
        # Unmeasured load first, as in the hit scenario (no pool or buffer is still growing).
        for target in measured:
            _run(bench, kind, target, path, duration_s=WARMUP_S, record=False, tag="warmup")
        during_warmup = counter.take()
        if during_warmup:
            bench.problem(f"tls {kind}: {during_warmup} origin requests during the warm-up load")
    for round_index in range(bench.settings.rounds):
        for target in rotated(measured, round_index):
            load = _run(bench, kind, target, path, groups=bench.groups.get(target.label))
            runs = by_label[target.label]
            runs.loads.append(load)
            runs.tls = runs.tls or getattr(load.result, "tls", "")
            origin_requests = counter.take()
            runs.origin_requests += origin_requests
            result = load.result
            bench.log(f"tls {kind} {target.label} round {round_index + 1}: {result.rps:,.0f} req/s "
                      f"p99 {result.p99_ms:.2f} ms, client CPU {load.client_busy:.0%}, "
                      f"origin requests {origin_requests}")
            _check(bench, kind, target, load, origin_requests)
            bench.record_run(f"tls {kind}", target.label, round_index + 1, result.rps,
                             f"p99 {result.p99_ms:.2f} ms", load.client_busy, load.server_own, load.other_load,
                             load.steal, origin_requests, result.socket_errors + result.errors_status)
    return list(by_label.values())


def _run(bench: Bench, kind: str, target: TlsTarget, path: str, groups: set[int] | None = None,
         duration_s: float | None = None, record: bool = True, tag: str = "run") -> LoadRun:
    duration = duration_s or bench.settings.duration_s
    connections = bench.settings.connections
    if kind in (KEEPALIVE, RESUMED):
        headers = ("Connection: close",) if kind == RESUMED else ()
        return run_wrk(bench, target.https_url(path), target.host, wrk.lua_script(), f"tls-{tag}",
                       groups=groups, duration_s=duration, record=record, headers=headers)
    if kind == FULL:
        csv_path = bench.run_dir / f"ab-{target.tag}-{tag}.csv"
        argv = ab.command(target.https_url(path), target.host, connections, duration,
                          round(MAX_HANDSHAKES_PER_S * duration), str(csv_path))
        return run_client(bench, argv, lambda done: ab.parse(done.stdout, _read(csv_path)), groups,
                          timeout_s=duration + 60, record=record)
    assert target.h2 is not None
    log_path = bench.run_dir / f"h2load-{target.tag}-{tag}.log"
    argv = h2load.command(f"https://{target.host}:{target.h2.port}{path}", str(target.h2), H2_CLIENTS,
                          H2_STREAMS, duration_s=duration, log_file=str(log_path))

    def parse(done) -> h2load.H2loadResult:
        result = h2load.parse(done.stdout, _read(log_path))
        log_path.unlink(missing_ok=True)        # hundreds of thousands of lines; the counts are kept
        return result
    return run_client(bench, argv, parse, groups, timeout_s=duration + 60, record=record)


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def h2_refusal(bench: Bench, target: TlsTarget, path: str) -> str | None:
    """One h2load request with ALPN h2 only: None if the server spoke HTTP/2, else why not."""
    if target.h2 is None:
        return "no HTTP/2 listener"
    argv = h2load.command(f"https://{target.host}:{target.h2.port}{path}", str(target.h2), 1, 1, requests=1)
    bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
    completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=30)
    try:
        result = h2load.parse(completed.stdout)
    except h2load.H2loadParseError:
        return f"h2load failed ({completed.returncode}): {(completed.stderr or completed.stdout).strip()[-200:]}"
    why = result.refusal()
    if why is None and result.status_2xx != 1:
        return f"h2 negotiated, but the request did not get a 2xx ({result.failed} failed)"
    return f"the L1 did not negotiate h2: {why}" if why and target is OURS else why


def _check(bench: Bench, kind: str, target: TlsTarget, load: LoadRun, origin_requests: int) -> None:
    result = load.result
    where = f"tls {kind} {target.label}"
    if origin_requests:
        bench.problem(f"{where}: {origin_requests} origin requests during a hit run")
    if result.socket_errors:
        bench.problem(f"{where}: {result.socket_errors} failed requests or socket errors")
    if result.errors_status:
        bench.problem(f"{where}: {result.errors_status} responses that were not 2xx")
    if not result.requests:
        bench.problem(f"{where}: no request was answered")
    # A 3xx or an empty 200 would carry fewer bytes than the object.
    if isinstance(result, wrk.WrkResult | h2load.H2loadResult):
        if result.requests and result.bytes_per_response < SIZE:
            bench.problem(f"{where}: {result.bytes_per_response:.0f} bytes per response, object is {SIZE}")
    elif isinstance(result, ab.AbResult) and result.document_length != SIZE:
        bench.problem(f"{where}: ab saw a {result.document_length}-byte document, object is {SIZE}")
    if isinstance(result, h2load.H2loadResult) and result.refusal():
        bench.problem(f"{where}: {result.refusal()}")


# --------------------------------------------------------------------------- session resumption

def count_resumed(lines: list[str]) -> tuple[int, int]:
    """(resumed, full) from nginx "tls" log lines, whose first field is $ssl_session_reused ("r" or ".")."""
    resumed = sum(1 for line in lines if line.startswith("r "))
    full = sum(1 for line in lines if line.startswith(". "))
    return resumed, full


def check_resumption(bench: Bench) -> list[Resumption]:
    """Run each handshake client briefly against nginx-l1-logs's HTTPS server and count resumed sessions.

    Its own object, so that the L1 and nginx-l1's origin counts stay exact.
    nginx writes this log unbuffered: every answered request has its line.
    """
    log = bench.run_dir / peers.NGINX_TLS_ACCESS_LOG_FILE
    path = object_path(SIZE, "tls-probe")
    out = []
    for kind, argv in (
            (FULL, ab.command(PROBE.https_url(path), PROBE.host, 10, 30, PROBE_REQUESTS)),
            (RESUMED, wrk.command(PROBE.https_url(path), str(_script(bench)), PROBE.host, connections=10,
                                  duration_s=PROBE_S, headers=("Connection: close",)))):
        before = _lines(log)
        bench.record_command(shlex.join(procs.pinned(argv, layout.CLIENT_CPU)))
        completed = procs.run_client(argv, layout.CLIENT_CPU, timeout_s=60)
        if completed.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({completed.returncode}): {completed.stderr.strip()[-500:]}")
        resumed, full = count_resumed(_lines(log)[len(before):])
        check = Resumption(kind, resumed, full)
        out.append(check)
        bench.log(f"tls {kind}: {resumed} of {check.total} TLS sessions resumed (nginx $ssl_session_reused)")
        if not check.total:
            bench.problem(f"tls resumption check ({argv[0]}): nginx logged no request")
        elif kind == FULL and resumed:
            bench.problem(f"tls {kind}: ab resumed {resumed} of {check.total} sessions: the row is not "
                          "full handshakes")
        elif kind == RESUMED and resumed < RESUMED_SHARE * check.total:
            bench.problem(f"tls {kind}: wrk resumed only {resumed} of {check.total} sessions")
    return out


def _script(bench: Bench) -> Path:
    path = bench.run_dir / "tls-probe.lua"
    path.write_text(wrk.lua_script())
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# --------------------------------------------------------------------------- report

def table(all_runs: list[TlsRuns], resumption: list[Resumption]) -> report.Table:
    out = report.Table(
        "HTTPS (warm 1 KiB hits over TLS, same certificate)",
        ["test", "client", "server", "req/s", "vs nginx", "p99 ms", "server CPU", "other on server CPU",
         "client CPU", "TLS", "origin reqs", "errors", "note"])
    by_key = {(r.kind, r.target.label): r for r in all_runs}
    for runs in all_runs:
        reference = by_key.get((runs.kind, NGINX.label))
        ref_rps = reference.rps if reference and reference.loads else 0.0
        if runs.not_measured:
            out.add(runs.kind, CLIENTS[runs.kind], runs.target.label, "-", "-", "-", "-", "-", "-", "-", "-",
                    "-", f"not measured: {runs.not_measured}")
            continue
        notes = []
        if runs.client_limited:
            notes.append("client-limited")
        if runs.other_load > NOISY_OTHER_LOAD:
            notes.append("noisy")
        if runs.invalid:
            notes.append("INVALID")
        goal = {KEEPALIVE: targets.TLS_HIT_RPS_RATIO, H2: targets.H2_HIT_RPS_RATIO}.get(runs.kind)
        if runs.target is OURS and goal and ref_rps and runs.rps < goal * ref_rps:
            notes.append(f"below target (>= {goal:.1f} x nginx)")
        out.add(runs.kind, CLIENTS[runs.kind], runs.target.label, report.rate(runs.rps),
                report.ratio(runs.rps, ref_rps), report.ms(runs.p99_ms), report.percent(runs.server_own),
                report.percent(runs.other_load), report.percent(runs.client_busy), runs.tls or "-",
                runs.origin_requests, runs.errors, ", ".join(notes))
    out.notes.append(
        "Both servers: bench.example.com's certificate (ECDSA P-256, made by edge/devcerts.py for this run), "
        "TLS 1.2 and 1.3. Our L1: Python's ssl defaults (OpenSSL's TLS 1.3 suites, server cipher preference, "
        "stateless session tickets, ALPN h2 and http/1.1). nginx: ssl_protocols TLSv1.2 TLSv1.3, otherwise its "
        "defaults (ssl_ciphers HIGH:!aNULL:!MD5, client cipher preference, session tickets on, "
        "ssl_session_cache none); HTTP/1.1 on one port (ALPN http/1.1), HTTP/2 on a second (`ssl http2`).")
    out.notes.append(
        "Clients: wrk names the server's address as SNI (it takes the URL's host) and sends Host: "
        "bench.example.com; ab and h2load name bench.example.com (ab from the Host header, h2load from the "
        "URL, connecting with --connect-to). Each server serves the site's certificate either way (ours as "
        "its default certificate, nginx as its default server). TLS: as ab or h2load reported it; wrk "
        "reports nothing.")
    if resumption:
        out.notes.append(
            "Session resumption, counted in nginx's $ssl_session_reused on nginx-l1-logs's HTTPS server "
            "before the runs: " + "; ".join(f"{r.kind} ({'ab' if r.kind == FULL else 'wrk'}): "
                                             f"{r.resumed} of {r.total} resumed" for r in resumption)
            + ". ab makes a new TLS session per connection; wrk (and h2load) reuse the previous "
            "connection's session when they reconnect, so their Connection: close rows are resumptions.")
    out.notes.append(
        "server CPU: the server's own processes, per second of the run (one pinned CPU is 100%); client CPU "
        "above 90% is marked client-limited: a TLS client spends about as much CPU per handshake as the "
        "server (it verifies the ECDSA signature nginx makes), so handshake rows against nginx are often "
        "client-limited, and then nginx could go faster and the ratio is an upper bound.")
    return out


def verdicts(all_runs: list[TlsRuns]) -> list[targets.Verdict]:
    by_key = {(r.kind, r.target.label): r for r in all_runs}
    out = []
    for kind, key, goal in ((KEEPALIVE, "tls-hit-rps", targets.TLS_HIT_RPS_RATIO),
                            (H2, "h2-hit-rps", targets.H2_HIT_RPS_RATIO)):
        ours, ref = by_key.get((kind, OURS.label)), by_key.get((kind, NGINX.label))
        if ours is None or ref is None:
            continue
        if ours.not_measured or ref.not_measured:
            why = ours.not_measured or f"nginx: {ref.not_measured}"
            out.append(targets.not_measured(key, why))
            continue
        notes = []
        if ref.client_limited:
            notes.append("nginx client-limited: ratio is an upper bound")
        if ours.invalid or ref.invalid:
            notes.append("INVALID run (see problems)")
        out.append(targets.at_least(key, ours.rps, ref.rps, goal, "; ".join(notes)))
    return out


def summary(all_runs: list[TlsRuns]) -> str:
    """The handshake rows, which have no goal: one line for the report's summary."""
    by_key = {(r.kind, r.target.label): r for r in all_runs}
    parts = []
    for kind, word in ((FULL, "full"), (RESUMED, "resumed")):
        ours, ref = by_key.get((kind, OURS.label)), by_key.get((kind, NGINX.label))
        if ours and ref and ours.loads and ref.loads:
            limited = " (nginx client-limited: upper bound)" if ref.client_limited else ""
            parts.append(f"{word} {report.ratio(ours.rps, ref.rps)} x nginx "
                         f"({report.rate(ours.rps)} vs {report.rate(ref.rps)}/s){limited}")
    return "TLS handshakes, a new connection per request (no goal): " + ("; ".join(parts) or "not measured")
