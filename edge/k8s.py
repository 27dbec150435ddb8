"""`edge k8s`: Kubernetes manifests rendered from the topology.

What maps to what (README "Kubernetes" says why):

* The topology goes into a ConfigMap as a **Kubernetes copy**: the
  addresses other nodes use become Service DNS names
  (``edge-l2-a.NAMESPACE.svc.cluster.local:8080``), ``state_dir`` becomes
  the pod's cache volume, files (certificates, CA bundles) come from one
  Secret, access-log files become stdout.  Every other byte of the file is
  kept, comments included (tomlkit), and each rewritten value says what it
  was.  An L1's ``listen``/``listen_tls`` and ``[dns] listen`` are kept:
  they are what clients reach (load balancers' IPs), and what the DNS
  scheduler answers.
* Every node is one pod running ``edge run NODE --config
  /etc/edge/topology.toml --watch --listen-host 0.0.0.0``: it binds the
  topology's ports on the pod's address, and reloads when kubelet swaps
  the mounted ConfigMap (``--watch`` follows the ``..data`` symlink).
* L2s: a StatefulSet each (one replica: a node is one member of the hash
  ring) with a PersistentVolumeClaim for the disk cache; L1s: a Deployment
  each behind a LoadBalancer Service, or a DaemonSet on the host network of
  the machine labelled for it; the origin and the scheduler: Deployments.
  Every node has a headless Service (its DNS name).
* Resources come from the cache sizes (:func:`cache_resources`).

Rendering is pure (the caller reads the file and passes its text); the
output is deterministic, objects in a fixed order.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from edge import __version__, config, reload
from edge.config import ConfigError, Node, Topology

MiB, GiB = 2**20, 2**30

# Where things are in a pod.  The ConfigMap is mounted as a directory, never with subPath:
# kubelet updates a directory mount in place (a new ..data symlink), a subPath mount never.
CONFIG_DIR = "/etc/edge"
CONFIG_FILE = f"{CONFIG_DIR}/topology.toml"
FILES_DIR = "/etc/edge-files"           # the Secret holding certificates and CA bundles
STATE_DIR = "/var/lib/edge"             # the cache volume: caches in <state_dir>/cache/<node>
CONTENT_DIR = "/srv/edge/content"       # an origin's content_dir, from a claim the operator makes
UID = 10001                             # deploy/Dockerfile's `edge` user
NAME = "edge-cdn"                       # app.kubernetes.io/name (the package's name)
NODE_LABEL = "edge-cdn/node"            # the topology's node name: selectors, and Prometheus' `node`
PREFIX = "edge-"                        # of every object's name

# Sizing, from README "What memory holds" (see cache_resources):
PROCESS_BASE = 64 * MiB         # a node's RSS beside its caches (the benchmark's bound: memory + index + 64 MiB)
INDEX_ENTRY = 300               # RAM per disk entry: measured 262-292 B with 33-44 byte keys
META_FILE = 450                 # bytes of meta file per disk entry, charged to disk_size with the body
FS_SLACK = 4096                 # two files per entry, each wasting half a 4 KiB block on average
DISK_MARGIN = 0.10              # bodies being written before their commit evicts room, bans.json, directories
MEMORY_HEADROOM = 0.25          # limit over request: connections, TLS, streams in flight
DNS_EXTRA = 32 * MiB            # the scheduler beside its answer cache (its flood benchmark's bound)
ORIGIN_MEMORY = 128 * MiB       # the test origin holds nothing
CPU = {"l1": "500m", "l2": "500m", "origin": "100m", "dns": "250m"}   # one event loop each; no CPU limit
DEFAULT_OBJECT_SIZE = 32 * 2**10
L1_KINDS = ("deployment", "daemonset")
# Namespaces others use too: never relabelled (a Pod Security level) by `kubectl apply`.
SHARED_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")

# Kubernetes' own name rules: an RFC 1035 label for Services (the strictest of the objects
# made from a node's name), label values, Secret keys.
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
STATEFULSET_NAME_MAX = 52       # its pods carry controller-revision-hash = NAME-<10 characters>, at most 63


@dataclass(frozen=True)
class Options:
    namespace: str = "edge"
    image: str = f"edge-cdn:{__version__}"
    l1: str = "deployment"          # "daemonset": on the host network of the machine labelled for it
    storage_class: str | None = None
    object_size: int = DEFAULT_OBJECT_SIZE    # average disk object, for the index's RAM and file system slack
    cluster_domain: str = "cluster.local"


@dataclass(frozen=True)
class Manifests:
    """What `edge k8s` prints: the objects, the topology copy they carry, and what the operator provides."""

    documents: tuple[dict[str, Any], ...]
    topology_text: str                      # the ConfigMap's topology.toml
    topology: Topology                      # it, parsed
    secret_files: tuple[tuple[str, Path, str], ...]   # (key in the Secret, file here, the topology's value)
    needs: tuple[str, ...]                  # objects to create before the pods can start, one line each
    header: str                             # the comment that heads the YAML


@dataclass(frozen=True)
class Resources:
    memory_request: int
    memory_limit: int
    cpu_request: str
    volume: int = 0                 # bytes of disk-cache volume (0: none)
    disk_entries: int = 0           # objects the disk tier holds at the average object size


def cache_resources(node: Node, object_size: int = DEFAULT_OBJECT_SIZE) -> Resources:
    """Requests of a cache node, from its cache sizes and the average object size.

    The disk tier holds ``disk_size / (object_size + META_FILE)`` objects and
    keeps each in a RAM index (INDEX_ENTRY bytes), so memory is
    ``workers * (memory_size + PROCESS_BASE) + entries * INDEX_ENTRY``, limited at 25 %
    more.  Each object is two files on disk, charged their bytes but taking
    whole blocks, so the volume is ``disk_size + entries * FS_SLACK`` and 10 %.
    """
    entries = math.ceil(node.disk_size / (object_size + META_FILE)) if node.disk_size else 0
    # Each worker has its own memory tier and process; the disk index is the node's (one LMDB map
    # shared by the workers, or the one process's RAM index), counted once either way.
    workers = pod_workers(node)
    memory = workers * (node.memory_size + PROCESS_BASE) + entries * INDEX_ENTRY
    volume = node.disk_size + entries * FS_SLACK + math.ceil(node.disk_size * DISK_MARGIN)
    cpu = f"{int(CPU[node.role].rstrip('m')) * workers}m"
    return Resources(memory, math.ceil(memory * (1 + MEMORY_HEADROOM)), cpu, volume, entries)


def pod_workers(node: Node) -> int:
    """Worker processes of a cache node's pod: the topology's number, and 1 where it says nothing or
    "auto", since inside a pod the CPUs a process may use are the machine's, not the pod's share
    (scale out with more nodes, or set `workers` with the CPUs the pod should get)."""
    return node.workers if node.workers else 1


def dns_resources(dns: config.Dns) -> Resources:
    memory = PROCESS_BASE + dns.cache_size + DNS_EXTRA
    return Resources(memory, math.ceil(memory * (1 + MEMORY_HEADROOM)), CPU["dns"])


def origin_resources() -> Resources:
    return Resources(ORIGIN_MEMORY, math.ceil(ORIGIN_MEMORY * (1 + MEMORY_HEADROOM)), CPU["origin"])


def mebibytes(n: int) -> str:
    return f"{math.ceil(n / MiB)}Mi"


def gibibytes(n: int) -> str:
    return f"{max(1, math.ceil(n / GiB))}Gi"


# --------------------------------------------------------------------------- the pods to be

@dataclass
class _Member:
    """One process of the topology as a pod: a node, or the scheduler ("dns")."""

    name: str                       # the topology's name ("dns" for the scheduler)
    role: str                       # origin | l2 | l1 | dns
    obj: str                        # the name of its objects (edge-l2-a)
    key: str                        # its table in the topology, for errors (nodes.l2-a, dns)
    ports: list[tuple[str, int, str]] = field(default_factory=list)   # (name, port, protocol)
    admin_port: int = 0
    resources: Resources | None = None
    drain: float = 0.0
    restart_hash: str = ""
    host_network: bool = False
    content: bool = False           # an origin with content_dir: a volume from a claim
    workers: int = 0                # a cache node's worker processes (0: not a cache node)


def object_names(topology: Topology) -> dict[str, str]:
    """Each process's object name: edge-<node>, lower case, '_' and '.' as '-'; "dns": edge-dns.

    Kubernetes names are DNS labels; two nodes that map to one name are a config error.
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}
    for name, key in [*((n.name, f"nodes.{n.name}") for n in topology.nodes),
                      *((("dns", "dns"),) if topology.dns is not None else ())]:
        obj = PREFIX + re.sub(r"[_.]", "-", name.lower())
        if not _DNS_LABEL.fullmatch(obj):
            raise ConfigError(topology.source, key, f"its Kubernetes name {obj!r} is not a DNS label "
                                                    "(letters, digits and '-', ending in a letter or digit)")
        longest = STATEFULSET_NAME_MAX - len("-public")
        if len(obj) > longest:
            raise ConfigError(topology.source, key, f"its Kubernetes name {obj!r} is longer than {longest} "
                                                    "characters (with -public, a StatefulSet's most)")
        if not _LABEL_VALUE.fullmatch(name) or len(name) > 63:
            raise ConfigError(topology.source, key, f"{name!r} cannot be a Kubernetes label value "
                                                    "(it must end in a letter or digit, at most 63 characters)")
        # A node's public Service is <its name>-public: no other node may be called that.
        for taken in (obj, obj + "-public"):
            if taken in seen:
                raise ConfigError(topology.source, key, f"its Kubernetes name {obj!r} collides with "
                                                        f"{seen[taken]}'s objects: rename one of them")
        seen[obj] = seen[obj + "-public"] = key
        out[name] = obj
    return out


