"""`edge k8s`: manifests rendered from the topology, validated offline, and the two mechanisms
they rely on run for real: a node reached by name and bound with --listen-host, and a reload
when the mounted ConfigMap changes the way kubelet changes it (a `..data` symlink swap).

Validation uses the Kubernetes OpenAPI schemas that the `kubernetes-validate`
package ships (strict: unknown fields are errors), for pinned versions, so
nothing talks to a cluster.  The processes run on 127.0.141.x and
127.0.0.1:18141-18142.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from edge import config, k8s
from edge.cli import main
from tests.cluster import REPO, NodeProcess
from tests.test_config import MINIMAL

# The oldest Kubernetes these manifests are for (PodDisruptionBudget's unhealthyPodEvictionPolicy
# and the StatefulSet's claim retention policy are beta from 1.27 on) and a recent one.
KUBERNETES_VERSIONS = ("1.27", "1.34")
MULTI_HOST = REPO / "deploy" / "multi-host.toml"


def render(path: Path | None = None, **options: Any) -> k8s.Manifests:
    if path is None:
        return k8s.render(config.default_text(), config.DEFAULT_TOPOLOGY, REPO, k8s.Options(**options))
    return k8s.render(path.read_text(), str(path), path.parent, k8s.Options(**options))


RENDERS = {
    "default": lambda: render(),
    "multi-host": lambda: render(MULTI_HOST),
    "multi-host, L1 daemonsets": lambda: render(MULTI_HOST, l1="daemonset"),
    "multi-host, namespace cdn, storage class": lambda: render(MULTI_HOST, namespace="cdn", storage_class="fast-ssd",
                                                              image="registry.example/edge:1"),
}


@pytest.fixture(scope="module", params=sorted(RENDERS))
def manifests(request) -> k8s.Manifests:
    return RENDERS[request.param]()


def find(m: k8s.Manifests, kind: str, name: str) -> dict[str, Any]:
    found = [d for d in m.documents if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def workloads(m: k8s.Manifests) -> list[dict[str, Any]]:
    return [d for d in m.documents if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]


# --------------------------------------------------------------------------- valid Kubernetes


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(manifests, version):
    for doc in manifests.documents:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validation_would_catch_a_mistake():
    """The check above can fail: an unknown field and a wrong type are refused."""
    statefulset = json.loads(json.dumps(find(render(), "StatefulSet", "edge-l2-a")))
    statefulset["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSIONS[0], strict=True)
    service = json.loads(json.dumps(find(render(), "Service", "edge-dns-public")))
    service["spec"]["ports"][0]["port"] = "53"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, KUBERNETES_VERSIONS[0], strict=True)


def test_a_shared_namespace_is_used_but_never_relabelled():
    m = render(MULTI_HOST, namespace="default")
    assert [d["kind"] for d in m.documents if d["kind"] == "Namespace"] == []
    assert {d["metadata"]["namespace"] for d in m.documents} == {"default"}
    assert 'listen = "edge-l2-east.default.svc.cluster.local:8080"' in m.topology_text


def test_names_labels_selectors_and_ports_hold_together(manifests):
    """What the schemas do not check: names are DNS labels, selectors find their pods, a
    Service's target ports exist on them, the namespace is the same everywhere."""
    names = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    label_value = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
    namespace = manifests.documents[1]["metadata"]["namespace"]
    first = manifests.documents[0]
    assert (first["kind"], first["metadata"]["name"]) == ("Namespace", namespace)
    pods = {}
    for doc in manifests.documents:
        meta = doc["metadata"]
        assert names.match(meta["name"]) and len(meta["name"]) <= 63, meta["name"]
        assert all(label_value.match(v) and len(v) <= 63 for v in meta.get("labels", {}).values()), meta
        if doc["kind"] != "Namespace":
            assert meta["namespace"] == namespace
    for workload in workloads(manifests):
        template = workload["spec"]["template"]
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()
        assert "app.kubernetes.io/version" not in selector      # selectors cannot change
        ports = {(p["name"], p["protocol"]) for p in container(workload)["ports"]}
        pods[workload["metadata"]["name"]] = (template["metadata"]["labels"], ports)
    for service in (d for d in manifests.documents if d["kind"] == "Service"):
        selected = [name for name, (labels, _) in pods.items()
                    if service["spec"]["selector"].items() <= labels.items()]
        assert len(selected) == 1, (service["metadata"]["name"], selected)
        for port in service["spec"]["ports"]:
            assert (port["targetPort"], port["protocol"]) in pods[selected[0]][1], port
    for budget in (d for d in manifests.documents if d["kind"] == "PodDisruptionBudget"):
        assert any(budget["spec"]["selector"]["matchLabels"].items() <= labels.items() for labels, _ in pods.values())


