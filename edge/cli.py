"""The `edge` command line: run one node, bring up a whole topology, print configs."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
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
    run.add_argument("--listen-host", metavar="HOST", type=_listen_host,
                     help="bind every listener on HOST (e.g. 0.0.0.0 in a container) at the topology's ports; "
                          "the topology's addresses stay what others use to reach this node")
    run.add_argument("--workers", type=_workers, metavar="N",
                     help="worker processes for a cache node, instead of its `workers` key (default: that key, "
                          "else the CPUs this process may use)")
    # Set by a node's main process on the workers it starts (edge.workers); not for operators.
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    run.add_argument("--run-token", default=None, help=argparse.SUPPRESS)
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
    k8s = with_config(sub.add_parser("k8s", help="print Kubernetes manifests for the topology (multi-document YAML)"))
    k8s.add_argument("--namespace", default="edge", type=_dns_label, help="namespace of every object (default: edge)")
    k8s.add_argument("--image", default=f"edge-cdn:{__version__}",
                     help=f"container image, built from deploy/Dockerfile (default: edge-cdn:{__version__})")
    k8s.add_argument("--l1", choices=["deployment", "daemonset"], default="deployment",
                     help="L1s as Deployments behind LoadBalancer Services (default), or as DaemonSets on the "
                          "host network of the machine labelled edge-cdn/node=NAME")
    k8s.add_argument("--storage-class", metavar="NAME", help="of the L2s' cache volumes (default: the cluster's)")
    k8s.add_argument("--object-size", metavar="SIZE", type=_size, default="32KiB",
                     help="average object on disk, for the disk index's RAM and the volume's slack (default: 32KiB)")
    k8s.add_argument("--cluster-domain", default="cluster.local", metavar="DOMAIN", type=_dns_name,
                     help="the cluster's DNS domain, in the Services' names (default: cluster.local)")
    k8s.add_argument("--output", metavar="DIR", type=Path,
                     help="write one file per object and topology.toml there instead of printing")
    _ops_parsers(sub, with_config)
    return parser


def _dns_label(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(f"expected a DNS label (lower-case letters, digits, '-'), got {text!r}")
    return text


def _dns_name(text: str) -> str:
    if not all(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", label) for label in text.rstrip(".").split(".")):
        raise argparse.ArgumentTypeError(f"expected a DNS name such as cluster.local, got {text!r}")
    return text.rstrip(".")


def _size(text: str) -> int:
    size = config.parse_size(text)
    if not size:
        raise argparse.ArgumentTypeError(f"expected a size such as 32KiB or 1MiB, got {text!r}")
    return size


def _workers(text: str) -> int:
    from edge.config import MAX_WORKERS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"expected 1 to {MAX_WORKERS} processes, got {text!r}")
    return value


def _seconds(text: str) -> float:
    from edge.launcher import prometheus_duration
    try:
        value = float(text)
        prometheus_duration(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    return value


def _listen_host(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an IP address such as 0.0.0.0 or ::, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if (args.node is None) == (args.node_option is None):
            parser.error("run: give the node name once, as NODE or --node NODE")
        args.node = args.node or args.node_option
    worker = getattr(args, "worker", None)
    # A worker's lines say which worker wrote them: they share the node's stderr.
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format="%(asctime)s %(name)s" + (f"[w{worker}]" if worker is not None else "")
                        + " %(levelname)s %(message)s")
    try:
        if args.command == "run":
            topology, sha256, mtime = reload.read(args.config)
            return _run(topology, args.node, reload.Reloader(args.config, args.node, topology, sha256, mtime),
                        args.watch, args)
        if args.command == "k8s":
            return _k8s(args)
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
        if args.command in OPS_COMMANDS:
            return _ops(topology, args)
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


def _k8s(args: argparse.Namespace) -> int:
    """`edge k8s`: the manifests on stdout (or one file each in --output DIR); what the operator
    must create first (the Secret of the topology's files, a claim) on stderr."""
    import os
    from edge import k8s
    if args.config is None:
        text, source, base_dir = config.default_text(), config.DEFAULT_TOPOLOGY, Path.cwd()
    else:
        try:
            text = args.config.read_text()
        except OSError as exc:
            raise config.ConfigError(str(args.config), "(file)", exc.strerror or str(exc)) from None
        source, base_dir = str(args.config), args.config.parent
    options = k8s.Options(namespace=args.namespace, image=args.image, l1=args.l1, storage_class=args.storage_class,
                          object_size=args.object_size, cluster_domain=args.cluster_domain)
    manifests = k8s.render(text, source, base_dir, options)
    if args.output is None:
        sys.stdout.write(k8s.to_yaml(manifests))
    else:
        written = k8s.write_directory(manifests, args.output)
        print(f"edge k8s: wrote {len(written)} files to {args.output}", file=sys.stderr)
    for need in manifests.needs:
        print(f"edge k8s: needs {need}", file=sys.stderr)
    if manifests.secret_files:
        files = " ".join(f"--from-file={key}={os.path.relpath(here)}" for key, here, _ in manifests.secret_files)
        print(f"edge k8s: kubectl create secret generic {k8s.PREFIX}files -n {args.namespace} {files}",
              file=sys.stderr)
    return 0


def _run(topology: config.Topology, name: str, reloader: reload.Reloader, watch: bool,
         args: argparse.Namespace | None = None) -> int:
    """Run one node until SIGTERM or SIGINT, reloading on SIGHUP (and, with `watch`, when the
    file changes); a bind failure is one clear line, exit 1.  A cache node of several workers
    runs as their supervisor (edge.workers); each worker is this same command with --worker."""
    listen_host = getattr(args, "listen_host", None)
    if name == "dns":
        if topology.dns is None:
            raise config.ConfigError(topology.source, "dns", "no [dns] table: this topology has no scheduler")
        from edge.scheduler.service import serve
        target = "dns"
        serve_fn = lambda stop: serve(topology, stop, reloader, listen_host)  # noqa: E731
    else:
        node = topology.node(name)
        from edge import node as node_runner
        from edge import workers
        target = node.name
        worker = getattr(args, "worker", None)
        count = workers.count(node, getattr(args, "workers", None)) if node.role != "origin" else 1
        if worker is not None:
            if node.role == "origin" or args.run_dir is None or args.run_token is None:
                raise config.ConfigError(topology.source, f"nodes.{name}",
                                         "--worker is for a cache node's main process to start its workers")
            slot = workers.WorkerSlot(worker, args.run_dir, args.run_token)
            target = f"{node.name} worker {worker}"
            watch = False               # the main process watches and passes reloads on
            serve_fn = lambda stop: node_runner.serve(topology, node, stop, reloader, listen_host, slot)  # noqa: E731
        elif count > 1:
            command = workers.worker_command(node.name, reloader.path, args.log_level if args else "INFO", listen_host)
            serve_fn = lambda stop: workers.supervise(  # noqa: E731
                topology, node, stop, reloader, count, command, node_runner.listen, listen_host)
        else:
            serve_fn = lambda stop: node_runner.serve(topology, node, stop, reloader, listen_host)  # noqa: E731
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


# ---------------------------------------------------------------- operating the whole CDN

OPS_COMMANDS = ("purge", "preload", "inspect", "status")


def _ops_parsers(sub, with_config) -> None:
    def with_admin(p: argparse.ArgumentParser, timeout: float = 10.0) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument("--token-file", metavar="FILE",
                       help="file holding the admin token (default: $EDGE_ADMIN_TOKEN, $EDGE_ADMIN_TOKEN_FILE)")
        p.add_argument("--timeout", type=float, default=timeout, metavar="SECONDS",
                       help=f"per call (default {timeout:g})")
        return p

    purge = with_admin(sub.add_parser(
        "purge", help="purge URLs, prefixes or tags on every cache node (L2s, then L1s)"))
    kind = purge.add_mutually_exclusive_group()
    kind.add_argument("--prefix", dest="kind", action="store_const", const="prefix",
                      help="each VALUE is a URL prefix: everything under it")
    kind.add_argument("--tag", dest="kind", action="store_const", const="tag",
                      help="each VALUE is a tag (Surrogate-Key / Cache-Tag)")
    purge.add_argument("--soft", action="store_true",
                       help="mark stale instead of removing (revalidation and stale serving keep working)")
    purge.add_argument("values", nargs="+", metavar="VALUE", help="URLs (http://HOST/PATH), prefixes or tags")

    # A preload's timeout is per URL and node: large objects take a while.
    preload = with_admin(sub.add_parser(
        "preload", help="fetch URLs into their owner L2 (and the L1s of --regions)"), timeout=60.0)
    preload.add_argument("urls", nargs="*", metavar="URL")
    preload.add_argument("--file", metavar="FILE", help="more URLs, one a line ('-': stdin; # comments)")
    preload.add_argument("--regions", metavar="R1,R2", default="",
                         help="also into the L1s of these regions ('all': every L1)")
    preload.add_argument("--concurrency", type=int, default=8, metavar="N", help="URLs at once (default 8)")
    preload.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                         help="send this request field (e.g. Accept-Encoding for a Vary variant)")

    inspect = with_admin(sub.add_parser("inspect", help="what every cache node holds for a URL"))
    inspect.add_argument("url", metavar="URL")
    inspect.add_argument("--json", action="store_true", help="the nodes' records as JSON")

    status = with_admin(sub.add_parser("status", help="one table for the whole CDN"))
    status.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="between the two metric scrapes the request rate comes from (default 1)")
    status.add_argument("--json", action="store_true", help="the table's data as JSON")


