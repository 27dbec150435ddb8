"""Several worker processes for one cache node, supervised by the node's main process.

``edge run NODE`` with ``workers`` above 1 becomes this supervisor:

* **traffic**: each worker binds the node's listen addresses itself with
  ``SO_REUSEPORT``, so the kernel spreads new connections over the workers'
  accept queues (nginx's ``reuseport``).  A worker that dies takes its own
  queue with it and the kernel sends new connections to the others at once;
  a listener bound once by the main process and inherited would instead
  keep a dead worker's share of new connections waiting until it is back.
  Before any worker starts, the main process binds each address once
  without ``SO_REUSEPORT``: a port already in use (by anyone, even another
  node's workers) is one clear start-up error, never a silent share.
* **disk cache**: one per node.  The main process deletes the shared index
  (:class:`edge.store.index.SharedIndex`), creates it empty and rebuilds it
  from the files in the background, once; the workers attach to it.  The
  memory tier, request coalescing, the upstream pool and the ban list are
  per worker.
* **admin**: the main process serves the node's admin address.  Each worker
  serves its own admin app on a Unix socket in a private directory; the
  main process fans ``/metrics`` (merged, :mod:`edge.metricsmerge`),
  ``/healthz``, ``/status``, ``/purge`` and ``/inspect`` out to them.
* **supervision**: a worker that exits unexpectedly is started again after a
  back-off (doubling from 0.1 s to 10 s, reset once a worker has run for 10 s),
  so a crash loop costs little.  SIGTERM or SIGINT: every worker drains as a
  single-process node does, and whatever is left after ``drain_timeout``
  plus a grace period is killed.  SIGHUP: the main process reads and
  validates the file first (a bad file is refused once, with one error per
  problem) and only then passes SIGHUP to every worker.  Workers get SIGTERM
  if the main process dies, however it dies (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

from edge import admin, metricsmerge
from edge.launcher import exit_text
from edge.config import Node, Topology
from edge.metrics import process_metrics
from edge.reload import Reloader
from edge.store import DiskStore
from edge.store.disk import prepare_directory
from edge.store.index import SharedIndex, map_size_for

log = logging.getLogger("edge.workers")

INDEX_DIR = "index.lmdb"            # inside the node's cache directory
START_TIMEOUT = 60.0                # seconds for every worker to answer /healthz at start
STOP_GRACE = 5.0                    # seconds beyond drain_timeout before SIGKILL
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0
STABLE_AFTER = 10.0                 # seconds a worker must run for its back-off to reset
CALL_TIMEOUT = 5.0                  # seconds for a worker to answer the main process
HEALTH_TIMEOUT = 1.0


@dataclass(frozen=True)
class WorkerSlot:
    """What a worker process is told on its command line: who it is and where its node's run lives."""

    index: int
    run_dir: Path                   # the Unix sockets of this node's workers
    run_token: str                  # shared by every process of this run (disk temp files)

    @property
    def socket(self) -> Path:
        return socket_path(self.run_dir, self.index)

    @property
    def ban_file_name(self) -> str:
        # Worker 0 keeps the one-process name: every worker got every purge, so its
        # list is the node's when the node goes back to one worker.
        return "bans.json" if self.index == 0 else f"bans-{self.index}.json"


def socket_path(run_dir: Path, index: int) -> Path:
    return run_dir / f"w{index}.sock"


def count(node: Node, override: int | None = None) -> int:
    """How many workers `node` runs: `override` (``--workers``), else its ``workers``, else the CPUs
    this process may run on (its affinity mask, as ``nproc`` counts, not the machine's CPUs)."""
    if override is not None:
        return override
    if node.workers:
        return node.workers
    return len(os.sched_getaffinity(0))


def shared_disk(topology: Topology, node: Node, slot: WorkerSlot) -> DiskStore:
    """A worker's disk tier: the node's directory and its shared index, rebuilt by the main process."""
    directory = topology.cache_dir(node)
    index = SharedIndex(directory / INDEX_DIR, map_size_for(node.disk_size), fresh=False)
    return DiskStore(directory, node.disk_size, index=index, rebuild=False, run_token=slot.run_token)


# --------------------------------------------------------------------------- the main process


@dataclass(eq=False)
class Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    session: aiohttp.ClientSession | None = None