def test_yaml_reads_back_as_the_objects_and_is_the_same_every_time():
    for make in RENDERS.values():
        first, second = make(), make()
        text = k8s.to_yaml(first)
        assert text == k8s.to_yaml(second)
        assert list(yaml.safe_load_all(text)) == list(first.documents)
        # The ConfigMap's topology is a literal block: it reads as the file it is.
        assert "  topology.toml: |\n    # Rendered by `edge k8s`" in text


@pytest.mark.parametrize("value", [
    "plain", "true", "no", "0.1.0", "8091", "", " leading", "a: b", "#x", "-x", "é", "line\n",
    "two\nlines\n", "two\nlines", "trailing\n\n", "tab\tand trailing space \nnext\n", "x\r\ny", "\x01",
    "[x]", "{x}", "*x", "&x", "!x", "|x", ">x", "%x", "@x", "`x", "'x", '"x', "null", "~", "1e3", "0x1F",
])
def test_dump_yaml_keeps_every_string_a_string(value):
    doc = {"key": value, "list": [value, {"k": value, "n": 1, "b": False}], value or "empty": [], "d": {}}
    assert yaml.safe_load(k8s.dump_yaml(doc)) == doc


# --------------------------------------------------------------------------- what each object holds

MIB, GIB = 2**20, 2**30


