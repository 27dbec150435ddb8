"""`edge up`: run every node of a topology on this machine, supervised as one.

Each node (and the DNS scheduler, when the topology has one) runs as its own
`python -m edge run NAME` process, exactly as systemd would run it on a host
of its own.  The launcher starts them parents first (origin, then L2, then L1,
then the scheduler), waits for each one's admin `/healthz` to answer 200
within a deadline, prints where to curl, dig and scrape, and on SIGINT or
SIGTERM stops them all: SIGTERM, a grace period, then SIGKILL.

SIGHUP (or, with ``--watch``, a change of the topology file) reloads, as
``nginx -s reload`` does: the file is read and checked as ``edge check``
checks it (a bad one is refused and nothing changes), then nodes new to
the topology are started, nodes whose own addresses or cache sizes changed
(what a running node cannot take, `edge.reload.RESTART_NODE_KEYS`) are
restarted, every other node gets SIGHUP and is waited for until its
``/healthz`` reports the new file's hash, and only then are nodes gone from
the topology stopped: an L1 stops using a removed parent, and the DNS
scheduler stops handing out a removed L1, before it goes away.

Every child's stdout and stderr is forwarded, line by line and prefixed with
the node name, to the launcher's stderr.

A node that dies after start-up is reported loudly and the others keep
running (an L1 keeps serving from cache and goes around a dead parent); the
launcher exits on its own only when every node has died.

`prometheus_config` lives here too: it turns the same list of processes into
a Prometheus scrape config.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import json
import math
import os
import signal
import socket
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiohttp

from edge import checks, config, devcerts, reload
from edge.config import ConfigError

START_TIMEOUT_ENV = "EDGE_UP_TIMEOUT"
DEFAULT_START_TIMEOUT = 20.0     # seconds for the whole topology to become healthy
REPEAT_SIGNAL_AFTER = 1.0   # seconds: a stop signal sooner than this after the first is a duplicate
STOP_GRACE = 10.0                # seconds between SIGTERM and SIGKILL, beyond the nodes' drain_timeout
HEALTH_POLL_INTERVAL = 0.1       # seconds between /healthz probes of a starting node
HEALTH_PROBE_TIMEOUT = 1.0
OUTPUT_DRAIN_TIMEOUT = 2.0       # seconds to collect a dead child's last lines
RELOAD_CONFIRM_TIMEOUT = 10.0    # seconds for a node sent SIGHUP to report the new topology
TAIL_LINES = 10                  # lines of a child's output kept for failure reports
LINE_LIMIT = 1 << 20             # longest child output line forwarded whole
NOT_ON_THIS_MACHINE = "that IP is not on this machine"
START_ORDER = ("origin", "l2", "l1", "dns")   # parents exist before their children


@dataclass(frozen=True)
class Member:
    """One process of the topology: a node, or the DNS scheduler (role "dns")."""

    name: str
    role: str
    traffic: config.Address
    admin: config.Address
    traffic_tls: config.Address | None = None     # a cache node's HTTPS listener

    @property
    def traffic_protocols(self) -> tuple[str, ...]:
        # The scheduler answers DNS over both UDP and TCP on its listen address.
        return ("udp", "tcp") if self.role == "dns" else ("tcp",)


def members(topology: config.Topology) -> tuple[Member, ...]:
    """Every process of the topology, in start order (parents before children)."""
    found = [Member(n.name, n.role, n.listen, n.admin, n.listen_tls) for n in topology.nodes]
    if topology.dns is not None:
        found.append(Member("dns", "dns", topology.dns.listen, topology.dns.admin))
    return tuple(sorted(found, key=lambda m: START_ORDER.index(m.role)))


# --------------------------------------------------------------------------- prometheus


DEFAULT_SCRAPE_INTERVAL = 15.0     # seconds, Prometheus's own example value


def prometheus_duration(seconds: float) -> str:
    """`seconds` in Prometheus's duration syntax: whole seconds as "15s", anything finer in ms."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"a scrape interval must be a positive number of seconds, got {seconds!r}")
    ms = round(seconds * 1000)
    if ms < 1:
        raise ValueError(f"a scrape interval must be at least 1 ms, got {seconds!r} s")
    return f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"