def _ops(topology: config.Topology, args: argparse.Namespace) -> int:
    """Run one operator command; 2 for bad input, found before any node is called."""
    from edge import admin
    from edge.ops import inspect, preload, purge, status

    def fail(problem: str) -> int:
        print(f"edge: {args.command}: {problem}", file=sys.stderr)
        return 2

    try:
        token = admin.load_token(token_file=args.token_file)
    except OSError as exc:
        return fail(str(exc))
    if args.timeout <= 0:
        return fail("--timeout must be positive")
    if args.command == "purge":
        kind = args.kind or "url"
        if token is None:
            return fail("no admin token: set EDGE_ADMIN_TOKEN or EDGE_ADMIN_TOKEN_FILE, or give --token-file")
        problem = purge.check_values(topology, kind, args.values)
        if problem:
            return fail(problem)
        return uvloop.run(purge.purge(topology, kind, args.values, args.soft, token, args.timeout))
    if args.command == "preload":
        urls = list(args.urls)
        if args.file:
            try:
                text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                return fail(f"{args.file}: {getattr(exc, 'strerror', None) or exc}")
            urls += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
        if not urls:
            return fail("no URLs: give them as arguments or with --file")
        if args.concurrency < 1:
            return fail("--concurrency must be at least 1")
        headers = {}
        for field in args.header:
            name, colon, value = field.partition(":")
            if not colon or not name.strip():
                return fail(f"--header {field!r}: expected 'Name: value'")
            headers[name.strip()] = value.strip()
        regions = [r.strip() for r in args.regions.split(",") if r.strip()]
        try:
            steps = preload.plan(topology, urls, regions)
        except ValueError as exc:
            return fail(str(exc))
        return uvloop.run(preload.preload(topology, steps, args.concurrency, headers, args.timeout))
    if args.command == "inspect":
        problem = purge.check_values(topology, "url", [args.url])
        if problem:
            return fail(problem)
        return uvloop.run(inspect.inspect(topology, args.url, token, args.json, args.timeout))
    if args.interval < 0:
        return fail("--interval must not be negative")
    return uvloop.run(status.status(topology, token, args.interval, args.json, args.timeout))