# --------------------------------------------------------------------------- the topology's Kubernetes copy

def service_host(obj: str, options: Options) -> str:
    return f"{obj}.{options.namespace}.svc.{options.cluster_domain}"


def kubernetes_topology(text: str, topology: Topology, names: dict[str, str], options: Options
                        ) -> tuple[str, list[tuple[str, Path, str]], list[str]]:
    """The topology as the pods run it: (its text, the Secret's files, what was changed).

    Only values are replaced (each with a comment saying what it was), so
    the operator's comments and order stay; tomlkit keeps them.
    """
    import tomlkit

    doc = tomlkit.parse(text)
    changes: list[str] = []
    files: dict[str, tuple[Path, str, str]] = {}     # Secret key -> (file here, its key, its value)

    def put(table: Any, key: str, path: str, value: str) -> None:
        old = table.get(key)
        if old is not None and str(old) == value:
            return
        item = tomlkit.string(value)
        if old is not None:
            item.trivia.indent, item.trivia.trail = old.trivia.indent, old.trivia.trail
            item.comment(f"edge k8s: was {json.dumps(str(old))}")
            changes.append(f"{path}: {json.dumps(str(old))} -> {json.dumps(value)}")
        else:
            changes.append(f"{path}: set to {json.dumps(value)}")
        table[key] = item

    def drop(table: Any, key: str, path: str, why: str) -> None:
        if key in table:
            changes.append(f"{path}: {json.dumps(str(table[key]))} removed ({why})")
            del table[key]

    def address(table: Any, key: str, path: str, host: str) -> None:
        if key in table:
            port = str(table[key]).rpartition(":")[2]
            put(table, key, path, f"{host}:{port}")

    def secret_file(table: Any, key: str, path: str, here: Path | None) -> None:
        if key not in table or here is None:
            return
        name = here.name
        if not _SECRET_KEY.fullmatch(name):
            raise ConfigError(topology.source, path, f"{here}: a Secret key is the file's name, and "
                                                     f"{name!r} cannot be one (letters, digits, '-', '_', '.')")
        if name in files and files[name][0] != here:
            raise ConfigError(topology.source, path, f"{here} has the same file name as {files[name][0]} "
                                                     f"({files[name][1]}): the Secret holds files by name, "
                                                     "rename one")
        files.setdefault(name, (here, path, str(table[key])))
        put(table, key, path, f"{FILES_DIR}/{name}")

    put(doc, "state_dir", "state_dir", STATE_DIR)
    origins = {(n.listen.host, n.listen.port): n for n in topology.by_role("origin")}
    for site in topology.sites:
        table, path = doc["sites"][site.name], f"sites.{site.name}"
        parts = urlsplit(site.origin)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        target = origins.get(((parts.hostname or "").lower(), port))
        if target is not None:
            # The origin node's pod is reached by its Service, as any other node.
            netloc = f"{service_host(names[target.name], options)}:{port}"
            put(table, "origin", f"{path}.origin", urlunsplit(parts._replace(netloc=netloc)))
        for key in ("tls_cert", "tls_key", "origin_ca", "origin_client_cert", "origin_client_key"):
            secret_file(table, key, f"{path}.{key}", getattr(site, key))
    for node in topology.nodes:
        table, path = doc["nodes"][node.name], f"nodes.{node.name}"
        host = service_host(names[node.name], options)
        if node.role != "l1":
            for key in ("listen", "listen_tls", "admin"):
                address(table, key, f"{path}.{key}", host)
        elif options.l1 == "deployment":
            # listen and listen_tls are the load balancer's: what the scheduler answers.
            address(table, "admin", f"{path}.admin", host)
        secret_file(table, "parent_ca", f"{path}.parent_ca", node.parent_ca)
        drop(table, "cache_dir", f"{path}.cache_dir", f"the cache is in {STATE_DIR}/cache/{node.name}, "
                                                      "on the pod's cache volume")
        if node.content_dir is not None:
            put(table, "content_dir", f"{path}.content_dir", CONTENT_DIR)
        if node.access_log not in ("-", "off"):
            put(table, "access_log", f"{path}.access_log", "-")
    if topology.dns is not None:
        address(doc["dns"], "admin", "dns.admin", service_host(names["dns"], options))
    secret = [(key, here, value) for key, (here, _, value) in sorted(files.items())]
    return tomlkit.dumps(doc), secret, changes