@dataclass
class Supervisor:
    topology: Topology
    node: Node
    reloader: Reloader | None
    workers: int
    command: list[str]              # `python -m edge run NODE --config FILE --log-level L`
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="edge-")))
    run_token: str = field(default_factory=lambda: secrets.token_hex(4))

    def __post_init__(self) -> None:
        self.slots = [Worker(i) for i in range(self.workers)]
        self.stopping = False
        self.ready = False          # every worker answered /healthz once
        self.exited = asyncio.Event()
        self.registry = CollectorRegistry()
        process_metrics(self.registry)
        Gauge("edge_workers", "Worker processes this node is configured to run.",
              registry=self.registry).set(self.workers)
        self.restarts = Counter("edge_worker_restarts", "Worker processes started again after they exited.",
                                registry=self.registry)
        self.carry = metricsmerge.Carry()

    # ------------------------------------------------------------------ workers

    async def spawn(self, worker: Worker) -> None:
        from edge.launcher import _die_with_parent
        slot = WorkerSlot(worker.index, self.run_dir, self.run_token)
        socket_path(self.run_dir, worker.index).unlink(missing_ok=True)
        worker.process = await asyncio.create_subprocess_exec(
            *self.command, "--worker", str(worker.index), "--run-dir", str(self.run_dir),
            "--run-token", self.run_token,
            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        worker.started = time.monotonic()
        if worker.session is None:
            # force_close: a restarted worker is a new process behind the same path.
            worker.session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(slot.socket), force_close=True),
                timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT))
        log.info("%s: worker %d started, pid %d", self.node.name, worker.index, worker.process.pid)

    async def call(self, worker: Worker, method: str, path: str, timeout: float = CALL_TIMEOUT,
                   headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        """One request to a worker's admin socket: (status, body); status 0 if it could not answer."""
        if worker.session is None or worker.process is None or worker.process.returncode is not None:
            return 0, b"worker not running"
        try:
            async with worker.session.request(method, f"http://worker{path}", headers=headers,
                                              timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            return 0, str(exc).encode()

    async def each(self, method: str, path: str, timeout: float = CALL_TIMEOUT,
                   headers: dict[str, str] | None = None) -> list[tuple[Worker, int, bytes]]:
        answers = await asyncio.gather(*(self.call(w, method, path, timeout, headers) for w in self.slots))
        return [(w, status, body) for w, (status, body) in zip(self.slots, answers)]

    async def wait_ready(self, deadline: float) -> None:
        """Every worker healthy; OSError naming the worker if one exits or the deadline passes."""
        loop = asyncio.get_running_loop()
        pending = set(self.slots)
        while pending:
            for worker in list(pending):
                assert worker.process is not None
                if worker.process.returncode is not None:
                    raise OSError(f"worker {worker.index} {exit_text(worker.process.returncode)} while starting "
                                  "(its error is above)")
                status, _ = await self.call(worker, "GET", "/healthz", HEALTH_TIMEOUT)
                if status == 200:
                    pending.discard(worker)
            if pending and loop.time() > deadline:
                raise OSError(f"workers {sorted(w.index for w in pending)} not healthy within {START_TIMEOUT:g}s")
            if pending:
                await asyncio.sleep(0.05)

    async def watch(self, worker: Worker) -> None:
        """Restart `worker` whenever it exits, until the node stops."""
        while True:
            assert worker.process is not None
            code = await worker.process.wait()
            if self.stopping:
                return
            ran = time.monotonic() - worker.started
            if ran >= STABLE_AFTER:
                worker.backoff = BACKOFF_FIRST
            log.error("%s: worker %d (pid %d) %s after %.1fs; starting it again in %.1fs", self.node.name,
                      worker.index, worker.process.pid, exit_text(code), ran, worker.backoff)
            await asyncio.sleep(worker.backoff)
            worker.backoff = min(worker.backoff * 2, BACKOFF_MAX)
            if self.stopping:
                return
            try:
                await self.spawn(worker)
            except OSError as exc:
                log.error("%s: cannot start worker %d: %s", self.node.name, worker.index, exc)
                continue
            worker.restarts += 1
            self.restarts.inc()

    def signal_all(self, sig: int) -> None:
        for worker in self.slots:
            if worker.process is not None and worker.process.returncode is None:
                try:
                    worker.process.send_signal(sig)
                except ProcessLookupError:
                    pass

    async def stop(self) -> None:
        """SIGTERM: every worker drains; then SIGKILL for any still running."""
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        running = [w.process for w in self.slots if w.process is not None and w.process.returncode is None]
        if running:
            _, late = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running],
                                         timeout=self.node.limits.drain_timeout + STOP_GRACE)
            if late:
                log.warning("%s: %d workers still running after the drain; killing them", self.node.name, len(late))
                self.signal_all(signal.SIGKILL)
                await asyncio.gather(*(p.wait() for p in running))
        for worker in self.slots:
            if worker.session is not None:
                await worker.session.close()

    async def reload(self, topology: Topology) -> None:
        """The file was read and validated by this process: every worker applies it now."""
        self.topology = topology
        self.node = topology.node(self.node.name)
        self.signal_all(signal.SIGHUP)

    # ------------------------------------------------------------------ admin

    def admin_app(self, token: str | None) -> web.Application:
        return make_admin_app(self, token)


