"""Render the configuration files (peers' and our topology) into a run directory.

The files in ``benchmarks/peers/`` and ``benchmarks/topology.toml`` are
templates with ``{{name}}`` placeholders for addresses and paths; every
placeholder must be known, so a typo fails loudly instead of producing a
config that silently listens somewhere else.

``nginx.conf`` is rendered twice (the "logs off" and "logs on" nginx of the
hit scenario), differing only in name, addresses and the ``access_log`` line.
The certificate our L1 and nginx serve over HTTPS is made here too, in the
run directory, by the product's own code for ``edge up``.
"""

from __future__ import annotations

import re
from pathlib import Path

from benchmarks import layout

BENCH_DIR = Path(__file__).resolve().parent
PEERS_DIR = BENCH_DIR / "peers"
TOPOLOGY_TEMPLATE = BENCH_DIR / "topology.toml"
MEMORY_TOPOLOGY_TEMPLATE = BENCH_DIR / "topology-memory.toml"
MEM_ORIGIN_DIR = "mem-origin"      # the memory scenario's origin: fast-origin.conf with its own paths
# bench.example.com's certificate and key (our L1's listen_tls and nginx's HTTPS
# server), inside the topology's state_dir so that edge/devcerts.py makes them.
TLS_CERT = "state/tls/bench.pem"
TLS_KEY = "state/tls/bench.key"

_PLACEHOLDER = re.compile(r"\{\{([a-z_0-9]+)\}\}")


class TemplateError(ValueError):
    pass


def fill(text: str, values: dict[str, str], source: str = "<template>") -> str:
    """Replace every ``{{name}}``; an unknown name is an error."""
    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise TemplateError(f"{source}: unknown placeholder {{{{{name}}}}}")
        return values[name]
    return _PLACEHOLDER.sub(substitute, text)


NGINX_ACCESS_LOG_FILE = "nginx-access.log"     # in the run directory
# How an operator runs nginx: the combined format, buffered, flushed every second.
NGINX_ACCESS_LOG_PARAMS = "combined buffer=64k flush=1s"
# nginx-l1-logs's HTTPS server: one line per request, unbuffered, in nginx.conf's
# "tls" format (whether the TLS session was resumed first).
NGINX_TLS_ACCESS_LOG_FILE = "nginx-tls-access.log"


def nginx_variants(run_dir: Path) -> dict[str, dict[str, str]]:
    """The two renderings of nginx.conf: role -> the placeholders that differ."""
    return {
        "nginx_l1": {"nginx_name": "nginx-l1", "nginx_listen": str(layout.NGINX_L1),
                     "nginx_listen_tls": str(layout.NGINX_L1_TLS), "nginx_listen_h2": str(layout.NGINX_L1_H2),
                     "nginx_access_log": "off", "nginx_tls_access_log": "off"},
        "nginx_l1_logs": {"nginx_name": "nginx-l1-logs", "nginx_listen": str(layout.NGINX_L1_LOGS),
                          "nginx_listen_tls": str(layout.NGINX_L1_LOGS_TLS),
                          "nginx_listen_h2": str(layout.NGINX_L1_LOGS_H2),
                          "nginx_access_log": f"{run_dir / NGINX_ACCESS_LOG_FILE} {NGINX_ACCESS_LOG_PARAMS}",
                          "nginx_tls_access_log": f"{run_dir / NGINX_TLS_ACCESS_LOG_FILE} tls"},
    }


def values(run_dir: Path) -> dict[str, str]:
    """Every placeholder the templates may use."""
    return {
        "run_dir": str(run_dir),
        "peers_dir": str(PEERS_DIR),
        "origin": str(layout.ORIGIN),
        "origin_host": layout.ORIGIN.host,
        "origin_port": str(layout.ORIGIN.port),
        "fast_origin": str(layout.FAST_ORIGIN),
        "nginx_l1": str(layout.NGINX_L1),
        "nginx_l2": str(layout.NGINX_L2),
        "nginx_l1_logs": str(layout.NGINX_L1_LOGS),
        "ats_host": layout.ATS.host,
        "ats_port": str(layout.ATS.port),
        "knot_host": layout.KNOT.host,
        "knot_port": str(layout.KNOT.port),
        "tls_cert": str(run_dir / TLS_CERT),
        "tls_key": str(run_dir / TLS_KEY),
    }