# --------------------------------------------------------------------------- rendering

def render(text: str, source: str, base_dir: Path, options: Options = Options()) -> Manifests:
    """Every object for the topology in `text` (read from `source`; relative paths from `base_dir`).

    Raises ConfigError for the file's own mistakes and for what Kubernetes
    cannot take (names, ports, file names), naming the key.
    """
    if options.l1 not in L1_KINDS:
        raise ValueError(f"l1 must be one of {', '.join(L1_KINDS)}, got {options.l1!r}")
    topology = config.parse(text, source, base_dir)
    names = object_names(topology)
    k8s_text, secret_files, changes = kubernetes_topology(text, topology, names, options)
    header_lines = [
        f"Rendered by `edge k8s` (edge {__version__}) from {source}.",
        f"The nodes run {CONFIG_FILE} from the ConfigMap {PREFIX}topology; changes made for Kubernetes:",
        *(f"  {change}" for change in changes),
    ]
    k8s_text = "".join(f"# {line}\n" for line in header_lines) + "\n" + k8s_text
    # As the pods read it; a mistake found from here on is still the operator's file's.
    k8s_topology = config.parse(k8s_text, CONFIG_FILE, Path(CONFIG_DIR))
    members = _members(k8s_topology, names, options, source)
    documents: list[dict[str, Any]] = [_config_map(k8s_text, options)]
    if options.namespace not in SHARED_NAMESPACES:
        documents.insert(0, _namespace(options))
    for member in members:
        if not member.host_network:
            documents.append(_headless_service(member, options))
        public = _public_service(member, k8s_topology, options)
        if public is not None:
            documents.append(public)
    secret = f"{PREFIX}files" if secret_files else None
    workloads = [_workload(m, secret, options) for m in members]
    for kind in ("StatefulSet", "Deployment", "DaemonSet"):
        documents += [w for w in workloads if w["kind"] == kind]
    for role in ("l2", "l1"):
        if any(m.role == role for m in members):
            documents.append(_disruption_budget(role, options))
    needs = []
    if secret_files:
        needs.append(f"Secret {secret} with the topology's files: "
                     + ", ".join(f"{key} ({value})" for key, _, value in secret_files))
    if any(n.admin_allow is not None for n in k8s_topology.nodes):
        # /healthz is always open (probes, the scheduler, the L1s); /metrics is not.
        needs.append("admin_allow to let in the pods' network: in the cluster, Prometheus and the "
                     "scheduler's status page reach the admin listeners from pod addresses")
    for member in members:
        if member.content:
            needs.append(f"PersistentVolumeClaim {member.obj}-content holding {member.name}'s content_dir "
                         f"(mounted read-only at {CONTENT_DIR})")
    header = "\n".join([
        f"# Kubernetes manifests for the edge CDN, rendered by `edge k8s` (edge {__version__}) from {source}.",
        f"# Namespace {options.namespace}, image {options.image}.  Apply with `kubectl apply -f -`.",
        *(f"# Needs {need}" for need in needs),
        "# The purge token (optional): kubectl create secret generic "
        f"{PREFIX}admin-token -n {options.namespace} --from-literal=token=...",
    ]) + "\n"
    return Manifests(tuple(documents), k8s_text, k8s_topology, tuple(secret_files), tuple(needs), header)