@pytest.mark.parametrize(("render_name", "kind", "name", "path", "expected"), [
    # One StatefulSet per L2, its cache claim sized from disk_size: 500 GiB of 32 KiB objects is
    # 16,162,049 entries, each two files wasting half a block each (4 KiB), plus 10 %: 611.7 GiB.
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.volumeClaimTemplates.0.spec.resources.requests.storage",
     "612Gi"),
    ("multi-host", "StatefulSet", "edge-l2-west", "spec.serviceName", "edge-l2-west"),
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.replicas", 1),
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.persistentVolumeClaimRetentionPolicy.whenDeleted", "Retain"),
    ("default", "StatefulSet", "edge-l2-a", "spec.volumeClaimTemplates.0.spec.resources.requests.storage", "3Gi"),
    ("multi-host, namespace cdn, storage class", "StatefulSet", "edge-l2-east",
     "spec.volumeClaimTemplates.0.spec.storageClassName", "fast-ssd"),
    # Memory: memory_size + 300 B of index per disk entry + 64 MiB, limited at 25 % more:
    # 8192 + 16,162,049 x 300 B (4,624 MiB) + 64 = 12,880 MiB.
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.template.spec.containers.0.resources.requests.memory",
     "12880Mi"),
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.template.spec.containers.0.resources.limits.memory",
     "16100Mi"),
    ("multi-host", "Deployment", "edge-l1-nyc", "spec.template.spec.containers.0.resources.requests.memory",
     "3037Mi"),
    ("default", "Deployment", "edge-l1-east", "spec.template.spec.containers.0.resources.requests.memory", "138Mi"),
    ("multi-host", "Deployment", "edge-l1-nyc", "spec.template.spec.containers.0.resources.requests.cpu", "500m"),
    ("multi-host", "Deployment", "edge-l1-nyc", "spec.template.spec.containers.0.resources.limits.cpu", None),
    # L1s: a Deployment's disk cache is an emptyDir of the same size as an L2's claim would be.
    ("multi-host", "Deployment", "edge-l1-nyc", "spec.template.spec.volumes.2.emptyDir.sizeLimit", "123Gi"),
    ("multi-host", "Deployment", "edge-l1-nyc", "spec.strategy.rollingUpdate.maxUnavailable", 0),
    ("multi-host, L1 daemonsets", "DaemonSet", "edge-l1-sfo", "spec.template.spec.hostNetwork", True),
    ("multi-host, L1 daemonsets", "DaemonSet", "edge-l1-sfo", "spec.template.spec.nodeSelector",
     {"edge-cdn/node": "l1-sfo"}),
    ("multi-host, L1 daemonsets", "DaemonSet", "edge-l1-sfo", "spec.template.spec.dnsPolicy",
     "ClusterFirstWithHostNet"),
    # The scheduler: DNS over UDP and TCP on its port, the client's address kept.
    ("multi-host", "Service", "edge-dns-public", "spec.ports",
     [{"name": "dns-udp", "port": 53, "targetPort": "dns-udp", "protocol": "UDP"},
      {"name": "dns-tcp", "port": 53, "targetPort": "dns-tcp", "protocol": "TCP"}]),
    ("default", "Service", "edge-dns-public", "spec.ports",
     [{"name": "dns-udp", "port": 8053, "targetPort": "dns-udp", "protocol": "UDP"},
      {"name": "dns-tcp", "port": 8053, "targetPort": "dns-tcp", "protocol": "TCP"}]),
    ("multi-host", "Service", "edge-dns-public", "spec.externalTrafficPolicy", "Local"),
    ("multi-host", "Service", "edge-dns-public", "spec.loadBalancerIP", "192.0.2.53"),
    ("default", "Service", "edge-dns-public", "spec.loadBalancerIP", None),        # loopback: the LB picks
    ("multi-host", "Service", "edge-l1-chi-public", "spec.type", "LoadBalancer"),
    ("multi-host", "Service", "edge-l1-chi-public", "spec.loadBalancerIP", "192.0.2.12"),
    ("default", "Service", "edge-l1-west-public", "spec.ports.1",
     {"name": "https", "port": 8443, "targetPort": "https", "protocol": "TCP"}),
    ("multi-host", "Service", "edge-l2-east", "spec.clusterIP", "None"),
    ("multi-host", "Deployment", "edge-dns", "spec.template.spec.containers.0.resources.requests.memory",
     "128Mi"),                                                           # 64 MiB + 32 MiB cache + 32 MiB
    # Port 53 and 80 in the pod without root; on the host network, root with that one capability.
    ("multi-host", "Deployment", "edge-dns", "spec.template.spec.securityContext.sysctls",
     [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]),
    ("default", "Deployment", "edge-dns", "spec.template.spec.securityContext.sysctls", None),
    ("multi-host, L1 daemonsets", "DaemonSet", "edge-l1-nyc",
     "spec.template.spec.containers.0.securityContext.capabilities", {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]}),
    ("multi-host", "PodDisruptionBudget", "edge-l2", "spec.maxUnavailable", 1),
    ("multi-host", "PodDisruptionBudget", "edge-l1", "spec.selector.matchLabels",
     {"app.kubernetes.io/name": "edge-cdn", "app.kubernetes.io/component": "l1"}),
    ("multi-host", "Deployment", "edge-origin", "spec.template.spec.volumes.2.persistentVolumeClaim",
     {"claimName": "edge-origin-content", "readOnly": True}),
    ("default", "Deployment", "edge-l1-east", "spec.template.spec.volumes.3.secret.secretName", "edge-files"),
    ("multi-host, namespace cdn, storage class", "Deployment", "edge-l1-nyc",
     "spec.template.spec.containers.0.image", "registry.example/edge:1"),
    ("multi-host", "Deployment", "edge-l1-nyc", "spec.template.spec.containers.0.command",
     ["edge", "run", "l1-nyc", "--config", "/etc/edge/topology.toml", "--watch", "--workers", "1",
      "--listen-host", "0.0.0.0"]),
    ("multi-host, L1 daemonsets", "DaemonSet", "edge-l1-nyc", "spec.template.spec.containers.0.command",
     ["edge", "run", "l1-nyc", "--config", "/etc/edge/topology.toml", "--watch", "--workers", "1"]),   # on the host's own IP
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.template.metadata.annotations[prometheus.io/port]", "8091"),
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.template.metadata.annotations[prometheus.io/scrape]", "true"),
    ("multi-host", "StatefulSet", "edge-l2-east", "spec.template.spec.terminationGracePeriodSeconds", 45),
])
def test_objects_hold_what_the_topology_says(render_name, kind, name, path, expected):
    value: Any = find(RENDERS[render_name](), kind, name)
    for bracketed, step in re.findall(r"\[([^]]+)\]|([^.[\]]+)", path):    # a.0.b[key.with.dots]
        step = bracketed or step
        value = value[int(step)] if isinstance(value, list) else value.get(step) if value is not None else None
    assert value == expected