def make_admin_app(sup: Supervisor, token: str | None) -> web.Application:
    """The node's admin listener in the main process: the workers' answers, fanned out and merged."""
    started = time.time()

    async def worker_health() -> list[dict[str, Any]]:
        answers = await sup.each("GET", "/healthz", HEALTH_TIMEOUT)
        return [_json(body) | {"worker": w.index, "answered": status} for w, status, body in answers]

    async def healthz(request: web.Request) -> web.Response:
        health = await node_health(sup, await worker_health())
        return web.json_response(health, status=200 if health["status"] == "ok" else 503)

    async def metrics(request: web.Request) -> web.Response:
        answers = await sup.each("GET", "/metrics")
        scrapes = [("main", os.getpid(), list(sup.registry.collect()))]
        for worker, status, body in answers:
            if status == 200 and worker.process is not None:
                scrapes.append((str(worker.index), worker.process.pid, metricsmerge.parse(body.decode())))
        registry = CollectorRegistry()
        registry.register(metricsmerge.Families(metricsmerge.merge(scrapes, sup.carry)))
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})

    async def status(request: web.Request) -> web.Response:
        answers = await sup.each("GET", "/status")
        views = [(w, _json(body)) for w, code, body in answers if code == 200]
        health = await node_health(sup, [v | {"worker": w.index, "answered": 200} for w, v in views])
        out: dict[str, Any] = {**health, "uptime_seconds": round(time.time() - started, 3),
                               "config": sup.reloader.status() if sup.reloader is not None else None}
        first = views[0][1] if views else {}
        for key in ("sites", "parents", "bans"):
            out[key] = first.get(key)
        tiers: dict[str, dict[str, Any]] = {}
        for _, view in views:
            for tier in view.get("tiers", []):
                into = tiers.setdefault(tier["tier"], {"tier": tier["tier"], "objects": 0, "bytes": 0, "evictions": 0})
                for figure in ("objects", "bytes", "evictions"):
                    # The disk tier is the node's own (every worker sees the same figures).
                    into[figure] = (max(into[figure], tier[figure]) if tier["tier"] == "disk"
                                    else into[figure] + tier[figure])
        out["tiers"] = list(tiers.values())
        out["fetches_in_flight"] = sum(v.get("fetches_in_flight", 0) for _, v in views)
        out["connections"] = sum(v.get("connections", 0) for _, v in views)
        out["workers"] = [{"worker": w.index, "pid": w.process.pid if w.process else None,
                           "running": w.process is not None and w.process.returncode is None,
                           "restarts": w.restarts,
                           **{k: v.get(k) for k in ("status", "connections", "inflight", "fetches_in_flight")
                              for ww, v in views if ww is w}}
                          for w in sup.slots]
        return web.json_response(out)

    async def purge(request: web.Request) -> web.Response:
        # Every worker holds its own memory tier and ban list: all of them must take it.
        answers = await sup.each("POST", request.path_qs,
                                 headers={"Authorization": request.headers.get("Authorization", "")})
        for worker, code, body in answers:
            if code != 200:
                result = _json(body) or {"error": body.decode(errors="replace")}
                return web.json_response({**result, "node": sup.node.name, "worker": worker.index},
                                         status=code if code else 503)
        results = [_json(body) for _, _, body in answers]
        merged = dict(results[0])
        merged["removed"] = sum(r.get("removed", 0) for r in results)
        merged["workers"] = len(results)
        return web.json_response(merged)

    async def inspect(request: web.Request) -> web.Response:
        answers = await sup.each("GET", request.path_qs)
        code, body = next(((c, b) for _, c, b in answers if c), (503, b'{"error": "no worker answered"}'))
        view = _json(body)
        if code == 200:
            # Memory is per worker: what each one holds, beside worker 0's view of the whole.
            view["workers"] = [{"worker": w.index, **_json(b)} for w, c, b in answers if c == 200]
        return web.json_response(view, status=code)

    routes = [web.get("/status", status), web.post("/purge", admin.require_token(token, purge)),
              web.get("/inspect", inspect)]
    app = web.Application(middlewares=[admin.allow_list(sup.node.admin_allow)]
                          if sup.node.admin_allow is not None else [])
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_routes(routes)
    return app