def _members(topology: Topology, names: dict[str, str], options: Options, source: str) -> list[_Member]:
    out = []
    for node in topology.nodes:
        member = _Member(node.name, node.role, names[node.name], f"nodes.{node.name}")
        member.ports = [("http", node.listen.port, "TCP")]
        if node.listen_tls is not None:
            member.ports.append(("https", node.listen_tls.port, "TCP"))
        member.ports.append(("admin", node.admin.port, "TCP"))
        member.admin_port = node.admin.port
        member.drain = node.limits.drain_timeout
        member.host_network = node.role == "l1" and options.l1 == "daemonset"
        member.content = node.content_dir is not None
        member.resources = origin_resources() if node.role == "origin" else cache_resources(node, options.object_size)
        member.workers = 0 if node.role == "origin" else pod_workers(node)
        restart = [getattr(node, key) for key in reload.RESTART_NODE_KEYS] + [topology.cache_dir(node)]
        member.restart_hash = _digest(restart)
        out.append(member)
    if topology.dns is not None:
        dns = topology.dns
        member = _Member("dns", "dns", names["dns"], "dns")
        member.ports = [("dns-udp", dns.listen.port, "UDP"), ("dns-tcp", dns.listen.port, "TCP"),
                        ("admin", dns.admin.port, "TCP")]
        member.admin_port = dns.admin.port
        member.resources = dns_resources(dns)
        member.restart_hash = _digest([getattr(dns, key) for key in reload.RESTART_DNS_KEYS])
        out.append(member)
    for member in out:
        # In a pod every listener binds 0.0.0.0: two on one port would collide.
        seen: dict[tuple[int, str], str] = {}
        for name, port, protocol in member.ports:
            key = "admin" if name == "admin" else ("listen_tls" if name == "https" else "listen")
            if port == 0:
                raise ConfigError(source, f"{member.key}.{key}", "port 0 (any free port) cannot be a "
                                                                 "container's port: give the port to serve on")
            if (port, protocol) in seen:
                raise ConfigError(source, f"{member.key}.{key}",
                                  f"port {port} is also its {seen[(port, protocol)]} port: in a pod every "
                                  "listener binds the pod's address, so each needs its own port")
            seen[(port, protocol)] = name
    return out