def test_cache_resources_follow_the_documented_formula():
    for node in config.load(MULTI_HOST).nodes + config.load().nodes:
        if node.role == "origin":
            continue
        got = k8s.cache_resources(node, 64 * 2**10)
        entries = math.ceil(node.disk_size / (64 * 2**10 + 450))
        assert got.disk_entries == entries
        assert got.memory_request == node.memory_size + entries * 300 + 64 * MIB
        assert got.memory_limit == math.ceil(got.memory_request * 1.25)
        assert got.volume == node.disk_size + entries * 4096 + math.ceil(node.disk_size * 0.1)


@pytest.mark.parametrize("workers, processes", [("", 1), ('workers = "auto"', 1), ("workers = 1", 1),
                                                ("workers = 3", 3)])
def test_a_pod_runs_the_workers_the_topology_names(workers, processes):
    """Each worker has its own memory tier and process; "auto" inside a pod would count the
    machine's CPUs, not the pod's, so a pod runs one worker unless the topology names a number."""
    text = config.default_text().replace('[nodes.l2-a]', f'[nodes.l2-a]\n{workers}', 1)
    topology = config.parse(text, "t.toml", Path.cwd())
    node = topology.node("l2-a")
    got = k8s.cache_resources(node, 64 * 2**10)
    entries = math.ceil(node.disk_size / (64 * 2**10 + 450))
    assert got.memory_request == processes * (node.memory_size + 64 * MIB) + entries * 300
    assert got.cpu_request == f"{500 * processes}m"
    manifests = k8s.render(text, "t.toml", Path.cwd(), k8s.Options())
    command = container(find(manifests, "StatefulSet", "edge-l2-a"))["command"]
    assert command[command.index("--workers") + 1] == str(processes)


def test_every_pod_is_probed_on_its_admin_port_healthz(manifests):
    topology = manifests.topology
    admin = {n.name: n.admin.port for n in topology.nodes} | ({"dns": topology.dns.admin.port} if topology.dns else {})
    for workload in workloads(manifests):
        pod = container(workload)
        node = workload["spec"]["template"]["metadata"]["labels"]["edge-cdn/node"]
        ports = {p["name"]: p["containerPort"] for p in pod["ports"]}
        assert ports["admin"] == admin[node]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert pod[probe]["httpGet"] == {"path": "/healthz", "port": "admin"}, (node, probe)
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(admin[node]), "/metrics")
        assert pod["volumeMounts"][0] == {"name": "topology", "mountPath": "/etc/edge", "readOnly": True}
        assert "subPath" not in pod["volumeMounts"][0]      # a subPath mount is never updated


def test_every_memory_request_follows_memory_size(manifests):
    topology = manifests.topology
    for workload in workloads(manifests):
        node = workload["spec"]["template"]["metadata"]["labels"]["edge-cdn/node"]
        requests = container(workload)["resources"]["requests"]
        if node == "dns":
            expected = 64 * MIB + topology.dns.cache_size + 32 * MIB
        elif topology.node(node).role == "origin":
            expected = 128 * MIB
        else:
            expected = k8s.cache_resources(topology.node(node)).memory_request
        assert requests["memory"] == f"{math.ceil(expected / MIB)}Mi"


# --------------------------------------------------------------------------- the topology in the ConfigMap


def test_the_config_map_holds_a_topology_config_parse_accepts(manifests):
    text = find(manifests, "ConfigMap", "edge-topology")["data"]["topology.toml"]
    assert text == manifests.topology_text
    topology = config.parse(text, "/etc/edge/topology.toml", Path("/etc/edge"))     # as the pods read it
    assert topology == manifests.topology
    assert topology.state_dir == Path("/var/lib/edge")
    namespace = manifests.documents[1]["metadata"]["namespace"]
    daemonsets = any(d["kind"] == "DaemonSet" for d in manifests.documents)
    for node in topology.nodes:
        name = f"edge-{node.name}.{namespace}.svc.cluster.local"
        if node.role in ("origin", "l2"):
            hosts = {node.listen.host, node.admin.host} | ({node.listen_tls.host} if node.listen_tls else set())
            assert hosts == {name}
        else:
            ipaddress.ip_address(node.listen.host)      # what the DNS scheduler answers stays an address
            # On the host network an L1 is at its machine's address; otherwise its Service names it.
            if daemonsets:
                ipaddress.ip_address(node.admin.host)
            else:
                assert node.admin.host == name
        assert node.cache_dir is None and topology.cache_dir(node) == Path(f"/var/lib/edge/cache/{node.name}")
    from edge import checks
    from edge.scheduler.answer import Answerer
    Answerer(topology)                          # the scheduler takes it
    assert not [p for p in checks.problems(topology) if "edge-files" not in str(p) and "/srv/edge" not in str(p)]


