"""The `edge` command line: run one node, bring up a whole topology, print configs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from edge import __version__, config, reload

log = logging.getLogger("edge")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge", description="An L1/L2 caching CDN with a DNS scheduler.")
    parser.add_argument("--version", action="version", version=f"edge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", metavar="FILE", type=Path, default=None,
                       help="topology TOML file (default: the built-in deploy/local.toml)")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        return p

    run = with_config(sub.add_parser("run", help="run one node of the topology in the foreground"))
    run.add_argument("node", metavar="NODE", nargs="?",
                     help="node name from the topology, or 'dns' for the scheduler")
    run.add_argument("--node", dest="node_option", metavar="NODE", help="the same, as an option")
    up = with_config(sub.add_parser("up", help="start every node of the topology and wait; SIGHUP reloads, "
                                               "Ctrl-C stops all"))
    for p in (run, up):
        p.add_argument("--watch", action="store_true",
                       help="reload when the topology file changes (as SIGHUP does)")
    with_config(sub.add_parser("check", help="validate the topology file and print its nodes"))
    prometheus = with_config(sub.add_parser("prometheus-config",
                                            help="print a Prometheus scrape config for the topology"))
    prometheus.add_argument("--interval", metavar="SECONDS", type=_seconds, default=15.0,
                            help="scrape and evaluation interval (default: 15)")
    return parser


def _seconds(text: str) -> float:
    from edge.launcher import prometheus_duration
    try:
        value = float(text)
        prometheus_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if (args.node is None) == (args.node_option is None):
            parser.error("run: give the node name once, as NODE or --node NODE")
        args.node = args.node or args.node_option
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        if args.command == "run":
            topology, sha256, mtime = reload.read(args.config)
            return _run(topology, args.node, reload.Reloader(args.config, args.node, topology, sha256, mtime),
                        args.watch)
        topology = config.load(args.config)
        if args.command == "up":
            from edge import launcher
            return launcher.up(topology, args.config, watch=args.watch)
        if args.command == "check":
            return _check(topology)
        if args.command == "prometheus-config":
            from edge import launcher
            sys.stdout.write(launcher.prometheus_config(topology, args.interval))
            return 0
    except config.ConfigError as exc:
        print(f"edge: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


def _check(topology: config.Topology) -> int:
    """`edge check`: the file, and what a node would refuse at start (edge.checks); exit 2 on any problem."""
    from edge import checks
    problems = checks.problems(topology)
    for problem in problems:
        print(f"edge: config error: {problem}", file=sys.stderr)
    if problems:
        return 2
    for node in topology.nodes:
        print(f"{node.name:12} {node.role:7} traffic {node.listen}  admin {node.admin}")
    if topology.dns:
        print(f"{'dns':12} {'dns':7} dns     {topology.dns.listen}  admin {topology.dns.admin}")
    return 0


def _run(topology: config.Topology, name: str, reloader: reload.Reloader, watch: bool) -> int:
    """Run one node until SIGTERM or SIGINT, reloading on SIGHUP (and, with `watch`, when the
    file changes); a bind failure is one clear line, exit 1."""
    if name == "dns":
        if topology.dns is None:
            raise config.ConfigError(topology.source, "dns", "no [dns] table: this topology has no scheduler")
        from edge.scheduler.service import serve
        target = "dns"
        serve_fn = lambda stop: serve(topology, stop, reloader)  # noqa: E731
    else:
        node = topology.node(name)
        from edge import node as node_runner
        target = node.name
        serve_fn = lambda stop: node_runner.serve(topology, node, stop, reloader)  # noqa: E731
    if watch and reloader.path is None:
        log.warning("--watch: nothing to watch with the built-in topology; give --config FILE")

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        # SIGHUP (`systemctl reload`, `edge up` passing a reload on) re-reads the topology.
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        watcher = None
        if watch and reloader.path is not None:
            from edge.watch import watch as watch_file
            watcher = loop.create_task(watch_file(reloader.path, reloader.request), name="watch")
        try:
            await serve_fn(stop)
        finally:
            if watcher is not None:
                watcher.cancel()
                await asyncio.gather(watcher, return_exceptions=True)
            await reloader.close()

    try:
        uvloop.run(run())       # every process runs on uvloop
    except OSError as exc:
        print(f"edge: {target}: cannot start: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