def prometheus_config(topology: config.Topology, interval: float = DEFAULT_SCRAPE_INTERVAL) -> str:
    """A complete prometheus.yml scraping every admin listener of the topology.

    One job, one static target per process, labelled with its node name and
    role.  Written by hand (no YAML dependency); every scalar is a JSON
    string, which YAML reads as a double-quoted string, so a node called
    "true" or "1.0" stays a string.  `interval` (seconds) is the scrape and
    evaluation interval; Prometheus lowers its 10 s default scrape timeout to
    a shorter interval by itself.
    """
    every = prometheus_duration(interval)
    lines = [
        "# Prometheus scrape config for every node of an edge CDN topology.",
        "# Generated by `edge prometheus-config [--config FILE] [--interval SECONDS]`;",
        "# regenerate it when the topology changes.",
        "global:",
        f"  scrape_interval: {every}",
        f"  evaluation_interval: {every}",
        "scrape_configs:",
        "  - job_name: \"edge\"",
        "    metrics_path: \"/metrics\"",
        "    static_configs:",
    ]
    for member in members(topology):
        lines += [
            f"      - targets: [{json.dumps(str(member.admin))}]",
            "        labels:",
            f"          node: {json.dumps(member.name)}",
            f"          role: {json.dumps(member.role)}",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- launcher


class StartFailure(Exception):
    """A node could not be started; the message names it and says why."""


class Interrupted(Exception):
    """A stop signal arrived before every node was up."""


@dataclass
class Child:
    member: Member
    process: asyncio.subprocess.Process
    exited: asyncio.Task[int]          # done when the process has exited
    forwarder: asyncio.Task[None]      # done when its output has reached end of file
    tail: deque[str]                   # its last lines of output, for failure reports
    last_probe: str = "not probed yet"
    retiring: bool = False             # being stopped by a reload: its exit is expected


def up(topology: config.Topology, config_path: Path | None, watch: bool = False) -> int:
    """Run `edge up`: start, supervise and stop every node.  Returns the exit code."""
    raw_timeout = os.environ.get(START_TIMEOUT_ENV, "")
    try:
        start_timeout = float(raw_timeout) if raw_timeout else DEFAULT_START_TIMEOUT
        if not start_timeout > 0:
            raise ValueError
    except ValueError:
        print(f"edge up: {START_TIMEOUT_ENV} must be a positive number of seconds, "
              f"got {raw_timeout!r}", file=sys.stderr)
        return 2
    launcher = Launcher(topology, config_path, start_timeout, watch=watch)
    # The launcher only supervises (every node it starts runs on uvloop); it
    # stays on asyncio's loop, whose subprocesses take process_group.
    return asyncio.run(launcher.run())


class Launcher:
    def __init__(self, topology: config.Topology, config_path: Path | None,
                 start_timeout: float = DEFAULT_START_TIMEOUT,
                 out: TextIO | None = None, err: TextIO | None = None, watch: bool = False):
        self.topology = topology
        self.watch = watch
        self.config_path = config_path
        self.start_timeout = start_timeout
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.children: list[Child] = []
        self.running = False        # every node came up; a death now is reported, not fatal
        self.stopping = False
        self.hurry = asyncio.Event()  # set by a second stop signal: kill without waiting
        self.reload_wanted = asyncio.Event()   # SIGHUP, or --watch saw the file change
        self._take(topology)

    def _take(self, topology: config.Topology) -> None:
        self.topology = topology
        self.members = members(topology)
        # A draining node is given its whole drain_timeout before it is killed.
        self.stop_grace = STOP_GRACE + max((n.limits.drain_timeout for n in topology.nodes), default=0.0)
        self.name_width = max([len(m.name) for m in self.members] + [len(c.member.name) for c in self.children]
                              + [4])

    # ------------------------------------------------------------------ the whole run

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        first_signal: list[float] = []

        def on_signal() -> None:
            # A second Ctrl-C while stopping means "now": skip the grace period.
            # Not one within a second of the first: timeout(1) and some
            # supervisors deliver the same stop to the process and its group.
            now = loop.time()
            if first_signal and now - first_signal[0] >= REPEAT_SIGNAL_AFTER:
                self.hurry.set()
            if not first_signal:
                first_signal.append(now)
            stop.set()

        stop_signals = (signal.SIGINT, signal.SIGTERM)
        for sig in stop_signals:
            loop.add_signal_handler(sig, on_signal)
        # SIGHUP reloads (nginx's meaning), also before every node is up: it is taken then.
        loop.add_signal_handler(signal.SIGHUP, self.reload_wanted.set)
        watcher = None
        if self.watch and self.config_path is not None:
            from edge.watch import watch
            watcher = loop.create_task(watch(self.config_path, self.reload_wanted.set), name="watch")
        elif self.watch:
            self._say(self.err, "edge up: --watch: nothing to watch with the built-in topology; give --config FILE")
        try:
            return await self._run(stop)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            for sig in (*stop_signals, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _run(self, stop: asyncio.Event) -> int:
        try:
            made = await asyncio.to_thread(devcerts.ensure, self.topology)
        except (OSError, ValueError) as exc:
            self._say(self.err, f"edge up: cannot make throw-away certificates in {self.topology.state_dir}: {exc}")
            self._say(self.err, "edge up: nothing started")
            return 1
        for site in made:
            self._say(self.out, f"edge up: made a throw-away certificate for site {site.name} "
                                f"({site.tls_cert}), signed by {devcerts.ca_path(self.topology)}")
        config_problems = await asyncio.to_thread(checks.problems, self.topology)
        if config_problems:
            for problem in config_problems:
                self._say(self.err, f"edge up: config error: {problem}")
            self._say(self.err, "edge up: nothing started")
            return 2
        problems = [p for m in self.members for p in preflight(m)]
        if problems:
            for problem in problems:
                self._say(self.err, f"edge up: {problem}")
            if any(NOT_ON_THIS_MACHINE in p for p in problems):
                self._say(self.err, "edge up: runs a whole topology on one machine; for one spread "
                                    "over hosts, run `edge run NODE --config FILE` on each host "
                                    "(see deploy/systemd/)")
            self._say(self.err, "edge up: nothing started")
            return 1
        exit_code = 0
        try:
            await self._start_all(stop)
            self._print_ready()
            self.running = True
            await self._supervise(stop)
            if not stop.is_set():
                self._say(self.err, "edge up: every node has exited; nothing left to supervise")
                exit_code = 1
        except StartFailure as exc:
            self._say(self.err, f"edge up: {exc}")
            self._say(self.err, "edge up: stopping the other nodes")
            exit_code = 1
        except Interrupted:
            self._say(self.err, "edge up: interrupted before every node was up")
        finally:
            await self._stop_all()
        return exit_code

    # ------------------------------------------------------------------ starting

    async def _start_all(self, stop: asyncio.Event) -> None:
        await self._start(self.members, stop)

    async def _start(self, wanted: Iterable[Member], stop: asyncio.Event) -> list[Child]:
        """Start `wanted`, parents first, each group healthy before the next; the children started."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        timeout = aiohttp.ClientTimeout(total=HEALTH_PROBE_TIMEOUT)
        wanted = list(wanted)
        children = []
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for role in START_ORDER:
                group = [m for m in wanted if m.role == role]
                if not group:
                    continue
                started = [await self._spawn(m) for m in group]
                children += started
                await self._wait_healthy(started, session, deadline, stop)
        return children

    def _command(self, member: Member) -> list[str]:
        command = [sys.executable, "-m", "edge", "run", member.name]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        if member.role in ("l1", "l2") and self.topology.node(member.name).workers is None:
            # A whole CDN on one machine: one process per node unless the file asks for
            # workers (each node taking every CPU would start nodes x CPUs processes).
            command += ["--workers", "1"]
        return command

    async def _spawn(self, member: Member) -> Child:
        command = self._command(member)
        # Unbuffered, so that a child's log lines reach the operator as they happen.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            process = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=env,
                limit=LINE_LIMIT,
                # Its own process group: a terminal's Ctrl-C reaches only the
                # launcher, which then stops the children in an orderly way.
                process_group=0,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            raise StartFailure(f"{member.name}: cannot run {' '.join(command)}: "
                               f"{exc.strerror or exc}") from None
        assert process.stdout is not None
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        child = Child(member, process, tail=tail,
                      exited=asyncio.create_task(process.wait()),
                      forwarder=asyncio.create_task(
                          self._forward_output(member.name, process.stdout, tail)))
        child.exited.add_done_callback(lambda _task: self._on_exit(child))
        self.children.append(child)
        return child

    async def _wait_healthy(self, group: list[Child], session: aiohttp.ClientSession,
                            deadline: float, stop: asyncio.Event) -> None:
        """Return when every child of `group` answers /healthz with 200.

        Raises StartFailure when any child started so far exits, or the
        deadline passes; Interrupted when a stop signal arrives.
        """
        loop = asyncio.get_running_loop()
        probes = {asyncio.create_task(self._probe_until_healthy(c, session)): c for c in group}
        exits = {c.exited: c for c in self.children}
        stop_wait = asyncio.create_task(stop.wait())
        pending = set(probes)
        try:
            while pending:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    late = [probes[t] for t in pending]
                    raise StartFailure("; ".join(
                        f"{c.member.name} not healthy after {self.start_timeout:g}s "
                        f"(http://{c.member.admin}/healthz: {c.last_probe})" + self._tail_text(c)
                        for c in late))
                done, _ = await asyncio.wait(pending | set(exits) | {stop_wait}, timeout=remaining,
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    raise Interrupted()
                for task in done & set(exits):
                    child = exits[task]
                    await self._drain_output(child)
                    raise StartFailure(f"{child.member.name} {exit_text(child.process.returncode)} "
                                       "before it was healthy" + self._tail_text(child))
                pending -= done
        finally:
            for task in (*probes, stop_wait):
                task.cancel()
            await asyncio.gather(*probes, stop_wait, return_exceptions=True)

    async def _probe_until_healthy(self, child: Child, session: aiohttp.ClientSession) -> None:
        url = f"http://{child.member.admin}/healthz"
        while True:
            try:
                async with session.get(url) as response:
                    body = await response.text()
                    claimed = _claimed_node(body)
                    if claimed not in (None, child.member.name):
                        # Not our child: some other process holds this admin address.
                        child.last_probe = f"answered by another node, {claimed!r}"
                    elif response.status == 200:
                        return
                    else:
                        child.last_probe = f"answered {response.status} {body[:200].strip()}"
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                child.last_probe = str(exc) or type(exc).__name__
            await asyncio.sleep(HEALTH_POLL_INTERVAL)

    # ------------------------------------------------------------------ running

    def _print_ready(self) -> None:
        for child in self.children:
            self._say(self.out, f"started {child.member.name} pid {child.process.pid}")
        self._say(self.out, "")
        self._say(self.out, node_table(self.members))
        self._say(self.out, "")
        ca = devcerts.ca_path(self.topology)
        commands = try_commands(self.topology, self.config_path, ca if ca.exists() else None)
        if commands:
            self._say(self.out, "Try:")
            for command in commands:
                self._say(self.out, f"  {command}")
            self._say(self.out, "")
        if self.topology.dns is not None:
            self._say(self.out, f"Status page: {self.topology.dns.admin.url}/")
            self._say(self.out, "")
        self._say(self.out, f"edge up: {len(self.children)} nodes up; "
                            f"SIGHUP (kill -HUP {os.getpid()}) reloads the topology; "
                            "Ctrl-C or SIGTERM stops them all")

    async def _supervise(self, stop: asyncio.Event) -> None:
        """Wait for a stop signal, or for every child to have exited; reload when asked to."""
        while self.children:
            stop_wait = asyncio.create_task(stop.wait())
            reload_wait = asyncio.create_task(self.reload_wanted.wait())
            # asyncio.wait, unlike gather, never cancels what it waits for.
            all_exited = asyncio.create_task(asyncio.wait([c.exited for c in self.children]))
            waits = (stop_wait, reload_wait, all_exited)
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in waits:
                    task.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
            if stop.is_set() or all_exited in done:
                return
            self.reload_wanted.clear()
            # A stop signal does not wait for a reload (its drains and confirmations take
            # seconds): whatever the reload started or was stopping, _stop_all stops.
            reloading = asyncio.create_task(self._reload(stop))
            stop_wait = asyncio.create_task(stop.wait())
            try:
                await asyncio.wait((reloading, stop_wait), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (reloading, stop_wait):
                    task.cancel()
                await asyncio.gather(reloading, stop_wait, return_exceptions=True)
            if reloading.done() and not reloading.cancelled() and reloading.exception() is not None:
                # A bug: say so and keep supervising the nodes, which run on as they were.
                self._say(self.err, f"edge up: !!! reload failed: {reloading.exception()!r}")

    # ------------------------------------------------------------------ reloading

    async def _reload(self, stop: asyncio.Event) -> None:
        """Apply the topology file as it is now (see the module's docstring); refuse a bad one."""
        where = self.config_path or config.DEFAULT_TOPOLOGY
        try:
            topology, sha256, _ = await asyncio.to_thread(reload.read, self.config_path)
            await asyncio.to_thread(devcerts.ensure, topology)     # a site added with its files in state_dir
            problems = await asyncio.to_thread(checks.problems, topology)
        except ConfigError as exc:
            problems = [exc]
        except (OSError, ValueError) as exc:
            problems = [f"cannot make throw-away certificates: {exc}"]
        if problems:
            for problem in problems:
                self._say(self.err, f"edge up: reload refused, every node keeps running as it is: "
                                    f"config error: {problem}")
            return
        new = {m.name: m for m in members(topology)}
        # A node that died is started again if the topology still has it.
        for child in [c for c in self.children if c.process.returncode is not None]:
            self.children.remove(child)
        removed = [c for c in self.children if c.member.name not in new]
        restart = [c for c in self.children
                   if c.member.name in new and reload.restart_needed(self.topology, topology, c.member.name)]
        signalled = [c for c in self.children if c.member.name in new and c not in restart]
        running = {c.member.name for c in self.children}
        added = [m for name, m in new.items() if name not in running]
        plan = "; ".join(f"{verb} {', '.join(names)}" for verb, names in (
            ("start", [m.name for m in added]), ("restart", [c.member.name for c in restart]),
            ("reload", [c.member.name for c in signalled]), ("stop", [c.member.name for c in removed])) if names)
        self._say(self.err, f"edge up: reloading {where} ({reload.describe_changes(self.topology, topology)}): "
                            f"{plan}")
        bind_problems = [p for m in added for p in preflight(m)]
        if bind_problems:
            for problem in bind_problems:
                self._say(self.err, f"edge up: reload refused, every node keeps running as it is: {problem}")
            return
        previous, before = self.topology, list(self.children)
        self._take(topology)
        try:
            # New nodes first: told about a new parent, the others find it up.
            started = await self._start(added, stop)
        except StartFailure as exc:
            self._say(self.err, f"edge up: reload refused, every other node keeps running as it is: {exc}")
            await self._retire([c for c in self.children if c not in before], "its start failed")
            self._take(previous)
            return
        except Interrupted:
            return
        if restart:
            await self._retire(restart, "restarting: a setting changed that it cannot take running")
            try:
                started += await self._start([new[c.member.name] for c in restart], stop)
            except StartFailure as exc:
                self._say(self.err, f"edge up: !!! reload: {exc}; the other nodes are reloaded anyway")
            except Interrupted:
                return
        for child in started:
            self._say(self.out, f"started {child.member.name} pid {child.process.pid}")
        for child in signalled:
            _signal(child.process, signal.SIGHUP)
        lagging = await self._confirm(signalled, sha256)
        for child, seen in lagging:
            self._say(self.err, f"edge up: {child.member.name} did not take the new topology within "
                                f"{RELOAD_CONFIRM_TIMEOUT:g}s ({seen}); see its log above")
        if removed:
            await self._retire(removed, "removed from the topology")
        self._say(self.err, f"edge up: reloaded {where}" + (f"; {len(lagging)} nodes did not follow"
                                                              if lagging else ""))

    async def _confirm(self, children: list[Child], sha256: str) -> list[tuple[Child, str]]:
        """Wait until every child's /healthz reports the topology `sha256`; those that did not, and why."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOAD_CONFIRM_TIMEOUT
        seen = {id(child): "not asked yet" for child in children}
        waiting = list(children)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HEALTH_PROBE_TIMEOUT)) as session:
            while waiting and loop.time() < deadline:
                for child in list(waiting):
                    try:
                        async with session.get(f"http://{child.member.admin}/healthz") as response:
                            body = await response.text()
                        state = json.loads(body)
                        running = state.get("config_sha256") if isinstance(state, dict) else None
                        if running == sha256:
                            waiting.remove(child)
                        else:
                            seen[id(child)] = f"it still runs {str(running)[:12]}"
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                        seen[id(child)] = f"/healthz: {exc or type(exc).__name__}"
                if waiting:
                    await asyncio.sleep(HEALTH_POLL_INTERVAL)
        return [(child, seen[id(child)]) for child in waiting]

    async def _retire(self, children: list[Child], why: str) -> None:
        """Stop these children (a reload no longer wants them as they are) and forget them."""
        for child in children:
            child.retiring = True
            if child.process.returncode is None:
                _signal(child.process, signal.SIGTERM)
        exits = [c.exited for c in children]
        await asyncio.wait(exits, timeout=self.stop_grace)
        for child in children:
            if not child.exited.done():
                self._say(self.err, f"edge up: killing {child.member.name} (no exit within {self.stop_grace:g}s)")
                _signal(child.process, signal.SIGKILL)
        await asyncio.gather(*exits)
        for child in children:
            await self._drain_output(child)
            self.children.remove(child)
            self._say(self.err, f"edge up: stopped {child.member.name} pid {child.process.pid} "
                                f"({exit_text(child.process.returncode)}; {why})")

    def _on_exit(self, child: Child) -> None:
        if self.running and not self.stopping and not child.retiring:
            command = " ".join(["edge", *self._command(child.member)[3:]])
            self._say(self.err, f"edge up: !!! {child.member.name} (pid {child.process.pid}) "
                                f"{exit_text(child.process.returncode)} unexpectedly; the other "
                                f"nodes keep running (run it by hand with: {command})")

    # ------------------------------------------------------------------ stopping

    async def _stop_all(self) -> None:
        self.stopping = True
        if not self.children:
            return
        alive = [c for c in self.children if c.process.returncode is None]
        for child in alive:
            _signal(child.process, signal.SIGTERM)
        if alive:
            all_exited = asyncio.gather(*(c.exited for c in alive))
            hurry = asyncio.create_task(self.hurry.wait())
            await asyncio.wait({all_exited, hurry}, timeout=self.stop_grace,
                               return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
            await asyncio.gather(hurry, return_exceptions=True)
        for child in alive:
            if not child.exited.done():
                why = "a second stop signal" if self.hurry.is_set() else f"no exit within {self.stop_grace:g}s"
                self._say(self.err, f"edge up: killing {child.member.name} ({why})")
                _signal(child.process, signal.SIGKILL)
        await asyncio.gather(*(c.exited for c in self.children))
        for child in self.children:
            await self._drain_output(child)
        for child in self.children:
            self._say(self.err, f"edge up: stopped {child.member.name} pid {child.process.pid} "
                                f"({exit_text(child.process.returncode)})")
        self._say(self.err, f"edge up: all {len(self.children)} nodes stopped")

    # ------------------------------------------------------------------ output

    async def _forward_output(self, name: str, stream: asyncio.StreamReader,
                              tail: deque[str]) -> None:
        prefix = f"{name:>{self.name_width}} | "
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                # Longer than LINE_LIMIT: asyncio has dropped it; say so rather than stall.
                raw = b"(output line too long; dropped)\n"
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            tail.append(line)
            self._say(self.err, prefix + line)

    async def _drain_output(self, child: Child) -> None:
        """Let the forwarder reach end of output, so a dead child's last words are in its tail."""
        await asyncio.wait([child.forwarder], timeout=OUTPUT_DRAIN_TIMEOUT)

    def _tail_text(self, child: Child) -> str:
        if not child.tail:
            return " (no output)"
        return "; its last output:\n" + "\n".join(f"    {line}" for line in child.tail)

    @staticmethod
    def _say(stream: TextIO, text: str) -> None:
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):
            # Whoever read our output has gone (`edge up | head`, a closed
            # terminal: EPIPE, EIO); keep supervising rather than crash with
            # children still running.
            pass


def _claimed_node(healthz_body: str) -> str | None:
    """The node name a /healthz answer gives, if it gives one."""
    try:
        state = json.loads(healthz_body)
    except ValueError:
        return None
    name = state.get("node") if isinstance(state, dict) else None
    return name if isinstance(name, str) else None


def exit_text(returncode: int | None) -> str:
    """How a child process ended, for a log line: its status, or the signal that killed it."""
    if returncode is not None and returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _signal(process: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    try:
        process.send_signal(sig)
    except ProcessLookupError:
        pass   # it exited between our check and the signal


# --------------------------------------------------------------------------- checks and text


def preflight(member: Member) -> list[str]:
    """Problems binding the member's addresses, found before anything is started.

    A child would report a busy address too, but a busy admin address may be
    held by another running edge whose /healthz answers 200, which would make
    a failed start look healthy.  Binding first rules that out.
    """
    problems = []
    if member.admin.port == 0:
        problems.append(f"{member.name}: admin address {member.admin} has port 0; "
                        "`edge up` needs a fixed port to health-check it")
    wanted = [(member.traffic, p, "traffic") for p in member.traffic_protocols]
    if member.traffic_tls is not None:
        wanted.append((member.traffic_tls, "tcp", "HTTPS"))
    wanted.append((member.admin, "tcp", "admin"))
    for address, protocol, purpose in wanted:
        if address.port == 0:
            continue
        problem = _bind_problem(address, protocol)
        if problem:
            problems.append(f"{member.name}: cannot start: {purpose} address {address} "
                            f"({protocol}): {problem}")
    return problems


def _bind_problem(address: config.Address, protocol: str) -> str | None:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    kind = socket.SOCK_DGRAM if protocol == "udp" else socket.SOCK_STREAM
    try:
        with socket.socket(family, kind) as sock:
            if kind == socket.SOCK_STREAM:
                # As the servers do, so that a recently closed listener's
                # TIME_WAIT connections do not count as "in use".
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
    except OSError as exc:
        hint = {
            errno.EADDRINUSE: " (another process is listening there; is another `edge up` running?)",
            errno.EADDRNOTAVAIL: f" ({NOT_ON_THIS_MACHINE})",
            errno.EACCES: " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
        }.get(exc.errno, "")
        return f"{exc.strerror or exc}{hint}"
    return None


def node_table(found: Iterable[Member]) -> str:
    rows = [("NODE", "ROLE", "TRAFFIC", "ADMIN")]
    for m in found:
        traffic = f"{m.traffic} ({'+'.join(m.traffic_protocols)})" if m.role == "dns" else m.traffic.url
        rows.append((m.name, m.role, traffic, m.admin.url))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:3], widths)) + "  " + row[3]
        for row in rows)