def _digest(values: list[Any]) -> str:
    return hashlib.sha256(repr(values).encode()).hexdigest()[:16]


def _labels(component: str | None = None, node: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": NAME}
    if component is not None:
        labels["app.kubernetes.io/component"] = component
    if node is not None:
        labels[NODE_LABEL] = node
    labels.update({"app.kubernetes.io/part-of": NAME, "app.kubernetes.io/version": __version__,
                   "app.kubernetes.io/managed-by": "edge-k8s"})
    return labels


def _selector(member: _Member) -> dict[str, str]:
    # Never the version: a workload's selector cannot change.
    return {"app.kubernetes.io/name": NAME, NODE_LABEL: member.name}


def _metadata(name: str, options: Options, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "namespace": options.namespace, "labels": labels}


def _namespace(options: Options) -> dict[str, Any]:
    # Pod Security Standards: every pod meets "restricted", but for L1s on the host network.
    level = "privileged" if options.l1 == "daemonset" else "restricted"
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": options.namespace,
                         "labels": {**_labels(), "pod-security.kubernetes.io/enforce": level}}}


def _config_map(text: str, options: Options) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(f"{PREFIX}topology", options, _labels()),
            "data": {"topology.toml": text}}


def _service_ports(ports: list[tuple[str, int, str]]) -> list[dict[str, Any]]:
    return [{"name": name, "port": port, "targetPort": name, "protocol": protocol} for name, port, protocol in ports]