def test_the_copy_keeps_the_operators_file_and_says_what_it_changed():
    m = render(MULTI_HOST)
    original = MULTI_HOST.read_text()
    assert "# Client networks -> region, longest prefix wins" in m.topology_text
    assert m.topology_text.count("\n") > original.count("\n")
    assert 'listen = "edge-l2-west.edge.svc.cluster.local:8080" # edge k8s: was "203.0.113.21:8080"' in m.topology_text
    assert 'origin = "http://edge-origin.edge.svc.cluster.local:8080" # edge k8s: was "http://198.51.100.10:8080"' \
        in m.topology_text
    assert 'origin = "http://198.51.100.20:8080"' in m.topology_text        # not a node of the topology: kept
    assert 'listen = "192.0.2.53:53"' in m.topology_text                     # the scheduler's public address
    default = render()
    assert ("#   sites.example.tls_cert: \"var/tls/www.example.com.pem\" -> \"/etc/edge-files/www.example.com.pem\""
            in default.topology_text)
    assert [key for key, _, _ in default.secret_files] == ["ca.pem", "www.example.com.key", "www.example.com.pem"]
    assert default.secret_files[0][1] == REPO / "var" / "tls" / "ca.pem"


def test_only_what_needs_a_restart_changes_a_pod_template(tmp_path):
    """A change a node reloads leaves every workload as it was (kubectl apply restarts nothing;
    --watch brings it in); memory_size, which needs a restart, replaces that node's pod only."""
    base = render(MULTI_HOST)
    changed = tmp_path / "t.toml"
    text = MULTI_HOST.read_text()
    changed.write_text(text.replace('[sites.static]', '[sites.news]\nhosts = ["news.example.com"]\n'
                                    'origin = "http://198.51.100.10:8080"\n\n[sites.static]')
                       .replace("ttl = 30 ", "ttl = 60 "))
    reloaded = render(changed)
    assert workloads(reloaded) == workloads(base)
    assert find(reloaded, "ConfigMap", "edge-topology") != find(base, "ConfigMap", "edge-topology")
    changed.write_text(text.replace('memory_size = "2GiB"\ndisk_size = "100GiB"\n\n[nodes.l1-sfo]',
                                    'memory_size = "3GiB"\ndisk_size = "100GiB"\n\n[nodes.l1-sfo]'))
    restarted = render(changed)
    differ = [a["metadata"]["name"] for a, b in zip(workloads(base), workloads(restarted)) if a != b]
    assert differ == ["edge-l1-chi"]
    # admin_allow changes nothing else in the pod: the restart-config hash alone replaces it.
    changed.write_text(text.replace('[nodes.l1-sfo]\nrole = "l1"', '[nodes.l1-sfo]\nrole = "l1"\n'
                                    'admin_allow = ["10.0.0.0/8"]'))
    restarted = render(changed)
    differ = [(a["metadata"]["name"], b["spec"]["template"]["metadata"]["annotations"]["edge-cdn/restart-config"])
              for a, b in zip(workloads(base), workloads(restarted)) if a != b]
    assert [name for name, _ in differ] == ["edge-l1-sfo"]
    assert differ[0][1] != find(base, "Deployment", "edge-l1-sfo")["spec"]["template"]["metadata"][
        "annotations"]["edge-cdn/restart-config"]


# --------------------------------------------------------------------------- mistakes Kubernetes cannot take