def try_commands(topology: config.Topology, config_path: Path | None, ca: Path | None = None) -> list[str]:
    """Commands an operator can paste to see the CDN work, from the topology itself.

    `ca`: the CA that signed the sites' certificates (edge up's throw-away one), for the HTTPS line.
    """
    commands = []
    l1s = topology.by_role("l1")
    site_host = topology.sites[0].hosts[0] if topology.sites else None
    if l1s and site_host:
        edge = l1s[0]
        commands.append(f"curl -sI -H 'Host: {site_host}' {edge.listen.url}/")
    tls_l1 = next((n for n in l1s if n.listen_tls is not None), None)
    tls_site = next((s for s in topology.sites if s.tls_cert is not None), None)
    if tls_l1 is not None and tls_site is not None and tls_l1.listen_tls is not None:
        address, host = tls_l1.listen_tls, tls_site.hosts[0]
        trust = f"--cacert {ca} " if ca is not None else ""
        commands.append(f"curl -sI {trust}--resolve {host}:{address.port}:{address.host} "
                        f"https://{host}:{address.port}/")
    if l1s:
        commands.append(f"curl -s {l1s[0].admin.url}/metrics | grep edge_requests_total")
    if topology.dns is not None and site_host:
        listen = topology.dns.listen
        commands.append(f"dig @{listen.host} -p {listen.port} {site_host}")
        client = next((str(net.network_address + 1) for net, _ in topology.coverage), "127.0.0.1")
        commands.append(f"curl -s '{topology.dns.admin.url}/explain?name={site_host}&client={client}'")
    config_arg = f" --config {config_path}" if config_path is not None else ""
    commands.append(f"edge prometheus-config{config_arg} > prometheus.yml")
    return commands


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the launcher dies, even by SIGKILL (Linux).

    Without it a killed launcher would leave every node running.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass    # not Linux: the launcher's own signal handling still stops the nodes