def _headless_service(member: _Member, options: Options) -> dict[str, Any]:
    """The node's DNS name (its pod's address; a StatefulSet's governing Service): what the
    Kubernetes copy of the topology names it by.  Only ready pods are published, so a node
    that fails /healthz stops resolving, as a parent that is down."""
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(member.obj, options, _labels(member.role, member.name)),
            "spec": {"clusterIP": "None", "selector": _selector(member), "ports": _service_ports(member.ports)}}


def _public_service(member: _Member, topology: Topology, options: Options) -> dict[str, Any] | None:
    """A LoadBalancer for what clients reach: an L1's traffic ports, the scheduler's DNS port.

    `externalTrafficPolicy: Local` keeps the client's source address, which
    the scheduler needs to find the client's region (and the L1's access
    log to name the client).  The topology's address is asked for as
    `loadBalancerIP` when it could be one (not loopback or a wildcard).
    """
    if member.role == "dns":
        assert topology.dns is not None
        host, ports = topology.dns.listen.host, [p for p in member.ports if p[0] != "admin"]
    elif member.role == "l1" and not member.host_network:
        host, ports = topology.node(member.name).listen.host, [p for p in member.ports if p[0] != "admin"]
    else:
        return None
    spec: dict[str, Any] = {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                            "selector": _selector(member), "ports": _service_ports(ports)}
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None      # a name: the scheduler refuses it for an L1 (edge check says so)
    if address is not None and not (address.is_loopback or address.is_unspecified or address.is_link_local):
        spec["loadBalancerIP"] = str(address)
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _metadata(f"{member.obj}-public", options, _labels(member.role, member.name)),
            "spec": spec}