@pytest.mark.parametrize(("edit", "key", "problem"), [
    (lambda t: t + '[nodes.l2_a]\nrole = "l2"\nlisten = "127.0.2.2:8080"\nadmin = "127.0.2.2:8091"\n',
     "nodes.l2_a", "its Kubernetes name 'edge-l2-a' collides with nodes.l2-a's objects"),
    (lambda t: t + '[nodes.l2-a-public]\nrole = "l2"\nlisten = "127.0.2.2:8080"\nadmin = "127.0.2.2:8091"\n',
     "nodes.l2-a-public", "collides with nodes.l2-a's objects"),
    (lambda t: t + '[nodes.L2-B]\nrole = "l2"\nlisten = "127.0.2.2:8080"\nadmin = "127.0.2.2:8091"\n',
     None, None),                                                # upper case is lowered: fine
    (lambda t: t + '[nodes.l2-b-]\nrole = "l2"\nlisten = "127.0.2.2:8080"\nadmin = "127.0.2.2:8091"\n',
     "nodes.l2-b-", "is not a DNS label"),
    (lambda t: t + f'[nodes.{"l" * 50}]\nrole = "l2"\nlisten = "127.0.2.2:8080"\nadmin = "127.0.2.2:8091"\n',
     f"nodes.{'l' * 50}", "longer than 45 characters"),
    (lambda t: t.replace('admin = "127.0.1.1:8091"', 'admin = "127.0.1.2:8080"'),
     "nodes.l1.admin", "port 8080 is also its http port"),
    (lambda t: t.replace('admin = "127.0.2.1:8091"', 'admin = "127.0.2.1:0"'),
     "nodes.l2-a.admin", "port 0 (any free port) cannot be a container's port"),
    (lambda t: t.replace('origin = "http://127.0.0.10:8080"', 'origin = "https://127.0.0.10:8080"\n'
                         'origin_ca = "a/ca.pem"\n[sites.other]\nhosts = ["other.example.com"]\n'
                         'origin = "https://127.0.0.10:8080"\norigin_ca = "b/ca.pem"'),
     "sites.other.origin_ca", "has the same file name as"),
])
def test_what_kubernetes_cannot_take_names_the_key(edit, key, problem):
    text = edit(MINIMAL)
    if key is None:
        k8s.render(text, "topo.toml", Path("."))
        return
    with pytest.raises(config.ConfigError) as err:
        k8s.render(text, "topo.toml", Path("."))
    assert (err.value.source, err.value.key) == ("topo.toml", key)
    assert problem in err.value.problem, err.value.problem


# --------------------------------------------------------------------------- the command


def test_edge_k8s_prints_the_manifests(capsys):
    assert main(["k8s", "--config", str(MULTI_HOST), "--namespace", "cdn"]) == 0
    out, err = capsys.readouterr()
    assert out == k8s.to_yaml(render(MULTI_HOST, namespace="cdn"))
    assert "edge k8s: needs PersistentVolumeClaim edge-origin-content" in err
    assert main(["k8s"]) == 0                    # the built-in topology: its certificates go in a Secret
    out, err = capsys.readouterr()
    assert out == k8s.to_yaml(render())
    assert "edge k8s: kubectl create secret generic edge-files -n edge --from-file=ca.pem=" in err