async def node_health(sup: Supervisor, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The node's /healthz from its workers': ok while any worker serves (and after start-up), the
    in-flight requests summed, and the topology hash only when every worker runs the same one."""
    serving = [w for w in workers if w.get("answered") == 200 and w.get("status") == "ok"]
    if sup.stopping:
        state = "draining"
    elif not sup.ready:
        state = "starting"
    else:
        state = "ok" if serving else "down"
    inflight = sum(w.get("inflight", 0) for w in workers)
    max_inflight = sup.node.max_inflight
    hashes = {w.get("config_sha256") for w in workers}
    out = {"status": state, "node": sup.node.name, "role": sup.node.role, "inflight": inflight,
           "max_inflight": max_inflight, "overloaded": inflight > max_inflight,
           "workers": len(sup.slots), "workers_serving": len(serving)}
    if len(hashes) == 1 and None not in hashes and len(workers) == len(sup.slots):
        out["config_sha256"] = hashes.pop()
    return out


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def probe_free(node: Node, listen_host: str | None = None) -> None:
    """Bind each traffic address once without SO_REUSEPORT: OSError if anyone holds it."""
    for address in (node.listen, node.listen_tls):
        if address is None:
            continue
        host = listen_host or address.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, address.port))
            except OSError as exc:
                raise OSError(exc.errno, f"{address}: {exc.strerror or exc}") from None


async def supervise(topology: Topology, node: Node, stop: asyncio.Event, reloader: Reloader | None,
                    workers: int, command: list[str],
                    listen: Callable[[web.Application, str, int], Awaitable[Callable[[], Awaitable[None]]]],
                    listen_host: str | None = None) -> None:
    """Run `node` as `workers` worker processes until `stop` is set (see the module doc).

    `listen(app, host, port)` binds the admin app and returns its cleanup; `listen_host`
    (`edge run --listen-host`) is where every listener binds, at the topology's ports.
    OSError for anything that keeps the node from starting (the command line prints it).
    """
    probe_free(node, listen_host)
    sup = Supervisor(topology, node, reloader, workers, command)
    token = admin.load_token()
    directory = topology.cache_dir(node)
    prepare_directory(directory)        # an error names the directory, before the index is made in it
    # One index for the node, made anew and rebuilt here from the files: a restart rebuilds one index.
    disk = DiskStore(directory, node.disk_size, run_token=sup.run_token,
                     index=SharedIndex(directory / INDEX_DIR, map_size_for(node.disk_size), fresh=True))
    watchers: list[asyncio.Task] = []
    cleanup_admin = None
    try:
        cleanup_admin = await listen(sup.admin_app(token), listen_host or node.admin.host, node.admin.port)
        for worker in sup.slots:
            await sup.spawn(worker)
        await disk.start()
        await sup.wait_ready(asyncio.get_running_loop().time() + START_TIMEOUT)
        sup.ready = True
        watchers = [asyncio.create_task(sup.watch(w), name=f"worker {w.index}") for w in sup.slots]
        if reloader is not None:
            reloader.attach(sup.reload, sup.registry)
        log.info("%s (%s) serving traffic on %s with %d workers, admin on %s", node.name, node.role, node.listen,
                 workers, node.admin)
        await stop.wait()
        log.info("%s stopping its %d workers (each drains for up to %gs)", node.name, workers,
                 node.limits.drain_timeout)
    finally:
        await sup.stop()
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        await disk.close()
        if cleanup_admin is not None:
            await cleanup_admin()
        shutil.rmtree(sup.run_dir, ignore_errors=True)
        log.info("%s stopped", node.name)


def worker_command(node_name: str, config: Path | None, log_level: str,
                   listen_host: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "edge", "run", node_name, "--log-level", log_level]
    if config is not None:
        command += ["--config", str(config)]
    if listen_host is not None:
        command += ["--listen-host", listen_host]
    return command