def _workload(member: _Member, secret: str | None, options: Options) -> dict[str, Any]:
    labels = _labels(member.role, member.name)
    template = {"metadata": {"labels": labels, "annotations": {
        "prometheus.io/scrape": "true", "prometheus.io/port": str(member.admin_port),
        "prometheus.io/path": "/metrics",
        # A hash of what this node cannot take by reload (edge.reload.RESTART_*_KEYS): when it
        # changes the pod is replaced; any other change reaches the running pod by --watch.
        "edge-cdn/restart-config": member.restart_hash}},
        "spec": _pod_spec(member, secret, options)}
    spec: dict[str, Any] = {"selector": {"matchLabels": _selector(member)}, "template": template}
    metadata = _metadata(member.obj, options, labels)
    if member.role == "l2":
        assert member.resources is not None
        claim: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                 "resources": {"requests": {"storage": gibibytes(member.resources.volume)}}}
        if options.storage_class:
            claim["storageClassName"] = options.storage_class
        spec = {"serviceName": member.obj, "replicas": 1, **spec,
                "updateStrategy": {"type": "RollingUpdate"},
                # The disk cache outlives the StatefulSet: deleting one never throws an L2's cache away.
                "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
                # A StatefulSet's claim templates cannot change: no version label on them.
                "volumeClaimTemplates": [{"metadata": {"name": "cache", "labels": _selector(member)},
                                          "spec": claim}]}
        return {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": metadata, "spec": spec}
    if member.host_network:
        # The port is the host's: a second pod cannot start before the first has gone.
        spec["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
        return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": metadata, "spec": spec}
    # One replica: a node is one ring member, one set of caches, one /healthz the scheduler
    # probes.  The new pod is ready before the old one goes.
    spec = {"replicas": 1, **spec,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata, "spec": spec}


def _pod_spec(member: _Member, secret: str | None, options: Options) -> dict[str, Any]:
    assert member.resources is not None
    resources = member.resources
    low_ports = any(port < 1024 for _, port, _ in member.ports)
    command = ["edge", "run", member.name, "--config", CONFIG_FILE, "--watch"]
    if member.workers:
        command += ["--workers", str(member.workers)]
    if not member.host_network:
        command += ["--listen-host", "0.0.0.0"]
    probe = {"httpGet": {"path": "/healthz", "port": "admin"}, "timeoutSeconds": 2}
    container: dict[str, Any] = {
        "name": "edge", "image": options.image, "imagePullPolicy": "IfNotPresent", "command": command,
        "ports": [{"name": name, "containerPort": port, "protocol": protocol}
                  for name, port, protocol in member.ports],
        "env": [
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"},
            # The purge token, when the operator made the Secret; without it purge is off.
            {"name": "EDGE_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": f"{PREFIX}admin-token", "key": "token", "optional": True}}},
        ],
        "resources": {"requests": {"cpu": resources.cpu_request, "memory": mebibytes(resources.memory_request)},
                      "limits": {"memory": mebibytes(resources.memory_limit)}},
        # Starting includes reading the topology and opening the caches; then /healthz every
        # few seconds takes a node out of its Service (and of the DNS answers, for an L1) fast.
        "startupProbe": {**probe, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 2},
        # Longer than drain_timeout's default: a draining node answers 503 and must not be
        # restarted for it.
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "topology", "mountPath": CONFIG_DIR, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }
    volumes: list[dict[str, Any]] = [{"name": "topology", "configMap": {"name": f"{PREFIX}topology"}},
                                     {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}]
    if member.role in ("l1", "l2"):
        container["volumeMounts"].append({"name": "cache", "mountPath": STATE_DIR})
        if member.role == "l1":
            # An L1's disk cache lives as long as its pod: the L2s keep what must survive.
            size = gibibytes(resources.volume)
            volumes.append({"name": "cache", "emptyDir": {"sizeLimit": size}})
            container["resources"]["requests"]["ephemeral-storage"] = size
    if member.content:
        container["volumeMounts"].append({"name": "content", "mountPath": CONTENT_DIR, "readOnly": True})
        volumes.append({"name": "content", "persistentVolumeClaim": {"claimName": f"{member.obj}-content",
                                                                     "readOnly": True}})
    if secret is not None and member.role in ("l1", "l2"):
        container["volumeMounts"].append({"name": "files", "mountPath": FILES_DIR, "readOnly": True})
        volumes.append({"name": "files", "secret": {"secretName": secret, "defaultMode": 0o440}})
    pod_security: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                    "seccompProfile": {"type": "RuntimeDefault"}}
    if low_ports and member.host_network:
        # The host's network namespace has no per-pod sysctl: only root with CAP_NET_BIND_SERVICE
        # (and no other capability) binds port 80 there.
        pod_security.update(runAsNonRoot=False, runAsUser=0, runAsGroup=0)
        container["securityContext"]["capabilities"]["add"] = ["NET_BIND_SERVICE"]
    elif low_ports:
        # Port 80 or 53 in the pod's own network namespace, without root or capabilities.
        pod_security["sysctls"] = [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,      # no node talks to the API server
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": math.ceil(member.drain) + 15,
        "securityContext": pod_security,
        # Spread a tier over machines: one machine lost takes one L2 (or L1) with it.
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "podAffinityTerm": {
                "topologyKey": "kubernetes.io/hostname",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/name": NAME,
                                                  "app.kubernetes.io/component": member.role}}}}]}},
        "containers": [container],
        "volumes": volumes,
    }
    if member.host_network:
        spec["hostNetwork"] = True
        spec["dnsPolicy"] = "ClusterFirstWithHostNet"   # to resolve the L2s' Service names
        spec["nodeSelector"] = {NODE_LABEL: member.name}
    return spec