def test_edge_k8s_on_a_bad_file_exits_2_with_the_usual_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace('role = "l1"', 'role = "l3"'))
    result = subprocess.run([sys.executable, "-m", "edge", "k8s", "--config", str(bad)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.strip() == f"edge: config error: {bad}: nodes.l1.role: expected one of origin, l2, l1, got 'l3'"
    twins = tmp_path / "twins.toml"
    twins.write_text(MINIMAL + '[nodes.l2_a]\nrole = "l2"\nlisten = "127.0.2.2:8080"\nadmin = "127.0.2.2:8091"\n')
    result = subprocess.run([sys.executable, "-m", "edge", "k8s", "--config", str(twins)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"edge: config error: {twins}: nodes.l2_a: its Kubernetes name 'edge-l2-a'")
    missing = subprocess.run([sys.executable, "-m", "edge", "k8s", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, cwd=REPO, timeout=60)
    assert (missing.returncode, missing.stderr.strip()) == (
        2, f"edge: config error: {tmp_path / 'none.toml'}: (file): No such file or directory")


@pytest.mark.parametrize(("args", "problem"), [
    (["--namespace", "Edge"], "argument --namespace: expected a DNS label"),
    (["--cluster-domain", "my_cluster"], "argument --cluster-domain: expected a DNS name"),
    (["--object-size", "big"], "argument --object-size: expected a size"),
    (["--l1", "statefulset"], "argument --l1: invalid choice"),
])
def test_edge_k8s_options_are_checked_before_anything_is_rendered(args, problem, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["k8s", *args])
    out, err = capsys.readouterr()
    assert (exit.value.code, out) == (2, "") and problem in err


def test_edge_k8s_output_writes_a_file_per_object_and_removes_only_its_own_stale_ones(tmp_path, capsys):
    out = tmp_path / "manifests"
    out.mkdir()
    (out / "mine.yaml").write_text("kind: ConfigMap\n")        # not ours: kept
    assert main(["k8s", "--config", str(MULTI_HOST), "--output", str(out)]) == 0
    first = sorted(p.name for p in out.iterdir())
    assert first[:3] == ["00-namespace-edge.yaml", "01-configmap-edge-topology.yaml", "02-service-edge-origin.yaml"]
    assert "mine.yaml" in first and "topology.toml" in first
    assert (out / "topology.toml").read_text() == render(MULTI_HOST).topology_text
    docs = [yaml.safe_load(p.read_text()) for p in sorted(out.glob("[0-9]*.yaml"))]
    assert docs == list(render(MULTI_HOST).documents)
    smaller = tmp_path / "smaller.toml"
    smaller.write_text(MULTI_HOST.read_text().split("\n[dns]\n")[0])      # no scheduler any more
    assert main(["k8s", "--config", str(smaller), "--output", str(out)]) == 0
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if "dns" in name] and "mine.yaml" in left
    assert "wrote" in capsys.readouterr().err


# --------------------------------------------------------------------------- the mechanisms, for real

NET = "127.0.141"


def kubelet_update(directory: Path, text: str) -> None:
    """Write `text` as kubelet writes a ConfigMap volume: the file in a new timestamped
    directory, `..data` swapped to it by a rename, the old directory removed; the visible
    topology.toml is a symlink through `..data` made once."""
    stamp = directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
    stamp.mkdir()
    (stamp / "topology.toml").write_text(text)
    old = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    (directory / "..data_tmp").symlink_to(stamp.name)
    os.rename(directory / "..data_tmp", directory / "..data")
    if not (directory / "topology.toml").is_symlink():
        (directory / "topology.toml").symlink_to("..data/topology.toml")
    if old is not None:
        for child in (directory / old).iterdir():
            child.unlink()
        (directory / old).rmdir()


def pod_topology(state: Path, *, news: bool) -> str:
    """origin and l1-1 on addresses; l2-a known to the others only by a name (as a Service's)."""
    sites = '[sites.example]\nhosts = ["www.example.com"]\norigin = "http://127.0.141.10:8080"\n'
    if news:
        sites += '[sites.news]\nhosts = ["news.example.com"]\norigin = "http://127.0.141.10:8080"\n'
    return (f'state_dir = "{state}"\n' + sites
            + f'[nodes.origin]\nrole = "origin"\nlisten = "{NET}.10:8080"\nadmin = "{NET}.10:8091"\n'
            + '[nodes.l2-a]\nrole = "l2"\nlisten = "localhost:18141"\nadmin = "localhost:18142"\n'
              'memory_size = "16MiB"\ndisk_size = "64MiB"\n'
            + f'[nodes.l1-1]\nrole = "l1"\nlisten = "{NET}.31:8080"\nadmin = "{NET}.31:8091"\n'
              'memory_size = "16MiB"\ndisk_size = "64MiB"\nparent_probe_interval = 0.2\n')


def get(url: str, host: str) -> tuple[int, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers)


def healthz_sha(admin: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{admin}/healthz", timeout=2) as response:
            return json.loads(response.read())["config_sha256"]
    except OSError:
        return None


def wait_until(check, what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not within {deadline}s")
        time.sleep(0.1)


def test_a_parent_reached_by_name_and_a_config_map_swap_reloading_every_node(tmp_path):
    """As in a pod: l2-a is named `localhost:18141` in the topology and binds with --listen-host;
    every node runs --watch on a ConfigMap-style directory, and a kubelet-style swap of
    `..data` brings a new site to all three without a restart."""
    mounted = tmp_path / "etc-edge"
    mounted.mkdir()
    kubelet_update(mounted, pod_topology(tmp_path / "state", news=False))
    config_file = mounted / "topology.toml"
    nodes = [
        NodeProcess("origin", config_file, f"{NET}.10:8091", f"{NET}.10:8080", args=("--watch",)),
        NodeProcess("l2-a", config_file, "127.0.0.1:18142", "127.0.0.1:18141",
                    args=("--watch", "--listen-host", "127.0.0.1")),
        NodeProcess("l1-1", config_file, f"{NET}.31:8091", f"{NET}.31:8080", args=("--watch",)),
    ]
    try:
        for node in nodes:
            node.start()
        l1 = f"http://{NET}.31:8080"
        path = f"/gen/k8s-{time.monotonic_ns()}?cc=max-age=60"
        status, headers = get(l1 + path, "www.example.com")
        assert status == 200, headers
        assert headers["Cache-Status"].split(",")[0].startswith("l2-a; fwd=uri-miss")    # through the L2, by name
        assert get(l1 + path, "www.example.com")[1]["X-Cache"] == "HIT"
        assert get(l1 + "/gen/n?cc=max-age=60", "news.example.com")[0] in (404, 421)
        first = healthz_sha(f"{NET}.31:8091")
        assert first == hashlib.sha256(config_file.read_bytes()).hexdigest()

        kubelet_update(mounted, pod_topology(tmp_path / "state", news=True))
        new = hashlib.sha256(config_file.read_bytes()).hexdigest()
        assert new != first
        for node in nodes:
            wait_until(lambda: healthz_sha(node.admin) == new, f"{node.name} reloading the swapped file")
        status, headers = get(l1 + "/gen/n?cc=max-age=60", "news.example.com")
        assert status == 200 and headers["Cache-Status"].split(",")[0].startswith("l2-a;")
        for node in nodes:
            assert node.proc is not None and node.proc.poll() is None      # reloaded, never restarted
            assert "changed: reloading" in node.log.read_text()
    finally:
        for node in nodes:
            node.stop()
    l2_log = nodes[1].log.read_text()
    assert "serving traffic on localhost:18141, admin on localhost:18142 (bound on 127.0.0.1)" in l2_log


# --------------------------------------------------------------------------- what goes with the manifests


def test_the_dockerfile_builds_what_the_manifests_run():
    """Not built here (no registry): what it copies exists, and its user is the pods' user."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), line
    assert f"--uid {k8s.UID} " in dockerfile and f"USER {k8s.UID}:{k8s.UID}" in dockerfile
    assert 'ENTRYPOINT ["edge"]' in dockerfile
    allowed = [line[1:] for line in (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
               if line.startswith("!")]
    assert sorted(allowed) == ["README.md", "edge", "origin", "pyproject.toml"]


def test_the_in_cluster_scrape_config_matches_the_pods():
    """deploy/prometheus/kubernetes.yml keeps and labels pods by what `edge k8s` puts on them
    (Debian's promtool is built without Kubernetes discovery, so the names are checked here)."""
    scrape = yaml.safe_load((REPO / "deploy" / "prometheus" / "kubernetes.yml").read_text())
    (job,) = scrape["scrape_configs"]
    relabel = {tuple(r["source_labels"]): r for r in job["relabel_configs"]}
    workload = find(render(), "StatefulSet", "edge-l2-a")
    labels = workload["spec"]["template"]["metadata"]["labels"]
    annotations = workload["spec"]["template"]["metadata"]["annotations"]

    def meta(prefix: str, key: str) -> str:
        return prefix + re.sub(r"[^a-zA-Z0-9_]", "_", key)

    assert relabel[(meta("__meta_kubernetes_pod_annotation_", "prometheus.io/scrape"),)]["regex"] == \
        annotations["prometheus.io/scrape"]
    assert relabel[(meta("__meta_kubernetes_pod_label_", "app.kubernetes.io/name"),)]["regex"] == \
        labels["app.kubernetes.io/name"]
    assert relabel[("__meta_kubernetes_pod_container_port_name",)]["regex"] == "admin"
    assert relabel[(meta("__meta_kubernetes_pod_label_", k8s.NODE_LABEL),)]["target_label"] == "node"
    assert relabel[(meta("__meta_kubernetes_pod_label_", "app.kubernetes.io/component"),)]["target_label"] == "role"
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [k8s.Options().namespace]