def render(template: Path, destination: Path, run_dir: Path, extra: dict[str, str] | None = None) -> Path:
    destination.parent.mkdir(parents=True, exist_ok=True)
    known = {**values(run_dir), **(extra or {})}
    destination.write_text(fill(template.read_text(), known, str(template)))
    return destination


def make_certificates(topology_path: Path) -> Path:
    """The site certificates the topology names, signed by a throw-away CA; returns the CA's file.

    The product's own ``edge up`` code (edge/devcerts.py) makes them: every
    site whose ``tls_cert`` and ``tls_key`` are missing files inside the
    topology's state_dir.  A fresh run directory must get bench.example.com's.
    """
    from edge import config, devcerts
    topology = config.load(topology_path)
    made = [site.name for site in devcerts.ensure(topology)]
    if made != ["bench"]:
        raise RuntimeError(f"expected a certificate for site bench in {topology.state_dir}, made {made}")
    return devcerts.ca_path(topology)


def render_all(run_dir: Path) -> dict[str, Path]:
    """Write every config into ``run_dir``; returns them by role."""
    topology = render(TOPOLOGY_TEMPLATE, run_dir / "topology.toml", run_dir)
    out = {
        "topology": topology,
        "tls_ca": make_certificates(topology),
        **{role: render(PEERS_DIR / "nginx.conf", run_dir / f"{extra['nginx_name']}.conf", run_dir, extra)
           for role, extra in nginx_variants(run_dir).items()},
        "nginx_l2": render(PEERS_DIR / "nginx-l2.conf", run_dir / "nginx-l2.conf", run_dir),
        "fast_origin": render(PEERS_DIR / "fast-origin.conf", run_dir / "fast-origin.conf", run_dir),
        "memory_topology": render(MEMORY_TOPOLOGY_TEMPLATE, run_dir / "topology-memory.toml", run_dir),
        # Its own prefix (pid, temp and root paths) and address: it can run beside the miss path's.
        "mem_origin": render(PEERS_DIR / "fast-origin.conf", run_dir / MEM_ORIGIN_DIR / "fast-origin.conf",
                             run_dir / MEM_ORIGIN_DIR, {"fast_origin": str(layout.MEM_ORIGIN)}),
        "varnish": render(PEERS_DIR / "varnish.vcl", run_dir / "varnish.vcl", run_dir),
        "knot": render(PEERS_DIR / "knot.conf", run_dir / "knot.conf", run_dir),
        "ats_runroot": render(PEERS_DIR / "ats" / "runroot.yaml", run_dir / "ats" / "runroot.yaml", run_dir),
    }
    for name in ("records.config", "remap.config", "storage.config", "ip_allow.yaml", "logging.yaml"):
        render(PEERS_DIR / "ats" / name, run_dir / "ats" / "etc" / name, run_dir)
    # ATS expects these to exist, even empty.
    for name in ("plugin.config", "parent.config", "cache.config", "hosting.config", "sni.yaml",
                 "ssl_multicert.config", "volume.config", "strategies.yaml", "splitdns.config",
                 "socks.config"):
        (run_dir / "ats" / "etc" / name).touch()
    for directory in ("nginx-l1", "nginx-l1-logs", "nginx-l2", "fast-origin/www", f"{MEM_ORIGIN_DIR}/fast-origin/www",
                      "knot", "ats/cache", "ats/run", "ats/log", "ats/var", "ats/data", "varnish", "state"):
        (run_dir / directory).mkdir(parents=True, exist_ok=True)
    # nginx's workers run as www-data: the master (root) creates the temp and
    # cache directories itself and hands them over, so they are not made here;
    # everything else must be readable by the unprivileged workers.
    run_dir.chmod(0o755)
    for origin_dir in (run_dir, run_dir / MEM_ORIGIN_DIR):
        (origin_dir / "fast-origin" / "www" / "object").write_bytes(bytes(i % 251 for i in range(1024)))
    return out