def _disruption_budget(role: str, options: Options) -> dict[str, Any]:
    """One node of a tier at a time: a drained L2's keys go to the others (or the origin), a
    drained L1's clients to the next nearest edge; two at once is what a budget prevents."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _metadata(f"{PREFIX}{role}", options, _labels(role)),
            "spec": {"maxUnavailable": 1,
                     "selector": {"matchLabels": {"app.kubernetes.io/name": NAME,
                                                  "app.kubernetes.io/component": role}},
                     # A pod that is not running is no protection: let a drain evict it.
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}


# --------------------------------------------------------------------------- YAML

def to_yaml(manifests: Manifests) -> str:
    """One multi-document YAML stream, the header first."""
    return manifests.header + "".join("---\n" + dump_yaml(doc) for doc in manifests.documents)


def dump_yaml(value: Any) -> str:
    """Block-style YAML of JSON-like data (dicts, lists, str, int, bool), no dependency needed.

    Scalars that could read as anything but a string are JSON strings, which
    YAML reads as double-quoted ones; multi-line strings are literal blocks,
    so the ConfigMap's topology reads as the file it is.
    """
    return "\n".join(_yaml_lines(value, 0)) + "\n"


_PLAIN = re.compile(r"^[A-Za-z/][A-Za-z0-9_./-]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}    # YAML 1.1 reads these


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
            return value
        return json.dumps(value, ensure_ascii=False)
    raise TypeError(f"no YAML for {value!r}")


def _literal_block(text: str) -> bool:
    # Printable text of several lines, not starting with a blank (which needs an indentation indicator).
    return ("\n" in text.rstrip("\n") and not text.startswith((" ", "\n"))
            and all(c == "\n" or c == "\t" or c.isprintable() for c in text))


def _yaml_lines(value: Any, indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            head = f"{pad}{_scalar(key)}:"
            lines += _yaml_item(head, item, indent)
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict) and item:
                inner = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {inner[0][indent + 2:]}")
                lines += inner[1:]
            else:
                lines += _yaml_item(f"{pad}-", item, indent)
    else:
        lines.append(pad + _scalar(value))
    return lines


def _yaml_item(head: str, item: Any, indent: int) -> list[str]:
    if isinstance(item, (dict, list)) and not item:
        return [f"{head} {'{}' if isinstance(item, dict) else '[]'}"]
    if isinstance(item, dict):
        return [head, *_yaml_lines(item, indent + 2)]
    if isinstance(item, list):
        return [head, *_yaml_lines(item, indent + 2)]
    if isinstance(item, str) and _literal_block(item):
        chomp = "" if item.endswith("\n") and not item.endswith("\n\n") else ("-" if not item.endswith("\n") else "+")
        body = item[:-1] if item.endswith("\n") else item
        inner = " " * (indent + 2)
        return [f"{head} |{chomp}", *((inner + line) if line else "" for line in body.split("\n"))]
    return [f"{head} {_scalar(item)}"]


# --------------------------------------------------------------------------- files

MARKER = "# Rendered by `edge k8s`"


def write_directory(manifests: Manifests, directory: Path) -> list[Path]:
    """One file per object (NN-kind-name.yaml, applied in that order by `kubectl apply -f DIR`)
    and the topology copy; YAML files a previous render left that this one does not write are
    removed (only ours: they start with MARKER), so a node taken out of the topology does not
    come back with the next `kubectl apply -f DIR`."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for number, doc in enumerate(manifests.documents):
        name = f"{number:02d}-{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
        path = directory / name
        path.write_text(f"{MARKER} (edge {__version__}); do not edit: render again.\n" + dump_yaml(doc))
        written.append(path)
    topology = directory / "topology.toml"
    topology.write_text(manifests.topology_text)
    written.append(topology)
    for stale in sorted(directory.glob("*.yaml")):
        if stale not in written and stale.read_text(errors="replace").startswith(MARKER):
            stale.unlink()
    return written
