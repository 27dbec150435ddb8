"""Reloading the topology in a running process: SIGHUP, `systemctl reload`, `--watch`.

As `nginx -s reload` does: the file is read again (on a worker thread, never
on the event loop), validated as `edge check` validates it, and only then
applied, all at once; connections and the cache are kept.  A file that does
not validate, or that changes what this process cannot change while it runs
(its own listen and admin addresses, its cache sizes and directory, its
admin allow list: see :data:`RESTART_NODE_KEYS`), is refused: one ERROR line
per problem naming the file, the key and the problem (``config error: ...``,
as ``edge check`` prints it), and the process keeps running on the topology
it has.  Nothing is half-applied.

This module only reads, compares and sequences; what "apply" means is each
process's own business (:func:`edge.node.serve`, :mod:`edge.scheduler.service`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from edge import checks, config
from edge.config import ConfigError, Topology

log = logging.getLogger("edge.reload")

# What a running node cannot take from a new topology: the sockets it holds,
# the stores it sized and opened at start, and the admin listener's allow
# list (built into the listener).  A change to one of these needs a restart.
RESTART_NODE_KEYS = ("role", "listen", "listen_tls", "admin", "memory_size", "memory_object_max", "disk_size",
                     "admin_allow", "content_dir", "content_cache_control", "workers")
# The transport's own settings (its answer cache, rate limiter and TCP caps) are built once.
RESTART_DNS_KEYS = ("listen", "admin", "admin_allow", "cache_size", "tcp_idle_timeout", "tcp_max_connections",
                    "tcp_max_per_network", "rrl")

Apply = Callable[[Topology], Awaitable[None]]


# --------------------------------------------------------------------------- reading


def read(path: Path | None) -> tuple[Topology, str, float | None]:
    """Load and validate the topology, with the SHA-256 and mtime of the very bytes parsed.

    Blocking (it reads a file): call it before the event loop runs or through
    ``asyncio.to_thread``.  Raises ConfigError, as ``config.load`` does.
    """
    if path is None:
        data = resources.files("edge").joinpath("default_topology.toml").read_bytes()
        return config.parse(data.decode(), config.DEFAULT_TOPOLOGY, base_dir=Path.cwd()), _sha256(data), None
    path = Path(path)
    try:
        with open(path, "rb") as file:
            mtime = os.fstat(file.fileno()).st_mtime
            data = file.read()
    except OSError as exc:
        raise ConfigError(str(path), "(file)", exc.strerror or str(exc)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), "(file)", f"not UTF-8 text: {exc}") from None
    return config.parse(text, str(path), base_dir=path.parent), _sha256(data), mtime


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- comparing (pure)


def restart_needed(old: Topology, new: Topology, member: str) -> list[ConfigError]:
    """What `member` (a node name, or "dns") would have to restart for: one ConfigError per key.

    Empty when the new topology can be applied to the running process.
    """
    def problem(key: str, what: str) -> ConfigError:
        return ConfigError(new.source, key, what)

    def changed(key: str, before: Any, after: Any) -> ConfigError:
        return problem(key, f"changed from {_text(before)} to {_text(after)}; "
                            "a running process cannot take that: restart it")

    if member == "dns":
        if new.dns is None:
            return [problem("dns", "the [dns] table is gone; stop the scheduler instead")]
        assert old.dns is not None
        return [changed(f"dns.{key}", getattr(old.dns, key), getattr(new.dns, key))
                for key in RESTART_DNS_KEYS if getattr(old.dns, key) != getattr(new.dns, key)]
    before = _find(old, member)
    after = _find(new, member)
    if before is None:
        raise ValueError(f"{member!r} is not a node of the running topology")
    if after is None:
        return [problem(f"nodes.{member}", "this node is no longer in the topology; stop it instead")]
    found = [changed(f"nodes.{member}.{key}", getattr(before, key), getattr(after, key))
             for key in RESTART_NODE_KEYS if getattr(before, key) != getattr(after, key)]
    if before.role != "origin" and old.cache_dir(before) != new.cache_dir(after):
        # The cache directory is the node's own key, or derived from state_dir when it has none.
        explicit = before.cache_dir is not None or after.cache_dir is not None
        found.append(changed(f"nodes.{member}.cache_dir" if explicit else "state_dir",
                             old.cache_dir(before), new.cache_dir(after)))
    return found


def describe_changes(old: Topology, new: Topology) -> str:
    """A short account of what differs, for the log: ``sites +news; nodes +l2-b ~l1-2; coverage ~1``."""
    parts = []
    for label, before, after in (
            ("sites", {s.name: s for s in old.sites}, {s.name: s for s in new.sites}),
            ("regions", {r.name: r for r in old.regions}, {r.name: r for r in new.regions}),
            ("nodes", {n.name: n for n in old.nodes}, {n.name: n for n in new.nodes}),
            ("coverage", {str(net): region for net, region in old.coverage},
             {str(net): region for net, region in new.coverage})):
        marks = ([f"+{name}" for name in after if name not in before]
                 + [f"-{name}" for name in before if name not in after]
                 + [f"~{name}" for name in after if name in before and after[name] != before[name]])
        if marks:
            parts.append(f"{label} {' '.join(marks)}")
    if old.dns != new.dns:
        parts.append("dns ~")
    return "; ".join(parts) or "no changes"


def _find(topology: Topology, name: str) -> config.Node | None:
    return next((n for n in topology.nodes if n.name == name), None)


def _text(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------- one process


@dataclass(frozen=True)
class Version:
    """Which topology a process runs: the how-manyth load, of which bytes, read when."""

    generation: int          # 1 at start, one more for every reload applied
    sha256: str              # of the file's bytes as read
    mtime: float | None      # the file's modification time then (None: the built-in topology)
    loaded_at: float         # when it was applied (seconds since the epoch)


class Reloader:
    """Drives the reloads of one process (a node, or the scheduler when `member` is "dns").

    The process registers what applying means with :meth:`attach`; a signal
    handler or a file watcher calls :meth:`request`.  Requests that arrive
    while a reload runs are folded into one more reload after it, so the
    last file written is always the one applied.
    """

    def __init__(self, path: Path | None, member: str, topology: Topology, sha256: str,
                 mtime: float | None, clock: Callable[[], float] = time.time):
        self.path = path
        self.member = member
        self.topology = topology
        self.clock = clock
        self.version = Version(1, sha256, mtime, clock())
        self.last_error: str | None = None     # why the last reload was refused; None once one succeeds
        self._apply: Apply | None = None
        self._wanted = False
        self._task: asyncio.Task[None] | None = None
        self._successful: Gauge | None = None
        self._success_time: Gauge | None = None

    def attach(self, apply: Apply, registry: CollectorRegistry | None = None) -> None:
        """Start taking reloads, applied by `apply(new_topology)`, which must either raise
        (ConfigError or OSError: refused, nothing changed) or apply everything."""
        self._apply = apply
        if registry is not None:
            # Prometheus's own names for the same facts (prometheus_config_last_reload_*).
            self._successful = Gauge("edge_config_last_reload_successful",
                                     "1 if the last reload of the topology was applied, 0 if it was refused.",
                                     registry=registry)
            self._success_time = Gauge("edge_config_last_reload_success_timestamp_seconds",
                                       "When the running topology was loaded (start or reload).",
                                       registry=registry)
            self._successful.set(1)
            self._success_time.set(self.version.loaded_at)
        if self._wanted:
            self.request()

    def request(self) -> None:
        """Ask for a reload (from a signal handler or a watcher); returns at once."""
        self._wanted = True
        if self._apply is None:
            return              # still starting: attach() runs it
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reload")

    async def _run(self) -> None:
        while self._wanted:
            self._wanted = False
            await self.reload()

    async def reload(self) -> bool:
        """Read, validate and apply the file now; False (and logged) when refused."""
        assert self._apply is not None, "attach() first"
        running = self.version
        try:
            topology, sha256, mtime = await asyncio.to_thread(read, self.path)
            problems = restart_needed(self.topology, topology, self.member)
            if not problems:
                # What this process would refuse at start (edge check's rules for it alone).
                problems = await asyncio.to_thread(checks.problems, topology, self.member)
            if problems:
                raise _Refused(problems)
            await self._apply(topology)
        except (ConfigError, _Refused, OSError) as exc:
            problems = exc.problems if isinstance(exc, _Refused) else [exc]
            for problem in problems:
                text = f"config error: {problem}" if isinstance(problem, ConfigError) else str(problem)
                log.error("reload refused (still running generation %d, sha256 %s): %s",
                          running.generation, running.sha256[:12], text)
            self._refused("; ".join(str(p) for p in problems))
            return False
        except Exception as exc:       # a bug: say so, keep serving on what we have
            log.exception("reload failed (still running generation %d)", running.generation)
            self._refused(f"internal error: {exc!r}")
            return False
        changes = describe_changes(self.topology, topology)
        self.topology = topology
        self.version = Version(running.generation + 1, sha256, mtime, self.clock())
        self.last_error = None
        if self._successful is not None and self._success_time is not None:
            self._successful.set(1)
            self._success_time.set(self.version.loaded_at)
        log.info("reloaded %s: generation %d, sha256 %s (%s)", self.path or config.DEFAULT_TOPOLOGY,
                 self.version.generation, sha256[:12], changes)
        return True

    def _refused(self, why: str) -> None:
        self.last_error = why
        if self._successful is not None:
            self._successful.set(0)

    def status(self) -> dict[str, Any]:
        """The JSON-able view for /status: what runs, and why the last reload was refused, if it was."""
        v = self.version
        return {"file": str(self.path) if self.path is not None else config.DEFAULT_TOPOLOGY,
                "generation": v.generation, "sha256": v.sha256, "mtime": v.mtime, "loaded_at": v.loaded_at,
                "last_reload_error": self.last_error}

    async def close(self) -> None:
        self._wanted = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _Refused(Exception):
    def __init__(self, problems: list[ConfigError]):
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems
